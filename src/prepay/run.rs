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
use std::time::Duration;

use chrono::NaiveDate;
use rust_decimal::Decimal;

use super::alerts::{self, Thresholds};
use super::control::Control;
use super::deduct::{self, Regs, Step, CHANNEL};
use super::fleet::ById;
pub use super::fleet::Fleet;
use super::interval;
use super::pricing::{local_date_minute, Pricer};
use super::PrepayError;
use crate::ledger::{
    Batch, CommitHook, CommitReport, Cursor, HookOut, Ledger, LedgerError, Outcome,
};
use crate::master::{Account, Meter};
use crate::model::{Channel, Quality};
use crate::store::scan::FxMap;

/// Alerts and relay rules, evaluated inside every ledger commit.
pub struct PrepayHook<'a> {
    pub thresholds: &'a Thresholds,
    pub control: Option<&'a Control>,
    pub fleet: &'a Fleet,
    /// Recent daily spend per account (yuan/day) for the days-of-credit forecast.
    pub daily_spend: FxMap<String, Decimal>,
    /// Clock override (tests, demo); wall clock otherwise.
    pub now_ms: Option<i64>,
}

impl<'a> PrepayHook<'a> {
    /// A hook with `thresholds` over `fleet`: no remote fee control, no
    /// daily spends yet, the wall clock.
    pub fn new(thresholds: &'a Thresholds, fleet: &'a Fleet) -> PrepayHook<'a> {
        PrepayHook {
            thresholds,
            control: None,
            fleet,
            daily_spend: FxMap::default(),
            now_ms: None,
        }
    }
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
        // Only per-tariff or per-class thresholds need the account's record:
        // otherwise a lookup in the fleet's million accounts is saved.
        let scoped = !self.thresholds.tariff.is_empty() || !self.thresholds.class.is_empty();
        let (tariff, class) = match scoped
            .then(|| self.fleet.accounts.get(account_id))
            .flatten()
        {
            Some(a) => (a.tariff_id.as_str(), a.customer_class.as_str()),
            None => ("", ""),
        };
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
            let meters: Vec<String> = self
                .fleet
                .meters_of(account_id)
                .map(|m| m.meter_id.clone())
                .collect();
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

/// `pick` is asked once per tariff, not once per account: a pricer answers
/// these questions from the account's tariff and the time alone.
fn meters_where(fleet: &Fleet, pick: impl Fn(&Account) -> bool) -> HashSet<String> {
    let by_tariff: FxMap<&str, bool> = fleet
        .tariffs
        .iter()
        .map(|(t, a)| (t.as_str(), fleet.accounts.get(a).is_some_and(&pick)))
        .collect();
    if !by_tariff.values().any(|&p| p) {
        return HashSet::new();
    }
    fleet
        .meters
        .rows()
        .iter()
        .filter(|m| {
            fleet
                .accounts
                .get(&m.account_id)
                .is_some_and(|a| by_tariff[a.tariff_id.as_str()])
        })
        .map(|m| m.meter_id.clone())
        .collect()
}

/// The channel whose readings deduct for this meter, and its cursor's channel.
pub fn deduct_channel(intervals: &HashSet<String>, meter_id: &str) -> &'static str {
    channel_by(intervals.contains(meter_id))
}

/// The cursor channel of a meter deducted from interval readings or not.
fn channel_by(by_interval: bool) -> &'static str {
    if by_interval {
        interval::CHANNEL
    } else {
        CHANNEL
    }
}

/// Whether a reading of this quality is charged: suspect, conflicting or
/// device-error values are not; estimates are. `prepay run` and `stream`.
pub fn chargeable(q: Quality) -> bool {
    !(q.contains(Quality::SUSPECT)
        || q.contains(Quality::CONFLICT)
        || q.contains(Quality::DEVICE_ERROR))
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
        .map(|(ts, v)| (ts, v, regs.and_then(|m| registers_at(m, ts))))
        .collect()
}

/// Register readings of the prepaid meters, sorted by time, from the lake;
/// for the meters in `intervals`, their interval readings instead (value =
/// kWh). Meters come in account order (then meter order), the order a run
/// deducts them in.
///
/// Row groups are read in parallel (five columns, text as dictionaries);
/// their runs of rows are then sorted by account and meter, keeping lake
/// order within a meter (the first of two readings of one instant wins),
/// and each meter's runs are merged on either core.
pub fn load_register_readings<'a>(
    lake: &Path,
    fleet: &'a Fleet,
    pricer: &dyn Pricer,
    intervals: &HashSet<String>,
    from: NaiveDate,
    through_ms: i64,
) -> Result<Vec<MeterReadings<'a>>, PrepayError> {
    let tou = tou_meters(pricer, fleet, through_ms);
    load_readings_with(lake, fleet, &tou, intervals, from, through_ms)
}

