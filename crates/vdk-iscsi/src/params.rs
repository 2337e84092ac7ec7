//! Operational parameters (RFC 7143 section 13) and how the target answers each key.
//!
//! The result functions of the RFC decide every answer: for a numerical *min* key the target
//! answers the smaller of the offer and its own limit, for a Boolean *OR* key it answers
//! `No` when it can live with either value (so the result is the initiator's), and so on.
//! Declarative keys (MaxRecvDataSegmentLength, names, aliases) get no answer.

use std::fmt;

/// What the target can do, which bounds every negotiated value.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Limits {
    /// The longest data segment the target takes (its MaxRecvDataSegmentLength).
    pub max_recv_data_segment: u32,
    /// The longest burst of data the target takes or sends in one sequence.
    pub max_burst: u32,
    /// The most unsolicited data the target takes per command.
    pub first_burst: u32,
    /// The most R2Ts the target keeps outstanding per task.
    pub max_outstanding_r2t: u32,
    /// The most connections of one session.
    pub max_connections: u16,
    /// Whether the target offers CRC32C digests.
    pub digests: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_recv_data_segment: 256 << 10,
            max_burst: 16 << 20,
            first_burst: 16 << 20,
            max_outstanding_r2t: 16,
            max_connections: 4,
            digests: true,
        }
    }
}

/// Negotiated parameters, starting from the RFC's defaults. The session-wide ones are settled
/// on a session's leading connection; the digests and data segment lengths are per connection.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Params {
    /// CRC32C header digests.
    pub header_digest: bool,
    /// CRC32C data digests.
    pub data_digest: bool,
    /// The longest data segment the target may send (the initiator's declaration).
    pub send_data_segment: u32,
    /// The longest data segment the target takes (its own declaration).
    pub recv_data_segment: u32,
    /// Writes wait for an R2T before any data (no unsolicited Data-Out).
    pub initial_r2t: bool,
    /// Data may come in the command PDU itself.
    pub immediate_data: bool,
    /// The most data of one solicited sequence or Data-In burst.
    pub max_burst: u32,
    /// The most unsolicited data per command.
    pub first_burst: u32,
    /// The most R2Ts outstanding per task.
    pub max_outstanding_r2t: u32,
    /// The most connections per session.
    pub max_connections: u16,
    /// DataPDUInOrder.
    pub data_pdu_in_order: bool,
    /// DataSequenceInOrder.
    pub data_sequence_in_order: bool,
    /// DefaultTime2Wait, seconds.
    pub time2wait: u16,
    /// DefaultTime2Retain, seconds.
    pub time2retain: u16,
    /// ErrorRecoveryLevel (always 0 here).
    pub error_recovery_level: u8,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            header_digest: false,
            data_digest: false,
            send_data_segment: 8192,
            recv_data_segment: 8192,
            initial_r2t: true,
            immediate_data: true,
            max_burst: 262_144,
            first_burst: 65_536,
            max_outstanding_r2t: 1,
            max_connections: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            time2wait: 2,
            time2retain: 20,
            error_recovery_level: 0,
        }
    }
}

/// How the target answers one key.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Answer {
    /// `key=value`.
    Value(String),
    /// Nothing: a declarative key, or one handled elsewhere.
    Silent,
    /// `key=NotUnderstood`.
    NotUnderstood,
    /// `key=Irrelevant`: the key does not apply here (a session key in a discovery session).
    Irrelevant,
    /// `key=Reject`: the value is not valid.
    Reject,
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Answer::Value(v) => f.write_str(v),
            Answer::Silent => Ok(()),
            Answer::NotUnderstood => f.write_str("NotUnderstood"),
            Answer::Irrelevant => f.write_str("Irrelevant"),
            Answer::Reject => f.write_str("Reject"),
        }
    }
}

/// Where a key is being negotiated.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Context {
    /// A discovery session: data transfer keys do not apply.
    pub discovery: bool,
    /// The session's first connection: session-wide keys are settled here only.
    pub leading: bool,
}

/// Largest value of the 24-bit length keys (2^24 - 1).
const MAX_LENGTH_KEY: u32 = (1 << 24) - 1;
/// Smallest value of the length keys.
const MIN_LENGTH_KEY: u32 = 512;

fn number(v: &str) -> Option<u64> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) && v.len() <= 20 {
        v.parse().ok()
    } else {
        None
    }
}

