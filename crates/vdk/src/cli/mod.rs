//! The command line.

mod backup;
mod compare;
mod convert;
mod daemon;
mod disks;
#[cfg(target_os = "linux")]
mod fs;
mod generate;
mod image;
mod info;
pub(crate) mod list;
pub mod log;
pub mod nbd_opts;
pub mod out;
mod serve;
#[cfg(windows)]
mod service;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use tracing::warn;

use crate::paths::Paths;

/// vdk, the virtual disk kit: serve disks from user space.
#[derive(Debug, Parser)]
#[command(name = "vdk", version, about, propagate_version = true)]
pub struct Cli {
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    command: Command,
}

/// `--socket`, on the commands that talk to the daemon.
#[derive(Clone, Debug, Default, Args)]
#[command(next_help_heading = "Daemon")]
pub struct SocketArg {
    /// The daemon's control socket (default: /run/vdk/control.sock for root,
    /// $XDG_RUNTIME_DIR/vdk/control.sock for other users; on Windows a named pipe,
    /// \\.\pipe\vdk-USER).
    #[arg(long, env = "VDK_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

impl SocketArg {
    /// The daemon's paths.
    pub fn paths(&self) -> anyhow::Result<Paths> {
        Paths::new(self.socket.as_deref())
    }
}

/// The daemon's paths for commands that only ask it about an image (who has it open): the
/// default socket, or `VDK_SOCKET`.
fn env_paths() -> anyhow::Result<Paths> {
    Paths::new(std::env::var_os("VDK_SOCKET").map(PathBuf::from).as_deref())
}

/// The passphrase of a LUKS image, for commands that open images but not object-store disks.
#[derive(Args, Clone, Debug, Default)]
pub struct KeyArgs {
    /// A LUKS image's passphrase: all of FILE, byte for byte (as cryptsetup and QEMU read it).
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// A LUKS image's passphrase, from the environment variable ENV.
    #[arg(long, value_name = "ENV", conflicts_with = "key_file")]
    pub key_secret: Option<String>,
}

impl KeyArgs {
    /// The passphrase given, if any; else, as `ask` says, typed at a prompt.
    pub fn secret(
        &self,
        ask: crate::cloud::Ask<'_>,
    ) -> anyhow::Result<Option<vdk_formats::luks::Secret>> {
        crate::cloud::luks_secret_or_ask(self.key_file.as_deref(), self.key_secret.as_deref(), ask)
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve disk images over NBD in the foreground, until SIGINT or SIGTERM.
    Serve(serve::ServeArgs),
    /// Open an image (creating it if missing) as a disk: a block device, an NBD export, and
    /// optionally a mounted file system.
    Open(disks::OpenArgs),
    /// Close a disk: unmount (after a sync), detach, stop its export, flush, release.
    Close(disks::CloseArgs),
    /// List open disks, with their attachments and I/O counters.
    List(list::ListArgs),
    /// Mount an open disk's file system.
    Mount(disks::MountArgs),
    /// Unmount an open disk's file system; the disk stays open.
    Unmount(disks::CloseArgs),
    /// Run the daemon that owns open disks, in the foreground.
    Daemon(daemon::DaemonArgs),
    /// Create an image (qcow2, raw, vhd or vhdx; or a disk in object storage), optionally
    /// over a backing image.
    Create(image::CreateArgs),
    /// Describe an image: format, sizes, cluster size, backing chain, flags.
    Info(info::InfoArgs),
    /// Copy an image into a new one (raw, qcow2, vhd, vhdx, luks, or object storage), leaving holes
    /// and zeroes out.
    Convert(convert::ConvertArgs),
    /// Whether two images hold the same disk (as qemu-img compare): exit 0 if so, 1 if not.
    Compare(compare::CompareArgs),
    /// Check an image's consistency (refcounts against tables); --repair fixes refcounts.
    Check(image::CheckArgs),
    /// Change an image's virtual size (raw, qcow2): grow it, or with --shrink make it smaller.
    Resize(image::ResizeArgs),
    /// Counters and latency histograms of a disk opened with --filter stats.
    Stats(list::StatsArgs),
    /// Change an open disk's rate limits while it is served: vdk set ID rate:read-bps=10M.
    Set(disks::SetArgs),
    /// Add, remove, clear or list an open disk's dirty bitmaps (what changed since a point in
    /// time, served over NBD as qemu:dirty-bitmap:NAME).
    Bitmap(backup::BitmapArgs),
    /// Copy an open disk into a new qcow2 image, as it is now: all of it, or with
    /// --incremental what a dirty bitmap marks, on top of the previous backup.
    Backup(backup::BackupArgs),
    /// Merge a cow overlay into its base, then empty it (safe to run again if interrupted).
    Commit(image::OverlayArgs),
    /// Empty a cow overlay: the disk reads as its base again.
    Discard(image::OverlayArgs),
    /// Start a new overlay on top of a cow overlay (a chain); or, with -l/-c/-a/-d, list,
    /// take, apply or delete a qcow2 image's internal snapshots.
    Snapshot(image::SnapshotArgs),
    /// Take the disc out of an open CD-ROM disk (an ISO): iSCSI initiators see no medium.
    Eject(disks::EjectArgs),
    /// Put an ISO image in an open CD-ROM disk, as a new disc.
    Insert(disks::InsertArgs),
    /// File systems in user space: browse an ISO image as a read-only directory tree, or map
    /// a bucket as a cloud drive.
    #[command(subcommand)]
    #[cfg(target_os = "linux")]
    Fs(fs::FsCommand),
    /// Print a shell completion script: vdk completions bash > /etc/bash_completion.d/vdk.
    Completions(generate::CompletionsArgs),
    /// Print the manual page of vdk or of one of its commands (roff): vdk man | man -l -.
    Man(generate::ManArgs),
}

impl Cli {
    /// What must be ready before logging starts: a daemon's own directory, where its log
    /// may go.
    pub fn prepare(&self) -> anyhow::Result<()> {
        match &self.command {
            #[cfg(target_os = "linux")]
            Command::Daemon(args) if !args.stop && !args.reload => {
                let mode = crate::daemon::dir_mode(args.owner.is_some());
                crate::daemon::own_dir(&args.socket.paths()?.dir, mode)
            }
            _ => Ok(()),
        }
    }

