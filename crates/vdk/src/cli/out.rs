//! What commands print. Standard output closed under a command (`vdk list | head -1`) ends
//! it quietly, as it ends any Unix tool, instead of a panic or an error message; every line
//! goes through [`outln!`](crate::outln) so that no `println!` can panic on it.

use std::fmt;
use std::io::{self, Write};

/// Standard output was closed by its reader: the command stops, with nothing to report.
#[derive(Debug)]
pub struct StdoutClosed;

impl fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("standard output is closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// Writes `args` to standard output.
pub fn write(args: fmt::Arguments<'_>) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.flush())
        .map_err(|e| match e.kind() {
            io::ErrorKind::BrokenPipe => anyhow::Error::new(StdoutClosed),
            _ => anyhow::Error::new(e).context("cannot write to standard output"),
        })
}

/// `println!` that returns an error instead of panicking: `StdoutClosed` when the reader
/// has gone.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::cli::out::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::out::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// Prints `v` as pretty JSON on a line of its own.
pub fn json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(v)?;
    write(format_args!("{text}\n"))
}

/// Says `msg` on standard error as vdk's errors are said ("vdk: ..."); a closed stderr is
/// not an error of its own.
pub fn error(msg: &str) {
    let _ = writeln!(io::stderr(), "vdk: {msg}");
}

/// Whether `e` is only standard output closing.
pub fn is_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<StdoutClosed>())
}
