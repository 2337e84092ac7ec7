//! VHDX (Hyper-V), fixed and dynamic, read-write, with the log replayed on open.
//!
//! Layout: a file identifier, two headers (the valid one with the higher sequence number is
//! current), two copies of the region table (locating the BAT and the metadata region), the
//! log, the metadata (block size, disk size, sector sizes) and the BAT, whose entries give
//! each payload block's state and offset in MiB. Everything is little-endian and checksummed
//! with CRC-32C.
//!
//! On open, a header whose log GUID is set means metadata updates may be in the log and not
//! yet in place: the active sequence of log entries is found and replayed (data and zero
//! descriptors written where they belong), then the log GUID is cleared. That needs write
//! access; a read-only open of such an image is refused with a message.
//!
//! Writes: before the first write after open, a new header (sequence + 1, new file and data
//! write GUIDs) is written to the other header slot and synced. A new payload block goes at
//! the end of the file, 1 MiB aligned; the guest's data is written, then its BAT entry (eight
//! bytes, one sector: written whole or not at all). So after a crash a BAT entry either points
//! to a block whose data was written, or the block is unreferenced space at the end. vdk does
//! not write log entries itself: its only metadata change after creation is that single BAT
//! entry. Differencing VHDX files are refused.

// Casts here are of bounded values: BAT indexes (the BAT is at most 256 MiB, checked at
// open), sector and block sizes (checked), and table offsets inside 1 MiB regions.
#![allow(clippy::cast_possible_truncation)]

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::{corrupt, Format};
use vdk_backends::FileOptions;
use vdk_core::sync::lock;
use vdk_core::sys::FileExt;
use vdk_core::{check_range, BlockDevice, Capabilities, DiskInfo, Error, Extents, Result};

/// File identifier signature.
pub const MAGIC: &[u8; 8] = b"vhdxfile";
const MIB: u64 = 1 << 20;
const HEADER_OFFSETS: [u64; 2] = [64 << 10, 128 << 10];
const REGION_OFFSETS: [u64; 2] = [192 << 10, 256 << 10];
const REGION_SIZE: usize = 64 << 10;
const MAX_BAT_BYTES: u64 = 256 << 20;

