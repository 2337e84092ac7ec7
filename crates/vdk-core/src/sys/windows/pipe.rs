//! Named pipes: the vdk daemon's control channel on Windows, where its Linux twin is a Unix
//! socket. The pipe's access list admits its owner (the daemon's user), the Administrators
//! and SYSTEM, and no one else, not even to read; remote clients are refused.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::windows::ffi::OsStrExt;
use std::os::windows::io::{AsRawHandle, FromRawHandle, OwnedHandle};
use std::path::Path;
use std::ptr;
use std::time::{Duration, Instant};

use windows_sys::Win32::Foundation::{
    LocalFree, ERROR_ACCESS_DENIED, ERROR_PIPE_BUSY, ERROR_PIPE_CONNECTED, HANDLE,
    INVALID_HANDLE_VALUE,
};
use windows_sys::Win32::Security::Authorization::{
    ConvertStringSecurityDescriptorToSecurityDescriptorW, SDDL_REVISION_1,
};
use windows_sys::Win32::Security::{
    EqualSid, GetTokenInformation, IsWellKnownSid, TokenGroups, TokenUser,
    WinBuiltinAdministratorsSid, WinLocalSystemSid, PSECURITY_DESCRIPTOR, SECURITY_ATTRIBUTES,
    SID_AND_ATTRIBUTES, TOKEN_GROUPS, TOKEN_QUERY, TOKEN_USER,
};
use windows_sys::Win32::Storage::FileSystem::{FILE_FLAG_FIRST_PIPE_INSTANCE, PIPE_ACCESS_DUPLEX};
use windows_sys::Win32::System::Pipes::{
    ConnectNamedPipe, CreateNamedPipeW, GetNamedPipeClientProcessId, PIPE_READMODE_BYTE,
    PIPE_REJECT_REMOTE_CLIENTS, PIPE_TYPE_BYTE, PIPE_UNLIMITED_INSTANCES, PIPE_WAIT,
};
use windows_sys::Win32::System::SystemServices::SE_GROUP_ENABLED;
use windows_sys::Win32::System::Threading::{
    GetCurrentProcess, OpenProcess, OpenProcessToken, PROCESS_QUERY_LIMITED_INFORMATION,
};

/// Bytes each direction buffers.
const BUFFER: u32 = 64 << 10;

/// The pipe's access list (SDDL): protected from inheritance; full access for SYSTEM, the
/// Administrators and the owner; nothing for anyone else.
const ACCESS: &str = "D:P(A;;GA;;;SY)(A;;GA;;;BA)(A;;GA;;;OW)";

/// A security descriptor made from SDDL, freed when dropped.
struct Descriptor(PSECURITY_DESCRIPTOR);

impl Descriptor {
    fn new(sddl: &str) -> io::Result<Descriptor> {
        let text: Vec<u16> = sddl.encode_utf16().chain([0]).collect();
        let mut sd: PSECURITY_DESCRIPTOR = ptr::null_mut();
        // SAFETY: `text` is NUL-terminated UTF-16 alive for the call; `sd` receives a
        // descriptor the system allocates, freed with LocalFree in Drop.
        let ok = unsafe {
            ConvertStringSecurityDescriptorToSecurityDescriptorW(
                text.as_ptr(),
                SDDL_REVISION_1,
                &mut sd,
                ptr::null_mut(),
            )
        };
        if ok == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Descriptor(sd))
    }
}

impl Drop for Descriptor {
    fn drop(&mut self) {
        // SAFETY: allocated by ConvertStringSecurityDescriptorToSecurityDescriptorW, freed once.
        unsafe { LocalFree(self.0) };
    }
}

/// A named pipe a server accepts connections on, one pipe instance each.
#[derive(Debug)]
pub struct PipeListener {
    name: Vec<u16>,
    /// The instance the next client connects to: there is always one, so that the name
    /// never disappears between two connections.
    next: OwnedHandle,
}

/// One accepted connection: the pipe, and the process at the other end.
#[derive(Debug)]
pub struct PipeConn {
    /// The pipe, read and written as a file.
    pub file: File,
    /// The client's process id.
    pub pid: u32,
}

fn wide(name: &Path) -> Vec<u16> {
    name.as_os_str().encode_wide().chain([0]).collect()
}

fn instance(name: &[u16], first: bool) -> io::Result<OwnedHandle> {
    let flags = PIPE_ACCESS_DUPLEX
        | if first {
            FILE_FLAG_FIRST_PIPE_INSTANCE
        } else {
            0
        };
    let descriptor = Descriptor::new(ACCESS)?;
    let attributes = SECURITY_ATTRIBUTES {
        nLength: u32::try_from(std::mem::size_of::<SECURITY_ATTRIBUTES>())
            .map_err(|_| io::ErrorKind::InvalidInput)?,
        lpSecurityDescriptor: descriptor.0,
        bInheritHandle: 0,
    };
    // SAFETY: `name` is a NUL-terminated UTF-16 string and `attributes` (with the descriptor
    // it points to) live for the call; the handle returned is checked before it is owned.
    let h = unsafe {
        CreateNamedPipeW(
            name.as_ptr(),
            flags,
            PIPE_TYPE_BYTE | PIPE_READMODE_BYTE | PIPE_WAIT | PIPE_REJECT_REMOTE_CLIENTS,
            PIPE_UNLIMITED_INSTANCES,
            BUFFER,
            BUFFER,
            0,
            &attributes,
        )
    };
    if h == INVALID_HANDLE_VALUE {
        let e = io::Error::last_os_error();
        if first && e.raw_os_error() == Some(ERROR_ACCESS_DENIED as i32) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another process serves this pipe already",
            ));
        }
        return Err(e);
    }
    // SAFETY: a valid handle that nothing else owns.
    Ok(unsafe { OwnedHandle::from_raw_handle(h) })
}

