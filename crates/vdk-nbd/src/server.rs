//! The NBD server: listeners, connections and the threads that serve them.
//!
//! Each connection is served by a small pool of threads that take turns reading:
//!
//! ```text
//!   socket ──read lock──► thread A: parse request, read payload, release lock,
//!                                   run it on the disk, reply under the write lock
//!                         thread B: waits for the read lock meanwhile, then the same
//! ```
//!
//! A thread that has just read a request and sees nobody waiting to read next starts another
//! thread (up to [`ServerConfig::threads_per_connection`]), so a connection with one request
//! at a time keeps one thread and a deep queue gets parallel service with no hand-off between
//! a reader and workers. Replies go out as requests finish, in any order. Reads from the
//! socket are buffered, so several small requests cost one system call; a reply is one
//! `writev` of header and data.
//!
//! Shutdown ([`ShutdownHandle::shutdown`]) stops the listeners, then shuts down the reading
//! side of every connection: requests already read are finished and answered, then the
//! connection closes and every export is flushed.

use std::io::{self, BufReader, IoSlice, Read};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use tracing::{debug, info, warn};
use vdk_core::{BlockDevice, Errno, Error, ExtentKind};

use crate::export::Export;
use crate::negotiate::{negotiate, Exports, HandshakeError, BASE_ALLOCATION_ID};
use crate::proto::transmission::{self as tx, check_request, Command, Limits, RequestHeader};
use crate::proto::{errno, STATE_HOLE, STATE_ZERO};
use crate::stream::{Listener, Stream};

/// Tunables of a server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Most threads serving one connection at once (requests in parallel).
    pub threads_per_connection: usize,
    /// Time a client has for the whole handshake.
    pub handshake_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            threads_per_connection: 16,
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

/// Reads shorter than this are sent as one data chunk without asking the disk for holes:
/// for small random reads an extents call costs more than the zeroes it would save.
const SPARSE_READ_MIN: u32 = 64 << 10;

/// Most descriptors in one block status reply.
const MAX_DESCRIPTORS: usize = 1 << 16;

/// Payload bytes skipped at a time when a refused write's data is discarded.
const DISCARD_BUF: usize = 64 << 10;

/// Socket read buffer of a connection.
const READ_BUF: usize = 256 << 10;

/// An NBD server over a set of exports.
#[derive(Debug)]
pub struct Server {
    exports: Vec<Arc<Export>>,
    config: ServerConfig,
    shared: Arc<Shared>,
}

/// State shared by the server, its connections and its shutdown handles.
#[derive(Debug, Default)]
struct Shared {
    stopping: AtomicBool,
    /// A handle to each live connection, to shut its reading side down.
    conns: Mutex<Vec<(u64, Stream)>>,
    next_id: AtomicU64,
    live: Mutex<usize>,
    all_closed: Condvar,
    listeners: Mutex<Vec<Arc<Listener>>>,
}

/// Stops a running server from another thread (a signal handler's thread, a test).
#[derive(Clone, Debug)]
pub struct ShutdownHandle(Arc<Shared>);

impl ShutdownHandle {
    /// Stops accepting, lets connections finish the requests they have read, and closes them.
    /// [`Server::serve`] then flushes every export and returns.
    pub fn shutdown(&self) {
        self.0.stopping.store(true, Ordering::SeqCst);
        for l in self
            .0
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            l.poke();
        }
        for (_, s) in self
            .0
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            // Already closed by the client: nothing to stop.
            let _ = s.shutdown(Shutdown::Read);
        }
    }
}

impl Server {
    /// A server of `exports`; the first is the default export.
    pub fn new(exports: Vec<Export>, config: ServerConfig) -> Server {
        let exports = exports.into_iter().map(Arc::new).collect();
        Server {
            exports,
            config,
            shared: Arc::default(),
        }
    }

