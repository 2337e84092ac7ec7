//! qcow2 metadata: L1 and L2 tables, refcounts and allocation, and writing them back in the
//! order that keeps a crash from corrupting the image (see the module above).

// Casts to usize here are of cluster-bounded values and table indexes, checked by the header
// parser (see the module above): they fit any usize.
#![allow(clippy::cast_possible_truncation)]

use super::*;

impl Qcow2 {
    // ---- tables --------------------------------------------------------------------

    pub(super) fn read_u64s(&self, offset: u64) -> Result<Vec<u64>> {
        let mut raw = vec![0u8; self.cluster_size as usize];
        let n = self.read_some(&mut raw, offset)?;
        raw[n..].fill(0);
        Ok(raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect())
    }

    /// Reads as much as the file has; the rest of `buf` is left as is. Returns bytes read.
    pub(super) fn read_some(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Io(e)),
            }
        }
        Ok(done)
    }

    /// Checks that a table or data cluster at `off` does not overlap the header, the L1
    /// table or the refcount table.
    pub(super) fn check_not_fixed_metadata(&self, m: &Meta, off: u64, what: &str) -> Result<()> {
        let overlaps = |start: u64, len: u64| off < start + len && start < off + self.cluster_size;
        if off == 0
            || overlaps(m.l1_offset, m.l1.len() as u64 * 8)
            || overlaps(m.reftable_offset, m.reftable_clusters * self.cluster_size)
        {
            return Err(corrupt(format!(
                "{what} at {off} overlaps the image's own tables"
            )));
        }
        Ok(())
    }

    /// Loads the L2 table at `off` into the cache.
    pub(super) fn load_l2(&self, m: &mut Meta, off: u64) -> Result<()> {
        if m.l2.contains_key(&off) {
            return Ok(());
        }
        self.check_not_fixed_metadata(m, off, "L2 table")?;
        self.make_room(m, false)?;
        let entries = self.read_u64s(off)?;
        m.l2.insert(
            off,
            Table {
                entries,
                dirty: false,
            },
        );
        Ok(())
    }

    pub(super) fn load_refblock(&self, m: &mut Meta, off: u64) -> Result<()> {
        if m.refblocks.contains_key(&off) {
            return Ok(());
        }
        self.check_not_fixed_metadata(m, off, "refcount block")?;
        self.make_room(m, true)?;
        let mut raw = vec![0u8; self.cluster_size as usize];
        let n = self.read_some(&mut raw, off)?;
        raw[n..].fill(0);
        let entries = refcount::decode(&raw, self.header.refcount_order);
        m.refblocks.insert(
            off,
            Table {
                entries,
                dirty: false,
            },
        );
        Ok(())
    }

    /// Keeps a cache under its bound: drops clean tables, writing dirty metadata back first
    /// if that is all there is.
    pub(super) fn make_room(&self, m: &mut Meta, refblocks: bool) -> Result<()> {
        let len = if refblocks {
            m.refblocks.len()
        } else {
            m.l2.len()
        };
        if len < self.cache_tables {
            return Ok(());
        }
        self.write_back(m)?;
        let cache = if refblocks {
            &mut m.refblocks
        } else {
            &mut m.l2
        };
        cache.retain(|_, t| t.dirty);
        Ok(())
    }

    /// The mapping of guest cluster `gc`, loading its L2 table if needed.
    pub(super) fn lookup(&self, m: &mut Meta, gc: u64) -> Result<Map> {
        let l1i = (gc / self.l2_entries) as usize;
        let l2i = (gc % self.l2_entries) as usize;
        let Some(l1e) = m.l1.get(l1i).copied() else {
            return Err(corrupt("guest cluster beyond the L1 table"));
        };
        let l2off = l1e & OFFSET_MASK;
        if l2off == 0 {
            return Ok(Map::Unallocated);
        }
        self.load_l2(m, l2off)?;
        let t = &m.l2[&l2off];
        if self.header.extended_l2() {
            let e = t.entries[2 * l2i];
            let bitmap = t.entries[2 * l2i + 1];
            if e & COMPRESSED != 0 {
                return self.compressed(e);
            }
            let host = e & OFFSET_MASK;
            // Bitmaps are 32 + 32 bits: the truncations are the format's.
            #[allow(clippy::cast_possible_truncation)]
            let (alloc, zero) = (bitmap as u32, (bitmap >> 32) as u32);
            if alloc != 0 && host == 0 {
                return Err(corrupt("allocated subclusters without a host cluster"));
            }
            if alloc & zero != 0 {
                return Err(corrupt("subclusters both allocated and zero"));
            }
            let owned = e & COPIED != 0;
            // Uniform clusters map as plain ones (writes in place, zero runs, holes); mixed
            // ones subcluster by subcluster.
            return Ok(match (alloc, zero) {
                (u32::MAX, _) => Map::Data { host, owned },
                (0, u32::MAX) => Map::Zero {
                    host: if owned { host } else { 0 },
                },
                (0, 0) if host == 0 => Map::Unallocated,
                _ => Map::Sub {
                    host,
                    alloc,
                    zero,
                    owned,
                },
            });
        }
        let e = t.entries[l2i];
        if e & COMPRESSED != 0 {
            return self.compressed(e);
        }
        let host = e & OFFSET_MASK;
        if self.header.version >= 3 && e & ZERO != 0 {
            // A preallocated zero cluster is reused only if it is ours alone.
            let host = if e & COPIED != 0 { host } else { 0 };
            return Ok(Map::Zero { host });
        }
        if host == 0 {
            return Ok(Map::Unallocated);
        }
        if !host.is_multiple_of(self.cluster_size) {
            return Err(corrupt(format!(
                "data cluster at {host} is not cluster-aligned"
            )));
        }
        Ok(Map::Data {
            host,
            owned: e & COPIED != 0,
        })
    }

    pub(super) fn compressed(&self, e: u64) -> Result<Map> {
        let x = 62 - (self.cluster_bits - 8);
        let offset = e & ((1u64 << x) - 1);
        let sectors = ((e & !COMPRESSED & !COPIED) >> x) + 1;
        let len = sectors * 512 - (offset & 511);
        if len > 2 * self.cluster_size + 512 {
            return Err(corrupt("compressed cluster larger than a cluster"));
        }
        Ok(Map::Compressed { offset, len })
    }

    // ---- refcounts and allocation ------------------------------------------------------

    pub(super) fn refcount(&self, m: &mut Meta, cluster: u64) -> Result<u64> {
        let ri = (cluster / self.rb_entries) as usize;
        let Some(rbe) = m.reftable.get(ri).copied() else {
            return Ok(0);
        };
        let rb = rbe & OFFSET_MASK;
        if rb == 0 {
            return Ok(0);
        }
        self.load_refblock(m, rb)?;
        Ok(m.refblocks[&rb].entries[(cluster % self.rb_entries) as usize])
    }

    pub(super) fn set_refcount(&self, m: &mut Meta, cluster: u64, value: u64) -> Result<()> {
        if value > refcount::max(self.header.refcount_order) {
            return Err(corrupt("refcount overflow"));
        }
        let ri = (cluster / self.rb_entries) as usize;
        if ri >= m.reftable.len() {
            return Err(Error::NoSpace);
        }
        let mut rb = m.reftable[ri] & OFFSET_MASK;
        if rb == 0 {
            // No block for this range: every cluster in it is free. The new block goes in
            // the range's first cluster (or the second, if the first is the one being
            // counted), so that it counts itself.
            let first = ri as u64 * self.rb_entries;
            let home = if first == cluster { first + 1 } else { first };
            rb = home * self.cluster_size;
            let mut entries = vec![0u64; self.rb_entries as usize];
            entries[(home % self.rb_entries) as usize] = 1;
            m.refblocks.insert(
                rb,
                Table {
                    entries,
                    dirty: true,
                },
            );
            m.metadata.insert(rb);
            m.reftable[ri] = rb;
            m.reftable_dirty.insert(ri);
            m.end_cluster = m.end_cluster.max(home + 1);
        }
        self.load_refblock(m, rb)?;
        let t = m
            .refblocks
            .get_mut(&rb)
            .ok_or_else(|| corrupt("refcount block vanished"))?;
        t.entries[(cluster % self.rb_entries) as usize] = value;
        t.dirty = true;
        Ok(())
    }

    /// Allocates one host cluster (refcount 1). Returns its offset and whether it lies past
    /// the end of the file (so reads as zeroes without being written).
    pub(super) fn alloc(&self, m: &mut Meta) -> Result<(u64, bool)> {
        let limit = m.reftable.len() as u64 * self.rb_entries;
        let mut c = m.free_hint.max(1);
        loop {
            if c >= self.max_clusters {
                warn!(
                    image = %self.path.display(),
                    max_bytes = self.max_clusters * self.cluster_size,
                    "image is full: the write fails with ENOSPC, nothing written before is touched"
                );
                return Err(Error::NoSpace);
            }
            if c >= limit {
                return Err(Error::NoSpace);
            }
            if self.refcount(m, c)? == 0 {
                let fresh = c >= m.end_cluster;
                self.set_refcount(m, c, 1)?;
                m.free_hint = c + 1;
                m.end_cluster = m.end_cluster.max(c + 1);
                return Ok((c * self.cluster_size, fresh));
            }
            c += 1;
        }
    }

    /// Reserves `n` contiguous clusters past everything (refcount 1), with the refcount
    /// blocks their ranges lack placed right after them. Returns the first cluster.
    pub(super) fn reserve_run(&self, m: &mut Meta, n: u64) -> Result<u64> {
        let rb = self.rb_entries;
        let start = m.end_cluster;
        let mut blocks = 0u64;
        let ranges = loop {
            let end = start + n + blocks;
            let last = (end - 1) / rb;
            if last as usize >= m.reftable.len() {
                return Err(Error::NoSpace);
            }
            let r: Vec<u64> = (start / rb..=last)
                .filter(|ri| m.reftable[*ri as usize] & OFFSET_MASK == 0)
                .collect();
            if r.len() as u64 == blocks {
                break r;
            }
            blocks = r.len() as u64;
        };
        for (i, ri) in ranges.iter().enumerate() {
            let at = (start + n + i as u64) * self.cluster_size;
            let entries = vec![0u64; rb as usize];
            m.refblocks.insert(
                at,
                Table {
                    entries,
                    dirty: true,
                },
            );
            m.metadata.insert(at);
            m.reftable[*ri as usize] = at;
            m.reftable_dirty.insert(*ri as usize);
        }
        for c in start..start + n + blocks {
            self.set_refcount(m, c, 1)?;
        }
        m.end_cluster = start + n + blocks;
        Ok(start)
    }

    /// Releases one reference to each host cluster in `[offset, offset + len)`, after the
    /// next metadata write-back.
    pub(super) fn release(&self, m: &mut Meta, offset: u64, len: u64) {
        let first = offset / self.cluster_size;
        let last = (offset + len.max(1) - 1) / self.cluster_size;
        m.pending_free.extend(first..=last);
    }

    /// Grows the refcount table to cover `need` clusters: a new table and the refcount
    /// blocks that count it go past the end of the file, are written and synced, then the
    /// header points at the new table, then the old one is freed.
    pub(super) fn grow_reftable(&self, m: &mut Meta, need: u64) -> Result<()> {
        let cs = self.cluster_size;
        let entries = need
            .div_ceil(self.rb_entries)
            .max(m.reftable.len() as u64 + 1);
        let table_clusters = (entries * 8).div_ceil(cs);
        if table_clusters * cs > header::MAX_REFTABLE_BYTES {
            return Err(Error::TooLarge {
                len: table_clusters * cs,
                max: header::MAX_REFTABLE_BYTES,
            });
        }
        let entries = table_clusters * cs / 8;
        let start = m.end_cluster;
        let old_len = m.reftable.len();
        // Blocks needed for ranges that have none, among [start, start + table + blocks).
        let mut blocks = 0u64;
        let missing = |blocks: u64, m: &Meta| -> Vec<u64> {
            let end = start + table_clusters + blocks;
            (start / self.rb_entries..=(end - 1) / self.rb_entries)
                .filter(|ri| {
                    m.reftable
                        .get(*ri as usize)
                        .is_none_or(|e| e & OFFSET_MASK == 0)
                })
                .collect()
        };
        let ranges = loop {
            let r = missing(blocks, m);
            if r.len() as u64 == blocks {
                break r;
            }
            blocks = r.len() as u64;
        };
        let mut table = m.reftable.clone();
        table.resize(entries as usize, 0);
        let block_start = start + table_clusters;
        let mut new_blocks: HashMap<u64, Vec<u64>> = HashMap::new();
        for (i, ri) in ranges.iter().enumerate() {
            let at = (block_start + i as u64) * cs;
            table[*ri as usize] = at;
            new_blocks.insert(*ri, vec![0; self.rb_entries as usize]);
        }
        for c in start..block_start + blocks {
            let ri = c / self.rb_entries;
            if let Some(b) = new_blocks.get_mut(&ri) {
                b[(c % self.rb_entries) as usize] = 1;
            } else {
                self.set_refcount(m, c, 1)?;
            }
        }
        // Existing blocks that changed, then the new blocks, then the new table.
        self.write_refblocks(m)?;
        for (ri, counts) in &new_blocks {
            let raw = refcount::encode(counts, self.header.refcount_order);
            self.io(self.file.write_all_at(&raw, table[*ri as usize]))?;
        }
        let raw: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.io(self.file.write_all_at(&raw, start * cs))?;
        self.io(self.file.sync_data())?;
        // The header switch: refcount_table_offset (48..56) and clusters (56..60).
        let mut h = Vec::with_capacity(12);
        h.extend_from_slice(&(start * cs).to_be_bytes());
        h.extend_from_slice(
            &u32::try_from(table_clusters)
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        self.io(self.file.write_all_at(&h, 48))?;
        self.io(self.file.sync_data())?;
        let old_offset = m.reftable_offset;
        let old_clusters = (old_len as u64 * 8).div_ceil(cs);
        m.reftable = table;
        for ri in &ranges {
            m.metadata.insert(m.reftable[*ri as usize]);
        }
        m.end_cluster = block_start + blocks;
        m.reftable_offset = start * cs;
        m.reftable_clusters = table_clusters;
        // The old table's clusters are free now.
        for c in 0..old_clusters {
            let cl = old_offset / cs + c;
            self.set_refcount(m, cl, 0)?;
        }
        self.write_refblocks(m)?;
        self.io(self.file.sync_data())?;
        m.free_hint = 1;
        debug!(image = %self.path.display(), entries, "refcount table grown");
        Ok(())
    }

    // ---- write-back --------------------------------------------------------------------

    pub(super) fn write_refblocks(&self, m: &mut Meta) -> Result<()> {
        for (off, t) in m.refblocks.iter_mut().filter(|(_, t)| t.dirty) {
            let raw = refcount::encode(&t.entries, self.header.refcount_order);
            self.io(self.file.write_all_at(&raw, *off))?;
            t.dirty = false;
        }
        for ri in std::mem::take(&mut m.reftable_dirty) {
            let at = m.reftable_offset + ri as u64 * 8;
            self.io(self.file.write_all_at(&m.reftable[ri].to_be_bytes(), at))?;
        }
        Ok(())
    }

    /// Writes every dirty table in dependency order (module docs), then applies the frees
    /// that became safe.
    pub(super) fn write_back(&self, m: &mut Meta) -> Result<()> {
        let refs_dirty = !m.reftable_dirty.is_empty() || m.refblocks.values().any(|t| t.dirty);
        let maps_dirty = !m.l1_dirty.is_empty() || m.l2.values().any(|t| t.dirty);
        if refs_dirty {
            self.write_refblocks(m)?;
            self.io(self.file.sync_data())?;
        }
        if maps_dirty {
            for (off, t) in m.l2.iter_mut().filter(|(_, t)| t.dirty) {
                let raw: Vec<u8> = t.entries.iter().flat_map(|e| e.to_be_bytes()).collect();
                self.io(self.file.write_all_at(&raw, *off))?;
                t.dirty = false;
            }
            for i in std::mem::take(&mut m.l1_dirty) {
                let at = m.l1_offset + i as u64 * 8;
                self.io(self.file.write_all_at(&m.l1[i].to_be_bytes(), at))?;
            }
            self.io(self.file.sync_data())?;
        }
        let frees = std::mem::take(&mut m.pending_free);
        if !frees.is_empty() {
            for c in frees {
                let n = self.refcount(m, c)?;
                if n == 0 {
                    warn!(image = %self.path.display(), cluster = c, "freeing a cluster twice");
                    continue;
                }
                self.set_refcount(m, c, n - 1)?;
                if n == 1 {
                    m.free_hint = m.free_hint.min(c);
                    // Give the space back; a cluster reused later is written whole.
                    let _ = vdk_core::sys::punch_hole(
                        &self.file,
                        c * self.cluster_size,
                        self.cluster_size,
                    );
                }
            }
            self.write_refblocks(m)?;
            self.io(self.file.sync_data())?;
        }
        Ok(())
    }
}
