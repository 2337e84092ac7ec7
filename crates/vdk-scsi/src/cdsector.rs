//! Raw CD-ROM sectors (ECMA-130): a mode 1 sector is 2352 bytes, sync pattern (12), header
//! (4: the address in minutes, seconds and frames, and the mode), user data (2048), EDC (4),
//! eight zero bytes, and the P and Q parity of the cross-interleaved Reed-Solomon code (172 and
//! 104 bytes). READ CD returns the parts of them an initiator selects; an ISO image holds only
//! the user data, so the rest is made here.

/// Bytes of a raw sector.
pub const RAW: usize = 2352;
/// Where each part starts in a raw mode 1 sector.
pub const HEADER: usize = 12;
pub const USER: usize = 16;
pub const EDC: usize = 2064;
const P_PARITY: usize = 2076;
const Q_PARITY: usize = 2248;

/// The 12-byte sync pattern that starts every data sector.
const SYNC: [u8; 12] = [
    0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0,
];

/// A logical block's address as minutes, seconds and frames (75 a second), counted from the
/// start of the 2-second pregap, in binary-coded decimal as the header holds it.
fn header_msf(lba: u64) -> [u8; 3] {
    let x = lba + 150;
    let bcd = |v: u64| {
        let v = u8::try_from(v % 100).unwrap_or(0);
        ((v / 10) << 4) | (v % 10)
    };
    [bcd(x / (60 * 75)), bcd(x / 75 % 60), bcd(x % 75)]
}

/// The EDC of ECMA-130 14.3: a 32-bit CRC, least significant bit first, of the polynomial
/// (x^16 + x^15 + x^2 + 1)(x^16 + x^2 + x + 1), over the sync, header and user data.
fn edc(data: &[u8]) -> u32 {
    // The product above, reflected.
    const POLY: u32 = 0xd801_8001;
    let mut crc = 0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ if crc & 1 != 0 { POLY } else { 0 };
        }
    }
    crc
}

/// Multiplication by x (the primitive element α) in GF(2^8) modulo x^8 + x^4 + x^3 + x^2 + 1.
fn times_alpha(v: u8) -> u8 {
    let w = u16::from(v) << 1;
    u8::try_from(if w & 0x100 != 0 { w ^ 0x11d } else { w }).unwrap_or(0)
}

/// Division by 1 + α: the inverse of `v ↦ v ⊕ αv`.
fn over_one_plus_alpha(v: u8) -> u8 {
    // The map is linear and one-to-one on GF(2^8): find the preimage.
    (0..=255u8).find(|&x| x ^ times_alpha(x) == v).unwrap_or(0)
}

/// Two parity bytes for each of `count` codewords of a Reed-Solomon code with roots 1 and α
/// (ECMA-130 annex A). Codeword `k` takes `len` bytes of `area`, the first at
/// `(k / 2) * step + k % 2`, each next one `skip` further (wrapping around the area); its
/// parity bytes go to `out[k]` and `out[k + count]`.
fn parity(area: &[u8], (count, len): (usize, usize), (step, skip): (usize, usize), out: &mut [u8]) {
    let size = count * len;
    for k in 0..count {
        let mut at = (k / 2) * step + k % 2;
        // Horner's rule: a = Σ d_i α^(len - i) (shifted once more below), b = Σ d_i.
        let (mut a, mut b) = (0u8, 0u8);
        for _ in 0..len {
            let d = area[at];
            at += skip;
            if at >= size {
                at -= size;
            }
            a = times_alpha(a ^ d);
            b ^= d;
        }
        // The parity p0, p1 make Σ c = 0 and Σ c α^(n-1-i) = 0: p0 = (αa + b) / (1 + α)...
        let p0 = over_one_plus_alpha(times_alpha(a) ^ b);
        out[k] = p0;
        out[k + count] = p0 ^ b;
    }
}

