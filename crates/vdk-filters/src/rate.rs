//! The `rate` filter: bytes and requests per second, for reads and writes apart and
//! together, each a token bucket that allows a burst, changeable while the disk is served.
//!
//! Every limit is a bucket that fills at its rate up to `burst` seconds' worth. A request
//! takes what it costs from each bucket that applies to it (a read of n bytes: n from
//! `read-bps` and `bps`, one from `read-iops` and `iops`) and goes on at once if they all had
//! it; otherwise the buckets go into debt and the request waits until the deepest debt is
//! paid off. Requests in flight at once therefore queue behind each other in the order they
//! came, and a request larger than the burst still passes, at the rate. Trims and zero writes
//! cost one write request and no bytes (they move no data); flushes and cache hints cost
//! nothing.
//!
//! Rate-limited requests never take a front end's fast path: their wait is served on the
//! slow path, never on the thread that reads a connection. The disk says its reads are
//! metered (`caps.metered`), so the NBD server reads holes too rather than answering them
//! from the disk's map: every byte a client reads is counted.

use std::fmt::Write as _;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vdk_core::size::parse_size;
use vdk_core::sync::{lock, wait_timeout};
use vdk_core::{BlockDevice, DiskInfo, Filter, Result};

/// The keys of a rate spec, in the order a spec is printed.
pub const KEYS: [&str; 7] = [
    "bps",
    "read-bps",
    "write-bps",
    "iops",
    "read-iops",
    "write-iops",
    "burst",
];

/// The limits of a rate filter; 0 is no limit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Bytes per second, reads and writes together; then reads, then writes.
    pub bps: [u64; 3],
    /// Requests per second, reads and writes together; then reads, then writes.
    pub iops: [u64; 3],
    /// Seconds of each rate a bucket holds: the burst allowed after a quiet spell.
    pub burst: f64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            bps: [0; 3],
            iops: [0; 3],
            burst: 1.0,
        }
    }
}

/// Longest burst, seconds.
const MAX_BURST: f64 = 60.0;

impl Limits {
    /// Sets the keys given (`bps=10M`, `write-iops=500`, `burst=0.5`, ...), leaving the others.
    /// Rates take sizes with units (`10M` is 10 MiB per second); `0` or `off` lifts a limit.
    pub fn set(&mut self, pairs: &[(&str, &str)]) -> std::result::Result<(), String> {
        for (key, value) in pairs {
            let rate = || -> std::result::Result<u64, String> {
                if *value == "off" {
                    return Ok(0);
                }
                parse_size(value).map_err(|e| format!("{key}: {e}"))
            };
            match *key {
                "bps" => self.bps[0] = rate()?,
                "read-bps" => self.bps[1] = rate()?,
                "write-bps" => self.bps[2] = rate()?,
                "iops" => self.iops[0] = rate()?,
                "read-iops" => self.iops[1] = rate()?,
                "write-iops" => self.iops[2] = rate()?,
                "burst" => {
                    self.burst = value
                        .parse::<f64>()
                        .ok()
                        .filter(|b| (0.001..=MAX_BURST).contains(b))
                        .ok_or_else(|| {
                            format!("burst {value:?} is not a number of seconds from 0.001 to 60")
                        })?;
                }
                k => {
                    return Err(format!(
                        "rate takes no key {k:?} (keys: {})",
                        KEYS.join(", ")
                    ))
                }
            }
        }
        Ok(())
    }

    /// The spec that makes these limits: `rate:bps=10M,write-iops=500`. Lifted limits and
    /// the default burst are left out.
    pub fn spec(&self) -> String {
        let mut out = String::from("rate");
        let mut sep = ':';
        let rates = self.bps.iter().chain(&self.iops);
        for (key, value) in KEYS.iter().zip(rates) {
            if *value != 0 {
                let shown = if key.ends_with("bps") {
                    compact(*value)
                } else {
                    value.to_string()
                };
                let _ = write!(out, "{sep}{key}={shown}");
                sep = ',';
            }
        }
        if self.burst != Limits::default().burst {
            let _ = write!(out, "{sep}burst={}", self.burst);
        }
        out
    }
}

/// Applies a change as `vdk set` gives it to `limits`: `rate:KEY=VALUE,...`, or `rate=BPS`
/// for `bps` alone.
pub fn change(limits: &mut Limits, setting: &str) -> std::result::Result<(), String> {
    if let Some(bps) = setting.strip_prefix("rate=") {
        return limits.set(&[("bps", bps)]);
    }
    let Some(args) = setting.strip_prefix("rate:") else {
        return Err(format!(
            "{setting:?}: only a rate filter's limits change while a disk is open \
             (rate:KEY=VALUE,... or rate=BYTES_PER_SECOND)"
        ));
    };
    let pairs = crate::key_values(args, |_| None).map_err(|e| format!("{setting:?}: {e}"))?;
    limits.set(&pairs).map_err(|e| format!("{setting:?}: {e}"))
}

