//! Disks in object storage against real S3-protocol servers on loopback (moto_server and
//! s3s-fs, both installed by scripts/install-test-deps.sh): the conformance suite, NBD
//! clients, ext4 through the loop attach, kill -9, a second writer, a lost lease, and the
//! server going away mid-run.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::s3::{ACCESS_KEY, S3, SECRET_KEY};
use common::{is_mounted, need, need_root, run, stdout, Daemon};
use vdk_core::{conformance, BlockDevice};

const MIB: u64 = 1 << 20;

fn vdk(s3: &S3) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vdk"));
    c.envs(s3.env()).env_remove("RUST_LOG");
    c
}

fn store(s3: &S3) -> vdk_objstore::StoreOptions {
    vdk_objstore::StoreOptions {
        endpoint: Some(s3.endpoint()),
        credentials: Some((ACCESS_KEY.into(), SECRET_KEY.into())),
        ..Default::default()
    }
}

fn create(s3: &S3, name: &str, size: u64, chunk: u64) -> String {
    let url = s3.url(name);
    let opts = vdk_objstore::CreateOptions {
        chunk_size: chunk,
        store: store(s3),
        ..vdk_objstore::CreateOptions::new(size)
    };
    vdk_objstore::create(&url, &opts).unwrap();
    url
}

fn open(s3: &S3, url: &str, cache: &Path) -> vdk_objstore::ObjectDisk {
    let opts = vdk_objstore::OpenOptions {
        cache_dir: Some(cache.to_owned()),
        store: store(s3),
        ..Default::default()
    };
    vdk_objstore::ObjectDisk::open(url, &opts).unwrap()
}

#[test]
fn object_disks_on_moto_and_s3s_fs_conform() {
    for s3 in [S3::moto(), S3::s3s_fs()] {
        let n = AtomicU32::new(0);
        conformance::run(&|| {
            let url = create(
                &s3,
                &format!("c{}", n.fetch_add(1, Ordering::Relaxed)),
                conformance::MIN_SIZE,
                64 << 10,
            );
            let cache = tempfile::tempdir().unwrap().keep();
            Arc::new(open(&s3, &url, &cache))
        });
    }
}

/// `vdk serve URL` on NBD in the background.
struct Served {
    child: std::process::Child,
    pub uri: String,
    dir: tempfile::TempDir,
}

impl Served {
    fn start(s3: &S3, url: &str, cache: &Path, extra: &[&str]) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let log = std::fs::File::create(dir.path().join("vdk.log")).unwrap();
        let child = vdk(s3)
            .args(["serve", url, "--listen"])
            .arg(format!("unix://{}", sock.display()))
            .arg("--cache")
            .arg(cache)
            .args(extra)
            .stderr(log)
            .spawn()
            .unwrap();
        common::wait_for(20, "vdk serve listens", || sock.exists());
        let name = url.rsplit('/').next().unwrap();
        Served {
            child,
            uri: format!("nbd+unix:///{name}?socket={}", sock.display()),
            dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("vdk.log")).unwrap_or_default()
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn stop(mut self) -> String {
        let pid = self.child.id().to_string();
        run(Command::new("kill").args(["-TERM", &pid]));
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "vdk serve exited {status}:\n{}",
            self.log()
        );
        self.log()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        // A failed test leaves no server behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// qemu-io on a read-only export.
fn qemu_io_ro(uri: &str, cmds: &[&str]) -> String {
    qemu_io_with(&["-r"], uri, cmds)
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    qemu_io_with(&[], uri, cmds)
}

fn qemu_io_with(flags: &[&str], uri: &str, cmds: &[&str]) -> String {
    need("qemu-io");
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]).args(flags);
    for x in cmds {
        c.args(["-c", x]);
    }
    stdout(c.arg(uri))
}

