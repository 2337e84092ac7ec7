//! qcow2 through the vdk binary: create and info agree with qemu-img, images serve
//! byte-identical, and kill -9 at random moments never corrupts an image or loses a flush.
#![allow(clippy::cast_possible_truncation)] // test sizes are small constants

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{need, run, stdout, wait_for};

fn vdk(args: &[&str]) -> String {
    stdout(Command::new(env!("CARGO_BIN_EXE_vdk")).args(args))
}

/// Runs `vdk ARGS`, which must fail; returns its stderr.
fn vdk_fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_vdk"))
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "vdk {args:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn qemu_json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&stdout(Command::new("qemu-img").args(args))).unwrap()
}

/// `qemu-img check IMG` finds nothing wrong.
fn qemu_check(img: &str) {
    run(Command::new("qemu-img").args(["check", img]));
}

/// `qemu-img compare` finds the image `img` (its format probed) equal to the raw file `raw`.
fn qemu_same(img: &str, raw: &str) {
    run(Command::new("qemu-img").args(["compare", "-F", "raw", img, raw]));
}

/// `qemu-img convert` of the image `img` into the raw file `to`.
fn qemu_raw(img: &str, to: &str) {
    run(Command::new("qemu-img").args(["convert", "-O", "raw", img, to]));
}

#[test]
fn create_and_info_agree_with_qemu_img() {
    need("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    vdk(&["create", s(&base), "3G", "--cluster-size", "128K"]);
    qemu_check(s(&base));
    let q = qemu_json(&["info", "--output=json", s(&base)]);
    assert_eq!(q["virtual-size"], 3u64 << 30);
    assert_eq!(q["cluster-size"], 128 << 10);
    assert_eq!(q["format"], "qcow2");
    let top = dir.path().join("top.qcow2");
    vdk(&["create", s(&top), "--backing", "base.qcow2"]);
    let q = qemu_json(&["info", "--output=json", "--backing-chain", s(&top)]);
    assert_eq!(q[0]["backing-filename"], "base.qcow2");
    assert_eq!(q[0]["backing-filename-format"], "qcow2");
    assert_eq!(q[0]["virtual-size"], 3u64 << 30, "size taken from the base");
    let v: serde_json::Value =
        serde_json::from_str(&vdk(&["info", "--json", "--backing-chain", s(&top)])).unwrap();
    for key in [
        "virtual-size",
        "backing-filename",
        "full-backing-filename",
        "format",
    ] {
        assert_eq!(v[0][key], q[0][key], "{key}");
    }
    assert_eq!(v[1]["cluster-size"], 128 << 10);
    assert_eq!(v[1]["filename"], q[1]["filename"]);
    // qemu-img's own images, described by vdk.
    let q2 = dir.path().join("q.qcow2");
    run(Command::new("qemu-img").args([
        "create",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10,cluster_size=4096",
        s(&q2),
        "5M",
    ]));
    let v: serde_json::Value = serde_json::from_str(&vdk(&["info", "--json", s(&q2)])).unwrap();
    assert_eq!(v["format-specific"]["data"]["compat"], "0.10");
    assert_eq!(v["cluster-size"], 4096);
    assert_eq!(v["virtual-size"], 5u64 << 20);
    let text = vdk(&["info", s(&q2)]);
    assert!(text.contains("compat: 0.10"), "{text}");
    // Errors are clear.
    let out = Command::new(env!("CARGO_BIN_EXE_vdk"))
        .args(["create", s(&base), "1G"])
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("exists"));
    let out = Command::new(env!("CARGO_BIN_EXE_vdk"))
        .args([
            "create",
            s(&dir.path().join("x.qcow2")),
            "1G",
            "--cluster-size",
            "3000",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("power of two"));
}

#[test]
fn a_qcow2_served_over_nbd_matches_qemu_img_and_stays_consistent() {
    need("qemu-img");
    need("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    run(Command::new("qemu-img").args(["create", "-f", "qcow2", s(&img), "64M"]));
    run(Command::new("qemu-io").args([
        "-c",
        "write -P 0x31 0 5M",
        "-c",
        "write -P 0x32 40M 3M",
        "-c",
        "write -z 1M 1M",
        s(&img),
    ]));
    let reference = dir.path().join("ref.qcow2");
    fs::copy(&img, &reference).unwrap();
    let mut v = common::Vdk::serve_in(dir, &["d.qcow2"]);
    let uri = v.uri("d.qcow2");
    run(Command::new("qemu-img").args(["compare", "-F", "qcow2", &uri, s(&reference)]));
    // Writes over NBD, the same writes on the reference through qemu.
    let ops = [
        "write -P 0x41 4M 2M",
        "write -P 0x42 100k 3k",
        "discard 40M 1M",
        "write -z 50M 64k",
        "write -P 0x43 63M 1M",
    ];
    let mut args = vec!["-f", "raw"];
    let mut rargs = vec!["-f", "qcow2"];
    for op in &ops {
        args.extend_from_slice(&["-c", op]);
        rargs.extend_from_slice(&["-c", op]);
    }
    args.push(&uri);
    let r = v.path("ref.qcow2");
    rargs.push(s(&r));
    run(Command::new("qemu-io").args(&args));
    run(Command::new("qemu-io").args(&rargs));
    run(Command::new("qemu-img").args(["compare", "-F", "qcow2", &uri, s(&r)]));
    assert!(v.stop().success());
    qemu_check(s(&v.path("d.qcow2")));
    run(Command::new("qemu-img").args(["compare", s(&v.path("d.qcow2")), s(&r)]));
}

/// A qcow2 image left dirty by QEMU (lazy refcounts, qemu-io aborted after its writes: the
/// refcounts lag the references) is opened for writing: vdk rebuilds its refcounts first, as
/// QEMU does, says so in one log line, and then writes, zeroes and discards land where they
/// belong without reusing a live cluster: the image compares equal to a raw copy that took the
/// same writes, and `qemu-img check` finds no error and no leak.
#[test]
fn a_dirty_image_left_by_a_crash_is_repaired_and_written() {
    need("qemu-img");
    need("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    run(Command::new("qemu-img").args([
        "create",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on,cluster_size=65536",
        s(&img),
        "64M",
    ]));
    // qemu-io's "abort" ends the process without closing the image: it stays dirty.
    let _ = Command::new("qemu-io")
        .args([
            "-c",
            "write -P 0x51 0 3M",
            "-c",
            "write -P 0x52 20M 1M",
            "-c",
            "write -z 30M 2M",
            "-c",
            "abort",
            s(&img),
        ])
        .output()
        .unwrap();
    let info = qemu_json(&["info", "--output=json", s(&img)]);
    assert_eq!(info["dirty-flag"], true, "{info}");
    assert!(!Command::new("qemu-img")
        .args(["check", s(&img)])
        .status()
        .unwrap()
        .success());
    let reference = dir.path().join("ref.raw");
    qemu_raw(s(&img), s(&reference));
    let (mut v, uri) = serve_repaired(dir, "d.qcow2");
    // Writes across what was there: new clusters must not land on the clusters the lagging
    // refcounts called free.
    let mut rng = Rng(0x5eed_d1a7);
    let ops: Vec<String> = (0..40)
        .map(|i| {
            let off = rng.below(60 << 20) & !0xfff;
            mixed_op(i, off, (rng.below(256) + 1) << 12, 0x60)
        })
        .collect();
    same_writes(&ops, &uri, &v.path("ref.raw"));
    assert!(v.stop().success());
    let img = v.path("d.qcow2");
    // No error, no leak (qemu-img check exits 0 only then), and clean.
    qemu_check(s(&img));
    let info = qemu_json(&["info", "--output=json", s(&img)]);
    assert_eq!(info["dirty-flag"], false, "{info}");
    run(Command::new("qemu-img").args(["compare", s(&img), s(&v.path("ref.raw"))]));
}

