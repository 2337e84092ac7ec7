//! Disks the system sees: `vdk open` / `close` / `list` / `mount` through the daemon, with
//! block devices from the fuse-loop attach, real file systems (mkfs, mount, fsck), fsx, and
//! the failures a user meets. Most need root (loop devices, mounts).
#![allow(clippy::cast_possible_truncation)] // test sizes are small constants

mod common;

use std::fs;
use std::io::{BufRead, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{is_mounted, need, need_root, pattern, run, wait_for, Daemon};

const MIB: usize = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A tree of files of varied sizes under `dir`, each with content derived from its index.
fn write_tree(dir: &Path, seed: u8) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    for i in 0..24usize {
        let sub = dir.join(format!("d{}/e{}", i % 4, i % 3));
        fs::create_dir_all(&sub).unwrap();
        let len = [0, 1, 511, 4096, 65_537, 300_000, MIB + 3][i % 7];
        let data = pattern(len, seed.wrapping_add(i as u8));
        let path = sub.join(format!("f{i}.bin"));
        fs::write(&path, &data).unwrap();
        files.push((path, data));
    }
    files
}

fn check_tree(files: &[(PathBuf, Vec<u8>)], root_then: &Path, root_now: &Path) {
    for (path, data) in files {
        let now = root_now.join(path.strip_prefix(root_then).unwrap());
        let got = fs::read(&now).unwrap_or_else(|e| panic!("{}: {e}", now.display()));
        assert!(got == *data, "{} differs after reopening", now.display());
    }
}

fn fsck_clean(image: &Path) {
    need("fsck.ext4");
    run(Command::new("fsck.ext4").args(["-f", "-n", s(image)]));
}

fn field<'a>(v: &'a serde_json::Value, name: &str) -> &'a str {
    v[name].as_str().unwrap_or_else(|| panic!("{name} in {v}"))
}

#[test]
fn mkfs_mount_close_reopen_keeps_every_file() {
    need_root();
    need("mkfs.ext4");
    let d = Daemon::new();
    let image = d.path("data.img");
    let mnt = d.path("mnt");
    let opened = d.open(&[s(&image), "64M", "--mkfs", "ext4", "--mount", s(&mnt)]);
    let id = field(&opened, "id").to_owned();
    assert_eq!(opened["size"], 64 * MIB as u64);
    assert!(field(&opened, "block_device").starts_with("/dev/loop"));
    assert_eq!(field(&opened, "mount"), s(&mnt));
    assert!(is_mounted(&mnt));
    let mode = fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the control socket is its owner's only");
    let files = write_tree(&mnt, 7);

    // The id is stable: the same image, opened again later, has the same one.
    let listed = d.json(&["list"]);
    assert_eq!(listed[0]["id"], id.as_str());
    assert!(listed[0]["stats"]["writes"].as_u64().unwrap() > 0);
    let table = d.ok(&["list"]);
    assert!(table.contains(&id) && table.contains("64 MiB"), "{table}");

    let closed = d.json(&["close", &id]);
    assert_eq!(closed["id"], id.as_str());
    assert_eq!(closed["mount"], s(&mnt), "close reports the disk as it was");
    assert!(!is_mounted(&mnt));
    assert_eq!(d.json(&["list"]), serde_json::json!([]));
    fsck_clean(&image);

    let mnt2 = d.path("again");
    let reopened = d.open(&[s(&image), "--mount", s(&mnt2)]);
    assert_eq!(field(&reopened, "id"), id);
    check_tree(&files, &mnt, &mnt2);
    d.ok(&["close", s(&image)]);
    fsck_clean(&image);
}