    /// The file a daemon logs to, when told to (`vdk daemon --log FILE`); stderr otherwise.
    pub fn log_file(&self) -> Option<&Path> {
        match &self.command {
            Command::Daemon(args) => args.log.as_deref(),
            _ => None,
        }
    }
}

/// Runs the chosen command; its exit status (`check` and `compare` have more than two).
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let done = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Open(args) => disks::open(args),
        Command::Close(args) => disks::close(args),
        Command::List(args) => list::list(args),
        Command::Mount(args) => disks::mount(args),
        Command::Unmount(args) => disks::unmount(args),
        Command::Daemon(args) => daemon::run(&args),
        Command::Create(args) => image::create(args),
        Command::Info(args) => info::info(args, &env_paths()?),
        Command::Convert(args) => convert::run(args, &env_paths()?),
        Command::Check(args) => return image::check(args, &env_paths()?),
        Command::Compare(args) => return compare::run(args, &env_paths()?),
        Command::Resize(args) => image::resize(args, &env_paths()?),
        Command::Stats(args) => list::stats(args),
        Command::Set(args) => disks::set(args),
        Command::Bitmap(args) => backup::bitmap(args),
        Command::Backup(args) => backup::backup(args),
        Command::Commit(args) => image::commit(args),
        Command::Discard(args) => image::discard(args),
        Command::Snapshot(args) => image::snapshot(args),
        Command::Eject(args) => disks::eject(args),
        Command::Insert(args) => disks::insert(args),
        #[cfg(target_os = "linux")]
        Command::Fs(cmd) => fs::run(cmd),
        Command::Completions(args) => generate::completions(&args),
        Command::Man(args) => generate::man(&args),
    };
    done.map(|()| ExitCode::SUCCESS)
}

/// The open disk of the daemon (if one runs) whose image or cow overlay is `file`.
pub(crate) fn open_disk(
    file: &std::path::Path,
    paths: &Paths,
) -> Option<crate::control::DiskStatus> {
    let mut client = crate::control::Client::connect(&paths.socket).ok()?;
    let disks: Vec<crate::control::DiskStatus> =
        client.call(&crate::control::Request::List).ok()?.ok()?;
    let file = crate::paths::canonical(file).ok()?;
    let overlay = format!("overlay={}", file.display());
    disks
        .into_iter()
        .find(|d| d.image == file || d.filters.iter().any(|f| f.contains(&overlay)))
}

/// For an error that is a lock on `file` held elsewhere: the same said with what to do
/// (`hint`), naming the vdk disk when it is a vdk daemon that holds it (the lock error itself
/// can only name the process). Other errors are returned as they are.
pub(crate) fn name_holder(
    e: anyhow::Error,
    file: &Path,
    paths: &Paths,
    hint: &str,
) -> anyhow::Error {
    let busy = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ResourceBusy)
    });
    if !busy {
        return e;
    }
    let said = match open_disk(file, paths) {
        Some(d) => format!(
            "{} is open as vdk disk {} (`vdk close {}` closes it)",
            file.display(),
            d.id,
            d.id
        ),
        None => vdk::message::one_line(e.chain().map(ToString::to_string)),
    };
    anyhow::anyhow!("{said}{hint}")
}

/// The first line of a CHAP credentials file, `user:secret`.
fn read_chap(path: &Path) -> anyhow::Result<vdk_iscsi::chap::Credentials> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read CHAP credentials from {}", path.display()))?;
    let line = text.lines().next().unwrap_or("");
    let creds = vdk_iscsi::chap::Credentials::parse(line)
        .with_context(|| format!("{}: the first line must be USER:SECRET", path.display()))?;
    if creds.secret.len() < vdk_iscsi::chap::MIN_SECRET {
        warn!(
            file = %path.display(),
            "CHAP secret shorter than {} bytes: initiators such as Windows refuse it",
            vdk_iscsi::chap::MIN_SECRET
        );
    }
    Ok(creds)
}

/// The iSCSI authentication that `--iscsi-chap`, `--iscsi-mutual-chap` and
/// `--iscsi-initiator` ask for.
pub(crate) fn iscsi_auth(
    chap: Option<&Path>,
    mutual: Option<&Path>,
    initiators: &[String],
) -> anyhow::Result<vdk_iscsi::Auth> {
    let chap = chap.map(read_chap).transpose()?;
    let mutual = mutual.map(read_chap).transpose()?;
    if let (Some(a), Some(b)) = (&chap, &mutual) {
        if a.secret == b.secret {
            bail!("the mutual CHAP secret must differ from the initiators' (RFC 7143 12.1.3)");
        }
    }
    for i in initiators {
        if !vdk_iscsi::valid_name(i) {
            bail!("--iscsi-initiator {i:?} is not an iSCSI name (iqn.YYYY-MM.domain:name)");
        }
    }
    Ok(vdk_iscsi::Auth {
        chap,
        mutual,
        initiators: initiators.to_vec(),
    })
}
