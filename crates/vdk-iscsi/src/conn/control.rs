//! What a connection answers itself, on its reader thread: NOP-Out, Task Management, Text
//! (SendTargets) and Logout.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::info;
use vdk_core::sync;

use super::{Flow, Reader, Stat};
use crate::pdu::request::{LogoutRequest, NopOut, TaskManagement, TextRequest};
use crate::pdu::response::{self, Numbers};
use crate::pdu::{reject, Bhs, RESERVED_TAG};
use crate::session::{lock, Kind};
use crate::text::{self, TextBuffer};

/// Task management functions (RFC 7143 11.5.1) and responses (11.6.1).
mod tmf {
    pub const ABORT_TASK: u8 = 1;
    pub const ABORT_TASK_SET: u8 = 2;
    pub const CLEAR_ACA: u8 = 3;
    pub const CLEAR_TASK_SET: u8 = 4;
    pub const LUN_RESET: u8 = 5;
    pub const TARGET_WARM_RESET: u8 = 6;
    pub const TARGET_COLD_RESET: u8 = 7;
    pub const TASK_REASSIGN: u8 = 8;

    pub const COMPLETE: u8 = 0;
    pub const NO_TASK: u8 = 1;
    pub const NO_LUN: u8 = 2;
    pub const NO_REASSIGNMENT: u8 = 4;
    pub const NOT_SUPPORTED: u8 = 5;
}

/// A text response too long for one PDU, sent in pieces.
#[derive(Debug)]
pub(super) struct PendingText {
    itt: u32,
    ttt: u32,
    rest: Vec<u8>,
}

