//! `meterflow demo`: the whole chain on simulated meters, on built-in defaults.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

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
    println!("done: every output is under {}", out.display());
    Ok(ExitCode::SUCCESS)
}
