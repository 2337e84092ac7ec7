//! How a chunk is stored: compressed (zstd) and then encrypted (AES-256-GCM), as the disk's
//! metadata declares.
//!
//! ```text
//!   plain chunk ─► zstd frame? ─► nonce (12) | AES-256-GCM ciphertext and tag? ─► object
//! ```
//!
//! The associated data of each encrypted chunk is the disk's uuid and the chunk's index, so a
//! chunk copied to another index, or from another disk, fails to decrypt instead of showing
//! the wrong bytes. A stored chunk that does not decode to exactly one chunk is an error.

use std::io::Read;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};

use crate::meta::{Compression, Encryption, Meta};
use crate::ObjError;

/// Length of an AES-256 key.
pub const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 12;
/// The block sealed for the key check, and the index it is sealed as (no chunk has it).
const KEY_CHECK: &[u8] = b"vdk-objstore key check";
const KEY_CHECK_INDEX: u64 = u64::MAX;

/// Encodes and decodes the chunks of one disk.
#[derive(Clone)]
pub struct Codec {
    compression: Compression,
    cipher: Option<Aes256Gcm>,
    uuid: Vec<u8>,
    chunk_size: usize,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec")
            .field("compression", &self.compression)
            .field("encrypted", &self.cipher.is_some())
            .finish()
    }
}

/// Reads a key file: 32 raw bytes, or 64 hex digits (a trailing newline allowed).
pub fn read_key(bytes: &[u8]) -> Result<[u8; KEY_LEN], ObjError> {
    let text = std::str::from_utf8(bytes).ok().map(str::trim);
    let hex = text.filter(|t| t.len() == 2 * KEY_LEN && t.bytes().all(|b| b.is_ascii_hexdigit()));
    let mut key = [0u8; KEY_LEN];
    if let Some(h) = hex {
        for (i, k) in key.iter_mut().enumerate() {
            *k = u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap_or(0);
        }
        return Ok(key);
    }
    if bytes.len() == KEY_LEN {
        key.copy_from_slice(bytes);
        return Ok(key);
    }
    Err(ObjError::BadKey)
}