/// [`load_register_readings`] joining T1..T4 to the totals of the meters
/// in `tou` (decided by the caller, e.g. at several instants).
pub fn load_readings_with<'a>(
    lake: &Path,
    fleet: &'a Fleet,
    tou: &HashSet<String>,
    intervals: &HashSet<String>,
    from: NaiveDate,
    through_ms: i64,
) -> Result<Vec<MeterReadings<'a>>, PrepayError> {
    use rayon::prelude::*;
    let (to, _) = local_date_minute(through_ms, 0);
    let files = crate::store::reader::list_files(lake, "readings", from, to)?;
    let units = crate::store::scan::units(&files)?;
    let want = Wanted {
        fleet,
        tou,
        intervals,
        through_ms,
    };
    let parts: Vec<Vec<WantedRun<'a>>> = units
        .par_iter()
        .enumerate()
        .map(|(k, u)| want.read_unit(u, k as u32))
        .collect::<Result<_, _>>()?;
    let mut runs: Vec<WantedRun<'a>> = Vec::with_capacity(parts.iter().map(Vec::len).sum());
    for p in parts {
        runs.extend(p);
    }
    // In place (a stable sort would allocate a copy of the runs); a
    // meter's runs stay in lake order by their position.
    runs.par_sort_unstable_by(|a, b| {
        (a.meter.account_id(), a.meter.meter_id(), a.at).cmp(&(
            b.meter.account_id(),
            b.meter.meter_id(),
            b.at,
        ))
    });
    Ok(runs
        .par_chunk_by(|a, b| a.meter.meter_id() == b.meter.meter_id())
        .filter_map(merge_runs)
        .collect())
}

/// One meter's runs (in lake order) as its readings; None when they hold
/// tariff registers alone (those only join a total's reading).
fn merge_runs<'a>(runs: &[WantedRun<'a>]) -> Option<MeterReadings<'a>> {
    let mut regs: Option<HashMap<i64, [Option<Decimal>; 4]>> = None;
    let mut totals: Vec<(i64, Decimal)> = Vec::new();
    for &(ts, value, reg) in runs.iter().flat_map(|r| &r.rows) {
        match reg {
            Some(r) => {
                regs.get_or_insert_with(HashMap::new).entry(ts).or_default()[r] = Some(value)
            }
            None => totals.push((ts, value)),
        }
    }
    if totals.is_empty() {
        return None;
    }
    totals.sort_by_key(|x| x.0);
    totals.dedup_by_key(|x| x.0);
    Some(MeterReadings {
        meter: runs[0].meter,
        readings: join_registers(totals, regs.as_ref()),
    })
}

/// The tariff registers T1..T4 read at `ts`, when all four were.
fn registers_at(regs: &HashMap<i64, [Option<Decimal>; 4]>, ts: i64) -> Option<Regs> {
    let r = regs.get(&ts)?;
    Some([r[0]?, r[1]?, r[2]?, r[3]?])
}

/// The wanted readings of one meter in one row group (files are sorted by
/// meter): the meter (borrowed from the fleet), where the run is in the
/// lake, and time, value, tariff register (None: the total or interval
/// channel) of each row.
struct WantedRun<'a> {
    meter: Prepaid<'a>,
    /// Lake order: (unit index, run index within the unit).
    at: (u32, u32),
    rows: Vec<(i64, Decimal, Option<usize>)>,
}

/// A prepaid meter as the run sees it: ids, record and how it deducts.
/// (Its account's record is looked up when it is stepped, on the second
/// core, not while the lake is read.)
#[derive(Clone, Copy)]
pub struct Prepaid<'a> {
    pub meter: &'a Meter,
    /// Deducted from interval readings (see [`interval_meters`]).
    pub by_interval: bool,
}

impl<'a> Prepaid<'a> {
    /// The meter `m` of `fleet`; None when it is not prepaid.
    pub fn of(fleet: &'a Fleet, m: &str, by_interval: bool) -> Option<Prepaid<'a>> {
        let meter = fleet.meters.get(m)?;
        Some(Prepaid { meter, by_interval })
    }

    pub fn meter_id(&self) -> &'a str {
        &self.meter.meter_id
    }

    pub fn account_id(&self) -> &'a str {
        &self.meter.account_id
    }

    /// The channel of its cursor.
    pub fn channel(&self) -> &'static str {
        channel_by(self.by_interval)
    }
}

/// The readings of one prepaid meter, sorted by time.
pub struct MeterReadings<'a> {
    pub meter: Prepaid<'a>,
    pub readings: Vec<RegisterReading>,
}

/// Which readings deduct: see [`load_register_readings`].
struct Wanted<'a, 's> {
    fleet: &'a Fleet,
    tou: &'s HashSet<String>,
    intervals: &'s HashSet<String>,
    through_ms: i64,
}

/// What the fleet says of one meter: None when it is not prepaid.
#[derive(Clone, Copy)]
struct MeterUse<'a> {
    meter: Option<Prepaid<'a>>,
    tou: bool,
}

impl<'a> Wanted<'a, '_> {
    fn meter_use(&self, m: &str) -> MeterUse<'a> {
        let by_interval = !self.intervals.is_empty() && self.intervals.contains(m);
        MeterUse {
            meter: Prepaid::of(self.fleet, m, by_interval),
            tou: !self.tou.is_empty() && self.tou.contains(m),
        }
    }
}

/// What a channel is to the deduction.
#[derive(Clone, Copy)]
enum Use {
    Total,
    Interval,
    Register(usize),
    Skip,
}

