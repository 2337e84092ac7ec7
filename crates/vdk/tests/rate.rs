//! The rate filter holds real clients to its limits: fio through NBD (its libnbd engine) and
//! through the block device (fuse-loop, direct I/O), reads and writes apart, bytes and then
//! requests per second, the second set of limits given with `vdk set` while the disk is
//! served. fio measures after a ramp longer than the burst, so what it reports is the
//! steady rate, which must be within 10 % of the limit.

mod common;

use std::path::Path;
use std::process::Command;

use common::{need, need_root, stdout, Daemon, Vdk};

/// What fio measured of one job: bytes and requests per second.
#[derive(Debug)]
struct Rate {
    bps: f64,
    iops: f64,
}

/// Runs fio with `global` options and one job per entry of `jobs` (each its own options),
/// side by side, 4 s measured after a 1 s ramp, 4 requests at once per job; returns what
/// each job measured reading and writing.
fn fio(global: &[String], jobs: &[Vec<String>], dir: &Path) -> Vec<(Rate, Rate)> {
    let mut cmd = Command::new("fio");
    cmd.args(["--output-format=json", "--time_based", "--runtime=4"])
        .args(["--ramp_time=1", "--iodepth=4"])
        .args(global)
        .current_dir(dir);
    for (i, job) in jobs.iter().enumerate() {
        cmd.arg(format!("--name=job{i}")).args(job);
    }
    let out = stdout(&mut cmd);
    // fio's nbd engine says "fio: connected to NBD server" before the report.
    let report = &out[out.find('{').expect("fio's JSON report")..];
    let v: serde_json::Value = serde_json::from_str(report).expect("fio's JSON report");
    let way = |j: &serde_json::Value, way: &str| Rate {
        bps: j[way]["bw_bytes"].as_f64().expect("bw_bytes"),
        iops: j[way]["iops"].as_f64().expect("iops"),
    };
    (0..jobs.len())
        .map(|i| {
            let j = &v["jobs"][i];
            assert_eq!(j["error"], 0, "{out}");
            (way(j, "read"), way(j, "write"))
        })
        .collect()
}

/// A read job and a write job side by side (on different halves of the disk) through
/// `engine` (fio's options naming the engine and the disk) with `bs`-sized requests; returns
/// what the reader and the writer measured.
fn read_and_write(engine: &[String], bs: &str, random: bool, dir: &Path) -> (Rate, Rate) {
    let (read, write) = if random {
        ("randread", "randwrite")
    } else {
        ("read", "write")
    };
    let mut global = engine.to_vec();
    global.push(format!("--bs={bs}"));
    let jobs = [
        vec![format!("--rw={read}"), "--size=16M".into()],
        vec![
            format!("--rw={write}"),
            "--offset=32M".into(),
            "--size=16M".into(),
        ],
    ];
    let mut got = fio(&global, &jobs, dir).into_iter();
    let (r, _) = got.next().unwrap();
    let (_, w) = got.next().unwrap();
    (r, w)
}

fn within_10_percent(what: &str, got: f64, limit: f64) {
    assert!(
        (got - limit).abs() <= limit * 0.1,
        "{what}: fio measured {got:.1}/s under a limit of {limit}/s (10 % allowed)"
    );
}

#[test]
fn fio_holds_the_rate_through_nbd_and_the_block_device_and_vdk_set_changes_it() {
    need_root();
    need("fio");
    let d = Daemon::new();
    let image = d.path("rated.img");
    let v = d.open(&[
        image.to_str().unwrap(),
        "64M",
        "--filter",
        "rate:read-bps=4M,write-bps=2M,burst=0.5",
    ]);
    let id = v["id"].as_str().unwrap().to_owned();
    let nbd = v["nbd"][0].as_str().unwrap().to_owned();
    let dev = v["block_device"]
        .as_str()
        .expect("a block device")
        .to_owned();
    let engines = [
        (
            "NBD",
            vec!["--ioengine=nbd".to_owned(), format!("--uri={nbd}")],
        ),
        (
            "the block device",
            vec![
                "--ioengine=libaio".to_owned(),
                "--direct=1".to_owned(),
                format!("--filename={dev}"),
            ],
        ),
    ];
    for (name, engine) in &engines {
        let (r, w) = read_and_write(engine, "64k", false, d.dir.path());
        within_10_percent(&format!("{name}: read bytes"), r.bps, 4.0 * 1_048_576.0);
        within_10_percent(&format!("{name}: written bytes"), w.bps, 2.0 * 1_048_576.0);
    }

    // Bytes unlimited, requests limited, while the disk is served.
    let said = d.ok(&[
        "set",
        &id,
        "rate:read-bps=off,write-bps=0,read-iops=200,write-iops=100",
    ]);
    let now = "rate:read-iops=200,write-iops=100,burst=0.5";
    assert_eq!(said.trim(), format!("{id}: {now}"));
    assert_eq!(d.json(&["list"])[0]["filters"][0], now);
    assert!(d.log_has("rate limits changed"), "{}", d.log());
    for (name, engine) in &engines {
        let (r, w) = read_and_write(engine, "4k", true, d.dir.path());
        within_10_percent(&format!("{name}: reads"), r.iops, 200.0);
        within_10_percent(&format!("{name}: writes"), w.iops, 100.0);
    }

    // What cannot be set is a one-line error.
    let err = d.fails(&["set", &id, "cache:size=1M"]);
    assert!(err.contains("only a rate filter"), "{err}");
    let err = d.fails(&["set", &id, "rate:speed=1"]);
    assert!(err.contains("no key \"speed\""), "{err}");
    let err = d.fails(&["set", "no-such-disk", "rate=1M"]);
    assert!(err.contains("no open disk"), "{err}");
    let plain = d.open(&[
        d.path("plain.img").to_str().unwrap(),
        "1M",
        "--attach",
        "none",
    ]);
    let err = d.fails(&["set", plain["id"].as_str().unwrap(), "rate=1M"]);
    assert!(err.contains("has no rate filter"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    d.ok(&["close", &id]);
    d.ok(&["close", plain["id"].as_str().unwrap()]);
}

#[test]
fn each_export_of_vdk_serve_has_limits_of_its_own() {
    need("fio");
    let vdk = Vdk::serve(&[
        "--export",
        "a=memory:64M",
        "--export",
        "b=memory:64M",
        "--filter",
        "rate:read-bps=4M,burst=0.5",
    ]);
    let jobs: Vec<Vec<String>> = ["a", "b"]
        .iter()
        .map(|e| vec![format!("--uri={}", vdk.uri(e)), "--rw=read".into()])
        .collect();
    let global = ["--ioengine=nbd", "--bs=64k", "--size=16M"].map(String::from);
    for (i, (r, _)) in fio(&global, &jobs, vdk.dir.path()).iter().enumerate() {
        within_10_percent(&format!("export {i}"), r.bps, 4.0 * 1_048_576.0);
    }
}
