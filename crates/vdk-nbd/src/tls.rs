//! NBD over TLS (proto.md "TLS support"): STARTTLS during the handshake, with rustls.
//!
//! ```text
//!   client ══TLS══ socket ─► Stream::Tls: records opened by the connection's reader,
//!                                         sealed by whichever thread sends a reply
//! ```
//!
//! After NBD_OPT_STARTTLS is acknowledged, the TLS handshake runs on the connection's own
//! thread (so its deadline and the client's certificate are known before the NBD handshake
//! goes on), with rustls's unbuffered API. rustls then hands the traffic keys to
//! [`record`], and the connection goes on exactly as a plain one (its time-outs, limits,
//! batched replies and workers), its stream sealing and opening records in place: no thread
//! or socket pair in between.
//!
//! Certificates follow nbdkit's `--tls-certificates DIR` layout: `server-cert.pem` (the chain),
//! `server-key.pem`, and `ca-cert.pem`, the authority that client certificates must chain to
//! when peers are verified. [`Tls::reload`] reads them again (on SIGHUP); connections already
//! up keep the configuration they started with.

pub mod record;
mod seal13;

use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::UnbufferedServerConnection;
use rustls::server::WebPkiClientVerifier;
use rustls::unbuffered::{ConnectionState, EncodeError};
use rustls::{RootCertStore, ServerConfig};
use tracing::debug;
use vdk_core::sync;

use crate::stream::Stream;

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
    key_update_after: u64,
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
            key_update_after: record::KEY_UPDATE_AFTER,
        })
    }

    /// Sends a TLS 1.3 key update after this many records under one key (default
    /// [`record::KEY_UPDATE_AFTER`], about 128 GiB; the suite's confidentiality limit caps
    /// it). TLS 1.2 connections cannot update keys: they end at the limit instead.
    #[must_use]
    pub fn with_key_update_after(mut self, records: u64) -> Tls {
        self.key_update_after = records.max(1);
        self
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

    /// Runs the TLS handshake on `io` (the socket behind it is `net`). Returns the stream that
    /// carries the connection from then on, and the client's certificate names (subject CN
    /// and DNS alternative names) if it sent a certificate.
    pub(crate) fn accept(
        &self,
        net: Stream,
        io: &mut impl ReadWrite,
    ) -> io::Result<(Stream, Vec<String>)> {
        let mut conn = UnbufferedServerConnection::new(self.current()).map_err(io::Error::other)?;
        let mut incoming = vec![0u8; HANDSHAKE_BUF];
        let mut used = 0;
        let mut outgoing = vec![0u8; HANDSHAKE_BUF];
        let mut out_used = 0;
        // Application data that came with the handshake's last records.
        let mut early = Vec::new();
        loop {
            let status = conn.process_tls_records(&mut incoming[..used]);
            let mut discard = status.discard;
            let mut read_more = false;
            match status.state.map_err(handshake_error)? {
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(record) = r.next_record() {
                        let record = record.map_err(handshake_error)?;
                        discard += record.discard;
                        early.extend_from_slice(record.payload);
                    }
                }
                ConnectionState::EncodeTlsData(mut e) => loop {
                    match e.encode(&mut outgoing[out_used..]) {
                        Ok(n) => {
                            out_used += n;
                            break;
                        }
                        Err(EncodeError::InsufficientSize(s)) => {
                            outgoing.resize(out_used + s.required_size, 0);
                        }
                        Err(e) => return Err(io::Error::other(e.to_string())),
                    }
                },
                ConnectionState::TransmitTlsData(t) => {
                    io.write_all(&outgoing[..out_used])?;
                    out_used = 0;
                    t.done();
                }
                ConnectionState::BlockedHandshake => read_more = true,
                ConnectionState::WriteTraffic(_) => break,
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "client closed the connection during the TLS handshake",
                    ))
                }
                other => {
                    return Err(handshake_error(rustls::Error::General(format!(
                        "unexpected state {other:?} in the TLS handshake"
                    ))))
                }
            }
            incoming.copy_within(discard..used, 0);
            used -= discard;
            if read_more {
                if used == incoming.len() {
                    if incoming.len() >= HANDSHAKE_MAX {
                        return Err(handshake_error(rustls::Error::General(
                            "handshake messages too large".into(),
                        )));
                    }
                    incoming.resize(incoming.len() * 2, 0);
                }
                match io.read(&mut incoming[used..])? {
                    0 => {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "client closed the connection during the TLS handshake",
                        ))
                    }
                    n => used += n,
                }
            }
        }
        let names = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| certificate_names(c.as_ref()))
            .unwrap_or_default();
        let (secrets, keys) = conn
            .dangerous_into_kernel_connection()
            .map_err(io::Error::other)?;
        debug!(
            version = ?keys.protocol_version(),
            suite = ?keys.negotiated_cipher_suite().suite(),
            "tls handshake done"
        );
        let pending = &incoming[..used];
        let session =
            record::Session::new(net, secrets, keys, early, pending, self.key_update_after)?;
        Ok((Stream::Tls(Arc::new(session)), names))
    }
}

/// Handshake buffers' first size, and the most that incoming handshake messages may take.
const HANDSHAKE_BUF: usize = 16 << 10;
const HANDSHAKE_MAX: usize = 256 << 10;

/// A TLS error during the handshake, as an I/O error of kind InvalidData.
fn handshake_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
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
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        invalid(format!(
            "{} and {}: {e}",
            cert_file.display(),
            key_file.display()
        ))
    })?;
    // The record layer runs in the connection's threads with the keys rustls derived.
    config.enable_secret_extraction = true;
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
