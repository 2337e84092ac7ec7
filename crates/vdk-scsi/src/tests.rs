use std::sync::Arc;

use vdk_backends::MemoryDisk;
use vdk_core::BlockDevice;

use super::*;
use crate::sense::key;

fn disk_target(size: u64) -> (Target, Arc<MemoryDisk>) {
    let mem = Arc::new(MemoryDisk::new(size));
    let t = Target::new();
    let lu = LogicalUnit::new(
        DeviceType::Disk,
        Identity::from_name("test", DeviceType::Disk),
        Some(mem.clone()),
    );
    t.add(0, Arc::new(lu));
    (t, mem)
}

fn cd_target(size: u64) -> (Target, Arc<LogicalUnit>) {
    let mem = Arc::new(MemoryDisk::new(size));
    let t = Target::new();
    let lu = Arc::new(LogicalUnit::new(
        DeviceType::CdRom,
        Identity::from_name("cd", DeviceType::CdRom),
        Some(mem),
    ));
    t.add(0, lu.clone());
    (t, lu)
}

fn run(t: &Target, cdb: &[u8], out: &[u8]) -> Response {
    run_on(t, 1, cdb, out)
}

fn run_on(t: &Target, nexus: u64, cdb: &[u8], out: &[u8]) -> Response {
    let mut c = cdb.to_vec();
    c.resize(16, 0);
    t.execute(
        encode_lun(0),
        &Request {
            nexus,
            initiator: "",
            cdb: &c,
            data_out: out,
        },
    )
}

fn sense_of(r: &Response) -> (u8, u8, u8) {
    let s = r.sense.expect("sense");
    (s.key, s.asc, s.ascq)
}

#[test]
fn inquiry_reports_a_disk() {
    let (t, _) = disk_target(1 << 20);
    let r = run(&t, &[0x12, 0, 0, 0, 96, 0], &[]);
    assert_eq!(r.status, status::GOOD);
    assert_eq!(r.data.len(), 96);
    assert_eq!(r.data[0], 0);
    assert_eq!(&r.data[8..11], b"VDK");
}

#[test]
fn inquiry_is_cut_to_the_allocation_length() {
    let (t, _) = disk_target(1 << 20);
    let r = run(&t, &[0x12, 0, 0, 0, 5, 0], &[]);
    assert_eq!(r.data.len(), 5);
}

