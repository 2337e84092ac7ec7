//! `vdk open`, `close`, `list`, `mount`, `unmount`: clients of the daemon.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use vdk_core::size::{parse_size, Human};

use crate::control::{
    ApiError, Client, CloseRequest, DiskStatus, FsMapRequest, FsMountRequest, FsStatus,
    FsUnmountRequest, InsertRequest, MountRequest, OpenRequest, Request, VersionInfo,
};
use crate::daemon::Paths;

/// Longest wait for a daemon started in the background to answer.
const START_TIMEOUT: Duration = Duration::from_secs(15);

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

/// Starts `vdk daemon` in the background, logging to `daemon.log` beside its socket, and
/// waits until it answers.
fn start_daemon(paths: &Paths) -> anyhow::Result<Client> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&paths.dir)
        .with_context(|| format!("cannot create {}", paths.dir.display()))?;
    let log = super::log::open_log(&paths.log)
        .with_context(|| format!("cannot write the daemon log {}", paths.log.display()))?;
    let exe = std::env::current_exe().context("cannot find the vdk executable")?;
    let mut child = Command::new(exe)
        .arg("daemon")
        .arg("--socket")
        .arg(&paths.socket)
        .arg("--log")
        .arg(&paths.log)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C meant for this command does not reach it.
        .process_group(0)
        .spawn()
        .context("cannot start the vdk daemon")?;
    let started = Instant::now();
    loop {
        if let Ok(mut c) = Client::connect(&paths.socket) {
            // What the new daemon found a dead one had left mounted, the user hears of.
            if let Ok(Ok(v)) = c.call::<VersionInfo>(&Request::Version) {
                for note in &v.recovered {
                    let _ = writeln!(io::stderr(), "vdk: {note}");
                }
            }
            return Ok(c);
        }
        if let Some(status) = child.try_wait()? {
            // Another `vdk open` may have started a daemon at the same moment, and this one
            // found the socket taken: use that one once it answers.
            let raced = Instant::now();
            while raced.elapsed() < Duration::from_secs(2) {
                if let Ok(c) = Client::connect(&paths.socket) {
                    return Ok(c);
                }
                thread::sleep(Duration::from_millis(50));
            }
            let log = fs::read_to_string(&paths.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "the vdk daemon exited at once ({status}); its log {} ends:\n{}",
                paths.log.display(),
                tail.join("\n")
            );
        }
        if started.elapsed() > START_TIMEOUT {
            bail!(
                "the vdk daemon did not answer within {}s; see {}",
                START_TIMEOUT.as_secs(),
                paths.log.display()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
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

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("bad path {}", p.display()))
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
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
    /// Image format: raw, qcow2, vhd, vhdx or iso; probed from its first bytes when not
    /// given (a file named .qcow2, .vhd or .vhdx that holds no such header is refused for
    /// writing unless its format is given).
    #[arg(long, short = 'f')]
    format: Option<String>,
    /// Mount the disk's file system on DIR (created if missing); an ISO's files through the
    /// ISO browser.
    #[arg(long, value_name = "DIR")]
    mount: Option<PathBuf>,
    /// Format the disk first: ext4, xfs or vfat. Only a new or blank disk (all zeroes or
    /// unallocated) unless --force.
    #[arg(long, value_name = "TYPE")]
    mkfs: Option<String>,
    /// With --mkfs: format even a disk that holds data (it is erased).
    #[arg(long, requires = "mkfs")]
    force: bool,
    /// How the kernel sees the disk: fuse-loop (a /dev/loopN; needs root, the default for
    /// root) or none (NBD only, the default for other users).
    #[arg(long, value_name = "MODE")]
    attach: Option<String>,
    /// NBD export name (default: the disk's id).
    #[arg(long, value_name = "NAME")]
    export_name: Option<String>,
    /// Probe the format of backing files whose parent does not record it.
    #[arg(long)]
    probe_backing: bool,
    /// A filter over the image, NAME[:KEY=VALUE,...]: cow, cache, readonly, stats, error,
    /// delay, partition (docs/filters.md). Repeatable, applied in order.
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
            args.cloud.options()?
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
        mount: args.mount.as_deref().map(absolute).transpose()?,
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
    let paths = &args.socket.paths()?;
    let mut client = connect(paths, false)?;
    let req = Request::Eject(CloseRequest {
        disk: disk_key(&args.disk)?,
        force: args.force,
    });
    let status: DiskStatus = call(&mut client, &req)?;
    if args.json {
        return print_json(&status);
    }
    crate::outln!("ejected the disc of {}", status.id)?;
    Ok(())
}

/// Runs `vdk insert`.
pub fn insert(args: InsertArgs) -> anyhow::Result<()> {
    let paths = &args.socket.paths()?;
    let mut client = connect(paths, false)?;
    let req = Request::Insert(InsertRequest {
        disk: disk_key(&args.disk)?,
        image: absolute(&args.image)?,
    });
    let status: DiskStatus = call(&mut client, &req)?;
    if args.json {
        return print_json(&status);
    }
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
        let p = fs::canonicalize(p).unwrap_or(absolute(p)?);
        return Ok(p.to_string_lossy().into_owned());
    }
    Ok(arg.to_owned())
}