const BAT_GUID: [u8; 16] = guid(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
const METADATA_GUID: [u8; 16] = guid(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
const FILE_PARAMETERS: [u8; 16] = guid(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
const DISK_SIZE: [u8; 16] = guid(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
const PAGE83: [u8; 16] = guid(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
const LOGICAL_SECTOR: [u8; 16] = guid(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
const PHYSICAL_SECTOR: [u8; 16] = guid(
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);

/// BAT entry states.
const FULLY_PRESENT: u64 = 6;
const PARTIALLY_PRESENT: u64 = 7;

/// Block size of new images (Hyper-V's default).
pub const DEFAULT_BLOCK: u32 = 32 << 20;

/// A GUID as VHDX stores it: the first three fields little-endian, the rest as bytes.
const fn guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> [u8; 16] {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// CRC-32C of `b` with its 4-byte checksum field at `at` taken as zero.
fn crc(b: &[u8], at: usize) -> u32 {
    let c = crc32c::crc32c(&b[..at]);
    let c = crc32c::crc32c_append(c, &[0; 4]);
    crc32c::crc32c_append(c, &b[at + 4..])
}

/// A fresh GUID: not cryptographic, unique enough to tell writers apart.
fn new_guid() -> [u8; 16] {
    use std::time::{SystemTime, UNIX_EPOCH};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut g = [0u8; 16];
    g[..8].copy_from_slice(&t.to_le_bytes());
    g[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    g[12..].copy_from_slice(&(n as u32).to_le_bytes());
    // Version 4 and variant bits, so tools that check them are content.
    g[7] = (g[7] & 0x0f) | 0x40;
    g[8] = (g[8] & 0x3f) | 0x80;
    g
}

/// A header, parsed.
#[derive(Clone, Debug)]
struct Header {
    raw: Vec<u8>,
    slot: usize,
    sequence: u64,
    log_guid: [u8; 16],
    log_length: u32,
    log_offset: u64,
}

fn read_headers(path: &Path, file: &File) -> io::Result<Header> {
    let mut best: Option<Header> = None;
    for (slot, off) in HEADER_OFFSETS.iter().enumerate() {
        let mut raw = vec![0u8; 4096];
        file.read_exact_at(&mut raw, *off)?;
        if &raw[..4] != b"head" || crc(&raw, 4) != le32(&raw, 4) {
            continue;
        }
        let mut log_guid = [0u8; 16];
        log_guid.copy_from_slice(&raw[48..64]);
        let h = Header {
            sequence: le64(&raw, 8),
            log_guid,
            log_length: le32(&raw, 68),
            log_offset: le64(&raw, 72),
            raw,
            slot,
        };
        if le16(&h.raw, 66) != 1 {
            return Err(corrupt(
                Format::Vhdx,
                path,
                format!("VHDX version {} is not supported", le16(&h.raw, 66)),
            ));
        }
        if best.as_ref().is_none_or(|b| h.sequence > b.sequence) {
            best = Some(h);
        }
    }
    best.ok_or_else(|| corrupt(Format::Vhdx, path, "no valid VHDX header"))
}

/// Where the BAT and the metadata region are.
fn read_regions(path: &Path, file: &File, len: u64) -> io::Result<((u64, u64), (u64, u64))> {
    for off in REGION_OFFSETS {
        let mut raw = vec![0u8; REGION_SIZE];
        file.read_exact_at(&mut raw, off)?;
        if &raw[..4] != b"regi" || crc(&raw, 4) != le32(&raw, 4) {
            continue;
        }
        let count = le32(&raw, 8) as usize;
        if count > 2047 {
            return Err(corrupt(
                Format::Vhdx,
                path,
                "region table has too many entries",
            ));
        }
        let (mut bat, mut meta) = (None, None);
        for i in 0..count {
            let e = &raw[16 + 32 * i..48 + 32 * i];
            let (offset, length, required) = (le64(e, 16), u64::from(le32(e, 24)), le32(e, 28) & 1);
            if offset % MIB != 0
                || length % MIB != 0
                || offset < MIB
                || offset.checked_add(length).is_none_or(|x| x > len)
            {
                return Err(corrupt(
                    Format::Vhdx,
                    path,
                    format!("region at {offset} ({length} bytes) is invalid"),
                ));
            }
            match &e[..16] {
                g if g == BAT_GUID => bat = Some((offset, length)),
                g if g == METADATA_GUID => meta = Some((offset, length)),
                _ if required != 0 => {
                    return Err(corrupt(
                        Format::Vhdx,
                        path,
                        "the image requires a region vdk does not know",
                    ))
                }
                _ => {}
            }
        }
        return match (bat, meta) {
            (Some(b), Some(m)) => Ok((b, m)),
            _ => Err(corrupt(
                Format::Vhdx,
                path,
                "region table lacks the BAT or the metadata region",
            )),
        };
    }
    Err(corrupt(Format::Vhdx, path, "no valid VHDX region table"))
}

/// Block size, disk size, logical sector size, has a parent.
fn read_metadata(
    path: &Path,
    file: &File,
    (offset, length): (u64, u64),
) -> io::Result<(u32, u64, u32, bool)> {
    let mut table = vec![0u8; REGION_SIZE];
    file.read_exact_at(&mut table, offset)?;
    if &table[..8] != b"metadata" {
        return Err(corrupt(Format::Vhdx, path, "no metadata table"));
    }
    let count = le16(&table, 10) as usize;
    if count > 2047 {
        return Err(corrupt(
            Format::Vhdx,
            path,
            "metadata table has too many entries",
        ));
    }
    let item = |id: [u8; 16], want: usize| -> io::Result<Vec<u8>> {
        for i in 0..count {
            let e = &table[32 + 32 * i..64 + 32 * i];
            if e[..16] == id {
                let (at, len) = (u64::from(le32(e, 16)), le32(e, 20) as usize);
                if len < want || at < REGION_SIZE as u64 || at + len as u64 > length {
                    return Err(corrupt(
                        Format::Vhdx,
                        path,
                        "metadata item lies outside the metadata region",
                    ));
                }
                let mut v = vec![0u8; want];
                file.read_exact_at(&mut v, offset + at)?;
                return Ok(v);
            }
        }
        Err(corrupt(
            Format::Vhdx,
            path,
            "a required metadata item is missing",
        ))
    };
    let params = item(FILE_PARAMETERS, 8)?;
    let size = le64(&item(DISK_SIZE, 8)?, 0);
    let sector = le32(&item(LOGICAL_SECTOR, 4)?, 0);
    let block = le32(&params, 0);
    let has_parent = le32(&params, 4) & 2 != 0;
    if !block.is_power_of_two() || !(MIB as u32..=256 << 20).contains(&block) {
        return Err(corrupt(
            Format::Vhdx,
            path,
            format!("block size {block} is invalid"),
        ));
    }
    if sector != 512 && sector != 4096 {
        return Err(corrupt(
            Format::Vhdx,
            path,
            format!("logical sector size {sector} is invalid"),
        ));
    }
    if size == 0 || size > 64 << 40 || !size.is_multiple_of(u64::from(sector)) {
        return Err(corrupt(
            Format::Vhdx,
            path,
            format!("virtual size {size} is invalid"),
        ));
    }
    Ok((block, size, sector, has_parent))
}

/// Replays the log's active sequence into the file. Returns whether anything was replayed.
fn replay_log(path: &Path, file: &File, h: &Header, len: u64) -> io::Result<bool> {
    if h.log_guid == [0; 16] {
        return Ok(false);
    }
    let (lo, ll) = (h.log_offset, u64::from(h.log_length));
    if lo % MIB != 0 || ll % MIB != 0 || ll == 0 || lo.checked_add(ll).is_none_or(|e| e > len) {
        return Err(corrupt(Format::Vhdx, path, "log region is invalid"));
    }
    let mut log = vec![0u8; ll as usize];
    file.read_exact_at(&mut log, lo)?;
    // A valid entry at `at` (offset in the log): its bytes, in order, wrapping around.
    let entry_at = |at: u64| -> Option<(u64, u64, Vec<u8>)> {
        let head = &log[at as usize..at as usize + 64];
        if &head[..4] != b"loge" || head[32..48] != h.log_guid {
            return None;
        }
        let elen = u64::from(le32(head, 8));
        if elen < 4096 || elen % 4096 != 0 || elen > ll {
            return None;
        }
        let bytes: Vec<u8> = (0..elen).map(|i| log[((at + i) % ll) as usize]).collect();
        (crc(&bytes, 4) == le32(&bytes, 4))
            .then(|| (le64(&bytes, 16), u64::from(le32(&bytes, 12)), bytes))
    };
    // The head of the active sequence: the valid entry with the highest sequence number.
    let mut head: Option<(u64, u64)> = None;
    for at in (0..ll).step_by(4096) {
        if let Some((seq, _, _)) = entry_at(at) {
            if head.is_none_or(|(s, _)| seq > s) {
                head = Some((seq, at));
            }
        }
    }
    let Some((head_seq, head_at)) = head else {
        return Ok(false);
    };
    // Walk from the head's tail forward to the head, sequence numbers rising by one.
    let Some((_, tail, _)) = entry_at(head_at) else {
        return Ok(false);
    };
    let mut entries = Vec::new();
    let mut at = tail;
    let mut expect = None;
    loop {
        let Some((seq, _, bytes)) = entry_at(at) else {
            return Err(corrupt(
                Format::Vhdx,
                path,
                "the log's active sequence is broken: the image cannot be repaired by vdk",
            ));
        };
        if expect.is_some_and(|e| e != seq) {
            return Err(corrupt(
                Format::Vhdx,
                path,
                "the log's active sequence has a gap",
            ));
        }
        let elen = bytes.len() as u64;
        entries.push(bytes);
        if seq == head_seq {
            break;
        }
        if entries.len() as u64 > ll / 4096 {
            return Err(corrupt(
                Format::Vhdx,
                path,
                "the log's active sequence does not end",
            ));
        }
        expect = Some(seq + 1);
        at = (at + elen) % ll;
    }
    let mut last_file_offset = 0;
    for e in &entries {
        let count = le32(e, 24) as usize;
        let seq = le64(e, 16);
        last_file_offset = last_file_offset.max(le64(e, 56));
        let desc_area = (64 + 32 * count).div_ceil(4096) * 4096;
        if desc_area > e.len() {
            return Err(corrupt(
                Format::Vhdx,
                path,
                "log entry descriptors overflow the entry",
            ));
        }
        let mut data_at = desc_area;
        for i in 0..count {
            let d = &e[64 + 32 * i..96 + 32 * i];
            let target = le64(d, 16);
            if le64(d, 24) != seq {
                return Err(corrupt(
                    Format::Vhdx,
                    path,
                    "log descriptor sequence mismatch",
                ));
            }
            match &d[..4] {
                b"zero" => {
                    let n = le64(d, 8);
                    if !n.is_multiple_of(4096) || !target.is_multiple_of(4096) || n > 1 << 40 {
                        return Err(corrupt(
                            Format::Vhdx,
                            path,
                            "log zero descriptor is invalid",
                        ));
                    }
                    let zeroes = vec![0u8; MIB as usize];
                    let mut done = 0;
                    while done < n {
                        let k = (n - done).min(MIB);
                        file.write_all_at(&zeroes[..k as usize], target + done)?;
                        done += k;
                    }
                }
                b"desc" => {
                    if data_at + 4096 > e.len() || !target.is_multiple_of(4096) {
                        return Err(corrupt(
                            Format::Vhdx,
                            path,
                            "log data descriptor is invalid",
                        ));
                    }
                    let s = &e[data_at..data_at + 4096];
                    if &s[..4] != b"data" {
                        return Err(corrupt(Format::Vhdx, path, "log data sector is invalid"));
                    }
                    let mut sector = vec![0u8; 4096];
                    sector[..8].copy_from_slice(&d[8..16]);
                    sector[8..4092].copy_from_slice(&s[8..4092]);
                    sector[4092..].copy_from_slice(&d[4..8]);
                    file.write_all_at(&sector, target)?;
                    data_at += 4096;
                }
                _ => return Err(corrupt(Format::Vhdx, path, "unknown log descriptor")),
            }
        }
    }
    if file.metadata()?.len() < last_file_offset {
        file.set_len(last_file_offset)?;
    }
    file.sync_all()?;
    Ok(true)
}

/// Writes `h` (with changes) to the other header slot, sequence + 1.
fn write_header(file: &File, h: &Header, change: impl FnOnce(&mut Vec<u8>)) -> io::Result<Header> {
    let mut raw = h.raw.clone();
    change(&mut raw);
    let sequence = h.sequence + 1;
    raw[8..16].copy_from_slice(&sequence.to_le_bytes());
    raw[4..8].fill(0);
    let sum = crc(&raw, 4);
    raw[4..8].copy_from_slice(&sum.to_le_bytes());
    let slot = 1 - h.slot;
    file.write_all_at(&raw, HEADER_OFFSETS[slot])?;
    file.sync_all()?;
    let mut log_guid = [0u8; 16];
    log_guid.copy_from_slice(&raw[48..64]);
    Ok(Header {
        sequence,
        log_guid,
        log_length: le32(&raw, 68),
        log_offset: le64(&raw, 72),
        raw,
        slot,
    })
}

#[derive(Debug)]
struct State {
    bat: Vec<u64>,
    /// Where the next block goes (1 MiB aligned, past everything).
    next_block: u64,
}

/// A VHDX image.
#[derive(Debug)]
pub struct Vhdx {
    file: File,
    size: u64,
    block: u64,
    sector: u32,
    chunk_ratio: u64,
    bat_offset: u64,
    read_only: bool,
    header: Mutex<Header>,
    /// The header for this session has been written (first write done).
    announced: AtomicBool,
    state: Mutex<State>,
}

impl Vhdx {
    /// Opens a VHDX image, replaying its log first if it has one (which needs write access).
    pub fn open(path: &Path, opts: FileOptions) -> io::Result<Vhdx> {
        let read_only = opts.read_only;
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        opts.lock(&file, path)?;
        let len = file.metadata()?.len();
        let mut magic = [0u8; 8];
        if len < 4 * MIB {
            return Err(corrupt(Format::Vhdx, path, "too short to be a VHDX"));
        }
        file.read_exact_at(&mut magic, 0)?;
        if &magic != MAGIC {
            return Err(corrupt(Format::Vhdx, path, "no VHDX file identifier"));
        }
        let mut header = read_headers(path, &file)?;
        if header.log_guid != [0; 16] {
            if read_only {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{}: its log must be replayed first: open it writable once",
                        path.display()
                    ),
                ));
            }
            replay_log(path, &file, &header, len)?;
            header = write_header(&file, &header, |raw| raw[48..64].fill(0))?;
        }
        let len = file.metadata()?.len();
        let (bat_region, meta_region) = read_regions(path, &file, len)?;
        let (block, size, sector, has_parent) = read_metadata(path, &file, meta_region)?;
        if has_parent {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "{}: differencing VHDX images are not supported",
                    path.display()
                ),
            ));
        }
        let block = u64::from(block);
        let chunk_ratio = ((1u64 << 23) * u64::from(sector)) / block;
        let data_blocks = size.div_ceil(block);
        let entries = data_blocks + (data_blocks - 1) / chunk_ratio.max(1);
        if entries * 8 > bat_region.1 || entries * 8 > MAX_BAT_BYTES {
            return Err(corrupt(
                Format::Vhdx,
                path,
                "the BAT region is too small for the disk",
            ));
        }
        let mut raw = vec![0u8; (entries * 8) as usize];
        file.read_exact_at(&mut raw, bat_region.0)?;
        let bat: Vec<u64> = raw.chunks_exact(8).map(|c| le64(c, 0)).collect();
        let mut next_block = len.div_ceil(MIB) * MIB;
        for (i, e) in bat.iter().enumerate() {
            let state = e & 7;
            let off = (e >> 20) * MIB;
            let is_bitmap = (i as u64 + 1).is_multiple_of(chunk_ratio + 1);
            if is_bitmap || state < FULLY_PRESENT {
                continue;
            }
            if state == PARTIALLY_PRESENT {
                return Err(corrupt(
                    Format::Vhdx,
                    path,
                    "partially present blocks belong to differencing images",
                ));
            }
            if off < 3 * MIB
                || off
                    .checked_add(block)
                    .is_none_or(|e| e > len.div_ceil(MIB) * MIB + block)
            {
                return Err(corrupt(
                    Format::Vhdx,
                    path,
                    format!("BAT entry {i} points outside the image ({off})"),
                ));
            }
            next_block = next_block.max(off + block);
        }
        Ok(Vhdx {
            file,
            size,
            block,
            sector,
            chunk_ratio,
            bat_offset: bat_region.0,
            read_only,
            header: Mutex::new(header),
            announced: AtomicBool::new(false),
            state: Mutex::new(State { bat, next_block }),
        })
    }

    fn bat_index(&self, block: u64) -> usize {
        (block + block / self.chunk_ratio) as usize
    }

    /// The file offset of guest `offset`'s data, or None if it reads as zeroes.
    fn locate(&self, st: &State, offset: u64) -> Option<u64> {
        let e = st.bat[self.bat_index(offset / self.block)];
        (e & 7 == FULLY_PRESENT).then(|| (e >> 20) * MIB + offset % self.block)
    }

    /// Before the first write: a new header with new write GUIDs, as the format asks.
    fn announce(&self) -> Result<()> {
        if self.announced.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut h = lock(&self.header);
        if !self.announced.load(Ordering::Acquire) {
            *h = write_header(&self.file, &h, |raw| {
                raw[16..32].copy_from_slice(&new_guid());
                raw[32..48].copy_from_slice(&new_guid());
            })?;
            self.announced.store(true, Ordering::Release);
        }
        Ok(())
    }
}

impl BlockDevice for Vhdx {
    fn info(&self) -> DiskInfo {
        let mut info = DiskInfo::new(self.size);
        info.read_only = self.read_only;
        if self.sector == 4096 {
            info.logical_block_size = 4096;
        }
        info.caps = Capabilities {
            flush: true,
            fua: true,
            extents: true,
            multi_conn: true,
            ..Capabilities::NONE
        };
        info
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        let spots: Vec<(usize, usize, Option<u64>)> = {
            let st = lock(&self.state);
            let mut v = Vec::new();
            crate::pieces(offset, buf.len() as u64, self.block, |g, at, n| {
                v.push((at, n, self.locate(&st, g)));
                Ok(())
            })?;
            v
        };
        for (at, n, host) in spots {
            match host {
                Some(h) => {
                    // A block past the end of the file (never written to the end) reads zero.
                    let part = &mut buf[at..at + n];
                    let mut done = 0;
                    while done < n {
                        match self.file.read_at(&mut part[done..], h + done as u64)? {
                            0 => break,
                            k => done += k,
                        }
                    }
                    part[done..].fill(0);
                }
                None => buf[at..at + n].fill(0),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(self.size, offset, buf.len() as u64)?;
        self.announce()?;
        crate::pieces(offset, buf.len() as u64, self.block, |g, at, n| {
            let mut st = lock(&self.state);
            if let Some(h) = self.locate(&st, g) {
                drop(st);
                self.file.write_all_at(&buf[at..at + n], h)?;
                return Ok(());
            }
            // A new block at the end: data first, then the BAT entry that makes it visible.
            // Under the lock, so that two writers to one block allocate it once.
            let start = st.next_block;
            self.file
                .write_all_at(&buf[at..at + n], start + g % self.block)?;
            if g % self.block + n as u64 != self.block {
                self.file.write_all_at(&[0], start + self.block - 1)?;
            }
            let index = self.bat_index(g / self.block);
            let entry = ((start / MIB) << 20) | FULLY_PRESENT;
            self.file
                .write_all_at(&entry.to_le_bytes(), self.bat_offset + index as u64 * 8)?;
            st.bat[index] = entry;
            st.next_block = start + self.block;
            Ok(())
        })?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(self.file.sync_data()?)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_trim: bool, fua: bool) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(self.size, offset, len)?;
        crate::zero_allocated(self, offset, len, MIB, fua, |pos| {
            self.locate(&lock(&self.state), pos).is_some()
        })
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Extents> {
        check_range(self.size, offset, len)?;
        let spots: Vec<(u64, Option<u64>)> = {
            let st = lock(&self.state);
            let mut v = Vec::new();
            crate::pieces(offset, len, self.block, |g, _, n| {
                v.push((n as u64, self.locate(&st, g)));
                Ok(())
            })?;
            v
        };
        Ok(crate::mapped_extents(&self.file, offset, &spots)?)
    }
}

/// Creates an empty dynamic VHDX of `size` bytes (rounded up to 512-byte sectors).
pub fn create(path: &Path, size: u64) -> io::Result<()> {
    let size = size.div_ceil(512) * 512;
    if size == 0 || size > 64 << 40 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("VHDX size {size} is out of range (up to 64 TiB)"),
        ));
    }
    let block = u64::from(DEFAULT_BLOCK);
    let chunk_ratio = ((1u64 << 23) * 512) / block;
    let data_blocks = size.div_ceil(block);
    let entries = data_blocks + (data_blocks - 1) / chunk_ratio;
    let bat_len = (entries * 8).div_ceil(MIB) * MIB;
    let (log_at, meta_at, bat_at) = (MIB, 2 * MIB, 3 * MIB);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)?;
    let written = (|| {
        let mut ident = vec![0u8; 64 << 10];
        ident[..8].copy_from_slice(MAGIC);
        for (i, c) in "vdk".encode_utf16().enumerate() {
            ident[8 + 2 * i..10 + 2 * i].copy_from_slice(&c.to_le_bytes());
        }
        file.write_all_at(&ident, 0)?;
        let mut h = vec![0u8; 4096];
        h[..4].copy_from_slice(b"head");
        h[16..32].copy_from_slice(&new_guid());
        h[32..48].copy_from_slice(&new_guid());
        h[66..68].copy_from_slice(&1u16.to_le_bytes());
        h[68..72].copy_from_slice(&(MIB as u32).to_le_bytes());
        h[72..80].copy_from_slice(&log_at.to_le_bytes());
        for (slot, off) in HEADER_OFFSETS.iter().enumerate() {
            h[8..16].copy_from_slice(&(slot as u64).to_le_bytes());
            h[4..8].fill(0);
            let sum = crc(&h, 4);
            h[4..8].copy_from_slice(&sum.to_le_bytes());
            file.write_all_at(&h, *off)?;
        }
        let mut r = vec![0u8; REGION_SIZE];
        r[..4].copy_from_slice(b"regi");
        r[8..12].copy_from_slice(&2u32.to_le_bytes());
        for (i, (g, at, len)) in [(BAT_GUID, bat_at, bat_len), (METADATA_GUID, meta_at, MIB)]
            .iter()
            .enumerate()
        {
            let e = &mut r[16 + 32 * i..48 + 32 * i];
            e[..16].copy_from_slice(g);
            e[16..24].copy_from_slice(&at.to_le_bytes());
            e[24..28].copy_from_slice(&(*len as u32).to_le_bytes());
            e[28..32].copy_from_slice(&1u32.to_le_bytes());
        }
        let sum = crc(&r, 4);
        r[4..8].copy_from_slice(&sum.to_le_bytes());
        for off in REGION_OFFSETS {
            file.write_all_at(&r, off)?;
        }
        // Metadata: the table, then the items from 64 KiB on.
        let mut m = vec![0u8; 128 << 10];
        m[..8].copy_from_slice(b"metadata");
        let items: [([u8; 16], Vec<u8>, u32); 5] = [
            (
                FILE_PARAMETERS,
                [DEFAULT_BLOCK.to_le_bytes(), 0u32.to_le_bytes()].concat(),
                0b100,
            ),
            (DISK_SIZE, size.to_le_bytes().to_vec(), 0b110),
            (PAGE83, new_guid().to_vec(), 0b110),
            (LOGICAL_SECTOR, 512u32.to_le_bytes().to_vec(), 0b110),
            (PHYSICAL_SECTOR, 4096u32.to_le_bytes().to_vec(), 0b110),
        ];
        m[10..12].copy_from_slice(&(items.len() as u16).to_le_bytes());
        let mut at = 64 << 10;
        for (i, (id, data, flags)) in items.iter().enumerate() {
            let e = &mut m[32 + 32 * i..64 + 32 * i];
            e[..16].copy_from_slice(id);
            e[16..20].copy_from_slice(&(at as u32).to_le_bytes());
            e[20..24].copy_from_slice(&(data.len() as u32).to_le_bytes());
            e[24..28].copy_from_slice(&flags.to_le_bytes());
            m[at..at + data.len()].copy_from_slice(data);
            at += 4096;
        }
        file.write_all_at(&m, meta_at)?;
        file.set_len(bat_at + bat_len)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(())
}

/// What `vdk info` shows of a VHDX: size and block size.
pub fn describe(path: &Path) -> io::Result<(u64, u64)> {
    let v = Vhdx::open(path, crate::LOOK)?;
    Ok((v.size, v.block))
}
