//! The partition filter on tables made by sfdisk (MBR and GPT): each partition reads and
//! writes exactly its own bytes; and the filter passes the conformance suite.
#![allow(clippy::cast_possible_truncation)] // test sizes are small constants

use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::sync::Arc;

use vdk_backends::{FileDisk, FileOptions, MemoryDisk};
use vdk_core::BlockDevice;
use vdk_filters::{apply, FilterSpec, Partition};

const MIB: u64 = 1 << 20;

fn sfdisk(img: &std::path::Path, label: &str, script: &str) {
    let mut child = Command::new("sfdisk")
        .args(["--quiet", "--label", label])
        .arg(img)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("this test needs sfdisk: apt-get install fdisk");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk failed");
}

#[test]
fn partitions_of_mbr_and_gpt_disks_are_their_own_bytes() {
    let dir = tempfile::tempdir().unwrap();
    for label in ["dos", "gpt"] {
        let img = dir.path().join(format!("{label}.img"));
        fs::File::create(&img).unwrap().set_len(64 * MIB).unwrap();
        // 1: 8 MiB at 1 MiB; 2: 16 MiB at 16 MiB.
        sfdisk(
            &img,
            label,
            "start=2048, size=16384\nstart=32768, size=32768\n",
        );
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        f.write_all_at(&[0x11; 4096], MIB).unwrap();
        f.write_all_at(&[0x22; 4096], 16 * MIB + 4096).unwrap();
        drop(f);
        let disk: Arc<dyn BlockDevice> =
            Arc::new(FileDisk::open(&img, FileOptions::default()).unwrap());
        let p1 = Partition::new(Arc::clone(&disk), 1).unwrap();
        let p2 = Partition::new(Arc::clone(&disk), 2).unwrap();
        assert_eq!(p1.span().start, MIB, "{label}");
        assert_eq!(BlockDevice::info(&p1).size, 8 * MIB, "{label}");
        assert_eq!(BlockDevice::info(&p2).size, 16 * MIB, "{label}");
        let mut b = [0u8; 4096];
        BlockDevice::read_at(&p1, &mut b, 0).unwrap();
        assert!(
            b.iter().all(|x| *x == 0x11),
            "{label}: partition 1 starts at its first sector"
        );
        BlockDevice::read_at(&p2, &mut b, 4096).unwrap();
        assert!(b.iter().all(|x| *x == 0x22), "{label}");
        // Writes stay inside; a write past the partition's end is refused, not spilled.
        BlockDevice::write_at(&p1, &[0x33; 512], 8 * MIB - 512, false).unwrap();
        assert!(BlockDevice::write_at(&p1, &[0x33; 1024], 8 * MIB - 512, false).is_err());
        let mut after = [0u8; 512];
        disk.read_at(&mut after, 9 * MIB).unwrap();
        assert_eq!(
            after, [0u8; 512],
            "{label}: nothing spilled past partition 1"
        );
        assert!(
            Partition::new(Arc::clone(&disk), 3).is_err(),
            "{label}: no partition 3"
        );
    }
}

#[test]
fn a_disk_without_a_table_is_refused() {
    let disk: Arc<dyn BlockDevice> = Arc::new(MemoryDisk::new(4 * MIB));
    let e = Partition::new(disk, 1).unwrap_err().to_string();
    assert!(e.contains("no partition table"), "{e}");
}

#[test]
fn a_partition_conforms() {
    let size = vdk_core::conformance::MIN_SIZE;
    vdk_core::conformance::run(&|| {
        let disk: Arc<dyn BlockDevice> = Arc::new(MemoryDisk::new(size + 2 * MIB));
        // An MBR by hand: partition 1, type 0x83, from sector 2048 for `size` bytes.
        let mut mbr = [0u8; 512];
        let e = &mut mbr[446..462];
        e[4] = 0x83;
        e[8..12].copy_from_slice(&2048u32.to_le_bytes());
        e[12..16].copy_from_slice(&((size / 512) as u32).to_le_bytes());
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        disk.write_at(&mbr, 0, false).unwrap();
        apply(disk, &[FilterSpec::parse("partition:1").unwrap()])
            .unwrap()
            .device
    });
}
