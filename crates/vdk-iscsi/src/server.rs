//! The iSCSI target server: portals, targets, logins and shutdown.
//!
//! ```text
//!   listener ─► connection thread: login (Login::step) ─► session (new, joined, reinstated)
//!                                                          └─► full feature phase (conn.rs)
//! ```
//!
//! Targets are added and removed while the server runs; removing one closes its sessions.
//! Shutdown stops the listeners, tells every logged-in initiator that its connection will be
//! dropped (Asynchronous Message), finishes the commands already received and closes.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufReader};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use vdk_core::lifecycle::{self, Connection, Lifecycle, Stop};
use vdk_core::net::Deadline;
use vdk_core::sync::{read, write};

use tracing::{debug, info, warn};

use crate::conn::{self, Conn};
use crate::login::{self, status, Auth, Directory, Login, SessionKind, Step};
use crate::params::Limits;
use crate::pdu::response::{self, Numbers};
use crate::pdu::{opcode, Request};
use crate::session::{lock, Kind, Session, Window};
use crate::wire::{self, Digests};

/// The naming authority of the IQNs vdk makes up for its disks.
pub const IQN_PREFIX: &str = "iqn.2026-11.org.vdk";

/// The IQN for a disk named `id`: [`IQN_PREFIX`], a colon, and the id in the characters an
/// iSCSI name may hold (lowercase letters, digits, `.`, `-`, `:`).
///
/// ```
/// assert_eq!(vdk_iscsi::iqn_for("Data_Disk-1a2b"), "iqn.2026-11.org.vdk:data-disk-1a2b");
/// ```
pub fn iqn_for(id: &str) -> String {
    let suffix: String = id
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '.' | '-' | ':') => c,
            _ => '-',
        })
        .collect();
    format!("{IQN_PREFIX}:{suffix}")
}

/// The iSCSI port (RFC 7143 13.1: 3260).
pub const DEFAULT_PORT: u16 = 3260;

/// Listens on `iscsi://HOST[:PORT]` (port 3260 if not given).
pub fn bind(uri: &str) -> io::Result<TcpListener> {
    let Some(rest) = uri.strip_prefix("iscsi://") else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid iSCSI portal {uri:?}: use iscsi://HOST[:PORT]"),
        ));
    };
    let host = rest.trim_end_matches('/');
    // An IPv6 address is bracketed: [::1]:3260 or [::1].
    let has_port = if host.starts_with('[') {
        host.contains("]:")
    } else {
        host.contains(':')
    };
    if has_port {
        TcpListener::bind(host)
    } else {
        TcpListener::bind(format!("{host}:{DEFAULT_PORT}"))
    }
}

/// The URI libiscsi and QEMU take for LUN `lun` of `target` at `addr`:
/// `iscsi://HOST:PORT/IQN/LUN`.
pub fn target_uri(addr: SocketAddr, target: &str, lun: u16) -> String {
    format!("iscsi://{addr}/{target}/{lun}")
}

/// Whether `name` is a valid iSCSI name (RFC 7143 4.2.7): `iqn.`, `eui.` or `naa.`, at most
/// 223 bytes, of lowercase letters, digits, `.`, `-` and `:`.
pub fn valid_name(name: &str) -> bool {
    name.len() <= 223
        && (name.starts_with("iqn.") || name.starts_with("eui.") || name.starts_with("naa."))
        && name.len() > 4
        && name
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b':'))
}

/// An iSCSI target: a name, the logical units behind it, and who may log in.
#[derive(Debug)]
pub struct Target {
    /// Its iSCSI name.
    pub name: String,
    /// A human-readable alias (TargetAlias), if any.
    pub alias: Option<String>,
    /// The logical units (LUN 0 first, by convention).
    pub luns: Arc<vdk_scsi::Target>,
    /// Authentication and the initiator allow-list.
    pub auth: Auth,
}

/// Tunables of a server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// What the target offers in negotiation.
    pub limits: Limits,
    /// The portal group tag of every portal (TargetPortalGroupTag).
    pub portal_group: u16,
    /// Authentication of discovery sessions.
    pub discovery_auth: Auth,
    /// Most threads running one connection's commands at once.
    pub threads_per_connection: usize,
    /// Longest wait for each PDU during login.
    pub login_timeout: Duration,
    /// Most non-immediate commands a session may have in flight (the command window).
    pub queue_depth: u32,
    /// Most connections at once; more are closed at accept.
    pub max_connections: usize,
    /// Most connections at once from one IP address.
    pub max_connections_per_address: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            limits: Limits::default(),
            portal_group: 1,
            discovery_auth: Auth::default(),
            threads_per_connection: 16,
            login_timeout: Duration::from_secs(30),
            queue_depth: 128,
            max_connections: 1024,
            max_connections_per_address: 256,
        }
    }
}

