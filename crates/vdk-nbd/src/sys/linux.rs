//! Linux.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};

pub use std::os::unix::net::{UnixListener, UnixStream};

use crate::stream::Stream;

/// Send buffer asked for on Unix connections.
const UNIX_SNDBUF: usize = 4 << 20;

/// Gives a Unix connection a large send buffer, so that a 1 MiB reply goes out with fewer
/// waits for the client to drain it. The kernel caps it at net.core.wmem_max; a failure only
/// leaves the default. (Not for TCP, where it would turn off auto-tuning.)
pub fn large_send_buffer(s: &UnixStream) {
    let _ = rustix::net::sockopt::set_socket_send_buffer_size(s, UNIX_SNDBUF);
}

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
    use rustix::event::{poll, PollFd, PollFlags};
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

/// For `wait_either`: a stream is polled through its descriptor.
impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}
