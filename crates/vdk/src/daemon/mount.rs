//! File systems on attached disks: format (the system's mkfs tools), mount and unmount (the
//! mount system calls), and who keeps a mount busy.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rustix::mount::{MountFlags, UnmountFlags};
use tracing::{info, warn};

use crate::control::{ApiError, ErrorKind};

/// File systems `--mkfs` makes, with the command and the Debian package that has it.
const MKFS: &[(&str, &str, &[&str], &str)] = &[
    ("ext4", "mkfs.ext4", &["-q", "-F"], "e2fsprogs"),
    ("xfs", "mkfs.xfs", &["-q", "-f"], "xfsprogs"),
    ("vfat", "mkfs.vfat", &[], "dosfstools"),
];

/// Directories made for a mount point or a cache: removed again (deepest first, only while
/// empty) when dropped, unless kept, so that a mount that fails leaves no directory behind.
#[derive(Debug)]
#[must_use = "the directories are removed when this is dropped"]
pub struct MadeDirs(Vec<PathBuf>);

impl MadeDirs {
    /// Creates `dir` and the parents it lacks.
    pub fn create(dir: &Path) -> std::io::Result<MadeDirs> {
        let mut missing = Vec::new();
        let mut d = Some(dir);
        while let Some(p) = d.filter(|p| fs::symlink_metadata(p).is_err()) {
            missing.push(p.to_owned());
            d = p.parent();
        }
        fs::create_dir_all(dir)?;
        Ok(MadeDirs(missing))
    }

    /// They stay.
    pub fn keep(mut self) {
        self.0.clear();
    }
}

impl Drop for MadeDirs {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = fs::remove_dir(d);
        }
    }
}

/// Checks a `--mkfs` argument.
pub fn check_fs_type(fs: &str) -> Result<(), ApiError> {
    if MKFS.iter().any(|m| m.0 == fs) {
        return Ok(());
    }
    let known: Vec<&str> = MKFS.iter().map(|m| m.0).collect();
    Err(ApiError::new(
        ErrorKind::Invalid,
        format!(
            "cannot make a {fs:?} file system: choose one of {}",
            known.join(", ")
        ),
    ))
}

