//! The open disks: open, close, mount, unmount, list.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tracing::{info, warn};
use vdk_attach::{Attach, Attached, FuseExport, FuseLoop};
use vdk_core::size::Human;
use vdk_core::BlockDevice;
use vdk_formats::Format;
use vdk_nbd::{Export, Server};

use super::mount;
use super::tracked::Tracked;
use super::Paths;
use crate::control::{ApiError, DiskStatus, ErrorKind, MountRequest, OpenRequest};

/// Stands for the export name in the NBD URI templates.
pub const EXPORT_PLACEHOLDER: &str = "{export}";

/// Size of an image `open` creates when none is given.
pub const DEFAULT_SIZE: u64 = 100 << 20;

pub(super) const ATTACH_FUSE_LOOP: &str = "fuse-loop";
const ATTACH_NONE: &str = "none";

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
    volatile: std::sync::atomic::AtomicU64,
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
fn cloud_error(e: anyhow::Error) -> ApiError {
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
    fn set_overlay(&mut self, overlay: &Path) {
        for s in &mut self.specs {
            if let vdk_filters::FilterSpec::Cow(o) = s {
                o.overlay = vdk_filters::cow::Overlay::Persistent(overlay.to_owned());
            }
        }
    }

    /// The persistent cow overlay, if the disk has one.
    fn overlay(&self) -> Option<PathBuf> {
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
    let ops: serde_json::Map<String, serde_json::Value> = stats
        .snapshot()
        .into_iter()
        .map(|(kind, s)| {
            let mean = s.total_us.checked_div(s.count).unwrap_or(0);
            (
                kind.name().to_owned(),
                serde_json::json!({
                    "count": s.count,
                    "bytes": s.bytes,
                    "errors": s.errors,
                    "mean_us": mean,
                    "latency_us_log2_buckets": s.buckets,
                }),
            )
        })
        .collect();
    Some(serde_json::Value::Object(ops))
}

fn parse_filters(specs: &[String]) -> Result<Vec<vdk_filters::FilterSpec>, ApiError> {
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

    /// Merges an open cow disk's overlay into its base (or, with `discard`, empties it), with
    /// the disk's requests paused meanwhile: the chain is flushed and closed, the overlay
    /// committed, and the chain opened again. Refused if another disk shares the base.
    pub fn commit(&self, key: &str, discard: bool) -> Result<serde_json::Value, ApiError> {
        let _one_at_a_time = lock(&self.changing);
        let disk = self.find(key)?;
        let Some(overlay) = lock(&disk.recipe).overlay() else {
            return Err(invalid(format!(
                "{} has no cow overlay file to {}",
                disk.id,
                if discard { "discard" } else { "commit" }
            )));
        };
        let mut report = None;
        disk.device.swap(|old| {
            if let Err(e) = old.flush() {
                return Err((
                    ApiError::new(ErrorKind::Io, format!("flush before commit: {e}")),
                    old,
                ));
            }
            // The overlay and the base are released with the chain (the stats handle is a
            // part of it too).
            *lock(&disk.stats) = None;
            drop(old);
            let done = if discard {
                vdk_filters::cow::discard(&overlay)
                    .map(|()| vdk_filters::cow::CommitReport::default())
            } else {
                vdk_filters::cow::commit(&overlay)
            };
            let rebuilt = lock(&disk.recipe).build();
            let (chain, _) = match rebuilt {
                Ok(c) => c,
                Err(e) => {
                    disk.device.close();
                    let msg = format!(
                        "the disk could not be opened again and is closed: {}",
                        e.message
                    );
                    return Err((
                        ApiError::new(ErrorKind::Io, msg),
                        super::tracked::placeholder(),
                    ));
                }
            };
            *lock(&disk.stats) = chain.stats.clone();
            match done {
                Ok(r) => {
                    report = Some(r);
                    Ok(chain.device)
                }
                Err(e) => Err((ApiError::io("commit", &e), chain.device)),
            }
        })?;
        let r = report.unwrap_or_default();
        info!(id = %disk.id, overlay = %overlay.display(), discard, "overlay merged or emptied live");
        Ok(serde_json::json!({ "id": disk.id, "data": r.data, "zeroed": r.zeroed }))
    }

    /// Starts a new overlay `new` on top of an open cow disk's overlay and switches the disk
    /// to it, with the disk's requests paused meanwhile. The old overlay is not written any
    /// more; the chain is new -> old -> base.
    pub fn snapshot(&self, key: &str, new: &Path) -> Result<serde_json::Value, ApiError> {
        let _one_at_a_time = lock(&self.changing);
        let disk = self.find(key)?;
        let Some(old) = lock(&disk.recipe).overlay() else {
            return Err(invalid(format!(
                "{} has no cow overlay file to snapshot",
                disk.id
            )));
        };
        if new.exists() {
            return Err(invalid(format!(
                "{} exists: a snapshot makes a new overlay",
                new.display()
            )));
        }
        disk.device.swap(|chain| {
            if let Err(e) = chain.flush() {
                return Err((
                    ApiError::new(ErrorKind::Io, format!("flush before snapshot: {e}")),
                    chain,
                ));
            }
            *lock(&disk.stats) = None;
            drop(chain);
            let made = vdk_filters::cow::snapshot(&old, new);
            if made.is_ok() {
                lock(&disk.recipe).set_overlay(new);
                for f in lock(&disk.filters).iter_mut() {
                    if f.starts_with("cow") {
                        *f = format!("cow:overlay={}", new.display());
                    }
                }
            }
            let rebuilt = lock(&disk.recipe).build();
            let rebuilt = match (made, rebuilt) {
                (Ok(()), Ok((c, _))) => Ok(c),
                (Ok(()), Err(e)) => {
                    // Back to the old overlay, untouched.
                    let _ = fs::remove_file(new);
                    lock(&disk.recipe).set_overlay(&old);
                    Err((e, lock(&disk.recipe).build()))
                }
                (Err(e), _) => Err((ApiError::io("snapshot", &e), lock(&disk.recipe).build())),
            };
            match rebuilt {
                Ok(c) => {
                    *lock(&disk.stats) = c.stats.clone();
                    Ok(c.device)
                }
                Err((e, Ok((c, _)))) => {
                    *lock(&disk.stats) = c.stats.clone();
                    Err((e, c.device))
                }
                Err((e, Err(e2))) => {
                    disk.device.close();
                    let msg = format!(
                        "{}; the disk could not be opened again and is closed: {}",
                        e.message, e2.message
                    );
                    Err((
                        ApiError::new(ErrorKind::Io, msg),
                        super::tracked::placeholder(),
                    ))
                }
            }
        })?;
        info!(id = %disk.id, old = %old.display(), new = %new.display(), "snapshot: new overlay");
        Ok(serde_json::json!({ "id": disk.id, "overlay": new, "previous": old }))
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

    /// Every open disk.
    pub fn list(&self) -> Vec<DiskStatus> {
        let disks: Vec<Arc<Disk>> = lock(&self.disks).values().cloned().collect();
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

    /// Opens (or creates) an image and attaches it as asked.
    pub fn open(&self, req: OpenRequest) -> Result<DiskStatus, ApiError> {
        let _one_at_a_time = lock(&self.changing);
        let root = rustix::process::geteuid().is_root();
        let attach = match req.attach.as_deref() {
            None if root => ATTACH_FUSE_LOOP,
            None => ATTACH_NONE,
            Some(ATTACH_FUSE_LOOP) if !root => {
                return Err(ApiError::new(
                    ErrorKind::Permission,
                    "attaching a block device (fuse-loop) needs root; \
                     use --attach none to serve the disk over NBD only",
                ))
            }
            Some(ATTACH_FUSE_LOOP) => ATTACH_FUSE_LOOP,
            Some(ATTACH_NONE) => ATTACH_NONE,
            Some(other) => {
                return Err(invalid(format!(
                    "unknown attach mode {other:?}: use fuse-loop or none"
                )))
            }
        };
        let format = req
            .format
            .as_deref()
            .map(Format::from_name)
            .transpose()
            .map_err(|e| ApiError::new(ErrorKind::Unsupported, e.to_string()))?;
        if let Some(fs) = &req.mkfs {
            mount::check_fs_type(fs)?;
        }
        if attach == ATTACH_NONE && (req.mkfs.is_some() || req.mount.is_some()) {
            return Err(invalid(
                "--mkfs and --mount need a block device: not with --attach none",
            ));
        }
        if req.mkfs.is_some() && req.read_only {
            return Err(invalid("--mkfs cannot format a disk opened --read-only"));
        }
        parse_filters(&req.filters)?;
        allow_rules(&req.allow)?;
        let cloud = req.path.to_str().is_some_and(crate::cloud::is_url);
        if !cloud && !req.cloud.is_default() {
            return Err(invalid(
                "--s3-endpoint, --cache, --key-file and such are for object-store disks (s3://...)",
            ));
        }
        if !cloud && !req.path.is_absolute() {
            return Err(invalid(format!(
                "{}: the path must be absolute",
                req.path.display()
            )));
        }
        if let Some(name) = &req.export_name {
            if name.is_empty() || name.len() > 4096 {
                return Err(invalid("--export-name must be 1 to 4096 bytes"));
            }
        }
        if !req.iscsi && (req.iscsi_target.is_some() || req.iscsi_lun.is_some()) {
            return Err(invalid("--iscsi-target and --iscsi-lun go with --iscsi"));
        }
        let (image, created) = if cloud {
            self.cloud_image(&req)?
        } else {
            self.image(&req, format)?
        };
        let opened = self.open_image(&req, &image, format, attach);
        match opened {
            Ok(d) => {
                let status = self.status(&d);
                lock(&self.disks).insert(d.id.clone(), d);
                info!(id = %status.id, image = %image.display(), size = %Human(status.size), "disk open");
                Ok(status)
            }
            Err(e) => {
                if created {
                    // Nothing of a half-made image is worth keeping.
                    let _ = fs::remove_file(&image);
                }
                Err(e)
            }
        }
    }

    /// An object-store disk's URL, the disk created first if missing; `true` if it was.
    fn cloud_image(&self, req: &OpenRequest) -> Result<(PathBuf, bool), ApiError> {
        let url = req.path.to_string_lossy().into_owned();
        let store = crate::cloud::store_options(&req.cloud);
        match vdk_objstore::info(&url, &store) {
            Ok(s) => {
                if let Some(size) = req.size.filter(|z| *z != s.meta.size) {
                    return Err(invalid(format!(
                        "{url} exists and has {} bytes, not {size}: a size is for new disks",
                        s.meta.size
                    )));
                }
                if req.mkfs.is_some() {
                    return Err(invalid(format!(
                        "{url} exists: --mkfs formats only the new disks open creates"
                    )));
                }
                Ok((PathBuf::from(url), false))
            }
            Err(vdk_objstore::ObjError::NotFound(_)) => {
                if req.read_only {
                    return Err(ApiError::new(
                        ErrorKind::NotFound,
                        format!("{url}: no disk there (a new disk cannot be read-only)"),
                    ));
                }
                let size = req.size.unwrap_or(DEFAULT_SIZE);
                let mut opts = vdk_objstore::CreateOptions::new(size);
                opts.store = store;
                vdk_objstore::create(&url, &opts).map_err(|e| {
                    cloud_error(anyhow::Error::new(e).context(format!("cannot create {url}")))
                })?;
                info!(image = %url, size = %Human(size), "created");
                Ok((PathBuf::from(url), true))
            }
            Err(e) => Err(cloud_error(
                anyhow::Error::new(e).context(format!("cannot open {url}")),
            )),
        }
    }

    /// The image's canonical path, created first if missing; `true` if it was created.
    fn image(
        &self,
        req: &OpenRequest,
        format: Option<Format>,
    ) -> Result<(PathBuf, bool), ApiError> {
        let path = &req.path;
        let shown = path.display();
        match fs::metadata(path) {
            Ok(m) if m.is_dir() => Err(invalid(format!("{shown} is a directory, not an image"))),
            Ok(m) if !m.is_file() => Err(invalid(format!("{shown} is not a regular file"))),
            Ok(m) => {
                if let Some(size) = req.size.filter(|s| *s != m.len()) {
                    return Err(invalid(format!(
                        "{shown} exists and has {} bytes, not {size}: a size is for new images",
                        m.len()
                    )));
                }
                if req.mkfs.is_some() {
                    return Err(invalid(format!(
                        "{shown} exists: --mkfs formats only the new images open creates \
                         (format /dev/loopN yourself to wipe an existing one)"
                    )));
                }
                let canonical =
                    fs::canonicalize(path).map_err(|e| ApiError::io(format!("{shown}"), &e))?;
                Ok((canonical, false))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if req.read_only {
                    return Err(ApiError::new(
                        ErrorKind::NotFound,
                        format!("{shown} does not exist (a new image cannot be read-only)"),
                    ));
                }
                let size = req.size.unwrap_or(DEFAULT_SIZE);
                if size == 0 || !size.is_multiple_of(512) {
                    return Err(invalid(format!(
                        "size {size} must be a positive multiple of 512 bytes"
                    )));
                }
                let parent = path.parent().unwrap_or(Path::new("/"));
                if !parent.is_dir() {
                    return Err(ApiError::new(
                        ErrorKind::NotFound,
                        format!(
                            "cannot create {shown}: {} is not a directory",
                            parent.display()
                        ),
                    ));
                }
                let opts = vdk_formats::CreateOptions {
                    format: format.unwrap_or(Format::Raw),
                    cluster_size: None,
                    backing: None,
                    fixed: false,
                };
                vdk_formats::create(path, size, &opts)
                    .map_err(|e| ApiError::io(format!("cannot create {shown}"), &e))?;
                info!(image = %shown, size = %Human(size), "created");
                let canonical =
                    fs::canonicalize(path).map_err(|e| ApiError::io(format!("{shown}"), &e))?;
                Ok((canonical, true))
            }
            Err(e) => Err(ApiError::io(format!("cannot open {shown}"), &e)),
        }
    }

    fn open_image(
        &self,
        req: &OpenRequest,
        image: &Path,
        format: Option<Format>,
        attach: &'static str,
    ) -> Result<Arc<Disk>, ApiError> {
        let specs = parse_filters(&req.filters)?;
        let redirect = vdk_filters::redirects_writes(&specs);
        // What makes this disk itself: the image, or for a cow disk its overlay (many cow
        // disks may share one base).
        let (key, id) = match specs.iter().find_map(|s| match s {
            vdk_filters::FilterSpec::Cow(o) => Some(o.overlay.clone()),
            _ => None,
        }) {
            Some(vdk_filters::cow::Overlay::Persistent(p)) => {
                let p = std::path::absolute(&p).map_err(|e| ApiError::io("overlay path", &e))?;
                let id = disk_id(&p);
                (p, id)
            }
            Some(vdk_filters::cow::Overlay::Volatile) => {
                let n = self
                    .volatile
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let id = format!("{}-v{n}", disk_id(image));
                (image.join(format!("#volatile-{n}")), id)
            }
            None => (image.to_owned(), disk_id(image)),
        };
        if let Some(d) = lock(&self.disks).values().find(|d| d.key == key) {
            return Err(ApiError::new(
                ErrorKind::AlreadyOpen,
                format!("{} is already open as {}", key.display(), d.id),
            ));
        }
        let shown = image.display();
        let recipe = Recipe {
            image: image.to_owned(),
            format,
            // The base of a cow disk is only read.
            read_only: req.read_only || redirect,
            probe_backing: req.probe_backing,
            specs,
            cloud: image
                .to_str()
                .is_some_and(crate::cloud::is_url)
                .then(|| (req.cloud.clone(), self.paths.dir.join("cache"))),
        };
        let (chain, opened_format) = recipe.build()?;
        let backend = chain.device;
        let size_info = backend.info();
        let size = size_info.size;
        if size == 0 {
            return Err(invalid(format!(
                "{shown} is empty (0 bytes): nothing to serve"
            )));
        }
        if size % 512 != 0 {
            return Err(invalid(format!(
                "{shown} has {size} bytes, not a multiple of 512: a truncated image?"
            )));
        }
        let device = Arc::new(Tracked::new(backend));
        let export_name = req.export_name.clone().unwrap_or_else(|| id.clone());
        let mut export = Export::new(
            export_name.clone(),
            Arc::clone(&device) as Arc<dyn BlockDevice>,
        );
        export.read_only = req.read_only;
        let allow = allow_rules(&req.allow)?;
        export.allow = allow.clone();
        export.description = format!("vdk disk {id}: {shown}");
        self.nbd
            .add_export(export)
            .map_err(|e| ApiError::new(ErrorKind::AlreadyOpen, format!("NBD export: {e}")))?;
        let disk = Arc::new(Disk {
            id: id.clone(),
            key,
            disc: Mutex::new(Disc {
                image: image.to_owned(),
                format: opened_format.name().into(),
                size,
            }),
            // An ISO is read-only whatever was asked.
            read_only: req.read_only || size_info.read_only,
            cdrom: size_info.media == vdk_core::MediaKind::CdRom,
            iscsi: Mutex::new(None),
            attach,
            export: export_name,
            allow,
            device,
            filters: Mutex::new(req.filters.clone()),
            stats: Mutex::new(chain.stats),
            recipe: Mutex::new(recipe),
            state: Mutex::default(),
        });
        let set_up = self.set_up(&disk, req);
        if let Err(e) = set_up {
            // Undo whatever part was done; the error to report is the first one.
            let _ = self.tear_down(&disk, true);
            return Err(e);
        }
        Ok(disk)
    }

    /// Attaches, formats and mounts a disk as `req` asks.
    fn set_up(&self, disk: &Disk, req: &OpenRequest) -> Result<(), ApiError> {
        if req.iscsi || self.iscsi.all() {
            let lun = self.iscsi.expose(
                &disk.id,
                Arc::clone(&disk.device) as Arc<dyn BlockDevice>,
                req.iscsi_target.as_deref(),
                req.iscsi_lun,
            )?;
            *lock(&disk.iscsi) = Some(lun);
        }
        if disk.attach == ATTACH_FUSE_LOOP {
            self.attach(disk)?;
        }
        if let Some(fs) = &req.mkfs {
            let dev = lock(&disk.state).block_device.clone();
            mount::mkfs(fs, dev.as_deref().unwrap_or(Path::new("")))?;
        }
        if let Some(dir) = &req.mount {
            self.mount_disk(disk, dir, req.mkfs.as_deref())?;
        }
        Ok(())
    }

    /// Gives a disk its block device (fuse-loop).
    pub(super) fn attach(&self, disk: &Disk) -> Result<(), ApiError> {
        let attached = self
            .attacher()?
            .attach(
                &disk.id,
                Arc::clone(&disk.device) as Arc<dyn BlockDevice>,
                disk.read_only,
            )
            .map_err(|e| ApiError::io("cannot attach a loop device", &e))?;
        let dev = attached.block_device();
        info!(id = %disk.id, dev = %dev.display(), "attached");
        let mut st = lock(&disk.state);
        st.block_device = Some(dev);
        st.attached = Some(attached);
        Ok(())
    }

    fn mount_disk(&self, disk: &Disk, dir: &Path, fs: Option<&str>) -> Result<(), ApiError> {
        if !dir.is_absolute() {
            return Err(invalid(format!(
                "{}: the mount point must be absolute",
                dir.display()
            )));
        }
        let dev = {
            let st = lock(&disk.state);
            if let Some(m) = &st.mount {
                return Err(invalid(format!(
                    "{} is already mounted on {}",
                    disk.id,
                    m.display()
                )));
            }
            st.block_device.clone().ok_or_else(|| {
                invalid(format!(
                    "{} has no block device (opened with --attach none)",
                    disk.id
                ))
            })?
        };
        mount::mount(&dev, dir, fs, disk.read_only)?;
        lock(&disk.state).mount = Some(dir.to_owned());
        Ok(())
    }

    /// Unmounts, detaches, withdraws the exports and flushes. With `force`, a busy mount is
    /// detached lazily and the disk refuses everything still queued.
    fn tear_down(&self, disk: &Disk, force: bool) -> Result<(), ApiError> {
        for dir in self.filesystems_on(&disk.id) {
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
            if let Some(m) = lock(&self.filesystems).remove(&dir) {
                drop(m); // unmounts lazily
            }
        }
        let mount = lock(&disk.state).mount.clone();
        if let Some(dir) = mount {
            if force {
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
        if let Some(fs) = &req.mkfs {
            mount::check_fs_type(fs)?;
            let dev = lock(&disk.state).block_device.clone().ok_or_else(|| {
                invalid(format!(
                    "{} has no block device (opened with --attach none)",
                    disk.id
                ))
            })?;
            if lock(&disk.state).mount.is_some() {
                return Err(invalid(format!(
                    "{} is mounted: unmount it before formatting",
                    disk.id
                )));
            }
            mount::mkfs(fs, &dev)?;
        }
        self.mount_disk(&disk, &req.dir, req.mkfs.as_deref())?;
        Ok(self.status(&disk))
    }

    /// Unmounts an open disk's file system; the disk stays open.
    pub fn unmount(&self, key: &str, force: bool) -> Result<DiskStatus, ApiError> {
        let _one_at_a_time = lock(&self.changing);
        let disk = self.find(key)?;
        let Some(dir) = lock(&disk.state).mount.clone() else {
            return Err(invalid(format!("{} is not mounted", disk.id)));
        };
        mount::unmount(&dir, force)?;
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

/// The NBD allow-list of an `open` request.
fn allow_rules(rules: &[String]) -> Result<Vec<vdk_nbd::Rule>, ApiError> {
    rules
        .iter()
        .map(|r| r.parse::<vdk_nbd::Rule>().map_err(invalid))
        .collect()
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
