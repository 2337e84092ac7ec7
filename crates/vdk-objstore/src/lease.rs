//! One writer at a time: the lease a writer takes on a disk.
//!
//! In a bucket the lease is the object `PREFIX/vdk-lease.json`, written only by conditional
//! puts: created if absent, replaced only if its ETag is the one read (a lease that ran out),
//! renewed only if it is still the one this writer put. Two writers racing for it cannot both
//! win, and a writer whose renewal finds another's lease has lost it for good.
//!
//! ```json
//! {"holder":"root@host pid 4242","id":"…","host":"host","pid":4242,"expires":1796208000}
//! ```
//!
//! A writer renews at a third of the lease's time and counts itself valid for two thirds
//! after a renewal started, so that a third is left for clocks that disagree. While it is not
//! valid (the store unreachable) it writes nothing; a renewal that succeeds later restores it.
//!
//! A lease left by a process on this host that no longer runs is stale and taken at once (a
//! `kill -9` does not lock a disk for the lease's time). In a `file://` directory the lease
//! is an flock() on `vdk-lease.lock`, released by the kernel when its holder exits.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};
use vdk_core::sync;

use crate::location::Location;
use crate::ObjError;

/// The lease object's name under the disk's prefix.
pub const LEASE: &str = "vdk-lease.json";
const LOCK: &str = "vdk-lease.lock";

#[derive(Debug, Deserialize, Serialize)]
struct Record {
    holder: String,
    id: String,
    host: String,
    pid: u32,
    /// The process's start time (clock ticks after boot), so that a reused pid is not
    /// taken for the holder.
    #[serde(default)]
    start: u64,
    /// Unix seconds.
    expires: u64,
    #[serde(default)]
    released: bool,
}

#[derive(Debug)]
enum Kind {
    Bucket {
        store: Arc<dyn ObjectStore>,
        key: Path,
    },
    Local {
        _file: File,
    },
}

#[derive(Debug)]
struct State {
    version: Option<UpdateVersion>,
    valid_until: Instant,
    lost: Option<String>,
}

/// A writer's lease on a disk.
#[derive(Debug)]
pub struct Lease {
    kind: Kind,
    ttl: Duration,
    id: String,
    holder: String,
    state: Mutex<State>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

fn holder_name() -> String {
    let user = vdk_core::sys::user_name();
    format!("{user}@{} pid {}", hostname(), std::process::id())
}

fn random_id() -> Result<String, ObjError> {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(|e| ObjError::Io(std::io::Error::other(e)))?;
    Ok(id.iter().map(|b| format!("{b:02x}")).collect())
}

/// When process `pid` started (clock ticks after boot), or None if it does not run (a
/// zombie does not).
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold anything, so split after its last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if matches!(fields.first(), Some(&("Z" | "X" | "x"))) {
        return None;
    }
    // Field 22 of the line is the 20th after the comm.
    fields.get(19)?.parse().ok()
}

/// Whether a lease record names a process on this host that no longer runs.
fn stale(r: &Record) -> bool {
    if r.host != hostname() {
        return false;
    }
    match process_start(r.pid) {
        None => true,
        Some(start) => r.start != 0 && start != r.start,
    }
}

