//! A real file system on a vdk disk: nbdfuse exposes the export as a file, a loop device makes
//! it a block device, then mkfs.ext4, mount, files written and checked, fsck. Needs root.
#![allow(clippy::cast_possible_truncation)] // test sizes are small constants

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{need, need_root, pattern, run, sparse_file, stdout, Vdk};
use tempfile::TempDir;

const MIB: u64 = 1 << 20;

/// Undoes one step of the setup when dropped, so a failing test leaves no mount behind.
struct Undo(Vec<String>);

impl Drop for Undo {
    fn drop(&mut self) {
        let status = Command::new(&self.0[0])
            .args(&self.0[1..])
            .env("PATH", common::path_env())
            .status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("cleanup {:?} failed", self.0);
        }
    }
}

fn undo(args: &[&str]) -> Undo {
    Undo(args.iter().map(|s| s.to_string()).collect())
}

fn nbdfuse(dir: &Path, uri: &str) -> (Child, PathBuf) {
    let mnt = dir.join("fuse");
    std::fs::create_dir(&mnt).unwrap();
    let pidfile = dir.join("nbdfuse.pid");
    let child = Command::new("nbdfuse")
        .arg("-P")
        .arg(&pidfile)
        .arg(&mnt)
        .arg(uri)
        .env("PATH", common::path_env())
        .stdout(Stdio::null())
        .spawn()
        .expect("start nbdfuse");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pidfile.exists() {
        assert!(Instant::now() < deadline, "nbdfuse did not mount in time");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, mnt)
}

fn sha256(path: &Path) -> String {
    stdout(Command::new("sha256sum").arg(path))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn ext4_on_a_loop_device_over_nbdfuse_survives_unmount_and_fsck() {
    need_root();
    for tool in [
        "nbdfuse",
        "losetup",
        "mkfs.ext4",
        "fsck.ext4",
        "fusermount3",
    ] {
        need(tool);
    }
    let dir = TempDir::new().unwrap();
    let img = dir.path().join("disk.img");
    sparse_file(&img, 256 * MIB);
    let mut vdk = Vdk::serve_in(dir, &["disk.img"]);
    let work = TempDir::new().unwrap();
    let (mut fuse, fuse_dir) = nbdfuse(work.path(), &vdk.uri(""));
    let fuse_undo = undo(&["fusermount3", "-u", fuse_dir.to_str().unwrap()]);
    let nbd_file = fuse_dir.join("nbd");

    let loopdev = stdout(
        Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&nbd_file),
    )
    .trim()
    .to_string();
    assert!(
        loopdev.starts_with("/dev/loop"),
        "losetup printed {loopdev:?}"
    );
    let loop_undo = undo(&["losetup", "-d", &loopdev]);
    run(Command::new("mkfs.ext4").args(["-q", "-F", &loopdev]));

    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run(Command::new("mount").arg(&loopdev).arg(&mnt));
    let mount_undo = undo(&["umount", mnt.to_str().unwrap()]);
    let files = [
        ("big.bin", pattern(24 * MIB as usize, 1)),
        ("small.txt", b"hello vdk\n".to_vec()),
    ];
    for (name, data) in &files {
        std::fs::write(mnt.join(name), data).unwrap();
    }
    std::fs::create_dir(mnt.join("dir")).unwrap();
    std::fs::write(mnt.join("dir/inner.bin"), pattern(3 * MIB as usize, 9)).unwrap();
    let sums: Vec<String> = files.iter().map(|(n, _)| sha256(&mnt.join(n))).collect();
    run(&mut Command::new("sync"));
    drop(mount_undo); // umount

    // The file system is clean, and after a fresh mount the files read back the same.
    run(Command::new("fsck.ext4").args(["-f", "-n", &loopdev]));
    run(Command::new("mount").arg(&loopdev).arg(&mnt));
    let mount_undo = undo(&["umount", mnt.to_str().unwrap()]);
    for ((name, data), sum) in files.iter().zip(&sums) {
        assert_eq!(
            &sha256(&mnt.join(name)),
            sum,
            "{name} changed across remount"
        );
        assert!(
            std::fs::read(mnt.join(name)).unwrap() == *data,
            "{name} content"
        );
    }
    assert!(std::fs::read(mnt.join("dir/inner.bin")).unwrap() == pattern(3 * MIB as usize, 9));
    drop(mount_undo);
    drop(loop_undo);
    drop(fuse_undo);
    let _ = fuse.wait();

    // vdk stops cleanly, and the image file itself holds a clean file system.
    assert!(vdk.stop().success(), "vdk exit status:\n{}", vdk.log());
    run(Command::new("fsck.ext4").args(["-f", "-n"]).arg(&img));
}
