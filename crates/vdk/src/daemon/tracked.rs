//! The disk as the daemon's front ends see it: the backend, counted, and with a switch that
//! fails every later request once the disk is closed (as a disk pulled out of its slot does).
//! Every write (and zeroing, and trim) marks the disk's dirty bitmaps, and, while a backup
//! runs, first has the backup copy the old data of what it overwrites.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Instant;

use vdk_core::bitmap::Bitmaps;
use vdk_core::sync;
use vdk_core::{BlockDevice, DiskInfo, Error, Extents, Lend, Piece, Result};

use crate::control::Counters;

#[derive(Debug, Default)]
struct Stats {
    reads: AtomicU64,
    writes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    flushes: AtomicU64,
    trims: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicU64,
    /// Per [`Op`].
    latency: [Latency; 4],
}

/// Latency buckets: bucket i counts requests that took less than 2^i microseconds and at
/// least 2^(i-1); the last counts every longer one too (2^24 us is about 17 s).
pub const LATENCY_BUCKETS: usize = 25;

#[derive(Debug, Default)]
struct Latency {
    buckets: [AtomicU64; LATENCY_BUCKETS],
    sum_us: AtomicU64,
}

/// The kinds of request the latency histograms tell apart.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// Reads.
    Read,
    /// Writes.
    Write,
    /// Flushes.
    Flush,
    /// Trims and zero writes.
    Trim,
}

impl Op {
    /// Every kind, in order.
    pub const ALL: [Op; 4] = [Op::Read, Op::Write, Op::Flush, Op::Trim];

    /// Its name in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
        }
    }
}

/// One kind's latency histogram: per bucket (as [`LATENCY_BUCKETS`] says), and the sum.
#[derive(Clone, Debug)]
pub struct Histogram {
    /// Requests per bucket.
    pub buckets: Vec<u64>,
    /// Sum of latencies, microseconds.
    pub sum_us: u64,
}

/// A request in flight, from when the disk was asked: counted in `in_flight` until dropped.
struct Timing<'a> {
    stats: &'a Stats,
    start: Instant,
}

impl Timing<'_> {
    /// The request is done (well or not): its latency goes to `op`'s histogram.
    fn done(self, op: Op) {
        let us = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        let l = &self.stats.latency[op as usize];
        let bucket = (64 - us.leading_zeros() as usize).min(LATENCY_BUCKETS - 1);
        add(&l.buckets[bucket], 1);
        add(&l.sum_us, us);
    }
}

impl Drop for Timing<'_> {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A backend with counters and a close switch.
#[derive(Debug)]
pub struct Tracked {
    /// The chain below; swapped (under the write lock, so between requests) by a live
    /// commit or discard.
    inner: RwLock<Arc<dyn BlockDevice>>,
    closed: AtomicBool,
    stats: Stats,
    bitmaps: Arc<Bitmaps>,
    /// The backup running now, if any.
    backup: RwLock<Option<Arc<dyn BeforeWrite>>>,
    /// Whether `backup` is set, read without its lock on every write.
    backing_up: AtomicBool,
}

/// What must happen before the disk's data changes: a backup copies what is about to be
/// overwritten (copy before write), so that it holds the disk as it was when it began.
pub trait BeforeWrite: Send + Sync + std::fmt::Debug {
    /// `[offset, offset + len)` of `below` is about to be written.
    fn before_write(&self, below: &dyn BlockDevice, offset: u64, len: u64);
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Tracked {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn BlockDevice>) -> Tracked {
        Tracked {
            inner: RwLock::new(inner),
            closed: AtomicBool::new(false),
            stats: Stats::default(),
            bitmaps: Arc::default(),
            backup: RwLock::new(None),
            backing_up: AtomicBool::new(false),
        }
    }

    /// The disk's dirty bitmaps, which its writes mark.
    pub fn bitmaps(&self) -> &Arc<Bitmaps> {
        &self.bitmaps
    }

