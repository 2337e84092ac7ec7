//! The NBD server: listeners, connections and the threads that serve them.
//!
//! Each connection has one reader thread and, on demand, a few workers:
//!
//! ```text
//!   socket ─► reader: parse request ─┬─ disk can answer at once (try_read_at/try_write_at)
//!                                    │    └─► reply appended to the batch
//!                                    └─ it would wait (cache miss, flush, FUA, trim, ...)
//!                                         └─► queue ─► worker: run it, send its reply
//!   batch ─► one writev, whenever the reader is about to wait for the client
//! ```
//!
//! A burst of requests that the disk answers from memory (a RAM disk, a file's page cache)
//! costs one read and one write system call and no thread hand-off; requests that wait run in
//! parallel on up to [`ServerConfig::threads_per_connection`] workers, and their replies go
//! out as they finish, in any order. Replies are whole: the write lock is held for a reply's
//! header and data together.
//!
//! What a client can cost is bounded ([`ServerConfig`]): connections per server and per
//! address, the handshake's whole duration, requests and bytes queued for workers per
//! connection (past them the reader stops reading, and TCP pushes back on the client), a
//! stall inside a request or a reply, and, if set, time without requests.
//!
//! Listeners, connections and shutdown are [`vdk_core::lifecycle`]'s, as for every front end:
//! shutdown ([`ShutdownHandle::shutdown`]) stops the listeners, then shuts down the reading
//! side of every connection: requests already read are finished and answered, then the
//! connection closes and every export is flushed (all of them, every failure reported).
//!
//! The files: this one the server and its exports, `conn` a connection (handshake, reader,
//! workers), `reply` the serving of one request and its reply.

mod conn;
mod reply;

use std::io;
use std::net::Shutdown;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tracing::warn;
use vdk_core::lifecycle::{self, Lifecycle, Stop};
use vdk_core::sync::{read, write};

use crate::export::Export;
use crate::negotiate::Exports;
use crate::stream::{Listener, Stream};
use crate::tls::Tls;

/// Tunables and limits of a server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Most threads serving one connection at once (requests in parallel).
    pub threads_per_connection: usize,
    /// Longest a whole handshake may take, TLS included, from accept to the export chosen.
    pub handshake_timeout: Duration,
    /// Longest a request may take to arrive once its first byte has, and a reply to be taken
    /// by the client: past it the connection is stalled and is closed.
    pub io_timeout: Duration,
    /// Close a connection with no request for this long (`None`: never; block devices of
    /// idle machines stay connected for days).
    pub idle_timeout: Option<Duration>,
    /// TCP keep-alive: a client whose host vanished is found after about twice this.
    pub keepalive: Duration,
    /// Most connections at once; more are closed at accept.
    pub max_connections: usize,
    /// Most connections at once from one IP address.
    pub max_connections_per_address: usize,
    /// Most requests of one connection queued for or running on workers.
    pub max_requests_in_flight: usize,
    /// Most request and reply bytes of one connection queued for or held by workers.
    pub max_bytes_in_flight: u64,
    /// TLS, if offered.
    pub tls: Option<Arc<Tls>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            threads_per_connection: 16,
            handshake_timeout: Duration::from_secs(30),
            io_timeout: Duration::from_secs(60),
            idle_timeout: None,
            keepalive: Duration::from_secs(60),
            max_connections: 1024,
            max_connections_per_address: 256,
            max_requests_in_flight: 256,
            max_bytes_in_flight: 128 << 20,
            tls: None,
        }
    }
}

/// An NBD server over a set of exports, which may change while it serves.
#[derive(Debug)]
pub struct Server {
    exports: Arc<ExportSet>,
    config: Arc<ServerConfig>,
    life: Lifecycle,
}

/// Stops a running server from another thread (a signal handler's thread, a test).
#[derive(Clone, Debug)]
pub struct ShutdownHandle(Lifecycle);

impl ShutdownHandle {
    /// Stops accepting, lets connections finish the requests they have read, and closes them.
    /// [`Server::serve`] then flushes every export and returns.
    pub fn shutdown(&self) {
        self.0.shutdown();
    }
}

