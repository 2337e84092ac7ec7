//! ublk: the kernel's user-space block driver (`ublk_drv`, Linux 6.0+), through the `libublk`
//! crate. The kernel hands each request to one of the disk's queues (one per CPU) over
//! io_uring; a thread per queue answers it from the disk and completes it in the same ring.
//!
//! Devices are made with `UBLK_F_USER_RECOVERY`: if the process serving them dies, the kernel
//! keeps `/dev/ublkbN` and holds its I/O until a new server takes the device over
//! ([`Ublk::attach`] of a disk of the same name does that), so a mounted file system carries
//! on. Each device's name is kept in the JSON file libublk writes under `/run/ublksrvd`.
//!
//! **Zero copy** (`UBLK_F_AUTO_BUF_REG`, Linux 6.16): for a disk held byte for byte by a
//! file ([`ZeroCopy`]: a raw image with no filter), the kernel lends each request's pages to
//! the queue's io_uring as a fixed buffer, and the queue reads or writes the file into them
//! (`READ_FIXED`/`WRITE_FIXED`): the data never passes through the daemon's memory. Flushes,
//! discards and zeroes still go to the disk.

use std::cell::RefCell;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::{sys, BufDesc, UblkError, UblkFlags, UblkIORes};
use tracing::{info, warn};
use vdk_core::pool::Pool;
use vdk_core::{BlockDevice, Errno};

use crate::{Attach, Attached, Direct};

/// The control device the kernel's ublk driver makes.
pub const CONTROL: &str = "/dev/ublk-control";
/// Requests each queue holds at once.
const DEPTH: u16 = 128;
/// The largest request the kernel sends.
const MAX_IO: u32 = 512 << 10;
/// The target name libublk records for vdk's devices.
const TARGET: &str = "vdk";

/// Attaches disks as ublk block devices (`/dev/ublkbN`).
#[derive(Debug, Default)]
pub struct Ublk;

impl Ublk {
    /// A ublk attacher, if this kernel has the driver; otherwise what is missing, in one line.
    pub fn new() -> io::Result<Ublk> {
        if Path::new(CONTROL).exists() {
            Ok(Ublk)
        } else {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "--attach ublk needs the kernel's ublk driver, and {CONTROL} is missing \
                     (modprobe ublk_drv; Linux 6.0 or later)"
                ),
            ))
        }
    }
}

/// What lets ublk serve a disk with no copy: the file that holds it byte for byte (a raw
/// image with no filter), and whoever counts the disk's requests.
pub struct ZeroCopy {
    /// The image, opened for reading (and writing, unless the disk is read-only).
    pub file: File,
    /// Told of every read and write done on the file.
    pub direct: Arc<dyn Direct>,
}

impl fmt::Debug for ZeroCopy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZeroCopy")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

/// Whether this kernel's ublk driver can lend requests' pages to io_uring
/// (`UBLK_F_AUTO_BUF_REG`, Linux 6.16), which [`Ublk::attach_zero_copy`] uses.
pub fn zero_copy_offered() -> bool {
    UblkCtrl::get_features().is_some_and(|f| f & u64::from(sys::UBLK_F_AUTO_BUF_REG) != 0)
}

fn to_io(what: &str, e: UblkError) -> io::Error {
    match e {
        UblkError::IOError(e) => io::Error::new(e.kind(), format!("{what}: {e}")),
        UblkError::UringIOError(n) | UblkError::OtherError(n) if n < 0 => {
            let os = io::Error::from_raw_os_error(-n);
            io::Error::new(os.kind(), format!("{what}: {os}"))
        }
        e => io::Error::other(format!("{what}: {e}")),
    }
}

