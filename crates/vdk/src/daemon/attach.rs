//! What the kernel sees of a disk: its block device, a file system made on it, its mount.

use std::path::Path;

use tracing::{info, warn};
use vdk_core::sync::lock;

use super::disks::Disk;
use super::userfs::IsoSource;
use super::{mount, Daemon};
use crate::control::{ApiError, DiskStatus, ErrorKind, MountRequest};

/// Shorthand for the wrong-argument error.
fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::invalid(msg)
}

impl Daemon {
    /// Mounts an open disk's file system (formatting it first if asked).
    pub(super) fn mount(&self, req: MountRequest) -> Result<DiskStatus, ApiError> {
        let _one_at_a_time = lock(&self.changing);
        let disk = self.disks.find(&req.disk)?;
        if req.force && req.mkfs.is_none() {
            return Err(invalid(
                "--force goes with --mkfs (to format a disk that holds data)",
            ));
        }
        let again = |extra: &str| {
            let mkfs = match (&req.mkfs, extra.starts_with("--mkfs")) {
                (Some(fs), false) => format!(" --mkfs {fs}"),
                _ => String::new(),
            };
            format!("vdk mount {} {}{mkfs} {extra}", disk.id, req.dir.display())
        };
        if let Some(fs) = &req.mkfs {
            self.format(&disk, fs, req.force, &again)?;
        }
        self.mount_disk(&disk, &req.dir, req.mkfs.as_deref(), &again)?;
        Ok(self.status(&disk))
    }

    /// Unmounts an open disk's file system; the disk stays open.
    pub(super) fn unmount(&self, key: &str, force: bool) -> Result<DiskStatus, ApiError> {
        let _one_at_a_time = lock(&self.changing);
        let disk = self.disks.find(key)?;
        let Some(dir) = lock(&disk.state).mount.clone() else {
            return Err(invalid(format!("{} is not mounted", disk.id)));
        };
        if disk.cdrom {
            self.fs.unmount(&dir, force)?;
        } else {
            mount::unmount(&dir, force)?;
        }
        lock(&disk.state).mount = None;
        Ok(self.status(&disk))
    }

    /// Formats a disk with `fs`: only a blank one (all zeroes or unallocated) unless `force`,
    /// so that no typo erases a disk's data.
    pub(super) fn format(
        &self,
        disk: &Disk,
        fs: &str,
        force: bool,
        again: &dyn Fn(&str) -> String,
    ) -> Result<(), ApiError> {
        mount::check_fs_type(fs)?;
        if disk.read_only {
            return Err(invalid(format!(
                "{} is read-only: it cannot be formatted",
                disk.id
            )));
        }
        let dev = disk.block_device()?;
        if lock(&disk.state).mount.is_some() {
            return Err(invalid(format!(
                "{} is mounted: unmount it before formatting",
                disk.id
            )));
        }
        if !force {
            if let Some(at) = disk.first_data()? {
                let holds = match mount::probe_fs(&dev) {
                    Some(t) => format!("holds {t}"),
                    None => format!("holds data (from byte {at})"),
                };
                return Err(ApiError::new(
                    ErrorKind::Busy,
                    format!(
                        "{} {holds}: vdk formats only blank disks; to erase it and format it, \
                         run `{}`",
                        lock(&disk.medium).image.display(),
                        again("--force")
                    ),
                ));
            }
        }
        mount::mkfs(fs, &dev)
    }

    /// Gives a disk its block device (ublk, kernel NBD or fuse-loop, as it asked).
    pub(super) fn attach(&self, disk: &Disk) -> Result<(), ApiError> {
        let attached = self.attacher.attach(
            disk.attach,
            (&disk.id, &disk.export),
            disk.device.clone(),
            disk.read_only,
            self.backing(disk),
        )?;
        let dev = attached.block_device();
        // A device taken over from a daemon that died (ublk, kernel NBD) may hold a mounted
        // file system still: it is this disk's mount now, which `close` unmounts.
        let mounted = mount::mounts_of_device(&dev).into_iter().next();
        if let Some(dir) = &mounted {
            info!(id = %disk.id, dir = %dir.display(), "its file system is still mounted");
        }
        let mut st = lock(&disk.state);
        st.block_device = Some(dev);
        st.attached = Some(attached);
        if st.mount.is_none() {
            st.mount = mounted;
        }
        Ok(())
    }

