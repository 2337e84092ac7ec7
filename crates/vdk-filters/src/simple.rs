//! Filters that change no data: readonly, stats, error injection, delay.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use vdk_core::ReadOnly;
use vdk_core::{BlockDevice, Error, Filter, Lend, Piece, Result};

/// The operations filters can target.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Kind {
    /// Reads (and cache hints).
    Read,
    /// Writes.
    Write,
    /// Flushes.
    Flush,
    /// Trims and zero writes.
    Trim,
}

impl Kind {
    /// All kinds, in the order stats reports them.
    pub const ALL: [Kind; 4] = [Kind::Read, Kind::Write, Kind::Flush, Kind::Trim];

    /// Its name in specs and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Read => "read",
            Kind::Write => "write",
            Kind::Flush => "flush",
            Kind::Trim => "trim",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Latency buckets: bucket i counts requests that took less than 2^i microseconds.
pub const BUCKETS: usize = 32;

#[derive(Debug, Default)]
struct OpStats {
    count: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    total_us: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
}

/// Counts requests, bytes, errors and latency (a log2 histogram) per kind of operation.
#[derive(Debug)]
pub struct Stats {
    inner: Arc<dyn BlockDevice>,
    ops: [OpStats; 4],
}

/// A snapshot of one kind's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpSnapshot {
    /// Requests.
    pub count: u64,
    /// Bytes moved (reads, writes) or affected (trims).
    pub bytes: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Sum of latencies, microseconds.
    pub total_us: u64,
    /// Bucket i: requests under 2^i microseconds (and at least 2^(i-1)).
    pub buckets: Vec<u64>,
}

impl Stats {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn BlockDevice>) -> Stats {
        Stats {
            inner,
            ops: Default::default(),
        }
    }

    /// The counters now, per kind.
    pub fn snapshot(&self) -> Vec<(Kind, OpSnapshot)> {
        Kind::ALL
            .iter()
            .map(|k| {
                let o = &self.ops[k.index()];
                let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
                (
                    *k,
                    OpSnapshot {
                        count: get(&o.count),
                        bytes: get(&o.bytes),
                        errors: get(&o.errors),
                        total_us: get(&o.total_us),
                        buckets: o.buckets.iter().map(get).collect(),
                    },
                )
            })
            .collect()
    }

    fn record<T>(&self, kind: Kind, bytes: u64, start: Instant, r: Result<T>) -> Result<T> {
        let o = &self.ops[kind.index()];
        let us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        o.count.fetch_add(1, Ordering::Relaxed);
        o.total_us.fetch_add(us, Ordering::Relaxed);
        let bucket = (64 - us.leading_zeros() as usize).min(BUCKETS - 1);
        o.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        match &r {
            Ok(_) => o.bytes.fetch_add(bytes, Ordering::Relaxed),
            Err(_) => o.errors.fetch_add(1, Ordering::Relaxed),
        };
        r
    }
}

impl Filter for Stats {
    fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }
    /// Keeps nothing sized by the disk: grows with it.
    fn grow(&self, new_size: u64) -> Result<()> {
        self.inner.grow(new_size)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let t = Instant::now();
        let n = buf.len() as u64;
        let r = self.inner.read_at(buf, offset);
        self.record(Kind::Read, n, t, r)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        let t = Instant::now();
        let r = self.inner.write_at(buf, offset, fua);
        self.record(Kind::Write, buf.len() as u64, t, r)
    }
    fn flush(&self) -> Result<()> {
        let t = Instant::now();
        let r = self.inner.flush();
        self.record(Kind::Flush, 0, t, r)
    }
    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        let t = Instant::now();
        let r = self.inner.trim(offset, len);
        self.record(Kind::Trim, len, t, r)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<()> {
        let t = Instant::now();
        let r = self.inner.write_zeroes(offset, len, may_trim, fua);
        self.record(Kind::Trim, len, t, r)
    }
    /// Its own: the disk below's fast paths, counted.
    fn lend(&self) -> Option<&dyn Lend> {
        self.inner.lend().map(|_| self as &dyn Lend)
    }
}

impl Stats {
    /// The fast paths below; only asked for once [`Filter::lend`] found them.
    fn below(&self) -> &dyn Lend {
        self.inner.lend().unwrap_or(&NoLend)
    }
}

