//! The `collect` engine: one task per DL/T 645 bus and per Modbus
//! connection, all sending [`LakeMsg`]s (readings, or bad input kept with its
//! reason) to one lake-writer task that makes them durable (`Lake::accept`,
//! `Lake::quarantine`) in arrival order and commits them to Parquet
//! (`Lake::flush`) periodically and at shutdown.
//!
//! With an `[uplink]`, readings are also (or, with `lake = false`, only)
//! written to the uplink's spool; a batch counts as collected once it is
//! durable in every place it goes. Quarantined input always stays in the
//! local lake.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use super::config::CollectorConfig;
use super::dlt645::{self, BusReport};
use crate::model::Reading;
use crate::store::{Lake, LakeOptions, QuarantineRecord, StoreError};
use crate::uplink::{SpoolError, Uplink, UplinkError};

/// What a bus or connection task sends to the lake writer.
#[derive(Debug)]
pub enum LakeMsg {
    Readings(Vec<Reading>),
    /// Readings whose sender must know whether they became durable in every
    /// configured sink (lake and/or uplink spool): a daily frozen read stays
    /// due until they are. `false` (or a dropped sender) means not stored.
    ReadingsAcked {
        readings: Vec<Reading>,
        durable: oneshot::Sender<bool>,
    },
    /// Malformed frames, noise and undecodable values, with their reason.
    Quarantine(Vec<QuarantineRecord>),
}

/// Sender half used by the bus and connection tasks.
pub type LakeTx = mpsc::Sender<LakeMsg>;

