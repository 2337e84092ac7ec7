//! The disk against stores that run in the test: a local directory (`file://`) and
//! object_store's in-memory store (which has conditional puts, as S3 does). The S3 protocol
//! itself is tested against real servers in the `vdk` crate's tests.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::memory::InMemory;
use vdk_core::conformance;

use super::*;
use crate::codec::KEY_LEN;
use crate::lease::LEASE;
use crate::location::StoreOptions;
use crate::meta::{Compression, Encryption};
use manage::small_runtime;

const CHUNK: u64 = 64 << 10;

struct Place {
    url: String,
    _dir: tempfile::TempDir,
    root: PathBuf,
}

fn place() -> Place {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    Place {
        url: format!("file://{}/disk", root.display()),
        _dir: dir,
        root,
    }
}

fn make(p: &Place, size: u64, c: Compression, e: Encryption) {
    let opts = CreateOptions {
        chunk_size: CHUNK,
        compression: c,
        encryption: e,
        key: (e == Encryption::Aes256Gcm).then_some([3u8; KEY_LEN]),
        ..CreateOptions::new(size)
    };
    create(&p.url, &opts).unwrap();
}

fn opts(cache: &Path) -> OpenOptions {
    OpenOptions {
        cache_dir: Some(cache.to_owned()),
        cache_size: 16 * CHUNK,
        ..OpenOptions::default()
    }
}

fn chunk_objects(p: &Place) -> usize {
    std::fs::read_dir(p.root.join("disk/chunks")).map_or(0, |d| d.count())
}

#[test]
fn object_disks_conform() {
    for (c, e) in [
        (Compression::None, Encryption::None),
        (Compression::Zstd, Encryption::Aes256Gcm),
    ] {
        conformance::run(&|| {
            let p = place();
            make(&p, conformance::MIN_SIZE, c, e);
            let mut o = opts(&p.root.join("cache"));
            o.key = (e == Encryption::Aes256Gcm).then_some([3u8; KEY_LEN]);
            let d = ObjectDisk::open(&p.url, &o).unwrap();
            // The place outlives the disk: leaked for the suite's run.
            std::mem::forget(p);
            Arc::new(d)
        });
    }
}

#[test]
fn data_survives_a_reopen_with_an_empty_cache_and_zero_chunks_cost_nothing() {
    let p = place();
    make(&p, 4 << 20, Compression::Zstd, Encryption::None);
    let data = conformance::pattern(100_000, 300_000, 7);
    {
        let d = ObjectDisk::open(&p.url, &opts(&p.root.join("c1"))).unwrap();
        d.write_at(&data, 100_000, false).unwrap();
        d.flush().unwrap();
        assert_eq!(chunk_objects(&p), 6, "chunks 1 to 6 hold the write");
        // Zeroes over whole chunks delete them; a partial zero keeps the chunk.
        d.write_zeroes(2 * CHUNK, 2 * CHUNK, false, true).unwrap();
        assert_eq!(chunk_objects(&p), 4);
        d.trim(4 * CHUNK, CHUNK).unwrap();
        d.flush().unwrap();
        assert_eq!(chunk_objects(&p), 3);
    }
    let d = ObjectDisk::open(&p.url, &opts(&p.root.join("c2"))).unwrap();
    let mut back = vec![0u8; 300_000];
    d.read_at(&mut back, 100_000).unwrap();
    let mut want = data.clone();
    for b in &mut want[(2 * CHUNK - 100_000) as usize..(5 * CHUNK - 100_000) as usize] {
        *b = 0;
    }
    assert!(back == want, "read back differs");
    let e = d.extents(0, 8 * CHUNK).unwrap();
    let kinds: Vec<(u64, ExtentKind)> = e.iter().map(|(_, x)| (x.len, x.kind)).collect();
    assert_eq!(
        kinds,
        vec![
            (CHUNK, ExtentKind::Hole),
            (CHUNK, ExtentKind::Data),
            (3 * CHUNK, ExtentKind::Hole),
            (2 * CHUNK, ExtentKind::Data),
            (CHUNK, ExtentKind::Hole),
        ]
    );
}