impl<'a> Wanted<'a, '_> {
    /// The wanted runs of `unit`, the `index`-th of the lake's units.
    fn read_unit(
        &self,
        unit: &crate::store::scan::Unit,
        index: u32,
    ) -> Result<Vec<WantedRun<'a>>, PrepayError> {
        use crate::store::columns::from_scaled;
        use crate::store::scan::{for_each_view, SCAN_COLUMNS};
        let mut out: Vec<WantedRun<'a>> = Vec::new();
        for_each_view(unit, &SCAN_COLUMNS, None, |b, v| {
            let (meter_id, ts, value) = (v.meter_id, v.ts, v.value);
            let (ch_keys, q_keys) = (v.channel.0, v.quality.0);
            let uses: Vec<Use> = v
                .channels()
                .into_iter()
                .map(|c| match c {
                    Some(Channel::ImportActiveTotal) => Use::Total,
                    Some(Channel::ImportActiveInterval) => Use::Interval,
                    Some(c) if !self.tou.is_empty() => {
                        tariff_register(c).map_or(Use::Skip, Use::Register)
                    }
                    _ => Use::Skip,
                })
                .collect();
            let charged: Vec<bool> = v.qualities().into_iter().map(chargeable).collect();
            // What the fleet says of the current meter (rows come in meter
            // order): looked up once per run of its rows.
            let mut meter: Option<(&str, MeterUse<'a>)> = None;
            for i in 0..b.num_rows() {
                let u = uses[ch_keys[i] as usize];
                if matches!(u, Use::Skip) || !charged[q_keys[i] as usize] {
                    continue;
                }
                let t = ts[i];
                if t > self.through_ms {
                    continue;
                }
                let m = meter_id.value(i);
                let mu = match meter {
                    Some((last, mu)) if last == m => mu,
                    _ => {
                        let mu = self.meter_use(m);
                        meter = Some((m, mu));
                        mu
                    }
                };
                let Some(p) = mu.meter else {
                    continue; // not prepaid
                };
                let reg = match u {
                    Use::Total if !p.by_interval => None,
                    Use::Interval if p.by_interval => None,
                    Use::Register(r) if mu.tou => Some(r),
                    _ => continue,
                };
                let row = (t, from_scaled(i128::from(value[i])), reg);
                match out.last_mut() {
                    Some(run) if run.meter.meter_id() == m => run.rows.push(row),
                    _ => out.push(WantedRun {
                        meter: p,
                        at: (index, out.len() as u32),
                        rows: vec![row],
                    }),
                }
            }
            Ok::<(), PrepayError>(())
        })?;
        Ok(out)
    }
}

/// Steps one meter's readings from `cursor`; returns entries and the last
/// cursor. `by_interval`: the readings are interval readings (see
/// [`interval_meters`]), else register readings.
#[allow(clippy::too_many_arguments)]
pub fn deduct_meter(
    pricer: &dyn Pricer,
    account: &Account,
    meter: &Meter,
    cursor: Option<Cursor>,
    readings: &[RegisterReading],
    by_interval: bool,
    source: &str,
    stats: &mut RunStats,
) -> (Vec<crate::ledger::NewEntry>, Option<Cursor>) {
    let meter_id = meter.meter_id.as_str();
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
    let (_, account) = fleet.meter_account(&c.meter_id)?;
    daily_spend_of(pricer, account, c)
}

/// [`meter_daily_spend`] of a cursor whose account is known.
fn daily_spend_of(pricer: &dyn Pricer, account: &Account, c: &Cursor) -> Option<Decimal> {
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
/// for the meters whose cursors are about to be committed. The other meters
/// of an account with several meters that `per_meter` does not hold (none
/// after a restart) count with their stored cursors: `stored` reads one
/// (the ledger's), once per such meter.
pub fn note_spend(
    pricer: &dyn Pricer,
    fleet: &Fleet,
    per_meter: &mut FxMap<String, Decimal>,
    daily: &mut FxMap<String, Decimal>,
    cursors: &[Cursor],
    stored: &mut dyn FnMut(&str) -> Result<Option<Cursor>, LedgerError>,
) -> Result<(), LedgerError> {
    let mut spends = meter_spends(pricer, fleet, cursors);
    for m in unknown_meters(fleet, per_meter, cursors) {
        let spend = stored(m)?.and_then(|c| meter_daily_spend(pricer, fleet, &c));
        spends.push((m.to_string(), spend));
    }
    apply_spends(fleet, per_meter, daily, spends);
    Ok(())
}

/// The meters of the accounts of `cursors` with several meters that have
/// neither a cursor in `cursors` nor a spend in `per_meter`, in fleet order.
fn unknown_meters<'f>(
    fleet: &'f Fleet,
    per_meter: &FxMap<String, Decimal>,
    cursors: &[Cursor],
) -> Vec<&'f str> {
    let mut accounts: Vec<&str> = cursors
        .iter()
        .filter_map(|c| fleet.meters.get(&c.meter_id))
        .map(|m| m.account_id.as_str())
        .collect();
    accounts.sort_unstable();
    accounts.dedup();
    let mut out = Vec::new();
    let mut stepped: Option<std::collections::HashSet<&str>> = None;
    for a in accounts {
        if fleet.meters_of(a).nth(1).is_none() {
            continue; // one meter: its cursor is in `cursors`
        }
        let stepped =
            stepped.get_or_insert_with(|| cursors.iter().map(|c| c.meter_id.as_str()).collect());
        for m in fleet.meters_of(a) {
            let id = m.meter_id.as_str();
            if !per_meter.contains_key(id) && !stepped.contains(id) {
                out.push(id);
            }
        }
    }
    out
}

/// [`meter_daily_spend`] of each cursor's meter (the pure, costly half of
/// [`note_spend`]).
pub fn meter_spends(
    pricer: &dyn Pricer,
    fleet: &Fleet,
    cursors: &[Cursor],
) -> Vec<(String, Option<Decimal>)> {
    cursors
        .iter()
        .map(|c| (c.meter_id.clone(), meter_daily_spend(pricer, fleet, c)))
        .collect()
}

