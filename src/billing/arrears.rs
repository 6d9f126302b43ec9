//! Late-payment fees on a postpaid account's overdue bills.
//!
//! Each overdue day is charged once, on the bill of the period the day falls
//! in: the fee on this period's bill covers the days of this period after a
//! prior bill's due date on which part of it was still unpaid. Payments are
//! applied to the oldest bill first (a payment made on a day stops that day's
//! fee). The rule's minimum applies to the fee of one bill.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, Decimal128Array, StringArray};
use chrono::{Datelike, NaiveDate};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rust_decimal::Decimal;

use super::account::{AccountBill, BillLine};
use super::flags::Flags;
use super::period::BillPeriod;
use super::run::BillingError;
use crate::master::{BillingAccount, CustomerClass, PaymentMode};
use crate::tariff::late_fee::LateFeeRule;
use crate::tariff::price::{ChargeLine, LineKind};
use crate::tariff::rounding::Rounding;
use crate::tariff::TariffSet;

/// Line index of late-fee lines (see `ChargeLine::label`).
pub const RESIDENTIAL: u8 = 0;
pub const CURRENT_YEAR: u8 = 1;
pub const EARLIER_YEARS: u8 = 2;
pub const MINIMUM: u8 = 3;

/// An issued bill of an earlier period.
#[derive(Debug, Clone, PartialEq)]
pub struct PriorBill {
    pub period: String,
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
    for f in dirs.iter().flat_map(|d| bills_files(d)) {
        for_each_bill(&f, |r, bad| {
            let Some(ytd) = r.ytd_after else {
                return Ok(());
            };
            let p = BillPeriod::parse(r.period).map_err(bad)?;
            if p.end == start {
                out.insert(r.account.to_string(), (p.start, ytd));
            }
            Ok(())
        })?;
    }
    Ok(out)
}

fn read_bills_file(path: &Path, out: &mut BTreeMap<String, PriorBill>) -> Result<(), BillingError> {
    for_each_bill(path, |r, bad| {
        // Bills without a due date (or runs written before due dates existed): nothing to charge on.
        let Some(due) = r.due else { return Ok(()) };
        let d: NaiveDate = due
            .parse()
            .map_err(|e| bad(format!("due_date '{due}': {e}")))?;
        out.insert(
            r.account.to_string(),
            PriorBill {
                period: r.period.to_string(),
                due: d,
                amount: r.total,
            },
        );
        Ok(())
    })
}

/// One row of an issued `bills.parquet`, as late fees and tier carry-over read it.
struct BillRow<'a> {
    account: &'a str,
    period: &'a str,
    total: Decimal,
    due: Option<&'a str>,
    ytd_after: Option<Decimal>,
}

/// Calls `f` for every row of a bills file; `f` gets an error builder naming the file.
fn for_each_bill(
    path: &Path,
    mut f: impl FnMut(BillRow<'_>, &dyn Fn(String) -> BillingError) -> Result<(), BillingError>,
) -> Result<(), BillingError> {
    let bad = |what: String| BillingError::Invalid(format!("{}: {what}", path.display()));
    let file = File::open(path).map_err(|source| BillingError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| bad(e.to_string()))?;
    let dec = |a: &Decimal128Array, i: usize| {
        (!a.is_null(i)).then(|| Decimal::from_i128_with_scale(a.value(i), a.scale() as u32))
    };
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
        let (due, ytd) = (text("due_date"), decimal("ytd_kwh_after"));
        for i in 0..batch.num_rows() {
            f(
                BillRow {
                    account: acc.value(i),
                    period: per.value(i),
                    total: dec(total, i).unwrap_or_default(),
                    due: due.filter(|d| !d.is_null(i)).map(|d| d.value(i)),
                    ytd_after: ytd.and_then(|y| dec(y, i)),
                },
                &bad,
            )?;
        }
    }
    Ok(())
}

/// What a bill run needs to charge late fees: the issued bills of earlier
/// runs (`--previous`) and the payments made since, by account.
pub struct LateFees<'a> {
    last_day: NaiveDate,
    prior: PriorBills,
    payments: BTreeMap<&'a str, Vec<(NaiveDate, Decimal)>>,
    /// Files read, with SHA-256 (hashed into the run id and manifest).
    pub inputs: Vec<serde_json::Value>,
    /// Rows of payments.csv that could not be read.
    pub errors: Vec<String>,
}

