//! One connection in full feature phase: its reader, its workers, and everything it sends.
//!
//! ```text
//!   socket ─► reader: PDU ─┬─ SCSI command with all its data ─► active ─► worker: execute,
//!                          │                                              Data-In + status
//!                          ├─ write still short of data ─► R2T ─► Data-Out ─► (same)
//!                          └─ NOP-Out, Text, Task Management, Logout: answered here
//! ```
//!
//! Responses leave as commands finish, in any order, each whole under the writer lock,
//! which also assigns StatSN in sending order. Writes take their data from immediate data,
//! unsolicited Data-Out (when InitialR2T=No) and then R2Ts of at most MaxBurstLength, up to
//! MaxOutstandingR2T at a time; Data-Out lands straight in the command's buffer. A data
//! sequence error fails that command with sense; only a broken stream closes the
//! connection. Aborted commands get no response (RFC 7143 4.2.3.3, TAS off), and a Task
//! Management response leaves only once the tasks it names are gone.

use std::collections::{HashMap, VecDeque};
use std::io::{self, BufReader};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread;

use tracing::{debug, warn};
use vdk_core::pool::Pool;
use vdk_scsi::Sense;

use crate::params::Params;
use crate::pdu::request::ScsiCommand;
use crate::pdu::response::{self, async_event, Numbers, Residual};
use crate::pdu::{opcode, reject, Bhs, Request, RESERVED_TAG};
use crate::server::{Server, ServerConfig};
use crate::session::{lock, Kind, Session};
use crate::text::TextBuffer;
use crate::wire::{self, Digests, ReadError};

mod control;

use control::PendingText;

/// Socket read buffer of a connection.
const READ_BUF: usize = 256 << 10;

/// The largest Expected Data Transfer Length of a write: what the SCSI layer's largest
/// command (COMPARE AND WRITE, or a WRITE of `vdk_scsi::MAX_TRANSFER`) can take, with room.
pub const MAX_WRITE: u32 = 2 * vdk_scsi::MAX_TRANSFER;

/// Reads up to this size are tried on the reader's thread first (see `try_inline`).
const INLINE_MAX: u32 = 128 << 10;

/// Tags of recently failed or aborted writes, whose late Data-Out is dropped silently.
const DEAD_TAGS: usize = 64;

/// How a PDU uses StatSN.
#[derive(Clone, Copy, Debug)]
enum Stat {
    /// It carries status: the next StatSN, which then advances.
    Take,
    /// It shows the next StatSN without taking it (R2T, a target ping).
    Peek,
    /// The field is reserved (Data-In without status).
    Zero,
}

#[derive(Debug)]
struct Out {
    stream: TcpStream,
    stat_sn: u32,
}

/// A command handed to a worker.
#[derive(Debug)]
struct Job {
    itt: u32,
    lun: [u8; 8],
    cdb: Vec<u8>,
    data: Vec<u8>,
    edtl: u32,
    read: bool,
    write: bool,
    /// Non-immediate: its completion moves the command window.
    counted: bool,
    /// R2Ts sent for it (ExpDataSN of a write's response).
    r2ts: u32,
    aborted: Arc<AtomicBool>,
}

/// A command received and not yet answered.
#[derive(Debug)]
struct Active {
    lun: [u8; 8],
    aborted: Arc<AtomicBool>,
}

/// The handles of a connection's socket a [`Conn`] keeps.
#[derive(Debug)]
pub(crate) struct Sockets {
    writer: TcpStream,
    control: TcpStream,
    local: Option<SocketAddr>,
}

impl Sockets {
    pub fn of(stream: &TcpStream) -> io::Result<Sockets> {
        Ok(Sockets {
            writer: stream.try_clone()?,
            control: stream.try_clone()?,
            local: stream.local_addr().ok(),
        })
    }
}

/// A connection in full feature phase.
#[derive(Debug)]
pub(crate) struct Conn {
    pub session: Arc<Session>,
    pub cid: u16,
    pub digests: Digests,
    send_segment: usize,
    recv_segment: usize,
    params: Params,
    local: Option<SocketAddr>,
    out: Mutex<Out>,
    control: TcpStream,
    pool: Pool<Job>,
    active: Mutex<HashMap<u32, Active>>,
    settled: Condvar,
    broken: AtomicBool,
    server: Weak<Server>,
}

