//! `vdk`, the virtual disk kit: serve disks from user space.
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

mod cli;
mod cloud;
mod daemon;

// The control API lives in the library, where fuzzers and other programs reach it too.
pub(crate) use vdk::control;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    cli::init_logging(args.verbose);
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vdk: {e:#}");
            ExitCode::FAILURE
        }
    }
}
