//! `vdk create` and `vdk info`: making and describing image files, as `qemu-img` does.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use vdk_core::size::{parse_size, Human};
use vdk_formats::{CreateOptions, Format, ImageInfo};

use crate::cloud::StoreArgs;
use crate::control::{Client, DiskRequest, ErrorKind, Request};
use crate::daemon::Paths;

/// `vdk create`.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  vdk create disk.qcow2 100G                     a sparse qcow2 image (the default format)
  vdk create -f raw disk.img 10G
  vdk create overlay.qcow2 --backing base.img    size and backing format from the base
  vdk create s3://bucket/disks/d1 10G            a disk in object storage, 4 MiB chunks
  vdk create s3://bucket/d2 1T --compression zstd --encryption aes-256-gcm --key-file k")]
pub struct CreateArgs {
    /// The new image (must not exist): a path, or an s3://, gs://, az:// or file:// URL
    /// for a disk in object storage.
    file: PathBuf,
    /// Virtual size (e.g. 10G); with --backing, defaults to the backing image's size.
    size: Option<String>,
    /// Format of a file: qcow2 (default), raw, vhd or vhdx.
    #[arg(long, short = 'f')]
    format: Option<String>,
    /// Backing image (qcow2 only), recorded as given: relative to the new image's directory,
    /// or absolute.
    #[arg(long, short = 'b', value_name = "BASE")]
    backing: Option<String>,
    /// Format of the backing image; probed from its magic if not given.
    #[arg(long, short = 'F', value_name = "FORMAT")]
    backing_format: Option<String>,
    /// qcow2 cluster size, a power of two from 512 to 2M (default 64K).
    #[arg(long, value_name = "SIZE")]
    cluster_size: Option<String>,
    /// VHD kind: dynamic (grows, the default) or fixed (all space up front).
    #[arg(long, value_name = "KIND", default_value = "dynamic")]
    subformat: String,
    /// Object storage: bytes per chunk, a power of two from 64K to 64M (default 4M).
    #[arg(long, value_name = "SIZE")]
    chunk_size: Option<String>,
    /// Object storage: chunk compression, none (default) or zstd.
    #[arg(long, value_name = "HOW", default_value = "none")]
    compression: String,
    /// Object storage: chunk encryption, none (default) or aes-256-gcm (needs --key-file).
    #[arg(long, value_name = "HOW", default_value = "none")]
    encryption: String,
    /// Object storage: the key of an encrypted disk, 32 raw bytes or 64 hex digits.
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    #[command(flatten)]
    store: StoreArgs,
}

/// `vdk create URL`: a disk in object storage.
fn create_cloud(url: &str, args: &CreateArgs) -> anyhow::Result<()> {
    if args.format.as_deref().is_some_and(|f| f != "objstore") {
        bail!("{url} is a URL: it holds a disk in vdk's object-store layout, not a file format");
    }
    if args.backing.is_some() || args.cluster_size.is_some() {
        bail!("--backing and --cluster-size are for image files, not object-store disks");
    }
    let Some(size) = &args.size else {
        bail!("give a SIZE for the new disk (e.g. 10G)");
    };
    let size = parse_size(size).with_context(|| format!("bad size {size:?}"))?;
    let compression = match args.compression.as_str() {
        "none" => vdk_objstore::Compression::None,
        "zstd" => vdk_objstore::Compression::Zstd,
        other => bail!("unknown --compression {other:?}: none or zstd"),
    };
    let encryption = match args.encryption.as_str() {
        "none" => vdk_objstore::Encryption::None,
        "aes-256-gcm" => vdk_objstore::Encryption::Aes256Gcm,
        other => bail!("unknown --encryption {other:?}: none or aes-256-gcm"),
    };
    if encryption != vdk_objstore::Encryption::None && args.key_file.is_none() {
        bail!("--encryption needs a --key-file (32 raw bytes or 64 hex digits, e.g. from `openssl rand -hex 32`)");
    }
    let mut opts = vdk_objstore::CreateOptions {
        compression,
        encryption,
        key: args
            .key_file
            .as_deref()
            .map(crate::cloud::read_key)
            .transpose()?,
        store: args.store.store_options(),
        ..vdk_objstore::CreateOptions::new(size)
    };
    if let Some(c) = &args.chunk_size {
        opts.chunk_size = parse_size(c).with_context(|| format!("bad chunk size {c:?}"))?;
    }
    let meta = vdk_objstore::create(url, &opts).with_context(|| format!("cannot create {url}"))?;
    println!(
        "created {url} (object store, {}, {} chunks{}{})",
        Human(meta.size),
        Human(meta.chunk_size),
        if compression == vdk_objstore::Compression::Zstd {
            ", zstd"
        } else {
            ""
        },
        if encryption == vdk_objstore::Encryption::None {
            ""
        } else {
            ", aes-256-gcm"
        },
    );
    Ok(())
}