/// How to run.
#[derive(Debug, Clone)]
pub struct CollectOptions {
    pub lake_dir: PathBuf,
    /// One cycle of every bus and connection, flush, exit.
    pub once: bool,
    pub metrics_addr: Option<SocketAddr>,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct CollectStats {
    /// Readings collected: durable in the lake and/or the uplink spool.
    pub readings: u64,
    /// Readings made durable in the uplink spool.
    pub uplinked: u64,
    /// Readings the uplink refused (spool at its cap, unusable meter id).
    pub uplink_refused: u64,
    /// Uplink messages still unacknowledged at exit (sent on the next start).
    pub uplink_pending: usize,
    /// Readings committed to Parquet by flushes.
    pub flushed: u64,
    /// Quarantine records made durable.
    pub quarantined: u64,
    pub buses: Vec<BusReport>,
    /// Modbus connections that ended with an error.
    pub modbus_errors: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error("lake: {0}")]
    Lake(#[from] StoreError),
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("lake writer task failed: {0}")]
    Writer(String),
    #[error("uplink: {0}")]
    Uplink(#[from] UplinkError),
}

/// Runs one cycle of every bus and connection in `cfg`, writes the readings
/// to the lake at `lake_dir` and flushes it.
pub async fn collect_once(
    cfg: CollectorConfig,
    lake_dir: &Path,
) -> Result<CollectStats, CollectError> {
    let (_tx, rx) = watch::channel(false);
    run(
        cfg,
        CollectOptions {
            lake_dir: lake_dir.to_path_buf(),
            once: true,
            metrics_addr: None,
        },
        rx,
    )
    .await
}

/// Runs until `shutdown` turns true (or one cycle with `opts.once`).
pub async fn run(
    cfg: CollectorConfig,
    opts: CollectOptions,
    shutdown: watch::Receiver<bool>,
) -> Result<CollectStats, CollectError> {
    let metrics_task = match opts.metrics_addr {
        Some(addr) => Some(
            crate::metrics::serve(addr)
                .await
                .map_err(|source| CollectError::Metrics { addr, source })?,
        ),
        None => None,
    };
    let lake_dir = opts.lake_dir.clone();
    let writer_id = format!("collect-{}", cfg.collector_id);
    let lake =
        tokio::task::spawn_blocking(move || Lake::open(&lake_dir, LakeOptions::new(writer_id)))
            .await
            .map_err(|e| CollectError::Writer(e.to_string()))??;

    let uplink = match cfg.uplink_config() {
        Some(u) => Some(Arc::new(Uplink::start(u)?)),
        None => None,
    };
    let (tx, rx) = mpsc::channel::<LakeMsg>(256);
    let writer = tokio::spawn(lake_writer(
        lake,
        rx,
        Duration::from_secs(cfg.lake.flush_interval_s.max(1)),
        cfg.lake.flush_max_readings.max(1),
        Sinks {
            lake: cfg.writes_lake(),
            uplink: uplink.clone(),
        },
    ));

    let mut bus_tasks = vec![];
    for (bus, meters, settings) in dlt645::plan(&cfg) {
        let name = bus.name.clone();
        let t = tokio::spawn(dlt645::run_bus(
            bus,
            meters,
            settings,
            tx.clone(),
            opts.once,
            shutdown.clone(),
        ));
        bus_tasks.push((name, t));
    }
    let mut modbus_tasks = vec![];
    for c in cfg.modbus.clone() {
        let name = c.name.clone();
        let t = tokio::spawn(crate::collector::modbus::run_connection(
            c,
            cfg.collector_id.clone(),
            tx.clone(),
            opts.once,
            shutdown.clone(),
        ));
        modbus_tasks.push((name, t));
    }
    drop(tx);

    let mut stats = CollectStats::default();
    for (name, t) in bus_tasks {
        match t.await {
            Ok(Ok(r)) => stats.buses.push(r),
            Ok(Err(e)) => {
                tracing::error!(bus = %name, error = %e, "bus stopped");
                stats.buses.push(BusReport {
                    bus: name,
                    error: Some(e.to_string()),
                    ..Default::default()
                });
            }
            Err(e) => stats.buses.push(BusReport {
                bus: name,
                error: Some(format!("task failed: {e}")),
                ..Default::default()
            }),
        }
    }
    for (name, t) in modbus_tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => stats.modbus_errors.push(format!("{name}: {e}")),
            Err(e) => stats
                .modbus_errors
                .push(format!("{name}: task failed: {e}")),
        }
    }
    // Every sender is gone: the writer drains the channel, flushes and ends.
    let w = writer
        .await
        .map_err(|e| CollectError::Writer(e.to_string()))??;
    stats.readings = w.accepted;
    stats.flushed = w.flushed;
    stats.quarantined = w.quarantined;
    stats.uplinked = w.uplinked;
    stats.uplink_refused = w.uplink_refused;
    if let Some(u) = uplink {
        let drain = Duration::from_secs(cfg.uplink.as_ref().map_or(0, |u| u.drain_on_exit_s));
        if !u.drain(drain).await {
            tracing::warn!(
                pending = u.pending(),
                "uplink not drained at exit; the rest is sent on the next start"
            );
        }
        stats.uplink_pending = u.pending();
        match Arc::try_unwrap(u) {
            Ok(u) => u.shutdown().await,
            Err(_) => tracing::error!("uplink still shared at exit"),
        }
    }
    if let Some(m) = metrics_task {
        m.abort();
    }
    Ok(stats)
}

#[derive(Debug, Default)]
struct WriterStats {
    accepted: u64,
    flushed: u64,
    quarantined: u64,
    uplinked: u64,
    uplink_refused: u64,
}

/// A message as the writer handles it (acknowledgement taken apart).
enum Batch {
    Readings(Vec<Reading>),
    Quarantine(Vec<QuarantineRecord>),
}

/// Where readings go.
struct Sinks {
    lake: bool,
    uplink: Option<Arc<Uplink>>,
}

