//! Persistent dirty bitmaps: qcow2's bitmaps extension, as QEMU reads and writes it.
//!
//! ```text
//!  header extension 0x23852875: nb_bitmaps, directory size, directory offset
//!  autoclear bit 0: the extension is valid (a program that does not keep bitmaps clears it)
//!  directory: one entry per bitmap: table offset and size, flags (in_use, auto), type,
//!             granularity bits, name (and extra data), padded to 8 bytes
//!  table: one entry per cluster of bitmap data: its offset, or 0 (all clean) / 1 (all dirty)
//!  data: bit i of the bitmap is bit i % 8 of byte i / 8
//! ```
//!
//! On a writable open that keeps bitmaps, the tracked ones (type 1, auto, no unknown extra
//! data) are read and marked in use in the image at once; one found in use already is
//! inconsistent (whoever had it did not close the image). Saving writes every bitmap anew
//! (data, tables, then the directory, synced), switches the header to the new directory, then
//! frees the old clusters: a crash at any point leaves the old bitmaps or the new ones.
//! Entries vdk does not track (disabled, another type, extra data it cannot keep up to date
//! but may carry) are kept as they are.

use std::io;
use std::sync::Arc;

use tracing::warn;
use vdk_core::bitmap::{check_name, BitmapStore, DirtyBitmap};
use vdk_core::sync::lock;
use vdk_core::sys::FileExt;
use vdk_core::{Error, Result};

use super::header::{ext, Header, OFFSET_MASK};
use super::{corrupt, Qcow2};
use crate::{be32, be64};

/// Autoclear bit: the bitmaps extension is consistent with the image.
pub const AUTOCLEAR_BITMAPS: u64 = 1;
const IN_USE: u32 = 1;
const AUTO: u32 = 1 << 1;
const EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
const TYPE_DIRTY: u8 = 1;
/// QEMU's limits.
const MAX_BITMAPS: usize = 65535;
const MAX_DIRECTORY: u64 = 64 << 20;
const MAX_TABLE_ENTRIES: u32 = 0x0800_0000;

/// One entry of the bitmap directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Where its table is.
    pub table_offset: u64,
    /// Entries in its table.
    pub table_size: u32,
    /// in_use, auto, extra_data_compatible.
    pub flags: u32,
    /// 1: dirty tracking.
    pub kind: u8,
    /// log2 of the granularity.
    pub granularity_bits: u8,
    /// Type-specific extra data (none is defined).
    pub extra: Vec<u8>,
    /// Its name.
    pub name: String,
}

impl Entry {
    /// Whether vdk tracks it: a dirty tracking bitmap, enabled, whose extra data (if any)
    /// may be carried along.
    fn tracked(&self) -> bool {
        self.kind == TYPE_DIRTY
            && self.flags & AUTO != 0
            && (self.extra.is_empty() || self.flags & EXTRA_DATA_COMPATIBLE != 0)
            && (9..=31).contains(&self.granularity_bits)
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.table_offset.to_be_bytes());
        out.extend_from_slice(&self.table_size.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.push(self.kind);
        out.push(self.granularity_bits);
        out.extend_from_slice(&u16::try_from(self.name.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&u32::try_from(self.extra.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&self.extra);
        out.extend_from_slice(self.name.as_bytes());
        out.resize(out.len().div_ceil(8) * 8, 0);
    }
}

/// Parses a bitmap directory of `count` entries.
pub fn parse_directory(raw: &[u8], count: u32) -> std::result::Result<Vec<Entry>, String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    for i in 0..count {
        let Some(head) = raw.get(at..at + 24) else {
            return Err(format!(
                "bitmap directory entry {i} runs past the directory"
            ));
        };
        let name_len = usize::from(u16::from_be_bytes([head[18], head[19]]));
        let extra_len = be32(head, 20) as usize;
        let end = at + 24 + extra_len + name_len;
        let Some(rest) = raw.get(at + 24..end) else {
            return Err(format!(
                "bitmap directory entry {i} runs past the directory"
            ));
        };
        let name = String::from_utf8(rest[extra_len..].to_vec())
            .map_err(|_| format!("bitmap {i}'s name is not UTF-8"))?;
        check_name(&name)?;
        let e = Entry {
            table_offset: be64(head, 0),
            table_size: be32(head, 8),
            flags: be32(head, 12),
            kind: head[16],
            granularity_bits: head[17],
            extra: rest[..extra_len].to_vec(),
            name,
        };
        if out.iter().any(|o: &Entry| o.name == e.name) {
            return Err(format!("two bitmaps are named {:?}", e.name));
        }
        if e.table_size > MAX_TABLE_ENTRIES {
            return Err(format!("bitmap {:?}'s table is too large", e.name));
        }
        out.push(e);
        at = end.div_ceil(8) * 8;
    }
    Ok(out)
}

/// A bitmap as `info` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    /// Its name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// QEMU's names of its flags: `in-use`, `auto`.
    pub flags: Vec<&'static str>,
}

