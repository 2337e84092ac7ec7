//! MODE SENSE and MODE SELECT (6 and 10): the read-write error recovery, caching and control
//! pages of a disk, and the CD/DVD capabilities page of a CD-ROM.

use crate::cdb::{u16_of, Cdb};
use crate::lu::{DeviceType, LogicalUnit, State};
use crate::sense::Sense;
use crate::{Request, Response};

const MODE_SELECT6: u8 = 0x15;
const MODE_SENSE6: u8 = 0x1a;
const MODE_SELECT10: u8 = 0x55;
const MODE_SENSE10: u8 = 0x5a;

const PAGE_ERROR_RECOVERY: u8 = 0x01;
const PAGE_CACHING: u8 = 0x08;
const PAGE_CONTROL: u8 = 0x0a;
const PAGE_CAPABILITIES: u8 = 0x2a;
const ALL_PAGES: u8 = 0x3f;

/// Page control field values.
const PC_CURRENT: u8 = 0;
const PC_CHANGEABLE: u8 = 1;

pub fn execute(lu: &LogicalUnit, req: &Request<'_>, cdb: &Cdb<'_>) -> Option<Response> {
    Some(match cdb.opcode() {
        MODE_SENSE6 | MODE_SENSE10 => sense(lu, cdb).into(),
        MODE_SELECT6 | MODE_SELECT10 => match select(lu, req, cdb) {
            Ok(()) => Response::good(Vec::new()),
            Err(s) => Response::check(s),
        },
        _ => return None,
    })
}

fn pages_of(device: DeviceType) -> &'static [u8] {
    match device {
        DeviceType::Disk => &[PAGE_ERROR_RECOVERY, PAGE_CACHING, PAGE_CONTROL],
        DeviceType::CdRom => &[PAGE_ERROR_RECOVERY, PAGE_CONTROL, PAGE_CAPABILITIES],
    }
}

/// One mode page as the page control asks: current, changeable (a mask), or default (2).
fn page(st: &State, code: u8, pc: u8) -> Vec<u8> {
    let mut p = match code {
        PAGE_ERROR_RECOVERY => vec![0u8; 12],
        PAGE_CACHING => vec![0u8; 20],
        PAGE_CONTROL => vec![0u8; 12],
        _ => vec![0u8; 30],
    };
    p[0] = code;
    p[1] = u8::try_from(p.len() - 2).unwrap_or(0);
    if pc == PC_CHANGEABLE {
        if code == PAGE_CACHING {
            p[2] = 0x04; // WCE can be turned off
        }
        return p;
    }
    let current = pc == PC_CURRENT;
    match code {
        PAGE_CACHING if !current || st.wce => p[2] = 0x04, // WCE
        PAGE_CONTROL => {
            p[3] = 0x10; // QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
            p[8] = 0xff; // BUSY TIMEOUT PERIOD: unlimited
            p[9] = 0xff;
        }
        PAGE_CAPABILITIES => {
            p[2] = 0x3f; // reads CD-R, CD-RW, method 2, DVD-ROM, DVD-R, DVD-RAM media
            p[4] = 0x71; // audio play, mode 2 form 1 and 2, multi-session
            p[5] = 0x03; // CD-DA commands, accurate stream
                         // Loading mechanism: tray (001b); eject; lock; lock state.
            let locked = !st.prevent.is_empty();
            p[6] = 0x20 | 0x08 | 0x01 | if locked { 0x02 } else { 0 };
            // Maximum read speed (obsolete field) and the number of volume levels.
            p[8..10].copy_from_slice(&(176u16 * 48).to_be_bytes());
            p[10..12].copy_from_slice(&256u16.to_be_bytes());
            p[12..14].copy_from_slice(&2048u16.to_be_bytes()); // buffer size, KiB
        }
        _ => {}
    }
    p
}

