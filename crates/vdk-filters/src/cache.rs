//! cache: a bounded read cache, in RAM or in a local file, for slow disks below.
//!
//! The disk is cut into blocks (64 KiB by default). A read of a block not in the cache reads
//! the whole block from below and keeps it; the least recently used blocks go when the cache
//! is full. Writes go through to the disk below and drop the blocks they touch; trims and
//! zero writes too. A block read from below while a write was under way is not kept (a
//! global write counter tells), so the cache never holds data older than a completed write.
//! Hits are served by the non-waiting fast path, so a front end answers them at once.

// Casts to usize here are of offsets inside a block (at most 16 MiB, checked by the spec
// parser) and of slot indexes of a bounded cache: they fit any usize.
#![allow(clippy::cast_possible_truncation)]

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vdk_core::sync::lock;
use vdk_core::sys::FileExt;
use vdk_core::{check_range, BlockDevice, Filter, Lend, Result};

/// Where cached blocks are kept.
#[derive(Debug)]
enum Store {
    Ram(HashMap<u64, Arc<[u8]>>),
    /// A file of `capacity` slots; `slots` maps a block to its slot.
    File {
        file: File,
        slots: HashMap<u64, u64>,
        free: Vec<u64>,
    },
}

#[derive(Debug)]
struct State {
    store: Store,
    /// Block -> last use, and last use -> block (the LRU order).
    used: HashMap<u64, u64>,
    order: BTreeMap<u64, u64>,
    clock: u64,
}

/// A read cache over a disk.
#[derive(Debug)]
pub struct Cache {
    inner: Arc<dyn BlockDevice>,
    block: u64,
    capacity: usize,
    state: Mutex<State>,
    writes: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    /// A block could not be stored once (logged once).
    put_failed: AtomicBool,
}

impl Cache {
    /// A cache of `size` bytes in blocks of `block` bytes, in RAM, or in a temporary file in
    /// `dir` when given.
    pub fn new(
        inner: Arc<dyn BlockDevice>,
        size: u64,
        block: u64,
        dir: Option<&std::path::Path>,
    ) -> std::io::Result<Cache> {
        let capacity = usize::try_from((size / block).max(1)).unwrap_or(usize::MAX);
        let store = match dir {
            None => Store::Ram(HashMap::new()),
            Some(d) => {
                let file = tempfile::tempfile_in(d)?;
                Store::File {
                    file,
                    slots: HashMap::new(),
                    free: (0..capacity as u64).rev().collect(),
                }
            }
        };
        Ok(Cache {
            inner,
            block,
            capacity,
            state: Mutex::new(State {
                store,
                used: HashMap::new(),
                order: BTreeMap::new(),
                clock: 0,
            }),
            writes: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            put_failed: AtomicBool::new(false),
        })
    }

    /// Hits and misses so far, in blocks.
    pub fn hit_rate(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Blocks held now.
    pub fn blocks(&self) -> usize {
        lock(&self.state).used.len()
    }

    fn touch(st: &mut State, b: u64) {
        st.clock += 1;
        let now = st.clock;
        if let Some(old) = st.used.insert(b, now) {
            st.order.remove(&old);
        }
        st.order.insert(now, b);
    }

    fn forget(st: &mut State, b: u64) {
        if let Some(t) = st.used.remove(&b) {
            st.order.remove(&t);
            match &mut st.store {
                Store::Ram(m) => {
                    m.remove(&b);
                }
                Store::File { slots, free, .. } => {
                    if let Some(s) = slots.remove(&b) {
                        free.push(s);
                    }
                }
            }
        }
    }

    /// Copies cached block `b`'s bytes `[from, from + out.len())` into `out`, if cached.
    fn get(&self, st: &mut State, b: u64, from: usize, out: &mut [u8]) -> Result<bool> {
        let found = match &st.store {
            Store::Ram(m) => match m.get(&b) {
                Some(data) => {
                    out.copy_from_slice(&data[from..from + out.len()]);
                    true
                }
                None => false,
            },
            Store::File { file, slots, .. } => match slots.get(&b) {
                Some(s) => {
                    file.read_exact_at(out, s * self.block + from as u64)?;
                    true
                }
                None => false,
            },
        };
        if found {
            Self::touch(st, b);
        }
        Ok(found)
    }

    fn put(&self, st: &mut State, b: u64, data: &[u8]) -> Result<()> {
        while st.used.len() >= self.capacity {
            let Some((_, oldest)) = st.order.iter().next().map(|(t, b)| (*t, *b)) else {
                break;
            };
            Self::forget(st, oldest);
        }
        let block = self.block;
        match &mut st.store {
            Store::Ram(m) => {
                m.insert(b, Arc::from(data));
            }
            Store::File { file, slots, free } => {
                let Some(s) = free.pop() else { return Ok(()) };
                if let Err(e) = file.write_all_at(data, s * block) {
                    free.push(s); // the slot is still free
                    return Err(e.into());
                }
                slots.insert(b, s);
            }
        }
        Self::touch(st, b);
        Ok(())
    }

    /// Drops every block touching `[offset, offset + len)`.
    fn invalidate(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.inner.info().size);
        if end <= offset {
            return;
        }
        let mut st = lock(&self.state);
        for b in offset / self.block..=(end - 1) / self.block {
            Self::forget(&mut st, b);
        }
    }

