//! ublk: the kernel's user-space block driver (`ublk_drv`, Linux 6.0+), through the `libublk`
//! crate. The kernel hands each request to one of the disk's queues (one per CPU) over
//! io_uring; a thread per queue answers it from the disk and completes it in the same ring.
//!
//! Devices are made with `UBLK_F_USER_RECOVERY`: if the process serving them dies, the kernel
//! keeps `/dev/ublkbN` and holds its I/O until a new server takes the device over
//! ([`Ublk::attach`] of a disk of the same name does that), so a mounted file system carries
//! on. Each device's name is kept in the JSON file libublk writes under `/run/ublksrvd`.

use std::cell::RefCell;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
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

use crate::{Attach, Attached};

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

/// The ublk device left by a server that died while serving `name`, waiting for a new one.
fn orphan(name: &str) -> Option<u32> {
    let entries = std::fs::read_dir("/sys/class/ublk-char").ok()?;
    entries.flatten().find_map(|e| {
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
        (waiting && data.get("name")?.as_str()? == name).then_some(id)
    })
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
        let recover = orphan(name);
        let cpus = thread::available_parallelism().map_or(1, |n| n.get());
        let queues = u16::try_from(cpus).unwrap_or(u16::MAX);
        let (tx, rx) = mpsc::channel::<io::Result<u32>>();
        let owned = name.to_owned();
        let server = thread::Builder::new()
            .name(format!("ublk-{name}"))
            .spawn(move || serve(&owned, device, read_only, queues, recover, tx))?;
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

/// Runs the device to its end (a [`UblkDisk::detach`]), telling `started` its id or why not.
fn serve(
    name: &str,
    device: Arc<dyn BlockDevice>,
    read_only: bool,
    queues: u16,
    recover: Option<u32>,
    started: mpsc::Sender<io::Result<u32>>,
) {
    let built = UblkCtrlBuilder::default()
        .name(TARGET)
        .id(recover.map_or(-1, |id| id as i32))
        .nr_queues(queues)
        .depth(DEPTH)
        .io_buf_bytes(MAX_IO)
        // In-flight requests of a dead server are sent again to the next: a block device's
        // writes are idempotent.
        .ctrl_flags(u64::from(
            sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE,
        ))
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
    let queue = move |qid: u16, dev: &UblkDev| serve_queue(qid, dev, &device, read_only);
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

/// A request handed to a worker with its tag's buffer, and what comes back.
struct Job {
    tag: u16,
    req: Req,
    buf: IoBuf<u8>,
}

struct Done {
    tag: u16,
    res: i32,
    buf: IoBuf<u8>,
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
            let res = answer(&*self.disk, self.read_only, job.req, &mut job.buf);
            vdk_core::sync::lock(&self.finished).push(Done {
                tag: job.tag,
                res,
                buf: job.buf,
            });
            let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
        }
    }
}

/// Answers one queue's requests until the device stops. A read or write the disk can do at
/// once without waiting (its `Lend` fast paths: data in the page cache, a write the file
/// system takes without blocking) is answered on the queue's thread; any other request goes
/// to a worker with its tag's buffer (moved, never copied), and the worker's eventfd wakes
/// the queue's io_uring to complete it.
fn serve_queue(qid: u16, dev: &UblkDev, disk: &Arc<dyn BlockDevice>, read_only: bool) {
    let registered = dev.alloc_queue_io_bufs();
    let queue = UblkQueue::new(qid, dev)
        .and_then(|q| q.submit_fetch_commands_unified(BufDescList::Slices(Some(&registered))));
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
    let complete = |q: &UblkQueue, tag: u16, res: i32, buf: IoBuf<u8>| {
        let mut bufs = bufs.borrow_mut();
        let slot = &mut bufs[usize::from(tag)];
        let buf = slot.insert(buf);
        if let Err(e) =
            q.complete_io_cmd_unified(tag, BufDesc::Slice(buf), Ok(UblkIORes::Result(res)))
        {
            warn!(qid, tag, "ublk completion failed: {e}");
        }
    };
    queue.wait_and_handle_io(|q: &UblkQueue, tag, ctx| {
        if ctx.is_tgt_io() {
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
        let Some(mut buf) = bufs.borrow_mut()[usize::from(tag)].take() else {
            warn!(qid, tag, "ublk request on a tag already in flight");
            return;
        };
        if let Some(res) = answer_at_once(&**disk, read_only, req, &mut buf) {
            complete(q, tag, res, buf);
            return;
        }
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
