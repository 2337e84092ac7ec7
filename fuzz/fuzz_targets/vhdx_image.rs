//! A valid, empty VHDX image (made once by vdk) with any bytes patched anywhere in it: headers,
//! region tables, metadata, BAT, log. Opened writable (so a log gets replayed), read and
//! mapped, it gives data or errors, never a panic, a hang or a write outside the file.
//!
//! Input: patches, each a 3-byte offset, a 1-byte length, then that many bytes.
#![no_main]

#[path = "common/mod.rs"]
mod common;

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vdk_formats::{create, CreateOptions, Format};

fn template() -> &'static [u8] {
    static T: OnceLock<Vec<u8>> = OnceLock::new();
    T.get_or_init(|| {
        let dir = tempfile::tempdir_in("/dev/shm").expect("temp dir");
        let p = dir.path().join("t.vhdx");
        let opts = CreateOptions { format: Format::Vhdx, cluster_size: None, backing: None, fixed: false, encrypt: None };
        // No data written: a block is 32 MiB of file, too much to copy for every input.
        create(&p, 64 << 20, &opts).expect("create template");
        std::fs::read(&p).expect("read template")
    })
}

fuzz_target!(|data: &[u8]| {
    let mut image = template().to_vec();
    let mut rest = data;
    while rest.len() >= 4 {
        let at = (usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2])) % image.len();
        let n = usize::from(rest[3]).min(rest.len() - 4);
        let end = (at + n).min(image.len());
        image[at..end].copy_from_slice(&rest[4..4 + (end - at)]);
        rest = &rest[4 + n..];
    }
    common::exercise(&image, Format::Vhdx, true, 8 << 20);
});
