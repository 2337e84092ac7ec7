//! `vdk daemon`: its options, read into the plain configuration the daemon runs with.

use std::fs;
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use super::disks::{call, connect};
use crate::control::{Client, Request, VersionInfo};
use crate::daemon::{self, IscsiSettings};
use crate::front::{Listen, VHOST_SCHEME};
use crate::paths::Paths;

/// Longest wait for a daemon started in the background to answer.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Options of `vdk daemon`.
#[derive(Debug, Args)]
#[command(after_help = "\
The daemon starts by itself when `vdk open` needs it; run it by hand for systemd or a
container. It serves every open disk over NBD (by default on nbd.sock beside the control
socket; on Windows tcp://127.0.0.1:10809) and stops on SIGTERM or SIGINT (Ctrl-C), closing
every disk as `vdk close` does.")]
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
    #[cfg(target_os = "linux")]
    #[arg(long, default_value_t = vdk_attach::fuse::DEFAULT_THREADS as u16,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub fuse_threads: u16,
    /// Pass raw images with no filter through to their files (FUSE passthrough, Linux 6.9+):
    /// fuse-loop at the kernel loop device's speed, but what passes through is not counted in
    /// stats, and if the daemon dies, I/O to such disks goes on instead of failing (also on
    /// with VDK_FUSE_PASSTHROUGH=1 in the environment of `vdk open`, which starts the daemon).
    #[cfg(target_os = "linux")]
    #[arg(long)]
    pub fuse_passthrough: bool,
    /// Serve ublk devices by copy even where the kernel offers zero copy (Linux 6.16+, raw
    /// images with no filter; also with VDK_UBLK_ZERO_COPY=0 in the environment of `vdk
    /// open`, which starts the daemon).
    #[cfg(target_os = "linux")]
    #[arg(long)]
    pub ublk_copy: bool,
    /// Serve Prometheus metrics on http://HOST:PORT/metrics (per disk I/O counters, latency
    /// histograms, requests in flight, object-store caches and uploads, connections per
    /// front end, the process's memory and files): tcp://HOST:PORT. No authentication: keep
    /// it on loopback or a trusted network.
    #[arg(long, value_name = "URI")]
    pub metrics: Option<String>,
    /// Ask the running daemon to close every disk and stop.
    #[arg(long, conflicts_with = "reload")]
    pub stop: bool,
    /// Ask the running daemon to read its TLS certificates again (new connections get them;
    /// on Linux SIGHUP does the same).
    #[arg(long)]
    pub reload: bool,
    /// Register the daemon as a Windows service with the other options given (started at
    /// boot as LocalSystem, on the pipe \\.\pipe\vdk unless --socket says otherwise).
    #[cfg(windows)]
    #[arg(long, conflicts_with_all = ["stop", "reload", "uninstall_service"])]
    pub install_service: bool,
    /// Stop the Windows service (closing its disks) and remove it.
    #[cfg(windows)]
    #[arg(long, conflicts_with_all = ["stop", "reload"])]
    pub uninstall_service: bool,
    /// Run as the Windows service (the service control manager starts vdk so).
    #[cfg(windows)]
    #[arg(long, hide = true)]
    pub service: bool,
    /// Log to FILE instead of stderr; past 16 MiB it moves to FILE.1 and a new one starts
    /// (a daemon `vdk open` starts logs to daemon.log beside its socket this way).
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// Serve this user too (a name or uid): a daemon run as root (for loop devices and
    /// mounts) on behalf of an unprivileged user. The control and NBD sockets become that
    /// user's, and every path in the user's requests is checked against the user's own
    /// rights.
    #[cfg(target_os = "linux")]
    #[arg(long, value_name = "USER")]
    pub owner: Option<String>,
    #[command(flatten)]
    pub nbd: super::nbd_opts::NbdArgs,
    #[command(flatten)]
    pub socket: super::SocketArg,
}

