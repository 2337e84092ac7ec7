//! zisofs: files compressed block by block with zlib (the `ZF` Rock Ridge entry, algorithm
//! `pz`), as mkzftree and xorriso's `--zisofs` filter write them and Linux reads them.
//!
//! ```text
//!   magic (8) | size (4, LE) | header size / 4 (1) | log2 block size (1) | 2 reserved
//!   block pointers: n + 1 offsets (4 bytes each, LE) from the start of the stored file
//!   block i: zlib data in [pointer i, pointer i+1); an empty block is all zeroes
//! ```
//!
//! Everything read from the image is checked: a pointer out of order or past the stored
//! data, a block that does not inflate to its size, is an error for that read.

use super::IsoError;

/// The magic number that starts a zisofs file.
pub const MAGIC: [u8; 8] = [0x37, 0xe4, 0x53, 0x96, 0xc9, 0xdb, 0xd6, 0x07];

/// Block sizes zisofs allows: 32, 64 and 128 KiB.
const BLOCK_SHIFTS: std::ops::RangeInclusive<u8> = 15..=17;

/// What the ZF entry says of a file.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Zf {
    /// The header size in bytes (16).
    pub header: u32,
    /// log2 of the block size.
    pub block_shift: u8,
    /// The uncompressed size.
    pub size: u64,
}

impl Zf {
    /// Parses a ZF entry's data (RRIP-ZF: algorithm, header size / 4, log2 block size,
    /// uncompressed size both-endian); None for another algorithm or a bad block size.
    pub fn parse(data: &[u8]) -> Option<Zf> {
        if data.len() < 12 || &data[..2] != b"pz" || !BLOCK_SHIFTS.contains(&data[3]) {
            return None;
        }
        Some(Zf {
            header: u32::from(data[2]) * 4,
            block_shift: data[3],
            size: u64::from(super::volume::both32(&data[4..])),
        })
    }

    fn block(&self) -> u64 {
        1 << self.block_shift
    }

    /// The number of blocks.
    fn blocks(&self) -> u64 {
        self.size.div_ceil(self.block())
    }
}

/// Reads stored (compressed) bytes of the file: `(offset, buf)`, all of `buf` or an error.
pub type Stored<'a> = dyn FnMut(u64, &mut [u8]) -> Result<(), IsoError> + 'a;

/// Reads uncompressed bytes at `offset` into `buf` (already cut to the file's size), reading
/// stored bytes with `stored(offset, buf)`.
pub fn read(zf: &Zf, offset: u64, buf: &mut [u8], stored: &mut Stored<'_>) -> Result<(), IsoError> {
    let bad = || IsoError::Malformed("zisofs data");
    if buf.is_empty() {
        return Ok(());
    }
    let bs = zf.block();
    let first = offset / bs;
    let last = (offset + buf.len() as u64 - 1) / bs;
    if last >= zf.blocks() {
        return Err(bad());
    }
    // The stored header must agree with the ZF entry.
    let mut head = [0u8; 16];
    stored(0, &mut head)?;
    if head[..8] != MAGIC || head[13] != zf.block_shift {
        return Err(bad());
    }
    let count = usize::try_from(last - first + 2).map_err(|_| bad())?;
    let mut table = vec![0u8; count * 4];
    stored(u64::from(zf.header) + first * 4, &mut table)?;
    let ptrs: Vec<u64> = table
        .chunks_exact(4)
        .map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        .collect();
    let block_len = usize::try_from(bs).map_err(|_| bad())?;
    let mut plain = vec![0u8; block_len];
    let mut packed = Vec::new();
    for (i, b) in (first..=last).enumerate() {
        let (start, end) = (ptrs[i], ptrs[i + 1]);
        if end < start || end - start > bs + (bs >> 3) + 64 {
            return Err(bad());
        }
        let want = usize::try_from((zf.size - b * bs).min(bs)).map_err(|_| bad())?;
        let out = &mut plain[..want];
        if end == start {
            out.fill(0);
        } else {
            packed.resize(usize::try_from(end - start).map_err(|_| bad())?, 0);
            stored(start, &mut packed)?;
            let mut z = flate2::Decompress::new(true);
            match z.decompress(&packed, out, flate2::FlushDecompress::Finish) {
                Ok(_) if z.total_out() == want as u64 => {}
                _ => return Err(bad()),
            }
        }
        // The part of this block the request covers.
        let block_start = b * bs;
        let from = offset.max(block_start);
        let to = (offset + buf.len() as u64).min(block_start + want as u64);
        let (src, dst) = (from - block_start, from - offset);
        let n = usize::try_from(to - from).map_err(|_| bad())?;
        let (src, dst) = (
            usize::try_from(src).map_err(|_| bad())?,
            usize::try_from(dst).map_err(|_| bad())?,
        );
        buf[dst..dst + n].copy_from_slice(&out[src..src + n]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// A zisofs file of `data` with 32 KiB blocks (block 1 left empty if it is all zeroes).
    fn pack(data: &[u8]) -> Vec<u8> {
        let bs = 1 << 15;
        let n = data.len().div_ceil(bs);
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&[4, 15, 0, 0]);
        let table_at = out.len();
        out.resize(table_at + (n + 1) * 4, 0);
        let mut ptrs = vec![out.len() as u32];
        for chunk in data.chunks(bs) {
            if chunk.iter().any(|&b| b != 0) {
                let mut z =
                    flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
                z.write_all(chunk).unwrap();
                out.extend(z.finish().unwrap());
            }
            ptrs.push(out.len() as u32);
        }
        for (i, p) in ptrs.iter().enumerate() {
            out[table_at + 4 * i..table_at + 4 * i + 4].copy_from_slice(&p.to_le_bytes());
        }
        out
    }

    fn zf(len: usize) -> Zf {
        Zf {
            header: 16,
            block_shift: 15,
            size: len as u64,
        }
    }

    fn reader(stored: &[u8]) -> impl FnMut(u64, &mut [u8]) -> Result<(), IsoError> + '_ {
        move |at, buf| {
            let at = at as usize;
            let src = stored
                .get(at..at + buf.len())
                .ok_or(IsoError::OutOfBounds)?;
            buf.copy_from_slice(src);
            Ok(())
        }
    }

    #[test]
    fn reads_across_blocks_and_empty_blocks() {
        let mut data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        data[32768..65536].fill(0);
        let stored = pack(&data);
        let mut buf = vec![0u8; 50_000];
        read(&zf(data.len()), 20_000, &mut buf, &mut reader(&stored)).unwrap();
        assert_eq!(buf, data[20_000..70_000]);
        let mut tail = vec![0u8; 10];
        read(&zf(data.len()), 99_990, &mut tail, &mut reader(&stored)).unwrap();
        assert_eq!(tail, data[99_990..]);
    }

    #[test]
    fn a_broken_pointer_table_is_an_error() {
        let data = vec![7u8; 40_000];
        let mut stored = pack(&data);
        stored[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut buf = vec![0u8; 100];
        assert!(read(&zf(data.len()), 0, &mut buf, &mut reader(&stored)).is_err());
        assert!(
            read(&zf(10), 0, &mut buf, &mut reader(&stored)).is_err(),
            "past the end"
        );
    }

    #[test]
    fn zf_entries_parse() {
        let mut d = b"pz\x04\x0f".to_vec();
        d.extend_from_slice(&1000u32.to_le_bytes());
        d.extend_from_slice(&1000u32.to_be_bytes());
        assert_eq!(Zf::parse(&d), Some(zf(1000)));
        d[3] = 12;
        assert_eq!(Zf::parse(&d), None, "block size out of range");
    }
}
