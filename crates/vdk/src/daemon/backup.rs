//! Dirty bitmaps and backups of open disks.
//!
//! A backup is of the disk as it was at one moment, though writes go on while it copies:
//! that moment is taken while no request is in flight ([`Tracked::quiesced`]), and from then
//! on a write to a part not yet copied first has the backup copy what it overwrites (copy
//! before write). An incremental backup copies what its bitmap marked at that moment, into a
//! qcow2 image whose backing file is the previous backup; the bitmap starts again clean then,
//! and gets its marks back if the backup fails.
// Buffers are at most CHUNK bytes.
#![allow(clippy::cast_possible_truncation)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{info, warn};
use vdk_core::bitmap::{DirtyBitmap, Frozen, DEFAULT_GRANULARITY};
use vdk_core::sync::lock;
use vdk_core::BlockDevice;
use vdk_formats::{CreateOptions, Format, OpenOptions};

use super::disks::Disk;
use super::tracked::{BeforeWrite, Tracked};
use super::Daemon;
use crate::control::{
    ApiError, BackupReport, BackupRequest, BitmapAction, BitmapRequest, BitmapStatus, ErrorKind,
};

/// Most bytes read at a time (a granule larger than this is read in pieces).
const CHUNK: u64 = 1 << 20;

/// A backup being made: the granules still to copy, and where to.
#[derive(Debug)]
struct Job {
    /// What is left to copy; a granule is copied (by the copier, or by a write about to
    /// change it) with this held, then unmarked.
    pending: Mutex<Pending>,
    dest: Arc<dyn BlockDevice>,
    /// A full backup into an image of its own: zeroes need no recording.
    full: bool,
    /// Bytes of data written to `dest`.
    copied: AtomicU64,
    /// The first failure; the backup is then abandoned.
    failed: Mutex<Option<String>>,
}

/// The granules still to copy, and the buffer copies go through (one copy at a time).
#[derive(Debug)]
struct Pending {
    left: Frozen,
    buf: Vec<u8>,
}

impl Job {
    /// Copies the granules of `[from, to)` still pending, runs of them at a time (up to
    /// [`CHUNK`] bytes per read), and unmarks them.
    fn copy(&self, p: &mut Pending, below: &dyn BlockDevice, from: u64, to: u64) {
        let g = p.left.granularity();
        let size = self.dest.info().size;
        let to = to.min(size);
        let mut at = from - from % g;
        while at < to {
            if !p.left.is_dirty(at) {
                at += g;
                continue;
            }
            let start = at;
            while at < to && p.left.is_dirty(at) && (at == start || at - start + g <= CHUNK) {
                p.left.unmark(at);
                at += g;
            }
            if lock(&self.failed).is_none() {
                let end = at.min(size);
                if let Err(e) = self.copy_run(&mut p.buf, below, start, end) {
                    lock(&self.failed).get_or_insert_with(|| format!("at byte {start}: {e}"));
                }
            }
        }
    }

    /// Copies `[start, end)` of `below` into the backup, [`CHUNK`] bytes at a time; zeroes are
    /// recorded as such (or, in a full backup, left out).
    fn copy_run(
        &self,
        buf: &mut Vec<u8>,
        below: &dyn BlockDevice,
        start: u64,
        end: u64,
    ) -> vdk_core::Result<()> {
        let mut at = start;
        while at < end {
            let n = CHUNK.min(end - at);
            buf.resize(n as usize, 0);
            below.read_at(buf, at)?;
            if buf.iter().all(|b| *b == 0) {
                if !self.full {
                    self.dest.write_zeroes(at, n, false, false)?;
                }
            } else {
                self.copied.fetch_add(n, Ordering::Relaxed);
                self.dest.write_at(buf, at, false)?;
            }
            at += n;
        }
        Ok(())
    }
}

impl BeforeWrite for Job {
    fn before_write(&self, below: &dyn BlockDevice, offset: u64, len: u64) {
        self.copy(
            &mut lock(&self.pending),
            below,
            offset,
            offset.saturating_add(len),
        );
    }
}

