//! A file's contents while the kernel knows it: a sparse cache file, filled block by block
//! from the object, and uploaded whole when it changed.

use std::collections::HashSet;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::SystemTime;

use futures::StreamExt;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, WriteMultipart};
use tracing::{debug, warn};
use vdk_core::sync::{self, lock};
use vdk_core::sys::FileExt;

use super::{
    check_name, from_ns, io_errno, join, split, store_errno, to_ns, Attr, Drive, Entry, Errno,
    BLOCK, IN_FLIGHT, MAX_AHEAD, PART, RUN,
};

/// A file's contents while the kernel knows it.
#[derive(Debug)]
pub struct FileState {
    pub(super) m: Mutex<FileInner>,
    pub(super) cv: Condvar,
    pub(super) cache: File,
    pub(super) cache_path: PathBuf,
    /// Read without the lock by attribute requests.
    pub(super) size: AtomicU64,
    pub(super) mtime_ns: AtomicI64,
    /// Changed here and not uploaded yet: listings keep it whatever the store says.
    pub(super) pending: AtomicBool,
    pub(super) opens: AtomicU32,
}

#[derive(Debug)]
pub(super) struct FileInner {
    /// The version of the object the fetched blocks come from (`None`: no object yet).
    pub(super) etag: Option<String>,
    /// Blocks of that version in the cache file.
    pub(super) have: Vec<bool>,
    pub(super) loading: HashSet<u64>,
    /// The cache file holds all of the file.
    pub(super) full: bool,
    pub(super) dirty: bool,
    /// Where the last read ended, and how many bytes the reads that ended there read one
    /// after the other: sequential readers fetch as far ahead as they have read, up to
    /// [`MAX_AHEAD`] blocks.
    pub(super) last_end: u64,
    pub(super) run: u64,
}

impl Drop for FileState {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.cache_path);
    }
}

impl Drive {
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
    pub(super) fn make_full(&self, ino: u64, f: &Arc<FileState>) -> Result<(), Errno> {
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
}

/// The largest object S3 stores (5 TiB).
const fn object_store_max() -> u64 {
    5 << 40
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

fn release(g: &mut FileInner, blocks: &[u64]) {
    for b in blocks {
        g.loading.remove(b);
    }
}
