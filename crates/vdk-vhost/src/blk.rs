//! The virtio-blk device: features, config space and queues, as `vhost-user-backend` asks.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread;

use tracing::warn;
use vdk_core::pool::Pool;
use vdk_core::{sync, BlockDevice, DiskInfo};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::request::{self, Request, Target, SECTOR};

/// A sector's bytes, as config fields count them.
const SECTOR_BYTES: u32 = 512;

/// The most sectors one discard or write-zeroes range may cover (1 GiB): a bound on the work
/// of one request.
const MAX_RANGE_SECTORS: u32 = 1 << 21;

/// One VM connection's device.
///
/// A queue's thread pops every chain the guest has made available and parses each once. Reads
/// and writes the disk can do without waiting it answers at once, together, with one
/// interrupt for them all; of the rest, the last it serves itself, the others go to the
/// connection's workers, so that a queue with several requests waiting has them served in
/// parallel while a lone request costs no hand-over. Each later completion puts its chain
/// in the used ring and interrupts the guest if due. A queue's
/// requests in flight are counted, so that stopping a queue (QEMU asking for its ring index)
/// waits until each is answered.
#[derive(Debug)]
pub(crate) struct Blk {
    disk: Arc<dyn BlockDevice>,
    info: DiskInfo,
    read_only: bool,
    queues: u16,
    queue_size: u16,
    serial: Vec<u8>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    event_idx: AtomicBool,
    pool: Pool<Job>,
    inflight: Vec<Inflight>,
    /// Itself, for the workers the pool starts.
    me: Weak<Blk>,
}

/// A chain handed to a worker, parsed once by the queue's thread (and, for a read or write
/// the fast path began, with where it stopped).
struct Job {
    queue: u16,
    head: u16,
    request: Result<Request, &'static str>,
    vring: VringRwLock,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Job(queue {}, head {})", self.queue, self.head)
    }
}

/// Requests of one queue popped and not yet answered.
#[derive(Debug, Default)]
struct Inflight {
    count: Mutex<usize>,
    idle: Condvar,
}

impl Inflight {
    fn add(&self, n: usize) {
        *sync::lock(&self.count) += n;
    }

    fn done(&self, n: usize) {
        let mut c = sync::lock(&self.count);
        *c = c.saturating_sub(n);
        if *c == 0 {
            self.idle.notify_all();
        }
    }

    fn wait_idle(&self) {
        let mut c = sync::lock(&self.count);
        while *c > 0 {
            c = sync::wait(&self.idle, c);
        }
    }
}

impl Blk {
    pub(crate) fn new(
        disk: Arc<dyn BlockDevice>,
        config: &crate::Config,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
    ) -> Arc<Blk> {
        let info = disk.info();
        let queues = config.queues.max(1);
        Arc::new_cyclic(|me| Blk {
            read_only: config.read_only || info.read_only,
            disk,
            info,
            queues,
            queue_size: config.queue_size,
            serial: config.serial.as_bytes().to_vec(),
            mem,
            event_idx: AtomicBool::new(false),
            pool: Pool::new(usize::from(config.threads)),
            inflight: (0..queues).map(|_| Inflight::default()).collect(),
            me: me.clone(),
        })
    }

    /// Lets the workers answer what they hold, then joins them: after this nothing of the
    /// connection touches guest memory or the disk.
    pub(crate) fn close(&self) {
        self.pool.close();
    }

    /// Hands a chain to a worker, starting one if none is idle; false if none could start.
    fn hand_over(&self, job: Job) -> Result<(), Job> {
        let me = self.me.clone();
        self.pool
            .submit(job, move || {
                thread::Builder::new()
                    .name("vhost-user-blk-io".into())
                    .spawn(move || {
                        let Some(blk) = me.upgrade() else { return };
                        while let Some(job) = blk.pool.next() {
                            let mem = blk.mem.memory();
                            let used = request::answer(&mem, &job.request, &blk.target());
                            blk.complete(job.queue, &job.vring, job.head, used);
                        }
                    })
            })
            .map_err(|(job, _)| job)
    }

    /// Puts an answered chain in the used ring and interrupts the guest if it is due.
    fn complete(&self, queue: u16, vring: &VringRwLock, head: u16, used: u32) {
        self.complete_all(queue, vring, &[(head, used)]);
    }

    /// Puts answered chains (head, used length) in the used ring, then interrupts the guest
    /// once if it is due: one interrupt for a batch answered together.
    fn complete_all(&self, queue: u16, vring: &VringRwLock, done: &[(u16, u32)]) {
        if done.is_empty() {
            return;
        }
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let res = done
            .iter()
            .try_for_each(|&(head, used)| vring.add_used(head, used))
            .map_err(io::Error::other)
            .and_then(|()| {
                if !event_idx || vring.needs_notification().map_err(io::Error::other)? {
                    vring.signal_used_queue()?;
                }
                Ok(())
            });
        if let Err(e) = res {
            warn!(queue, error = %e, "vhost-user-blk: cannot complete a request");
        }
        self.inflight[usize::from(queue)].done(done.len());
    }

    fn block_size(&self) -> u32 {
        self.info.logical_block_size.max(SECTOR_BYTES)
    }

