//! `meterflow ingest mqtt`: subscribe to a broker and write readings into the lake.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::ingest::config::IngestConfig;
use crate::ingest::{run_ingest, IngestOptions};

#[derive(Debug, Subcommand)]
pub enum IngestCmd {
    /// Subscribe to the topic filters of an ingest.toml and write readings into a lake.
    ///
    /// Messages are acknowledged (QoS 1 PUBACK) only after their readings, or
    /// their dead letter, are durable in the lake's spool: kill the process at
    /// any moment and the broker redelivers what was not yet safe. Payload
    /// formats and the config are described in docs/mqtt.md.
    Mqtt(MqttIngestArgs),
}

#[derive(Debug, Args)]
pub struct MqttIngestArgs {
    /// ingest.toml: broker, client id, TLS files, and one [[source]] per topic filter.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Lake root directory (created if missing).
    #[arg(long, value_name = "LAKE")]
    pub out: PathBuf,
    /// Share the stream with other ingest processes through `$share/NAME/<filter>`.
    /// Give each process its own client id.
    #[arg(long, value_name = "NAME")]
    pub shared_group: Option<String>,
    /// Override the client id of the config (e.g. one per replica of a shared group).
    #[arg(long)]
    pub client_id: Option<String>,
    /// Stop after this many readings were decoded and committed, and print the
    /// rate (for scripts/bench-mqtt.sh).
    #[arg(long, value_name = "N")]
    pub stop_after_readings: Option<u64>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9184).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

pub fn run(cmd: IngestCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        IngestCmd::Mqtt(a) => run_mqtt(a),
    }
}

fn run_mqtt(a: MqttIngestArgs) -> anyhow::Result<ExitCode> {
    let mut config = IngestConfig::load(&a.config)?;
    if let Some(id) = a.client_id {
        config.mqtt.client_id = id;
    }
    let opts = IngestOptions {
        config,
        lake: a.out.clone(),
        shared_group: a.shared_group,
        writer_id: None,
        subscribed: None,
        stop_after_readings: a.stop_after_readings,
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        if let Some(addr) = a.metrics_addr {
            crate::metrics::serve(addr)
                .await
                .with_context(|| format!("metrics listener on {addr}"))?;
        }
        let stats = run_ingest(opts, shutdown_signal())
            .await
            .with_context(|| format!("ingest into {}", a.out.display()))?;
        let secs = stats.busy_ms as f64 / 1000.0;
        println!(
            "mqtt ingest: {} messages, {} readings, {} dead letters, {} readings committed to {} in {secs:.3} s ({:.0} readings/s)",
            stats.messages,
            stats.readings,
            stats.dead_letters,
            stats.committed,
            a.out.display(),
            stats.readings as f64 / secs.max(1e-9)
        );
        Ok(ExitCode::SUCCESS)
    })
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("shutting down: committing the spool");
}
