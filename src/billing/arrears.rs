//! Late-payment fees on a postpaid account's overdue bills, and the arrears
//! state a run carries forward (`arrears.parquet`).
//!
//! Each overdue day is charged once, on the bill of the period the day falls
//! in: the fee on this period's bill covers the days of this period after a
//! prior bill's due date on which part of it was still unpaid. Payments are
//! applied to the oldest bill first (a payment made on a day stops that day's
//! fee). The rule's minimum applies to the fee of one bill.
//!
//! Payments settle bills as a waterfall (oldest due first), so applying the
//! payments up to a day and then the later ones gives what applying them all
//! at once gives. A run therefore writes, per account, what is still owed at
//! its last day, the credit left and the payments it counted; the next run
//! continues from that instead of the whole history (docs/billing.md).

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, Decimal128Array, Int64Array, StringArray};
use chrono::{Datelike, NaiveDate};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rayon::prelude::*;
use rust_decimal::Decimal;

use super::account::{AccountBill, BillLine};
use super::flags::Flags;
use super::payments::Payments;
use super::period::BillPeriod;
use super::run::BillingError;
use crate::master::{BillingAccount, CustomerClass, PaymentMode};
use crate::store::scan::FxMap;
use crate::tariff::late_fee::LateFeeRule;
use crate::tariff::price::{ChargeLine, LineKind};
use crate::tariff::rounding::Rounding;
use crate::tariff::{TariffSet, TariffVersion};

/// Line index of late-fee lines (see `ChargeLine::label`).
pub const RESIDENTIAL: u8 = 0;
pub const CURRENT_YEAR: u8 = 1;
pub const EARLIER_YEARS: u8 = 2;
pub const MINIMUM: u8 = 3;

/// The arrears state in a run directory (and in each `revision-N/`).
pub const STATE_FILE: &str = "arrears.parquet";
/// Parquet key-value metadata of the state: the run ids of the revisions
/// whose amounts it reflects, sorted, comma-separated.
pub const SEEN_KEY: &str = "meterflow.revisions_seen";
/// Parquet key-value metadata of the state: the run directories whose bills
/// it counted (canonical paths) with the number of revisions seen in each,
/// a JSON object `{"dir": n, ...}`.
pub const RUNS_KEY: &str = "meterflow.runs_counted";

/// An issued bill of an earlier period.
#[derive(Debug, Clone, PartialEq)]
pub struct PriorBill {
    pub period: String,
    /// First day of `period`.
    pub start: NaiveDate,
    pub due: NaiveDate,
    pub amount: Decimal,
}

/// Issued bills by account, read from earlier runs (`--previous`).
pub type PriorBills = BTreeMap<String, Vec<PriorBill>>;

/// Reads `bills.parquet` of each run directory; a run's revisions
/// (`revision-N/`) replace the totals of the accounts they adjust.
/// Bills without a due date (runs of accounts without a late-fee rule) are skipped.
pub fn read_prior_bills(dirs: &[PathBuf]) -> Result<PriorBills, BillingError> {
    let mut out: PriorBills = BTreeMap::new();
    for dir in dirs {
        let mut latest: BTreeMap<String, PriorBill> = BTreeMap::new();
        for f in bills_files(dir) {
            read_bills_file(&f, &mut latest)?;
        }
        if out.is_empty() {
            out = latest.into_iter().map(|(a, b)| (a, vec![b])).collect();
            continue;
        }
        for (account, b) in latest {
            out.entry(account).or_default().push(b);
        }
    }
    for bills in out.values_mut() {
        bills.sort_by(|a, b| (a.due, &a.period).cmp(&(b.due, &b.period)));
        bills.dedup_by(|a, b| a.period == b.period);
    }
    Ok(out)
}

/// `bills.parquet` of a run directory, then of its revisions in order.
fn bills_files(dir: &Path) -> Vec<PathBuf> {
    let mut v = vec![dir.join("bills.parquet")];
    let mut n = 1;
    while dir
        .join(format!("revision-{n}"))
        .join("bills.parquet")
        .exists()
    {
        v.push(dir.join(format!("revision-{n}")).join("bills.parquet"));
        n += 1;
    }
    v
}

/// Year-to-date kWh at the period start carried from the previous run, by
/// account: (start of the bill ending where this period starts, its
/// `ytd_kwh_after`).
pub type CarriedYtd = std::collections::HashMap<String, (NaiveDate, Decimal)>;

/// Year-to-date positions to carry into a period starting on `start`: for
/// every account whose bill in `dirs` ends on `start`, (that bill's start,
/// its `ytd_kwh_after`). Revisions replace the values of the accounts they adjust.
pub fn read_carried_ytd(dirs: &[PathBuf], start: NaiveDate) -> Result<CarriedYtd, BillingError> {
    let mut out = std::collections::HashMap::new();
    let mut periods = Memo::new();
    for f in dirs.iter().flat_map(|d| bills_files(d)) {
        for_each_bill(&f, |r, bad| {
            let Some(ytd) = r.ytd_after else {
                return Ok(());
            };
            let p = periods.get(r.period, BillPeriod::parse).map_err(bad)?;
            if p.end == start {
                out.insert(r.account.to_string(), (p.start, ytd));
            }
            Ok(())
        })?;
    }
    Ok(out)
}

fn read_bills_file(path: &Path, out: &mut BTreeMap<String, PriorBill>) -> Result<(), BillingError> {
    let (mut dues, mut periods) = (Memo::new(), Memo::new());
    let mut rows = Vec::new();
    for_each_bill(path, |r, bad| {
        // Bills without a due date (or runs written before due dates existed): nothing to charge on.
        let Some(due) = r.due else { return Ok(()) };
        let d: NaiveDate = dues
            .get(due, str::parse)
            .map_err(|e| bad(format!("due_date '{due}': {e}")))?;
        let p = periods.get(r.period, BillPeriod::parse).map_err(bad)?;
        rows.push((
            r.account.to_string(),
            PriorBill {
                period: r.period.to_string(),
                start: p.start,
                due: d,
                amount: r.total,
            },
        ));
        Ok(())
    })?;
    // Later rows replace earlier ones either way; built from a list (sorted
    // once, in account order already) instead of a million inserts.
    if out.is_empty() {
        *out = rows.into_iter().collect();
    } else {
        out.extend(rows);
    }
    Ok(())
}

/// One row of an issued `bills.parquet`, as late fees and tier carry-over read it.
pub(super) struct BillRow<'a> {
    pub run_id: &'a str,
    pub account: &'a str,
    pub period: &'a str,
    pub total: Decimal,
    pub due: Option<&'a str>,
    pub ytd_after: Option<Decimal>,
}

/// A decimal cell (None when null or out of `Decimal`'s range).
fn dec_at(a: &Decimal128Array, i: usize) -> Option<Decimal> {
    if a.is_null(i) {
        return None;
    }
    Decimal::try_from_i128_with_scale(a.value(i), a.scale().max(0) as u32).ok()
}

/// Calls `f` for every row of a bills file; `f` gets an error builder naming the file.
pub(super) fn for_each_bill(
    path: &Path,
    mut f: impl FnMut(BillRow<'_>, &dyn Fn(String) -> BillingError) -> Result<(), BillingError>,
) -> Result<(), BillingError> {
    let bad = |what: String| BillingError::Invalid(format!("{}: {what}", path.display()));
    let file = File::open(path).map_err(super::run::io(path))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| bad(e.to_string()))?;
    for batch in reader {
        let batch = batch.map_err(|e| bad(e.to_string()))?;
        let col = |name: &str| batch.column_by_name(name).map(|c| c.as_any());
        let text = |name: &str| col(name).and_then(|c| c.downcast_ref::<StringArray>());
        let decimal = |name: &str| col(name).and_then(|c| c.downcast_ref::<Decimal128Array>());
        let (Some(acc), Some(per), Some(total)) =
            (text("account_id"), text("period"), decimal("total"))
        else {
            return Err(bad("unexpected bills schema".into()));
        };
        // Optional: runs written before these columns existed.
        let (due, ytd, run) = (text("due_date"), decimal("ytd_kwh_after"), text("run_id"));
        for i in 0..batch.num_rows() {
            // A bill without a total would forgive a debt: a broken file.
            let no_total = || bad(format!("the bill of {} has no total", acc.value(i)));
            f(
                BillRow {
                    run_id: run.map_or("", |r| r.value(i)),
                    account: acc.value(i),
                    period: per.value(i),
                    total: dec_at(total, i).ok_or_else(no_total)?,
                    due: due.filter(|d| !d.is_null(i)).map(|d| d.value(i)),
                    ytd_after: ytd.and_then(|y| dec_at(y, i)),
                },
                &bad,
            )?;
        }
    }
    Ok(())
}

/// A bill and what is still unpaid of it.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenBill {
    pub bill: PriorBill,
    pub unpaid: Decimal,
}

/// The payments a state counted: those dated on or before its day.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counted {
    pub count: u64,
    pub sum: Decimal,
    /// Day of the last one.
    pub last: Option<NaiveDate>,
}

impl Counted {
    fn add(&mut self, day: NaiveDate, amount: Decimal) {
        self.count += 1;
        self.sum += amount;
        self.last = self.last.max(Some(day));
    }

    /// The payments dated on or before `day` (`payments` sorted by day).
    fn through(payments: &[(NaiveDate, Decimal)], day: NaiveDate) -> Counted {
        let mut c = Counted::default();
        for &(d, x) in payments.iter().take_while(|p| p.0 <= day) {
            c.add(d, x);
        }
        c
    }
}

/// One account's arrears at the end of a day (its rows of `arrears.parquet`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AccountArrears {
    /// Bills still (partly) unpaid, oldest due first.
    pub open: Vec<OpenBill>,
    /// Paid beyond every bill counted: it pays the next ones.
    pub credit: Decimal,
    pub counted: Counted,
    /// First day of the earliest bill counted: a whole history starts there.
    pub history_from: Option<NaiveDate>,
    /// Latest due date of any bill counted, paid or not (credit notes aside).
    pub last_due: Option<NaiveDate>,
    /// Set for an account carried unchanged from an earlier state (it was
    /// not in accounts.csv): the day that state was written. None: the
    /// state's own day.
    pub as_of: Option<NaiveDate>,
}

/// Where an account's fees start in this run: a carried state (`after` is
/// its day) with the bills of the later `--previous` runs added, or the
/// whole history of the given runs (`after` None).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Start {
    pub after: Option<NaiveDate>,
    pub from: AccountArrears,
}

/// The waterfall shared by the fees and the carried state: `paid` (payments
/// and credit) settles the bills oldest due first (`bills` in that order); a
/// negative bill (a credit note) is credit too. Calls `f` with each positive
/// bill and what is still unpaid of it; returns the credit left.
pub fn settle<B>(
    bills: &[B],
    amount: impl Fn(&B) -> Decimal,
    paid: Decimal,
    mut f: impl FnMut(&B, Decimal),
) -> Decimal {
    let notes: Decimal = bills
        .iter()
        .map(&amount)
        .filter(|x| *x < Decimal::ZERO)
        .sum();
    let mut pool = paid - notes;
    for b in bills {
        let x = amount(b);
        if x <= Decimal::ZERO {
            continue;
        }
        let take = pool.min(x).max(Decimal::ZERO);
        pool -= take;
        f(b, x - take);
    }
    pool
}

pub(super) fn by_due(a: &OpenBill, b: &OpenBill) -> Ordering {
    (a.bill.due, &a.bill.period).cmp(&(b.bill.due, &b.bill.period))
}

impl Start {
    /// The whole history: every given bill owed in full, every payment counts.
    pub fn whole_history(bills: &[PriorBill]) -> Start {
        let mut open: Vec<OpenBill> = bills
            .iter()
            .map(|b| OpenBill {
                unpaid: b.amount,
                bill: b.clone(),
            })
            .collect();
        open.sort_by(by_due);
        Start {
            after: None,
            from: AccountArrears {
                open,
                history_from: bills.iter().map(|b| b.start).min(),
                last_due: bills
                    .iter()
                    .filter(|b| b.amount >= Decimal::ZERO)
                    .map(|b| b.due)
                    .max(),
                ..Default::default()
            },
        }
    }

    /// Continues `state`, an account's arrears at the end of `as_of`, with
    /// its `bills` in the given runs (those after `as_of` are added) and its
    /// `payments` (sorted). `own`: this run's bill (period, due date).
    /// Refuses when that would not give the whole history's fees.
    pub fn continue_state(
        state: &AccountArrears,
        as_of: NaiveDate,
        bills: &[PriorBill],
        payments: &[(NaiveDate, Decimal)],
        own: Option<(&str, NaiveDate)>,
    ) -> Result<Start, Problem> {
        let now = Counted::through(payments, as_of);
        if (now.count, now.sum) != (state.counted.count, state.counted.sum) {
            return Err(Problem::BackDated {
                as_of,
                counted: state.counted,
                now,
                first: first_uncounted(payments, as_of, &state.counted, &now),
            });
        }
        Start::add_bills(state, as_of, bills, own)
    }

