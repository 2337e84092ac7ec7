//! `vdk completions` and `vdk man`: shell completion scripts and manual pages made from the
//! command line's own definition, so that they never disagree with `--help`.

use clap::{Args, CommandFactory};
use clap_complete::Shell;

use super::Cli;

/// `vdk completions`.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  vdk completions bash > /etc/bash_completion.d/vdk
  vdk completions zsh > ~/.zfunc/_vdk
  vdk completions fish > ~/.config/fish/completions/vdk.fish")]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    shell: Shell,
}

/// `vdk man`.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  vdk man | man -l -                the vdk(1) page
  vdk man open | man -l -           vdk-open(1)
  vdk man fs map > vdk-fs-map.1")]
pub struct ManArgs {
    /// A command (and subcommand) whose page to print; vdk's own page without one.
    command: Vec<String>,
}

/// Prints the completion script for a shell.
pub fn completions(args: &CompletionsArgs) -> anyhow::Result<()> {
    let mut cmd = Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "vdk", &mut script);
    super::out::write(format_args!("{}", String::from_utf8_lossy(&script)))
}

/// Prints a manual page in roff.
pub fn man(args: &ManArgs) -> anyhow::Result<()> {
    let mut cmd = Cli::command();
    cmd.build();
    let mut name = "vdk".to_owned();
    for sub in &args.command {
        let Some(found) = cmd.find_subcommand(sub).cloned() else {
            anyhow::bail!("{name} has no command {sub:?} (`{name} --help` lists them)");
        };
        name = format!("{name}-{sub}");
        cmd = found.name(name.clone());
    }
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd).render(&mut page)?;
    super::out::write(format_args!("{}", String::from_utf8_lossy(&page)))
}