/// The ublk devices left by servers that died, each waiting for a new one: (device id, the
/// name of the disk it served). Devices of other programs (no name of vdk's) are not listed.
pub fn waiting() -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/sys/class/ublk-char") else {
        return Vec::new();
    };
    let mut out: Vec<(u32, String)> = entries
        .flatten()
        .filter_map(|e| {
            let id: u32 = e
                .file_name()
                .to_str()?
                .strip_prefix("ublkc")?
                .parse()
                .ok()?;
            let ctrl = UblkCtrl::new_simple(id as i32).ok()?;
            let data = ctrl.get_target_data_from_json()?;
            let state = u32::from(ctrl.dev_info().state);
            let waiting = state == sys::UBLK_S_DEV_QUIESCED || state == sys::UBLK_S_DEV_FAIL_IO;
            let name = data.get("name")?.as_str()?.to_owned();
            waiting.then_some((id, name))
        })
        .collect();
    out.sort_unstable();
    out
}

/// The ublk device left by a server that died while serving `name`, waiting for a new one.
fn orphan(name: &str) -> Option<u32> {
    waiting()
        .into_iter()
        .find(|(_, n)| n == name)
        .map(|(id, _)| id)
}

impl Attach for Ublk {
    fn name(&self) -> &'static str {
        "ublk"
    }

    fn attach(
        &self,
        name: &str,
        device: Arc<dyn BlockDevice>,
        read_only: bool,
    ) -> io::Result<Box<dyn Attached>> {
        self.attach_zero_copy(name, device, read_only, None)
    }
}

impl Ublk {
    /// [`Attach::attach`]; with `zero_copy`, where the kernel offers it
    /// ([`zero_copy_offered`]), reads and writes go between the kernel's pages and the file
    /// with no copy through the daemon. A device left by a dead server that served it so can
    /// only be taken over with it.
    pub fn attach_zero_copy(
        &self,
        name: &str,
        device: Arc<dyn BlockDevice>,
        read_only: bool,
        zero_copy: Option<ZeroCopy>,
    ) -> io::Result<Box<dyn Attached>> {
        let recover = orphan(name);
        let cpus = thread::available_parallelism().map_or(1, |n| n.get());
        let queues = u16::try_from(cpus).unwrap_or(u16::MAX);
        let (tx, rx) = mpsc::channel::<io::Result<u32>>();
        let owned = name.to_owned();
        let server = thread::Builder::new()
            .name(format!("ublk-{name}"))
            .spawn(move || {
                let how = Serve {
                    read_only,
                    queues,
                    recover,
                    zero_copy,
                };
                serve(&owned, device, how, tx);
            })?;
        match rx.recv() {
            Ok(Ok(id)) => {
                if recover.is_some() {
                    info!(
                        dev = id,
                        name, "took over the ublk device a dead server left"
                    );
                }
                Ok(Box::new(UblkDisk {
                    id,
                    server: Some(server),
                }))
            }
            Ok(Err(e)) => {
                let _ = server.join();
                Err(e)
            }
            Err(_) => {
                let _ = server.join();
                Err(io::Error::other("the ublk server thread ended at once"))
            }
        }
    }
}

/// How a device is served.
struct Serve {
    read_only: bool,
    queues: u16,
    /// The device a dead server left, to take over.
    recover: Option<u32>,
    zero_copy: Option<ZeroCopy>,
}