/// The raw mode 1 sector of logical block `lba` whose user data is `user` (2048 bytes).
pub fn mode1(lba: u64, user: &[u8]) -> Vec<u8> {
    let mut s = vec![0u8; RAW];
    s[..12].copy_from_slice(&SYNC);
    s[HEADER..HEADER + 3].copy_from_slice(&header_msf(lba));
    s[HEADER + 3] = 1; // mode 1
    s[USER..USER + 2048].copy_from_slice(&user[..2048]);
    let e = edc(&s[..EDC]);
    s[EDC..EDC + 4].copy_from_slice(&e.to_le_bytes());
    // P: 86 columns of 24 bytes over the header to the zero bytes (2064 bytes).
    let (area, rest) = s.split_at_mut(P_PARITY);
    parity(&area[HEADER..], (86, 24), (2, 86), &mut rest[..172]);
    // Q: 52 diagonals of 43 bytes over the same and the P parity (2236 bytes).
    let (area, rest) = s.split_at_mut(Q_PARITY);
    parity(&area[HEADER..], (52, 43), (86, 88), &mut rest[..104]);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// α^e.
    fn alpha_pow(e: usize) -> u8 {
        (0..e).fold(1, |v, _| times_alpha(v))
    }

    fn mul(a: u8, b: u8) -> u8 {
        // Shift-and-add, independent of the parity code's tables.
        let (mut a, mut b, mut r) = (a, b, 0u8);
        while b != 0 {
            if b & 1 != 0 {
                r ^= a;
            }
            a = times_alpha(a);
            b >>= 1;
        }
        r
    }

    /// Whether a codeword's syndromes for the roots 1 and α are both zero.
    fn is_codeword(c: &[u8]) -> bool {
        let n = c.len();
        let s0 = c.iter().fold(0, |s, &x| s ^ x);
        let s1 = c
            .iter()
            .enumerate()
            .fold(0, |s, (i, &x)| s ^ mul(x, alpha_pow(n - 1 - i)));
        s0 == 0 && s1 == 0
    }

    #[test]
    fn every_p_and_q_codeword_of_a_sector_checks() {
        let user: Vec<u8> = (0..2048u32).map(|i| (i * 7 + 3).to_le_bytes()[0]).collect();
        for lba in [0u64, 16, 4499, 333_000] {
            let s = mode1(lba, &user);
            let body = &s[HEADER..];
            for k in 0..86 {
                let mut c: Vec<u8> = (0..24).map(|i| body[k + 86 * i]).collect();
                c.push(s[P_PARITY + k]);
                c.push(s[P_PARITY + 86 + k]);
                assert!(is_codeword(&c), "P column {k} of LBA {lba}");
            }
            for k in 0..52 {
                let mut at = (k / 2) * 86 + k % 2;
                let mut c = Vec::new();
                for _ in 0..43 {
                    c.push(body[at]);
                    at = (at + 88) % 2236;
                }
                c.push(s[Q_PARITY + k]);
                c.push(s[Q_PARITY + 52 + k]);
                assert!(is_codeword(&c), "Q diagonal {k} of LBA {lba}");
            }
            // The EDC of sync, header and data, stored least significant byte first.
            let e = u32::from_le_bytes(s[EDC..EDC + 4].try_into().unwrap());
            assert_eq!(e, edc(&s[..EDC]));
            assert_eq!(&s[EDC + 4..P_PARITY], &[0; 8]);
        }
    }

    #[test]
    fn headers_hold_bcd_addresses_after_the_pregap() {
        let s = mode1(0, &[0; 2048]);
        assert_eq!(&s[..12], &SYNC);
        assert_eq!(&s[12..16], &[0x00, 0x02, 0x00, 1]);
        // LBA 4499 + 150 = 4649 frames = 1 min 1 s 74 frames.
        assert_eq!(header_msf(4499), [0x01, 0x01, 0x74]);
    }

    #[test]
    fn the_edc_is_the_crc_of_ecma_130() {
        // A one-bit message gives the polynomial itself; none gives zero.
        assert_eq!(edc(&[]), 0);
        assert_eq!(edc(&[0x80]), {
            let mut c = 0x80u32;
            for _ in 0..8 {
                c = (c >> 1) ^ if c & 1 != 0 { 0xd801_8001 } else { 0 };
            }
            c
        });
    }
}
