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
//! Shutdown ([`ShutdownHandle::shutdown`]) stops the listeners, then shuts down the reading
//! side of every connection: requests already read are finished and answered, then the
//! connection closes and every export is flushed.

use std::io::{self, BufRead, BufReader, IoSlice, Read};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use vdk_core::net::Admission;
use vdk_core::pool::Pool;
use vdk_core::{zeroed_buffer, BlockDevice, Errno, Error, ExtentKind, Lend, Piece, ReadOnly};

use crate::export::{Export, Peer};
use crate::negotiate::{negotiate_client, Client, Exports, HandshakeError, BASE_ALLOCATION_ID};
use crate::proto::transmission::{self as tx, check_request, Command, Limits, RequestHeader};
use crate::proto::{errno, STATE_HOLE, STATE_ZERO};
use crate::stream::{Listener, Stream};
use crate::tls::{Tls, TlsMode};

/// Locks a mutex. A panic while it was held leaves plain data (buffers, counters, queues) that
/// is still sound, so a poisoned lock is taken as it is rather than spreading the panic.
trait Locked<T> {
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T> Locked<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

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

/// Reads shorter than this are sent as one data chunk without asking the disk for holes:
/// for small random reads an extents call costs more than the zeroes it would save.
const SPARSE_READ_MIN: u32 = 64 << 10;

/// Largest read or write taken from a client that did not ask for the block size limits (it
/// cannot know the advertised maximum; nbd-tester-client's integrityhuge sends 48 MiB).
const UNAGREED_MAX_PAYLOAD: u32 = 64 << 20;

/// Most descriptors in one block status reply.
const MAX_DESCRIPTORS: usize = 1 << 16;

/// Payload bytes skipped at a time when a refused write's data is discarded.
const DISCARD_BUF: usize = 64 << 10;

/// Socket read buffer of a connection.
const READ_BUF: usize = 256 << 10;

/// An NBD server over a set of exports, which may change while it serves.
#[derive(Debug)]
pub struct Server {
    exports: Arc<ExportSet>,
    config: ServerConfig,
    shared: Arc<Shared>,
    admission: Arc<Admission>,
}

/// State shared by the server, its connections and its shutdown handles.
#[derive(Debug, Default)]
struct Shared {
    stopping: AtomicBool,
    /// Each live connection: its id, a handle to shut its reading side down, and the export
    /// it chose once the handshake is over.
    conns: Mutex<Vec<(u64, Stream, Option<String>)>>,
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
        for l in self.0.listeners.locked().iter() {
            l.poke();
        }
        for (_, s, _) in self.0.conns.locked().iter() {
            // Already closed by the client: nothing to stop.
            let _ = s.shutdown(Shutdown::Read);
        }
    }
}

impl Server {
    /// A server of `exports`; the first is the default export.
    pub fn new(exports: Vec<Export>, config: ServerConfig) -> Server {
        let exports = exports.into_iter().map(Arc::new).collect();
        let admission = Admission::new(config.max_connections, config.max_connections_per_address);
        Server {
            exports: Arc::new(ExportSet(RwLock::new(exports))),
            config,
            shared: Arc::default(),
            admission,
        }
    }

