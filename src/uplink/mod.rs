//! Store-and-forward uplink: a collector's readings go to a central broker
//! over an unreliable link.
//!
//! `Uplink::send` writes the readings to the on-disk spool (fsynced) before
//! returning; a background task publishes spooled messages in order at QoS 1
//! (canonical JSON, or Sparkplug B: see [`sparkplug`]) and forgets an entry
//! only when the PUBACKs of all its messages arrived. While the link is down
//! the spool grows up to `cap_bytes` (an alarm is raised at `alarm_ratio` of
//! it, and `send` refuses beyond it); when the link returns it drains in
//! order. Every (re)connection starts a fresh MQTT session and re-publishes
//! everything not yet acknowledged, so delivery is at least once; the
//! central lake's compaction removes the duplicates.

pub mod sparkplug;
pub mod spool;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, LastWill, Outgoing, Packet, QoS};
use rust_decimal::Decimal;
use tokio::sync::Notify;

use crate::ingest::config::MqttConfig;
use crate::ingest::decode::encode_canonical;
use crate::ingest::mqtt::connect_options;
use crate::metrics;
use crate::model::{Channel, Protocol, Quality, Reading, Source};
pub use spool::{Spool, SpoolError};

/// What goes on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UplinkFormat {
    /// meterflow's canonical JSON, `per_message` readings per message, to `UplinkConfig::topic`.
    Canonical,
    /// Sparkplug B as edge node `edge` of `group`; each meter is a device.
    Sparkplug { group: String, edge: String },
}

#[derive(Debug, Clone)]
pub struct UplinkConfig {
    pub mqtt: MqttConfig,
    /// Directory relative TLS / password file paths resolve against.
    pub base_dir: PathBuf,
    pub format: UplinkFormat,
    /// Topic the readings are published to (canonical format).
    pub topic: String,
    /// `collector` written into the canonical JSON envelope.
    pub collector: String,
    pub spool_dir: PathBuf,
    /// `send` refuses new readings once this many payload bytes are unacknowledged.
    pub cap_bytes: u64,
    /// Raise the alarm (error log, `meterflow_uplink_spool_alarm` = 1) at this share of the cap.
    pub alarm_ratio: f64,
    /// Readings per spool entry (and per canonical message).
    pub per_message: usize,
    /// Messages published but not yet acknowledged, at most (a spool entry
    /// is started only below it).
    pub window: usize,
}

impl UplinkConfig {
    pub fn new(mqtt: MqttConfig, topic: &str, collector: &str, spool_dir: PathBuf) -> UplinkConfig {
        UplinkConfig {
            mqtt,
            base_dir: PathBuf::from("."),
            format: UplinkFormat::Canonical,
            topic: topic.to_string(),
            collector: collector.to_string(),
            spool_dir,
            cap_bytes: 512 << 20,
            alarm_ratio: 0.8,
            per_message: 500,
            window: 64,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("uplink config: {0}")]
    Config(String),
    #[error("meter id '{0}' cannot be a Sparkplug device id (empty, or has '/', '+' or '#')")]
    BadMeterId(String),
}

struct Shared {
    spool: Mutex<Spool>,
    wake: Notify,
    alarm: Mutex<bool>,
}

/// Handle the collector feeds readings into. Needs a tokio runtime.
pub struct Uplink {
    shared: Arc<Shared>,
    cfg: UplinkConfig,
    task: tokio::task::JoinHandle<()>,
}

impl Uplink {
    /// Opens the spool (keeping whatever a previous run left unacknowledged)
    /// and starts publishing in the background.
    pub fn start(cfg: UplinkConfig) -> Result<Uplink, UplinkError> {
        // Fail early on bad TLS files or URLs.
        connect_options(&cfg.mqtt, &cfg.base_dir, &cfg.mqtt.client_id)
            .map_err(|e| UplinkError::Config(e.to_string()))?;
        if let UplinkFormat::Sparkplug { group, edge } = &cfg.format {
            if !sparkplug::valid_id(group) || !sparkplug::valid_id(edge) {
                return Err(UplinkError::Config(format!(
                    "Sparkplug group '{group}' / edge node '{edge}' must be non-empty without '/', '+', '#'"
                )));
            }
        }
        let spool = Spool::open(&cfg.spool_dir)?;
        if spool.torn_bytes > 0 {
            tracing::warn!(
                bytes = spool.torn_bytes,
                "uplink spool had a torn tail (crash mid-write); cut off"
            );
        }
        if !spool.is_empty() {
            tracing::info!(
                entries = spool.len(),
                "uplink spool has unsent messages from a previous run"
            );
        }
        let shared = Arc::new(Shared {
            spool: Mutex::new(spool),
            wake: Notify::new(),
            alarm: Mutex::new(false),
        });
        metrics::describe(
            "meterflow_uplink_spool_bytes",
            "Payload bytes spooled and not yet acknowledged by the broker",
        );
        metrics::describe(
            "meterflow_uplink_spool_alarm",
            "1 while the uplink spool is above its alarm level",
        );
        let task = tokio::spawn(publisher(shared.clone(), cfg.clone()));
        let u = Uplink { shared, cfg, task };
        // A spool left near its cap by the last run (link still down)
        // raises the alarm now, not at the first append that fits.
        let bytes = lock(&u.shared.spool).bytes();
        u.check_alarm(bytes);
        Ok(u)
    }

