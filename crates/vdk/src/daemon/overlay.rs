//! Live changes to a cow disk's overlay chain: commit (merge into the base), discard (empty
//! it) and snapshot (a new overlay on top), each done with the disk's requests paused. The
//! first two change what a file system on the disk reads underneath it, so they are refused
//! while one is mounted (by vdk or anyone) unless forced.

use std::fs;
use std::path::Path;

use tracing::info;

use vdk_core::sync::lock;

use super::disks::Disk;
#[cfg(target_os = "linux")]
use super::mount;
use super::Daemon;
use crate::control::{ApiError, CommitReport, ErrorKind, SnapshotReport};

/// Shorthand for the wrong-argument error.
fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::invalid(msg)
}

impl Daemon {
    /// What uses a disk's contents above the daemon: its mount, ISO browsers reading it, and
    /// whatever anyone mounted or stacked on its block device.
    pub(super) fn uses(&self, disk: &Disk) -> Vec<String> {
        let mut uses = Vec::new();
        let st = lock(&disk.state);
        if let Some(dir) = &st.mount {
            uses.push(format!("mounted on {} (by vdk)", dir.display()));
        }
        #[cfg(target_os = "linux")]
        for dir in self.fs.on_disk(&disk.id) {
            if st.mount.as_deref() != Some(dir.as_path()) {
                uses.push(format!("browsed on {} (vdk fs mount)", dir.display()));
            }
        }
        #[cfg(target_os = "linux")]
        if let Some(dev) = &st.block_device {
            for u in mount::device_uses(dev) {
                let said = st
                    .mount
                    .as_ref()
                    .is_some_and(|m| u == format!("mounted on {}", m.display()));
                if !said {
                    uses.push(format!("{} {u}", dev.display()));
                }
            }
        }
        uses
    }

    /// Refuses `what` on a disk whose contents something above uses, unless `force`.
    fn refuse_if_in_use(&self, disk: &Disk, what: &str, force: bool) -> Result<(), ApiError> {
        let uses = self.uses(disk);
        if uses.is_empty() || force {
            return Ok(());
        }
        Err(ApiError::new(
            ErrorKind::Busy,
            format!(
                "{} is in use: {}; a live {what} changes the disk under it (unmount it first, \
                 or add --force)",
                disk.id,
                uses.join(", ")
            ),
        ))
    }

    /// Merges an open cow disk's overlay into its base (or, with `discard`, empties it), with
    /// the disk's requests paused meanwhile: the chain is flushed and closed, the overlay
    /// committed, and the chain opened again. Refused if another disk shares the base.
    pub(super) fn commit(
        &self,
        key: &str,
        discard: bool,
        force: bool,
    ) -> Result<CommitReport, ApiError> {
        let _one_at_a_time = lock(&self.changing);
        let disk = self.disks.find(key)?;
        self.refuse_if_in_use(&disk, if discard { "discard" } else { "commit" }, force)?;
        let Some(overlay) = lock(&disk.recipe).overlay() else {
            return Err(invalid(format!(
                "{} has no cow overlay file to {}",
                disk.id,
                if discard { "discard" } else { "commit" }
            )));
        };
        let mut report = None;
        disk.device.swap(|old| {
            if let Err(e) = old.flush() {
                return Err((
                    ApiError::new(ErrorKind::Io, format!("flush before commit: {e}")),
                    old,
                ));
            }
            // The overlay and the base are released with the chain (the stats handle is a
            // part of it too).
            *lock(&disk.stats) = None;
            drop(old);
            let done = if discard {
                // The daemon knows this file is the disk's overlay, even one over a base
                // that records no file (an object-store disk).
                vdk_filters::cow::discard(&overlay, true)
                    .map(|()| vdk_filters::cow::CommitReport::default())
            } else {
                vdk_filters::cow::commit(&overlay)
            };
            let rebuilt = lock(&disk.recipe).build();
            let (chain, _) = match rebuilt {
                Ok(c) => c,
                Err(e) => {
                    disk.device.close();
                    let msg = format!(
                        "the disk could not be opened again and is closed: {}",
                        e.message
                    );
                    return Err((
                        ApiError::new(ErrorKind::Io, msg),
                        super::tracked::placeholder(),
                    ));
                }
            };
            *lock(&disk.stats) = chain.stats.clone();
            match done {
                Ok(r) => {
                    report = Some(r);
                    Ok(chain.device)
                }
                Err(e) => Err((ApiError::io("commit", &e), chain.device)),
            }
        })?;
        let r = report.unwrap_or_default();
        info!(id = %disk.id, overlay = %overlay.display(), discard, "overlay merged or emptied live");
        Ok(CommitReport {
            id: disk.id.clone(),
            data: r.data,
            zeroed: r.zeroed,
        })
    }

    /// Starts a new overlay `new` on top of an open cow disk's overlay and switches the disk
    /// to it, with the disk's requests paused meanwhile. The old overlay is not written any
    /// more; the chain is new -> old -> base.
    pub(super) fn snapshot(
        &self,
        key: &str,
        new: &Path,
        force: bool,
    ) -> Result<SnapshotReport, ApiError> {
        let _one_at_a_time = lock(&self.changing);
        let disk = self.disks.find(key)?;
        self.refuse_if_in_use(&disk, "snapshot", force)?;
        let Some(old) = lock(&disk.recipe).overlay() else {
            return Err(invalid(format!(
                "{} has no cow overlay file to snapshot",
                disk.id
            )));
        };
        if new.exists() {
            return Err(invalid(format!(
                "{} exists: a snapshot makes a new overlay",
                new.display()
            )));
        }
        disk.device.swap(|chain| {
            if let Err(e) = chain.flush() {
                return Err((
                    ApiError::new(ErrorKind::Io, format!("flush before snapshot: {e}")),
                    chain,
                ));
            }
            *lock(&disk.stats) = None;
            drop(chain);
            let made = vdk_filters::cow::snapshot(&old, new);
            if made.is_ok() {
                lock(&disk.recipe).set_overlay(new);
                for f in lock(&disk.filters).iter_mut() {
                    if f.starts_with("cow") {
                        *f = format!("cow:overlay={}", new.display());
                    }
                }
            }
            let rebuilt = lock(&disk.recipe).build();
            let rebuilt = match (made, rebuilt) {
                (Ok(()), Ok((c, _))) => Ok(c),
                (Ok(()), Err(e)) => {
                    // Back to the old overlay, untouched.
                    let _ = fs::remove_file(new);
                    lock(&disk.recipe).set_overlay(&old);
                    Err((e, lock(&disk.recipe).build()))
                }
                (Err(e), _) => Err((ApiError::io("snapshot", &e), lock(&disk.recipe).build())),
            };
            match rebuilt {
                Ok(c) => {
                    *lock(&disk.stats) = c.stats.clone();
                    Ok(c.device)
                }
                Err((e, Ok((c, _)))) => {
                    *lock(&disk.stats) = c.stats.clone();
                    Err((e, c.device))
                }
                Err((e, Err(e2))) => {
                    disk.device.close();
                    let msg = format!(
                        "{}; the disk could not be opened again and is closed: {}",
                        e.message, e2.message
                    );
                    Err((
                        ApiError::new(ErrorKind::Io, msg),
                        super::tracked::placeholder(),
                    ))
                }
            }
        })?;
        info!(id = %disk.id, old = %old.display(), new = %new.display(), "snapshot: new overlay");
        Ok(SnapshotReport {
            id: disk.id.clone(),
            overlay: new.to_owned(),
            previous: old,
        })
    }
}
