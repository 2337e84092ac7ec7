//! File systems the daemon mounts in user space: `vdk fs mount` shows an ISO 9660 image (a
//! file of any format vdk reads, or an open disk) as a read-only directory tree; `vdk fs map`
//! shows a bucket's objects as a cloud drive.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing::info;
use vdk_core::sync::lock;
use vdk_core::BlockDevice;
use vdk_drive::DriveMount;
use vdk_fs::iso9660::{Iso, Scheme};
use vdk_fs::IsoMount;

use super::access::Caller;
use super::mount::MadeDirs;
use super::Paths;
use crate::control::{ApiError, ErrorKind, FsMapRequest, FsStatus};

/// Shorthand for the wrong-argument error.
fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::invalid(msg)
}

/// What is mounted.
#[derive(Debug)]
enum Kind {
    Iso {
        mount: IsoMount,
        scheme: Scheme,
    },
    Drive {
        mount: DriveMount,
        label: String,
        cache: PathBuf,
    },
}

/// A mounted file system.
#[derive(Debug)]
struct Mounted {
    kind: Kind,
    /// The user whose request mounted it.
    opener: u32,
    source: String,
    /// The open disk it reads, if it reads one.
    disk: Option<String>,
    size: u64,
}

impl Mounted {
    fn unmount(&self, lazy: bool) -> std::io::Result<()> {
        match &self.kind {
            Kind::Iso { mount, .. } => mount.unmount(lazy),
            Kind::Drive { mount, .. } => mount.unmap(lazy),
        }
    }
}

/// The daemon's file systems, by mount point.
type Table = BTreeMap<PathBuf, Mounted>;

/// The file systems the daemon has mounted, by mount point, recorded on disk for a daemon
/// that follows one that died.
#[derive(Debug)]
pub struct Filesystems {
    table: Mutex<Table>,
    paths: Paths,
}

/// What an ISO browser reads, for [`Filesystems::mount_iso`].
#[derive(Debug)]
pub struct IsoSource {
    /// The disk (or the image file opened read-only).
    pub device: Arc<dyn BlockDevice>,
    /// What to call it: the image's path.
    pub name: String,
    /// The open disk it is, if it is one.
    pub disk: Option<String>,
}

fn status(dir: &Path, m: &Mounted) -> FsStatus {
    let (kind, label, names, cache) = match &m.kind {
        Kind::Iso { mount, scheme } => (
            "iso9660",
            mount.label().to_owned(),
            match scheme {
                Scheme::RockRidge { .. } => "rock-ridge",
                Scheme::Joliet => "joliet",
                Scheme::Plain => "iso9660",
            },
            None,
        ),
        Kind::Drive { label, cache, .. } => {
            ("cloud-drive", label.clone(), "objects", Some(cache.clone()))
        }
    };
    FsStatus {
        dir: dir.to_owned(),
        kind: kind.into(),
        source: m.source.clone(),
        disk: m.disk.clone(),
        label,
        names: names.into(),
        size: m.size,
        cache,
    }
}

/// A new label: a random UUID.
fn new_label() -> String {
    fs::read_to_string("/proc/sys/kernel/random/uuid").map_or_else(
        |_| format!("drive-{}", std::process::id()),
        |s| s.trim().to_owned(),
    )
}

/// A label is a name for a directory: no separators, no dot names, not empty.
fn check_label(label: &str) -> Result<(), ApiError> {
    let ok = !label.is_empty()
        && label.len() <= 128
        && label != "."
        && label != ".."
        && !label.contains('/')
        && !label.chars().any(char::is_control);
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{label:?} is not a label: give up to 128 characters, no '/'"
        )))
    }
}

impl Filesystems {
    /// No file systems, recorded in the daemon's directory `paths`.
    pub fn new(paths: Paths) -> Filesystems {
        Filesystems {
            table: Mutex::default(),
            paths,
        }
    }

