//! VHD (Virtual PC / Hyper-V), fixed and dynamic, read-write.
//!
//! A fixed VHD is the disk's bytes followed by a 512-byte footer. A dynamic VHD is a copy of
//! the footer, a dynamic header, a block allocation table (BAT), then blocks (a sector bitmap
//! and the block's data) in the order they were allocated, then the footer.
//!
//! Sizes follow qemu's reading of the format: the disk has the size its CHS geometry gives,
//! unless the creator is one known to use the footer's current size (Hyper-V, qemu with
//! force_size, disk2vhd, XenServer, XenConverter) or the geometry is the maximum. Images vdk
//! creates get a geometry that covers the requested size (rounded up, as qemu-img does) and
//! the same value as current size, so every reader agrees.
//!
//! Allocation (dynamic): a new block goes where the footer was; its bitmap (all present) and
//! the guest's data are written, then the footer at the new end, then the BAT entry. The
//! copy of the footer at offset 0 is what readers trust, so a crash between these steps leaves
//! at worst an unreferenced block that the next allocation overwrites. Differencing VHDs are
//! refused.

// Casts here are of bounded values: BAT indexes (at most 16 Mi entries, checked at open),
// bitmap and block sizes (at most 256 MiB), and CHS fields clamped to their maxima.
#![allow(clippy::cast_possible_truncation)]

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::Mutex;

use crate::{be32, be64, corrupt, Format, LOOK};
use vdk_backends::FileOptions;
use vdk_core::sync;
use vdk_core::sys::FileExt;
use vdk_core::{check_range, BlockDevice, Capabilities, DiskInfo, Error, Extents, Result};

/// Footer cookie.
pub const COOKIE: &[u8; 8] = b"conectix";
const DYN_COOKIE: &[u8; 8] = b"cxsparse";
const FOOTER: u64 = 512;
const UNALLOCATED: u32 = u32::MAX;
/// Block size of new dynamic images (qemu's and Hyper-V's default).
pub const DEFAULT_BLOCK: u32 = 2 << 20;
/// Largest BAT accepted (entries): 2 TiB of 2 MiB blocks is 1 Mi entries; allow 16 Mi.
const MAX_BAT: u32 = 16 << 20;
/// Largest disk: the format's 2040 GiB, a little more to accept images in the wild.
const MAX_SIZE: u64 = 2 << 40;

/// One's complement of the byte sum, with the checksum field (at `at`) taken as zero.
fn checksum(b: &[u8], at: usize) -> u32 {
    let sum: u32 = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(at..at + 4).contains(i))
        .fold(0u32, |s, (_, x)| s.wrapping_add(u32::from(*x)));
    !sum
}

/// CHS geometry (cylinders, heads, sectors per track) for at least `sectors` sectors, by the
/// VHD specification's algorithm.
fn geometry(sectors: u64) -> (u16, u8, u8) {
    let total = sectors.min(65535 * 16 * 255);
    let (spt, heads, cth) = if total >= 65535 * 16 * 63 {
        (255u64, 16u64, total / 255)
    } else {
        let mut spt = 17;
        let mut cth = total / spt;
        let mut heads = cth.div_ceil(1024).max(4);
        if cth >= heads * 1024 || heads > 16 {
            spt = 31;
            heads = 16;
            cth = total / spt;
        }
        if cth >= heads * 1024 {
            spt = 63;
            heads = 16;
            cth = total / spt;
        }
        (spt, heads, cth)
    };
    let cyl = (cth / heads).min(65535);
    // Bounded above: 65535, 16, 255.
    (cyl as u16, heads as u8, spt as u8)
}

fn chs_sectors(g: (u16, u8, u8)) -> u64 {
    u64::from(g.0) * u64::from(g.1) * u64::from(g.2)
}

/// What `vdk info` shows of a VHD: its size and whether it is fixed.
pub fn describe(path: &Path) -> io::Result<(u64, &'static str, Option<u64>)> {
    let v = Vhd::open(path, LOOK)?;
    Ok(match &v.dynamic {
        Some(d) => (v.size, "dynamic", Some(sync::lock(d).block)),
        None => (v.size, "fixed", None),
    })
}

/// A parsed footer.
#[derive(Clone, Debug)]
struct Footer {
    raw: [u8; 512],
    data_offset: u64,
    size: u64,
    disk_type: u32,
}