/// Receives batches, makes each durable, flushes on a timer, on size and at the end.
async fn lake_writer(
    lake: Lake,
    mut rx: mpsc::Receiver<LakeMsg>,
    every: Duration,
    max_pending: usize,
    sinks: Sinks,
) -> Result<WriterStats, CollectError> {
    let mut lake = Some(lake);
    let mut accepted = 0u64;
    let mut flushed = 0u64;
    let mut quarantined = 0u64;
    let mut uplinked = 0u64;
    let mut uplink_refused = 0u64;
    let mut pending = 0usize;
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        let batch = tokio::select! {
            b = rx.recv() => b,
            _ = tick.tick() => {
                if pending > 0 {
                    flushed += flush(&mut lake).await? as u64;
                    pending = 0;
                }
                continue;
            }
        };
        let Some(msg) = batch else { break };
        let (msg, ack) = match msg {
            LakeMsg::Readings(b) => (Batch::Readings(b), None),
            LakeMsg::ReadingsAcked { readings, durable } => {
                (Batch::Readings(readings), Some(durable))
            }
            LakeMsg::Quarantine(q) => (Batch::Quarantine(q), None),
        };
        // Uplink first: once this returns the readings are durable in its spool.
        let mut in_uplink = false;
        if let (Batch::Readings(b), Some(u)) = (&msg, &sinks.uplink) {
            let (u, b) = (u.clone(), b.clone());
            let n = b.len() as u64;
            match tokio::task::spawn_blocking(move || u.send(b))
                .await
                .map_err(|e| CollectError::Writer(e.to_string()))?
            {
                Ok(()) => {
                    uplinked += n;
                    in_uplink = true;
                }
                Err(UplinkError::Spool(SpoolError::Io { path, source })) => {
                    tracing::error!(path = %path.display(), error = %source, "uplink spool write failed");
                    return Err(UplinkError::Spool(SpoolError::Io { path, source }).into());
                }
                Err(e) => {
                    // Spool full (alarm raised long before) or a meter id Sparkplug
                    // cannot carry: not collected; the next cycle reads the meters
                    // again, and a daily read stays due (its ack says not durable).
                    uplink_refused += n;
                    tracing::error!(error = %e, readings = n, "uplink refused a batch");
                }
            }
        }
        let uplink_ok = sinks.uplink.is_none() || in_uplink;
        if !sinks.lake {
            if let Batch::Readings(b) = &msg {
                if in_uplink {
                    accepted += b.len() as u64;
                }
                if let Some(a) = ack {
                    let _ = a.send(uplink_ok);
                }
                continue;
            }
        }
        let (n, is_readings) = match &msg {
            Batch::Readings(b) => (b.len(), true),
            Batch::Quarantine(q) => (q.len(), false),
        };
        let mut l = lake.take().expect("lake is put back after every use");
        let (l, r) = tokio::task::spawn_blocking(move || {
            let r = match &msg {
                Batch::Readings(b) => l.accept(b),
                Batch::Quarantine(q) => l.quarantine(q),
            };
            (l, r)
        })
        .await
        .map_err(|e| CollectError::Writer(e.to_string()))?;
        lake = Some(l);
        if let Err(e) = r {
            // Not durable: say so loudly; the next cycle reads the meters again.
            tracing::error!(error = %e, records = n, is_readings, "lake refused a batch");
            return Err(e.into());
        }
        if is_readings {
            accepted += n as u64;
            if let Some(a) = ack {
                let _ = a.send(uplink_ok);
            }
        } else {
            quarantined += n as u64;
        }
        pending += n;
        if pending >= max_pending {
            flushed += flush(&mut lake).await? as u64;
            pending = 0;
        }
    }
    flushed += flush(&mut lake).await? as u64;
    Ok(WriterStats {
        accepted,
        flushed,
        quarantined,
        uplinked,
        uplink_refused,
    })
}

async fn flush(lake: &mut Option<Lake>) -> Result<usize, CollectError> {
    let mut l = lake.take().expect("lake is put back after every use");
    let (l, r) = tokio::task::spawn_blocking(move || {
        let r = l.flush();
        (l, r)
    })
    .await
    .map_err(|e| CollectError::Writer(e.to_string()))?;
    *lake = Some(l);
    let s = r?;
    if s.readings > 0 {
        tracing::info!(readings = s.readings, files = s.files, "lake flushed");
    }
    Ok(s.readings)
}
