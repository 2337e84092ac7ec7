//! A raw image file (or block device) as a disk.
//!
//! Positional I/O (`pread`/`pwrite`) from any number of threads at once, with no lock: the file
//! offset is never used. On Linux the file is sparse-aware:
//! - `extents` come from `SEEK_DATA`/`SEEK_HOLE`;
//! - `trim` punches a hole (`FALLOC_FL_PUNCH_HOLE`);
//! - `write_zeroes` punches a hole when it may, else `FALLOC_FL_ZERO_RANGE`, else a hole
//!   re-allocated with `fallocate`; only when the file system has none of these does it write
//!   zero-filled buffers.
//!
//! Elsewhere the same operations fall back to writing zeroes, and extents report all data.
//! `flush` and FUA are `fdatasync`. With [`FileOptions::direct`] the file is opened
//! `O_DIRECT` (Linux) and requests must be aligned to 4096 bytes.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use vdk_core::sys::{FileExt, Lock};
use vdk_core::{check_range, BlockDevice, Capabilities, DiskInfo, Error, Extents, Lend, Result};

use crate::sys;

/// How to open an image file.
#[derive(Clone, Copy, Debug, Default)]
pub struct FileOptions {
    /// Open read-only: writes fail with `ReadOnly`, and the file is opened `O_RDONLY`.
    pub read_only: bool,
    /// Bypass the page cache (`O_DIRECT`, Linux only). Requests must be 4096-aligned.
    pub direct: bool,
    /// Take no lock and respect nobody's (read-only opens only), as `qemu-img -U` does: a
    /// look at an image another program may be writing, whose metadata may be changing.
    pub force_share: bool,
}

impl FileOptions {
    /// Takes the lock these options call for on `file` (see [`lock_image`]); none with
    /// `force_share`, which a writable open may not ask for.
    pub fn lock(&self, file: &File, path: &Path) -> io::Result<()> {
        match (self.force_share, self.read_only) {
            (false, _) => lock_image(file, path, self.read_only),
            (true, true) => Ok(()),
            (true, false) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "force-share (-U) is for read-only opens only",
            )),
        }
    }
}

/// Takes the image's lock for as long as the file stays open: shared for reading, exclusive
/// for writing, so two writers (two vdk daemons, a daemon and `vdk serve`) never serve one
/// image at once and corrupt it, while many readers may share it. Advisory (flock), as
/// qemu's image locking is.
pub fn lock_image(file: &File, path: &Path, read_only: bool) -> io::Result<()> {
    let lock = if read_only {
        Lock::Shared
    } else {
        Lock::Exclusive
    };
    match vdk_core::sys::try_lock(file, lock) {
        Ok(true) => Ok(()),
        Ok(false) => {
            let holders = vdk_core::proc::flock_holders(path);
            let who = if holders.is_empty() {
                "another program".to_owned()
            } else {
                holders.join(", ")
            };
            Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!(
                    "{} is in use: {who} holds a lock on it{}",
                    path.display(),
                    if read_only { " for writing" } else { "" }
                ),
            ))
        }
        // File systems without locks (some network ones): no lock, as qemu does.
        Err(e) if e.kind() == io::ErrorKind::Unsupported => Ok(()),
        Err(e) => Err(e),
    }
}

/// Fails, naming who holds it, if a program has the image open for writing (its lock taken
/// exclusively); takes the shared lock and lets it go at once.
pub fn check_not_written(path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    lock_image(&file, path, true)
}

/// Alignment required with `O_DIRECT`: the page size, which covers any sector size.
const DIRECT_ALIGN: u32 = 4096;

/// Zero buffer for the write-zeroes fallback, written in pieces of this size.
const ZERO_BUF: usize = 1 << 20;

/// A raw image file served as a disk.
#[derive(Debug)]
pub struct FileDisk {
    file: File,
    /// Grows (never shrinks) while open: see `grow`.
    size: AtomicU64,
    /// Held while growing, so that two grows never cut each other's length.
    growing: Mutex<()>,
    opts: FileOptions,
    sparse: bool,
    /// Cleared when the file system refuses `RWF_NOWAIT` writes, so they are not tried again.
    nowait_writes: AtomicBool,
    /// Set once the log has said that holes fell back to written zeroes or all-data maps.
    said_fallback: AtomicBool,
}

