//! `vdk convert`: copies an image into a new one of any writable format, skipping holes and
//! zeroes, with several requests in flight and a progress bar on a terminal.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::{Mutex, PoisonError};
use std::thread;

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tracing::warn;
use vdk_core::size::{parse_size, Human};
use vdk_core::sync;
use vdk_core::{BlockDevice, ExtentKind};
use vdk_formats::{CreateOptions, Format, OpenOptions};

/// Bytes copied per request.
const PIECE_BYTES: usize = 1 << 21;
const PIECE: u64 = PIECE_BYTES as u64;
/// Requests in flight.
const WORKERS: usize = 4;
/// Extent map looked up at a time.
const MAP_STEP: u64 = 1 << 30;

/// `vdk convert`.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  vdk convert disk.img disk.qcow2 -O qcow2      raw to qcow2, holes and zeroes left out
  vdk convert overlay.qcow2 flat.img            a backing chain flattened into one raw file
  vdk convert disk.qcow2 s3://bucket/disks/d1   into object storage (a new disk there)
  vdk convert s3://bucket/disks/d1 copy.qcow2 -O qcow2")]
pub struct ConvertArgs {
    /// The image to read (any format vdk reads; its backing chain is read through), or an
    /// object-store disk's URL.
    src: PathBuf,
    /// The new image (must not exist), or the URL of a new object-store disk.
    dst: PathBuf,
    /// Format of SRC; probed from its magic if not given.
    #[arg(short = 'f', long = "format", value_name = "FORMAT")]
    src_format: Option<String>,
    /// Format of DST: qcow2, vhd, vhdx, luks or raw; by default the one its name says
    /// (disk.qcow2, disk.vhdx), else raw (as qemu-img).
    #[arg(short = 'O', long = "output-format", value_name = "FORMAT")]
    dst_format: Option<String>,
    /// Read SRC even if a program has it open for writing (a copy of a disk in use may be
    /// inconsistent), as qemu-img's -U.
    #[arg(short = 'U', long)]
    force_share: bool,
    /// qcow2 cluster size of DST.
    #[arg(long, value_name = "SIZE")]
    cluster_size: Option<String>,
    /// Probe the format of backing files whose parent does not record it.
    #[arg(long)]
    probe_backing: bool,
    /// Never show a progress bar (it shows only on a terminal anyway).
    #[arg(short, long)]
    quiet: bool,
    /// Encrypt DST with LUKS (a qcow2 DST: encrypt.format=luks), with the passphrase given;
    /// -O luks always is.
    #[arg(long)]
    encrypt: bool,
    /// Encrypting: milliseconds of PBKDF2 that opening the new image's key slot costs.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    iter_time: u32,
    /// A new object-store disk: bytes per chunk (default 4M).
    #[arg(long, value_name = "SIZE")]
    chunk_size: Option<String>,
    /// A new object-store disk: chunk compression, none (default) or zstd.
    #[arg(long, value_name = "HOW", default_value = "none")]
    compression: String,
    #[command(flatten)]
    cloud: crate::cloud::CloudArgs,
}

fn url_of(p: &std::path::Path) -> Option<&str> {
    p.to_str().filter(|s| crate::cloud::is_url(s))
}

/// `vdk convert` into a new object-store disk.
fn to_cloud(args: &ConvertArgs, url: &str, src: &dyn BlockDevice) -> anyhow::Result<()> {
    let cloud = args.cloud.options()?;
    let mut opts = vdk_objstore::CreateOptions::new(src.info().size);
    opts.store = crate::cloud::store_options(&cloud);
    opts.compression = match args.compression.as_str() {
        "none" => vdk_objstore::Compression::None,
        "zstd" => vdk_objstore::Compression::Zstd,
        other => bail!("unknown --compression {other:?}: none or zstd"),
    };
    if let Some(c) = &args.chunk_size {
        opts.chunk_size = parse_size(c).with_context(|| format!("bad chunk size {c:?}"))?;
    }
    if cloud.key_file.is_some() {
        opts.encryption = vdk_objstore::Encryption::Aes256Gcm;
        opts.key = cloud
            .key_file
            .as_deref()
            .map(crate::cloud::read_key)
            .transpose()?;
    }
    vdk_objstore::create(url, &opts).with_context(|| format!("cannot create {url}"))?;
    let copied = (|| {
        let dst = crate::cloud::open(url, &cloud, false, None)?;
        copy(src, &dst, args.quiet, false)?;
        let (_, dirty) = dst.cache_usage();
        if !args.quiet && dirty > 0 {
            eprintln!("uploading the last {}", Human(dirty));
        }
        dst.flush()?;
        anyhow::Ok(())
    })();
    if let Err(e) = copied {
        // A half-written disk is worse than none.
        if let Err(d) = vdk_objstore::destroy(url, &opts.store) {
            warn!("cannot delete the half-written {url}: {d}");
        }
        return Err(e.context(format!("converting {} failed", args.src.display())));
    }
    Ok(())
}

