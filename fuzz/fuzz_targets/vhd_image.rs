//! Any bytes as a whole VHD image file: opened read-only, read in full and mapped, it
//! gives data or errors, never a panic, a hang or a read outside the file.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use vdk_formats::{open, Format, OpenOptions};

fuzz_target!(|data: &[u8]| {
    let Ok(mut file) = tempfile::NamedTempFile::new_in("/dev/shm") else {
        return;
    };
    if file.write_all(data).is_err() {
        return;
    }
    let opts = OpenOptions {
        format: Some(Format::Vhd),
        read_only: true,
        probe_backing: false,
    };
    let Ok(image) = open(file.path(), &opts) else {
        return;
    };
    let size = image.device.info().size.min(4 << 20);
    let mut buf = vec![0u8; 64 << 10];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(buf.len() as u64) as usize;
        let _ = image.device.read_at(&mut buf[..n], at);
        at += n as u64;
    }
    let _ = image.device.extents(0, size);
});