    /// `state`, an account's arrears at the end of `as_of`, with its `bills`
    /// after that day added. Refuses a bill the state holds at another
    /// amount, and bills falling due out of order.
    fn add_bills(
        state: &AccountArrears,
        as_of: NaiveDate,
        bills: &[PriorBill],
        own: Option<(&str, NaiveDate)>,
    ) -> Result<Start, Problem> {
        // A later bill due before one already settled would have taken the
        // payments first in the whole history.
        let in_order = |period: &str, due: NaiveDate| match state.last_due {
            Some(last) if due < last => Err(Problem::Order {
                period: period.to_string(),
                due,
                last_due: last,
            }),
            _ => Ok(()),
        };
        let mut from = state.clone();
        for b in bills {
            if b.start <= as_of {
                // Counted in the state: a bill it still holds must agree.
                if let Some(o) = state.open.iter().find(|o| o.bill.period == b.period) {
                    if o.bill.amount != b.amount {
                        return Err(Problem::Amount {
                            period: b.period.clone(),
                            state: o.bill.amount,
                            runs: b.amount,
                        });
                    }
                }
                continue;
            }
            from.history_from = from.history_from.or(Some(b.start));
            // A credit note is credit, whenever it falls due.
            if b.amount >= Decimal::ZERO {
                in_order(&b.period, b.due)?;
                from.last_due = from.last_due.max(Some(b.due));
            }
            from.open.push(OpenBill {
                unpaid: b.amount,
                bill: b.clone(),
            });
        }
        if let Some((period, due)) = own {
            in_order(period, due)?;
        }
        from.open.sort_by(by_due);
        Ok(Start {
            after: Some(as_of),
            from,
        })
    }

    /// What the fee sees: what is owed of each bill, and the payments (a
    /// carried credit as one made on the state's day).
    pub fn fee_inputs(
        &self,
        payments: &[(NaiveDate, Decimal)],
    ) -> (Vec<PriorBill>, Vec<(NaiveDate, Decimal)>) {
        let owed = self
            .from
            .open
            .iter()
            .map(|o| PriorBill {
                amount: o.unpaid,
                ..o.bill.clone()
            })
            .collect();
        let mut pays = Vec::with_capacity(payments.len() + 1);
        if let Some(day) = self.after.filter(|_| self.from.credit > Decimal::ZERO) {
            pays.push((day, self.from.credit));
        }
        pays.extend(self.new_payments(payments));
        (owed, pays)
    }

    fn new_payments<'p>(
        &self,
        payments: &'p [(NaiveDate, Decimal)],
    ) -> impl Iterator<Item = (NaiveDate, Decimal)> + 'p {
        let after = self.after;
        payments
            .iter()
            .filter(move |p| after.is_none_or(|d| p.0 > d))
            .copied()
    }

    /// The arrears at the end of `last_day`, this run's own bill included:
    /// the payments up to then settle the bills oldest due first.
    pub fn carry(
        &self,
        own: Option<PriorBill>,
        payments: &[(NaiveDate, Decimal)],
        last_day: NaiveDate,
    ) -> AccountArrears {
        let mut bills = self.from.open.clone();
        let (mut history_from, mut last_due) = (self.from.history_from, self.from.last_due);
        if let Some(b) = own {
            history_from = history_from.or(Some(b.start));
            if b.amount >= Decimal::ZERO {
                last_due = last_due.max(Some(b.due));
            }
            bills.push(OpenBill {
                unpaid: b.amount,
                bill: b,
            });
            bills.sort_by(by_due);
        }
        let mut counted = self.from.counted;
        let mut paid = self.from.credit;
        for (d, x) in self.new_payments(payments).filter(|p| p.0 <= last_day) {
            counted.add(d, x);
            paid += x;
        }
        let mut open = Vec::new();
        let credit = settle(
            &bills,
            |o| o.unpaid,
            paid,
            |o, unpaid| {
                if unpaid > Decimal::ZERO {
                    open.push(OpenBill {
                        bill: o.bill.clone(),
                        unpaid,
                    });
                }
            },
        );
        AccountArrears {
            open,
            credit,
            counted,
            history_from,
            last_due,
            as_of: None,
        }
    }

    /// The arrears at the end of `day` of an account whose payments are not
    /// read (it is not in accounts.csv): `since`, paid after the start,
    /// settles its bills; `counted` is what its latest state counted.
    fn carry_paid(mut self, since: Decimal, counted: Counted, day: NaiveDate) -> AccountArrears {
        self.from.credit += since;
        self.from.counted = counted;
        let mut a = self.carry(None, &[], day);
        a.as_of = Some(day);
        a
    }
}

/// Why an account cannot continue from a carried state.
#[derive(Debug, Clone, PartialEq)]
pub enum Problem {
    /// The payments dated up to the state's day are not those it counted.
    BackDated {
        as_of: NaiveDate,
        counted: Counted,
        now: Counted,
        /// Date of the first payment the state did not count, when it can be told.
        first: Option<NaiveDate>,
    },
    /// The state holds a bill at another amount than the runs given.
    Amount {
        period: String,
        state: Decimal,
        runs: Decimal,
    },
    /// A revision changed the account's bill after the state was written;
    /// `add`: its run, when it is not among the given ones.
    Revised {
        revision: PathBuf,
        add: Option<PathBuf>,
    },
    /// A given run billed an account carried unchanged (not in
    /// accounts.csv) for a period after the day of its latest state.
    Unseen { period: String, as_of: NaiveDate },
    /// A later bill falls due before one the state counted.
    Order {
        period: String,
        due: NaiveDate,
        last_due: NaiveDate,
    },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::BackDated {
                as_of,
                counted,
                now,
                first,
            } => {
                write!(
                    f,
                    "payments.csv has {} payment(s) of {} dated up to {as_of}, the state counted {} of {} \
                     (a payment was back-dated, changed or removed)",
                    now.count, now.sum, counted.count, counted.sum
                )?;
                match first {
                    Some(d) => write!(f, "; the first payment it did not count is dated {d}"),
                    None => Ok(()),
                }
            }
            Problem::Amount { period, state, runs } => write!(
                f,
                "the state holds its bill of {period} at {state}, the --previous runs at {runs} \
                 (revised after the state was written)"
            ),
            Problem::Revised { revision, add } => {
                write!(
                    f,
                    "{} changed its bill after the state was written",
                    revision.display()
                )?;
                match add {
                    Some(run) => write!(
                        f,
                        "; add --previous {} (and every run after it)",
                        run.display()
                    ),
                    None => Ok(()),
                }
            }
            Problem::Order {
                period,
                due,
                last_due,
            } => write!(
                f,
                "its bill of {period} falls due on {due}, before a bill the state counted (due {last_due}): \
                 only the whole history bills it exactly"
            ),
            Problem::Unseen { period, as_of } => write!(
                f,
                "it is not in accounts.csv, and a given run billed it for {period}, after its \
                 latest state's day ({as_of}): put it back in accounts.csv to bill it from the runs"
            ),
        }
    }
}

/// The date of the payment dated up to `as_of` that a state which counted
/// `counted` did not, when it can be told: one payment more than counted,
/// and only one day with a payment of the difference (fixed monthly
/// payments would otherwise name an earlier one).
fn first_uncounted(
    payments: &[(NaiveDate, Decimal)],
    as_of: NaiveDate,
    counted: &Counted,
    now: &Counted,
) -> Option<NaiveDate> {
    if now.count != counted.count + 1 {
        return None;
    }
    let added = now.sum - counted.sum;
    let mut days = payments
        .iter()
        .take_while(|p| p.0 <= as_of)
        .filter(|p| p.1 == added)
        .map(|p| p.0);
    let first = days.next()?;
    days.all(|d| d == first).then_some(first)
}

/// A run's arrears state, as read back.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ArrearsState {
    /// The last day of the run's period.
    pub as_of: NaiveDate,
    pub accounts: BTreeMap<String, AccountArrears>,
    /// Revisions (run ids) whose amounts the state reflects.
    pub seen: BTreeSet<String>,
    /// Run directories whose bills the state counted (as written, relative
    /// to the state's run; `GivenRun::read` resolves them), with the number
    /// of revisions seen in each.
    pub runs: BTreeMap<PathBuf, usize>,
}

fn parse_date(s: &str) -> Result<NaiveDate, String> {
    s.parse().map_err(|e| format!("'{s}' is not a date: {e}"))
}

/// The last text parsed and its value: the periods and dates of a run's
/// files repeat a few values row after row (parsing each was a third of
/// reading a 1M run's state).
pub(super) struct Memo<T> {
    text: String,
    value: Option<T>,
}

impl<T: Clone> Memo<T> {
    pub(super) fn new() -> Self {
        Memo {
            text: String::new(),
            value: None,
        }
    }

