//! Demo hook: a fresh SQLite ledger, the master data's payments as top-ups,
//! a deduction run over the whole lake with the built-in thresholds, and the
//! alerts delivered to `OUT/alerts/`. Returns what happened, including one
//! prepaid account's alerts as it crossed its levels.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use rust_decimal::Decimal;

use super::alerts::{Alert, Thresholds};
use super::payments::import_file;
use super::pricing::TariffPricer;
use super::run::{run_batch, Fleet, PrepayHook, RunOptions, RunStats};
use super::sinks::{deliver, DeliverStats, Sinks};
use super::PrepayError;

#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoSummary {
    pub ledger: PathBuf,
    pub alerts_dir: PathBuf,
    pub prepaid_accounts: usize,
    pub top_ups: usize,
    pub run: RunStats,
    pub delivered: DeliverStats,
    /// Every cached balance equals the sum of its entries.
    pub balances_check_ok: bool,
    /// The account with the most alerts, its final balance and its alerts in order.
    pub example_account: Option<String>,
    pub example_balance: Decimal,
    pub example_alerts: Vec<Alert>,
}

impl std::fmt::Display for DemoSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "prepay: ledger {}", self.ledger.display())?;
        writeln!(
            f,
            "  {} prepaid accounts, {} top-ups, {} deductions totalling {} yuan, {} alerts (in {})",
            self.prepaid_accounts,
            self.top_ups,
            self.run.deductions,
            self.run.amount,
            self.delivered.alerts,
            self.alerts_dir.display()
        )?;
        writeln!(
            f,
            "  balances = sum of entries: {}",
            if self.balances_check_ok { "yes" } else { "NO" }
        )?;
        if let Some(a) = &self.example_account {
            writeln!(f, "  account {a} (balance now {}):", self.example_balance)?;
            for x in &self.example_alerts {
                let days = x
                    .days_left
                    .map(|d| format!(", {d} days of credit left"))
                    .unwrap_or_default();
                writeln!(
                    f,
                    "    alert {} {} {}: balance {}{days}",
                    x.id, x.kind, x.threshold, x.balance
                )?;
            }
        }
        Ok(())
    }
}

/// Runs the prepayment chain on a lake and master data; writes under `out`.
pub fn run(
    lake: &Path,
    master: &Path,
    tariffs: &Path,
    out: &Path,
) -> Result<DemoSummary, PrepayError> {
    std::fs::create_dir_all(out).map_err(|e| PrepayError::io(out, e))?;
    let ledger_path = out.join("prepay-ledger.sqlite");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", ledger_path.display()));
    }
    let mut ledger = crate::ledger::open_migrated(&ledger_path.display().to_string())?;
    let fleet = Fleet::load(master)?;
    let set = crate::tariff::load_dir(tariffs).map_err(|e| PrepayError::Input(e.to_string()))?;
    let pricer = TariffPricer::new(set);
    let thresholds = Thresholds::builtin();
    let mut hook = PrepayHook {
        thresholds: &thresholds,
        control: None,
        fleet: &fleet,
        daily_spend: Default::default(),
        now_ms: None,
    };
    let payments = master.join(crate::master::PAYMENTS_FILE);
    let mut top_ups = 0;
    if payments.exists() {
        top_ups = import_file(ledger.as_mut(), &payments, &hook, 1000)?.credited;
    }
    let through = NaiveDate::from_ymd_opt(2100, 1, 1)
        .expect("valid")
        .and_hms_opt(0, 0, 0)
        .expect("valid");
    let opts = RunOptions {
        lake,
        from: NaiveDate::MIN,
        through_ms: through.and_utc().timestamp_millis(),
        chunk: 500,
        evaluate_all: true,
    };
    let run = run_batch(ledger.as_mut(), &pricer, &fleet, &mut hook, &opts)?;
    let sinks = Sinks {
        alerts_root: Some(out.to_path_buf()),
        ..Default::default()
    };
    let delivered = deliver(ledger.as_mut(), &sinks, &mut |_, _| Ok(()))?;
    let balances_check_ok = ledger.check()?.iter().all(|c| c.ok());
    let mut per: HashMap<String, Vec<Alert>> = HashMap::new();
    for m in ledger.outbox_all()? {
        if m.kind == "alert" {
            if let Ok(a) = serde_json::from_str::<Alert>(&m.payload) {
                per.entry(a.account_id.clone()).or_default().push(a);
            }
        }
    }
    let example = per
        .iter()
        .max_by_key(|(k, v)| (v.len(), std::cmp::Reverse((*k).clone())))
        .map(|(k, _)| k.clone());
    let (example_balance, example_alerts) = match &example {
        Some(a) => (ledger.balance(a)?, per.remove(a).unwrap_or_default()),
        None => (Decimal::ZERO, Vec::new()),
    };
    Ok(DemoSummary {
        ledger: ledger_path,
        alerts_dir: out.join(super::sinks::ALERTS),
        prepaid_accounts: fleet.accounts.len(),
        top_ups,
        run,
        delivered,
        balances_check_ok,
        example_account: example,
        example_balance,
        example_alerts,
    })
}
