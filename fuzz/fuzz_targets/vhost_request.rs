//! Any virtio-blk descriptor chain over any guest memory, to a writable and a read-only RAM
//! disk, on the path that may block and fast path first: a status byte or nothing, never a
//! panic, and never a byte of guest memory written outside the chain's device-writable
//! buffers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdk_backends::MemoryDisk;

/// Guest memory: 16 KiB, its first bytes the input's.
const RAM: usize = 16 << 10;

fuzz_target!(|data: &[u8]| {
    // Up to 8 descriptors of 13 bytes each (address, length, writable), then memory.
    let n = usize::from(data.first().copied().unwrap_or(0) % 9);
    let rest = data.get(1..).unwrap_or(&[]);
    let mut chain = Vec::new();
    for d in rest.chunks_exact(13).take(n) {
        let raw = u64::from_le_bytes(d[0..8].try_into().unwrap());
        // Most addresses inside memory, some anywhere.
        let addr = if raw & 1 == 0 { raw % (RAM as u64 + 64) } else { raw };
        let len = u32::from_le_bytes(d[8..12].try_into().unwrap()) % 0x4400;
        chain.push((addr, len, d[12] & 1 == 1));
    }
    let tail = rest.get(13 * chain.len()..).unwrap_or(&[]);
    let mut ram = vec![0u8; RAM];
    let m = tail.len().min(RAM);
    ram[..m].copy_from_slice(&tail[..m]);
    let disk = MemoryDisk::new(64 << 10);
    for (read_only, fast_first) in [(false, false), (true, false), (false, true), (true, true)] {
        let (_, after) = if fast_first {
            vdk_vhost::fuzzing::answer_fast_first(&ram, &chain, &disk, read_only)
        } else {
            vdk_vhost::fuzzing::answer(&ram, &chain, &disk, read_only)
        };
        for (i, (a, b)) in ram.iter().zip(&after).enumerate() {
            if a != b {
                let inside = chain.iter().any(|&(addr, len, w)| {
                    w && (i as u64) >= addr && (i as u64) < addr.saturating_add(u64::from(len))
                });
                assert!(inside, "byte {i} written outside the writable buffers");
            }
        }
    }
});
