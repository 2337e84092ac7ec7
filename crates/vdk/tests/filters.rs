//! Filters through the binary: the error filter drives the NBD server's error path for real
//! clients (nbdsh, qemu-io), readonly refuses below the protocol, partition serves one
//! partition, blocksize changes the block size clients are told, bad filter specs are clear
//! errors.

mod common;

use std::process::Command;

use common::{nbdsh_script, need, run, Vdk};

#[test]
fn injected_errors_reach_clients_and_the_connection_lives_on() {
    let vdk = Vdk::serve(&[
        "--memory",
        "16M",
        "--filter",
        "error:op=read,range=1M-2M,errno=EIO",
        "--filter",
        "error:op=write,range=3M-4M,errno=ENOSPC",
    ]);
    nbdsh_script(&vdk, "injected.py");
    need("qemu-io");
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "read 1M 4k",
            "-c",
            "write 0 4k",
            "-c",
            "read 0 4k",
            &vdk.uri("memory"),
        ])
        .env("PATH", common::path_env())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("Input/output error"),
        "qemu-io sees EIO: {text}"
    );
    assert!(
        text.contains("wrote 4096/4096") && text.contains("read 4096/4096"),
        "and goes on: {text}"
    );
}

#[test]
fn readonly_and_partition_filters_serve_what_they_say() {
    need("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    common::sparse_file(&img, 16 << 20);
    // An MBR with partition 1 at 1 MiB, 4 MiB long, and a mark at its start.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        let mut mbr = [0u8; 512];
        mbr[446 + 4] = 0x83;
        mbr[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
        mbr[446 + 12..446 + 16].copy_from_slice(&8192u32.to_le_bytes());
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        f.write_all_at(&mbr, 0).unwrap();
        f.write_all_at(&[0x6b; 512], 1 << 20).unwrap();
    }
    let vdk = Vdk::serve_in(
        dir,
        &["d.img", "--filter", "partition:1", "--filter", "readonly"],
    );
    let uri = vdk.uri("d.img");
    let size = common::stdout(Command::new("nbdinfo").args(["--size", &uri]));
    assert_eq!(size.trim(), (4u64 << 20).to_string());
    run(Command::new("qemu-io").args(["-f", "raw", "-r", "-c", "read -P 0x6b 0 512", &uri]));
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 512", &uri])
        .env("PATH", common::path_env())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() || text.contains("failed"),
        "writes refused: {text}"
    );
}

/// nbdinfo sees the physical block size the blocksize filter shows as the export's preferred
/// block size (4096 without it), and the data is the image's.
#[test]
fn the_blocksize_filter_sets_the_preferred_block_size_nbd_clients_see() {
    need("nbdinfo");
    need("qemu-io");
    for (filter, want) in [(None, 4096), (Some("blocksize:physical=64K"), 65536)] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.img"), vec![0x5a; 1 << 20]).unwrap();
        let mut args = vec!["b.img"];
        if let Some(f) = filter {
            args.extend(["--filter", f]);
        }
        let vdk = Vdk::serve_in(dir, &args);
        let uri = vdk.uri("b.img");
        let info: serde_json::Value = serde_json::from_str(&common::stdout(
            Command::new("nbdinfo").args(["--json", &uri]),
        ))
        .unwrap();
        assert_eq!(
            info["exports"][0]["block_size_preferred"], want,
            "{filter:?}: {info}"
        );
        run(Command::new("qemu-io").args(["-f", "raw", "-r", "-c", "read -P 0x5a 0 1M", &uri]));
    }
}

#[test]
fn bad_filter_specs_are_clear_errors() {
    for (spec, want) in [
        ("frob", "unknown filter"),
        ("error:rate=7", "0 to 1"),
        ("partition:1", "no partition table"),
        ("blocksize:physical=3000", "power of two"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_vdk"))
            .args([
                "serve",
                "--memory",
                "1M",
                "--listen",
                "unix:///nonexistent/x.sock",
                "--filter",
                spec,
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{spec}: {err}");
    }
}

#[test]
fn an_open_disk_takes_filters_and_reports_stats() {
    let d = common::Daemon::new();
    let img = d.path("s.img");
    let v = d.open(&[
        img.to_str().unwrap(),
        "8M",
        "--attach",
        "none",
        "--filter",
        "stats",
        "--filter",
        "delay:op=flush,ms=1",
    ]);
    assert_eq!(
        v["filters"],
        serde_json::json!(["stats", "delay:op=flush,ms=1"])
    );
    let uri = v["nbd"][0].as_str().unwrap().to_owned();
    need("qemu-io");
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write 0 64k",
        "-c",
        "read 0 4k",
        "-c",
        "flush",
        &uri,
    ]));
    let s = d.json(&["stats", v["id"].as_str().unwrap()]);
    assert_eq!(s["ops"]["write"]["bytes"], 65536, "{s}");
    assert!(s["ops"]["read"]["count"].as_u64().unwrap() >= 1, "{s}");
    assert!(s["ops"]["flush"]["count"].as_u64().unwrap() >= 1, "{s}");
    // vdk list shows the stats filter's figures too.
    let listed = d.json(&["list"]);
    assert_eq!(listed[0]["latency"]["write"]["bytes"], 65536, "{listed}");
    let table = d.ok(&["list", "-o", "ID,LATENCY"]);
    assert!(
        table.contains("LATENCY") && table.contains(" µs"),
        "{table}"
    );
    let text = d.ok(&["stats", v["id"].as_str().unwrap()]);
    assert!(text.contains("write") && text.contains("64 KiB"), "{text}");
    // Without a stats filter there is nothing to show, and a bad spec creates nothing.
    let plain = d.open(&[d.path("p.img").to_str().unwrap(), "8M", "--attach", "none"]);
    let err = d.fails(&["stats", plain["id"].as_str().unwrap()]);
    assert!(err.contains("no stats filter"), "{err}");
    let err = d.fails(&[
        "open",
        d.path("bad.img").to_str().unwrap(),
        "--attach",
        "none",
        "--filter",
        "frob",
    ]);
    assert!(err.contains("unknown filter"), "{err}");
    assert!(!d.path("bad.img").exists());
}