#[test]
fn a_bounded_cache_serves_a_disk_larger_than_itself() {
    let p = place();
    make(&p, 128 * CHUNK, Compression::None, Encryption::None);
    let cache = p.root.join("c");
    let mut o = opts(&cache);
    o.cache_size = 8 * CHUNK;
    let d = ObjectDisk::open(&p.url, &o).unwrap();
    for i in 0..128u64 {
        d.write_at(
            &conformance::pattern(i * CHUNK, CHUNK as usize, 1),
            i * CHUNK,
            false,
        )
        .unwrap();
        let (cached, _) = d.cache_usage();
        assert!(cached <= 9 * CHUNK, "cache holds {cached} bytes");
    }
    d.flush().unwrap();
    for i in (0..128u64).rev() {
        let mut b = vec![0u8; CHUNK as usize];
        d.read_at(&mut b, i * CHUNK).unwrap();
        assert!(
            b == conformance::pattern(i * CHUNK, CHUNK as usize, 1),
            "chunk {i}"
        );
    }
    assert_eq!(chunk_objects(&p), 128);
    let used = std::fs::metadata(cache.join("data")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        used.blocks() * 512 <= 10 * CHUNK,
        "cache file holds {} bytes",
        used.blocks() * 512
    );
}

#[test]
fn unflushed_writes_are_uploaded_at_the_next_open_or_discarded_by_choice() {
    let p = place();
    make(&p, 1 << 20, Compression::None, Encryption::None);
    let cache = p.root.join("c");
    let d = ObjectDisk::open(&p.url, &opts(&cache)).unwrap();
    d.write_at(b"before", 0, false).unwrap();
    d.flush().unwrap();
    d.write_at(b"after!", 0, false).unwrap();
    d.write_at(b"more", 5 * CHUNK, false).unwrap();
    d.abandon();
    let d = ObjectDisk::open(&p.url, &opts(&cache)).unwrap();
    assert_eq!(d.recovery().uploaded, 2);
    drop(d);
    let d = ObjectDisk::open(&p.url, &opts(&p.root.join("fresh"))).unwrap();
    let mut b = [0u8; 6];
    d.read_at(&mut b, 0).unwrap();
    assert_eq!(&b, b"after!");
    d.write_at(b"dropme", 0, false).unwrap();
    d.abandon();
    let mut o = opts(&p.root.join("fresh"));
    o.recovery = Recovery::Discard;
    let d = ObjectDisk::open(&p.url, &o).unwrap();
    assert_eq!(d.recovery().discarded, 1);
    d.read_at(&mut b, 0).unwrap();
    assert_eq!(&b, b"after!", "as the last flush left it");
}

#[test]
fn a_leftover_older_than_the_bucket_is_set_aside_not_mixed_in() {
    let p = place();
    make(&p, 1 << 20, Compression::None, Encryption::None);
    let (ca, cb) = (p.root.join("a"), p.root.join("b"));
    let a = ObjectDisk::open(&p.url, &opts(&ca)).unwrap();
    a.write_at(b"from a", 0, false).unwrap();
    a.write_at(b"a alone", 3 * CHUNK, false).unwrap();
    a.abandon();
    // Another writer (another cache) changes chunk 0 in the meantime.
    let b = ObjectDisk::open(&p.url, &opts(&cb)).unwrap();
    b.write_at(b"from b", 0, false).unwrap();
    drop(b);
    let a = ObjectDisk::open(&p.url, &opts(&ca)).unwrap();
    let r = a.recovery().clone();
    assert_eq!(r.uploaded, 1, "chunk 3 was not touched by b");
    assert_eq!(r.conflicts.len(), 1);
    let (index, path) = &r.conflicts[0];
    assert_eq!(*index, 0);
    assert_eq!(&std::fs::read(path).unwrap()[..6], b"from a");
    let mut got = [0u8; 7];
    a.read_at(&mut got[..6], 0).unwrap();
    assert_eq!(&got[..6], b"from b", "the bucket's version wins");
    a.read_at(&mut got, 3 * CHUNK).unwrap();
    assert_eq!(&got, b"a alone");
}

#[test]
fn one_writer_many_readers_in_a_directory() {
    let p = place();
    make(&p, 1 << 20, Compression::None, Encryption::None);
    let w = ObjectDisk::open(&p.url, &opts(&p.root.join("w"))).unwrap();
    let e = ObjectDisk::open(&p.url, &opts(&p.root.join("w2"))).unwrap_err();
    assert!(matches!(e, ObjError::LeaseHeld { .. }), "{e}");
    assert!(
        e.to_string()
            .contains(&format!("pid {}", std::process::id())),
        "{e}"
    );
    let ro = OpenOptions {
        read_only: true,
        ..opts(&p.root.join("r1"))
    };
    let r1 = ObjectDisk::open(&p.url, &ro).unwrap();
    let r2 = ObjectDisk::open(
        &p.url,
        &OpenOptions {
            cache_dir: Some(p.root.join("r2")),
            ..ro.clone()
        },
    )
    .unwrap();
    assert!(matches!(
        r1.write_at(b"x", 0, false),
        Err(vdk_core::Error::ReadOnly)
    ));
    // One cache directory serves one opener.
    let e = ObjectDisk::open(&p.url, &ro).unwrap_err();
    assert!(e.to_string().contains("in use"), "{e}");
    drop((w, r1, r2));
    ObjectDisk::open(&p.url, &opts(&p.root.join("w2"))).unwrap();
}

