//! Who is asking, and what they may touch.
//!
//! The control socket is mode 0600 in a directory of the daemon's, so only its owner can
//! connect; on top of that every connection's credentials are read with `SO_PEERCRED` and a
//! caller that is neither the daemon's user, root, nor the `--owner` the daemon serves is
//! refused. A daemon run as root for another user (`vdk daemon --owner alice`) opens files
//! with root's rights: every path in that user's requests is resolved (symbolic links
//! followed) and checked against the user's own uid and groups, directory by directory, so
//! that nobody opens through the daemon a file or device they could not open themselves; the
//! backing files and data files an image's header names are checked the same way.

use std::fs::Metadata;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::control::{ApiError, ErrorKind, Request};

/// The credentials of a control connection's peer.
#[derive(Clone, Debug)]
pub struct Caller {
    /// Its user id.
    pub uid: u32,
    /// Its process id (as the socket saw it when it connected).
    pub pid: u32,
    /// Its primary group id.
    pub gid: u32,
    groups: Vec<u32>,
    /// Its rights are the daemon's own (the daemon's user, or root): nothing is checked.
    pub trusted: bool,
}

/// What a request does with a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    /// Reads an existing file.
    Read,
    /// Reads and writes an existing file, or creates it.
    Write,
    /// Mounts on a directory, or fills it (created if missing): write access to it, or to
    /// its parent when it does not exist.
    Dir,
    /// A directory of objects (a `file://` store): read (and with `write`, change) what is
    /// in it; or, when it does not exist, make it.
    Tree {
        /// Objects are written in it.
        write: bool,
    },
}

const R: u32 = 4;
const W: u32 = 2;
const X: u32 = 1;

