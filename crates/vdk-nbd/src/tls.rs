//! NBD over TLS (proto.md "TLS support"): STARTTLS during the handshake, with rustls.
//!
//! ```text
//!   client ══TLS══ socket ─► pump thread (rustls) ─► socketpair ─► the usual connection code
//! ```
//!
//! After NBD_OPT_STARTTLS is acknowledged, the TLS handshake runs on the connection's own
//! thread (so its deadline and the client's certificate are known before the NBD handshake
//! goes on), then one thread per connection moves bytes between the TLS socket and one end of
//! a socket pair (Unix on Linux, loopback TCP on Windows), encrypting and decrypting; the
//! other end serves the connection exactly as a plain one, with its time-outs, limits and
//! batched replies. Both directions have back-pressure: nothing is read from one side while
//! the other has not taken what came.
//!
//! Certificates follow nbdkit's `--tls-certificates DIR` layout: `server-cert.pem` (the chain),
//! `server-key.pem`, and `ca-cert.pem`, the authority that client certificates must chain to
//! when peers are verified. [`Tls::reload`] reads them again (on SIGHUP); connections already
//! up keep the configuration they started with.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::thread;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use tracing::debug;
use vdk_core::sync;

use crate::stream::Stream;
use crate::sys;

/// Whether clients may or must use TLS (nbdkit's `--tls=off|on|require`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// STARTTLS is refused.
    Off,
    /// Clients choose: plain or STARTTLS.
    On,
    /// Every option but STARTTLS and ABORT is refused until TLS is up (FORCEDTLS).
    Require,
}

impl FromStr for TlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<TlsMode, String> {
        match s {
            "off" => Ok(TlsMode::Off),
            "on" => Ok(TlsMode::On),
            "require" => Ok(TlsMode::Require),
            _ => Err(format!("invalid TLS mode {s:?}: use off, on or require")),
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsMode::Off => "off",
            TlsMode::On => "on",
            TlsMode::Require => "require",
        })
    }
}

/// A server's TLS: its mode, where its certificates are, and the configuration read from them.
pub struct Tls {
    mode: TlsMode,
    dir: PathBuf,
    verify_peer: bool,
    config: RwLock<Arc<ServerConfig>>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("mode", &self.mode)
            .field("dir", &self.dir)
            .field("verify_peer", &self.verify_peer)
            .finish_non_exhaustive()
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl Tls {
    /// TLS with the certificates in `dir` (`server-cert.pem`, `server-key.pem`, and with
    /// `verify_peer`, `ca-cert.pem`). Fails with a message naming the file at fault.
    pub fn new(mode: TlsMode, dir: &Path, verify_peer: bool) -> io::Result<Tls> {
        let config = load(dir, verify_peer)?;
        Ok(Tls {
            mode,
            dir: dir.to_owned(),
            verify_peer,
            config: RwLock::new(config),
        })
    }

    /// The mode.
    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// Reads the certificates again; new connections use them. On error the old ones stay.
    pub fn reload(&self) -> io::Result<()> {
        let config = load(&self.dir, self.verify_peer)?;
        *sync::write(&self.config) = config;
        Ok(())
    }

    fn current(&self) -> Arc<ServerConfig> {
        Arc::clone(&sync::read(&self.config))
    }

    /// Runs the TLS handshake on `io` (the socket behind it is `net`), then starts the pump.
    /// Returns the stream that carries the decrypted connection, and the client's
    /// certificate names (subject CN and DNS alternative names) if it sent a certificate.
    pub(crate) fn accept(
        &self,
        net: Stream,
        io: &mut impl ReadWrite,
    ) -> io::Result<(Stream, Vec<String>)> {
        let mut conn = ServerConnection::new(self.current()).map_err(io::Error::other)?;
        while conn.is_handshaking() {
            conn.complete_io(io)?;
        }
        // Back-pressure is the pump's (a chunk is encrypted only once the last one is sent):
        // rustls's own limit would make a large write fail half done.
        conn.set_buffer_limit(None);
        let names = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| certificate_names(c.as_ref()))
            .unwrap_or_default();
        let (inner, outer) = sys::plain_pair()?;
        thread::Builder::new()
            .name("nbd-tls".into())
            .spawn(move || {
                if let Err(e) = pump(conn, &net, &outer) {
                    debug!(error = %e, "tls connection ended");
                }
            })?;
        Ok((inner, names))
    }
}