/// Runs the device to its end (a [`UblkDisk::detach`]), telling `started` its id or why not.
fn serve(
    name: &str,
    device: Arc<dyn BlockDevice>,
    how: Serve,
    started: mpsc::Sender<io::Result<u32>>,
) {
    let Serve {
        read_only,
        queues,
        recover,
        zero_copy,
    } = how;
    let mut flags = sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE;
    if zero_copy.is_some() && zero_copy_offered() {
        flags |= sys::UBLK_F_AUTO_BUF_REG;
    }
    let built = UblkCtrlBuilder::default()
        .name(TARGET)
        .id(recover.map_or(-1, |id| id as i32))
        .nr_queues(queues)
        .depth(DEPTH)
        .io_buf_bytes(MAX_IO)
        // In-flight requests of a dead server are sent again to the next: a block device's
        // writes are idempotent. (A device taken over keeps the flags it was made with.)
        .ctrl_flags(u64::from(flags))
        .dev_flags(if recover.is_some() {
            UblkFlags::UBLK_DEV_F_RECOVER_DEV
        } else {
            UblkFlags::UBLK_DEV_F_ADD_DEV
        })
        .build();
    let ctrl = match built {
        Ok(c) => c,
        Err(e) => {
            let _ = started.send(Err(to_io("cannot add a ublk device", e)));
            return;
        }
    };
    // Zero copy is the device's, once made: one taken over must be served so again.
    let zero_copy = if ctrl.dev_info().flags & u64::from(sys::UBLK_F_AUTO_BUF_REG) != 0 {
        let Some(z) = zero_copy else {
            let _ = started.send(Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the ublk device a dead server left reads and writes its image with no copy: \
                 only the same raw image with no filter, on a daemon without --ublk-copy, can \
                 take it over",
            )));
            return;
        };
        info!(
            name,
            "ublk zero copy: the kernel's requests read and write the image's file through \
             io_uring, with no copy through vdk"
        );
        Some(Arc::new(z))
    } else {
        None
    };
    if recover.is_some() {
        if let Err(e) = ctrl.start_user_recover() {
            let _ = started.send(Err(to_io("cannot take over the ublk device", e)));
            return;
        }
    }
    let info = device.info();
    let label = name.to_owned();
    let target = move |dev: &mut UblkDev| {
        let shift = |n: u32| u8::try_from(n.clamp(512, 4096).trailing_zeros()).unwrap_or(9);
        let mut attrs = 0;
        if read_only || info.read_only {
            attrs |= sys::UBLK_ATTR_READ_ONLY;
        }
        if info.rotational {
            attrs |= sys::UBLK_ATTR_ROTATIONAL;
        }
        if info.caps.flush {
            attrs |= sys::UBLK_ATTR_VOLATILE_CACHE;
        }
        if info.caps.fua {
            attrs |= sys::UBLK_ATTR_FUA;
        }
        let logical = shift(info.logical_block_size);
        let mut params = sys::ublk_params {
            types: sys::UBLK_PARAM_TYPE_BASIC,
            basic: sys::ublk_param_basic {
                attrs,
                logical_bs_shift: logical,
                physical_bs_shift: shift(info.physical_block_size).max(logical),
                io_opt_shift: shift(info.preferred_request.max(4096)),
                io_min_shift: logical,
                max_sectors: dev.dev_info.max_io_buf_bytes >> 9,
                dev_sectors: info.size >> 9,
                ..Default::default()
            },
            ..Default::default()
        };
        if info.caps.trim && !read_only {
            params.types |= sys::UBLK_PARAM_TYPE_DISCARD;
            params.discard = sys::ublk_param_discard {
                discard_granularity: info.physical_block_size.max(4096),
                max_discard_sectors: u32::MAX >> 9,
                max_write_zeroes_sectors: u32::MAX >> 9,
                max_discard_segments: 1,
                ..Default::default()
            };
        }
        dev.tgt.dev_size = info.size;
        // One more slot in each queue's ring: the read on its workers' eventfd.
        dev.tgt.extra_ios = 1;
        dev.tgt.params = params;
        dev.set_target_json(serde_json::json!({ "name": label }));
        Ok(())
    };
    let queue = move |qid: u16, dev: &UblkDev| {
        serve_queue(qid, dev, &device, read_only, zero_copy.as_deref());
    };
    let tell = started.clone();
    let ran = ctrl.run_target(target, queue, move |c: &UblkCtrl| {
        let _ = tell.send(Ok(c.dev_info().dev_id));
    });
    if let Err(e) = ran {
        let _ = started.send(Err(to_io("cannot start the ublk device", e)));
    }
}

