//! The Modbus collector: polls the devices of one `[[modbus]]` connection in
//! cycles and sends their readings to the shared collector.
//!
//! One dead unit never costs the others their readings: a device that stops
//! answering is abandoned for the cycle after its first timed-out request,
//! and after `degrade_after_cycles` failed cycles it is only tried every
//! `degraded_poll_interval_ms`.

pub mod config;
pub mod poll;
pub mod transport;

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

pub use config::{
    load_file, parse_str, validate_in_file, ModbusConnectionConfig, ModbusDeviceConfig,
    ResolvedDevice, SerialConfig, Transport,
};
use poll::{poll_device, DeviceOutcome, RetryPolicy};
use transport::{Link, LinkSettings};

use crate::collector::run::{LakeMsg, LakeTx};
use crate::metrics;
use crate::model::{now_ms, Reading};
use crate::protocol::modbus::FieldPath;
use crate::store::QuarantineRecord;

/// Why a connection stopped.
#[derive(Debug, thiserror::Error)]
pub enum ModbusError {
    #[error("modbus config: {0}")]
    Config(String),
    #[error("readings channel closed")]
    ChannelClosed,
}

/// Health of one device, carried across cycles.
#[derive(Debug, Clone)]
pub struct DeviceHealth {
    pub failed_cycles: u32,
    pub degraded: bool,
    pub next_due: Instant,
    pub last_success_ms: Option<i64>,
}

/// Runtime knobs derived from the config.
struct Knobs {
    poll: Duration,
    degrade_after: u32,
    degraded_poll: Duration,
    policy: RetryPolicy,
}

fn describe_metrics() {
    metrics::describe(
        "meterflow_modbus_requests_total",
        "Modbus read requests sent, per device",
    );
    metrics::describe("meterflow_modbus_errors_total", "Modbus errors per device by kind (timeout, exception_XX, io, protocol, not_finite, out_of_range, ...)");
    metrics::describe(
        "meterflow_modbus_exceptions_total",
        "Modbus exception responses per device, register and code",
    );
    metrics::describe(
        "meterflow_modbus_request_seconds",
        "Modbus request latency, including timeouts",
    );
    metrics::describe(
        "meterflow_modbus_last_success_timestamp_seconds",
        "Unix time of the device's last successful cycle",
    );
    metrics::describe(
        "meterflow_modbus_device_degraded",
        "1 while the device is degraded (polled less often)",
    );
    metrics::describe(
        "meterflow_modbus_cycle_seconds",
        "Time to poll all due devices of a connection",
    );
}

/// Quarantine records a [`Poller`] holds until [`Poller::take_quarantine`].
const MAX_HELD_QUARANTINE: usize = 10_000;

/// A connection's devices, links and health: one [`Poller::cycle`] polls
/// every due device once.
pub struct Poller {
    cfg: ModbusConnectionConfig,
    collector_id: String,
    devices: Vec<ResolvedDevice>,
    health: Vec<DeviceHealth>,
    links: Vec<Link>,
    knobs: Knobs,
    quarantined: Vec<QuarantineRecord>,
}

impl Poller {
    /// Validates the connection and plans its devices.
    pub fn new(cfg: ModbusConnectionConfig, collector_id: String) -> Result<Poller, ModbusError> {
        let devices = cfg
            .resolve(&FieldPath::default().key("modbus"))
            .map_err(|e| {
                ModbusError::Config(format!(
                    "connection '{}': {}: {}",
                    cfg.name, e.path, e.message
                ))
            })?;
        describe_metrics();
        let knobs = Knobs {
            poll: Duration::from_millis(cfg.poll_interval_ms),
            degrade_after: cfg.degrade_after_cycles.max(1),
            degraded_poll: Duration::from_millis(cfg.degraded_poll_interval_ms),
            policy: RetryPolicy {
                retries: cfg.retries,
                backoff: Duration::from_millis(cfg.retry_backoff_ms),
                pause_between_requests: Duration::from_millis(cfg.pause_between_requests_ms),
            },
        };
        let settings = LinkSettings::from_config(&cfg);
        let links: Vec<Link> = (0..cfg.concurrency().min(devices.len()).max(1))
            .map(|_| Link::new(settings.clone()))
            .collect();
        let now = Instant::now();
        let health = devices
            .iter()
            .map(|_| DeviceHealth {
                failed_cycles: 0,
                degraded: false,
                next_due: now,
                last_success_ms: None,
            })
            .collect();
        Ok(Poller {
            cfg,
            collector_id,
            devices,
            health,
            links,
            knobs,
            quarantined: Vec::new(),
        })
    }

    pub fn devices(&self) -> &[ResolvedDevice] {
        &self.devices
    }

    pub fn health(&self) -> &[DeviceHealth] {
        &self.health
    }

    /// Requests one cycle issues for all devices.
    pub fn planned_requests(&self) -> usize {
        self.devices.iter().map(|d| d.requests.len()).sum()
    }

    /// Undecodable registers and replies seen since the last call.
    pub fn take_quarantine(&mut self) -> Vec<QuarantineRecord> {
        std::mem::take(&mut self.quarantined)
    }

