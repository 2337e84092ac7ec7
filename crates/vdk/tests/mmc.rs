//! An ISO served as an MMC CD-ROM drive over iSCSI, checked command by command against MMC-6
//! and SPC-4, through libiscsi (the `scsi-shell` client of tests/helpers); and the disc
//! changed under running initiators with `vdk eject` and `vdk insert`.
#![allow(clippy::cast_possible_truncation)] // test sizes are small constants

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{need, run, Daemon, ScsiShell};

const BLOCK: usize = 2048;
/// Sense keys and codes (SPC-4 tables 48 and 49).
const NOT_READY: u8 = 0x02;
const ILLEGAL_REQUEST: u8 = 0x05;
const UNIT_ATTENTION: u8 = 0x06;
const DATA_PROTECT: u8 = 0x07;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// An ISO of `size` bytes of file data, made by xorriso, with volume id `label`.
fn iso(dir: &Path, name: &str, label: &str, size: usize) -> PathBuf {
    need("xorriso");
    let tree = dir.join(format!("{name}.tree"));
    fs::create_dir_all(&tree).unwrap();
    fs::write(tree.join("data.bin"), common::pattern(size, 7)).unwrap();
    let out = dir.join(name);
    run(Command::new("xorriso").args([
        "-as",
        "mkisofs",
        "-quiet",
        "-V",
        label,
        "-o",
        s(&out),
        s(&tree),
    ]));
    out
}

/// A daemon with an iSCSI portal on a free port and the ISO `first` open as a CD-ROM LUN.
fn drive(first: &Path) -> (Daemon, String, String) {
    need("iscsi-ls");
    let d = Daemon::new();
    let nbd = format!("unix://{}", d.path("run/nbd.sock").display());
    d.start(&["--listen", "iscsi://127.0.0.1:0", "--listen", &nbd]);
    let v = d.open(&[s(first), "--iscsi", "--attach", "none"]);
    let url = v["iscsi"][0].as_str().expect("an iSCSI URL").to_owned();
    let id = v["id"].as_str().unwrap().to_owned();
    (d, url, id)
}

fn be16(b: &[u8]) -> usize {
    usize::from(u16::from_be_bytes([b[0], b[1]]))
}

