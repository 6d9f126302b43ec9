//! The DL/T 645 collector: one task per bus. Meters on a bus are polled
//! strictly one at a time with a silent gap; buses run concurrently. A dead
//! meter costs its own timeout (and retries) once per cycle, then is degraded;
//! a lost link is re-established with backoff, forever.

pub mod bench;
pub mod bus;
pub mod link;
pub mod poll;
pub mod relay;
pub mod scan;

use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

pub use bus::{Bus, BusCounters, BusTiming, TxError};
pub use link::{Endpoint, Link};
pub use poll::{MeterState, PollSettings};

use crate::collector::config::{BusConfig, CollectorConfig, ResolvedMeter};
use crate::collector::run::{LakeMsg, LakeTx};
use crate::metrics;

/// What a bus task did, for `collect --once` reports and tests.
#[derive(Debug, Clone, Default)]
pub struct BusReport {
    pub bus: String,
    pub cycles: u64,
    pub readings: u64,
    pub meters_answered: usize,
    pub meters_silent: Vec<String>,
    pub meters_skewed: Vec<String>,
    pub connect_failures: u64,
    pub counters: BusCounters,
    /// Set when the bus could not be reached at all (`--once`).
    pub error: Option<String>,
}

/// Why a bus task stopped early.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus {bus}: cannot connect to {endpoint}: {source}")]
    Connect {
        bus: String,
        endpoint: String,
        source: std::io::Error,
    },
    #[error("readings channel closed")]
    ChannelClosed,
}

/// Opens a bus described by `cfg` (for one-off tools such as relay control).
pub async fn connect(cfg: &BusConfig) -> std::io::Result<Bus> {
    let ep = Endpoint::of(cfg);
    let timing = BusTiming::of(cfg);
    let l = link::open(&ep, timing.timeout.max(Duration::from_secs(2))).await?;
    Ok(Bus::new(cfg.name.clone(), l, timing))
}

/// Resolves the buses of a config: (bus, its meters, settings).
pub fn plan(cfg: &CollectorConfig) -> Vec<(BusConfig, Vec<ResolvedMeter>, PollSettings)> {
    let root = crate::protocol::modbus::config::FieldPath::default().key("dlt645");
    let resolved = cfg
        .dlt645
        .resolve(&root)
        .expect("config was validated at load");
    let offset = cfg.dlt645.offset().expect("config was validated at load");
    cfg.dlt645
        .buses
        .iter()
        .zip(resolved)
        .map(|(b, meters)| {
            let s = PollSettings {
                collector_id: cfg.collector_id.clone(),
                offset,
                skew_threshold: Duration::from_secs(cfg.dlt645.clock_skew_threshold_s),
                time_sync: cfg.dlt645.time_sync,
                degrade_after_cycles: b.degrade_after_cycles,
                degraded_interval: Duration::from_secs(b.degraded_poll_interval_s),
            };
            (b.clone(), meters, s)
        })
        .collect()
}

/// Hands the bus's kept bad input to the lake writer.
async fn send_quarantine(bus: &mut Bus, collector: &str, tx: &LakeTx) -> Result<(), BusError> {
    if bus.quarantined.is_empty() {
        return Ok(());
    }
    let mut recs = std::mem::take(&mut bus.quarantined);
    report_quarantine(&bus.name, &recs);
    for r in &mut recs {
        r.collector = collector.to_string();
    }
    tx.send(LakeMsg::Quarantine(recs))
        .await
        .map_err(|_| BusError::ChannelClosed)
}

fn report_quarantine(bus: &str, recs: &[crate::store::QuarantineRecord]) {
    for r in recs {
        metrics::counter_add(
            "meterflow_dlt645_quarantined_total",
            &[("bus", bus), ("meter", &r.address)],
            1,
        );
    }
}

/// Hands a meter's readings to the lake writer. Daily reads among them are
/// done for the day only once the writer says they are durable in every sink.
async fn send_readings(
    st: &mut MeterState,
    out: poll::MeterOutcome,
    settings: &PollSettings,
    bus: &str,
    tx: &LakeTx,
) -> Result<(), BusError> {
    let Some(daily) = out.daily else {
        if !out.readings.is_empty() && tx.send(LakeMsg::Readings(out.readings)).await.is_err() {
            return Err(BusError::ChannelClosed);
        }
        return Ok(());
    };
    if out.readings.is_empty() {
        st.settle_daily(&daily, true, settings, bus);
        return Ok(());
    }
    let (done, durable) = oneshot::channel();
    tx.send(LakeMsg::ReadingsAcked {
        readings: out.readings,
        durable: done,
    })
    .await
    .map_err(|_| BusError::ChannelClosed)?;
    // A writer that stopped without answering did not store them.
    let durable = durable.await.unwrap_or(false);
    st.settle_daily(&daily, durable, settings, bus);
    Ok(())
}