impl Conn {
    pub fn new(
        session: Arc<Session>,
        cid: u16,
        sockets: Sockets,
        params: &Params,
        config: &ServerConfig,
        server: Arc<Server>,
    ) -> Arc<Conn> {
        let Sockets {
            writer: stream,
            control,
            local,
        } = sockets;
        // Session-wide values come from the leading connection; the digests and segment
        // lengths are this connection's own.
        let mut p = session.params;
        p.header_digest = params.header_digest;
        p.data_digest = params.data_digest;
        p.send_data_segment = params.send_data_segment;
        p.recv_data_segment = params.recv_data_segment;
        Arc::new(Conn {
            cid,
            digests: Digests {
                header: params.header_digest,
                data: params.data_digest,
            },
            send_segment: params.send_data_segment.max(512) as usize,
            recv_segment: params.recv_data_segment.max(512) as usize,
            params: p,
            local,
            out: Mutex::new(Out { stream, stat_sn: 0 }),
            control,
            pool: Pool::new(config.threads_per_connection),
            active: Mutex::default(),
            settled: Condvar::new(),
            broken: AtomicBool::new(false),
            session,
            server: Arc::downgrade(&server),
        })
    }

    /// Sets the next StatSN (after the login responses).
    pub fn set_stat_sn(&self, sn: u32) {
        lock(&self.out).stat_sn = sn;
    }

    /// Sends PDUs back to back, filling in StatSN, ExpCmdSN and MaxCmdSN.
    fn send(&self, pdus: &mut [(Bhs, &[u8], Stat)]) -> io::Result<()> {
        let mut out = lock(&self.out);
        let n = self.session.numbers(0);
        let mut framed: Vec<(Bhs, &[u8])> = Vec::with_capacity(pdus.len());
        for (bhs, data, stat) in pdus.iter_mut() {
            match stat {
                Stat::Take => {
                    bhs.set_u32(24, out.stat_sn);
                    out.stat_sn = out.stat_sn.wrapping_add(1);
                }
                Stat::Peek => bhs.set_u32(24, out.stat_sn),
                Stat::Zero => bhs.set_u32(24, 0),
            }
            bhs.set_u32(28, n.exp_cmd_sn);
            bhs.set_u32(32, n.max_cmd_sn);
            framed.push((*bhs, data));
        }
        let r = wire::write_pdus(&mut out.stream, &mut framed, self.digests);
        if r.is_err() {
            self.broken.store(true, Ordering::SeqCst);
        }
        r
    }

    fn send_one(&self, bhs: Bhs, data: &[u8], stat: Stat) -> io::Result<()> {
        self.send(&mut [(bhs, data, stat)])
    }

    /// Tells the initiator the target will drop this connection (it may reconnect after
    /// `time2wait` seconds).
    pub fn announce_drop(&self, time2wait: u16) {
        let bhs = response::async_message(
            async_event::DROPPING_CONNECTION,
            [0, time2wait, 0],
            Numbers::default(),
        );
        // The initiator may be gone already; the close follows anyway.
        let _ = self.send_one(bhs, &[], Stat::Take);
    }

    /// Closes the connection: its reader stops, the commands it has received finish.
    pub fn close(&self) {
        let _ = self.control.shutdown(Shutdown::Read); // already closed is fine
    }

    fn target(&self) -> Option<&Arc<crate::server::Target>> {
        match &self.session.kind {
            Kind::Normal(t) => Some(t),
            Kind::Discovery => None,
        }
    }

    fn complete_window(&self, counted: bool) {
        if counted {
            lock(&self.session.window).complete();
        }
    }

    fn reject(&self, reason: u8, rejected: &Bhs) {
        let bhs = response::reject(reason, Numbers::default());
        let _ = self.send_one(bhs, &rejected.0, Stat::Take);
    }
}

/// A write still receiving its data.
#[derive(Debug)]
struct Write {
    cmd: ScsiCommand,
    buf: Vec<u8>,
    received: usize,
    unsolicited: Option<Sequence>,
    solicited: Vec<(u32, Sequence)>,
    next_r2t: usize,
    r2t_sn: u32,
    aborted: Arc<AtomicBool>,
}

/// One data sequence: the unsolicited data, or the answer to one R2T.
#[derive(Clone, Copy, Debug)]
struct Sequence {
    next: usize,
    end: usize,
    data_sn: u32,
}

