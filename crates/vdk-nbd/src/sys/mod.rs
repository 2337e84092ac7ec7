//! The platform's calls behind the NBD server, one file per platform with the same names
//! (the shape of vdk_core::sys): Unix domain sockets.

#[cfg(target_os = "linux")]
#[path = "linux.rs"]
mod os;
#[cfg(windows)]
#[path = "windows.rs"]
mod os;

pub use os::*;
