//! The in-memory core of a bill run: plan every account, route readings to
//! meter states, then bill every account in parallel. IO lives in `run`.

use std::collections::HashMap;

use rayon::prelude::*;

use super::account::{
    apply_reading, bill_account, plan_account, AccountBill, AccountPlan, Exception,
};
use super::arrears::CarriedYtd;
use super::period::BillPeriod;
use super::vee::{MeterState, VeeConfig};
use crate::master::{BillingAccount, BillingMeter, Meter};
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

/// Who is billed: accounts in id order, each with its meters, and the
/// meters that cannot be billed (no such account, or listed twice). Built
/// once per run; the run bills it in passes of accounts
/// ([`Roster::passes`]), each with its own [`Engine`].
pub struct Roster<'a> {
    accounts: Vec<&'a BillingAccount>,
    /// The meters of account `i` are `meters[starts[i]..starts[i + 1]]`, by id.
    starts: Vec<u32>,
    meters: Vec<&'a BillingMeter>,
    /// The meters of `meters`, in meter-id order.
    by_id: Vec<&'a BillingMeter>,
    /// Meters attached to no known account (master data problem).
    orphan_meters: Vec<&'a BillingMeter>,
    /// Earlier rows of meter ids that meters.csv lists more than once.
    duplicate_meters: Vec<&'a BillingMeter>,
    /// Earlier rows of account ids that accounts.csv lists more than once.
    duplicate_accounts: Vec<&'a BillingAccount>,
    /// meters.csv's rows, which every meter above is one of.
    all_meters: &'a [BillingMeter],
}

/// The readings every account of a roster needs (UTC ms): what to read
/// from the lake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanWindow {
    /// All bounds of all meters, widened by the estimation margin.
    pub lo: i64,
    pub hi: i64,
    /// The bill period as the meters see it (without earlier bounds such
    /// as tier-year starts).
    pub period: (i64, i64),
    /// Every boundary instant, ascending, deduplicated.
    pub bounds: Vec<i64>,
}

/// The pass that bills each attached meter, by meter id: runs of meters,
/// in id order, that one pass bills.
pub struct IdPasses<'r, 'a> {
    roster: &'r Roster<'a>,
    /// Where each run starts in `Roster::by_id`, and its pass.
    runs: Vec<(u32, u32)>,
    passes: usize,
}

/// The passes that bill the meters within a stretch of ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassSpan {
    /// No attached meter has an id there.
    None,
    /// Only this pass's meters have.
    One(usize),
    /// Meters of several passes have.
    Several,
}

impl IdPasses<'_, '_> {
    pub fn passes(&self) -> usize {
        self.passes
    }

    /// The run holding the meter at `by_id[at]`.
    fn run_at(&self, at: usize) -> usize {
        self.runs.partition_point(|r| r.0 as usize <= at) - 1
    }

    /// Which passes bill a meter whose id lies within `lo ..= hi` (byte
    /// order, as Parquet's page statistics). `at`: where the search for the
    /// stretch before ended, and then for this one (a file's pages ascend:
    /// each search gallops on from the last).
    pub fn within(&self, lo: &[u8], hi: &[u8], at: &mut u32) -> PassSpan {
        use crate::store::scan::partition_from;
        let by_id = &self.roster.by_id;
        let n = by_id.len() as u32;
        let id = |i: u32| by_id[i as usize].meter_id.as_bytes();
        let a = partition_from(n, Some(*at), |i| id(i) < lo);
        let b = partition_from(n, Some(a), |i| id(i) <= hi);
        *at = b;
        let (a, b) = (a as usize, b as usize);
        if a >= b {
            return PassSpan::None;
        }
        let r = self.run_at(a);
        let end = self.runs.get(r + 1).map_or(by_id.len(), |n| n.0 as usize);
        if b <= end {
            PassSpan::One(self.runs[r].1 as usize)
        } else {
            PassSpan::Several
        }
    }

    /// The pass that bills meter `id`, if it is an attached meter; `at`
    /// as in [`Roster::has_meter`] (ids searched in ascending order).
    pub fn pass_of(&self, id: &str, at: &mut u32) -> Option<usize> {
        self.roster
            .has_meter(id, at)
            .then(|| self.runs[self.run_at(*at as usize)].1 as usize)
    }
}

