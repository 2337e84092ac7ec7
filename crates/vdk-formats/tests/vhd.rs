//! VHD against qemu-img (its "vpc" driver): images qemu makes read the same through vdk;
//! images vdk makes and writes read the same through qemu.
#![allow(clippy::cast_possible_truncation)] // test sizes are small constants

mod common;

use std::fs;
use std::process::Command;
use std::sync::Arc;

use common::*;
use vdk_formats::{create, CreateOptions, Format};

#[test]
fn vhds_qemu_makes_read_the_same() {
    let dir = tempfile::tempdir().unwrap();
    for (name, opts) in [
        ("dyn", "subformat=dynamic"),
        ("fixed", "subformat=fixed"),
        ("forced", "force_size=on"),
    ] {
        let img = dir.path().join(format!("{name}.vhd"));
        qemu_img(&["create", "-q", "-f", "vpc", "-o", opts, s(&img), "40M"]);
        let st = Command::new("qemu-io")
            .args([
                "-f",
                "vpc",
                "-c",
                "write -P 0x61 1M 3M",
                "-c",
                "write -P 0x62 30M 100k",
                "-c",
                "write -P 0x63 0 1",
                s(&img),
            ])
            .output()
            .unwrap();
        assert!(st.status.success());
        let raw = dir.path().join(format!("{name}.raw"));
        qemu_img(&["convert", "-f", "vpc", "-O", "raw", s(&img), s(&raw)]);
        let v = vdk_formats::info(&img, None, false).unwrap();
        assert_eq!(v.format, Format::Vhd, "{name} probed as VHD");
        same_as_raw(&*open_ro(&img), &raw);
    }
}

#[test]
fn vhds_vdk_makes_and_writes_read_the_same_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for fixed in [false, true] {
        let img = dir.path().join(format!("w{fixed}.vhd"));
        let opts = CreateOptions {
            format: Format::Vhd,
            cluster_size: None,
            backing: None,
            fixed,
            encrypt: None,
        };
        create(&img, 48 * MIB, &opts).unwrap();
        let size = open_ro(&img).info().size;
        assert!((48 * MIB..49 * MIB).contains(&size), "CHS rounding: {size}");
        let mirror = dir.path().join(format!("w{fixed}.raw"));
        fs::File::create(&mirror).unwrap().set_len(size).unwrap();
        exercise(&img, &mirror, size, 5, 300);
        qemu_img(&["compare", "-f", "vpc", "-F", "raw", s(&img), s(&mirror)]);
        exercise(&img, &mirror, size, 6, 100);
        qemu_img(&["compare", "-f", "vpc", "-F", "raw", s(&img), s(&mirror)]);
        let info = qemu_img(&["info", "-f", "vpc", "--output=json", s(&img)]);
        assert!(
            info.contains(&format!("\"virtual-size\": {size}")),
            "{info}"
        );
    }
    // A dynamic image grows only with data.
    let img = dir.path().join("sparse.vhd");
    let opts = CreateOptions {
        format: Format::Vhd,
        cluster_size: None,
        backing: None,
        fixed: false,
        encrypt: None,
    };
    create(&img, 1 << 40, &opts).unwrap();
    let dev = open_rw(&img);
    dev.write_at(&[7u8; 4096], 900 << 30, true).unwrap();
    drop(dev);
    let used = std::os::unix::fs::MetadataExt::blocks(&fs::metadata(&img).unwrap()) * 512;
    assert!(
        used < 16 * MIB,
        "1 TiB VHD with 4 KiB written uses {used} bytes"
    );
}

#[test]
fn parallel_writers_on_a_dynamic_vhd() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("p.vhd");
    let opts = CreateOptions {
        format: Format::Vhd,
        cluster_size: None,
        backing: None,
        fixed: false,
        encrypt: None,
    };
    create(&img, 64 * MIB, &opts).unwrap();
    let dev = open_rw(&img);
    let size = dev.info().size;
    std::thread::scope(|sc| {
        for t in 0..6u64 {
            let dev = Arc::clone(&dev);
            sc.spawn(move || {
                let mut r = Rng(t + 3);
                for _ in 0..300 {
                    let block = r.below(size / 4096 / 6) * 6 + t;
                    let byte = (t as u8 + 1) * 17;
                    dev.write_at(&[byte; 4096], block * 4096, false).unwrap();
                    let mut back = [0u8; 4096];
                    dev.read_at(&mut back, block * 4096).unwrap();
                    assert!(back.iter().all(|b| *b == byte));
                }
            });
        }
    });
    dev.flush().unwrap();
    drop(dev);
    let raw = dir.path().join("p.raw");
    qemu_img(&["convert", "-f", "vpc", "-O", "raw", s(&img), s(&raw)]);
    same_as_raw(&*open_ro(&img), &raw);
}

#[test]
fn conformance() {
    conformance_of(Format::Vhd, None);
}
