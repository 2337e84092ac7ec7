//! vdk as a careful storage admin expects a tool to be: no command erases or hides data
//! unless told to (`--force`), none hangs or panics when its output goes away, a daemon that
//! died leaves nothing stale behind, the README's flows work the first time, and the
//! conventions of qemu-img, losetup and systemd hold. Each test drives the real binary.
#![allow(clippy::cast_possible_truncation)] // test sizes are small

mod common;

use std::fs;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{is_mounted, need, need_root, path_env, run, sparse_file, stdout, wait_for, Daemon};

const MIB: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `vdk ARGS` with no daemon of its own (commands that need none).
fn vdk(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vdk"));
    c.args(args).env("PATH", path_env()).env_remove("RUST_LOG");
    c
}

/// Standard error of a command that must fail, which must be one "vdk: ..." line.
fn one_line_error(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run vdk");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{cmd:?} should have failed");
    assert!(err.starts_with("vdk: "), "{cmd:?}: {err:?}");
    assert_eq!(
        err.lines().count(),
        1,
        "{cmd:?}: more than one line: {err:?}"
    );
    assert!(!err.contains("os error"), "{cmd:?}: {err:?}");
    assert!(!err.contains("panicked"), "{cmd:?}: {err:?}");
    err
}

/// A pipe whose reading end is already closed: every write to it fails with EPIPE.
fn closed_pipe() -> Stdio {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    writer.into()
}

/// A child process killed and reaped when dropped, so that a failing test leaves none.
struct Guard(Option<std::process::Child>);

impl Guard {
    fn take(&mut self) -> std::process::Child {
        self.0.take().expect("running")
    }
}

impl std::ops::Deref for Guard {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        self.0.as_ref().expect("running")
    }
}

impl std::ops::DerefMut for Guard {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        self.0.as_mut().expect("running")
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `cmd` (a `vdk serve` without `--listen`) on a Unix socket in `dir` and waits until
/// it listens; returns it and the NBD URI of `export`.
fn serve_on(dir: &Path, export: &str, cmd: &mut Command) -> (Guard, String) {
    let sock = dir.join("nbd.sock");
    let child = Guard(Some(
        cmd.arg("--listen")
            .arg(format!("unix://{}", s(&sock)))
            .spawn()
            .unwrap(),
    ));
    wait_for(20, "vdk to listen", || UnixStream::connect(&sock).is_ok());
    (child, format!("nbd+unix:///{export}?socket={}", s(&sock)))
}

/// The exit status of `child` if it exits within `secs`.
fn exit_within(child: &mut std::process::Child, secs: u64) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// A qcow2 image made by qemu-img.
fn qemu_qcow2(path: &Path, size: &str) {
    need("qemu-img");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", s(path), size]));
}

fn qemu_io(format: &str, target: &str, cmds: &[&str]) {
    need("qemu-io");
    let mut c = Command::new("qemu-io");
    c.args(["-f", format]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = stdout(c.arg(target));
    assert!(!out.contains("failed"), "qemu-io {cmds:?}: {out}");
}

fn qemu_json(args: &[&str]) -> serde_json::Value {
    need("qemu-img");
    serde_json::from_str(&stdout(Command::new("qemu-img").args(args))).expect("qemu-img JSON")
}

/// An ISO 9660 image holding `hello.txt`.
fn iso_with_hello(dir: &Path) -> std::path::PathBuf {
    need("xorriso");
    let tree = dir.join("tree");
    fs::create_dir_all(&tree).unwrap();
    fs::write(tree.join("hello.txt"), "hello from the disc\n").unwrap();
    let iso = dir.join("disc.iso");
    run(Command::new("xorriso").args([
        "-as",
        "mkisofs",
        "-quiet",
        "-R",
        "-J",
        "-o",
        s(&iso),
        s(&tree),
    ]));
    iso
}

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

// ---- Conventions ----

#[test]
fn info_json_has_qemu_img_s_keys() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    qemu_qcow2(&p("base.qcow2"), "64M");
    run(Command::new("qemu-img").args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&p("top.qcow2")),
    ]));
    run(Command::new("qemu-img").args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        s(&p("v2.qcow2")),
        "16M",
    ]));
    run(Command::new("qemu-img").args(["create", "-q", "-f", "raw", s(&p("r.img")), "16M"]));
    run(Command::new("qemu-img").args(["create", "-q", "-f", "vpc", s(&p("d.vhd")), "16M"]));
    run(Command::new("qemu-img").args(["create", "-q", "-f", "vhdx", s(&p("d.vhdx")), "16M"]));
    let keys = |v: &serde_json::Value| -> Vec<String> {
        let mut k: Vec<String> = v
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| *k != "children")
            .cloned()
            .collect();
        k.sort();
        k
    };
    let data_keys = |v: &serde_json::Value| keys(&v["format-specific"]["data"]);
    for name in ["top.qcow2", "v2.qcow2", "r.img", "d.vhd", "d.vhdx"] {
        let q = qemu_json(&["info", "--output=json", s(&p(name))]);
        let v: serde_json::Value =
            serde_json::from_str(&stdout(&mut vdk(&["info", "--output=json", s(&p(name))])))
                .unwrap();
        if name.ends_with(".qcow2") || name.ends_with(".img") {
            assert_eq!(keys(&v), keys(&q), "{name}:\nvdk  {v}\nqemu {q}");
        } else {
            // vdk adds format-specific data where qemu has none (a VHD's subformat).
            let vk = keys(&v);
            assert!(keys(&q).iter().all(|k| vk.contains(k)), "{name}: {v} {q}");
        }
        if name.ends_with(".qcow2") {
            assert_eq!(data_keys(&v), data_keys(&q), "{name}");
            assert_eq!(v["format-specific"]["type"], "qcow2");
        }
        for k in [
            "virtual-size",
            "cluster-size",
            "backing-filename",
            "dirty-flag",
        ] {
            assert_eq!(v[k], q[k], "{name}: {k}");
        }
    }
    let chain =
        |cmd: &mut Command| -> serde_json::Value { serde_json::from_str(&stdout(cmd)).unwrap() };
    let v = chain(&mut vdk(&[
        "info",
        "--output=json",
        "--backing-chain",
        s(&p("top.qcow2")),
    ]));
    let q = qemu_json(&[
        "info",
        "--output=json",
        "--backing-chain",
        s(&p("top.qcow2")),
    ]);
    assert_eq!(v.as_array().unwrap().len(), q.as_array().unwrap().len());
    for (a, b) in v.as_array().unwrap().iter().zip(q.as_array().unwrap()) {
        assert_eq!(keys(a), keys(b));
        assert_eq!(a["filename"], b["filename"]);
    }
    // --json is --output=json.
    let j = chain(&mut vdk(&["info", "--json", s(&p("r.img"))]));
    assert_eq!(j["format"], "raw");
}

