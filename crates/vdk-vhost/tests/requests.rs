//! virtio-blk requests as a guest lays them out, good and bad, against real guest memory
//! (vm-memory's mmap) and a RAM disk: every malformed chain gets an error status or, when
//! not even the status byte can be trusted, nothing written; the disk is never touched by a
//! request that fails its checks.
#![cfg(target_os = "linux")]
#![allow(clippy::cast_possible_truncation)] // guest addresses and lengths here are small

use std::sync::atomic::{AtomicU64, Ordering};
use vdk_backends::MemoryDisk;
use vdk_core::BlockDevice;

use vdk_core::{DiskInfo, Lend};
use vdk_vhost::fuzzing::{answer, answer_fast_first};

const IN: u32 = 0;
const OUT: u32 = 1;
const FLUSH: u32 = 4;
const GET_ID: u32 = 8;
const DISCARD: u32 = 11;
const WRITE_ZEROES: u32 = 13;
const OK: u8 = 0;
const IOERR: u8 = 1;
const UNSUPP: u8 = 2;

/// Descriptors: guest address, length, device-writable.
type Chain = Vec<(u64, u32, bool)>;

const RAM: usize = 64 << 10;
const HDR: u64 = 0x1000;
const DATA: u64 = 0x2000;
const STATUS: u64 = 0x8000;

/// Guest RAM with a request header at HDR, `payload` at DATA, and 0xff as the status.
fn ram(kind: u32, sector: u64, payload: &[u8]) -> Vec<u8> {
    let mut ram = vec![0u8; RAM];
    ram[HDR as usize..HDR as usize + 4].copy_from_slice(&kind.to_le_bytes());
    ram[HDR as usize + 8..HDR as usize + 16].copy_from_slice(&sector.to_le_bytes());
    ram[DATA as usize..DATA as usize + payload.len()].copy_from_slice(payload);
    ram[STATUS as usize] = 0xff;
    ram
}

fn disk() -> MemoryDisk {
    let d = MemoryDisk::new(1 << 20);
    let bytes: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    d.write_at(&bytes, 0, false).unwrap();
    d
}

/// The standard three-part chain: header, data of `len` (writable for reads), status.
fn chain(len: u32, data_writable: bool) -> Chain {
    vec![
        (HDR, 16, false),
        (DATA, len, data_writable),
        (STATUS, 1, true),
    ]
}

#[test]
fn reads_and_writes_land_in_guest_memory_and_on_the_disk() {
    let d = disk();
    let (used, after) = answer(&ram(IN, 2, &[]), &chain(1024, true), &d, false);
    assert_eq!(used, 1025);
    assert_eq!(after[STATUS as usize], OK);
    let mut want = vec![0u8; 1024];
    d.read_at(&mut want, 1024).unwrap();
    assert_eq!(&after[DATA as usize..DATA as usize + 1024], &want[..]);

    let payload = vec![0xabu8; 4096];
    let (used, after) = answer(&ram(OUT, 8, &payload), &chain(4096, false), &d, false);
    assert_eq!((used, after[STATUS as usize]), (1, OK));
    let mut back = vec![0u8; 4096];
    d.read_at(&mut back, 4096).unwrap();
    assert_eq!(back, payload);

    // The header split over two descriptors, the data over three: the same read.
    let split = vec![
        (HDR, 8, false),
        (HDR + 8, 8, false),
        (DATA, 512, true),
        (DATA + 512, 512, true),
        (DATA + 4096, 1024, true),
        (STATUS, 1, true),
    ];
    let (used, after) = answer(&ram(IN, 0, &[]), &split, &d, false);
    assert_eq!((used, after[STATUS as usize]), (2049, OK));
    let mut want = vec![0u8; 2048];
    d.read_at(&mut want, 0).unwrap();
    assert_eq!(&after[DATA as usize..DATA as usize + 1024], &want[..1024]);
    assert_eq!(
        &after[DATA as usize + 4096..DATA as usize + 5120],
        &want[1024..]
    );
}