    /// The virtio-blk config space (virtio 1.2, 5.2.4), little-endian.
    fn config_space(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        let size = self.disk.info().size;
        c[0..8].copy_from_slice(&(size / SECTOR).to_le_bytes());
        // size_max (8..12): not offered. seg_max: the queue less header and status.
        c[12..16].copy_from_slice(&u32::from(self.queue_size.saturating_sub(2)).to_le_bytes());
        // geometry (16..20): not offered.
        let block = self.block_size();
        c[20..24].copy_from_slice(&block.to_le_bytes());
        let physical = self.info.physical_block_size.max(block);
        c[24] = u8::try_from((physical / block).trailing_zeros()).unwrap_or(0);
        // alignment_offset (25) 0; min_io_size in blocks; opt_io_size in blocks.
        c[26..28].copy_from_slice(&1u16.to_le_bytes());
        let opt = (self.info.preferred_request / block).max(1);
        c[28..32].copy_from_slice(&opt.to_le_bytes());
        // writeback (32): only with CONFIG_WCE, not offered; the guest flushes.
        c[34..36].copy_from_slice(&self.queues.to_le_bytes());
        let alignment = physical / SECTOR_BYTES;
        c[36..40].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&1u32.to_le_bytes());
        c[44..48].copy_from_slice(&alignment.to_le_bytes());
        c[48..52].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&1u32.to_le_bytes());
        c[56] = u8::from(self.info.caps.trim);
        c
    }

    fn target(&self) -> Target<'_> {
        Target {
            disk: &*self.disk,
            read_only: self.read_only,
            serial: &self.serial,
            // Never more in one call than the disk takes (its max_request is whole blocks).
            max_request: self.info.max_request.max(self.block_size()) as usize,
        }
    }

    /// Serves every request the queue holds, then re-arms its notification (with EVENT_IDX,
    /// looping while the guest added more meanwhile).
    fn serve_queue(&self, queue: u16, vring: &VringRwLock) -> io::Result<()> {
        let mem = self.mem.memory();
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let inflight = &self.inflight[usize::from(queue)];
        // The descriptors of every chain popped in one turn, and each chain's head and part.
        let mut descs: Vec<Descriptor> = Vec::new();
        let mut popped: Vec<(u16, std::ops::Range<usize>)> = Vec::new();
        let mut answered: Vec<(u16, u32)> = Vec::new();
        loop {
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            loop {
                // Popped and counted under the ring's lock: a stop that marks the queue not
                // ready (under the same lock) then waits for exactly these.
                descs.clear();
                popped.clear();
                {
                    let mut state = vring.get_mut();
                    let q = state.get_queue_mut();
                    if !q.ready() {
                        // Stopped (or reset): nothing more to take, nothing to re-arm.
                        return Ok(());
                    }
                    while let Some(chain) = q.pop_descriptor_chain(mem.clone()) {
                        let head = chain.head_index();
                        let from = descs.len();
                        descs.extend(chain);
                        popped.push((head, from..descs.len()));
                    }
                    inflight.add(popped.len());
                }
                if popped.is_empty() {
                    break;
                }
                // Each chain parsed once, outside the ring's lock.
                let mut chains: Vec<(u16, Result<Request, &'static str>)> = popped
                    .iter()
                    .map(|(head, r)| (*head, request::parse(&mem, &descs[r.clone()])))
                    .collect();
                // What needs no wait is answered here; the rest goes to workers, but for the
                // last, which this thread serves itself.
                let target = self.target();
                answered.clear();
                chains.retain_mut(|(head, parsed)| {
                    match request::try_answer(&mem, parsed, &target) {
                        Some(used) => {
                            answered.push((*head, used));
                            false
                        }
                        None => true,
                    }
                });
                // One interrupt for all of them, before anything that may wait.
                self.complete_all(queue, vring, &answered);
                let Some((head, last)) = chains.pop() else {
                    continue;
                };
                for (head, request) in chains {
                    let job = Job {
                        queue,
                        head,
                        request,
                        vring: vring.clone(),
                    };
                    if let Err(job) = self.hand_over(job) {
                        let used = request::answer(&mem, &job.request, &target);
                        self.complete(queue, vring, job.head, used);
                    }
                }
                let used = request::answer(&mem, &last, &target);
                self.complete(queue, vring, head, used);
            }
            if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                return Ok(());
            }
        }
    }
}

impl VhostUserBackend for Blk {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    fn features(&self) -> u64 {
        let bit = |b: u32| 1u64 << b;
        let mut f = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_TOPOLOGY)
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_MQ);
        if self.read_only {
            f |= bit(VIRTIO_BLK_F_RO);
        } else {
            f |= bit(VIRTIO_BLK_F_WRITE_ZEROES);
            if self.info.caps.trim {
                f |= bit(VIRTIO_BLK_F_DISCARD);
            }
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // BACKEND_REQ: the front end hands over a channel, on which a grown disk is announced
        // (the relay keeps it).
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.config_space();
        let start = (offset as usize).min(space.len());
        let end = start.saturating_add(size as usize).min(space.len());
        let mut out = space[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        // The handler replaces the table inside the GuestMemoryAtomic this device shares.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // The ring is marked not ready: what was popped is answered before QEMU reads the
        // ring's index, so that nothing is answered twice or lost across a stop.
        if let Some(inflight) = self.inflight.get(queue_index as usize) {
            inflight.wait_idle();
        }
        Ok(())
    }

    fn reset_device(&self) {
        for q in &self.inflight {
            q.wait_idle();
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        // An error here would end the queue's thread for good: what a guest broke (a
        // used ring outside its memory) is logged and the queue left to the guest's reset.
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            warn!(
                queue = device_event,
                "vhost-user-blk: an event for no queue"
            );
            return Ok(());
        };
        if evset != EventSet::IN {
            warn!(
                queue = device_event,
                ?evset,
                "vhost-user-blk: an unexpected queue event"
            );
            return Ok(());
        }
        if let Err(e) = self.serve_queue(device_event, vring) {
            warn!(queue = device_event, error = %e, "vhost-user-blk: the queue is broken");
        }
        Ok(())
    }
}