    /// Runs `f` while no request is in flight (they wait for it): the moment a backup begins.
    pub fn quiesced<T>(&self, f: impl FnOnce() -> T) -> T {
        let _no_requests = sync::write(&self.inner);
        f()
    }

    /// Runs `f` on the chain below as it is now, as a request would (but uncounted).
    pub fn with_below<T>(&self, f: impl FnOnce(&dyn BlockDevice) -> T) -> T {
        f(&**self.below())
    }

    /// Sets (or, with `None`, ends) what runs before every write. Called inside
    /// [`quiesced`](Self::quiesced) to start at a point no write straddles.
    pub fn set_before_write(&self, job: Option<Arc<dyn BeforeWrite>>) {
        let on = job.is_some();
        *sync::write(&self.backup) = job;
        self.backing_up.store(on, Ordering::Release);
    }

    /// Whether a backup runs.
    pub fn is_backing_up(&self) -> bool {
        self.backing_up.load(Ordering::Acquire)
    }

    /// Whether the disk was closed.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// `[offset, offset + len)` of `below` is about to be written.
    fn before_write(&self, below: &dyn BlockDevice, offset: u64, len: u64) {
        if self.backing_up.load(Ordering::Acquire) {
            if let Some(job) = sync::read(&self.backup).clone() {
                job.before_write(below, offset, len);
            }
        }
    }

    /// From now on every request fails with [`Error::Closed`].
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Flushes the backend, even after [`close`](Self::close).
    pub fn flush_backend(&self) -> Result<()> {
        self.below().flush()
    }

    fn below(&self) -> RwLockReadGuard<'_, Arc<dyn BlockDevice>> {
        sync::read(&self.inner)
    }

    /// Replaces the chain below with what `f` makes of it, while no request runs: requests
    /// wait for the swap, which waits for requests in flight. `f` is given the old chain
    /// (flushed) to drop; it returns the new one, or an error and the chain to keep.
    pub fn swap<E>(
        &self,
        f: impl FnOnce(
            Arc<dyn BlockDevice>,
        ) -> std::result::Result<Arc<dyn BlockDevice>, (E, Arc<dyn BlockDevice>)>,
    ) -> std::result::Result<(), E> {
        let mut slot = sync::write(&self.inner);
        let old = std::mem::replace(&mut *slot, Arc::new(Gone));
        match f(old) {
            Ok(new) => {
                *slot = new;
                Ok(())
            }
            Err((e, keep)) => {
                *slot = keep;
                Err(e)
            }
        }
    }

    /// The counters now.
    pub fn counters(&self) -> Counters {
        let s = &self.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            reads: get(&s.reads),
            writes: get(&s.writes),
            bytes_read: get(&s.bytes_read),
            bytes_written: get(&s.bytes_written),
            flushes: get(&s.flushes),
            trims: get(&s.trims),
            errors: get(&s.errors),
        }
    }

    /// Requests being served now.
    pub fn in_flight(&self) -> u64 {
        self.stats.in_flight.load(Ordering::Relaxed)
    }

    /// The latency histogram of each kind of request, in [`Op::ALL`]'s order.
    pub fn latency(&self) -> Vec<(Op, Histogram)> {
        Op::ALL
            .iter()
            .map(|op| {
                let l = &self.stats.latency[*op as usize];
                let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
                let h = Histogram {
                    buckets: l.buckets.iter().map(get).collect(),
                    sum_us: get(&l.sum_us),
                };
                (*op, h)
            })
            .collect()
    }

    /// Fails once the disk is closed; otherwise the request is in flight from now.
    fn open(&self) -> Result<Timing<'_>> {
        if self.closed.load(Ordering::Relaxed) {
            add(&self.stats.errors, 1);
            return Err(Error::Closed);
        }
        add(&self.stats.in_flight, 1);
        Ok(Timing {
            stats: &self.stats,
            start: Instant::now(),
        })
    }

    /// Counts the outcome of a request: `done` with the byte count on success.
    fn count<T>(&self, r: Result<T>, done: impl FnOnce(&Stats, &T)) -> Result<T> {
        match &r {
            Ok(v) => done(&self.stats, v),
            Err(_) => add(&self.stats.errors, 1),
        }
        r
    }
}

