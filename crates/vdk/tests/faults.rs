//! Faults under real clients: a client killed mid-request, a client that stops taking
//! replies, a full overlay, an image deleted or truncated under an open disk. The requests
//! that meet the fault fail with the right errno; every other disk and client carries on;
//! what was acknowledged is still there.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::raw::{closed_within, raw_client, request, CMD_READ};
use common::{need, need_root, path_env, wait_for, Daemon, Vdk};

fn nbdsh(uri: &str, code: &str) -> Output {
    need("nbdsh");
    Command::new("nbdsh")
        .args(["-u", uri, "-c", code])
        .env("PATH", path_env())
        .output()
        .expect("run nbdsh")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Writes a pattern, flushes, reads it back: prints "ok".
const ROUND_TRIP: &str = "
data = bytes((i * 13 + 1) % 249 for i in range(1 << 20))
h.pwrite(data, 0)
h.flush()
assert h.pread(1 << 20, 0) == data
print('ok')
";

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn a_client_killed_mid_request_costs_nobody_else() {
    let vdk = Vdk::serve(&["--memory", "64M", "--filter", "delay:op=write,ms=300"]);
    let base_threads = threads(vdk.pid());
    // Sixteen slow writes in flight, then the client dies before any is answered.
    let mut victim = Command::new("nbdsh")
        .args([
            "-u",
            &vdk.uri("memory"),
            "-c",
            "import time\nfor i in range(16):\n    h.aio_pwrite(b'x' * (1 << 20), i << 20)\nprint('sent', flush=True)\ntime.sleep(60)",
        ])
        .env("PATH", path_env())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start nbdsh");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(victim.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "sent");
    victim.kill().unwrap();
    victim.wait().unwrap();
    // Another client, at once and later, is served as if nothing happened.
    let o = nbdsh(&vdk.uri("memory"), ROUND_TRIP);
    assert!(text(&o).contains("ok"), "{}", text(&o));
    wait_for(30, "the dead client's threads to end", || {
        threads(vdk.pid()) <= base_threads
    });
    assert!(vdk.log_has("client disconnected"), "{}", vdk.log());
    assert!(!vdk.log().contains("panicked"), "{}", vdk.log());
}

#[test]
fn a_client_that_stops_taking_replies_is_cut_and_others_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let vdk = Vdk::serve_tcp(dir, &["--memory", "256M", "--io-timeout", "2"]);
    // Asks for 8 x 32 MiB and reads none of it: the replies fill the socket and stop.
    let mut s = raw_client(&vdk.tcp(), "memory");
    for i in 0..8u64 {
        s.write_all(&request(CMD_READ, i, i << 25, 32 << 20))
            .unwrap();
    }
    let o = nbdsh(&vdk.uri("memory"), ROUND_TRIP);
    assert!(text(&o).contains("ok"), "{}", text(&o));
    wait_for(20, "the stalled connection to be cut", || {
        vdk.log().contains("cannot send")
    });
    // Its socket is closed: what it now reads ends.
    let t = Instant::now();
    assert!(closed_within(&mut s, Duration::from_secs(20)), "still open");
    assert!(t.elapsed() < Duration::from_secs(20));
    let o = nbdsh(&vdk.uri("memory"), ROUND_TRIP);
    assert!(text(&o).contains("ok"), "{}", text(&o));
}

/// A tmpfs of `size` mounted on `dir`, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        common::run(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir),
        );
        Tmpfs(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_overlay_fails_writes_with_enospc_and_keeps_what_was_acknowledged() {
    need_root();
    let d = Daemon::new();
    let small = Tmpfs::mount(&d.path("small"), "4M");
    let base = d.path("base.img");
    common::sparse_file(&base, 64 << 20);
    let overlay = small.0.join("overlay.cow");
    let cow = d.open(&[
        base.to_str().unwrap(),
        "--attach",
        "none",
        "--filter",
        &format!("cow:overlay={}", overlay.display()),
    ]);
    let other = d.open(&[
        d.path("other.img").to_str().unwrap(),
        "16M",
        "--attach",
        "none",
    ]);
    let uri = cow["nbd"][0].as_str().expect("nbd uri").to_owned();
    // 1 MiB at a time with a flush after each, until the overlay's file system is full.
    let o = nbdsh(
        &uri,
        "done = 0
try:
    for i in range(32):
        h.pwrite(bytes([i + 1]) * (1 << 20), i << 20)
        h.flush()
        done = i + 1
    print('never full')
except nbd.Error as e:
    print('full after', done, 'errno', e.errno == 'ENOSPC', e)
for i in range(done):
    assert h.pread(1 << 20, i << 20) == bytes([i + 1]) * (1 << 20), i
print('acknowledged intact', done)
assert h.pread(4096, 40 << 20) == bytes(4096)
print('reads go on')",
    );
    let out = text(&o);
    assert!(out.contains("errno True"), "{out}");
    assert!(out.contains("acknowledged intact"), "{out}");
    assert!(out.contains("reads go on"), "{out}");
    // The base was never touched, and the other disk is fine.
    assert!(std::fs::read(&base).unwrap().iter().all(|&b| b == 0));
    let o = nbdsh(other["nbd"][0].as_str().unwrap(), ROUND_TRIP);
    assert!(text(&o).contains("ok"), "{}", text(&o));
    d.ok(&["close", cow["id"].as_str().unwrap()]);
    drop(small);
}

#[test]
fn an_image_deleted_or_truncated_under_an_open_disk() {
    let d = Daemon::new();
    let gone = d.path("gone.img");
    let short = d.path("short.img");
    let a = d.open(&[gone.to_str().unwrap(), "16M", "--attach", "none"]);
    let b = d.open(&[short.to_str().unwrap(), "16M", "--attach", "none"]);
    for disk in [&a, &b] {
        let o = nbdsh(disk["nbd"][0].as_str().unwrap(), ROUND_TRIP);
        assert!(text(&o).contains("ok"), "{}", text(&o));
    }
    // Deleted: the open file lives on; data written and flushed reads back.
    std::fs::remove_file(&gone).unwrap();
    let o = nbdsh(a["nbd"][0].as_str().unwrap(), ROUND_TRIP);
    assert!(text(&o).contains("ok"), "deleted image: {}", text(&o));
    // Truncated to 4 MiB: reads past the new end fail with EIO (never zeroes passed off as
    // data), reads before it still work, and the other disk does not notice.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&short)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let o = nbdsh(
        b["nbd"][0].as_str().unwrap(),
        "data = bytes((i * 13 + 1) % 249 for i in range(1 << 20))
assert h.pread(1 << 20, 0) == data
try:
    h.pread(4096, 8 << 20)
    print('read past the end')
except nbd.Error as e:
    print('failed', e.errno == 'EIO', e)
assert h.pread(4096, 0) == data[:4096]
print('still serving')",
    );
    let out = text(&o);
    assert!(out.contains("failed True"), "{out}");
    assert!(out.contains("still serving"), "{out}");
    let o = nbdsh(a["nbd"][0].as_str().unwrap(), ROUND_TRIP);
    assert!(text(&o).contains("ok"), "{}", text(&o));
}

