//! `meterflow query`: answers for operators about one account.

use std::path::PathBuf;
use std::process::ExitCode;

use chrono::NaiveDate;

use crate::analytics::query;
use crate::analytics::Table;

/// Look up one account: consumption, bills or payments, as a table or JSON.
#[derive(Debug, clap::Subcommand)]
pub enum QueryCmd {
    /// Daily or monthly consumption of an account from the readings lake.
    Usage(UsageArgs),
    /// Bills of an account from every bill run under --runs.
    Bills(BillsArgs),
    /// Payments of an account from payments.csv.
    Payments(PaymentsArgs),
}

#[derive(Debug, clap::Args)]
pub struct Output {
    /// Print JSON (an array of objects; decimals as strings) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct UsageArgs {
    /// Account id.
    #[arg(long)]
    pub account: String,
    /// Readings lake root.
    #[arg(long)]
    pub lake: PathBuf,
    /// Master data folder (meters.csv maps meters to the account).
    #[arg(long)]
    pub master: PathBuf,
    /// First local day (inclusive).
    #[arg(long)]
    pub from: Option<NaiveDate>,
    /// Last local day (inclusive).
    #[arg(long)]
    pub to: Option<NaiveDate>,
    /// Sum per month instead of per day.
    #[arg(long)]
    pub monthly: bool,
    /// Offset of the local day from UTC (the days the bills use), e.g.
    /// +08:00 (China), -05:00.
    #[arg(long, default_value = "+08:00", allow_hyphen_values = true)]
    pub utc_offset: String,
    #[command(flatten)]
    pub out: Output,
}

#[derive(Debug, clap::Args)]
pub struct BillsArgs {
    /// Account id.
    #[arg(long)]
    pub account: String,
    /// Folder of bill run directories (or one run directory).
    #[arg(long)]
    pub runs: PathBuf,
    #[command(flatten)]
    pub out: Output,
}

#[derive(Debug, clap::Args)]
pub struct PaymentsArgs {
    /// Account id.
    #[arg(long)]
    pub account: String,
    /// Master data folder with payments.csv.
    #[arg(long)]
    pub master: PathBuf,
    #[command(flatten)]
    pub out: Output,
}

fn print(t: &Table, o: &Output) -> anyhow::Result<ExitCode> {
    if o.json {
        println!("{}", serde_json::to_string_pretty(&t.to_json())?);
    } else if t.rows() == 0 {
        println!("(no rows)");
    } else {
        print!("{}", t.to_text());
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run(c: QueryCmd) -> anyhow::Result<ExitCode> {
    match c {
        QueryCmd::Usage(a) => {
            let offset = crate::collector::config::parse_offset(&a.utc_offset)
                .map_err(|e| anyhow::anyhow!("--utc-offset: {e}"))?;
            let t = query::usage(
                &a.lake,
                &a.master,
                &a.account,
                a.from,
                a.to,
                a.monthly,
                offset.local_minus_utc(),
            )?;
            print(&t, &a.out)
        }
        QueryCmd::Bills(a) => print(&query::bills(&a.runs, &a.account)?, &a.out),
        QueryCmd::Payments(a) => print(&query::payments(&a.master, &a.account)?, &a.out),
    }
}
