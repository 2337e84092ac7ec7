//! One connection: the handshake, then the reader that takes requests off the socket and the
//! workers that serve those that wait (the picture is in the module above).

use std::io::{self, BufRead, BufReader, Read};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use vdk_core::lifecycle::Connection;
use vdk_core::pool::Pool;
use vdk_core::sync::{lock, wait};
use vdk_core::{zeroed_buffer, BlockDevice, Lend, ReadOnly};

use super::reply::{serve_blocking, serve_inline, Batch};
use super::{ExportSet, ServerConfig};
use crate::export::{Export, Peer};
use crate::negotiate::{negotiate_client, Client, Context, Exports, HandshakeError};
use crate::proto::transmission::{self as tx, check_request, Command, Limits, RequestHeader};
use crate::stream::Stream;
use crate::tls::{Tls, TlsMode};

/// Largest read or write taken from a client that did not ask for the block size limits (it
/// cannot know the advertised maximum; nbd-tester-client's integrityhuge sends 48 MiB).
const UNAGREED_MAX_PAYLOAD: u32 = 64 << 20;

/// Payload bytes skipped at a time when a refused write's data is discarded.
const DISCARD_BUF: usize = 64 << 10;

/// Socket read buffer of a connection.
const READ_BUF: usize = 256 << 10;

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

/// Runs one connection, from the handshake to its end.
/// `own`: the serving process's own socket pair ([`Peer::own`]).
pub(super) fn run(
    stream: Stream,
    place: &Connection,
    (exports, config): (&ExportSet, &ServerConfig),
    own: bool,
) {
    let peer = stream.peer();
    let client_peer = Peer {
        ip: stream.peer_ip(),
        cert_names: Vec::new(),
        own,
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
    place.tag(&export.name);
    // Withdrawn while this client was choosing it: do not start serving it. (Tagged first, so
    // that a removal after this check ends the connection.)
    if exports.find(&export.name).is_none() {
        return;
    }
    info!(
        %peer,
        export = %export.name,
        structured = negotiated.structured,
        extended = negotiated.extended,
        "client connected"
    );
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
        extended: negotiated.extended,
        meta_context: !negotiated.contexts.is_empty(),
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
        contexts: negotiated.contexts,
        fast_zero: info.caps.fast_zero,
        sparse_reads: info.caps.extents && !info.caps.metered,
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
pub(super) struct Conn {
    pub(super) writer: Mutex<Stream>,
    pub(super) device: Arc<dyn BlockDevice>,
    pub(super) limits: Limits,
    /// The metadata contexts selected, the first with id 1.
    pub(super) contexts: Vec<Context>,
    pub(super) fast_zero: bool,
    pub(super) sparse_reads: bool,
    /// A reply could not be sent: the connection is finished.
    pub(super) broken: AtomicBool,
    pub(super) pool: Pool<Job>,
    /// Payload buffers back from workers, reused so that a write does not allocate (large
    /// allocations cost page faults and zero-filling every time).
    pub(super) spare: Mutex<Vec<Vec<u8>>>,
    /// The disk's [`Lend::write_unit`]: aligned writes are received straight into buffers of
    /// this size that the disk keeps, instead of being copied into it.
    pub(super) write_unit: Option<usize>,
    /// The disk answers [`Lend::read_shared`].
    pub(super) lends_memory: bool,
    /// The disk has fast paths at all ([`BlockDevice::lend`]).
    pub(super) lends: bool,
    /// Buffers of `write_unit` bytes that the disk gave back, for the next owned write.
    pub(super) spare_units: Mutex<Vec<Arc<[u8]>>>,
    /// Requests and bytes handed to workers and not yet answered.
    pub(super) in_flight: Mutex<(usize, u64)>,
    /// Signalled when a worker finishes a request.
    pub(super) drained: Condvar,
    pub(super) max_requests: usize,
    pub(super) max_bytes: u64,
    pub(super) idle_timeout: Option<Duration>,
}

impl Conn {
    /// The disk's fast paths, if it has them.
    pub(super) fn lend(&self) -> Option<&dyn Lend> {
        if self.lends {
            self.device.lend()
        } else {
            None
        }
    }

    /// Waits until one more request of `bytes` fits in the connection's limits, and counts it.
    /// A single request larger than the byte limit still goes, alone.
    pub(super) fn reserve(&self, bytes: u64) {
        let mut f = lock(&self.in_flight);
        while self.over(*f, bytes) {
            f = wait(&self.drained, f);
        }
        f.0 += 1;
        f.1 += bytes;
    }

    pub(super) fn over(&self, f: (usize, u64), bytes: u64) -> bool {
        f.0 > 0 && (f.0 >= self.max_requests || f.1 + bytes > self.max_bytes)
    }

    /// Counts one more request of `bytes` if it fits now; false: it would have to wait.
    pub(super) fn try_reserve(&self, bytes: u64) -> bool {
        let mut f = lock(&self.in_flight);
        if self.over(*f, bytes) {
            return false;
        }
        f.0 += 1;
        f.1 += bytes;
        true
    }

    pub(super) fn release(&self, bytes: u64) {
        let mut f = lock(&self.in_flight);
        f.0 -= 1;
        f.1 -= bytes;
        drop(f);
        self.drained.notify_one();
    }

    pub(super) fn busy(&self) -> bool {
        lock(&self.in_flight).0 > 0
    }
}

/// The bytes a request holds while it waits and runs: its payload or its read buffer.
fn cost(h: &RequestHeader) -> u64 {
    match h.kind {
        tx::cmd::READ | tx::cmd::WRITE => h.len,
        _ => 0,
    }
}

/// A request handed to a worker because it may wait.
pub(super) struct Job {
    pub(super) header: RequestHeader,
    pub(super) command: Command,
    pub(super) payload: Payload,
}

/// Where a write's data was received.
pub(super) enum Payload {
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

/// Largest read or write served on the reader's thread.
pub(super) const INLINE_MAX: u32 = 128 << 10;

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
                && (batch.out.len() >= BATCH_MAX
                    || !request_buffered(reader.buffer(), conn.limits.extended)));
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
            // Handing the disk buffers it keeps never waits, whatever their size (a FUA write
            // flushes, which does: that goes to a worker).
            if matches!(command, Command::Write { fua: false }) {
                serve_blocking(conn, job, &mut batch);
            } else {
                submit(conn, job, &mut batch);
            }
        } else if !serve_inline(conn, &header, command, &payload, &mut batch) {
            let spare = lock(&conn.spare).pop();
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
fn request_buffered(buf: &[u8], extended: bool) -> bool {
    let parsed = if extended {
        buf.first_chunk::<{ tx::EXTENDED_REQUEST_LEN }>()
            .and_then(RequestHeader::parse_extended)
    } else {
        buf.first_chunk::<{ tx::REQUEST_LEN }>()
            .and_then(RequestHeader::parse)
    };
    let at = if extended {
        tx::EXTENDED_REQUEST_LEN
    } else {
        tx::REQUEST_LEN
    };
    parsed.is_some_and(|h| (buf.len() - at) as u64 >= h.payload_len())
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
            let _ = lock(&conn.writer).shutdown(Shutdown::Both);
        }
    }
}

