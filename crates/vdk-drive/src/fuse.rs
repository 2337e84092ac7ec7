//! The [`Drive`] answering FUSE requests.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};
use vdk_core::sync;

use crate::drive::{Attr, Drive, Errno as DriveErrno, FileState, NAME_MAX};

/// How long the kernel may keep names and attributes: short, other clients change the bucket.
const TTL: Duration = Duration::from_secs(1);
/// The largest read and write the kernel sends.
const MAX_IO: u32 = 1 << 20;

#[derive(Debug)]
pub(crate) struct DriveFs {
    pub(crate) drive: Arc<Drive>,
    access: crate::Access,
    handles: Mutex<HashMap<u64, (u64, Arc<FileState>)>>,
    next_fh: AtomicU64,
}

impl DriveFs {
    pub(crate) fn new(drive: Arc<Drive>, access: crate::Access) -> DriveFs {
        DriveFs {
            drive,
            access,
            handles: Mutex::default(),
            next_fh: AtomicU64::new(1),
        }
    }

    fn attr(&self, a: &Attr) -> FileAttr {
        FileAttr {
            ino: INodeNo(a.ino),
            size: a.size,
            blocks: a.size.div_ceil(512),
            atime: a.mtime,
            mtime: a.mtime,
            ctime: a.mtime,
            crtime: a.mtime,
            kind: if a.dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: match (a.dir, self.access.shared) {
                (true, true) => 0o755,
                (false, true) => 0o644,
                (true, false) => 0o700,
                (false, false) => 0o600,
            },
            nlink: a.nlink,
            uid: self.access.uid,
            gid: self.access.gid,
            rdev: 0,
            blksize: 1 << 20,
            flags: 0,
        }
    }

    fn handle(&self, fh: FileHandle) -> Option<(u64, Arc<FileState>)> {
        sync::lock(&self.handles)
            .get(&fh.0)
            .map(|(i, f)| (*i, Arc::clone(f)))
    }

    /// Uploads the file of `fh` if it changed: close (`flush`) and `fsync` alike.
    fn upload(&self, fh: FileHandle, reply: ReplyEmpty) {
        let Some((ino, f)) = self.handle(fh) else {
            return reply.error(Errno::EBADF);
        };
        match self.drive.upload(ino, &f) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn add_handle(&self, ino: u64, f: Arc<FileState>) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        sync::lock(&self.handles).insert(fh, (ino, f));
        FileHandle(fh)
    }
}

impl Filesystem for DriveFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(MAX_IO);
        if let Err(max) = config.set_max_readahead(MAX_IO) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.drive.lookup(parent.0, name) {
            Ok(a) => reply.entry(&TTL, &self.attr(&a), Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.drive.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.drive.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &self.attr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // Modes and owners are not kept (see the README): accepted and left as they are.
        if let Some(size) = size {
            let r = match fh.and_then(|fh| self.handle(fh)) {
                Some((_, f)) => self.drive.truncate(ino.0, &f, size),
                None => self.drive.set_size(ino.0, size),
            };
            if let Err(e) = r {
                return reply.error(errno(e));
            }
        }
        if let Some(t) = mtime {
            let t = match t {
                TimeOrNow::SpecificTime(t) => t,
                TimeOrNow::Now => SystemTime::now(),
            };
            self.drive.set_mtime(ino.0, t);
        }
        match self.drive.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &self.attr(&a)),
            Err(e) => reply.error(errno(e)),
        }
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
        // Device nodes, FIFOs and sockets have no objects to be.
        reply.error(Errno::EPERM);
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        match self.drive.mkdir(parent.0, name) {
            Ok(a) => reply.entry(&TTL, &self.attr(&a), Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.drive.unlink(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.drive.rmdir(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT)
        {
            return reply.error(Errno::EINVAL);
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        match self
            .drive
            .rename(parent.0, name, newparent.0, newname, noreplace)
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.drive.open(ino.0) {
            Ok(f) => reply.opened(self.add_handle(ino.0, f), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        match self.drive.create(parent.0, name) {
            Ok((a, f)) => {
                let fh = self.add_handle(a.ino, f);
                reply.created(&TTL, &self.attr(&a), Generation(0), fh, FopenFlags::empty());
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some((ino, f)) = self.handle(fh) else {
            return reply.error(Errno::EBADF);
        };
        match self.drive.read(ino, &f, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some((ino, f)) = self.handle(fh) else {
            return reply.error(Errno::EBADF);
        };
        match self.drive.write(ino, &f, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.upload(fh, reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.upload(fh, reply);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let h = sync::lock(&self.handles).remove(&fh.0);
        if let Some((ino, f)) = h {
            self.drive.release(ino, &f);
        }
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let list = match self.drive.readdir(ino.0) {
            Ok(l) => l,
            Err(e) => return reply.error(errno(e)),
        };
        let dots = [(ino.0, true, "."), (ino.0, true, "..")];
        let entries = dots
            .into_iter()
            .chain(list.iter().map(|(i, d, n)| (*i, *d, n.as_str())));
        for (i, (e_ino, dir, name)) in entries
            .enumerate()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
        {
            let kind = if dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            if reply.add(INodeNo(e_ino), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // A bucket has no size: a petabyte, all free.
        let blocks = (1u64 << 50) / 4096;
        reply.statfs(
            blocks,
            blocks,
            blocks,
            1 << 40,
            1 << 40,
            4096,
            u32::try_from(NAME_MAX).unwrap_or(255),
            4096,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }
}

/// A drive error as FUSE answers it.
fn errno(e: DriveErrno) -> Errno {
    Errno::from_i32(e.code())
}
