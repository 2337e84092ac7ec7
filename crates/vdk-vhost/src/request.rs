//! One virtio-blk request: the descriptor chain checked and split into header, data and
//! status byte, then run against the disk in place in guest memory.

#![allow(unsafe_code)] // guest memory as the disk's buffers (see transfer)

use std::ops::Range;

use tracing::{debug, warn};
use vdk_core::{BlockDevice, Lend};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// virtio-blk counts in 512-byte sectors whatever the block size.
pub(crate) const SECTOR: u64 = 512;
/// The bytes of a request header: type, reserved, sector.
const HEADER: usize = 16;
/// The bytes of one discard / write-zeroes range: sector, sector count, flags.
const RANGE: usize = 16;
/// Write zeroes: the device may deallocate the range.
const FLAG_UNMAP: u32 = 1;

/// A piece of guest memory, by guest address.
#[derive(Clone, Copy, Debug)]
struct Seg {
    addr: GuestAddress,
    len: u32,
}

/// A chain split into its parts. Built only from a chain whose every part lies in guest
/// memory in the direction the part needs.
#[derive(Debug)]
pub(crate) struct Request {
    kind: u32,
    sector: u64,
    data: Vec<Seg>,
    /// Whether the data is device-writable (the guest reads it); `None` for no data.
    data_writable: Option<bool>,
    status: GuestAddress,
    /// Data bytes already moved by the fast path ([`try_answer`]), where [`answer`] resumes.
    done: u64,
}

/// What the disk and export are, as one request needs them.
#[derive(Debug)]
pub(crate) struct Target<'a> {
    pub disk: &'a dyn BlockDevice,
    pub read_only: bool,
    pub serial: &'a [u8],
    pub max_request: usize,
}

/// Splits a chain: a 16-byte device-readable header (it may span descriptors), data, and a
/// status byte (the last byte of the last descriptor, device-writable). A chain of any other
/// shape is refused: no status can be trusted, so nothing is written.
pub(crate) fn parse(mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Result<Request, &'static str> {
    let last = descs.last().ok_or("an empty descriptor chain")?;
    if !last.is_write_only() || last.len() == 0 {
        return Err("the last descriptor is not a writable status byte");
    }
    let status = last
        .addr()
        .checked_add(u64::from(last.len()) - 1)
        .ok_or("the status byte's address overflows")?;
    GuestMemoryBackend::get_slice(mem, status, 1)
        .map_err(|_| "the status byte is outside guest memory")?;
    let mut segs: Vec<(Seg, bool)> = descs
        .iter()
        .map(|d| {
            let seg = Seg {
                addr: d.addr(),
                len: d.len(),
            };
            (seg, d.is_write_only())
        })
        .collect();
    if let Some((seg, _)) = segs.last_mut() {
        seg.len -= 1;
    }
    let mut header = [0u8; HEADER];
    let mut got = 0;
    let mut next = 0;
    while got < HEADER {
        let (seg, writable) = segs
            .get_mut(next)
            .ok_or("the chain is shorter than a header")?;
        if *writable {
            return Err("the request header is not device-readable");
        }
        let n = (seg.len as usize).min(HEADER - got);
        mem.read_slice(&mut header[got..got + n], seg.addr)
            .map_err(|_| "the request header is outside guest memory")?;
        got += n;
        seg.addr = seg
            .addr
            .checked_add(n as u64)
            .ok_or("a descriptor's address overflows")?;
        seg.len -= u32::try_from(n).expect("at most 16");
        if seg.len == 0 {
            next += 1;
        }
    }
    let data: Vec<(Seg, bool)> = segs.drain(next..).filter(|(s, _)| s.len > 0).collect();
    let data_writable = data.first().map(|(_, w)| *w);
    if data.iter().any(|(_, w)| Some(*w) != data_writable) {
        return Err("the data buffers mix directions");
    }
    let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    Ok(Request {
        kind,
        sector,
        data: data.into_iter().map(|(s, _)| s).collect(),
        data_writable,
        status,
        done: 0,
    })
}

/// Answers one parsed chain: runs it and writes its status, or, for a chain of no valid
/// shape, returns it with nothing written. The used length.
pub(crate) fn answer(
    mem: &GuestMemoryMmap,
    parsed: &Result<Request, &str>,
    target: &Target,
) -> u32 {
    match parsed {
        Ok(req) => req.run(mem, target),
        Err(why) => {
            warn!(%why, "vhost-user-blk: a malformed request, returned unanswered");
            0
        }
    }
}

