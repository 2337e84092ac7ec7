//! Persistent reservations (SPC-4 5.13): PERSISTENT RESERVE IN and OUT, and the access a
//! reservation leaves other initiators.
//!
//! Registrations belong to initiator ports (the transport's name for one, such as iSCSI's
//! `InitiatorName,i,0xISID`), not to sessions: they outlive a session and come back with the
//! next one from the same port, as SPC-4 asks. They do not outlive the process (APTPL is not
//! offered: PTPL_C is 0).
//!
//! ```text
//!   REGISTER ─► registered ─ RESERVE(type) ─► holder ─ RELEASE ─► registered ─ REGISTER 0 ─┐
//!      ▲                          PREEMPT, CLEAR by another registrant ─► gone              │
//!      └──────────────────────────────────────────────────────────────────────────────────┘
//! ```

use crate::cdb::{u32_of, Cdb};
use crate::sense::Sense;

/// Reservation types (SPC-4 table 214).
pub mod kind {
    /// Write Exclusive.
    pub const WRITE_EXCLUSIVE: u8 = 1;
    /// Exclusive Access.
    pub const EXCLUSIVE_ACCESS: u8 = 3;
    /// Write Exclusive, registrants only.
    pub const WRITE_EXCLUSIVE_RO: u8 = 5;
    /// Exclusive Access, registrants only.
    pub const EXCLUSIVE_ACCESS_RO: u8 = 6;
    /// Write Exclusive, all registrants.
    pub const WRITE_EXCLUSIVE_AR: u8 = 7;
    /// Exclusive Access, all registrants.
    pub const EXCLUSIVE_ACCESS_AR: u8 = 8;
}

/// Sense of persistent reservation events (SPC-4 table 49) and errors.
const REGISTRATIONS_PREEMPTED: Sense = Sense::new(crate::sense::key::UNIT_ATTENTION, 0x2a, 0x05);
const RESERVATIONS_PREEMPTED: Sense = Sense::new(crate::sense::key::UNIT_ATTENTION, 0x2a, 0x03);
const RESERVATIONS_RELEASED: Sense = Sense::new(crate::sense::key::UNIT_ATTENTION, 0x2a, 0x04);
const INVALID_RELEASE: Sense = Sense::new(crate::sense::key::ILLEGAL_REQUEST, 0x26, 0x04);

/// How `op` (with service action `sa`) is affected by a reservation its initiator does not
/// hold (SPC-4 5.13.1 and its tables of allowed commands).
pub fn access_of(op: u8, sa: u8) -> Access {
    match op {
        // TEST UNIT READY, REQUEST SENSE, INQUIRY, READ CAPACITY(10), GET CONFIGURATION,
        // GET EVENT STATUS NOTIFICATION, PERSISTENT RESERVE IN/OUT, REPORT LUNS,
        // MAINTENANCE IN, MECHANISM STATUS.
        0x00 | 0x03 | 0x12 | 0x25 | 0x46 | 0x4a | 0x5e | 0x5f | 0xa0 | 0xa3 | 0xbd => {
            Access::Always
        }
        0x9e if sa == 0x10 => Access::Always, // READ CAPACITY(16)
        // READs, VERIFYs, PRE-FETCH, GET LBA STATUS, MODE SENSE, READ TOC, READ DISC and
        // TRACK INFORMATION.
        0x08 | 0x28 | 0xa8 | 0x88 | 0x2f | 0xaf | 0x8f | 0x34 | 0x90 | 0x9e | 0x1a | 0x5a
        | 0x43 | 0x51 | 0x52 => Access::Read,
        _ => Access::Write,
    }
}

/// How a command is affected by a reservation it does not hold (SPC-4 5.13.1).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Access {
    /// Never blocked (INQUIRY, REPORT LUNS, the PR commands themselves, ...).
    Always,
    /// Reads the medium: blocked by exclusive access types.
    Read,
    /// Changes the medium or the unit: blocked by every type.
    Write,
}

#[derive(Clone, Debug, Eq, PartialEq)]
struct Holder {
    /// The port that reserved (for all-registrants types, every registrant holds it).
    port: String,
    kind: u8,
}

/// The persistent reservation state of one logical unit.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Reservations {
    generation: u32,
    /// Registered ports and their keys, in order of registration.
    keys: Vec<(String, u64)>,
    holder: Option<Holder>,
}

