//! The command line.

mod serve;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// vdk, the virtual disk kit: serve disks from user space.
#[derive(Debug, Parser)]
#[command(name = "vdk", version, about, propagate_version = true)]
pub struct Cli {
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve disk images over NBD in the foreground, until SIGINT or SIGTERM.
    Serve(serve::ServeArgs),
}

/// Runs the chosen command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::run(args),
    }
}

/// Logs to stderr at `info`, `debug` with `-v`, `trace` with `-vv`, or as `RUST_LOG` says.
pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
