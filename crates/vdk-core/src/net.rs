//! What every network front end (NBD, iSCSI) does the same way with its client sockets:
//! connection limits, a deadline for the handshake or login, and TCP keep-alive.
//!
//! ```text
//!   accept ─► Admission::admit(peer ip) ─┬─ Admitted (a ticket): serve; dropping it frees the place
//!                                        └─ Err(why): close at once, before any thread starts
//! ```

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::sync;

/// A server's connection limits: how many at once, and how many from one IP address.
#[derive(Debug)]
pub struct Admission {
    max: usize,
    per_address: usize,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// A connection's place within the limits; dropping it gives the place back.
#[derive(Debug)]
pub struct Admitted {
    admission: Arc<Admission>,
    ip: Option<IpAddr>,
}

impl Admission {
    /// At most `max` connections, and `per_address` from one address.
    pub fn new(max: usize, per_address: usize) -> Arc<Admission> {
        Arc::new(Admission {
            max,
            per_address,
            counts: Mutex::default(),
        })
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        sync::lock(&self.counts)
    }

    /// A place for a connection from `ip` (`None`: a Unix socket, counted in the total
    /// only), or which limit it would break.
    pub fn admit(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<Admitted, String> {
        let mut c = self.counts();
        if c.total >= self.max {
            return Err(format!("{} connections already", c.total));
        }
        if let Some(ip) = ip {
            let n = c.by_address.entry(ip).or_insert(0);
            if *n >= self.per_address {
                return Err(format!("{n} connections from {ip} already"));
            }
            *n += 1;
        }
        c.total += 1;
        Ok(Admitted {
            admission: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut c = self.admission.counts();
        c.total -= 1;
        if let Some(ip) = self.ip {
            if let Some(n) = c.by_address.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    c.by_address.remove(&ip);
                }
            }
        }
    }
}

/// A socket's time-outs, for [`Deadline`].
pub trait Timeouts {
    /// Like [`TcpStream::set_read_timeout`].
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    /// Like [`TcpStream::set_write_timeout`].
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()>;
}

impl Timeouts for TcpStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, t)
    }
}

impl<T: Timeouts + ?Sized> Timeouts for &T {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        (**self).set_read_timeout(t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        (**self).set_write_timeout(t)
    }
}

/// A socket every read and write of which must end before `until`: each is given what is
/// left, so a peer that drips bytes one at a time cannot stretch a handshake past it.
#[derive(Debug)]
pub struct Deadline<S> {
    /// The socket.
    pub stream: S,
    /// When time is up; reads and writes then fail with `TimedOut`.
    pub until: Instant,
}

impl<S: Timeouts> Deadline<S> {
    fn left(&self) -> io::Result<Duration> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "out of time"));
        }
        Ok(left)
    }
}

impl<S: Timeouts + Read> Read for Deadline<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        self.stream.read(buf)
    }
}

impl<S: Timeouts + Write> Write for Deadline<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        self.stream.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

pub use crate::sys::set_keepalive;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_counted_in_all_and_per_address_and_given_back() {
        let a = Admission::new(3, 2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let first = a.admit(Some(ip)).unwrap();
        let _second = a.admit(Some(ip)).unwrap();
        assert!(a.admit(Some(ip)).unwrap_err().contains("from 10.0.0.1"));
        let _unix = a.admit(None).unwrap();
        assert!(a.admit(Some(other)).unwrap_err().contains("3 connections"));
        drop(first);
        let _again = a.admit(Some(ip)).unwrap();
        assert!(!a.counts().by_address.contains_key(&other));
    }
}
