//! A login driven by any sequence of Login Requests (headers and text from the input):
//! each step answers with a reply or a failure status, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdk_iscsi::chap::Credentials;
use vdk_iscsi::login::{Auth, Directory, Login, Step};
use vdk_iscsi::params::Limits;
use vdk_iscsi::pdu::{Bhs, Request};

struct Dir;

impl Directory for Dir {
    fn target(&self, name: &str) -> Option<(Auth, Option<String>)> {
        let chap = name.ends_with("chap").then(|| Credentials {
            user: "user".into(),
            secret: b"secret-secret".to_vec(),
        });
        Some((
            Auth {
                chap,
                mutual: None,
                initiators: Vec::new(),
            },
            None,
        ))
    }
    fn discovery(&self) -> Auth {
        Auth::default()
    }
}

fuzz_target!(|data: &[u8]| {
    let mut login = Login::new(Limits::default(), 1);
    let mut rest = data;
    while rest.len() >= 50 {
        let (head, tail) = rest.split_at(48);
        let len = usize::from(tail[0]).min(tail.len() - 1);
        let text = &tail[1..1 + len];
        rest = &tail[1 + len..];
        let mut b = [0u8; 48];
        b.copy_from_slice(head);
        b[0] = 0x43;
        let Ok(Request::Login(req)) = Request::parse(&Bhs(b), &[]) else {
            continue;
        };
        match login.step(&req, text, &Dir) {
            Step::Continue(_) => {}
            Step::Complete(_) | Step::Fail(_) => break,
        }
    }
});
