//! `vdk open`, `close`, `list`, `mount`, `unmount`: clients of the daemon.

use std::io;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use vdk_core::size::{parse_size, Human};

use crate::control::{
    ApiError, Client, CloseRequest, DiskStatus, InsertRequest, MountRequest, OpenRequest, Request,
};
use crate::paths::Paths;

/// Connects to the daemon; with `start`, starts one in the background if none runs.
pub(super) fn connect(paths: &Paths, start: bool) -> anyhow::Result<Client> {
    match try_connect(paths)? {
        Some(c) => Ok(c),
        None if start => start_daemon(paths),
        None => bail!(
            "no vdk daemon is running on {} (nothing is open)",
            paths.socket.display()
        ),
    }
}

/// Connects to the daemon; `None` if none runs (no socket, or one a dead daemon left).
pub(super) fn try_connect(paths: &Paths) -> anyhow::Result<Option<Client>> {
    match Client::connect(&paths.socket) {
        Ok(c) => Ok(Some(c)),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(anyhow!(e).context(format!(
            "cannot reach the vdk daemon on {}",
            paths.socket.display()
        ))),
    }
}

/// Starts `vdk daemon` in the background and waits until it answers.
fn start_daemon(paths: &Paths) -> anyhow::Result<Client> {
    super::daemon::start(paths)
}

/// Sends one request and reads its answer as `T`; an error answer becomes the command's error.
pub(super) fn call<T: serde::de::DeserializeOwned>(
    client: &mut Client,
    req: &Request,
) -> anyhow::Result<T> {
    client
        .call(req)
        .context("lost the connection to the vdk daemon")?
        .map_err(|e: ApiError| anyhow!(e.message))
}

/// Sends `req` to the daemon (started first if `start`, else it must run). With `json` the
/// answer is printed as it is and `None` returned; else it is returned for the command to
/// word.
pub(super) fn ask<T: serde::de::DeserializeOwned + serde::Serialize>(
    socket: &crate::cli::SocketArg,
    start: bool,
    req: &Request,
    json: bool,
) -> anyhow::Result<Option<T>> {
    let mut client = connect(&socket.paths()?, start)?;
    let answer: T = call(&mut client, req)?;
    if json {
        print_json(&answer)?;
        return Ok(None);
    }
    Ok(Some(answer))
}

pub(super) fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("bad path {}", p.display()))
}

pub(super) fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    super::out::json(v)
}

/// `vdk open`.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  vdk open disk.img                       open it (or create a 100 MiB one) as /dev/loopN
  vdk open data.qcow2 2G --mkfs ext4 --mount /mnt/data   a new qcow2 image, formatted, mounted
  vdk open data.qcow2 --mount /mnt/data   the same disk again
  vdk open golden.img --read-only --attach none   NBD only, no block device
  vdk open movie.iso --mount /mnt/movie   a CD-ROM, its files through the ISO browser
  vdk open s3://bucket/disks/web 10G --mkfs ext4 --mount /mnt/web")]
