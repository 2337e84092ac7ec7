//! Any bytes as an NBD option header and data: a typed option or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdk_nbd::proto::handshake::{parse_option, parse_option_header};

fuzz_target!(|data: &[u8]| {
    if let Some(header) = data.get(..16) {
        let header: &[u8; 16] = header.try_into().unwrap();
        let _ = parse_option_header(header);
    }
    if let Some((option, rest)) = data.split_first_chunk::<4>() {
        let _ = parse_option(u32::from_be_bytes(*option), rest);
    }
});