impl<'a> LateFees<'a> {
    /// Reads `previous` runs' bills and, when there are any, `payments`.
    pub fn load(
        previous: &[PathBuf],
        payments_path: &Path,
        period: &BillPeriod,
        accounts: &'a [BillingAccount],
        tariffs: &TariffSet,
    ) -> Result<LateFees<'a>, BillingError> {
        let mut inputs = Vec::new();
        let mut errors = Vec::new();
        let mut prior = PriorBills::new();
        if !previous.is_empty() {
            for dir in previous {
                // Revisions replace totals and positions: they are inputs too.
                for f in bills_files(dir) {
                    inputs.push(super::run::hashed_input(&f)?);
                }
            }
            prior = read_prior_bills(previous)?;
        }
        let mut payments: BTreeMap<&'a str, Vec<(NaiveDate, Decimal)>> = BTreeMap::new();
        if !prior.is_empty() && payments_path.exists() {
            inputs.push(super::run::hashed_input(payments_path)?);
            let loaded = crate::master::load_payments(payments_path)
                .map_err(|e| BillingError::Master(e.to_string()))?;
            errors.extend(loaded.errors.iter().map(|e| e.to_string()));
            let by_id: HashMap<&str, &'a BillingAccount> =
                accounts.iter().map(|a| (&*a.account_id, a)).collect();
            for p in &loaded.rows {
                let Some(a) = by_id.get(p.account_id.as_str()) else {
                    continue;
                };
                let offset = tariffs.get(&a.tariff_id).map_or(0, |t| t.utc_offset_secs);
                let (date, _) =
                    super::period::local_date_minute(p.paid_at.timestamp_millis(), offset);
                payments
                    .entry(&*a.account_id)
                    .or_default()
                    .push((date, p.amount));
            }
        }
        Ok(LateFees {
            last_day: period.end.pred_opt().unwrap_or(period.end),
            prior,
            payments,
            inputs,
            errors,
        })
    }

    /// Adds late-fee lines to the bill of a postpaid account whose tariff
    /// has a late-fee rule; returns the due date of this bill (None for
    /// other accounts).
    pub fn apply(
        &self,
        a: &BillingAccount,
        b: &mut AccountBill,
        tariffs: &TariffSet,
        period: &BillPeriod,
    ) -> Option<NaiveDate> {
        if a.payment_mode != PaymentMode::Postpaid {
            return None;
        }
        let t = tariffs.get(&b.tariff_id).ok()?;
        let (vi, v) = t
            .versions
            .iter()
            .enumerate()
            .find(|(_, v)| v.applies_on(self.last_day))?;
        let rule = v.late_fee.as_ref()?;
        let due = due_date(period, rule);
        let Some(prior) = self.prior.get(&b.account_id) else {
            return Some(due);
        };
        let pays = self
            .payments
            .get(&*a.account_id)
            .map_or(&[][..], |v| v.as_slice());
        let residential = a.customer_class == CustomerClass::Residential;
        for line in late_fee_lines(rule, residential, prior, pays, period, &v.rounding) {
            b.total += line.amount;
            b.lines.push(BillLine {
                version_index: vi,
                line,
                flags: Flags::NONE,
            });
        }
        Some(due)
    }
}

/// The due date of a bill for `period`: `due_days` after the period's last
/// day (`period.end` is the day after it).
pub fn due_date(period: &BillPeriod, rule: &LateFeeRule) -> NaiveDate {
    let last_day = period.end.pred_opt().expect("date in range");
    last_day + chrono::Days::new(u64::from(rule.due_days))
}

/// Late-fee lines for this period's bill (empty when nothing is overdue).
/// `payments`: (local date, amount), any order.
pub fn late_fee_lines(
    rule: &LateFeeRule,
    residential: bool,
    prior: &[PriorBill],
    payments: &[(NaiveDate, Decimal)],
    period: &BillPeriod,
    rounding: &Rounding,
) -> Vec<ChargeLine> {
    let mut bills: Vec<&PriorBill> = prior.iter().filter(|b| b.due < period.end).collect();
    bills.sort_by_key(|b| b.due);
    if bills.is_empty() {
        return vec![];
    }
    // `payments` is the account's whole history, paid in advance or late:
    // it settles the given bills oldest first, exactly when every bill it
    // could have paid is given (docs/billing.md). A payment date cannot tell
    // "paid an earlier bill" from "paid in advance".
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
        let mut covered = paid;
        for b in &bills {
            let from_payments = covered.min(b.amount).max(Decimal::ZERO);
            covered -= from_payments;
            let open = b.amount - from_payments;
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
        }
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
        PriorBill {
            period: "2026-09".into(),
            due: d("2026-10-15"),
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
        let bill = |period: &str, due: &str, amount| PriorBill {
            period: period.into(),
            due: d(due),
            amount,
        };
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
        let aug = PriorBill {
            period: "2026-08".into(),
            due: d("2026-09-15"),
            amount: dec!(100),
        };
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
        let dec_bill = PriorBill {
            period: "2026-11".into(),
            due: d("2026-12-15"),
            amount: dec!(1000),
        };
        let lines = late_fee_lines(&LateFeeRule::default(), false, &[dec_bill], &[], &p, &fen());
        // 31 January days, arrear of 2026: 3 per mille -> 31 x 1000 x 0.003 = 93.00
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].index, EARLIER_YEARS);
        assert_eq!(lines[0].amount, dec!(93.00));
    }
}