#[test]
fn nbd_clients_see_what_they_wrote_and_a_fresh_cache_reads_it_back() {
    need("nbdinfo");
    let s3 = S3::moto();
    let url = s3.url("d");
    run(vdk(&s3).args(["create", &url, "64M", "--chunk-size", "1M"]));
    let info = stdout(vdk(&s3).args(["info", "--json", &url]));
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        (v["virtual-size"].as_u64(), v["cluster-size"].as_u64()),
        (Some(64 * MIB), Some(MIB))
    );
    assert_eq!(
        v["format-specific"]["data"]["chunks-stored"], 0,
        "a new disk costs nothing"
    );
    let c1 = tempfile::tempdir().unwrap();
    let srv = Served::start(&s3, &url, c1.path(), &[]);
    let shown = stdout(Command::new("nbdinfo").arg(&srv.uri));
    assert!(shown.contains("67108864"), "{shown}");
    qemu_io(
        &srv.uri,
        &["write -P 0xa5 3M 5M", "write -P 0x5a 40M 64k", "flush"],
    );
    qemu_io(&srv.uri, &["read -P 0xa5 3M 5M", "read -P 0 8M 32M"]);
    // Zeroes over whole chunks delete them.
    qemu_io(&srv.uri, &["write -z 4M 2M", "flush"]);
    srv.stop();
    let v: serde_json::Value =
        serde_json::from_str(&stdout(vdk(&s3).args(["info", "--json", &url]))).unwrap();
    assert_eq!(
        v["format-specific"]["data"]["chunks-stored"], 4,
        "chunks 3, 6, 7 and 40 hold data: {v}"
    );
    assert_eq!(
        v["format-specific"]["data"]["writer"],
        serde_json::Value::Null,
        "the lease was given up at exit"
    );
    let c2 = tempfile::tempdir().unwrap();
    let srv = Served::start(&s3, &url, c2.path(), &["--read-only"]);
    qemu_io_ro(
        &srv.uri,
        &[
            "read -P 0xa5 3M 1M",
            "read -P 0 4M 2M",
            "read -P 0xa5 6M 2M",
            "read -P 0x5a 40M 64k",
        ],
    );
    // qemu-img map sees the holes the bucket has.
    need("qemu-img");
    let map =
        stdout(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &srv.uri]));
    let runs: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    let data: u64 = runs
        .iter()
        .filter(|r| r["data"] == true)
        .map(|r| r["length"].as_u64().unwrap())
        .sum();
    assert_eq!(data, 4 * MIB, "{map}");
    srv.stop();
}

