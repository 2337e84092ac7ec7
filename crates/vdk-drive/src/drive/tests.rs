//! The drive against an object store in memory: listings, names, contents, uploads.

use std::ffi::OsStr;
use std::sync::Arc;

use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use tempfile::TempDir;

use super::*;

/// A drive over `pre/` of a store holding `objects`.
fn drive(objects: &[(&str, Vec<u8>)]) -> (Drive, Arc<InMemory>, TempDir) {
    let store = Arc::new(InMemory::new());
    let cache = TempDir::new().unwrap();
    let d = Drive::new(
        store.clone(),
        None,
        Path::from("pre"),
        cache.path().to_owned(),
    )
    .unwrap();
    for (key, data) in objects {
        put(&d, &store, key, data.clone());
    }
    (d, store, cache)
}

fn put(d: &Drive, store: &InMemory, key: &str, data: Vec<u8>) {
    d.rt.block_on(store.put(&Path::from(key), data.into()))
        .unwrap();
}

/// The object `key`, if the store has it.
fn object(d: &Drive, store: &InMemory, key: &str) -> Option<Vec<u8>> {
    let got = d.rt.block_on(store.get(&Path::from(key))).ok()?;
    Some(d.rt.block_on(got.bytes()).unwrap().to_vec())
}

/// Every key under `prefix`.
fn keys(d: &Drive, store: &InMemory, prefix: &str) -> Vec<String> {
    use futures::TryStreamExt;
    let p = Path::from(prefix);
    let mut k: Vec<String> =
        d.rt.block_on(store.list(Some(&p)).try_collect::<Vec<_>>())
            .unwrap()
            .into_iter()
            .map(|m| m.location.to_string())
            .collect();
    k.sort();
    k
}

fn listing(d: &Drive, ino: u64) -> Vec<(String, bool)> {
    let mut l: Vec<(String, bool)> = d
        .readdir(ino)
        .unwrap()
        .into_iter()
        .map(|(_, dir, name)| (name, dir))
        .collect();
    l.sort();
    l
}

fn lookup(d: &Drive, parent: u64, name: &str) -> Result<Attr, Errno> {
    d.lookup(parent, OsStr::new(name))
}

/// Bytes that differ at every offset, so that a block read at the wrong place shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ (i >> 20) as u8)
        .collect()
}

/// Reads all of the file `name` of the root through open and read.
fn read_all(d: &Drive, name: &str) -> Vec<u8> {
    let a = lookup(d, ROOT, name).unwrap();
    let f = d.open(a.ino).unwrap();
    let mut out = Vec::new();
    loop {
        let got = d.read(a.ino, &f, out.len() as u64, 128 << 10).unwrap();
        if got.is_empty() {
            break;
        }
        out.extend_from_slice(&got);
    }
    d.release(a.ino, &f);
    out
}

#[test]
fn a_listing_shows_files_folders_and_an_object_a_folder_hides() {
    let (d, _store, _cache) = drive(&[
        ("pre/a.txt", b"hello".to_vec()),
        ("pre/dir/b.txt", b"b".to_vec()),
        ("pre/dir/.vdkdir", Vec::new()),
        ("pre/x", b"an object beside a folder of its name".to_vec()),
        ("pre/x/y", b"y".to_vec()),
        ("elsewhere/c", b"not under the prefix".to_vec()),
    ]);
    assert_eq!(
        listing(&d, ROOT),
        [
            ("a.txt".to_owned(), false),
            ("dir".to_owned(), true),
            ("x".to_owned(), true),
            (format!("x{ALIAS}"), false),
        ]
    );
    let dir = lookup(&d, ROOT, "dir").unwrap();
    assert!(dir.dir);
    // The marker that keeps a directory is never shown.
    assert_eq!(listing(&d, dir.ino), [("b.txt".to_owned(), false)]);
    let a = lookup(&d, ROOT, "a.txt").unwrap();
    assert_eq!((a.dir, a.size), (false, 5));
    assert_eq!(read_all(&d, &format!("x{ALIAS}")).len(), 37);
    assert_eq!(lookup(&d, ROOT, "missing").unwrap_err(), Errno::ENOENT);
}

#[test]
fn names_the_store_cannot_hold_are_refused() {
    let (d, _store, _cache) = drive(&[]);
    let long = "n".repeat(NAME_MAX + 1);
    for (name, want) in [
        (MARKER, Errno::EINVAL),
        ("a (object)", Errno::EINVAL),
        ("", Errno::EINVAL),
        ("a\u{1}b", Errno::EINVAL),
        (long.as_str(), Errno::ENAMETOOLONG),
    ] {
        assert_eq!(check_name(OsStr::new(name)).unwrap_err(), want, "{name:?}");
        assert_eq!(
            d.create(ROOT, OsStr::new(name)).unwrap_err(),
            want,
            "{name:?}"
        );
    }
    assert_eq!(
        check_name(OsStr::new("ok name.txt")).unwrap(),
        "ok name.txt"
    );
}