#[test]
fn commit_and_discard_an_open_cow_disk_live() {
    need("qemu-io");
    let d = common::Daemon::new();
    let base = d.path("base.img");
    common::sparse_file(&base, 16 << 20);
    let overlay = d.path("o.qcow2");
    let spec = format!("cow:overlay={}", overlay.display());
    let v = d.open(&[
        base.to_str().unwrap(),
        "--attach",
        "none",
        "--filter",
        &spec,
        "--filter",
        "stats",
    ]);
    let id = v["id"].as_str().unwrap().to_owned();
    let uri = v["nbd"][0].as_str().unwrap().to_owned();
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x71 1M 64k", &uri]));
    assert!(
        std::fs::read(&base).unwrap().iter().all(|b| *b == 0),
        "not in the base yet"
    );
    // A second disk on the same base: the base cannot be written while it is shared.
    let other = d.open(&[
        base.to_str().unwrap(),
        "--attach",
        "none",
        "--filter",
        "cow",
    ]);
    let err = d.fails(&["commit", &id]);
    assert!(err.contains("in use"), "{err}");
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x71 1M 64k", &uri]));
    d.ok(&["close", other["id"].as_str().unwrap()]);
    let out = d.ok(&["commit", &id]);
    assert!(out.contains("live") && out.contains("64 KiB"), "{out}");
    let b = std::fs::read(&base).unwrap();
    assert!(
        b[1 << 20..(1 << 20) + 65536].iter().all(|x| *x == 0x71),
        "the base holds the data"
    );
    // The disk goes on, same connection URI, reading the same bytes; stats work again.
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -P 0x71 1M 64k",
        "-c",
        "write -P 0x72 0 4k",
        &uri,
    ]));
    assert!(
        d.json(&["stats", &id])["ops"]["write"]["count"]
            .as_u64()
            .unwrap()
            >= 1
    );
    d.ok(&["discard", &id]);
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -P 0 0 4k",
        "-c",
        "read -P 0x71 1M 64k",
        &uri,
    ]));
    d.ok(&["close", &id]);
}

#[test]
fn a_live_snapshot_chains_a_new_overlay_and_freezes_the_old_one() {
    need("qemu-io");
    need("qemu-img");
    let d = common::Daemon::new();
    let base = d.path("base.img");
    common::sparse_file(&base, 16 << 20);
    let o1 = d.path("o1.qcow2");
    let o2 = d.path("o2.qcow2");
    let spec = format!("cow:overlay={}", o1.display());
    let v = d.open(&[
        base.to_str().unwrap(),
        "--attach",
        "none",
        "--filter",
        &spec,
    ]);
    let id = v["id"].as_str().unwrap().to_owned();
    let uri = v["nbd"][0].as_str().unwrap().to_owned();
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x0a 0 64k", &uri]));
    d.ok(&["snapshot", &id, o2.to_str().unwrap()]);
    let listed = d.json(&["list"]);
    assert_eq!(
        listed[0]["filters"][0],
        format!("cow:overlay={}", o2.display()),
        "{listed}"
    );
    let frozen = std::fs::read(&o1).unwrap();
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x0b 1M 64k",
        "-c",
        "read -P 0x0a 0 64k",
        &uri,
    ]));
    assert!(
        std::fs::read(&o1).unwrap() == frozen,
        "the old overlay is not written after the snapshot"
    );
    d.ok(&["close", &id]);
    run(Command::new("qemu-img").args(["check", o2.to_str().unwrap()]));
    let chain = common::stdout(Command::new("qemu-img").args([
        "info",
        "--backing-chain",
        o2.to_str().unwrap(),
    ]));
    assert!(
        chain.contains("o1.qcow2") && chain.contains("base.img"),
        "{chain}"
    );
    // The chain opens again as a cow disk over the same base.
    let spec2 = format!("cow:overlay={}", o2.display());
    let v = d.open(&[
        base.to_str().unwrap(),
        "--attach",
        "none",
        "--filter",
        &spec2,
    ]);
    let uri = v["nbd"][0].as_str().unwrap().to_owned();
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -P 0x0a 0 64k",
        "-c",
        "read -P 0x0b 1M 64k",
        &uri,
    ]));
    d.ok(&["close", v["id"].as_str().unwrap()]);
    assert!(
        std::fs::read(&base).unwrap().iter().all(|b| *b == 0),
        "the base is untouched"
    );
}
