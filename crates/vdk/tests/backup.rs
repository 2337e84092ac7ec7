//! Dirty bitmaps and incremental backups: QEMU's qemu-io writes a disk over NBD, libnbd's
//! nbdinfo and QEMU read its `qemu:dirty-bitmap:NAME` context, `vdk backup` makes a full
//! backup and then incremental ones (a qcow2 chain), and qemu-img restores each point of the
//! chain byte for byte. A backup is the disk at the moment it began, though it is written
//! while the backup copies.

mod common;

use std::path::Path;
use std::process::Command;

use common::{need, run, stdout, Daemon};

/// `qemu-io -f raw URI -c CMD...`, which must succeed.
fn qemu_io(uri: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = stdout(&mut c);
    assert!(!out.contains("failed"), "qemu-io {cmds:?}: {out}");
}

/// The disk's bytes now, read over NBD by nbdcopy into `to`.
fn copy_of(uri: &str, to: &Path) -> Vec<u8> {
    run(Command::new("nbdcopy").arg(uri).arg(to));
    std::fs::read(to).unwrap()
}

/// A qcow2 backup chain ending at `image`, as qemu-img converts it to raw.
fn restored(image: &Path) -> Vec<u8> {
    let out = image.with_extension("restored");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(image)
        .arg(&out));
    let check = stdout(Command::new("qemu-img").arg("check").arg(image));
    assert!(
        check.contains("No errors"),
        "qemu-img check {image:?}: {check}"
    );
    std::fs::read(out).unwrap()
}

