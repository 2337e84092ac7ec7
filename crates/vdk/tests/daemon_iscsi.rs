//! Disks of the daemon served over iSCSI (`vdk open --iscsi`), next to their NBD exports and
//! block devices, driven by libiscsi's tools and QEMU.
#![allow(clippy::cast_possible_truncation)] // test sizes are small constants

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::{need, run, stdout, Daemon};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn daemon(extra: &[&str]) -> Daemon {
    need("iscsi-ls");
    let d = Daemon::new();
    let nbd = format!("unix://{}", d.path("run/nbd.sock").display());
    let mut args = vec!["--listen", "iscsi://127.0.0.1:0", "--listen", &nbd];
    args.extend_from_slice(extra);
    d.start(&args);
    d
}

/// The portal (`iscsi://HOST:PORT/`) of a disk's iSCSI URL.
fn portal(url: &str) -> String {
    let rest = url.trim_start_matches("iscsi://");
    format!("iscsi://{}/", &rest[..rest.find('/').unwrap()])
}

#[test]
fn a_disk_is_a_lun_and_an_nbd_export_of_the_same_bytes() {
    need("qemu-io");
    let d = daemon(&[]);
    let img = d.path("data.img");
    let v = d.open(&[s(&img), "16M", "--iscsi", "--attach", "none"]);
    let id = v["id"].as_str().unwrap().to_owned();
    let url = v["iscsi"][0].as_str().unwrap().to_owned();
    assert_eq!(url, format!("{}iqn.2026-11.org.vdk:{id}/0", portal(&url)));
    // Written over iSCSI, read over NBD and in the file.
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x42 64k 128k", &url]));
    let nbd = v["nbd"][0].as_str().unwrap();
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x42 64k 128k", nbd]));
    let bytes = fs::read(&img).unwrap();
    assert!(bytes[64 << 10..192 << 10].iter().all(|&b| b == 0x42));
    let list = d.json(&["list"]);
    assert_eq!(list[0]["iscsi"][0], url.as_str());
    assert!(list[0]["stats"]["writes"].as_u64().unwrap() > 0);
    let table = d.ok(&["list", "-o", "+ISCSI", "--wide"]);
    assert!(table.contains("ISCSI") && table.contains(&url), "{table}");
    // Closed: the target is gone from discovery.
    d.ok(&["close", &id]);
    let out = stdout(Command::new("iscsi-ls").arg(portal(&url)));
    assert!(!out.contains(&id), "{out}");
}

#[test]
fn disks_opened_with_one_target_name_are_its_luns() {
    need("iscsi-ls");
    let d = daemon(&[]);
    let target = "iqn.2026-11.org.example:shared";
    let a = d.open(&[
        s(&d.path("a.img")),
        "8M",
        "--iscsi",
        "--iscsi-target",
        target,
        "--attach",
        "none",
    ]);
    let b = d.open(&[
        s(&d.path("b.img")),
        "16M",
        "--iscsi",
        "--iscsi-target",
        target,
        "--iscsi-lun",
        "5",
        "--attach",
        "none",
    ]);
    assert!(a["iscsi"][0]
        .as_str()
        .unwrap()
        .ends_with(&format!("{target}/0")));
    assert!(b["iscsi"][0]
        .as_str()
        .unwrap()
        .ends_with(&format!("{target}/5")));
    let root = portal(a["iscsi"][0].as_str().unwrap());
    let out = stdout(Command::new("iscsi-ls").args(["-s", &root]));
    assert_eq!(out.matches(&format!("Target:{target}")).count(), 1, "{out}");
    assert!(out.contains("Lun:0") && out.contains("Lun:5"), "{out}");
    // A taken LUN, a name that is not an iSCSI name, and --iscsi-lun without --iscsi.
    let err = d.fails(&[
        "open",
        s(&d.path("c.img")),
        "8M",
        "--iscsi",
        "--iscsi-target",
        target,
        "--iscsi-lun",
        "5",
        "--attach",
        "none",
    ]);
    assert!(err.contains("LUN 5") && err.contains("taken"), "{err}");
    assert!(
        !d.path("c.img").exists(),
        "a refused open leaves no image behind"
    );
    let err = d.fails(&[
        "open",
        s(&d.path("c.img")),
        "8M",
        "--iscsi",
        "--iscsi-target",
        "Not An IQN",
        "--attach",
        "none",
    ]);
    assert!(err.contains("not an iSCSI name"), "{err}");
    let v = d.request(&format!(
        r#"{{"op":"open","path":"{}","size":8388608,"iscsi_lun":3}}"#,
        d.path("c.img").display()
    ));
    assert_eq!(v["error"]["kind"], "invalid", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("--iscsi"),
        "{v}"
    );
    // Closing one LUN leaves the target and its other LUN.
    d.ok(&["close", a["id"].as_str().unwrap()]);
    let out = stdout(Command::new("iscsi-ls").args(["-s", &root]));
    assert!(out.contains("Lun:5") && !out.contains("Lun:0"), "{out}");
}

