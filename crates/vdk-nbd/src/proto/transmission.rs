//! Transmission phase: requests parsed and checked, replies encoded.
//! proto.md sections "Request message", "Simple reply message", "Structured reply chunk
//! message", "Request types" and "Error values"; and the extended headers of the
//! `EXTENDED_HEADERS` extension (proto.md of the nbd project's extension-ext-header branch):
//! 32-byte requests with 64-bit lengths, and 32-byte reply chunk headers that carry the
//! request's offset, used for every reply once negotiated.

use super::{errno, tflags, Cursor};

/// Magic of a request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Size of a request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Magic of an extended request.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of an extended reply chunk.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;
/// Size of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Size of an extended reply chunk header.
pub const EXTENDED_HEADER_LEN: usize = 32;

/// Command types (NBD_CMD_*).
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write, with payload.
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Trim.
    pub const TRIM: u16 = 4;
    /// Prefetch.
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags (NBD_CMD_FLAG_*).
pub mod cflags {
    /// Force unit access.
    pub const FUA: u16 = 1 << 0;
    /// Write zeroes must not leave a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Read reply in one chunk.
    pub const DF: u16 = 1 << 2;
    /// Block status: one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// Write zeroes only if fast.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// Extended headers: the length is that of a payload that follows (writes).
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply chunk types (NBD_REPLY_TYPE_*).
pub mod chunk {
    /// No data; ends a reply.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// A hole (reads as zeroes) at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status descriptors of one context.
    pub const BLOCK_STATUS: u16 = 5;
    /// Block status with 64-bit lengths and flags (extended headers only).
    pub const BLOCK_STATUS_EXT: u16 = 6;
    /// An error.
    pub const ERROR: u16 = (1 << 15) | 1;
}

/// Structured reply flag: this is the last chunk.
pub const REPLY_FLAG_DONE: u16 = 1;

/// A request header as it arrived.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// The client's cookie, echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes (of the payload for a write); above 32 bits only in an extended
    /// request.
    pub len: u64,
    /// It came as an extended request: its reply uses extended chunk headers.
    pub extended: bool,
}

impl RequestHeader {
    /// Parses a request header; `None` if the magic is wrong (the stream is lost).
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Option<RequestHeader> {
        let mut c = Cursor::new(b);
        if c.u32()? != REQUEST_MAGIC {
            return None;
        }
        Some(RequestHeader {
            flags: c.u16()?,
            kind: c.u16()?,
            cookie: c.u64()?,
            offset: c.u64()?,
            len: u64::from(c.u32()?),
            extended: false,
        })
    }

    /// Parses an extended request header; `None` if the magic is wrong.
    pub fn parse_extended(b: &[u8; EXTENDED_REQUEST_LEN]) -> Option<RequestHeader> {
        let mut c = Cursor::new(b);
        if c.u32()? != EXTENDED_REQUEST_MAGIC {
            return None;
        }
        Some(RequestHeader {
            flags: c.u16()?,
            kind: c.u16()?,
            cookie: c.u64()?,
            offset: c.u64()?,
            len: c.u64()?,
            extended: true,
        })
    }

    /// Encodes the header (for clients and tests): 28 bytes, or 32 if it is extended.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(EXTENDED_REQUEST_LEN);
        let magic = if self.extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        b.extend_from_slice(&magic.to_be_bytes());
        b.extend_from_slice(&self.flags.to_be_bytes());
        b.extend_from_slice(&self.kind.to_be_bytes());
        b.extend_from_slice(&self.cookie.to_be_bytes());
        b.extend_from_slice(&self.offset.to_be_bytes());
        if self.extended {
            b.extend_from_slice(&self.len.to_be_bytes());
        } else {
            let len = u32::try_from(self.len).unwrap_or(u32::MAX);
            b.extend_from_slice(&len.to_be_bytes());
        }
        b
    }

    /// Bytes of payload that follow this header: the length of a write; in an extended
    /// request also of any request flagged `PAYLOAD_LEN`; else nothing. (The extension's text
    /// has writes carry the flag; QEMU's client, like its server and nbdkit, sends writes
    /// without it and their length as the payload's: both are taken.)
    pub fn payload_len(&self) -> u64 {
        let carries =
            self.kind == cmd::WRITE || (self.extended && self.flags & cflags::PAYLOAD_LEN != 0);
        if carries {
            self.len
        } else {
            0
        }
    }
}

