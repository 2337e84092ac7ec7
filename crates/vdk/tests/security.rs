//! NBD over TLS, export allow-lists and the limits that bound what a client can cost, driven
//! with libnbd (nbdinfo, nbdsh) and qemu-img; raw sockets only where a client must misbehave
//! (silence, half a request, too many connections), which no real client does on purpose.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::raw::{closed_within, greeting, option_reply, raw_client, send_option};
use common::raw::{OPT_EXPORT_NAME, OPT_LIST, REP_ERR_TLS_REQD};
use common::{need, path_env, pki, rss_kib, run, stdout, wait_for, Vdk};

/// nbdinfo ARGS, whatever its outcome.
fn nbdinfo(args: &[&str]) -> Output {
    need("nbdinfo");
    Command::new("nbdinfo")
        .args(args)
        .env("PATH", path_env())
        .output()
        .expect("run nbdinfo")
}

/// Runs Python `code` in nbdsh with `h` connected to `uri` (local certificate files allowed).
fn nbdsh(uri: &str, code: &str) -> Output {
    need("nbdsh");
    let script = format!(
        "import os\nh.set_uri_allow_local_file(True)\nh.connect_uri(os.environ['URI'])\n{code}"
    );
    Command::new("nbdsh")
        .args(["-c", &script])
        .env("URI", uri)
        .env("PATH", path_env())
        .output()
        .expect("run nbdsh")
}

fn tls_uri(vdk: &Vdk, export: &str, certs: &Path) -> String {
    format!(
        "nbds+unix:///{export}?socket={}&tls-certificates={}",
        vdk.sock.display(),
        certs.display()
    )
}

/// Over TCP to the name localhost, which libnbd checks the server's certificate against (over
/// a Unix socket it has no name to check, and takes any certificate).
fn tls_tcp_uri(vdk: &Vdk, export: &str, certs: &Path) -> String {
    let port = vdk.tcp().rsplit(':').next().unwrap().to_owned();
    format!(
        "nbds://localhost:{port}/{export}?tls-certificates={}",
        certs.display()
    )
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The export names `nbdinfo --list` shows.
fn listed(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("export=\"")?.strip_suffix("\":"))
        .map(str::to_owned)
        .collect()
}

/// A pattern write, flush and read-back over `uri`, checked in Python.
const ROUND_TRIP: &str = "
data = bytes((i * 7 + 3) % 251 for i in range(4 << 20))
h.pwrite(data, 1 << 20)
h.flush()
assert h.pread(4 << 20, 1 << 20) == data
print('round trip ok')
";

// ---- TLS -------------------------------------------------------------------------------

#[test]
fn tls_require_refuses_everything_before_starttls_and_serves_tls_clients() {
    let dir = tempfile::tempdir().unwrap();
    let certs = pki::make(&dir.path().join("pki"), "vdk test CA", "alice");
    let vdk = Vdk::serve_in(
        dir,
        &[
            "--memory",
            "64M",
            "--tls",
            "require",
            "--tls-certificates",
            certs.to_str().unwrap(),
        ],
    );
    // Plain clients see nothing: no list, no export.
    let list = nbdinfo(&["--list", &vdk.uri("")]);
    assert!(!list.status.success(), "plain list served: {}", text(&list));
    assert!(listed(&list).is_empty());
    let info = nbdinfo(&[&vdk.uri("memory")]);
    assert!(
        !info.status.success(),
        "plain client served: {}",
        text(&info)
    );
    // On the wire: LIST is answered NBD_REP_ERR_TLS_REQD, EXPORT_NAME closes.
    let mut s = std::os::unix::net::UnixStream::connect(&vdk.sock).unwrap();
    greeting(&mut s).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    send_option(&mut s, OPT_LIST, &[]);
    assert_eq!(option_reply(&mut s).0, REP_ERR_TLS_REQD);
    send_option(&mut s, OPT_EXPORT_NAME, b"memory");
    let mut b = [0u8; 1];
    assert_eq!(
        s.read(&mut b).unwrap_or(0),
        0,
        "EXPORT_NAME without TLS must close"
    );
    // TLS clients are served.
    let uri = tls_uri(&vdk, "memory", &certs);
    let info = nbdinfo(&[&uri]);
    assert!(info.status.success(), "{}", text(&info));
    assert!(text(&info).contains("with TLS"), "{}", text(&info));
    let out = nbdsh(&uri, ROUND_TRIP);
    assert!(text(&out).contains("round trip ok"), "{}", text(&out));
}

