//! MQTT ingest and uplink against a real broker: Mosquitto at `MQTT_URL`
//! (or 127.0.0.1:1883), else an embedded rumqttd on a free loopback port.
//! Every test uses its own topic prefix and client ids, so tests can share
//! one broker and run in parallel.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use meterflow::ingest::config::IngestConfig;
use meterflow::ingest::decode::encode_canonical;
use meterflow::ingest::mqtt::{forget_session, parse_url, run_ingest, IngestOptions, IngestStats};
use meterflow::model::{Channel, Protocol, Quality, Reading, Source};
use meterflow::protocol::sparkplug::{self, datatype, Metric, MetricValue, Payload};
use meterflow::store::{compact, reader};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;

use super::common;

// ---------------------------------------------------------------- broker

/// The broker every test talks to. `MQTT_URL` set and unreachable is a failure.
pub fn broker_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("MQTT_URL") {
            assert!(
                answers(&url),
                "MQTT_URL={url} is set but no broker answers there"
            );
            return url;
        }
        let local = "mqtt://127.0.0.1:1883".to_string();
        if std::env::var_os("MQTT_EMBEDDED").is_none() && answers(&local) {
            return local;
        }
        start_embedded_broker()
    })
    .clone()
}

fn answers(url: &str) -> bool {
    let Ok((_, host, port)) = parse_url(url) else {
        return false;
    };
    let Ok(addr) = format!("{host}:{port}").parse::<SocketAddr>() else {
        return false;
    };
    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_embedded_broker() -> String {
    let port = free_port();
    let text = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 1000
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10
[v4.1]
name = "v4-1"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 16777216
max_inflight_count = 100
dynamic_filters = true
"#
    );
    let cfg: rumqttd::Config = toml::from_str(&text).expect("embedded broker config");
    std::thread::spawn(move || {
        let mut broker = rumqttd::Broker::new(cfg);
        let _ = broker.start();
    });
    let url = format!("mqtt://127.0.0.1:{port}");
    eprintln!("no broker at MQTT_URL or 127.0.0.1:1883: started an embedded rumqttd at {url}");
    let t = Instant::now();
    while !answers(&url) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "embedded broker did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    url
}

fn uniq(name: &str) -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "{name}-{}-{}-{}",
        std::process::id(),
        meterflow::model::now_ms(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

// ---------------------------------------------------------------- helpers

/// Publishes every (topic, payload) at QoS 1 and waits for all PUBACKs,
/// pausing `pause` after every `every` messages.
async fn publish_all(url: &str, msgs: Vec<(String, Vec<u8>)>, every: usize, pause: Duration) {
    let (_, host, port) = parse_url(url).unwrap();
    let mut o = MqttOptions::new(uniq("pub"), host, port);
    o.set_max_packet_size(1 << 24, 1 << 24);
    let (client, mut ev) = AsyncClient::new(o, 64);
    let n = msgs.len();
    let sender = tokio::spawn(async move {
        for (i, (t, p)) in msgs.into_iter().enumerate() {
            client.publish(t, QoS::AtLeastOnce, false, p).await.unwrap();
            if every > 0 && (i + 1) % every == 0 {
                tokio::time::sleep(pause).await;
            }
        }
        client
    });
    let mut acked = 0;
    while acked < n {
        match tokio::time::timeout(Duration::from_secs(30), ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("publisher lost its connection: {e}"),
            Err(_) => panic!("publisher timed out with {acked}/{n} acks"),
        }
    }
    let client = sender.await.unwrap();
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while ev.poll().await.is_ok() {}
    })
    .await;
}

fn config(url: &str, client_id: &str, sources: &str) -> IngestConfig {
    let text = format!(
        "[mqtt]\nurl = \"{url}\"\nclient_id = \"{client_id}\"\nkeepalive_secs = 5\n[ingest]\nflush_secs = 1\n{sources}"
    );
    IngestConfig::parse(&text, Path::new("test.toml")).unwrap()
}

struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Result<IngestStats, meterflow::ingest::mqtt::IngestError>>,
    client_id: String,
}

/// Starts ingest in this process and returns once the broker confirmed the subscription.
async fn start_ingest(cfg: IngestConfig, lake: &Path) -> Running {
    start_ingest_in(cfg, lake, None).await
}

async fn start_ingest_in(cfg: IngestConfig, lake: &Path, shared_group: Option<String>) -> Running {
    let ready = Arc::new(tokio::sync::Notify::new());
    let client_id = cfg.mqtt.client_id.clone();
    let opts = IngestOptions {
        config: cfg,
        lake: lake.to_path_buf(),
        shared_group,
        writer_id: None,
        subscribed: Some(ready.clone()),
        stop_after_readings: None,
    };
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(run_ingest(opts, async move {
        let _ = rx.await;
    }));
    tokio::time::timeout(Duration::from_secs(15), ready.notified())
        .await
        .expect("ingest did not subscribe");
    Running {
        stop,
        handle,
        client_id,
    }
}

