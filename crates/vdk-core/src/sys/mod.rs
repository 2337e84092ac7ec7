//! What differs between operating systems, behind one set of names: the rest of vdk calls
//! these, never a platform's API. `linux/` is the platform vdk runs on; `windows/` has the
//! same names with what Windows allows so far (crosvm's `sys/{linux,windows}` shape): a port
//! adds or fills files here, and nothing else changes.
//!
//! - [`FileExt`]: reads and writes at an offset (`read_exact_at`, `write_all_at`).
//! - [`try_lock`]: a whole-file lock, shared or exclusive, that does not wait (advisory on
//!   Linux, mandatory on Windows).
//! - [`reserve`], [`punch_hole`]: allocate a file's space ahead, or free a range of it.
//! - [`disk_usage`]: the bytes a file takes on its file system (less than its length when
//!   sparse).
//! - [`set_keepalive`]: TCP keep-alive that finds a vanished peer in minutes, not hours.
//! - [`user_name`]: who this process runs as, for messages and lease records.
//! - [`proc`]: who else uses a file or a directory, for messages that name them.
//!
//! Windows adds `set_sparse`, `allocated_ranges` and `allocation_size` (NTFS sparse files),
//! which vdk-backends' Windows file calls; Linux files need no such calls.

#[cfg(target_os = "linux")]
#[path = "linux/mod.rs"]
mod os;
#[cfg(windows)]
#[path = "windows/mod.rs"]
mod os;

pub use os::*;

/// A whole-file advisory lock.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Lock {
    /// Many may hold it, as long as nobody holds it exclusively (readers).
    Shared,
    /// One holder, nobody else (a writer).
    Exclusive,
}
