//! The prepaid fleet, the commit hook (alerts + relay rules) and the batch
//! deduction run over the readings lake (`meterflow prepay run`).
//!
//! The run is restartable at any point: each chunk of meters commits its
//! deductions together with the meters' cursors, so a killed run leaves a
//! prefix of whole chunks and the next run continues from the cursors.
//! Overlapping runs are safe: a chunk whose cursors moved since they were
//! read is recomputed (`Batch::expect`).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use chrono::NaiveDate;
use rust_decimal::Decimal;

use super::alerts::{self, Thresholds};
use super::control::Control;
use super::deduct::{self, Step, CHANNEL};
use super::pricing::{local_date_minute, Pricer};
use super::PrepayError;
use crate::ledger::{Batch, CommitHook, Cursor, HookOut, Ledger, Outcome};
use crate::master::{Account, Meter, PaymentMode};
use crate::model::{Channel, Quality};

/// Prepaid accounts and their meters.
#[derive(Debug, Clone, Default)]
pub struct Fleet {
    pub accounts: HashMap<String, Account>,
    /// meter id -> meter (of a prepaid account).
    pub meters: HashMap<String, Meter>,
    pub meters_of: HashMap<String, Vec<String>>,
}

impl Fleet {
    /// Loads `accounts.csv` and `meters.csv` from `dir`, keeping prepaid accounts.
    /// Bad rows are logged and skipped.
    pub fn load(dir: &Path) -> Result<Fleet, PrepayError> {
        let accounts = crate::master::load_accounts(&dir.join(crate::master::ACCOUNTS_FILE))
            .map_err(|e| PrepayError::Input(e.to_string()))?;
        let meters = crate::master::load_meters(&dir.join(crate::master::METERS_FILE))
            .map_err(|e| PrepayError::Input(e.to_string()))?;
        for e in accounts.errors.iter().chain(meters.errors.iter()) {
            tracing::warn!("{e}");
        }
        Ok(Fleet::from_rows(accounts.rows, meters.rows))
    }

    pub fn from_rows(accounts: Vec<Account>, meters: Vec<Meter>) -> Fleet {
        let mut f = Fleet::default();
        for a in accounts {
            if a.payment_mode == PaymentMode::Prepaid {
                f.accounts.insert(a.account_id.clone(), a);
            }
        }
        for m in meters {
            if f.accounts.contains_key(&m.account_id) {
                f.meters_of
                    .entry(m.account_id.clone())
                    .or_default()
                    .push(m.meter_id.clone());
                f.meters.insert(m.meter_id.clone(), m);
            }
        }
        f
    }
}

/// Alerts and relay rules, evaluated inside every ledger commit.
pub struct PrepayHook<'a> {
    pub thresholds: &'a Thresholds,
    pub control: Option<&'a Control>,
    pub fleet: &'a Fleet,
    /// Recent daily spend per account (yuan/day) for the days-of-credit forecast.
    pub daily_spend: HashMap<String, Decimal>,
    /// Clock override (tests, demo); wall clock otherwise.
    pub now_ms: Option<i64>,
}

impl CommitHook for PrepayHook<'_> {
    fn after(
        &self,
        account_id: &str,
        balance: Decimal,
        entries: i64,
        flags: &BTreeSet<String>,
        now: i64,
    ) -> HookOut {
        let now = self.now_ms.unwrap_or(now);
        let mut out = HookOut::default();
        let (tariff, class) = self.fleet.accounts.get(account_id).map_or(("", ""), |a| {
            (a.tariff_id.as_str(), a.customer_class.as_str())
        });
        let levels = self.thresholds.for_account(account_id, tariff, class);
        alerts::evaluate(
            account_id,
            &levels,
            balance,
            entries,
            self.daily_spend.get(account_id).copied(),
            flags,
            now,
            &mut out,
        );
        if let Some(c) = self.control {
            let meters = self
                .fleet
                .meters_of
                .get(account_id)
                .cloned()
                .unwrap_or_default();
            let limit = levels.overdraft_limit.unwrap_or(Decimal::ZERO);
            c.evaluate(
                account_id, &meters, limit, balance, entries, flags, now, &mut out,
            );
        }
        out
    }
}