impl Lease {
    /// Takes the lease on the disk at `loc`, or says who holds it.
    pub async fn acquire(loc: &Location, ttl: Duration) -> Result<Lease, ObjError> {
        let id = random_id()?;
        let holder = holder_name();
        if let Some(dir) = &loc.local {
            return Lease::acquire_local(&dir.join(LOCK), ttl, id, holder);
        }
        let store = loc.store.clone();
        let key = loc.key(LEASE);
        let started = Instant::now();
        for _ in 0..8 {
            let mode = match store.get(&key).await {
                Err(object_store::Error::NotFound { .. }) => PutMode::Create,
                Err(e) => return Err(e.into()),
                Ok(got) => {
                    let version = UpdateVersion {
                        e_tag: got.meta.e_tag.clone(),
                        version: got.meta.version.clone(),
                    };
                    let body = got.bytes().await?;
                    if let Ok(r) = serde_json::from_slice::<Record>(&body) {
                        let now = now_unix();
                        if !r.released && r.expires > now && !stale(&r) {
                            return Err(ObjError::LeaseHeld {
                                holder: r.holder,
                                expires_in: Some(Duration::from_secs(r.expires - now)),
                            });
                        }
                    }
                    PutMode::Update(version)
                }
            };
            let record = Record {
                holder: holder.clone(),
                id: id.clone(),
                host: hostname(),
                pid: std::process::id(),
                start: process_start(std::process::id()).unwrap_or(0),
                expires: now_unix() + ttl.as_secs().max(1),
                released: false,
            };
            match put(&*store, &key, &record, mode).await {
                Ok(v) => {
                    return Ok(Lease {
                        kind: Kind::Bucket { store, key },
                        ttl,
                        id,
                        holder,
                        state: Mutex::new(State {
                            version: Some(v),
                            valid_until: started + ttl * 2 / 3,
                            lost: None,
                        }),
                    })
                }
                Err(
                    object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. },
                ) => {
                    // Another writer got there between the read and the put: read again.
                }
                Err(
                    object_store::Error::NotImplemented { .. }
                    | object_store::Error::NotSupported { .. },
                ) => {
                    return Err(ObjError::BadUrl(format!(
                        "{} does not support conditional puts, which the writer's lease needs",
                        loc.url
                    )))
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ObjError::BadUrl(
            "the writer's lease is contended: try again".into(),
        ))
    }

    fn acquire_local(
        path: &std::path::Path,
        ttl: Duration,
        id: String,
        holder: String,
    ) -> Result<Lease, ObjError> {
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)?;
        if !vdk_core::sys::try_lock(&f, vdk_core::sys::Lock::Exclusive).unwrap_or(false) {
            let mut who = String::new();
            let _ = f.read_to_string(&mut who); // best effort: the name in the message
            return Err(ObjError::LeaseHeld {
                holder: who.trim().to_owned(),
                expires_in: None,
            });
        }
        f.set_len(0)?;
        f.rewind()?;
        writeln!(f, "{holder}")?;
        Ok(Lease {
            kind: Kind::Local { _file: f },
            ttl,
            id,
            holder,
            state: Mutex::new(State {
                version: None,
                valid_until: Instant::now() + Duration::from_secs(100 * 365 * 86400),
                lost: None,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        sync::lock(&self.state)
    }

    /// Whether the holder may write now.
    pub fn check(&self) -> Result<(), ObjError> {
        let st = self.lock();
        if let Some(who) = &st.lost {
            return Err(ObjError::LeaseLost(who.clone()));
        }
        if Instant::now() > st.valid_until {
            return Err(ObjError::LeaseExpired);
        }
        Ok(())
    }

    /// Whether the lease was taken over (for good).
    pub fn lost(&self) -> bool {
        self.lock().lost.is_some()
    }

    /// How often to renew.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    /// Renews the lease.
    pub async fn renew(&self) -> Result<(), ObjError> {
        let Kind::Bucket { store, key } = &self.kind else {
            return Ok(());
        };
        let (version, lost) = {
            let st = self.lock();
            (st.version.clone(), st.lost.clone())
        };
        if let Some(who) = lost {
            return Err(ObjError::LeaseLost(who));
        }
        let Some(version) = version else {
            return Ok(());
        };
        let started = Instant::now();
        let record = Record {
            holder: self.holder.clone(),
            id: self.id.clone(),
            host: hostname(),
            pid: std::process::id(),
            start: process_start(std::process::id()).unwrap_or(0),
            expires: now_unix() + self.ttl.as_secs().max(1),
            released: false,
        };
        match put(&**store, key, &record, PutMode::Update(version)).await {
            Ok(v) => {
                let mut st = self.lock();
                st.version = Some(v);
                st.valid_until = started + self.ttl * 2 / 3;
                Ok(())
            }
            Err(
                object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. },
            ) => {
                let who = match store.get(key).await {
                    Ok(g) => g
                        .bytes()
                        .await
                        .ok()
                        .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
                        .map_or_else(|| "another writer".into(), |r| r.holder),
                    Err(_) => "another writer".into(),
                };
                tracing::error!("the writer's lease was taken by {who}: writes stop");
                self.lock().lost = Some(who.clone());
                Err(ObjError::LeaseLost(who))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Gives the lease up (best effort: one that is not given up runs out).
    pub async fn release(&self) {
        let Kind::Bucket { store, key } = &self.kind else {
            return;
        };
        let version = {
            let mut st = self.lock();
            st.valid_until = Instant::now();
            st.version.take()
        };
        let (Some(version), false) = (version, self.lost()) else {
            return;
        };
        let record = Record {
            holder: self.holder.clone(),
            id: self.id.clone(),
            host: hostname(),
            pid: std::process::id(),
            start: process_start(std::process::id()).unwrap_or(0),
            expires: 0,
            released: true,
        };
        if let Err(e) = put(&**store, key, &record, PutMode::Update(version)).await {
            tracing::warn!("cannot give the writer's lease up (it runs out by itself): {e}");
        }
    }
}

async fn put(
    store: &dyn ObjectStore,
    key: &Path,
    record: &Record,
    mode: PutMode,
) -> Result<UpdateVersion, object_store::Error> {
    let body = serde_json::to_vec(record).unwrap_or_default();
    let opts = PutOptions {
        mode,
        ..PutOptions::default()
    };
    let r = store.put_opts(key, PutPayload::from(body), opts).await?;
    Ok(UpdateVersion {
        e_tag: r.e_tag,
        version: r.version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::location::StoreOptions;

    #[test]
    fn this_process_runs_and_others_are_told_apart() {
        let me = std::process::id();
        let start = process_start(me).unwrap();
        let mut r = Record {
            holder: "x".into(),
            id: "y".into(),
            host: hostname(),
            pid: me,
            start,
            expires: 0,
            released: false,
        };
        assert!(!stale(&r));
        r.start = start + 1;
        assert!(stale(&r), "the pid was reused");
        r.pid = 4_194_304 + 1; // above the kernel's pid_max
        assert!(stale(&r));
        r.host = "elsewhere".into();
        assert!(!stale(&r), "another host's processes are not known here");
    }

    #[test]
    fn a_local_lease_is_exclusive_and_names_its_holder() {
        let d = tempfile::tempdir().unwrap();
        let loc = Location::parse(
            &format!("file://{}", d.path().display()),
            &StoreOptions::default(),
            false,
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let a = rt
            .block_on(Lease::acquire(&loc, Duration::from_secs(30)))
            .unwrap();
        a.check().unwrap();
        // flock() locks are per open file: a second open in this process conflicts too.
        let e = rt
            .block_on(Lease::acquire(&loc, Duration::from_secs(30)))
            .unwrap_err();
        assert!(
            e.to_string().contains(&std::process::id().to_string()),
            "{e}"
        );
        drop(a);
        rt.block_on(Lease::acquire(&loc, Duration::from_secs(30)))
            .unwrap();
    }
}