/// Why a target could not be added.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    /// Not a valid iSCSI name.
    #[error("{0:?} is not a valid iSCSI name (iqn.YYYY-MM.reversed.domain:name, lowercase)")]
    BadName(String),
    /// A target of that name exists.
    #[error("a target named {0} exists")]
    Exists(String),
}

/// TCP keep-alive of initiator connections (vdk_core::net::set_keepalive).
const KEEPALIVE: Duration = Duration::from_secs(60);

/// Longest a reply may wait for the initiator to take it.
const REPLY_STALL: Duration = Duration::from_secs(60);

/// Stops a running server from another thread.
#[derive(Clone, Debug)]
pub struct ShutdownHandle(Lifecycle);

/// How long initiators are told to wait before they reconnect after a shutdown.
const SHUTDOWN_TIME2WAIT: u16 = 2;

impl ShutdownHandle {
    /// Stops accepting, tells logged-in initiators their connections will be dropped,
    /// finishes the commands already received, and closes every connection.
    pub fn shutdown(&self) {
        self.0.shutdown();
    }
}

/// An iSCSI target server.
#[derive(Debug)]
pub struct Server {
    targets: RwLock<BTreeMap<String, Arc<Target>>>,
    sessions: Mutex<HashMap<u16, Arc<Session>>>,
    next_tsih: AtomicU16,
    next_nexus: AtomicU64,
    config: ServerConfig,
    life: Lifecycle,
}

impl Server {
    /// A server with no targets.
    pub fn new(config: ServerConfig) -> Server {
        Server {
            targets: RwLock::default(),
            sessions: Mutex::default(),
            next_tsih: AtomicU16::new(1),
            next_nexus: AtomicU64::new(1),
            life: Lifecycle::new(config.max_connections, config.max_connections_per_address),
            config,
        }
    }

    /// The server's configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Adds a target; initiators can log in to it at once.
    pub fn add_target(&self, target: Target) -> Result<Arc<Target>, TargetError> {
        if !valid_name(&target.name) {
            return Err(TargetError::BadName(target.name));
        }
        let mut targets = write(&self.targets);
        if targets.contains_key(&target.name) {
            return Err(TargetError::Exists(target.name));
        }
        let t = Arc::new(target);
        targets.insert(t.name.clone(), Arc::clone(&t));
        info!(target = %t.name, "iSCSI target added");
        Ok(t)
    }

    /// The target named `name`.
    pub fn target(&self, name: &str) -> Option<Arc<Target>> {
        let targets = read(&self.targets);
        targets.get(name).cloned()
    }

    /// Every target, by name.
    pub fn targets(&self) -> Vec<Arc<Target>> {
        let targets = read(&self.targets);
        targets.values().cloned().collect()
    }

    /// Removes a target and closes its sessions: their initiators are told the connections
    /// will drop, commands already received finish, and the connections close.
    pub fn remove_target(&self, name: &str) -> Option<Arc<Target>> {
        let t = {
            let mut targets = write(&self.targets);
            targets.remove(name)?
        };
        let sessions: Vec<Arc<Session>> = lock(&self.sessions)
            .values()
            .filter(|s| s.target_name() == Some(name))
            .cloned()
            .collect();
        for s in sessions {
            close_session(&s, true);
        }
        info!(target = %name, "iSCSI target removed");
        Some(t)
    }

    /// Initiator connections open now.
    pub fn connections(&self) -> usize {
        self.life.connections()
    }