#[test]
fn a_second_writer_is_refused_by_name_and_readers_share_the_disk() {
    let s3 = S3::s3s_fs();
    let url = create(&s3, "shared", 16 * MIB, 1 << 20);
    let c = tempfile::tempdir().unwrap();
    let writer = Served::start(&s3, &url, &c.path().join("w"), &[]);
    qemu_io(&writer.uri, &["write -P 7 0 1M", "flush"]);
    let out = vdk(&s3)
        .args(["serve", &url, "--listen", "tcp://127.0.0.1:0", "--cache"])
        .arg(c.path().join("w2"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let pid = writer.child.id();
    assert!(
        err.contains(&format!("pid {pid}")) && err.contains("open it read-only"),
        "{err}"
    );
    let r1 = Served::start(&s3, &url, &c.path().join("r1"), &["--read-only"]);
    let r2 = Served::start(&s3, &url, &c.path().join("r2"), &["--read-only"]);
    qemu_io_ro(&r1.uri, &["read -P 7 0 1M"]);
    qemu_io_ro(&r2.uri, &["read -P 7 0 1M"]);
    let info = stdout(vdk(&s3).args(["info", &url]));
    assert!(
        info.contains("writer: ") && info.contains(&format!("pid {pid}")),
        "{info}"
    );
    r1.stop();
    r2.stop();
    writer.stop();
}

#[test]
fn kill9_loses_nothing_that_was_flushed_and_the_cache_recovers_the_rest() {
    let s3 = S3::moto();
    let url = create(&s3, "crash", 64 * MIB, 1 << 20);
    let c = tempfile::tempdir().unwrap();
    let cache = c.path().join("cache");
    // Writeback waits a minute: what is not flushed stays in the cache until the crash.
    let lazy = ["--writeback-delay", "60"];
    let srv = Served::start(&s3, &url, &cache, &lazy);
    qemu_io(&srv.uri, &["write -P 0x11 0 8M", "flush"]);
    // nbdsh writes and does not flush (qemu-io would, as it closes).
    nbdsh(
        &srv.uri,
        "h.pwrite(b'\\x22' * (8 << 20), 16 << 20); h.pwrite(b'\\x33' * (1 << 20), 0)",
    );
    srv.kill9();
    // A fresh cache: the bucket has what was flushed, and not what was not.
    let other = Served::start(&s3, &url, &c.path().join("other"), &["--read-only"]);
    qemu_io_ro(&other.uri, &["read -P 0x11 0 8M", "read -P 0 16M 8M"]);
    other.stop();
    // The crashed writer's cache: what it acknowledged is uploaded at the next open, and the
    // lease of the dead process is taken at once.
    let srv = Served::start(&s3, &url, &cache, &lazy);
    qemu_io(
        &srv.uri,
        &[
            "read -P 0x33 0 1M",
            "read -P 0x11 1M 7M",
            "read -P 0x22 16M 8M",
        ],
    );
    let log = srv.stop();
    assert!(log.contains("uploaded what a stopped writer left"), "{log}");
    let fresh = Served::start(&s3, &url, &c.path().join("fresh"), &["--read-only"]);
    qemu_io_ro(&fresh.uri, &["read -P 0x33 0 1M", "read -P 0x22 16M 8M"]);
    fresh.stop();
    // Or, by choice, dropped: the disk as its last flush left it.
    let srv = Served::start(&s3, &url, &cache, &lazy);
    nbdsh(&srv.uri, "h.pwrite(b'\\x44' * (1 << 20), 0)");
    srv.kill9();
    let srv = Served::start(&s3, &url, &cache, &["--discard-unflushed"]);
    qemu_io(&srv.uri, &["read -P 0x33 0 1M"]);
    let log = srv.stop();
    assert!(log.contains("dropped"), "{log}");
}

fn nbdsh(uri: &str, script: &str) {
    need("nbdsh");
    run(Command::new("nbdsh").args(["-u", uri, "-c", script]));
}

#[test]
fn a_lost_lease_stops_writes_with_eio() {
    let s3 = S3::moto();
    let url = create(&s3, "lease", 4 * MIB, 1 << 20);
    let c = tempfile::tempdir().unwrap();
    let opts = vdk_objstore::OpenOptions {
        cache_dir: Some(c.path().to_owned()),
        store: store(&s3),
        lease_ttl: Duration::from_millis(1500),
        ..Default::default()
    };
    let d = vdk_objstore::ObjectDisk::open(&url, &opts).unwrap();
    d.write_at(b"mine", 0, true).unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    d.write_at(b"kept", 0, true).unwrap();
    // Another host takes the lease over (as after a network partition).
    let rec = br#"{"holder":"admin@elsewhere pid 1","id":"x","host":"elsewhere","pid":1,"expires":99999999999}"#;
    let loc = vdk_objstore::Location::parse(&url, &store(&s3), false).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use object_store::ObjectStoreExt;
        let key = loc.key("vdk-lease.json");
        loc.store.put(&key, rec.to_vec().into()).await.unwrap();
    });
    std::thread::sleep(Duration::from_millis(1200));
    let e = d.write_at(b"no!!", 0, false).unwrap_err();
    assert_eq!(e.errno(), vdk_core::Errno::Io);
    assert!(format!("{e:?}").contains("admin@elsewhere"), "{e:?}");
    assert!(d.flush().is_ok(), "nothing was left to upload");
    d.write_at(b"no!!", 8, false).unwrap_err();
    drop(d);
    let again = vdk_objstore::OpenOptions {
        cache_dir: Some(c.path().join("again")),
        store: store(&s3),
        ..Default::default()
    };
    let e = vdk_objstore::ObjectDisk::open(&url, &again).unwrap_err();
    assert!(e.to_string().contains("admin@elsewhere"), "{e}");
    // What the lost writer acknowledged before is in the bucket.
    let ro = vdk_objstore::OpenOptions {
        read_only: true,
        ..again
    };
    let r = vdk_objstore::ObjectDisk::open(&url, &ro).unwrap();
    let mut b = [0u8; 4];
    r.read_at(&mut b, 0).unwrap();
    assert_eq!(&b, b"kept");
}