/// An image with internal snapshots made by qemu-img is written through vdk: random writes,
/// zeroes and discards across cluster boundaries land in copies of the clusters and L2 tables
/// the snapshots share, so the active image compares equal to a raw copy that took the same
/// writes, every snapshot still reads as it did (and `qemu-img snapshot -a` brings it back),
/// and `qemu-img check` finds no error and no leak.
#[test]
fn an_image_with_internal_snapshots_is_written_and_its_snapshots_stay_intact() {
    need("qemu-img");
    need("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("s.qcow2");
    let qimg = |args: &[&str]| run(Command::new("qemu-img").args(args));
    qimg(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=65536",
        s(&img),
        "64M",
    ]);
    let qio = |cmds: &[&str]| {
        let mut c = Command::new("qemu-io");
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        run(c.arg(s(&img)));
    };
    // Data, a preallocated zero run and a compressed cluster, then a snapshot of them.
    qio(&[
        "write -P 0x11 0 5M",
        "write -P 0x12 40M 1M",
        "write -c -P 0x13 50M 64k",
    ]);
    qio(&["write -z 2M 1M"]);
    qimg(&["snapshot", "-c", "one", s(&img)]);
    // The active image moves on; a second snapshot shares part of it.
    qio(&["write -P 0x21 1M 2M", "discard 40M 512k"]);
    qimg(&["snapshot", "-c", "two", s(&img)]);
    let snap_raw = |name: &str| {
        let out = dir.path().join(format!("{name}.raw"));
        let l = format!("snapshot.name={name}");
        qimg(&["convert", "-l", &l, "-O", "raw", s(&img), s(&out)]);
        out
    };
    let (one, two) = (snap_raw("one"), snap_raw("two"));
    // vdk lists them as qemu-img describes them.
    let listed: serde_json::Value =
        serde_json::from_str(&vdk(&["snapshot", "--list", "--json", s(&img)])).unwrap();
    let info = qemu_json(&["info", "--output=json", s(&img)]);
    assert_eq!(listed, info["snapshots"], "{listed} vs {info}");
    let text = vdk(&["snapshot", "-l", s(&img)]);
    assert!(
        text.lines()
            .nth(2)
            .is_some_and(|l| l.starts_with("1 ") && l.contains("one")),
        "{text}"
    );
    assert!(
        text.lines()
            .nth(3)
            .is_some_and(|l| l.starts_with("2 ") && l.contains("two")),
        "{text}"
    );
    let reference = dir.path().join("ref.raw");
    qimg(&["convert", "-O", "raw", s(&img), s(&reference)]);
    let mut v = common::Vdk::serve_in(dir, &["s.qcow2"]);
    let uri = v.uri("s.qcow2");
    let mut rng = Rng(0x51a9_5407);
    let ops: Vec<String> = (0..48)
        .map(|i| {
            let off = rng.below(60 << 20) & !0xfff;
            mixed_op(i, off, (rng.below(200) + 1) << 12, 0x40)
        })
        .collect();
    same_writes(&ops, &uri, &v.path("ref.raw"));
    assert!(v.stop().success());
    assert!(
        v.log_has("L2 table shared with a snapshot: copied"),
        "{}",
        v.log()
    );
    let img = v.path("s.qcow2");
    qemu_check(s(&img));
    run(Command::new("qemu-img").args(["compare", s(&img), s(&v.path("ref.raw"))]));
    for (name, raw) in [("one", &one), ("two", &two)] {
        let l = format!("snapshot.name={name}");
        let out = v.path(&format!("{name}.after.raw"));
        run(Command::new("qemu-img").args(["convert", "-l", &l, "-O", "raw", s(&img), s(&out)]));
        run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", s(&out), s(raw)]));
    }
    // vdk check follows the snapshots: clean, as qemu-img found it.
    let (code, report) = vdk_check(&img, &[]);
    assert_eq!(code, Some(0), "{report}");
    // Applying a snapshot brings its data back, and the image stays consistent.
    run(Command::new("qemu-img").args(["snapshot", "-a", "one", s(&img)]));
    qemu_check(s(&img));
    qemu_same(s(&img), s(&one));
}