#[test]
fn new_image_defaults_to_100_mib_and_other_file_systems_format() {
    need_root();
    need("mkfs.xfs");
    need("mkfs.vfat");
    let d = Daemon::new();
    let plain = d.open(&[s(&d.path("plain.img"))]);
    assert_eq!(plain["size"], 100 * MIB as u64);
    assert_eq!(fs::metadata(d.path("plain.img")).unwrap().len(), 100 << 20);
    // Sparse: a new image costs (almost) nothing on disk.
    let used = std::os::unix::fs::MetadataExt::blocks(&fs::metadata(d.path("plain.img")).unwrap());
    assert!(
        used * 512 < MIB as u64,
        "new image uses {} bytes",
        used * 512
    );
    let mnt = d.path("m-xfs");
    let img = d.path("xfs.img");
    let v = d.open(&[s(&img), "300M", "--mkfs", "xfs", "--mount", s(&mnt)]);
    fs::write(mnt.join("hello.txt"), b"hello").unwrap();
    d.ok(&["unmount", field(&v, "id")]);
    assert!(!is_mounted(&mnt));
    // mount finds the file system by itself.
    d.ok(&["mount", field(&v, "id"), s(&mnt)]);
    assert_eq!(fs::read(mnt.join("hello.txt")).unwrap(), b"hello");
    d.ok(&["close", field(&v, "id")]);

    // vfat: formatted; this kernel has no vfat driver, and mounting says so.
    let img = d.path("vfat.img");
    let v = d.open(&[s(&img), "64M", "--mkfs", "vfat"]);
    let head = fs::read(&img).unwrap();
    assert_eq!(&head[510..512], b"\x55\xaa", "a FAT boot sector");
    let vfat_driver = fs::read_to_string("/proc/filesystems")
        .unwrap()
        .contains("vfat");
    if !vfat_driver {
        let err = d.fails(&["mount", field(&v, "id"), s(&d.path("m-vfat"))]);
        assert!(
            err.contains("no file system") || err.contains("no vfat driver"),
            "{err}"
        );
    } else {
        let mnt = d.path("m-vfat");
        d.ok(&["mount", field(&v, "id"), s(&mnt)]);
        fs::write(mnt.join("hello.txt"), b"hello").unwrap();
        d.ok(&["unmount", field(&v, "id")]);
    }
    d.ok(&["close", field(&v, "id")]);
    d.ok(&["close", field(&plain, "id")]);
}

