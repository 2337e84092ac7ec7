//! NBD over TLS driven by rustls's own client, byte by byte on the NBD side: every TLS 1.3
//! and TLS 1.2 cipher suite the server offers carries requests and replies larger than a
//! record, options sent in the same flight as the handshake's last message, TLS 1.3 key
//! updates in both directions mid-stream, and close_notify at the end; a corrupt record ends
//! its connection only.
#![allow(clippy::cast_possible_truncation)] // test sizes are small constants

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned, SupportedCipherSuite};
use vdk_backends::MemoryDisk;
use vdk_nbd::proto::handshake::{opt, rep};
use vdk_nbd::proto::transmission::{cmd, RequestHeader};
use vdk_nbd::{Export, Server, ServerConfig, Stream, Tls, TlsMode};

use common::{be32, be64, option_bytes, option_replies};

const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is needed: run scripts/install-test-deps.sh");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for "localhost" signed by it (P-256), in nbdkit's layout.
fn certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2"]);
    ca.extend(["-subj", "/CN=vdk tls test CA"]);
    openssl(dir, &ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend(["-keyout", "server-key.pem", "-out", "server.csr"]);
    csr.extend(["-subj", "/CN=localhost"]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "server-cert.pem",
        ],
    );
}

/// A TLS-requiring server of one 64 MiB RAM disk "ram", and the CA its certificate chains to.
fn server(dir: &Path) -> (Server, RootCertStore) {
    server_with(dir, |t| t)
}

fn server_with(dir: &Path, tune: impl FnOnce(Tls) -> Tls) -> (Server, RootCertStore) {
    certificates(dir);
    let tls = tune(Tls::new(TlsMode::Require, dir, false).unwrap());
    let disk = Arc::new(MemoryDisk::new(64 << 20));
    let config = ServerConfig {
        tls: Some(Arc::new(tls)),
        ..ServerConfig::default()
    };
    let server = Server::new(vec![Export::new("ram", disk)], config);
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("ca-cert.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    (server, roots)
}

type Client = StreamOwned<ClientConnection, UnixStream>;

/// Connects to `server`, asks for STARTTLS in the clear, and starts a TLS client of `config`
/// with NBD_OPT_GO for "ram" already written, so that it leaves with the client's Finished.
/// Returns the client (handshake done, export chosen) and a second handle to its socket.
fn connect(server: &Server, config: Arc<ClientConfig>) -> (Client, UnixStream) {
    let (mut s, theirs) = UnixStream::pair().unwrap();
    server.spawn_connection(Stream::Unix(theirs));
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle, no zeroes
    s.write_all(&option_bytes(opt::STARTTLS, &[])).unwrap();
    assert_eq!(option_replies(&mut s, opt::STARTTLS)[0].0, rep::ACK);
    let name = ServerName::try_from("localhost").unwrap();
    let mut conn = ClientConnection::new(config, name).unwrap();
    let mut go = 3u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"ram");
    go.extend_from_slice(&0u16.to_be_bytes());
    conn.writer()
        .write_all(&option_bytes(opt::GO, &go))
        .unwrap();
    let raw = s.try_clone().unwrap();
    let mut c = StreamOwned::new(conn, s);
    assert_eq!(
        option_replies(&mut c, opt::GO).last().map(|r| r.0),
        Some(rep::ACK)
    );
    (c, raw)
}

fn request(c: &mut Client, kind: u16, cookie: u64, offset: u64, len: u64) {
    let h = RequestHeader {
        flags: 0,
        kind,
        cookie,
        offset,
        len,
        extended: false,
    };
    c.write_all(&h.encode()).unwrap();
}

/// A simple reply for `cookie` with no error.
fn reply(c: &mut Client, cookie: u64) {
    let mut r = [0u8; 16];
    c.read_exact(&mut r).unwrap();
    assert_eq!(be32(&r), SIMPLE_REPLY_MAGIC);
    assert_eq!(be32(&r[4..]), 0, "error in reply {cookie}");
    assert_eq!(be64(&r[8..]), cookie);
}

fn write_at(c: &mut Client, cookie: u64, offset: u64, data: &[u8]) {
    request(c, cmd::WRITE, cookie, offset, data.len() as u64);
    c.write_all(data).unwrap();
    reply(c, cookie);
}

fn read_at(c: &mut Client, cookie: u64, offset: u64, len: usize) -> Vec<u8> {
    request(c, cmd::READ, cookie, offset, len as u64);
    reply(c, cookie);
    let mut data = vec![0u8; len];
    c.read_exact(&mut data).unwrap();
    data
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn client_config(roots: &RootCertStore, suite: SupportedCipherSuite) -> Arc<ClientConfig> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = vec![suite];
    let version = match suite {
        SupportedCipherSuite::Tls13(_) => &rustls::version::TLS13,
        SupportedCipherSuite::Tls12(_) => &rustls::version::TLS12,
    };
    let config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    Arc::new(config)
}

