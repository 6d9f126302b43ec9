//! Opening balances: what each account still owed, or had in credit, in the
//! billing system before meterflow, as of the day a fleet's first run was
//! settled through (`--settled-through`, the day before its period). They
//! become the account's arrears at the end of that day: later payments pay
//! the bills oldest due first, overdue days bear late fees like any bill's,
//! and the run's state carries what is left forward.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::NaiveDate;
use rust_decimal::Decimal;

use super::arrears::{
    by_due, due_date, positions, rule_of, AccountArrears, LateFees, OpenBill, PriorBill,
};
use super::period::BillPeriod;
use super::revision::Issued;
use super::run::BillingError;
use crate::master::{BillingAccount, OpeningBalance, RowError, OPENING_FILE};
use crate::store::scan::FxMap;
use crate::tariff::TariffSet;

/// Rows an error message names; the rest are counted.
const NAMED_ROWS: usize = 10;

/// The balances of `opening_balances.csv`, checked against the accounts.
pub struct Opening<'a> {
    /// Each account's arrears at the end of the settled-through day, in
    /// account order; payments not counted yet.
    pub accounts: Vec<(&'a BillingAccount, AccountArrears)>,
    /// The file's hash, for the manifest's `inputs.history` and the run id.
    pub input: serde_json::Value,
    /// Sum of the unpaid bills, and of the credits.
    pub owed: Decimal,
    pub credit: Decimal,
}

/// What a run imported (the manifest's `opening_balances`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Imported {
    pub accounts: usize,
    /// Sum of the unpaid bills, yuan.
    #[serde(with = "rust_decimal::serde::str")]
    pub owed: Decimal,
    /// Sum of the credits, yuan.
    #[serde(with = "rust_decimal::serde::str")]
    pub credit: Decimal,
}

/// Starts the accounts of `MASTER/opening_balances.csv` from their balances
/// when this run imports them: a fleet's first run settled through the day
/// before its period (`settled_through`), or a re-run of one. Returns the
/// manifest's `opening_balances` (None when nothing is imported). A first
/// run without `--settled-through` refuses the file, a re-run of a run that
/// imported it refuses to run without it, and a run given `--previous`
/// ignores it (the states carry the balances).
#[allow(clippy::too_many_arguments)]
pub fn import<'a>(
    master: &Path,
    settled_through: Option<NaiveDate>,
    previous: bool,
    issued: Option<&Issued>,
    period: &BillPeriod,
    accounts: &'a [BillingAccount],
    tariffs: &TariffSet,
    late: &mut LateFees<'a>,
) -> Result<Option<Imported>, BillingError> {
    let path = master.join(OPENING_FILE);
    let invalid = |why: String| Err(BillingError::Invalid(format!("{}: {why}", path.display())));
    let issued_sha = issued.and_then(|is| is.opening.as_deref());
    if !path.exists() {
        if issued_sha.is_some() {
            return invalid(
                "the issued run imported opening balances; a re-run needs them too (without \
                 them their debts would be forgiven)"
                    .into(),
            );
        }
        return Ok(None);
    }
    if previous {
        tracing::warn!(
            file = %path.display(),
            "opening balances are read only by a fleet's first run (--settled-through); \
             this run continues the --previous states"
        );
        return Ok(None);
    }
    if issued.is_some() && issued_sha.is_none() {
        // Its bills and state stand without them; adding them now would
        // change what was issued behind the operator's back.
        return invalid(
            "the issued run imported no opening balances, and a re-run cannot add them: \
             move the file away"
                .into(),
        );
    }
    let switch_day = period.start.pred_opt().unwrap_or(period.start);
    let Some(day) = settled_through else {
        return invalid(format!(
            "opening balances are for a fleet's first run, settled through the day before its \
             period (--settled-through {switch_day}); a later run gives --previous instead (the \
             states carry the balances)"
        ));
    };
    if day != switch_day {
        return invalid(format!(
            "opening balances are as of the day before the first period: with them, \
             --settled-through must be {switch_day}, not {day}"
        ));
    }
    let o = read(&path, period, accounts, tariffs, issued.is_some())?;
    if let Some(sha) = issued_sha.filter(|s| *s != o.input["sha256"]) {
        tracing::warn!(
            file = %path.display(),
            issued_sha256 = sha,
            "the opening balances differ from those the issued run imported: this re-run \
             bills with the file as it is now"
        );
    }
    let sums = Imported {
        accounts: o.accounts.len(),
        owed: o.owed,
        credit: o.credit,
    };
    late.inputs.push(o.input);
    late.opening(o.accounts, day);
    Ok(Some(sums))
}