fn parse_footer(path: &Path, raw: &[u8]) -> io::Result<Footer> {
    if raw.len() < 512 || &raw[..8] != COOKIE {
        return Err(corrupt(Format::Vhd, path, "no VHD footer (conectix)"));
    }
    if checksum(&raw[..512], 64) != be32(raw, 64) {
        return Err(corrupt(Format::Vhd, path, "VHD footer checksum mismatch"));
    }
    let current = be64(raw, 48);
    let geo = (u16::from_be_bytes([raw[56], raw[57]]), raw[58], raw[59]);
    let creator = &raw[28..32];
    let current_size_creators: [&[u8]; 5] = [b"win ", b"qem2", b"d2v ", b"tap\0", b"CTXS"];
    let max_geometry = geo == (65535, 16, 255);
    let size = if max_geometry || current_size_creators.contains(&creator) {
        current
    } else {
        chs_sectors(geo) * 512
    };
    if size > MAX_SIZE {
        return Err(corrupt(
            Format::Vhd,
            path,
            format!("VHD size {size} is absurd"),
        ));
    }
    let mut copy = [0u8; 512];
    copy.copy_from_slice(&raw[..512]);
    Ok(Footer {
        raw: copy,
        data_offset: be64(raw, 16),
        size,
        disk_type: be32(raw, 60),
    })
}

/// Whether a file of `len` bytes with `head` (its first 512 bytes) and `tail` (its last 512)
/// is a VHD: a dynamic one has the cookie at 0, a fixed one only at the end.
pub fn is_vhd(head: &[u8], tail: &[u8]) -> bool {
    head.starts_with(COOKIE)
        || (tail.len() == 512 && tail.starts_with(COOKIE) && checksum(tail, 64) == be32(tail, 64))
}

#[derive(Debug)]
struct Dynamic {
    bat_offset: u64,
    block: u64,
    bitmap: u64,
    /// BAT, in sectors; `UNALLOCATED` for none.
    bat: Vec<u32>,
    /// Where the next block goes (where the footer is).
    next_block: u64,
}

/// A VHD image.
#[derive(Debug)]
pub struct Vhd {
    file: File,
    size: u64,
    read_only: bool,
    footer: Footer,
    /// Dynamic images only; the lock serialises allocation.
    dynamic: Option<Mutex<Dynamic>>,
}