/// Worker threads per queue: requests that would wait (a read the page cache does not hold,
/// a write, a flush) run on them, so that a queue has several in flight and completes them
/// in whatever order they finish.
const WORKERS_PER_QUEUE: usize = 4;

/// What a request asks, as its descriptor says.
#[derive(Clone, Copy)]
struct Req {
    op: u32,
    flags: u32,
    offset: u64,
    len: u64,
}

impl Req {
    fn of(iod: &sys::ublksrv_io_desc) -> Req {
        Req {
            op: iod.op_flags & 0xff,
            flags: iod.op_flags,
            offset: iod.start_sector << 9,
            len: u64::from(iod.nr_sectors) << 9,
        }
    }
}

/// A request handed to a worker with its tag's buffer (none with zero copy), and what comes
/// back.
struct Job {
    tag: u16,
    req: Req,
    buf: Option<IoBuf<u8>>,
}

struct Done {
    tag: u16,
    res: i32,
    buf: Option<IoBuf<u8>>,
}

/// A queue's workers ([`vdk_core::pool::Pool`]), what they finished, and the eventfd that
/// tells the queue.
struct Workers {
    pool: Pool<Job>,
    finished: Mutex<Vec<Done>>,
    wake: OwnedFd,
    disk: Arc<dyn BlockDevice>,
    read_only: bool,
}

impl Workers {
    fn run(&self) {
        while let Some(mut job) = self.pool.next() {
            let buf = job.buf.as_deref_mut().unwrap_or_default();
            let res = answer(&*self.disk, self.read_only, job.req, buf);
            vdk_core::sync::lock(&self.finished).push(Done {
                tag: job.tag,
                res,
                buf: job.buf,
            });
            let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
        }
    }
}

/// A queue's zero-copy reads and writes: the image's file, and how far each tag's request
/// has got (a read or write the file system cut short goes on from there).
struct Fixed<'a> {
    zero_copy: &'a ZeroCopy,
    fd: RawFd,
    done: RefCell<Vec<u32>>,
    read_only: bool,
}

impl Fixed<'_> {
    /// Starts a read or write of the file into or out of the pages the kernel registered for
    /// `tag`; `Err` is the request's answer if it cannot start.
    fn start(&self, q: &UblkQueue, tag: u16, req: Req) -> Result<(), i32> {
        if req.op == sys::UBLK_IO_OP_WRITE && self.read_only {
            return Err(-Errno::RoFs.raw());
        }
        if !self.zero_copy.direct.is_open() {
            return Err(-Errno::Io.raw());
        }
        if req.op == sys::UBLK_IO_OP_WRITE {
            self.zero_copy.direct.before_write(req.offset, req.len);
        }
        self.done.borrow_mut()[usize::from(tag)] = 0;
        self.submit(q, tag, req, 0)
    }

    fn submit(&self, q: &UblkQueue, tag: u16, req: Req, done: u32) -> Result<(), i32> {
        let len = u32::try_from(req.len).map_err(|_| -Errno::Inval.raw())? - done;
        let at = req.offset + u64::from(done);
        let fd = io_uring::types::Fd(self.fd);
        // The registered buffer's addresses start at 0: `done` bytes into the request.
        let addr = std::ptr::null_mut::<u8>().wrapping_add(done as usize);
        let sqe = if req.op == sys::UBLK_IO_OP_READ {
            io_uring::opcode::ReadFixed::new(fd, addr, len, tag)
                .offset(at)
                .build()
        } else {
            let fua = req.flags & sys::UBLK_IO_F_FUA != 0;
            let sync = if fua {
                rustix::io::ReadWriteFlags::DSYNC.bits() as i32
            } else {
                0
            };
            io_uring::opcode::WriteFixed::new(fd, addr, len, tag)
                .offset(at)
                .rw_flags(sync)
                .build()
        };
        let sqe = sqe.user_data(UblkIOCtx::build_user_data(tag, req.op, 0, true));
        q.ublk_submit_sqe_sync(sqe).map_err(|e| {
            warn!(tag, "ublk cannot queue a zero-copy request: {e}");
            -Errno::Io.raw()
        })
    }

    /// A read or write of the file finished with `res`: the request's answer, or `None` if
    /// it goes on.
    fn finished(&self, q: &UblkQueue, tag: u16, res: i32) -> Option<i32> {
        let req = Req::of(q.get_iod(tag));
        let write = req.op == sys::UBLK_IO_OP_WRITE;
        let direct = &self.zero_copy.direct;
        let again = |r: i32| {
            r == -rustix::io::Errno::AGAIN.raw_os_error()
                || r == -rustix::io::Errno::INTR.raw_os_error()
        };
        let done = self.done.borrow()[usize::from(tag)];
        let answer = match res {
            r if again(r) => {
                return self.submit(q, tag, req, done).err();
            }
            r if r < 0 => r,
            0 => -Errno::Io.raw(), // past the file's end: it is shorter than the disk
            r => {
                let done = done + r.unsigned_abs();
                if u64::from(done) < req.len {
                    self.done.borrow_mut()[usize::from(tag)] = done;
                    return self.submit(q, tag, req, done).err();
                }
                direct.done(write, req.offset, req.len, true);
                return Some(i32::try_from(req.len).unwrap_or(-Errno::Overflow.raw()));
            }
        };
        direct.done(write, req.offset, req.len, false);
        Some(answer)
    }
}