impl Server {
    /// A server of `exports`; the first is the default export.
    pub fn new(exports: Vec<Export>, config: ServerConfig) -> Server {
        let exports = exports.into_iter().map(Arc::new).collect();
        Server {
            exports: Arc::new(ExportSet(RwLock::new(exports))),
            life: Lifecycle::new(config.max_connections, config.max_connections_per_address),
            config: Arc::new(config),
        }
    }

    /// Offers one more export to new connections. Fails if its name is taken.
    pub fn add_export(&self, export: Export) -> io::Result<()> {
        let mut list = write(&self.exports.0);
        if list.iter().any(|e| e.name == export.name) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("an export named {:?} exists", export.name),
            ));
        }
        list.push(Arc::new(export));
        Ok(())
    }

    /// Withdraws the export `name`: new clients no longer see it, and its connections are
    /// ended as at shutdown (requests already read are answered first). Returns once they are
    /// gone, with the export, or `None` if there was no such export.
    pub fn remove_export(&self, name: &str) -> Option<Arc<Export>> {
        let removed = {
            let mut list = write(&self.exports.0);
            let at = list.iter().position(|e| e.name == name)?;
            list.remove(at)
        };
        // A client still choosing it tags its connection, then finds it gone (conn.rs).
        self.life.end_tagged(name);
        Some(removed)
    }

    /// Client connections open now (those still negotiating included).
    pub fn connections(&self) -> usize {
        self.life.connections()
    }

    /// A handle that stops [`Server::serve`].
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.life.clone())
    }

    /// Serves clients of all `listeners` until shut down, then waits for the connections to
    /// close and flushes every export.
    pub fn serve(&self, listeners: Vec<Listener>) -> io::Result<()> {
        self.life
            .accept(&listeners, |stream| self.spawn_connection(stream));
        self.life.wait_closed();
        self.flush_all()
    }

    /// Serves the one client on `stream` (inetd style), then flushes every export.
    pub fn serve_one(&self, stream: Stream) -> io::Result<()> {
        self.spawn_connection(stream);
        self.life.wait_closed();
        self.flush_all()
    }

    /// Serves one already-connected client on new threads, unless the connection limits
    /// are reached: then it is closed at once.
    pub fn spawn_connection(&self, stream: Stream) {
        self.spawn_with(stream, Arc::clone(&self.config), false);
    }

    /// [`Server::spawn_connection`] of one end of a socket pair the serving process made for
    /// itself (the kernel's NBD client of its own disks): no one else can reach it, so it
    /// negotiates in the clear even where TLS is required of every other client, and every
    /// export lets it in whatever its allow-list says of others.
    #[cfg(unix)]
    pub fn spawn_own_connection(&self, stream: std::os::unix::net::UnixStream) {
        let config = ServerConfig {
            tls: None,
            ..(*self.config).clone()
        };
        self.spawn_with(Stream::Unix(stream), Arc::new(config), true);
    }

    fn spawn_with(&self, stream: Stream, config: Arc<ServerConfig>, own: bool) {
        let peer = stream.peer();
        let handle = match stream.try_clone() {
            Ok(h) => h,
            Err(e) => {
                warn!(%peer, error = %e, "cannot clone a client socket, closing it");
                return;
            }
        };
        // Stopping a connection ends its reading side: what it has read is still answered.
        let stop: Stop = Arc::new(move || drop(handle.shutdown(Shutdown::Read)));
        stream.set_keepalive(config.keepalive);
        let exports = Arc::clone(&self.exports);
        let ip = stream.peer_ip();
        let run = move |c: &lifecycle::Connection| conn::run(stream, c, (&exports, &config), own);
        if let Err(why) = self.life.spawn("nbd-conn", ip, stop, run) {
            warn!(%peer, "connection refused: {why}");
        }
    }

    fn flush_all(&self) -> io::Result<()> {
        let exports = self.exports.all();
        let disks = exports.iter().map(|e| (e.name.clone(), &*e.device));
        lifecycle::flush_all(disks).map_err(io::Error::other)
    }
}

/// The exports of a server.
#[derive(Debug)]
struct ExportSet(RwLock<Vec<Arc<Export>>>);

impl Exports for ExportSet {
    fn find(&self, name: &str) -> Option<Arc<Export>> {
        read(&self.0).find(name)
    }
    fn all(&self) -> Vec<Arc<Export>> {
        read(&self.0).clone()
    }
}