    /// A handle that stops [`serve`](Self::serve) from another thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.life.clone())
    }

    /// Serves on `listeners` until shut down, then waits for every connection to close and
    /// flushes every logical unit.
    pub fn serve(self: &Arc<Self>, listeners: Vec<TcpListener>) -> io::Result<()> {
        self.life
            .accept(&listeners, |stream| self.spawn_connection(stream));
        self.life.wait_closed();
        self.flush_all()
    }

    /// Serves one connection (from any listener, or made by the caller) on its own thread.
    pub fn spawn_connection(self: &Arc<Self>, stream: TcpStream) {
        let peer = stream.peer_addr().ok();
        let handle = match stream.try_clone() {
            Ok(c) => Arc::new(c),
            Err(e) => {
                warn!(error = %e, "cannot clone a client socket, closing it");
                return;
            }
        };
        // Until the login is done, stopping a connection ends its reading side.
        let stop: Stop = {
            let handle = Arc::clone(&handle);
            Arc::new(move || drop(handle.shutdown(Shutdown::Read)))
        };
        // An initiator whose host vanished is found in about two minutes.
        vdk_core::net::set_keepalive(&stream, KEEPALIVE);
        let server = Arc::clone(self);
        let run = move |c: &Connection| server.run_connection(stream, &handle, c);
        if let Err(why) = self
            .life
            .spawn("iscsi-conn", peer.map(|a| a.ip()), stop, run)
        {
            warn!(peer = ?peer, "connection refused: {why}");
        }
    }

    fn flush_all(&self) -> io::Result<()> {
        let mut media = Vec::new();
        for t in self.targets() {
            for n in t.luns.lun_numbers() {
                if let Some(m) = t.luns.lun(n).and_then(|l| l.medium()) {
                    media.push((format!("{} LUN {n}", t.name), m));
                }
            }
        }
        let disks = media.iter().map(|(name, m)| (name.clone(), &**m));
        lifecycle::flush_all(disks).map_err(io::Error::other)
    }

    fn run_connection(
        self: &Arc<Self>,
        stream: TcpStream,
        handle: &Arc<TcpStream>,
        place: &Connection,
    ) {
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "unknown".into(), |a| a.to_string());
        let _ = stream.set_nodelay(true); // latency matters more than a few packets
        let conn = match self.login(&stream, &peer) {
            Some(c) => c,
            None => return,
        };
        // Logged in: stopping now tells the initiator first (at once if already stopping).
        place.on_stop({
            let (conn, handle) = (Arc::clone(&conn), Arc::clone(handle));
            Arc::new(move || {
                conn.announce_drop(SHUTDOWN_TIME2WAIT);
                drop(handle.shutdown(Shutdown::Read));
            })
        });
        conn::run(&conn, stream);
        self.connection_ended(&conn);
        info!(%peer, initiator = %conn.session.initiator, "iSCSI connection closed");
    }

    /// Runs the login phase. Returns the connection in full feature phase, or None if the
    /// login failed (the initiator has been told why) or the connection broke.
    fn login(self: &Arc<Self>, stream: &TcpStream, peer: &str) -> Option<Arc<Conn>> {
        let deadline = Instant::now() + self.config.login_timeout * 4;
        if stream
            .set_write_timeout(Some(self.config.login_timeout))
            .is_err()
        {
            return None;
        }
        // Every read gets what is left of the deadline: bytes dripped in one at a time cannot
        // stretch a login past it.
        let mut reader = BufReader::with_capacity(
            16 << 10,
            Deadline {
                stream,
                until: deadline,
            },
        );
        let mut writer = stream;
        let mut login = Login::new(self.config.limits, self.config.portal_group);
        let mut stat_sn: Option<u32> = None;
        let max_text = self.config.limits.max_recv_data_segment.max(8192) as usize;
        loop {
            if Instant::now() > deadline {
                debug!(%peer, "login took too long");
                return None;
            }
            let bhs = match wire::read_bhs(&mut reader) {
                Ok(b) => b,
                Err(e) => {
                    debug!(%peer, error = %e, "connection ended during login");
                    return None;
                }
            };
            if bhs.opcode() != opcode::LOGIN || bhs.ahs_len() != 0 {
                // Only Login Requests, which have no AHS, may come before the login
                // completes (RFC 7143 6.1): nothing else of this stream can be trusted.
                warn!(%peer, opcode = bhs.opcode(), "not a login request, closing");
                return None;
            }
            let h = match wire::read_after_bhs(&mut reader, bhs, Digests::default(), max_text) {
                Ok(h) => h,
                Err(e) => {
                    warn!(%peer, error = %e, "bad login request, closing");
                    return None;
                }
            };
            let mut data = vec![0u8; h.bhs.data_len()];
            if wire::read_data(&mut reader, &mut data, Digests::default()).is_err() {
                return None;
            }
            let req = match Request::parse(&h.bhs, &h.ahs) {
                Ok(Request::Login(r)) => r,
                _ => {
                    warn!(%peer, "malformed login request, closing");
                    return None;
                }
            };
            let first = login.first_request().is_none();
            let sn = *stat_sn.get_or_insert(req.exp_stat_sn);
            let window = Window::new(req.cmd_sn, self.config.queue_depth);
            let mut numbers = window.numbers(sn);
            if first && req.tsih != 0 {
                if let Some(s) = lock(&self.sessions).get(&req.tsih) {
                    numbers = s.numbers(sn);
                }
            }
            let mut step =
                if first && req.tsih != 0 && !lock(&self.sessions).contains_key(&req.tsih) {
                    Step::Fail(login::Reply {
                        stages: response::Stages {
                            transit: false,
                            cont: false,
                            csg: req.csg,
                            nsg: 0,
                        },
                        status: status::SESSION_DOES_NOT_EXIST,
                        text: Vec::new(),
                    })
                } else {
                    login.step(&req, &data, &Registry(self))
                };
            let mut established = None;
            if let Step::Complete(reply) = &step {
                match self.establish(&login, stream) {
                    Ok(c) => {
                        numbers = c.session.numbers(sn);
                        established = Some(c);
                    }
                    Err(code) => {
                        step = Step::Fail(login::Reply {
                            status: code,
                            stages: response::Stages {
                                transit: false,
                                ..reply.stages
                            },
                            text: Vec::new(),
                        });
                    }
                }
            }
            let reply = match &step {
                Step::Continue(r) | Step::Complete(r) | Step::Fail(r) => r,
            };
            let tsih = established
                .as_ref()
                .map_or(req.tsih, |c: &Arc<Conn>| c.session.tsih);
            let mut bhs = response::login_response(
                reply.stages,
                req.isid,
                tsih,
                req.itt,
                reply.status,
                Numbers {
                    stat_sn: sn,
                    ..numbers
                },
            );
            if reply.status != status::SUCCESS {
                // Only a successful response carries meaningful numbers.
                bhs.set_u32(28, 0);
                bhs.set_u32(32, 0);
            }
            stat_sn = Some(sn.wrapping_add(1));
            if let Err(e) =
                wire::write_pdus(&mut writer, &mut [(bhs, &reply.text)], Digests::default())
            {
                debug!(%peer, error = %e, "cannot send a login response");
                if let Some(c) = established {
                    self.connection_ended(&c);
                }
                return None;
            }
            match step {
                Step::Continue(_) => continue,
                Step::Fail(r) => {
                    info!(%peer, initiator = login.initiator().unwrap_or("?"), status = format!("{:#06x}", r.status), "iSCSI login refused");
                    return None;
                }
                Step::Complete(_) => {}
            }
            let c = established?;
            c.set_stat_sn(sn.wrapping_add(1));
            // Full feature phase: reads wait as long as the initiator is quiet; a reply it stops
            // taking ends the connection after a minute, as with NBD's --io-timeout.
            let timeouts = stream
                .set_read_timeout(None)
                .and_then(|()| stream.set_write_timeout(Some(REPLY_STALL)));
            if timeouts.is_err() {
                self.connection_ended(&c);
                return None;
            }
            info!(%peer, initiator = %c.session.initiator, target = c.session.target_name().unwrap_or("(discovery)"),
                  tsih = c.session.tsih, cid = c.cid, header_digest = c.digests.header, data_digest = c.digests.data,
                  "iSCSI login");
            return Some(c);
        }
    }

    /// Creates, joins or reinstates the session a completed login asks for.
    fn establish(self: &Arc<Self>, login: &Login, stream: &TcpStream) -> Result<Arc<Conn>, u16> {
        let first = *login.first_request().ok_or(status::INITIATOR_ERROR)?;
        let initiator = login
            .initiator()
            .ok_or(status::MISSING_PARAMETER)?
            .to_owned();
        let kind = match login.kind() {
            Some(SessionKind::Discovery) => Kind::Discovery,
            Some(SessionKind::Normal(name)) => {
                Kind::Normal(self.target(name).ok_or(status::TARGET_REMOVED)?)
            }
            None => return Err(status::MISSING_PARAMETER),
        };
        let params = *login.params();
        let sockets = conn::Sockets::of(stream).map_err(|_| status::OUT_OF_RESOURCES)?;
        if first.tsih == 0 {
            // A new session; one with the same initiator port and target is reinstated
            // (RFC 7143 6.3.5): the old one is closed.
            let old: Vec<Arc<Session>> = lock(&self.sessions)
                .values()
                .filter(|s| {
                    s.isid == first.isid
                        && s.initiator == initiator
                        && s.target_name() == login_target(login)
                })
                .cloned()
                .collect();
            for s in old {
                info!(initiator = %initiator, tsih = s.tsih, "session reinstated: closing the old one");
                close_session(&s, false);
            }
            let tsih = self.allocate_tsih();
            let isid: String = first.isid.iter().map(|b| format!("{b:02x}")).collect();
            let session = Arc::new(Session {
                tsih,
                isid: first.isid,
                port: format!("{initiator},i,0x{isid}"),
                initiator,
                kind,
                nexus: self.next_nexus.fetch_add(1, Ordering::Relaxed),
                params,
                window: Mutex::new(Window::new(first.cmd_sn, self.config.queue_depth)),
                conns: Mutex::default(),
            });
            let c = Conn::new(
                Arc::clone(&session),
                first.cid,
                sockets,
                &params,
                &self.config,
                Arc::clone(self),
            );
            lock(&session.conns).push(Arc::clone(&c));
            lock(&self.sessions).insert(tsih, session);
            Ok(c)
        } else {
            let session = lock(&self.sessions)
                .get(&first.tsih)
                .cloned()
                .ok_or(status::SESSION_DOES_NOT_EXIST)?;
            if session.isid != first.isid
                || session.initiator != initiator
                || session.target_name() != login_target(login)
            {
                return Err(status::CANNOT_INCLUDE);
            }
            let mut conns = lock(&session.conns);
            // Connection reinstatement: the same CID again replaces the old connection.
            if let Some(i) = conns.iter().position(|c| c.cid == first.cid) {
                let old = conns.remove(i);
                old.close();
            }
            if conns.len() >= usize::from(session.params.max_connections) {
                return Err(status::TOO_MANY_CONNECTIONS);
            }
            let c = Conn::new(
                Arc::clone(&session),
                first.cid,
                sockets,
                &params,
                &self.config,
                Arc::clone(self),
            );
            conns.push(Arc::clone(&c));
            Ok(c)
        }
    }

    fn allocate_tsih(&self) -> u16 {
        let sessions = lock(&self.sessions);
        loop {
            let t = self.next_tsih.fetch_add(1, Ordering::Relaxed);
            // 0 means "new session" and cannot be a TSIH.
            if t != 0 && !sessions.contains_key(&t) {
                return t;
            }
        }
    }

    /// A connection in full feature phase ended: it leaves its session, and a session with
    /// no connection left ends, releasing what its nexus held.
    pub(crate) fn connection_ended(&self, conn: &Arc<Conn>) {
        let s = &conn.session;
        let empty = {
            let mut conns = lock(&s.conns);
            conns.retain(|c| !Arc::ptr_eq(c, conn));
            conns.is_empty()
        };
        if empty {
            let mut sessions = lock(&self.sessions);
            if sessions.get(&s.tsih).is_some_and(|x| Arc::ptr_eq(x, s)) {
                sessions.remove(&s.tsih);
            }
            drop(sessions);
            if let Kind::Normal(t) = &s.kind {
                t.luns.nexus_lost(s.nexus);
            }
        }
    }

    /// The SendTargets answer for `initiator`: every target it may see (or just `only`), each
    /// with the address `local` the request came in on.
    pub(crate) fn send_targets(
        &self,
        initiator: &str,
        only: Option<&str>,
        local: Option<SocketAddr>,
    ) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for t in self.targets() {
            if only.is_some_and(|o| o != t.name) {
                continue;
            }
            if !t.auth.initiators.is_empty() && !t.auth.initiators.iter().any(|i| i == initiator) {
                continue;
            }
            out.push(("TargetName".into(), t.name.clone()));
            if let Some(a) = local {
                let addr = match a {
                    SocketAddr::V4(v) => format!("{}:{}", v.ip(), v.port()),
                    SocketAddr::V6(v) => format!("[{}]:{}", v.ip(), v.port()),
                };
                out.push((
                    "TargetAddress".into(),
                    format!("{addr},{}", self.config.portal_group),
                ));
            }
        }
        out
    }
}

/// The target name a login asks for.
fn login_target(login: &Login) -> Option<&str> {
    match login.kind() {
        Some(SessionKind::Normal(n)) => Some(n),
        _ => None,
    }
}

/// Closes every connection of a session; with `announce`, initiators are told first.
fn close_session(s: &Session, announce: bool) {
    for c in lock(&s.conns).iter() {
        if announce {
            c.announce_drop(SHUTDOWN_TIME2WAIT);
        }
        c.close();
    }
}

/// The server's targets as the login sees them.
struct Registry<'a>(&'a Server);

impl Directory for Registry<'_> {
    fn target(&self, name: &str) -> Option<(Auth, Option<String>)> {
        self.0
            .target(name)
            .map(|t| (t.auth.clone(), t.alias.clone()))
    }

    fn discovery(&self) -> Auth {
        self.0.config.discovery_auth.clone()
    }
}
