//! VHDX against qemu-img: images qemu makes read the same through vdk, images vdk makes and
//! writes pass `qemu-img check` and compare equal, and a log left in an image is replayed on
//! open exactly as qemu replays it.
#![allow(clippy::cast_possible_truncation)] // test sizes are small constants

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::process::Command;

use common::*;
use vdk_formats::{create, CreateOptions, Format};

fn qemu_io(fmt: &str, img: &std::path::Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(img).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-io: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn vhdx_images_qemu_makes_read_the_same() {
    let dir = tempfile::tempdir().unwrap();
    for (name, opts) in [
        ("default", "subformat=dynamic"),
        ("b1m", "block_size=1048576"),
        ("b32m", "block_size=33554432"),
        ("fixed", "subformat=fixed"),
        ("zero", "block_state_zero=off"),
    ] {
        let img = dir.path().join(format!("{name}.vhdx"));
        qemu_img(&["create", "-q", "-f", "vhdx", "-o", opts, s(&img), "48M"]);
        qemu_io(
            "vhdx",
            &img,
            &[
                "write -P 0x61 1M 3M",
                "write -P 0x62 40M 100k",
                "write -P 0x63 0 512",
            ],
        );
        let raw = dir.path().join(format!("{name}.raw"));
        qemu_img(&["convert", "-f", "vhdx", "-O", "raw", s(&img), s(&raw)]);
        assert_eq!(vdk_formats::probe(&img).unwrap(), Format::Vhdx);
        same_as_raw(&*open_ro(&img), &raw);
    }
}

#[test]
fn vhdx_images_vdk_writes_pass_qemu_img_check() {
    let dir = tempfile::tempdir().unwrap();
    // One vdk made, one qemu made, both written by vdk.
    let ours = dir.path().join("ours.vhdx");
    let opts = CreateOptions {
        format: Format::Vhdx,
        cluster_size: None,
        backing: None,
        fixed: false,
        encrypt: None,
    };
    create(&ours, 96 * MIB, &opts).unwrap();
    let theirs = dir.path().join("theirs.vhdx");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        "block_size=1048576",
        s(&theirs),
        "96M",
    ]);
    qemu_io("vhdx", &theirs, &["write -P 0x44 10M 5M"]);
    for (img, seed) in [(&ours, 1), (&theirs, 2)] {
        let mirror = dir.path().join(format!("m{seed}.raw"));
        qemu_img(&["convert", "-f", "vhdx", "-O", "raw", s(img), s(&mirror)]);
        exercise(img, &mirror, 96 * MIB, seed, 300);
        qemu_img(&["check", "-f", "vhdx", s(img)]);
        qemu_img(&["compare", "-f", "vhdx", "-F", "raw", s(img), s(&mirror)]);
        exercise(img, &mirror, 96 * MIB, seed + 10, 100);
        qemu_img(&["check", "-f", "vhdx", s(img)]);
        qemu_img(&["compare", "-f", "vhdx", "-F", "raw", s(img), s(&mirror)]);
    }
}