/// `n` with the largest binary unit that divides it: `10M`, `1536K`, `1000`.
fn compact(n: u64) -> String {
    for (shift, unit) in [(40, 'T'), (30, 'G'), (20, 'M'), (10, 'K')] {
        if n >= 1 << shift && n.is_multiple_of(1 << shift) {
            return format!("{}{unit}", n >> shift);
        }
    }
    n.to_string()
}

/// Which way a request moves data.
#[derive(Clone, Copy, Debug)]
enum Way {
    Read = 1,
    Write = 2,
}

/// One token bucket: what it holds now (negative: in debt), as of when.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    level: f64,
    at: Instant,
}

#[derive(Debug)]
struct State {
    limits: Limits,
    /// Bytes (total, read, write) then requests (total, read, write).
    buckets: [Bucket; 6],
    /// Counts changes of the limits: a waiting request goes on when it moves.
    generation: u64,
}

impl State {
    fn new(limits: Limits, now: Instant, full: bool) -> State {
        let mut buckets = [Bucket {
            level: 0.0,
            at: now,
        }; 6];
        if full {
            for (b, rate) in buckets.iter_mut().zip(rates(&limits)) {
                b.level = rate * limits.burst;
            }
        }
        State {
            limits,
            buckets,
            generation: 0,
        }
    }
}

/// The six rates, in the buckets' order, as floats.
fn rates(l: &Limits) -> [f64; 6] {
    // Rates are far below 2^52: exact as floats.
    #[allow(clippy::cast_precision_loss)]
    let f = |v: u64| v as f64;
    [
        f(l.bps[0]),
        f(l.bps[1]),
        f(l.bps[2]),
        f(l.iops[0]),
        f(l.iops[1]),
        f(l.iops[2]),
    ]
}

/// The limits of one disk and their buckets, shared by the filter and whoever changes them
/// (the daemon's `set`); it outlives a chain opened again (after a live commit).
#[derive(Debug)]
pub struct Limiter {
    state: Mutex<State>,
    changed: Condvar,
}

impl Limiter {
    /// Limits as given, each bucket full.
    pub fn new(limits: Limits) -> Limiter {
        Limiter {
            state: Mutex::new(State::new(limits, Instant::now(), true)),
            changed: Condvar::new(),
        }
    }

    /// The limits now.
    pub fn limits(&self) -> Limits {
        lock(&self.state).limits
    }

    /// New limits, in force at once: the buckets start empty (no burst, no debt), and
    /// requests waiting under the old limits go on.
    pub fn set(&self, limits: Limits) {
        let mut s = lock(&self.state);
        let generation = s.generation + 1;
        *s = State::new(limits, Instant::now(), false);
        s.generation = generation;
        self.changed.notify_all();
    }

    /// Takes a request's cost from its buckets; waits while they are in debt.
    fn take(&self, way: Way, bytes: u64, requests: u64) {
        let mut s = lock(&self.state);
        let now = Instant::now();
        let limits = s.limits;
        let rates = rates(&limits);
        // Costs are far below 2^52: exact as floats.
        #[allow(clippy::cast_precision_loss)]
        let (bytes, requests) = (bytes as f64, requests as f64);
        let mut wait: f64 = 0.0;
        for i in [0, way as usize, 3, 3 + way as usize] {
            let rate = rates[i];
            if rate == 0.0 {
                continue;
            }
            let b = &mut s.buckets[i];
            let gained = now.saturating_duration_since(b.at).as_secs_f64() * rate;
            b.level = (b.level + gained).min(rate * limits.burst);
            b.at = now;
            b.level -= if i < 3 { bytes } else { requests };
            if b.level < 0.0 {
                wait = wait.max(-b.level / rate);
            }
        }
        if wait <= 0.0 {
            return;
        }
        let generation = s.generation;
        let until = now + Duration::from_secs_f64(wait.min(86_400.0));
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() || s.generation != generation {
                return;
            }
            s = wait_timeout(&self.changed, s, left).0;
        }
    }
}

/// The rate filter over a disk.
#[derive(Debug)]
pub struct Rate {
    inner: Arc<dyn BlockDevice>,
    limiter: Arc<Limiter>,
}

impl Rate {
    /// Limits `inner` by `limiter`.
    pub fn new(inner: Arc<dyn BlockDevice>, limiter: Arc<Limiter>) -> Rate {
        Rate { inner, limiter }
    }
}

