//! The kernel's NBD client (`nbd.ko`), configured over generic netlink as `nbd-client -N`
//! does: the serving process opens connections to its own NBD server, takes each past the
//! handshake ([`vdk_nbd::client::go`]) and hands the sockets to the kernel, which then sends
//! requests straight to the server. One connection per CPU.
//!
//! The device is tagged with the disk's name (the kernel's backend identifier, shown in
//! `/sys/block/nbdN/backend`) and given a dead-connection timeout: if the server dies, the
//! device waits that long for a new one, which [`KernelNbd::attach`] of a disk of the same
//! name gives it by reconfiguring the device with fresh connections.

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use neli::consts::nl::NlmF;
use neli::consts::socket::NlFamily;
use neli::genl::{AttrTypeBuilder, Genlmsghdr, GenlmsghdrBuilder, Nlattr, NlattrBuilder};
use neli::nl::NlPayload;
use neli::router::synchronous::NlRouter;
use neli::types::{Buffer, GenlBuffer};
use neli::utils::Groups;
use neli::{Size, ToBytes};
use tracing::info;
use vdk_core::BlockDevice;

use crate::{Attach, Attached};

// linux/nbd-netlink.h
const CMD_CONNECT: u8 = 1;
const CMD_DISCONNECT: u8 = 2;
const CMD_RECONFIGURE: u8 = 3;
const ATTR_INDEX: u16 = 1;
const ATTR_SIZE_BYTES: u16 = 2;
const ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const ATTR_TIMEOUT: u16 = 4;
const ATTR_SERVER_FLAGS: u16 = 5;
const ATTR_CLIENT_FLAGS: u16 = 6;
const ATTR_SOCKETS: u16 = 7;
const ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const ATTR_BACKEND_IDENTIFIER: u16 = 10;
const SOCK_ITEM: u16 = 1;
const SOCK_FD: u16 = 1;
/// The device is freed when it is disconnected.
const CFLAG_DESTROY_ON_DISCONNECT: u64 = 1;
const GENL_VERSION: u8 = 1;
/// NBD_FLAG_READ_ONLY.
const FLAG_READ_ONLY: u16 = 1 << 1;

/// Seconds a request may take before the kernel drops its connection as dead: long, since a
/// slow disk (object storage, a loaded machine) must be waited for, not failed with EIO (a
/// dead daemon is noticed at once anyway, when its connections close). Not 0: with several
/// connections the kernel then falls back to the block layer's 30 s.
const TIMEOUT: u64 = 600;
/// Seconds the device waits for a new server when every connection is dead.
pub const DEAD_CONN_TIMEOUT: u64 = 300;

/// Opens a new connection to the serving process's own NBD server (not yet negotiated).
pub type Connect = Arc<dyn Fn() -> io::Result<UnixStream> + Send + Sync>;

/// Attaches disks as kernel NBD devices (`/dev/nbdN`) over connections to an NBD server.
pub struct KernelNbd {
    export: String,
    connect: Connect,
}

impl fmt::Debug for KernelNbd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelNbd")
            .field("export", &self.export)
            .finish_non_exhaustive()
    }
}

impl KernelNbd {
    /// Attaches the server's export `export`, reached through `connect`, if this kernel has
    /// the NBD driver; otherwise what is missing, in one line.
    pub fn new(export: &str, connect: Connect) -> io::Result<KernelNbd> {
        KernelNbd::available()?;
        Ok(KernelNbd {
            export: export.to_owned(),
            connect,
        })
    }

    /// Whether this kernel has the NBD driver loaded; otherwise what is missing, in one line.
    pub fn available() -> io::Result<()> {
        if Path::new("/sys/module/nbd").exists() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "--attach nbd needs the kernel's NBD client, and it is not loaded (modprobe nbd)",
            ))
        }
    }
}