#[test]
fn force_share_reads_an_image_a_daemon_has_open() {
    let d = Daemon::new();
    let img = d.path("live.qcow2");
    qemu_qcow2(&img, "16M");
    let v = d.open(&[s(&img), "--attach", "none"]);
    let uri = v["nbd"][0].as_str().unwrap().to_owned();
    qemu_io("raw", &uri, &["write -P 0x61 2M 1M", "flush"]);
    for args in [
        vec!["info", s(&img)],
        vec!["check", s(&img)],
        vec!["convert", s(&img), "copy.img"],
    ] {
        let err = one_line_error(d.cmd(&args).current_dir(d.dir.path()));
        assert!(err.contains("-U"), "{args:?}: {err}");
    }
    d.ok(&["info", "-U", s(&img)]);
    d.ok(&["check", "-U", s(&img)]);
    let copy = d.path("copy.img");
    d.ok(&["convert", "-U", s(&img), s(&copy)]);
    let out = d.ok(&["compare", "-U", s(&img), s(&copy)]);
    assert!(out.contains("identical"), "{out}");
}

#[test]
fn compare_tells_the_same_disk_from_another() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("a.qcow2");
    let r = dir.path().join("a.img");
    qemu_qcow2(&q, "8M");
    qemu_io("qcow2", s(&q), &["write -P 1 1M 64k"]);
    run(Command::new("qemu-img").args(["convert", "-O", "raw", s(&q), s(&r)]));
    let same = vdk(&["compare", s(&q), s(&r)]).output().unwrap();
    assert_eq!(same.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&same.stdout).contains("identical"));
    qemu_io("raw", s(&r), &["write -P 2 3145731 1"]);
    let differ = vdk(&["compare", s(&q), s(&r)]).output().unwrap();
    assert_eq!(differ.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&differ.stdout).contains("mismatch at offset 3145731"),
        "{}",
        String::from_utf8_lossy(&differ.stdout)
    );
    // Zeroes past the smaller one's end: the same disk, unless strict.
    let big = dir.path().join("big.img");
    run(Command::new("qemu-img").args(["convert", "-O", "raw", s(&q), s(&big)]));
    run(Command::new("qemu-img").args(["resize", "-q", "-f", "raw", s(&big), "16M"]));
    assert_eq!(
        vdk(&["compare", s(&q), s(&big)]).status().unwrap().code(),
        Some(0)
    );
    assert_eq!(
        vdk(&["compare", "-s", s(&q), s(&big)])
            .status()
            .unwrap()
            .code(),
        Some(1)
    );
    let missing = vdk(&["compare", s(&q), "/nonexistent.img"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
}

#[test]
fn resize_shrinks_only_when_asked_and_only_what_is_unused() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("r.img");
    sparse_file(&raw, 8 * MIB);
    one_line_error(&mut vdk(&["resize", s(&raw), "4M"]));
    stdout(&mut vdk(&["resize", s(&raw), "4M", "--shrink"]));
    assert_eq!(fs::metadata(&raw).unwrap().len(), 4 * MIB);
    stdout(&mut vdk(&["resize", s(&raw), "-1M", "--shrink"]));
    assert_eq!(fs::metadata(&raw).unwrap().len(), 3 * MIB);
    // qcow2: only what nothing was written to goes.
    let q = dir.path().join("q.qcow2");
    qemu_qcow2(&q, "8M");
    qemu_io("qcow2", s(&q), &["write 1M 64k"]);
    stdout(&mut vdk(&["resize", s(&q), "4M", "--shrink"]));
    let info = qemu_json(&["info", "--output=json", s(&q)]);
    assert_eq!(info["virtual-size"], 4 * MIB);
    run(Command::new("qemu-img").args(["check", s(&q)]));
    qemu_io("qcow2", s(&q), &["read -P 0xcd 1M 64k"]);
    qemu_io("qcow2", s(&q), &["write 3M 64k"]);
    let err = one_line_error(&mut vdk(&["resize", s(&q), "2M", "--shrink"]));
    assert!(err.contains("allocated"), "{err}");
}

