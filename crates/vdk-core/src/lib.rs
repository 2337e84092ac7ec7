//! The one disk interface of vdk.
//!
//! Everything in vdk meets at [`BlockDevice`]: backends implement it (where the bytes live),
//! filters wrap one and implement it again, and front ends (NBD, FUSE, iSCSI) serve one without
//! knowing what is below.
//!
//! ```text
//!   front end (NBD, ...)   --->  Arc<dyn BlockDevice>
//!                                  filter (cow, stats, ...)  --->  Arc<dyn BlockDevice>
//!                                                                    backend (file, memory, ...)
//! ```
//!
//! The invariants every implementation keeps:
//! - I/O is all-or-error: a read fills the whole buffer, a write writes all of it, or the call
//!   fails. No caller ever loops over a short transfer.
//! - Methods take `&self` and may be called from many threads at once.
//! - Ranges are checked with [`check_range`]; a request past the end is
//!   [`Error::OutOfRange`], never a partial transfer.
//! - What an optional operation can do is said up front by [`DiskInfo::caps`], so a front end
//!   advertises only what works.
// Unsafe only where Windows is reached through its C API (sys/windows/sparse.rs).
#![deny(unsafe_code)]
#![warn(missing_docs)]
// Tests build small buffers from constants; production code converts with checks.
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

pub mod bitmap;
mod error;
mod extents;
mod filter;
mod info;
pub mod io;
pub mod lifecycle;
pub mod net;
pub mod pool;
mod shared;
pub mod size;
pub mod sync;
pub mod sys;

pub use sys::proc;

#[cfg(feature = "conformance")]
pub mod conformance;

use std::fmt;

pub use error::{Errno, Error, Op, Result};
pub use extents::{first_data_in, Extent, ExtentKind, Extents};
pub use filter::{Filter, ReadOnly};
pub use info::{Capabilities, DiskInfo, MediaKind};
pub use shared::{zeroed_buffer, Piece, SharedBytes};

/// A disk of `info().size` bytes, addressed by byte offset.
///
/// Methods take `&self` and run concurrently; a device that must serialise does so inside.
/// Requests to disjoint ranges never affect each other; concurrent requests to overlapping
/// ranges see one of the writes, byte by byte, as a real disk does.
pub trait BlockDevice: Send + Sync + fmt::Debug {
    /// Size, block sizes and capabilities. Fixed while the device is open, but for the size,
    /// which [`BlockDevice::grow`] may raise.
    fn info(&self) -> DiskInfo;

    /// Fills all of `buf` from `offset`, or fails. Never a short read. A zero-length read
    /// inside the disk (or at its very end) succeeds and does nothing.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes all of `buf` at `offset`; with `fua` the data is durable when this returns.
    /// A read-only device fails with [`Error::ReadOnly`].
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()>;

    /// Makes every write that completed before this call durable.
    fn flush(&self) -> Result<()>;

    /// Discards a range: afterwards it reads back as zeroes, and its storage may be freed.
    /// Devices that cannot say so in `info().caps.trim` and fail with
    /// [`Error::Unsupported`].
    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Err(Error::Unsupported(Op::Trim))
    }

    /// Makes a range read back as zeroes. With `may_trim` the device may free the storage
    /// (leave a hole); without it the range stays allocated. With `fua`, durable on return.
    ///
    /// The default writes zero-filled buffers of at most 1 MiB with `write_at`; a device with
    /// a cheaper way overrides it and sets `info().caps.fast_zero`.
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<()> {
        const PIECE: usize = 1 << 20;
        let _ = may_trim;
        check_range(self.info().size, offset, len)?;
        let piece = |left: u64| usize::try_from(left).map_or(PIECE, |l| l.min(PIECE));
        let zeroes = vec![0u8; piece(len)];
        let mut at = offset;
        while at < offset + len {
            let n = piece(offset + len - at);
            self.write_at(&zeroes[..n], at, false)?;
            at += n as u64;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Describes `[offset, offset + len)` as runs of data, holes and zeroes. The runs cover
    /// the whole range, in order. A device that cannot tell reports everything as data.
    fn extents(&self, offset: u64, len: u64) -> Result<Extents> {
        check_range(self.info().size, offset, len)?;
        Ok(Extents::all_data(offset, len))
    }

    /// A hint that `[offset, offset + len)` will be read soon. The default does nothing.
    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        check_range(self.info().size, offset, len)
    }

    /// Grows the open disk to `new_size` bytes (larger than its size, a whole number of its
    /// logical blocks): the image is grown durably first, then `info().size` says the new
    /// size, and what lies past the old end reads as zeroes. Requests in flight are not
    /// disturbed. A disk that cannot grow while open fails with [`Error::Unsupported`]
    /// (the default); a filter grows only if it says so (see [`Filter::grow`]).
    fn grow(&self, new_size: u64) -> Result<()> {
        let _ = new_size;
        Err(Error::Unsupported(Op::Grow))
    }

    /// The fast paths this disk offers ([`Lend`]), or `None` (the default): then front ends
    /// use the methods above only. A filter that changes offsets or bytes is correct without
    /// writing anything here; one that passes them through unchanged opts in with
    /// `fn lend(&self) -> Option<&dyn Lend> { self.inner().lend() }`.
    fn lend(&self) -> Option<&dyn Lend> {
        None
    }
}

