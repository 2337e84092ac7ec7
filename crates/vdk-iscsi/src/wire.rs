//! Reading and writing whole PDUs on a socket: framing, padding and digests.
//!
//! Reading is split in two so that the data of a Data-Out lands straight in its command's
//! buffer: [`read_header`] takes the BHS, the AHS and the header digest; the caller then picks
//! where the data segment goes and calls [`read_data`].

use std::io::{self, IoSlice, Read, Write};

use crate::pdu::{self, Bhs, BHS_LEN};

/// Which digests a connection uses (both off during login).
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct Digests {
    /// CRC32C after the header.
    pub header: bool,
    /// CRC32C after the data segment.
    pub data: bool,
}

/// Why a PDU could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The initiator closed the connection between PDUs.
    #[error("connection closed")]
    Closed,
    /// The socket failed, or closed in the middle of a PDU.
    #[error("connection failed")]
    Io(#[source] io::Error),
    /// The header digest was wrong: the stream can no longer be trusted.
    #[error("header digest mismatch")]
    HeaderDigest,
    /// The data segment is longer than the target declared it takes.
    #[error("data segment of {0} bytes is over the negotiated limit")]
    TooLong(usize),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> ReadError {
        ReadError::Io(e)
    }
}

/// The header part of a PDU.
#[derive(Debug)]
pub struct Header {
    /// The Basic Header Segment.
    pub bhs: Bhs,
    /// The Additional Header Segments.
    pub ahs: Vec<u8>,
}

/// Reads the BHS, AHS and header digest of the next PDU, and checks that its data segment
/// is at most `max_data` bytes.
pub fn read_header(
    r: &mut impl Read,
    digests: Digests,
    max_data: usize,
) -> Result<Header, ReadError> {
    let bhs = read_bhs(r)?;
    read_after_bhs(r, bhs, digests, max_data)
}

/// Reads the 48 bytes of the next BHS only, so that the caller can check it before trusting
/// the lengths it gives.
pub fn read_bhs(r: &mut impl Read) -> Result<Bhs, ReadError> {
    let mut b = [0u8; BHS_LEN];
    // EOF before the first byte is a clean close; after it, a broken PDU.
    loop {
        match r.read(&mut b[..1]) {
            Ok(0) => return Err(ReadError::Closed),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Err(ReadError::Closed),
            Err(e) => return Err(e.into()),
        }
    }
    r.read_exact(&mut b[1..])?;
    Ok(Bhs(b))
}

/// Reads the AHS and header digest that follow `bhs`, and checks the data segment length.
pub fn read_after_bhs(
    r: &mut impl Read,
    bhs: Bhs,
    digests: Digests,
    max_data: usize,
) -> Result<Header, ReadError> {
    let mut ahs = vec![0u8; bhs.ahs_len()];
    r.read_exact(&mut ahs)?;
    if digests.header {
        let mut d = [0u8; 4];
        r.read_exact(&mut d)?;
        if pdu::digest(&[&bhs.0, &ahs]) != u32::from_le_bytes(d) {
            return Err(ReadError::HeaderDigest);
        }
    }
    if bhs.data_len() > max_data {
        return Err(ReadError::TooLong(bhs.data_len()));
    }
    Ok(Header { bhs, ahs })
}

/// Reads a data segment of `dst.len()` bytes into `dst`, then its padding and digest.
/// Returns whether the data digest matched (always true without data digests).
pub fn read_data(r: &mut impl Read, dst: &mut [u8], digests: Digests) -> Result<bool, ReadError> {
    r.read_exact(dst)?;
    let mut pad = [0u8; 3];
    let pad = &mut pad[..pdu::padded(dst.len()) - dst.len()];
    r.read_exact(pad)?;
    if digests.data && !dst.is_empty() {
        let mut d = [0u8; 4];
        r.read_exact(&mut d)?;
        return Ok(pdu::digest(&[dst, pad]) == u32::from_le_bytes(d));
    }
    Ok(true)
}

/// Reads and drops a data segment of `len` bytes with its padding and digest.
pub fn skip_data(r: &mut impl Read, len: usize, digests: Digests) -> Result<(), ReadError> {
    let mut left = pdu::padded(len) + if digests.data && len > 0 { 4 } else { 0 };
    let mut scratch = [0u8; 4096];
    while left > 0 {
        let n = left.min(scratch.len());
        r.read_exact(&mut scratch[..n])?;
        left -= n;
    }
    Ok(())
}

