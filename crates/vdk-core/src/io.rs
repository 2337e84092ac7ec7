//! Small I/O helpers the front ends share.

use std::io::{self, IoSlice, Write};

/// Writes every byte of every slice, in order, with as few `writev` calls as the writer
/// allows: a short write moves on within the slices instead of copying them together.
pub fn write_all_vectored(w: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most 3 bytes per call.
    struct Trickle(Vec<u8>);

    impl Write for Trickle {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let n = b.len().min(3);
            self.0.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn short_writes_still_write_everything_in_order() {
        let mut w = Trickle(Vec::new());
        let mut bufs = [
            IoSlice::new(b"hello "),
            IoSlice::new(b""),
            IoSlice::new(b"world"),
        ];
        write_all_vectored(&mut w, &mut bufs).unwrap();
        assert_eq!(w.0, b"hello world");
    }
}