/// Runs `vdk convert`.
pub fn run(args: ConvertArgs, paths: &crate::paths::Paths) -> anyhow::Result<()> {
    let src_format = args
        .src_format
        .as_deref()
        .map(Format::from_name)
        .transpose()?;
    let dst_format = match &args.dst_format {
        Some(name) => Format::from_name(name)?,
        None => vdk_formats::format_by_name(&args.dst).unwrap_or(Format::Raw),
    };
    // A LUKS passphrase opens an encrypted SRC and encrypts a LUKS DST (-O luks).
    let encrypting = dst_format == Format::Luks || args.encrypt;
    let ask = match url_of(&args.src) {
        None => crate::cloud::Ask::IfEncrypted(&args.src),
        Some(_) => crate::cloud::Ask::Never,
    };
    let mut secret = args.cloud.luks_secret(ask)?;
    if encrypting && secret.is_none() {
        secret = crate::cloud::luks_secret_or_ask(None, None, crate::cloud::Ask::New)?;
    }
    let src: Arc<dyn BlockDevice> = match url_of(&args.src) {
        Some(url) => Arc::new(crate::cloud::open(url, &args.cloud.options()?, true, None)?),
        None => {
            vdk_formats::open(
                &args.src,
                &OpenOptions {
                    format: src_format,
                    read_only: true,
                    probe_backing: args.probe_backing,
                    force_share: args.force_share,
                    key: secret.clone(),
                    keep_bitmaps: false,
                },
            )
            .with_context(|| format!("cannot open {}", args.src.display()))
            .map_err(|e| {
                super::name_holder(e, &args.src, paths, "; add -U to copy it as it is now")
            })?
            .device
        }
    };
    if let Some(url) = url_of(&args.dst) {
        return to_cloud(&args, url, &*src);
    }
    if args.dst.exists() {
        bail!(
            "{} exists: vdk convert writes only new images",
            args.dst.display()
        );
    }
    if args.encrypt && !matches!(dst_format, Format::Qcow2 | Format::Luks) {
        bail!("--encrypt makes a qcow2 (encrypt.format=luks) or a LUKS image (-O luks), not {dst_format}");
    }
    let size = src.info().size;
    let cluster_size = args
        .cluster_size
        .as_deref()
        .map(|s| parse_size(s).with_context(|| format!("bad cluster size {s:?}")))
        .transpose()?;
    let opts = CreateOptions {
        format: dst_format,
        cluster_size,
        backing: None,
        fixed: false,
        encrypt: match (encrypting, &secret) {
            (true, Some(s)) => Some(vdk_formats::luks::CreateOptions {
                secret: s.clone(),
                iter_time_ms: args.iter_time,
            }),
            (true, None) => {
                bail!("encrypting needs a passphrase: --key-file FILE or --key-secret ENV (or a terminal to type it)")
            }
            (false, _) => None,
        },
    };
    vdk_formats::create(&args.dst, size, &opts)
        .with_context(|| format!("cannot create {}", args.dst.display()))?;
    let copied = (|| {
        let dst = vdk_formats::open(
            &args.dst,
            &OpenOptions {
                format: Some(dst_format),
                key: secret.clone(),
                ..OpenOptions::default()
            },
        )?
        .device;
        copy(&*src, &*dst, args.quiet, dst_format == Format::Luks)?;
        dst.flush()?;
        anyhow::Ok(())
    })();
    if let Err(e) = copied {
        // A half-written image is worse than none.
        let _ = std::fs::remove_file(&args.dst);
        return Err(e.context(format!("converting {} failed", args.src.display())));
    }
    Ok(())
}

/// The data ranges of `src` (every range, when `dense`), in pieces of at most [`PIECE`],
/// lazily.
struct Pieces<'a> {
    src: &'a dyn BlockDevice,
    size: u64,
    mapped_to: u64,
    queue: std::collections::VecDeque<(u64, u64)>,
    dense: bool,
}

impl Pieces<'_> {
    fn next(&mut self) -> anyhow::Result<Option<(u64, u64)>> {
        while self.queue.is_empty() && self.mapped_to < self.size {
            let len = MAP_STEP.min(self.size - self.mapped_to);
            let map = self.src.extents(self.mapped_to, len)?;
            for (at, run) in map.iter() {
                if self.dense || run.kind == ExtentKind::Data {
                    let mut p = at;
                    while p < at + run.len {
                        let n = PIECE.min(at + run.len - p);
                        self.queue.push_back((p, n));
                        p += n;
                    }
                }
            }
            self.mapped_to += len;
        }
        Ok(self.queue.pop_front())
    }
}

/// Copies `src` into `dst`. Holes and zeroes are left out unless `dense` (a destination
/// whose unwritten parts do not read as zeroes: a LUKS image's decrypt to noise).
fn copy(
    src: &dyn BlockDevice,
    dst: &dyn BlockDevice,
    quiet: bool,
    dense: bool,
) -> anyhow::Result<()> {
    let size = src.info().size;
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(size)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let pieces = Mutex::new(Pieces {
        src,
        size,
        mapped_to: 0,
        queue: Default::default(),
        dense,
    });
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let data_bytes = AtomicU64::new(0);
    thread::scope(|s| {
        for _ in 0..WORKERS {
            s.spawn(|| {
                let mut buf = vec![0u8; PIECE_BYTES];
                while !failed.load(Ordering::Relaxed) {
                    let next = sync::lock(&pieces).next();
                    let step = next.and_then(|p| {
                        let Some((at, n)) = p else { return Ok(None) };
                        let b = &mut buf[..usize::try_from(n).unwrap_or(PIECE_BYTES)];
                        src.read_at(b, at)?;
                        // Zeroes in data stay holes in the new image.
                        if dense || b.iter().any(|x| *x != 0) {
                            dst.write_at(b, at, false)?;
                        }
                        Ok(Some(n))
                    });
                    match step {
                        Ok(Some(n)) => {
                            data_bytes.fetch_add(n, Ordering::Relaxed);
                            bar.inc(n);
                        }
                        Ok(None) => break,
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            sync::lock(&first_error).get_or_insert(e);
                            break;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_error
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
    {
        bar.abandon();
        return Err(e);
    }
    bar.set_position(size);
    bar.finish_and_clear();
    if !quiet {
        eprintln!(
            "copied {} of data ({} virtual)",
            Human(data_bytes.load(Ordering::Relaxed)),
            Human(size)
        );
    }
    Ok(())
}