#[test]
fn the_server_going_away_mid_run_means_waits_or_errors_never_corruption() {
    let mut s3 = S3::s3s_fs();
    let url = create(&s3, "flaky", 32 * MIB, 1 << 20);
    let c = tempfile::tempdir().unwrap();
    let srv = Served::start(&s3, &url, &c.path().join("c"), &[]);
    qemu_io(&srv.uri, &["write -P 0x61 0 8M", "flush"]);
    s3.stop();
    // Writes land in the cache; the flush waits for the server (retrying) ...
    let uri = srv.uri.clone();
    let writer = std::thread::spawn(move || {
        let mut c = Command::new("qemu-io");
        c.args([
            "-f",
            "raw",
            "-c",
            "write -P 0x62 8M 8M",
            "-c",
            "flush",
            &uri,
        ]);
        c.output().unwrap()
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !writer.is_finished(),
        "the flush cannot have reached a stopped server"
    );
    // ... and completes once it is back.
    s3.start();
    let out = writer.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    qemu_io(&srv.uri, &["read -P 0x61 0 8M", "read -P 0x62 8M 8M"]);
    srv.stop();
    let fresh = Served::start(&s3, &url, &c.path().join("fresh"), &["--read-only"]);
    qemu_io_ro(
        &fresh.uri,
        &[
            "read -P 0x61 0 8M",
            "read -P 0x62 8M 8M",
            "read -P 0 16M 16M",
        ],
    );
    fresh.stop();
}

#[test]
fn compressed_and_encrypted_chunks_are_opaque_in_the_bucket() {
    let s3 = S3::s3s_fs();
    let url = s3.url("secret");
    let c = tempfile::tempdir().unwrap();
    let key = c.path().join("key");
    std::fs::write(&key, "6a".repeat(32) + "\n").unwrap();
    let keyarg = key.to_str().unwrap();
    run(vdk(&s3)
        .args([
            "create",
            &url,
            "8M",
            "--chunk-size",
            "1M",
            "--compression",
            "zstd",
        ])
        .args(["--encryption", "aes-256-gcm", "--key-file", keyarg]));
    let srv = Served::start(&s3, &url, &c.path().join("c1"), &["--key-file", keyarg]);
    qemu_io(&srv.uri, &["write -P 0x41 0 1M", "flush"]);
    srv.stop();
    let stored = std::fs::read(s3.object_file("secret/chunks/0000000000000000")).unwrap();
    assert!(
        stored.len() < 64 << 10,
        "compressed: {} bytes",
        stored.len()
    );
    assert!(
        !stored.windows(8).any(|w| w == b"AAAAAAAA"),
        "the plain bytes show"
    );
    let srv = Served::start(
        &s3,
        &url,
        &c.path().join("c2"),
        &["--key-file", keyarg, "--read-only"],
    );
    qemu_io_ro(&srv.uri, &["read -P 0x41 0 1M"]);
    srv.stop();
    let wrong = c.path().join("wrong");
    std::fs::write(&wrong, "00".repeat(32)).unwrap();
    let out = vdk(&s3).args(["info", &url]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("aes-256-gcm"));
    let out = vdk(&s3)
        .args([
            "serve",
            &url,
            "--key-file",
            wrong.to_str().unwrap(),
            "--cache",
        ])
        .arg(c.path().join("c3"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("the key does not open this disk"),
        "{err}"
    );
    let out = vdk(&s3)
        .args(["serve", &url, "--cache"])
        .arg(c.path().join("c4"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--key-file"), "{err}");
}

#[test]
fn convert_to_and_from_the_bucket() {
    need("qemu-img");
    let s3 = S3::moto();
    let c = tempfile::tempdir().unwrap();
    let src = c.path().join("src.img");
    run(Command::new("qemu-img").args(["create", "-f", "raw", src.to_str().unwrap(), "40M"]));
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x99 5M 3M",
        "-c",
        "write -P 0x17 30M 1M",
        src.to_str().unwrap(),
    ]));
    let url = s3.url("converted");
    run(vdk(&s3)
        .args([
            "convert",
            src.to_str().unwrap(),
            &url,
            "--chunk-size",
            "1M",
            "--cache",
        ])
        .arg(c.path().join("cache")));
    let v: serde_json::Value =
        serde_json::from_str(&stdout(vdk(&s3).args(["info", "--json", &url]))).unwrap();
    assert_eq!(v["virtual-size"], 40 * MIB);
    assert_eq!(
        v["format-specific"]["data"]["chunks-stored"], 4,
        "only the data went up: {v}"
    );
    let back = c.path().join("back.qcow2");
    run(vdk(&s3)
        .args([
            "convert",
            &url,
            back.to_str().unwrap(),
            "-O",
            "qcow2",
            "--cache",
        ])
        .arg(c.path().join("cache2")));
    run(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        src.to_str().unwrap(),
        back.to_str().unwrap(),
    ]));
    let out = vdk(&s3)
        .args(["convert", src.to_str().unwrap(), &url])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("exists"), "{err}");
    let out = vdk(&s3)
        .args(["info", &s3.url("nothing")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("vdk create"), "{err}");
}

