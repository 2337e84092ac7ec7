//! The export: a socket that VMs connect to, one at a time, until stopped.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use tracing::{info, warn};
use vdk_core::{sync, BlockDevice};
use vhost::vhost_user::Error as VhostUserError;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::blk::Blk;
use crate::relay::{Channel, Relay};

/// How an export presents its disk.
#[derive(Clone, Debug)]
pub struct Config {
    /// The most queues a VM may use (QEMU's `num-queues`, by default one per vCPU); each is
    /// served by a thread of its own.
    pub queues: u16,
    /// The most descriptors per queue (QEMU's `queue-size` must not be larger).
    pub queue_size: u16,
    /// The most worker threads of a VM's connection, serving requests beyond the one each
    /// queue's thread serves itself.
    pub threads: u16,
    /// Offer the disk read-only (VIRTIO_BLK_F_RO) and refuse writes.
    pub read_only: bool,
    /// The serial number the guest reads (GET_ID; up to 20 bytes are used).
    pub serial: String,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            queues: 8,
            queue_size: 256,
            threads: 16,
            read_only: false,
            serial: String::new(),
        }
    }
}

#[derive(Default)]
struct State {
    stopping: AtomicBool,
    /// The connected VM's connection, to end it on stop.
    conn: Mutex<Option<ShutdownHandle>>,
    /// The connected VM's back-end channel, to tell it the disk grew.
    channel: Arc<Channel>,
}

/// A disk served on a vhost-user socket. Dropping it stops it, as [`Export::stop`] does.
pub struct Export {
    path: PathBuf,
    state: Arc<State>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export").field("path", &self.path).finish()
    }
}

impl Export {
    /// Listens at `path` (an old socket file there is replaced) and serves `disk` to each VM
    /// that connects, one at a time: when a VM leaves (or its QEMU restarts), the next
    /// connection gets a fresh device, so a reconnecting VMM carries on.
    ///
    /// A path that holds anything but a socket is refused, and so is a socket that another
    /// server still answers on.
    pub fn start(path: &Path, disk: Arc<dyn BlockDevice>, config: Config) -> io::Result<Export> {
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if !m.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{}: exists and is not a socket", path.display()),
                ));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{}: another server listens there", path.display()),
                ));
            }
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(path)?;
        let state = Arc::new(State::default());
        let thread = {
            let state = Arc::clone(&state);
            let path = path.to_path_buf();
            thread::Builder::new()
                .name("vhost-user-blk".into())
                .spawn(move || run(listener, &path, &disk, &config, &state))?
        };
        Ok(Export {
            path: path.to_path_buf(),
            state,
            thread: Some(thread),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a VM is connected now.
    pub fn connected(&self) -> bool {
        sync::lock(&self.state.conn).is_some()
    }

    /// Tells the connected VM that the disk's size changed: its front end reads the
    /// capacity again and the guest sees it (Linux's virtio-blk logs "detected capacity
    /// change"). `Ok(false)` when no VM is connected, or its front end gave no back-end
    /// channel to say it on (it then sees the size when it next connects).
    pub fn capacity_changed(&self) -> io::Result<bool> {
        self.state.channel.config_changed()
    }

    /// Ends the connected VM's connection (its queues stop being served: the VM's requests
    /// wait until a server listens again, if its QEMU reconnects), removes the socket, and
    /// returns once nothing of the export runs.
    pub fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        {
            let conn = sync::lock(&self.state.conn);
            self.state.stopping.store(true, Ordering::SeqCst);
            if let Some(c) = conn.as_ref() {
                c.shutdown();
            }
        }
        // Wakes the accept when no VM is connected.
        let _ = UnixStream::connect(&self.path);
        let _ = thread.join();
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(
    listener: UnixListener,
    path: &Path,
    disk: &Arc<dyn BlockDevice>,
    config: &Config,
    state: &State,
) {
    let socket = path.display().to_string();
    while !state.stopping.load(Ordering::SeqCst) {
        let vm = match listener.accept() {
            Ok((vm, _)) => vm,
            Err(e) => {
                warn!(%socket, error = %e, "vhost-user-blk: cannot accept a connection");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if state.stopping.load(Ordering::SeqCst) {
            break;
        }
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let blk = Blk::new(Arc::clone(disk), config, mem.clone());
        let mut daemon = match VhostUserDaemon::new("vhost-user-blk".into(), Arc::clone(&blk), mem)
        {
            Ok(d) => d,
            Err(e) => {
                warn!(%socket, error = %e, "vhost-user-blk: cannot set up a device");
                continue;
            }
        };
        let relay = match connect_handler(&mut daemon)
            .and_then(|handler| Relay::start(vm, handler, Arc::clone(&state.channel)))
        {
            Ok(r) => r,
            Err(e) => {
                warn!(%socket, error = %e, "vhost-user-blk: a connection failed");
                daemon.request_shutdown();
                let _ = daemon.wait();
                drop(daemon);
                blk.close();
                continue;
            }
        };
        {
            let mut conn = sync::lock(&state.conn);
            if state.stopping.load(Ordering::SeqCst) {
                daemon.request_shutdown();
                let _ = daemon.wait();
                relay.stop();
                drop(daemon);
                blk.close();
                break;
            }
            *conn = daemon.shutdown_handle();
        }
        info!(%socket, "vhost-user-blk: a VM connected");
        match daemon.wait() {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => info!(%socket, "vhost-user-blk: the VM disconnected"),
            Err(e) => warn!(%socket, error = %e, "vhost-user-blk: the connection ended"),
        }
        *sync::lock(&state.conn) = None;
        relay.stop();
        // Dropping the daemon joins its queue threads, closing the device its workers: nothing
        // of this VM runs past here.
        drop(daemon);
        blk.close();
    }
}

/// Starts the crate's handler on a connection of its own, the far end of which is returned
/// (for the relay): the crate connects to a socket in a directory only this user can enter,
/// which is gone again once the connection is made, and the peer is checked to be this
/// process.
fn connect_handler(daemon: &mut VhostUserDaemon<Arc<Blk>>) -> io::Result<UnixStream> {
    let dir = tempfile::Builder::new().prefix("vdk-vhost-").tempdir()?;
    let path = dir.path().join("handler.sock");
    let listener = UnixListener::bind(&path)?;
    let path = path
        .to_str()
        .ok_or_else(|| io::Error::other("the temporary directory's path is not UTF-8"))?;
    daemon
        .start_client(path)
        .map_err(|e| io::Error::other(e.to_string()))?;
    let (handler, _) = listener.accept()?;
    drop(listener);
    dir.close()?;
    let peer = rustix::net::sockopt::socket_peercred(&handler)?;
    if peer.pid != rustix::process::getpid() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "another process connected to the handler's socket",
        ));
    }
    Ok(handler)
}