    /// Offers one more export to new connections. Fails if its name is taken.
    pub fn add_export(&self, export: Export) -> io::Result<()> {
        let mut list = self
            .exports
            .0
            .write()
            .unwrap_or_else(PoisonError::into_inner);
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
            let mut list = self
                .exports
                .0
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let at = list.iter().position(|e| e.name == name)?;
            list.remove(at)
        };
        let uses = |conns: &[(u64, Stream, Option<String>)]| {
            conns.iter().any(|c| c.2.as_deref() == Some(name))
        };
        for (_, s, _) in self
            .shared
            .conns
            .locked()
            .iter()
            .filter(|c| c.2.as_deref() == Some(name))
        {
            let _ = s.shutdown(Shutdown::Read);
        }
        let mut live = self.shared.live.locked();
        while uses(&self.shared.conns.locked()) {
            live = self
                .shared
                .all_closed
                .wait(live)
                .unwrap_or_else(PoisonError::into_inner);
        }
        Some(removed)
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
            .locked()
            .extend(listeners.iter().cloned());
        thread::scope(|s| {
            for l in &listeners {
                s.spawn(move || self.accept_loop(l));
            }
        });
        self.wait_closed();
        self.flush_all()
    }

    /// Serves the one client on `stream` (inetd style), then flushes every export.
    pub fn serve_one(&self, stream: Stream) -> io::Result<()> {
        self.spawn_connection(stream);
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

    /// Serves one already-connected client on new threads, unless the connection limits
    /// are reached: then it is closed at once.
    pub fn spawn_connection(&self, stream: Stream) {
        let shared = Arc::clone(&self.shared);
        let exports = Arc::clone(&self.exports);
        let config = self.config.clone();
        let place = match self.admission.admit(stream.peer_ip()) {
            Ok(p) => p,
            Err(why) => {
                warn!(peer = %stream.peer(), "connection refused: {why}");
                return;
            }
        };
        stream.set_keepalive(self.config.keepalive);
        *shared.live.locked() += 1;
        let spawned = thread::Builder::new().name("nbd-conn".into()).spawn({
            let shared = Arc::clone(&shared);
            move || {
                let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                if let Ok(handle) = stream.try_clone() {
                    shared.conns.locked().push((id, handle, None));
                }
                run_connection(stream, id, &exports, &config, &shared);
                shared.conns.locked().retain(|c| c.0 != id);
                drop(place);
                connection_closed(&shared);
            }
        });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start a connection thread");
            connection_closed(&shared);
        }
    }

    fn wait_closed(&self) {
        let mut live = self.shared.live.locked();
        while *live > 0 {
            live = self
                .shared
                .all_closed
                .wait(live)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn flush_all(&self) -> io::Result<()> {
        for e in self.exports.all() {
            if let Err(err) = e.device.flush() {
                warn!(export = %e.name, error = %err, "flush at shutdown failed");
                return Err(io::Error::other(err));
            }
        }
        Ok(())
    }
}

/// The exports of a server.
#[derive(Debug)]
struct ExportSet(RwLock<Vec<Arc<Export>>>);

impl Exports for ExportSet {
    fn find(&self, name: &str) -> Option<Arc<Export>> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .find(name)
    }
    fn all(&self) -> Vec<Arc<Export>> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn connection_closed(shared: &Shared) {
    let mut live = shared.live.locked();
    *live -= 1;
    // Woken on every close: remove_export waits for some connections, serve for all.
    shared.all_closed.notify_all();
}

/// Runs the TLS handshake on the deadline's stream and puts the decrypted stream in its place.
/// The handshake's stream: every read and write must end before its deadline.
type Deadline = vdk_core::net::Deadline<Stream>;

fn start_tls(tls: Option<&Tls>, d: &mut Deadline) -> io::Result<Vec<String>> {
    let tls = tls.ok_or_else(|| io::Error::other("tls is off"))?;
    let net = d.stream.try_clone()?;
    let (plain, names) = tls.accept(net, d)?;
    d.stream = plain;
    Ok(names)
}

fn run_connection(
    stream: Stream,
    id: u64,
    exports: &ExportSet,
    config: &ServerConfig,
    shared: &Shared,
) {
    let peer = stream.peer();
    // A shutdown that came before this thread registered the connection must still stop it.
    if shared.stopping.load(Ordering::SeqCst) {
        return;
    }
    let client_peer = Peer {
        ip: stream.peer_ip(),
        cert_names: Vec::new(),
    };
    let mut hs = Deadline {
        stream,
        until: Instant::now() + config.handshake_timeout,
    };
    let tls = config.tls.as_deref();
    let mut upgrade = |d: &mut Deadline| start_tls(tls, d);
    let client = Client {
        peer: client_peer,
        tls: tls.map_or(TlsMode::Off, Tls::mode),
        start_tls: &mut upgrade,
    };
    let negotiated = negotiate_client(&mut hs, exports, client);
    let stream = hs.stream;
    let negotiated = match negotiated {
        Ok(n) => n,
        Err(HandshakeError::Ended) => {
            debug!(%peer, "client left during the handshake");
            return;
        }
        Err(HandshakeError::Io(e))
            if matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::UnexpectedEof
            ) =>
        {
            // A probe (connect and close), or a client that gave up: nothing went wrong here.
            debug!(%peer, error = %e, "client left during the handshake");
            return;
        }
        Err(e) => {
            warn!(%peer, error = %e, "handshake failed, closing the connection");
            return;
        }
    };
    // Reads wake this often to look at the idle time; a request or reply stalled this long
    // ends the connection.
    let wake = config
        .idle_timeout
        .map_or(config.io_timeout, |i| i.min(config.io_timeout));
    let timeouts = stream
        .set_read_timeout(Some(wake.max(Duration::from_millis(1))))
        .and_then(|()| stream.set_write_timeout(Some(config.io_timeout)));
    if let Err(e) = timeouts {
        warn!(%peer, error = %e, "cannot set time-outs");
        return;
    }
    let export = &negotiated.export;
    {
        let mut conns = shared.conns.locked();
        if let Some(c) = conns.iter_mut().find(|c| c.0 == id) {
            c.2 = Some(export.name.clone());
        }
        // Withdrawn while this client was choosing it: do not start serving it.
        if exports.find(&export.name).is_none() {
            return;
        }
    }
    info!(%peer, export = %export.name, structured = negotiated.structured, "client connected");
    // Read-only is enforced by the disk, not only by the advertised flag.
    let device: Arc<dyn BlockDevice> = if export.read_only && !export.device.info().read_only {
        Arc::new(ReadOnly::new(Arc::clone(&export.device)))
    } else {
        Arc::clone(&export.device)
    };
    let info = device.info();
    let (min_block, _, advertised_max) = Export::block_sizes(&info);
    let max_payload = if negotiated.block_size_agreed {
        advertised_max
    } else {
        advertised_max.max(UNAGREED_MAX_PAYLOAD)
    };
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
        writer: Mutex::new(writer),
        device: Arc::clone(&device),
        limits,
        fast_zero: info.caps.fast_zero,
        sparse_reads: info.caps.extents,
        broken: AtomicBool::new(false),
        pool: Pool::new(config.threads_per_connection.max(1)),
        spare: Mutex::default(),
        // What the disk offers beyond its plain methods, asked once for the connection.
        write_unit: device
            .lend()
            .and_then(|l| l.write_unit())
            .filter(|u| *u > 0),
        lends_memory: device
            .lend()
            .is_some_and(|l| matches!(l.read_shared(0, 0), Ok(Some(_)))),
        lends: device.lend().is_some(),
        spare_units: Mutex::default(),
        in_flight: Mutex::default(),
        drained: Condvar::new(),
        max_requests: config.max_requests_in_flight.max(1),
        max_bytes: config.max_bytes_in_flight,
        idle_timeout: config.idle_timeout,
    });
    transmission(&conn, stream);
    info!(%peer, "client disconnected");
}