#[test]
fn requests_outside_the_disk_or_guest_memory_fail_with_an_error_status() {
    let d = disk();
    let before = {
        let mut b = vec![0u8; 1 << 20];
        d.read_at(&mut b, 0).unwrap();
        b
    };
    let payload = vec![0x55u8; 4096];
    let cases: Vec<(&str, Vec<u8>, Chain)> = vec![
        ("past the end", ram(OUT, 2047, &payload), chain(4096, false)),
        (
            "a sector that overflows",
            ram(OUT, u64::MAX / 256, &payload),
            chain(512, false),
        ),
        (
            "not whole sectors",
            ram(OUT, 0, &payload),
            chain(1000, false),
        ),
        (
            "data outside guest memory",
            ram(OUT, 0, &payload),
            vec![
                (HDR, 16, false),
                (RAM as u64 - 512, 4096, false),
                (STATUS, 1, true),
            ],
        ),
        (
            "data at an address that wraps",
            ram(OUT, 0, &payload),
            vec![
                (HDR, 16, false),
                (u64::MAX - 100, 512, false),
                (STATUS, 1, true),
            ],
        ),
        (
            "a write into device-writable buffers",
            ram(OUT, 0, &payload),
            chain(512, true),
        ),
    ];
    for (what, mem, ch) in cases {
        let (used, after) = answer(&mem, &ch, &d, false);
        assert_eq!(after[STATUS as usize], IOERR, "{what}");
        assert_eq!(used, 1, "{what}");
    }
    // Reads that fail write no data either.
    let (used, after) = answer(&ram(IN, 2047, &[]), &chain(4096, true), &d, false);
    assert_eq!((used, after[STATUS as usize]), (1, IOERR));
    assert!(after[DATA as usize..DATA as usize + 4096]
        .iter()
        .all(|&b| b == 0));
    let mut now = vec![0u8; 1 << 20];
    d.read_at(&mut now, 0).unwrap();
    assert!(now == before, "a failed request changed the disk");
}

#[test]
fn chains_of_no_valid_shape_are_returned_with_nothing_written() {
    let d = disk();
    let mem = ram(IN, 0, &[]);
    let cases: Vec<(&str, Chain)> = vec![
        ("empty", vec![]),
        ("only a header", vec![(HDR, 16, false)]),
        (
            "a readable last descriptor",
            vec![(HDR, 16, false), (STATUS, 1, false)],
        ),
        (
            "a status outside memory",
            vec![(HDR, 16, false), (RAM as u64, 1, true)],
        ),
        ("a short header", vec![(HDR, 8, false), (STATUS, 1, true)]),
        (
            "a writable header",
            vec![(HDR, 16, true), (STATUS, 1, true)],
        ),
        (
            "a header outside memory",
            vec![(RAM as u64 + 4096, 16, false), (STATUS, 1, true)],
        ),
        (
            "data of both directions",
            vec![
                (HDR, 16, false),
                (DATA, 512, true),
                (DATA + 512, 512, false),
                (STATUS, 1, true),
            ],
        ),
        (
            "a zero-length status",
            vec![(HDR, 16, false), (STATUS, 0, true)],
        ),
    ];
    for (what, ch) in cases {
        let (used, after) = answer(&mem, &ch, &d, false);
        assert_eq!(used, 0, "{what}");
        assert_eq!(after, mem, "{what}: guest memory changed");
    }
}

#[test]
fn flush_get_id_and_unknown_types() {
    let d = disk();
    let (used, after) = answer(
        &ram(FLUSH, 0, &[]),
        &[(HDR, 16, false), (STATUS, 1, true)],
        &d,
        false,
    );
    assert_eq!((used, after[STATUS as usize]), (1, OK));
    let (used, after) = answer(&ram(GET_ID, 0, &[]), &chain(20, true), &d, false);
    assert_eq!((used, after[STATUS as usize]), (21, OK));
    assert_eq!(&after[DATA as usize..DATA as usize + 6], b"fuzz\0\0");
    for kind in [2, 10, 14, 99, u32::MAX] {
        let (used, after) = answer(&ram(kind, 0, &[]), &chain(512, false), &d, false);
        assert_eq!((used, after[STATUS as usize]), (1, UNSUPP), "type {kind}");
    }
}

