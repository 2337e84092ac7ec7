//! The qcow2 data path: guest reads and writes mapped to host clusters (allocated, zeroed,
//! compressed, or in the backing file), zero writes and trims, extents.

// Casts to usize here are of cluster-bounded values and table indexes, checked by the header
// parser (see the module above): they fit any usize.
#![allow(clippy::cast_possible_truncation)]

use super::*;

impl Qcow2 {
    // ---- reading -----------------------------------------------------------------------

    pub(super) fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let avail = b.info().size.saturating_sub(offset).min(buf.len() as u64);
        // avail <= buf.len().
        let n = usize::try_from(avail).unwrap_or(buf.len());
        if n > 0 {
            b.read_at(&mut buf[..n], offset)?;
        }
        buf[n..].fill(0);
        Ok(())
    }

    /// Whether the backing file has nothing (so zeroes) for guest cluster `gc`.
    pub(super) fn backing_empty(&self, gc: u64) -> bool {
        self.backing
            .as_ref()
            .is_none_or(|b| b.info().size <= gc * self.cluster_size)
    }

    pub(super) fn decompress(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut input = vec![0u8; usize::try_from(len).unwrap_or(0)];
        let n = self.read_some(&mut input, offset)?;
        input.truncate(n);
        let mut out = vec![0u8; self.cluster_size as usize];
        compress::decompress(self.header.compression, &input, &mut out).map_err(corrupt)?;
        Ok(out)
    }

    /// Reads guest data (never metadata) from host offset `host`, decrypted for an encrypted
    /// image; returns the bytes the file had (a short read at its end).
    pub(super) fn read_data(&self, buf: &mut [u8], host: u64) -> Result<usize> {
        let n = self.read_some(buf, host)?;
        if let Some(c) = &self.crypto {
            // Whole sectors only: requests to an encrypted image are 512-byte aligned.
            c.decrypt(&mut buf[..n - n % 512], host);
        }
        Ok(n)
    }

    /// Writes guest data at host offset `host`, encrypted for an encrypted image.
    pub(super) fn write_data(&self, data: &[u8], host: u64) -> Result<()> {
        match &self.crypto {
            None => self.io(self.file.write_all_at(data, host)),
            Some(c) => {
                let mut sealed = data.to_vec();
                c.encrypt(&mut sealed, host);
                self.io(self.file.write_all_at(&sealed, host))
            }
        }
    }

    /// Whether a data request may go on: an encrypted image must have been given its key,
    /// and its requests must be aligned (its sectors are encrypted whole).
    fn data_access(&self, offset: u64, len: u64) -> Result<()> {
        if self.keyless {
            return Err(vdk_core::Error::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: encrypted, opened without its key: its data cannot be read or written",
                    self.path.display()
                ),
            )));
        }
        if self.crypto.is_some() && !(offset.is_multiple_of(512) && len.is_multiple_of(512)) {
            return Err(vdk_core::Error::Misaligned {
                offset,
                len,
                block_size: 512,
            });
        }
        Ok(())
    }

    /// Fills `buf` with guest bytes from `guest` on, all inside one cluster mapped by `map`.
    pub(super) fn read_mapped(&self, map: Map, buf: &mut [u8], guest: u64) -> Result<()> {
        let in_cl = guest & (self.cluster_size - 1);
        match map {
            Map::Unallocated => self.read_backing(buf, guest),
            Map::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            Map::Data { host, .. } => {
                let n = self.read_data(buf, host + in_cl)?;
                buf[n..].fill(0);
                Ok(())
            }
            Map::Compressed { .. } if self.crypto.is_some() => {
                Err(corrupt("a compressed cluster in an encrypted image"))
            }
            Map::Compressed { offset, len } => {
                let data = self.decompress(offset, len)?;
                let at = in_cl as usize;
                buf.copy_from_slice(&data[at..at + buf.len()]);
                Ok(())
            }
            Map::Sub {
                host, alloc, zero, ..
            } => {
                let sub = self.cluster_size / 32;
                let mut done = 0usize;
                while done < buf.len() {
                    let at = in_cl + done as u64;
                    let i = at / sub;
                    let n = ((i + 1) * sub - at).min((buf.len() - done) as u64) as usize;
                    let part = &mut buf[done..done + n];
                    if alloc & (1 << i) != 0 {
                        let got = self.read_data(part, host + at)?;
                        part[got..].fill(0);
                    } else if zero & (1 << i) != 0 {
                        part.fill(0);
                    } else {
                        self.read_backing(part, guest + done as u64)?;
                    }
                    done += n;
                }
                Ok(())
            }
        }
    }

    /// Calls `f` for each piece of `[offset, offset + len)` that lies in one cluster, with the
    /// guest cluster, the offset in it, and the piece's position in the request.
    pub(super) fn pieces(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, u64, usize, usize) -> Result<()>,
    ) -> Result<()> {
        crate::pieces(offset, len, self.cluster_size, |g, at, n| {
            f(g >> self.cluster_bits, g & (self.cluster_size - 1), at, n)
        })
    }

    // ---- writing -----------------------------------------------------------------------

    /// The L2 table for guest cluster `gc`, writable: allocated (empty) if there is none, and
    /// copied if it is shared with an internal snapshot (its L1 entry lacks COPIED, its
    /// refcount is above 1). The copy refers to the same clusters, which the snapshot
    /// creation counted once per table already; the shared table loses this image's reference
    /// once the copy is written and mapped (write-back order), so the snapshot reads as it did.
    pub(super) fn ensure_l2(&self, m: &mut Meta, gc: u64) -> Result<u64> {
        let l1i = (gc / self.l2_entries) as usize;
        let l1e =
            m.l1.get(l1i)
                .copied()
                .ok_or_else(|| corrupt("guest cluster beyond the L1 table"))?;
        let off = l1e & OFFSET_MASK;
        let shared = if off == 0 {
            None
        } else {
            self.load_l2(m, off)?;
            if l1e & COPIED != 0 {
                return Ok(off);
            }
            // Taken before make_room, which may evict the table from the cache.
            let t = m.l2.get(&off).ok_or_else(|| corrupt("L2 table vanished"))?;
            Some(t.entries.clone())
        };
        self.make_room(m, false)?;
        let (host, _) = self.alloc(m)?;
        let width = if self.header.extended_l2() { 2 } else { 1 };
        let copied = shared.is_some();
        let entries = shared.unwrap_or_else(|| vec![0; (self.l2_entries * width) as usize]);
        if copied {
            debug!(
                table = off,
                copy = host,
                "L2 table shared with a snapshot: copied"
            );
            self.release(m, off, self.cluster_size);
        }
        m.l2.insert(
            host,
            Table {
                entries,
                dirty: true,
            },
        );
        m.metadata.insert(host);
        m.l1[l1i] = host | COPIED;
        m.l1_dirty.insert(l1i);
        Ok(host)
    }

    /// Sets the L2 entry of `gc` (its table is `l2off`), releasing what the old entry held
    /// unless it is the same host cluster.
    pub(super) fn set_entry(&self, m: &mut Meta, l2off: u64, gc: u64, entry: u64) -> Result<()> {
        self.load_l2(m, l2off)?;
        let t =
            m.l2.get_mut(&l2off)
                .ok_or_else(|| corrupt("L2 table vanished"))?;
        let i = (gc % self.l2_entries) as usize;
        // What the entry held is read from the table itself: a zero cluster shared with a
        // snapshot maps as one with no host to reuse, yet holds a reference to give back.
        let prev = if self.header.extended_l2() {
            // Extended L2: whole clusters in the bitmap. A host cluster is all allocated, a
            // zero one all zero (its host kept if preallocated), none: unallocated.
            let host = entry & OFFSET_MASK;
            let (word, bitmap) = if entry & ZERO != 0 {
                (entry & !ZERO, u64::from(u32::MAX) << 32)
            } else if host != 0 {
                (entry, u64::from(u32::MAX))
            } else {
                (entry, 0)
            };
            t.entries[2 * i + 1] = bitmap;
            std::mem::replace(&mut t.entries[2 * i], word)
        } else {
            std::mem::replace(&mut t.entries[i], entry)
        };
        t.dirty = true;
        if prev & COMPRESSED != 0 {
            if let Map::Compressed { offset, len } = self.compressed(prev)? {
                self.release(m, offset, len);
            }
        } else {
            let host = prev & OFFSET_MASK;
            if host != 0 && host != entry & OFFSET_MASK {
                self.release(m, host, self.cluster_size);
            }
        }
        Ok(())
    }

    /// Waits until no request is allocating guest cluster `gc`, then returns its mapping.
    pub(super) fn settled<'a>(
        &'a self,
        mut m: MutexGuard<'a, Meta>,
        gc: u64,
    ) -> Result<(MutexGuard<'a, Meta>, Map)> {
        while m.allocating.contains(&gc) {
            m = sync::wait(&self.allocated, m);
        }
        let map = self.lookup(&mut m, gc)?;
        Ok((m, map))
    }

    /// Writes `data` at `in_cl` in guest cluster `gc`.
    pub(super) fn write_piece(&self, gc: u64, in_cl: u64, data: &[u8]) -> Result<()> {
        let (mut m, map) = self.settled(lock(&self.meta), gc)?;
        if let Map::Data { host, owned: true } = map {
            if m.metadata.contains(&host) {
                return Err(corrupt(format!("data cluster at {host} is also a table")));
            }
            self.check_not_fixed_metadata(&m, host, "data cluster")?;
            drop(m);
            return self.write_data(data, host + in_cl);
        }
        // A new cluster (or a preallocated zero one): reserve it, fill it outside the lock,
        // then map it.
        m.allocating.insert(gc);
        let reserved = self.ensure_l2(&mut m, gc).and_then(|l2| match map {
            Map::Zero { host } if host != 0 => Ok((l2, (host, false))),
            _ => Ok((l2, self.alloc(&mut m)?)),
        });
        drop(m);
        let written = match &reserved {
            Ok((_, (host, fresh))) => self.fill_new_cluster(gc, in_cl, data, map, *host, *fresh),
            Err(_) => Ok(()),
        };
        let mut m = lock(&self.meta);
        m.allocating.remove(&gc);
        self.allocated.notify_all();
        let (l2off, (host, _)) = reserved?;
        if let Err(e) = written {
            // A new cluster that was never mapped: give it back.
            if !matches!(map, Map::Zero { host: h } if h == host) {
                self.release(&mut m, host, self.cluster_size);
            }
            return Err(e);
        }
        self.set_entry(&mut m, l2off, gc, host | COPIED)?;
        // Extended L2: subclusters that read as zeroes by their bits and that this write did
        // not touch keep their bits (the new cluster holds zeroes there too).
        if self.header.extended_l2() && !data.is_empty() {
            let sub = self.cluster_size / 32;
            let (first, last) = (in_cl / sub, (in_cl + data.len() as u64 - 1) / sub);
            let touched =
                u32::try_from(((1u64 << (last - first + 1)) - 1) << first).unwrap_or(u32::MAX);
            let zero = match map {
                Map::Sub { zero, .. } => zero,
                Map::Zero { .. } => u32::MAX,
                _ => 0,
            } & !touched;
            if zero != 0 {
                let t =
                    m.l2.get_mut(&l2off)
                        .ok_or_else(|| corrupt("L2 table vanished"))?;
                let i = 2 * (gc % self.l2_entries) as usize + 1;
                t.entries[i] = u64::from(!zero) | (u64::from(zero) << 32);
                t.dirty = true;
            }
        }
        Ok(())
    }

    /// Writes a new host cluster: the guest's bytes, and around them what the cluster held
    /// before (backing data, decompressed data, a shared cluster's data, or zeroes).
    pub(super) fn fill_new_cluster(
        &self,
        gc: u64,
        in_cl: u64,
        data: &[u8],
        old: Map,
        host: u64,
        fresh: bool,
    ) -> Result<()> {
        let cs = self.cluster_size;
        if in_cl == 0 && data.len() as u64 == cs {
            return self.write_data(data, host);
        }
        let zero_before = match old {
            Map::Zero { .. } => true,
            Map::Unallocated => self.backing_empty(gc),
            _ => false,
        };
        // (Not for an encrypted image: a cluster's zeroes must be written encrypted.)
        if zero_before && fresh && self.crypto.is_none() {
            // Past the end of the file: the rest of the cluster already reads as zeroes.
            self.io(self.file.write_all_at(data, host + in_cl))?;
            // Make the file cover the whole cluster, so that readers (qemu among them) see
            // the cluster's zeroes rather than the end of the file. A write, not set_len:
            // writes only ever extend a file, while a set_len racing with another
            // allocation could cut that one's data off.
            if in_cl + data.len() as u64 != cs {
                self.io(self.file.write_all_at(&[0], host + cs - 1))?;
            }
            return Ok(());
        }
        let mut cluster = vec![0u8; cs as usize];
        if !zero_before {
            self.read_mapped(old, &mut cluster, gc * cs)?;
        }
        let at = in_cl as usize;
        cluster[at..at + data.len()].copy_from_slice(data);
        self.write_data(&cluster, host)
    }

    /// Makes whole guest cluster `gc` read as zeroes.
    pub(super) fn zero_cluster(&self, gc: u64, may_trim: bool) -> Result<()> {
        let (mut m, map) = self.settled(lock(&self.meta), gc)?;
        let no_backing = self.backing_empty(gc);
        let keep = match map {
            Map::Data { host, owned: true } | Map::Zero { host } if !may_trim && host != 0 => {
                Some(host)
            }
            _ => None,
        };
        let entry = match (self.header.version >= 3, keep) {
            (true, Some(host)) => host | COPIED | ZERO,
            (true, None) if no_backing => 0,
            (true, None) => ZERO,
            (false, _) if no_backing && keep.is_none() => 0,
            (false, _) => {
                // Version 2 has no zero flag: write the zeroes.
                drop(m);
                return self.write_piece(gc, 0, &vec![0u8; self.cluster_size as usize]);
            }
        };
        if entry == 0 && map == Map::Unallocated {
            return Ok(());
        }
        if entry == ZERO && map == (Map::Zero { host: 0 }) {
            return Ok(());
        }
        let l2 = self.ensure_l2(&mut m, gc)?;
        self.set_entry(&mut m, l2, gc, entry)?;
        if keep.is_none() && entry == 0 {
            debug!(cluster = gc, "cluster discarded");
        }
        Ok(())
    }

    /// Extended L2: zeroes `[in_cl, in_cl + n)` of guest cluster `gc` by the zero bits of
    /// the whole subclusters in it (the ends that cover part of a subcluster are written as
    /// zeroes first). False: nothing done, the range is to be written as zeroes (a standard
    /// image, a compressed cluster, or no whole subcluster in the range).
    fn zero_by_subclusters(&self, gc: u64, in_cl: u64, n: u64) -> Result<bool> {
        if !self.header.extended_l2() {
            return Ok(false);
        }
        let sub = self.cluster_size / 32;
        let (s0, s1) = (in_cl.div_ceil(sub), (in_cl + n) / sub);
        if s1 <= s0 {
            return Ok(false);
        }
        if matches!(
            self.lookup(&mut lock(&self.meta), gc)?,
            Map::Compressed { .. }
        ) {
            return Ok(false);
        }
        let (head, tail) = (s0 * sub - in_cl, in_cl + n - s1 * sub);
        if head > 0 {
            self.write_piece(gc, in_cl, &vec![0u8; head as usize])?;
        }
        if tail > 0 {
            self.write_piece(gc, s1 * sub, &vec![0u8; tail as usize])?;
        }
        // Bits s0..s1 (at most all 32).
        let mask = u32::try_from(((1u64 << (s1 - s0)) - 1) << s0).unwrap_or(u32::MAX);
        let (mut m, map) = self.settled(lock(&self.meta), gc)?;
        if matches!(map, Map::Compressed { .. }) {
            drop(m);
            self.write_piece(gc, s0 * sub, &vec![0u8; ((s1 - s0) * sub) as usize])?;
            return Ok(true);
        }
        let l2 = self.ensure_l2(&mut m, gc)?;
        let t =
            m.l2.get_mut(&l2)
                .ok_or_else(|| corrupt("L2 table vanished"))?;
        let i = 2 * (gc % self.l2_entries) as usize + 1;
        let (alloc, zero) = (t.entries[i] & u64::from(u32::MAX), t.entries[i] >> 32);
        let (alloc, zero) = (alloc & !u64::from(mask), zero | u64::from(mask));
        t.entries[i] = alloc | (zero << 32);
        t.dirty = true;
        Ok(true)
    }

    /// Reads from `buf[at..]` on: maps up to [`BATCH`] clusters under one lock, then reads
    /// runs of clusters that lie end to end in the file with one call each. Returns the
    /// bytes done.
    pub(super) fn read_batch(&self, buf: &mut [u8], offset: u64, at: usize) -> Result<usize> {
        let cs = self.cluster_size;
        let mut maps = Vec::new();
        {
            let mut m = lock(&self.meta);
            let mut p = at;
            while p < buf.len() && maps.len() < BATCH {
                let g = offset + p as u64;
                let n = ((cs - (g & (cs - 1))) as usize).min(buf.len() - p);
                maps.push((p, n, self.lookup(&mut m, g >> self.cluster_bits)?));
                p += n;
            }
        }
        let mut i = 0;
        while i < maps.len() {
            let (p, n, map) = maps[i];
            let g = offset + p as u64;
            let Map::Data { host, .. } = map else {
                self.read_mapped(map, &mut buf[p..p + n], g)?;
                i += 1;
                continue;
            };
            let start = host + (g & (cs - 1));
            let mut len = n;
            let mut j = i + 1;
            while let Some(&(_, n2, Map::Data { host: h2, .. })) = maps.get(j) {
                if h2 != start + len as u64 {
                    break;
                }
                len += n2;
                j += 1;
            }
            let got = self.read_data(&mut buf[p..p + len], start)?;
            buf[p + got..p + len].fill(0);
            i = j;
        }
        Ok(maps.iter().map(|(_, n, _)| n).sum())
    }

    /// Writes from `buf[at..]` on, as far as it can in one batch: a run of owned clusters
    /// that lie end to end in the file (one write), or a run of whole clusters that need new
    /// host clusters (allocated under one lock, written with one call per contiguous run).
    /// Returns the bytes done, 0 if the first cluster needs the general path.
    pub(super) fn write_batch(&self, buf: &[u8], offset: u64, at: usize) -> Result<usize> {
        let cs = self.cluster_size;
        let mut m = lock(&self.meta);
        let piece = |p: usize| {
            let g = offset + p as u64;
            let in_cl = g & (cs - 1);
            (
                g >> self.cluster_bits,
                in_cl,
                ((cs - in_cl) as usize).min(buf.len() - p),
            )
        };
        // In place.
        let mut p = at;
        let mut start = None;
        while p < buf.len() && p - at < BATCH * cs as usize {
            let (gc, in_cl, n) = piece(p);
            if m.allocating.contains(&gc) {
                break;
            }
            let Map::Data { host, owned: true } = self.lookup(&mut m, gc)? else {
                break;
            };
            if m.metadata.contains(&host)
                || self
                    .check_not_fixed_metadata(&m, host, "data cluster")
                    .is_err()
            {
                break;
            }
            let here = host + in_cl;
            match start {
                None => start = Some(here),
                Some(s) if s + (p - at) as u64 == here => {}
                Some(_) => break,
            }
            p += n;
        }
        if let Some(start) = start {
            drop(m);
            self.write_data(&buf[at..p], start)?;
            return Ok(p - at);
        }
        // Whole new clusters.
        let mut allocs: Vec<(u64, u64, Map, u64, usize)> = Vec::new();
        let mut p = at;
        let mut stopped = None;
        while p < buf.len() && allocs.len() < BATCH {
            let (gc, in_cl, n) = piece(p);
            if in_cl != 0 || n as u64 != cs || m.allocating.contains(&gc) {
                break;
            }
            let map = self.lookup(&mut m, gc)?;
            if matches!(map, Map::Data { owned: true, .. } | Map::Sub { .. }) {
                break;
            }
            let reserved = self.ensure_l2(&mut m, gc).and_then(|l2| match map {
                Map::Zero { host } if host != 0 => Ok((l2, host)),
                _ => Ok((l2, self.alloc(&mut m)?.0)),
            });
            match reserved {
                Ok((l2, host)) => {
                    m.allocating.insert(gc);
                    allocs.push((gc, host, map, l2, p));
                    p += n;
                }
                Err(e) => {
                    stopped = Some(e);
                    break;
                }
            }
        }
        if allocs.is_empty() {
            return stopped.map_or(Ok(0), Err);
        }
        drop(m);
        let mut written = Ok(());
        let mut i = 0;
        while i < allocs.len() && written.is_ok() {
            let mut j = i + 1;
            while j < allocs.len() && allocs[j].1 == allocs[j - 1].1 + cs {
                j += 1;
            }
            let (from, to) = (allocs[i].4, allocs[j - 1].4 + cs as usize);
            written = self.write_data(&buf[from..to], allocs[i].1);
            i = j;
        }
        let mut m = lock(&self.meta);
        let mut mapped = Ok(());
        for (gc, host, old, l2, _) in &allocs {
            m.allocating.remove(gc);
            if written.is_ok() && mapped.is_ok() {
                mapped = self.set_entry(&mut m, *l2, *gc, host | COPIED);
            } else if !matches!(old, Map::Zero { host: h } if h == host) {
                self.release(&mut m, *host, cs);
            }
        }
        self.allocated.notify_all();
        written?;
        mapped?;
        Ok(allocs.len() * cs as usize)
    }

    pub(super) fn writable(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(self.size(), offset, len)
    }
}