/// One connection in transmission: what the reader thread and the workers share.
struct Conn {
    writer: Mutex<Stream>,
    device: Arc<dyn BlockDevice>,
    limits: Limits,
    fast_zero: bool,
    sparse_reads: bool,
    /// A reply could not be sent: the connection is finished.
    broken: AtomicBool,
    pool: Pool<Job>,
    /// Payload buffers back from workers, reused so that a write does not allocate (large
    /// allocations cost page faults and zero-filling every time).
    spare: Mutex<Vec<Vec<u8>>>,
    /// The disk's [`Lend::write_unit`]: aligned writes are received straight into buffers of
    /// this size that the disk keeps, instead of being copied into it.
    write_unit: Option<usize>,
    /// The disk answers [`Lend::read_shared`].
    lends_memory: bool,
    /// The disk has fast paths at all ([`BlockDevice::lend`]).
    lends: bool,
    /// Buffers of `write_unit` bytes that the disk gave back, for the next owned write.
    spare_units: Mutex<Vec<Arc<[u8]>>>,
    /// Requests and bytes handed to workers and not yet answered.
    in_flight: Mutex<(usize, u64)>,
    /// Signalled when a worker finishes a request.
    drained: Condvar,
    max_requests: usize,
    max_bytes: u64,
    idle_timeout: Option<Duration>,
}

impl Conn {
    /// The disk's fast paths, if it has them.
    fn lend(&self) -> Option<&dyn Lend> {
        if self.lends {
            self.device.lend()
        } else {
            None
        }
    }

    /// Waits until one more request of `bytes` fits in the connection's limits, and counts it.
    /// A single request larger than the byte limit still goes, alone.
    fn reserve(&self, bytes: u64) {
        let mut f = self.in_flight.locked();
        while self.over(*f, bytes) {
            f = self.drained.wait(f).unwrap_or_else(PoisonError::into_inner);
        }
        f.0 += 1;
        f.1 += bytes;
    }

