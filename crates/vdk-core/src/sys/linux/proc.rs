//! Who else is using a file or a mount, from `/proc`, for error messages that name the
//! holder ("in use by pid 4242 (vdk daemon)") instead of only saying "busy". Where there is no
//! `/proc` (or it hides other users' processes) the lists are empty and messages say less.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// `pid N (NAME)`; for vdk itself its command too (`vdk daemon`, `vdk serve`), so that a user
/// can tell the daemon from a foreground server.
pub fn describe(pid: u32) -> String {
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let comm = comm.trim();
    if comm.is_empty() {
        return format!("pid {pid}");
    }
    if comm == "vdk" {
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        // argv[1], skipping global options such as -v.
        let sub = cmdline
            .split(|b| *b == 0)
            .skip(1)
            .map(String::from_utf8_lossy)
            .find(|a| !a.starts_with('-'));
        if let Some(sub) = sub {
            return format!("pid {pid} (vdk {sub})");
        }
    }
    format!("pid {pid} ({comm})")
}

/// The processes holding a `flock` on the file at `path` (this process left out), as
/// [`describe`] names them.
pub fn flock_holders(path: &Path) -> Vec<String> {
    let Ok(meta) = fs::metadata(path) else {
        return Vec::new();
    };
    let dev = meta.dev();
    // /proc/locks names the file "MAJOR:MINOR:INODE", the device numbers in hex.
    let id = format!(
        "{:02x}:{:02x}:{}",
        rustix::fs::major(dev),
        rustix::fs::minor(dev),
        meta.ino()
    );
    let me = std::process::id();
    let locks = fs::read_to_string("/proc/locks").unwrap_or_default();
    let mut pids: Vec<u32> = locks
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // "1: FLOCK  ADVISORY  WRITE 3420 fe:00:10010706 0 EOF"
            (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&id.as_str()))
                .then(|| f.get(4)?.parse().ok())
                .flatten()
        })
        .filter(|pid| *pid != me)
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids.into_iter().map(describe).collect()
}

/// Processes with an open file, a working directory or a root under `dir`, as [`describe`]
/// names them; this process and the pids in `ignore` left out.
pub fn users_under(dir: &Path, ignore: &[u32]) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return found;
    };
    let me = std::process::id();
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me || ignore.contains(&pid) {
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
            found.push(describe(pid));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_described_by_its_name() {
        let me = describe(std::process::id());
        assert!(
            me.starts_with(&format!("pid {} (", std::process::id())),
            "{me}"
        );
    }

    #[test]
    fn a_file_nobody_locks_has_no_holders() {
        let f = std::env::temp_dir().join(format!("vdk-proc-test-{}", std::process::id()));
        fs::write(&f, b"x").unwrap();
        assert!(flock_holders(&f).is_empty());
        fs::remove_file(&f).unwrap();
    }
}
