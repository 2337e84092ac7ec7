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
//!
//! # Files
//! This one opens, resizes and closes an image; `meta` holds the metadata (tables, refcounts
//! and allocation, write-back in order); `data` the data path (reads, writes, zeroes,
//! extents: the `BlockDevice`).

// Casts to usize here are of cluster-bounded values (a cluster is at most 2 MiB) and of table
// indexes (tables are at most 32 MiB), checked by the header parser: they fit any usize.
#![allow(clippy::cast_possible_truncation)]

pub mod bitmaps;
pub mod check;
pub mod compress;
pub mod create;
mod data;
pub mod header;
mod meta;
pub mod refcount;
pub mod snapshot;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use vdk_core::sync;
use vdk_core::sync::lock;
use vdk_core::sys::FileExt;

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
    /// Extended L2, subclusters mixed: per-subcluster allocation (`alloc`) and zero (`zero`)
    /// bitmaps; `owned` if the host cluster's refcount is one.
    Sub {
        host: u64,
        alloc: u32,
        zero: u32,
        owned: bool,
    },
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
    /// Where the L1 table is (it moves when the disk grows past it).
    l1_offset: u64,
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
    /// The passphrase of an image encrypted with LUKS (`encrypt.format=luks`).
    pub key: Option<crate::luks::Secret>,
    /// Opened for writing by one who keeps its dirty bitmaps up to date (through
    /// [`vdk_core::bitmap::BitmapStore`]): they are read and marked in use instead of
    /// being invalidated.
    pub keep_bitmaps: bool,
    /// Opened to change its tables only (snapshots, size): an encrypted image needs no key,
    /// and then its data can be neither read nor written.
    pub tables_only: bool,
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
    /// The virtual size: the header's, until the disk grows while open.
    size: AtomicU64,
    /// Held while resizing or rewriting the header's extensions (saving bitmaps), so that
    /// two header changes never interleave.
    resizing: Mutex<()>,
    meta: Mutex<Meta>,
    allocated: Condvar,
    /// Table capacity of each metadata cache before write-back and eviction.
    cache_tables: usize,
    /// Clusters the file may use (see [`Qcow2Options::max_bytes`]).
    max_clusters: u64,
    /// The data's cipher, for an image encrypted with LUKS: every data cluster is AES-XTS
    /// with its 512-byte sectors' host offsets as IVs (QEMU's layout); metadata is clear.
    crypto: Option<crate::luks::SectorCipher>,
    /// Encrypted, opened without its key ([`Qcow2Options::tables_only`]): no data access.
    keyless: bool,
    /// Its persistent dirty bitmaps, when kept ([`Qcow2Options::keep_bitmaps`]).
    bitmap_state: Mutex<bitmaps::State>,
}

