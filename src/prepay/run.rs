//! The prepaid fleet, the commit hook (alerts + relay rules) and the batch
//! deduction run over the readings lake (`meterflow prepay run`).
//!
//! The run is restartable at any point: each chunk of meters commits its
//! deductions together with the meters' cursors, so a killed run leaves a
//! prefix of whole chunks and the next run continues from the cursors.
//! Overlapping runs are safe: a chunk whose cursors moved since they were
//! read is recomputed (`Batch::expect`).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;

use chrono::NaiveDate;
use rust_decimal::Decimal;

use super::alerts::{self, Thresholds};
use super::control::Control;
use super::deduct::{self, Regs, Step, CHANNEL};
use super::interval;
use super::pricing::{local_date_minute, Pricer};
use super::PrepayError;
use crate::ledger::{Batch, CommitHook, CommitReport, Cursor, HookOut, Ledger, Outcome};
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
    /// Time-of-use readings without all tariff registers T1..T4 (not charged).
    pub incomplete: usize,
    pub skipped_quality: usize,
    pub amount: Decimal,
    pub alerts: usize,
    pub relay_orders: usize,
    pub chunks: usize,
    pub retries: usize,
}

impl RunStats {
    /// Folds one committed batch into the counters: the stepping counters of
    /// `local` (gathered while building it), the outcome of each entry and
    /// the outbox messages the commit produced. One place for `prepay run`
    /// and `stream`.
    pub fn absorb(&mut self, local: &RunStats, batch: &Batch, report: &CommitReport) {
        self.readings += local.readings;
        self.stale += local.stale;
        self.backwards += local.backwards;
        self.held += local.held;
        self.spikes += local.spikes;
        self.unpriced += local.unpriced;
        self.incomplete += local.incomplete;
        for (o, e) in report.outcomes.iter().zip(&batch.entries) {
            match o {
                Outcome::Inserted => {
                    self.deductions += 1;
                    self.amount -= e.amount;
                }
                Outcome::Duplicate => self.duplicates += 1,
                Outcome::Conflict { stored } => {
                    self.conflicts += 1;
                    tracing::error!(key = %e.key, "deduction conflicts with stored entry: {stored}");
                }
            }
        }
        self.count_outbox(&report.outbox);
    }

    pub fn count_outbox(&mut self, msgs: &[crate::ledger::OutboxMsg]) {
        for m in msgs {
            match m.kind.as_str() {
                "alert" => self.alerts += 1,
                _ => self.relay_orders += 1,
            }
        }
    }
}

/// One register reading: time, total register, tariff registers T1..T4
/// (only for meters on time-of-use tariffs, when all four were read then).
pub type RegisterReading = (i64, Decimal, Option<Regs>);

/// Meters whose account's tariff prices by time of use at `ts_ms` from
/// tariff registers T1..T4.
pub fn tou_meters(pricer: &dyn Pricer, fleet: &Fleet, ts_ms: i64) -> HashSet<String> {
    meters_where(fleet, |a| {
        pricer
            .registers(a, ts_ms)
            .map(|r| r.is_some())
            .unwrap_or(false)
    })
}

/// Meters whose account's tariff prices by time of use at `ts_ms` without
/// a register map: they are deducted from interval readings.
pub fn interval_meters(pricer: &dyn Pricer, fleet: &Fleet, ts_ms: i64) -> HashSet<String> {
    meters_where(fleet, |a| pricer.intervals(a, ts_ms).unwrap_or(false))
}

fn meters_where(fleet: &Fleet, pick: impl Fn(&Account) -> bool) -> HashSet<String> {
    fleet
        .meters
        .values()
        .filter(|m| fleet.accounts.get(&m.account_id).is_some_and(&pick))
        .map(|m| m.meter_id.clone())
        .collect()
}

/// The channel whose readings deduct for this meter, and its cursor's channel.
pub fn deduct_channel(intervals: &HashSet<String>, meter_id: &str) -> &'static str {
    if intervals.contains(meter_id) {
        interval::CHANNEL
    } else {
        CHANNEL
    }
}

