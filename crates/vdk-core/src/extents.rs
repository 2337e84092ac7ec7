//! Allocation maps: which parts of a range hold data, which are holes, which read as zeroes.

/// What a run of bytes is.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum ExtentKind {
    /// Allocated; may hold anything.
    Data,
    /// Not allocated; reads as zeroes.
    Hole,
    /// Allocated, and reads as zeroes.
    Zero,
}

impl ExtentKind {
    /// Whether the run reads as zeroes.
    pub fn reads_zero(self) -> bool {
        self != ExtentKind::Data
    }
}

/// One run of an allocation map.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Extent {
    /// Length in bytes, never zero.
    pub len: u64,
    /// What the run is.
    pub kind: ExtentKind,
}

/// The allocation map of `[offset, offset + len)`: contiguous runs in order, covering the
/// whole range, neighbours of the same kind merged.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Extents {
    offset: u64,
    runs: Vec<Extent>,
}

impl Extents {
    /// An empty map starting at `offset`; grow it with [`Extents::push`].
    pub fn new(offset: u64) -> Extents {
        Extents {
            offset,
            runs: Vec::new(),
        }
    }

    /// `[offset, offset + len)` as one data run (none if `len` is 0).
    pub fn all_data(offset: u64, len: u64) -> Extents {
        let mut e = Extents::new(offset);
        e.push(len, ExtentKind::Data);
        e
    }

    /// Appends a run. A zero-length run is ignored; one of the same kind as the last run
    /// extends it.
    pub fn push(&mut self, len: u64, kind: ExtentKind) {
        if len == 0 {
            return;
        }
        match self.runs.last_mut() {
            Some(last) if last.kind == kind => last.len += len,
            _ => self.runs.push(Extent { len, kind }),
        }
    }

    /// Where the map starts.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Total length covered.
    pub fn len(&self) -> u64 {
        self.runs.iter().map(|r| r.len).sum()
    }

    /// Whether the map covers nothing.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// The runs, in order.
    pub fn runs(&self) -> &[Extent] {
        &self.runs
    }

    /// The runs with their absolute offsets.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Extent)> + '_ {
        let mut at = self.offset;
        self.runs.iter().map(move |r| {
            let start = at;
            at += r.len;
            (start, *r)
        })
    }
}

/// Where the first byte that is not zero is in `[start, end)` of `dev`, or `None` if all of
/// it is unallocated or zeroes. Reads only what the extents call data, a MiB at a time.
pub fn first_data_in(
    dev: &dyn crate::BlockDevice,
    start: u64,
    end: u64,
) -> crate::Result<Option<u64>> {
    const STEP: u64 = 1 << 30;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = start;
    while at < end {
        let len = STEP.min(end - at);
        for (off, run) in dev.extents(at, len)?.iter() {
            if run.kind != ExtentKind::Data {
                continue;
            }
            let end = off + run.len;
            let mut p = off;
            while p < end {
                let n = usize::try_from(end - p).map_or(buf.len(), |n| n.min(buf.len()));
                dev.read_at(&mut buf[..n], p)?;
                if let Some(i) = buf[..n].iter().position(|b| *b != 0) {
                    return Ok(Some(p + i as u64));
                }
                p += n as u64;
            }
        }
        at += len;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_merges_neighbours_of_one_kind() {
        let mut e = Extents::new(100);
        e.push(10, ExtentKind::Hole);
        e.push(5, ExtentKind::Hole);
        e.push(0, ExtentKind::Data);
        e.push(7, ExtentKind::Data);
        assert_eq!(
            e.runs(),
            &[
                Extent {
                    len: 15,
                    kind: ExtentKind::Hole
                },
                Extent {
                    len: 7,
                    kind: ExtentKind::Data
                }
            ]
        );
    }

    #[test]
    fn iter_gives_absolute_offsets() {
        let mut e = Extents::new(100);
        e.push(10, ExtentKind::Hole);
        e.push(7, ExtentKind::Data);
        let offsets: Vec<u64> = e.iter().map(|(o, _)| o).collect();
        assert_eq!(offsets, vec![100, 110]);
        assert_eq!(e.len(), 17);
    }
}