#[test]
fn vpd_pages_are_listed_and_served() {
    let (t, _) = disk_target(1 << 20);
    let r = run(&t, &[0x12, 1, 0, 0, 255, 0], &[]);
    let pages = r.data[4..].to_vec();
    assert_eq!(pages, vec![0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
    for p in pages {
        let r = run(&t, &[0x12, 1, p, 1, 0, 0], &[]);
        assert_eq!(r.status, status::GOOD, "page {p:#x}");
        assert_eq!(r.data[1], p);
        let len = usize::from(u16::from_be_bytes([r.data[2], r.data[3]]));
        assert_eq!(r.data.len(), len + 4, "page {p:#x}");
    }
}

#[test]
fn unknown_vpd_page_points_at_byte_2() {
    let (t, _) = disk_target(1 << 20);
    let r = run(&t, &[0x12, 1, 0x99, 0, 255, 0], &[]);
    let s = r.sense.unwrap();
    assert_eq!((s.key, s.asc), (key::ILLEGAL_REQUEST, 0x24));
    assert_eq!(s.field.unwrap().byte, 2);
}

#[test]
fn missing_lun_inquiry_has_qualifier_3() {
    let (t, _) = disk_target(1 << 20);
    let r = t.execute(
        encode_lun(5),
        &Request {
            nexus: 1,
            initiator: "",
            cdb: &[0x12, 0, 0, 0, 36, 0],
            data_out: &[],
        },
    );
    assert_eq!(r.data[0], 0x7f);
    let r = t.execute(
        encode_lun(5),
        &Request {
            nexus: 1,
            initiator: "",
            cdb: &[0x00, 0, 0, 0, 0, 0],
            data_out: &[],
        },
    );
    assert_eq!(sense_of(&r), (key::ILLEGAL_REQUEST, 0x25, 0));
}

#[test]
fn write_then_read_round_trips() {
    let (t, mem) = disk_target(1 << 20);
    let data = vec![0xabu8; 1024];
    let r = run(&t, &[0x2a, 0, 0, 0, 0, 4, 0, 0, 2, 0], &data);
    assert_eq!(r.status, status::GOOD);
    assert_eq!(r.data_out_len, Some(1024));
    let r = run(&t, &[0x28, 0, 0, 0, 0, 4, 0, 0, 2, 0], &[]);
    assert_eq!(r.data, data);
    let mut b = vec![0u8; 512];
    mem.read_at(&mut b, 4 * 512).unwrap();
    assert_eq!(b, vec![0xab; 512]);
}

#[test]
fn read6_zero_length_means_256_blocks() {
    let (t, _) = disk_target(1 << 20);
    let r = run(&t, &[0x08, 0, 0, 0, 0, 0], &[]);
    assert_eq!(r.data.len(), 256 * 512);
}

#[test]
fn read_past_the_end_is_lba_out_of_range() {
    let (t, _) = disk_target(1 << 20);
    let r = run(
        &t,
        &[0x88, 0, 0, 0, 0, 0, 0, 0, 0x07, 0xff, 0, 0, 0, 2, 0, 0],
        &[],
    );
    assert_eq!(sense_of(&r), (key::ILLEGAL_REQUEST, 0x21, 0));
}

#[test]
fn protection_fields_are_refused() {
    let (t, _) = disk_target(1 << 20);
    let r = run(&t, &[0x28, 0x20, 0, 0, 0, 0, 0, 0, 1, 0], &[]);
    let s = r.sense.unwrap();
    assert_eq!((s.key, s.asc), (key::ILLEGAL_REQUEST, 0x24));
    assert_eq!(s.field.unwrap().byte, 1);
}

#[test]
fn short_data_out_writes_the_whole_blocks_sent() {
    let (t, mem) = disk_target(1 << 20);
    let r = run(&t, &[0x2a, 0, 0, 0, 0, 0, 0, 0, 2, 0], &[1u8; 700]);
    assert_eq!(r.status, status::GOOD);
    assert_eq!(
        r.data_out_len,
        Some(1024),
        "the transport reports the residual"
    );
    let mut back = [9u8; 1024];
    mem.read_at(&mut back, 0).unwrap();
    assert!(back[..512].iter().all(|&b| b == 1));
    assert!(
        back[512..].iter().all(|&b| b == 0),
        "the partial block is not written"
    );
}

#[test]
fn write_same_needs_exactly_one_block_of_data() {
    let (t, _) = disk_target(1 << 20);
    let r = run(&t, &[0x41, 0, 0, 0, 0, 0, 0, 0, 4, 0], &[1u8; 256]);
    assert_eq!(sense_of(&r).0, key::ILLEGAL_REQUEST);
    let r = run(&t, &[0x41, 0, 0, 0, 0, 0, 0, 0, 4, 0], &[1u8; 1024]);
    assert_eq!(sense_of(&r).0, key::ILLEGAL_REQUEST);
}

#[test]
fn compare_and_write_needs_data_of_its_length() {
    let (t, _) = disk_target(1 << 20);
    let mut cdb = [0u8; 16];
    cdb[0] = 0x89;
    cdb[13] = 1;
    let r = run(&t, &cdb, &[0u8; 2048]);
    assert_eq!(sense_of(&r), (key::ILLEGAL_REQUEST, 0x24, 0));
    cdb[13] = 0; // a count of 256 that wrapped, with 256 blocks of data
    let r = run(&t, &cdb, &[0u8; 1024]);
    assert_eq!(sense_of(&r), (key::ILLEGAL_REQUEST, 0x24, 0));
}

#[test]
fn read_capacity_10_and_16() {
    let (t, _) = disk_target(1 << 20);
    let r = run(&t, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(r.data, [0, 0, 0x07, 0xff, 0, 0, 2, 0]);
    let r = run(
        &t,
        &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
        &[],
    );
    assert_eq!(&r.data[..12], &[0, 0, 0, 0, 0, 0, 0x07, 0xff, 0, 0, 2, 0]);
    assert_eq!(r.data[14] & 0xc0, 0xc0);
}

#[test]
fn unmap_zeroes_and_get_lba_status_sees_it() {
    let (t, mem) = disk_target(1 << 20);
    mem.write_at(&[7u8; 4096], 0, false).unwrap();
    let mut p = vec![0u8; 24];
    p[1] = 22;
    p[3] = 16;
    p[8 + 7] = 2; // LBA 2
    p[8 + 11] = 4; // 4 blocks
    let r = run(&t, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &p);
    assert_eq!(r.status, status::GOOD);
    let mut b = vec![0u8; 4096];
    mem.read_at(&mut b, 0).unwrap();
    assert!(b[1024..3072].iter().all(|&x| x == 0));
    assert!(b[..1024].iter().all(|&x| x == 7));
    let r = run(
        &t,
        &[0x9e, 0x12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        &[],
    );
    assert_eq!(r.status, status::GOOD);
    assert!(r.data.len() >= 24);
    assert_eq!(&r.data[8..16], &0u64.to_be_bytes());
}

#[test]
fn write_same_fills_blocks() {
    let (t, mem) = disk_target(1 << 20);
    let r = run(&t, &[0x41, 0, 0, 0, 0, 1, 0, 0, 3, 0], &[9u8; 512]);
    assert_eq!(r.status, status::GOOD);
    let mut b = vec![0u8; 2048];
    mem.read_at(&mut b, 0).unwrap();
    assert!(b[512..2048].iter().all(|&x| x == 9));
    assert!(b[..512].iter().all(|&x| x == 0));
    let r = run(&t, &[0x41, 0, 0, 0, 0, 1, 0, 0, 0, 0], &[9u8; 512]);
    assert_eq!(r.status, status::CHECK_CONDITION, "WSNZ");
}

#[test]
fn verify_finds_a_miscompare_and_its_offset() {
    let (t, mem) = disk_target(1 << 20);
    mem.write_at(&[1u8; 512], 0, false).unwrap();
    let mut want = vec![1u8; 512];
    let r = run(&t, &[0x2f, 0x02, 0, 0, 0, 0, 0, 0, 1, 0], &want);
    assert_eq!(r.status, status::GOOD);
    want[100] = 2;
    let r = run(&t, &[0x2f, 0x02, 0, 0, 0, 0, 0, 0, 1, 0], &want);
    assert_eq!(sense_of(&r), (key::MISCOMPARE, 0x1d, 0));
    assert_eq!(r.sense.unwrap().info, Some(100));
}

#[test]
fn compare_and_write_writes_only_on_a_match() {
    let (t, mem) = disk_target(1 << 20);
    let mut out = vec![0u8; 512];
    out.extend(vec![5u8; 512]);
    let cdb = [0x89, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0];
    assert_eq!(run(&t, &cdb, &out).status, status::GOOD);
    let r = run(&t, &cdb, &out);
    assert_eq!(sense_of(&r), (key::MISCOMPARE, 0x1d, 0));
    let mut b = vec![0u8; 512];
    mem.read_at(&mut b, 0).unwrap();
    assert_eq!(b, vec![5u8; 512]);
}

#[test]
fn mode_sense_all_pages_has_caching_and_control() {
    let (t, _) = disk_target(1 << 20);
    let r = run(&t, &[0x1a, 0, 0x3f, 0, 255, 0], &[]);
    assert_eq!(r.status, status::GOOD);
    assert_eq!(usize::from(r.data[0]) + 1, r.data.len());
    assert_eq!(r.data[3], 8, "one block descriptor");
    let pages: Vec<u8> = {
        let mut v = Vec::new();
        let mut at = 4 + 8;
        while at < r.data.len() {
            v.push(r.data[at] & 0x3f);
            at += usize::from(r.data[at + 1]) + 2;
        }
        v
    };
    assert_eq!(pages, vec![0x01, 0x08, 0x0a]);
}

#[test]
fn mode_select_turns_the_write_cache_off_and_tells_other_initiators() {
    let (t, _) = disk_target(1 << 20);
    run_on(&t, 2, &[0x00, 0, 0, 0, 0, 0], &[]);
    let r = run(&t, &[0x1a, 0x08, 0x08, 0, 255, 0], &[]);
    let mut params = r.data.clone();
    params[0] = 0;
    params[4 + 2] &= !0x04;
    let r = run(
        &t,
        &[0x15, 0x10, 0, 0, u8::try_from(params.len()).unwrap(), 0],
        &params,
    );
    assert_eq!(r.status, status::GOOD, "{:?}", r.sense);
    let r = run(&t, &[0x1a, 0x08, 0x08, 0, 255, 0], &[]);
    assert_eq!(r.data[4 + 2] & 0x04, 0);
    let r = run_on(&t, 2, &[0x00, 0, 0, 0, 0, 0], &[]);
    assert_eq!(sense_of(&r), (key::UNIT_ATTENTION, 0x2a, 0x01));
}

#[test]
fn mode_select_of_an_unchangeable_field_is_refused() {
    let (t, _) = disk_target(1 << 20);
    let r = run(&t, &[0x1a, 0x08, 0x0a, 0, 255, 0], &[]);
    let mut params = r.data.clone();
    params[0] = 0;
    params[4 + 2] |= 0x04; // D_SENSE
    let r = run(
        &t,
        &[0x15, 0x10, 0, 0, u8::try_from(params.len()).unwrap(), 0],
        &params,
    );
    let s = r.sense.unwrap();
    assert_eq!((s.key, s.asc), (key::ILLEGAL_REQUEST, 0x26));
}

#[test]
fn saved_mode_pages_are_not_supported() {
    let (t, _) = disk_target(1 << 20);
    let r = run(&t, &[0x1a, 0, 0xc8, 0, 255, 0], &[]);
    assert_eq!(sense_of(&r), (key::ILLEGAL_REQUEST, 0x39, 0));
}

#[test]
fn report_luns_lists_every_lun() {
    let (t, _) = disk_target(1 << 20);
    t.add(3, t.lun(0).unwrap());
    let r = run(&t, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
    assert_eq!(&r.data[..4], &16u32.to_be_bytes());
    assert_eq!(r.data[8 + 1], 0);
    assert_eq!(r.data[16 + 1], 3);
}

#[test]
fn reservation_conflicts_for_other_nexuses_until_lost() {
    let (t, _) = disk_target(1 << 20);
    assert_eq!(
        run_on(&t, 1, &[0x16, 0, 0, 0, 0, 0], &[]).status,
        status::GOOD
    );
    let r = run_on(&t, 2, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[]);
    assert_eq!(r.status, status::RESERVATION_CONFLICT);
    t.nexus_lost(1);
    let r = run_on(&t, 2, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[]);
    assert_eq!(r.status, status::GOOD);
}

#[test]
fn lun_reset_raises_a_unit_attention() {
    let (t, _) = disk_target(1 << 20);
    run(&t, &[0x00, 0, 0, 0, 0, 0], &[]);
    assert!(t.lun_reset(encode_lun(0)));
    let r = run(&t, &[0x00, 0, 0, 0, 0, 0], &[]);
    assert_eq!(sense_of(&r), (key::UNIT_ATTENTION, 0x29, 0));
    assert_eq!(run(&t, &[0x00, 0, 0, 0, 0, 0], &[]).status, status::GOOD);
}

#[test]
fn a_grown_disk_tells_every_initiator_and_reads_its_new_capacity() {
    let (t, disk) = disk_target(1 << 20);
    let lu = t.lun(0).unwrap();
    run_on(&t, 1, &[0x00, 0, 0, 0, 0, 0], &[]);
    run_on(&t, 2, &[0x00, 0, 0, 0, 0, 0], &[]);
    disk.grow(4 << 20).unwrap();
    lu.capacity_changed();
    for n in [1, 2] {
        let r = run_on(&t, n, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
        assert_eq!(sense_of(&r), (key::UNIT_ATTENTION, 0x2a, 0x09));
        let r = run_on(&t, n, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
        assert_eq!(r.status, status::GOOD);
        // The last LBA of 8192 blocks of 512 bytes.
        assert_eq!(r.data, [0, 0, 0x1f, 0xff, 0, 0, 2, 0]);
    }
    // Blocks past the old end are there, and read as zeroes.
    let r = run(&t, &[0x28, 0, 0, 0, 0x1f, 0xff, 0, 0, 1, 0], &[]);
    assert_eq!(r.status, status::GOOD);
    assert!(r.data.iter().all(|&b| b == 0));
}

#[test]
fn naca_is_refused() {
    let (t, _) = disk_target(1 << 20);
    let r = run(&t, &[0x00, 0, 0, 0, 0, 0x04], &[]);
    assert_eq!(r.sense.unwrap().field.unwrap().byte, 5);
}

#[test]
fn cd_inquiry_is_removable_type_5() {
    let (t, _) = cd_target(2048 * 100);
    let r = run(&t, &[0x12, 0, 0, 0, 36, 0], &[]);
    assert_eq!(r.data[0], 5);
    assert_eq!(r.data[1], 0x80);
    let r = run(&t, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(r.data, [0, 0, 0, 99, 0, 0, 8, 0]);
}

#[test]
fn cd_refuses_writes_as_write_protected() {
    let (t, _) = cd_target(2048 * 100);
    let r = run(&t, &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[0u8; 2048]);
    assert_eq!(sense_of(&r), (key::DATA_PROTECT, 0x27, 0));
}

#[test]
fn cd_toc_has_one_track_and_the_lead_out() {
    let (t, _) = cd_target(2048 * 100);
    let r = run(&t, &[0x43, 0, 0, 0, 0, 0, 0, 0, 255, 0], &[]);
    assert_eq!(r.data.len(), 4 + 16);
    assert_eq!(&r.data[..4], &[0, 18, 1, 1]);
    assert_eq!(r.data[4 + 2], 1);
    assert_eq!(r.data[12 + 2], 0xaa);
    assert_eq!(&r.data[16..20], &100u32.to_be_bytes());
    // MSF: the lead-out at LBA 100 is 00:03:25 (100 + 150 frames).
    let r = run(&t, &[0x43, 0x02, 0, 0, 0, 0, 0, 0, 255, 0], &[]);
    assert_eq!(&r.data[16..20], &[0, 0, 3, 25]);
}

#[test]
fn cd_eject_needs_removal_allowed_and_raises_events() {
    let (t, lu) = cd_target(2048 * 100);
    run(&t, &[0x00, 0, 0, 0, 0, 0], &[]);
    assert_eq!(run(&t, &[0x1e, 0, 0, 0, 1, 0], &[]).status, status::GOOD);
    let r = run(&t, &[0x1b, 0, 0, 0, 0x02, 0], &[]);
    assert_eq!(sense_of(&r), (key::ILLEGAL_REQUEST, 0x53, 0x02));
    assert!(lu.eject(false).is_err());
    assert_eq!(run(&t, &[0x1e, 0, 0, 0, 0, 0], &[]).status, status::GOOD);
    assert_eq!(run(&t, &[0x1b, 0, 0, 0, 0x02, 0], &[]).status, status::GOOD);
    let r = run(&t, &[0x00, 0, 0, 0, 0, 0], &[]);
    assert_eq!(sense_of(&r), (key::NOT_READY, 0x3a, 0x02));
    let r = run(&t, &[0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8, 0], &[]);
    assert_eq!(r.data[4], 3, "media removal event");
    // Load puts the same disc back.
    assert_eq!(run(&t, &[0x1b, 0, 0, 0, 0x03, 0], &[]).status, status::GOOD);
    assert_eq!(run(&t, &[0x00, 0, 0, 0, 0, 0], &[]).status, status::GOOD);
}

#[test]
fn cd_insert_raises_a_unit_attention_for_everyone() {
    let (t, lu) = cd_target(2048 * 100);
    run_on(&t, 1, &[0x00, 0, 0, 0, 0, 0], &[]);
    run_on(&t, 2, &[0x00, 0, 0, 0, 0, 0], &[]);
    lu.eject(false).unwrap();
    lu.insert(Arc::new(MemoryDisk::new(2048 * 400_000)))
        .unwrap();
    for n in [1, 2] {
        // GET EVENT STATUS runs despite the attention and tells of the new disc.
        let r = run_on(&t, n, &[0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8, 0], &[]);
        assert_eq!((r.data[4], r.data[5]), (2, 0x02));
        let r = run_on(&t, n, &[0x00, 0, 0, 0, 0, 0], &[]);
        assert_eq!(sense_of(&r), (key::UNIT_ATTENTION, 0x28, 0));
        assert_eq!(
            run_on(&t, n, &[0x00, 0, 0, 0, 0, 0], &[]).status,
            status::GOOD
        );
    }
    // The new disc is larger than a CD: a DVD-ROM.
    let r = run(&t, &[0x46, 0, 0, 0, 0, 0, 0, 0, 255, 0], &[]);
    assert_eq!(&r.data[6..8], &[0, 0x10]);
}

#[test]
fn cd_configuration_without_a_disc_has_no_current_profile() {
    let (t, lu) = cd_target(2048 * 100);
    lu.eject(false).unwrap();
    let r = run(&t, &[0x46, 0x02, 0, 0x03, 0, 0, 0, 0, 255, 0], &[]);
    assert_eq!(&r.data[6..8], &[0, 0]);
    assert_eq!(&r.data[8..10], &[0, 3], "only the removable medium feature");
    assert_eq!(r.data.len(), 8 + 8);
}

#[test]
fn cd_event_status_needs_polling() {
    let (t, _) = cd_target(2048 * 100);
    let r = run(&t, &[0x4a, 0, 0, 0, 0x10, 0, 0, 0, 8, 0], &[]);
    assert_eq!(r.sense.unwrap().field.unwrap().byte, 1);
}

#[test]
fn lun_fields_round_trip() {
    for n in [0u16, 1, 255, 256, 16383] {
        assert_eq!(decode_lun(encode_lun(n)), Some(n));
    }
    assert_eq!(decode_lun([0x80, 0, 0, 0, 0, 0, 0, 0]), None);
}

fn prout(t: &Target, port: &str, sa: u8, kind: u8, key: u64, sa_key: u64) -> Response {
    let mut data = key.to_be_bytes().to_vec();
    data.extend_from_slice(&sa_key.to_be_bytes());
    data.resize(24, 0);
    t.execute(
        encode_lun(0),
        &Request {
            nexus: u64::from(port.as_bytes()[0]),
            initiator: port,
            cdb: &[0x5f, sa, kind, 0, 0, 0, 0, 0, 24, 0],
            data_out: &data,
        },
    )
}

fn from_port(t: &Target, port: &str, cdb: &[u8], out: &[u8]) -> Response {
    let mut c = cdb.to_vec();
    c.resize(16, 0);
    t.execute(
        encode_lun(0),
        &Request {
            nexus: u64::from(port.as_bytes()[0]),
            initiator: port,
            cdb: &c,
            data_out: out,
        },
    )
}

#[test]
fn a_write_exclusive_reservation_blocks_only_others_writes() {
    let (t, _) = disk_target(1 << 20);
    assert_eq!(prout(&t, "a", 6, 0, 0, 7).status, status::GOOD);
    assert_eq!(prout(&t, "a", 1, 1, 7, 0).status, status::GOOD);
    let write = [0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    let read = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    assert_eq!(from_port(&t, "a", &write, &[1; 512]).status, status::GOOD);
    assert_eq!(
        from_port(&t, "b", &write, &[2; 512]).status,
        status::RESERVATION_CONFLICT
    );
    assert_eq!(from_port(&t, "b", &read, &[]).status, status::GOOD);
    assert_eq!(
        from_port(&t, "b", &[0x12, 0, 0, 0, 36, 0], &[]).status,
        status::GOOD
    );
    // RESERVE(6) conflicts while a persistent reservation is held.
    assert_eq!(
        from_port(&t, "b", &[0x16, 0, 0, 0, 0, 0], &[]).status,
        status::RESERVATION_CONFLICT
    );
}

#[test]
fn a_preempted_initiator_is_told_by_a_unit_attention() {
    let (t, _) = disk_target(1 << 20);
    prout(&t, "a", 6, 0, 0, 1);
    prout(&t, "b", 6, 0, 0, 2);
    prout(&t, "a", 1, 3, 1, 0);
    assert_eq!(prout(&t, "b", 4, 3, 2, 1).status, status::GOOD);
    let r = from_port(&t, "a", &[0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(sense_of(&r), (key::UNIT_ATTENTION, 0x2a, 0x05));
    // a is gone: its own writes now conflict with b's exclusive access.
    let r = from_port(&t, "a", &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[]);
    assert_eq!(r.status, status::RESERVATION_CONFLICT);
}

fn try_run(t: &Target, cdb: &[u8], out: &[u8]) -> Option<Response> {
    let mut c = cdb.to_vec();
    c.resize(16, 0);
    t.try_execute(
        encode_lun(0),
        &Request {
            nexus: 1,
            initiator: "",
            cdb: &c,
            data_out: out,
        },
    )
}

#[test]
fn reads_and_plain_writes_from_memory_answer_at_once() {
    let (t, _) = disk_target(1 << 20);
    let w = try_run(&t, &[0x2a, 0, 0, 0, 0, 2, 0, 0, 1, 0], &[7u8; 512]).expect("inline");
    assert_eq!(w.status, status::GOOD);
    let r = try_run(&t, &[0x28, 0, 0, 0, 0, 2, 0, 0, 1, 0], &[]).expect("inline");
    assert_eq!(r.data, vec![7u8; 512]);
    // FUA, and commands other than READ and WRITE, go the normal way.
    assert!(try_run(&t, &[0x2a, 0x08, 0, 0, 0, 2, 0, 0, 1, 0], &[7u8; 512]).is_none());
    assert!(try_run(&t, &[0x12, 0, 0, 0, 36, 0], &[]).is_none());
}

#[test]
fn the_fast_path_still_reports_unit_attentions_first() {
    let (t, _) = cd_target(1 << 20);
    assert_eq!(run(&t, &[0, 0, 0, 0, 0, 0], &[]).status, status::GOOD);
    let lu = t.lun(0).unwrap();
    lu.insert(Arc::new(MemoryDisk::new(1 << 20))).unwrap();
    let r = try_run(&t, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[]).expect("answered");
    assert_eq!(sense_of(&r), (key::UNIT_ATTENTION, 0x28, 0));
}
