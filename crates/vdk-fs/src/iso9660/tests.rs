//! Images built here byte by byte: just the structures each test needs.

use std::sync::Arc;

use vdk_backends::MemoryDisk;
use vdk_core::BlockDevice;

use super::*;

const S: usize = 2048;

fn both32(v: u32) -> Vec<u8> {
    [v.to_le_bytes(), v.to_be_bytes()].concat()
}

use super::record::make as rec;

fn su(sig: &[u8; 2], data: &[u8]) -> Vec<u8> {
    let mut e = vec![sig[0], sig[1], (4 + data.len()) as u8, 1];
    e.extend_from_slice(data);
    e
}

/// An image of `sectors` sectors whose root directory (at sector 18) holds `entries`; the
/// root's `.` carries `root_su`.
fn image(sectors: usize, root_su: &[u8], entries: &[Vec<u8>]) -> Vec<u8> {
    let mut img = vec![0u8; sectors * S];
    let mut root = rec(&[0], 18, S as u32, 2, root_su);
    root.extend(rec(&[1], 18, S as u32, 2, &[]));
    for e in entries {
        root.extend_from_slice(e);
    }
    img[18 * S..18 * S + root.len()].copy_from_slice(&root);
    let pvd = &mut img[16 * S..17 * S];
    pvd[0] = 1;
    pvd[1..6].copy_from_slice(b"CD001");
    pvd[40..72].fill(b' ');
    pvd[40..44].copy_from_slice(b"TEST");
    pvd[80..88].copy_from_slice(&both32(sectors as u32));
    pvd[128..130].copy_from_slice(&2048u16.to_le_bytes());
    pvd[130..132].copy_from_slice(&2048u16.to_be_bytes());
    pvd[156..190].copy_from_slice(&rec(&[0], 18, S as u32, 2, &[])[..34]);
    let term = &mut img[17 * S..18 * S];
    term[0] = 255;
    term[1..6].copy_from_slice(b"CD001");
    img
}

fn open(img: Vec<u8>) -> Iso {
    let dev = Arc::new(MemoryDisk::new(img.len() as u64));
    dev.write_at(&img, 0, false).unwrap();
    Iso::open(dev).unwrap()
}

fn names(iso: &Iso, dir: &Node) -> Vec<String> {
    iso.list(dir)
        .unwrap()
        .iter()
        .map(|n| String::from_utf8_lossy(&n.name).into_owned())
        .collect()
}

#[test]
fn plain_names_lose_their_version() {
    let mut img = image(
        24,
        &[],
        &[
            rec(b"README.TXT;1", 20, 5, 0, &[]),
            rec(b"NOEXT.;1", 21, 0, 0, &[]),
        ],
    );
    img[20 * S..20 * S + 5].copy_from_slice(b"hello");
    let iso = open(img);
    assert_eq!(iso.scheme(), Scheme::Plain);
    assert_eq!(iso.label(), "TEST");
    assert_eq!(names(&iso, &iso.root()), ["README.TXT", "NOEXT"]);
    let f = iso.list(&iso.root()).unwrap()[0].clone();
    let mut buf = [0u8; 16];
    assert_eq!(iso.read(&f, 0, &mut buf).unwrap(), 5);
    assert_eq!(&buf[..5], b"hello");
    assert_eq!(iso.read(&f, 5, &mut buf).unwrap(), 0, "at the end");
}

#[test]
fn a_multi_extent_file_reads_as_one() {
    let mut img = image(
        26,
        &[],
        &[
            rec(b"BIG;1", 20, 3000, 0x80, &[]),
            rec(b"BIG;1", 22, 1000, 0, &[]),
        ],
    );
    img[20 * S..20 * S + 3000].fill(1);
    img[22 * S..22 * S + 1000].fill(2);
    let iso = open(img);
    let list = iso.list(&iso.root()).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].size, 4000);
    let mut buf = vec![0u8; 4000];
    assert_eq!(iso.read(&list[0], 0, &mut buf).unwrap(), 4000);
    assert!(buf[..3000].iter().all(|&b| b == 1));
    assert!(buf[3000..].iter().all(|&b| b == 2));
    let mut across = [0u8; 10];
    iso.read(&list[0], 2995, &mut across).unwrap();
    assert_eq!(across, [1, 1, 1, 1, 1, 2, 2, 2, 2, 2]);
}

