//! Consistency check of a qcow2 image: every cluster's refcount against the references the
//! tables make to it, as `qemu-img check` does; optionally repairing refcounts.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

use vdk_core::sys::FileExt;

use super::header::{incompat, Header, OFFSET_MASK};
use super::refcount;

/// What a check found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Clusters whose refcount is higher than their references (space wasted, data safe).
    pub leaks: u64,
    /// Clusters referenced more often than their refcount says (a write could destroy data).
    pub corruptions: u64,
    /// Tables that point outside the image or are misaligned.
    pub errors: u64,
    /// Leaks fixed by a repair.
    pub leaks_fixed: u64,
    /// Corruptions fixed by a repair.
    pub corruptions_fixed: u64,
    /// End of the last cluster in use.
    pub image_end_offset: u64,
    /// Clusters in the image's virtual disk, and how many are allocated.
    pub total_clusters: u64,
    /// See `total_clusters`.
    pub allocated_clusters: u64,
    /// Messages, one per problem (capped).
    pub messages: Vec<String>,
}

const MAX_MESSAGES: usize = 100;

impl CheckReport {
    fn note(&mut self, msg: String) {
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(msg);
        }
    }
}

fn read_u64s(file: &File, offset: u64, count: usize) -> io::Result<Vec<u64>> {
    let mut raw = vec![0u8; count * 8];
    file.read_exact_at(&mut raw, offset)?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect())
}

/// The clusters the bitmaps extension uses: its directory, tables and data.
fn bitmap_clusters(
    file: &File,
    cs: u64,
    file_len: u64,
    count: u32,
    dir_size: u64,
    dir_offset: u64,
) -> Result<Vec<(u64, u64)>, String> {
    if dir_size > 64 << 20 || dir_offset.saturating_add(dir_size) > file_len {
        return Err("the directory is too large or past the end".into());
    }
    let mut raw = vec![0u8; dir_size as usize];
    file.read_exact_at(&mut raw, dir_offset)
        .map_err(|e| e.to_string())?;
    let entries = super::bitmaps::parse_directory(&raw, count)?;
    let mut out = vec![(dir_offset, dir_size)];
    for e in entries {
        let len = u64::from(e.table_size) * 8;
        if len == 0 {
            continue;
        }
        if e.table_offset.saturating_add(len) > file_len {
            return Err(format!("{:?}'s table is past the end", e.name));
        }
        out.push((e.table_offset, len));
        let table = read_u64s(file, e.table_offset, e.table_size as usize)
            .map_err(|err| err.to_string())?;
        for t in table {
            let off = t & OFFSET_MASK & !0x1ff;
            if off != 0 {
                out.push((off, cs));
            }
        }
    }
    Ok(out)
}

fn unsupported(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, msg.to_owned())
}

