//! Requests of one connection run in parallel and replies leave as they finish; a shutdown
//! lets requests already read finish and answers them. Driven at the byte level, so the
//! order of replies is visible.
#![allow(clippy::cast_possible_truncation)] // test sizes are small constants

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use vdk_backends::MemoryDisk;
use vdk_core::{BlockDevice, DiskInfo, Result};
use vdk_nbd::proto::transmission::{cmd, RequestHeader};
use vdk_nbd::proto::IHAVEOPT;
use vdk_nbd::{Export, Listener, Server, ServerConfig};

/// A RAM disk whose reads at offset 0 take `SLOW`.
#[derive(Debug)]
struct SlowAtZero(MemoryDisk);

const SLOW: Duration = Duration::from_millis(400);

impl BlockDevice for SlowAtZero {
    fn info(&self) -> DiskInfo {
        self.0.info()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if offset == 0 {
            thread::sleep(SLOW);
        }
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.0.write_at(buf, offset, fua)
    }
    fn flush(&self) -> Result<()> {
        self.0.flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<()> {
        self.0.write_zeroes(offset, len, may_trim, fua)
    }
}

/// Connects, negotiates NBD_OPT_GO for the default export with simple replies.
fn connect(path: &std::path::Path) -> UnixStream {
    let mut s = UnixStream::connect(path).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = IHAVEOPT.to_be_bytes().to_vec();
    opt.extend_from_slice(&7u32.to_be_bytes()); // GO
    opt.extend_from_slice(&6u32.to_be_bytes()); // name length 0 + 0 info requests
    opt.extend_from_slice(&[0; 6]);
    s.write_all(&opt).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut data = vec![0; len];
        s.read_exact(&mut data).unwrap();
        if kind == 1 {
            return s; // ACK
        }
    }
}

fn send_read(s: &mut UnixStream, cookie: u64, offset: u64) {
    let h = RequestHeader {
        flags: 0,
        kind: cmd::READ,
        cookie,
        offset,
        len: 4096,
        extended: false,
    };
    s.write_all(&h.encode()).unwrap();
}

/// Reads one simple reply with its 4096 bytes of data; returns (cookie, error).
fn read_reply(s: &mut UnixStream) -> (u64, u32) {
    let mut r = [0u8; 16];
    s.read_exact(&mut r).unwrap();
    let error = u32::from_be_bytes(r[4..8].try_into().unwrap());
    let cookie = u64::from_be_bytes(r[8..16].try_into().unwrap());
    if error == 0 {
        let mut data = [0u8; 4096];
        s.read_exact(&mut data).unwrap();
    }
    (cookie, error)
}

fn start() -> (tempfile::TempDir, Arc<Server>, thread::JoinHandle<()>) {
    let dir = tempfile::TempDir::new().unwrap();
    let disk = Arc::new(SlowAtZero(MemoryDisk::new(1 << 20)));
    let server = Arc::new(Server::new(
        vec![Export::new("slow", disk)],
        ServerConfig::default(),
    ));
    let listener = Listener::unix(dir.path().join("s.sock")).unwrap();
    let s = Arc::clone(&server);
    let t = thread::spawn(move || s.serve(vec![listener]).unwrap());
    (dir, server, t)
}

#[test]
fn fast_reply_overtakes_slow_one_on_the_same_connection() {
    let (dir, server, t) = start();
    let mut s = connect(&dir.path().join("s.sock"));
    send_read(&mut s, 1, 0); // slow
    thread::sleep(Duration::from_millis(50));
    send_read(&mut s, 2, 4096); // fast
    assert_eq!(
        read_reply(&mut s),
        (2, 0),
        "the fast request must be answered first"
    );
    assert_eq!(read_reply(&mut s), (1, 0));
    server.shutdown_handle().shutdown();
    t.join().unwrap();
}

#[test]
fn shutdown_answers_requests_already_read() {
    let (dir, server, t) = start();
    let mut s = connect(&dir.path().join("s.sock"));
    send_read(&mut s, 9, 0); // slow: still running when the shutdown comes
    thread::sleep(Duration::from_millis(100));
    server.shutdown_handle().shutdown();
    assert_eq!(
        read_reply(&mut s),
        (9, 0),
        "a request in flight must be answered"
    );
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "connection closes after the last reply");
    t.join().unwrap();
}

#[test]
fn removing_an_export_answers_its_requests_closes_its_clients_and_spares_the_rest() {
    let (dir, server, t) = start();
    let sock = dir.path().join("s.sock");
    let mut s = connect(&sock);
    send_read(&mut s, 5, 0); // slow: in flight when the export goes
    thread::sleep(Duration::from_millis(100));
    server
        .add_export(Export::new("other", Arc::new(MemoryDisk::new(1 << 20))))
        .unwrap();
    assert!(
        server
            .add_export(Export::new("other", Arc::new(MemoryDisk::new(1 << 20))))
            .is_err(),
        "export names are unique"
    );
    let removed = server.remove_export("slow").expect("the export existed");
    assert_eq!(removed.name, "slow");
    assert_eq!(
        read_reply(&mut s),
        (5, 0),
        "the request in flight was answered"
    );
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "then the connection closed");
    assert!(server.remove_export("slow").is_none());
    // The default export is now "other", and it serves.
    let mut o = connect(&sock);
    send_read(&mut o, 6, 4096);
    assert_eq!(read_reply(&mut o), (6, 0));
    drop(o);
    server.shutdown_handle().shutdown();
    t.join().unwrap();
}