#[test]
fn four_disks_at_once_with_parallel_io() {
    need_root();
    need("mkfs.ext4");
    let d = Daemon::new();
    let disks: Vec<(String, PathBuf, PathBuf)> = (0..4)
        .map(|i| {
            let img = d.path(&format!("disk{i}.img"));
            let mnt = d.path(&format!("mnt{i}"));
            let v = d.open(&[s(&img), "48M", "--mkfs", "ext4", "--mount", s(&mnt)]);
            (field(&v, "id").to_owned(), img, mnt)
        })
        .collect();
    let devices: Vec<String> = d
        .json(&["list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| field(v, "block_device").to_owned())
        .collect();
    let mut unique = devices.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 4, "four different block devices: {devices:?}");
    thread::scope(|sc| {
        for (i, (_, _, mnt)) in disks.iter().enumerate() {
            sc.spawn(move || {
                for round in 0..4u8 {
                    let data = pattern(4 * MIB, (i as u8) << 4 | round);
                    let path = mnt.join(format!("r{round}"));
                    let mut f = fs::File::create(&path).unwrap();
                    f.write_all(&data).unwrap();
                    f.sync_all().unwrap();
                    assert!(fs::read(&path).unwrap() == data, "disk {i} round {round}");
                }
            });
        }
    });
    for (id, img, _) in &disks {
        d.ok(&["close", id]);
        fsck_clean(img);
    }
}

/// fsx in block mode on the file the FUSE export shows for a disk: fixed size, any offset and
/// length, reads, writes, mapped I/O, hole punching, fsync, copy_file_range.
#[test]
fn fsx_on_the_exported_disk_file() {
    need_root();
    need("fsx");
    let d = Daemon::new();
    let v = d.open(&[s(&d.path("fsx.img")), "16M"]);
    let id = field(&v, "id");
    let file = d.path("run/disks").join(id);
    assert_eq!(fs::metadata(&file).unwrap().len(), 16 << 20);
    let config = d.path("fsx-block.toml");
    fs::write(
        &config,
        "blockmode = true\nnosizechecks = true\n\
         [opsize]\nmax = 1048576\n\
         [weights]\nclose_open = 0\ntruncate = 0\nposix_fallocate = 0\nread = 10\nwrite = 10\n\
         mapread = 2\nmapwrite = 2\npunch_hole = 1\nfsync = 1\nfdatasync = 1\n\
         copy_file_range = 1\nsendfile = 1\n",
    )
    .unwrap();
    run_fsx(&file, &config, &d.path("fsx-artifacts"), 10_000);
    d.ok(&["close", id]);
}

/// fsx on a file in ext4 on the block device: the whole stack at once.
#[test]
fn fsx_in_a_file_system_on_the_block_device() {
    need_root();
    need("fsx");
    let d = Daemon::new();
    let mnt = d.path("mnt");
    let v = d.open(&[
        s(&d.path("fs.img")),
        "64M",
        "--mkfs",
        "ext4",
        "--mount",
        s(&mnt),
    ]);
    let config = d.path("fsx-fs.toml");
    fs::write(
        &config,
        "flen = 8388608\n[opsize]\nmax = 262144\n\
         [weights]\nclose_open = 1\ntruncate = 2\nposix_fallocate = 1\npunch_hole = 1\n\
         fsync = 1\ninvalidate = 1\ncopy_file_range = 1\n",
    )
    .unwrap();
    run_fsx(
        &mnt.join("fsx.bin"),
        &config,
        &d.path("fsx-artifacts"),
        10_000,
    );
    d.ok(&["close", field(&v, "id")]);
    fsck_clean(&d.path("fs.img"));
}

fn run_fsx(file: &Path, config: &Path, artifacts: &Path, ops: u32) {
    fs::create_dir_all(artifacts).unwrap();
    let out = Command::new("fsx")
        .env("PATH", common::path_env())
        .args([
            "-q",
            "-S",
            "7",
            "-N",
            &ops.to_string(),
            "-f",
            s(config),
            "-P",
            s(artifacts),
        ])
        .arg(file)
        .output()
        .expect("run fsx");
    assert!(
        out.status.success(),
        "fsx found a mismatch ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn busy_close_is_refused_then_forced_and_the_rest_carries_on() {
    need_root();
    need("mkfs.ext4");
    let d = Daemon::new();
    let (a_mnt, b_mnt) = (d.path("a"), d.path("b"));
    let a = d.open(&[
        s(&d.path("a.img")),
        "64M",
        "--mkfs",
        "ext4",
        "--mount",
        s(&a_mnt),
    ]);
    let b = d.open(&[
        s(&d.path("b.img")),
        "64M",
        "--mkfs",
        "ext4",
        "--mount",
        s(&b_mnt),
    ]);
    let a_id = field(&a, "id");
    // A writer that syncs every round, as a database does.
    let mut writer = Command::new("sh")
        .arg("-c")
        .arg(
            "while dd if=/dev/zero of=w bs=64k count=16 conv=fsync status=none; do :; done; exit 3",
        )
        .current_dir(&a_mnt)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(300));

    let refused = d.fails(&["close", a_id]);
    assert!(
        refused.contains("busy") && refused.contains("pid"),
        "{refused}"
    );
    assert!(
        refused.contains("--force"),
        "says how to force it: {refused}"
    );
    assert!(is_mounted(&a_mnt), "a refused close changes nothing");

    d.ok(&["close", "--force", a_id]);
    let start = Instant::now();
    let status = loop {
        if let Some(st) = writer.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the writer never got an error"
        );
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(3), "the writer's dd failed");
    let mut err = String::new();
    writer
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("dd:"), "dd said why: {err}");

    // The daemon is up, the other disk untouched and working.
    let listed = d.json(&["list"]);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["id"], b["id"]);
    let data = pattern(MIB, 9);
    fs::write(b_mnt.join("still.bin"), &data).unwrap();
    assert!(fs::read(b_mnt.join("still.bin")).unwrap() == data);
    d.ok(&["close", field(&b, "id")]);
    fsck_clean(&d.path("b.img"));
    // The forced image can be opened again.
    let again = d.open(&[s(&d.path("a.img")), "--attach", "none"]);
    d.ok(&["close", field(&again, "id")]);
}

