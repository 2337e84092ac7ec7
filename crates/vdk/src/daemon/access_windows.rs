//! Who is asking, on Windows. The control pipe's access list admits only its owner (the
//! daemon's user), the Administrators and SYSTEM (vdk_core::sys's pipe), and each client's
//! token is checked for the same, so everyone who can send a request has the daemon's rights
//! or more and no path is checked further (the Linux daemon's `--owner` mode, which serves a
//! second user, has no Windows twin yet).

use std::io;
use std::path::PathBuf;

use crate::control::{ApiError, Request};

/// The peer of a control connection.
#[derive(Clone, Debug)]
pub struct Caller {
    /// No user ids on Windows: 0, as for the daemon's own disks.
    pub uid: u32,
    /// Its process id (`GetNamedPipeClientProcessId`).
    pub pid: u32,
    /// Always: the pipe admits no one with fewer rights than the daemon's.
    pub trusted: bool,
}

impl Caller {
    /// The client of `conn`, if it runs as the daemon's user, an elevated Administrator or
    /// SYSTEM (the pipe's access list admits only those; this checks the client's token too).
    pub fn of(conn: &vdk_core::sys::PipeConn) -> io::Result<Caller> {
        let peer = vdk_core::sys::peer_identity(conn.pid)?;
        if !peer.same_user && !peer.admin_or_system {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "this daemon ({}) takes no requests from another user: start your own \
                     with `vdk daemon`",
                    vdk_core::sys::user_name()
                ),
            ));
        }
        Ok(Caller {
            uid: 0,
            pid: conn.pid,
            trusted: true,
        })
    }

    /// Whether this caller may change what `opener` opened: always.
    pub fn may_manage(&self, _opener: u32) -> bool {
        true
    }

    /// Nothing to check for a trusted caller.
    pub fn check(&self, _req: &Request) -> Result<(), ApiError> {
        Ok(())
    }

    /// Nothing is given away on Windows.
    pub fn would_create(&self, _req: &Request) -> Vec<PathBuf> {
        Vec::new()
    }

    /// Nothing is given away on Windows.
    pub fn adopt(&self, _made: &[PathBuf]) {}
}
