//! DL/T 645: simulated meters on real TCP sockets and a real pty, read by the
//! collector into a real lake.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use rust_decimal::Decimal;

use meterflow::collector::config::{BusConfig, CollectorConfig, MeterConfig, SerialSettings};
use meterflow::collector::dlt645::relay::{relay_control, AuditLog, RelayOrder, RelayOutcome};
use meterflow::collector::dlt645::{link, scan, Bus, BusTiming, Endpoint};
use meterflow::collector::run::{collect_once, run, CollectOptions, CollectStats};
use meterflow::model::{Channel, Quality, Reading};
use meterflow::protocol::dlt645::{lookup, Address, Di, Edition, Frame, RelayCommand, Value};
use meterflow::sim::dlt645::{spawn_pty, spawn_tcp, Faults, Served, SimFile, SimMeterConfig};

fn addr(s: &str) -> Address {
    s.parse().unwrap()
}

fn sim_meter(a: &str, kwh: i64) -> SimMeterConfig {
    let mut m = SimMeterConfig::new(addr(a), Decimal::new(kwh, 0));
    m.load_w = 2500;
    m
}

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A config reading registers, power and the clock of every meter on one bus.
fn config(bus: BusConfig, meters: &[(&str, Edition)]) -> CollectorConfig {
    config_every(900, bus, meters)
}

/// Like [`config`], with the register schedule every `every_s` seconds.
fn config_every(every_s: u64, bus: BusConfig, meters: &[(&str, Edition)]) -> CollectorConfig {
    let text = format!(
        r#"collector_id = "it-dlt645"
[[dlt645.group]]
name = "g2007"
[[dlt645.group.schedule]]
every_s = {every_s}
dis = ["0001FF00", "02030000", "02010100"]
read_clock = true
[[dlt645.group]]
name = "g1997"
[[dlt645.group.schedule]]
every_s = 900
dis = ["901F", "B611"]
"#,
    );
    let mut cfg = CollectorConfig::parse(Path::new("it.toml"), &text).unwrap();
    let mut bus = bus;
    bus.meters = meters
        .iter()
        .map(|(a, e)| MeterConfig {
            address: addr(a),
            meter_id: Some(format!("M-{a}")),
            edition: *e,
            group: Some(
                if *e == Edition::V2007 {
                    "g2007"
                } else {
                    "g1997"
                }
                .into(),
            ),
        })
        .collect();
    cfg.dlt645.buses = vec![bus];
    cfg
}

fn fast_bus(name: &str, tcp: Option<SocketAddr>, serial: Option<SerialSettings>) -> BusConfig {
    let mut b = BusConfig::new(name, tcp.map(|a| a.to_string()), serial);
    b.timeout_ms = 300;
    b.retries = 1;
    b.retry_backoff_ms = 10;
    b.silent_gap_ms = 2;
    b.drain_ms = 30;
    b
}

fn lake_readings(lake: &Path) -> Vec<Reading> {
    let today = chrono::Utc::now().date_naive();
    meterflow::store::reader::read_readings(
        lake,
        today - chrono::Duration::days(2),
        today + chrono::Duration::days(2),
    )
    .unwrap()
}

/// What the simulator served, as (meter id, channel) -> value.
fn served_values(served: &[Served]) -> BTreeMap<(String, Channel), Decimal> {
    let mut out = BTreeMap::new();
    for s in served {
        let Some(info) = lookup(s.di) else { continue };
        let values: Vec<Decimal> = match &s.value {
            Value::Number(x) => vec![*x],
            Value::Numbers(xs) => xs.clone(),
            _ => continue,
        };
        for (c, v) in info.channels.iter().zip(values) {
            out.insert((format!("M-{}", s.address), *c), v);
        }
    }
    out
}