    fn over(&self, f: (usize, u64), bytes: u64) -> bool {
        f.0 > 0 && (f.0 >= self.max_requests || f.1 + bytes > self.max_bytes)
    }

    /// Counts one more request of `bytes` if it fits now; false: it would have to wait.
    fn try_reserve(&self, bytes: u64) -> bool {
        let mut f = self.in_flight.locked();
        if self.over(*f, bytes) {
            return false;
        }
        f.0 += 1;
        f.1 += bytes;
        true
    }

    fn release(&self, bytes: u64) {
        let mut f = self.in_flight.locked();
        f.0 -= 1;
        f.1 -= bytes;
        drop(f);
        self.drained.notify_one();
    }

    fn busy(&self) -> bool {
        self.in_flight.locked().0 > 0
    }
}

/// The bytes a request holds while it waits and runs: its payload or its read buffer.
fn cost(h: &RequestHeader) -> u64 {
    match h.kind {
        tx::cmd::READ | tx::cmd::WRITE => u64::from(h.len),
        _ => 0,
    }
}

/// A request handed to a worker because it may wait.
struct Job {
    header: RequestHeader,
    command: Command,
    payload: Payload,
}

/// Where a write's data was received.
enum Payload {
    /// In a byte buffer (nothing, for other commands).
    Bytes(Vec<u8>),
    /// In buffers of the disk's write unit, to be handed to it.
    Owned(Vec<Arc<[u8]>>),
}

/// Queues a job for the connection's workers, starting one if none is idle. Waits first while
/// the connection has as much in flight as it may.
fn submit(conn: &Arc<Conn>, job: Job, batch: &mut Batch) {
    let bytes = cost(&job.header);
    if !conn.try_reserve(bytes) {
        // About to wait for the workers: the replies at hand go out first.
        if batch.flush(conn).is_err() {
            conn.broken.store(true, Ordering::SeqCst);
        }
        conn.reserve(bytes);
    }
    let start = || {
        let c = Arc::clone(conn);
        thread::Builder::new()
            .name("nbd-worker".into())
            .spawn(move || worker(&c))
    };
    if let Err((job, e)) = conn.pool.submit(job, start) {
        // No thread could start and none runs: the reader serves it, waiting as it must.
        debug!(error = %e, "no worker thread: serving on the reader");
        let mut own = Batch::default();
        serve_blocking(conn, job, &mut own);
        conn.release(bytes);
        if own.flush(conn).is_err() {
            conn.broken.store(true, Ordering::SeqCst);
        }
    }
}

/// Replies waiting to be sent, so that a burst of small requests costs one `writev`.
#[derive(Default)]
struct Batch {
    /// Reply headers, and the data of small reads, back to back.
    out: Vec<u8>,
    /// The data of one large read (`big[..big_len]`), sent after `out` without being copied
    /// into it. The buffer keeps its size between reads so it is not zero-filled each time.
    big: Vec<u8>,
    big_len: usize,
    /// Or the data of one large read as the disk's own memory (zero-copy), sent after `out`.
    shared: Vec<Piece>,
}

/// Zeroes to send for [`Piece::Zero`].
static ZEROES: [u8; 64 << 10] = [0; 64 << 10];

impl Batch {
    fn is_empty(&self) -> bool {
        self.out.is_empty() && !self.has_large()
    }

    /// Whether a large read's data is waiting: it must be sent before anything is added.
    fn has_large(&self) -> bool {
        self.big_len > 0 || !self.shared.is_empty()
    }

    /// A buffer for a large read of `n` bytes; grows, never shrinks.
    fn big(&mut self, n: usize) -> &mut [u8] {
        if self.big.len() < n {
            self.big.resize(n, 0);
        }
        self.big_len = n;
        &mut self.big[..n]
    }

