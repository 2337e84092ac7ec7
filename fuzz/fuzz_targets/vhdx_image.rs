//! A valid, empty VHDX image (made once by vdk) with any bytes patched anywhere in it: headers,
//! region tables, metadata, BAT, log. Opened writable (so a log gets replayed), read and
//! mapped, it gives data or errors, never a panic, a hang or a write outside the file.
//!
//! Input: patches, each a 3-byte offset, a 1-byte length, then that many bytes.
#![no_main]

use std::io::Write;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vdk_formats::{create, open, CreateOptions, Format, OpenOptions};

fn template() -> &'static [u8] {
    static T: OnceLock<Vec<u8>> = OnceLock::new();
    T.get_or_init(|| {
        let dir = tempfile::tempdir_in("/dev/shm").expect("temp dir");
        let p = dir.path().join("t.vhdx");
        let opts = CreateOptions { format: Format::Vhdx, cluster_size: None, backing: None, fixed: false };
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
    let Ok(mut file) = tempfile::NamedTempFile::new_in("/dev/shm") else {
        return;
    };
    if file.write_all(&image).is_err() {
        return;
    }
    let opts = OpenOptions { format: Some(Format::Vhdx), read_only: false, probe_backing: false };
    let Ok(img) = open(file.path(), &opts) else {
        return;
    };
    let size = img.device.info().size.min(8 << 20);
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(buf.len() as u64) as usize;
        let _ = img.device.read_at(&mut buf[..n], at);
        at += n as u64;
    }
    let _ = img.device.extents(0, size);
    let _ = img.device.write_at(&[1; 4096], 0, false);
});
