//! REPORT SUPPORTED OPERATION CODES (SPC-4 6.35): the commands a unit implements, from one
//! table per device type, so that what is reported is what [`execute`](crate::LogicalUnit::execute)
//! dispatches.

use crate::cdb::{u32_of, Cdb};
use crate::lu::DeviceType;
use crate::sense::Sense;

/// One implemented command: opcode, service action (if the opcode has them), CDB length.
type Command = (u8, Option<u16>, u8);

/// Commands of every unit (SPC) and of MODE SENSE/SELECT.
const SPC: &[Command] = &[
    (0x00, None, 6),        // TEST UNIT READY
    (0x03, None, 6),        // REQUEST SENSE
    (0x12, None, 6),        // INQUIRY
    (0x15, None, 6),        // MODE SELECT(6)
    (0x16, None, 6),        // RESERVE(6)
    (0x17, None, 6),        // RELEASE(6)
    (0x1a, None, 6),        // MODE SENSE(6)
    (0x1b, None, 6),        // START STOP UNIT
    (0x1e, None, 6),        // PREVENT ALLOW MEDIUM REMOVAL
    (0x55, None, 10),       // MODE SELECT(10)
    (0x5a, None, 10),       // MODE SENSE(10)
    (0x5e, Some(0x00), 10), // PERSISTENT RESERVE IN: READ KEYS
    (0x5e, Some(0x01), 10), //   READ RESERVATION
    (0x5e, Some(0x02), 10), //   REPORT CAPABILITIES
    (0x5e, Some(0x03), 10), //   READ FULL STATUS
    (0x5f, Some(0x00), 10), // PERSISTENT RESERVE OUT: REGISTER
    (0x5f, Some(0x01), 10), //   RESERVE
    (0x5f, Some(0x02), 10), //   RELEASE
    (0x5f, Some(0x03), 10), //   CLEAR
    (0x5f, Some(0x04), 10), //   PREEMPT
    (0x5f, Some(0x05), 10), //   PREEMPT AND ABORT
    (0x5f, Some(0x06), 10), //   REGISTER AND IGNORE EXISTING KEY
    (0xa0, None, 12),       // REPORT LUNS
    (0xa3, Some(0x0c), 12), // MAINTENANCE IN: REPORT SUPPORTED OPERATION CODES
];

/// Commands of a disk (SBC).
const SBC: &[Command] = &[
    (0x08, None, 6),        // READ(6)
    (0x0a, None, 6),        // WRITE(6)
    (0x25, None, 10),       // READ CAPACITY(10)
    (0x28, None, 10),       // READ(10)
    (0x2a, None, 10),       // WRITE(10)
    (0x2e, None, 10),       // WRITE AND VERIFY(10)
    (0x2f, None, 10),       // VERIFY(10)
    (0x34, None, 10),       // PRE-FETCH(10)
    (0x35, None, 10),       // SYNCHRONIZE CACHE(10)
    (0x41, None, 10),       // WRITE SAME(10)
    (0x42, None, 10),       // UNMAP
    (0x88, None, 16),       // READ(16)
    (0x89, None, 16),       // COMPARE AND WRITE
    (0x8a, None, 16),       // WRITE(16)
    (0x8e, None, 16),       // WRITE AND VERIFY(16)
    (0x8f, None, 16),       // VERIFY(16)
    (0x90, None, 16),       // PRE-FETCH(16)
    (0x91, None, 16),       // SYNCHRONIZE CACHE(16)
    (0x93, None, 16),       // WRITE SAME(16)
    (0x9e, Some(0x10), 16), // SERVICE ACTION IN(16): READ CAPACITY(16)
    (0x9e, Some(0x12), 16), //   GET LBA STATUS
    (0xa8, None, 12),       // READ(12)
    (0xaa, None, 12),       // WRITE(12)
    (0xae, None, 12),       // WRITE AND VERIFY(12)
    (0xaf, None, 12),       // VERIFY(12)
];

/// Commands of a CD/DVD-ROM drive (MMC, and the SBC reads it answers).
const MMC: &[Command] = &[
    (0x08, None, 6),        // READ(6)
    (0x25, None, 10),       // READ CAPACITY
    (0x28, None, 10),       // READ(10)
    (0x2f, None, 10),       // VERIFY(10)
    (0x34, None, 10),       // PRE-FETCH(10)
    (0x35, None, 10),       // SYNCHRONIZE CACHE(10)
    (0x43, None, 10),       // READ TOC/PMA/ATIP
    (0x46, None, 10),       // GET CONFIGURATION
    (0x4a, None, 10),       // GET EVENT STATUS NOTIFICATION
    (0x51, None, 10),       // READ DISC INFORMATION
    (0x52, None, 10),       // READ TRACK INFORMATION
    (0x88, None, 16),       // READ(16)
    (0x9e, Some(0x10), 16), // SERVICE ACTION IN(16): READ CAPACITY(16)
    (0x9e, Some(0x12), 16), //   GET LBA STATUS
    (0xa8, None, 12),       // READ(12)
    (0xac, None, 12),       // GET PERFORMANCE
    (0xad, None, 12),       // READ DISC STRUCTURE
    (0xaf, None, 12),       // VERIFY(12)
    (0xb6, None, 12),       // SET STREAMING
    (0xbb, None, 12),       // SET CD SPEED
    (0xbd, None, 12),       // MECHANISM STATUS
    (0xbe, None, 12),       // READ CD
];