fn sense(lu: &LogicalUnit, cdb: &Cdb<'_>) -> Result<Vec<u8>, Sense> {
    let ten = cdb.opcode() == MODE_SENSE10;
    let dbd = cdb.bit(1, 3);
    let llbaa = ten && cdb.bit(1, 4);
    let pc = cdb.byte(2) >> 6;
    let code = cdb.byte(2) & 0x3f;
    let subpage = cdb.byte(3);
    if pc == 3 {
        return Err(Sense::SAVING_NOT_SUPPORTED);
    }
    if subpage != 0 && !(code == ALL_PAGES && subpage == 0xff) {
        return Err(Sense::invalid_cdb(3, None));
    }
    let supported = pages_of(lu.device);
    if code != ALL_PAGES && !supported.contains(&code) {
        return Err(Sense::invalid_cdb(2, Some(5)));
    }
    let medium = lu.medium().map(|m| m.info());
    let st = lu.lock();
    let mut body = Vec::new();
    for &c in supported {
        if code == ALL_PAGES || code == c {
            body.extend(page(&st, c, pc));
        }
    }
    drop(st);
    let read_only = lu.device == DeviceType::CdRom || medium.is_some_and(|i| i.read_only);
    let mut dsp = if read_only { 0x80 } else { 0 }; // WP
    if lu.device == DeviceType::Disk {
        dsp |= 0x10; // DPOFUA
    }
    // Block descriptor: disks only (MMC devices have none).
    let mut desc = Vec::new();
    if !dbd && lu.device == DeviceType::Disk {
        let bs = lu.block_size_of(medium.as_ref());
        let blocks = medium.map(|i| i.size / u64::from(bs)).unwrap_or(0);
        if llbaa {
            desc.extend_from_slice(&blocks.to_be_bytes());
            desc.extend_from_slice(&[0; 4]);
            desc.extend_from_slice(&bs.to_be_bytes());
        } else {
            desc.extend_from_slice(&u32::try_from(blocks).unwrap_or(u32::MAX).to_be_bytes());
            desc.extend_from_slice(&bs.to_be_bytes());
            desc[4] = 0;
        }
    }
    let mut d = if ten {
        let mut h = vec![0u8; 8];
        h[3] = dsp;
        if llbaa && !desc.is_empty() {
            h[4] = 0x01;
        }
        h[6..8].copy_from_slice(&u16_of(desc.len()).to_be_bytes());
        h
    } else {
        vec![0, 0, dsp, u8::try_from(desc.len()).unwrap_or(0)]
    };
    d.extend(desc);
    d.extend(body);
    if ten {
        let n = u16_of(d.len() - 2);
        d[..2].copy_from_slice(&n.to_be_bytes());
        Ok(cdb.cut_field(d, 7, 2))
    } else {
        d[0] = u8::try_from(d.len() - 1).unwrap_or(255);
        Ok(cdb.cut(d, 4))
    }
}

fn select(lu: &LogicalUnit, req: &Request<'_>, cdb: &Cdb<'_>) -> Result<(), Sense> {
    let ten = cdb.opcode() == MODE_SELECT10;
    if cdb.bit(1, 0) {
        // SP: saved pages are not kept.
        return Err(Sense::invalid_cdb(1, Some(0)));
    }
    let len = if ten {
        usize::from(cdb.be16(7))
    } else {
        usize::from(cdb.byte(4))
    };
    if len == 0 {
        return Ok(());
    }
    if req.data_out.len() < len {
        return Err(Sense::PARAMETER_LIST_LENGTH);
    }
    let data = &req.data_out[..len];
    let (hdr, bdl) = if ten {
        if len < 8 {
            return Err(Sense::PARAMETER_LIST_LENGTH);
        }
        (8, usize::from(u16::from_be_bytes([data[6], data[7]])))
    } else {
        if len < 4 {
            return Err(Sense::PARAMETER_LIST_LENGTH);
        }
        (4, usize::from(data[3]))
    };
    let mut at = hdr + bdl;
    if at > len {
        return Err(Sense::PARAMETER_LIST_LENGTH);
    }
    let mut st = lu.lock();
    let mut wce = st.wce;
    while at < len {
        if at + 2 > len {
            return Err(Sense::PARAMETER_LIST_LENGTH);
        }
        let code = data[at] & 0x3f;
        if data[at] & 0x40 != 0 {
            // Subpage format: none supported.
            return Err(Sense::invalid_param(u16_of(at)));
        }
        let plen = usize::from(data[at + 1]) + 2;
        if at + plen > len {
            return Err(Sense::PARAMETER_LIST_LENGTH);
        }
        let sent = &data[at..at + plen];
        if !pages_of(lu.device).contains(&code) {
            return Err(Sense::invalid_param(u16_of(at)));
        }
        let cur = page(&st, code, PC_CURRENT);
        let mask = page(&st, code, PC_CHANGEABLE);
        if sent.len() != cur.len() {
            return Err(Sense::invalid_param(u16_of(at + 1)));
        }
        // Every bit that is not changeable must be sent as it is.
        for i in 2..cur.len() {
            if (sent[i] ^ cur[i]) & !mask[i] != 0 {
                return Err(Sense::invalid_param(u16_of(at + i)));
            }
        }
        if code == PAGE_CACHING {
            wce = sent[2] & 0x04 != 0;
        }
        at += plen;
    }
    if wce != st.wce {
        st.wce = wce;
        st.attention_all(Sense::MODE_PARAMETERS_CHANGED, Some(req.nexus));
    }
    Ok(())
}