/// Counters of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RunStats {
    pub meters: usize,
    pub readings: usize,
    pub deductions: usize,
    pub duplicates: usize,
    pub conflicts: usize,
    pub stale: usize,
    pub backwards: usize,
    /// Suspicious jumps held until the next reading.
    pub held: usize,
    /// Held jumps the next reading showed to be transient spikes (not charged).
    pub spikes: usize,
    pub unpriced: usize,
    pub skipped_quality: usize,
    pub amount: Decimal,
    pub alerts: usize,
    pub relay_orders: usize,
    pub chunks: usize,
    pub retries: usize,
}

/// Register readings per prepaid meter, sorted by time, from the lake.
pub fn load_register_readings(
    lake: &Path,
    fleet: &Fleet,
    from: NaiveDate,
    through_ms: i64,
) -> Result<HashMap<String, Vec<(i64, Decimal)>>, PrepayError> {
    use crate::store::columns::{from_scaled, ReadingsView};
    let (to, _) = local_date_minute(through_ms, 0);
    let mut out: HashMap<String, Vec<(i64, Decimal)>> = HashMap::new();
    let want = Channel::ImportActiveTotal.as_str();
    for (_, path) in crate::store::reader::list_files(lake, "readings", from, to)? {
        let cols = [
            "meter_id",
            "ts",
            "channel",
            "value",
            "quality",
            "source_protocol",
            "source_collector",
            "source_address",
            "received_at",
        ];
        for batch in crate::store::reader::read_file_columns(&path, Some(&cols))? {
            let v = ReadingsView::new(&batch)?;
            for i in 0..v.len() {
                if v.channel.value(i) != want {
                    continue;
                }
                let ts = v.ts.value(i);
                if ts > through_ms || !fleet.meters.contains_key(v.meter_id.value(i)) {
                    continue;
                }
                let q = v.quality.value(i);
                if q != "ok" {
                    // Suspect, conflicting or device-error values are not charged; estimates are.
                    let q = Quality::parse(q).unwrap_or(Quality::SUSPECT);
                    if q.contains(Quality::SUSPECT)
                        || q.contains(Quality::CONFLICT)
                        || q.contains(Quality::DEVICE_ERROR)
                    {
                        continue;
                    }
                }
                out.entry(v.meter_id.value(i).to_string())
                    .or_default()
                    .push((ts, from_scaled(v.value.value(i))));
            }
        }
    }
    for r in out.values_mut() {
        r.sort_by_key(|x| x.0);
        r.dedup_by_key(|x| x.0);
    }
    Ok(out)
}

/// Steps one meter's readings from `cursor`; returns entries and the last cursor.
pub fn deduct_meter(
    pricer: &dyn Pricer,
    fleet: &Fleet,
    meter_id: &str,
    cursor: Option<Cursor>,
    readings: &[(i64, Decimal)],
    source: &str,
    stats: &mut RunStats,
) -> (Vec<crate::ledger::NewEntry>, Option<Cursor>) {
    let Some(meter) = fleet.meters.get(meter_id) else {
        return (Vec::new(), cursor);
    };
    let Some(account) = fleet.accounts.get(&meter.account_id) else {
        return (Vec::new(), cursor);
    };
    let mut cur = cursor;
    let mut entries = Vec::new();
    for (ts, value) in readings {
        stats.readings += 1;
        match deduct::step(pricer, account, meter, cur.as_ref(), *ts, *value, source) {
            Ok(Step::Baseline(c)) => cur = Some(c),
            Ok(Step::Deduct(e, c)) => {
                entries.extend(e);
                cur = Some(c);
            }
            Ok(Step::Hold(c)) => {
                stats.held += 1;
                cur = Some(c);
            }
            Ok(Step::Spike(e, c)) => {
                stats.spikes += 1;
                tracing::info!(meter = meter_id, ts, "transient register spike dropped");
                entries.extend(e);
                cur = Some(c);
            }
            Ok(Step::Stale) => stats.stale += 1,
            Ok(Step::Backwards) => {
                stats.backwards += 1;
                tracing::warn!(
                    meter = meter_id,
                    ts,
                    "register went backwards: reading not charged"
                );
            }
            Err(e) => {
                stats.unpriced += 1;
                tracing::debug!(meter = meter_id, "not priced: {e}");
                break;
            }
        }
    }
    (entries, cur)
}

/// Options of a batch run.
pub struct RunOptions<'a> {
    pub lake: &'a Path,
    /// Read lake partitions from this UTC date.
    pub from: NaiveDate,
    /// Deduct readings up to and including this instant (UTC ms).
    pub through_ms: i64,
    /// Meters per transaction.
    pub chunk: usize,
    /// Re-evaluate every prepaid account's alerts and relay rules at the end.
    pub evaluate_all: bool,
}