/// Answers a read or write on the calling thread if the disk can do it without waiting (its
/// non-blocking fast paths, `Lend`): the used length, or `None` when it would wait, when it
/// is another kind of request, or when anything fails. Then [`answer`] finishes it on a
/// thread that may block, from where the fast path stopped, and reports what failed.
pub(crate) fn try_answer(
    mem: &GuestMemoryMmap,
    parsed: &mut Result<Request, &str>,
    target: &Target,
) -> Option<u32> {
    let lend = target.disk.lend()?;
    let req = parsed.as_mut().ok()?;
    let read = match req.kind {
        VIRTIO_BLK_T_IN => true,
        VIRTIO_BLK_T_OUT => false,
        _ => return None,
    };
    match req.transfer(mem, target, read, Some(lend)).ok()? {
        Step::Done(written) => {
            let ok = u8::try_from(VIRTIO_BLK_S_OK).ok()?;
            mem.write_obj(ok, req.status).ok()?;
            Some(written.saturating_add(1))
        }
        Step::Stopped(done) => {
            req.done = done;
            None
        }
    }
}

/// How far a transfer went.
#[derive(Debug)]
enum Step {
    /// All of it; the bytes written into the chain.
    Done(u32),
    /// The fast path declined after this many data bytes.
    Stopped(u64),
}

/// Why a request failed, as the guest is told.
#[derive(Debug)]
enum Failure {
    /// VIRTIO_BLK_S_IOERR, with what went wrong for the log.
    Io(String),
    /// VIRTIO_BLK_S_UNSUPP.
    Unsupported,
}

impl Request {
    /// Runs the request and writes its status byte. Returns how many bytes were written into
    /// the chain's device-writable buffers (the used length).
    pub(crate) fn run(&self, mem: &GuestMemoryMmap, target: &Target) -> u32 {
        let (status, written) = match self.execute(mem, target) {
            Ok(n) => (VIRTIO_BLK_S_OK, n),
            Err(Failure::Unsupported) => (VIRTIO_BLK_S_UNSUPP, 0),
            Err(Failure::Io(why)) => {
                debug!(kind = self.kind, sector = self.sector, %why, "vhost-user-blk request failed");
                (VIRTIO_BLK_S_IOERR, 0)
            }
        };
        let status = u8::try_from(status).expect("statuses are small");
        if mem.write_obj(status, self.status).is_err() {
            // parse() checked it; the memory table cannot change under a running queue.
            warn!("vhost-user-blk: the status byte vanished from guest memory");
            return 0;
        }
        written.saturating_add(1)
    }

