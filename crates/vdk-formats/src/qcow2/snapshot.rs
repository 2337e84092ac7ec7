//! The internal snapshot table (qcow2.txt "Snapshot table"): read for `vdk snapshot --list`,
//! `vdk check` and the dirty-image repair.

use std::fs::File;
use std::io;

use tracing::debug;
use vdk_core::sys::FileExt;

use super::header::{Header, OFFSET_MASK};

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
    /// Where each entry's bytes lie in the table, unpadded (in `snapshots` order).
    pub spans: Vec<std::ops::Range<usize>>,
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
    let mut spans = Vec::new();
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
        spans.push(at..at + len);
        at += len;
    }
    Ok(Table {
        snapshots,
        len: at as u64,
        spans,
    })
}

/// What `vdk snapshot` does to a qcow2 image's internal snapshots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Edit {
    /// Take a snapshot of the image as it is, with this name.
    Create(String),
    /// Make the image what the snapshot (name or ID) holds again.
    Apply(String),
    /// Forget the snapshot (name or ID), freeing what only it held.
    Delete(String),
}

/// Where the header keeps the snapshot count (then the table's offset, 12 bytes in all).
const NB_SNAPSHOTS_AT: u64 = 60;

/// An entry's bytes as stored (unpadded) and what they say.
struct Stored {
    raw: Vec<u8>,
    snap: Snapshot,
}

impl super::Qcow2 {
    /// Carries out `edit` on this image (open for writing, nobody else's).
    ///
    /// Crash safety follows QEMU's order: references are added (and COPIED flags cleared)
    /// and synced before the new snapshot table is switched in by one 12-byte header write;
    /// references are dropped only after the switch; COPIED flags are set again last. A crash
    /// anywhere leaves at worst leaked clusters, never a cluster freed while referenced.
    pub fn edit_snapshots(&self, edit: &Edit) -> io::Result<()> {
        self.edit(edit).map_err(|e| match e {
            vdk_core::Error::Io(e) => e,
            other => io::Error::other(other),
        })
    }