/// Runs `vdk create`.
pub fn create(args: CreateArgs) -> anyhow::Result<()> {
    if let Some(url) = args.file.to_str().filter(|f| crate::cloud::is_url(f)) {
        return create_cloud(url, &args);
    }
    if args.chunk_size.is_some()
        || args.key_file.is_some()
        || args.compression != "none"
        || args.encryption != "none"
    {
        bail!("--chunk-size, --compression, --encryption and --key-file are for object-store disks (s3://...)");
    }
    let format = Format::from_name(args.format.as_deref().unwrap_or("qcow2"))?;
    let mut size = args
        .size
        .as_deref()
        .map(|s| parse_size(s).with_context(|| format!("bad size {s:?}")))
        .transpose()?;
    let backing = match &args.backing {
        None => None,
        Some(name) => {
            let path = vdk_formats::backing_path(&args.file, name);
            let bformat = match args.backing_format.as_deref() {
                Some(f) => Format::from_name(f)?,
                None => vdk_formats::probe(&path)
                    .with_context(|| format!("cannot open the backing image {}", path.display()))?,
            };
            let binfo = vdk_formats::info(&path, Some(bformat), false)
                .with_context(|| format!("cannot read the backing image {}", path.display()))?;
            size.get_or_insert(binfo.virtual_size);
            Some((name.clone(), bformat))
        }
    };
    let Some(size) = size else {
        bail!("give a SIZE for the new image (e.g. 10G), or a --backing image to take it from");
    };
    let cluster_size = args
        .cluster_size
        .as_deref()
        .map(|s| parse_size(s).with_context(|| format!("bad cluster size {s:?}")))
        .transpose()?;
    if cluster_size.is_some() && format != Format::Qcow2 {
        bail!("--cluster-size applies to qcow2 images");
    }
    let fixed = match args.subformat.as_str() {
        "dynamic" => false,
        "fixed" if format == Format::Vhd => true,
        "fixed" => bail!("--subformat fixed applies to vhd images"),
        other => bail!("unknown --subformat {other:?}: dynamic or fixed"),
    };
    let opts = CreateOptions {
        format,
        cluster_size,
        backing,
        fixed,
    };
    vdk_formats::create(&args.file, size, &opts)
        .with_context(|| format!("cannot create {}", args.file.display()))?;
    // The size it has: a VHD's is rounded up to whole CHS geometry.
    let size = vdk_formats::info(&args.file, Some(format), false).map_or(size, |i| i.virtual_size);
    println!(
        "created {} ({format}, {})",
        args.file.display(),
        Human(size)
    );
    Ok(())
}

/// `vdk info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The image.
    file: PathBuf,
    /// Its format; probed from its magic if not given.
    #[arg(long, short = 'f')]
    format: Option<String>,
    /// Describe the backing images too.
    #[arg(long)]
    backing_chain: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

