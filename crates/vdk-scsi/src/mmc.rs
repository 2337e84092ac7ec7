//! MMC commands of a CD/DVD-ROM drive serving an ISO image: READ TOC/PMA/ATIP, GET
//! CONFIGURATION, GET EVENT STATUS NOTIFICATION, READ DISC INFORMATION, READ TRACK
//! INFORMATION, MECHANISM STATUS, and the SBC reads a drive answers. Writes are refused with
//! the sense of a write-protected medium.
//!
//! The disc is one session with one data track (mode 1) covering the whole image, as a
//! pressed CD-ROM or DVD-ROM is; images larger than a CD's 80 minutes are reported as DVD-ROM.

use crate::cdb::{u16_of, u32_of, Cdb};
use crate::lu::{LogicalUnit, Medium};
use crate::sbc;
use crate::sense::Sense;
use crate::{Request, Response};

const READ_TOC: u8 = 0x43;
const GET_CONFIGURATION: u8 = 0x46;
const GET_EVENT_STATUS: u8 = 0x4a;
const READ_DISC_INFO: u8 = 0x51;
const READ_TRACK_INFO: u8 = 0x52;
const SYNC_CACHE10: u8 = 0x35;
const SET_CD_SPEED: u8 = 0xbb;
const MECHANISM_STATUS: u8 = 0xbd;
const SET_STREAMING: u8 = 0xb6;

/// Opcodes that would change the medium.
const WRITES: &[u8] = &[
    0x0a, 0x2a, 0xaa, 0x8a, // WRITE 6, 10, 12, 16
    0x2e, 0xae, 0x8e, // WRITE AND VERIFY
    0x41, 0x93, 0x42, 0x89, // WRITE SAME, UNMAP, COMPARE AND WRITE
    0x04, 0xa1, 0x53, 0x5b, 0x5d, 0x54, // FORMAT UNIT, BLANK, RESERVE TRACK, CLOSE, SEND CUE
];

/// Profiles (MMC-6 table 89).
const PROFILE_CD_ROM: u16 = 0x0008;
const PROFILE_DVD_ROM: u16 = 0x0010;

/// The most sectors of an 80-minute CD; a larger image is a DVD-ROM.
const CD_MAX_BLOCKS: u64 = 80 * 60 * 75;

pub fn execute(lu: &LogicalUnit, req: &Request<'_>, cdb: &Cdb<'_>) -> Option<Response> {
    let op = cdb.opcode();
    if WRITES.contains(&op) {
        return Some(Response::check(Sense::WRITE_PROTECTED));
    }
    Some(match op {
        sbc::READ6 | sbc::READ10 | sbc::READ12 | sbc::READ16 => sbc::read(lu, cdb).into(),
        sbc::READ_CAPACITY10 | sbc::SERVICE_ACTION_IN16 => return sbc::execute(lu, req, cdb),
        0x2f | 0xaf | 0x34 => return sbc::execute(lu, req, cdb), // VERIFY, PRE-FETCH
        READ_TOC => read_toc(lu, cdb).into(),
        GET_CONFIGURATION => get_configuration(lu, cdb).into(),
        GET_EVENT_STATUS => event_status(lu, req, cdb).into(),
        READ_DISC_INFO => disc_info(lu, cdb).into(),
        READ_TRACK_INFO => track_info(lu, cdb).into(),
        MECHANISM_STATUS => mechanism_status(lu, cdb).into(),
        // Speed settings are accepted with or without a disc.
        SET_CD_SPEED | SET_STREAMING => Response::good(Vec::new()),
        SYNC_CACHE10 => match lu.loaded() {
            Ok(_) => Response::good(Vec::new()),
            Err(s) => Response::check(s),
        },
        _ => return None,
    })
}

fn profile_of(m: &Medium) -> u16 {
    if m.blocks > CD_MAX_BLOCKS {
        PROFILE_DVD_ROM
    } else {
        PROFILE_CD_ROM
    }
}

/// An LBA as the 4-byte address field: an LBA, or with `msf` minute-second-frame after the
/// 2-second pregap.
fn address(lba: u64, msf: bool) -> [u8; 4] {
    if !msf {
        return u32::try_from(lba).unwrap_or(u32::MAX).to_be_bytes();
    }
    let x = lba + 150;
    let m = u8::try_from(x / (60 * 75)).unwrap_or(255);
    let s = u8::try_from(x / 75 % 60).unwrap_or(0);
    let f = u8::try_from(x % 75).unwrap_or(0);
    [0, m, s, f]
}

