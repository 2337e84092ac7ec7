//! The internal snapshot table (qcow2.txt "Snapshot table"): read for `vdk snapshot --list`,
//! `vdk check` and the dirty-image repair.

use std::fs::File;
use std::io;

use vdk_core::sys::FileExt;

use super::header::Header;

/// One internal snapshot, as the table records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Its L1 table: offset and entries.
    pub l1_table_offset: u64,
    /// See `l1_table_offset`.
    pub l1_size: u32,
    /// The unique ID (QEMU numbers them "1", "2", ...).
    pub id: String,
    /// The name given at creation.
    pub name: String,
    /// When it was taken: seconds and nanoseconds since the epoch.
    pub date_sec: u32,
    /// See `date_sec`.
    pub date_nsec: u32,
    /// The guest's clock at the time, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Bytes of VM state saved with it (0 for a disk-only snapshot).
    pub vm_state_size: u64,
    /// The virtual disk's size then, if recorded.
    pub disk_size: Option<u64>,
    /// The guest's instruction count, if recorded (record/replay).
    pub icount: Option<u64>,
}

/// The table's snapshots and the bytes it takes.
#[derive(Clone, Debug, Default)]
pub struct Table {
    /// In table order.
    pub snapshots: Vec<Snapshot>,
    /// Bytes from the table's start to the end of its last entry.
    pub len: u64,
}

/// Most bytes a snapshot table may take (QEMU's own bound: 64 MiB).
const MAX_TABLE: u64 = 64 << 20;

/// Bytes of an entry before its extra data.
const FIXED: usize = 40;

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("snapshot table: {msg}"))
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// Reads the snapshot table of the image in `file` (`file_len` bytes) whose header is `h`.
pub fn read(file: &File, h: &Header, file_len: u64) -> io::Result<Table> {
    if h.nb_snapshots == 0 {
        return Ok(Table::default());
    }
    let room = file_len.saturating_sub(h.snapshots_offset).min(MAX_TABLE);
    let mut raw = vec![0u8; usize::try_from(room).map_err(|_| bad("too large"))?];
    file.read_exact_at(&mut raw, h.snapshots_offset)?;
    parse(&raw, h.nb_snapshots)
}

/// Parses `count` entries from `raw`, the bytes from the table's start.
pub fn parse(raw: &[u8], count: u32) -> io::Result<Table> {
    let mut at = 0usize;
    let mut snapshots = Vec::new();
    for _ in 0..count {
        // Each entry starts 8-aligned; the table ends right after the last one, unpadded.
        at = at.next_multiple_of(8);
        let e = raw
            .get(at..at + FIXED)
            .ok_or_else(|| bad("an entry runs past the end of the file"))?;
        let (id_len, name_len) = (usize::from(be16(e, 12)), usize::from(be16(e, 14)));
        let extra_len = be32(e, 36) as usize;
        let len = FIXED + extra_len + id_len + name_len;
        let entry = raw
            .get(at..at + len)
            .ok_or_else(|| bad("an entry runs past the end of the file"))?;
        let extra = &entry[FIXED..FIXED + extra_len];
        let text = |from: usize, n: usize| {
            String::from_utf8_lossy(&entry[FIXED + extra_len + from..][..n]).into_owned()
        };
        // Extra data: the large VM state size, the disk size, the instruction count.
        let field = |i: usize| (extra.len() >= 8 * (i + 1)).then(|| be64(extra, 8 * i));
        snapshots.push(Snapshot {
            l1_table_offset: be64(e, 0),
            l1_size: be32(e, 8),
            date_sec: be32(e, 16),
            date_nsec: be32(e, 20),
            vm_clock_nsec: be64(e, 24),
            vm_state_size: field(0).unwrap_or_else(|| u64::from(be32(e, 32))),
            disk_size: field(1),
            icount: field(2).filter(|&c| c != u64::MAX),
            id: text(0, id_len),
            name: text(id_len, name_len),
        });
        at += len;
    }
    Ok(Table {
        snapshots,
        len: at as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One entry as QEMU writes it: 24 bytes of extra data, ID "1", name "base".
    fn entry() -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(&0x30000u64.to_be_bytes()); // L1 offset
        e.extend_from_slice(&1u32.to_be_bytes()); // L1 entries
        e.extend_from_slice(&1u16.to_be_bytes()); // ID length
        e.extend_from_slice(&4u16.to_be_bytes()); // name length
        e.extend_from_slice(&1_700_000_000u32.to_be_bytes());
        e.extend_from_slice(&5u32.to_be_bytes());
        e.extend_from_slice(&7u64.to_be_bytes()); // VM clock
        e.extend_from_slice(&0u32.to_be_bytes()); // VM state size (small)
        e.extend_from_slice(&24u32.to_be_bytes()); // extra data
        e.extend_from_slice(&0u64.to_be_bytes());
        e.extend_from_slice(&(64u64 << 20).to_be_bytes());
        e.extend_from_slice(&u64::MAX.to_be_bytes()); // no instruction count
        e.extend_from_slice(b"1base");
        e
    }

    #[test]
    fn entries_parse_with_their_extra_data_and_padding() {
        let mut raw = entry();
        raw.resize(raw.len().next_multiple_of(8), 0); // padding before the next entry
        raw.extend(entry());
        let t = parse(&raw, 2).unwrap();
        assert_eq!(t.len, raw.len() as u64, "the table ends unpadded");
        let s = &t.snapshots[1];
        assert_eq!((s.id.as_str(), s.name.as_str()), ("1", "base"));
        assert_eq!((s.l1_table_offset, s.l1_size), (0x30000, 1));
        assert_eq!(
            (s.date_sec, s.date_nsec, s.vm_clock_nsec),
            (1_700_000_000, 5, 7)
        );
        assert_eq!((s.disk_size, s.icount), (Some(64 << 20), None));
    }

    #[test]
    fn truncated_tables_are_errors() {
        let raw = entry();
        for cut in [0, 10, 39, 40, raw.len() - 1] {
            assert!(parse(&raw[..cut], 1).is_err(), "cut at {cut}");
        }
        assert!(parse(&raw, 2).is_err());
    }
}
