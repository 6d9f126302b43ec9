//! `meterflow collect`: poll the DL/T 645 buses and Modbus connections of a
//! collectors.toml and write their readings into the lake and/or the uplink.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::collector::config::CollectorConfig;
use crate::collector::run::{self, CollectOptions};

/// Poll meters and write readings into the lake.
///
/// Exit code 3 when a bus or Modbus connection could not be used, or the
/// uplink refused readings (spool full): an operator must look.
#[derive(Debug, clap::Args)]
pub struct CollectArgs {
    /// collectors.toml (format in docs/collectors.md, example in sample-data/collectors.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// One cycle of every bus and connection (all schedules), flush, exit.
    #[arg(long)]
    pub once: bool,
    /// Lake directory; overrides `[lake] out` of the config.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics while running.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
}

pub fn run(a: CollectArgs) -> anyhow::Result<ExitCode> {
    let cfg = CollectorConfig::load(&a.config)?;
    let cfg_uplink = cfg.uplink.is_some();
    let lake_dir = a
        .out
        .clone()
        .or_else(|| cfg.lake.out.clone())
        .context(
            "no lake: give --out LAKE or set `out` in [lake] (with `[uplink] lake = false` it still keeps quarantined input)",
        )?;
    let rt = tokio::runtime::Runtime::new()?;
    let stats = rt.block_on(async move {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::info!("Ctrl-C: finishing the current requests, flushing the lake");
                let _ = tx.send(true);
            }
        });
        run::run(
            cfg,
            CollectOptions {
                lake_dir: lake_dir.clone(),
                once: a.once,
                metrics_addr: a.metrics_addr,
            },
            rx,
        )
        .await
    })?;
    let mut failed = false;
    for b in &stats.buses {
        let c = &b.counters;
        println!(
            "bus {}: {} readings, {} requests, {} timeouts, {} bad checksums, {} stray frames, {} late replies, {} error replies",
            b.bus, b.readings, c.requests, c.timeouts, c.bad_checksum, c.stray_frames, c.late_replies, c.refused
        );
        if !b.meters_silent.is_empty() {
            println!("  silent meters: {}", b.meters_silent.join(", "));
        }
        if !b.meters_skewed.is_empty() {
            println!("  clock skew flagged: {}", b.meters_skewed.join(", "));
        }
        if let Some(e) = &b.error {
            println!("  error: {e}");
            failed = true;
        }
    }
    for e in &stats.modbus_errors {
        println!("modbus {e}");
        failed = true;
    }
    println!(
        "{} readings made durable, {} committed to Parquet, {} bad inputs quarantined",
        stats.readings, stats.flushed, stats.quarantined
    );
    if cfg_uplink {
        println!(
            "uplink: {} readings spooled, {} refused, {} messages still pending (sent on the next start)",
            stats.uplinked, stats.uplink_refused, stats.uplink_pending
        );
        if stats.uplink_refused > 0 {
            failed = true;
        }
    }
    Ok(if failed {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}