/// The dirty ranges nbdinfo reads from the bitmap's metadata context, as (offset, length).
fn dirty_map(uri: &str, bitmap: &str) -> Vec<(u64, u64)> {
    let map = stdout(
        Command::new("nbdinfo")
            .arg(format!("--map=qemu:dirty-bitmap:{bitmap}"))
            .arg("--json")
            .arg(uri),
    );
    let v: serde_json::Value = serde_json::from_str(&map).expect("nbdinfo --json");
    v.as_array()
        .expect("extents")
        .iter()
        .filter(|e| e["type"] == 1)
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

fn bitmaps(d: &Daemon, id: &str) -> serde_json::Value {
    d.json(&["bitmap", "list", id])
}

const K64: u64 = 64 << 10;
const M: u64 = 1 << 20;

#[test]
fn incremental_backups_restore_the_disk_at_each_point() {
    for tool in ["qemu-io", "qemu-img", "nbdinfo", "nbdcopy"] {
        need(tool);
    }
    let d = Daemon::new();
    d.start(&[]);
    let v = d.open(&[
        d.path("disk.img").to_str().unwrap(),
        "64M",
        "--attach",
        "none",
    ]);
    let id = v["id"].as_str().unwrap().to_owned();
    let uri = v["nbd"][0].as_str().unwrap().to_owned();
    qemu_io(&uri, &["write -P 0x01 0 8M"]);
    d.ok(&["bitmap", "add", &id, "daily"]);
    let b = bitmaps(&d, &id);
    assert_eq!(b[0]["name"], "daily");
    assert_eq!(
        (b[0]["granularity"].as_u64(), b[0]["dirty"].as_u64()),
        (Some(K64), Some(0))
    );

    // Writes, zeroes and trims mark whole granules; nbdinfo reads them over NBD.
    qemu_io(
        &uri,
        &[
            "write -P 0x11 100k 1M",
            "write -z 20M 128k",
            "discard 30M 64k",
            "write -P 0x12 40M 1",
        ],
    );
    let want = vec![
        (64 << 10, 1088 << 10),
        (20 * M, 128 << 10),
        (30 * M, K64),
        (40 * M, K64),
    ];
    assert_eq!(dirty_map(&uri, "daily"), want);
    let dirty: u64 = want.iter().map(|(_, l)| l).sum();
    assert_eq!(bitmaps(&d, &id)[0]["dirty"].as_u64(), Some(dirty));
    // QEMU reads the context too (as its own incremental backup tools do): with
    // x-dirty-bitmap, qemu-img map shows what is dirty as not data.
    let sock = d.dir.path().join("run/nbd.sock");
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export={id},x-dirty-bitmap=qemu:dirty-bitmap:daily",
        sock.display()
    );
    let map =
        stdout(Command::new("qemu-img").args(["map", "--output=json", "--image-opts", &opts]));
    let m: serde_json::Value = serde_json::from_str(&map).expect("qemu-img map --output=json");
    let qemu_dirty: Vec<(u64, u64)> = m
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == false)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(qemu_dirty, want, "{map}");

    // Point 1: a full backup, which starts the bitmap again.
    let full = d.path("full.qcow2");
    let r = d.json(&["backup", &id, "--bitmap", "daily", full.to_str().unwrap()]);
    assert_eq!(r["scanned"].as_u64(), Some(64 * M));
    let p1 = copy_of(&uri, &d.path("p1.raw"));
    assert_eq!(bitmaps(&d, &id)[0]["dirty"].as_u64(), Some(0));
    assert_eq!(bitmaps(&d, &id)[0]["last_backup"], full.to_str().unwrap());

    // Point 2: more writes, an incremental backup on top of the full one.
    qemu_io(
        &uri,
        &[
            "write -P 0x21 512k 1M",
            "write -z 0 4k",
            "write -P 0x22 60M 100k",
        ],
    );
    let inc1 = d.path("inc1.qcow2");
    let r = d.json(&[
        "backup",
        &id,
        "--bitmap",
        "daily",
        "--incremental",
        inc1.to_str().unwrap(),
    ]);
    assert_eq!(r["base"], full.to_str().unwrap());
    // Granule 0, 512k..1536k, two granules at 60M.
    assert_eq!(r["scanned"].as_u64(), Some(K64 + M + 2 * K64), "{r}");
    let p2 = copy_of(&uri, &d.path("p2.raw"));
    assert_eq!(bitmaps(&d, &id)[0]["dirty"].as_u64(), Some(0));

    // Point 3: a trim over data of point 1, a write at the end.
    qemu_io(&uri, &["discard 0 1M", "write -P 0x31 63M 1M"]);
    let inc2 = d.path("inc2.qcow2");
    d.ok(&[
        "backup",
        &id,
        "--bitmap",
        "daily",
        "--incremental",
        inc2.to_str().unwrap(),
    ]);
    let p3 = copy_of(&uri, &d.path("p3.raw"));

    assert!(p1 != p2 && p2 != p3);
    assert!(
        restored(&full) == p1,
        "the full backup is not the disk at point 1"
    );
    assert!(
        restored(&inc1) == p2,
        "the chain to inc1 is not the disk at point 2"
    );
    assert!(
        restored(&inc2) == p3,
        "the chain to inc2 is not the disk at point 3"
    );
    // Each incremental holds only what changed: far less than the disk.
    let info = stdout(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&inc2),
    );
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["backing-filename"], inc1.to_str().unwrap());
    assert!(info["actual-size"].as_u64().unwrap() < 4 * M, "{info}");

    // Nothing is overwritten; what cannot be done is said in one line.
    let before = std::fs::read(&full).unwrap();
    let e = d.fails(&["backup", &id, full.to_str().unwrap()]);
    assert!(e.contains("exists already"), "{e}");
    assert_eq!(std::fs::read(&full).unwrap(), before);
    let e = d.fails(&[
        "backup",
        &id,
        "--bitmap",
        "nope",
        d.path("x.qcow2").to_str().unwrap(),
    ]);
    assert!(e.contains("no bitmap \"nope\""), "{e}");
    assert!(!d.path("x.qcow2").exists());
    d.ok(&["bitmap", "add", &id, "fresh", "--granularity", "4k"]);
    let e = d.fails(&[
        "backup",
        &id,
        "--bitmap",
        "fresh",
        "--incremental",
        "/tmp/never.qcow2",
    ]);
    assert!(e.contains("no earlier backup"), "{e}");
    let e = d.fails(&["bitmap", "add", &id, "fresh"]);
    assert!(e.contains("already has a bitmap"), "{e}");
    let e = d.fails(&["bitmap", "add", &id, "odd", "--granularity", "1000"]);
    assert!(e.contains("power of two"), "{e}");
    for (args, says) in [
        (&["bitmap", "add", &id][..], "<NAME>"),
        (&["backup", &id, "--incremental", "y.qcow2"][..], "--bitmap"),
    ] {
        let out = d.cmd(args).output().unwrap();
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && e.contains(says), "{args:?}: {e}");
    }
    // Clear and remove; `list` shows the disk's bitmaps.
    qemu_io(&uri, &["write -P 0x41 0 4k"]);
    let listed = d.json(&["list"]);
    assert_eq!(
        listed[0]["bitmaps"].as_array().unwrap().len(),
        2,
        "{listed}"
    );
    d.ok(&["bitmap", "clear", &id, "fresh"]);
    assert_eq!(bitmaps(&d, &id)[1]["dirty"].as_u64(), Some(0));
    d.ok(&["bitmap", "remove", &id, "fresh"]);
    assert_eq!(bitmaps(&d, &id).as_array().unwrap().len(), 1);
    let e = d.fails(&["bitmap", "remove", &id, "fresh"]);
    assert!(e.contains("no bitmap"), "{e}");
}

