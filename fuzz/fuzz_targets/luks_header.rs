//! Any bytes as a LUKS image's header (LUKS1, or LUKS2 with its JSON and checksum): read
//! without a key, it describes the image or gives an error, never a panic or a hang.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut file) = tempfile::NamedTempFile::new_in("/dev/shm") else {
        return;
    };
    if file.write_all(data).is_err() {
        return;
    }
    if let Ok(s) = vdk_formats::luks::summary(file.path()) {
        assert!(s.size <= data.len() as u64 || s.payload_offset > 0 || s.size == 0);
    }
    // Opening without a key reads the header, then asks for the key.
    let opts = vdk_formats::OpenOptions {
        format: Some(vdk_formats::Format::Luks),
        read_only: true,
        ..Default::default()
    };
    let _ = vdk_formats::open(file.path(), &opts);
});
