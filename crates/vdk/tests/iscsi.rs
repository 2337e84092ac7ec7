//! The iSCSI target driven by initiators nobody here wrote: libiscsi's tools (iscsi-ls,
//! iscsi-inq, iscsi-readcapacity16, iscsi-test-cu) and QEMU's iSCSI block driver (qemu-img,
//! qemu-io over `iscsi://`), plus hostile bytes on a raw socket.
#![allow(clippy::cast_possible_truncation)] // test sizes are small constants

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{need, run, sparse_file, stdout, Vdk};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A directory with a sparse 64 MiB `disk.img` and a small `disc.iso` made by xorriso.
fn images() -> tempfile::TempDir {
    need("xorriso");
    let dir = tempfile::tempdir().unwrap();
    sparse_file(&dir.path().join("disk.img"), 64 << 20);
    let tree = dir.path().join("tree");
    fs::create_dir_all(&tree).unwrap();
    fs::write(tree.join("data.bin"), common::pattern(500_000, 3)).unwrap();
    run(Command::new("xorriso").args([
        "-as",
        "mkisofs",
        "-quiet",
        "-V",
        "VDKISCSI",
        "-o",
        s(&dir.path().join("disc.iso")),
        s(&tree),
    ]));
    dir
}

fn failing(cmd: &mut Command) -> String {
    let out = cmd
        .env("PATH", common::path_env())
        .output()
        .expect("run the client");
    assert!(
        !out.status.success(),
        "{cmd:?} should have failed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn discovery_lists_a_disk_and_a_cd_rom() {
    need("iscsi-ls");
    let vdk = Vdk::serve_iscsi(images(), &["disk.img", "disc.iso"]);
    let out = stdout(Command::new("iscsi-ls").args(["-s", &vdk.iscsi_root()]));
    assert!(out.contains("Target:iqn.2026-11.org.vdk:disk.img"), "{out}");
    assert!(out.contains("Target:iqn.2026-11.org.vdk:disc.iso"), "{out}");
    assert!(out.contains("Lun:0    Type:DIRECT_ACCESS (Size:"), "{out}");
    assert!(out.contains("Type:MMC"), "{out}");
}

#[test]
fn connections_per_initiator_address_are_limited() {
    need("iscsi-ls");
    let dir = tempfile::tempdir().unwrap();
    sparse_file(&dir.path().join("disk.img"), 16 << 20);
    let vdk = Vdk::serve_iscsi(dir, &["disk.img", "--max-connections-per-address", "2"]);
    let ls = || {
        Command::new("iscsi-ls")
            .args(["-s", &vdk.iscsi_root()])
            .output()
            .expect("run iscsi-ls")
    };
    assert!(ls().status.success());
    // Two idle connections hold both places; a third initiator is turned away.
    let portal = vdk.iscsi_root();
    let addr = portal.trim_start_matches("iscsi://").trim_end_matches('/');
    let held: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let out = ls();
    assert!(!out.status.success(), "a third connection was served");
    drop(held);
    common::wait_for(10, "the places to free up", || ls().status.success());
    assert!(vdk.log_has("connection refused"), "{}", vdk.log());
}

#[test]
fn inquiry_vpd_pages_and_capacity() {
    need("iscsi-inq");
    need("iscsi-readcapacity16");
    let vdk = Vdk::serve_iscsi(images(), &["disk.img"]);
    let url = vdk.iscsi("disk.img");
    let std = stdout(Command::new("iscsi-inq").arg(&url));
    assert!(
        std.contains("Peripheral Device Type:DIRECT_ACCESS"),
        "{std}"
    );
    assert!(std.contains("Vendor:VDK"), "{std}");
    assert!(std.contains("Product:Virtual Disk"), "{std}");
    let pages = stdout(Command::new("iscsi-inq").args(["-e", "1", &url]));
    for p in ["0x80", "0x83", "0xb0", "0xb1", "0xb2"] {
        assert!(pages.contains(&format!("Page:{p}")), "{pages}");
    }
    let serial = stdout(Command::new("iscsi-inq").args(["-e", "1", "-c", "128", &url]));
    // The NAA designator is printed as raw bytes.
    let ids = run(Command::new("iscsi-inq").args(["-e", "1", "-c", "131", &url])).stdout;
    let ids = String::from_utf8_lossy(&ids);
    let sn = serial
        .split("Unit Serial Number:[")
        .nth(1)
        .and_then(|r| r.split(']').next())
        .expect("a serial number");
    assert_eq!(sn.len(), 16, "{serial}");
    assert!(ids.contains("Designator Type:(3) NAA"), "{ids}");
    assert!(
        ids.contains(sn),
        "the T10 designator holds the serial: {ids}"
    );
    let limits = stdout(Command::new("iscsi-inq").args(["-e", "1", "-c", "176", &url]));
    assert!(limits.contains("maximum transfer length:16384"), "{limits}");
    let cap = stdout(Command::new("iscsi-readcapacity16").arg(&url));
    assert!(cap.contains("Total size:67108864"), "{cap}");
    assert!(
        cap.contains("LBPME:1"),
        "thin provisioning is advertised: {cap}"
    );
}

#[test]
fn iscsi_test_cu_passes_all_its_families() {
    let dir = tempfile::tempdir().unwrap();
    sparse_file(&dir.path().join("lun.img"), 1 << 30);
    let vdk = Vdk::serve_iscsi(dir, &["lun.img"]);
    common::iscsi_test_cu_all(&vdk.iscsi("lun.img"));
}

/// With the blocksize filter showing one logical block per physical block, every
/// GetLBAStatus test passes, UnmapSingle included (it assumes that geometry: the one test
/// `iscsi_test_cu_passes_all_its_families` lets fail).
#[test]
fn iscsi_test_cu_get_lba_status_passes_whole_with_512_byte_physical_blocks() {
    need("iscsi-readcapacity16");
    let dir = tempfile::tempdir().unwrap();
    sparse_file(&dir.path().join("lun.img"), 256 << 20);
    let vdk = Vdk::serve_iscsi(dir, &["lun.img", "--filter", "blocksize:physical=512"]);
    let url = vdk.iscsi("lun.img");
    let cap = stdout(Command::new("iscsi-readcapacity16").arg(&url));
    assert!(
        cap.contains("LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT:0"),
        "{cap}"
    );
    let (total, passed) = common::iscsi_test_cu(&url, "SCSI.GetLBAStatus", &[]);
    assert_eq!(
        (total, passed),
        (3, 3),
        "GetLBAStatus: Simple, BeyondEol, UnmapSingle"
    );
}

#[test]
fn qemu_img_reads_an_iso_lun_byte_for_byte() {
    need("qemu-img");
    let vdk = Vdk::serve_iscsi(images(), &["disc.iso"]);
    let url = vdk.iscsi("disc.iso");
    let iso = vdk.path("disc.iso");
    let info: serde_json::Value = serde_json::from_str(&stdout(Command::new("qemu-img").args([
        "info",
        "--output=json",
        &url,
    ])))
    .unwrap();
    assert_eq!(info["virtual-size"], fs::metadata(&iso).unwrap().len());
    let copy = vdk.path("copy.raw");
    run(Command::new("qemu-img").args(["convert", "-O", "raw", &url, s(&copy)]));
    assert_eq!(fs::read(&copy).unwrap(), fs::read(&iso).unwrap());
    run(Command::new("qemu-img").args(["compare", "-F", "raw", &url, s(&iso)]));
}

#[test]
fn qemu_io_writes_reach_the_image_and_read_back() {
    need("qemu-io");
    let vdk = Vdk::serve_iscsi(images(), &["disk.img"]);
    let url = vdk.iscsi("disk.img");
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 1M 3M",
        "-c",
        "flush",
        "-c",
        "read -P 0x5a 1M 3M",
        "-c",
        "write -z 2M 64k",
        "-c",
        "read -P 0 2M 64k",
        "-c",
        "discard 3M 64k",
        "-c",
        "read -P 0 3M 64k",
        &url,
    ]));
    let img = fs::read(vdk.path("disk.img")).unwrap();
    assert!(img[1 << 20..2 << 20].iter().all(|&b| b == 0x5a));
    assert!(img[2 << 20..(2 << 20) + (64 << 10)].iter().all(|&b| b == 0));
    assert!(img[(2 << 20) + (64 << 10)..3 << 20]
        .iter()
        .all(|&b| b == 0x5a));
    assert!(
        img[..1 << 20].iter().all(|&b| b == 0),
        "nothing else was written"
    );
}