    fn flush(&mut self, conn: &Conn) -> io::Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        let mut bufs = Vec::with_capacity(2 + self.shared.len());
        bufs.push(IoSlice::new(&self.out));
        bufs.push(IoSlice::new(&self.big[..self.big_len]));
        for piece in &self.shared {
            match piece {
                Piece::Data(bytes) => bufs.push(IoSlice::new(bytes)),
                Piece::Zero(n) => {
                    let mut left = *n;
                    while left > 0 {
                        let k = left.min(ZEROES.len());
                        bufs.push(IoSlice::new(&ZEROES[..k]));
                        left -= k;
                    }
                }
            }
        }
        let r = conn.writer.locked().write_all_vectored(&mut bufs);
        self.out.clear();
        self.big_len = 0;
        self.shared.clear();
        r
    }

    fn ok(&mut self, cookie: u64) {
        self.out.extend_from_slice(&tx::simple_reply(0, cookie));
    }

    /// An error reply: a structured ERROR chunk for reads and block status when structured
    /// replies are on (simple replies are allowed for the rest), else a simple reply.
    fn error(&mut self, conn: &Conn, h: &RequestHeader, code: u32, msg: &str) {
        let structured_cmd = matches!(h.kind, tx::cmd::READ | tx::cmd::BLOCK_STATUS);
        if conn.limits.structured && structured_cmd {
            tx::error_chunk(&mut self.out, h.cookie, code, msg);
        } else {
            self.out
                .extend_from_slice(&tx::simple_reply(code, h.cookie));
        }
    }

    fn failed(&mut self, conn: &Conn, h: &RequestHeader, e: &Error) {
        debug!(cmd = h.kind, offset = h.offset, len = h.len, error = %e, "request failed");
        self.error(conn, h, nbd_errno(e), &e.to_string());
    }
}

/// Reads smaller than this are copied into the reply batch; larger ones are sent from their
/// own buffer.
const COPY_READ_MAX: usize = 64 << 10;

/// Largest read or write served on the reader's thread.
const INLINE_MAX: u32 = 128 << 10;

/// Replies are sent once this much is waiting, even if more requests are buffered.
const BATCH_MAX: usize = 256 << 10;

/// The reader: parses requests, serves the ones that need no wait inline, hands the rest to
/// workers, and sends batched replies whenever it is about to wait for the client.
fn transmission(conn: &Arc<Conn>, stream: Stream) {
    let mut reader = BufReader::with_capacity(READ_BUF, stream);
    let mut batch = Batch::default();
    let mut payload = Vec::new();
    loop {
        // A large read's data must follow its header at once; small replies wait while more
        // requests are already buffered, so that a burst is answered with one writev.
        let due = batch.has_large()
            || (!batch.out.is_empty()
                && (batch.out.len() >= BATCH_MAX || !request_buffered(reader.buffer())));
        if due {
            if let Err(e) = batch.flush(conn) {
                debug!(error = %e, "cannot send replies");
                break;
            }
        }
        if !wait_request(conn, &mut reader, &mut batch) {
            break;
        }
        let (header, command, owned) = match read_request(conn, &mut reader, &mut payload) {
            Next::Request(h, c, owned) => (h, c, owned),
            Next::Closed => break,
        };
        if conn.broken.load(Ordering::SeqCst) {
            break;
        }
        let command = match command {
            Ok(Command::Disc) => {
                debug!("client sent disconnect");
                break;
            }
            Ok(c) => c,
            Err(code) => {
                debug!(
                    cmd = header.kind,
                    flags = header.flags,
                    offset = header.offset,
                    len = header.len,
                    code,
                    "request refused"
                );
                batch.error(conn, &header, code, "invalid request");
                continue;
            }
        };
        if let Some(bufs) = owned {
            let job = Job {
                header,
                command,
                payload: Payload::Owned(bufs),
            };
            if header.len <= INLINE_MAX {
                serve_blocking(conn, job, &mut batch); // an owned write never waits
            } else {
                submit(conn, job, &mut batch);
            }
        } else if !serve_inline(conn, &header, command, &payload, &mut batch) {
            let spare = conn.spare.locked().pop();
            let payload =
                Payload::Bytes(std::mem::replace(&mut payload, spare.unwrap_or_default()));
            submit(
                conn,
                Job {
                    header,
                    command,
                    payload,
                },
                &mut batch,
            );
        }
    }
    // Requests already read are answered before the connection closes.
    let _ = batch.flush(conn); // the client may be gone; nothing else to tell it
    conn.pool.close();
}

/// Waits for the next request's first bytes. False: the client closed, or was idle too long,
/// or the connection failed.
fn wait_request(conn: &Conn, reader: &mut BufReader<Stream>, batch: &mut Batch) -> bool {
    let mut idle_since = Instant::now();
    loop {
        match reader.fill_buf() {
            Ok(b) => return !b.is_empty(),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if conn.broken.load(Ordering::SeqCst) {
                    return false;
                }
                if conn.busy() || !batch.is_empty() {
                    idle_since = Instant::now(); // requests are being served: not idle
                    if batch.flush(conn).is_err() {
                        return false;
                    }
                    continue;
                }
                if conn.idle_timeout.is_some_and(|t| idle_since.elapsed() >= t) {
                    info!("client idle too long, closing the connection");
                    return false;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                debug!(error = %e, "read failed");
                return false;
            }
        }
    }
}