#[test]
fn kill_9_of_the_daemon_fails_the_mount_and_keeps_synced_data() {
    need_root();
    need("mkfs.ext4");
    let d = Daemon::new();
    let mnt = d.path("mnt");
    let image = d.path("k.img");
    d.open(&[s(&image), "64M", "--mkfs", "ext4", "--mount", s(&mnt)]);
    let data = pattern(3 * MIB, 5);
    let mut f = fs::File::create(mnt.join("synced.bin")).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    drop(f);
    run(Command::new("kill").args(["-9", &d.pid().to_string()]));
    wait_for(10, "the daemon to die", || {
        UnixStream::connect(&d.socket).is_err()
    });
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();

    // Reads and syncs on the orphaned mount fail at once rather than hang.
    let (tx, rx) = std::sync::mpsc::channel();
    let target = mnt.join("synced.bin");
    thread::spawn(move || {
        let read = fs::read(&target).map(|_| ());
        let synced = fs::File::create(target.with_file_name("new"))
            .and_then(|mut f| f.write_all(b"x").and_then(|()| f.sync_all()));
        let _ = tx.send((read, synced));
    });
    let (read, synced) = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("I/O on the orphaned mount hung");
    assert!(read.is_err(), "a read of uncached data must fail");
    assert!(synced.is_err(), "an fsync must fail");
    run(Command::new("umount").args(["-l", s(&mnt)]));

    // A new daemon (started by open) serves the same image, with the synced file in it.
    let mnt2 = d.path("mnt2");
    let v = d.open(&[s(&image), "--mount", s(&mnt2)]);
    assert!(fs::read(mnt2.join("synced.bin")).unwrap() == data);
    d.ok(&["close", field(&v, "id")]);
}

#[test]
fn flush_and_direct_io_on_the_block_device_reach_the_image() {
    need_root();
    let d = Daemon::new();
    let image = d.path("f.img");
    let v = d.open(&[s(&image), "32M"]);
    let dev = field(&v, "block_device").to_owned();
    let stat = |d: &Daemon, name: &str| d.json(&["list"])[0]["stats"][name].as_u64().unwrap();
    let flushes = |d: &Daemon| stat(d, "flushes");
    let before = flushes(&d);
    let writes_before = stat(&d, "writes");
    let data = pattern(MIB, 3);
    fs::write(d.path("in.bin"), &data).unwrap();
    run(Command::new("dd").args([
        &format!("if={}", s(&d.path("in.bin"))),
        &format!("of={dev}"),
        "bs=1M",
        "seek=5",
        "oflag=direct",
        "conv=fsync,notrunc",
        "status=none",
    ]));
    assert!(
        flushes(&d) > before,
        "fsync of the block device flushes the image"
    );
    // Large requests pass whole: the loop device's own limit (128 segments) splits 1 MiB in
    // two at worst, never into 128 KiB FUSE requests.
    let writes = stat(&d, "writes") - writes_before;
    assert!(writes <= 2, "1 MiB reached the disk in {writes} requests");
    let mut on_disk = vec![0; MIB];
    let mut f = fs::File::open(&image).unwrap();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(5 << 20)).unwrap();
    f.read_exact(&mut on_disk).unwrap();
    assert!(
        on_disk == data,
        "the image file holds what was written to the block device"
    );
    d.ok(&["close", field(&v, "id")]);
}

#[test]
fn every_disk_is_an_nbd_export_too() {
    need_root();
    need("nbdinfo");
    need("qemu-io");
    let d = Daemon::new();
    let image = d.path("n.img");
    let v = d.open(&[s(&image), "16M", "--export-name", "shared"]);
    let uri = v["nbd"][0].as_str().unwrap().to_owned();
    assert!(uri.starts_with("nbd+unix:///shared?socket="), "{uri}");
    let info = common::stdout(Command::new("nbdinfo").args(["--json", &uri]));
    assert!(info.contains("16777216"), "{info}");
    // Written over NBD, read through the block device.
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5c 1M 64k", &uri]));
    let mut got = vec![0; 65536];
    let mut dev = fs::File::open(field(&v, "block_device")).unwrap();
    std::io::Seek::seek(&mut dev, std::io::SeekFrom::Start(1 << 20)).unwrap();
    dev.read_exact(&mut got).unwrap();
    assert!(got.iter().all(|b| *b == 0x5c));
    drop(dev);
    d.ok(&["close", field(&v, "id")]);
    let gone = Command::new("nbdinfo")
        .arg(&uri)
        .env("PATH", common::path_env())
        .output()
        .unwrap();
    assert!(
        !gone.status.success(),
        "a closed disk is no longer exported"
    );
}