impl BlockDevice for Qcow2 {
    fn info(&self) -> DiskInfo {
        let mut info = DiskInfo::new(self.size());
        info.read_only = self.read_only;
        if self.crypto.is_some() {
            info.logical_block_size = 512;
        }
        info.preferred_request = u32::try_from(self.cluster_size).unwrap_or(4096).max(4096);
        info.caps = Capabilities {
            flush: true,
            fua: true,
            trim: !self.read_only,
            fast_zero: !self.read_only && (self.header.version >= 3 || self.backing.is_none()),
            extents: true,
            multi_conn: true,
            ..Capabilities::NONE
        };
        info
    }

    /// See [`Qcow2::resize`]; whole 512-byte sectors, as QEMU takes them.
    fn grow(&self, new_size: u64) -> Result<()> {
        vdk_core::check_grow(self.size(), new_size, 512)?;
        self.resize(new_size)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size(), offset, buf.len() as u64)?;
        self.data_access(offset, buf.len() as u64)?;
        let mut at = 0;
        while at < buf.len() {
            at += self.read_batch(buf, offset, at)?;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.writable(offset, buf.len() as u64)?;
        self.data_access(offset, buf.len() as u64)?;
        let mut at = 0;
        while at < buf.len() {
            let done = self.write_batch(buf, offset, at)?;
            if done > 0 {
                at += done;
                continue;
            }
            let g = offset + at as u64;
            let in_cl = g & (self.cluster_size - 1);
            let n = ((self.cluster_size - in_cl) as usize).min(buf.len() - at);
            self.write_piece(g >> self.cluster_bits, in_cl, &buf[at..at + n])?;
            at += n;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if !self.read_only {
            self.write_back(&mut lock(&self.meta))?;
        }
        self.io(self.file.sync_data())
    }

    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true, false)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<()> {
        self.writable(offset, len)?;
        self.data_access(offset, len)?;
        let cs = self.cluster_size;
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let in_cl = pos & (cs - 1);
            let n = (cs - in_cl).min(end - pos);
            let gc = pos >> self.cluster_bits;
            if n == cs {
                self.zero_cluster(gc, may_trim)?;
            } else {
                // A partial cluster: zero it unless it reads as zeroes already.
                let map = self.lookup(&mut lock(&self.meta), gc)?;
                let zero_now = matches!(map, Map::Zero { .. })
                    || (map == Map::Unallocated && self.backing_empty(gc));
                if !zero_now && !self.zero_by_subclusters(gc, in_cl, n)? {
                    self.write_piece(gc, in_cl, &vec![0u8; n as usize])?;
                }
            }
            pos += n;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Extents> {
        check_range(self.size(), offset, len)?;
        // Runs of (length, kind), None for "what the backing disk has there".
        let mut runs: Vec<(u64, Option<ExtentKind>)> = Vec::new();
        self.pieces(offset, len, |gc, _, _, n| {
            let map = self.lookup(&mut lock(&self.meta), gc)?;
            let kind = match map {
                Map::Zero { .. } => Some(ExtentKind::Zero),
                Map::Unallocated if self.backing_empty(gc) => Some(ExtentKind::Hole),
                Map::Unallocated => None,
                _ => Some(ExtentKind::Data),
            };
            match runs.last_mut() {
                Some((l, k)) if *k == kind => *l += n as u64,
                _ => runs.push((n as u64, kind)),
            }
            Ok(())
        })?;
        let mut e = Extents::new(offset);
        let mut at = offset;
        for (n, kind) in runs {
            match (kind, &self.backing) {
                (Some(k), _) => e.push(n, k),
                (None, Some(b)) => {
                    // Unallocated here: the backing disk's own map, holes past its end.
                    let bsize = b.info().size;
                    let inside = bsize.saturating_sub(at).min(n);
                    if inside > 0 {
                        for (_, run) in b.extents(at, inside)?.iter() {
                            e.push(run.len, run.kind);
                        }
                    }
                    e.push(n - inside, ExtentKind::Hole);
                }
                (None, None) => e.push(n, ExtentKind::Hole),
            }
            at += n;
        }
        Ok(e)
    }
}