/// `vdk info URL`.
fn info_cloud(url: &str, args: &InfoArgs) -> anyhow::Result<()> {
    let s = vdk_objstore::info(url, &args.store.store_options())
        .with_context(|| format!("cannot read {url}"))?;
    let m = &s.meta;
    let compression = match m.compression {
        vdk_objstore::Compression::None => "none",
        vdk_objstore::Compression::Zstd => "zstd",
    };
    let encryption = match m.encryption {
        vdk_objstore::Encryption::None => "none",
        vdk_objstore::Encryption::Aes256Gcm => "aes-256-gcm",
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        let v = serde_json::json!({
            "filename": url,
            "format": "vdk-objstore",
            "version": m.version,
            "uuid": m.uuid,
            "virtual-size": m.size,
            "actual-size": s.stored_bytes,
            "chunk-size": m.chunk_size,
            "chunks": m.chunks(),
            "chunks-stored": s.stored_chunks,
            "compression": compression,
            "encryption": encryption,
            "writer": s.writer,
        });
        serde_json::to_writer_pretty(&mut out, &v)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(out, "image: {url}")?;
    writeln!(out, "file format: vdk-objstore (version {})", m.version)?;
    writeln!(out, "virtual size: {} ({} bytes)", Human(m.size), m.size)?;
    writeln!(out, "disk size: {}", Human(s.stored_bytes))?;
    writeln!(out, "chunk size: {}", m.chunk_size)?;
    writeln!(out, "chunks stored: {} of {}", s.stored_chunks, m.chunks())?;
    writeln!(out, "compression: {compression}")?;
    writeln!(out, "encryption: {encryption}")?;
    writeln!(out, "uuid: {}", m.uuid)?;
    writeln!(out, "writer: {}", s.writer.as_deref().unwrap_or("none"))?;
    Ok(())
}

fn to_json(i: &ImageInfo) -> serde_json::Value {
    serde_json::json!({
        "filename": i.path,
        "format": i.format.name(),
        "virtual-size": i.virtual_size,
        "actual-size": i.disk_size,
        "cluster-size": i.cluster_size,
        "version": i.version,
        "refcount-bits": i.refcount_bits,
        "compression-type": i.compression,
        "backing-filename": i.backing_file,
        "backing-filename-format": i.backing_format,
        "dirty-flag": i.dirty,
        "corrupt": i.corrupt,
        "extended-l2": i.extended_l2,
        "snapshots": i.snapshots,
        "encrypted": i.encrypted,
        "data-file": i.data_file,
        "backing-image": i.backing.as_deref().map(to_json),
        "volume-id": i.volume_id,
        "subformat": i.subformat,
    })
}

fn print_text(out: &mut impl Write, i: &ImageInfo) -> std::io::Result<()> {
    writeln!(out, "image: {}", i.path.display())?;
    writeln!(out, "file format: {}", i.format)?;
    writeln!(
        out,
        "virtual size: {} ({} bytes)",
        Human(i.virtual_size),
        i.virtual_size
    )?;
    writeln!(out, "disk size: {}", Human(i.disk_size))?;
    if let Some(cs) = i.cluster_size {
        writeln!(out, "cluster_size: {cs}")?;
    }
    if let Some(k) = i.subformat {
        writeln!(out, "subformat: {k}")?;
    }
    if let Some(v) = &i.volume_id {
        writeln!(out, "volume id: {v}")?;
    }
    if let Some(b) = &i.backing_file {
        writeln!(out, "backing file: {b}")?;
        if let Some(f) = &i.backing_format {
            writeln!(out, "backing file format: {f}")?;
        }
    }
    if let Some(v) = i.version {
        writeln!(out, "Format specific information:")?;
        writeln!(out, "    compat: {}", if v >= 3 { "1.1" } else { "0.10" })?;
        if let Some(c) = i.compression {
            writeln!(out, "    compression type: {c}")?;
        }
        if let Some(r) = i.refcount_bits {
            writeln!(out, "    refcount bits: {r}")?;
        }
        writeln!(out, "    dirty: {}", i.dirty)?;
        writeln!(out, "    corrupt: {}", i.corrupt)?;
        writeln!(out, "    extended l2: {}", i.extended_l2)?;
        if i.snapshots > 0 {
            writeln!(
                out,
                "    internal snapshots: {} (read-only in vdk)",
                i.snapshots
            )?;
        }
        if i.encrypted {
            writeln!(out, "    encrypted: yes (not supported by vdk)")?;
        }
        if let Some(d) = &i.data_file {
            writeln!(out, "    data file: {d} (not supported by vdk)")?;
        }
    }
    if let Some(b) = &i.backing {
        writeln!(out)?;
        print_text(out, b)?;
    }
    Ok(())
}

/// Runs `vdk info`.
pub fn info(args: InfoArgs) -> anyhow::Result<()> {
    if let Some(url) = args.file.to_str().filter(|f| crate::cloud::is_url(f)) {
        return info_cloud(url, &args);
    }
    let format = args.format.as_deref().map(Format::from_name).transpose()?;
    let info = vdk_formats::info(Path::new(&args.file), format, args.backing_chain)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &to_json(&info))?;
        writeln!(out)?;
    } else {
        print_text(&mut out, &info)?;
    }
    Ok(())
}