#[test]
fn qemu_img_converts_an_image_into_a_lun() {
    need("qemu-img");
    let dir = images();
    let src = dir.path().join("src.raw");
    fs::write(&src, common::pattern(8 << 20, 9)).unwrap();
    sparse_file(&dir.path().join("target.img"), 8 << 20);
    let vdk = Vdk::serve_iscsi(dir, &["target.img"]);
    let url = vdk.iscsi("target.img");
    run(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw", s(&src), &url]));
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", s(&src), &url]));
    assert_eq!(
        fs::read(vdk.path("target.img")).unwrap(),
        fs::read(&src).unwrap()
    );
}

#[test]
fn a_read_only_lun_refuses_writes() {
    need("qemu-io");
    let vdk = Vdk::serve_iscsi(images(), &["--read-only", "disk.img"]);
    let url = vdk.iscsi("disk.img");
    let out = failing(Command::new("qemu-io").args(["-f", "raw", "-c", "write 0 4k", &url]));
    assert!(
        out.contains("ermission") || out.contains("read-only") || out.contains("protected"),
        "{out}"
    );
    let img = fs::read(vdk.path("disk.img")).unwrap();
    assert!(img.iter().all(|&b| b == 0));
}

fn chap_file(dir: &Path, name: &str, line: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, format!("{line}\n")).unwrap();
    p
}