impl Caller {
    /// The peer of `conn`. `owner` is the user the daemon serves besides its own.
    pub fn of(conn: &UnixStream, owner: Option<u32>) -> io::Result<Caller> {
        let cred = rustix::net::sockopt::socket_peercred(conn)?;
        let uid = cred.uid.as_raw();
        let me = rustix::process::geteuid().as_raw();
        if uid != me && uid != 0 && owner != Some(uid) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "this daemon (uid {me}) takes no requests from uid {uid}: start your own \
                     with `vdk daemon`"
                ),
            ));
        }
        Ok(Caller {
            uid,
            pid: u32::try_from(cred.pid.as_raw_nonzero().get()).unwrap_or(0),
            gid: cred.gid.as_raw(),
            groups: supplementary_groups(cred.pid.as_raw_nonzero().get()).unwrap_or_default(),
            trusted: uid == me || uid == 0,
        })
    }

    fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }

    /// Whether the mode bits of `meta` grant this caller all of `bits`.
    fn granted(&self, meta: &Metadata, bits: u32) -> bool {
        let mode = meta.mode();
        let have = if meta.uid() == self.uid {
            mode >> 6
        } else if self.in_group(meta.gid()) {
            mode >> 3
        } else {
            mode
        } & 7;
        have & bits == bits
    }

    /// Whether this caller may change what user `opener` opened or mounted: its own, or
    /// anything for the daemon's own user and root.
    pub fn may_manage(&self, opener: u32) -> bool {
        self.trusted || self.uid == opener
    }

    /// Checks every path of `req` for an untrusted caller.
    pub fn check(&self, req: &Request) -> Result<(), ApiError> {
        if self.trusted {
            return Ok(());
        }
        for (path, want) in paths(req)? {
            self.check_path(&path, want)?;
            if matches!(want, Want::Read | Want::Write) && path.is_file() {
                self.check_chain(&path)?;
            }
        }
        Ok(())
    }

    /// The files an image's header makes the daemon open too (backing files, a qcow2
    /// external data file) are checked like the image: a header can name any path.
    fn check_chain(&self, image: &Path) -> Result<(), ApiError> {
        let Ok(mut info) = vdk_formats::info(image, None, true) else {
            return Ok(()); // not an image with a header (raw, or refused later when opened)
        };
        loop {
            if let Some(data) = &info.data_file {
                self.check_path(&vdk_formats::backing_path(&info.path, data), Want::Write)?;
            }
            let Some(next) = info.backing.take() else {
                if let Some(name) = &info.backing_file {
                    // Named but not opened by info (missing, or too deep): check the name.
                    self.check_path(&vdk_formats::backing_path(&info.path, name), Want::Read)?;
                }
                return Ok(());
            };
            self.check_path(&next.path, Want::Read)?;
            info = *next;
        }
    }

    /// The files `req` would create for an untrusted caller: to be given to the caller once
    /// made ([`Caller::adopt`]), as if the caller had made them.
    pub fn would_create(&self, req: &Request) -> Vec<PathBuf> {
        if self.trusted {
            return Vec::new();
        }
        paths(req)
            .unwrap_or_default()
            .into_iter()
            .filter(|(p, w)| matches!(w, Want::Write | Want::Tree { write: true }) && !p.exists())
            .map(|(p, _)| p)
            .collect()
    }

    /// Gives the files in `made` to the caller.
    pub fn adopt(&self, made: &[PathBuf]) {
        for p in made.iter().filter(|p| p.exists()) {
            let r = rustix::fs::chown(
                p,
                Some(rustix::fs::Uid::from_raw(self.uid)),
                Some(rustix::fs::Gid::from_raw(self.gid)),
            );
            if let Err(e) = r {
                tracing::warn!(path = %p.display(), error = %e, "cannot give a new file to its user");
            }
        }
    }

    fn check_path(&self, path: &Path, want: Want) -> Result<(), ApiError> {
        let denied = |why: &str| {
            ApiError::new(
                ErrorKind::Permission,
                format!("{}: {why} (uid {})", path.display(), self.uid),
            )
        };
        if !path.is_absolute() {
            return Err(ApiError::new(
                ErrorKind::Invalid,
                format!("{}: not an absolute path", path.display()),
            ));
        }
        // The file itself if it exists, else the directory it would be made in.
        let (target, exists) = match std::fs::canonicalize(path) {
            Ok(p) => (p, true),
            Err(_) => {
                let parent = path.parent().unwrap_or(Path::new("/"));
                let parent = std::fs::canonicalize(parent)
                    .map_err(|_| denied("neither it nor its directory exists"))?;
                (parent, false)
            }
        };
        self.search_ancestors(&target)
            .map_err(|dir| denied(&format!("{} is not searchable", dir.display())))?;
        let meta = std::fs::metadata(&target).map_err(|e| denied(&e.to_string()))?;
        let ok = match (want, exists) {
            (_, false) => meta.is_dir() && self.granted(&meta, W | X),
            (Want::Read, true) => self.granted(&meta, R),
            (Want::Write, true) => self.granted(&meta, R | W),
            (Want::Dir, true) => meta.is_dir() && self.granted(&meta, W | X),
            (Want::Tree { write }, true) => {
                meta.is_dir() && self.granted(&meta, R | X | if write { W } else { 0 })
            }
        };
        if ok {
            return Ok(());
        }
        Err(denied(match (want, exists) {
            (_, false) => "you may not create files in its directory",
            (Want::Read, true) => "you may not read it",
            (Want::Write, true) => "you may not read and write it",
            (Want::Dir, true) => "you may not write in that directory",
            (Want::Tree { write: false }, true) => "you may not list and read that directory",
            (Want::Tree { write: true }, true) => "you may not list and change that directory",
        }))
    }

    /// Fails with the first directory above `path` that the caller may not search.
    fn search_ancestors(&self, path: &Path) -> Result<(), PathBuf> {
        for dir in path.ancestors().skip(1) {
            let meta = std::fs::metadata(dir).map_err(|_| dir.to_owned())?;
            if !self.granted(&meta, X) {
                return Err(dir.to_owned());
            }
        }
        Ok(())
    }
}

/// The supplementary groups of process `pid`, from /proc.
fn supplementary_groups(pid: i32) -> Option<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Groups:"))?;
    Some(
        line.split_whitespace()
            .filter_map(|g| g.parse().ok())
            .collect(),
    )
}

