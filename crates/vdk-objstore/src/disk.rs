//! The object-store disk: chunks in a bucket behind a local write-back cache.
//!
//! ```text
//!   read  ─► cached? ─► pread from the cache file
//!            in the bucket? ─► one GET per chunk, however many readers wait for it
//!            neither ─► zeroes
//!   write ─► chunk cached (fetched first, unless written whole) ─► pwrite, marked dirty ─► ack
//!   flush ─► PUT every dirty chunk (an all-zero one is DELETEd), 16 at a time ─► ack
//! ```
//!
//! Writeback uploads dirty chunks in the background (those dirty for a second, and the least
//! recently used when too many are dirty); writers wait for room when dirty chunks fill their
//! share of the cache. Sequential reads fetch the next chunks ahead.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use vdk_core::sync;
use vdk_core::sync::lock;

use futures::StreamExt;
use object_store::{ObjectStoreExt, PutPayload};
use tokio::runtime::{Handle, Runtime};
use vdk_core::{check_range, BlockDevice, Capabilities, DiskInfo, ExtentKind, Extents};

use crate::cache::Cache;
use crate::codec::Codec;
use crate::lease::Lease;
use crate::location::Location;
use crate::meta::Meta;
use crate::{default_cache_root, ObjError, OpenOptions};

/// The metadata object's name under the disk's prefix.
pub const META: &str = "vdk-disk.json";
const CHUNKS: &str = "chunks";
/// Uploads (and recovery downloads) in flight at once.
const IN_FLIGHT: usize = 16;
/// Bytes read ahead of a sequential reader.
const READ_AHEAD: u64 = 32 << 20;
const UPLOAD_LOCKS: u64 = 64;

/// What to do, at open, with chunks a stopped process wrote and did not upload.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum Recovery {
    /// Upload them (the default): the disk is as its last writer left it.
    #[default]
    Upload,
    /// Drop them: the disk is as its last flush left it.
    Discard,
}

/// What an open found in the cache from a process that stopped.
#[derive(Clone, Debug, Default)]
pub struct RecoveryReport {
    /// Chunks uploaded.
    pub uploaded: u64,
    /// Chunks dropped, as asked.
    pub discarded: u64,
    /// Chunks the bucket had changed meanwhile (another writer), set aside at these paths.
    pub conflicts: Vec<(u64, PathBuf)>,
}

mod manage;
pub use manage::{create, create_at, destroy, info, CreateOptions, DiskStats};
use manage::{etag, list_chunks, read_meta};

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Debug)]
struct Inner {
    handle: Handle,
    loc: Location,
    meta: Meta,
    codec: Codec,
    cache: Cache,
    chunk: u64,
    read_only: bool,
    lease: Option<Lease>,
    /// Chunks being fetched (or zero-filled) into the cache; others wanting one wait.
    loading: Mutex<HashSet<u64>>,
    loaded: Condvar,
    /// One upload of a chunk at a time.
    upload_locks: Vec<tokio::sync::Mutex<()>>,
    /// Dirty bytes above which writers wait for writeback.
    dirty_limit: u64,
    room: Mutex<()>,
    room_cv: Condvar,
    wake: tokio::sync::Notify,
    closing: AtomicBool,
    /// Where the last read ended, to spot sequential readers.
    seq_end: AtomicU64,
    read_ahead: u64,
    /// A dirty chunk is uploaded in the background once it has been dirty this long.
    writeback_delay: Duration,
    /// Background uploads that failed (retried at the next round).
    failures: AtomicU64,
    /// Chunk uploads (or deletions of zeroed chunks) running now.
    uploading: AtomicU64,
    /// Chunk uploads that failed, in the background or for a flush.
    upload_failures: AtomicU64,
}

/// What an object-store disk's cache and uploads are doing ([`ObjectDisk::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Bytes in the cache.
    pub cached: u64,
    /// Of them, bytes not yet in the bucket.
    pub dirty: u64,
    /// Chunk uploads running now.
    pub uploading: u64,
    /// Chunk uploads that failed since the disk was opened (each is retried).
    pub upload_failures: u64,
}

impl Inner {
    fn chunk_key(&self, index: u64) -> object_store::path::Path {
        self.loc.key(&format!("{CHUNKS}/{index:016x}"))
    }