fn tree(seed: u64) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for i in 0..12u64 {
        let len = ((i * 7919 + seed) % 3000) as usize * 1024 + 17;
        let data: Vec<u8> = (0..len)
            .map(|j| ((j as u64 * 31 + i * 131 + seed) % 251) as u8)
            .collect();
        let name = if i % 3 == 0 {
            format!("dir {}/sub/file-{i}.bin", i % 2)
        } else {
            format!("file-{i}.bin")
        };
        files.push((name, data));
    }
    files
}

#[test]
fn ext4_on_a_bucket_disk_through_the_loop_attach_survives_close_and_a_clean_cache() {
    need_root();
    need("mkfs.ext4");
    need("fsck.ext4");
    let s3 = S3::s3s_fs();
    let d = Daemon::new();
    let url = s3.url("ext4");
    let mnt = d.path("mnt");
    let daemon = |args: &[&str]| -> serde_json::Value {
        let mut c = d.cmd(args);
        c.envs(s3.env()).arg("--json");
        serde_json::from_str(&stdout(&mut c)).unwrap()
    };
    let opened = daemon(&[
        "open",
        &url,
        "128M",
        "--mkfs",
        "ext4",
        "--mount",
        mnt.to_str().unwrap(),
        "--cache",
        d.path("c1").to_str().unwrap(),
    ]);
    assert!(is_mounted(&mnt), "{opened}");
    let files = tree(5);
    for (name, data) in &files {
        let p = mnt.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
    }
    let id = opened["id"].as_str().unwrap().to_owned();
    let listed = daemon(&["list"]);
    assert_eq!(listed[0]["image"], url.as_str(), "{listed}");
    daemon(&["close", &id]);
    assert!(!is_mounted(&mnt));
    let info: serde_json::Value =
        serde_json::from_str(&stdout(vdk(&s3).args(["info", "--json", &url]))).unwrap();
    assert!(
        info["format-specific"]["data"]["chunks-stored"]
            .as_u64()
            .unwrap()
            > 1,
        "{info}"
    );
    // Another cache, empty: everything comes from the bucket.
    let mnt2 = d.path("mnt2");
    let again = daemon(&[
        "open",
        &url,
        "--mount",
        mnt2.to_str().unwrap(),
        "--cache",
        d.path("c2").to_str().unwrap(),
    ]);
    for (name, data) in &files {
        let got = std::fs::read(mnt2.join(name)).unwrap();
        assert!(&got == data, "{name} differs after the reopen");
    }
    daemon(&["unmount", again["id"].as_str().unwrap()]);
    let dev = again["block_device"].as_str().unwrap().to_owned();
    run(Command::new("fsck.ext4").args(["-f", "-n", &dev]));
    daemon(&["close", again["id"].as_str().unwrap()]);
}