/// Zero padding to send after data segments.
static PAD: [u8; 3] = [0; 3];

/// Writes PDUs, each a header and a data segment, in one vectored write: header digest,
/// padding and data digest are added as the connection's `digests` say. Each header's data
/// segment length is set from its data.
pub fn write_pdus(
    w: &mut impl Write,
    pdus: &mut [(Bhs, &[u8])],
    digests: Digests,
) -> io::Result<()> {
    let mut digest_bytes: Vec<[u8; 4]> = Vec::with_capacity(pdus.len() * 2);
    for (bhs, data) in pdus.iter_mut() {
        bhs.set_data_len(data.len());
        if digests.header {
            digest_bytes.push(pdu::digest(&[&bhs.0]).to_le_bytes());
        }
        if digests.data && !data.is_empty() {
            let pad = &PAD[..pdu::padded(data.len()) - data.len()];
            digest_bytes.push(pdu::digest(&[data, pad]).to_le_bytes());
        }
    }
    let mut slices = Vec::with_capacity(pdus.len() * 5);
    let mut d = digest_bytes.iter();
    for (bhs, data) in pdus.iter() {
        slices.push(IoSlice::new(&bhs.0));
        if digests.header {
            slices.push(IoSlice::new(d.next().map_or(&[][..], |x| &x[..])));
        }
        if !data.is_empty() {
            slices.push(IoSlice::new(data));
            slices.push(IoSlice::new(&PAD[..pdu::padded(data.len()) - data.len()]));
            if digests.data {
                slices.push(IoSlice::new(d.next().map_or(&[][..], |x| &x[..])));
            }
        }
    }
    vdk_core::io::write_all_vectored(w, &mut slices)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdu::opcode;

    const BOTH: Digests = Digests {
        header: true,
        data: true,
    };

    #[test]
    fn a_pdu_round_trips_with_digests_and_padding() {
        let mut out = Vec::new();
        let mut b = Bhs::new(opcode::NOP_IN);
        b.set_u32(16, 7);
        write_pdus(&mut out, &mut [(b, b"hello")], BOTH).unwrap();
        assert_eq!(out.len(), 48 + 4 + 8 + 4);
        let mut r = &out[..];
        let h = read_header(&mut r, BOTH, 1024).unwrap();
        assert_eq!(h.bhs.itt(), 7);
        let mut data = vec![0u8; h.bhs.data_len()];
        assert!(read_data(&mut r, &mut data, BOTH).unwrap());
        assert_eq!(data, b"hello");
        assert!(r.is_empty());
    }

    #[test]
    fn a_bad_header_digest_is_an_error() {
        let mut out = Vec::new();
        write_pdus(&mut out, &mut [(Bhs::new(opcode::NOP_IN), &[][..])], BOTH).unwrap();
        out[20] ^= 1;
        let r = read_header(&mut &out[..], BOTH, 1024);
        assert!(matches!(r, Err(ReadError::HeaderDigest)));
    }

    #[test]
    fn a_bad_data_digest_is_reported() {
        let mut out = Vec::new();
        write_pdus(
            &mut out,
            &mut [(Bhs::new(opcode::NOP_IN), &b"data"[..])],
            BOTH,
        )
        .unwrap();
        out[48 + 4] ^= 1;
        let mut r = &out[..];
        let h = read_header(&mut r, BOTH, 1024).unwrap();
        let mut data = vec![0u8; h.bhs.data_len()];
        assert!(!read_data(&mut r, &mut data, BOTH).unwrap());
    }

    #[test]
    fn oversized_data_is_refused_before_it_is_read() {
        let mut out = Vec::new();
        write_pdus(
            &mut out,
            &mut [(Bhs::new(opcode::NOP_IN), &[0u8; 100][..])],
            Digests::default(),
        )
        .unwrap();
        let r = read_header(&mut &out[..], Digests::default(), 64);
        assert!(matches!(r, Err(ReadError::TooLong(100))));
    }

    #[test]
    fn eof_between_pdus_is_a_clean_close() {
        assert!(matches!(
            read_header(&mut &[][..], Digests::default(), 64),
            Err(ReadError::Closed)
        ));
        assert!(matches!(
            read_header(&mut &[0u8; 10][..], Digests::default(), 64),
            Err(ReadError::Io(_))
        ));
    }
}
