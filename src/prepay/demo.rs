//! Demo hook: a fresh SQLite ledger, the master data's payments as top-ups,
//! a deduction run over the whole lake with the built-in thresholds, and the
//! alerts delivered to `OUT/alerts/`. Returns what happened, including one
//! prepaid account's alerts as it crossed its levels.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use rust_decimal::Decimal;

use super::alerts::{Alert, Thresholds};
use super::payments::{import_file, ImportReport};
use super::pricing::{Pricer, TariffPricer};
use super::run::{run_batch, Fleet, PrepayHook, RunOptions, RunStats};
use super::sinks::{deliver, DeliverStats, Sinks};
use super::PrepayError;
use crate::ledger::{Cursor, Ledger};

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

/// What both parts of the demo read, loaded once.
pub struct Inputs<'a> {
    pub lake: &'a Path,
    pub fleet: Fleet,
    pub pricer: TariffPricer,
    /// `payments.csv` of the master data, when there is one.
    pub payments: Option<PathBuf>,
}

impl<'a> Inputs<'a> {
    pub fn load(lake: &'a Path, master: &Path, tariffs: &Path) -> Result<Inputs<'a>, PrepayError> {
        let set =
            crate::tariff::load_dir(tariffs).map_err(|e| PrepayError::Input(e.to_string()))?;
        let payments = master.join(crate::master::PAYMENTS_FILE);
        Ok(Inputs {
            lake,
            fleet: Fleet::load(master)?,
            pricer: TariffPricer::new(set),
            payments: payments.exists().then_some(payments),
        })
    }

    /// Credits the payments to `ledger`, then deducts the lake through
    /// `through_ms` with the built-in thresholds (a hook of its own: its
    /// daily spends are this ledger's); the import's and the run's reports.
    fn deduct(
        &self,
        ledger: &mut dyn Ledger,
        through_ms: i64,
        evaluate_all: bool,
    ) -> Result<(ImportReport, RunStats), PrepayError> {
        let thresholds = Thresholds::builtin();
        let mut hook = PrepayHook::new(&thresholds, &self.fleet);
        let paid = match &self.payments {
            Some(p) => import_file(ledger, p, &hook, 1000)?,
            None => ImportReport::default(),
        };
        let opts = RunOptions {
            lake: self.lake,
            from: NaiveDate::MIN,
            through_ms,
            chunk: 500,
            evaluate_all,
        };
        let run = run_batch(ledger, &self.pricer, &self.fleet, &mut hook, &opts)?;
        Ok((paid, run))
    }
}

/// Past the end of any demo lake: "deduct everything".
fn end_of_lake_ms() -> i64 {
    let end = NaiveDate::from_ymd_opt(2100, 1, 1).expect("valid");
    super::pricing::local_midnight_ms(end, 0)
}

/// Runs the prepayment chain on the inputs; writes under `out`.
pub fn run(inputs: &Inputs<'_>, out: &Path) -> Result<DemoSummary, PrepayError> {
    std::fs::create_dir_all(out).map_err(|e| PrepayError::io(out, e))?;
    let ledger_path = out.join("prepay-ledger.sqlite");
    let mut ledger = fresh_ledger(&ledger_path)?;
    let (paid, run) = inputs.deduct(ledger.as_mut(), end_of_lake_ms(), true)?;
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
        prepaid_accounts: inputs.fleet.accounts.len(),
        top_ups: paid.credited,
        run,
        delivered,
        balances_check_ok,
        example_account: example,
        example_balance,
        example_alerts,
    })
}

/// The demo's switch: the same prepaid fleet, deducted by "the system
/// before" (a ledger of its own) up to a switch, opens in a second ledger
/// from that state (`ledger import-balances`), takes the same payments
/// (those up to the switch are not credited again) and is deducted to the
/// end of the lake. Each opened account's balance then equals the demo
/// ledger's, where meterflow deducted the whole month.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SwitchSummary {
    pub ledger: PathBuf,
    pub file: PathBuf,
    pub switched_at: String,
    pub opened: usize,
    pub refused: usize,
    pub not_credited: usize,
    /// Opened accounts whose balance equals the demo ledger's.
    pub equal: usize,
    pub differing: Vec<String>,
}

