//! Creating qcow2 images.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

use vdk_core::sys::FileExt;

use super::header::{Compression, Header, MAX_CLUSTER_BITS, MAX_L1_BYTES, MIN_CLUSTER_BITS};
use super::refcount;

/// How to make a new qcow2 image.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Cluster size in bytes: a power of two from 512 to 2 MiB. Default 64 KiB.
    pub cluster_size: u64,
    /// 3 (compat 1.1, the default) or 2 (compat 0.10).
    pub version: u32,
    /// Backing file name as it will be written (relative to the image's directory, or
    /// absolute) and its format.
    pub backing: Option<(String, String)>,
    /// Write vdk's header check ([`Header::vdk_check`]): for overlays, which vdk then refuses
    /// to use if what they are has changed.
    pub stamp: bool,
    /// Encrypt the data with LUKS (`encrypt.format=luks`): a LUKS1 header in the file.
    pub encrypt: Option<crate::luks::CreateOptions>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            cluster_size: 64 << 10,
            version: 3,
            backing: None,
            stamp: false,
            encrypt: None,
        }
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Creates a new, empty qcow2 image of `size` bytes at `path` (which must not exist).
pub fn create(path: &Path, size: u64, opts: &CreateOptions) -> io::Result<File> {
    let cs = opts.cluster_size;
    if !cs.is_power_of_two() {
        return Err(invalid(format!("cluster size {cs} is not a power of two")));
    }
    let bits = cs.trailing_zeros();
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
        return Err(invalid(format!(
            "cluster size {cs} is outside 512 B to 2 MiB"
        )));
    }
    if opts.version != 2 && opts.version != 3 {
        return Err(invalid(format!(
            "qcow2 version {} does not exist (2 or 3)",
            opts.version
        )));
    }
    if size > super::header::MAX_SIZE {
        return Err(invalid(format!("size {size} is too large")));
    }
    let l2_entries = cs / 8;
    let l1_size = size.div_ceil(cs).div_ceil(l2_entries);
    if l1_size * 8 > MAX_L1_BYTES {
        return Err(invalid(format!(
            "a {size}-byte disk needs an L1 table over 32 MiB with {cs}-byte clusters: \
             choose larger clusters"
        )));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
    // An encrypted image's LUKS header, after the L1 table.
    let crypto_clusters = if opts.encrypt.is_some() {
        crate::luks::LUKS1_HEADER_BYTES.div_ceil(cs)
    } else {
        0
    };
    let rb_entries = cs * 8 / 16;
    // Header, refcount table, refcount blocks, L1: count the blocks that count them all.
    let mut blocks = 1;
    loop {
        let used = 2 + blocks + l1_clusters + crypto_clusters;
        let need = used.div_ceil(rb_entries);
        if need <= blocks {
            break;
        }
        blocks = need;
    }
    if blocks > cs / 8 {
        return Err(invalid("image too large for its cluster size".into()));
    }
    let used = 2 + blocks + l1_clusters + crypto_clusters;
    let crypto_at = (2 + blocks + l1_clusters) * cs;
    let mut header = Header {
        version: opts.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: bits,
        size,
        crypt_method: if opts.encrypt.is_some() { 2 } else { 0 },
        l1_size: u32::try_from(l1_size).map_err(|_| invalid("L1 too large".into()))?,
        l1_table_offset: (2 + blocks) * cs,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: 4,
        header_length: if opts.version >= 3 { 112 } else { 72 },
        compression: Compression::Zlib,
        backing_format: opts.backing.as_ref().map(|(_, f)| f.clone()),
        data_file: None,
        has_bitmaps: false,
        bitmaps: None,
        crypto_header: opts
            .encrypt
            .as_ref()
            .map(|_| (crypto_at, crate::luks::LUKS1_HEADER_BYTES)),
        vdk_check: None,
        extensions_end: 0,
    };
    if opts.stamp {
        let name = opts.backing.as_ref().map(|(n, _)| n.as_str());
        header.vdk_check = Some((1, header.identity_crc(name)));
    }
    let ext_len = header.encode_extensions().len() as u64;
    if let Some((name, _)) = &opts.backing {
        let at = u64::from(header.header_length) + ext_len;
        if name.is_empty() || name.len() > 1023 || at + name.len() as u64 > cs {
            return Err(invalid(format!("backing file name {name:?} is too long")));
        }
        header.backing_file_offset = at;
        header.backing_file_size = name.len() as u32;
    }
    let mut first = header.encode();
    first.extend_from_slice(&header.encode_extensions());
    if let Some((name, _)) = &opts.backing {
        first.extend_from_slice(name.as_bytes());
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)?;
    let result = (|| {
        file.write_all_at(&first, 0)?;
        let mut table = Vec::with_capacity(cs as usize);
        for b in 0..blocks {
            table.extend_from_slice(&((2 + b) * cs).to_be_bytes());
        }
        file.write_all_at(&table, cs)?;
        for b in 0..blocks {
            let counts: Vec<u64> = (b * rb_entries..(b + 1) * rb_entries)
                .map(|c| u64::from(c < used))
                .collect();
            file.write_all_at(&refcount::encode(&counts, 4), (2 + b) * cs)?;
        }
        file.set_len(used * cs)?;
        if let Some(e) = &opts.encrypt {
            crate::luks::write_luks1(&file, crypto_at, e)?;
        }
        file.sync_all()
    })();
    if let Err(e) = result {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(file)
}
