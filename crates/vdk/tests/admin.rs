//! vdk as a careful storage admin expects a tool to be: no command erases or hides data
//! unless told to (`--force`), none hangs or panics when its output goes away, a daemon that
//! died leaves nothing stale behind, the README's flows work the first time, and the
//! conventions of qemu-img, losetup and systemd hold. Each test drives the real binary.
#![allow(clippy::cast_possible_truncation)] // test sizes are small

mod common;

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{is_mounted, need, need_root, path_env, run, sparse_file, stdout, wait_for, Daemon};

use common::admin::*;

// ---- Data safety ----

#[test]
fn discard_refuses_an_image_that_records_no_base() {
    let d = Daemon::new();
    let img = d.path("disk.qcow2");
    d.ok(&["create", s(&img), "8M"]);
    qemu_io("qcow2", s(&img), &["write -P 0x5a 0 1M"]);
    let err = d.fails(&["discard", s(&img)]);
    assert!(err.contains("records no base image"), "{err}");
    qemu_io("qcow2", s(&img), &["read -P 0x5a 0 1M"]);
}

#[test]
fn live_overlay_changes_refuse_while_a_file_system_is_mounted() {
    need_root();
    need("mkfs.ext4");
    need("fsck.ext4");
    let d = Daemon::new();
    let base = d.path("base.img");
    sparse_file(&base, 64 * MIB);
    let ov = d.path("ov.qcow2");
    let mnt = d.path("mnt");
    let v = d.open(&[
        s(&base),
        "--filter",
        &format!("cow:overlay={}", s(&ov)),
        "--mkfs",
        "ext4",
        "--mount",
        s(&mnt),
    ]);
    let id = v["id"].as_str().unwrap().to_owned();
    let dev = v["block_device"].as_str().unwrap().to_owned();
    fs::write(mnt.join("kept.txt"), "still here").unwrap();
    let new = d.path("new.qcow2");
    for args in [
        vec!["discard", s(&ov)],
        vec!["commit", s(&ov)],
        vec!["snapshot", s(&ov), s(&new)],
    ] {
        let err = d.fails(&args);
        assert!(
            err.contains(&format!("mounted on {}", s(&mnt))) && err.contains("--force"),
            "{args:?}: {err}"
        );
    }
    assert!(!new.exists(), "a refused snapshot makes no file");
    assert_eq!(
        fs::read_to_string(mnt.join("kept.txt")).unwrap(),
        "still here"
    );
    // Mounted by someone else, not by vdk: still refused, naming the device and the place.
    d.ok(&["unmount", &id]);
    let other = d.path("other");
    fs::create_dir_all(&other).unwrap();
    run(Command::new("mount").args([&dev, s(&other)]));
    let err = d.fails(&["discard", s(&ov)]);
    assert!(
        err.contains(&format!("{dev} mounted on {}", s(&other))),
        "{err}"
    );
    run(Command::new("umount").arg(&other));
    run(Command::new("fsck.ext4").args(["-n", "-f", &dev]));
    // Nothing mounted: the discard goes ahead.
    d.ok(&["discard", s(&ov)]);
    d.ok(&["close", &id]);
}

#[test]
fn open_creates_the_format_its_name_says() {
    let d = Daemon::new();
    for (name, qemu) in [
        ("a.qcow2", "qcow2"),
        ("b.vhdx", "vhdx"),
        ("c.vhd", "vpc"),
        ("d.img", "raw"),
    ] {
        let p = d.path(name);
        d.open(&[s(&p), "16M", "--attach", "none"]);
        let q = qemu_json(&["info", "-U", "--output=json", s(&p)]);
        assert_eq!(q["format"], qemu, "{name}: {q}");
    }
    // `vdk create` too; qcow2 only where the name says nothing.
    for (name, qemu) in [
        ("e.raw", "raw"),
        ("f.img", "raw"),
        ("g.vhdx", "vhdx"),
        ("h", "qcow2"),
    ] {
        let p = d.path(name);
        d.ok(&["create", s(&p), "16M"]);
        let q = qemu_json(&["info", "--output=json", s(&p)]);
        assert_eq!(q["format"], qemu, "{name}: {q}");
    }
}

