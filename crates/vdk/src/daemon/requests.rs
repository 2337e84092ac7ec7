//! One control connection: who is asking, each request line parsed, checked against what
//! that user may do, run, and answered.

use std::io::{self, BufReader};

use tracing::{debug, info, warn};

use super::access::Caller;
#[cfg(target_os = "linux")]
use super::userfs::IsoSource;
use super::Daemon;
#[cfg(target_os = "linux")]
use crate::control::FsMountRequest;
use crate::control::{self, ApiError, ErrorKind, Reply, Request, Response, VersionInfo};

/// Answers requests on one control connection until it closes; `stop` stops the daemon (a
/// `shutdown` request). `owner` is the user the daemon serves besides its own.
pub fn serve(
    daemon: &Daemon,
    conn: super::channel::Conn,
    owner: Option<u32>,
    stop: impl Fn(),
) -> io::Result<()> {
    let mut writer = super::channel::writer(&conn)?;
    let mut answer = |resp: &Response| -> io::Result<()> {
        let mut out = serde_json::to_vec(resp).map_err(io::Error::other)?;
        out.push(b'\n');
        writer.write_all(&out)
    };
    #[cfg(windows)]
    let caller = {
        let _ = owner;
        Caller::of(&conn)
    };
    #[cfg(unix)]
    let caller = Caller::of(&conn, owner);
    let caller = match caller {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "control connection refused");
            return answer(&Response::err(ApiError::new(
                ErrorKind::Permission,
                e.to_string(),
            )));
        }
    };
    debug!(pid = caller.pid, uid = caller.uid, "control connection");
    #[cfg(target_os = "linux")]
    super::mount::set_requester(Some(caller.pid));
    let mut reader = BufReader::new(super::channel::reader(conn));
    while let Some(line) = control::read_line(&mut reader)? {
        let too_long = line.is_err();
        // The line may hold a secret (a LUKS passphrase): wiped once parsed.
        let req = line
            .and_then(|l| control::parse(&zeroize::Zeroizing::new(l)))
            .and_then(|r| caller.check(&r).map(|()| r));
        let stopping = matches!(req, Ok(Request::Shutdown));
        let done = match req {
            Ok(Request::Shutdown) if !caller.trusted => Err(ApiError::new(
                ErrorKind::Permission,
                "only the daemon's own user or root may stop it",
            )),
            Ok(Request::Reload) if !caller.trusted => Err(ApiError::new(
                ErrorKind::Permission,
                "only the daemon's own user or root may reload its certificates",
            )),
            Ok(req) => {
                let made = caller.would_create(&req);
                let done = daemon.handle(req, &caller);
                caller.adopt(&made);
                done
            }
            Err(e) => Err(e),
        };
        if let Err(e) = &done {
            debug!(error = %e.message, "request failed");
        }
        let stop_after = stopping && done.is_ok();
        answer(&Response::of(done))?;
        if stop_after {
            info!("stop requested over the control socket");
            stop();
        }
        // The rest of an over-long line cannot be told from a next request: hang up.
        if too_long {
            break;
        }
    }
    Ok(())
}

impl Daemon {
    /// Refuses a request of a user the daemon serves (`--owner`) that would change a disk or
    /// a file system another user opened or mounted (root's, on a daemon they share).
    fn authorize(&self, req: &Request, caller: &Caller) -> Result<(), ApiError> {
        if caller.trusted {
            return Ok(());
        }
        let disk = match req {
            Request::Close(r) | Request::Unmount(r) | Request::Eject(r) => Some(&r.disk),
            Request::Mount(r) => Some(&r.disk),
            Request::Stats(r) => Some(&r.disk),
            Request::Set(r) => Some(&r.disk),
            Request::Bitmap(r) => Some(&r.disk),
            Request::Backup(r) => Some(&r.disk),
            Request::Commit(r) | Request::Discard(r) => Some(&r.disk),
            Request::Snapshot(r) => Some(&r.disk),
            Request::Insert(r) => Some(&r.disk),
            Request::Resize(r) => Some(&r.disk),
            Request::FsMount(r) => Some(&r.source),
            _ => None,
        };
        let theirs = |what: String, opener: u32| {
            ApiError::new(
                ErrorKind::Permission,
                format!(
                    "{what} was opened by uid {opener}: only that user (or root) may change it"
                ),
            )
        };
        if let Some(key) = disk {
            if let Ok(d) = self.disks.find(key) {
                if !caller.may_manage(d.opener) {
                    return Err(theirs(d.id.clone(), d.opener));
                }
            }
        }
        #[cfg(target_os = "linux")]
        if let Request::FsUnmount(r) = req {
            if let Some(opener) = self.fs.opener(&r.dir) {
                if !caller.may_manage(opener) {
                    return Err(theirs(r.dir.display().to_string(), opener));
                }
            }
        }
        Ok(())
    }

