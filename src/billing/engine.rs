//! The in-memory core of a bill run: plan every account, route readings to
//! meter states, then bill every account in parallel. IO lives in `run`.

use std::collections::HashMap;

use rayon::prelude::*;

use super::account::{
    apply_reading, bill_account, plan_account, AccountBill, AccountPlan, Exception,
};
use super::period::BillPeriod;
use super::vee::{MeterState, VeeConfig};
use crate::master::{BillingAccount, Meter};
use crate::model::{Channel, Quality, Reading};
use crate::tariff::TariffSet;

pub use crate::store::scan::{Fx, FxMap};

/// Meter shards for parallel routing. Fixed (not the core count) so that which
/// routing error an account reports first never depends on the machine.
pub const SHARDS: usize = 16;

/// An account that cannot be billed, or a reading that belongs to no account.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ExceptionRow {
    pub account_id: String,
    pub meter_id: String,
    pub code: String,
    pub detail: String,
}

/// Applies one reading to its meter's state; meters without a state and
/// accounts that could not be planned take nothing.
fn route(
    st: Option<&mut MeterState>,
    plan: &Result<AccountPlan<'_>, Exception>,
    r: &crate::store::scan::Row,
    cfg: &VeeConfig,
) -> Result<(), Exception> {
    match (st, plan) {
        (Some(st), Ok(plan)) => apply_reading(st, plan, r.channel, r.ts, r.value, r.quality, cfg),
        _ => Ok(()),
    }
}

/// Accounts, meters and their states for one period.
pub struct Engine<'a> {
    pub period: BillPeriod,
    pub cfg: VeeConfig,
    accounts: Vec<&'a BillingAccount>,
    plans: Vec<Result<AccountPlan<'a>, Exception>>,
    /// Meter id -> dense index.
    pub meter_index: FxMap<&'a str, u32>,
    meters: Vec<&'a Meter>,
    meter_account: Vec<u32>,
    states: Vec<Option<MeterState>>,
    /// Unknown meter ids seen in readings, with counts.
    pub unknown_meters: HashMap<String, u64>,
    pub readings_seen: u64,
    /// Meters attached to no known account (master data problem).
    orphan_meters: Vec<&'a Meter>,
    /// Earlier rows of meter ids that meters.csv lists more than once.
    duplicate_meters: Vec<&'a Meter>,
    /// First error raised while routing readings, per account.
    route_errors: HashMap<u32, Exception>,
    /// Year-to-date kWh at the period start carried from the previous run:
    /// (start of the bill ending where this period starts, its `ytd_kwh_after`).
    pub carried_ytd: HashMap<String, (chrono::NaiveDate, rust_decimal::Decimal)>,
    /// Built when billing starts.
    account_meters: AccountMeters,
}