/// A backup is of the disk when it began: writes that come while it copies (slowed here by
/// a rate filter on the disk's reads) land on the disk, not in the backup, and the next
/// incremental backup has them.
#[test]
fn a_backup_is_the_disk_when_it_began_though_written_meanwhile() {
    for tool in ["qemu-io", "qemu-img", "nbdcopy"] {
        need(tool);
    }
    let d = Daemon::new();
    d.start(&[]);
    let img = d.path("busy.img");
    let v = d.open(&[
        img.to_str().unwrap(),
        "32M",
        "--attach",
        "none",
        "--filter",
        "rate:read-bps=8M",
    ]);
    let id = v["id"].as_str().unwrap().to_owned();
    let uri = v["nbd"][0].as_str().unwrap().to_owned();
    qemu_io(&uri, &["write -P 0x5a 0 32M"]);
    d.ok(&["bitmap", "add", &id, "b"]);
    let full = d.path("full.qcow2");
    let mut backup = d
        .cmd(&["backup", &id, "--bitmap", "b", full.to_str().unwrap()])
        .spawn()
        .expect("start vdk backup");
    assert!(d.log_has("backup started"), "{}", d.log());
    let e = d.fails(&["close", &id]);
    assert!(e.contains("being backed up"), "{e}");
    // `list` shows how far it is (what `vdk backup` draws its progress bar from).
    let listed = d.json(&["list"]);
    let running = &listed[0]["backup"];
    assert_eq!(running["target"], full.to_str().unwrap(), "{listed}");
    assert_eq!(running["total"].as_u64(), Some(32 * M));
    assert!(running["done"].as_u64().unwrap() < 32 * M, "{listed}");
    // Overwrite all of it while the backup reads at 8 MB/s (about 4 s for 32 MiB).
    qemu_io(&uri, &["write -P 0xa5 0 32M"]);
    assert!(backup.wait().unwrap().success());
    assert!(d.log_has("done=50%"), "progress in the log: {}", d.log());
    assert!(d.json(&["list"])[0]["backup"].is_null());
    assert!(
        restored(&full).iter().all(|b| *b == 0x5a),
        "the backup holds writes made after it began"
    );
    let now = copy_of(&uri, &d.path("now.raw"));
    assert!(now.iter().all(|b| *b == 0xa5));
    let inc = d.path("inc.qcow2");
    d.ok(&[
        "backup",
        &id,
        "--bitmap",
        "b",
        "--incremental",
        inc.to_str().unwrap(),
    ]);
    assert!(restored(&inc) == now);
}