    pub(super) fn get<E>(
        &mut self,
        s: &str,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> Result<T, E> {
        if let Some(v) = &self.value {
            if self.text == s {
                return Ok(v.clone());
            }
        }
        let v = parse(s)?;
        self.text.clear();
        self.text.push_str(s);
        self.value = Some(v.clone());
        Ok(v)
    }
}

/// `runs` as the state's `meterflow.runs_counted` metadata holds it: each
/// directory relative to `base`, the directory of the run writing the state,
/// so a tree of runs moved or billed elsewhere gives the same bytes (and
/// the next run the same id).
pub fn runs_metadata(runs: &BTreeMap<PathBuf, usize>, base: &Path) -> String {
    let m: serde_json::Map<String, serde_json::Value> = runs
        .iter()
        .map(|(d, n)| {
            let d = relative(d, base);
            (d.display().to_string(), serde_json::Value::from(*n))
        })
        .collect();
    serde_json::Value::Object(m).to_string()
}

/// `path` from `base` (both absolute and canonical), with `..` as needed.
fn relative(path: &Path, base: &Path) -> PathBuf {
    let (p, b): (Vec<_>, Vec<_>) = (path.components().collect(), base.components().collect());
    let common = p.iter().zip(&b).take_while(|(x, y)| x == y).count();
    if common == 0 {
        return path.to_path_buf();
    }
    let mut out: PathBuf = b[common..].iter().map(|_| "..").collect();
    out.extend(&p[common..]);
    out
}

/// `rel` (as [`runs_metadata`] writes it) from `base`, without `..`.
fn resolve(rel: &Path, base: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in base.join(rel).components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// Reads `arrears.parquet` of a run whose last day is `as_of`.
pub fn read_state(path: &Path, as_of: NaiveDate) -> Result<ArrearsState, BillingError> {
    let bad = |what: String| BillingError::Invalid(format!("{}: {what}", path.display()));
    let file = File::open(path).map_err(super::run::io(path))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| bad(e.to_string()))?;
    let kv = |key: &str| {
        builder
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .and_then(|kv| kv.iter().find(|k| k.key == key))
            .and_then(|k| k.value.clone())
    };
    let seen = kv(SEEN_KEY)
        .map(|v| {
            v.split(',')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let mut runs = BTreeMap::new();
    if let Some(v) = kv(RUNS_KEY) {
        let m: BTreeMap<String, usize> =
            serde_json::from_str(&v).map_err(|e| bad(format!("{RUNS_KEY}: {e}")))?;
        runs = m.into_iter().map(|(d, n)| (PathBuf::from(d), n)).collect();
    }
    let reader = builder.build().map_err(|e| bad(e.to_string()))?;
    let mut accounts: BTreeMap<String, AccountArrears> = BTreeMap::new();
    let (mut run_periods, mut periods) = (Memo::new(), Memo::new());
    let (mut days, mut dues, mut paid_days, mut from_days, mut last_dues) = (
        Memo::new(),
        Memo::new(),
        Memo::new(),
        Memo::new(),
        Memo::new(),
    );
    for batch in reader {
        let batch = batch.map_err(|e| bad(e.to_string()))?;
        let col = |name: &str| batch.column_by_name(name).map(|c| c.as_any());
        let text = |name: &str| {
            col(name)
                .and_then(|c| c.downcast_ref::<StringArray>())
                .ok_or_else(|| bad(format!("no text column {name}")))
        };
        let decimal = |name: &str| {
            col(name)
                .and_then(|c| c.downcast_ref::<Decimal128Array>())
                .ok_or_else(|| bad(format!("no decimal column {name}")))
        };
        let (acc, run_period, day, per, due) = (
            text("account_id")?,
            text("period")?,
            text("as_of")?,
            text("bill_period")?,
            text("due_date")?,
        );
        let (amount, unpaid, credit, paid_sum) = (
            decimal("amount")?,
            decimal("unpaid")?,
            decimal("credit")?,
            decimal("paid_sum")?,
        );
        let (last_paid, from, last_due) = (
            text("last_paid_on")?,
            text("history_from")?,
            text("last_due")?,
        );
        let paid_count = col("paid_count")
            .and_then(|c| c.downcast_ref::<Int64Array>())
            .ok_or_else(|| bad("no integer column paid_count".into()))?;
        let opt_date = |m: &mut Memo<NaiveDate>,
                        a: &StringArray,
                        i: usize|
         -> Result<Option<NaiveDate>, BillingError> {
            (!a.is_null(i))
                .then(|| m.get(a.value(i), parse_date).map_err(bad))
                .transpose()
        };
        for i in 0..batch.num_rows() {
            let row = |what: &str| bad(format!("row of {}: {what}", acc.value(i)));
            // The run's own day; an account carried unchanged keeps the day
            // of the state it was carried from.
            let run_day = run_periods
                .get(run_period.value(i), BillPeriod::parse)
                .map_err(bad)?
                .end
                .pred_opt();
            if run_day != Some(as_of) {
                return Err(row(&format!(
                    "the state of {} is not one of {as_of}",
                    run_period.value(i)
                )));
            }
            let row_day = days.get(day.value(i), parse_date).map_err(bad)?;
            if row_day > as_of {
                return Err(row(&format!("as_of {row_day} is after {as_of}")));
            }
            let carried_day = (row_day < as_of).then_some(row_day);
            let a = accounts
                .entry(acc.value(i).to_string())
                .or_insert(AccountArrears {
                    open: Vec::new(),
                    credit: dec_at(credit, i).ok_or_else(|| row("no credit"))?,
                    counted: Counted {
                        count: u64::try_from(paid_count.value(i))
                            .map_err(|_| row("negative paid_count"))?,
                        sum: dec_at(paid_sum, i).ok_or_else(|| row("no paid_sum"))?,
                        last: opt_date(&mut paid_days, last_paid, i)?,
                    },
                    history_from: opt_date(&mut from_days, from, i)?,
                    last_due: opt_date(&mut last_dues, last_due, i)?,
                    as_of: carried_day,
                });
            if a.as_of != carried_day {
                return Err(row("rows of one account with different as_of"));
            }
            // What the writer can write: sums of these never overflow.
            let limit = Decimal::from_i128_with_scale(10i128.pow(26), 0);
            if a.credit < Decimal::ZERO || a.counted.sum < Decimal::ZERO {
                return Err(row("negative credit or paid_sum"));
            }
            if a.credit >= limit || a.counted.sum >= limit {
                return Err(row("credit or paid_sum beyond DECIMAL(28, 2)"));
            }
            if per.is_null(i) {
                continue;
            }
            let period = periods.get(per.value(i), BillPeriod::parse).map_err(bad)?;
            let (Some(due), Some(amount), Some(unpaid)) = (
                opt_date(&mut dues, due, i)?,
                dec_at(amount, i),
                dec_at(unpaid, i),
            ) else {
                return Err(row("a bill without due_date, amount or unpaid"));
            };
            if unpaid <= Decimal::ZERO || unpaid > amount || amount >= limit {
                return Err(row(&format!(
                    "bill {}: unpaid {unpaid} is not within (0, amount {amount}]",
                    period.label
                )));
            }
            if a.open.iter().any(|o| o.bill.period == period.label) {
                return Err(row(&format!("bill {} listed twice", period.label)));
            }
            a.open.push(OpenBill {
                bill: PriorBill {
                    period: period.label,
                    start: period.start,
                    due,
                    amount,
                },
                unpaid,
            });
        }
    }
    Ok(ArrearsState {
        as_of,
        accounts,
        seen,
        runs,
    })
}

/// A revision of an earlier run: its run id and the accounts it changed.
struct Revision {
    dir: PathBuf,
    run_id: String,
    accounts: HashSet<String>,
}

impl Revision {
    /// Reads the revision whose `bills.parquet` is `bills`.
    fn read(bills: &Path) -> Result<Revision, BillingError> {
        let mut rev = Revision {
            dir: bills.parent().unwrap_or(bills).to_path_buf(),
            run_id: String::new(),
            accounts: HashSet::new(),
        };
        for_each_bill(bills, |r, _| {
            rev.run_id = r.run_id.to_string();
            rev.accounts.insert(r.account.to_string());
            Ok(())
        })?;
        Ok(rev)
    }
}

/// An earlier run given with `--previous`.
struct GivenRun {
    dir: PathBuf,
    /// `dir` resolved, to tell a run given twice.
    key: PathBuf,
    period: BillPeriod,
    revisions: Vec<Revision>,
    /// The state of its latest revision that has one (or its own).
    state: Option<ArrearsState>,
    state_path: PathBuf,
    /// Revisions its state has not seen of runs it counted that are not
    /// given (run directory, revision).
    outside: Vec<(PathBuf, Revision)>,
    /// Billed with `--settled-through`: payments before its day settled
    /// bills that are in no run, so its whole history is not in the runs.
    settled: bool,
}

impl GivenRun {
    /// Reads a run directory's period, revisions and state; hashes its
    /// bills files and the state into `inputs` (None: the run being revised,
    /// which, like the bills it issued, is not hashed).
    fn read(
        dir: &Path,
        mut inputs: Option<&mut Vec<serde_json::Value>>,
    ) -> Result<GivenRun, BillingError> {
        let bad = |what: String| BillingError::Invalid(format!("{}: {what}", dir.display()));
        let manifest = dir.join("manifest.json");
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&manifest).map_err(super::run::io(&manifest))?)
                .map_err(|e| bad(e.to_string()))?;
        let label = m["period"]
            .as_str()
            .ok_or_else(|| bad("no period".into()))?;
        let period = BillPeriod::parse(label).map_err(bad)?;
        let key = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        let files = bills_files(dir);
        if let Some(inputs) = inputs.as_deref_mut() {
            for f in &files {
                inputs.push(super::run::hashed_input(f)?);
            }
        }
        let revisions = files[1..]
            .iter()
            .map(|f| Revision::read(f))
            .collect::<Result<Vec<_>, _>>()?;
        let mut state = None;
        let mut state_path = PathBuf::new();
        for (k, f) in files.iter().enumerate().rev() {
            let p = f.parent().unwrap_or(dir).join(STATE_FILE);
            if !p.exists() {
                continue;
            }
            if let Some(inputs) = inputs.as_deref_mut() {
                inputs.push(super::run::hashed_input(&p)?);
            }
            let as_of = period.end.pred_opt().unwrap_or(period.end);
            let mut s = read_state(&p, as_of)?;
            s.runs = std::mem::take(&mut s.runs)
                .into_iter()
                .map(|(d, n)| (resolve(&d, &key), n))
                .collect();
            // A revision's state reflects that revision and the ones before it.
            s.seen.extend(
                revisions[..k]
                    .iter()
                    .filter(|r| !r.run_id.is_empty())
                    .map(|r| r.run_id.clone()),
            );
            state = Some(s);
            state_path = p;
            break;
        }
        Ok(GivenRun {
            dir: dir.to_path_buf(),
            key,
            period,
            revisions,
            state,
            state_path,
            outside: Vec::new(),
            settled: m["settled_through"].is_string(),
        })
    }

    /// A revision of this run that changed `account` after `state` (whose
    /// day for the account is `as_of`) was written.
    fn unseen_revision(
        &self,
        state: &ArrearsState,
        as_of: NaiveDate,
        account: &str,
    ) -> Option<&Revision> {
        if self.period.end > as_of.succ_opt()? {
            return None;
        }
        self.revisions
            .iter()
            .find(|r| !state.seen.contains(&r.run_id) && r.accounts.contains(account))
    }
}

/// For each given state (and the issued run's, in a revision), the
/// revisions written since of the runs it counted that are not given
/// (`meterflow.runs_counted`): a directory that no longer exists is skipped
/// with a warning.
fn find_outside_revisions(
    runs: &mut [GivenRun],
    issued: Option<&mut GivenRun>,
) -> Result<(), BillingError> {
    let given: HashSet<PathBuf> = runs.iter().map(|r| r.key.clone()).collect();
    for run in runs.iter_mut().chain(issued) {
        let Some(s) = &run.state else { continue };
        let mut outside = Vec::new();
        for (dir, &seen) in &s.runs {
            if given.contains(dir) {
                continue; // its revisions are checked by run id
            }
            if !dir.exists() {
                tracing::warn!(
                    run = %dir.display(),
                    state = %run.state_path.display(),
                    "a run the arrears state counted no longer exists: its revisions cannot be checked"
                );
                continue;
            }
            for f in bills_files(dir).iter().skip(1 + seen) {
                outside.push((dir.clone(), Revision::read(f)?));
            }
        }
        run.outside = outside;
    }
    Ok(())
}

/// With carried states, `--previous` must be consecutive runs, one per
/// period, ending the day before `period` starts. Sorts `runs` by period.
fn check_chain(runs: &mut Vec<GivenRun>, period: &BillPeriod) -> Result<(), BillingError> {
    runs.sort_by_key(|r| (r.period.start, r.period.end, r.key.clone()));
    runs.dedup_by(|a, b| a.key == b.key);
    let refuse = |what: String| {
        BillingError::Arrears(format!(
            "{what}: with arrears states, --previous takes consecutive runs, one per period, \
             the last one ending the day before {} (the period billed)",
            period.start
        ))
    };
    let name = |r: &GivenRun| format!("{} ({})", r.dir.display(), r.period.label);
    for w in runs.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        match a.period.end.cmp(&b.period.start) {
            Ordering::Greater => {
                return Err(refuse(format!("{} and {} overlap", name(a), name(b))));
            }
            Ordering::Less => {
                return Err(refuse(format!(
                    "no run given for {}..{} (between {} and {})",
                    a.period.end,
                    b.period.start,
                    name(a),
                    name(b)
                )));
            }
            Ordering::Equal => {}
        }
    }
    if let Some(last) = runs.last() {
        match last.period.end.cmp(&period.start) {
            Ordering::Greater => {
                return Err(refuse(format!("{} reaches into this period", name(last))));
            }
            Ordering::Less => {
                return Err(refuse(format!(
                    "no run given for {}..{} (after {})",
                    last.period.end,
                    period.start,
                    name(last)
                )));
            }
            Ordering::Equal => {}
        }
    }
    Ok(())
}

/// Each account's position by id; empty when none will be looked up (a
/// million ids cost a tenth of a second to hash).
pub(super) fn positions(accounts: &[BillingAccount], needed: bool) -> FxMap<&str, u32> {
    if !needed {
        return FxMap::default();
    }
    accounts
        .iter()
        .enumerate()
        .map(|(i, a)| (&*a.account_id, i as u32))
        .collect()
}

/// The late-fee rule of a postpaid account on `day`, with its tariff version.
pub(super) fn rule_of<'t>(
    a: &BillingAccount,
    tariffs: &'t TariffSet,
    day: NaiveDate,
) -> Option<(usize, &'t TariffVersion, &'t LateFeeRule)> {
    if a.payment_mode != PaymentMode::Postpaid {
        return None;
    }
    let t = tariffs.get(&a.tariff_id).ok()?;
    let (vi, v) = t
        .versions
        .iter()
        .enumerate()
        .find(|(_, v)| v.applies_on(day))?;
    Some((vi, v, v.late_fee.as_ref()?))
}

/// What a bill run needs to charge late fees and write its arrears state:
/// where each account starts (a carried state or the given runs' bills)
/// and its payments.
pub struct LateFees<'a> {
    last_day: NaiveDate,
    /// Accounts with a carried state or earlier bills.
    starts: FxMap<&'a str, Start>,
    payments: Payments<'a>,
    /// With a state given: the latest state's period (first and last day).
    /// An account in no given state that was opened before that period
    /// (until now prepaid, say) counts only the payments after it.
    fresh_after: Option<(NaiveDate, NaiveDate)>,
    /// A fleet's first run settled through a day (`settled_through`): its
    /// period's first day, where every account's history in the runs starts
    /// (so no later run rebuilds one from the runs' whole history, which
    /// would credit the settled payments).
    settled_from: Option<NaiveDate>,
    /// Accounts of the given states (in a revision, of the issued run's
    /// too) that are not in accounts.csv, carried forward (see
    /// `carry_unchanged`), in id order.
    pub carried: Vec<(String, AccountArrears)>,
    /// Revisions (run ids) the state this run writes reflects.
    pub seen: BTreeSet<String>,
    /// Run directories whose bills the state this run writes counted, with
    /// the number of revisions seen in each (`meterflow.runs_counted`).
    pub runs: BTreeMap<PathBuf, usize>,
    /// Files read, with SHA-256 (hashed into the run id and manifest).
    pub inputs: Vec<serde_json::Value>,
    /// Rows of payments.csv that could not be read.
    pub errors: Vec<String>,
}

/// An account whose carried state cannot be continued.
struct Refusal {
    account: String,
    /// The state refused.
    state: PathBuf,
    problem: Problem,
    /// First day of the account's earliest bill in any given state.
    history_from: Option<NaiveDate>,
    /// A given run is a fleet's first, settled through a day: no run holds
    /// what came before it.
    settled: bool,
}

/// A revision that changed `name`'s bill after `s`, the state of `run`
/// (`as_of`: its day for the account), was written: of a run it counted
/// that is not given (then true), or of one of the `checked` runs.
fn revised<'r>(
    checked: impl IntoIterator<Item = &'r GivenRun>,
    run: &GivenRun,
    s: &ArrearsState,
    as_of: NaiveDate,
    name: &str,
) -> Option<(Problem, bool)> {
    if let Some((dir, r)) = run.outside.iter().find(|(_, r)| r.accounts.contains(name)) {
        let p = Problem::Revised {
            revision: r.dir.clone(),
            add: Some(dir.clone()),
        };
        return Some((p, true));
    }
    let r = checked
        .into_iter()
        .find_map(|r| r.unseen_revision(s, as_of, name))?;
    let p = Problem::Revised {
        revision: r.dir.clone(),
        add: None,
    };
    Some((p, false))
}

/// Where `name`'s fees start: the earliest given state that can be
/// continued exactly (marked in `used`), else the whole history of the
/// given runs when they reach back to its first bill, else a refusal.
fn choose_start(
    runs: &[GivenRun],
    name: &str,
    bills: &[PriorBill],
    pays: &[(NaiveDate, Decimal)],
    own: Option<(&str, NaiveDate)>,
    used: &mut [bool],
) -> Result<Start, Box<Refusal>> {
    let mut refused: Option<(&Path, Problem)> = None;
    let mut history_from: Option<NaiveDate> = None;
    // A run that is not given changed one of its bills: its whole history
    // is not in the given runs.
    let mut outside_changed = false;
    for (i, run) in runs.iter().enumerate() {
        let Some(s) = &run.state else { continue };
        let Some(acc) = s.accounts.get(name) else {
            continue;
        };
        history_from = match (history_from, acc.history_from) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        };
        let as_of = acc.as_of.unwrap_or(s.as_of);
        let r = match revised(runs, run, s, as_of, name) {
            Some((p, outside)) => {
                outside_changed |= outside;
                Err(p)
            }
            None => Start::continue_state(acc, as_of, bills, pays, own),
        };
        match r {
            Ok(start) => {
                used[i] = true;
                return Ok(start);
            }
            Err(p) => {
                refused.get_or_insert((&run.state_path, p));
            }
        }
    }
    let Some((path, problem)) = refused else {
        // In no state: as before states existed.
        return Ok(Start::whole_history(bills));
    };
    if whole_history_given(runs, history_from) && !outside_changed {
        return Ok(Start::whole_history(bills));
    }
    Err(Box::new(Refusal {
        account: name.to_string(),
        state: path.to_path_buf(),
        problem,
        history_from,
        settled: runs.iter().any(|r| r.settled),
    }))
}

