//! Dirty bitmaps: which parts of a disk were written since a point in time, one bit per
//! `granularity` bytes, for incremental backups. Whoever sees a disk's writes (the daemon's
//! counting layer) marks every bitmap in the disk's [`Bitmaps`]; front ends read them (NBD's
//! `qemu:dirty-bitmap:NAME` context) and backups take and clear them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::sync::{lock, read, write};

/// The granularity a bitmap gets when none is asked for (QEMU's default too).
pub const DEFAULT_GRANULARITY: u64 = 64 << 10;

/// One dirty bitmap.
#[derive(Debug)]
pub struct DirtyBitmap {
    granularity: u64,
    state: Mutex<State>,
    /// Kept in the image ([`BitmapStore`]) when the disk closes.
    persistent: bool,
    /// Found in the image marked in use: a program that had it did not close the image (a
    /// crash), so it may have missed writes. It marks nothing and cannot be used; it can
    /// only be removed.
    inconsistent: bool,
}

#[derive(Debug)]
struct State {
    size: u64,
    words: Vec<u64>,
}

impl State {
    fn bits(&self, granularity: u64) -> u64 {
        self.size.div_ceil(granularity)
    }
    fn get(&self, bit: u64) -> bool {
        self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }
}

fn words_for(size: u64, granularity: u64) -> usize {
    usize::try_from(size.div_ceil(granularity).div_ceil(64)).unwrap_or(usize::MAX)
}

impl DirtyBitmap {
    /// A clean bitmap of a disk of `size` bytes. The granularity is a power of two from 512
    /// bytes to 2 GiB.
    pub fn new(size: u64, granularity: u64) -> Result<DirtyBitmap, String> {
        if !granularity.is_power_of_two() || !(512..=(1 << 31)).contains(&granularity) {
            return Err(format!(
                "granularity {granularity} is not a power of two from 512 to 2 GiB"
            ));
        }
        Ok(DirtyBitmap {
            granularity,
            state: Mutex::new(State {
                size,
                words: vec![0; words_for(size, granularity)],
            }),
            persistent: false,
            inconsistent: false,
        })
    }

    /// A bitmap of a disk of `size` bytes as an image stored it: `bytes` are its bits, bit i
    /// in byte i / 8 at position i % 8 (qcow2's layout); missing bytes are clean. Bits past
    /// the disk's end are dropped.
    pub fn from_stored(size: u64, granularity: u64, bytes: &[u8]) -> Result<DirtyBitmap, String> {
        let b = DirtyBitmap::new(size, granularity)?;
        {
            let mut st = lock(&b.state);
            for (w, chunk) in st.words.iter_mut().zip(bytes.chunks(8)) {
                let mut le = [0u8; 8];
                le[..chunk.len()].copy_from_slice(chunk);
                *w = u64::from_le_bytes(le);
            }
        }
        b.resize(size);
        Ok(b)
    }

    /// The bits in qcow2's layout (as [`from_stored`](Self::from_stored) reads them): one bit
    /// per granule of the disk, rounded up to whole bytes.
    pub fn to_stored(&self) -> Vec<u8> {
        let st = lock(&self.state);
        let bytes = usize::try_from(st.bits(self.granularity).div_ceil(8)).unwrap_or(usize::MAX);
        let mut out: Vec<u8> = st.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        out.truncate(bytes);
        out
    }

    /// The same bitmap, kept in the image (`true`) or in memory only.
    #[must_use]
    pub fn persistent(mut self, yes: bool) -> DirtyBitmap {
        self.persistent = yes;
        self
    }

    /// The same bitmap, marked inconsistent (found in use in the image).
    #[must_use]
    pub fn inconsistent(mut self) -> DirtyBitmap {
        self.inconsistent = true;
        self
    }

    /// Whether the image keeps it.
    pub fn is_persistent(&self) -> bool {
        self.persistent
    }