/// ADR 1 (Q sub-channel position), control 4 (data track, copy prohibited).
const ADR_CONTROL_DATA: u8 = 0x14;
const LEAD_OUT: u8 = 0xaa;

fn read_toc(lu: &LogicalUnit, cdb: &Cdb<'_>) -> Result<Vec<u8>, Sense> {
    let msf = cdb.bit(1, 1);
    let format = cdb.byte(2) & 0x0f;
    let track = cdb.byte(6);
    let m = lu.loaded()?;
    let mut d = vec![0u8; 4];
    match format {
        0 => {
            if track > 1 && track != LEAD_OUT {
                return Err(Sense::invalid_cdb(6, None));
            }
            d[2] = 1;
            d[3] = 1;
            if track <= 1 {
                d.extend_from_slice(&[0, ADR_CONTROL_DATA, 1, 0]);
                d.extend_from_slice(&address(0, msf));
            }
            d.extend_from_slice(&[0, ADR_CONTROL_DATA, LEAD_OUT, 0]);
            d.extend_from_slice(&address(m.blocks, msf));
        }
        1 => {
            d[2] = 1;
            d[3] = 1;
            d.extend_from_slice(&[0, ADR_CONTROL_DATA, 1, 0]);
            d.extend_from_slice(&address(0, msf));
        }
        _ => return Err(Sense::invalid_cdb(2, Some(3))),
    }
    let n = u16_of(d.len() - 2);
    d[..2].copy_from_slice(&n.to_be_bytes());
    Ok(cdb.cut_field(d, 7, 2))
}

/// One feature descriptor: code, version, persistent and current flags, data.
fn feature(code: u16, version: u8, persistent: bool, current: bool, data: &[u8]) -> Vec<u8> {
    let mut f = code.to_be_bytes().to_vec();
    f.push((version << 2) | (u8::from(persistent) << 1) | u8::from(current));
    f.push(u8::try_from(data.len()).unwrap_or(0));
    f.extend_from_slice(data);
    f
}

fn get_configuration(lu: &LogicalUnit, cdb: &Cdb<'_>) -> Result<Vec<u8>, Sense> {
    let rt = cdb.byte(1) & 0x03;
    if rt == 3 {
        return Err(Sense::invalid_cdb(1, Some(1)));
    }
    let start = cdb.be16(2);
    let medium = lu.loaded().ok();
    let current = medium.as_ref().map(profile_of).unwrap_or(0);
    let present = medium.is_some();
    let is_cd = current == PROFILE_CD_ROM;
    let is_dvd = current == PROFILE_DVD_ROM;
    let mut profiles = Vec::new();
    for p in [PROFILE_DVD_ROM, PROFILE_CD_ROM] {
        profiles.extend_from_slice(&p.to_be_bytes());
        profiles.extend_from_slice(&[u8::from(p == current), 0]);
    }
    let blocking: u16 = if is_dvd { 16 } else { 1 };
    let mut random = 2048u32.to_be_bytes().to_vec();
    random.extend_from_slice(&blocking.to_be_bytes());
    random.extend_from_slice(&[0, 0]);
    let features: Vec<(u16, bool, Vec<u8>)> = vec![
        (0x0000, true, feature(0x0000, 0, true, true, &profiles)),
        // Core: SCSI family interface, INQUIRY2 and DBE.
        (
            0x0001,
            true,
            feature(0x0001, 2, true, true, &[0, 0, 0, 1, 0x03, 0, 0, 0]),
        ),
        // Morphing: operational change events.
        (
            0x0002,
            true,
            feature(0x0002, 1, true, true, &[0x02, 0, 0, 0]),
        ),
        // Removable medium: tray, load, eject, lock.
        (
            0x0003,
            true,
            feature(0x0003, 2, true, true, &[0x39, 0, 0, 0]),
        ),
        (0x0010, present, feature(0x0010, 0, false, present, &random)),
        (
            0x001e,
            is_cd,
            feature(0x001e, 2, false, is_cd, &[0, 0, 0, 0]),
        ),
        (0x001f, is_dvd, feature(0x001f, 0, false, is_dvd, &[])),
    ];
    let mut d = vec![0u8; 8];
    d[6..8].copy_from_slice(&current.to_be_bytes());
    for (code, is_current, bytes) in features {
        let wanted = match rt {
            0 => code >= start,
            1 => code >= start && is_current,
            _ => code == start,
        };
        if wanted {
            d.extend(bytes);
        }
    }
    let n = u32_of(d.len() - 4);
    d[..4].copy_from_slice(&n.to_be_bytes());
    Ok(cdb.cut_field(d, 7, 2))
}

