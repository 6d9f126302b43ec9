//! `meterflow analyze`: decision-support datasets as Parquet.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use rust_decimal::Decimal;

use crate::analytics::{analyze, AnalyzeOptions};
use crate::privacy::{AccountKey, Pseudonymizer, SECRET_ENV};

/// Compute the analytics datasets (peak periods, usage habits, history and
/// segment change, payment habits, arrears risk with backtest, outage events,
/// staged usage warnings, collection success) into OUT as Parquet.
///
/// Every file is meant for data teams: names, phones, ID numbers and
/// addresses are masked. With `--pseudonymize` account ids are replaced by a
/// keyed hash (HMAC-SHA256) whose secret comes from `--secret-file` or the
/// METERFLOW_PSEUDONYM_SECRET environment variable, never the command line.
/// Raw personal data is written only with `--pii`, to `*.pii.parquet`.
/// Every column: docs/analytics.md.
#[derive(Debug, clap::Args)]
pub struct AnalyzeArgs {
    /// Readings lake root (holds `readings/date=YYYY-MM-DD/`).
    #[arg(long)]
    pub lake: PathBuf,
    /// Master data folder with meters.csv, accounts.csv and payments.csv.
    #[arg(long)]
    pub master: PathBuf,
    /// Folder of bill run directories (or one run directory); gives bill dates and amounts.
    /// A run's `revision-N/` folders are read with the run: give the run folder,
    /// not a revision folder (refused).
    #[arg(long)]
    pub runs: Option<PathBuf>,
    /// Output folder for the datasets (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace account ids by a keyed hash (secret from --secret-file or METERFLOW_PSEUDONYM_SECRET).
    #[arg(long)]
    pub pseudonymize: bool,
    /// File holding the pseudonymization secret (16 bytes or more).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// Also write raw personal data, to files named `*.pii.parquet`.
    #[arg(long)]
    pub pii: bool,
    /// Day to compute staged warnings and risk scores for (YYYY-MM-DD); default: last day with data.
    #[arg(long)]
    pub as_of: Option<chrono::NaiveDate>,
    /// Monthly tier thresholds in kWh for residential staged warnings, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "240,400")]
    pub tiers: Vec<Decimal>,
    /// Warn when the projected month exceeds this multiple of the account's usual month.
    #[arg(long, default_value = "1.5")]
    pub usual_multiple: Decimal,
    /// Holiday calendar for the peak-period day types (tariffs/calendars
    /// format); default: tariffs/calendars/cn-holidays.toml when present.
    #[arg(long)]
    pub calendar: Option<PathBuf>,
    /// Cut-off day of the arrears backtest (YYYY-MM-DD); default: the latest
    /// bill date with an observable outcome and earlier history.
    #[arg(long)]
    pub backtest_cutoff: Option<chrono::NaiveDate>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: AnalyzeArgs) -> anyhow::Result<ExitCode> {
    if let Some(r) = &a.runs {
        // Before anything is written to --out.
        crate::analytics::inputs::check_runs(r).context("--runs")?;
    }
    let mut opts = AnalyzeOptions::new(&a.lake, &a.master, &a.out);
    opts.runs = a.runs.clone();
    opts.pii = a.pii;
    opts.as_of = a.as_of;
    opts.tiers_kwh = a.tiers.clone();
    opts.usual_multiple = a.usual_multiple;
    opts.backtest_cutoff = a.backtest_cutoff;
    opts.calendar = a.calendar.clone().or_else(|| {
        let d = PathBuf::from("tariffs/calendars/cn-holidays.toml");
        d.exists().then_some(d)
    });
    if opts.calendar.is_none() {
        // The default is relative to the working directory: say so, or a
        // run from elsewhere silently counts holidays as working days.
        tracing::warn!(
            "no holiday calendar (no --calendar, and no tariffs/calendars/cn-holidays.toml here): rest days are weekends only"
        );
    }
    if a.pseudonymize {
        let p = Pseudonymizer::from_file_or_env(a.secret_file.as_deref()).with_context(|| {
            format!("--pseudonymize needs a secret (--secret-file or {SECRET_ENV})")
        })?;
        opts.key = AccountKey::pseudonymized(p);
    } else if a.secret_file.is_some() {
        anyhow::bail!("--secret-file is only used with --pseudonymize");
    }
    let s = analyze(&opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "analytics for {} accounts from {} readings in {} ms",
        s.accounts, s.readings, s.elapsed_ms
    );
    for d in &s.datasets {
        println!(
            "  {:<18} {:>8} rows  {}{}",
            d.name,
            d.rows,
            d.path.display(),
            if d.pii { "  (RAW PERSONAL DATA)" } else { "" }
        );
    }
    // The backtest is small and tells whether the risk bands mean anything.
    if let Some(d) = s.datasets.iter().find(|d| d.name == "arrears_backtest") {
        let t = crate::analytics::Table::read_parquet(&d.path)?;
        println!("arrears backtest:\n{}", t.to_text());
    }
    Ok(ExitCode::SUCCESS)
}
