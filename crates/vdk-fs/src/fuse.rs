//! An [`Iso`] as a read-only FUSE file system.
//!
//! The kernel keeps the pages it read (`FOPEN_KEEP_CACHE`: nothing on the disc changes) and
//! reads ahead up to 1 MiB; several threads answer, so parallel readers do not wait for each
//! other. Every call that would change something answers `EROFS` (and the mount itself is
//! read-only, so the kernel refuses most of them before they come here).
//!
//! Inodes are the ISO's own stable numbers; the nodes the kernel knows are kept, counted by
//! its lookups, and dropped when it forgets them.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, Request,
};
use tracing::{debug, info};
use vdk_core::sync;

use crate::iso9660::{Iso, IsoError, Kind, Node, Time, ROOT_INO};
use crate::mount::{FuseMount, MountSpec};

/// How long the kernel may keep names and attributes: the image never changes under it.
const TTL: Duration = Duration::from_secs(3600);
/// Largest read-ahead asked of the kernel.
const READAHEAD: u32 = 1 << 20;
/// Threads answering requests.
pub const DEFAULT_THREADS: usize = 4;

#[derive(Debug)]
struct State {
    iso: Iso,
    /// The nodes the kernel holds, with its lookup count.
    known: Mutex<HashMap<u64, (Arc<Node>, u64)>>,
}

impl State {
    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (Arc<Node>, u64)>> {
        sync::lock(&self.known)
    }

    fn node(&self, ino: INodeNo) -> Option<Arc<Node>> {
        if ino.0 == ROOT_INO {
            return Some(self.iso.root());
        }
        self.known().get(&ino.0).map(|(n, _)| Arc::clone(n))
    }

    fn remember(&self, n: &Arc<Node>) {
        let mut k = self.known();
        let e = k.entry(n.ino).or_insert_with(|| (Arc::clone(n), 0));
        e.1 += 1;
    }
}

fn errno(e: &IsoError) -> Errno {
    Errno::from_i32(e.errno())
}

fn time(t: Time) -> SystemTime {
    let (secs, nanos) = t;
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs.unsigned_abs(), nanos)
    } else {
        UNIX_EPOCH - Duration::new(secs.unsigned_abs(), 0) + Duration::from_nanos(u64::from(nanos))
    }
}

fn file_type(k: &Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Directory => FileType::Directory,
        Kind::Symlink(_) => FileType::Symlink,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
    }
}

fn attr(n: &Node) -> FileAttr {
    FileAttr {
        ino: INodeNo(n.ino),
        size: n.size,
        blocks: n.size.div_ceil(512),
        atime: time(n.atime),
        mtime: time(n.mtime),
        ctime: time(n.ctime),
        crtime: time(n.ctime),
        kind: file_type(&n.kind),
        perm: n.perm,
        nlink: n.nlink,
        uid: n.uid,
        gid: n.gid,
        rdev: n.rdev,
        blksize: 2048,
        flags: 0,
    }
}

#[derive(Debug)]
struct IsoFs(Arc<State>);

