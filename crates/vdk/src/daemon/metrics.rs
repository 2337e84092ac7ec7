//! `vdk daemon --metrics tcp://HOST:PORT`: the daemon's figures in Prometheus's text format
//! on `GET /metrics`, read afresh at each scrape (docs/metrics.md lists them).
//!
//! The HTTP side is the least a scraper needs: one request per connection (parsed by
//! httparse), answered and closed, one connection at a time, with time-outs so that a client
//! that says nothing cannot hold it.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Weak};
use std::thread;
use std::time::Duration;

use tracing::{debug, info, warn};

use super::tracked::LATENCY_BUCKETS;
use super::Daemon;

/// Longest request head read.
const MAX_HEAD: usize = 8 << 10;
/// How long a client may take to send its request or read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `uri` (`tcp://HOST:PORT`; port 0 picks one): done before the daemon says it is
/// ready, so that a wrong address fails the start.
pub fn bind(uri: &str) -> anyhow::Result<TcpListener> {
    let Some(addr) = uri.strip_prefix("tcp://") else {
        anyhow::bail!("--metrics {uri:?}: expected tcp://HOST:PORT (tcp://127.0.0.1:9100)");
    };
    let addr = addr.trim_end_matches('/');
    TcpListener::bind(addr).map_err(|e| anyhow::anyhow!("--metrics {uri}: cannot listen: {e}"))
}

/// Answers scrapes on `listener` for as long as the daemon lives.
pub fn serve(listener: TcpListener, daemon: Weak<Daemon>) -> io::Result<()> {
    let at = listener.local_addr()?;
    info!(url = %format!("http://{at}/metrics"), "metrics");
    thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Some(daemon) = daemon.upgrade() else {
                    return;
                };
                match conn {
                    Ok(stream) => {
                        if let Err(e) = answer(stream, &daemon) {
                            debug!(error = %e, "metrics client");
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "metrics: accept failed");
                        thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })?;
    Ok(())
}

/// Reads one request from `stream` and answers it.
fn answer(mut stream: TcpStream, daemon: &Daemon) -> io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let (method, path) = loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {
                break (
                    req.method.unwrap_or_default().to_owned(),
                    req.path.unwrap_or_default().to_owned(),
                )
            }
            Ok(httparse::Status::Partial) if head.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => {
                return reply(
                    &mut stream,
                    "431 Request Header Fields Too Large",
                    "",
                    false,
                )
            }
            Err(e) => return reply(&mut stream, "400 Bad Request", &format!("{e}\n"), false),
        }
    };
    let path = path.split('?').next().unwrap_or_default();
    match (method.as_str(), path) {
        ("GET" | "HEAD", "/metrics") => {
            let text = render(daemon);
            reply(&mut stream, "200 OK", &text, method == "HEAD")
        }
        ("GET" | "HEAD", _) => reply(&mut stream, "404 Not Found", "see /metrics\n", false),
        _ => reply(
            &mut stream,
            "405 Method Not Allowed",
            "GET /metrics\n",
            false,
        ),
    }
}

fn reply(stream: &mut TcpStream, status: &str, body: &str, head_only: bool) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    if !head_only {
        stream.write_all(body.as_bytes())?;
    }
    stream.flush()
}

