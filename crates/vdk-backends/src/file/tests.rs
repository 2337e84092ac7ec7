use std::sync::Arc;

use tempfile::TempDir;
use vdk_core::{conformance, ExtentKind};

use super::*;

fn new_disk(dir: &TempDir, name: &str, size: u64, opts: FileOptions) -> FileDisk {
    FileDisk::create(&dir.path().join(name), size, opts).expect("create image")
}

#[test]
fn file_disk_conforms() {
    let dir = TempDir::new().unwrap();
    let n = std::sync::atomic::AtomicUsize::new(0);
    conformance::run(&|| {
        let name = format!(
            "d{}.img",
            n.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        Arc::new(new_disk(
            &dir,
            &name,
            conformance::MIN_SIZE,
            FileOptions::default(),
        ))
    });
}

#[test]
fn direct_file_disk_conforms() {
    let dir = TempDir::new().unwrap();
    let n = std::sync::atomic::AtomicUsize::new(0);
    let opts = FileOptions {
        direct: true,
        ..FileOptions::default()
    };
    conformance::run(&|| {
        let name = format!(
            "d{}.img",
            n.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        Arc::new(new_disk(&dir, &name, conformance::MIN_SIZE, opts))
    });
}

#[test]
fn new_file_is_one_hole() {
    let dir = TempDir::new().unwrap();
    let disk = new_disk(&dir, "a.img", 1 << 30, FileOptions::default());
    let map = disk.extents(0, 1 << 30).unwrap();
    assert_eq!(map.runs().len(), 1);
    assert_eq!(map.runs()[0].kind, ExtentKind::Hole);
}

#[test]
fn written_block_is_data_between_holes() {
    let dir = TempDir::new().unwrap();
    let disk = new_disk(&dir, "a.img", 1 << 30, FileOptions::default());
    disk.write_at(&[1u8; 65536], 1 << 20, false).unwrap();
    let kinds: Vec<ExtentKind> = disk
        .extents(0, 1 << 30)
        .unwrap()
        .runs()
        .iter()
        .map(|r| r.kind)
        .collect();
    assert_eq!(
        kinds,
        vec![ExtentKind::Hole, ExtentKind::Data, ExtentKind::Hole]
    );
}

#[test]
fn trim_frees_space() {
    let dir = TempDir::new().unwrap();
    let disk = new_disk(&dir, "a.img", 16 << 20, FileOptions::default());
    disk.write_at(&vec![1u8; 8 << 20], 0, false).unwrap();
    disk.trim(0, 8 << 20).unwrap();
    let kinds: Vec<ExtentKind> = disk
        .extents(0, 16 << 20)
        .unwrap()
        .runs()
        .iter()
        .map(|r| r.kind)
        .collect();
    assert_eq!(kinds, vec![ExtentKind::Hole]);
}

#[test]
fn read_only_disk_refuses_writes() {
    let dir = TempDir::new().unwrap();
    drop(new_disk(&dir, "a.img", 1 << 20, FileOptions::default()));
    let ro = FileOptions {
        read_only: true,
        ..FileOptions::default()
    };
    let disk = FileDisk::open(&dir.path().join("a.img"), ro).unwrap();
    assert!(matches!(
        disk.write_at(&[1], 0, false),
        Err(Error::ReadOnly)
    ));
    assert!(matches!(disk.trim(0, 512), Err(Error::ReadOnly)));
    assert!(disk.info().read_only);
}

#[test]
fn misaligned_direct_request_is_refused() {
    let dir = TempDir::new().unwrap();
    let opts = FileOptions {
        direct: true,
        ..FileOptions::default()
    };
    let disk = FileDisk::create(&dir.path().join("a.img"), 1 << 20, opts).unwrap();
    let mut buf = [0u8; 512];
    assert!(matches!(
        disk.read_at(&mut buf, 0),
        Err(Error::Misaligned { .. })
    ));
}

#[test]
fn one_writer_or_many_readers() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("locked.img");
    let writer = FileDisk::create(&path, 1 << 20, FileOptions::default()).unwrap();
    let ro = FileOptions {
        read_only: true,
        ..FileOptions::default()
    };
    let second = FileDisk::open(&path, FileOptions::default()).unwrap_err();
    assert_eq!(second.kind(), io::ErrorKind::ResourceBusy);
    assert!(second.to_string().contains("in use"), "{second}");
    assert!(
        FileDisk::open(&path, ro).is_err(),
        "no reader beside a writer"
    );
    drop(writer);
    let r1 = FileDisk::open(&path, ro).unwrap();
    let r2 = FileDisk::open(&path, ro).unwrap();
    assert!(
        FileDisk::open(&path, FileOptions::default()).is_err(),
        "no writer beside readers"
    );
    drop((r1, r2));
    FileDisk::open(&path, FileOptions::default()).unwrap();
}
