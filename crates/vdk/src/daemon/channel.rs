//! The control channel: a Unix socket (mode 0600, in the daemon's own directory) on Linux, a
//! named pipe on Windows. One connection per client, a JSON request per line each way.

use std::io;

use super::Paths;

/// The NBD listener of a daemon given none: `nbd.sock` beside its control socket.
#[cfg(unix)]
pub fn default_nbd(paths: &Paths) -> String {
    format!("unix://{}", paths.nbd_socket.display())
}

/// The NBD listener of a daemon given none: loopback TCP, as `vdk serve` (Windows has no
/// Unix socket vdk can use yet).
#[cfg(windows)]
pub fn default_nbd(_paths: &Paths) -> String {
    "tcp://127.0.0.1:10809".into()
}

#[cfg(unix)]
pub use unix::*;
#[cfg(windows)]
pub use windows::*;

#[cfg(unix)]
mod unix {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::Path;

    use anyhow::{bail, Context};

    /// A control connection.
    pub type Conn = UnixStream;

    /// The control socket, listening.
    #[derive(Debug)]
    pub struct Channel(UnixListener);

    impl Channel {
        /// The next client.
        pub fn accept(&mut self) -> std::io::Result<Conn> {
            self.0.accept().map(|(c, _)| c)
        }
    }

    /// Binds the control socket with mode 0600. A socket file left by a dead daemon is
    /// replaced; a live daemon is not.
    pub fn bind(path: &Path) -> anyhow::Result<Channel> {
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
        Ok(Channel(l))
    }

    /// Wakes a blocked [`Channel::accept`] with a connection.
    pub fn wake(path: &Path) {
        let _ = UnixStream::connect(path);
    }

    /// Removes the socket file once the daemon is done.
    pub fn remove(path: &Path) {
        let _ = fs::remove_file(path);
    }
}

#[cfg(windows)]
mod windows {
    use std::path::Path;

    use anyhow::{bail, Context};
    use vdk_core::sys::{PipeConn, PipeListener};

    /// A control connection.
    pub type Conn = PipeConn;

    /// The control pipe, listening.
    #[derive(Debug)]
    pub struct Channel(PipeListener);

    impl Channel {
        /// The next client.
        pub fn accept(&mut self) -> std::io::Result<Conn> {
            self.0.accept()
        }
    }

    /// Creates the control pipe; fails if a daemon has it.
    pub fn bind(path: &Path) -> anyhow::Result<Channel> {
        match PipeListener::bind(path) {
            Ok(l) => Ok(Channel(l)),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                bail!("a vdk daemon is already running on {}", path.display())
            }
            Err(e) => {
                Err(e).with_context(|| format!("cannot create the control pipe {}", path.display()))
            }
        }
    }

    /// Wakes a blocked [`Channel::accept`] with a connection.
    pub fn wake(path: &Path) {
        let _ = vdk_core::sys::connect_pipe(path);
    }

    /// A pipe goes with its last handle: nothing to remove.
    pub fn remove(_path: &Path) {}
}

/// A second handle on a connection, for the answers.
pub fn writer(conn: &Conn) -> io::Result<Box<dyn io::Write + Send>> {
    #[cfg(unix)]
    return Ok(Box::new(conn.try_clone()?));
    #[cfg(windows)]
    return Ok(Box::new(conn.file.try_clone()?));
}

/// The connection as the reader of requests.
pub fn reader(conn: Conn) -> Box<dyn io::Read + Send> {
    #[cfg(unix)]
    return Box::new(conn);
    #[cfg(windows)]
    return Box::new(conn.file);
}