/// Notification classes (bit numbers of the request and supported-class fields).
const CLASS_MEDIA: u8 = 4;

fn event_status(lu: &LogicalUnit, req: &Request<'_>, cdb: &Cdb<'_>) -> Result<Vec<u8>, Sense> {
    if !cdb.bit(1, 0) {
        // Asynchronous notification is not offered: only polling.
        return Err(Sense::invalid_cdb(1, Some(0)));
    }
    let request = cdb.byte(4);
    let supported = 1u8 << CLASS_MEDIA;
    if request & supported == 0 {
        // No event class asked for is supported: NEA, no descriptor.
        let d = vec![0, 2, 0x80, supported];
        return Ok(cdb.cut_field(d, 7, 2));
    }
    let mut st = lu.lock();
    let event = st.events.remove(&req.nexus).map(|e| e as u8).unwrap_or(0);
    let present = st.medium.is_some();
    let open = st.tray_open;
    drop(st);
    let status = (u8::from(present) << 1) | u8::from(open);
    let d = vec![0, 6, CLASS_MEDIA, supported, event, status, 0, 0];
    Ok(cdb.cut_field(d, 7, 2))
}

fn disc_info(lu: &LogicalUnit, cdb: &Cdb<'_>) -> Result<Vec<u8>, Sense> {
    if cdb.byte(1) & 0x07 != 0 {
        // Only the standard disc information (data type 000b).
        return Err(Sense::invalid_cdb(1, Some(2)));
    }
    let _m = lu.loaded()?;
    let mut d = vec![0u8; 34];
    d[..2].copy_from_slice(&32u16.to_be_bytes());
    // Not erasable; last session complete (11b); disc status complete (10b).
    d[2] = 0x0e;
    d[3] = 1; // first track on disc
    d[4] = 1; // number of sessions (LSB)
    d[5] = 1; // first track in last session (LSB)
    d[6] = 1; // last track in last session (LSB)
    d[7] = 0x20; // URU: unrestricted use
    d[8] = 0x00; // disc type: CD-DA or CD-ROM
                 // Last session lead-in start and last possible lead-out start: none on a complete disc.
    d[16..24].fill(0xff);
    Ok(cdb.cut_field(d, 7, 2))
}

fn track_info(lu: &LogicalUnit, cdb: &Cdb<'_>) -> Result<Vec<u8>, Sense> {
    let m = lu.loaded()?;
    let kind = cdb.byte(1) & 0x03;
    let value = cdb.be32(2);
    let ok = match kind {
        0 => u64::from(value) < m.blocks,
        1 | 2 => value == 1,
        _ => false,
    };
    if !ok {
        return Err(Sense::invalid_cdb(if kind == 3 { 1 } else { 2 }, None));
    }
    let mut d = vec![0u8; 48];
    d[..2].copy_from_slice(&46u16.to_be_bytes());
    d[2] = 1; // track number (LSB)
    d[3] = 1; // session number (LSB)
    d[5] = 0x04; // track mode: data, recorded uninterrupted
    d[6] = 0x01; // data mode 1
    let blocks = u32::try_from(m.blocks).unwrap_or(u32::MAX);
    d[24..28].copy_from_slice(&blocks.to_be_bytes());
    d[28..32].copy_from_slice(&blocks.saturating_sub(1).to_be_bytes());
    Ok(cdb.cut_field(d, 7, 2))
}

fn mechanism_status(lu: &LogicalUnit, cdb: &Cdb<'_>) -> Result<Vec<u8>, Sense> {
    let open = lu.lock().tray_open;
    let mut d = vec![0u8; 8];
    d[1] = if open { 0x10 } else { 0 };
    Ok(cdb.cut_field(d, 8, 2))
}
