//! `vdk daemon`: owns every open disk and its front ends (NBD export, iSCSI LUN, block device,
//! mounts), and answers the control API on a Unix socket (a named pipe on Windows, where
//! block devices, mounts and the FUSE file systems are not: `attach_windows.rs`,
//! `access_windows.rs`).
//!
//! The model, in three layers:
//!
//! ```text
//!   channel.rs    the control socket or pipe, listening
//!   requests.rs   a control connection: who asks (access.rs), a typed Request, a typed Reply
//!        │
//!   Daemon        one method per request (open.rs, close.rs, attach.rs, overlay.rs,
//!        │        media.rs), each a few steps over the parts below, one at a time
//!        │
//!   parts         each owns its state and knows no other part:
//!                 disks.rs    the open disks (Disk, its Medium, its Recipe)
//!                 nbd.rs      the NBD server and its exports
//!                 iscsi.rs    the iSCSI server (started on demand) and its LUNs
//!                 attacher.rs block devices (fuse-loop)
//!                 userfs.rs   ISO browsers and cloud drives
//!                 mount.rs, recover.rs, tracked.rs: helpers with no state
//! ```
//!
//! Threads: one accepts control connections and one serves each of them; the NBD and iSCSI
//! servers and the FUSE exports have their own. Requests that change disks run one at a time
//! (`changing`); `list` never waits for them.

#[cfg_attr(windows, path = "access_windows.rs")]
mod access;
#[cfg_attr(windows, path = "attach_windows.rs")]
mod attach;
#[cfg(target_os = "linux")]
mod attacher;
mod backup;
mod channel;
mod close;
#[cfg(target_os = "linux")]
mod dir;
mod disks;
mod grow;
mod initiator;
mod iscsi;
mod media;
mod metrics;
#[cfg(target_os = "linux")]
pub mod mount;
mod nbd;
mod open;
mod overlay;
mod recipe;
#[cfg(target_os = "linux")]
pub mod recover;
mod requests;
pub mod tracked;
#[cfg(target_os = "linux")]
mod userfs;
mod vhost;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use anyhow::{bail, Context};
use tracing::{debug, info, warn};
use vdk_core::sync::lock;
#[cfg(target_os = "linux")]
use vdk_nbd::Listener;
use vdk_nbd::Server;

use crate::control::{ApiError, DiskStatus, StatsReport};
pub use crate::paths::Paths;
#[cfg(target_os = "linux")]
pub use dir::{dir_mode, own_dir};
use disks::{Disk, Disks};
pub use iscsi::Settings as IscsiSettings;

/// Size of an image `open` creates when none is given.
pub const DEFAULT_SIZE: u64 = 100 << 20;

/// What a daemon runs with: everything read and checked by the command line already.
#[derive(Debug)]
pub struct Config {
    /// NBD listeners (`unix:///PATH`, `tcp://HOST:PORT`); the daemon's `nbd.sock` if none.
    pub nbd_listen: Vec<String>,
    /// The NBD server's limits, time-outs and TLS.
    pub nbd: vdk_nbd::ServerConfig,
    /// How disks are served over iSCSI.
    pub iscsi: IscsiSettings,
    /// Threads answering the FUSE export.
    #[cfg(target_os = "linux")]
    pub fuse_threads: usize,
    /// Raw images with no filter go through FUSE passthrough (`--fuse-passthrough`).
    #[cfg(target_os = "linux")]
    pub fuse_passthrough: bool,
    /// ublk serves raw images with no filter by zero copy where the kernel offers it (off
    /// with `--ublk-copy`).
    #[cfg(target_os = "linux")]
    pub ublk_zero_copy: bool,
    /// The uid and gid of the user served besides the daemon's own (`--owner`).
    pub owner: Option<(u32, u32)>,
    /// Where to serve Prometheus metrics (`tcp://HOST:PORT`), if anywhere.
    pub metrics: Option<String>,
}

/// The daemon: its parts, and the requests that change them.
#[derive(Debug)]
pub struct Daemon {
    paths: Paths,
    disks: Disks,
    nbd: nbd::NbdFront,
    iscsi: iscsi::Front,
    #[cfg(target_os = "linux")]
    attacher: attacher::Attacher,
    #[cfg(target_os = "linux")]
    fs: userfs::Filesystems,
    /// Held by requests that change disks, so that they run one at a time.
    changing: Mutex<()>,
    /// What it found a dead daemon had left mounted, and detached, when it started.
    recovered: Vec<String>,
    /// The NBD server's TLS, if on: its certificates are read again on `reload`.
    tls: Option<Arc<vdk_nbd::Tls>>,
}