/// Checks the qcow2 image at `path` whose header is `h`; with `repair`, rewrites refcounts
/// that disagree with the references (leaks and corruptions of the refcounts alike).
pub fn check(path: &Path, h: &Header, repair: bool) -> io::Result<CheckReport> {
    let luks = h.crypt_method == 2 && h.crypto_header.is_some();
    // A bitmaps extension that does not say where its directory is cannot be followed.
    if (h.has_bitmaps && h.bitmaps.is_none())
        || (h.crypt_method != 0 && !luks)
        || h.incompatible_features & incompat::DATA_FILE != 0
    {
        return Err(unsupported(
            "vdk check does not follow bitmaps, legacy AES encryption or data files: use \
             qemu-img check",
        ));
    }
    let file = OpenOptions::new().read(true).write(repair).open(path)?;
    let file_len = file.metadata()?.len();
    let cs = h.cluster_size();
    let clusters = file_len.div_ceil(cs);
    if clusters > 1 << 28 {
        return Err(unsupported(
            "image has too many clusters for vdk check: use qemu-img check",
        ));
    }
    let clusters = clusters as usize;
    let mut report = CheckReport::default();
    // Expected references, per host cluster of the file.
    let mut refs = vec![0u32; clusters + 1];
    let mut add = |report: &mut CheckReport, off: u64, len: u64, what: &str| {
        let first = off / cs;
        let last = (off + len.max(1) - 1) / cs;
        for c in first..=last {
            match refs.get_mut(c as usize) {
                Some(r) => *r = r.saturating_add(1),
                None => {
                    report.errors += 1;
                    report.note(format!(
                        "ERROR {what} at {off} is past the end of the image"
                    ));
                }
            }
        }
    };
    add(&mut report, 0, cs, "header");
    if let (true, Some((offset, len))) = (luks, h.crypto_header) {
        add(&mut report, offset, len, "encryption header");
    }
    add(
        &mut report,
        h.l1_table_offset,
        u64::from(h.l1_size) * 8,
        "L1 table",
    );
    let rt_len = u64::from(h.refcount_table_clusters) * cs;
    add(
        &mut report,
        h.refcount_table_offset,
        rt_len,
        "refcount table",
    );
    // Persistent bitmaps: the directory, each table and each table's data clusters.
    if let Some((count, dir_size, dir_offset)) = h.bitmaps {
        match bitmap_clusters(&file, cs, file_len, count, dir_size, dir_offset) {
            Ok(found) => {
                for (off, len) in found {
                    add(&mut report, off, len, "bitmap");
                }
            }
            Err(why) => {
                report.errors += 1;
                report.note(format!("ERROR bitmaps: {why}"));
            }
        }
    }
    let reftable = read_u64s(&file, h.refcount_table_offset, (rt_len / 8) as usize)?;
    for e in &reftable {
        let off = e & OFFSET_MASK;
        if off != 0 {
            add(&mut report, off, cs, "refcount block");
        }
    }
    // The active L1 table, then each internal snapshot's: a table or cluster that several
    // share is referenced once by each, as their refcounts count it.
    let mut l1s = vec![read_u64s(&file, h.l1_table_offset, h.l1_size as usize)?];
    if h.nb_snapshots > 0 {
        let table = super::snapshot::read(&file, h, file_len)?;
        add(&mut report, h.snapshots_offset, table.len, "snapshot table");
        for sn in &table.snapshots {
            let (offset, size) = (sn.l1_table_offset, sn.l1_size);
            // QEMU's own bound on an L1 table: 32 MiB.
            let too_big = u64::from(size) * 8 > 32 << 20;
            if too_big || !offset.is_multiple_of(cs) || offset + u64::from(size) * 8 > file_len {
                report.errors += 1;
                report.note(format!(
                    "ERROR snapshot L1 table at {offset} is misaligned, too large or past the end"
                ));
                continue;
            }
            add(
                &mut report,
                offset,
                u64::from(size) * 8,
                "snapshot L1 table",
            );
            l1s.push(read_u64s(&file, offset, size as usize)?);
        }
    }
    let width = if h.extended_l2() { 2 } else { 1 };
    let x = 62 - (h.cluster_bits - 8);
    report.total_clusters = h.size.div_ceil(cs);
    for (n, l1e) in l1s
        .iter()
        .enumerate()
        .flat_map(|(n, l1)| l1.iter().map(move |e| (n, e)))
    {
        let active = n == 0;
        let l2off = l1e & OFFSET_MASK;
        if l2off == 0 {
            continue;
        }
        if !l2off.is_multiple_of(cs) || l2off + cs > file_len {
            report.errors += 1;
            report.note(format!(
                "ERROR L2 table at {l2off} is misaligned or past the end"
            ));
            continue;
        }
        add(&mut report, l2off, cs, "L2 table");
        let l2 = read_u64s(&file, l2off, (cs / 8) as usize)?;
        for entry in l2.chunks_exact(width) {
            let e = &entry[0];
            // Extended L2: the subcluster bitmap (32 allocation bits, then 32 zero bits).
            if let Some(&bitmap) = entry.get(1) {
                let (alloc, zero) = (bitmap & 0xffff_ffff, bitmap >> 32);
                let compressed = e & (1 << 62) != 0;
                let wrong = if compressed && bitmap != 0 {
                    Some("a compressed cluster with a subcluster bitmap")
                } else if !compressed && alloc & zero != 0 {
                    Some("subclusters both allocated and zero")
                } else if !compressed && alloc != 0 && e & OFFSET_MASK == 0 {
                    Some("allocated subclusters without a host cluster")
                } else {
                    None
                };
                if let Some(what) = wrong {
                    report.errors += 1;
                    report.note(format!("ERROR L2 table at {l2off}: {what} ({bitmap:#x})"));
                }
            }
            if e & (1 << 62) != 0 {
                let off = e & ((1u64 << x) - 1);
                let sectors = ((e & !(3u64 << 62)) >> x) + 1;
                let len = sectors * 512 - (off & 511);
                add(&mut report, off, len, "compressed cluster");
                report.allocated_clusters += u64::from(active);
                continue;
            }
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if !off.is_multiple_of(cs) {
                report.errors += 1;
                report.note(format!(
                    "ERROR data cluster at {off} is not cluster-aligned"
                ));
                continue;
            }
            add(&mut report, off, cs, "data cluster");
            report.allocated_clusters += u64::from(active);
        }
    }
    // Compare with the refcounts on disk, block by block.
    let rb_entries = (cs * 8 / u64::from(h.refcount_bits())) as usize;
    let mut last_used = 0u64;
    for (ri, e) in reftable.iter().enumerate() {
        let rb = e & OFFSET_MASK;
        let first = ri * rb_entries;
        if rb == 0 {
            for (i, r) in refs.iter().enumerate().skip(first).take(rb_entries) {
                if *r > 0 {
                    report.corruptions += 1;
                    report.note(format!(
                        "ERROR cluster {i} refcount=0 reference={r} (no refcount block)"
                    ));
                }
            }
            continue;
        }
        if rb + cs > file_len {
            continue; // counted as an error above
        }
        let mut raw = vec![0u8; cs as usize];
        file.read_exact_at(&mut raw, rb)?;
        let mut counts = refcount::decode(&raw, h.refcount_order);
        let mut changed = false;
        // Only clusters inside the file count, as for qemu-img: a refcount past the end
        // describes space that does not exist yet.
        let inside = clusters.saturating_sub(first).min(counts.len());
        for (i, count) in counts.iter_mut().enumerate().take(inside) {
            let c = first + i;
            let want = u64::from(refs.get(c).copied().unwrap_or(0));
            if *count > 0 || want > 0 {
                last_used = last_used.max(c as u64 + 1);
            }
            if *count == want {
                continue;
            }
            if *count > want {
                report.leaks += 1;
                if want == 0 {
                    report.note(format!("Leaked cluster {c} refcount={count} reference=0"));
                }
            } else {
                report.corruptions += 1;
                report.note(format!(
                    "ERROR cluster {c} refcount={count} reference={want}"
                ));
            }
            if repair && want <= refcount::max(h.refcount_order) {
                if *count > want {
                    report.leaks_fixed += 1;
                } else {
                    report.corruptions_fixed += 1;
                }
                *count = want;
                changed = true;
            }
        }
        if changed {
            file.write_all_at(&refcount::encode(&counts, h.refcount_order), rb)?;
        }
    }
    // References past what the refcount table covers.
    let covered = reftable.len() * rb_entries;
    for (c, r) in refs.iter().enumerate().skip(covered) {
        if *r > 0 {
            report.corruptions += 1;
            report.note(format!(
                "ERROR cluster {c} is referenced but has no refcount"
            ));
        }
    }
    report.image_end_offset = last_used * cs;
    if repair {
        file.sync_all()?;
    }
    Ok(report)
}
