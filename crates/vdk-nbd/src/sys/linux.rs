//! Linux.

pub use std::os::unix::net::{UnixListener, UnixStream};

/// Send buffer asked for on Unix connections.
const UNIX_SNDBUF: usize = 4 << 20;

/// Gives a Unix connection a large send buffer, so that a 1 MiB reply goes out with fewer
/// waits for the client to drain it. The kernel caps it at net.core.wmem_max; a failure only
/// leaves the default. (Not for TCP, where it would turn off auto-tuning.)
pub fn large_send_buffer(s: &UnixStream) {
    let _ = rustix::net::sockopt::set_socket_send_buffer_size(s, UNIX_SNDBUF);
}
