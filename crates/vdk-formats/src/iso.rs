//! ISO 9660 images: served read-only, with 2048-byte blocks, as a CD-ROM.

use std::fs::File;
use std::io;
use std::path::Path;

use vdk_backends::{FileDisk, FileOptions};
use vdk_core::sys::FileExt;
use vdk_core::{BlockDevice, DiskInfo, Extents, Lend, MediaKind, Result};

/// Where the first volume descriptor starts: sector 16.
pub const DESCRIPTORS: u64 = DESCRIPTORS_AT as u64;
const DESCRIPTORS_AT: usize = 16 * 2048;
/// Bytes [`is_iso`] needs to see.
pub const PROBE_LEN: usize = DESCRIPTORS_AT + 8;
/// The standard identifier of every volume descriptor, after its type byte.
pub const MAGIC: &[u8; 5] = b"CD001";
/// A CD sector.
pub const SECTOR: u32 = 2048;

/// Whether `head` (the first 32 KiB + 6 bytes of a file, or more) has an ISO 9660 volume
/// descriptor where one must be.
pub fn is_iso(head: &[u8]) -> bool {
    let at = DESCRIPTORS_AT + 1;
    head.get(at..at + 5) == Some(MAGIC)
}

/// The volume identifier of the primary volume descriptor, if there is one.
pub fn volume_id(file: &File) -> Option<String> {
    let mut pvd = [0u8; 2048];
    file.read_exact_at(&mut pvd, DESCRIPTORS).ok()?;
    if pvd[0] != 1 || &pvd[1..6] != MAGIC {
        return None;
    }
    // Bytes 40..72: d-characters, padded with spaces.
    Some(String::from_utf8_lossy(&pvd[40..72]).trim_end().to_owned())
}

/// An ISO image: the file's bytes, read-only, shown as a CD-ROM of 2048-byte blocks.
#[derive(Debug)]
pub struct IsoDisk {
    file: FileDisk,
}

impl IsoDisk {
    /// Opens the ISO image at `path` (always read-only; `opts.force_share` is honoured).
    pub fn open(path: &Path, opts: FileOptions) -> io::Result<IsoDisk> {
        let file = FileDisk::open(
            path,
            FileOptions {
                read_only: true,
                ..opts
            },
        )?;
        Ok(IsoDisk { file })
    }
}

impl BlockDevice for IsoDisk {
    fn info(&self) -> DiskInfo {
        let mut info = self.file.info();
        // A medium is whole sectors; a trailing partial sector is not part of it.
        info.size -= info.size % u64::from(SECTOR);
        info.logical_block_size = SECTOR;
        info.physical_block_size = SECTOR;
        info.media = MediaKind::CdRom;
        info.read_only = true;
        info.caps.trim = false;
        info.caps.fast_zero = false;
        info
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        vdk_core::check_range(self.info().size, offset, buf.len() as u64)?;
        self.file.read_at(buf, offset)
    }

    fn write_at(&self, _buf: &[u8], _offset: u64, _fua: bool) -> Result<()> {
        Err(vdk_core::Error::ReadOnly)
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Extents> {
        vdk_core::check_range(self.info().size, offset, len)?;
        self.file.extents(offset, len)
    }

    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        vdk_core::check_range(self.info().size, offset, len)?;
        self.file.cache(offset, len)
    }

    fn lend(&self) -> Option<&dyn Lend> {
        Some(self)
    }
}

impl Lend for IsoDisk {
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        vdk_core::check_range(self.info().size, offset, buf.len() as u64)?;
        Lend::try_read_at(&self.file, buf, offset)
    }
}