#[test]
fn read_only_disks_refuse_writes_everywhere() {
    need_root();
    need("qemu-io");
    let d = Daemon::new();
    let image = d.path("ro.img");
    common::sparse_file(&image, 8 << 20);
    let v = d.open(&[s(&image), "--read-only"]);
    assert_eq!(v["read_only"], true);
    let dd = Command::new("dd")
        .args([
            "if=/dev/zero",
            &format!("of={}", field(&v, "block_device")),
            "bs=4k",
            "count=1",
            "oflag=direct",
            "status=none",
        ])
        .output()
        .unwrap();
    assert!(!dd.status.success(), "the block device refuses writes");
    let qio = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write 0 4k",
            v["nbd"][0].as_str().unwrap(),
        ])
        .env("PATH", common::path_env())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&qio.stdout).to_string() + &String::from_utf8_lossy(&qio.stderr);
    assert!(
        !qio.status.success() || text.contains("failed"),
        "NBD refuses writes: {text}"
    );
    assert!(
        fs::read(&image).unwrap().iter().all(|b| *b == 0),
        "the image is untouched"
    );
    d.ok(&["close", field(&v, "id")]);
}

#[test]
fn sigterm_closes_every_disk_cleanly() {
    need_root();
    need("mkfs.ext4");
    let d = Daemon::new();
    let mnt = d.path("mnt");
    let image = d.path("t.img");
    let v = d.open(&[s(&image), "64M", "--mkfs", "ext4", "--mount", s(&mnt)]);
    let dev = field(&v, "block_device").to_owned();
    let files = write_tree(&mnt, 1);
    run(Command::new("kill").args(["-TERM", &d.pid().to_string()]));
    wait_for(30, "the daemon to stop", || !d.socket.exists());
    assert!(!is_mounted(&mnt), "unmounted");
    let loops = common::stdout(Command::new("losetup").args(["-a"]));
    assert!(
        !loops.contains(&format!("{dev}:")),
        "{dev} detached: {loops}"
    );
    fsck_clean(&image);
    let mnt2 = d.path("mnt2");
    let again = d.open(&[s(&image), "--mount", s(&mnt2)]);
    check_tree(&files, &mnt, &mnt2);
    d.ok(&["close", field(&again, "id")]);
}

#[test]
fn opening_an_open_image_names_its_id() {
    need_root();
    let d = Daemon::new();
    let image = d.path("twice.img");
    let v = d.open(&[s(&image), "8M", "--attach", "none"]);
    let err = d.fails(&["open", s(&image)]);
    assert!(
        err.contains("already open") && err.contains(field(&v, "id")),
        "{err}"
    );
    d.ok(&["close", field(&v, "id")]);
}