#[test]
fn chap_one_way_and_mutual() {
    need("iscsi-inq");
    let dir = images();
    chap_file(dir.path(), "chap", "alice:alice-secret-123");
    chap_file(dir.path(), "mutual", "target-user:target-secret-456");
    let vdk = Vdk::serve_iscsi(
        dir,
        &[
            "--iscsi-chap",
            "chap",
            "--iscsi-mutual-chap",
            "mutual",
            "disk.img",
        ],
    );
    let url = vdk.iscsi("disk.img");
    let with = |user: &str| url.replacen("iscsi://", &format!("iscsi://{user}@"), 1);
    let out = stdout(Command::new("iscsi-inq").arg(with("alice%alice-secret-123")));
    assert!(out.contains("Vendor:VDK"), "{out}");
    failing(Command::new("iscsi-inq").arg(with("alice%wrong-secret-000")));
    failing(Command::new("iscsi-inq").arg(with("mallory%alice-secret-123")));
    failing(Command::new("iscsi-inq").arg(&url));
    // Mutual: the initiator checks the target's answer to its own challenge.
    let mutual = format!(
        "{}?target_user=target-user&target_password=target-secret-456",
        with("alice%alice-secret-123")
    );
    let out = stdout(Command::new("iscsi-inq").arg(&mutual));
    assert!(out.contains("Vendor:VDK"), "{out}");
    let wrong = format!(
        "{}?target_user=target-user&target_password=not-the-target-secret",
        with("alice%alice-secret-123")
    );
    failing(Command::new("iscsi-inq").arg(&wrong));
    assert!(vdk.log_has("iSCSI login refused"), "{}", vdk.log());
}

#[test]
fn header_digests_are_negotiated_and_used() {
    need("qemu-io");
    let vdk = Vdk::serve_iscsi(images(), &["disk.img"]);
    let portal = vdk.iscsi_root();
    let portal = portal.trim_start_matches("iscsi://").trim_end_matches('/');
    let opts = format!(
        "driver=iscsi,transport=tcp,portal={portal},target=iqn.2026-11.org.vdk:disk.img,\
         lun=0,header-digest=crc32c"
    );
    run(Command::new("qemu-io").args([
        "--image-opts",
        &opts,
        "-c",
        "write -P 0x3c 0 1M",
        "-c",
        "read -P 0x3c 0 1M",
    ]));
    assert!(vdk.log_has("header_digest=true"), "{}", vdk.log());
}

