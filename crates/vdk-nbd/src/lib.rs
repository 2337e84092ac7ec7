//! An NBD server for vdk disks.
//!
//! [`proto`] turns the bytes of the NBD protocol into typed messages and back, with no I/O;
//! [`negotiate`] runs the handshake over any stream; [`Server`] owns the sockets and threads.
//!
//! ```no_run
//! use std::sync::Arc;
//! use vdk_backends::MemoryDisk;
//! use vdk_nbd::{Export, Listener, Server, ServerConfig};
//!
//! let disk = Arc::new(MemoryDisk::new(1 << 30));
//! let server = Server::new(vec![Export::new("ram", disk)], ServerConfig::default());
//! server.serve(vec![Listener::tcp("127.0.0.1:10809")?])?;
//! # Ok::<(), std::io::Error>(())
//! ```
#![deny(unsafe_code)] // one module allows it: tls/seal13.rs (AWS-LC's AEAD, out of place)
#![warn(missing_docs)]
// Tests build small buffers from constants; production code converts with checks.
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

pub mod client;
mod export;
pub mod negotiate;
pub mod proto;
mod server;
mod stream;
mod sys;
pub mod tls;

use std::sync::Arc;

use vdk_core::BlockDevice;

pub use export::{Export, Peer, Rule};
pub use server::{Server, ServerConfig, ShutdownHandle};
pub use stream::{Listener, Stream};
pub use tls::{Tls, TlsMode};

/// Serves one disk as the default export at `uri` (`tcp://HOST:PORT` or `unix:///PATH`) until
/// the process ends: the one call a custom disk needs.
pub fn serve(device: Arc<dyn BlockDevice>, uri: &str) -> std::io::Result<()> {
    let server = Server::new(vec![Export::new("", device)], ServerConfig::default());
    server.serve(vec![Listener::bind(uri)?])
}