    /// Whether it was found in use (a crash): unusable, only removable.
    pub fn is_inconsistent(&self) -> bool {
        self.inconsistent
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Marks `[offset, offset + len)` dirty: every bit the range touches.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || self.inconsistent {
            return;
        }
        let mut st = lock(&self.state);
        let bits = st.bits(self.granularity);
        let first = offset / self.granularity;
        let end = offset
            .saturating_add(len)
            .div_ceil(self.granularity)
            .min(bits);
        let mut bit = first;
        while bit < end {
            let word = (bit / 64) as usize;
            let from = bit % 64;
            let to = (end - (bit - from)).min(64);
            let mask = if to - from == 64 {
                u64::MAX
            } else {
                ((1u64 << (to - from)) - 1) << from
            };
            st.words[word] |= mask;
            bit += to - from;
        }
    }

    /// Dirty bytes (whole granules; the last may reach past the disk's end, counted to it).
    pub fn dirty_bytes(&self) -> u64 {
        let st = lock(&self.state);
        let ones: u64 = st.words.iter().map(|w| u64::from(w.count_ones())).sum();
        let mut bytes = ones * self.granularity;
        let bits = st.bits(self.granularity);
        if bits > 0 && st.get(bits - 1) {
            bytes -= bits * self.granularity - st.size;
        }
        bytes
    }

    /// Makes every bit clean.
    pub fn clear(&self) {
        lock(&self.state).words.fill(0);
    }

    /// Every bit, then clean: what a backup copies, while writes go on marking it anew.
    pub fn take(&self) -> Frozen {
        let mut st = lock(&self.state);
        let clean = vec![0; words_for(st.size, self.granularity)];
        let words = std::mem::replace(&mut st.words, clean);
        Frozen {
            granularity: self.granularity,
            size: st.size,
            words,
        }
    }

    /// Marks dirty again what `taken` holds (a backup that failed gives its bits back).
    pub fn merge(&self, taken: &Frozen) {
        let mut st = lock(&self.state);
        for (w, t) in st.words.iter_mut().zip(&taken.words) {
            *w |= t;
        }
    }

    /// The disk grew (or shrank) to `size`: new granules are clean.
    pub fn resize(&self, size: u64) {
        let mut st = lock(&self.state);
        st.size = size;
        let n = words_for(size, self.granularity);
        st.words.resize(n, 0);
        // Bits past the end of a shrunk disk go.
        let bits = st.bits(self.granularity);
        if !bits.is_multiple_of(64) {
            if let Some(last) = st.words.last_mut() {
                *last &= (1u64 << (bits % 64)) - 1;
            }
        }
    }

    /// `[offset, offset + len)` (clipped to the disk) as runs of (length, dirty).
    pub fn runs(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        let st = lock(&self.state);
        runs_of(&st.words, self.granularity, st.size, offset, len)
    }
}

/// A bitmap's bits taken at one moment.
#[derive(Clone, Debug)]
pub struct Frozen {
    granularity: u64,
    size: u64,
    words: Vec<u64>,
}

impl Frozen {
    /// Every granule of a disk of `size` bytes marked.
    pub fn full(size: u64, granularity: u64) -> Frozen {
        let b = DirtyBitmap::new(size, granularity.clamp(512, 1 << 31))
            .unwrap_or_else(|_| unreachable!("a clamped power of two"));
        b.mark(0, size);
        b.take()
    }