impl Daemon {
    /// Adds, removes, clears or lists a disk's dirty bitmaps.
    pub(super) fn bitmap(&self, req: &BitmapRequest) -> Result<Vec<BitmapStatus>, ApiError> {
        let _one_at_a_time = lock(&self.changing);
        let disk = self.disks.find(&req.disk)?;
        let bitmaps = disk.device.bitmaps();
        let name = || {
            req.name
                .as_deref()
                .ok_or_else(|| ApiError::invalid("which bitmap? (name)"))
        };
        match req.action {
            BitmapAction::List => {}
            BitmapAction::Add => {
                let store = lock(&disk.recipe).bitmap_store.clone();
                if req.persistent && store.is_none() {
                    return Err(ApiError::new(
                        ErrorKind::Unsupported,
                        format!("{} cannot keep bitmaps: only a qcow2 image (version 3) opened for writing, without a cow or partition filter, can", disk.id),
                    ));
                }
                #[cfg(target_os = "linux")]
                if disk.attach == crate::control::Attach::FuseLoop && self.attacher.passthrough() {
                    return Err(ApiError::new(
                        ErrorKind::Unsupported,
                        format!("{}'s block device writes its image itself (the daemon's --fuse-passthrough): no bitmap could see those writes", disk.id),
                    ));
                }
                let size = disk.device.info().size;
                let g = req.granularity.unwrap_or(DEFAULT_GRANULARITY);
                let b = DirtyBitmap::new(size, g)
                    .map_err(ApiError::invalid)?
                    .persistent(req.persistent);
                bitmaps.add(name()?, b).map_err(ApiError::invalid)?;
                if req.persistent {
                    if let Err(e) = save(&disk, store.as_deref()) {
                        let _ = bitmaps.remove(name()?);
                        return Err(e);
                    }
                }
                info!(id = %disk.id, bitmap = name()?, granularity = g, persistent = req.persistent, "dirty bitmap added");
            }
            BitmapAction::Remove => {
                let gone = bitmaps.remove(name()?).map_err(not_found)?;
                if gone.is_persistent() {
                    let store = lock(&disk.recipe).bitmap_store.clone();
                    if let Err(e) = save(&disk, store.as_deref()) {
                        bitmaps.insert(name()?, gone).map_err(ApiError::invalid)?;
                        return Err(e);
                    }
                }
                lock(&disk.backups).remove(name()?);
                info!(id = %disk.id, bitmap = name()?, "dirty bitmap removed");
            }
            BitmapAction::Clear => {
                find(&disk, name()?)?.clear();
                info!(id = %disk.id, bitmap = name()?, "dirty bitmap cleared");
            }
        }
        Ok(bitmap_status(&disk))
    }