/// Whether the given runs hold an account's whole history: they reach back
/// to its first bill (`history_from`), and none was a first run whose
/// earlier payments settled bills of no run (`--settled-through`).
fn whole_history_given(runs: &[GivenRun], history_from: Option<NaiveDate>) -> bool {
    let chain_start = runs.first().map(|r| r.period.start);
    history_from.is_none_or(|h| chain_start.is_some_and(|c| c <= h))
        && !runs.iter().any(|r| r.settled)
}

/// An account of the given states (in a revision, of the issued run's too)
/// that is not in accounts.csv: its latest state, carried unchanged with the
/// day it was written. In a revision that is the issued run's, which holds
/// its bill of this period (the bill stands). `bills`: its bills in the
/// given runs and the issued one; `used` marks the state its amounts come
/// from (the issued run's last).
///
/// The state written lists one set of revisions and runs for all its rows,
/// so a carried account is checked against them like a billed one (a
/// per-account record would change the file): after a revision its latest
/// state has not seen, it continues, as in `choose_start`, from an earlier
/// state that saw it, else from the whole history when the given runs
/// reach back to its first bill, else it is refused. payments.csv is not
/// read for it: its payments since are what the latest state counted
/// beyond the earlier one's.
fn carry_unchanged(
    runs: &[GivenRun],
    issued: Option<&GivenRun>,
    name: &str,
    bills: &[PriorBill],
    used: &mut [bool],
) -> Result<Option<AccountArrears>, Box<Refusal>> {
    let held: Vec<(usize, &GivenRun, &ArrearsState, &AccountArrears)> = runs
        .iter()
        .chain(issued)
        .enumerate()
        .filter_map(|(i, r)| {
            let s = r.state.as_ref()?;
            Some((i, r, s, s.accounts.get(name)?))
        })
        .collect();
    // The latest is the one of the latest day (of the later run among
    // equals): a state carried unchanged keeps its old day, while a
    // revision of an earlier run may have billed the account since.
    let day_of = |h: &(usize, &GivenRun, &ArrearsState, &AccountArrears)| {
        (h.3.as_of.unwrap_or(h.2.as_of), h.0)
    };
    let Some(at) = (0..held.len()).max_by_key(|&k| day_of(&held[k])) else {
        return Ok(None);
    };
    let mut earlier = held.clone();
    let (i, run, s, latest) = earlier.remove(at);
    let day = latest.as_of.unwrap_or(s.as_of);
    let checked = || runs.iter().chain(issued);
    let (problem, mut outside_changed) = match revised(checked(), run, s, day, name) {
        // Its given bills must agree with the state, and none may start
        // after its day: carried unchanged, the row would keep that day and
        // the next run would count such a bill a second time.
        None => match Start::add_bills(latest, day, bills, None) {
            Ok(_) if bills.iter().all(|b| b.start <= day) => {
                used[i] = true;
                return Ok(Some(AccountArrears {
                    as_of: Some(day),
                    ..latest.clone()
                }));
            }
            Ok(_) => {
                let later = bills
                    .iter()
                    .find(|b| b.start > day)
                    .map(|b| b.period.clone());
                return Err(Box::new(Refusal {
                    account: name.to_string(),
                    state: run.state_path.clone(),
                    problem: Problem::Unseen {
                        period: later.unwrap_or_default(),
                        as_of: day,
                    },
                    history_from: None,
                    settled: false,
                }));
            }
            Err(p) => (p, false),
        },
        Some(p) => p,
    };
    let bills: Vec<PriorBill> = bills.iter().filter(|b| b.start <= day).cloned().collect();
    for &(k, run, s, acc) in earlier.iter().rev() {
        let as_of = acc.as_of.unwrap_or(s.as_of);
        if let Some((_, outside)) = revised(checked(), run, s, as_of, name) {
            outside_changed |= outside;
            continue;
        }
        // Never after `day`: the latest was chosen by day.
        let Ok(start) = Start::add_bills(acc, as_of, &bills, None) else {
            continue;
        };
        // Exact unless a payment it counted was removed since.
        let since = latest.counted.sum - acc.counted.sum;
        if start.from.credit + since < Decimal::ZERO {
            continue;
        }
        used[k] = true;
        return Ok(Some(start.carry_paid(since, latest.counted, day)));
    }
    let history_from = held.iter().filter_map(|h| h.3.history_from).min();
    if whole_history_given(runs, history_from) && !outside_changed {
        let start = Start::whole_history(&bills);
        return Ok(Some(start.carry_paid(
            latest.counted.sum,
            latest.counted,
            day,
        )));
    }
    Err(Box::new(Refusal {
        account: name.to_string(),
        state: run.state_path.clone(),
        problem,
        history_from,
        settled: runs.iter().any(|r| r.settled),
    }))
}

/// Refuses a missing payments.csv when a given state counted payments.
fn check_payments_file(runs: &[GivenRun], path: &Path) -> Result<(), BillingError> {
    for r in runs {
        let Some(s) = &r.state else { continue };
        if let Some((a, acc)) = s.accounts.iter().find(|(_, a)| a.counted.count > 0) {
            return Err(BillingError::Arrears(format!(
                "{} is missing, but the arrears state {} counted payments ({a}: {} of {}): \
                 restore the file",
                path.display(),
                r.state_path.display(),
                acc.counted.count,
                acc.counted.sum
            )));
        }
    }
    Ok(())
}

impl<'a> LateFees<'a> {
    /// Reads the `previous` runs (bills, revisions, arrears states) and
    /// `payments`, and decides where each account's fees start. `issued`:
    /// in a revision, the run directory being revised, whose state carries
    /// the accounts no longer in accounts.csv. Fails, naming the accounts,
    /// when a carried state cannot be continued exactly.
    pub fn load(
        previous: &[PathBuf],
        issued: Option<(&Path, &super::revision::Issued)>,
        payments_path: &Path,
        period: &BillPeriod,
        accounts: &'a [BillingAccount],
        tariffs: &TariffSet,
    ) -> Result<LateFees<'a>, BillingError> {
        let last_day = period.end.pred_opt().unwrap_or(period.end);
        let t0 = std::time::Instant::now();
        let mut inputs = Vec::new();
        let mut runs = Vec::new();
        for dir in previous {
            runs.push(GivenRun::read(dir, Some(&mut inputs))?);
        }
        let issued_bills = issued.map(|i| i.1);
        let mut issued = issued.map(|i| GivenRun::read(i.0, None)).transpose()?;
        let t_runs = t0.elapsed();
        let prior = if previous.is_empty() {
            PriorBills::new()
        } else {
            read_prior_bills(previous)?
        };
        let t_prior = t0.elapsed();
        let carried = runs.iter().any(|r| r.state.is_some());
        if carried {
            check_chain(&mut runs, period)?;
        }
        find_outside_revisions(&mut runs, issued.as_mut())?;
        let tracked = accounts
            .iter()
            .any(|a| rule_of(a, tariffs, last_day).is_some());
        let mut errors = Vec::new();
        let mut payments = Payments::default();
        if !payments_path.exists() {
            check_payments_file(&runs, payments_path)?;
        } else if tracked || carried || !prior.is_empty() {
            let loaded = crate::master::load_billing_payments(payments_path)
                .map_err(|e| BillingError::Master(e.to_string()))?;
            inputs.push(super::run::input_entry(
                payments_path,
                &loaded.sha256,
                loaded.bytes,
            ));
            errors.extend(loaded.errors.iter().map(|e| e.to_string()));
            payments = Payments::new(&loaded.rows, accounts, tariffs);
        }
        let t_payments = t0.elapsed();
        // Each account continues from the earliest given state that gives
        // the whole history's fees (later ones are then not needed), else
        // from the given runs' bills when they reach back to its first bill.
        let names: BTreeSet<&str> = runs
            .iter()
            .chain(&issued)
            .filter_map(|r| r.state.as_ref())
            .flat_map(|s| s.accounts.keys().map(String::as_str))
            .chain(prior.keys().map(String::as_str))
            .collect();
        // Only the accounts of given states and runs are looked up by id.
        let by_id = positions(accounts, !names.is_empty());
        // Where each account starts, in parallel over runs of names (each
        // with its own marks of the states used), gathered in name order.
        enum Found<'n> {
            Start(&'n str, Start),
            Carried(String, AccountArrears),
            Refused(Box<Refusal>),
        }
        let names: Vec<&str> = names.into_iter().collect();
        let find = |names: &[&str]| -> (Vec<Found<'a>>, Vec<bool>) {
            // The issued run's state is the last.
            let mut used = vec![false; runs.len() + 1];
            let mut found = Vec::new();
            for &name in names {
                let Some(a) = by_id.get(name).map(|&i| &accounts[i as usize]) else {
                    // Not in accounts.csv: its state is carried, so it comes
                    // back intact.
                    let mut bills = prior.get(name).cloned().unwrap_or_default();
                    // In a revision, its bill of this period (as last revised,
                    // from the issued bills): the issued state holds it, and
                    // without one (a run older than states) it must not be
                    // dropped (`carry_unchanged` refuses).
                    bills.extend(issued_bills.and_then(|is| is.bill(name, period)));
                    match carry_unchanged(&runs, issued.as_ref(), name, &bills, &mut used) {
                        Ok(Some(s)) => found.push(Found::Carried(name.to_string(), s)),
                        Ok(None) => {}
                        Err(r) => found.push(Found::Refused(r)),
                    }
                    continue;
                };
                let bills = prior.get(name).map_or(&[][..], Vec::as_slice);
                let pays = payments.of(a);
                let own =
                    rule_of(a, tariffs, last_day).map(|r| (&*period.label, due_date(period, r.2)));
                match choose_start(&runs, name, bills, pays, own, &mut used[..runs.len()]) {
                    Ok(start) if start != Start::default() => {
                        found.push(Found::Start(&a.account_id, start))
                    }
                    Ok(_) => {}
                    Err(r) => found.push(Found::Refused(r)),
                }
            }
            (found, used)
        };
        let parts: Vec<(Vec<Found>, Vec<bool>)> = names.par_chunks(4096).map(find).collect();
        let mut used = vec![false; runs.len() + 1];
        let mut starts = FxMap::default();
        let mut kept = Vec::new();
        let mut problems = Vec::new();
        for (found, u) in parts {
            for (all, one) in used.iter_mut().zip(u) {
                *all |= one;
            }
            for f in found {
                match f {
                    Found::Start(id, start) => {
                        starts.insert(id, start);
                    }
                    Found::Carried(name, s) => kept.push((name, s)),
                    Found::Refused(r) => problems.push(*r),
                }
            }
        }
        if !problems.is_empty() {
            return Err(refuse(&problems));
        }
        tracing::debug!(
            runs_ms = t_runs.as_millis() as u64,
            prior_bills_ms = (t_prior - t_runs).as_millis() as u64,
            payments_ms = (t_payments - t_prior).as_millis() as u64,
            starts_ms = (t0.elapsed() - t_payments).as_millis() as u64,
            "late fees: given runs, their bills, payments, where each account starts"
        );
        // Revisions every used state reflects, and those of the given runs
        // (their amounts were read, or checked not to concern an account).
        let used_states: Vec<&ArrearsState> = runs
            .iter()
            .chain(&issued)
            .zip(&used)
            .filter(|(_, u)| **u)
            .filter_map(|(r, _)| r.state.as_ref())
            .collect();
        let mut seen: Option<BTreeSet<String>> = None;
        for s in &used_states {
            seen = Some(match seen {
                None => s.seen.clone(),
                Some(x) => x.intersection(&s.seen).cloned().collect(),
            });
        }
        let mut seen = seen.unwrap_or_default();
        seen.extend(
            runs.iter()
                .flat_map(|r| &r.revisions)
                .filter(|r| !r.run_id.is_empty())
                .map(|r| r.run_id.clone()),
        );
        // Runs counted: those the used states counted (each account of a
        // state was checked against their revisions since), and the given ones.
        let mut counted_runs = BTreeMap::new();
        for s in &used_states {
            for (dir, &n) in &s.runs {
                let now = if dir.exists() {
                    bills_files(dir).len() - 1
                } else {
                    n
                };
                let e = counted_runs.entry(dir.clone()).or_insert(now);
                *e = (*e).max(now);
            }
        }
        for r in &runs {
            counted_runs.insert(r.key.clone(), r.revisions.len());
        }
        Ok(LateFees {
            last_day,
            starts,
            payments,
            fresh_after: runs
                .iter()
                .filter_map(|r| r.state.as_ref().map(|s| (r.period.start, s.as_of)))
                .max_by_key(|p| p.1),
            settled_from: None,
            carried: kept,
            seen,
            runs: counted_runs,
            inputs,
            errors,
        })
    }

    /// The accounts of `carried` whose ids are in `first..=last`, as a range of indexes.
    pub fn carried_within(&self, first: &str, last: &str) -> std::ops::Range<usize> {
        let lo = self.carried.partition_point(|c| c.0.as_str() < first);
        let hi = self.carried.partition_point(|c| c.0.as_str() <= last);
        lo..hi.max(lo)
    }

    /// Adds late-fee lines to the bill `b` of a postpaid account whose
    /// tariff has a late-fee rule; returns the bill's due date (None for
    /// other accounts) and the account's arrears at the period's last day
    /// (None for accounts late fees do not concern). `b` is None for an
    /// account that could not be billed: its arrears are still carried,
    /// with `issued`, its bill issued earlier for this period (a revision
    /// never unissues a bill).
    pub fn apply(
        &self,
        a: &BillingAccount,
        b: Option<&mut AccountBill>,
        issued: Option<PriorBill>,
        tariffs: &TariffSet,
        period: &BillPeriod,
    ) -> (Option<NaiveDate>, Option<AccountArrears>) {
        let rule = rule_of(a, tariffs, self.last_day);
        let start = self.starts.get(&*a.account_id);
        if rule.is_none() && start.is_none() && issued.is_none() {
            return (None, None);
        }
        let pays = self.payments.of(a);
        let fresh;
        let start = match start {
            Some(s) => s,
            None => {
                fresh = self.fresh_start(pays, a.opened_on);
                &fresh
            }
        };
        let mut own = None;
        match (rule, b) {
            (Some((vi, v, rule)), Some(b)) => {
                let due = due_date(period, rule);
                let (owed, fee_pays) = start.fee_inputs(pays);
                let residential = a.customer_class == CustomerClass::Residential;
                for line in late_fee_lines(rule, residential, &owed, &fee_pays, period, &v.rounding)
                {
                    b.total += line.amount;
                    b.lines.push(BillLine {
                        version_index: vi,
                        line,
                        flags: Flags::NONE,
                    });
                }
                own = Some(PriorBill {
                    period: period.label.clone(),
                    start: period.start,
                    due,
                    amount: super::output::as_written(b.total, super::output::AMOUNT.1),
                });
            }
            (_, None) => own = issued,
            (None, Some(_)) => {}
        }
        let due = own.as_ref().map(|o| o.due);
        (due, Some(start.carry(own, pays, self.last_day)))
    }

    /// A fleet's first run: payments dated on or before `day` settled bills
    /// issued before meterflow, so an account in no state starts as of that
    /// day, as under a state of that day: its payments up to then counted,
    /// not credited.
    pub fn settled_through(&mut self, day: NaiveDate, period_start: NaiveDate) {
        if self.fresh_after.is_none() {
            self.fresh_after = Some((day.succ_opt().unwrap_or(day), day));
            self.settled_from = Some(period_start);
        }
    }

    /// A settled first run's opening balances (`opening::read`, as of the
    /// settled-through `day`): each of those accounts starts from its
    /// balance, with its payments up to `day` counted, not credited, as
    /// any account of that run.
    pub fn opening(&mut self, balances: Vec<(&'a BillingAccount, AccountArrears)>, day: NaiveDate) {
        for (a, mut from) in balances {
            from.counted = Counted::through(self.payments.of(a), day);
            // As for the run's other accounts (`fresh_start`).
            from.history_from = self.settled_from;
            self.starts.insert(
                &a.account_id,
                Start {
                    after: Some(day),
                    from,
                },
            );
        }
    }

    /// The start of an account in no given state: with a state given, as of
    /// its day, counting the payments up to then without crediting them
    /// (made while late fees did not concern the account, e.g. prepaid
    /// top-ups); an account opened in or after the state's period (added
    /// after that run) from its opening, crediting what it paid in advance;
    /// else the whole history.
    fn fresh_start(&self, pays: &[(NaiveDate, Decimal)], opened_on: NaiveDate) -> Start {
        match self.fresh_after {
            None => Start::default(),
            Some((first, last)) => {
                let day = match opened_on.pred_opt() {
                    Some(d) if opened_on >= first => d.min(last),
                    _ => last,
                };
                Start {
                    after: Some(day),
                    from: AccountArrears {
                        counted: Counted::through(pays, day),
                        history_from: self.settled_from,
                        ..Default::default()
                    },
                }
            }
        }
    }
}

