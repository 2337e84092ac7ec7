//! Any bytes as iSCSI PDUs: framed (header digest, lengths), decoded into typed requests,
//! and their text data parsed; an error or a value, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdk_iscsi::pdu::Request;
use vdk_iscsi::wire::{self, Digests};

fuzz_target!(|data: &[u8]| {
    for digests in [Digests::default(), Digests { header: true, data: true }] {
        let mut r = data;
        while let Ok(h) = wire::read_header(&mut r, digests, 1 << 16) {
            let _ = Request::parse(&h.bhs, &h.ahs);
            let mut seg = vec![0u8; h.bhs.data_len()];
            if wire::read_data(&mut r, &mut seg, digests).is_err() {
                break;
            }
            let _ = vdk_iscsi::text::parse(&seg);
        }
    }
});