/// Writes through the block device (fuse-loop) mark the bitmap as NBD ones do.
#[test]
fn block_device_writes_mark_bitmaps() {
    common::need_root();
    need("nbdinfo");
    let d = Daemon::new();
    d.start(&[]);
    let v = d.open(&[
        d.path("dev.img").to_str().unwrap(),
        "16M",
        "--attach",
        "fuse-loop",
    ]);
    let id = v["id"].as_str().unwrap().to_owned();
    let uri = v["nbd"][0].as_str().unwrap().to_owned();
    let dev = v["block_device"]
        .as_str()
        .expect("a block device")
        .to_owned();
    d.ok(&["bitmap", "add", &id, "dev", "--granularity", "4096"]);
    run(Command::new("dd")
        .args([
            "if=/dev/urandom",
            &format!("of={dev}"),
            "bs=4096",
            "seek=100",
            "count=3",
        ])
        .args(["oflag=direct", "status=none"]));
    assert_eq!(dirty_map(&uri, "dev"), vec![(100 * 4096, 3 * 4096)]);
    d.ok(&["close", &id]);
}

/// The bitmaps `qemu-img info` lists for `image`, as (name, flags).
fn qemu_bitmaps(image: &Path) -> Vec<(String, Vec<String>)> {
    let info = stdout(
        Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(image),
    );
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    let Some(list) = v["format-specific"]["data"]["bitmaps"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .map(|b| {
            let flags = b["flags"].as_array().unwrap();
            (
                b["name"].as_str().unwrap().to_owned(),
                flags
                    .iter()
                    .map(|f| f.as_str().unwrap().to_owned())
                    .collect(),
            )
        })
        .collect()
}

/// What QEMU's own NBD server (qemu-nbd -B) reads of a bitmap stored in `image`.
fn qemu_dirty_map(image: &Path, bitmap: &str) -> Vec<(u64, u64)> {
    let sock = image.with_extension(format!("{bitmap}.sock"));
    let _ = std::fs::remove_file(&sock);
    let mut server = Command::new("qemu-nbd")
        .args(["-r", "-t", "-f", "qcow2", "-k"])
        .arg(&sock)
        .args(["-B", bitmap])
        .arg(image)
        .spawn()
        .expect("start qemu-nbd");
    common::wait_for(10, "qemu-nbd to listen", || {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    });
    let map = dirty_map(&format!("nbd+unix:///?socket={}", sock.display()), bitmap);
    let _ = server.kill();
    let _ = server.wait();
    map
}

fn check_clean(image: &Path) {
    let check = stdout(Command::new("qemu-img").arg("check").arg(image));
    assert!(
        check.contains("No errors") && !check.contains("leaked"),
        "{check}"
    );
}

/// Persistent bitmaps live in the qcow2 image as QEMU keeps them: one QEMU made is loaded
/// and kept up to date, one vdk made is read by QEMU; both survive a clean restart of the
/// daemon (an incremental backup after it restores the disk), and after kill -9 they come
/// back inconsistent (in use, as QEMU marks them), unusable until removed.
#[test]
fn persistent_bitmaps_survive_a_clean_restart_and_are_inconsistent_after_kill_9() {
    for tool in ["qemu-io", "qemu-img", "qemu-nbd", "nbdinfo", "nbdcopy"] {
        need(tool);
    }
    let d = Daemon::new();
    let img = d.path("p.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("64M"));
    run(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&img)
        .arg("qemu-made"));
    let open = || d.open(&[img.to_str().unwrap(), "--attach", "none"]);
    let v = open();
    let id = v["id"].as_str().unwrap().to_owned();
    let uri = v["nbd"][0].as_str().unwrap().to_owned();
    d.ok(&[
        "bitmap",
        "add",
        &id,
        "vdk-made",
        "--persistent",
        "--granularity",
        "4k",
    ]);
    d.ok(&["bitmap", "add", &id, "memory-only"]);
    let b = bitmaps(&d, &id);
    let flags: Vec<_> = (0..3)
        .map(|i| (b[i]["name"].clone(), b[i]["persistent"].clone()))
        .collect();
    assert_eq!(
        flags,
        vec![
            ("qemu-made".into(), true.into()),
            ("vdk-made".into(), true.into()),
            ("memory-only".into(), false.into())
        ]
    );
    // While open, QEMU sees both in use.
    let in_use = vec!["in-use".to_owned(), "auto".to_owned()];
    assert_eq!(
        qemu_bitmaps(&img),
        vec![
            ("qemu-made".into(), in_use.clone()),
            ("vdk-made".into(), in_use.clone())
        ]
    );
    qemu_io(&uri, &["write -P 0x61 100k 1", "write -P 0x62 7M 4k"]);
    let full = d.path("full.qcow2");
    d.ok(&[
        "backup",
        &id,
        "--bitmap",
        "vdk-made",
        full.to_str().unwrap(),
    ]);
    qemu_io(&uri, &["write -P 0x63 9M 8k"]);
    let vdk_map = dirty_map(&uri, "vdk-made");
    assert_eq!(vdk_map, vec![(9 * M, 8192)]);
    let qemu_map = dirty_map(&uri, "qemu-made");
    assert_eq!(qemu_map, vec![(64 << 10, K64), (7 * M, K64), (9 * M, K64)]);

    // A clean stop saves them: QEMU reads the same bits, the image checks clean.
    d.ok(&["daemon", "--stop"]);
    let auto = vec!["auto".to_owned()];
    assert_eq!(
        qemu_bitmaps(&img),
        vec![
            ("qemu-made".into(), auto.clone()),
            ("vdk-made".into(), auto.clone())
        ]
    );
    check_clean(&img);
    // `vdk info` lists them as qemu-img info does.
    let info = d.json(&["info", img.to_str().unwrap()]);
    let listed = &info["format-specific"]["data"]["bitmaps"];
    let names: Vec<_> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].clone(),
                b["flags"].clone(),
                b["granularity"].clone(),
            )
        })
        .collect();
    assert_eq!(
        names,
        vec![
            (
                "qemu-made".into(),
                serde_json::json!(["auto"]),
                serde_json::json!(65536)
            ),
            (
                "vdk-made".into(),
                serde_json::json!(["auto"]),
                serde_json::json!(4096)
            )
        ]
    );
    assert_eq!(qemu_dirty_map(&img, "vdk-made"), vdk_map);
    assert_eq!(qemu_dirty_map(&img, "qemu-made"), qemu_map);

    // A new daemon has them as they were; an incremental backup on the full one made before
    // the restart restores the disk.
    open();
    assert_eq!(bitmaps(&d, &id).as_array().unwrap().len(), 2);
    assert_eq!(dirty_map(&uri, "vdk-made"), vdk_map);
    let inc = d.path("inc.qcow2");
    d.ok(&[
        "backup",
        &id,
        "--bitmap",
        "vdk-made",
        "--incremental",
        inc.to_str().unwrap(),
        "--base",
        full.to_str().unwrap(),
    ]);
    assert!(restored(&inc) == copy_of(&uri, &d.path("now.raw")));

    // kill -9: the bitmaps stay in use in the image (QEMU calls them inconsistent), the
    // image is sound, and the next daemon will not use them.
    qemu_io(&uri, &["write -P 0x64 20M 4k"]);
    run(Command::new("kill").args(["-9", &d.pid().to_string()]));
    common::wait_for(10, "the daemon to die", || {
        std::os::unix::net::UnixStream::connect(&d.socket).is_err()
    });
    assert_eq!(
        qemu_bitmaps(&img),
        vec![
            ("qemu-made".into(), in_use.clone()),
            ("vdk-made".into(), in_use.clone())
        ]
    );
    check_clean(&img);
    open();
    let b = bitmaps(&d, &id);
    assert!(
        b.as_array()
            .unwrap()
            .iter()
            .all(|b| b["inconsistent"] == true),
        "{b}"
    );
    let e = d.fails(&[
        "backup",
        &id,
        "--bitmap",
        "vdk-made",
        d.path("x.qcow2").to_str().unwrap(),
    ]);
    assert!(e.contains("inconsistent"), "{e}");
    let contexts = stdout(Command::new("nbdinfo").arg(&uri));
    assert!(!contexts.contains("qemu:dirty-bitmap:"), "{contexts}");
    // Removing one takes it out of the image; closing leaves the other as QEMU would.
    d.ok(&["bitmap", "remove", &id, "vdk-made"]);
    d.ok(&["close", &id]);
    assert_eq!(qemu_bitmaps(&img), vec![("qemu-made".into(), in_use)]);
    check_clean(&img);
}
