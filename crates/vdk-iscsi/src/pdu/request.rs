//! The PDUs an initiator sends, decoded from their headers (RFC 7143 sections 11.2-11.16).
//!
//! [`Request::parse`] checks what a header alone can show: the opcode, the AHS, fields that
//! must be zero or one. What needs session state (sequence numbers, tags, negotiated limits)
//! is checked by the server.

use super::{opcode, Bhs};

/// Why a PDU header was refused. Each maps onto the Reject reason that answers it.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PduError {
    /// An opcode no initiator may send.
    #[error("unknown initiator opcode {0:#04x}")]
    UnknownOpcode(u8),
    /// The Additional Header Segments do not parse.
    #[error("malformed additional header segment")]
    BadAhs,
    /// A field holds a value the protocol does not allow.
    #[error("invalid {0} field")]
    BadField(&'static str),
}

impl PduError {
    /// The Reject reason for this error (RFC 7143 11.17.1).
    pub fn reject_reason(&self) -> u8 {
        match self {
            PduError::UnknownOpcode(_) => super::reject::PROTOCOL_ERROR,
            PduError::BadAhs | PduError::BadField(_) => super::reject::INVALID_PDU_FIELD,
        }
    }
}

/// SCSI Command (11.3).
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct ScsiCommand {
    /// Delivered immediately: its CmdSN does not advance the window.
    pub immediate: bool,
    /// F: no unsolicited Data-Out follows.
    pub final_pdu: bool,
    /// R: data from the target is expected.
    pub read: bool,
    /// W: data to the target is expected.
    pub write: bool,
    /// Task attributes (0 untagged, 1 simple, 2 ordered, 3 head of queue, 4 ACA).
    pub attr: u8,
    /// The logical unit.
    pub lun: [u8; 8],
    /// Initiator Task Tag.
    pub itt: u32,
    /// Expected Data Transfer Length, bytes.
    pub edtl: u32,
    /// Command sequence number.
    pub cmd_sn: u32,
    /// Expected StatSN (acknowledges responses up to it).
    pub exp_stat_sn: u32,
    /// The CDB: the 16 bytes of the header and any extended CDB AHS after them.
    pub cdb: Vec<u8>,
    /// The bidirectional read data length AHS, if sent.
    pub bidi_read_len: Option<u32>,
}

/// SCSI Data-Out (11.7).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct DataOut {
    /// F: the last PDU of its sequence.
    pub final_pdu: bool,
    /// The logical unit (meaningful only with a target transfer tag).
    pub lun: [u8; 8],
    /// The task the data belongs to.
    pub itt: u32,
    /// The R2T it answers, or [`RESERVED_TAG`](super::RESERVED_TAG) for unsolicited data.
    pub ttt: u32,
    /// Expected StatSN.
    pub exp_stat_sn: u32,
    /// Number of this PDU within its sequence.
    pub data_sn: u32,
    /// Where the data goes in the command's buffer, bytes.
    pub offset: u32,
}

/// NOP-Out (11.18).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct NopOut {
    /// Immediate delivery.
    pub immediate: bool,
    /// The LUN field, echoed.
    pub lun: [u8; 8],
    /// A ping when not the reserved tag: it wants a NOP-In back.
    pub itt: u32,
    /// The target's ping this answers, or the reserved tag.
    pub ttt: u32,
    /// Command sequence number.
    pub cmd_sn: u32,
    /// Expected StatSN.
    pub exp_stat_sn: u32,
}

/// SCSI Task Management Function Request (11.5).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct TaskManagement {
    /// Immediate delivery.
    pub immediate: bool,
    /// The function (1 ABORT TASK ... 8 TASK REASSIGN).
    pub function: u8,
    /// The logical unit.
    pub lun: [u8; 8],
    /// This request's own tag.
    pub itt: u32,
    /// For ABORT TASK: the tag of the task to abort.
    pub referenced_tag: u32,
    /// Command sequence number.
    pub cmd_sn: u32,
    /// Expected StatSN.
    pub exp_stat_sn: u32,
    /// For ABORT TASK: the CmdSN of the task to abort.
    pub ref_cmd_sn: u32,
}

