//! iSCSI PDUs (RFC 7143 section 11), as bytes and as typed values, with no I/O.
//!
//! Every PDU starts with the 48-byte Basic Header Segment ([`Bhs`]); what follows it is
//! sized by two of its fields:
//!
//! ```text
//!   BHS (48) | AHS (4 x TotalAHSLength) | header digest (4)? | data segment | pad to 4 | data digest (4)?
//! ```
//!
//! [`request`] turns the header of a PDU an initiator sent into a typed [`Request`], checking
//! what can be checked without session state; [`response`] builds the headers a target sends.
//! Digests are CRC32C ([`digest`]), sent least significant byte first.

pub mod request;
pub mod response;

use std::fmt;

pub use request::{
    DataOut, LoginRequest, LogoutRequest, NopOut, PduError, Request, ScsiCommand, TaskManagement,
    TextRequest,
};

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;

/// The value of a task tag that names no task (RFC 7143 11.18: reserved tag).
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// Opcodes (RFC 7143 11.1.1).
pub mod opcode {
    /// NOP-Out (initiator).
    pub const NOP_OUT: u8 = 0x00;
    /// SCSI Command.
    pub const SCSI_COMMAND: u8 = 0x01;
    /// SCSI Task Management Function Request.
    pub const TASK_MGMT: u8 = 0x02;
    /// Login Request.
    pub const LOGIN: u8 = 0x03;
    /// Text Request.
    pub const TEXT: u8 = 0x04;
    /// SCSI Data-Out.
    pub const DATA_OUT: u8 = 0x05;
    /// Logout Request.
    pub const LOGOUT: u8 = 0x06;
    /// SNACK Request.
    pub const SNACK: u8 = 0x10;
    /// NOP-In (target).
    pub const NOP_IN: u8 = 0x20;
    /// SCSI Response.
    pub const SCSI_RESPONSE: u8 = 0x21;
    /// SCSI Task Management Function Response.
    pub const TASK_MGMT_RESPONSE: u8 = 0x22;
    /// Login Response.
    pub const LOGIN_RESPONSE: u8 = 0x23;
    /// Text Response.
    pub const TEXT_RESPONSE: u8 = 0x24;
    /// SCSI Data-In.
    pub const DATA_IN: u8 = 0x25;
    /// Logout Response.
    pub const LOGOUT_RESPONSE: u8 = 0x26;
    /// Ready To Transfer.
    pub const R2T: u8 = 0x31;
    /// Asynchronous Message.
    pub const ASYNC: u8 = 0x32;
    /// Reject.
    pub const REJECT: u8 = 0x3f;
}

/// Reasons of a Reject PDU (RFC 7143 11.17.1).
pub mod reject {
    /// The data digest of the PDU was wrong.
    pub const DATA_DIGEST_ERROR: u8 = 0x02;
    /// A SNACK could not be answered.
    pub const SNACK_REJECT: u8 = 0x03;
    /// The PDU breaks the protocol.
    pub const PROTOCOL_ERROR: u8 = 0x04;
    /// The command is not supported.
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    /// Too many immediate commands.
    pub const IMMEDIATE_COMMAND_REJECT: u8 = 0x06;
    /// A task with this tag is already in progress.
    pub const TASK_IN_PROGRESS: u8 = 0x07;
    /// A field of the PDU is invalid.
    pub const INVALID_PDU_FIELD: u8 = 0x09;
    /// The target is waiting for the initiator to log out.
    pub const WAITING_FOR_LOGOUT: u8 = 0x0c;
}

/// A data segment of `len` bytes padded to a multiple of 4.
pub fn padded(len: usize) -> usize {
    len.div_ceil(4) * 4
}

/// The CRC32C of the concatenation of `parts` (RFC 7143 13.1), as header and data digests
/// use it.
///
/// ```
/// // The check value of CRC-32C.
/// assert_eq!(vdk_iscsi::pdu::digest(&[b"123", b"456789"]), 0xe306_9283);
/// ```
pub fn digest(parts: &[&[u8]]) -> u32 {
    parts
        .iter()
        .fold(0, |crc, part| crc32c::crc32c_append(crc, part))
}

/// The 48-byte Basic Header Segment of a PDU. Accessors read and write fields at the byte
/// offsets of RFC 7143 section 11; multi-byte fields are big-endian.
#[derive(Clone, Copy, Eq, PartialEq)]
pub struct Bhs(pub [u8; BHS_LEN]);

impl Bhs {
    /// A header of `opcode` with every other field zero.
    pub fn new(opcode: u8) -> Bhs {
        let mut b = [0u8; BHS_LEN];
        b[0] = opcode & 0x3f;
        Bhs(b)
    }

    /// The opcode (six bits).
    pub fn opcode(&self) -> u8 {
        self.0[0] & 0x3f
    }

    /// The I bit: an immediate command.
    pub fn immediate(&self) -> bool {
        self.0[0] & 0x40 != 0
    }

    /// Byte 1: the F bit and the opcode-specific flags.
    pub fn flags(&self) -> u8 {
        self.0[1]
    }

    /// The length of the Additional Header Segments in bytes.
    pub fn ahs_len(&self) -> usize {
        usize::from(self.0[4]) * 4
    }

    /// The length of the data segment in bytes, without padding.
    pub fn data_len(&self) -> usize {
        usize::from(self.0[5]) << 16 | usize::from(self.0[6]) << 8 | usize::from(self.0[7])
    }

    /// Sets the data segment length. Lengths are bounded far below 2^24 by the negotiated
    /// limits; a larger one is a bug of the caller.
    pub fn set_data_len(&mut self, len: usize) {
        debug_assert!(len < 1 << 24, "data segment of {len} bytes");
        let b = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
        self.0[5..8].copy_from_slice(&b[1..]);
    }

    /// The 8-byte LUN field (bytes 8-15).
    pub fn lun(&self) -> [u8; 8] {
        let mut l = [0u8; 8];
        l.copy_from_slice(&self.0[8..16]);
        l
    }

    /// Sets the LUN field.
    pub fn set_lun(&mut self, lun: [u8; 8]) {
        self.0[8..16].copy_from_slice(&lun);
    }

    /// The Initiator Task Tag (bytes 16-19).
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }

    /// The 32-bit field at byte `at`.
    pub fn u32_at(&self, at: usize) -> u32 {
        u32::from_be_bytes([self.0[at], self.0[at + 1], self.0[at + 2], self.0[at + 3]])
    }

    /// The 16-bit field at byte `at`.
    pub fn u16_at(&self, at: usize) -> u16 {
        u16::from_be_bytes([self.0[at], self.0[at + 1]])
    }

    /// Sets the 32-bit field at byte `at`.
    pub fn set_u32(&mut self, at: usize, v: u32) {
        self.0[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }

    /// Sets the 16-bit field at byte `at`.
    pub fn set_u16(&mut self, at: usize, v: u16) {
        self.0[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }
}

impl fmt::Debug for Bhs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bhs(")?;
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 && i % 4 == 0 {
                f.write_str(" ")?;
            }
            write!(f, "{b:02x}")?;
        }
        f.write_str(")")
    }
}

/// Serial number arithmetic of 32-bit sequence numbers (RFC 1982, as RFC 7143 4.2.2.1
/// uses it): whether `a` comes before `b`.
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 1 << 31
}

#[cfg(test)]
mod tests;
