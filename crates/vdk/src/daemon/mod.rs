//! `vdk daemon`: owns every open disk and its front ends (NBD export, block device, mount),
//! and answers the control API on a Unix socket.
//!
//! Threads: one accepts control connections and one serves each of them; the NBD server and
//! the FUSE export have their own. Requests that change disks (open, close, mount, unmount)
//! run one at a time; `list` never waits for them.

mod access;
mod disks;
mod iscsi;
mod media;
pub mod mount;
mod open;
mod overlay;
pub mod recover;
pub mod tracked;
mod userfs;

use std::fs;
use std::io::{self, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use anyhow::{bail, Context};
use clap::Args;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::{debug, info, warn};
use vdk_nbd::{Listener, Server, ServerConfig};

use crate::control::{self, ApiError, ErrorKind, Request, Response};
pub use disks::Daemon;

/// Where a daemon keeps its sockets, its FUSE export and its log: the directory of its
/// control socket.
#[derive(Clone, Debug)]
pub struct Paths {
    /// The directory.
    pub dir: PathBuf,
    /// The control socket.
    pub socket: PathBuf,
    /// The default NBD listener.
    pub nbd_socket: PathBuf,
    /// Where the FUSE export is mounted.
    pub fuse: PathBuf,
    /// The log of a daemon started in the background.
    pub log: PathBuf,
}

impl Paths {
    /// The paths of the daemon whose control socket is `socket`, or the default one.
    pub fn new(socket: Option<&Path>) -> anyhow::Result<Paths> {
        let socket = match socket {
            Some(s) => absolute(s)?,
            None => default_dir()?.join("control.sock"),
        };
        let dir = socket
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/"));
        Ok(Paths {
            nbd_socket: dir.join("nbd.sock"),
            fuse: dir.join("disks"),
            log: dir.join("daemon.log"),
            socket,
            dir,
        })
    }
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("bad path {}", p.display()))
}

/// `/run/vdk` for root, `$XDG_RUNTIME_DIR/vdk` for everyone else.
fn default_dir() -> anyhow::Result<PathBuf> {
    if rustix::process::geteuid().is_root() {
        return Ok(PathBuf::from("/run/vdk"));
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => Ok(PathBuf::from(d).join("vdk")),
        _ => bail!("XDG_RUNTIME_DIR is not set: give the control socket with --socket PATH"),
    }
}

/// Options of `vdk daemon`.
#[derive(Debug, Args)]
#[command(after_help = "\
The daemon starts by itself when `vdk open` needs it; run it by hand for systemd or a
container. It serves every open disk over NBD (by default on nbd.sock beside the control
socket) and stops on SIGTERM or SIGINT, closing every disk as `vdk close` does.")]
pub struct DaemonArgs {
    /// Where to listen: unix:///PATH or tcp://HOST:PORT for NBD, iscsi://HOST[:PORT] for
    /// iSCSI (default for iSCSI: iscsi://127.0.0.1:3260, started when a disk first asks).
    /// Repeatable.
    #[arg(long, value_name = "URI")]
    pub listen: Vec<String>,
    /// iSCSI: initiators must log in with CHAP as the user:secret on the first line of FILE.
    #[arg(long, value_name = "FILE")]
    pub iscsi_chap: Option<PathBuf>,
    /// iSCSI: the target's own user:secret (first line of FILE), for mutual CHAP.
    #[arg(long, value_name = "FILE", requires = "iscsi_chap")]
    pub iscsi_mutual_chap: Option<PathBuf>,
    /// iSCSI: only this initiator name may log in (repeatable; default: any).
    #[arg(long = "iscsi-initiator", value_name = "IQN")]
    pub iscsi_initiators: Vec<String>,
    /// Serve every disk opened over iSCSI, as if each were opened with --iscsi.
    #[arg(long)]
    pub iscsi_all: bool,
    /// Threads answering the FUSE export (requests served in parallel).
    #[arg(long, default_value_t = vdk_attach::fuse::DEFAULT_THREADS as u16,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub fuse_threads: u16,
    /// Ask the running daemon to close every disk and stop.
    #[arg(long)]
    pub stop: bool,
    /// Log to FILE instead of stderr; past 16 MiB it moves to FILE.1 and a new one starts
    /// (a daemon `vdk open` starts logs to daemon.log beside its socket this way).
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// Serve this user too (a name or uid): a daemon run as root (for loop devices and
    /// mounts) on behalf of an unprivileged user. The control and NBD sockets become that
    /// user's, and every path in the user's requests is checked against the user's own
    /// rights.
    #[arg(long, value_name = "USER")]
    pub owner: Option<String>,
    #[command(flatten)]
    pub nbd: crate::cli::nbd_opts::NbdArgs,
    #[command(flatten)]
    pub socket: crate::cli::SocketArg,
}