/// Why a PERSISTENT RESERVE OUT was refused.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Refused {
    /// RESERVATION CONFLICT status: a wrong key, or another holds the reservation.
    Conflict,
    /// CHECK CONDITION with this sense.
    Check(Sense),
}

impl From<Sense> for Refused {
    fn from(s: Sense) -> Refused {
        Refused::Check(s)
    }
}

/// What a PERSISTENT RESERVE OUT changed for other initiators: unit attentions to queue for
/// the nexuses of these ports.
pub type Attentions = Vec<(String, Sense)>;

fn all_registrants(kind: u8) -> bool {
    matches!(kind, kind::WRITE_EXCLUSIVE_AR | kind::EXCLUSIVE_ACCESS_AR)
}

fn registrants_only(kind: u8) -> bool {
    matches!(
        kind,
        kind::WRITE_EXCLUSIVE_RO
            | kind::EXCLUSIVE_ACCESS_RO
            | kind::WRITE_EXCLUSIVE_AR
            | kind::EXCLUSIVE_ACCESS_AR
    )
}

impl Reservations {
    fn key_of(&self, port: &str) -> Option<u64> {
        self.keys.iter().find(|(p, _)| p == port).map(|(_, k)| *k)
    }

    /// Whether a persistent reservation is held.
    pub fn reserved(&self) -> bool {
        self.holder.is_some()
    }

    fn holds(&self, port: &str) -> bool {
        match &self.holder {
            Some(h) if all_registrants(h.kind) => self.key_of(port).is_some(),
            Some(h) => h.port == port,
            None => false,
        }
    }

    /// Whether `port` may run a command of `access`.
    pub fn allows(&self, port: &str, access: Access) -> bool {
        let Some(h) = &self.holder else {
            return true;
        };
        if access == Access::Always || self.holds(port) {
            return true;
        }
        let exclusive = matches!(
            h.kind,
            kind::EXCLUSIVE_ACCESS | kind::EXCLUSIVE_ACCESS_RO | kind::EXCLUSIVE_ACCESS_AR
        );
        if registrants_only(h.kind) && self.key_of(port).is_some() {
            return true;
        }
        access == Access::Read && !exclusive
    }

    /// Unit attentions for every registrant but `except`.
    fn others(&self, except: &str, sense: Sense) -> Attentions {
        self.keys
            .iter()
            .filter(|(p, _)| p != except)
            .map(|(p, _)| (p.clone(), sense))
            .collect()
    }

    /// Removes the registration of `port`; a reservation it held alone goes with it.
    fn unregister(&mut self, port: &str) -> Attentions {
        self.keys.retain(|(p, _)| p != port);
        let mut att = Vec::new();
        let release = match &self.holder {
            Some(h) if all_registrants(h.kind) => self.keys.is_empty(),
            Some(h) => h.port == port,
            None => false,
        };
        if release {
            if let Some(h) = self.holder.take() {
                if registrants_only(h.kind) {
                    att = self.others(port, RESERVATIONS_RELEASED);
                }
            }
        }
        att
    }

    /// PERSISTENT RESERVE IN: READ KEYS, READ RESERVATION, REPORT CAPABILITIES, READ FULL
    /// STATUS.
    pub fn read(&self, cdb: &Cdb<'_>) -> Result<Vec<u8>, Sense> {
        let mut d = self.generation.to_be_bytes().to_vec();
        match cdb.byte(1) & 0x1f {
            0 => {
                d.extend_from_slice(&u32_of(self.keys.len() * 8).to_be_bytes());
                for (_, k) in &self.keys {
                    d.extend_from_slice(&k.to_be_bytes());
                }
            }
            1 => match &self.holder {
                None => d.extend_from_slice(&[0; 4]),
                Some(h) => {
                    d.extend_from_slice(&16u32.to_be_bytes());
                    let key = if all_registrants(h.kind) {
                        0
                    } else {
                        self.key_of(&h.port).unwrap_or(0)
                    };
                    d.extend_from_slice(&key.to_be_bytes());
                    d.extend_from_slice(&[0, 0, 0, 0, 0, h.kind & 0x0f, 0, 0]);
                }
            },
            2 => {
                // Length 8; CRH (RESERVE(6) handled as SPC-4 5.13.3 says); type mask valid,
                // with every type but the obsolete ones.
                d = vec![0, 8, 0x10, 0x80, 0xea, 0x01, 0, 0];
            }
            3 => {
                let mut body = Vec::new();
                for (port, key) in &self.keys {
                    let mut e = key.to_be_bytes().to_vec();
                    e.extend_from_slice(&[0; 4]);
                    let holder = self.holds(port) && self.holder.is_some();
                    e.push(u8::from(holder));
                    e.push(
                        self.holder
                            .as_ref()
                            .filter(|_| holder)
                            .map_or(0, |h| h.kind),
                    );
                    e.extend_from_slice(&[0; 4]);
                    e.extend_from_slice(&1u16.to_be_bytes()); // relative target port 1
                    let id = transport_id(port);
                    e.extend_from_slice(&u32_of(id.len()).to_be_bytes());
                    e.extend_from_slice(&id);
                    body.extend(e);
                }
                d.extend_from_slice(&u32_of(body.len()).to_be_bytes());
                d.extend(body);
            }
            _ => return Err(Sense::invalid_cdb(1, Some(4))),
        }
        Ok(cdb.cut_field(d, 7, 2))
    }

