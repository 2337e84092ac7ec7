//! Any bytes as an object-store disk's metadata object (`vdk-disk.json`), as a key file, and
//! as a stored chunk of each kind of disk: a checked value or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdk_objstore::{Codec, Compression, Encryption, Meta, MIN_CHUNK};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Meta::parse(data) {
        // What parse accepts, writing and parsing again agree on.
        assert_eq!(Meta::parse(&m.to_json()).ok(), Some(m));
    }
    let _ = vdk_objstore::read_key(data);
    let key = [7u8; vdk_objstore::KEY_LEN];
    for (compression, encryption) in [
        (Compression::None, Encryption::None),
        (Compression::Zstd, Encryption::None),
        (Compression::Zstd, Encryption::Aes256Gcm),
    ] {
        let mut meta = Meta::new(1 << 20, MIN_CHUNK, compression, encryption).expect("meta");
        meta.uuid = "00000000000000000000000000000000".into();
        let k = (encryption == Encryption::Aes256Gcm).then_some(&key);
        let codec = Codec::new(&meta, k).expect("codec");
        let mut out = vec![0u8; MIN_CHUNK as usize];
        let _ = codec.decode(3, data, &mut out);
    }
});
