//! The platform's calls behind a raw image file, one file per platform with the same names
//! (the shape of vdk_core::sys): holes and zero ranges, extents, reads and writes that do
//! not wait for the disk, read-ahead hints, direct I/O.

#[cfg(target_os = "linux")]
#[path = "linux.rs"]
mod os;
#[cfg(windows)]
#[path = "windows.rs"]
mod os;

pub use os::*;
