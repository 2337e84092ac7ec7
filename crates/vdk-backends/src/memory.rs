//! A sparse RAM disk.
//!
//! Storage is allocated in [`CHUNK`]-sized pieces on the first non-zero write to them and freed
//! when a trim or write-zeroes covers a whole piece, so an empty 1 TiB disk costs a few bytes
//! and `extents` reports unallocated pieces as holes. The chunk map is split into shards, each
//! behind its own lock, so requests to different chunks rarely wait for each other; a lock is
//! held only for one chunk's copy.
//!
//! Chunks are shared buffers (`Arc<[u8]>`): a zero-copy read ([`BlockDevice::read_shared`])
//! lends them to the front end, and a write to a chunk that is lent copies it first, so a lent
//! chunk never changes under its reader. Whole-chunk writes can hand over new buffers
//! ([`BlockDevice::write_owned`]) instead of being copied in.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use std::sync::Arc;

use vdk_core::sync;
use vdk_core::{
    check_range, zeroed_buffer, BlockDevice, Capabilities, DiskInfo, Error, ExtentKind, Extents,
    Lend, Piece, Result, SharedBytes,
};

/// Takes a read lock; a lock poisoned by a panic still guards sound data (whole chunks).
fn read_locked<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    sync::read(lock)
}

/// Allocation granularity: 64 KiB, a balance between map size and the waste of small writes.
pub const CHUNK: u64 = CHUNK_BYTES as u64;
const CHUNK_BYTES: usize = 64 << 10;
const SHARDS: usize = 64;

type Chunk = Arc<[u8]>;

/// A sparse disk in RAM. Contents vanish when it is dropped.
#[derive(Debug)]
pub struct MemoryDisk {
    /// Grows (never shrinks) while open: see `grow`.
    size: AtomicU64,
    shards: Vec<RwLock<HashMap<u64, Chunk>>>,
}

/// The part of a request that falls inside one chunk.
struct Span {
    chunk: u64,
    within: usize, // offset inside the chunk
    at: usize,     // offset inside the caller's buffer
    len: usize,
}

fn spans(offset: u64, len: u64) -> impl Iterator<Item = Span> {
    let end = offset + len;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let chunk = pos / CHUNK;
        let within = pos % CHUNK;
        let n = (CHUNK - within).min(end - pos);
        // All three fit in usize: they are below CHUNK or below a buffer's length.
        #[allow(clippy::cast_possible_truncation)]
        let p = Span {
            chunk,
            within: within as usize,
            at: (pos - offset) as usize,
            len: n as usize,
        };
        pos += n;
        Some(p)
    })
}

impl MemoryDisk {
    /// A new all-zero disk of `size` bytes. Allocates nothing until written.
    pub fn new(size: u64) -> MemoryDisk {
        MemoryDisk {
            size: AtomicU64::new(size),
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
        }
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn shard(&self, chunk: u64) -> &RwLock<HashMap<u64, Chunk>> {
        // The remainder is below SHARDS, a usize.
        #[allow(clippy::cast_possible_truncation)]
        let i = (chunk % SHARDS as u64) as usize;
        &self.shards[i]
    }

    fn read_shard(&self, chunk: u64) -> RwLockReadGuard<'_, HashMap<u64, Chunk>> {
        read_locked(self.shard(chunk))
    }

    fn write_shard(&self, chunk: u64) -> RwLockWriteGuard<'_, HashMap<u64, Chunk>> {
        // A panic while a shard was held leaves whole chunks (plain bytes): still sound.
        sync::write(self.shard(chunk))
    }

    /// Bytes of RAM holding data (allocated chunks).
    pub fn allocated_bytes(&self) -> u64 {
        let chunks: usize = self.shards.iter().map(|s| read_locked(s).len()).sum();
        chunks as u64 * CHUNK
    }

    /// Zeroes a range: whole chunks are freed, partial ones zero-filled.
    fn zero_range(&self, offset: u64, len: u64) {
        for p in spans(offset, len) {
            let mut shard = self.write_shard(p.chunk);
            if p.len as u64 == CHUNK {
                shard.remove(&p.chunk);
            } else if let Some(c) = shard.get_mut(&p.chunk) {
                Arc::make_mut(c)[p.within..p.within + p.len].fill(0);
            }
        }
    }
}

