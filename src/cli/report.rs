//! `meterflow report`: the run report as one HTML file.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::report::{write_report_with, ReportOptions};

/// Write the report of a bill run: one self-contained HTML file (inline SVG
/// charts and CSS, no scripts, no external assets; opens offline).
///
/// Sections: summary, consumption distribution, tiers, time-of-use shares,
/// bills by customer class, month-over-month / year-over-year change with top
/// movers (earlier runs next to RUN_DIR), estimated bills and exceptions by
/// reason, collection success per collector and bus (from the lake), prepaid
/// balances and alerts (from --ledger / --alerts), arrears.
///
/// Master data (classes, prepaid accounts, arrears) comes from --master or
/// the folder named in the run's manifest. When none is found there, those
/// sections say so and name the path tried; a master file that exists but
/// cannot be read stops the report with an error naming the file (bad rows
/// are left out and counted in a note, as in the bill run).
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// Bill run directory (holds manifest.json, bills.parquet, ...).
    pub run_dir: PathBuf,
    /// Where to write the HTML file.
    #[arg(long, default_value = "report.html")]
    pub out: PathBuf,
    /// Master data folder (accounts.csv, meters.csv, optional payments.csv);
    /// default: the folder named in the run's manifest, which is stored as
    /// given to `bill` (a relative path resolves against the current folder).
    #[arg(long)]
    pub master: Option<PathBuf>,
    /// Readings lake root; default: the master folder's parent when it holds `readings/`.
    #[arg(long)]
    pub lake: Option<PathBuf>,
    /// `meterflow analyze` output folder: collection and fleet figures come
    /// from it instead of a scan of the lake (fast on large fleets).
    #[arg(long)]
    pub analytics: Option<PathBuf>,
    /// Ledger export (Parquet with account_id and amount) for prepaid balances.
    #[arg(long)]
    pub ledger: Option<PathBuf>,
    /// Alerts dataset (folder of Parquet files with a `kind` column).
    #[arg(long)]
    pub alerts: Option<PathBuf>,
}

pub fn run(a: ReportArgs) -> anyhow::Result<ExitCode> {
    let mut opts = ReportOptions::new(&a.run_dir, &a.out);
    opts.master = a.master;
    opts.lake = a.lake;
    opts.analytics = a.analytics;
    opts.ledger = a.ledger;
    opts.alerts = a.alerts;
    let t0 = std::time::Instant::now();
    let path = write_report_with(&opts)?;
    println!(
        "report written to {} in {} ms",
        path.display(),
        t0.elapsed().as_millis()
    );
    Ok(ExitCode::SUCCESS)
}