/// The bitmaps of the image whose header is `h`, as the directory lists them; none when the
/// extension is absent or not valid (its autoclear bit cleared by a program that did not keep
/// them).
pub fn list(file: &std::fs::File, h: &Header) -> std::result::Result<Vec<Info>, String> {
    let Some((count, dir_size, dir_offset)) = h.bitmaps else {
        return Ok(Vec::new());
    };
    if h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
        return Ok(Vec::new());
    }
    if dir_size > MAX_DIRECTORY {
        return Err("the directory is too large".into());
    }
    let mut raw = vec![0u8; dir_size as usize];
    file.read_exact_at(&mut raw, dir_offset)
        .map_err(|e| format!("cannot read the directory: {e}"))?;
    Ok(parse_directory(&raw, count)?
        .into_iter()
        .map(|e| {
            let mut flags = Vec::new();
            if e.flags & IN_USE != 0 {
                flags.push("in-use");
            }
            if e.flags & AUTO != 0 {
                flags.push("auto");
            }
            Info {
                granularity: 1u64.checked_shl(u32::from(e.granularity_bits)).unwrap_or(0),
                name: e.name,
                flags,
            }
        })
        .collect())
}

/// What the image's bitmaps are now: its directory, and what it held when opened.
#[derive(Debug, Default)]
pub(super) struct State {
    /// The directory's entries as on disk.
    entries: Vec<Entry>,
    /// The directory's place, if there is one.
    directory: Option<(u64, u64)>,
    /// What was read at open, handed out once.
    loaded: Vec<(String, DirtyBitmap)>,
}

impl Qcow2 {
    /// Reads the bitmaps of an image opened for writing whose extension is valid, and marks
    /// the tracked ones in use (on disk, synced) before anything is written.
    pub(super) fn load_bitmaps(&self) -> io::Result<()> {
        let Some((count, dir_size, dir_offset)) = self.header.bitmaps else {
            return Ok(());
        };
        let bad = |why: String| {
            crate::corrupt(crate::Format::Qcow2, &self.path, format!("bitmaps: {why}"))
        };
        let file_len = self.file.metadata()?.len();
        if dir_size > MAX_DIRECTORY
            || count as usize > MAX_BITMAPS
            || !dir_offset.is_multiple_of(self.cluster_size)
            || dir_offset.saturating_add(dir_size) > file_len
        {
            return Err(bad("the directory is misplaced or too large".into()));
        }
        let mut raw = vec![0u8; usize::try_from(dir_size).unwrap_or(0)];
        self.file.read_exact_at(&mut raw, dir_offset)?;
        let mut entries = parse_directory(&raw, count).map_err(bad)?;
        let size = self.size();
        let mut loaded = Vec::new();
        for e in &mut entries {
            if !e.tracked() {
                continue;
            }
            let g = 1u64 << e.granularity_bits;
            if u64::from(e.table_size) != self.bitmap_clusters(size, g) {
                return Err(bad(format!(
                    "{:?}'s table does not fit the disk's size",
                    e.name
                )));
            }
            let bitmap = if e.flags & IN_USE != 0 {
                warn!(image = %self.path.display(), bitmap = %e.name, "the bitmap was left in use (the image was not closed cleanly): it is inconsistent");
                DirtyBitmap::new(size, g).map_err(bad)?.inconsistent()
            } else {
                let bytes = self.read_bitmap(e, file_len).map_err(bad)?;
                e.flags |= IN_USE;
                DirtyBitmap::from_stored(size, g, &bytes).map_err(bad)?
            };
            loaded.push((e.name.clone(), bitmap.persistent(true)));
        }
        // In use from now on: a crash leaves them inconsistent.
        let mut new = Vec::new();
        for e in &entries {
            e.encode(&mut new);
        }
        if new != raw {
            self.file.write_all_at(&new, dir_offset)?;
            self.file.sync_data()?;
        }
        *lock(&self.bitmap_state) = State {
            entries,
            directory: Some((dir_offset, dir_size)),
            loaded,
        };
        Ok(())
    }

