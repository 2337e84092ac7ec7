//! Opening disks: the image (created if missing, in the format its name says), the chain of
//! filters over it, its NBD export, and as asked an iSCSI LUN, a block device, a new file
//! system and a mount. Whatever fails half way is undone: no image, export or mount is left
//! behind by an `open` that failed.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing::{info, warn};
use vdk_core::size::Human;
use vdk_core::sync::lock;
use vdk_filters::cow::Overlay;
use vdk_filters::FilterSpec;
use vdk_formats::Format;

use super::disks::{disk_id, Disk, Medium};
#[cfg(target_os = "linux")]
use super::mount;
use super::nbd::ExportSpec;
use super::recipe::{cloud_error, parse_filters, Recipe};
use super::tracked::Tracked;
use super::{Daemon, DEFAULT_SIZE};
use crate::control::{ApiError, Attach, DiskStatus, ErrorKind, OpenRequest};

/// Shorthand for the wrong-argument error.
fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::invalid(msg)
}

/// What an `open` request asks for, checked and parsed once, before anything is made.
struct Asked {
    attach: Attach,
    format: Option<Format>,
    specs: Vec<FilterSpec>,
    allow: Vec<vdk_nbd::Rule>,
    /// A LUKS image's passphrase.
    key: Option<vdk_formats::luks::Secret>,
}

impl Asked {
    fn of(req: &OpenRequest) -> Result<Asked, ApiError> {
        #[cfg(target_os = "linux")]
        let root = rustix::process::geteuid().is_root();
        let attach = match req.attach {
            #[cfg(target_os = "linux")]
            None | Some(Attach::Auto) if root => super::attacher::auto(),
            #[cfg(windows)]
            None => Attach::Iscsi,
            #[cfg(not(windows))]
            None => Attach::None,
            #[cfg(not(windows))]
            Some(Attach::Iscsi) => {
                return Err(ApiError::new(
                    ErrorKind::Unsupported,
                    "--attach iscsi logs Windows' initiator in: on Linux use --iscsi and the \
                     system's initiator (iscsiadm), or --attach fuse-loop",
                ))
            }
            #[cfg(target_os = "linux")]
            Some(a @ (Attach::FuseLoop | Attach::Ublk | Attach::Nbd | Attach::Auto)) if !root => {
                return Err(ApiError::new(
                    ErrorKind::Permission,
                    format!(
                        "attaching a block device ({a}) needs root; \
                         use --attach none to serve the disk over NBD only"
                    ),
                ))
            }
            #[cfg(target_os = "linux")]
            Some(Attach::Ublk) => {
                vdk_attach::Ublk::new()
                    .map_err(|e| ApiError::new(ErrorKind::Unsupported, e.to_string()))?;
                Attach::Ublk
            }
            #[cfg(target_os = "linux")]
            Some(Attach::Nbd) => {
                vdk_attach::KernelNbd::available()
                    .map_err(|e| ApiError::new(ErrorKind::Unsupported, e.to_string()))?;
                Attach::Nbd
            }
            #[cfg(not(target_os = "linux"))]
            Some(a @ (Attach::FuseLoop | Attach::Ublk | Attach::Nbd)) => {
                return Err(ApiError::new(
                    ErrorKind::Unsupported,
                    format!(
                        "{a} block devices are Linux's: on Windows serve the disk with \
                         --attach iscsi or none"
                    ),
                ))
            }
            #[cfg(not(target_os = "linux"))]
            Some(Attach::Auto) => Attach::Iscsi,
            Some(a) => a,
        };
        let format = req
            .format
            .as_deref()
            .map(Format::from_name)
            .transpose()
            .map_err(|e| ApiError::new(ErrorKind::Unsupported, e.to_string()))?;
        #[cfg(target_os = "linux")]
        if let Some(fs) = &req.mkfs {
            mount::check_fs_type(fs)?;
        }
        #[cfg(windows)]
        if let Some(fs) = &req.mkfs {
            super::initiator::file_system(fs)?;
        }
        #[cfg(windows)]
        if let Some(dir) = &req.mount {
            super::initiator::drive_letter(&dir.to_string_lossy())?;
        }
        if attach == Attach::None && (req.mkfs.is_some() || req.mount.is_some()) {
            return Err(invalid(
                "--mkfs and --mount need a block device: not with --attach none",
            ));
        }
        if req.mkfs.is_some() && req.read_only {
            return Err(invalid("--mkfs cannot format a disk opened --read-only"));
        }
        if req.force && req.mkfs.is_none() {
            return Err(invalid(
                "--force goes with --mkfs (to format a disk that holds data)",
            ));
        }
        let specs = parse_filters(&req.filters)?;
        let allow = allow_rules(&req.allow)?;
        let cloud = is_cloud(req);
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
        if let Some(p) = &req.vhost_user {
            super::vhost::check_socket_path(p)?;
        }
        let key = match (&req.key_file, &req.key_secret) {
            (Some(_), Some(_)) => return Err(invalid("a key file or a key secret, not both")),
            (Some(f), None) => Some(
                vdk_formats::luks::Secret::from_file(f)
                    .map_err(|e| ApiError::io("cannot read the key", &e))?,
            ),
            (None, Some(s)) => Some(vdk_formats::luks::Secret::new(s.0.clone().into_bytes())),
            (None, None) => None,
        };
        Ok(Asked {
            attach,
            format,
            specs,
            allow,
            key,
        })
    }
}

