//! The headers of the PDUs a target sends (RFC 7143 sections 11.4-11.19). Each builder takes
//! the fields the PDU carries; the caller sets the data segment length when it sends data.

use super::{opcode, Bhs, RESERVED_TAG};

/// The sequence numbers most target PDUs carry: the connection's StatSN and the session's
/// command window.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct Numbers {
    /// StatSN of this PDU (or, for a PDU that carries no status, the next one).
    pub stat_sn: u32,
    /// The next CmdSN the target expects.
    pub exp_cmd_sn: u32,
    /// The last CmdSN the target accepts.
    pub max_cmd_sn: u32,
}

impl Numbers {
    fn put(&self, b: &mut Bhs) {
        b.set_u32(24, self.stat_sn);
        b.set_u32(28, self.exp_cmd_sn);
        b.set_u32(32, self.max_cmd_sn);
    }
}

/// Residual of a command (RFC 7143 11.4.5): how much less or more data the command moved
/// than the Expected Data Transfer Length said.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum Residual {
    /// Exactly the expected length.
    #[default]
    None,
    /// Fewer bytes than expected (U bit).
    Underflow(u32),
    /// The command needed more bytes than expected (O bit).
    Overflow(u32),
}

impl Residual {
    /// The residual of a command that needed `needed` bytes moved when the initiator
    /// expected `edtl`.
    pub fn of(edtl: u32, needed: u64) -> Residual {
        match needed.cmp(&u64::from(edtl)) {
            std::cmp::Ordering::Equal => Residual::None,
            std::cmp::Ordering::Less => {
                Residual::Underflow(edtl - u32::try_from(needed).unwrap_or(edtl))
            }
            std::cmp::Ordering::Greater => {
                Residual::Overflow(u32::try_from(needed - u64::from(edtl)).unwrap_or(u32::MAX))
            }
        }
    }

    fn put(&self, b: &mut Bhs) {
        match *self {
            Residual::None => {}
            Residual::Underflow(n) => {
                b.0[1] |= 0x02;
                b.set_u32(44, n);
            }
            Residual::Overflow(n) => {
                b.0[1] |= 0x04;
                b.set_u32(44, n);
            }
        }
    }
}

/// SCSI Response (11.4). `response` is 0 (command completed at target) or 1 (target
/// failure); sense, if any, goes in the data segment.
pub fn scsi_response(
    itt: u32,
    response: u8,
    status: u8,
    residual: Residual,
    exp_data_sn: u32,
    n: Numbers,
) -> Bhs {
    let mut b = Bhs::new(opcode::SCSI_RESPONSE);
    b.0[1] = 0x80;
    b.0[2] = response;
    b.0[3] = status;
    b.set_u32(16, itt);
    n.put(&mut b);
    b.set_u32(36, exp_data_sn);
    residual.put(&mut b);
    b
}

/// The data segment of a SCSI Response with sense: a 2-byte length, then the sense bytes.
pub fn sense_segment(sense: &[u8]) -> Vec<u8> {
    let mut d = Vec::with_capacity(2 + sense.len());
    d.extend_from_slice(&u16::try_from(sense.len()).unwrap_or(0).to_be_bytes());
    d.extend_from_slice(sense);
    d
}

/// SCSI Data-In (11.7). With `status`, the PDU is the last of the command and carries its
/// status (the S bit), its residual and a StatSN; without, `n.stat_sn` is ignored.
pub fn data_in(
    lun: [u8; 8],
    itt: u32,
    data_sn: u32,
    offset: u32,
    final_pdu: bool,
    status: Option<(u8, Residual)>,
    n: Numbers,
) -> Bhs {
    let mut b = Bhs::new(opcode::DATA_IN);
    if final_pdu {
        b.0[1] |= 0x80;
    }
    b.set_lun(lun);
    b.set_u32(16, itt);
    b.set_u32(20, RESERVED_TAG);
    n.put(&mut b);
    if let Some((st, residual)) = status {
        b.0[1] |= 0x81;
        b.0[3] = st;
        residual.put(&mut b);
    } else {
        b.set_u32(24, 0);
    }
    b.set_u32(36, data_sn);
    b.set_u32(40, offset);
    b
}

/// Ready To Transfer (11.8): asks for `len` bytes at `offset` of the task `itt`, to be sent
/// with the target transfer tag `ttt`. `n.stat_sn` is the next StatSN (an R2T takes none).
pub fn r2t(
    lun: [u8; 8],
    itt: u32,
    ttt: u32,
    r2t_sn: u32,
    offset: u32,
    len: u32,
    n: Numbers,
) -> Bhs {
    let mut b = Bhs::new(opcode::R2T);
    b.0[1] = 0x80;
    b.set_lun(lun);
    b.set_u32(16, itt);
    b.set_u32(20, ttt);
    n.put(&mut b);
    b.set_u32(36, r2t_sn);
    b.set_u32(40, offset);
    b.set_u32(44, len);
    b
}

