//! The login phase of one connection (RFC 7143 section 6), as a state machine with no I/O:
//! [`Login::step`] takes each Login Request and says what to answer.
//!
//! ```text
//!   SecurityNegotiation (0) ──T──► LoginOperationalNegotiation (1) ──T──► FullFeaturePhase (3)
//!          └──────────────────────────────T───────────────────────────────────┘
//! ```
//!
//! The security stage runs CHAP when the target asks for it: AuthMethod=CHAP, CHAP_A=5, then
//! CHAP_N and CHAP_R checked against the target's credentials (and, for mutual CHAP, the
//! target's own CHAP_N and CHAP_R sent back). The operational stage answers each key with
//! [`Params::negotiate`] and declares the target's MaxRecvDataSegmentLength. A connection that
//! starts in the operational stage skips authentication, which only a target without CHAP
//! allows.

use crate::chap::{self, Credentials};
use crate::params::{Answer, Context, Limits, Params};
use crate::pdu::response::Stages;
use crate::pdu::LoginRequest;
use crate::text::{self, TextBuffer};

/// Login status codes (RFC 7143 11.13.5): Status-Class in the high byte.
pub mod status {
    /// Success.
    pub const SUCCESS: u16 = 0x0000;
    /// Miscellaneous initiator error.
    pub const INITIATOR_ERROR: u16 = 0x0200;
    /// The initiator could not be authenticated.
    pub const AUTHENTICATION_FAILURE: u16 = 0x0201;
    /// The initiator may not use this target.
    pub const AUTHORIZATION_FAILURE: u16 = 0x0202;
    /// No such target.
    pub const NOT_FOUND: u16 = 0x0203;
    /// The target was removed.
    pub const TARGET_REMOVED: u16 = 0x0204;
    /// No version in common.
    pub const UNSUPPORTED_VERSION: u16 = 0x0205;
    /// The session has all the connections it may have.
    pub const TOO_MANY_CONNECTIONS: u16 = 0x0206;
    /// A key that must be sent was not.
    pub const MISSING_PARAMETER: u16 = 0x0207;
    /// The connection cannot join that session.
    pub const CANNOT_INCLUDE: u16 = 0x0208;
    /// The session type is not supported.
    pub const SESSION_TYPE_UNSUPPORTED: u16 = 0x0209;
    /// The TSIH names no session.
    pub const SESSION_DOES_NOT_EXIST: u16 = 0x020a;
    /// The request is not valid at this point of the login.
    pub const INVALID_DURING_LOGIN: u16 = 0x020b;
    /// The target failed.
    pub const TARGET_ERROR: u16 = 0x0300;
    /// The target is going away.
    pub const SERVICE_UNAVAILABLE: u16 = 0x0301;
    /// The target is out of resources.
    pub const OUT_OF_RESOURCES: u16 = 0x0302;
}

/// Login stages (CSG and NSG values).
pub mod stage {
    /// SecurityNegotiation.
    pub const SECURITY: u8 = 0;
    /// LoginOperationalNegotiation.
    pub const OPERATIONAL: u8 = 1;
    /// FullFeaturePhase.
    pub const FULL_FEATURE: u8 = 3;
}

/// Who may log in to a target, and how.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Auth {
    /// The credentials an initiator must prove with CHAP. None: no authentication.
    pub chap: Option<Credentials>,
    /// The target's own credentials, for initiators that ask for mutual CHAP.
    pub mutual: Option<Credentials>,
    /// Initiator names allowed in (empty: any).
    pub initiators: Vec<String>,
}

/// What the login needs to know about targets.
pub trait Directory {
    /// The authentication settings and alias of the target `name`, or None if there is none.
    fn target(&self, name: &str) -> Option<(Auth, Option<String>)>;
    /// The authentication settings of discovery sessions.
    fn discovery(&self) -> Auth;
}

/// The kind of session being logged in to.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum SessionKind {
    /// SendTargets only.
    Discovery,
    /// A session with the named target.
    Normal(String),
}

/// A Login Response to send.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Reply {
    /// The stage fields.
    pub stages: Stages,
    /// Status-Class and Status-Detail.
    pub status: u16,
    /// Text data.
    pub text: Vec<u8>,
}

/// What to do after a Login Request.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Step {
    /// Send the reply and read the next Login Request.
    Continue(Reply),
    /// Send the reply (T=1 to Full Feature Phase): the connection is logged in.
    Complete(Reply),
    /// Send the reply (an error status) and close the connection.
    Fail(Reply),
}