#[test]
fn a_full_cache_disk_costs_speed_not_reads() {
    need_root();
    let dir = tempfile::tempdir().unwrap();
    let small = Tmpfs::mount(&dir.path().join("small"), "1M");
    common::sparse_file(&dir.path().join("disk.img"), 64 << 20);
    let spec = format!("cache:dir={},size=32M", small.0.display());
    let vdk = Vdk::serve_in(dir, &["--export", "disk=disk.img", "--filter", &spec]);
    // 8 MiB written through, then read twice: the cache fills its 1 MiB file system at once.
    let o = nbdsh(
        &vdk.uri("disk"),
        "data = bytes((i * 31 + 7) % 253 for i in range(8 << 20))
h.pwrite(data, 0)
h.flush()
for _ in range(2):
    assert h.pread(8 << 20, 0) == data
print('reads ok')",
    );
    assert!(text(&o).contains("reads ok"), "{}\n{}", text(&o), vdk.log());
    assert!(vdk.log_has("cannot store a block"), "{}", vdk.log());
    drop(vdk);
    drop(small);
}

/// A network namespace with a veth pair: 10.199.N.1 on this side, 10.199.N.2 inside.
struct Netns {
    name: String,
    link: String,
}

impl Netns {
    fn new() -> Netns {
        need("ip");
        let id = std::process::id();
        let ns = Netns {
            name: format!("vdk-test-{id}"),
            link: format!("vdk{}", id % 100_000),
        };
        let ip = |args: &str| {
            common::run(Command::new("ip").args(args.split_whitespace()));
        };
        ip(&format!("netns add {}", ns.name));
        ip(&format!(
            "link add {}a type veth peer name {}b",
            ns.link, ns.link
        ));
        ip(&format!("link set {}b netns {}", ns.link, ns.name));
        ip(&format!("addr add {}/24 dev {}a", ns.host(), ns.link));
        ip(&format!("link set {}a up", ns.link));
        ns.exec(&format!("ip addr add {}/24 dev {}b", ns.peer(), ns.link));
        ns.exec(&format!("ip link set {}b up", ns.link));
        ns.exec("ip link set lo up");
        ns
    }

    fn subnet(&self) -> u32 {
        std::process::id() % 250 + 1
    }

    fn host(&self) -> String {
        format!("10.199.{}.1", self.subnet())
    }

    fn peer(&self) -> String {
        format!("10.199.{}.2", self.subnet())
    }

    fn exec(&self, cmd: &str) {
        common::run(
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(cmd.split_whitespace()),
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &format!("{}a", self.link)])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
fn a_half_open_connection_is_found_and_closed() {
    need_root();
    need("nbdsh");
    let ns = Netns::new();
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("tcp://{}:0", ns.host());
    let vdk = Vdk::serve_in(
        dir,
        &["--memory", "16M", "--listen", &listen, "--keepalive", "2"],
    );
    let uri = format!("nbd://{}/memory", vdk.tcp());
    // A client in the namespace connects, reads, and goes quiet.
    let mut client = Command::new("ip")
        .args(["netns", "exec", &ns.name, "nbdsh", "-u", &uri, "-c"])
        .arg("import time\nh.pread(512, 0)\nprint('up', flush=True)\ntime.sleep(600)")
        .env("PATH", path_env())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start nbdsh in the namespace");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(client.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "up");
    // Its host vanishes: the link goes down, then the client dies; no FIN or RST can reach
    // the server, which sees a connection that is open and silent.
    ns.exec(&format!("ip link set {}b down", ns.link));
    client.kill().unwrap();
    client.wait().unwrap();
    let t = Instant::now();
    while !vdk.log().contains("client disconnected") {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "not closed:\n{}",
            vdk.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("half-open connection closed after {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    // The server serves on.
    let o = nbdsh(&vdk.uri("memory"), ROUND_TRIP);
    assert!(text(&o).contains("ok"), "{}", text(&o));
}