    fn edit(&self, edit: &Edit) -> vdk_core::Result<()> {
        use vdk_core::Error;
        let invalid = |msg: String| Error::Io(io::Error::new(io::ErrorKind::InvalidInput, msg));
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        // A snapshot taken at another disk size brings that size back, as qemu-img's does:
        // a larger one by growing the disk first, a smaller one by shrinking it after the
        // switch, once nothing past the end is mapped. The L1 table grows first to hold the
        // snapshot's, which also maps any VM state saved with it (past the disk's end).
        let mut resize_after = None;
        if let Edit::Apply(key) = edit {
            let (count, table_at) = self.snapshot_header()?;
            let stored = self.stored_snapshots(count, table_at)?;
            if let Some(snap) = position(&stored, key).map(|i| &stored[i].snap) {
                let size = self.size.load(std::sync::atomic::Ordering::SeqCst);
                let want = snap.disk_size.unwrap_or(size);
                let l1_len = vdk_core::sync::lock(&self.meta).l1.len() as u64;
                if want > size || u64::from(snap.l1_size) > l1_len {
                    self.resize_mapped_to(want.max(size), size, u64::from(snap.l1_size))?;
                }
                if want < size {
                    resize_after = Some(want);
                }
            }
        }
        let mut m = vdk_core::sync::lock(&self.meta);
        self.write_back(&mut m)?;
        let (count, table_at) = self.snapshot_header()?;
        let stored = self.stored_snapshots(count, table_at)?;
        let find = |key: &str| {
            position(&stored, key).ok_or_else(|| invalid(format!("no snapshot named {key:?}")))
        };
        let old_table = (table_at, table_len(&stored));
        match edit {
            Edit::Create(name) => {
                if stored.iter().any(|s| s.snap.name == *name) {
                    return Err(invalid(format!("a snapshot named {name:?} exists")));
                }
                // The active tables' references, counted once more; COPIED cleared.
                let l1 = m.l1.clone();
                self.add_references(&mut m, &l1, true)?;
                let meta = &mut *m;
                for (i, e) in meta.l1.iter_mut().enumerate() {
                    if *e & super::COPIED != 0 {
                        *e &= !super::COPIED;
                        meta.l1_dirty.insert(i);
                    }
                }
                let l1_bytes: Vec<u8> = m.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
                let l1_at = self.write_new(&mut m, &l1_bytes)?;
                let next_id = stored
                    .iter()
                    .filter_map(|s| s.snap.id.parse::<u64>().ok())
                    .max()
                    .unwrap_or(0)
                    + 1;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                let snap = Snapshot {
                    l1_table_offset: l1_at,
                    l1_size: u32::try_from(m.l1.len())
                        .map_err(|_| invalid("L1 table too large".into()))?,
                    id: next_id.to_string(),
                    name: name.clone(),
                    date_sec: u32::try_from(now.as_secs()).unwrap_or(u32::MAX),
                    date_nsec: now.subsec_nanos(),
                    vm_clock_nsec: 0,
                    vm_state_size: 0,
                    disk_size: Some(self.size.load(std::sync::atomic::Ordering::SeqCst)),
                    icount: None,
                };
                let mut entries: Vec<Vec<u8>> = stored.into_iter().map(|s| s.raw).collect();
                entries.push(encode(&snap));
                self.switch_table(&mut m, &entries, old_table)?;
                debug!(image = %self.path.display(), name, "internal snapshot created");
            }
            Edit::Delete(key) => {
                let at = find(key)?;
                let gone = &stored[at].snap;
                let l1 = self.snapshot_l1(gone)?;
                let entries: Vec<Vec<u8>> = stored
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != at)
                    .map(|(_, s)| s.raw.clone())
                    .collect();
                self.switch_table(&mut m, &entries, old_table)?;
                // Only now that no table names the snapshot: its references go.
                self.drop_references(&mut m, &l1)?;
                self.release(&mut m, gone.l1_table_offset, u64::from(gone.l1_size) * 8);
                self.write_back(&mut m)?;
                self.forget_freed(&mut m)?;
                self.set_copied_flags(&mut m)?;
                debug!(image = %self.path.display(), key, "internal snapshot deleted");
            }
            Edit::Apply(key) => {
                let snap = &stored[find(key)?].snap;
                if snap.l1_size as usize > m.l1.len() {
                    return Err(super::corrupt(format!(
                        "snapshot {key:?}'s L1 table does not fit the image's"
                    )));
                }
                let mut l1 = self.snapshot_l1(snap)?;
                self.add_references(&mut m, &l1, false)?;
                self.write_back(&mut m)?;
                l1.resize(m.l1.len(), 0);
                let old = std::mem::replace(&mut m.l1, l1);
                let n = m.l1.len();
                m.l1_dirty.extend(0..n);
                self.write_back(&mut m)?;
                self.drop_references(&mut m, &old)?;
                self.write_back(&mut m)?;
                self.forget_freed(&mut m)?;
                self.set_copied_flags(&mut m)?;
                debug!(image = %self.path.display(), key, "internal snapshot applied");
            }
        }
        self.write_back(&mut m)?;
        drop(m);
        if let Some(size) = resize_after {
            // The snapshot's own bytes past its end, in the cluster holding it, stay mapped.
            self.resize_mapped_to(size, size.next_multiple_of(self.cluster_size), 0)?;
        }
        Ok(())
    }

    /// The header's snapshot count and table offset, as on disk now.
    fn snapshot_header(&self) -> vdk_core::Result<(u32, u64)> {
        let mut b = [0u8; 12];
        self.io(self.file.read_exact_at(&mut b, NB_SNAPSHOTS_AT))?;
        Ok((be32(&b, 0), be64(&b, 4)))
    }

    fn stored_snapshots(&self, count: u32, at: u64) -> vdk_core::Result<Vec<Stored>> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let len = self.io(self.file.metadata())?.len();
        let room = len.saturating_sub(at).min(MAX_TABLE);
        let mut raw = vec![0u8; usize::try_from(room).unwrap_or(0)];
        self.io(self.file.read_exact_at(&mut raw, at))?;
        let table = parse(&raw, count).map_err(vdk_core::Error::Io)?;
        Ok(table
            .snapshots
            .into_iter()
            .zip(table.spans)
            .map(|(snap, span)| Stored {
                raw: raw[span].to_vec(),
                snap,
            })
            .collect())
    }

    fn snapshot_l1(&self, s: &Snapshot) -> vdk_core::Result<Vec<u64>> {
        if u64::from(s.l1_size) * 8 > 32 << 20 {
            return Err(super::corrupt("snapshot L1 table too large"));
        }
        let mut raw = vec![0u8; s.l1_size as usize * 8];
        self.io(self.file.read_exact_at(&mut raw, s.l1_table_offset))?;
        Ok(raw.chunks_exact(8).map(|c| be64(c, 0)).collect())
    }

    /// Writes `bytes` to new clusters past everything (refcount 1); returns their offset.
    fn write_new(&self, m: &mut super::Meta, bytes: &[u8]) -> vdk_core::Result<u64> {
        let n = (bytes.len() as u64).div_ceil(self.cluster_size).max(1);
        let at = self.reserve_run(m, n)? * self.cluster_size;
        let mut padded = bytes.to_vec();
        padded.resize((n * self.cluster_size) as usize, 0);
        self.io(self.file.write_all_at(&padded, at))?;
        Ok(at)
    }

    /// Writes a new table of `entries`, syncs, switches the header to it, then frees the old.
    fn switch_table(
        &self,
        m: &mut super::Meta,
        entries: &[Vec<u8>],
        (old_at, old_len): (u64, u64),
    ) -> vdk_core::Result<()> {
        let mut table = Vec::new();
        for e in entries {
            table.resize(table.len().next_multiple_of(8), 0);
            table.extend_from_slice(e);
        }
        let at = if entries.is_empty() {
            0
        } else {
            self.write_new(m, &table)?
        };
        // The new table, its refcounts and every reference added so far are on disk first.
        self.write_back(m)?;
        self.io(self.file.sync_data())?;
        let count = u32::try_from(entries.len()).unwrap_or(u32::MAX);
        let mut h = count.to_be_bytes().to_vec();
        h.extend_from_slice(&at.to_be_bytes());
        self.io(self.file.write_all_at(&h, NB_SNAPSHOTS_AT))?;
        self.io(self.file.sync_data())?;
        if old_len > 0 {
            self.release(m, old_at, old_len);
        }
        Ok(())
    }

    /// Counts one more reference to every L2 table of `l1` and every cluster they map;
    /// with `clear`, clears the COPIED flags of those L2 entries (they become shared).
    fn add_references(&self, m: &mut super::Meta, l1: &[u64], clear: bool) -> vdk_core::Result<()> {
        for l1e in l1 {
            let l2 = l1e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            self.add_ref(m, l2, self.cluster_size)?;
            self.load_l2(m, l2)?;
            let entries = m.l2[&l2].entries.clone();
            let mut changed = false;
            let mut new = entries.clone();
            for (i, e) in self.descriptors(&entries) {
                if let Some((off, len)) = self.referenced(*e)? {
                    self.add_ref(m, off, len)?;
                    if clear && e & super::COPIED != 0 {
                        new[i] = e & !super::COPIED;
                        changed = true;
                    }
                }
            }
            if changed {
                self.load_l2(m, l2)?;
                if let Some(t) = m.l2.get_mut(&l2) {
                    t.entries = new;
                    t.dirty = true;
                }
            }
        }
        Ok(())
    }

    /// Gives back one reference to every L2 table of `l1` and every cluster they map.
    fn drop_references(&self, m: &mut super::Meta, l1: &[u64]) -> vdk_core::Result<()> {
        for l1e in l1 {
            let l2 = l1e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            self.load_l2(m, l2)?;
            let entries = m.l2[&l2].entries.clone();
            for (_, e) in self.descriptors(&entries) {
                if let Some((off, len)) = self.referenced(*e)? {
                    self.release(m, off, len);
                }
            }
            self.release(m, l2, self.cluster_size);
        }
        Ok(())
    }

    /// The cluster descriptors of an L2 table's words, with their index among the words:
    /// every word, or with extended L2 entries every other one (each followed by its
    /// subcluster bitmap, which refers to nothing).
    fn descriptors<'a>(&self, words: &'a [u64]) -> impl Iterator<Item = (usize, &'a u64)> {
        let width = if self.header.extended_l2() { 2 } else { 1 };
        words.iter().enumerate().step_by(width)
    }

    /// The host bytes an L2 entry refers to (data, a preallocated zero cluster, compressed
    /// data), if any.
    fn referenced(&self, e: u64) -> vdk_core::Result<Option<(u64, u64)>> {
        if e & super::COMPRESSED != 0 {
            if let super::Map::Compressed { offset, len } = self.compressed(e)? {
                return Ok(Some((offset, len)));
            }
            return Ok(None);
        }
        let host = e & OFFSET_MASK;
        Ok((host != 0).then_some((host, self.cluster_size)))
    }

    fn add_ref(&self, m: &mut super::Meta, offset: u64, len: u64) -> vdk_core::Result<()> {
        let first = offset / self.cluster_size;
        let last = (offset + len.max(1) - 1) / self.cluster_size;
        for c in first..=last {
            let n = self.refcount(m, c)?;
            if n == 0 {
                return Err(super::corrupt(format!(
                    "cluster {c} is referenced but its refcount is 0 (qemu-img check -r all)"
                )));
            }
            self.set_refcount(m, c, n + 1)?;
        }
        Ok(())
    }

    /// Drops cached L2 tables whose clusters were freed (they may be reused as data).
    fn forget_freed(&self, m: &mut super::Meta) -> vdk_core::Result<()> {
        let cached: Vec<u64> = m.l2.keys().copied().collect();
        for off in cached {
            if self.refcount(m, off / self.cluster_size)? == 0 {
                m.l2.remove(&off);
                m.metadata.remove(&off);
            }
        }
        Ok(())
    }

    /// Sets COPIED on the active tables' entries exactly where the refcount is 1, as QEMU
    /// keeps them (and `qemu-img check` verifies).
    fn set_copied_flags(&self, m: &mut super::Meta) -> vdk_core::Result<()> {
        for i in 0..m.l1.len() {
            let l1e = m.l1[i];
            let l2 = l1e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let owned = self.refcount(m, l2 / self.cluster_size)? == 1;
            let want = if owned { l2 | super::COPIED } else { l2 };
            if want != l1e {
                m.l1[i] = want;
                m.l1_dirty.insert(i);
            }
            if !owned {
                continue;
            }
            self.load_l2(m, l2)?;
            let entries = m.l2[&l2].entries.clone();
            let mut new = entries.clone();
            for (j, e) in self.descriptors(&entries) {
                if e & super::COMPRESSED != 0 {
                    continue;
                }
                let host = e & OFFSET_MASK;
                if host == 0 {
                    continue;
                }
                let one = self.refcount(m, host / self.cluster_size)? == 1;
                new[j] = if one {
                    e | super::COPIED
                } else {
                    e & !super::COPIED
                };
            }
            if new != entries {
                self.load_l2(m, l2)?;
                if let Some(t) = m.l2.get_mut(&l2) {
                    t.entries = new;
                    t.dirty = true;
                }
            }
        }
        Ok(())
    }
}

