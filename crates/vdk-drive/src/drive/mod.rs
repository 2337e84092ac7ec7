//! The drive itself, free of FUSE: names, listings, file contents in the cache, uploads.
//!
//! A file is an object `PREFIX/DIR/NAME`; a directory is a common prefix, or the marker object
//! [`MARKER`] that `mkdir` puts so that an empty directory lives on. Listings are kept for
//! [`DIR_TTL`] and changed in place by what this mount does; what other clients change shows
//! after that time.
//!
//! A file's contents live in a sparse cache file while the kernel knows the file: reads fetch
//! the [`BLOCK`]s they touch (sequential readers also the blocks ahead, in the background),
//! each block once, readers of a block being fetched waiting for it. The first change to a
//! file fetches the rest of it; from then on the cache file is the file, uploaded whole on
//! close or fsync (in [`PART`]-sized multipart pieces when large) and replacing the object.
//!
//! Locks: a file's state (`FileInner`) may be held while the drive's table (`Inner`) is
//! taken, never the other way round; no lock is held over a request to the store except a
//! file's own, while its missing blocks are fetched for a write or while it uploads.
//!
//! The files: this one the names, listings and inodes; `files` a file's contents (cache,
//! reads, writes, uploads); `names` what changes names (mkdir, unlink, rmdir, rename).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use object_store::path::{Path, PathPart};
use object_store::ObjectStore;
use tokio::runtime::Runtime;
use tracing::warn;
use vdk_core::sync::lock;

mod files;
mod names;
#[cfg(test)]
mod tests;

pub use files::FileState;

/// The unit in which file contents are fetched and cached.
pub const BLOCK: u64 = 1 << 20;
/// Files up to this size are uploaded in one request; larger ones in parts of this size.
pub const PART: usize = 8 << 20;
/// Parts of one upload, or ranges of one read, in flight at once.
const IN_FLIGHT: usize = 8;
/// Blocks fetched by one range request at most.
const RUN: u64 = 8;
/// Most blocks a sequential reader has fetched ahead of it.
const MAX_AHEAD: u64 = 32;
/// How long a directory listing is trusted.
pub const DIR_TTL: Duration = Duration::from_secs(10);
/// The object that keeps an empty directory: `DIR/.vdkdir`, hidden from listings.
pub const MARKER: &str = ".vdkdir";
/// The longest name, in bytes.
pub const NAME_MAX: usize = 255;
/// The longest object key S3 takes, in bytes.
const KEY_MAX: usize = 1024;
/// Added to the name of an object that a folder of the same name hides (a bucket may hold an
/// object `a` and objects under `a/`; a directory cannot): the object shows as `a (object)`.
/// Names given by callers may not end with it, so it always means that.
pub const ALIAS: &str = " (object)";

/// What a listing knows of a name.
#[derive(Clone, Debug)]
pub struct Entry {
    /// A directory (a common prefix or a marker).
    pub dir: bool,
    /// Bytes.
    pub size: u64,
    /// Last modified.
    pub mtime: SystemTime,
    /// The object's version, for files.
    pub etag: Option<String>,
}

#[derive(Debug)]
struct Listing {
    at: Instant,
    entries: BTreeMap<String, Entry>,
}

#[derive(Debug)]
struct Node {
    /// The path under the prefix ("" is the root); `None` once unlinked.
    path: Option<String>,
    dir: bool,
    lookups: u64,
    file: Option<Arc<FileState>>,
}

#[derive(Debug)]
struct Inner {
    nodes: HashMap<u64, Node>,
    by_path: HashMap<String, u64>,
    next_ino: u64,
    dirs: HashMap<String, Listing>,
    /// Directories whose entries this mount changed, and when (the store keeps no times of
    /// prefixes).
    dir_times: HashMap<String, SystemTime>,
}

fn to_ns(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
    }
}