#[test]
fn every_cipher_suite_of_tls_1_3_and_1_2_carries_data_and_key_updates() {
    let dir = tempfile::tempdir().unwrap();
    let (server, roots) = server(dir.path());
    let suites: Vec<SupportedCipherSuite> = rustls::crypto::aws_lc_rs::default_provider()
        .cipher_suites
        .into_iter()
        // The certificate is ECDSA: TLS 1.2's RSA key-exchange suites cannot be chosen.
        .filter(|s| match s {
            SupportedCipherSuite::Tls13(_) => true,
            SupportedCipherSuite::Tls12(_) => {
                s.suite().as_str().is_some_and(|n| n.contains("ECDSA"))
            }
        })
        .collect();
    assert!(suites.len() >= 6, "{suites:?}");
    for (n, suite) in suites.into_iter().enumerate() {
        let tls13 = matches!(suite, SupportedCipherSuite::Tls13(_));
        let (mut c, _raw) = connect(&server, client_config(&roots, suite));
        assert_eq!(c.conn.negotiated_cipher_suite(), Some(suite));
        let at = n as u64 * (2 << 20);
        // A write and a read of 1 MiB: 64 records each way, more than one send at a time.
        let big = pattern(1 << 20, n as u8);
        write_at(&mut c, 1, at, &big);
        assert!(
            read_at(&mut c, 2, at, 1 << 20) == big,
            "{suite:?}: 1 MiB back"
        );
        if tls13 {
            // The client updates its keys and asks the server to update its own.
            c.conn.refresh_traffic_keys().unwrap();
        }
        let small = pattern(65536 + 17, 0x5a);
        write_at(&mut c, 3, at + (1 << 20), &small);
        let back = read_at(&mut c, 4, at, (1 << 20) + small.len());
        assert!(
            back[..1 << 20] == big[..],
            "{suite:?}: after the key update"
        );
        assert!(
            back[1 << 20..] == small[..],
            "{suite:?}: after the key update"
        );
        if tls13 {
            c.conn.refresh_traffic_keys().unwrap();
            assert!(read_at(&mut c, 5, at + 4096, 4096) == big[4096..8192]);
        }
        // Disconnect: the server ends with its close_notify (rustls reads a clean end).
        request(&mut c, cmd::DISC, 6, 0, 0);
        let mut rest = Vec::new();
        let end = c.read_to_end(&mut rest);
        assert!(end.is_ok(), "{suite:?}: clean close expected, got {end:?}");
        assert!(rest.is_empty());
        // A client's close_notify without a disconnect ends the connection the same way.
        let (mut c, _raw) = connect(&server, client_config(&roots, suite));
        c.conn.send_close_notify();
        c.flush().unwrap();
        let end = c.read_to_end(&mut rest);
        assert!(end.is_ok(), "{suite:?}: clean close expected, got {end:?}");
    }
}

/// The server ends the connection (after its alert, which is read and dropped).
fn closes(raw: &mut UnixStream, what: &str) {
    raw.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut rest = Vec::new();
    match raw.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset,
            "the server must close a connection after {what}"
        ),
    }
    // An alert record at most: a header and a sealed 2-byte alert.
    assert!(rest.len() < 64, "{what}: {} bytes after it", rest.len());
}

#[test]
fn a_corrupt_record_ends_its_connection_only() {
    let dir = tempfile::tempdir().unwrap();
    let (server, roots) = server(dir.path());
    let suite = rustls::crypto::aws_lc_rs::default_provider().cipher_suites[0];
    let config = client_config(&roots, suite);
    let (mut good, _) = connect(&server, Arc::clone(&config));
    let (mut bad, mut raw) = connect(&server, Arc::clone(&config));
    write_at(&mut bad, 1, 0, &[7; 4096]);
    // An application-data record whose bytes are not what the key sealed.
    let mut record = vec![0x17, 3, 3, 0, 64];
    record.extend_from_slice(&[0xee; 64]);
    raw.write_all(&record).unwrap();
    closes(&mut raw, "a forged record");
    // A record longer than TLS allows is refused the same way.
    let (_bad2, mut raw2) = connect(&server, Arc::clone(&config));
    raw2.write_all(&[0x17, 3, 3, 0xff, 0xff]).unwrap();
    closes(&mut raw2, "an overlong record");
    // The other connection carries on.
    write_at(&mut good, 2, 8192, &[9; 8192]);
    assert!(read_at(&mut good, 3, 0, 4096) == [7; 4096]);
    assert!(read_at(&mut good, 4, 8192, 8192) == [9; 8192]);
}

#[test]
fn the_server_updates_its_own_keys_after_its_record_limit() {
    let dir = tempfile::tempdir().unwrap();
    // Every 8 records: a 1 MiB read (64 records, 4 sends) crosses several key updates.
    let (server, roots) = server_with(dir.path(), |t| t.with_key_update_after(8));
    let suite = rustls::crypto::aws_lc_rs::default_provider()
        .cipher_suites
        .into_iter()
        .find(|s| matches!(s, SupportedCipherSuite::Tls13(_)))
        .unwrap();
    let (mut c, _) = connect(&server, client_config(&roots, suite));
    let big = pattern(1 << 20, 9);
    write_at(&mut c, 1, 0, &big);
    for cookie in 2..6 {
        assert!(read_at(&mut c, cookie, 0, 1 << 20) == big, "read {cookie}");
    }
    // The limit is real: TLS 1.2 has no key update, so its connection ends there instead.
    let tls12 = rustls::crypto::aws_lc_rs::default_provider()
        .cipher_suites
        .into_iter()
        .find(|s| {
            s.suite()
                .as_str()
                .is_some_and(|n| n.contains("ECDSA") && n.contains("GCM"))
        })
        .unwrap();
    let (mut c, _) = connect(&server, client_config(&roots, tls12));
    request(&mut c, cmd::READ, 7, 0, 1 << 20);
    let mut got = vec![0u8; (1 << 20) + 16];
    assert!(
        c.read_exact(&mut got).is_err(),
        "a TLS 1.2 connection must end at the limit"
    );
}
