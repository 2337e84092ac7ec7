//! cow: write redirection. Writes, trims and zero writes go to an overlay; the disk below
//! (the base) is only ever read.
//!
//! The overlay is a qcow2 image whose backing disk is the base, served in-process: its L2
//! tables are the redirection map (one 8-byte entry per 64 KiB cluster: 128 KiB of map per
//! GiB of redirected data, plus 32 KiB of refcounts; a lookup is two table indexes, constant
//! time). When the base is an image file, the overlay records it as its backing file, so
//! `qemu-img` reads base + overlay too. Everything qcow2 gives is inherited: crash
//! consistency (flushed writes survive a kill -9), discard that frees overlay space, reads of
//! unredirected clusters from the base.
//!
//! Modes: persistent (`overlay=PATH`: created if missing, reopened as it is otherwise),
//! volatile (a temporary overlay, unlinked at once: it vanishes with the disk), and
//! pre-allocated (`size=SIZE`: the overlay file reserves SIZE bytes up front and never grows
//! past them; a write that would fails with ENOSPC, harming nothing written before).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::info;
use vdk_core::BlockDevice;
use vdk_formats::qcow2::create::{create, CreateOptions};
use vdk_formats::qcow2::{Qcow2, Qcow2Options};
use vdk_formats::Format;

/// Where the overlay lives.
#[derive(Clone, Debug)]
pub enum Overlay {
    /// A qcow2 file, kept.
    Persistent(PathBuf),
    /// A temporary file, gone when the disk closes.
    Volatile,
}

/// How to redirect writes.
#[derive(Clone, Debug)]
pub struct CowOptions {
    /// The overlay.
    pub overlay: Overlay,
    /// Fixed size of the overlay file, reserved up front.
    pub size: Option<u64>,
}

/// The base as an image file, recorded as the overlay's backing file.
#[derive(Clone, Debug)]
pub struct BaseFile {
    /// Its path (made absolute).
    pub path: PathBuf,
    /// Its format.
    pub format: Format,
}

fn io_err(kind: io::ErrorKind, msg: String) -> io::Error {
    io::Error::new(kind, msg)
}

/// Redirects writes of `base` to an overlay.
pub fn cow(
    base: Arc<dyn BlockDevice>,
    base_file: Option<&BaseFile>,
    opts: &CowOptions,
) -> io::Result<Arc<dyn BlockDevice>> {
    let size = base.info().size;
    let backing = base_file.map(|b| {
        (
            b.path.to_string_lossy().into_owned(),
            b.format.name().to_owned(),
        )
    });
    let (path, volatile) = match &opts.overlay {
        Overlay::Persistent(p) => (std::path::absolute(p)?, false),
        Overlay::Volatile => {
            let t = tempfile::Builder::new()
                .prefix("vdk-cow-")
                .suffix(".qcow2")
                .tempfile()?;
            let p = t.path().to_owned();
            // create() makes the file itself.
            t.close()?;
            (p, true)
        }
    };
    let exists = !volatile && path.exists();
    if !exists {
        let co = CreateOptions {
            backing: if volatile { None } else { backing.clone() },
            stamp: true,
            ..CreateOptions::default()
        };
        let file = create(&path, size, &co)?;
        if let Some(max) = opts.size {
            // Reserve the space now: later writes never meet a full host file system.
            vdk_core::sys::reserve(&file, max)?;
        }
        info!(overlay = %path.display(), volatile, "overlay created");
    }
    let file = fs::OpenOptions::new().read(true).write(true).open(&path)?;
    vdk_backends::lock_image(&file, &path, false)?;
    if volatile {
        // Open, it lives on without a name, and goes with the disk.
        fs::remove_file(&path)?;
    }
    let (header, first) = vdk_formats::qcow2_header(&path, &file)?;
    if header.size != size {
        return Err(io_err(
            io::ErrorKind::InvalidInput,
            format!(
                "overlay {} is for a disk of {} bytes, this one has {size}",
                path.display(),
                header.size
            ),
        ));
    }
    check_stamp(&path, &header, &first)?;
    // The disk below the overlay: the base, or an older overlay chained on it (after a
    // snapshot), opened from its files.
    let mut backing = base;
    if let (Some(recorded), Some(base)) = (
        header
            .backing_file(&first)
            .map_err(|e| io_err(io::ErrorKind::InvalidData, e.to_string()))?,
        base_file,
    ) {
        let recorded = vdk_formats::backing_path(&path, &recorded);
        let canonical = |p: &Path| fs::canonicalize(p).ok();
        if canonical(&recorded) != canonical(&base.path) {
            // An older overlay? Its chain must end at this base.
            let mut bottom = vdk_formats::info(&recorded, None, true).ok();
            let mut chain_ok = false;
            while let Some(i) = bottom {
                if i.backing.is_none() {
                    chain_ok = canonical(&i.path) == canonical(&base.path);
                    break;
                }
                bottom = i.backing.map(|b| *b);
            }
            if !chain_ok {
                return Err(io_err(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "overlay {} belongs to base {}, not {}",
                        path.display(),
                        recorded.display(),
                        base.path.display()
                    ),
                ));
            }
            let format = header
                .backing_format
                .as_deref()
                .map(Format::from_name)
                .transpose()?;
            let opts = vdk_formats::OpenOptions {
                format,
                read_only: true,
                probe_backing: false,
                ..Default::default()
            };
            backing = vdk_formats::open(&recorded, &opts)?.device;
        }
    }
    let q = Qcow2::open(
        &path,
        file,
        header,
        Some(backing),
        &Qcow2Options {
            read_only: false,
            max_bytes: opts.size,
            ..Qcow2Options::default()
        },
    )?;
    Ok(Arc::new(q))
}