    fn may_write(&self) -> Result<(), ObjError> {
        if self.read_only {
            return Err(ObjError::ReadOnly);
        }
        match &self.lease {
            Some(l) => l.check(),
            None => Ok(()),
        }
    }

    /// The bucket's bytes of chunk `index` (zeroes where it has none).
    async fn download(&self, index: u64) -> Result<Vec<u8>, ObjError> {
        let mut out = vec![0u8; usize::try_from(self.chunk).unwrap_or(0)];
        if !self.cache.is_remote(index) {
            return Ok(out);
        }
        match self.loc.store.get(&self.chunk_key(index)).await {
            Ok(g) => {
                let stored = g.bytes().await?;
                self.codec.decode(index, &stored, &mut out)?;
            }
            // Deleted by the writer since this reader listed the disk: zeroes now.
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(out)
    }

    /// Fetches chunk `index` into the cache (the caller has claimed it).
    async fn fetch(&self, index: u64) -> Result<(), ObjError> {
        if !self.cache.is_remote(index) {
            return Ok(self.cache.fill(index, None)?);
        }
        let data = self.download(index).await?;
        Ok(self.cache.fill(index, Some(&data))?)
    }

    /// Claims chunk `index` for loading, waiting while another loads it; false if it is
    /// cached (by then).
    fn claim(&self, index: u64) -> bool {
        let mut l = lock(&self.loading);
        loop {
            if self.cache.contains(index) {
                return false;
            }
            if l.insert(index) {
                return true;
            }
            l = sync::wait(&self.loaded, l);
        }
    }

    fn try_claim(&self, index: u64) -> bool {
        let mut l = lock(&self.loading);
        !self.cache.contains(index) && l.insert(index)
    }

    fn release(&self, index: u64) {
        lock(&self.loading).remove(&index);
        self.loaded.notify_all();
    }

    /// Makes chunk `index` cached: fetched from the bucket, or as zeroes when `zero` (it is
    /// about to be overwritten whole).
    fn ensure(&self, index: u64, zero: bool) -> Result<(), ObjError> {
        if !self.claim(index) {
            return Ok(());
        }
        let r = if zero {
            self.cache.fill(index, None).map_err(ObjError::from)
        } else {
            self.handle.block_on(self.fetch(index))
        };
        self.release(index);
        self.cache.evict();
        r
    }

    fn read_piece(&self, index: u64, offset: u64, buf: &mut [u8]) -> Result<(), ObjError> {
        loop {
            if self.cache.read(index, offset, buf)? {
                return Ok(());
            }
            if !self.cache.is_remote(index) && !self.cache.contains(index) {
                buf.fill(0);
                return Ok(());
            }
            self.ensure(index, false)?;
        }
    }

    /// Waits while dirty chunks fill their share of the cache (unless chunk `index` is one
    /// of them already).
    fn wait_for_room(&self, index: u64) -> Result<(), ObjError> {
        if self.cache.is_dirty(index) {
            return Ok(());
        }
        let mut g = lock(&self.room);
        while self.cache.dirty_bytes() + self.chunk > self.dirty_limit {
            self.wake.notify_one();
            self.may_write()?;
            g = sync::wait_timeout(&self.room_cv, g, Duration::from_millis(100)).0;
        }
        Ok(())
    }

    fn write_piece(&self, index: u64, offset: u64, data: &[u8]) -> Result<(), ObjError> {
        self.wait_for_room(index)?;
        let whole = offset == 0 && data.len() as u64 == self.chunk;
        loop {
            if self.cache.write(index, offset, data)? {
                return Ok(());
            }
            self.ensure(index, whole || !self.cache.is_remote(index))?;
        }
    }

    fn zero_piece(&self, index: u64, offset: u64, len: u64) -> Result<(), ObjError> {
        let whole = offset == 0 && len == self.chunk;
        loop {
            if !self.cache.is_remote(index) && !self.cache.contains(index) {
                return Ok(()); // zeroes already
            }
            self.wait_for_room(index)?;
            if self.cache.zero(index, offset, len)? {
                return Ok(());
            }
            self.ensure(index, whole)?;
        }
    }

    /// Uploads dirty chunk `index` as it is now (deletes it from the bucket if all zero).
    /// Uploads one chunk, counted in [`CacheStats`].
    async fn upload(&self, index: u64) -> Result<(), ObjError> {
        self.uploading.fetch_add(1, Ordering::Relaxed);
        let r = self.upload_chunk(index).await;
        self.uploading.fetch_sub(1, Ordering::Relaxed);
        if r.is_err() {
            self.upload_failures.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    async fn upload_chunk(&self, index: u64) -> Result<(), ObjError> {
        let stripe = usize::try_from(index % UPLOAD_LOCKS).unwrap_or(0);
        let _one = self.upload_locks[stripe].lock().await;
        self.may_write()?;
        let Some(snap) = self.cache.snapshot(index)? else {
            return Ok(()); // clean (uploaded by someone else meanwhile)
        };
        let key = self.chunk_key(index);
        let version = if snap.data.iter().all(|&b| b == 0) {
            if self.cache.is_remote(index) {
                match self.loc.store.delete(&key).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            None
        } else {
            let body = self.codec.encode(index, snap.data)?;
            let r = self.loc.store.put(&key, PutPayload::from(body)).await?;
            Some(etag(r.e_tag))
        };
        self.cache.uploaded(index, snap.writes, &version)?;
        self.room_cv.notify_all();
        Ok(())
    }

    /// Uploads `indices`, [`IN_FLIGHT`] at a time; the first failure is returned after all
    /// were tried.
    async fn upload_all(&self, indices: Vec<u64>) -> Result<(), ObjError> {
        let results: Vec<Result<(), ObjError>> = futures::stream::iter(indices)
            .map(|i| self.upload(i))
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        results.into_iter().collect()
    }

    fn flush_all(&self) -> Result<(), ObjError> {
        let dirty: Vec<u64> = self
            .cache
            .dirty(Duration::ZERO)
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        if dirty.is_empty() {
            return Ok(());
        }
        self.may_write()?;
        self.handle.block_on(self.upload_all(dirty))
    }

    fn read_ahead(self: &Arc<Self>, last: u64) {
        let chunks = self.meta.chunks();
        for i in last + 1..(last + 1 + self.read_ahead).min(chunks) {
            if self.cache.is_remote(i) && !self.cache.contains(i) && self.try_claim(i) {
                let me = self.clone();
                self.handle.spawn(async move {
                    if let Err(e) = me.fetch(i).await {
                        tracing::debug!("read-ahead of chunk {i}: {e}");
                    }
                    me.release(i);
                    me.cache.evict();
                });
            }
        }
    }

    /// The background writeback: uploads chunks dirty for a while, and the least recently
    /// used ones while too many are dirty.
    async fn writeback(self: Arc<Self>) {
        let mut warned = false;
        while !self.closing.load(Ordering::Acquire) {
            let _ = tokio::time::timeout(Duration::from_millis(250), self.wake.notified()).await;
            if self.closing.load(Ordering::Acquire) {
                break;
            }
            let bytes = self.cache.dirty_bytes();
            let mut over = if bytes > self.dirty_limit / 2 {
                (bytes - self.dirty_limit / 4) / self.chunk
            } else {
                0
            };
            let mut pick = Vec::new();
            for (i, old) in self.cache.dirty(self.writeback_delay) {
                if old || over > 0 {
                    pick.push(i);
                    over = over.saturating_sub(1);
                }
            }
            if !pick.is_empty() {
                match self.upload_all(pick).await {
                    Ok(()) => warned = false,
                    Err(e) => {
                        self.failures.fetch_add(1, Ordering::Relaxed);
                        if !warned {
                            tracing::warn!(
                                "{}: background upload failed (retrying): {e}",
                                self.loc.url
                            );
                            warned = true;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            self.cache.evict();
        }
    }

    async fn renew(self: Arc<Self>) {
        let Some(lease) = &self.lease else {
            return;
        };
        let mut wait = lease.renew_every();
        loop {
            tokio::time::sleep(wait).await;
            if self.closing.load(Ordering::Acquire) {
                return;
            }
            match lease.renew().await {
                Ok(()) => wait = lease.renew_every(),
                Err(ObjError::LeaseLost(_)) => return,
                Err(e) => {
                    tracing::warn!(
                        "{}: cannot renew the writer's lease (retrying): {e}",
                        self.loc.url
                    );
                    wait = (lease.renew_every() / 4).max(Duration::from_millis(200));
                }
            }
        }
    }
}

/// A disk in object storage, open.
#[derive(Debug)]
pub struct ObjectDisk {
    inner: Arc<Inner>,
    rt: Option<Runtime>,
    recovery: RecoveryReport,
    /// A read-only opener's private cache, removed at close.
    scratch: Option<PathBuf>,
    /// Closed as a crash closes it: nothing uploaded, the lease left to run out.
    abandoned: bool,
}

impl ObjectDisk {
    /// Opens the disk at `url`.
    pub fn open(url: &str, opts: &OpenOptions) -> Result<ObjectDisk, ObjError> {
        let loc = Location::parse(url, &opts.store, false)?;
        loc.check_reachable()?;
        ObjectDisk::open_at(loc, opts)
    }

    /// [`ObjectDisk::open`] at a location already parsed.
    pub fn open_at(loc: Location, opts: &OpenOptions) -> Result<ObjectDisk, ObjError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vdk-objstore")
            .enable_all()
            .build()?;
        let meta = rt.block_on(read_meta(&loc))?;
        let codec = Codec::new(&meta, opts.key.as_ref())?;
        let lease = if opts.read_only {
            None
        } else {
            Some(rt.block_on(Lease::acquire(&loc, opts.lease_ttl))?)
        };
        let remote = rt.block_on(list_chunks(&loc, meta.chunks()))?;
        let remote: HashMap<u64, String> = remote.into_iter().map(|(i, (t, _))| (i, t)).collect();
        let root = opts.cache_root.clone().unwrap_or_else(default_cache_root);
        let (dir, scratch) = match &opts.cache_dir {
            Some(d) => (d.clone(), None),
            None if opts.read_only => {
                let d = root.join(format!("{}-ro-{}", meta.uuid, std::process::id()));
                (d.clone(), Some(d))
            }
            None if opts.ephemeral_cache => {
                let d = root.join(&meta.uuid);
                (d.clone(), Some(d))
            }
            None => (root.join(&meta.uuid), None),
        };
        let (cache, leftovers) = Cache::open(
            &dir,
            &meta.uuid,
            meta.size,
            meta.chunk_size,
            opts.cache_size,
            remote,
        )
        .map_err(|e| {
            ObjError::Io(std::io::Error::new(
                e.kind(),
                format!("cache {}: {e}", dir.display()),
            ))
        })?;
        let chunk = meta.chunk_size;
        let limit = cache.limit();
        let inner = Arc::new(Inner {
            handle: rt.handle().clone(),
            read_ahead: (READ_AHEAD / chunk)
                .clamp(1, 8)
                .min(limit / chunk / 4)
                .max(1),
            loc,
            codec,
            cache,
            chunk,
            read_only: opts.read_only,
            lease,
            loading: Mutex::new(HashSet::new()),
            loaded: Condvar::new(),
            upload_locks: (0..UPLOAD_LOCKS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            dirty_limit: (limit * 3 / 4).max(2 * chunk),
            room: Mutex::new(()),
            room_cv: Condvar::new(),
            wake: tokio::sync::Notify::new(),
            closing: AtomicBool::new(false),
            seq_end: AtomicU64::new(u64::MAX),
            failures: AtomicU64::new(0),
            uploading: AtomicU64::new(0),
            upload_failures: AtomicU64::new(0),
            writeback_delay: opts.writeback_delay,
            meta,
        });
        let mut disk = ObjectDisk {
            inner,
            rt: Some(rt),
            recovery: RecoveryReport::default(),
            scratch,
            abandoned: false,
        };
        if !leftovers.is_empty() {
            disk.recover(leftovers, opts.recovery)?;
        }
        if !opts.read_only {
            let handle = disk.inner.handle.clone();
            handle.spawn(disk.inner.clone().writeback());
            handle.spawn(disk.inner.clone().renew());
        }
        Ok(disk)
    }

    fn recover(
        &mut self,
        leftovers: Vec<(u64, Option<String>)>,
        how: Recovery,
    ) -> Result<(), ObjError> {
        let inner = &self.inner;
        let dir = inner.cache.dir().to_owned();
        if how == Recovery::Discard {
            for (i, _) in leftovers {
                inner.cache.forget(i, None)?;
                self.recovery.discarded += 1;
            }
            return Ok(());
        }
        if inner.read_only {
            return Err(ObjError::Exists(format!(
                "the cache {} holds {} chunks written and not uploaded by a vdk that stopped: \
                 open the disk for writing to upload them (or discard them), or use another cache",
                dir.display(),
                leftovers.len()
            )));
        }
        let mut upload = Vec::new();
        for (i, base) in leftovers {
            if inner.cache.remote(i) == base {
                upload.push(i);
                continue;
            }
            // The bucket's chunk changed since this one was dirtied: the same bytes (uploaded
            // just before the crash), or another writer's. The latter is set aside, not mixed.
            let theirs = inner.handle.block_on(inner.download(i))?;
            let ours = inner.cache.read_chunk(i)?.unwrap_or_default();
            if ours == theirs {
                inner.cache.settle(i)?;
                continue;
            }
            let keep = dir
                .join("conflicts")
                .join(format!("{i:016x}-{}", unix_now()));
            tracing::warn!(
                "chunk {i} was changed in the bucket after this cache's writer dirtied it: \
                 the bucket's is kept, the cache's is set aside at {}",
                keep.display()
            );
            inner.cache.forget(i, Some(&keep))?;
            self.recovery.conflicts.push((i, keep));
        }
        self.recovery.uploaded = upload.len() as u64;
        inner.handle.block_on(inner.upload_all(upload))
    }

    /// Closes the disk as a crash would: no upload, no lease given up (a `file://` lease is
    /// a lock, released as a dying process's is). For tests of recovery.
    #[doc(hidden)]
    pub fn abandon(mut self) {
        self.abandoned = true;
    }

    /// What this open recovered from a stopped process's cache.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// The disk's metadata.
    pub fn meta(&self) -> &Meta {
        &self.inner.meta
    }

    /// The cache directory.
    pub fn cache_dir(&self) -> PathBuf {
        self.inner.cache.dir().to_owned()
    }

    /// Bytes cached, and of them dirty (not yet in the bucket).
    pub fn cache_usage(&self) -> (u64, u64) {
        (
            self.inner.cache.cached_bytes(),
            self.inner.cache.dirty_bytes(),
        )
    }

    /// What the disk's cache and uploads are doing now.
    pub fn stats(&self) -> CacheStats {
        let (cached, dirty) = self.cache_usage();
        CacheStats {
            cached,
            dirty,
            uploading: self.inner.uploading.load(Ordering::Relaxed),
            upload_failures: self.inner.upload_failures.load(Ordering::Relaxed),
        }
    }

    /// Chunks stored in the bucket (as far as this opener knows).
    pub fn stored_chunks(&self) -> u64 {
        self.inner.cache.remote_count() as u64
    }

    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64, u64)> {
        // (chunk, offset in chunk, length, offset in the request)
        let chunk = self.inner.chunk;
        let mut at = offset;
        let end = offset + len;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let index = at / chunk;
            let off = at % chunk;
            let n = (chunk - off).min(end - at);
            let r = (index, off, n, at - offset);
            at += n;
            Some(r)
        })
    }
}

fn usize_of(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

impl BlockDevice for ObjectDisk {
    fn info(&self) -> DiskInfo {
        let mut i = DiskInfo::new(self.inner.meta.size);
        i.physical_block_size = 4096;
        i.preferred_request = u32::try_from(self.inner.chunk.min(2 << 20)).unwrap_or(1 << 20);
        i.read_only = self.inner.read_only;
        i.caps = Capabilities {
            flush: true,
            fua: true,
            trim: true,
            fast_zero: true,
            extents: true,
            multi_conn: true,
            cache: true,
            ..Capabilities::NONE
        };
        i
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> vdk_core::Result<()> {
        check_range(self.inner.meta.size, offset, buf.len() as u64)?;
        let mut last = None;
        for (index, off, n, at) in self.pieces(offset, buf.len() as u64) {
            let b = &mut buf[usize_of(at)..usize_of(at + n)];
            self.inner.read_piece(index, off, b)?;
            last = Some(index);
        }
        let end = offset + buf.len() as u64;
        let prev = self.inner.seq_end.swap(end, Ordering::Relaxed);
        let near = 1 << 20;
        if let Some(last) = last {
            if prev != u64::MAX && offset + near >= prev && offset <= prev.saturating_add(near) {
                self.inner.read_ahead(last);
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> vdk_core::Result<()> {
        check_range(self.inner.meta.size, offset, buf.len() as u64)?;
        self.inner.may_write()?;
        let mut touched = Vec::new();
        for (index, off, n, at) in self.pieces(offset, buf.len() as u64) {
            self.inner
                .write_piece(index, off, &buf[usize_of(at)..usize_of(at + n)])?;
            touched.push(index);
        }
        if fua {
            self.inner.handle.block_on(self.inner.upload_all(touched))?;
        }
        Ok(())
    }

    fn flush(&self) -> vdk_core::Result<()> {
        if self.inner.read_only {
            return Ok(());
        }
        Ok(self.inner.flush_all()?)
    }

    fn trim(&self, offset: u64, len: u64) -> vdk_core::Result<()> {
        self.write_zeroes(offset, len, true, false)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _may_trim: bool,
        fua: bool,
    ) -> vdk_core::Result<()> {
        check_range(self.inner.meta.size, offset, len)?;
        self.inner.may_write()?;
        let mut touched = Vec::new();
        for (index, off, n, _) in self.pieces(offset, len) {
            self.inner.zero_piece(index, off, n)?;
            touched.push(index);
        }
        if fua {
            self.inner.handle.block_on(self.inner.upload_all(touched))?;
        }
        Ok(())
    }

    fn extents(&self, offset: u64, len: u64) -> vdk_core::Result<Extents> {
        check_range(self.inner.meta.size, offset, len)?;
        let mut e = Extents::new(offset);
        for (index, _, n, _) in self.pieces(offset, len) {
            let data = self.inner.cache.is_remote(index) || self.inner.cache.is_dirty(index);
            e.push(
                n,
                if data {
                    ExtentKind::Data
                } else {
                    ExtentKind::Hole
                },
            );
        }
        Ok(e)
    }

    fn cache(&self, offset: u64, len: u64) -> vdk_core::Result<()> {
        check_range(self.inner.meta.size, offset, len)?;
        let indices: Vec<u64> = self
            .pieces(offset, len)
            .map(|(i, ..)| i)
            .filter(|&i| self.inner.cache.is_remote(i) && self.inner.try_claim(i))
            .collect();
        let inner = &self.inner;
        let fetched: Vec<Result<(), ObjError>> = inner.handle.block_on(
            futures::stream::iter(indices)
                .map(|i| async move {
                    let r = inner.fetch(i).await;
                    inner.release(i);
                    r
                })
                .buffer_unordered(IN_FLIGHT)
                .collect(),
        );
        inner.cache.evict();
        fetched.into_iter().collect::<Result<(), ObjError>>()?;
        Ok(())
    }
}

impl Drop for ObjectDisk {
    fn drop(&mut self) {
        let inner = &self.inner;
        inner.closing.store(true, Ordering::Release);
        inner.wake.notify_one();
        if !inner.read_only && !self.abandoned {
            if let Err(e) = inner.flush_all() {
                let (_, dirty) = (inner.cache.cached_bytes(), inner.cache.dirty_bytes());
                tracing::error!(
                    "{}: {dirty} bytes not uploaded at close ({e}); they stay in {} and are \
                     uploaded when the disk is next opened with that cache",
                    inner.loc.url,
                    inner.cache.dir().display()
                );
            }
            if let Some(l) = &inner.lease {
                inner.handle.block_on(l.release());
            }
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
        if let Some(d) = &self.scratch {
            // A cache of this open only (read-only, or asked for): nothing in it is needed
            // unless it holds what could not be uploaded.
            let dirty = inner.cache.dirty_bytes();
            if inner.read_only || (dirty == 0 && !self.abandoned) {
                let _ = std::fs::remove_dir_all(d);
            } else if !self.abandoned {
                tracing::warn!(
                    "{}: {dirty} bytes could not be uploaded; the cache {} keeps them",
                    inner.loc.url,
                    d.display()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests;