    /// PERSISTENT RESERVE OUT from `port`, with its parameter list `data`.
    pub fn change(
        &mut self,
        port: &str,
        cdb: &Cdb<'_>,
        data: &[u8],
    ) -> Result<Attentions, Refused> {
        let sa = cdb.byte(1) & 0x1f;
        let scope = cdb.byte(2) >> 4;
        let kind = cdb.byte(2) & 0x0f;
        if matches!(sa, 7 | 8) || sa > 8 {
            // REGISTER AND MOVE and REPLACE LOST RESERVATION are not offered.
            return Err(Sense::invalid_cdb(1, Some(4)).into());
        }
        let len = cdb.be32(5) as usize;
        if len != 24 || data.len() < 24 {
            return Err(Sense::PARAMETER_LIST_LENGTH.into());
        }
        let p = Cdb::new(data);
        let key = p.be64(0);
        let sa_key = p.be64(8);
        let flags = p.byte(20);
        if flags & 0x08 != 0 {
            return Err(Sense::invalid_param(20).into()); // SPEC_I_PT (SIP_C is 0)
        }
        if flags & 0x04 != 0 {
            return Err(Sense::invalid_param(20).into()); // ALL_TG_PT (ATP_C is 0)
        }
        if flags & 0x01 != 0 {
            return Err(Sense::invalid_param(20).into()); // APTPL (PTPL_C is 0)
        }
        let needs_type = matches!(sa, 1 | 2 | 4 | 5);
        if needs_type && scope != 0 {
            return Err(Sense::invalid_cdb(2, Some(7)).into());
        }
        if needs_type && !matches!(kind, 1 | 3 | 5 | 6 | 7 | 8) {
            return Err(Sense::invalid_cdb(2, Some(3)).into());
        }
        let mine = self.key_of(port);
        let conflict = Err(Refused::Conflict);
        match sa {
            // REGISTER, REGISTER AND IGNORE EXISTING KEY.
            0 | 6 => {
                if sa == 0 && mine.unwrap_or(0) != key {
                    return conflict;
                }
                let att = match (mine, sa_key) {
                    (None, 0) => return Ok(Vec::new()),
                    (None, k) => {
                        self.keys.push((port.to_owned(), k));
                        Vec::new()
                    }
                    (Some(_), 0) => self.unregister(port),
                    (Some(_), k) => {
                        if let Some(e) = self.keys.iter_mut().find(|(p, _)| p == port) {
                            e.1 = k;
                        }
                        Vec::new()
                    }
                };
                self.generation = self.generation.wrapping_add(1);
                Ok(att)
            }
            // RESERVE.
            1 => {
                if mine != Some(key) {
                    return conflict;
                }
                match &self.holder {
                    None => {
                        self.holder = Some(Holder {
                            port: port.to_owned(),
                            kind,
                        });
                        Ok(Vec::new())
                    }
                    Some(h) if self.holds(port) && h.kind == kind => Ok(Vec::new()),
                    Some(_) => conflict,
                }
            }
            // RELEASE.
            2 => {
                if mine != Some(key) {
                    return conflict;
                }
                match &self.holder {
                    Some(h) if self.holds(port) => {
                        if h.kind != kind {
                            return Err(INVALID_RELEASE.into());
                        }
                        let released = self.holder.take();
                        Ok(match released {
                            Some(h) if registrants_only(h.kind) => {
                                self.others(port, RESERVATIONS_RELEASED)
                            }
                            _ => Vec::new(),
                        })
                    }
                    // Not the holder, or nothing held: nothing to do.
                    _ => Ok(Vec::new()),
                }
            }
            // CLEAR.
            3 => {
                if mine != Some(key) {
                    return conflict;
                }
                let att = self.others(port, RESERVATIONS_PREEMPTED);
                self.keys.clear();
                self.holder = None;
                self.generation = self.generation.wrapping_add(1);
                Ok(att)
            }
            // PREEMPT, PREEMPT AND ABORT.
            _ => {
                if mine != Some(key) {
                    return conflict;
                }
                let att = self.preempt(port, sa_key, kind)?;
                self.generation = self.generation.wrapping_add(1);
                Ok(att)
            }
        }
    }

