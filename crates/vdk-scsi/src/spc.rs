//! SPC commands every logical unit answers: INQUIRY and its VPD pages, TEST UNIT READY,
//! REQUEST SENSE, START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL, RESERVE and RELEASE.

use crate::cdb::{ascii_field, u16_of, Cdb};
use crate::lu::{DeviceType, LogicalUnit};
use crate::sense::Sense;
use crate::{Request, Response, MAX_TRANSFER};

const TEST_UNIT_READY: u8 = 0x00;
const REQUEST_SENSE: u8 = 0x03;
const INQUIRY: u8 = 0x12;
const RESERVE6: u8 = 0x16;
const RELEASE6: u8 = 0x17;
const START_STOP_UNIT: u8 = 0x1b;
const PREVENT_ALLOW: u8 = 0x1e;
const PERSISTENT_RESERVE_IN: u8 = 0x5e;
const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
const MAINTENANCE_IN: u8 = 0xa3;
/// MAINTENANCE IN's REPORT SUPPORTED OPERATION CODES.
const SA_REPORT_OPCODES: u8 = 0x0c;

/// Version descriptors (SPC-4 table 146): SAM-5, SPC-4, iSCSI, and SBC-3 or MMC-6.
const VERSION_SAM5: u16 = 0x00a0;
const VERSION_SPC4: u16 = 0x0460;
const VERSION_ISCSI: u16 = 0x0960;
const VERSION_SBC3: u16 = 0x04c0;
const VERSION_MMC6: u16 = 0x04e0;

pub fn execute(lu: &LogicalUnit, req: &Request<'_>, cdb: &Cdb<'_>) -> Option<Response> {
    Some(match cdb.opcode() {
        INQUIRY => inquiry(lu, cdb).into(),
        TEST_UNIT_READY => match lu.loaded() {
            Ok(_) => Response::good(Vec::new()),
            Err(s) => Response::check(s),
        },
        REQUEST_SENSE => request_sense(lu, req, cdb).into(),
        START_STOP_UNIT => start_stop(lu, req, cdb).into(),
        PREVENT_ALLOW => prevent_allow(lu, req, cdb).into(),
        PERSISTENT_RESERVE_IN => lu.lock().pr.read(cdb).into(),
        PERSISTENT_RESERVE_OUT => {
            let port = crate::lu::port_of(req);
            let mut st = lu.lock();
            let changed = st.pr.change(&port, cdb, req.data_out);
            match changed {
                Ok(att) => {
                    st.attention_ports(att);
                    Response::good(Vec::new())
                }
                Err(crate::pr::Refused::Conflict) => {
                    Response::status(crate::status::RESERVATION_CONFLICT)
                }
                Err(crate::pr::Refused::Check(s)) => Response::check(s),
            }
        }
        MAINTENANCE_IN if cdb.byte(1) & 0x1f == SA_REPORT_OPCODES => {
            crate::rsoc::report(lu.device, cdb).into()
        }
        MAINTENANCE_IN => Response::check(Sense::invalid_cdb(1, Some(4))),
        RESERVE6 => {
            let mut st = lu.lock();
            // With a persistent reservation, RESERVE(6) conflicts (SPC-4 5.13.3).
            if st.pr.reserved() {
                return Some(Response::status(crate::status::RESERVATION_CONFLICT));
            }
            match st.reserved_by {
                Some(n) if n != req.nexus => {
                    return Some(Response::status(crate::status::RESERVATION_CONFLICT));
                }
                _ => st.reserved_by = Some(req.nexus),
            }
            Response::good(Vec::new())
        }
        RELEASE6 => {
            let mut st = lu.lock();
            if st.reserved_by == Some(req.nexus) {
                st.reserved_by = None;
            }
            Response::good(Vec::new())
        }
        _ => return None,
    })
}

fn peripheral_type(lu: &LogicalUnit) -> u8 {
    match lu.device {
        DeviceType::Disk => 0x00,
        DeviceType::CdRom => 0x05,
    }
}

fn inquiry(lu: &LogicalUnit, cdb: &Cdb<'_>) -> Result<Vec<u8>, Sense> {
    let evpd = cdb.bit(1, 0);
    if cdb.bit(1, 1) {
        // CMDDT, obsolete.
        return Err(Sense::invalid_cdb(1, Some(1)));
    }
    let page = cdb.byte(2);
    if !evpd && page != 0 {
        return Err(Sense::invalid_cdb(2, None));
    }
    let data = if evpd {
        vpd(lu, page)?
    } else {
        standard_inquiry(lu)
    };
    Ok(cdb.cut_field(data, 3, 2))
}

