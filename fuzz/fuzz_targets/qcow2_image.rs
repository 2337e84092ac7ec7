//! Any bytes as a whole qcow2 image file: opened read-only, read in full and mapped, it
//! gives data or errors, never a panic, a hang or a read outside the file; checked (the
//! refcounts against every table, internal snapshots' included), it gives a report or an
//! error. Opened for writing, its dirty bitmaps are read, marked and saved, or refused.
#![no_main]

#[path = "common/mod.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use vdk_formats::Format;

fuzz_target!(|data: &[u8]| {
    common::exercise(data, Format::Qcow2, false, 4 << 20);
    common::exercise(data, Format::Qcow2, true, 1 << 20);
    common::check(data, Format::Qcow2);
});
