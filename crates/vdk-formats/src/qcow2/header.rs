//! The qcow2 header and its extensions: bytes to a checked [`Header`] and back, with no I/O.
//!
//! Every field that later code uses as an offset, a size or a shift is checked here, once,
//! against the limits of the format and of this implementation, so that a hostile header
//! becomes an error and never a huge allocation, an overflow or a read outside the image.

use std::fmt;

use crate::{be32, be64};

/// "QFI\xfb".
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Where a version 3 header keeps its incompatible feature bits.
pub const INCOMPATIBLE_FEATURES_AT: u64 = 72;

/// Incompatible feature bits.
pub mod incompat {
    /// Refcounts may be inconsistent.
    pub const DIRTY: u64 = 1 << 0;
    /// The image is corrupt.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// `compression_type` is not zlib.
    pub const COMPRESSION: u64 = 1 << 3;
    /// 128-bit L2 entries with subcluster bitmaps.
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// Every bit this implementation knows.
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTENDED_L2;
}

/// Compatible feature bits.
pub mod compat {
    /// Lazy refcounts.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// The header extensions in `b` (the first cluster) from `start` (the header's length) to
/// the end marker, as (type, data); one that runs past `b` ends the list.
pub fn extensions(b: &[u8], start: usize) -> Vec<(u32, &[u8])> {
    let mut out = Vec::new();
    let mut at = start;
    while at + 8 <= b.len() {
        let kind = be32(b, at);
        let len = be32(b, at + 4) as usize;
        if kind == ext::END {
            break;
        }
        let Some(data) = b.get(at + 8..at + 8 + len) else {
            break;
        };
        out.push((kind, data));
        at += 8 + len.div_ceil(8) * 8;
    }
    out
}

/// Header extension types.
pub(super) mod ext {
    pub const END: u32 = 0;
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    pub const FEATURE_TABLE: u32 = 0x6803_f857;
    pub const BITMAPS: u32 = 0x2385_2875;
    pub const CRYPTO: u32 = 0x0537_be77;
    pub const DATA_FILE: u32 = 0x4441_5441;
    /// vdk's own: a format version and a CRC-32C of what makes an overlay what it is.
    pub const VDK_CHECK: u32 = 0x7664_6b63;
}

/// Smallest and largest cluster sizes (512 B, 2 MiB), as log2.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest L1 table accepted, in bytes (qemu's limit).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table accepted, in bytes (qemu's limit).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Largest virtual size accepted: 2^61 bytes keeps every offset computation in u64.
pub const MAX_SIZE: u64 = 1 << 61;
/// Host offsets live in bits 9..=55.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// What is wrong with a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderError(pub String);

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HeaderError {}

fn bad(msg: impl Into<String>) -> HeaderError {
    HeaderError(msg.into())
}

/// Compression of compressed clusters.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Compression {
    /// Raw deflate (zlib without a header), window 4 KiB.
    Zlib,
    /// Zstandard.
    Zstd,
}

/// A checked qcow2 header.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Where the backing file name is, and its length (0 if none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size, 9..=21.
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries of the active L1 table.
    pub l1_size: u32,
    /// Offset of the L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (v3).
    pub incompatible_features: u64,
    /// Compatible feature bits (v3).
    pub compatible_features: u64,
    /// Auto-clear feature bits (v3).
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits, 0..=6.
    pub refcount_order: u32,
    /// Length of the header structure (72 for v2).
    pub header_length: u32,
    /// Compression of compressed clusters.
    pub compression: Compression,
    /// The backing file format named by the header extension.
    pub backing_format: Option<String>,
    /// The external data file named by the header extension.
    pub data_file: Option<String>,
    /// A bitmaps extension is present.
    pub has_bitmaps: bool,
    /// The bitmaps extension: bitmaps, directory size and offset.
    pub bitmaps: Option<(u32, u64, u64)>,
    /// The full-disk-encryption header (LUKS, with `crypt_method` 2): its offset and length
    /// in the file.
    pub crypto_header: Option<(u64, u64)>,
    /// vdk's header check: its format version and a CRC-32C over the version, cluster size,
    /// virtual size and backing file (see [`Header::identity_crc`]).
    pub vdk_check: Option<(u32, u32)>,
    /// Where header extensions end (the backing file name may follow).
    pub extensions_end: u64,
}

