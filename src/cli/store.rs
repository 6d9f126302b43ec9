use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub enum StoreCmd {}

pub fn run(c: StoreCmd) -> anyhow::Result<ExitCode> {
    match c {}
}
