//! The FUSE export: one directory, mounted by the process that owns the disks, holding one
//! regular file per disk. Reading and writing a file reads and writes its disk; `fsync`
//! flushes it; `fallocate` punches holes (trim) and zeroes ranges.
//!
//! The file is built for a loop device on top of it:
//! - files are opened with `FOPEN_DIRECT_IO`, so the kernel keeps no second copy of the pages
//!   that the block device above already caches, and with `FOPEN_PARALLEL_DIRECT_WRITES`, so
//!   writes to one file are not serialised on its inode lock;
//! - requests go up to 1 MiB (`max_write`, `max_pages`), and asynchronous direct I/O
//!   (`FUSE_ASYNC_DIO`) lets the kernel send one loop request's pieces at once;
//! - several threads, each with its own `/dev/fuse` descriptor, answer requests in parallel,
//!   and up to [`MAX_BACKGROUND`] asynchronous requests may be queued.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    WriteFlags,
};
use tracing::{debug, info, warn};
use vdk_core::sync;
use vdk_core::BlockDevice;

/// Largest read or write the kernel sends in one request.
pub const MAX_REQUEST: u32 = 1 << 20;
/// Asynchronous requests (loop device I/O) the kernel keeps in flight.
pub const MAX_BACKGROUND: u16 = 128;
/// Threads answering requests.
pub const DEFAULT_THREADS: usize = 8;

/// How long the kernel may cache names and attributes. Sizes never change, and files come
/// and go only by [`FuseExport::add`] and [`FuseExport::remove`].
const TTL: Duration = Duration::from_secs(1);

const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;

/// A disk shown as a file.
#[derive(Debug)]
struct DiskFile {
    name: String,
    device: Arc<dyn BlockDevice>,
    /// Grows with the disk ([`FuseExport::grow`]).
    size: AtomicU64,
    read_only: bool,
    trim: bool,
    /// The file that holds the disk byte for byte (a raw image, no filter), for FUSE
    /// passthrough: the kernel then reads and writes it itself.
    backing: Option<std::fs::File>,
    /// Its id in the kernel, once a first open registered it; dropped with the file.
    backing_id: Mutex<Option<Arc<fuser::BackingId>>>,
}

impl DiskFile {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
}

#[derive(Debug, Default)]
struct Files {
    by_ino: HashMap<u64, Arc<DiskFile>>,
    by_name: BTreeMap<String, u64>,
}

#[derive(Debug)]
struct State {
    files: RwLock<Files>,
    /// The kernel passes reads and writes of files with a backing file straight to it.
    passthrough: std::sync::atomic::AtomicBool,
    next_ino: AtomicU64,
    uid: u32,
    gid: u32,
    mounted_at: SystemTime,
}

impl State {
    fn file(&self, ino: INodeNo) -> Option<Arc<DiskFile>> {
        let files = sync::read(&self.files);
        files.by_ino.get(&ino.0).cloned()
    }

    fn root_attr(&self) -> FileAttr {
        self.attr(INodeNo::ROOT, FileType::Directory, 0, 0o755)
    }

    fn file_attr(&self, ino: INodeNo, f: &DiskFile) -> FileAttr {
        let perm = if f.read_only { 0o400 } else { 0o600 };
        self.attr(ino, FileType::RegularFile, f.size(), perm)
    }