    /// Runs one request for `caller`.
    fn handle(&self, req: Request, caller: &Caller) -> Result<Reply, ApiError> {
        self.authorize(&req, caller)?;
        let disk = |d| Reply::Disk(Box::new(d));
        Ok(match req {
            Request::Version => Reply::Version(VersionInfo {
                version: env!("CARGO_PKG_VERSION").into(),
                pid: std::process::id(),
                recovered: self.recovered.clone(),
            }),
            Request::Open(r) => disk(self.open(*r, caller.uid)?),
            Request::Close(r) => disk(self.close(&r.disk, r.force)?),
            Request::List => Reply::Disks(self.list(caller)),
            Request::Mount(r) => disk(self.mount(r)?),
            Request::Unmount(r) => disk(self.unmount(&r.disk, r.force)?),
            Request::Stats(r) => Reply::Stats(self.stats(&r.disk)?),
            Request::Set(r) => disk(self.set(&r.disk, &r.settings)?),
            Request::Bitmap(r) => Reply::Bitmaps(self.bitmap(&r)?),
            Request::Backup(r) => Reply::Backup(self.backup(r)?),
            Request::Commit(r) => Reply::Commit(self.commit(&r.disk, false, r.force)?),
            Request::Discard(r) => Reply::Commit(self.commit(&r.disk, true, r.force)?),
            Request::Snapshot(r) => Reply::Snapshot(self.snapshot(&r.disk, &r.new, r.force)?),
            Request::Eject(r) => disk(self.eject(&r.disk, r.force)?),
            Request::Insert(r) => disk(self.insert(&r.disk, &r.image)?),
            Request::Resize(r) => disk(self.grow(&r.disk, r.size)?),
            #[cfg(not(target_os = "linux"))]
            Request::FsMount(_) | Request::FsUnmount(_) | Request::FsList | Request::FsMap(_) => {
                return Err(ApiError::new(
                    ErrorKind::Unsupported,
                    "vdk's file systems (the ISO browser, the cloud drive) are FUSE ones: Linux only",
                ))
            }
            #[cfg(target_os = "linux")]
            Request::FsMount(r) => Reply::Fs(self.fs_mount(&r, caller.uid)?),
            #[cfg(target_os = "linux")]
            Request::FsUnmount(r) => {
                let _one_at_a_time = vdk_core::sync::lock(&self.changing);
                Reply::Fs(self.fs.unmount(&r.dir, r.force)?)
            }
            #[cfg(target_os = "linux")]
            Request::FsList => Reply::Filesystems(self.fs.list(caller)),
            #[cfg(target_os = "linux")]
            Request::FsMap(r) => {
                let _one_at_a_time = vdk_core::sync::lock(&self.changing);
                let who = vdk_drive::Access {
                    uid: caller.uid,
                    gid: caller.gid,
                    shared: false,
                };
                Reply::Fs(self.fs.map(&r, who)?)
            }
            Request::Reload => {
                self.reload_tls()?;
                Reply::Done {}
            }
            // What stops the daemon is the connection's to do, once this is answered.
            Request::Shutdown => Reply::Done {},
        })
    }

    /// Mounts the ISO 9660 file system of `req.source` (an open disk's id or image, or an
    /// image file) on `req.dir`, read-only.
    #[cfg(target_os = "linux")]
    fn fs_mount(&self, req: &FsMountRequest, opener: u32) -> Result<control::FsStatus, ApiError> {
        let _one_at_a_time = vdk_core::sync::lock(&self.changing);
        let source = match self.disks.find(&req.source) {
            Ok(d) => IsoSource {
                device: d.device.clone(),
                name: vdk_core::sync::lock(&d.medium).image.display().to_string(),
                disk: Some(d.id.clone()),
            },
            Err(_) => {
                let path = std::path::Path::new(&req.source);
                if !path.is_absolute() {
                    return Err(ApiError::invalid(format!(
                        "{}: not an open disk, and not an absolute path",
                        req.source
                    )));
                }
                let opts = vdk_formats::OpenOptions {
                    read_only: true,
                    ..Default::default()
                };
                let opened = vdk_formats::open(path, &opts)
                    .map_err(|e| ApiError::io(format!("cannot open {}", path.display()), &e))?;
                IsoSource {
                    device: opened.device,
                    name: path.display().to_string(),
                    disk: None,
                }
            }
        };
        self.fs.mount_iso(source, &req.dir, opener)
    }
}
