//! Modbus collector against the simulator: real TCP sockets on 127.0.0.1 and
//! real pty pairs, every built-in profile, with injected faults.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use meterflow::collector::modbus::{
    run_connection, ModbusConnectionConfig, ModbusDeviceConfig, Poller, SerialConfig, Transport,
};
use meterflow::collector::run::LakeMsg;
use meterflow::model::{Channel, Protocol, Quality, Reading};
use meterflow::protocol::modbus::profiles;
use meterflow::sim::modbus::{FaultConfig, FaultKind, SimDeviceConfig, Simulator};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;

const PROFILES: [&str; 3] = ["chint_dtsu666", "eastron_sdm630", "acrel_adl400"];

fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn sims() -> Vec<SimDeviceConfig> {
    PROFILES
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut d = SimDeviceConfig::new(i as u8 + 1, p);
            d.values.insert(
                "import_active_total".into(),
                dec!(4321.5) + Decimal::from(i),
            );
            d
        })
        .collect()
}

fn device(unit: u8, profile: &str) -> ModbusDeviceConfig {
    ModbusDeviceConfig {
        meter_id: format!("M{unit}"),
        unit_id: unit,
        profile: Some(profile.to_string()),
        numbering: None,
        registers: vec![],
        max_hole: 50,
        max_registers_per_request: 125,
        one_request_per_field: false,
    }
}

fn connection(
    name: &str,
    transport: Transport,
    addr: Option<String>,
    serial: Option<String>,
) -> ModbusConnectionConfig {
    ModbusConnectionConfig {
        name: name.to_string(),
        transport,
        address: addr,
        serial: serial.map(|device| SerialConfig {
            device,
            baud: 9600,
            parity: "none".into(),
            data_bits: 8,
            stop_bits: 1,
        }),
        poll_interval_ms: 200,
        timeout_ms: 300,
        retries: 1,
        retry_backoff_ms: 20,
        max_concurrency: Some(2),
        pause_between_requests_ms: 0,
        pause_after_connect_ms: 0,
        close_after_cycle: false,
        drain_ms: 50,
        degrade_after_cycles: 2,
        degraded_poll_interval_ms: 60_000,
        devices: PROFILES
            .iter()
            .enumerate()
            .map(|(i, p)| device(i as u8 + 1, p))
            .collect(),
    }
}

/// Every channel of the profile, read with exactly the simulator's value.
fn assert_exact(sim: &Simulator, readings: &[Reading], unit: u8, profile: &str) {
    let p = profiles::get(profile).unwrap().unwrap();
    let got: BTreeMap<Channel, &Reading> = readings
        .iter()
        .filter(|r| r.meter_id == format!("M{unit}"))
        .map(|r| (r.channel, r))
        .collect();
    for reg in &p.registers {
        let Some(c) = reg.channel else { continue };
        let r = got
            .get(&c)
            .unwrap_or_else(|| panic!("{profile}: no reading for {c} (register {})", reg.name));
        assert_eq!(Some(r.value), sim.value(unit, c), "{profile} {c}");
        assert_eq!(r.quality, Quality::OK, "{profile} {c}");
        assert_eq!(r.source.protocol, Protocol::Modbus);
    }
}

#[tokio::test]
async fn every_profile_is_read_exactly_over_modbus_tcp() {
    let sim = Simulator::new(sims()).unwrap();
    let (addr, _h) = sim.spawn_tcp(localhost()).await.unwrap();
    let mut p = Poller::new(
        connection("tcp", Transport::Tcp, Some(addr.to_string()), None),
        "it".into(),
    )
    .unwrap();
    let readings = p.cycle(true).await;
    for (i, prof) in PROFILES.iter().enumerate() {
        assert_exact(&sim, &readings, i as u8 + 1, prof);
    }
    assert_eq!(&*readings[0].source.address, "tcp/unit 1");
}

