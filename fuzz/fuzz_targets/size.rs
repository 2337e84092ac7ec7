//! Any text as a size: bytes or a clear error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdk_core::size::parse_size;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_size(text);
    }
});
