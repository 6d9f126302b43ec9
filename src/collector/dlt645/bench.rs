//! Bus efficiency: how close the collector gets to the read rate a paced bus
//! allows. Simulated gateways (real TCP sockets on 127.0.0.1, bytes paced at
//! the baud rate, realistic meter turnaround) and the real bus poller.

use std::time::Duration;

use rust_decimal::Decimal;
use tokio::sync::{mpsc, watch};

use crate::collector::config::{BusConfig, ResolvedMeter, Schedule, When};
use crate::collector::dlt645::{run_bus, PollSettings};
use crate::protocol::dlt645::{Address, Di, Edition};
use crate::sim::dlt645::{spawn_tcp, SimFile, SimMeterConfig};

/// Bench knobs.
#[derive(Debug, Clone)]
pub struct BusBench {
    pub buses: usize,
    pub meters_per_bus: usize,
    pub baud: u32,
    pub turnaround_ms: u64,
    pub silent_gap_ms: u64,
    /// FE bytes before requests and replies.
    pub preamble: usize,
    pub duration: Duration,
}

/// What it measured.
#[derive(Debug, Clone)]
pub struct BusBenchResult {
    pub reads: u64,
    pub seconds: f64,
    pub reads_per_s: f64,
    /// Reads per second per bus that the wire allows (request + reply bytes at the baud rate).
    pub wire_bound_per_bus: f64,
    /// ... and with the meter turnaround, which no collector can avoid.
    pub wire_turnaround_bound_per_bus: f64,
    pub request_bytes: usize,
    pub reply_bytes: usize,
}

/// Runs the bench on 127.0.0.1.
pub async fn run(b: &BusBench) -> std::io::Result<BusBenchResult> {
    let di = Di::v2007(0x0001_0000);
    let (tx, mut rx) = mpsc::channel(1024);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = vec![];
    let mut sims = vec![];
    for bus_i in 0..b.buses {
        let meters: Vec<SimMeterConfig> = (0..b.meters_per_bus)
            .map(|i| {
                SimMeterConfig::new(
                    Address::from_index(bus_i * 1000 + i + 1),
                    Decimal::new(123_456, 2),
                )
            })
            .collect();
        let mut file = SimFile {
            meters,
            ..Default::default()
        };
        file.bus.baud = Some(b.baud);
        file.bus.turnaround_ms = b.turnaround_ms;
        file.bus.preamble = b.preamble;
        let sim = spawn_tcp(file, "127.0.0.1:0".parse().expect("literal")).await?;
        let mut cfg = BusConfig::new(&format!("bench-{bus_i}"), Some(sim.addr.to_string()), None);
        cfg.silent_gap_ms = b.silent_gap_ms;
        cfg.preamble = b.preamble;
        cfg.timeout_ms = 2000;
        let meters = (0..b.meters_per_bus)
            .map(|i| ResolvedMeter {
                address: Address::from_index(bus_i * 1000 + i + 1),
                meter_id: format!("B{bus_i}-{i}"),
                edition: Edition::V2007,
                schedules: vec![Schedule {
                    name: "bench".into(),
                    when: When::Every(Duration::ZERO),
                    dis: vec![di],
                    read_clock: false,
                }],
            })
            .collect();
        let settings = PollSettings {
            collector_id: "bench".into(),
            offset: chrono::FixedOffset::east_opt(8 * 3600).expect("valid offset"),
            skew_threshold: Duration::from_secs(60),
            time_sync: false,
            degrade_after_cycles: 3,
            degraded_interval: Duration::from_secs(600),
        };
        tasks.push(tokio::spawn(run_bus(
            cfg,
            meters,
            settings,
            tx.clone(),
            false,
            stop_rx.clone(),
        )));
        sims.push(sim);
    }
    drop(tx);
    // Warm up (connections, first cycle), then count.
    let warmup = Duration::from_secs(1);
    let start = tokio::time::Instant::now();
    let mut reads = 0u64;
    let mut counting_since = None;
    let end = start + warmup + b.duration;
    loop {
        tokio::select! {
            r = rx.recv() => match r {
                Some(msg) => {
                    let crate::collector::run::LakeMsg::Readings(batch) = msg else { continue };
                    if counting_since.is_some() {
                        reads += batch.len() as u64;
                    } else if start.elapsed() >= warmup {
                        counting_since = Some(tokio::time::Instant::now());
                        reads += batch.len() as u64;
                    }
                }
                None => break,
            },
            _ = tokio::time::sleep_until(end) => break,
        }
    }
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    for s in sims {
        s.task.abort();
    }
    let seconds = counting_since.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let request_bytes = b.preamble + 12 + 4;
    let reply_bytes = b.preamble + 12 + 8;
    let char_s = 11.0 / b.baud as f64;
    let wire = (request_bytes + reply_bytes) as f64 * char_s;
    Ok(BusBenchResult {
        reads,
        seconds,
        reads_per_s: reads as f64 / seconds.max(1e-9),
        wire_bound_per_bus: 1.0 / wire,
        wire_turnaround_bound_per_bus: 1.0 / (wire + b.turnaround_ms as f64 / 1000.0),
        request_bytes,
        reply_bytes,
    })
}
