//! `vdk serve` as a person and a hostile client meet it: errors to act on, signals, TCP,
//! durability across kill -9, garbage on the wire.
#![allow(clippy::cast_possible_truncation)] // test sizes are small constants

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Output};

use common::{need, pattern, run, sparse_file, stdout, Vdk};
use tempfile::TempDir;

const MIB: u64 = 1 << 20;

fn vdk(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vdk"))
        .args(args)
        .output()
        .expect("run vdk")
}

fn fails_with(args: &[&str], wants: &[&str]) {
    let out = vdk(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "vdk {args:?} should fail: {err}"
    );
    for want in wants {
        assert!(
            err.contains(want),
            "vdk {args:?}: {want:?} not in stderr:\n{err}"
        );
    }
}

#[test]
fn missing_image_is_named_with_a_hint() {
    fails_with(
        &["serve", "/nonexistent/disk.img"],
        &[
            "cannot open /nonexistent/disk.img",
            "No such file",
            "vdk create",
        ],
    );
}

#[test]
fn directory_as_image_is_refused() {
    let dir = TempDir::new().unwrap();
    fails_with(
        &["serve", dir.path().to_str().unwrap()],
        &["cannot open", "directory"],
    );
}

#[test]
fn bad_size_names_the_unit() {
    fails_with(
        &["serve", "--memory", "10XB"],
        &["invalid size \"10XB\"", "unknown unit \"XB\""],
    );
}

#[test]
fn nothing_to_serve_says_what_to_give() {
    fails_with(&["serve"], &["nothing to serve", "--memory"]);
}

#[test]
fn two_exports_with_one_name_are_refused() {
    fails_with(
        &[
            "serve",
            "--export",
            "a=memory:1M",
            "--export",
            "a=memory:2M",
        ],
        &["two exports are named \"a\""],
    );
}

#[test]
fn bad_listen_uri_is_explained() {
    fails_with(
        &["serve", "--memory", "1M", "--listen", "http://x"],
        &["use tcp://HOST:PORT or unix:///PATH"],
    );
}

#[test]
fn port_in_use_is_reported() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("tcp://{}", busy.local_addr().unwrap());
    fails_with(
        &["serve", "--memory", "1M", "--listen", &uri],
        &["cannot listen on tcp://", "in use"],
    );
}

#[test]
fn live_unix_socket_is_not_stolen() {
    let first = Vdk::serve(&["--memory", "1M"]);
    let uri = format!("unix://{}", first.sock.display());
    fails_with(
        &["serve", "--memory", "1M", "--listen", &uri],
        &["cannot listen on unix://", "in use"],
    );
}

