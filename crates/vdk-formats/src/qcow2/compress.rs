//! Decompression of compressed clusters.

use std::io::Read;

use super::header::Compression;

/// Decompresses one cluster's data into `out` (exactly one cluster). Trailing bytes after the
/// stream (the rest of the last sector, or the next cluster's data) are ignored.
pub fn decompress(kind: Compression, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match kind {
        Compression::Zlib => {
            let mut d = flate2::Decompress::new(false);
            match d.decompress(input, out, flate2::FlushDecompress::Finish) {
                Ok(_) if d.total_out() as usize == out.len() => Ok(()),
                Ok(_) => Err(format!(
                    "compressed cluster gave {} bytes, not {}",
                    d.total_out(),
                    out.len()
                )),
                Err(e) => Err(format!("compressed cluster is not valid deflate data: {e}")),
            }
        }
        Compression::Zstd => {
            let mut dec = ruzstd::decoding::StreamingDecoder::new(input)
                .map_err(|e| format!("compressed cluster is not valid zstd data: {e}"))?;
            dec.read_exact(out)
                .map_err(|e| format!("compressed cluster is not valid zstd data: {e}"))
        }
    }
}