#[test]
fn tls_on_serves_plain_and_tls_clients_and_qemu() {
    need("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let certs = pki::make(&dir.path().join("pki"), "vdk test CA", "alice");
    let src = dir.path().join("src.img");
    std::fs::write(
        &src,
        (0..8u32 << 20).map(|i| (i % 253) as u8).collect::<Vec<_>>(),
    )
    .unwrap();
    let vdk = Vdk::serve_tcp(
        dir,
        &[
            "--memory",
            "8M",
            "--tls",
            "on",
            "--tls-certificates",
            certs.to_str().unwrap(),
        ],
    );
    let plain = nbdinfo(&[&vdk.uri("memory")]);
    assert!(plain.status.success(), "{}", text(&plain));
    assert!(text(&plain).contains("without TLS"), "{}", text(&plain));
    let out = nbdsh(&tls_uri(&vdk, "memory", &certs), ROUND_TRIP);
    assert!(text(&out).contains("round trip ok"), "{}", text(&out));
    // qemu's own TLS client (GnuTLS) checks the certificate against the name localhost.
    let port = vdk.tcp().rsplit(':').next().unwrap().to_owned();
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        certs.display()
    );
    let target = format!(
        "driver=nbd,server.type=inet,server.host=localhost,server.port={port},\
         export=memory,tls-creds=tls0"
    );
    // A few times over: a stall in the TLS pump shows as a write that never completes.
    for _ in 0..3 {
        run(Command::new("qemu-img").args([
            "convert",
            "-n",
            "-f",
            "raw",
            src.to_str().unwrap(),
            "--object",
            &object,
            "--target-image-opts",
            &target,
        ]));
    }
    let file = format!("driver=raw,file.filename={}", src.display());
    let cmp = stdout(Command::new("qemu-img").args([
        "compare",
        "--object",
        &object,
        "--image-opts",
        &file,
        &target,
    ]));
    assert!(cmp.contains("Images are identical"), "{cmp}");
}

#[test]
fn verify_peer_takes_only_certificates_of_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let certs = pki::make(&dir.path().join("pki"), "vdk test CA", "alice");
    let other = pki::make(&dir.path().join("other"), "another CA", "mallory");
    let no_cert = dir.path().join("no-cert");
    pki::ca_only(&certs, &no_cert);
    // mallory's certificate is signed by another CA; this directory trusts the server's.
    let stranger = dir.path().join("stranger");
    std::fs::create_dir_all(&stranger).unwrap();
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(other.join(f), stranger.join(f)).unwrap();
    }
    std::fs::copy(certs.join("ca-cert.pem"), stranger.join("ca-cert.pem")).unwrap();
    let vdk = Vdk::serve_in(
        dir,
        &[
            "--memory",
            "16M",
            "--tls",
            "require",
            "--tls-certificates",
            certs.to_str().unwrap(),
            "--tls-verify-peer",
        ],
    );
    let good = nbdinfo(&[&tls_uri(&vdk, "memory", &certs)]);
    assert!(good.status.success(), "{}", text(&good));
    for bad in [&no_cert, &stranger] {
        let o = nbdinfo(&[&tls_uri(&vdk, "memory", bad)]);
        assert!(
            !o.status.success(),
            "{} was let in: {}",
            bad.display(),
            text(&o)
        );
    }
    // A server that trusts no client CA is not fooled by a client that trusts it back.
    let o = nbdinfo(&[&tls_uri(&vdk, "memory", &other)]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(vdk.log_has("handshake failed"), "{}", vdk.log());
}

