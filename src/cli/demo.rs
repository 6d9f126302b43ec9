use std::process::ExitCode;

/// Arguments of `meterflow demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Folder for every demo output (default: a new temporary folder that is kept).
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
}

pub fn run(_a: DemoArgs) -> anyhow::Result<ExitCode> {
    Ok(ExitCode::SUCCESS)
}
