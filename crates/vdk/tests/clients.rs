//! vdk served to the clients people use: nbdinfo, qemu-img, qemu-io, nbdcopy.
#![allow(clippy::cast_possible_truncation)] // test sizes are small constants

mod common;

use std::process::Command;

use common::{need, pattern, run, sparse_file, stdout, Vdk};
use tempfile::TempDir;

const MIB: u64 = 1 << 20;

fn serve_sparse(size: u64) -> Vdk {
    let dir = TempDir::new().unwrap();
    sparse_file(&dir.path().join("disk.img"), size);
    Vdk::serve_in(dir, &["disk.img"])
}

#[test]
fn nbdinfo_lists_exports() {
    need("nbdinfo");
    let dir = TempDir::new().unwrap();
    sparse_file(&dir.path().join("a.img"), 8 * MIB);
    let vdk = Vdk::serve_in(dir, &["a.img", "--export", "scratch=memory:1G"]);
    let out = stdout(Command::new("nbdinfo").arg("--list").arg(vdk.uri("")));
    assert!(out.contains("export=\"a.img\""), "{out}");
    assert!(out.contains("export=\"scratch\""), "{out}");
    assert!(out.contains("export-size: 1073741824"), "{out}");
}

#[test]
fn nbdinfo_json_reports_size_and_capabilities() {
    need("nbdinfo");
    let vdk = serve_sparse(64 * MIB);
    let out = stdout(Command::new("nbdinfo").arg("--json").arg(vdk.uri("")));
    for want in [
        "\"export-size\": 67108864",
        "\"is_read_only\": false",
        "\"can_trim\": true",
        "\"can_zero\": true",
        "\"can_fua\": true",
        "\"can_multi_conn\": true",
        "\"block_size_maximum\": 33554432",
        "\"base:allocation\"",
    ] {
        assert!(out.contains(want), "missing {want} in:\n{out}");
    }
}

#[test]
fn nbdinfo_map_shows_data_between_holes() {
    need("nbdinfo");
    let dir = TempDir::new().unwrap();
    let img = dir.path().join("disk.img");
    sparse_file(&img, 16 * MIB);
    let f = std::fs::File::options().write(true).open(&img).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &pattern(MIB as usize, 1), 4 * MIB).unwrap();
    let vdk = Vdk::serve_in(dir, &["disk.img"]);
    let out = stdout(Command::new("nbdinfo").arg("--map").arg(vdk.uri("")));
    let rows: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let expect = [
        ["0", "4194304", "3"],
        ["4194304", "1048576", "0"],
        ["5242880", "11534336", "3"],
    ];
    assert_eq!(rows.len(), 3, "{out}");
    for (row, want) in rows.iter().zip(expect) {
        assert_eq!(&row[..3], &want[..], "{out}");
    }
    // The same map through QEMU's client, which negotiates extended headers (64-bit block
    // status), while Debian's libnbd 1.14 keeps the compact ones: the server says which.
    need("qemu-img");
    let out = stdout(Command::new("qemu-img").args(["map", "--output=json", &vdk.uri("")]));
    let map: serde_json::Value = serde_json::from_str(&out).unwrap();
    let data: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(data, vec![(4 * MIB, MIB)], "{out}");
    // The server's log lines may land a moment after the client is done.
    common::wait_for(10, "qemu-img's connection in the log", || {
        vdk.log().contains("extended=true")
    });
    let log = vdk.log();
    assert!(log.contains("extended=false"), "nbdinfo: {log}");
}

#[test]
fn qemu_img_info_convert_in_and_out_and_compare() {
    need("qemu-img");
    let vdk = serve_sparse(32 * MIB);
    let info = stdout(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(vdk.uri("")),
    );
    assert!(info.contains("\"virtual-size\": 33554432"), "{info}");
    // In: a local image with data and holes, converted onto the NBD disk.
    let src = vdk.path("src.img");
    sparse_file(&src, 32 * MIB);
    let f = std::fs::File::options().write(true).open(&src).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &pattern(3 * MIB as usize, 7), 5 * MIB).unwrap();
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(vdk.uri("")));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(vdk.uri("")));
    // Out: the NBD disk converted to a qcow2, which must hold the same data.
    let out = vdk.path("out.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(vdk.uri(""))
        .arg(&out));
    run(Command::new("qemu-img")
        .args(["compare", "-F", "raw"])
        .arg(&out)
        .arg(&src));
    // The holes were seen as holes: the copy holds about the 3 MiB of data, not 32 MiB.
    let qinfo = stdout(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&out),
    );
    let actual: u64 = qinfo
        .split("\"actual-size\": ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .expect("actual-size in qemu-img info");
    assert!(
        actual < 8 * MIB,
        "qcow2 copy is {actual} bytes: holes were copied as data"
    );
}

