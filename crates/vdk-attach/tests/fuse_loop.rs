//! fuse-loop end to end: a RAM disk as a FUSE file and a loop device, read and written by the
//! kernel. Needs root (loop devices, mounting FUSE).

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use vdk_attach::{Attach, FuseExport, FuseLoop};
use vdk_backends::MemoryDisk;
use vdk_core::BlockDevice;

fn need_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test attaches loop devices and mounts FUSE: run it as root"
    );
}

/// A buffer aligned for O_DIRECT.
fn aligned(len: usize, byte: u8) -> (Vec<u8>, usize) {
    let v = vec![byte; len + 4096];
    let off = v.as_ptr().align_offset(4096);
    (v, off)
}

#[test]
fn loop_device_reads_and_writes_the_disk() {
    need_root();
    let dir = tempfile::tempdir().unwrap();
    let export = FuseExport::mount(&dir.path().join("fuse"), 4).unwrap();
    let attach = FuseLoop::new(export);
    let disk = Arc::new(MemoryDisk::new(64 << 20));
    let attached = attach
        .attach("ram", Arc::clone(&disk) as Arc<dyn BlockDevice>, false)
        .unwrap();
    let dev = attached.block_device();
    assert!(dev.to_str().unwrap().starts_with("/dev/loop"));
    let name = dev.file_name().unwrap().to_str().unwrap().to_owned();
    let dio = std::fs::read_to_string(format!("/sys/block/{name}/loop/dio")).unwrap();
    assert_eq!(
        dio.trim(),
        "1",
        "loop device should use direct I/O on the FUSE file"
    );
    let size = std::fs::read_to_string(format!("/sys/block/{name}/size")).unwrap();
    assert_eq!(size.trim(), ((64u64 << 20) / 512).to_string());

    // 1 MiB of 0xab at 3 MiB through the block device, with O_DIRECT, then fsync.
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(&dev)
        .unwrap();
    let (buf, off) = aligned(1 << 20, 0xab);
    f.seek(SeekFrom::Start(3 << 20)).unwrap();
    f.write_all(&buf[off..off + (1 << 20)]).unwrap();
    f.sync_all().unwrap();
    let mut back = vec![0u8; 1 << 20];
    disk.read_at(&mut back, 3 << 20).unwrap();
    assert!(
        back.iter().all(|b| *b == 0xab),
        "the disk holds what the block device wrote"
    );

    // And the other way: the disk's bytes come out of the block device.
    disk.write_at(&[0x5a; 4096], 8 << 20, false).unwrap();
    let (mut rbuf, roff) = aligned(4096, 0);
    f.seek(SeekFrom::Start(8 << 20)).unwrap();
    f.read_exact(&mut rbuf[roff..roff + 4096]).unwrap();
    assert!(rbuf[roff..roff + 4096].iter().all(|b| *b == 0x5a));
    drop(f);
    attached.detach().unwrap();
    assert!(
        !dir.path().join("fuse/ram").exists(),
        "the file goes with the attachment"
    );
}
