//! The cow filter: writes go to the overlay and never to the base; the overlay persists,
//! reads back through qemu, fills up cleanly when pre-allocated, is shared-base safe, and
//! commits into the base.
#![allow(clippy::cast_possible_truncation)] // test sizes are small constants

use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use vdk_backends::{FileDisk, FileOptions, MemoryDisk};
use vdk_core::{BlockDevice, Error};
use vdk_filters::cow::{self, BaseFile, CowOptions, Overlay};
use vdk_formats::Format;

const MIB: u64 = 1 << 20;

fn base_file(dir: &Path, size: u64) -> (Arc<dyn BlockDevice>, BaseFile, Vec<u8>) {
    let p = dir.join("base.img");
    let data: Vec<u8> = (0..size)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    fs::write(&p, &data).unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(
        FileDisk::open(
            &p,
            FileOptions {
                read_only: true,
                ..FileOptions::default()
            },
        )
        .unwrap(),
    );
    (
        dev,
        BaseFile {
            path: fs::canonicalize(&p).unwrap(),
            format: Format::Raw,
        },
        data,
    )
}

fn persistent(p: &Path) -> CowOptions {
    CowOptions {
        overlay: Overlay::Persistent(p.to_owned()),
        size: None,
    }
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("needs qemu-img (qemu-utils)");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn cow_conforms_volatile_and_persistent() {
    let dir = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicUsize::new(0);
    for volatile in [true, false] {
        vdk_core::conformance::run(&|| {
            let base: Arc<dyn BlockDevice> =
                Arc::new(MemoryDisk::new(vdk_core::conformance::MIN_SIZE));
            let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let overlay = if volatile {
                Overlay::Volatile
            } else {
                Overlay::Persistent(dir.path().join(format!("o{i}.qcow2")))
            };
            cow::cow(
                base,
                None,
                &CowOptions {
                    overlay,
                    size: None,
                },
            )
            .unwrap()
        });
    }
}

#[test]
fn the_base_is_never_written_and_the_overlay_persists() {
    let dir = tempfile::tempdir().unwrap();
    let (base, file, data) = base_file(dir.path(), 8 * MIB);
    let o = dir.path().join("o.qcow2");
    let disk = cow::cow(Arc::clone(&base), Some(&file), &persistent(&o)).unwrap();
    disk.write_at(&[0xaa; 70_000], MIB + 3, true).unwrap();
    disk.write_zeroes(4 * MIB, MIB, true, false).unwrap();
    disk.trim(6 * MIB, 64 << 10).unwrap();
    disk.flush().unwrap();
    drop(disk);
    assert!(
        fs::read(&file.path).unwrap() == data,
        "the base is bit-identical"
    );
    // Reopened: the same disk.
    let disk = cow::cow(Arc::clone(&base), Some(&file), &persistent(&o)).unwrap();
    let mut b = vec![0u8; 70_000];
    disk.read_at(&mut b, MIB + 3).unwrap();
    assert!(b.iter().all(|x| *x == 0xaa));
    let mut z = vec![1u8; MIB as usize];
    disk.read_at(&mut z, 4 * MIB).unwrap();
    assert!(z.iter().all(|x| *x == 0));
    let mut rest = vec![0u8; 4096];
    disk.read_at(&mut rest, 7 * MIB).unwrap();
    assert!(
        rest[..] == data[7 * MIB as usize..7 * MIB as usize + 4096],
        "unredirected reads come from the base"
    );
    drop(disk);
    // qemu-img reads base + overlay the same way.
    let merged = dir.path().join("merged.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        o.to_str().unwrap(),
        merged.to_str().unwrap(),
    ]);
    let m = fs::read(&merged).unwrap();
    assert!(m[MIB as usize + 3..MIB as usize + 70_003]
        .iter()
        .all(|x| *x == 0xaa));
    assert!(m[7 * MIB as usize..] == data[7 * MIB as usize..]);
    qemu_img(&["check", o.to_str().unwrap()]);
}

