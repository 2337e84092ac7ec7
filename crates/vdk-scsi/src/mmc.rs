//! MMC commands of a CD/DVD-ROM drive serving an ISO image: READ TOC/PMA/ATIP (formats 0, 1
//! and 2), GET CONFIGURATION, GET EVENT STATUS NOTIFICATION, READ DISC INFORMATION, READ
//! TRACK INFORMATION, MECHANISM STATUS, READ CD (raw sectors made as ECMA-130 lays them out),
//! GET PERFORMANCE, READ DISC STRUCTURE (DVD), and the SBC reads a drive answers. Writes are
//! refused with the sense of a write-protected medium.
//!
//! The disc is one session with one data track (mode 1) covering the whole image, as a
//! pressed CD-ROM or DVD-ROM is; images larger than a CD's 80 minutes are reported as DVD-ROM.

use crate::cdb::{u16_of, u32_of, Cdb};
use crate::cdsector;
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
const GET_PERFORMANCE: u8 = 0xac;
const READ_DISC_STRUCTURE: u8 = 0xad;
const READ_CD: u8 = 0xbe;

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
        READ_CD => read_cd(lu, cdb).into(),
        GET_PERFORMANCE => performance(lu, cdb).into(),
        READ_DISC_STRUCTURE => disc_structure(lu, cdb).into(),
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
        2 => {
            // The full TOC of the one session (byte 6 asks from which session on): the
            // Q sub-channel entries of its lead-in, with addresses always in MSF.
            if track > 1 {
                return Err(Sense::invalid_cdb(6, None));
            }
            d[2] = 1;
            d[3] = 1;
            let msf_of = |lba: u64| {
                let a = address(lba, true);
                [a[1], a[2], a[3]]
            };
            // POINT A0: first track (PMIN) and disc type (PSEC: CD-DA or CD-ROM);
            // A1: last track; A2: where the lead-out starts; then track 1's start.
            let points: [(u8, [u8; 3]); 4] = [
                (0xa0, [1, 0x00, 0]),
                (0xa1, [1, 0, 0]),
                (0xa2, msf_of(m.blocks)),
                (1, msf_of(0)),
            ];
            for (point, p) in points {
                d.extend_from_slice(&[1, ADR_CONTROL_DATA, 0, point, 0, 0, 0, 0]);
                d.extend_from_slice(&p);
            }
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

/// The parts of a raw mode 1 sector READ CD byte 9 selects, as a byte range of it: sync,
/// header (header codes 01b and 11b; a mode 1 sector has no sub-header, so 10b adds nothing),
/// user data, EDC and ECC. MMC-6 allows only runs of adjacent parts, and neither the sync nor
/// the EDC and ECC alone.
fn selected_parts(byte9: u8) -> Option<std::ops::Range<usize>> {
    let sync = byte9 & 0x80 != 0;
    let header = byte9 & 0x20 != 0;
    let user = byte9 & 0x10 != 0;
    let ecc = byte9 & 0x08 != 0;
    let parts = [
        (sync, 0..cdsector::HEADER),
        (header, cdsector::HEADER..cdsector::USER),
        (user, cdsector::USER..cdsector::EDC),
        (ecc, cdsector::EDC..cdsector::RAW),
    ];
    let chosen: Vec<usize> = (0..4).filter(|&i| parts[i].0).collect();
    let (Some(&first), Some(&last)) = (chosen.first(), chosen.last()) else {
        return Some(0..0);
    };
    let adjacent = last - first + 1 == chosen.len();
    let lone_edge = chosen.len() == 1 && (first == 0 || first == 3);
    (adjacent && !lone_edge).then(|| parts[first].1.start..parts[last].1.end)
}

/// READ CD of a data disc: its one track is mode 1, so the expected sector type must be any
/// (000b) or mode 1 (010b); of each sector the parts byte 9 selects. C2 error information
/// and sub-channel data are not offered (mode page 2Ah says so) and are refused.
fn read_cd(lu: &LogicalUnit, cdb: &Cdb<'_>) -> Result<Vec<u8>, Sense> {
    let m = lu.loaded()?;
    if profile_of(&m) != PROFILE_CD_ROM {
        return Err(Sense::INCOMPATIBLE_FORMAT);
    }
    match (cdb.byte(1) >> 2) & 0x07 {
        0 | 2 => {}
        1 | 3..=5 => return Err(Sense::ILLEGAL_MODE_FOR_TRACK),
        _ => return Err(Sense::invalid_cdb(1, Some(4))),
    }
    let byte9 = cdb.byte(9);
    if byte9 & 0x06 != 0 {
        return Err(Sense::invalid_cdb(9, Some(2)));
    }
    if cdb.byte(10) & 0x07 != 0 {
        return Err(Sense::invalid_cdb(10, Some(2)));
    }
    let Some(part) = selected_parts(byte9) else {
        return Err(Sense::invalid_cdb(9, Some(7)));
    };
    let lba = u64::from(cdb.be32(2));
    let count = u64::from(cdb.be24(6));
    let (off, len) = m.range(lba, count)?;
    let each = part.len() as u64;
    if count * each > u64::from(crate::MAX_TRANSFER) {
        return Err(Sense::invalid_cdb(6, None));
    }
    let mut user = vec![0u8; usize::try_from(len).map_err(|_| Sense::LBA_OUT_OF_RANGE)?];
    m.dev
        .read_at(&mut user, off)
        .map_err(|e| Sense::from_error(&e, false))?;
    let only_user = part.start >= cdsector::USER && part.end <= cdsector::EDC;
    let mut out = Vec::with_capacity(usize::try_from(count * each).unwrap_or(0));
    for (i, data) in user.chunks_exact(2048).enumerate() {
        if only_user {
            out.extend_from_slice(&data[part.start - cdsector::USER..part.end - cdsector::USER]);
        } else {
            out.extend_from_slice(&cdsector::mode1(lba + i as u64, data)[part.clone()]);
        }
    }
    Ok(out)
}

/// Nominal read speeds reported: 48x CD (176 kB/s each), 16x DVD (1385 kB/s each), as mode
/// page 2Ah's maximum read speed says for a CD.
fn read_speed(m: &Medium) -> u32 {
    if profile_of(m) == PROFILE_DVD_ROM {
        16 * 1385
    } else {
        48 * 176
    }
}

/// GET PERFORMANCE: type 00h, nominal read performance, one descriptor from the LBA asked
/// to the end of the disc (no exceptions, and no write performance: the drive does not
/// write); type 03h, write speeds: none.
fn performance(lu: &LogicalUnit, cdb: &Cdb<'_>) -> Result<Vec<u8>, Sense> {
    let kind = cdb.byte(10);
    let max = usize::from(cdb.be16(8));
    let mut d = vec![0u8; 8];
    match kind {
        0x00 => {
            let m = lu.loaded()?;
            let write = cdb.bit(1, 2);
            let except = cdb.byte(1) & 0x03;
            if except == 3 {
                return Err(Sense::invalid_cdb(1, Some(1)));
            }
            d[4] = (u8::from(write) << 1) | u8::from(except != 0);
            let start = cdb.be32(2);
            if !write && except == 0 && max > 0 && u64::from(start) < m.blocks {
                let end = u32::try_from(m.blocks - 1).unwrap_or(u32::MAX);
                let speed = read_speed(&m);
                for v in [start, speed, end, speed] {
                    d.extend_from_slice(&v.to_be_bytes());
                }
            }
        }
        0x03 => {}
        _ => return Err(Sense::invalid_cdb(10, None)),
    }
    let n = u32_of(d.len() - 4);
    d[..4].copy_from_slice(&n.to_be_bytes());
    Ok(d)
}

/// The structures READ DISC STRUCTURE answers for a DVD-ROM: physical format information,
/// copyright information, disc manufacturing information; and the list of them (FFh).
const DVD_STRUCTURES: [(u8, u16); 4] = [(0x00, 2052), (0x01, 8), (0x04, 2052), (0xff, 20)];

/// READ DISC STRUCTURE (media type DVD) of a one-layer DVD-ROM made of the image; a CD has
/// none of these structures (INCOMPATIBLE FORMAT), except the list of those it would answer.
fn disc_structure(lu: &LogicalUnit, cdb: &Cdb<'_>) -> Result<Vec<u8>, Sense> {
    if cdb.byte(1) & 0x0f != 0 {
        // Only DVD structures (media type 0000b); no BD.
        return Err(Sense::invalid_cdb(1, Some(3)));
    }
    let format = cdb.byte(7);
    let mut d = vec![0u8; 4];
    if format == 0xff {
        for (code, len) in DVD_STRUCTURES {
            d.extend_from_slice(&[code, 0x40]); // RDS: readable with this command
            d.extend_from_slice(&len.to_be_bytes());
        }
    } else {
        let m = lu.loaded()?;
        if profile_of(&m) != PROFILE_DVD_ROM {
            return Err(Sense::INCOMPATIBLE_FORMAT);
        }
        if cdb.byte(6) != 0 {
            return Err(Sense::invalid_cdb(6, None)); // one layer
        }
        match format {
            0x00 => {
                let mut p = vec![0u8; 2048];
                p[0] = 0x01; // DVD-ROM, part version 1
                p[1] = 0x02; // 120 mm; maximum rate 10.08 Mb/s
                p[2] = 0x01; // one layer, parallel track path, embossed (read-only) layer
                             // First and last physical sectors of the data area (it starts at 30000h).
                let first = 0x0003_0000u32;
                let last = first + u32::try_from(m.blocks).unwrap_or(u32::MAX - first) - 1;
                p[4..8].copy_from_slice(&first.to_be_bytes());
                p[8..12].copy_from_slice(&last.to_be_bytes());
                d.extend(p);
            }
            // No copy protection; playable in every region.
            0x01 => d.extend_from_slice(&[0, 0, 0, 0]),
            0x04 => d.extend(vec![0u8; 2048]),
            _ => return Err(Sense::invalid_cdb(7, None)),
        }
    }
    let n = u16_of(d.len() - 2);
    d[..2].copy_from_slice(&n.to_be_bytes());
    Ok(cdb.cut_field(d, 8, 2))
}