/// Read and write, for the handshake's I/O wrapper.
pub(crate) trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn load(dir: &Path, verify_peer: bool) -> io::Result<Arc<ServerConfig>> {
    let cert_file = dir.join("server-cert.pem");
    let key_file = dir.join("server-key.pem");
    let certs = CertificateDer::pem_file_iter(&cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| invalid(format!("{}: {e}", cert_file.display())))?;
    if certs.is_empty() {
        return Err(invalid(format!(
            "{}: no certificate in it",
            cert_file.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&key_file)
        .map_err(|e| invalid(format!("{}: {e}", key_file.display())))?;
    let builder = ServerConfig::builder();
    let builder = if verify_peer {
        let ca_file = dir.join("ca-cert.pem");
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&ca_file)
            .map_err(|e| invalid(format!("{}: {e}", ca_file.display())))?
        {
            let cert = cert.map_err(|e| invalid(format!("{}: {e}", ca_file.display())))?;
            roots
                .add(cert)
                .map_err(|e| invalid(format!("{}: {e}", ca_file.display())))?;
        }
        let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
            .build()
            .map_err(|e| invalid(format!("{}: {e}", ca_file.display())))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let config = builder.with_single_cert(certs, key).map_err(|e| {
        invalid(format!(
            "{} and {}: {e}",
            cert_file.display(),
            key_file.display()
        ))
    })?;
    Ok(Arc::new(config))
}

/// The names a client certificate is known by: the subject's common names, then its DNS
/// subject alternative names. A certificate that does not parse has none.
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    let der = CertificateDer::from(der.to_vec());
    let Ok(cert) = webpki::EndEntityCert::try_from(&der) else {
        return Vec::new();
    };
    let mut names = common_names(cert.subject());
    names.extend(cert.valid_dns_names().map(str::to_owned));
    names
}

/// One DER element: tag, contents, and what follows it.
fn der_element(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = b.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &x| (acc << 8) | usize::from(x));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The common names (OID 2.5.4.3) in a Name's contents: SETs of SEQUENCEs of OID and value.
fn common_names(mut name: &[u8]) -> Vec<String> {
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    let mut out = Vec::new();
    while let Some((0x31, mut set, rest)) = der_element(name) {
        name = rest;
        while let Some((0x30, attr, more)) = der_element(set) {
            set = more;
            if let Some((0x06, oid, value)) = der_element(attr) {
                if let (true, Some((_, v, _))) = (oid == CN, der_element(value)) {
                    if let Ok(s) = std::str::from_utf8(v) {
                        out.push(s.to_owned());
                    }
                }
            }
        }
    }
    out
}

/// Most decrypted bytes held for the server side before reading from the client stops.
const DOWN_MAX: usize = 1 << 20;

/// Bytes read at a time from either side.
const CHUNK: usize = 256 << 10;

/// Moves bytes between the TLS socket `net` and the plain socket `plain` until either side
/// is finished: decrypts what the client sends, encrypts what the server answers.
fn pump(mut conn: ServerConnection, net: &Stream, plain: &Stream) -> io::Result<()> {
    net.set_nonblocking(true)?;
    plain.set_nonblocking(true)?;
    // rustls reads 4 KiB at a time: the socket is read in large chunks behind it.
    let mut net_r = Buffered::new(net);
    let mut net_w = net;
    let (mut plain_r, mut plain_w) = (plain, plain);
    let mut down: Vec<u8> = Vec::new(); // decrypted, not yet taken by the server side
    let mut down_at = 0;
    let mut buf = vec![0u8; CHUNK];
    let (mut net_eof, mut plain_eof, mut plain_shut) = (false, false, false);
    loop {
        // The client's records, decrypted, as long as they come and there is room.
        while !net_eof && conn.wants_read() && down.len() - down_at < DOWN_MAX {
            match conn.read_tls(&mut net_r) {
                Ok(0) => net_eof = true,
                Ok(_) => {
                    if let Err(e) = conn.process_new_packets() {
                        let _ = conn.write_tls(&mut net_w); // the alert, if it can go
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
            net_eof |= drain(&mut conn, &mut down, &mut buf)?;
        }
        // Plaintext rustls already holds (read along with the handshake) comes out too.
        net_eof |= drain(&mut conn, &mut down, &mut buf)?;
        // ... handed to the server side.
        while down_at < down.len() {
            match plain_w.write(&down[down_at..]) {
                Ok(n) => down_at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if down_at == down.len() {
            down.clear();
            down_at = 0;
            if net_eof && !plain_shut {
                plain.shutdown(std::net::Shutdown::Write)?;
                plain_shut = true;
            }
        }
        // The server's replies, encrypted, once the previous ones are on their way.
        if !plain_eof && !conn.wants_write() {
            match plain_r.read(&mut buf) {
                Ok(0) => {
                    plain_eof = true;
                    conn.send_close_notify();
                }
                Ok(n) => conn.writer().write_all(&buf[..n])?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        while conn.wants_write() {
            match conn.write_tls(&mut net_w) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if plain_eof && !conn.wants_write() {
            let _ = net.shutdown(std::net::Shutdown::Both);
            return Ok(());
        }
        let net_room = !net_eof && conn.wants_read() && down.len() - down_at < DOWN_MAX;
        if net_room && !net_r.is_empty() {
            continue; // bytes already read from the client, and room for them now
        }
        let net_want = sys::Want {
            read: net_room,
            write: conn.wants_write(),
        };
        let plain_want = sys::Want {
            read: !plain_eof && !conn.wants_write(),
            write: down_at < down.len(),
        };
        // A hang-up with nothing asked for: the other side of the pair closed.
        if sys::wait_either(net, net_want, plain, plain_want)? {
            return Ok(());
        }
    }
}

/// Moves what rustls has decrypted into `down`. True: the client sent close_notify.
fn drain(conn: &mut ServerConnection, down: &mut Vec<u8>, buf: &mut [u8]) -> io::Result<bool> {
    loop {
        match conn.reader().read(buf) {
            Ok(0) => return Ok(true),
            Ok(n) => down.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

/// Reads a socket in chunks of [`CHUNK`] and hands them out in whatever pieces are asked for.
struct Buffered<'a> {
    inner: &'a Stream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl<'a> Buffered<'a> {
    fn new(inner: &'a Stream) -> Buffered<'a> {
        Buffered {
            inner,
            buf: vec![0; CHUNK],
            start: 0,
            end: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

impl Read for Buffered<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.is_empty() {
            let mut r = self.inner;
            let n = r.read(&mut self.buf)?;
            self.start = 0;
            self.end = n;
        }
        let n = out.len().min(self.end - self.start);
        out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for m in ["off", "on", "require"] {
            assert_eq!(m.parse::<TlsMode>().unwrap().to_string(), m);
        }
        assert!("yes".parse::<TlsMode>().is_err());
    }

    #[test]
    fn common_names_of_a_subject() {
        // SET { SEQUENCE { OID 2.5.4.10, "org" } }, SET { SEQUENCE { OID 2.5.4.3, "client" } }
        let subject = [
            0x31, 0x0a, 0x30, 0x08, 0x06, 0x03, 0x55, 0x04, 0x0a, 0x0c, 0x01, b'o', //
            0x31, 0x0f, 0x30, 0x0d, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x06, b'c', b'l', b'i',
            b'e', b'n', b't',
        ];
        assert_eq!(common_names(&subject), vec!["client".to_owned()]);
        assert!(common_names(&subject[..20]).is_empty());
        assert!(common_names(&[0x31, 0x85, 1, 1, 1, 1, 1]).is_empty());
    }

    #[test]
    fn missing_certificates_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = Tls::new(TlsMode::On, dir.path(), false).unwrap_err();
        assert!(err.to_string().contains("server-cert.pem"), "{err}");
    }
}
