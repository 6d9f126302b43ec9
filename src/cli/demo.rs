//! `meterflow demo`: the whole chain on simulated meters, on built-in defaults.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::collector::config::{CollectorConfig, MeterConfig};
use crate::collector::modbus::{ModbusConnectionConfig, ModbusDeviceConfig};
use crate::protocol::dlt645::{Address, Edition};
use crate::sim::fleet::{self, FleetOptions};
use crate::store::inspect;

/// Arguments of `meterflow demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Folder for every demo output (default: a new folder under the system temp dir, kept afterwards).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Meters in the simulated fleet.
    #[arg(long, default_value_t = 500)]
    pub meters: usize,
}

pub fn run(a: DemoArgs) -> anyhow::Result<ExitCode> {
    let out = match a.out {
        Some(p) => p,
        None => tempfile::Builder::new()
            .prefix("meterflow-demo-")
            .tempdir()?
            .keep(),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    println!("meterflow demo -> {}", out.display());

    // 1. A month of readings from a simulated fleet, into the lake.
    let fleet_dir = out.join("fleet");
    let mut o = FleetOptions::new(&fleet_dir);
    o.meters = a.meters;
    o.anomaly_per_mille = 30;
    let s = fleet::generate(&o, &|_, _| {}).context("simulating the fleet")?;
    println!(
        "  [fleet]   {} meters, {} readings -> {}/readings (master data in {})",
        s.meters, s.readings, s.lake_dir, s.master_dir
    );
    let r = inspect::inspect(&fleet_dir)?;
    println!(
        "  [lake]    {} partitions, {} files, {} rows, {} meters, {} .. {}  (meterflow store inspect {})",
        r.partitions.len(),
        r.files,
        r.rows,
        r.meters,
        r.first_ts.as_deref().unwrap_or("-"),
        r.last_ts.as_deref().unwrap_or("-"),
        fleet_dir.display()
    );
    // 2. Simulated DL/T 645 and Modbus meters on loopback, read by the collector.
    let field_lake = out.join("field-lake");
    let rt = tokio::runtime::Runtime::new()?;
    let c = rt.block_on(collect_from_simulators(&field_lake))?;
    println!(
        "  [collect] {} readings from {} of {} DL/T 645 meters (TCP gateway) and {} Modbus meters (TCP) -> {}/readings",
        c.readings,
        c.dlt645_answered,
        c.dlt645_meters,
        c.modbus_meters,
        field_lake.display()
    );
    for p in &c.problems {
        println!("  [collect]   problem: {p}");
    }

    // 2b. MQTT: readings published as canonical JSON, ingested through the broker.
    let mqtt_url = std::env::var("MQTT_URL").unwrap_or_else(|_| "mqtt://127.0.0.1:1883".into());
    if rt.block_on(crate::ingest::mqtt::broker_reachable(&mqtt_url)) {
        let now = crate::model::now_ms();
        let readings: Vec<crate::model::Reading> = (0..100)
            .map(|i| crate::model::Reading {
                meter_id: format!("MQ{:010}", i % 10),
                ts_ms: now - (i / 10) as i64 * 900_000,
                channel: crate::model::Channel::ImportActiveTotal,
                value: rust_decimal::Decimal::new(1_000_000 + i as i64 * 37, 2),
                quality: crate::model::Quality::OK,
                source: crate::model::Source {
                    protocol: crate::model::Protocol::Mqtt,
                    collector: "demo".into(),
                    address: "meters/demo".into(),
                },
                received_ms: now,
            })
            .collect();
        let m = rt
            .block_on(crate::ingest::mqtt::demo_publish_and_ingest(
                &mqtt_url,
                &field_lake,
                &readings,
            ))
            .context("MQTT ingest")?;
        println!(
            "  [mqtt]    {} messages, {} readings ingested via {mqtt_url} (QoS 1, acked after durable), {} dead letters -> {}/readings",
            m.messages,
            m.readings,
            m.dead_letters,
            field_lake.display()
        );
    } else {
        println!("  [mqtt]    skipped: no broker at {mqtt_url} (set MQTT_URL, or start mosquitto)");
    }

    // 3. The October bill run over the lake, then its HTML report.
    let runs = out.join("runs");
    let bill = crate::billing::run::bill_run(&crate::billing::run::BillRunOptions::new(
        &fleet_dir,
        fleet_dir.join("master"),
        tariffs_dir(),
        "2026-10",
        runs.join("2026-10"),
    ))
    .context("bill run")?;
    println!(
        "  [bill]    period {}: {} bills ({} on estimates), {} exceptions, {} lines, {} kWh, {} yuan -> {}",
        bill.period,
        bill.bills,
        bill.estimated_bills,
        bill.exceptions,
        bill.lines,
        bill.total_kwh,
        bill.total_amount,
        bill.dir.as_deref().unwrap_or(&runs).display()
    );

    // 4. Prepayment: top-ups, daily deductions through month end, alerts.
    let prepay_out = out.join("prepay");
    let master = fleet_dir.join("master");
    let tariffs = tariffs_dir();
    let inputs = crate::prepay::demo::Inputs::load(&fleet_dir, &master, &tariffs)
        .context("prepayment demo inputs")?;
    let p = crate::prepay::demo::run(&inputs, &prepay_out).context("prepayment demo")?;
    for line in p.to_string().lines() {
        println!("  [prepay]  {line}");
    }
    // 4b. The same prepaid fleet switching to meterflow mid-month.
    let sw = crate::prepay::demo::switch(
        &inputs,
        &prepay_out.join("switch"),
        o.start + chrono::Duration::days(15),
        &p.ledger,
    )
    .context("prepaid switch demo")?;
    for line in sw.to_string().lines() {
        println!("  [switch]  {line}");
    }

    // 5. The run report: one self-contained HTML file.
    let run_dir = bill.dir.clone().unwrap_or_else(|| runs.join("2026-10"));
    let report =
        crate::report::write_report(&run_dir, &out.join("report.html")).context("run report")?;
    println!("  [report]  {}", report.display());

    println!("done: every output is under {}", out.display());
    // The chain ran, but a simulated meter that did not answer is worth a look.
    Ok(if c.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!("(exit code 2: the collector reported problems above)");
        ExitCode::from(2)
    })
}

