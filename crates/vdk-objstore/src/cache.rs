//! The local cache of a disk: one sparse file laid out as the disk is, holding the chunks
//! that are cached, bounded in size with the least recently used clean chunks evicted first,
//! and a marker per dirty chunk so that what was written and not yet uploaded is found again
//! after a crash.
//!
//! ```text
//!   DIR/lock      flock()ed while open: one process per cache directory
//!   DIR/disk      the uuid of the disk the cache belongs to (another disk's cache is wiped)
//!   DIR/data      sparse, the disk's size; chunk N at N × chunk size while it is cached
//!   DIR/dirty/N   chunk N (16 hex digits) differs from the bucket; holds the version of the
//!                 bucket's object it started from ("etag …" or "absent")
//! ```
//!
//! Which chunks are cached lives in memory; the slots of chunks not cached are holes. Clean
//! chunks are dropped when the cache is opened (the bucket may have changed since); dirty ones
//! are handed back to the disk to upload or discard.
//!
//! A chunk in use by a read, a write or an upload is pinned and never evicted under it.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vdk_core::sync;
use vdk_core::sys::FileExt;

/// The version of a chunk in the bucket: its ETag, or None where the bucket has no object.
pub type Version = Option<String>;

#[derive(Debug)]
struct Dirty {
    /// The bucket's version the changes are against.
    base: Version,
    /// Counts writes, so that an upload that raced a write does not mark the chunk clean.
    writes: u64,
    /// When the chunk became dirty.
    since: Instant,
}

#[derive(Debug)]
struct Entry {
    /// LRU clock at the last use.
    last: u64,
    /// Reads, writes and uploads using the slot now.
    pins: u32,
    dirty: Option<Dirty>,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<u64, Entry>,
    clock: u64,
    dirty: u64,
    /// The chunks the bucket holds, with their ETags.
    remote: HashMap<u64, String>,
}

/// A disk's cache directory.
#[derive(Debug)]
pub struct Cache {
    dir: PathBuf,
    data: File,
    chunk: u64,
    size: u64,
    limit: u64,
    state: Mutex<State>,
    _lock: File,
}

fn name(index: u64) -> String {
    format!("{index:016x}")
}

fn parse_name(n: &str) -> Option<u64> {
    (n.len() == 16)
        .then(|| u64::from_str_radix(n, 16).ok())
        .flatten()
}

fn marker_text(v: &Version) -> String {
    match v {
        Some(tag) => format!("etag {tag}\n"),
        None => "absent\n".into(),
    }
}

fn parse_marker(text: &str) -> Option<Version> {
    let t = text.trim_end_matches('\n');
    if t == "absent" {
        return Some(None);
    }
    t.strip_prefix("etag ").map(|e| Some(e.to_owned()))
}

/// A snapshot of a dirty chunk for upload.
#[derive(Debug)]
pub struct Snapshot {
    /// The chunk's bytes.
    pub data: Vec<u8>,
    /// The write count it includes.
    pub writes: u64,
}