impl std::fmt::Display for SwitchSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "switch: {} accounts opened at {} from {} ({} refused) -> ledger {}",
            self.opened,
            self.switched_at,
            self.file.display(),
            self.refused,
            self.ledger.display()
        )?;
        writeln!(
            f,
            "  {} payments made before the switch not credited again; balances at the end equal the ledger above: {} of {}{}",
            self.not_credited,
            self.equal,
            self.opened,
            if self.differing.is_empty() {
                String::new()
            } else {
                format!(" (differ: {})", self.differing.join(", "))
            }
        )
    }
}

/// A fresh SQLite ledger at `path` (an earlier one removed).
fn fresh_ledger(path: &Path) -> Result<Box<dyn Ledger>, PrepayError> {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    Ok(crate::ledger::open_migrated(&path.display().to_string())?)
}

/// Runs the switch at local midnight starting `day` (see [`SwitchSummary`]),
/// comparing with the demo ledger at `demo_ledger`.
pub fn switch(
    inputs: &Inputs<'_>,
    out: &Path,
    day: NaiveDate,
    demo_ledger: &Path,
) -> Result<SwitchSummary, PrepayError> {
    std::fs::create_dir_all(out).map_err(|e| PrepayError::io(out, e))?;
    let (fleet, pricer) = (&inputs.fleet, &inputs.pricer);
    let off = match fleet.accounts.rows().first() {
        Some(a) => pricer.utc_offset_secs(a)?,
        None => 0,
    };
    let at = super::pricing::local_midnight_ms(day, off);
    // The system before: top-ups, and deductions up to the switch.
    let mut before = fresh_ledger(&out.join("switch-system-before.sqlite"))?;
    inputs.deduct(before.as_mut(), at, false)?;
    // Its state at the switch: each account whose one meter's cursor
    // stands on the switch reading (not on a held jump).
    let mut cursors: HashMap<String, Vec<Cursor>> = HashMap::new();
    for c in before.cursors()? {
        if let Some((m, _)) = fleet.meter_account(&c.meter_id) {
            cursors.entry(m.account_id.clone()).or_default().push(c);
        }
    }
    let mut csv = String::from("account_id,switched_at,balance,position_kwh\n");
    let switched_at = chrono::DateTime::from_timestamp_millis(at)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default();
    for a in fleet.accounts.rows() {
        let id = &a.account_id;
        let Some([c]) = cursors.get(id).map(Vec::as_slice) else {
            continue;
        };
        if c.last_ts_ms != at || c.held.is_some() || fleet.meters_of(id).count() != 1 {
            continue;
        }
        let balance: Decimal = before
            .entries(Some(id), 0, usize::MAX)?
            .iter()
            .filter(|e| e.entry.ts_ms <= at)
            .map(|e| e.entry.amount)
            .sum();
        csv.push_str(&format!(
            "{id},{switched_at},{balance},{}\n",
            c.position.normalize()
        ));
    }
    let file = out.join("prepaid_balances.csv");
    crate::store::atomic::write_file_atomic(&file, csv.as_bytes())?;
    // meterflow from the switch on.
    let ledger_path = out.join("switch-ledger.sqlite");
    let mut after = fresh_ledger(&ledger_path)?;
    let opened =
        super::opening::import_file(after.as_mut(), &file, fleet, pricer, inputs.lake, 1000)?;
    // The same payments (those up to the switch are not credited again).
    let (paid, _) = inputs.deduct(after.as_mut(), end_of_lake_ms(), false)?;
    let mut demo = crate::ledger::open(&demo_ledger.display().to_string())?;
    let keys: Vec<String> = fleet
        .accounts
        .rows()
        .iter()
        .map(|a| super::opening::key(&a.account_id))
        .collect();
    let (mut equal, mut differing) = (0, Vec::new());
    for e in after.entries_by_keys(&keys)? {
        let a = &e.entry.account_id;
        if after.balance(a)? == demo.balance(a)? {
            equal += 1;
        } else {
            differing.push(a.clone());
        }
    }
    Ok(SwitchSummary {
        ledger: ledger_path,
        file,
        switched_at,
        opened: opened.imported + opened.already,
        refused: opened.refused.len(),
        not_credited: paid.before_switch.len(),
        equal,
        differing,
    })
}
