//! A logical unit: its identity, its medium, and the state initiators see (unit attentions,
//! medium-removal prevention, reservations, the write cache setting).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use vdk_core::sync;
use vdk_core::{BlockDevice, DiskInfo};

use crate::cdb::Cdb;
use crate::sense::Sense;
use crate::{mmc, mode, sbc, spc, status, Request, Response};

/// What kind of device a logical unit is.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum DeviceType {
    /// A direct-access block device (SBC).
    Disk,
    /// A CD/DVD-ROM drive (MMC), read-only, with a removable medium.
    CdRom,
}

/// How a logical unit names itself in INQUIRY data.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Identity {
    /// T10 vendor identification, up to 8 ASCII characters.
    pub vendor: String,
    /// Product identification, up to 16 ASCII characters.
    pub product: String,
    /// Product revision level, up to 4 ASCII characters.
    pub revision: String,
    /// Unit serial number (VPD page 80h), ASCII.
    pub serial: String,
    /// The 64 bits of a globally unique NAA 6 identifier (VPD page 83h), low 36 bits used
    /// beside vdk's fixed prefix.
    pub id: u64,
}

impl Identity {
    /// An identity derived from `name` (a disk id): serial number and identifier are stable
    /// for the same name.
    pub fn from_name(name: &str, device: DeviceType) -> Identity {
        // FNV-1a: stable across runs and platforms, which a HashMap hasher is not.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        Identity {
            vendor: "VDK".into(),
            product: match device {
                DeviceType::Disk => "Virtual Disk".into(),
                DeviceType::CdRom => "Virtual CD-ROM".into(),
            },
            revision: env!("CARGO_PKG_VERSION")
                .chars()
                .filter(|c| *c != '.')
                .take(4)
                .collect(),
            serial: format!("{h:016x}"),
            id: h,
        }
    }
}

/// A media event for GET EVENT STATUS NOTIFICATION (MMC media class event codes).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) enum MediaEvent {
    NewMedia = 2,
    MediaRemoval = 3,
}

#[derive(Debug)]
pub(crate) struct State {
    pub medium: Option<Arc<dyn BlockDevice>>,
    /// The medium a START STOP UNIT eject took out, put back by a load.
    pub ejected: Option<Arc<dyn BlockDevice>>,
    pub tray_open: bool,
    /// Nexuses that have sent a command: unit attentions go to each.
    pub nexuses: HashSet<u64>,
    pub attention: HashMap<u64, Vec<Sense>>,
    pub events: HashMap<u64, MediaEvent>,
    pub prevent: HashSet<u64>,
    pub reserved_by: Option<u64>,
    /// Write cache enabled (caching mode page WCE). Off: every write is FUA.
    pub wce: bool,
    /// Persistent reservations.
    pub pr: crate::pr::Reservations,
    /// The initiator port of each nexus seen.
    pub ports: HashMap<u64, String>,
}

impl State {
    /// Queues `sense` as a unit attention for every known nexus but `except`.
    pub fn attention_all(&mut self, sense: Sense, except: Option<u64>) {
        for n in self.nexuses.iter().copied().filter(|n| Some(*n) != except) {
            let q = self.attention.entry(n).or_default();
            if !q.contains(&sense) {
                q.push(sense);
            }
        }
    }

    /// Queues the unit attentions a persistent reservation change left for other ports.
    pub fn attention_ports(&mut self, att: crate::pr::Attentions) {
        for (port, sense) in att {
            let nexuses: Vec<u64> = self
                .ports
                .iter()
                .filter(|(_, p)| **p == port)
                .map(|(n, _)| *n)
                .collect();
            for n in nexuses {
                let q = self.attention.entry(n).or_default();
                if !q.contains(&sense) {
                    q.push(sense);
                }
            }
        }
    }

    pub fn event_all(&mut self, e: MediaEvent) {
        for n in &self.nexuses {
            self.events.insert(*n, e);
        }
    }
}

/// A logical unit. See the crate documentation.
#[derive(Debug)]
pub struct LogicalUnit {
    pub(crate) device: DeviceType,
    pub(crate) ident: Identity,
    pub(crate) state: Mutex<State>,
    /// Writes take it shared, COMPARE AND WRITE exclusive, so that its read, compare and
    /// write are atomic with respect to other writes.
    pub(crate) io: RwLock<()>,
}

/// Opcodes that are answered even while a unit attention is pending (SPC-4 5.14) or another
/// nexus holds a reservation.
const INQUIRY: u8 = 0x12;
const REQUEST_SENSE: u8 = 0x03;
const REPORT_LUNS: u8 = 0xa0;
const RELEASE6: u8 = 0x17;
const GET_EVENT_STATUS: u8 = 0x4a;
const GET_CONFIGURATION: u8 = 0x46;