/// Where meter `id` is in `meters`, sorted by id with no repeats.
fn position_by_id(meters: &[&BillingMeter], id: &str) -> Option<usize> {
    meters.binary_search_by(|m| (*m.meter_id).cmp(id)).ok()
}

/// `rows` sorted by `id` (stably: rows of one id keep their file order),
/// split into the last row of each id and the earlier rows of repeated ids.
fn last_of_each<T: Sync>(rows: &[T], id: impl Fn(&T) -> &str + Sync) -> (Vec<&T>, Vec<&T>) {
    let mut sorted: Vec<&T> = rows.iter().collect();
    sorted.par_sort_by(|a, b| id(a).cmp(id(b)));
    let mut last = Vec::with_capacity(sorted.len());
    let mut earlier = Vec::new();
    for (i, &r) in sorted.iter().enumerate() {
        if sorted.get(i + 1).is_some_and(|n| id(n) == id(r)) {
            earlier.push(r);
        } else {
            last.push(r);
        }
    }
    (last, earlier)
}

impl<'a> Roster<'a> {
    pub fn new(accounts: &'a [BillingAccount], meters: &'a [BillingMeter]) -> Roster<'a> {
        // An account or meter id listed twice: its last row is used, the
        // earlier ones are reported (an account is not billed without meters).
        let ((accs, duplicate_accounts), (unique, duplicate_meters)) = rayon::join(
            || last_of_each(accounts, |a| &a.account_id),
            || last_of_each(meters, |m| &m.meter_id),
        );
        // Meters in account order (meter-id order within an account), matched
        // to the sorted accounts in one walk: a hash map of millions of
        // account ids costs a cache miss per insert and per lookup.
        let mut by_id = unique;
        let mut unique = by_id.clone();
        unique.par_sort_by(|a, b| a.account_id.cmp(&b.account_id));
        let mut starts = Vec::with_capacity(accs.len() + 1);
        let mut grouped = Vec::with_capacity(unique.len());
        let mut orphan_meters = Vec::new();
        let mut next = 0;
        for a in &accs {
            starts.push(grouped.len() as u32);
            while let Some(m) = unique.get(next) {
                match m.account_id.cmp(&a.account_id) {
                    std::cmp::Ordering::Less => orphan_meters.push(*m),
                    std::cmp::Ordering::Equal => grouped.push(*m),
                    std::cmp::Ordering::Greater => break,
                }
                next += 1;
            }
        }
        starts.push(grouped.len() as u32);
        orphan_meters.extend_from_slice(&unique[next..]);
        if !orphan_meters.is_empty() {
            let orphans: std::collections::HashSet<*const BillingMeter> =
                orphan_meters.iter().map(|m| *m as *const _).collect();
            by_id.retain(|m| !orphans.contains(&(*m as *const _)));
        }
        Roster {
            accounts: accs,
            starts,
            meters: grouped,
            by_id,
            orphan_meters,
            duplicate_meters,
            duplicate_accounts,
            all_meters: meters,
        }
    }

    pub fn accounts_len(&self) -> usize {
        self.accounts.len()
    }

    /// Meters attached to an account (the ones a bill run routes readings to).
    pub fn meters_len(&self) -> usize {
        self.meters.len()
    }

    /// Whether `id` is an attached meter's: one that is not in a pass's
    /// index but is attached belongs to another pass. (Readings of meters of
    /// unknown accounts count as unknown meters, in one pass as in several.)
    /// `at`: where the search for the previous id ended, and then for this
    /// one (a file's ids ascend: the next search gallops on from there
    /// instead of searching all meters again).
    pub fn has_meter(&self, id: &str, at: &mut u32) -> bool {
        let id_of = |i: u32| self.by_id.get(i as usize).map(|m| &*m.meter_id);
        let found = crate::store::scan::search_from(self.by_id.len() as u32, Some(*at), id, id_of);
        *at = found.unwrap_or_else(|at| at);
        found.is_ok()
    }

    /// Which of `passes` bills each meter, for the meters in id order: a
    /// pass's pages are then planned by which passes' meters a page holds
    /// (see [`IdPasses`]).
    pub fn id_passes(&self, passes: &[std::ops::Range<usize>]) -> IdPasses<'_, 'a> {
        // Meters are rows of `all_meters`: a meter's row number is its
        // offset there.
        let size = std::mem::size_of::<BillingMeter>().max(1);
        let base = self.all_meters.as_ptr() as usize;
        let row = |m: &BillingMeter| (m as *const BillingMeter as usize - base) / size;
        let mut pass_of = vec![u32::MAX; self.all_meters.len()];
        for (k, r) in passes.iter().enumerate() {
            for a in r.clone() {
                for m in self.meters_of(a) {
                    pass_of[row(m)] = k as u32;
                }
            }
        }
        let mut runs: Vec<(u32, u32)> = Vec::new();
        for (i, m) in self.by_id.iter().enumerate() {
            let k = pass_of[row(m)];
            if runs.last().is_none_or(|r| r.1 != k) {
                runs.push((i as u32, k));
            }
        }
        IdPasses {
            roster: self,
            runs,
            passes: passes.len(),
        }
    }

    fn meters_of(&self, account: usize) -> &[&'a BillingMeter] {
        &self.meters[self.starts[account] as usize..self.starts[account + 1] as usize]
    }

    /// Splits the accounts (in id order) into passes of whole blocks of
    /// `block` accounts, each with at most `max_meters` meters unless one
    /// block alone has more. Passes on block boundaries keep the output
    /// batches, and so the bytes, the same for any pass size. Always at
    /// least one pass (an empty one for no accounts).
    ///
    /// What would be left for a last pass of at most an eighth of the budget
    /// joins the pass before instead: a pass has costs whatever its size
    /// (its states and plans, the row groups at its edges; in a lake not
    /// sorted by meter id, some pages of every file).
    pub fn passes(&self, max_meters: usize, block: usize) -> Vec<std::ops::Range<usize>> {
        let n = self.accounts.len();
        let block = block.max(1);
        let meters =
            |r: std::ops::Range<usize>| (self.starts[r.end] - self.starts[r.start]) as usize;
        let mut out = Vec::new();
        let mut start = 0;
        while start < n {
            let mut end = (start + block).min(n);
            while end < n {
                let next = (end + block).min(n);
                if meters(start..next) > max_meters {
                    break;
                }
                end = next;
            }
            if meters(end..n) <= max_meters / 8 {
                end = n;
            }
            out.push(start..end);
            start = end;
        }
        if out.is_empty() {
            out.push(0..0);
        }
        out
    }

    /// What the lake scan must cover for every account (plans are made and
    /// dropped here, so this holds no per-meter state).
    /// `carried`: annual positions carried from the previous run; an
    /// account that has one needs no reading near its tier-year start.
    pub fn scan_window(
        &self,
        tariffs: &TariffSet,
        period: &BillPeriod,
        cfg: &VeeConfig,
        carried: &super::arrears::CarriedYtd,
    ) -> Option<ScanWindow> {
        #[derive(Clone)]
        struct Acc {
            lo: i64,
            hi: i64,
            plo: i64,
            phi: i64,
            bounds: std::collections::BTreeSet<i64>,
        }
        let empty = || Acc {
            lo: i64::MAX,
            hi: i64::MIN,
            plo: i64::MAX,
            phi: i64::MIN,
            bounds: Default::default(),
        };
        let acc = (0..self.accounts.len())
            .into_par_iter()
            .fold(empty, |mut acc, ai| {
                let a = self.accounts[ai];
                let Ok(t) = tariffs.get(&a.tariff_id) else {
                    return acc;
                };
                let Ok(plan) = plan_account(t, a, period) else {
                    return acc;
                };
                // A carried position needs no reading near the tier-year start.
                let skip = if plan
                    .carried_ytd(carried.get(&*a.account_id).copied())
                    .is_some()
                {
                    plan.first
                } else {
                    0
                };
                for m in self.meters_of(ai) {
                    let Some(mut b) = plan.meter_bounds(m) else {
                        continue;
                    };
                    b.drain(..skip);
                    let last = *b.last().expect("bounds");
                    if skip > 0 && b[0] >= last {
                        continue; // it counted only towards the carried position
                    }
                    acc.lo = acc.lo.min(b[0]);
                    acc.hi = acc.hi.max(last);
                    // A meter exchanged out before the period reads only
                    // near its bounds, not the period's days.
                    if b[plan.first - skip] < last {
                        acc.plo = acc.plo.min(b[plan.first - skip]);
                        acc.phi = acc.phi.max(last);
                    }
                    acc.bounds.extend(b);
                }
                acc
            })
            .reduce(empty, |mut a, mut b| {
                a.lo = a.lo.min(b.lo);
                a.hi = a.hi.max(b.hi);
                a.plo = a.plo.min(b.plo);
                a.phi = a.phi.max(b.phi);
                a.bounds.append(&mut b.bounds);
                a
            });
        (acc.lo <= acc.hi).then(|| ScanWindow {
            lo: acc.lo - cfg.max_interpolation_gap_ms,
            hi: acc.hi + cfg.max_interpolation_gap_ms,
            period: (acc.plo, acc.phi),
            bounds: acc.bounds.into_iter().collect(),
        })
    }

    /// Exceptions of meters that cannot be billed: of unknown accounts, and
    /// the earlier rows of repeated ids.
    pub fn exceptions(&self) -> Vec<ExceptionRow> {
        let mut exceptions = Vec::new();
        for m in &self.orphan_meters {
            exceptions.push(ExceptionRow {
                account_id: m.account_id.to_string(),
                meter_id: m.meter_id.to_string(),
                code: "unknown_account".into(),
                detail: format!(
                    "meters.csv names account '{}', which accounts.csv does not have",
                    m.account_id
                ),
            });
        }
        for a in &self.duplicate_accounts {
            exceptions.push(ExceptionRow {
                account_id: a.account_id.to_string(),
                meter_id: String::new(),
                code: "duplicate_account".into(),
                detail: format!(
                    "accounts.csv lists account '{}' more than once: its last row is billed",
                    a.account_id
                ),
            });
        }
        for m in &self.duplicate_meters {
            exceptions.push(ExceptionRow {
                account_id: m.account_id.to_string(),
                meter_id: m.meter_id.to_string(),
                code: "duplicate_meter".into(),
                detail: format!(
                    "meters.csv lists meter '{}' more than once: its last row is used",
                    m.meter_id
                ),
            });
        }
        exceptions
    }
}

