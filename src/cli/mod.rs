//! The `meterflow` command line: a thin clap layer over the library.
//!
//! Each area owns one file here with its `Args`/subcommand enum and a `run`
//! function returning `anyhow::Result<ExitCode>`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod analyze;
pub mod bill;
pub mod collect;
pub mod demo;
pub mod dlt645;
pub mod ingest;
pub mod ledger;
pub mod master;
pub mod modbus;
pub mod mqtt;
pub mod prepay;
pub mod progress;
pub mod query;
pub mod report;
pub mod sim;
pub mod sim_dlt645;
pub mod sim_modbus;
pub mod store;
pub mod stream;
pub mod tariff;

/// meterflow: electricity meter readings in; bills, prepayment deductions and alerts out.
///
/// Start with `meterflow demo`: it runs the whole chain on simulated meters and
/// prints where every output went. Every subcommand has its own `--help`.
#[derive(Debug, Parser)]
#[command(
    name = "meterflow",
    version,
    about,
    long_about,
    propagate_version = true
)]
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
    ///
    /// Exit code 2 when the chain ran but the collector reported a problem
    /// (a simulated meter or connection that did not answer).
    Demo(demo::DemoArgs),
    /// Simulators: a synthetic fleet written to a lake, or simulated meters on the network.
    #[command(subcommand)]
    Sim(sim::SimCmd),
    /// Validate master data (meters, accounts, payments).
    #[command(subcommand)]
    Master(master::MasterCmd),
    /// Inspect and compact the readings lake.
    #[command(subcommand)]
    Store(store::StoreCmd),
    /// Ingest readings from outside: MQTT subscriptions into the lake.
    #[command(subcommand)]
    Ingest(ingest::IngestCmd),
    /// MQTT helpers: publish simulated readings, measure a discarding subscriber.
    #[command(subcommand)]
    Mqtt(mqtt::MqttCmd),
    /// Validate tariff files and print them as readable tables.
    #[command(subcommand)]
    Tariff(tariff::TariffCmd),
    /// Bill every account for a period: bills, bill lines, exceptions, manifest.
    Bill(bill::BillArgs),
    /// Decision-support analytics as Parquet datasets, personal data masked.
    Analyze(analyze::AnalyzeArgs),
    /// Write the HTML report of a bill run (self-contained, opens offline).
    Report(report::ReportArgs),
    /// Look up an account: usage, bills, payments.
    #[command(subcommand)]
    Query(query::QueryCmd),
    /// Modbus tools: print request plans, list meter profiles, bench a loopback cycle.
    #[command(subcommand)]
    Modbus(modbus::ModbusCmd),
    /// Poll DL/T 645 buses and Modbus connections from a collectors.toml into the lake.
    Collect(collect::CollectArgs),
    /// DL/T 645 tools: find meters, read values, relay control.
    #[command(subcommand)]
    Dlt645(dlt645::Dlt645Cmd),
    /// Prepayment ledger: migrate, balances, history, Parquet export, payment-file import.
    #[command(subcommand)]
    Ledger(ledger::LedgerCmd),
    /// Prepaid deductions over the lake, alerts and remote fee control.
    #[command(subcommand)]
    Prepay(prepay::PrepayCmd),
    /// Streaming prepaid deductions from MQTT readings (exactly-once effect).
    Stream(stream::StreamArgs),
}

pub fn main() -> ExitCode {
    reset_sigpipe();
    let cli = Cli::parse();
    // The demo prints its own story; keep routine logs out of it unless asked.
    let log = if matches!(cli.command, Command::Demo(_))
        && std::env::var_os("RUST_LOG").is_none()
        && cli.log == "info"
    {
        "warn"
    } else {
        &cli.log
    };
    init_logging(&cli.log_format, log);
    let result = match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Sim(c) => sim::run(c),
        Command::Store(c) => store::run(c),
        Command::Master(c) => master::run(c),
        Command::Tariff(c) => tariff::run(c),
        Command::Bill(a) => bill::run(a),
        Command::Analyze(a) => analyze::run(a),
        Command::Report(a) => report::run(a),
        Command::Query(c) => query::run(c),
        Command::Ingest(c) => ingest::run(c),
        Command::Mqtt(c) => mqtt::run(c),
        Command::Modbus(c) => modbus::run(c),
        Command::Collect(a) => collect::run(a),
        Command::Dlt645(c) => dlt645::run(c),
        Command::Ledger(c) => ledger::run(c),
        Command::Prepay(c) => prepay::run(c),
        Command::Stream(a) => stream::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes, `: `-separated like `{:#}`, except a cause
/// whose text the message already ends with (most of our errors print their
/// IO cause themselves and also expose it as the source).
fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.ends_with(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text
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

/// `meterflow ... | head` should end quietly, not panic on a closed pipe.
fn reset_sigpipe() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: restoring the default disposition before any thread starts.
    unsafe {
        let _ = signal(Signal::SIGPIPE, SigHandler::SigDfl);
    }
}

#[cfg(test)]
mod tests {
    use super::error_text;

    #[test]
    fn the_relay_password_is_never_a_command_line_argument() {
        use clap::Parser;
        let args = |extra: &[&str]| {
            let mut v = vec![
                "meterflow",
                "dlt645",
                "relay",
                "--tcp",
                "127.0.0.1:6450",
                "--meter",
                "398192000337",
                "trip",
            ];
            v.extend_from_slice(extra);
            super::Cli::try_parse_from(v)
        };
        assert!(args(&[]).is_ok());
        assert!(args(&["--password-file", "/etc/meterflow/relay-password"]).is_ok());
        assert!(args(&["--password", "02123456"]).is_err());
    }

    #[test]
    fn a_cause_the_message_already_prints_is_not_repeated() {
        let io = std::io::Error::other("File too large");
        let e = anyhow::Error::new(crate::billing::run::BillingError::Io {
            path: "run/bills.parquet".into(),
            source: io,
        });
        assert_eq!(error_text(&e), "run/bills.parquet: File too large");
        let e = e.context("bill run 2026-10");
        assert_eq!(
            error_text(&e),
            "bill run 2026-10: run/bills.parquet: File too large"
        );
        let e = anyhow::anyhow!("no such tariff").context("tariffs/x.toml");
        assert_eq!(error_text(&e), "tariffs/x.toml: no such tariff");
    }
}
