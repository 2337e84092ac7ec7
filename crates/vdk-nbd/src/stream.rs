//! TCP and Unix sockets behind one type.

use std::io::{self, IoSlice, Read, Write};
use std::net::{IpAddr, Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::sys::{self, UnixListener, UnixStream};
use crate::tls::record::Session;

/// A connected client socket.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix domain.
    Unix(UnixStream),
    /// TLS over either, after STARTTLS (its handles share one session).
    Tls(Arc<Session>),
}

impl Stream {
    /// A second handle to the same socket.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tls(s) => Stream::Tls(Arc::clone(s)),
        })
    }

    /// Shuts down reading, writing or both.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tls(s) => s.shutdown(how),
        }
    }

    /// Sets the read time-out (`None`: block forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tls(s) => s.socket().set_read_timeout(t),
        }
    }

    /// Sets the write time-out (`None`: block forever).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tls(s) => s.socket().set_write_timeout(t),
        }
    }

    /// Makes reads and writes return `WouldBlock` instead of waiting.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(on),
            Stream::Unix(s) => s.set_nonblocking(on),
            Stream::Tls(s) => s.socket().set_nonblocking(on),
        }
    }

    /// TCP keep-alive ([`vdk_core::net::set_keepalive`]); nothing on a Unix socket.
    pub fn set_keepalive(&self, idle: Duration) {
        match self {
            Stream::Tcp(s) => vdk_core::net::set_keepalive(s, idle),
            Stream::Unix(_) => {}
            Stream::Tls(s) => s.socket().set_keepalive(idle),
        }
    }

    /// The client's IP address (`None` on a Unix socket).
    pub fn peer_ip(&self) -> Option<IpAddr> {
        match self {
            Stream::Tcp(s) => s.peer_addr().ok().map(|a| a.ip()),
            Stream::Unix(_) => None,
            Stream::Tls(s) => s.socket().peer_ip(),
        }
    }

    /// The peer, for log lines.
    pub fn peer(&self) -> String {
        match self {
            Stream::Tcp(s) => s
                .peer_addr()
                .map_or_else(|_| "tcp client".into(), |a| a.to_string()),
            Stream::Unix(_) => "unix client".into(),
            Stream::Tls(s) => s.socket().peer(),
        }
    }

    /// Writes every byte of every slice, in order.
    pub fn write_all_vectored(&mut self, bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        vdk_core::io::write_all_vectored(self, bufs)
    }
}

impl vdk_core::net::Timeouts for Stream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        Stream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        Stream::set_write_timeout(self, t)
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match *self {
            Stream::Tcp(s) => (&mut &*s).read(buf),
            Stream::Unix(s) => (&mut &*s).read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match *self {
            Stream::Tcp(s) => (&mut &*s).write(buf),
            Stream::Unix(s) => (&mut &*s).write(buf),
            Stream::Tls(s) => s.write_vectored(&[IoSlice::new(buf)]),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match *self {
            Stream::Tcp(s) => (&mut &*s).write_vectored(bufs),
            Stream::Unix(s) => (&mut &*s).write_vectored(bufs),
            Stream::Tls(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&*self).write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A listening socket.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix domain, with the path to remove when dropped.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Listens on a TCP address such as `127.0.0.1:10809`.
    pub fn tcp(addr: &str) -> io::Result<Listener> {
        Ok(Listener::Tcp(TcpListener::bind(addr)?))
    }

    /// Listens on a Unix socket path. A stale socket file (nobody listening) is replaced; a
    /// live one is `AddrInUse`.
    pub fn unix(path: impl Into<PathBuf>) -> io::Result<Listener> {
        let path = path.into();
        match UnixListener::bind(&path) {
            Ok(l) => Ok(Listener::Unix(l, path)),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                if UnixStream::connect(&path).is_ok() {
                    return Err(e);
                }
                std::fs::remove_file(&path)?;
                Ok(Listener::Unix(UnixListener::bind(&path)?, path))
            }
            Err(e) => Err(e),
        }
    }

    /// Listens where `uri` says: `tcp://HOST:PORT` or `unix:///PATH`.
    pub fn bind(uri: &str) -> io::Result<Listener> {
        if let Some(addr) = uri.strip_prefix("tcp://") {
            Listener::tcp(addr.trim_end_matches('/'))
        } else if let Some(path) = uri.strip_prefix("unix://") {
            Listener::unix(path)
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid listen address {uri:?}: use tcp://HOST:PORT or unix:///PATH"),
            ))
        }
    }

    /// Waits for the next client.
    pub fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Listener::Unix(l, _) => {
                let s = l.accept()?.0;
                sys::large_send_buffer(&s);
                Ok(Stream::Unix(s))
            }
        }
    }

    /// The address as a URI, e.g. `nbd://127.0.0.1:10809` or `nbd+unix:///?socket=/x.sock`.
    pub fn uri(&self) -> String {
        match self {
            Listener::Tcp(_) => self.export_uri("").trim_end_matches('/').to_owned(),
            Listener::Unix(..) => self.export_uri(""),
        }
    }

    /// The URI of the export `name` here, e.g. `nbd://127.0.0.1:10809/disk` or
    /// `nbd+unix:///disk?socket=/x.sock`.
    pub fn export_uri(&self, name: &str) -> String {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("nbd://{a}/{name}"),
                Err(_) => format!("nbd://?/{name}"),
            },
            Listener::Unix(_, p) => format!("nbd+unix:///{name}?socket={}", p.display()),
        }
    }
}

impl vdk_core::lifecycle::Accept for Listener {
    type Stream = Stream;
    fn accept(&self) -> io::Result<Stream> {
        Listener::accept(self)
    }
    fn waker(&self) -> Box<dyn Fn() + Send + Sync> {
        match self {
            Listener::Tcp(l) => vdk_core::lifecycle::tcp_waker(l),
            Listener::Unix(_, path) => {
                let path = path.clone();
                // Failure means nobody is blocked in accept any more, which is what was wanted.
                Box::new(move || drop(UnixStream::connect(&path)))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            // The socket file is ours; if it is already gone there is nothing to do.
            let _ = std::fs::remove_file(path);
        }
    }
}