    /// Spools readings durably (fsync; blocking: call from a blocking
    /// context in async code); they are published when the link allows.
    /// Refuses (SpoolError::Full) when the spool is at its cap: keep them elsewhere.
    pub fn send(&self, readings: Vec<Reading>) -> Result<(), UplinkError> {
        if readings.is_empty() {
            return Ok(());
        }
        let chunks = readings.chunks(self.cfg.per_message.max(1));
        let payloads: Vec<Vec<u8>> = match &self.cfg.format {
            UplinkFormat::Canonical => chunks
                .map(|c| encode_canonical(&self.cfg.collector, c))
                .collect(),
            UplinkFormat::Sparkplug { .. } => {
                if let Some(r) = readings.iter().find(|r| !sparkplug::valid_id(&r.meter_id)) {
                    metrics::counter_add(
                        "meterflow_uplink_refused_total",
                        &[],
                        readings.len() as u64,
                    );
                    return Err(UplinkError::BadMeterId(r.meter_id.clone()));
                }
                // Encoded at publish time (seq and aliases belong to the session).
                chunks.map(encode_entry).collect()
            }
        };
        let add: u64 = payloads.iter().map(|p| p.len() as u64).sum();
        let bytes = {
            let mut s = lock(&self.shared.spool);
            if s.bytes() + add > self.cfg.cap_bytes {
                metrics::counter_add("meterflow_uplink_refused_total", &[], readings.len() as u64);
                return Err(SpoolError::Full {
                    bytes: s.bytes(),
                    cap: self.cfg.cap_bytes,
                }
                .into());
            }
            s.append(&payloads)?;
            s.bytes()
        };
        self.check_alarm(bytes);
        self.shared.wake.notify_one();
        Ok(())
    }

    fn check_alarm(&self, bytes: u64) {
        let level = (self.cfg.cap_bytes as f64 * self.cfg.alarm_ratio) as u64;
        let mut alarm = lock(&self.shared.alarm);
        if bytes >= level && !*alarm {
            tracing::error!(
                bytes,
                cap = self.cfg.cap_bytes,
                "uplink spool above alarm level: link down?"
            );
            metrics::gauge_set("meterflow_uplink_spool_alarm", &[], 1.0);
            *alarm = true;
        }
        metrics::gauge_set("meterflow_uplink_spool_bytes", &[], bytes as f64);
    }

    /// True while the spool is above its alarm level.
    pub fn alarm(&self) -> bool {
        *lock(&self.shared.alarm)
    }

    /// Messages spooled and not yet acknowledged.
    pub fn pending(&self) -> usize {
        lock(&self.shared.spool).len()
    }