/// Polls one bus until `shutdown` (or for one cycle with `once`), sending
/// each meter's readings on `tx` as soon as its turn is over.
pub async fn run_bus(
    cfg: BusConfig,
    meters: Vec<ResolvedMeter>,
    settings: PollSettings,
    tx: LakeTx,
    once: bool,
    mut shutdown: watch::Receiver<bool>,
) -> Result<BusReport, BusError> {
    bus::describe_metrics();
    let endpoint = Endpoint::of(&cfg);
    let timing = BusTiming::of(&cfg);
    let mut states: Vec<MeterState> = meters.into_iter().map(MeterState::new).collect();
    let mut report = BusReport {
        bus: cfg.name.clone(),
        ..Default::default()
    };
    let mut backoff = Duration::from_millis(cfg.reconnect_backoff_ms);
    let max_backoff =
        Duration::from_millis(cfg.reconnect_backoff_max_ms.max(cfg.reconnect_backoff_ms));
    let connect_timeout = timing.timeout.max(Duration::from_secs(2));

    'connect: loop {
        if *shutdown.borrow() {
            return Ok(report);
        }
        let link = match link::open(&endpoint, connect_timeout).await {
            Ok(l) => l,
            Err(e) => {
                report.connect_failures += 1;
                if once && report.connect_failures > cfg.retries as u64 {
                    report.error = Some(format!("cannot connect to {endpoint}: {e}"));
                    return Err(BusError::Connect {
                        bus: cfg.name.clone(),
                        endpoint: endpoint.to_string(),
                        source: e,
                    });
                }
                tracing::warn!(bus = %cfg.name, %endpoint, error = %e, retry_in_ms = backoff.as_millis() as u64, "bus connect failed");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => {}
                }
                backoff = (backoff * 2).min(max_backoff);
                continue 'connect;
            }
        };
        metrics::counter_add(
            "meterflow_dlt645_reconnects_total",
            &[("bus", &cfg.name)],
            1,
        );
        tracing::info!(bus = %cfg.name, %endpoint, meters = states.len(), "bus connected");
        backoff = Duration::from_millis(cfg.reconnect_backoff_ms);
        let mut bus = Bus::new(cfg.name.clone(), link, timing);

        loop {
            let cycle_start = Instant::now();
            let mut needs_sync = false;
            let mut lost = None;
            for st in states.iter_mut() {
                if *shutdown.borrow() {
                    break;
                }
                match poll::poll_meter(&mut bus, st, &settings, once).await {
                    Ok(None) => {}
                    Ok(Some(out)) => {
                        if once {
                            if out.answered {
                                report.meters_answered += 1;
                            } else {
                                report.meters_silent.push(st.meter.meter_id.clone());
                            }
                            if out.skewed {
                                report.meters_skewed.push(st.meter.meter_id.clone());
                            }
                        }
                        needs_sync |= out.skewed;
                        report.readings += out.readings.len() as u64;
                        send_readings(st, out, &settings, &cfg.name, &tx).await?;
                    }
                    Err(poll::LinkLost(e)) => {
                        lost = Some(e);
                    }
                }
                send_quarantine(&mut bus, &settings.collector_id, &tx).await?;
                if lost.is_some() {
                    break;
                }
            }
            report.counters.add(&bus.counters);
            bus.counters = BusCounters::default();
            if let Some(e) = lost {
                tracing::warn!(bus = %cfg.name, error = %e, "bus link lost; reconnecting");
                if once {
                    report.error = Some(format!("link lost: {e}"));
                    return Ok(report);
                }
                continue 'connect;
            }
            report.cycles += 1;
            if needs_sync && settings.time_sync {
                if let Err(e) = poll::time_sync(&mut bus, settings.offset).await {
                    tracing::warn!(bus = %cfg.name, error = %e, "time sync broadcast failed");
                } else {
                    tracing::info!(bus = %cfg.name, "broadcast time sync sent");
                }
            }
            if once || *shutdown.borrow() {
                return Ok(report);
            }
            tracing::debug!(bus = %cfg.name, ms = cycle_start.elapsed().as_millis() as u64, "cycle done");
            let now = Instant::now();
            let next = states
                .iter()
                .map(|s| s.next_due(now))
                .min()
                .unwrap_or(now + Duration::from_secs(1));
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = shutdown.changed() => {}
            }
        }
    }
}
