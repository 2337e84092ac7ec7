//! The NBD wire protocol as typed messages, with no I/O.
//!
//! Everything here turns bytes into values and values into bytes, so that it can be unit
//! tested and fuzzed; the server owns the sockets. The reference is `doc/proto.md` of the
//! NetworkBlockDevice/nbd repository ("The NBD protocol"): the fixed newstyle handshake
//! (section "Newstyle negotiation"), the option haggling phase ("Option types"), and the
//! transmission phase ("Request message", "Simple reply message", "Structured reply chunk
//! message").
//!
//! ```text
//!  client                          server
//!    |  <-- NBDMAGIC IHAVEOPT flags   |   greeting
//!    |  client flags -->              |
//!    |  option (IHAVEOPT, type, len) ->|   option haggling, repeated
//!    |  <-- option reply(s)           |
//!    |  OPT_GO / OPT_EXPORT_NAME ---->|
//!    |  <-- export info, ACK          |
//!    |  request (28 bytes + payload) ->|   transmission, many in flight
//!    |  <-- simple or structured reply|   in any order, matched by cookie
//! ```

pub mod handshake;
pub mod transmission;

/// "NBDMAGIC": the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": the newstyle magic, also the magic of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic of an option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flag: fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server may omit the 124 zero bytes after NBD_OPT_EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client does not want the 124 zero bytes.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags, sent with the export size (proto.md "Transmission flags").
pub mod tflags {
    /// Always set: the other flags mean something.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// NBD_CMD_FLUSH is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// NBD_CMD_FLAG_FUA is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// The export is on rotational media.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// NBD_CMD_TRIM is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// NBD_CMD_WRITE_ZEROES is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// NBD_CMD_FLAG_DF is supported.
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections see one consistent export.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// NBD_CMD_CACHE is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// NBD_CMD_FLAG_FAST_ZERO is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// NBD error values (proto.md "Error values"); equal to the Linux errno numbers.
pub mod errno {
    /// Operation not permitted (a write to a read-only export).
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left (a write past the end).
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Operation not supported (a fast zero that would not be fast).
    pub const ENOTSUP: u32 = 95;
    /// The server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// The only metadata context vdk serves: allocation status.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// base:allocation flag: the extent is a hole (not allocated).
pub const STATE_HOLE: u32 = 1 << 0;
/// base:allocation flag: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;
/// qemu:dirty-bitmap flag: the extent was written since the bitmap was last cleared.
pub const STATE_DIRTY: u32 = 1 << 0;

/// Strings (export names, descriptions, queries) may not be longer than this (proto.md
/// "Conventions").
pub const MAX_STRING: usize = 4096;

/// Big-endian reader over a byte slice that fails instead of panicking.
#[derive(Debug)]
pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Cursor { buf }
    }
    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(head)
    }
    pub(crate) fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    pub(crate) fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    pub(crate) fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}