impl LogicalUnit {
    /// A logical unit of `device` type over `medium` (None: a drive with no disc).
    pub fn new(
        device: DeviceType,
        ident: Identity,
        medium: Option<Arc<dyn BlockDevice>>,
    ) -> LogicalUnit {
        LogicalUnit {
            device,
            ident,
            state: Mutex::new(State {
                medium,
                ejected: None,
                tray_open: false,
                nexuses: HashSet::new(),
                attention: HashMap::new(),
                events: HashMap::new(),
                prevent: HashSet::new(),
                reserved_by: None,
                wce: true,
                pr: crate::pr::Reservations::default(),
                ports: HashMap::new(),
            }),
            io: RwLock::new(()),
        }
    }

    /// A logical unit serving `device` under the name `name` (a disk id): a CD-ROM drive
    /// holding it if the device is a CD-ROM medium (an ISO), a disk otherwise.
    pub fn for_device(name: &str, device: Arc<dyn BlockDevice>) -> LogicalUnit {
        let kind = match device.info().media {
            vdk_core::MediaKind::CdRom => DeviceType::CdRom,
            _ => DeviceType::Disk,
        };
        LogicalUnit::new(kind, Identity::from_name(name, kind), Some(device))
    }

    /// The device type.
    pub fn device_type(&self) -> DeviceType {
        self.device
    }

    /// The identity INQUIRY reports.
    pub fn identity(&self) -> &Identity {
        &self.ident
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        sync::lock(&self.state)
    }

    /// The medium now in the drive.
    pub fn medium(&self) -> Option<Arc<dyn BlockDevice>> {
        self.lock().medium.clone()
    }

    /// Whether an initiator has prevented medium removal.
    pub fn removal_prevented(&self) -> bool {
        !self.lock().prevent.is_empty()
    }

    /// Takes the medium out (the drive's eject button, `vdk eject`). Refused while an initiator
    /// prevents removal, unless `force`. Returns the medium that was in the drive.
    pub fn eject(&self, force: bool) -> Result<Option<Arc<dyn BlockDevice>>, Sense> {
        let mut st = self.lock();
        if !st.prevent.is_empty() && !force {
            return Err(Sense::REMOVAL_PREVENTED);
        }
        let old = st.medium.take();
        st.ejected = None;
        st.tray_open = true;
        if old.is_some() {
            st.event_all(MediaEvent::MediaRemoval);
            st.attention_all(Sense::MEDIUM_CHANGED, None);
        }
        Ok(old)
    }

    /// Puts `medium` in the drive (`vdk insert`): every initiator sees a unit attention and a
    /// new-media event. Refused while removal of the current medium is prevented.
    pub fn insert(&self, medium: Arc<dyn BlockDevice>) -> Result<(), Sense> {
        let mut st = self.lock();
        if st.medium.is_some() && !st.prevent.is_empty() {
            return Err(Sense::REMOVAL_PREVENTED);
        }
        st.medium = Some(medium);
        st.ejected = None;
        st.tray_open = false;
        st.event_all(MediaEvent::NewMedia);
        st.attention_all(Sense::MEDIUM_CHANGED, None);
        Ok(())
    }

    /// Tells every initiator logged in that the medium's capacity changed (it grew while
    /// open): their next command gets CAPACITY DATA HAS CHANGED, after which they read the
    /// capacity again. READ CAPACITY answers the medium's size as it is at each command.
    pub fn capacity_changed(&self) {
        self.lock().attention_all(Sense::CAPACITY_CHANGED, None);
    }

    pub(crate) fn nexus_lost(&self, nexus: u64) {
        let mut st = self.lock();
        st.nexuses.remove(&nexus);
        st.attention.remove(&nexus);
        st.events.remove(&nexus);
        st.prevent.remove(&nexus);
        // Persistent reservations belong to the port and stay; only the nexus goes.
        st.ports.remove(&nexus);
        if st.reserved_by == Some(nexus) {
            st.reserved_by = None;
        }
    }

    pub(crate) fn reset(&self) {
        let mut st = self.lock();
        st.prevent.clear();
        st.reserved_by = None;
        st.wce = true;
        st.attention_all(Sense::RESET_OCCURRED, None);
    }

    /// The medium and its geometry, or the sense a command gets without one.
    pub(crate) fn loaded(&self) -> Result<Medium, Sense> {
        let st = self.lock();
        match &st.medium {
            Some(m) => Ok(Medium::new(m.clone(), st.wce, self.device)),
            None if st.tray_open => Err(Sense::NO_MEDIUM_TRAY_OPEN),
            None => Err(Sense::NO_MEDIUM_TRAY_CLOSED),
        }
    }

    /// The block size the unit reports (with or without a medium).
    pub(crate) fn block_size_of(&self, info: Option<&DiskInfo>) -> u32 {
        match (self.device, info) {
            (DeviceType::CdRom, _) => 2048,
            (DeviceType::Disk, Some(i)) => i.logical_block_size.max(512),
            (DeviceType::Disk, None) => 512,
        }
    }

