use std::path::PathBuf;
use std::process::ExitCode;

use crate::master::{self, RowError};

#[derive(Debug, clap::Subcommand)]
pub enum MasterCmd {
    /// Validate master data files and report every bad row with file, line and field.
    ///
    /// Checks meters.csv, accounts.csv and payments.csv in DIR (each optional),
    /// and cross-checks that every meter's account exists. Exit code 0 when
    /// every file loaded (bad rows are reported and skipped), 1 when a file
    /// has no usable row left, 2 when a file cannot be read at all.
    Check {
        /// Master data folder (e.g. sample-data/master).
        dir: PathBuf,
    },
}

pub fn run(c: MasterCmd) -> anyhow::Result<ExitCode> {
    let MasterCmd::Check { dir } = c;
    let mut worst = 0u8;
    let report = |name: &str, rows: usize, errors: &[RowError]| -> u8 {
        println!("{name}: {rows} rows loaded, {} rejected", errors.len());
        for e in errors {
            println!("  {e}");
        }
        u8::from(rows == 0 && !errors.is_empty())
    };
    let mut accounts = std::collections::HashSet::new();
    let mut meters_accounts = Vec::new();
    for file in [
        master::ACCOUNTS_FILE,
        master::METERS_FILE,
        master::PAYMENTS_FILE,
    ] {
        let path = dir.join(file);
        if !path.exists() {
            println!("{file}: not present");
            continue;
        }
        let result = match file {
            master::ACCOUNTS_FILE => master::load_accounts(&path).map(|l| {
                accounts.extend(l.rows.iter().map(|a| a.account_id.clone()));
                (l.rows.len(), l.errors)
            }),
            master::METERS_FILE => master::load_meters(&path).map(|l| {
                meters_accounts.extend(
                    l.rows
                        .iter()
                        .map(|m| (m.meter_id.clone(), m.account_id.clone())),
                );
                (l.rows.len(), l.errors)
            }),
            _ => master::load_payments(&path).map(|l| (l.rows.len(), l.errors)),
        };
        match result {
            Ok((rows, errors)) => worst = worst.max(report(file, rows, &errors)),
            Err(e) => {
                println!("{file}: unreadable: {e}");
                worst = 2;
            }
        }
    }
    if !accounts.is_empty() {
        let orphans: Vec<_> = meters_accounts
            .iter()
            .filter(|(_, a)| !accounts.contains(a))
            .collect();
        for (m, a) in orphans.iter().take(20) {
            println!("  meter {m}: account {a} is not in accounts.csv");
        }
        if !orphans.is_empty() {
            println!("{} meters refer to unknown accounts", orphans.len());
        }
    }
    Ok(ExitCode::from(worst))
}
