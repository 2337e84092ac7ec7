//! SCSI emulation for vdk disks.
//!
//! A [`Target`] holds logical units ([`LogicalUnit`]): a disk (SPC + SBC, peripheral device
//! type 00h) or a CD/DVD-ROM drive (SPC + MMC, type 05h) whose medium can be ejected and
//! replaced while it runs. A transport (the iSCSI target, or anything else that carries CDBs)
//! hands [`Target::execute`] a CDB and the data the initiator sent and gets back the status,
//! the data for the initiator and, on failure, [`Sense`]. There is no I/O here besides the
//! calls to the medium's [`BlockDevice`](vdk_core::BlockDevice).
//!
//! Initiators are told apart by an I_T nexus number the transport chooses (one per iSCSI
//! session): unit attentions, medium-removal prevention and reservations are per nexus. The
//! transport reports a nexus that goes away with [`Target::nexus_lost`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod cdb;
mod cdsector;
mod lu;
mod mmc;
mod mode;
pub mod pr;
mod rsoc;
mod sbc;
pub mod sense;
mod spc;

use std::sync::{Arc, RwLock};

use vdk_core::sync;

pub use lu::{DeviceType, Identity, LogicalUnit};
pub use sense::Sense;

/// SCSI status codes (SAM-5 table 31).
pub mod status {
    /// The command succeeded.
    pub const GOOD: u8 = 0x00;
    /// The command failed; sense data says why.
    pub const CHECK_CONDITION: u8 = 0x02;
    /// PRE-FETCH found room for the whole range.
    pub const CONDITION_MET: u8 = 0x04;
    /// Another initiator holds a reservation.
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    /// The task set is full.
    pub const TASK_SET_FULL: u8 = 0x28;
}

/// The largest data transfer of one READ or WRITE (the Block Limits VPD page's maximum
/// transfer length): 8 MiB.
pub const MAX_TRANSFER: u32 = 8 << 20;

/// One command as the transport received it.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The I_T nexus the command came on.
    pub nexus: u64,
    /// The initiator port's name (for iSCSI `InitiatorName,i,0xISID`): persistent
    /// reservations belong to it, across sessions. Empty when the transport has none; the
    /// nexus then stands for the port.
    pub initiator: &'a str,
    /// The command descriptor block (padding after it is ignored).
    pub cdb: &'a [u8],
    /// The data the initiator sent with it (Data-Out), as much as it sent.
    pub data_out: &'a [u8],
}

/// The outcome of one command.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Response {
    /// SCSI status.
    pub status: u8,
    /// Data for the initiator (Data-In), already cut to the CDB's allocation length. Its length
    /// is the command's data-in length for residual accounting.
    pub data: Vec<u8>,
    /// Why the command failed, with [`status::CHECK_CONDITION`].
    pub sense: Option<Sense>,
    /// For a command that takes data from the initiator: how much the CDB asked for, so that
    /// the transport can report overflow or underflow against what was sent.
    pub data_out_len: Option<usize>,
}

impl Response {
    /// GOOD with `data`.
    pub fn good(data: Vec<u8>) -> Response {
        Response {
            status: status::GOOD,
            data,
            sense: None,
            data_out_len: None,
        }
    }

    /// CHECK CONDITION with `sense`.
    pub fn check(sense: Sense) -> Response {
        Response {
            status: status::CHECK_CONDITION,
            data: Vec::new(),
            sense: Some(sense),
            data_out_len: None,
        }
    }

    /// A bare status (RESERVATION CONFLICT, TASK SET FULL).
    pub fn status(status: u8) -> Response {
        Response {
            status,
            data: Vec::new(),
            sense: None,
            data_out_len: None,
        }
    }

    fn with_out_len(mut self, len: usize) -> Response {
        self.data_out_len = Some(len);
        self
    }
}

impl From<std::result::Result<Vec<u8>, Sense>> for Response {
    fn from(r: std::result::Result<Vec<u8>, Sense>) -> Response {
        match r {
            Ok(d) => Response::good(d),
            Err(s) => Response::check(s),
        }
    }
}

/// A SCSI target device: numbered logical units, added and removed while it runs.
#[derive(Debug, Default)]
pub struct Target {
    luns: RwLock<Vec<(u16, Arc<LogicalUnit>)>>,
}

/// REPORT LUNS.
const REPORT_LUNS: u8 = 0xa0;
/// INQUIRY.
const INQUIRY: u8 = 0x12;
/// REQUEST SENSE.
const REQUEST_SENSE: u8 = 0x03;

impl Target {
    /// A target with no logical units.
    pub fn new() -> Target {
        Target::default()
    }