/// Stores meter spends and re-sums the daily spend of their accounts.
pub fn apply_spends(
    fleet: &Fleet,
    per_meter: &mut FxMap<String, Decimal>,
    daily: &mut FxMap<String, Decimal>,
    spends: Vec<(String, Option<Decimal>)>,
) {
    let mut shared: Vec<&str> = Vec::new();
    for (meter_id, spend) in spends {
        let Some(a) = fleet.meters.get(&meter_id).map(|m| m.account_id.as_str()) else {
            continue;
        };
        let single = fleet.meters_of(a).count() == 1;
        match spend {
            Some(s) => {
                if single {
                    set_daily(daily, a, Some(s)); // the account's one meter: its sum
                }
                per_meter.insert(meter_id, s);
            }
            None => {
                if single {
                    set_daily(daily, a, None);
                }
                per_meter.remove(&meter_id);
            }
        }
        if !single {
            shared.push(a);
        }
    }
    // Accounts with several meters: summed once all their spends are in.
    shared.sort_unstable();
    shared.dedup();
    for a in shared {
        let sum = fleet
            .meters_of(a)
            .filter_map(|m| per_meter.get(&m.meter_id).copied())
            .reduce(|x, y| x + y);
        set_daily(daily, a, sum);
    }
}

fn set_daily(daily: &mut FxMap<String, Decimal>, account: &str, spend: Option<Decimal>) {
    match (spend, daily.get_mut(account)) {
        (Some(s), Some(d)) => *d = s,
        (Some(s), None) => {
            daily.insert(account.to_string(), s);
        }
        (None, _) => {
            daily.remove(account);
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
    /// Re-evaluate the alerts and relay rules of every prepaid account this
    /// run did not charge at the end (the time-based rules: grace periods,
    /// protected windows).
    pub evaluate_all: bool,
}

/// One chunk of meters stepped from given cursors: the batch to commit,
/// its stepping counters, the daily spend of its accounts and the accounts
/// it charges nothing.
struct Stepped<'a> {
    batch: Batch,
    local: RunStats,
    daily: FxMap<String, Decimal>,
    uncharged: Vec<&'a str>,
}

/// What stepping a chunk reads; shared by the stepping thread and the
/// committing one (which re-steps a chunk whose cursors moved).
struct Stepper<'p> {
    pricer: &'p (dyn Pricer + Sync),
    fleet: &'p Fleet,
}

impl<'p> Stepper<'p> {
    /// Steps `chunk`'s meters (whole accounts) from `before` (their stored
    /// cursors, in order). `stored` gives the stored cursor of a meter the
    /// chunk does not step (read for accounts with several meters only).
    fn step<'a>(
        &self,
        chunk: &[MeterReadings<'a>],
        before: Vec<Option<Cursor>>,
        stored: &dyn Fn(&str) -> Option<Cursor>,
    ) -> Stepped<'a> {
        let mut batch = Batch::default();
        let mut local = RunStats::default();
        // Each account of the chunk once (a chunk holds every stepped meter
        // of its accounts, in account order).
        let mut accounts: Vec<ChunkAccount<'a, 'p>> = Vec::new();
        for (i, (m, before)) in chunk.iter().zip(before).enumerate() {
            let p = m.meter;
            batch.expect.push((
                p.meter_id().to_string(),
                p.channel().into(),
                before.as_ref().map(Cursor::stamp),
            ));
            // The fleet holds every prepaid meter's account (`Fleet::from_rows`).
            let Some(account) = self.fleet.accounts.get(p.account_id()) else {
                continue;
            };
            let (entries, cur) = deduct_meter(
                self.pricer,
                account,
                p.meter,
                before.clone(),
                &m.readings,
                p.by_interval,
                "prepay-run",
                &mut local,
            );
            if !matches!(accounts.last(), Some(a) if a.id == p.account_id()) {
                accounts.push(ChunkAccount {
                    id: p.account_id(),
                    account,
                    shared: self.fleet.meters_of(p.account_id()).nth(1).is_some(),
                    charged: false,
                    moved: false,
                    spend: None,
                    meters: i..i,
                });
            }
            let a = accounts.last_mut().expect("pushed above");
            a.charged |= !entries.is_empty();
            a.meters.end = i + 1;
            match cur.filter(|c| Some(c) != before.as_ref()) {
                Some(c) => {
                    a.moved = true;
                    a.add(daily_spend_of(self.pricer, account, &c));
                    batch.cursors.push(c);
                }
                // A meter of a shared account that stays where it was still
                // spends: its stored cursor counts in the sum.
                None if a.shared => {
                    a.add(
                        before
                            .as_ref()
                            .and_then(|c| daily_spend_of(self.pricer, account, c)),
                    );
                }
                None => {}
            }
            batch.entries.extend(entries);
        }
        // The daily spend of an account whose cursors this commit moves is
        // the sum over all its meters: those the chunk does not step (no
        // readings in this run) count with their stored cursors.
        let mut daily: FxMap<String, Decimal> = FxMap::default();
        for a in accounts.iter_mut().filter(|a| a.moved) {
            if a.shared {
                let stepped = &chunk[a.meters.clone()];
                for m in self.fleet.meters_of(a.id) {
                    if stepped.iter().any(|r| r.meter.meter_id() == m.meter_id) {
                        continue;
                    }
                    let c = stored(&m.meter_id);
                    let s = c.and_then(|c| daily_spend_of(self.pricer, a.account, &c));
                    a.add(s);
                }
            }
            if let Some(s) = a.spend {
                daily.insert(a.id.to_string(), s);
            }
        }
        let uncharged = accounts
            .into_iter()
            .filter(|a| !a.charged)
            .map(|a| a.id)
            .collect();
        Stepped {
            batch,
            local,
            daily,
            uncharged,
        }
    }

    /// The meters of `chunk`'s accounts with several meters that the chunk
    /// does not step: the ones whose stored cursors [`Stepper::step`] reads.
    fn unstepped<'f>(&'f self, chunk: &[MeterReadings<'_>]) -> Vec<&'f str> {
        let mut out = Vec::new();
        for ms in chunk.chunk_by(|a, b| a.meter.account_id() == b.meter.account_id()) {
            for m in self.fleet.meters_of(ms[0].meter.account_id()) {
                if !ms.iter().any(|r| r.meter.meter_id() == m.meter_id) {
                    out.push(m.meter_id.as_str());
                }
            }
        }
        out
    }
}

