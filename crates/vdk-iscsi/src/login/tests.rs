use super::*;

const TARGET: &str = "iqn.2026-11.org.vdk:disk";
const INITIATOR: &str = "iqn.2026-11.org.example:host";
const SECRET: &[u8] = b"twelve-bytes-or-more";
const TARGET_SECRET: &[u8] = b"the-target-secret";

#[derive(Default)]
struct Dir {
    auth: Auth,
}

impl Directory for Dir {
    fn target(&self, name: &str) -> Option<(Auth, Option<String>)> {
        (name == TARGET).then(|| (self.auth.clone(), Some("disk".into())))
    }
    fn discovery(&self) -> Auth {
        Auth::default()
    }
}

fn chap_dir() -> Dir {
    Dir {
        auth: Auth {
            chap: Some(Credentials {
                user: "alice".into(),
                secret: SECRET.to_vec(),
            }),
            mutual: Some(Credentials {
                user: "target".into(),
                secret: TARGET_SECRET.to_vec(),
            }),
            initiators: Vec::new(),
        },
    }
}

fn request(csg: u8, transit: bool, nsg: u8) -> LoginRequest {
    LoginRequest {
        transit,
        cont: false,
        csg,
        nsg,
        version_max: 0,
        version_min: 0,
        isid: [0x80, 0, 0, 0, 0, 1],
        tsih: 0,
        itt: 1,
        cid: 0,
        cmd_sn: 10,
        exp_stat_sn: 0,
    }
}

fn text(pairs: &[(&str, &str)]) -> Vec<u8> {
    text::encode(
        &pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<Vec<_>>(),
    )
}

fn answers(r: &Reply) -> Vec<(String, String)> {
    text::parse(&r.text).unwrap()
}

