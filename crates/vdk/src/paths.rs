//! Where a daemon keeps its sockets, its FUSE export, its records and its log: the directory
//! of its control socket, which it makes and owns.

use std::path::{Path, PathBuf};

use anyhow::bail;
#[cfg(unix)]
use anyhow::Context;

/// Where a daemon keeps its sockets, its FUSE export and its log: the directory of its
/// control socket.
#[derive(Clone, Debug)]
// Only the daemon, which runs on Linux alone yet, uses more than the socket.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
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
    #[cfg(unix)]
    pub fn new(socket: Option<&Path>) -> anyhow::Result<Paths> {
        let socket = match socket {
            Some(s) => absolute(s)?,
            None => default_dir()?.join("control.sock"),
        };
        let dir = socket
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/"));
        Ok(Paths::in_dir(dir, socket))
    }

    /// The paths of the daemon whose control pipe is `socket` (`\\.\pipe\NAME`), or the
    /// default one (`\\.\pipe\vdk-USER`). Its directory is `%LOCALAPPDATA%\vdk`, or
    /// `%LOCALAPPDATA%\vdk\NAME` for a pipe of another name.
    #[cfg(windows)]
    pub fn new(socket: Option<&Path>) -> anyhow::Result<Paths> {
        const PREFIX: &str = r"\\.\pipe\";
        let Some(socket) = socket else {
            let user = vdk_core::sys::user_name();
            return Ok(Paths::in_dir(
                default_dir()?,
                PathBuf::from(format!("{PREFIX}vdk-{user}")),
            ));
        };
        let text = socket.to_string_lossy();
        let Some(name) = text
            .strip_prefix(PREFIX)
            .filter(|n| !n.is_empty() && !n.contains('\\'))
        else {
            bail!("--socket {text}: on Windows the daemon listens on a named pipe, {PREFIX}NAME");
        };
        Ok(Paths::in_dir(
            default_dir()?.join(name),
            socket.to_path_buf(),
        ))
    }

    fn in_dir(dir: PathBuf, socket: PathBuf) -> Paths {
        Paths {
            nbd_socket: dir.join("nbd.sock"),
            fuse: dir.join("disks"),
            log: dir.join("daemon.log"),
            socket,
            dir,
        }
    }
}

#[cfg(unix)]
fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("bad path {}", p.display()))
}

/// `/run/vdk` for root, `$XDG_RUNTIME_DIR/vdk` for everyone else.
#[cfg(unix)]
fn default_dir() -> anyhow::Result<PathBuf> {
    if rustix::process::geteuid().is_root() {
        return Ok(PathBuf::from("/run/vdk"));
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => Ok(PathBuf::from(d).join("vdk")),
        _ => bail!("XDG_RUNTIME_DIR is not set: give the control socket with --socket PATH"),
    }
}

/// `%LOCALAPPDATA%\vdk`: the user's own, as the runtime directory is on Linux.
#[cfg(windows)]
fn default_dir() -> anyhow::Result<PathBuf> {
    match std::env::var_os("LOCALAPPDATA") {
        Some(d) if !d.is_empty() => Ok(PathBuf::from(d).join("vdk")),
        _ => bail!("LOCALAPPDATA is not set: the daemon keeps its log and records there"),
    }
}

/// The canonical form of `p` (symbolic links resolved, absolute); on Windows without the
/// `\\?\` prefix where the path does not need it, as users write paths.
pub fn canonical(p: &Path) -> std::io::Result<PathBuf> {
    #[cfg(windows)]
    return dunce::canonicalize(p);
    #[cfg(not(windows))]
    return std::fs::canonicalize(p);
}
