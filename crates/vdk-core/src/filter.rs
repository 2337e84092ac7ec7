//! Filters: disks that wrap a disk.
//!
//! A filter implements [`Filter`]: it names its inner disk and overrides what it changes;
//! every other method passes straight through, and the blanket implementation makes it a
//! [`BlockDevice`]. The fast paths ([`Lend`]) do not pass through: a filter offers none unless
//! it says so, so one that moves offsets or changes data is correct when it overrides only the
//! methods it changes. A filter that changes nothing a fast path would see opts in with one
//! line (`fn lend(&self) -> Option<&dyn Lend> { self.inner().lend() }`); one that changes
//! something implements [`Lend`] itself over its inner disk's.

use std::sync::Arc;

use crate::{BlockDevice, DiskInfo, Extents, Lend, Piece, Result};

/// A disk that wraps a disk. See the module documentation.
#[allow(missing_docs)] // each method is BlockDevice's, documented there
pub trait Filter: Send + Sync + std::fmt::Debug {
    /// The disk below.
    fn inner(&self) -> &Arc<dyn BlockDevice>;

    fn info(&self) -> DiskInfo {
        self.inner().info()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner().read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.inner().write_at(buf, offset, fua)
    }
    fn flush(&self) -> Result<()> {
        self.inner().flush()
    }
    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.inner().trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<()> {
        self.inner().write_zeroes(offset, len, may_trim, fua)
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Extents> {
        self.inner().extents(offset, len)
    }
    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.inner().cache(offset, len)
    }
    /// None: see the module documentation.
    fn lend(&self) -> Option<&dyn Lend> {
        None
    }
    /// Refused: a filter that keeps anything sized by its disk, or moves offsets, must not
    /// let the disk below grow under it. One that does not opts in with
    /// `fn grow(&self, new_size: u64) -> Result<()> { self.inner().grow(new_size) }`.
    fn grow(&self, new_size: u64) -> Result<()> {
        let _ = new_size;
        Err(crate::Error::Unsupported(crate::Op::Grow))
    }
}

impl<F: Filter> BlockDevice for F {
    fn info(&self) -> DiskInfo {
        Filter::info(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Filter::read_at(self, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        Filter::write_at(self, buf, offset, fua)
    }
    fn flush(&self) -> Result<()> {
        Filter::flush(self)
    }
    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        Filter::trim(self, offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<()> {
        Filter::write_zeroes(self, offset, len, may_trim, fua)
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Extents> {
        Filter::extents(self, offset, len)
    }
    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        Filter::cache(self, offset, len)
    }
    fn lend(&self) -> Option<&dyn Lend> {
        Filter::lend(self)
    }
    fn grow(&self, new_size: u64) -> Result<()> {
        Filter::grow(self, new_size)
    }
}

/// Reads pass through, fast or not; writes are refused (`try_write_at` too), and no buffer
/// is taken.
impl Lend for ReadOnly {
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        self.inner
            .lend()
            .map_or(Ok(false), |l| l.try_read_at(buf, offset))
    }
    fn try_write_at(&self, _buf: &[u8], _offset: u64) -> Result<bool> {
        Err(crate::Error::ReadOnly)
    }
    fn read_shared(&self, offset: u64, len: usize) -> Result<Option<Vec<Piece>>> {
        self.inner
            .lend()
            .map_or(Ok(None), |l| l.read_shared(offset, len))
    }
}

/// Refuses every write, trim and zero write below the protocol: the disk itself says no.
#[derive(Debug)]
pub struct ReadOnly {
    inner: Arc<dyn BlockDevice>,
}

impl ReadOnly {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn BlockDevice>) -> ReadOnly {
        ReadOnly { inner }
    }
}

impl Filter for ReadOnly {
    fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }
    fn info(&self) -> DiskInfo {
        let mut info = self.inner.info();
        info.read_only = true;
        info.caps.trim = false;
        info.caps.fast_zero = false;
        info
    }
    fn write_at(&self, _buf: &[u8], _offset: u64, _fua: bool) -> crate::Result<()> {
        Err(crate::Error::ReadOnly)
    }
    fn lend(&self) -> Option<&dyn Lend> {
        self.inner.lend().map(|_| self as &dyn Lend)
    }
    fn trim(&self, _offset: u64, _len: u64) -> crate::Result<()> {
        Err(crate::Error::ReadOnly)
    }
    fn write_zeroes(&self, _o: u64, _l: u64, _t: bool, _f: bool) -> crate::Result<()> {
        Err(crate::Error::ReadOnly)
    }
}