/// The uid and primary gid of `user` (a name from /etc/passwd, or a number).
fn user_ids(user: &str) -> anyhow::Result<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let found = passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && (f[0] == user || f[2] == user))
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
            .flatten()
    });
    match (found, user.parse::<u32>()) {
        (Some(ids), _) => Ok(ids),
        (None, Ok(uid)) => Ok((uid, uid)),
        (None, Err(_)) => bail!("--owner {user:?}: no such user"),
    }
}

/// Hands a socket file to the user the daemon serves.
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

/// Runs the daemon in the foreground until SIGTERM, SIGINT or a `shutdown` request.
pub fn run(args: &DaemonArgs, paths: &Paths) -> anyhow::Result<()> {
    own_dir(&paths.dir, dir_mode(args))?;
    let owner = args.owner.as_deref().map(user_ids).transpose()?;
    let control = bind_control(&paths.socket)?;
    give(&paths.socket, owner)?;
    // A daemon that died here may have left mounts that no longer answer.
    let recovered = recover::stale_mounts(paths);
    if !recovered.is_empty() {
        warn!(
            mounts = recovered.len(),
            "detached what a vdk daemon that died left mounted"
        );
    }
    if rustix::process::geteuid().is_root() {
        // The daemon writes back the pages of the disks it serves: let it allocate memory
        // under pressure instead of waiting for its own writeback (as loop and NBD daemons do).
        if let Err(e) = rustix::process::configure_io_flusher_behavior(true) {
            debug!(error = %e, "cannot mark the daemon as an I/O flusher");
        }
    }
    let (iscsi_listen, nbd_listen): (Vec<String>, Vec<String>) = args
        .listen
        .iter()
        .cloned()
        .partition(|u| u.starts_with("iscsi://"));
    let uris = if nbd_listen.is_empty() {
        vec![format!("unix://{}", paths.nbd_socket.display())]
    } else {
        nbd_listen
    };
    let iscsi_settings = iscsi::Settings {
        listen: iscsi_listen.clone(),
        auth: crate::cli::iscsi_auth(
            args.iscsi_chap.as_deref(),
            args.iscsi_mutual_chap.as_deref(),
            &args.iscsi_initiators,
        )?,
        all: args.iscsi_all,
    };
    let listeners = uris
        .iter()
        .map(|u| Listener::bind(u).with_context(|| format!("cannot listen on {u}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for l in &listeners {
        if let Listener::Unix(_, path) = l {
            give(path, owner)?;
        }
    }
    let config = args
        .nbd
        .config(ServerConfig::default().threads_per_connection)?;
    let tls = config.tls.clone();
    let server = Arc::new(Server::new(Vec::new(), config));
    let daemon = Arc::new(Daemon::new(
        paths.clone(),
        Arc::clone(&server),
        listeners
            .iter()
            .map(|l| l.export_uri(disks::EXPORT_PLACEHOLDER))
            .collect(),
        usize::from(args.fuse_threads),
        iscsi_settings,
        recovered,
    ));
    if !iscsi_listen.is_empty() {
        // Portals asked for by name start now, so that a wrong one fails at once.
        daemon
            .start_iscsi()
            .map_err(|e| anyhow::anyhow!(e.message))?;
    }
    let nbd_thread = thread::Builder::new().name("nbd".into()).spawn({
        let server = Arc::clone(&server);
        move || server.serve(listeners)
    })?;
    let stopping = Arc::new(AtomicBool::new(false));
    let mut signals =
        Signals::new([SIGINT, SIGTERM, SIGHUP]).context("cannot install signal handlers")?;
    let signal_handle = signals.handle();
    thread::spawn({
        let stopping = Arc::clone(&stopping);
        let socket = paths.socket.clone();
        move || {
            for sig in signals.forever() {
                if sig == SIGHUP {
                    crate::cli::nbd_opts::reload(tls.as_deref());
                    continue;
                }
                info!(signal = sig, "stopping: closing every disk");
                stop(&stopping, &socket);
                break;
            }
        }
    });
    info!(socket = %paths.socket.display(), pid = std::process::id(), "daemon ready");
    // Under systemd (Type=notify): ready now that requests are answered.
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        warn!(error = %e, "cannot tell the service manager the daemon is ready");
    }
    for conn in control.incoming() {
        if stopping.load(Ordering::SeqCst) {
            break;
        }
        match conn {
            Ok(conn) => {
                let daemon = Arc::clone(&daemon);
                let stopping = Arc::clone(&stopping);
                let socket = paths.socket.clone();
                let owner = owner.map(|o| o.0);
                thread::spawn(move || {
                    if let Err(e) = serve_control(&daemon, conn, &stopping, &socket, owner) {
                        debug!(error = %e, "control connection ended");
                    }
                });
            }
            Err(e) => warn!(error = %e, "accept on the control socket failed"),
        }
    }
    signal_handle.close();
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    daemon.close_all();
    server.shutdown_handle().shutdown();
    let nbd = nbd_thread.join();
    let _ = fs::remove_file(&paths.socket);
    info!("daemon stopped");
    match nbd {
        Ok(r) => r.context("NBD server"),
        Err(_) => bail!("the NBD server thread panicked"),
    }
}

/// The mode of the daemon's directory: its user's alone, or with `--owner` searchable by
/// that user too, who may reach the sockets in it but not list or change it.
pub fn dir_mode(args: &DaemonArgs) -> u32 {
    if args.owner.is_some() {
        0o711
    } else {
        0o700
    }
}

/// Makes the daemon's directory `dir` with `mode`, or takes the one there only if it is a
/// directory (not a symbolic link) of the daemon's own user with exactly that mode. An existing
/// directory is never changed: one that is someone else's, or open wider (`/tmp`), or closed
/// to the user it must serve, is refused with what to do.
pub fn own_dir(dir: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let shown = dir.display();
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .mode(mode)
                .create(dir)
                .with_context(|| format!("cannot create {shown}"))?;
            // Made here: its mode is set whatever the umask took away.
            fs::set_permissions(dir, fs::Permissions::from_mode(mode))
                .with_context(|| format!("cannot set the mode of {shown}"))?;
            Ok(())
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("cannot use {shown}"))),
        Ok(m) if m.file_type().is_symlink() => bail!(
            "{shown} is a symbolic link: the daemon keeps its socket in a directory of its own \
             (remove it, or give --socket in a new directory)"
        ),
        Ok(m) if !m.is_dir() => bail!("{shown} is not a directory"),
        Ok(m) if m.uid() != rustix::process::geteuid().as_raw() => bail!(
            "{shown} belongs to uid {}, not to this daemon's user (uid {}): give --socket in \
             a directory of your own, or a new one",
            m.uid(),
            rustix::process::geteuid().as_raw()
        ),
        Ok(m) if m.mode() & 0o7777 != mode => bail!(
            "{shown} has mode {:04o}, not the {mode:04o} the daemon needs (others must not reach \
             what is in it, {}): the daemon changes no directory it did not make; give \
             --socket in a new directory, or remove {shown}",
            m.mode() & 0o7777,
            if mode == 0o711 {
                "and the --owner user must reach its socket"
            } else {
                "nor enter it"
            }
        ),
        Ok(_) => Ok(()),
    }
}

