//! The NBD protocol by hand, for tests whose client must misbehave (go silent, send half a
//! request, stop reading) in ways no real client does on purpose.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_LIST: u32 = 3;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;

/// Reads the server's greeting; `None` if the connection closes first.
pub fn greeting(s: &mut impl Read) -> Option<[u8; 18]> {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).ok()?;
    assert_eq!(&g[..8], b"NBDMAGIC", "greeting");
    Some(g)
}

pub fn send_option(s: &mut impl Write, opt: u32, data: &[u8]) {
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&opt.to_be_bytes());
    let len = u32::try_from(data.len()).expect("small option");
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m).expect("send option");
}

/// The reply type and data of one option reply.
pub fn option_reply(s: &mut impl Read) -> (u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).expect("option reply");
    let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).expect("option reply data");
    (kind, d)
}

/// Whether the peer closed: a read returns end of file or an error within `within`.
pub fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

/// Connects over TCP, does the fixed-newstyle handshake for `export` with
/// NBD_OPT_EXPORT_NAME, and returns the connection in transmission.
pub fn raw_client(addr: &str, export: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    greeting(&mut s).expect("greeting");
    s.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle, no zeroes
    send_option(&mut s, OPT_EXPORT_NAME, export.as_bytes());
    let mut r = [0u8; 10];
    s.read_exact(&mut r).expect("export size and flags");
    s
}

/// An NBD request header.
pub fn request(kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut req = 0x2560_9513u32.to_be_bytes().to_vec();
    req.extend_from_slice(&0u16.to_be_bytes()); // flags
    req.extend_from_slice(&kind.to_be_bytes());
    req.extend_from_slice(&cookie.to_be_bytes());
    req.extend_from_slice(&offset.to_be_bytes());
    req.extend_from_slice(&len.to_be_bytes());
    req
}

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