fn from_ns(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

/// Why a drive operation failed: the errno a file system answers with (the FUSE glue hands it
/// to the kernel; nothing here knows FUSE).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Errno(i32);

impl Errno {
    /// Permission denied.
    pub const EACCES: Errno = Errno(rustix::io::Errno::ACCESS.raw_os_error());
    /// Not an open file.
    pub const EBADF: Errno = Errno(rustix::io::Errno::BADF.raw_os_error());
    /// The name exists.
    pub const EEXIST: Errno = Errno(rustix::io::Errno::EXIST.raw_os_error());
    /// Too large.
    pub const EFBIG: Errno = Errno(rustix::io::Errno::FBIG.raw_os_error());
    /// Invalid argument.
    pub const EINVAL: Errno = Errno(rustix::io::Errno::INVAL.raw_os_error());
    /// The store or the cache failed.
    pub const EIO: Errno = Errno(rustix::io::Errno::IO.raw_os_error());
    /// A directory where a file was wanted.
    pub const EISDIR: Errno = Errno(rustix::io::Errno::ISDIR.raw_os_error());
    /// A name, or an object key, too long.
    pub const ENAMETOOLONG: Errno = Errno(rustix::io::Errno::NAMETOOLONG.raw_os_error());
    /// No such name.
    pub const ENOENT: Errno = Errno(rustix::io::Errno::NOENT.raw_os_error());
    /// A file where a directory was wanted.
    pub const ENOTDIR: Errno = Errno(rustix::io::Errno::NOTDIR.raw_os_error());
    /// The directory is not empty.
    pub const ENOTEMPTY: Errno = Errno(rustix::io::Errno::NOTEMPTY.raw_os_error());
    /// Not permitted.
    pub const EPERM: Errno = Errno(rustix::io::Errno::PERM.raw_os_error());
    /// The object changed in the store under a read.
    pub const ESTALE: Errno = Errno(rustix::io::Errno::STALE.raw_os_error());

    /// The errno numbered `n`.
    pub fn from_i32(n: i32) -> Errno {
        Errno(n)
    }

    /// Its number.
    pub fn code(self) -> i32 {
        self.0
    }
}

impl From<Errno> for std::io::Error {
    fn from(e: Errno) -> std::io::Error {
        std::io::Error::from_raw_os_error(e.0)
    }
}

/// An error of the store as the errno a caller sees.
fn store_errno(e: &object_store::Error) -> Errno {
    match e {
        object_store::Error::NotFound { .. } => Errno::ENOENT,
        object_store::Error::Precondition { .. } => Errno::ESTALE,
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => Errno::EACCES,
        _ => Errno::EIO,
    }
}

fn io_errno(e: &std::io::Error) -> Errno {
    e.raw_os_error().map_or(Errno::EIO, Errno::from_i32)
}

/// The parent directory and the last name of a path.
pub fn split(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

/// `dir/name`.
pub fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

/// Checks a name a caller gives: UTF-8 (object keys are), no control characters, not the
/// directory marker, not too long.
pub fn check_name(name: &std::ffi::OsStr) -> Result<&str, Errno> {
    let s = name.to_str().ok_or(Errno::EINVAL)?;
    if s.len() > NAME_MAX {
        return Err(Errno::ENAMETOOLONG);
    }
    if s == MARKER || PathPart::parse(s).is_err() || s.is_empty() || s.ends_with(ALIAS) {
        return Err(Errno::EINVAL);
    }
    Ok(s)
}

/// The cloud drive.
#[derive(Debug)]
pub struct Drive {
    rt: Runtime,
    store: Arc<dyn ObjectStore>,
    /// The store's page-by-page listing, if it has one.
    lister: Option<vdk_objstore::Lister>,
    prefix: Path,
    cache_dir: PathBuf,
    inner: Mutex<Inner>,
    /// Keys and names already said to be unshowable (each is logged once).
    unshown: Mutex<HashSet<String>>,
    next_cache: AtomicU64,
    started: SystemTime,
}

/// The root's inode.
pub const ROOT: u64 = 1;

/// What `getattr` needs of a node.
#[derive(Clone, Copy, Debug)]
pub struct Attr {
    /// The inode.
    pub ino: u64,
    /// A directory.
    pub dir: bool,
    /// Bytes.
    pub size: u64,
    /// Last modified.
    pub mtime: SystemTime,
    /// Links: 0 once unlinked.
    pub nlink: u32,
}

impl Drive {
    /// A drive over `store` under `prefix`, caching in `cache_dir` (emptied first).
    pub fn new(
        store: Arc<dyn ObjectStore>,
        lister: Option<vdk_objstore::Lister>,
        prefix: Path,
        cache_dir: PathBuf,
    ) -> std::io::Result<Drive> {
        let files = cache_dir.join("files");
        match std::fs::remove_dir_all(&files) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir_all(&files)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vdk-drive")
            .enable_all()
            .build()?;
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                path: Some(String::new()),
                dir: true,
                lookups: 1,
                file: None,
            },
        );
        let mut by_path = HashMap::new();
        by_path.insert(String::new(), ROOT);
        Ok(Drive {
            rt,
            store,
            lister,
            unshown: Mutex::default(),
            prefix,
            cache_dir: files,
            inner: Mutex::new(Inner {
                nodes,
                by_path,
                next_ino: ROOT + 1,
                dirs: HashMap::new(),
                dir_times: HashMap::new(),
            }),
            next_cache: AtomicU64::new(0),
            started: SystemTime::now(),
        })
    }

    /// The object key of a path (an object shown as `NAME (object)` is `NAME`).
    fn key(&self, path: &str) -> Result<Path, Errno> {
        let mut k = self.prefix.clone();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            let part = part.strip_suffix(ALIAS).unwrap_or(part);
            k = k.join(PathPart::parse(part).map_err(|_| Errno::EINVAL)?);
        }
        if k.as_ref().len() > KEY_MAX {
            return Err(Errno::ENAMETOOLONG);
        }
        Ok(k)
    }

    fn path_of(&self, ino: u64) -> Result<String, Errno> {
        let inner = lock(&self.inner);
        let n = inner.nodes.get(&ino).ok_or(Errno::ENOENT)?;
        n.path.clone().ok_or(Errno::ENOENT)
    }

    /// Says once per key that it cannot be shown, and why.
    fn unshown(&self, key: &str, why: &str) {
        if lock(&self.unshown).insert(key.to_owned()) {
            warn!(key, "not shown in the drive: {why}");
        }
    }

    /// Lists `dir` from the store. Keys that cannot be names here are left out (and logged
    /// once), never the listing: a path object_store refuses (`a/../b`, `a//b`, control
    /// characters), a name over [`NAME_MAX`] bytes, one ending in [`ALIAS`].
    fn fetch_listing(&self, dir: &str) -> Result<BTreeMap<String, Entry>, Errno> {
        let key = self.key(dir)?;
        let lister = self.lister.as_ref().map(|l| &*l.0);
        let level = self
            .rt
            .block_on(crate::listing::list_level(&*self.store, lister, &key))
            .map_err(|e| {
                warn!(dir, error = %e, "cannot list");
                store_errno(&e)
            })?;
        for k in &level.skipped {
            self.unshown(k, "object_store cannot hold this key as a path");
        }
        let showable = |name: &str, key: &Path| {
            if name.len() > NAME_MAX {
                self.unshown(key.as_ref(), "its name is longer than 255 bytes");
                false
            } else if name.ends_with(ALIAS) {
                self.unshown(key.as_ref(), "its name ends as the drive's own names do");
                false
            } else {
                true
            }
        };
        let mut entries = BTreeMap::new();
        for p in level.prefixes {
            if let Some(name) = p.filename().filter(|n| showable(n, &p)) {
                entries.insert(
                    name.to_owned(),
                    Entry {
                        dir: true,
                        size: 0,
                        mtime: self.started,
                        etag: None,
                    },
                );
            }
        }
        for o in level.objects {
            if o.location == key {
                continue; // a "dir/" marker of another tool
            }
            let Some(name) = o.location.filename().filter(|n| showable(n, &o.location)) else {
                continue;
            };
            if name == MARKER {
                continue;
            }
            // An object beside a folder of its name shows under a name of its own.
            let shown = if entries.contains_key(name) {
                format!("{name}{ALIAS}")
            } else {
                name.to_owned()
            };
            if shown.len() > NAME_MAX {
                self.unshown(o.location.as_ref(), "a folder has its name");
                continue;
            }
            entries.insert(
                shown,
                Entry {
                    dir: false,
                    size: o.size,
                    mtime: o.last_modified.into(),
                    etag: o.e_tag,
                },
            );
        }
        Ok(entries)
    }

    /// Runs `f` on the listing of `dir`, fetching it if it is older than [`DIR_TTL`].
    fn with_listing<T>(
        &self,
        dir: &str,
        f: impl FnOnce(&mut BTreeMap<String, Entry>) -> T,
    ) -> Result<T, Errno> {
        {
            let mut inner = lock(&self.inner);
            if let Some(l) = inner.dirs.get_mut(dir) {
                if l.at.elapsed() < DIR_TTL {
                    return Ok(f(&mut l.entries));
                }
            }
        }
        let fresh = self.fetch_listing(dir)?;
        let mut inner = lock(&self.inner);
        let inner = &mut *inner;
        let mut entries = fresh;
        // What this mount has changed and not uploaded stays as it is here.
        if let Some(old) = inner.dirs.get(dir) {
            for (name, e) in &old.entries {
                let pending = inner
                    .by_path
                    .get(&join(dir, name))
                    .and_then(|ino| inner.nodes.get(ino))
                    .and_then(|n| n.file.as_ref())
                    .is_some_and(|f| f.pending.load(Ordering::Acquire));
                if pending {
                    entries.insert(name.clone(), e.clone());
                }
            }
        }
        let l = inner.dirs.entry(dir.to_owned()).or_insert(Listing {
            at: Instant::now(),
            entries: BTreeMap::new(),
        });
        l.at = Instant::now();
        l.entries = entries;
        Ok(f(&mut l.entries))
    }

    /// Changes the listing of `dir` if it is held (a listing fetched later has the change).
    fn edit_listing(&self, dir: &str, f: impl FnOnce(&mut BTreeMap<String, Entry>)) {
        if let Some(l) = lock(&self.inner).dirs.get_mut(dir) {
            f(&mut l.entries);
        }
    }

    /// A directory's entries changed now.
    fn touch_dir(&self, dir: &str) {
        lock(&self.inner)
            .dir_times
            .insert(dir.to_owned(), SystemTime::now());
    }

    fn dir_time(&self, dir: &str) -> Option<SystemTime> {
        lock(&self.inner).dir_times.get(dir).copied()
    }

    fn attr_of(&self, ino: u64, e: &Entry, file: Option<&Arc<FileState>>) -> Attr {
        match file {
            Some(f) if !e.dir => Attr {
                ino,
                dir: false,
                size: f.size.load(Ordering::Acquire),
                mtime: from_ns(f.mtime_ns.load(Ordering::Acquire)),
                nlink: 1,
            },
            _ => Attr {
                ino,
                dir: e.dir,
                size: if e.dir { 0 } else { e.size },
                mtime: e.mtime,
                nlink: if e.dir { 2 } else { 1 },
            },
        }
    }

    /// The inode of `path`, made known if it was not; counts a lookup.
    fn remember(&self, path: &str, dir: bool) -> (u64, Option<Arc<FileState>>) {
        let mut inner = lock(&self.inner);
        let inner = &mut *inner;
        if let Some(&ino) = inner.by_path.get(path) {
            if let Some(n) = inner.nodes.get_mut(&ino) {
                if n.dir == dir {
                    n.lookups += 1;
                    return (ino, n.file.clone());
                }
                // It changed kind in the store: a new node.
                n.path = None;
            }
        }
        let ino = inner.next_ino;
        inner.next_ino += 1;
        inner.nodes.insert(
            ino,
            Node {
                path: Some(path.to_owned()),
                dir,
                lookups: 1,
                file: None,
            },
        );
        inner.by_path.insert(path.to_owned(), ino);
        (ino, None)
    }

    /// `lookup`: the name in a directory.
    pub fn lookup(&self, parent: u64, name: &std::ffi::OsStr) -> Result<Attr, Errno> {
        if name.len() > NAME_MAX {
            return Err(Errno::ENAMETOOLONG);
        }
        let name = name.to_str().ok_or(Errno::ENOENT)?;
        let dir = self.path_of(parent)?;
        let e = self
            .with_listing(&dir, |l| l.get(name).cloned())?
            .ok_or(Errno::ENOENT)?;
        let path = join(&dir, name);
        let (ino, file) = self.remember(&path, e.dir);
        let mut a = self.attr_of(ino, &e, file.as_ref());
        if e.dir {
            a.mtime = self.dir_time(&path).unwrap_or(a.mtime);
        }
        Ok(a)
    }

    /// `forget`: the kernel lets go of `n` lookups.
    pub fn forget(&self, ino: u64, n: u64) {
        let mut inner = lock(&self.inner);
        let Some(node) = inner.nodes.get_mut(&ino) else {
            return;
        };
        node.lookups = node.lookups.saturating_sub(n);
        if node.lookups > 0 || ino == ROOT {
            return;
        }
        let busy = node.file.as_ref().is_some_and(|f| {
            f.opens.load(Ordering::Acquire) > 0 || f.pending.load(Ordering::Acquire)
        });
        if busy && node.path.is_some() {
            return;
        }
        if let Some(node) = inner.nodes.remove(&ino) {
            if let Some(p) = node.path {
                if inner.by_path.get(&p) == Some(&ino) {
                    inner.by_path.remove(&p);
                }
            }
        }
    }

    /// `getattr`.
    pub fn getattr(&self, ino: u64) -> Result<Attr, Errno> {
        let (path, dir, file) = {
            let inner = lock(&self.inner);
            let n = inner.nodes.get(&ino).ok_or(Errno::ENOENT)?;
            (n.path.clone(), n.dir, n.file.clone())
        };
        let Some(path) = path else {
            // Unlinked and still open.
            let f = file.ok_or(Errno::ENOENT)?;
            let mut a = self.attr_of(ino, &file_entry(), Some(&f));
            a.nlink = 0;
            return Ok(a);
        };
        if path.is_empty() {
            return Ok(Attr {
                ino,
                dir: true,
                size: 0,
                mtime: self.dir_time("").unwrap_or(self.started),
                nlink: 2,
            });
        }
        if let Some(f) = file.as_ref().filter(|f| f.pending.load(Ordering::Acquire)) {
            return Ok(self.attr_of(ino, &file_entry(), Some(f)));
        }
        let (parent, name) = split(&path);
        let e = self
            .with_listing(parent, |l| l.get(name).cloned())?
            .ok_or(Errno::ENOENT)?;
        if e.dir != dir {
            return Err(Errno::ENOENT);
        }
        let mut a = self.attr_of(ino, &e, file.as_ref());
        if e.dir {
            a.mtime = self.dir_time(&path).unwrap_or(a.mtime);
        }
        Ok(a)
    }

    /// `readdir`: the entries of a directory, with their inodes.
    pub fn readdir(&self, ino: u64) -> Result<Vec<(u64, bool, String)>, Errno> {
        let dir = self.path_of(ino)?;
        let names: Vec<(String, bool)> = self.with_listing(&dir, |l| {
            l.iter().map(|(n, e)| (n.clone(), e.dir)).collect()
        })?;
        let mut inner = lock(&self.inner);
        let inner = &mut *inner;
        let mut out = Vec::with_capacity(names.len());
        for (name, dir_entry) in names {
            let path = join(&dir, &name);
            let ino = match inner.by_path.get(&path) {
                Some(&i) => i,
                None => {
                    // Numbered now, known to the kernel only after a lookup.
                    let i = inner.next_ino;
                    inner.next_ino += 1;
                    inner.nodes.insert(
                        i,
                        Node {
                            path: Some(path.clone()),
                            dir: dir_entry,
                            lookups: 0,
                            file: None,
                        },
                    );
                    inner.by_path.insert(path, i);
                    i
                }
            };
            out.push((ino, dir_entry, name));
        }
        Ok(out)
    }

    /// Uploads every file with changes (at unmount).
    pub fn upload_all(&self) {
        let files: Vec<(u64, Arc<FileState>)> = lock(&self.inner)
            .nodes
            .iter()
            .filter_map(|(i, n)| n.file.clone().map(|f| (*i, f)))
            .collect();
        for (ino, f) in files {
            if let Err(e) = self.upload(ino, &f) {
                warn!(ino, error = ?e, "cannot upload a changed file");
            }
        }
    }
}

fn file_entry() -> Entry {
    Entry {
        dir: false,
        size: 0,
        mtime: UNIX_EPOCH,
        etag: None,
    }
}
