//! The generic conformance suite: what every [`BlockDevice`] must do, as one function that an
//! implementation's own tests call with a constructor.
//!
//! ```text
//! #[test]
//! fn memory_disk_conforms() {
//!     vdk_core::conformance::run(&|| Arc::new(MemoryDisk::new(conformance::MIN_SIZE)));
//! }
//! ```
//!
//! The constructor must return a fresh, writable, all-zero device of at least [`MIN_SIZE`]
//! bytes each time it is called. Each check panics with a message naming what failed.

// Test sizes here are small constants: the casts between them cannot truncate.
#![allow(clippy::cast_possible_truncation)]

use std::sync::Arc;
use std::thread;

use crate::{BlockDevice, Error, ExtentKind, Piece};

/// The smallest device the suite needs: 8 MiB.
pub const MIN_SIZE: u64 = 8 << 20;

/// A constructor of fresh devices.
pub type MakeDevice<'a> = &'a (dyn Fn() -> Arc<dyn BlockDevice> + Sync);

/// Runs every check against devices from `make`.
pub fn run(make: MakeDevice<'_>) {
    unwritten_reads_zero(make());
    read_your_writes_unaligned(make());
    out_of_range_is_an_error(make());
    zero_length_requests_succeed(make());
    write_zeroes_reads_zero(make());
    trim_reads_zero(make());
    extents_agree_with_data(make());
    flush_succeeds(make());
    concurrent_disjoint_writers(make());
    fast_paths_agree_with_read_and_write(make());
}

/// Runs the checks a read-only device must pass against devices from `make` (fresh, all
/// zero, of at least [`MIN_SIZE`] bytes): reads of unwritten data, bounds, extents, fast-path
/// reads, and every kind of write refused with [`Error::ReadOnly`] (or, for a range past the
/// end, [`Error::OutOfRange`]) without changing a byte.
pub fn run_read_only(make: MakeDevice<'_>) {
    unwritten_reads_zero(make());
    writes_are_refused(make());
    extents_cover_the_range(make());
    let dev = make();
    dev.read_at(&mut [], dev.info().size)
        .expect("empty read at the end");
    fast_reads_agree(&*dev);
}

/// Every write of a read-only device fails, and the device still reads as before.
pub fn writes_are_refused(dev: Arc<dyn BlockDevice>) {
    assert!(dev.info().read_only, "a read-only device says so in info()");
    let refused = |what: &str, r: crate::Result<()>| {
        assert!(
            matches!(r, Err(Error::ReadOnly)),
            "{what} on a read-only device: {r:?}"
        );
    };
    refused("write_at", dev.write_at(&[1; 4096], 0, false));
    refused("write_at with FUA", dev.write_at(&[1; 4096], 4096, true));
    refused("write_zeroes", dev.write_zeroes(0, 4096, true, false));
    if let Some(lend) = dev.lend() {
        let r = lend.try_write_at(&[1; 4096], 0);
        assert!(
            matches!(r, Err(Error::ReadOnly) | Ok(false)),
            "try_write_at on a read-only device: {r:?}"
        );
        if let Some(unit) = lend.write_unit() {
            let buf: Arc<[u8]> = vec![1u8; unit].into();
            assert!(lend.write_owned(0, vec![buf]).is_err(), "write_owned");
        }
    }
    assert_zero(&*dev, 0, 16 << 10, "after refused writes");
}

/// Extents of a fresh device cover each range asked for exactly, and runs said to read as
/// zero do.
pub fn extents_cover_the_range(dev: Arc<dyn BlockDevice>) {
    let size = dev.info().size;
    let bs = u64::from(dev.info().logical_block_size);
    for (offset, len) in [(0, size), (12_345 / bs * bs, 3 << 20)] {
        let map = dev.extents(offset, len).expect("extents");
        assert_eq!(
            (map.offset(), map.len()),
            (offset, len),
            "map of {offset}+{len}"
        );
        for (at, run) in map.iter().filter(|(_, r)| r.kind.reads_zero()) {
            let n = run.len.min(64 << 10) / bs * bs;
            assert_zero(&*dev, at, n as usize, "start of a zero extent");
        }
    }
}

