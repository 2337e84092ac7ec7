//! Filters for vdk disks, and the chain they make.
//!
//! A filter is a disk that wraps a disk ([`vdk_core::Filter`]). Filters compose in the order
//! given: the first wraps the image, the next wraps that, and the front end serves the last.
//! On the command line each is `NAME[:KEY=VALUE[,KEY=VALUE...]]`:
//!
//! | filter | keys | what it does |
//! | --- | --- | --- |
//! | `readonly` | | refuses writes, trims and zero writes in the disk itself |
//! | `stats` | | counts requests, bytes, errors and latency per operation |
//! | `error` | `op`, `rate`, `errno`, `range`, `seed` | fails chosen requests at a rate |
//! | `delay` | `op`, `ms`, `range` | adds latency to chosen requests |
//! | `partition` | `number` (or `partition:N`) | shows one MBR or GPT partition as the disk |
//! | `cow` | `overlay`, `size`, `volatile` | redirects writes to an overlay; the base is only read |
//! | `cache` | `size`, `block`, `dir` | a bounded read cache in RAM, or in a file in `dir` |
//! | `blocksize` | `physical` | shows another physical block size (e.g. 512 where the image says 4096) |
//! | `rate` | `bps`, `read-bps`, `write-bps`, `iops`, `read-iops`, `write-iops`, `burst` | token-bucket limits, changeable while served ([`rate`]) |
//!
//! `op` is `read`, `write`, `flush`, `trim` or `all`, several joined by `+`; `range` is
//! `START-END` in bytes or with units (`1M-2M`); `errno` is `EIO` or `ENOSPC`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cache;
pub mod cow;
pub mod partition;
pub mod rate;
pub mod simple;

use std::sync::Arc;
use std::time::Duration;

use vdk_core::size::parse_size;
use vdk_core::BlockDevice;

pub use partition::{Partition, PartitionError};
pub use simple::{BlockSize, Injected, Injector, Kind, ReadOnly, Stats, Target};

/// A filter as the user named it.
#[derive(Clone, Debug)]
pub enum FilterSpec {
    /// `readonly`.
    ReadOnly,
    /// `stats`.
    Stats,
    /// `error`.
    Error {
        /// Requests targeted.
        target: Target,
        /// Fraction failed, 0 to 1.
        rate: f64,
        /// The error.
        error: Injected,
        /// Seed of the deterministic coin.
        seed: u64,
    },
    /// `delay`.
    Delay {
        /// Requests targeted.
        target: Target,
        /// Added latency.
        delay: Duration,
    },
    /// `partition`.
    Partition {
        /// 1-based partition number.
        number: u32,
    },
    /// `cow`.
    Cow(cow::CowOptions),
    /// `cache`.
    Cache {
        /// Bytes kept at most.
        size: u64,
        /// Block size.
        block: u64,
        /// Keep blocks in a file in this directory rather than in RAM.
        dir: Option<std::path::PathBuf>,
    },
    /// `blocksize`.
    BlockSize {
        /// The physical block size shown.
        physical: u32,
    },
    /// `rate`: its limits, shared with whoever changes them while the disk is served (and
    /// by every chain built from this spec).
    Rate(Arc<rate::Limiter>),
}

/// A filter spec that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("--filter {spec:?}: {why}")]
pub struct SpecError {
    spec: String,
    why: String,
}

/// The name of every filter [`FilterSpec::parse`] takes.
pub const FILTERS: &[&str] = &[
    "cow",
    "cache",
    "readonly",
    "stats",
    "error",
    "delay",
    "partition",
    "rate",
    "blocksize",
];

fn kinds(v: &str) -> Result<Vec<Kind>, String> {
    let mut out = Vec::new();
    for k in v.split('+') {
        match k {
            "all" => out.extend(Kind::ALL),
            _ => out.push(
                *Kind::ALL
                    .iter()
                    .find(|x| x.name() == k)
                    .ok_or_else(|| format!("unknown op {k:?}: read, write, flush, trim or all"))?,
            ),
        }
    }
    Ok(out)
}

fn range(v: &str) -> Result<(u64, u64), String> {
    let (a, b) = v
        .split_once('-')
        .ok_or_else(|| format!("range {v:?} is not START-END"))?;
    let a = parse_size(a).map_err(|e| e.to_string())?;
    let b = parse_size(b).map_err(|e| e.to_string())?;
    if b <= a {
        return Err(format!("range {v:?} is empty"));
    }
    Ok((a, b))
}

