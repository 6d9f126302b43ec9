//! The `meterflow` command line: a thin clap layer over the library.
//!
//! Each area owns one file here with its `Args`/subcommand enum and a `run`
//! function returning `anyhow::Result<ExitCode>`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod demo;
pub mod sim;
pub mod store;

/// meterflow: electricity meter readings in; bills, prepayment deductions and alerts out.
///
/// Start with `meterflow demo`: it runs the whole chain on simulated meters and
/// prints where every output went. Every subcommand has its own `--help`.
#[derive(Debug, Parser)]
#[command(name = "meterflow", version, about, long_about, propagate_version = true)]
pub struct Cli {
    /// Log format: `text` for people, `json` for log shippers.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Log level filter (tracing `EnvFilter` syntax, e.g. `info,meterflow=debug`). Also read from RUST_LOG.
    #[arg(long, global = true, env = "RUST_LOG", default_value = "info")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole chain on simulated meters and print where everything went.
    Demo(demo::DemoArgs),
    /// Simulators: a synthetic fleet written to a lake, or simulated meters on the network.
    #[command(subcommand)]
    Sim(sim::SimCmd),
    /// Inspect and compact the readings lake.
    #[command(subcommand)]
    Store(store::StoreCmd),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format, &cli.log);
    let result = match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Sim(c) => sim::run(c),
        Command::Store(c) => store::run(c),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(format: &str, filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
}