#[tokio::test]
async fn every_profile_is_read_exactly_over_rtu_on_a_pty() {
    let sim = Simulator::new(sims()).unwrap();
    let (path, _h) = sim.spawn_pty().unwrap();
    let cfg = connection(
        "bus",
        Transport::Rtu,
        None,
        Some(path.display().to_string()),
    );
    let mut p = Poller::new(cfg, "it".into()).unwrap();
    let readings = p.cycle(true).await;
    for (i, prof) in PROFILES.iter().enumerate() {
        assert_exact(&sim, &readings, i as u8 + 1, prof);
    }
}

#[tokio::test]
async fn every_profile_is_read_exactly_over_rtu_over_tcp() {
    let sim = Simulator::new(sims()).unwrap();
    let (addr, _h) = sim.spawn_rtu_over_tcp(localhost()).await.unwrap();
    let cfg = connection("gw", Transport::RtuOverTcp, Some(addr.to_string()), None);
    let mut p = Poller::new(cfg, "it".into()).unwrap();
    let readings = p.cycle(true).await;
    for (i, prof) in PROFILES.iter().enumerate() {
        assert_exact(&sim, &readings, i as u8 + 1, prof);
    }
}

#[tokio::test]
async fn collect_once_writes_the_simulated_values_exactly_into_the_lake() {
    let sim = Simulator::new(sims()).unwrap();
    let (addr, _h) = sim.spawn_tcp(localhost()).await.unwrap();
    let cfg = connection("tcp", Transport::Tcp, Some(addr.to_string()), None);
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    run_connection(cfg, "it-collector".into(), tx, true, stop_rx)
        .await
        .unwrap();
    let Some(LakeMsg::Readings(batch)) = rx.recv().await else {
        panic!("one batch of readings")
    };
    assert!(rx.recv().await.is_none(), "once means one cycle");

    let dir = tempfile::tempdir().unwrap();
    let mut lake =
        meterflow::store::Lake::open(dir.path(), meterflow::store::LakeOptions::new("it")).unwrap();
    lake.accept(&batch).unwrap();
    lake.flush().unwrap();
    let stored = meterflow::store::reader::read_all_readings(dir.path()).unwrap();
    assert_eq!(stored.len(), batch.len());
    for (i, prof) in PROFILES.iter().enumerate() {
        assert_exact(&sim, &stored, i as u8 + 1, prof);
    }
    assert!(stored
        .iter()
        .all(|r| &*r.source.collector == "it-collector"));
}