impl FileDisk {
    /// Opens an existing file or block device, at the size it has now.
    pub fn open(path: &Path, opts: FileOptions) -> io::Result<FileDisk> {
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        if opts.direct {
            sys::set_direct(&mut oo)?;
        }
        let mut file = oo.open(path)?;
        opts.lock(&file, path)?;
        let size = file.seek(SeekFrom::End(0))?;
        // Holes for a regular file where the file system has them (marked sparse first on
        // NTFS, which needs write access; a read-only one is only asked where its data is).
        let sparse =
            file.metadata()?.is_file() && (opts.read_only || sys::set_sparse(&file).is_ok());
        let nowait_writes = AtomicBool::new(!opts.direct && cfg!(target_os = "linux"));
        Ok(FileDisk {
            file,
            size: AtomicU64::new(size),
            growing: Mutex::new(()),
            opts,
            sparse,
            nowait_writes,
            said_fallback: AtomicBool::new(false),
        })
    }

    /// Creates a new sparse file of `size` bytes (failing if it exists) and opens it.
    pub fn create(path: &Path, size: u64, opts: FileOptions) -> io::Result<FileDisk> {
        let file = OpenOptions::new().write(true).create_new(true).open(path)?;
        // Sparse before it has a length (NTFS); a file system without sparse files keeps
        // the file as it is.
        let _ = sys::set_sparse(&file);
        file.set_len(size)?;
        drop(file);
        FileDisk::open(path, opts)
    }

    /// Says once, in the log, that the file system could not do a hole call and what was
    /// done instead (FAT32, exFAT and Wine on Windows; some Linux file systems).
    fn fell_back(&self, instead: &str, e: &io::Error) {
        if !self.said_fallback.swap(true, Ordering::Relaxed) {
            tracing::info!(error = %e, "{instead} (said once per image)");
        }
    }

