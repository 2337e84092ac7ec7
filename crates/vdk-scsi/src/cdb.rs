//! Reading CDB fields.

/// A CDB, read with zero padding past its end, so that a short CDB reads as zeroes rather
/// than panicking (its length is checked against the opcode where it matters).
#[derive(Clone, Copy, Debug)]
pub struct Cdb<'a>(&'a [u8]);

impl<'a> Cdb<'a> {
    pub fn new(b: &'a [u8]) -> Cdb<'a> {
        Cdb(b)
    }
    pub fn opcode(&self) -> u8 {
        self.byte(0)
    }
    pub fn byte(&self, i: usize) -> u8 {
        self.0.get(i).copied().unwrap_or(0)
    }
    pub fn bit(&self, i: usize, bit: u8) -> bool {
        self.byte(i) & (1 << bit) != 0
    }
    pub fn be16(&self, i: usize) -> u16 {
        u16::from_be_bytes([self.byte(i), self.byte(i + 1)])
    }
    pub fn be24(&self, i: usize) -> u32 {
        u32::from_be_bytes([0, self.byte(i), self.byte(i + 1), self.byte(i + 2)])
    }
    pub fn be32(&self, i: usize) -> u32 {
        u32::from_be_bytes([
            self.byte(i),
            self.byte(i + 1),
            self.byte(i + 2),
            self.byte(i + 3),
        ])
    }
    pub fn be64(&self, i: usize) -> u64 {
        (u64::from(self.be32(i)) << 32) | u64::from(self.be32(i + 4))
    }
    /// `data` cut to the allocation length held in the `width`-byte field at `at`.
    pub fn cut(&self, data: Vec<u8>, at: usize) -> Vec<u8> {
        self.cut_field(data, at, 1)
    }
    pub fn cut_field(&self, data: Vec<u8>, at: usize, width: usize) -> Vec<u8> {
        let alloc = match width {
            1 => u32::from(self.byte(at)),
            2 => u32::from(self.be16(at)),
            _ => self.be32(at),
        };
        cut_to(data, alloc)
    }
    /// The length a CDB of this opcode must have (its group code).
    pub fn needed_len(&self) -> usize {
        match self.opcode() >> 5 {
            0 => 6,
            1 | 2 => 10,
            4 => 16,
            5 => 12,
            _ => 6,
        }
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

pub fn cut_to(mut data: Vec<u8>, alloc: u32) -> Vec<u8> {
    if let Ok(a) = usize::try_from(alloc) {
        data.truncate(a);
    }
    data
}

/// A length that fits in 32 bits (every length here is bounded far below).
pub fn u32_of(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A length that fits in 16 bits, saturating.
pub fn u16_of(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

/// `s` in a space-padded ASCII field of `n` bytes.
pub fn ascii_field(s: &str, n: usize) -> Vec<u8> {
    let mut v: Vec<u8> = s
        .bytes()
        .map(|b| if (0x20..0x7f).contains(&b) { b } else { b'_' })
        .take(n)
        .collect();
    v.resize(n, b' ');
    v
}