#[test]
fn creation_refuses_to_overwrite_and_opening_checks_the_key() {
    let p = place();
    make(&p, 1 << 20, Compression::None, Encryption::Aes256Gcm);
    let e = create(&p.url, &CreateOptions::new(1 << 20)).unwrap_err();
    assert!(matches!(e, ObjError::Exists(_)), "{e}");
    let mut o = opts(&p.root.join("c"));
    assert!(matches!(
        ObjectDisk::open(&p.url, &o),
        Err(ObjError::KeyNeeded)
    ));
    o.key = Some([4u8; KEY_LEN]);
    assert!(matches!(
        ObjectDisk::open(&p.url, &o),
        Err(ObjError::WrongKey)
    ));
    let missing = format!("file://{}/none", p.root.display());
    let e = ObjectDisk::open(&missing, &o).unwrap_err();
    assert!(e.to_string().contains("vdk create"), "{e}");
    let s = info(&p.url, &StoreOptions::default()).unwrap();
    assert_eq!((s.meta.size, s.stored_chunks, s.writer), (1 << 20, 0, None));
}

// The lease in a bucket, on object_store's in-memory store.

fn memory_disk(store: &Arc<InMemory>) -> Location {
    Location {
        store: store.clone(),
        prefix: object_store::path::Path::from("disk"),
        url: "memory:///disk".into(),
        local: None,
        endpoint: None,
        lister: None,
    }
}

#[test]
fn a_bucket_lease_admits_one_writer_and_a_lost_lease_stops_writes() {
    let store = Arc::new(InMemory::new());
    let loc = memory_disk(&store);
    create_at(
        &loc,
        &CreateOptions {
            chunk_size: CHUNK,
            ..CreateOptions::new(1 << 20)
        },
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(&dir.path().join("a"));
    o.lease_ttl = Duration::from_millis(1500);
    let a = ObjectDisk::open_at(loc.clone(), &o).unwrap();
    a.write_at(b"mine", 0, false).unwrap();
    a.flush().unwrap();
    // This process runs, so its lease is not stale: a second writer is refused by name.
    let e = ObjectDisk::open_at(loc.clone(), &opts(&dir.path().join("b"))).unwrap_err();
    assert!(matches!(e, ObjError::LeaseHeld { .. }), "{e}");
    assert!(
        e.to_string()
            .contains(&format!("pid {}", std::process::id())),
        "{e}"
    );
    // Renewals keep it past its time.
    std::thread::sleep(Duration::from_millis(2500));
    a.write_at(b"still", 0, true).unwrap();
    // Someone overwrites the lease object: the next renewal finds it, writes stop.
    let rt = small_runtime().unwrap();
    let rec = br#"{"holder":"thief@elsewhere pid 1","id":"x","host":"elsewhere","pid":1,"expires":99999999999}"#;
    rt.block_on(store.put(&loc.key(LEASE), PutPayload::from(rec.to_vec())))
        .unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    let e = a.write_at(b"no", 0, false).unwrap_err();
    assert_eq!(e.errno(), vdk_core::Errno::Io);
    assert!(format!("{:?}", e).contains("thief"), "{e:?}");
    a.read_at(&mut [0u8; 4], 0).unwrap();
    drop(a);
}

#[test]
fn a_lease_left_by_a_dead_process_here_is_taken_at_once() {
    let store = Arc::new(InMemory::new());
    let loc = memory_disk(&store);
    create_at(
        &loc,
        &CreateOptions {
            chunk_size: CHUNK,
            ..CreateOptions::new(1 << 20)
        },
    )
    .unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    // A pid above the kernel's maximum never runs.
    let rec = format!(
        r#"{{"holder":"ghost","id":"x","host":"{}","pid":4294967,"expires":99999999999}}"#,
        host.trim()
    );
    let rt = small_runtime().unwrap();
    rt.block_on(store.put(&loc.key(LEASE), PutPayload::from(rec.into_bytes())))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = ObjectDisk::open_at(loc.clone(), &opts(dir.path())).unwrap();
    drop(d);
    // And a lease given up at close is free.
    ObjectDisk::open_at(loc, &opts(dir.path())).unwrap();
}
