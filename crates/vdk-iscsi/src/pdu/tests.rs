use super::response::{self, Numbers, Residual, Stages};
use super::*;

fn command_bhs(flags: u8, edtl: u32) -> Bhs {
    let mut b = Bhs::new(opcode::SCSI_COMMAND);
    b.0[1] = flags;
    b.set_u32(16, 0x1234);
    b.set_u32(20, edtl);
    b.set_u32(24, 9);
    b.0[32] = 0x28; // READ(10)
    b
}

#[test]
fn a_read_command_parses() {
    let b = command_bhs(0x80 | 0x40 | 0x01, 4096);
    let Request::Command(c) = Request::parse(&b, &[]).unwrap() else {
        panic!("not a command")
    };
    assert!(c.read && !c.write && c.final_pdu);
    assert_eq!((c.itt, c.edtl, c.cmd_sn, c.attr), (0x1234, 4096, 9, 1));
    assert_eq!(c.cdb.len(), 16);
    assert_eq!(c.cdb[0], 0x28);
}

#[test]
fn an_extended_cdb_ahs_lengthens_the_cdb() {
    let b = command_bhs(0x80, 0);
    // AHSLength 5 (reserved byte + 4 CDB bytes), type 1, reserved, 4 bytes: 8 bytes in all.
    let ahs = [0, 5, 1, 0, 0xa, 0xb, 0xc, 0xd];
    let Request::Command(c) = Request::parse(&b, &ahs).unwrap() else {
        panic!("not a command")
    };
    assert_eq!(c.cdb.len(), 20);
    assert_eq!(&c.cdb[16..], &[0xa, 0xb, 0xc, 0xd]);
}

#[test]
fn a_bidirectional_length_ahs_is_read() {
    let b = command_bhs(0x80 | 0x40 | 0x20, 512);
    let ahs = [0, 5, 2, 0, 0, 0, 2, 0];
    let Request::Command(c) = Request::parse(&b, &ahs).unwrap() else {
        panic!("not a command")
    };
    assert_eq!(c.bidi_read_len, Some(512));
}

#[test]
fn malformed_ahs_is_refused() {
    let b = command_bhs(0x80, 0);
    assert_eq!(Request::parse(&b, &[0, 9, 1, 0]), Err(PduError::BadAhs));
    assert_eq!(
        Request::parse(&b, &[0, 5, 7, 0, 0, 0, 0, 0]),
        Err(PduError::BadAhs)
    );
    assert_eq!(Request::parse(&b, &[0, 0, 1, 0]), Err(PduError::BadAhs));
    let nop = Bhs::new(opcode::NOP_OUT);
    assert_eq!(Request::parse(&nop, &[0; 4]), Err(PduError::BadAhs));
}

#[test]
fn a_transfer_length_without_direction_is_refused() {
    let b = command_bhs(0x80, 512);
    assert!(matches!(
        Request::parse(&b, &[]),
        Err(PduError::BadField(_))
    ));
}

#[test]
fn target_opcodes_from_an_initiator_are_unknown() {
    let b = Bhs::new(opcode::DATA_IN);
    let e = Request::parse(&b, &[]).unwrap_err();
    assert_eq!(e, PduError::UnknownOpcode(opcode::DATA_IN));
    assert_eq!(e.reject_reason(), reject::PROTOCOL_ERROR);
}

#[test]
fn a_login_request_parses_stages_and_session_ids() {
    let mut b = Bhs::new(opcode::LOGIN);
    b.0[0] |= 0x40;
    b.0[1] = 0x80 | (1 << 2) | 3;
    b.0[8..14].copy_from_slice(&[0x80, 1, 2, 3, 4, 5]);
    b.set_u16(14, 7);
    b.set_u16(20, 2);
    let Request::Login(l) = Request::parse(&b, &[]).unwrap() else {
        panic!("not a login")
    };
    assert!(l.transit && !l.cont);
    assert_eq!((l.csg, l.nsg, l.tsih, l.cid), (1, 3, 7, 2));
    assert_eq!(l.isid, [0x80, 1, 2, 3, 4, 5]);
}

#[test]
fn login_with_transit_and_continue_is_refused() {
    let mut b = Bhs::new(opcode::LOGIN);
    b.0[1] = 0xc0;
    assert!(matches!(
        Request::parse(&b, &[]),
        Err(PduError::BadField(_))
    ));
}

#[test]
fn data_length_is_24_bits() {
    let mut b = Bhs::new(opcode::NOP_IN);
    b.set_data_len(0x01_02_03);
    assert_eq!(&b.0[5..8], &[1, 2, 3]);
    assert_eq!(b.data_len(), 0x01_02_03);
}

#[test]
fn data_in_with_status_sets_s_f_and_residual() {
    let n = Numbers {
        stat_sn: 5,
        exp_cmd_sn: 6,
        max_cmd_sn: 7,
    };
    let b = response::data_in(
        [0; 8],
        1,
        2,
        8192,
        true,
        Some((0, Residual::Underflow(100))),
        n,
    );
    assert_eq!(b.opcode(), opcode::DATA_IN);
    assert_eq!(b.flags(), 0x80 | 0x01 | 0x02);
    assert_eq!(
        (b.u32_at(24), b.u32_at(36), b.u32_at(40), b.u32_at(44)),
        (5, 2, 8192, 100)
    );
    assert_eq!(b.u32_at(20), RESERVED_TAG);
}

#[test]
fn data_in_without_status_has_no_stat_sn() {
    let n = Numbers {
        stat_sn: 5,
        exp_cmd_sn: 6,
        max_cmd_sn: 7,
    };
    let b = response::data_in([0; 8], 1, 0, 0, false, None, n);
    assert_eq!(b.flags(), 0);
    assert_eq!((b.u32_at(24), b.u32_at(28)), (0, 6));
}

#[test]
fn residuals_follow_the_expected_length() {
    assert_eq!(Residual::of(512, 512), Residual::None);
    assert_eq!(Residual::of(10000, 512), Residual::Underflow(9488));
    assert_eq!(Residual::of(0, 512), Residual::Overflow(512));
}

#[test]
fn a_login_response_carries_stages_and_status() {
    let s = Stages {
        transit: true,
        cont: false,
        csg: 1,
        nsg: 3,
    };
    let b = response::login_response(s, [1; 6], 9, 4, 0x0201, Numbers::default());
    assert_eq!(b.0[0], opcode::LOGIN_RESPONSE);
    assert_eq!(b.flags(), 0x80 | (1 << 2) | 3);
    assert_eq!((b.u16_at(14), b.itt(), b.u16_at(36)), (9, 4, 0x0201));
}

#[test]
fn sense_segments_start_with_their_length() {
    assert_eq!(response::sense_segment(&[1, 2, 3]), vec![0, 3, 1, 2, 3]);
}

#[test]
fn serial_numbers_wrap() {
    assert!(sn_lt(1, 2));
    assert!(sn_lt(u32::MAX, 0));
    assert!(!sn_lt(2, 1));
    assert!(!sn_lt(5, 5));
}