/// Formats `dev` with `fs`.
pub fn mkfs(fs: &str, dev: &Path) -> Result<(), ApiError> {
    check_fs_type(fs)?;
    let Some((_, cmd, args, package)) = MKFS.iter().find(|m| m.0 == fs) else {
        unreachable!("checked above");
    };
    info!(fs, dev = %dev.display(), "formatting");
    let out = Command::new(cmd)
        .args(*args)
        .arg(dev)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ApiError::new(
                ErrorKind::Unsupported,
                format!("{cmd} not found: install {package} to make {fs} file systems"),
            ),
            _ => ApiError::io(format!("cannot run {cmd}"), &e),
        })?;
    if !out.status.success() {
        return Err(ApiError::new(
            ErrorKind::Io,
            format!(
                "{cmd} {} failed ({}): {}",
                dev.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(())
}

/// Block file systems this kernel knows, in the order /proc/filesystems lists them.
fn kernel_fs_types() -> Vec<String> {
    fs::read_to_string("/proc/filesystems")
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with("nodev"))
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

/// Mounts `dev` on `dir` (created if missing), as `fs` or, without it, as the first file
/// system type of this kernel that takes it (what mount(8) does when blkid cannot tell).
pub fn mount(dev: &Path, dir: &Path, fs: Option<&str>, read_only: bool) -> Result<(), ApiError> {
    let made = match fs::metadata(dir) {
        Ok(m) if !m.is_dir() => {
            return Err(ApiError::new(
                ErrorKind::Invalid,
                format!("cannot mount on {}: not a directory", dir.display()),
            ))
        }
        Ok(_) => None,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Some(
            MadeDirs::create(dir)
                .map_err(|e| ApiError::io(format!("cannot create {}", dir.display()), &e))?,
        ),
        Err(e) => {
            return Err(ApiError::io(
                format!("cannot mount on {}", dir.display()),
                &e,
            ))
        }
    };
    let mut flags = MountFlags::NOSUID | MountFlags::NODEV;
    if read_only {
        flags |= MountFlags::RDONLY;
    }
    let types = match fs {
        Some(fs) => vec![fs.to_owned()],
        None => kernel_fs_types(),
    };
    for t in &types {
        match rustix::mount::mount(dev, dir, t.as_str(), flags, None) {
            Ok(()) => {
                info!(dev = %dev.display(), dir = %dir.display(), fs = %t, "mounted");
                if let Some(m) = made {
                    m.keep();
                }
                return Ok(());
            }
            // Not this type: try the next.
            Err(rustix::io::Errno::INVAL) if fs.is_none() => {}
            Err(rustix::io::Errno::NODEV) => {
                return Err(ApiError::new(
                    ErrorKind::Unsupported,
                    format!("this kernel cannot mount {t} file systems (it has no {t} driver)"),
                ))
            }
            Err(e) => {
                return Err(ApiError::io(
                    format!("cannot mount {} ({t}) on {}", dev.display(), dir.display()),
                    &e.into(),
                ))
            }
        }
    }
    Err(ApiError::new(
        ErrorKind::Invalid,
        format!(
            "no file system on {} that this kernel can mount; format it with --mkfs TYPE",
            dev.display()
        ),
    ))
}

/// Unmounts `dir`, syncing it first. A busy mount is refused with the processes that hold
/// it, unless `force`: then it is detached lazily and goes when they let go.
pub fn unmount(dir: &Path, force: bool) -> Result<(), ApiError> {
    match fs::File::open(dir) {
        Ok(d) => {
            if let Err(e) = rustix::fs::syncfs(&d) {
                warn!(dir = %dir.display(), error = %e, "sync before unmount failed");
            }
        }
        Err(e) => warn!(dir = %dir.display(), error = %e, "cannot open the mount to sync it"),
    }
    match rustix::mount::unmount(dir, UnmountFlags::empty()) {
        Ok(()) => {
            info!(dir = %dir.display(), "unmounted");
            Ok(())
        }
        // Already gone (unmounted by hand): nothing to do.
        Err(rustix::io::Errno::INVAL) if !is_mount_point(dir) => Ok(()),
        Err(rustix::io::Errno::BUSY) if force => {
            warn!(dir = %dir.display(), "mount busy: detaching it lazily");
            rustix::mount::unmount(dir, UnmountFlags::DETACH)
                .map_err(|e| ApiError::io(format!("cannot detach {}", dir.display()), &e.into()))
        }
        Err(rustix::io::Errno::BUSY) => {
            let who = busy_with(dir);
            Err(ApiError::new(
                ErrorKind::Busy,
                format!(
                    "{} is busy, in use by {who}; close those, or use --force (they get I/O errors)",
                    dir.display()
                ),
            ))
        }
        Err(e) => Err(ApiError::io(
            format!("cannot unmount {}", dir.display()),
            &e.into(),
        )),
    }
}

/// Whether `dir` is the root of a mount.
pub fn is_mount_point(dir: &Path) -> bool {
    let Ok(mounts) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let dir = dir.to_string_lossy();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|m| unescape(m) == dir))
}

/// mountinfo escapes space, tab, newline and backslash as octal.
pub(super) fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

std::thread_local! {
    /// The pid of the program whose control request this thread is answering: it is left out
    /// of the "in use by" lists (`cd /mnt/x && vdk close x` must not name vdk itself).
    static REQUESTER: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
}

/// Marks the requests this thread answers next as coming from process `pid`.
pub fn set_requester(pid: Option<u32>) {
    REQUESTER.with(|r| r.set(pid));
}

/// Processes using `dir` (files, working directories, roots under it), as "pid 123 (dd)";
/// neither the daemon nor the program asking is named.
pub fn holders(dir: &Path) -> Vec<String> {
    let asking: Vec<u32> = REQUESTER.with(std::cell::Cell::get).into_iter().collect();
    vdk_core::proc::users_under(dir, &asking)
}

/// Who keeps `dir` busy, for an error message: the processes using it, or, when it is only
/// the program asking (its working directory is inside), that.
pub fn busy_with(dir: &Path) -> String {
    let who = holders(dir);
    if !who.is_empty() {
        return who.join(", ");
    }
    if !vdk_core::proc::users_under(dir, &[]).is_empty() {
        return "the command itself (its working directory is inside: cd out of it)".to_owned();
    }
    "something (a nested mount, or a process this daemon cannot see)".to_owned()
}

/// What uses block device `dev` besides vdk: the mount points of file systems on it (read
/// from /proc/self/mountinfo, so whoever mounted them) and the devices stacked on it
/// (device mapper, md: its holders in sysfs), as "mounted on DIR" and "held by NAME".
pub fn device_uses(dev: &Path) -> Vec<String> {
    let mut uses: Vec<String> = mounts_of_device(dev)
        .iter()
        .map(|m| format!("mounted on {}", m.display()))
        .collect();
    if let Some(name) = dev.file_name() {
        let held = Path::new("/sys/class/block").join(name).join("holders");
        if let Ok(entries) = fs::read_dir(held) {
            for e in entries.flatten() {
                uses.push(format!("held by {}", e.file_name().to_string_lossy()));
            }
        }
    }
    uses
}

/// Where file systems on block device `dev` are mounted (by anyone), from mountinfo.
pub fn mounts_of_device(dev: &Path) -> Vec<PathBuf> {
    let Ok(meta) = fs::metadata(dev) else {
        return Vec::new();
    };
    let rdev = std::os::unix::fs::MetadataExt::rdev(&meta);
    let id = format!("{}:{}", rustix::fs::major(rdev), rustix::fs::minor(rdev));
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split(' ').nth(2) == Some(id.as_str()))
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape(m)))
        .collect()
}

/// Loop devices of anyone's whose backing file is `file`, each with what uses it, as
/// "/dev/loop3 (mounted on /mnt/x)": a file written under a mounted loop device damages
/// the file system on it.
pub fn loop_uses(file: &Path) -> Vec<String> {
    let Ok(file) = fs::canonicalize(file) else {
        return Vec::new();
    };
    let Ok(devs) = fs::read_dir("/sys/class/block") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for d in devs.flatten() {
        let name = d.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let backing = fs::read_to_string(d.path().join("loop/backing_file")).unwrap_or_default();
        if Path::new(backing.trim()) != file {
            continue;
        }
        let dev = Path::new("/dev").join(&name);
        let uses = device_uses(&dev);
        if !uses.is_empty() {
            found.push(format!("{} ({})", dev.display(), uses.join(", ")));
        }
    }
    found
}

/// What `blkid` says is on `dev` ("a file system (ext4)", "a partition table (dos)"), if
/// it recognises anything.
pub fn probe_fs(dev: &Path) -> Option<String> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(dev)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('=').map(str::to_owned))
    };
    if let Some(t) = value("TYPE") {
        return Some(format!("a file system ({t})"));
    }
    value("PTTYPE").map(|t| format!("a partition table ({t})"))
}