impl Reader<'_> {
    pub(super) fn nop_out(&mut self, n: &NopOut, data: &[u8]) {
        if !self.accept(n.immediate || n.itt == RESERVED_TAG, n.cmd_sn) {
            return;
        }
        self.conn
            .complete_window(!n.immediate && n.itt != RESERVED_TAG);
        if n.itt == RESERVED_TAG {
            return; // the answer to a ping of ours
        }
        let ping = &data[..data.len().min(self.conn.send_segment)];
        let bhs = response::nop_in(n.lun, n.itt, RESERVED_TAG, Numbers::default());
        let _ = self.conn.send_one(bhs, ping, Stat::Take);
    }

    pub(super) fn task_management(&mut self, t: &TaskManagement) -> Flow {
        let conn = self.conn;
        if !self.accept(t.immediate, t.cmd_sn) {
            return Flow::Continue;
        }
        let target = conn.target().map(|t| Arc::clone(&t.luns));
        let lun_exists = target
            .as_ref()
            .and_then(|s| vdk_scsi::decode_lun(t.lun).and_then(|n| s.lun(n)))
            .is_some();
        let mut close = false;
        let response = match t.function {
            tmf::ABORT_TASK => {
                if self.abort(|itt, _| itt == t.referenced_tag) {
                    tmf::COMPLETE
                } else {
                    tmf::NO_TASK
                }
            }
            tmf::ABORT_TASK_SET | tmf::CLEAR_TASK_SET => {
                self.abort(|_, lun| lun == t.lun);
                tmf::COMPLETE
            }
            tmf::CLEAR_ACA => tmf::COMPLETE,
            tmf::LUN_RESET if !lun_exists => tmf::NO_LUN,
            tmf::LUN_RESET => {
                self.abort(|_, lun| lun == t.lun);
                if let Some(s) = &target {
                    s.lun_reset(t.lun);
                }
                tmf::COMPLETE
            }
            tmf::TARGET_WARM_RESET | tmf::TARGET_COLD_RESET => {
                self.abort(|_, _| true);
                if let Some(s) = &target {
                    s.reset();
                }
                close = t.function == tmf::TARGET_COLD_RESET;
                tmf::COMPLETE
            }
            tmf::TASK_REASSIGN => tmf::NO_REASSIGNMENT,
            _ => tmf::NOT_SUPPORTED,
        };
        info!(function = t.function, response, "task management");
        conn.complete_window(!t.immediate);
        let bhs = response::task_mgmt_response(t.itt, response, Numbers::default());
        let _ = conn.send_one(bhs, &[], Stat::Take);
        if close {
            Flow::Close
        } else {
            Flow::Continue
        }
    }

    /// Aborts the tasks `pick` chooses (by tag and LUN): writes still receiving are dropped,
    /// running ones will not answer, and this returns once none of them is left. True if any
    /// task was picked.
    fn abort(&mut self, pick: impl Fn(u32, [u8; 8]) -> bool) -> bool {
        let conn = self.conn;
        let receiving: Vec<u32> = self
            .writes
            .iter()
            .filter(|(itt, w)| pick(**itt, w.cmd.lun))
            .map(|(itt, _)| *itt)
            .collect();
        for itt in &receiving {
            if let Some(w) = self.writes.remove(itt) {
                conn.complete_window(!w.cmd.immediate);
                self.bury(*itt);
            }
        }
        let mut active = lock(&conn.active);
        let running: Vec<u32> = active
            .iter()
            .filter(|(itt, a)| pick(**itt, a.lun))
            .map(|(itt, a)| {
                a.aborted.store(true, Ordering::SeqCst);
                *itt
            })
            .collect();
        while running.iter().any(|itt| active.contains_key(itt)) {
            active = sync::wait(&conn.settled, active);
        }
        !receiving.is_empty() || !running.is_empty()
    }

    pub(super) fn text(&mut self, t: &TextRequest, data: &[u8], bhs: &Bhs) {
        let conn = self.conn;
        if !self.accept(t.immediate, t.cmd_sn) {
            return;
        }
        conn.complete_window(!t.immediate);
        if t.ttt != RESERVED_TAG {
            // The initiator asks for the next piece of a long response.
            match self.text_out.take() {
                Some(p) if p.ttt == t.ttt && p.itt == t.itt => self.send_text(t.itt, p.rest),
                _ => conn.reject(reject::INVALID_PDU_FIELD, bhs),
            }
            return;
        }
        // A new request resets any response in progress.
        self.text_out = None;
        let (itt, mut buf) = match self.text_in.take() {
            Some((itt, b)) if itt == t.itt => (itt, b),
            _ => (t.itt, TextBuffer::default()),
        };
        if buf.push(data).is_err() {
            conn.reject(reject::PROTOCOL_ERROR, bhs);
            return;
        }
        if t.cont {
            self.text_in = Some((itt, buf));
            let bhs = response::text_response(false, false, itt, RESERVED_TAG, Numbers::default());
            let _ = conn.send_one(bhs, &[], Stat::Take);
            return;
        }
        let Ok(pairs) = text::parse(&buf.take()) else {
            conn.reject(reject::PROTOCOL_ERROR, bhs);
            return;
        };
        let mut out: Vec<(String, String)> = Vec::new();
        for (k, v) in pairs {
            match k.as_str() {
                "SendTargets" => out.extend(self.send_targets(&v)),
                "MaxRecvDataSegmentLength" => {} // kept as negotiated at login
                _ => out.push((k, "NotUnderstood".into())),
            }
        }
        self.send_text(itt, text::encode(&out));
    }

    fn send_targets(&self, which: &str) -> Vec<(String, String)> {
        let conn = self.conn;
        let Some(server) = conn.server.upgrade() else {
            return Vec::new();
        };
        let initiator = &conn.session.initiator;
        match (&conn.session.kind, which) {
            (Kind::Discovery, "All") => server.send_targets(initiator, None, conn.local),
            (Kind::Discovery, "") => Vec::new(),
            (Kind::Normal(t), "") => server.send_targets(initiator, Some(&t.name), conn.local),
            (_, "All") => vec![("SendTargets".into(), "Reject".into())],
            (_, name) => server.send_targets(initiator, Some(name), conn.local),
        }
    }

    /// Sends a text response, in pieces of at most the initiator's segment length.
    fn send_text(&mut self, itt: u32, mut text: Vec<u8>) {
        let conn = self.conn;
        if text.len() > conn.send_segment {
            let rest = text.split_off(conn.send_segment);
            let ttt = self.new_ttt();
            self.text_out = Some(PendingText { itt, ttt, rest });
            let bhs = response::text_response(false, true, itt, ttt, Numbers::default());
            let _ = conn.send_one(bhs, &text, Stat::Take);
        } else {
            let bhs = response::text_response(true, false, itt, RESERVED_TAG, Numbers::default());
            let _ = conn.send_one(bhs, &text, Stat::Take);
        }
    }

    pub(super) fn logout(&mut self, l: &LogoutRequest) -> Flow {
        let conn = self.conn;
        if !self.accept(l.immediate, l.cmd_sn) {
            return Flow::Continue;
        }
        let (response, close_self) = match l.reason {
            0 => (0, true),
            1 if l.cid == conn.cid => (0, true),
            1 => {
                let other = lock(&conn.session.conns)
                    .iter()
                    .find(|c| c.cid == l.cid)
                    .cloned();
                match other {
                    Some(c) => {
                        c.close();
                        (0, false)
                    }
                    None => (1, false),
                }
            }
            _ => (2, false),
        };
        if close_self {
            // Commands already received finish before the logout is answered; writes still
            // waiting for data are dropped.
            for (_, w) in self.writes.drain() {
                conn.complete_window(!w.cmd.immediate);
            }
            let mut active = lock(&conn.active);
            while !active.is_empty() {
                active = sync::wait(&conn.settled, active);
            }
        }
        if l.reason == 0 {
            for c in lock(&conn.session.conns).iter() {
                if !Arc::ptr_eq(c, conn) {
                    c.close();
                }
            }
        }
        // A session that ends releases what its nexus held (a RESERVE(6) reservation) before
        // the logout is answered: the initiator may log in again at once and find it free.
        let session_ends = l.reason == 0 || (close_self && lock(&conn.session.conns).len() <= 1);
        if session_ends {
            if let Kind::Normal(t) = &conn.session.kind {
                t.luns.nexus_lost(conn.session.nexus);
            }
        }
        conn.complete_window(!l.immediate);
        let bhs = response::logout_response(l.itt, response, Numbers::default());
        let _ = conn.send_one(bhs, &[], Stat::Take);
        info!(reason = l.reason, "iSCSI logout");
        if close_self {
            Flow::Close
        } else {
            Flow::Continue
        }
    }
}
