//! Elsewhere (Windows): no holes, no zeroing without writing, no page-cache fast paths, no
//! direct I/O; every file still works, only with less of what Linux offers.

use std::fs::{File, OpenOptions};
use std::io;

use vdk_core::Extents;

fn unsupported() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "sparse files are not done on this system yet",
    )
}

/// Not here yet: the caller writes zeroes.
pub fn punch_hole(_: &File, _: u64, _: u64) -> io::Result<()> {
    Err(unsupported())
}

/// Not here yet: the caller writes zeroes.
pub fn zero(_: &File, _: u64, _: u64, _: bool) -> io::Result<()> {
    Err(unsupported())
}

/// All data: holes are not asked for here yet.
pub fn extents(_: &File, offset: u64, len: u64) -> io::Result<Extents> {
    Ok(Extents::all_data(offset, len))
}

/// A hint not given here yet.
pub fn will_need(_: &File, _: u64, _: u64) {}

/// Never done without waiting here yet: the caller reads on a thread that may wait.
pub fn read_cached(_: &File, _: &mut [u8], _: u64) -> bool {
    false
}

/// Never done without waiting here yet.
pub fn write_cached(_: &File, _: &[u8], _: u64) -> Option<bool> {
    None
}

/// Not here yet.
pub fn set_direct(_oo: &mut OpenOptions) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "direct i/o is not done on this system yet",
    ))
}
