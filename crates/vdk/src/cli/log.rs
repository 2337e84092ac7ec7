//! Where log lines go. Request threads never wait for them: events are handed to a writer
//! thread through a bounded queue, and dropped (not waited for) when it is full, so a stderr
//! nobody reads, a closed pipe or a slow disk cannot stall I/O. A daemon's log file is
//! bounded: past [`LOG_LIMIT`] bytes it becomes `FILE.1` (replacing the older one) and a new
//! file starts, so the two never hold more than twice that.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Bytes a log file grows to before it is rotated.
pub const LOG_LIMIT: u64 = 16 << 20;

/// Lines queued for the writer thread before new ones are dropped.
const QUEUED_LINES: usize = 64 * 1024;

/// Logs at `info`, `debug` with `-v`, `trace` with `-vv`, or as `RUST_LOG` says, to stderr or
/// to `file`. Lines still queued are written when the returned guard drops.
pub fn init(verbose: u8, file: Option<&Path>) -> io::Result<WorkerGuard> {
    // The object-store client logs each retry at info: a store that is down would bury
    // vdk's own lines.
    let default = match verbose {
        0 => "info,object_store=warn",
        1 => "debug,object_store=warn",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("log");
    let (writer, guard, ansi) = match file {
        Some(path) => {
            let (w, g) = builder.finish(Rotating::open(path, LOG_LIMIT)?);
            (w, g, false)
        }
        None => {
            let (w, g) = builder.finish(io::stderr());
            (w, g, io::IsTerminal::is_terminal(&io::stderr()))
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi)
        // A log line that cannot be written is dropped: never a message about it on a
        // stderr that may be the very thing that is closed.
        .log_internal_errors(false)
        .init();
    Ok(guard)
}

/// Opens a log file for appending, made if missing; a symbolic link in its place is refused,
/// not followed (a log is written with the daemon's rights).
pub fn open_log(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32);
    }
    options.open(path)
}

/// A log file that starts over, keeping one older file, once it holds `limit` bytes.
#[derive(Debug)]
struct Rotating {
    path: PathBuf,
    file: File,
    written: u64,
    limit: u64,
}

impl Rotating {
    fn open(path: &Path, limit: u64) -> io::Result<Rotating> {
        let file = open_log(path)?;
        let written = file.metadata()?.len();
        Ok(Rotating {
            path: path.to_owned(),
            file,
            written,
            limit,
        })
    }

    fn rotate(&mut self) -> io::Result<()> {
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        fs::rename(&self.path, old)?;
        self.file = open_log(&self.path)?;
        self.written = 0;
        Ok(())
    }
}

impl Write for Rotating {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written > 0 && self.written + buf.len() as u64 > self.limit {
            // Keep logging to the old file if the new one cannot be made.
            let _ = self.rotate();
        }
        let n = self.file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_log_moves_to_dot_one_and_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.log");
        let mut log = Rotating::open(&path, 100).unwrap();
        log.write_all(&[b'a'; 80]).unwrap();
        log.write_all(&[b'b'; 30]).unwrap();
        assert_eq!(
            fs::read(dir.path().join("daemon.log.1")).unwrap(),
            [b'a'; 80]
        );
        assert_eq!(fs::read(&path).unwrap(), [b'b'; 30]);
    }
}
