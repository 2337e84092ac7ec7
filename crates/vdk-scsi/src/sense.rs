//! Sense data: why a command ended in CHECK CONDITION, in the fixed format of SPC-4 4.4.3.
//!
//! Every failure of the emulation is one [`Sense`]; the disk's typed errors become sense in one
//! place, [`Sense::from_error`].

use vdk_core::{Errno, Error};

/// Sense keys (SPC-4 table 48).
pub mod key {
    /// NO SENSE.
    pub const NO_SENSE: u8 = 0x0;
    /// NOT READY.
    pub const NOT_READY: u8 = 0x2;
    /// MEDIUM ERROR.
    pub const MEDIUM_ERROR: u8 = 0x3;
    /// HARDWARE ERROR.
    pub const HARDWARE_ERROR: u8 = 0x4;
    /// ILLEGAL REQUEST.
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    /// UNIT ATTENTION.
    pub const UNIT_ATTENTION: u8 = 0x6;
    /// DATA PROTECT.
    pub const DATA_PROTECT: u8 = 0x7;
    /// ABORTED COMMAND.
    pub const ABORTED_COMMAND: u8 = 0xb;
    /// MISCOMPARE.
    pub const MISCOMPARE: u8 = 0xe;
}

/// Where in the CDB or parameter list the offending field is (the sense-key specific field
/// pointer of an ILLEGAL REQUEST).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct FieldPointer {
    /// True for a field of the CDB, false for one of the parameter data.
    pub in_cdb: bool,
    /// Byte of the field.
    pub byte: u16,
    /// Bit of the field, when the field is narrower than a byte.
    pub bit: Option<u8>,
}

/// A command's failure: sense key, additional sense code and qualifier, and the details the
/// initiator needs.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Sense {
    /// The sense key.
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
    /// The field at fault, for ILLEGAL REQUEST.
    pub field: Option<FieldPointer>,
    /// The INFORMATION field (the first LBA in error, or a miscompare offset).
    pub info: Option<u64>,
}

impl Sense {
    /// Sense with key, ASC and ASCQ and no details.
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Sense {
        Sense {
            key,
            asc,
            ascq,
            field: None,
            info: None,
        }
    }

