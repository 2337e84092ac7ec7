//! Any CDB with any data to a disk and to a CD-ROM logical unit: a response with status,
//! data and sense, never a panic, and never data past what the unit holds.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vdk_backends::MemoryDisk;
use vdk_scsi::{encode_lun, DeviceType, Identity, LogicalUnit, Request, Target};

fuzz_target!(|data: &[u8]| {
    let t = Target::new();
    for (lun, kind) in [(0, DeviceType::Disk), (1, DeviceType::CdRom)] {
        let disk = Arc::new(MemoryDisk::new(1 << 20));
        let lu = LogicalUnit::new(kind, Identity::from_name("fuzz", kind), Some(disk));
        t.add(lun, Arc::new(lu));
    }
    // Commands: a length byte, the CDB, a length byte, its data; two nexuses take turns.
    let mut rest = data;
    let mut nexus = 0;
    while let Some((&n, tail)) = rest.split_first() {
        let n = usize::from(n).min(tail.len()).min(32);
        let (cdb, tail) = tail.split_at(n);
        let (out, tail) = match tail.split_first() {
            Some((&m, t)) => {
                let m = usize::from(m).min(t.len()) * 16;
                let m = m.min(t.len());
                t.split_at(m)
            }
            None => (&[][..], tail),
        };
        rest = tail;
        nexus = (nexus + 1) % 2;
        for lun in [0, 1] {
            let r = t.execute(
                encode_lun(lun),
                &Request {
                    nexus,
                    initiator: "",
                    cdb,
                    data_out: out,
                },
            );
            assert!(r.data.len() <= vdk_scsi::MAX_TRANSFER as usize);
        }
    }
});