/// Tariff register index (0..4) of a channel.
pub fn tariff_register(c: Channel) -> Option<usize> {
    match c {
        Channel::ImportActiveT1 => Some(0),
        Channel::ImportActiveT2 => Some(1),
        Channel::ImportActiveT3 => Some(2),
        Channel::ImportActiveT4 => Some(3),
        _ => None,
    }
}

/// Joins tariff register readings to the total readings of the same instant.
pub fn join_registers(
    totals: Vec<(i64, Decimal)>,
    regs: Option<&HashMap<i64, [Option<Decimal>; 4]>>,
) -> Vec<RegisterReading> {
    totals
        .into_iter()
        .map(|(ts, v)| {
            let r = regs
                .and_then(|m| m.get(&ts))
                .and_then(|r| Some([r[0]?, r[1]?, r[2]?, r[3]?]));
            (ts, v, r)
        })
        .collect()
}

/// Register readings per prepaid meter, sorted by time, from the lake; for
/// the meters in `intervals`, their interval readings instead (value = kWh).
pub fn load_register_readings(
    lake: &Path,
    fleet: &Fleet,
    pricer: &dyn Pricer,
    intervals: &HashSet<String>,
    from: NaiveDate,
    through_ms: i64,
) -> Result<HashMap<String, Vec<RegisterReading>>, PrepayError> {
    let tou = tou_meters(pricer, fleet, through_ms);
    let mut regs: HashMap<String, HashMap<i64, [Option<Decimal>; 4]>> = HashMap::new();
    use crate::store::columns::{from_scaled, ReadingsView};
    let (to, _) = local_date_minute(through_ms, 0);
    let mut out: HashMap<String, Vec<(i64, Decimal)>> = HashMap::new();
    let want = Channel::ImportActiveTotal.as_str();
    let want_interval = Channel::ImportActiveInterval.as_str();
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
                let channel = v.channel.value(i);
                let by_interval = !intervals.is_empty() && intervals.contains(v.meter_id.value(i));
                let reg = if channel == want {
                    if by_interval {
                        continue;
                    }
                    None
                } else if channel == want_interval {
                    if !by_interval {
                        continue;
                    }
                    None
                } else if tou.is_empty() {
                    continue;
                } else {
                    match channel.parse::<Channel>().ok().and_then(tariff_register) {
                        Some(r) if tou.contains(v.meter_id.value(i)) => Some(r),
                        _ => continue,
                    }
                };
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
                let value = from_scaled(v.value.value(i));
                match reg {
                    None => out
                        .entry(v.meter_id.value(i).to_string())
                        .or_default()
                        .push((ts, value)),
                    Some(r) => {
                        regs.entry(v.meter_id.value(i).to_string())
                            .or_default()
                            .entry(ts)
                            .or_default()[r] = Some(value)
                    }
                }
            }
        }
    }
    Ok(out
        .into_iter()
        .map(|(m, mut r)| {
            r.sort_by_key(|x| x.0);
            r.dedup_by_key(|x| x.0);
            let joined = join_registers(r, regs.get(&m));
            (m, joined)
        })
        .collect())
}