fn lake_values(readings: &[Reading]) -> BTreeMap<(String, Channel), Decimal> {
    readings
        .iter()
        .filter(|r| r.channel != Channel::ClockSkew)
        .map(|r| ((r.meter_id.clone(), r.channel), r.value))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collect_once_over_tcp_writes_exactly_the_simulated_values() {
    let mut meters: Vec<SimMeterConfig> = (1..=6)
        .map(|i| sim_meter(&format!("{:012}", 1000 + i), 1000 * i))
        .collect();
    // Two meters answer a block read in follow-up frames (a 2007 one with sequence
    // numbers, a 1997 one without); one runs an hour fast.
    meters[1].max_frame_data = 12;
    meters[2].edition = Edition::V1997;
    meters[2].max_frame_data = 10;
    meters[3].clock_offset_s = 3600;
    let sim = spawn_tcp(
        SimFile {
            meters,
            ..Default::default()
        },
        localhost(),
    )
    .await
    .unwrap();
    let mut list: Vec<(String, Edition)> = (1..=6)
        .map(|i| (format!("{:012}", 1000 + i), Edition::V2007))
        .collect();
    list[2].1 = Edition::V1997;
    let list_ref: Vec<(&str, Edition)> = list.iter().map(|(a, e)| (a.as_str(), *e)).collect();
    let cfg = config(fast_bus("gw1", Some(sim.addr), None), &list_ref);
    let lake = tempfile::tempdir().unwrap();

    let stats = collect_once(cfg, lake.path()).await.unwrap();

    let readings = lake_readings(lake.path());
    assert_eq!(stats.readings as usize, readings.len());
    let expected = served_values(&sim.handle.served());
    let got = lake_values(&readings);
    assert_eq!(
        got, expected,
        "the lake holds exactly what the meters served"
    );
    // 5 meters x (5 registers + power + voltage) + the 1997 meter's 5 registers + voltage.
    assert_eq!(got.len(), 5 * 7 + 6);
    // Follow-up frames were assembled into the full block.
    assert!(got.contains_key(&("M-000000001002".to_string(), Channel::ImportActiveT4)));
    assert!(got.contains_key(&("M-000000001003".to_string(), Channel::ImportActiveT4)));
    for r in &readings {
        assert_eq!(r.source.protocol, meterflow::model::Protocol::Dlt645);
        assert_eq!(&*r.source.collector, "it-dlt645");
        assert_eq!(*r.source.address, format!("gw1/{}", &r.meter_id[2..]));
    }
    // The fast clock is flagged on that meter's readings and nowhere else.
    for r in &readings {
        let skewed = r.meter_id == "M-000000001004";
        assert_eq!(r.quality.contains(Quality::CLOCK_SKEW), skewed, "{r:?}");
    }
    let skew = readings
        .iter()
        .find(|r| r.meter_id == "M-000000001004" && r.channel == Channel::ClockSkew)
        .unwrap();
    assert!(
        (skew.value - Decimal::new(3600, 0)).abs() <= Decimal::new(2, 0),
        "{}",
        skew.value
    );
    assert_eq!(
        stats.buses[0].meters_skewed,
        vec!["M-000000001004".to_string()]
    );
    assert_eq!(stats.buses[0].counters.timeouts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_meter_does_not_stall_others_and_late_reply_is_discarded() {
    let mut meters = vec![
        sim_meter("000000002001", 10),
        sim_meter("000000002002", 20),
        sim_meter("000000002003", 30),
        sim_meter("000000002004", 40),
    ];
    meters[1].faults = Faults {
        no_reply: true,
        ..Default::default()
    };
    // Answers 400 ms late: after the collector's 300 ms timeout, while it asks the next meter.
    meters[2].faults = Faults {
        late_reply_ms: 400,
        ..Default::default()
    };
    let sim = spawn_tcp(
        SimFile {
            meters,
            ..Default::default()
        },
        localhost(),
    )
    .await
    .unwrap();
    let list = [
        ("000000002001", Edition::V2007),
        ("000000002002", Edition::V2007),
        ("000000002003", Edition::V2007),
        ("000000002004", Edition::V2007),
    ];
    let mut bus = fast_bus("gw-dead", Some(sim.addr), None);
    bus.drain_ms = 5; // a short drain lets the late reply arrive during the next exchange
    bus.retries = 0;
    let cfg = config(bus, &list);
    let lake = tempfile::tempdir().unwrap();

    let stats = collect_once(cfg, lake.path()).await.unwrap();

    let got = lake_values(&lake_readings(lake.path()));
    let expected = served_values(&sim.handle.served());
    assert_eq!(
        got, expected,
        "no late value is attributed to another meter"
    );
    let meters_read: std::collections::BTreeSet<&str> =
        got.keys().map(|(m, _)| m.as_str()).collect();
    assert_eq!(
        meters_read.into_iter().collect::<Vec<_>>(),
        vec!["M-000000002001", "M-000000002004"]
    );
    let b = &stats.buses[0];
    assert_eq!(
        b.meters_silent,
        vec!["M-000000002002".to_string(), "M-000000002003".to_string()]
    );
    // Each silent meter cost one timeout: the rest of its DIs were skipped.
    assert_eq!(b.counters.timeouts, 2);
    assert!(
        b.counters.late_replies + b.counters.stray_frames >= 1,
        "{:?}",
        b.counters
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_noisy_and_refusing_meters_are_counted_and_never_misread() {
    let mut meters = vec![
        sim_meter("000000003001", 1),
        sim_meter("000000003002", 2),
        sim_meter("000000003003", 3),
        sim_meter("000000003004", 4),
        sim_meter("000000003005", 5),
    ];
    meters[0].faults = Faults {
        bad_checksum: true,
        every_nth: 2,
        ..Default::default()
    };
    meters[1].faults = Faults {
        garbage: true,
        ..Default::default()
    };
    meters[2].faults = Faults {
        error_reply: true,
        ..Default::default()
    };
    meters[3].faults = Faults {
        wrong_address: true,
        ..Default::default()
    };
    let sim = spawn_tcp(
        SimFile {
            meters,
            ..Default::default()
        },
        localhost(),
    )
    .await
    .unwrap();
    let list: Vec<(&str, Edition)> = [
        "000000003001",
        "000000003002",
        "000000003003",
        "000000003004",
        "000000003005",
    ]
    .iter()
    .map(|a| (*a, Edition::V2007))
    .collect();
    let cfg = config(fast_bus("gw-faults", Some(sim.addr), None), &list);
    let lake = tempfile::tempdir().unwrap();

    let stats = collect_once(cfg, lake.path()).await.unwrap();

    let got = lake_values(&lake_readings(lake.path()));
    assert_eq!(got, served_values(&sim.handle.served()));
    let c = &stats.buses[0].counters;
    assert!(c.bad_checksum >= 1, "{c:?}");
    assert!(c.noise_bytes >= 1, "{c:?}");
    assert!(c.refused >= 1, "{c:?}");
    assert!(c.stray_frames >= 1, "{c:?}");
    let meters_read: std::collections::BTreeSet<&str> =
        got.keys().map(|(m, _)| m.as_str()).collect();
    // The corrupt meter is read after retries, the noisy one despite the noise;
    // the refusing one gives nothing, the one answering as another address neither.
    assert_eq!(
        meters_read.into_iter().collect::<Vec<_>>(),
        vec!["M-000000003001", "M-000000003002", "M-000000003005"]
    );
    assert!(
        !stats.buses[0]
            .meters_silent
            .contains(&"M-000000003003".to_string()),
        "a refusing meter is alive"
    );
    let labels = [("bus", "gw-faults"), ("meter", "gw-faults/000000003001")];
    assert!(meterflow::metrics::counter_value("meterflow_dlt645_bad_checksum_total", &labels) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pty_serial_bus_is_read_as_serial_with_pacing() {
    let mut file = SimFile {
        meters: vec![
            sim_meter("000000004001", 100),
            sim_meter("000000004002", 200),
        ],
        ..Default::default()
    };
    file.meters[1].edition = Edition::V1997;
    file.bus.baud = Some(9600);
    file.bus.turnaround_ms = 20;
    let sim = spawn_pty(file).unwrap();
    let mut serial = SerialSettings::with_port(sim.path.display().to_string());
    serial.baud = 9600;
    let mut bus = fast_bus("rs485-1", None, Some(serial));
    bus.timeout_ms = 1000;
    let cfg = config(
        bus,
        &[
            ("000000004001", Edition::V2007),
            ("000000004002", Edition::V1997),
        ],
    );
    let lake = tempfile::tempdir().unwrap();

    let stats = collect_once(cfg, lake.path()).await.unwrap();

    let got = lake_values(&lake_readings(lake.path()));
    assert_eq!(got, served_values(&sim.handle.served()));
    assert_eq!(got.len(), 7 + 6);
    assert_eq!(stats.buses[0].counters.timeouts, 0);
}

async fn connect(a: SocketAddr) -> Bus {
    let cfg = fast_bus("tools", Some(a), None);
    let l = link::open(&Endpoint::of(&cfg), Duration::from_secs(2))
        .await
        .unwrap();
    Bus::new("tools", l, BusTiming::of(&cfg))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_finds_the_single_meter_and_probes_candidates() {
    let one = spawn_tcp(
        SimFile {
            meters: vec![sim_meter("398192000337", 1)],
            ..Default::default()
        },
        localhost(),
    )
    .await
    .unwrap();
    let mut bus = connect(one.addr).await;
    assert_eq!(
        scan::read_single_address(&mut bus).await.unwrap(),
        addr("398192000337")
    );

    let many = spawn_tcp(
        SimFile {
            meters: vec![sim_meter("000000005001", 1), sim_meter("000000005003", 1)],
            ..Default::default()
        },
        localhost(),
    )
    .await
    .unwrap();
    let mut bus = connect(many.addr).await;
    assert!(
        scan::read_single_address(&mut bus).await.is_err(),
        "answers collide with two meters"
    );
    let found = scan::probe(
        &mut bus,
        &[
            addr("000000005001"),
            addr("000000005002"),
            addr("000000005003"),
        ],
        Edition::V2007,
    )
    .await
    .unwrap();
    let present: Vec<bool> = found.iter().map(|p| p.present()).collect();
    assert_eq!(present, vec![true, false, true]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_asks_a_silent_candidate_in_the_other_edition_and_says_which_answered() {
    let mut old = sim_meter("000000000414", 1);
    old.edition = Edition::V1997;
    // A 2007 meter whose every reply has a bad checksum: it answers, garbled.
    let mut garbled = sim_meter("000000000777", 1);
    garbled.faults = Faults {
        bad_checksum: true,
        ..Default::default()
    };
    let sim = spawn_tcp(
        SimFile {
            meters: vec![sim_meter("398192000337", 1), old, garbled],
            ..Default::default()
        },
        localhost(),
    )
    .await
    .unwrap();
    let candidates = [
        addr("398192000337"),
        addr("000000000414"),
        addr("000000000999"),
    ];
    let mut bus = connect(sim.addr).await;
    let seen = |found: &[scan::Probe]| -> Vec<(bool, Edition, Option<Edition>)> {
        found
            .iter()
            .map(|p| (p.present(), p.edition, p.silent_to))
            .collect()
    };

    use Edition::{V1997, V2007};
    let cases = [
        // 2007 first: the 1997 meter is silent to it and found in 1997.
        (
            V2007,
            true,
            [
                (true, V2007, None),
                (true, V1997, Some(V2007)),
                (false, V1997, Some(V2007)),
            ],
        ),
        // The wrong edition picked: the 2007 meter is still found, as 2007.
        (
            V1997,
            true,
            [
                (true, V2007, Some(V1997)),
                (true, V1997, None),
                (false, V2007, Some(V1997)),
            ],
        ),
        // One edition only: the other edition's meter is absent.
        (
            V2007,
            false,
            [
                (true, V2007, None),
                (false, V2007, None),
                (false, V2007, None),
            ],
        ),
    ];
    for (first, fallback, want) in cases {
        let found = scan::probe_editions(&mut bus, &candidates, first, fallback)
            .await
            .unwrap();
        assert_eq!(
            seen(&found),
            want.to_vec(),
            "{first} first, fallback {fallback}"
        );
    }

    // The command says it, and --no-fallback keeps the single edition.
    let scan_cmd = |extra: &[&str]| {
        let out = std::process::Command::new(crate::common::bin())
            .args(["dlt645", "scan", "--tcp", &sim.addr.to_string()])
            .args(["--timeout-ms", "300", "--retries", "0"])
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = scan_cmd(&[
        "--edition",
        "1997",
        "--candidates",
        "398192000337,000000000414,000000000999",
    ]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        vec![
            "398192000337 present (2007; silent to 1997)",
            "000000000414 present (1997)",
            "000000000999 absent (no reply in 1997 or 2007)",
        ],
        "{out}"
    );
    assert!(err.contains("edition = \"2007\""), "{err}");
    let (code, out, err) = scan_cmd(&[
        "--edition",
        "1997",
        "--no-fallback",
        "--candidates",
        "398192000337",
    ]);
    assert_eq!(code, Some(2), "{out}\n{err}");
    assert!(
        out.starts_with("398192000337 absent (1997: no reply within"),
        "{out}"
    );

    // A garbled answer is something speaking the edition asked: present, not
    // asked in the other edition, and the line says the reply was corrupt.
    let found = scan::probe_editions(&mut bus, &[addr("000000000777")], Edition::V2007, true)
        .await
        .unwrap();
    assert_eq!(seen(&found), vec![(true, Edition::V2007, None)]);
    assert!(found[0].garbled(), "{:?}", found[0].result);
    let (code, out, err) = scan_cmd(&["--candidates", "000000000777"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.starts_with("000000000777 present? (2007: corrupt reply:"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_trip_is_dry_run_unless_executed_and_always_audited() {
    let mut m = sim_meter("398192000337", 1);
    m.password = "02123456".into();
    let sim = spawn_tcp(
        SimFile {
            meters: vec![m],
            ..Default::default()
        },
        localhost(),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let audit = AuditLog::new(dir.path().join("audit.jsonl"));
    let offset = meterflow::collector::config::parse_offset("+08:00").unwrap();
    let order = |pw: &str| {
        RelayOrder::expiring_in(
            addr("398192000337"),
            RelayCommand::Trip,
            pw.parse().unwrap(),
            "00000001".parse().unwrap(),
            10,
            offset,
        )
    };
    let mut bus = connect(sim.addr).await;

    let dry = relay_control(Some(&mut bus), "test", &order("02123456"), &audit, false)
        .await
        .unwrap();
    assert!(matches!(dry, RelayOutcome::DryRun { .. }));
    assert!(sim.handle.relay_log().is_empty(), "a dry run sends nothing");

    let wrong = relay_control(Some(&mut bus), "test", &order("02999999"), &audit, true)
        .await
        .unwrap();
    assert!(matches!(wrong, RelayOutcome::Refused(s) if s.unauthorised()));
    assert!(
        !sim.handle
            .relay_state(addr("398192000337"))
            .unwrap()
            .tripped
    );

    let ok = relay_control(Some(&mut bus), "test", &order("02123456"), &audit, true)
        .await
        .unwrap();
    assert_eq!(ok, RelayOutcome::Accepted);
    assert!(
        sim.handle
            .relay_state(addr("398192000337"))
            .unwrap()
            .tripped
    );

    let log = std::fs::read_to_string(audit.path()).unwrap();
    let events: Vec<String> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        events,
        vec!["dry_run", "sent", "refused", "sent", "accepted"]
    );
    assert!(
        !log.contains("123456"),
        "the password never reaches the audit log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_gateway_is_reported_in_once_mode_without_stalling_other_buses() {
    let sim = spawn_tcp(
        SimFile {
            meters: vec![sim_meter("000000006001", 1)],
            ..Default::default()
        },
        localhost(),
    )
    .await
    .unwrap();
    let mut cfg = config(
        fast_bus("good", Some(sim.addr), None),
        &[("000000006001", Edition::V2007)],
    );
    // A gateway nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut bad = fast_bus("unreachable", Some(dead), None);
    bad.reconnect_backoff_ms = 10;
    bad.meters = cfg.dlt645.buses[0].meters.clone();
    cfg.dlt645.buses.push(bad);
    let lake = tempfile::tempdir().unwrap();

    let stats = collect_once(cfg, lake.path()).await.unwrap();

    assert_eq!(stats.buses.len(), 2);
    assert!(stats.buses[0].error.is_none());
    assert!(stats.buses[0].readings > 0);
    assert!(
        stats.buses[1]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("cannot connect"),
        "{:?}",
        stats.buses[1]
    );
}

#[test]
fn sample_collectors_config_is_valid() {
    let cfg = CollectorConfig::load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/sample-data/collectors.toml"
    )))
    .unwrap();
    assert!(!cfg.dlt645.buses.is_empty());
    SimFile::load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/sample-data/dlt645-meters.toml"
    )))
    .unwrap();
    let _ = Di::v2007(0);
    // The Modbus part parses with the same loader.
    let modbus = CollectorConfig::load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/sample-data/collectors-modbus.toml"
    )))
    .unwrap();
    assert!(!modbus.modbus.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_frozen_values_are_timestamped_at_the_freeze() {
    let sim = spawn_tcp(
        SimFile {
            meters: vec![sim_meter("000000007001", 5000)],
            ..Default::default()
        },
        localhost(),
    )
    .await
    .unwrap();
    let text = r#"
collector_id = "it-frozen"
[[dlt645.group]]
name = "daily"
[[dlt645.group.schedule]]
daily_at = "00:00"
dis = ["05060101"]
"#;
    let mut cfg = CollectorConfig::parse(Path::new("frozen.toml"), text).unwrap();
    let mut bus = fast_bus("gw-frozen", Some(sim.addr), None);
    bus.meters = vec![MeterConfig {
        address: addr("000000007001"),
        meter_id: None,
        edition: Edition::V2007,
        group: Some("daily".into()),
    }];
    cfg.dlt645.buses = vec![bus];
    let lake = tempfile::tempdir().unwrap();

    collect_once(cfg, lake.path()).await.unwrap();

    let readings = lake_readings(lake.path());
    assert_eq!(readings.len(), 5);
    // The simulator's last freeze is local (UTC+8) midnight today.
    let local_now = chrono::Utc::now() + chrono::Duration::hours(8);
    let midnight_local = local_now.date_naive().and_hms_opt(0, 0, 0).unwrap();
    let expected_ts = (midnight_local - chrono::Duration::hours(8))
        .and_utc()
        .timestamp_millis();
    for r in &readings {
        assert_eq!(r.ts_ms, expected_ts, "{r:?}");
        assert_eq!(r.meter_id, "000000007001");
    }
    let total = readings
        .iter()
        .find(|r| r.channel == Channel::ImportActiveTotal)
        .unwrap();
    assert_eq!(total.value, Decimal::new(500_000, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collect_command_once_against_the_simulator() {
    let sim = spawn_tcp(SimFile::demo(3), localhost()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("collectors.toml");
    let mut text = format!(
        "collector_id = \"cli\"\n[[dlt645.bus]]\nname = \"gw\"\ntcp = \"{}\"\n",
        sim.addr
    );
    for i in 1..=3 {
        text.push_str(&format!("[[dlt645.bus.meter]]\naddress = \"{i}\"\n"));
    }
    std::fs::write(&cfg_path, text).unwrap();
    let lake = dir.path().join("lake");
    let out = tokio::process::Command::new(crate::common::bin())
        .args(["collect", "--once", "--config"])
        .arg(&cfg_path)
        .arg("--out")
        .arg(&lake)
        .output()
        .await
        .unwrap();
    let stdout = crate::common::stdout_of(&out, "meterflow collect --once");
    // Default group: register block (5) + clock skew (1) per meter.
    assert!(
        stdout.contains("18 readings made durable, 18 committed to Parquet"),
        "{stdout}"
    );
    assert_eq!(lake_values(&lake_readings(&lake)), {
        let mut m = served_values(&sim.handle.served());
        // The config has no meter ids: readings carry the address.
        m = m
            .into_iter()
            .map(|((id, c), v)| ((id.trim_start_matches("M-").to_string(), c), v))
            .collect();
        m
    });

    // A config mistake names file, line and field, and exits 1.
    std::fs::write(&cfg_path, "collector_id = \"cli\"\n[[dlt645.bus]]\nname = \"gw\"\ntcp = \"x:1\"\n[[dlt645.bus.meter]]\naddress = \"12AB\"\n").unwrap();
    let out = std::process::Command::new(crate::common::bin())
        .args(["collect", "--once", "--out"])
        .arg(&lake)
        .arg("--config")
        .arg(&cfg_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("collectors.toml:6") && err.contains("12AB"),
        "{err}"
    );
}

/// Runs the collector continuously until the returned sender says stop.
fn run_continuous(
    cfg: CollectorConfig,
    lake: &Path,
    metrics_addr: Option<SocketAddr>,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<Result<CollectStats, meterflow::collector::run::CollectError>>,
) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let opts = CollectOptions {
        lake_dir: lake.to_path_buf(),
        once: false,
        metrics_addr,
    };
    (tx, tokio::spawn(run(cfg, opts, rx)))
}

/// Waits (up to `secs`) until `f` holds.
async fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn metric_line<'a>(text: &'a str, name: &str, meter: &str) -> Option<&'a str> {
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&format!("meter=\"{meter}\"")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_meter_is_polled_less_often_until_it_answers_again_and_metrics_show_it() {
    let (healthy, dead) = ("000000005001", "000000005002");
    let mut meters = vec![sim_meter(healthy, 10), sim_meter(dead, 20)];
    meters[1].faults = Faults {
        no_reply: true,
        ..Default::default()
    };
    let sim = spawn_tcp(
        SimFile {
            meters,
            ..Default::default()
        },
        localhost(),
    )
    .await
    .unwrap();
    let mut bus = fast_bus("gw-degrade", Some(sim.addr), None);
    bus.retries = 0;
    bus.degrade_after_cycles = 2;
    bus.degraded_poll_interval_s = 4;
    let cfg = config_every(1, bus, &[(healthy, Edition::V2007), (dead, Edition::V2007)]);
    let lake = tempfile::tempdir().unwrap();
    let metrics_addr = free_port();
    let (stop, task) = run_continuous(cfg, lake.path(), Some(metrics_addr));

    // Cycles at about 0 s, 1 s, 2 s, 3 s: the dead meter fails twice, then is left alone.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let (h, d) = (
        sim.handle.requests(addr(healthy)),
        sim.handle.requests(addr(dead)),
    );
    assert!(h >= 3 * 5, "the healthy meter is read every cycle: {h}");
    assert_eq!(
        d, 2,
        "one timed-out request per failing cycle, none once degraded"
    );
    let text = http_get(metrics_addr, "/metrics").await;
    let label = format!("gw-degrade/{dead}");
    let degraded = metric_line(&text, "meterflow_dlt645_meter_degraded", &label).unwrap();
    assert!(degraded.ends_with(" 1"), "{degraded}");
    let timeouts = metric_line(&text, "meterflow_dlt645_timeouts_total", &label).unwrap();
    assert!(timeouts.ends_with(" 2"), "{timeouts}");
    let ok = metric_line(
        &text,
        "meterflow_dlt645_requests_total",
        &format!("gw-degrade/{healthy}"),
    )
    .unwrap();
    assert!(!ok.ends_with(" 0"), "{ok}");

    // It comes back: the degraded retry (about 5 s in) answers, then it is read every cycle.
    sim.handle.set_faults(addr(dead), Faults::default());
    let back = eventually(6, || sim.handle.requests(addr(dead)) >= 2 + 5 * 2).await;
    assert!(back, "requests: {}", sim.handle.requests(addr(dead)));
    let text = http_get(metrics_addr, "/metrics").await;
    let degraded = metric_line(&text, "meterflow_dlt645_meter_degraded", &label).unwrap();
    assert!(degraded.ends_with(" 0"), "{degraded}");

    stop.send(true).unwrap();
    let stats = task.await.unwrap().unwrap();
    assert!(stats.buses[0].cycles >= 5, "{:?}", stats.buses[0]);
    let readings = lake_readings(lake.path());
    assert!(readings.iter().any(|r| r.meter_id == format!("M-{dead}")));
}

/// A transparent gateway on loopback that can be switched off (its
/// connections die with it) and on again at the same port.
fn gateway(listener: tokio::net::TcpListener, upstream: SocketAddr) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((mut down, _)) = listener.accept().await else {
                continue;
            };
            conns.spawn(async move {
                if let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                }
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_resume_after_the_gateway_goes_away_and_comes_back() {
    let a = "000000006001";
    let sim = spawn_tcp(
        SimFile {
            meters: vec![sim_meter(a, 10)],
            ..Default::default()
        },
        localhost(),
    )
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind(localhost()).await.unwrap();
    let gw_addr = listener.local_addr().unwrap();
    let gw = gateway(listener, sim.addr);
    let mut bus = fast_bus("gw-flaky", Some(gw_addr), None);
    bus.reconnect_backoff_ms = 100;
    bus.reconnect_backoff_max_ms = 400;
    let cfg = config_every(1, bus, &[(a, Edition::V2007)]);
    let lake = tempfile::tempdir().unwrap();
    let (stop, task) = run_continuous(cfg, lake.path(), None);

    assert!(eventually(5, || sim.handle.requests(addr(a)) >= 5).await);
    gw.abort();
    let _ = gw.await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = sim.handle.requests(addr(a));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        sim.handle.requests(addr(a)),
        during,
        "nothing reaches the meter while the gateway is down"
    );

    let restarted_ms = meterflow::model::now_ms();
    let listener = tokio::net::TcpListener::bind(gw_addr).await.unwrap();
    let gw = gateway(listener, sim.addr);
    assert!(
        eventually(5, || sim.handle.requests(addr(a)) >= during + 10).await,
        "readings resume after the gateway returns"
    );
    stop.send(true).unwrap();
    let stats = task.await.unwrap().unwrap();
    gw.abort();
    assert!(stats.buses[0].connect_failures >= 1, "{:?}", stats.buses[0]);
    assert!(stats.buses[0].error.is_none());
    let readings = lake_readings(lake.path());
    assert!(
        readings
            .iter()
            .any(|r| r.received_ms >= restarted_ms && r.channel == Channel::ImportActiveTotal),
        "readings taken after the reconnect reach the lake"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_meter_clock_is_corrected_by_broadcast_time_sync() {
    let a = "000000007001";
    let mut m = sim_meter(a, 10);
    m.clock_offset_s = 3600;
    let sim = spawn_tcp(
        SimFile {
            meters: vec![m],
            ..Default::default()
        },
        localhost(),
    )
    .await
    .unwrap();
    let mut cfg = config(
        fast_bus("gw-sync", Some(sim.addr), None),
        &[(a, Edition::V2007)],
    );
    cfg.dlt645.time_sync = true;
    let lake = tempfile::tempdir().unwrap();

    let stats = collect_once(cfg.clone(), lake.path()).await.unwrap();
    assert_eq!(stats.buses[0].meters_skewed, vec![format!("M-{a}")]);
    // The simulator applied the 0x08 broadcast: its clock is now (nearly) right.
    assert!(
        eventually(2, || sim
            .handle
            .clock_offset_ms(addr(a))
            .is_some_and(|o| o.abs() < 2000))
        .await,
        "offset {:?}",
        sim.handle.clock_offset_ms(addr(a))
    );
    let again = collect_once(cfg, lake.path()).await.unwrap();
    assert!(
        again.buses[0].meters_skewed.is_empty(),
        "{:?}",
        again.buses[0]
    );
}

/// The lake's quarantine rows as (address, collector, reason, payload).
pub(crate) fn quarantine_rows(lake: &Path) -> Vec<(String, String, String, Vec<u8>)> {
    use arrow::array::{Array, BinaryArray, StringArray};
    let today = chrono::Utc::now().date_naive();
    let files = meterflow::store::reader::list_files(
        lake,
        "quarantine",
        today - chrono::Duration::days(2),
        today + chrono::Duration::days(2),
    )
    .unwrap();
    let mut out = vec![];
    for (_, f) in files {
        for b in meterflow::store::reader::read_file(&f).unwrap() {
            let s = |n: &str| {
                b.column_by_name(n)
                    .unwrap()
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .unwrap()
                    .clone()
            };
            let (addr, coll, reason) = (s("source_address"), s("source_collector"), s("reason"));
            let payload = b.column_by_name("payload").unwrap();
            let payload = payload.as_any().downcast_ref::<BinaryArray>().unwrap();
            for i in 0..b.num_rows() {
                out.push((
                    addr.value(i).to_string(),
                    coll.value(i).to_string(),
                    reason.value(i).to_string(),
                    payload.value(i).to_vec(),
                ));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_corrupt_frames_are_quarantined_in_the_lake_with_their_bytes() {
    let (noisy, corrupt) = ("000000008001", "000000008002");
    let mut meters = vec![sim_meter(noisy, 1), sim_meter(corrupt, 2)];
    meters[0].faults = Faults {
        garbage: true,
        ..Default::default()
    };
    meters[1].faults = Faults {
        bad_checksum: true,
        every_nth: 2,
        ..Default::default()
    };
    let sim = spawn_tcp(
        SimFile {
            meters,
            ..Default::default()
        },
        localhost(),
    )
    .await
    .unwrap();
    let cfg = config(
        fast_bus("gw-q", Some(sim.addr), None),
        &[(noisy, Edition::V2007), (corrupt, Edition::V2007)],
    );
    let lake = tempfile::tempdir().unwrap();

    let stats = collect_once(cfg, lake.path()).await.unwrap();

    // The values still arrive exactly...
    assert_eq!(
        lake_values(&lake_readings(lake.path())),
        served_values(&sim.handle.served())
    );
    // ...and the bad bytes are kept, with why.
    let rows = quarantine_rows(lake.path());
    assert_eq!(stats.quarantined as usize, rows.len());
    let noise: Vec<_> = rows
        .iter()
        .filter(|r| r.0 == format!("gw-q/{noisy}"))
        .collect();
    assert!(!noise.is_empty(), "{rows:?}");
    for (_, collector, reason, payload) in &noise {
        assert_eq!(collector, "it-dlt645");
        assert!(reason.starts_with("line noise"), "{reason}");
        assert!(
            payload.windows(3).any(|w| w == [0x13, 0xFF, 0x55]),
            "{payload:02X?}"
        );
    }
    let bad: Vec<_> = rows
        .iter()
        .filter(|r| r.0 == format!("gw-q/{corrupt}"))
        .collect();
    assert_eq!(bad.len() as u64, stats.buses[0].counters.bad_checksum);
    for (_, _, reason, payload) in &bad {
        assert!(
            reason.contains("malformed frame") && reason.contains("checksum"),
            "{reason}"
        );
        assert_eq!((payload[0], *payload.last().unwrap()), (0x68, 0x16));
    }
}

/// A bus on an in-memory line whose far end is a scripted meter: `before` is
/// already on the line, and every request it receives is answered with
/// `reply` (if any). The task returns the requests seen once the bus is dropped.
async fn scripted_line(
    before: Vec<u8>,
    reply: Option<Vec<u8>>,
) -> (Bus, tokio::task::JoinHandle<Vec<Frame>>) {
    use meterflow::protocol::dlt645::{decode, Decoded};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (ours, mut peer) = tokio::io::duplex(4096);
    let timing = BusTiming {
        timeout: Duration::from_millis(200),
        retries: 2,
        retry_backoff: Duration::from_millis(10),
        silent_gap: Duration::ZERO,
        drain: Duration::from_millis(20),
        preamble: 0,
    };
    let bus = Bus::new("line", Box::new(ours), timing);
    // On the line before the bus is used (written from the task, it could
    // come after the request).
    peer.write_all(&before).await.unwrap();
    let task = tokio::spawn(async move {
        let (mut buf, mut seen, mut chunk) = (Vec::new(), Vec::new(), [0u8; 256]);
        loop {
            let n = peer.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                return seen;
            }
            buf.extend_from_slice(&chunk[..n]);
            while let Decoded::Frame {
                frame, consumed, ..
            } = decode(&buf)
            {
                let frame = frame.to_frame();
                buf.drain(..consumed);
                seen.push(frame);
                if let Some(r) = &reply {
                    let _ = peer.write_all(r).await;
                }
            }
        }
    });
    (bus, task)
}

fn audit_events(audit: &AuditLog) -> Vec<String> {
    std::fs::read_to_string(audit.path())
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_command_is_sent_once_and_without_a_clean_answer_its_outcome_is_unknown() {
    // The meter's acknowledgement with a wrong checksum (F3, should be F2):
    // it most likely executed the command.
    let corrupt_ack = vec![
        0x68, 0x37, 0x03, 0x00, 0x92, 0x81, 0x39, 0x68, 0x9C, 0x00, 0xF3, 0x16,
    ];
    for reply in [Some(corrupt_ack), None] {
        let corrupt = reply.is_some();
        let (mut bus, meter) = scripted_line(vec![], reply).await;
        let dir = tempfile::tempdir().unwrap();
        let audit = AuditLog::new(dir.path().join("audit.jsonl"));
        let order = RelayOrder::expiring_in(
            addr("398192000337"),
            RelayCommand::Trip,
            "02123456".parse().unwrap(),
            "00000001".parse().unwrap(),
            10,
            meterflow::collector::config::parse_offset("+08:00").unwrap(),
        );

        let e = relay_control(Some(&mut bus), "line", &order, &audit, true)
            .await
            .unwrap_err();

        assert!(e.outcome_unknown(), "{e}");
        assert!(e.to_string().contains("outcome unknown"), "{e}");
        drop(bus);
        let sent = meter.await.unwrap();
        assert_eq!(
            sent.len(),
            1,
            "corrupt reply: {corrupt}; the bus retries reads twice, never commands"
        );
        assert_eq!(sent[0].control, 0x1C);
        assert_eq!(audit_events(&audit), vec!["sent", "unknown"]);
    }
}

#[test]
fn the_relay_command_refuses_wildcard_and_broadcast_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    for meter in ["AAAAAAAAAAAA", "999999999999", "3981920003AA"] {
        let out = std::process::Command::new(crate::common::bin())
            .args([
                "dlt645",
                "relay",
                "--tcp",
                "127.0.0.1:1",
                "--meter",
                meter,
                "trip",
            ])
            .arg("--audit-log")
            .arg(&audit)
            .arg("--execute")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{meter}: {err}");
        assert!(
            err.contains(meter) && err.contains("wildcard/broadcast address, not a meter"),
            "{err}"
        );
    }
    assert!(!audit.exists(), "nothing was sent or audited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_reply_already_on_the_line_is_not_taken_as_the_refusal_of_the_next_read() {
    let a = addr("398192000337");
    // A refusal of an earlier read, later than the drain after its timeout.
    let late_refusal = Frame::new(a, 0xD1, vec![0x02]).encode(0).unwrap();
    // The standard's test vector: forward active total = 000000.04 kWh.
    let answer = vec![
        0x68, 0x37, 0x03, 0x00, 0x92, 0x81, 0x39, 0x68, 0x91, 0x08, 0x33, 0x33, 0x34, 0x33, 0x37,
        0x33, 0x33, 0x33, 0x8C, 0x16,
    ];
    let (mut bus, meter) = scripted_line(late_refusal, Some(answer)).await;
    let di: Di = "00010000".parse().unwrap();
    let m = meterflow::collector::config::ResolvedMeter {
        address: a,
        meter_id: "M".into(),
        edition: Edition::V2007,
        schedules: vec![],
    };

    let v = meterflow::collector::dlt645::poll::read_value(&mut bus, &m, di, "line")
        .await
        .unwrap();

    assert_eq!(v, Value::Number(Decimal::new(4, 2)));
    assert_eq!(bus.counters.late_replies, 1);
    assert_eq!(bus.counters.refused, 0);
    drop(bus);
    assert_eq!(meter.await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_daily_read_is_tried_again_the_same_day() {
    use meterflow::collector::config::{ResolvedMeter, Schedule, When};
    use meterflow::collector::dlt645::poll::{poll_meter, MeterState, PollSettings};
    let a = addr("000000007101");
    let sim = spawn_tcp(
        SimFile {
            meters: vec![sim_meter("000000007101", 5000)],
            ..Default::default()
        },
        localhost(),
    )
    .await
    .unwrap();
    let mut st = MeterState::new(ResolvedMeter {
        address: a,
        meter_id: "M-daily".into(),
        edition: Edition::V2007,
        schedules: vec![Schedule {
            name: "daily".into(),
            when: When::DailyAt(chrono::NaiveTime::MIN),
            dis: vec!["05060101".parse().unwrap()],
            read_clock: false,
        }],
    });
    let s = PollSettings {
        collector_id: "it".into(),
        offset: meterflow::collector::config::parse_offset("+08:00").unwrap(),
        skew_threshold: Duration::from_secs(60),
        time_sync: false,
        degrade_after_cycles: 10,
        degraded_interval: Duration::from_millis(400),
    };
    let mut bus = connect(sim.addr).await;
    let retry_pause = || tokio::time::sleep(Duration::from_millis(450));

    // Silent at the daily time, then refusing: nothing stored either time.
    sim.handle.set_faults(
        a,
        Faults {
            no_reply: true,
            ..Default::default()
        },
    );
    let silent = poll_meter(&mut bus, &mut st, &s, false).await.unwrap();
    assert!(silent.unwrap().readings.is_empty());
    let asked = sim.handle.requests(a);
    assert!(asked > 0);
    assert!(
        poll_meter(&mut bus, &mut st, &s, false)
            .await
            .unwrap()
            .is_none(),
        "not asked again at once"
    );
    assert_eq!(sim.handle.requests(a), asked);
    sim.handle.set_faults(
        a,
        Faults {
            error_reply: true,
            ..Default::default()
        },
    );
    retry_pause().await;
    let refused = poll_meter(&mut bus, &mut st, &s, false).await.unwrap();
    assert!(refused.unwrap().readings.is_empty());
    assert!(sim.handle.requests(a) > asked, "asked again the same day");

    // Answering at last, but a sink refuses the readings (uplink spool
    // full): the day is not done, the block is read again.
    sim.handle.set_faults(a, Faults::default());
    retry_pause().await;
    let read = poll_meter(&mut bus, &mut st, &s, false)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read.readings.len(), 5);
    let daily = read.daily.expect("a complete daily read awaits its sinks");
    st.settle_daily(&daily, false, &s, "gw");
    let refused_at = sim.handle.requests(a);
    assert!(
        poll_meter(&mut bus, &mut st, &s, false)
            .await
            .unwrap()
            .is_none(),
        "retried after the pause, not at once"
    );
    retry_pause().await;
    let again = poll_meter(&mut bus, &mut st, &s, false)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.readings.len(), 5);
    assert!(
        sim.handle.requests(a) > refused_at,
        "read again the same day"
    );

    // Stored this time: the day is done.
    st.settle_daily(&again.daily.unwrap(), true, &s, "gw");
    let done = sim.handle.requests(a);
    retry_pause().await;
    assert!(poll_meter(&mut bus, &mut st, &s, false)
        .await
        .unwrap()
        .is_none());
    assert_eq!(sim.handle.requests(a), done);
}