#[test]
fn serves_over_tcp() {
    need("nbdinfo");
    let dir = TempDir::new().unwrap();
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_vdk"))
        .args(["serve", "--memory", "3M", "--listen", "tcp://127.0.0.1:0"])
        .stderr(log)
        .spawn()
        .unwrap();
    // Killed however the test ends, so no server outlives it.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _child = KillOnDrop(child);
    // The log names the port the kernel chose.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let uri = loop {
        let text = std::fs::read_to_string(dir.path().join("log")).unwrap();
        if let Some(at) = text.find("nbd://127.0.0.1:") {
            let rest = &text[at..];
            break rest[..rest.find(|c: char| c.is_whitespace()).unwrap_or(rest.len())].to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no listening line in:\n{text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let out = stdout(
        Command::new("nbdinfo")
            .arg("--size")
            .arg(format!("{uri}/memory")),
    );
    assert_eq!(out.trim(), (3 * MIB).to_string());
}

#[test]
fn sigterm_flushes_and_exits_zero() {
    need("nbdsh");
    let dir = TempDir::new().unwrap();
    let img = dir.path().join("disk.img");
    sparse_file(&img, 8 * MIB);
    let mut vdk = Vdk::serve_in(dir, &["disk.img"]);
    run(Command::new("nbdsh").args([
        "-u",
        &vdk.uri(""),
        "-c",
        "h.pwrite(b'written before term', 4096)",
    ]));
    assert!(
        vdk.stop().success(),
        "exit status after SIGTERM:\n{}",
        vdk.log()
    );
    assert!(vdk.log_has("shutting down"), "{}", vdk.log());
    let data = std::fs::read(&img).unwrap();
    assert_eq!(&data[4096..4096 + 19], b"written before term");
}

#[test]
fn flushed_and_fua_writes_survive_kill_9() {
    need("nbdsh");
    let dir = TempDir::new().unwrap();
    let img = dir.path().join("disk.img");
    sparse_file(&img, 8 * MIB);
    let mut vdk = Vdk::serve_in(dir, &["disk.img"]);
    let script = "h.pwrite(bytes(range(256)) * 256, 0)\nh.flush()\nh.pwrite(b'fua write', 1 << 20, nbd.CMD_FLAG_FUA)";
    run(Command::new("nbdsh").args(["-u", &vdk.uri(""), "-c", script]));
    vdk.kill9(); // no shutdown code runs
    let data = std::fs::read(&img).unwrap();
    let want: Vec<u8> = (0..=255u8).cycle().take(65536).collect();
    assert!(data[..65536] == want[..], "flushed write lost");
    assert_eq!(&data[1 << 20..(1 << 20) + 9], b"fua write");
}

/// Reads the 18-byte greeting and answers with client flags `flags`.
fn greet(sock: &mut UnixStream, flags: u32) {
    let mut greeting = [0u8; 18];
    sock.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    sock.write_all(&flags.to_be_bytes()).unwrap();
}

fn closed(sock: &mut UnixStream) -> bool {
    let mut b = [0u8; 1];
    sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    matches!(sock.read(&mut b), Ok(0))
}

#[test]
fn garbage_during_handshake_closes_only_that_connection() {
    need("nbdinfo");
    let vdk = Vdk::serve(&["--memory", "1M"]);
    let mut bad = UnixStream::connect(&vdk.sock).unwrap();
    greet(&mut bad, 1);
    bad.write_all(&[0xAB; 16]).unwrap();
    assert!(
        closed(&mut bad),
        "connection with bad option magic stays open"
    );
    assert!(vdk.log_has("bad option magic"), "{}", vdk.log());
    run(Command::new("nbdinfo").arg("--size").arg(vdk.uri("")));
}

#[test]
fn garbage_request_closes_the_connection_and_server_lives_on() {
    need("nbdinfo");
    let vdk = Vdk::serve(&["--memory", "1M"]);
    let mut bad = UnixStream::connect(&vdk.sock).unwrap();
    greet(&mut bad, 1 | 2);
    // NBD_OPT_EXPORT_NAME "" : the server answers size + flags, then transmission starts.
    let mut opt = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
    opt.extend_from_slice(&1u32.to_be_bytes());
    opt.extend_from_slice(&0u32.to_be_bytes());
    bad.write_all(&opt).unwrap();
    let mut export = [0u8; 10];
    bad.read_exact(&mut export).unwrap();
    assert_eq!(u64::from_be_bytes(export[..8].try_into().unwrap()), MIB);
    bad.write_all(&pattern(28, 5)).unwrap();
    assert!(
        closed(&mut bad),
        "connection with bad request magic stays open"
    );
    assert!(vdk.log_has("bad request magic"), "{}", vdk.log());
    run(Command::new("nbdinfo").arg("--size").arg(vdk.uri("")));
}

#[test]
fn client_that_vanishes_mid_handshake_is_harmless() {
    need("nbdinfo");
    let vdk = Vdk::serve(&["--memory", "1M"]);
    for _ in 0..20 {
        let mut s = UnixStream::connect(&vdk.sock).unwrap();
        let mut b = [0u8; 5];
        s.read_exact(&mut b).unwrap();
    }
    run(Command::new("nbdinfo").arg("--size").arg(vdk.uri("")));
}

#[test]
fn unreadable_image_is_a_permission_error_with_a_hint() {
    let dir = TempDir::new().unwrap();
    let img = dir.path().join("secret.img");
    sparse_file(&img, MIB);
    std::fs::set_permissions(&img, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    // Root may open anything, so the check runs as nobody.
    let uid = String::from_utf8(Command::new("id").arg("-u").output().unwrap().stdout).unwrap();
    let mut cmd = if uid.trim() == "0" {
        need("setpriv");
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_vdk"),
        ]);
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_vdk"))
    };
    let out = cmd.arg("serve").arg(&img).output().expect("run vdk");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot open") && err.contains("ermission denied"),
        "{err}"
    );
}