/// The error for accounts whose carried state cannot be continued.
fn refuse(problems: &[Refusal]) -> BillingError {
    let mut msg = format!(
        "the arrears state of the --previous runs cannot be continued exactly for {} account(s):",
        problems.len()
    );
    for r in problems.iter().take(5) {
        msg += &format!("\n  {}: {} ({})", r.account, r.problem, r.state.display());
    }
    if problems.len() > 5 {
        msg += &format!("\n  ... and {} more", problems.len() - 5);
    }
    let first = problems.iter().filter_map(|r| r.history_from).min();
    if problems.iter().any(|r| r.settled) {
        // A fleet's first run billed with --settled-through is given, and
        // no state passed: the change is before its end, and nothing before
        // it can be given, nor an account's history rebuilt.
        msg += "\nthe fleet's first run (billed with --settled-through) is among the given runs, \
                and nothing before it can be given";
        if problems
            .iter()
            .any(|r| matches!(r.problem, Problem::BackDated { .. }))
        {
            msg += ": restore payments.csv as its state counted the payments up to its day";
        }
    } else if problems
        .iter()
        .all(|r| matches!(r.problem, Problem::Order { .. }))
    {
        msg += "\nonly the whole history helps: give --previous every run since the accounts' first bills";
        if let Some(d) = first {
            msg += &format!(" (every run since {d})");
        }
    } else {
        msg += "\ngive --previous every run since one that ends before the change";
        // The earliest payment a state did not count, when it can be told.
        let back = problems
            .iter()
            .filter_map(|r| match r.problem {
                Problem::BackDated { first, .. } => first,
                _ => None,
            })
            .min();
        if let Some(d) = back {
            msg += &format!(" (for the first payment not counted: one that ends before {d})");
        }
        if let Some(d) = first {
            msg += &format!(" (at the latest, every run since {d}: these accounts' first bills)");
        }
    }
    BillingError::Arrears(msg)
}

/// The due date of a bill for `period`: `due_days` after the period's last
/// day (`period.end` is the day after it).
pub fn due_date(period: &BillPeriod, rule: &LateFeeRule) -> NaiveDate {
    let last_day = period.end.pred_opt().expect("date in range");
    last_day + chrono::Days::new(u64::from(rule.due_days))
}