#[test]
fn list_fits_a_terminal_and_scripts_can_choose_its_columns() {
    let d = Daemon::new();
    let deep = d.path("a-directory-with-a-long-name/another-one-that-is-long-too/and-more");
    fs::create_dir_all(&deep).unwrap();
    let img = deep.join("an-image-whose-name-is-long-as-well.img");
    let v = d.open(&[s(&img), "16M", "--attach", "none"]);
    let id = v["id"].as_str().unwrap();
    let table = d.ok(&["list"]);
    assert!(
        table.lines().all(|l| l.chars().count() <= 100),
        "wider than 100 columns:\n{table}"
    );
    assert!(table.contains(id) && table.contains("…"), "{table}");
    let wide = d.ok(&["list", "--wide"]);
    assert!(wide.contains(s(&img)), "{wide}");
    let cut = d.ok(&["list", "-o", "ID,SIZE", "--no-headers"]);
    assert_eq!(
        cut.split_whitespace().collect::<Vec<_>>(),
        [id, "16", "MiB"]
    );
    let more = d.ok(&["list", "-o", "+NBD"]);
    assert!(more.lines().next().unwrap().ends_with("NBD"), "{more}");
    assert!(d.ok(&["list", "-o", "help"]).contains("WRITTEN"));
    let err = d.fails(&["list", "-o", "ID,NOPE"]);
    assert!(err.contains("\"NOPE\""), "{err}");
}

