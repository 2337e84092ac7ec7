//! Disks in object storage from the command line and the daemon: the flags that say how to
//! reach and cache one, and opening it with what a user needs to hear about recovery.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use tracing::{info, warn};
use vdk_core::size::parse_size;
use vdk_objstore::{ObjectDisk, Recovery, StoreOptions};

use crate::control::CloudOptions;

pub use vdk_objstore::is_url;

/// Where the store is: the flags of every command that names an object-store URL.
#[derive(Args, Clone, Debug, Default)]
#[command(next_help_heading = "Object storage (s3://, gs://, az://, file:// URLs)")]
pub struct StoreArgs {
    /// S3 endpoint URL, e.g. http://127.0.0.1:9000 (default: $AWS_ENDPOINT_URL, else AWS).
    /// Credentials come from $AWS_ACCESS_KEY_ID and $AWS_SECRET_ACCESS_KEY.
    #[arg(long, value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// S3 region (default: $AWS_REGION, else us-east-1).
    #[arg(long, value_name = "REGION")]
    pub s3_region: Option<String>,
}

impl StoreArgs {
    /// As the object-store crate takes them.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            ..StoreOptions::default()
        }
    }
}

/// The flags of commands that open object-store disks.
#[derive(Args, Clone, Debug, Default)]
#[command(next_help_heading = "Object storage (s3://, gs://, az://, file:// URLs)")]
pub struct CloudArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The local cache directory (default: one per disk under ~/.cache/vdk/objstore, or
    /// under the daemon's directory).
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// The most the cache holds (default 1G); dirty chunks are uploaded before it fills.
    #[arg(long, value_name = "SIZE")]
    pub cache_size: Option<String>,
    /// The key of an encrypted disk: a LUKS image's passphrase (all of FILE, byte for
    /// byte, as cryptsetup and QEMU read it), or an object-store disk's 32 raw bytes or 64 hex digits.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// A LUKS image's passphrase, from the environment variable ENV (never the command line).
    #[arg(long, value_name = "ENV", conflicts_with = "key_file")]
    pub key_secret: Option<String>,
    /// Drop the chunks a stopped writer left in the cache, not uploaded, instead of
    /// uploading them: the disk is as its last flush left it.
    #[arg(long)]
    pub discard_unflushed: bool,
    /// Seconds a written chunk waits in the cache before it is uploaded in the background
    /// (default 1); a flush uploads at once, and a cache filling with dirty chunks sooner.
    #[arg(long, value_name = "SECS")]
    pub writeback_delay: Option<u64>,
}

impl CloudArgs {
    /// The LUKS passphrase given, if any; else, as `ask` says, typed at a prompt.
    pub fn luks_secret(&self, ask: Ask<'_>) -> anyhow::Result<Option<vdk_formats::luks::Secret>> {
        luks_secret_or_ask(self.key_file.as_deref(), self.key_secret.as_deref(), ask)
    }

    /// The options, paths made absolute (for the daemon).
    pub fn options(&self) -> anyhow::Result<CloudOptions> {
        let abs = |p: &Option<PathBuf>| -> anyhow::Result<Option<PathBuf>> {
            p.as_deref()
                .map(|p| std::path::absolute(p).with_context(|| format!("{}", p.display())))
                .transpose()
        };
        Ok(CloudOptions {
            endpoint: self.store.s3_endpoint.clone(),
            region: self.store.s3_region.clone(),
            cache: abs(&self.cache)?,
            cache_size: self
                .cache_size
                .as_deref()
                .map(|s| parse_size(s).with_context(|| format!("bad --cache-size {s:?}")))
                .transpose()?,
            key_file: abs(&self.key_file)?,
            discard_unflushed: self.discard_unflushed,
            writeback_delay: self.writeback_delay,
            env: None,
        })
    }
}

/// Endpoint, region and the environment they and the credentials come from.
pub fn store_options(o: &CloudOptions) -> StoreOptions {
    StoreOptions {
        endpoint: o.endpoint.clone(),
        region: o.region.clone(),
        env: o.env.clone(),
        ..StoreOptions::default()
    }
}

/// The key in `path`.
pub fn read_key(path: &Path) -> anyhow::Result<[u8; vdk_objstore::KEY_LEN]> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read the key file {}", path.display()))?;
    vdk_objstore::read_key(&bytes).with_context(|| format!("{}", path.display()))
}