impl Header {
    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether L2 entries are 128 bits with subcluster bitmaps.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompat::EXTENDED_L2 != 0
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / if self.extended_l2() { 16 } else { 8 }
    }

    /// L1 entries needed to map `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.cluster_size())
            .div_ceil(self.l2_entries())
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Parses and checks the header in the first bytes of an image (at least the first
    /// cluster, or the whole file if shorter). `file_len` is the image's length.
    pub fn parse(b: &[u8], file_len: u64) -> Result<Header, HeaderError> {
        if b.len() < 72 || b[..4] != MAGIC {
            return Err(bad("not a qcow2 image (no QFI\\xfb magic)"));
        }
        let version = be32(b, 4);
        if version != 2 && version != 3 {
            return Err(bad(format!("unsupported qcow2 version {version}")));
        }
        let cluster_bits = be32(b, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(bad(format!(
                "cluster_bits {cluster_bits} is outside 9..=21 (512 B to 2 MiB clusters)"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(b, 8),
            backing_file_size: be32(b, 16),
            cluster_bits,
            size: be64(b, 24),
            crypt_method: be32(b, 32),
            l1_size: be32(b, 36),
            l1_table_offset: be64(b, 40),
            refcount_table_offset: be64(b, 48),
            refcount_table_clusters: be32(b, 56),
            nb_snapshots: be32(b, 60),
            snapshots_offset: be64(b, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 72,
            compression: Compression::Zlib,
            backing_format: None,
            data_file: None,
            has_bitmaps: false,
            bitmaps: None,
            crypto_header: None,
            vdk_check: None,
            extensions_end: 72,
        };
        if version == 3 {
            if b.len() < 104 {
                return Err(bad("truncated version 3 header"));
            }
            h.incompatible_features = be64(b, INCOMPATIBLE_FEATURES_AT as usize);
            h.compatible_features = be64(b, 80);
            h.autoclear_features = be64(b, 88);
            h.refcount_order = be32(b, 96);
            h.header_length = be32(b, 100);
            if h.header_length < 104 || !h.header_length.is_multiple_of(8) {
                return Err(bad(format!("bad header_length {}", h.header_length)));
            }
            if u64::from(h.header_length) > cluster_size || h.header_length as usize > b.len() {
                return Err(bad("header_length runs past the first cluster"));
            }
            if h.header_length > 104 {
                h.compression = match b[104] {
                    0 => Compression::Zlib,
                    1 => Compression::Zstd,
                    t => return Err(bad(format!("unknown compression type {t}"))),
                };
            }
            let unknown = h.incompatible_features & !incompat::KNOWN;
            if unknown != 0 {
                return Err(bad(format!(
                    "the image uses incompatible features this version does not know \
                     (bits {unknown:#x})"
                )));
            }
            if (h.incompatible_features & incompat::COMPRESSION != 0)
                != (h.compression != Compression::Zlib)
            {
                return Err(bad("compression type and its feature bit disagree"));
            }
            if h.extended_l2() && cluster_bits < 14 {
                return Err(bad("extended L2 entries need clusters of 16 KiB or more"));
            }
        }
        if h.refcount_order > 6 {
            return Err(bad(format!(
                "refcount_order {} is above 6",
                h.refcount_order
            )));
        }
        if h.size > MAX_SIZE {
            return Err(bad(format!("virtual size {} is absurd", h.size)));
        }
        let l1_bytes = u64::from(h.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(bad(format!(
                "L1 table of {} entries is too large",
                h.l1_size
            )));
        }
        if u64::from(h.l1_size) < h.l1_entries_for(h.size) {
            return Err(bad(format!(
                "L1 table of {} entries is too small for a {}-byte disk",
                h.l1_size, h.size
            )));
        }
        let rt_bytes = u64::from(h.refcount_table_clusters) * cluster_size;
        if h.refcount_table_clusters == 0 || rt_bytes > MAX_REFTABLE_BYTES {
            return Err(bad(format!(
                "refcount table of {} clusters is invalid",
                h.refcount_table_clusters
            )));
        }
        let check_table = |what: &str, offset: u64, len: u64| -> Result<(), HeaderError> {
            if !offset.is_multiple_of(cluster_size) {
                return Err(bad(format!("{what} at {offset} is not cluster-aligned")));
            }
            if offset == 0 && len > 0 {
                return Err(bad(format!("{what} overlaps the header")));
            }
            match offset.checked_add(len) {
                Some(end) if end <= file_len => Ok(()),
                _ => Err(bad(format!(
                    "{what} ({len} bytes at {offset}) runs past the end of the image ({file_len} bytes)"
                ))),
            }
        };
        check_table("L1 table", h.l1_table_offset, l1_bytes)?;
        check_table("refcount table", h.refcount_table_offset, rt_bytes)?;
        if h.nb_snapshots > 0 {
            check_table("snapshot table", h.snapshots_offset, 0)?;
        }
        if h.backing_file_offset != 0 {
            if h.backing_file_size == 0 || h.backing_file_size > 1023 {
                return Err(bad(format!(
                    "backing file name length {} is invalid",
                    h.backing_file_size
                )));
            }
            let end = h.backing_file_offset + u64::from(h.backing_file_size);
            if end > cluster_size || end > b.len() as u64 {
                return Err(bad("backing file name lies outside the first cluster"));
            }
        }
        h.parse_extensions(b, cluster_size)?;
        Ok(h)
    }

    fn parse_extensions(&mut self, b: &[u8], cluster_size: u64) -> Result<(), HeaderError> {
        let limit = usize::try_from(cluster_size)
            .unwrap_or(usize::MAX)
            .min(b.len());
        let mut at = self.header_length as usize;
        loop {
            if at + 8 > limit {
                // No end marker within the first cluster: tolerated as qemu does, when the
                // area simply ends.
                break;
            }
            let kind = be32(b, at);
            let len = be32(b, at + 4) as usize;
            let data_at = at + 8;
            if kind == ext::END {
                at = data_at;
                break;
            }
            let Some(end) = data_at.checked_add(len).filter(|e| *e <= limit) else {
                return Err(bad(format!(
                    "header extension {kind:#x} runs past the first cluster"
                )));
            };
            let data = &b[data_at..end];
            let text = || {
                String::from_utf8(data.to_vec())
                    .map_err(|_| bad(format!("header extension {kind:#x} is not UTF-8")))
            };
            match kind {
                ext::BACKING_FORMAT => self.backing_format = Some(text()?),
                ext::DATA_FILE => self.data_file = Some(text()?),
                ext::BITMAPS => {
                    self.has_bitmaps = true;
                    if data.len() >= 24 {
                        self.bitmaps = Some((be32(data, 0), be64(data, 8), be64(data, 16)));
                    }
                }
                ext::VDK_CHECK if data.len() >= 8 => {
                    self.vdk_check = Some((be32(data, 0), be32(data, 4)));
                }
                ext::CRYPTO => {
                    if data.len() < 16 {
                        return Err(bad("the encryption header extension is too short"));
                    }
                    self.crypto_header = Some((be64(data, 0), be64(data, 8)));
                }
                ext::FEATURE_TABLE => {}
                _ => {}
            }
            at = data_at + len.div_ceil(8) * 8;
        }
        self.extensions_end = at as u64;
        Ok(())
    }

    /// The backing file name, read from `b` (the first cluster).
    pub fn backing_file(&self, b: &[u8]) -> Result<Option<String>, HeaderError> {
        if self.backing_file_offset == 0 {
            return Ok(None);
        }
        // Checked by parse to lie inside the first cluster and inside `b`.
        let at = self.backing_file_offset as usize;
        let raw = &b[at..at + self.backing_file_size as usize];
        String::from_utf8(raw.to_vec())
            .map(Some)
            .map_err(|_| bad("backing file name is not UTF-8"))
    }

    /// Encodes the header fields (72 bytes for v2, `header_length` for v3).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(112);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&self.backing_file_offset.to_be_bytes());
        b.extend_from_slice(&self.backing_file_size.to_be_bytes());
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&self.crypt_method.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        b.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            b.extend_from_slice(&self.incompatible_features.to_be_bytes());
            b.extend_from_slice(&self.compatible_features.to_be_bytes());
            b.extend_from_slice(&self.autoclear_features.to_be_bytes());
            b.extend_from_slice(&self.refcount_order.to_be_bytes());
            b.extend_from_slice(&self.header_length.to_be_bytes());
            if self.header_length > 104 {
                b.push(match self.compression {
                    Compression::Zlib => 0,
                    Compression::Zstd => 1,
                });
            }
            b.resize(self.header_length as usize, 0);
        }
        b
    }

    /// Encodes header extensions: the backing format, then the end marker.
    pub fn encode_extensions(&self) -> Vec<u8> {
        let mut b = Vec::new();
        if let Some(fmt) = &self.backing_format {
            b.extend_from_slice(&ext::BACKING_FORMAT.to_be_bytes());
            b.extend_from_slice(&(fmt.len() as u32).to_be_bytes());
            b.extend_from_slice(fmt.as_bytes());
            b.resize(b.len().div_ceil(8) * 8, 0);
        }
        if let Some((offset, len)) = self.crypto_header {
            b.extend_from_slice(&ext::CRYPTO.to_be_bytes());
            b.extend_from_slice(&16u32.to_be_bytes());
            b.extend_from_slice(&offset.to_be_bytes());
            b.extend_from_slice(&len.to_be_bytes());
        }
        if let Some((version, crc)) = self.vdk_check {
            b.extend_from_slice(&ext::VDK_CHECK.to_be_bytes());
            b.extend_from_slice(&8u32.to_be_bytes());
            b.extend_from_slice(&version.to_be_bytes());
            b.extend_from_slice(&crc.to_be_bytes());
        }
        b.extend_from_slice(&ext::END.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b
    }

    /// CRC-32C of what makes an image what it is, for [`Header::vdk_check`]: the version,
    /// cluster size, virtual size, backing file name and backing format. Fields that change
    /// as the image is used (table offsets, feature bits) are left out, so qemu and vdk may
    /// rewrite them freely.
    pub fn identity_crc(&self, backing_file: Option<&str>) -> u32 {
        let mut b = Vec::new();
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(backing_file.unwrap_or("").as_bytes());
        b.push(0);
        b.extend_from_slice(self.backing_format.as_deref().unwrap_or("").as_bytes());
        crc32c::crc32c(&b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 112,
            compression: Compression::Zlib,
            backing_format: Some("raw".into()),
            data_file: None,
            has_bitmaps: false,
            bitmaps: None,
            crypto_header: None,
            vdk_check: None,
            extensions_end: 0,
        }
    }

    fn image(h: &Header) -> Vec<u8> {
        let mut b = h.encode();
        b.extend_from_slice(&h.encode_extensions());
        b.resize(1 << 16, 0);
        b
    }

    #[test]
    fn round_trip() {
        let h = sample();
        let b = image(&h);
        let mut parsed = Header::parse(&b, 4 << 16).unwrap();
        assert!(parsed.extensions_end > 112);
        parsed.extensions_end = 0;
        assert_eq!(parsed, h);
    }

    #[test]
    fn hostile_fields_are_refused() {
        type Change = Box<dyn Fn(&mut Header)>;
        let cases: Vec<(&str, Change)> = vec![
            ("cluster_bits", Box::new(|h| h.cluster_bits = 30)),
            ("L1 table of", Box::new(|h| h.l1_size = u32::MAX)),
            ("too small", Box::new(|h| h.l1_size = 1)),
            (
                "refcount table",
                Box::new(|h| h.refcount_table_clusters = 0),
            ),
            ("past the end", Box::new(|h| h.l1_table_offset = 1 << 40)),
            (
                "not cluster-aligned",
                Box::new(|h| h.refcount_table_offset = 513),
            ),
            ("overlaps the header", Box::new(|h| h.l1_table_offset = 0)),
            ("refcount_order", Box::new(|h| h.refcount_order = 7)),
            ("absurd", Box::new(|h| h.size = u64::MAX)),
            (
                "incompatible features",
                Box::new(|h| h.incompatible_features = 1 << 40),
            ),
            (
                "backing file name",
                Box::new(|h| {
                    h.backing_file_offset = 65530;
                    h.backing_file_size = 100;
                }),
            ),
        ];
        for (want, change) in cases {
            let mut h = sample();
            change(&mut h);
            let err = Header::parse(&image(&h), 4 << 16).unwrap_err();
            assert!(err.0.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn truncated_headers_are_refused() {
        let b = image(&sample());
        for len in [0, 3, 4, 50, 71, 72, 100] {
            assert!(Header::parse(&b[..len], 4 << 16).is_err(), "{len} bytes");
        }
    }
}