/// One discard / write-zeroes range.
fn range(sector: u64, count: u32, flags: u32) -> Vec<u8> {
    let mut r = sector.to_le_bytes().to_vec();
    r.extend_from_slice(&count.to_le_bytes());
    r.extend_from_slice(&flags.to_le_bytes());
    r
}

#[test]
fn discard_and_write_zeroes_check_every_range_first() {
    let d = disk();
    let mut two = range(0, 8, 0);
    two.extend(range(16, 8, 1));
    let (used, after) = answer(&ram(WRITE_ZEROES, 0, &two), &chain(32, false), &d, false);
    assert_eq!((used, after[STATUS as usize]), (1, OK));
    let mut b = vec![0u8; 12288];
    d.read_at(&mut b, 0).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 0));
    assert!(b[4096..8192].iter().any(|&x| x != 0));
    assert!(b[8192..].iter().all(|&x| x == 0));
    // The second range is past the end: the first is not run either.
    let mut bad = range(100, 8, 0);
    bad.extend(range(4096, 8, 0));
    let (_, after) = answer(&ram(WRITE_ZEROES, 0, &bad), &chain(32, false), &d, false);
    assert_eq!(after[STATUS as usize], IOERR);
    let mut b = vec![0u8; 4096];
    d.read_at(&mut b, 100 * 512).unwrap();
    assert!(b.iter().any(|&x| x != 0), "a range of a failed request ran");
    // Discard's unmap flag is reserved; unknown flags refused; lengths not whole ranges.
    let (_, after) = answer(
        &ram(DISCARD, 0, &range(0, 8, 1)),
        &chain(16, false),
        &d,
        false,
    );
    assert_eq!(after[STATUS as usize], UNSUPP);
    let (_, after) = answer(
        &ram(WRITE_ZEROES, 0, &range(0, 8, 6)),
        &chain(16, false),
        &d,
        false,
    );
    assert_eq!(after[STATUS as usize], UNSUPP);
    let (_, after) = answer(
        &ram(DISCARD, 0, &range(0, 8, 0)),
        &chain(12, false),
        &d,
        false,
    );
    assert_eq!(after[STATUS as usize], IOERR);
    let (_, after) = answer(
        &ram(DISCARD, 0, &range(40, 8, 0)),
        &chain(16, false),
        &d,
        false,
    );
    assert_eq!(after[STATUS as usize], OK);
}

#[test]
fn a_read_only_export_refuses_every_change() {
    let d = disk();
    let payload = vec![1u8; 512];
    for (kind, data) in [
        (OUT, payload.clone()),
        (WRITE_ZEROES, range(0, 1, 0)),
        (DISCARD, range(0, 1, 0)),
    ] {
        let len = data.len() as u32;
        let (_, after) = answer(&ram(kind, 0, &data), &chain(len, false), &d, true);
        assert_eq!(after[STATUS as usize], IOERR, "type {kind}");
    }
    let mut b = vec![0u8; 512];
    d.read_at(&mut b, 0).unwrap();
    assert_eq!(b[1], 1);
    assert_eq!(b[0], 0);
    let (_, after) = answer(&ram(IN, 0, &[]), &chain(512, true), &d, true);
    assert_eq!(after[STATUS as usize], OK);
}

/// A RAM disk taking at most 4 KiB per call whose fast path declines from byte `limit` on,
/// counting the bytes that took the path that may block.
#[derive(Debug)]
struct FastUpTo {
    inner: MemoryDisk,
    limit: u64,
    slow: AtomicU64,
}

