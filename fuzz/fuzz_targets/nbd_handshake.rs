//! Any bytes from a client during the handshake: the server negotiates, refuses or closes,
//! never panics or loops.
#![no_main]

use std::io::{self, Cursor, Read, Write};
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use vdk_backends::MemoryDisk;
use vdk_nbd::negotiate::negotiate;
use vdk_nbd::Export;

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
        vec![
            Arc::new(Export::new("a", Arc::new(MemoryDisk::new(1 << 20)))),
            Arc::new(Export::new("b", Arc::new(MemoryDisk::new(1 << 30)))),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let mut client = Client { input: Cursor::new(data), written: 0 };
    let _ = negotiate(&mut client, exports());
    // Each option costs at least 16 bytes of input; replies are bounded per option.
    assert!(client.written <= 64 + data.len() * 256, "reply volume out of proportion");
});