    /// Mounts a disk's file system on `dir`; a CD-ROM's through the ISO browser (this kernel
    /// may have no iso9660). A blank disk gets the command that formats it.
    pub(super) fn mount_disk(
        &self,
        disk: &Disk,
        dir: &Path,
        fs: Option<&str>,
        again: &dyn Fn(&str) -> String,
    ) -> Result<(), ApiError> {
        if !dir.is_absolute() {
            return Err(invalid(format!(
                "{}: the mount point must be absolute",
                dir.display()
            )));
        }
        if let Some(m) = &lock(&disk.state).mount {
            return Err(invalid(format!(
                "{} is already mounted on {}",
                disk.id,
                m.display()
            )));
        }
        if disk.cdrom {
            let source = IsoSource {
                device: disk.device.clone(),
                name: lock(&disk.medium).image.display().to_string(),
                disk: Some(disk.id.clone()),
            };
            let mounted = self.fs.mount_iso(source, dir, disk.opener)?;
            lock(&disk.state).mount = Some(mounted.dir);
            return Ok(());
        }
        let dev = disk.block_device()?;
        if fs.is_none() && disk.first_data()?.is_none() {
            let image = lock(&disk.medium).image.clone();
            return Err(invalid(if disk.read_only {
                format!(
                    "{} is blank: there is no file system to mount",
                    image.display()
                )
            } else {
                format!(
                    "{} is blank (no file system yet): format it as you mount it: `{}`",
                    image.display(),
                    again("--mkfs ext4")
                )
            }));
        }
        mount::mount(&dev, dir, fs, disk.read_only)?;
        lock(&disk.state).mount = Some(dir.to_owned());
        Ok(())
    }

    /// Takes a disk's block device away (it must not be mounted).
    pub(super) fn detach(&self, disk: &Disk) {
        let attached = lock(&disk.state).attached.take();
        if let Some(a) = attached {
            let dev = a.block_device();
            if let Err(e) = a.detach() {
                warn!(id = %disk.id, dev = %dev.display(), error = %e, "detach failed");
            }
            lock(&disk.state).block_device = None;
        }
    }

    /// The file that holds `disk` byte for byte, opened again for FUSE passthrough or ublk
    /// zero copy, where the disk's attach kind uses it (only then: the image is not opened
    /// twice for nothing).
    fn backing(&self, disk: &Disk) -> Option<vdk_attach::ZeroCopy> {
        let wanted = match disk.attach {
            crate::control::Attach::FuseLoop => self.attacher.passthrough(),
            crate::control::Attach::Ublk => self.attacher.zero_copy(),
            _ => false,
        };
        if !wanted {
            return None;
        }
        Some(vdk_attach::ZeroCopy {
            file: backing_file(disk)?,
            direct: disk.device.clone(),
        })
    }
}

/// The file that holds `disk` byte for byte: a raw image on a local file system, with no
/// filter and no overlay. Anything else is served.
fn backing_file(disk: &Disk) -> Option<std::fs::File> {
    if disk.cdrom {
        return None;
    }
    if !lock(&disk.filters).is_empty() {
        return None;
    }
    let medium = lock(&disk.medium);
    if medium.format != "raw" || disk.key != medium.image {
        return None;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!disk.read_only)
        .open(&medium.image)
        .ok()?;
    let meta = file.metadata().ok()?;
    (meta.is_file() && meta.len() == medium.size).then_some(file)
}