impl Daemon {
    /// A daemon whose NBD server is `nbd`.
    fn new(paths: Paths, nbd: nbd::NbdFront, config: &Config, recovered: Vec<String>) -> Daemon {
        #[cfg(target_os = "linux")]
        let attacher = attacher::Attacher::new(
            paths.fuse.clone(),
            (
                config.fuse_threads,
                config.fuse_passthrough,
                config.ublk_zero_copy,
            ),
            nbd.connector(),
        );
        Daemon {
            disks: Disks::default(),
            nbd,
            iscsi: iscsi::Front::new(config.iscsi.clone()),
            #[cfg(target_os = "linux")]
            attacher,
            #[cfg(target_os = "linux")]
            fs: userfs::Filesystems::new(paths.clone()),
            changing: Mutex::new(()),
            recovered,
            tls: config.nbd.tls.clone(),
            paths,
        }
    }

    /// What `list` and the requests that change a disk report of it.
    fn status(&self, d: &Disk) -> DiskStatus {
        let st = lock(&d.state);
        let medium = lock(&d.medium).clone();
        let lun = lock(&d.iscsi);
        // An initiator may have ejected the disc itself (START STOP UNIT).
        let ejected = st.ejected || lun.as_ref().is_some_and(|l| l.unit.medium().is_none());
        DiskStatus {
            id: d.id.clone(),
            image: medium.image,
            format: medium.format,
            size: medium.size,
            iscsi: lun.as_ref().map(|l| self.iscsi.uris(l)).unwrap_or_default(),
            vhost_user: vhost::path(d),
            vhost_user_connected: vhost::connected(d),
            ejected,
            read_only: d.read_only,
            attach: d.attach,
            block_device: st.block_device.clone(),
            mount: st.mount.clone(),
            export: d.export.clone(),
            filters: lock(&d.filters).clone(),
            nbd: if st.ejected {
                Vec::new()
            } else {
                self.nbd.uris(&d.export)
            },
            stats: d.device.counters(),
            latency: lock(&d.stats).as_deref().map(crate::control::stats_report),
            bitmaps: backup::bitmap_status(d),
            backup: lock(&d.backup).as_ref().map(backup::Running::status),
        }
    }

    /// The stats filter's counters of a disk, per operation.
    fn stats(&self, key: &str) -> Result<StatsReport, ApiError> {
        let disk = self.disks.find(key)?;
        let Some(stats) = lock(&disk.stats).clone() else {
            return Err(ApiError::invalid(format!(
                "{} has no stats filter: open it with --filter stats",
                disk.id
            )));
        };
        Ok(StatsReport {
            ops: crate::control::stats_report(&stats),
            id: disk.id.clone(),
        })
    }

    /// Changes the limits of an open disk's rate filter (its outermost one), in force at once
    /// and kept when the chain is opened again (a live commit); `list` shows them.
    fn set(&self, key: &str, settings: &[String]) -> Result<DiskStatus, ApiError> {
        let _one_at_a_time = lock(&self.changing);
        let disk = self.disks.find(key)?;
        let found = lock(&disk.recipe)
            .specs
            .iter()
            .enumerate()
            .rev()
            .find_map(|(i, s)| match s {
                vdk_filters::FilterSpec::Rate(l) => Some((i, Arc::clone(l))),
                _ => None,
            });
        let Some((index, limiter)) = found else {
            return Err(ApiError::invalid(format!(
                "{} has no rate filter: open it with --filter rate (no limits) to change them later",
                disk.id
            )));
        };
        if settings.is_empty() {
            return Err(ApiError::invalid("nothing to set (rate:KEY=VALUE,...)"));
        }
        let mut limits = limiter.limits();
        for s in settings {
            vdk_filters::rate::change(&mut limits, s).map_err(ApiError::invalid)?;
        }
        limiter.set(limits);
        let spec = limits.spec();
        if let Some(f) = lock(&disk.filters).get_mut(index) {
            f.clone_from(&spec);
        }
        info!(id = %disk.id, limits = %spec, "rate limits changed");
        Ok(self.status(&disk))
    }

    /// Reads the TLS certificates again; on failure the ones in use stay.
    fn reload_tls(&self) -> Result<(), ApiError> {
        let Some(tls) = &self.tls else {
            return Err(ApiError::invalid(
                "TLS is off: no certificates to reload (start the daemon with --tls)",
            ));
        };
        tls.reload().map_err(|e| {
            warn!(error = %e, "TLS certificates not reloaded");
            ApiError::invalid(format!(
                "TLS certificates not reloaded (the ones in use stay): {e}"
            ))
        })?;
        info!("TLS certificates reloaded (control request)");
        Ok(())
    }

    /// The open disks `caller` may see: its own, or all for a trusted one.
    fn list(&self, caller: &access::Caller) -> Vec<DiskStatus> {
        let mine = self.disks.all().into_iter();
        mine.filter(|d| caller.may_manage(d.opener))
            .map(|d| self.status(&d))
            .collect()
    }
}

/// Hands a socket file to the user the daemon serves.
#[cfg(target_os = "linux")]
fn give(path: &Path, owner: Option<(u32, u32)>) -> anyhow::Result<()> {
    if let Some((uid, gid)) = owner {
        rustix::fs::chown(
            path,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
        )
        .with_context(|| format!("cannot give {} to uid {uid}", path.display()))?;
    }
    Ok(())
}