pub struct OpenArgs {
    /// The image, or an s3://, gs://, az:// or file:// URL of a disk in object storage;
    /// created if it does not exist, in the format its name says (.qcow2, .vhd, .vhdx; raw
    /// otherwise).
    file: PathBuf,
    /// Size of a new image (e.g. 10G; default 100M).
    size: Option<String>,
    /// Do not create the image if it does not exist (fail instead), as losetup.
    #[arg(long)]
    no_create: bool,
    /// Open read-only (the block device and the NBD export refuse writes).
    #[arg(long)]
    read_only: bool,
    /// Image format: raw, qcow2, vhd, vhdx, luks or iso; probed from its first bytes when not
    /// given (a file named .qcow2, .vhd or .vhdx that holds no such header is refused for
    /// writing unless its format is given).
    #[arg(long, short = 'f')]
    format: Option<String>,
    /// Mount the disk's file system on DIR (created if missing); an ISO's files through the
    /// ISO browser. On Windows: a drive letter (E:) given to the disk's partition.
    #[arg(long, value_name = "DIR")]
    mount: Option<PathBuf>,
    /// Format the disk first: ext4, xfs or vfat (Windows: ntfs, exfat, fat32 or refs). Only
    /// a new or blank disk (all zeroes or unallocated) unless --force.
    #[arg(long, value_name = "TYPE")]
    mkfs: Option<String>,
    /// With --mkfs: format even a disk that holds data (it is erased).
    #[arg(long, requires = "mkfs")]
    force: bool,
    /// How the kernel sees the disk: auto (the default for root: ublk if the kernel has it,
    /// else fuse-loop), ublk (a /dev/ublkbN that survives a daemon crash), fuse-loop (a
    /// /dev/loopN), or none (NBD only, the default for other users). On Windows: iscsi (the
    /// default; Windows' own initiator logged in to the disk's LUN, as Administrator) or none.
    #[arg(long, value_name = "MODE")]
    attach: Option<String>,
    /// NBD export name (default: the disk's id).
    #[arg(long, value_name = "NAME")]
    export_name: Option<String>,
    /// Probe the format of backing files whose parent does not record it.
    #[arg(long)]
    probe_backing: bool,
    /// A filter over the image, NAME[:KEY=VALUE,...]: cow, cache, readonly, stats, error,
    /// delay, partition, rate, blocksize (docs/filters.md). Repeatable, applied in order.
    #[arg(long = "filter", value_name = "SPEC")]
    filters: Vec<String>,
    /// Also serve the disk over iSCSI, as a LUN of a target (a CD-ROM LUN for an ISO).
    #[arg(long)]
    iscsi: bool,
    /// The iSCSI target's name (default: iqn.2026-11.org.vdk:ID); disks opened with the
    /// same name are LUNs of one target.
    #[arg(long, value_name = "IQN", requires = "iscsi")]
    iscsi_target: Option<String>,
    /// The LUN (default: the lowest free one of the target).
    #[arg(long, value_name = "N", requires = "iscsi")]
    iscsi_lun: Option<u16>,
    /// Also serve the disk to a VM as a vhost-user-blk device on this Unix socket (QEMU:
    /// -chardev socket,path=PATH -device vhost-user-blk-pci; docs/vhost-user.md).
    #[arg(long, value_name = "PATH")]
    vhost_user: Option<PathBuf>,
    /// Only these NBD clients may see and open the disk's export: ADDR[/PREFIX], unix or
    /// cert:NAME (a verified TLS client certificate's name). Repeatable; default: any.
    #[arg(long = "allow", value_name = "RULE")]
    allow: Vec<String>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    cloud: crate::cloud::CloudArgs,
    #[command(flatten)]
    pub socket: crate::cli::SocketArg,
}

