//! The record layer of an established TLS connection, run on the connection's own threads.
//!
//! After the handshake, rustls hands over the traffic keys ([`KernelConnection`], the API
//! made for kernel TLS); records are then opened here with the negotiated cipher suite's own
//! decrypter and sealed with its encrypter, or for TLS 1.3 with AWS-LC's AEAD out of place
//! (`seal13.rs`; rustls's crypto provider is AWS-LC: no cryptography of ours), and this file
//! only frames them: the 5-byte record header, sequence numbers, alerts, and
//! TLS 1.3 key updates (rustls derives the new keys).
//!
//! The two directions are independent, each behind its own lock: the connection's reader
//! thread decrypts requests while a worker encrypts a reply. Received records are read from
//! the socket in large chunks and opened in place; replies are sealed a record at a time and
//! sent with one vectored write per 256 KiB of plaintext.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::sync::Mutex;

use rustls::crypto::cipher::{
    AeadKey, InboundOpaqueMessage, Iv, MessageDecrypter, MessageEncrypter, OutboundChunks,
    OutboundPlainMessage,
};
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{ConnectionTrafficSecrets, ContentType, ProtocolVersion, SupportedCipherSuite};
use vdk_core::sync::lock;

use super::seal13::Seal13;
use crate::stream::Stream;

/// Most plaintext in one record (RFC 8446 5.1).
pub(super) const MAX_PLAIN: usize = 1 << 14;

/// Most bytes of one record's body: plaintext, content type, padding and tag (RFC 8446 5.2
/// allows 2^14 + 256; TLS 1.2, 2^14 + 2048).
const MAX_BODY: usize = MAX_PLAIN + 2048;

/// Record header: type, version, length.
pub(super) const HEADER: usize = 5;

/// Bytes asked of the socket at a time when records are received.
const RECV_CHUNK: usize = 256 << 10;

/// Most plaintext sealed before it is sent (one vectored write).
const SEND_CHUNK: usize = 256 << 10;

/// Records sealed under one key before a TLS 1.3 key update is sent, by default (rustls's
/// confidentiality limit for the suite also applies, whichever is lower).
pub const KEY_UPDATE_AFTER: u64 = 1 << 23;

/// HandshakeType::KeyUpdate (RFC 8446 4.6.3).
const KEY_UPDATE: u8 = 24;

/// Alert descriptions (RFC 8446 6).
const CLOSE_NOTIFY: u8 = 0;
const UNEXPECTED_MESSAGE: u8 = 10;
const BAD_RECORD_MAC: u8 = 20;
const RECORD_OVERFLOW: u8 = 22;

/// An established TLS connection: the socket and each direction's keys. Made by the server
/// after STARTTLS; used through [`Stream::Tls`].
pub struct Session {
    sock: Stream,
    rx: Mutex<Rx>,
    tx: Mutex<Tx>,
    keys: Mutex<KernelConnection<ServerConnectionData>>,
    suite: SupportedCipherSuite,
    /// Records sealed under one key before our own TLS 1.3 key update.
    key_update_after: u64,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("sock", &self.sock)
            .field("suite", &self.suite.suite())
            .finish_non_exhaustive()
    }
}

/// The receiving side.
struct Rx {
    open: Box<dyn MessageDecrypter>,
    seq: u64,
    /// Received bytes: `buf[plain.0..plain.1]` opened and not yet taken, `buf[start..end]`
    /// records not yet opened.
    buf: Vec<u8>,
    plain: (usize, usize),
    start: usize,
    end: usize,
    /// Decrypted during the handshake, taken first.
    early: Vec<u8>,
    /// close_notify came.
    closed: bool,
}

/// The sending side.
struct Tx {
    seal: Sealer,
    seq: u64,
    /// Records sealed and not yet sent (kept for its capacity).
    out: Sealed,
    /// A record's plaintext gathered from several pieces (kept for its capacity).
    gather: Vec<u8>,
    /// A record could not be sent whole: nothing more can follow it.
    broken: bool,
    /// close_notify was sent.
    closed: bool,
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn protocol(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("tls: {msg}"))
}

