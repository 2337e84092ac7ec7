//! Linux: sparse files (holes, zero ranges, SEEK_DATA), page-cache reads and writes that
//! do not wait, O_DIRECT.
use std::fs::{File, OpenOptions};
use std::io;

use rustix::fs::{fallocate, FallocateFlags, SeekFrom};
use rustix::io::Errno;
use vdk_core::{ExtentKind, Extents};

/// Files are sparse by nature here: nothing to do.
pub fn set_sparse(_: &File) -> io::Result<()> {
    Ok(())
}

pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
    Ok(fallocate(file, flags, offset, len)?)
}

/// Zeroes the range without writing data: a hole if `may_trim`, else allocated zeroes.
pub fn zero(file: &File, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
    if may_trim {
        return punch_hole(file, offset, len);
    }
    let zero_range = FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE;
    if fallocate(file, zero_range, offset, len).is_ok() {
        return Ok(());
    }
    // tmpfs and others: a hole, provisioned again.
    punch_hole(file, offset, len)?;
    Ok(fallocate(file, FallocateFlags::KEEP_SIZE, offset, len)?)
}

pub fn extents(file: &File, offset: u64, len: u64) -> io::Result<Extents> {
    let end = offset + len;
    let mut map = Extents::new(offset);
    let mut pos = offset;
    while pos < end {
        let data = match rustix::fs::seek(file, SeekFrom::Data(pos)) {
            Ok(d) => d.min(end),
            Err(Errno::NXIO) => end, // no data after pos
            Err(e) => return Err(e.into()),
        };
        map.push(data - pos, ExtentKind::Hole);
        if data >= end {
            break;
        }
        let hole = rustix::fs::seek(file, SeekFrom::Hole(data))?.min(end);
        map.push(hole - data, ExtentKind::Data);
        pos = hole;
    }
    Ok(map)
}

/// Reads all of `buf` from the page cache, without waiting for the disk: `preadv2` with
/// `RWF_NOWAIT`. False if any of it is not cached (or the kernel lacks the flag).
pub fn read_cached(file: &File, buf: &mut [u8], offset: u64) -> bool {
    let want = buf.len();
    let mut bufs = [std::io::IoSliceMut::new(buf)];
    let flags = rustix::io::ReadWriteFlags::NOWAIT;
    matches!(rustix::io::preadv2(file, &mut bufs, offset, flags), Ok(n) if n == want)
}

/// Writes all of `buf` into the page cache without waiting (`pwritev2` with
/// `RWF_NOWAIT`). False if that would block (part may have been written); `None` if the
/// file system never allows it (many refuse buffered `RWF_NOWAIT` writes).
pub fn write_cached(file: &File, buf: &[u8], offset: u64) -> Option<bool> {
    let bufs = [std::io::IoSlice::new(buf)];
    let flags = rustix::io::ReadWriteFlags::NOWAIT;
    match rustix::io::pwritev2(file, &bufs, offset, flags) {
        Ok(n) => Some(n == buf.len()),
        Err(Errno::OPNOTSUPP | Errno::INVAL) => None,
        Err(_) => Some(false),
    }
}

pub fn will_need(file: &File, offset: u64, len: u64) {
    let advice = rustix::fs::Advice::WillNeed;
    // A hint: failure changes nothing the caller could act on.
    let _ = rustix::fs::fadvise(file, offset, std::num::NonZeroU64::new(len), advice);
}

/// Opens with `O_DIRECT`: reads and writes bypass the page cache.
pub fn set_direct(oo: &mut OpenOptions) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    // The flag's bits fit an i32: O_DIRECT is 0o40000.
    oo.custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
    Ok(())
}
