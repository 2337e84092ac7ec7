//! Helpers shared by the format tests: qemu-img, deterministic data, a random workload
//! mirrored into a raw file, and byte-for-byte comparison.
#![allow(dead_code)] // each test binary uses a different part

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use vdk_core::BlockDevice;
use vdk_formats::{open, OpenOptions};

pub const MIB: u64 = 1 << 20;

pub fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("this test needs qemu-img: apt-get install qemu-utils ({e})"));
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A small deterministic generator (xorshift), so failures reproduce.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub fn fill(buf: &mut [u8], seed: u64) {
    let mut r = Rng(seed | 1);
    for chunk in buf.chunks_mut(8) {
        let v = r.next().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

pub fn open_rw(p: &Path) -> Arc<dyn BlockDevice> {
    open(p, &OpenOptions::default()).unwrap().device
}

pub fn open_ro(p: &Path) -> Arc<dyn BlockDevice> {
    open(
        p,
        &OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap()
    .device
}

/// Every byte of `dev` equals the raw file `reference`.
pub fn same_as_raw(dev: &dyn BlockDevice, reference: &Path) {
    let size = dev.info().size;
    let f = fs::File::open(reference).unwrap();
    assert_eq!(f.metadata().unwrap().len(), size, "sizes differ");
    let mut a = vec![0u8; MIB as usize];
    let mut b = vec![0u8; MIB as usize];
    let mut at = 0;
    while at < size {
        let n = MIB.min(size - at) as usize;
        dev.read_at(&mut a[..n], at).unwrap();
        f.read_exact_at(&mut b[..n], at).unwrap();
        if a[..n] != b[..n] {
            let i = (0..n).find(|i| a[*i] != b[*i]).unwrap();
            panic!(
                "byte {} differs: vdk {:#x}, qemu {:#x}",
                at + i as u64,
                a[i],
                b[i]
            );
        }
        at += n as u64;
    }
}

/// A raw image with varied data, zeroes and holes.
pub fn raw_source(dir: &Path, size: u64) -> PathBuf {
    let p = dir.join("source.raw");
    let f = fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    let mut r = Rng(42);
    let mut buf = vec![0u8; 256 << 10];
    for i in 0..24 {
        let len = 1 + r.below(buf.len() as u64) as usize;
        let at = r.below(size - len as u64);
        fill(&mut buf[..len], i);
        f.write_all_at(&buf[..len], at).unwrap();
    }
    // Whole clusters of zeroes written explicitly, too.
    f.write_all_at(&vec![0u8; 200 << 10], size / 2).unwrap();
    p
}

/// Random writes, zero writes and discards through vdk, mirrored into a raw file; then
/// qemu-img check is clean and qemu-img compare finds the two equal.
pub fn exercise(img: &Path, mirror: &Path, size: u64, seed: u64, ops: usize) {
    let dev = open_rw(img);
    let m = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mirror)
        .unwrap();
    let mut r = Rng(seed);
    let mut buf = vec![0u8; 3 << 20 >> 1];
    for i in 0..ops {
        let len = 1 + r.below(if i % 5 == 0 { buf.len() as u64 } else { 70_000 });
        let at = r.below(size - len);
        match r.below(10) {
            0 => {
                dev.write_zeroes(at, len, r.below(2) == 0, false).unwrap();
                m.write_all_at(&vec![0u8; len as usize], at).unwrap();
            }
            1 if dev.info().caps.trim => {
                dev.trim(at, len).unwrap();
                m.write_all_at(&vec![0u8; len as usize], at).unwrap();
            }
            2 => dev.flush().unwrap(),
            _ => {
                let b = &mut buf[..len as usize];
                fill(b, seed ^ i as u64);
                dev.write_at(b, at, r.below(8) == 0).unwrap();
                m.write_all_at(b, at).unwrap();
            }
        }
    }
    same_as_raw(&*dev, mirror);
    dev.flush().unwrap();
    drop(dev);
}

/// Creates an empty image of `format` at `path` and opens it for writing.
pub fn new_image(
    path: &Path,
    format: vdk_formats::Format,
    size: u64,
    cluster: Option<u64>,
) -> Arc<dyn BlockDevice> {
    let opts = vdk_formats::CreateOptions {
        format,
        cluster_size: cluster,
        backing: None,
        fixed: false,
        encrypt: None,
    };
    vdk_formats::create(path, size, &opts).unwrap();
    open_rw(path)
}

/// The generic conformance suite on fresh images of `format`.
pub fn conformance_of(format: vdk_formats::Format, cluster: Option<u64>) {
    let dir = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicUsize::new(0);
    vdk_core::conformance::run(&|| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        new_image(
            &dir.path().join(format!("c{i}")),
            format,
            vdk_core::conformance::MIN_SIZE,
            cluster,
        )
    });
}

/// A 1 TiB image of `format` with 1 MiB written at 700 GiB: a few MiB on disk, and only the
/// written range mapped as data. Returns the image (in `dir`) for format-specific checks.
pub fn terabyte_with_a_mebibyte(dir: &Path, format: vdk_formats::Format) -> PathBuf {
    let img = dir.join("big");
    let dev = new_image(&img, format, 1 << 40, None);
    dev.write_at(&vec![0x5a; MIB as usize], 700 << 30, true)
        .unwrap();
    drop(dev);
    let used = std::os::unix::fs::MetadataExt::blocks(&fs::metadata(&img).unwrap()) * 512;
    assert!(
        used < 8 * MIB,
        "a 1 TiB {format} image with 1 MiB written uses {used} bytes"
    );
    let e = open_ro(&img).extents(0, 1 << 40).unwrap();
    let data: u64 = e
        .runs()
        .iter()
        .filter(|r| r.kind == vdk_core::ExtentKind::Data)
        .map(|r| r.len)
        .sum();
    assert!(
        (MIB..=2 * MIB).contains(&data),
        "only the written MiB is data: {data}"
    );
    img
}