/// The AEAD key and IV of a direction.
fn key_iv(secrets: ConnectionTrafficSecrets) -> io::Result<(AeadKey, Iv)> {
    match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => Ok((key, iv)),
        _ => Err(protocol("cipher suite without an external record layer")),
    }
}

/// Sealed records waiting to be sent. A session seals with one kind of [`Sealer`] only, so
/// only one of the two holds anything.
#[derive(Default)]
struct Sealed {
    /// TLS 1.3's, sealed one after another into one buffer.
    bytes: Vec<u8>,
    /// rustls's (TLS 1.2), each in the buffer rustls sealed it in (not copied again).
    records: Vec<Vec<u8>>,
}

impl Sealed {
    fn clear(&mut self) {
        self.bytes.clear();
        self.records.clear();
    }

    /// Hands the records, in order, to `f` for one vectored write. TLS 1.3's lie in one
    /// buffer: no list is allocated for them.
    fn with_slices<R>(&self, f: impl FnOnce(&mut [IoSlice<'_>]) -> R) -> R {
        if self.records.is_empty() {
            return f(&mut [IoSlice::new(&self.bytes)]);
        }
        let mut list: Vec<IoSlice<'_>> = std::iter::once(&self.bytes[..])
            .chain(self.records.iter().map(Vec::as_slice))
            .filter(|b| !b.is_empty())
            .map(IoSlice::new)
            .collect();
        f(&mut list)
    }
}

/// How records are sealed: TLS 1.3 out of place (AWS-LC's AEAD, from the plaintext where it
/// lies), TLS 1.2 by rustls's encrypter (which copies the plaintext into the record first).
enum Sealer {
    Tls13(Seal13),
    Rustls(Box<dyn MessageEncrypter>),
}

/// The encrypter of `s`, ready to seal record `seq` next.
///
/// AWS-LC's AES-GCM sealing keys for TLS learn the nonce mask from the first record they seal
/// and then require later nonces to rise, so a key taken over after rustls sealed records
/// `0..seq` with it (session tickets; TLS 1.2's Finished) must seal those first too. What
/// they produce is dropped unsent: no nonce is ever used twice on the wire.
fn sealer(
    suite: SupportedCipherSuite,
    s: ConnectionTrafficSecrets,
    seq: u64,
) -> io::Result<Sealer> {
    if let SupportedCipherSuite::Tls13(_) = suite {
        // Nonces are the IV XOR the sequence number: nothing to catch up on.
        if let Some(seal) = Seal13::new(&s) {
            return Ok(Sealer::Tls13(seal));
        }
    }
    if seq > 64 {
        return Err(protocol("too many records sent during the handshake"));
    }
    let mut seal = new_sealer(suite, s)?;
    for done in 0..seq {
        let msg = OutboundPlainMessage {
            typ: ContentType::ApplicationData,
            version: ProtocolVersion::TLSv1_2,
            payload: OutboundChunks::new_empty(),
        };
        seal.encrypt(msg, done).map_err(tls_error)?;
    }
    Ok(Sealer::Rustls(seal))
}

fn new_sealer(
    suite: SupportedCipherSuite,
    s: ConnectionTrafficSecrets,
) -> io::Result<Box<dyn MessageEncrypter>> {
    let (key, iv) = key_iv(s)?;
    Ok(match suite {
        SupportedCipherSuite::Tls13(s) => s.aead_alg.encrypter(key, iv),
        SupportedCipherSuite::Tls12(s) => {
            // The 12 bytes rustls extracts are the fixed IV then the explicit nonce's start.
            let at = s.aead_alg.key_block_shape().fixed_iv_len;
            let (fixed, explicit) = iv.as_ref().split_at(at.min(iv.as_ref().len()));
            s.aead_alg.encrypter(key, fixed, explicit)
        }
    })
}

fn opener(
    suite: SupportedCipherSuite,
    s: ConnectionTrafficSecrets,
) -> io::Result<Box<dyn MessageDecrypter>> {
    let (key, iv) = key_iv(s)?;
    Ok(match suite {
        SupportedCipherSuite::Tls13(s) => s.aead_alg.decrypter(key, iv),
        SupportedCipherSuite::Tls12(s) => {
            let at = s.aead_alg.key_block_shape().fixed_iv_len;
            s.aead_alg
                .decrypter(key, &iv.as_ref()[..at.min(iv.as_ref().len())])
        }
    })
}

impl Session {
    /// The session over `sock` once the handshake is done: `secrets` and `keys` from rustls,
    /// `early` what it already decrypted, `pending` bytes received and not yet processed.
    pub(crate) fn new(
        sock: Stream,
        secrets: rustls::ExtractedSecrets,
        keys: KernelConnection<ServerConnectionData>,
        early: Vec<u8>,
        pending: &[u8],
        key_update_after: u64,
    ) -> io::Result<Session> {
        let suite = keys.negotiated_cipher_suite();
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        let mut buf = vec![0; RECV_CHUNK + HEADER + MAX_BODY];
        if pending.len() > buf.len() {
            buf.resize(pending.len(), 0);
        }
        buf[..pending.len()].copy_from_slice(pending);
        Ok(Session {
            sock,
            rx: Mutex::new(Rx {
                open: opener(suite, rx)?,
                seq: rx_seq,
                buf,
                plain: (0, 0),
                start: 0,
                end: pending.len(),
                early,
                closed: false,
            }),
            tx: Mutex::new(Tx {
                seal: sealer(suite, tx, tx_seq)?,
                seq: tx_seq,
                out: Sealed::default(),
                gather: Vec::new(),
                broken: false,
                closed: false,
            }),
            keys: Mutex::new(keys),
            suite,
            key_update_after,
        })
    }

    /// The socket underneath.
    pub(crate) fn socket(&self) -> &Stream {
        &self.sock
    }

    /// Shuts the socket down; the write side (or both) after a close_notify, if it can go.
    pub(crate) fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        if how != Shutdown::Read {
            let mut tx = lock(&self.tx);
            if !tx.closed && !tx.broken {
                tx.closed = true;
                // The peer may be gone already: the close is what matters.
                let _ = self.send_record(&mut tx, ContentType::Alert, &[&[1, 0]]);
            }
        }
        self.sock.shutdown(how)
    }

    /// Reads decrypted bytes; 0 at the client's close_notify or end of stream.
    pub(crate) fn read(&self, out: &mut [u8]) -> io::Result<usize> {
        let mut rx = lock(&self.rx);
        let rx = &mut *rx;
        if !rx.early.is_empty() {
            let n = out.len().min(rx.early.len());
            out[..n].copy_from_slice(&rx.early[..n]);
            rx.early.drain(..n);
            return Ok(n);
        }
        loop {
            let (a, b) = rx.plain;
            if a < b {
                let n = out.len().min(b - a);
                out[..n].copy_from_slice(&rx.buf[a..a + n]);
                rx.plain.0 += n;
                return Ok(n);
            }
            if rx.closed || out.is_empty() {
                return Ok(0);
            }
            let opened = rx
                .whole_record()
                .and_then(|len| len.map(|len| self.open_record(rx, len)).transpose());
            match opened {
                Ok(Some(())) => continue,
                Ok(None) => {}
                Err((alert, e)) => return Err(self.fatal(alert, e)),
            }
            // More bytes are needed: room for a whole record after what is there.
            if rx.buf.len() - rx.start < HEADER + MAX_BODY || rx.start == rx.end {
                rx.buf.copy_within(rx.start..rx.end, 0);
                rx.end -= rx.start;
                rx.start = 0;
                rx.plain = (0, 0);
            }
            let end = rx.end;
            let n = (&self.sock).read(&mut rx.buf[end..])?;
            if n == 0 {
                if rx.start == rx.end {
                    return Ok(0); // closed without close_notify: the end of the stream
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tls: connection closed inside a record",
                ));
            }
            rx.end += n;
        }
    }

