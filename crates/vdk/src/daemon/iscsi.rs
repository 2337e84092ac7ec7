//! The daemon's iSCSI front end: one target server on the daemon's portals, and the LUN each
//! disk opened with `--iscsi` is.
//!
//! A disk becomes LUN 0 of a target named after its id (`iqn.2026-11.org.vdk:ID`), or a LUN
//! of a target named on open, which several disks may share. An ISO is a CD-ROM LUN. The
//! server starts with the daemon when `--listen iscsi://` is given, else on the first disk
//! that asks for it, on the default portal.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use tracing::{info, warn};
use vdk_core::BlockDevice;
use vdk_iscsi::{Server, ServerConfig, Target};
use vdk_scsi::LogicalUnit;

use crate::control::{ApiError, ErrorKind};
use vdk_core::sync::lock;

/// Where the daemon serves iSCSI when not told: loopback, the iSCSI port.
pub const DEFAULT_PORTAL: &str = "iscsi://127.0.0.1:3260";

/// How the daemon serves iSCSI.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// Portals (`iscsi://HOST[:PORT]`); [`DEFAULT_PORTAL`] if empty.
    pub listen: Vec<String>,
    /// Authentication and allow-list of every target.
    pub auth: vdk_iscsi::Auth,
    /// Every disk opened is served over iSCSI, asked or not.
    pub all: bool,
}

/// A disk's place on the iSCSI server.
#[derive(Debug)]
pub struct Lun {
    /// The target's name.
    pub target: String,
    /// The LUN.
    pub lun: u16,
    /// The logical unit (its medium is the disk).
    pub unit: Arc<LogicalUnit>,
}

#[derive(Debug)]
struct Running {
    server: Arc<Server>,
    portals: Vec<SocketAddr>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

/// The iSCSI server of the daemon, started on demand.
#[derive(Debug)]
pub struct Front {
    settings: Settings,
    running: Mutex<Option<Running>>,
}

impl Front {
    /// A front end that has not started.
    pub fn new(settings: Settings) -> Front {
        Front {
            settings,
            running: Mutex::new(None),
        }
    }

    /// Whether every disk is to be served.
    pub fn all(&self) -> bool {
        self.settings.all
    }

    /// Initiator connections open now (none before the server starts).
    pub fn connections(&self) -> usize {
        lock(&self.running)
            .as_ref()
            .map_or(0, |r| r.server.connections())
    }

    /// Starts the server on its portals unless it runs already.
    pub fn start(&self) -> Result<(), ApiError> {
        let mut slot = lock(&self.running);
        if slot.is_some() {
            return Ok(());
        }
        let uris = if self.settings.listen.is_empty() {
            vec![DEFAULT_PORTAL.to_owned()]
        } else {
            self.settings.listen.clone()
        };
        let mut listeners = Vec::new();
        for u in &uris {
            let l = vdk_iscsi::bind(u).map_err(|e| {
                ApiError::io(
                    format!(
                        "cannot listen on {u} (start the daemon with --listen iscsi://HOST:PORT \
                         for another portal)"
                    ),
                    &e,
                )
            })?;
            listeners.push(l);
        }
        let portals = listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect::<Vec<_>>();
        let server = Arc::new(Server::new(ServerConfig::default()));
        let s = Arc::clone(&server);
        let thread = thread::Builder::new()
            .name("iscsi".into())
            .spawn(move || s.serve(listeners))
            .map_err(|e| ApiError::io("cannot start the iSCSI server", &e))?;
        for p in &portals {
            info!(portal = %p, "iSCSI portal");
        }
        *slot = Some(Running {
            server,
            portals,
            thread: Some(thread),
        });
        Ok(())
    }

