//! `vdk`, the virtual disk kit: serve disks from user space.
// No unsafe code but the Windows service entry point that windows-service's macro writes
// (cli/service.rs).
#![deny(unsafe_code)]
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

mod cli;
mod cloud;
mod daemon;
mod front;
mod paths;

// The control API lives in the library, where fuzzers and other programs reach it too.
pub(crate) use vdk::control;

use std::io::{self, Write};
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    if let Err(e) = args.prepare() {
        cli::out::error(&vdk::message::one_line(e.chain().map(ToString::to_string)));
        return ExitCode::FAILURE;
    }
    let log = match cli::log::init(args.verbose, args.log_file()) {
        Ok(guard) => guard,
        Err(e) => {
            let _ = writeln!(io::stderr(), "vdk: cannot write the log: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match cli::run(args) {
        Ok(code) => code,
        // Its reader went away (`vdk list | head -1`): stop as a tool killed by SIGPIPE
        // would, without a word on a stderr that may be gone too.
        Err(e) if cli::out::is_closed(&e) => ExitCode::from(141),
        Err(e) => {
            cli::out::error(&vdk::message::one_line(e.chain().map(ToString::to_string)));
            ExitCode::FAILURE
        }
    };
    // Lines still queued for the log reach it before the process ends.
    drop(log);
    code
}
