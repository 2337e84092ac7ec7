//! `vdk create` and `vdk info`: making and describing image files, as `qemu-img` does.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use vdk_core::size::{parse_size, Human};
use vdk_formats::qcow2::snapshot::Edit;
use vdk_formats::{CreateOptions, Format};

use crate::cloud::StoreArgs;
use crate::control::{Client, ErrorKind, OverlayRequest, Request};
use crate::paths::Paths;

/// `vdk create`.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  vdk create disk.qcow2 100G                     a sparse qcow2 image (the default format)
  vdk create -f raw disk.img 10G
  vdk create overlay.qcow2 --backing base.img    size and backing format from the base
  vdk create s3://bucket/disks/d1 10G            a disk in object storage, 4 MiB chunks
  vdk create disk.qcow2 10G --encrypt luks --key-file pass  qcow2 encrypt.format=luks
  vdk create disk.luks 10G --encrypt luks --key-file pass   LUKS1, as qemu-img -f luks makes it
  vdk create s3://bucket/d2 1T --compression zstd --encryption aes-256-gcm --key-file k")]
pub struct CreateArgs {
    /// The new image (must not exist): a path, or an s3://, gs://, az:// or file:// URL
    /// for a disk in object storage.
    file: PathBuf,
    /// Virtual size (e.g. 10G); with --backing, defaults to the backing image's size.
    size: Option<String>,
    /// Format of a file: qcow2, raw, vhd or vhdx; by default the one its name says
    /// (disk.vhdx; disk.img and disk.raw are raw), else qcow2.
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
    /// Encryption: luks for an image file (qcow2's encrypt.format=luks, or for a raw image a
    /// LUKS1 image, qemu's luks format: AES-256-XTS, PBKDF2-SHA256); for object storage
    /// aes-256-gcm chunks. Needs a key. Default none.
    #[arg(
        long,
        visible_alias = "encrypt",
        value_name = "HOW",
        default_value = "none"
    )]
    encryption: String,
    /// The key: a LUKS image's passphrase (all of FILE, byte for byte), or an
    /// object-store disk's 32 raw bytes or 64 hex digits.
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// A LUKS image's passphrase, from the environment variable ENV.
    #[arg(long, value_name = "ENV", conflicts_with = "key_file")]
    key_secret: Option<String>,
    /// LUKS: milliseconds of PBKDF2 that opening the key slot costs (as cryptsetup's and
    /// qemu-img's iter-time; default 2000).
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    iter_time: u32,
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
    crate::outln!(
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
    )?;
    Ok(())
}

/// Runs `vdk create`.
pub fn create(args: CreateArgs) -> anyhow::Result<()> {
    if let Some(url) = args.file.to_str().filter(|f| crate::cloud::is_url(f)) {
        return create_cloud(url, &args);
    }
    if args.chunk_size.is_some() || args.compression != "none" {
        bail!("--chunk-size and --compression are for object-store disks (s3://...)");
    }
    let luks = match args.encryption.as_str() {
        "none" => false,
        "luks" => true,
        other => bail!("unknown --encrypt {other:?} for an image file: luks (or none)"),
    };
    let format = match args.format.as_deref() {
        Some(name) => Format::from_name(name)?,
        None => vdk_formats::format_by_name(&args.file).unwrap_or(Format::Qcow2),
    };
    let encrypt = match (luks || format == Format::Luks, format) {
        (false, _) => {
            if args.key_file.is_some() || args.key_secret.is_some() {
                bail!("a key goes with --encrypt luks (or an object-store disk's --encryption)");
            }
            None
        }
        (true, Format::Luks | Format::Raw | Format::Qcow2) => {
            let Some(secret) = crate::cloud::luks_secret_or_ask(
                args.key_file.as_deref(),
                args.key_secret.as_deref(),
                crate::cloud::Ask::New,
            )?
            else {
                bail!("--encrypt luks needs a passphrase: --key-file FILE or --key-secret ENV (or a terminal to type it)");
            };
            Some(vdk_formats::luks::CreateOptions {
                secret,
                iter_time_ms: args.iter_time,
            })
        }
        (true, other) => bail!(
            "vdk encrypts qcow2 images and raw LUKS images (-f luks); {other} images with \
             encryption are not supported"
        ),
    };
    // An encrypted raw image is a LUKS image; a qcow2 one stays qcow2 (encrypt.format=luks).
    let format = match (&encrypt, format) {
        (Some(_), Format::Raw) => Format::Luks,
        (_, f) => f,
    };
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
        encrypt,
    };
    vdk_formats::create(&args.file, size, &opts)
        .with_context(|| format!("cannot create {}", args.file.display()))?;
    // The size it has: a VHD's is rounded up to whole CHS geometry.
    let size = vdk_formats::info(&args.file, Some(format), false).map_or(size, |i| i.virtual_size);
    crate::outln!(
        "created {} ({format}, {})",
        args.file.display(),
        Human(size)
    )?;
    Ok(())
}