struct Reader<'a> {
    conn: &'a Arc<Conn>,
    input: BufReader<TcpStream>,
    writes: HashMap<u32, Write>,
    dead: VecDeque<u32>,
    text_in: Option<(u32, TextBuffer)>,
    text_out: Option<PendingText>,
    next_ttt: u32,
}

enum Flow {
    Continue,
    Close,
}

/// Serves a logged-in connection until it closes.
pub(crate) fn run(conn: &Arc<Conn>, stream: TcpStream) {
    let mut r = Reader {
        conn,
        input: BufReader::with_capacity(READ_BUF, stream),
        writes: HashMap::new(),
        dead: VecDeque::new(),
        text_in: None,
        text_out: None,
        next_ttt: 1,
    };
    loop {
        match r.next() {
            Ok(Flow::Continue) => {}
            Ok(Flow::Close) => break,
            Err(ReadError::Closed) => break,
            Err(e) => {
                debug!(error = %e, "iSCSI connection failed");
                break;
            }
        }
        if conn.broken.load(Ordering::SeqCst) {
            break;
        }
    }
    // Writes that never got all their data are dropped; they still leave the window.
    for (_, w) in r.writes.drain() {
        conn.complete_window(!w.cmd.immediate);
    }
    conn.pool.close();
    let _ = conn.control.shutdown(Shutdown::Both);
}

fn worker(conn: &Arc<Conn>) {
    while let Some(job) = conn.pool.next() {
        run_job(conn, job);
    }
}

fn run_job(conn: &Conn, job: Job) {
    let resp = match conn.target() {
        Some(t) if !job.aborted.load(Ordering::SeqCst) => Some(t.luns.execute(
            job.lun,
            &vdk_scsi::Request {
                nexus: conn.session.nexus,
                initiator: &conn.session.port,
                cdb: &job.cdb,
                data_out: &job.data,
            },
        )),
        _ => None,
    };
    conn.complete_window(job.counted);
    if let Some(resp) = resp {
        if !job.aborted.load(Ordering::SeqCst) {
            if let Err(e) = respond(conn, &job, &resp) {
                debug!(error = %e, itt = job.itt, "cannot send a response");
            }
        }
    }
    lock(&conn.active).remove(&job.itt);
    conn.settled.notify_all();
}

/// Sends a command's data and status: Data-In PDUs of at most the initiator's
/// MaxRecvDataSegmentLength, the last carrying GOOD status, or a SCSI Response with sense.
fn respond(conn: &Conn, job: &Job, resp: &vdk_scsi::Response) -> io::Result<()> {
    let good = resp.status == vdk_scsi::status::GOOD && resp.sense.is_none();
    let sent = if job.read {
        resp.data.len().min(job.edtl as usize)
    } else {
        0
    };
    let needed = if job.read {
        resp.data.len() as u64
    } else if job.write {
        resp.data_out_len.map_or(u64::from(job.edtl), |n| n as u64)
    } else {
        // No data phase was asked for: whatever the command produced overflows.
        resp.data.len() as u64
    };
    // Residuals hold for any status the command completed with (RFC 7143 11.4.5.1).
    let residual = Residual::of(job.edtl, needed);
    let data = &resp.data[..sent];
    let mut pdus: Vec<(Bhs, &[u8], Stat)> = Vec::new();
    let chunks = data.len().div_ceil(conn.send_segment);
    for (i, chunk) in data.chunks(conn.send_segment).enumerate() {
        let last = i + 1 == chunks;
        let with_status = last && good;
        let bhs = response::data_in(
            job.lun,
            job.itt,
            u32::try_from(i).unwrap_or(u32::MAX),
            u32::try_from(i * conn.send_segment).unwrap_or(u32::MAX),
            last,
            with_status.then_some((resp.status, residual)),
            Numbers::default(),
        );
        pdus.push((
            bhs,
            chunk,
            if with_status { Stat::Take } else { Stat::Zero },
        ));
    }
    let sense;
    if !(good && chunks > 0) {
        let exp_data_sn = if job.read {
            u32::try_from(chunks).unwrap_or(u32::MAX)
        } else {
            job.r2ts
        };
        let bhs = response::scsi_response(
            job.itt,
            0,
            resp.status,
            residual,
            exp_data_sn,
            Numbers::default(),
        );
        sense = resp
            .sense
            .map(|s| response::sense_segment(&s.to_fixed()))
            .unwrap_or_default();
        pdus.push((bhs, &sense, Stat::Take));
    }
    conn.send(&mut pdus)
}