fn nl_err(what: &str, e: impl fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

fn attr<P: Size + ToBytes>(kind: u16, payload: P) -> io::Result<Nlattr<u16, Buffer>> {
    let t = AttrTypeBuilder::default()
        .nla_type(kind)
        .build()
        .map_err(|e| nl_err("netlink attribute", e))?;
    NlattrBuilder::default()
        .nla_type(t)
        .nla_payload(payload)
        .build()
        .map_err(|e| nl_err("netlink attribute", e))
}

/// The `ATTR_SOCKETS` attribute for `socks`.
fn sockets(socks: &[UnixStream]) -> io::Result<Nlattr<u16, Buffer>> {
    let mut all = attr(ATTR_SOCKETS, Vec::<u8>::new())?;
    for s in socks {
        let fd = u32::try_from(s.as_raw_fd()).map_err(|_| nl_err("socket", "bad descriptor"))?;
        let item = attr(SOCK_ITEM, Vec::<u8>::new())?
            .nest(&attr(SOCK_FD, fd)?)
            .map_err(|e| nl_err("netlink attribute", e))?;
        all = all
            .nest(&item)
            .map_err(|e| nl_err("netlink attribute", e))?;
    }
    Ok(all)
}

/// Sends one `nbd` family command; the reply's device index, if it has one.
fn command(cmd: u8, attrs: Vec<Nlattr<u16, Buffer>>) -> io::Result<Option<u32>> {
    let (sock, _) = NlRouter::connect(NlFamily::Generic, None, Groups::empty())
        .map_err(|e| nl_err("cannot open a netlink socket", e))?;
    let family = sock
        .resolve_genl_family("nbd")
        .map_err(|e| nl_err("the kernel has no nbd netlink family", e))?;
    let msg = GenlmsghdrBuilder::<u8, u16>::default()
        .cmd(cmd)
        .version(GENL_VERSION)
        .attrs(attrs.into_iter().collect::<GenlBuffer<u16, Buffer>>())
        .build()
        .map_err(|e| nl_err("netlink message", e))?;
    let replies = sock
        .send::<_, _, u16, Genlmsghdr<u8, u16>>(family, NlmF::ACK, NlPayload::Payload(msg))
        .map_err(|e| nl_err("the kernel's NBD driver refused", e))?;
    let mut index = None;
    for r in replies {
        let r = r.map_err(|e| nl_err("the kernel's NBD driver refused", e))?;
        if let NlPayload::Payload(p) = r.nl_payload() {
            if let Ok(i) = p
                .attrs()
                .get_attr_handle()
                .get_attr_payload_as::<u32>(ATTR_INDEX)
            {
                index = Some(i);
            }
        }
    }
    Ok(index)
}

/// `name` as the kernel's backend identifier (a NUL-terminated string).
fn identifier(name: &str) -> Vec<u8> {
    let mut ident = name.as_bytes().to_vec();
    ident.push(0);
    ident
}

/// The NBD device tagged `name` whose server went away, waiting for a new one.
fn orphan(name: &str) -> Option<u32> {
    let entries = std::fs::read_dir("/sys/block").ok()?;
    entries.flatten().find_map(|e| {
        let index: u32 = e.file_name().to_str()?.strip_prefix("nbd")?.parse().ok()?;
        let backend = std::fs::read_to_string(e.path().join("backend")).ok()?;
        (backend.trim_end() == name).then_some(index)
    })
}

impl KernelNbd {
    /// `n` connections to the export, each past the handshake; what the server said of it.
    fn connections(&self, n: usize) -> io::Result<(Vec<UnixStream>, vdk_nbd::client::Chosen)> {
        let mut socks = Vec::with_capacity(n);
        let mut chosen = None;
        for _ in 0..n {
            let mut s = (self.connect)()?;
            chosen = Some(vdk_nbd::client::go(&mut s, &self.export)?);
            socks.push(s);
        }
        let chosen = chosen.ok_or_else(|| nl_err("kernel NBD", "no connection"))?;
        Ok((socks, chosen))
    }
}

impl Attach for KernelNbd {
    fn name(&self) -> &'static str {
        "nbd"
    }

    fn attach(
        &self,
        name: &str,
        device: Arc<dyn BlockDevice>,
        read_only: bool,
    ) -> io::Result<Box<dyn Attached>> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if let Some(index) = orphan(name) {
            // Its connections are dead (their server was a process now gone): new ones
            // take their places.
            let (socks, _) = self.connections(cpus)?;
            command(
                CMD_RECONFIGURE,
                vec![
                    attr(ATTR_INDEX, index)?,
                    attr(ATTR_BACKEND_IDENTIFIER, identifier(name))?,
                    sockets(&socks)?,
                ],
            )?;
            info!(
                dev = index,
                name, "gave the kernel NBD device new connections"
            );
            return Ok(Box::new(NbdDisk {
                index,
                name: name.to_owned(),
            }));
        }
        let (socks, chosen) = self.connections(cpus)?;
        let mut flags = chosen.flags;
        if read_only {
            flags |= FLAG_READ_ONLY;
        }
        let block = u64::from(device.info().logical_block_size.clamp(512, 4096));
        let index = command(
            CMD_CONNECT,
            vec![
                attr(ATTR_SIZE_BYTES, chosen.size)?,
                attr(ATTR_BLOCK_SIZE_BYTES, block)?,
                attr(ATTR_TIMEOUT, TIMEOUT)?,
                attr(ATTR_DEAD_CONN_TIMEOUT, DEAD_CONN_TIMEOUT)?,
                attr(ATTR_SERVER_FLAGS, u64::from(flags))?,
                attr(ATTR_CLIENT_FLAGS, CFLAG_DESTROY_ON_DISCONNECT)?,
                attr(ATTR_BACKEND_IDENTIFIER, identifier(name))?,
                sockets(&socks)?,
            ],
        )?
        .ok_or_else(|| nl_err("kernel NBD", "the driver named no device"))?;
        Ok(Box::new(NbdDisk {
            index,
            name: name.to_owned(),
        }))
    }
}