/// Answers one queue's requests until the device stops. A read or write the disk can do at
/// once without waiting (its `Lend` fast paths: data in the page cache, a write the file
/// system takes without blocking) is answered on the queue's thread; any other request goes
/// to a worker with its tag's buffer (moved, never copied), and the worker's eventfd wakes
/// the queue's io_uring to complete it. With `zero_copy`, reads and writes are instead
/// io_uring operations on the image's file into the kernel's own pages.
fn serve_queue(
    qid: u16,
    dev: &UblkDev,
    disk: &Arc<dyn BlockDevice>,
    read_only: bool,
    zero_copy: Option<&ZeroCopy>,
) {
    let depth = dev.dev_info.queue_depth;
    // The kernel registers each request's pages at its tag's index in the ring's table.
    let regs: Vec<sys::ublk_auto_buf_reg> = (0..depth)
        .map(|index| sys::ublk_auto_buf_reg {
            index,
            ..Default::default()
        })
        .collect();
    let registered = if zero_copy.is_some() {
        Vec::new()
    } else {
        dev.alloc_queue_io_bufs()
    };
    let list = if zero_copy.is_some() {
        BufDescList::AutoRegs(&regs)
    } else {
        BufDescList::Slices(Some(&registered))
    };
    let queue = UblkQueue::new(qid, dev).and_then(|q| q.submit_fetch_commands_unified(list));
    let queue = match queue {
        Ok(q) => q,
        Err(e) => {
            warn!(qid, "ublk queue cannot start: {e}");
            return;
        }
    };
    let wake = match rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC) {
        Ok(fd) => fd,
        Err(e) => {
            warn!(qid, "ublk queue has no eventfd: {e}");
            return;
        }
    };
    let fixed = zero_copy.map(|z| Fixed {
        zero_copy: z,
        fd: z.file.as_raw_fd(),
        done: RefCell::new(vec![0; usize::from(depth)]),
        read_only,
    });
    // Moving an IoBuf moves its handle, not the memory the kernel was given.
    let bufs: RefCell<Vec<Option<IoBuf<u8>>>> =
        RefCell::new(registered.into_iter().map(Some).collect());
    let workers = Arc::new(Workers {
        pool: Pool::new(WORKERS_PER_QUEUE),
        finished: Mutex::new(Vec::new()),
        wake,
        disk: Arc::clone(disk),
        read_only,
    });
    // The tag past the kernel's: the ring has room for it (`extra_ios`).
    let wake_tag = u16::try_from(queue.get_depth()).unwrap_or(u16::MAX);
    // What the eventfd read fills. It outlives every write to the eventfd: the workers are
    // joined (`close`) before this function returns.
    let mut counter = [0u8; 8];
    let arm = |counter: &mut [u8; 8]| {
        let sqe = io_uring::opcode::Read::new(
            io_uring::types::Fd(workers.wake.as_raw_fd()),
            counter.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(UblkIOCtx::build_user_data(wake_tag, 0, 0, true));
        queue.ublk_submit_sqe_sync(sqe)
    };
    if let Err(e) = arm(&mut counter) {
        warn!(qid, "ublk queue cannot wait on its eventfd: {e}");
        return;
    }
    let complete = |q: &UblkQueue, tag: u16, res: i32, buf: Option<IoBuf<u8>>| {
        let mut bufs = bufs.borrow_mut();
        let desc = match buf {
            Some(buf) => BufDesc::Slice(bufs[usize::from(tag)].insert(buf)),
            None => BufDesc::AutoReg(regs[usize::from(tag)]),
        };
        if let Err(e) = q.complete_io_cmd_unified(tag, desc, Ok(UblkIORes::Result(res))) {
            warn!(qid, tag, "ublk completion failed: {e}");
        }
    };
    queue.wait_and_handle_io(|q: &UblkQueue, tag, ctx| {
        if ctx.is_tgt_io() {
            if tag != wake_tag {
                // A zero-copy read or write of the file.
                if let Some(res) = fixed
                    .as_ref()
                    .and_then(|f| f.finished(q, tag, ctx.result()))
                {
                    complete(q, tag, res, None);
                }
                return;
            }
            // The eventfd: complete what the workers finished, and wait on it again.
            let done = std::mem::take(&mut *vdk_core::sync::lock(&workers.finished));
            for d in done {
                complete(q, d.tag, d.res, d.buf);
            }
            if let Err(e) = arm(&mut counter) {
                warn!(qid, "ublk queue cannot wait on its eventfd: {e}");
            }
            return;
        }
        let req = Req::of(q.get_iod(tag));
        let buf = match &fixed {
            Some(f) => {
                if req.op == sys::UBLK_IO_OP_READ || req.op == sys::UBLK_IO_OP_WRITE {
                    if let Err(res) = f.start(q, tag, req) {
                        complete(q, tag, res, None);
                    }
                    return;
                }
                None
            }
            None => {
                let Some(mut buf) = bufs.borrow_mut()[usize::from(tag)].take() else {
                    warn!(qid, tag, "ublk request on a tag already in flight");
                    return;
                };
                if let Some(res) = answer_at_once(&**disk, read_only, req, &mut buf) {
                    complete(q, tag, res, Some(buf));
                    return;
                }
                Some(buf)
            }
        };
        let w = Arc::clone(&workers);
        let start = move || {
            thread::Builder::new()
                .name(format!("ublk-q{qid}"))
                .spawn(move || w.run())
        };
        if let Err((job, e)) = workers.pool.submit(Job { tag, req, buf }, start) {
            warn!(qid, "no ublk worker: {e}");
            complete(q, tag, -Errno::Io.raw(), job.buf);
        }
    });
    // Every request handed out is done before the buffers and the eventfd go.
    workers.pool.close();
}