/// Whether the request names a disk in object storage (a URL).
fn is_cloud(req: &OpenRequest) -> bool {
    req.path.to_str().is_some_and(crate::cloud::is_url)
}

impl Daemon {
    /// Opens (or creates) an image and attaches it as asked.
    pub(super) fn open(&self, req: OpenRequest, opener: u32) -> Result<DiskStatus, ApiError> {
        let _one_at_a_time = lock(&self.changing);
        let asked = Asked::of(&req)?;
        let (image, created) = if is_cloud(&req) {
            self.cloud_image(&req)?
        } else {
            self.image(&req, asked.format, asked.key.as_ref())?
        };
        match self.open_image(&req, asked, &image, opener) {
            Ok(d) => {
                let status = self.status(&d);
                self.disks.insert(d);
                info!(id = %status.id, image = %image.display(), size = %Human(status.size), "disk open");
                Ok(status)
            }
            Err(e) => {
                if created {
                    // Nothing of a half-made image is worth keeping.
                    self.remove_new_image(&req, &image);
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
                Ok((PathBuf::from(url), false))
            }
            Err(vdk_objstore::ObjError::NotFound(_)) => {
                may_create(req, &format!("{url}: no disk there"))?;
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

    /// The image's canonical path, created first if missing; `true` if it was created. A new
    /// image takes the format its name says (disk.qcow2, disk.vhdx), else raw.
    fn image(
        &self,
        req: &OpenRequest,
        format: Option<Format>,
        key: Option<&vdk_formats::luks::Secret>,
    ) -> Result<(PathBuf, bool), ApiError> {
        let path = &req.path;
        let shown = path.display();
        match fs::metadata(path) {
            Ok(m) if m.is_dir() => Err(invalid(format!("{shown} is a directory, not an image"))),
            Ok(m) if !m.is_file() => Err(invalid(format!("{shown} is not a regular file"))),
            Ok(m) => {
                if let Some(size) = req.size {
                    // A raw file's size is its length; an image's is in its header.
                    let have =
                        vdk_formats::info(path, format, false).map_or(m.len(), |i| i.virtual_size);
                    if size != have {
                        return Err(invalid(format!(
                            "{shown} exists and has {} ({have} bytes), not {}: a size is for \
                             new images (`vdk resize` changes one)",
                            Human(have),
                            Human(size)
                        )));
                    }
                }
                let canonical = crate::paths::canonical(path)
                    .map_err(|e| ApiError::io(format!("{shown}"), &e))?;
                Ok((canonical, false))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                may_create(req, &format!("{shown} does not exist"))?;
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
                let format = format
                    .or_else(|| vdk_formats::format_by_name(path))
                    .unwrap_or(Format::Raw);
                // A new .luks or .qcow2 image is encrypted with the key given (key slot 0).
                let encrypt = key
                    .filter(|_| matches!(format, Format::Luks | Format::Qcow2))
                    .map(|k| vdk_formats::luks::CreateOptions {
                        secret: k.clone(),
                        iter_time_ms: 2000,
                    });
                let opts = vdk_formats::CreateOptions {
                    format,
                    cluster_size: None,
                    backing: None,
                    fixed: false,
                    encrypt,
                };
                vdk_formats::create(path, size, &opts)
                    .map_err(|e| ApiError::io(format!("cannot create {shown}"), &e))?;
                info!(image = %shown, size = %Human(size), %format, "created");
                let canonical = crate::paths::canonical(path)
                    .map_err(|e| ApiError::io(format!("{shown}"), &e))?;
                Ok((canonical, true))
            }
            Err(e) => Err(ApiError::io(format!("cannot open {shown}"), &e)),
        }
    }

    fn open_image(
        &self,
        req: &OpenRequest,
        asked: Asked,
        image: &Path,
        opener: u32,
    ) -> Result<Arc<Disk>, ApiError> {
        let redirect = vdk_filters::redirects_writes(&asked.specs);
        // What makes this disk itself: the image, or for a cow disk its overlay (many cow
        // disks may share one base).
        let overlay = asked.specs.iter().find_map(|s| match s {
            FilterSpec::Cow(o) => Some(o.overlay.clone()),
            _ => None,
        });
        let (key, id) = match overlay {
            Some(Overlay::Persistent(p)) => {
                let p = std::path::absolute(&p).map_err(|e| ApiError::io("overlay path", &e))?;
                let id = disk_id(&p);
                (p, id)
            }
            Some(Overlay::Volatile) => {
                let n = self.disks.next_volatile();
                let id = format!("{}-v{n}", disk_id(image));
                (image.join(format!("#volatile-{n}")), id)
            }
            None => (image.to_owned(), disk_id(image)),
        };
        if let Some(d) = self.disks.with_key(&key) {
            return Err(ApiError::new(
                ErrorKind::AlreadyOpen,
                format!("{} is already open as {}", key.display(), d.id),
            ));
        }
        let shown = image.display();
        let mut recipe = Recipe {
            image: image.to_owned(),
            format: asked.format,
            // The base of a cow disk is only read.
            read_only: req.read_only || redirect,
            probe_backing: req.probe_backing,
            specs: asked.specs,
            cloud: is_cloud(req).then(|| (req.cloud.clone(), self.paths.dir.join("cache"))),
            object: std::sync::Weak::new(),
            key: asked.key.clone(),
            bitmap_store: None,
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
        if let Some(store) = &recipe.bitmap_store {
            for (name, b) in store.stored() {
                info!(image = %shown, bitmap = %name, inconsistent = b.is_inconsistent(), "dirty bitmap loaded from the image");
                device.bitmaps().add(&name, b).map_err(invalid)?;
            }
        }
        let export = req.export_name.clone().unwrap_or_else(|| id.clone());
        let spec = ExportSpec {
            name: &export,
            read_only: req.read_only,
            allow: &asked.allow,
            description: format!("vdk disk {id}: {shown}"),
        };
        self.nbd.export(spec, &device)?;
        let disk = Arc::new(Disk {
            id,
            opener,
            key,
            medium: Mutex::new(Medium {
                image: image.to_owned(),
                format: opened_format.name().into(),
                size,
            }),
            // An ISO is read-only whatever was asked.
            read_only: req.read_only || size_info.read_only,
            cdrom: size_info.media == vdk_core::MediaKind::CdRom,
            iscsi: Mutex::new(None),
            vhost: Mutex::new(None),
            backups: Mutex::default(),
            backup: Mutex::default(),
            attach: asked.attach,
            export,
            allow: asked.allow,
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
        // Windows' initiator: the LUN, the login, the format or letter, all in one.
        #[cfg(windows)]
        if disk.attach == Attach::Iscsi {
            return self.attach_iscsi(disk, req);
        }
        if req.iscsi || self.iscsi.all() {
            let lun = self.iscsi.expose(
                &disk.id,
                disk.device.clone(),
                req.iscsi_target.as_deref(),
                req.iscsi_lun,
                None,
            )?;
            *lock(&disk.iscsi) = Some(lun);
        }
        #[cfg(target_os = "linux")]
        if let Some(path) = &req.vhost_user {
            self.serve_vhost(disk, path)?;
        }
        if disk.attach.is_block_device() {
            self.attach(disk)?;
        }
        if let Some(fs) = &req.mkfs {
            self.format(disk, fs, req.force, &open_again(req))?;
        }
        if let Some(dir) = &req.mount {
            self.mount_disk(disk, dir, req.mkfs.as_deref(), &open_again(req))?;
        }
        Ok(())
    }

    /// Removes an image `open` created for a disk that then failed to open.
    fn remove_new_image(&self, req: &OpenRequest, image: &Path) {
        let url = image.to_string_lossy();
        if crate::cloud::is_url(&url) {
            let store = crate::cloud::store_options(&req.cloud);
            if let Err(e) = vdk_objstore::destroy(&url, &store) {
                warn!(disk = %url, error = %e, "cannot delete the disk just made");
            }
        } else if let Err(e) = fs::remove_file(image) {
            warn!(image = %image.display(), error = %e, "cannot delete the image just made");
        }
    }
}

/// Refuses to create a missing image (`missing` says what is missing) for a request that
/// forbids it or could not use a new one.
fn may_create(req: &OpenRequest, missing: &str) -> Result<(), ApiError> {
    let why = if req.no_create {
        "and --no-create was given"
    } else if req.read_only {
        "a new image cannot be read-only"
    } else {
        return Ok(());
    };
    Err(ApiError::new(
        ErrorKind::NotFound,
        format!("{missing} ({why})"),
    ))
}

/// The `vdk open` command of a request again, with `extra` options: what an error tells the
/// user to run instead.
fn open_again(req: &OpenRequest) -> impl Fn(&str) -> String + '_ {
    move |extra: &str| {
        let mut cmd = format!("vdk open {}", req.path.display());
        if let Some(fs) = &req.mkfs {
            if !extra.starts_with("--mkfs") {
                cmd.push_str(&format!(" --mkfs {fs}"));
            }
        }
        cmd.push(' ');
        cmd.push_str(extra);
        if let Some(dir) = &req.mount {
            cmd.push_str(&format!(" --mount {}", dir.display()));
        }
        cmd
    }
}

/// The NBD allow-list of an `open` request.
fn allow_rules(rules: &[String]) -> Result<Vec<vdk_nbd::Rule>, ApiError> {
    rules
        .iter()
        .map(|r| r.parse::<vdk_nbd::Rule>().map_err(invalid))
        .collect()
}