impl PipeListener {
    /// Creates the pipe `name` (`\\.\pipe\NAME`); fails with `AddrInUse` if another process
    /// has it.
    pub fn bind(name: &Path) -> io::Result<PipeListener> {
        let name = wide(name);
        let next = instance(&name, true)?;
        Ok(PipeListener { name, next })
    }

    /// Waits for the next client.
    pub fn accept(&mut self) -> io::Result<PipeConn> {
        // SAFETY: `next` is a pipe instance this listener owns; synchronous (no OVERLAPPED).
        let ok = unsafe { ConnectNamedPipe(self.next.as_raw_handle(), ptr::null_mut()) };
        if ok == 0 {
            let e = io::Error::last_os_error();
            // A client that came between the instance's creation and this call.
            if e.raw_os_error() != Some(ERROR_PIPE_CONNECTED as i32) {
                return Err(e);
            }
        }
        let fresh = instance(&self.name, false)?;
        let conn = std::mem::replace(&mut self.next, fresh);
        let mut pid = 0u32;
        // SAFETY: a connected pipe instance; `pid` is a u32 the call fills.
        unsafe { GetNamedPipeClientProcessId(conn.as_raw_handle(), &mut pid) };
        Ok(PipeConn {
            file: File::from(conn),
            pid,
        })
    }
}

/// Connects to the pipe `name` as a client, waiting up to 2 s while every instance is busy.
pub fn connect_pipe(name: &Path) -> io::Result<File> {
    let started = Instant::now();
    loop {
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(name)
        {
            Err(e)
                if e.raw_os_error() == Some(ERROR_PIPE_BUSY as i32)
                    && started.elapsed() < Duration::from_secs(2) =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

/// Who a pipe client is, from its process's token.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Peer {
    /// It runs as the same user as this process.
    pub same_user: bool,
    /// It runs as SYSTEM, or as an Administrator with the group enabled (elevated).
    pub admin_or_system: bool,
}

/// The token information `class` of `token`, in a buffer aligned for the structures it holds.
fn token_info(token: &OwnedHandle, class: i32) -> io::Result<Vec<u64>> {
    let mut len = 0u32;
    // SAFETY: a size query: no buffer, `len` receives the size needed.
    unsafe { GetTokenInformation(token.as_raw_handle(), class, ptr::null_mut(), 0, &mut len) };
    let mut buf = vec![0u64; (len as usize).div_ceil(8).max(1)];
    let size = u32::try_from(buf.len() * 8).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: `buf` has `size` bytes, 8-aligned, alive for the call.
    let ok = unsafe {
        GetTokenInformation(
            token.as_raw_handle(),
            class,
            buf.as_mut_ptr().cast(),
            size,
            &mut len,
        )
    };
    if ok == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(buf)
}

/// The token of process `process` (a handle with query rights).
fn token_of(process: HANDLE) -> io::Result<OwnedHandle> {
    let mut token = ptr::null_mut();
    // SAFETY: `process` is a valid process handle for the call; the token handle returned is
    // checked, then owned.
    let ok = unsafe { OpenProcessToken(process, TOKEN_QUERY, &mut token) };
    if ok == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a valid handle that nothing else owns.
    Ok(unsafe { OwnedHandle::from_raw_handle(token) })
}

/// Who runs process `pid`, compared with this process's user.
pub fn peer_identity(pid: u32) -> io::Result<Peer> {
    // SAFETY: OpenProcess returns a handle or null, checked before it is owned.
    let process = unsafe { OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, 0, pid) };
    if process.is_null() {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a valid handle that nothing else owns.
    let process = unsafe { OwnedHandle::from_raw_handle(process) };
    let theirs = token_of(process.as_raw_handle())?;
    // SAFETY: the pseudo-handle of this process, valid always, never closed.
    let mine = token_of(unsafe { GetCurrentProcess() })?;
    let (their_user, my_user) = (
        token_info(&theirs, TokenUser)?,
        token_info(&mine, TokenUser)?,
    );
    // SAFETY: each buffer starts with the TOKEN_USER GetTokenInformation wrote; its SID
    // points inside the same buffer, alive for these calls.
    let (same_user, system) = unsafe {
        let theirs = (*their_user.as_ptr().cast::<TOKEN_USER>()).User.Sid;
        let mine = (*my_user.as_ptr().cast::<TOKEN_USER>()).User.Sid;
        (
            EqualSid(theirs, mine) != 0,
            IsWellKnownSid(theirs, WinLocalSystemSid) != 0,
        )
    };
    let groups = token_info(&theirs, TokenGroups)?;
    // SAFETY: the buffer starts with the TOKEN_GROUPS GetTokenInformation wrote, followed by
    // its GroupCount entries; the SIDs point inside the same buffer.
    let admin = unsafe {
        let g = groups.as_ptr().cast::<TOKEN_GROUPS>();
        let count = (*g).GroupCount as usize;
        let first = ptr::addr_of!((*g).Groups).cast::<SID_AND_ATTRIBUTES>();
        (0..count).any(|i| {
            let e = &*first.add(i);
            e.Attributes & (SE_GROUP_ENABLED as u32) != 0
                && IsWellKnownSid(e.Sid, WinBuiltinAdministratorsSid) != 0
        })
    };
    Ok(Peer {
        same_user,
        admin_or_system: system || admin,
    })
}
