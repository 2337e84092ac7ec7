//! The platform's calls behind the NBD server, one file per platform with the same names
//! (the shape of vdk_core::sys): Unix domain sockets, and waiting on two sockets at once for
//! the TLS pump. Windows has neither as such yet: its port adds `windows.rs` (AF_UNIX
//! sockets through a crate, a loopback pair for TLS, WSAPoll).

#[cfg(target_os = "linux")]
#[path = "linux.rs"]
mod os;

pub use os::*;