#[test]
fn certificates_are_read_again_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let first = pki::make(&dir.path().join("first"), "first CA", "alice");
    let second = pki::make(&dir.path().join("second"), "second CA", "alice");
    let live = dir.path().join("live");
    std::fs::create_dir_all(&live).unwrap();
    let install = |from: &Path| {
        for f in ["server-cert.pem", "server-key.pem", "ca-cert.pem"] {
            std::fs::copy(from.join(f), live.join(f)).unwrap();
        }
    };
    install(&first);
    let vdk = Vdk::serve_tcp(
        dir,
        &[
            "--memory",
            "16M",
            "--tls",
            "require",
            "--tls-certificates",
            live.to_str().unwrap(),
        ],
    );
    assert!(nbdinfo(&[&tls_tcp_uri(&vdk, "memory", &first)])
        .status
        .success());
    assert!(!nbdinfo(&[&tls_tcp_uri(&vdk, "memory", &second)])
        .status
        .success());
    install(&second);
    vdk.signal("HUP");
    wait_for(10, "the reload in the log", || {
        vdk.log().contains("TLS certificates reloaded")
    });
    let now = nbdinfo(&[&tls_tcp_uri(&vdk, "memory", &second)]);
    assert!(now.status.success(), "{}", text(&now));
    assert!(!nbdinfo(&[&tls_tcp_uri(&vdk, "memory", &first)])
        .status
        .success());
    // A broken file on reload keeps the certificates in use.
    std::fs::write(live.join("server-key.pem"), "not a key").unwrap();
    vdk.signal("HUP");
    wait_for(10, "the failed reload in the log", || {
        vdk.log().contains("not reloaded")
    });
    assert!(nbdinfo(&[&tls_tcp_uri(&vdk, "memory", &second)])
        .status
        .success());
}

