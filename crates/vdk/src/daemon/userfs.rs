//! File systems the daemon mounts in user space: `vdk fs mount` shows an ISO 9660 image (a
//! file of any format vdk reads, or an open disk) as a read-only directory tree.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::info;
use vdk_core::BlockDevice;
use vdk_fs::iso9660::{Iso, Scheme};
use vdk_fs::IsoMount;

use super::disks::{invalid, lock, Daemon};
use crate::control::{ApiError, ErrorKind, FsMountRequest, FsStatus};

/// A mounted file system.
#[derive(Debug)]
pub struct Mounted {
    mount: IsoMount,
    source: String,
    /// The open disk it reads, if it reads one.
    disk: Option<String>,
    scheme: Scheme,
    size: u64,
}

/// The daemon's file systems, by mount point.
pub type Table = BTreeMap<PathBuf, Mounted>;

fn status(dir: &Path, m: &Mounted) -> FsStatus {
    FsStatus {
        dir: dir.to_owned(),
        kind: "iso9660".into(),
        source: m.source.clone(),
        disk: m.disk.clone(),
        label: m.mount.label().to_owned(),
        names: match m.scheme {
            Scheme::RockRidge { .. } => "rock-ridge",
            Scheme::Joliet => "joliet",
            Scheme::Plain => "iso9660",
        }
        .into(),
        size: m.size,
    }
}

impl Daemon {
    /// Mounts the ISO 9660 file system of `req.source` (an open disk's id or image, or an
    /// image file) on `req.dir`, read-only.
    pub fn fs_mount(&self, req: &FsMountRequest) -> Result<FsStatus, ApiError> {
        let _one_at_a_time = lock(&self.changing);
        if !req.dir.is_absolute() {
            return Err(invalid(format!(
                "{}: the mount point must be absolute",
                req.dir.display()
            )));
        }
        fs::create_dir_all(&req.dir)
            .map_err(|e| ApiError::io(format!("cannot create {}", req.dir.display()), &e))?;
        let dir = fs::canonicalize(&req.dir)
            .map_err(|e| ApiError::io(format!("{}", req.dir.display()), &e))?;
        if lock(&self.filesystems).contains_key(&dir) {
            return Err(ApiError::new(
                ErrorKind::AlreadyOpen,
                format!(
                    "{} has a file system of vdk's mounted already",
                    dir.display()
                ),
            ));
        }
        if super::mount::is_mount_point(&dir) {
            return Err(ApiError::new(
                ErrorKind::Busy,
                format!("{} is a mount point already", dir.display()),
            ));
        }
        let (device, source, disk): (Arc<dyn BlockDevice>, String, Option<String>) =
            match self.find(&req.source) {
                Ok(d) => (
                    Arc::clone(&d.device) as Arc<dyn BlockDevice>,
                    lock(&d.disc).image.display().to_string(),
                    Some(d.id.clone()),
                ),
                Err(_) => {
                    let path = Path::new(&req.source);
                    if !path.is_absolute() {
                        return Err(invalid(format!(
                            "{}: not an open disk, and not an absolute path",
                            req.source
                        )));
                    }
                    let opened = vdk_formats::open(
                        path,
                        &vdk_formats::OpenOptions {
                            format: None,
                            read_only: true,
                            probe_backing: false,
                        },
                    )
                    .map_err(|e| ApiError::io(format!("cannot open {}", path.display()), &e))?;
                    (opened.device, path.display().to_string(), None)
                }
            };
        let size = device.info().size;
        let iso = Iso::open(device)
            .map_err(|e| ApiError::new(ErrorKind::Invalid, format!("{source}: {e}")))?;
        let scheme = iso.scheme();
        let mount = IsoMount::mount(iso, &dir, &source, vdk_fs::DEFAULT_THREADS)
            .map_err(|e| ApiError::io("FUSE", &e))?;
        let m = Mounted {
            mount,
            source,
            disk,
            scheme,
            size,
        };
        let st = status(&dir, &m);
        info!(dir = %dir.display(), source = %st.source, label = %st.label, "file system mounted");
        lock(&self.filesystems).insert(dir, m);
        Ok(st)
    }

    /// Unmounts a file system of `vdk fs mount`. A busy one is refused unless `force`
    /// (then it is detached and goes when its last user lets go).
    pub fn fs_unmount(&self, dir: &Path, force: bool) -> Result<FsStatus, ApiError> {
        let _one_at_a_time = lock(&self.changing);
        let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
        let mut table = lock(&self.filesystems);
        let Some(m) = table.get(&dir) else {
            return Err(ApiError::new(
                ErrorKind::NotFound,
                format!("no file system of vdk's is mounted on {}", dir.display()),
            ));
        };
        m.mount.unmount(force).map_err(|e| {
            let who = super::mount::holders(&dir);
            let who = if who.is_empty() {
                String::new()
            } else {
                format!(", in use by {}", who.join(", "))
            };
            ApiError::new(
                ErrorKind::Busy,
                format!(
                    "{} is busy{who}: close what uses it, or unmount with --force ({e})",
                    dir.display()
                ),
            )
        })?;
        let st = status(&dir, m);
        table.remove(&dir);
        info!(dir = %dir.display(), "file system unmounted");
        Ok(st)
    }

    /// The mounted file systems.
    pub fn fs_list(&self) -> Vec<FsStatus> {
        lock(&self.filesystems)
            .iter()
            .map(|(d, m)| status(d, m))
            .collect()
    }

    /// The mount points of file systems read from the disk `id`.
    pub(super) fn filesystems_on(&self, id: &str) -> Vec<PathBuf> {
        lock(&self.filesystems)
            .iter()
            .filter(|(_, m)| m.disk.as_deref() == Some(id))
            .map(|(d, _)| d.clone())
            .collect()
    }

    /// Unmounts every file system (lazily: the daemon is going away).
    pub(super) fn fs_unmount_all(&self) {
        let all = std::mem::take(&mut *lock(&self.filesystems));
        for (dir, m) in all {
            let _ = m.mount.unmount(true);
            info!(dir = %dir.display(), "file system unmounted");
        }
    }
}