/// `vdk check`.
#[derive(Debug, Args)]
#[command(after_help = "\
Exit status, as qemu-img check: 0 consistent, 2 corruption found, 3 only leaked clusters.")]
pub struct CheckArgs {
    /// The image.
    file: PathBuf,
    /// Its format; probed from its magic if not given.
    #[arg(long, short = 'f')]
    format: Option<String>,
    /// Rewrite refcounts that disagree with the tables (fixes leaks; and refcounts too low).
    #[arg(long, short = 'r')]
    repair: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `vdk check`.
pub fn check(args: CheckArgs) -> anyhow::Result<()> {
    let format = args.format.as_deref().map(Format::from_name).transpose()?;
    let report = vdk_formats::check(&args.file, format, args.repair)
        .with_context(|| format!("cannot check {}", args.file.display()))?;
    let Some(r) = report else {
        let format = match format {
            Some(f) => f,
            None => vdk_formats::probe(&args.file)?,
        };
        if format == Format::Raw || format == Format::Iso {
            println!(
                "{}: {format} images have no metadata to check",
                args.file.display()
            );
            return Ok(());
        }
        // VHD and VHDX: opening checks every header, table and checksum (and fails on any
        // inconsistency); there are no refcounts to compare.
        vdk_formats::open(
            &args.file,
            &vdk_formats::OpenOptions {
                format: Some(format),
                read_only: true,
                probe_backing: false,
            },
        )
        .with_context(|| format!("{} is inconsistent", args.file.display()))?;
        println!("No errors were found on the image.");
        return Ok(());
    };
    let left_leaks = r.leaks - r.leaks_fixed;
    let left_corruptions = r.corruptions - r.corruptions_fixed;
    if args.json {
        let v = serde_json::json!({
            "filename": args.file,
            "format": "qcow2",
            "check-errors": r.errors,
            "leaks": left_leaks,
            "corruptions": left_corruptions,
            "leaks-fixed": r.leaks_fixed,
            "corruptions-fixed": r.corruptions_fixed,
            "image-end-offset": r.image_end_offset,
            "total-clusters": r.total_clusters,
            "allocated-clusters": r.allocated_clusters,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for m in &r.messages {
            println!("{m}");
        }
        if r.leaks_fixed + r.corruptions_fixed > 0 {
            println!(
                "The following inconsistencies were found and repaired: {} leaked clusters, {} corruptions",
                r.leaks_fixed, r.corruptions_fixed
            );
        }
        if left_corruptions + r.errors > 0 {
            println!(
                "{} errors were found on the image.",
                left_corruptions + r.errors
            );
        }
        if left_leaks > 0 {
            println!("{left_leaks} leaked clusters were found on the image (space only: repair with --repair).");
        }
        if left_corruptions + r.errors + left_leaks == 0 {
            println!("No errors were found on the image.");
        }
        println!(
            "{}/{} = {:.2}% allocated clusters",
            r.allocated_clusters,
            r.total_clusters,
            100.0 * r.allocated_clusters as f64 / r.total_clusters.max(1) as f64
        );
        println!("Image end offset: {}", r.image_end_offset);
    }
    let code = if left_corruptions + r.errors > 0 {
        2
    } else if left_leaks > 0 {
        3
    } else {
        0
    };
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

/// `vdk resize`.
#[derive(Debug, Args)]
pub struct ResizeArgs {
    /// The image (raw or qcow2; not open elsewhere).
    file: PathBuf,
    /// The new size, or +SIZE to grow by that much. Images only grow.
    size: String,
    /// Its format; probed from its magic if not given.
    #[arg(long, short = 'f')]
    format: Option<String>,
}

/// Runs `vdk resize`.
pub fn resize(args: ResizeArgs) -> anyhow::Result<()> {
    let format = args.format.as_deref().map(Format::from_name).transpose()?;
    let info = vdk_formats::info(&args.file, format, false)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let new_size = match args.size.strip_prefix('+') {
        Some(more) => info.virtual_size.saturating_add(parse_size(more)?),
        None => parse_size(&args.size)?,
    };
    vdk_formats::resize(&args.file, Some(info.format), new_size)
        .with_context(|| format!("cannot resize {}", args.file.display()))?;
    println!(
        "resized {} from {} to {}",
        args.file.display(),
        Human(info.virtual_size),
        Human(new_size)
    );
    Ok(())
}

/// `vdk commit`, `vdk discard`.
#[derive(Debug, Args)]
pub struct OverlayArgs {
    /// An open cow disk (its id or overlay), done live by the daemon with the disk's requests
    /// paused; or the overlay file of a closed one (a qcow2 file recording its base).
    overlay: PathBuf,
}

/// Asks a running daemon to commit (or discard) an open disk; `None` if no daemon knows it.
fn live(
    args: &OverlayArgs,
    paths: &Paths,
    discard: bool,
) -> anyhow::Result<Option<serde_json::Value>> {
    let Ok(mut client) = Client::connect(&paths.socket) else {
        return Ok(None);
    };
    let disk = crate::cli::disks::disk_key(&args.overlay.to_string_lossy())?;
    let req = if discard {
        Request::Discard(DiskRequest { disk })
    } else {
        Request::Commit(DiskRequest { disk })
    };
    match client.call(&req)? {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!(e.message)),
    }
}

/// Runs `vdk commit`.
pub fn commit(args: OverlayArgs, paths: &Paths) -> anyhow::Result<()> {
    if let Some(v) = live(&args, paths, false)? {
        println!(
            "committed {} live: {} of data and {} of zeroes merged into the base; the overlay is empty",
            v["id"].as_str().unwrap_or("?"),
            Human(v["data"].as_u64().unwrap_or(0)),
            Human(v["zeroed"].as_u64().unwrap_or(0))
        );
        return Ok(());
    }
    let r = vdk_filters::cow::commit(&args.overlay)
        .with_context(|| format!("cannot commit {}", args.overlay.display()))?;
    println!(
        "committed {}: {} of data and {} of zeroes merged into the base; the overlay is empty",
        args.overlay.display(),
        Human(r.data),
        Human(r.zeroed)
    );
    Ok(())
}

/// Runs `vdk discard`.
pub fn discard(args: OverlayArgs, paths: &Paths) -> anyhow::Result<()> {
    if let Some(v) = live(&args, paths, true)? {
        println!(
            "discarded {} live: the disk reads as its base again",
            v["id"].as_str().unwrap_or("?")
        );
        return Ok(());
    }
    vdk_filters::cow::discard(&args.overlay)
        .with_context(|| format!("cannot discard {}", args.overlay.display()))?;
    println!(
        "discarded {}: the disk reads as its base again",
        args.overlay.display()
    );
    Ok(())
}

/// `vdk snapshot`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// An open cow disk (its id or overlay: switched live to the new overlay), or the overlay
    /// file of a closed one; it is not written any more after this.
    overlay: PathBuf,
    /// The new overlay on top of it.
    new: PathBuf,
}

/// Runs `vdk snapshot`.
pub fn snapshot(args: SnapshotArgs, paths: &Paths) -> anyhow::Result<()> {
    if let Ok(mut client) = Client::connect(&paths.socket) {
        let req = Request::Snapshot(crate::control::SnapshotRequest {
            disk: crate::cli::disks::disk_key(&args.overlay.to_string_lossy())?,
            new: std::path::absolute(&args.new)?,
        });
        match client.call(&req)? {
            Ok(v) => {
                println!(
                    "{} now writes to {}, on top of {}",
                    v["id"].as_str().unwrap_or("?"),
                    args.new.display(),
                    args.overlay.display()
                );
                return Ok(());
            }
            Err(e) if e.kind == ErrorKind::NotFound => {}
            Err(e) => anyhow::bail!(e.message),
        }
    }
    vdk_filters::cow::snapshot(&args.overlay, &args.new)
        .with_context(|| format!("cannot make {}", args.new.display()))?;
    println!(
        "{} now sits on {}: serve it as an image (vdk serve {})",
        args.new.display(),
        args.overlay.display(),
        args.new.display()
    );
    Ok(())
}