#[derive(Clone, Debug, Eq, PartialEq)]
enum Chap {
    /// CHAP not started.
    Idle,
    /// AuthMethod=CHAP answered; waiting for CHAP_A.
    Chosen,
    /// Challenge sent; waiting for CHAP_N and CHAP_R.
    Challenged { id: u8, challenge: Vec<u8> },
}

/// The login of one connection.
#[derive(Debug)]
pub struct Login {
    limits: Limits,
    portal_group: u16,
    stage: Option<u8>,
    params: Params,
    leading: bool,
    initiator: Option<String>,
    initiator_alias: Option<String>,
    target: Option<String>,
    kind: Option<SessionKind>,
    auth: Auth,
    alias: Option<String>,
    chap: Chap,
    authenticated: bool,
    text: TextBuffer,
    declared: bool,
    first_request: Option<LoginRequest>,
}

/// Why a login failed, with the status to answer.
struct Failure(u16);

type Pairs = Vec<(String, String)>;

impl Login {
    /// A login for a new connection on a portal of group `portal_group`.
    pub fn new(limits: Limits, portal_group: u16) -> Login {
        Login {
            limits,
            portal_group,
            stage: None,
            params: Params::default(),
            leading: true,
            initiator: None,
            initiator_alias: None,
            target: None,
            kind: None,
            auth: Auth::default(),
            alias: None,
            chap: Chap::Idle,
            authenticated: false,
            text: TextBuffer::default(),
            declared: false,
            first_request: None,
        }
    }

    /// The parameters negotiated so far (all of them once the login is complete).
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// The session kind, once the first request has named it.
    pub fn kind(&self) -> Option<&SessionKind> {
        self.kind.as_ref()
    }

    /// The InitiatorName, once sent.
    pub fn initiator(&self) -> Option<&str> {
        self.initiator.as_deref()
    }

    /// The InitiatorAlias, if sent.
    pub fn initiator_alias(&self) -> Option<&str> {
        self.initiator_alias.as_deref()
    }

    /// The first Login Request (ISID, TSIH, CID, initial CmdSN), once one came.
    pub fn first_request(&self) -> Option<&LoginRequest> {
        self.first_request.as_ref()
    }

    /// Runs one Login Request with its data segment.
    pub fn step(&mut self, req: &LoginRequest, data: &[u8], dir: &dyn Directory) -> Step {
        match self.run(req, data, dir) {
            Ok(step) => step,
            Err(Failure(code)) => Step::Fail(Reply {
                stages: Stages {
                    transit: false,
                    cont: false,
                    csg: req.csg,
                    nsg: 0,
                },
                status: code,
                text: Vec::new(),
            }),
        }
    }