fn standard_inquiry(lu: &LogicalUnit) -> Vec<u8> {
    let mut d = vec![0u8; 96];
    d[0] = peripheral_type(lu);
    if lu.device == DeviceType::CdRom {
        d[1] = 0x80; // RMB: removable medium
    }
    d[2] = 0x06; // SPC-4
    d[3] = 0x12; // HISUP, response data format 2
    d[4] = 96 - 5;
    d[7] = 0x02; // CMDQUE
    d[8..16].copy_from_slice(&ascii_field(&lu.ident.vendor, 8));
    d[16..32].copy_from_slice(&ascii_field(&lu.ident.product, 16));
    d[32..36].copy_from_slice(&ascii_field(&lu.ident.revision, 4));
    let command_set = match lu.device {
        DeviceType::Disk => VERSION_SBC3,
        DeviceType::CdRom => VERSION_MMC6,
    };
    for (i, v) in [VERSION_SAM5, VERSION_ISCSI, VERSION_SPC4, command_set]
        .iter()
        .enumerate()
    {
        d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    d
}

/// INQUIRY for a LUN that does not exist: peripheral qualifier 3, type 1Fh (SPC-4 6.6.2).
pub fn inquiry_no_lun(cdb: &Cdb<'_>) -> Result<Vec<u8>, Sense> {
    if cdb.bit(1, 0) {
        return Err(Sense::LUN_NOT_SUPPORTED);
    }
    let mut d = vec![0u8; 36];
    d[0] = 0x7f;
    d[2] = 0x06;
    d[3] = 0x12;
    d[4] = 31;
    Ok(cdb.cut_field(d, 3, 2))
}

const VPD_SUPPORTED: u8 = 0x00;
const VPD_SERIAL: u8 = 0x80;
const VPD_DEVICE_ID: u8 = 0x83;
const VPD_BLOCK_LIMITS: u8 = 0xb0;
const VPD_CHARACTERISTICS: u8 = 0xb1;
const VPD_PROVISIONING: u8 = 0xb2;

/// Most blocks one UNMAP descriptor may cover (512 MiB of 512-byte blocks).
pub const MAX_UNMAP_BLOCKS: u32 = 1 << 20;
/// Most descriptors in one UNMAP parameter list.
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;
/// Most blocks one COMPARE AND WRITE covers.
pub const MAX_COMPARE_WRITE: u8 = 128;

fn vpd(lu: &LogicalUnit, page: u8) -> Result<Vec<u8>, Sense> {
    let pages: &[u8] = match lu.device {
        DeviceType::Disk => &[
            VPD_SUPPORTED,
            VPD_SERIAL,
            VPD_DEVICE_ID,
            VPD_BLOCK_LIMITS,
            VPD_CHARACTERISTICS,
            VPD_PROVISIONING,
        ],
        DeviceType::CdRom => &[VPD_SUPPORTED, VPD_SERIAL, VPD_DEVICE_ID],
    };
    if !pages.contains(&page) {
        return Err(Sense::invalid_cdb(2, None));
    }
    let body: Vec<u8> = match page {
        VPD_SUPPORTED => pages.to_vec(),
        VPD_SERIAL => lu.ident.serial.as_bytes().to_vec(),
        VPD_DEVICE_ID => device_id(lu),
        VPD_BLOCK_LIMITS => block_limits(lu),
        VPD_CHARACTERISTICS => {
            let mut b = vec![0u8; 0x3c];
            let rotational = lu.medium().map(|m| m.info().rotational).unwrap_or(false);
            // Medium rotation rate: 1 is a non-rotating (solid state) medium.
            b[1] = if rotational { 0 } else { 1 };
            b
        }
        _ => provisioning(lu),
    };
    let mut d = vec![peripheral_type(lu), page];
    d.extend_from_slice(&u16_of(body.len()).to_be_bytes());
    d.extend_from_slice(&body);
    Ok(d)
}

fn device_id(lu: &LogicalUnit) -> Vec<u8> {
    let mut b = Vec::new();
    // NAA IEEE Registered Extended (NAA 6): binary, associated with the logical unit. The
    // company id is the locally administered one; the rest comes from the unit's identity.
    let id = lu.ident.id;
    let mut naa = [0u8; 16];
    naa[0] = 0x60 | 0x0a; // NAA 6, high nibble of a 24-bit company id 0xa0_0000-ish
    naa[1..8].copy_from_slice(&id.to_be_bytes()[1..8]);
    naa[8..16].copy_from_slice(&id.rotate_left(17).to_be_bytes());
    b.extend_from_slice(&[0x01, 0x03, 0x00, 16]); // binary, LU, type 3 (NAA)
    b.extend_from_slice(&naa);
    // T10 vendor id based: vendor, then the serial number.
    let mut t10 = ascii_field(&lu.ident.vendor, 8);
    t10.extend_from_slice(lu.ident.serial.as_bytes());
    b.extend_from_slice(&[0x02, 0x01, 0x00, u8::try_from(t10.len()).unwrap_or(255)]);
    b.extend_from_slice(&t10);
    b
}

fn block_limits(lu: &LogicalUnit) -> Vec<u8> {
    let mut b = vec![0u8; 0x3c];
    let info = lu.medium().map(|m| m.info());
    let bs = lu.block_size_of(info.as_ref());
    let per = |bytes: u32| bytes / bs;
    b[0] = 0x01; // WSNZ: WRITE SAME with zero blocks is refused
    b[1] = MAX_COMPARE_WRITE;
    let pref = info.map(|i| i.preferred_request.max(bs)).unwrap_or(4096);
    b[2..4].copy_from_slice(&u16_of(usize::try_from(per(pref)).unwrap_or(1)).to_be_bytes());
    b[4..8].copy_from_slice(&per(MAX_TRANSFER).to_be_bytes());
    b[8..12].copy_from_slice(&per(pref.clamp(1 << 20, MAX_TRANSFER)).to_be_bytes());
    b[12..16].copy_from_slice(&per(MAX_TRANSFER).to_be_bytes());
    b[16..20].copy_from_slice(&MAX_UNMAP_BLOCKS.to_be_bytes());
    b[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
    let phys = info.map(|i| i.physical_block_size.max(bs)).unwrap_or(4096);
    b[24..28].copy_from_slice(&per(phys).to_be_bytes());
    // MAXIMUM WRITE SAME LENGTH: what one WRITE of the largest transfer could write.
    b[32..40].copy_from_slice(&u64::from(per(MAX_TRANSFER)).to_be_bytes());
    b
}

fn provisioning(lu: &LogicalUnit) -> Vec<u8> {
    let mut b = vec![0u8; 4];
    // LBPU, LBPWS, LBPWS10, LBPRZ (unmapped blocks read zero: UNMAP writes zeroes).
    b[1] = 0x80 | 0x40 | 0x20 | 0x04;
    let thin = lu.medium().map(|m| m.info().caps.trim).unwrap_or(false);
    b[2] = if thin { 0x02 } else { 0x00 };
    b
}

fn request_sense(lu: &LogicalUnit, req: &Request<'_>, cdb: &Cdb<'_>) -> Result<Vec<u8>, Sense> {
    let pending = {
        let mut st = lu.lock();
        st.attention.get_mut(&req.nexus).and_then(|q| {
            if q.is_empty() {
                None
            } else {
                Some(q.remove(0))
            }
        })
    };
    let sense = match pending {
        Some(s) => s,
        None => match lu.loaded() {
            Ok(_) => Sense::new(crate::sense::key::NO_SENSE, 0, 0),
            Err(s) => s,
        },
    };
    Ok(cdb.cut(sense.to_fixed(), 4))
}

fn start_stop(lu: &LogicalUnit, req: &Request<'_>, cdb: &Cdb<'_>) -> Result<Vec<u8>, Sense> {
    let power = cdb.byte(4) >> 4;
    let loej = cdb.bit(4, 1);
    let start = cdb.bit(4, 0);
    if power != 0 || !loej || lu.device != DeviceType::CdRom {
        // Power conditions and spin up/down: nothing to do for a virtual unit.
        if loej && lu.device != DeviceType::CdRom && power == 0 {
            // A fixed disk has nothing to eject.
            return Err(Sense::invalid_cdb(4, Some(1)));
        }
        return Ok(Vec::new());
    }
    let mut st = lu.lock();
    if start {
        // Load: close the tray, putting back what an eject took out.
        if st.medium.is_none() {
            if let Some(m) = st.ejected.take() {
                st.medium = Some(m);
                st.event_all(crate::lu::MediaEvent::NewMedia);
                st.attention_all(Sense::MEDIUM_CHANGED, Some(req.nexus));
            }
        }
        st.tray_open = false;
    } else {
        if !st.prevent.is_empty() {
            return Err(Sense::REMOVAL_PREVENTED);
        }
        if let Some(m) = st.medium.take() {
            st.ejected = Some(m);
            st.event_all(crate::lu::MediaEvent::MediaRemoval);
            st.attention_all(Sense::MEDIUM_CHANGED, Some(req.nexus));
        }
        st.tray_open = true;
    }
    Ok(Vec::new())
}

fn prevent_allow(lu: &LogicalUnit, req: &Request<'_>, cdb: &Cdb<'_>) -> Result<Vec<u8>, Sense> {
    let mut st = lu.lock();
    match cdb.byte(4) & 0x03 {
        0 => {
            st.prevent.remove(&req.nexus);
        }
        1 => {
            st.prevent.insert(req.nexus);
        }
        // Persistent prevention is for medium changers.
        _ => return Err(Sense::invalid_cdb(4, Some(1))),
    }
    Ok(Vec::new())
}
