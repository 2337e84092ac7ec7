//! What the byte-level NBD tests share: big-endian fields and option haggling.
#![allow(dead_code)] // not every test file uses every helper
#![allow(clippy::cast_possible_truncation)] // test sizes are small constants

use std::io::Read;

use vdk_nbd::proto::handshake::rep;
use vdk_nbd::proto::{IHAVEOPT, REPLY_MAGIC};

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}

pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// An option request: IHAVEOPT, the option, its data.
pub fn option_bytes(option: u32, data: &[u8]) -> Vec<u8> {
    let mut o = IHAVEOPT.to_be_bytes().to_vec();
    o.extend_from_slice(&option.to_be_bytes());
    o.extend_from_slice(&(data.len() as u32).to_be_bytes());
    o.extend_from_slice(data);
    o
}

/// The replies to `option` up to the final one (an ACK or an error), as (type, data).
pub fn option_replies(s: &mut impl Read, option: u32) -> Vec<(u32, Vec<u8>)> {
    let mut replies = Vec::new();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        assert_eq!(be64(&h), REPLY_MAGIC);
        assert_eq!(be32(&h[8..]), option);
        let kind = be32(&h[12..]);
        let mut d = vec![0u8; be32(&h[16..]) as usize];
        s.read_exact(&mut d).unwrap();
        replies.push((kind, d));
        if kind == rep::ACK || kind & rep::ERR != 0 {
            return replies;
        }
    }
}
