//! The open disks: open, close, mount, unmount, list.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tracing::{info, warn};
use vdk_attach::{Attached, FuseExport, FuseLoop};
use vdk_formats::Format;
use vdk_nbd::Server;

use super::mount;
use super::tracked::Tracked;
use super::Paths;
use crate::control::{ApiError, DiskStatus, ErrorKind, MountRequest};

/// Stands for the export name in the NBD URI templates.
pub const EXPORT_PLACEHOLDER: &str = "{export}";

/// Size of an image `open` creates when none is given.
pub const DEFAULT_SIZE: u64 = 100 << 20;

pub(super) const ATTACH_FUSE_LOOP: &str = "fuse-loop";
pub(super) const ATTACH_NONE: &str = "none";

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What changes while a disk is open.
#[derive(Debug, Default)]
pub(super) struct Attachment {
    pub attached: Option<Box<dyn Attached>>,
    pub block_device: Option<PathBuf>,
    pub mount: Option<PathBuf>,
    /// A CD-ROM disk's disc is out: no NBD export, no block device.
    pub ejected: bool,
}

/// What a disk holds now: its image (for a CD-ROM disk, the disc in it).
#[derive(Clone, Debug)]
pub(super) struct Disc {
    pub image: PathBuf,
    pub format: String,
    pub size: u64,
}

/// An open disk.
#[derive(Debug)]
pub(super) struct Disk {
    pub id: String,
    /// The user whose request opened it: only that user (besides the daemon's user and
    /// root) may change it.
    pub opener: u32,
    /// What identifies the disk: its image, or its cow overlay.
    pub key: PathBuf,
    pub disc: Mutex<Disc>,
    pub read_only: bool,
    /// A CD/DVD-ROM (an ISO): its disc can be ejected and another inserted.
    pub cdrom: bool,
    pub attach: &'static str,
    pub export: String,
    /// Who may see and open the NBD export (kept for a new disc's export).
    pub allow: Vec<vdk_nbd::Rule>,
    pub device: Arc<Tracked>,
    pub filters: Mutex<Vec<String>>,
    pub stats: Mutex<Option<Arc<vdk_filters::Stats>>>,
    /// How to open the chain again (after a live commit, discard or snapshot).
    pub recipe: Mutex<Recipe>,
    pub state: Mutex<Attachment>,
    /// Its LUN, when served over iSCSI.
    pub iscsi: Mutex<Option<super::iscsi::Lun>>,
}

/// The daemon's disks and front ends.
#[derive(Debug)]
pub struct Daemon {
    pub(super) paths: Paths,
    pub(super) nbd: Arc<Server>,
    pub(super) iscsi: super::iscsi::Front,
    /// NBD URI of each listener, with [`EXPORT_PLACEHOLDER`] for the export name.
    nbd_uris: Vec<String>,
    fuse_threads: usize,
    /// The fuse-loop attacher, made (and its FUSE export mounted) on first use.
    fuse_loop: Mutex<Option<Arc<FuseLoop>>>,
    pub(super) disks: Mutex<BTreeMap<String, Arc<Disk>>>,
    /// File systems of `vdk fs mount`, by mount point.
    pub(super) filesystems: Mutex<super::userfs::Table>,
    /// Held by requests that change disks, so that they run one at a time.
    pub(super) changing: Mutex<()>,
    /// Numbers volatile cow disks.
    pub(super) volatile: std::sync::atomic::AtomicU64,
    /// What it found a dead daemon had left mounted, and detached, when it started.
    pub(super) recovered: Vec<String>,
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

/// An object-store error as the control API answers it.
pub(super) fn cloud_error(e: anyhow::Error) -> ApiError {
    let kind = match e.downcast_ref::<vdk_objstore::ObjError>() {
        Some(vdk_objstore::ObjError::NotFound(_)) => ErrorKind::NotFound,
        Some(vdk_objstore::ObjError::LeaseHeld { .. }) => ErrorKind::Busy,
        Some(
            vdk_objstore::ObjError::BadUrl(_)
            | vdk_objstore::ObjError::KeyNeeded
            | vdk_objstore::ObjError::KeyNotWanted
            | vdk_objstore::ObjError::WrongKey
            | vdk_objstore::ObjError::BadKey,
        ) => ErrorKind::Invalid,
        _ => ErrorKind::Io,
    };
    ApiError::new(kind, format!("{e:#}"))
}

pub(super) fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::Invalid, msg)
}

/// What a disk's chain is made of: the image and the filters over it.
#[derive(Debug)]
pub(super) struct Recipe {
    pub image: PathBuf,
    pub format: Option<Format>,
    pub read_only: bool,
    pub probe_backing: bool,
    pub specs: Vec<vdk_filters::FilterSpec>,
    /// For a disk in object storage (`image` is its URL): how to reach it, and where its
    /// cache goes by default.
    pub cloud: Option<(crate::control::CloudOptions, PathBuf)>,
}

