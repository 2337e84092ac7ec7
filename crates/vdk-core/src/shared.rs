//! Zero-copy I/O: devices that keep data in memory lend it instead of copying it.
//!
//! A read can return [`Piece`]s that share the device's own buffers; a front end sends them
//! straight to the socket. A write of whole [`BlockDevice::write_unit`]s can hand the device
//! buffers to keep, received straight from the socket. Both are optional: a device that
//! does not lend or keep buffers is read and written with `read_at` and `write_at`.
//!
//! [`BlockDevice::write_unit`]: crate::BlockDevice::write_unit

use std::ops::{Deref, Range};
use std::sync::Arc;

/// A shared, read-only view of part of a buffer. Cloning it is cheap; the buffer lives as
/// long as any view of it. A device that changes a buffer while views of it exist copies it
/// first (copy-on-write), so a view never changes.
#[derive(Clone, Debug)]
pub struct SharedBytes {
    buf: Arc<[u8]>,
    range: Range<usize>,
}

impl SharedBytes {
    /// A view of `buf[range]`. Panics if `range` is outside `buf` (a device bug).
    pub fn new(buf: Arc<[u8]>, range: Range<usize>) -> SharedBytes {
        assert!(
            range.start <= range.end && range.end <= buf.len(),
            "range outside buffer"
        );
        SharedBytes { buf, range }
    }
}

impl Deref for SharedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.range.clone()]
    }
}

/// One piece of a shared read, in order.
#[derive(Clone, Debug)]
pub enum Piece {
    /// Bytes from the device's memory.
    Data(SharedBytes),
    /// This many zero bytes.
    Zero(usize),
}

impl Piece {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Piece::Data(b) => b.len(),
            Piece::Zero(n) => *n,
        }
    }

    /// Whether the piece is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A new zero-filled buffer of `len` bytes, allocated once (no copy from a `Vec`).
pub fn zeroed_buffer(len: usize) -> Arc<[u8]> {
    std::iter::repeat_n(0u8, len).collect()
}