    /// A handle that stops [`Server::serve`].
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(Arc::clone(&self.shared))
    }

    /// Serves clients of all `listeners` until shut down, then waits for the connections to
    /// close and flushes every export.
    pub fn serve(&self, listeners: Vec<Listener>) -> io::Result<()> {
        let listeners: Vec<Arc<Listener>> = listeners.into_iter().map(Arc::new).collect();
        self.shared
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(listeners.iter().cloned());
        thread::scope(|s| {
            for l in &listeners {
                s.spawn(move || self.accept_loop(l));
            }
        });
        self.wait_closed();
        self.flush_all()
    }

    fn accept_loop(&self, listener: &Listener) {
        while !self.shared.stopping.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok(stream) if self.shared.stopping.load(Ordering::SeqCst) => drop(stream),
                Ok(stream) => self.spawn_connection(stream),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Serves one already-connected client on new threads.
    pub fn spawn_connection(&self, stream: Stream) {
        let shared = Arc::clone(&self.shared);
        let exports = self.exports.clone();
        let config = self.config.clone();
        *shared.live.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        let spawned = thread::Builder::new().name("nbd-conn".into()).spawn({
            let shared = Arc::clone(&shared);
            move || {
                let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                if let Ok(handle) = stream.try_clone() {
                    shared
                        .conns
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push((id, handle));
                }
                run_connection(stream, &exports, &config, &shared);
                shared
                    .conns
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .retain(|c| c.0 != id);
                connection_closed(&shared);
            }
        });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start a connection thread");
            connection_closed(&shared);
        }
    }

    fn wait_closed(&self) {
        let mut live = self
            .shared
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while *live > 0 {
            live = self
                .shared
                .all_closed
                .wait(live)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn flush_all(&self) -> io::Result<()> {
        for e in &self.exports {
            if let Err(err) = e.device.flush() {
                warn!(export = %e.name, error = %err, "flush at shutdown failed");
                return Err(io::Error::other(err));
            }
        }
        Ok(())
    }
}

fn connection_closed(shared: &Shared) {
    let mut live = shared.live.lock().unwrap_or_else(PoisonError::into_inner);
    *live -= 1;
    if *live == 0 {
        shared.all_closed.notify_all();
    }
}

fn run_connection(
    mut stream: Stream,
    exports: &Vec<Arc<Export>>,
    config: &ServerConfig,
    shared: &Shared,
) {
    let peer = stream.peer();
    // A shutdown that came before this thread registered the connection must still stop it.
    if shared.stopping.load(Ordering::SeqCst) {
        return;
    }
    if let Err(e) = stream.set_read_timeout(Some(config.handshake_timeout)) {
        warn!(%peer, error = %e, "cannot set handshake time-out");
        return;
    }
    let negotiated = match negotiate(&mut stream, exports as &dyn Exports) {
        Ok(n) => n,
        Err(HandshakeError::Ended) => {
            debug!(%peer, "client left during the handshake");
            return;
        }
        Err(e) => {
            warn!(%peer, error = %e, "handshake failed, closing the connection");
            return;
        }
    };
    if let Err(e) = stream.set_read_timeout(None) {
        warn!(%peer, error = %e, "cannot clear handshake time-out");
        return;
    }
    let export = &negotiated.export;
    info!(%peer, export = %export.name, structured = negotiated.structured, "client connected");
    let info = export.device.info();
    let (min_block, _, max_payload) = Export::block_sizes(&info);
    let limits = Limits {
        size: info.size,
        flags: negotiated.flags,
        min_block,
        max_payload,
        structured: negotiated.structured,
        meta_context: negotiated.meta_context,
    };
    let writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            warn!(%peer, error = %e, "cannot clone the socket");
            return;
        }
    };
    let conn = Arc::new(Conn {
        reader: Mutex::new(BufReader::with_capacity(READ_BUF, stream)),
        writer: Mutex::new(writer),
        device: Arc::clone(&export.device),
        limits,
        fast_zero: info.caps.fast_zero,
        closing: AtomicBool::new(false),
        waiting: AtomicUsize::new(0),
        threads: AtomicUsize::new(1),
        max_threads: config.threads_per_connection.max(1),
        workers: Mutex::new(Vec::new()),
    });
    worker(&conn);
    // Join every worker, including ones started while we join.
    loop {
        let next = conn
            .workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match next {
            Some(h) => {
                let _ = h.join(); // a panicking worker already logged; the rest continue
            }
            None => break,
        }
    }
    info!(%peer, "client disconnected");
}