    /// Makes the granule that holds byte `offset` clean.
    pub fn unmark(&mut self, offset: u64) {
        let bit = offset / self.granularity;
        if let Some(w) = self.words.get_mut((bit / 64) as usize) {
            *w &= !(1 << (bit % 64));
        }
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Whether the granule that holds byte `offset` is dirty.
    pub fn is_dirty(&self, offset: u64) -> bool {
        let bit = offset / self.granularity;
        self.words
            .get((bit / 64) as usize)
            .is_some_and(|w| w & (1 << (bit % 64)) != 0)
    }

    /// `[offset, offset + len)` (clipped to the disk) as runs of (length, dirty).
    pub fn runs(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        runs_of(&self.words, self.granularity, self.size, offset, len)
    }

    /// The dirty ranges, as (offset, length), each within the disk.
    pub fn dirty(&self) -> Vec<(u64, u64)> {
        let mut at = 0;
        let mut out = Vec::new();
        for (len, dirty) in self.runs(0, self.size) {
            if dirty {
                out.push((at, len));
            }
            at += len;
        }
        out
    }
}

fn runs_of(words: &[u64], granularity: u64, size: u64, offset: u64, len: u64) -> Vec<(u64, bool)> {
    let end = offset.saturating_add(len).min(size);
    let mut out: Vec<(u64, bool)> = Vec::new();
    let mut at = offset;
    while at < end {
        let bit = at / granularity;
        let dirty = words
            .get((bit / 64) as usize)
            .is_some_and(|w| w & (1 << (bit % 64)) != 0);
        let next = ((bit + 1) * granularity).min(end);
        match out.last_mut() {
            Some((l, d)) if *d == dirty => *l += next - at,
            _ => out.push((next - at, dirty)),
        }
        at = next;
    }
    out
}

/// A disk's named bitmaps.
#[derive(Debug, Default)]
pub struct Bitmaps {
    list: RwLock<Vec<(String, Arc<DirtyBitmap>)>>,
    /// How many there are, read without the lock on every write.
    count: AtomicUsize,
}

impl Bitmaps {
    /// Adds a clean bitmap `name`; a name already in use is an error.
    pub fn add(&self, name: &str, bitmap: DirtyBitmap) -> Result<Arc<DirtyBitmap>, String> {
        self.insert(name, Arc::new(bitmap))
    }

    /// Adds `b` as the bitmap `name` (one removed, put back); a name in use is an error.
    pub fn insert(&self, name: &str, b: Arc<DirtyBitmap>) -> Result<Arc<DirtyBitmap>, String> {
        check_name(name)?;
        let mut list = write(&self.list);
        if list.iter().any(|(n, _)| n == name) {
            return Err(format!("the disk already has a bitmap {name:?}"));
        }
        list.push((name.to_owned(), Arc::clone(&b)));
        self.count.store(list.len(), Ordering::Release);
        Ok(b)
    }

    /// Removes the bitmap `name`.
    pub fn remove(&self, name: &str) -> Result<Arc<DirtyBitmap>, String> {
        let mut list = write(&self.list);
        let Some(i) = list.iter().position(|(n, _)| n == name) else {
            return Err(format!("the disk has no bitmap {name:?}"));
        };
        let (_, b) = list.remove(i);
        self.count.store(list.len(), Ordering::Release);
        Ok(b)
    }

    /// The bitmap `name`.
    pub fn get(&self, name: &str) -> Option<Arc<DirtyBitmap>> {
        read(&self.list)
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| Arc::clone(b))
    }

    /// Every bitmap, in the order they were added.
    pub fn all(&self) -> Vec<(String, Arc<DirtyBitmap>)> {
        read(&self.list).clone()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }

    /// `[offset, offset + len)` was written: marks it in every bitmap.
    pub fn mark(&self, offset: u64, len: u64) {
        if self.is_empty() {
            return;
        }
        for (_, b) in read(&self.list).iter() {
            b.mark(offset, len);
        }
    }

    /// The disk's size changed.
    pub fn resize(&self, size: u64) {
        for (_, b) in read(&self.list).iter() {
            b.resize(size);
        }
    }
}

/// Where a disk's image keeps bitmaps (qcow2's bitmaps extension).
pub trait BitmapStore: Send + Sync + std::fmt::Debug {
    /// The bitmaps the image held when it was opened, each with its bits (or marked
    /// inconsistent); those it tracks are now marked in use in the image, so that a crash
    /// leaves them inconsistent.
    fn stored(&self) -> Vec<(String, DirtyBitmap)>;
    /// Makes `bitmaps` (the persistent ones among them) the image's bitmaps, with their bits
    /// now: `in_use` while the disk stays open, not when it closes. An inconsistent one keeps
    /// what the image has of it; one the image had that is not named is removed.
    fn save(&self, bitmaps: &[(String, Arc<DirtyBitmap>)], in_use: bool) -> crate::Result<()>;
}