impl BlockDevice for FastUpTo {
    fn info(&self) -> DiskInfo {
        let mut info = self.inner.info();
        info.max_request = 4096;
        info
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> vdk_core::Result<()> {
        self.slow.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> vdk_core::Result<()> {
        self.slow.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.inner.write_at(buf, offset, fua)
    }
    fn flush(&self) -> vdk_core::Result<()> {
        self.inner.flush()
    }
    fn lend(&self) -> Option<&dyn Lend> {
        Some(self)
    }
}

impl Lend for FastUpTo {
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> vdk_core::Result<bool> {
        if offset + buf.len() as u64 > self.limit {
            return Ok(false);
        }
        self.inner.read_at(buf, offset).map(|()| true)
    }
    fn try_write_at(&self, buf: &[u8], offset: u64) -> vdk_core::Result<bool> {
        if offset + buf.len() as u64 > self.limit {
            return Ok(false);
        }
        self.inner.write_at(buf, offset, false).map(|()| true)
    }
}

#[test]
fn a_transfer_the_fast_path_declines_part_way_is_finished_from_there() {
    // 12 KiB at sector 8 in two guest runs (8 KiB, then 4 KiB elsewhere), three 4 KiB calls;
    // the fast path does the first and declines the second.
    let split: Chain = vec![
        (HDR, 16, false),
        (DATA, 8192, true),
        (DATA + 0x3000, 4096, true),
        (STATUS, 1, true),
    ];
    let d = FastUpTo {
        inner: disk(),
        limit: 8 * 512 + 4096,
        slow: AtomicU64::new(0),
    };
    let (used, after) = answer_fast_first(&ram(IN, 8, &[]), &split, &d, false);
    assert_eq!(used, 12 * 1024 + 1);
    assert_eq!(after[STATUS as usize], OK);
    assert_eq!(
        d.slow.load(Ordering::Relaxed),
        8192,
        "only what the fast path left"
    );
    let mut want = vec![0u8; 12 * 1024];
    d.inner.read_at(&mut want, 8 * 512).unwrap();
    let d0 = DATA as usize;
    let d1 = (DATA + 0x3000) as usize;
    assert_eq!(&after[d0..d0 + 8192], &want[..8192]);
    assert_eq!(&after[d1..d1 + 4096], &want[8192..]);

    // The same for a write: every byte lands once, the first 4 KiB by the fast path.
    d.slow.store(0, Ordering::Relaxed);
    let payload: Vec<u8> = (0..12 * 1024u32).map(|i| (i % 7) as u8 + 1).collect();
    let mut mem = ram(OUT, 8, &payload[..8192]);
    mem[d1..d1 + 4096].copy_from_slice(&payload[8192..]);
    let split_out: Chain = split
        .iter()
        .map(|&(a, l, w)| (a, l, w && a == STATUS))
        .collect();
    let (used, after) = answer_fast_first(&mem, &split_out, &d, false);
    assert_eq!(used, 1);
    assert_eq!(after[STATUS as usize], OK);
    assert_eq!(d.slow.load(Ordering::Relaxed), 8192);
    let mut got = vec![0u8; 12 * 1024];
    d.inner.read_at(&mut got, 8 * 512).unwrap();
    assert_eq!(got, payload);
}

#[test]
fn a_discard_to_a_disk_that_cannot_trim_is_unsupported_and_changes_nothing() {
    // FastUpTo keeps BlockDevice's default trim: Unsupported, which the guest hears as
    // VIRTIO_BLK_S_UNSUPP (a guest that discards though the feature was not offered).
    let d = FastUpTo {
        inner: disk(),
        limit: 0,
        slow: AtomicU64::new(0),
    };
    let (used, after) = answer(
        &ram(DISCARD, 0, &range(0, 8, 0)),
        &chain(16, false),
        &d,
        false,
    );
    assert_eq!(used, 1);
    assert_eq!(after[STATUS as usize], UNSUPP);
    let mut b = vec![0u8; 4096];
    d.inner.read_at(&mut b, 0).unwrap();
    assert!(b.iter().enumerate().all(|(i, &x)| x == (i % 251) as u8));
}
