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
    match fs::metadata(dir) {
        Ok(m) if !m.is_dir() => {
            return Err(ApiError::new(
                ErrorKind::Invalid,
                format!("cannot mount on {}: not a directory", dir.display()),
            ))
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir_all(dir)
            .map_err(|e| ApiError::io(format!("cannot create {}", dir.display()), &e))?,
        Err(e) => {
            return Err(ApiError::io(
                format!("cannot mount on {}", dir.display()),
                &e,
            ))
        }
    }
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
            let who = holders(dir);
            let who = if who.is_empty() {
                "something (a nested mount, or a process this daemon cannot see)".to_owned()
            } else {
                who.join(", ")
            };
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
fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Processes with a file, a working directory or a root under `dir`, as "pid 123 (dd)".
pub fn holders(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return found;
    };
    let me = std::process::id().to_string();
    for p in procs.flatten() {
        let name = p.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let base = p.path();
        let under = |link: PathBuf| fs::read_link(link).is_ok_and(|t| t.starts_with(dir));
        let mut uses = under(base.join("cwd")) || under(base.join("root"));
        if !uses {
            if let Ok(fds) = fs::read_dir(base.join("fd")) {
                uses = fds.flatten().any(|fd| under(fd.path()));
            }
        }
        if uses {
            let comm = fs::read_to_string(base.join("comm")).unwrap_or_default();
            found.push(format!("pid {pid} ({})", comm.trim()));
        }
    }
    found
}