/// Runs `vdk open`.
pub fn open(args: OpenArgs) -> anyhow::Result<()> {
    let paths = &args.socket.paths()?;
    let size = args
        .size
        .as_deref()
        .map(|s| parse_size(s).with_context(|| format!("bad size {s:?}")))
        .transpose()?;
    let is_url = args.file.to_str().is_some_and(crate::cloud::is_url);
    let req = Request::Open(Box::new(OpenRequest {
        path: if is_url {
            args.file.clone()
        } else {
            absolute(&args.file)?
        },
        cloud: if is_url {
            // The daemon reaches the store with this command's settings and credentials.
            crate::control::CloudOptions {
                env: Some(vdk_objstore::StoreEnv::current()),
                ..args.cloud.options()?
            }
        } else {
            // An image file's key is a LUKS passphrase (below), not an object-store key.
            crate::control::CloudOptions {
                key_file: None,
                ..args.cloud.options()?
            }
        },
        key_file: if is_url {
            None
        } else {
            args.cloud.key_file.as_deref().map(absolute).transpose()?
        },
        key_secret: match args.cloud.key_secret.as_deref() {
            Some(name) => Some(
                std::env::var(name)
                    .map(crate::control::Redacted)
                    .map_err(|_| anyhow!("--key-secret {name}: no such environment variable"))?,
            ),
            // An encrypted image and no key given: typed at a prompt, on a terminal.
            None if !is_url && args.cloud.key_file.is_none() && args.file.exists() => {
                crate::cloud::ask_passphrase(crate::cloud::Ask::IfEncrypted(&args.file))?
                    .map(crate::control::Redacted)
            }
            None => None,
        },
        size,
        read_only: args.read_only,
        format: args.format,
        attach: args
            .attach
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|e: String| anyhow!(e))?,
        mkfs: args.mkfs,
        force: args.force,
        no_create: args.no_create,
        // (A drive letter on Windows, as it is.)
        mount: if cfg!(windows) {
            args.mount.clone()
        } else {
            args.mount.as_deref().map(absolute).transpose()?
        },
        export_name: args.export_name,
        allow: args.allow,
        probe_backing: args.probe_backing,
        filters: args
            .filters
            .iter()
            .map(|f| absolute_overlay(f))
            .collect::<anyhow::Result<_>>()?,
        iscsi: args.iscsi,
        iscsi_target: args.iscsi_target,
        iscsi_lun: args.iscsi_lun,
        vhost_user: args.vhost_user.as_deref().map(absolute).transpose()?,
    }));
    let mut client = connect(paths, true)?;
    let status: DiskStatus = call(&mut client, &req)?;
    if args.json {
        return print_json(&status);
    }
    let mode = if status.read_only {
        "read-only"
    } else {
        "read-write"
    };
    crate::outln!(
        "opened {}: {} ({}, {}, {mode})",
        status.id,
        status.image.display(),
        Human(status.size),
        status.format
    )?;
    if let Some(dev) = &status.block_device {
        crate::outln!("  block device  {}", dev.display())?;
    }
    if let Some(dir) = &status.mount {
        crate::outln!("  mounted on    {}", dir.display())?;
    }
    print_uris(&status)?;
    Ok(())
}

fn print_uris(status: &DiskStatus) -> anyhow::Result<()> {
    for uri in &status.nbd {
        crate::outln!("  nbd           {uri}")?;
    }
    for uri in &status.iscsi {
        crate::outln!("  iscsi         {uri}")?;
    }
    if let Some(path) = &status.vhost_user {
        crate::outln!("  vhost-user    {}", path.display())?;
    }
    Ok(())
}

/// `vdk insert`.
#[derive(Debug, Args)]
pub struct InsertArgs {
    /// The CD-ROM disk: its id or its image file.
    disk: String,
    /// The new disc: an ISO image.
    image: PathBuf,
    /// Print the disk as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pub socket: crate::cli::SocketArg,
}

/// `vdk eject`.
#[derive(Debug, Args)]
pub struct EjectArgs {
    /// The CD-ROM disk: its id or its image file.
    disk: String,
    /// Eject even if an iSCSI initiator prevents medium removal.
    #[arg(long)]
    force: bool,
    /// Print the disk as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pub socket: crate::cli::SocketArg,
}

/// Runs `vdk eject`.
pub fn eject(args: EjectArgs) -> anyhow::Result<()> {
    let req = Request::Eject(CloseRequest {
        disk: disk_key(&args.disk)?,
        force: args.force,
    });
    let Some(status) = ask::<DiskStatus>(&args.socket, false, &req, args.json)? else {
        return Ok(());
    };
    crate::outln!("ejected the disc of {}", status.id)?;
    Ok(())
}

/// Runs `vdk insert`.
pub fn insert(args: InsertArgs) -> anyhow::Result<()> {
    let req = Request::Insert(InsertRequest {
        disk: disk_key(&args.disk)?,
        image: absolute(&args.image)?,
    });
    let Some(status) = ask::<DiskStatus>(&args.socket, false, &req, args.json)? else {
        return Ok(());
    };
    crate::outln!(
        "inserted {} in {} ({})",
        status.image.display(),
        status.id,
        Human(status.size)
    )?;
    if let Some(dev) = &status.block_device {
        crate::outln!("  block device  {}", dev.display())?;
    }
    print_uris(&status)?;
    Ok(())
}

/// A cow spec's overlay path made absolute: the daemon does not share this command's
/// working directory.
fn absolute_overlay(spec: &str) -> anyhow::Result<String> {
    let Some(args) = spec.strip_prefix("cow:") else {
        return Ok(spec.to_owned());
    };
    let mut out = Vec::new();
    for a in args.split(',') {
        match a.strip_prefix("overlay=") {
            Some(p) => out.push(format!("overlay={}", absolute(Path::new(p))?.display())),
            None => out.push(a.to_owned()),
        }
    }
    Ok(format!("cow:{}", out.join(",")))
}