impl Filter for Rate {
    fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }
    /// Keeps nothing sized by the disk: grows with it.
    fn grow(&self, new_size: u64) -> Result<()> {
        self.inner.grow(new_size)
    }
    /// The disk's, metered: every read must come here to be counted.
    fn info(&self) -> DiskInfo {
        let mut info = self.inner.info();
        info.caps.metered = true;
        info
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.limiter.take(Way::Read, buf.len() as u64, 1);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.limiter.take(Way::Write, buf.len() as u64, 1);
        self.inner.write_at(buf, offset, fua)
    }
    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.limiter.take(Way::Write, 0, 1);
        self.inner.trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<()> {
        self.limiter.take(Way::Write, 0, 1);
        self.inner.write_zeroes(offset, len, may_trim, fua)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdk_backends::MemoryDisk;

    fn limits(spec: &[(&str, &str)]) -> Limits {
        let mut l = Limits::default();
        l.set(spec).unwrap();
        l
    }

    #[test]
    fn specs_print_as_they_parse() {
        let l = limits(&[("read-bps", "10M"), ("write-iops", "500"), ("burst", "0.5")]);
        assert_eq!(l.spec(), "rate:read-bps=10M,write-iops=500,burst=0.5");
        assert_eq!(limits(&[("bps", "1536K")]).spec(), "rate:bps=1536K");
        assert_eq!(limits(&[("bps", "1000")]).spec(), "rate:bps=1000");
        assert_eq!(Limits::default().spec(), "rate");
        let mut off = l;
        off.set(&[("read-bps", "off"), ("write-iops", "0")])
            .unwrap();
        assert_eq!(off.spec(), "rate:burst=0.5");
        for (bad, want) in [
            (("bps", "fast"), "bps"),
            (("burst", "0"), "0.001 to 60"),
            (("burst", "61"), "0.001 to 60"),
            (("speed", "1"), "no key"),
        ] {
            let e = Limits::default().set(&[bad]).unwrap_err();
            assert!(e.contains(want), "{bad:?}: {e}");
        }
    }

    #[test]
    fn changes_read_as_vdk_set_gives_them() {
        let mut l = limits(&[("read-iops", "100")]);
        change(&mut l, "rate=10M").unwrap();
        change(&mut l, "rate:write-bps=1M,burst=2").unwrap();
        assert_eq!(l.spec(), "rate:bps=10M,write-bps=1M,read-iops=100,burst=2");
        for (bad, want) in [
            ("cache:size=1M", "only a rate filter"),
            ("rate:bps", "KEY=VALUE"),
            ("rate=fast", "bps"),
        ] {
            let e = change(&mut l, bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    /// Seconds `n` requests of `len` bytes take on `threads` threads, each thread's requests
    /// one after another.
    fn timed(rate: &dyn BlockDevice, threads: usize, n: usize, len: usize, write: bool) -> f64 {
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    let mut buf = vec![0u8; len];
                    for _ in 0..n {
                        if write {
                            rate.write_at(&buf, 0, false).unwrap();
                        } else {
                            rate.read_at(&mut buf, 0).unwrap();
                        }
                    }
                });
            }
        });
        t.elapsed().as_secs_f64()
    }

    #[test]
    fn buckets_hold_the_rate_after_the_burst_and_apart_per_way() {
        // 1 MiB/s of reads with a 0.1 s burst: 0.1 MiB free, then 0.4 MiB at the rate.
        let disk = Arc::new(MemoryDisk::new(1 << 20));
        let l = Arc::new(Limiter::new(limits(&[
            ("read-bps", "1M"),
            ("write-iops", "100"),
            ("burst", "0.1"),
        ])));
        let rate: Arc<dyn BlockDevice> = Arc::new(Rate::new(disk, Arc::clone(&l)));
        let took = timed(&*rate, 2, 10, 25 << 10, false);
        assert!((0.35..0.6).contains(&took), "500 KiB at 1 MiB/s: {took}s");
        // Writes have their own limit: 40 requests at 100/s after a 10-request burst.
        let took = timed(&*rate, 4, 10, 512, true);
        assert!((0.25..0.5).contains(&took), "40 writes at 100/s: {took}s");
        // A trim costs a write request; a flush nothing.
        let t = Instant::now();
        for _ in 0..20 {
            rate.trim(0, 4096).unwrap();
            rate.flush().unwrap();
        }
        assert!(t.elapsed().as_secs_f64() > 0.15);
    }

    #[test]
    fn a_change_applies_at_once_and_frees_waiting_requests() {
        let disk = Arc::new(MemoryDisk::new(1 << 20));
        let l = Arc::new(Limiter::new(limits(&[("bps", "1K"), ("burst", "0.001")])));
        let rate: Arc<dyn BlockDevice> = Arc::new(Rate::new(disk, Arc::clone(&l)));
        let t = Instant::now();
        std::thread::scope(|s| {
            // 64 KiB at 1 KiB/s would wait a minute.
            s.spawn(|| rate.read_at(&mut [0u8; 65536], 0).unwrap());
            std::thread::sleep(Duration::from_millis(100));
            l.set(limits(&[("bps", "off")]));
        });
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(l.limits().spec(), "rate");
        assert!(timed(&*rate, 1, 100, 65536, true) < 1.0, "no limit left");
    }
}