/// A request checked against what was negotiated.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Command {
    /// Read `len` bytes; `df`: one chunk only.
    Read {
        /// Don't fragment.
        df: bool,
    },
    /// Write the payload; `fua`: durable on reply.
    Write {
        /// Force unit access.
        fua: bool,
    },
    /// Disconnect after the requests in flight.
    Disc,
    /// Flush.
    Flush,
    /// Trim.
    Trim {
        /// Force unit access.
        fua: bool,
    },
    /// Prefetch.
    Cache,
    /// Write zeroes.
    WriteZeroes {
        /// Force unit access.
        fua: bool,
        /// The client forbids a hole.
        no_hole: bool,
        /// Fail with ENOTSUP unless fast.
        fast: bool,
    },
    /// Block status of the negotiated context.
    BlockStatus {
        /// One extent only.
        req_one: bool,
    },
}

/// What was negotiated that decides whether a request is valid.
#[derive(Clone, Copy, Debug, Default)]
pub struct Limits {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags sent to the client.
    pub flags: u16,
    /// Minimum block size: offsets and lengths must be multiples of it.
    pub min_block: u32,
    /// Largest payload of a read or write.
    pub max_payload: u32,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// Extended headers were negotiated: requests and replies have 32-byte headers.
    pub extended: bool,
    /// A metadata context was selected.
    pub meta_context: bool,
}

/// Checks a request and turns it into a [`Command`], or the NBD error to reply with. The
/// checks follow proto.md: unknown commands and flags, flags not valid for the command or not
/// advertised, writes to a read-only export, ranges past the end, misalignment, oversize.
pub fn check_request(h: &RequestHeader, l: &Limits) -> Result<Command, u32> {
    use cflags::*;
    let has = |f: u16| h.flags & f != 0;
    let advertised = |f: u16| l.flags & f != 0;
    // Only a write carries a payload here (its payload was read, or skipped, already).
    if h.extended && has(PAYLOAD_LEN) && h.kind != cmd::WRITE {
        return Err(errno::EINVAL);
    }
    let flags = h.flags & !if h.extended { PAYLOAD_LEN } else { 0 };
    let allowed: u16 = match h.kind {
        cmd::READ => DF,
        cmd::WRITE | cmd::TRIM => FUA,
        cmd::WRITE_ZEROES => FUA | NO_HOLE | FAST_ZERO,
        cmd::BLOCK_STATUS => REQ_ONE,
        cmd::DISC | cmd::FLUSH | cmd::CACHE => 0,
        _ => return Err(errno::EINVAL),
    };
    if flags & !allowed != 0
        || (has(FUA) && !advertised(tflags::SEND_FUA))
        || (has(DF) && !advertised(tflags::SEND_DF))
        || (has(FAST_ZERO) && !advertised(tflags::SEND_FAST_ZERO))
    {
        return Err(errno::EINVAL);
    }
    let read_only = advertised(tflags::READ_ONLY);
    let writes = matches!(h.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    if writes && read_only {
        return Err(errno::EPERM);
    }
    let unsupported = match h.kind {
        cmd::FLUSH => !advertised(tflags::SEND_FLUSH),
        cmd::TRIM => !advertised(tflags::SEND_TRIM),
        cmd::WRITE_ZEROES => !advertised(tflags::SEND_WRITE_ZEROES),
        cmd::CACHE => !advertised(tflags::SEND_CACHE),
        cmd::BLOCK_STATUS => !l.meta_context,
        _ => false,
    };
    if unsupported {
        return Err(errno::EINVAL);
    }
    if !matches!(h.kind, cmd::DISC | cmd::FLUSH) {
        let len = h.len;
        let past_end = h.offset.checked_add(len).is_none_or(|end| end > l.size);
        if past_end {
            // proto.md: writes past the end are ENOSPC, reads and trims EINVAL.
            let data_write = matches!(h.kind, cmd::WRITE | cmd::WRITE_ZEROES);
            return Err(if data_write {
                errno::ENOSPC
            } else {
                errno::EINVAL
            });
        }
        let bs = u64::from(l.min_block.max(1));
        if !h.offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Err(errno::EINVAL);
        }
        if matches!(h.kind, cmd::READ | cmd::WRITE) && h.len > u64::from(l.max_payload) {
            return Err(errno::EINVAL);
        }
    }
    Ok(match h.kind {
        cmd::READ => Command::Read { df: has(DF) },
        cmd::WRITE => Command::Write { fua: has(FUA) },
        cmd::DISC => Command::Disc,
        cmd::FLUSH => Command::Flush,
        cmd::TRIM => Command::Trim { fua: has(FUA) },
        cmd::CACHE => Command::Cache,
        cmd::WRITE_ZEROES => Command::WriteZeroes {
            fua: has(FUA),
            no_hole: has(NO_HOLE),
            fast: has(FAST_ZERO),
        },
        _ => Command::BlockStatus {
            req_one: has(REQ_ONE),
        },
    })
}

