//! qcow2 against qemu-img: images qemu makes read the same through vdk; images vdk makes and
//! writes pass `qemu-img check` and compare equal to what was written.
#![allow(clippy::cast_possible_truncation)] // test sizes are small constants

use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use vdk_formats::{create, CreateOptions, Format};

mod common;
use common::*;

#[test]
fn images_qemu_makes_read_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let size = 24 * MIB;
    let src = raw_source(dir.path(), size);
    let variants: &[(&str, &[&str])] = &[
        ("v3-64k", &["-o", "cluster_size=65536"]),
        ("v2", &["-o", "compat=0.10"]),
        ("c512", &["-o", "cluster_size=512"]),
        ("c4k-rc1", &["-o", "cluster_size=4096,refcount_bits=1"]),
        ("c2m-rc64", &["-o", "cluster_size=2097152,refcount_bits=64"]),
        ("rc8", &["-o", "refcount_bits=8"]),
        ("zlib", &["-c"]),
        ("zstd", &["-c", "-o", "compression_type=zstd"]),
        ("ext-l2", &["-o", "extended_l2=on,cluster_size=131072"]),
        ("prealloc", &["-o", "preallocation=metadata"]),
    ];
    for (name, opts) in variants {
        let img = dir.path().join(format!("{name}.qcow2"));
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[s(&src), s(&img)]);
        qemu_img(&args);
        let dev = open_ro(&img);
        same_as_raw(&*dev, &src);
    }
}

#[test]
fn zero_clusters_and_discards_made_by_qemu_read_as_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("z.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&img), "8M"]);
    Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 4M",
            "-c",
            "write -z 1M 1M",
            "-c",
            "discard 2M 1M",
            "-c",
            "write -z -u 3M 64k",
            s(&img),
        ])
        .status()
        .expect("qemu-io");
    let raw = dir.path().join("z.raw");
    qemu_img(&["convert", "-O", "raw", s(&img), s(&raw)]);
    same_as_raw(&*open_ro(&img), &raw);
    let dev = open_ro(&img);
    let e = dev.extents(0, 8 * MIB).unwrap();
    assert!(
        e.runs()
            .iter()
            .any(|r| r.kind == vdk_core::ExtentKind::Zero),
        "zero clusters show"
    );
    assert!(
        e.runs()
            .iter()
            .any(|r| r.kind == vdk_core::ExtentKind::Hole),
        "holes show"
    );
}

fn check_clean(img: &Path) {
    let out = qemu_img(&["check", "--output=json", s(img)]);
    assert!(
        !out.contains("\"corruptions\""),
        "qemu-img check found corruption: {out}"
    );
    assert!(
        !out.contains("\"leaks\""),
        "qemu-img check found leaks after a clean close: {out}"
    );
}

#[test]
fn images_vdk_makes_and_writes_pass_qemu_img_check() {
    let dir = tempfile::tempdir().unwrap();
    for (cluster, size) in [
        (65536u64, 64 * MIB),
        (512, 8 * MIB),
        (2 << 20, 64 * MIB),
        (4096, 32 * MIB),
    ] {
        let img = dir.path().join(format!("w{cluster}.qcow2"));
        let mirror = dir.path().join(format!("w{cluster}.raw"));
        let opts = CreateOptions {
            format: Format::Qcow2,
            cluster_size: Some(cluster),
            backing: None,
            fixed: false,
            encrypt: None,
        };
        create(&img, size, &opts).unwrap();
        fs::File::create(&mirror).unwrap().set_len(size).unwrap();
        check_clean(&img);
        exercise(&img, &mirror, size, cluster, 300);
        check_clean(&img);
        qemu_img(&["compare", "-f", "qcow2", "-F", "raw", s(&img), s(&mirror)]);
        // And once more after reopening: the metadata on disk is the metadata in memory.
        exercise(&img, &mirror, size, cluster + 1, 100);
        check_clean(&img);
        qemu_img(&["compare", "-f", "qcow2", "-F", "raw", s(&img), s(&mirror)]);
    }
}

#[test]
fn writes_to_images_qemu_made_keep_them_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let size = 24 * MIB;
    let src = raw_source(dir.path(), size);
    for (name, opts) in [
        ("v2", "compat=0.10"),
        ("rc1", "refcount_bits=1,cluster_size=4096"),
        ("c512", "cluster_size=512"),
    ] {
        let img = dir.path().join(format!("{name}.qcow2"));
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            opts,
            s(&src),
            s(&img),
        ]);
        let mirror = dir.path().join(format!("{name}.raw"));
        fs::copy(&src, &mirror).unwrap();
        exercise(&img, &mirror, size, 7, 200);
        check_clean(&img);
        qemu_img(&["compare", "-f", "qcow2", "-F", "raw", s(&img), s(&mirror)]);
    }
    // Compressed clusters are rewritten whole when written to.
    let img = dir.path().join("c.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&src),
        s(&img),
    ]);
    let mirror = dir.path().join("c.raw");
    fs::copy(&src, &mirror).unwrap();
    exercise(&img, &mirror, size, 9, 200);
    check_clean(&img);
    qemu_img(&["compare", "-f", "qcow2", "-F", "raw", s(&img), s(&mirror)]);
}

