//! A cloud drive: the objects and prefixes under a bucket's prefix as files and folders of a
//! FUSE file system.
//!
//! Reads fetch the ranges they need and keep them in a local cache; writes go to the cache
//! and the file is uploaded when it is closed or synced (multipart when large); rename,
//! delete, mkdir and rmdir change the objects as rclone's mounts do. What is not POSIX is
//! listed in the project's README (*Cloud drive*). See [`drive`] for how it works.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// Tests build data from constants; production code converts with checks.
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

pub mod drive;
mod fuse;
mod listing;

use std::io;
use std::path::Path;
use std::sync::Arc;

use tracing::info;
use vdk_fs::{FuseMount, MountSpec};
use vdk_objstore::Location;

pub use drive::Drive;

/// Threads answering FUSE requests.
pub const THREADS: usize = 8;

/// A mapped drive.
#[derive(Debug)]
pub struct DriveMount {
    session: FuseMount,
    drive: Arc<Drive>,
}

/// Who a drive's files belong to, and who may read them.
#[derive(Clone, Copy, Debug)]
pub struct Access {
    /// The owner of every file and folder (the user the drive was mapped for).
    pub uid: u32,
    /// Their group.
    pub gid: u32,
    /// Every local user may read it (files 0644, folders 0755); otherwise only the owner
    /// (0600, 0700) and root.
    pub shared: bool,
}

impl DriveMount {
    /// Maps `location` on `mountpoint` (an existing directory), caching in `cache_dir`.
    /// `source` names it in /proc/mounts.
    pub fn map(
        location: &Location,
        mountpoint: &Path,
        cache_dir: &Path,
        source: &str,
        access: Access,
    ) -> io::Result<DriveMount> {
        let drive = Arc::new(Drive::new(
            Arc::clone(&location.store),
            location.lister.clone(),
            location.prefix.clone(),
            cache_dir.to_owned(),
        )?);
        // The bucket must answer now, not at the first `ls`.
        drive.readdir(drive::ROOT).map_err(|e| {
            io::Error::new(
                io::Error::from_raw_os_error(e.code()).kind(),
                format!(
                    "cannot list {source}: {}",
                    io::Error::from_raw_os_error(e.code())
                ),
            )
        })?;
        let fs = fuse::DriveFs::new(Arc::clone(&drive), access);
        let spec = MountSpec {
            source,
            subtype: "vdk-drive",
            read_only: false,
            // Other users reach the mount only when it is theirs to reach: shared, or mapped
            // for a user who is not the daemon's (the kernel then checks the modes: 0600/0700
            // are that user's alone).
            others: access.shared || access.uid != rustix::process::geteuid().as_raw(),
            threads: THREADS,
        };
        let session = FuseMount::mount(fs, mountpoint, &spec)?;
        info!(mountpoint = %mountpoint.display(), source, "cloud drive mapped");
        Ok(DriveMount { session, drive })
    }

    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        self.session.mountpoint()
    }

    /// Unmaps it, uploading what is still changed. With `lazy`, a busy mount is detached and
    /// goes when its last user lets go; without, a busy mount is refused (`EBUSY`) and stays.
    pub fn unmap(&self, lazy: bool) -> io::Result<()> {
        if self.session.unmount(lazy)? {
            self.drive.upload_all();
            info!(mountpoint = %self.mountpoint().display(), "cloud drive unmapped");
        }
        Ok(())
    }
}

impl Drop for DriveMount {
    fn drop(&mut self) {
        let _ = self.unmap(true);
    }
}
