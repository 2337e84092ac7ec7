//! Layer order: every filter alone and every ordered pair of filters, over every kind of disk,
//! passes the conformance suite, fast paths included (as nbdkit's test-layers stacks its
//! filters). A stack that ends read-only passes the read-only suite instead.
//!
//! Each backend is a test of its own, so the harness runs them side by side.

use std::sync::Arc;

use vdk_backends::{FileDisk, FileOptions, MemoryDisk};
use vdk_core::conformance::{self, MIN_SIZE};
use vdk_core::BlockDevice;
use vdk_filters::{apply, FilterSpec};
use vdk_formats::{CreateOptions, Format, OpenOptions};

/// One spec per filter, each doing its job but changing no data (the injectors at rate 0).
const FILTERS: &[&str] = &[
    "cow:volatile",
    "cache:size=1M,block=4K",
    "readonly",
    "stats",
    "error:op=all,rate=0",
    "delay:op=all,ms=0",
    "partition:1",
    "rate:bps=10G,iops=10000000",
    "blocksize:physical=512",
];

/// Where partition 1 starts, in bytes: the disks below have room for it and a table.
const PART_START: u64 = 1 << 20;

/// Every stack: each filter alone, then each ordered pair of two different filters.
fn stacks() -> Vec<Vec<&'static str>> {
    // Every filter is listed: a new one cannot be left out of this test.
    for name in vdk_filters::FILTERS {
        assert!(
            FILTERS.iter().any(|f| f.split(':').next() == Some(name)),
            "filter {name} is missing from the layer test"
        );
    }
    let mut out: Vec<Vec<&str>> = FILTERS.iter().map(|f| vec![*f]).collect();
    for a in FILTERS {
        for b in FILTERS.iter().filter(|b| *b != a) {
            out.push(vec![a, b]);
        }
    }
    out
}

/// An MBR whose partition 1 is `[PART_START, PART_START + MIN_SIZE)`.
fn mbr() -> Vec<u8> {
    let mut m = vec![0u8; 512];
    let p = &mut m[446..462];
    p[4] = 0x83;
    let start = u32::try_from(PART_START / 512).unwrap();
    let count = u32::try_from(MIN_SIZE / 512).unwrap();
    p[8..12].copy_from_slice(&start.to_le_bytes());
    p[12..16].copy_from_slice(&count.to_le_bytes());
    m[510] = 0x55;
    m[511] = 0xaa;
    m
}

/// Runs every stack over fresh disks from `backend`.
fn every_stack_conforms(backend: &(dyn Fn() -> Arc<dyn BlockDevice> + Sync)) {
    for stack in stacks() {
        let specs: Vec<FilterSpec> = stack
            .iter()
            .map(|s| FilterSpec::parse(s).unwrap())
            .collect();
        let partitioned = stack.iter().any(|s| s.starts_with("partition"));
        let make = || -> Arc<dyn BlockDevice> {
            let disk = backend();
            if partitioned {
                disk.write_at(&mbr(), 0, false).unwrap();
            }
            apply(disk, &specs)
                .unwrap_or_else(|e| panic!("{stack:?}: {e}"))
                .device
        };
        let read_only = make().info().read_only;
        let checks = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if read_only {
                conformance::run_read_only(&make);
            } else {
                conformance::run(&make);
            }
        }));
        if let Err(e) = checks {
            let why = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            panic!("the stack {stack:?} fails: {why}");
        }
    }
}

const SIZE: u64 = MIN_SIZE + PART_START;

#[test]
fn every_stack_conforms_over_memory() {
    every_stack_conforms(&|| Arc::new(MemoryDisk::new(SIZE)));
}

#[test]
fn every_stack_conforms_over_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicU64::new(0);
    every_stack_conforms(&|| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.path().join(format!("{i}.img"));
        Arc::new(FileDisk::create(&path, SIZE, FileOptions::default()).unwrap())
    });
}

fn image_stacks(format: Format) {
    let dir = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicU64::new(0);
    every_stack_conforms(&|| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.path().join(format!("{i}.{format}"));
        let opts = CreateOptions {
            format,
            cluster_size: None,
            backing: None,
            fixed: false,
            encrypt: None,
        };
        vdk_formats::create(&path, SIZE, &opts).unwrap();
        vdk_formats::open(&path, &OpenOptions::default())
            .unwrap()
            .device
    });
}

#[test]
fn every_stack_conforms_over_qcow2() {
    image_stacks(Format::Qcow2);
}

#[test]
fn every_stack_conforms_over_vhdx() {
    image_stacks(Format::Vhdx);
}

#[test]
fn every_stack_conforms_over_vhd() {
    image_stacks(Format::Vhd);
}
