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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use vdk_core::sync;
use vdk_core::sync::lock;

use fuser::Errno;
use futures::{StreamExt, TryStreamExt};
use object_store::path::{Path, PathPart};
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use tokio::runtime::Runtime;
use tracing::{debug, warn};

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

/// A file's contents while the kernel knows it.
#[derive(Debug)]
pub struct FileState {
    m: Mutex<FileInner>,
    cv: Condvar,
    cache: File,
    cache_path: PathBuf,
    /// Read without the lock by attribute requests.
    size: AtomicU64,
    mtime_ns: AtomicI64,
    /// Changed here and not uploaded yet: listings keep it whatever the store says.
    pending: AtomicBool,
    opens: AtomicU32,
}

#[derive(Debug)]
struct FileInner {
    /// The version of the object the fetched blocks come from (`None`: no object yet).
    etag: Option<String>,
    /// Blocks of that version in the cache file.
    have: Vec<bool>,
    loading: HashSet<u64>,
    /// The cache file holds all of the file.
    full: bool,
    dirty: bool,
    /// Where the last read ended, and how many bytes the reads that ended there read one
    /// after the other: sequential readers fetch as far ahead as they have read, up to
    /// [`MAX_AHEAD`] blocks.
    last_end: u64,
    run: u64,
}

