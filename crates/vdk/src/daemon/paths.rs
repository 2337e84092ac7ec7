//! Where a daemon keeps its sockets, its FUSE export, its records and its log: the directory
//! of its control socket, which it makes and owns.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

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

/// The mode of the daemon's directory: its user's alone, or with `--owner` searchable by
/// that user too, who may reach the sockets in it but not list or change it.
pub fn dir_mode(owner: bool) -> u32 {
    if owner {
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