/// Login Request (11.12).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct LoginRequest {
    /// T: the initiator wants to move to `nsg`.
    pub transit: bool,
    /// C: the text continues in the next PDU.
    pub cont: bool,
    /// Current stage (0 security, 1 operational).
    pub csg: u8,
    /// Next stage (1 operational, 3 full feature), meaningful with T.
    pub nsg: u8,
    /// Highest protocol version the initiator supports.
    pub version_max: u8,
    /// Lowest protocol version the initiator supports.
    pub version_min: u8,
    /// Initiator part of the session id.
    pub isid: [u8; 6],
    /// Target part of the session id: 0 for a new session.
    pub tsih: u16,
    /// Initiator Task Tag.
    pub itt: u32,
    /// Connection id.
    pub cid: u16,
    /// Command sequence number.
    pub cmd_sn: u32,
    /// Expected StatSN.
    pub exp_stat_sn: u32,
}

/// Text Request (11.10).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct TextRequest {
    /// Immediate delivery.
    pub immediate: bool,
    /// F: the last PDU of the request.
    pub final_pdu: bool,
    /// C: the text continues in the next PDU.
    pub cont: bool,
    /// Initiator Task Tag.
    pub itt: u32,
    /// The reserved tag to start, or the tag of the target's partial response it continues.
    pub ttt: u32,
    /// Command sequence number.
    pub cmd_sn: u32,
    /// Expected StatSN.
    pub exp_stat_sn: u32,
}

/// Logout Request (11.14).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct LogoutRequest {
    /// Immediate delivery.
    pub immediate: bool,
    /// 0 close the session, 1 close a connection, 2 remove a connection for recovery.
    pub reason: u8,
    /// Initiator Task Tag.
    pub itt: u32,
    /// The connection to close (reasons 1 and 2).
    pub cid: u16,
    /// Command sequence number.
    pub cmd_sn: u32,
    /// Expected StatSN.
    pub exp_stat_sn: u32,
}

/// A PDU an initiator sent.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Request {
    /// NOP-Out.
    NopOut(NopOut),
    /// SCSI Command.
    Command(ScsiCommand),
    /// Task management.
    TaskManagement(TaskManagement),
    /// Login.
    Login(LoginRequest),
    /// Text.
    Text(TextRequest),
    /// Data-Out.
    DataOut(DataOut),
    /// Logout.
    Logout(LogoutRequest),
    /// SNACK (not served: vdk negotiates ErrorRecoveryLevel 0).
    Snack {
        /// Initiator Task Tag.
        itt: u32,
    },
}

/// AHS types (RFC 7143 11.2.2).
const AHS_EXTENDED_CDB: u8 = 1;
const AHS_BIDI_READ_LENGTH: u8 = 2;

/// The longest CDB accepted: 16 bytes in the header plus an extended CDB AHS (SPC allows
/// up to 260 bytes).
pub const MAX_CDB: usize = 260;