/// The fast paths that read give what `read_at` gives.
fn fast_reads_agree(dev: &dyn BlockDevice) {
    let Some(lend) = dev.lend() else {
        return;
    };
    let want = read(dev, 0, 300 << 10);
    let mut buf = vec![0u8; 64 << 10];
    if lend.try_read_at(&mut buf, 4096).expect("try_read_at") {
        assert!(buf[..] == want[4096..4096 + buf.len()], "try_read_at data");
    }
    if let Some(pieces) = lend.read_shared(0, 300 << 10).expect("read_shared") {
        assert!(joined(&pieces) == want, "read_shared differs from read_at");
    }
}

/// The bytes that `pieces` stand for, zeroes included.
fn joined(pieces: &[Piece]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in pieces {
        match p {
            Piece::Data(b) => out.extend_from_slice(b),
            Piece::Zero(n) => out.resize(out.len() + n, 0),
        }
    }
    out
}

/// A byte that depends on its offset and a seed, so a misplaced read shows.
pub fn pattern_byte(offset: u64, seed: u8) -> u8 {
    let x = offset.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56;
    (x as u8) ^ seed ^ 0x5a
}

/// `len` pattern bytes starting at `offset`.
pub fn pattern(offset: u64, len: usize, seed: u8) -> Vec<u8> {
    (0..len as u64)
        .map(|i| pattern_byte(offset + i, seed))
        .collect()
}

fn read(dev: &dyn BlockDevice, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xEE; len];
    dev.read_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("read of {len} bytes at {offset} failed: {e}"));
    buf
}

fn assert_zero(dev: &dyn BlockDevice, offset: u64, len: usize, what: &str) {
    let buf = read(dev, offset, len);
    if let Some(i) = buf.iter().position(|&b| b != 0) {
        panic!(
            "{what}: byte at {} is {:#x}, not zero",
            offset + i as u64,
            buf[i]
        );
    }
}

/// A new device reads as zeroes everywhere.
pub fn unwritten_reads_zero(dev: Arc<dyn BlockDevice>) {
    let size = dev.info().size;
    assert!(
        size >= MIN_SIZE,
        "device of {size} bytes is smaller than MIN_SIZE"
    );
    assert_zero(&*dev, 0, 64 << 10, "start of a new disk");
    assert_zero(&*dev, size - 4096, 4096, "end of a new disk");
    let bs = u64::from(dev.info().logical_block_size);
    let odd = (size / 2 + 13) / bs * bs;
    assert_zero(&*dev, odd, bs.max(1000) as usize, "middle of a new disk");
}

/// Writes at odd offsets and lengths read back exactly, and touch nothing around them.
pub fn read_your_writes_unaligned(dev: Arc<dyn BlockDevice>) {
    let bs = u64::from(dev.info().logical_block_size);
    // Offsets and lengths that cross chunk and page boundaries, rounded to the block size.
    for (i, &(offset, len)) in [
        (0u64, 512usize),
        (4095, 3),
        (65_530, 70_000),
        (1 << 20, 1),
        (3 << 20, 1 << 20),
    ]
    .iter()
    .enumerate()
    {
        let offset = offset / bs * bs;
        let len = (len as u64).div_ceil(bs) * bs;
        let data = pattern(offset, len as usize, i as u8);
        dev.write_at(&data, offset, i % 2 == 0).expect("write");
        assert_eq!(
            read(&*dev, offset, len as usize),
            data,
            "read back at {offset}+{len}"
        );
    }
    // The bytes just past the first write are still zero.
    let first_len = 512u64.div_ceil(bs) * bs;
    assert_zero(
        &*dev,
        first_len,
        bs.max(512) as usize,
        "bytes after a write",
    );
}

