//! The export's socket: never put over a file that is not a socket or over a live server's,
//! a stale one replaced, gone once stopped.
#![cfg(target_os = "linux")]

use std::sync::Arc;

use vdk_backends::MemoryDisk;
use vdk_vhost::{Config, Export};

#[test]
fn sockets_of_others_and_plain_files_are_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(MemoryDisk::new(1 << 20));
    let plain = dir.path().join("plain");
    std::fs::write(&plain, b"keep").unwrap();
    let err = Export::start(&plain, disk.clone(), Config::default()).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists, "{err}");
    assert_eq!(std::fs::read(&plain).unwrap(), b"keep");

    let sock = dir.path().join("vm.sock");
    let mut first = Export::start(&sock, disk.clone(), Config::default()).unwrap();
    assert!(!first.connected());
    let err = Export::start(&sock, disk.clone(), Config::default()).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
    first.stop();
    assert!(!sock.exists(), "the socket outlived its export");

    // A stale socket (its server gone without removing it) is replaced.
    let stale = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    drop(stale);
    assert!(sock.exists());
    let again = Export::start(&sock, disk, Config::default()).unwrap();
    assert_eq!(again.path(), sock);
    drop(again);
    assert!(!sock.exists());
}
