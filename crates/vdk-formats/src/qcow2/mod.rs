//! qcow2, read-write: versions 2 and 3, clusters of 512 B to 2 MiB, any refcount width,
//! zero clusters, discard, compressed clusters (zlib, zstd) and extended L2 entries (read),
//! backing files.
//!
//! # Concurrency
//! One mutex guards the metadata (L1, cached L2 tables and refcount blocks, allocation).
//! Requests hold it only to translate a guest cluster to a host cluster (allocating if they
//! write to a new one); the data itself is read and written outside it, so requests to
//! allocated clusters run in parallel. A cluster being allocated is marked, and writers to
//! the same guest cluster wait for it; readers of it see the old mapping until the new data
//! is in place.
//!
//! # Crash consistency
//! Metadata changes stay in memory until a flush (or a cache eviction), which writes them in
//! dependency order, as qemu does:
//! 1. refcount blocks, then the refcount table entries that point to new ones; fdatasync;
//! 2. L2 tables, then L1 entries; fdatasync;
//! 3. refcount decrements of clusters freed since the last flush (only now, so that a freed
//!    cluster is never reused while an on-disk table still points to it); fdatasync.
//!
//! A crash at any point leaves every on-disk reference pointing at a cluster whose on-disk
//! refcount is at least one: leaks are possible, corruption is not. Guest data written to a
//! new cluster goes to the file before the L2 entry that makes it visible.

// Casts to usize here are of cluster-bounded values (a cluster is at most 2 MiB) and of table
// indexes (tables are at most 32 MiB), checked by the header parser: they fit any usize.
#![allow(clippy::cast_possible_truncation)]

pub mod check;
pub mod compress;
pub mod create;
pub mod header;
pub mod refcount;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use vdk_core::sync;
use vdk_core::sync::lock;

use tracing::{debug, warn};
use vdk_core::{
    check_range, BlockDevice, Capabilities, DiskInfo, Error, ExtentKind, Extents, Result,
};

use header::{incompat, Header, OFFSET_MASK};

const COPIED: u64 = 1 << 63;
/// Clusters mapped under one lock by a read or write batch.
const BATCH: usize = 256;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;

/// The error for qcow2 metadata found wrong while serving requests.
fn corrupt(msg: impl Into<String>) -> Error {
    crate::Corrupt {
        format: crate::Format::Qcow2,
        path: None,
        what: msg.into(),
    }
    .into()
}

/// What a guest cluster maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Map {
    /// Not allocated: the backing file, or zeroes.
    Unallocated,
    /// Reads as zeroes; `host` is a preallocated host cluster (0 if none), owned.
    Zero { host: u64 },
    /// A host cluster; `owned` if its refcount is one (writes go in place).
    Data { host: u64, owned: bool },
    /// Compressed data at `offset`, `len` bytes at most.
    Compressed { offset: u64, len: u64 },
    /// Extended L2: per-subcluster allocation (`alloc`) and zero (`zero`) bitmaps.
    Sub { host: u64, alloc: u32, zero: u32 },
}

#[derive(Debug)]
struct Table {
    entries: Vec<u64>,
    dirty: bool,
}

/// Metadata, under the lock.
#[derive(Debug)]
struct Meta {
    l1: Vec<u64>,
    l1_dirty: BTreeSet<usize>,
    l2: HashMap<u64, Table>,
    reftable: Vec<u64>,
    reftable_dirty: BTreeSet<usize>,
    refblocks: HashMap<u64, Table>,
    /// Host clusters to decrement once the tables no longer pointing at them are on disk.
    pending_free: Vec<u64>,
    /// No free cluster below this index.
    free_hint: u64,
    /// One past the last host cluster in use or allocated (the file may be shorter).
    end_cluster: u64,
    /// Host offsets of all L2 tables and refcount blocks, for overlap checks.
    metadata: HashSet<u64>,
    /// Guest clusters being allocated.
    allocating: HashSet<u64>,
    /// Where the refcount table is (it moves when it grows).
    reftable_offset: u64,
    reftable_clusters: u64,
}

/// Open options.
#[derive(Clone, Debug, Default)]
pub struct Qcow2Options {
    /// Refuse writes.
    pub read_only: bool,
    /// Most bytes the image file may use: allocations past it fail with ENOSPC (an overlay
    /// of fixed size).
    pub max_bytes: Option<u64>,
}

/// A qcow2 image.
#[derive(Debug)]
pub struct Qcow2 {
    file: File,
    path: PathBuf,
    header: Header,
    cluster_bits: u32,
    cluster_size: u64,
    l2_entries: u64,
    rb_entries: u64,
    read_only: bool,
    backing: Option<Arc<dyn BlockDevice>>,
    meta: Mutex<Meta>,
    allocated: Condvar,
    /// Table capacity of each metadata cache before write-back and eviction.
    cache_tables: usize,
    /// Clusters the file may use (see [`Qcow2Options::max_bytes`]).
    max_clusters: u64,
}