/// `vdk check`.
#[derive(Debug, Args)]
#[command(after_help = "\
Exit status, as qemu-img check: 0 consistent, 2 corruption found, 3 only leaked clusters.")]
pub struct CheckArgs {
    /// The image.
    file: PathBuf,
    /// Its format (raw, qcow2, vhd, vhdx, luks, iso); probed from its magic if not given.
    #[arg(long, short = 'f')]
    format: Option<String>,
    /// Rewrite refcounts that disagree with the tables (fixes leaks; and refcounts too low).
    #[arg(long, short = 'r')]
    repair: bool,
    /// Check the image even if a program has it open for writing (what it is writing may
    /// show as errors), as qemu-img's -U; not with --repair.
    #[arg(short = 'U', long, conflicts_with = "repair")]
    force_share: bool,
    #[command(flatten)]
    output: super::info::OutputArgs,
    #[command(flatten)]
    key: super::KeyArgs,
}

/// Runs `vdk check`; its exit status is qemu-img check's.
pub fn check(args: CheckArgs, paths: &Paths) -> anyhow::Result<ExitCode> {
    let format = args.format.as_deref().map(Format::from_name).transpose()?;
    if format.is_none() {
        // A file named as an image with a header that has none is damaged or misnamed:
        // either way not "consistent".
        let probed = vdk_formats::probe(&args.file)
            .with_context(|| format!("cannot check {}", args.file.display()))?;
        if let Err(e) = vdk_formats::check_named(&args.file, probed) {
            let named = vdk_formats::format_by_name(&args.file).map_or("?", Format::name);
            crate::outln!(
                "{}: not a {named} image: it holds {} (its header is damaged, or the file \
                 is not what its name says)",
                args.file.display(),
                vdk_formats::what_it_holds(probed)
            )?;
            tracing::debug!(error = %e, "named format and content disagree");
            return Ok(ExitCode::from(2));
        }
    }
    let report = vdk_formats::check(&args.file, format, args.repair, args.force_share)
        .with_context(|| format!("cannot check {}", args.file.display()))
        .map_err(|e| {
            super::name_holder(e, &args.file, paths, "; add -U to check it as it is now")
        })?;
    let Some(r) = report else {
        let format = match format {
            Some(f) => f,
            None => vdk_formats::probe(&args.file)?,
        };
        if format == Format::Raw || format == Format::Iso {
            crate::outln!(
                "{}: {format} images have no metadata to check",
                args.file.display()
            )?;
            return Ok(ExitCode::SUCCESS);
        }
        // Without a key the header is checked; a key is never asked for.
        let key = args.key.secret(crate::cloud::Ask::Never)?;
        if format == Format::Luks && key.is_none() {
            // The header and its checksums, without a key; with one, the key slot too.
            let s = vdk_formats::luks::summary(&args.file)
                .with_context(|| format!("{} is inconsistent", args.file.display()))?;
            crate::outln!(
                "No errors were found in the LUKS{} header (key slots {}); give --key-file \
                 to check that the passphrase opens it.",
                s.version,
                s.slots.join(", ")
            )?;
            return Ok(ExitCode::SUCCESS);
        }
        // VHD and VHDX: opening checks every header, table and checksum (and fails on any
        // inconsistency); there are no refcounts to compare.
        vdk_formats::open(
            &args.file,
            &vdk_formats::OpenOptions {
                format: Some(format),
                read_only: true,
                force_share: args.force_share,
                key,
                ..Default::default()
            },
        )
        .with_context(|| match format {
            // A LUKS header was checked above the key: what fails now is the key.
            Format::Luks => format!("cannot open {}", args.file.display()),
            _ => format!("{} is inconsistent", args.file.display()),
        })?;
        crate::outln!("No errors were found on the image.")?;
        return Ok(ExitCode::SUCCESS);
    };
    let left_leaks = r.leaks - r.leaks_fixed;
    let left_corruptions = r.corruptions - r.corruptions_fixed;
    if args.output.json() {
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
        crate::outln!("{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        for m in &r.messages {
            crate::outln!("{m}")?;
        }
        if r.leaks_fixed + r.corruptions_fixed > 0 {
            crate::outln!(
                "The following inconsistencies were found and repaired: {} leaked clusters, {} corruptions",
                r.leaks_fixed, r.corruptions_fixed
            )?;
        }
        if left_corruptions + r.errors > 0 {
            crate::outln!(
                "{} errors were found on the image.",
                left_corruptions + r.errors
            )?;
        }
        if left_leaks > 0 {
            crate::outln!("{left_leaks} leaked clusters were found on the image (space only: repair with --repair).")?;
        }
        if left_corruptions + r.errors + left_leaks == 0 {
            crate::outln!("No errors were found on the image.")?;
        }
        crate::outln!(
            "{}/{} = {:.2}% allocated clusters",
            r.allocated_clusters,
            r.total_clusters,
            100.0 * r.allocated_clusters as f64 / r.total_clusters.max(1) as f64
        )?;
        crate::outln!("Image end offset: {}", r.image_end_offset)?;
    }
    Ok(if left_corruptions + r.errors > 0 {
        ExitCode::from(2)
    } else if left_leaks > 0 {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

/// `vdk resize`.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  vdk resize disk.qcow2 +10G          grow by 10 GiB (the file system inside is not grown:
                                      resize2fs or xfs_growfs do that)
  vdk resize disk.img 2G --shrink     cut a raw image to 2 GiB (what lies past it is lost)
  vdk resize disk0 +1G                grow an open disk, and its block device with it; then
                                      resize2fs /dev/loop0 grows its mounted ext4 online")]
pub struct ResizeArgs {
    /// The image (raw or qcow2), not open elsewhere; or an open disk (its id or image),
    /// which only grows.
    file: PathBuf,
    /// The new size, +SIZE to grow by that much, or -SIZE to shrink by that much.
    #[arg(allow_hyphen_values = true)]
    size: String,
    /// Its format (raw, qcow2, vhd, vhdx, luks, iso); probed from its magic if not given.
    #[arg(long, short = 'f')]
    format: Option<String>,
    /// Allow the image to get smaller: raw images lose what lies past the new end; qcow2
    /// images only shrink when nothing is allocated there.
    #[arg(long)]
    shrink: bool,
    /// Print the result as JSON: for an open disk its status (the control API's `resize`
    /// answer), else the image, its format, old size and size.
    #[arg(long)]
    json: bool,
}

/// The new size that `spec` (SIZE, +SIZE or -SIZE) gives a disk of `size` bytes called
/// `what`.
fn new_size(spec: &str, size: u64, what: &str) -> anyhow::Result<u64> {
    let bad_size = |e: vdk_core::size::SizeError| anyhow::anyhow!("{e}");
    let new_size = if let Some(more) = spec.strip_prefix('+') {
        size.checked_add(parse_size(more).map_err(bad_size)?)
            .with_context(|| format!("{} + {more} is more than 16 EiB", Human(size)))?
    } else if let Some(less) = spec.strip_prefix('-') {
        let less = parse_size(less).map_err(bad_size)?;
        size.checked_sub(less)
            .with_context(|| format!("{what} is {}: it cannot lose {}", Human(size), Human(less)))?
    } else {
        parse_size(spec).map_err(bad_size)?
    };
    if new_size == 0 || !new_size.is_multiple_of(512) {
        bail!("the new size {new_size} must be a positive multiple of 512 bytes");
    }
    Ok(new_size)
}

/// The open disk `arg` names (its image, or its id), if a daemon runs and has it.
fn open_disk_named(arg: &std::path::Path, paths: &Paths) -> Option<crate::control::DiskStatus> {
    if arg.exists() {
        return super::open_disk(arg, paths);
    }
    let mut client = Client::connect(&paths.socket).ok()?;
    let disks: Vec<crate::control::DiskStatus> = client.call(&Request::List).ok()?.ok()?;
    disks.into_iter().find(|d| arg.as_os_str() == d.id.as_str())
}

/// Grows the open disk `d` through its daemon.
fn resize_open(
    args: &ResizeArgs,
    d: crate::control::DiskStatus,
    paths: &Paths,
) -> anyhow::Result<()> {
    let new_size = new_size(&args.size, d.size, &d.id)?;
    if new_size < d.size {
        bail!(
            "{} is open as disk {}: a disk shrinks only while closed (`vdk close {}` first)",
            args.file.display(),
            d.id,
            d.id
        );
    }
    let mut client = Client::connect(&paths.socket).context("cannot reach the vdk daemon")?;
    let req = Request::Resize(crate::control::ResizeRequest {
        disk: d.id.clone(),
        size: new_size,
    });
    let status: crate::control::DiskStatus = client
        .call(&req)
        .context("lost the connection to the vdk daemon")?
        .map_err(|e: crate::control::ApiError| anyhow::anyhow!(e.message))?;
    if args.json {
        return super::out::json(&status);
    }
    crate::outln!(
        "resized {} from {} to {}",
        status.id,
        Human(d.size),
        Human(status.size)
    )?;
    if let Some(dev) = &status.block_device {
        crate::outln!(
            "  block device  {} (grow its file system: resize2fs, xfs_growfs)",
            dev.display()
        )?;
    }
    if let (Some(sock), true) = (&status.vhost_user, status.vhost_user_connected) {
        crate::outln!(
            "  VM            on {} was told (grow its file system in the guest)",
            sock.display()
        )?;
    }
    Ok(())
}

/// Runs `vdk resize`.
pub fn resize(args: ResizeArgs, paths: &Paths) -> anyhow::Result<()> {
    let format = args.format.as_deref().map(Format::from_name).transpose()?;
    if let Some(d) = open_disk_named(&args.file, paths) {
        return resize_open(&args, d, paths);
    }
    let info = vdk_formats::info(&args.file, format, false)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let new_size = new_size(
        &args.size,
        info.virtual_size,
        &args.file.display().to_string(),
    )?;
    if new_size < info.virtual_size && !args.shrink {
        bail!(
            "{} would shrink from {} to {}: add --shrink if that is meant (what lies past the \
             new end is lost)",
            args.file.display(),
            Human(info.virtual_size),
            Human(new_size)
        );
    }
    refuse_if_loop_mounted(&args.file, None)?;
    vdk_formats::resize(&args.file, Some(info.format), new_size, args.shrink)
        .with_context(|| format!("cannot resize {}", args.file.display()))?;
    if args.json {
        return super::out::json(&serde_json::json!({
            "image": args.file,
            "format": info.format.to_string(),
            "old_size": info.virtual_size,
            "size": new_size,
        }));
    }
    crate::outln!(
        "resized {} from {} to {}",
        args.file.display(),
        Human(info.virtual_size),
        Human(new_size)
    )?;
    Ok(())
}

/// `vdk commit`, `vdk discard`.
#[derive(Debug, Args)]
pub struct OverlayArgs {
    /// An open cow disk (its id or overlay), done live by the daemon with the disk's requests
    /// paused; or the overlay file of a closed one (a qcow2 file recording its base).
    overlay: PathBuf,
    /// Even while a file system on the disk is mounted (it sees its disk change under it,
    /// which can damage it), or, for discard, an image that records no base.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    pub socket: crate::cli::SocketArg,
}

/// Asks a running daemon to commit (or discard) an open disk; `None` if no daemon knows it.
fn live(
    args: &OverlayArgs,
    paths: &Paths,
    discard: bool,
) -> anyhow::Result<Option<crate::control::CommitReport>> {
    let Ok(mut client) = Client::connect(&paths.socket) else {
        return Ok(None);
    };
    let req = OverlayRequest {
        disk: crate::cli::disks::disk_key(&args.overlay.to_string_lossy())?,
        force: args.force,
    };
    let req = if discard {
        Request::Discard(req)
    } else {
        Request::Commit(req)
    };
    match client.call(&req)? {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!(e.message)),
    }
}

/// Refuses to change `file` under a loop device someone has mounted, unless `force` is
/// `Some(true)` (`None`: the command has no --force).
fn refuse_if_loop_mounted(file: &std::path::Path, force: Option<bool>) -> anyhow::Result<()> {
    #[cfg(target_os = "linux")]
    let uses = crate::daemon::mount::loop_uses(file);
    // No loop devices elsewhere.
    #[cfg(not(target_os = "linux"))]
    let uses: Vec<String> = Vec::new();
    if uses.is_empty() || force == Some(true) {
        return Ok(());
    }
    bail!(
        "{} is in use by {}: unmount it first{}",
        file.display(),
        uses.join(", "),
        if force.is_some() {
            ", or add --force"
        } else {
            ""
        }
    )
}

/// Runs `vdk commit`.
pub fn commit(args: OverlayArgs) -> anyhow::Result<()> {
    let paths = &args.socket.paths()?;
    if let Some(v) = live(&args, paths, false)? {
        crate::outln!(
            "committed {} live: {} of data and {} of zeroes merged into the base; the overlay is empty",
            v.id,
            Human(v.data),
            Human(v.zeroed)
        )?;
        return Ok(());
    }
    refuse_if_loop_mounted(&args.overlay, Some(args.force))?;
    if let Ok(Some(base)) = vdk_filters::cow::base_of(&args.overlay) {
        refuse_if_loop_mounted(&base, Some(args.force))?;
    }
    let r = vdk_filters::cow::commit(&args.overlay)
        .with_context(|| format!("cannot commit {}", args.overlay.display()))?;
    crate::outln!(
        "committed {}: {} of data and {} of zeroes merged into the base; the overlay is empty",
        args.overlay.display(),
        Human(r.data),
        Human(r.zeroed)
    )?;
    Ok(())
}

/// Runs `vdk discard`.
pub fn discard(args: OverlayArgs) -> anyhow::Result<()> {
    let paths = &args.socket.paths()?;
    if let Some(v) = live(&args, paths, true)? {
        crate::outln!("discarded {} live: the disk reads as its base again", v.id)?;
        return Ok(());
    }
    refuse_if_loop_mounted(&args.overlay, Some(args.force))?;
    vdk_filters::cow::discard(&args.overlay, args.force)
        .with_context(|| format!("cannot discard {}", args.overlay.display()))?;
    crate::outln!(
        "discarded {}: the disk reads as its base again",
        args.overlay.display()
    )?;
    Ok(())
}

/// `vdk snapshot`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// An open cow disk (its id or overlay: switched live to the new overlay), or the overlay
    /// file of a closed one; it is not written any more after this. With --list: a qcow2
    /// image.
    overlay: PathBuf,
    /// The new overlay on top of it.
    #[arg(required_unless_present_any = ["list", "create", "apply", "delete"])]
    new: Option<PathBuf>,
    /// List the internal snapshots of a qcow2 image (as `qemu-img snapshot -l` does).
    #[arg(short = 'l', long, conflicts_with_all = ["new", "force", "create", "apply", "delete"])]
    list: bool,
    /// Take an internal snapshot NAME of a qcow2 image (`qemu-img snapshot -c`).
    #[arg(short = 'c', long, value_name = "NAME", conflicts_with_all = ["new", "apply", "delete"])]
    create: Option<String>,
    /// Make a qcow2 image what its snapshot NAME (or ID) holds again (`qemu-img snapshot -a`);
    /// what was written since is gone unless another snapshot keeps it.
    #[arg(short = 'a', long, value_name = "NAME", conflicts_with_all = ["new", "delete"])]
    apply: Option<String>,
    /// Delete the internal snapshot NAME (or ID) of a qcow2 image (`qemu-img snapshot -d`).
    #[arg(short = 'd', long, value_name = "NAME", conflicts_with = "new")]
    delete: Option<String>,
    /// With --list: print JSON (the objects of `qemu-img info --output=json`'s "snapshots").
    #[arg(long, requires = "list")]
    json: bool,
    /// Even while a file system on the disk is mounted.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    pub socket: crate::cli::SocketArg,
}

