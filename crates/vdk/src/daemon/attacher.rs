//! Block devices for disks: ublk, or fuse-loop (the daemon's FUSE export, mounted on first
//! use, and a loop device over a file of it for each disk).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tracing::info;
use vdk_attach::nbd::Connect;
use vdk_attach::{Attach as _, Attached, FuseExport, FuseLoop, KernelNbd, Ublk, ZeroCopy};
use vdk_core::sync::lock;
use vdk_core::BlockDevice;

use crate::control::{ApiError, Attach, ErrorKind};

/// What `--attach auto` means on this kernel: ublk where it has the driver, else fuse-loop.
pub fn auto() -> Attach {
    if Ublk::new().is_ok() {
        Attach::Ublk
    } else {
        Attach::FuseLoop
    }
}

/// Attaches disks as ublk devices, kernel NBD devices, or loop devices over the daemon's
/// FUSE export.
pub struct Attacher {
    /// Where the FUSE export is mounted.
    dir: PathBuf,
    threads: usize,
    /// FUSE passthrough for disks with a backing file (`--fuse-passthrough`).
    passthrough: bool,
    /// ublk zero copy for them, where the kernel offers it (unless `--ublk-copy`).
    zero_copy: bool,
    /// The fuse-loop attacher, made (and its FUSE export mounted) on first use.
    fuse_loop: Mutex<Option<Arc<FuseLoop>>>,
    /// Connections to the daemon's NBD server, for the kernel's NBD client.
    connect: Connect,
}

impl std::fmt::Debug for Attacher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attacher")
            .field("dir", &self.dir)
            .field("fuse_loop", &self.fuse_loop)
            .finish_non_exhaustive()
    }
}

impl Attacher {
    /// Attaches over a FUSE export on `dir` served by `threads` threads, once asked to.
    /// Kernel NBD devices connect through `connect`; with `passthrough`, fuse-loop passes
    /// the disks that have a backing file through to it; with `zero_copy`, ublk reads and
    /// writes that file with no copy where the kernel can.
    pub fn new(
        dir: PathBuf,
        (threads, passthrough, zero_copy): (usize, bool, bool),
        connect: Connect,
    ) -> Attacher {
        Attacher {
            dir,
            threads,
            passthrough,
            zero_copy,
            fuse_loop: Mutex::new(None),
            connect,
        }
    }

    fn fuse_loop(&self) -> Result<Arc<FuseLoop>, ApiError> {
        let mut slot = lock(&self.fuse_loop);
        if let Some(a) = &*slot {
            return Ok(Arc::clone(a));
        }
        let export = FuseExport::mount(&self.dir, self.threads)
            .map_err(|e| ApiError::io("cannot start the FUSE export", &e))?;
        let a = Arc::new(FuseLoop::new(export));
        *slot = Some(Arc::clone(&a));
        Ok(a)
    }

    /// Gives the disk `id` (serving `device`) a block device of the `kind` asked for;
    /// `backing` is the file that holds the disk byte for byte, if one does, for FUSE
    /// passthrough (fuse-loop) or zero copy (ublk).
    pub fn attach(
        &self,
        kind: Attach,
        (id, export): (&str, &str),
        device: Arc<dyn BlockDevice>,
        read_only: bool,
        backing: Option<ZeroCopy>,
    ) -> Result<Box<dyn Attached>, ApiError> {
        let attached = match kind {
            Attach::Nbd => KernelNbd::new(export, Arc::clone(&self.connect))
                .map_err(|e| ApiError::new(ErrorKind::Unsupported, e.to_string()))?
                .attach(id, device, read_only)
                .map_err(|e| ApiError::io("cannot attach a kernel NBD device", &e))?,
            Attach::Ublk => Ublk::new()
                .map_err(|e| ApiError::new(ErrorKind::Unsupported, e.to_string()))?
                .attach_zero_copy(id, device, read_only, backing)
                .map_err(|e| ApiError::io("cannot attach a ublk device", &e))?,
            Attach::FuseLoop => self
                .fuse_loop()?
                .attach_with_backing(id, device, read_only, backing.map(|b| b.file))
                .map_err(|e| ApiError::io("cannot attach a loop device", &e))?,
            other => {
                return Err(ApiError::new(
                    ErrorKind::Unsupported,
                    format!("--attach {other} gives no block device of vdk's own"),
                ))
            }
        };
        info!(id, dev = %attached.block_device().display(), "attached");
        Ok(attached)
    }

    /// Whether fuse-loop passes disks with a backing file through to it.
    pub fn passthrough(&self) -> bool {
        self.passthrough
    }

    /// Whether ublk reads and writes a disk's backing file with no copy (the kernel offers
    /// it, and the daemon was not told otherwise).
    pub fn zero_copy(&self) -> bool {
        self.zero_copy && vdk_attach::ublk::zero_copy_offered()
    }

    /// Unmounts the FUSE export (every disk is detached by now).
    pub fn stop(&self) {
        if let Some(a) = lock(&self.fuse_loop).take() {
            a.export().unmount();
        }
    }
}