/// A read or plain write the disk answers without waiting ([`vdk_core::Lend`]), or `None`:
/// then a worker does it.
fn answer_at_once(
    disk: &dyn BlockDevice,
    read_only: bool,
    req: Req,
    buf: &mut [u8],
) -> Option<i32> {
    let Req {
        op,
        flags,
        offset,
        len,
    } = req;
    let lend = disk.lend()?;
    let n = usize::try_from(len).ok().filter(|n| *n <= buf.len())?;
    let done = match op {
        sys::UBLK_IO_OP_READ => lend.try_read_at(&mut buf[..n], offset),
        sys::UBLK_IO_OP_WRITE if !read_only && flags & sys::UBLK_IO_F_FUA == 0 => {
            lend.try_write_at(&buf[..n], offset)
        }
        _ => return None,
    };
    match done {
        Ok(true) => Some(i32::try_from(len).unwrap_or(-Errno::Overflow.raw())),
        Ok(false) => None,
        Err(e) => Some(-e.errno().raw()),
    }
}

/// Does one request; its result as the kernel wants it: bytes moved, or a negative errno.
fn answer(disk: &dyn BlockDevice, read_only: bool, req: Req, buf: &mut [u8]) -> i32 {
    let Req {
        op,
        flags,
        offset,
        len,
    } = req;
    let fua = flags & sys::UBLK_IO_F_FUA != 0;
    let n = usize::try_from(len).unwrap_or(usize::MAX);
    let data = || buf.len() >= n;
    let done = match op {
        sys::UBLK_IO_OP_READ if data() => disk.read_at(&mut buf[..n], offset),
        sys::UBLK_IO_OP_WRITE if data() && !read_only => disk.write_at(&buf[..n], offset, fua),
        sys::UBLK_IO_OP_FLUSH => disk.flush(),
        sys::UBLK_IO_OP_DISCARD if !read_only => disk.trim(offset, len),
        sys::UBLK_IO_OP_WRITE_ZEROES if !read_only => {
            let may_trim = flags & sys::UBLK_IO_F_NOUNMAP == 0;
            disk.write_zeroes(offset, len, may_trim, fua)
        }
        sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES
            if read_only =>
        {
            return -Errno::RoFs.raw();
        }
        _ => return -Errno::Inval.raw(),
    };
    match done {
        Ok(()) if op == sys::UBLK_IO_OP_READ || op == sys::UBLK_IO_OP_WRITE => {
            i32::try_from(len).unwrap_or(-Errno::Overflow.raw())
        }
        Ok(()) => 0,
        Err(e) => -e.errno().raw(),
    }
}

