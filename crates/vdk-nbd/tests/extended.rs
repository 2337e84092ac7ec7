//! Extended headers (`NBD_OPT_EXTENDED_HEADERS`), driven byte by byte: the option's rules in
//! negotiation, 32-byte requests with 64-bit lengths, and every reply chunk type in its
//! extended form (NONE, OFFSET_DATA, OFFSET_HOLE, BLOCK_STATUS_EXT, ERROR), each echoing the
//! request's cookie and offset.
#![allow(clippy::cast_possible_truncation)] // test sizes are small constants

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use vdk_backends::MemoryDisk;
use vdk_nbd::proto::handshake::{opt, rep};
use vdk_nbd::proto::transmission::{cflags, chunk, cmd, RequestHeader, EXTENDED_REPLY_MAGIC};
use vdk_nbd::{Export, Server, ServerConfig, Stream};

use common::{be16, be32, be64, option_bytes, option_replies};

const GIB: u64 = 1 << 30;

/// A connection to a server of one 8 GiB RAM disk named "ram", past the greeting (the server
/// serves it while the handle lives).
fn connect() -> (Server, UnixStream) {
    let disk = Arc::new(MemoryDisk::new(8 * GIB));
    let server = Server::new(vec![Export::new("ram", disk)], ServerConfig::default());
    let (mut s, theirs) = UnixStream::pair().unwrap();
    server.spawn_connection(Stream::Unix(theirs));
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle, no zeroes
    (server, s)
}

/// Sends an option; the replies up to the final one, as (type, data).
fn option(s: &mut UnixStream, option: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
    s.write_all(&option_bytes(option, data)).unwrap();
    option_replies(s, option)
}

fn named(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d
}

/// Negotiates extended headers, base:allocation and the export.
fn extended_connection() -> (Server, UnixStream) {
    let (server, mut s) = connect();
    let r = option(&mut s, opt::EXTENDED_HEADERS, &[]);
    assert_eq!(r.last().unwrap().0, rep::ACK);
    // Twice is an error; structured replies after them are refused with EXT_HEADER_REQD.
    let r = option(&mut s, opt::EXTENDED_HEADERS, &[]);
    assert_eq!(r.last().unwrap().0, rep::ERR_INVALID);
    let r = option(&mut s, opt::STRUCTURED_REPLY, &[]);
    assert_eq!(r.last().unwrap().0, rep::ERR_EXT_HEADER_REQD);
    // Meta contexts need structured replies, which extended headers give.
    let mut meta = named("ram");
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&named("base:allocation"));
    let r = option(&mut s, opt::SET_META_CONTEXT, &meta);
    assert_eq!(r[0].0, rep::META_CONTEXT, "{r:?}");
    assert_eq!(r.last().unwrap().0, rep::ACK);
    let mut go = named("ram");
    go.extend_from_slice(&0u16.to_be_bytes());
    let r = option(&mut s, opt::GO, &go);
    assert_eq!(r.last().unwrap().0, rep::ACK, "{r:?}");
    (server, s)
}

fn send(s: &mut UnixStream, kind: u16, flags: u16, (cookie, offset, len): (u64, u64, u64)) {
    let h = RequestHeader {
        flags,
        kind,
        cookie,
        offset,
        len,
        extended: true,
    };
    let raw = h.encode();
    assert_eq!(raw.len(), 32);
    s.write_all(&raw).unwrap();
}

/// One extended reply chunk: (flags, type, payload), after checking its magic, cookie and the
/// request offset it repeats.
fn chunk(s: &mut UnixStream, cookie: u64, offset: u64) -> (u16, u16, Vec<u8>) {
    let mut h = [0u8; 32];
    s.read_exact(&mut h).unwrap();
    assert_eq!(be32(&h), EXTENDED_REPLY_MAGIC, "extended reply magic");
    assert_eq!(be64(&h[8..]), cookie, "cookie");
    assert_eq!(be64(&h[16..]), offset, "the request's offset");
    let mut payload = vec![0u8; be64(&h[24..]) as usize];
    s.read_exact(&mut payload).unwrap();
    (be16(&h[4..]), be16(&h[6..]), payload)
}

const DONE: u16 = 1;

