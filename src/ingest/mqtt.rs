//! The ingest event loop: subscribe, decode, make durable, then acknowledge.
//!
//! The connection task (`session`) keeps the broker connection up
//! (reconnecting with backoff) and forwards publishes; the decode task turns
//! them into readings; the spool thread makes them durable (fsynced spool)
//! and only then hands their PUBACKs back to the connection. A crash before
//! the acks means the broker redelivers: duplicates are possible (the lake's
//! compaction removes them), loss is not. A redelivered copy of a message
//! whose readings were stamped with the receive time gets the same time
//! (receive stamps, see `batch`), so its rows are exact duplicates too.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, Transport};
use tokio::sync::mpsc;

use super::batch::{Decoding, Durable, Job};
use super::config::{IngestConfig, MqttConfig};
use super::decode::{encode_canonical, Decoder, Limits};
use super::park::ParkDir;
use super::session::{self, Outgoing, SessionConfig};
use crate::metrics;
use crate::model::{now_ms, Reading};
use crate::store::{FlushStats, Lake, LakeOptions, Sealed, StoreError};

/// Largest packet rumqttc accepts (MQTT's own maximum): bigger limits are ours
/// to enforce with a dead letter, not rumqttc's to enforce with a disconnect
/// that would make the broker redeliver the same packet forever.
const MAX_PACKET: usize = 268_435_455;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("lake: {0}")]
    Store(#[from] StoreError),
    #[error("config: {0}")]
    Config(String),
    #[error("mqtt client: {0}")]
    Client(String),
}

/// What `run_ingest` needs besides the config.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    pub config: IngestConfig,
    pub lake: PathBuf,
    /// Subscribe through `$share/<group>/<filter>` so several processes split the stream.
    pub shared_group: Option<String>,
    /// Lake writer id (default: the MQTT client id).
    pub writer_id: Option<String>,
    /// Notified each time the broker confirms the subscriptions (tests, demo).
    pub subscribed: Option<Arc<tokio::sync::Notify>>,
    /// Stop (after committing) once this many readings were decoded (benchmarks).
    pub stop_after_readings: Option<u64>,
}

/// Counters of one run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IngestStats {
    pub messages: u64,
    pub readings: u64,
    pub dead_letters: u64,
    /// Sparkplug messages parked to wait for a birth.
    pub parked: u64,
    pub committed: u64,
    /// Milliseconds from the first message to the final commit.
    pub busy_ms: u64,
}

/// Parses `mqtt://host[:port]` / `mqtts://host[:port]` into (tls, host, port).
pub fn parse_url(url: &str) -> Result<(bool, String, u16), String> {
    let (tls, rest) = if let Some(r) = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
    {
        (false, r)
    } else if let Some(r) = url
        .strip_prefix("mqtts://")
        .or_else(|| url.strip_prefix("ssl://"))
    {
        (true, r)
    } else {
        return Err(format!(
            "'{url}' is not mqtt://host:port or mqtts://host:port"
        ));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("bad port in '{url}'"))?,
        ),
        None => (rest, if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() {
        return Err(format!("no host in '{url}'"));
    }
    Ok((tls, host.to_string(), port))
}

/// Broker address, keepalive, credentials (password from file or
/// environment) and TLS (rustls, ring) from an `[mqtt]` table: ingest's
/// connection settings, and through `connect_options` rumqttc's.
/// Relative file paths resolve against `base_dir`.
pub fn session_config(
    m: &MqttConfig,
    base_dir: &std::path::Path,
    client_id: &str,
    filters: Vec<String>,
) -> Result<SessionConfig, IngestError> {
    let (tls, host, port) = parse_url(&m.url).map_err(IngestError::Config)?;
    let login = match &m.username {
        Some(user) => {
            let pw = m.password(base_dir).map_err(|e| {
                let key = match m.password_file {
                    Some(_) => "password_file",
                    None => "password_env",
                };
                IngestError::Config(format!("mqtt.{key}: {e}"))
            })?;
            Some((user.clone(), pw.unwrap_or_default()))
        }
        None => None,
    };
    let tls = if tls {
        Some(Arc::new(tls_config(m, base_dir)?))
    } else {
        None
    };
    Ok(SessionConfig {
        host,
        port,
        tls,
        client_id: client_id.to_string(),
        keepalive: Duration::from_secs(m.keepalive_secs.max(5)),
        login,
        filters,
        max_packet: MAX_PACKET,
    })
}