impl Recipe {
    /// Opens the image and applies the filters.
    pub fn build(&self) -> Result<(vdk_filters::Chain, Format), ApiError> {
        let shown = self.image.display();
        if let Some((opts, cache_root)) = &self.cloud {
            let url = self.image.to_string_lossy();
            let disk = crate::cloud::open(&url, opts, self.read_only, Some(cache_root))
                .map_err(cloud_error)?;
            let chain = vdk_filters::apply_over(Arc::new(disk), None, &self.specs)
                .map_err(|e| invalid(format!("{shown}: {e}")))?;
            return Ok((chain, Format::Raw));
        }
        let opts = vdk_formats::OpenOptions {
            format: self.format,
            read_only: self.read_only,
            probe_backing: self.probe_backing,
            ..Default::default()
        };
        let opened = vdk_formats::open(&self.image, &opts)
            .map_err(|e| ApiError::io(format!("cannot open {shown}"), &e))?;
        let base = vdk_filters::cow::BaseFile {
            path: self.image.clone(),
            format: opened.format,
        };
        let chain = vdk_filters::apply_over(opened.device, Some(base), &self.specs)
            .map_err(|e| invalid(format!("{shown}: {e}")))?;
        Ok((chain, opened.format))
    }

    /// Makes `overlay` the cow overlay.
    pub(super) fn set_overlay(&mut self, overlay: &Path) {
        for s in &mut self.specs {
            if let vdk_filters::FilterSpec::Cow(o) = s {
                o.overlay = vdk_filters::cow::Overlay::Persistent(overlay.to_owned());
            }
        }
    }

    /// The persistent cow overlay, if the disk has one.
    pub(super) fn overlay(&self) -> Option<PathBuf> {
        self.specs.iter().find_map(|s| match s {
            vdk_filters::FilterSpec::Cow(o) => match &o.overlay {
                vdk_filters::cow::Overlay::Persistent(p) => Some(p.clone()),
                vdk_filters::cow::Overlay::Volatile => None,
            },
            _ => None,
        })
    }
}

/// The stats filter's counters and latency histograms per operation, if the disk has one.
fn filter_stats(disk: &Disk) -> Option<serde_json::Value> {
    let stats = lock(&disk.stats).clone()?;
    Some(crate::control::stats_report(&stats))
}

pub(super) fn parse_filters(specs: &[String]) -> Result<Vec<vdk_filters::FilterSpec>, ApiError> {
    specs
        .iter()
        .map(|s| vdk_filters::FilterSpec::parse(s).map_err(|e| invalid(e.to_string())))
        .collect()
}

impl Daemon {
    /// A daemon serving NBD with `nbd`, whose listeners have the URIs `nbd_uris`, and
    /// iSCSI as `iscsi` says.
    pub fn new(
        paths: Paths,
        nbd: Arc<Server>,
        nbd_uris: Vec<String>,
        fuse_threads: usize,
        iscsi: super::iscsi::Settings,
        recovered: Vec<String>,
    ) -> Daemon {
        Daemon {
            paths,
            nbd,
            iscsi: super::iscsi::Front::new(iscsi),
            nbd_uris,
            fuse_threads,
            fuse_loop: Mutex::new(None),
            disks: Mutex::default(),
            filesystems: Mutex::default(),
            changing: Mutex::new(()),
            volatile: std::sync::atomic::AtomicU64::new(0),
            recovered,
        }
    }

    pub(super) fn status(&self, d: &Disk) -> DiskStatus {
        let st = lock(&d.state);
        let disc = lock(&d.disc).clone();
        let lun = lock(&d.iscsi);
        // An initiator may have ejected the disc itself (START STOP UNIT).
        let ejected = st.ejected || lun.as_ref().is_some_and(|l| l.unit.medium().is_none());
        DiskStatus {
            id: d.id.clone(),
            image: disc.image,
            format: disc.format,
            size: disc.size,
            iscsi: lun.as_ref().map(|l| self.iscsi.uris(l)).unwrap_or_default(),
            ejected,
            read_only: d.read_only,
            attach: d.attach.to_owned(),
            block_device: st.block_device.clone(),
            mount: st.mount.clone(),
            export: d.export.clone(),
            filters: lock(&d.filters).clone(),
            nbd: if st.ejected {
                Vec::new()
            } else {
                self.nbd_uris
                    .iter()
                    .map(|u| u.replace(EXPORT_PLACEHOLDER, &d.export))
                    .collect()
            },
            stats: d.device.counters(),
            latency: filter_stats(d),
        }
    }

    /// The stats filter's counters of a disk, per operation.
    pub fn stats(&self, key: &str) -> Result<serde_json::Value, ApiError> {
        let disk = self.find(key)?;
        let Some(ops) = filter_stats(&disk) else {
            return Err(invalid(format!(
                "{} has no stats filter: open it with --filter stats",
                disk.id
            )));
        };
        Ok(serde_json::json!({ "id": disk.id, "ops": ops }))
    }