/// One account of a chunk as it is stepped.
struct ChunkAccount<'a, 'f> {
    id: &'a str,
    account: &'f Account,
    /// It has several meters.
    shared: bool,
    /// A deduction of this chunk charges it.
    charged: bool,
    /// The chunk moves one of its cursors (the commit evaluates it).
    moved: bool,
    /// Sum of its meters' daily spends (None: no meter has one).
    spend: Option<Decimal>,
    /// Its meters this chunk steps: `chunk[meters]` (no copy per account).
    meters: std::ops::Range<usize>,
}

impl ChunkAccount<'_, '_> {
    fn add(&mut self, s: Option<Decimal>) {
        if let Some(s) = s {
            *self.spend.get_or_insert(Decimal::ZERO) += s;
        }
    }
}

/// Chunks stepped ahead of the one committing.
const AHEAD: usize = 3;

/// Cuts meters (sorted by account) into chunks of about `size` meters,
/// never splitting an account: its daily spend is summed within a chunk.
fn account_chunks<'m, 'a>(
    meters: &'m [MeterReadings<'a>],
    size: usize,
) -> Vec<&'m [MeterReadings<'a>]> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < meters.len() {
        let mut end = (start + size.max(1)).min(meters.len());
        while end < meters.len()
            && meters[end].meter.account_id() == meters[end - 1].meter.account_id()
        {
            end += 1;
        }
        out.push(&meters[start..end]);
        start = end;
    }
    out
}

