//! Windows: TCP only for now. std has no Unix domain sockets there (Windows 10 has AF_UNIX,
//! which a crate can reach later), so a `unix://` listener is refused with a clear error.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::path::Path;
use std::time::Duration;

fn no_unix() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "Unix sockets are not available on Windows yet: listen on tcp://",
    )
}

/// A Unix socket connection: none can exist here (every way to make one fails).
#[derive(Debug)]
pub enum UnixStream {}

/// A Unix socket listener: none can exist here.
#[derive(Debug)]
pub enum UnixListener {}

impl UnixStream {
    /// Fails: no Unix sockets here.
    pub fn connect(_path: impl AsRef<Path>) -> io::Result<UnixStream> {
        Err(no_unix())
    }
    /// Never called: no value exists.
    pub fn try_clone(&self) -> io::Result<UnixStream> {
        match *self {}
    }
    /// Never called: no value exists.
    pub fn shutdown(&self, _how: Shutdown) -> io::Result<()> {
        match *self {}
    }
    /// Never called: no value exists.
    pub fn set_read_timeout(&self, _t: Option<Duration>) -> io::Result<()> {
        match *self {}
    }
    /// Never called: no value exists.
    pub fn set_write_timeout(&self, _t: Option<Duration>) -> io::Result<()> {
        match *self {}
    }
    /// Never called: no value exists.
    pub fn set_nonblocking(&self, _on: bool) -> io::Result<()> {
        match *self {}
    }
}

impl Read for &UnixStream {
    fn read(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        match **self {}
    }
}

impl Write for &UnixStream {
    fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
        match **self {}
    }
    fn write_vectored(&mut self, _bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match **self {}
    }
    fn flush(&mut self) -> io::Result<()> {
        match **self {}
    }
}

impl UnixListener {
    /// Fails: no Unix sockets here.
    pub fn bind(_path: impl AsRef<Path>) -> io::Result<UnixListener> {
        Err(no_unix())
    }
    /// Never called: no value exists.
    pub fn accept(&self) -> io::Result<(UnixStream, ())> {
        match *self {}
    }
}

/// Never called: no Unix connection exists here.
pub fn large_send_buffer(s: &UnixStream) {
    match *s {}
}