/// Requests past the end fail with `OutOfRange` and change nothing.
pub fn out_of_range_is_an_error(dev: Arc<dyn BlockDevice>) {
    let size = dev.info().size;
    let bs = u64::from(dev.info().logical_block_size);
    let mut buf = vec![0u8; 2 * bs as usize];
    let past = size - bs;
    assert!(
        matches!(dev.read_at(&mut buf, past), Err(Error::OutOfRange { .. })),
        "read across the end"
    );
    assert!(
        matches!(
            dev.write_at(&[1; 4096], size, false),
            Err(Error::OutOfRange { .. })
        ),
        "write past the end"
    );
    assert!(
        matches!(
            dev.write_zeroes(u64::MAX - 1, 4096, true, false),
            Err(Error::OutOfRange { .. })
        ),
        "write zeroes at an overflowing offset"
    );
    assert!(dev.extents(size, 1).is_err(), "extents past the end");
    assert_zero(&*dev, past, bs as usize, "last block after refused writes");
}

/// Zero-length requests inside the disk succeed.
pub fn zero_length_requests_succeed(dev: Arc<dyn BlockDevice>) {
    let size = dev.info().size;
    dev.read_at(&mut [], size).expect("empty read at the end");
    dev.write_at(&[], 0, false).expect("empty write");
}

/// Write-zeroes, with and without permission to trim, reads back as zeroes.
pub fn write_zeroes_reads_zero(dev: Arc<dyn BlockDevice>) {
    let bs = u64::from(dev.info().logical_block_size).max(512);
    let data = pattern(0, 1 << 20, 7);
    dev.write_at(&data, 0, false).expect("write");
    dev.write_zeroes(bs, 64 << 10, true, false)
        .expect("write zeroes may trim");
    dev.write_zeroes(256 << 10, 75 * bs, false, true)
        .expect("write zeroes no hole");
    assert_zero(&*dev, bs, 64 << 10, "zeroed range (may trim)");
    assert_zero(&*dev, 256 << 10, 75 * bs as usize, "zeroed range (no hole)");
    assert_eq!(
        read(&*dev, 0, bs as usize),
        data[..bs as usize],
        "data before the zeroes"
    );
    let after = (256 << 10) + 75 * bs as usize;
    assert_eq!(
        read(&*dev, after as u64, 4096),
        data[after..after + 4096],
        "data after"
    );
}

/// Trim, where supported, reads back as zeroes; otherwise it is `Unsupported`.
pub fn trim_reads_zero(dev: Arc<dyn BlockDevice>) {
    let data = pattern(0, 2 << 20, 9);
    dev.write_at(&data, 0, false).expect("write");
    let result = dev.trim(4096, 1 << 20);
    if !dev.info().caps.trim {
        assert!(
            matches!(result, Err(Error::Unsupported(_))),
            "trim without the capability"
        );
        return;
    }
    result.expect("trim");
    assert_zero(&*dev, 4096, 1 << 20, "trimmed range");
    assert_eq!(read(&*dev, 0, 4096), data[..4096], "data before the trim");
    let after = 4096 + (1 << 20);
    assert_eq!(
        read(&*dev, after as u64, 4096),
        data[after..after + 4096],
        "data after the trim"
    );
}

/// Extents cover the range exactly, and every run said to read as zero does.
pub fn extents_agree_with_data(dev: Arc<dyn BlockDevice>) {
    let size = dev.info().size;
    dev.write_at(&pattern(1 << 20, 128 << 10, 3), 1 << 20, false)
        .expect("write");
    dev.write_zeroes(4 << 20, 1 << 20, true, false)
        .expect("write zeroes");
    let bs = u64::from(dev.info().logical_block_size);
    let odd = 12_345 / bs * bs;
    for (offset, len) in [(0, size), (1 << 20, 4096), (odd, 3 << 20)] {
        let map = dev.extents(offset, len).expect("extents");
        assert_eq!(map.offset(), offset, "map start");
        assert_eq!(map.len(), len, "map covers the range {offset}+{len}");
        let mut data_seen = false;
        for (at, run) in map.iter() {
            if run.kind.reads_zero() {
                // Check the start and end of each zero run; whole runs can be huge.
                let n = run.len.min(64 << 10) / bs * bs;
                assert_zero(&*dev, at, n as usize, "start of a zero extent");
                assert_zero(&*dev, at + run.len - n, n as usize, "end of a zero extent");
            } else {
                data_seen |= at <= (1 << 20) && at + run.len > (1 << 20);
            }
        }
        if offset <= 1 << 20 && offset + len > 1 << 20 {
            assert!(data_seen, "written data at 1 MiB must be a data extent");
        }
    }
    let with_caps = dev.info().caps.extents;
    if with_caps {
        let map = dev
            .extents(6 << 20, 1 << 20)
            .expect("extents of unwritten range");
        assert!(
            map.runs().iter().all(|r| r.kind != ExtentKind::Data),
            "an unwritten range of a sparse device is a hole: {map:?}"
        );
    }
}