fn boolean(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yes_no(b: bool) -> Answer {
    Answer::Value(if b { "Yes" } else { "No" }.into())
}

/// A number in `lo..=hi`, or None.
fn ranged(v: &str, lo: u64, hi: u64) -> Option<u32> {
    number(v)
        .filter(|n| (lo..=hi).contains(n))
        .and_then(|n| u32::try_from(n).ok())
}

impl Params {
    /// Answers one operational key the initiator offered and records the result. Keys this
    /// module does not know are `NotUnderstood` (the login module handles names and
    /// security keys before calling this).
    pub fn negotiate(&mut self, key: &str, value: &str, limits: &Limits, cx: Context) -> Answer {
        let session_key = matches!(
            key,
            "InitialR2T"
                | "ImmediateData"
                | "MaxBurstLength"
                | "FirstBurstLength"
                | "MaxOutstandingR2T"
                | "MaxConnections"
                | "DataPDUInOrder"
                | "DataSequenceInOrder"
                | "DefaultTime2Wait"
                | "DefaultTime2Retain"
                | "ErrorRecoveryLevel"
        );
        let data_key = matches!(
            key,
            "InitialR2T"
                | "ImmediateData"
                | "MaxBurstLength"
                | "FirstBurstLength"
                | "MaxOutstandingR2T"
                | "DataPDUInOrder"
                | "DataSequenceInOrder"
        );
        if session_key && (!cx.leading || (cx.discovery && data_key)) {
            return Answer::Irrelevant;
        }
        match key {
            "HeaderDigest" | "DataDigest" => {
                let offered: Vec<&str> = value.split(',').collect();
                // The first of the initiator's list that the target supports.
                let pick = offered
                    .iter()
                    .find(|d| **d == "None" || (**d == "CRC32C" && limits.digests));
                match pick {
                    Some(d) => {
                        let on = *d == "CRC32C";
                        if key == "HeaderDigest" {
                            self.header_digest = on;
                        } else {
                            self.data_digest = on;
                        }
                        Answer::Value((*d).to_owned())
                    }
                    None => Answer::Reject,
                }
            }
            "MaxRecvDataSegmentLength" => match ranged(value, 512, u64::from(MAX_LENGTH_KEY)) {
                Some(n) => {
                    self.send_data_segment = n;
                    Answer::Silent
                }
                None => Answer::Reject,
            },
            "InitialR2T" => match boolean(value) {
                // OR: answering No leaves the initiator's choice.
                Some(b) => {
                    self.initial_r2t = b;
                    yes_no(false)
                }
                None => Answer::Reject,
            },
            "ImmediateData" => match boolean(value) {
                // AND: answering Yes leaves the initiator's choice.
                Some(b) => {
                    self.immediate_data = b;
                    yes_no(true)
                }
                None => Answer::Reject,
            },
            "DataPDUInOrder" | "DataSequenceInOrder" => match boolean(value) {
                // OR: the target answers Yes, so the result is Yes whatever was offered.
                Some(_) => yes_no(true),
                None => Answer::Reject,
            },
            "MaxBurstLength" => {
                match ranged(value, u64::from(MIN_LENGTH_KEY), u64::from(MAX_LENGTH_KEY)) {
                    Some(n) => {
                        self.max_burst = n.min(limits.max_burst);
                        self.first_burst = self.first_burst.min(self.max_burst);
                        Answer::Value(self.max_burst.to_string())
                    }
                    None => Answer::Reject,
                }
            }
            "FirstBurstLength" => {
                match ranged(value, u64::from(MIN_LENGTH_KEY), u64::from(MAX_LENGTH_KEY)) {
                    Some(n) => {
                        self.first_burst = n.min(limits.first_burst).min(self.max_burst);
                        Answer::Value(self.first_burst.to_string())
                    }
                    None => Answer::Reject,
                }
            }
            "MaxOutstandingR2T" => match ranged(value, 1, 65535) {
                Some(n) => {
                    self.max_outstanding_r2t = n.min(limits.max_outstanding_r2t);
                    Answer::Value(self.max_outstanding_r2t.to_string())
                }
                None => Answer::Reject,
            },
            "MaxConnections" => match ranged(value, 1, 65535) {
                Some(n) => {
                    let n = u16::try_from(n).unwrap_or(u16::MAX);
                    self.max_connections = n.min(limits.max_connections);
                    Answer::Value(self.max_connections.to_string())
                }
                None => Answer::Reject,
            },
            "DefaultTime2Wait" => match ranged(value, 0, 3600) {
                // max
                Some(n) => {
                    let n = u16::try_from(n).unwrap_or(3600);
                    self.time2wait = n.max(2);
                    Answer::Value(self.time2wait.to_string())
                }
                None => Answer::Reject,
            },
            "DefaultTime2Retain" => match ranged(value, 0, 3600) {
                // min: nothing is retained at ErrorRecoveryLevel 0.
                Some(_) => {
                    self.time2retain = 0;
                    Answer::Value("0".into())
                }
                None => Answer::Reject,
            },
            "ErrorRecoveryLevel" => match ranged(value, 0, 2) {
                Some(_) => {
                    self.error_recovery_level = 0;
                    Answer::Value("0".into())
                }
                None => Answer::Reject,
            },
            // Markers were dropped by RFC 7143; older initiators still offer them (AND).
            "IFMarker" | "OFMarker" => match boolean(value) {
                Some(_) => yes_no(false),
                None => Answer::Reject,
            },
            "IFMarkInt" | "OFMarkInt" => Answer::Irrelevant,
            "TaskReporting" => Answer::Value("RFC3720".into()),
            _ => Answer::NotUnderstood,
        }
    }

    /// Applies the target's own declarations at the end of a negotiation: the target's
    /// MaxRecvDataSegmentLength.
    pub fn declare(&mut self, limits: &Limits) {
        self.recv_data_segment = limits.max_recv_data_segment;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NORMAL: Context = Context {
        discovery: false,
        leading: true,
    };

    fn answer(p: &mut Params, k: &str, v: &str) -> String {
        p.negotiate(k, v, &Limits::default(), NORMAL).to_string()
    }

    #[test]
    fn digests_take_the_first_supported_offer() {
        let mut p = Params::default();
        assert_eq!(answer(&mut p, "HeaderDigest", "CRC32C,None"), "CRC32C");
        assert!(p.header_digest);
        assert_eq!(answer(&mut p, "DataDigest", "None,CRC32C"), "None");
        assert!(!p.data_digest);
        assert_eq!(answer(&mut p, "DataDigest", "MD5"), "Reject");
    }

    #[test]
    fn digests_are_refused_when_turned_off() {
        let mut p = Params::default();
        let limits = Limits {
            digests: false,
            ..Limits::default()
        };
        let a = p.negotiate("HeaderDigest", "CRC32C,None", &limits, NORMAL);
        assert_eq!(a, Answer::Value("None".into()));
        let a = p.negotiate("HeaderDigest", "CRC32C", &limits, NORMAL);
        assert_eq!(a, Answer::Reject);
    }

    #[test]
    fn min_keys_answer_the_smaller_value() {
        let mut p = Params::default();
        assert_eq!(answer(&mut p, "MaxBurstLength", "99999999"), "Reject");
        assert_eq!(answer(&mut p, "MaxBurstLength", "262144"), "262144");
        assert_eq!(answer(&mut p, "FirstBurstLength", "16777215"), "262144");
        assert_eq!(answer(&mut p, "MaxOutstandingR2T", "100"), "16");
        assert_eq!(p.max_outstanding_r2t, 16);
    }

    #[test]
    fn boolean_keys_leave_the_initiator_choice() {
        let mut p = Params::default();
        assert_eq!(answer(&mut p, "InitialR2T", "No"), "No");
        assert!(!p.initial_r2t);
        assert_eq!(answer(&mut p, "ImmediateData", "No"), "Yes");
        assert!(!p.immediate_data);
        assert_eq!(answer(&mut p, "ImmediateData", "Maybe"), "Reject");
    }

    #[test]
    fn data_keys_are_irrelevant_in_discovery() {
        let mut p = Params::default();
        let cx = Context {
            discovery: true,
            leading: true,
        };
        let a = p.negotiate("InitialR2T", "No", &Limits::default(), cx);
        assert_eq!(a, Answer::Irrelevant);
        let a = p.negotiate("MaxRecvDataSegmentLength", "65536", &Limits::default(), cx);
        assert_eq!(a, Answer::Silent);
        assert_eq!(p.send_data_segment, 65536);
    }

    #[test]
    fn unknown_keys_are_not_understood() {
        let mut p = Params::default();
        assert_eq!(answer(&mut p, "X-com.example.Thing", "1"), "NotUnderstood");
    }
}