/// Refuses an overlay whose header no longer matches the check vdk wrote into it (its
/// version, cluster size, size or backing file changed, by hand or by damage); an overlay
/// without the check (made by qemu-img, say) is taken as it is.
fn check_stamp(
    path: &Path,
    header: &vdk_formats::qcow2::header::Header,
    first: &[u8],
) -> io::Result<()> {
    let Some((version, crc)) = header.vdk_check else {
        return Ok(());
    };
    if version != 1 {
        return Err(io_err(
            io::ErrorKind::Unsupported,
            format!(
                "overlay {} was made by a newer vdk (check version {version})",
                path.display()
            ),
        ));
    }
    let name = header
        .backing_file(first)
        .map_err(|e| io_err(io::ErrorKind::InvalidData, e.to_string()))?;
    if header.identity_crc(name.as_deref()) != crc {
        return Err(io_err(
            io::ErrorKind::InvalidData,
            format!(
                "overlay {} does not match its header checksum: its size, cluster size or base \
                 changed since vdk made it, or the header is damaged",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// What a commit did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitReport {
    /// Bytes of data copied into the base.
    pub data: u64,
    /// Bytes the base was made to read as zeroes.
    pub zeroed: u64,
}

/// The base image an overlay file records (resolved as qcow2 resolves it), if any.
pub fn base_of(overlay: &Path) -> io::Result<Option<PathBuf>> {
    let file = fs::File::open(overlay)?;
    let (header, first) = vdk_formats::qcow2_header(overlay, &file)?;
    let name = header
        .backing_file(&first)
        .map_err(|e| io_err(io::ErrorKind::InvalidData, e.to_string()))?;
    Ok(name.map(|n| vdk_formats::backing_path(overlay, &n)))
}

/// The base an overlay file records, opened for writing, and the overlay itself.
fn open_pair(overlay: &Path) -> io::Result<(Arc<dyn BlockDevice>, Qcow2, PathBuf)> {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(overlay)?;
    vdk_backends::lock_image(&file, overlay, false)?;
    let (header, first) = vdk_formats::qcow2_header(overlay, &file)?;
    let Some(name) = header
        .backing_file(&first)
        .map_err(|e| io_err(io::ErrorKind::InvalidData, e.to_string()))?
    else {
        return Err(io_err(
            io::ErrorKind::InvalidInput,
            format!(
                "{} records no base image: there is nothing to commit into",
                overlay.display()
            ),
        ));
    };
    let base_path = vdk_formats::backing_path(overlay, &name);
    let format = header
        .backing_format
        .as_deref()
        .map(Format::from_name)
        .transpose()?;
    let base = vdk_formats::open(
        &base_path,
        &vdk_formats::OpenOptions {
            format,
            read_only: false,
            probe_backing: false,
            ..Default::default()
        },
    )
    .map_err(|e| io_err(e.kind(), format!("cannot open the base for writing: {e}")))?
    .device;
    // The overlay alone (no backing): its extents say what it holds itself.
    let q = Qcow2::open(
        overlay,
        file,
        header,
        None,
        &Qcow2Options {
            read_only: true,
            ..Qcow2Options::default()
        },
    )?;
    Ok((base, q, base_path))
}

/// Merges an overlay into its base, then empties the overlay. Safe to interrupt: the base
/// only ever receives the overlay's data, and the overlay is emptied only once the base is
/// flushed, so running it again after a crash finishes the same merge.
pub fn commit(overlay: &Path) -> io::Result<CommitReport> {
    let (base, q, base_path) = open_pair(overlay)?;
    let copy = || -> vdk_core::Result<CommitReport> {
        let size = BlockDevice::info(&q).size;
        let mut report = CommitReport::default();
        let mut buf = vec![0u8; 1 << 20];
        let step = 1u64 << 30;
        let mut at = 0;
        while at < size {
            let len = step.min(size - at);
            for (off, run) in BlockDevice::extents(&q, at, len)?.iter() {
                match run.kind {
                    vdk_core::ExtentKind::Hole => {}
                    vdk_core::ExtentKind::Zero => {
                        base.write_zeroes(off, run.len, true, false)?;
                        report.zeroed += run.len;
                    }
                    vdk_core::ExtentKind::Data => {
                        let mut p = off;
                        while p < off + run.len {
                            let n = usize::try_from(off + run.len - p)
                                .map_or(buf.len(), |n| n.min(buf.len()));
                            BlockDevice::read_at(&q, &mut buf[..n], p)?;
                            base.write_at(&buf[..n], p, false)?;
                            p += n as u64;
                        }
                        report.data += run.len;
                    }
                }
            }
            at += len;
        }
        base.flush()?;
        Ok(report)
    };
    let report = copy().map_err(|e| {
        io_err(
            io::ErrorKind::Other,
            format!("commit failed (run it again to finish): {e}"),
        )
    })?;
    drop(q);
    info!(overlay = %overlay.display(), base = %base_path.display(), "committed");
    reset(overlay)?;
    Ok(report)
}

/// Empties an overlay: the disk reads as its base again. An image that records no base is
/// refused unless vdk made it as an overlay (its header carries vdk's stamp) or `known` says
/// the caller knows it is one: emptying an ordinary qcow2 image would erase it.
pub fn discard(overlay: &Path, known: bool) -> io::Result<()> {
    // Not while a disk uses it; the base is not needed.
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(overlay)?;
    vdk_backends::lock_image(&file, overlay, false)?;
    let (header, first) = vdk_formats::qcow2_header(overlay, &file)?;
    let base = header
        .backing_file(&first)
        .map_err(|e| io_err(io::ErrorKind::InvalidData, e.to_string()))?;
    if base.is_none() && header.vdk_check.is_none() && !known {
        return Err(io_err(
            io::ErrorKind::InvalidInput,
            format!(
                "{} records no base image: it is a disk of its own, not an overlay, and \
                 discarding would erase it",
                overlay.display()
            ),
        ));
    }
    drop(file);
    reset(overlay)
}

/// Replaces `overlay` by an empty one with the same base and size, atomically (a new file
/// renamed over the old).
fn reset(overlay: &Path) -> io::Result<()> {
    let file = fs::File::open(overlay)?;
    let (header, first) = vdk_formats::qcow2_header(overlay, &file)?;
    drop(file);
    let backing = header
        .backing_file(&first)
        .map_err(|e| io_err(io::ErrorKind::InvalidData, e.to_string()))?
        .map(|name| {
            (
                name,
                header
                    .backing_format
                    .clone()
                    .unwrap_or_else(|| "raw".into()),
            )
        });
    let fresh = overlay.with_extension("reset.tmp");
    let _ = fs::remove_file(&fresh);
    let opts = CreateOptions {
        cluster_size: header.cluster_size(),
        backing,
        stamp: true,
        ..CreateOptions::default()
    };
    drop(create(&fresh, header.size, &opts)?);
    vdk_core::sys::replace_durably(&fresh, overlay)
}

/// Starts a new overlay `new` on top of `overlay` (a chain: new -> overlay -> base). Serve
/// `new` as an image; `overlay` must not be written any more.
pub fn snapshot(overlay: &Path, new: &Path) -> io::Result<()> {
    let file = fs::File::open(overlay)?;
    let (header, _) = vdk_formats::qcow2_header(overlay, &file)?;
    let name = std::path::absolute(overlay)?.to_string_lossy().into_owned();
    let opts = CreateOptions {
        backing: Some((name, "qcow2".into())),
        stamp: true,
        ..CreateOptions::default()
    };
    drop(create(new, header.size, &opts)?);
    Ok(())
}