/// Runs `vdk close`.
pub fn close(args: CloseArgs) -> anyhow::Result<()> {
    let paths = &args.socket.paths()?;
    let mut client = connect(paths, false)?;
    let req = Request::Close(CloseRequest {
        disk: disk_key(&args.disk)?,
        force: args.force,
    });
    let status: DiskStatus = call(&mut client, &req)?;
    if args.json {
        return print_json(&status);
    }
    crate::outln!("closed {}: {}", status.id, status.image.display())?;
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
    let paths = &args.socket.paths()?;
    let mut client = connect(paths, false)?;
    let req = Request::Mount(MountRequest {
        disk: disk_key(&args.disk)?,
        dir: absolute(&args.dir)?,
        mkfs: args.mkfs,
        force: args.force,
    });
    let status: DiskStatus = call(&mut client, &req)?;
    if args.json {
        return print_json(&status);
    }
    if let Some(dir) = &status.mount {
        crate::outln!("mounted {} on {}", status.id, dir.display())?;
    }
    Ok(())
}

/// Runs `vdk unmount`.
pub fn unmount(args: CloseArgs) -> anyhow::Result<()> {
    let paths = &args.socket.paths()?;
    let mut client = connect(paths, false)?;
    let req = Request::Unmount(CloseRequest {
        disk: disk_key(&args.disk)?,
        force: args.force,
    });
    let status: DiskStatus = call(&mut client, &req)?;
    if args.json {
        return print_json(&status);
    }
    crate::outln!("unmounted {}", status.id)?;
    Ok(())
}