    /// Copies an open disk into a new qcow2 image: all of it, or what a bitmap marks.
    pub(super) fn backup(&self, req: BackupRequest) -> Result<BackupReport, ApiError> {
        let disk = {
            let _one_at_a_time = lock(&self.changing);
            self.disks.find(&req.disk)?
        };
        if !req.target.is_absolute() {
            return Err(ApiError::invalid("the backup's path must be absolute"));
        }
        let bitmap = req.bitmap.as_deref().map(|n| find(&disk, n)).transpose()?;
        if bitmap.as_ref().is_some_and(|b| b.is_inconsistent()) {
            return Err(ApiError::invalid(format!(
                "bitmap {:?} is inconsistent (the image was not closed cleanly, so it may have missed writes): remove it, add a new one and make a full backup",
                req.bitmap.as_deref().unwrap_or_default()
            )));
        }
        let base = if req.incremental {
            let Some(name) = &req.bitmap else {
                return Err(ApiError::invalid(
                    "an incremental backup needs the bitmap that marks what changed (--bitmap)",
                ));
            };
            let last = lock(&disk.backups).get(name).cloned();
            let Some(base) = req.base.clone().or(last) else {
                return Err(ApiError::invalid(format!(
                    "no earlier backup made with bitmap {name:?}: make a full one first, or name the last one (--base)"
                )));
            };
            if !base.is_file() {
                return Err(ApiError::new(
                    ErrorKind::NotFound,
                    format!("the previous backup {} is not there", base.display()),
                ));
            }
            Some(base)
        } else {
            None
        };
        let g = bitmap
            .as_ref()
            .map_or(DEFAULT_GRANULARITY, |b| b.granularity());
        let size = disk.device.info().size;
        if disk.device.is_backing_up() {
            return Err(ApiError::new(
                ErrorKind::Busy,
                format!("{} is being backed up already", disk.id),
            ));
        }
        let dest = make_target(&req.target, size, base.as_deref())?;
        let full = base.is_none();
        // The backup's moment: no request in flight, none starts until the copying is set up.
        let started = disk.device.quiesced(|| {
            if disk.device.is_backing_up() {
                return None;
            }
            let taken = match (&bitmap, full) {
                (Some(b), false) => b.take(),
                (Some(b), true) => {
                    b.clear();
                    Frozen::full(size, g)
                }
                (None, _) => Frozen::full(size, g),
            };
            let job = Arc::new(Job {
                pending: Mutex::new(Pending {
                    left: taken.clone(),
                    buf: Vec::new(),
                }),
                dest,
                full,
                copied: AtomicU64::new(0),
                failed: Mutex::new(None),
            });
            disk.device
                .set_before_write(Some(Arc::clone(&job) as Arc<dyn BeforeWrite>));
            Some((job, taken))
        });
        let Some((job, taken)) = started else {
            let _ = std::fs::remove_file(&req.target);
            return Err(ApiError::new(
                ErrorKind::Busy,
                format!("{} is being backed up already", disk.id),
            ));
        };
        info!(id = %disk.id, target = %req.target.display(), incremental = req.incremental, "backup started");
        let done = Arc::new(AtomicU64::new(0));
        *lock(&disk.backup) = Some(Running {
            target: req.target.clone(),
            total: taken.dirty().iter().map(|(_, l)| l).sum(),
            done: Arc::clone(&done),
        });
        let scanned = copy_all(&disk.device, &job, &taken, &done);
        *lock(&disk.backup) = None;
        disk.device.set_before_write(None);
        let failed = lock(&job.failed).take();
        let result = match failed {
            Some(e) => Err(e),
            None => job.dest.flush().map_err(|e| e.to_string()),
        };
        if let Err(e) = result {
            if let Some(b) = &bitmap {
                // What was taken is still to be backed up next time.
                b.merge(&taken);
            }
            drop(job);
            let _ = std::fs::remove_file(&req.target);
            warn!(id = %disk.id, error = %e, "backup failed");
            return Err(ApiError::new(ErrorKind::Io, format!("backup failed: {e}")));
        }
        if let Some(name) = &req.bitmap {
            lock(&disk.backups).insert(name.clone(), req.target.clone());
        }
        let copied = job.copied.load(Ordering::Relaxed);
        info!(id = %disk.id, target = %req.target.display(), copied, "backup done");
        Ok(BackupReport {
            id: disk.id.clone(),
            target: req.target,
            base,
            scanned,
            copied,
        })
    }
}

