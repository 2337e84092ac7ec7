//! Refcount blocks: packed counters of 1 to 64 bits, decoded to and from `u64`s.

/// Decodes a refcount block of `order` (width `1 << order` bits).
pub fn decode(raw: &[u8], order: u32) -> Vec<u64> {
    let bits = 1usize << order;
    if bits < 8 {
        let per_byte = 8 / bits;
        let mask = (1u8 << bits) - 1;
        let mut out = Vec::with_capacity(raw.len() * per_byte);
        for b in raw {
            for i in 0..per_byte {
                out.push(u64::from((b >> (i * bits)) & mask));
            }
        }
        out
    } else {
        let width = bits / 8;
        raw.chunks_exact(width)
            .map(|c| c.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
            .collect()
    }
}

/// Encodes counters back into a block of `order`. Counters above the width's maximum must
/// have been refused before (see [`max`]).
pub fn encode(counts: &[u64], order: u32) -> Vec<u8> {
    let bits = 1usize << order;
    if bits < 8 {
        let per_byte = 8 / bits;
        counts
            .chunks(per_byte)
            .map(|c| {
                c.iter()
                    .enumerate()
                    .fold(0u8, |acc, (i, v)| acc | (((*v & 0xff) as u8) << (i * bits)))
            })
            .collect()
    } else {
        let width = bits / 8;
        let mut out = Vec::with_capacity(counts.len() * width);
        for v in counts {
            out.extend_from_slice(&v.to_be_bytes()[8 - width..]);
        }
        out
    }
}

/// The largest count a width of `order` holds.
pub fn max(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_round_trips() {
        for order in 0..=6 {
            let n = 64;
            let counts: Vec<u64> = (0..n).map(|i| (i * 7 + 1) as u64 & max(order)).collect();
            let raw = encode(&counts, order);
            assert_eq!(raw.len(), n * (1 << order) / 8, "order {order}");
            assert_eq!(decode(&raw, order), counts, "order {order}");
        }
    }

    #[test]
    fn sub_byte_counts_start_at_the_least_significant_bit() {
        assert_eq!(decode(&[0b0000_0010], 0)[..2], [0, 1]);
        assert_eq!(encode(&[1, 0, 0, 0, 0, 0, 0, 0], 0), [1]);
        assert_eq!(decode(&[0x01, 0x02], 4), [0x0102]);
    }
}
