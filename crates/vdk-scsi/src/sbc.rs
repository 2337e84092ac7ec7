//! SBC commands of a disk: READ and WRITE (6, 10, 12, 16), WRITE SAME (10, 16), UNMAP,
//! SYNCHRONIZE CACHE, VERIFY, WRITE AND VERIFY, COMPARE AND WRITE, PRE-FETCH,
//! READ CAPACITY (10, 16) and GET LBA STATUS.

use vdk_core::sync;
use vdk_core::ExtentKind;

use crate::cdb::{u32_of, Cdb};
use crate::lu::{LogicalUnit, Medium};
use crate::sense::Sense;
use crate::spc::{MAX_COMPARE_WRITE, MAX_UNMAP_BLOCKS, MAX_UNMAP_DESCRIPTORS};
use crate::{Request, Response, MAX_TRANSFER};

pub const READ6: u8 = 0x08;
pub const WRITE6: u8 = 0x0a;
pub const READ_CAPACITY10: u8 = 0x25;
pub const READ10: u8 = 0x28;
pub const WRITE10: u8 = 0x2a;
const WRITE_VERIFY10: u8 = 0x2e;
const VERIFY10: u8 = 0x2f;
const PREFETCH10: u8 = 0x34;
const SYNC_CACHE10: u8 = 0x35;
const WRITE_SAME10: u8 = 0x41;
const UNMAP: u8 = 0x42;
pub const READ16: u8 = 0x88;
const COMPARE_AND_WRITE: u8 = 0x89;
pub const WRITE16: u8 = 0x8a;
const WRITE_VERIFY16: u8 = 0x8e;
const VERIFY16: u8 = 0x8f;
const PREFETCH16: u8 = 0x90;
const SYNC_CACHE16: u8 = 0x91;
const WRITE_SAME16: u8 = 0x93;
pub const SERVICE_ACTION_IN16: u8 = 0x9e;
pub const READ12: u8 = 0xa8;
pub const WRITE12: u8 = 0xaa;
const WRITE_VERIFY12: u8 = 0xae;
const VERIFY12: u8 = 0xaf;

const SA_READ_CAPACITY16: u8 = 0x10;
const SA_GET_LBA_STATUS: u8 = 0x12;

pub fn execute(lu: &LogicalUnit, req: &Request<'_>, cdb: &Cdb<'_>) -> Option<Response> {
    let op = cdb.opcode();
    let r = match op {
        READ6 | READ10 | READ12 | READ16 => return Some(read(lu, cdb).into()),
        WRITE6 | WRITE10 | WRITE12 | WRITE16 | WRITE_VERIFY10 | WRITE_VERIFY12 | WRITE_VERIFY16 => {
            return Some(write(lu, req, cdb))
        }
        READ_CAPACITY10 => return Some(read_capacity10(lu, cdb).into()),
        SERVICE_ACTION_IN16 => {
            return Some(match cdb.byte(1) & 0x1f {
                SA_READ_CAPACITY16 => read_capacity16(lu, cdb).into(),
                SA_GET_LBA_STATUS => get_lba_status(lu, cdb).into(),
                _ => Response::check(Sense::invalid_cdb(1, Some(4))),
            })
        }
        VERIFY10 | VERIFY12 | VERIFY16 => verify(lu, req, cdb),
        SYNC_CACHE10 | SYNC_CACHE16 => sync_cache(lu, cdb),
        PREFETCH10 | PREFETCH16 => prefetch(lu, cdb),
        WRITE_SAME10 | WRITE_SAME16 => write_same(lu, req, cdb),
        UNMAP => unmap(lu, req, cdb),
        COMPARE_AND_WRITE => compare_and_write(lu, req, cdb),
        _ => return None,
    };
    Some(match r {
        Ok(()) => Response::good(Vec::new()),
        Err(s) => Response::check(s),
    })
}

/// LBA, transfer length, and the byte holding the protection field, for READ/WRITE/VERIFY
/// CDBs of any size.
pub fn lba_len(cdb: &Cdb<'_>) -> (u64, u64, usize) {
    match cdb.opcode() >> 5 {
        0 => {
            let lba = u64::from(cdb.be24(1) & 0x1f_ffff);
            let n = match cdb.byte(4) {
                0 if cdb.opcode() == READ6 || cdb.opcode() == WRITE6 => 256,
                n => u64::from(n),
            };
            (lba, n, 1)
        }
        1 | 2 => (u64::from(cdb.be32(2)), u64::from(cdb.be16(7)), 7),
        5 => (u64::from(cdb.be32(2)), u64::from(cdb.be32(6)), 9),
        _ => (cdb.be64(2), u64::from(cdb.be32(10)), 13),
    }
}

