//! Linux.

use std::fs::File;
use std::io;
use std::net::TcpStream;
use std::time::Duration;

pub mod proc;

pub use std::os::unix::fs::FileExt;

use super::Lock;

/// Takes `lock` on `file` if nobody holds a conflicting one: `Ok(true)` taken (until the file
/// is closed), `Ok(false)` held elsewhere. A file system without locks is `Unsupported`.
pub fn try_lock(file: &File, lock: Lock) -> io::Result<bool> {
    use rustix::fs::{flock, FlockOperation};
    use rustix::io::Errno;
    let op = match lock {
        Lock::Shared => FlockOperation::NonBlockingLockShared,
        Lock::Exclusive => FlockOperation::NonBlockingLockExclusive,
    };
    match flock(file, op) {
        Ok(()) => Ok(true),
        Err(Errno::WOULDBLOCK) => Ok(false),
        Err(Errno::NOLCK | Errno::OPNOTSUPP) => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the file system has no file locks",
        )),
        Err(e) => Err(e.into()),
    }
}

/// Allocates the first `len` bytes of `file` now, so that writes there never meet a full
/// file system (the file grows to `len` if shorter).
pub fn reserve(file: &File, len: u64) -> io::Result<()> {
    use rustix::fs::{fallocate, FallocateFlags};
    Ok(fallocate(file, FallocateFlags::empty(), 0, len)?)
}

/// Frees the space of `[offset, offset + len)` of `file`, which then reads as zeroes; its
/// length does not change. A file system without holes is `Unsupported`.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use rustix::fs::{fallocate, FallocateFlags};
    match fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    ) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::OPNOTSUPP) => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the file system cannot free part of a file",
        )),
        Err(e) => Err(e.into()),
    }
}

/// The bytes `file` takes on its file system (less than its length when sparse).
pub fn disk_usage(file: &File) -> u64 {
    use std::os::unix::fs::MetadataExt;
    file.metadata().map_or(0, |m| m.blocks() * 512)
}

/// Unanswered keep-alive probes after which a TCP connection is dead.
const KEEPALIVE_PROBES: u32 = 6;

/// TCP keep-alive on a client socket: the first probe after `idle` without traffic, then one
/// every sixth of it (at least a second); six unanswered and the connection is dead, so that a
/// client whose host vanished is found in about twice `idle` instead of TCP's hours. Data left
/// unacknowledged that long ends it too (TCP_USER_TIMEOUT): keep-alive probes only go out on
/// a quiet connection, and retransmission alone would take 15 minutes. A failure only leaves
/// the kernel's defaults.
pub fn set_keepalive(socket: &TcpStream, idle: Duration) {
    use rustix::net::sockopt as so;
    let idle = idle.max(Duration::from_secs(1));
    let interval = (idle / 6).max(Duration::from_secs(1));
    let _ = so::set_socket_keepalive(socket, true);
    let _ = so::set_tcp_keepidle(socket, idle);
    let _ = so::set_tcp_keepintvl(socket, interval);
    let _ = so::set_tcp_keepcnt(socket, KEEPALIVE_PROBES);
    let dead = idle + interval * KEEPALIVE_PROBES;
    let _ = so::set_tcp_user_timeout(socket, u32::try_from(dead.as_millis()).unwrap_or(u32::MAX));
}

/// Who this process runs as: `$USER`, else `root` or `uid N`.
pub fn user_name() -> String {
    std::env::var("USER").unwrap_or_else(|_| {
        let uid = rustix::process::getuid();
        if uid.is_root() {
            "root".into()
        } else {
            format!("uid {}", uid.as_raw())
        }
    })
}

/// Renames `from` over `to` so that the change survives a crash once this returns: the
/// rename, then the directory synced.
pub fn replace_durably(from: &std::path::Path, to: &std::path::Path) -> io::Result<()> {
    std::fs::rename(from, to)?;
    let to = std::path::absolute(to)?;
    match to.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}