#[tokio::test]
async fn energy_registers_advance_between_cycles() {
    let mut d = SimDeviceConfig::new(1, "eastron_sdm630");
    d.energy_per_hour = dec!(36000); // 10 kWh per second
    let sim = Simulator::new(vec![d]).unwrap();
    let (addr, _h) = sim.spawn_tcp(localhost()).await.unwrap();
    let mut cfg = connection("tcp", Transport::Tcp, Some(addr.to_string()), None);
    cfg.devices.truncate(1);
    cfg.devices[0] = device(1, "eastron_sdm630");
    let mut p = Poller::new(cfg, "it".into()).unwrap();
    let energy = |rs: &[Reading]| {
        rs.iter()
            .find(|r| r.channel == Channel::ImportActiveTotal)
            .unwrap()
            .value
    };
    let first = energy(&p.cycle(true).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = energy(&p.cycle(true).await);
    assert!(second > first, "{second} should exceed {first}");
}

fn with_fault(mut devs: Vec<SimDeviceConfig>, unit: u8, f: FaultConfig) -> Vec<SimDeviceConfig> {
    devs[usize::from(unit) - 1].faults.push(f);
    devs
}

fn fault(kind: FaultKind) -> FaultConfig {
    FaultConfig {
        kind,
        code: None,
        every: 1,
        after: 0,
        delay_ms: 0,
        until: None,
    }
}

async fn dead_unit_keeps_the_others(transport: Transport) {
    let sim = Simulator::new(with_fault(sims(), 2, fault(FaultKind::Timeout))).unwrap();
    let cfg = match transport {
        Transport::Rtu => {
            let (path, h) = sim.spawn_pty().unwrap();
            std::mem::forget(h);
            connection("bus", transport, None, Some(path.display().to_string()))
        }
        _ => {
            let (addr, h) = sim.spawn_tcp(localhost()).await.unwrap();
            std::mem::forget(h);
            connection("tcp", transport, Some(addr.to_string()), None)
        }
    };
    let mut p = Poller::new(cfg, "it".into()).unwrap();
    let readings = p.cycle(true).await;
    assert_exact(&sim, &readings, 1, PROFILES[0]);
    assert_exact(&sim, &readings, 3, PROFILES[2]);
    assert!(readings.iter().all(|r| r.meter_id != "M2"));
    // the dead unit was tried once plus one retry, then abandoned for the cycle
    assert_eq!(sim.requests(2), 2);
}

#[tokio::test]
async fn one_dead_unit_never_drops_the_others_readings_on_tcp() {
    dead_unit_keeps_the_others(Transport::Tcp).await;
}

#[tokio::test]
async fn one_dead_slave_never_drops_the_others_readings_on_an_rtu_line() {
    dead_unit_keeps_the_others(Transport::Rtu).await;
}

#[tokio::test]
async fn a_failing_device_is_degraded_and_skipped_until_its_interval() {
    let sim = Simulator::new(with_fault(sims(), 3, fault(FaultKind::Timeout))).unwrap();
    let (addr, _h) = sim.spawn_tcp(localhost()).await.unwrap();
    let mut cfg = connection("tcp", Transport::Tcp, Some(addr.to_string()), None);
    cfg.retries = 0;
    let mut p = Poller::new(cfg, "it".into()).unwrap();
    p.cycle(false).await;
    p.cycle(false).await;
    assert!(p.health()[2].degraded);
    let tried = sim.requests(3);
    let readings = p.cycle(false).await;
    assert_eq!(sim.requests(3), tried, "degraded device is not polled");
    assert!(!p.health()[0].degraded);
    assert_exact(&sim, &readings, 1, PROFILES[0]);
}

#[tokio::test]
async fn exceptions_are_recorded_per_register_and_other_requests_still_read() {
    // the DTSU666 plan has two requests; every second one (energies) is refused
    let mut f = fault(FaultKind::Exception);
    f.code = Some(4);
    f.every = 2;
    let sim = Simulator::new(with_fault(sims(), 1, f)).unwrap();
    let (addr, _h) = sim.spawn_tcp(localhost()).await.unwrap();
    let mut cfg = connection("exc", Transport::Tcp, Some(addr.to_string()), None);
    cfg.devices.truncate(1);
    let mut p = Poller::new(cfg, "it".into()).unwrap();
    let readings = p.cycle(true).await;
    assert!(readings.iter().any(|r| r.channel == Channel::VoltageA));
    assert!(!readings
        .iter()
        .any(|r| r.channel == Channel::ImportActiveTotal));
    let n = meterflow::metrics::counter_value(
        "meterflow_modbus_exceptions_total",
        &[
            ("connection", "exc"),
            ("meter", "M1"),
            ("unit", "1"),
            ("register", "imp_ep"),
            ("code", "0x04"),
        ],
    );
    assert_eq!(n, 1);
}

#[tokio::test]
async fn garbage_reply_on_tcp_reconnects_and_the_retry_reads_exactly() {
    let mut f = fault(FaultKind::Garbage);
    f.until = Some(1);
    let sim = Simulator::new(with_fault(sims(), 1, f)).unwrap();
    let (addr, _h) = sim.spawn_tcp(localhost()).await.unwrap();
    let mut p = Poller::new(
        connection("tcp", Transport::Tcp, Some(addr.to_string()), None),
        "it".into(),
    )
    .unwrap();
    let readings = p.cycle(true).await;
    for (i, prof) in PROFILES.iter().enumerate() {
        assert_exact(&sim, &readings, i as u8 + 1, prof);
    }
    // garbage, the retry, then the energy request
    assert_eq!(sim.requests(1), 3);
}

#[tokio::test]
async fn late_reply_after_timeout_is_drained_not_taken_by_the_next_slave() {
    // unit 1 answers its first request 450 ms late; the collector gives up at
    // 300 ms and moves on to unit 2 on the same line. Undrained, the late reply
    // would arrive while unit 2's request is in flight.
    let mut f = fault(FaultKind::Slow);
    f.delay_ms = 450;
    f.until = Some(1);
    let sim = Simulator::new(with_fault(sims(), 1, f)).unwrap();
    let (path, _h) = sim.spawn_pty().unwrap();
    let mut cfg = connection(
        "late-rtu",
        Transport::Rtu,
        None,
        Some(path.display().to_string()),
    );
    cfg.retries = 0;
    cfg.drain_ms = 250;
    let mut p = Poller::new(cfg, "it".into()).unwrap();
    let readings = p.cycle(true).await;
    assert!(
        readings.iter().all(|r| r.meter_id != "M1"),
        "unit 1 timed out this cycle"
    );
    assert_exact(&sim, &readings, 2, PROFILES[1]);
    assert_exact(&sim, &readings, 3, PROFILES[2]);
    let errors = |unit: &str, kind: &str| {
        meterflow::metrics::counter_value(
            "meterflow_modbus_errors_total",
            &[
                ("connection", "late-rtu"),
                ("meter", &format!("M{unit}")),
                ("unit", unit),
                ("kind", kind),
            ],
        )
    };
    assert_eq!(errors("1", "timeout"), 1);
    assert_eq!(
        errors("2", "protocol"),
        0,
        "late reply of unit 1 was drained"
    );
    // the next cycle on the same line is in step for everyone
    let again = p.cycle(true).await;
    for (i, prof) in PROFILES.iter().enumerate() {
        assert_exact(&sim, &again, i as u8 + 1, prof);
    }
}

#[tokio::test]
async fn late_reply_after_timeout_on_tcp_is_not_taken_for_the_next_answer() {
    let mut f = fault(FaultKind::Slow);
    f.delay_ms = 450;
    f.until = Some(1);
    let sim = Simulator::new(with_fault(sims(), 1, f)).unwrap();
    let (addr, _h) = sim.spawn_tcp(localhost()).await.unwrap();
    let mut p = Poller::new(
        connection("tcp", Transport::Tcp, Some(addr.to_string()), None),
        "it".into(),
    )
    .unwrap();
    let readings = p.cycle(true).await;
    for (i, prof) in PROFILES.iter().enumerate() {
        assert_exact(&sim, &readings, i as u8 + 1, prof);
    }
    assert_eq!(
        sim.requests(1),
        3,
        "slow request, its retry, the energy request"
    );
}

#[tokio::test]
async fn nan_floats_are_counted_errors_not_readings() {
    let sim = Simulator::new(with_fault(sims(), 2, fault(FaultKind::Nan))).unwrap();
    let (addr, _h) = sim.spawn_tcp(localhost()).await.unwrap();
    let mut p = Poller::new(
        connection("nan", Transport::Tcp, Some(addr.to_string()), None),
        "it".into(),
    )
    .unwrap();
    let readings = p.cycle(true).await;
    assert!(
        readings.iter().all(|r| r.meter_id != "M2"),
        "every SDM630 register is a float"
    );
    assert_exact(&sim, &readings, 1, PROFILES[0]);
    let n = meterflow::metrics::counter_value(
        "meterflow_modbus_errors_total",
        &[
            ("connection", "nan"),
            ("meter", "M2"),
            ("unit", "2"),
            ("kind", "not_finite"),
        ],
    );
    assert_eq!(n, 18);
}

#[tokio::test]
async fn out_of_range_values_are_flagged_device_error() {
    let mut devs = sims();
    devs[1]
        .values
        .insert("power_factor_total".into(), dec!(1.5));
    let sim = Simulator::new(devs).unwrap();
    let (addr, _h) = sim.spawn_tcp(localhost()).await.unwrap();
    let mut p = Poller::new(
        connection("tcp", Transport::Tcp, Some(addr.to_string()), None),
        "it".into(),
    )
    .unwrap();
    let readings = p.cycle(true).await;
    let pf = readings
        .iter()
        .find(|r| r.meter_id == "M2" && r.channel == Channel::PowerFactorTotal)
        .unwrap();
    assert_eq!(pf.value, dec!(1.5));
    assert!(pf.quality.contains(Quality::DEVICE_ERROR));
}

#[tokio::test]
async fn one_request_per_field_issues_one_read_per_register() {
    let sim = Simulator::new(sims()).unwrap();
    let (addr, _h) = sim.spawn_tcp(localhost()).await.unwrap();
    let mut cfg = connection("tcp", Transport::Tcp, Some(addr.to_string()), None);
    cfg.devices[1].one_request_per_field = true;
    let mut p = Poller::new(cfg, "it".into()).unwrap();
    let readings = p.cycle(true).await;
    assert_exact(&sim, &readings, 2, PROFILES[1]);
    let regs = profiles::get(PROFILES[1]).unwrap().unwrap().registers.len() as u64;
    assert_eq!(sim.requests(2), regs);
    assert_eq!(sim.requests(1), 2);
}

#[test]
fn modbus_plan_prints_requests_against_one_per_register() {
    let out = std::process::Command::new(crate::common::bin())
        .args(["modbus", "plan", "--config"])
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/sample-data/collectors-modbus.toml"
        ))
        .output()
        .unwrap();
    let text = crate::common::stdout_of(&out, "meterflow modbus plan");
    assert!(
        text.contains("unit   1 meter MB-0001: 2 request(s) instead of 15"),
        "{text}"
    );
    assert!(text.contains("total:"), "{text}");
}