/// Whether `name` can name a bitmap: 1 to 1023 bytes (qcow2's limit), no control characters.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 1023 || name.chars().any(char::is_control) {
        return Err(format!(
            "invalid bitmap name {name:?}: 1 to 1023 bytes, no control characters"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_whole_granules_and_reports_runs() {
        let b = DirtyBitmap::new(1 << 20, 64 << 10).unwrap();
        assert_eq!(b.runs(0, 1 << 20), vec![(1 << 20, false)]);
        b.mark(65535, 2); // touches granules 0 and 1
        b.mark(10 << 16, 1);
        assert_eq!(
            b.runs(0, 1 << 20),
            vec![
                (128 << 10, true),
                (8 << 16, false),
                (1 << 16, true),
                (5 << 16, false)
            ]
        );
        assert_eq!(b.dirty_bytes(), 3 << 16);
        // Clipped to the request and to the disk.
        assert_eq!(b.runs(100, 1000), vec![(1000, true)]);
        assert_eq!(b.runs((1 << 20) - 10, 100), vec![(10, false)]);
        let taken = b.take();
        assert_eq!(b.dirty_bytes(), 0);
        assert_eq!(taken.dirty(), vec![(0, 128 << 10), (10 << 16, 1 << 16)]);
        assert!(taken.is_dirty(70000) && !taken.is_dirty(200_000));
        let mut t = taken.clone();
        t.unmark(70000);
        assert_eq!(t.dirty(), vec![(0, 64 << 10), (10 << 16, 1 << 16)]);
        assert_eq!(Frozen::full(100_000, 65536).dirty(), vec![(0, 100_000)]);
        b.merge(&taken);
        assert_eq!(b.dirty_bytes(), 3 << 16);
        b.clear();
        assert_eq!(b.dirty_bytes(), 0);
    }

    #[test]
    fn long_ranges_fill_whole_words_and_stop_at_the_end() {
        let b = DirtyBitmap::new(1000 * 512 + 100, 512).unwrap();
        b.mark(512 * 3, 512 * 200);
        assert_eq!(b.dirty_bytes(), 512 * 200);
        b.mark(0, u64::MAX);
        assert_eq!(b.dirty_bytes(), 1000 * 512 + 100);
        b.resize(512 * 10);
        assert_eq!(b.dirty_bytes(), 512 * 10);
        b.resize(512 * 100);
        assert_eq!(b.dirty_bytes(), 512 * 10);
        assert!(DirtyBitmap::new(1, 1000).is_err());
        assert!(DirtyBitmap::new(1, 256).is_err());
    }

    #[test]
    fn stored_layout_is_one_bit_per_granule_lowest_bit_first() {
        let b = DirtyBitmap::new(100 * 512, 512).unwrap();
        b.mark(0, 512);
        b.mark(9 * 512, 1);
        b.mark(99 * 512, 1);
        let raw = b.to_stored();
        assert_eq!(raw.len(), 13);
        assert_eq!((raw[0], raw[1], raw[12]), (0b1, 0b10, 0b1000));
        let back = DirtyBitmap::from_stored(100 * 512, 512, &raw).unwrap();
        assert_eq!(back.runs(0, 100 * 512), b.runs(0, 100 * 512));
        // Bits past the end are dropped.
        let full = DirtyBitmap::from_stored(3 * 512, 512, &[0xff]).unwrap();
        assert_eq!(full.dirty_bytes(), 3 * 512);
        let bad = DirtyBitmap::new(512, 512).unwrap().inconsistent();
        bad.mark(0, 512);
        assert_eq!(bad.dirty_bytes(), 0);
    }

    #[test]
    fn named_bitmaps_are_unique_and_all_marked() {
        let all = Bitmaps::default();
        assert!(all.is_empty());
        let a = all
            .add("a", DirtyBitmap::new(1 << 20, 4096).unwrap())
            .unwrap();
        let b = all
            .add("b", DirtyBitmap::new(1 << 20, 65536).unwrap())
            .unwrap();
        assert!(all.add("a", DirtyBitmap::new(1, 4096).unwrap()).is_err());
        assert!(all.add("", DirtyBitmap::new(1, 4096).unwrap()).is_err());
        all.mark(4096, 1);
        assert_eq!((a.dirty_bytes(), b.dirty_bytes()), (4096, 65536));
        all.remove("a").unwrap();
        assert!(all.remove("a").is_err() && all.get("a").is_none());
        assert_eq!(all.all().len(), 1);
    }
}