/// Checks the protection field (RDPROTECT and the like: no protection information here),
/// the transfer size and the range, and gives the byte range.
pub fn transfer(m: &Medium, cdb: &Cdb<'_>) -> Result<(u64, u64), Sense> {
    let (lba, n, len_at) = lba_len(cdb);
    if cdb.opcode() >> 5 != 0 && cdb.byte(1) & 0xe0 != 0 {
        return Err(Sense::invalid_cdb(1, Some(7)));
    }
    let (off, len) = m.range(lba, n)?;
    if len > u64::from(MAX_TRANSFER) {
        return Err(Sense::invalid_cdb(crate::cdb::u16_of(len_at), None));
    }
    Ok((off, len))
}

pub fn read(lu: &LogicalUnit, cdb: &Cdb<'_>) -> Result<Vec<u8>, Sense> {
    let m = lu.loaded()?;
    let (off, len) = transfer(&m, cdb)?;
    let mut buf = vec![0u8; usize::try_from(len).map_err(|_| Sense::LBA_OUT_OF_RANGE)?];
    m.dev
        .read_at(&mut buf, off)
        .map_err(|e| Sense::from_error(&e, false))?;
    Ok(buf)
}

/// A READ if the medium answers it without waiting: None if it would wait.
pub fn try_read(lu: &LogicalUnit, cdb: &Cdb<'_>) -> Option<Result<Vec<u8>, Sense>> {
    let m = match lu.loaded() {
        Ok(m) => m,
        Err(s) => return Some(Err(s)),
    };
    let (off, len) = match transfer(&m, cdb) {
        Ok(r) => r,
        Err(s) => return Some(Err(s)),
    };
    let lend = m.dev.lend()?;
    let mut buf = vec![0u8; usize::try_from(len).ok()?];
    match lend.try_read_at(&mut buf, off) {
        Ok(true) => Some(Ok(buf)),
        Ok(false) => None,
        Err(e) => Some(Err(Sense::from_error(&e, false))),
    }
}

/// A WRITE (without FUA, with the write cache on, with all its data) if the medium takes it
/// without waiting: None if it would wait.
pub fn try_write(lu: &LogicalUnit, req: &Request<'_>, cdb: &Cdb<'_>) -> Option<Response> {
    let m = lu.loaded().ok()?;
    if cdb.bit(1, 3) || !m.wce || m.info.read_only {
        return None;
    }
    let (off, len) = transfer(&m, cdb).ok()?;
    let want = usize::try_from(len).ok()?;
    if want == 0 || req.data_out.len() < want {
        return None;
    }
    let lend = m.dev.lend()?;
    let _shared = sync::read(&lu.io);
    match lend.try_write_at(&req.data_out[..want], off) {
        Ok(true) => Some(Response::good(Vec::new()).with_out_len(want)),
        Ok(false) => None,
        Err(e) => Some(Response::check(Sense::from_error(&e, true)).with_out_len(want)),
    }
}

fn write(lu: &LogicalUnit, req: &Request<'_>, cdb: &Cdb<'_>) -> Response {
    let m = match lu.loaded() {
        Ok(m) => m,
        Err(s) => return Response::check(s),
    };
    let (off, len) = match transfer(&m, cdb) {
        Ok(r) => r,
        Err(s) => {
            let (_, n, _) = lba_len(cdb);
            let want = usize::try_from(n.saturating_mul(u64::from(m.block))).unwrap_or(usize::MAX);
            return Response::check(s).with_out_len(want);
        }
    };
    let want = usize::try_from(len).unwrap_or(usize::MAX);
    let r = (|| {
        if m.info.read_only {
            return Err(Sense::WRITE_PROTECTED);
        }
        // Less data than the CDB asks for (the transport's expected length was shorter):
        // the whole blocks that came are written, as SAM-5 lets a target do; the transport
        // reports the rest as a residual.
        let bs = m.block as usize;
        let have = req.data_out.len().min(want) / bs * bs;
        if have == 0 {
            return Ok(());
        }
        // FUA (or a disabled write cache, or WRITE AND VERIFY) makes the data durable first.
        let fua = cdb.bit(1, 3)
            || !m.wce
            || matches!(
                cdb.opcode(),
                WRITE_VERIFY10 | WRITE_VERIFY12 | WRITE_VERIFY16
            );
        let _shared = sync::read(&lu.io);
        m.dev
            .write_at(&req.data_out[..have], off, fua)
            .map_err(|e| Sense::from_error(&e, true))
    })();
    match r {
        Ok(()) => Response::good(Vec::new()),
        Err(s) => Response::check(s),
    }
    .with_out_len(want)
}