    /// Reads through the cache; with `wait` false, only from it (`Ok(false)` on a miss).
    fn read(&self, buf: &mut [u8], offset: u64, wait: bool) -> Result<bool> {
        let size = self.inner.info().size;
        check_range(size, offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let b = at / self.block;
            let from = (at % self.block) as usize;
            let n = (self.block as usize - from).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            if self.get(&mut lock(&self.state), b, from, out)? {
                self.hits.fetch_add(1, Ordering::Relaxed);
            } else if !wait {
                return Ok(false);
            } else {
                self.misses.fetch_add(1, Ordering::Relaxed);
                let start = b * self.block;
                let len = self.block.min(size - start) as usize;
                let mut whole = vec![0u8; len];
                let epoch = self.writes.load(Ordering::Acquire);
                self.inner.read_at(&mut whole, start)?;
                out.copy_from_slice(&whole[from..from + n]);
                // Keep it only if no write could have changed it while it was read.
                let mut st = lock(&self.state);
                if self.writes.load(Ordering::Acquire) == epoch && len as u64 == self.block {
                    // A cache that cannot keep it (its disk full, ...) costs a later read,
                    // not this one: the data is here.
                    if let Err(e) = self.put(&mut st, b, &whole) {
                        if !self.put_failed.swap(true, Ordering::Relaxed) {
                            tracing::warn!(error = %e, "cache: cannot store a block, reading through");
                        }
                    }
                }
            }
            done += n;
        }
        Ok(true)
    }

    /// Runs a change below, keeping the cache from holding anything older.
    fn changing<T>(&self, offset: u64, len: u64, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.writes.fetch_add(1, Ordering::AcqRel);
        let r = f();
        self.writes.fetch_add(1, Ordering::AcqRel);
        self.invalidate(offset, len);
        r
    }
}

impl Filter for Cache {
    fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read(buf, offset, true).map(|_| ())
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.changing(offset, buf.len() as u64, || {
            self.inner.write_at(buf, offset, fua)
        })
    }
    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.changing(offset, len, || self.inner.trim(offset, len))
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<()> {
        self.changing(offset, len, || {
            self.inner.write_zeroes(offset, len, may_trim, fua)
        })
    }
    /// Its own: a hit is served at once, whatever the disk below can do.
    fn lend(&self) -> Option<&dyn Lend> {
        Some(self)
    }
}

/// Hits at once; writes at once where the disk below writes at once. No buffers are lent or
/// taken: cached blocks are copied out, and a write must reach the disk and the cache both.
impl Lend for Cache {
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        self.read(buf, offset, false)
    }
    fn try_write_at(&self, buf: &[u8], offset: u64) -> Result<bool> {
        let Some(below) = self.inner.lend() else {
            return Ok(false);
        };
        self.changing(offset, buf.len() as u64, || below.try_write_at(buf, offset))
    }
}
