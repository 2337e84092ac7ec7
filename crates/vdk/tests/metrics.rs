//! `vdk daemon --metrics`: scraped with curl while fio loads a disk over NBD, every scrape
//! passes `promtool check metrics` (Prometheus's own linter), and once the load stops the
//! counters are those `vdk list` reports. An object-store disk shows its cache.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::metrics::{samples, scrape};
use common::{need, run, stdout, Daemon};

#[test]
fn metrics_scraped_under_load_pass_promtool_and_match_vdk_list() {
    need("fio");
    let d = Daemon::new();
    let url = common::metrics::start(&d);
    let v = d.open(&[d.path("m.img").to_str().unwrap(), "64M", "--attach", "none"]);
    let id = v["id"].as_str().unwrap().to_owned();
    let nbd = v["nbd"][0].as_str().unwrap().to_owned();
    let bucket = format!("file://{}", d.path("bucket/disk").display());
    let o = d.open(&[&bucket, "16M", "--attach", "none"]);
    let object = o["id"].as_str().unwrap().to_owned();

    // Load: fio reads and writes over NBD for 4 s while we scrape.
    let mut fio = Command::new("fio")
        .args(["--name=load", "--ioengine=nbd", &format!("--uri={nbd}")])
        .args(["--rw=randrw", "--bs=4k", "--iodepth=8", "--size=32M"])
        .args(["--time_based", "--runtime=4"])
        .stdout(Stdio::null())
        .spawn()
        .expect("run fio");
    let mut busy = false;
    let mut last_reads = 0.0;
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(400));
        let m = samples(&scrape(&url));
        let reads = m[&format!("vdk_disk_reads_total{{disk=\"{id}\"}}")];
        assert!(reads >= last_reads, "a counter never goes down");
        last_reads = reads;
        busy |= m["vdk_frontend_connections{frontend=\"nbd\"}"] >= 1.0;
    }
    assert!(fio.wait().unwrap().success());
    assert!(busy, "fio's NBD connection was seen");
    assert!(last_reads > 0.0, "reads were counted under load");

    // Some writes to the object-store disk: its cache holds them.
    let obj_uri = o["nbd"][0].as_str().unwrap();
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 7 0 1M", obj_uri])
        .env("PATH", common::path_env()));

    // Quiet now: the counters are what `vdk list` says.
    let m = samples(&scrape(&url));
    let list = d.json(&["list"]);
    let disk = list
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == id.as_str())
        .unwrap();
    for (metric, field) in [
        ("reads", "reads"),
        ("writes", "writes"),
        ("read_bytes", "bytes_read"),
        ("written_bytes", "bytes_written"),
        ("flushes", "flushes"),
        ("errors", "errors"),
    ] {
        let got = m[&format!("vdk_disk_{metric}_total{{disk=\"{id}\"}}")];
        let want = disk["stats"][field].as_u64().unwrap() as f64;
        assert_eq!(got, want, "{metric} against vdk list's {field}");
    }
    let label = format!("disk=\"{id}\",op=\"read\"");
    let count = m[&format!("vdk_disk_request_duration_seconds_count{{{label}}}")];
    assert_eq!(
        count,
        disk["stats"]["reads"].as_u64().unwrap() as f64,
        "every read is in the latency histogram"
    );
    assert_eq!(
        m[&format!("vdk_disk_request_duration_seconds_bucket{{{label},le=\"+Inf\"}}")],
        count
    );
    assert_eq!(m[&format!("vdk_disk_in_flight{{disk=\"{id}\"}}")], 0.0);
    assert_eq!(
        m[&format!("vdk_disk_size_bytes{{disk=\"{id}\"}}")],
        64.0 * 1048576.0
    );
    assert!(m[&format!("vdk_objstore_cache_bytes{{disk=\"{object}\"}}")] >= 1048576.0);
    assert!(m.contains_key(&format!(
        "vdk_objstore_upload_failures_total{{disk=\"{object}\"}}"
    )));
    assert_eq!(m["vdk_disks{attach=\"none\"}"], 2.0);
    assert!(m["process_resident_memory_bytes"] > 1e6);
    assert!(m["process_open_fds"] >= 3.0);

    // Only GET /metrics is served.
    let code = |args: &[&str]| {
        stdout(
            Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
                .args(args),
        )
    };
    assert_eq!(code(&[&url.replace("/metrics", "/other")]), "404");
    assert_eq!(code(&["-X", "POST", &url]), "405");
}

#[test]
fn a_bad_metrics_address_stops_the_daemon_with_a_clear_error() {
    let d = Daemon::new();
    for (uri, want) in [
        ("http://127.0.0.1:9100", "expected tcp://HOST:PORT"),
        ("tcp://256.0.0.1:1", "cannot listen"),
    ] {
        let err = common::admin::one_line_error(&mut d.cmd(&["daemon", "--metrics", uri]));
        assert!(err.contains(want), "{uri}: {err}");
    }
}