    /// `dir` made ready to mount on: absolute, created, canonical, not a mount point. The
    /// directories made for it go again (if still empty) unless the guard is kept.
    fn mount_point(&self, dir: &Path) -> Result<(PathBuf, MadeDirs), ApiError> {
        if !dir.is_absolute() {
            return Err(invalid(format!(
                "{}: the mount point must be absolute",
                dir.display()
            )));
        }
        let made = MadeDirs::create(dir)
            .map_err(|e| ApiError::io(format!("cannot create {}", dir.display()), &e))?;
        let dir =
            fs::canonicalize(dir).map_err(|e| ApiError::io(format!("{}", dir.display()), &e))?;
        if lock(&self.table).contains_key(&dir) {
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
        Ok((dir, made))
    }

    /// Maps the cloud drive `req.url` on `req.dir`.
    pub fn map(&self, req: &FsMapRequest, who: vdk_drive::Access) -> Result<FsStatus, ApiError> {
        if !crate::cloud::is_url(&req.url) {
            return Err(invalid(format!(
                "{:?} is not a bucket URL (s3://BUCKET/PREFIX, gs://, az://, file:///DIR)",
                req.url
            )));
        }
        let label = match &req.label {
            Some(l) => {
                check_label(l)?;
                l.clone()
            }
            None => new_label(),
        };
        let cache = match &req.cache {
            Some(c) if !c.is_absolute() => {
                return Err(invalid(format!(
                    "{}: the cache directory must be absolute",
                    c.display()
                )))
            }
            Some(c) => c.clone(),
            None => self.paths.dir.join("drives").join(&label),
        };
        for (d, m) in lock(&self.table).iter() {
            if let Kind::Drive {
                label: l, cache: c, ..
            } = &m.kind
            {
                if *l == label || *c == cache {
                    return Err(ApiError::new(
                        ErrorKind::AlreadyOpen,
                        format!(
                            "the drive {l:?} on {} has that {} already",
                            d.display(),
                            if *l == label { "label" } else { "cache" }
                        ),
                    ));
                }
            }
        }
        let (dir, made_dir) = self.mount_point(&req.dir)?;
        let opts = vdk_objstore::StoreOptions {
            endpoint: req.endpoint.clone(),
            region: req.region.clone(),
            env: req.env.clone(),
            retry_timeout: Some(std::time::Duration::from_secs(30)),
            ..vdk_objstore::StoreOptions::default()
        };
        let location = vdk_objstore::Location::parse(&req.url, &opts, false)
            .map_err(|e| ApiError::new(ErrorKind::Invalid, format!("{}: {e}", req.url)))?;
        let made_cache = MadeDirs::create(&cache)
            .map_err(|e| ApiError::io(format!("cannot create {}", cache.display()), &e))?;
        let access = vdk_drive::Access {
            shared: req.allow_other,
            ..who
        };
        let mount = DriveMount::map(&location, &dir, &cache, &req.url, access)
            .map_err(|e| ApiError::io(format!("cannot map {}", req.url), &e))?;
        made_dir.keep();
        made_cache.keep();
        let m = Mounted {
            kind: Kind::Drive {
                mount,
                label,
                cache,
            },
            source: req.url.clone(),
            disk: None,
            size: 0,
            opener: who.uid,
        };
        let st = status(&dir, &m);
        info!(dir = %dir.display(), url = %req.url, label = %st.label, "cloud drive mapped");
        let mut table = lock(&self.table);
        table.insert(dir, m);
        self.record(&table);
        Ok(st)
    }

    /// Mounts the ISO 9660 file system of `source` on `dir`, read-only, for the user
    /// `opener`.
    pub fn mount_iso(
        &self,
        source: IsoSource,
        dir: &Path,
        opener: u32,
    ) -> Result<FsStatus, ApiError> {
        let (dir, made) = self.mount_point(dir)?;
        let name = source.name;
        let size = source.device.info().size;
        let iso = Iso::open(source.device)
            .map_err(|e| ApiError::new(ErrorKind::Invalid, format!("{name}: {e}")))?;
        let scheme = iso.scheme();
        let mount = IsoMount::mount(iso, &dir, &name, vdk_fs::DEFAULT_THREADS)
            .map_err(|e| ApiError::io("FUSE", &e))?;
        made.keep();
        let m = Mounted {
            kind: Kind::Iso { mount, scheme },
            source: name,
            disk: source.disk,
            size,
            opener,
        };
        let st = status(&dir, &m);
        info!(dir = %dir.display(), source = %m.source, label = %st.label, "file system mounted");
        let mut table = lock(&self.table);
        table.insert(dir, m);
        self.record(&table);
        Ok(st)
    }

    /// Unmounts a file system of `vdk fs mount` or `vdk fs map`. A busy one is refused
    /// unless `force` (then it is detached and goes when its last user lets go).
    pub fn unmount(&self, dir: &Path, force: bool) -> Result<FsStatus, ApiError> {
        let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
        let mut table = lock(&self.table);
        let Some(m) = table.get(&dir) else {
            if super::recover::is_stale_fuse(&dir) {
                // A FUSE mount whose server died (a daemon killed): nothing answers in it,
                // so it only goes away.
                rustix::mount::unmount(&dir, rustix::mount::UnmountFlags::DETACH).map_err(|e| {
                    ApiError::io(format!("cannot detach {}", dir.display()), &e.into())
                })?;
                info!(dir = %dir.display(), "stale file system detached");
                return Ok(FsStatus {
                    dir,
                    kind: "stale".into(),
                    source: String::new(),
                    disk: None,
                    label: String::new(),
                    names: String::new(),
                    size: 0,
                    cache: None,
                });
            }
            return Err(ApiError::new(
                ErrorKind::NotFound,
                format!("no file system of vdk's is mounted on {}", dir.display()),
            ));
        };
        m.unmount(force).map_err(|e| {
            let who = super::mount::busy_with(&dir);
            let who = format!(", in use by {who}");
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
        self.record(&table);
        info!(dir = %dir.display(), "file system unmounted");
        Ok(st)
    }

    /// Writes down where the file systems are mounted, for a daemon that follows a crash.
    fn record(&self, table: &Table) {
        let dirs: Vec<&Path> = table.keys().map(PathBuf::as_path).collect();
        super::recover::record_mounts(&self.paths, &dirs);
    }

    /// The mounted file systems that `caller` may see: its own, or all for a trusted one.
    pub fn list(&self, caller: &Caller) -> Vec<FsStatus> {
        lock(&self.table)
            .iter()
            .filter(|(_, m)| caller.may_manage(m.opener))
            .map(|(d, m)| status(d, m))
            .collect()
    }

    /// Who mounted the file system on `dir`, if vdk did.
    pub fn opener(&self, dir: &Path) -> Option<u32> {
        let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
        lock(&self.table).get(&dir).map(|m| m.opener)
    }

    /// The mount points of file systems read from the disk `id`.
    pub fn on_disk(&self, id: &str) -> Vec<PathBuf> {
        lock(&self.table)
            .iter()
            .filter(|(_, m)| m.disk.as_deref() == Some(id))
            .map(|(d, _)| d.clone())
            .collect()
    }

    /// Detaches the file system on `dir` at once, busy or not (it goes when its last user
    /// lets go).
    pub fn detach(&self, dir: &Path) {
        let mut table = lock(&self.table);
        // Dropped, a mount is detached lazily.
        drop(table.remove(dir));
        self.record(&table);
    }

    /// Unmounts every file system (lazily: the daemon is going away).
    pub fn unmount_all(&self) {
        let all = std::mem::take(&mut *lock(&self.table));
        self.record(&Table::new());
        for (dir, m) in all {
            let _ = m.unmount(true);
            info!(dir = %dir.display(), "file system unmounted");
        }
    }
}