    /// The opcode (or service action) is not one this device implements.
    pub const INVALID_OPCODE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x20, 0x00);
    /// A logical block address is past the end of the medium.
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x21, 0x00);
    /// The LUN is not one the target has.
    pub const LUN_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x25, 0x00);
    /// The parameter list is shorter than its header says.
    pub const PARAMETER_LIST_LENGTH: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x1a, 0x00);
    /// The data the initiator sent does not match what the CDB asks for.
    pub const INVALID_FIELD_IN_IU: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x0e, 0x03);
    /// Saved mode pages are not kept.
    pub const SAVING_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x39, 0x00);
    /// An initiator prevented medium removal.
    pub const REMOVAL_PREVENTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x53, 0x02);
    /// ILLEGAL MODE FOR THIS TRACK: a READ CD that asks for a sector type other than the
    /// track's.
    pub const ILLEGAL_MODE_FOR_TRACK: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x64, 0x00);
    /// CANNOT READ MEDIUM - INCOMPATIBLE FORMAT: a CD command on a DVD, or a DVD one on a CD.
    pub const INCOMPATIBLE_FORMAT: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x30, 0x02);
    /// The medium is read-only.
    pub const WRITE_PROTECTED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x00);
    /// A thin-provisioned disk ran out of space.
    pub const SPACE_ALLOCATION_FAILED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x07);
    /// No medium, tray closed.
    pub const NO_MEDIUM_TRAY_CLOSED: Sense = Sense::new(key::NOT_READY, 0x3a, 0x01);
    /// No medium, tray open.
    pub const NO_MEDIUM_TRAY_OPEN: Sense = Sense::new(key::NOT_READY, 0x3a, 0x02);
    /// The medium may have changed since the initiator last looked.
    pub const MEDIUM_CHANGED: Sense = Sense::new(key::UNIT_ATTENTION, 0x28, 0x00);
    /// The logical unit was reset.
    pub const RESET_OCCURRED: Sense = Sense::new(key::UNIT_ATTENTION, 0x29, 0x00);
    /// Another initiator changed the mode parameters.
    pub const MODE_PARAMETERS_CHANGED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2a, 0x01);
    /// UNIT ATTENTION, CAPACITY DATA HAS CHANGED: the disk grew while open.
    pub const CAPACITY_CHANGED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2a, 0x09);
    /// A read failed in the storage below.
    pub const READ_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x11, 0x00);
    /// A write failed in the storage below.
    pub const WRITE_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x0c, 0x00);
    /// The target itself failed (the disk was closed under the command, say).
    pub const INTERNAL_FAILURE: Sense = Sense::new(key::HARDWARE_ERROR, 0x44, 0x00);
    /// VERIFY or COMPARE AND WRITE found different data.
    pub const MISCOMPARE: Sense = Sense::new(key::MISCOMPARE, 0x1d, 0x00);
    /// The command was aborted by the target.
    pub const COMMAND_ABORTED: Sense = Sense::new(key::ABORTED_COMMAND, 0x00, 0x00);
    /// The transport delivered the command's data out of sequence.
    pub const DATA_PHASE_ERROR: Sense = Sense::new(key::ABORTED_COMMAND, 0x4b, 0x00);
    /// A digest of the command's data was wrong.
    pub const PROTOCOL_CRC_ERROR: Sense = Sense::new(key::ABORTED_COMMAND, 0x47, 0x05);

    /// INVALID FIELD IN CDB, pointing at `byte` (and `bit`) of the CDB.
    pub const fn invalid_cdb(byte: u16, bit: Option<u8>) -> Sense {
        Sense {
            field: Some(FieldPointer {
                in_cdb: true,
                byte,
                bit,
            }),
            ..Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00)
        }
    }

    /// INVALID FIELD IN PARAMETER LIST, pointing at `byte` of the data sent.
    pub const fn invalid_param(byte: u16) -> Sense {
        Sense {
            field: Some(FieldPointer {
                in_cdb: false,
                byte,
                bit: None,
            }),
            ..Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x00)
        }
    }

    /// The same sense with the INFORMATION field set.
    pub const fn with_info(self, info: u64) -> Sense {
        Sense {
            info: Some(info),
            ..self
        }
    }

    /// The sense for a failed disk call, from the same errno mapping NBD and FUSE reply with
    /// ([`Error::errno`]): a full disk is SPACE ALLOCATION FAILED here as it is ENOSPC there,
    /// whether the disk said so or the file below it did. `writing` tells a failed write from
    /// a failed read.
    pub fn from_error(e: &Error, writing: bool) -> Sense {
        match (e.errno(), e) {
            (_, Error::OutOfRange { .. }) => Sense::LBA_OUT_OF_RANGE,
            (_, Error::Closed) => Sense::INTERNAL_FAILURE,
            (Errno::RoFs | Errno::Perm, _) => Sense::WRITE_PROTECTED,
            (Errno::NoSpc, _) => Sense::SPACE_ALLOCATION_FAILED,
            (Errno::Inval | Errno::NotSup | Errno::Overflow, _) => Sense::invalid_cdb(0, None),
            // The medium failed.
            (Errno::Io, _) if writing => Sense::WRITE_ERROR,
            (Errno::Io, _) => Sense::READ_ERROR,
        }
    }

    /// Fixed-format sense data (response code 70h), 18 bytes.
    pub fn to_fixed(&self) -> Vec<u8> {
        let mut s = vec![0u8; 18];
        s[0] = 0x70;
        s[2] = self.key & 0x0f;
        if let Some(info) = self.info {
            // VALID: the INFORMATION field holds the value (fixed format has room for 32 bits).
            if let Ok(v) = u32::try_from(info) {
                s[0] |= 0x80;
                s[3..7].copy_from_slice(&v.to_be_bytes());
            }
        }
        s[7] = 10; // additional sense length
        s[12] = self.asc;
        s[13] = self.ascq;
        if let Some(f) = self.field {
            let mut b = 0x80; // SKSV
            if f.in_cdb {
                b |= 0x40;
            }
            if let Some(bit) = f.bit {
                b |= 0x08 | (bit & 7);
            }
            s[15] = b;
            s[16..18].copy_from_slice(&f.byte.to_be_bytes());
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_pointer_is_encoded() {
        let s = Sense::invalid_cdb(4, Some(1)).to_fixed();
        assert_eq!(s[0], 0x70);
        assert_eq!(s[2], key::ILLEGAL_REQUEST);
        assert_eq!((s[12], s[13]), (0x24, 0));
        assert_eq!(s[15], 0x80 | 0x40 | 0x08 | 1);
        assert_eq!(&s[16..18], &[0, 4]);
    }

    #[test]
    fn info_sets_valid() {
        let s = Sense::MISCOMPARE.with_info(7).to_fixed();
        assert_eq!(s[0], 0xf0);
        assert_eq!(&s[3..7], &[0, 0, 0, 7]);
    }

    #[test]
    fn errors_map_to_sense() {
        assert_eq!(
            Sense::from_error(&Error::ReadOnly, true),
            Sense::WRITE_PROTECTED
        );
        let io = Error::Io(std::io::Error::other("x"));
        assert_eq!(Sense::from_error(&io, true), Sense::WRITE_ERROR);
        assert_eq!(Sense::from_error(&io, false), Sense::READ_ERROR);
    }

    #[test]
    fn a_full_file_below_is_space_allocation_failed_not_a_write_error() {
        let full = Error::Io(std::io::Error::from_raw_os_error(28));
        assert_eq!(
            Sense::from_error(&full, true),
            Sense::SPACE_ALLOCATION_FAILED
        );
        assert_eq!(
            Sense::from_error(&Error::NoSpace, true),
            Sense::SPACE_ALLOCATION_FAILED
        );
        let rofs = Error::Io(std::io::Error::from_raw_os_error(30));
        assert_eq!(Sense::from_error(&rofs, true), Sense::WRITE_PROTECTED);
        let closed = Error::Closed;
        assert_eq!(Sense::from_error(&closed, false), Sense::INTERNAL_FAILURE);
    }
}