thread_local! {
    /// Each FUSE thread's read buffer.
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Filesystem for IsoFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Reads of up to 1 MiB: fuser sizes max_pages from max_write and max_readahead, and
        // the kernel caps read-ahead at what it offers (128 KiB by default; see mount()).
        let _ = config.set_max_write(READAHEAD);
        if let Err(max) = config.set_max_readahead(READAHEAD) {
            let _ = config.set_max_readahead(max);
        }
        // Read-ahead requests in flight at once (the kernel's default is 12).
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(dir) = self.0.node(parent) else {
            return reply.error(Errno::ENOENT);
        };
        match self.0.iso.list(&dir) {
            Ok(list) => match list.iter().find(|n| n.name == name.as_bytes()) {
                Some(n) => {
                    self.0.remember(n);
                    reply.entry(&TTL, &attr(n), Generation(0));
                }
                None => reply.error(Errno::ENOENT),
            },
            Err(e) => {
                debug!(error = %e, "cannot list a directory");
                reply.error(errno(&e));
            }
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut k = self.0.known();
        if let Some(e) = k.get_mut(&ino.0) {
            e.1 = e.1.saturating_sub(nlookup);
            if e.1 == 0 {
                k.remove(&ino.0);
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.0.node(ino) {
            Some(n) => reply.attr(&TTL, &attr(&n)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.0.node(ino).map(|n| n.kind.clone()) {
            Some(Kind::Symlink(t)) => reply.data(&t),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match self.0.node(ino) {
            Some(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(n) = self.0.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let want = usize::try_from(u64::from(size).min(n.size.saturating_sub(offset))).unwrap_or(0);
        READ_BUF.with_borrow_mut(|buf| {
            // Kept between requests: a fresh 1 MiB buffer costs page faults every time.
            if buf.len() < want {
                buf.resize(want, 0);
            }
            match self.0.iso.read(&n, offset, &mut buf[..want]) {
                Ok(got) => reply.data(&buf[..got]),
                Err(e) => {
                    debug!(error = %e, ino = ino.0, offset, "read failed");
                    reply.error(errno(&e));
                }
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(dir) = self.0.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let list = match self.0.iso.list(&dir) {
            Ok(l) => l,
            Err(e) => return reply.error(errno(&e)),
        };
        let dots = [
            (dir.ino, FileType::Directory, &b"."[..]),
            (dir.parent, FileType::Directory, &b".."[..]),
        ];
        let entries = dots.into_iter().chain(
            list.iter()
                .map(|n| (n.ino, file_type(&n.kind), &n.name[..])),
        );
        for (i, (ino, kind, name)) in entries
            .enumerate()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
        {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.0.iso.size() / 2048;
        reply.statfs(blocks, 0, 0, 0, 0, 2048, 255, 2048);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if mask.contains(AccessFlags::W_OK) {
            return reply.error(Errno::EROFS);
        }
        reply.ok();
    }

    // Everything that would change the file system.

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: fuser::ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }
}

/// Raises the read-ahead of the mount's backing device info to [`READAHEAD`]: the kernel
/// gives a FUSE mount 128 KiB, which makes a stream of small reads (`cat` reads 128 KiB at a
/// time) wait for one FUSE round trip per read. Best effort: only root may, and a kernel
/// without the knob keeps its default.
fn raise_readahead(mountpoint: &Path) {
    let Ok(st) = rustix::fs::stat(mountpoint) else {
        return;
    };
    let dev = st.st_dev;
    let bdi = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        rustix::fs::major(dev),
        rustix::fs::minor(dev)
    );
    if let Err(e) = std::fs::write(&bdi, format!("{}\n", READAHEAD >> 10)) {
        debug!(path = %bdi, error = %e, "cannot raise the read-ahead");
    }
}

/// An ISO image mounted as a read-only file system.
#[derive(Debug)]
pub struct IsoMount {
    session: FuseMount,
    label: String,
}

impl IsoMount {
    /// Mounts `iso` on `mountpoint` (an existing directory), answered by `threads` threads.
    /// `source` names it in /proc/mounts.
    pub fn mount(
        iso: Iso,
        mountpoint: &Path,
        source: &str,
        threads: usize,
    ) -> io::Result<IsoMount> {
        let label = iso.label().to_owned();
        let state = Arc::new(State {
            iso,
            known: Mutex::default(),
        });
        let spec = MountSpec {
            source,
            subtype: "vdk-iso",
            read_only: true,
            // Anyone may browse (the daemon mounting it runs as root); modes still apply.
            others: true,
            threads,
        };
        let session = FuseMount::mount(IsoFs(state), mountpoint, &spec)?;
        raise_readahead(mountpoint);
        info!(mountpoint = %mountpoint.display(), label = %label, "ISO file system mounted");
        Ok(IsoMount { session, label })
    }

    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        self.session.mountpoint()
    }

    /// The volume label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Unmounts it. With `lazy`, a busy mount is detached and goes when its last user lets
    /// go; without, a busy mount is refused (`EBUSY`) and stays.
    pub fn unmount(&self, lazy: bool) -> io::Result<()> {
        if self.session.unmount(lazy)? {
            info!(mountpoint = %self.mountpoint().display(), "ISO file system unmounted");
        }
        Ok(())
    }
}

impl Drop for IsoMount {
    fn drop(&mut self) {
        let _ = self.unmount(true);
    }
}