    fn preempt(&mut self, port: &str, sa_key: u64, kind: u8) -> Result<Attentions, Refused> {
        let victims = |keys: &[(String, u64)], all: bool| -> Vec<String> {
            keys.iter()
                .filter(|(p, k)| p != port && (all || *k == sa_key))
                .map(|(p, _)| p.clone())
                .collect()
        };
        let preempted: Vec<String>;
        match self.holder.clone() {
            Some(h) if all_registrants(h.kind) && sa_key == 0 => {
                // Everyone else goes; the preempting nexus reserves.
                preempted = victims(&self.keys, true);
                self.holder = Some(Holder {
                    port: port.to_owned(),
                    kind,
                });
            }
            Some(h) if !all_registrants(h.kind) && self.key_of(&h.port) == Some(sa_key) => {
                preempted = victims(&self.keys, false);
                self.holder = Some(Holder {
                    port: port.to_owned(),
                    kind,
                });
            }
            _ => {
                if sa_key == 0 {
                    return Err(Sense::invalid_param(8).into());
                }
                preempted = victims(&self.keys, false);
                if preempted.is_empty() && self.keys.iter().all(|(_, k)| *k != sa_key) {
                    return Err(Refused::Conflict);
                }
            }
        }
        self.keys.retain(|(p, _)| !preempted.contains(p));
        Ok(preempted
            .into_iter()
            .map(|p| (p, REGISTRATIONS_PREEMPTED))
            .collect())
    }
}