impl Request {
    /// Decodes a header and its AHS bytes (`ahs` is exactly `bhs.ahs_len()` long).
    pub fn parse(bhs: &Bhs, ahs: &[u8]) -> Result<Request, PduError> {
        let f = bhs.flags();
        let imm = bhs.immediate();
        if bhs.opcode() != opcode::SCSI_COMMAND && !ahs.is_empty() {
            return Err(PduError::BadAhs);
        }
        Ok(match bhs.opcode() {
            opcode::NOP_OUT => {
                if f & 0x80 == 0 {
                    return Err(PduError::BadField("F bit"));
                }
                Request::NopOut(NopOut {
                    immediate: imm,
                    lun: bhs.lun(),
                    itt: bhs.itt(),
                    ttt: bhs.u32_at(20),
                    cmd_sn: bhs.u32_at(24),
                    exp_stat_sn: bhs.u32_at(28),
                })
            }
            opcode::SCSI_COMMAND => Request::Command(command(bhs, ahs)?),
            opcode::TASK_MGMT => {
                if f & 0x80 == 0 {
                    return Err(PduError::BadField("F bit"));
                }
                Request::TaskManagement(TaskManagement {
                    immediate: imm,
                    function: f & 0x7f,
                    lun: bhs.lun(),
                    itt: bhs.itt(),
                    referenced_tag: bhs.u32_at(20),
                    cmd_sn: bhs.u32_at(24),
                    exp_stat_sn: bhs.u32_at(28),
                    ref_cmd_sn: bhs.u32_at(32),
                })
            }
            opcode::LOGIN => {
                let transit = f & 0x80 != 0;
                let cont = f & 0x40 != 0;
                if transit && cont {
                    return Err(PduError::BadField("T and C bits"));
                }
                let mut isid = [0u8; 6];
                isid.copy_from_slice(&bhs.0[8..14]);
                Request::Login(LoginRequest {
                    transit,
                    cont,
                    csg: (f >> 2) & 0x03,
                    nsg: f & 0x03,
                    version_max: bhs.0[2],
                    version_min: bhs.0[3],
                    isid,
                    tsih: bhs.u16_at(14),
                    itt: bhs.itt(),
                    cid: bhs.u16_at(20),
                    cmd_sn: bhs.u32_at(24),
                    exp_stat_sn: bhs.u32_at(28),
                })
            }
            opcode::TEXT => {
                let final_pdu = f & 0x80 != 0;
                let cont = f & 0x40 != 0;
                if final_pdu && cont {
                    return Err(PduError::BadField("F and C bits"));
                }
                Request::Text(TextRequest {
                    immediate: imm,
                    final_pdu,
                    cont,
                    itt: bhs.itt(),
                    ttt: bhs.u32_at(20),
                    cmd_sn: bhs.u32_at(24),
                    exp_stat_sn: bhs.u32_at(28),
                })
            }
            opcode::DATA_OUT => Request::DataOut(DataOut {
                final_pdu: f & 0x80 != 0,
                lun: bhs.lun(),
                itt: bhs.itt(),
                ttt: bhs.u32_at(20),
                exp_stat_sn: bhs.u32_at(28),
                data_sn: bhs.u32_at(36),
                offset: bhs.u32_at(40),
            }),
            opcode::LOGOUT => {
                if f & 0x80 == 0 {
                    return Err(PduError::BadField("F bit"));
                }
                Request::Logout(LogoutRequest {
                    immediate: imm,
                    reason: f & 0x7f,
                    itt: bhs.itt(),
                    cid: bhs.u16_at(20),
                    cmd_sn: bhs.u32_at(24),
                    exp_stat_sn: bhs.u32_at(28),
                })
            }
            opcode::SNACK => Request::Snack { itt: bhs.itt() },
            other => return Err(PduError::UnknownOpcode(other)),
        })
    }
}

fn command(bhs: &Bhs, ahs: &[u8]) -> Result<ScsiCommand, PduError> {
    let f = bhs.flags();
    let mut cdb = bhs.0[32..48].to_vec();
    let mut bidi_read_len = None;
    let mut rest = ahs;
    while !rest.is_empty() {
        if rest.len() < 4 {
            return Err(PduError::BadAhs);
        }
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let kind = rest[2];
        // AHSLength counts the bytes after the type byte, including the specific byte;
        // each AHS is padded to 4.
        let total = super::padded(3 + len);
        if len == 0 || total > rest.len() {
            return Err(PduError::BadAhs);
        }
        let body = &rest[4..3 + len];
        match kind {
            AHS_EXTENDED_CDB if cdb.len() == 16 => {
                if 16 + body.len() > MAX_CDB {
                    return Err(PduError::BadAhs);
                }
                cdb.extend_from_slice(body);
            }
            AHS_BIDI_READ_LENGTH if bidi_read_len.is_none() && body.len() == 4 => {
                bidi_read_len = Some(u32::from_be_bytes([body[0], body[1], body[2], body[3]]));
            }
            _ => return Err(PduError::BadAhs),
        }
        rest = &rest[total..];
    }
    let read = f & 0x40 != 0;
    let write = f & 0x20 != 0;
    let edtl = bhs.u32_at(20);
    if !read && !write && edtl != 0 {
        // A transfer length with no direction (RFC 7143 11.3.1.2 says R and W may both be
        // clear only when no data is transferred).
        return Err(PduError::BadField("expected data transfer length"));
    }
    if f & 0x80 == 0 && !write {
        // Only a write may be followed by unsolicited data.
        return Err(PduError::BadField("F bit"));
    }
    Ok(ScsiCommand {
        immediate: bhs.immediate(),
        final_pdu: f & 0x80 != 0,
        read,
        write,
        attr: f & 0x07,
        lun: bhs.lun(),
        itt: bhs.itt(),
        edtl,
        cmd_sn: bhs.u32_at(24),
        exp_stat_sn: bhs.u32_at(28),
        cdb,
        bidi_read_len,
    })
}
