//! File systems in user space over vdk disks.
//!
//! [`iso9660`] reads an ISO 9660 image (with Joliet, Rock Ridge and El Torito) from any
//! [`BlockDevice`](vdk_core::BlockDevice): an ISO file, or an ISO inside a qcow2 image or any
//! other disk vdk opens. [`IsoMount`] shows it as a read-only FUSE file system. [`FuseMount`]
//! mounts every vdk file system (the cloud drive's too) the same way.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// Tests build small images from constants; production code converts with checks.
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

mod fuse;
pub mod iso9660;
mod mount;

pub use fuse::{IsoMount, DEFAULT_THREADS};
pub use mount::{FuseMount, MountSpec};