/// NOP-In (11.19): the answer to a ping (`itt` echoed, `ttt` reserved) or a ping of the
/// target's own (`itt` reserved, `ttt` chosen).
pub fn nop_in(lun: [u8; 8], itt: u32, ttt: u32, n: Numbers) -> Bhs {
    let mut b = Bhs::new(opcode::NOP_IN);
    b.0[1] = 0x80;
    b.set_lun(lun);
    b.set_u32(16, itt);
    b.set_u32(20, ttt);
    n.put(&mut b);
    b
}

/// SCSI Task Management Function Response (11.6).
pub fn task_mgmt_response(itt: u32, response: u8, n: Numbers) -> Bhs {
    let mut b = Bhs::new(opcode::TASK_MGMT_RESPONSE);
    b.0[1] = 0x80;
    b.0[2] = response;
    b.set_u32(16, itt);
    n.put(&mut b);
    b
}

/// The stage fields of a Login Response.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Stages {
    /// T: the target agrees to move to `nsg`.
    pub transit: bool,
    /// C: the text continues in the next response.
    pub cont: bool,
    /// Current stage.
    pub csg: u8,
    /// Next stage.
    pub nsg: u8,
}

/// Login Response (11.13). `status` is Status-Class and Status-Detail as one number
/// (0x0201 is class 2, detail 1).
pub fn login_response(
    stages: Stages,
    isid: [u8; 6],
    tsih: u16,
    itt: u32,
    status: u16,
    n: Numbers,
) -> Bhs {
    let mut b = Bhs::new(opcode::LOGIN_RESPONSE);
    b.0[1] = (u8::from(stages.transit) << 7)
        | (u8::from(stages.cont) << 6)
        | ((stages.csg & 3) << 2)
        | if stages.transit { stages.nsg & 3 } else { 0 };
    // Version-max and Version-active: 0, the only version there is.
    b.0[8..14].copy_from_slice(&isid);
    b.set_u16(14, tsih);
    b.set_u32(16, itt);
    n.put(&mut b);
    b.set_u16(36, status);
    b
}

/// Text Response (11.11). `ttt` is the reserved tag on the last PDU of a response, and a tag
/// of the target's choosing while more follows (`cont`).
pub fn text_response(final_pdu: bool, cont: bool, itt: u32, ttt: u32, n: Numbers) -> Bhs {
    let mut b = Bhs::new(opcode::TEXT_RESPONSE);
    b.0[1] = (u8::from(final_pdu) << 7) | (u8::from(cont) << 6);
    b.set_u32(16, itt);
    b.set_u32(20, ttt);
    n.put(&mut b);
    b
}

/// Logout Response (11.15). `response` is 0 closed, 1 CID not found, 2 recovery not
/// supported, 3 cleanup failed.
pub fn logout_response(itt: u32, response: u8, n: Numbers) -> Bhs {
    let mut b = Bhs::new(opcode::LOGOUT_RESPONSE);
    b.0[1] = 0x80;
    b.0[2] = response;
    b.set_u32(16, itt);
    n.put(&mut b);
    // Time2Wait and Time2Retain: 0 (no connection recovery at ErrorRecoveryLevel 0).
    b
}

/// Reject (11.17): the rejected header goes in the data segment.
pub fn reject(reason: u8, n: Numbers) -> Bhs {
    let mut b = Bhs::new(opcode::REJECT);
    b.0[1] = 0x80;
    b.0[2] = reason;
    b.set_u32(16, RESERVED_TAG);
    n.put(&mut b);
    b
}

/// Asynchronous Message events (11.9.1).
pub mod async_event {
    /// The target asks the initiator to log out within Parameter3 seconds.
    pub const LOGOUT_REQUESTED: u8 = 1;
    /// The target will drop this connection.
    pub const DROPPING_CONNECTION: u8 = 2;
    /// The target will drop every connection of the session.
    pub const DROPPING_ALL_CONNECTIONS: u8 = 3;
}

/// Asynchronous Message (11.9) with `event` and its three parameters.
pub fn async_message(event: u8, params: [u16; 3], n: Numbers) -> Bhs {
    let mut b = Bhs::new(opcode::ASYNC);
    b.0[1] = 0x80;
    b.set_u32(16, RESERVED_TAG);
    n.put(&mut b);
    b.0[36] = event;
    b.set_u16(38, params[0]);
    b.set_u16(40, params[1]);
    b.set_u16(42, params[2]);
    b
}