/// Fast paths counted as the slow ones are.
impl Lend for Stats {
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        let below = self.below();
        let t = Instant::now();
        let n = buf.len() as u64;
        match below.try_read_at(buf, offset) {
            Ok(false) => Ok(false),
            r => self.record(Kind::Read, n, t, r),
        }
    }
    fn try_write_at(&self, buf: &[u8], offset: u64) -> Result<bool> {
        let below = self.below();
        let t = Instant::now();
        match below.try_write_at(buf, offset) {
            Ok(false) => Ok(false),
            r => self.record(Kind::Write, buf.len() as u64, t, r),
        }
    }
    fn read_shared(&self, offset: u64, len: usize) -> Result<Option<Vec<Piece>>> {
        let below = self.below();
        let t = Instant::now();
        match below.read_shared(offset, len) {
            Ok(None) => Ok(None),
            r => self.record(Kind::Read, len as u64, t, r),
        }
    }
    fn write_unit(&self) -> Option<usize> {
        self.below().write_unit()
    }
    fn write_owned(&self, offset: u64, bufs: Vec<Arc<[u8]>>) -> Result<Vec<Arc<[u8]>>> {
        let below = self.below();
        let t = Instant::now();
        let n: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        let r = below.write_owned(offset, bufs);
        self.record(Kind::Write, n, t, r)
    }
}

/// A disk's fast paths when it offers none: every method declines.
struct NoLend;

impl Lend for NoLend {}

/// Which requests an injecting filter targets: kinds of operation and a byte range.
#[derive(Clone, Debug)]
pub struct Target {
    /// Kinds targeted.
    pub kinds: Vec<Kind>,
    /// Byte range `[start, end)` a request must touch to be targeted.
    pub range: (u64, u64),
}

impl Target {
    fn hits(&self, kind: Kind, offset: u64, len: u64) -> bool {
        self.kinds.contains(&kind)
            && (kind == Kind::Flush
                || (offset < self.range.1 && offset.saturating_add(len.max(1)) > self.range.0))
    }
}

/// A deterministic coin: xorshift, seeded, shared by threads.
#[derive(Debug)]
struct Coin {
    state: AtomicU64,
    /// Probability, in millionths.
    ppm: u64,
}

impl Coin {
    fn flip(&self) -> bool {
        if self.ppm >= 1_000_000 {
            return true;
        }
        let mut x = self.state.load(Ordering::Relaxed);
        loop {
            let mut y = x;
            y ^= y << 13;
            y ^= y >> 7;
            y ^= y << 17;
            match self
                .state
                .compare_exchange_weak(x, y, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return y % 1_000_000 < self.ppm,
                Err(now) => x = now,
            }
        }
    }
}

/// What an injected failure looks like.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Injected {
    /// EIO.
    Io,
    /// ENOSPC.
    NoSpace,
}

/// What an injecting filter does to the requests it targets.
#[derive(Debug)]
enum Action {
    /// Fail them, a share of the time.
    Fail { coin: Coin, error: Injected },
    /// Make them wait.
    Delay(Duration),
}

/// Fails targeted requests at a rate (the `error` filter) or delays them (the `delay`
/// filter), for testing the software that uses a disk. Targeted kinds never take a front
/// end's fast path: a failure is injected, or a wait served, on the slow path.
#[derive(Debug)]
pub struct Injector {
    inner: Arc<dyn BlockDevice>,
    target: Target,
    action: Action,
}

impl Injector {
    /// Fails `target`ed requests of `inner` with `error`, a `rate` (0 to 1) of the time.
    pub fn error(
        inner: Arc<dyn BlockDevice>,
        target: Target,
        rate: f64,
        error: Injected,
        seed: u64,
    ) -> Injector {
        // rate is checked to lie in [0, 1] by the spec parser; the product fits.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let ppm = (rate.clamp(0.0, 1.0) * 1_000_000.0) as u64;
        let coin = Coin {
            state: AtomicU64::new(seed | 1),
            ppm,
        };
        Injector {
            inner,
            target,
            action: Action::Fail { coin, error },
        }
    }

    /// Delays `target`ed requests of `inner` by `delay`.
    pub fn delay(inner: Arc<dyn BlockDevice>, target: Target, delay: Duration) -> Injector {
        Injector {
            inner,
            target,
            action: Action::Delay(delay),
        }
    }

    /// What a targeted request meets before it goes below.
    fn before(&self, kind: Kind, offset: u64, len: u64) -> Result<()> {
        if !self.target.hits(kind, offset, len) {
            return Ok(());
        }
        match &self.action {
            Action::Fail { coin, error } if coin.flip() => Err(match error {
                Injected::Io => Error::Io(std::io::Error::other("injected I/O error")),
                Injected::NoSpace => Error::NoSpace,
            }),
            Action::Fail { .. } => Ok(()),
            Action::Delay(d) => {
                std::thread::sleep(*d);
                Ok(())
            }
        }
    }

