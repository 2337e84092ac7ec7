//! Any bytes from a client during the handshake, with TLS off, offered or required (the
//! first byte chooses; STARTTLS "succeeds" and the handshake goes on over the same bytes) and
//! exports behind allow-lists: the server negotiates, refuses or closes, never panics or
//! loops.
#![no_main]

use std::io::{self, Cursor, Read, Write};
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use vdk_backends::MemoryDisk;
use vdk_nbd::negotiate::{negotiate_client, Client as Peer};
use vdk_nbd::{Export, Rule, TlsMode};

struct Client<'a> {
    input: Cursor<&'a [u8]>,
    written: usize,
}

impl Read for Client<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Client<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn exports() -> &'static Vec<Arc<Export>> {
    static EXPORTS: OnceLock<Vec<Arc<Export>>> = OnceLock::new();
    EXPORTS.get_or_init(|| {
        let mut hidden = Export::new("c", Arc::new(MemoryDisk::new(1 << 20)));
        hidden.allow = vec![Rule::Cert("alice".into())];
        vec![
            Arc::new(Export::new("a", Arc::new(MemoryDisk::new(1 << 20)))),
            Arc::new(Export::new("b", Arc::new(MemoryDisk::new(1 << 30)))),
            Arc::new(hidden),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let tls = [TlsMode::Off, TlsMode::On, TlsMode::Require][usize::from(mode % 3)];
    let mut client = Client { input: Cursor::new(data), written: 0 };
    let mut start_tls = |_: &mut Client<'_>| Ok(vec!["alice".to_owned()]);
    let peer = Peer {
        peer: Default::default(),
        tls,
        start_tls: &mut start_tls,
    };
    let _ = negotiate_client(&mut client, exports(), peer);
    // Each option costs at least 16 bytes of input; replies are bounded per option.
    assert!(client.written <= 64 + data.len() * 256, "reply volume out of proportion");
});