fn get(r: &Reply, key: &str) -> Option<String> {
    answers(r)
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

fn names() -> Vec<(&'static str, &'static str)> {
    vec![
        ("InitiatorName", INITIATOR),
        ("TargetName", TARGET),
        ("SessionType", "Normal"),
    ]
}

fn reply_of(step: Step) -> Reply {
    match step {
        Step::Continue(r) | Step::Complete(r) | Step::Fail(r) => r,
    }
}

#[test]
fn operational_login_completes_and_declares_limits() {
    let mut l = Login::new(Limits::default(), 1);
    let mut keys = names();
    keys.push(("MaxRecvDataSegmentLength", "65536"));
    keys.push(("HeaderDigest", "CRC32C,None"));
    let step = l.step(&request(1, true, 3), &text(&keys), &Dir::default());
    let Step::Complete(r) = step else {
        panic!("{step:?}")
    };
    assert_eq!(r.status, status::SUCCESS);
    assert!(r.stages.transit);
    assert_eq!(r.stages.nsg, 3);
    assert_eq!(get(&r, "TargetPortalGroupTag").as_deref(), Some("1"));
    assert_eq!(get(&r, "HeaderDigest").as_deref(), Some("CRC32C"));
    assert_eq!(
        get(&r, "MaxRecvDataSegmentLength"),
        Some(Limits::default().max_recv_data_segment.to_string())
    );
    assert_eq!(l.params().send_data_segment, 65536);
    assert_eq!(l.kind(), Some(&SessionKind::Normal(TARGET.into())));
}

#[test]
fn unknown_target_is_not_found() {
    let mut l = Login::new(Limits::default(), 1);
    let keys = [
        ("InitiatorName", INITIATOR),
        ("TargetName", "iqn.x:nothing"),
    ];
    let step = l.step(&request(1, true, 3), &text(&keys), &Dir::default());
    assert!(
        matches!(&step, Step::Fail(r) if r.status == status::NOT_FOUND),
        "{step:?}"
    );
}

#[test]
fn missing_initiator_name_is_a_missing_parameter() {
    let mut l = Login::new(Limits::default(), 1);
    let step = l.step(
        &request(1, true, 3),
        &text(&[("TargetName", TARGET)]),
        &Dir::default(),
    );
    assert!(matches!(&step, Step::Fail(r) if r.status == status::MISSING_PARAMETER));
}

#[test]
fn newer_protocol_versions_only_are_refused() {
    let mut l = Login::new(Limits::default(), 1);
    let mut req = request(1, true, 3);
    req.version_min = 1;
    let step = l.step(&req, &text(&names()), &Dir::default());
    assert!(matches!(&step, Step::Fail(r) if r.status == status::UNSUPPORTED_VERSION));
}

#[test]
fn initiators_not_listed_are_not_authorized() {
    let dir = Dir {
        auth: Auth {
            initiators: vec!["iqn.2026-11.org.example:other".into()],
            ..Auth::default()
        },
    };
    let mut l = Login::new(Limits::default(), 1);
    let step = l.step(&request(1, true, 3), &text(&names()), &dir);
    assert!(matches!(&step, Step::Fail(r) if r.status == status::AUTHORIZATION_FAILURE));
}

#[test]
fn continued_text_is_gathered_before_it_is_answered() {
    let mut l = Login::new(Limits::default(), 1);
    let all = text(&names());
    let (a, b) = all.split_at(10);
    let mut first = request(1, false, 0);
    first.cont = true;
    let step = l.step(&first, a, &Dir::default());
    let Step::Continue(r) = step else {
        panic!("{step:?}")
    };
    assert!(r.text.is_empty());
    let step = l.step(&request(1, true, 3), b, &Dir::default());
    assert!(matches!(step, Step::Complete(_)), "{step:?}");
}

/// Runs the CHAP exchange up to the challenge; returns the login, CHAP_I and CHAP_C.
fn challenged(dir: &Dir) -> (Login, u8, Vec<u8>) {
    let mut l = Login::new(Limits::default(), 1);
    let mut keys = names();
    keys.push(("AuthMethod", "CHAP,None"));
    let r = reply_of(l.step(&request(0, true, 1), &text(&keys), dir));
    assert_eq!(get(&r, "AuthMethod").as_deref(), Some("CHAP"));
    assert!(!r.stages.transit, "no transit before authentication");
    let r = reply_of(l.step(&request(0, false, 1), &text(&[("CHAP_A", "7,5")]), dir));
    assert_eq!(get(&r, "CHAP_A").as_deref(), Some("5"));
    let id: u8 = get(&r, "CHAP_I").unwrap().parse().unwrap();
    let c = chap::decode_binary(&get(&r, "CHAP_C").unwrap()).unwrap();
    assert_eq!(c.len(), chap::CHALLENGE_LEN);
    (l, id, c)
}

#[test]
fn chap_with_the_right_secret_logs_in() {
    let dir = chap_dir();
    let (mut l, id, c) = challenged(&dir);
    let r = chap::encode_hex(&chap::response(id, SECRET, &c));
    let step = l.step(
        &request(0, true, 1),
        &text(&[("CHAP_N", "alice"), ("CHAP_R", &r)]),
        &dir,
    );
    let Step::Continue(reply) = step else {
        panic!("{step:?}")
    };
    assert!(reply.stages.transit);
    assert_eq!(reply.stages.nsg, 1);
    let step = l.step(&request(1, true, 3), &[], &dir);
    assert!(matches!(step, Step::Complete(_)), "{step:?}");
}

#[test]
fn chap_with_a_wrong_secret_fails() {
    let dir = chap_dir();
    let (mut l, id, c) = challenged(&dir);
    let r = chap::encode_hex(&chap::response(id, b"wrong-secret-value", &c));
    let step = l.step(
        &request(0, true, 1),
        &text(&[("CHAP_N", "alice"), ("CHAP_R", &r)]),
        &dir,
    );
    assert!(matches!(&step, Step::Fail(r) if r.status == status::AUTHENTICATION_FAILURE));
}

#[test]
fn skipping_required_chap_fails() {
    let dir = chap_dir();
    let mut l = Login::new(Limits::default(), 1);
    let step = l.step(&request(1, true, 3), &text(&names()), &dir);
    assert!(matches!(&step, Step::Fail(r) if r.status == status::AUTHENTICATION_FAILURE));
}

#[test]
fn mutual_chap_answers_the_initiator_challenge() {
    let dir = chap_dir();
    let (mut l, id, c) = challenged(&dir);
    let r = chap::encode_hex(&chap::response(id, SECRET, &c));
    let mine = [9u8; 16];
    let step = l.step(
        &request(0, true, 1),
        &text(&[
            ("CHAP_N", "alice"),
            ("CHAP_R", &r),
            ("CHAP_I", "77"),
            ("CHAP_C", &chap::encode_hex(&mine)),
        ]),
        &dir,
    );
    let reply = reply_of(step);
    assert_eq!(get(&reply, "CHAP_N").as_deref(), Some("target"));
    let expected = chap::encode_hex(&chap::response(77, TARGET_SECRET, &mine));
    assert_eq!(get(&reply, "CHAP_R"), Some(expected));
}

#[test]
fn a_reflected_challenge_is_refused() {
    let dir = chap_dir();
    let (mut l, id, c) = challenged(&dir);
    let r = chap::encode_hex(&chap::response(id, SECRET, &c));
    let step = l.step(
        &request(0, true, 1),
        &text(&[
            ("CHAP_N", "alice"),
            ("CHAP_R", &r),
            ("CHAP_I", &id.to_string()),
            ("CHAP_C", &chap::encode_hex(&c)),
        ]),
        &dir,
    );
    assert!(matches!(&step, Step::Fail(r) if r.status == status::AUTHENTICATION_FAILURE));
}

#[test]
fn discovery_needs_no_target_name() {
    let mut l = Login::new(Limits::default(), 1);
    let keys = [
        ("InitiatorName", INITIATOR),
        ("SessionType", "Discovery"),
        ("InitialR2T", "No"),
    ];
    let step = l.step(&request(1, true, 3), &text(&keys), &Dir::default());
    let Step::Complete(r) = step else {
        panic!("{step:?}")
    };
    assert_eq!(get(&r, "InitialR2T").as_deref(), Some("Irrelevant"));
    assert_eq!(get(&r, "TargetPortalGroupTag"), None);
    assert_eq!(l.kind(), Some(&SessionKind::Discovery));
}

#[test]
fn a_changed_initiator_name_fails() {
    let mut l = Login::new(Limits::default(), 1);
    let _ = l.step(&request(0, true, 1), &text(&names()), &Dir::default());
    let step = l.step(
        &request(1, true, 3),
        &text(&[("InitiatorName", "iqn.2026-11.org.example:else")]),
        &Dir::default(),
    );
    assert!(matches!(&step, Step::Fail(r) if r.status == status::INITIATOR_ERROR));
}

#[test]
fn going_back_a_stage_is_invalid() {
    let mut l = Login::new(Limits::default(), 1);
    let _ = l.step(&request(1, false, 0), &text(&names()), &Dir::default());
    let step = l.step(&request(0, true, 1), &[], &Dir::default());
    assert!(matches!(&step, Step::Fail(r) if r.status == status::INVALID_DURING_LOGIN));
}