/// The local paths a request touches, and how; refused outright, a request that would make
/// the daemon choose a local path the caller names some other way (a `file:` endpoint, a
/// relative credentials file).
fn paths(req: &Request) -> Result<Vec<(PathBuf, Want)>, ApiError> {
    let mut out = Vec::new();
    match req {
        Request::Open(r) => {
            let path = r.path.to_string_lossy();
            if !crate::cloud::is_url(&path) {
                let want = if r.read_only { Want::Read } else { Want::Write };
                out.push((r.path.clone(), want));
            }
            out.extend(store_paths(
                &path,
                r.cloud.endpoint.as_deref(),
                r.cloud.env.as_ref(),
                !r.read_only,
            )?);
            if let Some(m) = &r.mount {
                out.push((m.clone(), Want::Dir));
            }
            if let Some(c) = &r.cloud.cache {
                out.push((c.clone(), Want::Dir));
            }
            if let Some(k) = &r.cloud.key_file {
                out.push((k.clone(), Want::Read));
            }
            if let Some(k) = &r.key_file {
                out.push((k.clone(), Want::Read));
            }
            for f in &r.filters {
                out.extend(filter_paths(f));
            }
        }
        Request::Mount(r) => out.push((r.dir.clone(), Want::Dir)),
        Request::Snapshot(r) => out.push((r.new.clone(), Want::Write)),
        Request::Backup(r) => {
            out.push((r.target.clone(), Want::Write));
            if let Some(b) = &r.base {
                out.push((b.clone(), Want::Read));
            }
        }
        Request::Insert(r) => out.push((r.image.clone(), Want::Read)),
        Request::FsMount(r) => {
            if r.source.starts_with('/') {
                out.push((PathBuf::from(&r.source), Want::Read));
            }
            out.push((r.dir.clone(), Want::Dir));
        }
        Request::FsMap(r) => {
            out.push((r.dir.clone(), Want::Dir));
            if let Some(c) = &r.cache {
                out.push((c.clone(), Want::Dir));
            }
            out.extend(store_paths(
                &r.url,
                r.endpoint.as_deref(),
                r.env.as_ref(),
                true,
            )?);
        }
        Request::FsUnmount(r) => out.push((r.dir.clone(), Want::Dir)),
        _ => {}
    }
    Ok(out)
}

/// Whether the store variable `name` names a file the store's client reads (a credentials
/// file, a token file) rather than holding a value.
fn names_a_file(name: &str) -> bool {
    name.ends_with("_FILE")
        || name.ends_with("_PATH")
        || name == "GOOGLE_SERVICE_ACCOUNT"
        || name == "GOOGLE_APPLICATION_CREDENTIALS"
}

/// The local paths behind an object-store location: a `file://` URL's directory, and the
/// files a store variable names (credentials, tokens), which the daemon would read. An
/// endpoint must be a network one (`http://`, `https://`), and a variable that names a
/// file must name it absolutely.
fn store_paths(
    url: &str,
    endpoint: Option<&str>,
    env: Option<&vdk_objstore::StoreEnv>,
    write: bool,
) -> Result<Vec<(PathBuf, Want)>, ApiError> {
    let refuse = |msg: String| Err(ApiError::new(ErrorKind::Permission, msg));
    let mut out = Vec::new();
    if !crate::cloud::is_url(url) {
        return Ok(out);
    }
    if let Some(dir) = url.strip_prefix("file://") {
        let dir = Path::new(dir);
        if !dir.is_absolute() {
            return refuse(format!("{url}: a file:// location must be absolute"));
        }
        out.push((dir.to_owned(), Want::Tree { write }));
    }
    let vars = env.map(|e| e.0.iter()).into_iter().flatten();
    let endpoints = endpoint.map(|e| ("--s3-endpoint", e)).into_iter().chain(
        vars.clone()
            .filter(|(k, _)| k.starts_with("AWS_ENDPOINT"))
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    for (name, e) in endpoints {
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            return refuse(format!(
                "{name} {e:?}: an endpoint must be http:// or https://"
            ));
        }
    }
    for (name, value) in vars.filter(|(k, _)| names_a_file(k)) {
        if !value.starts_with('/') {
            return refuse(format!("{name}: a file must be named by an absolute path"));
        }
        out.push((PathBuf::from(value), Want::Read));
    }
    Ok(out)
}

/// The files a filter spec names: a cow overlay, a cache directory.
fn filter_paths(spec: &str) -> Vec<(PathBuf, Want)> {
    let Some((_, args)) = spec.split_once(':') else {
        return Vec::new();
    };
    args.split(',')
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| match k {
            "overlay" => Some((PathBuf::from(v), Want::Write)),
            "dir" => Some((PathBuf::from(v), Want::Dir)),
            _ => None,
        })
        .collect()
}