#[test]
fn a_file_named_as_an_image_that_holds_none_is_not_written() {
    let d = Daemon::new();
    let fake = d.path("fake.qcow2");
    fs::write(&fake, vec![7u8; 4 * MIB as usize]).unwrap();
    let err = d.fails(&["open", s(&fake), "--attach", "none"]);
    assert!(
        err.contains("named as a qcow2 image but holds no image header")
            && err.contains("--format raw"),
        "{err}"
    );
    let err = one_line_error(&mut vdk(&["serve", s(&fake)]));
    assert!(err.contains("named as a qcow2 image"), "{err}");
    // Said what it is, it is served.
    let v = d.open(&[s(&fake), "--format", "raw", "--attach", "none"]);
    d.ok(&["close", v["id"].as_str().unwrap()]);
    // check says what the file is, and does not call it consistent.
    let out = vdk(&["check", s(&fake)]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("not a qcow2 image") && text.contains("no image header"),
        "{text}"
    );
    assert!(
        fs::read(&fake).unwrap().iter().all(|b| *b == 7),
        "untouched"
    );
}

#[test]
fn failed_commands_leave_nothing_behind() {
    need_root();
    let d = Daemon::new();
    let big = d.path("big.img");
    let err = d.fails(&["open", s(&big), "1P", "--attach", "none"]);
    assert!(err.contains("1 PiB"), "{err}");
    assert!(!big.exists(), "a 0-byte image was left");
    let err = d.fails(&["open", s(&d.path("typo.img")), "--no-create"]);
    assert!(err.contains("does not exist"), "{err}");
    assert!(!d.path("typo.img").exists());
    // Mount points made for mounts that failed go again.
    let raw = d.path("raw.img");
    sparse_file(&raw, 4 * MIB);
    let dir = d.path("x/y/z");
    let err = d.fails(&["fs", "mount", s(&raw), s(&dir)]);
    assert!(err.contains("ISO"), "{err}");
    assert!(!d.path("x").exists(), "fs mount left its directories");
    let dir = d.path("p/q");
    d.fails(&["fs", "map", "file:///nonexistent/vdk-test-bucket", s(&dir)]);
    assert!(!d.path("p").exists(), "fs map left its directories");
    let blank = d.path("blank.qcow2");
    d.ok(&["create", s(&blank), "16M"]);
    d.fails(&["open", s(&blank), "--mount", s(&d.path("m/n"))]);
    assert!(!d.path("m").exists(), "open --mount left its directories");
}

// ---- No hangs, no panics ----

#[test]
fn commands_end_quietly_when_their_output_is_closed() {
    let d = Daemon::new();
    let img = d.path("disk.qcow2");
    qemu_qcow2(&img, "16M");
    let open = d.path("open.img");
    let v = d.open(&[s(&open), "8M", "--attach", "none", "--filter", "stats"]);
    let id = v["id"].as_str().unwrap().to_owned();
    for args in [
        vec!["list"],
        vec!["list", "--json"],
        vec!["fs", "list"],
        vec!["stats", &id],
        vec!["info", s(&img)],
        vec!["info", "--output=json", s(&img)],
        vec!["check", s(&img)],
        vec!["compare", s(&img), s(&img)],
        vec!["completions", "bash"],
        vec!["man"],
    ] {
        let out = d
            .cmd(&args)
            .stdout(closed_pipe())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            matches!(out.status.code(), Some(0 | 141)),
            "{args:?}: {} {err}",
            out.status
        );
        assert!(err.is_empty(), "{args:?} said: {err}");
    }
}

#[test]
fn serve_keeps_serving_with_its_log_closed_and_stops_at_once() {
    need("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let (mut child, uri) = serve_on(
        dir.path(),
        "memory",
        vdk(&["serve", "--memory", "8M"])
            // Every request logs at debug: each of those lines meets the closed pipe.
            .env("RUST_LOG", "debug")
            .stdout(closed_pipe())
            .stderr(closed_pipe()),
    );
    for _ in 0..3 {
        let size = stdout(Command::new("nbdinfo").args(["--size", &uri]));
        assert_eq!(size.trim(), "8388608");
    }
    qemu_io("raw", &uri, &["write -P 0x33 0 1M", "read -P 0x33 0 1M"]);
    run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    // It takes about 50 ms; a hang on its log is what this catches.
    let status = exit_within(&mut child, 3).expect("no exit after SIGTERM");
    assert!(status.success(), "{status}");
}