#[test]
fn a_file_written_goes_up_at_release_in_parts_and_reads_back_from_an_empty_cache() {
    let (d, store, _cache) = drive(&[]);
    // Larger than one part: a multipart upload.
    let data = pattern(PART + (3 << 20) + 123);
    let (a, f) = d.create(ROOT, OsStr::new("big.bin")).unwrap();
    // Written out of order, the way a copy with holes would.
    let half = data.len() / 2;
    d.write(a.ino, &f, half as u64, &data[half..]).unwrap();
    d.write(a.ino, &f, 0, &data[..half]).unwrap();
    assert!(
        object(&d, &store, "pre/big.bin").is_none(),
        "uploaded before close"
    );
    assert_eq!(d.getattr(a.ino).unwrap().size, data.len() as u64);
    d.release(a.ino, &f);
    assert_eq!(object(&d, &store, "pre/big.bin").unwrap(), data);
    // Another drive over the same store, with nothing cached, fetches it block by block.
    let cache = TempDir::new().unwrap();
    let fresh = Drive::new(
        store.clone(),
        None,
        Path::from("pre"),
        cache.path().to_owned(),
    )
    .unwrap();
    assert_eq!(read_all(&fresh, "big.bin"), data);
}

#[test]
fn a_change_in_the_middle_of_a_file_keeps_the_rest() {
    let data = pattern(3 * BLOCK as usize + 17);
    let (d, store, _cache) = drive(&[("pre/f", data.clone())]);
    let a = lookup(&d, ROOT, "f").unwrap();
    let f = d.open(a.ino).unwrap();
    d.write(a.ino, &f, BLOCK + 5, b"changed").unwrap();
    d.release(a.ino, &f);
    let mut want = data;
    want[BLOCK as usize + 5..BLOCK as usize + 12].copy_from_slice(b"changed");
    assert_eq!(object(&d, &store, "pre/f").unwrap(), want);
    // Shortened through setattr: uploaded at once.
    d.set_size(a.ino, 10).unwrap();
    assert_eq!(object(&d, &store, "pre/f").unwrap(), want[..10]);
}

#[test]
fn mkdir_rmdir_and_rename_change_the_objects() {
    let (d, store, _cache) = drive(&[]);
    let dir = d.mkdir(ROOT, OsStr::new("d")).unwrap();
    assert_eq!(keys(&d, &store, "pre"), ["pre/d/.vdkdir"]);
    assert_eq!(d.mkdir(ROOT, OsStr::new("d")).unwrap_err(), Errno::EEXIST);
    let (a, f) = d.create(dir.ino, OsStr::new("f")).unwrap();
    d.write(a.ino, &f, 0, b"contents").unwrap();
    d.release(a.ino, &f);
    assert_eq!(
        d.rmdir(ROOT, OsStr::new("d")).unwrap_err(),
        Errno::ENOTEMPTY
    );
    d.rename(ROOT, OsStr::new("d"), ROOT, OsStr::new("e"), false)
        .unwrap();
    assert_eq!(keys(&d, &store, "pre"), ["pre/e/.vdkdir", "pre/e/f"]);
    assert_eq!(listing(&d, ROOT), [("e".to_owned(), true)]);
    // The file kept its inode across the move, and its contents.
    let e = lookup(&d, ROOT, "e").unwrap();
    assert_eq!(lookup(&d, e.ino, "f").unwrap().ino, a.ino);
    d.rename(e.ino, OsStr::new("f"), ROOT, OsStr::new("g"), false)
        .unwrap();
    assert_eq!(object(&d, &store, "pre/g").unwrap(), b"contents");
    assert_eq!(
        d.rename(ROOT, OsStr::new("g"), ROOT, OsStr::new("e"), false)
            .unwrap_err(),
        Errno::EISDIR
    );
    d.rmdir(ROOT, OsStr::new("e")).unwrap();
    d.unlink(ROOT, OsStr::new("g")).unwrap();
    assert!(keys(&d, &store, "pre").is_empty());
    assert!(listing(&d, ROOT).is_empty());
}

#[test]
fn an_open_file_unlinked_still_reads_what_it_had() {
    let data = pattern(2 * BLOCK as usize + 1);
    let (d, store, _cache) = drive(&[("pre/z", data.clone())]);
    let a = lookup(&d, ROOT, "z").unwrap();
    let f = d.open(a.ino).unwrap();
    d.unlink(ROOT, OsStr::new("z")).unwrap();
    assert!(object(&d, &store, "pre/z").is_none());
    assert_eq!(lookup(&d, ROOT, "z").unwrap_err(), Errno::ENOENT);
    assert_eq!(d.getattr(a.ino).unwrap().nlink, 0);
    let got = d
        .read(a.ino, &f, 0, u32::try_from(data.len()).unwrap())
        .unwrap();
    assert_eq!(got, data);
    d.release(a.ino, &f);
    // Nothing is uploaded for a file with no name.
    assert!(keys(&d, &store, "pre").is_empty());
}

#[test]
fn errnos_are_the_system_numbers() {
    assert_eq!(Errno::ENOENT.code(), 2);
    assert_eq!(Errno::EIO.code(), 5);
    let e: std::io::Error = Errno::ENOTEMPTY.into();
    assert_eq!(e.kind(), std::io::ErrorKind::DirectoryNotEmpty);
    assert_eq!(io_errno(&std::io::Error::from_raw_os_error(28)).code(), 28);
}