    fn attr(&self, ino: INodeNo, kind: FileType, size: u64, perm: u16) -> FileAttr {
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.mounted_at,
            mtime: self.mounted_at,
            ctime: self.mounted_at,
            crtime: self.mounted_at,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

/// The file system given to fuser.
#[derive(Debug)]
struct DiskFs(Arc<State>);

fn errno(e: &vdk_core::Error) -> Errno {
    Errno::from_i32(e.errno().raw())
}

thread_local! {
    /// Each FUSE thread's read buffer, kept between requests.
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Filesystem for DiskFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(max) = config.set_max_write(MAX_REQUEST) {
            warn!(max, "kernel limits FUSE writes below 1 MiB");
        }
        let _ = config.set_max_readahead(MAX_REQUEST);
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND / 4 * 3);
        let wanted = InitFlags::FUSE_ASYNC_DIO
            | InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP
            | InitFlags::FUSE_PASSTHROUGH;
        let have = config.capabilities() & wanted;
        if config.add_capabilities(have).is_err() {
            warn!("kernel refused FUSE capabilities");
        }
        // Passthrough needs a stacking depth of one (the export over the images' file system).
        let passthrough =
            have.contains(InitFlags::FUSE_PASSTHROUGH) && config.set_max_stack_depth(1).is_ok();
        self.0.passthrough.store(passthrough, Ordering::Relaxed);
        debug!(?have, "FUSE export initialised");
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        let files = sync::read(&self.0.files);
        let found = name
            .to_str()
            .and_then(|n| files.by_name.get(n))
            .and_then(|ino| Some((*ino, files.by_ino.get(ino)?)));
        match found {
            // Names are not cached: a disk closed and opened again gets a new inode under
            // the same name, and must be found at once.
            Some((ino, f)) => {
                let attr = self.0.file_attr(INodeNo(ino), f);
                reply.entry(&Duration::ZERO, &attr, Generation(0));
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT {
            return reply.attr(&TTL, &self.0.root_attr());
        }
        match self.0.file(ino) {
            Some(f) => reply.attr(&TTL, &self.0.file_attr(ino, &f)),
            None => reply.error(Errno::ENOENT),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
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
        let Some(f) = self.0.file(ino) else {
            return reply.error(Errno::ENOENT);
        };
        // A disk has the size it has: only a "truncate" to that same size is accepted.
        // Owner, mode and times are fixed; changing them is quietly a no-op, as on /dev.
        match size {
            Some(s) if s != f.size() => reply.error(Errno::EPERM),
            _ => reply.attr(&TTL, &self.0.file_attr(ino, &f)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some(f) = self.0.file(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if f.read_only && flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        if let (Some(file), true) = (&f.backing, self.0.passthrough.load(Ordering::Relaxed)) {
            let mut slot = sync::lock(&f.backing_id);
            if slot.is_none() {
                match reply.open_backing(file) {
                    Ok(id) => {
                        info!(file = %f.name, "FUSE passthrough: the kernel reads and writes the image itself");
                        *slot = Some(Arc::new(id));
                    }
                    Err(e) => warn!(file = %f.name, "no FUSE passthrough, served instead: {e}"),
                }
            }
            if let Some(id) = &*slot {
                return reply.opened_passthrough(FileHandle(ino.0), FopenFlags::empty(), id);
            }
        }
        reply.opened(
            FileHandle(ino.0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        );
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
        let Some(f) = self.0.file(ino) else {
            return reply.error(Errno::EIO);
        };
        let len = f.size().saturating_sub(offset).min(u64::from(size));
        // len <= size, a u32.
        let len = usize::try_from(len).unwrap_or(0);
        READ_BUF.with_borrow_mut(|buf| {
            if buf.len() < len {
                buf.resize(len, 0);
            }
            match f.device.read_at(&mut buf[..len], offset) {
                Ok(()) => reply.data(&buf[..len]),
                Err(e) => {
                    warn!(disk = %f.name, offset, len, error = %e, "read failed");
                    reply.error(errno(&e));
                }
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(f) = self.0.file(ino) else {
            return reply.error(Errno::EIO);
        };
        if f.read_only {
            return reply.error(Errno::EROFS);
        }
        let end = offset.checked_add(data.len() as u64);
        if end.is_none_or(|end| end > f.size()) {
            // Past the end of a fixed-size disk, as a block device answers.
            return reply.error(Errno::ENOSPC);
        }
        // O_SYNC / O_DSYNC writers get forced unit access.
        let fua = flags.0 & (rustix::fs::OFlags::DSYNC.bits() as i32) != 0;
        match f.device.write_at(data, offset, fua) {
            // data.len() <= max_write, a u32.
            Ok(()) => reply.written(u32::try_from(data.len()).unwrap_or(u32::MAX)),
            Err(e) => {
                warn!(disk = %f.name, offset, len = data.len(), error = %e, "write failed");
                reply.error(errno(&e));
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) promises nothing about durability; fsync does.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let Some(f) = self.0.file(ino) else {
            return reply.error(Errno::EIO);
        };
        match f.device.flush() {
            Ok(()) => reply.ok(),
            Err(e) => {
                warn!(disk = %f.name, error = %e, "flush failed");
                reply.error(errno(&e));
            }
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let Some(f) = self.0.file(ino) else {
            return reply.error(Errno::EIO);
        };
        if f.read_only {
            return reply.error(Errno::EROFS);
        }
        if offset.checked_add(length).is_none_or(|end| end > f.size()) {
            return reply.error(Errno::ENOSPC);
        }
        let done = match mode & !FALLOC_FL_KEEP_SIZE {
            // Allocation inside a disk of fixed size: nothing to do.
            0 => Ok(()),
            FALLOC_FL_PUNCH_HOLE if f.trim => f.device.trim(offset, length),
            FALLOC_FL_PUNCH_HOLE => f.device.write_zeroes(offset, length, true, false),
            FALLOC_FL_ZERO_RANGE => f.device.write_zeroes(offset, length, false, false),
            _ => return reply.error(Errno::EOPNOTSUPP),
        };
        match done {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let files = sync::read(&self.0.files);
        let mut entries = vec![
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
        ];
        for (name, ino) in &files.by_name {
            entries.push((INodeNo(*ino), FileType::RegularFile, name));
        }
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(skip) {
            if reply.add(ino, i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let files = sync::read(&self.0.files);
        let bytes: u64 = files.by_ino.values().map(|f| f.size()).sum();
        let n = files.by_ino.len() as u64;
        reply.statfs(bytes / 4096, 0, 0, n, 0, 4096, 255, 4096);
    }
}

/// A mounted FUSE export. Dropping it unmounts the directory (lazily, if something still
/// uses a file in it).
#[derive(Debug)]
pub struct FuseExport {
    mountpoint: PathBuf,
    state: Arc<State>,
    session: Mutex<Option<fuser::BackgroundSession>>,
}

impl FuseExport {
    /// Mounts an empty export on `mountpoint` (created if missing), answered by `threads`
    /// threads. A stale FUSE mount left there by a process that died is detached first.
    pub fn mount(mountpoint: &Path, threads: usize) -> io::Result<FuseExport> {
        detach_if_stale(mountpoint);
        std::fs::create_dir_all(mountpoint)?;
        let state = Arc::new(State {
            files: RwLock::default(),
            passthrough: std::sync::atomic::AtomicBool::new(false),
            next_ino: AtomicU64::new(2),
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
            mounted_at: SystemTime::now(),
        });
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            MountOption::FSName("vdk".into()),
            MountOption::Subtype("vdk".into()),
            MountOption::DefaultPermissions,
            MountOption::NoExec,
            MountOption::NoSuid,
            MountOption::NoDev,
            MountOption::NoAtime,
        ];
        config.n_threads = Some(threads.max(1));
        config.clone_fd = true;
        let session = fuser::Session::new(DiskFs(Arc::clone(&state)), mountpoint, &config)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot mount the FUSE export on {}: {e}",
                        mountpoint.display()
                    ),
                )
            })?;
        let session = session.spawn()?;
        info!(mountpoint = %mountpoint.display(), "FUSE export mounted");
        Ok(FuseExport {
            mountpoint: mountpoint.to_owned(),
            state,
            session: Mutex::new(Some(session)),
        })
    }

    /// Where the export is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Shows `device` as the file `name`; returns the file's path.
    pub fn add(
        &self,
        name: &str,
        device: Arc<dyn BlockDevice>,
        read_only: bool,
    ) -> io::Result<PathBuf> {
        self.add_with_backing(name, device, read_only, None)
    }

    /// [`FuseExport::add`] for a disk that `backing` holds byte for byte (a raw image with no
    /// filter): where the kernel has FUSE passthrough, reads and writes of the file go to
    /// `backing` with no trip through this process. Flushes still come here.
    pub fn add_with_backing(
        &self,
        name: &str,
        device: Arc<dyn BlockDevice>,
        read_only: bool,
        backing: Option<std::fs::File>,
    ) -> io::Result<PathBuf> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} cannot be a file name"),
            ));
        }
        let info = device.info();
        let mut files = sync::write(&self.state.files);
        if files.by_name.contains_key(name) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{name} is already exported"),
            ));
        }
        let ino = self.state.next_ino.fetch_add(1, Ordering::Relaxed);
        let file = DiskFile {
            name: name.to_owned(),
            device,
            size: AtomicU64::new(info.size),
            read_only: read_only || info.read_only,
            trim: info.caps.trim,
            backing,
            backing_id: Mutex::new(None),
        };
        files.by_ino.insert(ino, Arc::new(file));
        files.by_name.insert(name.to_owned(), ino);
        Ok(self.mountpoint.join(name))
    }

    /// Takes the file `name` away. Whoever still has it open (a loop device) gets EIO from
    /// then on; the disk itself is released.
    pub fn remove(&self, name: &str) -> bool {
        let mut files = sync::write(&self.state.files);
        match files.by_name.remove(name) {
            Some(ino) => {
                files.by_ino.remove(&ino);
                true
            }
            None => false,
        }
    }

    /// Says that the disk behind the file `name` grew to `new_size` bytes: the file has the
    /// new size from now on, and the kernel is told to forget the old one and asked for the
    /// new one (a stat), so that a loop device over the file sees it at its next
    /// `LOOP_SET_CAPACITY`.
    pub fn grow(&self, name: &str, new_size: u64) -> io::Result<()> {
        let ino = {
            let files = sync::read(&self.state.files);
            let ino = files.by_name.get(name).copied();
            let file = ino.and_then(|i| files.by_ino.get(&i));
            match (ino, file) {
                (Some(ino), Some(f)) => {
                    f.size.fetch_max(new_size, Ordering::AcqRel);
                    ino
                }
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("{name} is not exported"),
                    ))
                }
            }
        };
        if let Some(session) = sync::lock(&self.session).as_ref() {
            // Attributes only (a negative offset): the page cache holds nothing wrong.
            session.notifier().inval_inode(INodeNo(ino), -1, 0)?;
        }
        let seen = std::fs::metadata(self.mountpoint.join(name))?.len();
        if seen != new_size {
            return Err(io::Error::other(format!(
                "the kernel still sees {seen} bytes for {name}, not {new_size}"
            )));
        }
        Ok(())
    }

    /// Unmounts the export and stops its threads.
    pub fn unmount(&self) {
        let session = sync::lock(&self.session).take();
        if let Some(session) = session {
            if let Err(e) = session.umount_and_join() {
                // Busy (a loop device still holds a file): detach lazily; the threads end
                // when the kernel lets go.
                debug!(error = %e, "FUSE export busy, detaching lazily");
                let flags = rustix::mount::UnmountFlags::DETACH;
                let _ = rustix::mount::unmount(&self.mountpoint, flags);
            }
            info!(mountpoint = %self.mountpoint.display(), "FUSE export unmounted");
        }
    }
}

impl Drop for FuseExport {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// A FUSE mount whose process died answers every call with ENOTCONN: detach it.
fn detach_if_stale(mountpoint: &Path) {
    if let Err(e) = std::fs::metadata(mountpoint) {
        if e.raw_os_error() == Some(rustix::io::Errno::NOTCONN.raw_os_error()) {
            warn!(mountpoint = %mountpoint.display(), "detaching a stale FUSE mount");
            let _ = rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::DETACH);
        }
    }
}