/// Whether the read buffer holds a whole request (header and payload).
fn request_buffered(buf: &[u8]) -> bool {
    let Some(raw) = buf.first_chunk::<{ tx::REQUEST_LEN }>() else {
        return false;
    };
    RequestHeader::parse(raw)
        .is_some_and(|h| buf.len() - tx::REQUEST_LEN >= h.payload_len() as usize)
}

fn worker(conn: &Arc<Conn>) {
    let mut batch = Batch::default();
    while let Some(job) = conn.pool.next() {
        let bytes = cost(&job.header);
        serve_blocking(conn, job, &mut batch);
        let sent = batch.flush(conn);
        conn.release(bytes);
        if let Err(e) = sent {
            debug!(error = %e, "cannot send reply, closing");
            conn.broken.store(true, Ordering::SeqCst);
            // Wake the reader so it sees the connection is finished.
            let _ = conn.writer.locked().shutdown(Shutdown::Both);
        }
    }
}

fn read_request(conn: &Conn, reader: &mut BufReader<Stream>, payload: &mut Vec<u8>) -> Next {
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
    let len = header.payload_len() as usize;
    if let (Ok(_), Some(unit)) = (command, conn.write_unit) {
        if len > 0 && len.is_multiple_of(unit) && header.offset % unit as u64 == 0 {
            return match receive_owned(conn, reader, len / unit, unit) {
                Ok(bufs) => Next::Request(header, command, Some(bufs)),
                Err(e) => {
                    debug!(error = %e, "payload read failed");
                    Next::Closed
                }
            };
        }
    }
    if len > 0 {
        let got = if command.is_ok() {
            receive(reader, payload, len)
        } else {
            // A refused write's data is skipped in small pieces, never held whole.
            discard(reader, u64::from(header.payload_len()))
        };
        if let Err(e) = got {
            debug!(error = %e, "payload read failed");
            return Next::Closed;
        }
    }
    Next::Request(header, command, None)
}

/// Receives a write's `len` bytes into `payload[..len]`. The buffer grows to the largest write
/// seen, then is reused (no allocation per write); it grows only as the data arrives, so that
/// a client announcing a large write and sending nothing costs no memory.
fn receive(reader: &mut BufReader<Stream>, payload: &mut Vec<u8>, len: usize) -> io::Result<()> {
    let mut have = 0;
    while have < len {
        let end = len.min(have + RECEIVE_STEP);
        if payload.len() < end {
            payload.resize(end, 0);
        }
        read_exact_direct(reader, &mut payload[have..end])?;
        have = end;
    }
    Ok(())
}

/// Bytes of a payload received before the buffer grows again.
const RECEIVE_STEP: usize = 256 << 10;

/// Receives `count` units of a write's payload straight into buffers for the disk to keep.
fn receive_owned(
    conn: &Conn,
    reader: &mut BufReader<Stream>,
    count: usize,
    unit: usize,
) -> io::Result<Vec<Arc<[u8]>>> {
    // One unit at a time, as the data arrives: an announced write costs nothing until sent.
    let mut bufs = Vec::with_capacity(count.min(MAX_SPARE_UNITS));
    for _ in 0..count {
        let mut buf = conn
            .spare_units
            .locked()
            .pop()
            .unwrap_or_else(|| zeroed_buffer(unit));
        if Arc::get_mut(&mut buf).is_none() {
            buf = zeroed_buffer(unit); // still lent to a reader: leave it to them
        }
        // The buffer was just checked or made unique.
        let dst = Arc::get_mut(&mut buf).ok_or_else(|| io::Error::other("shared write buffer"))?;
        read_exact_direct(reader, dst)?;
        bufs.push(buf);
    }
    Ok(bufs)
}

/// Fills `dst` from what `reader` has buffered, then straight from the socket, so that a large
/// payload is not copied through the read buffer.
fn read_exact_direct(reader: &mut BufReader<Stream>, dst: &mut [u8]) -> io::Result<()> {
    let buffered = reader.buffer();
    let n = buffered.len().min(dst.len());
    dst[..n].copy_from_slice(&buffered[..n]);
    reader.consume(n);
    if n < dst.len() {
        reader.get_mut().read_exact(&mut dst[n..])?;
    }
    Ok(())
}

