//! Windows: sparse files on NTFS (`FSCTL_SET_ZERO_DATA`, `FSCTL_QUERY_ALLOCATED_RANGES`, through
//! vdk_core::sys), unbuffered I/O for `--direct`. Where the file system has no sparse files
//! (FAT32, exFAT) the controls fail and callers write zeroes and report all data. No
//! page-cache fast paths: reads and writes go to a thread that may wait.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::windows::fs::OpenOptionsExt;

use vdk_core::{ExtentKind, Extents};

/// `FILE_FLAG_NO_BUFFERING`: no system cache, sector-aligned transfers.
const FILE_FLAG_NO_BUFFERING: u32 = 0x2000_0000;
/// `FILE_FLAG_WRITE_THROUGH`: a write returns once it is on the device.
const FILE_FLAG_WRITE_THROUGH: u32 = 0x8000_0000;

/// Marks a file sparse, so that zeroed ranges take no space; an error where the file
/// system has no sparse files.
pub fn set_sparse(file: &File) -> io::Result<()> {
    vdk_core::sys::set_sparse(file)
}

/// Frees the range of a sparse file (zeroes it in any other).
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    vdk_core::sys::punch_hole(file, offset, len)
}

/// Zeroes the range without writing data, if it may become a hole (`may_trim`): NTFS has
/// no allocated zeroes to give, so a range that must stay allocated is `Unsupported` and
/// the caller writes zeroes.
pub fn zero(file: &File, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
    if !may_trim {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "NTFS keeps no allocated zeroes: written instead",
        ));
    }
    punch_hole(file, offset, len)
}

/// Data where the file has space allocated, holes between; `Unsupported` where the file
/// system cannot say (callers then report all of it as data).
pub fn extents(file: &File, offset: u64, len: u64) -> io::Result<Extents> {
    // Whatever stops the file system from saying, all-data is a true answer.
    let ranges = vdk_core::sys::allocated_ranges(file, offset, len)
        .map_err(|e| io::Error::new(io::ErrorKind::Unsupported, e))?;
    let mut map = Extents::new(offset);
    let mut at = offset;
    for (start, run) in ranges {
        let end = start + run;
        if end <= at {
            continue;
        }
        let start = start.max(at);
        map.push(start - at, ExtentKind::Hole);
        map.push(end - start, ExtentKind::Data);
        at = end;
    }
    map.push((offset + len).saturating_sub(at), ExtentKind::Hole);
    Ok(map)
}

/// A hint Windows takes no call for: the cache manager reads ahead by itself.
pub fn will_need(_: &File, _: u64, _: u64) {}

/// Never done without waiting here: the caller reads on a thread that may wait.
pub fn read_cached(_: &File, _: &mut [u8], _: u64) -> bool {
    false
}

/// Never done without waiting here.
pub fn write_cached(_: &File, _: &[u8], _: u64) -> Option<bool> {
    None
}

/// Unbuffered and written through: `--direct` bypasses the system cache as O_DIRECT does.
pub fn set_direct(oo: &mut OpenOptions) -> io::Result<()> {
    oo.custom_flags(FILE_FLAG_NO_BUFFERING | FILE_FLAG_WRITE_THROUGH);
    Ok(())
}
