//! The NBD server driven by nbdsh (Python libnbd): every option and command, and the errors.
#![allow(clippy::cast_possible_truncation)] // test sizes are small constants

mod common;

use common::{nbdsh_script, sparse_file, Vdk};
use tempfile::TempDir;

const MIB: u64 = 1 << 20;

/// A server with a 64 MiB sparse file "disk" and a 32 MiB RAM disk "ram".
fn two_exports() -> Vdk {
    let dir = TempDir::new().unwrap();
    sparse_file(&dir.path().join("disk.img"), 64 * MIB);
    Vdk::serve_in(
        dir,
        &[
            "--export",
            "disk=disk.img",
            "--export",
            "ram=memory:32M",
            "--description",
            "vdk test",
        ],
    )
}

#[test]
fn options_list_info_go_abort_meta_context_export_name_starttls() {
    let vdk = two_exports();
    nbdsh_script(&vdk, "handshake.py");
}

#[test]
fn commands_read_write_flush_trim_zero_block_status_cache_disc() {
    let vdk = two_exports();
    nbdsh_script(&vdk, "commands.py");
}

#[test]
fn bad_requests_get_errors_and_the_connection_lives_on() {
    let vdk = two_exports();
    nbdsh_script(&vdk, "errors.py");
}

#[test]
fn many_requests_in_flight_and_several_connections() {
    let vdk = two_exports();
    nbdsh_script(&vdk, "parallel.py");
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let dir = TempDir::new().unwrap();
    let img = dir.path().join("disk.img");
    sparse_file(&img, 64 * MIB);
    std::fs::write(&img, b"hello").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let vdk = Vdk::serve_in(dir, &["--read-only", "disk.img"]);
    nbdsh_script(&vdk, "readonly.py");
}
