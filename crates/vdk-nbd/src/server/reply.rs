//! Serving one request and building its reply: inline when the disk answers at once, on a
//! worker when it waits; replies batched so that a burst costs one `writev`.

use std::io::{self, IoSlice};

use tracing::debug;
use vdk_core::sync::lock;
use vdk_core::{Errno, Error, ExtentKind, Piece};

use super::conn::{Conn, Job, Payload, INLINE_MAX, MAX_SPARE_UNITS};
use crate::negotiate::Context;
use crate::proto::transmission::{self as tx, Command, RequestHeader};
use crate::proto::{errno, STATE_DIRTY, STATE_HOLE, STATE_ZERO};

/// Reads shorter than this are sent as one data chunk without asking the disk for holes:
/// for small random reads an extents call costs more than the zeroes it would save.
const SPARSE_READ_MIN: u64 = 64 << 10;

/// Most descriptors in one block status reply.
const MAX_DESCRIPTORS: usize = 1 << 16;

/// Replies waiting to be sent, so that a burst of small requests costs one `writev`.
#[derive(Default)]
pub(super) struct Batch {
    /// Reply headers, and the data of small reads, back to back.
    pub(super) out: Vec<u8>,
    /// The data of one large read (`big[..big_len]`), sent after `out` without being copied
    /// into it. The buffer keeps its size between reads so it is not zero-filled each time.
    pub(super) big: Vec<u8>,
    pub(super) big_len: usize,
    /// Or the data of one large read as the disk's own memory (zero-copy), sent after `out`.
    pub(super) shared: Vec<Piece>,
}

/// Zeroes to send for [`Piece::Zero`].
static ZEROES: [u8; 64 << 10] = [0; 64 << 10];

impl Batch {
    pub(super) fn is_empty(&self) -> bool {
        self.out.is_empty() && !self.has_large()
    }

    /// Whether a large read's data is waiting: it must be sent before anything is added.
    pub(super) fn has_large(&self) -> bool {
        self.big_len > 0 || !self.shared.is_empty()
    }

    /// A buffer for a large read of `n` bytes; grows, never shrinks.
    pub(super) fn big(&mut self, n: usize) -> &mut [u8] {
        if self.big.len() < n {
            self.big.resize(n, 0);
        }
        self.big_len = n;
        &mut self.big[..n]
    }

    pub(super) fn flush(&mut self, conn: &Conn) -> io::Result<()> {
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
        let r = lock(&conn.writer).write_all_vectored(&mut bufs);
        self.out.clear();
        self.big_len = 0;
        self.shared.clear();
        r
    }

    pub(super) fn ok(&mut self, h: &RequestHeader) {
        tx::ok_reply(&mut self.out, h);
    }

    /// An error reply: an ERROR chunk for every request with extended headers, and for reads
    /// and block status when structured replies are on (simple replies are allowed for the
    /// rest), else a simple reply.
    pub(super) fn error(&mut self, conn: &Conn, h: &RequestHeader, code: u32, msg: &str) {
        let structured_cmd = matches!(h.kind, tx::cmd::READ | tx::cmd::BLOCK_STATUS);
        if h.extended || (conn.limits.structured && structured_cmd) {
            tx::error_chunk(&mut self.out, h, code, msg);
        } else {
            self.out
                .extend_from_slice(&tx::simple_reply(code, h.cookie));
        }
    }

    pub(super) fn failed(&mut self, conn: &Conn, h: &RequestHeader, e: &Error) {
        debug!(cmd = h.kind, offset = h.offset, len = h.len, error = %e, "request failed");
        self.error(conn, h, nbd_errno(e), &e.to_string());
    }
}

/// The bytes a read or write moves: at most the largest payload, a u32 (`check_request`).
fn data_len(h: &RequestHeader) -> usize {
    usize::try_from(h.len).unwrap_or(usize::MAX)
}

/// Reads smaller than this are copied into the reply batch; larger ones are sent from their
/// own buffer.
const COPY_READ_MAX: usize = 64 << 10;

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
pub(super) fn serve_inline(
    conn: &Conn,
    h: &RequestHeader,
    c: Command,
    payload: &[u8],
    b: &mut Batch,
) -> bool {
    if h.len > u64::from(INLINE_MAX) {
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
            match lend.try_write_at(&payload[..data_len(h)], h.offset) {
                Ok(true) => b.ok(h),
                Ok(false) => return false,
                Err(e) => b.failed(conn, h, &e),
            }
            true
        }
        _ => false,
    }
}

/// Serves any request, waiting as long as the disk needs.
pub(super) fn serve_blocking(conn: &Conn, job: Job, b: &mut Batch) {
    let (h, dev) = (&job.header, &*conn.device);
    let len = h.len;
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
                let mut spare = lock(&conn.spare_units);
                let room = MAX_SPARE_UNITS.saturating_sub(spare.len());
                spare.extend(old.into_iter().take(room));
                if fua {
                    dev.flush()
                } else {
                    Ok(())
                }
            });
            return match result {
                Ok(()) => b.ok(h),
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
        Command::Write { fua } => dev.write_at(&payload[..data_len(h)], h.offset, fua),
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
        Ok(()) => b.ok(h),
        Err(e) => b.failed(conn, h, &e),
    }
    if payload.capacity() > 0 {
        let mut spare = lock(&conn.spare);
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
    let map = conn.device.extents(h.offset, h.len).ok()?;
    if map.len() != h.len {
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
        // A read is at most the maximum payload, a u32 (check_request).
        let n = data_len(h);
        let n32 = u32::try_from(h.len).unwrap_or(u32::MAX);
        // One data run: header, then the data into the batch or, if large, its own buffer.
        if conn.limits.structured || h.extended {
            tx::offset_data_header(&mut b.out, true, h, h.offset, n32);
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
            tx::offset_hole(&mut b.out, done, h, at, n32);
            continue;
        }
        tx::offset_data_header(&mut b.out, done, h, at, n32);
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
    let limit = if req_one { 1 } else { MAX_DESCRIPTORS };
    // One chunk per context, each in full before any is sent: an error ends the reply.
    let mut chunks = Vec::with_capacity(conn.contexts.len());
    for context in &conn.contexts {
        // A run lies inside the request: under 4 GiB unless the request is extended.
        let descriptors: Vec<(u64, u32)> = match context {
            Context::Allocation => match conn.device.extents(h.offset, h.len) {
                Ok(map) => map
                    .runs()
                    .iter()
                    .take(limit)
                    .map(|r| {
                        let flags = match r.kind {
                            ExtentKind::Data => 0,
                            ExtentKind::Hole => STATE_HOLE | STATE_ZERO,
                            ExtentKind::Zero => STATE_ZERO,
                        };
                        (r.len, flags)
                    })
                    .collect(),
                Err(e) => return b.failed(conn, h, &e),
            },
            Context::DirtyBitmap(bitmap) => {
                let mut runs = bitmap.runs(h.offset, h.len);
                if runs.is_empty() {
                    // Past the bitmap's end (the disk grew after it was made): clean.
                    runs.push((h.len, false));
                }
                runs.iter()
                    .take(limit)
                    .map(|(len, dirty)| (*len, u32::from(*dirty) * STATE_DIRTY))
                    .collect()
            }
        };
        chunks.push(descriptors);
    }
    let last = chunks.len();
    for (i, descriptors) in chunks.iter().enumerate() {
        let id = u32::try_from(i + 1).unwrap_or(u32::MAX);
        tx::block_status(&mut b.out, h, id, descriptors, i + 1 == last);
    }
}
