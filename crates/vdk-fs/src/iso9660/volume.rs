//! Volume descriptors (ECMA-119 8), the both-endian numbers and dates of ISO 9660, and the
//! Joliet escape sequences (Joliet specification 1995, section 3).

use super::IsoError;

/// The size of a logical sector, and of every volume descriptor.
pub const SECTOR: u64 = 2048;
/// The first volume descriptor is in sector 16.
pub const FIRST_DESCRIPTOR: u64 = 16;
/// Most descriptors read before a terminator must have come.
pub const MAX_DESCRIPTORS: u64 = 64;

/// Volume descriptor types (ECMA-119 8.1.1).
pub mod kind {
    /// Boot record (El Torito).
    pub const BOOT: u8 = 0;
    /// Primary volume descriptor.
    pub const PRIMARY: u8 = 1;
    /// Supplementary (Joliet) or enhanced volume descriptor.
    pub const SUPPLEMENTARY: u8 = 2;
    /// Volume descriptor set terminator.
    pub const TERMINATOR: u8 = 255;
}

/// A little-endian then big-endian 32-bit number (ECMA-119 7.3.3); the little-endian half
/// is read, as most readers do when the halves disagree.
pub fn both32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// A both-endian 16-bit number (ECMA-119 7.2.3).
pub fn both16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

/// What a primary or supplementary descriptor says.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Descriptor {
    /// Type: primary or supplementary.
    pub kind: u8,
    /// The volume identifier, as recorded (d-characters, or UCS-2 for Joliet).
    pub volume_id: String,
    /// The volume space size, in logical blocks.
    pub blocks: u32,
    /// The logical block size (2048 on every disc there is).
    pub block_size: u16,
    /// The root directory record (34 bytes).
    pub root: [u8; 34],
    /// For a supplementary descriptor: the Joliet level (1-3) its escape sequences name.
    pub joliet: Option<u8>,
}

impl Descriptor {
    /// Parses a primary or supplementary descriptor.
    pub fn parse(d: &[u8; 2048]) -> Result<Descriptor, IsoError> {
        let kind = d[0];
        let block_size = both16(&d[128..]);
        if !matches!(block_size, 512 | 1024 | 2048) {
            return Err(IsoError::Malformed("logical block size"));
        }
        let mut root = [0u8; 34];
        root.copy_from_slice(&d[156..190]);
        if root[0] != 34 {
            return Err(IsoError::Malformed("root directory record"));
        }
        let joliet = if kind == kind::SUPPLEMENTARY {
            // Escape sequences (bytes 88-119): %/@, %/C and %/E name UCS-2 levels 1 to 3.
            match &d[88..91] {
                b"%/@" => Some(1),
                b"%/C" => Some(2),
                b"%/E" => Some(3),
                _ => None,
            }
        } else {
            None
        };
        let id = &d[40..72];
        let volume_id = if joliet.is_some() {
            ucs2(id)
        } else {
            String::from_utf8_lossy(id).into_owned()
        };
        Ok(Descriptor {
            kind,
            volume_id: volume_id.trim_end().to_owned(),
            blocks: both32(&d[80..]),
            block_size,
            root,
            joliet,
        })
    }
}

/// UCS-2 big-endian (as Joliet records names), decoded as UTF-16; unpaired surrogates become
/// U+FFFD.
pub fn ucs2(b: &[u8]) -> String {
    let units = b.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]]));
    char::decode_utf16(units)
        .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect()
}

/// Seconds since the Unix epoch of a civil date and time in UTC, for years 1..=9999.
pub fn unix_time(year: i64, month: u32, day: u32, hour: u32, min: u32, sec: u32) -> i64 {
    // Days from civil (H. Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + i64::from(hour) * 3600 + i64::from(min) * 60 + i64::from(sec)
}

/// A time as (seconds, nanoseconds) since the Unix epoch.
pub type Time = (i64, u32);