    /// Polls every due device once (`all`: every device, degraded or not).
    /// Bad input seen on the way waits in [`Poller::take_quarantine`].
    pub async fn cycle(&mut self, all: bool) -> Vec<Reading> {
        let (batch, bad) = run_cycle(
            &self.cfg,
            &self.collector_id,
            &self.devices,
            &mut self.health,
            &mut self.links,
            &self.knobs,
            all,
        )
        .await;
        if self.cfg.close_after_cycle {
            self.links.iter_mut().for_each(|l| l.reset(false));
        }
        self.quarantined.extend(bad);
        // Nobody collecting them (a tool driving cycles itself): keep memory bounded.
        if self.quarantined.len() > MAX_HELD_QUARANTINE {
            let drop = self.quarantined.len() - MAX_HELD_QUARANTINE;
            tracing::warn!(connection = %self.cfg.name, dropped = drop, "quarantine records not collected; dropping the oldest");
            self.quarantined.drain(..drop);
        }
        batch
    }
}

/// Polls a connection's devices until `shutdown` turns true (or once, with
/// `once`), sending each cycle's readings as one batch on `tx`.
pub async fn run_connection(
    cfg: ModbusConnectionConfig,
    collector_id: String,
    tx: LakeTx,
    once: bool,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ModbusError> {
    let mut poller = Poller::new(cfg, collector_id)?;
    let name = poller.cfg.name.clone();
    tracing::info!(connection = %name, transport = ?poller.cfg.transport, devices = poller.devices.len(),
        requests = poller.planned_requests(),
        registers = poller.devices.iter().map(|d| d.registers.len()).sum::<usize>(),
        concurrency = poller.links.len(), "modbus connection starting");
    let mut ticker = tokio::time::interval(poller.knobs.poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            break;
        }
        let batch = poller.cycle(once).await;
        if !batch.is_empty() && tx.send(LakeMsg::Readings(batch)).await.is_err() {
            return Err(ModbusError::ChannelClosed);
        }
        let bad = poller.take_quarantine();
        if !bad.is_empty() && tx.send(LakeMsg::Quarantine(bad)).await.is_err() {
            return Err(ModbusError::ChannelClosed);
        }
        if once {
            break;
        }
    }
    tracing::info!(connection = %name, "modbus connection stopped");
    Ok(())
}

/// One cycle: every due device once, `links.len()` at a time.
async fn run_cycle(
    cfg: &ModbusConnectionConfig,
    collector_id: &str,
    devices: &[ResolvedDevice],
    health: &mut [DeviceHealth],
    links: &mut [Link],
    knobs: &Knobs,
    all: bool,
) -> (Vec<Reading>, Vec<QuarantineRecord>) {
    let t0 = Instant::now();
    let due: VecDeque<usize> = (0..devices.len())
        .filter(|&i| all || health[i].next_due <= t0)
        .collect();
    if due.is_empty() {
        return (Vec::new(), Vec::new());
    }
    let queue = Mutex::new(due);
    let results: Mutex<Vec<(usize, DeviceOutcome)>> = Mutex::new(Vec::new());
    let workers = links.iter_mut().map(|link| {
        let (queue, results) = (&queue, &results);
        async move {
            loop {
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                let Some(i) = next else { break };
                let o =
                    poll_device(link, &devices[i], &knobs.policy, &cfg.name, collector_id).await;
                results
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((i, o));
            }
        }
    });
    futures::future::join_all(workers).await;
    let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    results.sort_by_key(|(i, _)| *i);
    let mut batch = Vec::new();
    let mut bad = Vec::new();
    for (i, mut o) in results {
        update_health(cfg, &devices[i], &mut health[i], &o, knobs, t0);
        batch.append(&mut o.readings);
        bad.append(&mut o.quarantine);
    }
    metrics::histogram_observe(
        "meterflow_modbus_cycle_seconds",
        &[("connection", cfg.name.as_str())],
        t0.elapsed().as_secs_f64(),
    );
    (batch, bad)
}

fn update_health(
    cfg: &ModbusConnectionConfig,
    dev: &ResolvedDevice,
    h: &mut DeviceHealth,
    o: &DeviceOutcome,
    knobs: &Knobs,
    now: Instant,
) {
    let unit = dev.unit_id.to_string();
    let labels = [
        ("connection", cfg.name.as_str()),
        ("meter", dev.meter_id.as_str()),
        ("unit", unit.as_str()),
    ];
    let ok = !o.readings.is_empty();
    if ok {
        if h.degraded {
            tracing::info!(connection = %cfg.name, meter = %dev.meter_id, unit = dev.unit_id, "device answers again; no longer degraded");
        }
        h.failed_cycles = 0;
        h.degraded = false;
        let ms = now_ms();
        h.last_success_ms = Some(ms);
        metrics::gauge_set(
            "meterflow_modbus_last_success_timestamp_seconds",
            &labels,
            ms as f64 / 1000.0,
        );
        h.next_due = now;
    } else {
        h.failed_cycles += 1;
        if h.failed_cycles >= knobs.degrade_after {
            if !h.degraded {
                tracing::warn!(connection = %cfg.name, meter = %dev.meter_id, unit = dev.unit_id, failed_cycles = h.failed_cycles,
                    retry_in_ms = knobs.degraded_poll.as_millis() as u64, silent = o.silent,
                    "device degraded: polled less often so it does not slow the healthy ones");
            }
            h.degraded = true;
            h.next_due = now + knobs.degraded_poll;
        } else {
            h.next_due = now;
        }
    }
    metrics::gauge_set(
        "meterflow_modbus_device_degraded",
        &labels,
        if h.degraded { 1.0 } else { 0.0 },
    );
    if ok && (o.requests_failed > 0 || !o.errors.is_empty()) {
        tracing::info!(connection = %cfg.name, meter = %dev.meter_id, readings = o.readings.len(), failed_requests = o.requests_failed,
            errors = o.errors.len(), "device partly read");
    }
}