    /// Adds `lu` as LUN `lun`, replacing one of that number.
    pub fn add(&self, lun: u16, lu: Arc<LogicalUnit>) {
        let mut luns = sync::write(&self.luns);
        luns.retain(|(n, _)| *n != lun);
        luns.push((lun, lu));
        luns.sort_by_key(|(n, _)| *n);
    }

    /// Removes LUN `lun`.
    pub fn remove(&self, lun: u16) -> Option<Arc<LogicalUnit>> {
        let mut luns = sync::write(&self.luns);
        let i = luns.iter().position(|(n, _)| *n == lun)?;
        Some(luns.remove(i).1)
    }

    /// The logical unit numbered `lun`.
    pub fn lun(&self, lun: u16) -> Option<Arc<LogicalUnit>> {
        let luns = sync::read(&self.luns);
        luns.iter().find(|(n, _)| *n == lun).map(|(_, l)| l.clone())
    }

    /// The numbers of all logical units.
    pub fn lun_numbers(&self) -> Vec<u16> {
        let luns = sync::read(&self.luns);
        luns.iter().map(|(n, _)| *n).collect()
    }

    /// Runs one command addressed to the 8-byte LUN field `lun`.
    pub fn execute(&self, lun: [u8; 8], req: &Request<'_>) -> Response {
        let cdb = cdb::Cdb::new(req.cdb);
        if cdb.opcode() == REPORT_LUNS {
            return self.report_luns(&cdb).into();
        }
        match decode_lun(lun).and_then(|n| self.lun(n)) {
            Some(lu) => lu.execute(req),
            None => match cdb.opcode() {
                INQUIRY => spc::inquiry_no_lun(&cdb).into(),
                REQUEST_SENSE => Response::good(cdb.cut(Sense::LUN_NOT_SUPPORTED.to_fixed(), 4)),
                _ => Response::check(Sense::LUN_NOT_SUPPORTED),
            },
        }
    }

    /// Runs a command at once if it is a read the medium answers without waiting (see
    /// [`LogicalUnit::try_execute`]); `None` if `execute` must run it.
    pub fn try_execute(&self, lun: [u8; 8], req: &Request<'_>) -> Option<Response> {
        decode_lun(lun).and_then(|n| self.lun(n))?.try_execute(req)
    }

    /// An I_T nexus is gone (its session ended): drop what it held.
    pub fn nexus_lost(&self, nexus: u64) {
        for (_, lu) in sync::read(&self.luns).iter() {
            lu.nexus_lost(nexus);
        }
    }

    /// A LOGICAL UNIT RESET task management function for `lun`. False if there is no such LUN.
    pub fn lun_reset(&self, lun: [u8; 8]) -> bool {
        match decode_lun(lun).and_then(|n| self.lun(n)) {
            Some(lu) => {
                lu.reset();
                true
            }
            None => false,
        }
    }

    /// A TARGET WARM or COLD RESET: every logical unit is reset.
    pub fn reset(&self) {
        for (_, lu) in sync::read(&self.luns).iter() {
            lu.reset();
        }
    }

    fn report_luns(&self, cdb: &cdb::Cdb<'_>) -> std::result::Result<Vec<u8>, Sense> {
        // SELECT REPORT: 0 (all), 1 (well known only), 2 (all). 0x10-0x12 are newer variants.
        let select = cdb.byte(2);
        if !matches!(select, 0 | 1 | 2 | 0x10 | 0x11 | 0x12) {
            return Err(Sense::invalid_cdb(2, None));
        }
        let alloc = cdb.be32(6);
        if alloc < 16 {
            return Err(Sense::invalid_cdb(6, None));
        }
        let luns = if select == 1 || select == 0x11 {
            Vec::new()
        } else {
            self.lun_numbers()
        };
        let mut out = vec![0u8; 8];
        out[..4].copy_from_slice(&cdb::u32_of(luns.len() * 8).to_be_bytes());
        for n in luns {
            out.extend_from_slice(&encode_lun(n));
        }
        Ok(cdb::cut_to(out, alloc))
    }
}

/// The 8-byte LUN field for `lun` (peripheral addressing below 256, flat space above).
pub fn encode_lun(lun: u16) -> [u8; 8] {
    let mut b = [0u8; 8];
    let [hi, lo] = lun.to_be_bytes();
    if lun < 256 {
        b[1] = lo;
    } else {
        b[0] = 0x40 | (hi & 0x3f);
        b[1] = lo;
    }
    b
}

/// The LUN number in an 8-byte LUN field, for the single-level peripheral and flat space
/// addressing methods.
pub fn decode_lun(b: [u8; 8]) -> Option<u16> {
    if b[2..].iter().any(|&x| x != 0) {
        return None;
    }
    match b[0] >> 6 {
        0 if b[0] == 0 => Some(u16::from(b[1])),
        1 => Some(u16::from_be_bytes([b[0] & 0x3f, b[1]])),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
