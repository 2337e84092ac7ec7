//! Any 28 bytes as a request, or with a first byte that asks for it, any 32 as an extended one,
//! checked against any negotiated limits: a command or an NBD error, never a panic; an
//! accepted request always lies inside the export, and its header encodes back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdk_nbd::proto::transmission::{
    check_request, cmd, Limits, RequestHeader, EXTENDED_REQUEST_LEN, REQUEST_LEN,
};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else { return };
    let extended = mode & 1 != 0;
    let (h, rest) = if extended {
        let Some((raw, rest)) = data.split_first_chunk::<EXTENDED_REQUEST_LEN>() else { return };
        let Some(h) = RequestHeader::parse_extended(raw) else { return };
        (h, rest)
    } else {
        let Some((raw, rest)) = data.split_first_chunk::<REQUEST_LEN>() else { return };
        let Some(h) = RequestHeader::parse(raw) else { return };
        (h, rest)
    };
    let mut limits = [0u8; 15];
    let n = rest.len().min(15);
    limits[..n].copy_from_slice(&rest[..n]);
    let l = Limits {
        size: u64::from_be_bytes(limits[..8].try_into().unwrap()),
        flags: u16::from_be_bytes([limits[8], limits[9]]),
        min_block: 1 << (limits[10] % 17),
        max_payload: u32::from_be_bytes(limits[11..15].try_into().unwrap()),
        structured: limits[10] & 0x80 != 0 || extended,
        extended,
        meta_context: limits[10] & 0x40 != 0,
    };
    if check_request(&h, &l).is_ok() && !matches!(h.kind, cmd::DISC | cmd::FLUSH) {
        assert!(h.offset + h.len <= l.size, "accepted request past the end");
    }
    let encoded = h.encode();
    let again = if extended {
        RequestHeader::parse_extended(encoded.first_chunk().unwrap())
    } else {
        RequestHeader::parse(encoded.first_chunk().unwrap())
    };
    assert_eq!(again, Some(h));
});