fn read_done(s: &Stats, n: u64) {
    add(&s.reads, 1);
    add(&s.bytes_read, n);
}

fn write_done(s: &Stats, n: u64) {
    add(&s.writes, 1);
    add(&s.bytes_written, n);
}

impl BlockDevice for Tracked {
    fn info(&self) -> DiskInfo {
        self.below().info()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let t = self.open()?;
        let n = buf.len() as u64;
        let r = self.below().read_at(buf, offset);
        t.done(Op::Read);
        self.count(r, |s, ()| read_done(s, n))
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        let t = self.open()?;
        let below = self.below();
        self.before_write(&**below, offset, buf.len() as u64);
        let r = below.write_at(buf, offset, fua);
        // Failed or not, the data there may have changed.
        self.bitmaps.mark(offset, buf.len() as u64);
        t.done(Op::Write);
        self.count(r, |s, ()| write_done(s, buf.len() as u64))
    }

    fn flush(&self) -> Result<()> {
        let t = self.open()?;
        let r = self.below().flush();
        t.done(Op::Flush);
        self.count(r, |s, ()| add(&s.flushes, 1))
    }

    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        let t = self.open()?;
        let below = self.below();
        self.before_write(&**below, offset, len);
        let r = below.trim(offset, len);
        self.bitmaps.mark(offset, len);
        t.done(Op::Trim);
        self.count(r, |s, ()| add(&s.trims, 1))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<()> {
        let t = self.open()?;
        let below = self.below();
        self.before_write(&**below, offset, len);
        let r = below.write_zeroes(offset, len, may_trim, fua);
        self.bitmaps.mark(offset, len);
        t.done(Op::Trim);
        self.count(r, |s, ()| add(&s.trims, 1))
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Extents> {
        let _in_flight = self.open()?;
        self.below().extents(offset, len)
    }

    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        let _in_flight = self.open()?;
        self.below().cache(offset, len)
    }

    fn grow(&self, new_size: u64) -> Result<()> {
        let _in_flight = self.open()?;
        self.below().grow(new_size)?;
        self.bitmaps.resize(new_size);
        Ok(())
    }

    /// Its own, always: the chain below may change (a live commit) and lend or not.
    fn lend(&self) -> Option<&dyn Lend> {
        Some(self)
    }
}

/// The fast paths of the chain below at the moment of each request (none while it has none),
/// counted and closed as the slow ones are.
impl Lend for Tracked {
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        let t = self.open()?;
        let below = self.below();
        let Some(lend) = below.lend() else {
            return Ok(false);
        };
        let n = buf.len() as u64;
        let r = lend.try_read_at(buf, offset);
        if !matches!(r, Ok(false)) {
            t.done(Op::Read);
        }
        self.count(r, |s, done| {
            if *done {
                read_done(s, n);
            }
        })
    }

    fn try_write_at(&self, buf: &[u8], offset: u64) -> Result<bool> {
        let t = self.open()?;
        let below = self.below();
        let Some(lend) = below.lend() else {
            return Ok(false);
        };
        let n = buf.len() as u64;
        if self.backing_up.load(Ordering::Acquire) {
            // The backup's copy may wait: the slow path does it.
            return Ok(false);
        }
        let r = lend.try_write_at(buf, offset);
        if !matches!(r, Ok(false)) {
            self.bitmaps.mark(offset, n);
            t.done(Op::Write);
        }
        self.count(r, |s, done| {
            if *done {
                write_done(s, buf.len() as u64);
            }
        })
    }

    fn read_shared(&self, offset: u64, len: usize) -> Result<Option<Vec<Piece>>> {
        let t = self.open()?;
        let below = self.below();
        let Some(lend) = below.lend() else {
            return Ok(None);
        };
        let r = lend.read_shared(offset, len);
        if !matches!(r, Ok(None)) {
            t.done(Op::Read);
        }
        self.count(r, |s, pieces| {
            if pieces.is_some() {
                read_done(s, len as u64);
            }
        })
    }

    fn write_unit(&self) -> Option<usize> {
        self.below().lend()?.write_unit()
    }

    fn write_owned(&self, offset: u64, bufs: Vec<Arc<[u8]>>) -> Result<Vec<Arc<[u8]>>> {
        let t = self.open()?;
        let below = self.below();
        let Some(lend) = below.lend() else {
            return Err(Error::Unsupported(vdk_core::Op::Write));
        };
        let n: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.before_write(&**below, offset, n);
        let r = lend.write_owned(offset, bufs);
        self.bitmaps.mark(offset, n);
        t.done(Op::Write);
        self.count(r, |s, _| write_done(s, n))
    }
}