/// `vdk close`.
#[derive(Debug, Args)]
pub struct CloseArgs {
    /// The disk: its id (see vdk list) or its image file.
    disk: String,
    /// Close even if its mount is busy: it is detached lazily and whatever still uses it
    /// gets I/O errors, as from a disk pulled out.
    #[arg(long)]
    force: bool,
    /// Print the disk as it was, as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pub socket: crate::cli::SocketArg,
}

/// What a disk argument names: an id, or an image path made absolute.
pub(crate) fn disk_key(arg: &str) -> anyhow::Result<String> {
    let p = Path::new(arg);
    if p.exists() {
        let p = crate::paths::canonical(p).unwrap_or(absolute(p)?);
        return Ok(p.to_string_lossy().into_owned());
    }
    Ok(arg.to_owned())
}

/// Runs `vdk close`.
pub fn close(args: CloseArgs) -> anyhow::Result<()> {
    let req = Request::Close(CloseRequest {
        disk: disk_key(&args.disk)?,
        force: args.force,
    });
    let Some(status) = ask::<DiskStatus>(&args.socket, false, &req, args.json)? else {
        return Ok(());
    };
    crate::outln!("closed {}: {}", status.id, status.image.display())?;
    Ok(())
}

/// `vdk set`.
#[derive(Debug, Args)]
pub struct SetArgs {
    /// The disk: its id or its image file.
    disk: String,
    /// What to change: rate:KEY=VALUE,... (bps, read-bps, write-bps, iops, read-iops,
    /// write-iops, burst; 0 or off lifts a limit; keys not named keep their values), or
    /// rate=BYTES_PER_SECOND.
    #[arg(required = true, value_name = "SETTING")]
    settings: Vec<String>,
    /// Print the disk as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pub socket: crate::cli::SocketArg,
}

/// Runs `vdk set`.
pub fn set(args: SetArgs) -> anyhow::Result<()> {
    let req = Request::Set(crate::control::SetRequest {
        disk: disk_key(&args.disk)?,
        settings: args.settings,
    });
    let Some(status) = ask::<DiskStatus>(&args.socket, false, &req, args.json)? else {
        return Ok(());
    };
    crate::outln!("{}: {}", status.id, status.filters.join(" "))?;
    Ok(())
}

/// `vdk mount`.
#[derive(Debug, Args)]
pub struct MountArgs {
    /// The disk: its id or its image file.
    disk: String,
    /// Where to mount it (created if missing).
    dir: PathBuf,
    /// Format it first: ext4, xfs or vfat. Only a blank disk (all zeroes or unallocated)
    /// unless --force.
    #[arg(long, value_name = "TYPE")]
    mkfs: Option<String>,
    /// With --mkfs: format even a disk that holds data (it is erased).
    #[arg(long, requires = "mkfs")]
    force: bool,
    /// Print the disk as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pub socket: crate::cli::SocketArg,
}

/// Runs `vdk mount`.
pub fn mount(args: MountArgs) -> anyhow::Result<()> {
    let req = Request::Mount(MountRequest {
        disk: disk_key(&args.disk)?,
        dir: absolute(&args.dir)?,
        mkfs: args.mkfs,
        force: args.force,
    });
    let Some(status) = ask::<DiskStatus>(&args.socket, false, &req, args.json)? else {
        return Ok(());
    };
    if let Some(dir) = &status.mount {
        crate::outln!("mounted {} on {}", status.id, dir.display())?;
    }
    Ok(())
}

/// Runs `vdk unmount`.
pub fn unmount(args: CloseArgs) -> anyhow::Result<()> {
    let req = Request::Unmount(CloseRequest {
        disk: disk_key(&args.disk)?,
        force: args.force,
    });
    let Some(status) = ask::<DiskStatus>(&args.socket, false, &req, args.json)? else {
        return Ok(());
    };
    crate::outln!("unmounted {}", status.id)?;
    Ok(())
}
