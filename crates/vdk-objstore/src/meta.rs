//! The metadata object of a disk (`PREFIX/vdk-disk.json`): what the chunks are.
//!
//! ```json
//! {"format":"vdk-objstore","version":1,"uuid":"…","size":10737418240,
//!  "chunk_size":4194304,"compression":"zstd","encryption":"aes-256-gcm"}
//! ```
//!
//! Written once, at creation; a disk whose metadata names a newer version, an unknown
//! compression or encryption, or sizes that do not fit is refused, never guessed at.

use serde::{Deserialize, Serialize};

use crate::ObjError;

/// The `format` field of every vdk disk's metadata.
pub const FORMAT: &str = "vdk-objstore";
/// The metadata version this build writes and reads.
pub const VERSION: u32 = 1;
/// The smallest chunk.
pub const MIN_CHUNK: u64 = 64 << 10;
/// The largest chunk.
pub const MAX_CHUNK: u64 = 64 << 20;
/// The largest disk: 2^61 bytes (2 EiB), as qcow2 allows. Every offset and length of it fits
/// in the 63 bits that NBD, SCSI and the kernel's file sizes take, with room to spare.
pub const MAX_SIZE: u64 = 1 << 61;

/// The chunk size of a disk created without one: 4 MiB.
pub const DEFAULT_CHUNK: u64 = 4 << 20;

/// How chunks are compressed.
#[derive(Clone, Copy, Debug, Default, Deserialize, Eq, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    /// Stored as they are.
    #[default]
    None,
    /// Zstandard frames.
    Zstd,
}

/// How chunks are encrypted.
#[derive(Clone, Copy, Debug, Default, Deserialize, Eq, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Encryption {
    /// In the clear.
    #[default]
    None,
    /// AES-256-GCM with a random 96-bit nonce per upload, the chunk's index and the disk's
    /// uuid as associated data.
    Aes256Gcm,
}

/// The metadata object.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    /// Always `"vdk-objstore"`.
    pub format: String,
    /// The format version (1) at creation.
    pub version: u32,
    /// A random id: caches and encrypted chunks are bound to it.
    pub uuid: String,
    /// Virtual size in bytes, a multiple of 512.
    pub size: u64,
    /// Bytes per chunk, a power of two between [`MIN_CHUNK`] and [`MAX_CHUNK`].
    pub chunk_size: u64,
    /// Chunk compression.
    #[serde(default)]
    pub compression: Compression,
    /// Chunk encryption.
    #[serde(default)]
    pub encryption: Encryption,
    /// For an encrypted disk: a known block sealed with its key (hex), so that a wrong key
    /// is refused at open rather than at the first read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_check: Option<String>,
}

impl Meta {
    /// Metadata for a new disk.
    pub fn new(
        size: u64,
        chunk_size: u64,
        compression: Compression,
        encryption: Encryption,
    ) -> Result<Meta, ObjError> {
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|e| ObjError::Io(std::io::Error::other(e)))?;
        let uuid = id.iter().map(|b| format!("{b:02x}")).collect();
        let m = Meta {
            format: FORMAT.into(),
            version: VERSION,
            uuid,
            size,
            chunk_size,
            compression,
            encryption,
            key_check: None,
        };
        m.check()?;
        Ok(m)
    }

    /// Parses and checks a metadata object.
    pub fn parse(bytes: &[u8]) -> Result<Meta, ObjError> {
        let m: Meta = serde_json::from_slice(bytes)
            .map_err(|e| ObjError::BadMeta(format!("not a vdk disk's metadata: {e}")))?;
        m.check()?;
        Ok(m)
    }

    fn check(&self) -> Result<(), ObjError> {
        let bad = |m: String| Err(ObjError::BadMeta(m));
        if self.format != FORMAT {
            return bad(format!("format {:?}, not {FORMAT:?}", self.format));
        }
        if self.version > VERSION {
            return bad(format!(
                "version {} is newer than this vdk reads ({VERSION}): upgrade vdk",
                self.version
            ));
        }
        if !self.chunk_size.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&self.chunk_size)
        {
            return bad(format!(
                "chunk size {} is not a power of two from 64 KiB to 64 MiB",
                self.chunk_size
            ));
        }
        if self.size == 0 || !self.size.is_multiple_of(512) {
            return bad(format!(
                "size {} is not a positive multiple of 512",
                self.size
            ));
        }
        if self.size > MAX_SIZE {
            return bad(format!(
                "size {} is more than the {MAX_SIZE} bytes (2 EiB) a vdk disk may have",
                self.size
            ));
        }
        if self.uuid.is_empty() || self.uuid.len() > 64 {
            return bad("bad uuid".into());
        }
        Ok(())
    }

    /// The number of chunks.
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk_size)
    }

    /// Serialized.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips() {
        let m = Meta::new(1 << 30, DEFAULT_CHUNK, Compression::Zstd, Encryption::None).unwrap();
        assert_eq!(Meta::parse(&m.to_json()).unwrap(), m);
        assert_eq!(m.chunks(), 256);
    }

    #[test]
    fn bad_metadata_is_refused() {
        assert!(Meta::parse(b"{}").is_err());
        assert!(Meta::parse(b"not json").is_err());
        let mut m = Meta::new(1 << 20, DEFAULT_CHUNK, Compression::None, Encryption::None).unwrap();
        m.version = 99;
        assert!(Meta::parse(&m.to_json()).is_err(), "a newer version");
        m.version = 1;
        m.chunk_size = 3000;
        assert!(Meta::parse(&m.to_json()).is_err(), "not a power of two");
        let text = String::from_utf8(m.to_json())
            .unwrap()
            .replace("\"none\"", "\"rot13\"");
        assert!(Meta::parse(text.as_bytes()).is_err(), "unknown compression");
    }

    #[test]
    fn a_size_past_two_exbibytes_is_refused() {
        let mut m = Meta::new(1 << 20, DEFAULT_CHUNK, Compression::None, Encryption::None).unwrap();
        m.size = u64::MAX - 511;
        let e = Meta::parse(&m.to_json()).unwrap_err().to_string();
        assert!(e.contains("2 EiB"), "{e}");
        m.size = MAX_SIZE;
        assert!(Meta::parse(&m.to_json()).is_ok());
    }
}