/// A label value as the text format writes it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes metric families: `family` starts one (its HELP and TYPE lines), `sample` adds a
/// line to it.
struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                let sep = if i == 0 { "" } else { "," };
                let _ = write!(self.0, "{sep}{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

/// Microseconds as seconds, for the text format.
fn seconds(us: u64) -> f64 {
    // Latencies are far below 2^52 us: exact as floats.
    #[allow(clippy::cast_precision_loss)]
    let s = us as f64 / 1e6;
    s
}

/// The daemon's figures now, in the text format.
pub fn render(daemon: &Daemon) -> String {
    let disks = daemon.disks.all();
    let mut out = Out(String::new());
    let counters: Vec<_> = disks.iter().map(|d| d.device.counters()).collect();
    type Field = fn(&crate::control::Counters) -> u64;
    let families: [(&str, &str, Field); 7] = [
        ("reads", "Read requests served.", |c| c.reads),
        ("writes", "Write requests served.", |c| c.writes),
        ("read_bytes", "Bytes read.", |c| c.bytes_read),
        ("written_bytes", "Bytes written.", |c| c.bytes_written),
        ("flushes", "Flushes served.", |c| c.flushes),
        ("trims", "Trims and zero writes served.", |c| c.trims),
        ("errors", "Requests that failed.", |c| c.errors),
    ];
    for (name, help, get) in families {
        let name = format!("vdk_disk_{name}_total");
        out.family(&name, "counter", help);
        for (d, c) in disks.iter().zip(&counters) {
            out.sample(&name, &[("disk", &d.id)], get(c));
        }
    }
    out.family("vdk_disk_size_bytes", "gauge", "The disk's size.");
    for d in &disks {
        let size = vdk_core::sync::lock(&d.medium).size;
        out.sample("vdk_disk_size_bytes", &[("disk", &d.id)], size);
    }
    out.family("vdk_disk_in_flight", "gauge", "Requests being served now.");
    for d in &disks {
        out.sample(
            "vdk_disk_in_flight",
            &[("disk", &d.id)],
            d.device.in_flight(),
        );
    }
    let name = "vdk_disk_request_duration_seconds";
    out.family(
        name,
        "histogram",
        "Time to serve a request, from the front end's call to the disk's answer.",
    );
    let bucket = format!("{name}_bucket");
    for d in &disks {
        for (op, h) in d.device.latency() {
            let labels = [("disk", d.id.as_str()), ("op", op.name())];
            let mut seen = 0;
            for (i, n) in h.buckets.iter().enumerate().take(LATENCY_BUCKETS - 1) {
                seen += n;
                let le = seconds(1 << i).to_string();
                out.sample(&bucket, &[labels[0], labels[1], ("le", &le)], seen);
            }
            let count: u64 = h.buckets.iter().sum();
            out.sample(&bucket, &[labels[0], labels[1], ("le", "+Inf")], count);
            out.sample(&format!("{name}_sum"), &labels, seconds(h.sum_us));
            out.sample(&format!("{name}_count"), &labels, count);
        }
    }
    objects(&mut out, &disks);
    out.family(
        "vdk_disks",
        "gauge",
        "Open disks, by how the kernel sees them (attach).",
    );
    let mut attach = std::collections::BTreeMap::new();
    for d in &disks {
        *attach.entry(d.attach.to_string()).or_insert(0u64) += 1;
    }
    for (kind, n) in &attach {
        out.sample("vdk_disks", &[("attach", kind)], n);
    }
    out.family(
        "vdk_frontend_connections",
        "gauge",
        "Client connections open now, per front end.",
    );
    out.sample(
        "vdk_frontend_connections",
        &[("frontend", "nbd")],
        daemon.nbd.connections(),
    );
    out.sample(
        "vdk_frontend_connections",
        &[("frontend", "iscsi")],
        daemon.iscsi.connections(),
    );
    out.sample(
        "vdk_frontend_connections",
        &[("frontend", "vhost-user")],
        disks.iter().filter(|d| super::vhost::connected(d)).count(),
    );
    process(&mut out);
    out.0
}

/// The figures of object-store disks: their cache and uploads.
fn objects(out: &mut Out, disks: &[Arc<super::disks::Disk>]) {
    let stats: Vec<_> = disks
        .iter()
        .filter_map(|d| {
            let object = vdk_core::sync::lock(&d.recipe).object.upgrade()?;
            Some((d.id.as_str(), object.stats()))
        })
        .collect();
    type Field = fn(&vdk_objstore::CacheStats) -> u64;
    let families: [(&str, &str, &str, Field); 4] = [
        (
            "vdk_objstore_cache_bytes",
            "gauge",
            "Bytes in the disk's cache.",
            |s| s.cached,
        ),
        (
            "vdk_objstore_dirty_bytes",
            "gauge",
            "Bytes in the cache not yet uploaded.",
            |s| s.dirty,
        ),
        (
            "vdk_objstore_uploads_in_flight",
            "gauge",
            "Chunk uploads running now.",
            |s| s.uploading,
        ),
        (
            "vdk_objstore_upload_failures_total",
            "counter",
            "Chunk uploads that failed (each is retried).",
            |s| s.upload_failures,
        ),
    ];
    for (name, kind, help, get) in families {
        out.family(name, kind, help);
        for (id, s) in &stats {
            out.sample(name, &[("disk", id)], get(s));
        }
    }
}

/// The process's resident memory and open files (Linux's /proc).
fn process(out: &mut Out) {
    #[cfg(target_os = "linux")]
    {
        let rss = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
                let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
                Some(kib * 1024)
            });
        if let Some(rss) = rss {
            out.family(
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory size in bytes.",
            );
            out.sample("process_resident_memory_bytes", &[], rss);
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            out.family(
                "process_open_fds",
                "gauge",
                "Number of open file descriptors.",
            );
            out.sample("process_open_fds", &[], fds.count());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = out;
}