/// A dirty image with an internal snapshot (lazy refcounts, qemu-io aborted after writing over
/// the snapshot's clusters): vdk rebuilds the refcounts counting the snapshot's tables too, so
/// its writes take no cluster the snapshot still holds; image and snapshot compare equal to
/// their references and `qemu-img check` is clean.
#[test]
fn a_dirty_image_with_a_snapshot_is_repaired_counting_the_snapshot() {
    need("qemu-img");
    need("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    let o = "lazy_refcounts=on,cluster_size=65536";
    run(Command::new("qemu-img").args(["create", "-f", "qcow2", "-o", o, s(&img), "32M"]));
    run(Command::new("qemu-io").args(["-c", "write -P 0x31 0 4M", s(&img)]));
    run(Command::new("qemu-img").args(["snapshot", "-c", "base", s(&img)]));
    let base = dir.path().join("base.raw");
    qemu_raw(s(&img), s(&base));
    let _ = Command::new("qemu-io")
        .args([
            "-c",
            "write -P 0x32 1M 2M",
            "-c",
            "write -P 0x33 8M 1M",
            "-c",
            "abort",
        ])
        .arg(s(&img))
        .output()
        .unwrap();
    let info = qemu_json(&["info", "--output=json", s(&img)]);
    assert_eq!(info["dirty-flag"], true, "{info}");
    let reference = dir.path().join("ref.raw");
    qemu_raw(s(&img), s(&reference));
    let (mut v, uri) = serve_repaired(dir, "d.qcow2");
    let ops = [
        "write -P 0x41 0 6M",
        "discard 2M 1M",
        "write -z 8M 512k",
        "write -P 0x42 20M 1M",
    ];
    same_writes(&ops.map(String::from), &uri, &v.path("ref.raw"));
    assert!(v.stop().success());
    let img = v.path("d.qcow2");
    qemu_check(s(&img));
    run(Command::new("qemu-img").args(["compare", s(&img), s(&v.path("ref.raw"))]));
    let after = v.path("base.after.raw");
    let l = "snapshot.name=base";
    run(Command::new("qemu-img").args(["convert", "-l", l, "-O", "raw", s(&img), s(&after)]));
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", s(&after), s(&base)]));
}

/// `vdk snapshot -c/-a/-d/-l` on a qcow2 image, beside snapshots qemu-img made: after each
/// step `qemu-img check` finds no error and no leak, `qemu-img snapshot -l` lists what vdk
/// made, applying brings the data of the moment back (compared with a raw copy), deleting
/// frees what only the snapshot held; an image open in vdk and unknown or taken names are
/// refused with a message.
#[test]
fn vdk_snapshot_creates_applies_deletes_and_lists_internal_snapshots() {
    need("qemu-img");
    need("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("e.qcow2");
    let i = s(&img);
    let check = || qemu_check(i);
    let same = |raw: &Path| qemu_same(i, s(raw));
    let raw = |name: &str| {
        let p = dir.path().join(name);
        qemu_raw(i, s(&p));
        p
    };
    let qio = |cmds: &[&str]| {
        let mut c = Command::new("qemu-io");
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        run(c.arg(i));
    };
    run(Command::new("qemu-img").args([
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=65536",
        i,
        "32M",
    ]));
    qio(&[
        "write -P 0x11 0 3M",
        "write -c -P 0x12 10M 64k",
        "write -z 12M 1M",
    ]);
    run(Command::new("qemu-img").args(["snapshot", "-c", "theirs", i]));
    let at_first = raw("first.raw");
    assert!(vdk(&["snapshot", "-c", "mine", i]).contains("taken"));
    check();
    let listed = stdout(Command::new("qemu-img").args(["snapshot", "-l", i]));
    assert!(
        listed.contains("theirs") && listed.contains("mine"),
        "{listed}"
    );
    // Taken names and unknown snapshots are refused.
    let err = vdk_fails(&["snapshot", "-c", "mine", i]);
    assert!(err.contains("exists"), "{err}");
    let err = vdk_fails(&["snapshot", "-a", "nope", i]);
    assert!(err.contains("no snapshot named"), "{err}");
    // The image moves on; applying "mine" brings the first state back.
    qio(&[
        "write -P 0x21 1M 4M",
        "discard 10M 64k",
        "write -P 0x22 20M 1M",
    ]);
    let later = raw("later.raw");
    assert!(vdk(&["snapshot", "-c", "later", i]).contains("taken"));
    assert!(vdk(&["snapshot", "-a", "mine", i]).contains("applied"));
    check();
    same(&at_first);
    // Deleting snapshots (by name, by ID) keeps the image and the others intact.
    assert!(vdk(&["snapshot", "-d", "theirs", i]).contains("deleted"));
    check();
    same(&at_first);
    let after = dir.path().join("later.after.raw");
    let l = "snapshot.name=later";
    run(Command::new("qemu-img").args(["convert", "-l", l, "-O", "raw", i, s(&after)]));
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", s(&after), s(&later)]));
    let ids: serde_json::Value =
        serde_json::from_str(&vdk(&["snapshot", "--list", "--json", i])).unwrap();
    let mine = ids
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "mine")
        .unwrap();
    vdk(&["snapshot", "-d", mine["id"].as_str().unwrap(), i]);
    vdk(&["snapshot", "-a", "later", i]);
    vdk(&["snapshot", "-d", "later", i]);
    check();
    same(&later);
    assert_eq!(vdk(&["snapshot", "--list", "--json", i]).trim(), "[]");
    // An image served by vdk is not changed behind its back.
    let v = common::Vdk::serve_in(dir, &["e.qcow2"]);
    let err = vdk_fails(&["snapshot", "-c", "busy", s(&v.path("e.qcow2"))]);
    assert!(err.contains("cannot change the snapshots"), "{err}");
}

/// Applying a snapshot taken when the disk had another size brings that size back, as
/// `qemu-img snapshot -a` does: the disk grows (its L1 table too) or shrinks, reads as the
/// snapshot did, and `qemu-img check` finds it clean. The small size is not a whole number of
/// clusters, and the snapshot has data in its last one.
#[test]
fn a_snapshot_taken_at_another_size_is_applied_with_that_size() {
    need("qemu-img");
    need("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("r.qcow2");
    let i = s(&img);
    let small = (32u64 << 20) + 512;
    run(Command::new("qemu-img").args(["create", "-f", "qcow2", i, &small.to_string()]));
    let qio = |cmd: &str| run(Command::new("qemu-io").args(["-c", cmd, i]));
    qio("write -P 0x31 0 1M");
    qio(&format!("write -P 0x32 {} 512", small - 512));
    let raw = |name: &str| {
        let p = dir.path().join(name);
        qemu_raw(i, s(&p));
        p
    };
    let at_small = raw("small.raw");
    assert!(vdk(&["snapshot", "-c", "small", i]).contains("taken"));
    // Grown past what one L2 table maps (512 MiB), then written past the old end.
    run(Command::new("qemu-img").args(["resize", i, "1G"]));
    qio("write -P 0x33 900M 2M");
    qio("write -P 0x34 0 64k");
    let at_large = raw("large.raw");
    assert!(vdk(&["snapshot", "-c", "large", i]).contains("taken"));
    let size = || {
        qemu_json(&["info", "--output=json", i])["virtual-size"]
            .as_u64()
            .unwrap()
    };
    let same = |raw: &Path| qemu_same(i, s(raw));
    let check = || qemu_check(i);
    let said = vdk(&["snapshot", "-a", "small", i]);
    assert!(
        said.contains("at its size then (32.0 MiB, was 1 GiB)"),
        "{said}"
    );
    assert_eq!(size(), small);
    check();
    same(&at_small);
    assert!(vdk(&["snapshot", "-a", "large", i]).contains("applied"));
    assert_eq!(size(), 1 << 30);
    check();
    same(&at_large);
    // The small snapshot again, then both deleted: nothing leaks.
    assert!(vdk(&["snapshot", "-a", "small", i]).contains("applied"));
    vdk(&["snapshot", "-d", "large", i]);
    vdk(&["snapshot", "-d", "small", i]);
    check();
    same(&at_small);
}

/// Runs QEMU's monitor commands `cmds` on a machine with no devices but `img` as a drive (what
/// `savevm` and `loadvm` need); returns what the monitor printed.
fn qemu_monitor(img: &Path, cmds: &str) -> String {
    use std::io::Write;
    need("qemu-system-x86_64");
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "none",
            "-nographic",
            "-nodefaults",
            "-monitor",
            "stdio",
            "-drive",
        ])
        .arg(format!("file={},if=none,id=d0,format=qcow2", s(img)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = qemu.stdin.take().unwrap();
    stdin
        .write_all(format!("{cmds}\nquit\n").as_bytes())
        .unwrap();
    drop(stdin);
    let out = qemu.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// A snapshot QEMU saved with VM state (`savevm`): vdk applies it (the disk reads as it did,
/// the VM state stays loadable by `loadvm`), takes another beside it and deletes it, freeing
/// its VM state too (`qemu-img check` finds no leak).
#[test]
fn a_snapshot_with_vm_state_is_applied_and_deleted_keeping_qemu_able_to_load_it() {
    need("qemu-img");
    need("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.qcow2");
    let i = s(&img);
    run(Command::new("qemu-img").args(["create", "-f", "qcow2", i, "32M"]));
    run(Command::new("qemu-io").args(["-c", "write -P 0x41 0 1M", i]));
    let saved = qemu_monitor(&img, "savevm withstate");
    assert!(!saved.contains("Error"), "{saved}");
    let info = qemu_json(&["info", "--output=json", i]);
    assert!(
        info["snapshots"][0]["vm-state-size"].as_u64().unwrap() > 0,
        "{info}"
    );
    let then = dir.path().join("then.raw");
    qemu_raw(i, s(&then));
    run(Command::new("qemu-io").args(["-c", "write -P 0x42 0 64k", i]));
    assert!(vdk(&["snapshot", "-a", "withstate", i]).contains("applied"));
    qemu_check(i);
    qemu_same(i, s(&then));
    let loaded = qemu_monitor(&img, "loadvm withstate");
    assert!(!loaded.contains("Error"), "{loaded}");
    assert!(vdk(&["snapshot", "-c", "plain", i]).contains("taken"));
    assert!(vdk(&["snapshot", "-d", "withstate", i]).contains("deleted"));
    let check = stdout(Command::new("qemu-img").args(["check", "--output=json", i]));
    let check: serde_json::Value = serde_json::from_str(&check).unwrap();
    assert_eq!(check["leaks"].as_u64().unwrap_or(0), 0, "{check}");
    assert_eq!(check["corruptions"].as_u64().unwrap_or(0), 0, "{check}");
    qemu_same(i, s(&then));
}

/// `vdk snapshot -c` and `-d` killed with SIGKILL at random moments never corrupt the image:
/// `qemu-img check` finds at worst leaked clusters and COPIED flags not yet set again (both
/// data-safe, what QEMU's own order can leave, repaired by `qemu-img check -r all`), the image
/// reads the same, and every snapshot the table lists reads the same too.
#[test]
fn snapshot_edits_killed_at_random_moments_never_corrupt_the_image() {
    need("qemu-img");
    need("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("k.qcow2");
    let i = s(&img);
    let o = "cluster_size=65536";
    run(Command::new("qemu-img").args(["create", "-f", "qcow2", "-o", o, i, "256M"]));
    run(Command::new("qemu-io").args([
        "-c",
        "write -P 0x5a 0 128M",
        "-c",
        "write -P 0x5b 200M 8M",
        i,
    ]));
    let reference = dir.path().join("ref.raw");
    qemu_raw(i, s(&reference));
    let mut rng = Rng(0x0c0f_fee5);
    let (mut killed, mut torn, mut changed) = (0, 0, 0);
    let mut before = 0;
    for round in 0..30 {
        let listed: serde_json::Value =
            serde_json::from_str(&vdk(&["snapshot", "--list", "--json", i])).unwrap();
        let names: Vec<String> = listed
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_owned())
            .collect();
        if names.len() != before {
            changed += 1;
        }
        before = names.len();
        let args: Vec<String> = if names.len() < 3 || round % 2 == 0 {
            vec!["-c".into(), format!("s{round}")]
        } else {
            vec![
                "-d".into(),
                names[rng.below(names.len() as u64) as usize].clone(),
            ]
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_vdk"))
            .arg("snapshot")
            .args(&args)
            .arg(i)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(rng.below(60_000)));
        if child.try_wait().unwrap().is_none() {
            killed += 1;
        }
        let _ = child.kill();
        let _ = child.wait();
        let out = Command::new("qemu-img")
            .args(["check", i])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            matches!(out.status.code(), Some(0 | 2 | 3)),
            "round {round}: qemu-img check could not check the image: {text}"
        );
        if !out.status.success() {
            torn += 1; // leaks or flags left by a kill in the middle of the edit
        }
        for line in text.lines().filter(|l| l.starts_with("ERROR")) {
            assert!(
                line.contains("OFLAG_COPIED"),
                "round {round} ({args:?}): {text}"
            );
        }
        qemu_same(i, s(&reference));
        if round % 5 != 4 {
            continue; // the snapshots' data is compared every fifth round (it is slow)
        }
        let listed: serde_json::Value =
            serde_json::from_str(&vdk(&["snapshot", "--list", "--json", i])).unwrap();
        for snap in listed.as_array().unwrap() {
            let l = format!("snapshot.name={}", snap["name"].as_str().unwrap());
            let out = dir.path().join("snap.raw");
            run(Command::new("qemu-img").args(["convert", "-l", &l, "-O", "raw", i, s(&out)]));
            run(Command::new("qemu-img").args([
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                s(&out),
                s(&reference),
            ]));
        }
    }
    eprintln!("killed {killed} torn {torn} changed {changed}");
    assert!(
        changed > 0,
        "no edit ever finished: the delays are too short"
    );
    assert!(
        killed > 0,
        "only {killed} edits were interrupted: the test proves little"
    );
    // What the crashes left, repaired, leaves a clean image.
    let _ = Command::new("qemu-img")
        .args(["check", "-r", "all", i])
        .output()
        .unwrap();
    qemu_check(i);
}

/// Images with extended L2 entries (32 subclusters per cluster) made by qemu-img, alone and on
/// a backing file, written through vdk with random writes, zeroes and discards across cluster
/// and subcluster boundaries (partial subclusters take the rest from the backing file), compare
/// equal to raw copies that took the same writes; `qemu-img check` and `vdk check` find them
/// clean; a bitmap that marks a subcluster both allocated and zero is found by both checks.
/// Makes in `dir` a 16 MiB raw base.raw of varied bytes, and two extended-L2 images (64 KiB
/// clusters): top.qcow2 on base.raw and alone.qcow2, where qemu-io leaves subclusters of every
/// kind (allocated, zero, unallocated) in one cluster, then runs `more` qemu-io commands.
fn mixed_extended_l2_images(dir: &Path, more: &[&str]) {
    let p = |n: &str| dir.join(n);
    let data: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    fs::write(p("base.raw"), data).unwrap();
    for (img, backing) in [("top.qcow2", true), ("alone.qcow2", false)] {
        let mut c = Command::new("qemu-img");
        c.args([
            "create",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=65536",
        ]);
        c.arg(s(&p(img)));
        if backing {
            c.args(["-b", "base.raw", "-F", "raw"]);
        } else {
            c.arg("16M");
        }
        run(&mut c);
        let mut c = Command::new("qemu-io");
        let ops = [
            "write -P 0x11 4k 2k",
            "write -z 70k 4k",
            "write -P 0x12 1M 130k",
            "discard 1M 2k",
        ];
        for op in ops.iter().chain(more) {
            c.args(["-c", op]);
        }
        run(c.arg(s(&p(img))));
    }
}

#[test]
fn extended_l2_images_are_written_with_subclusters_as_qemu_reads_them() {
    need("qemu-img");
    need("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    mixed_extended_l2_images(dir.path(), &[]);
    for img in ["top.qcow2", "alone.qcow2"] {
        let (path, reference) = (dir.path().join(img), dir.path().join(format!("{img}.raw")));
        qemu_raw(s(&path), s(&reference));
    }
    let mut v = common::Vdk::serve_in(dir, &["top.qcow2", "alone.qcow2"]);
    let mut rng = Rng(0x5eb_c1a5);
    for img in ["top.qcow2", "alone.qcow2"] {
        let uri = v.uri(img);
        let ops = sector_ops(&mut rng, 15 << 20, 0x30);
        same_writes(&ops, &uri, &v.path(&format!("{img}.raw")));
    }
    // Whole subclusters inside a data cluster are zeroed by their zero bits (qemu-img map
    // sees a zero run of exactly them), the partial ones around them by zeroes written.
    let uri = v.uri("alone.qcow2");
    let reference = v.path("alone.qcow2.raw");
    let ops = [
        "write -P 0x77 4M 64k",
        "write -z 4202496 8192",
        "write -z 4243456 5000",
    ];
    same_writes(&ops.map(String::from), &uri, &reference);
    assert!(v.stop().success());
    let map =
        stdout(Command::new("qemu-img").args(["map", "--output=json", s(&v.path("alone.qcow2"))]));
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    assert!(
        map.as_array()
            .unwrap()
            .iter()
            .any(|r| r["start"] == 4_202_496 && r["length"] == 8192 && r["zero"] == true),
        "{map}"
    );
    for img in ["top.qcow2", "alone.qcow2"] {
        let path = v.path(img);
        qemu_check(s(&path));
        let reference = v.path(&format!("{img}.raw"));
        qemu_same(s(&path), s(&reference));
        let (code, report) = vdk_check(&path, &[]);
        assert_eq!(code, Some(0), "{img}: {report}");
    }
    // A bitmap with subcluster 0 both allocated and zero, in the first L2 table.
    let img = v.path("alone.qcow2");
    let raw = fs::read(&img).unwrap();
    let be64 = |at: usize| u64::from_be_bytes(raw[at..at + 8].try_into().unwrap());
    let l1 = be64(40) as usize;
    let l2 = (be64(l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let mut bad = raw.clone();
    bad[l2 + 8..l2 + 16].copy_from_slice(&((1u64 << 32) | 1).to_be_bytes());
    fs::write(&img, bad).unwrap();
    let (code, report) = vdk_check(&img, &[]);
    assert_eq!(code, Some(2), "{report}");
    assert_eq!(report["check-errors"], 1, "{report}");
    let text = Command::new(env!("CARGO_BIN_EXE_vdk"))
        .args(["check", s(&img)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("both allocated and zero"), "{text}");
    let q = Command::new("qemu-img")
        .args(["check", s(&img)])
        .status()
        .unwrap();
    assert!(!q.success(), "qemu-img check must find the same bitmap");
}

/// `vdk snapshot` on extended-L2 images, alone and on a backing file: a snapshot taken over
/// clusters of mixed subclusters keeps reading as it was while vdk writes the image at
/// 512-byte granularity (shared clusters copied, bitmaps kept), and applying and deleting it
/// leave images `qemu-img check` finds clean.
#[test]
fn extended_l2_images_take_apply_and_delete_internal_snapshots() {
    need("qemu-img");
    need("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    mixed_extended_l2_images(dir.path(), &["write -P 0x13 3M 1M"]);
    let raw_of = |img: &Path, snapshot: Option<&str>, to: &Path| {
        let mut c = Command::new("qemu-img");
        c.arg("convert");
        if let Some(name) = snapshot {
            c.args(["-l", &format!("snapshot.name={name}")]);
        }
        run(c.args(["-O", "raw", s(img), s(to)]));
    };
    for img in ["top.qcow2", "alone.qcow2"] {
        assert!(vdk(&["snapshot", "-c", "before", s(&p(img))]).contains("taken"));
        qemu_check(s(&p(img)));
        raw_of(&p(img), None, &p(&format!("{img}.before.raw")));
        fs::copy(p(&format!("{img}.before.raw")), p(&format!("{img}.raw"))).unwrap();
    }
    let mut v = common::Vdk::serve_in(dir, &["top.qcow2", "alone.qcow2"]);
    let mut rng = Rng(0x0e71_2ba5);
    for img in ["top.qcow2", "alone.qcow2"] {
        // Over what the snapshot shares: the first 4 MiB.
        let ops = sector_ops(&mut rng, 4 << 20, 0x40);
        same_writes(&ops, &v.uri(img), &v.path(&format!("{img}.raw")));
    }
    assert!(v.stop().success());
    let cmp = |a: &Path, b: &Path| {
        qemu_same(s(a), s(b));
    };
    for img in ["top.qcow2", "alone.qcow2"] {
        let (path, now, before) = (
            v.path(img),
            v.path(&format!("{img}.raw")),
            v.path(&format!("{img}.before.raw")),
        );
        let check = || {
            qemu_check(s(&path));
            let (code, report) = vdk_check(&path, &[]);
            assert_eq!(code, Some(0), "{img}: {report}");
        };
        check();
        cmp(&path, &now);
        let snap = v.path(&format!("{img}.snap.raw"));
        raw_of(&path, Some("before"), &snap);
        run(Command::new("qemu-img").args([
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            s(&snap),
            s(&before),
        ]));
        // A second snapshot of the written state, then back to the first, then both deleted.
        assert!(vdk(&["snapshot", "-c", "after", s(&path)]).contains("taken"));
        assert!(vdk(&["snapshot", "-a", "before", s(&path)]).contains("applied"));
        check();
        cmp(&path, &before);
        assert!(vdk(&["snapshot", "-d", "before", s(&path)]).contains("deleted"));
        check();
        assert!(vdk(&["snapshot", "-a", "after", s(&path)]).contains("applied"));
        assert!(vdk(&["snapshot", "-d", "after", s(&path)]).contains("deleted"));
        check();
        cmp(&path, &now);
        assert_eq!(
            vdk(&["snapshot", "--list", "--json", s(&path)]).trim(),
            "[]"
        );
    }
}

/// An extended-L2 image on a backing file under the cow filter: writes go to the overlay and
/// read back over the image's mixed subclusters as a raw copy that took them; the image itself
/// is left exactly as it was.
#[test]
fn an_extended_l2_image_under_the_cow_filter_is_only_read() {
    need("qemu-img");
    need("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let data: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(40_503) >> 7) as u8)
        .collect();
    fs::write(p("base.raw"), data).unwrap();
    let o = "extended_l2=on,cluster_size=65536";
    let img = s(&p("x.qcow2")).to_owned();
    run(Command::new("qemu-img").args([
        "create", "-f", "qcow2", "-o", o, "-b", "base.raw", "-F", "raw", &img,
    ]));
    run(Command::new("qemu-io").args([
        "-c",
        "write -P 0x11 4k 2k",
        "-c",
        "write -z 70k 4k",
        "-c",
        "write -P 0x12 1M 130k",
        &img,
    ]));
    qemu_raw(&img, s(&p("before.raw")));
    fs::copy(p("before.raw"), p("ref.raw")).unwrap();
    let mut v = common::Vdk::serve_in(dir, &["x.qcow2", "--filter", "cow"]);
    let uri = v.uri("x.qcow2");
    let ops = [
        "write -P 0x21 3000 5000",
        "write -z 60000 20000",
        "discard 131072 65536",
        "write -P 0x22 1040000 100",
    ];
    same_writes(&ops.map(String::from), &uri, &v.path("ref.raw"));
    assert!(v.stop().success());
    let img = v.path("x.qcow2");
    qemu_check(s(&img));
    qemu_same(s(&img), s(&v.path("before.raw")));
}

/// Serves the dirty image `name` in `dir`: vdk must say it rebuilt the refcounts.
fn serve_repaired(dir: tempfile::TempDir, name: &str) -> (common::Vdk, String) {
    let v = common::Vdk::serve_in(dir, &[name]);
    let uri = v.uri(name);
    assert!(
        v.log_has("its refcounts were rebuilt before writing"),
        "{}",
        v.log()
    );
    (v, uri)
}

/// Op `i` of a mixed random run: two writes of pattern `first + i`, a zero write, a discard.
fn mixed_op(i: u64, off: u64, len: u64, first: u64) -> String {
    match i % 4 {
        0 | 1 => format!("write -P {} {off} {len}", first + i),
        2 => format!("write -z {off} {len}"),
        _ => format!("discard {off} {len}"),
    }
}

/// 60 mixed ops (see [`mixed_op`]) at offsets and of lengths in 512-byte steps, in the first
/// `span` bytes: inside subclusters (2 KiB at 64 KiB clusters), across them, across clusters.
fn sector_ops(rng: &mut Rng, span: u64, first: u64) -> Vec<String> {
    (0..60)
        .map(|i| {
            let off = rng.below(span >> 9) << 9;
            let len = (rng.below(if i % 5 == 0 { 512 } else { 40 }) + 1) << 9;
            mixed_op(i, off, len, first)
        })
        .collect()
}

/// Runs qemu-io `ops` on the raw NBD disk at `uri` and on the raw file `reference`, then
/// compares the two.
fn same_writes(ops: &[String], uri: &str, reference: &Path) {
    for target in [uri, s(reference)] {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        for op in ops {
            c.args(["-c", op]);
        }
        run(c.arg(target));
    }
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", uri, s(reference)]));
}

/// A small xorshift, so a failing run can be reproduced.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn kill_9_at_random_moments_never_corrupts_a_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("crash.qcow2");
    vdk(&[
        "create",
        "-f",
        "qcow2",
        s(&img),
        "512M",
        "--cluster-size",
        "4K",
    ]);
    kill_9_loop(&dir, &img, &[], &img, 30, true);
}

#[test]
fn kill_9_at_random_moments_never_corrupts_a_vhdx() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("crash.vhdx");
    vdk(&["create", "-f", "vhdx", s(&img), "512M"]);
    kill_9_loop(&dir, &img, &[], &img, 30, false);
}

/// 50 kills of a cow disk: the overlay passes qemu-img check, flushed records read back
/// through base + overlay, and the base never changes.
#[test]
fn kill_9_at_random_moments_never_harms_a_cow_disk_or_its_base() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    {
        use std::os::unix::fs::FileExt;
        let f = fs::File::create(&base).unwrap();
        f.set_len(512 << 20).unwrap();
        f.write_all_at(&[0x5b; 1 << 20], 100 << 20).unwrap();
    }
    let before = fs::read(&base).unwrap();
    let overlay = dir.path().join("changes.qcow2");
    let spec = format!("cow:overlay={}", s(&overlay));
    kill_9_loop(&dir, &base, &["--filter", &spec], &overlay, 50, true);
    assert!(
        fs::read(&base).unwrap() == before,
        "the base is bit-identical after 50 kills"
    );
}

/// `rounds` rounds: serve `img` (with `serve_extra` arguments), write and flush records from
/// the workload, kill -9 vdk at a random moment; then qemu-img check of `checked` (no
/// corruption) and every record written before a completed flush must read back through it.
/// With `vdk_check_agrees`, vdk check must agree with qemu-img.
fn kill_9_loop(
    dir: &tempfile::TempDir,
    img: &Path,
    serve_extra: &[&str],
    checked: &Path,
    rounds: usize,
    vdk_check_agrees: bool,
) {
    need("qemu-img");
    need("nbdsh"); // python3-libnbd: the workload speaks NBD through it
    let state = dir.path().join("state");
    fs::write(&state, "").unwrap();
    let sock = dir.path().join("nbd.sock");
    let raw = dir.path().join("crash.raw");
    let workload = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/crash/workload.py");
    let slots = "32768";
    let mut rng = Rng(0x5eed);
    let mut first = 0u64;
    let mut progress = Vec::new();
    for round in 0..rounds {
        let _ = fs::remove_file(&sock);
        let mut server = Command::new(env!("CARGO_BIN_EXE_vdk"))
            .args(["serve", s(img), "--listen", &format!("unix://{}", s(&sock))])
            .args(serve_extra)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for(20, "vdk to listen", || sock.exists());
        let mut writer = Command::new("/usr/bin/python3")
            .arg(&workload)
            .args([
                "write",
                &format!("nbd+unix:///?socket={}", s(&sock)),
                s(&state),
                &first.to_string(),
                "1000",
                slots,
            ])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(20 + rng.below(250)));
        server.kill().unwrap();
        server.wait().unwrap();
        let _ = writer.kill();
        writer.wait().unwrap();
        let check = Command::new("qemu-img")
            .args(["check", "--output=json", s(checked)])
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&check.stdout).into_owned();
        // Exit 0: clean; 3: leaked clusters only, which a crash may leave. 2: corruption.
        assert!(
            matches!(check.status.code(), Some(0 | 3)) && !report.contains("\"corruptions\""),
            "round {round}: qemu-img check after kill -9:\n{report}{}",
            String::from_utf8_lossy(&check.stderr)
        );
        if vdk_check_agrees {
            // vdk check sees what qemu-img check sees.
            let q: serde_json::Value = serde_json::from_str(&report).unwrap();
            let (code, v) = vdk_check(checked, &[]);
            assert_eq!(
                code,
                check.status.code(),
                "round {round}: vdk check {v} vs qemu-img {q}"
            );
            assert_eq!(
                v["leaks"].as_u64().unwrap_or(0),
                q["leaks"].as_u64().unwrap_or(0),
                "round {round}"
            );
        }
        let _ = fs::remove_file(&raw);
        qemu_raw(s(checked), s(&raw));
        let verified = stdout(Command::new("/usr/bin/python3").arg(&workload).args([
            "verify",
            s(&raw),
            s(&state),
            slots,
        ]));
        first = verified.trim().parse().unwrap();
        progress.push(first);
    }
    eprintln!("durable records after each kill: {progress:?}");
    assert!(
        progress.windows(2).filter(|w| w[1] > w[0]).count() >= 15,
        "too few rounds wrote anything before the kill: {progress:?}"
    );
    if vdk_check_agrees {
        // Leaks left by the crashes are only leaks: qemu-img repairs them.
        run(Command::new("qemu-img").args(["check", "-r", "leaks", s(checked)]));
        qemu_check(s(checked));
    }
}

#[test]
fn convert_round_trips_and_keeps_holes() {
    need("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("a.raw");
    {
        use std::os::unix::fs::FileExt;
        let f = fs::File::create(&raw).unwrap();
        f.set_len(256 << 20).unwrap();
        for i in 0..40u64 {
            let data: Vec<u8> = (0..100_000u32).map(|j| (j as u64 * 31 + i) as u8).collect();
            f.write_all_at(&data, i * 6_000_000 + i * 777).unwrap();
        }
    }
    let q = dir.path().join("a.qcow2");
    let back = dir.path().join("b.raw");
    vdk(&[
        "convert",
        "-O",
        "qcow2",
        "--cluster-size",
        "4K",
        s(&raw),
        s(&q),
    ]);
    qemu_check(s(&q));
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "qcow2", s(&raw), s(&q)]));
    vdk(&["convert", s(&q), s(&back)]);
    assert!(
        fs::read(&raw).unwrap() == fs::read(&back).unwrap(),
        "raw -> qcow2 -> raw is byte-identical"
    );
    for img in [&q, &back] {
        let used = std::os::unix::fs::MetadataExt::blocks(&fs::metadata(img).unwrap()) * 512;
        assert!(
            used < 16 << 20,
            "{} uses {used} bytes for 4 MB of data",
            img.display()
        );
    }
    // A chain is flattened; the output must be new.
    let top = dir.path().join("top.qcow2");
    vdk(&["create", s(&top), "--backing", "a.qcow2"]);
    run(Command::new("qemu-io").args(["-c", "write -P 0x99 1M 1M", s(&top)]));
    let flat = dir.path().join("flat.qcow2");
    vdk(&["convert", "-O", "qcow2", s(&top), s(&flat)]);
    run(Command::new("qemu-img").args(["compare", s(&top), s(&flat)]));
    let v: serde_json::Value = serde_json::from_str(&vdk(&["info", "--json", s(&flat)])).unwrap();
    assert!(v["backing-filename"].is_null());
    let out = Command::new(env!("CARGO_BIN_EXE_vdk"))
        .args(["convert", s(&top), s(&flat)])
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("exists"));
}

