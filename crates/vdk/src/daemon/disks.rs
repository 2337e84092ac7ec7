//! The open disks: what each one is, and the table of them by id.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[cfg(target_os = "linux")]
use vdk_attach::Attached;
use vdk_core::sync::lock;

use super::iscsi::Lun;
use super::recipe::Recipe;
use super::tracked::Tracked;
use crate::control::{ApiError, Attach, ErrorKind};

/// What changes while a disk is open: how the kernel sees it.
#[derive(Debug, Default)]
pub struct Attachment {
    /// Its block device, while attached.
    #[cfg(target_os = "linux")]
    pub attached: Option<Box<dyn Attached>>,
    /// The block device's path.
    pub block_device: Option<PathBuf>,
    /// Where its file system is mounted.
    pub mount: Option<PathBuf>,
    /// A CD-ROM disk's disc is out: no NBD export, no block device.
    pub ejected: bool,
    /// Windows: the target Windows' initiator is logged in to (`--attach iscsi`).
    #[cfg(windows)]
    pub session: Option<String>,
}

/// What a disk holds now: its image (for a CD-ROM disk, the disc in it).
#[derive(Clone, Debug)]
pub struct Medium {
    /// The image's canonical path (or an object store URL).
    pub image: PathBuf,
    /// Its format's name.
    pub format: String,
    /// Its size in bytes.
    pub size: u64,
}

/// An open disk.
#[derive(Debug)]
pub struct Disk {
    /// Its id (`disk_id`).
    pub id: String,
    /// The user whose request opened it: only that user (besides the daemon's user and
    /// root) may change it.
    pub opener: u32,
    /// What identifies the disk: its image, or its cow overlay.
    pub key: PathBuf,
    /// What it holds.
    pub medium: Mutex<Medium>,
    /// Opened read-only (or an ISO).
    pub read_only: bool,
    /// A CD/DVD-ROM (an ISO): its disc can be ejected and another inserted.
    pub cdrom: bool,
    /// How the kernel sees it.
    pub attach: Attach,
    /// Its NBD export's name.
    pub export: String,
    /// Who may see and open the NBD export (kept for a new disc's export).
    pub allow: Vec<vdk_nbd::Rule>,
    /// The chain every front end serves, counted; swapped for a live commit or a new disc.
    pub device: Arc<Tracked>,
    /// The filters it was opened with, as given.
    pub filters: Mutex<Vec<String>>,
    /// Its stats filter, if it has one.
    pub stats: Mutex<Option<Arc<vdk_filters::Stats>>>,
    /// How to open the chain again (after a live commit, discard or snapshot).
    pub recipe: Mutex<Recipe>,
    /// Block device and mount.
    pub state: Mutex<Attachment>,
    /// Its LUN, when served over iSCSI.
    pub iscsi: Mutex<Option<Lun>>,
    /// Its vhost-user-blk export, when a VM may attach it.
    pub vhost: Mutex<Option<VhostExport>>,
    /// The last backup made with each dirty bitmap.
    pub backups: super::backup::Backups,
    /// The backup running now: its target, bytes to look at, bytes looked at.
    pub backup: Mutex<Option<super::backup::Running>>,
}

impl Disk {
    /// Where the first byte that is not zero is on the disk, or `None` for a blank one (all
    /// of it unallocated or zeroes): what formatting may erase. Reads only what its extents
    /// call data.
    pub fn first_data(&self) -> Result<Option<u64>, ApiError> {
        use vdk_core::BlockDevice;
        vdk_core::first_data_in(&*self.device, 0, self.device.info().size)
            .map_err(|e| ApiError::new(ErrorKind::Io, format!("cannot read the disk: {e}")))
    }

    /// Whether `path` names this disk: its image, its key, or its cow overlay.
    fn is(&self, path: &Path) -> bool {
        lock(&self.medium).image == path
            || self.key == path
            || lock(&self.recipe).overlay().as_deref() == Some(path)
    }

    /// The block device, or why there is none.
    #[cfg(target_os = "linux")]
    pub fn block_device(&self) -> Result<PathBuf, ApiError> {
        lock(&self.state).block_device.clone().ok_or_else(|| {
            ApiError::invalid(format!(
                "{} has no block device (opened with --attach none)",
                self.id
            ))
        })
    }
}

/// A vhost-user-blk export (Linux only; nothing elsewhere).
#[cfg(target_os = "linux")]
pub type VhostExport = vdk_vhost::Export;
/// A vhost-user-blk export (Linux only; nothing elsewhere).
#[cfg(not(target_os = "linux"))]
pub type VhostExport = std::convert::Infallible;

/// The open disks, by id.
#[derive(Debug, Default)]
pub struct Disks {
    table: Mutex<BTreeMap<String, Arc<Disk>>>,
    /// Numbers volatile cow disks.
    volatile: AtomicU64,
}

impl Disks {
    /// The disk `key` names: an id, or an image or overlay path.
    pub fn find(&self, key: &str) -> Result<Arc<Disk>, ApiError> {
        let table = lock(&self.table);
        if let Some(d) = table.get(key) {
            return Ok(Arc::clone(d));
        }
        let path = crate::paths::canonical(Path::new(key)).unwrap_or_else(|_| PathBuf::from(key));
        table
            .values()
            .find(|d| d.is(&path))
            .cloned()
            .ok_or_else(|| ApiError::new(ErrorKind::NotFound, format!("no open disk is {key:?}")))
    }

    /// The disk whose key (image or overlay) is `key`.
    pub fn with_key(&self, key: &Path) -> Option<Arc<Disk>> {
        lock(&self.table).values().find(|d| d.key == key).cloned()
    }

    /// Every open disk.
    pub fn all(&self) -> Vec<Arc<Disk>> {
        lock(&self.table).values().cloned().collect()
    }

    /// Adds an open disk.
    pub fn insert(&self, disk: Arc<Disk>) {
        lock(&self.table).insert(disk.id.clone(), disk);
    }

    /// Forgets a disk.
    pub fn remove(&self, id: &str) {
        lock(&self.table).remove(id);
    }

    /// A new number for a volatile cow disk.
    pub fn next_volatile(&self) -> u64 {
        self.volatile.fetch_add(1, Ordering::Relaxed)
    }
}

/// The disk id for an image: its file stem and a hash of its canonical path, so the same
/// image always gets the same id and two images never share one by accident.
pub fn disk_id(image: &Path) -> String {
    let stem: String = image
        .file_stem()
        .map(|s| s.to_string_lossy())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(24)
        .collect();
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in image.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let stem = if stem.is_empty() { "disk".into() } else { stem };
    format!("{stem}-{:08x}", h >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_readable() {
        let a = disk_id(Path::new("/srv/images/data disk.img"));
        assert_eq!(a, disk_id(Path::new("/srv/images/data disk.img")));
        assert!(a.starts_with("data_disk-"), "{a}");
        assert_eq!(a.len(), "data_disk-".len() + 8);
        assert_ne!(a, disk_id(Path::new("/srv/other/data disk.img")));
        assert!(disk_id(Path::new("/x/.img")).starts_with("_img-"));
    }
}
