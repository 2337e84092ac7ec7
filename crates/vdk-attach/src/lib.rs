//! Attaching vdk disks to the Linux kernel, so that the system sees a block device.
//!
//! One interface, [`Attach`], with one implementation on these machines: **fuse-loop**, a
//! FUSE mount owned by the process that serves the disks, with one file per disk
//! ([`FuseExport`]), and a loop device on each file ([`LoopDevice`]). It needs no kernel module
//! beyond FUSE and loop. The kernel NBD client and ublk belong beside it, behind the same
//! trait, on kernels that have them.
// Only the loop device ioctls need unsafe code (loopdev.rs allows it there).
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod fuse;
#[allow(unsafe_code)]
pub mod loopdev;
pub mod nbd;
pub mod ublk;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

pub use fuse::FuseExport;
pub use loopdev::{LoopDevice, LoopOptions};
pub use nbd::KernelNbd;
pub use ublk::{Ublk, ZeroCopy};
use vdk_core::BlockDevice;

/// A way of giving the kernel a block device for a disk.
pub trait Attach: Send + Sync + fmt::Debug {
    /// Its name on the command line (`fuse-loop`).
    fn name(&self) -> &'static str;

    /// Attaches `device` under `name` (unique among attached disks; a file name).
    fn attach(
        &self,
        name: &str,
        device: Arc<dyn BlockDevice>,
        read_only: bool,
    ) -> io::Result<Box<dyn Attached>>;
}

/// Whoever counts a disk's requests, told of those that reach its file without passing
/// through the disk (ublk zero copy: the kernel reads and writes the image's file itself).
pub trait Direct: Send + Sync {
    /// Whether the disk still takes requests; once it was closed they fail.
    fn is_open(&self) -> bool;
    /// A write of `[offset, offset + len)` is about to be sent to the file (a backup may
    /// copy what it overwrites first).
    fn before_write(&self, offset: u64, len: u64);
    /// A read (or, with `write`, a write) of `[offset, offset + len)` done on the file, well
    /// (`ok`) or not.
    fn done(&self, write: bool, offset: u64, len: u64, ok: bool);
}

/// A disk attached to the kernel.
pub trait Attached: Send + Sync + fmt::Debug {
    /// The block device the system sees (`/dev/loop3`).
    fn block_device(&self) -> PathBuf;

    /// Detaches it. The caller has unmounted what it could; a device still in use (a lazily
    /// unmounted file system) is detached by the kernel when that lets go, and its I/O fails
    /// from now on.
    fn detach(self: Box<Self>) -> io::Result<()>;

    /// Tells the block device that its disk grew to `new_size` bytes: afterwards the kernel
    /// sees the new size (`blockdev --getsize64`) and a mounted file system can grow into it
    /// (`resize2fs`). Fails with `Unsupported`, naming what is missing, where the kernel
    /// cannot change the device's size.
    fn grow(&self, new_size: u64) -> io::Result<()>;
}

/// fuse-loop: a file in a [`FuseExport`], under a loop device with direct I/O.
#[derive(Debug)]
pub struct FuseLoop {
    export: Arc<FuseExport>,
}

impl FuseLoop {
    /// Attaches through `export`.
    pub fn new(export: FuseExport) -> FuseLoop {
        FuseLoop {
            export: Arc::new(export),
        }
    }

    /// The FUSE export underneath.
    pub fn export(&self) -> &FuseExport {
        &self.export
    }
}

impl Attach for FuseLoop {
    fn name(&self) -> &'static str {
        "fuse-loop"
    }

    fn attach(
        &self,
        name: &str,
        device: Arc<dyn BlockDevice>,
        read_only: bool,
    ) -> io::Result<Box<dyn Attached>> {
        self.attach_with_backing(name, device, read_only, None)
    }
}

impl FuseLoop {
    /// [`Attach::attach`] of a disk that `backing` holds byte for byte: the loop device then
    /// reads and writes that file through FUSE passthrough where the kernel has it
    /// ([`FuseExport::add_with_backing`]).
    pub fn attach_with_backing(
        &self,
        name: &str,
        device: Arc<dyn BlockDevice>,
        read_only: bool,
        backing: Option<std::fs::File>,
    ) -> io::Result<Box<dyn Attached>> {
        let info = device.info();
        let read_only = read_only || info.read_only;
        // A passed-through file reaches the image in the kernel: the loop device then reads
        // and writes it through the image's page cache, as a loop device on the image would
        // (flushes still come to the daemon, which syncs the image). A served file is read
        // with direct I/O, so that its pages are not cached twice.
        let direct_io = backing.is_none();
        let path = self
            .export
            .add_with_backing(name, device, read_only, backing)?;
        let attached = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .and_then(|file| {
                let opts = LoopOptions {
                    read_only,
                    direct_io,
                    block_size: info.logical_block_size.clamp(512, 4096),
                };
                LoopDevice::attach(&file, opts)
            });
        match attached {
            Ok(loopdev) => Ok(Box::new(FuseLoopDisk {
                name: name.to_owned(),
                loopdev,
                export: Arc::clone(&self.export),
            })),
            Err(e) => {
                self.export.remove(name);
                Err(e)
            }
        }
    }
}

/// A disk attached by [`FuseLoop`].
#[derive(Debug)]
struct FuseLoopDisk {
    name: String,
    loopdev: LoopDevice,
    export: Arc<FuseExport>,
}

impl Attached for FuseLoopDisk {
    fn block_device(&self) -> PathBuf {
        self.loopdev.path()
    }

    fn detach(self: Box<Self>) -> io::Result<()> {
        let detached = self.loopdev.detach();
        self.export.remove(&self.name);
        detached
    }

    fn grow(&self, new_size: u64) -> io::Result<()> {
        self.export.grow(&self.name, new_size)?;
        self.loopdev.set_capacity()
    }
}