    /// What every command goes through first: CDB length and control byte, unit
    /// attentions, reservations. `Err` is the command's response.
    fn admit(&self, req: &Request<'_>, cdb: &Cdb<'_>) -> Result<(), Response> {
        if cdb.len() < cdb.needed_len() {
            return Err(Response::check(Sense::invalid_cdb(0, None)));
        }
        // NACA is not supported: a CDB asking for it is refused (SAM-5 5.9.1.2).
        let control = cdb.byte(cdb.needed_len() - 1);
        if control & 0x04 != 0 {
            return Err(Response::check(Sense::invalid_cdb(
                crate::cdb::u16_of(cdb.needed_len() - 1),
                Some(2),
            )));
        }
        let op = cdb.opcode();
        let port = port_of(req);
        let mut st = self.lock();
        st.nexuses.insert(req.nexus);
        if st.ports.get(&req.nexus).map(String::as_str) != Some(&*port) {
            st.ports.insert(req.nexus, port.clone().into_owned());
        }
        if !matches!(op, INQUIRY | REQUEST_SENSE | REPORT_LUNS) {
            if let Some(q) = st.attention.get_mut(&req.nexus) {
                // GET EVENT STATUS NOTIFICATION and GET CONFIGURATION do not clear a
                // medium-change attention (MMC-6 4.1.6.1): they run and the attention
                // waits for the next command.
                let skip = self.device == DeviceType::CdRom
                    && matches!(op, GET_EVENT_STATUS | GET_CONFIGURATION);
                if !q.is_empty() && !skip {
                    let s = q.remove(0);
                    return Err(Response::check(s));
                }
            }
        }
        if let Some(holder) = st.reserved_by {
            if holder != req.nexus
                && !matches!(op, INQUIRY | REQUEST_SENSE | REPORT_LUNS | RELEASE6)
            {
                return Err(Response::status(status::RESERVATION_CONFLICT));
            }
        }
        let access = crate::pr::access_of(op, cdb.byte(1) & 0x1f);
        if !st.pr.allows(&port, access) {
            return Err(Response::status(status::RESERVATION_CONFLICT));
        }
        Ok(())
    }

    /// Runs `req` at once if it is a READ (or a plain WRITE, without FUA) that the medium
    /// answers without waiting (from memory or a page cache), as a front end's reader thread
    /// may: `Some` is the response (a failure included), `None` means it would wait or is
    /// not such a command, and `execute` must run it.
    pub fn try_execute(&self, req: &Request<'_>) -> Option<Response> {
        let cdb = Cdb::new(req.cdb);
        let op = cdb.opcode();
        let read = matches!(op, sbc::READ6 | sbc::READ10 | sbc::READ12 | sbc::READ16);
        let write = matches!(op, sbc::WRITE6 | sbc::WRITE10 | sbc::WRITE12 | sbc::WRITE16);
        if !(read || write && self.device == DeviceType::Disk) {
            return None;
        }
        if let Err(r) = self.admit(req, &cdb) {
            return Some(r);
        }
        if read {
            sbc::try_read(self, &cdb).map(Response::from)
        } else {
            sbc::try_write(self, req, &cdb)
        }
    }

    /// Runs one command for this unit.
    pub fn execute(&self, req: &Request<'_>) -> Response {
        let cdb = Cdb::new(req.cdb);
        if let Err(r) = self.admit(req, &cdb) {
            return r;
        }
        let r = spc::execute(self, req, &cdb).or_else(|| match self.device {
            DeviceType::Disk => sbc::execute(self, req, &cdb),
            DeviceType::CdRom => mmc::execute(self, req, &cdb),
        });
        r.or_else(|| mode::execute(self, req, &cdb))
            .unwrap_or_else(|| Response::check(Sense::INVALID_OPCODE))
    }
}

/// The name persistent reservations know a request's initiator port by.
pub(crate) fn port_of<'a>(req: &Request<'a>) -> std::borrow::Cow<'a, str> {
    if req.initiator.is_empty() {
        std::borrow::Cow::Owned(format!("nexus-{}", req.nexus))
    } else {
        std::borrow::Cow::Borrowed(req.initiator)
    }
}

/// The medium a command runs against, sized in the unit's blocks.
#[derive(Debug)]
pub(crate) struct Medium {
    pub dev: Arc<dyn BlockDevice>,
    pub info: DiskInfo,
    pub block: u32,
    pub blocks: u64,
    pub wce: bool,
}

impl Medium {
    fn new(dev: Arc<dyn BlockDevice>, wce: bool, device: DeviceType) -> Medium {
        let info = dev.info();
        let block = if device == DeviceType::CdRom || info.media == vdk_core::MediaKind::CdRom {
            2048
        } else {
            info.logical_block_size.max(512)
        };
        Medium {
            dev,
            info,
            block,
            blocks: info.size / u64::from(block),
            wce,
        }
    }

    /// Checks that `count` blocks from `lba` are on the medium and gives the byte range.
    pub fn range(&self, lba: u64, count: u64) -> Result<(u64, u64), Sense> {
        match lba.checked_add(count) {
            Some(end) if end <= self.blocks => {
                Ok((lba * u64::from(self.block), count * u64::from(self.block)))
            }
            _ => Err(Sense::LBA_OUT_OF_RANGE),
        }
    }
}
