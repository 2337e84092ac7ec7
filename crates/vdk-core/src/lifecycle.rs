//! The life of a server, the same for every front end that takes clients on sockets (NBD,
//! iSCSI, and those to come): listeners, connections, shutdown, and the flush at the end.
//!
//! ```text
//!   Lifecycle::accept(listeners) ─► a thread per listener: accept ─► serve(stream)
//!   serve ─► Lifecycle::spawn(peer, stop, run) ─┬─ refused: limits reached, or shutting down
//!                                               └─ a thread runs run(&Connection), which is
//!                                                  registered until run returns
//!   Lifecycle::shutdown ─► listeners woken and left ─► every connection's stop() called
//!   accept returns ─► Lifecycle::wait_closed ─► flush_all(every disk): every failure reported
//! ```
//!
//! A connection's `stop` ends it gently: the front end shuts the reading side of its socket
//! (requests already read are answered, then it closes) and may first tell the client why
//! (iSCSI's Asynchronous Message). A connection can carry a tag, the name of what it serves,
//! so that withdrawing one export ends its clients only ([`Lifecycle::end_tagged`]).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use tracing::warn;

use crate::net::{Admission, Admitted};
use crate::sync::{lock, wait};
use crate::BlockDevice;

/// How long an accept loop waits after a failed accept (out of file descriptors, say) before
/// it tries again, instead of spinning.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A listening socket a server takes clients from.
pub trait Accept: Send + Sync {
    /// A connected client.
    type Stream: Send + 'static;
    /// Waits for the next client.
    fn accept(&self) -> io::Result<Self::Stream>;
    /// Something that wakes a thread blocked in [`accept`](Self::accept) (it connects to the
    /// socket), called once at shutdown.
    fn waker(&self) -> Box<dyn Fn() + Send + Sync>;
}

impl Accept for TcpListener {
    type Stream = TcpStream;
    fn accept(&self) -> io::Result<TcpStream> {
        TcpListener::accept(self).map(|(s, _)| s)
    }
    fn waker(&self) -> Box<dyn Fn() + Send + Sync> {
        tcp_waker(self)
    }
}

/// Wakes a thread blocked in `accept` on `listener` by connecting to it (to loopback when it
/// listens on every address).
pub fn tcp_waker(listener: &TcpListener) -> Box<dyn Fn() + Send + Sync> {
    let Ok(mut addr) = listener.local_addr() else {
        return Box::new(|| {});
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            IpAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        });
    }
    // Failure means nobody is blocked in accept any more, which is what was wanted.
    Box::new(move || drop(TcpStream::connect_timeout(&addr, Duration::from_secs(1))))
}

/// What ends one connection gently, called at shutdown or when its tag is withdrawn.
pub type Stop = Arc<dyn Fn() + Send + Sync>;

/// Listeners, connections and shutdown of one server. Cloning it gives another handle to the
/// same server (for a signal handler's thread, or a test).
#[derive(Clone)]
pub struct Lifecycle(Arc<Inner>);

struct Inner {
    admission: Arc<Admission>,
    state: Mutex<State>,
    /// Notified whenever a connection ends.
    changed: Condvar,
}

#[derive(Default)]
struct State {
    stopping: bool,
    next_id: u64,
    conns: HashMap<u64, Entry>,
    wakers: Vec<Box<dyn Fn() + Send + Sync>>,
}

struct Entry {
    tag: Option<String>,
    stop: Stop,
}

impl fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = lock(&self.0.state);
        f.debug_struct("Lifecycle")
            .field("stopping", &st.stopping)
            .field("connections", &st.conns.len())
            .finish()
    }
}

impl Lifecycle {
    /// A server that takes at most `max` connections at once, and `per_address` from one IP
    /// address.
    pub fn new(max: usize, per_address: usize) -> Lifecycle {
        Lifecycle(Arc::new(Inner {
            admission: Admission::new(max, per_address),
            state: Mutex::default(),
            changed: Condvar::new(),
        }))
    }

    /// Whether [`shutdown`](Self::shutdown) has been called.
    pub fn is_stopping(&self) -> bool {
        lock(&self.0.state).stopping
    }

    /// Takes clients on every listener, handing each to `serve` (which usually calls
    /// [`spawn`](Self::spawn)), until [`shutdown`](Self::shutdown). Returns once every
    /// listener has stopped; connections may still be running ([`wait_closed`](Self::wait_closed)).
    pub fn accept<L: Accept>(&self, listeners: &[L], serve: impl Fn(L::Stream) + Sync) {
        {
            let mut st = lock(&self.0.state);
            if st.stopping {
                return;
            }
            st.wakers.extend(listeners.iter().map(Accept::waker));
        }
        thread::scope(|s| {
            for l in listeners {
                let serve = &serve;
                s.spawn(move || self.accept_loop(l, serve));
            }
        });
    }