fn vdk_check(img: &Path, extra: &[&str]) -> (Option<i32>, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_vdk"))
        .args(["check", "--json"])
        .args(extra)
        .arg(img)
        .output()
        .unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "vdk check --json: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), v)
}

#[test]
fn check_finds_and_repairs_what_qemu_img_finds() {
    use std::os::unix::fs::FileExt;
    need("qemu-img");
    need("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("k.qcow2");
    run(Command::new("qemu-img").args(["create", "-f", "qcow2", s(&img), "64M"]));
    run(Command::new("qemu-io").args(["-c", "write -P 7 0 1M", s(&img)]));
    assert_eq!(vdk_check(&img, &[]).0, Some(0));
    // Damage refcounts by hand: header says where the refcount table is; its first block
    // counts the first clusters, 16 bits each.
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let mut b8 = [0u8; 8];
    f.read_exact_at(&mut b8, 48).unwrap();
    let rt = u64::from_be_bytes(b8);
    f.read_exact_at(&mut b8, rt).unwrap();
    let rb = u64::from_be_bytes(b8);
    let clusters = f.metadata().unwrap().len() / 65536;
    // A leak: a cluster inside the file that nothing references, with a refcount.
    f.set_len((clusters + 2) * 65536).unwrap();
    f.write_all_at(&3u16.to_be_bytes(), rb + 2 * (clusters + 1))
        .unwrap();
    let (code, v) = vdk_check(&img, &[]);
    assert_eq!(code, Some(3), "{v}");
    assert_eq!(v["leaks"], 1);
    let q = Command::new("qemu-img")
        .args(["check", s(&img)])
        .status()
        .unwrap();
    assert_eq!(q.code(), Some(3), "qemu-img agrees: one leak");
    f.write_all_at(&0u16.to_be_bytes(), rb + 2 * (clusters - 1))
        .unwrap(); // a corruption
    let (code, v) = vdk_check(&img, &[]);
    assert_eq!(code, Some(2), "{v}");
    assert_eq!(v["corruptions"], 1);
    let (code, v) = vdk_check(&img, &["--repair"]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(
        (v["leaks-fixed"].as_u64(), v["corruptions-fixed"].as_u64()),
        (Some(1), Some(1))
    );
    qemu_check(s(&img));
    run(Command::new("qemu-io").args(["-c", "read -P 7 0 1M", s(&img)]));
}

/// raw -> qcow2 -> vhdx -> vhd -> raw through vdk convert is byte-identical. The size is one a VHD
/// holds exactly (whole CHS cylinders of 16 heads x 63 sectors), as VHD sizes are geometry.
#[test]
fn round_trip_through_every_writable_format() {
    need("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 520 * 16 * 63 * 512;
    let raw = dir.path().join("in.raw");
    {
        use std::os::unix::fs::FileExt;
        let f = fs::File::create(&raw).unwrap();
        f.set_len(size).unwrap();
        for i in 0..30u64 {
            let data: Vec<u8> = (0..70_000u32)
                .map(|j| (j as u64 ^ (i * 131)) as u8)
                .collect();
            f.write_all_at(&data, i * 8_900_000 + i * 4099).unwrap();
        }
    }
    let q = dir.path().join("a.qcow2");
    let x = dir.path().join("b.vhdx");
    let h = dir.path().join("c.vhd");
    let out = dir.path().join("out.raw");
    vdk(&["convert", "-O", "qcow2", s(&raw), s(&q)]);
    vdk(&["convert", "-O", "vhdx", s(&q), s(&x)]);
    vdk(&["convert", "-O", "vhd", s(&x), s(&h)]);
    vdk(&["convert", s(&h), s(&out)]);
    assert!(
        fs::read(&raw).unwrap() == fs::read(&out).unwrap(),
        "raw -> qcow2 -> vhdx -> vhd -> raw"
    );
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "vpc", s(&raw), s(&h)]));
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "vhdx", s(&raw), s(&x)]));
    qemu_check(s(&x));
    for img in [&q, &x, &h] {
        assert!(
            vdk(&["check", s(img)]).contains("No errors"),
            "{}",
            img.display()
        );
    }
}

