//! Backends: where the bytes of a disk live, for disks that are not an image format (those
//! are in vdk-formats; disks in object storage in vdk-objstore).
//!
//! - [`FileDisk`]: a raw image file, sparse-aware on Linux (holes from SEEK_DATA/SEEK_HOLE,
//!   trim and zeroes by fallocate).
//! - [`MemoryDisk`]: a sparse RAM disk that allocates on first write and frees on trim.
//! - [`PatternDisk`]: a read-only computed test disk whose words hold their own offsets.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// Tests build small buffers from constants; production code converts with checks.
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

mod file;
mod memory;
mod pattern;
mod sys;

pub use file::{check_not_written, file_extents, lock_image, FileDisk, FileOptions};
pub use memory::MemoryDisk;
pub use pattern::PatternDisk;
