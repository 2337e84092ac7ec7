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
    FsUnmountRequest, InsertRequest, MountRequest, OpenRequest, Request,
};
use crate::daemon::Paths;

/// Longest wait for a daemon started in the background to answer.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Connects to the daemon; with `start`, starts one in the background if none runs.
fn connect(paths: &Paths, start: bool) -> anyhow::Result<Client> {
    match Client::connect(&paths.socket) {
        Ok(c) => return Ok(c),
        Err(e)
            if start
                && matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            bail!(
                "no vdk daemon is running on {} (nothing is open)",
                paths.socket.display()
            )
        }
        Err(e) => {
            return Err(anyhow!(e).context(format!(
                "cannot reach the vdk daemon on {}",
                paths.socket.display()
            )))
        }
    }
    start_daemon(paths)
}

/// Starts `vdk daemon` in the background, logging to `daemon.log` beside its socket, and
/// waits until it answers.
fn start_daemon(paths: &Paths) -> anyhow::Result<Client> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&paths.dir)
        .with_context(|| format!("cannot create {}", paths.dir.display()))?;
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&paths.log)
        .with_context(|| format!("cannot write the daemon log {}", paths.log.display()))?;
    let exe = std::env::current_exe().context("cannot find the vdk executable")?;
    let mut child = Command::new(exe)
        .arg("daemon")
        .arg("--socket")
        .arg(&paths.socket)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C meant for this command does not reach it.
        .process_group(0)
        .spawn()
        .context("cannot start the vdk daemon")?;
    let started = Instant::now();
    loop {
        if let Ok(c) = Client::connect(&paths.socket) {
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

/// Sends one request; an error answer becomes the command's error.
fn call(client: &mut Client, req: &Request) -> anyhow::Result<serde_json::Value> {
    client
        .call(req)
        .context("lost the connection to the vdk daemon")?
        .map_err(|e: ApiError| anyhow!(e.message))
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("bad path {}", p.display()))
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

/// `vdk open`.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  vdk open disk.img                       open it (or create a 100 MiB one) as /dev/loopN
  vdk open data.img 2G --mkfs ext4 --mount /mnt/data
  vdk open golden.img --read-only --attach none   NBD only, no block device")]
pub struct OpenArgs {
    /// The image; created if it does not exist.
    file: PathBuf,
    /// Size of a new image (e.g. 10G; default 100M).
    size: Option<String>,
    /// Open read-only (the block device and the NBD export refuse writes).
    #[arg(long)]
    read_only: bool,
    /// Image format (raw); probed from its first bytes when not given.
    #[arg(long)]
    format: Option<String>,
    /// Mount the disk's file system on DIR (created if missing).
    #[arg(long, value_name = "DIR")]
    mount: Option<PathBuf>,
    /// Format a new image first: ext4, xfs or vfat.
    #[arg(long, value_name = "TYPE")]
    mkfs: Option<String>,
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
    /// A filter over the image, NAME[:KEY=VALUE,...]: readonly, stats, error, delay,
    /// partition. Repeatable, applied in order.
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
}

/// Runs `vdk open`.
pub fn open(args: OpenArgs, paths: &Paths) -> anyhow::Result<()> {
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
        cloud: args.cloud.options()?,
        size,
        read_only: args.read_only,
        format: args.format,
        attach: args.attach,
        mkfs: args.mkfs,
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
    let status: DiskStatus = serde_json::from_value(call(&mut client, &req)?)?;
    if args.json {
        return print_json(&status);
    }
    let mode = if status.read_only {
        "read-only"
    } else {
        "read-write"
    };
    println!(
        "opened {}: {} ({}, {}, {mode})",
        status.id,
        status.image.display(),
        Human(status.size),
        status.format
    );
    if let Some(dev) = &status.block_device {
        println!("  block device  {}", dev.display());
    }
    if let Some(dir) = &status.mount {
        println!("  mounted on    {}", dir.display());
    }
    print_uris(&status);
    Ok(())
}

fn print_uris(status: &DiskStatus) {
    for uri in &status.nbd {
        println!("  nbd           {uri}");
    }
    for uri in &status.iscsi {
        println!("  iscsi         {uri}");
    }
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
}

/// Runs `vdk eject`.
pub fn eject(args: EjectArgs, paths: &Paths) -> anyhow::Result<()> {
    let mut client = connect(paths, false)?;
    let req = Request::Eject(CloseRequest {
        disk: disk_key(&args.disk)?,
        force: args.force,
    });
    let status: DiskStatus = serde_json::from_value(call(&mut client, &req)?)?;
    if args.json {
        return print_json(&status);
    }
    println!("ejected the disc of {}", status.id);
    Ok(())
}

/// Runs `vdk insert`.
pub fn insert(args: InsertArgs, paths: &Paths) -> anyhow::Result<()> {
    let mut client = connect(paths, false)?;
    let req = Request::Insert(InsertRequest {
        disk: disk_key(&args.disk)?,
        image: absolute(&args.image)?,
    });
    let status: DiskStatus = serde_json::from_value(call(&mut client, &req)?)?;
    if args.json {
        return print_json(&status);
    }
    println!(
        "inserted {} in {} ({})",
        status.image.display(),
        status.id,
        Human(status.size)
    );
    if let Some(dev) = &status.block_device {
        println!("  block device  {}", dev.display());
    }
    print_uris(&status);
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
pub fn close(args: CloseArgs, paths: &Paths) -> anyhow::Result<()> {
    let mut client = connect(paths, false)?;
    let req = Request::Close(CloseRequest {
        disk: disk_key(&args.disk)?,
        force: args.force,
    });
    let status: DiskStatus = serde_json::from_value(call(&mut client, &req)?)?;
    if args.json {
        return print_json(&status);
    }
    println!("closed {}: {}", status.id, status.image.display());
    Ok(())
}

/// `vdk mount`.
#[derive(Debug, Args)]
pub struct MountArgs {
    /// The disk: its id or its image file.
    disk: String,
    /// Where to mount it (created if missing).
    dir: PathBuf,
    /// Format it first: ext4, xfs or vfat (erases the disk).
    #[arg(long, value_name = "TYPE")]
    mkfs: Option<String>,
    /// Print the disk as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `vdk mount`.
pub fn mount(args: MountArgs, paths: &Paths) -> anyhow::Result<()> {
    let mut client = connect(paths, false)?;
    let req = Request::Mount(MountRequest {
        disk: disk_key(&args.disk)?,
        dir: absolute(&args.dir)?,
        mkfs: args.mkfs,
    });
    let status: DiskStatus = serde_json::from_value(call(&mut client, &req)?)?;
    if args.json {
        return print_json(&status);
    }
    if let Some(dir) = &status.mount {
        println!("mounted {} on {}", status.id, dir.display());
    }
    Ok(())
}

/// Runs `vdk unmount`.
pub fn unmount(args: CloseArgs, paths: &Paths) -> anyhow::Result<()> {
    let mut client = connect(paths, false)?;
    let req = Request::Unmount(CloseRequest {
        disk: disk_key(&args.disk)?,
        force: args.force,
    });
    let status: DiskStatus = serde_json::from_value(call(&mut client, &req)?)?;
    if args.json {
        return print_json(&status);
    }
    println!("unmounted {}", status.id);
    Ok(())
}

/// `vdk list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON (an array of disks) instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs `vdk list`.
pub fn list(args: ListArgs, paths: &Paths) -> anyhow::Result<()> {
    let disks: Vec<DiskStatus> = match connect(paths, false) {
        Ok(mut client) => serde_json::from_value(call(&mut client, &Request::List)?)?,
        // No daemon: nothing is open.
        Err(_) if !paths.socket.exists() => Vec::new(),
        Err(e) => return Err(e),
    };
    if args.json {
        return print_json(&disks);
    }
    // File systems and drives of `vdk fs`, under the disks (`vdk fs list --json` for scripts).
    let filesystems: Vec<FsStatus> = if disks.is_empty() && !paths.socket.exists() {
        Vec::new()
    } else {
        let mut client = connect(paths, false)?;
        serde_json::from_value(call(&mut client, &Request::FsList)?)?
    };
    let show_fs = || {
        if !filesystems.is_empty() {
            println!("\nfile systems and drives (vdk fs):");
            print_filesystems(&filesystems);
        }
    };
    if disks.is_empty() {
        println!("no disks open");
        show_fs();
        return Ok(());
    }
    let dash = || "-".to_owned();
    let mut rows = vec![[
        "ID", "IMAGE", "FORMAT", "SIZE", "RO", "DEVICE", "MOUNT", "READS", "WRITES", "READ",
        "WRITTEN", "LAT R/W", "NBD", "ISCSI",
    ]
    .map(String::from)];
    for d in &disks {
        rows.push([
            d.id.clone(),
            d.image.display().to_string(),
            d.format.clone(),
            Human(d.size).to_string(),
            if d.read_only { "yes" } else { "no" }.into(),
            d.block_device
                .as_ref()
                .map_or_else(dash, |p| p.display().to_string()),
            d.mount
                .as_ref()
                .map_or_else(dash, |p| p.display().to_string()),
            d.stats.reads.to_string(),
            d.stats.writes.to_string(),
            Human(d.stats.bytes_read).to_string(),
            Human(d.stats.bytes_written).to_string(),
            d.latency.as_ref().map_or_else(dash, |l| {
                format!("{}/{} µs", l["read"]["mean_us"], l["write"]["mean_us"])
            }),
            if d.ejected {
                "(no disc)".into()
            } else {
                d.nbd.first().cloned().unwrap_or_else(dash)
            },
            d.iscsi.first().cloned().unwrap_or_else(dash),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = io::stdout().lock();
    for r in &rows {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        writeln!(out, "{}", cells.join("  ").trim_end())?;
    }
    drop(out);
    show_fs();
    Ok(())
}

/// One line per file system of `vdk fs`.
fn print_filesystems(list: &[FsStatus]) {
    for st in list {
        let how = match &st.cache {
            Some(c) => format!("cache {}", c.display()),
            None => format!("{} names", st.names),
        };
        println!(
            "{}  {}  {}  {how}  label {:?}{}",
            st.dir.display(),
            st.kind,
            st.source,
            st.label,
            st.disk
                .as_ref()
                .map_or_else(String::new, |d| format!("  (disk {d})"))
        );
    }
}

/// Runs `vdk daemon --stop`.
pub fn stop_daemon(paths: &Paths) -> anyhow::Result<()> {
    let mut client = connect(paths, false)?;
    call(&mut client, &Request::Shutdown)?;
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

/// `vdk stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// The disk: its id or its image file.
    disk: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `vdk stats`.
pub fn stats(args: StatsArgs, paths: &Paths) -> anyhow::Result<()> {
    let mut client = connect(paths, false)?;
    let req = Request::Stats(crate::control::DiskRequest {
        disk: disk_key(&args.disk)?,
    });
    let v = call(&mut client, &req)?;
    if args.json {
        return print_json(&v);
    }
    println!("{}", v["id"].as_str().unwrap_or("?"));
    println!(
        "{:<6} {:>10} {:>12} {:>7} {:>10}  latency (log2 µs buckets, non-empty)",
        "op", "count", "bytes", "errors", "mean µs"
    );
    if let Some(ops) = v["ops"].as_object() {
        for (op, s) in ops {
            let buckets: Vec<String> = s["latency_us_log2_buckets"]
                .as_array()
                .map(|b| {
                    b.iter()
                        .enumerate()
                        .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
                        .map(|(i, n)| format!("<{}:{}", 1u64 << i, n))
                        .collect()
                })
                .unwrap_or_default();
            println!(
                "{op:<6} {:>10} {:>12} {:>7} {:>10}  {}",
                s["count"],
                s["bytes"],
                s["errors"],
                s["mean_us"],
                buckets.join(" ")
            );
        }
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
    List(ListArgs),
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
    #[command(flatten)]
    store: crate::cloud::StoreArgs,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
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
}

/// Runs `vdk fs ...`.
pub fn fs(cmd: FsCommand, paths: &Paths) -> anyhow::Result<()> {
    match cmd {
        FsCommand::Mount(a) => {
            let mut client = connect(paths, true)?;
            let req = Request::FsMount(FsMountRequest {
                source: disk_key(&a.source)?,
                dir: absolute(&a.dir)?,
            });
            let st: FsStatus = serde_json::from_value(call(&mut client, &req)?)?;
            if a.json {
                return print_json(&st);
            }
            println!(
                "mounted {} ({}, {} names, label {:?}) on {}",
                st.source,
                Human(st.size),
                st.names,
                st.label,
                st.dir.display()
            );
        }
        FsCommand::Map(a) => {
            let mut client = connect(paths, true)?;
            let req = Request::FsMap(FsMapRequest {
                url: a.url,
                dir: absolute(&a.dir)?,
                label: a.label,
                cache: a.cache.as_deref().map(absolute).transpose()?,
                endpoint: a.store.s3_endpoint,
                region: a.store.s3_region,
            });
            let st: FsStatus = serde_json::from_value(call(&mut client, &req)?)?;
            if a.json {
                return print_json(&st);
            }
            println!(
                "mapped {} on {} (label {}, cache {})",
                st.source,
                st.dir.display(),
                st.label,
                st.cache.as_deref().unwrap_or(Path::new("-")).display()
            );
        }
        FsCommand::Unmount(a) | FsCommand::Unmap(a) => {
            let mut client = connect(paths, false)?;
            let req = Request::FsUnmount(FsUnmountRequest {
                dir: absolute(&a.dir)?,
                force: a.force,
            });
            let st: FsStatus = serde_json::from_value(call(&mut client, &req)?)?;
            if a.json {
                return print_json(&st);
            }
            let verb = if st.kind == "cloud-drive" {
                "unmapped"
            } else {
                "unmounted"
            };
            println!("{verb} {}", st.dir.display());
        }
        FsCommand::List(a) => {
            let list: Vec<FsStatus> = match connect(paths, false) {
                Ok(mut client) => serde_json::from_value(call(&mut client, &Request::FsList)?)?,
                Err(_) if !paths.socket.exists() => Vec::new(),
                Err(e) => return Err(e),
            };
            if a.json {
                return print_json(&list);
            }
            if list.is_empty() {
                println!("no file systems mounted");
            }
            print_filesystems(&list);
        }
    }
    Ok(())
}