/// rumqttc options (uplink, helpers) with the settings of `session_config`.
pub fn connect_options(
    m: &MqttConfig,
    base_dir: &std::path::Path,
    client_id: &str,
) -> Result<MqttOptions, IngestError> {
    let s = session_config(m, base_dir, client_id, Vec::new())?;
    let mut o = MqttOptions::new(client_id, s.host, s.port);
    o.set_keep_alive(s.keepalive);
    o.set_max_packet_size(s.max_packet, s.max_packet);
    o.set_request_channel_capacity(4096);
    o.set_inflight(200);
    if let Some((user, pw)) = s.login {
        o.set_credentials(user, pw);
    }
    if let Some(tls) = s.tls {
        o.set_transport(Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
    }
    Ok(o)
}

/// rustls client config (ring provider) with the configured CA and client cert.
pub fn tls_config(
    m: &MqttConfig,
    base_dir: &std::path::Path,
) -> Result<rustls::ClientConfig, IngestError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let err = |what: &str, p: &std::path::Path, e: &dyn std::fmt::Display| {
        IngestError::Config(format!("{what} {}: {e}", p.display()))
    };
    let resolve = |p: &std::path::Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base_dir.join(p)
        }
    };
    let mut roots = rustls::RootCertStore::empty();
    let Some(ca) = &m.ca_file else {
        return Err(IngestError::Config("mqtts:// needs mqtt.ca_file".into()));
    };
    let ca = resolve(ca);
    for c in CertificateDer::pem_file_iter(&ca).map_err(|e| err("ca_file", &ca, &e))? {
        let c = c.map_err(|e| err("ca_file", &ca, &e))?;
        roots.add(c).map_err(|e| err("ca_file", &ca, &e))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| IngestError::Config(e.to_string()))?
        .with_root_certificates(roots);
    match (&m.client_cert_file, &m.client_key_file) {
        (Some(cert), Some(key)) => {
            let (cert, key) = (resolve(cert), resolve(key));
            let certs = CertificateDer::pem_file_iter(&cert)
                .map_err(|e| err("client_cert_file", &cert, &e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| err("client_cert_file", &cert, &e))?;
            let key =
                PrivateKeyDer::from_pem_file(&key).map_err(|e| err("client_key_file", &key, &e))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| IngestError::Config(format!("client certificate: {e}")))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// MQTT topic filter match (`+` one level, `#` the rest).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return !topic.starts_with('$'),
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Most messages decoded into one spool job.
const MAX_BATCH: usize = 4096;
/// Decoded jobs waiting for the spool thread; beyond this decoding waits.
const JOBS_QUEUED: usize = 4;

/// Runs until `shutdown` resolves (then commits the spool) or the lake fails.
///
/// Pipeline: the connection task reads publishes; this task decodes them in
/// batches; the spool thread makes every job queued meanwhile durable with one
/// write and one fsync (group commit) and only then hands its PUBACKs to the
/// connection, which sends them in one write; Parquet commits of sealed spool segments run on their own thread
/// while the next segment fills.
pub async fn run_ingest(
    opts: IngestOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<IngestStats, IngestError> {
    let cfg = &opts.config;
    let client_id = cfg.mqtt.client_id.clone();
    let known = cfg
        .known_meters()
        .map_err(IngestError::Config)?
        .map(Arc::new);
    let limits = Limits {
        max_payload_bytes: cfg.ingest.max_payload_bytes,
        max_future_ms: cfg.ingest.max_future_secs.saturating_mul(1000),
        known_meters: known,
        collector: cfg.ingest.collector.clone(),
    };
    let mut decoders = Vec::new();
    for s in &cfg.sources {
        decoders.push(Decoder::new(s, limits.clone()).map_err(IngestError::Config)?);
    }
    let writer = opts
        .writer_id
        .clone()
        .unwrap_or_else(|| sanitize(&client_id));
    let lake = Lake::open(
        &opts.lake,
        LakeOptions {
            stamp_window: cfg.ingest.redelivery_window,
            ..LakeOptions::new(writer)
        },
    )?;
    let (park, parked, unreadable) = ParkDir::open(&lake.spool_dir().join("parked"))?;
    let mut decoding = Decoding::new(
        decoders,
        cfg.ingest.sparkplug_park_secs,
        cfg.ingest.sparkplug_park_max,
        cfg.ingest.redelivery_window,
    );
    // Stamps of messages made durable before (this run or an earlier one):
    // a redelivered copy gets its first receive time.
    decoding.remember(lake.stamps().live());
    let restored = decoding.restore(parked, unreadable, now_ms());
    let filters: Vec<String> = cfg
        .sources
        .iter()
        .map(|s| match &opts.shared_group {
            Some(g) => format!("$share/{g}/{}", s.filter),
            None => s.filter.clone(),
        })
        .collect();

    let session = session_config(&cfg.mqtt, &cfg.base_dir, &client_id, filters)?;
    // Unbounded, yet bounded in practice: the broker sends at most its
    // inflight window of unacknowledged QoS 1 messages.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (out_tx, out_rx) = mpsc::unbounded_channel::<Outgoing>();
    let conn = tokio::spawn(session::run(session, tx, out_rx, opts.subscribed.clone()));
    describe_metrics();

    let (job_tx, job_rx) = mpsc::channel::<Job>(JOBS_QUEUED);
    let durable_tx = out_tx.clone();
    let flush = FlushPolicy {
        every: Duration::from_secs(cfg.ingest.flush_secs.max(1)),
        readings: cfg.ingest.flush_readings.max(1),
    };
    let handle = tokio::runtime::Handle::current();
    let spool = std::thread::Builder::new()
        .name("mqtt-spool".into())
        .spawn(move || spool_thread(lake, park, job_rx, durable_tx, flush, handle))
        .map_err(|e| IngestError::Client(format!("spool thread: {e}")))?;

    let mut stats = IngestStats::default();
    let mut first_message: Option<Instant> = None;
    if !restored.is_empty() && job_tx.send(restored).await.is_err() {
        tracing::error!("the spool thread stopped before the first job");
    }
    tokio::pin!(shutdown);
    loop {
        // While messages are parked, wake up now and then to expire them.
        let tick = if decoding.parked() > 0 {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(3600)
        };
        let first = tokio::select! {
            m = rx.recv() => m,
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(tick) => {
                let mut job = Job::default();
                decoding.expire(now_ms(), &mut job);
                if !job.is_empty() && job_tx.send(job).await.is_err() {
                    break;
                }
                continue;
            }
        };
        let Some(first) = first else { break };
        first_message.get_or_insert_with(Instant::now);
        let mut batch = Vec::with_capacity(64);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let job = decoding.batch(batch, now_ms(), &mut stats);
        if job_tx.send(job).await.is_err() {
            break; // the spool thread failed: its error is returned below
        }
        if opts
            .stop_after_readings
            .is_some_and(|n| stats.readings >= n)
        {
            break;
        }
    }
    // Everything acked is already durable in the spool; the spool thread
    // commits it now, which just saves the next start a replay.
    drop(job_tx);
    let spooled = tokio::task::spawn_blocking(move || spool.join())
        .await
        .map_err(|e| IngestError::Client(e.to_string()))?
        .unwrap_or_else(|_| Err(IngestError::Client("spool thread panicked".into())));
    let busy = first_message.map(|t| t.elapsed());
    // The last PUBACKs are queued before the DISCONNECT.
    let _ = out_tx.send(Outgoing::Disconnect);
    let stop_conn = conn.abort_handle();
    let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
    stop_conn.abort();
    stats.committed = spooled?;
    stats.busy_ms = busy.map(|d| d.as_millis() as u64).unwrap_or(0);
    tracing::info!(
        messages = stats.messages,
        readings = stats.readings,
        dead_letters = stats.dead_letters,
        "mqtt ingest stopped"
    );
    Ok(stats)
}

#[derive(Debug, Clone, Copy)]
struct FlushPolicy {
    every: Duration,
    readings: usize,
}

/// Owns the lake: appends every job queued meanwhile with one fsync, then
/// releases their acks; seals the segment for a Parquet commit on another
/// thread (one at a time, in order) by size or age. Returns readings committed.
fn spool_thread(
    mut lake: Lake,
    park: ParkDir,
    mut jobs: mpsc::Receiver<Job>,
    durable: mpsc::UnboundedSender<Outgoing>,
    flush: FlushPolicy,
    rt: tokio::runtime::Handle,
) -> Result<u64, IngestError> {
    let mut committer = Committer::default();
    let mut last_seal = Instant::now();
    let mut open = true;
    while open {
        let wait = flush.every.saturating_sub(last_seal.elapsed());
        let first = match rt.block_on(async { tokio::time::timeout(wait, jobs.recv()).await }) {
            Ok(Some(job)) => Some(job),
            Ok(None) => {
                open = false;
                None
            }
            Err(_) => None,
        };
        if let Some(mut job) = first {
            // Group commit: everything decoded while the last fsync ran.
            while let Ok(more) = jobs.try_recv() {
                job.extend(more);
            }
            // Parked messages are durable before their acks; a released one
            // is forgotten only after its readings or dead letter are durable.
            park.write(&job.park)?;
            lake.accept_stamped(job.readings, job.dead, job.stamps)?;
            park.remove(&job.release)?;
            // Durable: now (and only now) the broker may forget these messages.
            release(&durable, job.durable);
        }
        if lake.pending() >= flush.readings
            || (lake.pending() > 0 && last_seal.elapsed() >= flush.every)
        {
            if let Some(sealed) = lake.seal()? {
                committer.start(sealed)?;
            }
            last_seal = Instant::now();
        } else if lake.pending() == 0 {
            last_seal = Instant::now();
        }
    }
    if let Some(sealed) = lake.seal()? {
        committer.start(sealed)?;
    }
    committer.finish()
}

/// At most one Parquet commit in flight, on its own thread.
#[derive(Default)]
struct Committer {
    running: Option<std::thread::JoinHandle<Result<FlushStats, StoreError>>>,
    committed: u64,
}

impl Committer {
    /// Waits for the previous commit (segments commit in order), then starts this one.
    fn start(&mut self, sealed: Sealed) -> Result<(), IngestError> {
        self.wait()?;
        let h = std::thread::Builder::new()
            .name("mqtt-commit".into())
            .spawn(move || {
                let t = Instant::now();
                let r = sealed.commit();
                metrics::histogram_observe(
                    "meterflow_mqtt_flush_seconds",
                    &[],
                    t.elapsed().as_secs_f64(),
                );
                r
            })
            .map_err(|e| IngestError::Client(format!("commit thread: {e}")))?;
        self.running = Some(h);
        Ok(())
    }

    fn wait(&mut self) -> Result<(), IngestError> {
        if let Some(h) = self.running.take() {
            let s = h
                .join()
                .map_err(|_| IngestError::Client("commit thread panicked".into()))??;
            self.committed += s.readings as u64;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<u64, IngestError> {
        self.wait()?;
        Ok(self.committed)
    }
}

/// Hands the PUBACKs (and Sparkplug rebirth requests) of a durable job to
/// the connection, in order. A closed connection means shutdown: whatever
/// is not acknowledged is redelivered to the next run.
fn release(out: &mpsc::UnboundedSender<Outgoing>, d: Durable) {
    for (conn, publishes) in d.acks {
        let _ = out.send(Outgoing::Acks { conn, publishes });
    }
    let mut asked = HashSet::new();
    for (topic, payload) in d.rebirths {
        if asked.insert(topic.clone()) {
            tracing::info!(%topic, "sparkplug seq gap or unknown alias: requesting rebirth");
            metrics::counter_add("meterflow_mqtt_rebirth_requests_total", &[], 1);
            let _ = out.send(Outgoing::Publish { topic, payload });
        }
    }
}

fn describe_metrics() {
    metrics::describe(
        "meterflow_mqtt_messages_total",
        "MQTT messages received by ingest",
    );
    metrics::describe(
        "meterflow_mqtt_readings_total",
        "Readings decoded from MQTT messages",
    );
    metrics::describe(
        "meterflow_mqtt_dead_letters_total",
        "Messages (or parts) dead-lettered, by reason",
    );
    metrics::describe("meterflow_mqtt_reconnects_total", "Lost MQTT connections");
    metrics::describe(
        "meterflow_mqtt_rebirth_requests_total",
        "Sparkplug rebirth requests sent",
    );
    metrics::describe(
        "meterflow_mqtt_connected",
        "1 while connected to the broker",
    );
    metrics::describe(
        "meterflow_mqtt_sparkplug_parked_total",
        "Sparkplug messages parked until a birth declares their aliases",
    );
    metrics::describe(
        "meterflow_mqtt_sparkplug_parked",
        "Sparkplug messages waiting for a birth now",
    );
    metrics::describe(
        "meterflow_mqtt_redeliveries_restamped_total",
        "Redelivered messages given the receive time of their first, durable copy",
    );
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// True if something accepts TCP connections at the broker address of `url`.
pub async fn broker_reachable(url: &str) -> bool {
    let Ok((_, host, port)) = parse_url(url) else {
        return false;
    };
    matches!(
        tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect((host.as_str(), port))
        )
        .await,
        Ok(Ok(_))
    )
}

/// Publishes readings as canonical JSON at QoS 1, `per_message` readings per
/// message, to a plain `mqtt://` broker (see [`publish_canonical_with`] for TLS).
pub async fn publish_canonical(
    url: &str,
    client_id: &str,
    topic: &str,
    collector: &str,
    readings: &[Reading],
    per_message: usize,
) -> Result<usize, IngestError> {
    let (tls, host, port) = parse_url(url).map_err(IngestError::Config)?;
    if tls {
        // Plain MQTT to a TLS port would fail obscurely: TLS needs its files.
        return Err(IngestError::Config(format!(
            "{url}: TLS needs a CA file; use publish_canonical_with and connect_options"
        )));
    }
    let mut o = MqttOptions::new(client_id, host, port);
    o.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    publish_canonical_with(o, topic, collector, readings, per_message).await
}

/// [`publish_canonical`] over a connection set up by the caller (e.g.
/// [`connect_options`], which gives TLS for `mqtts://`).
pub async fn publish_canonical_with(
    mut o: MqttOptions,
    topic: &str,
    collector: &str,
    readings: &[Reading],
    per_message: usize,
) -> Result<usize, IngestError> {
    o.set_inflight(100);
    let (client, mut eventloop) = AsyncClient::new(o, 1024);
    let chunks: Vec<Vec<u8>> = readings
        .chunks(per_message.max(1))
        .map(|c| encode_canonical(collector, c))
        .collect();
    let n = chunks.len();
    let t = topic.to_string();
    let c2 = client.clone();
    let sender = tokio::spawn(async move {
        for payload in chunks {
            if c2
                .publish(t.clone(), QoS::AtLeastOnce, false, payload)
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut acked = 0;
    while acked < n {
        match tokio::time::timeout(Duration::from_secs(30), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(IngestError::Client(e.to_string())),
            Err(_) => return Err(IngestError::Client("timed out waiting for PUBACKs".into())),
        }
    }
    let _ = sender.await;
    let _ = client.disconnect().await;
    Ok(n)
}

/// Demo hook: publishes `readings` as canonical JSON to a broker at `url`,
/// ingests them into the lake at `lake` through a real subscription, commits
/// to Parquet and returns the run's counters. Fails if no broker answers.
pub async fn demo_publish_and_ingest(
    url: &str,
    lake: &std::path::Path,
    readings: &[Reading],
) -> Result<IngestStats, IngestError> {
    let tag = format!("{}-{}", std::process::id(), now_ms());
    let topic = format!("meterflow-demo/{tag}/readings");
    let text = format!(
        "[mqtt]\nurl = \"{url}\"\nclient_id = \"meterflow-demo-ingest-{tag}\"\n[ingest]\ncollector = \"demo-mqtt\"\nflush_secs = 1\n[[source]]\nname = \"demo\"\nfilter = \"meterflow-demo/{tag}/#\"\nformat = \"canonical\"\n"
    );
    let config = IngestConfig::parse(&text, std::path::Path::new("<demo>"))
        .map_err(|e| IngestError::Config(e.to_string()))?;
    let ready = Arc::new(tokio::sync::Notify::new());
    let opts = IngestOptions {
        config,
        lake: lake.to_path_buf(),
        shared_group: None,
        writer_id: Some(format!("demo-mqtt-{tag}")),
        subscribed: Some(ready.clone()),
        stop_after_readings: None,
    };
    let counted = || metrics::counter_value("meterflow_mqtt_readings_total", &[("source", "demo")]);
    let want = counted() + readings.len() as u64;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let ingest = tokio::spawn(run_ingest(opts, async move {
        let _ = stop_rx.await;
    }));
    // Publish only once subscribed (a new session has no queue yet).
    let _ = tokio::time::timeout(Duration::from_secs(10), ready.notified()).await;
    publish_canonical(
        url,
        &format!("meterflow-demo-pub-{tag}"),
        &topic,
        "demo-sim",
        readings,
        500,
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while counted() < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop_tx.send(());
    let stats = ingest
        .await
        .map_err(|e| IngestError::Client(e.to_string()))??;
    forget_session(url, &format!("meterflow-demo-ingest-{tag}")).await;
    Ok(stats)
}

/// Drops the broker's persistent session of `client_id` (connect with a clean
/// session, then disconnect), so one-off runs leave no queue behind.
pub async fn forget_session(url: &str, client_id: &str) {
    let Ok((_, host, port)) = parse_url(url) else {
        return;
    };
    let mut o = MqttOptions::new(client_id, host, port);
    o.set_clean_session(true);
    let (client, mut ev) = AsyncClient::new(o, 10);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.disconnect().await;
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_tls_host_and_default_ports() {
        assert_eq!(
            parse_url("mqtt://127.0.0.1").unwrap(),
            (false, "127.0.0.1".into(), 1883)
        );
        assert_eq!(
            parse_url("mqtts://broker:8884").unwrap(),
            (true, "broker".into(), 8884)
        );
        assert!(parse_url("http://x").is_err());
        assert!(parse_url("mqtt://:1883").is_err());
    }

    #[test]
    fn topic_filters_match_like_the_broker() {
        assert!(topic_matches("tele/+/SENSOR", "tele/m1/SENSOR"));
        assert!(!topic_matches("tele/+/SENSOR", "tele/m1/STATE"));
        assert!(topic_matches("spBv1.0/g/#", "spBv1.0/g/DDATA/e/d"));
        assert!(topic_matches("a/#", "a"));
        assert!(!topic_matches("#", "$SYS/x"));
        assert!(!topic_matches("a/+", "a/b/c"));
    }

    #[test]
    fn tls_needs_a_ca_file_and_reads_pem_files_relative_to_the_config() {
        let mut m = MqttConfig::new("mqtts://127.0.0.1:8883", "c");
        let e = connect_options(&m, std::path::Path::new("."), "c").unwrap_err();
        assert!(e.to_string().contains("ca_file"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), "not a certificate").unwrap();
        m.ca_file = Some("ca.pem".into());
        // An empty/garbage bundle is refused with the file named, not a panic.
        match tls_config(&m, dir.path()) {
            Ok(_) => {}
            Err(e) => assert!(e.to_string().contains("ca.pem"), "{e}"),
        }
        m.ca_file = Some("missing.pem".into());
        let e = tls_config(&m, dir.path()).unwrap_err();
        assert!(e.to_string().contains("missing.pem"), "{e}");
    }

    #[test]
    fn password_comes_from_a_file_or_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "s3cret\n").unwrap();
        let mut m = MqttConfig::new("mqtt://127.0.0.1", "c");
        m.password_file = Some("pw".into());
        assert_eq!(m.password(dir.path()).unwrap().as_deref(), Some("s3cret"));
        m.password_file = None;
        m.password_env = Some("METERFLOW_TEST_UNSET_PASSWORD_VAR".into());
        assert!(m.password(dir.path()).is_err());
    }
}