/// An iSCSI TransportID (SPC-4 7.6.4.6), format 01h (initiator port name), for a port name
/// of the form `name,i,0xISID`; other names get format 00h. Padded to a multiple of 4 with
/// at least one NUL.
fn transport_id(port: &str) -> Vec<u8> {
    let format = if port.contains(",i,0x") { 0x40 } else { 0x00 };
    let mut name = port.as_bytes().to_vec();
    name.push(0);
    name.resize(name.len().div_ceil(4).max(5) * 4, 0);
    let mut id = vec![format | 0x05, 0];
    id.extend_from_slice(&crate::cdb::u16_of(name.len()).to_be_bytes());
    id.extend(name);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(sa: u8, kind: u8, key: u64, sa_key: u64) -> (Vec<u8>, Vec<u8>) {
        let cdb = vec![0x5f, sa, kind, 0, 0, 0, 0, 0, 24, 0];
        let mut data = key.to_be_bytes().to_vec();
        data.extend_from_slice(&sa_key.to_be_bytes());
        data.resize(24, 0);
        (cdb, data)
    }

    fn run(
        r: &mut Reservations,
        port: &str,
        sa: u8,
        kind: u8,
        key: u64,
        sa_key: u64,
    ) -> Result<Attentions, Refused> {
        let (cdb, data) = out(sa, kind, key, sa_key);
        r.change(port, &Cdb::new(&cdb), &data)
    }

    #[test]
    fn register_reserve_and_access() {
        let mut r = Reservations::default();
        run(&mut r, "a", 0, 0, 0, 11).unwrap();
        run(&mut r, "b", 6, 0, 0, 22).unwrap();
        run(&mut r, "a", 1, kind::WRITE_EXCLUSIVE, 11, 0).unwrap();
        assert!(r.allows("a", Access::Write));
        assert!(r.allows("b", Access::Read) && !r.allows("b", Access::Write));
        assert!(r.allows("c", Access::Always));
        // Another's reserve and a wrong key conflict.
        assert!(run(&mut r, "b", 1, kind::WRITE_EXCLUSIVE, 22, 0).is_err());
        assert!(run(&mut r, "a", 1, kind::WRITE_EXCLUSIVE, 99, 0).is_err());
        // Release with another type is invalid; with the right one, it goes.
        assert_eq!(
            run(&mut r, "a", 2, kind::EXCLUSIVE_ACCESS, 11, 0),
            Err(Refused::Check(INVALID_RELEASE))
        );
        run(&mut r, "a", 2, kind::WRITE_EXCLUSIVE, 11, 0).unwrap();
        assert!(r.allows("b", Access::Write));
    }

    #[test]
    fn registrants_only_lets_registrants_in_and_unregistering_releases() {
        let mut r = Reservations::default();
        run(&mut r, "a", 6, 0, 0, 1).unwrap();
        run(&mut r, "b", 6, 0, 0, 2).unwrap();
        run(&mut r, "a", 1, kind::EXCLUSIVE_ACCESS_RO, 1, 0).unwrap();
        assert!(r.allows("b", Access::Write));
        assert!(!r.allows("c", Access::Read));
        let att = run(&mut r, "a", 0, 0, 1, 0).unwrap();
        assert!(
            !r.reserved(),
            "the holder's unregistration releases RO types"
        );
        assert_eq!(att, vec![("b".to_owned(), RESERVATIONS_RELEASED)]);
    }

    #[test]
    fn all_registrants_reservations_survive_the_reserving_nexus() {
        let mut r = Reservations::default();
        run(&mut r, "a", 6, 0, 0, 1).unwrap();
        run(&mut r, "b", 6, 0, 0, 2).unwrap();
        run(&mut r, "a", 1, kind::WRITE_EXCLUSIVE_AR, 1, 0).unwrap();
        run(&mut r, "a", 0, 0, 1, 0).unwrap();
        assert!(r.reserved());
        assert!(r.holds("b"));
        run(&mut r, "b", 2, kind::WRITE_EXCLUSIVE_AR, 2, 0).unwrap();
        assert!(!r.reserved());
    }

    #[test]
    fn preempt_takes_the_reservation_and_the_victims_registration() {
        let mut r = Reservations::default();
        run(&mut r, "a", 6, 0, 0, 1).unwrap();
        run(&mut r, "b", 6, 0, 0, 2).unwrap();
        run(&mut r, "a", 1, kind::EXCLUSIVE_ACCESS, 1, 0).unwrap();
        let att = run(&mut r, "b", 4, kind::EXCLUSIVE_ACCESS, 2, 1).unwrap();
        assert_eq!(att, vec![("a".to_owned(), REGISTRATIONS_PREEMPTED)]);
        assert!(r.holds("b") && r.key_of("a").is_none());
    }

    #[test]
    fn read_keys_and_reservation() {
        let mut r = Reservations::default();
        run(&mut r, "a", 6, 0, 0, 0x0102).unwrap();
        run(&mut r, "a", 1, kind::WRITE_EXCLUSIVE, 0x0102, 0).unwrap();
        let keys = r
            .read(&Cdb::new(&[0x5e, 0, 0, 0, 0, 0, 0, 0, 100, 0]))
            .unwrap();
        assert_eq!(&keys[4..8], &[0, 0, 0, 8]);
        assert_eq!(&keys[8..16], &0x0102u64.to_be_bytes());
        let res = r
            .read(&Cdb::new(&[0x5e, 1, 0, 0, 0, 0, 0, 0, 100, 0]))
            .unwrap();
        assert_eq!(res.len(), 24);
        assert_eq!(res[21], kind::WRITE_EXCLUSIVE);
        assert!(r
            .read(&Cdb::new(&[0x5e, 9, 0, 0, 0, 0, 0, 0, 100, 0]))
            .is_err());
    }

    #[test]
    fn unsupported_options_and_bad_lengths_are_refused() {
        let mut r = Reservations::default();
        let (cdb, mut data) = out(0, 0, 0, 5);
        data[20] = 0x01; // APTPL
        assert!(r.change("a", &Cdb::new(&cdb), &data).is_err());
        let mut cdb = cdb;
        cdb[8] = 20;
        assert_eq!(
            r.change("a", &Cdb::new(&cdb), &data),
            Err(Refused::Check(Sense::PARAMETER_LIST_LENGTH))
        );
    }
}
