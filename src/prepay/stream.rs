//! Streaming deductions: `meterflow stream --config stream.toml`.
//!
//! Subscribes (QoS 1, persistent session, manual acks) to canonical readings
//! JSON (decoded by the ingest decoder), deducts every prepaid meter's
//! `import_active_total` step in one ledger transaction per batch of
//! messages, and acknowledges the messages only after that transaction
//! committed. A crash before the commit loses nothing (the broker redelivers);
//! a crash after the commit but before the acks redelivers readings that the
//! cursors now mark stale: the same ledger as without the crash.
//! Several processes may share one PostgreSQL ledger and one `$share` group.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, MqttOptions, Packet, Publish, QoS};
use rust_decimal::Decimal;
use serde::Deserialize;

use super::alerts::Thresholds;
use super::control::{dispatch, Control, RelayDispatch};
use super::pricing::{Pricer, TariffPricer};
use super::run::{
    chargeable, deduct_channel, deduct_meter, interval_meters, join_registers, note_spend,
    tariff_register, tou_meters, Fleet, PrepayHook, RegisterReading, RunStats,
};
use super::sinks::{deliver, mqtt_publisher, DeliverStats, Sinks};
use super::{line_of, PrepayError};
use crate::ledger::{Batch, Cursor, Ledger};
use crate::model::Channel;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamMqtt {
    /// `mqtt://127.0.0.1:1883`
    pub url: String,
    /// Fixed client id: the broker keeps the session (unacked messages) for it.
    pub client_id: String,
    /// Topic filter of canonical readings JSON.
    pub topic: String,
    /// Subscribe as `$share/<group>/<topic>` so several processes split the stream.
    pub shared_group: Option<String>,
    /// Where alerts are published (QoS 1 JSON).
    pub alerts_topic: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamBatch {
    /// Most messages per ledger transaction.
    #[serde(default = "default_max_messages")]
    pub max_messages: usize,
    /// Longest wait for more messages before committing, ms.
    #[serde(default = "default_max_wait")]
    pub max_wait_ms: u64,
}

fn default_max_messages() -> usize {
    500
}
fn default_max_wait() -> u64 {
    20
}

impl Default for StreamBatch {
    fn default() -> Self {
        StreamBatch {
            max_messages: default_max_messages(),
            max_wait_ms: default_max_wait(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// Ledger URL: a SQLite path or `postgres://...` (relative paths: against the config file).
    pub ledger: String,
    /// Folder with `accounts.csv` and `meters.csv`.
    pub master: String,
    /// Tariff folder.
    pub tariffs: String,
    /// Thresholds file (built-in 50/20/zero/-30/3 days without one).
    pub thresholds: Option<String>,
    /// Root for the `alerts` Parquet dataset.
    pub alerts_dataset: Option<String>,
    /// Webhook for alerts (`http://127.0.0.1:PORT/path`).
    pub webhook: Option<String>,
    /// Lake root whose `quarantine` dataset receives undecodable messages.
    pub dead_letter_lake: Option<String>,
    pub mqtt: StreamMqtt,
    #[serde(default)]
    pub batch: StreamBatch,
    #[serde(skip)]
    pub base_dir: PathBuf,
}

impl StreamConfig {
    pub fn load(path: &Path) -> Result<StreamConfig, PrepayError> {
        let text = std::fs::read_to_string(path).map_err(|e| PrepayError::io(path, e))?;
        let mut c: StreamConfig = toml::from_str(&text).map_err(|e| {
            let line = e.span().map_or(0, |s| line_of(&text, s.start));
            let msg = e.message().to_string();
            let field = msg.split('`').nth(1).unwrap_or("-").to_string();
            PrepayError::Config {
                file: path.display().to_string(),
                line,
                field,
                message: msg,
            }
        })?;
        c.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(c)
    }

    pub fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    pub fn ledger_url(&self) -> String {
        if self.ledger.starts_with("postgres") {
            self.ledger.clone()
        } else {
            self.resolve(self.ledger.strip_prefix("sqlite:").unwrap_or(&self.ledger))
                .display()
                .to_string()
        }
    }
}

/// Options beside the config.
#[derive(Default)]
pub struct StreamOptions {
    /// Stop once this many deductions were committed by this process (bench, tests).
    pub stop_after_deductions: Option<usize>,
    /// Stop after this long without any message (tests); run forever otherwise.
    pub idle_exit: Option<Duration>,
    /// Set to stop (after committing the current batch).
    pub stop: Option<Arc<AtomicBool>>,
}

/// Runs the stream until stopped. Returns the counters.
pub fn run_stream(cfg: &StreamConfig, opts: &StreamOptions) -> Result<RunStats, PrepayError> {
    let mut ledger = crate::ledger::open_migrated(&cfg.ledger_url())?;
    let fleet = Fleet::load(&cfg.resolve(&cfg.master))?;
    let tariffs = crate::tariff::load_dir(&cfg.resolve(&cfg.tariffs))
        .map_err(|e| PrepayError::Input(e.to_string()))?;
    let pricer = TariffPricer::new(tariffs);
    let thresholds = match &cfg.thresholds {
        Some(t) => Thresholds::load(&cfg.resolve(t))?,
        None => Thresholds::builtin(),
    };
    let control = match &cfg.thresholds {
        Some(t) => Control::of_thresholds(&thresholds, &cfg.resolve(t))?,
        None => None,
    };
    let mut hook = PrepayHook {
        control: control.as_ref(),
        ..PrepayHook::new(&thresholds, &fleet)
    };
    let sinks = Sinks {
        alerts_root: cfg.alerts_dataset.as_ref().map(|p| cfg.resolve(p)),
        webhook: cfg.webhook.clone(),
        webhook_attempts: 5,
        // Dispatched below, only when a commit ordered something.
        relay: None,
        alerts_topic: cfg.mqtt.alerts_topic.clone(),
        // Blocking here would starve the readings connection's keepalive.
        skip_when_busy: true,
    };
    // Dry run: orders stay pending for `prepay relay --execute` (docs/prepay.md).
    let relay = match &thresholds.control {
        Some(c) => Some(RelayDispatch::from_config(
            c,
            &thresholds.base_dir,
            cfg.resolve(c.audit_log.as_deref().unwrap_or("relay-audit.jsonl")),
            None,
            false,
            control.clone(),
        )?),
        None => None,
    };
    let mut lake = match &cfg.dead_letter_lake {
        Some(l) => Some(crate::store::Lake::open(
            &cfg.resolve(l),
            crate::store::LakeOptions::new(cfg.mqtt.client_id.clone()),
        )?),
        None => None,
    };

    let (_, host, port) =
        crate::ingest::mqtt::parse_url(&cfg.mqtt.url).map_err(PrepayError::Mqtt)?;
    let mut o = MqttOptions::new(cfg.mqtt.client_id.clone(), host, port);
    o.set_keep_alive(Duration::from_secs(15));
    o.set_clean_session(false);
    o.set_manual_acks(true);
    o.set_inflight(1000);
    o.set_max_packet_size(1 << 24, 1 << 24);
    let (client, mut conn) = Client::new(o, 20_000);
    let filter = match &cfg.mqtt.shared_group {
        Some(g) => format!("$share/{g}/{}", cfg.mqtt.topic),
        None => cfg.mqtt.topic.clone(),
    };
    client
        .subscribe(filter.clone(), QoS::AtLeastOnce)
        .map_err(|e| PrepayError::Mqtt(e.to_string()))?;
    tracing::info!(ledger = %ledger.describe(), topic = %filter, "stream: subscribed");

    let src: crate::ingest::config::SourceConfig = toml::from_str(&format!(
        "name = \"prepay\"\nfilter = {}\nformat = \"canonical\"\n",
        toml::Value::String(cfg.mqtt.topic.clone())
    ))
    .map_err(|e| PrepayError::Input(format!("canonical decoder: {e}")))?;
    let mut decoder = crate::ingest::decode::Decoder::new(
        &src,
        crate::ingest::decode::Limits {
            collector: cfg.mqtt.client_id.clone(),
            ..Default::default()
        },
    )
    .map_err(PrepayError::Input)?;

    // Alerts go out over their own connection: waiting for their PUBACKs
    // must not take readings off this one.
    let alerts_client = format!("{}-alerts", cfg.mqtt.client_id);
    let mut publish = mqtt_publisher(&cfg.mqtt.url, &alerts_client);
    // Alerts left undelivered by a previous crash go out first.
    let mut retry_sinks_at = after_delivery(&deliver(ledger.as_mut(), &sinks, &mut publish)?);
    if let Some(r) = &relay {
        dispatch(ledger.as_mut(), r)?;
    }
    let mut relay_orders_seen = 0;
    let mut alerts_due = false;

    let tou = tou_meters(&pricer, &fleet, crate::model::now_ms());
    let intervals = interval_meters(&pricer, &fleet, crate::model::now_ms());
    let mut cursors: HashMap<String, Cursor> = ledger
        .cursors()?
        .into_iter()
        .filter(|c| c.channel == deduct_channel(&intervals, &c.meter_id))
        .map(|c| (c.meter_id.clone(), c))
        .collect();
    let mut stats = RunStats::default();
    let mut meter_spend: crate::store::scan::FxMap<String, Decimal> = Default::default();
    let mut last_message = Instant::now();
    let mut pending: Vec<Publish> = Vec::new();
    let mut batch_started = Instant::now();
    let stop = opts.stop.clone().unwrap_or_default();
    loop {
        let wait = Duration::from_millis(cfg.batch.max_wait_ms.max(1));
        match conn.recv_timeout(wait) {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                if pending.is_empty() {
                    batch_started = Instant::now();
                }
                pending.push(p);
                last_message = Instant::now();
            }
            Ok(Ok(Event::Incoming(Packet::SubAck(s)))) => {
                tracing::info!("stream: subscription confirmed {:?}", s.return_codes)
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!("mqtt connection: {e}; reconnecting");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(_) => {}
        }
        let full = pending.len() >= cfg.batch.max_messages.max(1);
        let due = !pending.is_empty() && batch_started.elapsed() >= wait;
        if full || due {
            process(
                &mut pending,
                ledger.as_mut(),
                &pricer,
                &fleet,
                &mut hook,
                &mut decoder,
                lake.as_mut(),
                &mut cursors,
                &mut meter_spend,
                &Routing {
                    tou: &tou,
                    intervals: &intervals,
                },
                &mut stats,
            )?;
            // Acknowledge only now: the ledger transaction has committed.
            for p in pending.drain(..) {
                client
                    .ack(&p)
                    .map_err(|e| PrepayError::Mqtt(e.to_string()))?;
            }
            alerts_due = true;
            if let Some(r) = relay
                .as_ref()
                .filter(|_| stats.relay_orders > relay_orders_seen)
            {
                dispatch(ledger.as_mut(), r)?;
                relay_orders_seen = stats.relay_orders;
            }
        }
        // After a commit, and while a sink that failed is due for a retry.
        if (alerts_due || retry_sinks_at.is_some())
            && retry_sinks_at.is_none_or(|t| Instant::now() >= t)
        {
            alerts_due = false;
            retry_sinks_at = after_delivery(&deliver(ledger.as_mut(), &sinks, &mut publish)?);
        }
        let done = opts
            .stop_after_deductions
            .is_some_and(|n| stats.deductions >= n)
            || opts
                .idle_exit
                .is_some_and(|d| pending.is_empty() && last_message.elapsed() >= d)
            || stop.load(Ordering::Relaxed);
        if done && pending.is_empty() {
            // Let the acks leave before disconnecting.
            let until = Instant::now() + Duration::from_millis(300);
            while Instant::now() < until {
                let _ = conn.recv_timeout(Duration::from_millis(50));
            }
            let _ = client.disconnect();
            if let Some(l) = lake.as_mut() {
                l.flush()?;
            }
            return Ok(stats);
        }
    }
}

/// How long alerts wait after a sink refused some.
const SINK_RETRY: Duration = Duration::from_secs(5);

/// When to deliver again after `d` if a sink failed: delivering after every
/// batch would stall the stream on a dead webhook's retries.
fn after_delivery(d: &DeliverStats) -> Option<Instant> {
    (d.undelivered > 0 || d.busy).then(|| Instant::now() + SINK_RETRY)
}

/// Which meters deduct from tariff registers T1..T4 and which from intervals.
struct Routing<'a> {
    tou: &'a HashSet<String>,
    intervals: &'a HashSet<String>,
}

#[allow(clippy::too_many_arguments)]
fn process(
    pending: &mut [Publish],
    ledger: &mut dyn Ledger,
    pricer: &dyn Pricer,
    fleet: &Fleet,
    hook: &mut PrepayHook<'_>,
    decoder: &mut crate::ingest::decode::Decoder,
    lake: Option<&mut crate::store::Lake>,
    cursors: &mut HashMap<String, Cursor>,
    meter_spend: &mut crate::store::scan::FxMap<String, Decimal>,
    routing: &Routing<'_>,
    stats: &mut RunStats,
) -> Result<(), PrepayError> {
    let (tou, intervals) = (routing.tou, routing.intervals);
    let now = crate::model::now_ms();
    let mut by_meter: HashMap<String, Vec<(i64, Decimal)>> = HashMap::new();
    let mut regs: HashMap<String, HashMap<i64, [Option<Decimal>; 4]>> = HashMap::new();
    let mut dead = Vec::new();
    let mut not_chargeable = 0;
    for p in pending.iter() {
        let topic = p.topic.to_string();
        match decoder.decode(&topic, &p.payload, now) {
            Ok(d) => {
                for r in d.readings {
                    if !fleet.meters.contains_key(&r.meter_id) {
                        continue;
                    }
                    if !chargeable(r.quality) {
                        not_chargeable += 1;
                        continue;
                    }
                    // Interval-priced meters deduct from intervals, the others from the total register.
                    let wanted = if intervals.contains(&r.meter_id) {
                        Channel::ImportActiveInterval
                    } else {
                        Channel::ImportActiveTotal
                    };
                    if r.channel == wanted {
                        by_meter
                            .entry(r.meter_id)
                            .or_default()
                            .push((r.ts_ms, r.value));
                    } else if let Some(i) = tariff_register(r.channel) {
                        // Kept for time-of-use accounts (a message carries a meter's whole snapshot).
                        if tou.contains(&r.meter_id) {
                            regs.entry(r.meter_id)
                                .or_default()
                                .entry(r.ts_ms)
                                .or_default()[i] = Some(r.value);
                        }
                    }
                }
                for e in d.problems {
                    dead.push((topic.clone(), e.to_string(), p.payload.to_vec()));
                }
            }
            Err(e) => dead.push((topic.clone(), e.to_string(), p.payload.to_vec())),
        }
    }
    stats.skipped_quality += not_chargeable;
    if !dead.is_empty() {
        stats.skipped_quality += dead.len();
        for (t, why, _) in &dead {
            tracing::warn!(topic = %t, "undecodable reading message: {why}");
        }
        if let Some(l) = lake {
            let recs: Vec<crate::store::QuarantineRecord> = dead
                .into_iter()
                .map(|(t, reason, payload)| crate::store::QuarantineRecord {
                    received_ms: now,
                    protocol: crate::model::Protocol::Mqtt,
                    collector: "prepay-stream".into(),
                    address: t,
                    reason,
                    payload,
                })
                .collect();
            // Durable before the ack, like every other input.
            l.quarantine(&recs)?;
        }
    }
    let mut meters: Vec<String> = by_meter.keys().cloned().collect();
    meters.sort();
    let by_meter: HashMap<String, Vec<RegisterReading>> = by_meter
        .into_iter()
        .map(|(m, mut r)| {
            r.sort_by_key(|x| x.0);
            r.dedup_by_key(|x| x.0);
            let joined = join_registers(r, regs.get(&m));
            (m, joined)
        })
        .collect();
    let mut attempt = 0;
    loop {
        let mut batch = Batch::default();
        let mut local = RunStats::default();
        for m in &meters {
            let before = cursors.get(m).cloned();
            batch.expect.push((
                m.clone(),
                deduct_channel(intervals, m).into(),
                before.as_ref().map(Cursor::stamp),
            ));
            let (entries, cur) = match fleet.meter_account(m) {
                Some((meter, account)) => deduct_meter(
                    pricer,
                    account,
                    meter,
                    before.clone(),
                    &by_meter[m],
                    intervals.contains(m),
                    "stream",
                    &mut local,
                ),
                None => (Vec::new(), before.clone()), // not a prepaid meter
            };
            if let Some(c) = cur.filter(|c| Some(c) != before.as_ref()) {
                batch.cursors.push(c);
            }
            batch.entries.extend(entries);
        }
        // The forecast uses the cursors this commit stores, and the stored
        // cursors of their accounts' other meters not yet seen here (held
        // in memory since the start; a stale commit reloads them).
        note_spend(
            pricer,
            fleet,
            meter_spend,
            &mut hook.daily_spend,
            &batch.cursors,
            &mut |m| Ok(cursors.get(m).cloned()),
        )?;
        let report = ledger.commit(&batch, hook)?;
        if report.stale {
            attempt += 1;
            stats.retries += 1;
            if attempt > 50 {
                return Err(PrepayError::Input(
                    "cursors keep moving under this stream".into(),
                ));
            }
            for m in &meters {
                match ledger.cursor(m, deduct_channel(intervals, m))? {
                    Some(c) => cursors.insert(m.clone(), c),
                    None => cursors.remove(m),
                };
            }
            continue;
        }
        stats.absorb(&local, &batch, &report);
        for c in batch.cursors {
            cursors.insert(c.meter_id.clone(), c);
        }
        return Ok(());
    }
}