impl BlockDevice for MemoryDisk {
    fn info(&self) -> DiskInfo {
        let mut info = DiskInfo::new(self.size());
        info.caps = Capabilities {
            trim: true,
            fast_zero: true,
            extents: true,
            multi_conn: true,
            ..Capabilities::NONE
        };
        info
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size(), offset, buf.len() as u64)?;
        for p in spans(offset, buf.len() as u64) {
            let out = &mut buf[p.at..p.at + p.len];
            let shard = self.read_shard(p.chunk);
            match shard.get(&p.chunk) {
                Some(c) => out.copy_from_slice(&c[p.within..p.within + p.len]),
                None => out.fill(0),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> Result<()> {
        check_range(self.size(), offset, buf.len() as u64)?;
        for p in spans(offset, buf.len() as u64) {
            let data = &buf[p.at..p.at + p.len];
            let mut shard = self.write_shard(p.chunk);
            if let Some(c) = shard.get_mut(&p.chunk) {
                // In place, unless a zero-copy read still holds the chunk: then a copy.
                Arc::make_mut(c)[p.within..p.within + p.len].copy_from_slice(data);
            } else if data.iter().any(|&b| b != 0) {
                // Writing zeroes to a hole changes nothing, so it allocates nothing.
                let mut c = zeroed_buffer(CHUNK_BYTES);
                Arc::make_mut(&mut c)[p.within..p.within + p.len].copy_from_slice(data);
                shard.insert(p.chunk, c);
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        check_range(self.size(), offset, len)?;
        self.zero_range(offset, len);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_trim: bool, _fua: bool) -> Result<()> {
        // RAM has no provisioning to keep, so a hole is as good as allocated zeroes.
        check_range(self.size(), offset, len)?;
        self.zero_range(offset, len);
        Ok(())
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Extents> {
        check_range(self.size(), offset, len)?;
        let mut map = Extents::new(offset);
        if len == 0 {
            return Ok(map);
        }
        let end = offset + len;
        let mut pos = offset;
        for chunk in self.allocated_chunks(offset / CHUNK, (end - 1) / CHUNK) {
            let start = (chunk * CHUNK).max(offset);
            let stop = ((chunk + 1) * CHUNK).min(end);
            map.push(start - pos, ExtentKind::Hole);
            map.push(stop - start, ExtentKind::Data);
            pos = stop;
        }
        map.push(end - pos, ExtentKind::Hole);
        Ok(map)
    }

    fn lend(&self) -> Option<&dyn Lend> {
        Some(self)
    }

    /// Nothing past the old end was ever written (writes are checked against the size), so
    /// it reads as zeroes at once.
    fn grow(&self, new_size: u64) -> Result<()> {
        vdk_core::check_grow(self.size(), new_size, 1)?;
        self.size.fetch_max(new_size, Ordering::AcqRel);
        Ok(())
    }
}

impl Lend for MemoryDisk {
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        self.read_at(buf, offset).map(|()| true) // RAM never waits
    }
    fn try_write_at(&self, buf: &[u8], offset: u64) -> Result<bool> {
        self.write_at(buf, offset, false).map(|()| true)
    }
    fn read_shared(&self, offset: u64, len: usize) -> Result<Option<Vec<Piece>>> {
        check_range(self.size(), offset, len as u64)?;
        let mut pieces_out = Vec::with_capacity(len / CHUNK_BYTES + 2);
        for p in spans(offset, len as u64) {
            let shard = self.read_shard(p.chunk);
            pieces_out.push(match shard.get(&p.chunk) {
                Some(c) => Piece::Data(SharedBytes::new(Arc::clone(c), p.within..p.within + p.len)),
                None => Piece::Zero(p.len),
            });
        }
        Ok(Some(pieces_out))
    }
    fn write_unit(&self) -> Option<usize> {
        Some(CHUNK_BYTES)
    }
    fn write_owned(&self, offset: u64, bufs: Vec<Arc<[u8]>>) -> Result<Vec<Arc<[u8]>>> {
        let len = bufs.len() as u64 * CHUNK;
        check_range(self.size(), offset, len)?;
        if !offset.is_multiple_of(CHUNK) || bufs.iter().any(|b| b.len() != CHUNK_BYTES) {
            return Err(Error::Misaligned {
                offset,
                len,
                block_size: u32::try_from(CHUNK_BYTES).unwrap_or(u32::MAX),
            });
        }
        let mut replaced = Vec::with_capacity(bufs.len());
        for (i, buf) in bufs.into_iter().enumerate() {
            let chunk = offset / CHUNK + i as u64;
            let mut shard = self.write_shard(chunk);
            replaced.extend(shard.insert(chunk, buf));
        }
        Ok(replaced)
    }
}

impl MemoryDisk {
    /// The allocated chunks among `first..=last`, sorted. A short range asks the map chunk by
    /// chunk; a long one scans the allocated chunks, so mapping an empty 1 TiB costs what the
    /// allocated chunks cost, not 16 million lookups.
    fn allocated_chunks(&self, first: u64, last: u64) -> Vec<u64> {
        const PER_CHUNK_LIMIT: u64 = 1024;
        let read =
            |s: &RwLock<HashMap<u64, Chunk>>| read_locked(s).keys().copied().collect::<Vec<_>>();
        let mut chunks: Vec<u64> = if last - first < PER_CHUNK_LIMIT {
            (first..=last)
                .filter(|c| self.read_shard(*c).contains_key(c))
                .collect()
        } else {
            self.shards
                .iter()
                .flat_map(read)
                .filter(|c| (first..=last).contains(c))
                .collect()
        };
        chunks.sort_unstable();
        chunks
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vdk_core::conformance;

    use super::*;

    const TIB: u64 = 1 << 40;

    #[test]
    fn memory_disk_conforms() {
        conformance::run(&|| Arc::new(MemoryDisk::new(conformance::MIN_SIZE)));
    }

    #[test]
    fn empty_terabyte_disk_allocates_nothing() {
        let disk = MemoryDisk::new(TIB);
        let mut buf = [1u8; 4096];
        disk.read_at(&mut buf, TIB - 4096).unwrap();
        assert_eq!(disk.allocated_bytes(), 0);
        assert_eq!(buf, [0u8; 4096]);
    }

    #[test]
    fn trim_of_whole_chunks_frees_them() {
        let disk = MemoryDisk::new(TIB);
        disk.write_at(&[7u8; 3 * CHUNK as usize], 0, false).unwrap();
        disk.trim(0, 2 * CHUNK).unwrap();
        assert_eq!(disk.allocated_bytes(), CHUNK);
    }

    #[test]
    fn writing_zeroes_to_a_hole_allocates_nothing() {
        let disk = MemoryDisk::new(TIB);
        disk.write_at(&[0u8; 8192], 4096, false).unwrap();
        assert_eq!(disk.allocated_bytes(), 0);
    }

    #[test]
    fn shared_read_is_a_snapshot_that_later_writes_do_not_change() {
        let disk = MemoryDisk::new(TIB);
        disk.write_at(&[1u8; 100], 10, false).unwrap();
        let pieces = disk.read_shared(0, 2 * CHUNK as usize).unwrap().unwrap();
        disk.write_at(&[2u8; 100], 10, false).unwrap();
        let Piece::Data(first) = &pieces[0] else {
            panic!("written chunk must be data")
        };
        assert_eq!(&first[10..110], &[1u8; 100][..]);
        assert!(matches!(pieces[1], Piece::Zero(n) if n == CHUNK as usize));
    }

    #[test]
    fn owned_write_installs_buffers_and_returns_the_old_ones() {
        let disk = MemoryDisk::new(TIB);
        disk.write_at(&[1u8; 10], CHUNK, false).unwrap();
        let mut buf = zeroed_buffer(CHUNK as usize);
        Arc::get_mut(&mut buf).unwrap()[5] = 9;
        let replaced = disk.write_owned(CHUNK, vec![buf]).unwrap();
        assert_eq!(replaced.len(), 1);
        let mut b = [0u8; 10];
        disk.read_at(&mut b, CHUNK).unwrap();
        assert_eq!(b, [0, 0, 0, 0, 0, 9, 0, 0, 0, 0]);
    }

    #[test]
    fn misaligned_owned_write_is_refused() {
        let disk = MemoryDisk::new(TIB);
        let r = disk.write_owned(512, vec![zeroed_buffer(CHUNK as usize)]);
        assert!(matches!(r, Err(Error::Misaligned { .. })));
    }

    #[test]
    fn extents_of_empty_terabyte_are_one_hole() {
        let disk = MemoryDisk::new(TIB);
        disk.write_at(&[1], CHUNK, false).unwrap();
        let map = disk.extents(2 * CHUNK, TIB - 2 * CHUNK);
        // The map is built chunk by chunk, but merged into a single run.
        assert_eq!(map.unwrap().runs().len(), 1);
    }
}
