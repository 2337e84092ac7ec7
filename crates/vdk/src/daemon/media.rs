//! Discs of CD-ROM disks: `vdk eject` takes the disc out, `vdk insert` puts another in.
//!
//! The disk stays open as a drive: its id, and its iSCSI LUN, whose initiators see the medium
//! go (NOT READY, MEDIUM NOT PRESENT) and come back (UNIT ATTENTION, MEDIUM MAY HAVE CHANGED,
//! and a media event). While the drive is empty it has no NBD export and no block device, and
//! its image file is closed; inserting opens the new image and gives both back.

use std::path::Path;
use std::sync::Arc;

use tracing::info;
use vdk_core::sync::lock;

use super::disks::{Disk, Medium};
use super::nbd::ExportSpec;
use super::{tracked, Daemon};
use crate::control::{ApiError, DiskStatus, ErrorKind};

/// Shorthand for the wrong-argument error.
fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::invalid(msg)
}

impl Daemon {
    fn drive(&self, key: &str) -> Result<Arc<Disk>, ApiError> {
        let disk = self.disks.find(key)?;
        if !disk.cdrom {
            return Err(invalid(format!(
                "{} is not a CD-ROM disk (only an ISO image's disc can be ejected or inserted)",
                disk.id
            )));
        }
        Ok(disk)
    }

    /// Takes the disc out of a CD-ROM disk. Refused while its file system is mounted, and,
    /// unless `force`, while an iSCSI initiator prevents medium removal.
    pub(super) fn eject(&self, key: &str, force: bool) -> Result<DiskStatus, ApiError> {
        let _one_at_a_time = lock(&self.changing);
        let disk = self.drive(key)?;
        if lock(&disk.state).ejected {
            return Err(invalid(format!("{} has no disc in it", disk.id)));
        }
        if let Some(m) = &lock(&disk.state).mount {
            return Err(ApiError::new(
                ErrorKind::Busy,
                format!(
                    "{} is mounted on {}: unmount it before ejecting",
                    disk.id,
                    m.display()
                ),
            ));
        }
        if let Some(l) = lock(&disk.iscsi).as_ref() {
            l.unit.eject(force).map_err(|_| {
                ApiError::new(
                    ErrorKind::Busy,
                    format!(
                        "an iSCSI initiator prevents the removal of {}'s disc \
                         (--force ejects it anyway)",
                        disk.id
                    ),
                )
            })?;
        }
        self.detach(&disk);
        self.nbd.withdraw(&disk.export);
        // The image is closed: the file can be replaced or removed while the drive is empty.
        disk.device.swap::<ApiError>(|old| {
            drop(old);
            Ok(tracked::placeholder())
        })?;
        lock(&disk.state).ejected = true;
        info!(id = %disk.id, "disc ejected");
        Ok(self.status(&disk))
    }

    /// Puts the ISO image `image` in a CD-ROM disk, in place of its disc if it has one.
    pub(super) fn insert(&self, key: &str, image: &Path) -> Result<DiskStatus, ApiError> {
        let _one_at_a_time = lock(&self.changing);
        let disk = self.drive(key)?;
        if !image.is_absolute() {
            return Err(invalid(format!(
                "{}: the path must be absolute",
                image.display()
            )));
        }
        let canonical = crate::paths::canonical(image)
            .map_err(|e| ApiError::io(format!("cannot open {}", image.display()), &e))?;
        let shown = canonical.display().to_string();
        let opened = vdk_formats::open(
            &canonical,
            &vdk_formats::OpenOptions {
                format: None,
                read_only: true,
                probe_backing: false,
                ..Default::default()
            },
        )
        .map_err(|e| ApiError::io(format!("cannot open {shown}"), &e))?;
        let info = opened.device.info();
        if info.media != vdk_core::MediaKind::CdRom {
            return Err(invalid(format!(
                "{shown} is a {} image, not a CD/DVD image (ISO 9660)",
                opened.format
            )));
        }
        let was_empty = lock(&disk.state).ejected;
        let prevented = lock(&disk.iscsi)
            .as_ref()
            .is_some_and(|l| l.unit.medium().is_some() && l.unit.removal_prevented());
        if prevented {
            return Err(ApiError::new(
                ErrorKind::Busy,
                format!(
                    "an iSCSI initiator prevents the removal of {}'s disc",
                    disk.id
                ),
            ));
        }
        if !was_empty {
            if let Some(m) = &lock(&disk.state).mount {
                return Err(ApiError::new(
                    ErrorKind::Busy,
                    format!(
                        "{} is mounted on {}: unmount it before changing the disc",
                        disk.id,
                        m.display()
                    ),
                ));
            }
            self.detach(&disk);
            self.nbd.withdraw(&disk.export);
        }
        let device = opened.device;
        disk.device.swap::<ApiError>(|old| {
            drop(old);
            Ok(device)
        })?;
        {
            let mut r = lock(&disk.recipe);
            r.image = canonical.clone();
            r.format = Some(opened.format);
        }
        *lock(&disk.medium) = Medium {
            image: canonical,
            format: opened.format.name().into(),
            size: info.size,
        };
        lock(&disk.state).ejected = false;
        if let Some(l) = lock(&disk.iscsi).as_ref() {
            l.unit.insert(disk.device.clone()).map_err(|_| {
                ApiError::new(
                    ErrorKind::Busy,
                    format!(
                        "an iSCSI initiator prevents the removal of {}'s disc",
                        disk.id
                    ),
                )
            })?;
        }
        let spec = ExportSpec {
            name: &disk.export,
            read_only: true,
            allow: &disk.allow,
            description: format!("vdk disk {}: {shown}", disk.id),
        };
        self.nbd.export(spec, &disk.device)?;
        if disk.attach.is_block_device() {
            self.attach(&disk)?;
        }
        info!(id = %disk.id, image = %shown, "disc inserted");
        Ok(self.status(&disk))
    }
}