/// A request read off the socket; a write's data is in the reader's buffer, or in owned
/// buffers.
enum Next {
    Request(RequestHeader, Result<Command, u32>, Option<Vec<Arc<[u8]>>>),
    Closed,
}

/// Most spare write buffers a connection keeps: 8 MiB of 64 KiB units.
const MAX_SPARE_UNITS: usize = 128;

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

/// Serves a small read or plain write on the reader's thread if the disk can do it without
/// waiting. False: nothing was done, hand it to a worker. Large requests always go to
/// workers: their copies then run in parallel with the reader receiving the next request,
/// where inline they would queue behind each other on one core.
fn serve_inline(conn: &Conn, h: &RequestHeader, c: Command, payload: &[u8], b: &mut Batch) -> bool {
    if h.len > INLINE_MAX {
        // Except a read from a disk that lends its memory: no copy is made on this side.
        return match c {
            Command::Read { df } if conn.lends_memory => read_reply(conn, h, df, false, b),
            _ => false,
        };
    }
    match c {
        Command::Read { df } => read_reply(conn, h, df, false, b),
        Command::Write { fua: false } => {
            let Some(lend) = conn.lend() else {
                return false;
            };
            match lend.try_write_at(&payload[..h.len as usize], h.offset) {
                Ok(true) => b.ok(h.cookie),
                Ok(false) => return false,
                Err(e) => b.failed(conn, h, &e),
            }
            true
        }
        _ => false,
    }
}

/// Serves any request, waiting as long as the disk needs.
fn serve_blocking(conn: &Conn, job: Job, b: &mut Batch) {
    let (h, dev) = (&job.header, &*conn.device);
    let len = u64::from(h.len);
    let payload = match job.payload {
        Payload::Owned(bufs) => {
            let fua = matches!(job.command, Command::Write { fua: true });
            // Owned payloads come only from a disk with a write unit, which lends.
            let owned = conn
                .lend()
                .map_or(Err(Error::Unsupported(vdk_core::Op::Write)), |l| {
                    l.write_owned(h.offset, bufs)
                });
            let result = owned.and_then(|old| {
                let mut spare = conn.spare_units.locked();
                let room = MAX_SPARE_UNITS.saturating_sub(spare.len());
                spare.extend(old.into_iter().take(room));
                if fua {
                    dev.flush()
                } else {
                    Ok(())
                }
            });
            return match result {
                Ok(()) => b.ok(h.cookie),
                Err(e) => b.failed(conn, h, &e),
            };
        }
        Payload::Bytes(p) => p,
    };
    let result = match job.command {
        Command::Read { df } => {
            read_reply(conn, h, df, true, b);
            return;
        }
        Command::BlockStatus { req_one } => return block_status_reply(conn, h, req_one, b),
        Command::Write { fua } => dev.write_at(&payload[..h.len as usize], h.offset, fua),
        Command::Flush => dev.flush(),
        Command::Trim { fua } => {
            dev.trim(h.offset, len)
                .and_then(|()| if fua { dev.flush() } else { Ok(()) })
        }
        Command::Cache => dev.cache(h.offset, len),
        Command::WriteZeroes { fast, .. } if fast && !conn.fast_zero => {
            return b.error(conn, h, errno::ENOTSUP, "zeroing would not be fast");
        }
        Command::WriteZeroes { fua, no_hole, .. } => dev.write_zeroes(h.offset, len, !no_hole, fua),
        Command::Disc => Ok(()),
    };
    match result {
        Ok(()) => b.ok(h.cookie),
        Err(e) => b.failed(conn, h, &e),
    }
    if payload.capacity() > 0 {
        let mut spare = conn.spare.locked();
        if spare.len() < conn.pool.max() {
            spare.push(payload);
        }
    }
}

