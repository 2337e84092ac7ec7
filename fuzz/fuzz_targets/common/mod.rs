//! Shared by the image fuzz targets: write bytes to a file, open it as an image, use it.

use std::io::Write;

use vdk_formats::{open, Format, OpenOptions};

/// Writes `bytes` to a temporary file, opens it as `format` (writable if asked), reads up to
/// `max` bytes of it, maps it, and writes once if writable. Errors are fine; panics are not.
pub fn exercise(bytes: &[u8], format: Format, writable: bool, max: u64) {
    let Ok(mut file) = tempfile::NamedTempFile::new_in("/dev/shm") else {
        return;
    };
    if file.write_all(bytes).is_err() {
        return;
    }
    let opts = OpenOptions {
        format: Some(format),
        read_only: !writable,
        probe_backing: false,
        // Writable qcow2 images have their dirty bitmaps read, marked and saved again.
        keep_bitmaps: writable,
        ..Default::default()
    };
    let Ok(image) = open(file.path(), &opts) else {
        return;
    };
    let size = image.device.info().size.min(max);
    let mut buf = vec![0u8; 64 << 10];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(buf.len() as u64) as usize;
        let _ = image.device.read_at(&mut buf[..n], at);
        at += n as u64;
    }
    let _ = image.device.extents(0, size);
    if writable {
        let _ = image.device.write_at(&[1; 4096], 0, false);
    }
    if let Some(store) = image.bitmaps {
        let kept: Vec<_> = store
            .stored()
            .into_iter()
            .map(|(name, b)| (name, std::sync::Arc::new(b)))
            .collect();
        for (_, b) in &kept {
            b.mark(0, 4096);
        }
        let _ = store.save(&kept, false);
    }
}

/// Writes `bytes` to a temporary file and runs the consistency check on it (no repair).
#[allow(dead_code)] // not every target that shares this module checks
pub fn check(bytes: &[u8], format: Format) {
    let Ok(mut file) = tempfile::NamedTempFile::new_in("/dev/shm") else {
        return;
    };
    if file.write_all(bytes).is_err() {
        return;
    }
    let _ = vdk_formats::check(file.path(), Some(format), false, true);
}