/// One pass of a bill run: its accounts, their meters and meter states.
pub struct Engine<'a> {
    pub period: BillPeriod,
    pub cfg: VeeConfig,
    accounts: Vec<&'a BillingAccount>,
    plans: Vec<Result<AccountPlan<'a>, Exception>>,
    /// Dense index -> meter, ascending by meter id (unique: the roster
    /// keeps one row per id), so an id's index is found by a search.
    meters: Vec<&'a BillingMeter>,
    meter_account: Vec<u32>,
    states: Vec<Option<MeterState>>,
    /// Unknown meter ids seen in readings, with counts.
    pub unknown_meters: HashMap<String, u64>,
    pub readings_seen: u64,
    /// First error raised while routing readings, per account.
    route_errors: HashMap<u32, Exception>,
    /// Built when billing starts.
    account_meters: AccountMeters,
}

impl<'a> Engine<'a> {
    /// The engine of accounts `range` of `roster` (positions in account-id
    /// order): plans, the meter index and a state per meter.
    pub fn new(
        roster: &Roster<'a>,
        range: std::ops::Range<usize>,
        tariffs: &'a TariffSet,
        period: BillPeriod,
        cfg: VeeConfig,
    ) -> Engine<'a> {
        let accs: Vec<&BillingAccount> = roster.accounts[range.clone()].to_vec();
        let plans: Vec<Result<AccountPlan<'a>, Exception>> = accs
            .par_iter()
            .map(|a| match tariffs.get(&a.tariff_id) {
                Ok(t) => plan_account(t, a, &period),
                Err(e) => Err(Exception::new("unknown_tariff", e.to_string())),
            })
            .collect();
        // Dense indexes in meter-id order: lake files are sorted by meter, so
        // routing then walks the states front to back.
        let mut owned: Vec<(&BillingMeter, u32)> = range
            .clone()
            .flat_map(|ai| {
                let local = (ai - range.start) as u32;
                roster.meters_of(ai).iter().map(move |m| (*m, local))
            })
            .collect();
        owned.par_sort_unstable_by(|a, b| a.0.meter_id.cmp(&b.0.meter_id));
        debug_assert!(owned.windows(2).all(|w| w[0].0.meter_id < w[1].0.meter_id));
        let (ms, meter_account): (Vec<&BillingMeter>, Vec<u32>) = owned.into_iter().unzip();
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
            meters: ms,
            meter_account,
            states,
            unknown_meters: HashMap::new(),
            readings_seen: 0,
            route_errors: HashMap::new(),
            account_meters: AccountMeters::default(),
        }
    }

    /// The ids of this pass's meters, ascending.
    pub fn meter_ids(&self) -> Vec<&'a str> {
        self.meters.iter().map(|m| &*m.meter_id).collect()
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

    /// Lends the meters in index order (ascending ids, see
    /// [`crate::store::scan::Others::Sorted`]) to a lake scan, which reads
    /// them while the engine updates the states.
    pub fn lend_index(&mut self) -> Vec<&'a BillingMeter> {
        std::mem::take(&mut self.meters)
    }

    /// Takes back what [`Engine::lend_index`] lent.
    pub fn return_index(&mut self, meters: Vec<&'a BillingMeter>) {
        self.meters = meters;
    }

    /// The dense index of meter `id`.
    fn index_of(&self, id: &str) -> Option<u32> {
        position_by_id(&self.meters, id).map(|i| i as u32)
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
                for rows in chunks.iter().map(|c| c.shard(s)) {
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
        match self.index_of(&r.meter_id) {
            Some(i) => match crate::store::columns::to_scaled(r.value)
                .ok()
                .and_then(|x| i64::try_from(x).ok())
            {
                Some(v) => self.apply(i, r.channel, r.ts_ms, v, r.quality),
                // The lake refuses such values; held in memory they would
                // otherwise be billed as 0.
                None => {
                    self.readings_seen += 1;
                    let ai = self.meter_account[i as usize];
                    self.route_errors.entry(ai).or_insert_with(|| {
                        Exception::new(
                            "bad_reading",
                            format!(
                                "meter {}: value {} of {} does not fit the lake's DECIMAL(18, 4)",
                                r.meter_id, r.value, r.channel
                            ),
                        )
                    });
                }
            },
            None => self.apply_unknown(&r.meter_id, 1),
        }
    }

    /// Number of accounts, in account-id order (the order bills come out).
    pub fn accounts_len(&self) -> usize {
        self.accounts.len()
    }

    /// Accounts `range`, in the order `bill_range` bills them.
    pub fn accounts(&self, range: std::ops::Range<usize>) -> &[&'a BillingAccount] {
        &self.accounts[range]
    }

    /// Bills accounts `range` (positions in account-id order) in parallel.
    /// Their meter states are moved out and freed, so billing the accounts
    /// range by range never holds every bill and every state at once; each
    /// account is billed once (a second call finds no meter states).
    /// `carried`: annual-tier positions carried from the previous run.
    pub fn bill_range(
        &mut self,
        range: std::ops::Range<usize>,
        carried: &CarriedYtd,
    ) -> Vec<(&'a BillingAccount, Result<AccountBill, Exception>)> {
        if self.account_meters.is_empty() && !self.accounts.is_empty() {
            self.account_meters = AccountMeters::new(&self.meter_account, self.accounts.len());
        }
        let mut taken: Vec<Vec<(&'a BillingMeter, MeterState)>> = Vec::with_capacity(range.len());
        for ai in range.clone() {
            let mut ms: Vec<(&'a BillingMeter, MeterState)> = self
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
            .map(|(ai, ms)| (this.accounts[ai], this.bill_one(ai, &ms, carried)))
            .collect()
    }

    fn bill_one(
        &self,
        ai: usize,
        ms: &[(&BillingMeter, MeterState)],
        carried: &CarriedYtd,
    ) -> Result<AccountBill, Exception> {
        let plan = self.plans[ai].as_ref().map_err(|e| e.clone())?;
        if let Some(e) = self.route_errors.get(&(ai as u32)) {
            return Err(e.clone());
        }
        let account = self.accounts[ai];
        let refs: Vec<(&BillingMeter, &MeterState)> = ms.iter().map(|(m, s)| (*m, s)).collect();
        bill_account(
            account,
            plan,
            &refs,
            &self.period,
            &self.cfg,
            carried.get(&*account.account_id).copied(),
        )
    }

    /// Bills every account; results sorted by account id.
    pub fn finish(mut self) -> (Vec<AccountBill>, Vec<ExceptionRow>) {
        let mut bills = Vec::with_capacity(self.accounts.len());
        let mut exceptions = unknown_meter_exceptions(&self.unknown_meters);
        for (account, r) in self.bill_range(0..self.accounts.len(), &CarriedYtd::new()) {
            match r {
                Ok(b) => bills.push(b),
                Err(e) => exceptions.push(ExceptionRow::account(account, e)),
            }
        }
        exceptions.sort();
        (bills, exceptions)
    }
}

/// Readings of meters that meters.csv does not list (id -> count), sorted by meter id.
pub fn unknown_meter_exceptions(unknown: &HashMap<String, u64>) -> Vec<ExceptionRow> {
    let mut unknown: Vec<(&String, &u64)> = unknown.iter().collect();
    unknown.sort();
    unknown
        .into_iter()
        .map(|(id, n)| ExceptionRow {
            account_id: String::new(),
            meter_id: id.clone(),
            code: "unknown_meter".into(),
            detail: format!("{n} reading(s) for a meter that meters.csv does not list"),
        })
        .collect()
}

impl ExceptionRow {
    /// An account that could not be billed.
    pub fn account(a: &BillingAccount, e: Exception) -> ExceptionRow {
        ExceptionRow {
            account_id: a.account_id.to_string(),
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
    let meters: Vec<BillingMeter> = meters.iter().map(BillingMeter::from).collect();
    let roster = Roster::new(accounts, &meters);
    let all = 0..roster.accounts_len();
    let mut e = Engine::new(&roster, all, tariffs, period, VeeConfig::default());
    let mut order: Vec<&Reading> = readings.iter().collect();
    order.sort_by_key(|r| r.ts_ms);
    for r in order {
        e.apply_reading(r);
    }
    let (bills, mut exceptions) = e.finish();
    exceptions.extend(roster.exceptions());
    exceptions.sort();
    (bills, exceptions)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::master::{CustomerClass, PaymentMode};
    use rust_decimal::Decimal;

    pub(crate) fn account(id: &str) -> BillingAccount {
        BillingAccount {
            account_id: id.into(),
            tariff_id: "t".into(),
            contracted_kva: Decimal::ZERO,
            opened_on: chrono::NaiveDate::from_ymd_opt(2020, 1, 1).unwrap(),
            customer_class: CustomerClass::Residential,
            payment_mode: PaymentMode::Postpaid,
        }
    }

    pub(crate) fn meter(id: &str, account: &str) -> BillingMeter {
        BillingMeter {
            meter_id: id.into(),
            account_id: account.into(),
            multiplier: Decimal::ONE,
            register_digits: 6,
            installed_on: chrono::NaiveDate::from_ymd_opt(2020, 1, 1).unwrap(),
            removed_on: None,
        }
    }

    /// Ten accounts a0..a9; account i has i % 3 + 1 meters.
    fn roster_parts() -> (Vec<BillingAccount>, Vec<BillingMeter>) {
        let accounts: Vec<BillingAccount> =
            (0..10).rev().map(|i| account(&format!("a{i}"))).collect();
        let mut meters = Vec::new();
        for i in 0..10 {
            for k in 0..(i % 3 + 1) {
                meters.push(meter(&format!("m{i}-{k}"), &format!("a{i}")));
            }
        }
        (accounts, meters)
    }

    #[test]
    fn passes_are_whole_blocks_within_the_meter_budget_and_a_small_rest_joins_the_last() {
        let (accounts, meters) = roster_parts();
        let r = Roster::new(&accounts, &meters);
        // Meters per account: 1 2 3 1 2 3 1 2 3 1 (19 in all).
        assert_eq!(r.passes(usize::MAX, 2), vec![0..10]);
        // Blocks of two accounts: 3, 4, 5, 3, 4 meters.
        assert_eq!(r.passes(7, 2), vec![0..4, 4..6, 6..10]);
        // A block larger than the budget is a pass of its own.
        assert_eq!(r.passes(1, 2), vec![0..2, 2..4, 4..6, 6..8, 8..10]);
        assert_eq!(r.passes(1, 4), vec![0..4, 4..8, 8..10]);
        // Accounts one by one: 15 meters, then 4 left (more than 16 / 8).
        assert_eq!(r.passes(16, 1), vec![0..8, 8..10]);
        // 18 meters, then 1 left: at most 18 / 8, so it joins the pass.
        assert_eq!(r.passes(18, 1), vec![0..10]);
        let none = Roster::new(&[], &[]);
        assert_eq!(none.passes(5, 2), vec![0..0], "one empty pass");
    }

    #[test]
    fn a_pass_engine_holds_only_the_meters_of_its_accounts_in_id_order() {
        let (accounts, mut meters) = roster_parts();
        meters.push(meter("m-orphan", "nobody"));
        meters.push(meter("m1-0", "a2")); // a repeated id: this last row wins
        let r = Roster::new(&accounts, &meters);
        assert_eq!(
            r.meters_len(),
            19,
            "the orphan and the earlier m1-0 are out"
        );
        let codes: Vec<(String, String)> = r
            .exceptions()
            .into_iter()
            .map(|e| (e.meter_id, e.code))
            .collect();
        assert_eq!(
            codes,
            vec![
                ("m-orphan".to_string(), "unknown_account".to_string()),
                ("m1-0".to_string(), "duplicate_meter".to_string())
            ]
        );
        let tariffs = TariffSet::default();
        let period = BillPeriod::parse("2026-10").unwrap();
        let e = Engine::new(&r, 2..4, &tariffs, period, VeeConfig::default());
        // a2 has m2-0..m2-2 and now m1-0; a3 has m3-0.
        assert_eq!(e.meter_ids(), vec!["m1-0", "m2-0", "m2-1", "m2-2", "m3-0"]);
        assert_eq!(e.accounts_len(), 2);
        let ids: Vec<&str> = r.by_id.iter().map(|m| &*m.meter_id).collect();
        assert_eq!(ids.len(), 19);
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        // Another pass's meter is known; an orphan's readings stay unknown
        // meters' however the passes fall.
        // In file order from one hint, and each from a hint left anywhere.
        let known = |id: &str| ids.contains(&id);
        let queries = ["m-orphan", "m1-0", "m2-1", "m5", "m9-0", "m9-9"];
        let mut at = 0;
        for id in queries {
            assert_eq!(r.has_meter(id, &mut at), known(id), "{id}");
            for start in [0, 7, 18, 19, 40] {
                assert_eq!(
                    r.has_meter(id, &mut { start }),
                    known(id),
                    "{id} from {start}"
                );
            }
        }
        assert!(known("m1-0") && known("m9-0") && !known("m-orphan") && !known("m9-9"));
    }

    #[test]
    fn a_stretch_of_ids_names_the_one_pass_that_bills_its_meters_or_says_several() {
        let (accounts, mut meters) = roster_parts();
        // a1's meter exchanged for one whose id sorts after every other.
        meters.push(meter("z1", "a1"));
        let r = Roster::new(&accounts, &meters);
        let passes = vec![0..4, 4..6, 6..10];
        let p = r.id_passes(&passes);
        assert_eq!(p.passes(), 3);
        let within = |lo: &str, hi: &str| {
            let exact = p.within(lo.as_bytes(), hi.as_bytes(), &mut 0);
            // The same from wherever the search before ended.
            for start in [0, 5, 19, 20, 99] {
                let from = p.within(lo.as_bytes(), hi.as_bytes(), &mut { start });
                assert_eq!(from, exact, "{lo}..={hi} from {start}");
            }
            exact
        };
        assert_eq!(within("m0-0", "m3-0"), PassSpan::One(0));
        assert_eq!(within("m4-0", "m5-2"), PassSpan::One(1));
        assert_eq!(within("m5-9", "m5-99"), PassSpan::None, "no meter between");
        assert_eq!(within("m3-0", "m4-0"), PassSpan::Several);
        // A stretch ending past the last ids: a1's z1 is pass 0's, the rest
        // between them pass 2's.
        assert_eq!(within("m9-0", "z1"), PassSpan::Several);
        assert_eq!(within("z", "zz"), PassSpan::One(0));
        let mut at = 0;
        let found: Vec<Option<usize>> = ["m0-0", "m4-1", "m5", "m9-0", "z1", "zz"]
            .into_iter()
            .map(|id| p.pass_of(id, &mut at))
            .collect();
        assert_eq!(found, vec![Some(0), Some(1), None, Some(2), Some(0), None]);
    }
}