    /// Clusters of bitmap data for a disk of `size` bytes at granularity `g`.
    fn bitmap_clusters(&self, size: u64, g: u64) -> u64 {
        size.div_ceil(g).div_ceil(8).div_ceil(self.cluster_size)
    }

    /// The bytes of a bitmap as its table says.
    fn read_bitmap(&self, e: &Entry, file_len: u64) -> std::result::Result<Vec<u8>, String> {
        let cs = self.cluster_size;
        let table = self.read_table(e, file_len)?;
        let mut out = Vec::with_capacity(table.len() * cs as usize);
        let mut cluster = vec![0u8; cs as usize];
        for t in table {
            let off = t & OFFSET_MASK & !0x1ff;
            if off == 0 {
                cluster.fill(if t & 1 != 0 { 0xff } else { 0 });
            } else {
                if !off.is_multiple_of(cs) || off + cs > file_len {
                    return Err(format!("{:?}'s data at {off} is misplaced", e.name));
                }
                self.file
                    .read_exact_at(&mut cluster, off)
                    .map_err(|err| err.to_string())?;
            }
            out.extend_from_slice(&cluster);
        }
        Ok(out)
    }

    fn read_table(&self, e: &Entry, file_len: u64) -> std::result::Result<Vec<u64>, String> {
        let len = u64::from(e.table_size) * 8;
        if !e.table_offset.is_multiple_of(self.cluster_size)
            || e.table_offset.saturating_add(len) > file_len
            || (e.table_offset == 0 && len > 0)
        {
            return Err(format!("{:?}'s table is misplaced", e.name));
        }
        let mut raw = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut raw, e.table_offset)
            .map_err(|err| err.to_string())?;
        Ok(raw.chunks_exact(8).map(|c| be64(c, 0)).collect())
    }

    /// The clusters an entry's table and data take.
    fn bitmap_extents(&self, e: &Entry) -> Vec<(u64, u64)> {
        let cs = self.cluster_size;
        let mut out = Vec::new();
        if e.table_size == 0 {
            return out;
        }
        let file_len = self.file.metadata().map_or(0, |m| m.len());
        match self.read_table(e, file_len) {
            Ok(table) => {
                out.push((
                    e.table_offset,
                    (u64::from(e.table_size) * 8).div_ceil(cs) * cs,
                ));
                for t in table {
                    let off = t & OFFSET_MASK & !0x1ff;
                    if off != 0 {
                        out.push((off, cs));
                    }
                }
            }
            Err(why) => warn!(image = %self.path.display(), "a bitmap's clusters are left: {why}"),
        }
        out
    }

    /// Writes one bitmap's data and table into new clusters; its directory entry.
    fn write_bitmap(&self, name: &str, b: &DirtyBitmap, flags: u32) -> Result<Entry> {
        let cs = self.cluster_size;
        let g = b.granularity();
        let bytes = b.to_stored();
        let clusters = self.bitmap_clusters(self.size(), g);
        let mut table = Vec::with_capacity(clusters as usize);
        let mut m = lock(&self.meta);
        for i in 0..clusters {
            let from = (i * cs) as usize;
            let chunk = bytes
                .get(from..bytes.len().min(from + cs as usize))
                .unwrap_or(&[]);
            if chunk.iter().all(|b| *b == 0) {
                table.push(0);
                continue;
            }
            let (at, _) = self.alloc(&mut m)?;
            let mut data = chunk.to_vec();
            data.resize(cs as usize, 0);
            self.io(self.file.write_all_at(&data, at))?;
            table.push(at);
        }
        let table_offset = if clusters == 0 {
            0
        } else {
            let n = (clusters * 8).div_ceil(cs);
            let start = self.reserve_run(&mut m, n)? * cs;
            let mut raw: Vec<u8> = table.iter().flat_map(|t| t.to_be_bytes()).collect();
            raw.resize((n * cs) as usize, 0);
            self.io(self.file.write_all_at(&raw, start))?;
            start
        };
        Ok(Entry {
            table_offset,
            table_size: u32::try_from(clusters).map_err(|_| corrupt("bitmap too large"))?,
            flags,
            kind: TYPE_DIRTY,
            granularity_bits: u8::try_from(g.trailing_zeros()).unwrap_or(16),
            extra: Vec::new(),
            name: name.to_owned(),
        })
    }

    /// Rewrites the header's extensions with `bitmaps` as the bitmaps extension (or none),
    /// keeping every other extension and the backing file name, and sets or clears the
    /// bitmaps' autoclear bit; one write, synced.
    fn write_bitmaps_header(&self, bitmaps: Option<(u32, u64, u64)>) -> Result<()> {
        let cs = self.cluster_size as usize;
        let file_len = self.io(self.file.metadata())?.len();
        let mut first = vec![0u8; cs.min(usize::try_from(file_len).unwrap_or(cs))];
        self.io(self.file.read_exact_at(&mut first, 0))?;
        // As it is now (an earlier save may have moved the backing file name).
        let h = Header::parse(&first, file_len).map_err(|e| corrupt(e.to_string()))?;
        let backing = h.backing_file(&first).map_err(|e| corrupt(e.to_string()))?;
        let start = h.header_length as usize;
        let mut exts = Vec::new();
        for (kind, data) in super::header::extensions(&first, start) {
            if kind == ext::BITMAPS {
                continue;
            }
            exts.extend_from_slice(&kind.to_be_bytes());
            exts.extend_from_slice(&u32::try_from(data.len()).unwrap_or(0).to_be_bytes());
            exts.extend_from_slice(data);
            exts.resize(exts.len().div_ceil(8) * 8, 0);
        }
        if let Some((count, size, offset)) = bitmaps {
            exts.extend_from_slice(&ext::BITMAPS.to_be_bytes());
            exts.extend_from_slice(&24u32.to_be_bytes());
            exts.extend_from_slice(&count.to_be_bytes());
            exts.extend_from_slice(&0u32.to_be_bytes());
            exts.extend_from_slice(&size.to_be_bytes());
            exts.extend_from_slice(&offset.to_be_bytes());
        }
        exts.extend_from_slice(&[0u8; 8]); // end
        let mut head = first[..start].to_vec();
        head.extend_from_slice(&exts);
        if let Some(name) = &backing {
            let at = head.len() as u64;
            head[8..16].copy_from_slice(&at.to_be_bytes());
            head.extend_from_slice(name.as_bytes());
        }
        let autoclear = be64(&first, 88);
        let autoclear = if bitmaps.is_some() {
            autoclear | AUTOCLEAR_BITMAPS
        } else {
            autoclear & !AUTOCLEAR_BITMAPS
        };
        head[88..96].copy_from_slice(&autoclear.to_be_bytes());
        if head.len() > cs {
            return Err(Error::Io(io::Error::other(
                "the header's extensions no longer fit in its first cluster",
            )));
        }
        // What was past the new end (a longer old area) is cleared.
        let old_end = (h.extensions_end as usize)
            .max(h.backing_file_offset as usize + h.backing_file_size as usize)
            .min(cs);
        if head.len() < old_end {
            head.resize(old_end, 0);
        }
        self.io(self.file.write_all_at(&head, 0))?;
        self.io(self.file.sync_data())
    }
}

