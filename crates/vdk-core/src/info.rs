//! What a disk is and what it can do, fixed while it is open.

/// What kind of medium a disk presents to the system.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum MediaKind {
    /// A CD/DVD-ROM: 2048-byte blocks, read-only, served with MMC commands.
    CdRom,
    /// A random-access disk.
    #[default]
    Disk,
}

/// The optional operations a device implements. A front end advertises exactly these.
///
/// Construct it with struct-update syntax from [`Capabilities::NONE`], so that capabilities
/// added later default to off.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct Capabilities {
    /// `flush` makes data durable (false for a device with nothing to flush, such as RAM).
    pub flush: bool,
    /// `write_at(.., fua = true)` is durable on return without a separate flush.
    pub fua: bool,
    /// `trim` is implemented.
    pub trim: bool,
    /// `write_zeroes` is faster than writing zero-filled buffers.
    pub fast_zero: bool,
    /// `extents` reports real holes and zeroes, not just "all data".
    pub extents: bool,
    /// Several connections may use the device at once and see each other's writes, and a
    /// flush on one makes the writes of all durable.
    pub multi_conn: bool,
    /// `cache` does real read-ahead.
    pub cache: bool,
    /// Every read must reach the device (`read_at`, or a fast path): a filter meters reads
    /// (the rate filter), so a front end never answers one from `extents` alone (the NBD
    /// server's sparse reads, which skip reading holes, are off).
    pub metered: bool,
}

impl Capabilities {
    /// No optional capability at all.
    pub const NONE: Capabilities = Capabilities {
        flush: false,
        fua: false,
        trim: false,
        fast_zero: false,
        extents: false,
        multi_conn: false,
        cache: false,
        metered: false,
    };
}

/// Size, geometry and capabilities of a disk.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
#[non_exhaustive]
pub struct DiskInfo {
    /// Size in bytes.
    pub size: u64,
    /// The smallest length and alignment the device accepts, a power of two. 1 for a device
    /// that is byte-addressable (a file, RAM).
    pub logical_block_size: u32,
    /// The alignment below which writes are read-modify-write, a power of two >= 512.
    pub physical_block_size: u32,
    /// The request size at which the device is most efficient, a power of two.
    pub preferred_request: u32,
    /// The largest request the device takes in one call.
    pub max_request: u32,
    /// Writes, trims and zeroes fail with `ReadOnly`.
    pub read_only: bool,
    /// Seeks are expensive (a spinning disk).
    pub rotational: bool,
    /// Optional operations.
    pub caps: Capabilities,
    /// Disk or CD-ROM.
    pub media: MediaKind,
}

impl DiskInfo {
    /// The largest request any vdk device takes by default: 32 MiB, the size that the NBD
    /// protocol says no server should consider an attack.
    pub const DEFAULT_MAX_REQUEST: u32 = 32 << 20;

    /// A writable, byte-addressable disk of `size` bytes with no optional capability.
    /// Implementations start here and set what they support.
    pub fn new(size: u64) -> DiskInfo {
        DiskInfo {
            size,
            logical_block_size: 1,
            physical_block_size: 4096,
            preferred_request: 4096,
            max_request: DiskInfo::DEFAULT_MAX_REQUEST,
            read_only: false,
            rotational: false,
            caps: Capabilities::NONE,
            media: MediaKind::Disk,
        }
    }
}