    fn run(
        &mut self,
        req: &LoginRequest,
        data: &[u8],
        dir: &dyn Directory,
    ) -> Result<Step, Failure> {
        let first = self.first_request.is_none();
        if first {
            if req.version_min > 0 {
                return Err(Failure(status::UNSUPPORTED_VERSION));
            }
            self.first_request = Some(*req);
            self.leading = req.tsih == 0;
            self.stage = Some(req.csg);
        }
        let current = self.stage.unwrap_or(req.csg);
        if req.csg != current {
            // Only T moves between stages; a request may not go back or skip on its own.
            return Err(Failure(status::INVALID_DURING_LOGIN));
        }
        if !matches!(req.csg, stage::SECURITY | stage::OPERATIONAL) {
            return Err(Failure(status::INVALID_DURING_LOGIN));
        }
        if req.transit && (req.nsg <= req.csg || req.nsg == 2) {
            return Err(Failure(status::INVALID_DURING_LOGIN));
        }
        self.text
            .push(data)
            .map_err(|_| Failure(status::INITIATOR_ERROR))?;
        if req.cont {
            // More text follows: an empty answer asks for it.
            return Ok(Step::Continue(self.reply(req.csg, None, Vec::new())));
        }
        let pairs = text::parse(&self.text.take()).map_err(|_| Failure(status::INITIATOR_ERROR))?;
        let mut out: Pairs = Vec::new();
        self.names(&pairs)?;
        if first {
            self.resolve(dir)?;
            if matches!(self.kind, Some(SessionKind::Normal(_))) && self.leading {
                out.push(("TargetPortalGroupTag".into(), self.portal_group.to_string()));
                if let Some(a) = &self.alias {
                    out.push(("TargetAlias".into(), a.clone()));
                }
            }
        }
        let cx = Context {
            discovery: self.kind == Some(SessionKind::Discovery),
            leading: self.leading,
        };
        let mut chap_reply = false;
        for (k, v) in &pairs {
            match k.as_str() {
                "InitiatorName" | "InitiatorAlias" | "TargetName" | "SessionType" => {}
                "AuthMethod" | "CHAP_A" | "CHAP_N" | "CHAP_R" | "CHAP_I" | "CHAP_C" => {
                    if req.csg != stage::SECURITY {
                        return Err(Failure(status::INVALID_DURING_LOGIN));
                    }
                    chap_reply = true;
                }
                "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" | "SendTargets" => {
                    out.push((k.clone(), Answer::Reject.to_string()));
                }
                _ => {
                    let a = self.params.negotiate(k, v, &self.limits, cx);
                    if a != Answer::Silent {
                        out.push((k.clone(), a.to_string()));
                    }
                }
            }
        }
        if chap_reply {
            self.security(&pairs, &mut out)?;
        }
        match req.csg {
            stage::SECURITY => {
                if self.auth.chap.is_none() && !chap_reply {
                    // No authentication asked for by either side.
                    self.authenticated = true;
                }
                let transit = req.transit && self.authenticated;
                if transit && req.nsg == stage::FULL_FEATURE {
                    // The operational stage is skipped: the target's defaults stand.
                    return Ok(Step::Complete(self.reply(
                        req.csg,
                        Some(req.nsg),
                        text::encode(&out),
                    )));
                }
                if transit {
                    self.stage = Some(req.nsg);
                }
                let nsg = transit.then_some(req.nsg);
                Ok(Step::Continue(self.reply(req.csg, nsg, text::encode(&out))))
            }
            _ => {
                if !self.authenticated && self.auth.chap.is_some() {
                    return Err(Failure(status::AUTHENTICATION_FAILURE));
                }
                self.authenticated = true;
                if !self.declared {
                    self.declared = true;
                    self.params.declare(&self.limits);
                    out.push((
                        "MaxRecvDataSegmentLength".into(),
                        self.limits.max_recv_data_segment.to_string(),
                    ));
                }
                let text = text::encode(&out);
                if req.transit {
                    Ok(Step::Complete(self.reply(req.csg, Some(req.nsg), text)))
                } else {
                    Ok(Step::Continue(self.reply(req.csg, None, text)))
                }
            }
        }
    }

    fn reply(&self, csg: u8, nsg: Option<u8>, text: Vec<u8>) -> Reply {
        Reply {
            stages: Stages {
                transit: nsg.is_some(),
                cont: false,
                csg,
                nsg: nsg.unwrap_or(0),
            },
            status: status::SUCCESS,
            text,
        }
    }

    /// Records the declarative names. They may be repeated in later PDUs, but not changed.
    fn names(&mut self, pairs: &Pairs) -> Result<(), Failure> {
        for (k, v) in pairs {
            let slot = match k.as_str() {
                "InitiatorName" => &mut self.initiator,
                "InitiatorAlias" => &mut self.initiator_alias,
                "TargetName" => &mut self.target,
                "SessionType" => {
                    let kind = match v.as_str() {
                        "Discovery" => SessionKind::Discovery,
                        "Normal" => SessionKind::Normal(String::new()),
                        _ => return Err(Failure(status::SESSION_TYPE_UNSUPPORTED)),
                    };
                    match (&self.kind, &kind) {
                        (None, _) => self.kind = Some(kind),
                        (Some(SessionKind::Discovery), SessionKind::Discovery)
                        | (Some(SessionKind::Normal(_)), SessionKind::Normal(_)) => {}
                        _ => return Err(Failure(status::INITIATOR_ERROR)),
                    }
                    continue;
                }
                _ => continue,
            };
            match slot {
                Some(old) if old != v => return Err(Failure(status::INITIATOR_ERROR)),
                _ => *slot = Some(v.clone()),
            }
        }
        Ok(())
    }

