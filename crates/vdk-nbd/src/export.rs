//! Exports: named disks offered by a server, and what is advertised for each.

use std::sync::Arc;

use vdk_core::{BlockDevice, DiskInfo};

use crate::proto::tflags;

/// A disk offered under a name.
#[derive(Debug)]
pub struct Export {
    /// The name clients ask for. The first export of a server is also the default export,
    /// reached with the empty name.
    pub name: String,
    /// Shown by `nbdinfo --list`.
    pub description: String,
    /// The disk.
    pub device: Arc<dyn BlockDevice>,
    /// Refuse writes even if the disk takes them.
    pub read_only: bool,
}

impl Export {
    /// An export of `device` named `name`, writable if the device is.
    pub fn new(name: impl Into<String>, device: Arc<dyn BlockDevice>) -> Export {
        Export {
            name: name.into(),
            description: String::new(),
            device,
            read_only: false,
        }
    }

    /// Transmission flags, advertised truthfully from the disk's info.
    pub fn transmission_flags(&self, info: &DiskInfo, structured: bool) -> u16 {
        let mut f = tflags::HAS_FLAGS | tflags::SEND_FLUSH | tflags::SEND_CACHE;
        let set = |f: &mut u16, on: bool, bit: u16| {
            if on {
                *f |= bit;
            }
        };
        let ro = self.read_only || info.read_only;
        set(&mut f, ro, tflags::READ_ONLY);
        set(&mut f, !ro, tflags::SEND_FUA | tflags::SEND_WRITE_ZEROES);
        set(&mut f, !ro && info.caps.trim, tflags::SEND_TRIM);
        set(&mut f, !ro && info.caps.fast_zero, tflags::SEND_FAST_ZERO);
        set(&mut f, info.rotational, tflags::ROTATIONAL);
        set(&mut f, structured, tflags::SEND_DF);
        set(&mut f, info.caps.multi_conn, tflags::CAN_MULTI_CONN);
        f
    }

    /// Minimum, preferred and maximum block sizes (NBD_INFO_BLOCK_SIZE).
    pub fn block_sizes(info: &DiskInfo) -> (u32, u32, u32) {
        let min = info.logical_block_size.max(1);
        let preferred = info.physical_block_size.max(min).max(512);
        let max = info
            .max_request
            .min(DiskInfo::DEFAULT_MAX_REQUEST)
            .max(preferred);
        (min, preferred, max)
    }
}
