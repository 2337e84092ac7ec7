//! The client handshake (`vdk_nbd::client::go`) against vdk's own server, over a socket pair.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use vdk_backends::MemoryDisk;
use vdk_nbd::client::go;
use vdk_nbd::{Export, Server, ServerConfig, Stream};

fn server() -> Server {
    let disk = Arc::new(MemoryDisk::new(8 << 20));
    Server::new(vec![Export::new("ram", disk)], ServerConfig::default())
}

#[test]
fn go_chooses_the_export_and_leaves_the_stream_in_transmission() {
    let server = server();
    let (ours, theirs) = UnixStream::pair().unwrap();
    server.spawn_connection(Stream::Unix(theirs));
    let mut s = ours;
    let chosen = go(&mut s, "ram").unwrap();
    assert_eq!(chosen.size, 8 << 20);
    assert!(!chosen.read_only());
    // A simple read request (NBD_CMD_READ of 512 bytes at 0) gets a simple reply.
    let mut req = Vec::new();
    req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&7u64.to_be_bytes());
    req.extend_from_slice(&0u64.to_be_bytes());
    req.extend_from_slice(&512u32.to_be_bytes());
    s.write_all(&req).unwrap();
    let mut reply = [0u8; 16 + 512];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(reply[..4], 0x6744_6698u32.to_be_bytes());
    assert_eq!(reply[4..8], [0; 4], "error field");
    assert_eq!(reply[8..16], 7u64.to_be_bytes(), "cookie");
}

#[test]
fn go_reports_an_unknown_export_clearly() {
    let server = server();
    let (ours, theirs) = UnixStream::pair().unwrap();
    server.spawn_connection(Stream::Unix(theirs));
    let mut s = ours;
    let e = go(&mut s, "nope").unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("\"nope\""), "{e}");
}

#[test]
fn go_refuses_what_is_not_an_nbd_server() {
    let (mut ours, mut theirs) = UnixStream::pair().unwrap();
    theirs.write_all(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
    drop(theirs);
    assert!(go(&mut ours, "x").is_err());
}
