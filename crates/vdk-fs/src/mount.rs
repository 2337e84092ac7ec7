//! Mounting a FUSE file system the way every vdk file system is mounted (the ISO browser,
//! the cloud drive): the same options, threads and descriptor per thread, and the same
//! unmount, which refuses a busy mount unless told to detach it.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use fuser::{BackgroundSession, Filesystem, MountOption, SessionACL};
use tracing::debug;
use vdk_core::sync;

/// How a vdk file system is mounted.
#[derive(Clone, Copy, Debug)]
pub struct MountSpec<'a> {
    /// What it shows, as /proc/mounts names it (an image, a bucket URL).
    pub source: &'a str,
    /// Its kind, shown as `fuse.SUBTYPE` (`vdk-iso`, `vdk-drive`).
    pub subtype: &'a str,
    /// Mounted read-only.
    pub read_only: bool,
    /// Other users may enter it (the modes of its files still apply); otherwise only the
    /// user who mounted it (and root).
    pub others: bool,
    /// Threads answering requests.
    pub threads: usize,
}

/// A FUSE file system mounted on a directory, answered by its own threads until unmounted.
#[derive(Debug)]
pub struct FuseMount {
    mountpoint: PathBuf,
    session: Mutex<Option<BackgroundSession>>,
}

impl FuseMount {
    /// Mounts `fs` on `mountpoint` (an existing directory) as `spec` says: nosuid, nodev,
    /// noatime, permissions checked by the kernel from the modes `fs` reports.
    pub fn mount(
        fs: impl Filesystem + 'static,
        mountpoint: &Path,
        spec: &MountSpec<'_>,
    ) -> io::Result<FuseMount> {
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            MountOption::FSName(spec.source.to_owned()),
            MountOption::Subtype(spec.subtype.to_owned()),
            MountOption::DefaultPermissions,
            MountOption::NoSuid,
            MountOption::NoDev,
            MountOption::NoAtime,
        ];
        if spec.read_only {
            config.mount_options.push(MountOption::RO);
        }
        config.acl = if spec.others {
            SessionACL::All
        } else {
            SessionACL::Owner
        };
        config.n_threads = Some(spec.threads.max(1));
        // Each thread reads requests from a descriptor of its own.
        config.clone_fd = true;
        let session = fuser::Session::new(fs, mountpoint, &config).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot mount on {}: {e}", mountpoint.display()),
            )
        })?;
        Ok(FuseMount {
            mountpoint: mountpoint.to_owned(),
            session: Mutex::new(Some(session.spawn()?)),
        })
    }

    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmounts it and waits for its threads; `Ok(false)` if it was unmounted already. With
    /// `lazy`, a busy mount is detached and goes when its last user lets go; without, a busy
    /// mount is refused (`EBUSY`) and stays.
    pub fn unmount(&self, lazy: bool) -> io::Result<bool> {
        let mut slot = sync::lock(&self.session);
        let Some(session) = slot.take() else {
            return Ok(false);
        };
        let dir = &self.mountpoint;
        if !lazy {
            // Try first, so that a busy mount is refused and left as it is.
            if let Err(e) = rustix::mount::unmount(dir, rustix::mount::UnmountFlags::empty()) {
                if e == rustix::io::Errno::BUSY {
                    *slot = Some(session);
                    return Err(io::Error::from(e));
                }
            }
        }
        if let Err(e) = session.umount_and_join() {
            debug!(error = %e, mountpoint = %dir.display(), "busy, detaching lazily");
            let _ = rustix::mount::unmount(dir, rustix::mount::UnmountFlags::DETACH);
        }
        Ok(true)
    }
}