impl Codec {
    /// The codec of the disk `meta`; `key` must be given exactly when it is encrypted.
    pub fn new(meta: &Meta, key: Option<&[u8; KEY_LEN]>) -> Result<Codec, ObjError> {
        let cipher = match (meta.encryption, key) {
            (Encryption::None, None) => None,
            (Encryption::None, Some(_)) => return Err(ObjError::KeyNotWanted),
            (Encryption::Aes256Gcm, None) => return Err(ObjError::KeyNeeded),
            (Encryption::Aes256Gcm, Some(k)) => {
                Some(Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(k)))
            }
        };
        let codec = Codec {
            compression: meta.compression,
            cipher,
            uuid: meta.uuid.as_bytes().to_vec(),
            chunk_size: usize::try_from(meta.chunk_size)
                .map_err(|_| ObjError::BadMeta("chunk size".into()))?,
        };
        if !codec.key_matches(meta.key_check.as_deref()) {
            return Err(ObjError::WrongKey);
        }
        Ok(codec)
    }

    fn aad(&self, index: u64) -> Vec<u8> {
        let mut a = self.uuid.clone();
        a.extend_from_slice(&index.to_be_bytes());
        a
    }

    /// The stored form of chunk `index`.
    pub fn encode(&self, index: u64, plain: Vec<u8>) -> Result<Vec<u8>, ObjError> {
        let packed = match self.compression {
            Compression::None => plain,
            Compression::Zstd => ruzstd::encoding::compress_to_vec(
                &plain[..],
                ruzstd::encoding::CompressionLevel::Fastest,
            ),
        };
        self.seal(index, packed)
    }

    fn seal(&self, index: u64, packed: Vec<u8>) -> Result<Vec<u8>, ObjError> {
        let Some(cipher) = &self.cipher else {
            return Ok(packed);
        };
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| ObjError::Io(std::io::Error::other(e)))?;
        let aad = self.aad(index);
        let sealed = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &packed,
                    aad: &aad,
                },
            )
            .map_err(|_| ObjError::Crypto(index))?;
        let mut out = nonce.to_vec();
        out.extend(sealed);
        Ok(out)
    }

    /// A known block sealed with the key, for [`Meta::key_check`] (hex); `None` for a disk in
    /// the clear.
    pub fn key_check(&self) -> Result<Option<String>, ObjError> {
        if self.cipher.is_none() {
            return Ok(None);
        }
        let sealed = self.seal(KEY_CHECK_INDEX, KEY_CHECK.to_vec())?;
        Ok(Some(sealed.iter().map(|b| format!("{b:02x}")).collect()))
    }

    /// Whether the key opens `meta.key_check` (true for a disk in the clear, or one whose
    /// metadata has no check).
    fn key_matches(&self, check: Option<&str>) -> bool {
        let (Some(cipher), Some(hex)) = (&self.cipher, check) else {
            return true;
        };
        let bytes: Option<Vec<u8>> = (0..hex.len() / 2)
            .map(|i| {
                hex.get(2 * i..2 * i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            })
            .collect();
        let Some(bytes) = bytes.filter(|b| b.len() > NONCE_LEN) else {
            return false;
        };
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let aad = self.aad(KEY_CHECK_INDEX);
        cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: &aad,
                },
            )
            .is_ok_and(|p| p == KEY_CHECK)
    }

    /// The plain bytes of chunk `index` from its stored form, into `out` (one chunk).
    pub fn decode(&self, index: u64, stored: &[u8], out: &mut [u8]) -> Result<(), ObjError> {
        debug_assert_eq!(out.len(), self.chunk_size);
        let opened;
        let packed = match &self.cipher {
            None => stored,
            Some(cipher) => {
                if stored.len() < NONCE_LEN + 16 {
                    return Err(ObjError::Crypto(index));
                }
                let (nonce, sealed) = stored.split_at(NONCE_LEN);
                let aad = self.aad(index);
                opened = cipher
                    .decrypt(
                        Nonce::from_slice(nonce),
                        Payload {
                            msg: sealed,
                            aad: &aad,
                        },
                    )
                    .map_err(|_| ObjError::Crypto(index))?;
                &opened
            }
        };
        match self.compression {
            Compression::None => {
                if packed.len() != out.len() {
                    return Err(ObjError::BadChunk(index));
                }
                out.copy_from_slice(packed);
            }
            Compression::Zstd => {
                let mut dec = ruzstd::decoding::StreamingDecoder::new(packed)
                    .map_err(|_| ObjError::BadChunk(index))?;
                dec.read_exact(out).map_err(|_| ObjError::BadChunk(index))?;
                // Nothing may follow the chunk's bytes.
                let mut extra = [0u8; 1];
                if matches!(dec.read(&mut extra), Ok(n) if n > 0) {
                    return Err(ObjError::BadChunk(index));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: u64 = 64 << 10;

    fn meta(c: Compression, e: Encryption) -> Meta {
        Meta::new(1 << 20, CHUNK, c, e).unwrap()
    }

    fn data() -> Vec<u8> {
        (0..CHUNK as usize).map(|i| (i / 100) as u8).collect()
    }

    #[test]
    fn every_combination_round_trips() {
        let key = [7u8; KEY_LEN];
        for c in [Compression::None, Compression::Zstd] {
            for e in [Encryption::None, Encryption::Aes256Gcm] {
                let m = meta(c, e);
                let k = (e == Encryption::Aes256Gcm).then_some(&key);
                let codec = Codec::new(&m, k).unwrap();
                let stored = codec.encode(3, data()).unwrap();
                let mut back = vec![0u8; CHUNK as usize];
                codec.decode(3, &stored, &mut back).unwrap();
                assert_eq!(back, data(), "{c:?} {e:?}");
                if c == Compression::Zstd {
                    assert!(
                        stored.len() < data().len() / 4,
                        "compressed: {}",
                        stored.len()
                    );
                }
            }
        }
    }

    #[test]
    fn an_encrypted_chunk_at_another_index_or_key_fails() {
        let m = meta(Compression::None, Encryption::Aes256Gcm);
        let codec = Codec::new(&m, Some(&[1u8; KEY_LEN])).unwrap();
        let stored = codec.encode(5, data()).unwrap();
        let mut out = vec![0u8; CHUNK as usize];
        assert!(matches!(
            codec.decode(6, &stored, &mut out),
            Err(ObjError::Crypto(6))
        ));
        let other = Codec::new(&m, Some(&[2u8; KEY_LEN])).unwrap();
        assert!(other.decode(5, &stored, &mut out).is_err());
        let mut flipped = stored.clone();
        flipped[40] ^= 1;
        assert!(codec.decode(5, &flipped, &mut out).is_err());
    }

    #[test]
    fn a_wrong_key_is_refused_at_open() {
        let mut m = meta(Compression::None, Encryption::Aes256Gcm);
        m.key_check = Codec::new(&m, Some(&[1u8; KEY_LEN]))
            .unwrap()
            .key_check()
            .unwrap();
        assert!(Codec::new(&m, Some(&[1u8; KEY_LEN])).is_ok());
        assert!(matches!(
            Codec::new(&m, Some(&[2u8; KEY_LEN])),
            Err(ObjError::WrongKey)
        ));
        assert!(matches!(Codec::new(&m, None), Err(ObjError::KeyNeeded)));
        m.key_check = Some("zz".into());
        assert!(Codec::new(&m, Some(&[1u8; KEY_LEN])).is_err());
    }

    #[test]
    fn a_chunk_of_the_wrong_length_is_refused() {
        let codec = Codec::new(&meta(Compression::None, Encryption::None), None).unwrap();
        let mut out = vec![0u8; CHUNK as usize];
        assert!(codec.decode(0, &[1, 2, 3], &mut out).is_err());
        let z = Codec::new(&meta(Compression::Zstd, Encryption::None), None).unwrap();
        let short = ruzstd::encoding::compress_to_vec(
            &[1u8; 100][..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        assert!(z.decode(0, &short, &mut out).is_err());
        assert!(z.decode(0, b"garbage", &mut out).is_err());
    }

    #[test]
    fn keys_read_as_raw_bytes_or_hex() {
        assert_eq!(read_key(&[9u8; 32]).unwrap(), [9u8; 32]);
        let hex = "ab".repeat(32) + "\n";
        assert_eq!(read_key(hex.as_bytes()).unwrap(), [0xab; 32]);
        assert!(read_key(b"short").is_err());
    }
}