/// Binds the control socket with mode 0600. A socket file left by a dead daemon is replaced;
/// a live daemon is not.
fn bind_control(path: &Path) -> anyhow::Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!("a vdk daemon is already running on {}", path.display());
        }
        fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    let l = UnixListener::bind(path)
        .with_context(|| format!("cannot create the control socket {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    Ok(l)
}

/// Makes the accept loop end: sets the flag, then wakes it with a connection.
fn stop(stopping: &AtomicBool, socket: &Path) {
    stopping.store(true, Ordering::SeqCst);
    let _ = UnixStream::connect(socket);
}

/// Answers requests on one control connection until it closes.
fn serve_control(
    daemon: &Daemon,
    conn: UnixStream,
    stopping: &AtomicBool,
    socket: &Path,
    owner: Option<u32>,
) -> io::Result<()> {
    let mut writer = conn.try_clone()?;
    let caller = match access::Caller::of(&conn, owner) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "control connection refused");
            let resp = Response::err(ApiError::new(ErrorKind::Permission, e.to_string()));
            let mut out = serde_json::to_vec(&resp).map_err(io::Error::other)?;
            out.push(b'\n');
            return writer.write_all(&out);
        }
    };
    mount::set_requester(Some(caller.pid));
    let mut reader = BufReader::new(conn);
    while let Some(line) = control::read_line(&mut reader)? {
        let too_long = line.is_err();
        let mut stop_after = false;
        let checked = line
            .and_then(|l| control::parse(&l))
            .and_then(|r| caller.check(&r).map(|()| r));
        let resp = match checked {
            Ok(Request::Shutdown)
                if caller.uid != rustix::process::geteuid().as_raw() && caller.uid != 0 =>
            {
                Response::err(ApiError::new(
                    ErrorKind::Permission,
                    "only the daemon's own user or root may stop it",
                ))
            }
            Ok(Request::Shutdown) => {
                stop_after = true;
                Response::ok(serde_json::json!({}))
            }
            Ok(req) => {
                let made = caller.would_create(&req);
                let resp = daemon.handle(req, &caller);
                caller.adopt(&made);
                resp
            }
            Err(e) => Response::err(e),
        };
        let mut out = serde_json::to_vec(&resp).map_err(io::Error::other)?;
        out.push(b'\n');
        writer.write_all(&out)?;
        if stop_after {
            info!("stop requested over the control socket");
            stop(stopping, socket);
        }
        // The rest of an over-long line cannot be told from a next request: hang up.
        if too_long {
            break;
        }
    }
    Ok(())
}