/// The 7-byte date of a directory record (ECMA-119 9.1.5): years since 1900, month, day,
/// hour, minute, second, and the offset from UTC in 15-minute steps. None if unset (zeros)
/// or out of range.
pub fn record_date(b: &[u8]) -> Option<Time> {
    let (month, day) = (u32::from(b[1]), u32::from(b[2]));
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || b[3] > 23 || b[4] > 59 || b[5] > 60
    {
        return None;
    }
    let t = unix_time(
        1900 + i64::from(b[0]),
        month,
        day,
        u32::from(b[3]),
        u32::from(b[4]),
        u32::from(b[5]),
    );
    Some((t - gmt_offset(b[6]), 0))
}

/// The 17-byte date of a volume descriptor or of a long-form Rock Ridge time (ECMA-119
/// 8.4.26.1): digits YYYYMMDDHHMMSS, hundredths, and the offset from UTC.
pub fn long_date(b: &[u8]) -> Option<Time> {
    let digits = std::str::from_utf8(&b[..16]).ok()?;
    if !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let n = |r: std::ops::Range<usize>| digits[r].parse::<u32>().ok();
    let year = n(0..4)?;
    let (month, day) = (n(4..6)?, n(6..8)?);
    if year == 0 || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let (hour, min, sec, cs) = (n(8..10)?, n(10..12)?, n(12..14)?, n(14..16)?);
    if hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let t = unix_time(i64::from(year), month, day, hour, min, sec);
    Some((t - gmt_offset(b[16]), cs * 10_000_000))
}

/// A date's offset from UTC in seconds: a signed count of quarter hours. ECMA-119 allows
/// -48..=+52; discs carry other values, and the Linux kernel applies any within -52..=+52
/// and ignores the rest (the time is then read as UTC): so does vdk.
fn gmt_offset(quarters: u8) -> i64 {
    let q = i64::from(quarters as i8);
    if (-52..=52).contains(&q) {
        q * 15 * 60
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_convert_to_unix_time() {
        assert_eq!(unix_time(1970, 1, 1, 0, 0, 0), 0);
        assert_eq!(unix_time(2000, 3, 1, 0, 0, 0), 951_868_800);
        // 2026-11-02 10:20:30 at UTC+1 (4 quarter hours).
        let d = record_date(&[126, 11, 2, 10, 20, 30, 4]).unwrap();
        assert_eq!(d.0, unix_time(2026, 11, 2, 9, 20, 30));
        assert_eq!(record_date(&[0; 7]), None);
        let l = long_date(b"2026110210203050\x00").unwrap();
        assert_eq!(l, (unix_time(2026, 11, 2, 10, 20, 30), 500_000_000));
        assert_eq!(long_date(b"0000000000000000\x00"), None);
    }

    #[test]
    fn offsets_beyond_thirteen_hours_are_ignored_as_the_kernel_does() {
        let at = |q: i8| record_date(&[126, 11, 2, 10, 20, 30, q as u8]).unwrap().0;
        let utc = unix_time(2026, 11, 2, 10, 20, 30);
        // ECMA-119's range is -48..=52; the kernel applies -52..=52, and so does vdk.
        assert_eq!(at(-48), utc + 12 * 3600);
        assert_eq!(at(-50), utc + 50 * 900);
        assert_eq!(at(-52), utc + 13 * 3600);
        assert_eq!(at(52), utc - 13 * 3600);
        // Beyond: the offset is ignored, never clamped.
        for q in [-53, -100, i8::MIN, 53, 100, i8::MAX] {
            assert_eq!(at(q), utc, "offset {q}");
        }
        let mut long = *b"2026110210203000\x00";
        long[16] = 60;
        assert_eq!(long_date(&long).unwrap().0, utc);
        long[16] = (-8i8) as u8;
        assert_eq!(long_date(&long).unwrap().0, utc + 2 * 3600);
    }

    #[test]
    fn ucs2_names_decode() {
        assert_eq!(ucs2(&[0, b'a', 0x00, 0xe9]), "aé");
        assert_eq!(ucs2(&[0xd8, 0x3d, 0xde, 0x00]), "😀");
        assert_eq!(ucs2(&[0xd8, 0x3d]), "\u{fffd}");
    }
}