/// The `tariffs/` folder of the source tree, or `./tariffs` when run elsewhere.
fn tariffs_dir() -> PathBuf {
    let here = PathBuf::from("tariffs");
    if here.is_dir() {
        return here;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tariffs")
}

struct Collected {
    readings: u64,
    dlt645_meters: usize,
    dlt645_answered: usize,
    modbus_meters: usize,
    /// Bus errors, silent meters, failed Modbus connections.
    problems: Vec<String>,
}

/// Starts simulated meters on loopback ports and runs one collector cycle against them.
async fn collect_from_simulators(lake: &std::path::Path) -> anyhow::Result<Collected> {
    let any: std::net::SocketAddr = "127.0.0.1:0".parse()?;
    let dlt = crate::sim::dlt645::spawn_tcp(crate::sim::dlt645::SimFile::demo(5), any).await?;
    let profiles = ["chint_dtsu666", "eastron_sdm630", "acrel_adl400"];
    let sim_devices = profiles
        .iter()
        .enumerate()
        .map(|(i, p)| crate::sim::modbus::SimDeviceConfig::new(i as u8 + 1, p))
        .collect();
    let (mb_addr, mb_task) = crate::sim::modbus::spawn_tcp(sim_devices, any).await?;
    let meters = (1..=5)
        .map(|i| MeterConfig {
            address: Address::from_index(i),
            meter_id: None,
            edition: Edition::V2007,
            group: None,
        })
        .collect();
    let mut cfg = CollectorConfig::single_tcp_bus("demo", "gw-1", dlt.addr, meters);
    let devices = profiles
        .iter()
        .enumerate()
        .map(|(i, p)| ModbusDeviceConfig::with_profile(&format!("MB{:010}", i + 1), i as u8 + 1, p))
        .collect();
    cfg.modbus
        .push(ModbusConnectionConfig::tcp("mb-gw", mb_addr, devices));
    let stats = crate::collector::run::collect_once(cfg, lake).await?;
    dlt.task.abort();
    mb_task.abort();
    let mut problems: Vec<String> = Vec::new();
    for b in &stats.buses {
        if let Some(e) = &b.error {
            problems.push(format!("bus {}: {e}", b.bus));
        }
        if !b.meters_silent.is_empty() {
            problems.push(format!(
                "bus {}: silent meters {}",
                b.bus,
                b.meters_silent.join(", ")
            ));
        }
    }
    problems.extend(stats.modbus_errors.iter().map(|e| format!("modbus {e}")));
    Ok(Collected {
        readings: stats.readings,
        dlt645_meters: 5,
        dlt645_answered: stats.buses.iter().map(|b| b.meters_answered).sum(),
        modbus_meters: profiles.len(),
        problems,
    })
}