fn read_capacity10(lu: &LogicalUnit, cdb: &Cdb<'_>) -> Result<Vec<u8>, Sense> {
    // PMI without an LBA, or an LBA without PMI, is an invalid combination (SBC-3 5.15).
    if !cdb.bit(8, 0) && cdb.be32(2) != 0 {
        return Err(Sense::invalid_cdb(2, None));
    }
    let m = lu.loaded()?;
    let last = m.blocks.saturating_sub(1);
    let mut d = vec![0u8; 8];
    d[..4].copy_from_slice(&u32::try_from(last).unwrap_or(u32::MAX).to_be_bytes());
    d[4..].copy_from_slice(&m.block.to_be_bytes());
    Ok(d)
}

fn read_capacity16(lu: &LogicalUnit, cdb: &Cdb<'_>) -> Result<Vec<u8>, Sense> {
    let m = lu.loaded()?;
    let mut d = vec![0u8; 32];
    d[..8].copy_from_slice(&m.blocks.saturating_sub(1).to_be_bytes());
    d[8..12].copy_from_slice(&m.block.to_be_bytes());
    let per_phys = (m.info.physical_block_size.max(m.block) / m.block).max(1);
    d[13] = u8::try_from(per_phys.trailing_zeros()).unwrap_or(0) & 0x0f;
    // LBPME (UNMAP and WRITE SAME with UNMAP work) and LBPRZ (unmapped blocks read zero).
    if !m.info.read_only {
        d[14] = 0x80 | 0x40;
    }
    Ok(cdb.cut_field(d, 10, 4))
}

fn get_lba_status(lu: &LogicalUnit, cdb: &Cdb<'_>) -> Result<Vec<u8>, Sense> {
    let m = lu.loaded()?;
    let lba = cdb.be64(2);
    let alloc = cdb.be32(10);
    if lba >= m.blocks {
        return Err(Sense::LBA_OUT_OF_RANGE);
    }
    let bs = u64::from(m.block);
    // Look at up to 1 GiB (or what the allocation length has room for) from the LBA.
    let max_desc = u64::from(alloc.saturating_sub(8) / 16).clamp(1, 1024);
    let end = (lba + ((1u64 << 30) / bs).max(1)).min(m.blocks);
    let extents = m
        .dev
        .extents(lba * bs, (end - lba) * bs)
        .map_err(|e| Sense::from_error(&e, false))?;
    // Blocks are mapped (0) if any byte is data, deallocated (1) if all read as holes.
    let mut descs: Vec<(u64, u64, u8)> = Vec::new();
    for (off, e) in extents.iter() {
        let first = off / bs;
        let last = (off + e.len).div_ceil(bs);
        let state = u8::from(e.kind != ExtentKind::Data);
        let mut first = first;
        if let Some(d) = descs.last_mut() {
            if first < d.0 + d.1 {
                // A block shared with the previous run: mapped if either part is data.
                if state == 0 {
                    d.2 = 0;
                }
                first = d.0 + d.1;
            }
        }
        if first >= last {
            continue;
        }
        match descs.last_mut() {
            Some(d) if d.2 == state && d.0 + d.1 == first => d.1 += last - first,
            _ => descs.push((first, last - first, state)),
        }
        if descs.len() as u64 > max_desc {
            descs.truncate(usize::try_from(max_desc).unwrap_or(1));
            break;
        }
    }
    let mut d = vec![0u8; 8];
    for (first, count, state) in descs {
        d.extend_from_slice(&first.to_be_bytes());
        d.extend_from_slice(&u32::try_from(count).unwrap_or(u32::MAX).to_be_bytes());
        d.extend_from_slice(&[state, 0, 0, 0]);
    }
    let n = u32_of(d.len() - 4);
    d[..4].copy_from_slice(&n.to_be_bytes());
    Ok(crate::cdb::cut_to(d, alloc))
}

