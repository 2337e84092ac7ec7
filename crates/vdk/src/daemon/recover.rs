//! What a daemon that died (`kill -9`, a crash) leaves mounted, found and detached by the
//! next one before it serves anything:
//!
//! - its FUSE export (`disks/` beside the socket), whose files back its loop devices;
//! - the file systems mounted on those loop devices, wherever they are mounted (by vdk or
//!   anyone), found in /proc/self/mountinfo by device number;
//! - the ISO browsers and cloud drives it had mounted, listed in `mounts.json` beside the
//!   socket as they come and go.
//!
//! Each is detached lazily (`umount -l`): its server is gone, so every access fails, and a
//! lazy unmount frees the mount point at once while programs that still hold files in it
//! keep them until they let go. The loop devices go by themselves (autoclear) when the last
//! file system on them does. Nothing is mounted on top of a stale mount.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use rustix::mount::UnmountFlags;
use tracing::{info, warn};

use super::mount;
use super::Paths;

/// The file beside the socket that lists the daemon's file system mounts.
pub fn mounts_file(paths: &Paths) -> PathBuf {
    paths.dir.join("mounts.json")
}

/// Writes the list of mount points of the daemon's file systems (atomically).
pub fn record_mounts(paths: &Paths, dirs: &[&Path]) {
    let file = mounts_file(paths);
    let tmp = file.with_extension("json.tmp");
    let written = serde_json::to_vec(dirs)
        .map_err(io::Error::other)
        .and_then(|text| {
            // A new file of its own (never one that was there, never through a link).
            let _ = fs::remove_file(&tmp);
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            io::Write::write_all(&mut f, &text)
        })
        .and_then(|()| fs::rename(&tmp, &file));
    if let Err(e) = written {
        warn!(file = %file.display(), error = %e, "cannot record the mounts");
    }
}

/// Whether `dir` is a FUSE mount whose server is gone (every access fails with ENOTCONN).
pub fn is_stale_fuse(dir: &Path) -> bool {
    let fuse = mount_type(dir).is_some_and(|t| t == "fuse" || t.starts_with("fuse."));
    fuse && matches!(
        fs::metadata(dir),
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOTCONN.raw_os_error())
    )
}

/// The file system type of the mount whose root is `dir`, from /proc/self/mountinfo.
fn mount_type(dir: &Path) -> Option<String> {
    let mounts = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let dir = dir.to_string_lossy();
    mounts.lines().rev().find_map(|l| {
        let (head, tail) = l.split_once(" - ")?;
        let point = head.split(' ').nth(4)?;
        (mount::unescape(point) == dir).then(|| tail.split(' ').next().map(str::to_owned))?
    })
}

/// Detaches `dir` lazily; what happened, in a sentence for the log and the user.
fn detach(dir: &Path, what: &str) -> String {
    match rustix::mount::unmount(dir, UnmountFlags::DETACH) {
        Ok(()) => {
            info!(dir = %dir.display(), "{what} of a vdk daemon that died: detached");
            format!(
                "detached {} ({what} of a vdk daemon that died)",
                dir.display()
            )
        }
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "{what} of a vdk daemon that died: cannot detach it");
            format!(
                "cannot detach {} ({what} of a vdk daemon that died): {e}",
                dir.display()
            )
        }
    }
}

/// Finds and detaches what a dead daemon with these paths left mounted; says what it did,
/// a sentence per mount.
pub fn stale_mounts(paths: &Paths) -> Vec<String> {
    let mut gone = Vec::new();
    // File systems on the loop devices the old FUSE export backs.
    for dev in loop_devices_under(&paths.fuse) {
        let mut points = mount::mounts_of_device(&dev);
        // Deepest first, so that nested mounts go before what holds them.
        points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for p in points {
            gone.push(detach(&p, &format!("a file system on {}", dev.display())));
        }
    }
    if mount::is_mount_point(&paths.fuse) {
        gone.push(detach(&paths.fuse, "the FUSE export"));
    }
    let recorded: Vec<PathBuf> = fs::read(mounts_file(paths))
        .ok()
        .and_then(|t| serde_json::from_slice(&t).ok())
        .unwrap_or_default();
    for dir in recorded {
        if is_stale_fuse(&dir) {
            gone.push(detach(&dir, "a file system mounted by vdk fs"));
        }
    }
    record_mounts(paths, &[]);
    gone
}

/// Loop devices whose backing file lies under `dir`.
fn loop_devices_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(devs) = fs::read_dir("/sys/class/block") else {
        return Vec::new();
    };
    devs.flatten()
        .filter(|d| d.file_name().to_string_lossy().starts_with("loop"))
        .filter(|d| {
            fs::read_to_string(d.path().join("loop/backing_file"))
                .is_ok_and(|b| Path::new(b.trim()).starts_with(dir))
        })
        .map(|d| Path::new("/dev").join(d.file_name()))
        .collect()
}
