//! Any bytes on the control socket: lines read with the length bound, each parsed as a
//! request or refused with an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdk::control::{parse, read_line};

fuzz_target!(|data: &[u8]| {
    let mut input = std::io::BufReader::new(data);
    while let Ok(Some(line)) = read_line(&mut input) {
        if let Ok(text) = line {
            let _ = parse(&text);
        }
    }
});