fn be32(b: &[u8]) -> u64 {
    u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// The feature descriptors of a GET CONFIGURATION answer: (code, current, data).
fn features(data: &[u8]) -> Vec<(u16, bool, Vec<u8>)> {
    let len = be32(&data[..4]) as usize + 4;
    let mut at = 8;
    let mut out = Vec::new();
    while at + 4 <= len.min(data.len()) {
        let code = be16(&data[at..]) as u16;
        let n = usize::from(data[at + 3]);
        out.push((
            code,
            data[at + 2] & 1 == 1,
            data[at + 4..at + 4 + n].to_vec(),
        ));
        at += 4 + n;
    }
    out
}

#[test]
fn every_mmc_command_answers_as_mmc_6_says() {
    let dir = tempfile::tempdir().unwrap();
    let image = iso(dir.path(), "disc.iso", "VDKMMC", 1_000_000);
    let bytes = fs::read(&image).unwrap();
    let blocks = (bytes.len() / BLOCK) as u64;
    let (_d, url, _id) = drive(&image);
    let mut sh = ScsiShell::connect(&url, "iqn.2026-11.org.vdk.test:mmc");

    // INQUIRY: a CD/DVD device (05h), removable, claiming MMC-6 (04E0h).
    let a = sh.read(&[0x12, 0, 0, 0, 96, 0], 96);
    assert_eq!(a.status, 0);
    assert_eq!(a.data[0] & 0x1f, 0x05);
    assert_eq!(a.data[1] & 0x80, 0x80, "RMB");
    let versions: Vec<usize> = (58..74).step_by(2).map(|i| be16(&a.data[i..])).collect();
    assert!(versions.contains(&0x04e0), "{versions:x?}");

    // TEST UNIT READY and READ CAPACITY: 2048-byte blocks, the last LBA of the disc.
    assert_eq!(sh.none(&[0, 0, 0, 0, 0, 0]).status, 0);
    let a = sh.read(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
    assert_eq!(be32(&a.data[..4]), blocks - 1);
    assert_eq!(be32(&a.data[4..8]), BLOCK as u64);

    // READ(10) and READ(12): the primary volume descriptor at LBA 16, as on the disc.
    let a = sh.read(&[0x28, 0, 0, 0, 0, 16, 0, 0, 1, 0], BLOCK);
    assert_eq!(a.data, bytes[16 * BLOCK..17 * BLOCK]);
    assert_eq!(&a.data[1..6], b"CD001");
    let a = sh.read(&[0xa8, 0, 0, 0, 0, 17, 0, 0, 0, 2, 0, 0], 2 * BLOCK);
    assert_eq!(a.data, bytes[17 * BLOCK..19 * BLOCK]);

    // READ TOC format 0 in LBA form: track 1 (data, ADR 1) at 0, the lead-out at the end.
    let a = sh.read(&[0x43, 0, 0, 0, 0, 0, 0, 0, 100, 0], 100);
    assert_eq!(be16(&a.data), 2 + 2 * 8, "TOC data length");
    assert_eq!((a.data[2], a.data[3]), (1, 1), "first and last track");
    assert_eq!(&a.data[4..8], &[0, 0x14, 1, 0]);
    assert_eq!(be32(&a.data[8..]), 0);
    assert_eq!(&a.data[12..16], &[0, 0x14, 0xaa, 0]);
    assert_eq!(be32(&a.data[16..]), blocks);
    // ... and in MSF form: the 2-second (150-frame) pregap, 75 frames a second.
    let a = sh.read(&[0x43, 0x02, 0, 0, 0, 0, 0, 0, 100, 0], 100);
    assert_eq!(&a.data[8..12], &[0, 0, 2, 0]);
    let lead_out = blocks + 150;
    let msf = [
        0,
        (lead_out / 4500) as u8,
        (lead_out / 75 % 60) as u8,
        (lead_out % 75) as u8,
    ];
    assert_eq!(&a.data[16..20], &msf);
    // Format 1: one session, whose first track is track 1 at LBA 0.
    let a = sh.read(&[0x43, 0, 1, 0, 0, 0, 0, 0, 12, 0], 12);
    assert_eq!(be16(&a.data), 10);
    assert_eq!((a.data[2], a.data[3]), (1, 1), "first and last session");
    assert_eq!(&a.data[4..8], &[0, 0x14, 1, 0]);
    assert_eq!(be32(&a.data[8..]), 0);
    // A format that does not exist: INVALID FIELD IN CDB, pointing at byte 2.
    let a = sh.read(&[0x43, 0, 7, 0, 0, 0, 0, 0, 12, 0], 12);
    assert!(a.is(ILLEGAL_REQUEST, 0x24, 0), "{a:?}");
    assert_eq!(a.field, Some(2));

    // GET CONFIGURATION: the CD-ROM profile is current, with the features MMC-6 lists for
    // a read-only drive with a tray.
    let a = sh.read(&[0x46, 0, 0, 0, 0, 0, 0, 0x10, 0, 0], 4096);
    assert_eq!(a.status, 0);
    assert_eq!(be16(&a.data[6..]), 0x0008, "current profile CD-ROM");
    let f = features(&a.data);
    let codes: Vec<u16> = f.iter().map(|x| x.0).collect();
    for c in [0x0000, 0x0001, 0x0002, 0x0003, 0x0010, 0x001e] {
        assert!(codes.contains(&c), "feature {c:04x} in {codes:04x?}");
    }
    let profiles = &f.iter().find(|x| x.0 == 0).unwrap().2;
    let cd = profiles
        .chunks(4)
        .find(|p| be16(p) == 0x0008)
        .expect("CD-ROM in the profile list");
    assert_eq!(cd[2] & 1, 1, "CD-ROM is the current profile");
    let core = &f.iter().find(|x| x.0 == 1).unwrap().2;
    assert_eq!(be32(core), 1, "SCSI family physical interface");
    let removable = &f.iter().find(|x| x.0 == 3).unwrap().2;
    assert_eq!(removable[0] >> 5, 1, "a tray");
    assert_eq!(removable[0] & 0x08, 0x08, "eject");
    assert_eq!(removable[0] & 0x01, 0x01, "lock");
    let random = &f.iter().find(|x| x.0 == 0x10).unwrap();
    assert!(random.1, "random readable is current with a disc");
    assert_eq!(be32(&random.2), BLOCK as u64);
    // RT=2: just the feature asked for.
    let a = sh.read(&[0x46, 2, 0, 3, 0, 0, 0, 0x10, 0, 0], 4096);
    let f = features(&a.data);
    assert_eq!(f.iter().map(|x| x.0).collect::<Vec<_>>(), vec![3]);

    // GET EVENT STATUS NOTIFICATION (polled, media class): no event, a disc present.
    let a = sh.read(&[0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8, 0], 8);
    assert_eq!(a.data[2] & 0x87, 4, "media class, events available");
    assert_eq!(a.data[3] & 0x10, 0x10, "media class supported");
    assert_eq!(a.data[4] & 0x0f, 0, "no event");
    assert_eq!(a.data[5] & 0x02, 0x02, "media present");
    // Asynchronous notification is not offered.
    let a = sh.read(&[0x4a, 0, 0, 0, 0x10, 0, 0, 0, 8, 0], 8);
    assert!(a.is(ILLEGAL_REQUEST, 0x24, 0), "{a:?}");

    // MODE SENSE(10), the CD/DVD capabilities page 2Ah: a tray that can eject and lock.
    let a = sh.read(&[0x5a, 0x08, 0x2a, 0, 0, 0, 0, 0, 255, 0], 255);
    assert_eq!(a.status, 0);
    let page = &a.data[8..];
    assert_eq!(page[0] & 0x3f, 0x2a);
    assert!(usize::from(page[1]) >= 0x14, "page length {}", page[1]);
    assert_eq!(page[6] & 0x08, 0x08, "eject");
    assert_eq!(page[6] & 0x01, 0x01, "lock");
    assert_eq!(page[6] & 0x02, 0, "not locked yet");

    // READ DISC INFORMATION: a complete disc, one complete session, track 1.
    let a = sh.read(&[0x51, 0, 0, 0, 0, 0, 0, 0, 34, 0], 34);
    assert_eq!(be16(&a.data), 32);
    assert_eq!(a.data[2] & 0x03, 2, "disc status: complete");
    assert_eq!((a.data[2] >> 2) & 0x03, 3, "last session: complete");
    assert_eq!((a.data[3], a.data[4], a.data[5], a.data[6]), (1, 1, 1, 1));
    // READ TRACK INFORMATION for track 1: a data track of the whole disc.
    let a = sh.read(&[0x52, 1, 0, 0, 0, 1, 0, 0, 48, 0], 48);
    assert_eq!(be16(&a.data), 46);
    assert_eq!((a.data[2], a.data[3]), (1, 1), "track 1, session 1");
    assert_eq!(a.data[5] & 0x0f, 4, "data track, recorded uninterrupted");
    assert_eq!(be32(&a.data[8..]), 0, "track start");
    assert_eq!(be32(&a.data[24..]), blocks, "track size");
    let a = sh.read(&[0x52, 1, 0, 0, 0, 2, 0, 0, 48, 0], 48);
    assert!(a.is(ILLEGAL_REQUEST, 0x24, 0), "no track 2: {a:?}");

    // A read-only medium: writes get DATA PROTECT, WRITE PROTECTED.
    let a = sh.write(&[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[0u8; BLOCK]);
    assert!(a.is(DATA_PROTECT, 0x27, 0), "{a:?}");
    // Reading past the end: LOGICAL BLOCK ADDRESS OUT OF RANGE.
    let lba = (blocks as u32).to_be_bytes();
    let a = sh.read(
        &[0x28, 0, lba[0], lba[1], lba[2], lba[3], 0, 0, 1, 0],
        BLOCK,
    );
    assert!(a.is(ILLEGAL_REQUEST, 0x21, 0), "{a:?}");
    // An opcode no drive has: INVALID COMMAND OPERATION CODE.
    let a = sh.none(&[0xff, 0, 0, 0, 0, 0]);
    assert!(a.is(ILLEGAL_REQUEST, 0x20, 0), "{a:?}");

    // PREVENT ALLOW MEDIUM REMOVAL: a locked tray refuses START STOP UNIT's eject.
    assert_eq!(sh.none(&[0x1e, 0, 0, 0, 1, 0]).status, 0);
    let a = sh.read(&[0x5a, 0x08, 0x2a, 0, 0, 0, 0, 0, 255, 0], 255);
    assert_eq!(a.data[8 + 6] & 0x02, 0x02, "lock state shown");
    let a = sh.none(&[0x1b, 0, 0, 0, 0x02, 0]);
    assert!(a.is(ILLEGAL_REQUEST, 0x53, 0x02), "{a:?}");
    assert_eq!(sh.none(&[0x1e, 0, 0, 0, 0, 0]).status, 0);

    // START STOP UNIT: eject opens the tray (NOT READY, MEDIUM NOT PRESENT - TRAY OPEN),
    // load closes it and the disc is back.
    assert_eq!(sh.none(&[0x1b, 0, 0, 0, 0x02, 0]).status, 0);
    let a = sh.none(&[0, 0, 0, 0, 0, 0]);
    assert!(a.is(NOT_READY, 0x3a, 0x02), "{a:?}");
    let a = sh.read(&[0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8, 0], 8);
    assert_eq!(a.data[4] & 0x0f, 3, "media removal event");
    assert_eq!(a.data[5] & 0x03, 0x01, "no media, tray open");
    assert_eq!(sh.none(&[0x1b, 0, 0, 0, 0x03, 0]).status, 0);
    assert_eq!(sh.none(&[0, 0, 0, 0, 0, 0]).status, 0);
    let a = sh.read(&[0x28, 0, 0, 0, 0, 16, 0, 0, 1, 0], BLOCK);
    assert_eq!(a.data, bytes[16 * BLOCK..17 * BLOCK]);
}

/// The EDC of ECMA-130 14.3, bit by bit: CRC-32 of (x^16+x^15+x^2+1)(x^16+x^2+x+1), least
/// significant bit first.
fn edc(data: &[u8]) -> u32 {
    let mut crc = 0u32;
    for &b in data {
        for bit in 0..8 {
            let x = (crc ^ u32::from(b >> bit)) & 1;
            crc = (crc >> 1) ^ if x != 0 { 0xd801_8001 } else { 0 };
        }
    }
    crc
}

/// What Linux's sr and udev's cdrom_id, and Windows' cdrom class driver, ask of a disc beyond
/// the basics: READ CD (raw sectors), READ TOC format 2 (the full TOC), GET PERFORMANCE, SET
/// CD SPEED, and READ DISC STRUCTURE, which a DVD-size image answers and a CD refuses.
#[test]
fn raw_sectors_full_toc_performance_and_dvd_structures_answer_as_mmc_6_says() {
    let dir = tempfile::tempdir().unwrap();
    let image = iso(dir.path(), "disc.iso", "VDKRAW", 300_000);
    let bytes = fs::read(&image).unwrap();
    let blocks = (bytes.len() / BLOCK) as u64;
    let (d, url, _id) = drive(&image);
    let mut sh = ScsiShell::connect(&url, "iqn.2026-11.org.vdk.test:raw");
    let read_cd = |lba: u32, count: u32, b1: u8, b9: u8, b10: u8| {
        let l = lba.to_be_bytes();
        let c = count.to_be_bytes();
        vec![
            0xbe, b1, l[0], l[1], l[2], l[3], c[1], c[2], c[3], b9, b10, 0,
        ]
    };
    // Everything (F8h) of LBA 16..18: sync, the BCD address after the 2 s pregap, mode 1,
    // the volume descriptors, the EDC of what precedes it, eight zeroes, 276 bytes of parity.
    let a = sh.read(&read_cd(16, 2, 0, 0xf8, 0), 2 * 2352);
    assert_eq!(a.status, 0, "{a:?}");
    assert_eq!(a.data.len(), 2 * 2352);
    for (i, raw) in a.data.chunks(2352).enumerate() {
        let lba = 16 + i;
        assert_eq!(
            &raw[..12],
            &[0, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 0]
        );
        let frames = lba + 150;
        let bcd = |v: usize| (((v / 10) << 4) | (v % 10)) as u8;
        assert_eq!(
            &raw[12..16],
            &[
                bcd(frames / 4500),
                bcd(frames / 75 % 60),
                bcd(frames % 75),
                1
            ]
        );
        assert_eq!(&raw[16..2064], &bytes[lba * BLOCK..(lba + 1) * BLOCK]);
        assert_eq!(
            u32::from_le_bytes(raw[2064..2068].try_into().unwrap()),
            edc(&raw[..2064])
        );
        assert_eq!(&raw[2068..2076], &[0; 8]);
        assert!(raw[2076..].iter().any(|&b| b != 0), "parity present");
    }
    // User data alone (10h, sector type mode 1) is the image; header and data (30h) and
    // user data with EDC/ECC (18h) are the parts of the raw sector.
    let a = sh.read(&read_cd(17, 3, 2 << 2, 0x10, 0), 3 * BLOCK);
    assert_eq!(a.data, bytes[17 * BLOCK..20 * BLOCK]);
    let raw = sh.read(&read_cd(17, 1, 0, 0xf8, 0), 2352).data;
    let a = sh.read(&read_cd(17, 1, 0, 0x30, 0), 2052);
    assert_eq!(a.data, raw[12..2064]);
    let a = sh.read(&read_cd(17, 1, 0, 0x18, 0), 2336);
    assert_eq!(a.data, raw[16..]);
    let a = sh.read(&read_cd(17, 1, 0, 0xa0, 0), 16);
    assert_eq!(a.data, raw[..16]);
    // Refused per MMC-6: an audio (CD-DA) or mode 2 sector type on this data track; parts
    // that are not adjacent (sync and user data), the sync alone, EDC alone; C2 error
    // pointers and sub-channel data, which mode page 2Ah does not offer.
    for b1 in [1u8 << 2, 3 << 2, 4 << 2, 5 << 2] {
        let a = sh.read(&read_cd(16, 1, b1, 0x10, 0), 2352);
        assert!(a.is(ILLEGAL_REQUEST, 0x64, 0), "type {b1:#x}: {a:?}");
    }
    for b9 in [0x90u8, 0x80, 0x08, 0x28] {
        let a = sh.read(&read_cd(16, 1, 0, b9, 0), 2352);
        assert!(a.is(ILLEGAL_REQUEST, 0x24, 0), "{b9:#x}: {a:?}");
        assert_eq!(a.field, Some(9));
    }
    let a = sh.read(&read_cd(16, 1, 0, 0x12, 0), 2352);
    assert!(a.is(ILLEGAL_REQUEST, 0x24, 0), "{a:?}");
    let a = sh.read(&read_cd(16, 1, 0, 0x10, 1), 2352);
    assert!(a.is(ILLEGAL_REQUEST, 0x24, 0), "{a:?}");
    assert_eq!(a.field, Some(10));
    // Past the end of the disc.
    let a = sh.read(&read_cd(blocks as u32, 1, 0, 0x10, 0), 2048);
    assert!(a.is(ILLEGAL_REQUEST, 0x21, 0), "{a:?}");

    // READ TOC format 2: session 1 of 1; points A0 (first track 1, CD-ROM), A1 (last track
    // 1), A2 (the lead-out, in MSF) and track 1 at 00:02:00.
    let a = sh.read(&[0x43, 0x02, 2, 0, 0, 0, 1, 0, 255, 0], 255);
    assert_eq!(a.status, 0, "{a:?}");
    assert_eq!(be16(&a.data), 2 + 4 * 11);
    assert_eq!((a.data[2], a.data[3]), (1, 1), "first and last session");
    let entries: Vec<&[u8]> = a.data[4..].chunks(11).collect();
    let point = |p: u8| *entries.iter().find(|e| e[3] == p).expect("TOC point");
    assert_eq!(&point(0xa0)[8..11], &[1, 0, 0]);
    assert_eq!(&point(0xa1)[8..11], &[1, 0, 0]);
    let lead_out = blocks + 150;
    assert_eq!(
        &point(0xa2)[8..11],
        &[
            (lead_out / 4500) as u8,
            (lead_out / 75 % 60) as u8,
            (lead_out % 75) as u8
        ]
    );
    assert_eq!(&point(1)[8..11], &[0, 2, 0]);
    assert!(entries.iter().all(|e| e[0] == 1 && e[1] == 0x14));
    let a = sh.read(&[0x43, 0x02, 2, 0, 0, 0, 2, 0, 255, 0], 255);
    assert!(a.is(ILLEGAL_REQUEST, 0x24, 0), "session 2: {a:?}");

    // GET PERFORMANCE, nominal read performance: one descriptor from the LBA asked to the
    // last one, at the speed mode page 2Ah reports; write speeds: none.
    let a = sh.read(&[0xac, 0, 0, 0, 0, 10, 0, 0, 0, 4, 0, 0], 8 + 4 * 16);
    assert_eq!(a.status, 0, "{a:?}");
    assert_eq!(be32(&a.data), 4 + 16);
    let desc = &a.data[8..24];
    assert_eq!(be32(desc), 10);
    assert_eq!(be32(&desc[8..]), blocks - 1);
    assert_eq!(be32(&desc[4..]), 176 * 48);
    assert_eq!(be32(&desc[12..]), 176 * 48);
    let a = sh.read(&[0xac, 0, 0, 0, 0, 0, 0, 0, 0, 4, 3, 0], 64);
    assert_eq!((a.status, be32(&a.data)), (0, 4), "no write speeds: {a:?}");
    let a = sh.read(&[0xac, 0, 0, 0, 0, 0, 0, 0, 0, 4, 1, 0], 64);
    assert!(a.is(ILLEGAL_REQUEST, 0x24, 0), "{a:?}");
    // SET CD SPEED is taken.
    assert_eq!(
        sh.none(&[0xbb, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0])
            .status,
        0
    );

    // READ DISC STRUCTURE on a CD: the list of structures a DVD would answer; the
    // structures themselves, INCOMPATIBLE FORMAT.
    let a = sh.read(&[0xad, 0, 0, 0, 0, 0, 0, 0xff, 0, 64, 0, 0], 64);
    assert_eq!(a.status, 0, "{a:?}");
    let codes: Vec<u8> = a.data[4..].chunks(4).map(|c| c[0]).collect();
    assert_eq!(codes, vec![0x00, 0x01, 0x04, 0xff]);
    let a = sh.read(&[0xad, 0, 0, 0, 0, 0, 0, 0, 0x08, 4, 0, 0], 2052);
    assert!(a.is(ILLEGAL_REQUEST, 0x30, 2), "{a:?}");
    drop(sh);
    drop(d);

    // A DVD-size image (past a CD's 80 minutes): READ DISC STRUCTURE answers, READ CD does
    // not (a DVD has no CD sectors).
    let big = dir.path().join("dvd.iso");
    fs::copy(&image, &big).unwrap();
    fs::File::options()
        .write(true)
        .open(&big)
        .unwrap()
        .set_len(800 << 20)
        .unwrap();
    let dvd_blocks = (800u64 << 20) / BLOCK as u64;
    let (_d, url, _id) = drive(&big);
    let mut sh = ScsiShell::connect(&url, "iqn.2026-11.org.vdk.test:dvd");
    let a = sh.read(&[0xad, 0, 0, 0, 0, 0, 0, 0, 0x08, 4, 0, 0], 2052);
    assert_eq!(a.status, 0, "{a:?}");
    assert_eq!(be16(&a.data), 2050);
    let p = &a.data[4..];
    assert_eq!(p[0] >> 4, 0, "DVD-ROM book");
    assert_eq!((p[2] >> 5) & 3, 0, "one layer");
    assert_eq!(be32(&p[4..]), 0x30000);
    assert_eq!(be32(&p[8..]), 0x30000 + dvd_blocks - 1);
    let a = sh.read(&[0xad, 0, 0, 0, 0, 0, 0, 1, 0, 8, 0, 0], 8);
    assert_eq!(
        (a.status, be16(&a.data)),
        (0, 6),
        "copyright information: {a:?}"
    );
    assert_eq!(a.data[4], 0, "no copy protection");
    let a = sh.read(&[0xad, 0, 0, 0, 0, 0, 1, 0, 0x08, 4, 0, 0], 2052);
    assert!(a.is(ILLEGAL_REQUEST, 0x24, 0), "layer 1: {a:?}");
    let a = sh.read(&[0xad, 1, 0, 0, 0, 0, 0, 0, 0x08, 4, 0, 0], 2052);
    assert!(a.is(ILLEGAL_REQUEST, 0x24, 0), "BD media type: {a:?}");
    let a = sh.read(&read_cd(16, 1, 0, 0x10, 0), 2048);
    assert!(a.is(ILLEGAL_REQUEST, 0x30, 2), "{a:?}");
    let a = sh.read(&[0xac, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], 24);
    assert_eq!(be32(&a.data[12..]), 16 * 1385, "DVD speed");
}

#[test]
fn vdk_eject_and_insert_change_the_disc_under_initiators() {
    let dir = tempfile::tempdir().unwrap();
    let one = iso(dir.path(), "one.iso", "ONE", 300_000);
    let two = iso(dir.path(), "two.iso", "TWO", 3_000_000);
    let two_bytes = fs::read(&two).unwrap();
    let (d, url, id) = drive(&one);
    let mut a = ScsiShell::connect(&url, "iqn.2026-11.org.vdk.test:a");
    let mut b = ScsiShell::connect(&url, "iqn.2026-11.org.vdk.test:b");
    assert_eq!(a.none(&[0, 0, 0, 0, 0, 0]).status, 0);
    assert_eq!(b.none(&[0, 0, 0, 0, 0, 0]).status, 0);

    // An initiator that locked the tray keeps `vdk eject` out; --force overrides it.
    assert_eq!(a.none(&[0x1e, 0, 0, 0, 1, 0]).status, 0);
    let err = d.fails(&["eject", &id]);
    assert!(err.contains("prevents the removal"), "{err}");
    let v = d.json(&["eject", &id, "--force"]);
    assert_eq!(v["ejected"], true);
    assert_eq!(
        v["nbd"],
        serde_json::json!([]),
        "no NBD export without a disc"
    );

    // Every initiator learns of it once (UNIT ATTENTION, MEDIUM MAY HAVE CHANGED), then sees
    // an empty drive.
    for sh in [&mut a, &mut b] {
        let r = sh.none(&[0, 0, 0, 0, 0, 0]);
        assert!(r.is(UNIT_ATTENTION, 0x28, 0), "{r:?}");
        let r = sh.none(&[0, 0, 0, 0, 0, 0]);
        assert!(r.is(NOT_READY, 0x3a, 0x02), "{r:?}");
        let r = sh.read(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
        assert!(r.is(NOT_READY, 0x3a, 0x02), "{r:?}");
    }
    let r = b.read(&[0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8, 0], 8);
    assert_eq!(r.data[4] & 0x0f, 3, "media removal event");
    // With the drive empty, the image file is closed: it could be replaced.
    assert!(d.log_has("disc ejected"), "{}", d.log());

    // A new disc: attention again, a new-media event, and its size and bytes.
    let v = d.json(&["insert", &id, s(&two)]);
    assert_eq!(v["ejected"], false);
    assert_eq!(v["size"], two_bytes.len());
    assert_eq!(v["image"], s(&fs::canonicalize(&two).unwrap()));
    let r = b.read(&[0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8, 0], 8);
    assert_eq!(r.data[4] & 0x0f, 2, "new media event");
    assert_eq!(r.data[5] & 0x02, 0x02, "media present");
    for sh in [&mut a, &mut b] {
        let r = sh.none(&[0, 0, 0, 0, 0, 0]);
        assert!(r.is(UNIT_ATTENTION, 0x28, 0), "{r:?}");
        assert_eq!(sh.none(&[0, 0, 0, 0, 0, 0]).status, 0);
        let r = sh.read(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
        assert_eq!(be32(&r.data[..4]) + 1, (two_bytes.len() / BLOCK) as u64);
        let r = sh.read(&[0x28, 0, 0, 0, 0, 16, 0, 0, 1, 0], BLOCK);
        assert_eq!(r.data, two_bytes[16 * BLOCK..17 * BLOCK]);
        assert_eq!(&r.data[40..43], b"TWO", "the new volume id");
    }
    // The NBD export is back, with the new disc.
    let list = d.json(&["list"]);
    let nbd = list[0]["nbd"][0]
        .as_str()
        .expect("an NBD export again")
        .to_owned();
    need("qemu-img");
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", &nbd, s(&two)]));

    // Only ISO images go in a drive, and only drives take them.
    let raw = dir.path().join("raw.img");
    common::sparse_file(&raw, 1 << 20);
    let err = d.fails(&["insert", &id, s(&raw)]);
    assert!(err.contains("not a CD/DVD image"), "{err}");
    let disk = d.open(&[s(&dir.path().join("plain.img")), "1M", "--attach", "none"]);
    let err = d.fails(&["eject", disk["id"].as_str().unwrap()]);
    assert!(err.contains("not a CD-ROM disk"), "{err}");
}
