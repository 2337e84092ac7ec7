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

/// Two connected sockets, for the TLS pump: a Unix socket pair.
pub fn plain_pair() -> io::Result<(Stream, Stream)> {
    let (a, b) = UnixStream::pair()?;
    Ok((Stream::Unix(a), Stream::Unix(b)))
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