impl Daemon {
    /// Refuses a request of a user the daemon serves (`--owner`) that would change a disk or
    /// a file system another user opened or mounted (root's, on a daemon they share).
    fn authorize(&self, req: &Request, caller: &access::Caller) -> Result<(), ApiError> {
        if caller.trusted {
            return Ok(());
        }
        let disk = match req {
            Request::Close(r) | Request::Unmount(r) | Request::Eject(r) => Some(&r.disk),
            Request::Mount(r) => Some(&r.disk),
            Request::Stats(r) => Some(&r.disk),
            Request::Commit(r) | Request::Discard(r) => Some(&r.disk),
            Request::Snapshot(r) => Some(&r.disk),
            Request::Insert(r) => Some(&r.disk),
            Request::FsMount(r) => Some(&r.source),
            _ => None,
        };
        let theirs = |what: String, opener: u32| {
            ApiError::new(
                ErrorKind::Permission,
                format!(
                    "{what} was opened by uid {opener}: only that user (or root) may change it"
                ),
            )
        };
        if let Some(key) = disk {
            if let Ok(d) = self.find(key) {
                if !caller.may_manage(d.opener) {
                    return Err(theirs(d.id.clone(), d.opener));
                }
            }
        }
        if let Request::FsUnmount(r) = req {
            if let Some(opener) = self.fs_opener(&r.dir) {
                if !caller.may_manage(opener) {
                    return Err(theirs(r.dir.display().to_string(), opener));
                }
            }
        }
        Ok(())
    }

    fn handle(&self, req: Request, caller: &access::Caller) -> Response {
        if let Err(e) = self.authorize(&req, caller) {
            return Response::err(e);
        }
        let done = match req {
            Request::Version => Ok(serde_json::json!({
                "version": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(),
                "recovered": self.recovered,
            })),
            Request::Open(r) => self.open(*r, caller.uid).map(|s| serde_json::json!(s)),
            Request::Close(r) => self.close(&r.disk, r.force).map(|s| serde_json::json!(s)),
            Request::List => Ok(serde_json::json!(self.list(caller))),
            Request::Mount(r) => self.mount(r).map(|s| serde_json::json!(s)),
            Request::Unmount(r) => self.unmount(&r.disk, r.force).map(|s| serde_json::json!(s)),
            Request::Stats(r) => self.stats(&r.disk),
            Request::Commit(r) => self.commit(&r.disk, false, r.force),
            Request::Discard(r) => self.commit(&r.disk, true, r.force),
            Request::Snapshot(r) => self.snapshot(&r.disk, &r.new, r.force),
            Request::Eject(r) => self.eject(&r.disk, r.force).map(|s| serde_json::json!(s)),
            Request::Insert(r) => self.insert(&r.disk, &r.image).map(|s| serde_json::json!(s)),
            Request::FsMount(r) => self.fs_mount(&r, caller.uid).map(|s| serde_json::json!(s)),
            Request::FsUnmount(r) => self
                .fs_unmount(&r.dir, r.force)
                .map(|s| serde_json::json!(s)),
            Request::FsList => Ok(serde_json::json!(self.fs_list(caller))),
            Request::FsMap(r) => {
                let who = vdk_drive::Access {
                    uid: caller.uid,
                    gid: caller.gid,
                    shared: false,
                };
                self.fs_map(&r, who).map(|s| serde_json::json!(s))
            }
            Request::Shutdown => Err(ApiError::new(
                control::ErrorKind::BadRequest,
                "shutdown is handled by the connection",
            )),
        };
        match done {
            Ok(v) => Response::ok(v),
            Err(e) => {
                debug!(error = %e.message, "request failed");
                Response::err(e)
            }
        }
    }
}