#[test]
fn bad_input_gets_a_clear_error_and_disturbs_nothing() {
    need_root();
    let d = Daemon::new();
    // A disk that must stay open and intact through everything below.
    let keep = d.open(&[s(&d.path("keep.img")), "8M", "--attach", "none"]);

    let err = d.fails(&["open", s(&d.path("missing.img")), "--read-only"]);
    assert!(err.contains("does not exist"), "{err}");
    let err = d.fails(&["open", s(d.dir.path())]);
    assert!(err.contains("is a directory"), "{err}");
    let err = d.fails(&["open", s(&d.path("x.img")), "10XB"]);
    assert!(err.contains("10XB"), "{err}");
    assert!(!d.path("x.img").exists());
    let err = d.fails(&["open", s(&d.path("x.img")), "1000"]);
    assert!(err.contains("multiple of 512"), "{err}");
    let err = d.fails(&["open", s(&d.path("no/such/dir/x.img"))]);
    assert!(err.contains("not a directory"), "{err}");
    let err = d.fails(&["open", s(&d.path("y.img")), "--mkfs", "ntfs"]);
    assert!(err.contains("ext4"), "{err}");
    assert!(!d.path("y.img").exists(), "a refused open creates nothing");
    let err = d.fails(&["open", s(&d.path("y.img")), "--attach", "ublk"]);
    assert!(err.contains("modprobe ublk_drv"), "{err}");
    let err = d.fails(&["open", s(&d.path("y.img")), "--attach", "nbd"]);
    assert!(err.contains("modprobe nbd"), "{err}");
    let err = d.fails(&["open", s(&d.path("y.img")), "--attach", "loopy"]);
    assert!(err.contains("auto, ublk, nbd, fuse-loop or none"), "{err}");
    let err = d.fails(&["open", s(&d.path("y.img")), "--attach", "iscsi"]);
    assert!(err.contains("Windows' initiator"), "{err}");
    let err = d.fails(&["open", s(&d.path("y.img")), "--format", "vmdk"]);
    assert!(err.contains("vmdk"), "{err}");
    assert!(!d.path("y.img").exists());

    // Truncated and empty images.
    fs::write(d.path("empty.img"), b"").unwrap();
    let err = d.fails(&["open", s(&d.path("empty.img"))]);
    assert!(err.contains("empty"), "{err}");
    fs::write(d.path("odd.img"), vec![1u8; 5000]).unwrap();
    let err = d.fails(&["open", s(&d.path("odd.img"))]);
    assert!(err.contains("truncated"), "{err}");
    // A qcow2 header cut short: version 3 and 64 KiB clusters, then nothing.
    let mut qcow = b"QFI\xfb\0\0\0\x03".to_vec();
    qcow.resize(100, 0);
    qcow[20..24].copy_from_slice(&16u32.to_be_bytes());
    fs::write(d.path("cut.qcow2"), &qcow).unwrap();
    let err = d.fails(&["open", s(&d.path("cut.qcow2"))]);
    assert!(err.contains("truncated version 3 header"), "{err}");
    // A broken VHD is recognised, not misread as raw.
    let mut vhd = b"conectix".to_vec();
    vhd.resize(1024, 0);
    fs::write(d.path("x.vhd"), &vhd).unwrap();
    let err = d.fails(&["open", s(&d.path("x.vhd"))]);
    assert!(err.contains("VHD footer checksum"), "{err}");
    // A VHDX cut short is recognised by its magic, not misread as raw.
    let mut vhdx = b"vhdxfile".to_vec();
    vhdx.resize(1 << 20, 0);
    fs::write(d.path("x.vhdx"), &vhdx).unwrap();
    let err = d.fails(&["open", s(&d.path("x.vhdx"))]);
    assert!(err.contains("too short to be a VHDX"), "{err}");

    // Closing what is not open.
    let err = d.fails(&["close", "nope-12345678"]);
    assert!(err.contains("no open disk"), "{err}");

    // Garbage over the control socket: JSON errors, the daemon and the disk unharmed.
    for line in [
        "garbage",
        "{}",
        r#"{"op":"explode"}"#,
        r#"{"op":"open","path":7}"#,
        r#"{"op":"close"}"#,
    ] {
        let v = d.request(line);
        assert_eq!(v["ok"], false, "{line} -> {v}");
        assert_eq!(v["error"]["kind"], "bad_request", "{line} -> {v}");
    }
    {
        let mut sock = UnixStream::connect(&d.socket).unwrap();
        let huge = vec![b'x'; 200 << 10];
        // The daemon may hang up before reading all of it.
        let _ = sock.write_all(&huge);
        let _ = sock.write_all(b"\n");
        let mut answer = String::new();
        let _ = std::io::BufReader::new(&sock).read_line(&mut answer);
        assert!(answer.contains("longer than"), "{answer}");
    }
    // Binary junk, then a half request and a hang-up.
    {
        let mut sock = UnixStream::connect(&d.socket).unwrap();
        let _ = sock.write_all(&[0xff, 0xfe, 0, 1, 2, b'\n']);
        let mut answer = String::new();
        let _ = std::io::BufReader::new(&sock).read_line(&mut answer);
        assert!(answer.contains("\"ok\":false"), "{answer}");
        let mut half = UnixStream::connect(&d.socket).unwrap();
        half.write_all(br#"{"op":"li"#).unwrap();
    }
    let listed = d.json(&["list"]);
    assert_eq!(listed[0]["id"], keep["id"]);
    assert_eq!(d.request(r#"{"op":"version"}"#)["ok"], true);
    d.ok(&["close", field(&keep, "id")]);
}

#[test]
fn permissions_are_reported_not_worked_around() {
    need_root();
    need("setpriv");
    let d = Daemon::new();
    // An unprivileged user with a daemon of its own.
    let home = d.path("nobody");
    fs::create_dir(&home).unwrap();
    run(Command::new("chown").args(["nobody", s(&home)]));
    fs::set_permissions(d.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let secret = d.path("secret.img");
    common::sparse_file(&secret, 1 << 20);
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    let as_nobody = |args: &[&str]| {
        common::as_user("nobody", env!("CARGO_BIN_EXE_vdk"))
            .args(args)
            // The daemon makes its own directory (0700) inside the user's home.
            .env("VDK_SOCKET", home.join("run/control.sock"))
            .output()
            .unwrap()
    };
    let out = as_nobody(&["open", s(&secret)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("ermission denied"),
        "{err}"
    );
    let out = as_nobody(&["open", s(&home.join("mine.img")), "--attach", "fuse-loop"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("needs root"), "{err}");
    // A control socket where this user may not create one.
    let out = as_nobody(&[
        "open",
        "--socket",
        "/root/vdk-test/control.sock",
        s(&home.join("a.img")),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("/root/vdk-test"),
        "{err}"
    );
    let out = as_nobody(&["daemon", "--stop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn opens_racing_to_start_the_daemon_share_one() {
    let d = Daemon::new();
    let children: Vec<_> = (0..4)
        .map(|i| {
            d.cmd(&[
                "open",
                s(&d.path(&format!("r{i}.img"))),
                "1M",
                "--attach",
                "none",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(d.json(&["list"]).as_array().unwrap().len(), 4);
}

#[test]
fn two_daemons_never_write_one_image() {
    let first = Daemon::new();
    let second = Daemon::new();
    let image = first.path("shared.img");
    let v = first.open(&[s(&image), "4M", "--attach", "none"]);
    let err = second.fails(&["open", s(&image), "--attach", "none"]);
    assert!(err.contains("in use"), "{err}");
    let err = second.fails(&["open", s(&image), "--attach", "none", "--read-only"]);
    assert!(err.contains("in use"), "{err}");
    first.ok(&["close", field(&v, "id")]);
    let v = second.open(&[s(&image), "--attach", "none", "--read-only"]);
    let w = first.open(&[s(&image), "--attach", "none", "--read-only"]);
    assert_eq!(v["id"], w["id"], "readers share it, with the same id");
}

#[test]
fn a_qcow2_disk_is_a_drive_too() {
    need_root();
    need("mkfs.ext4");
    need("qemu-img");
    let d = Daemon::new();
    let image = d.path("drive.qcow2");
    let mnt = d.path("mnt");
    let v = d.open(&[
        s(&image),
        "256M",
        "--format",
        "qcow2",
        "--mkfs",
        "ext4",
        "--mount",
        s(&mnt),
    ]);
    assert_eq!(v["format"], "qcow2");
    let files = write_tree(&mnt, 3);
    d.ok(&["close", field(&v, "id")]);
    run(Command::new("qemu-img").args(["check", s(&image)]));
    let used = std::os::unix::fs::MetadataExt::blocks(&fs::metadata(&image).unwrap()) * 512;
    assert!(
        used < 64 << 20,
        "a 256 MiB qcow2 drive with a few MiB of files uses {used} bytes"
    );
    // Probed as qcow2 when opened again.
    let mnt2 = d.path("mnt2");
    let again = d.open(&[s(&image), "--mount", s(&mnt2)]);
    assert_eq!(again["format"], "qcow2");
    check_tree(&files, &mnt, &mnt2);
    d.ok(&["close", field(&again, "id")]);
    run(Command::new("qemu-img").args(["check", s(&image)]));
}

/// ext4 on a cow disk over a blank base: discard leaves the base as it was; commit puts the
/// file system into the base, where fsck finds it clean.
#[test]
fn ext4_on_a_cow_disk_then_discard_then_commit() {
    need_root();
    need("mkfs.ext4");
    let d = Daemon::new();
    let base = d.path("blank.img");
    common::sparse_file(&base, 64 << 20);
    let overlay = d.path("changes.qcow2");
    let spec = format!("cow:overlay={}", s(&overlay));
    let mnt = d.path("mnt");
    let open = |d: &Daemon| d.open(&[s(&base), "--filter", &spec]);
    let v = open(&d);
    let id = field(&v, "id").to_owned();
    d.ok(&["mount", &id, s(&mnt), "--mkfs", "ext4"]);
    write_tree(&mnt, 4);
    d.ok(&["close", &id]);
    assert!(
        fs::read(&base).unwrap().iter().all(|b| *b == 0),
        "the base is untouched"
    );
    d.ok(&["discard", s(&overlay)]);
    let v = open(&d);
    let probe = Command::new("blkid")
        .arg(field(&v, "block_device"))
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&probe.stdout).contains("ext4"),
        "after discard the disk is blank again"
    );
    d.ok(&["mount", field(&v, "id"), s(&mnt), "--mkfs", "ext4"]);
    let files = write_tree(&mnt, 5);
    d.ok(&["close", field(&v, "id")]);
    d.ok(&["commit", s(&overlay)]);
    fsck_clean(&base);
    // The base alone now holds the files.
    let plain = d.open(&[s(&base), "--mount", s(&d.path("plain"))]);
    check_tree(&files, &mnt, &d.path("plain"));
    d.ok(&["close", field(&plain, "id")]);
}

/// With --fuse-passthrough, a raw image with no filter is passed through to its file: what the
/// loop device writes is in the image, flushed, and the daemon served none of it; a disk with
/// a filter is served (its stats count the writes).
#[test]
fn a_raw_image_is_passed_through_and_a_filtered_disk_is_served() {
    need_root();
    let d = Daemon::new();
    d.start(&["--fuse-passthrough"]);
    let raw = d.path("pass.img");
    let v = d.open(&[s(&raw), "16M"]);
    let dev = field(&v, "block_device").to_owned();
    let data = pattern(4 << 20, 0x5a);
    fs::write(d.path("src"), &data).unwrap();
    run(Command::new("dd")
        .arg(format!("if={}", d.path("src").display()))
        .arg(format!("of={dev}"))
        .args(["bs=1M", "oflag=direct,sync", "status=none"]));
    assert_eq!(fs::read(&raw).unwrap()[..data.len()], data[..]);
    assert!(
        d.log_has("FUSE passthrough"),
        "no passthrough for a raw image: {}",
        d.log()
    );
    let list = d.json(&["list"]);
    assert_eq!(list[0]["stats"]["bytes_written"], 0, "{list}");
    // Grown while open: the passed-through file and its loop device follow, and the new
    // end is written through them into the image.
    d.ok(&["resize", field(&v, "id"), "+8M"]);
    let size = common::stdout(Command::new("blockdev").args(["--getsize64", &dev]));
    assert_eq!(size.trim(), (24u64 << 20).to_string());
    run(Command::new("dd")
        .arg(format!("if={}", d.path("src").display()))
        .arg(format!("of={dev}"))
        .args(["bs=1M", "seek=20", "oflag=direct,sync", "status=none"]));
    assert_eq!(fs::read(&raw).unwrap()[20 << 20..], data[..]);
    d.ok(&["close", field(&v, "id")]);
    // With a filter, every write is the daemon's.
    let filtered = d.path("served.img");
    let v = d.open(&[s(&filtered), "16M", "--filter", "stats"]);
    let dev = field(&v, "block_device").to_owned();
    run(Command::new("dd")
        .arg(format!("if={}", d.path("src").display()))
        .arg(format!("of={dev}"))
        .args(["bs=1M", "oflag=direct,sync", "status=none"]));
    assert_eq!(fs::read(&filtered).unwrap()[..data.len()], data[..]);
    let list = d.json(&["list"]);
    assert!(
        list[0]["stats"]["bytes_written"].as_u64().unwrap() >= data.len() as u64,
        "{list}"
    );
    d.ok(&["close", field(&v, "id")]);
}