/// Steps one meter's readings from `cursor`; returns entries and the last
/// cursor. `by_interval`: the readings are interval readings (see
/// [`interval_meters`]), else register readings.
#[allow(clippy::too_many_arguments)]
pub fn deduct_meter(
    pricer: &dyn Pricer,
    fleet: &Fleet,
    meter_id: &str,
    cursor: Option<Cursor>,
    readings: &[RegisterReading],
    by_interval: bool,
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
    for (ts, value, regs) in readings {
        stats.readings += 1;
        let step = if by_interval {
            interval::step(pricer, account, meter, cur.as_ref(), *ts, *value, source)
        } else {
            deduct::step(
                pricer,
                account,
                meter,
                cur.as_ref(),
                *ts,
                *value,
                *regs,
                source,
            )
        };
        match step {
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
            Ok(Step::Incomplete) => {
                stats.incomplete += 1;
                tracing::debug!(
                    meter = meter_id,
                    ts,
                    "TOU reading without all of T1..T4: not charged"
                );
            }
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

const DAY_MS: i64 = 86_400_000;

/// Recent daily spend of one meter (yuan/day) for the days-of-credit
/// forecast: what its consumption so far in the accumulation window (the
/// bill month; the tier year for annual tiers) costs, over the days that
/// consumption covers (`first_ts_ms..last_ts_ms` of the cursor). None when
/// the cursor covers less than a day (too little to forecast from).
pub fn meter_daily_spend(pricer: &dyn Pricer, fleet: &Fleet, c: &Cursor) -> Option<Decimal> {
    let meter = fleet.meters.get(&c.meter_id)?;
    let account = fleet.accounts.get(&meter.account_id)?;
    let span = c.last_ts_ms - c.first_ts_ms;
    if span < DAY_MS {
        return None;
    }
    let w = pricer.window(account, c.last_ts_ms - 1).ok()?;
    if w.start_ms != c.window_start_ms {
        return None;
    }
    let amount = pricer
        .charge(
            account,
            &w,
            c.last_ts_ms,
            &crate::tariff::price::Usage::default(),
            &deduct::usage_of(c),
        )
        .ok()?
        .amount;
    Some((amount * Decimal::from(DAY_MS) / Decimal::from(span)).round_dp(4))
}

/// Updates the per-account daily spend (the sum over the account's meters)
/// for the meters whose cursors are about to be committed.
pub fn note_spend(
    pricer: &dyn Pricer,
    fleet: &Fleet,
    per_meter: &mut HashMap<String, Decimal>,
    daily: &mut HashMap<String, Decimal>,
    cursors: &[Cursor],
) {
    let mut accounts = BTreeSet::new();
    for c in cursors {
        match meter_daily_spend(pricer, fleet, c) {
            Some(s) => per_meter.insert(c.meter_id.clone(), s),
            None => per_meter.remove(&c.meter_id),
        };
        if let Some(m) = fleet.meters.get(&c.meter_id) {
            accounts.insert(m.account_id.as_str());
        }
    }
    for a in accounts {
        let spends: Vec<Decimal> = fleet
            .meters_of
            .get(a)
            .into_iter()
            .flatten()
            .filter_map(|m| per_meter.get(m).copied())
            .collect();
        if spends.is_empty() {
            daily.remove(a);
        } else {
            daily.insert(a.to_string(), spends.into_iter().sum());
        }
    }
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
    let intervals = interval_meters(pricer, fleet, opts.through_ms);
    let readings = load_register_readings(
        opts.lake,
        fleet,
        pricer,
        &intervals,
        opts.from,
        opts.through_ms,
    )?;
    let mut cursors: HashMap<String, Cursor> = ledger
        .cursors()?
        .into_iter()
        .filter(|c| c.channel == deduct_channel(&intervals, &c.meter_id))
        .map(|c| (c.meter_id.clone(), c))
        .collect();
    let mut meters: Vec<&String> = readings.keys().collect();
    meters.sort();
    stats.meters = meters.len();
    let mut meter_spend: HashMap<String, Decimal> = HashMap::new();
    for chunk in meters.chunks(opts.chunk.max(1)) {
        let mut attempt = 0;
        loop {
            let mut batch = Batch::default();
            let mut local = RunStats::default();
            for m in chunk {
                let before = cursors.get(*m).cloned();
                batch.expect.push((
                    (*m).clone(),
                    deduct_channel(&intervals, m).into(),
                    before.as_ref().map(Cursor::stamp),
                ));
                let (entries, cur) = deduct_meter(
                    pricer,
                    fleet,
                    m,
                    before.clone(),
                    &readings[*m],
                    intervals.contains(*m),
                    "prepay-run",
                    &mut local,
                );
                if let Some(c) = cur.filter(|c| Some(c) != before.as_ref()) {
                    batch.cursors.push(c);
                }
                batch.entries.extend(entries);
            }
            note_spend(
                pricer,
                fleet,
                &mut meter_spend,
                &mut hook.daily_spend,
                &batch.cursors,
            );
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
                    match ledger.cursor(m, deduct_channel(&intervals, m))? {
                        Some(c) => cursors.insert((*m).clone(), c),
                        None => cursors.remove(*m),
                    };
                }
                continue;
            }
            stats.chunks += 1;
            stats.absorb(&local, &batch, &report);
            for c in batch.cursors {
                cursors.insert(c.meter_id.clone(), c);
            }
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
            stats.count_outbox(&report.outbox);
        }
    }
    Ok(stats)
}