/// Where the snapshot `key` (its ID, else its name, as qemu-img looks) is in `stored`.
fn position(stored: &[Stored], key: &str) -> Option<usize> {
    stored
        .iter()
        .position(|s| s.snap.id == key)
        .or_else(|| stored.iter().position(|s| s.snap.name == key))
}

/// Bytes of a table of `stored` entries, 8-aligned each, unpadded at the end.
fn table_len(stored: &[Stored]) -> u64 {
    let mut len = 0usize;
    for s in stored {
        len = len.next_multiple_of(8) + s.raw.len();
    }
    len as u64
}

/// One entry as QEMU writes it: the fixed part, 24 bytes of extra data (large VM state size,
/// disk size, instruction count: none), the ID and the name.
fn encode(s: &Snapshot) -> Vec<u8> {
    let mut e = Vec::new();
    e.extend_from_slice(&s.l1_table_offset.to_be_bytes());
    e.extend_from_slice(&s.l1_size.to_be_bytes());
    e.extend_from_slice(&u16::try_from(s.id.len()).unwrap_or(u16::MAX).to_be_bytes());
    e.extend_from_slice(
        &u16::try_from(s.name.len())
            .unwrap_or(u16::MAX)
            .to_be_bytes(),
    );
    e.extend_from_slice(&s.date_sec.to_be_bytes());
    e.extend_from_slice(&s.date_nsec.to_be_bytes());
    e.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
    e.extend_from_slice(&0u32.to_be_bytes());
    e.extend_from_slice(&24u32.to_be_bytes());
    e.extend_from_slice(&s.vm_state_size.to_be_bytes());
    e.extend_from_slice(&s.disk_size.unwrap_or(0).to_be_bytes());
    e.extend_from_slice(&s.icount.unwrap_or(u64::MAX).to_be_bytes());
    e.extend_from_slice(s.id.as_bytes());
    e.extend_from_slice(s.name.as_bytes());
    e
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