/// Runs the daemon in the foreground until SIGTERM, SIGINT (Ctrl-C on Windows) or a
/// `shutdown` request.
pub fn run(config: &Config, paths: &Paths) -> anyhow::Result<()> {
    #[cfg(target_os = "linux")]
    own_dir(&paths.dir, dir_mode(config.owner.is_some()))?;
    #[cfg(windows)]
    std::fs::create_dir_all(&paths.dir)
        .with_context(|| format!("cannot create {}", paths.dir.display()))?;
    let mut control = channel::bind(&paths.socket)?;
    #[cfg(target_os = "linux")]
    give(&paths.socket, config.owner)?;
    // A daemon that died here may have left mounts that no longer answer.
    #[cfg(target_os = "linux")]
    let recovered = recover::stale_mounts(paths);
    #[cfg(not(target_os = "linux"))]
    let recovered = Vec::new();
    if !recovered.is_empty() {
        warn!(
            mounts = recovered.len(),
            "detached what a vdk daemon that died left mounted"
        );
    }
    // ublk devices of a daemon that died wait (their I/O held) until their disk is opened
    // again: say so, since nothing else would.
    #[cfg(target_os = "linux")]
    for (id, disk) in vdk_attach::ublk::waiting() {
        warn!(
            device = %format!("/dev/ublkb{id}"),
            %disk,
            "a ublk device of a daemon that died waits for its server (its I/O held): open the \
             same image with --attach ublk to take it over"
        );
    }
    #[cfg(target_os = "linux")]
    if rustix::process::geteuid().is_root() {
        // The daemon writes back the pages of the disks it serves: let it allocate memory
        // under pressure instead of waiting for its own writeback (as loop and NBD daemons do).
        if let Err(e) = rustix::process::configure_io_flusher_behavior(true) {
            debug!(error = %e, "cannot mark the daemon as an I/O flusher");
        }
    }
    let uris = if config.nbd_listen.is_empty() {
        vec![channel::default_nbd(paths)]
    } else {
        config.nbd_listen.clone()
    };
    let listeners = crate::front::bind_nbd(&uris)?;
    #[cfg(target_os = "linux")]
    for l in &listeners {
        if let Listener::Unix(_, path) = l {
            give(path, config.owner)?;
        }
    }
    let metrics = config.metrics.as_deref().map(metrics::bind).transpose()?;
    let server = Arc::new(Server::new(Vec::new(), config.nbd.clone()));
    let front = nbd::NbdFront::new(Arc::clone(&server), &listeners);
    let daemon = Arc::new(Daemon::new(paths.clone(), front, config, recovered));
    if let Some(listener) = metrics {
        metrics::serve(listener, Arc::downgrade(&daemon))?;
    }
    if !config.iscsi.listen.is_empty() {
        // Portals asked for by name start now, so that a wrong one fails at once.
        daemon
            .iscsi
            .start()
            .map_err(|e| anyhow::anyhow!(e.message))?;
    }
    let nbd_thread = thread::Builder::new().name("nbd".into()).spawn({
        let server = Arc::clone(&server);
        move || server.serve(listeners)
    })?;
    let stopping = Arc::new(AtomicBool::new(false));
    let signals = crate::front::on_signals(config.nbd.tls.clone(), {
        let stopping = Arc::clone(&stopping);
        let socket = paths.socket.clone();
        move |_| stop(&stopping, &socket)
    })?;
    info!(socket = %paths.socket.display(), pid = std::process::id(), "daemon ready");
    // Under systemd (Type=notify): ready now that requests are answered.
    #[cfg(target_os = "linux")]
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        warn!(error = %e, "cannot tell the service manager the daemon is ready");
    }
    loop {
        let conn = control.accept();
        if stopping.load(Ordering::SeqCst) {
            break;
        }
        match conn {
            Ok(conn) => {
                let daemon = Arc::clone(&daemon);
                let stopping = Arc::clone(&stopping);
                let socket = paths.socket.clone();
                let owner = config.owner.map(|o| o.0);
                thread::spawn(move || {
                    let stop_daemon = || stop(&stopping, &socket);
                    if let Err(e) = requests::serve(&daemon, conn, owner, stop_daemon) {
                        debug!(error = %e, "control connection ended");
                    }
                });
            }
            Err(e) => warn!(error = %e, "accept on the control socket failed"),
        }
    }
    signals.close();
    #[cfg(target_os = "linux")]
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    daemon.close_all();
    daemon.nbd.stop();
    let nbd = nbd_thread.join();
    channel::remove(&paths.socket);
    info!("daemon stopped");
    match nbd {
        Ok(r) => r.context("NBD server"),
        Err(_) => bail!("the NBD server thread panicked"),
    }
}

/// Makes the accept loop end: sets the flag, then wakes it with a connection.
fn stop(stopping: &AtomicBool, socket: &Path) {
    stopping.store(true, Ordering::SeqCst);
    channel::wake(socket);
}