#[test]
fn a_backing_file_without_a_recorded_format_is_probed_only_on_request() {
    need("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    vdk(&["create", s(&base), "8M"]);
    let top = dir.path().join("top.qcow2");
    // An overlay that does not record its backing format: qemu-img refuses to make one, so
    // vdk makes a normal one and the backing-format header extension is renamed to an
    // unknown type, which readers skip.
    vdk(&["create", s(&top), "--backing", "base.qcow2"]);
    let mut bytes = fs::read(&top).unwrap();
    let at = bytes
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .expect("extension");
    bytes[at..at + 4].copy_from_slice(&[0x12, 0x34, 0x56, 0x78]);
    fs::write(&top, &bytes).unwrap();
    let dest = dir.path().join("out.raw");
    let out = Command::new(env!("CARGO_BIN_EXE_vdk"))
        .args(["convert", s(&top), s(&dest)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not recorded"),
        "{err}"
    );
    vdk(&["convert", "--probe-backing", s(&top), s(&dest)]);
    assert_eq!(fs::metadata(&dest).unwrap().len(), 8 << 20);
}

#[test]
fn resize_grows_the_l1_table_and_keeps_the_data() {
    need("qemu-img");
    need("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("r.qcow2");
    // 512-byte clusters: 64 L2 entries a table, so 64 MiB needs 2048 L1 entries (16 KiB) and
    // 1 GiB needs 32768 (256 KiB): the table must move.
    vdk(&["create", s(&img), "64M", "--cluster-size", "512"]);
    run(Command::new("qemu-io").args([
        "-c",
        "write -P 0x21 0 1M",
        "-c",
        "write -P 0x22 63M 1M",
        s(&img),
    ]));
    let before = qemu_json(&["info", "--output=json", s(&img)]);
    vdk(&["resize", s(&img), "1G"]);
    qemu_check(s(&img));
    let after = qemu_json(&["info", "--output=json", s(&img)]);
    assert_eq!(after["virtual-size"], 1u64 << 30);
    assert_eq!(before["virtual-size"], 64u64 << 20);
    run(Command::new("qemu-io").args([
        "-c",
        "read -P 0x21 0 1M",
        "-c",
        "read -P 0x22 63M 1M",
        "-c",
        "read -P 0 64M 1M",
        s(&img),
    ]));
    // Written past the old end through vdk, read by qemu.
    let mut v = common::Vdk::serve_in(dir, &["r.qcow2"]);
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x23 900M 2M",
        &v.uri("r.qcow2"),
    ]));
    assert!(v.stop().success());
    let img = v.path("r.qcow2");
    qemu_check(s(&img));
    run(Command::new("qemu-io").args([
        "-c",
        "read -P 0x23 900M 2M",
        "-c",
        "read -P 0x21 0 1M",
        s(&img),
    ]));
    vdk(&["resize", s(&img), "+1G"]);
    assert_eq!(
        qemu_json(&["info", "--output=json", s(&img)])["virtual-size"],
        2u64 << 30
    );
    qemu_check(s(&img));
    let out = Command::new(env!("CARGO_BIN_EXE_vdk"))
        .args(["resize", s(&img), "1G"])
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("shrink"));
}