impl Vhd {
    /// Opens a VHD (fixed or dynamic).
    pub fn open(path: &Path, opts: FileOptions) -> io::Result<Vhd> {
        let read_only = opts.read_only;
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        opts.lock(&file, path)?;
        let len = file.metadata()?.len();
        if len < FOOTER {
            return Err(corrupt(Format::Vhd, path, "too short to be a VHD"));
        }
        let mut head = [0u8; 512];
        file.read_exact_at(&mut head, 0)?;
        // The copy at the start, if any, is authoritative (a crash can leave the end stale).
        let footer = if head.starts_with(COOKIE) {
            parse_footer(path, &head)?
        } else {
            let mut tail = [0u8; 512];
            file.read_exact_at(&mut tail, len - FOOTER)?;
            parse_footer(path, &tail)?
        };
        match footer.disk_type {
            2 => {
                if footer.size > len - FOOTER {
                    return Err(corrupt(
                        Format::Vhd,
                        path,
                        "fixed VHD is shorter than its size",
                    ));
                }
                Ok(Vhd {
                    file,
                    size: footer.size,
                    read_only,
                    footer,
                    dynamic: None,
                })
            }
            3 => {
                let dynamic = Self::open_dynamic(path, &file, &footer, len)?;
                Ok(Vhd {
                    file,
                    size: footer.size,
                    read_only,
                    footer,
                    dynamic: Some(Mutex::new(dynamic)),
                })
            }
            4 => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{}: differencing VHDs are not supported", path.display()),
            )),
            t => Err(corrupt(
                Format::Vhd,
                path,
                format!("unknown VHD disk type {t}"),
            )),
        }
    }

    fn open_dynamic(path: &Path, file: &File, footer: &Footer, len: u64) -> io::Result<Dynamic> {
        let at = footer.data_offset;
        if at.checked_add(1024).is_none_or(|e| e > len) {
            return Err(corrupt(
                Format::Vhd,
                path,
                "dynamic header lies past the end",
            ));
        }
        let mut h = [0u8; 1024];
        file.read_exact_at(&mut h, at)?;
        if &h[..8] != DYN_COOKIE {
            return Err(corrupt(
                Format::Vhd,
                path,
                "no dynamic disk header (cxsparse)",
            ));
        }
        if checksum(&h, 36) != be32(&h, 36) {
            return Err(corrupt(
                Format::Vhd,
                path,
                "dynamic disk header checksum mismatch",
            ));
        }
        let bat_offset = be64(&h, 16);
        let entries = be32(&h, 28);
        let block = be32(&h, 32);
        if !block.is_power_of_two() || !(512..=(256 << 20)).contains(&block) {
            return Err(corrupt(
                Format::Vhd,
                path,
                format!("block size {block} is invalid"),
            ));
        }
        if entries > MAX_BAT || u64::from(entries) * u64::from(block) < footer.size {
            return Err(corrupt(
                Format::Vhd,
                path,
                format!("BAT of {entries} entries does not fit the disk"),
            ));
        }
        let bat_len = u64::from(entries) * 4;
        if bat_offset.checked_add(bat_len).is_none_or(|e| e > len) {
            return Err(corrupt(Format::Vhd, path, "BAT lies past the end"));
        }
        let mut raw = vec![0u8; bat_len as usize];
        file.read_exact_at(&mut raw, bat_offset)?;
        let bat: Vec<u32> = raw.chunks_exact(4).map(|c| be32(c, 0)).collect();
        let block = u64::from(block);
        let bitmap = (block / 512).div_ceil(8).div_ceil(512) * 512;
        let mut next_block = (bat_offset + bat_len).div_ceil(512) * 512;
        for e in &bat {
            if *e != UNALLOCATED {
                let start = u64::from(*e) * 512;
                if start + bitmap + block > len {
                    return Err(corrupt(
                        Format::Vhd,
                        path,
                        format!("BAT points past the end ({start})"),
                    ));
                }
                next_block = next_block.max(start + bitmap + block);
            }
        }
        // Never over anything: at least where the footer is now.
        let next_block = next_block.max(len - FOOTER);
        Ok(Dynamic {
            bat_offset,
            block,
            bitmap,
            bat,
            next_block,
        })
    }

    /// The data offset in the file of guest `offset`, if allocated.
    fn locate(d: &Dynamic, offset: u64) -> Option<u64> {
        let e = *d.bat.get((offset / d.block) as usize)?;
        (e != UNALLOCATED).then(|| u64::from(e) * 512 + d.bitmap + offset % d.block)
    }

    fn dyn_lock(m: &Mutex<Dynamic>) -> std::sync::MutexGuard<'_, Dynamic> {
        sync::lock(m)
    }

    /// Allocates the block of guest `offset`: bitmap, zeroed data, footer, then BAT entry.
    fn allocate(&self, d: &mut Dynamic, offset: u64) -> Result<u64> {
        let index = (offset / d.block) as usize;
        let start = d.next_block;
        let sector = u32::try_from(start / 512).map_err(|_| Error::NoSpace)?;
        // The bitmap covers the old footer; the data area lies past the old end and reads
        // as zeroes.
        self.file
            .write_all_at(&vec![0xff; d.bitmap as usize], start)?;
        let end = start + d.bitmap + d.block;
        self.file.write_all_at(&self.footer.raw, end)?;
        self.file
            .write_all_at(&sector.to_be_bytes(), d.bat_offset + index as u64 * 4)?;
        d.bat[index] = sector;
        d.next_block = end;
        Ok(start + d.bitmap)
    }
}