#[test]
fn modbus_plan_rejects_a_bad_config_with_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("collectors.toml");
    std::fs::write(
        &path,
        "[[modbus]]\nname = \"x\"\ntransport = \"tcp\"\naddress = \"127.0.0.1:502\"\n\n[[modbus.devices]]\nmeter_id = \"M\"\nunit_id = 1\nprofile = \"eastron_sdm999\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(crate::common::bin())
        .args(["modbus", "plan", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("collectors.toml:9: field `modbus[0].devices[0].profile`: unknown profile"),
        "{err}"
    );
}

#[tokio::test]
async fn device_refusing_reads_across_holes_is_read_field_by_field_with_every_value() {
    let mut devs = sims();
    for d in &mut devs {
        d.faults.push(fault(FaultKind::RefuseHoles));
    }
    let sim = Simulator::new(devs).unwrap();
    let (addr, _h) = sim.spawn_tcp(localhost()).await.unwrap();
    let cfg = connection("holes", Transport::Tcp, Some(addr.to_string()), None);
    let mut p = Poller::new(cfg, "it".into()).unwrap();
    let planned = p.planned_requests() as u64;

    let readings = p.cycle(true).await;

    for (i, prof) in PROFILES.iter().enumerate() {
        assert_exact(&sim, &readings, i as u8 + 1, prof);
    }
    let sent: u64 = (1..=3).map(|u| sim.requests(u)).sum();
    assert!(
        sent > planned,
        "some merged read spanned a hole and was split: {sent} requests for a plan of {planned}"
    );
    assert!(p
        .health()
        .iter()
        .all(|h| !h.degraded && h.failed_cycles == 0));
}

#[tokio::test]
async fn undecodable_registers_are_quarantined_in_the_lake_with_their_words() {
    let sim = Simulator::new(with_fault(sims(), 2, fault(FaultKind::Nan))).unwrap();
    let (addr, _h) = sim.spawn_tcp(localhost()).await.unwrap();
    let mut cfg = meterflow::collector::config::CollectorConfig::parse(
        std::path::Path::new("it.toml"),
        "collector_id = \"it-modbus\"\n",
    )
    .unwrap();
    cfg.modbus = vec![connection(
        "nanq",
        Transport::Tcp,
        Some(addr.to_string()),
        None,
    )];
    let lake = tempfile::tempdir().unwrap();

    let stats = meterflow::collector::run::collect_once(cfg, lake.path())
        .await
        .unwrap();

    let rows = crate::dlt645::quarantine_rows(lake.path());
    assert_eq!(rows.len(), 18, "one row per SDM630 float register");
    assert_eq!(stats.quarantined, 18);
    for (address, collector, reason, payload) in &rows {
        assert_eq!(address, "nanq/unit 2");
        assert_eq!(collector, "it-modbus");
        assert!(reason.starts_with("register "), "{reason}");
        // An SDM630 float is two words; NaN is 0x7FC00000 in ABCD order.
        assert_eq!(payload, &vec![0x7F, 0xC0, 0x00, 0x00], "{reason}");
    }
}

#[tokio::test]
async fn a_unit_the_gateway_cannot_reach_is_abandoned_for_the_cycle_and_marked_silent() {
    use meterflow::collector::modbus::poll::{poll_device, RetryPolicy};
    use meterflow::collector::modbus::transport::{Link, LinkSettings};
    // The simulator, as a TCP gateway, answers units it does not have with
    // exception 0x0B (gateway target device failed to respond).
    let sim = Simulator::new(sims()).unwrap();
    let (addr, _h) = sim.spawn_tcp(localhost()).await.unwrap();
    let mut cfg = connection("gw-0b", Transport::Tcp, Some(addr.to_string()), None);
    cfg.devices = vec![device(9, PROFILES[0]), device(1, PROFILES[0])];
    let p = Poller::new(cfg.clone(), "it".into()).unwrap();
    let (gone, there) = (&p.devices()[0], &p.devices()[1]);
    assert!(gone.requests.len() > 1, "a plan of several requests");
    let mut link = Link::new(LinkSettings::from_config(&cfg));
    let policy = RetryPolicy {
        retries: cfg.retries,
        backoff: Duration::from_millis(cfg.retry_backoff_ms),
        pause_between_requests: Duration::ZERO,
    };

    let out = poll_device(&mut link, gone, &policy, "gw-0b", "it").await;

    assert!(out.silent);
    assert_eq!(
        out.errors.len(),
        1,
        "asked once, then abandoned: {:?}",
        out.errors
    );
    assert!(out.errors[0].1.contains("0x0b"), "{:?}", out.errors);
    assert_eq!(out.requests_failed as usize, gone.requests.len());
    let ok = poll_device(&mut link, there, &policy, "gw-0b", "it").await;
    assert!(!ok.silent && ok.errors.is_empty(), "{:?}", ok.errors);
    assert_exact(&sim, &ok.readings, 1, PROFILES[0]);
}

#[tokio::test]
async fn a_reply_with_the_wrong_register_count_is_a_short_reply_not_a_panic() {
    use meterflow::collector::modbus::transport::{Link, LinkSettings, ReadError};
    use meterflow::protocol::modbus::{pdu, Area, ReadRequest};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(localhost()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let line = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut req = [0u8; 8];
        s.read_exact(&mut req).await.unwrap();
        // One register (a stale reply) to a two-register read.
        let mut reply = vec![0x01, 0x03, 0x02, 0x00, 0x01];
        reply.extend_from_slice(&pdu::crc16(&reply).to_le_bytes());
        s.write_all(&reply).await.unwrap();
        (req, s)
    });
    let cfg = connection("stale", Transport::RtuOverTcp, Some(addr.to_string()), None);
    let mut link = Link::new(LinkSettings::from_config(&cfg));
    let req = ReadRequest {
        area: Area::Holding,
        start: 0,
        count: 2,
        fields: vec![],
    };

    let got = link.read(1, &req).await;

    assert_eq!(got, Err(ReadError::ShortReply { want: 2, got: 1 }));
    let (sent, _s) = line.await.unwrap();
    assert_eq!(sent[..6], [0x01, 0x03, 0x00, 0x00, 0x00, 0x02]);
}