    /// After the first request: the session kind and target, and who may log in.
    fn resolve(&mut self, dir: &dyn Directory) -> Result<(), Failure> {
        let Some(initiator) = self.initiator.clone() else {
            return Err(Failure(status::MISSING_PARAMETER));
        };
        let kind = self
            .kind
            .take()
            .unwrap_or(SessionKind::Normal(String::new()));
        let (auth, alias, kind) = match kind {
            SessionKind::Discovery => (dir.discovery(), None, SessionKind::Discovery),
            SessionKind::Normal(_) => {
                let Some(name) = self.target.clone() else {
                    return Err(Failure(status::MISSING_PARAMETER));
                };
                let Some((auth, alias)) = dir.target(&name) else {
                    return Err(Failure(status::NOT_FOUND));
                };
                (auth, alias, SessionKind::Normal(name))
            }
        };
        if !auth.initiators.is_empty() && !auth.initiators.contains(&initiator) {
            return Err(Failure(status::AUTHORIZATION_FAILURE));
        }
        self.kind = Some(kind);
        self.auth = auth;
        self.alias = alias;
        Ok(())
    }

    /// The security keys of one request: AuthMethod, then CHAP.
    fn security(&mut self, pairs: &Pairs, out: &mut Pairs) -> Result<(), Failure> {
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(k2, _)| k2 == k)
                .map(|(_, v)| v.as_str())
        };
        if let Some(methods) = get("AuthMethod") {
            let offered: Vec<&str> = methods.split(',').collect();
            let pick = if self.auth.chap.is_some() {
                offered.contains(&"CHAP").then_some("CHAP")
            } else {
                offered.contains(&"None").then_some("None")
            };
            match pick {
                Some("CHAP") => {
                    self.chap = Chap::Chosen;
                    out.push(("AuthMethod".into(), "CHAP".into()));
                }
                Some(_) => {
                    self.authenticated = true;
                    out.push(("AuthMethod".into(), "None".into()));
                }
                None => return Err(Failure(status::AUTHENTICATION_FAILURE)),
            }
        }
        if let Some(algos) = get("CHAP_A") {
            if self.chap != Chap::Chosen || !algos.split(',').any(|a| a == chap::ALGORITHM_MD5) {
                return Err(Failure(status::AUTHENTICATION_FAILURE));
            }
            let (id, challenge) = chap::challenge().map_err(|_| Failure(status::TARGET_ERROR))?;
            out.push(("CHAP_A".into(), chap::ALGORITHM_MD5.into()));
            out.push(("CHAP_I".into(), id.to_string()));
            out.push(("CHAP_C".into(), chap::encode_hex(&challenge)));
            self.chap = Chap::Challenged { id, challenge };
        }
        if get("CHAP_N").is_some() || get("CHAP_R").is_some() {
            let Chap::Challenged { id, challenge } = std::mem::replace(&mut self.chap, Chap::Idle)
            else {
                return Err(Failure(status::AUTHENTICATION_FAILURE));
            };
            let (Some(name), Some(resp), Some(creds)) =
                (get("CHAP_N"), get("CHAP_R"), self.auth.chap.as_ref())
            else {
                return Err(Failure(status::AUTHENTICATION_FAILURE));
            };
            let resp = chap::decode_binary(resp).ok_or(Failure(status::AUTHENTICATION_FAILURE))?;
            let expected = chap::response(id, &creds.secret, &challenge);
            if name != creds.user || !chap::equal(&resp, &expected) {
                return Err(Failure(status::AUTHENTICATION_FAILURE));
            }
            // Mutual CHAP: the initiator challenges the target in the same request.
            match (get("CHAP_I"), get("CHAP_C")) {
                (None, None) => {}
                (Some(i), Some(c)) => {
                    let id: u8 = i
                        .parse()
                        .map_err(|_| Failure(status::AUTHENTICATION_FAILURE))?;
                    let c =
                        chap::decode_binary(c).ok_or(Failure(status::AUTHENTICATION_FAILURE))?;
                    // A challenge equal to the target's own is a reflection attack.
                    if chap::equal(&c, &challenge) || c.len() > 1024 {
                        return Err(Failure(status::AUTHENTICATION_FAILURE));
                    }
                    let Some(own) = &self.auth.mutual else {
                        return Err(Failure(status::AUTHENTICATION_FAILURE));
                    };
                    out.push(("CHAP_N".into(), own.user.clone()));
                    out.push((
                        "CHAP_R".into(),
                        chap::encode_hex(&chap::response(id, &own.secret, &c)),
                    ));
                }
                _ => return Err(Failure(status::AUTHENTICATION_FAILURE)),
            }
            self.authenticated = true;
        } else if get("CHAP_I").is_some() || get("CHAP_C").is_some() {
            return Err(Failure(status::AUTHENTICATION_FAILURE));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