impl Qcow2 {
    /// Opens a qcow2 image whose header is `header` (parsed from the file's first cluster)
    /// with `backing` as its backing disk.
    pub fn open(
        path: &Path,
        file: File,
        header: Header,
        backing: Option<Arc<dyn BlockDevice>>,
        opts: &Qcow2Options,
    ) -> io::Result<Qcow2> {
        let refuse = |why: &str| {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{}: {why}", path.display()),
            ))
        };
        if header.crypt_method != 0 {
            return refuse("encrypted qcow2 images are not supported");
        }
        if header.incompatible_features & incompat::DATA_FILE != 0 {
            return refuse("qcow2 images with an external data file are not supported");
        }
        let writable = !opts.read_only;
        if writable {
            let why = if header.nb_snapshots > 0 {
                Some("it has internal snapshots, which vdk reads but does not write")
            } else if header.extended_l2() {
                Some("it has extended L2 entries (subclusters), which vdk reads but does not write")
            } else if header.incompatible_features & incompat::DIRTY != 0 {
                Some("it is marked dirty (refcounts need repair: qemu-img check -r all)")
            } else if header.incompatible_features & incompat::CORRUPT != 0 {
                Some("it is marked corrupt (qemu-img check -r all)")
            } else {
                None
            };
            if let Some(why) = why {
                return refuse(&format!(
                    "cannot open it for writing: {why}; open it read-only"
                ));
            }
        }
        let cluster_size = header.cluster_size();
        let file_len = file.metadata()?.len();
        let read_table = |offset: u64, entries: usize| -> io::Result<Vec<u64>> {
            let mut raw = vec![0u8; entries * 8];
            file.read_exact_at(&mut raw, offset)?;
            Ok(raw
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
                .collect())
        };
        let l1 = read_table(header.l1_table_offset, header.l1_size as usize)?;
        let rt_entries = header.refcount_table_clusters as u64 * cluster_size / 8;
        let reftable = read_table(header.refcount_table_offset, rt_entries as usize)?;
        let mut metadata = HashSet::new();
        for (what, table) in [("L2 table", &l1), ("refcount block", &reftable)] {
            for e in table {
                let off = e & OFFSET_MASK;
                if off == 0 {
                    continue;
                }
                if !off.is_multiple_of(cluster_size)
                    || off + cluster_size > file_len.max(cluster_size)
                {
                    return Err(crate::corrupt(
                        crate::Format::Qcow2,
                        path,
                        format!("{what} at {off} is misaligned or past the end"),
                    ));
                }
                metadata.insert(off);
            }
        }
        let end_cluster = file_len.div_ceil(cluster_size);
        let q = Qcow2 {
            file,
            path: path.to_owned(),
            cluster_bits: header.cluster_bits,
            cluster_size,
            l2_entries: header.l2_entries(),
            rb_entries: cluster_size * 8 / u64::from(header.refcount_bits()),
            read_only: !writable,
            backing,
            meta: Mutex::new(Meta {
                l1,
                l1_dirty: BTreeSet::new(),
                l2: HashMap::new(),
                reftable,
                reftable_dirty: BTreeSet::new(),
                refblocks: HashMap::new(),
                pending_free: Vec::new(),
                free_hint: 1,
                end_cluster,
                metadata,
                allocating: HashSet::new(),
                reftable_offset: header.refcount_table_offset,
                reftable_clusters: u64::from(header.refcount_table_clusters),
            }),
            allocated: Condvar::new(),
            max_clusters: opts.max_bytes.map_or(u64::MAX, |b| b / cluster_size),
            cache_tables: usize::try_from((32u64 << 20) / cluster_size)
                .unwrap_or(64)
                .max(64),
            header,
        };
        if writable {
            q.prepare_for_writing()?;
        }
        Ok(q)
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Clears auto-clear bits (bitmaps vdk does not keep up to date) and makes sure the
    /// refcount table covers every cluster the image can grow to, so that it never has to
    /// grow while serving.
    fn prepare_for_writing(&self) -> io::Result<()> {
        if self.header.version >= 3 && self.header.autoclear_features != 0 {
            // Bytes 88..96: autoclear_features.
            self.file.write_all_at(&0u64.to_be_bytes(), 88)?;
            self.file.sync_data()?;
        }
        let mut m = lock(&self.meta);
        let virt = self.header.size.div_ceil(self.cluster_size);
        let tables = virt.div_ceil(self.l2_entries);
        let need = m.end_cluster + 2 * (virt + tables) + 64;
        let covered = m.reftable.len() as u64 * self.rb_entries;
        if covered < need {
            self.grow_reftable(&mut m, need).map_err(io::Error::other)?;
        }
        Ok(())
    }

    fn io<T>(&self, r: io::Result<T>) -> Result<T> {
        r.map_err(Error::Io)
    }

    /// Whether no cluster of `[offset, offset + len)` is allocated or marked zero in this
    /// image (what its backing file has there does not count).
    fn unallocated(&self, offset: u64, len: u64) -> Result<bool> {
        let mut all = true;
        self.pieces(offset, len, |gc, _, _, _| {
            all &= matches!(self.lookup(&mut lock(&self.meta), gc)?, Map::Unallocated);
            Ok(())
        })?;
        Ok(all)
    }

    /// Grows the virtual disk to `new_size` bytes, growing the L1 table if it is too small:
    /// a new table past everything, written and synced, then the header switched to it (size,
    /// L1 size and offset in one sector), then the old table freed. Shrinks it only where no
    /// cluster past the new end is allocated (the header's size alone changes). Consumes the
    /// image: open it again to use it at its new size.
    pub fn resize(self, new_size: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if new_size < self.header.size
            && !self.unallocated(new_size, self.header.size - new_size)?
        {
            return Err(Error::Io(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "clusters past {new_size} bytes are allocated: a qcow2 image shrinks only \
                     where nothing was ever written (qemu-img resize --shrink drops data)"
                ),
            )));
        }
        if new_size > header::MAX_SIZE {
            return Err(Error::TooLarge {
                len: new_size,
                max: header::MAX_SIZE,
            });
        }
        self.flush()?;
        let cs = self.cluster_size;
        let mut m = lock(&self.meta);
        let entries = new_size.div_ceil(cs).div_ceil(self.l2_entries);
        if entries * 8 > header::MAX_L1_BYTES {
            return Err(Error::TooLarge {
                len: entries * 8,
                max: header::MAX_L1_BYTES,
            });
        }
        // Room in the refcount table for what the larger disk can grow to.
        let virt = new_size.div_ceil(cs);
        let need = m.end_cluster + 2 * (virt + virt.div_ceil(self.l2_entries)) + 64;
        if (m.reftable.len() as u64 * self.rb_entries) < need {
            self.grow_reftable(&mut m, need)?;
        }
        let mut head = Vec::with_capacity(24);
        head.extend_from_slice(&new_size.to_be_bytes());
        head.extend_from_slice(&self.header.crypt_method.to_be_bytes());
        let old_l1 = (self.header.l1_table_offset, u64::from(self.header.l1_size));
        if entries <= old_l1.1 {
            head.extend_from_slice(&self.header.l1_size.to_be_bytes());
            head.extend_from_slice(&self.header.l1_table_offset.to_be_bytes());
        } else {
            let clusters = (entries * 8).div_ceil(cs);
            let start = self.reserve_run(&mut m, clusters)?;
            self.write_refblocks(&mut m)?;
            let mut table = m.l1.clone();
            table.resize((clusters * cs / 8) as usize, 0);
            let raw: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.io(self.file.write_all_at(&raw, start * cs))?;
            self.io(self.file.sync_data())?;
            head.extend_from_slice(&u32::try_from(entries).unwrap_or(u32::MAX).to_be_bytes());
            head.extend_from_slice(&(start * cs).to_be_bytes());
        }
        // Bytes 24..48: size, crypt_method, l1_size, l1_table_offset, in one sector.
        self.io(self.file.write_all_at(&head, 24))?;
        self.io(self.file.sync_data())?;
        if entries > old_l1.1 {
            let old_clusters = (old_l1.1 * 8).div_ceil(cs).max(1);
            self.release(&mut m, old_l1.0, old_clusters * cs);
            self.write_back(&mut m)?;
        }
        Ok(())
    }

    // ---- tables --------------------------------------------------------------------

    fn read_u64s(&self, offset: u64) -> Result<Vec<u64>> {
        let mut raw = vec![0u8; self.cluster_size as usize];
        let n = self.read_some(&mut raw, offset)?;
        raw[n..].fill(0);
        Ok(raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect())
    }

    /// Reads as much as the file has; the rest of `buf` is left as is. Returns bytes read.
    fn read_some(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Io(e)),
            }
        }
        Ok(done)
    }

    /// Checks that a table or data cluster at `off` does not overlap the header, the L1
    /// table or the refcount table.
    fn check_not_fixed_metadata(&self, m: &Meta, off: u64, what: &str) -> Result<()> {
        let h = &self.header;
        let overlaps = |start: u64, len: u64| off < start + len && start < off + self.cluster_size;
        if off == 0
            || overlaps(h.l1_table_offset, u64::from(h.l1_size) * 8)
            || overlaps(m.reftable_offset, m.reftable_clusters * self.cluster_size)
        {
            return Err(corrupt(format!(
                "{what} at {off} overlaps the image's own tables"
            )));
        }
        Ok(())
    }

    /// Loads the L2 table at `off` into the cache.
    fn load_l2(&self, m: &mut Meta, off: u64) -> Result<()> {
        if m.l2.contains_key(&off) {
            return Ok(());
        }
        self.check_not_fixed_metadata(m, off, "L2 table")?;
        self.make_room(m, false)?;
        let entries = self.read_u64s(off)?;
        m.l2.insert(
            off,
            Table {
                entries,
                dirty: false,
            },
        );
        Ok(())
    }

    fn load_refblock(&self, m: &mut Meta, off: u64) -> Result<()> {
        if m.refblocks.contains_key(&off) {
            return Ok(());
        }
        self.check_not_fixed_metadata(m, off, "refcount block")?;
        self.make_room(m, true)?;
        let mut raw = vec![0u8; self.cluster_size as usize];
        let n = self.read_some(&mut raw, off)?;
        raw[n..].fill(0);
        let entries = refcount::decode(&raw, self.header.refcount_order);
        m.refblocks.insert(
            off,
            Table {
                entries,
                dirty: false,
            },
        );
        Ok(())
    }

    /// Keeps a cache under its bound: drops clean tables, writing dirty metadata back first
    /// if that is all there is.
    fn make_room(&self, m: &mut Meta, refblocks: bool) -> Result<()> {
        let len = if refblocks {
            m.refblocks.len()
        } else {
            m.l2.len()
        };
        if len < self.cache_tables {
            return Ok(());
        }
        self.write_back(m)?;
        let cache = if refblocks {
            &mut m.refblocks
        } else {
            &mut m.l2
        };
        cache.retain(|_, t| t.dirty);
        Ok(())
    }

    /// The mapping of guest cluster `gc`, loading its L2 table if needed.
    fn lookup(&self, m: &mut Meta, gc: u64) -> Result<Map> {
        let l1i = (gc / self.l2_entries) as usize;
        let l2i = (gc % self.l2_entries) as usize;
        let Some(l1e) = m.l1.get(l1i).copied() else {
            return Err(corrupt("guest cluster beyond the L1 table"));
        };
        let l2off = l1e & OFFSET_MASK;
        if l2off == 0 {
            return Ok(Map::Unallocated);
        }
        self.load_l2(m, l2off)?;
        let t = &m.l2[&l2off];
        if self.header.extended_l2() {
            let e = t.entries[2 * l2i];
            let bitmap = t.entries[2 * l2i + 1];
            if e & COMPRESSED != 0 {
                return self.compressed(e);
            }
            let host = e & OFFSET_MASK;
            // Bitmaps are 32 + 32 bits: the truncations are the format's.
            #[allow(clippy::cast_possible_truncation)]
            let (alloc, zero) = (bitmap as u32, (bitmap >> 32) as u32);
            if alloc != 0 && host == 0 {
                return Err(corrupt("allocated subclusters without a host cluster"));
            }
            return Ok(Map::Sub { host, alloc, zero });
        }
        let e = t.entries[l2i];
        if e & COMPRESSED != 0 {
            return self.compressed(e);
        }
        let host = e & OFFSET_MASK;
        if self.header.version >= 3 && e & ZERO != 0 {
            // A preallocated zero cluster is reused only if it is ours alone.
            let host = if e & COPIED != 0 { host } else { 0 };
            return Ok(Map::Zero { host });
        }
        if host == 0 {
            return Ok(Map::Unallocated);
        }
        if !host.is_multiple_of(self.cluster_size) {
            return Err(corrupt(format!(
                "data cluster at {host} is not cluster-aligned"
            )));
        }
        Ok(Map::Data {
            host,
            owned: e & COPIED != 0,
        })
    }

    fn compressed(&self, e: u64) -> Result<Map> {
        let x = 62 - (self.cluster_bits - 8);
        let offset = e & ((1u64 << x) - 1);
        let sectors = ((e & !COMPRESSED & !COPIED) >> x) + 1;
        let len = sectors * 512 - (offset & 511);
        if len > 2 * self.cluster_size + 512 {
            return Err(corrupt("compressed cluster larger than a cluster"));
        }
        Ok(Map::Compressed { offset, len })
    }

    // ---- refcounts and allocation ------------------------------------------------------

    fn refcount(&self, m: &mut Meta, cluster: u64) -> Result<u64> {
        let ri = (cluster / self.rb_entries) as usize;
        let Some(rbe) = m.reftable.get(ri).copied() else {
            return Ok(0);
        };
        let rb = rbe & OFFSET_MASK;
        if rb == 0 {
            return Ok(0);
        }
        self.load_refblock(m, rb)?;
        Ok(m.refblocks[&rb].entries[(cluster % self.rb_entries) as usize])
    }

    fn set_refcount(&self, m: &mut Meta, cluster: u64, value: u64) -> Result<()> {
        if value > refcount::max(self.header.refcount_order) {
            return Err(corrupt("refcount overflow"));
        }
        let ri = (cluster / self.rb_entries) as usize;
        if ri >= m.reftable.len() {
            return Err(Error::NoSpace);
        }
        let mut rb = m.reftable[ri] & OFFSET_MASK;
        if rb == 0 {
            // No block for this range: every cluster in it is free. The new block goes in
            // the range's first cluster (or the second, if the first is the one being
            // counted), so that it counts itself.
            let first = ri as u64 * self.rb_entries;
            let home = if first == cluster { first + 1 } else { first };
            rb = home * self.cluster_size;
            let mut entries = vec![0u64; self.rb_entries as usize];
            entries[(home % self.rb_entries) as usize] = 1;
            m.refblocks.insert(
                rb,
                Table {
                    entries,
                    dirty: true,
                },
            );
            m.metadata.insert(rb);
            m.reftable[ri] = rb;
            m.reftable_dirty.insert(ri);
            m.end_cluster = m.end_cluster.max(home + 1);
        }
        self.load_refblock(m, rb)?;
        let t = m
            .refblocks
            .get_mut(&rb)
            .ok_or_else(|| corrupt("refcount block vanished"))?;
        t.entries[(cluster % self.rb_entries) as usize] = value;
        t.dirty = true;
        Ok(())
    }

    /// Allocates one host cluster (refcount 1). Returns its offset and whether it lies past
    /// the end of the file (so reads as zeroes without being written).
    fn alloc(&self, m: &mut Meta) -> Result<(u64, bool)> {
        let limit = m.reftable.len() as u64 * self.rb_entries;
        let mut c = m.free_hint.max(1);
        loop {
            if c >= self.max_clusters {
                warn!(
                    image = %self.path.display(),
                    max_bytes = self.max_clusters * self.cluster_size,
                    "image is full: the write fails with ENOSPC, nothing written before is touched"
                );
                return Err(Error::NoSpace);
            }
            if c >= limit {
                return Err(Error::NoSpace);
            }
            if self.refcount(m, c)? == 0 {
                let fresh = c >= m.end_cluster;
                self.set_refcount(m, c, 1)?;
                m.free_hint = c + 1;
                m.end_cluster = m.end_cluster.max(c + 1);
                return Ok((c * self.cluster_size, fresh));
            }
            c += 1;
        }
    }

    /// Reserves `n` contiguous clusters past everything (refcount 1), with the refcount
    /// blocks their ranges lack placed right after them. Returns the first cluster.
    fn reserve_run(&self, m: &mut Meta, n: u64) -> Result<u64> {
        let rb = self.rb_entries;
        let start = m.end_cluster;
        let mut blocks = 0u64;
        let ranges = loop {
            let end = start + n + blocks;
            let last = (end - 1) / rb;
            if last as usize >= m.reftable.len() {
                return Err(Error::NoSpace);
            }
            let r: Vec<u64> = (start / rb..=last)
                .filter(|ri| m.reftable[*ri as usize] & OFFSET_MASK == 0)
                .collect();
            if r.len() as u64 == blocks {
                break r;
            }
            blocks = r.len() as u64;
        };
        for (i, ri) in ranges.iter().enumerate() {
            let at = (start + n + i as u64) * self.cluster_size;
            let entries = vec![0u64; rb as usize];
            m.refblocks.insert(
                at,
                Table {
                    entries,
                    dirty: true,
                },
            );
            m.metadata.insert(at);
            m.reftable[*ri as usize] = at;
            m.reftable_dirty.insert(*ri as usize);
        }
        for c in start..start + n + blocks {
            self.set_refcount(m, c, 1)?;
        }
        m.end_cluster = start + n + blocks;
        Ok(start)
    }

    /// Releases one reference to each host cluster in `[offset, offset + len)`, after the
    /// next metadata write-back.
    fn release(&self, m: &mut Meta, offset: u64, len: u64) {
        let first = offset / self.cluster_size;
        let last = (offset + len.max(1) - 1) / self.cluster_size;
        m.pending_free.extend(first..=last);
    }

    /// Grows the refcount table to cover `need` clusters: a new table and the refcount
    /// blocks that count it go past the end of the file, are written and synced, then the
    /// header points at the new table, then the old one is freed.
    fn grow_reftable(&self, m: &mut Meta, need: u64) -> Result<()> {
        let cs = self.cluster_size;
        let entries = need
            .div_ceil(self.rb_entries)
            .max(m.reftable.len() as u64 + 1);
        let table_clusters = (entries * 8).div_ceil(cs);
        if table_clusters * cs > header::MAX_REFTABLE_BYTES {
            return Err(Error::TooLarge {
                len: table_clusters * cs,
                max: header::MAX_REFTABLE_BYTES,
            });
        }
        let entries = table_clusters * cs / 8;
        let start = m.end_cluster;
        let old_len = m.reftable.len();
        // Blocks needed for ranges that have none, among [start, start + table + blocks).
        let mut blocks = 0u64;
        let missing = |blocks: u64, m: &Meta| -> Vec<u64> {
            let end = start + table_clusters + blocks;
            (start / self.rb_entries..=(end - 1) / self.rb_entries)
                .filter(|ri| {
                    m.reftable
                        .get(*ri as usize)
                        .is_none_or(|e| e & OFFSET_MASK == 0)
                })
                .collect()
        };
        let ranges = loop {
            let r = missing(blocks, m);
            if r.len() as u64 == blocks {
                break r;
            }
            blocks = r.len() as u64;
        };
        let mut table = m.reftable.clone();
        table.resize(entries as usize, 0);
        let block_start = start + table_clusters;
        let mut new_blocks: HashMap<u64, Vec<u64>> = HashMap::new();
        for (i, ri) in ranges.iter().enumerate() {
            let at = (block_start + i as u64) * cs;
            table[*ri as usize] = at;
            new_blocks.insert(*ri, vec![0; self.rb_entries as usize]);
        }
        for c in start..block_start + blocks {
            let ri = c / self.rb_entries;
            if let Some(b) = new_blocks.get_mut(&ri) {
                b[(c % self.rb_entries) as usize] = 1;
            } else {
                self.set_refcount(m, c, 1)?;
            }
        }
        // Existing blocks that changed, then the new blocks, then the new table.
        self.write_refblocks(m)?;
        for (ri, counts) in &new_blocks {
            let raw = refcount::encode(counts, self.header.refcount_order);
            self.io(self.file.write_all_at(&raw, table[*ri as usize]))?;
        }
        let raw: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.io(self.file.write_all_at(&raw, start * cs))?;
        self.io(self.file.sync_data())?;
        // The header switch: refcount_table_offset (48..56) and clusters (56..60).
        let mut h = Vec::with_capacity(12);
        h.extend_from_slice(&(start * cs).to_be_bytes());
        h.extend_from_slice(
            &u32::try_from(table_clusters)
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        self.io(self.file.write_all_at(&h, 48))?;
        self.io(self.file.sync_data())?;
        let old_offset = m.reftable_offset;
        let old_clusters = (old_len as u64 * 8).div_ceil(cs);
        m.reftable = table;
        for ri in &ranges {
            m.metadata.insert(m.reftable[*ri as usize]);
        }
        m.end_cluster = block_start + blocks;
        m.reftable_offset = start * cs;
        m.reftable_clusters = table_clusters;
        // The old table's clusters are free now.
        for c in 0..old_clusters {
            let cl = old_offset / cs + c;
            self.set_refcount(m, cl, 0)?;
        }
        self.write_refblocks(m)?;
        self.io(self.file.sync_data())?;
        m.free_hint = 1;
        debug!(image = %self.path.display(), entries, "refcount table grown");
        Ok(())
    }

    // ---- write-back --------------------------------------------------------------------

    fn write_refblocks(&self, m: &mut Meta) -> Result<()> {
        for (off, t) in m.refblocks.iter_mut().filter(|(_, t)| t.dirty) {
            let raw = refcount::encode(&t.entries, self.header.refcount_order);
            self.io(self.file.write_all_at(&raw, *off))?;
            t.dirty = false;
        }
        for ri in std::mem::take(&mut m.reftable_dirty) {
            let at = m.reftable_offset + ri as u64 * 8;
            self.io(self.file.write_all_at(&m.reftable[ri].to_be_bytes(), at))?;
        }
        Ok(())
    }

    /// Writes every dirty table in dependency order (module docs), then applies the frees
    /// that became safe.
    fn write_back(&self, m: &mut Meta) -> Result<()> {
        let refs_dirty = !m.reftable_dirty.is_empty() || m.refblocks.values().any(|t| t.dirty);
        let maps_dirty = !m.l1_dirty.is_empty() || m.l2.values().any(|t| t.dirty);
        if refs_dirty {
            self.write_refblocks(m)?;
            self.io(self.file.sync_data())?;
        }
        if maps_dirty {
            for (off, t) in m.l2.iter_mut().filter(|(_, t)| t.dirty) {
                let raw: Vec<u8> = t.entries.iter().flat_map(|e| e.to_be_bytes()).collect();
                self.io(self.file.write_all_at(&raw, *off))?;
                t.dirty = false;
            }
            for i in std::mem::take(&mut m.l1_dirty) {
                let at = self.header.l1_table_offset + i as u64 * 8;
                self.io(self.file.write_all_at(&m.l1[i].to_be_bytes(), at))?;
            }
            self.io(self.file.sync_data())?;
        }
        let frees = std::mem::take(&mut m.pending_free);
        if !frees.is_empty() {
            for c in frees {
                let n = self.refcount(m, c)?;
                if n == 0 {
                    warn!(image = %self.path.display(), cluster = c, "freeing a cluster twice");
                    continue;
                }
                self.set_refcount(m, c, n - 1)?;
                if n == 1 {
                    m.free_hint = m.free_hint.min(c);
                    // Give the space back; a cluster reused later is written whole.
                    let _ = punch_hole(&self.file, c * self.cluster_size, self.cluster_size);
                }
            }
            self.write_refblocks(m)?;
            self.io(self.file.sync_data())?;
        }
        Ok(())
    }
}