#[test]
fn backing_chains_read_through_and_never_write_below() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let base = raw_source(dir.path(), size);
    let before = fs::read(&base).unwrap();
    let mid = dir.path().join("mid.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "source.raw",
        "-F",
        "raw",
        s(&mid),
    ]);
    Command::new("qemu-io")
        .args(["-c", "write -P 0x77 1M 300k", s(&mid)])
        .status()
        .unwrap();
    let top = dir.path().join("top.qcow2");
    let opts = CreateOptions {
        format: Format::Qcow2,
        cluster_size: None,
        backing: Some(("mid.qcow2".into(), Format::Qcow2)),
        fixed: false,
        encrypt: None,
    };
    create(&top, size, &opts).unwrap();
    let mirror = dir.path().join("top.raw");
    qemu_img(&["convert", "-O", "raw", s(&mid), s(&mirror)]);
    exercise(&top, &mirror, size, 3, 200);
    check_clean(&top);
    qemu_img(&["compare", s(&top), s(&mirror)]);
    assert_eq!(fs::read(&base).unwrap(), before, "the base is untouched");
    let info = vdk_formats::info(&top, None, true).unwrap();
    assert_eq!(info.backing_file.as_deref(), Some("mid.qcow2"));
    assert_eq!(
        info.backing.as_ref().unwrap().backing_format.as_deref(),
        Some("raw")
    );
}

#[test]
fn conformance() {
    conformance_of(Format::Qcow2, Some(4096));
}

#[test]
fn a_terabyte_image_costs_little() {
    let dir = tempfile::tempdir().unwrap();
    let img = terabyte_with_a_mebibyte(dir.path(), Format::Qcow2);
    check_clean(&img);
    let e = open_ro(&img).extents(0, 1 << 40).unwrap();
    assert_eq!(
        e.runs()
            .iter()
            .filter(|r| r.kind == vdk_core::ExtentKind::Data)
            .count(),
        1
    );
}

/// Many threads allocating, overwriting and zeroing at once, some in the same clusters:
/// every thread's last write to its own bytes reads back, and the image checks clean.
#[test]
fn parallel_writers_keep_data_and_metadata_straight() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("p.qcow2");
    let size = 32 * MIB;
    let opts = CreateOptions {
        format: Format::Qcow2,
        cluster_size: Some(16384),
        backing: None,
        fixed: false,
        encrypt: None,
    };
    create(&img, size, &opts).unwrap();
    let dev = open_rw(&img);
    let threads = 8u64;
    // Thread t owns every 4 KiB block b with b % threads == t: neighbours share clusters.
    let expected: Vec<Vec<(u64, u8)>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let dev = Arc::clone(&dev);
                sc.spawn(move || {
                    let mut r = Rng(t + 11);
                    let mut last = std::collections::HashMap::new();
                    for i in 0..400u64 {
                        let block = r.below(size / 4096 / threads) * threads + t;
                        let byte = (i as u8) | 1;
                        if r.below(10) == 0 {
                            dev.write_zeroes(block * 4096, 4096, false, false).unwrap();
                            last.insert(block, 0u8);
                        } else {
                            dev.write_at(&[byte; 4096], block * 4096, false).unwrap();
                            last.insert(block, byte);
                        }
                        if r.below(50) == 0 {
                            dev.flush().unwrap();
                        }
                        let mut back = [0u8; 4096];
                        dev.read_at(&mut back, block * 4096).unwrap();
                        assert!(
                            back.iter().all(|b| *b == last[&block]),
                            "thread {t} block {block}"
                        );
                    }
                    last.into_iter().collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    dev.flush().unwrap();
    for blocks in &expected {
        for (block, byte) in blocks {
            let mut back = [0u8; 4096];
            dev.read_at(&mut back, block * 4096).unwrap();
            assert!(back.iter().all(|b| b == byte), "block {block}");
        }
    }
    drop(dev);
    check_clean(&img);
}

/// A disk grown while it is written: 4 KiB clusters, so that each step needs a larger L1
/// table, which moves while writers allocate clusters. Everything written reads back, the
/// new end takes writes, and qemu-img finds the image clean at its new size.
#[test]
fn growing_while_writers_run_keeps_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("g.qcow2");
    let opts = CreateOptions {
        format: Format::Qcow2,
        cluster_size: Some(4096),
        backing: None,
        fixed: false,
        encrypt: None,
    };
    create(&img, 4 * MIB, &opts).unwrap();
    let dev = open_rw(&img);
    let steps: Vec<u64> = (1..=24).map(|i| 4 * MIB + i * 3 * MIB).collect();
    let last = *steps.last().unwrap();
    std::thread::scope(|sc| {
        for t in 0..4u64 {
            let dev = Arc::clone(&dev);
            sc.spawn(move || {
                let mut r = Rng(t + 3);
                for i in 0..300u64 {
                    let size = dev.info().size;
                    let block = r.below(size / 4096 / 4) * 4 + t;
                    let byte = (t as u8 + 1) * 16 + (i % 15) as u8;
                    dev.write_at(&[byte; 4096], block * 4096, false).unwrap();
                    let mut back = [0u8; 4096];
                    dev.read_at(&mut back, block * 4096).unwrap();
                    assert!(back.iter().all(|b| *b == byte), "thread {t} block {block}");
                }
            });
        }
        let dev = Arc::clone(&dev);
        sc.spawn(move || {
            for s in &steps {
                dev.grow(*s).unwrap();
                assert_eq!(dev.info().size, *s);
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        });
    });
    assert!(dev.grow(MIB).is_err(), "a live disk never shrinks");
    dev.write_at(&[0x7e; 4096], last - 4096, false).unwrap();
    dev.flush().unwrap();
    drop(dev);
    check_clean(&img);
    let info = Command::new("qemu-img")
        .arg("info")
        .arg(&img)
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains(&format!("({last} bytes)")), "{info}");
    let reopened = open_rw(&img);
    assert_eq!(reopened.info().size, last);
    let mut back = [0u8; 4096];
    reopened.read_at(&mut back, last - 4096).unwrap();
    assert!(back.iter().all(|b| *b == 0x7e));
}
