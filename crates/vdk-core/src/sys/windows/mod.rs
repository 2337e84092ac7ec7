//! Windows: the same names, with what the platform offers: std's positional I/O and
//! `LockFileEx`, and NTFS sparse files through the file system controls (`sparse.rs`, the
//! only unsafe code in the crate). Built and linted by `scripts/check-windows.sh`, run under
//! Wine by crates/vdk/tests/windows.rs.

use std::fs::File;
use std::io;
use std::net::TcpStream;
use std::time::Duration;

use super::Lock;

mod pipe;
pub mod proc;
mod sparse;

pub use pipe::{connect_pipe, peer_identity, Peer, PipeConn, PipeListener};

pub use sparse::{allocated_ranges, allocation_size, replace_durably, set_sparse};

/// Reads and writes at an offset, as Unix's `FileExt` does (Windows' `seek_read` and
/// `seek_write` take the offset with each request).
pub trait FileExt {
    /// Reads into `buf` at `offset`; how many bytes were read.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes `buf` at `offset`; how many bytes were written.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize>;

    /// Fills all of `buf` from `offset`, or fails (`UnexpectedEof` past the end).
    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes all of `buf` at `offset`, or fails.
    fn write_all_at(&self, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.write_at(buf, offset) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    buf = &buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl FileExt for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        std::os::windows::fs::FileExt::seek_read(self, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        std::os::windows::fs::FileExt::seek_write(self, buf, offset)
    }
}

/// Takes `lock` on the whole of `file` if nobody holds a conflicting one: `Ok(false)` if
/// someone does. Through std (`LockFileEx`). Windows' locks are mandatory where Linux's are
/// advisory: while a writer holds its exclusive lock, other processes cannot read the file
/// either (`--force-share` readers included), and a shared lock keeps every writer out.
pub fn try_lock(file: &File, lock: Lock) -> io::Result<bool> {
    let r = match lock {
        Lock::Shared => file.try_lock_shared(),
        Lock::Exclusive => file.try_lock(),
    };
    match r {
        Ok(()) => Ok(true),
        Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Makes the file at least `len` bytes long (space is not reserved ahead here yet).
pub fn reserve(file: &File, len: u64) -> io::Result<()> {
    if file.metadata()?.len() < len {
        file.set_len(len)?;
    }
    Ok(())
}

/// Zeroes a range without writing it: freed if the file is sparse (`FSCTL_SET_ZERO_DATA`).
/// An error where the file system has no such control: callers write zeroes instead.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    sparse::punch_hole(file, offset, len)
}

/// The bytes `file` takes on its volume (less than its length when sparse); its length if
/// the file system does not say.
pub fn disk_usage(file: &File) -> u64 {
    sparse::allocation_size(file).unwrap_or_else(|_| file.metadata().map_or(0, |m| m.len()))
}

/// Not here yet (`SIO_KEEPALIVE_VALS`): the system's keep-alive defaults stay.
pub fn set_keepalive(_socket: &TcpStream, _idle: Duration) {}

/// Who this process runs as: `%USERNAME%`.
pub fn user_name() -> String {
    std::env::var("USERNAME").unwrap_or_else(|_| "unknown user".into())
}
