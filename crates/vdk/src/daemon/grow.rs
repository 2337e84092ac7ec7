//! `vdk resize ID SIZE` of an open disk: the image grows first (durably), then everything
//! that shows the disk is told: the block device (fuse-loop's loop device, ublk, kernel NBD),
//! iSCSI initiators (a CAPACITY DATA HAS CHANGED unit attention), a VM on its vhost-user
//! socket (a virtio config change), and new NBD connections
//! (a connection keeps the size it was told at its handshake: NBD has no way to say it
//! changed). A disk shrinks only while closed.

use tracing::info;
use vdk_core::sync::lock;
use vdk_core::BlockDevice;

use super::Daemon;
use crate::control::{ApiError, DiskStatus, ErrorKind};

impl Daemon {
    /// Grows the open disk `key` to `new_size` bytes. Growing to the size it has does no
    /// harm: it tells the front ends again (after a block device that could not follow).
    pub(super) fn grow(&self, key: &str, new_size: u64) -> Result<DiskStatus, ApiError> {
        let _one_at_a_time = lock(&self.changing);
        let disk = self.disks.find(key)?;
        if disk.cdrom {
            return Err(ApiError::invalid(format!(
                "{} is a CD-ROM disk: its disc has the size it has",
                disk.id
            )));
        }
        if disk.read_only {
            return Err(ApiError::invalid(format!(
                "{} is open read-only: it cannot grow",
                disk.id
            )));
        }
        if lock(&disk.filters)
            .iter()
            .any(|f| f == "cow" || f.starts_with("cow:"))
        {
            // Its overlay would outgrow the base, which a commit then could not take.
            return Err(ApiError::new(
                ErrorKind::Unsupported,
                format!(
                    "{} is a cow disk: its overlay cannot grow past its base; commit or \
                     discard, close it, `vdk resize` the base, and open it again",
                    disk.id
                ),
            ));
        }
        let old = disk.device.info().size;
        disk.device.grow(new_size).map_err(|e| match e {
            vdk_core::Error::Unsupported(_) => {
                let medium = lock(&disk.medium).clone();
                let filters = lock(&disk.filters).clone();
                let through = if filters.is_empty() {
                    String::new()
                } else {
                    format!(" through the filters {}", filters.join(", "))
                };
                ApiError::new(
                    ErrorKind::Unsupported,
                    format!(
                        "{} ({} image{through}) cannot grow while open: vdk grows raw and \
                         qcow2 images with no filter but stats and inject; close it, \
                         `vdk resize {} SIZE`, and open it again",
                        disk.id,
                        medium.format,
                        medium.image.display()
                    ),
                )
            }
            vdk_core::Error::Io(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                ApiError::invalid(format!("{}: {e}", disk.id))
            }
            vdk_core::Error::Io(e) => ApiError::io(format!("cannot grow {}", disk.id), &e),
            e => ApiError::new(ErrorKind::Io, format!("cannot grow {}: {e}", disk.id)),
        })?;
        lock(&disk.medium).size = new_size;
        if new_size != old {
            info!(id = %disk.id, from = old, to = new_size, "disk grew");
        }
        if let Some(l) = lock(&disk.iscsi).as_ref() {
            l.unit.capacity_changed();
        }
        // Said to the VM before the block device is grown; its failure is reported after.
        let vm = super::vhost::tell_grown(&disk, new_size);
        #[cfg(target_os = "linux")]
        {
            let st = lock(&disk.state);
            if let (Some(a), Some(dev)) = (&st.attached, &st.block_device) {
                a.grow(new_size).map_err(|e| {
                    ApiError::new(
                        ErrorKind::Unsupported,
                        format!(
                            "{} grew to {new_size} bytes (its NBD export and iSCSI LUN have \
                             the new size), but its block device {} did not: {e}",
                            disk.id,
                            dev.display()
                        ),
                    )
                })?;
                info!(id = %disk.id, device = %dev.display(), "block device grew");
            }
        }
        vm?;
        #[cfg(windows)]
        {
            // Windows' initiator got the unit attention; Update-Disk makes it read the size.
            let st = lock(&disk.state);
            let n = st
                .session
                .as_ref()
                .and(st.block_device.as_ref())
                .and_then(|d| super::initiator::disk_of_path(&d.to_string_lossy()));
            drop(st);
            if let Some(n) = n {
                super::initiator::run(
                    "telling Windows the disk grew",
                    &super::initiator::rescan_script(n),
                )?;
            }
        }
        Ok(self.status(&disk))
    }
}
