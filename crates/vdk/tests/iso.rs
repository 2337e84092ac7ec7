//! ISO 9660 images: recognised by their volume descriptor, served read-only as a CD-ROM of
//! 2048-byte blocks, over NBD and as a block device.
#![allow(clippy::cast_possible_truncation)] // test sizes are small constants

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::admin::same_raw;
use common::{need, need_root, run, stdout, Daemon, Vdk};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// An ISO of a few files, made by xorriso, with volume id VDKTEST.
fn make_iso(dir: &Path) -> PathBuf {
    need("xorriso");
    let tree = dir.join("tree");
    fs::create_dir_all(tree.join("sub")).unwrap();
    fs::write(tree.join("hello.txt"), b"hello from an ISO\n").unwrap();
    fs::write(tree.join("sub/data.bin"), common::pattern(300_000, 5)).unwrap();
    let iso = dir.join("disc.iso");
    run(Command::new("xorriso").args([
        "-as",
        "mkisofs",
        "-quiet",
        "-V",
        "VDKTEST",
        "-o",
        s(&iso),
        s(&tree),
    ]));
    iso
}

#[test]
fn info_recognises_an_iso() {
    let dir = tempfile::tempdir().unwrap();
    let iso = make_iso(dir.path());
    let v: serde_json::Value =
        serde_json::from_str(&stdout(Command::new(env!("CARGO_BIN_EXE_vdk")).args([
            "info",
            "--json",
            s(&iso),
        ])))
        .unwrap();
    assert_eq!(v["format"], "iso");
    assert_eq!(v["format-specific"]["data"]["volume-id"], "VDKTEST");
    assert_eq!(v["virtual-size"], fs::metadata(&iso).unwrap().len());
}

#[test]
fn an_iso_is_served_read_only_with_2048_byte_blocks() {
    need("nbdinfo");
    need("qemu-img");
    need("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    make_iso(dir.path());
    let vdk = Vdk::serve_in(dir, &["disc.iso"]);
    let uri = vdk.uri("disc.iso");
    let info: serde_json::Value =
        serde_json::from_str(&stdout(Command::new("nbdinfo").args(["--json", &uri]))).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["is_read_only"], true, "{export}");
    assert_eq!(export["block_size_minimum"], 2048, "{export}");
    same_raw(&uri, s(&vdk.path("disc.iso")));
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 2048", &uri])
        .env("PATH", common::path_env())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() || text.contains("failed"),
        "a write to a CD-ROM is refused: {text}"
    );
}

#[test]
fn an_open_iso_is_a_read_only_block_device_of_2048_byte_sectors() {
    need_root();
    let d = Daemon::new();
    let iso = make_iso(d.dir.path());
    let v = d.open(&[s(&iso)]);
    assert_eq!(v["format"], "iso");
    assert_eq!(v["read_only"], true, "an ISO opens read-only");
    let dev = v["block_device"].as_str().unwrap().to_owned();
    let name = Path::new(&dev)
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let q = |f: &str| {
        fs::read_to_string(format!("/sys/block/{name}/{f}"))
            .unwrap()
            .trim()
            .to_owned()
    };
    assert_eq!(q("queue/logical_block_size"), "2048");
    assert_eq!(q("ro"), "1");
    assert!(
        fs::read(&dev).unwrap() == fs::read(&iso).unwrap(),
        "the device reads as the ISO"
    );
    d.ok(&["close", v["id"].as_str().unwrap()]);
}