#[test]
fn iscsi_all_serves_every_disk_and_chap_guards_them() {
    need("iscsi-inq");
    let d = Daemon::new();
    fs::write(d.path("chap"), "vdk-user:a-long-enough-secret\n").unwrap();
    let nbd = format!("unix://{}", d.path("run/nbd.sock").display());
    d.start(&[
        "--listen",
        "iscsi://127.0.0.1:0",
        "--listen",
        &nbd,
        "--iscsi-all",
        "--iscsi-chap",
        s(&d.path("chap")),
    ]);
    let v = d.open(&[s(&d.path("x.img")), "8M", "--attach", "none"]);
    let url = v["iscsi"][0]
        .as_str()
        .expect("served without --iscsi")
        .to_owned();
    let out = Command::new("iscsi-inq")
        .arg(&url)
        .env("PATH", common::path_env())
        .output()
        .unwrap();
    assert!(!out.status.success(), "no CHAP, no login");
    let with = url.replacen("iscsi://", "iscsi://vdk-user%a-long-enough-secret@", 1);
    let out = stdout(Command::new("iscsi-inq").arg(&with));
    assert!(out.contains("Vendor:VDK"), "{out}");
}

#[test]
fn a_busy_default_portal_is_a_clear_error() {
    // Something else holds a port; the daemon is told to use it.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let d = Daemon::new();
    let out = d
        .cmd(&["daemon", "--listen", &format!("iscsi://127.0.0.1:{port}")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("cannot listen on iscsi://127.0.0.1"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn an_iscsi_disk_keeps_its_block_device_and_file_system() {
    common::need_root();
    need("mkfs.ext4");
    need("qemu-img");
    let d = daemon(&[]);
    let img = d.path("fs.img");
    let mnt = d.path("mnt");
    let v = d.open(&[
        s(&img),
        "64M",
        "--iscsi",
        "--mkfs",
        "ext4",
        "--mount",
        s(&mnt),
    ]);
    assert!(v["block_device"].as_str().unwrap().starts_with("/dev/loop"));
    fs::write(mnt.join("hello.txt"), b"through the loop device").unwrap();
    let id = v["id"].as_str().unwrap().to_owned();
    d.ok(&["unmount", &id]);
    // The iSCSI LUN shows the same file system the block device wrote.
    let url = v["iscsi"][0].as_str().unwrap();
    let copy = d.path("copy.img");
    run(Command::new("qemu-img").args(["convert", "-O", "raw", url, s(&copy)]));
    run(Command::new("fsck.ext4").args(["-n", "-f", s(&copy)]));
    d.ok(&["close", &id]);
}

/// `vdk resize` of an open disk: the image grows, the loop device with it (a file system
/// then grows into it), the iSCSI LUN answers its new capacity, and new NBD connections are
/// told the new size. A qcow2 disk grows its L1 table live. Shrinking, CD-ROMs, read-only
/// disks and filters that cannot follow are refused in one line, changing nothing.
#[test]
fn an_open_disk_grows_for_its_block_device_lun_and_new_nbd_connections() {
    common::need_root();
    need("mkfs.ext4");
    need("resize2fs");
    need("nbdinfo");
    need("qemu-img");
    need("iscsi-readcapacity16");
    let d = daemon(&[]);
    let img = d.path("grow.img");
    let mnt = d.path("mnt");
    let v = d.open(&[
        s(&img),
        "64M",
        "--iscsi",
        "--mkfs",
        "ext4",
        "--mount",
        s(&mnt),
    ]);
    let id = v["id"].as_str().unwrap().to_owned();
    let dev = v["block_device"].as_str().unwrap().to_owned();
    fs::write(mnt.join("kept.txt"), b"written before the disk grew").unwrap();
    // This host lacks CAP_SYS_RESOURCE, which ext4's online resize needs (the guest tests
    // grow a mounted one): the file system grows unmounted here.
    d.ok(&["unmount", &id]);
    let grown = d.json(&["resize", &id, "+32M"]);
    assert_eq!(grown["size"], 96 << 20);
    assert_eq!(fs::metadata(&img).unwrap().len(), 96 << 20);
    let size = stdout(Command::new("blockdev").args(["--getsize64", &dev]));
    assert_eq!(size.trim(), (96u64 << 20).to_string());
    let url = v["iscsi"][0].as_str().unwrap();
    let cap = stdout(Command::new("iscsi-readcapacity16").args(["-s", url]));
    assert_eq!(cap.trim(), (96u64 << 20).to_string(), "{cap}");
    let nbd = v["nbd"][0].as_str().unwrap();
    let nsize = stdout(Command::new("nbdinfo").args(["--size", nbd]));
    assert_eq!(nsize.trim(), (96u64 << 20).to_string());
    run(Command::new("e2fsck").args(["-fy", &dev]));
    run(Command::new("resize2fs").arg(&dev));
    d.ok(&["mount", &id, s(&mnt)]);
    assert_eq!(
        fs::read(mnt.join("kept.txt")).unwrap(),
        b"written before the disk grew"
    );
    let df = stdout(Command::new("df").args(["-B1", "--output=size", s(&mnt)]));
    let fs_size: u64 = df.lines().last().unwrap().trim().parse().unwrap();
    assert!(fs_size > 80 << 20, "the file system did not grow: {df}");
    // The same size again does nothing; a smaller one, or one that is not whole sectors,
    // is refused.
    d.ok(&["resize", &img.display().to_string(), "96M"]);
    let err = d.fails(&["resize", &id, "64M"]);
    assert!(err.contains("shrinks only while closed"), "{err}");
    let err = d.fails(&["resize", &id, "100000001"]);
    assert!(err.contains("multiple of 512"), "{err}");
    d.ok(&["close", &id]);
    run(Command::new("e2fsck").args(["-fn", s(&img)]));
    assert_eq!(fs::metadata(&img).unwrap().len(), 96 << 20);

    // qcow2: past its L1 table, with data at both ends read back by QEMU after close.
    let q = d.path("grow.qcow2");
    let v = d.open(&[s(&q), "16M", "--format", "qcow2", "--attach", "none"]);
    let qid = v["id"].as_str().unwrap().to_owned();
    let nbd = v["nbd"][0].as_str().unwrap().to_owned();
    common::admin::qemu_io("raw", &nbd, &["write -P 0x11 0 64k"]);
    let grown = d.json(&["resize", &qid, "3G"]);
    assert_eq!(grown["size"], 3u64 << 30);
    common::admin::qemu_io(
        "raw",
        &nbd,
        &["write -P 0x22 3071M 1M", "read -P 0x11 0 64k"],
    );
    d.ok(&["close", &qid]);
    run(Command::new("qemu-img").args(["check", s(&q)]));
    let info = common::admin::qemu_json(&["info", "--output=json", s(&q)]);
    assert_eq!(info["virtual-size"], 3u64 << 30);
    common::admin::qemu_io(
        "qcow2",
        s(&q),
        &[
            "read -P 0x11 0 64k",
            "read -P 0x22 3071M 1M",
            "read -P 0 16M 1M",
        ],
    );

    // Refusals name why, and leave the disk as it was.
    let base = d.path("base.img");
    let cow = d.open(&[
        s(&base),
        "8M",
        "--attach",
        "none",
        "--filter",
        &format!("cow:overlay={}", d.path("top.qcow2").display()),
    ]);
    let err = d.fails(&["resize", cow["id"].as_str().unwrap(), "+8M"]);
    assert!(err.contains("cow disk"), "{err}");
    assert_eq!(fs::metadata(&base).unwrap().len(), 8 << 20);
    let cached = d.open(&[
        s(&d.path("cached.img")),
        "8M",
        "--attach",
        "none",
        "--filter",
        "cache:size=1M",
    ]);
    let err = d.fails(&["resize", cached["id"].as_str().unwrap(), "+8M"]);
    assert!(err.contains("cannot grow while open"), "{err}");
    assert_eq!(fs::metadata(d.path("cached.img")).unwrap().len(), 8 << 20);
    let ro = d.open(&[s(&d.path("ro.img")), "8M", "--attach", "none"]);
    d.ok(&["close", ro["id"].as_str().unwrap()]);
    let ro = d.open(&[s(&d.path("ro.img")), "--read-only", "--attach", "none"]);
    let err = d.fails(&["resize", ro["id"].as_str().unwrap(), "+8M"]);
    assert!(err.contains("read-only"), "{err}");
    let iso = common::admin::iso_with_hello(&d.path("cd"));
    let cd = d.open(&[s(&iso), "--attach", "none"]);
    let err = d.fails(&["resize", cd["id"].as_str().unwrap(), "+8M"]);
    assert!(err.contains("CD-ROM"), "{err}");
}