fn verify(lu: &LogicalUnit, req: &Request<'_>, cdb: &Cdb<'_>) -> Result<(), Sense> {
    let m = lu.loaded()?;
    let (lba, n, _) = lba_len(cdb);
    if cdb.byte(1) & 0xe0 != 0 {
        return Err(Sense::invalid_cdb(1, Some(7)));
    }
    let (off, len) = m.range(lba, n)?;
    let bytchk = (cdb.byte(1) >> 1) & 0x03;
    if bytchk == 0 || len == 0 {
        return Ok(());
    }
    if len > u64::from(MAX_TRANSFER) {
        return Err(Sense::invalid_cdb(7, None));
    }
    let len = usize::try_from(len).map_err(|_| Sense::LBA_OUT_OF_RANGE)?;
    let bs = m.block as usize;
    let expected: Vec<u8> = match bytchk {
        1 => {
            if req.data_out.len() < len {
                return Err(Sense::INVALID_FIELD_IN_IU);
            }
            req.data_out[..len].to_vec()
        }
        3 => {
            if req.data_out.len() < bs {
                return Err(Sense::INVALID_FIELD_IN_IU);
            }
            req.data_out[..bs].repeat(len / bs)
        }
        _ => return Err(Sense::invalid_cdb(1, Some(2))),
    };
    let mut have = vec![0u8; len];
    m.dev
        .read_at(&mut have, off)
        .map_err(|e| Sense::from_error(&e, false))?;
    match have.iter().zip(&expected).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => Err(Sense::MISCOMPARE.with_info(i as u64)),
    }
}

fn sync_cache(lu: &LogicalUnit, cdb: &Cdb<'_>) -> Result<(), Sense> {
    let m = lu.loaded()?;
    let (lba, n) = if cdb.opcode() == SYNC_CACHE10 {
        (u64::from(cdb.be32(2)), u64::from(cdb.be16(7)))
    } else {
        (cdb.be64(2), u64::from(cdb.be32(10)))
    };
    m.range(lba, n)?;
    m.dev.flush().map_err(|e| Sense::from_error(&e, true))
}

fn prefetch(lu: &LogicalUnit, cdb: &Cdb<'_>) -> Result<(), Sense> {
    let m = lu.loaded()?;
    let (lba, n) = if cdb.opcode() == PREFETCH10 {
        (u64::from(cdb.be32(2)), u64::from(cdb.be16(7)))
    } else {
        (cdb.be64(2), u64::from(cdb.be32(10)))
    };
    let (off, len) = m.range(lba, n)?;
    // A hint: a device that cannot prefetch has still done what was asked.
    let _ = m.dev.cache(off, len);
    Ok(())
}

fn writable(lu: &LogicalUnit) -> Result<Medium, Sense> {
    let m = lu.loaded()?;
    if m.info.read_only {
        return Err(Sense::WRITE_PROTECTED);
    }
    Ok(m)
}

fn write_same(lu: &LogicalUnit, req: &Request<'_>, cdb: &Cdb<'_>) -> Result<(), Sense> {
    let (lba, n) = if cdb.opcode() == WRITE_SAME10 {
        (u64::from(cdb.be32(2)), u64::from(cdb.be16(7)))
    } else {
        (cdb.be64(2), u64::from(cdb.be32(10)))
    };
    if cdb.byte(1) & 0xe0 != 0 {
        return Err(Sense::invalid_cdb(1, Some(7)));
    }
    let anchor = cdb.bit(1, 4);
    let unmap = cdb.bit(1, 3);
    let ndob = cdb.opcode() == WRITE_SAME16 && cdb.bit(1, 0);
    if anchor {
        return Err(Sense::invalid_cdb(1, Some(4)));
    }
    let m = lu.loaded()?;
    let (off, len) = m.range(lba, n)?;
    if m.info.read_only {
        return Err(Sense::WRITE_PROTECTED);
    }
    if n == 0 {
        // WSNZ is set in the Block Limits page.
        return Err(Sense::invalid_cdb(
            if cdb.opcode() == WRITE_SAME10 { 7 } else { 10 },
            None,
        ));
    }
    let bs = m.block as usize;
    if n > u64::from(MAX_TRANSFER / m.block) {
        // Past the MAXIMUM WRITE SAME LENGTH of the Block Limits page.
        return Err(Sense::invalid_cdb(
            if cdb.opcode() == WRITE_SAME10 { 7 } else { 10 },
            None,
        ));
    }
    let block: Vec<u8> = if ndob {
        vec![0u8; bs]
    } else {
        // Exactly one block of data: anything else is a broken command.
        if req.data_out.len() != bs {
            return Err(Sense::INVALID_FIELD_IN_IU);
        }
        req.data_out.to_vec()
    };
    let _shared = sync::read(&lu.io);
    let fua = !m.wce;
    if block.iter().all(|&b| b == 0) {
        return m
            .dev
            .write_zeroes(off, len, unmap, fua)
            .map_err(|e| Sense::from_error(&e, true));
    }
    let chunk = block.repeat((1 << 20) / bs);
    let mut at = off;
    while at < off + len {
        let k = usize::try_from((off + len - at).min(chunk.len() as u64)).unwrap_or(chunk.len());
        m.dev
            .write_at(&chunk[..k], at, fua)
            .map_err(|e| Sense::from_error(&e, true))?;
        at += k as u64;
    }
    Ok(())
}