impl Reader<'_> {
    fn next(&mut self) -> Result<Flow, ReadError> {
        let conn = self.conn;
        let h = match wire::read_header(&mut self.input, conn.digests, conn.recv_segment) {
            Err(ReadError::TooLong(n)) => {
                warn!(
                    len = n,
                    "data segment over MaxRecvDataSegmentLength, closing"
                );
                return Ok(Flow::Close);
            }
            Err(ReadError::HeaderDigest) => {
                // The next PDU's start is unknown: only a new connection can recover.
                warn!("header digest mismatch, closing the connection");
                return Ok(Flow::Close);
            }
            other => other?,
        };
        if h.bhs.opcode() == opcode::DATA_OUT {
            return self.data_out(&h);
        }
        let mut data = vec![0u8; h.bhs.data_len()];
        let digest_ok = wire::read_data(&mut self.input, &mut data, conn.digests)?;
        let req = match Request::parse(&h.bhs, &h.ahs) {
            Ok(r) => r,
            Err(e) => {
                debug!(error = %e, "rejecting a PDU");
                conn.reject(e.reject_reason(), &h.bhs);
                return Ok(Flow::Continue);
            }
        };
        if !digest_ok {
            conn.reject(reject::DATA_DIGEST_ERROR, &h.bhs);
            if let Request::Command(c) = req {
                // The command was received (its CmdSN is used) but its data was not.
                if c.immediate || lock(&conn.session.window).accept(c.cmd_sn) {
                    self.fail(&c, Sense::PROTOCOL_CRC_ERROR, !c.immediate);
                }
            }
            return Ok(Flow::Continue);
        }
        let discovery = matches!(conn.session.kind, Kind::Discovery);
        match req {
            Request::Command(_) | Request::TaskManagement(_) if discovery => {
                conn.reject(reject::PROTOCOL_ERROR, &h.bhs);
                Ok(Flow::Continue)
            }
            Request::Command(c) => {
                self.command(c, data, &h.bhs);
                Ok(Flow::Continue)
            }
            Request::TaskManagement(t) => Ok(self.task_management(&t)),
            Request::NopOut(n) => {
                self.nop_out(&n, &data);
                Ok(Flow::Continue)
            }
            Request::Text(t) => {
                self.text(&t, &data, &h.bhs);
                Ok(Flow::Continue)
            }
            Request::Logout(l) => Ok(self.logout(&l)),
            Request::Login(_) => {
                // A login on a logged-in connection breaks the protocol.
                conn.reject(reject::PROTOCOL_ERROR, &h.bhs);
                Ok(Flow::Close)
            }
            Request::Snack { .. } | Request::DataOut(_) => {
                // No SNACK at ErrorRecoveryLevel 0.
                conn.reject(reject::COMMAND_NOT_SUPPORTED, &h.bhs);
                Ok(Flow::Continue)
            }
        }
    }

    /// Takes a non-immediate PDU's CmdSN into the window: false if it must be ignored.
    fn accept(&self, immediate: bool, cmd_sn: u32) -> bool {
        immediate || lock(&self.conn.session.window).accept(cmd_sn)
    }

    fn busy(&self, itt: u32) -> bool {
        self.writes.contains_key(&itt) || lock(&self.conn.active).contains_key(&itt)
    }

    /// Ends a command without running it: CHECK CONDITION with `sense`.
    fn fail(&mut self, c: &ScsiCommand, sense: Sense, counted: bool) {
        self.conn.complete_window(counted);
        self.bury(c.itt);
        let bhs = response::scsi_response(
            c.itt,
            0,
            vdk_scsi::status::CHECK_CONDITION,
            Residual::None,
            0,
            Numbers::default(),
        );
        let data = response::sense_segment(&sense.to_fixed());
        let _ = self.conn.send_one(bhs, &data, Stat::Take);
    }

    fn bury(&mut self, itt: u32) {
        if self.dead.len() == DEAD_TAGS {
            self.dead.pop_front();
        }
        self.dead.push_back(itt);
    }

    fn command(&mut self, c: ScsiCommand, data: Vec<u8>, bhs: &Bhs) {
        let conn = self.conn;
        if !self.accept(c.immediate, c.cmd_sn) {
            debug!(cmd_sn = c.cmd_sn, "command outside the window, ignored");
            return;
        }
        let counted = !c.immediate;
        if self.busy(c.itt) {
            conn.complete_window(counted);
            conn.reject(reject::TASK_IN_PROGRESS, bhs);
            return;
        }
        if !c.write || c.edtl == 0 {
            if !data.is_empty() {
                conn.complete_window(counted);
                conn.reject(reject::PROTOCOL_ERROR, bhs);
                return;
            }
            if let Some(c) = self.try_inline(c, &[], counted) {
                self.dispatch(c, Vec::new(), 0, counted, Arc::default());
            }
            return;
        }
        let p = &conn.params;
        let unsolicited = !c.final_pdu;
        let first_burst = (p.first_burst as usize).min(c.edtl as usize);
        if (!data.is_empty() && !p.immediate_data)
            || data.len() > first_burst
            || (unsolicited && p.initial_r2t)
        {
            conn.complete_window(counted);
            self.bury(c.itt);
            conn.reject(reject::PROTOCOL_ERROR, bhs);
            return;
        }
        if c.edtl > MAX_WRITE {
            // Refused before any data is asked for; unsolicited data that follows is dropped.
            let s = Sense::invalid_cdb(0, None);
            self.fail(&c, s, counted);
            return;
        }
        let edtl = c.edtl as usize;
        let mut buf = vec![0u8; edtl];
        buf[..data.len()].copy_from_slice(&data);
        let w = Write {
            received: data.len(),
            unsolicited: unsolicited.then_some(Sequence {
                next: data.len(),
                end: first_burst,
                data_sn: 0,
            }),
            solicited: Vec::new(),
            next_r2t: data.len(),
            r2t_sn: 0,
            buf,
            cmd: c,
            aborted: Arc::default(),
        };
        self.progress(w);
    }

    /// After data arrived (or none yet): runs a write that has all of it, or asks for more.
    fn progress(&mut self, mut w: Write) {
        if w.received == w.buf.len() {
            let counted = !w.cmd.immediate;
            let r2ts = w.r2t_sn;
            if r2ts == 0 {
                // All its data came with it: a write the page cache takes is answered here.
                match self.try_inline(w.cmd, &w.buf, counted) {
                    None => return,
                    Some(c) => w.cmd = c,
                }
            }
            self.dispatch(w.cmd, w.buf, r2ts, counted, w.aborted);
            return;
        }
        if w.unsolicited.is_none() {
            let p = &self.conn.params;
            while w.solicited.len() < p.max_outstanding_r2t as usize && w.next_r2t < w.buf.len() {
                let len = (w.buf.len() - w.next_r2t).min(p.max_burst as usize);
                let ttt = self.new_ttt();
                let bhs = response::r2t(
                    w.cmd.lun,
                    w.cmd.itt,
                    ttt,
                    w.r2t_sn,
                    u32::try_from(w.next_r2t).unwrap_or(u32::MAX),
                    u32::try_from(len).unwrap_or(u32::MAX),
                    Numbers::default(),
                );
                w.solicited.push((
                    ttt,
                    Sequence {
                        next: w.next_r2t,
                        end: w.next_r2t + len,
                        data_sn: 0,
                    },
                ));
                w.r2t_sn += 1;
                w.next_r2t += len;
                let _ = self.conn.send_one(bhs, &[], Stat::Peek);
            }
        }
        self.writes.insert(w.cmd.itt, w);
    }

    /// Answers a small read on this thread if the disk has its data at hand (a page cache,
    /// memory): no hand-off to a worker. Gives the command back if it would wait.
    fn try_inline(&mut self, c: ScsiCommand, data: &[u8], counted: bool) -> Option<ScsiCommand> {
        let conn = self.conn;
        if c.edtl > INLINE_MAX || (c.read && c.write) {
            return Some(c);
        }
        let Some(t) = conn.target() else {
            return Some(c);
        };
        let req = vdk_scsi::Request {
            nexus: conn.session.nexus,
            initiator: &conn.session.port,
            cdb: &c.cdb,
            data_out: data,
        };
        let Some(resp) = t.luns.try_execute(c.lun, &req) else {
            return Some(c);
        };
        conn.complete_window(counted);
        let job = Job {
            itt: c.itt,
            lun: c.lun,
            cdb: Vec::new(),
            data: Vec::new(),
            edtl: c.edtl,
            read: c.read,
            write: c.write,
            counted,
            r2ts: 0,
            aborted: Arc::default(),
        };
        if let Err(e) = respond(conn, &job, &resp) {
            debug!(error = %e, itt = c.itt, "cannot send a response");
        }
        None
    }

    fn new_ttt(&mut self) -> u32 {
        let t = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == RESERVED_TAG {
            self.next_ttt = 1;
        }
        t
    }

    fn dispatch(
        &mut self,
        c: ScsiCommand,
        data: Vec<u8>,
        r2ts: u32,
        counted: bool,
        aborted: Arc<AtomicBool>,
    ) {
        let conn = self.conn;
        lock(&conn.active).insert(
            c.itt,
            Active {
                lun: c.lun,
                aborted: Arc::clone(&aborted),
            },
        );
        let job = Job {
            itt: c.itt,
            lun: c.lun,
            cdb: c.cdb,
            data,
            edtl: c.edtl,
            read: c.read,
            write: c.write,
            counted,
            r2ts,
            aborted,
        };
        let start = || {
            let c = Arc::clone(conn);
            thread::Builder::new()
                .name("iscsi-worker".into())
                .spawn(move || worker(&c))
        };
        if let Err((job, e)) = conn.pool.submit(job, start) {
            debug!(error = %e, "no worker thread: running the command on the reader");
            run_job(conn, job);
        }
    }

    /// A Data-Out PDU: its data goes straight into its write's buffer.
    fn data_out(&mut self, h: &wire::Header) -> Result<Flow, ReadError> {
        let conn = self.conn;
        let len = h.bhs.data_len();
        let d = match Request::parse(&h.bhs, &h.ahs) {
            Ok(Request::DataOut(d)) => d,
            _ => {
                wire::skip_data(&mut self.input, len, conn.digests)?;
                conn.reject(reject::INVALID_PDU_FIELD, &h.bhs);
                return Ok(Flow::Continue);
            }
        };
        let Some(mut w) = self.writes.remove(&d.itt) else {
            wire::skip_data(&mut self.input, len, conn.digests)?;
            if !self.dead.contains(&d.itt) {
                conn.reject(reject::INVALID_PDU_FIELD, &h.bhs);
            }
            return Ok(Flow::Continue);
        };
        let seq = if d.ttt == RESERVED_TAG {
            w.unsolicited.as_mut()
        } else {
            w.solicited
                .iter_mut()
                .find(|(t, _)| *t == d.ttt)
                .map(|(_, s)| s)
        };
        let offset = d.offset as usize;
        let fits = seq
            .as_ref()
            .is_some_and(|s| offset == s.next && d.data_sn == s.data_sn && offset + len <= s.end);
        let Some(seq) = seq.filter(|_| fits) else {
            debug!(
                itt = d.itt,
                data_sn = d.data_sn,
                offset,
                len,
                "Data-Out out of sequence"
            );
            wire::skip_data(&mut self.input, len, conn.digests)?;
            let cmd = w.cmd.clone();
            self.fail(&cmd, Sense::DATA_PHASE_ERROR, !cmd.immediate);
            return Ok(Flow::Continue);
        };
        let ok = wire::read_data(
            &mut self.input,
            &mut w.buf[offset..offset + len],
            conn.digests,
        )?;
        if !ok {
            conn.reject(reject::DATA_DIGEST_ERROR, &h.bhs);
            let cmd = w.cmd.clone();
            self.fail(&cmd, Sense::PROTOCOL_CRC_ERROR, !cmd.immediate);
            return Ok(Flow::Continue);
        }
        seq.next += len;
        seq.data_sn = seq.data_sn.wrapping_add(1);
        w.received += len;
        let finished = seq.next == seq.end;
        if d.final_pdu != finished && d.ttt != RESERVED_TAG {
            // A solicited sequence ends exactly where its R2T said (the F bit marks it).
            let cmd = w.cmd.clone();
            self.fail(&cmd, Sense::DATA_PHASE_ERROR, !cmd.immediate);
            return Ok(Flow::Continue);
        }
        if d.ttt == RESERVED_TAG {
            if d.final_pdu || finished {
                // Unsolicited data is over: R2Ts ask for the rest from where it stopped.
                w.next_r2t = seq.next;
                w.unsolicited = None;
            }
        } else if finished {
            w.solicited.retain(|(t, _)| *t != d.ttt);
        }
        self.progress(w);
        Ok(Flow::Continue)
    }
}