impl Running {
    async fn stop(self, url: &str) -> IngestStats {
        let _ = self.stop.send(());
        let stats = self.handle.await.unwrap().expect("ingest failed");
        forget_session(url, &self.client_id).await;
        stats
    }
}

async fn wait_for_readings(lake: &Path, want: usize, secs: u64) -> Vec<Reading> {
    let t = Instant::now();
    loop {
        let rs = reader::read_all_readings(lake).unwrap_or_default();
        let distinct: BTreeSet<_> = rs.iter().map(key).collect();
        if distinct.len() >= want || t.elapsed() > Duration::from_secs(secs) {
            return rs;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn key(r: &Reading) -> (String, &'static str, i64) {
    (r.meter_id.clone(), r.channel.as_str(), r.ts_ms)
}

/// (address, reason) of every dead letter in the lake.
fn dead_letters(lake: &Path) -> Vec<(String, String)> {
    use arrow::array::{Array, StringArray};
    let mut out = Vec::new();
    for b in quarantine_batches(lake) {
        let addr = b.column_by_name("source_address").unwrap();
        let addr = addr.as_any().downcast_ref::<StringArray>().unwrap();
        let reason = b.column_by_name("reason").unwrap();
        let reason = reason.as_any().downcast_ref::<StringArray>().unwrap();
        for i in 0..b.num_rows() {
            out.push((addr.value(i).to_string(), reason.value(i).to_string()));
        }
    }
    out
}

fn now_ms() -> i64 {
    meterflow::model::now_ms()
}

fn sim(n: usize, meters: usize, start: i64) -> Vec<Reading> {
    (0..n)
        .map(|k| Reading {
            meter_id: format!("K{:04}", k % meters),
            ts_ms: start + (k / meters) as i64 * 60_000,
            channel: Channel::ImportActiveTotal,
            value: Decimal::new(100_000 + k as i64, 3),
            quality: Quality::OK,
            source: Source {
                protocol: Protocol::Sim,
                collector: "t".into(),
                address: "a".into(),
            },
            received_ms: start,
        })
        .collect()
}

fn canonical_messages(topic: &str, rs: &[Reading], per: usize) -> Vec<(String, Vec<u8>)> {
    rs.chunks(per)
        .map(|c| (topic.to_string(), encode_canonical("sub-1", c)))
        .collect()
}

// ---------------------------------------------------------------- formats

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_payload_format_lands_in_the_lake_and_bad_ones_are_dead_lettered() {
    let url = broker_url();
    let p = uniq("fmt");
    let lake = tempfile::tempdir().unwrap();
    let sources = format!(
        r#"
[[source]]
name = "canonical"
filter = "{p}/canonical/#"
format = "canonical"

[[source]]
name = "gateway"
filter = "{p}/gw/+"
format = "values"
channels = {{ "EP" = "import_active_total", "P" = {{ channel = "active_power_total", unit = "W" }} }}
meters = {{ "line1/node7" = "GW7" }}

[[source]]
name = "tasmota"
filter = "{p}/tele/+/SENSOR"
format = "tasmota"

[[source]]
name = "shelly"
filter = "{p}/shelly/+/events/rpc"
format = "shelly"

[[source]]
name = "mapped"
filter = "{p}/custom/+"
format = "json_map"
channels = {{ "e" = {{ channel = "import_active_total", unit = "Wh" }} }}
[source.map]
meter_id = "topic:2"
ts = "/time"
values = {{ "e" = "/data/energy" }}
"#
    );
    let cfg = config(&url, &uniq("ingest-fmt"), &sources);
    let run = start_ingest(cfg, lake.path()).await;
    let ts = now_ms() - 60_000;
    let secs = ts / 1000;
    let msgs: Vec<(String, Vec<u8>)> = vec![
        (
            format!("{p}/canonical/a"),
            format!(r#"{{"meter_id":"C1","ts":{ts},"channel":"import_active_total","value":123456.7891}}"#).into_bytes(),
        ),
        (
            format!("{p}/gw/x"),
            format!(r#"{{"timestamp":{ts},"node":"node7","group":"line1","values":{{"EP":42.5,"P":1500}},"errors":{{}}}}"#)
                .into_bytes(),
        ),
        (
            format!("{p}/tele/plug9/SENSOR"),
            format!(
                r#"{{"Time":"{}","ENERGY":{{"Total":7.125,"Power":60,"Voltage":231}}}}"#,
                chrono::DateTime::from_timestamp(secs, 0).unwrap().format("%Y-%m-%dT%H:%M:%S")
            )
            .into_bytes(),
        ),
        (
            format!("{p}/shelly/s1/events/rpc"),
            format!(
                r#"{{"src":"shellypro3em-1","method":"NotifyStatus","params":{{"ts":{secs}.5,"em:0":{{"a_voltage":230.5}},"emdata:0":{{"total_act":1500}}}}}}"#
            )
            .into_bytes(),
        ),
        (
            format!("{p}/custom/M55"),
            format!(r#"{{"time":{secs},"data":{{"energy":2500}}}}"#).into_bytes(),
        ),
        // Bad input: malformed JSON, wrong type, absurd timestamp, unknown topic shape.
        (format!("{p}/canonical/bad1"), b"{\"meter_id\":".to_vec()),
        (format!("{p}/canonical/bad2"), b"{\"readings\":\"x\"}".to_vec()),
        (
            format!("{p}/canonical/bad3"),
            br#"{"meter_id":"C2","ts":"1999-01-01T00:00:00Z","channel":"voltage_a","value":1}"#.to_vec(),
        ),
    ];
    publish_all(&url, msgs, 0, Duration::ZERO).await;
    let rs = wait_for_readings(lake.path(), 9, 30).await;
    let dl = {
        let t = Instant::now();
        loop {
            let d = dead_letters(lake.path());
            if d.len() >= 3 || t.elapsed() > Duration::from_secs(20) {
                break d;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let stats = run.stop(&url).await;
    let find = |m: &str, c: Channel| {
        rs.iter()
            .find(|r| r.meter_id == m && r.channel == c)
            .cloned()
    };
    assert_eq!(
        find("C1", Channel::ImportActiveTotal).unwrap().value,
        dec!(123456.7891)
    );
    assert_eq!(
        find("GW7", Channel::ImportActiveTotal).unwrap().value,
        dec!(42.5)
    );
    assert_eq!(
        find("GW7", Channel::ActivePowerTotal).unwrap().value,
        dec!(1.5)
    );
    assert_eq!(
        find("plug9", Channel::ImportActiveTotal).unwrap().value,
        dec!(7.125)
    );
    assert_eq!(find("plug9", Channel::VoltageA).unwrap().value, dec!(231));
    assert_eq!(
        find("shellypro3em-1", Channel::ImportActiveTotal)
            .unwrap()
            .value,
        dec!(1.5)
    );
    assert_eq!(
        find("shellypro3em-1", Channel::VoltageA).unwrap().ts_ms,
        secs * 1000 + 500
    );
    assert_eq!(
        find("M55", Channel::ImportActiveTotal).unwrap().value,
        dec!(2.5)
    );
    let c1 = find("C1", Channel::ImportActiveTotal).unwrap();
    assert_eq!(c1.source.protocol, Protocol::Mqtt);
    assert_eq!(*c1.source.address, format!("{p}/canonical/a"));
    assert_eq!(dl.len(), 3, "{dl:?}");
    assert!(
        dl.iter()
            .any(|(a, r)| a.ends_with("bad1") && r.contains("malformed JSON")),
        "{dl:?}"
    );
    assert!(
        dl.iter()
            .any(|(a, r)| a.ends_with("bad2") && r.contains("wrong type")),
        "{dl:?}"
    );
    assert!(
        dl.iter()
            .any(|(a, r)| a.ends_with("bad3") && r.contains("timestamp")),
        "{dl:?}"
    );
    assert_eq!(stats.messages, 8);
}

// ---------------------------------------------------------------- sparkplug

fn spb(seq: u64, metrics: Vec<Metric>) -> Vec<u8> {
    sparkplug::encode_payload(&Payload {
        timestamp: Some(now_ms() as u64 - 1000),
        metrics,
        seq: Some(seq),
        uuid: None,
        body: None,
    })
}

/// Topic of edge node `gw1` (or its device) in `group`.
fn spb_topic(group: &str, kind: &str, device: Option<&str>) -> String {
    match device {
        Some(d) => format!("spBv1.0/{group}/{kind}/gw1/{d}"),
        None => format!("spBv1.0/{group}/{kind}/gw1"),
    }
}

/// One Sparkplug source for `group`: device `gw1/m1` is meter SPB1.
fn spb_sources(group: &str) -> String {
    format!(
        r#"
[[source]]
name = "spb"
filter = "spBv1.0/{group}/#"
format = "sparkplug"
unmapped = "ignore"
channels = {{ "Energy/Import" = "import_active_total" }}
meters = {{ "gw1/m1" = "SPB1" }}
"#
    )
}

type Commands = tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>;

/// Subscribes to `spBv1.0/<group>/NCMD/gw1`, where rebirth requests go.
async fn watch_node_commands(url: &str, group: &str) -> (tokio::task::JoinHandle<()>, Commands) {
    let (_, host, port) = parse_url(url).unwrap();
    let (watch, mut wev) = AsyncClient::new(MqttOptions::new(uniq("watch"), host, port), 16);
    watch
        .subscribe(format!("spBv1.0/{group}/NCMD/gw1"), QoS::AtLeastOnce)
        .await
        .unwrap();
    let (seen_tx, seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let watcher = tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        let _keep = watch;
        loop {
            match wev.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = seen_tx.send(p.payload.to_vec());
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    ready_rx.await.expect("watcher subscribed");
    (watcher, seen_rx)
}

async fn expect_rebirth_request(seen: &mut Commands) {
    let cmd = tokio::time::timeout(Duration::from_secs(15), seen.recv())
        .await
        .expect("no rebirth request")
        .unwrap();
    let cmd = sparkplug::decode_payload(&cmd).unwrap();
    assert_eq!(cmd.metrics[0].name.as_deref(), Some("Node Control/Rebirth"));
}

fn spm(name: Option<&str>, alias: u64, v: f64) -> Metric {
    Metric {
        name: name.map(String::from),
        alias: Some(alias),
        datatype: Some(datatype::DOUBLE),
        value: Some(MetricValue::DoubleValue(v)),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparkplug_aliases_resolve_and_a_seq_gap_requests_a_rebirth() {
    let url = broker_url();
    let group = uniq("grp");
    let lake = tempfile::tempdir().unwrap();
    let sources = spb_sources(&group);
    // Watch for the rebirth command the ingest should send.
    let (watcher, mut seen_rx) = watch_node_commands(&url, &group).await;

    let run = start_ingest(config(&url, &uniq("ingest-spb"), &sources), lake.path()).await;
    let t = |kind: &str, dev: Option<&str>| spb_topic(&group, kind, dev);
    publish_all(
        &url,
        vec![
            (t("NBIRTH", None), spb(0, vec![])),
            (
                t("DBIRTH", Some("m1")),
                spb(1, vec![spm(Some("Energy/Import"), 5, 100.25)]),
            ),
            (t("DDATA", Some("m1")), spb(2, vec![spm(None, 5, 100.5)])),
        ],
        0,
        Duration::ZERO,
    )
    .await;
    let rs = wait_for_readings(lake.path(), 2, 20).await;
    let mut values: Vec<Decimal> = rs
        .iter()
        .filter(|r| r.meter_id == "SPB1")
        .map(|r| r.value)
        .collect();
    values.sort();
    assert_eq!(values, vec![dec!(100.25), dec!(100.5)]);

    // seq 7 after 2: a gap, so the node is asked to rebirth.
    publish_all(
        &url,
        vec![(t("DDATA", Some("m1")), spb(7, vec![spm(None, 5, 101.0)]))],
        0,
        Duration::ZERO,
    )
    .await;
    expect_rebirth_request(&mut seen_rx).await;

    // A device death marks later data offline.
    publish_all(
        &url,
        vec![
            (t("DDEATH", Some("m1")), spb(8, vec![])),
            (t("DDATA", Some("m1")), spb(9, vec![spm(None, 5, 102.0)])),
        ],
        0,
        Duration::ZERO,
    )
    .await;
    let rs = wait_for_readings(lake.path(), 4, 20).await;
    let late = rs
        .iter()
        .find(|r| r.value == dec!(102))
        .expect("data after death is kept");
    assert!(late.quality.contains(Quality::OFFLINE));
    run.stop(&url).await;
    watcher.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparkplug_data_before_the_rebirth_waits_for_it_even_across_an_ingest_restart() {
    let url = broker_url();
    let group = uniq("grp");
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let sources = spb_sources(&group);
    let client_id = uniq("ingest-park");
    let (watcher, mut commands) = watch_node_commands(&url, &group).await;
    let t = |kind: &str, dev: Option<&str>| spb_topic(&group, kind, dev);
    let births = |seq: u64| {
        vec![
            (t("NBIRTH", None), spb(seq, vec![])),
            (
                t("DBIRTH", Some("m1")),
                spb(seq + 1, vec![spm(Some("Energy/Import"), 5, 100.25)]),
            ),
        ]
    };

    // The first ingest learns the aliases.
    let a = start_ingest(config(&url, &client_id, &sources), &lake).await;
    let mut msgs = births(0);
    msgs.push((t("DDATA", Some("m1")), spb(2, vec![spm(None, 5, 100.5)])));
    publish_all(&url, msgs, 0, Duration::ZERO).await;
    wait_for_readings(&lake, 2, 20).await;
    a.stop(&url).await;

    // A restarted ingest knows no aliases: the data waits, the node is asked to rebirth.
    let b = start_ingest(config(&url, &client_id, &sources), &lake).await;
    publish_all(
        &url,
        vec![(t("DDATA", Some("m1")), spb(3, vec![spm(None, 5, 100.75)]))],
        0,
        Duration::ZERO,
    )
    .await;
    expect_rebirth_request(&mut commands).await;
    let stats = b.stop(&url).await;
    assert_eq!(stats.parked, 1);
    let parked = |lake: &Path| {
        std::fs::read_dir(lake.join("_spool"))
            .unwrap()
            .flat_map(|w| std::fs::read_dir(w.unwrap().path().join("parked")).unwrap())
            .count()
    };
    assert_eq!(parked(&lake), 1, "the parked message is on disk");

    // Restarted again, it asks for the birth itself; once the birth comes the data lands.
    let c = start_ingest(config(&url, &client_id, &sources), &lake).await;
    expect_rebirth_request(&mut commands).await;
    publish_all(&url, births(0), 0, Duration::ZERO).await;
    let t0 = Instant::now();
    let late = loop {
        let rs = reader::read_all_readings(&lake).unwrap_or_default();
        if let Some(r) = rs.iter().find(|r| r.value == dec!(100.75)) {
            break r.clone();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "parked data never landed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(late.meter_id, "SPB1");
    assert_eq!(late.channel, Channel::ImportActiveTotal);
    c.stop(&url).await;
    assert_eq!(parked(&lake), 0, "released once its reading was durable");
    assert!(dead_letters(&lake).is_empty(), "{:?}", dead_letters(&lake));
    watcher.abort();
}

// ---------------------------------------------------------------- crash and network

fn spawn_ingest_binary(cfg_path: &Path, lake: &Path) -> (Child, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(common::bin())
        .args(["ingest", "mqtt", "--config"])
        .arg(cfg_path)
        .arg("--out")
        .arg(lake)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

fn wait_for_line(rx: &std::sync::mpsc::Receiver<String>, needle: &str) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            if l.contains(needle) {
                return;
            }
        }
    }
    panic!("ingest never logged '{needle}'");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_killed_mid_stream_then_restarted_loses_nothing_and_compacts_to_no_duplicates() {
    let url = broker_url();
    let p = uniq("kill");
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let client_id = uniq("ingest-kill");
    let cfg_path = dir.path().join("ingest.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[mqtt]\nurl = \"{url}\"\nclient_id = \"{client_id}\"\n[ingest]\nflush_secs = 1\n[[source]]\nname = \"c\"\nfilter = \"{p}/#\"\nformat = \"canonical\"\n"
        ),
    )
    .unwrap();
    let n = 3000;
    let rs = sim(n, 50, now_ms() - 100 * 60_000);
    let want: BTreeSet<_> = rs.iter().map(key).collect();

    let (mut a, a_log) = spawn_ingest_binary(&cfg_path, &lake);
    wait_for_line(&a_log, "subscribed");
    // 300 messages of 10 readings, paced over about 3 s.
    let msgs = canonical_messages(&format!("{p}/r"), &rs, 10);
    let u = url.clone();
    let publisher =
        tokio::spawn(async move { publish_all(&u, msgs, 10, Duration::from_millis(100)).await });
    tokio::time::sleep(Duration::from_millis(1200)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    a.wait().unwrap();
    publisher.await.unwrap();

    let (mut b, b_log) = spawn_ingest_binary(&cfg_path, &lake);
    wait_for_line(&b_log, "mqtt connected");
    let got = wait_for_readings(&lake, n, 60).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(b.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(b.wait().unwrap().success());
    forget_session(&url, &client_id).await;

    let before: BTreeSet<_> = got.iter().map(key).collect();
    assert_eq!(
        before,
        want,
        "lost readings: {}",
        want.difference(&before).count()
    );
    compact::compact(&lake, chrono::NaiveDate::MIN, chrono::NaiveDate::MAX).unwrap();
    let after = reader::read_all_readings(&lake).unwrap();
    assert_eq!(after.len(), n, "duplicates left after compaction");
    let after_keys: BTreeSet<_> = after.iter().map(key).collect();
    assert_eq!(after_keys, want);
}

/// A loopback TCP proxy whose connections can be cut and refused on demand,
/// and whose client-to-broker direction can be muted (bytes dropped).
struct Proxy {
    port: u16,
    down: Arc<AtomicBool>,
    muted: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(false));
        let muted = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (d, m, c) = (down.clone(), muted.clone(), conns.clone());
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                if d.load(Ordering::SeqCst) {
                    continue; // dropped: connection refused in effect
                }
                let up = upstream.clone();
                let m = m.clone();
                let h = tokio::spawn(async move {
                    if let Ok(out) = tokio::net::TcpStream::connect(up).await {
                        pump(inbound, out, m).await;
                    }
                });
                c.lock().unwrap().push(h.abort_handle());
            }
        });
        Proxy {
            port,
            down,
            muted,
            conns,
        }
    }

    /// From now on what clients send is dropped (set it between packets:
    /// while the client is idle).
    fn mute(&self) {
        self.muted.store(true, Ordering::SeqCst);
    }

    fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

/// Copies both ways until either side closes; client bytes are dropped
/// while `muted`.
async fn pump(
    mut client: tokio::net::TcpStream,
    mut broker: tokio::net::TcpStream,
    muted: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut up, mut down) = (vec![0u8; 16 << 10], vec![0u8; 16 << 10]);
    loop {
        tokio::select! {
            r = client.read(&mut up) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if !muted.load(Ordering::SeqCst) && broker.write_all(&up[..n]).await.is_err() {
                        return;
                    }
                }
            },
            r = broker.read(&mut down) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if client.write_all(&down[..n]).await.is_err() {
                        return;
                    }
                }
            },
        }
    }
}

/// A Tasmota source under `p`: `Time` is optional, so readings may carry
/// no timestamp and get their receive time.
fn tasmota_source(p: &str) -> String {
    format!("[[source]]\nname = \"tas\"\nfilter = \"{p}/tele/+/SENSOR\"\nformat = \"tasmota\"\n")
}

/// A Tasmota message without `Time`.
fn untimed(p: &str) -> Vec<(String, Vec<u8>)> {
    vec![(
        format!("{p}/tele/m1/SENSOR"),
        br#"{"ENERGY":{"Total":12.5}}"#.to_vec(),
    )]
}

/// Waits until the lake holds at least `n` rows (duplicates counted).
async fn wait_for_rows(lake: &Path, n: usize, secs: u64, what: &str) -> Vec<Reading> {
    let t = Instant::now();
    loop {
        let rs = reader::read_all_readings(lake).unwrap_or_default();
        if rs.len() >= n {
            return rs;
        }
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "{what}: {} of {n} rows after {secs} s",
            rs.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Compacts the lake and returns its rows.
fn compacted(lake: &Path) -> Vec<Reading> {
    compact::compact(lake, chrono::NaiveDate::MIN, chrono::NaiveDate::MAX).unwrap();
    reader::read_all_readings(lake).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_message_without_timestamps_keeps_its_first_receive_time_across_a_restart() {
    let url = broker_url();
    let (_, host, port) = parse_url(&url).unwrap();
    let proxy = Proxy::start(format!("{host}:{port}")).await;
    let via_proxy = format!("mqtt://127.0.0.1:{}", proxy.port);
    let p = uniq("restamp");
    let lake = tempfile::tempdir().unwrap();
    let client_id = uniq("ingest-restamp");
    let sources = tasmota_source(&p);
    // The muted proxy swallows PINGREQs too: a keepalive long enough that
    // the broker does not drop the connection on a loaded machine.
    let config = |url: &str| {
        let mut cfg = config(url, &client_id, &sources);
        cfg.mqtt.keepalive_secs = 60;
        cfg
    };

    // The first run makes the message durable (and commits it to Parquet),
    // but its PUBACK never reaches the broker.
    let a = start_ingest(config(&via_proxy), lake.path()).await;
    proxy.mute();
    publish_all(&url, untimed(&p), 0, Duration::ZERO).await;
    let first = wait_for_rows(lake.path(), 1, 20, "first copy").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = a.stop.send(());
    a.handle.await.unwrap().expect("first run");
    proxy.cut();

    // The broker redelivers it to the next run (DUP set).
    let b = start_ingest(config(&url), lake.path()).await;
    let both = wait_for_rows(lake.path(), 2, 20, "redelivered copy").await;
    let stats = b.stop(&url).await;
    assert_eq!(stats.messages, 1, "the redelivered copy");
    assert_eq!(both[0], both[1], "the same row twice: {both:?}");
    let after = compacted(lake.path());
    assert_eq!(after, first, "one row, with the first receive time");
}

/// (entries, stamps) in a lake's spool segments.
fn spooled(lake: &Path) -> (usize, usize) {
    let mut n = (0, 0);
    for w in std::fs::read_dir(lake.join("_spool"))
        .into_iter()
        .flatten()
        .flatten()
    {
        for s in std::fs::read_dir(w.path()).into_iter().flatten().flatten() {
            if s.file_name().to_string_lossy().starts_with("seg-") {
                if let Ok(r) = meterflow::store::spool::read_segment(&s.path()) {
                    n.0 += r.entries.len();
                    n.1 += r.stamps.len();
                }
            }
        }
    }
    n
}

/// The real ingest binary killed between the spool fsync and the PUBACKs,
/// then restarted to get the broker's redeliveries (DUP set).
struct KillBeforePuback {
    url: String,
    proxy: Proxy,
    dir: tempfile::TempDir,
    lake: std::path::PathBuf,
    client_id: String,
    /// `[[source]]` tables of the config.
    sources: String,
}

impl KillBeforePuback {
    async fn new(name: &str, sources: impl Fn(&str) -> String) -> (KillBeforePuback, String) {
        let url = broker_url();
        let (_, host, port) = parse_url(&url).unwrap();
        let proxy = Proxy::start(format!("{host}:{port}")).await;
        let p = uniq(name);
        let dir = tempfile::tempdir().unwrap();
        let lake = dir.path().join("lake");
        let k = KillBeforePuback {
            url,
            proxy,
            lake,
            client_id: uniq(&format!("ingest-{name}")),
            sources: sources(&p),
            dir,
        };
        (k, p)
    }

    /// keepalive 60 s: the muted proxy swallows PINGREQs too.
    fn config(&self, url: &str, flush_secs: u64) -> std::path::PathBuf {
        let path = self.dir.path().join(format!("ingest-{flush_secs}.toml"));
        std::fs::write(
            &path,
            format!(
                "[mqtt]\nurl = \"{url}\"\nclient_id = \"{}\"\nkeepalive_secs = 60\n[ingest]\nflush_secs = {flush_secs}\n{}",
                self.client_id, self.sources
            ),
        )
        .unwrap();
        path
    }

    /// Publishes `msgs` to an ingest that spools them (fsynced) and never
    /// commits (flush in an hour) nor acks (muted proxy); SIGKILLs it once
    /// `done` says they are spooled.
    async fn spool_then_kill(&self, msgs: Vec<(String, Vec<u8>)>, done: impl Fn() -> bool) {
        let via_proxy = format!("mqtt://127.0.0.1:{}", self.proxy.port);
        let (mut a, a_log) = spawn_ingest_binary(&self.config(&via_proxy, 3600), &self.lake);
        wait_for_line(&a_log, "subscribed");
        self.proxy.mute();
        publish_all(&self.url, msgs, 0, Duration::ZERO).await;
        let t = Instant::now();
        while !done() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "never spooled: {:?}",
                spooled(&self.lake)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(a.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        a.wait().unwrap();
        self.proxy.cut();
    }

    /// Restarts ingest straight to the broker: it replays the spool into
    /// Parquet, then gets the redeliveries; `until` waits for their rows.
    async fn restart<T>(&self, until: impl std::future::Future<Output = T>) -> T {
        let (mut b, b_log) = spawn_ingest_binary(&self.config(&self.url, 1), &self.lake);
        wait_for_line(&b_log, "mqtt connected");
        wait_for_line(&b_log, "receive time of their first copy");
        let out = until.await;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(b.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        assert!(b.wait().unwrap().success());
        forget_session(&self.url, &self.client_id).await;
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_killed_between_the_spool_fsync_and_the_puback_of_an_untimed_message_keeps_one_row()
{
    let (k, p) = KillBeforePuback::new("restamp-kill", tasmota_source).await;
    let lake = k.lake.clone();
    k.spool_then_kill(untimed(&p), || spooled(&lake).0 > 0)
        .await;
    assert!(reader::read_all_readings(&lake)
        .unwrap_or_default()
        .is_empty());
    let both = k
        .restart(wait_for_rows(
            &lake,
            2,
            30,
            "replayed and redelivered copies",
        ))
        .await;
    assert_eq!(both[0], both[1], "the same row twice: {both:?}");
    let after = compacted(&lake);
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0], both[0]);
}

/// Every dead letter in the lake, all columns as text (`received_at` first,
/// in ms), sorted.
fn dead_letter_rows(lake: &Path) -> Vec<Vec<String>> {
    use arrow::array::{Array, TimestampMillisecondArray};
    use arrow::util::display::array_value_to_string;
    let text =
        |c: &dyn Array, i: usize| match c.as_any().downcast_ref::<TimestampMillisecondArray>() {
            // Displaying a timestamp with a named zone needs chrono-tz.
            Some(ts) => ts.value(i).to_string(),
            None => array_value_to_string(c, i).unwrap(),
        };
    let mut out = Vec::new();
    for b in quarantine_batches(lake) {
        for i in 0..b.num_rows() {
            let row = b.columns().iter();
            out.push(row.map(|c| text(c.as_ref(), i)).collect());
        }
    }
    out.sort();
    out
}

/// Every record batch of the lake's dead letters.
fn quarantine_batches(lake: &Path) -> Vec<arrow::record_batch::RecordBatch> {
    let files = reader::list_files(
        lake,
        "quarantine",
        chrono::NaiveDate::MIN,
        chrono::NaiveDate::MAX,
    )
    .unwrap_or_default();
    files
        .iter()
        .flat_map(|(_, f)| reader::read_file(f).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_of_a_message_redelivered_after_a_kill_keep_their_first_receive_time() {
    let (k, p) = KillBeforePuback::new("restamp-dead", |p| {
        format!("{}unmapped = \"dead_letter\"\n", tasmota_source(p))
    })
    .await;
    let lake = k.lake.clone();
    // Undecodable; and with timestamps, one good value and one unmapped field.
    let msgs = vec![
        (format!("{p}/tele/m1/SENSOR"), b"not json".to_vec()),
        (
            format!("{p}/tele/m2/SENSOR"),
            br#"{"Time":"2025-11-22T09:00:00","ENERGY":{"Total":7.25},"Odd":1}"#.to_vec(),
        ),
    ];
    // Two dead letters and a reading spooled, with a stamp per message.
    k.spool_then_kill(msgs, || spooled(&lake) == (3, 2)).await;
    assert!(dead_letter_rows(&lake).is_empty());
    let both = k
        .restart(async {
            let both = wait_for_rows(&lake, 2, 30, "replayed and redelivered reading").await;
            let t = Instant::now();
            while dead_letter_rows(&lake).len() < 4 {
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "dead letters: {:?}",
                    dead_letter_rows(&lake)
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            both
        })
        .await;

    // Each dead letter twice, identical in every column (`received_at` too),
    // until compaction keeps one of each.
    let dead = dead_letter_rows(&lake);
    assert_eq!(dead.len(), 4, "{dead:?}");
    assert_eq!(dead[0], dead[1], "{dead:?}");
    assert_eq!(dead[2], dead[3], "{dead:?}");
    assert_ne!(dead[0], dead[2]);
    assert_eq!(both[0], both[1], "the same reading twice: {both:?}");
    assert_eq!(compacted(&lake), vec![both[0].clone()]);
    assert_eq!(
        dead_letter_rows(&lake),
        vec![dead[0].clone(), dead[2].clone()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_connection_dropped_mid_stream_loses_nothing() {
    let url = broker_url();
    let (_, host, port) = parse_url(&url).unwrap();
    let proxy = Proxy::start(format!("{host}:{port}")).await;
    let via_proxy = format!("mqtt://127.0.0.1:{}", proxy.port);
    let p = uniq("drop");
    let lake = tempfile::tempdir().unwrap();
    let sources = format!("[[source]]\nname = \"c\"\nfilter = \"{p}/#\"\nformat = \"canonical\"\n");
    let run = start_ingest(
        config(&via_proxy, &uniq("ingest-drop"), &sources),
        lake.path(),
    )
    .await;

    let n = 2000;
    let rs = sim(n, 40, now_ms() - 100 * 60_000);
    let want: BTreeSet<_> = rs.iter().map(key).collect();
    let msgs = canonical_messages(&format!("{p}/r"), &rs, 10);
    let u = url.clone();
    let publisher =
        tokio::spawn(async move { publish_all(&u, msgs, 10, Duration::from_millis(100)).await });
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        proxy.cut();
        tokio::time::sleep(Duration::from_millis(700)).await;
        proxy.restore();
    }
    publisher.await.unwrap();
    let got = wait_for_readings(lake.path(), n, 60).await;
    let stats = run.stop(&url).await;
    let keys: BTreeSet<_> = got.iter().map(key).collect();
    assert_eq!(
        keys,
        want,
        "lost readings: {}",
        want.difference(&keys).count()
    );
    assert!(stats.messages >= 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_group_splits_one_stream_between_two_ingest_processes() {
    let url = broker_url();
    let p = uniq("share");
    let group = uniq("grp");
    let lake = tempfile::tempdir().unwrap();
    let sources = format!("[[source]]\nname = \"c\"\nfilter = \"{p}/#\"\nformat = \"canonical\"\n");
    let a = start_ingest_in(
        config(&url, &uniq("ingest-sa"), &sources),
        lake.path(),
        Some(group.clone()),
    )
    .await;
    let b = start_ingest_in(
        config(&url, &uniq("ingest-sb"), &sources),
        lake.path(),
        Some(group),
    )
    .await;
    let n = 1000;
    let rs = sim(n, 10, now_ms() - 200 * 60_000);
    let want: BTreeSet<_> = rs.iter().map(key).collect();
    publish_all(
        &url,
        canonical_messages(&format!("{p}/r"), &rs, 10),
        0,
        Duration::ZERO,
    )
    .await;
    let got = wait_for_readings(lake.path(), n, 60).await;
    let (sa, sb) = (a.stop(&url).await, b.stop(&url).await);
    let keys: BTreeSet<_> = got.iter().map(key).collect();
    assert_eq!(keys, want);
    assert_eq!(
        sa.messages + sb.messages,
        100,
        "each message went to exactly one member"
    );
    assert!(
        sa.messages > 0 && sb.messages > 0,
        "both members got a share: {sa:?} {sb:?}"
    );
}

// ---------------------------------------------------------------- uplink

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplink_spools_while_the_broker_is_unreachable_and_delivers_everything_when_it_returns() {
    use meterflow::ingest::config::MqttConfig;
    use meterflow::uplink::{Uplink, UplinkConfig};
    let url = broker_url();
    let (_, host, port) = parse_url(&url).unwrap();
    let proxy = Proxy::start(format!("{host}:{port}")).await;
    proxy.cut(); // the link starts down
    let p = uniq("up");
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("central");
    let sources = format!("[[source]]\nname = \"c\"\nfilter = \"{p}/#\"\nformat = \"canonical\"\n");
    let central = start_ingest(config(&url, &uniq("ingest-up"), &sources), &lake).await;

    let mqtt = MqttConfig::new(&format!("mqtt://127.0.0.1:{}", proxy.port), &uniq("uplink"));
    let mut cfg = UplinkConfig::new(
        mqtt,
        &format!("{p}/readings"),
        "sub-9",
        dir.path().join("spool"),
    );
    cfg.per_message = 25;
    cfg.cap_bytes = 4 << 20;
    cfg.alarm_ratio = 0.0001;
    let uplink = Uplink::start(cfg.clone()).unwrap();
    let n = 1000;
    let rs = sim(n, 20, now_ms() - 100 * 60_000);
    let want: BTreeSet<_> = rs.iter().map(key).collect();
    for chunk in rs.chunks(100) {
        uplink.send(chunk.to_vec()).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        uplink.pending(),
        n / 25,
        "nothing can be acknowledged while the link is down"
    );
    assert!(uplink.alarm());
    // A restart while down keeps the spool.
    uplink.shutdown().await;
    let uplink = Uplink::start(cfg).unwrap();
    assert_eq!(uplink.pending(), n / 25);

    proxy.restore();
    assert!(
        uplink.drain(Duration::from_secs(60)).await,
        "spool did not drain"
    );
    assert!(!uplink.alarm());
    let got = wait_for_readings(&lake, n, 60).await;
    uplink.shutdown().await;
    central.stop(&url).await;
    let keys: BTreeSet<_> = got.iter().map(key).collect();
    assert_eq!(keys, want);
    assert!(got.iter().all(|r| &*r.source.collector == "sub-9"));
}
