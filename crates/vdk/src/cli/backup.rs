//! `vdk bitmap` and `vdk backup`: dirty bitmaps of open disks, and backups made with them.

use std::path::PathBuf;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use super::disks::{absolute, ask, call, connect, disk_key};
use crate::control::{
    BackupReport, BackupRequest, BitmapAction, BitmapRequest, BitmapStatus, DiskStatus, Request,
};

/// What `vdk bitmap` does.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Action {
    /// List the disk's bitmaps: name, granularity, bytes marked dirty, last backup.
    List,
    /// Add a clean bitmap: from now on writes, zeroes and trims mark it.
    Add,
    /// Remove a bitmap.
    Remove,
    /// Make a bitmap clean.
    Clear,
}

/// `vdk bitmap`.
#[derive(Debug, Args)]
#[command(after_help = "\
A bitmap is served over NBD as the metadata context qemu:dirty-bitmap:NAME
(nbdinfo --map=qemu:dirty-bitmap:NAME URI). Examples:
  vdk bitmap add disk0 daily
  vdk bitmap list disk0")]
pub struct BitmapArgs {
    /// list, add, remove or clear.
    #[arg(value_enum)]
    action: Action,
    /// The disk: its id or its image file.
    disk: String,
    /// The bitmap (all but list).
    #[arg(required_if_eq_any([("action", "add"), ("action", "remove"), ("action", "clear")]))]
    name: Option<String>,
    /// With add: bytes per bit, a power of two from 512 (default 64K).
    #[arg(long, value_name = "BYTES", value_parser = vdk_core::size::parse_size)]
    granularity: Option<u64>,
    /// With add: keep it in the image (qcow2, as QEMU does: qemu-img info lists it), across
    /// closes and daemon restarts; one left in use by a crash comes back inconsistent.
    #[arg(long)]
    persistent: bool,
    /// Print the bitmaps as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pub socket: crate::cli::SocketArg,
}

/// Runs `vdk bitmap`.
pub fn bitmap(args: BitmapArgs) -> anyhow::Result<()> {
    let action = match args.action {
        Action::List => BitmapAction::List,
        Action::Add => BitmapAction::Add,
        Action::Remove => BitmapAction::Remove,
        Action::Clear => BitmapAction::Clear,
    };
    if (args.granularity.is_some() || args.persistent) && action != BitmapAction::Add {
        anyhow::bail!("--granularity and --persistent are for add only");
    }
    let req = Request::Bitmap(BitmapRequest {
        disk: disk_key(&args.disk)?,
        action,
        name: args.name,
        granularity: args.granularity,
        persistent: args.persistent,
    });
    let Some(list) = ask::<Vec<BitmapStatus>>(&args.socket, false, &req, args.json)? else {
        return Ok(());
    };
    if action != BitmapAction::List {
        return Ok(());
    }
    for b in list {
        let last = b
            .last_backup
            .map(|p| format!("  last backup {}", p.display()))
            .unwrap_or_default();
        let kind = match (b.inconsistent, b.persistent) {
            (true, _) => "  INCONSISTENT (left in use by a crash: remove it)",
            (false, true) => "  persistent",
            (false, false) => "",
        };
        crate::outln!(
            "{}  granularity {}  dirty {}{kind}{last}",
            b.name,
            vdk_core::size::Human(b.granularity),
            vdk_core::size::Human(b.dirty)
        )?;
    }
    Ok(())
}

/// `vdk backup`.
#[derive(Debug, Args)]
#[command(after_help = "\
The backup is the disk as it was when the command began, though it stays in use.
  vdk bitmap add disk0 daily
  vdk backup disk0 --bitmap daily full.qcow2
  ... (the disk is written) ...
  vdk backup disk0 --bitmap daily --incremental inc1.qcow2
inc1.qcow2's backing file is full.qcow2; qemu-img convert -O raw inc1.qcow2 disk.img restores it.")]
pub struct BackupArgs {
    /// The disk: its id or its image file.
    disk: String,
    /// The new qcow2 image (there must be no file there).
    target: PathBuf,
    /// A dirty bitmap of the disk: a full backup clears it when it begins; an incremental
    /// one copies what it marks, and clears it.
    #[arg(long, value_name = "NAME")]
    bitmap: Option<String>,
    /// Copy only what --bitmap marks, into an image whose backing file is the previous
    /// backup made with that bitmap.
    #[arg(long, requires = "bitmap")]
    incremental: bool,
    /// With --incremental: the previous backup, if not the last one made with the bitmap
    /// (after a daemon restart).
    #[arg(long, value_name = "FILE", requires = "incremental")]
    base: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// No progress bar (there is none unless stderr is a terminal).
    #[arg(long, short)]
    quiet: bool,
    #[command(flatten)]
    pub socket: crate::cli::SocketArg,
}

/// Shows the progress of the backup making `target` (as `list` reports it) until `stop`.
fn show_progress(
    socket: crate::cli::SocketArg,
    target: PathBuf,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(250));
            let Ok(paths) = socket.paths() else { break };
            let Ok(mut client) = connect(&paths, false) else {
                break;
            };
            let Ok(disks) = call::<Vec<DiskStatus>>(&mut client, &Request::List) else {
                break;
            };
            let running = disks
                .into_iter()
                .filter_map(|d| d.backup)
                .find(|b| b.target == target);
            if let Some(b) = running {
                bar.set_length(b.total);
                bar.set_position(b.done);
            }
        }
        bar.finish_and_clear();
    })
}

/// Runs `vdk backup`.
pub fn backup(args: BackupArgs) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let target = absolute(&args.target)?;
    let req = Request::Backup(BackupRequest {
        disk: disk_key(&args.disk)?,
        target: target.clone(),
        bitmap: args.bitmap,
        incremental: args.incremental,
        base: args.base.as_deref().map(absolute).transpose()?,
    });
    let stop = Arc::new(AtomicBool::new(false));
    let progress = (!args.quiet && !args.json && std::io::stderr().is_terminal())
        .then(|| show_progress(args.socket.clone(), target, Arc::clone(&stop)));
    let answer = ask::<BackupReport>(&args.socket, false, &req, args.json);
    stop.store(true, Ordering::Relaxed);
    if let Some(p) = progress {
        let _ = p.join();
    }
    let Some(r) = answer? else {
        return Ok(());
    };
    let on = r
        .base
        .map(|b| format!(" on top of {}", b.display()))
        .unwrap_or_default();
    crate::outln!(
        "backed up {} to {}{on}: {} looked at, {} of data copied",
        r.id,
        r.target.display(),
        vdk_core::size::Human(r.scanned),
        vdk_core::size::Human(r.copied)
    )?;
    Ok(())
}