/// Runs `vdk daemon --stop`.
pub fn stop_daemon(paths: &Paths) -> anyhow::Result<()> {
    let mut client = connect(paths, false)?;
    call::<serde_json::Value>(&mut client, &Request::Shutdown)?;
    // The daemon closes its disks, then its socket: wait for that, so that a script can
    // rely on everything being closed when this returns.
    let started = Instant::now();
    while paths.socket.exists() {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the vdk daemon is still running after 60s");
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// `vdk fs`: file systems in user space, run by the daemon.
#[derive(Debug, clap::Subcommand)]
pub enum FsCommand {
    /// Mount the ISO 9660 file system (Joliet, Rock Ridge, El Torito) of an image (an ISO,
    /// or an ISO inside any image vdk reads) or of an open disk, read-only, on DIR.
    Mount(FsMountArgs),
    /// Unmount a file system mounted with `vdk fs mount`.
    Unmount(FsUnmountArgs),
    /// Map a cloud drive: the objects and prefixes under a bucket's prefix as the files and
    /// folders of DIR. Reads fetch what they need into the cache; a file written is uploaded
    /// when closed or synced.
    Map(FsMapArgs),
    /// Unmap a cloud drive (uploading what is not uploaded yet).
    Unmap(FsUnmountArgs),
    /// List the file systems mounted with `vdk fs mount` and the drives mapped with `vdk fs
    /// map`.
    List(super::list::FsListArgs),
}

/// `vdk fs map`.
#[derive(Debug, Args)]
pub struct FsMapArgs {
    /// The bucket and prefix: s3://BUCKET[/PREFIX], gs://, az://, file:///DIR.
    url: String,
    /// Where to mount it (created if missing).
    dir: PathBuf,
    /// A name for the drive (default: a new UUID), shown by `vdk fs list`.
    #[arg(long, value_name = "NAME")]
    label: Option<String>,
    /// The cache directory (default: drives/LABEL in the daemon's directory).
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// Let every local user read the drive (files 0644, folders 0755). By default its files
    /// are yours alone (0600, 0700), whoever runs the daemon.
    #[arg(long)]
    allow_other: bool,
    #[command(flatten)]
    store: crate::cloud::StoreArgs,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pub socket: crate::cli::SocketArg,
}

/// `vdk fs mount`.
#[derive(Debug, Args)]
pub struct FsMountArgs {
    /// An image file, or an open disk (its id or image).
    source: String,
    /// Where to mount it (created if missing).
    dir: PathBuf,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pub socket: crate::cli::SocketArg,
}

/// `vdk fs unmount`.
#[derive(Debug, Args)]
pub struct FsUnmountArgs {
    /// The mount point.
    dir: PathBuf,
    /// Detach it even if busy (it goes when its last user lets go).
    #[arg(long)]
    force: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pub socket: crate::cli::SocketArg,
}

/// Runs `vdk fs ...`.
pub fn fs(cmd: FsCommand) -> anyhow::Result<()> {
    match cmd {
        FsCommand::Mount(a) => {
            let paths = &a.socket.paths()?;
            let mut client = connect(paths, true)?;
            let req = Request::FsMount(FsMountRequest {
                source: disk_key(&a.source)?,
                dir: absolute(&a.dir)?,
            });
            let st: FsStatus = call(&mut client, &req)?;
            if a.json {
                return print_json(&st);
            }
            crate::outln!(
                "mounted {} ({}, {} names, label {:?}) on {}",
                st.source,
                Human(st.size),
                st.names,
                st.label,
                st.dir.display()
            )?;
        }
        FsCommand::Map(a) => {
            let paths = &a.socket.paths()?;
            let mut client = connect(paths, true)?;
            let req = Request::FsMap(FsMapRequest {
                url: a.url,
                dir: absolute(&a.dir)?,
                label: a.label,
                cache: a.cache.as_deref().map(absolute).transpose()?,
                endpoint: a.store.s3_endpoint,
                region: a.store.s3_region,
                env: Some(vdk_objstore::StoreEnv::current()),
                allow_other: a.allow_other,
            });
            let st: FsStatus = call(&mut client, &req)?;
            if a.json {
                return print_json(&st);
            }
            crate::outln!(
                "mapped {} on {} (label {}, cache {})",
                st.source,
                st.dir.display(),
                st.label,
                st.cache.as_deref().unwrap_or(Path::new("-")).display()
            )?;
        }
        FsCommand::Unmount(a) | FsCommand::Unmap(a) => {
            let paths = &a.socket.paths()?;
            let dir = absolute(&a.dir)?;
            let Some(mut client) = try_connect(paths)? else {
                // No daemon: a mount a dead one left can still be taken away.
                if crate::daemon::recover::is_stale_fuse(&dir) {
                    rustix::mount::unmount(&dir, rustix::mount::UnmountFlags::DETACH)
                        .with_context(|| format!("cannot detach {}", dir.display()))?;
                    return crate::outln!(
                        "detached {}: a stale mount (the vdk daemon that served it had died)",
                        dir.display()
                    );
                }
                bail!(
                    "no vdk daemon is running on {} (nothing is mounted by vdk)",
                    paths.socket.display()
                );
            };
            let req = Request::FsUnmount(FsUnmountRequest {
                dir: absolute(&a.dir)?,
                force: a.force,
            });
            let st: FsStatus = call(&mut client, &req)?;
            if a.json {
                return print_json(&st);
            }
            match st.kind.as_str() {
                "stale" => crate::outln!(
                    "detached {}: a stale mount (the vdk daemon that served it had died)",
                    st.dir.display()
                )?,
                "cloud-drive" => crate::outln!("unmapped {}", st.dir.display())?,
                _ => crate::outln!("unmounted {}", st.dir.display())?,
            }
        }
        FsCommand::List(a) => {
            let paths = &a.socket.paths()?;
            let list: Vec<FsStatus> = match try_connect(paths)? {
                Some(mut client) => call(&mut client, &Request::FsList)?,
                None => Vec::new(),
            };
            if a.json {
                return print_json(&list);
            }
            if list.is_empty() {
                if !a.no_headers {
                    crate::outln!("no file systems mounted")?;
                }
            } else {
                super::list::print_filesystems(&list, a.no_headers)?;
            }
        }
    }
    Ok(())
}