impl BlockDevice for Vhd {
    fn info(&self) -> DiskInfo {
        let mut info = DiskInfo::new(self.size);
        info.read_only = self.read_only;
        info.caps = Capabilities {
            flush: true,
            fua: true,
            extents: true,
            multi_conn: true,
            ..Capabilities::NONE
        };
        info
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        let Some(dynamic) = &self.dynamic else {
            self.file.read_exact_at(buf, offset)?;
            return Ok(());
        };
        let d = Self::dyn_lock(dynamic);
        let block = d.block;
        let spots: Vec<(usize, usize, Option<u64>)> = {
            let mut v = Vec::new();
            crate::pieces(offset, buf.len() as u64, block, |g, at, n| {
                v.push((at, n, Self::locate(&d, g)));
                Ok(())
            })?;
            v
        };
        drop(d);
        for (at, n, host) in spots {
            match host {
                Some(h) => self.file.read_exact_at(&mut buf[at..at + n], h)?,
                None => buf[at..at + n].fill(0),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(self.size, offset, buf.len() as u64)?;
        match &self.dynamic {
            None => self.file.write_all_at(buf, offset)?,
            Some(dynamic) => {
                let block = Self::dyn_lock(dynamic).block;
                crate::pieces(offset, buf.len() as u64, block, |g, at, n| {
                    let host = {
                        let mut d = Self::dyn_lock(dynamic);
                        match Self::locate(&d, g) {
                            Some(h) => h,
                            None => {
                                let data = self.allocate(&mut d, g)?;
                                data + g % d.block
                            }
                        }
                    };
                    self.file.write_all_at(&buf[at..at + n], host)?;
                    Ok(())
                })?;
            }
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(self.file.sync_data()?)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_trim: bool, fua: bool) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(self.size, offset, len)?;
        let piece = self
            .dynamic
            .as_ref()
            .map_or(1 << 20, |d| Self::dyn_lock(d).block.min(1 << 20));
        crate::zero_allocated(self, offset, len, piece, fua, |pos| {
            self.dynamic
                .as_ref()
                .is_none_or(|d| Self::locate(&Self::dyn_lock(d), pos).is_some())
        })
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Extents> {
        check_range(self.size, offset, len)?;
        let Some(d) = &self.dynamic else {
            return Ok(vdk_backends::file_extents(&self.file, offset, len)?);
        };
        let spots: Vec<(u64, Option<u64>)> = {
            let d = Self::dyn_lock(d);
            let mut v = Vec::new();
            crate::pieces(offset, len, d.block, |g, _, n| {
                v.push((n as u64, Self::locate(&d, g)));
                Ok(())
            })?;
            v
        };
        Ok(crate::mapped_extents(&self.file, offset, &spots)?)
    }
}

/// Creates a VHD of at least `size` bytes (rounded up to whole CHS geometry, as qemu-img
/// does), dynamic or fixed. Returns the size it has.
pub fn create(path: &Path, size: u64, fixed: bool) -> io::Result<u64> {
    if size == 0 || size > MAX_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("VHD size {size} is out of range (1 B to 2 TiB)"),
        ));
    }
    let want = size.div_ceil(512);
    let mut g = geometry(want);
    let mut extra = 0;
    while chs_sectors(g) < want && g != (65535, 16, 255) {
        extra += 1;
        g = geometry(want + extra);
    }
    let sectors = chs_sectors(g).max(want);
    let size = sectors * 512;
    let mut f = [0u8; 512];
    f[..8].copy_from_slice(COOKIE);
    f[8..12].copy_from_slice(&2u32.to_be_bytes());
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    let data_offset = if fixed { u64::MAX } else { 512 };
    f[16..24].copy_from_slice(&data_offset.to_be_bytes());
    let since_2000 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs().saturating_sub(946_684_800));
    f[24..28].copy_from_slice(&u32::try_from(since_2000).unwrap_or(0).to_be_bytes());
    f[28..32].copy_from_slice(b"vdk ");
    f[32..36].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    f[36..40].copy_from_slice(b"Wi2k");
    f[40..48].copy_from_slice(&size.to_be_bytes());
    f[48..56].copy_from_slice(&size.to_be_bytes());
    f[56..58].copy_from_slice(&g.0.to_be_bytes());
    f[58] = g.1;
    f[59] = g.2;
    f[60..64].copy_from_slice(&(if fixed { 2u32 } else { 3 }).to_be_bytes());
    // A unique id: time and process, enough to tell images apart.
    let id = since_2000 ^ u64::from(std::process::id()) << 32;
    f[68..76].copy_from_slice(&id.to_be_bytes());
    f[76..84].copy_from_slice(&(!id).to_be_bytes());
    let sum = checksum(&f, 64);
    f[64..68].copy_from_slice(&sum.to_be_bytes());
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)?;
    let written = (|| {
        if fixed {
            file.set_len(size)?;
            file.write_all_at(&f, size)?;
        } else {
            let entries = size.div_ceil(u64::from(DEFAULT_BLOCK));
            let bat_offset = 1536u64;
            let mut h = [0u8; 1024];
            h[..8].copy_from_slice(DYN_COOKIE);
            h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
            h[16..24].copy_from_slice(&bat_offset.to_be_bytes());
            h[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
            h[28..32].copy_from_slice(&u32::try_from(entries).unwrap_or(u32::MAX).to_be_bytes());
            h[32..36].copy_from_slice(&DEFAULT_BLOCK.to_be_bytes());
            let sum = checksum(&h, 36);
            h[36..40].copy_from_slice(&sum.to_be_bytes());
            let bat_len = (entries * 4).div_ceil(512) * 512;
            file.write_all_at(&f, 0)?;
            file.write_all_at(&h, 512)?;
            file.write_all_at(&vec![0xff; bat_len as usize], bat_offset)?;
            file.write_all_at(&f, bat_offset + bat_len)?;
        }
        file.sync_all()
    })();
    if let Err(e) = written {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_covers_the_size_as_the_spec_computes_it() {
        // 100 MiB, as qemu-img rounds it: 104865792 bytes.
        let want = (100u64 << 20) / 512;
        let mut g = geometry(want);
        let mut extra = 0;
        while chs_sectors(g) < want {
            extra += 1;
            g = geometry(want + extra);
        }
        assert_eq!(chs_sectors(g) * 512, 104_865_792);
    }

    #[test]
    fn checksum_ignores_its_own_field() {
        let mut b = [1u8; 512];
        b[64..68].copy_from_slice(&[9, 9, 9, 9]);
        assert_eq!(checksum(&b, 64), !508u32);
    }
}
