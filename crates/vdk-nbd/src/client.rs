//! The client's side of the handshake, for a process that hands the connection to another
//! party for transmission: the kernel's NBD driver, which takes sockets already past the
//! handshake (as `nbd-client` gives it). Fixed newstyle, `NBD_OPT_GO`, simple replies only.

use std::io::{self, Read, Write};

use crate::proto::handshake::{info, opt, rep};
use crate::proto::{
    tflags, CLIENT_FIXED_NEWSTYLE, CLIENT_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT,
    NBDMAGIC, REPLY_MAGIC,
};

/// What the server said of the export chosen.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Chosen {
    /// Its size in bytes.
    pub size: u64,
    /// Its transmission flags (`NBD_FLAG_*`).
    pub flags: u16,
}

impl Chosen {
    /// Whether the export is read-only.
    pub fn read_only(&self) -> bool {
        self.flags & tflags::READ_ONLY != 0
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_u16(s: &mut impl Read) -> io::Result<u16> {
    let mut b = [0; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(s: &mut impl Read) -> io::Result<u32> {
    let mut b = [0; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(s: &mut impl Read) -> io::Result<u64> {
    let mut b = [0; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Negotiates the export `name` on `stream` with `NBD_OPT_GO`; afterwards the stream is in
/// transmission with simple replies.
pub fn go<S: Read + Write>(stream: &mut S, name: &str) -> io::Result<Chosen> {
    if read_u64(stream)? != NBDMAGIC || read_u64(stream)? != IHAVEOPT {
        return Err(bad("not a newstyle NBD server"));
    }
    let server = read_u16(stream)?;
    if server & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(bad("the NBD server is not fixed newstyle"));
    }
    let mut client = CLIENT_FIXED_NEWSTYLE;
    if server & FLAG_NO_ZEROES != 0 {
        client |= CLIENT_NO_ZEROES;
    }
    let name_len = u32::try_from(name.len()).map_err(|_| bad("export name too long"))?;
    let mut out = Vec::with_capacity(32 + name.len());
    out.extend_from_slice(&client.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt::GO.to_be_bytes());
    out.extend_from_slice(&(name_len + 6).to_be_bytes());
    out.extend_from_slice(&name_len.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    stream.write_all(&out)?;
    stream.flush()?;
    let mut chosen = None;
    loop {
        if read_u64(stream)? != REPLY_MAGIC {
            return Err(bad("bad option reply magic"));
        }
        let option = read_u32(stream)?;
        let kind = read_u32(stream)?;
        let len = read_u32(stream)?;
        if option != opt::GO {
            return Err(bad(format!("a reply to option {option}, not to GO")));
        }
        if len > 64 << 10 {
            return Err(bad("option reply too long"));
        }
        let mut data = vec![0; len as usize];
        stream.read_exact(&mut data)?;
        match kind {
            rep::ACK => break,
            rep::INFO if data.len() >= 12 && data[..2] == info::EXPORT.to_be_bytes() => {
                let size = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
                let flags = u16::from_be_bytes([data[10], data[11]]);
                chosen = Some(Chosen { size, flags });
            }
            rep::INFO => {}
            k if k & rep::ERR != 0 => {
                let why = String::from_utf8_lossy(&data);
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("the NBD server refused export {name:?}: {why} (error {k:#x})"),
                ));
            }
            k => return Err(bad(format!("unexpected option reply {k}"))),
        }
    }
    chosen.ok_or_else(|| bad("the NBD server sent no export information"))
}
