//! `meterflow stream`: streaming prepaid deductions from MQTT readings.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::prepay::stream::{run_stream, StreamConfig, StreamOptions};

/// Deduct prepaid balances within seconds of each reading arriving on MQTT.
///
/// Subscribes (QoS 1, persistent session) to canonical readings JSON
/// (docs/mqtt.md), deducts in one ledger transaction per batch of messages
/// and acknowledges the messages only after the commit: a crash at any point
/// and a restart give the same ledger as no crash. Several processes may
/// share a PostgreSQL ledger with `shared_group` set. Config: sample-data/stream.toml.
#[derive(Debug, clap::Args)]
pub struct StreamArgs {
    /// The stream config (ledger, master, tariffs, thresholds, [mqtt], [batch]).
    #[arg(long)]
    pub config: PathBuf,
    /// Exit after this many seconds without a message (tests, benchmarks); default run forever.
    #[arg(long)]
    pub idle_exit_secs: Option<u64>,
    /// Exit once this process committed this many deductions (benchmarks).
    #[arg(long)]
    pub stop_after: Option<usize>,
}

pub fn run(a: StreamArgs) -> anyhow::Result<ExitCode> {
    let cfg = StreamConfig::load(&a.config)?;
    let opts = StreamOptions {
        stop_after_deductions: a.stop_after,
        idle_exit: a.idle_exit_secs.map(Duration::from_secs),
        stop: None,
    };
    let started = std::time::Instant::now();
    let s = run_stream(&cfg, &opts)?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{} readings: {} deductions ({} yuan), {} stale (redelivered), {} alerts, {} retries in {:.2}s",
        s.readings, s.deductions, s.amount, s.stale, s.alerts, s.retries, secs
    );
    Ok(ExitCode::SUCCESS)
}