/// A row's field at fault, and why.
type Fault = (&'static str, String);

/// An account's rows so far: its bills (line, bill, period end) and credit.
type Rows = (Vec<(u64, PriorBill, NaiveDate)>, Option<(u64, Decimal)>);

/// Reads `path` for the first `period`, settled through the day before it.
/// Every row must load and fit its account (in `accounts`, late fees
/// concern it on the period's last day, opened before the period; its
/// bill's period ends before the period, no two of its bills' periods
/// overlap, one credit), or the run stops naming each bad row: a balance
/// left out would be a debt forgiven without anyone deciding it.
/// `rerun`: a re-run, whose errors say what carries a closed account.
pub fn read<'a>(
    path: &Path,
    period: &BillPeriod,
    accounts: &'a [BillingAccount],
    tariffs: &TariffSet,
    rerun: bool,
) -> Result<Opening<'a>, BillingError> {
    let loaded = crate::master::load_opening_balances(path)
        .map_err(|e| BillingError::Master(e.to_string()))?;
    let mut errors = loaded.errors;
    let by_id = positions(accounts, !loaded.rows.is_empty());
    let mut found: BTreeMap<u32, Rows> = BTreeMap::new();
    for row in &loaded.rows {
        let err = |field: &str, message: String| RowError {
            file: path.to_path_buf(),
            line: row.line,
            field: field.into(),
            message,
        };
        let (i, bill) = match check(row, period, accounts, &by_id, tariffs, rerun) {
            Ok(x) => x,
            Err((field, message)) => {
                errors.push(err(field, message));
                continue;
            }
        };
        let (bills, credit) = found.entry(i).or_default();
        match bill {
            Some((b, end)) => {
                match bills
                    .iter()
                    .find(|(_, x, x_end)| b.start < *x_end && x.start < end)
                {
                    Some((line, x, _)) => errors.push(err(
                        "period",
                        format!(
                            "'{}' of '{}' overlaps '{}' on line {line}",
                            b.period, row.account_id, x.period
                        ),
                    )),
                    None => bills.push((row.line, b, end)),
                }
            }
            None => match credit {
                Some((line, _)) => errors.push(err(
                    "owed",
                    format!(
                        "a second credit of '{}' (line {line}): one credit row per account",
                        row.account_id
                    ),
                )),
                None => *credit = Some((row.line, -row.owed)),
            },
        }
    }
    if !errors.is_empty() {
        errors.sort_by_key(|e| e.line);
        let mut msg = format!(
            "{} bad row(s) in {} (a first run imports every opening balance or none):",
            errors.len(),
            path.display()
        );
        for e in errors.iter().take(NAMED_ROWS) {
            msg += &format!("\n  {e}");
        }
        if errors.len() > NAMED_ROWS {
            msg += &format!("\n  ... and {} more", errors.len() - NAMED_ROWS);
        }
        return Err(BillingError::Master(msg));
    }
    let (mut owed, mut credit) = (Decimal::ZERO, Decimal::ZERO);
    let accounts = found
        .into_iter()
        .map(|(i, (bills, c))| {
            let c = c.map_or(Decimal::ZERO, |c| c.1);
            credit += c;
            let mut open: Vec<OpenBill> = bills
                .into_iter()
                .map(|(_, bill, _)| {
                    owed += bill.amount;
                    OpenBill {
                        unpaid: bill.amount,
                        bill,
                    }
                })
                .collect();
            open.sort_by(by_due);
            let state = AccountArrears {
                last_due: open.iter().map(|o| o.bill.due).max(),
                open,
                credit: c,
                ..Default::default()
            };
            (&accounts[i as usize], state)
        })
        .collect();
    Ok(Opening {
        accounts,
        input: super::run::input_entry(path, &loaded.sha256, loaded.bytes),
        owed,
        credit,
    })
}

/// One row against the accounts: the account's position, and its unpaid
/// bill with its period's end (None for a credit); else the field at fault
/// and why.
fn check(
    row: &OpeningBalance,
    period: &BillPeriod,
    accounts: &[BillingAccount],
    by_id: &FxMap<&str, u32>,
    tariffs: &TariffSet,
    rerun: bool,
) -> Result<(u32, Option<(PriorBill, NaiveDate)>), Fault> {
    let id = &*row.account_id;
    let switch_day = period.start.pred_opt().unwrap_or(period.start);
    if row.as_of != switch_day {
        // Balances of another day: another fleet's first run, or this one
        // billed again without --previous.
        return Err((
            "as_of",
            format!(
                "balances as of {} cannot open a run settled through {switch_day}",
                row.as_of
            ),
        ));
    }
    let Some(&i) = by_id.get(id) else {
        let hint = if rerun {
            " (an account closed since the issued run: delete its rows, the issued run's state carries it)"
        } else {
            ""
        };
        return Err(("account_id", format!("'{id}' is not in accounts.csv{hint}")));
    };
    let a = &accounts[i as usize];
    let last_day = period.end.pred_opt().unwrap_or(period.end);
    let Some((_, _, rule)) = rule_of(a, tariffs, last_day) else {
        return Err((
            "account_id",
            format!(
                "late fees do not concern '{id}' on {last_day} (prepaid, or its tariff has no \
                 [version.late_fee]): none would be charged on its balance"
            ),
        ));
    };
    if a.opened_on >= period.start {
        return Err((
            "account_id",
            format!(
                "'{id}' was opened on {}, after the system before billed (through {switch_day})",
                a.opened_on
            ),
        ));
    }
    let (Some(due), false) = (row.due_date, row.period.is_empty()) else {
        return Ok((i, None));
    };
    let p = BillPeriod::parse(&row.period).map_err(|e| ("period", e))?;
    if p.end > period.start {
        return Err((
            "period",
            format!(
                "'{}' ends after {switch_day}: the system before billed the days before this \
                 run's period",
                row.period
            ),
        ));
    }
    // A bill falls due on or after its period's last day; and by this
    // run's own bill, or the next runs would refuse its bills as due out of
    // order.
    let own = due_date(period, rule);
    let last = p.end.pred_opt().unwrap_or(p.end);
    if due < last || due > own {
        return Err((
            "due_date",
            format!(
                "{due} is not between the last day of its period '{}' ({last}) and this run's \
                 own bill's due date {own}",
                row.period
            ),
        ));
    }
    Ok((
        i,
        Some((
            PriorBill {
                period: p.label,
                start: p.start,
                due,
                amount: row.owed,
            },
            p.end,
        )),
    ))
}
