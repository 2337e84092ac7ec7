//! The one error type of the disk interface, and its errno mapping.
//!
//! Front ends never parse messages: NBD replies, SCSI sense data and FUSE replies all come from
//! [`Error::errno`], one line per variant.

use std::io;

/// A disk operation, named in errors.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
#[non_exhaustive]
pub enum Op {
    /// `cache` (read-ahead).
    Cache,
    /// `extents`.
    Extents,
    /// `flush`.
    Flush,
    /// `grow` (a live resize).
    Grow,
    /// `read_at`.
    Read,
    /// `trim`.
    Trim,
    /// `write_at`.
    Write,
    /// `write_zeroes`.
    WriteZeroes,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Op::Cache => "cache",
            Op::Extents => "extents",
            Op::Flush => "flush",
            Op::Grow => "growing while open",
            Op::Read => "read",
            Op::Trim => "trim",
            Op::Write => "write",
            Op::WriteZeroes => "write zeroes",
        })
    }
}

/// Why a disk operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request is malformed for this device (for example misaligned).
    #[error("invalid request: offset {offset} length {len} (block size {block_size})")]
    Misaligned {
        /// Byte offset of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// The device's logical block size.
        block_size: u32,
    },
    /// The storage below failed.
    #[error("i/o error")]
    Io(#[from] io::Error),
    /// No space left where the data would go.
    #[error("no space left on device")]
    NoSpace,
    /// The range is not inside the disk.
    #[error("range {offset}+{len} is outside the disk of {size} bytes")]
    OutOfRange {
        /// Byte offset of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// Size of the disk in bytes.
        size: u64,
    },
    /// The device is read-only.
    #[error("disk is read-only")]
    ReadOnly,
    /// The request is larger than the device takes in one call.
    #[error("request of {len} bytes is larger than the maximum of {max}")]
    TooLarge {
        /// Length of the request in bytes.
        len: u64,
        /// The device's maximum request size.
        max: u64,
    },
    /// The device does not implement this operation.
    #[error("{0} is not supported by this disk")]
    Unsupported(Op),
    /// The disk was closed (or forcibly removed) while the request was queued: it fails as
    /// I/O to a disk pulled out of its slot does.
    #[error("disk was closed")]
    Closed,
}

/// The portable error numbers that front ends need. `raw()` gives the Linux value, which is
/// also what the NBD protocol uses on the wire.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Errno {
    /// EINVAL.
    Inval,
    /// EIO.
    Io,
    /// ENOSPC.
    NoSpc,
    /// ENOTSUP.
    NotSup,
    /// EOVERFLOW.
    Overflow,
    /// EPERM.
    Perm,
    /// EROFS.
    RoFs,
}

impl Errno {
    /// The Linux errno value.
    pub fn raw(self) -> i32 {
        match self {
            Errno::Perm => 1,
            Errno::Io => 5,
            Errno::Inval => 22,
            Errno::NoSpc => 28,
            Errno::RoFs => 30,
            Errno::Overflow => 75,
            Errno::NotSup => 95,
        }
    }
}

impl Error {
    /// The errno this error stands for.
    pub fn errno(&self) -> Errno {
        match self {
            Error::Io(e) => io_errno(e),
            Error::Misaligned { .. } => Errno::Inval,
            Error::NoSpace => Errno::NoSpc,
            Error::OutOfRange { .. } => Errno::Inval,
            Error::ReadOnly => Errno::RoFs,
            Error::TooLarge { .. } => Errno::Overflow,
            Error::Unsupported(_) => Errno::NotSup,
            Error::Closed => Errno::Io,
        }
    }
}

/// Keeps the meaning of the few OS errors a front end can act on; the rest are EIO.
fn io_errno(e: &io::Error) -> Errno {
    use io::ErrorKind as K;
    match e.kind() {
        K::FileTooLarge | K::QuotaExceeded | K::StorageFull => Errno::NoSpc,
        K::InvalidInput => Errno::Inval,
        K::ReadOnlyFilesystem => Errno::RoFs,
        K::Unsupported => Errno::NotSup,
        _ => Errno::Io,
    }
}

/// Result of a disk operation.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_full_io_error_maps_to_enospc() {
        let e = Error::Io(io::Error::from_raw_os_error(28));
        assert_eq!(e.errno(), Errno::NoSpc);
    }

    #[test]
    fn unknown_io_error_maps_to_eio() {
        let e = Error::Io(io::Error::other("broken"));
        assert_eq!(e.errno(), Errno::Io);
    }

    #[test]
    fn out_of_range_is_einval() {
        let e = Error::OutOfRange {
            offset: 1,
            len: 2,
            size: 2,
        };
        assert_eq!(e.errno().raw(), 22);
    }
}