    /// Sends the fatal alert `description` (RFC 8446 6.2), if the connection can still take
    /// it, and returns `e`: the connection ends.
    fn fatal(&self, description: u8, e: io::Error) -> io::Error {
        let mut tx = lock(&self.tx);
        if !tx.closed && !tx.broken {
            tx.closed = true;
            let _ = self.send_record(&mut tx, ContentType::Alert, &[&[2, description]]);
        }
        e
    }

    /// Opens the whole record of body length `len` at `rx.start`. An error comes with the
    /// alert that tells the client why.
    fn open_record(&self, rx: &mut Rx, len: usize) -> Result<(), (u8, io::Error)> {
        let at = rx.start;
        let typ = ContentType::from(rx.buf[at]);
        let version = ProtocolVersion::from(u16::from_be_bytes([rx.buf[at + 1], rx.buf[at + 2]]));
        rx.start += HEADER + len;
        let base = rx.buf.as_ptr() as usize;
        let body = &mut rx.buf[at + HEADER..at + HEADER + len];
        let msg = InboundOpaqueMessage::new(typ, version, body);
        let plain = rx
            .open
            .decrypt(msg, rx.seq)
            .map_err(|e| (BAD_RECORD_MAC, tls_error(e)))?;
        rx.seq += 1;
        let from = plain.payload.as_ptr() as usize - base;
        let range = (from, from + plain.payload.len());
        match plain.typ {
            ContentType::ApplicationData => rx.plain = range,
            ContentType::Alert => {
                // close_notify ends the stream; any other alert is fatal.
                if plain.payload.get(1) == Some(&0) {
                    rx.closed = true;
                } else {
                    let e = protocol(&format!("alert {:?} from the client", plain.payload));
                    return Err((CLOSE_NOTIFY, e));
                }
            }
            ContentType::Handshake => {
                let msg = plain.payload.to_vec();
                self.post_handshake(rx, &msg)
                    .map_err(|e| (UNEXPECTED_MESSAGE, e))?;
            }
            other => {
                let e = protocol(&format!("unexpected {other:?} record"));
                return Err((UNEXPECTED_MESSAGE, e));
            }
        }
        Ok(())
    }