#[test]
fn a_preallocated_overlay_fills_up_with_enospc_and_harms_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (base, file, _) = base_file(dir.path(), 64 * MIB);
    let o = dir.path().join("small.qcow2");
    let opts = CowOptions {
        overlay: Overlay::Persistent(o.clone()),
        size: Some(4 * MIB),
    };
    let disk = cow::cow(base, Some(&file), &opts).unwrap();
    let mut written = Vec::new();
    let mut full = false;
    for i in 0..64u64 {
        match disk.write_at(&[i as u8 + 1; 65536], i * MIB, false) {
            Ok(()) => written.push(i),
            Err(Error::NoSpace) => {
                full = true;
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(full, "a 4 MiB overlay fills up");
    assert!(
        written.len() > 10,
        "but only after holding most of 4 MiB: {}",
        written.len()
    );
    assert!(
        fs::metadata(&o).unwrap().len() <= 4 * MIB + (64 << 10),
        "the file stays within its size"
    );
    disk.flush().unwrap();
    for i in written {
        let mut b = vec![0u8; 65536];
        disk.read_at(&mut b, i * MIB).unwrap();
        assert!(
            b.iter().all(|x| *x == i as u8 + 1),
            "block {i} intact after the overlay filled"
        );
    }
}

#[test]
fn many_disks_share_one_base() {
    let dir = tempfile::tempdir().unwrap();
    let (base, file, data) = base_file(dir.path(), 4 * MIB);
    let disks: Vec<_> = (0..3)
        .map(|i| {
            cow::cow(
                Arc::clone(&base),
                Some(&file),
                &persistent(&dir.path().join(format!("o{i}.qcow2"))),
            )
            .unwrap()
        })
        .collect();
    for (i, d) in disks.iter().enumerate() {
        d.write_at(&[i as u8 + 1; 4096], 0, false).unwrap();
    }
    for (i, d) in disks.iter().enumerate() {
        let mut b = [0u8; 4096];
        d.read_at(&mut b, 0).unwrap();
        assert!(
            b.iter().all(|x| *x == i as u8 + 1),
            "each disk sees its own writes"
        );
        d.read_at(&mut b, MIB).unwrap();
        assert!(b[..] == data[MIB as usize..MIB as usize + 4096]);
    }
    // The same overlay twice is refused: two writers would corrupt it.
    let e = cow::cow(
        Arc::clone(&base),
        Some(&file),
        &persistent(&dir.path().join("o0.qcow2")),
    )
    .unwrap_err();
    assert!(e.to_string().contains("in use"), "{e}");
}

#[test]
fn commit_merges_the_overlay_into_the_base_and_empties_it() {
    let dir = tempfile::tempdir().unwrap();
    let (base, file, _) = base_file(dir.path(), 8 * MIB);
    let o = dir.path().join("o.qcow2");
    let disk = cow::cow(base, Some(&file), &persistent(&o)).unwrap();
    disk.write_at(&[0x5c; 300_000], 2 * MIB + 7, false).unwrap();
    disk.write_zeroes(5 * MIB, 2 * MIB, true, false).unwrap();
    disk.flush().unwrap();
    drop(disk);
    let expected = dir.path().join("expected.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        o.to_str().unwrap(),
        expected.to_str().unwrap(),
    ]);
    let r = cow::commit(&o).unwrap();
    assert!(r.data >= 300_000 && r.zeroed >= 2 * MIB, "{r:?}");
    assert!(
        fs::read(&file.path).unwrap() == fs::read(&expected).unwrap(),
        "base = base + overlay"
    );
    qemu_img(&["check", o.to_str().unwrap()]);
    let again = cow::commit(&o).unwrap();
    assert_eq!(
        (again.data, again.zeroed),
        (0, 0),
        "the overlay is empty after a commit"
    );
    // discard: the disk reads as the base.
    let base2: Arc<dyn BlockDevice> = Arc::new(
        FileDisk::open(
            &file.path,
            FileOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let disk = cow::cow(Arc::clone(&base2), Some(&file), &persistent(&o)).unwrap();
    disk.write_at(&[0x77; 4096], 0, true).unwrap();
    drop(disk);
    cow::discard(&o, false).unwrap();
    let disk = cow::cow(base2, Some(&file), &persistent(&o)).unwrap();
    let mut b = [0u8; 4096];
    disk.read_at(&mut b, 0).unwrap();
    assert!(b[..] == fs::read(&file.path).unwrap()[..4096]);
}

#[test]
fn an_overlay_whose_header_changed_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (base, file, _) = base_file(dir.path(), 4 * MIB);
    let o = dir.path().join("o.qcow2");
    drop(cow::cow(Arc::clone(&base), Some(&file), &persistent(&o)).unwrap());
    let info = vdk_formats::info(&o, None, false).unwrap();
    assert_eq!(info.virtual_size, 4 * MIB);
    // qemu-img still reads it (the check is a header extension it skips).
    qemu_img(&["check", o.to_str().unwrap()]);
    // The virtual size changed behind vdk's back: bytes 24..32 of the header.
    let mut bytes = fs::read(&o).unwrap();
    bytes[24..32].copy_from_slice(&(8 * MIB).to_be_bytes());
    fs::write(&o, &bytes).unwrap();
    let base2: Arc<dyn BlockDevice> = Arc::new(MemoryDisk::new(8 * MIB));
    let e = cow::cow(base2, None, &persistent(&o))
        .unwrap_err()
        .to_string();
    assert!(e.contains("checksum"), "{e}");
}

#[test]
fn discarding_an_image_that_is_no_overlay_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let q = vdk_formats::qcow2::create::create(
        &img,
        4 * MIB,
        &vdk_formats::qcow2::create::CreateOptions::default(),
    )
    .unwrap();
    drop(q);
    let before = fs::read(&img).unwrap();
    let e = cow::discard(&img, false).unwrap_err();
    assert!(e.to_string().contains("records no base image"), "{e}");
    assert_eq!(fs::read(&img).unwrap(), before, "the image is untouched");
}
