//! Closing disks: unmount (after a sync), detach, withdraw the exports, flush, forget.

use tracing::{info, warn};
use vdk_core::sync::lock;

use super::disks::Disk;
#[cfg(target_os = "linux")]
use super::mount;
use super::Daemon;
use crate::control::{ApiError, DiskStatus, ErrorKind};

impl Daemon {
    /// Unmounts, detaches, withdraws the exports and flushes. With `force`, a busy mount is
    /// detached lazily and the disk refuses everything still queued.
    pub(super) fn tear_down(&self, disk: &Disk, force: bool) -> Result<(), ApiError> {
        if disk.device.is_backing_up() && !force {
            return Err(ApiError::new(
                ErrorKind::Busy,
                format!(
                    "{} is being backed up: wait for the backup, or --force to end it (its target is removed)",
                    disk.id
                ),
            ));
        }
        if super::vhost::connected(disk) && !force {
            return Err(ApiError::new(
                ErrorKind::Busy,
                format!(
                    "{} is attached to a VM (vhost-user socket {}): shut the VM down or detach the disk first, or --force",
                    disk.id,
                    super::vhost::path(disk).unwrap_or_default().display()
                ),
            ));
        }
        #[cfg(target_os = "linux")]
        self.unmount_all_of(disk, force)?;
        // Windows lets go of the disk (flushing it) before its LUN goes; with `force` the
        // disk goes even if the logout failed.
        #[cfg(windows)]
        if let Err(e) = self.logout(disk) {
            if !force {
                return Err(e);
            }
        }
        self.detach(disk);
        // The VM's connection ends; the socket goes.
        let _ = lock(&disk.vhost).take();
        if let Some(l) = lock(&disk.iscsi).take() {
            self.iscsi.withdraw(&l);
        }
        self.nbd.withdraw(&disk.export);
        disk.device.close();
        let image = lock(&disk.medium).image.clone();
        disk.device.flush_backend().map_err(|e| {
            ApiError::new(ErrorKind::Io, format!("flushing {}: {e}", image.display()))
        })?;
        // The image's bitmaps as they are now, no longer in use.
        let store = lock(&disk.recipe).bitmap_store.clone();
        if let Some(store) = store {
            store
                .save(&disk.device.bitmaps().all(), false)
                .map_err(|e| {
                    ApiError::new(
                        ErrorKind::Io,
                        format!("saving the dirty bitmaps of {}: {e}", image.display()),
                    )
                })?;
        }
        Ok(())
    }

    /// Closes a disk: unmount (sync first), detach, stop the export, flush, release.
    pub(super) fn close(&self, key: &str, force: bool) -> Result<DiskStatus, ApiError> {
        let _one_at_a_time = lock(&self.changing);
        let disk = self.disks.find(key)?;
        let status = self.status(&disk);
        let torn = self.tear_down(&disk, force);
        // Detached or not, a disk that got this far is no longer served: forget it, unless
        // the unmount was refused (then nothing changed).
        if matches!(&torn, Err(e) if e.kind == ErrorKind::Busy) {
            return torn.map(|()| status);
        }
        self.disks.remove(&disk.id);
        info!(id = %disk.id, "disk closed");
        torn.map(|()| status)
    }

    /// Closes every disk (forcing busy ones: the daemon is going away) and the FUSE export.
    pub(super) fn close_all(&self) {
        #[cfg(target_os = "linux")]
        self.fs.unmount_all();
        let _one_at_a_time = lock(&self.changing);
        for d in self.disks.all() {
            let closed = match self.tear_down(&d, false) {
                Err(e) if e.kind == ErrorKind::Busy => {
                    warn!(id = %d.id, "{}; closing it anyway", e.message);
                    self.tear_down(&d, true)
                }
                r => r,
            };
            match closed {
                Ok(()) => info!(id = %d.id, "disk closed"),
                Err(e) => warn!(id = %d.id, error = %e.message, "disk closed with an error"),
            }
            self.disks.remove(&d.id);
        }
        #[cfg(target_os = "linux")]
        self.attacher.stop();
        self.iscsi.stop();
    }

    /// Unmounts what is mounted on a disk and the ISO browsers reading it; with `force`, busy
    /// ones lazily, and the disk refuses what they still send.
    #[cfg(target_os = "linux")]
    fn unmount_all_of(&self, disk: &Disk, force: bool) -> Result<(), ApiError> {
        let mount = lock(&disk.state).mount.clone();
        for dir in self.fs.on_disk(&disk.id) {
            if mount.as_ref() == Some(&dir) {
                continue; // the disk's own mount (a CD-ROM's, by the ISO browser): below
            }
            if !force {
                return Err(ApiError::new(
                    ErrorKind::Busy,
                    format!(
                        "{} has a file system mounted on {} (vdk fs unmount it, or close \
                         with --force)",
                        disk.id,
                        dir.display()
                    ),
                ));
            }
            self.fs.detach(&dir);
        }
        if let Some(dir) = mount {
            if disk.cdrom {
                self.fs.unmount(&dir, force)?;
            } else if force {
                // What the busy mount still sends fails, as on a disk pulled out.
                if let Err(e) = mount::unmount(&dir, false) {
                    warn!(id = %disk.id, error = %e.message, "forcing the disk closed");
                    disk.device.close();
                    mount::unmount(&dir, true)?;
                }
            } else {
                mount::unmount(&dir, false)?;
            }
            lock(&disk.state).mount = None;
        }
        Ok(())
    }
}
