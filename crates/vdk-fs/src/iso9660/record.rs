//! Directory records (ECMA-119 9.1): the entries of a directory's extent. The existence
//! (hidden) bit is not honoured: like Linux and xorriso, every file is shown.
//!
//! A record never crosses a logical sector; a zero length byte means the rest of the sector is
//! padding. Every length is checked against the bytes there are: a broken record ends the
//! directory with an error, never a panic.

use super::volume::both32;
use super::IsoError;

/// File flags (ECMA-119 9.1.6).
pub mod flag {
    /// A directory.
    pub const DIRECTORY: u8 = 0x02;
    /// An associated file (a resource fork): not shown.
    pub const ASSOCIATED: u8 = 0x04;
    /// More extents of the same file follow in the next records.
    pub const MULTI_EXTENT: u8 = 0x80;
}

/// Fixed part of a record, before its name.
pub const FIXED: usize = 33;

/// One directory record.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Record<'a> {
    /// Length of the record in bytes.
    pub len: usize,
    /// Extended attribute record length, in logical blocks, before the data.
    pub ext_attr: u8,
    /// The first logical block of the extent.
    pub extent: u32,
    /// The extent's length in bytes.
    pub size: u32,
    /// The recording date (7 bytes).
    pub date: [u8; 7],
    /// File flags.
    pub flags: u8,
    /// The file identifier: `\0` for `.`, `\x01` for `..`.
    pub name: &'a [u8],
    /// The system use area after the name (SUSP entries).
    pub system_use: &'a [u8],
}

impl Record<'_> {
    /// Whether this is the `.` or `..` record.
    pub fn is_dot(&self) -> bool {
        self.name == [0] || self.name == [1]
    }
}

/// Parses the record at the start of `b` (which holds at least its length byte).
pub fn parse(b: &[u8]) -> Result<Record<'_>, IsoError> {
    let len = usize::from(b[0]);
    if len < FIXED + 1 || len > b.len() {
        return Err(IsoError::Malformed("directory record length"));
    }
    let b = &b[..len];
    let name_len = usize::from(b[32]);
    if name_len == 0 || FIXED + name_len > len {
        return Err(IsoError::Malformed("file identifier length"));
    }
    let name = &b[FIXED..FIXED + name_len];
    // A padding byte follows an even-length identifier.
    let su_start = (FIXED + name_len + (name_len + 1) % 2).min(len);
    let mut date = [0u8; 7];
    date.copy_from_slice(&b[18..25]);
    Ok(Record {
        len,
        ext_attr: b[1],
        extent: both32(&b[2..]),
        size: both32(&b[10..]),
        date,
        flags: b[25],
        name,
        system_use: &b[su_start..],
    })
}

/// The records of a directory extent, in order, with their byte offsets in it. Stops at the
/// first malformed record (with its error).
pub fn records(extent: &[u8]) -> impl Iterator<Item = (usize, Result<Record<'_>, IsoError>)> {
    const SECTOR_BYTES: usize = 2048;
    let sector = SECTOR_BYTES;
    let mut at = 0usize;
    let mut broken = false;
    std::iter::from_fn(move || loop {
        if broken || at >= extent.len() {
            return None;
        }
        let len = usize::from(extent[at]);
        if len == 0 {
            // Padding to the end of this sector.
            at = (at / sector + 1) * sector;
            continue;
        }
        let sector_end = ((at / sector + 1) * sector).min(extent.len());
        let here = at;
        let r = parse(&extent[at..sector_end]);
        match &r {
            Ok(rec) => at += rec.len,
            Err(_) => broken = true,
        }
        return Some((here, r));
    })
}

/// A record for `name` at `extent` of `size` bytes with `flags` and system use `su`, dated
/// 2026-11-02 10:20:30 UTC: for the tests of this module and its parent.
#[cfg(test)]
pub(super) fn make(name: &[u8], extent: u32, size: u32, flags: u8, su: &[u8]) -> Vec<u8> {
    let pad = usize::from(name.len().is_multiple_of(2));
    let len = FIXED + name.len() + pad + su.len();
    let mut r = vec![0u8; len];
    r[0] = u8::try_from(len).unwrap();
    r[2..6].copy_from_slice(&extent.to_le_bytes());
    r[6..10].copy_from_slice(&extent.to_be_bytes());
    r[10..14].copy_from_slice(&size.to_le_bytes());
    r[14..18].copy_from_slice(&size.to_be_bytes());
    r[18..25].copy_from_slice(&[126, 11, 2, 10, 20, 30, 0]);
    r[25] = flags;
    r[32] = u8::try_from(name.len()).unwrap();
    r[FIXED..FIXED + name.len()].copy_from_slice(name);
    r[FIXED + name.len() + pad..].copy_from_slice(su);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_parses_with_its_system_use_area() {
        let r = make(b"HELLO.TXT;1", 30, 1234, 0, b"NM\x05\x01x");
        let p = parse(&r).unwrap();
        assert_eq!((p.extent, p.size, p.flags), (30, 1234, 0));
        assert_eq!(p.name, b"HELLO.TXT;1");
        assert_eq!(p.system_use, b"NM\x05\x01x");
    }

    #[test]
    fn records_skip_sector_padding() {
        let mut extent = vec![0u8; 4096];
        let a = make(b"A;1", 1, 1, 0, &[]);
        extent[..a.len()].copy_from_slice(&a);
        let b = make(b"B;1", 2, 2, 0, &[]);
        extent[2048..2048 + b.len()].copy_from_slice(&b);
        let names: Vec<Vec<u8>> = records(&extent)
            .map(|(_, r)| r.unwrap().name.to_vec())
            .collect();
        assert_eq!(names, vec![b"A;1".to_vec(), b"B;1".to_vec()]);
    }

    #[test]
    fn broken_records_are_errors_not_panics() {
        let mut r = make(b"A;1", 1, 1, 0, &[]);
        r[32] = 200; // name longer than the record
        assert!(parse(&r).is_err());
        assert!(parse(&[10u8; 10]).is_err(), "shorter than the fixed part");
        let mut extent = vec![0u8; 2048];
        extent[0] = 255; // runs past the sector end
        assert!(records(&extent).next().unwrap().1.is_err());
    }
}