/// Deducts everything in the lake not yet deducted, through `through_ms`.
///
/// Meters go in account order, in chunks of whole accounts. A second thread
/// steps the chunks up to [`AHEAD`] of the one committing: chunks hold
/// different meters, so stepping one never needs another's cursors.
pub fn run_batch(
    ledger: &mut dyn Ledger,
    pricer: &(dyn Pricer + Sync),
    fleet: &Fleet,
    hook: &mut PrepayHook<'_>,
    opts: &RunOptions<'_>,
) -> Result<RunStats, PrepayError> {
    let mut stats = RunStats::default();
    let t0 = std::time::Instant::now();
    let intervals = interval_meters(pricer, fleet, opts.through_ms);
    // The lake is read on the pool's threads while this one reads the
    // stored cursors (a second day's run has one per meter).
    let (readings, cursors) = std::thread::scope(|scope| {
        let lake = scope.spawn(|| {
            load_register_readings(
                opts.lake,
                fleet,
                pricer,
                &intervals,
                opts.from,
                opts.through_ms,
            )
        });
        // Kept in the vector the ledger returned, found through an index
        // (see `prepay::fleet`): a map would copy them into fresh pages.
        let cursors = ledger.cursors().map(|mut cs| {
            cs.retain(|c| c.channel == deduct_channel(&intervals, &c.meter_id));
            ById::new(cs)
        });
        let readings = lake
            .join()
            .map_err(|_| PrepayError::Input("reading the lake panicked".into()))?;
        Ok::<_, PrepayError>((readings?, cursors?))
    })?;
    stats.meters = readings.len();
    let t_read = t0.elapsed();
    let stepper = Stepper { pricer, fleet };
    // Accounts the run charges nothing (re-evaluated at the end), with the
    // daily spends of those it stepped.
    let mut uncharged: Vec<&str> = Vec::new();
    let mut uncharged_spend: FxMap<String, Decimal> = FxMap::default();
    let chunks = account_chunks(&readings, opts.chunk);
    let befores = |cursors: &ById<Cursor>, chunk: &[MeterReadings<'_>]| -> Vec<Option<Cursor>> {
        chunk
            .iter()
            .map(|m| cursors.get(m.meter.meter_id()).cloned())
            .collect()
    };
    // Where the deduction phase's time goes: waiting for a stepped chunk, committing.
    let (mut waited, mut committed) = (Duration::ZERO, Duration::ZERO);
    let unstepped = std::thread::scope(|scope| -> Result<Vec<&str>, PrepayError> {
        // Accounts with no meter read: found on the second core meanwhile
        // (the readings come in account order).
        let unstepped = opts.evaluate_all.then(|| {
            let readings = &readings;
            scope.spawn(move || {
                let read: Vec<&str> = readings
                    .chunk_by(|a, b| a.meter.account_id() == b.meter.account_id())
                    .map(|ms| ms[0].meter.account_id())
                    .collect();
                fleet
                    .accounts
                    .rows()
                    .iter()
                    .map(|a| a.account_id.as_str())
                    .filter(|a| read.binary_search(a).is_err())
                    .collect::<Vec<&str>>()
            })
        });
        // One thread steps the chunks in order, up to AHEAD of the commits:
        // when a commit runs long (a checkpoint, a page split) the stepping
        // gets ahead, and the next commits need not wait for it. Chunks
        // hold different meters, so no chunk needs another's cursors. It
        // also frees the committed batches.
        let (ready, stepped_rx) = std::sync::mpsc::sync_channel::<Stepped<'_>>(AHEAD);
        let (spent_tx, spent) = std::sync::mpsc::channel::<Batch>();
        let mut stepping = Some({
            let (stepper, chunks, cursors) = (&stepper, &chunks, &cursors);
            scope.spawn(move || {
                for c in chunks {
                    while let Ok(done) = spent.try_recv() {
                        drop(done);
                    }
                    // The committing side stopped (an error): stop too.
                    let stored = |m: &str| cursors.get(m).cloned();
                    if ready
                        .send(stepper.step(c, befores(cursors, c), &stored))
                        .is_err()
                    {
                        return;
                    }
                }
            })
        });
        for chunk in chunks.iter() {
            let waiting = std::time::Instant::now();
            let Ok(mut stepped) = stepped_rx.recv() else {
                // The stepping thread ended before its last chunk: it panicked
                // (joined here, so that the panic becomes this error).
                let _ = stepping.take().map(|h| h.join());
                return Err(PrepayError::Input("stepping a chunk panicked".into()));
            };
            waited += waiting.elapsed();
            let mut attempt = 0;
            loop {
                let Stepped {
                    batch,
                    local,
                    daily,
                    uncharged: none,
                } = stepped;
                hook.daily_spend = daily;
                let committing = std::time::Instant::now();
                let report = ledger.commit(&batch, hook)?;
                committed += committing.elapsed();
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
                    let before = chunk
                        .iter()
                        .map(|m| ledger.cursor(m.meter.meter_id(), m.meter.channel()))
                        .collect::<Result<_, _>>()?;
                    // The other meters of its accounts: read again too.
                    let mut others: FxMap<String, Cursor> = FxMap::default();
                    for m in stepper.unstepped(chunk) {
                        if let Some(c) = ledger.cursor(m, deduct_channel(&intervals, m))? {
                            others.insert(m.to_string(), c);
                        }
                    }
                    let stored = |m: &str| others.get(m).cloned();
                    stepped = stepper.step(chunk, before, &stored);
                    continue;
                }
                stats.chunks += 1;
                stats.absorb(&local, &batch, &report);
                for a in &none {
                    if let Some(s) = hook.daily_spend.get(*a) {
                        uncharged_spend.insert(a.to_string(), *s);
                    }
                }
                uncharged.extend(none);
                // Freed on the stepping thread (gone when it has finished).
                let _ = spent_tx.send(batch);
                // No chunk after this one steps these meters: their new
                // cursors are not kept here.
                break;
            }
        }
        if let Some(h) = stepping.take() {
            h.join()
                .map_err(|_| PrepayError::Input("stepping a chunk panicked".into()))?;
        }
        Ok(match unstepped {
            Some(h) => h
                .join()
                .map_err(|_| PrepayError::Input("listing unread accounts panicked".into()))?,
            None => Vec::new(),
        })
    })?;
    let t_deduct = t0.elapsed();
    if opts.evaluate_all {
        // Accounts a chunk charged were evaluated inside its commit.
        let mut accounts: Vec<String> = uncharged
            .into_iter()
            .chain(unstepped)
            .map(str::to_string)
            .collect();
        accounts.sort_unstable();
        accounts.dedup();
        hook.daily_spend = uncharged_spend;
        for chunk in accounts.chunks(opts.chunk.max(1)) {
            let batch = Batch {
                evaluate: chunk.to_vec(),
                ..Default::default()
            };
            let report = ledger.commit(&batch, hook)?;
            stats.count_outbox(&report.outbox);
        }
    }
    tracing::info!(
        read_s = t_read.as_secs_f64(),
        deduct_s = (t_deduct - t_read).as_secs_f64(),
        waiting_for_steps_s = waited.as_secs_f64(),
        committing_s = committed.as_secs_f64(),
        evaluate_s = (t0.elapsed() - t_deduct).as_secs_f64(),
        "prepay run phases"
    );
    // A million meters' readings: freed on another thread, not in the run's
    // time (what they borrow from the fleet stays here).
    let owned: Vec<Vec<RegisterReading>> = readings.into_iter().map(|m| m.readings).collect();
    std::thread::spawn(move || drop(owned));
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::master::PaymentMode;
    use rust_decimal_macros::dec;

    /// A1 has one meter (M1), A2 two (M2, M3).
    fn fleet() -> Fleet {
        let account = |id: &str| Account {
            account_id: id.into(),
            payment_mode: PaymentMode::Prepaid,
            ..crate::prepay::pricing::tests::account("flat")
        };
        let meter = |id: &str, account: &str| Meter {
            meter_id: id.into(),
            account_id: account.into(),
            ..crate::prepay::deduct::tests::meter()
        };
        Fleet::from_rows(
            vec![account("A1"), account("A2")],
            vec![meter("M1", "A1"), meter("M2", "A2"), meter("M3", "A2")],
        )
    }

    #[test]
    fn daily_spend_sums_every_meter_of_an_account_across_chunks() {
        let f = fleet();
        let (mut per_meter, mut daily) = (FxMap::default(), FxMap::default());
        let spend = |m: &str, s: Option<Decimal>| (m.to_string(), s);
        apply_spends(
            &f,
            &mut per_meter,
            &mut daily,
            vec![spend("M1", Some(dec!(1.5))), spend("M2", Some(dec!(2)))],
        );
        assert_eq!(daily.get("A1"), Some(&dec!(1.5)));
        assert_eq!(daily.get("A2"), Some(&dec!(2)));
        // M3 arrives in the next chunk: A2 is the sum of both meters.
        apply_spends(
            &f,
            &mut per_meter,
            &mut daily,
            vec![spend("M3", Some(dec!(0.25)))],
        );
        assert_eq!(daily.get("A2"), Some(&dec!(2.25)));
        // A meter without a forecast drops out of its account's sum; an
        // account with none left has no daily spend.
        apply_spends(
            &f,
            &mut per_meter,
            &mut daily,
            vec![spend("M2", None), spend("M1", None)],
        );
        assert_eq!(daily.get("A2"), Some(&dec!(0.25)));
        assert_eq!(daily.get("A1"), None);
        // Unknown meters are ignored.
        apply_spends(
            &f,
            &mut per_meter,
            &mut daily,
            vec![spend("X9", Some(dec!(9)))],
        );
        assert_eq!(daily.len(), 1);
    }

    /// Accounts A1 (one meter, `a1_meter`) and A2 (meters M2 and M3) on the
    /// Beijing monthly tariff.
    fn two_accounts(a1_meter: &str) -> Fleet {
        let account = |id: &str| Account {
            account_id: id.into(),
            ..crate::prepay::pricing::tests::account("bj-residential-monthly")
        };
        let meter = |id: &str, account: &str| Meter {
            meter_id: id.into(),
            account_id: account.into(),
            ..crate::prepay::deduct::tests::meter()
        };
        Fleet::from_rows(
            vec![account("A1"), account("A2")],
            vec![meter(a1_meter, "A1"), meter("M2", "A2"), meter("M3", "A2")],
        )
    }

    #[test]
    fn a_chunk_sums_the_stored_cursors_of_the_meters_it_does_not_step() {
        // A1 has one meter (M1), A2 two (M2, M3).
        let f = two_accounts("M1");
        let pricer = crate::prepay::pricing::TariffPricer::new(
            crate::tariff::load_dir(
                &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tariffs"),
            )
            .unwrap(),
        );
        let day = 1_790_784_000_000i64; // 2026-10-01 local midnight
        let days = |per_day: i64, from: i64, to: i64| -> Vec<RegisterReading> {
            (from..to)
                .map(|d| (day + d * DAY_MS, Decimal::from(1000 + per_day * d), None))
                .collect()
        };
        let stored = |m: &str, per_day: i64| {
            let (meter, account) = f.meter_account(m).unwrap();
            let readings = days(per_day, 0, 10);
            let mut stats = RunStats::default();
            deduct_meter(
                &pricer, account, meter, None, &readings, false, "t", &mut stats,
            )
            .1
            .unwrap()
        };
        let (m1, m2, m3) = (stored("M1", 5), stored("M2", 10), stored("M3", 20));
        // Only M1 and M2 have readings in this run: M3 is not in the chunk.
        let chunk: Vec<MeterReadings> = [("M1", 5), ("M2", 10)]
            .into_iter()
            .map(|(m, per_day)| MeterReadings {
                meter: Prepaid::of(&f, m, false).unwrap(),
                readings: days(per_day, 10, 15),
            })
            .collect();
        let stepper = Stepper {
            pricer: &pricer,
            fleet: &f,
        };
        let m3_stored = m3.clone();
        let others = move |m: &str| (m == "M3").then(|| m3_stored.clone());
        assert_eq!(stepper.unstepped(&chunk), ["M3"]);
        let s = stepper.step(&chunk, vec![Some(m1), Some(m2)], &others);
        let spend = |c: &Cursor| meter_daily_spend(&pricer, &f, c).unwrap();
        let (new1, new2) = (&s.batch.cursors[0], &s.batch.cursors[1]);
        assert_eq!(new2.meter_id, "M2");
        assert_eq!(s.daily.get("A1"), Some(&spend(new1)));
        assert_eq!(s.daily.get("A2"), Some(&(spend(new2) + spend(&m3))));
        // Streaming after a restart (no spends in memory): the same sum,
        // M3's stored cursor read once.
        let (mut per_meter, mut daily) = (FxMap::default(), FxMap::default());
        let mut reads = Vec::new();
        note_spend(
            &pricer,
            &f,
            &mut per_meter,
            &mut daily,
            &s.batch.cursors,
            &mut |m| {
                reads.push(m.to_string());
                Ok(others(m))
            },
        )
        .unwrap();
        assert_eq!(reads, ["M3"]);
        assert_eq!(daily, s.daily);
    }

    #[test]
    fn the_hook_applies_thresholds_set_per_class_and_per_tariff() {
        let f = fleet();
        let class = f.accounts.get("A1").unwrap().customer_class.as_str();
        let tariff = f.accounts.get("A1").unwrap().tariff_id.clone();
        let text = format!(
            "[default]\nlevels=[\"20\"]\n[class.{class}]\nlevels=[\"500\"]\n[tariff.{tariff}]\nzero=true\n"
        );
        let th = Thresholds::parse(&text, Path::new("thresholds.toml")).unwrap();
        let hook = PrepayHook {
            now_ms: Some(0),
            ..PrepayHook::new(&th, &f)
        };
        // The class sets the levels, the tariff the zero alert.
        let out = hook.after("A1", dec!(-1), 3, &BTreeSet::new(), 0);
        assert_eq!(out.set_flags, ["alert:below_level:500", "alert:zero:0"]);
        assert_eq!(out.outbox.len(), 2);
        // Above both: nothing raised.
        let out = hook.after("A1", dec!(600), 4, &BTreeSet::new(), 0);
        assert!(out.set_flags.is_empty() && out.outbox.is_empty());
    }

    #[test]
    fn chunks_never_split_an_account() {
        let f = fleet();
        let meters: Vec<MeterReadings> = ["M1", "M2", "M3"]
            .iter()
            .map(|m| MeterReadings {
                meter: Prepaid::of(&f, m, false).unwrap(),
                readings: Vec::new(),
            })
            .collect();
        let names = |cs: Vec<&[MeterReadings]>| -> Vec<Vec<String>> {
            cs.iter()
                .map(|c| c.iter().map(|m| m.meter.meter_id().to_string()).collect())
                .collect()
        };
        // M2 and M3 are A2's: a chunk of one meter grows to hold both.
        assert_eq!(
            names(account_chunks(&meters, 1)),
            [vec!["M1"], vec!["M2", "M3"]]
        );
        assert_eq!(names(account_chunks(&meters, 2)), [vec!["M1", "M2", "M3"]]);
        assert_eq!(names(account_chunks(&meters, 3)), [vec!["M1", "M2", "M3"]]);
        assert!(account_chunks(&[], 5).is_empty());
    }

    fn run<'a>(
        fleet: &'a Fleet,
        m: &str,
        at: (u32, u32),
        rows: &[(i64, i64, Option<usize>)],
    ) -> WantedRun<'a> {
        WantedRun {
            meter: Prepaid::of(fleet, m, false).unwrap(),
            at,
            rows: rows
                .iter()
                .map(|&(ts, v, r)| (ts, Decimal::from(v), r))
                .collect(),
        }
    }

    #[test]
    fn merged_runs_keep_the_first_reading_of_an_instant_and_join_tariff_registers() {
        let f = fleet();
        // Two row groups of M1, in lake order: both read the total at 2000.
        let runs = [
            run(&f, "M1", (0, 0), &[(1000, 10, None), (2000, 20, None)]),
            run(
                &f,
                "M1",
                (1, 0),
                &[(2000, 99, None), (3000, 30, None), (3000, 1, Some(0))],
            ),
        ];
        let m = merge_runs(&runs).unwrap();
        assert_eq!(m.meter.meter_id(), "M1");
        let got: Vec<(i64, Decimal)> = m.readings.iter().map(|r| (r.0, r.1)).collect();
        assert_eq!(
            got,
            [(1000, dec!(10)), (2000, dec!(20)), (3000, dec!(30))],
            "sorted by time, the first of two readings at 2000 kept"
        );
        // T1 alone at 3000 is not all four registers: nothing joins.
        assert!(m.readings.iter().all(|r| r.2.is_none()));
        let four = run(
            &f,
            "M1",
            (0, 0),
            &[
                (5000, 50, None),
                (5000, 1, Some(0)),
                (5000, 2, Some(1)),
                (5000, 3, Some(2)),
                (5000, 4, Some(3)),
            ],
        );
        let m = merge_runs(std::slice::from_ref(&four)).unwrap();
        assert_eq!(m.readings[0].2, Some([dec!(1), dec!(2), dec!(3), dec!(4)]));
        // Tariff registers alone only join a total: no readings.
        let regs = run(&f, "M1", (0, 0), &[(5000, 1, Some(0))]);
        assert!(merge_runs(std::slice::from_ref(&regs)).is_none());
    }

    #[test]
    fn lake_readings_come_in_account_order_whatever_the_meter_order() {
        use crate::store::{Lake, LakeOptions};
        // Z1 (account A1) sorts after M2 and M3 (account A2) by meter id.
        let f = two_accounts("Z1");
        let dir = tempfile::tempdir().unwrap();
        let day = 1_790_784_000_000i64; // 2026-10-01 local midnight
        let total = |m: &str, ts: i64, v: i64| {
            crate::store::scan::tests::reading(m, ts, Channel::ImportActiveTotal, v, Quality::OK)
        };
        // Two commits: two files, each meter's readings in both.
        let mut lake = Lake::open(dir.path(), LakeOptions::new("t")).unwrap();
        for (k, ts) in [day, day + 3_600_000].into_iter().enumerate() {
            let v = 1000 * (k as i64 + 1);
            lake.accept(&[total("Z1", ts, v), total("M2", ts, v), total("M3", ts, v)])
                .unwrap();
            lake.flush().unwrap();
        }
        let pricer = crate::prepay::pricing::TariffPricer::new(
            crate::tariff::load_dir(
                &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tariffs"),
            )
            .unwrap(),
        );
        let from = chrono::NaiveDate::from_ymd_opt(2026, 9, 30).unwrap();
        let got =
            load_register_readings(dir.path(), &f, &pricer, &HashSet::new(), from, day + DAY_MS)
                .unwrap();
        let order: Vec<(&str, &str, usize)> = got
            .iter()
            .map(|m| (m.meter.account_id(), m.meter.meter_id(), m.readings.len()))
            .collect();
        assert_eq!(order, [("A1", "Z1", 2), ("A2", "M2", 2), ("A2", "M3", 2)]);
        assert!(got
            .iter()
            .all(|m| m.readings.windows(2).all(|w| w[0].0 < w[1].0)));
    }
}