fn read_request(conn: &Conn, reader: &mut BufReader<Stream>, payload: &mut Vec<u8>) -> Next {
    // Once extended headers are negotiated, every request is extended (32 bytes).
    let mut raw = [0u8; tx::EXTENDED_REQUEST_LEN];
    let extended = conn.limits.extended;
    let size = if extended {
        tx::EXTENDED_REQUEST_LEN
    } else {
        tx::REQUEST_LEN
    };
    if let Err(e) = reader.read_exact(&mut raw[..size]) {
        if e.kind() != io::ErrorKind::UnexpectedEof {
            debug!(error = %e, "read failed");
        }
        return Next::Closed;
    }
    let parsed = if extended {
        RequestHeader::parse_extended(&raw)
    } else {
        raw.first_chunk::<{ tx::REQUEST_LEN }>()
            .and_then(RequestHeader::parse)
    };
    let Some(header) = parsed else {
        warn!("bad request magic, closing the connection");
        return Next::Closed;
    };
    // A payload larger than any this server takes cannot be skipped gracefully: proto.md
    // asks for a hard disconnect.
    if header.payload_len() > u64::from(conn.limits.max_payload).max(UNAGREED_MAX_PAYLOAD.into()) {
        warn!(
            len = header.payload_len(),
            "request payload too large, closing the connection"
        );
        return Next::Closed;
    }
    let mut command = check_request(&header, &conn.limits);
    if command.is_err() {
        // The disk may have grown since this connection's handshake (`vdk resize` of an open
        // disk): the kernel's NBD client, told the new size by a reconfigure, goes past the
        // size the connection was given. What the disk now holds is served.
        let now = conn.device.info().size;
        if now > conn.limits.size {
            let grown = Limits {
                size: now,
                ..conn.limits
            };
            command = check_request(&header, &grown);
        }
    }
    // Bounded above by the largest payload taken.
    let len = usize::try_from(header.payload_len()).unwrap_or(usize::MAX);
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
            discard(reader, header.payload_len())
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
        let mut buf = lock(&conn.spare_units)
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
pub(super) const MAX_SPARE_UNITS: usize = 128;

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