/// Fast paths a disk may offer beside [`BlockDevice`]'s methods, asked for through
/// [`BlockDevice::lend`]: answering a request on the thread that read it when that needs no
/// wait, and lending or taking buffers instead of copying them. Each must give the same bytes
/// as `read_at` and `write_at` would (the conformance suite checks); each has a default that
/// declines, so an implementation offers only what it has.
pub trait Lend: Send + Sync {
    /// Reads as [`BlockDevice::read_at`] does if that needs no wait for a device or the
    /// network: `Ok(true)` when `buf` is filled, `Ok(false)` when it would wait (then the
    /// contents of `buf` are unspecified; call `read_at` from a thread that may block).
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        let _ = (buf, offset);
        Ok(false)
    }

    /// Writes as [`BlockDevice::write_at`] does (without FUA) if that needs no wait:
    /// `Ok(true)` when all of `buf` is written, `Ok(false)` when it would wait (then part of
    /// `buf` may have been written; call `write_at` with all of it).
    fn try_write_at(&self, buf: &[u8], offset: u64) -> Result<bool> {
        let _ = (buf, offset);
        Ok(false)
    }

    /// The bytes of `[offset, offset + len)` as pieces of the device's own memory, without
    /// copying, or `None` if the device does not lend its buffers (then use `read_at`). The
    /// pieces are a snapshot: later writes do not change them. Never waits.
    fn read_shared(&self, offset: u64, len: usize) -> Result<Option<Vec<Piece>>> {
        let _ = (offset, len);
        Ok(None)
    }

    /// The size of the buffers [`write_owned`](Self::write_owned) takes, or `None` if the
    /// device does not take buffers (then use `write_at`).
    fn write_unit(&self) -> Option<usize> {
        None
    }

    /// Writes by taking ownership of `bufs`, each exactly `write_unit()` bytes, laid end to
    /// end from `offset`, which must be a multiple of the unit. Returns the buffers it
    /// replaced, for the caller to reuse. Never waits.
    fn write_owned(
        &self,
        offset: u64,
        bufs: Vec<std::sync::Arc<[u8]>>,
    ) -> Result<Vec<std::sync::Arc<[u8]>>> {
        let _ = (offset, bufs);
        Err(Error::Unsupported(Op::Write))
    }
}

/// Checks a live grow from `size` to `new_size` bytes: larger (or the same, which does
/// nothing), and a whole number of `block` bytes. A disk shrinks only while closed.
pub fn check_grow(size: u64, new_size: u64, block: u32) -> Result<()> {
    let why = if new_size < size {
        format!(
            "a disk shrinks only while closed ({new_size} bytes is less than its {size}): \
             close it, then `vdk resize FILE SIZE --shrink`"
        )
    } else if !new_size.is_multiple_of(u64::from(block.max(1))) {
        format!("{new_size} bytes is not a whole number of the disk's {block}-byte blocks")
    } else {
        return Ok(());
    };
    Err(Error::Io(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        why,
    )))
}

/// Checks that `[offset, offset + len)` lies inside a disk of `size` bytes.
///
/// A zero-length range at `size` is inside; one at `size + 1` is not. Overflowing ranges are
/// out of range, never wrapped.
///
/// ```
/// use vdk_core::check_range;
/// assert!(check_range(4096, 0, 4096).is_ok());
/// assert!(check_range(4096, 4096, 0).is_ok());
/// assert!(check_range(4096, 4095, 2).is_err());
/// assert!(check_range(4096, u64::MAX, 2).is_err());
/// ```
pub fn check_range(size: u64, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}
