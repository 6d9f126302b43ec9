//! `meterflow bill`: the batch bill run.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::billing::run::{bill_run, BillRunOptions};

/// Bill every account for one period from the readings lake.
///
/// Writes `bills.parquet`, `bill_lines.parquet`, `exceptions.parquet`,
/// `arrears.parquet` (postpaid accounts' unpaid bills and payments at the
/// period's last day, for the next run's late fees) and `manifest.json` into
/// RUN_DIR, committed atomically (the directory appears
/// whole or not at all). Running again into a RUN_DIR that holds an issued run
/// writes `RUN_DIR/revision-N/` with adjustment lines against the issued bills;
/// the issued run is never rewritten. Same inputs give byte-identical Parquet.
/// Files and flags: docs/billing.md.
#[derive(Debug, clap::Args)]
pub struct BillArgs {
    /// Readings lake root (holds `readings/date=YYYY-MM-DD/`).
    #[arg(long)]
    pub lake: PathBuf,
    /// Master data folder with meters.csv and accounts.csv.
    #[arg(long)]
    pub master: PathBuf,
    /// Tariff folder (`*.toml`, calendars in `calendars/`).
    #[arg(long, default_value = "tariffs")]
    pub tariffs: PathBuf,
    /// Bill period in local time: `2026-10`, or `2026-10-05..2026-11-19` (end exclusive).
    #[arg(long)]
    pub period: String,
    /// Run directory to create (or holding the issued run, for a re-run).
    #[arg(long)]
    pub out: PathBuf,
    /// Compute everything and print the summary, but write nothing.
    #[arg(long)]
    pub preview: bool,
    /// An earlier run directory (repeatable): its postpaid bills still unpaid
    /// after their due date, net of `payments.csv` in --master, bear late-payment
    /// fees on this bill (the tariff's `[version.late_fee]` rule); its bills
    /// ending where this period starts carry annual-tier positions forward.
    /// Each month, the previous month's run is enough: its `arrears.parquet`
    /// carries the unpaid bills forward (e.g. `--previous runs/2026-09` for
    /// 2026-10). Several runs must be consecutive; runs written before
    /// `arrears.parquet` existed need every run since the accounts' first
    /// bills. A payment back-dated before the carried state, or a revision
    /// after it, stops the run with the accounts named and the runs to give.
    #[arg(long, value_name = "RUN_DIR")]
    pub previous: Vec<PathBuf>,
    /// Bound memory: hold the meter states of at most N meters at once.
    /// Accounts (in id order) are billed in passes of whole runs of 8,192
    /// accounts, each pass reading only the lake pages that hold its meters;
    /// 600-800 bytes per meter. A rest of at most N/8 meters joins the last
    /// pass rather than making one of its own. The outputs are the same for
    /// any N.
    #[arg(long, value_name = "N", default_value_t = crate::billing::run::DEFAULT_PASS_METERS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub pass_meters: usize,
    /// A fleet's first run, switching from another billing system: payments
    /// in payments.csv dated on or before DATE (YYYY-MM-DD) settled bills
    /// issued before meterflow. They are counted in the arrears state, not
    /// credited to this run's bills (without it, every payment in the file
    /// counts as credit). What accounts still owed at the switch, or had in
    /// credit, is read from MASTER/opening_balances.csv when present (unpaid
    /// bills of the system before, with their due dates: they bear late fees
    /// and are paid oldest first); DATE must then be the day before the
    /// period. Not with --previous; a re-run keeps the issued run's value
    /// (giving another is refused).
    #[arg(long, value_name = "DATE")]
    pub settled_through: Option<chrono::NaiveDate>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: BillArgs) -> anyhow::Result<ExitCode> {
    let bar = super::progress::bar(0, "reading lake");
    let pb = bar.clone();
    let mut opts = BillRunOptions::new(&a.lake, &a.master, &a.tariffs, &a.period, &a.out);
    opts.preview = a.preview;
    opts.pass_meters = a.pass_meters;
    opts.previous = a.previous.clone();
    opts.settled_through = a.settled_through;
    opts.progress = Some(Box::new(move |phase, done, total| {
        pb.set_message(phase);
        pb.set_length(total);
        pb.set_position(done);
    }));
    let s = bill_run(&opts)?;
    bar.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(ExitCode::SUCCESS);
    }
    let what = if s.preview {
        "preview (nothing written)"
    } else if s.revision > 0 {
        "re-run (adjustments)"
    } else {
        "bill run"
    };
    println!("{what} {} for period {}", s.run_id, s.period);
    println!("  accounts      {}", s.accounts);
    println!(
        "  bills         {} ({} estimated)",
        s.bills, s.estimated_bills
    );
    println!("  exceptions    {}", s.exceptions);
    println!("  bill lines    {}", s.lines);
    println!(
        "  total         {} CNY for {} kWh",
        s.total_amount, s.total_kwh
    );
    if let Some(o) = &s.opening_balances {
        println!(
            "  opening       {} account(s): {} CNY owed, {} CNY credit at the switch",
            o.accounts, o.owed, o.credit
        );
    }
    if s.revision > 0 {
        println!(
            "  adjusted      {} account(s), {} CNY against the issued run",
            s.adjusted_accounts, s.adjustment_amount
        );
    }
    println!(
        "  readings      {} from {} lake file(s)",
        s.readings, s.files_read
    );
    for o in &s.outputs {
        println!(
            "  {:<20} {:>9} rows  sha256 {}",
            o.name,
            o.rows,
            &o.sha256[..16]
        );
    }
    match &s.dir {
        Some(d) => println!("  committed to  {}", d.display()),
        None => println!("  (preview: run without --preview to commit)"),
    }
    println!("  elapsed       {:.2} s", s.elapsed_ms as f64 / 1000.0);
    Ok(ExitCode::SUCCESS)
}