    /// A handshake message after the handshake: only a TLS 1.3 KeyUpdate is expected.
    fn post_handshake(&self, rx: &mut Rx, msg: &[u8]) -> io::Result<()> {
        let [KEY_UPDATE, 0, 0, 1, requested] = *msg else {
            return Err(protocol("unexpected handshake message after the handshake"));
        };
        if requested > 1 {
            return Err(protocol("malformed key update"));
        }
        // Our own update first (RFC 8446 4.6.3: answered before sending more data).
        if requested == 1 {
            let mut tx = lock(&self.tx);
            self.update_tx(&mut tx)?;
        }
        let (seq, secrets) = lock(&self.keys).update_rx_secret().map_err(tls_error)?;
        rx.open = opener(self.suite, secrets)?;
        rx.seq = seq;
        Ok(())
    }

    /// Sends a KeyUpdate (not requesting one back) and seals under the new key after it.
    fn update_tx(&self, tx: &mut Tx) -> io::Result<()> {
        self.send_record(tx, ContentType::Handshake, &[&[KEY_UPDATE, 0, 0, 1, 0]])?;
        let (seq, secrets) = lock(&self.keys).update_tx_secret().map_err(tls_error)?;
        tx.seal = sealer(self.suite, secrets, seq)?;
        tx.seq = seq;
        Ok(())
    }

    /// Seals `chunks` (at most one record's worth) as one record of type `typ` and sends it.
    fn send_record(&self, tx: &mut Tx, typ: ContentType, chunks: &[&[u8]]) -> io::Result<()> {
        let mut record = Sealed::default();
        tx.seal_into(typ, chunks, &mut record)?;
        record.with_slices(|s| self.send(tx, s))
    }