#[test]
fn only_listed_initiators_see_and_log_in() {
    need("iscsi-ls");
    let ok = "iqn.2026-11.org.example:allowed";
    let other = "iqn.2026-11.org.example:other";
    let vdk = Vdk::serve_iscsi(images(), &["--iscsi-initiator", ok, "disk.img"]);
    let url = vdk.iscsi("disk.img");
    let out = stdout(Command::new("iscsi-inq").args(["-i", ok, &url]));
    assert!(out.contains("Vendor:VDK"), "{out}");
    failing(Command::new("iscsi-inq").args(["-i", other, &url]));
    let listed = stdout(Command::new("iscsi-ls").args(["-i", ok, &vdk.iscsi_root()]));
    assert!(listed.contains("disk.img"), "{listed}");
    let hidden = stdout(Command::new("iscsi-ls").args(["-i", other, &vdk.iscsi_root()]));
    assert!(!hidden.contains("disk.img"), "{hidden}");
}

#[test]
fn flushed_writes_survive_kill_9() {
    need("qemu-io");
    let mut vdk = Vdk::serve_iscsi(images(), &["disk.img"]);
    let url = vdk.iscsi("disk.img");
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-t",
        "none",
        "-c",
        "write -P 0x77 4M 1M",
        "-c",
        "flush",
        &url,
    ]));
    vdk.kill9();
    let img = fs::read(vdk.path("disk.img")).unwrap();
    assert!(img[4 << 20..5 << 20].iter().all(|&b| b == 0x77));
}

