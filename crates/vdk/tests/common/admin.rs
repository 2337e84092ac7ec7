//! Helpers of the admin tests (admin.rs, conventions.rs): the binary without a daemon, one-line
//! errors, closed pipes, a served export, and images made by qemu-img and xorriso.

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{need, path_env, run, stdout, wait_for};

pub const MIB: u64 = 1 << 20;

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `vdk ARGS` with no daemon of its own (commands that need none).
pub fn vdk(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vdk"));
    c.args(args).env("PATH", path_env()).env_remove("RUST_LOG");
    c
}

/// Standard error of a command that must fail, which must be one "vdk: ..." line.
pub fn one_line_error(cmd: &mut Command) -> String {
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
pub fn closed_pipe() -> Stdio {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    writer.into()
}

/// A child process killed and reaped when dropped, so that a failing test leaves none.
pub struct Guard(pub Option<std::process::Child>);

impl Guard {
    pub fn take(&mut self) -> std::process::Child {
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
pub fn serve_on(dir: &Path, export: &str, cmd: &mut Command) -> (Guard, String) {
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
pub fn exit_within(child: &mut std::process::Child, secs: u64) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Fails unless `a` and `b` (files or URIs) hold the same bytes, read as raw by qemu-img.
pub fn same_raw(a: &str, b: &str) {
    need("qemu-img");
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", a, b]));
}

/// A qcow2 image made by qemu-img.
pub fn qemu_qcow2(path: &Path, size: &str) {
    need("qemu-img");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", s(path), size]));
}

pub fn qemu_io(format: &str, target: &str, cmds: &[&str]) {
    need("qemu-io");
    let mut c = Command::new("qemu-io");
    c.args(["-f", format]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = stdout(c.arg(target));
    assert!(!out.contains("failed"), "qemu-io {cmds:?}: {out}");
}

pub fn qemu_json(args: &[&str]) -> serde_json::Value {
    need("qemu-img");
    serde_json::from_str(&stdout(Command::new("qemu-img").args(args))).expect("qemu-img JSON")
}

/// An ISO 9660 image holding `hello.txt`.
pub fn iso_with_hello(dir: &Path) -> std::path::PathBuf {
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