/// Runs `vdk snapshot`.
pub fn snapshot(args: SnapshotArgs) -> anyhow::Result<()> {
    if args.list {
        return list_snapshots(&args.overlay, args.json);
    }
    let edit = match (&args.create, &args.apply, &args.delete) {
        (Some(n), _, _) => Some(Edit::Create(n.clone())),
        (_, Some(n), _) => Some(Edit::Apply(n.clone())),
        (_, _, Some(n)) => Some(Edit::Delete(n.clone())),
        _ => None,
    };
    if let Some(edit) = edit {
        let img = &args.overlay;
        if matches!(edit, Edit::Apply(_)) {
            refuse_if_loop_mounted(img, Some(args.force))?;
        }
        let (before, after) = vdk_formats::edit_snapshots(img, &edit)
            .with_context(|| format!("cannot change the snapshots of {}", img.display()))?;
        let done = match &edit {
            Edit::Create(n) => format!("snapshot {n:?} taken"),
            Edit::Apply(n) if before != after => format!(
                "snapshot {n:?} applied: the disk reads as it did then, at its size then ({}, \
                 was {})",
                Human(after),
                Human(before)
            ),
            Edit::Apply(n) => format!("snapshot {n:?} applied: the disk reads as it did then"),
            Edit::Delete(n) => format!("snapshot {n:?} deleted"),
        };
        crate::outln!("{}: {done}", img.display())?;
        return Ok(());
    }
    let new = args.new.clone().unwrap_or_default(); // required without --list (clap)
    let paths = &args.socket.paths()?;
    if let Ok(mut client) = Client::connect(&paths.socket) {
        let req = Request::Snapshot(crate::control::SnapshotRequest {
            disk: crate::cli::disks::disk_key(&args.overlay.to_string_lossy())?,
            new: std::path::absolute(&new)?,
            force: args.force,
        });
        match client.call::<crate::control::SnapshotReport>(&req)? {
            Ok(v) => {
                crate::outln!(
                    "{} now writes to {}, on top of {}",
                    v.id,
                    new.display(),
                    args.overlay.display()
                )?;
                return Ok(());
            }
            Err(e) if e.kind == ErrorKind::NotFound => {}
            Err(e) => anyhow::bail!(e.message),
        }
    }
    refuse_if_loop_mounted(&args.overlay, Some(args.force))?;
    vdk_filters::cow::snapshot(&args.overlay, &new)
        .with_context(|| format!("cannot make {}", new.display()))?;
    crate::outln!(
        "{} now sits on {}: serve it as an image (vdk serve {})",
        new.display(),
        args.overlay.display(),
        new.display()
    )?;
    Ok(())
}

