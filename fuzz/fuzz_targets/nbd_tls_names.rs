//! Any bytes as a client certificate (the names allow-lists match) and as an allow rule:
//! names or nothing, a rule or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdk_nbd::tls::certificate_names;
use vdk_nbd::Rule;

fuzz_target!(|data: &[u8]| {
    for name in certificate_names(data) {
        assert!(!name.is_empty() || data.len() > 2);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(rule) = text.parse::<Rule>() {
            // What is printed parses back to the same rule.
            assert_eq!(rule.to_string().parse::<Rule>().ok(), Some(rule));
        }
    }
});
