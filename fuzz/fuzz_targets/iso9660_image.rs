//! A valid ISO 9660 image (built by the target) with arbitrary patches: opened, walked
//! (bounded) and read, as the ISO browser does; errors, never a panic or a hang.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vdk_backends::MemoryDisk;
use vdk_core::BlockDevice;
use vdk_fs::iso9660::{Iso, Kind};

/// Patches: 4-byte offset (modulo the image), 1-byte length, bytes.
fn patched(data: &[u8]) -> Vec<u8> {
    let mut img = vec![0u8; 40 * 2048];
    // A primary descriptor and a root directory, so that patches reach past the checks.
    let root = |at: usize, img: &mut Vec<u8>| {
        img[at] = 34;
        img[at + 2..at + 6].copy_from_slice(&20u32.to_le_bytes());
        img[at + 10..at + 14].copy_from_slice(&2048u32.to_le_bytes());
        img[at + 25] = 2;
        img[at + 32] = 1;
    };
    img[16 * 2048] = 1;
    img[16 * 2048 + 1..16 * 2048 + 6].copy_from_slice(b"CD001");
    img[16 * 2048 + 128..16 * 2048 + 130].copy_from_slice(&2048u16.to_le_bytes());
    root(16 * 2048 + 156, &mut img);
    img[17 * 2048] = 255;
    img[17 * 2048 + 1..17 * 2048 + 6].copy_from_slice(b"CD001");
    root(20 * 2048, &mut img);
    root(20 * 2048 + 34, &mut img);
    let mut rest = data;
    while rest.len() >= 5 {
        let at = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize % img.len();
        let n = usize::from(rest[4]).min(rest.len() - 5).min(img.len() - at);
        img[at..at + n].copy_from_slice(&rest[5..5 + n]);
        rest = &rest[5 + n..];
    }
    img
}

fuzz_target!(|data: &[u8]| {
    let img = patched(data);
    let dev = Arc::new(MemoryDisk::new(img.len() as u64));
    dev.write_at(&img, 0, false).unwrap();
    let Ok(iso) = Iso::open(dev) else {
        return;
    };
    let mut todo = vec![iso.root()];
    let mut seen = 0;
    while let Some(dir) = todo.pop() {
        let Ok(list) = iso.list(&dir) else {
            continue;
        };
        for n in list.iter() {
            seen += 1;
            if seen > 1000 {
                return;
            }
            match n.kind {
                Kind::Directory => todo.push(n.clone()),
                Kind::File => {
                    let mut buf = [0u8; 4096];
                    let _ = iso.read(n, 0, &mut buf);
                    let _ = iso.read(n, n.size.saturating_sub(10), &mut buf);
                }
                _ => {}
            }
        }
    }
});