    fn targets(&self, kind: Kind) -> bool {
        self.target.kinds.contains(&kind)
    }
}

impl Filter for Injector {
    fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }
    /// Keeps nothing sized by the disk: grows with it.
    fn grow(&self, new_size: u64) -> Result<()> {
        self.inner.grow(new_size)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.before(Kind::Read, offset, buf.len() as u64)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.before(Kind::Write, offset, buf.len() as u64)?;
        self.inner.write_at(buf, offset, fua)
    }
    fn flush(&self) -> Result<()> {
        self.before(Kind::Flush, 0, 0)?;
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.before(Kind::Trim, offset, len)?;
        self.inner.trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<()> {
        self.before(Kind::Trim, offset, len)?;
        self.inner.write_zeroes(offset, len, may_trim, fua)
    }
    /// Its own: the disk below's, except for the requests it targets (those take the slow
    /// path, where they fail or wait).
    fn lend(&self) -> Option<&dyn Lend> {
        self.inner.lend().map(|_| self as &dyn Lend)
    }
}

impl Lend for Injector {
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        match self.inner.lend() {
            Some(l) if !self.targets(Kind::Read) => l.try_read_at(buf, offset),
            _ => Ok(false),
        }
    }
    fn try_write_at(&self, buf: &[u8], offset: u64) -> Result<bool> {
        match self.inner.lend() {
            Some(l) if !self.targets(Kind::Write) => l.try_write_at(buf, offset),
            _ => Ok(false),
        }
    }
    fn read_shared(&self, offset: u64, len: usize) -> Result<Option<Vec<Piece>>> {
        match self.inner.lend() {
            Some(l) if !self.targets(Kind::Read) => l.read_shared(offset, len),
            _ => Ok(None),
        }
    }
    fn write_unit(&self) -> Option<usize> {
        match self.inner.lend() {
            Some(l) if !self.targets(Kind::Write) => l.write_unit(),
            _ => None,
        }
    }
    fn write_owned(&self, offset: u64, bufs: Vec<Arc<[u8]>>) -> Result<Vec<Arc<[u8]>>> {
        match self.inner.lend() {
            Some(l) if !self.targets(Kind::Write) => l.write_owned(offset, bufs),
            _ => Err(vdk_core::Error::Unsupported(vdk_core::Op::Write)),
        }
    }
}

/// Shows the disk with another physical block size: what SCSI's READ CAPACITY (16) reports
/// as logical blocks per physical block, NBD's preferred block size, ublk's and virtio-blk's
/// physical block size. Data passes through untouched, fast paths included. QEMU's
/// `physical_block_size` device property does the same for a guest.
#[derive(Debug)]
pub struct BlockSize {
    inner: Arc<dyn BlockDevice>,
    physical: u32,
}

impl BlockSize {
    /// Wraps `inner`, showing `physical` (a power of two from 512 to 64 KiB, no smaller than
    /// the disk's logical block size).
    pub fn new(
        inner: Arc<dyn BlockDevice>,
        physical: u32,
    ) -> std::result::Result<BlockSize, String> {
        BlockSize::check(u64::from(physical))?;
        let logical = inner.info().logical_block_size;
        if physical < logical {
            return Err(format!(
                "physical block size {physical} is below the disk's logical block size {logical}"
            ));
        }
        Ok(BlockSize { inner, physical })
    }

    /// The largest physical block size shown.
    pub const MAX: u32 = 64 << 10;

    /// `physical` if it can be shown: a power of two from 512 to [`BlockSize::MAX`].
    pub fn check(physical: u64) -> std::result::Result<u32, String> {
        u32::try_from(physical)
            .ok()
            .filter(|n| n.is_power_of_two() && (512..=BlockSize::MAX).contains(n))
            .ok_or_else(|| format!("physical {physical} is not a power of two from 512 to 64K"))
    }
}

impl Filter for BlockSize {
    fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }
    fn info(&self) -> vdk_core::DiskInfo {
        let mut info = self.inner.info();
        info.physical_block_size = self.physical;
        info
    }
    /// Keeps nothing sized by the disk: grows with it.
    fn grow(&self, new_size: u64) -> Result<()> {
        self.inner.grow(new_size)
    }
    fn lend(&self) -> Option<&dyn Lend> {
        self.inner.lend()
    }
}