impl Drop for FileState {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.cache_path);
    }
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

    fn new_file_state(&self, e: &Entry) -> Result<Arc<FileState>, Errno> {
        let n = self.next_cache.fetch_add(1, Ordering::Relaxed);
        let cache_path = self.cache_dir.join(n.to_string());
        let cache = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&cache_path)
            .map_err(|e| io_errno(&e))?;
        let blocks = usize::try_from(e.size.div_ceil(BLOCK)).map_err(|_| Errno::EFBIG)?;
        Ok(Arc::new(FileState {
            m: Mutex::new(FileInner {
                etag: e.etag.clone(),
                have: vec![false; blocks],
                loading: HashSet::new(),
                full: e.size == 0,
                dirty: false,
                last_end: u64::MAX,
                run: 0,
            }),
            cv: Condvar::new(),
            cache,
            cache_path,
            size: AtomicU64::new(e.size),
            mtime_ns: AtomicI64::new(to_ns(e.mtime)),
            pending: AtomicBool::new(false),
            opens: AtomicU32::new(0),
        }))
    }

    /// `open`: the file's state, made or renewed (a newer object in the store drops what is
    /// cached of the old one).
    pub fn open(&self, ino: u64) -> Result<Arc<FileState>, Errno> {
        let (path, file) = {
            let inner = lock(&self.inner);
            let n = inner.nodes.get(&ino).ok_or(Errno::ENOENT)?;
            if n.dir {
                return Err(Errno::EISDIR);
            }
            (n.path.clone(), n.file.clone())
        };
        let keep = |f: &Arc<FileState>| {
            f.opens.fetch_add(1, Ordering::AcqRel);
            Ok(Arc::clone(f))
        };
        let Some(path) = path else {
            return file.map_or(Err(Errno::ENOENT), |f| keep(&f));
        };
        if let Some(f) = file.as_ref().filter(|f| f.pending.load(Ordering::Acquire)) {
            return keep(f);
        }
        let (parent, name) = split(&path);
        let e = self
            .with_listing(parent, |l| l.get(name).cloned())?
            .ok_or(Errno::ENOENT)?;
        if e.dir {
            return Err(Errno::EISDIR);
        }
        if let Some(f) = &file {
            let same = lock(&f.m).etag == e.etag;
            if same || f.opens.load(Ordering::Acquire) > 0 {
                return keep(f);
            }
        }
        let f = self.new_file_state(&e)?;
        let mut inner = lock(&self.inner);
        let n = inner.nodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        n.file = Some(Arc::clone(&f));
        keep(&f)
    }

    /// `create`: a new empty file, uploaded on close.
    pub fn create(
        &self,
        parent: u64,
        name: &std::ffi::OsStr,
    ) -> Result<(Attr, Arc<FileState>), Errno> {
        let name = check_name(name)?;
        let dir = self.path_of(parent)?;
        let path = join(&dir, name);
        self.key(&path)?;
        let existing = self.with_listing(&dir, |l| l.get(name).cloned())?;
        if let Some(e) = existing {
            if e.dir {
                return Err(Errno::EISDIR);
            }
            let (ino, _) = self.remember(&path, false);
            let f = self.open(ino)?;
            self.truncate(ino, &f, 0)?;
            return Ok((self.getattr(ino)?, f));
        }
        let now = SystemTime::now();
        let e = Entry {
            dir: false,
            size: 0,
            mtime: now,
            etag: None,
        };
        let f = self.new_file_state(&e)?;
        {
            let mut g = lock(&f.m);
            g.dirty = true;
        }
        f.pending.store(true, Ordering::Release);
        f.opens.store(1, Ordering::Release);
        self.with_listing(&dir, |l| {
            l.insert(name.to_owned(), e.clone());
        })?;
        let (ino, _) = self.remember(&path, false);
        if let Some(n) = lock(&self.inner).nodes.get_mut(&ino) {
            n.file = Some(Arc::clone(&f));
        }
        self.touch_dir(&dir);
        Ok((self.attr_of(ino, &e, Some(&f)), f))
    }

    /// Blocks `first..=last` that are neither cached nor being fetched, claimed for fetching.
    fn claim(g: &mut FileInner, first: u64, last: u64) -> (Vec<u64>, bool) {
        let mut mine = Vec::new();
        let mut wait = false;
        for b in first..=last {
            let Some(&have) = usize::try_from(b).ok().and_then(|i| g.have.get(i)) else {
                break;
            };
            if have {
                continue;
            }
            if g.loading.contains(&b) {
                wait = true;
            } else {
                g.loading.insert(b);
                mine.push(b);
            }
        }
        (mine, wait)
    }

    /// `read`: up to `len` bytes at `off`.
    pub fn read(&self, ino: u64, f: &Arc<FileState>, off: u64, len: u32) -> Result<Vec<u8>, Errno> {
        let size = f.size.load(Ordering::Acquire);
        if off >= size {
            return Ok(Vec::new());
        }
        let end = size.min(off + u64::from(len));
        let first = off / BLOCK;
        let last = (end - 1) / BLOCK;
        let mut g = lock(&f.m);
        g.run = if g.last_end == off {
            g.run + (end - off)
        } else {
            end - off
        };
        g.last_end = end;
        let window = if g.run >= 2 * BLOCK {
            (g.run / BLOCK).min(MAX_AHEAD)
        } else {
            0
        };
        loop {
            if g.full {
                break;
            }
            let (mine, wait) = Self::claim(&mut g, first, last);
            // Sequential readers also fetch ahead, in the background.
            let (ahead, _) = if window > 0 {
                Self::claim(&mut g, last + 1, last + window)
            } else {
                (Vec::new(), false)
            };
            let etag = g.etag.clone();
            if !ahead.is_empty() {
                // Unlinked files have no key: nothing to fetch ahead.
                let key = self.path_of(ino).and_then(|p| self.key(&p));
                let (store, f2, etag2) = (Arc::clone(&self.store), Arc::clone(f), etag.clone());
                match key {
                    Ok(key) => {
                        self.rt.spawn(async move {
                            if let Err(e) = fetch(&store, &f2, &key, etag2, ahead).await {
                                debug!(error = ?e, "read-ahead failed");
                            }
                        });
                    }
                    Err(_) => release(&mut g, &ahead),
                }
            }
            if mine.is_empty() && !wait {
                break;
            }
            if mine.is_empty() {
                g = sync::wait(&f.cv, g);
                continue;
            }
            drop(g);
            let key = self.key(&self.path_of(ino)?)?;
            self.rt.block_on(fetch(&self.store, f, &key, etag, mine))?;
            g = lock(&f.m);
        }
        drop(g);
        let mut buf = vec![0; usize::try_from(end - off).map_err(|_| Errno::EINVAL)?];
        f.cache
            .read_exact_at(&mut buf, off)
            .map_err(|e| io_errno(&e))?;
        Ok(buf)
    }

    /// Fetches every block of the file not cached yet: it is about to change.
    fn make_full(&self, ino: u64, f: &Arc<FileState>) -> Result<(), Errno> {
        let mut g = lock(&f.m);
        while !g.full {
            let blocks = g.have.len() as u64;
            if blocks == 0 || g.have.iter().all(|h| *h) {
                g.full = true;
                break;
            }
            let (mine, wait) = Self::claim(&mut g, 0, blocks - 1);
            if mine.is_empty() {
                if wait {
                    g = sync::wait(&f.cv, g);
                }
                continue;
            }
            let etag = g.etag.clone();
            drop(g);
            let key = self.key(&self.path_of(ino)?)?;
            self.rt.block_on(fetch(&self.store, f, &key, etag, mine))?;
            g = lock(&f.m);
        }
        Ok(())
    }

    fn touched(f: &FileState, g: &mut FileInner) {
        g.dirty = true;
        f.pending.store(true, Ordering::Release);
        f.mtime_ns
            .store(to_ns(SystemTime::now()), Ordering::Release);
    }

    /// `write`: into the cache file; uploaded on close or fsync.
    pub fn write(&self, ino: u64, f: &Arc<FileState>, off: u64, data: &[u8]) -> Result<u32, Errno> {
        let end = off.checked_add(data.len() as u64).ok_or(Errno::EFBIG)?;
        if end > object_store_max() {
            return Err(Errno::EFBIG);
        }
        self.make_full(ino, f)?;
        let mut g = lock(&f.m);
        f.cache.write_all_at(data, off).map_err(|e| io_errno(&e))?;
        f.size.fetch_max(end, Ordering::AcqRel);
        Self::touched(f, &mut g);
        u32::try_from(data.len()).map_err(|_| Errno::EINVAL)
    }

    /// Sets the size of an open file's contents.
    pub fn truncate(&self, ino: u64, f: &Arc<FileState>, size: u64) -> Result<(), Errno> {
        if size > object_store_max() {
            return Err(Errno::EFBIG);
        }
        if size > 0 {
            self.make_full(ino, f)?;
        }
        let mut g = lock(&f.m);
        if size == 0 {
            g.full = true;
        }
        f.cache.set_len(size).map_err(|e| io_errno(&e))?;
        f.size.store(size, Ordering::Release);
        Self::touched(f, &mut g);
        Ok(())
    }

    /// `setattr` of the size, of a file open or not (then it is uploaded at once).
    pub fn set_size(&self, ino: u64, size: u64) -> Result<(), Errno> {
        let f = self.open(ino)?;
        let r = self
            .truncate(ino, &f, size)
            .and_then(|()| self.upload(ino, &f));
        self.release(ino, &f);
        r
    }

    /// Sets the modification time (kept while mounted; the store's time is the upload's).
    pub fn set_mtime(&self, ino: u64, t: SystemTime) {
        let file = lock(&self.inner)
            .nodes
            .get(&ino)
            .and_then(|n| n.file.clone());
        if let Some(f) = file {
            f.mtime_ns.store(to_ns(t), Ordering::Release);
        }
    }

    /// Uploads the file if it changed: `flush` (close) and `fsync`.
    pub fn upload(&self, ino: u64, f: &Arc<FileState>) -> Result<(), Errno> {
        let mut g = lock(&f.m);
        if !g.dirty {
            return Ok(());
        }
        let path = {
            let inner = lock(&self.inner);
            inner.nodes.get(&ino).and_then(|n| n.path.clone())
        };
        let Some(path) = path else {
            // Unlinked: nothing to keep.
            g.dirty = false;
            f.pending.store(false, Ordering::Release);
            return Ok(());
        };
        let key = self.key(&path)?;
        let size = f.size.load(Ordering::Acquire);
        let etag = self.rt.block_on(put(&self.store, &f.cache, &key, size))?;
        g.dirty = false;
        g.etag.clone_from(&etag);
        g.have = vec![true; usize::try_from(size.div_ceil(BLOCK)).unwrap_or(0)];
        g.full = true;
        drop(g);
        let mtime = from_ns(f.mtime_ns.load(Ordering::Acquire));
        let (parent, name) = split(&path);
        self.edit_listing(parent, |l| {
            l.insert(
                name.to_owned(),
                Entry {
                    dir: false,
                    size,
                    mtime,
                    etag,
                },
            );
        });
        f.pending.store(false, Ordering::Release);
        debug!(path, size, "uploaded");
        Ok(())
    }

    /// `release`: the last close of one open.
    pub fn release(&self, ino: u64, f: &Arc<FileState>) {
        if let Err(e) = self.upload(ino, f) {
            warn!(ino, error = ?e, "upload at close failed; the data stays in the cache");
        }
        f.opens.fetch_sub(1, Ordering::AcqRel);
        let gone = lock(&self.inner)
            .nodes
            .get(&ino)
            .is_some_and(|n| n.path.is_none() && n.lookups == 0);
        if gone && f.opens.load(Ordering::Acquire) == 0 {
            lock(&self.inner).nodes.remove(&ino);
        }
    }

    /// `mkdir`: puts the directory's marker.
    pub fn mkdir(&self, parent: u64, name: &std::ffi::OsStr) -> Result<Attr, Errno> {
        let name = check_name(name)?;
        let dir = self.path_of(parent)?;
        let path = join(&dir, name);
        if self.with_listing(&dir, |l| l.contains_key(name))? {
            return Err(Errno::EEXIST);
        }
        let marker = self.key(&join(&path, MARKER))?;
        self.rt
            .block_on(self.store.put(&marker, PutPayload::new()))
            .map_err(|e| store_errno(&e))?;
        let e = Entry {
            dir: true,
            size: 0,
            mtime: SystemTime::now(),
            etag: None,
        };
        self.edit_listing(&dir, |l| {
            l.insert(name.to_owned(), e.clone());
        });
        lock(&self.inner).dirs.insert(
            path.clone(),
            Listing {
                at: Instant::now(),
                entries: BTreeMap::new(),
            },
        );
        let (ino, _) = self.remember(&path, true);
        self.touch_dir(&dir);
        Ok(self.attr_of(ino, &e, None))
    }

    /// Every object under a directory, from the store.
    fn objects_under(&self, path: &str) -> Result<Vec<Path>, Errno> {
        let key = self.key(path)?;
        self.rt
            .block_on(
                self.store
                    .list(Some(&key))
                    .map_ok(|m| m.location)
                    .try_collect::<Vec<_>>(),
            )
            .map_err(|e| store_errno(&e))
    }

    /// Whether a directory holds anything but its marker.
    fn dir_is_empty(&self, path: &str) -> Result<bool, Errno> {
        let marker = self.key(&join(path, MARKER))?;
        let remote = self.objects_under(path)?.into_iter().all(|k| k == marker);
        let local = lock(&self.inner)
            .dirs
            .get(path)
            .is_none_or(|l| l.entries.is_empty());
        Ok(remote && local)
    }

    /// Forgets the name `path` (and, for a directory, every name under it).
    fn unname(&self, path: &str) {
        let mut inner = lock(&self.inner);
        let inner = &mut *inner;
        let under = format!("{path}/");
        let gone: Vec<String> = inner
            .by_path
            .keys()
            .filter(|p| *p == path || p.starts_with(&under))
            .cloned()
            .collect();
        for p in gone {
            if let Some(ino) = inner.by_path.remove(&p) {
                if let Some(n) = inner.nodes.get_mut(&ino) {
                    n.path = None;
                    if n.lookups == 0 && n.file.is_none() {
                        inner.nodes.remove(&ino);
                    }
                }
            }
        }
        inner
            .dirs
            .retain(|d, _| d != path && !d.starts_with(&under));
    }

    /// `unlink`: deletes the object; open handles keep reading what they had.
    pub fn unlink(&self, parent: u64, name: &std::ffi::OsStr) -> Result<(), Errno> {
        let name = name.to_str().ok_or(Errno::ENOENT)?;
        let dir = self.path_of(parent)?;
        let e = self
            .with_listing(&dir, |l| l.get(name).cloned())?
            .ok_or(Errno::ENOENT)?;
        if e.dir {
            return Err(Errno::EISDIR);
        }
        let path = join(&dir, name);
        // An open file keeps its contents: fetch what is missing before the object goes.
        let file = {
            let inner = lock(&self.inner);
            inner.by_path.get(&path).and_then(|&i| {
                let f = inner.nodes.get(&i)?.file.clone()?;
                Some((i, f))
            })
        };
        if let Some((ino, f)) = file.filter(|(_, f)| f.opens.load(Ordering::Acquire) > 0) {
            self.make_full(ino, &f)?;
        }
        self.delete(&self.key(&path)?)?;
        self.edit_listing(&dir, |l| {
            l.remove(name);
        });
        self.unname(&path);
        self.touch_dir(&dir);
        Ok(())
    }

    fn delete(&self, key: &Path) -> Result<(), Errno> {
        match self.rt.block_on(self.store.delete(key)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_errno(&e)),
        }
    }

    /// `rmdir`: an empty directory's marker goes.
    pub fn rmdir(&self, parent: u64, name: &std::ffi::OsStr) -> Result<(), Errno> {
        let name = name.to_str().ok_or(Errno::ENOENT)?;
        let dir = self.path_of(parent)?;
        let e = self
            .with_listing(&dir, |l| l.get(name).cloned())?
            .ok_or(Errno::ENOENT)?;
        if !e.dir {
            return Err(Errno::ENOTDIR);
        }
        let path = join(&dir, name);
        if !self.dir_is_empty(&path)? {
            return Err(Errno::ENOTEMPTY);
        }
        self.delete(&self.key(&join(&path, MARKER))?)?;
        self.edit_listing(&dir, |l| {
            l.remove(name);
        });
        self.unname(&path);
        self.touch_dir(&dir);
        Ok(())
    }

    /// `rename`: objects are copied and the old ones deleted (one by one, for a directory);
    /// a file with changes not uploaded yet moves here and is uploaded under its new name.
    pub fn rename(
        &self,
        parent: u64,
        name: &std::ffi::OsStr,
        newparent: u64,
        newname: &std::ffi::OsStr,
        noreplace: bool,
    ) -> Result<(), Errno> {
        let name = name.to_str().ok_or(Errno::ENOENT)?;
        let newname = check_name(newname)?;
        let dir = self.path_of(parent)?;
        let newdir = self.path_of(newparent)?;
        let from = join(&dir, name);
        let to = join(&newdir, newname);
        if from == to {
            return Ok(());
        }
        if to.starts_with(&format!("{from}/")) {
            return Err(Errno::EINVAL);
        }
        let src = self
            .with_listing(&dir, |l| l.get(name).cloned())?
            .ok_or(Errno::ENOENT)?;
        let dst = self.with_listing(&newdir, |l| l.get(newname).cloned())?;
        if let Some(d) = &dst {
            if noreplace {
                return Err(Errno::EEXIST);
            }
            match (src.dir, d.dir) {
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                (true, true) if !self.dir_is_empty(&to)? => return Err(Errno::ENOTEMPTY),
                _ => {}
            }
        }
        if src.dir {
            self.rename_dir(&from, &to, dst.is_some())?;
        } else {
            self.rename_file(&from, &to)?;
        }
        self.edit_listing(&dir, |l| {
            l.remove(name);
        });
        let mut moved = src;
        moved.mtime = if moved.dir {
            moved.mtime
        } else {
            SystemTime::now()
        };
        self.edit_listing(&newdir, |l| {
            l.insert(newname.to_owned(), moved);
        });
        self.move_names(&from, &to);
        self.touch_dir(&dir);
        self.touch_dir(&newdir);
        Ok(())
    }

    fn pending_file(&self, path: &str) -> Option<Arc<FileState>> {
        let inner = lock(&self.inner);
        inner
            .by_path
            .get(path)
            .and_then(|i| inner.nodes.get(i))
            .and_then(|n| n.file.clone())
            .filter(|f| f.pending.load(Ordering::Acquire))
    }

    fn rename_file(&self, from: &str, to: &str) -> Result<(), Errno> {
        let (kf, kt) = (self.key(from)?, self.key(to)?);
        if let Some(f) = self.pending_file(from) {
            // The cache holds all of it; it goes up under the new name at close.
            if lock(&f.m).etag.is_some() {
                self.delete(&kf)?;
            }
            return self.delete(&kt);
        }
        match self.rt.block_on(self.store.rename(&kf, &kt)) {
            Ok(()) => Ok(()),
            Err(e) => Err(store_errno(&e)),
        }
    }

    fn rename_dir(&self, from: &str, to: &str, replace: bool) -> Result<(), Errno> {
        let (kf, kt) = (self.key(from)?, self.key(to)?);
        if replace {
            self.delete(&kt.clone().join(MARKER))?;
        }
        let objects = self.objects_under(from)?;
        let mut has_marker = false;
        for o in &objects {
            let rest: Vec<_> = o.prefix_match(&kf).into_iter().flatten().collect();
            let mut k = kt.clone();
            for p in &rest {
                k = k.join(p.clone());
            }
            if rest.len() == 1 && rest[0].as_ref() == MARKER {
                has_marker = true;
            }
            let rel: Vec<&str> = rest.iter().map(AsRef::as_ref).collect();
            let old_path = join(from, &rel.join("/"));
            if self.pending_file(&old_path).is_some() {
                // Uploaded under its new name at close.
                self.delete(o)?;
                continue;
            }
            self.rt
                .block_on(self.store.rename(o, &k))
                .map_err(|e| store_errno(&e))?;
        }
        if !has_marker {
            // A directory that was only a prefix keeps existing if it ends up empty.
            self.rt
                .block_on(self.store.put(&kt.clone().join(MARKER), PutPayload::new()))
                .map_err(|e| store_errno(&e))?;
        }
        Ok(())
    }

    /// Renames `from` (and every name under it) to `to` in the tables.
    fn move_names(&self, from: &str, to: &str) {
        let mut inner = lock(&self.inner);
        let inner = &mut *inner;
        // What `to` named before is replaced.
        let under_to = format!("{to}/");
        let replaced: Vec<String> = inner
            .by_path
            .keys()
            .filter(|p| *p == to || p.starts_with(&under_to))
            .cloned()
            .collect();
        for p in replaced {
            if let Some(ino) = inner.by_path.remove(&p) {
                if let Some(n) = inner.nodes.get_mut(&ino) {
                    n.path = None;
                }
            }
        }
        inner
            .dirs
            .retain(|d, _| d != to && !d.starts_with(&under_to));
        let under = format!("{from}/");
        let moving: Vec<(String, u64)> = inner
            .by_path
            .iter()
            .filter(|(p, _)| *p == from || p.starts_with(&under))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        for (p, ino) in moving {
            inner.by_path.remove(&p);
            let np = format!("{to}{}", &p[from.len()..]);
            if let Some(n) = inner.nodes.get_mut(&ino) {
                n.path = Some(np.clone());
            }
            inner.by_path.insert(np, ino);
        }
        let dirs: Vec<String> = inner
            .dirs
            .keys()
            .filter(|d| *d == from || d.starts_with(&under))
            .cloned()
            .collect();
        for d in dirs {
            if let Some(l) = inner.dirs.remove(&d) {
                inner.dirs.insert(format!("{to}{}", &d[from.len()..]), l);
            }
        }
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

/// The largest object S3 stores (5 TiB).
const fn object_store_max() -> u64 {
    5 << 40
}

fn release(g: &mut FileInner, blocks: &[u64]) {
    for b in blocks {
        g.loading.remove(b);
    }
}

/// Fetches `blocks` (claimed in `loading`) of the object's version `etag` into the cache
/// file, in runs of up to [`RUN`] blocks, [`IN_FLIGHT`] at a time.
async fn fetch(
    store: &Arc<dyn ObjectStore>,
    f: &Arc<FileState>,
    key: &Path,
    etag: Option<String>,
    blocks: Vec<u64>,
) -> Result<(), Errno> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &b in &blocks {
        match runs.last_mut() {
            Some((start, n)) if *start + *n == b && *n < RUN => *n += 1,
            _ => runs.push((b, 1)),
        }
    }
    // Blocks are fetched only while the cache file is not the whole file: the size is the
    // object's.
    let size_cap = f.size.load(Ordering::Acquire);
    let results: Vec<Result<Vec<u64>, Errno>> = futures::stream::iter(runs)
        .map(|(start, n)| {
            let etag = etag.clone();
            async move {
                let from = start * BLOCK;
                let to = ((start + n) * BLOCK).min(size_cap);
                let opts = GetOptions {
                    if_match: etag,
                    range: Some(GetRange::Bounded(from..to)),
                    ..GetOptions::default()
                };
                let got = store.get_opts(key, opts).await.map_err(|e| {
                    warn!(key = %key, error = %e, "cannot read");
                    store_errno(&e)
                })?;
                let bytes = got.bytes().await.map_err(|e| store_errno(&e))?;
                // The last block of the object is short; the range may say so.
                f.cache
                    .write_all_at(&bytes, from)
                    .map_err(|e| io_errno(&e))?;
                Ok((start..start + n).collect())
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    let mut g = lock(&f.m);
    let mut err = None;
    for r in results {
        match r {
            Ok(done) => {
                for b in done {
                    if let Some(h) = usize::try_from(b).ok().and_then(|i| g.have.get_mut(i)) {
                        *h = true;
                    }
                }
            }
            Err(e) => err = Some(e),
        }
    }
    release(&mut g, &blocks);
    if g.have.iter().all(|h| *h) {
        g.full = true;
    }
    f.cv.notify_all();
    err.map_or(Ok(()), Err)
}

/// Uploads the first `size` bytes of `cache` as `key`; the new object's version.
async fn put(
    store: &Arc<dyn ObjectStore>,
    cache: &File,
    key: &Path,
    size: u64,
) -> Result<Option<String>, Errno> {
    let read = |off: u64, len: usize| -> Result<Vec<u8>, Errno> {
        let mut buf = vec![0; len];
        cache
            .read_exact_at(&mut buf, off)
            .map_err(|e| io_errno(&e))?;
        Ok(buf)
    };
    let fail = |e: &object_store::Error| {
        warn!(key = %key, error = %e, "cannot upload");
        store_errno(e)
    };
    if size <= PART as u64 {
        let data = read(0, usize::try_from(size).map_err(|_| Errno::EFBIG)?)?;
        let r = store.put(key, data.into()).await.map_err(|e| fail(&e))?;
        return Ok(r.e_tag);
    }
    let upload = store.put_multipart(key).await.map_err(|e| fail(&e))?;
    let mut w = WriteMultipart::new_with_chunk_size(upload, PART);
    let mut off = 0;
    while off < size {
        let len = usize::try_from((size - off).min(PART as u64)).map_err(|_| Errno::EFBIG)?;
        let data = match read(off, len) {
            Ok(d) => d,
            Err(e) => {
                let _ = w.abort().await;
                return Err(e);
            }
        };
        if let Err(e) = w.wait_for_capacity(IN_FLIGHT).await {
            return Err(fail(&e));
        }
        w.put(data.into());
        off += len as u64;
    }
    let r = w.finish().await.map_err(|e| fail(&e))?;
    Ok(r.e_tag)
}