/// Connects to the portal of `vdk`.
fn connect(vdk: &Vdk) -> TcpStream {
    let portal = vdk
        .iscsi_root()
        .trim_start_matches("iscsi://")
        .trim_end_matches('/')
        .to_owned();
    let s = TcpStream::connect(portal).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Whether the target closed `s` (EOF) after what was sent, reading whatever it answered.
fn closed(mut s: TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn hostile_bytes_close_only_their_connection() {
    need("iscsi-inq");
    let vdk = Vdk::serve_iscsi(images(), &["disk.img"]);
    // Garbage instead of a login.
    let mut s = connect(&vdk);
    s.write_all(&[0xff; 48]).unwrap();
    assert!(closed(s), "garbage must close the connection");
    // A SCSI command before login.
    let mut s = connect(&vdk);
    let mut cmd = [0u8; 48];
    cmd[0] = 0x01;
    cmd[1] = 0x80;
    cmd[32] = 0x00; // TEST UNIT READY
    s.write_all(&cmd).unwrap();
    assert!(
        closed(s),
        "a command before login must close the connection"
    );
    // A login whose data segment claims 16 MiB.
    let mut s = connect(&vdk);
    let mut login = [0u8; 48];
    login[0] = 0x43;
    login[1] = 0x87;
    login[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
    s.write_all(&login).unwrap();
    assert!(closed(s), "an oversized login must close the connection");
    // Half a header, then nothing: the login time-out is long; the server keeps serving.
    let mut half = connect(&vdk);
    half.write_all(&[0x43, 0x87, 0, 0]).unwrap();
    let out = stdout(Command::new("iscsi-inq").arg(vdk.iscsi("disk.img")));
    assert!(out.contains("Vendor:VDK"), "{out}");
    assert!(!vdk.log().contains("panicked"), "{}", vdk.log());
}

/// Logs in with a hand-made Login Request and returns the response header and text.
fn raw_login(s: &mut TcpStream, text: &str) -> ([u8; 48], String) {
    let mut bhs = [0u8; 48];
    bhs[0] = 0x43;
    bhs[1] = 0x80 | (1 << 2) | 3; // T, CSG operational, NSG full feature
    bhs[8] = 0x80; // ISID: random format
    let data = text.replace(';', "\0") + "\0";
    let len = data.len();
    bhs[5..8].copy_from_slice(&(len as u32).to_be_bytes()[1..]);
    let mut pdu = bhs.to_vec();
    pdu.extend_from_slice(data.as_bytes());
    pdu.resize(48 + len.div_ceil(4) * 4, 0);
    s.write_all(&pdu).unwrap();
    let mut rsp = [0u8; 48];
    s.read_exact(&mut rsp).unwrap();
    let dlen = u32::from_be_bytes([0, rsp[5], rsp[6], rsp[7]]) as usize;
    let mut d = vec![0u8; dlen.div_ceil(4) * 4];
    s.read_exact(&mut d).unwrap();
    d.truncate(dlen);
    (rsp, String::from_utf8_lossy(&d).replace('\0', ";"))
}

#[test]
fn login_errors_carry_the_status_the_rfc_names() {
    let vdk = Vdk::serve_iscsi(images(), &["disk.img"]);
    let mut s = connect(&vdk);
    let (rsp, _) = raw_login(
        &mut s,
        "InitiatorName=iqn.2026-11.org.example:t;TargetName=iqn.2026-11.org.vdk:nothing",
    );
    assert_eq!(rsp[0] & 0x3f, 0x23);
    assert_eq!((rsp[36], rsp[37]), (0x02, 0x03), "target not found");
    assert!(closed(s));
    let mut s = connect(&vdk);
    let (rsp, _) = raw_login(&mut s, "TargetName=iqn.2026-11.org.vdk:disk.img");
    assert_eq!((rsp[36], rsp[37]), (0x02, 0x07), "missing InitiatorName");
    let mut s = connect(&vdk);
    let (rsp, text) = raw_login(
        &mut s,
        "InitiatorName=iqn.2026-11.org.example:t;TargetName=iqn.2026-11.org.vdk:disk.img;\
         X-org.example.Unknown=1;MaxBurstLength=banana",
    );
    assert_eq!((rsp[36], rsp[37]), (0, 0), "{text}");
    assert!(
        text.contains("X-org.example.Unknown=NotUnderstood"),
        "{text}"
    );
    assert!(text.contains("MaxBurstLength=Reject"), "{text}");
    assert!(text.contains("TargetPortalGroupTag=1"), "{text}");
}

/// A hand-driven iSCSI connection, for what no initiator here negotiates: several connections
/// in one session (MC/S) and data digests. Only the PDU layout is written here; the CRC32C is
/// the one libiscsi checks vdk's header digests with (header_digests_are_negotiated_and_used).
struct Raw {
    s: TcpStream,
    digests: (bool, bool),
    cmd_sn: u32,
    itt: u32,
}

fn crc(parts: &[&[u8]]) -> [u8; 4] {
    vdk_iscsi::pdu::digest(parts).to_le_bytes()
}

impl Raw {
    fn send(&mut self, mut bhs: [u8; 48], data: &[u8], corrupt_data_digest: bool) {
        bhs[5..8].copy_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
        let mut pdu = bhs.to_vec();
        if self.digests.0 {
            pdu.extend_from_slice(&crc(&[&bhs]));
        }
        let mut padded = data.to_vec();
        padded.resize(data.len().div_ceil(4) * 4, 0);
        pdu.extend_from_slice(&padded);
        if self.digests.1 && !data.is_empty() {
            let mut d = crc(&[&padded]);
            if corrupt_data_digest {
                d[0] ^= 0xff;
            }
            pdu.extend_from_slice(&d);
        }
        self.s.write_all(&pdu).unwrap();
    }

    fn recv(&mut self) -> ([u8; 48], Vec<u8>) {
        let mut bhs = [0u8; 48];
        self.s.read_exact(&mut bhs).unwrap();
        if self.digests.0 {
            let mut d = [0u8; 4];
            self.s.read_exact(&mut d).unwrap();
            assert_eq!(d, crc(&[&bhs]), "header digest from vdk");
        }
        let len = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]) as usize;
        let mut data = vec![0u8; len.div_ceil(4) * 4];
        self.s.read_exact(&mut data).unwrap();
        if self.digests.1 && len > 0 {
            let mut d = [0u8; 4];
            self.s.read_exact(&mut d).unwrap();
            assert_eq!(d, crc(&[&data]), "data digest from vdk");
        }
        data.truncate(len);
        (bhs, data)
    }

    /// Logs in to `target` in one operational-stage request; returns the TSIH.
    fn login(vdk: &Vdk, target: &str, tsih: u16, cid: u16, keys: &str) -> (Raw, u16) {
        let mut raw = Raw {
            s: connect(vdk),
            digests: (false, false),
            cmd_sn: 1,
            itt: 1,
        };
        let mut bhs = [0u8; 48];
        bhs[0] = 0x43;
        bhs[1] = 0x80 | (1 << 2) | 3;
        bhs[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0x12, 0x34]);
        bhs[14..16].copy_from_slice(&tsih.to_be_bytes());
        bhs[20..22].copy_from_slice(&cid.to_be_bytes());
        bhs[24..28].copy_from_slice(&raw.cmd_sn.to_be_bytes());
        let text = format!(
            "InitiatorName=iqn.2026-11.org.vdk.test:raw\0TargetName={target}\0{}",
            keys.replace(';', "\0")
        );
        raw.send(bhs, text.as_bytes(), false);
        let (rsp, data) = raw.recv();
        let answer = String::from_utf8_lossy(&data).replace('\0', ";");
        assert_eq!((rsp[36], rsp[37]), (0, 0), "login refused: {answer}");
        assert_eq!(rsp[1] & 0x83, 0x83, "full feature phase: {answer}");
        raw.digests = (
            answer.contains("HeaderDigest=CRC32C"),
            answer.contains("DataDigest=CRC32C"),
        );
        let tsih = u16::from_be_bytes([rsp[14], rsp[15]]);
        (raw, tsih)
    }

    /// Sends a SCSI command (LUN 0, simple); returns (status, sense key, data).
    fn command(&mut self, cdb: &[u8], read: u32, out: &[u8], corrupt: bool) -> (u8, u8, Vec<u8>) {
        let mut bhs = [0u8; 48];
        bhs[0] = 0x01;
        bhs[1] =
            0x80 | 0x01 | if read > 0 { 0x40 } else { 0 } | if out.is_empty() { 0 } else { 0x20 };
        self.itt += 1;
        bhs[16..20].copy_from_slice(&self.itt.to_be_bytes());
        let edtl = if out.is_empty() {
            read
        } else {
            out.len() as u32
        };
        bhs[20..24].copy_from_slice(&edtl.to_be_bytes());
        self.cmd_sn += 1;
        bhs[24..28].copy_from_slice(&(self.cmd_sn - 1).to_be_bytes());
        bhs[32..32 + cdb.len()].copy_from_slice(cdb);
        self.send(bhs, out, corrupt);
        let mut data = Vec::new();
        loop {
            let (rsp, d) = self.recv();
            match rsp[0] & 0x3f {
                0x25 => {
                    data.extend_from_slice(&d);
                    if rsp[1] & 0x01 != 0 {
                        return (rsp[3], 0, data);
                    }
                }
                0x21 => {
                    let key = if d.len() > 4 { d[4] & 0x0f } else { 0 };
                    return (rsp[3], key, data);
                }
                0x3f => {
                    // A Reject (a data digest error): the command's status follows.
                    assert_eq!(rsp[2], 0x02, "reject reason: data digest error");
                }
                op => panic!("unexpected opcode {op:#x}"),
            }
        }
    }
}