/// One connection in transmission.
struct Conn {
    reader: Mutex<BufReader<Stream>>,
    writer: Mutex<Stream>,
    device: Arc<dyn BlockDevice>,
    limits: Limits,
    fast_zero: bool,
    closing: AtomicBool,
    /// Threads waiting for the read lock.
    waiting: AtomicUsize,
    threads: AtomicUsize,
    max_threads: usize,
    workers: Mutex<Vec<thread::JoinHandle<()>>>,
}

/// A request read off the socket, with its payload (for writes) in the worker's buffer.
enum Next {
    Request(RequestHeader, Result<Command, u32>),
    Closed,
}

/// Per-thread scratch space, reused across requests so the hot path does not allocate.
#[derive(Default)]
struct Scratch {
    data: Vec<u8>,
    header: Vec<u8>,
}

impl Scratch {
    /// A buffer of exactly `len` bytes; grows, never shrinks.
    fn data(&mut self, len: usize) -> &mut [u8] {
        if self.data.len() < len {
            self.data.resize(len, 0);
        }
        &mut self.data[..len]
    }
}

fn worker(conn: &Arc<Conn>) {
    let mut scratch = Scratch::default();
    loop {
        let next = {
            conn.waiting.fetch_add(1, Ordering::SeqCst);
            let mut reader = conn.reader.lock().unwrap_or_else(PoisonError::into_inner);
            conn.waiting.fetch_sub(1, Ordering::SeqCst);
            if conn.closing.load(Ordering::SeqCst) {
                return;
            }
            read_request(conn, &mut reader, &mut scratch)
        };
        let (header, command) = match next {
            Next::Request(h, c) => (h, c),
            Next::Closed => {
                conn.closing.store(true, Ordering::SeqCst);
                return;
            }
        };
        if command == Ok(Command::Disc) {
            debug!("client sent disconnect");
            conn.closing.store(true, Ordering::SeqCst);
            return;
        }
        maybe_grow(conn);
        if let Err(e) = serve_request(conn, &header, command, &mut scratch) {
            debug!(error = %e, "cannot send reply, closing");
            conn.closing.store(true, Ordering::SeqCst);
            // Wake the reader so the other threads see the close.
            let _ = conn
                .writer
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .shutdown(Shutdown::Both);
            return;
        }
    }
}

