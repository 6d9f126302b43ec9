//! Store-and-forward uplink: a collector's readings go to a central broker
//! over an unreliable link.
//!
//! `Uplink::send` writes the readings to the on-disk spool (fsynced) before
//! returning; a background task publishes spooled messages in order at QoS 1
//! as canonical JSON and forgets an entry only when its PUBACK arrives. While
//! the link is down the spool grows up to `cap_bytes` (an alarm is raised at
//! `alarm_ratio` of it, and `send` refuses beyond it); when the link returns
//! it drains in order. Every (re)connection starts a fresh MQTT session and
//! re-publishes everything not yet acknowledged, so delivery is at least
//! once; the central lake's compaction removes the duplicates.

pub mod spool;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS};
use tokio::sync::Notify;

use crate::ingest::config::MqttConfig;
use crate::ingest::decode::encode_canonical;
use crate::ingest::mqtt::connect_options;
use crate::metrics;
use crate::model::Reading;
pub use spool::{Spool, SpoolError};

#[derive(Debug, Clone)]
pub struct UplinkConfig {
    pub mqtt: MqttConfig,
    /// Directory relative TLS / password file paths resolve against.
    pub base_dir: PathBuf,
    /// Topic the readings are published to.
    pub topic: String,
    /// `collector` written into the canonical JSON envelope.
    pub collector: String,
    pub spool_dir: PathBuf,
    /// `send` refuses new readings once this many payload bytes are unacknowledged.
    pub cap_bytes: u64,
    /// Raise the alarm (error log, `meterflow_uplink_spool_alarm` = 1) at this share of the cap.
    pub alarm_ratio: f64,
    /// Readings per MQTT message.
    pub per_message: usize,
    /// Messages published but not yet acknowledged, at most.
    pub window: usize,
}

impl UplinkConfig {
    pub fn new(mqtt: MqttConfig, topic: &str, collector: &str, spool_dir: PathBuf) -> UplinkConfig {
        UplinkConfig {
            mqtt,
            base_dir: PathBuf::from("."),
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
        Ok(Uplink { shared, cfg, task })
    }

    /// Spools readings durably; they are published when the link allows.
    /// Refuses (SpoolError::Full) when the spool is at its cap: keep them elsewhere.
    pub fn send(&self, readings: Vec<Reading>) -> Result<(), UplinkError> {
        if readings.is_empty() {
            return Ok(());
        }
        let payloads: Vec<Vec<u8>> = readings
            .chunks(self.cfg.per_message.max(1))
            .map(|c| encode_canonical(&self.cfg.collector, c))
            .collect();
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
    /// messages stay spooled for the next start.
    pub async fn shutdown(self) {
        self.task.abort();
        let _ = self.task.await;
        let _ = lock(&self.shared.spool).checkpoint();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Connects, publishes the spool in order within the window, maps PUBACKs
/// back to spool seqs, and starts over with a fresh session after any error.
async fn publisher(shared: Arc<Shared>, cfg: UplinkConfig) {
    let mut backoff = Duration::from_millis(100);
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
        let (client, mut ev) = AsyncClient::new(opts, cfg.window * 2 + 16);
        let mut connected = false;
        // Seqs handed to rumqttc, waiting for their packet id ...
        let mut awaiting_pkid: VecDeque<u64> = VecDeque::new();
        // ... and packet id -> seq once sent.
        let mut by_pkid: HashMap<u16, u64> = HashMap::new();
        let mut next: u64 = 0;
        let mut last_checkpoint = Instant::now();
        let err = loop {
            tokio::select! {
                e = ev.poll() => match e {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        connected = true;
                        backoff = Duration::from_millis(100);
                        next = lock(&shared.spool).first_unacked();
                        tracing::info!(pending = lock(&shared.spool).len(), "uplink connected; draining spool");
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        if let Some(seq) = awaiting_pkid.pop_front() {
                            by_pkid.insert(pkid, seq);
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(a))) => {
                        if let Some(seq) = by_pkid.remove(&a.pkid) {
                            let mut s = lock(&shared.spool);
                            s.ack(seq);
                            metrics::counter_add("meterflow_uplink_acked_total", &[], 1);
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
                    }
                    Ok(_) => {}
                    Err(e) => break e,
                },
                _ = shared.wake.notified() => {}
            }
            if connected {
                let s = lock(&shared.spool);
                let room = cfg
                    .window
                    .saturating_sub(awaiting_pkid.len() + by_pkid.len());
                for e in s.unacked_from(next).take(room) {
                    if client
                        .try_publish(
                            cfg.topic.clone(),
                            QoS::AtLeastOnce,
                            false,
                            e.payload.clone(),
                        )
                        .is_err()
                    {
                        break;
                    }
                    awaiting_pkid.push_back(e.seq);
                    next = e.seq + 1;
                }
            }
        };
        metrics::counter_add("meterflow_uplink_reconnects_total", &[], 1);
        tracing::warn!(error = %err, retry_in_ms = backoff.as_millis() as u64, pending = lock(&shared.spool).len(), "uplink link down; spooling and retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}