#[test]
fn serve_with_a_stats_filter_prints_its_figures_at_exit() {
    need("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let (mut child, uri) = serve_on(
        dir.path(),
        "memory",
        vdk(&["serve", "--memory", "8M", "--filter", "stats"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    qemu_io("raw", &uri, &["write 0 1M", "read 0 64k"]);
    run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    let out = child.take().wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("export \"memory\""), "{text}");
    let write = text.lines().find(|l| l.starts_with("write")).unwrap_or("");
    assert!(write.contains("1 MiB"), "{text}");
}

#[test]
fn completions_and_manual_pages_render() {
    need("bash");
    let script = stdout(&mut vdk(&["completions", "bash"]));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vdk.bash");
    fs::write(&file, &script).unwrap();
    run(Command::new("bash").arg("-n").arg(&file));
    assert!(script.contains("compare") && script.contains("--no-create"));
    for shell in ["zsh", "fish"] {
        assert!(stdout(&mut vdk(&["completions", shell])).contains("vdk"));
    }
    need("man");
    for page in [vec![], vec!["open"], vec!["fs", "map"]] {
        let mut args = vec!["man"];
        args.extend(&page);
        let roff = stdout(&mut vdk(&args));
        let roff_file = dir.path().join("page.1");
        fs::write(&roff_file, roff).unwrap();
        let text = stdout(
            Command::new("man")
                .arg("-l")
                .arg(&roff_file)
                .env("MANWIDTH", "100"),
        );
        let title = ["vdk"]
            .iter()
            .chain(&page)
            .copied()
            .collect::<Vec<_>>()
            .join("-");
        assert!(text.contains("NAME") && text.contains(&title), "{text}");
    }
    let err = one_line_error(&mut vdk(&["man", "nosuch"]));
    assert!(err.contains("nosuch"), "{err}");
}

#[test]
fn help_shows_every_filter_and_format_and_daemon_options_only_where_used() {
    let help = |args: &[&str]| stdout(&mut vdk(args));
    for cmd in ["serve", "open"] {
        let text = help(&[cmd, "--help"]);
        for f in vdk_filters::FILTERS {
            assert!(text.contains(f), "`vdk {cmd} --help` misses filter {f}");
        }
    }
    for cmd in ["serve", "open", "info", "check"] {
        let text = help(&[cmd, "--help"]);
        for f in vdk_formats::Format::ALL {
            assert!(
                text.contains(f.name()),
                "`vdk {cmd} --help` misses format {f}"
            );
        }
    }
    for cmd in ["create", "convert"] {
        let text = help(&[cmd, "--help"]);
        for f in ["raw", "qcow2", "vhd", "vhdx"] {
            assert!(text.contains(f), "`vdk {cmd} --help` misses format {f}");
        }
    }
    assert!(help(&["fs", "--help"]).contains("map"));
    let top = help(&["--help"]);
    for cmd in ["compare", "completions", "man"] {
        assert!(top.contains(cmd), "{cmd}");
    }
    for cmd in ["create", "info", "convert", "check", "serve", "compare"] {
        assert!(
            !help(&[cmd, "--help"]).contains("--socket"),
            "`vdk {cmd}` talks to no daemon"
        );
    }
    for cmd in ["open", "close", "list", "daemon", "commit"] {
        assert!(help(&[cmd, "--help"]).contains("--socket"), "{cmd}");
    }
}

#[test]
fn the_auto_started_daemon_logs_to_a_bounded_file() {
    let d = Daemon::new();
    d.open(&[s(&d.path("a.img")), "8M", "--attach", "none"]);
    let cmdline = fs::read(format!("/proc/{}/cmdline", d.pid())).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let at = args.iter().position(|a| a == "--log").expect("--log");
    assert_eq!(args[at + 1], s(&d.path("run/daemon.log")));
    assert!(d.log_has("daemon ready"));
}

#[test]
fn the_daemon_tells_systemd_it_is_ready_and_the_unit_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let listener = UnixDatagram::bind(&notify).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let socket = dir.path().join("run/control.sock");
    let mut child = Guard(Some(
        vdk(&["daemon", "--socket", s(&socket)])
            .env("NOTIFY_SOCKET", &notify)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    let mut buf = [0u8; 256];
    let n = listener.recv(&mut buf).expect("a notification");
    assert_eq!(&buf[..n], b"READY=1\n");
    assert!(
        UnixStream::connect(&socket).is_ok(),
        "ready before answering"
    );
    run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    let n = listener.recv(&mut buf).expect("a notification");
    assert_eq!(&buf[..n], b"STOPPING=1\n");
    assert!(child.wait().unwrap().success());
    // The unit file, with this build's binary and its manual pages, passes systemd's check.
    need("systemd-analyze");
    let unit =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib/vdk.service"))
            .unwrap()
            .replace("/usr/local/bin/vdk", env!("CARGO_BIN_EXE_vdk"));
    let unit_file = dir.path().join("vdk.service");
    fs::write(&unit_file, unit).unwrap();
    let man1 = dir.path().join("man/man1");
    fs::create_dir_all(&man1).unwrap();
    fs::write(man1.join("vdk.1"), stdout(&mut vdk(&["man"]))).unwrap();
    fs::write(
        man1.join("vdk-daemon.1"),
        stdout(&mut vdk(&["man", "daemon"])),
    )
    .unwrap();
    run(Command::new("systemd-analyze")
        .args(["verify", s(&unit_file)])
        .env("MANPATH", dir.path().join("man")));
}

// ---- Object storage through the daemon ----

#[test]
fn a_daemon_reaches_a_bucket_with_the_clients_settings_and_errors_are_one_line() {
    let s3 = common::s3::S3::moto();
    let d = Daemon::new();
    // A daemon that has no store settings of its own.
    d.start(&[]);
    let url = s3.url("through-daemon");
    let open = |args: &[&str]| -> serde_json::Value {
        let mut a = vec!["open"];
        a.extend_from_slice(args);
        a.push("--json");
        serde_json::from_str(&stdout(d.cmd(&a).envs(s3.env()))).unwrap()
    };
    let v = open(&[&url, "16M", "--attach", "none"]);
    let uri = v["nbd"][0].as_str().unwrap().to_owned();
    qemu_io("raw", &uri, &["write -P 0x42 0 1M", "flush"]);
    run(&mut d.cmd(&["close", v["id"].as_str().unwrap()]));
    assert!(
        !d.log().contains(common::s3::SECRET_KEY),
        "the secret is in the log"
    );
    // The bucket's own errors, in a line.
    let err = one_line_error(
        d.cmd(&["open", "s3://nosuchbucket/d", "8M", "--attach", "none"])
            .envs(s3.env()),
    );
    assert!(err.contains("bucket nosuchbucket does not exist"), "{err}");
    // Nothing listens: said at once, not after a minute of retries.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let endpoint = format!("http://127.0.0.1:{port}");
    let src = d.path("src.img");
    sparse_file(&src, MIB);
    for args in [
        vec!["create", "s3://vdk/x", "8M"],
        vec!["info", "s3://vdk/x"],
        vec!["convert", s(&src), "s3://vdk/y"],
    ] {
        let start = Instant::now();
        let err = one_line_error(vdk(&args).envs(s3.env()).env("AWS_ENDPOINT_URL", &endpoint));
        assert!(
            err.contains(&format!("cannot reach {endpoint}: connection refused")),
            "{args:?}: {err}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{args:?} took long"
        );
    }
}

#[test]
fn a_new_bucket_disk_is_formatted_and_mounted_as_a_file_is() {
    need_root();
    need("mkfs.ext4");
    let s3 = common::s3::S3::moto();
    let d = Daemon::new();
    let url = s3.url("fresh");
    let mnt = d.path("mnt");
    stdout(vdk(&["create", &url, "64M"]).envs(s3.env()));
    let v: serde_json::Value = serde_json::from_str(&stdout(
        d.cmd(&["open", &url, "--mkfs", "ext4", "--mount", s(&mnt), "--json"])
            .envs(s3.env()),
    ))
    .unwrap();
    fs::write(mnt.join("f"), "in the bucket").unwrap();
    d.ok(&["close", v["id"].as_str().unwrap()]);
    let err = one_line_error(
        d.cmd(&["open", &url, "--mkfs", "ext4", "--mount", s(&mnt)])
            .envs(s3.env()),
    );
    assert!(
        err.contains("file system (ext4)") && err.contains("--force"),
        "{err}"
    );
}

#[test]
fn serve_and_convert_leave_no_cache_behind() {
    let s3 = common::s3::S3::moto();
    let dir = tempfile::tempdir().unwrap();
    let cache_home = dir.path().join("cache");
    let url = s3.url("cached");
    let img = dir.path().join("src.img");
    fs::write(&img, vec![5u8; 2 * MIB as usize]).unwrap();
    stdout(
        vdk(&["convert", "-q", s(&img), &url])
            .envs(s3.env())
            .env("XDG_CACHE_HOME", &cache_home),
    );
    let caches = || -> Vec<String> {
        fs::read_dir(cache_home.join("vdk/objstore"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(caches().is_empty(), "convert left {:?}", caches());
    let (mut child, uri) = serve_on(
        dir.path(),
        "cached",
        vdk(&["serve", &url])
            .envs(s3.env())
            .env("XDG_CACHE_HOME", &cache_home)
            .stderr(Stdio::null()),
    );
    qemu_io("raw", &uri, &["read -P 5 0 2M", "write -P 6 0 1M", "flush"]);
    assert!(!caches().is_empty(), "serve keeps its cache while it runs");
    run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    assert!(child.wait().unwrap().success());
    assert!(caches().is_empty(), "serve left {:?}", caches());
}
