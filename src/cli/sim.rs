use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub enum SimCmd {}

pub fn run(c: SimCmd) -> anyhow::Result<ExitCode> {
    match c {}
}
