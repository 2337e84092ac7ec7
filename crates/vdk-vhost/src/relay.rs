//! The VM's vhost-user socket, passed message by message to rust-vmm's request handler.
//!
//! vdk must be able to tell a connected VM that its disk grew: a `CONFIG_CHANGE_MSG` on the
//! back-end channel, the socket QEMU hands over in `SET_BACKEND_REQ_FD`. The `vhost` crate
//! keeps that socket private (its `Backend` has no way to send the message), so the export
//! sits between the VM and the crate: every message goes through unchanged, file descriptors
//! with it, and the back-end channel is kept (a duplicate of it) on the way. Only the control
//! messages cross here: the guest's requests travel in shared memory and eventfds, straight
//! to the queue threads.
//!
//! ```text
//!   QEMU ──socket──► relay ──socket pair──► vhost-user-backend's handler thread
//!                      └─ SET_BACKEND_REQ_FD: a duplicate of the channel kept, for resizes
//! ```

use std::io::{self, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use vdk_core::sync;
use vhost::vhost_user::message::{BackendReq, FrontendReq, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE};

/// A vhost-user message header: request, flags, body size (all little-endian u32).
const HEADER: usize = 12;
/// The protocol version in a header's flags.
const VERSION: u32 = 1;

/// The back-end channel of the connected VM, when its front end handed one over.
#[derive(Debug, Default)]
pub(crate) struct Channel(Mutex<Option<UnixStream>>);

impl Channel {
    /// Tells the VM that the device's configuration changed (its capacity): the front end
    /// reads the config space again and passes the change on to the guest. `Ok(false)` when
    /// no VM is connected or its front end gave no back-end channel.
    pub(crate) fn config_changed(&self) -> io::Result<bool> {
        let mut channel = sync::lock(&self.0);
        let Some(s) = channel.as_mut() else {
            return Ok(false);
        };
        // No reply asked for: the front end answers it by asking for the config space on the
        // main socket, and nothing here waits on that.
        let mut header = [0u8; HEADER];
        header[..4].copy_from_slice(&u32::from(BackendReq::CONFIG_CHANGE_MSG).to_le_bytes());
        header[4..8].copy_from_slice(&VERSION.to_le_bytes());
        s.write_all(&header)?;
        Ok(true)
    }

    fn set(&self, s: Option<UnixStream>) {
        *sync::lock(&self.0) = s;
    }
}

/// The two threads passing one VM connection's messages, until either side closes.
#[derive(Debug)]
pub(crate) struct Relay {
    vm: UnixStream,
    handler: UnixStream,
    threads: Vec<JoinHandle<()>>,
    channel: Arc<Channel>,
}

impl Relay {
    /// Passes messages between `vm` (the front end's connection) and `handler` (the
    /// crate's), keeping the back-end channel in `channel`.
    pub(crate) fn start(
        vm: UnixStream,
        handler: UnixStream,
        channel: Arc<Channel>,
    ) -> io::Result<Relay> {
        let to_handler = {
            let (from, to) = (vm.try_clone()?, handler.try_clone()?);
            let channel = Arc::clone(&channel);
            thread::Builder::new()
                .name("vhost-user-relay".into())
                .spawn(move || pass(&from, &to, Some(&channel)))?
        };
        let to_vm = {
            let (from, to) = (handler.try_clone()?, vm.try_clone()?);
            thread::Builder::new()
                .name("vhost-user-relay".into())
                .spawn(move || pass(&from, &to, None))?
        };
        Ok(Relay {
            vm,
            handler,
            threads: vec![to_handler, to_vm],
            channel,
        })
    }

    /// Ends both directions and waits for them; the back-end channel goes with them.
    pub(crate) fn stop(mut self) {
        let _ = self.vm.shutdown(Shutdown::Both);
        let _ = self.handler.shutdown(Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.channel.set(None);
    }
}

/// Passes whole messages from `from` to `to` until either fails or closes, then shuts both
/// down so that the other direction ends too. With `channel`, this is the front end's
/// direction: a back-end channel handed over is kept there.
fn pass(from: &UnixStream, to: &UnixStream, channel: Option<&Channel>) {
    let mut body = vec![0u8; MAX_MSG_SIZE];
    loop {
        let Ok((header, size, fds)) = receive(from, &mut body) else {
            break;
        };
        if let Some(channel) = channel {
            if word(&header, 0) == u32::from(FrontendReq::SET_BACKEND_REQ_FD) && fds.len() == 1 {
                // The handler checks the message and takes its own copy; a bad one ends the
                // connection there.
                let kept = fds[0].try_clone().ok().map(UnixStream::from);
                channel.set(kept);
            }
        }
        if send(to, &header, &body[..size], &fds).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// A header's field at byte `at`: 0 the request, 4 the flags, 8 the body's size.
fn word(header: &[u8; HEADER], at: usize) -> u32 {
    u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
}

/// Reads one message: its header, its body's size, the descriptors that came with it; the
/// body goes into `body`. A body larger than vhost-user allows is an error.
fn receive(from: &UnixStream, body: &mut [u8]) -> io::Result<([u8; HEADER], usize, Vec<OwnedFd>)> {
    let mut header = [0u8; HEADER];
    let mut fds = Vec::new();
    read_exact(from, &mut header, &mut fds)?;
    let size = word(&header, 8) as usize;
    if size > body.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a vhost-user message of {size} bytes"),
        ));
    }
    read_exact(from, &mut body[..size], &mut fds)?;
    Ok((header, size, fds))
}

/// Fills `buf` from the socket, collecting any descriptors that arrive on the way (at most
/// as many as vhost-user allows in one message; more is an error).
fn read_exact(from: &UnixStream, mut buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<()> {
    while !buf.is_empty() {
        let mut space =
            [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_ATTACHED_FD_ENTRIES))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = recvmsg(
            from,
            &mut [IoSliceMut::new(buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = m {
                fds.extend(received);
            }
        }
        if fds.len() > MAX_ATTACHED_FD_ENTRIES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "too many descriptors in a vhost-user message",
            ));
        }
        if got.bytes == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf = &mut buf[got.bytes..];
    }
    Ok(())
}

/// Writes one message with its descriptors (attached to its first byte, as its sender did).
fn send(to: &UnixStream, header: &[u8], body: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    let borrowed: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
    let mut space =
        [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_ATTACHED_FD_ENTRIES))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !borrowed.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&borrowed)) {
        return Err(io::Error::other("descriptors do not fit a message"));
    }
    let sent = sendmsg(
        to,
        &[IoSlice::new(header), IoSlice::new(body)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    // A short send (a full socket buffer) goes on with the rest; its descriptors went first.
    let mut rest = if sent < header.len() {
        [IoSlice::new(&header[sent..]), IoSlice::new(body)]
    } else {
        [
            IoSlice::new(&[]),
            IoSlice::new(&body[sent - header.len()..]),
        ]
    };
    vdk_core::io::write_all_vectored(&mut &*to, &mut rest)?;
    Ok(())
}