/// A commit killed at random points and run again ends with base = base + overlay, as the
/// overlay read before any commit.
#[test]
fn commit_interrupted_by_kill_9_finishes_when_run_again() {
    need("qemu-img");
    need("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    {
        use std::os::unix::fs::FileExt;
        let f = fs::File::create(&base).unwrap();
        f.set_len(320 << 20).unwrap();
        f.write_all_at(&vec![0x42; 8 << 20], 10 << 20).unwrap();
    }
    let overlay = dir.path().join("o.qcow2");
    vdk(&["create", s(&overlay), "-b", "base.img", "-F", "raw"]);
    run(Command::new("qemu-io").args([
        "-c",
        "write -P 0x61 0 140M",
        "-c",
        "write -z 12M 2M",
        "-c",
        "write -P 0x62 160M 120M",
        s(&overlay),
    ]));
    let expected = dir.path().join("expected.raw");
    qemu_raw(s(&overlay), s(&expected));
    let mut rng = Rng(42);
    let mut interrupted = 0;
    for _ in 0..8 {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vdk"))
            .args(["commit", s(&overlay)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(2 + rng.below(60)));
        let _ = c.kill();
        if c.wait().unwrap().code().is_none() {
            interrupted += 1;
        }
        // The overlay stays readable by qemu whatever moment the kill hit.
        qemu_check(s(&overlay));
    }
    assert!(
        interrupted >= 3,
        "only {interrupted} of 8 kills landed during a commit"
    );
    vdk(&["commit", s(&overlay)]);
    assert!(
        fs::read(&base).unwrap() == fs::read(&expected).unwrap(),
        "base = base + overlay"
    );
    let out = vdk(&["commit", s(&overlay)]);
    assert!(out.contains("0 B of data"), "nothing left to commit: {out}");
}