/// Opens the disk at `url`; caches not given go under `cache_root` if set.
pub fn open(
    url: &str,
    o: &CloudOptions,
    read_only: bool,
    cache_root: Option<&Path>,
) -> anyhow::Result<ObjectDisk> {
    let mut opts = vdk_objstore::OpenOptions {
        read_only,
        cache_dir: o.cache.clone(),
        cache_root: cache_root.map(Path::to_path_buf),
        key: o.key_file.as_deref().map(read_key).transpose()?,
        recovery: if o.discard_unflushed {
            Recovery::Discard
        } else {
            Recovery::Upload
        },
        store: store_options(o),
        // A command's own cache (serve, convert) goes when it ends, unless it holds what
        // could not be uploaded; the daemon's and one given with --cache stay.
        ephemeral_cache: cache_root.is_none() && o.cache.is_none(),
        ..vdk_objstore::OpenOptions::default()
    };
    if let Some(s) = o.cache_size {
        opts.cache_size = s;
    }
    if let Some(d) = o.writeback_delay {
        opts.writeback_delay = std::time::Duration::from_secs(d);
    }
    let disk = ObjectDisk::open(url, &opts).with_context(|| format!("cannot open {url}"))?;
    let r = disk.recovery();
    if r.uploaded > 0 {
        info!(
            disk = url,
            chunks = r.uploaded,
            "uploaded what a stopped writer left in the cache"
        );
    }
    if r.discarded > 0 {
        warn!(
            disk = url,
            chunks = r.discarded,
            "dropped what a stopped writer left in the cache, as asked"
        );
    }
    for (index, path) in &r.conflicts {
        warn!(
            disk = url,
            chunk = index,
            kept = %path.display(),
            "the cache's unflushed chunk was older than the bucket's (another writer changed it): the bucket's is used, the cache's is kept aside"
        );
    }
    Ok(disk)
}

/// When a passphrase that `--key-file` and `--key-secret` did not give is asked for on the
/// terminal.
#[derive(Clone, Copy, Debug)]
pub enum Ask<'a> {
    /// Never.
    Never,
    /// If this image (a LUKS image, or a qcow2 image encrypted with LUKS) needs one.
    IfEncrypted(&'a Path),
    /// Always, twice (a new passphrase, for an image being encrypted).
    New,
}

/// A LUKS passphrase from `--key-file FILE` or `--key-secret ENV`, or else, where `ask` says
/// so, typed at a prompt ([`ask_passphrase`]).
pub fn luks_secret_or_ask(
    file: Option<&Path>,
    env: Option<&str>,
    ask: Ask<'_>,
) -> anyhow::Result<Option<vdk_formats::luks::Secret>> {
    if let Some(s) = luks_secret(file, env)? {
        return Ok(Some(s));
    }
    Ok(ask_passphrase(ask)?.map(|p| vdk_formats::luks::Secret::new(p.into_bytes())))
}

/// A passphrase typed at a prompt on the terminal (echo off), as cryptsetup asks for it:
/// only where stdin is a terminal and `ask` says one is needed.
pub fn ask_passphrase(ask: Ask<'_>) -> anyhow::Result<Option<String>> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        return Ok(None);
    }
    let typed =
        |prompt: &str| rpassword::prompt_password(prompt).context("cannot read the passphrase");
    match ask {
        Ask::Never => Ok(None),
        Ask::IfEncrypted(image) => {
            let encrypted = vdk_formats::info(image, None, false)
                .is_ok_and(|i| i.encrypted || i.format == vdk_formats::Format::Luks);
            if !encrypted {
                return Ok(None);
            }
            typed(&format!("Passphrase for {}: ", image.display())).map(Some)
        }
        Ask::New => {
            let first = typed("New passphrase: ")?;
            if first.is_empty() {
                anyhow::bail!("an empty passphrase protects nothing");
            }
            if typed("The same passphrase again: ")? != first {
                anyhow::bail!("the two passphrases differ");
            }
            Ok(Some(first))
        }
    }
}

/// A LUKS passphrase from `--key-file FILE` or `--key-secret ENV`, if either is given.
pub fn luks_secret(
    file: Option<&Path>,
    env: Option<&str>,
) -> anyhow::Result<Option<vdk_formats::luks::Secret>> {
    use vdk_formats::luks::Secret;
    Ok(match (file, env) {
        (Some(f), _) => Some(Secret::from_file(f)?),
        (None, Some(e)) => Some(Secret::from_env(e)?),
        (None, None) => None,
    })
}