/// `KEY=VALUE,...` as pairs, in order; a word without `=` is what `bare` makes of it (a
/// filter's shorthand), or an error.
pub(crate) fn key_values<'a>(
    args: &'a str,
    bare: impl Fn(&'a str) -> Option<(&'a str, &'a str)>,
) -> Result<Vec<(&'a str, &'a str)>, String> {
    args.split(',')
        .filter(|a| !a.is_empty())
        .map(|a| {
            a.split_once('=')
                .or_else(|| bare(a))
                .ok_or_else(|| format!("{a:?} is not KEY=VALUE"))
        })
        .collect()
}

impl FilterSpec {
    /// Parses `NAME[:KEY=VALUE,...]`.
    pub fn parse(spec: &str) -> Result<FilterSpec, SpecError> {
        let fail = |why: String| SpecError {
            spec: spec.to_owned(),
            why,
        };
        let (name, args) = spec.split_once(':').unwrap_or((spec, ""));
        // `partition:2` is `partition:number=2`; `cow:volatile` a flag.
        let pairs = key_values(args, |a| match name {
            "partition" => Some(("number", a)),
            "cow" if a == "volatile" => Some(("volatile", "yes")),
            _ => None,
        })
        .map_err(fail)?;
        let known = |allowed: &[&str]| -> Result<(), SpecError> {
            match pairs.iter().find(|(k, _)| !allowed.contains(k)) {
                Some((k, _)) => Err(fail(format!(
                    "{name} takes no key {k:?} (keys: {})",
                    allowed.join(", ")
                ))),
                None => Ok(()),
            }
        };
        let get = |k: &str| {
            pairs
                .iter()
                .rev()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| *v)
        };
        let target = |default: &str| -> Result<Target, SpecError> {
            Ok(Target {
                kinds: kinds(get("op").unwrap_or(default)).map_err(fail)?,
                range: get("range")
                    .map(range)
                    .transpose()
                    .map_err(fail)?
                    .unwrap_or((0, u64::MAX)),
            })
        };
        match name {
            "readonly" => known(&[]).map(|()| FilterSpec::ReadOnly),
            "stats" => known(&[]).map(|()| FilterSpec::Stats),
            "error" => {
                known(&["op", "rate", "errno", "range", "seed"])?;
                let rate = match get("rate") {
                    None => 1.0,
                    Some(r) => r
                        .parse::<f64>()
                        .ok()
                        .filter(|r| (0.0..=1.0).contains(r))
                        .ok_or_else(|| fail(format!("rate {r:?} is not a number from 0 to 1")))?,
                };
                let error = match get("errno").unwrap_or("EIO") {
                    "EIO" | "eio" => Injected::Io,
                    "ENOSPC" | "enospc" => Injected::NoSpace,
                    e => return Err(fail(format!("errno {e:?}: EIO or ENOSPC"))),
                };
                let seed = match get("seed") {
                    None => 0x5eed,
                    Some(s) => s
                        .parse()
                        .map_err(|_| fail(format!("seed {s:?} is not a number")))?,
                };
                Ok(FilterSpec::Error {
                    target: target("read+write")?,
                    rate,
                    error,
                    seed,
                })
            }
            "delay" => {
                known(&["op", "ms", "range"])?;
                let ms = get("ms").ok_or_else(|| fail("delay needs ms=MILLISECONDS".into()))?;
                let ms: u64 = ms
                    .parse()
                    .ok()
                    .filter(|m| *m <= 60_000)
                    .ok_or_else(|| fail(format!("ms {ms:?} is not 0 to 60000")))?;
                Ok(FilterSpec::Delay {
                    target: target("all")?,
                    delay: Duration::from_millis(ms),
                })
            }
            "partition" => {
                known(&["number"])?;
                let n = get("number")
                    .ok_or_else(|| fail("partition needs a number (partition:1)".into()))?;
                let number = n
                    .parse()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| fail(format!("partition number {n:?} is not 1 or more")))?;
                Ok(FilterSpec::Partition { number })
            }
            "cow" => {
                known(&["overlay", "size", "volatile"])?;
                let size = get("size")
                    .map(|s| parse_size(s).map_err(|e| fail(e.to_string())))
                    .transpose()?;
                let overlay = match (get("overlay"), get("volatile")) {
                    (Some(_), Some(_)) => {
                        return Err(fail("an overlay is either a file or volatile".into()))
                    }
                    (Some(p), None) => cow::Overlay::Persistent(p.into()),
                    (None, _) => cow::Overlay::Volatile,
                };
                Ok(FilterSpec::Cow(cow::CowOptions { overlay, size }))
            }
            "cache" => {
                known(&["size", "block", "dir"])?;
                let num = |k: &str, default: u64| -> Result<u64, SpecError> {
                    get(k).map_or(Ok(default), |v| {
                        parse_size(v).map_err(|e| fail(e.to_string()))
                    })
                };
                let size = num("size", 64 << 20)?;
                let block = num("block", 64 << 10)?;
                if !block.is_power_of_two() || !(512..=(16 << 20)).contains(&block) || size < block
                {
                    return Err(fail(format!(
                        "block {block} must be a power of two from 512 to 16M, and size at least one block"
                    )));
                }
                Ok(FilterSpec::Cache {
                    size,
                    block,
                    dir: get("dir").map(Into::into),
                })
            }
            "blocksize" => {
                known(&["physical"])?;
                let p = get("physical")
                    .ok_or_else(|| fail("blocksize needs physical=SIZE (e.g. 512)".into()))?;
                let physical = parse_size(p)
                    .map_err(|e| e.to_string())
                    .and_then(BlockSize::check)
                    .map_err(fail)?;
                Ok(FilterSpec::BlockSize { physical })
            }
            "rate" => {
                let mut limits = rate::Limits::default();
                limits.set(&pairs).map_err(fail)?;
                Ok(FilterSpec::Rate(Arc::new(rate::Limiter::new(limits))))
            }
            other => Err(fail(format!(
                "unknown filter {other:?} (filters: {})",
                FILTERS.join(", ")
            ))),
        }
    }
}