/// Frees the space of a range of the file (a hole); errors are for the caller to ignore.
fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use rustix::fs::{fallocate, FallocateFlags};
    fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
    .map_err(io::Error::from)
}

impl Qcow2 {
    // ---- reading -----------------------------------------------------------------------

    fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let avail = b.info().size.saturating_sub(offset).min(buf.len() as u64);
        // avail <= buf.len().
        let n = usize::try_from(avail).unwrap_or(buf.len());
        if n > 0 {
            b.read_at(&mut buf[..n], offset)?;
        }
        buf[n..].fill(0);
        Ok(())
    }

    /// Whether the backing file has nothing (so zeroes) for guest cluster `gc`.
    fn backing_empty(&self, gc: u64) -> bool {
        self.backing
            .as_ref()
            .is_none_or(|b| b.info().size <= gc * self.cluster_size)
    }

    fn decompress(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut input = vec![0u8; usize::try_from(len).unwrap_or(0)];
        let n = self.read_some(&mut input, offset)?;
        input.truncate(n);
        let mut out = vec![0u8; self.cluster_size as usize];
        compress::decompress(self.header.compression, &input, &mut out).map_err(corrupt)?;
        Ok(out)
    }

    /// Fills `buf` with guest bytes from `guest` on, all inside one cluster mapped by `map`.
    fn read_mapped(&self, map: Map, buf: &mut [u8], guest: u64) -> Result<()> {
        let in_cl = guest & (self.cluster_size - 1);
        match map {
            Map::Unallocated => self.read_backing(buf, guest),
            Map::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            Map::Data { host, .. } => {
                let n = self.read_some(buf, host + in_cl)?;
                buf[n..].fill(0);
                Ok(())
            }
            Map::Compressed { offset, len } => {
                let data = self.decompress(offset, len)?;
                let at = in_cl as usize;
                buf.copy_from_slice(&data[at..at + buf.len()]);
                Ok(())
            }
            Map::Sub { host, alloc, zero } => {
                let sub = self.cluster_size / 32;
                let mut done = 0usize;
                while done < buf.len() {
                    let at = in_cl + done as u64;
                    let i = at / sub;
                    let n = ((i + 1) * sub - at).min((buf.len() - done) as u64) as usize;
                    let part = &mut buf[done..done + n];
                    if alloc & (1 << i) != 0 {
                        let got = self.read_some(part, host + at)?;
                        part[got..].fill(0);
                    } else if zero & (1 << i) != 0 {
                        part.fill(0);
                    } else {
                        self.read_backing(part, guest + done as u64)?;
                    }
                    done += n;
                }
                Ok(())
            }
        }
    }

    /// Calls `f` for each piece of `[offset, offset + len)` that lies in one cluster, with the
    /// guest cluster, the offset in it, and the piece's position in the request.
    fn pieces(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, u64, usize, usize) -> Result<()>,
    ) -> Result<()> {
        crate::pieces(offset, len, self.cluster_size, |g, at, n| {
            f(g >> self.cluster_bits, g & (self.cluster_size - 1), at, n)
        })
    }

    // ---- writing -----------------------------------------------------------------------

    /// The L2 table for guest cluster `gc`, allocated (empty) if there is none.
    fn ensure_l2(&self, m: &mut Meta, gc: u64) -> Result<u64> {
        let l1i = (gc / self.l2_entries) as usize;
        let off =
            m.l1.get(l1i)
                .copied()
                .ok_or_else(|| corrupt("guest cluster beyond the L1 table"))?
                & OFFSET_MASK;
        if off != 0 {
            self.load_l2(m, off)?;
            return Ok(off);
        }
        self.make_room(m, false)?;
        let (host, _) = self.alloc(m)?;
        let width = if self.header.extended_l2() { 2 } else { 1 };
        m.l2.insert(
            host,
            Table {
                entries: vec![0; (self.l2_entries * width) as usize],
                dirty: true,
            },
        );
        m.metadata.insert(host);
        m.l1[l1i] = host | COPIED;
        m.l1_dirty.insert(l1i);
        Ok(host)
    }

    /// Sets the L2 entry of `gc` (its table is `l2off`), releasing what the old entry held
    /// unless `keep` is that same host cluster.
    fn set_entry(&self, m: &mut Meta, l2off: u64, gc: u64, entry: u64, old: Map) -> Result<()> {
        self.load_l2(m, l2off)?;
        let t =
            m.l2.get_mut(&l2off)
                .ok_or_else(|| corrupt("L2 table vanished"))?;
        t.entries[(gc % self.l2_entries) as usize] = entry;
        t.dirty = true;
        match old {
            Map::Data { host, .. } | Map::Zero { host }
                if host != 0 && host != entry & OFFSET_MASK =>
            {
                self.release(m, host, self.cluster_size)
            }
            Map::Compressed { offset, len } => self.release(m, offset, len),
            _ => {}
        }
        Ok(())
    }

    /// Waits until no request is allocating guest cluster `gc`, then returns its mapping.
    fn settled<'a>(
        &'a self,
        mut m: MutexGuard<'a, Meta>,
        gc: u64,
    ) -> Result<(MutexGuard<'a, Meta>, Map)> {
        while m.allocating.contains(&gc) {
            m = sync::wait(&self.allocated, m);
        }
        let map = self.lookup(&mut m, gc)?;
        Ok((m, map))
    }

    /// Writes `data` at `in_cl` in guest cluster `gc`.
    fn write_piece(&self, gc: u64, in_cl: u64, data: &[u8]) -> Result<()> {
        let (mut m, map) = self.settled(lock(&self.meta), gc)?;
        if let Map::Data { host, owned: true } = map {
            if m.metadata.contains(&host) {
                return Err(corrupt(format!("data cluster at {host} is also a table")));
            }
            self.check_not_fixed_metadata(&m, host, "data cluster")?;
            drop(m);
            return self.io(self.file.write_all_at(data, host + in_cl));
        }
        // A new cluster (or a preallocated zero one): reserve it, fill it outside the lock,
        // then map it.
        m.allocating.insert(gc);
        let reserved = self.ensure_l2(&mut m, gc).and_then(|l2| match map {
            Map::Zero { host } if host != 0 => Ok((l2, (host, false))),
            _ => Ok((l2, self.alloc(&mut m)?)),
        });
        drop(m);
        let written = match &reserved {
            Ok((_, (host, fresh))) => self.fill_new_cluster(gc, in_cl, data, map, *host, *fresh),
            Err(_) => Ok(()),
        };
        let mut m = lock(&self.meta);
        m.allocating.remove(&gc);
        self.allocated.notify_all();
        let (l2off, (host, _)) = reserved?;
        if let Err(e) = written {
            // A new cluster that was never mapped: give it back.
            if !matches!(map, Map::Zero { host: h } if h == host) {
                self.release(&mut m, host, self.cluster_size);
            }
            return Err(e);
        }
        self.set_entry(&mut m, l2off, gc, host | COPIED, map)
    }

    /// Writes a new host cluster: the guest's bytes, and around them what the cluster held
    /// before (backing data, decompressed data, a shared cluster's data, or zeroes).
    fn fill_new_cluster(
        &self,
        gc: u64,
        in_cl: u64,
        data: &[u8],
        old: Map,
        host: u64,
        fresh: bool,
    ) -> Result<()> {
        let cs = self.cluster_size;
        if in_cl == 0 && data.len() as u64 == cs {
            return self.io(self.file.write_all_at(data, host));
        }
        let zero_before = match old {
            Map::Zero { .. } => true,
            Map::Unallocated => self.backing_empty(gc),
            _ => false,
        };
        if zero_before && fresh {
            // Past the end of the file: the rest of the cluster already reads as zeroes.
            self.io(self.file.write_all_at(data, host + in_cl))?;
            // Make the file cover the whole cluster, so that readers (qemu among them) see
            // the cluster's zeroes rather than the end of the file. A write, not set_len:
            // writes only ever extend a file, while a set_len racing with another
            // allocation could cut that one's data off.
            if in_cl + data.len() as u64 != cs {
                self.io(self.file.write_all_at(&[0], host + cs - 1))?;
            }
            return Ok(());
        }
        let mut cluster = vec![0u8; cs as usize];
        if !zero_before {
            self.read_mapped(old, &mut cluster, gc * cs)?;
        }
        let at = in_cl as usize;
        cluster[at..at + data.len()].copy_from_slice(data);
        self.io(self.file.write_all_at(&cluster, host))
    }

    /// Makes whole guest cluster `gc` read as zeroes.
    fn zero_cluster(&self, gc: u64, may_trim: bool) -> Result<()> {
        let (mut m, map) = self.settled(lock(&self.meta), gc)?;
        let no_backing = self.backing_empty(gc);
        let keep = match map {
            Map::Data { host, owned: true } | Map::Zero { host } if !may_trim && host != 0 => {
                Some(host)
            }
            _ => None,
        };
        let entry = match (self.header.version >= 3, keep) {
            (true, Some(host)) => host | COPIED | ZERO,
            (true, None) if no_backing => 0,
            (true, None) => ZERO,
            (false, _) if no_backing && keep.is_none() => 0,
            (false, _) => {
                // Version 2 has no zero flag: write the zeroes.
                drop(m);
                return self.write_piece(gc, 0, &vec![0u8; self.cluster_size as usize]);
            }
        };
        if entry == 0 && map == Map::Unallocated {
            return Ok(());
        }
        if entry == ZERO && map == (Map::Zero { host: 0 }) {
            return Ok(());
        }
        let l2 = self.ensure_l2(&mut m, gc)?;
        self.set_entry(&mut m, l2, gc, entry, map)?;
        if keep.is_none() && entry == 0 {
            debug!(cluster = gc, "cluster discarded");
        }
        Ok(())
    }

    /// Reads from `buf[at..]` on: maps up to [`BATCH`] clusters under one lock, then reads
    /// runs of clusters that lie end to end in the file with one call each. Returns the
    /// bytes done.
    fn read_batch(&self, buf: &mut [u8], offset: u64, at: usize) -> Result<usize> {
        let cs = self.cluster_size;
        let mut maps = Vec::new();
        {
            let mut m = lock(&self.meta);
            let mut p = at;
            while p < buf.len() && maps.len() < BATCH {
                let g = offset + p as u64;
                let n = ((cs - (g & (cs - 1))) as usize).min(buf.len() - p);
                maps.push((p, n, self.lookup(&mut m, g >> self.cluster_bits)?));
                p += n;
            }
        }
        let mut i = 0;
        while i < maps.len() {
            let (p, n, map) = maps[i];
            let g = offset + p as u64;
            let Map::Data { host, .. } = map else {
                self.read_mapped(map, &mut buf[p..p + n], g)?;
                i += 1;
                continue;
            };
            let start = host + (g & (cs - 1));
            let mut len = n;
            let mut j = i + 1;
            while let Some(&(_, n2, Map::Data { host: h2, .. })) = maps.get(j) {
                if h2 != start + len as u64 {
                    break;
                }
                len += n2;
                j += 1;
            }
            let got = self.read_some(&mut buf[p..p + len], start)?;
            buf[p + got..p + len].fill(0);
            i = j;
        }
        Ok(maps.iter().map(|(_, n, _)| n).sum())
    }

    /// Writes from `buf[at..]` on, as far as it can in one batch: a run of owned clusters
    /// that lie end to end in the file (one write), or a run of whole clusters that need new
    /// host clusters (allocated under one lock, written with one call per contiguous run).
    /// Returns the bytes done, 0 if the first cluster needs the general path.
    fn write_batch(&self, buf: &[u8], offset: u64, at: usize) -> Result<usize> {
        let cs = self.cluster_size;
        let mut m = lock(&self.meta);
        let piece = |p: usize| {
            let g = offset + p as u64;
            let in_cl = g & (cs - 1);
            (
                g >> self.cluster_bits,
                in_cl,
                ((cs - in_cl) as usize).min(buf.len() - p),
            )
        };
        // In place.
        let mut p = at;
        let mut start = None;
        while p < buf.len() && p - at < BATCH * cs as usize {
            let (gc, in_cl, n) = piece(p);
            if m.allocating.contains(&gc) {
                break;
            }
            let Map::Data { host, owned: true } = self.lookup(&mut m, gc)? else {
                break;
            };
            if m.metadata.contains(&host)
                || self
                    .check_not_fixed_metadata(&m, host, "data cluster")
                    .is_err()
            {
                break;
            }
            let here = host + in_cl;
            match start {
                None => start = Some(here),
                Some(s) if s + (p - at) as u64 == here => {}
                Some(_) => break,
            }
            p += n;
        }
        if let Some(start) = start {
            drop(m);
            self.io(self.file.write_all_at(&buf[at..p], start))?;
            return Ok(p - at);
        }
        // Whole new clusters.
        let mut allocs: Vec<(u64, u64, Map, u64, usize)> = Vec::new();
        let mut p = at;
        let mut stopped = None;
        while p < buf.len() && allocs.len() < BATCH {
            let (gc, in_cl, n) = piece(p);
            if in_cl != 0 || n as u64 != cs || m.allocating.contains(&gc) {
                break;
            }
            let map = self.lookup(&mut m, gc)?;
            if matches!(map, Map::Data { owned: true, .. } | Map::Sub { .. }) {
                break;
            }
            let reserved = self.ensure_l2(&mut m, gc).and_then(|l2| match map {
                Map::Zero { host } if host != 0 => Ok((l2, host)),
                _ => Ok((l2, self.alloc(&mut m)?.0)),
            });
            match reserved {
                Ok((l2, host)) => {
                    m.allocating.insert(gc);
                    allocs.push((gc, host, map, l2, p));
                    p += n;
                }
                Err(e) => {
                    stopped = Some(e);
                    break;
                }
            }
        }
        if allocs.is_empty() {
            return stopped.map_or(Ok(0), Err);
        }
        drop(m);
        let mut written = Ok(());
        let mut i = 0;
        while i < allocs.len() && written.is_ok() {
            let mut j = i + 1;
            while j < allocs.len() && allocs[j].1 == allocs[j - 1].1 + cs {
                j += 1;
            }
            let (from, to) = (allocs[i].4, allocs[j - 1].4 + cs as usize);
            written = self.io(self.file.write_all_at(&buf[from..to], allocs[i].1));
            i = j;
        }
        let mut m = lock(&self.meta);
        let mut mapped = Ok(());
        for (gc, host, old, l2, _) in &allocs {
            m.allocating.remove(gc);
            if written.is_ok() && mapped.is_ok() {
                mapped = self.set_entry(&mut m, *l2, *gc, host | COPIED, *old);
            } else if !matches!(old, Map::Zero { host: h } if h == host) {
                self.release(&mut m, *host, cs);
            }
        }
        self.allocated.notify_all();
        written?;
        mapped?;
        Ok(allocs.len() * cs as usize)
    }

    fn writable(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(self.header.size, offset, len)
    }
}

