//! `meterflow ledger ...`: the prepayment ledger (migrate, balances, history,
//! Parquet export, payment-file import, opening balances of a fleet
//! switching to meterflow).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::ledger;
use crate::prepay::alerts::Thresholds;
use crate::prepay::run::{Fleet, PrepayHook};

/// Where the ledger lives.
#[derive(Debug, clap::Args)]
pub struct LedgerArg {
    /// Ledger: a SQLite file (`prepay.sqlite`, `sqlite:PATH`) or PostgreSQL
    /// (`postgres://user@host:5432/db?schema=NAME`; the schema is created on migrate;
    /// the password from PGPASSWORD, never in the URL).
    #[arg(long, env = "METERFLOW_LEDGER", default_value = "prepay-ledger.sqlite")]
    pub ledger: String,
}

#[derive(Debug, clap::Subcommand)]
pub enum LedgerCmd {
    /// Create or upgrade the ledger tables (safe to run again).
    Migrate(LedgerArg),
    /// Print balances (one account, or all) and check each cached balance against the sum of its entries.
    ///
    /// Exit code 3 when a cached balance differs from the sum of entries.
    Balance {
        #[command(flatten)]
        l: LedgerArg,
        /// Account id; all accounts when omitted.
        account: Option<String>,
    },
    /// Print an account's entries, oldest first.
    History {
        #[command(flatten)]
        l: LedgerArg,
        account: String,
        /// Most entries to print.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Export every entry to one Parquet file (amount DECIMAL(20,4), for data teams).
    Export {
        #[command(flatten)]
        l: LedgerArg,
        /// Output file, e.g. out/ledger_entries.parquet (written atomically).
        #[arg(long)]
        out: PathBuf,
    },
    /// Credit payment-channel files (WeChat Pay, Alipay, bank, counter CSV: txn_id,channel,account_id,amount,paid_at).
    ///
    /// The channel's transaction id is the idempotency key: importing a file
    /// twice or overlapping files credits each payment once. A transaction id
    /// re-used with different content is rejected and reported, as is a bad
    /// row (file, line, field); the other rows are imported, and the exit
    /// code is 2 when any row was rejected. A payment made at or before its
    /// account's switch to meterflow (`import-balances`) is not credited:
    /// its opening balance holds it (printed, exit code unchanged).
    ImportPayments {
        #[command(flatten)]
        l: LedgerArg,
        /// Payment CSV files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Thresholds file: top-ups re-arm alert levels (built-in levels without one).
        #[arg(long)]
        thresholds: Option<PathBuf>,
        /// Master data folder (tariff and class of each account for per-class thresholds).
        #[arg(long)]
        master: Option<PathBuf>,
    },
    /// Open prepaid accounts switching from another system: their balances and tier positions at the switch.
    ///
    /// FILE is CSV `account_id,switched_at,balance[,position_kwh]`
    /// (docs/data-model.md): the balance (yuan, negative when overdrawn) the
    /// old system held at `switched_at` (RFC 3339, on a quarter hour), the
    /// instant of the last reading it deducted, and the kWh of the account's
    /// tier month or year consumed before it. Each account gets one
    /// `adjustment` entry (key `open:ACCOUNT`) and a cursor per meter at the
    /// switch (a register-priced meter's from its reading at that instant
    /// in the lake), in one transaction: `prepay run` and `stream` then deduct only what comes
    /// after, and `import-payments` does not credit the account's payments
    /// made at or before the switch. Run it once before the first
    /// `prepay run`; running it again changes nothing (but gives meters
    /// added to meters.csv since their cursor). Refused rows (with
    /// the reason) and bad rows make the exit code 2; the others are
    /// imported.
    ImportBalances {
        #[command(flatten)]
        l: LedgerArg,
        /// The opening-balances CSV.
        file: PathBuf,
        /// Readings lake (the meters' readings at the switch).
        #[arg(long)]
        lake: PathBuf,
        /// Master data folder (accounts.csv, meters.csv).
        #[arg(long)]
        master: PathBuf,
        /// Tariffs folder (accumulation windows, time-of-use registers).
        #[arg(long, default_value = "tariffs")]
        tariffs: PathBuf,
        /// Accounts per ledger transaction.
        #[arg(long, default_value_t = 1000)]
        chunk: usize,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: LedgerCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        LedgerCmd::Migrate(l) => {
            let mut led = ledger::open(&l.ledger)?;
            led.migrate()?;
            println!("migrated {}", led.describe());
            Ok(ExitCode::SUCCESS)
        }
        LedgerCmd::Balance { l, account } => {
            let mut led = ledger::open_migrated(&l.ledger)?;
            let checks = led.check()?;
            let mut bad = 0;
            for c in checks
                .iter()
                .filter(|c| account.as_ref().is_none_or(|a| *a == c.account_id))
            {
                let mark = if c.ok() && c.entries >= 0 {
                    "ok"
                } else {
                    "MISMATCH"
                };
                if mark != "ok" {
                    bad += 1;
                }
                println!(
                    "{:<16} {:>14} entries={:<6} sum={:<14} {mark}",
                    c.account_id,
                    c.cached,
                    c.entries.abs(),
                    c.sum
                );
            }
            if let Some(a) = &account {
                if !checks.iter().any(|c| &c.account_id == a) {
                    println!("{a:<16} {:>14} (no entries)", 0);
                }
            }
            Ok(if bad > 0 {
                ExitCode::from(3)
            } else {
                ExitCode::SUCCESS
            })
        }
        LedgerCmd::History {
            l,
            account,
            limit,
            json,
        } => {
            let mut led = ledger::open_migrated(&l.ledger)?;
            let mut bal = rust_decimal::Decimal::ZERO;
            for e in led.entries(Some(&account), 0, limit)? {
                bal += e.entry.amount;
                if json {
                    println!("{}", serde_json::to_string(&e)?);
                } else {
                    let ts = chrono::DateTime::from_timestamp_millis(e.entry.ts_ms)
                        .map(|t| t.to_rfc3339())
                        .unwrap_or_default();
                    println!(
                        "{:>6} {ts:<25} {:<10} {:>12} {:>12}  {:<11} {}",
                        e.seq, e.entry.kind, e.entry.amount, bal, e.entry.source, e.entry.key
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        LedgerCmd::Export { l, out } => {
            let mut led = ledger::open_migrated(&l.ledger)?;
            let n = ledger::export::export_parquet(led.as_mut(), &out)?;
            println!("exported {n} entries to {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        LedgerCmd::ImportPayments {
            l,
            files,
            thresholds,
            master,
        } => {
            let mut led = ledger::open_migrated(&l.ledger)?;
            let th = match &thresholds {
                Some(p) => Thresholds::load(p)?,
                None => Thresholds::builtin(),
            };
            let fleet = match &master {
                Some(m) => Fleet::load(m)?,
                None => Fleet::default(),
            };
            let hook = PrepayHook::new(&th, &fleet);
            let mut conflicts = 0;
            for f in &files {
                let r = crate::prepay::payments::import_file(led.as_mut(), f, &hook, 1000)
                    .with_context(|| format!("importing {}", f.display()))?;
                println!(
                    "{}: {} rows, {} credited, {} already credited (ignored), {} conflicts, {} bad rows, {} alerts",
                    f.display(),
                    r.rows,
                    r.credited,
                    r.duplicates,
                    r.conflicts.len(),
                    r.bad_rows.len(),
                    r.alerts
                );
                for b in &r.bad_rows {
                    eprintln!("bad row: {b}");
                }
                for (k, why) in &r.conflicts {
                    eprintln!("conflict: {k}: {why}");
                }
                if !r.before_switch.is_empty() {
                    println!(
                        "{}: {} payments made before their account's switch to meterflow, not credited (its opening balance holds them)",
                        f.display(),
                        r.before_switch.len()
                    );
                }
                for b in &r.before_switch {
                    eprintln!("not credited: {b}");
                }
                conflicts += r.conflicts.len() + r.bad_rows.len();
            }
            Ok(if conflicts > 0 {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            })
        }
        LedgerCmd::ImportBalances {
            l,
            file,
            lake,
            master,
            tariffs,
            chunk,
            json,
        } => {
            let mut led = ledger::open_migrated(&l.ledger)?;
            let fleet = Fleet::load(&master)?;
            let pricer =
                crate::prepay::pricing::TariffPricer::new(crate::tariff::load_dir(&tariffs)?);
            let r = crate::prepay::opening::import_file(
                led.as_mut(),
                &file,
                &fleet,
                &pricer,
                &lake,
                chunk,
            )
            .with_context(|| format!("importing {}", file.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{}: {} rows, {} accounts opened (balances {} yuan), {} already opened ({} meters added to them), {} refused, {} bad rows",
                    file.display(),
                    r.rows,
                    r.imported,
                    r.balance,
                    r.already,
                    r.meters_added,
                    r.refused.len(),
                    r.bad_rows.len()
                );
            }
            for b in &r.bad_rows {
                eprintln!("bad row: {b}");
            }
            for why in &r.refused {
                eprintln!("refused: {why}");
            }
            Ok(if r.refused.is_empty() && r.bad_rows.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
    }
}