/// Flush succeeds on a writable device, after writes and with none.
pub fn flush_succeeds(dev: Arc<dyn BlockDevice>) {
    dev.flush().expect("flush of a clean device");
    dev.write_at(&[1; 4096], 0, false).expect("write");
    dev.flush().expect("flush after a write");
}

/// Eight threads write interleaved disjoint stripes at once; every stripe reads back intact.
pub fn concurrent_disjoint_writers(dev: Arc<dyn BlockDevice>) {
    const THREADS: u64 = 8;
    const STRIPE: u64 = 12_288; // three pages: stripes share chunk and page boundaries
    const ROUNDS: u64 = 40;
    thread::scope(|s| {
        for t in 0..THREADS {
            let dev = &dev;
            s.spawn(move || {
                for r in 0..ROUNDS {
                    let offset = (r * THREADS + t) * STRIPE;
                    let data = pattern(offset, STRIPE as usize, t as u8);
                    dev.write_at(&data, offset, false)
                        .expect("concurrent write");
                }
            });
        }
    });
    for i in 0..THREADS * ROUNDS {
        let offset = i * STRIPE;
        let want = pattern(offset, STRIPE as usize, (i % THREADS) as u8);
        assert!(
            read(&*dev, offset, STRIPE as usize) == want,
            "stripe {i} at {offset}"
        );
    }
}

/// The optional fast paths of [`BlockDevice::lend`] (`try_read_at`, `try_write_at`,
/// `read_shared`, `write_owned`) give the same bytes as `read_at` and `write_at`, where a
/// device has them.
pub fn fast_paths_agree_with_read_and_write(dev: Arc<dyn BlockDevice>) {
    let Some(lend) = dev.lend() else {
        return;
    };
    let bs = u64::from(dev.info().logical_block_size).max(4096);
    let data = pattern(0, 256 << 10, 11);
    dev.write_at(&data, 0, false).expect("write");
    let mut buf = vec![0u8; 64 << 10];
    if lend.try_read_at(&mut buf, bs).expect("try_read_at") {
        assert!(
            buf[..] == data[bs as usize..bs as usize + buf.len()],
            "try_read_at data"
        );
    }
    let new = pattern(bs, 8192, 12);
    if lend.try_write_at(&new, bs).expect("try_write_at") {
        assert_eq!(read(&*dev, bs, 8192), new, "after try_write_at");
    }
    let want = read(&*dev, 0, 300 << 10);
    if let Some(pieces) = lend.read_shared(0, 300 << 10).expect("read_shared") {
        assert!(joined(&pieces) == want, "read_shared differs from read_at");
        dev.write_at(&[0xAB; 4096], 0, false)
            .expect("write over a lent buffer");
        let mut again = Vec::new();
        for p in &pieces {
            if let Piece::Data(b) = p {
                again.extend_from_slice(b);
            }
        }
        assert!(
            again[..4096] == want[..4096],
            "a lent buffer changed under its reader"
        );
    }
    if let Some(unit) = lend.write_unit() {
        let block = pattern(unit as u64, unit, 13);
        let buf: Arc<[u8]> = block.clone().into();
        lend.write_owned(unit as u64, vec![buf])
            .expect("write_owned");
        assert!(read(&*dev, unit as u64, unit) == block, "after write_owned");
    }
}