/// Late-fee lines for this period's bill (empty when nothing is overdue).
/// `payments`: (local date, amount), any order. A negative prior bill (a
/// credit note) is credit from the period's first day.
pub fn late_fee_lines(
    rule: &LateFeeRule,
    residential: bool,
    prior: &[PriorBill],
    payments: &[(NaiveDate, Decimal)],
    period: &BillPeriod,
    rounding: &Rounding,
) -> Vec<ChargeLine> {
    let mut bills: Vec<&PriorBill> = prior
        .iter()
        .filter(|b| b.due < period.end || b.amount < Decimal::ZERO)
        .collect();
    bills.sort_by_key(|b| b.due);
    if !bills.iter().any(|b| b.amount > Decimal::ZERO) {
        return vec![];
    }
    // Payments settle the given bills oldest first: exact when the bills are
    // every one they could have paid, or what a carried state still holds
    // (docs/billing.md). A payment date cannot tell "paid an earlier bill"
    // from "paid in advance".
    let mut pays: Vec<(NaiveDate, Decimal)> = payments.to_vec();
    pays.sort();
    // yuan-days per rate class
    let mut yuan_days = [Decimal::ZERO; 3];
    let mut paid = Decimal::ZERO;
    let mut next_pay = 0;
    // Payments before the period count from its first day.
    let mut day = period.start;
    while day < period.end {
        while next_pay < pays.len() && pays[next_pay].0 <= day {
            paid += pays[next_pay].1;
            next_pay += 1;
        }
        settle(
            &bills,
            |b| b.amount,
            paid,
            |b, open| {
                if day > b.due && open > Decimal::ZERO {
                    let class = if residential {
                        RESIDENTIAL
                    } else if b.due.year() == day.year() {
                        CURRENT_YEAR
                    } else {
                        EARLIER_YEARS
                    };
                    yuan_days[class as usize] += open;
                }
            },
        );
        day = day.succ_opt().expect("date in range");
    }
    let rates = [
        rule.residential_daily,
        rule.current_year_daily,
        rule.earlier_years_daily,
    ];
    let mut lines: Vec<ChargeLine> = (0..3)
        .filter(|&i| yuan_days[i] > Decimal::ZERO)
        .map(|i| ChargeLine {
            kind: LineKind::LateFee,
            index: i as u8,
            quantity: yuan_days[i],
            unit_price: rates[i],
            amount: rounding.round(yuan_days[i] * rates[i]),
        })
        .collect();
    let sum: Decimal = lines.iter().map(|l| l.amount).sum();
    if !lines.is_empty() && sum < rule.minimum {
        let quantity = yuan_days.iter().sum();
        lines = vec![ChargeLine {
            kind: LineKind::LateFee,
            index: MINIMUM,
            quantity,
            unit_price: Decimal::ZERO,
            amount: rounding.round(rule.minimum),
        }];
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tariff::rounding::RoundingMode;
    use rust_decimal_macros::dec;

    fn d(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    fn fen() -> Rounding {
        Rounding::new(RoundingMode::HalfAwayFromZero, dec!(0.01)).unwrap()
    }

    fn sept_bill(amount: Decimal) -> PriorBill {
        bill("2026-09", "2026-10-15", amount)
    }

    /// The bill of a calendar month.
    fn bill(period: &str, due: &str, amount: Decimal) -> PriorBill {
        PriorBill {
            period: period.into(),
            start: d(&format!("{period}-01")),
            due: d(due),
            amount,
        }
    }

    #[test]
    fn unpaid_bill_is_charged_for_the_days_after_its_due_date_in_this_period() {
        let p = BillPeriod::parse("2026-10").unwrap();
        let lines = late_fee_lines(
            &LateFeeRule::default(),
            true,
            &[sept_bill(dec!(200))],
            &[],
            &p,
            &fen(),
        );
        // 16..31 October: 16 days x 200 x 1 per mille = 3.20
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].quantity, dec!(3200));
        assert_eq!(lines[0].amount, dec!(3.20));
        // November charges November's days only: 30 x 0.2 = 6.00.
        let nov = BillPeriod::parse("2026-11").unwrap();
        let lines = late_fee_lines(
            &LateFeeRule::default(),
            true,
            &[sept_bill(dec!(200))],
            &[],
            &nov,
            &fen(),
        );
        assert_eq!(lines[0].amount, dec!(6.00));
    }

    #[test]
    fn a_bill_is_due_the_rule_s_days_after_its_period_s_last_day() {
        let sept = BillPeriod::parse("2026-09").unwrap();
        assert_eq!(due_date(&sept, &LateFeeRule::default()), d("2026-10-15"));
        assert_eq!(sept_bill(dec!(1)).due, d("2026-10-15"));
        let range = BillPeriod::parse("2026-09-05..2026-10-05").unwrap();
        assert_eq!(due_date(&range, &LateFeeRule::default()), d("2026-10-19"));
    }

    #[test]
    fn with_every_bill_given_payments_late_or_in_advance_settle_the_right_ones() {
        let p = BillPeriod::parse("2026-10").unwrap();
        let bills = [
            bill("2026-07", "2026-08-15", dec!(180)),
            bill("2026-08", "2026-09-15", dec!(190)),
            sept_bill(dec!(200)),
        ];
        let fee = |pays: &[(NaiveDate, Decimal)]| {
            late_fee_lines(&LateFeeRule::default(), true, &bills, pays, &p, &fen())
        };
        // Paid July's and August's after they were issued, not September's:
        // 16..31 October x 200 x 1 per mille = 3.20.
        let late = fee(&[(d("2026-08-10"), dec!(180)), (d("2026-09-10"), dec!(190))]);
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].amount, dec!(3.20));
        // Paid each bill on the 25th of its own month, before it was issued.
        let early = fee(&[
            (d("2026-07-25"), dec!(180)),
            (d("2026-08-25"), dec!(190)),
            (d("2026-09-25"), dec!(200)),
        ]);
        assert!(early.is_empty(), "{early:?}");
    }

    #[test]
    fn a_payment_stops_the_fee_on_the_day_it_is_made_and_pays_the_oldest_bill_first() {
        let p = BillPeriod::parse("2026-10").unwrap();
        let aug = bill("2026-08", "2026-09-15", dec!(100));
        // 150 paid on 21 Oct: August (100) is settled first, then 50 of September's 200.
        let lines = late_fee_lines(
            &LateFeeRule::default(),
            false,
            &[sept_bill(dec!(200)), aug],
            &[(d("2026-10-21"), dec!(150))],
            &p,
            &fen(),
        );
        // August: 1..20 Oct = 20 days x 100; September: 16..20 Oct 5 x 200 + 21..31 Oct 11 x 150.
        // (20 x 100 + 5 x 200 + 11 x 150) x 2 per mille = 4650 x 0.002 = 9.30
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].index, CURRENT_YEAR);
        assert_eq!(lines[0].quantity, dec!(4650));
        assert_eq!(lines[0].amount, dec!(9.30));
    }

    #[test]
    fn small_fees_are_raised_to_the_minimum_and_paid_bills_cost_nothing() {
        let p = BillPeriod::parse("2026-10").unwrap();
        let lines = late_fee_lines(
            &LateFeeRule::default(),
            true,
            &[sept_bill(dec!(20))],
            &[],
            &p,
            &fen(),
        );
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].index, MINIMUM);
        assert_eq!(lines[0].amount, dec!(1.00));
        let paid = late_fee_lines(
            &LateFeeRule::default(),
            true,
            &[sept_bill(dec!(20))],
            &[(d("2026-10-10"), dec!(20))],
            &p,
            &fen(),
        );
        assert!(paid.is_empty());
    }

    #[test]
    fn arrears_of_earlier_years_cost_more_for_non_residential_accounts() {
        let p = BillPeriod::parse("2027-01").unwrap();
        let dec_bill = bill("2026-11", "2026-12-15", dec!(1000));
        let lines = late_fee_lines(&LateFeeRule::default(), false, &[dec_bill], &[], &p, &fen());
        // 31 January days, arrear of 2026: 3 per mille -> 31 x 1000 x 0.003 = 93.00
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].index, EARLIER_YEARS);
        assert_eq!(lines[0].amount, dec!(93.00));
    }

    fn last_day(period: &str) -> NaiveDate {
        BillPeriod::parse(period).unwrap().end.pred_opt().unwrap()
    }

    /// Bills of July..November (one per month, due on the 15th of the next)
    /// and payments of every kind: in advance, partial, late, over, none in
    /// September.
    fn year() -> (Vec<PriorBill>, Vec<(NaiveDate, Decimal)>) {
        let bills = vec![
            bill("2026-07", "2026-08-15", dec!(180)),
            bill("2026-08", "2026-09-15", dec!(190)),
            bill("2026-09", "2026-10-15", dec!(200)),
            bill("2026-10", "2026-11-15", dec!(210)),
            bill("2026-11", "2026-12-15", dec!(220)),
        ];
        let pays = vec![
            (d("2026-07-20"), dec!(50)),
            (d("2026-08-20"), dec!(100)),
            (d("2026-10-18"), dec!(400)),
            (d("2026-10-25"), dec!(30)),
            (d("2026-11-10"), dec!(75)),
            (d("2026-12-02"), dec!(500)),
        ];
        (bills, pays)
    }

    /// Bills July..December one month at a time, each continuing the state
    /// of the month before, checks each month's fees against the whole
    /// history's, and returns how many fee lines were charged and the
    /// state at the end of each month.
    fn month_by_month(
        bills: &[PriorBill],
        pays: &[(NaiveDate, Decimal)],
    ) -> (usize, Vec<AccountArrears>) {
        let rule = LateFeeRule::default();
        let (mut start, mut charged, mut states) = (Start::default(), 0, Vec::new());
        let months = [
            "2026-07", "2026-08", "2026-09", "2026-10", "2026-11", "2026-12",
        ];
        for (n, month) in months.iter().enumerate() {
            let p = BillPeriod::parse(month).unwrap();
            let whole = late_fee_lines(&rule, false, &bills[..n], pays, &p, &fen());
            let (owed, fee_pays) = start.fee_inputs(pays);
            let carried = late_fee_lines(&rule, false, &owed, &fee_pays, &p, &fen());
            assert_eq!(carried, whole, "{month}");
            charged += whole.len();
            let own = bills.get(n).cloned();
            let state = start.carry(own.clone(), pays, last_day(month));
            let own = own.as_ref().map(|b| (b.period.as_str(), b.due));
            start = Start::continue_state(&state, last_day(month), &[], pays, own).unwrap();
            states.push(state);
        }
        (charged, states)
    }

    #[test]
    fn continuing_each_month_from_the_last_state_gives_the_whole_history_s_fees() {
        let (bills, pays) = year();
        let (charged, _) = month_by_month(&bills, &pays);
        assert!(charged >= 3, "the history has overdue days");
    }

    #[test]
    fn a_state_continued_with_the_bills_of_later_runs_gives_the_whole_history_s_fees() {
        let (bills, pays) = year();
        let rule = LateFeeRule::default();
        // The state of August, then the bills of September..November replayed.
        let aug = Start::whole_history(&bills[..1]).carry(
            Some(bills[1].clone()),
            &pays,
            last_day("2026-08"),
        );
        let start = Start::continue_state(&aug, last_day("2026-08"), &bills, &pays, None).unwrap();
        let dec = BillPeriod::parse("2026-12").unwrap();
        let (owed, fee_pays) = start.fee_inputs(&pays);
        assert_eq!(
            late_fee_lines(&rule, true, &owed, &fee_pays, &dec, &fen()),
            late_fee_lines(&rule, true, &bills, &pays, &dec, &fen())
        );
    }

    #[test]
    fn a_payment_made_before_any_bill_is_carried_as_credit_and_pays_the_next_bill() {
        let pays = [(d("2026-07-10"), dec!(300))];
        let jul = Start::default().carry(
            Some(bill("2026-07", "2026-08-15", dec!(180))),
            &pays,
            last_day("2026-07"),
        );
        assert!(jul.open.is_empty());
        assert_eq!(jul.credit, dec!(120));
        assert_eq!(jul.counted.count, 1);
        assert_eq!(jul.history_from, Some(d("2026-07-01")));
        let start = Start::continue_state(&jul, last_day("2026-07"), &[], &pays, None).unwrap();
        let aug = start.carry(
            Some(bill("2026-08", "2026-09-15", dec!(190))),
            &pays,
            last_day("2026-08"),
        );
        assert_eq!(aug.credit, Decimal::ZERO);
        assert_eq!(aug.open.len(), 1);
        assert_eq!(aug.open[0].unpaid, dec!(70));
        assert_eq!(aug.open[0].bill.amount, dec!(190));
        assert_eq!(aug.counted.sum, dec!(300), "a payment is counted once");
    }

    #[test]
    fn a_payment_dated_on_or_before_the_state_s_day_that_it_did_not_count_is_refused() {
        let pays = vec![(d("2026-10-20"), dec!(100))];
        let oct = Start::default().carry(Some(sept_bill(dec!(200))), &pays, last_day("2026-10"));
        let as_of = last_day("2026-10");
        assert!(Start::continue_state(&oct, as_of, &[], &pays, None).is_ok());
        let later = [pays[0], (d("2026-11-02"), dec!(5))];
        assert!(Start::continue_state(&oct, as_of, &[], &later, None).is_ok());
        let back_dated = [(d("2026-10-05"), dec!(5)), pays[0]];
        match Start::continue_state(&oct, as_of, &[], &back_dated, None) {
            Err(p @ Problem::BackDated { counted, now, .. }) => {
                assert_eq!((counted.count, counted.sum), (1, dec!(100)));
                assert_eq!((now.count, now.sum), (2, dec!(105)));
                assert!(p.to_string().contains("dated 2026-10-05"), "{p}");
            }
            other => panic!("{other:?}"),
        }
        // A back-dated 100 beside the counted 100: which one is new cannot
        // be told, so no date is named (naming the earlier would mislead).
        let twice = [(d("2026-10-02"), dec!(100)), pays[0]];
        match Start::continue_state(&oct, as_of, &[], &twice, None) {
            Err(Problem::BackDated { first, .. }) => assert_eq!(first, None),
            other => panic!("{other:?}"),
        }
        // A removed payment is refused too.
        assert!(Start::continue_state(&oct, as_of, &[], &[], None).is_err());
    }

    #[test]
    fn a_bill_the_state_holds_at_another_amount_than_the_runs_is_refused() {
        let oct = Start::default().carry(Some(sept_bill(dec!(200))), &[], last_day("2026-10"));
        let as_of = last_day("2026-10");
        let same = [sept_bill(dec!(200))];
        assert!(Start::continue_state(&oct, as_of, &same, &[], None).is_ok());
        let revised = [sept_bill(dec!(230))];
        assert_eq!(
            Start::continue_state(&oct, as_of, &revised, &[], None),
            Err(Problem::Amount {
                period: "2026-09".into(),
                state: dec!(200),
                runs: dec!(230)
            })
        );
    }

    #[test]
    fn a_later_bill_falling_due_before_one_the_state_counted_is_refused() {
        let sep = Start::default().carry(
            Some(bill("2026-09", "2026-11-30", dec!(10))),
            &[(d("2026-09-02"), dec!(10))],
            last_day("2026-09"),
        );
        assert!(sep.open.is_empty(), "paid");
        let pays = [(d("2026-09-02"), dec!(10))];
        let as_of = last_day("2026-09");
        let r = Start::continue_state(&sep, as_of, &[], &pays, Some(("2026-10", d("2026-11-15"))));
        assert!(matches!(r, Err(Problem::Order { .. })), "{r:?}");
        let msg = refuse(&[Refusal {
            account: "A1".into(),
            state: "sep".into(),
            problem: r.unwrap_err(),
            history_from: Some(d("2026-09-01")),
            settled: false,
        }])
        .to_string();
        assert!(msg.contains("only the whole history"), "{msg}");
        assert!(!msg.contains("ends before the change"), "{msg}");
        let r = Start::continue_state(&sep, as_of, &[], &pays, Some(("2026-10", d("2026-12-15"))));
        assert!(r.is_ok());
    }

    #[test]
    fn the_state_written_reads_back_the_same_with_the_revisions_it_reflects() {
        let (bills, pays) = year();
        let as_of = last_day("2026-09");
        let a1 = Start::whole_history(&bills[..2]).carry(Some(bills[2].clone()), &pays, as_of);
        let a2 = Start::default().carry(None, &[(d("2026-09-01"), dec!(12.5))], as_of);
        assert!(!a1.open.is_empty() && a2.open.is_empty());
        let seen: BTreeSet<String> = ["r2".to_string(), "r1".to_string()].into();
        let batch = super::super::output::arrears_batch(
            "run",
            "2026-09",
            as_of,
            &[("A1", &a1), ("A2", &a2)],
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        let runs: BTreeMap<PathBuf, usize> = [(PathBuf::from("/runs/2026-08"), 2)].into();
        let props =
            super::super::output::arrears_properties(&seen, &runs, Path::new("/runs/2026-09"));
        let mut w = parquet::arrow::ArrowWriter::try_new(
            File::create(&path).unwrap(),
            super::super::output::arrears_schema(),
            Some(props),
        )
        .unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let back = read_state(&path, as_of).unwrap();
        assert_eq!(back.accounts["A1"], a1);
        assert_eq!(back.accounts["A2"], a2);
        assert_eq!(back.seen, seen);
        // Written relative to the run's own directory.
        let relative: BTreeMap<PathBuf, usize> = [(PathBuf::from("../2026-08"), 2)].into();
        assert_eq!(back.runs, relative);
        // A state of another day is not this run's.
        assert!(read_state(&path, last_day("2026-10")).is_err());
    }

    fn given(dir: &str, period: &str) -> GivenRun {
        GivenRun {
            dir: dir.into(),
            key: dir.into(),
            period: BillPeriod::parse(period).unwrap(),
            revisions: vec![],
            state: None,
            state_path: PathBuf::new(),
            outside: Vec::new(),
            settled: false,
        }
    }

    #[test]
    fn runs_counted_are_kept_relative_to_the_run_and_resolved_from_where_it_is_read() {
        let base = Path::new("/data/runs/2026-10");
        for (dir, rel) in [
            ("/data/runs/2026-09", "../2026-09"),
            ("/data/runs/2026-10/revision-1", "revision-1"),
            ("/data/old/runs/2026-08", "../../old/runs/2026-08"),
        ] {
            assert_eq!(relative(Path::new(dir), base), PathBuf::from(rel));
            assert_eq!(resolve(Path::new(rel), base), PathBuf::from(dir));
            // The same tree moved elsewhere resolves to the moved run.
            let moved = Path::new("/mnt/copy/runs/2026-10");
            let there = resolve(Path::new(rel), moved);
            assert_eq!(relative(&there, moved), PathBuf::from(rel));
        }
        // A state written before paths were relative: absolute stays absolute.
        assert_eq!(
            resolve(Path::new("/data/runs/2026-09"), base),
            PathBuf::from("/data/runs/2026-09")
        );
    }

    #[test]
    fn consecutive_runs_ending_before_the_period_pass_and_gaps_or_overlaps_are_refused() {
        let nov = BillPeriod::parse("2026-11").unwrap();
        let mut ok = vec![
            given("oct", "2026-10"),
            given("sep", "2026-09"),
            given("sep", "2026-09"),
        ];
        check_chain(&mut ok, &nov).unwrap();
        assert_eq!(ok.len(), 2, "a run given twice counts once");
        assert_eq!(ok[0].dir, PathBuf::from("sep"));
        let err = |mut runs: Vec<GivenRun>| check_chain(&mut runs, &nov).unwrap_err().to_string();
        let gap = err(vec![given("aug", "2026-08"), given("oct", "2026-10")]);
        assert!(
            gap.contains("no run given for 2026-09-01..2026-10-01"),
            "{gap}"
        );
        let late = err(vec![given("sep", "2026-09")]);
        assert!(
            late.contains("no run given for 2026-10-01..2026-11-01"),
            "{late}"
        );
        let twice = err(vec![given("oct", "2026-10"), given("oct-again", "2026-10")]);
        assert!(twice.contains("overlap"), "{twice}");
        let into = err(vec![given("x", "2026-10-15..2026-11-15")]);
        assert!(into.contains("reaches into this period"), "{into}");
    }

    #[test]
    fn a_revision_the_state_has_not_seen_is_found_for_the_accounts_it_changed() {
        let mut sep = given("sep", "2026-09");
        sep.revisions.push(Revision {
            dir: "sep/revision-1".into(),
            run_id: "rev1".into(),
            accounts: ["A1".to_string()].into(),
        });
        let oct_state = ArrearsState {
            as_of: last_day("2026-10"),
            ..Default::default()
        };
        assert!(sep
            .unseen_revision(&oct_state, oct_state.as_of, "A1")
            .is_some());
        assert!(
            sep.unseen_revision(&oct_state, oct_state.as_of, "A2")
                .is_none(),
            "not changed"
        );
        let mut seen = oct_state.clone();
        seen.seen.insert("rev1".into());
        assert!(
            sep.unseen_revision(&seen, seen.as_of, "A1").is_none(),
            "seen"
        );
        // A state before the run does not hold its bills.
        let aug_state = ArrearsState {
            as_of: last_day("2026-08"),
            ..Default::default()
        };
        assert!(sep
            .unseen_revision(&aug_state, aug_state.as_of, "A1")
            .is_none());
    }

    #[test]
    fn a_credit_note_pays_the_oldest_bills_like_a_payment_in_the_fees_and_the_state() {
        let rule = LateFeeRule::default();
        let oct = BillPeriod::parse("2026-10").unwrap();
        let aug = bill("2026-08", "2026-09-15", dec!(100));
        let note = bill("2026-09", "2026-10-15", dec!(-60));
        // October: 31 days x (100 - 60) x 1 per mille = 1.24.
        let lines = late_fee_lines(&rule, true, &[aug.clone(), note.clone()], &[], &oct, &fen());
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].quantity, dec!(1240));
        // The state at the end of September owes 40 of August's bill.
        let sep = Start::whole_history(std::slice::from_ref(&aug)).carry(
            Some(note.clone()),
            &[],
            last_day("2026-09"),
        );
        assert_eq!(sep.open.len(), 1);
        assert_eq!(sep.open[0].unpaid, dec!(40));
        assert_eq!(sep.credit, Decimal::ZERO);
        assert_eq!(sep.last_due, Some(d("2026-09-15")), "a note is not due");
        // A note larger than what is owed leaves credit; month by month
        // gives the whole history's fees.
        let (mut bills, pays) = year();
        bills[2].amount = dec!(-500);
        let (_, states) = month_by_month(&bills, &pays);
        // September: 180 + 190 - 50 - 100 owed, less the note's 500: 280 of credit.
        assert!(states[2].open.is_empty());
        assert_eq!(states[2].credit, dec!(280));
    }

    /// A run directory of `period` with no bills and the arrears state `rows`.
    fn state_run(dir: &Path, period: &str, rows: &[(&str, &AccountArrears)]) {
        run_dir(dir, period, &[]);
        state_file(dir, period, rows, &[], &[]);
    }

    /// A run directory of `period` (its manifest) with the bills `rows`.
    fn run_dir(dir: &Path, period: &str, rows: &[(&str, &PriorBill)]) {
        std::fs::create_dir_all(dir).unwrap();
        let manifest = format!("{{\"period\": \"{period}\"}}");
        std::fs::write(dir.join("manifest.json"), manifest).unwrap();
        bills_file(dir, period, rows);
    }

    /// `dir/bills.parquet` of the run `run_id` with the bills `rows`, only
    /// the columns late fees read filled.
    fn bills_file(dir: &Path, run_id: &str, rows: &[(&str, &PriorBill)]) {
        use arrow::array::{ArrayRef, RecordBatch};
        use std::sync::Arc;
        std::fs::create_dir_all(dir).unwrap();
        let schema = super::super::output::bills_schema();
        let text = |f: &dyn Fn(&(&str, &PriorBill)) -> String| -> ArrayRef {
            Arc::new(StringArray::from(rows.iter().map(f).collect::<Vec<_>>()))
        };
        let cols: Vec<ArrayRef> = schema
            .fields()
            .iter()
            .map(|f| match f.name().as_str() {
                "run_id" => text(&|_| run_id.to_string()),
                "account_id" => text(&|r| r.0.to_string()),
                "period" => text(&|r| r.1.period.clone()),
                "due_date" => text(&|r| r.1.due.to_string()),
                "total" => {
                    let cents = rows.iter().map(|r| {
                        let mut x = r.1.amount;
                        x.rescale(2);
                        x.mantissa()
                    });
                    Arc::new(
                        Decimal128Array::from(cents.collect::<Vec<_>>())
                            .with_data_type(f.data_type().clone()),
                    ) as ArrayRef
                }
                _ => arrow::array::new_null_array(f.data_type(), rows.len()),
            })
            .collect();
        let relaxed = arrow::datatypes::Schema::new(
            schema
                .fields()
                .iter()
                .map(|f| f.as_ref().clone().with_nullable(true))
                .collect::<Vec<_>>(),
        );
        let batch = RecordBatch::try_new(Arc::new(relaxed), cols).unwrap();
        let f = File::create(dir.join("bills.parquet")).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }

    /// `dir/arrears.parquet`: the state `rows` of `period`, reflecting the
    /// revisions `seen` and having counted the runs `runs` (no revision).
    fn state_file(
        dir: &Path,
        period: &str,
        rows: &[(&str, &AccountArrears)],
        seen: &[&str],
        runs: &[&Path],
    ) {
        state_file_of(dir, dir, period, rows, seen, runs);
    }

    /// `state_file` in `dir` with the runs counted relative to `run`, as a
    /// run writes them (`run/revision-N/` is `dir` in a revision).
    fn state_file_of(
        dir: &Path,
        run: &Path,
        period: &str,
        rows: &[(&str, &AccountArrears)],
        seen: &[&str],
        runs: &[&Path],
    ) {
        use super::super::output;
        std::fs::create_dir_all(dir).unwrap();
        let base = std::fs::canonicalize(run).unwrap();
        let seen: BTreeSet<String> = seen.iter().map(|s| s.to_string()).collect();
        let runs: BTreeMap<PathBuf, usize> = runs
            .iter()
            .map(|r| (std::fs::canonicalize(r).unwrap(), 0))
            .collect();
        let batch = output::arrears_batch("run", period, last_day(period), rows);
        let props = output::arrears_properties(&seen, &runs, &base);
        let f = File::create(dir.join(STATE_FILE)).unwrap();
        let mut w =
            parquet::arrow::ArrowWriter::try_new(f, output::arrears_schema(), Some(props)).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }

    #[test]
    fn a_state_with_impossible_amounts_is_refused_naming_the_account() {
        let tmp = tempfile::tempdir().unwrap();
        let open = |unpaid| OpenBill {
            bill: sept_bill(dec!(10)),
            unpaid,
        };
        let cases = [
            (
                AccountArrears {
                    credit: dec!(-1),
                    ..Default::default()
                },
                "negative credit",
            ),
            (
                AccountArrears {
                    open: vec![open(dec!(11))],
                    ..Default::default()
                },
                "is not within",
            ),
            (
                AccountArrears {
                    open: vec![open(dec!(0))],
                    ..Default::default()
                },
                "is not within",
            ),
            (
                AccountArrears {
                    open: vec![open(dec!(5)), open(dec!(5))],
                    ..Default::default()
                },
                "listed twice",
            ),
            (
                AccountArrears {
                    credit: Decimal::MAX,
                    ..Default::default()
                },
                // Past what the column holds: refused, whichever check sees it.
                "credit",
            ),
        ];
        for (k, (a, why)) in cases.iter().enumerate() {
            let dir = tmp.path().join(format!("oct{k}"));
            state_run(&dir, "2026-10", &[("BAD", a)]);
            let e = read_state(&dir.join(STATE_FILE), last_day("2026-10"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("BAD") && e.contains(why), "{e}");
        }
    }

    fn postpaid(id: &str) -> BillingAccount {
        BillingAccount {
            account_id: id.into(),
            tariff_id: "bj-residential-monthly".into(),
            contracted_kva: Decimal::ZERO,
            opened_on: d("2020-01-01"),
            customer_class: CustomerClass::Residential,
            payment_mode: PaymentMode::Postpaid,
        }
    }

    fn nov_period() -> BillPeriod {
        BillPeriod::parse("2026-11").unwrap()
    }

    fn shipped_tariffs() -> TariffSet {
        crate::tariff::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tariffs")).unwrap()
    }

    #[test]
    fn an_account_missing_from_accounts_csv_is_carried_unchanged_and_a_new_one_starts_at_the_state_s_day(
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let tariffs = shipped_tariffs();
        let oct = tmp.path().join("oct");
        let gone = Start::default().carry(
            Some(sept_bill(dec!(200))),
            &[(d("2026-10-20"), dec!(50))],
            last_day("2026-10"),
        );
        state_run(&oct, "2026-10", &[("GONE", &gone)]);
        let pays = tmp.path().join("payments.csv");
        std::fs::write(
            &pays,
            "txn_id,channel,account_id,amount,paid_at\n\
             T1,bank,GONE,50.00,2026-10-20T02:00:00Z\n\
             T2,bank,NEW,100.00,2026-09-10T02:00:00Z\n\
             T3,bank,NEW,20.00,2026-11-05T02:00:00Z\n\
             T4,bank,OPENED,100.00,2026-10-25T02:00:00Z\n",
        )
        .unwrap();
        // November: GONE is not in accounts.csv, NEW was prepaid until now,
        // OPENED opened on 20 October, after October's run, and paid in advance.
        let opened = BillingAccount {
            opened_on: d("2026-10-20"),
            ..postpaid("OPENED")
        };
        let (_, o) = LateFees::load(
            std::slice::from_ref(&oct),
            None,
            &pays,
            &nov_period(),
            std::slice::from_ref(&opened),
            &tariffs,
        )
        .unwrap()
        .apply(&opened, None, None, &tariffs, &nov_period());
        let o = o.unwrap();
        assert_eq!(o.credit, dec!(100), "paid since it was opened: credit");
        assert_eq!((o.counted.count, o.counted.sum), (1, dec!(100)));
        let accounts = vec![postpaid("NEW")];
        let nov = BillPeriod::parse("2026-11").unwrap();
        let late = LateFees::load(
            std::slice::from_ref(&oct),
            None,
            &pays,
            &nov,
            &accounts,
            &tariffs,
        )
        .unwrap();
        let mut kept = gone.clone();
        kept.as_of = Some(last_day("2026-10"));
        assert_eq!(late.carried, vec![("GONE".to_string(), kept.clone())]);
        let (_, new) = late.apply(&accounts[0], None, None, &tariffs, &nov);
        let new = new.unwrap();
        assert_eq!(
            new.credit,
            dec!(20),
            "a top-up before the state's day is no credit"
        );
        assert_eq!((new.counted.count, new.counted.sum), (2, dec!(120)));
        // November's state holds GONE as it was; December, with GONE back,
        // continues it from 31 October.
        let novdir = tmp.path().join("nov");
        state_run(&novdir, "2026-11", &[("GONE", &kept), ("NEW", &new)]);
        let back = read_state(&novdir.join(STATE_FILE), last_day("2026-11")).unwrap();
        assert_eq!(back.accounts["GONE"], kept);
        let accounts = vec![postpaid("GONE"), postpaid("NEW")];
        let dec_p = BillPeriod::parse("2026-12").unwrap();
        let late = LateFees::load(&[novdir], None, &pays, &dec_p, &accounts, &tariffs).unwrap();
        let (_, g) = late.apply(&accounts[0], None, None, &tariffs, &dec_p);
        let g = g.unwrap();
        assert_eq!(g.open.len(), 1);
        assert_eq!(g.open[0].unpaid, dec!(150));
        assert_eq!(g.counted.count, 1);
        let (_, n) = late.apply(&accounts[1], None, None, &tariffs, &dec_p);
        assert_eq!(n.unwrap().credit, dec!(20));
    }

    #[test]
    fn a_missing_payments_file_is_named_when_the_state_counted_payments() {
        let tmp = tempfile::tempdir().unwrap();
        let oct = tmp.path().join("oct");
        let a = Start::default().carry(
            Some(sept_bill(dec!(200))),
            &[(d("2026-10-20"), dec!(50))],
            last_day("2026-10"),
        );
        state_run(&oct, "2026-10", &[("A1", &a)]);
        let accounts = vec![postpaid("A1")];
        let nov = BillPeriod::parse("2026-11").unwrap();
        let missing = tmp.path().join("payments.csv");
        let err = LateFees::load(&[oct], None, &missing, &nov, &accounts, &shipped_tariffs())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("is missing"), "{err}");
        assert!(!err.contains("back-dated"), "{err}");
    }

    #[test]
    fn a_revision_of_a_run_the_state_counted_that_is_not_given_is_refused_naming_the_run() {
        let tmp = tempfile::tempdir().unwrap();
        let tariffs = shipped_tariffs();
        // September's run, revised after October's state was written.
        let sep = tmp.path().join("sep");
        state_run(&sep, "2026-09", &[]);
        let sep = std::fs::canonicalize(&sep).unwrap();
        let oct = tmp.path().join("oct");
        let a = Start::whole_history(&[sept_bill(dec!(200))]).carry(None, &[], last_day("2026-10"));
        run_dir(&oct, "2026-10", &[]);
        state_file(&oct, "2026-10", &[("A1", &a)], &[], &[&sep]);
        let accounts = vec![postpaid("A1")];
        let nov = BillPeriod::parse("2026-11").unwrap();
        let pays = tmp.path().join("payments.csv");
        let load = |runs: &[PathBuf]| LateFees::load(runs, None, &pays, &nov, &accounts, &tariffs);
        let late = load(std::slice::from_ref(&oct)).unwrap();
        assert_eq!(late.runs.get(&sep), Some(&0), "the runs counted carry on");
        // A revision of September changing A1.
        bills_file(
            &sep.join("revision-1"),
            "rev1",
            &[("A1", &sept_bill(dec!(210)))],
        );
        let err = load(std::slice::from_ref(&oct)).err().unwrap().to_string();
        assert!(err.contains("A1"), "{err}");
        assert!(
            err.contains(&format!("add --previous {}", sep.display())),
            "{err}"
        );
        // Gone: a warning, and the state is continued.
        std::fs::remove_dir_all(&sep).unwrap();
        assert!(load(&[oct]).is_ok());
    }

    /// GONE, no longer in accounts.csv: billed 100 for August (paid on 20
    /// August), 200 for September and 210 for October (50 paid on 20
    /// October). August's run has no state; September's and October's hold
    /// GONE's. Returns the run directories, payments.csv and the payments.
    struct Gone {
        aug: PathBuf,
        sep: PathBuf,
        oct: PathBuf,
        pays: PathBuf,
        paid: Vec<(NaiveDate, Decimal)>,
    }

    fn oct_bill() -> PriorBill {
        bill("2026-10", "2026-11-15", dec!(210))
    }

    fn aug_bill() -> PriorBill {
        bill("2026-08", "2026-09-15", dec!(100))
    }

    fn gone(tmp: &Path) -> Gone {
        let paid = vec![(d("2026-08-20"), dec!(100)), (d("2026-10-20"), dec!(50))];
        let (aug, sep, oct) = (tmp.join("aug"), tmp.join("sep"), tmp.join("oct"));
        run_dir(&aug, "2026-08", &[("GONE", &aug_bill())]);
        let sep_state = Start::whole_history(&[aug_bill()]).carry(
            Some(sept_bill(dec!(200))),
            &paid,
            last_day("2026-09"),
        );
        run_dir(&sep, "2026-09", &[("GONE", &sept_bill(dec!(200)))]);
        state_file(&sep, "2026-09", &[("GONE", &sep_state)], &[], &[&aug]);
        let oct_state = Start::continue_state(&sep_state, last_day("2026-09"), &[], &paid, None)
            .unwrap()
            .carry(Some(oct_bill()), &paid, last_day("2026-10"));
        run_dir(&oct, "2026-10", &[("GONE", &oct_bill())]);
        state_file(&oct, "2026-10", &[("GONE", &oct_state)], &[], &[&aug, &sep]);
        let pays = tmp.join("payments.csv");
        std::fs::write(
            &pays,
            "txn_id,channel,account_id,amount,paid_at\n\
             T1,bank,GONE,100.00,2026-08-20T02:00:00Z\n\
             T2,bank,GONE,50.00,2026-10-20T02:00:00Z\n",
        )
        .unwrap();
        Gone {
            aug,
            sep,
            oct,
            pays,
            paid,
        }
    }

    impl Gone {
        /// September's revision-1, written after October's state, raises
        /// GONE's bill to 230; with `state`, it writes its own.
        fn revise_september(&self, state: bool) {
            let rev = self.sep.join("revision-1");
            bills_file(&rev, "rev1", &[("GONE", &sept_bill(dec!(230)))]);
            if state {
                let s = Start::whole_history(&[aug_bill()]).carry(
                    Some(sept_bill(dec!(230))),
                    &self.paid,
                    last_day("2026-09"),
                );
                state_file(&rev, "2026-09", &[("GONE", &s)], &[], &[&self.aug]);
            }
        }

        /// GONE at the end of October as the whole history with the revised
        /// bill gives it, carried (as of 31 October).
        fn whole(&self) -> AccountArrears {
            let bills = [aug_bill(), sept_bill(dec!(230)), oct_bill()];
            let mut a = Start::whole_history(&bills).carry(None, &self.paid, last_day("2026-10"));
            a.as_of = Some(last_day("2026-10"));
            a
        }
    }

    #[test]
    fn a_carried_account_a_revision_changed_after_its_latest_state_continues_from_a_state_that_saw_it(
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let g = gone(tmp.path());
        g.revise_september(true);
        let late = LateFees::load(
            &[g.sep.clone(), g.oct.clone()],
            None,
            &g.pays,
            &nov_period(),
            &[],
            &shipped_tariffs(),
        )
        .unwrap();
        // September's revised state, with October's bill and the 50 paid
        // since (counted by October's state): the whole history's.
        let whole = g.whole();
        assert_eq!(whole.open[0].unpaid, dec!(180));
        // The state's metadata names every given run's revisions; this row
        // is what makes that true for GONE.
        assert_eq!(late.carried, vec![("GONE".to_string(), whole)]);
    }

    #[test]
    fn a_carried_account_a_revision_changed_unseen_by_every_state_is_refused_or_recomputed_from_its_whole_history(
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let g = gone(tmp.path());
        g.revise_september(false);
        let load = |runs: &[&PathBuf]| {
            let runs: Vec<PathBuf> = runs.iter().map(|r| r.to_path_buf()).collect();
            LateFees::load(&runs, None, &g.pays, &nov_period(), &[], &shipped_tariffs())
        };
        // October's state counted September's run, which is not given.
        let err = load(&[&g.oct]).err().unwrap().to_string();
        let sep = std::fs::canonicalize(&g.sep).unwrap();
        assert!(err.contains("GONE"), "{err}");
        assert!(
            err.contains(&format!("add --previous {}", sep.display())),
            "{err}"
        );
        // Given, no state saw the revision, and GONE's first bill is August's.
        let err = load(&[&g.sep, &g.oct]).err().unwrap().to_string();
        assert!(err.contains("GONE") && err.contains("revision-1"), "{err}");
        assert!(err.contains("every run since 2026-08-01"), "{err}");
        // From August on: the whole history, with the payments the latest
        // state counted.
        let late = load(&[&g.aug, &g.sep, &g.oct]).unwrap();
        assert_eq!(late.carried, vec![("GONE".to_string(), g.whole())]);
    }

    #[test]
    fn in_a_revision_an_account_gone_from_accounts_csv_keeps_the_bill_its_issued_run_issued() {
        let tmp = tempfile::tempdir().unwrap();
        let g = gone(tmp.path());
        let oct = BillPeriod::parse("2026-10").unwrap();
        let tariffs = shipped_tariffs();
        // October's issued bill, as the revision reads it from its bills.
        let issued_bills = crate::billing::revision::Issued {
            bills: [(
                "GONE".to_string(),
                crate::billing::revision::IssuedBill {
                    total: oct_bill().amount,
                    due: Some(oct_bill().due),
                },
            )]
            .into(),
            run_id: String::new(),
            settled_through: None,
            opening: None,
        };
        let try_load = || {
            let sep = std::slice::from_ref(&g.sep);
            LateFees::load(
                sep,
                Some((&g.oct, &issued_bills)),
                &g.pays,
                &oct,
                &[],
                &tariffs,
            )
        };
        let load = || try_load().unwrap();
        // October re-run given September: GONE as October's state holds it,
        // not September's.
        let issued = read_state(&g.oct.join(STATE_FILE), last_day("2026-10")).unwrap();
        let mut kept = issued.accounts["GONE"].clone();
        assert_eq!(kept.last_due, Some(d("2026-11-15")), "October's bill");
        kept.as_of = Some(last_day("2026-10"));
        assert_eq!(load().carried, vec![("GONE".to_string(), kept)]);
        // September revised since: its revision's state, with the issued
        // October bill and the payment since, each counted once.
        g.revise_september(true);
        assert_eq!(load().carried, vec![("GONE".to_string(), g.whole())]);
        // An issued run written before states: September's state lacks the
        // October bill, so GONE is refused rather than carried without it.
        std::fs::remove_file(g.oct.join(STATE_FILE)).unwrap();
        let err = try_load().err().expect("refused").to_string();
        assert!(
            err.contains("GONE") && err.contains("billed it for 2026-10"),
            "{err}"
        );
    }
    #[test]
    fn a_carried_account_comes_from_the_state_of_its_latest_day_and_is_checked_against_the_given_bills(
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = |n: &str| tmp.path().join(n);
        let (aug, sep, oct, sepb) = (dir("aug"), dir("sep"), dir("oct"), dir("sepb"));
        let pays = dir("payments.csv");
        let tariffs = shipped_tariffs();
        let load = |runs: &[&PathBuf]| {
            let runs: Vec<PathBuf> = runs.iter().map(|p| p.to_path_buf()).collect();
            LateFees::load(&runs, None, &pays, &nov_period(), &[], &tariffs)
        };
        // October's state, holding GONE as `row`.
        let october = |row: &AccountArrears, counted: &[&Path]| {
            let _ = std::fs::remove_dir_all(&oct);
            run_dir(&oct, "2026-10", &[]);
            state_file(&oct, "2026-10", &[("GONE", row)], &[], counted);
        };
        // `a` carried as of the last day of `period`.
        let as_of = |a: &AccountArrears, period: &str| {
            let mut a = a.clone();
            a.as_of = Some(last_day(period));
            vec![("GONE".to_string(), a)]
        };
        // GONE carried as of 31 August by September's and October's states;
        // September's revision-1 (GONE back in accounts.csv then) bills it
        // 200 and writes its own state, as of 30 September.
        run_dir(&aug, "2026-08", &[("GONE", &aug_bill())]);
        let g = &as_of(
            &Start::whole_history(&[aug_bill()]).carry(None, &[], last_day("2026-08")),
            "2026-08",
        )[0]
        .1;
        run_dir(&sep, "2026-09", &[]);
        state_file(&sep, "2026-09", &[("GONE", g)], &[], &[&aug]);
        october(g, &[&aug, &sep]);
        let rev = sep.join("revision-1");
        bills_file(&rev, "rev1", &[("GONE", &sept_bill(dec!(200)))]);
        let sept = |amount| {
            Start::whole_history(&[aug_bill(), sept_bill(amount)]).carry(
                None,
                &[],
                last_day("2026-09"),
            )
        };
        state_file(&rev, "2026-09", &[("GONE", &sept(dec!(200)))], &[], &[&aug]);
        let late = load(&[&sep, &oct]).unwrap();
        let want = as_of(&sept(dec!(200)), "2026-09");
        assert_eq!(late.carried, want, "August's 100 and the 200");
        // A given September run holding GONE's bill at another amount than
        // October's state counted: continued from that run's state.
        std::fs::remove_dir_all(&rev).unwrap();
        run_dir(&sepb, "2026-09", &[("GONE", &sept_bill(dec!(250)))]);
        state_file(&sepb, "2026-09", &[("GONE", &sept(dec!(250)))], &[], &[]);
        october(&as_of(&sept(dec!(200)), "2026-09")[0].1, &[&sep]);
        let late = load(&[&sepb, &oct]).unwrap();
        let want = as_of(&sept(dec!(250)), "2026-09");
        assert_eq!(late.carried, want, "the 250 of the run given");
        // A given run billing it after its latest state's day, with no state
        // holding that bill: refused, not carried without it.
        state_file(&sepb, "2026-09", &[], &[], &[]);
        october(g, &[&aug]);
        let err = load(&[&sepb, &oct]).err().expect("refused").to_string();
        assert!(
            err.contains("GONE") && err.contains("billed it for 2026-09"),
            "{err}"
        );
    }

    #[test]
    fn a_carried_account_does_not_continue_from_a_state_that_counted_a_payment_removed_since() {
        let tmp = tempfile::tempdir().unwrap();
        let g = gone(tmp.path());
        // September's revision-1, written after October's state, raises
        // GONE's bill to 230 and counted 300 paid on 25 September, which
        // payments.csv no longer holds (October's state, the latest,
        // counted 150 in all): 70 of credit, 400 counted.
        let rev = g.sep.join("revision-1");
        bills_file(&rev, "rev1", &[("GONE", &sept_bill(dec!(230)))]);
        let removed = [(d("2026-08-20"), dec!(100)), (d("2026-09-25"), dec!(300))];
        let s = Start::whole_history(&[aug_bill()]).carry(
            Some(sept_bill(dec!(230))),
            &removed,
            last_day("2026-09"),
        );
        assert_eq!((s.credit, s.counted.sum), (dec!(70), dec!(400)));
        state_file_of(&rev, &g.sep, "2026-09", &[("GONE", &s)], &[], &[&g.aug]);
        let load = |runs: &[&PathBuf]| {
            let runs: Vec<PathBuf> = runs.iter().map(|r| r.to_path_buf()).collect();
            LateFees::load(&runs, None, &g.pays, &nov_period(), &[], &shipped_tariffs())
        };
        // It saw the revision, but continued with the 250 less counted
        // since, GONE would owe its October bill in full and have 180 of
        // negative credit: not used. Nothing else given reaches back to
        // GONE's first bill (August's).
        let err = load(&[&g.sep, &g.oct]).err().expect("refused").to_string();
        assert!(err.contains("GONE") && err.contains("revision-1"), "{err}");
        assert!(err.contains("every run since 2026-08-01"), "{err}");
        // From August on: the whole history, with the payments October's
        // state counted.
        let late = load(&[&g.aug, &g.sep, &g.oct]).unwrap();
        let whole = g.whole();
        assert_eq!(whole.open[0].unpaid, dec!(180));
        assert_eq!(whole.credit, Decimal::ZERO);
        assert_eq!(late.carried, vec![("GONE".to_string(), whole)]);
    }

    #[test]
    fn a_revision_of_a_revision_carries_an_account_gone_from_accounts_csv_from_the_last_revision_s_state(
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let g = gone(tmp.path());
        let oct = BillPeriod::parse("2026-10").unwrap();
        let tariffs = shipped_tariffs();
        // October's revision-1 (GONE still in accounts.csv then) raised its
        // October bill to 220 and wrote its state.
        let oct220 = bill("2026-10", "2026-11-15", dec!(220));
        let rev = g.oct.join("revision-1");
        bills_file(&rev, "oct-rev1", &[("GONE", &oct220)]);
        let s = Start::whole_history(&[aug_bill(), sept_bill(dec!(200))]).carry(
            Some(oct220.clone()),
            &g.paid,
            last_day("2026-10"),
        );
        let runs = [g.aug.as_path(), g.sep.as_path()];
        state_file_of(&rev, &g.oct, "2026-10", &[("GONE", &s)], &[], &runs);
        // Revision-2, GONE gone: its October bill as last revised.
        let issued_bills = crate::billing::revision::Issued {
            bills: [(
                "GONE".to_string(),
                crate::billing::revision::IssuedBill {
                    total: oct220.amount,
                    due: Some(oct220.due),
                },
            )]
            .into(),
            run_id: String::new(),
            settled_through: None,
            opening: None,
        };
        let load = || {
            LateFees::load(
                std::slice::from_ref(&g.sep),
                Some((&g.oct, &issued_bills)),
                &g.pays,
                &oct,
                &[],
                &tariffs,
            )
            .unwrap()
        };
        // Carried from revision-1's state (not October's own, at 210),
        // which reflects revision-1.
        let late = load();
        let mut kept = s.clone();
        kept.as_of = Some(last_day("2026-10"));
        assert_eq!(kept.open[1].unpaid, dec!(220));
        assert_eq!(late.carried, vec![("GONE".to_string(), kept)]);
        assert_eq!(late.seen, BTreeSet::from(["oct-rev1".to_string()]));
        // September revised since (230), unseen by revision-1's state: from
        // September's revised state, with the October bill as last revised
        // and the 50 paid since.
        g.revise_september(true);
        let bills = [aug_bill(), sept_bill(dec!(230)), oct220];
        let mut want = Start::whole_history(&bills).carry(None, &g.paid, last_day("2026-10"));
        want.as_of = Some(last_day("2026-10"));
        assert_eq!(
            (want.open[0].unpaid, want.open[1].unpaid),
            (dec!(180), dec!(220))
        );
        assert_eq!(load().carried, vec![("GONE".to_string(), want)]);
    }
}