    fn send(&self, tx: &mut Tx, bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        if tx.broken {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "tls: an earlier record was not sent whole",
            ));
        }
        let sent = vdk_core::io::write_all_vectored(&mut &self.sock, bufs);
        tx.broken = sent.is_err();
        sent
    }

    /// Encrypts and sends up to [`SEND_CHUNK`] bytes of `bufs`; returns how many.
    pub(crate) fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut tx = lock(&self.tx);
        if tx.closed {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "tls: the connection is closed",
            ));
        }
        if self.needs_key_update(&tx) {
            if matches!(self.suite, SupportedCipherSuite::Tls13(_)) {
                self.update_tx(&mut tx)?;
            } else {
                return Err(protocol("too many records under one TLS 1.2 key"));
            }
        }
        // A reply a little over the chunk (a header and 256 KiB of data) goes in one send.
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let cap = if total <= SEND_CHUNK + MAX_PLAIN {
            total
        } else {
            SEND_CHUNK
        };
        let mut out = std::mem::take(&mut tx.out);
        out.clear();
        let mut taken = 0;
        let mut pieces: Vec<&[u8]> = Vec::new();
        let mut in_record = 0;
        let mut slices = bufs.iter().map(|b| &b[..]).filter(|b| !b.is_empty());
        let mut current: &[u8] = slices.next().unwrap_or_default();
        while taken < cap && !current.is_empty() {
            let n = current.len().min(MAX_PLAIN - in_record);
            pieces.push(&current[..n]);
            current = &current[n..];
            in_record += n;
            taken += n;
            let piece_ended = current.is_empty();
            if piece_ended {
                current = slices.next().unwrap_or_default();
            }
            // A record ends full, at the end, or where a piece that fills whole records
            // starts: a reply's header then goes alone, and each record of the data is sealed
            // straight from one piece, with no gathering.
            if in_record == MAX_PLAIN
                || current.is_empty()
                || taken >= cap
                || piece_ended && current.len() >= MAX_PLAIN
            {
                tx.seal_into(ContentType::ApplicationData, &pieces, &mut out)?;
                pieces.clear();
                in_record = 0;
            }
        }
        let sent = out.with_slices(|s| self.send(&mut tx, s));
        // rustls's record buffers are not reused: let them go now.
        out.records.clear();
        tx.out = out;
        sent?;
        Ok(taken)
    }

    fn needs_key_update(&self, tx: &Tx) -> bool {
        let limit = match self.suite {
            SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
            SupportedCipherSuite::Tls12(s) => s.common.confidentiality_limit,
        };
        // A margin below the limit for the records of one write.
        tx.seq >= self.key_update_after.min(limit.saturating_sub(1024))
    }
}

impl Tx {
    /// Seals `pieces` (one record's plaintext) as the next record of type `typ`, added to
    /// `out`.
    fn seal_into(
        &mut self,
        typ: ContentType,
        pieces: &[&[u8]],
        out: &mut Sealed,
    ) -> io::Result<()> {
        match &mut self.seal {
            Sealer::Tls13(seal) => {
                if let [one] = pieces {
                    seal.seal(&mut out.bytes, u8::from(typ), one, self.seq)?;
                } else {
                    self.gather.clear();
                    for p in pieces {
                        self.gather.extend_from_slice(p);
                    }
                    seal.seal(&mut out.bytes, u8::from(typ), &self.gather, self.seq)?;
                }
            }
            Sealer::Rustls(seal) => {
                let msg = OutboundPlainMessage {
                    typ,
                    version: ProtocolVersion::TLSv1_2,
                    payload: OutboundChunks::new(pieces),
                };
                let record = seal.encrypt(msg, self.seq).map_err(tls_error)?;
                out.records.push(record.encode());
            }
        }
        self.seq += 1;
        Ok(())
    }
}

impl Rx {
    /// The body length of the record at `start` if it is all here; an error if its header is
    /// not one.
    fn whole_record(&self) -> Result<Option<usize>, (u8, io::Error)> {
        let have = &self.buf[self.start..self.end];
        let Some(h) = have.first_chunk::<HEADER>() else {
            return Ok(None);
        };
        let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
        if len > MAX_BODY {
            return Err((RECORD_OVERFLOW, protocol("record too long")));
        }
        Ok((have.len() >= HEADER + len).then_some(len))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // The last handle of the connection: tell the client it ended here, if it listens.
        let tx = self
            .tx
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !tx.closed && !tx.broken {
            tx.closed = true;
            let mut record = Sealed::default();
            if tx
                .seal_into(ContentType::Alert, &[&[1, 0]], &mut record)
                .is_ok()
            {
                let _ =
                    record.with_slices(|s| vdk_core::io::write_all_vectored(&mut &self.sock, s));
            }
        }
    }
}

impl Read for &Session {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Session::read(self, buf)
    }
}

impl Write for &Session {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Session::write_vectored(self, &[IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        Session::write_vectored(self, bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