/// Deducts everything in the lake not yet deducted, through `through_ms`.
pub fn run_batch(
    ledger: &mut dyn Ledger,
    pricer: &dyn Pricer,
    fleet: &Fleet,
    hook: &mut PrepayHook<'_>,
    opts: &RunOptions<'_>,
) -> Result<RunStats, PrepayError> {
    let mut stats = RunStats::default();
    let readings = load_register_readings(opts.lake, fleet, opts.from, opts.through_ms)?;
    let mut cursors: HashMap<String, Cursor> = ledger
        .cursors()?
        .into_iter()
        .filter(|c| c.channel == CHANNEL)
        .map(|c| (c.meter_id.clone(), c))
        .collect();
    // Recent daily spend for the forecast: this run's deductions over its days.
    let mut meters: Vec<&String> = readings.keys().collect();
    meters.sort();
    stats.meters = meters.len();
    let mut spend: HashMap<String, (Decimal, i64, i64)> = HashMap::new();
    for chunk in meters.chunks(opts.chunk.max(1)) {
        let mut attempt = 0;
        loop {
            let mut batch = Batch::default();
            let mut local = RunStats::default();
            for m in chunk {
                let before = cursors.get(*m).cloned();
                batch.expect.push((
                    (*m).clone(),
                    CHANNEL.into(),
                    before.as_ref().map(|c| (c.last_ts_ms, c.first_ts_ms)),
                ));
                let (entries, cur) = deduct_meter(
                    pricer,
                    fleet,
                    m,
                    before.clone(),
                    &readings[*m],
                    "prepay-run",
                    &mut local,
                );
                if let Some(c) = cur.filter(|c| Some(c) != before.as_ref()) {
                    batch.cursors.push(c);
                }
                batch.entries.extend(entries);
            }
            for e in &batch.entries {
                let s = spend.entry(e.account_id.clone()).or_insert((
                    Decimal::ZERO,
                    i64::MAX,
                    i64::MIN,
                ));
                s.0 -= e.amount;
                s.1 = s.1.min(e.ts_ms);
                s.2 = s.2.max(e.ts_ms);
            }
            for (a, (sum, lo, hi)) in &spend {
                let days = ((hi - lo) / 86_400_000).max(1);
                hook.daily_spend
                    .insert(a.clone(), sum / Decimal::from(days));
            }
            let report = ledger.commit(&batch, hook)?;
            if report.stale {
                // Another run moved these cursors: re-read them and recompute the chunk.
                attempt += 1;
                stats.retries += 1;
                if attempt > 20 {
                    return Err(PrepayError::Input(
                        "cursors keep moving under this run; is another run stuck in a loop?"
                            .into(),
                    ));
                }
                for m in chunk {
                    match ledger.cursor(m, CHANNEL)? {
                        Some(c) => cursors.insert((*m).clone(), c),
                        None => cursors.remove(*m),
                    };
                }
                continue;
            }
            for c in batch.cursors {
                cursors.insert(c.meter_id.clone(), c);
            }
            stats.chunks += 1;
            stats.readings += local.readings;
            stats.stale += local.stale;
            stats.backwards += local.backwards;
            stats.held += local.held;
            stats.spikes += local.spikes;
            stats.unpriced += local.unpriced;
            for (o, e) in report.outcomes.iter().zip(&batch.entries) {
                match o {
                    Outcome::Inserted => {
                        stats.deductions += 1;
                        stats.amount -= e.amount;
                    }
                    Outcome::Duplicate => stats.duplicates += 1,
                    Outcome::Conflict { stored } => {
                        stats.conflicts += 1;
                        tracing::error!(key = %e.key, "deduction conflicts with stored entry: {stored}");
                    }
                }
            }
            count_outbox(&report.outbox, &mut stats);
            break;
        }
    }
    if opts.evaluate_all {
        let mut accounts: Vec<String> = fleet.accounts.keys().cloned().collect();
        accounts.sort();
        for chunk in accounts.chunks(1000) {
            let batch = Batch {
                evaluate: chunk.to_vec(),
                ..Default::default()
            };
            let report = ledger.commit(&batch, hook)?;
            count_outbox(&report.outbox, &mut stats);
        }
    }
    Ok(stats)
}

fn count_outbox(msgs: &[crate::ledger::OutboxMsg], stats: &mut RunStats) {
    for m in msgs {
        match m.kind.as_str() {
            "alert" => stats.alerts += 1,
            _ => stats.relay_orders += 1,
        }
    }
}