impl DaemonArgs {
    /// The configuration these options ask for: certificates and CHAP secrets read, the
    /// user found.
    pub fn config(&self) -> anyhow::Result<daemon::Config> {
        let listen = Listen::split(&self.listen);
        if let Some(path) = listen.vhost.first() {
            anyhow::bail!(
                "--listen {}{path}: a vhost-user socket serves one disk: vdk open IMAGE --vhost-user PATH",
                VHOST_SCHEME
            );
        }
        Ok(daemon::Config {
            nbd_listen: listen.nbd,
            nbd: self
                .nbd
                .config(vdk_nbd::ServerConfig::default().threads_per_connection)?,
            iscsi: IscsiSettings {
                listen: listen.iscsi,
                auth: super::iscsi_auth(
                    self.iscsi_chap.as_deref(),
                    self.iscsi_mutual_chap.as_deref(),
                    &self.iscsi_initiators,
                )?,
                all: self.iscsi_all,
            },
            #[cfg(target_os = "linux")]
            fuse_threads: usize::from(self.fuse_threads),
            #[cfg(target_os = "linux")]
            fuse_passthrough: self.fuse_passthrough
                || std::env::var_os("VDK_FUSE_PASSTHROUGH").is_some_and(|v| v == "1"),
            #[cfg(target_os = "linux")]
            ublk_zero_copy: !self.ublk_copy
                && std::env::var_os("VDK_UBLK_ZERO_COPY").is_none_or(|v| v != "0"),
            #[cfg(target_os = "linux")]
            owner: self.owner.as_deref().map(user_ids).transpose()?,
            #[cfg(not(target_os = "linux"))]
            owner: None,
            metrics: self.metrics.clone(),
        })
    }
}

/// Runs `vdk daemon`: the daemon itself, or with --stop a request that it stop.
pub fn run(args: &DaemonArgs) -> anyhow::Result<()> {
    let paths = args.socket.paths()?;
    if args.stop {
        return stop(&paths);
    }
    #[cfg(windows)]
    {
        if args.install_service {
            // The options given with it, for the service's command line.
            let rest: Vec<std::ffi::OsString> = std::env::args_os()
                .skip_while(|a| a != "daemon")
                .skip(1)
                .filter(|a| a != "--install-service")
                .collect();
            super::service::install(&rest)?;
            return crate::outln!(
                "installed the vdk service: it starts at boot; `sc start vdk` starts it now"
            );
        }
        if args.uninstall_service {
            super::service::uninstall()?;
            return crate::outln!("removed the vdk service");
        }
        if args.service {
            return super::service::run(args.config()?, paths);
        }
    }
    if args.reload {
        let mut client = connect(&paths, false)?;
        call::<serde_json::Value>(&mut client, &Request::Reload)?;
        return crate::outln!("TLS certificates reloaded");
    }
    daemon::run(&args.config()?, &paths)
}

/// The uid and primary gid of `user` (a name from /etc/passwd, or a number).
#[cfg(target_os = "linux")]
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

/// Starts `vdk daemon` in the background, logging to `daemon.log` beside its socket, and
/// waits until it answers.
pub fn start(paths: &Paths) -> anyhow::Result<Client> {
    let mut dir = fs::DirBuilder::new();
    dir.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut dir, 0o700);
    dir.create(&paths.dir)
        .with_context(|| format!("cannot create {}", paths.dir.display()))?;
    let log = super::log::open_log(&paths.log)
        .with_context(|| format!("cannot write the daemon log {}", paths.log.display()))?;
    let exe = std::env::current_exe().context("cannot find the vdk executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("daemon")
        .arg("--socket")
        .arg(&paths.socket)
        .arg("--log")
        .arg(&paths.log)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // Its own process group: a Ctrl-C meant for this command does not reach it.
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    // On Windows, and no console of its own either.
    #[cfg(windows)]
    std::os::windows::process::CommandExt::creation_flags(
        &mut cmd,
        CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW,
    );
    let mut child = cmd.spawn().context("cannot start the vdk daemon")?;
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

/// Runs `vdk daemon --stop`.
fn stop(paths: &Paths) -> anyhow::Result<()> {
    let mut client = connect(paths, false)?;
    call::<serde_json::Value>(&mut client, &Request::Shutdown)?;
    // The daemon closes its disks, then its socket: wait for that, so that a script can
    // rely on everything being closed when this returns.
    let started = Instant::now();
    while !gone(paths) {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the vdk daemon is still running after 60s");
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Whether the daemon's control socket is gone (it removes it last).
#[cfg(unix)]
fn gone(paths: &Paths) -> bool {
    !paths.socket.exists()
}

/// Whether the daemon's control pipe is gone (with the process).
#[cfg(windows)]
fn gone(paths: &Paths) -> bool {
    matches!(Client::connect(&paths.socket), Err(e) if e.kind() == io::ErrorKind::NotFound)
}

/// `CREATE_NEW_PROCESS_GROUP`: Ctrl-C in the console that started it does not reach it.
#[cfg(windows)]
const CREATE_NEW_PROCESS_GROUP: u32 = 0x0000_0200;
/// `CREATE_NO_WINDOW`: a background process with no console window.
#[cfg(windows)]
const CREATE_NO_WINDOW: u32 = 0x0800_0000;