/// Stands in for the chain during a swap (never reached, since requests wait for the swap),
/// or after a swap that could not open the new chain (every request fails).
#[derive(Debug)]
struct Gone;

/// A disk that fails every request: what is left when a chain cannot be opened again.
pub fn placeholder() -> Arc<dyn BlockDevice> {
    Arc::new(Gone)
}

impl BlockDevice for Gone {
    fn info(&self) -> DiskInfo {
        DiskInfo::new(0)
    }
    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> Result<()> {
        Err(Error::Closed)
    }
    fn write_at(&self, _buf: &[u8], _offset: u64, _fua: bool) -> Result<()> {
        Err(Error::Closed)
    }
    fn flush(&self) -> Result<()> {
        Err(Error::Closed)
    }
}

/// Reads and writes the kernel does on the disk's file itself (ublk zero copy), counted as
/// the disk's own, and refused once the disk is closed.
#[cfg(target_os = "linux")]
impl vdk_attach::Direct for Tracked {
    fn is_open(&self) -> bool {
        self.open().is_ok()
    }

    fn before_write(&self, offset: u64, len: u64) {
        self.before_write(&**self.below(), offset, len);
    }

    fn done(&self, write: bool, offset: u64, len: u64, ok: bool) {
        if write {
            self.bitmaps.mark(offset, len);
        }
        match (write, ok) {
            (false, true) => read_done(&self.stats, len),
            (true, true) => write_done(&self.stats, len),
            (_, false) => add(&self.stats.errors, 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdk_backends::MemoryDisk;

    #[test]
    fn passes_the_conformance_suite() {
        vdk_core::conformance::run(&|| {
            Arc::new(Tracked::new(Arc::new(MemoryDisk::new(
                vdk_core::conformance::MIN_SIZE,
            ))))
        });
    }

    #[test]
    fn counts_and_closes() {
        let t = Tracked::new(Arc::new(MemoryDisk::new(1 << 20)));
        t.write_at(&[1; 4096], 0, false).unwrap();
        let mut buf = [0; 512];
        t.read_at(&mut buf, 0).unwrap();
        t.flush().unwrap();
        let c = t.counters();
        assert_eq!(
            (c.reads, c.writes, c.bytes_read, c.bytes_written),
            (1, 1, 512, 4096)
        );
        assert_eq!(c.flushes, 1);
        let latency = t.latency();
        for (op, want) in [(Op::Read, 1), (Op::Write, 1), (Op::Flush, 1), (Op::Trim, 0)] {
            let (_, h) = latency.iter().find(|(o, _)| o.name() == op.name()).unwrap();
            assert_eq!(h.buckets.iter().sum::<u64>(), want, "{op:?}");
        }
        assert_eq!(t.in_flight(), 0);
        t.close();
        assert!(matches!(t.read_at(&mut buf, 0), Err(Error::Closed)));
        assert!(matches!(t.write_at(&buf, 0, true), Err(Error::Closed)));
        assert!(matches!(t.flush(), Err(Error::Closed)));
        assert_eq!(t.counters().errors, 3);
        t.flush_backend().unwrap();
    }
}
