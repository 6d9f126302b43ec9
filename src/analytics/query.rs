//! Operator queries about one account (`meterflow query`).

use std::collections::BTreeMap;
use std::path::Path;

use chrono::NaiveDate;

use super::inputs::{check_runs, manifest, revisions, run_dirs};
use super::scan::{scan_lake, DayBatch, ScanPlan, SCALE};
use super::table::{Col, Table};
use super::AnalyticsError;
use crate::master;

/// Daily (or monthly) consumption of one account, summed over its meters.
pub fn usage(
    lake: &Path,
    master_dir: &Path,
    account: &str,
    from: Option<NaiveDate>,
    to: Option<NaiveDate>,
    monthly: bool,
    utc_offset_secs: i32,
) -> Result<Table, AnalyticsError> {
    let meters: Vec<master::Meter> = master::load_meters(&master_dir.join(master::METERS_FILE))
        .map_err(|e| AnalyticsError::Master(e.to_string()))?
        .rows
        .into_iter()
        .filter(|m| m.account_id == account)
        .collect();
    if meters.is_empty() {
        return Err(AnalyticsError::Invalid(format!(
            "account {account} has no meters in meters.csv"
        )));
    }
    // Every meter its own slot: the rows below count meter-days.
    let per_meter: Vec<Option<usize>> = (0..meters.len()).map(Some).collect();
    let plan = ScanPlan {
        meters: &meters,
        meter_account: &per_meter,
        accounts: meters.len(),
        utc_offset_secs,
        calendar: None,
        peak_groups: &[],
        mtd_as_of: None,
    };
    let mut rows: BTreeMap<String, (i128, i64, bool)> = BTreeMap::new();
    let mut sink = |d: &DayBatch<'_>| -> Result<(), AnalyticsError> {
        if from.is_some_and(|f| d.date < f) || to.is_some_and(|t| d.date > t) {
            return Ok(());
        }
        let key = if monthly {
            d.date.format("%Y-%m").to_string()
        } else {
            d.date.to_string()
        };
        for i in 0..d.accounts.len() {
            let Some(v) = d.regs[i][0] else { continue };
            let e = rows.entry(key.clone()).or_default();
            e.0 += v as i128;
            e.1 += 1;
            e.2 |= d.estimated[i];
        }
        Ok(())
    };
    scan_lake(lake, &plan, &mut sink)?;
    let r: Vec<_> = rows.into_iter().collect();
    Ok(Table::new()
        .with(
            if monthly { "month" } else { "date" },
            Col::Str(r.iter().map(|x| Some(x.0.clone())).collect()),
        )
        .with(
            "kwh",
            Col::Dec(r.iter().map(|x| Some(x.1 .0)).collect(), SCALE),
        )
        .with(
            "meter_days",
            Col::Int(r.iter().map(|x| Some(x.1 .1)).collect()),
        )
        .with(
            "estimated",
            Col::Bool(r.iter().map(|x| Some(x.1 .2)).collect()),
        ))
}

/// Bills of one account in every run directory under `runs`: per run the
/// bill as issued or, when a revision adjusted it, as last revised.
pub fn bills(runs: &Path, account: &str) -> Result<Table, AnalyticsError> {
    check_runs(runs)?;
    let mut out: Option<Table> = None;
    for run in run_dirs(runs) {
        let mut latest: Option<Table> = None;
        for dir in std::iter::once(run.clone()).chain(revisions(&run)) {
            if let Some(part) = account_bill(&dir, account)? {
                latest = Some(part);
            }
        }
        let Some(part) = latest else { continue };
        out = Some(match out {
            None => part,
            Some(mut o) => {
                if o.columns.len() == part.columns.len() {
                    for ((_, a), (_, b)) in o.columns.iter_mut().zip(part.columns) {
                        append_col(a, b);
                    }
                }
                o
            }
        });
    }
    Ok(out.unwrap_or_default())
}

/// The account's rows of one run or revision folder, with its revision number.
fn account_bill(dir: &Path, account: &str) -> Result<Option<Table>, AnalyticsError> {
    let path = dir.join("bills.parquet");
    if !path.exists() {
        return Ok(None);
    }
    let t = Table::read_parquet(&path)?;
    let Some(Col::Str(acc)) = t.col("account_id") else {
        return Ok(None);
    };
    let keep: Vec<usize> = (0..t.rows())
        .filter(|i| acc[*i].as_deref() == Some(account))
        .collect();
    if keep.is_empty() {
        return Ok(None);
    }
    let m = manifest(dir)?;
    let mut part = t.take(&keep);
    let want = [
        "run_id",
        "period",
        "tariff_id",
        "days",
        "kwh",
        "total",
        "estimated",
        "flags",
        "adjustment",
    ];
    part.columns.retain(|(n, _)| want.contains(&n.as_str()));
    part.columns.push((
        "revision".into(),
        Col::Int(keep.iter().map(|_| m["revision"].as_i64()).collect()),
    ));
    Ok(Some(part))
}

fn append_col(a: &mut Col, b: Col) {
    match (a, b) {
        (Col::Str(x), Col::Str(y)) => x.extend(y),
        (Col::Int(x), Col::Int(y)) => x.extend(y),
        (Col::Dec(x, _), Col::Dec(y, _)) => x.extend(y),
        (Col::Ratio(x), Col::Ratio(y)) => x.extend(y),
        (Col::Bool(x), Col::Bool(y)) => x.extend(y),
        (Col::Date(x), Col::Date(y)) => x.extend(y),
        _ => {}
    }
}

/// Payments of one account from payments.csv, oldest first.
pub fn payments(master_dir: &Path, account: &str) -> Result<Table, AnalyticsError> {
    let mut p: Vec<master::Payment> =
        master::load_payments(&master_dir.join(master::PAYMENTS_FILE))
            .map_err(|e| AnalyticsError::Master(e.to_string()))?
            .rows
            .into_iter()
            .filter(|p| p.account_id == account)
            .collect();
    p.sort_by_key(|x| x.paid_at);
    Ok(Table::new()
        .with(
            "paid_at",
            Col::Str(p.iter().map(|x| Some(x.paid_at.to_rfc3339())).collect()),
        )
        .with(
            "channel",
            Col::Str(p.iter().map(|x| Some(x.channel.clone())).collect()),
        )
        .with(
            "txn_id",
            Col::Str(p.iter().map(|x| Some(x.txn_id.clone())).collect()),
        )
        .with(
            "amount",
            Col::Dec(
                p.iter()
                    .map(|x| {
                        Some(super::inputs::rescale(
                            x.amount.mantissa(),
                            x.amount.scale() as u8,
                            2,
                        ))
                    })
                    .collect(),
                2,
            ),
        ))
}