#[test]
fn qemu_io_verifies_patterns_aio_discard_and_write_zeroes() {
    need("qemu-io");
    let vdk = serve_sparse(64 * MIB);
    let uri = vdk.uri("");
    let io = |cmds: &[&str]| {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        c.arg(&uri);
        let out = stdout(&mut c);
        assert!(!out.contains("Pattern verification failed"), "{out}");
        assert!(
            !out.to_lowercase().contains("error") && !out.contains("failed"),
            "{out}"
        );
        out
    };
    io(&[
        "write -P 0xa5 0 1M",
        "write -P 0x5a 1M 64k",
        "write -f -P 0x11 3M 4k",
    ]);
    io(&[
        "read -P 0xa5 0 1M",
        "read -P 0x5a 1M 64k",
        "read -P 0x11 3M 4k",
        "read -P 0 4M 1M",
    ]);
    io(&[
        "aio_write -P 0x33 8M 256k",
        "aio_write -P 0x44 9M 256k",
        "aio_flush",
        "aio_read -P 0x33 8M 256k",
        "aio_read -P 0x44 9M 256k",
        "aio_flush",
    ]);
    io(&[
        "discard 0 512k",
        "read -P 0 0 512k",
        "read -P 0xa5 512k 512k",
    ]);
    io(&[
        "write -z 1M 64k",
        "read -P 0 1M 64k",
        "write -z -u 8M 256k",
        "read -P 0 8M 256k",
    ]);
    // Out-of-range: qemu-io reports the error, vdk keeps serving.
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", "-c", "read 64M 4k"]).arg(&uri);
    let out = c.env("PATH", common::path_env()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("Input/output error")
            || text.contains("Invalid argument")
            || text.contains("out of"),
        "{text}"
    );
    io(&["read -P 0x44 9M 256k"]);
    // QEMU 10's client asked for extended headers, and every request above used them.
    let log = vdk.log();
    assert!(log.contains("extended=true"), "{log}");
    assert!(!log.contains("extended=false"), "{log}");
}

#[test]
fn nbdcopy_copies_in_and_out_exactly() {
    need("nbdcopy");
    let vdk = serve_sparse(48 * MIB);
    let src = vdk.path("src.img");
    let mut data = pattern(48 * MIB as usize, 3);
    data[10 * MIB as usize..20 * MIB as usize].fill(0); // a run of zeroes to be skipped
    std::fs::write(&src, &data).unwrap();
    run(Command::new("nbdcopy").arg(&src).arg(vdk.uri("")));
    let back = vdk.path("back.img");
    run(Command::new("nbdcopy").arg(vdk.uri("")).arg(&back));
    assert!(
        std::fs::read(&back).unwrap() == data,
        "nbdcopy round trip differs"
    );
    // Multi-connection copies (nbdcopy uses multi-conn when advertised) agree too.
    let back4 = vdk.path("back4.img");
    run(Command::new("nbdcopy")
        .args(["--connections=4", "--requests=16"])
        .arg(vdk.uri(""))
        .arg(&back4));
    assert!(
        std::fs::read(&back4).unwrap() == data,
        "4-connection copy differs"
    );
}

#[test]
fn direct_io_export_advertises_4k_blocks_and_clients_align_to_them() {
    need("nbdinfo");
    need("qemu-io");
    let dir = TempDir::new().unwrap();
    sparse_file(&dir.path().join("disk.img"), 16 * MIB);
    let vdk = Vdk::serve_in(dir, &["--direct", "disk.img"]);
    let json = stdout(Command::new("nbdinfo").arg("--json").arg(vdk.uri("")));
    assert!(json.contains("\"block_size_minimum\": 4096"), "{json}");
    // qemu-io reads-modifies-writes around the unaligned write on its side.
    let out = stdout(
        Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 0x42 512 4k",
                "-c",
                "read -P 0x42 512 4k",
            ])
            .args(["-c", "write -P 0x43 1M 64k", "-c", "read -P 0x43 1M 64k"])
            .arg(vdk.uri("")),
    );
    assert!(
        !out.contains("verification failed") && !out.contains("error"),
        "{out}"
    );
    let data = std::fs::read(vdk.path("disk.img")).unwrap();
    assert!(
        data[512..4608].iter().all(|&b| b == 0x42),
        "direct write did not reach the file"
    );
}

#[test]
fn pattern_disk_matches_nbdkit_pattern_plugin() {
    need("nbdkit");
    need("qemu-img");
    let vdk = Vdk::serve(&["--export", "p=pattern:64M"]);
    // nbdkit runs qemu-img with $uri pointing at its own pattern disk of the same size.
    let compare = format!("qemu-img compare -f raw -F raw \"$uri\" '{}'", vdk.uri("p"));
    run(Command::new("nbdkit").args(["-U", "-", "pattern", "64M", "--run", &compare]));
    // And the export is read-only: qemu-io will not open it for writing.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4k"])
        .arg(vdk.uri("p"))
        .env("PATH", common::path_env())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("Permission denied"),
        "{text}"
    );
}

#[test]
fn fio_verifies_random_mixed_size_writes_on_file_and_ram() {
    need("fio");
    let dir = TempDir::new().unwrap();
    sparse_file(&dir.path().join("disk.img"), 64 * MIB);
    let vdk = Vdk::serve_in(
        dir,
        &["--export", "file=disk.img", "--export", "ram=memory:64M"],
    );
    for export in ["file", "ram"] {
        // Block sizes from 4 KiB to 256 KiB in 4 KiB steps, queue depth 16: small writes are
        // served inline, large ones by workers, whole 64 KiB chunks by the zero-copy path.
        let out = stdout(
            Command::new("fio")
                .args([
                    "--name=verify",
                    "--ioengine=nbd",
                    "--rw=randwrite",
                    "--iodepth=16",
                ])
                .args(["--bsrange=4k-256k", "--blockalign=4k", "--size=48M"])
                .args(["--verify=crc32c", "--verify_fatal=1", "--do_verify=1"])
                .arg(format!("--uri={}", vdk.uri(export)))
                // fio leaves a verify state file in its working directory.
                .current_dir(vdk.dir.path()),
        );
        assert!(
            out.contains("verify") && !out.contains("verify: bad"),
            "{export}:\n{out}"
        );
        assert!(out.contains("err= 0"), "{export}:\n{out}");
    }
}