#[test]
fn several_connections_share_one_session() {
    let vdk = Vdk::serve_iscsi(images(), &["disk.img"]);
    let target = "iqn.2026-11.org.vdk:disk.img";
    let (mut a, tsih) = Raw::login(&vdk, target, 0, 0, "MaxConnections=2");
    assert_ne!(tsih, 0);
    let (mut b, joined) = Raw::login(&vdk, target, tsih, 1, "");
    assert_eq!(joined, tsih, "the second connection joined the session");
    // One command window: CmdSNs run on across both connections.
    let (st, _, cap) = a.command(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8, &[], false);
    assert_eq!(st, 0);
    assert_eq!(u32::from_be_bytes([cap[4], cap[5], cap[6], cap[7]]), 512);
    b.cmd_sn = a.cmd_sn;
    let (st, _, _) = b.command(&[0, 0, 0, 0, 0, 0], 0, &[], false);
    assert_eq!(st, 0);
    // A third connection is over the negotiated MaxConnections.
    let mut c = Raw {
        s: connect(&vdk),
        digests: (false, false),
        cmd_sn: 1,
        itt: 1,
    };
    let mut bhs = [0u8; 48];
    bhs[0] = 0x43;
    bhs[1] = 0x80 | (1 << 2) | 3;
    bhs[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0x12, 0x34]);
    bhs[14..16].copy_from_slice(&tsih.to_be_bytes());
    bhs[20..22].copy_from_slice(&2u16.to_be_bytes());
    c.send(
        bhs,
        format!("InitiatorName=iqn.2026-11.org.vdk.test:raw\0TargetName={target}\0").as_bytes(),
        false,
    );
    let (rsp, _) = c.recv();
    assert_eq!((rsp[36], rsp[37]), (0x02, 0x06), "too many connections");
    // Logout of the whole session from one connection closes the other too.
    let mut lo = [0u8; 48];
    lo[0] = 0x46;
    lo[1] = 0x80;
    lo[16..20].copy_from_slice(&99u32.to_be_bytes());
    lo[24..28].copy_from_slice(&b.cmd_sn.to_be_bytes());
    a.send(lo, &[], false);
    let (rsp, _) = a.recv();
    assert_eq!(
        (rsp[0] & 0x3f, rsp[2]),
        (0x26, 0),
        "logout response: closed"
    );
    assert!(closed(b.s), "the session's other connection is closed");
}