/// Leaves a one-entry log in `img`: a data descriptor that writes `sector` at `target`.
fn plant_log(img: &std::path::Path, target: u64, sector: &[u8; 4096]) {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let crc = |b: &[u8], at: usize| {
        let mut v = b.to_vec();
        v[at..at + 4].fill(0);
        crc32c::crc32c(&v)
    };
    // The current header: the valid one with the higher sequence number.
    let mut best = (0u64, 0u64, vec![]);
    for off in [64u64 << 10, 128 << 10] {
        let mut h = vec![0u8; 4096];
        f.read_exact_at(&mut h, off).unwrap();
        let seq = u64::from_le_bytes(h[8..16].try_into().unwrap());
        if &h[..4] == b"head"
            && crc(&h, 4) == u32::from_le_bytes(h[4..8].try_into().unwrap())
            && (best.2.is_empty() || seq > best.0)
        {
            best = (seq, off, h);
        }
    }
    let (seq, off, mut h) = best;
    let log_len = u32::from_le_bytes(h[68..72].try_into().unwrap()) as u64;
    let log_at = u64::from_le_bytes(h[72..80].try_into().unwrap());
    assert!(log_len >= 8192);
    let guid = [0x5au8; 16];
    let lseq = 77u64;
    let file_len = f.metadata().unwrap().len();
    let mut entry = vec![0u8; 8192];
    entry[..4].copy_from_slice(b"loge");
    entry[8..12].copy_from_slice(&8192u32.to_le_bytes());
    entry[12..16].copy_from_slice(&0u32.to_le_bytes());
    entry[16..24].copy_from_slice(&lseq.to_le_bytes());
    entry[24..28].copy_from_slice(&1u32.to_le_bytes());
    entry[32..48].copy_from_slice(&guid);
    entry[48..56].copy_from_slice(&file_len.to_le_bytes());
    entry[56..64].copy_from_slice(&file_len.to_le_bytes());
    let d = &mut entry[64..96];
    d[..4].copy_from_slice(b"desc");
    d[4..8].copy_from_slice(&sector[4092..]);
    d[8..16].copy_from_slice(&sector[..8]);
    d[16..24].copy_from_slice(&target.to_le_bytes());
    d[24..32].copy_from_slice(&lseq.to_le_bytes());
    let data = &mut entry[4096..];
    data[..4].copy_from_slice(b"data");
    data[4..8].copy_from_slice(&((lseq >> 32) as u32).to_le_bytes());
    data[8..4092].copy_from_slice(&sector[8..4092]);
    data[4092..].copy_from_slice(&(lseq as u32).to_le_bytes());
    let sum = crc(&entry, 4);
    entry[4..8].copy_from_slice(&sum.to_le_bytes());
    f.write_all_at(&entry, log_at).unwrap();
    // The header now names the log, one sequence number up, in the other slot.
    h[48..64].copy_from_slice(&guid);
    h[8..16].copy_from_slice(&(seq + 1).to_le_bytes());
    let sum = crc(&h, 4);
    h[4..8].copy_from_slice(&sum.to_le_bytes());
    let other = if off == 64 << 10 { 128 << 10 } else { 64 << 10 };
    f.write_all_at(&h, other).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn a_log_left_in_the_image_is_replayed_as_qemu_replays_it() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.vhdx");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        "block_size=1048576",
        s(&a),
        "16M",
    ]);
    qemu_io("vhdx", &a, &["write -P 0x11 0 1M"]);
    // Where guest offset 8 KiB lives: the first BAT entry's block, plus 8 KiB.
    let raw = fs::read(&a).unwrap();
    let bat_at = 2 << 20; // qemu's layout: log at 1 MiB, BAT at 2 MiB
    let e0 = u64::from_le_bytes(raw[bat_at..bat_at + 8].try_into().unwrap());
    assert_eq!(e0 & 7, 6, "block 0 is fully present");
    let target = (e0 >> 20) * (1 << 20) + 8192;
    let mut sector = [0u8; 4096];
    for (i, b) in sector.iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    plant_log(&a, target, &sector);
    let b = dir.path().join("b.vhdx");
    fs::copy(&a, &b).unwrap();
    // Read-only opens refuse an image whose log needs replay.
    let ro = vdk_formats::open(
        &a,
        &vdk_formats::OpenOptions {
            read_only: true,
            ..Default::default()
        },
    );
    assert!(ro.unwrap_err().to_string().contains("replayed"));
    // vdk replays on a writable open; qemu replays on check -r all.
    let dev = open_rw(&a);
    let mut got = [0u8; 4096];
    dev.read_at(&mut got, 8192).unwrap();
    assert!(got == sector, "the logged sector is in place after replay");
    drop(dev);
    Command::new("qemu-img")
        .args(["check", "-r", "all", "-f", "vhdx", s(&b)])
        .status()
        .unwrap();
    qemu_img(&["compare", "-f", "vhdx", "-F", "vhdx", s(&a), s(&b)]);
    qemu_img(&["check", "-f", "vhdx", s(&a)]);
}

#[test]
fn conformance() {
    conformance_of(Format::Vhdx, None);
}

#[test]
fn a_terabyte_vhdx_costs_little() {
    let dir = tempfile::tempdir().unwrap();
    let img = terabyte_with_a_mebibyte(dir.path(), Format::Vhdx);
    qemu_img(&["check", "-f", "vhdx", s(&img)]);
}