    fn accept_loop<L: Accept>(&self, listener: &L, serve: &impl Fn(L::Stream)) {
        while !self.is_stopping() {
            match listener.accept() {
                // The waker's own connection, or a client that came as the server stopped.
                Ok(stream) if self.is_stopping() => drop(stream),
                Ok(stream) => serve(stream),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    thread::sleep(ACCEPT_BACKOFF);
                }
            }
        }
    }

    /// Runs one connection on a thread named `name`: `run` gets its [`Connection`], registered with `stop` until `run` returns. Refused, with why, when the connection
    /// limits are reached (`peer` is the client's address; `None` for a Unix socket) or the
    /// server is shutting down; the caller then drops the socket, which closes it.
    pub fn spawn(
        &self,
        name: &str,
        peer: Option<IpAddr>,
        stop: Stop,
        run: impl FnOnce(&Connection) + Send + 'static,
    ) -> Result<(), String> {
        let place = self.0.admission.admit(peer)?;
        let id = {
            let mut st = lock(&self.0.state);
            if st.stopping {
                return Err("the server is shutting down".into());
            }
            st.next_id += 1;
            let id = st.next_id;
            st.conns.insert(id, Entry { tag: None, stop });
            id
        };
        let connection = Connection {
            life: self.clone(),
            id,
            place: Some(place),
        };
        match thread::Builder::new()
            .name(name.into())
            .spawn(move || run(&connection))
        {
            Ok(_) => Ok(()),
            // The closure, and the Connection in it, were dropped: the entry is gone.
            Err(e) => Err(format!("cannot start a thread: {e}")),
        }
    }

    /// Stops taking clients and calls every connection's `stop`; connections that register a
    /// stop later ([`Connection::on_stop`]) have it called at once. Returns without waiting.
    pub fn shutdown(&self) {
        let (wakers, stops) = {
            let mut st = lock(&self.0.state);
            st.stopping = true;
            let stops: Vec<Stop> = st.conns.values().map(|e| Arc::clone(&e.stop)).collect();
            (std::mem::take(&mut st.wakers), stops)
        };
        for w in wakers {
            w();
        }
        for s in stops {
            s();
        }
    }

    /// Waits until every connection has ended.
    pub fn wait_closed(&self) {
        let mut st = lock(&self.0.state);
        while !st.conns.is_empty() {
            st = wait(&self.0.changed, st);
        }
    }

    /// Stops the connections tagged `tag` and waits until they have ended.
    pub fn end_tagged(&self, tag: &str) {
        let tagged = |st: &State| -> Vec<Stop> {
            st.conns
                .values()
                .filter(|e| e.tag.as_deref() == Some(tag))
                .map(|e| Arc::clone(&e.stop))
                .collect()
        };
        let stops = tagged(&lock(&self.0.state));
        for s in stops {
            s();
        }
        let mut st = lock(&self.0.state);
        while !tagged(&st).is_empty() {
            st = wait(&self.0.changed, st);
        }
    }

    /// How many connections are running.
    pub fn connections(&self) -> usize {
        lock(&self.0.state).conns.len()
    }
}

/// One running connection. It stays registered with its [`Lifecycle`] for as long as it
/// lives; dropping it (when the connection's thread ends) frees its place.
pub struct Connection {
    life: Lifecycle,
    id: u64,
    /// Its place under the limits: given back before the connection counts as ended, so that
    /// whoever waits for the end can connect again at once.
    place: Option<Admitted>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection").field("id", &self.id).finish()
    }
}

impl Connection {
    /// A number for this connection, unique within its server.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether the server is shutting down.
    pub fn is_stopping(&self) -> bool {
        self.life.is_stopping()
    }

    /// Tags the connection with what it serves (an export's name), for
    /// [`Lifecycle::end_tagged`].
    pub fn tag(&self, tag: &str) {
        if let Some(e) = lock(&self.life.0.state).conns.get_mut(&self.id) {
            e.tag = Some(tag.to_owned());
        }
    }