fn unmap(lu: &LogicalUnit, req: &Request<'_>, cdb: &Cdb<'_>) -> Result<(), Sense> {
    if cdb.bit(1, 0) {
        // ANCHOR: anchored blocks are not offered (ANC_SUP is 0).
        return Err(Sense::invalid_cdb(1, Some(0)));
    }
    let m = writable(lu)?;
    let plen = usize::from(cdb.be16(7));
    if plen == 0 {
        return Ok(());
    }
    if plen < 8 {
        return Err(Sense::PARAMETER_LIST_LENGTH);
    }
    let data = req.data_out;
    if data.len() < plen {
        return Err(Sense::PARAMETER_LIST_LENGTH);
    }
    let dlen = usize::from(u16::from_be_bytes([data[2], data[3]]));
    let dlen = dlen.min(plen - 8) / 16 * 16;
    let descs = &data[8..8 + dlen];
    if descs.len() / 16 > MAX_UNMAP_DESCRIPTORS as usize {
        return Err(Sense::invalid_param(2));
    }
    let mut ranges = Vec::new();
    for (i, d) in descs.chunks_exact(16).enumerate() {
        let c = Cdb::new(d);
        let (lba, n) = (c.be64(0), u64::from(c.be32(8)));
        if n > u64::from(MAX_UNMAP_BLOCKS) {
            return Err(Sense::invalid_param(crate::cdb::u16_of(8 + 16 * i + 8)));
        }
        ranges.push(m.range(lba, n)?);
    }
    let _shared = sync::read(&lu.io);
    for (off, len) in ranges {
        if len > 0 {
            m.dev
                .write_zeroes(off, len, true, !m.wce)
                .map_err(|e| Sense::from_error(&e, true))?;
        }
    }
    Ok(())
}

fn compare_and_write(lu: &LogicalUnit, req: &Request<'_>, cdb: &Cdb<'_>) -> Result<(), Sense> {
    if cdb.byte(1) & 0xe0 != 0 {
        return Err(Sense::invalid_cdb(1, Some(7)));
    }
    let lba = cdb.be64(2);
    let n = cdb.byte(13);
    if n > MAX_COMPARE_WRITE {
        return Err(Sense::invalid_cdb(13, None));
    }
    let m = writable(lu)?;
    let (off, len) = m.range(lba, u64::from(n))?;
    let len = usize::try_from(len).map_err(|_| Sense::LBA_OUT_OF_RANGE)?;
    // The verify and write data of exactly NUMBER OF LOGICAL BLOCKS: a count that does not
    // match the data (a length that wrapped, say) must not compare or write a part.
    if req.data_out.len() != 2 * len {
        return Err(Sense::invalid_cdb(13, None));
    }
    if n == 0 {
        return Ok(());
    }
    let (verify, data) = req.data_out[..2 * len].split_at(len);
    let _exclusive = sync::write(&lu.io);
    let mut have = vec![0u8; len];
    m.dev
        .read_at(&mut have, off)
        .map_err(|e| Sense::from_error(&e, false))?;
    if let Some(i) = have.iter().zip(verify).position(|(a, b)| a != b) {
        return Err(Sense::MISCOMPARE.with_info(i as u64));
    }
    m.dev
        .write_at(data, off, cdb.bit(1, 3) || !m.wce)
        .map_err(|e| Sense::from_error(&e, true))
}
