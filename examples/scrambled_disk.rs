//! A complete custom disk: a file whose bytes are stored scrambled (each rotated by 3 bits, a
//! toy cipher that keeps zero as zero, so a sparse file stays sparse). Serve it with:
//! `cargo run -p vdk-examples --example scrambled_disk -- secret.img 64M unix:///tmp/s.sock`
use std::{fs::File, sync::Arc};

// Positional reads and writes on Linux and Windows alike.
use vdk_core::sys::FileExt;
use vdk_core::{check_range, BlockDevice, DiskInfo, Result};

#[derive(Debug)]
struct ScrambledDisk {
    file: File,
    size: u64,
}

impl BlockDevice for ScrambledDisk {
    fn info(&self) -> DiskInfo {
        DiskInfo::new(self.size)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, offset)?;
        buf.iter_mut().for_each(|b| *b = b.rotate_right(3));
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        let stored: Vec<u8> = buf.iter().map(|b| b.rotate_left(3)).collect();
        self.file.write_all_at(&stored, offset)?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Ok(self.file.sync_data()?)
    }
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [path, size, uri] = &args[..] else {
        panic!("usage: scrambled_disk FILE SIZE_MIB tcp://HOST:PORT|unix:///PATH");
    };
    let size = size
        .trim_end_matches(['M', 'm'])
        .parse::<u64>()
        .expect("size in MiB")
        << 20;
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    file.set_len(size)?;
    vdk_nbd::serve(Arc::new(ScrambledDisk { file, size }), uri)
}

// ---- The disk ends above (under 60 lines); below, the test every vdk disk passes. ----

#[test]
fn scrambled_disk_conforms() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = tempfile::TempDir::new().unwrap();
    let n = AtomicUsize::new(0);
    vdk_core::conformance::run(&|| {
        let path = dir
            .path()
            .join(n.fetch_add(1, Ordering::Relaxed).to_string());
        let file = File::create_new(path).unwrap();
        file.set_len(vdk_core::conformance::MIN_SIZE).unwrap();
        Arc::new(ScrambledDisk {
            file,
            size: vdk_core::conformance::MIN_SIZE,
        })
    });
}
