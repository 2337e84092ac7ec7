//! NTFS sparse files and allocation, through the file system controls (`FSCTL_*`) and
//! `GetFileInformationByHandleEx`, and renames written through (`MoveFileExW`): the one place
//! in vdk that calls Windows' C API directly.
//! File systems without sparse files (FAT32, exFAT, ReFS without it) answer these with an
//! error, which callers take as "not here": they write zeroes and report all data instead.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::mem::{size_of, size_of_val};
use std::os::windows::ffi::OsStrExt;
use std::os::windows::io::AsRawHandle;
use std::path::Path;
use std::ptr;

use windows_sys::Win32::Foundation::{
    ERROR_INVALID_FUNCTION, ERROR_MORE_DATA, ERROR_NOT_SUPPORTED,
};
use windows_sys::Win32::Storage::FileSystem::{
    FileStandardInfo, GetFileInformationByHandleEx, MoveFileExW, FILE_STANDARD_INFO,
    MOVEFILE_REPLACE_EXISTING, MOVEFILE_WRITE_THROUGH,
};
use windows_sys::Win32::System::Ioctl::{
    FILE_ALLOCATED_RANGE_BUFFER, FILE_ZERO_DATA_INFORMATION, FSCTL_QUERY_ALLOCATED_RANGES,
    FSCTL_SET_SPARSE, FSCTL_SET_ZERO_DATA,
};
use windows_sys::Win32::System::IO::DeviceIoControl;

/// One synchronous `DeviceIoControl` on `file`: `input` as the in-buffer (none: the control's
/// default), `output` as the out-buffer. How many bytes of `output` were filled, and whether
/// more would have come (`ERROR_MORE_DATA`).
fn control<I: Copy, O: Copy>(
    file: &File,
    code: u32,
    input: Option<&I>,
    output: &mut [O],
) -> io::Result<(usize, bool)> {
    let (in_ptr, in_len) = match input {
        Some(i) => (ptr::from_ref(i).cast(), size_of::<I>()),
        None => (ptr::null(), 0),
    };
    let in_len = u32::try_from(in_len).map_err(|_| io::ErrorKind::InvalidInput)?;
    let out_len = u32::try_from(size_of_val(output)).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut returned = 0u32;
    // SAFETY: the handle is `file`'s, open for the whole call; the in-buffer is one `I` (or
    // none) and the out-buffer is `output`, each given with its true size in bytes, and both
    // plain data (`Copy` structs of integers); std opens files without FILE_FLAG_OVERLAPPED,
    // so the call completes before it returns and no OVERLAPPED is needed.
    let ok = unsafe {
        DeviceIoControl(
            file.as_raw_handle(),
            code,
            in_ptr,
            in_len,
            output.as_mut_ptr().cast(),
            out_len,
            &mut returned,
            ptr::null_mut(),
        )
    };
    let filled = returned as usize;
    if ok != 0 {
        return Ok((filled, false));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error().and_then(|c| u32::try_from(c).ok()) {
        Some(ERROR_MORE_DATA) => Ok((filled, true)),
        // A file system without the control (FAT32, exFAT; Wine): callers fall back.
        Some(ERROR_INVALID_FUNCTION | ERROR_NOT_SUPPORTED) => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("the file system does not do this ({e})"),
        )),
        _ => Err(e),
    }
}

/// Marks `file` sparse: ranges zeroed by [`punch_hole`] then take no space.
pub fn set_sparse(file: &File) -> io::Result<()> {
    control::<u8, u8>(file, FSCTL_SET_SPARSE, None, &mut []).map(drop)
}

/// Zeroes `[offset, offset + len)` without writing data: freed in a sparse file, zeroes
/// written by the file system in any other (`FSCTL_SET_ZERO_DATA`). The length is kept.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let end = offset.checked_add(len).ok_or(io::ErrorKind::InvalidInput)?;
    let range = FILE_ZERO_DATA_INFORMATION {
        FileOffset: i64::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?,
        BeyondFinalZero: i64::try_from(end).map_err(|_| io::ErrorKind::InvalidInput)?,
    };
    control::<_, u8>(file, FSCTL_SET_ZERO_DATA, Some(&range), &mut []).map(drop)
}

/// The allocated ranges of `file` within `[offset, offset + len)`, in order, as (start,
/// length), clipped to the range (`FSCTL_QUERY_ALLOCATED_RANGES`). On a file that is not
/// sparse, all of it.
pub fn allocated_ranges(file: &File, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let end = offset.checked_add(len).ok_or(io::ErrorKind::InvalidInput)?;
    let mut found = Vec::new();
    let mut at = offset;
    let mut buf = [FILE_ALLOCATED_RANGE_BUFFER::default(); 64];
    while at < end {
        let ask = FILE_ALLOCATED_RANGE_BUFFER {
            FileOffset: i64::try_from(at).map_err(|_| io::ErrorKind::InvalidInput)?,
            Length: i64::try_from(end - at).map_err(|_| io::ErrorKind::InvalidInput)?,
        };
        let (filled, more) = control(file, FSCTL_QUERY_ALLOCATED_RANGES, Some(&ask), &mut buf)?;
        let ranges = &buf[..filled / size_of::<FILE_ALLOCATED_RANGE_BUFFER>()];
        for r in ranges {
            let (start, length) = (r.FileOffset.max(0) as u64, r.Length.max(0) as u64);
            let (start, stop) = (start.max(at), start.saturating_add(length).min(end));
            if start < stop {
                found.push((start, stop - start));
            }
        }
        match ranges.last() {
            // Asked again from where the answer stopped.
            Some(last) if more => {
                let next =
                    (last.FileOffset.max(0) as u64).saturating_add(last.Length.max(0) as u64);
                if next <= at {
                    break;
                }
                at = next;
            }
            _ => break,
        }
    }
    Ok(found)
}

/// The bytes `file` takes on its volume (`AllocationSize`): less than its length when sparse.
pub fn allocation_size(file: &File) -> io::Result<u64> {
    let len =
        u32::try_from(size_of::<FILE_STANDARD_INFO>()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut info = FILE_STANDARD_INFO {
        AllocationSize: 0,
        EndOfFile: 0,
        NumberOfLinks: 0,
        DeletePending: false,
        Directory: false,
    };
    // SAFETY: the handle is `file`'s, open for the call; the buffer is one FILE_STANDARD_INFO,
    // the structure FileStandardInfo asks for, with its true size.
    let ok = unsafe {
        GetFileInformationByHandleEx(
            file.as_raw_handle(),
            FileStandardInfo,
            ptr::from_mut(&mut info).cast(),
            len,
        )
    };
    if ok == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.AllocationSize.max(0) as u64)
}

/// Renames `from` over `to`, returning once the change is on disk (`MoveFileExW` with
/// `MOVEFILE_WRITE_THROUGH`: Windows has no directory to sync).
pub fn replace_durably(from: &Path, to: &Path) -> io::Result<()> {
    let wide = |p: &Path| -> Vec<u16> { p.as_os_str().encode_wide().chain([0]).collect() };
    let (from, to) = (wide(from), wide(to));
    // SAFETY: both are NUL-terminated UTF-16 strings that live until the call returns.
    let ok = unsafe {
        MoveFileExW(
            from.as_ptr(),
            to.as_ptr(),
            MOVEFILE_REPLACE_EXISTING | MOVEFILE_WRITE_THROUGH,
        )
    };
    if ok == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
