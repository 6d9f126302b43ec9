//! `meterflow modbus`: inspect Modbus configuration and profiles, and measure
//! a loopback polling cycle.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;

use crate::collector::modbus::{load_file, ModbusConnectionConfig, ModbusDeviceConfig, Poller};
use crate::protocol::modbus::{plan, profiles, PlanOptions};
use crate::sim::modbus::{SimDeviceConfig, Simulator};

#[derive(Debug, clap::Subcommand)]
pub enum ModbusCmd {
    /// Print the request plan of every Modbus device in a collectors.toml.
    ///
    /// For each device: the reads the collector issues (area, start, count,
    /// registers covered, unused registers read to fill holes), against what
    /// one request per register would cost. Also validates the config: errors
    /// name file, line and field.
    ///
    /// Example: meterflow modbus plan --config sample-data/collectors-modbus.toml
    Plan(PlanArgs),
    /// List the built-in meter profiles and their registers.
    Profiles,
    /// Poll N simulated devices on loopback and report cycle times.
    ///
    /// Starts simulators on 127.0.0.1 (up to 200 unit ids per listener), polls
    /// every device once per cycle with coalesced requests, and prints p50/p99
    /// cycle time and the requests issued versus one request per register.
    ///
    /// Example: meterflow modbus bench --devices 1000 --cycles 20
    Bench(BenchArgs),
}

#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// The collectors config (only its [[modbus]] sections are read).
    #[arg(long)]
    pub config: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Simulated devices (profiles rotate through the built-in ones).
    #[arg(long, default_value_t = 1000)]
    pub devices: usize,
    /// Cycles to measure (after one warm-up cycle).
    #[arg(long, default_value_t = 20)]
    pub cycles: usize,
    /// Parallel requests (TCP connections) per simulated gateway.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Devices per simulated gateway (max 247).
    #[arg(long, default_value_t = 200)]
    pub per_gateway: usize,
}

pub fn run(c: ModbusCmd) -> anyhow::Result<ExitCode> {
    match c {
        ModbusCmd::Plan(a) => plan_cmd(a),
        ModbusCmd::Profiles => {
            for n in profiles::names() {
                let p = profiles::get(n)
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .context("profile")?;
                println!(
                    "{} — {} {}\n  source: {}",
                    p.name, p.vendor, p.model, p.source
                );
                for r in &p.registers {
                    println!(
                        "  {:<12} {:<8} {:#06x} {:<4} {:<9} scale {:<7} -> {}",
                        r.name,
                        r.area,
                        r.address,
                        r.data_type.name(),
                        r.order.name(match r.data_type.words() {
                            1 => 1,
                            w => w,
                        }),
                        r.scale,
                        r.channel.map(|c| c.as_str()).unwrap_or("-")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ModbusCmd::Bench(a) => bench_cmd(a),
    }
}

fn plan_cmd(a: PlanArgs) -> anyhow::Result<ExitCode> {
    let cfgs = match load_file(&a.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let mut total_req = 0usize;
    let mut total_regs = 0usize;
    let mut json = Vec::new();
    for c in &cfgs {
        let devs = c
            .resolve(&crate::protocol::modbus::FieldPath::default())
            .map_err(|e| anyhow::anyhow!("{}: {}", e.path, e.message))?;
        if !a.json {
            println!(
                "connection {} ({:?}, {} devices, {} in flight)",
                c.name,
                c.transport,
                devs.len(),
                c.concurrency()
            );
        }
        for d in &devs {
            total_req += d.requests.len();
            total_regs += d.registers.len();
            let single = plan(
                &d.registers,
                &PlanOptions {
                    one_per_field: true,
                    ..PlanOptions::default()
                },
            )
            .len();
            if a.json {
                json.push(serde_json::json!({
                    "connection": c.name, "meter_id": d.meter_id, "unit_id": d.unit_id,
                    "requests": d.requests.iter().map(|r| serde_json::json!({
                        "area": r.area.as_str(), "start": r.start, "count": r.count,
                        "registers": r.fields.iter().map(|f| d.registers[f.register].name.clone()).collect::<Vec<_>>(),
                        "unused": r.unused(&d.registers),
                    })).collect::<Vec<_>>(),
                    "one_per_register": single,
                }));
                continue;
            }
            println!(
                "  unit {:>3} meter {}: {} request(s) instead of {} (one per register)",
                d.unit_id,
                d.meter_id,
                d.requests.len(),
                single
            );
            for r in &d.requests {
                let names: Vec<&str> = r
                    .fields
                    .iter()
                    .map(|f| d.registers[f.register].name.as_str())
                    .collect();
                println!(
                    "    {:<14} start {:#06x} count {:>3} (unused {:>2}): {}",
                    r.area.as_str(),
                    r.start,
                    r.count,
                    r.unused(&d.registers),
                    names.join(" ")
                );
            }
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        println!(
            "total: {total_req} requests per cycle instead of {total_regs} (one per register)"
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn bench_cmd(a: BenchArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Runtime::new().context("starting tokio")?;
    rt.block_on(async move {
        let names = profiles::names();
        let per = a.per_gateway.clamp(1, 247);
        let gateways = a.devices.div_ceil(per);
        let mut pollers = Vec::new();
        let mut handles = Vec::new();
        let mut made = 0usize;
        for g in 0..gateways {
            let n = per.min(a.devices - made);
            let sims: Vec<SimDeviceConfig> = (0..n)
                .map(|k| SimDeviceConfig::new((k + 1) as u8, names[(made + k) % names.len()]))
                .collect();
            let profiles_of: Vec<String> = sims.iter().map(|s| s.profile.clone()).collect();
            let sim = Simulator::new(sims).map_err(|e| anyhow::anyhow!("{e}"))?;
            let (addr, h) = sim.spawn_tcp(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
            handles.push(h);
            let devices = profiles_of
                .iter()
                .enumerate()
                .map(|(k, p)| {
                    ModbusDeviceConfig::with_profile(&format!("B{:05}", made + k), (k + 1) as u8, p)
                })
                .collect();
            let mut cfg = ModbusConnectionConfig::tcp(&format!("gw{g}"), addr, devices);
            cfg.max_concurrency = Some(a.concurrency);
            pollers.push(Poller::new(cfg, "bench".into()).map_err(|e| anyhow::anyhow!("{e}"))?);
            made += n;
        }
        let planned: usize = pollers.iter().map(|p| p.planned_requests()).sum();
        let registers: usize = pollers
            .iter()
            .flat_map(|p| p.devices().iter().map(|d| d.registers.len()))
            .sum();
        let mut times = Vec::new();
        let mut readings = 0usize;
        for c in 0..=a.cycles {
            let t0 = Instant::now();
            let out = futures::future::join_all(pollers.iter_mut().map(|p| p.cycle(true))).await;
            let dt = t0.elapsed().as_secs_f64();
            if c > 0 {
                times.push(dt);
                readings = out.iter().map(|b| b.len()).sum();
            }
        }
        times.sort_by(|x, y| x.total_cmp(y));
        println!(
            "devices {} gateways {} concurrency/gateway {} cycles {}",
            a.devices, gateways, a.concurrency, a.cycles
        );
        println!(
            "requests/cycle {} (one per register: {}), readings/cycle {}",
            planned, registers, readings
        );
        println!(
            "cycle p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            percentile(&times, 0.5) * 1e3,
            percentile(&times, 0.99) * 1e3,
            times.last().copied().unwrap_or(0.0) * 1e3
        );
        handles.iter().for_each(|h| h.abort());
        Ok(ExitCode::SUCCESS)
    })
}