/// The runs of a sparse read reply, as (start within the request, length, reads as zero), or
/// `None` for one plain data run (the common case, which allocates nothing): unless the read
/// is large, the client allows fragments, and the disk reports zeroes in the range.
fn sparse_runs(conn: &Conn, h: &RequestHeader, df: bool) -> Option<Vec<(usize, usize, bool)>> {
    if df || h.len < SPARSE_READ_MIN || !conn.sparse_reads || !conn.limits.structured {
        return None;
    }
    // Holes are an optimisation: if the map fails, the read itself reports a real error.
    let map = conn.device.extents(h.offset, u64::from(h.len)).ok()?;
    if map.len() != u64::from(h.len) {
        return None; // a map that does not cover the request exactly is not trusted
    }
    let runs: Vec<(usize, usize, bool)> = map
        .iter()
        .map(|(at, r)| {
            let start = usize::try_from(at.checked_sub(h.offset)?).ok()?;
            Some((start, usize::try_from(r.len).ok()?, r.kind.reads_zero()))
        })
        .collect::<Option<_>>()?;
    runs.iter().any(|r| r.2).then_some(runs)
}

/// Appends the reply to a read to `b` (a large read's data goes to `b.big`, which must then be
/// sent before anything else is added): a simple reply, or structured chunks (data, and holes
/// as OFFSET_HOLE chunks). With `wait` false the disk is only asked for data it has at hand;
/// false means it would have to wait and nothing was added.
fn read_reply(conn: &Conn, h: &RequestHeader, df: bool, wait: bool, b: &mut Batch) -> bool {
    let dev = &*conn.device;
    let lend = conn.lend();
    let read = |buf: &mut [u8], at: u64| match (wait, lend) {
        (true, _) => dev.read_at(buf, at).map(|()| true),
        (false, Some(l)) => l.try_read_at(buf, at),
        (false, None) => Ok(false),
    };
    let mark = b.out.len();
    let outcome = if let Some(runs) = sparse_runs(conn, h, df) {
        read_sparse(h, &runs, b, read)
    } else {
        let n = h.len as usize;
        // One data run: header, then the data into the batch or, if large, its own buffer.
        if conn.limits.structured {
            tx::offset_data_header(&mut b.out, true, h.cookie, h.offset, h.len);
        } else {
            b.out.extend_from_slice(&tx::simple_reply(0, h.cookie));
        }
        if n <= COPY_READ_MAX {
            let at = b.out.len();
            b.out.resize(at + n, 0);
            read(&mut b.out[at..], h.offset)
        } else if let Some(pieces) = lend
            .filter(|_| conn.lends_memory)
            .and_then(|l| l.read_shared(h.offset, n).transpose())
        {
            // The disk lends its memory: no copy at all on this side.
            pieces.map(|p| {
                b.shared = p;
                true
            })
        } else {
            let r = read(b.big(n), h.offset);
            if !matches!(r, Ok(true)) {
                b.big_len = 0;
            }
            r
        }
    };
    match outcome {
        Ok(true) => true,
        Ok(false) => {
            b.out.truncate(mark);
            false
        }
        Err(e) => {
            b.out.truncate(mark);
            b.failed(conn, h, &e);
            true
        }
    }
}

/// The structured chunks of a read with holes: each data run read into the batch after its
/// chunk header, each hole an OFFSET_HOLE chunk.
fn read_sparse(
    h: &RequestHeader,
    runs: &[(usize, usize, bool)],
    b: &mut Batch,
    read: impl Fn(&mut [u8], u64) -> vdk_core::Result<bool>,
) -> vdk_core::Result<bool> {
    let mut r = Ok(true);
    for (i, &(start, n, zero)) in runs.iter().enumerate() {
        let done = i + 1 == runs.len();
        let at = h.offset + start as u64;
        let n32 = u32::try_from(n).unwrap_or(u32::MAX); // n <= h.len, a u32
        if zero {
            tx::offset_hole(&mut b.out, done, h.cookie, at, n32);
            continue;
        }
        tx::offset_data_header(&mut b.out, done, h.cookie, at, n32);
        let pos = b.out.len();
        b.out.resize(pos + n, 0);
        r = read(&mut b.out[pos..], at);
        if !matches!(r, Ok(true)) {
            break;
        }
    }
    r
}

fn block_status_reply(conn: &Conn, h: &RequestHeader, req_one: bool, b: &mut Batch) {
    if h.len == 0 {
        return b.error(conn, h, errno::EINVAL, "block status of zero length");
    }
    let map = match conn.device.extents(h.offset, u64::from(h.len)) {
        Ok(m) => m,
        Err(e) => return b.failed(conn, h, &e),
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
    tx::block_status(&mut b.out, h.cookie, BASE_ALLOCATION_ID, &descriptors);
}
