//! The export's socket: never put over a file that is not a socket or over a live server's,
//! a stale one replaced, gone once stopped; messages a front end sends pass to the handler,
//! and the back-end channel it hands over carries the news of a grown disk. (QEMU and a guest
//! prove the same in crates/vdk/tests/vhost_user.rs; this is the vhost crate's front end.)
#![cfg(target_os = "linux")]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use vdk_backends::MemoryDisk;
use vdk_core::BlockDevice;
use vdk_vhost::{Config, Export};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::VhostBackend;

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

/// Waits up to 10 s for `cond`.
fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..200 {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The capacity in the config space, in 512-byte sectors.
fn capacity(front: &mut Frontend) -> u64 {
    let (_, space) = front
        .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
        .unwrap();
    u64::from_le_bytes(space[..8].try_into().unwrap())
}

#[test]
fn a_grown_disk_is_announced_on_the_back_end_channel_the_front_end_gave() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(MemoryDisk::new(1 << 20));
    let sock = dir.path().join("vm.sock");
    let export = Export::start(&sock, disk.clone(), Config::default()).unwrap();
    // Nobody connected: nobody to tell.
    assert!(!export.capacity_changed().unwrap());

    let mut front = Frontend::connect(&sock, 1).unwrap();
    front.set_owner().unwrap();
    let features = front.get_features().unwrap();
    front.set_features(features).unwrap();
    let offered = front.get_protocol_features().unwrap();
    assert!(offered.contains(VhostUserProtocolFeatures::BACKEND_REQ));
    assert!(offered.contains(VhostUserProtocolFeatures::CONFIG));
    front
        .set_protocol_features(
            VhostUserProtocolFeatures::BACKEND_REQ | VhostUserProtocolFeatures::CONFIG,
        )
        .unwrap();
    assert!(eventually(|| export.connected()));
    // Connected, but no channel handed over yet: not told, and said so.
    assert!(!export.capacity_changed().unwrap());

    let (mut ours, theirs) = UnixStream::pair().unwrap();
    front.set_backend_request_fd(&theirs).unwrap();
    drop(theirs);
    // A round trip behind it: the message has passed.
    assert_eq!(capacity(&mut front), 2048);
    disk.grow(3 << 20).unwrap();
    assert!(export.capacity_changed().unwrap());
    // CONFIG_CHANGE_MSG (2), version 1, no body, no reply asked for.
    let mut header = [0u8; 12];
    ours.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    ours.read_exact(&mut header).unwrap();
    assert_eq!(header, [2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    // What the front end then reads: the new capacity.
    assert_eq!(capacity(&mut front), 6144);

    // The VMM gone: the channel goes with it.
    drop(front);
    assert!(eventually(|| !export.connected()));
    assert!(!export.capacity_changed().unwrap());
    let mut rest = Vec::new();
    ours.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
}

#[test]
fn a_message_larger_than_vhost_user_allows_ends_its_connection_not_the_export() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(MemoryDisk::new(1 << 20));
    let sock = dir.path().join("vm.sock");
    let export = Export::start(&sock, disk, Config::default()).unwrap();
    for header in [
        // GET_FEATURES with a 1 MiB body.
        [1u8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 16, 0],
        // An unknown request.
        [0xff, 0xff, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],
    ] {
        let mut bad = UnixStream::connect(&sock).unwrap();
        bad.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        bad.write_all(&header).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(
            bad.read(&mut buf).unwrap(),
            0,
            "the connection was not ended"
        );
        assert!(eventually(|| !export.connected()));
    }
    // The next VMM is served.
    let front = Frontend::connect(&sock, 1).unwrap();
    front.set_owner().unwrap();
    assert_ne!(front.get_features().unwrap(), 0);
}
