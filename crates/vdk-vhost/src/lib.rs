//! vdk disks for virtual machines: a **vhost-user-blk** export.
//!
//! A VMM (QEMU, cloud-hypervisor) connects to a Unix socket, shares the guest's memory and
//! hands over its virtio-blk queues; vdk then answers the guest's requests straight from and
//! into guest memory, with no copy in between and no socket round trip per request.
//!
//! ```text
//!   QEMU ──vhost-user socket──► Export (one socket, one VM at a time; the next after it leaves)
//!                                 │  relay: messages passed to the crate's handler, the
//!                                 │  back-end channel kept (a grown disk is announced on it)
//!                                 │  features and config space from the disk's DiskInfo
//!   guest virtqueues ──eventfd──► one thread per queue: chain ─► Request ─► BlockDevice
//!                                 │  data read/written in place in the shared guest memory
//!                                 └─ status byte, used ring, interrupt eventfd
//! ```
//!
//! The vhost-user protocol, the queues and guest memory are the rust-vmm crates' (`vhost`,
//! `vhost-user-backend`, `virtio-queue`, `vm-memory`); what is here is virtio-blk: the
//! features a disk's capabilities become, the config space, and requests checked against the
//! guest's memory and the disk before anything is touched.
#![cfg(target_os = "linux")]
#![warn(missing_docs)]
// One module allows it: request.rs, where guest memory becomes the disk's buffers.
#![deny(unsafe_code)]

mod blk;
mod relay;
mod request;
mod server;

pub use server::{Config, Export};

/// For the fuzz target: one request chain against a guest memory and a disk.
#[doc(hidden)]
pub mod fuzzing {
    use vdk_core::BlockDevice;
    use virtio_queue::desc::split::Descriptor;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    /// Guest memory of `ram`'s bytes at guest address 0, the chain's descriptors as
    /// (address, length, device-writable); answers the chain against `disk` on the path that
    /// may block, and returns the used length and the memory afterwards.
    pub fn answer(
        ram: &[u8],
        chain: &[(u64, u32, bool)],
        disk: &dyn BlockDevice,
        read_only: bool,
    ) -> (u32, Vec<u8>) {
        run(ram, chain, disk, read_only, false)
    }

    /// As [`answer`], but as a queue's thread does: the disk's non-blocking fast path first,
    /// then the path that may block from where that stopped.
    pub fn answer_fast_first(
        ram: &[u8],
        chain: &[(u64, u32, bool)],
        disk: &dyn BlockDevice,
        read_only: bool,
    ) -> (u32, Vec<u8>) {
        run(ram, chain, disk, read_only, true)
    }

    fn run(
        ram: &[u8],
        chain: &[(u64, u32, bool)],
        disk: &dyn BlockDevice,
        read_only: bool,
        fast_first: bool,
    ) -> (u32, Vec<u8>) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), ram.len().max(1))])
            .expect("guest memory");
        mem.write_slice(ram, GuestAddress(0)).expect("fits");
        let descs: Vec<Descriptor> = chain
            .iter()
            .map(|&(addr, len, write)| Descriptor::new(addr, len, if write { 2 } else { 0 }, 0))
            .collect();
        let target = crate::request::Target {
            disk,
            read_only,
            serial: b"fuzz",
            max_request: disk.info().max_request.max(512) as usize,
        };
        let mut parsed = crate::request::parse(&mem, &descs);
        let fast = if fast_first {
            crate::request::try_answer(&mem, &mut parsed, &target)
        } else {
            None
        };
        let used = fast.unwrap_or_else(|| crate::request::answer(&mem, &parsed, &target));
        let mut after = vec![0u8; ram.len()];
        mem.read_slice(&mut after, GuestAddress(0)).expect("fits");
        (used, after)
    }
}