impl BlockDevice for Qcow2 {
    fn info(&self) -> DiskInfo {
        let mut info = DiskInfo::new(self.header.size);
        info.read_only = self.read_only;
        info.preferred_request = u32::try_from(self.cluster_size).unwrap_or(4096).max(4096);
        info.caps = Capabilities {
            flush: true,
            fua: true,
            trim: !self.read_only,
            fast_zero: !self.read_only && (self.header.version >= 3 || self.backing.is_none()),
            extents: true,
            multi_conn: true,
            ..Capabilities::NONE
        };
        info
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.header.size, offset, buf.len() as u64)?;
        let mut at = 0;
        while at < buf.len() {
            at += self.read_batch(buf, offset, at)?;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.writable(offset, buf.len() as u64)?;
        let mut at = 0;
        while at < buf.len() {
            let done = self.write_batch(buf, offset, at)?;
            if done > 0 {
                at += done;
                continue;
            }
            let g = offset + at as u64;
            let in_cl = g & (self.cluster_size - 1);
            let n = ((self.cluster_size - in_cl) as usize).min(buf.len() - at);
            self.write_piece(g >> self.cluster_bits, in_cl, &buf[at..at + n])?;
            at += n;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if !self.read_only {
            self.write_back(&mut lock(&self.meta))?;
        }
        self.io(self.file.sync_data())
    }

    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true, false)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<()> {
        self.writable(offset, len)?;
        let cs = self.cluster_size;
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let in_cl = pos & (cs - 1);
            let n = (cs - in_cl).min(end - pos);
            let gc = pos >> self.cluster_bits;
            if n == cs {
                self.zero_cluster(gc, may_trim)?;
            } else {
                // A partial cluster: zero it unless it reads as zeroes already.
                let map = self.lookup(&mut lock(&self.meta), gc)?;
                let zero_now = matches!(map, Map::Zero { .. })
                    || (map == Map::Unallocated && self.backing_empty(gc));
                if !zero_now {
                    self.write_piece(gc, in_cl, &vec![0u8; n as usize])?;
                }
            }
            pos += n;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Extents> {
        check_range(self.header.size, offset, len)?;
        // Runs of (length, kind), None for "what the backing disk has there".
        let mut runs: Vec<(u64, Option<ExtentKind>)> = Vec::new();
        self.pieces(offset, len, |gc, _, _, n| {
            let map = self.lookup(&mut lock(&self.meta), gc)?;
            let kind = match map {
                Map::Zero { .. } => Some(ExtentKind::Zero),
                Map::Unallocated if self.backing_empty(gc) => Some(ExtentKind::Hole),
                Map::Unallocated => None,
                Map::Sub {
                    alloc: 0,
                    zero: u32::MAX,
                    ..
                } => Some(ExtentKind::Zero),
                _ => Some(ExtentKind::Data),
            };
            match runs.last_mut() {
                Some((l, k)) if *k == kind => *l += n as u64,
                _ => runs.push((n as u64, kind)),
            }
            Ok(())
        })?;
        let mut e = Extents::new(offset);
        let mut at = offset;
        for (n, kind) in runs {
            match (kind, &self.backing) {
                (Some(k), _) => e.push(n, k),
                (None, Some(b)) => {
                    // Unallocated here: the backing disk's own map, holes past its end.
                    let bsize = b.info().size;
                    let inside = bsize.saturating_sub(at).min(n);
                    if inside > 0 {
                        for (_, run) in b.extents(at, inside)?.iter() {
                            e.push(run.len, run.kind);
                        }
                    }
                    e.push(n - inside, ExtentKind::Hole);
                }
                (None, None) => e.push(n, ExtentKind::Hole),
            }
            at += n;
        }
        Ok(e)
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        if self.read_only {
            return;
        }
        // Twice: the second pass writes the refcounts of clusters freed by the first.
        let m = self.meta.get_mut().unwrap_or_else(PoisonError::into_inner);
        let mut m = std::mem::replace(m, empty_meta());
        for _ in 0..2 {
            if let Err(e) = self.write_back(&mut m) {
                warn!(image = %self.path.display(), error = %e, "metadata write-back at close failed");
                return;
            }
        }
    }
}

fn empty_meta() -> Meta {
    Meta {
        l1: Vec::new(),
        l1_dirty: BTreeSet::new(),
        l2: HashMap::new(),
        reftable: Vec::new(),
        reftable_dirty: BTreeSet::new(),
        refblocks: HashMap::new(),
        pending_free: Vec::new(),
        free_hint: 0,
        end_cluster: 0,
        metadata: HashSet::new(),
        allocating: HashSet::new(),
        reftable_offset: 0,
        reftable_clusters: 0,
    }
}