/// A simple reply: magic, error, cookie.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Appends the header of a reply chunk to `h`: a structured chunk header, or an extended one
/// (which repeats the request's offset) if `h` came extended. `len` is the chunk's payload.
pub fn chunk_header(out: &mut Vec<u8>, flags: u16, kind: u16, h: &RequestHeader, len: u32) {
    let magic = if h.extended {
        EXTENDED_REPLY_MAGIC
    } else {
        STRUCTURED_REPLY_MAGIC
    };
    out.extend_from_slice(&magic.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&h.cookie.to_be_bytes());
    if h.extended {
        out.extend_from_slice(&h.offset.to_be_bytes());
        out.extend_from_slice(&u64::from(len).to_be_bytes());
    } else {
        out.extend_from_slice(&len.to_be_bytes());
    }
}

/// Appends the success of a request without data: a simple reply, or with extended headers
/// (where simple replies are not allowed) a final NONE chunk.
pub fn ok_reply(out: &mut Vec<u8>, h: &RequestHeader) {
    if h.extended {
        done_chunk(out, h);
    } else {
        out.extend_from_slice(&simple_reply(0, h.cookie));
    }
}

/// Appends the header of an OFFSET_DATA chunk carrying `data_len` bytes; the data follows.
pub fn offset_data_header(
    out: &mut Vec<u8>,
    done: bool,
    h: &RequestHeader,
    offset: u64,
    data_len: u32,
) {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    chunk_header(
        out,
        flags,
        chunk::OFFSET_DATA,
        h,
        data_len.saturating_add(8),
    );
    out.extend_from_slice(&offset.to_be_bytes());
}