#[test]
fn every_reply_chunk_comes_in_its_extended_form() {
    let (_server, mut s) = extended_connection();
    // A write at 6 GiB with PAYLOAD_LEN, as the extension's text has it: a final NONE chunk.
    let far = 6 * GIB;
    send(&mut s, cmd::WRITE, cflags::PAYLOAD_LEN, (1, far, 8192));
    s.write_all(&[0xab; 8192]).unwrap();
    assert_eq!(chunk(&mut s, 1, far), (DONE, chunk::NONE, vec![]));
    // And without the flag, as QEMU's client sends writes: the length is the payload's.
    send(&mut s, cmd::WRITE, 0, (2, 0, 4096));
    s.write_all(&[0xcd; 4096]).unwrap();
    assert_eq!(chunk(&mut s, 2, 0), (DONE, chunk::NONE, vec![]));
    // A read: one OFFSET_DATA chunk, its own offset then the data.
    send(&mut s, cmd::READ, 0, (3, far, 8192));
    let (flags, kind, p) = chunk(&mut s, 3, far);
    assert_eq!((flags, kind), (DONE, chunk::OFFSET_DATA));
    assert_eq!(be64(&p), far);
    assert_eq!(&p[8..], &[0xab; 8192][..]);
    // A read of a hole large enough to be looked at: OFFSET_HOLE chunks, the last one done.
    send(&mut s, cmd::READ, 0, (4, GIB, 1 << 20));
    let mut covered = 0u64;
    loop {
        let (flags, kind, p) = chunk(&mut s, 4, GIB);
        assert_eq!(kind, chunk::OFFSET_HOLE);
        assert_eq!(be64(&p), GIB + covered);
        covered += u64::from(be32(&p[8..]));
        if flags & DONE != 0 {
            break;
        }
    }
    assert_eq!(covered, 1 << 20);
    // Block status over 7 GiB (an effect length past 32 bits): BLOCK_STATUS_EXT, with a hole
    // descriptor longer than 4 GiB.
    send(&mut s, cmd::BLOCK_STATUS, 0, (5, 0, 7 * GIB));
    let (flags, kind, p) = chunk(&mut s, 5, 0);
    assert_eq!((flags, kind), (DONE, chunk::BLOCK_STATUS_EXT));
    let count = be32(&p[4..]) as usize;
    assert_eq!(p.len(), 8 + 16 * count, "count matches the descriptors");
    let descs: Vec<(u64, u64)> = (0..count)
        .map(|i| (be64(&p[8 + 16 * i..]), be64(&p[16 + 16 * i..])))
        .collect();
    assert_eq!(descs[0].1, 0, "data first: {descs:?}");
    assert!(descs.iter().any(|d| d.0 > 4 * GIB && d.1 == 3), "{descs:?}");
    assert!(
        descs.iter().map(|d| d.0).sum::<u64>() >= 7 * GIB,
        "{descs:?}"
    );
    // Trim, zeroes and flush: final NONE chunks.
    send(&mut s, cmd::TRIM, 0, (6, 0, 4096));
    assert_eq!(chunk(&mut s, 6, 0), (DONE, chunk::NONE, vec![]));
    send(&mut s, cmd::WRITE_ZEROES, 0, (7, far, 4096));
    assert_eq!(chunk(&mut s, 7, far), (DONE, chunk::NONE, vec![]));
    send(&mut s, cmd::FLUSH, 0, (8, 0, 0));
    assert_eq!(chunk(&mut s, 8, 0), (DONE, chunk::NONE, vec![]));
    // Errors are ERROR chunks for every command: a read past the end, a flush that says it
    // carries a payload (whose bytes are skipped: the next request is read as one).
    send(&mut s, cmd::READ, 0, (9, 8 * GIB, 4096));
    let (flags, kind, p) = chunk(&mut s, 9, 8 * GIB);
    assert_eq!((flags, kind), (DONE, chunk::ERROR));
    assert_eq!(be32(&p), 22, "EINVAL");
    assert_eq!(p.len(), 6 + be16(&p[4..]) as usize, "message length");
    send(&mut s, cmd::FLUSH, cflags::PAYLOAD_LEN, (10, 0, 16));
    s.write_all(&[0x77; 16]).unwrap();
    let (_, kind, p) = chunk(&mut s, 10, 0);
    assert_eq!((kind, be32(&p)), (chunk::ERROR, 22));
    send(&mut s, cmd::READ, cflags::DF, (11, far + 4096, 4096));
    let (_, kind, p) = chunk(&mut s, 11, far + 4096);
    assert_eq!(kind, chunk::OFFSET_DATA);
    assert_eq!(&p[8..], &[0xab; 4096][..]);
    send(&mut s, cmd::DISC, 0, (12, 0, 0));
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "nothing after disconnect");
}

#[test]
fn export_name_after_extended_headers_closes_and_plain_clients_keep_compact_replies() {
    let (_server, mut s) = connect();
    let r = option(&mut s, opt::EXTENDED_HEADERS, &[]);
    assert_eq!(r.last().unwrap().0, rep::ACK);
    // EXPORT_NAME cannot say the transmission is extended: the server closes.
    s.write_all(&option_bytes(opt::EXPORT_NAME, b"ram"))
        .unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{rest:?}");
    // A client that never asks keeps 28-byte requests and 16-byte simple replies.
    let (_other, mut s) = connect();
    let mut go = named("ram");
    go.extend_from_slice(&0u16.to_be_bytes());
    assert_eq!(option(&mut s, opt::GO, &go).last().unwrap().0, rep::ACK);
    let h = RequestHeader {
        flags: 0,
        kind: cmd::FLUSH,
        cookie: 42,
        offset: 0,
        len: 0,
        extended: false,
    };
    s.write_all(&h.encode()).unwrap();
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(be32(&reply), 0x6744_6698, "simple reply magic");
    assert_eq!(be32(&reply[4..]), 0);
    assert_eq!(be64(&reply[8..]), 42);
}