#[test]
fn rock_ridge_names_modes_and_links() {
    let root_su = [su(b"SP", &[0xbe, 0xef, 0]), su(b"RR", &[0x89])].concat();
    let px = |mode: u32, ino: u32| {
        su(
            b"PX",
            &[
                both32(mode),
                both32(1),
                both32(1000),
                both32(100),
                both32(ino),
            ]
            .concat(),
        )
    };
    let file = rec(
        b"LONGNA~1.;1",
        20,
        4,
        0,
        &[su(b"NM", b"\x00a long name.txt"), px(0o100640, 7)].concat(),
    );
    let link = rec(
        b"LINK.;1",
        0,
        0,
        0,
        &[
            su(b"NM", b"\x00link"),
            px(0o120777, 8),
            su(b"SL", &[&[0u8, 0, 3][..], b"abc"].concat()),
        ]
        .concat(),
    );
    let moved = rec(
        b"MOVED",
        21,
        S as u32,
        2,
        &[su(b"NM", b"\x00moved"), su(b"RE", &[])].concat(),
    );
    let iso = open(image(24, &root_su, &[file, link, moved]));
    assert_eq!(iso.scheme(), Scheme::RockRidge { skip: 0 });
    let list = iso.list(&iso.root()).unwrap();
    assert_eq!(
        names(&iso, &iso.root()),
        ["a long name.txt", "link"],
        "RE hides"
    );
    assert_eq!((list[0].perm, list[0].uid, list[0].gid), (0o640, 1000, 100));
    assert_eq!(list[1].kind, Kind::Symlink(b"abc".to_vec()));
    assert_eq!(list[1].size, 3);
    assert_eq!(list[0].ino, RR_INO_BASE + 7);
}

#[test]
fn without_a_primary_descriptor_it_is_not_iso() {
    let dev = Arc::new(MemoryDisk::new(40 * S as u64));
    assert!(matches!(Iso::open(dev), Err(IsoError::NotIso)));
}

#[test]
fn extents_past_the_end_are_errors_not_panics() {
    let iso = open(image(24, &[], &[rec(b"FAR;1", 1_000_000, 4096, 0, &[])]));
    assert!(matches!(iso.list(&iso.root()), Err(IsoError::OutOfBounds)));
    let iso = open(image(24, &[], &[rec(b"SUB", 900, S as u32, 2, &[])]));
    assert!(iso.list(&iso.root()).is_err());
}

#[test]
fn a_directory_that_contains_itself_is_listed_without_looping() {
    // A subdirectory whose extent is the root's own.
    let iso = open(image(24, &[], &[rec(b"SELF", 18, S as u32, 2, &[])]));
    let sub = iso.list(&iso.root()).unwrap()[0].clone();
    assert_eq!(sub.kind, Kind::Directory);
    // Listing it lists the root again; nothing recurses on its own.
    assert_eq!(names(&iso, &sub), ["SELF"]);
}

/// An image whose root directory holds the records `entries`, packed into as many sectors as
/// they take (records never cross a sector).
fn big_root(entries: impl Iterator<Item = Vec<u8>>) -> Vec<u8> {
    let mut dir = rec(&[0], 18, 0, 2, &[]);
    dir.extend(rec(&[1], 18, 0, 2, &[]));
    for e in entries {
        let room = S - dir.len() % S;
        if e.len() > room {
            dir.resize(dir.len() + room, 0);
        }
        dir.extend(e);
    }
    dir.resize(dir.len().div_ceil(S) * S, 0);
    let dir_len = dir.len() as u32;
    // The size of `.` (and of the root in the descriptor) is the directory's.
    dir[10..14].copy_from_slice(&dir_len.to_le_bytes());
    dir[14..18].copy_from_slice(&dir_len.to_be_bytes());
    let sectors = 18 + dir.len() / S + 1;
    let mut img = image(sectors, &[], &[]);
    img[18 * S..18 * S + dir.len()].copy_from_slice(&dir);
    img[16 * S + 156..16 * S + 190].copy_from_slice(&rec(&[0], 18, dir_len, 2, &[])[..34]);
    img
}

#[test]
fn a_directory_of_two_hundred_thousand_entries_lists_each_name_once() {
    const N: usize = 200_000;
    // Every name twice (versions 1 and 2): the first of each is kept.
    let records = (0..N).flat_map(|i| {
        let name = format!("F{i:07}.DAT");
        [
            rec(format!("{name};1").as_bytes(), 20, 1, 0, &[]),
            rec(format!("{name};2").as_bytes(), 20, 2, 0, &[]),
        ]
    });
    let iso = open(big_root(records));
    // Hashed, this takes a fraction of a second; a scan per record took minutes. The bound
    // only keeps a regression from hanging the suite.
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let list = iso.list(&iso.root()).unwrap();
        let _ = done.send(list);
    });
    let list = finished
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("listing 200,000 entries finishes");
    assert_eq!(list.len(), N);
    assert_eq!(list[0].name, b"F0000000.DAT");
    assert_eq!(list[N - 1].name, format!("F{:07}.DAT", N - 1).as_bytes());
    assert!(
        list.iter().all(|n| n.size == 1),
        "the first version is kept"
    );
}

#[test]
fn the_directory_cache_holds_a_bounded_number_of_entries() {
    let root = Arc::new(placeholder_root());
    let list = |n: usize| Arc::new(vec![Arc::clone(&root); n]);
    let mut cache = DirCache::default();
    cache.keep(1, &list(CACHED_ENTRIES / 2));
    cache.keep(2, &list(CACHED_ENTRIES / 2));
    assert_eq!(cache.entries, CACHED_ENTRIES);
    // One more would pass the bound: what was kept goes.
    cache.keep(3, &list(10));
    assert_eq!((cache.lists.len(), cache.entries), (1, 10));
    // A directory larger than the whole cache is never kept.
    cache.keep(4, &list(CACHED_ENTRIES + 1));
    assert!(!cache.lists.contains_key(&4));
    assert!(cache.entries <= CACHED_ENTRIES);
}