#[test]
fn serve_never_waits_for_a_log_nobody_reads() {
    need("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    // Its stderr is a pipe this test never reads: it is full after 64 KiB of log.
    let (_server, uri) = serve_on(
        dir.path(),
        "memory",
        vdk(&["serve", "--memory", "8M"])
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let sock = dir.path().join("nbd.sock");
    // Every connection is logged: thousands of them say far more than the pipe holds.
    for _ in 0..3000 {
        drop(UnixStream::connect(&sock).unwrap());
    }
    // A server that waits for its log never answers: this fails instead of hanging.
    let mut client = Guard(Some(
        Command::new("nbdinfo")
            .args(["--size", &uri])
            .env("PATH", path_env())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    exit_within(&mut client, 30).expect("the server waits for its log");
    let out = client.take().wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "8388608");
}

#[test]
fn a_new_daemon_detaches_what_a_killed_one_left_mounted() {
    need_root();
    need("mkfs.ext4");
    let d = Daemon::new();
    let img = d.path("disk.img");
    let mnt = d.path("mnt");
    d.open(&[s(&img), "64M", "--mkfs", "ext4", "--mount", s(&mnt)]);
    fs::write(mnt.join("file"), "written before the crash").unwrap();
    run(Command::new("sync").arg("-f").arg(mnt.join("file")));
    let iso = iso_with_hello(d.dir.path());
    let (browse1, browse2) = (d.path("browse1"), d.path("browse2"));
    d.ok(&["fs", "mount", s(&iso), s(&browse1)]);
    d.ok(&["fs", "mount", s(&iso), s(&browse2)]);
    let pid = d.pid();
    run(Command::new("kill").args(["-KILL", &pid.to_string()]));
    wait_for(10, "the daemon to die", || {
        !Path::new(&format!("/proc/{pid}")).exists()
    });
    assert!(is_mounted(&mnt) && is_mounted(&browse1), "left mounted");
    // With no daemon, `fs unmount` takes a dead mount away.
    let out = d.ok(&["fs", "unmount", s(&browse1)]);
    assert!(out.contains("stale"), "{out}");
    assert!(!is_mounted(&browse1));
    // A new daemon (started by this open) detaches the rest, says so, and mounts the disk
    // where it was, not on top of the dead mount.
    let out = d
        .cmd(&["open", s(&img), "--mount", s(&mnt)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("detached") && err.contains("died"), "{err}");
    assert!(!is_mounted(&browse2), "the ISO browser of the dead daemon");
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let on_mnt = mounts
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(s(&mnt)))
        .count();
    assert_eq!(on_mnt, 1, "mounted on top of a dead mount:\n{mounts}");
    assert_eq!(
        fs::read_to_string(mnt.join("file")).unwrap(),
        "written before the crash"
    );
}

// ---- The README's flows ----

#[test]
fn mkfs_formats_new_and_blank_disks_and_erases_data_only_when_forced() {
    need_root();
    need("mkfs.ext4");
    let d = Daemon::new();
    let q = d.path("d.qcow2");
    let mnt = d.path("mnt");
    // vdk create, then open --mkfs --mount: the README's flow, on a blank disk.
    d.ok(&["create", s(&q), "64M"]);
    let v = d.open(&[s(&q), "--mkfs", "ext4", "--mount", s(&mnt)]);
    fs::write(mnt.join("keep"), "data").unwrap();
    d.ok(&["close", v["id"].as_str().unwrap()]);
    let err = d.fails(&["open", s(&q), "--mkfs", "ext4", "--mount", s(&mnt)]);
    assert!(
        err.contains("holds a file system (ext4)")
            && err.contains(&format!(
                "vdk open {} --mkfs ext4 --force --mount {}",
                s(&q),
                s(&mnt)
            )),
        "{err}"
    );
    let v = d.open(&[s(&q), "--mount", s(&mnt)]);
    assert_eq!(fs::read_to_string(mnt.join("keep")).unwrap(), "data");
    d.ok(&["close", v["id"].as_str().unwrap()]);
    let v = d.open(&[s(&q), "--mkfs", "ext4", "--force", "--mount", s(&mnt)]);
    assert!(!mnt.join("keep").exists(), "--force formats");
    d.ok(&["close", v["id"].as_str().unwrap()]);
    // Data that is no file system: refused too, on open and on mount.
    let raw = d.path("r.img");
    d.ok(&["create", "-f", "raw", s(&raw), "16M"]);
    qemu_io("raw", s(&raw), &["write -P 9 1M 4k"]);
    let err = d.fails(&["open", s(&raw), "--mkfs", "ext4"]);
    assert!(err.contains("holds data (from byte 1048576)"), "{err}");
    let v = d.open(&[s(&raw)]);
    let err = d.fails(&[
        "mount",
        v["id"].as_str().unwrap(),
        s(&mnt),
        "--mkfs",
        "ext4",
    ]);
    assert!(err.contains("--force"), "{err}");
    qemu_io("raw", s(&raw), &["read -P 9 1M 4k"]);
}

#[test]
fn mounting_a_blank_disk_says_how_to_format_it() {
    need_root();
    need("mkfs.ext4");
    let d = Daemon::new();
    let q = d.path("b.qcow2");
    let mnt = d.path("mnt");
    d.ok(&["create", s(&q), "32M"]);
    let err = d.fails(&["open", s(&q), "--mount", s(&mnt)]);
    assert!(err.contains("blank"), "{err}");
    // The command it names works as given.
    let cmd = err.split('`').nth(1).expect("a command in backquotes");
    let words: Vec<&str> = cmd.split_whitespace().collect();
    assert_eq!(words[..2], ["vdk", "open"], "{cmd}");
    let out = d.json(&words[1..]);
    assert_eq!(out["mount"], s(&mnt));
}

#[test]
fn an_iso_opened_with_mount_shows_its_files() {
    need_root();
    let d = Daemon::new();
    let iso = iso_with_hello(d.dir.path());
    let mnt = d.path("disc");
    let v = d.open(&[s(&iso), "--mount", s(&mnt)]);
    assert_eq!(
        fs::read_to_string(mnt.join("hello.txt")).unwrap(),
        "hello from the disc\n"
    );
    assert_eq!(v["mount"], s(&mnt));
    d.ok(&["close", v["id"].as_str().unwrap()]);
    assert!(!is_mounted(&mnt));
}

#[test]
fn lock_errors_name_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    qemu_qcow2(&img, "16M");
    let server = common::Vdk::serve_in(dir, &[s(&img)]);
    let err = one_line_error(&mut vdk(&["resize", s(&img), "+1M"]));
    assert!(
        err.contains(&format!("pid {} (vdk serve)", server.pid())),
        "{err}"
    );
    let err = one_line_error(&mut vdk(&["info", s(&img)]));
    assert!(err.contains("(vdk serve)") && err.contains("-U"), "{err}");
    let out = stdout(&mut vdk(&["info", "-U", s(&img)]));
    assert!(out.contains("file format: qcow2"), "{out}");
    // Held by a daemon's disk: the disk is named.
    let d = Daemon::new();
    let other = d.path("other.qcow2");
    qemu_qcow2(&other, "16M");
    let v = d.open(&[s(&other), "--attach", "none"]);
    let id = v["id"].as_str().unwrap();
    let err = one_line_error(&mut d.cmd(&["info", s(&other)]));
    assert!(err.contains(&format!("open as vdk disk {id}")), "{err}");
}

#[test]
fn a_busy_mount_names_who_holds_it_but_never_the_command_asking() {
    need_root();
    need("mkfs.ext4");
    let d = Daemon::new();
    let mnt = d.path("mnt");
    let v = d.open(&[
        s(&d.path("d.img")),
        "32M",
        "--mkfs",
        "ext4",
        "--mount",
        s(&mnt),
    ]);
    let id = v["id"].as_str().unwrap().to_owned();
    let out = d.cmd(&["close", &id]).current_dir(&mnt).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "closed from inside its own mount");
    assert!(!err.contains("vdk close") && !err.contains("(vdk"), "{err}");
    assert!(err.contains("working directory"), "{err}");
    let mut sleeper = Command::new("sleep")
        .arg("60")
        .current_dir(&mnt)
        .spawn()
        .unwrap();
    let err = d.fails(&["close", &id]);
    assert!(
        err.contains(&format!("pid {} (sleep)", sleeper.id())),
        "{err}"
    );
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    d.ok(&["close", &id]);
}

#[test]
fn errors_say_each_thing_once() {
    let d = Daemon::new();
    let dir = d.dir.path();
    let missing = dir.join("missing.img");
    let small = dir.join("small.img");
    sparse_file(&small, 8 * MIB);
    let q = dir.join("exists.qcow2");
    qemu_qcow2(&q, "8M");
    qemu_io("qcow2", s(&q), &["write 6M 64k"]);
    for (args, want) in [
        (vec!["info", s(&missing)], "No such file"),
        (vec!["check", s(&missing)], "No such file"),
        (vec!["convert", s(&missing), "out.img"], "No such file"),
        (vec!["create", s(&q), "1M"], "exists"),
        (vec!["resize", s(&small), "4M"], "--shrink"),
        (vec!["resize", s(&q), "4M", "--shrink"], "allocated"),
        (vec!["resize", s(&small), "12Q"], "12Q"),
        (vec!["serve", s(&missing)], "vdk create"),
        (
            vec!["open", s(&missing), "1000", "--attach", "none"],
            "1000",
        ),
        (vec!["open", s(&missing), "--no-create"], "does not exist"),
    ] {
        let err = one_line_error(d.cmd(&args).current_dir(dir));
        assert!(err.contains(want), "{args:?}: {err}");
        for path in [&missing, &small, &q] {
            assert!(
                err.matches(s(path)).count() <= 1,
                "{args:?} names {} twice: {err}",
                s(path)
            );
        }
    }
    assert!(!missing.exists());
}