impl<'a> Engine<'a> {
    pub fn new(
        accounts: &'a [BillingAccount],
        meters: &'a [Meter],
        tariffs: &'a TariffSet,
        period: BillPeriod,
        cfg: VeeConfig,
    ) -> Engine<'a> {
        let mut accs: Vec<&BillingAccount> = accounts.iter().collect();
        accs.sort_by(|a, b| a.account_id.cmp(&b.account_id));
        let account_index: HashMap<&str, u32> = accs
            .iter()
            .enumerate()
            .map(|(i, a)| (a.account_id.as_str(), i as u32))
            .collect();
        let plans: Vec<Result<AccountPlan<'a>, Exception>> = accs
            .par_iter()
            .map(|a| match tariffs.get(&a.tariff_id) {
                Ok(t) => plan_account(t, a, &period),
                Err(e) => Err(Exception::new("unknown_tariff", e.to_string())),
            })
            .collect();
        let mut meter_index = FxMap::with_capacity_and_hasher(meters.len(), Default::default());
        let mut ms = Vec::with_capacity(meters.len());
        let mut meter_account = Vec::with_capacity(meters.len());
        let mut orphan_meters = Vec::new();
        // Dense indexes in meter-id order: lake files are sorted by meter, so
        // routing then walks the states front to back.
        let mut sorted: Vec<&Meter> = meters.iter().collect();
        sorted.sort_by(|a, b| a.meter_id.cmp(&b.meter_id));
        let mut duplicate_meters = Vec::new();
        for (i, &m) in sorted.iter().enumerate() {
            // The last row of a repeated meter id is used (the sort is stable).
            if sorted.get(i + 1).is_some_and(|n| n.meter_id == m.meter_id) {
                duplicate_meters.push(m);
                continue;
            }
            match account_index.get(m.account_id.as_str()) {
                Some(ai) => {
                    meter_index.insert(m.meter_id.as_str(), ms.len() as u32);
                    ms.push(m);
                    meter_account.push(*ai);
                }
                None => orphan_meters.push(m),
            }
        }
        let states: Vec<Option<MeterState>> = ms
            .par_iter()
            .zip(meter_account.par_iter())
            .map(|(m, ai)| match &plans[*ai as usize] {
                Ok(p) => p.meter_state(m),
                Err(_) => None,
            })
            .collect();
        Engine {
            period,
            cfg,
            accounts: accs,
            plans,
            meter_index,
            meters: ms,
            meter_account,
            states,
            unknown_meters: HashMap::new(),
            readings_seen: 0,
            orphan_meters,
            duplicate_meters,
            route_errors: HashMap::new(),
            carried_ytd: HashMap::new(),
            account_meters: AccountMeters::default(),
        }
    }

    /// UTC ms range of readings any meter needs (all bounds, with the
    /// estimation margin), for choosing lake partitions.
    pub fn needed_range(&self) -> Option<(i64, i64)> {
        let mut lo = i64::MAX;
        let mut hi = i64::MIN;
        for s in self.states.iter().flatten() {
            lo = lo.min(s.bounds[0]);
            hi = hi.max(*s.bounds.last().expect("bounds"));
        }
        (lo <= hi).then_some((
            lo - self.cfg.max_interpolation_gap_ms,
            hi + self.cfg.max_interpolation_gap_ms,
        ))
    }

    /// UTC ms range covered by the bill period of any meter (without the
    /// bounds before it, such as tier-year starts).
    pub fn period_window(&self) -> Option<(i64, i64)> {
        let mut lo = i64::MAX;
        let mut hi = i64::MIN;
        for s in self.states.iter().flatten() {
            let (a, b) = s.window();
            lo = lo.min(a);
            hi = hi.max(b);
        }
        (lo <= hi).then_some((lo, hi))
    }

    /// All boundary instants of all meters (UTC ms, deduplicated), for reading
    /// only the partitions around them when intermediate days are not needed.
    pub fn bound_instants(&self) -> Vec<i64> {
        let mut v: Vec<i64> = self
            .states
            .iter()
            .flatten()
            .flat_map(|s| s.bounds.iter().copied())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Routes one reading (value scaled by 10^4) to its meter.
    pub fn apply(&mut self, meter: u32, channel: Channel, ts: i64, value: i64, q: Quality) {
        self.readings_seen += 1;
        let m = meter as usize;
        let row = crate::store::scan::Row {
            meter,
            channel,
            quality: q,
            ts,
            value,
        };
        let ai = self.meter_account[m];
        if let Err(e) = route(
            self.states[m].as_mut(),
            &self.plans[ai as usize],
            &row,
            &self.cfg,
        ) {
            self.route_errors.entry(ai).or_insert(e);
        }
    }

    /// Lends the id -> index map and the meters in index order to a lake
    /// scan, which reads them while the engine updates the states.
    #[allow(clippy::type_complexity)]
    pub fn lend_index(&mut self) -> (FxMap<&'a str, u32>, Vec<&'a Meter>) {
        (
            std::mem::take(&mut self.meter_index),
            std::mem::take(&mut self.meters),
        )
    }

    /// Takes back what [`Engine::lend_index`] lent.
    pub fn return_index(&mut self, index: FxMap<&'a str, u32>, meters: Vec<&'a Meter>) {
        self.meter_index = index;
        self.meters = meters;
    }

    /// Meters per routing shard (see [`SHARDS`]).
    pub fn shard_len(&self) -> u32 {
        crate::store::scan::shard_len(self.states.len(), SHARDS)
    }

    /// Routes decoded lake chunks (in file order), shards in parallel.
    pub fn apply_chunks(&mut self, chunks: &[crate::store::scan::Chunk]) {
        let shard_len = self.shard_len() as usize;
        let (plans, meter_account, cfg) = (&self.plans, &self.meter_account, &self.cfg);
        let routed: Vec<(u64, Vec<(u32, Exception)>)> = self
            .states
            .par_chunks_mut(shard_len)
            .enumerate()
            .map(|(s, states)| {
                let base = s * shard_len;
                let (mut n, mut errors) = (0u64, Vec::new());
                for rows in chunks.iter().filter_map(|c| c.shards.get(s)) {
                    n += rows.len() as u64;
                    for r in rows {
                        let m = r.meter as usize;
                        let ai = meter_account[m];
                        if let Err(e) =
                            route(states[m - base].as_mut(), &plans[ai as usize], r, cfg)
                        {
                            errors.push((ai, e));
                        }
                    }
                }
                (n, errors)
            })
            .collect();
        for (n, errors) in routed {
            self.readings_seen += n;
            for (ai, e) in errors {
                self.route_errors.entry(ai).or_insert(e);
            }
        }
        for c in chunks {
            for (id, n) in &c.unknown {
                self.apply_unknown(id, *n);
            }
        }
    }

    /// Counts `n` readings of a meter id that meters.csv does not list.
    pub fn apply_unknown(&mut self, meter_id: &str, n: u64) {
        self.readings_seen += n;
        *self.unknown_meters.entry(meter_id.to_string()).or_insert(0) += n;
    }

    /// Looks a meter up and applies; unknown meters are counted for the exceptions output.
    pub fn apply_reading(&mut self, r: &Reading) {
        match self.meter_index.get(r.meter_id.as_str()) {
            Some(&i) => {
                let v = crate::store::columns::to_scaled(r.value)
                    .map(|x| x as i64)
                    .unwrap_or(0);
                self.apply(i, r.channel, r.ts_ms, v, r.quality)
            }
            None => self.apply_unknown(&r.meter_id, 1),
        }
    }

    /// Number of accounts, in account-id order (the order bills come out).
    pub fn accounts_len(&self) -> usize {
        self.accounts.len()
    }

    /// Bills accounts `range` (positions in account-id order) in parallel.
    /// Their meter states are moved out and freed, so billing the accounts
    /// range by range never holds every bill and every state at once; each
    /// account is billed once (a second call finds no meter states).
    pub fn bill_range(
        &mut self,
        range: std::ops::Range<usize>,
    ) -> Vec<(&'a BillingAccount, Result<AccountBill, Exception>)> {
        if self.account_meters.is_empty() && !self.accounts.is_empty() {
            self.account_meters = AccountMeters::new(&self.meter_account, self.accounts.len());
        }
        let mut taken: Vec<Vec<(&'a Meter, MeterState)>> = Vec::with_capacity(range.len());
        for ai in range.clone() {
            let mut ms: Vec<(&'a Meter, MeterState)> = self
                .account_meters
                .of(ai)
                .iter()
                .filter_map(|&m| Some((self.meters[m as usize], self.states[m as usize].take()?)))
                .collect();
            ms.sort_by(|a, b| {
                (a.0.installed_on, &a.0.meter_id).cmp(&(b.0.installed_on, &b.0.meter_id))
            });
            taken.push(ms);
        }
        let this = &*self;
        range
            .into_par_iter()
            .zip(taken)
            .map(|(ai, ms)| (this.accounts[ai], this.bill_one(ai, &ms)))
            .collect()
    }

    fn bill_one(&self, ai: usize, ms: &[(&Meter, MeterState)]) -> Result<AccountBill, Exception> {
        let plan = self.plans[ai].as_ref().map_err(|e| e.clone())?;
        if let Some(e) = self.route_errors.get(&(ai as u32)) {
            return Err(e.clone());
        }
        let account = self.accounts[ai];
        let refs: Vec<(&Meter, &MeterState)> = ms.iter().map(|(m, s)| (*m, s)).collect();
        bill_account(
            account,
            plan,
            &refs,
            &self.period,
            &self.cfg,
            self.carried_ytd.get(&account.account_id).copied(),
        )
    }

    /// Exceptions that belong to no billed account: meters of unknown
    /// accounts and readings of unknown meters, sorted.
    pub fn unattached_exceptions(&self) -> Vec<ExceptionRow> {
        let mut exceptions = Vec::new();
        for m in &self.orphan_meters {
            exceptions.push(ExceptionRow {
                account_id: m.account_id.clone(),
                meter_id: m.meter_id.clone(),
                code: "unknown_account".into(),
                detail: format!(
                    "meters.csv names account '{}', which accounts.csv does not have",
                    m.account_id
                ),
            });
        }
        for m in &self.duplicate_meters {
            exceptions.push(ExceptionRow {
                account_id: m.account_id.clone(),
                meter_id: m.meter_id.clone(),
                code: "duplicate_meter".into(),
                detail: format!(
                    "meters.csv lists meter '{}' more than once: its last row is used",
                    m.meter_id
                ),
            });
        }
        let mut unknown: Vec<(&String, &u64)> = self.unknown_meters.iter().collect();
        unknown.sort();
        for (id, n) in unknown {
            exceptions.push(ExceptionRow {
                account_id: String::new(),
                meter_id: id.clone(),
                code: "unknown_meter".into(),
                detail: format!("{n} reading(s) for a meter that meters.csv does not list"),
            });
        }
        exceptions.sort();
        exceptions
    }

    /// Bills every account; results sorted by account id.
    pub fn finish(mut self) -> (Vec<AccountBill>, Vec<ExceptionRow>) {
        let mut bills = Vec::with_capacity(self.accounts.len());
        let mut exceptions = self.unattached_exceptions();
        for (account, r) in self.bill_range(0..self.accounts.len()) {
            match r {
                Ok(b) => bills.push(b),
                Err(e) => exceptions.push(ExceptionRow::account(account, e)),
            }
        }
        exceptions.sort();
        (bills, exceptions)
    }
}

impl ExceptionRow {
    /// An account that could not be billed.
    pub fn account(a: &BillingAccount, e: Exception) -> ExceptionRow {
        ExceptionRow {
            account_id: a.account_id.clone(),
            meter_id: String::new(),
            code: e.code.to_string(),
            detail: e.detail,
        }
    }
}

/// The meters of each account (dense meter indexes, ascending).
#[derive(Default)]
struct AccountMeters {
    offsets: Vec<u32>,
    meters: Vec<u32>,
}

impl AccountMeters {
    fn new(meter_account: &[u32], accounts: usize) -> AccountMeters {
        let (offsets, meters) = crate::master::group_by_account(meter_account, accounts);
        AccountMeters { offsets, meters }
    }

    fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    fn of(&self, account: usize) -> &[u32] {
        &self.meters[self.offsets[account] as usize..self.offsets[account + 1] as usize]
    }
}

/// Bills accounts from readings held in memory (tests, golden vectors, small runs).
pub fn bill_readings(
    accounts: &[BillingAccount],
    meters: &[Meter],
    tariffs: &TariffSet,
    period: BillPeriod,
    readings: &[Reading],
) -> (Vec<AccountBill>, Vec<ExceptionRow>) {
    let mut e = Engine::new(accounts, meters, tariffs, period, VeeConfig::default());
    let mut order: Vec<&Reading> = readings.iter().collect();
    order.sort_by_key(|r| r.ts_ms);
    for r in order {
        e.apply_reading(r);
    }
    e.finish()
}
