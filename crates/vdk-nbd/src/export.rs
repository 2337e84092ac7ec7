//! Exports: named disks offered by a server, and what is advertised for each.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use vdk_core::bitmap::Bitmaps;
use vdk_core::{BlockDevice, DiskInfo};

use crate::proto::tflags;

/// A disk offered under a name.
#[derive(Debug)]
pub struct Export {
    /// The name clients ask for. The first export of a server is also the default export,
    /// reached with the empty name.
    pub name: String,
    /// Shown by `nbdinfo --list`.
    pub description: String,
    /// The disk.
    pub device: Arc<dyn BlockDevice>,
    /// Refuse writes even if the disk takes them: the flag is advertised, and the server
    /// puts a read-only layer over the disk so that no write reaches it whatever a client
    /// sends.
    pub read_only: bool,
    /// Who may see and open it; empty: every client.
    pub allow: Vec<Rule>,
    /// The disk's dirty bitmaps, offered as `qemu:dirty-bitmap:NAME` metadata contexts.
    pub bitmaps: Option<Arc<Bitmaps>>,
}

/// Who a client is, as export allow-lists see it.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    /// Its IP address; `None` on a Unix socket.
    pub ip: Option<IpAddr>,
    /// The names in its TLS client certificate (common names, DNS alternative names), once
    /// TLS is up and a certificate was verified.
    pub cert_names: Vec<String>,
    /// The serving process itself, on a socket pair it made (its disks' kernel NBD devices):
    /// every export lets it in, whatever its allow-list says of other clients.
    pub own: bool,
}

/// One entry of an export's allow-list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Clients whose address is in this network: `ADDR` or `ADDR/PREFIX`.
    Net(IpAddr, u8),
    /// Clients on a Unix socket: `unix`.
    Unix,
    /// Clients whose verified certificate has this name: `cert:NAME`.
    Cert(String),
}

impl Rule {
    /// Whether `peer` is let in by this rule.
    pub fn matches(&self, peer: &Peer) -> bool {
        match self {
            Rule::Unix => peer.ip.is_none(),
            Rule::Cert(name) => peer.cert_names.iter().any(|n| n == name),
            Rule::Net(net, prefix) => peer.ip.is_some_and(|ip| in_network(ip, *net, *prefix)),
        }
    }
}

/// Whether `ip` is in `net/prefix`; IPv4 clients seen as IPv4-mapped IPv6 count as IPv4.
fn in_network(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

impl FromStr for Rule {
    type Err = String;
    fn from_str(s: &str) -> Result<Rule, String> {
        if s == "unix" {
            return Ok(Rule::Unix);
        }
        if let Some(name) = s.strip_prefix("cert:") {
            if name.is_empty() {
                return Err("cert: needs a certificate name".into());
            }
            return Ok(Rule::Cert(name.to_owned()));
        }
        let bad = || format!("invalid allow rule {s:?}: use ADDR[/PREFIX], unix or cert:NAME");
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let ip: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        Ok(Rule::Net(ip, prefix))
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Unix => f.write_str("unix"),
            Rule::Cert(n) => write!(f, "cert:{n}"),
            Rule::Net(ip, p) => write!(f, "{ip}/{p}"),
        }
    }
}

impl Export {
    /// An export of `device` named `name`, writable if the device is.
    pub fn new(name: impl Into<String>, device: Arc<dyn BlockDevice>) -> Export {
        Export {
            name: name.into(),
            description: String::new(),
            device,
            read_only: false,
            allow: Vec::new(),
            bitmaps: None,
        }
    }

    /// Whether `peer` may see and open this export.
    pub fn allows(&self, peer: &Peer) -> bool {
        peer.own || self.allow.is_empty() || self.allow.iter().any(|r| r.matches(peer))
    }

    /// Transmission flags, advertised truthfully from the disk's info.
    pub fn transmission_flags(&self, info: &DiskInfo, structured: bool) -> u16 {
        let mut f = tflags::HAS_FLAGS | tflags::SEND_FLUSH | tflags::SEND_CACHE;
        let set = |f: &mut u16, on: bool, bit: u16| {
            if on {
                *f |= bit;
            }
        };
        let ro = self.read_only || info.read_only;
        set(&mut f, ro, tflags::READ_ONLY);
        set(&mut f, !ro, tflags::SEND_FUA | tflags::SEND_WRITE_ZEROES);
        set(&mut f, !ro && info.caps.trim, tflags::SEND_TRIM);
        set(&mut f, !ro && info.caps.fast_zero, tflags::SEND_FAST_ZERO);
        set(&mut f, info.rotational, tflags::ROTATIONAL);
        set(&mut f, structured, tflags::SEND_DF);
        set(&mut f, info.caps.multi_conn, tflags::CAN_MULTI_CONN);
        f
    }

    /// Minimum, preferred and maximum block sizes (NBD_INFO_BLOCK_SIZE).
    pub fn block_sizes(info: &DiskInfo) -> (u32, u32, u32) {
        let min = info.logical_block_size.max(1);
        let preferred = info.physical_block_size.max(min).max(512);
        let max = info
            .max_request
            .min(DiskInfo::DEFAULT_MAX_REQUEST)
            .max(preferred);
        (min, preferred, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(ip: &str) -> Peer {
        Peer {
            ip: Some(ip.parse().unwrap()),
            ..Peer::default()
        }
    }

    #[test]
    fn rules_match_networks_sockets_and_names() {
        let r: Rule = "10.1.0.0/16".parse().unwrap();
        assert!(r.matches(&peer("10.1.200.3")));
        assert!(r.matches(&peer("::ffff:10.1.0.1")));
        assert!(!r.matches(&peer("10.2.0.1")));
        assert!(!r.matches(&Peer::default()));
        let one: Rule = "127.0.0.1".parse().unwrap();
        assert_eq!(one.to_string(), "127.0.0.1/32");
        assert!(one.matches(&peer("127.0.0.1")) && !one.matches(&peer("127.0.0.2")));
        let all: Rule = "0.0.0.0/0".parse().unwrap();
        assert!(all.matches(&peer("192.168.1.1")));
        let v6: Rule = "fd00::/8".parse().unwrap();
        assert!(v6.matches(&peer("fd12::1")) && !v6.matches(&peer("fe80::1")));
        assert!(Rule::Unix.matches(&Peer::default()));
        let cert: Rule = "cert:alice".parse().unwrap();
        let alice = Peer {
            cert_names: vec!["alice".into()],
            ..Peer::default()
        };
        assert!(cert.matches(&alice) && !cert.matches(&peer("1.2.3.4")));
        for bad in [
            "",
            "cert:",
            "10.0.0.0/33",
            "::/129",
            "host.example",
            "1.2.3.4/x",
        ] {
            assert!(bad.parse::<Rule>().is_err(), "{bad}");
        }
    }
}
