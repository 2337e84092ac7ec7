//! The platform's calls behind the NBD server, one file per platform with the same names
//! (the shape of vdk_core::sys): Unix domain sockets, and the socket pair of the TLS pump.
//! Waiting on two sockets at once is the same everywhere (rustix's `poll`, which is WSAPoll
//! on Windows), so it lives here.

use std::io;

use rustix::event::{poll, PollFd, PollFlags};
use rustix::fd::AsFd;

#[cfg(target_os = "linux")]
#[path = "linux.rs"]
mod os;
#[cfg(windows)]
#[path = "windows.rs"]
mod os;

pub use os::*;

/// What to wait for on one socket.
#[derive(Clone, Copy, Debug, Default)]
pub struct Want {
    /// Bytes to read.
    pub read: bool,
    /// Room to write.
    pub write: bool,
}

/// Waits until one of the two sockets is ready for what is wanted of it; true if a socket of
/// which nothing was wanted hung up (its peer closed), false otherwise.
pub fn wait_either(a: &impl AsFd, want_a: Want, b: &impl AsFd, want_b: Want) -> io::Result<bool> {
    let flags = |w: Want| {
        let mut f = PollFlags::empty();
        if w.read {
            f |= PollFlags::IN;
        }
        if w.write {
            f |= PollFlags::OUT;
        }
        f
    };
    let (fa, fb) = (flags(want_a), flags(want_b));
    let mut fds = [PollFd::new(a, fa), PollFd::new(b, fb)];
    match poll(&mut fds, None) {
        Ok(_) => {}
        Err(rustix::io::Errno::INTR) => return Ok(false),
        Err(e) => return Err(e.into()),
    }
    let hup = |f: &PollFd<'_>| {
        f.revents()
            .intersects(PollFlags::HUP | PollFlags::ERR | PollFlags::NVAL)
    };
    Ok(fa.is_empty() && fb.is_empty() && (hup(&fds[0]) || hup(&fds[1])))
}
