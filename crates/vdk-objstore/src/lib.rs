//! Disks in object storage: S3 and its compatibles, GCS, Azure, or a local directory.
//!
//! A disk is a prefix in a bucket holding a metadata object and the chunks that were ever
//! written:
//!
//! ```text
//!   PREFIX/vdk-disk.json      size, chunk size, format version, compression, encryption
//!   PREFIX/vdk-lease.json     the writer's lease (who, until when), taken by conditional put
//!   PREFIX/chunks/N           chunk N (16 hex digits); absent reads as zeroes
//! ```
//!
//! [`ObjectDisk`] serves one as a [`vdk_core::BlockDevice`] through a bounded local cache with
//! write-back: writes land in the cache and are acknowledged; a flush (or FUA) returns when
//! the dirty chunks are stored in the bucket. Many uploads and downloads run at once on a
//! small tokio runtime of the disk's own; front ends call in from ordinary threads.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

mod cache;
mod codec;
mod disk;
mod lease;
mod location;
mod meta;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

pub use codec::{read_key, Codec, KEY_LEN};
pub use disk::{
    create, create_at, destroy, info, CacheStats, CreateOptions, DiskStats, ObjectDisk, Recovery,
    RecoveryReport,
};
pub use location::{is_url, store_message, Lister, Location, StoreEnv, StoreOptions};
pub use meta::{Compression, Encryption, Meta, DEFAULT_CHUNK, MAX_CHUNK, MIN_CHUNK};

/// Why an object-store disk could not be made, opened or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ObjError {
    /// A local file (the cache) failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The object store failed. Its display is the store's answer in one line; the full
    /// error (with the response body) is the field, not a `source`, so that error chains
    /// do not print it again.
    #[error("{}", location::store_message(.0))]
    Store(object_store::Error),
    /// Nothing answers at the store's endpoint.
    #[error("cannot reach {endpoint}: {reason}")]
    Unreachable {
        /// The endpoint tried.
        endpoint: String,
        /// Why it could not be reached.
        reason: String,
    },
    /// The URL is not one vdk reads.
    #[error("{0}")]
    BadUrl(String),
    /// The metadata object is missing a field, malformed, or from a newer vdk.
    #[error("bad disk metadata: {0}")]
    BadMeta(String),
    /// No disk at the URL.
    #[error("no vdk disk at {0} (make one with: vdk create {0} SIZE)")]
    NotFound(String),
    /// A disk (or other objects) already at the URL.
    #[error("{0}")]
    Exists(String),
    /// Another writer holds the disk.
    #[error(
        "the disk is open for writing by {holder}{}; open it read-only, or close it there",
        until(expires_in)
    )]
    LeaseHeld {
        /// Who holds it.
        holder: String,
        /// When its lease runs out if not renewed (none for a lock held by a process).
        expires_in: Option<Duration>,
    },
    /// This writer's lease was taken over: it must not write again.
    #[error("the disk's writer lease was taken by {0}: writes stop here")]
    LeaseLost(String),
    /// The lease could not be renewed in time (the store is unreachable): writes wait for it.
    #[error("the disk's writer lease could not be renewed (is the object store reachable?)")]
    LeaseExpired,
    /// The disk is encrypted and no key was given.
    #[error("the disk is encrypted: give its key file (--key-file)")]
    KeyNeeded,
    /// A key was given for a disk that is not encrypted.
    #[error("the disk is not encrypted: no key file wanted")]
    KeyNotWanted,
    /// A key file that is neither 32 raw bytes nor 64 hex digits.
    #[error("a key file holds 32 raw bytes or 64 hex digits")]
    BadKey,
    /// The key does not open this disk.
    #[error("the key does not open this disk")]
    WrongKey,
    /// A chunk failed to decrypt (corrupt, or moved from another place).
    #[error("chunk {0} fails to decrypt: corrupt, or not this disk's")]
    Crypto(u64),
    /// A chunk does not decode to one chunk's bytes.
    #[error("chunk {0} is corrupt (does not decode to one chunk)")]
    BadChunk(u64),
    /// The disk was opened read-only.
    #[error("the disk is open read-only")]
    ReadOnly,
}

impl From<object_store::Error> for ObjError {
    fn from(e: object_store::Error) -> ObjError {
        ObjError::Store(e)
    }
}

fn until(d: &Option<Duration>) -> String {
    d.map(|d| format!(" (its lease ends in {} s unless renewed)", d.as_secs()))
        .unwrap_or_default()
}

impl From<ObjError> for vdk_core::Error {
    fn from(e: ObjError) -> vdk_core::Error {
        match e {
            ObjError::Io(e) => vdk_core::Error::Io(e),
            ObjError::ReadOnly => vdk_core::Error::ReadOnly,
            other => vdk_core::Error::Io(io::Error::other(other)),
        }
    }
}

/// How to open a disk.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Open read-only: no lease, many readers at once.
    pub read_only: bool,
    /// The cache directory; by default one under `cache_root` named after the disk.
    pub cache_dir: Option<PathBuf>,
    /// Where default cache directories go (default: [`default_cache_root`]).
    pub cache_root: Option<PathBuf>,
    /// The most the cache holds, in bytes (at least 8 chunks).
    pub cache_size: u64,
    /// The key of an encrypted disk.
    pub key: Option<[u8; KEY_LEN]>,
    /// What to do with chunks written and not uploaded by a process that stopped.
    pub recovery: Recovery,
    /// How long a writer's lease lasts unless renewed (renewed at a third of it).
    pub lease_ttl: Duration,
    /// How long a chunk stays dirty before the background writeback uploads it (unless
    /// dirty chunks fill their share of the cache first, or a flush comes).
    pub writeback_delay: Duration,
    /// Endpoint, region and such.
    pub store: StoreOptions,
    /// The default cache (no `cache_dir`) serves this open only: it is removed at close once
    /// nothing in it waits for upload (kept, and said, otherwise). For one-shot commands;
    /// a cache that outlives the process is what lets a crashed writer's data be uploaded
    /// later, and a crash leaves this one too.
    pub ephemeral_cache: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: false,
            cache_dir: None,
            cache_root: None,
            cache_size: 1 << 30,
            key: None,
            recovery: Recovery::Upload,
            lease_ttl: Duration::from_secs(30),
            writeback_delay: Duration::from_secs(1),
            store: StoreOptions::default(),
            ephemeral_cache: false,
        }
    }
}

/// Where caches go when no directory is given: `$XDG_CACHE_HOME/vdk/objstore`, or
/// `~/.cache/vdk/objstore`, or `/var/cache/vdk/objstore` for root without a home.
pub fn default_cache_root() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("vdk/objstore");
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(h) => PathBuf::from(h).join(".cache/vdk/objstore"),
        None => PathBuf::from("/var/cache/vdk/objstore"),
    }
}