/// A disk attached by [`KernelNbd`].
#[derive(Debug)]
struct NbdDisk {
    index: u32,
    /// The disk's name, the device's backend identifier.
    name: String,
}

impl Attached for NbdDisk {
    fn block_device(&self) -> PathBuf {
        PathBuf::from(format!("/dev/nbd{}", self.index))
    }

    fn detach(self: Box<Self>) -> io::Result<()> {
        command(CMD_DISCONNECT, vec![attr(ATTR_INDEX, self.index)?])?;
        // The kernel ends the connections in the background: wait for it, so that the
        // disk is not closed under requests still in flight.
        let backend = PathBuf::from(format!("/sys/block/nbd{}/backend", self.index));
        let started = Instant::now();
        while backend.exists() && started.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// A reconfigure with the new size; kernels whose driver ignores it (it sets the size
    /// only at connect) are found out by reading the size back.
    fn grow(&self, new_size: u64) -> io::Result<()> {
        command(
            CMD_RECONFIGURE,
            vec![
                attr(ATTR_INDEX, self.index)?,
                attr(ATTR_BACKEND_IDENTIFIER, identifier(&self.name))?,
                attr(ATTR_SIZE_BYTES, new_size)?,
            ],
        )?;
        let sectors = std::fs::read_to_string(format!("/sys/block/nbd{}/size", self.index))?;
        let seen = sectors.trim().parse::<u64>().unwrap_or(0) * 512;
        if seen != new_size {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "this kernel's nbd driver keeps the size a device was connected with \
                     (its reconfigure ignores NBD_ATTR_SIZE_BYTES; /dev/nbd{} still has {seen} \
                     bytes): close the disk and open it again to see the new size",
                    self.index
                ),
            ));
        }
        Ok(())
    }
}
