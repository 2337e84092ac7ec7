//! Creating, describing and deleting object-store disks: the operations that need no open disk.

use std::collections::HashMap;

use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use tokio::runtime::Runtime;

use super::{unix_now, CHUNKS, META};
use crate::codec::{Codec, KEY_LEN};
use crate::lease::LEASE;
use crate::location::{Location, StoreOptions};
use crate::meta::{Compression, Encryption, Meta, DEFAULT_CHUNK};
use crate::ObjError;

/// How to create a disk.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Virtual size in bytes (rounded up to 512).
    pub size: u64,
    /// Bytes per chunk.
    pub chunk_size: u64,
    /// Chunk compression.
    pub compression: Compression,
    /// Chunk encryption (needs `key`).
    pub encryption: Encryption,
    /// The key of an encrypted disk.
    pub key: Option<[u8; KEY_LEN]>,
    /// Endpoint, region and such.
    pub store: StoreOptions,
}

impl CreateOptions {
    /// A plain disk of `size` bytes with the default chunk size.
    pub fn new(size: u64) -> CreateOptions {
        CreateOptions {
            size,
            chunk_size: DEFAULT_CHUNK,
            compression: Compression::None,
            encryption: Encryption::None,
            key: None,
            store: StoreOptions::default(),
        }
    }
}

/// A disk as the bucket has it.
#[derive(Clone, Debug)]
pub struct DiskStats {
    /// Its metadata.
    pub meta: Meta,
    /// Chunks stored.
    pub stored_chunks: u64,
    /// Bytes the chunks take in the bucket.
    pub stored_bytes: u64,
    /// Who holds the writer's lease, if anyone.
    pub writer: Option<String>,
}

pub(super) fn small_runtime() -> Result<Runtime, ObjError> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

pub(super) fn chunk_index(name: &str) -> Option<u64> {
    (name.len() == 16)
        .then(|| u64::from_str_radix(name, 16).ok())
        .flatten()
}

/// ETags without the quotes some stores put around them, so that every source compares.
pub(super) fn etag(t: Option<String>) -> String {
    t.map(|t| t.trim_matches('"').to_owned())
        .unwrap_or_default()
}

pub(super) async fn read_meta(loc: &Location) -> Result<Meta, ObjError> {
    match loc.store.get(&loc.key(META)).await {
        Ok(g) => Meta::parse(&g.bytes().await?),
        Err(object_store::Error::NotFound { .. }) => Err(ObjError::NotFound(loc.url.clone())),
        Err(e) => Err(e.into()),
    }
}

/// The chunks the bucket holds: index to (ETag, stored size).
pub(super) async fn list_chunks(
    loc: &Location,
    chunks: u64,
) -> Result<HashMap<u64, (String, u64)>, ObjError> {
    let mut out = HashMap::new();
    let mut list = loc.store.list(Some(&loc.key(CHUNKS)));
    while let Some(m) = list.try_next().await? {
        match m.location.filename().and_then(chunk_index) {
            Some(i) if i < chunks => {
                out.insert(i, (etag(m.e_tag), m.size));
            }
            _ => tracing::warn!("{}: not a chunk of this disk, ignored", m.location),
        }
    }
    Ok(out)
}

/// Creates a disk at `url`: writes its metadata object. Fails if a disk, or chunks of one,
/// are there already.
pub fn create(url: &str, opts: &CreateOptions) -> Result<Meta, ObjError> {
    let loc = Location::parse(url, &opts.store, true)?;
    loc.check_reachable()?;
    create_at(&loc, opts)
}

/// [`create`] at a location already parsed.
pub fn create_at(loc: &Location, opts: &CreateOptions) -> Result<Meta, ObjError> {
    let url = &loc.url;
    let size = opts.size.div_ceil(512) * 512;
    let mut meta = Meta::new(size, opts.chunk_size, opts.compression, opts.encryption)?;
    let codec = Codec::new(&meta, opts.key.as_ref())?;
    meta.key_check = codec.key_check()?;
    small_runtime()?.block_on(async {
        match loc.store.head(&loc.key(META)).await {
            Ok(_) => return Err(ObjError::Exists(format!("a disk exists at {url} already"))),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let mut old = loc.store.list(Some(&loc.key(CHUNKS)));
        if old.try_next().await?.is_some() {
            return Err(ObjError::Exists(format!(
                "{url} holds chunks of a disk whose metadata is gone: delete them first"
            )));
        }
        let put = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match loc
            .store
            .put_opts(&loc.key(META), PutPayload::from(meta.to_json()), put)
            .await
        {
            Ok(_) => Ok(meta),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Err(ObjError::Exists(format!("a disk exists at {url} already"))),
            Err(e) => Err(e.into()),
        }
    })
}

/// Describes the disk at `url` as the bucket has it.
pub fn info(url: &str, store: &StoreOptions) -> Result<DiskStats, ObjError> {
    let loc = Location::parse(url, store, false)?;
    loc.check_reachable()?;
    small_runtime()?.block_on(async {
        let meta = read_meta(&loc).await?;
        let chunks = list_chunks(&loc, meta.chunks()).await?;
        let writer = match loc.store.get(&loc.key(LEASE)).await {
            Ok(g) => {
                let v: serde_json::Value =
                    serde_json::from_slice(&g.bytes().await?).unwrap_or_default();
                let live = v["expires"].as_u64().unwrap_or(0) > unix_now()
                    && !v["released"].as_bool().unwrap_or(false);
                live.then(|| v["holder"].as_str().unwrap_or("?").to_owned())
            }
            Err(_) => None,
        };
        let writer = writer.or_else(|| {
            // A local directory's lease is a lock: held if it cannot be taken.
            let dir = loc.local.as_ref()?;
            let f = std::fs::File::open(dir.join("vdk-lease.lock")).ok()?;
            let held = !vdk_core::sys::try_lock(&f, vdk_core::sys::Lock::Shared).unwrap_or(false);
            held.then(|| {
                std::fs::read_to_string(dir.join("vdk-lease.lock"))
                    .unwrap_or_default()
                    .trim()
                    .to_owned()
            })
        });
        Ok(DiskStats {
            stored_chunks: chunks.len() as u64,
            stored_bytes: chunks.values().map(|(_, s)| s).sum(),
            meta,
            writer,
        })
    })
}

/// Deletes the disk at `url`: its chunks, lease and metadata. The caller makes sure nobody
/// has it open.
pub fn destroy(url: &str, store: &StoreOptions) -> Result<(), ObjError> {
    let loc = Location::parse(url, store, false)?;
    loc.check_reachable()?;
    small_runtime()?.block_on(async {
        let chunks: Vec<object_store::path::Path> = loc
            .store
            .list(Some(&loc.key(CHUNKS)))
            .map_ok(|m| m.location)
            .try_collect()
            .await?;
        let names = futures::stream::iter(chunks.into_iter().map(Ok)).boxed();
        loc.store
            .delete_stream(names)
            .try_collect::<Vec<_>>()
            .await?;
        for name in [LEASE, META] {
            match loc.store.delete(&loc.key(name)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    })
}
