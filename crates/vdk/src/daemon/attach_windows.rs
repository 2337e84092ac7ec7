//! What Windows sees of a disk: with `--attach iscsi` (the default there) the disk is a LUN
//! on the daemon's loopback portal and Windows' own initiator is logged in to it, so Windows
//! has a real disk (`\\.\PhysicalDriveN`), formatted and given a drive letter if asked
//! (initiator.rs has the steps). vdk has no block device of its own there: `vdk mount` and
//! `unmount` of an open disk are Windows' own business (Disk Management, Set-Partition).

use std::path::{Path, PathBuf};

use tracing::{info, warn};
use vdk_core::sync::lock;

use super::disks::Disk;
use super::initiator::{self, Login};
use super::Daemon;
use crate::control::{ApiError, DiskStatus, ErrorKind, MountRequest, OpenRequest};

/// Why a request needs a block device of vdk's own, which Windows does not have.
fn no_block_device() -> ApiError {
    ApiError::new(
        ErrorKind::Unsupported,
        "vdk has no block device of its own on Windows: open the disk with --attach iscsi \
         (Windows' initiator; --mkfs and --mount X: there), or give it a letter with \
         Disk Management",
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

    /// No block device of vdk's to take away (a CD-ROM's disc changes under the initiator's
    /// session; [`Daemon::logout`] ends it on close).
    pub(super) fn detach(&self, _disk: &Disk) {}

    /// `--attach iscsi`: serves the disk as a LUN (CHAP with the daemon's credentials, or new
    /// ones of its own), logs Windows' initiator in, brings the disk online, formats it or
    /// gives it a letter if asked.
    pub(super) fn attach_iscsi(&self, disk: &Disk, req: &OpenRequest) -> Result<(), ApiError> {
        let creds = self
            .iscsi
            .chap()
            .cloned()
            .unwrap_or_else(|| vdk_iscsi::chap::Credentials {
                user: format!("vdk-{}", disk.id),
                secret: initiator::new_secret().into_bytes(),
            });
        let chap = (
            creds.user.clone(),
            String::from_utf8_lossy(&creds.secret).into_owned(),
        );
        let auth = vdk_iscsi::Auth {
            chap: Some(creds),
            ..Default::default()
        };
        let lun = self.iscsi.expose(
            &disk.id,
            disk.device.clone(),
            req.iscsi_target.as_deref(),
            req.iscsi_lun,
            Some(auth),
        )?;
        let iqn = lun.target.clone();
        *lock(&disk.iscsi) = Some(lun);
        let portal = self
            .iscsi
            .portal()
            .ok_or_else(|| ApiError::new(ErrorKind::Io, "the iSCSI server has no portal"))?;
        let login = Login {
            iqn: iqn.clone(),
            portal,
            chap: Some(chap),
        };
        // A CD-ROM is found by the serial number its INQUIRY reports.
        let serial = disk
            .cdrom
            .then(|| vdk_scsi::Identity::from_name(&disk.id, vdk_scsi::DeviceType::CdRom).serial);
        let said = initiator::run(
            "logging Windows' iSCSI initiator in",
            &initiator::login_script(&login, serial.as_deref()),
        )?;
        lock(&disk.state).session = Some(iqn.clone());
        if disk.cdrom {
            let c = initiator::cdrom_letter(&said)?;
            info!(id = %disk.id, target = %iqn, drive = %c, "Windows' initiator logged in");
            // The drive (and its letter) stays while discs come and go: it is the device,
            // not a mount that would stop `vdk eject`.
            lock(&disk.state).block_device = Some(PathBuf::from(format!("{c}:\\")));
            return Ok(());
        }
        let n = initiator::disk_number(&said)?;
        info!(id = %disk.id, target = %iqn, disk = n, "Windows' initiator logged in");
        lock(&disk.state).block_device = Some(PathBuf::from(initiator::device_path(n)));
        initiator::run(
            "bringing the disk online",
            &initiator::online_script(n, disk.read_only),
        )?;
        let letter = req
            .mount
            .as_ref()
            .map(|m| initiator::drive_letter(&m.to_string_lossy()))
            .transpose()?;
        if let Some(fs) = &req.mkfs {
            let fs = initiator::file_system(fs)?;
            if !req.force && disk.first_data()?.is_some() {
                return Err(ApiError::new(
                    ErrorKind::Busy,
                    format!(
                        "{} holds data: vdk formats only blank disks (add --force to erase it)",
                        lock(&disk.medium).image.display()
                    ),
                ));
            }
            initiator::run(
                "formatting the disk",
                &initiator::format_script(n, fs, letter),
            )?;
        } else if let Some(c) = letter {
            initiator::run(
                "giving the disk its letter",
                &initiator::letter_script(n, c),
            )?;
        }
        if let Some(c) = letter {
            lock(&disk.state).mount = Some(PathBuf::from(format!("{c}:\\")));
        }
        Ok(())
    }

    /// Logs Windows' initiator out of the disk's target (Windows flushes its writes first).
    pub(super) fn logout(&self, disk: &Disk) -> Result<(), ApiError> {
        let Some(iqn) = lock(&disk.state).session.take() else {
            return Ok(());
        };
        let done = initiator::run(
            "logging Windows' initiator out",
            &initiator::logout_script(&iqn),
        );
        if let Err(e) = &done {
            warn!(id = %disk.id, error = %e.message, "logout failed");
        }
        let mut st = lock(&disk.state);
        st.block_device = None;
        st.mount = None;
        done.map(drop)
    }
}
