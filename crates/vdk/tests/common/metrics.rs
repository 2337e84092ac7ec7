//! `vdk daemon --metrics`: the URL a daemon logs, scrapes checked by promtool, samples by name.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use super::{need, stdout, Daemon};

/// Starts `d` with metrics on a free loopback port; the URL to scrape.
pub fn start(d: &Daemon) -> String {
    need("curl");
    need("promtool");
    d.start(&["--metrics", "tcp://127.0.0.1:0"]);
    assert!(d.log_has("/metrics"), "{}", d.log());
    let log = d.log();
    let at = log
        .find("http://127.0.0.1:")
        .expect("the metrics URL in the log");
    log[at..]
        .chars()
        .take_while(|c| !c.is_whitespace())
        .collect()
}

/// The samples of a scrape, by metric name with its labels as written.
pub fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').expect("NAME VALUE");
            (name.to_owned(), value.parse().expect("a number"))
        })
        .collect()
}

/// Scrapes `url` with curl and has promtool (Prometheus's own linter) check what came.
pub fn scrape(url: &str) -> String {
    let text = stdout(Command::new("curl").args(["-fsS", url]));
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    {
        use std::io::Write;
        check
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text
}
