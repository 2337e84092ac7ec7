//! partition: one partition of an MBR or GPT disk, shown as a whole disk.

use std::sync::Arc;

use vdk_core::{check_range, BlockDevice, DiskInfo, Error, Extents, Filter, Lend, Piece, Result};

/// Where a partition lies, in bytes.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Span {
    /// Start.
    pub start: u64,
    /// Length.
    pub len: u64,
}

/// Why a partition cannot be found.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    /// Reading the table failed.
    #[error("cannot read the partition table: {0}")]
    Read(#[from] Error),
    /// No MBR signature.
    #[error("no partition table (no MBR signature)")]
    NoTable,
    /// The GPT header or its entries fail their checksum.
    #[error("the GPT is damaged: {0}")]
    BadGpt(String),
    /// No such partition.
    #[error("there is no partition {0}")]
    NoSuchPartition(u32),
    /// The partition lies outside the disk.
    #[error("partition {0} lies outside the disk")]
    OutOfDisk(u32),
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Finds partition `number` (1-based: MBR primaries 1-4, GPT entries in table order) of
/// `disk`, with 512-byte sectors.
pub fn find(disk: &dyn BlockDevice, number: u32) -> std::result::Result<Span, PartitionError> {
    let size = disk.info().size;
    let mut mbr = [0u8; 512];
    disk.read_at(&mut mbr, 0)?;
    if mbr[510..512] != [0x55, 0xaa] {
        return Err(PartitionError::NoTable);
    }
    let protective = (0..4).any(|i| mbr[446 + 16 * i + 4] == 0xee);
    let span = if protective {
        gpt(disk, number)?
    } else {
        if !(1..=4).contains(&number) {
            return Err(PartitionError::NoSuchPartition(number));
        }
        let e = &mbr[446 + 16 * (number as usize - 1)..446 + 16 * number as usize];
        let (kind, lba, sectors) = (e[4], u64::from(le32(e, 8)), u64::from(le32(e, 12)));
        if kind == 0 || sectors == 0 {
            return Err(PartitionError::NoSuchPartition(number));
        }
        Span {
            start: lba * 512,
            len: sectors * 512,
        }
    };
    if span.start.checked_add(span.len).is_none_or(|e| e > size) || span.len == 0 {
        return Err(PartitionError::OutOfDisk(number));
    }
    Ok(span)
}

fn gpt(disk: &dyn BlockDevice, number: u32) -> std::result::Result<Span, PartitionError> {
    let mut h = [0u8; 512];
    disk.read_at(&mut h, 512)?;
    if &h[..8] != b"EFI PART" {
        return Err(PartitionError::BadGpt("no GPT header at sector 1".into()));
    }
    let hsize = le32(&h, 12) as usize;
    if !(92..=512).contains(&hsize) {
        return Err(PartitionError::BadGpt(format!("header size {hsize}")));
    }
    let mut hc = h[..hsize].to_vec();
    hc[16..20].fill(0);
    if crc32fast::hash(&hc) != le32(&h, 16) {
        return Err(PartitionError::BadGpt("header checksum mismatch".into()));
    }
    let (entries_lba, count, esize) = (le64(&h, 72), le32(&h, 80), le32(&h, 84));
    if !(128..=4096).contains(&esize) || count == 0 || count > 4096 {
        return Err(PartitionError::BadGpt(format!(
            "{count} entries of {esize} bytes"
        )));
    }
    let mut table = vec![0u8; count as usize * esize as usize];
    disk.read_at(
        &mut table,
        entries_lba
            .checked_mul(512)
            .ok_or_else(|| PartitionError::BadGpt("entries LBA".into()))?,
    )?;
    if crc32fast::hash(&table) != le32(&h, 88) {
        return Err(PartitionError::BadGpt(
            "partition entries checksum mismatch".into(),
        ));
    }
    if number == 0 || number > count {
        return Err(PartitionError::NoSuchPartition(number));
    }
    let at = (number as usize - 1) * esize as usize;
    let e = &table[at..at + esize as usize];
    if e[..16].iter().all(|b| *b == 0) {
        return Err(PartitionError::NoSuchPartition(number));
    }
    let (first, last) = (le64(e, 32), le64(e, 40));
    if last < first {
        return Err(PartitionError::OutOfDisk(number));
    }
    Ok(Span {
        start: first * 512,
        len: (last - first + 1) * 512,
    })
}

/// A partition of the disk below, as a disk of its own.
#[derive(Debug)]
pub struct Partition {
    inner: Arc<dyn BlockDevice>,
    span: Span,
}

impl Partition {
    /// Partition `number` of `inner`.
    pub fn new(
        inner: Arc<dyn BlockDevice>,
        number: u32,
    ) -> std::result::Result<Partition, PartitionError> {
        let span = find(&*inner, number)?;
        Ok(Partition { inner, span })
    }

    /// Where it lies on the disk below.
    pub fn span(&self) -> Span {
        self.span
    }

    fn at(&self, offset: u64, len: u64) -> Result<u64> {
        check_range(self.span.len, offset, len)?;
        Ok(self.span.start + offset)
    }
}

impl Filter for Partition {
    fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }
    fn info(&self) -> DiskInfo {
        let mut info = self.inner.info();
        info.size = self.span.len;
        info
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let at = self.at(offset, buf.len() as u64)?;
        self.inner.read_at(buf, at)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        let at = self.at(offset, buf.len() as u64)?;
        self.inner.write_at(buf, at, fua)
    }
    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        let at = self.at(offset, len)?;
        self.inner.trim(at, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<()> {
        let at = self.at(offset, len)?;
        self.inner.write_zeroes(at, len, may_trim, fua)
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Extents> {
        let at = self.at(offset, len)?;
        let below = self.inner.extents(at, len)?;
        let mut e = Extents::new(offset);
        for (_, run) in below.iter() {
            e.push(run.len, run.kind);
        }
        Ok(e)
    }
    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        let at = self.at(offset, len)?;
        self.inner.cache(at, len)
    }
    /// Its own: the disk below's fast paths, moved by the partition's start.
    fn lend(&self) -> Option<&dyn Lend> {
        self.inner.lend().map(|_| self as &dyn Lend)
    }
}

impl Lend for Partition {
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        let at = self.at(offset, buf.len() as u64)?;
        self.inner
            .lend()
            .map_or(Ok(false), |l| l.try_read_at(buf, at))
    }
    fn try_write_at(&self, buf: &[u8], offset: u64) -> Result<bool> {
        let at = self.at(offset, buf.len() as u64)?;
        self.inner
            .lend()
            .map_or(Ok(false), |l| l.try_write_at(buf, at))
    }
    fn read_shared(&self, offset: u64, len: usize) -> Result<Option<Vec<Piece>>> {
        let at = self.at(offset, len as u64)?;
        self.inner
            .lend()
            .map_or(Ok(None), |l| l.read_shared(at, len))
    }
    fn write_unit(&self) -> Option<usize> {
        // Units are aligned on the disk below: only usable if the partition is too.
        self.inner
            .lend()?
            .write_unit()
            .filter(|u| self.span.start.is_multiple_of(*u as u64))
    }
    fn write_owned(&self, offset: u64, bufs: Vec<Arc<[u8]>>) -> Result<Vec<Arc<[u8]>>> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        let at = self.at(offset, len)?;
        match self.inner.lend() {
            Some(l) => l.write_owned(at, bufs),
            None => Err(vdk_core::Error::Unsupported(vdk_core::Op::Write)),
        }
    }
}