/// Copies every granule `taken` marks (those a write has not copied first); the bytes
/// looked at.
fn copy_all(device: &Tracked, job: &Job, taken: &Frozen, done: &AtomicU64) -> u64 {
    let g = taken.granularity();
    // Whole granules, a chunk's worth (or one granule) at a time.
    let step = CHUNK.max(g) / g * g;
    let ranges = taken.dirty();
    let total: u64 = ranges.iter().map(|(_, l)| l).sum();
    let mut scanned = 0;
    let mut shown = 0;
    for (offset, len) in ranges {
        let mut at = offset;
        while at < offset + len {
            if device.is_closed() {
                lock(&job.failed).get_or_insert_with(|| "the disk was closed".into());
                return scanned;
            }
            let to = (at + step).min(offset + len);
            // The chain's lock before the pending set's, as a write takes them.
            device.with_below(|below| job.copy(&mut lock(&job.pending), below, at, to));
            if lock(&job.failed).is_some() {
                return scanned;
            }
            scanned += to - at;
            done.store(scanned, Ordering::Relaxed);
            at = to;
            // Progress in the log, every tenth.
            let tenth = scanned * 10 / total.max(1);
            if tenth > shown && tenth < 10 {
                shown = tenth;
                info!(done = %format!("{tenth}0%"), "backup");
            }
        }
    }
    scanned
}

/// Creates the backup's image and opens it for writing.
fn make_target(
    target: &Path,
    size: u64,
    base: Option<&Path>,
) -> Result<Arc<dyn BlockDevice>, ApiError> {
    let opts = CreateOptions {
        format: Format::Qcow2,
        cluster_size: None,
        backing: base.map(|b| (b.display().to_string(), Format::Qcow2)),
        fixed: false,
        encrypt: None,
    };
    let shown = target.display();
    vdk_formats::create(target, size, &opts).map_err(|e| {
        let kind = if e.kind() == std::io::ErrorKind::AlreadyExists {
            ErrorKind::AlreadyOpen
        } else {
            ErrorKind::Io
        };
        ApiError::new(kind, format!("cannot create {shown}: {e}"))
    })?;
    let open = OpenOptions {
        format: Some(Format::Qcow2),
        ..OpenOptions::default()
    };
    vdk_formats::open(target, &open)
        .map(|i| i.device)
        .map_err(|e| {
            let _ = std::fs::remove_file(target);
            ApiError::new(ErrorKind::Io, format!("cannot open {shown}: {e}"))
        })
}

/// Writes the disk's persistent bitmaps into its image, in use (the disk stays open).
fn save(disk: &Disk, store: Option<&dyn vdk_core::bitmap::BitmapStore>) -> Result<(), ApiError> {
    let Some(store) = store else {
        return Ok(());
    };
    store.save(&disk.device.bitmaps().all(), true).map_err(|e| {
        ApiError::new(
            ErrorKind::Io,
            format!("cannot write the bitmaps into the image: {e}"),
        )
    })
}

fn not_found(e: String) -> ApiError {
    ApiError::new(ErrorKind::NotFound, e)
}

fn find(disk: &Disk, name: &str) -> Result<Arc<DirtyBitmap>, ApiError> {
    disk.device
        .bitmaps()
        .get(name)
        .ok_or_else(|| not_found(format!("{} has no bitmap {name:?}", disk.id)))
}

/// A disk's bitmaps as `bitmap` and `list` answer them.
pub(super) fn bitmap_status(disk: &Disk) -> Vec<BitmapStatus> {
    let last = lock(&disk.backups).clone();
    disk.device
        .bitmaps()
        .all()
        .into_iter()
        .map(|(name, b)| BitmapStatus {
            granularity: b.granularity(),
            dirty: b.dirty_bytes(),
            persistent: b.is_persistent(),
            inconsistent: b.is_inconsistent(),
            last_backup: last.get(&name).cloned(),
            name,
        })
        .collect()
}

/// A backup running on a disk, as `list` shows it.
#[derive(Debug)]
pub(super) struct Running {
    target: PathBuf,
    total: u64,
    done: Arc<AtomicU64>,
}

impl Running {
    /// As `list` reports it.
    pub(super) fn status(&self) -> crate::control::BackupProgress {
        crate::control::BackupProgress {
            target: self.target.clone(),
            total: self.total,
            done: self.done.load(Ordering::Relaxed),
        }
    }
}

/// Where backups are recorded per bitmap, for the next incremental one.
pub(super) type Backups = Mutex<std::collections::BTreeMap<String, PathBuf>>;