/// Appends an OFFSET_HOLE chunk.
pub fn offset_hole(out: &mut Vec<u8>, done: bool, h: &RequestHeader, offset: u64, len: u32) {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    chunk_header(out, flags, chunk::OFFSET_HOLE, h, 12);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Appends a final NONE chunk.
pub fn done_chunk(out: &mut Vec<u8>, h: &RequestHeader) {
    chunk_header(out, REPLY_FLAG_DONE, chunk::NONE, h, 0);
}

/// Appends a final ERROR chunk with a message (cut to the protocol's string limit).
pub fn error_chunk(out: &mut Vec<u8>, h: &RequestHeader, error: u32, message: &str) {
    let msg = &message.as_bytes()[..message.len().min(super::MAX_STRING)];
    let msg_len = u16::try_from(msg.len()).unwrap_or(0); // at most 4096
    chunk_header(
        out,
        REPLY_FLAG_DONE,
        chunk::ERROR,
        h,
        6 + u32::from(msg_len),
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&msg_len.to_be_bytes());
    out.extend_from_slice(msg);
}

/// Appends a block status chunk of `(length, flags)` descriptors (the reply's last if `last`): BLOCK_STATUS, or
/// BLOCK_STATUS_EXT (64-bit lengths and flags, and a count) if `h` came extended. Compact
/// requests are shorter than 4 GiB, so their lengths fit in 32 bits.
pub fn block_status(
    out: &mut Vec<u8>,
    h: &RequestHeader,
    context: u32,
    extents: &[(u64, u32)],
    last: bool,
) {
    // Callers bound the descriptor count far below 2^27.
    let count = u32::try_from(extents.len()).unwrap_or(u32::MAX);
    let done = if last { REPLY_FLAG_DONE } else { 0 };
    if h.extended {
        let len = 8u32.saturating_add(count.saturating_mul(16));
        chunk_header(out, done, chunk::BLOCK_STATUS_EXT, h, len);
        out.extend_from_slice(&context.to_be_bytes());
        out.extend_from_slice(&count.to_be_bytes());
        for (length, flags) in extents {
            out.extend_from_slice(&length.to_be_bytes());
            out.extend_from_slice(&u64::from(*flags).to_be_bytes());
        }
    } else {
        let len = 4u32.saturating_add(count.saturating_mul(8));
        chunk_header(out, done, chunk::BLOCK_STATUS, h, len);
        out.extend_from_slice(&context.to_be_bytes());
        for (length, flags) in extents {
            let length = u32::try_from(*length).unwrap_or(u32::MAX);
            out.extend_from_slice(&length.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u16 = tflags::HAS_FLAGS
        | tflags::SEND_FLUSH
        | tflags::SEND_FUA
        | tflags::SEND_TRIM
        | tflags::SEND_WRITE_ZEROES
        | tflags::SEND_DF
        | tflags::SEND_CACHE
        | tflags::SEND_FAST_ZERO;
    const MIB: u64 = 1 << 20;

    fn limits(flags: u16) -> Limits {
        Limits {
            size: MIB,
            flags,
            min_block: 1,
            max_payload: 32 << 20,
            structured: true,
            extended: false,
            meta_context: true,
        }
    }

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            cookie: 7,
            offset,
            len: u64::from(len),
            extended: false,
        }
    }

    #[test]
    fn header_round_trips() {
        let h = req(cmd::WRITE, cflags::FUA, 4096, 512);
        assert_eq!(
            RequestHeader::parse(h.encode().first_chunk().unwrap()),
            Some(h)
        );
    }

    #[test]
    fn bad_magic_is_none() {
        assert_eq!(RequestHeader::parse(&[0u8; REQUEST_LEN]), None);
    }

    #[test]
    fn write_past_end_is_enospc() {
        let r = check_request(&req(cmd::WRITE, 0, MIB - 1, 2), &limits(ALL));
        assert_eq!(r, Err(errno::ENOSPC));
    }

    #[test]
    fn trim_past_end_is_einval() {
        let r = check_request(&req(cmd::TRIM, 0, MIB - 1, 2), &limits(ALL));
        assert_eq!(r, Err(errno::EINVAL));
    }

    #[test]
    fn read_past_end_is_einval() {
        let r = check_request(&req(cmd::READ, 0, MIB, 1), &limits(ALL));
        assert_eq!(r, Err(errno::EINVAL));
    }

    #[test]
    fn overflowing_offset_is_an_error_not_a_wrap() {
        let r = check_request(&req(cmd::READ, 0, u64::MAX, 2), &limits(ALL));
        assert_eq!(r, Err(errno::EINVAL));
    }

    #[test]
    fn write_to_read_only_export_is_eperm() {
        let r = check_request(&req(cmd::TRIM, 0, 0, 1), &limits(ALL | tflags::READ_ONLY));
        assert_eq!(r, Err(errno::EPERM));
    }

    #[test]
    fn flag_of_another_command_is_einval() {
        let r = check_request(&req(cmd::READ, cflags::FUA, 0, 1), &limits(ALL));
        assert_eq!(r, Err(errno::EINVAL));
    }

    #[test]
    fn unknown_command_is_einval() {
        assert_eq!(
            check_request(&req(99, 0, 0, 0), &limits(ALL)),
            Err(errno::EINVAL)
        );
    }

    #[test]
    fn read_over_max_payload_is_einval() {
        let mut l = limits(ALL);
        l.size = u64::MAX;
        let r = check_request(&req(cmd::READ, 0, 0, (32 << 20) + 1), &l);
        assert_eq!(r, Err(errno::EINVAL));
    }

    #[test]
    fn zero_write_with_all_flags_is_accepted() {
        let flags = cflags::FUA | cflags::NO_HOLE | cflags::FAST_ZERO;
        let r = check_request(&req(cmd::WRITE_ZEROES, flags, 0, 4096), &limits(ALL));
        assert_eq!(
            r,
            Ok(Command::WriteZeroes {
                fua: true,
                no_hole: true,
                fast: true
            })
        );
    }

    #[test]
    fn block_status_without_context_is_einval() {
        let mut l = limits(ALL);
        l.meta_context = false;
        assert_eq!(
            check_request(&req(cmd::BLOCK_STATUS, 0, 0, 1), &l),
            Err(errno::EINVAL)
        );
    }

    #[test]
    fn misaligned_request_is_einval() {
        let mut l = limits(ALL);
        l.min_block = 512;
        assert_eq!(
            check_request(&req(cmd::READ, 0, 100, 512), &l),
            Err(errno::EINVAL)
        );
    }
}