fn commands(device: DeviceType) -> Vec<Command> {
    let own = match device {
        DeviceType::Disk => SBC,
        DeviceType::CdRom => MMC,
    };
    let mut all: Vec<Command> = SPC.iter().chain(own).copied().collect();
    all.sort_unstable();
    all
}

/// The CDB usage data of a command: the opcode, the service action bits, and every bit of
/// the fields between; the control byte's NACA and LINK are not used.
fn usage(op: u8, sa: Option<u16>, len: u8) -> Vec<u8> {
    let mut u = vec![0xffu8; usize::from(len)];
    u[0] = op;
    if let Some(sa) = sa {
        // Service actions sit in byte 1 (the low five bits).
        u[1] = 0xe0 | u8::try_from(sa & 0x1f).unwrap_or(0);
    }
    if let Some(last) = u.last_mut() {
        *last = 0;
    }
    u
}

/// The command timeouts descriptor (SPC-4 7.5.16): none specified.
const TIMEOUTS: [u8; 12] = [0, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// Answers REPORT SUPPORTED OPERATION CODES for a unit of `device`.
pub fn report(device: DeviceType, cdb: &Cdb<'_>) -> Result<Vec<u8>, Sense> {
    let rctd = cdb.bit(2, 7);
    let options = cdb.byte(2) & 0x07;
    let op = cdb.byte(3);
    let sa = cdb.be16(4);
    let alloc = cdb.be32(6);
    let table = commands(device);
    let data = match options {
        0 => {
            let mut d = vec![0u8; 4];
            for &(o, s, len) in &table {
                d.push(o);
                d.push(0);
                d.extend_from_slice(&s.unwrap_or(0).to_be_bytes());
                d.push(0);
                d.push((u8::from(rctd) << 1) | u8::from(s.is_some()));
                d.extend_from_slice(&u16::from(len).to_be_bytes());
                if rctd {
                    d.extend_from_slice(&TIMEOUTS);
                }
            }
            let n = u32_of(d.len() - 4);
            d[..4].copy_from_slice(&n.to_be_bytes());
            d
        }
        1..=3 => {
            let has_sa = table.iter().any(|c| c.0 == op && c.1.is_some());
            let wanted = match options {
                1 if has_sa => return Err(Sense::invalid_cdb(2, Some(2))),
                1 => table.iter().find(|c| c.0 == op && c.1.is_none()),
                2 if !has_sa && table.iter().any(|c| c.0 == op) => {
                    return Err(Sense::invalid_cdb(2, Some(2)))
                }
                2 => table.iter().find(|c| c.0 == op && c.1 == Some(sa)),
                // 3: the service action counts only if the opcode has them.
                _ => table
                    .iter()
                    .find(|c| c.0 == op && (c.1.is_none() || c.1 == Some(sa))),
            };
            match wanted {
                Some(&(o, s, len)) => {
                    let mut d = vec![0, (u8::from(rctd) << 7) | 0x03];
                    d.extend_from_slice(&u16::from(len).to_be_bytes());
                    d.extend(usage(o, s, len));
                    if rctd {
                        d.extend_from_slice(&TIMEOUTS);
                    }
                    d
                }
                // Not supported (001b), no CDB usage data.
                None => vec![0, 0x01, 0, 0],
            }
        }
        _ => return Err(Sense::invalid_cdb(2, Some(2))),
    };
    Ok(crate::cdb::cut_to(data, alloc))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rsoc(device: DeviceType, options: u8, op: u8, sa: u16) -> Result<Vec<u8>, Sense> {
        let [s0, s1] = sa.to_be_bytes();
        let cdb = [0xa3, 0x0c, options, op, s0, s1, 0, 0, 0x10, 0, 0, 0];
        report(device, &Cdb::new(&cdb))
    }

    #[test]
    fn all_commands_are_listed_once() {
        let d = rsoc(DeviceType::Disk, 0, 0, 0).unwrap();
        let n = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize;
        assert_eq!(n, d.len() - 4);
        assert_eq!(n / 8, SPC.len() + SBC.len());
        let ops: Vec<u8> = d[4..].chunks(8).map(|c| c[0]).collect();
        assert!(
            ops.contains(&0x89) && ops.contains(&0x42),
            "COMPARE AND WRITE, UNMAP"
        );
        let cd = rsoc(DeviceType::CdRom, 0, 0, 0).unwrap();
        let ops: Vec<u8> = cd[4..].chunks(8).map(|c| c[0]).collect();
        assert!(
            ops.contains(&0x43) && !ops.contains(&0x2a),
            "READ TOC, no WRITE"
        );
    }

    #[test]
    fn one_command_reports_its_usage() {
        let d = rsoc(DeviceType::Disk, 1, 0x28, 0).unwrap();
        assert_eq!(d[1] & 0x07, 0x03, "supported");
        assert_eq!(u16::from_be_bytes([d[2], d[3]]), 10);
        assert_eq!(d[4], 0x28);
        let d = rsoc(DeviceType::Disk, 2, 0x9e, 0x10).unwrap();
        assert_eq!((d[4], d[5] & 0x1f), (0x9e, 0x10));
        let d = rsoc(DeviceType::Disk, 1, 0xee, 0).unwrap();
        assert_eq!(d[1] & 0x07, 0x01, "not supported");
        assert!(
            rsoc(DeviceType::Disk, 1, 0x9e, 0).is_err(),
            "it has service actions"
        );
        assert!(rsoc(DeviceType::Disk, 2, 0x28, 0).is_err(), "it has none");
    }
}