    /// Starts the iSCSI server now rather than on first use.
    pub fn start_iscsi(&self) -> Result<(), ApiError> {
        self.iscsi.start()
    }

    /// The open disks `caller` may see: its own, or all for a trusted one.
    pub fn list(&self, caller: &super::access::Caller) -> Vec<DiskStatus> {
        let disks: Vec<Arc<Disk>> = lock(&self.disks)
            .values()
            .filter(|d| caller.may_manage(d.opener))
            .cloned()
            .collect();
        disks.iter().map(|d| self.status(d)).collect()
    }

    /// The disk `key` names: an id, or an image path.
    pub(super) fn find(&self, key: &str) -> Result<Arc<Disk>, ApiError> {
        let disks = lock(&self.disks);
        if let Some(d) = disks.get(key) {
            return Ok(Arc::clone(d));
        }
        let path = fs::canonicalize(key).unwrap_or_else(|_| PathBuf::from(key));
        disks
            .values()
            .find(|d| {
                lock(&d.disc).image == path
                    || d.key == path
                    || lock(&d.recipe).overlay() == Some(path.clone())
            })
            .cloned()
            .ok_or_else(|| ApiError::new(ErrorKind::NotFound, format!("no open disk is {key:?}")))
    }

    pub(super) fn attacher(&self) -> Result<Arc<FuseLoop>, ApiError> {
        let mut slot = lock(&self.fuse_loop);
        if let Some(a) = &*slot {
            return Ok(Arc::clone(a));
        }
        let export = FuseExport::mount(&self.paths.fuse, self.fuse_threads)
            .map_err(|e| ApiError::io("cannot start the FUSE export", &e))?;
        let a = Arc::new(FuseLoop::new(export));
        *slot = Some(Arc::clone(&a));
        Ok(a)
    }

    /// Unmounts, detaches, withdraws the exports and flushes. With `force`, a busy mount is
    /// detached lazily and the disk refuses everything still queued.
    pub(super) fn tear_down(&self, disk: &Disk, force: bool) -> Result<(), ApiError> {
        let mount = lock(&disk.state).mount.clone();
        for dir in self.filesystems_on(&disk.id) {
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
            let mut table = lock(&self.filesystems);
            if let Some(m) = table.remove(&dir) {
                drop(m); // unmounts lazily
            }
            self.record(&table);
        }
        if let Some(dir) = mount {
            if disk.cdrom {
                self.unmount_fs(&dir, force)?;
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
        self.detach(disk);
        if let Some(l) = lock(&disk.iscsi).take() {
            self.iscsi.withdraw(&l);
        }
        self.nbd.remove_export(&disk.export);
        disk.device.close();
        disk.device.flush_backend().map_err(|e| {
            ApiError::new(
                ErrorKind::Io,
                format!("flushing {}: {e}", lock(&disk.disc).image.display()),
            )
        })
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

    /// Closes a disk: unmount (sync first), detach, stop the export, flush, release.
    pub fn close(&self, key: &str, force: bool) -> Result<DiskStatus, ApiError> {
        let _one_at_a_time = lock(&self.changing);
        let disk = self.find(key)?;
        let status = self.status(&disk);
        let torn = self.tear_down(&disk, force);
        // Detached or not, a disk that got this far is no longer served: forget it, unless
        // the unmount was refused (then nothing changed).
        if matches!(&torn, Err(e) if e.kind == ErrorKind::Busy) {
            return torn.map(|()| status);
        }
        lock(&self.disks).remove(&disk.id);
        info!(id = %disk.id, "disk closed");
        torn.map(|()| status)
    }

    /// Mounts an open disk's file system (formatting it first if asked).
    pub fn mount(&self, req: MountRequest) -> Result<DiskStatus, ApiError> {
        let _one_at_a_time = lock(&self.changing);
        let disk = self.find(&req.disk)?;
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
    pub fn unmount(&self, key: &str, force: bool) -> Result<DiskStatus, ApiError> {
        let _one_at_a_time = lock(&self.changing);
        let disk = self.find(key)?;
        let Some(dir) = lock(&disk.state).mount.clone() else {
            return Err(invalid(format!("{} is not mounted", disk.id)));
        };
        if disk.cdrom {
            self.unmount_fs(&dir, force)?;
        } else {
            mount::unmount(&dir, force)?;
        }
        lock(&disk.state).mount = None;
        Ok(self.status(&disk))
    }

    /// Closes every disk (forcing busy ones: the daemon is going away) and the FUSE export.
    pub fn close_all(&self) {
        self.fs_unmount_all();
        let _one_at_a_time = lock(&self.changing);
        let disks: Vec<Arc<Disk>> = lock(&self.disks).values().cloned().collect();
        for d in disks {
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
            lock(&self.disks).remove(&d.id);
        }
        if let Some(a) = lock(&self.fuse_loop).take() {
            a.export().unmount();
        }
        self.iscsi.stop();
    }
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
