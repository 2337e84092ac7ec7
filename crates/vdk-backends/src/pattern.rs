//! A read-only disk whose every 8-byte word holds its own byte offset, big-endian (as nbdkit's
//! pattern plugin does): a test device on which a misplaced or torn read shows at once.
//!
//! ```
//! use vdk_backends::PatternDisk;
//! use vdk_core::BlockDevice;
//! let disk = PatternDisk::new(1 << 20);
//! let mut buf = [0u8; 8];
//! disk.read_at(&mut buf, 4096).unwrap();
//! assert_eq!(u64::from_be_bytes(buf), 4096);
//! ```

use vdk_core::{check_range, BlockDevice, Capabilities, DiskInfo, Error, Lend, Result};

/// A computed, read-only disk of `size` bytes. Costs no memory whatever its size.
#[derive(Debug)]
pub struct PatternDisk {
    size: u64,
}

impl PatternDisk {
    /// A pattern disk of `size` bytes.
    pub fn new(size: u64) -> PatternDisk {
        PatternDisk { size }
    }

    /// The byte the pattern holds at `offset`.
    pub fn byte_at(offset: u64) -> u8 {
        (offset & !7).to_be_bytes()[(offset & 7) as usize]
    }
}

impl BlockDevice for PatternDisk {
    fn info(&self) -> DiskInfo {
        let mut info = DiskInfo::new(self.size);
        info.read_only = true;
        info.caps = Capabilities {
            multi_conn: true,
            ..Capabilities::NONE
        };
        info
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        // Bytes up to the first word boundary, then whole words, then the tail.
        let head = usize::try_from((8 - offset % 8) % 8)
            .unwrap_or(0)
            .min(buf.len());
        let (first, rest) = buf.split_at_mut(head);
        for (i, b) in first.iter_mut().enumerate() {
            *b = PatternDisk::byte_at(offset + i as u64);
        }
        let mut at = offset + head as u64;
        let mut words = rest.chunks_exact_mut(8);
        for word in &mut words {
            word.copy_from_slice(&at.to_be_bytes());
            at += 8;
        }
        for (i, b) in words.into_remainder().iter_mut().enumerate() {
            *b = PatternDisk::byte_at(at + i as u64);
        }
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64, _fua: bool) -> Result<()> {
        Err(Error::ReadOnly)
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _may_trim: bool, _fua: bool) -> Result<()> {
        Err(Error::ReadOnly)
    }

    fn lend(&self) -> Option<&dyn Lend> {
        Some(self)
    }
}

impl Lend for PatternDisk {
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        self.read_at(buf, offset).map(|()| true) // computed: never waits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_word_holds_its_offset() {
        let disk = PatternDisk::new(1 << 40);
        let mut buf = [0u8; 16];
        disk.read_at(&mut buf, (1 << 40) - 16).unwrap();
        assert_eq!(
            u64::from_be_bytes(buf[8..].try_into().unwrap()),
            (1 << 40) - 8
        );
    }

    #[test]
    fn unaligned_read_sees_the_middle_of_words() {
        let disk = PatternDisk::new(4096);
        let mut buf = [0u8; 3];
        disk.read_at(&mut buf, 0x106).unwrap();
        assert_eq!(buf, [0x01, 0x00, 0x00]); // bytes 6, 7 of word 0x100, byte 0 of word 0x108
    }

    #[test]
    fn writes_are_refused_as_read_only() {
        let disk = PatternDisk::new(4096);
        assert!(matches!(
            disk.write_at(&[1], 0, false),
            Err(Error::ReadOnly)
        ));
        assert!(matches!(
            disk.write_zeroes(0, 8, true, false),
            Err(Error::ReadOnly)
        ));
        assert!(matches!(disk.trim(0, 8), Err(Error::Unsupported(_))));
    }

    #[test]
    fn read_past_the_end_is_out_of_range() {
        let disk = PatternDisk::new(4096);
        assert!(matches!(
            disk.read_at(&mut [0; 2], 4095),
            Err(Error::OutOfRange { .. })
        ));
    }
}