/// A disk with its filters applied, and handles to the filters callers read from.
#[derive(Debug)]
pub struct Chain {
    /// The outermost disk: what front ends serve.
    pub device: Arc<dyn BlockDevice>,
    /// The last stats filter in the chain, if any.
    pub stats: Option<Arc<Stats>>,
}

/// Why a chain cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The partition filter found no partition.
    #[error(transparent)]
    Partition(#[from] PartitionError),
    /// The blocksize filter does not fit the disk.
    #[error("blocksize: {0}")]
    BlockSize(String),
    /// The overlay cannot be made or opened.
    #[error("cow overlay: {0}")]
    Cow(#[from] std::io::Error),
}

/// Whether `specs` redirect writes (so the image below should be opened read-only).
pub fn redirects_writes(specs: &[FilterSpec]) -> bool {
    specs.iter().any(|s| matches!(s, FilterSpec::Cow(_)))
}

/// Applies `specs` in order over `device`.
pub fn apply(device: Arc<dyn BlockDevice>, specs: &[FilterSpec]) -> Result<Chain, ChainError> {
    apply_over(device, None, specs)
}

/// Applies `specs` in order over `device`, which is the image file `base` (recorded by a
/// cow overlay that sits directly on it, so that qemu-img can read the overlay too).
pub fn apply_over(
    device: Arc<dyn BlockDevice>,
    base: Option<cow::BaseFile>,
    specs: &[FilterSpec],
) -> Result<Chain, ChainError> {
    let mut device = device;
    let mut stats = None;
    for (i, spec) in specs.iter().enumerate() {
        device = match spec {
            FilterSpec::ReadOnly => Arc::new(ReadOnly::new(device)),
            FilterSpec::Stats => {
                let s = Arc::new(Stats::new(device));
                stats = Some(Arc::clone(&s));
                s
            }
            FilterSpec::Error {
                target,
                rate,
                error,
                seed,
            } => Arc::new(Injector::error(
                device,
                target.clone(),
                *rate,
                *error,
                *seed,
            )),
            FilterSpec::Delay { target, delay } => {
                Arc::new(Injector::delay(device, target.clone(), *delay))
            }
            FilterSpec::Partition { number } => Arc::new(Partition::new(device, *number)?),
            // Only a cow right on the image file can record it as the overlay's backing file.
            FilterSpec::Cow(opts) => cow::cow(device, base.as_ref().filter(|_| i == 0), opts)?,
            FilterSpec::Cache { size, block, dir } => {
                Arc::new(cache::Cache::new(device, *size, *block, dir.as_deref())?)
            }
            FilterSpec::Rate(limiter) => Arc::new(rate::Rate::new(device, Arc::clone(limiter))),
            FilterSpec::BlockSize { physical } => {
                Arc::new(BlockSize::new(device, *physical).map_err(ChainError::BlockSize)?)
            }
        };
    }
    Ok(Chain { device, stats })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdk_backends::MemoryDisk;
    use vdk_core::conformance;

    fn specs(list: &[&str]) -> Vec<FilterSpec> {
        list.iter().map(|s| FilterSpec::parse(s).unwrap()).collect()
    }

    #[test]
    fn every_filter_alone_and_stacked_conforms() {
        // Filters that change nothing a client can see, each alone and all together; the
        // injectors at rate 0 (they must still pass everything through correctly).
        for chain in [
            vec!["stats"],
            vec!["error:op=all,rate=0"],
            vec!["delay:op=flush,ms=0"],
            vec![
                "stats",
                "error:op=read+write,rate=0",
                "delay:op=all,ms=0",
                "stats",
            ],
            vec!["cow", "stats", "error:op=all,rate=0"],
            vec!["stats", "cow:volatile", "delay:op=flush,ms=0"],
            vec!["cache:size=1M,block=4K"],
            vec!["cache:size=256K,block=64K,dir=/tmp"],
            vec!["cow", "cache:size=2M", "stats"],
            vec!["rate", "stats"],
            vec!["rate:bps=1G,iops=1000000,burst=60"],
            vec!["blocksize:physical=512", "stats"],
        ] {
            let s = specs(&chain);
            conformance::run(&|| {
                apply(Arc::new(MemoryDisk::new(conformance::MIN_SIZE)), &s)
                    .unwrap()
                    .device
            });
        }
    }

    #[test]
    fn blocksize_shows_its_size_and_refuses_one_below_the_logical_block() {
        /// A disk of 2048-byte sectors (as an ISO is).
        #[derive(Debug)]
        struct Sectors(Arc<dyn BlockDevice>);
        impl vdk_core::Filter for Sectors {
            fn inner(&self) -> &Arc<dyn BlockDevice> {
                &self.0
            }
            fn info(&self) -> vdk_core::DiskInfo {
                let mut i = self.0.info();
                i.logical_block_size = 2048;
                i.physical_block_size = 2048;
                i
            }
        }
        let mem: Arc<dyn BlockDevice> = Arc::new(MemoryDisk::new(1 << 20));
        let below = mem.info();
        let shown = apply(Arc::clone(&mem), &specs(&["blocksize:physical=512"]))
            .unwrap()
            .device
            .info();
        assert_eq!(shown.physical_block_size, 512);
        assert_eq!((shown.size, shown.caps), (below.size, below.caps));
        let cd: Arc<dyn BlockDevice> = Arc::new(Sectors(mem));
        let e = apply(cd, &specs(&["blocksize:physical=1K"]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("below the disk's logical block size 2048"),
            "{e}"
        );
    }

    #[test]
    fn every_listed_filter_parses() {
        // The list help texts and errors show is the list parse takes: no more, no less.
        for name in FILTERS {
            let spec = match *name {
                "delay" => "delay:ms=1".to_owned(),
                "partition" => "partition:1".to_owned(),
                "blocksize" => "blocksize:physical=512".to_owned(),
                n => n.to_owned(),
            };
            assert!(FilterSpec::parse(&spec).is_ok(), "{spec}");
        }
    }

    #[test]
    fn parse_errors_name_the_problem() {
        for (spec, want) in [
            ("nosuch", "unknown filter"),
            ("nosuch", "cow, cache, readonly"),
            ("error:rate=2", "0 to 1"),
            ("error:op=sideways", "unknown op"),
            ("error:errno=EPERM", "EIO or ENOSPC"),
            ("delay", "needs ms"),
            ("delay:ms=1,frob=2", "no key"),
            ("partition", "needs a number"),
            ("partition:0", "1 or more"),
            ("error:range=5-1", "empty"),
            ("readonly:x", "KEY=VALUE"),
            ("rate:speed=1", "no key"),
            ("rate:bps=x", "bps"),
            ("blocksize", "needs physical"),
            ("blocksize:physical=1000", "power of two"),
            ("blocksize:physical=128K", "power of two"),
            ("blocksize:logical=512", "no key"),
        ] {
            let e = FilterSpec::parse(spec).unwrap_err().to_string();
            assert!(e.contains(want), "{spec}: {e}");
        }
    }

    #[test]
    fn readonly_refuses_below_the_protocol() {
        let c = apply(Arc::new(MemoryDisk::new(1 << 20)), &specs(&["readonly"])).unwrap();
        assert!(c.device.info().read_only);
        assert!(matches!(
            c.device.write_at(&[1], 0, false),
            Err(vdk_core::Error::ReadOnly)
        ));
        assert!(matches!(
            c.device.trim(0, 512),
            Err(vdk_core::Error::ReadOnly)
        ));
        let mut b = [0u8; 1];
        c.device.read_at(&mut b, 0).unwrap();
    }

    #[test]
    fn error_injects_at_the_rate_asked_and_only_where_asked() {
        let disk = Arc::new(MemoryDisk::new(1 << 20));
        let c = apply(
            disk,
            &specs(&["error:op=write,rate=0.5,range=4096-8192,errno=ENOSPC"]),
        )
        .unwrap();
        let mut failed = 0;
        for _ in 0..1000 {
            match c.device.write_at(&[1; 512], 4096, false) {
                Err(vdk_core::Error::NoSpace) => failed += 1,
                Err(e) => panic!("{e}"),
                Ok(()) => {}
            }
        }
        assert!((350..650).contains(&failed), "about half: {failed}");
        for _ in 0..100 {
            c.device.write_at(&[1; 512], 0, false).unwrap();
            let mut b = [0u8; 512];
            c.device.read_at(&mut b, 4096).unwrap();
        }
    }

    #[test]
    fn stats_count_what_passes() {
        let c = apply(Arc::new(MemoryDisk::new(1 << 20)), &specs(&["stats"])).unwrap();
        c.device.write_at(&[1; 4096], 0, false).unwrap();
        let mut b = [0u8; 100];
        c.device.read_at(&mut b, 0).unwrap();
        c.device.flush().unwrap();
        let _ = c.device.read_at(&mut b, 1 << 20);
        let s = c.stats.unwrap().snapshot();
        let get = |k: Kind| s.iter().find(|(x, _)| *x == k).unwrap().1.clone();
        assert_eq!((get(Kind::Write).count, get(Kind::Write).bytes), (1, 4096));
        assert_eq!(
            (
                get(Kind::Read).count,
                get(Kind::Read).bytes,
                get(Kind::Read).errors
            ),
            (2, 100, 1)
        );
        assert_eq!(get(Kind::Flush).count, 1);
        assert_eq!(get(Kind::Read).buckets.iter().sum::<u64>(), 2);
    }
}

#[cfg(test)]
mod cache_tests {
    use super::*;
    use std::time::{Duration, Instant};
    use vdk_backends::MemoryDisk;

    #[test]
    fn a_cache_serves_repeated_reads_without_the_slow_disk_and_stays_bounded() {
        let slow = FilterSpec::parse("delay:op=read,ms=20").unwrap();
        let cache = FilterSpec::parse("cache:size=256K,block=64K").unwrap();
        let disk = Arc::new(MemoryDisk::new(4 << 20));
        disk.write_at(&[7; 4096], 0, false).unwrap();
        let c = apply(disk, &[slow, cache]).unwrap().device;
        let mut b = [0u8; 4096];
        c.read_at(&mut b, 0).unwrap();
        let t = Instant::now();
        for _ in 0..10 {
            assert!(
                c.lend().unwrap().try_read_at(&mut b, 0).unwrap(),
                "a hit is served at once"
            );
            c.read_at(&mut b[..1000], 100).unwrap();
            c.read_at(&mut b, 0).unwrap();
        }
        assert!(
            t.elapsed() < Duration::from_millis(20),
            "hits never reach the slow disk"
        );
        assert!(b.iter().all(|x| *x == 7));
        // A write goes through and the next read sees it.
        c.write_at(&[9; 10], 50, false).unwrap();
        c.read_at(&mut b, 0).unwrap();
        assert_eq!(&b[50..60], &[9; 10]);
        // Reading 1 MiB keeps at most 256 KiB.
        let mut big = vec![0u8; 1 << 20];
        c.read_at(&mut big, 1 << 20).unwrap();
        let mut probe = [0u8; 512];
        let cached = (0..16u64)
            .filter(|i| {
                c.lend()
                    .unwrap()
                    .try_read_at(&mut probe, (1 << 20) + i * (64 << 10))
                    .unwrap()
            })
            .count();
        assert!(
            cached <= 4,
            "{cached} blocks of 64 KiB kept in a 256 KiB cache"
        );
    }
}