    fn execute(&self, mem: &GuestMemoryMmap, t: &Target) -> Result<u32, Failure> {
        match self.kind {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                match self.transfer(mem, t, self.kind == VIRTIO_BLK_T_IN, None)? {
                    Step::Done(n) => Ok(n),
                    // Only the fast path stops; never a panic on a guest's request.
                    Step::Stopped(_) => Err(Failure::Io("a transfer stopped part-way".into())),
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                if !t.read_only {
                    t.disk.flush().map_err(|e| Failure::Io(e.to_string()))?;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => self.get_id(mem, t),
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => self.ranges(mem, t).map(|()| 0),
            _ => Err(Failure::Unsupported),
        }
    }

    fn data_len(&self) -> u64 {
        self.data.iter().map(|s| u64::from(s.len)).sum()
    }

    /// The byte range `[sector * 512, + len)`, checked against the disk.
    fn span(t: &Target, sector: u64, len: u64) -> Result<Range<u64>, Failure> {
        let size = t.disk.info().size;
        let start = sector
            .checked_mul(SECTOR)
            .ok_or_else(|| Failure::Io(format!("sector {sector} is past the end")))?;
        match start.checked_add(len) {
            Some(end) if end <= size => Ok(start..end),
            _ => Err(Failure::Io(format!(
                "{len} bytes at sector {sector} end past the disk's {size} bytes"
            ))),
        }
    }

    /// Reads or writes the data from byte `self.done` on. With `nowait`, through the disk's
    /// non-blocking fast paths only, stopping where one would wait (a piece it declined may
    /// be partly written; it is redone whole).
    fn transfer(
        &self,
        mem: &GuestMemoryMmap,
        t: &Target,
        read: bool,
        nowait: Option<&dyn Lend>,
    ) -> Result<Step, Failure> {
        if self.data_writable == Some(!read) {
            return Err(Failure::Io("data buffers in the wrong direction".into()));
        }
        if !read && t.read_only {
            return Err(Failure::Io("the export is read-only".into()));
        }
        let len = self.data_len();
        if !len.is_multiple_of(SECTOR) {
            return Err(Failure::Io(format!("{len} bytes is not whole sectors")));
        }
        let written = u32::try_from(if read { len } else { 0 })
            .map_err(|_| Failure::Io("a request over 4 GiB".into()))?;
        let start = Self::span(t, self.sector, len)?.start;
        // Bytes of data before the current run.
        let mut before = 0u64;
        for (ptr, len) in runs(mem, &self.data)? {
            let mut done = usize::try_from(self.done.saturating_sub(before))
                .unwrap_or(usize::MAX)
                .min(len);
            before += len as u64;
            while done < len {
                let offset = start + (before - len as u64) + done as u64;
                let n = (len - done).min(t.max_request);
                // SAFETY: `ptr..ptr + len` lies in one mapped region of guest memory (runs()
                // took it from vm-memory's bounds-checked slices), which stays mapped while
                // the queue runs: the handler replaces the memory table only between
                // requests. The guest may change the bytes concurrently; as for any DMA
                // target, that can only change what it reads or writes, not our memory.
                let res = unsafe {
                    let p = ptr.add(done);
                    match (read, nowait) {
                        (true, None) => t
                            .disk
                            .read_at(std::slice::from_raw_parts_mut(p, n), offset)
                            .map(|()| true),
                        (true, Some(l)) => {
                            l.try_read_at(std::slice::from_raw_parts_mut(p, n), offset)
                        }
                        (false, None) => t
                            .disk
                            .write_at(std::slice::from_raw_parts(p, n), offset, false)
                            .map(|()| true),
                        (false, Some(l)) => {
                            l.try_write_at(std::slice::from_raw_parts(p, n), offset)
                        }
                    }
                };
                if !res.map_err(|e| Failure::Io(e.to_string()))? {
                    return Ok(Step::Stopped(offset - start));
                }
                done += n;
            }
        }
        Ok(Step::Done(written))
    }

    fn get_id(&self, mem: &GuestMemoryMmap, t: &Target) -> Result<u32, Failure> {
        if self.data_writable != Some(true) {
            return Err(Failure::Io("GET_ID needs a writable buffer".into()));
        }
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = t.serial.len().min(id.len());
        id[..n].copy_from_slice(&t.serial[..n]);
        let mut written = 0usize;
        for seg in &self.data {
            if written == id.len() {
                break;
            }
            let n = (seg.len as usize).min(id.len() - written);
            mem.write_slice(&id[written..written + n], seg.addr)
                .map_err(|_| Failure::Io("GET_ID buffer outside guest memory".into()))?;
            written += n;
        }
        Ok(u32::try_from(written).expect("at most 20"))
    }

    /// DISCARD and WRITE_ZEROES: a list of ranges, each checked before any is run.
    fn ranges(&self, mem: &GuestMemoryMmap, t: &Target) -> Result<(), Failure> {
        if self.data_writable != Some(false) {
            return Err(Failure::Io("ranges must be device-readable".into()));
        }
        if t.read_only {
            return Err(Failure::Io("the export is read-only".into()));
        }
        let len = self.data_len();
        if len == 0 || !len.is_multiple_of(RANGE as u64) || len > 64 * RANGE as u64 {
            return Err(Failure::Io(format!("{len} bytes of ranges")));
        }
        let mut bytes = Vec::new();
        for seg in &self.data {
            let mut part = vec![0u8; seg.len as usize];
            mem.read_slice(&mut part, seg.addr)
                .map_err(|_| Failure::Io("ranges outside guest memory".into()))?;
            bytes.extend_from_slice(&part);
        }
        let mut todo = Vec::new();
        for r in bytes.chunks_exact(RANGE) {
            let sector = u64::from_le_bytes(r[0..8].try_into().expect("8 bytes"));
            let count = u32::from_le_bytes(r[8..12].try_into().expect("4 bytes"));
            let flags = u32::from_le_bytes(r[12..16].try_into().expect("4 bytes"));
            let discard = self.kind == VIRTIO_BLK_T_DISCARD;
            if flags & !FLAG_UNMAP != 0 || (discard && flags != 0) {
                return Err(Failure::Unsupported);
            }
            let span = Self::span(t, sector, u64::from(count) * SECTOR)?;
            todo.push((span, flags & FLAG_UNMAP != 0));
        }
        for (span, unmap) in todo {
            let len = span.end - span.start;
            let res = if self.kind == VIRTIO_BLK_T_DISCARD {
                t.disk.trim(span.start, len)
            } else {
                t.disk.write_zeroes(span.start, len, unmap, false)
            };
            res.map_err(|e| match e {
                // A guest that discards though the feature was not offered.
                vdk_core::Error::Unsupported(_) => Failure::Unsupported,
                e => Failure::Io(e.to_string()),
            })?;
        }
        Ok(())
    }
}

/// The data segments as host memory runs, adjacent pieces joined (guest pages that are
/// contiguous in guest memory usually are in ours), every piece bounds-checked.
fn runs(mem: &GuestMemoryMmap, data: &[Seg]) -> Result<Vec<(*mut u8, usize)>, Failure> {
    let mut out: Vec<(*mut u8, usize)> = Vec::with_capacity(data.len());
    for seg in data {
        let len = seg.len as usize;
        for slice in GuestMemoryBackend::get_slices(mem, seg.addr, len) {
            let slice =
                slice.map_err(|_| Failure::Io("a data buffer outside guest memory".into()))?;
            let ptr = slice.ptr_guard_mut().as_ptr();
            let n = slice.len();
            match out.last_mut() {
                Some((p, l)) if p.wrapping_add(*l) == ptr => *l += n,
                _ => out.push((ptr, n)),
            }
        }
    }
    Ok(out)
}