/// A dirty image (written with lazy refcounts and not closed cleanly: its refcounts may be
/// short of its references) opened for writing: its refcounts are rebuilt from the references,
/// as QEMU does on opening it, and the dirty bit is cleared, so that no allocation lands on a
/// live cluster. What cannot be rebuilt (a reference past the refcount table, a broken
/// table) refuses the open.
fn rebuild_refcounts(path: &Path, file: &File, header: &mut Header) -> io::Result<()> {
    let report = check::check(path, header, true)?;
    let unfixed = report.corruptions.saturating_sub(report.corruptions_fixed);
    if report.errors > 0 || unfixed > 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: it is marked dirty and its refcounts cannot be rebuilt ({} errors): \
                 qemu-img check -r all, or open it read-only",
                path.display(),
                report.errors + unfixed
            ),
        ));
    }
    let features = header.incompatible_features & !incompat::DIRTY;
    file.write_all_at(&features.to_be_bytes(), header::INCOMPATIBLE_FEATURES_AT)?;
    file.sync_data()?;
    header.incompatible_features = features;
    tracing::info!(
        image = %path.display(),
        corruptions = report.corruptions_fixed,
        leaks = report.leaks_fixed,
        "the qcow2 image was left dirty (lazy refcounts, not closed cleanly): its refcounts \
         were rebuilt before writing"
    );
    Ok(())
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
        let crypto =
            match (header.crypt_method, header.crypto_header) {
                (0, _) => None,
                (1, _) => {
                    return refuse(
                        "it is encrypted with qcow2's legacy AES-CBC, which vdk does not serve \
                     (insecure; qemu-img convert it to encrypt.format=luks)",
                    )
                }
                (2, Some(_)) if opts.tables_only && opts.key.is_none() => None,
                (2, Some((at, _))) => {
                    let Some(key) = &opts.key else {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!(
                                "{}: it is encrypted (LUKS): give its passphrase with --key-file \
                             FILE or --key-secret ENV",
                                path.display()
                            ),
                        ));
                    };
                    Some(crate::luks::open_embedded(&file, at, key).map_err(|e| {
                        io::Error::new(e.kind(), format!("{}: {e}", path.display()))
                    })?)
                }
                (2, None) => {
                    return Err(crate::corrupt(
                        crate::Format::Qcow2,
                        path,
                        "encrypted with LUKS but has no encryption header extension",
                    ))
                }
                (m, _) => return refuse(&format!("unknown encryption method {m}")),
            };
        if header.incompatible_features & incompat::DATA_FILE != 0 {
            return refuse("qcow2 images with an external data file are not supported");
        }
        let writable = !opts.read_only;
        let mut header = header;
        if writable {
            let why = if header.incompatible_features & incompat::CORRUPT != 0 {
                Some("it is marked corrupt (qemu-img check -r all)")
            } else {
                None
            };
            if let Some(why) = why {
                return refuse(&format!(
                    "cannot open it for writing: {why}; open it read-only"
                ));
            }
            if header.incompatible_features & incompat::DIRTY != 0 {
                rebuild_refcounts(path, &file, &mut header)?;
                // The rebuilt refcounts did not count the bitmaps' clusters: they go.
                header.bitmaps = None;
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
            size: AtomicU64::new(header.size),
            resizing: Mutex::new(()),
            meta: Mutex::new(Meta {
                l1,
                l1_offset: header.l1_table_offset,
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
            keyless: header.crypt_method != 0 && crypto.is_none(),
            crypto,
            max_clusters: opts.max_bytes.map_or(u64::MAX, |b| b / cluster_size),
            cache_tables: usize::try_from((32u64 << 20) / cluster_size)
                .unwrap_or(64)
                .max(64),
            header,
            bitmap_state: Mutex::default(),
        };
        if writable {
            q.prepare_for_writing(opts.keep_bitmaps)?;
        }
        Ok(q)
    }

    /// The header as it was read at open (a grow while open changes the size and L1 table
    /// on disk, not this copy).
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The virtual size now.
    pub(crate) fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Clears auto-clear bits (those of features not kept up to date: the bitmaps, unless
    /// `keep_bitmaps`, which reads them and marks them in use) and makes sure the refcount
    /// table covers every cluster the image can grow to, so that it never has to grow while
    /// serving.
    fn prepare_for_writing(&self, keep_bitmaps: bool) -> io::Result<()> {
        let h = &self.header;
        let keep = keep_bitmaps
            && h.bitmaps.is_some()
            && h.autoclear_features & bitmaps::AUTOCLEAR_BITMAPS != 0;
        let autoclear = if keep { bitmaps::AUTOCLEAR_BITMAPS } else { 0 };
        if h.version >= 3 && h.autoclear_features != autoclear {
            // Bytes 88..96: autoclear_features.
            self.file.write_all_at(&autoclear.to_be_bytes(), 88)?;
            self.file.sync_data()?;
        }
        if keep {
            self.load_bitmaps()?;
        }
        let mut m = lock(&self.meta);
        let virt = self.size().div_ceil(self.cluster_size);
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
    /// cluster past the new end is allocated (the header's size alone changes); that only
    /// while nothing else uses the image (`vdk resize` of a closed one). Requests may run
    /// meanwhile when it grows: the tables switch under the metadata lock, and the new size
    /// is said only once the header on disk has it.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        self.resize_mapped_to(new_size, new_size, 0)
    }

    /// [`Qcow2::resize`], where a shrink needs nothing mapped from `mapped_to` on (past the
    /// new size, or the end of the cluster holding it), and the L1 table gets at least
    /// `l1_entries` entries (a snapshot's, which may map VM state past the disk's end).
    pub(super) fn resize_mapped_to(
        &self,
        new_size: u64,
        mapped_to: u64,
        l1_entries: u64,
    ) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let _one = lock(&self.resizing);
        let size = self.size();
        if new_size < size && mapped_to < size && !self.unallocated(mapped_to, size - mapped_to)? {
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
        let entries = new_size
            .div_ceil(cs)
            .div_ceil(self.l2_entries)
            .max(l1_entries);
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
        let old_l1 = (m.l1_offset, m.l1.len() as u64);
        let mut new_l1 = old_l1;
        if entries <= old_l1.1 {
            let l1_size = u32::try_from(old_l1.1).unwrap_or(u32::MAX);
            head.extend_from_slice(&l1_size.to_be_bytes());
            head.extend_from_slice(&old_l1.0.to_be_bytes());
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
            new_l1 = (start * cs, entries);
        }
        // Bytes 24..48: size, crypt_method, l1_size, l1_table_offset, in one sector.
        self.io(self.file.write_all_at(&head, 24))?;
        self.io(self.file.sync_data())?;
        m.l1_offset = new_l1.0;
        m.l1.resize(new_l1.1 as usize, 0);
        self.size.store(new_size, Ordering::Release);
        if entries > old_l1.1 {
            let old_clusters = (old_l1.1 * 8).div_ceil(cs).max(1);
            self.release(&mut m, old_l1.0, old_clusters * cs);
            self.write_back(&mut m)?;
        }
        Ok(())
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
        l1_offset: 0,
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