    /// Replaces what stops this connection (once it can say goodbye, say). If the server is
    /// already shutting down, `stop` is called at once.
    pub fn on_stop(&self, stop: Stop) {
        let stopping = {
            let mut st = lock(&self.life.0.state);
            if let Some(e) = st.conns.get_mut(&self.id) {
                e.stop = Arc::clone(&stop);
            }
            st.stopping
        };
        if stopping {
            stop();
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        drop(self.place.take());
        lock(&self.life.0.state).conns.remove(&self.id);
        self.life.0.changed.notify_all();
    }
}

/// Disks that did not flush, each with why.
#[derive(Debug)]
pub struct FlushFailed(pub Vec<(String, crate::Error)>);

impl fmt::Display for FlushFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "{n} disk{} did not flush: ",
            if n == 1 { "" } else { "s" }
        )?;
        for (i, (name, e)) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { "; " };
            write!(f, "{sep}{name}: {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for FlushFailed {}

/// Flushes every disk (by name), each one even when one before it failed. Every failure is
/// logged and all of them are returned together.
pub fn flush_all<'a>(
    disks: impl IntoIterator<Item = (String, &'a dyn BlockDevice)>,
) -> Result<(), FlushFailed> {
    let mut failed = Vec::new();
    for (name, disk) in disks {
        if let Err(e) = disk.flush() {
            warn!(disk = %name, error = %e, "flush failed");
            failed.push((name, e));
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(FlushFailed(failed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DiskInfo, Error};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Each connection echoes nothing: it waits for its client to close, or for its stop.
    fn serve(life: &Lifecycle, stream: TcpStream, served: &AtomicUsize) {
        served.fetch_add(1, Ordering::SeqCst);
        let handle = stream.try_clone().unwrap();
        let stop: Stop = Arc::new(move || drop(handle.shutdown(std::net::Shutdown::Read)));
        let spawned = life.spawn("test-conn", None, stop, move |c| {
            c.tag(if c.id() % 2 == 0 { "even" } else { "odd" });
            let _ = io::copy(&mut &stream, &mut io::sink());
        });
        spawned.unwrap();
    }

    #[test]
    fn shutdown_wakes_listeners_ends_connections_and_refuses_new_ones() {
        let life = Lifecycle::new(16, 16);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let served = AtomicUsize::new(0);
        thread::scope(|s| {
            s.spawn(|| {
                life.accept(std::slice::from_ref(&listener), |st| {
                    serve(&life, st, &served)
                })
            });
            let clients: Vec<TcpStream> =
                (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
            while life.connections() < 4 {
                thread::sleep(Duration::from_millis(5));
            }
            // Withdrawing one tag ends those connections only.
            life.end_tagged("even");
            assert_eq!(life.connections(), 2);
            life.shutdown();
            drop(clients);
        });
        life.wait_closed();
        assert_eq!(served.load(Ordering::SeqCst), 4);
        let refused = life.spawn("late", None, Arc::new(|| {}), |_| {});
        assert!(refused.unwrap_err().contains("shutting down"));
    }

    #[test]
    fn a_stop_registered_after_shutdown_runs_at_once() {
        let life = Lifecycle::new(4, 4);
        let ran = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let ran2 = Arc::clone(&ran);
        life.spawn("c", None, Arc::new(|| {}), move |c| {
            rx.recv().unwrap();
            c.on_stop(Arc::new(move || {
                ran2.fetch_add(1, Ordering::SeqCst);
            }));
        })
        .unwrap();
        life.shutdown();
        tx.send(()).unwrap();
        life.wait_closed();
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn the_limits_refuse_connections_past_them() {
        let life = Lifecycle::new(1, 1);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        life.spawn("a", None, Arc::new(|| {}), move |_| {
            let _ = rx.recv();
        })
        .unwrap();
        let second = life.spawn("b", None, Arc::new(|| {}), |_| {});
        assert!(second.unwrap_err().contains("1 connections already"));
        drop(tx);
        life.wait_closed();
        life.spawn("c", None, Arc::new(|| {}), |_| {}).unwrap();
        life.wait_closed();
    }

    /// A disk whose flush fails, or not.
    #[derive(Debug)]
    struct Flushes(bool);

    impl BlockDevice for Flushes {
        fn info(&self) -> DiskInfo {
            DiskInfo::new(512)
        }
        fn read_at(&self, buf: &mut [u8], _: u64) -> crate::Result<()> {
            buf.fill(0);
            Ok(())
        }
        fn write_at(&self, _: &[u8], _: u64, _: bool) -> crate::Result<()> {
            Ok(())
        }
        fn flush(&self) -> crate::Result<()> {
            if self.0 {
                Ok(())
            } else {
                Err(Error::Io(io::Error::other("disk gone")))
            }
        }
    }

    #[test]
    fn every_disk_is_flushed_and_every_failure_reported() {
        let disks = [Flushes(false), Flushes(true), Flushes(false)];
        let named = disks
            .iter()
            .enumerate()
            .map(|(i, d)| (format!("d{i}"), d as &dyn BlockDevice));
        let e = flush_all(named).unwrap_err();
        let names: Vec<&str> = e.0.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["d0", "d2"]);
        assert!(e.to_string().starts_with("2 disks did not flush: d0: "));
    }
}