    fn writable(&self, offset: u64, len: u64) -> Result<()> {
        if self.opts.read_only {
            return Err(Error::ReadOnly);
        }
        self.check(offset, len)
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        check_range(self.size(), offset, len)?;
        let align = u64::from(DIRECT_ALIGN);
        if self.opts.direct && (!offset.is_multiple_of(align) || !len.is_multiple_of(align)) {
            return Err(Error::Misaligned {
                offset,
                len,
                block_size: DIRECT_ALIGN,
            });
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        Ok(self.file.sync_data()?)
    }

    /// Writes zero-filled buffers over the range: the fallback when the file system has no
    /// cheaper way.
    fn write_zero_buffers(&self, offset: u64, len: u64) -> Result<()> {
        let zeroes = aligned_zeroes(usize::try_from(len).map_or(ZERO_BUF, |l| l.min(ZERO_BUF)));
        let mut pos = offset;
        while pos < offset + len {
            let n =
                usize::try_from(offset + len - pos).map_or(zeroes.len(), |n| n.min(zeroes.len()));
            self.file.write_all_at(&zeroes[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }
}

impl BlockDevice for FileDisk {
    fn info(&self) -> DiskInfo {
        let mut info = DiskInfo::new(self.size());
        if self.opts.direct {
            info.logical_block_size = DIRECT_ALIGN;
        }
        info.read_only = self.opts.read_only;
        info.caps = Capabilities {
            flush: true,
            fua: true,
            trim: !self.opts.read_only,
            fast_zero: self.sparse,
            extents: self.sparse,
            multi_conn: true,
            cache: cfg!(target_os = "linux"),
            ..Capabilities::NONE
        };
        info
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        if self.opts.direct {
            let mut bounce = aligned_zeroes(buf.len());
            self.file.read_exact_at(&mut bounce, offset)?;
            buf.copy_from_slice(&bounce);
            return Ok(());
        }
        Ok(self.file.read_exact_at(buf, offset)?)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.writable(offset, buf.len() as u64)?;
        if self.opts.direct {
            let mut bounce = aligned_zeroes(buf.len());
            bounce.copy_from_slice(buf);
            self.file.write_all_at(&bounce, offset)?;
        } else {
            self.file.write_all_at(buf, offset)?;
        }
        if fua {
            self.sync()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.opts.read_only {
            return Ok(());
        }
        self.sync()
    }

    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.writable(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if self.sparse {
            match sys::punch_hole(&self.file, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) => self.fell_back("trim: zeroes written instead", &e),
            }
        }
        self.write_zero_buffers(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<()> {
        self.writable(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let done = self.sparse
            && sys::zero(&self.file, offset, len, may_trim)
                .map_err(|e| self.fell_back("write zeroes: zeroes written instead", &e))
                .is_ok();
        if !done {
            self.write_zero_buffers(offset, len)?;
        }
        if fua {
            self.sync()?;
        }
        Ok(())
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Extents> {
        check_range(self.size(), offset, len)?;
        if !self.sparse {
            return Ok(Extents::all_data(offset, len));
        }
        match sys::extents(&self.file, offset, len) {
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                self.fell_back("extents: all of the file reported as data", &e);
                Ok(Extents::all_data(offset, len))
            }
            r => Ok(r?),
        }
    }

    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        check_range(self.size(), offset, len)?;
        sys::will_need(&self.file, offset, len);
        Ok(())
    }

    fn lend(&self) -> Option<&dyn Lend> {
        Some(self)
    }

    /// Extends a regular file (sparse where the file system can) and syncs its new length
    /// before the disk says the new size; a block device keeps its size.
    fn grow(&self, new_size: u64) -> Result<()> {
        if self.opts.read_only {
            return Err(Error::ReadOnly);
        }
        let _one = self.growing.lock().unwrap_or_else(PoisonError::into_inner);
        let size = self.size();
        vdk_core::check_grow(size, new_size, self.info().logical_block_size)?;
        if !self.file.metadata()?.is_file() {
            return Err(Error::Unsupported(vdk_core::Op::Grow));
        }
        self.file.set_len(new_size)?;
        self.file.sync_all()?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }
}

impl Lend for FileDisk {
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        self.check(offset, buf.len() as u64)?;
        // O_DIRECT always waits for the device.
        Ok(!self.opts.direct && sys::read_cached(&self.file, buf, offset))
    }
    fn try_write_at(&self, buf: &[u8], offset: u64) -> Result<bool> {
        self.writable(offset, buf.len() as u64)?;
        if self.opts.direct {
            return Ok(false);
        }
        if self.nowait_writes.load(Ordering::Relaxed) {
            match sys::write_cached(&self.file, buf, offset) {
                Some(done) => return Ok(done),
                None => self.nowait_writes.store(false, Ordering::Relaxed),
            }
        }
        // The file system has no RWF_NOWAIT for buffered writes (ext4, for one). A write of
        // whole pages still never reads from the device: it only fills the page cache, so it
        // is done here. (The kernel may throttle a writer that dirties memory much faster than
        // the disk takes it; that is the one wait this lets through.)
        let page = u64::from(DIRECT_ALIGN);
        if offset.is_multiple_of(page) && (buf.len() as u64).is_multiple_of(page) {
            self.file.write_all_at(buf, offset)?;
            return Ok(true);
        }
        Ok(false)
    }
}

/// The data and holes of `[offset, offset + len)` of a file as its file system reports them
/// (`SEEK_DATA`/`SEEK_HOLE`); a range past the end of the file is a hole. For image formats
/// whose blocks are sparse regions of their file.
pub fn file_extents(file: &File, offset: u64, len: u64) -> io::Result<Extents> {
    match sys::extents(file, offset, len) {
        // A file system that cannot say: all of it is data.
        Err(e) if e.kind() == io::ErrorKind::Unsupported => Ok(Extents::all_data(offset, len)),
        r => r,
    }
}

/// A zero-filled buffer of `len` bytes whose start is aligned for `O_DIRECT`. Made from an
/// over-sized `Vec`, which needs no unsafe code.
fn aligned_zeroes(len: usize) -> AlignedBuf {
    let align = DIRECT_ALIGN as usize;
    let raw = vec![0u8; len + align];
    let start = raw.as_ptr().align_offset(align).min(align);
    AlignedBuf { raw, start, len }
}

struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests;
