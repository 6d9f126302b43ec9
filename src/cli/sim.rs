use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use chrono::NaiveDate;

use super::progress;
use crate::sim::fleet::{self, FleetOptions};

#[derive(Debug, clap::Subcommand)]
pub enum SimCmd {
    /// Generate a deterministic synthetic fleet: master data + register readings in a lake.
    ///
    /// Writes DIR/master/{meters,accounts,payments}.csv and
    /// DIR/readings/date=YYYY-MM-DD/*.parquet with daily snapshots (local midnight)
    /// of import_active_total and tariff registers t1..t4; industrial meters add
    /// reactive energy and max demand. A small share of meters carries anomalies
    /// (gaps, backwards readings, spikes, rollover, meter exchanges) for VEE to find.
    ///
    /// Example: meterflow sim fleet --meters 1000000 --days 31 --start 2026-10-01 --out /tmp/fleet
    Fleet(FleetArgs),
    /// Simulated Modbus meters (built-in profiles) over TCP, RTU over TCP and a pty.
    Modbus(super::sim_modbus::SimModbusArgs),
    /// Simulated DL/T 645 meters behind one TCP port (transparent gateway) or on a pty.
    Dlt645(super::sim_dlt645::SimDlt645Args),
}

#[derive(Debug, clap::Args)]
pub struct FleetArgs {
    /// Number of meters (one account each; exchanges add a second meter).
    #[arg(long, default_value_t = 300)]
    pub meters: usize,
    /// Days of consumption; days+1 daily snapshots are written so the period can be billed.
    #[arg(long, default_value_t = 31)]
    pub days: u32,
    /// First day (local date), YYYY-MM-DD.
    #[arg(long, default_value = "2026-10-01")]
    pub start: NaiveDate,
    /// Random seed: the same seed and options give the same fleet.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Output folder (lake root; master data goes to OUT/master).
    #[arg(long)]
    pub out: PathBuf,
    /// Also write 15-minute interval profiles (96 rows per meter-day; use for small fleets).
    ///
    /// A local day's intervals add up exactly to its import_active_total
    /// advance, and t1..t4 then take the energy of their TOU hours (the
    /// gd-tou-commercial table), so intervals and tariff registers agree.
    /// Each row is filed under the UTC date of its own timestamp.
    #[arg(long)]
    pub interval: bool,
    /// Meters with an anomaly, per mille.
    #[arg(long, default_value_t = 10)]
    pub anomaly_per_mille: u32,
    /// Residential accounts on prepayment, percent.
    #[arg(long, default_value_t = 30)]
    pub prepaid_percent: u32,
    /// Local time offset from UTC in hours, -12 to 14 (snapshots are taken at
    /// local midnight). Interval profiles match TOU tariffs in Asia/Shanghai
    /// period by period only at 8.
    #[arg(long, default_value_t = 8, allow_negative_numbers = true,
          value_parser = clap::value_parser!(i32).range(-12..=14))]
    pub utc_offset_hours: i32,
    /// Postpaid accounts pay monthly bills with a steady habit (punctual,
    /// late, defaulting): payment history for the arrears backtest.
    #[arg(long)]
    pub payment_habits: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(c: SimCmd) -> anyhow::Result<ExitCode> {
    match c {
        SimCmd::Fleet(a) => fleet_cmd(a),
        SimCmd::Modbus(a) => super::sim_modbus::run(a),
        SimCmd::Dlt645(a) => super::sim_dlt645::run(a),
    }
}

fn fleet_cmd(a: FleetArgs) -> anyhow::Result<ExitCode> {
    let mut o = FleetOptions::new(&a.out);
    o.meters = a.meters;
    o.days = a.days;
    o.start = a.start;
    o.seed = a.seed;
    o.interval = a.interval;
    o.anomaly_per_mille = a.anomaly_per_mille;
    o.prepaid_percent = a.prepaid_percent;
    o.utc_offset_hours = a.utc_offset_hours;
    o.payment_habits = a.payment_habits;
    let bar = progress::bar(0, "generating fleet");
    let s = fleet::generate(&o, &|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .context("sim fleet failed")?;
    bar.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        println!(
            "fleet: {} meters, {} accounts, {} readings in {} files ({:.1} MB), {} payments, {:.2}s ({:.0} readings/s)",
            s.meters,
            s.accounts,
            s.readings,
            s.files,
            s.bytes as f64 / 1e6,
            s.payments,
            s.elapsed_ms as f64 / 1000.0,
            s.readings as f64 / (s.elapsed_ms.max(1) as f64 / 1000.0)
        );
        println!("  master data: {}", s.master_dir);
        println!("  readings:    {}/readings", s.lake_dir);
    }
    Ok(ExitCode::SUCCESS)
}
