//! Uplink against a real broker: Sparkplug B read back by meterflow's own
//! ingest, a collector that uplinks instead of writing its lake, and TLS with
//! password auth against a private mosquitto started by the test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meterflow::collector::config::CollectorConfig;
use meterflow::collector::run::{collect_once, CollectOptions, CollectStats};
use meterflow::ingest::config::{IngestConfig, MqttConfig};
use meterflow::ingest::mqtt::{forget_session, parse_url, run_ingest, IngestOptions, IngestStats};
use meterflow::model::{Channel, Quality, Reading};
use meterflow::protocol::dlt645::Di;
use meterflow::protocol::sparkplug::{
    decode_payload, rebirth_request, MessageType, MetricValue, Topic,
};
use meterflow::store::reader;
use meterflow::uplink::{Uplink, UplinkConfig, UplinkFormat};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;

use super::common::reading;
use super::mqtt::broker_url;

fn uniq(name: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{name}-{}-{}-{}",
        std::process::id(),
        meterflow::model::now_ms(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn now_ms() -> i64 {
    meterflow::model::now_ms()
}

struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Result<IngestStats, meterflow::ingest::mqtt::IngestError>>,
    client_id: String,
    url: String,
}

/// Starts ingest in this process; returns once the broker confirmed the subscription.
async fn start_ingest(text: &str, base: &Path, lake: &Path) -> Running {
    let mut cfg = IngestConfig::parse(text, &base.join("ingest.toml")).unwrap();
    cfg.base_dir = base.to_path_buf();
    let ready = Arc::new(tokio::sync::Notify::new());
    let client_id = cfg.mqtt.client_id.clone();
    let url = cfg.mqtt.url.clone();
    let opts = IngestOptions {
        config: cfg,
        lake: lake.to_path_buf(),
        shared_group: None,
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
        url,
    }
}

impl Running {
    async fn stop(self) -> IngestStats {
        let _ = self.stop.send(());
        let stats = self.handle.await.unwrap().expect("ingest failed");
        if !self.url.starts_with("mqtts") {
            forget_session(&self.url, &self.client_id).await;
        }
        stats
    }
}

type Key = (String, Channel, i64);

/// Value and quality flags of each reading.
fn values(rs: &[Reading]) -> BTreeMap<Key, (Decimal, String)> {
    rs.iter()
        .map(|r| {
            (
                (r.meter_id.clone(), r.channel, r.ts_ms),
                (r.value, r.quality.to_string()),
            )
        })
        .collect()
}

async fn wait_for_readings(lake: &Path, want: usize, secs: u64) -> Vec<Reading> {
    let t = Instant::now();
    loop {
        let rs = reader::read_all_readings(lake).unwrap_or_default();
        if values(&rs).len() >= want || t.elapsed() > Duration::from_secs(secs) {
            return rs;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Values chosen to break anything that goes through a binary float.
fn awkward_readings(start: i64) -> Vec<Reading> {
    let vals = [
        dec!(12345678901234.5678),
        dec!(-99999999999999.9999),
        dec!(0.0001),
        dec!(0.1),
        dec!(0.3),
        dec!(10.50),
        dec!(0),
        dec!(90071992547.4099),
        dec!(1234.5),
    ];
    let mut out = vec![];
    for k in 0..60 {
        let ch = [
            Channel::ImportActiveTotal,
            Channel::ExportActiveTotal,
            Channel::ActivePowerTotal,
        ][k % 3];
        let mut r = reading(
            &format!("SP{:02}", k % 7),
            start + k as i64 * 1000,
            ch,
            vals[k % vals.len()],
        );
        if k % 5 == 0 {
            r.quality = Quality::parse("clock_skew").unwrap();
        }
        out.push(r);
    }
    out
}

/// A raw subscriber recording (topic, payload) of everything under `filter`.
async fn observe(
    url: &str,
    filter: &str,
) -> (
    AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
) {
    let (_, host, port) = parse_url(url).unwrap();
    let mut o = MqttOptions::new(uniq("obs"), host, port);
    o.set_max_packet_size(1 << 24, 1 << 24);
    let (client, mut ev) = AsyncClient::new(o, 64);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        while let Ok(e) = ev.poll().await {
            match e {
                Event::Incoming(Packet::SubAck(_)) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), ready_rx)
        .await
        .expect("observer did not subscribe")
        .unwrap();
    (client, rx)
}

/// Waits for a message of `kind` on the observer; returns its payload.
async fn next_of(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    kind: MessageType,
) -> (Topic, meterflow::protocol::sparkplug::Payload) {
    loop {
        let (t, p) = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no {} arrived", kind.as_str()))
            .unwrap();
        let topic = Topic::parse(&t).unwrap();
        if topic.kind == kind {
            return (topic, decode_payload(&p).unwrap());
        }
    }
}

fn bd_seq(p: &meterflow::protocol::sparkplug::Payload) -> u64 {
    p.metrics
        .iter()
        .find(|m| m.name.as_deref() == Some("bdSeq"))
        .and_then(|m| match m.value {
            Some(MetricValue::LongValue(v)) => Some(v),
            _ => None,
        })
        .expect("bdSeq metric")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparkplug_uplink_is_read_back_by_ingest_with_exact_values_and_answers_rebirth() {
    let url = broker_url();
    let group = uniq("mfg");
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("central");
    let text = format!(
        "[mqtt]\nurl = \"{url}\"\nclient_id = \"{}\"\nkeepalive_secs = 5\n[ingest]\nflush_secs = 1\n[[source]]\nname = \"spb\"\nfilter = \"spBv1.0/{group}/#\"\nformat = \"sparkplug\"\nexact = true\n",
        uniq("ingest-spb")
    );
    let central = start_ingest(&text, dir.path(), &lake).await;
    let (_obs, mut seen) = observe(&url, &format!("spBv1.0/{group}/#")).await;

    let mut cfg = UplinkConfig::new(
        MqttConfig::new(&url, &uniq("uplink-spb")),
        "unused",
        "sub-spb",
        dir.path().join("spool"),
    );
    cfg.format = UplinkFormat::Sparkplug {
        group: group.clone(),
        edge: "sub-spb".into(),
    };
    cfg.per_message = 11;
    let uplink = Uplink::start(cfg).unwrap();
    let (_, nbirth) = next_of(&mut seen, MessageType::NBirth).await;
    assert_eq!(nbirth.seq, Some(0));
    let bd = bd_seq(&nbirth);

    let rs = awkward_readings(now_ms() - 3_600_000);
    for c in rs.chunks(20) {
        uplink.send(c.to_vec()).unwrap();
    }
    assert!(
        uplink.drain(Duration::from_secs(30)).await,
        "spool did not drain"
    );
    let (dt, dbirth) = next_of(&mut seen, MessageType::DBirth).await;
    assert!(dt.device.as_deref().unwrap().starts_with("SP"));
    assert!(dbirth
        .metrics
        .iter()
        .all(|m| m.alias.is_some() && m.name.is_some()));
    let (_, ddata) = next_of(&mut seen, MessageType::DData).await;
    assert!(ddata
        .metrics
        .iter()
        .all(|m| m.name.is_none() && m.alias.is_some()));

    let got = wait_for_readings(&lake, rs.len(), 30).await;
    assert_eq!(
        values(&got),
        values(&rs),
        "the lake holds exactly the collected values and quality flags"
    );

    // A host asks for a rebirth: NBIRTH (same bdSeq, seq 0) and every DBIRTH again.
    let (_, host, port) = parse_url(&url).unwrap();
    let (cmd, mut cmd_ev) = AsyncClient::new(MqttOptions::new(uniq("host"), host, port), 10);
    cmd.publish(
        format!("spBv1.0/{group}/NCMD/sub-spb"),
        QoS::AtLeastOnce,
        false,
        rebirth_request(now_ms() as u64),
    )
    .await
    .unwrap();
    let poller = tokio::spawn(async move { while cmd_ev.poll().await.is_ok() {} });
    let (_, again) = next_of(&mut seen, MessageType::NBirth).await;
    assert_eq!((again.seq, bd_seq(&again)), (Some(0), bd));
    let mut reborn = std::collections::BTreeSet::new();
    while reborn.len() < 7 {
        let (t, _) = next_of(&mut seen, MessageType::DBirth).await;
        reborn.insert(t.device.unwrap());
    }
    // Data after the rebirth still lands (the aliases were re-declared).
    let more = vec![reading(
        "SP00",
        now_ms() - 1000,
        Channel::ImportActiveTotal,
        dec!(7.0007),
    )];
    uplink.send(more.clone()).unwrap();
    assert!(uplink.drain(Duration::from_secs(30)).await);
    let got = wait_for_readings(&lake, rs.len() + 1, 30).await;
    let mut want = values(&rs);
    want.extend(values(&more));
    assert_eq!(values(&got), want);

    // The link drops without DISCONNECT: the broker publishes the NDEATH will.
    uplink.shutdown().await;
    let (_, death) = next_of(&mut seen, MessageType::NDeath).await;
    assert_eq!(bd_seq(&death), bd, "NDEATH carries the session's bdSeq");
    poller.abort();
    central.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_uplinks_instead_of_or_as_well_as_writing_its_lake() {
    use meterflow::sim::dlt645::{spawn_tcp, SimFile, SimMeterConfig};
    let url = broker_url();
    let group = uniq("mfc");
    let dir = tempfile::tempdir().unwrap();
    let central = dir.path().join("central");
    let local = dir.path().join("local");
    let text = format!(
        "[mqtt]\nurl = \"{url}\"\nclient_id = \"{}\"\nkeepalive_secs = 5\n[ingest]\nflush_secs = 1\n[[source]]\nname = \"spb\"\nfilter = \"spBv1.0/{group}/#\"\nformat = \"sparkplug\"\nexact = true\n",
        uniq("ingest-col")
    );
    let ingest = start_ingest(&text, dir.path(), &central).await;

    let meters: Vec<SimMeterConfig> = (1..=3)
        .map(|i| {
            let mut m = SimMeterConfig::new(
                format!("{:012}", 2000 + i).parse().unwrap(),
                Decimal::new(123_456_789 * i, 3),
            );
            m.load_w = 1500;
            m
        })
        .collect();
    let sim = spawn_tcp(
        SimFile {
            meters,
            ..Default::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let mut toml = format!(
        r#"collector_id = "sub-col"
[[dlt645.group]]
name = "g"
[[dlt645.group.schedule]]
every_s = 900
dis = ["0001FF00", "02030000"]

[[dlt645.bus]]
name = "gw"
tcp = "{}"
timeout_ms = 300
"#,
        sim.addr
    );
    for i in 1..=3 {
        toml += &format!(
            "[[dlt645.bus.meter]]\naddress = \"{a:012}\"\nmeter_id = \"M-{a:012}\"\ngroup = \"g\"\n",
            a = 2000 + i
        );
    }
    toml += &format!(
        "\n[uplink]\nformat = \"sparkplug\"\ngroup_id = \"{group}\"\nspool_dir = \"spool\"\nlake = false\n[uplink.mqtt]\nurl = \"{url}\"\nclient_id = \"{}\"\n",
        uniq("col-uplink")
    );
    let file = dir.path().join("collectors.toml");
    std::fs::write(&file, &toml).unwrap();
    let cfg = CollectorConfig::load(&file).unwrap();

    let stats = collect_once(cfg, &local).await.unwrap();
    assert!(stats.readings > 0);
    assert_eq!(stats.uplinked, stats.readings);
    assert_eq!(stats.uplink_refused, 0);
    assert_eq!(stats.uplink_pending, 0, "drained before exit");
    assert!(
        dir.path().join("spool").is_dir(),
        "spool is relative to the config file"
    );
    assert!(
        reader::read_all_readings(&local)
            .unwrap_or_default()
            .is_empty(),
        "lake = false: no readings in the local lake"
    );
    let got = wait_for_readings(&central, stats.readings as usize, 30).await;
    assert_eq!(got.len() as u64, stats.readings);
    // Every simulated register arrived with its exact value: the values the
    // meter served in this first cycle (the second cycle reads the drifting
    // power registers again).
    let want: BTreeMap<(String, Channel), Decimal> = sim
        .handle
        .served()
        .iter()
        .filter_map(|s| {
            let info = meterflow::protocol::dlt645::lookup(s.di)?;
            let vals = match &s.value {
                meterflow::protocol::dlt645::Value::Number(x) => vec![*x],
                meterflow::protocol::dlt645::Value::Numbers(xs) => xs.clone(),
                _ => return None,
            };
            let meter = format!("M-{}", s.address);
            Some(
                info.channels
                    .iter()
                    .zip(vals)
                    .map(|(c, v)| ((meter.clone(), *c), v))
                    .collect::<Vec<_>>(),
            )
        })
        .flatten()
        .collect();

    // `lake = true`: the same cycle lands in both places.
    std::fs::write(&file, toml.replace("lake = false", "lake = true")).unwrap();
    let both = collect_once(CollectorConfig::load(&file).unwrap(), &local)
        .await
        .unwrap();
    assert_eq!(both.uplinked, both.readings);
    let local_rs = reader::read_all_readings(&local).unwrap();
    assert_eq!(local_rs.len() as u64, both.readings);
    let central_rs = wait_for_readings(&central, 2 * stats.readings as usize, 30).await;
    ingest.stop().await;
    let local_keys: std::collections::BTreeSet<_> = values(&local_rs).into_keys().collect();
    let central_keys: std::collections::BTreeSet<_> = values(&central_rs).into_keys().collect();
    assert!(local_keys.is_subset(&central_keys));
    let got: BTreeMap<(String, Channel), Decimal> = got
        .iter()
        .filter(|r| r.channel != Channel::ClockSkew)
        .map(|r| ((r.meter_id.clone(), r.channel), r.value))
        .collect();
    assert_eq!(got, want);
}

// ---------------------------------------------------------------- TLS

/// A private mosquitto with a TLS listener and password auth; killed on drop.
struct TlsBroker {
    child: Child,
    port: u16,
    ca: PathBuf,
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    crate::common::stdout_of(&out, format_args!("{cmd:?}"));
}

fn have(bin: &str) -> bool {
    Command::new(bin)
        .arg("-h")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Makes `NAME.key` and `NAME.pem` in `dir`: a key and a certificate for
/// `subject` with the extensions `ext`, signed by the test CA (`ca.pem`).
fn sign(dir: &Path, name: &str, subject: &str, ext: &str) {
    let ossl = || {
        let mut c = Command::new("openssl");
        c.current_dir(dir);
        c
    };
    let (key, csr, cnf, pem) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.cnf"),
        format!("{name}.pem"),
    );
    run(ossl().args([
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", &key, "-out", &csr,
    ]));
    std::fs::write(dir.join(&cnf), ext).unwrap();
    run(ossl().args([
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &cnf,
        "-out",
        &pem,
    ]));
}

/// How a test broker authenticates clients.
enum ClientAuth<'a> {
    /// Username and password over TLS.
    Password { user: &'a str, password: &'a str },
    /// A client certificate signed by the test CA (`client.pem`, `client.key`).
    Certificate,
}

/// Starts the broker, or None (skip) when mosquitto / openssl are missing
/// and MQTT_URL is not set; with MQTT_URL set (CI) missing tools fail.
/// A TLS broker that requires user `mf` with `password`, and its URL.
fn password_broker(dir: &Path, password: &str) -> Option<(TlsBroker, String)> {
    let broker = tls_broker(
        dir,
        ClientAuth::Password {
            user: "mf",
            password,
        },
    )?;
    let url = format!("mqtts://127.0.0.1:{}", broker.port);
    Some((broker, url))
}

fn tls_broker(dir: &Path, auth: ClientAuth) -> Option<TlsBroker> {
    for bin in ["mosquitto", "mosquitto_passwd", "openssl"] {
        if !have(bin) {
            assert!(
                std::env::var_os("MQTT_URL").is_none(),
                "MQTT_URL is set (CI) but `{bin}` is not installed"
            );
            eprintln!("skipping the TLS test: `{bin}` is not installed");
            return None;
        }
    }
    let p = |f: &str| dir.join(f);
    let ossl = || {
        let mut c = Command::new("openssl");
        c.current_dir(dir);
        c
    };
    run(ossl().args([
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=meterflow test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]));
    sign(
        dir,
        "server",
        "/CN=127.0.0.1",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
    );
    let client_auth = match auth {
        ClientAuth::Password { user, password } => {
            run(Command::new("mosquitto_passwd").args([
                "-b",
                "-c",
                p("passwd").to_str().unwrap(),
                user,
                password,
            ]));
            format!(
                "allow_anonymous false\npassword_file {}\n",
                p("passwd").display()
            )
        }
        ClientAuth::Certificate => {
            sign(
                dir,
                "client",
                "/CN=meterflow-client",
                "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
            );
            "allow_anonymous false\n".to_string()
        }
    };
    // Listener options follow their `listener` line; before it they would open port 1883.
    let listener_auth = match auth {
        // The certificate is the only credential: its CN becomes the username.
        ClientAuth::Certificate => "require_certificate true\nuse_identity_as_username true\n",
        ClientAuth::Password { .. } => "",
    };
    let port = free_port();
    std::fs::write(
        p("mosquitto.conf"),
        format!(
            "user root\npersistence false\nper_listener_settings false\n{client_auth}listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n{listener_auth}",
            p("ca.pem").display(),
            p("server.pem").display(),
            p("server.key").display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(p("mosquitto.log")).unwrap();
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(p("mosquitto.conf"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start mosquitto");
    let broker = TlsBroker {
        child,
        port,
        ca: p("ca.pem"),
    };
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "mosquitto did not listen: {}",
            std::fs::read_to_string(p("mosquitto.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(broker)
}

/// Sends `rs` through a new uplink (spool in `dir/spool`) and checks that
/// ingest wrote exactly them into `lake`.
async fn delivers_exactly(mqtt: MqttConfig, topic: &str, dir: &Path, lake: &Path, rs: &[Reading]) {
    let url = mqtt.url.clone();
    assert!(
        uplink_delivers(mqtt, topic, &dir.join("spool"), rs, 30).await,
        "uplink to {url} did not drain"
    );
    let got = wait_for_readings(lake, rs.len(), 30).await;
    assert_eq!(values(&got), values(rs));
}

/// Sends `rs` through a new uplink; true when the broker acknowledged all of it within `secs`.
async fn uplink_delivers(
    mqtt: MqttConfig,
    topic: &str,
    spool: &Path,
    rs: &[Reading],
    secs: u64,
) -> bool {
    let uplink = Uplink::start(UplinkConfig::new(
        mqtt,
        topic,
        "sub-tls",
        spool.to_path_buf(),
    ))
    .unwrap();
    uplink.send(rs.to_vec()).unwrap();
    let drained = uplink.drain(Duration::from_secs(secs)).await;
    uplink.shutdown().await;
    drained
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_and_uplink_over_tls_with_password_auth() {
    let dir = tempfile::tempdir().unwrap();
    let password = "s3cret-for-the-test";
    let Some((broker, url)) = password_broker(dir.path(), password) else {
        return;
    };
    // Secrets only from files and environment variables.
    std::fs::write(dir.path().join("ingest-password"), format!("{password}\n")).unwrap();
    let env = "MF_IT_UPLINK_TLS_PASSWORD";
    std::env::set_var(env, password);

    let lake = dir.path().join("lake");
    let text = format!(
        "[mqtt]\nurl = \"{url}\"\nclient_id = \"tls-ingest\"\nkeepalive_secs = 5\nusername = \"mf\"\npassword_file = \"ingest-password\"\nca_file = \"{}\"\n[ingest]\nflush_secs = 1\n[[source]]\nname = \"c\"\nfilter = \"secure/#\"\nformat = \"canonical\"\n",
        broker.ca.display()
    );
    let ingest = start_ingest(&text, dir.path(), &lake).await;

    let mut mqtt = MqttConfig::new(&url, "tls-uplink");
    mqtt.username = Some("mf".into());
    mqtt.password_env = Some(env.into());
    mqtt.ca_file = Some(broker.ca.clone());
    let rs = vec![
        reading(
            "TLS1",
            now_ms() - 5000,
            Channel::ImportActiveTotal,
            dec!(42.4242),
        ),
        reading(
            "TLS2",
            now_ms() - 5000,
            Channel::ImportActiveTotal,
            dec!(0.0001),
        ),
    ];
    delivers_exactly(mqtt.clone(), "secure/readings", dir.path(), &lake, &rs).await;

    // A wrong password is refused by the broker: nothing is acknowledged.
    std::fs::write(dir.path().join("wrong"), "nope\n").unwrap();
    let mut bad = mqtt;
    bad.client_id = "tls-uplink-bad".into();
    bad.password_env = None;
    bad.password_file = Some(dir.path().join("wrong"));
    assert!(
        !uplink_delivers(
            bad,
            "secure/readings",
            &dir.path().join("spool-bad"),
            &rs[..1],
            2
        )
        .await
    );
    ingest.stop().await;
    drop(broker);
}

/// `meterflow mqtt publish-sim` and `mqtt discard` (the real binary) log in
/// to a broker that requires a password, read from a file or an environment
/// variable; a wrong password fails with the broker's refusal, a missing
/// password file with its name.
#[test]
fn mqtt_helpers_log_in_with_a_password_from_a_file_or_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let password = "helpers-s3cret";
    let Some((broker, url)) = password_broker(dir.path(), password) else {
        return;
    };
    std::fs::write(dir.path().join("password"), format!("{password}\n")).unwrap();
    std::fs::write(dir.path().join("wrong"), "nope\n").unwrap();
    let env = "MF_IT_HELPERS_PASSWORD";
    // Paths relative to the working directory, as a user types them.
    let helper = |args: &[&str]| {
        let out = Command::new(super::common::bin())
            .current_dir(dir.path())
            .args(["mqtt"])
            .args(args)
            .args(["--url", &url, "--ca-file", "ca.pem", "--username", "mf"])
            .env(env, password)
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    let discard = |login: &[&str], more: &[&str]| {
        let mut a = vec![
            "discard",
            "--filter",
            "helpers/#",
            "--client-id",
            "helpers-discard",
            "--persistent",
            "--idle-secs",
            "10",
        ];
        a.extend(login);
        a.extend(more);
        helper(&a)
    };
    let publish = |login: &[&str]| {
        let mut a = vec![
            "publish-sim",
            "--topic",
            "helpers/readings",
            "--readings",
            "20",
            "--meters",
            "2",
            "--per-message",
            "5",
            "--client-id",
            "helpers-publish",
        ];
        a.extend(login);
        helper(&a)
    };
    let from_file = ["--password-file", "password"];
    let from_env = ["--password-env", env];

    // A persistent session queues what publish-sim sends; discard drains it.
    let (code, out, err) = discard(&from_file, &["--subscribe-only"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("subscribed"), "{out}");
    let (code, out, err) = publish(&from_env);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("published 20 readings in 4 messages"), "{out}");
    let (code, out, err) = discard(&from_file, &["--messages", "4"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("discarded 4 messages"), "{out}");

    // A wrong password: the broker refuses the login.
    let wrong = ["--password-file", "wrong"];
    for (what, (code, out, err)) in [
        ("publish-sim", publish(&wrong)),
        ("discard", discard(&wrong, &["--messages", "1"])),
    ] {
        assert_eq!(code, Some(1), "{what}: {out}{err}");
        assert!(err.to_lowercase().contains("refused"), "{what}: {err}");
    }
    // A missing password file is named.
    let (code, _, err) = publish(&["--password-file", "no-such-password"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("--password-file") && err.contains("no-such-password"),
        "{err}"
    );
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_and_uplink_over_mutual_tls_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let Some(broker) = tls_broker(dir.path(), ClientAuth::Certificate) else {
        return;
    };
    let url = format!("mqtts://127.0.0.1:{}", broker.port);
    // Relative paths resolve against the config file's directory.
    let lake = dir.path().join("lake");
    let text = format!(
        "[mqtt]\nurl = \"{url}\"\nclient_id = \"mtls-ingest\"\nkeepalive_secs = 5\nca_file = \"ca.pem\"\nclient_cert_file = \"client.pem\"\nclient_key_file = \"client.key\"\n[ingest]\nflush_secs = 1\n[[source]]\nname = \"c\"\nfilter = \"mtls/#\"\nformat = \"canonical\"\n"
    );
    let ingest = start_ingest(&text, dir.path(), &lake).await;

    let mut mqtt = MqttConfig::new(&url, "mtls-uplink");
    mqtt.ca_file = Some(broker.ca.clone());
    mqtt.client_cert_file = Some(dir.path().join("client.pem"));
    mqtt.client_key_file = Some(dir.path().join("client.key"));
    let rs = vec![reading(
        "MTLS1",
        now_ms() - 5000,
        Channel::ImportActiveTotal,
        dec!(7.0007),
    )];
    delivers_exactly(mqtt.clone(), "mtls/readings", dir.path(), &lake, &rs).await;

    // Without a client certificate the broker refuses the handshake.
    let mut anonymous = mqtt;
    anonymous.client_id = "mtls-uplink-anonymous".into();
    anonymous.client_cert_file = None;
    anonymous.client_key_file = None;
    let spool = dir.path().join("spool-anonymous");
    assert!(!uplink_delivers(anonymous, "mtls/readings", &spool, &rs, 2).await);
    ingest.stop().await;
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_counts_nothing_as_collected_when_the_uplink_spool_is_full() {
    use meterflow::sim::dlt645::{spawn_tcp, SimFile, SimMeterConfig};
    let dir = tempfile::tempdir().unwrap();
    let sim = spawn_tcp(
        SimFile {
            meters: vec![SimMeterConfig::new(
                "000000003001".parse().unwrap(),
                Decimal::new(5, 0),
            )],
            ..Default::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    // The broker is unreachable and the cap is tiny: the first batch is refused.
    let toml = format!(
        "collector_id = \"sub-full\"\n[[dlt645.bus]]\nname = \"gw\"\ntcp = \"{}\"\ntimeout_ms = 300\n[[dlt645.bus.meter]]\naddress = \"000000003001\"\n\n[uplink]\nspool_dir = \"spool\"\nlake = false\ncap_bytes = 10\ndrain_on_exit_s = 0\n[uplink.mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\nclient_id = \"sub-full\"\n",
        sim.addr,
        free_port()
    );
    let file = dir.path().join("collectors.toml");
    std::fs::write(&file, toml).unwrap();
    let local = dir.path().join("local");
    let stats = collect_once(CollectorConfig::load(&file).unwrap(), &local)
        .await
        .unwrap();
    assert!(stats.uplink_refused > 0);
    assert_eq!(stats.uplinked, 0);
    assert_eq!(stats.readings, 0, "refused readings are not collected");
    assert_eq!(stats.uplink_pending, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_left_above_its_alarm_level_raises_the_alarm_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    // Nobody listens on port 1: the link stays down.
    let cfg = || {
        let mut c = UplinkConfig::new(
            MqttConfig::new("mqtt://127.0.0.1:1", &uniq("uplink-alarm")),
            "meterflow/sub-alarm/readings",
            "sub-alarm",
            dir.path().join("spool"),
        );
        c.cap_bytes = 1 << 20;
        c.alarm_ratio = 0.000_1;
        c
    };
    let uplink = Uplink::start(cfg()).unwrap();
    assert!(!uplink.alarm());
    uplink.send(awkward_readings(now_ms() - 3_600_000)).unwrap();
    assert!(uplink.alarm());
    uplink.shutdown().await;
    let again = Uplink::start(cfg()).unwrap();
    assert!(again.pending() > 0);
    assert!(
        again.alarm(),
        "the spool is as full as when the last run stopped"
    );
    again.shutdown().await;
}

/// A UTC offset ("+09:00", "-08:00") at which the local time is now between
/// 12:00 and 13:00: a `daily_at = "00:00"` passed hours ago and the next
/// local midnight is hours away, whatever the wall clock.
fn offset_at_local_noon() -> String {
    let utc_hour = now_ms().div_euclid(3_600_000) % 24;
    let h = 12 - utc_hour; // -11..=12
    format!("{}{:02}:00", if h < 0 { '-' } else { '+' }, h.abs())
}

/// Runs an uplink-only collector with one meter's daily frozen read for
/// `secs` against a broker that is down; returns the stats and how often the
/// frozen block was read. Meters and collector keep a clock at local noon,
/// so no day boundary falls within the run.
async fn daily_read_with_spool_cap(cap_bytes: u64, secs: u64) -> (CollectStats, usize) {
    use meterflow::sim::dlt645::{spawn_tcp, SimFile, SimMeterConfig};
    let dir = tempfile::tempdir().unwrap();
    let a = "000000003101";
    let offset = offset_at_local_noon();
    let mut file = SimFile {
        meters: vec![SimMeterConfig::new(a.parse().unwrap(), Decimal::new(5, 0))],
        ..Default::default()
    };
    file.bus.utc_offset = offset.clone();
    let sim = spawn_tcp(file, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let toml = format!(
        r#"collector_id = "sub-daily"
[dlt645]
utc_offset = "{offset}"
[[dlt645.group]]
name = "daily"
[[dlt645.group.schedule]]
daily_at = "00:00"
dis = ["05060101"]

[[dlt645.bus]]
name = "gw"
tcp = "{}"
timeout_ms = 300
degraded_poll_interval_s = 1
[[dlt645.bus.meter]]
address = "{a}"
group = "daily"

[uplink]
spool_dir = "spool"
lake = false
cap_bytes = {cap_bytes}
drain_on_exit_s = 0
[uplink.mqtt]
url = "mqtt://127.0.0.1:{}"
client_id = "{}"
"#,
        sim.addr,
        free_port(),
        uniq("sub-daily")
    );
    let file = dir.path().join("collectors.toml");
    std::fs::write(&file, toml).unwrap();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let opts = CollectOptions {
        lake_dir: dir.path().join("local"),
        once: false,
        metrics_addr: None,
    };
    let task = tokio::spawn(meterflow::collector::run::run(
        CollectorConfig::load(&file).unwrap(),
        opts,
        rx,
    ));
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.send(true).unwrap();
    let stats = task.await.unwrap().unwrap();
    let frozen: Di = "05060101".parse().unwrap();
    let reads = sim
        .handle
        .served()
        .iter()
        .filter(|s| s.di == frozen)
        .count();
    (stats, reads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_frozen_read_the_full_spool_refused_is_read_again_the_same_day() {
    // The spool refuses everything: the day's frozen values were read but
    // not kept, so the read stays due and is tried again.
    let (stats, reads) = daily_read_with_spool_cap(10, 4).await;
    assert!(stats.uplink_refused > 0);
    assert_eq!(stats.readings, 0, "refused readings are not collected");
    assert!(
        reads >= 2,
        "read {reads} time(s): a refused daily read must be read again"
    );

    // The spool takes them (durable, broker still down): done for the day.
    let (stats, reads) = daily_read_with_spool_cap(1 << 20, 3).await;
    assert_eq!(stats.uplink_refused, 0);
    assert_eq!(stats.readings, 5);
    assert_eq!(reads, 1, "a stored daily read is not read again that day");
}