    /// Serves `device` (the disk `id`) as a LUN of `target` (default: a target of its own),
    /// a new target asking for `auth` (default: the daemon's).
    pub fn expose(
        &self,
        id: &str,
        device: Arc<dyn BlockDevice>,
        target: Option<&str>,
        lun: Option<u16>,
        auth: Option<vdk_iscsi::Auth>,
    ) -> Result<Lun, ApiError> {
        self.start()?;
        let slot = lock(&self.running);
        let Some(r) = slot.as_ref() else {
            return Err(ApiError::new(
                ErrorKind::Io,
                "the iSCSI server is not running",
            ));
        };
        let name = target.map_or_else(|| vdk_iscsi::iqn_for(id), str::to_owned);
        if !vdk_iscsi::valid_name(&name) {
            return Err(ApiError::new(
                ErrorKind::Invalid,
                format!(
                    "{name:?} is not an iSCSI name: use iqn.YYYY-MM.reversed.domain:name, in \
                     lowercase letters, digits, '.', '-' and ':'"
                ),
            ));
        }
        let t = match r.server.target(&name) {
            Some(t) => t,
            None => r
                .server
                .add_target(Target {
                    name: name.clone(),
                    alias: Some(id.to_owned()),
                    luns: Arc::new(vdk_scsi::Target::new()),
                    auth: auth.unwrap_or_else(|| self.settings.auth.clone()),
                })
                .map_err(|e| ApiError::new(ErrorKind::Invalid, e.to_string()))?,
        };
        let taken = t.luns.lun_numbers();
        let n = match lun {
            Some(n) if taken.contains(&n) => {
                return Err(ApiError::new(
                    ErrorKind::AlreadyOpen,
                    format!("LUN {n} of {name} is taken"),
                ))
            }
            Some(n) if n >= 16384 => {
                return Err(ApiError::new(
                    ErrorKind::Invalid,
                    format!("LUN {n} is past the 16383 a flat LUN can address"),
                ))
            }
            Some(n) => n,
            None => (0..).find(|n| !taken.contains(n)).unwrap_or(0),
        };
        let unit = Arc::new(LogicalUnit::for_device(id, device));
        t.luns.add(n, Arc::clone(&unit));
        info!(id, target = %name, lun = n, "served over iSCSI");
        Ok(Lun {
            target: name,
            lun: n,
            unit,
        })
    }

    /// The daemon's own CHAP credentials for initiators, if it was given some.
    #[cfg_attr(not(windows), allow(dead_code))]
    pub fn chap(&self) -> Option<&vdk_iscsi::chap::Credentials> {
        self.settings.auth.chap.as_ref()
    }

    /// The first portal the server listens on, once it runs.
    #[cfg_attr(not(windows), allow(dead_code))]
    pub fn portal(&self) -> Option<SocketAddr> {
        lock(&self.running)
            .as_ref()
            .and_then(|r| r.portals.first().copied())
    }

    /// Takes a disk's LUN away; a target with no LUN left goes too, closing its sessions.
    pub fn withdraw(&self, l: &Lun) {
        let slot = lock(&self.running);
        let Some(r) = slot.as_ref() else { return };
        if let Some(t) = r.server.target(&l.target) {
            t.luns.remove(l.lun);
            if t.luns.lun_numbers().is_empty() {
                r.server.remove_target(&l.target);
            }
        }
    }

    /// The URLs of a LUN, one per portal.
    pub fn uris(&self, l: &Lun) -> Vec<String> {
        let slot = lock(&self.running);
        slot.as_ref().map_or_else(Vec::new, |r| {
            r.portals
                .iter()
                .map(|p| vdk_iscsi::target_uri(*p, &l.target, l.lun))
                .collect()
        })
    }

    /// Stops the server: initiators are told, commands in flight finish.
    pub fn stop(&self) {
        let running = lock(&self.running).take();
        if let Some(mut r) = running {
            r.server.shutdown_handle().shutdown();
            if let Some(t) = r.thread.take() {
                match t.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => warn!(error = %e, "iSCSI server stopped with an error"),
                    Err(_) => warn!("the iSCSI server thread panicked"),
                }
            }
        }
    }
}