#[test]
fn data_digests_guard_writes() {
    let vdk = Vdk::serve_iscsi(images(), &["disk.img"]);
    let (mut raw, _) = Raw::login(
        &vdk,
        "iqn.2026-11.org.vdk:disk.img",
        0,
        0,
        "HeaderDigest=CRC32C;DataDigest=CRC32C;ImmediateData=Yes",
    );
    assert_eq!(raw.digests, (true, true), "both digests negotiated");
    let block = common::pattern(512, 8);
    let write = [0x2a, 0, 0, 0, 0, 4, 0, 0, 1, 0];
    let (st, _, _) = raw.command(&write, 0, &block, false);
    assert_eq!(st, 0);
    let (st, _, back) = raw.command(&[0x28, 0, 0, 0, 0, 4, 0, 0, 1, 0], 512, &[], false);
    assert_eq!((st, &back[..]), (0, &block[..]));
    // A wrong data digest: the PDU is rejected and the write fails; the disk keeps its data.
    let other = common::pattern(512, 9);
    let (st, key, _) = raw.command(&write, 0, &other, true);
    assert_eq!((st, key), (2, 0x0b), "CHECK CONDITION, ABORTED COMMAND");
    let img = fs::read(vdk.path("disk.img")).unwrap();
    assert_eq!(&img[4 * 512..5 * 512], &block[..]);
}

#[test]
fn nop_out_pings_are_answered_with_their_data() {
    let vdk = Vdk::serve_iscsi(images(), &["disk.img"]);
    let (mut raw, _) = Raw::login(&vdk, "iqn.2026-11.org.vdk:disk.img", 0, 0, "");
    let mut nop = [0u8; 48];
    nop[0] = 0x40; // immediate NOP-Out
    nop[1] = 0x80;
    nop[16..20].copy_from_slice(&0x1234u32.to_be_bytes());
    nop[20..24].copy_from_slice(&u32::MAX.to_be_bytes());
    nop[24..28].copy_from_slice(&raw.cmd_sn.to_be_bytes());
    raw.send(nop, b"are you there", false);
    let (rsp, data) = raw.recv();
    assert_eq!(rsp[0] & 0x3f, 0x20, "NOP-In");
    assert_eq!(&rsp[16..20], &0x1234u32.to_be_bytes(), "the ping's tag");
    assert_eq!(
        &rsp[20..24],
        &u32::MAX.to_be_bytes(),
        "no target transfer tag"
    );
    assert_eq!(data, b"are you there");
    // The connection still serves commands.
    let (st, _, _) = raw.command(&[0, 0, 0, 0, 0, 0], 0, &[], false);
    assert_eq!(st, 0);
}
