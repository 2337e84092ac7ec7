//! Sessions: the I_T nexus of one initiator port and one target, over one or more
//! connections, and its command window.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use crate::conn::Conn;
use crate::params::Params;
use crate::pdu::response::Numbers;
use crate::pdu::sn_lt;
use crate::server::Target;

pub(crate) use vdk_core::sync::lock;

/// The command window of a session (RFC 7143 4.2.2.1): which CmdSNs the target accepts.
///
/// Commands are served as they arrive (every task is SIMPLE here), so a command ahead of a
/// gap is not held back; ExpCmdSN moves over every CmdSN received in a row. MaxCmdSN moves
/// as commands complete, so that at most `depth` non-immediate commands are ever in flight.
#[derive(Debug)]
pub(crate) struct Window {
    exp: u32,
    max: u32,
    ahead: BTreeSet<u32>,
}

impl Window {
    /// A window starting at `first` (the CmdSN of the leading login) `depth` commands wide.
    pub fn new(first: u32, depth: u32) -> Window {
        Window {
            exp: first,
            max: first.wrapping_add(depth.max(1) - 1),
            ahead: BTreeSet::new(),
        }
    }

    /// Takes a non-immediate command numbered `sn`: true if it is in the window and new,
    /// false if it must be ignored (outside the window, or a duplicate).
    pub fn accept(&mut self, sn: u32) -> bool {
        if sn_lt(self.max, sn) {
            return false;
        }
        if sn == self.exp {
            self.exp = self.exp.wrapping_add(1);
            while self.ahead.remove(&self.exp) {
                self.exp = self.exp.wrapping_add(1);
            }
            true
        } else if sn_lt(self.exp, sn) {
            self.ahead.insert(sn)
        } else {
            false
        }
    }

    /// A non-immediate command completed: the window moves one on.
    pub fn complete(&mut self) {
        self.max = self.max.wrapping_add(1);
    }

    /// ExpCmdSN and MaxCmdSN, with `stat_sn`.
    pub fn numbers(&self, stat_sn: u32) -> Numbers {
        Numbers {
            stat_sn,
            exp_cmd_sn: self.exp,
            max_cmd_sn: self.max,
        }
    }
}

/// What a session is logged in to.
#[derive(Debug)]
pub(crate) enum Kind {
    Discovery,
    Normal(Arc<Target>),
}

/// A logged-in session.
#[derive(Debug)]
pub(crate) struct Session {
    pub tsih: u16,
    pub isid: [u8; 6],
    pub initiator: String,
    /// The initiator port's name, `InitiatorName,i,0xISID` (RFC 7143 4.2.7.1): what
    /// persistent reservations are registered to.
    pub port: String,
    pub kind: Kind,
    /// The I_T nexus number the SCSI layer tells initiators apart by.
    pub nexus: u64,
    /// The session-wide parameters settled on the leading connection.
    pub params: Params,
    pub window: Mutex<Window>,
    pub conns: Mutex<Vec<Arc<Conn>>>,
}

impl Session {
    /// The target's name, or None for a discovery session.
    pub fn target_name(&self) -> Option<&str> {
        match &self.kind {
            Kind::Normal(t) => Some(&t.name),
            Kind::Discovery => None,
        }
    }

    /// The session's numbers for a PDU with `stat_sn`.
    pub fn numbers(&self, stat_sn: u32) -> Numbers {
        lock(&self.window).numbers(stat_sn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_commands_move_exp_cmd_sn() {
        let mut w = Window::new(5, 4);
        assert!(w.accept(5));
        assert!(w.accept(6));
        assert_eq!(w.numbers(0).exp_cmd_sn, 7);
        assert_eq!(w.numbers(0).max_cmd_sn, 8);
    }

    #[test]
    fn commands_outside_the_window_are_ignored() {
        let mut w = Window::new(5, 4);
        assert!(!w.accept(9), "past MaxCmdSN");
        assert!(!w.accept(4), "before ExpCmdSN");
        assert!(w.accept(5));
        assert!(!w.accept(5), "a duplicate");
    }

    #[test]
    fn a_gap_is_filled_later() {
        let mut w = Window::new(0, 8);
        assert!(w.accept(1));
        assert_eq!(w.numbers(0).exp_cmd_sn, 0);
        assert!(!w.accept(1));
        assert!(w.accept(0));
        assert_eq!(w.numbers(0).exp_cmd_sn, 2);
    }

    #[test]
    fn completions_open_the_window_and_wrap() {
        let mut w = Window::new(u32::MAX, 1);
        assert!(w.accept(u32::MAX));
        assert!(!w.accept(0), "window full until a completion");
        w.complete();
        assert!(w.accept(0));
        assert_eq!(w.numbers(0).max_cmd_sn, 0);
    }
}