#[test]
fn the_daemon_reloads_certificates_on_request() {
    // `vdk daemon --reload`: SIGHUP's work as a control request (Windows has no SIGHUP; the
    // Wine tests swap certificates through it).
    let plain = common::Daemon::new();
    plain.start(&[]);
    let err = plain.fails(&["daemon", "--reload"]);
    assert!(err.contains("TLS is off"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let certs = pki::make(&dir.path().join("pki"), "vdk test CA", "alice");
    let d = common::Daemon::new();
    d.start(&[
        "--tls",
        "require",
        "--tls-certificates",
        certs.to_str().unwrap(),
    ]);
    assert!(d.ok(&["daemon", "--reload"]).contains("reloaded"));
    std::fs::write(certs.join("server-cert.pem"), "not a certificate").unwrap();
    let err = d.fails(&["daemon", "--reload"]);
    assert!(err.contains("not reloaded"), "{err}");
}

#[test]
fn tls_settings_that_cannot_work_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let psk = dir.path().join("keys.psk");
    std::fs::write(&psk, "alice:0123456789abcdef\n").unwrap();
    let vdk = env!("CARGO_BIN_EXE_vdk");
    let fails = |args: &[&str], says: &str| {
        let o = Command::new(vdk).arg("serve").args(args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} started");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    };
    fails(
        &[
            "--memory",
            "1M",
            "--tls",
            "on",
            "--tls-psk",
            psk.to_str().unwrap(),
        ],
        "pre-shared keys is not available",
    );
    fails(
        &["--memory", "1M", "--tls", "require"],
        "--tls-certificates",
    );
    fails(&["--memory", "1M", "--tls", "maybe"], "off, on or require");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    fails(
        &[
            "--memory",
            "1M",
            "--tls",
            "on",
            "--tls-certificates",
            empty.to_str().unwrap(),
        ],
        "server-cert.pem",
    );
    fails(
        &["--memory", "1M", "--allow", "10.0.0.0/40"],
        "invalid allow rule",
    );
    fails(
        &["--memory", "1M", "--allow", "nosuch=unix"],
        "no export named",
    );
}

// ---- allow-lists -------------------------------------------------------------------------

#[test]
fn allow_lists_hide_exports_from_clients_that_may_not_open_them() {
    let dir = tempfile::tempdir().unwrap();
    let certs = pki::make(&dir.path().join("pki"), "vdk test CA", "alice");
    let bob = dir.path().join("bob");
    pki::client_cert(&certs, &bob, "bob");
    let vdk = Vdk::serve_in(
        dir,
        &[
            "--export",
            "a=memory:16M",
            "--export",
            "b=memory:16M",
            "--export",
            "c=memory:16M",
            "--allow",
            "a=cert:alice",
            "--allow",
            "b=cert:bob.example", // bob's DNS name, not his common name
            "--allow",
            "c=unix",
            "--tls",
            "on",
            "--tls-certificates",
            certs.to_str().unwrap(),
            "--tls-verify-peer",
        ],
    );
    let list = |certs: Option<&Path>| {
        let uri = match certs {
            Some(c) => tls_uri(&vdk, "", c),
            None => vdk.uri(""),
        };
        let o = nbdinfo(&["--list", &uri]);
        assert!(o.status.success(), "{}", text(&o));
        listed(&o)
    };
    assert_eq!(list(Some(&certs)), ["a", "c"]);
    assert_eq!(list(Some(&bob)), ["b", "c"]);
    assert_eq!(list(None), ["c"]);
    // Not listed, and not opened by name either.
    let o = nbdinfo(&[&tls_uri(&vdk, "b", &certs)]);
    assert!(
        !o.status.success(),
        "alice opened bob's export: {}",
        text(&o)
    );
    let o = nbdinfo(&[&vdk.uri("a")]);
    assert!(!o.status.success(), "a plain client opened alice's export");
    let out = nbdsh(&tls_uri(&vdk, "a", &certs), ROUND_TRIP);
    assert!(text(&out).contains("round trip ok"), "{}", text(&out));
}

#[test]
fn address_rules_choose_by_client_network() {
    let dir = tempfile::tempdir().unwrap();
    let vdk = Vdk::serve_tcp(
        dir,
        &[
            "--export",
            "near=memory:16M",
            "--export",
            "far=memory:16M",
            "--allow",
            "near=127.0.0.0/8",
            "--allow",
            "far=10.0.0.0/8",
        ],
    );
    let tcp = format!("nbd://{}", vdk.tcp());
    let o = nbdinfo(&["--list", &tcp]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(listed(&o), ["near"]);
    assert!(!nbdinfo(&[&format!("{tcp}/far")]).status.success());
    assert!(nbdinfo(&[&format!("{tcp}/near")]).status.success());
    // Unix-socket clients have no address: neither rule lets them in.
    let o = nbdinfo(&["--list", &vdk.uri("")]);
    assert!(listed(&o).is_empty(), "{}", text(&o));
}

// ---- limits ------------------------------------------------------------------------------

#[test]
fn connections_per_address_are_limited() {
    let dir = tempfile::tempdir().unwrap();
    let vdk = Vdk::serve_tcp(
        dir,
        &["--memory", "16M", "--max-connections-per-address", "2"],
    );
    let addr = vdk.tcp();
    let mut first = TcpStream::connect(&addr).unwrap();
    let mut second = TcpStream::connect(&addr).unwrap();
    assert!(greeting(&mut first).is_some() && greeting(&mut second).is_some());
    let mut third = TcpStream::connect(&addr).unwrap();
    assert!(
        greeting(&mut third).is_none(),
        "a third connection was served"
    );
    // The Unix socket is another door: its clients are not counted per address.
    let o = nbdinfo(&[&vdk.uri("memory")]);
    assert!(o.status.success(), "{}", text(&o));
    drop(first);
    wait_for(10, "a free connection slot", || {
        TcpStream::connect(&addr)
            .ok()
            .and_then(|mut s| greeting(&mut s))
            .is_some()
    });
    assert!(vdk.log_has("connection refused"), "{}", vdk.log());
}

#[test]
fn a_handshake_has_a_deadline_however_slowly_bytes_come() {
    let dir = tempfile::tempdir().unwrap();
    let vdk = Vdk::serve_tcp(dir, &["--memory", "16M", "--handshake-timeout", "1"]);
    // Silent after the greeting.
    let mut silent = TcpStream::connect(vdk.tcp()).unwrap();
    greeting(&mut silent).unwrap();
    let t = Instant::now();
    assert!(closed_within(&mut silent, Duration::from_secs(5)));
    assert!(
        t.elapsed() >= Duration::from_millis(800),
        "{:?}",
        t.elapsed()
    );
    // A byte every 200 ms never lets a per-read time-out fire; the deadline still does.
    let mut slow = TcpStream::connect(vdk.tcp()).unwrap();
    greeting(&mut slow).unwrap();
    let t = Instant::now();
    let mut closed = false;
    while !closed && t.elapsed() < Duration::from_secs(6) {
        let _ = slow.write_all(&[0]);
        closed = closed_within(&mut slow, Duration::from_millis(200));
    }
    assert!(closed, "a slow handshake was never cut");
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "cut after {:?}",
        t.elapsed()
    );
    // And the server still serves.
    assert!(nbdinfo(&[&vdk.uri("memory")]).status.success());
}

#[test]
fn idle_connections_are_closed_and_busy_ones_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let vdk = Vdk::serve_in(dir, &["--memory", "16M", "--idle-timeout", "1"]);
    let busy = nbdsh(
        &vdk.uri("memory"),
        "import time\nfor i in range(15):\n    h.pread(4096, 0)\n    time.sleep(0.2)\nprint('busy ok')",
    );
    assert!(text(&busy).contains("busy ok"), "{}", text(&busy));
    let idle = nbdsh(
        &vdk.uri("memory"),
        "import time\nh.pread(4096, 0)\ntime.sleep(3)\ntry:\n    h.pread(4096, 0)\n    print('still served')\nexcept Exception as e:\n    print('closed:', e)",
    );
    assert!(text(&idle).contains("closed:"), "{}", text(&idle));
    assert!(vdk.log_has("idle too long"), "{}", vdk.log());
}

#[test]
fn clients_that_announce_data_and_send_none_cost_no_memory() {
    let dir = tempfile::tempdir().unwrap();
    common::sparse_file(&dir.path().join("file.img"), 1 << 30);
    // A RAM disk takes writes into its own buffers, a file through one buffer per connection:
    // both ways of receiving are covered.
    let vdk = Vdk::serve_tcp(
        dir,
        &[
            "--export",
            "big=memory:1G",
            "--export",
            "file=file.img",
            "--max-connections-per-address",
            "300",
        ],
    );
    let before = rss_kib(vdk.pid());
    // 200 connections each announce a 32 MiB write and send a few bytes of it.
    let mut stalled = Vec::new();
    for i in 0..200u64 {
        let mut s = raw_client(&vdk.tcp(), if i % 2 == 0 { "big" } else { "file" });
        let mut req = common::raw::request(common::raw::CMD_WRITE, i, i << 22, 32 << 20);
        req.extend_from_slice(&[0xab; 100]);
        s.write_all(&req).unwrap();
        stalled.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    // Everybody else is served meanwhile.
    let out = nbdsh(&vdk.uri("big"), ROUND_TRIP);
    assert!(text(&out).contains("round trip ok"), "{}", text(&out));
    let during = rss_kib(vdk.pid());
    let grown_mib = during.saturating_sub(before) / 1024;
    eprintln!("RSS before {before} KiB, with 200 stalled writers {during} KiB");
    // Eagerly allocated payloads would be 200 x 32 MiB = 6.4 GiB.
    assert!(grown_mib < 200, "RSS grew by {grown_mib} MiB");
    let out = nbdsh(&vdk.uri("file"), ROUND_TRIP);
    assert!(text(&out).contains("round trip ok"), "{}", text(&out));
    drop(stalled);
    assert!(nbdinfo(&[&vdk.uri("big")]).status.success());
}

// ---- the control socket ------------------------------------------------------------------

/// `vdk ARGS` run as `user` against the daemon `d`.
fn vdk_as(d: &common::Daemon, user: &str, args: &[&str]) -> Output {
    common::as_user(user, env!("CARGO_BIN_EXE_vdk"))
        .args(args)
        .env("VDK_SOCKET", &d.socket)
        .output()
        .expect("run setpriv")
}

fn uid_of(user: &str) -> u32 {
    stdout(Command::new("id").args(["-u", user]))
        .trim()
        .parse()
        .expect("uid")
}

#[test]
fn the_control_socket_takes_its_owner_only_and_checks_the_owners_paths() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    common::need_root();
    let user = "tests"; // made by scripts/install-test-deps.sh
    let uid = uid_of(user);
    let d = common::Daemon::new();
    let perm = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    perm(d.dir.path(), 0o711);
    d.start(&["--owner", user]);
    let sock = std::fs::metadata(&d.socket).unwrap();
    assert_eq!(sock.mode() & 0o777, 0o600, "control socket mode");
    assert_eq!(sock.uid(), uid, "control socket owner");
    let home = d.path("home");
    std::fs::create_dir(&home).unwrap();
    run(Command::new("chown").arg(user).arg(&home));
    // The owner opens its own files; what the daemon creates for it is its own.
    let mine = home.join("mine.img");
    let o = vdk_as(
        &d,
        user,
        &["open", mine.to_str().unwrap(), "16M", "--attach", "none"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::metadata(&mine).unwrap().uid(), uid);
    // Not what it could not open itself: a root-only file, the same through a symbolic
    // link, a device node, a directory it may not enter.
    let secret = d.path("secret.img");
    std::fs::write(&secret, vec![0u8; 1 << 20]).unwrap();
    perm(&secret, 0o600);
    let link = home.join("link.img");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    let dev = d.path("loop0");
    run(Command::new("mknod")
        .args(["-m", "600"])
        .arg(&dev)
        .args(["b", "7", "0"]));
    let locked = d.path("locked");
    std::fs::create_dir(&locked).unwrap();
    perm(&locked, 0o700);
    // Readable and writable by all, in a directory only root may enter.
    let inside = locked.join("open.img");
    std::fs::write(&inside, vec![0u8; 1 << 20]).unwrap();
    perm(&inside, 0o666);
    for (path, says) in [
        (&secret, "you may not read and write it"),
        (&link, "you may not read and write it"),
        (&dev, "you may not read and write it"),
        (&inside, "not searchable"),
    ] {
        let o = vdk_as(
            &d,
            user,
            &["open", path.to_str().unwrap(), "1M", "--attach", "none"],
        );
        assert!(
            !o.status.success(),
            "{} was opened for {user}",
            path.display()
        );
        assert!(text(&o).contains(says), "{}: {}", path.display(), text(&o));
    }
    let o = vdk_as(
        &d,
        user,
        &[
            "open",
            secret.to_str().unwrap(),
            "--read-only",
            "--attach",
            "none",
        ],
    );
    assert!(text(&o).contains("you may not read it"), "{}", text(&o));
    // An image of the user's own whose header names the secret as its backing file.
    let evil = home.join("evil.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&secret)
        .arg(&evil));
    run(Command::new("chown").arg(user).arg(&evil));
    let o = vdk_as(
        &d,
        user,
        &["open", evil.to_str().unwrap(), "--attach", "none"],
    );
    assert!(
        !o.status.success(),
        "a backing file of root's was opened for {user}"
    );
    assert!(
        text(&o).contains("secret.img: you may not read it"),
        "{}",
        text(&o)
    );
    let o = vdk_as(&d, user, &["daemon", "--stop"]);
    assert!(
        text(&o).contains("only the daemon's own user or root"),
        "{}",
        text(&o)
    );
    // Another user: kept out by the socket's mode, and by SO_PEERCRED if the mode is opened.
    let o = vdk_as(&d, "nobody", &["list"]);
    assert!(!o.status.success(), "{}", text(&o));
    perm(&d.socket, 0o666);
    let o = vdk_as(&d, "nobody", &["list"]);
    assert!(
        text(&o).contains("takes no requests from uid"),
        "{}",
        text(&o)
    );
    // Root still manages it, and sees the owner's disk.
    assert!(d.ok(&["list"]).contains("mine.img"));
}

#[test]
fn hundreds_of_idle_connections_cost_bounded_memory_and_nobody_elses_service() {
    let dir = tempfile::tempdir().unwrap();
    let vdk = Vdk::serve_tcp(dir, &["--memory", "64M"]);
    let before = rss_kib(vdk.pid());
    // 600 connections from one address: 256 (the default limit) are served and sit silent
    // after the greeting, the rest are turned away at accept.
    let mut held = Vec::new();
    let mut greeted = 0;
    for _ in 0..600 {
        let mut s = TcpStream::connect(vdk.tcp()).unwrap();
        if greeting(&mut s).is_some() {
            greeted += 1;
            held.push(s);
        }
    }
    assert_eq!(greeted, 256, "connections served from one address");
    let out = nbdsh(&vdk.uri("memory"), ROUND_TRIP);
    assert!(text(&out).contains("round trip ok"), "{}", text(&out));
    let grown_mib = rss_kib(vdk.pid()).saturating_sub(before) / 1024;
    eprintln!("RSS grew by {grown_mib} MiB with 256 idle connections");
    assert!(grown_mib < 200, "RSS grew by {grown_mib} MiB");
    drop(held);
}

#[test]
fn what_a_connection_has_in_flight_is_bounded_whatever_it_pipelines() {
    let dir = tempfile::tempdir().unwrap();
    // Every write waits 2 s on the disk: what the client sends piles up in the server.
    let vdk = Vdk::serve_tcp(
        dir,
        &["--memory", "2G", "--filter", "delay:op=write,ms=2000"],
    );
    let before = rss_kib(vdk.pid());
    let s = raw_client(&vdk.tcp(), "memory");
    let stop = s.try_clone().unwrap();
    // 48 writes of 32 MiB (1.5 GiB) as fast as the socket takes them.
    let sender = std::thread::spawn(move || {
        let mut s = s;
        let data = vec![0x5a; 32 << 20];
        for i in 0..48u64 {
            let req = common::raw::request(common::raw::CMD_WRITE, i, i << 25, 32 << 20);
            if s.write_all(&req).and_then(|()| s.write_all(&data)).is_err() {
                return i;
            }
        }
        48
    });
    std::thread::sleep(Duration::from_secs(3));
    let during = rss_kib(vdk.pid());
    let grown_mib = during.saturating_sub(before) / 1024;
    eprintln!("RSS grew by {grown_mib} MiB while a client pipelined 1.5 GiB of slow writes");
    // 128 MiB may be queued for the workers, plus the buffers being filled and the disk's
    // own pages for what was written.
    assert!(grown_mib < 400, "RSS grew by {grown_mib} MiB");
    // Others are not held up by it.
    let o = nbdinfo(&[&vdk.uri("memory")]);
    assert!(o.status.success(), "{}", text(&o));
    stop.shutdown(std::net::Shutdown::Both).unwrap();
    let sent = sender.join().unwrap();
    assert!(
        sent < 48,
        "the server took all 1.5 GiB in 3 s without back-pressure"
    );
}

#[test]
fn the_daemon_serves_its_disks_over_tls_with_allow_lists() {
    let d = common::Daemon::new();
    let certs = pki::make(&d.path("pki"), "vdk test CA", "alice");
    d.start(&[
        "--tls",
        "require",
        "--tls-certificates",
        certs.to_str().unwrap(),
        "--tls-verify-peer",
    ]);
    let open = |name: &str, extra: &[&str]| {
        let img = d.path(name);
        let mut args = vec![img.to_str().unwrap().to_owned(), "16M".into()];
        args.extend(["--attach", "none"].map(String::from));
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        d.open(&args)["nbd"][0].as_str().unwrap().to_owned()
    };
    let mine = open("alice.img", &["--allow", "cert:alice"]);
    let theirs = open("bob.img", &["--allow", "cert:bob"]);
    let tls = |plain: &str| {
        format!(
            "{}&tls-certificates={}",
            plain.replacen("nbd+unix", "nbds+unix", 1),
            certs.display()
        )
    };
    assert!(!nbdinfo(&[&mine]).status.success(), "plain client served");
    let o = nbdsh(&tls(&mine), ROUND_TRIP);
    assert!(text(&o).contains("round trip ok"), "{}", text(&o));
    assert!(
        !nbdinfo(&[&tls(&theirs)]).status.success(),
        "alice opened bob's disk"
    );
    let bad = d
        .cmd(&[
            "open",
            d.path("x.img").to_str().unwrap(),
            "--allow",
            "10.0.0.0/99",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid allow rule"));
}

#[test]
fn single_mode_serves_one_client_on_its_standard_input() {
    need("nbdsh");
    // libnbd starts the server itself with a socket as its stdin and stdout (inetd style).
    let code = format!(
        "h.connect_command([{:?}, 'serve', '-s', '--memory', '16M'])\n{ROUND_TRIP}",
        env!("CARGO_BIN_EXE_vdk")
    );
    let o = Command::new("nbdsh")
        .args(["-c", &code])
        .env("PATH", path_env())
        .output()
        .expect("run nbdsh");
    assert!(text(&o).contains("round trip ok"), "{}", text(&o));
    // Anything but a socket on stdin is a clear error.
    let o = Command::new(env!("CARGO_BIN_EXE_vdk"))
        .args(["serve", "-s", "--memory", "1M"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        text(&o).contains("standard input is not a socket"),
        "{}",
        text(&o)
    );
}

/// The daemon's own connections for the kernel's NBD client (socket pairs inside the process)
/// negotiate in the clear on a server that requires TLS of everyone else, who is refused, and
/// reach an export whose allow-list names only other clients.
#[test]
fn own_socket_pairs_skip_tls_and_allow_lists_that_bind_everyone_else() {
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let certs = pki::make(&dir.path().join("pki"), "vdk test CA", "alice");
    let tls = vdk_nbd::Tls::new(vdk_nbd::TlsMode::Require, &certs, false).unwrap();
    let config = vdk_nbd::ServerConfig {
        tls: Some(Arc::new(tls)),
        ..vdk_nbd::ServerConfig::default()
    };
    let disk = Arc::new(vdk_backends::MemoryDisk::new(1 << 20));
    let mut locked = vdk_nbd::Export::new("locked", disk.clone());
    locked.allow = vec!["192.0.2.7".parse().unwrap()];
    let exports = vec![vdk_nbd::Export::new("ram", disk), locked];
    let server = vdk_nbd::Server::new(exports, config);
    for name in ["ram", "locked"] {
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        server.spawn_own_connection(theirs);
        let chosen = vdk_nbd::client::go(&mut ours, name).unwrap();
        assert_eq!(chosen.size, 1 << 20);
    }
    let (mut plain, theirs) = UnixStream::pair().unwrap();
    server.spawn_connection(vdk_nbd::Stream::Unix(theirs));
    let e = vdk_nbd::client::go(&mut plain, "ram").unwrap_err();
    assert!(e.to_string().to_lowercase().contains("tls"), "{e}");
    // Without TLS required, a Unix client the allow-list leaves out is still refused.
    let open = vdk_nbd::Server::new(
        vec![{
            let mut e =
                vdk_nbd::Export::new("locked", Arc::new(vdk_backends::MemoryDisk::new(4096)));
            e.allow = vec!["192.0.2.7".parse().unwrap()];
            e
        }],
        vdk_nbd::ServerConfig::default(),
    );
    let (mut other, theirs) = UnixStream::pair().unwrap();
    open.spawn_connection(vdk_nbd::Stream::Unix(theirs));
    assert!(vdk_nbd::client::go(&mut other, "locked").is_err());
}
