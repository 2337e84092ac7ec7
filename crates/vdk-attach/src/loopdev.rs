//! Loop devices, driven through the kernel's ioctls (`linux/loop.h`).
//!
//! A device is configured in one `LOOP_CONFIGURE` call with `LO_FLAGS_AUTOCLEAR`, and the
//! [`LoopDevice`] keeps `/dev/loopN` open: the kernel frees the device when the last opener
//! goes, so a process that dies leaves no attached loop device behind (a mount still using it
//! keeps it until it is unmounted).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use rustix::ioctl::{self, Ioctl, IoctlOutput, NoArg, Opcode, Setter};

const LOOP_CLR_FD: Opcode = 0x4C01;
const LOOP_CONFIGURE: Opcode = 0x4C0A;
const LOOP_SET_CAPACITY: Opcode = 0x4C07;
const LOOP_CTL_GET_FREE: Opcode = 0x4C82;

const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;
const LO_NAME_SIZE: usize = 64;

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; LO_NAME_SIZE],
    crypt_name: [u8; LO_NAME_SIZE],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// `LOOP_CTL_GET_FREE`: the answer is the ioctl's return value.
struct GetFree;

// SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number; the opcode is the
// kernel's.
unsafe impl Ioctl for GetFree {
    type Output = u32;
    const IS_MUTATING: bool = false;
    fn opcode(&self) -> Opcode {
        LOOP_CTL_GET_FREE
    }
    fn as_ptr(&mut self) -> *mut std::ffi::c_void {
        std::ptr::null_mut()
    }
    unsafe fn output_from_ptr(
        out: IoctlOutput,
        _: *mut std::ffi::c_void,
    ) -> rustix::io::Result<u32> {
        u32::try_from(out).map_err(|_| rustix::io::Errno::INVAL)
    }
}

/// How to set a loop device up.
#[derive(Clone, Copy, Debug)]
pub struct LoopOptions {
    /// The device refuses writes.
    pub read_only: bool,
    /// The device reads and writes its backing file with direct I/O, so pages are cached once
    /// (in the page cache of the block device) and not again in the file's.
    pub direct_io: bool,
    /// Logical block size: 512, 1024, 2048 or 4096.
    pub block_size: u32,
}

/// An attached loop device; dropping it detaches the device (at once, or when its last other
/// user, a mount for instance, lets go).
#[derive(Debug)]
pub struct LoopDevice {
    number: u32,
    dev: File,
}

impl LoopDevice {
    /// Attaches a free loop device to `backing`.
    pub fn attach(backing: &File, opts: LoopOptions) -> io::Result<LoopDevice> {
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/loop-control")
            .map_err(|e| with_context(e, "cannot open /dev/loop-control"))?;
        let mut flags = LO_FLAGS_AUTOCLEAR;
        if opts.read_only {
            flags |= LO_FLAGS_READ_ONLY;
        }
        if opts.direct_io {
            flags |= LO_FLAGS_DIRECT_IO;
        }
        let fd = u32::try_from(backing.as_raw_fd()).map_err(|_| io::ErrorKind::InvalidInput)?;
        // Another process may take the free device between the two calls: try again then.
        let mut attempts = 0;
        loop {
            // SAFETY: GetFree matches LOOP_CTL_GET_FREE, issued on the loop control device.
            let number = unsafe { ioctl::ioctl(&control, GetFree) }
                .map_err(|e| with_context(e.into(), "no free loop device"))?;
            let dev = OpenOptions::new()
                .read(true)
                .write(!opts.read_only)
                .open(format!("/dev/loop{number}"))?;
            let config = LoopConfig {
                fd,
                block_size: opts.block_size,
                info: LoopInfo64 {
                    device: 0,
                    inode: 0,
                    rdevice: 0,
                    offset: 0,
                    sizelimit: 0,
                    number: 0,
                    encrypt_type: 0,
                    encrypt_key_size: 0,
                    flags,
                    file_name: [0; LO_NAME_SIZE],
                    crypt_name: [0; LO_NAME_SIZE],
                    encrypt_key: [0; 32],
                    init: [0; 2],
                },
                reserved: [0; 8],
            };
            // SAFETY: LOOP_CONFIGURE reads a `struct loop_config`, which LoopConfig lays out
            // field for field; the backing fd stays open for the call.
            let configured =
                unsafe { ioctl::ioctl(&dev, Setter::<LOOP_CONFIGURE, LoopConfig>::new(config)) };
            match configured {
                Ok(()) => return Ok(LoopDevice { number, dev }),
                Err(rustix::io::Errno::BUSY) if attempts < 10 => {
                    attempts += 1;
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    return Err(with_context(
                        e.into(),
                        &format!("cannot configure /dev/loop{number}"),
                    ))
                }
            }
        }
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/loop{}", self.number))
    }

    /// `LOOP_SET_CAPACITY`: the device takes its backing file's size as it is now (after the
    /// file grew), and the kernel tells the block layer and udev.
    pub fn set_capacity(&self) -> io::Result<()> {
        // SAFETY: LOOP_SET_CAPACITY takes no argument.
        unsafe { ioctl::ioctl(&self.dev, NoArg::<LOOP_SET_CAPACITY>::new()) }
            .map_err(|e| with_context(e.into(), "LOOP_SET_CAPACITY"))
    }

    /// Detaches the device. If something still has it open (a lazily unmounted file system),
    /// the kernel detaches it when that goes.
    pub fn detach(self) -> io::Result<()> {
        // SAFETY: LOOP_CLR_FD takes no argument.
        match unsafe { ioctl::ioctl(&self.dev, NoArg::<LOOP_CLR_FD>::new()) } {
            // ENXIO: already detached (autoclear ran).
            Ok(()) | Err(rustix::io::Errno::NXIO) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

fn with_context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}