    /// Waits until everything is acknowledged or `timeout` passes; true if drained.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let t = Instant::now();
        while self.pending() > 0 {
            if t.elapsed() >= timeout {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    /// Stops publishing and saves the acknowledgement cursor. Unacknowledged
    /// messages stay spooled for the next start. The connection is dropped
    /// without DISCONNECT, so a Sparkplug uplink's NDEATH will is published.
    pub async fn shutdown(self) {
        self.task.abort();
        let _ = self.task.await;
        let _ = lock(&self.shared.spool).checkpoint();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A Sparkplug spool entry: the readings as a JSON array (values as exact
/// decimal strings).
fn encode_entry(readings: &[Reading]) -> Vec<u8> {
    serde_json::to_vec(readings).unwrap_or_default()
}

/// Readings of a spool entry: a JSON array of readings, or canonical JSON
/// (an entry spooled while the format was `canonical`).
fn decode_entry(payload: &[u8]) -> Result<Vec<Reading>, String> {
    if payload.first() == Some(&b'[') {
        return serde_json::from_slice(payload).map_err(|e| e.to_string());
    }
    #[derive(serde::Deserialize)]
    struct Env {
        collector: Option<String>,
        readings: Vec<One>,
    }
    #[derive(serde::Deserialize)]
    struct One {
        meter_id: String,
        ts: i64,
        channel: String,
        value: serde_json::Number,
        quality: Option<String>,
        address: Option<String>,
    }
    let env: Env = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    env.readings
        .into_iter()
        .map(|o| {
            let value = Decimal::from_str_exact(&o.value.to_string())
                .or_else(|_| Decimal::from_scientific(&o.value.to_string()))
                .map_err(|e| format!("value {}: {e}", o.value))?;
            let channel: Channel = o.channel.parse().map_err(|e| format!("{e}"))?;
            let quality = match o.quality {
                Some(q) => Quality::parse(&q)?,
                None => Quality::OK,
            };
            Ok(Reading {
                meter_id: o.meter_id,
                ts_ms: o.ts,
                channel,
                value,
                quality,
                source: Source {
                    protocol: Protocol::Mqtt,
                    collector: env.collector.as_deref().unwrap_or_default().into(),
                    address: o.address.unwrap_or_default().into(),
                },
                received_ms: o.ts,
            })
        })
        .collect()
}

/// One message queued for rumqttc, tagged with the spool entry it carries.
struct Out {
    topic: String,
    payload: Vec<u8>,
    entry: Option<u64>,
}

/// The Sparkplug `bdSeq` of the next connection, kept in the spool
/// directory so it advances across restarts too.
fn next_bd_seq(dir: &Path) -> u8 {
    let path = dir.join("bdseq");
    let cur: u8 = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if let Err(e) =
        crate::store::atomic::write_file_atomic(&path, cur.wrapping_add(1).to_string().as_bytes())
    {
        tracing::warn!(error = %e, "cannot save the Sparkplug bdSeq");
    }
    cur
}

/// Keeps an entry that cannot be decoded aside (so it neither wedges the
/// queue nor vanishes) and returns where.
fn reject_entry(dir: &Path, seq: u64, payload: &[u8]) -> PathBuf {
    let path = dir.join(format!("rejected-{seq:020}.bin"));
    if let Err(e) = crate::store::atomic::write_file_atomic(&path, payload) {
        tracing::error!(error = %e, "cannot keep a rejected uplink entry");
    }
    path
}

/// Connects, publishes the spool in order within the window, maps PUBACKs
/// back to spool entries, answers Sparkplug rebirth commands, and starts
/// over with a fresh session after any error.
async fn publisher(shared: Arc<Shared>, cfg: UplinkConfig) {
    let mut backoff = Duration::from_millis(100);
    let now = || crate::model::now_ms().max(0) as u64;
    loop {
        let mut opts = match connect_options(&cfg.mqtt, &cfg.base_dir, &cfg.mqtt.client_id) {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "uplink cannot build its connection");
                return;
            }
        };
        opts.set_clean_session(true);
        opts.set_inflight(cfg.window.clamp(1, u16::MAX as usize) as u16);
        let mut node = match &cfg.format {
            UplinkFormat::Canonical => None,
            UplinkFormat::Sparkplug { group, edge } => {
                let n = sparkplug::EdgeNode::new(group, edge, next_bd_seq(&cfg.spool_dir));
                let d = n.death(now());
                opts.set_last_will(LastWill::new(d.topic, d.payload, QoS::AtLeastOnce, false));
                Some(n)
            }
        };
        let ncmd = node.as_ref().map(|n| n.ncmd_topic());
        let (client, mut ev) = AsyncClient::new(opts, cfg.window + 16);
        // `poll` runs in a task of its own, never dropped mid-write by the
        // select below (rumqttc does not promise it is cancel safe: a
        // PUBLISH cut off mid-write would wait for a PUBACK that never comes).
        let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
        // Aborted with this task too (shutdown drops the connection, without
        // DISCONNECT, so a Sparkplug NDEATH will goes out).
        let poller = AbortOnDrop(tokio::spawn(async move {
            loop {
                let e = ev.poll().await;
                let last = e.is_err();
                if events_tx.send(e).is_err() || last {
                    return;
                }
            }
        }));
        let mut connected = false;
        // Encoded, in order, not yet handed to rumqttc ...
        let mut outq: VecDeque<Out> = VecDeque::new();
        // ... handed over, waiting for their packet id ...
        let mut awaiting_pkid: VecDeque<Option<u64>> = VecDeque::new();
        // ... and packet id -> entry once sent.
        let mut by_pkid: HashMap<u16, Option<u64>> = HashMap::new();
        // Entry -> its messages not yet acknowledged.
        let mut remaining: HashMap<u64, usize> = HashMap::new();
        let mut next: u64 = 0;
        let mut last_checkpoint = Instant::now();
        let err = loop {
            let mut acked: Vec<u64> = Vec::new();
            let event = tokio::select! {
                e = events.recv() => Some(e),
                _ = shared.wake.notified() => None,
            };
            if let Some(e) = event {
                let Some(e) = e else {
                    break rumqttc::ConnectionError::Io(std::io::Error::other(
                        "the MQTT event loop stopped",
                    ));
                };
                match e {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        connected = true;
                        backoff = Duration::from_millis(100);
                        next = lock(&shared.spool).first_unacked();
                        if let (Some(n), Some(t)) = (node.as_mut(), &ncmd) {
                            if let Err(e) = client.try_subscribe(t.clone(), QoS::AtLeastOnce) {
                                tracing::warn!(error = %e, "uplink cannot subscribe to its NCMD topic");
                            }
                            outq.extend(n.births(now()).into_iter().map(|m| Out {
                                topic: m.topic,
                                payload: m.payload,
                                entry: None,
                            }));
                        }
                        tracing::info!(
                            pending = lock(&shared.spool).len(),
                            "uplink connected; draining spool"
                        );
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        if let Some(tag) = awaiting_pkid.pop_front() {
                            by_pkid.insert(pkid, tag);
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(a))) => {
                        if let Some(Some(seq)) = by_pkid.remove(&a.pkid) {
                            if let Some(r) = remaining.get_mut(&seq) {
                                *r = r.saturating_sub(1);
                                if *r == 0 {
                                    remaining.remove(&seq);
                                    acked.push(seq);
                                }
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let (Some(n), Some(t)) = (node.as_mut(), &ncmd) {
                            if connected
                                && &p.topic == t
                                && sparkplug::is_rebirth_request(&p.payload)
                            {
                                tracing::info!("Sparkplug rebirth requested; publishing births");
                                metrics::counter_add("meterflow_uplink_rebirths_total", &[], 1);
                                outq.extend(n.births(now()).into_iter().map(|m| Out {
                                    topic: m.topic,
                                    payload: m.payload,
                                    entry: None,
                                }));
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => break e,
                }
            }
            if !acked.is_empty() {
                let mut s = lock(&shared.spool);
                for seq in acked {
                    s.ack(seq);
                    metrics::counter_add("meterflow_uplink_acked_total", &[], 1);
                }
                if s.is_empty() || last_checkpoint.elapsed() > Duration::from_millis(200) {
                    if let Err(e) = s.checkpoint() {
                        tracing::error!(error = %e, "uplink spool checkpoint failed");
                    }
                    last_checkpoint = Instant::now();
                    metrics::gauge_set("meterflow_uplink_spool_bytes", &[], s.bytes() as f64);
                    let level = (cfg.cap_bytes as f64 * cfg.alarm_ratio) as u64;
                    let mut alarm = lock(&shared.alarm);
                    if *alarm && s.bytes() < level {
                        *alarm = false;
                        metrics::gauge_set("meterflow_uplink_spool_alarm", &[], 0.0);
                        tracing::info!("uplink spool back below alarm level");
                    }
                }
            }
            if !connected {
                continue;
            }
            // Encode further entries while the window has room.
            loop {
                if outq.len() + awaiting_pkid.len() + by_pkid.len() >= cfg.window.max(1) {
                    break;
                }
                let entry = {
                    let s = lock(&shared.spool);
                    let e = s.unacked_from(next).next().cloned();
                    e
                };
                let Some(e) = entry else { break };
                next = e.seq + 1;
                let msgs: Vec<Out> = match (&mut node, e.payload.first()) {
                    (None, Some(b'{')) => vec![Out {
                        topic: cfg.topic.clone(),
                        payload: e.payload.clone(),
                        entry: Some(e.seq),
                    }],
                    (None, _) => match decode_entry(&e.payload) {
                        Ok(rs) => vec![Out {
                            topic: cfg.topic.clone(),
                            payload: encode_canonical(&cfg.collector, &rs),
                            entry: Some(e.seq),
                        }],
                        Err(m) => {
                            reject(&shared, &cfg, e.seq, &e.payload, &m);
                            continue;
                        }
                    },
                    (Some(n), _) => match decode_entry(&e.payload) {
                        Ok(rs) if rs.iter().all(|r| sparkplug::valid_id(&r.meter_id)) => n
                            .data(&rs, now())
                            .into_iter()
                            .map(|m| Out {
                                topic: m.topic,
                                payload: m.payload,
                                entry: m.data.then_some(e.seq),
                            })
                            .collect(),
                        Ok(_) => {
                            reject(
                                &shared,
                                &cfg,
                                e.seq,
                                &e.payload,
                                "meter id not usable as a Sparkplug device id",
                            );
                            continue;
                        }
                        Err(m) => {
                            reject(&shared, &cfg, e.seq, &e.payload, &m);
                            continue;
                        }
                    },
                };
                let data = msgs.iter().filter(|m| m.entry.is_some()).count();
                if data == 0 {
                    lock(&shared.spool).ack(e.seq);
                } else {
                    remaining.insert(e.seq, data);
                }
                outq.extend(msgs);
            }
            // Hand queued messages to rumqttc as far as its channel takes them.
            while let Some(m) = outq.front() {
                if client
                    .try_publish(m.topic.clone(), QoS::AtLeastOnce, false, m.payload.clone())
                    .is_err()
                {
                    break;
                }
                if let Some(m) = outq.pop_front() {
                    awaiting_pkid.push_back(m.entry);
                }
            }
        };
        drop(poller);
        metrics::counter_add("meterflow_uplink_reconnects_total", &[], 1);
        tracing::warn!(error = %err, retry_in_ms = backoff.as_millis() as u64, pending = lock(&shared.spool).len(), "uplink link down; spooling and retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An entry that cannot be published: kept aside in a file, then acknowledged.
fn reject(shared: &Shared, cfg: &UplinkConfig, seq: u64, payload: &[u8], why: &str) {
    let kept = reject_entry(&cfg.spool_dir, seq, payload);
    tracing::error!(seq, reason = why, kept = %kept.display(), "uplink entry cannot be published; kept aside");
    metrics::counter_add("meterflow_uplink_rejected_total", &[], 1);
    lock(&shared.spool).ack(seq);
}
