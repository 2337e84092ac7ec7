//! A disk served to a VM as a vhost-user-blk device (`vdk open --vhost-user PATH`).

use std::path::{Path, PathBuf};

use vdk_core::sync::lock;

use super::disks::Disk;
#[cfg(target_os = "linux")]
use super::Daemon;
use crate::control::ApiError;

/// Refuses a socket path that is relative or a file that is not a socket (before anything
/// is opened; the export checks again when it starts).
pub(super) fn check_socket_path(p: &Path) -> Result<(), ApiError> {
    if cfg!(not(target_os = "linux")) {
        return Err(ApiError::invalid(
            "--vhost-user: vhost-user is a Linux interface",
        ));
    }
    if !p.is_absolute() {
        return Err(ApiError::invalid(format!(
            "--vhost-user {}: the socket's path must be absolute",
            p.display()
        )));
    }
    #[cfg(unix)]
    if let Ok(m) = std::fs::symlink_metadata(p) {
        if !std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) {
            return Err(ApiError::invalid(format!(
                "--vhost-user {}: exists and is not a socket (serving there would replace it)",
                p.display()
            )));
        }
    }
    Ok(())
}

/// The socket of the disk's export, if it has one.
pub(super) fn path(disk: &Disk) -> Option<PathBuf> {
    #[cfg(target_os = "linux")]
    return lock(&disk.vhost).as_ref().map(|e| e.path().to_path_buf());
    #[cfg(not(target_os = "linux"))]
    return lock(&disk.vhost).as_ref().map(|e| match *e {});
}

/// Tells the VM on the disk's export, if one is connected, that the disk now has
/// `new_size` bytes (a virtio config change: the guest sees the new capacity).
pub(super) fn tell_grown(disk: &Disk, new_size: u64) -> Result<(), ApiError> {
    #[cfg(target_os = "linux")]
    {
        let export = lock(&disk.vhost);
        let Some(e) = export.as_ref().filter(|e| e.connected()) else {
            return Ok(());
        };
        let why = match e.capacity_changed() {
            Ok(true) => {
                tracing::info!(disk = %disk.id, socket = %e.path().display(), "the VM was told the disk grew");
                return Ok(());
            }
            Ok(false) => "its VMM gave no back-end channel to say it on".to_string(),
            Err(err) => err.to_string(),
        };
        Err(ApiError::new(
            crate::control::ErrorKind::Unsupported,
            format!(
                "{} grew to {new_size} bytes, but the VM on {} was not told ({why}); it sees \
                 the new size when its VMM next connects",
                disk.id,
                e.path().display()
            ),
        ))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (disk, new_size);
        Ok(())
    }
}

/// Whether a VM is connected to the disk's export.
pub(super) fn connected(disk: &Disk) -> bool {
    #[cfg(target_os = "linux")]
    return lock(&disk.vhost)
        .as_ref()
        .is_some_and(vdk_vhost::Export::connected);
    #[cfg(not(target_os = "linux"))]
    return lock(&disk.vhost).is_some();
}

#[cfg(target_os = "linux")]
impl Daemon {
    /// Serves the disk on a vhost-user socket: its own serial (the id, as much as fits),
    /// read-only if the disk is.
    pub(super) fn serve_vhost(&self, disk: &Disk, path: &Path) -> Result<(), ApiError> {
        let config = vdk_vhost::Config {
            read_only: disk.read_only,
            serial: disk.id.clone(),
            ..Default::default()
        };
        let device: std::sync::Arc<dyn vdk_core::BlockDevice> = disk.device.clone();
        let export = vdk_vhost::Export::start(path, device, config)
            .map_err(|e| ApiError::io(format!("cannot listen on {}", path.display()), &e))?;
        tracing::info!(disk = %disk.id, socket = %path.display(), "vhost-user-blk");
        *lock(&disk.vhost) = Some(export);
        Ok(())
    }
}