/// `vdk snapshot --list`: a qcow2 image's internal snapshots.
fn list_snapshots(image: &Path, json: bool) -> anyhow::Result<()> {
    let snaps = vdk_formats::snapshots(image, None)
        .with_context(|| format!("cannot list the snapshots of {}", image.display()))?;
    if json {
        let v: Vec<serde_json::Value> = snaps
            .iter()
            .map(|s| {
                let mut o = serde_json::json!({
                    "id": s.id,
                    "name": s.name,
                    "vm-state-size": s.vm_state_size,
                    "date-sec": s.date_sec,
                    "date-nsec": s.date_nsec,
                    "vm-clock-sec": s.vm_clock_nsec / 1_000_000_000,
                    "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
                });
                if let Some(c) = s.icount {
                    o["icount"] = c.into();
                }
                o
            })
            .collect();
        return super::out::json(&v);
    }
    if snaps.is_empty() {
        crate::outln!("{}: no internal snapshots", image.display())?;
        return Ok(());
    }
    crate::outln!("Snapshot list:")?;
    crate::outln!(
        "{:<10}{:<18}{:>10} {:<20} {:>15}",
        "ID",
        "TAG",
        "VM SIZE",
        "DATE",
        "VM CLOCK"
    )?;
    for s in &snaps {
        let date = chrono_like(s.date_sec);
        let clock = s.vm_clock_nsec;
        let (h, m) = (clock / 3_600_000_000_000, clock / 60_000_000_000 % 60);
        let (sec, ms) = (clock / 1_000_000_000 % 60, clock / 1_000_000 % 1000);
        crate::outln!(
            "{:<10}{:<18}{:>10} {:<20} {:>15}",
            s.id,
            s.name,
            Human(s.vm_state_size).to_string(),
            date,
            format!("{h:02}:{m:02}:{sec:02}.{ms:03}")
        )?;
    }
    Ok(())
}

/// `YYYY-MM-DD HH:MM:SS` in UTC for seconds since the epoch (civil calendar arithmetic).
fn chrono_like(secs: u32) -> String {
    let secs = u64::from(secs);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm, in unsigned form).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}