/// A disk attached by [`Ublk`].
struct UblkDisk {
    id: u32,
    server: Option<JoinHandle<()>>,
}

impl fmt::Debug for UblkDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UblkDisk").field("id", &self.id).finish()
    }
}

impl Attached for UblkDisk {
    fn block_device(&self) -> PathBuf {
        PathBuf::from(format!("/dev/ublkb{}", self.id))
    }

    fn detach(mut self: Box<Self>) -> io::Result<()> {
        // Stopping the device ends its queues; the server thread then removes it.
        let ctrl = UblkCtrl::new_simple(self.id as i32)
            .map_err(|e| to_io("cannot reach the ublk device", e))?;
        ctrl.kill_dev()
            .map_err(|e| to_io("cannot stop the ublk device", e))?;
        if let Some(t) = self.server.take() {
            let _ = t.join();
        }
        let _ = ctrl.del_dev();
        Ok(())
    }

    /// `UBLK_U_CMD_UPDATE_SIZE` (Linux 6.16): the driver sets the new capacity and tells the
    /// block layer; a kernel without it is named in the error.
    fn grow(&self, new_size: u64) -> io::Result<()> {
        let has =
            UblkCtrl::get_features().is_some_and(|f| f & u64::from(sys::UBLK_F_UPDATE_SIZE) != 0);
        if !has {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this kernel's ublk driver cannot change a live device's size \
                 (UBLK_F_UPDATE_SIZE, Linux 6.16 or later)",
            ));
        }
        let ctrl = UblkCtrl::new_simple(self.id as i32)
            .map_err(|e| to_io("cannot reach the ublk device", e))?;
        ctrl.update_size(new_size)
            .map_err(|e| to_io("the ublk driver refused the new size", e))?;
        Ok(())
    }
}