impl BitmapStore for Qcow2 {
    fn stored(&self) -> Vec<(String, DirtyBitmap)> {
        std::mem::take(&mut lock(&self.bitmap_state).loaded)
    }

    fn save(&self, bitmaps: &[(String, Arc<DirtyBitmap>)], in_use: bool) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if self.header.version < 3 {
            return Err(Error::Unsupported(vdk_core::Op::Write));
        }
        // The header is rewritten below: no resize may change it meanwhile.
        let _header = lock(&self.resizing);
        let mut st = lock(&self.bitmap_state);
        if st.entries.is_empty() && !bitmaps.iter().any(|(_, b)| b.is_persistent()) {
            return Ok(()); // none before, none now
        }
        let old = st.entries.clone();
        let mut entries = Vec::new();
        // Those vdk does not track, as they are.
        entries.extend(old.iter().filter(|e| !e.tracked()).cloned());
        for (name, b) in bitmaps.iter().filter(|(_, b)| b.is_persistent()) {
            let kept = old.iter().find(|e| e.name == *name && e.tracked());
            if b.is_inconsistent() {
                if let Some(e) = kept {
                    entries.push(e.clone());
                }
                continue;
            }
            let flags = AUTO | if in_use { IN_USE } else { 0 };
            entries.push(self.write_bitmap(name, b, flags)?);
        }
        let mut raw = Vec::new();
        for e in &entries {
            e.encode(&mut raw);
        }
        let cs = self.cluster_size;
        let directory = if entries.is_empty() {
            None
        } else {
            let mut m = lock(&self.meta);
            let n = (raw.len() as u64).div_ceil(cs);
            let at = self.reserve_run(&mut m, n)? * cs;
            raw.resize((n * cs) as usize, 0);
            self.io(self.file.write_all_at(&raw, at))?;
            Some((at, raw.len() as u64))
        };
        // Data, tables and directory, and the refcounts that count them, before the header
        // points at them.
        {
            let mut m = lock(&self.meta);
            self.write_refblocks(&mut m)?;
        }
        self.io(self.file.sync_data())?;
        let count = u32::try_from(entries.len()).unwrap_or(u32::MAX);
        let ext = directory.map(|(at, _)| {
            let mut size = 0;
            for e in &entries {
                let mut one = Vec::new();
                e.encode(&mut one);
                size += one.len() as u64;
            }
            (count, size, at)
        });
        self.write_bitmaps_header(ext)?;
        // The old clusters: the old directory, and what the rewritten or removed entries had.
        let mut frees = Vec::new();
        if let Some((at, size)) = st.directory {
            frees.push((at, size.div_ceil(cs) * cs));
        }
        for e in old.iter().filter(|e| !entries.contains(e)) {
            frees.extend(self.bitmap_extents(e));
        }
        let mut m = lock(&self.meta);
        for (at, len) in frees {
            self.release(&mut m, at, len);
        }
        self.write_back(&mut m)?;
        st.entries = entries;
        st.directory = directory;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_entries_round_trip_and_bad_ones_are_errors() {
        let e = Entry {
            table_offset: 0x30000,
            table_size: 1,
            flags: AUTO,
            kind: TYPE_DIRTY,
            granularity_bits: 16,
            extra: vec![],
            name: "daily".into(),
        };
        let mut raw = Vec::new();
        e.encode(&mut raw);
        e.encode(&mut raw);
        assert_eq!(raw.len(), 64);
        assert!(parse_directory(&raw, 2)
            .unwrap_err()
            .contains("two bitmaps"));
        assert_eq!(parse_directory(&raw, 1).unwrap(), vec![e]);
        assert!(parse_directory(&raw[..20], 1).is_err());
        let mut long = raw[..32].to_vec();
        long[19] = 200; // a name past the end
        assert!(parse_directory(&long, 1).is_err());
    }
}
