//! What the kernel sees of a disk, on Windows: no block device of vdk's own yet (the Linux
//! daemon's fuse-loop has no Windows twin; the built-in iSCSI initiator will attach disks
//! served with `--iscsi`), so there is nothing to format, mount or detach here. `open`
//! refuses `--attach fuse-loop`, `--mkfs` and `--mount` before any of these is reached.

use std::path::Path;

use super::disks::Disk;
use super::Daemon;
use crate::control::{ApiError, DiskStatus, ErrorKind, MountRequest};

/// Why a request needs what Windows has no vdk block device for.
fn no_block_device() -> ApiError {
    ApiError::new(
        ErrorKind::Unsupported,
        "no block devices on Windows yet: serve the disk over iSCSI (vdk open IMAGE --iscsi) and \
         log Windows' iSCSI initiator in to it (docs/windows.md)",
    )
}

impl Daemon {
    /// Mounting is Windows' own, once its initiator has the disk.
    pub(super) fn mount(&self, _req: MountRequest) -> Result<DiskStatus, ApiError> {
        Err(no_block_device())
    }

    /// Nothing is mounted by vdk on Windows.
    pub(super) fn unmount(&self, key: &str, _force: bool) -> Result<DiskStatus, ApiError> {
        let disk = self.disks.find(key)?;
        Err(ApiError::invalid(format!("{} is not mounted", disk.id)))
    }

    /// Formatting is Windows' own (Format-Volume), once its initiator has the disk.
    pub(super) fn format(
        &self,
        _disk: &Disk,
        _fs: &str,
        _force: bool,
        _again: &dyn Fn(&str) -> String,
    ) -> Result<(), ApiError> {
        Err(no_block_device())
    }

    /// No block device to give.
    pub(super) fn attach(&self, _disk: &Disk) -> Result<(), ApiError> {
        Err(no_block_device())
    }

    /// No file system to mount.
    pub(super) fn mount_disk(
        &self,
        _disk: &Disk,
        _dir: &Path,
        _fs: Option<&str>,
        _again: &dyn Fn(&str) -> String,
    ) -> Result<(), ApiError> {
        Err(no_block_device())
    }

    /// Nothing attached, nothing to take away.
    pub(super) fn detach(&self, _disk: &Disk) {}
}