impl Cache {
    /// Opens (or makes) the cache in `dir` for the disk `uuid` of `size` bytes in chunks of
    /// `chunk`, holding at most `limit` bytes, for a bucket holding the chunks in `remote`.
    /// Returns it with the dirty chunks found there (left by a process that did not upload
    /// them) and the versions they came from.
    ///
    /// Fails with `WouldBlock` if another process has the directory open.
    pub fn open(
        dir: &Path,
        uuid: &str,
        size: u64,
        chunk: u64,
        limit: u64,
        remote: HashMap<u64, String>,
    ) -> io::Result<(Cache, Vec<(u64, Version)>)> {
        fs::create_dir_all(dir.join("dirty"))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))?;
        let taken = vdk_core::sys::try_lock(&lock, vdk_core::sys::Lock::Exclusive);
        taken.and_then(|taken| {
            if taken {
                return Ok(());
            }
            Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "the cache directory {} is in use by another vdk",
                    dir.display()
                ),
            ))
        })?;
        let data_path = dir.join("data");
        let owner = fs::read_to_string(dir.join("disk")).unwrap_or_default();
        let ours = owner.trim() == uuid;
        if !ours {
            // Another disk's cache (or none): nothing in it is ours.
            for e in fs::read_dir(dir.join("dirty"))? {
                fs::remove_file(e?.path())?;
            }
            let _ = fs::remove_file(&data_path); // may not exist
            fs::write(dir.join("disk"), format!("{uuid}\n"))?;
        }
        let data = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&data_path)?;
        let chunks = size.div_ceil(chunk);
        let mut leftover = Vec::new();
        let mut state = State {
            remote,
            ..State::default()
        };
        for e in fs::read_dir(dir.join("dirty"))? {
            let e = e?;
            let index = e.file_name().to_str().and_then(parse_name);
            let marker = fs::read_to_string(e.path())
                .ok()
                .and_then(|t| parse_marker(&t));
            match (index, marker) {
                (Some(i), Some(v)) if i < chunks && data.metadata()?.len() >= (i + 1) * chunk => {
                    state.entries.insert(
                        i,
                        Entry {
                            last: 0,
                            pins: 0,
                            dirty: Some(Dirty {
                                base: v.clone(),
                                writes: 1,
                                since: Instant::now(),
                            }),
                        },
                    );
                    state.dirty += 1;
                    leftover.push((i, v));
                }
                _ => fs::remove_file(e.path())?,
            }
        }
        leftover.sort();
        let cache = Cache {
            dir: dir.to_owned(),
            data,
            chunk,
            size: chunks * chunk,
            limit: limit.max(8 * chunk),
            state: Mutex::new(state),
            _lock: lock,
        };
        // Clean chunks are dropped: holes everywhere but under the dirty ones.
        if leftover.is_empty() {
            cache.data.set_len(0)?;
        } else {
            let mut at = 0;
            for &(i, _) in &leftover {
                cache.punch(at, i * chunk - at)?;
                at = (i + 1) * chunk;
            }
            cache.punch(at, cache.size.saturating_sub(at))?;
        }
        cache.data.set_len(cache.size)?;
        Ok((cache, leftover))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        sync::lock(&self.state)
    }

    fn marker_path(&self, index: u64) -> PathBuf {
        self.dir.join("dirty").join(name(index))
    }

    /// Frees `[offset, offset + len)` of the data file; reads back as zeroes.
    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        match vdk_core::sys::punch_hole(&self.data, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                // A file system without holes: write the zeroes.
                let zeroes = vec![0u8; 1 << 20];
                let mut at = offset;
                while at < offset + len {
                    let n = (offset + len - at).min(1 << 20);
                    self.data
                        .write_all_at(&zeroes[..usize::try_from(n).unwrap_or(0)], at)?;
                    at += n;
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The cache's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cache's size limit.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Whether chunk `index` is cached.
    pub fn contains(&self, index: u64) -> bool {
        self.lock().entries.contains_key(&index)
    }

    /// The bucket's version of chunk `index` (None: the bucket has none).
    pub fn remote(&self, index: u64) -> Version {
        self.lock().remote.get(&index).cloned()
    }

    /// Whether the bucket holds chunk `index`.
    pub fn is_remote(&self, index: u64) -> bool {
        self.lock().remote.contains_key(&index)
    }

    /// How many chunks the bucket holds.
    pub fn remote_count(&self) -> usize {
        self.lock().remote.len()
    }

    /// Whether chunk `index` is dirty.
    pub fn is_dirty(&self, index: u64) -> bool {
        self.lock()
            .entries
            .get(&index)
            .is_some_and(|e| e.dirty.is_some())
    }

    /// Pins chunk `index` if it is cached.
    fn pin(&self, index: u64) -> bool {
        let mut st = self.lock();
        st.clock += 1;
        let clock = st.clock;
        match st.entries.get_mut(&index) {
            Some(e) => {
                e.pins += 1;
                e.last = clock;
                true
            }
            None => false,
        }
    }

    fn unpin(&self, index: u64) {
        if let Some(e) = self.lock().entries.get_mut(&index) {
            e.pins = e.pins.saturating_sub(1);
        }
    }

    /// Runs `f` on the pinned slot of chunk `index`; `Ok(false)` if the chunk is not cached.
    fn with_pinned(&self, index: u64, f: impl FnOnce() -> io::Result<()>) -> io::Result<bool> {
        if !self.pin(index) {
            return Ok(false);
        }
        let r = f();
        self.unpin(index);
        r.map(|()| true)
    }

    /// Reads `buf.len()` bytes at `offset` of chunk `index`; `Ok(false)` if it is not cached.
    pub fn read(&self, index: u64, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        self.with_pinned(index, || {
            self.data.read_exact_at(buf, index * self.chunk + offset)
        })
    }

    /// Caches chunk `index`, clean, as `data` (one chunk), or as zeroes (a chunk the bucket
    /// does not have, or one about to be overwritten whole). The caller makes sure nobody else
    /// fills or writes the chunk at the same time.
    pub fn fill(&self, index: u64, data: Option<&[u8]>) -> io::Result<()> {
        let at = index * self.chunk;
        self.punch(at, self.chunk)?;
        if let Some(d) = data {
            // Runs of zeroes stay holes.
            for (i, block) in d.chunks(64 << 10).enumerate() {
                if block.iter().any(|&b| b != 0) {
                    self.data
                        .write_all_at(block, at + (i as u64) * (64 << 10))?;
                }
            }
        }
        let mut st = self.lock();
        st.clock += 1;
        let clock = st.clock;
        st.entries.entry(index).or_insert(Entry {
            last: clock,
            pins: 0,
            dirty: None,
        });
        Ok(())
    }

    fn mark_dirty(&self, index: u64) -> io::Result<()> {
        let mut st = self.lock();
        let base = st.remote.get(&index).cloned();
        let Some(e) = st.entries.get_mut(&index) else {
            return Err(io::Error::other("dirtied a chunk that is not cached"));
        };
        match &mut e.dirty {
            Some(d) => d.writes += 1,
            None => {
                // The marker comes before the acknowledgement: a crash after it finds the
                // chunk dirty, one before it had not acknowledged the write.
                fs::write(self.marker_path(index), marker_text(&base))?;
                e.dirty = Some(Dirty {
                    base,
                    writes: 1,
                    since: Instant::now(),
                });
                st.dirty += 1;
            }
        }
        Ok(())
    }

    /// Writes `data` at `offset` of chunk `index`, which becomes dirty (against the bucket's
    /// version now, if it was clean); `Ok(false)` if it is not cached.
    pub fn write(&self, index: u64, offset: u64, data: &[u8]) -> io::Result<bool> {
        self.with_pinned(index, || {
            self.data.write_all_at(data, index * self.chunk + offset)?;
            self.mark_dirty(index)
        })
    }

    /// Zeroes `len` bytes at `offset` of chunk `index`, which becomes dirty; `Ok(false)` if it
    /// is not cached.
    pub fn zero(&self, index: u64, offset: u64, len: u64) -> io::Result<bool> {
        self.with_pinned(index, || {
            self.punch(index * self.chunk + offset, len)?;
            self.mark_dirty(index)
        })
    }

    /// The bytes of dirty chunk `index` and the write count they include, for an upload;
    /// `None` if it is clean or not cached.
    pub fn snapshot(&self, index: u64) -> io::Result<Option<Snapshot>> {
        let writes = {
            let mut st = self.lock();
            let Some(e) = st.entries.get_mut(&index) else {
                return Ok(None);
            };
            let Some(d) = &e.dirty else {
                return Ok(None);
            };
            let w = d.writes;
            e.pins += 1;
            w
        };
        let mut data = vec![0u8; usize::try_from(self.chunk).unwrap_or(0)];
        let r = self.data.read_exact_at(&mut data, index * self.chunk);
        self.unpin(index);
        r?;
        Ok(Some(Snapshot { data, writes }))
    }

    /// The whole of cached chunk `index` (for a comparison), or `None` if it is not cached.
    pub fn read_chunk(&self, index: u64) -> io::Result<Option<Vec<u8>>> {
        let mut data = vec![0u8; usize::try_from(self.chunk).unwrap_or(0)];
        Ok(self.read(index, 0, &mut data)?.then_some(data))
    }

    /// The dirty chunks, least recently used first, with whether each became dirty at least
    /// `age` ago.
    pub fn dirty(&self, age: Duration) -> Vec<(u64, bool)> {
        let st = self.lock();
        let mut d: Vec<(u64, u64, bool)> = st
            .entries
            .iter()
            .filter_map(|(i, e)| {
                e.dirty
                    .as_ref()
                    .map(|d| (e.last, *i, d.since.elapsed() >= age))
            })
            .collect();
        d.sort_unstable();
        d.into_iter().map(|(_, i, old)| (i, old)).collect()
    }

    /// Bytes of dirty chunks.
    pub fn dirty_bytes(&self) -> u64 {
        self.lock().dirty * self.chunk
    }

    /// Bytes of cached chunks.
    pub fn cached_bytes(&self) -> u64 {
        self.lock().entries.len() as u64 * self.chunk
    }

    /// Chunk `index` was uploaded as it was after `writes` writes, and the bucket now holds
    /// `version`: clean, unless it was written again meanwhile.
    pub fn uploaded(&self, index: u64, writes: u64, version: &Version) -> io::Result<()> {
        let mut st = self.lock();
        match version {
            Some(v) => st.remote.insert(index, v.clone()),
            None => st.remote.remove(&index),
        };
        let Some(e) = st.entries.get_mut(&index) else {
            return Ok(());
        };
        match &mut e.dirty {
            Some(d) if d.writes == writes => {
                e.dirty = None;
                st.dirty -= 1;
                drop(st);
                match fs::remove_file(self.marker_path(index)) {
                    Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
                    _ => {}
                }
            }
            Some(d) => {
                // Written again: still dirty, now against what was just uploaded.
                d.base = version.clone();
                fs::write(self.marker_path(index), marker_text(version))?;
            }
            None => {}
        }
        Ok(())
    }

    /// Marks dirty chunk `index` clean: the bucket's version holds the same bytes.
    pub fn settle(&self, index: u64) -> io::Result<()> {
        let (writes, version) = {
            let st = self.lock();
            let w = st
                .entries
                .get(&index)
                .and_then(|e| e.dirty.as_ref())
                .map(|d| d.writes);
            (w, st.remote.get(&index).cloned())
        };
        match writes {
            Some(w) => self.uploaded(index, w, &version),
            None => Ok(()),
        }
    }

    /// Drops chunk `index`, dirty or not; with `keep`, its bytes are saved there first (a
    /// leftover that conflicts with the bucket).
    pub fn forget(&self, index: u64, keep: Option<&Path>) -> io::Result<()> {
        if let Some(k) = keep {
            if let Some(data) = self.read_chunk(index)? {
                if let Some(parent) = k.parent() {
                    fs::create_dir_all(parent)?;
                }
                fs::write(k, data)?;
            }
        }
        let was_dirty = {
            let mut st = self.lock();
            let d = st.entries.remove(&index).is_some_and(|e| e.dirty.is_some());
            if d {
                st.dirty -= 1;
            }
            d
        };
        if was_dirty {
            fs::remove_file(self.marker_path(index))?;
        }
        self.punch(index * self.chunk, self.chunk)
    }

    /// Evicts least recently used clean chunks while the cache holds more than its limit.
    pub fn evict(&self) {
        let victims = {
            let mut st = self.lock();
            let total = st.entries.len() as u64 * self.chunk;
            if total <= self.limit {
                return;
            }
            let mut clean: Vec<(u64, u64)> = st
                .entries
                .iter()
                .filter(|(_, e)| e.dirty.is_none() && e.pins == 0)
                .map(|(i, e)| (e.last, *i))
                .collect();
            clean.sort_unstable();
            let over = (total - self.limit).div_ceil(self.chunk);
            let victims: Vec<u64> = clean
                .into_iter()
                .take(usize::try_from(over).unwrap_or(usize::MAX))
                .map(|(_, i)| i)
                .collect();
            for i in &victims {
                st.entries.remove(i);
            }
            victims
        };
        // Not cached any more, so nobody reads the slots: free them.
        for i in victims {
            if let Err(e) = self.punch(i * self.chunk, self.chunk) {
                tracing::warn!("cannot free cached chunk {i}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: u64 = 64 << 10;
    const SIZE: u64 = 1 << 30;

    fn remote() -> HashMap<u64, String> {
        HashMap::from([(1, "\"e1\"".to_owned())])
    }

    #[test]
    fn dirty_chunks_outlive_the_process_and_clean_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (c, left) =
                Cache::open(dir.path(), "disk-a", SIZE, CHUNK, 1 << 30, remote()).unwrap();
            assert!(left.is_empty());
            c.fill(1, None).unwrap();
            assert!(c.write(1, 10, b"hello").unwrap());
            c.fill(2, Some(&vec![5u8; CHUNK as usize])).unwrap();
            // Dropped without uploading: a crash.
        }
        let (c, left) = Cache::open(dir.path(), "disk-a", SIZE, CHUNK, 1 << 30, remote()).unwrap();
        assert_eq!(left, vec![(1, Some("\"e1\"".to_owned()))]);
        assert!(c.contains(1) && !c.contains(2), "clean chunks are dropped");
        let mut b = [0u8; 5];
        assert!(c.read(1, 10, &mut b).unwrap());
        assert_eq!(&b, b"hello");
        let mut b = [1u8; 5];
        assert!(!c.read(2, 0, &mut b).unwrap());
        drop(c);
        // Another disk's cache starts empty.
        let (c2, left) = Cache::open(dir.path(), "disk-b", SIZE, CHUNK, 1 << 30, remote()).unwrap();
        assert!(left.is_empty() && !c2.contains(1));
    }

    #[test]
    fn one_process_per_cache_directory() {
        let dir = tempfile::tempdir().unwrap();
        let _c = Cache::open(dir.path(), "d", SIZE, CHUNK, 1 << 30, HashMap::new()).unwrap();
        let e = Cache::open(dir.path(), "d", SIZE, CHUNK, 1 << 30, HashMap::new()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(e.to_string().contains("in use"), "{e}");
    }

    #[test]
    fn an_upload_racing_a_write_leaves_the_chunk_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = Cache::open(dir.path(), "d", SIZE, CHUNK, 1 << 30, HashMap::new()).unwrap();
        c.fill(0, None).unwrap();
        c.write(0, 0, b"a").unwrap();
        let snap = c.snapshot(0).unwrap().unwrap();
        assert_eq!(snap.data[0], b'a');
        c.write(0, 1, b"b").unwrap();
        c.uploaded(0, snap.writes, &Some("v1".into())).unwrap();
        assert_eq!(
            c.dirty(Duration::ZERO).len(),
            1,
            "written after the snapshot"
        );
        let marker = fs::read_to_string(dir.path().join("dirty").join(name(0))).unwrap();
        assert_eq!(marker, "etag v1\n", "now against what was uploaded");
        let snap = c.snapshot(0).unwrap().unwrap();
        c.uploaded(0, snap.writes, &Some("v2".into())).unwrap();
        assert!(c.dirty(Duration::ZERO).is_empty());
        assert_eq!(c.dirty_bytes(), 0);
        assert!(!dir.path().join("dirty").join(name(0)).exists());
    }

    #[test]
    fn eviction_keeps_dirty_and_recent_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = Cache::open(dir.path(), "d", SIZE, CHUNK, 8 * CHUNK, HashMap::new()).unwrap();
        c.fill(100, None).unwrap();
        c.write(100, 0, b"x").unwrap();
        for i in 0..20 {
            c.fill(i, Some(&vec![1u8; CHUNK as usize])).unwrap();
            c.evict();
        }
        assert!(c.contains(100), "dirty chunks are never evicted");
        assert!(
            c.contains(19) && !c.contains(0),
            "the least recently used go first"
        );
        assert!(c.cached_bytes() <= 8 * CHUNK, "{}", c.cached_bytes());
        // An evicted slot reads as a hole again.
        c.fill(0, None).unwrap();
        let mut b = [9u8; 4];
        c.read(0, 0, &mut b).unwrap();
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn zeroing_and_forgetting() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = Cache::open(dir.path(), "d", SIZE, CHUNK, 1 << 30, HashMap::new()).unwrap();
        c.fill(3, Some(&vec![7u8; CHUNK as usize])).unwrap();
        assert!(c.zero(3, 4096, 4096).unwrap());
        let data = c.read_chunk(3).unwrap().unwrap();
        assert!(data[..4096].iter().all(|&b| b == 7));
        assert!(data[4096..8192].iter().all(|&b| b == 0));
        let keep = dir.path().join("aside/3");
        c.forget(3, Some(&keep)).unwrap();
        assert_eq!(fs::read(&keep).unwrap(), data);
        assert!(!c.contains(3) && c.dirty_bytes() == 0);
    }
}