/// Starts another thread if nobody is waiting to read the next request.
fn maybe_grow(conn: &Arc<Conn>) {
    if conn.waiting.load(Ordering::SeqCst) > 0 {
        return;
    }
    let n = conn.threads.load(Ordering::SeqCst);
    if n >= conn.max_threads
        || conn
            .threads
            .compare_exchange(n, n + 1, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
    {
        return;
    }
    let c = Arc::clone(conn);
    match thread::Builder::new()
        .name("nbd-worker".into())
        .spawn(move || worker(&c))
    {
        Ok(h) => conn
            .workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(h),
        Err(e) => {
            conn.threads.fetch_sub(1, Ordering::SeqCst);
            debug!(error = %e, "cannot start another worker");
        }
    }
}

fn read_request(conn: &Conn, reader: &mut BufReader<Stream>, scratch: &mut Scratch) -> Next {
    let mut raw = [0u8; tx::REQUEST_LEN];
    if let Err(e) = reader.read_exact(&mut raw) {
        if e.kind() != io::ErrorKind::UnexpectedEof {
            debug!(error = %e, "read failed");
        }
        return Next::Closed;
    }
    let Some(header) = RequestHeader::parse(&raw) else {
        warn!("bad request magic, closing the connection");
        return Next::Closed;
    };
    let command = check_request(&header, &conn.limits);
    let payload = header.payload_len();
    if payload > 0 {
        let got = if command.is_ok() {
            reader.read_exact(scratch.data(payload as usize))
        } else {
            // A refused write's data is skipped in small pieces, never held whole.
            discard(reader, u64::from(payload))
        };
        if let Err(e) = got {
            debug!(error = %e, "payload read failed");
            return Next::Closed;
        }
    }
    Next::Request(header, command)
}

fn discard(reader: &mut impl Read, len: u64) -> io::Result<()> {
    let mut buf = [0u8; DISCARD_BUF];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left).map_or(DISCARD_BUF, |l| l.min(DISCARD_BUF));
        reader.read_exact(&mut buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// The NBD error for a disk error (proto.md "Error values").
fn nbd_errno(e: &Error) -> u32 {
    match e.errno() {
        Errno::Inval => errno::EINVAL,
        Errno::Io => errno::EIO,
        Errno::NoSpc => errno::ENOSPC,
        Errno::NotSup => errno::ENOTSUP,
        Errno::Overflow => errno::EOVERFLOW,
        Errno::Perm | Errno::RoFs => errno::EPERM,
    }
}

fn serve_request(
    conn: &Conn,
    h: &RequestHeader,
    command: Result<Command, u32>,
    scratch: &mut Scratch,
) -> io::Result<()> {
    let command = match command {
        Ok(c) => c,
        Err(code) => return send_error(conn, h, code, "invalid request"),
    };
    let dev = &*conn.device;
    let len = u64::from(h.len);
    let result = match command {
        Command::Read { df } => return serve_read(conn, h, df, scratch),
        Command::BlockStatus { req_one } => return serve_block_status(conn, h, req_one, scratch),
        Command::Write { fua } => dev.write_at(&scratch.data[..h.len as usize], h.offset, fua),
        Command::Flush => dev.flush(),
        Command::Trim { fua } => {
            dev.trim(h.offset, len)
                .and_then(|()| if fua { dev.flush() } else { Ok(()) })
        }
        Command::Cache => dev.cache(h.offset, len),
        Command::WriteZeroes { fast, .. } if fast && !conn.fast_zero => {
            return send_error(conn, h, errno::ENOTSUP, "zeroing would not be fast");
        }
        Command::WriteZeroes { fua, no_hole, .. } => dev.write_zeroes(h.offset, len, !no_hole, fua),
        Command::Disc => Ok(()),
    };
    match result {
        Ok(()) => send(conn, &[IoSlice::new(&tx::simple_reply(0, h.cookie))]),
        Err(e) => {
            warn!(cmd = h.kind, offset = h.offset, len = h.len, error = %e, "request failed");
            send_error(conn, h, nbd_errno(&e), &e.to_string())
        }
    }
}

fn send(conn: &Conn, bufs: &[IoSlice<'_>]) -> io::Result<()> {
    let mut bufs = bufs.to_vec();
    conn.writer
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .write_all_vectored(&mut bufs)
}

/// An error reply: a structured ERROR chunk for reads and block status when structured
/// replies are on (simple replies are allowed for the rest), else a simple reply.
fn send_error(conn: &Conn, h: &RequestHeader, code: u32, msg: &str) -> io::Result<()> {
    let structured_cmd = matches!(h.kind, tx::cmd::READ | tx::cmd::BLOCK_STATUS);
    if conn.limits.structured && structured_cmd {
        let mut out = Vec::with_capacity(tx::CHUNK_HEADER_LEN + 6 + msg.len());
        tx::error_chunk(&mut out, h.cookie, code, msg);
        return send(conn, &[IoSlice::new(&out)]);
    }
    send(conn, &[IoSlice::new(&tx::simple_reply(code, h.cookie))])
}

/// The runs of a read reply, as (start within the request, length, reads as zero). One data
/// run unless the read is large, the client allows fragments, and the disk reports zeroes.
fn read_runs(dev: &dyn BlockDevice, h: &RequestHeader, df: bool) -> Vec<(usize, usize, bool)> {
    let len = h.len as usize;
    let whole = vec![(0, len, false)];
    if df || h.len < SPARSE_READ_MIN || !dev.info().caps.extents {
        return whole;
    }
    let Ok(map) = dev.extents(h.offset, u64::from(h.len)) else {
        return whole; // holes are an optimisation: the read itself will report a real error
    };
    let runs: Option<Vec<(usize, usize, bool)>> = map
        .iter()
        .map(|(at, r)| {
            let start = usize::try_from(at.checked_sub(h.offset)?).ok()?;
            Some((start, usize::try_from(r.len).ok()?, r.kind.reads_zero()))
        })
        .collect();
    match runs {
        // A map that does not cover the request exactly is not trusted.
        Some(r) if map.len() == u64::from(h.len) && r.iter().any(|x| x.2) => r,
        _ => whole,
    }
}

fn serve_read(conn: &Conn, h: &RequestHeader, df: bool, scratch: &mut Scratch) -> io::Result<()> {
    let dev = &*conn.device;
    let len = h.len as usize;
    if !conn.limits.structured {
        return match dev.read_at(scratch.data(len), h.offset) {
            Ok(()) => {
                let reply = tx::simple_reply(0, h.cookie);
                send(
                    conn,
                    &[IoSlice::new(&reply), IoSlice::new(&scratch.data[..len])],
                )
            }
            Err(e) => send_error(conn, h, nbd_errno(&e), &e.to_string()),
        };
    }
    // Structured: holes go out as OFFSET_HOLE chunks, data as OFFSET_DATA chunks, all in one
    // writev; the last chunk carries the DONE flag.
    let runs = read_runs(dev, h, df);
    let data = scratch.data(len);
    for &(start, n, zero) in &runs {
        if !zero {
            if let Err(e) = dev.read_at(&mut data[start..start + n], h.offset + start as u64) {
                return send_error(conn, h, nbd_errno(&e), &e.to_string());
            }
        }
    }
    let header = &mut scratch.header;
    header.clear();
    for (i, &(start, n, zero)) in runs.iter().enumerate() {
        let done = i + 1 == runs.len();
        let at = h.offset + start as u64;
        // n <= h.len, a u32.
        let n32 = u32::try_from(n).unwrap_or(u32::MAX);
        if zero {
            tx::offset_hole(header, done, h.cookie, at, n32);
        } else {
            tx::offset_data_header(header, done, h.cookie, at, n32);
        }
    }
    let mut bufs = Vec::with_capacity(2 * runs.len());
    let mut hdr_at = 0;
    for &(start, n, zero) in &runs {
        let hdr_len = if zero {
            tx::CHUNK_HEADER_LEN + 12
        } else {
            tx::CHUNK_HEADER_LEN + 8
        };
        bufs.push(IoSlice::new(&header[hdr_at..hdr_at + hdr_len]));
        hdr_at += hdr_len;
        if !zero {
            bufs.push(IoSlice::new(&scratch.data[start..start + n]));
        }
    }
    send(conn, &bufs)
}

fn serve_block_status(
    conn: &Conn,
    h: &RequestHeader,
    req_one: bool,
    scratch: &mut Scratch,
) -> io::Result<()> {
    if h.len == 0 {
        return send_error(conn, h, errno::EINVAL, "block status of zero length");
    }
    let map = match conn.device.extents(h.offset, u64::from(h.len)) {
        Ok(m) => m,
        Err(e) => return send_error(conn, h, nbd_errno(&e), &e.to_string()),
    };
    let limit = if req_one { 1 } else { MAX_DESCRIPTORS };
    let descriptors: Vec<(u32, u32)> = map
        .runs()
        .iter()
        .take(limit)
        .map(|r| {
            let flags = match r.kind {
                ExtentKind::Data => 0,
                ExtentKind::Hole => STATE_HOLE | STATE_ZERO,
                ExtentKind::Zero => STATE_ZERO,
            };
            // A run lies inside the request, whose length is a u32.
            (u32::try_from(r.len).unwrap_or(u32::MAX), flags)
        })
        .collect();
    scratch.header.clear();
    tx::block_status(
        &mut scratch.header,
        h.cookie,
        BASE_ALLOCATION_ID,
        &descriptors,
    );
    send(conn, &[IoSlice::new(&scratch.header)])
}
