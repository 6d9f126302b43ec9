//! The datasets of `meterflow analyze`. Each function returns a `Table`;
//! energy columns are exact decimals (scale 4), money scale 2. Everything
//! here works from the scan's per-account and per-month accumulators, never
//! from per-day rows (`daily_usage` is written while the lake streams by).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Date32Array, Decimal128Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use chrono::{Datelike, Duration, NaiveDate};
use polars::prelude::*;
use rust_decimal::Decimal;

use super::frame::to_table;
use super::inputs::{rescale, Inputs};
use super::risk::{self, RiskFacts, FACTORS, GRACE_DAYS};
use super::scan::{local_date, DayBatch, Monthly, DAY_TYPES, SCALE};
use super::table::{Col, Table};
use super::{AnalyticsError, AnalyzeOptions};
use crate::master::{Account, PaymentMode};
use crate::privacy::{mask_address, mask_id_number, mask_name, mask_phone};

type Named = (&'static str, Table, bool);

/// Every dataset but `daily_usage`: (name, table, holds raw personal data).
pub fn all(inp: &Inputs, opts: &AnalyzeOptions) -> Result<Vec<Named>, AnalyticsError> {
    use rayon::prelude::*;
    type Make<'a> = Box<dyn Fn() -> Result<Table, AnalyticsError> + Send + Sync + 'a>;
    let on = as_of(inp, opts);
    let (pays, bills) = rayon::join(|| payments_by_account(inp), || bill_dates(inp));
    let (pays, bills) = (&pays, &bills);
    let mut jobs: Vec<(&'static str, bool, Make<'_>)> = vec![(
        "accounts",
        false,
        Box::new(|| Ok(accounts(inp, opts, false))),
    )];
    if opts.pii {
        jobs.push(("accounts", true, Box::new(|| Ok(accounts(inp, opts, true)))));
    }
    jobs.extend([
        (
            "peak_periods",
            false,
            Box::new(|| Ok(peak_periods(inp))) as Make<'_>,
        ),
        (
            "usage_habits",
            false,
            Box::new(|| Ok(usage_habits(inp, opts))),
        ),
        (
            "history_change",
            false,
            Box::new(|| Ok(history_change(inp, opts))),
        ),
        ("segment_change", false, Box::new(|| segment_change(inp))),
        (
            "payment_habits",
            false,
            Box::new(|| Ok(payment_habits(inp, opts, pays, bills))),
        ),
        (
            "arrears_risk",
            false,
            Box::new(move || Ok(arrears_risk(inp, opts, on, pays, bills))),
        ),
        (
            "arrears_backtest",
            false,
            Box::new(move || Ok(arrears_backtest(inp, on, opts.backtest_cutoff, pays))),
        ),
        (
            "outage_events",
            false,
            Box::new(|| Ok(outage_events(inp, opts))),
        ),
        ("feeder_events", false, Box::new(|| Ok(feeder_events(inp)))),
        (
            "usage_warnings",
            false,
            Box::new(|| Ok(usage_warnings(inp, opts))),
        ),
        ("collection", false, Box::new(|| Ok(collection(inp)))),
        ("fleet_daily", false, Box::new(|| Ok(fleet_daily(inp)))),
    ]);
    // The datasets depend only on the inputs: computed on every core, kept
    // in this order.
    let tables: Vec<Result<Table, AnalyticsError>> = jobs.par_iter().map(|j| (j.2)()).collect();
    jobs.iter()
        .zip(tables)
        .map(|((name, pii, _), t)| Ok((*name, t?, *pii)))
        .collect()
}

/// The as-of day: `--as-of`, else the last local day with energy.
pub fn as_of(inp: &Inputs, opts: &AnalyzeOptions) -> Option<NaiveDate> {
    opts.as_of
        .or(inp.scan.last_day_with_data)
        .or(inp.scan.last_date)
}

fn ratio(a: i128, b: i128) -> Option<f64> {
    if b == 0 {
        None
    } else {
        Some(a as f64 / b as f64)
    }
}

fn pct_change(now: i128, before: Option<i128>) -> Option<f64> {
    before
        .and_then(|b| ratio(now - b, b))
        .map(|r| (r * 1000.0).round() / 10.0)
}

fn month_of(d: NaiveDate) -> String {
    format!("{:04}-{:02}", d.year(), d.month())
}

fn days_in_month(d: NaiveDate) -> i64 {
    let first = d.with_day(1).expect("day 1 exists");
    (add_months(first, 1) - first).num_days()
}

/// First day of the month `n` months after `first` (negative: before).
fn add_months(first: NaiveDate, n: i32) -> NaiveDate {
    let idx = first.year() * 12 + first.month0() as i32 + n;
    NaiveDate::from_ymd_opt(idx.div_euclid(12), idx.rem_euclid(12) as u32 + 1, 1)
        .expect("valid month")
}

fn dec4(v: Vec<Option<i128>>) -> Col {
    Col::Dec(v, SCALE)
}

/// The account key of every account (id or pseudonym), computed once.
pub fn account_keys(accounts: &[Account], opts: &AnalyzeOptions) -> Vec<String> {
    accounts
        .iter()
        .map(|a| opts.key.key(&a.account_id))
        .collect()
}

fn keys(inp: &Inputs, opts: &AnalyzeOptions, idx: impl Iterator<Item = usize>) -> Col {
    Col::Str(
        idx.map(|a| {
            Some(match inp.keys.get(a) {
                Some(k) => k.clone(),
                None => opts.key.key(&inp.accounts[a].account_id),
            })
        })
        .collect(),
    )
}

fn accounts(inp: &Inputs, opts: &AnalyzeOptions, raw: bool) -> Table {
    let a = &inp.accounts;
    let s = |f: &dyn Fn(&Account) -> String| Col::Str(a.iter().map(|x| Some(f(x))).collect());
    let mut t = Table::new().with("account_key", keys(inp, opts, 0..a.len()));
    if raw {
        t = t
            .with("account_id", s(&|x| x.account_id.clone()))
            .with("name", s(&|x| x.name.clone()))
            .with("phone", s(&|x| x.phone.clone()))
            .with("id_number", s(&|x| x.id_number.clone()))
            .with("address", s(&|x| x.address.clone()));
    } else {
        t = t
            .with("name_masked", s(&|x| mask_name(&x.name)))
            .with("phone_masked", s(&|x| mask_phone(&x.phone)))
            .with("id_number_masked", s(&|x| mask_id_number(&x.id_number)))
            .with(
                "address_masked",
                s(&|x| mask_address(&x.address, &x.district)),
            );
    }
    t.with("district", s(&|x| x.district.clone()))
        .with("age_band", s(&|x| x.age_band.clone()))
        .with("occupation", s(&|x| x.occupation.clone()))
        .with("gender", s(&|x| x.gender.clone()))
        .with(
            "customer_class",
            s(&|x| x.customer_class.as_str().to_string()),
        )
        .with("tariff_id", s(&|x| x.tariff_id.clone()))
        .with("payment_mode", s(&|x| mode(x).to_string()))
        .with(
            "household_size",
            Col::Int(a.iter().map(|x| Some(x.household_size as i64)).collect()),
        )
}

fn mode(a: &Account) -> &'static str {
    match a.payment_mode {
        PaymentMode::Prepaid => "prepaid",
        PaymentMode::Postpaid => "postpaid",
    }
}

/// Schema of `daily_usage.parquet`.
pub fn daily_usage_schema() -> SchemaRef {
    let dec = || DataType::Decimal128(18, SCALE as i8);
    Arc::new(Schema::new(vec![
        Field::new("account_key", DataType::Utf8, true),
        Field::new("date", DataType::Date32, true),
        Field::new("kwh", dec(), true),
        Field::new("sharp_kwh", dec(), true),
        Field::new("peak_kwh", dec(), true),
        Field::new("flat_kwh", dec(), true),
        Field::new("valley_kwh", dec(), true),
        Field::new("estimated", DataType::Boolean, true),
    ]))
}

/// One completed day of the scan as a `daily_usage` batch.
pub fn daily_usage_batch(
    keys: &[String],
    day: &DayBatch<'_>,
) -> Result<arrow::record_batch::RecordBatch, AnalyticsError> {
    let n = day.accounts.len();
    let date = (day.date - NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid")).num_days() as i32;
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            day.accounts.iter().map(|a| keys[*a as usize].as_str()),
        )),
        Arc::new(Date32Array::from(vec![date; n])),
    ];
    for r in 0..5 {
        cols.push(Arc::new(
            Decimal128Array::from_iter(day.regs.iter().map(|x| x[r].map(i128::from)))
                .with_precision_and_scale(18, SCALE as i8)
                .map_err(|e| AnalyticsError::Invalid(e.to_string()))?,
        ));
    }
    cols.push(Arc::new(BooleanArray::from(day.estimated.to_vec())));
    arrow::record_batch::RecordBatch::try_new(daily_usage_schema(), cols)
        .map_err(|e| AnalyticsError::Invalid(format!("daily_usage batch: {e}")))
}

/// Every (account, month) with data, in account then month order.
fn month_rows(m: &Monthly, accounts: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for a in 0..accounts {
        for k in 0..m.months.len() {
            if m.by_month[k][a].days > 0 {
                out.push((a, k));
            }
        }
    }
    out
}

fn history_change(inp: &Inputs, opts: &AnalyzeOptions) -> Table {
    let m = &inp.scan.monthly;
    let rows = month_rows(m, inp.accounts.len());
    let get = |a: usize, k: usize, back: i32| {
        m.get(a, add_months(m.months[k], -back))
            .map(|x| x.e4 as i128)
    };
    let cur = |r: &(usize, usize)| m.by_month[r.1][r.0];
    let prev: Vec<Option<i128>> = rows.iter().map(|r| get(r.0, r.1, 1)).collect();
    let yoy: Vec<Option<i128>> = rows.iter().map(|r| get(r.0, r.1, 12)).collect();
    Table::new()
        .with("account_key", keys(inp, opts, rows.iter().map(|r| r.0)))
        .with(
            "month",
            Col::Str(rows.iter().map(|r| Some(month_of(m.months[r.1]))).collect()),
        )
        .with(
            "kwh",
            dec4(rows.iter().map(|r| Some(cur(r).e4 as i128)).collect()),
        )
        .with(
            "days",
            Col::Int(rows.iter().map(|r| Some(cur(r).days as i64)).collect()),
        )
        .with(
            "estimated",
            Col::Bool(rows.iter().map(|r| Some(cur(r).estimated)).collect()),
        )
        .with("prev_month_kwh", dec4(prev.clone()))
        .with(
            "mom_change_pct",
            Col::Ratio(
                rows.iter()
                    .zip(&prev)
                    .map(|(r, p)| pct_change(cur(r).e4 as i128, *p))
                    .collect(),
            ),
        )
        .with("prev_year_kwh", dec4(yoy.clone()))
        .with(
            "yoy_change_pct",
            Col::Ratio(
                rows.iter()
                    .zip(&yoy)
                    .map(|(r, p)| pct_change(cur(r).e4 as i128, *p))
                    .collect(),
            ),
        )
}

/// Segment kinds of `segment_change`, with the account field they read.
type SegmentOf = fn(&Account) -> &str;
fn seg_age(a: &Account) -> &str {
    &a.age_band
}
fn seg_class(a: &Account) -> &str {
    a.customer_class.as_str()
}
fn seg_gender(a: &Account) -> &str {
    &a.gender
}
fn seg_occupation(a: &Account) -> &str {
    &a.occupation
}
const SEGMENTS: [(&str, SegmentOf); 4] = [
    ("age_band", seg_age),
    ("customer_class", seg_class),
    ("gender", seg_gender),
    ("occupation", seg_occupation),
];

/// Per segment and month, via a polars group-by over integer codes.
fn segment_change(inp: &Inputs) -> Result<Table, AnalyticsError> {
    let m = &inp.scan.monthly;
    let rows = month_rows(m, inp.accounts.len());
    // Segment values get codes in sorted order, so sorting codes sorts names.
    let mut names: Vec<Vec<String>> = Vec::new();
    let mut codes: Vec<Vec<i64>> = Vec::new();
    for (_, f) in SEGMENTS {
        let set: BTreeSet<&str> = inp.accounts.iter().map(f).collect();
        let v: Vec<String> = set.iter().map(|s| s.to_string()).collect();
        let idx: HashMap<&str, i64> = set
            .iter()
            .enumerate()
            .map(|(i, s)| (*s, i as i64))
            .collect();
        codes.push(inp.accounts.iter().map(|a| idx[f(a)]).collect());
        names.push(v);
    }
    let n = rows.len() * SEGMENTS.len();
    let (mut kind, mut seg, mut month, mut e4) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for (k, c) in codes.iter().enumerate() {
        for (a, mo) in &rows {
            kind.push(k as i64);
            seg.push(c[*a]);
            month.push(*mo as i64);
            e4.push(m.by_month[*mo][*a].e4);
        }
    }
    let df = df!("kind" => kind, "segment" => seg, "month" => month, "e4" => e4)?;
    let g = df
        .lazy()
        .group_by([col("kind"), col("segment"), col("month")])
        .agg([
            col("e4").count().alias("accounts"),
            col("e4").sum().alias("kwh"),
        ])
        .sort(["kind", "segment", "month"], Default::default())
        .collect()?;
    let t = to_table(&g, &["kwh"], SCALE)?;
    let (
        Some(Col::Int(k)),
        Some(Col::Int(s)),
        Some(Col::Int(mo)),
        Some(Col::Int(cnt)),
        Some(Col::Dec(e, _)),
    ) = (
        t.col("kind"),
        t.col("segment"),
        t.col("month"),
        t.col("accounts"),
        t.col("kwh"),
    )
    else {
        return Ok(Table::new());
    };
    let code = |v: &Option<i64>| v.unwrap_or(0);
    let idx: HashMap<(i64, i64, i64), usize> = (0..t.rows())
        .map(|i| ((code(&k[i]), code(&s[i]), code(&mo[i])), i))
        .collect();
    let per_acct: Vec<Option<i128>> = (0..t.rows())
        .map(|i| e[i].map(|x| x / cnt[i].unwrap_or(1).max(1) as i128))
        .collect();
    let prev: Vec<Option<i128>> = (0..t.rows())
        .map(|i| {
            let this = m.months[code(&mo[i]) as usize];
            let before = m.months.binary_search(&add_months(this, -1)).ok()?;
            idx.get(&(code(&k[i]), code(&s[i]), before as i64))
                .and_then(|j| per_acct[*j])
        })
        .collect();
    let mom: Vec<Option<f64>> = (0..t.rows())
        .map(|i| per_acct[i].and_then(|x| pct_change(x, prev[i])))
        .collect();
    let rows = t.rows();
    Ok(Table::new()
        .with(
            "segment_kind",
            Col::Str(
                (0..rows)
                    .map(|i| Some(SEGMENTS[code(&k[i]) as usize].0.to_string()))
                    .collect(),
            ),
        )
        .with(
            "segment",
            Col::Str(
                (0..rows)
                    .map(|i| Some(names[code(&k[i]) as usize][code(&s[i]) as usize].clone()))
                    .collect(),
            ),
        )
        .with(
            "month",
            Col::Str(
                (0..rows)
                    .map(|i| Some(month_of(m.months[code(&mo[i]) as usize])))
                    .collect(),
            ),
        )
        .with("accounts", Col::Int(cnt.clone()))
        .with("kwh", Col::Dec(e.clone(), SCALE))
        .with("avg_kwh_per_account", dec4(per_acct))
        .with("prev_avg_kwh_per_account", dec4(prev))
        .with("mom_change_pct", Col::Ratio(mom)))
}

/// Load by hour of day and day type per district / feeder and customer
/// class, from 15-minute interval energy summed during the scan.
fn peak_periods(inp: &Inputs) -> Table {
    let mut rows: Vec<(
        &(&'static str, String, String),
        usize,
        &super::scan::HourLoad,
    )> = inp
        .scan
        .peak
        .iter()
        .map(|((g, dt), l)| (&inp.peak_groups[*g as usize], *dt as usize, l))
        .collect();
    rows.sort_by(|a, b| (a.0, DAY_TYPES[a.1]).cmp(&(b.0, DAY_TYPES[b.1])));
    let (mut ak, mut ar, mut cl, mut dt, mut hr, mut days) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut avg, mut share, mut is_peak, mut peak_hour, mut ptv) =
        (vec![], vec![], vec![], vec![], vec![]);
    for (g, t, l) in rows {
        let n = l.dates.len().max(1) as i128;
        // Average energy in the hour = average load in kW over that hour.
        let a: Vec<i128> = l.e4.iter().map(|e| *e as i128 / n).collect();
        let total: i128 = a.iter().sum();
        let mut by: Vec<usize> = (0..24).collect();
        by.sort_by_key(|h| std::cmp::Reverse(a[*h]));
        let (max, min) = (a[by[0]], a[by[23]]);
        let rank: Vec<usize> = {
            let mut r = vec![0; 24];
            for (k, h) in by.iter().enumerate() {
                r[*h] = k;
            }
            r
        };
        for h in 0..24 {
            ak.push(Some(g.0.to_string()));
            ar.push(Some(g.1.clone()));
            cl.push(Some(g.2.clone()));
            dt.push(Some(DAY_TYPES[t].to_string()));
            hr.push(Some(h as i64));
            days.push(Some(l.dates.len() as i64));
            avg.push(Some(a[h]));
            share.push(ratio(a[h], total));
            is_peak.push(Some(rank[h] < 3));
            peak_hour.push(Some(by[0] as i64));
            ptv.push(ratio(max, min));
        }
    }
    Table::new()
        .with("area_kind", Col::Str(ak))
        .with("area", Col::Str(ar))
        .with("customer_class", Col::Str(cl))
        .with("day_type", Col::Str(dt))
        .with("hour", Col::Int(hr))
        .with("days", Col::Int(days))
        .with("avg_hour_kwh", dec4(avg))
        .with("share_of_day", Col::Ratio(share))
        .with("is_peak_hour", Col::Bool(is_peak))
        .with("peak_hour", Col::Int(peak_hour))
        .with("peak_to_valley_ratio", Col::Ratio(ptv))
}

fn profile_from_shares(night: f64, day: f64, evening: f64) -> &'static str {
    if evening >= 0.35 {
        "evening_peak"
    } else if day >= 0.5 {
        "daytime"
    } else if night >= 0.35 {
        "night"
    } else {
        "flat"
    }
}

fn usage_habits(inp: &Inputs, opts: &AnalyzeOptions) -> Table {
    let m = &inp.scan.monthly;
    let acc: Vec<usize> = (0..inp.accounts.len())
        .filter(|a| inp.scan.accounts.get(*a).is_some_and(|s| s.days > 0))
        .collect();
    let stats = |a: &usize| &inp.scan.accounts[*a];
    let mean = |sum: i64, n: u32| (n > 0).then(|| sum as i128 / n as i128);
    let (mut prof, mut src) = (Vec::with_capacity(acc.len()), Vec::with_capacity(acc.len()));
    for a in &acc {
        if let Some(h) = inp.scan.hour_bands.get(&(*a as u32)).filter(|h| h[3] > 0) {
            let s = |i: usize| ratio(h[i] as i128, h[3] as i128).unwrap_or(0.0);
            prof.push(Some(profile_from_shares(s(0), s(1), s(2)).to_string()));
            src.push(Some("interval".to_string()));
            continue;
        }
        let t = stats(a).tou;
        let all: i64 = t.iter().sum();
        if all > 0 {
            let valley = ratio(t[3] as i128, all as i128).unwrap_or(0.0);
            let peak = ratio((t[0] + t[1]) as i128, all as i128).unwrap_or(0.0);
            let p = if valley >= 0.4 {
                "night"
            } else if peak >= 0.55 {
                "daytime"
            } else {
                "flat"
            };
            prof.push(Some(p.to_string()));
            src.push(Some("tou_registers".to_string()));
        } else {
            prof.push(None);
            src.push(None);
        }
    }
    // Seasonality: highest over lowest average daily use across months with 20+ days.
    let season: Vec<Option<f64>> = acc
        .iter()
        .map(|a| {
            let months: Vec<i128> = m
                .by_month
                .iter()
                .map(|v| v[*a])
                .filter(|x| x.days >= 20)
                .map(|x| x.e4 as i128 / x.days as i128)
                .collect();
            if months.len() >= 2 {
                ratio(*months.iter().max()?, *months.iter().min()?)
            } else {
                None
            }
        })
        .collect();
    Table::new()
        .with("account_key", keys(inp, opts, acc.iter().copied()))
        .with(
            "days",
            Col::Int(acc.iter().map(|a| Some(stats(a).days as i64)).collect()),
        )
        .with(
            "avg_daily_kwh",
            dec4(
                acc.iter()
                    .map(|a| mean(stats(a).sum, stats(a).days))
                    .collect(),
            ),
        )
        .with(
            "weekday_avg_kwh",
            dec4(
                acc.iter()
                    .map(|a| mean(stats(a).weekday_sum, stats(a).weekday_days))
                    .collect(),
            ),
        )
        .with(
            "weekend_avg_kwh",
            dec4(
                acc.iter()
                    .map(|a| mean(stats(a).weekend_sum, stats(a).weekend_days))
                    .collect(),
            ),
        )
        .with(
            "weekday_weekend_ratio",
            Col::Ratio(
                acc.iter()
                    .map(|a| {
                        let s = stats(a);
                        match (
                            mean(s.weekday_sum, s.weekday_days),
                            mean(s.weekend_sum, s.weekend_days),
                        ) {
                            (Some(x), Some(y)) => ratio(x, y),
                            _ => None,
                        }
                    })
                    .collect(),
            ),
        )
        .with("profile_class", Col::Str(prof))
        .with("profile_source", Col::Str(src))
        .with("seasonality_ratio", Col::Ratio(season))
        .with(
            "trend_pct_per_30d",
            Col::Ratio(
                acc.iter()
                    .map(|a| stats(a).trend_pct_per_30_days())
                    .collect(),
            ),
        )
}

/// Bills of one account: (bill date, total yuan e2 when known), by date.
type Bills = Vec<(NaiveDate, Option<i128>)>;
/// Payments of one account: (local day, yuan e2, channel index in `CHANNELS` or 4).
type Pays = Vec<(NaiveDate, i128, u8)>;

/// Bill dates per postpaid account: from bill runs, else the 1st of every month in the data.
fn bill_dates(inp: &Inputs) -> BTreeMap<usize, Bills> {
    bill_dates_from(inp, !inp.bills.is_empty())
}

fn bill_dates_from(inp: &Inputs, from_runs: bool) -> BTreeMap<usize, Bills> {
    let mut out: BTreeMap<usize, Bills> = BTreeMap::new();
    if from_runs {
        for b in &inp.bills {
            let postpaid = |a: &usize| inp.accounts[*a].payment_mode == PaymentMode::Postpaid;
            // Prepaid accounts settle through their balance, not by paying bills.
            if let Some(a) = inp.account_index.get(&b.account_id).filter(|a| postpaid(a)) {
                out.entry(*a)
                    .or_default()
                    .push((b.bill_date, Some(b.total_e2)));
            }
        }
    } else if let (Some(first), Some(last)) = (inp.scan.first_date, inp.scan.last_date) {
        let mut d = first.with_day(1).expect("day 1");
        if d < first {
            d = add_months(d, 1);
        }
        let mut months = Vec::new();
        while d <= last {
            months.push(d);
            d = add_months(d, 1);
        }
        for (i, a) in inp.accounts.iter().enumerate() {
            if a.payment_mode == PaymentMode::Postpaid {
                out.insert(i, months.iter().map(|m| (*m, None)).collect());
            }
        }
    }
    for v in out.values_mut() {
        v.sort();
    }
    out
}

/// (days to pay of each bill paid by `on`, bills unpaid GRACE_DAYS after
/// issue, open yuan e2). Only bills issued by `on` and payments made by `on` count.
fn bill_payment_match(
    bills: &[(NaiveDate, Option<i128>)],
    pays: &[(NaiveDate, i128, u8)],
    on: NaiveDate,
) -> (Vec<i64>, u32, i128) {
    let mut days = Vec::new();
    let mut overdue = 0;
    let mut open = 0i128;
    let mut used = 0usize;
    for (k, (bd, total)) in bills.iter().enumerate() {
        if *bd > on {
            break;
        }
        let next = bills.get(k + 1).map(|b| b.0).unwrap_or(NaiveDate::MAX);
        let pay = pays
            .iter()
            .enumerate()
            .skip(used)
            .find(|(_, p)| p.0 >= *bd && p.0 <= on && p.0 < next.max(*bd + Duration::days(1)));
        match pay {
            Some((j, p)) => {
                days.push((p.0 - *bd).num_days());
                used = j + 1;
                let paid: i128 = pays
                    .iter()
                    .filter(|x| x.0 >= *bd && x.0 <= on && x.0 < next)
                    .map(|x| x.1)
                    .sum();
                open += (total.unwrap_or(0) - paid).max(0);
            }
            None => {
                if (on - *bd).num_days() >= GRACE_DAYS {
                    overdue += 1;
                }
                open += total.unwrap_or(0);
            }
        }
    }
    (days, overdue, open)
}

fn payments_by_account(inp: &Inputs) -> Vec<Pays> {
    let mut out: Vec<Pays> = vec![Vec::new(); inp.accounts.len()];
    for p in &inp.payments {
        if let Some(a) = inp.account_index.get(&p.account_id) {
            let d = local_date(p.paid_at.timestamp_millis(), inp.utc_offset_secs);
            let e2 = rescale(p.amount.mantissa(), p.amount.scale() as u8, 2);
            let ch = CHANNELS
                .iter()
                .position(|c| *c == p.channel)
                .unwrap_or(CHANNELS.len()) as u8;
            out[*a].push((d, e2, ch));
        }
    }
    for v in &mut out {
        v.sort();
    }
    out
}

const CHANNELS: [&str; 4] = ["wechat", "alipay", "bank", "counter"];
const COUNTER: u8 = 3;

fn payment_habits(
    inp: &Inputs,
    opts: &AnalyzeOptions,
    pays: &[Pays],
    bills: &BTreeMap<usize, Bills>,
) -> Table {
    let on = inp.scan.last_date.unwrap_or(NaiveDate::MAX);
    let accs: Vec<usize> = (0..pays.len()).filter(|a| !pays[*a].is_empty()).collect();
    let mut count = vec![];
    let mut paid = vec![];
    let mut shares: [Vec<Option<f64>>; 4] = Default::default();
    let mut median_days = vec![];
    let mut gap = vec![];
    let mut remind = vec![];
    for a in &accs {
        let p = &pays[*a];
        count.push(Some(p.len() as i64));
        paid.push(Some(p.iter().map(|x| x.1).sum::<i128>()));
        for (k, s) in shares.iter_mut().enumerate() {
            s.push(ratio(
                p.iter().filter(|x| x.2 == k as u8).count() as i128,
                p.len() as i128,
            ));
        }
        let is_post = inp.accounts[*a].payment_mode == PaymentMode::Postpaid;
        let (mut d, _, _) = if is_post {
            bill_payment_match(bills.get(a).map_or(&[][..], |v| v), p, on)
        } else {
            (vec![], 0, 0)
        };
        d.sort();
        let med = d.get(d.len() / 2).copied();
        median_days.push(med);
        let gaps: Vec<i64> = p.windows(2).map(|w| (w[1].0 - w[0].0).num_days()).collect();
        let mg = if gaps.is_empty() {
            None
        } else {
            Some(gaps.iter().sum::<i64>() / gaps.len() as i64)
        };
        gap.push(mg);
        // Remind a few days before the account usually pays: postpaid by days
        // after the bill, prepaid by days after the last top-up.
        remind.push(if is_post {
            med.map(|m| (m - 3).max(1))
        } else {
            mg.map(|g| (g - 3).max(1))
        });
    }
    let mut t = Table::new()
        .with("account_key", keys(inp, opts, accs.iter().copied()))
        .with(
            "payment_mode",
            Col::Str(
                accs.iter()
                    .map(|a| Some(mode(&inp.accounts[*a]).to_string()))
                    .collect(),
            ),
        )
        .with("payments", Col::Int(count))
        .with("paid_total", Col::Dec(paid, 2));
    for (k, ch) in CHANNELS.iter().enumerate() {
        t = t.with(
            &format!("share_{ch}"),
            Col::Ratio(std::mem::take(&mut shares[k])),
        );
    }
    t.with("median_days_bill_to_payment", Col::Int(median_days))
        .with("mean_days_between_payments", Col::Int(gap))
        .with("suggested_reminder_day", Col::Int(remind))
}

/// Daily use of the last complete month before `on` over the month before
/// it (for the usage-jump factor; only data before `on`).
fn usage_ratio(m: &Monthly, a: usize, on: NaiveDate) -> Option<f64> {
    let this = add_months(on.with_day(1)?, -1);
    let now = m.get(a, this)?;
    let before = m.get(a, add_months(this, -1))?;
    ratio(
        now.e4 as i128 * before.days as i128,
        before.e4 as i128 * now.days.max(1) as i128,
    )
}

/// What is known about a postpaid account on day `on` (strictly before it).
fn risk_facts(
    inp: &Inputs,
    a: usize,
    on: NaiveDate,
    bills: &[(NaiveDate, Option<i128>)],
    pays: &[(NaiveDate, i128, u8)],
) -> (RiskFacts, i128) {
    let before: Vec<(NaiveDate, i128, u8)> = pays.iter().filter(|p| p.0 < on).copied().collect();
    let known: Vec<(NaiveDate, Option<i128>)> =
        bills.iter().filter(|b| b.0 < on).copied().collect();
    let (days, overdue, open) = bill_payment_match(&known, &before, on);
    let f = RiskFacts {
        days_to_pay: days,
        overdue_bills: overdue,
        has_payment: !before.is_empty(),
        counter_only: !before.is_empty() && before.iter().all(|p| p.2 == COUNTER),
        usage_ratio: usage_ratio(&inp.scan.monthly, a, on),
        opened_on: Some(inp.accounts[a].opened_on),
    };
    (f, open)
}

fn arrears_risk(
    inp: &Inputs,
    opts: &AnalyzeOptions,
    on: Option<NaiveDate>,
    pays: &[Pays],
    bills: &BTreeMap<usize, Bills>,
) -> Table {
    // No data: nobody is scored, the columns stay.
    let accs: Vec<usize> = (0..inp.accounts.len())
        .filter(|a| on.is_some() && inp.accounts[*a].payment_mode == PaymentMode::Postpaid)
        .collect();
    let on = on.unwrap_or_default() + Duration::days(1);
    let mut pts: [Vec<Option<i64>>; 6] = Default::default();
    let (mut score, mut band, mut open) = (vec![], vec![], vec![]);
    for a in &accs {
        let (f, o) = risk_facts(inp, *a, on, bills.get(a).map_or(&[][..], |v| v), &pays[*a]);
        let s = risk::score(&f, on);
        for (col, p) in pts.iter_mut().zip(s.points) {
            col.push(Some(p));
        }
        score.push(Some(s.score));
        band.push(Some(s.band.to_string()));
        open.push(if inp.bills.is_empty() { None } else { Some(o) });
    }
    let mut t = Table::new()
        .with("account_key", keys(inp, opts, accs.iter().copied()))
        .with(
            "scored_on",
            Col::Date(accs.iter().map(|_| Some(on)).collect()),
        );
    for (k, name) in FACTORS.iter().enumerate() {
        t = t.with(name, Col::Int(std::mem::take(&mut pts[k])));
    }
    t.with("score", Col::Int(score))
        .with("band", Col::Str(band))
        .with("open_bills_total", Col::Dec(open, 2))
}

/// Backtest at a cut-off day C: every postpaid account with a bill issued on
/// or after C (and at least GRACE_DAYS before the end of the data) is scored
/// on C from bills, payments and use before C only; the outcome is whether
/// any such bill went unpaid for more than GRACE_DAYS. Default C: the
/// latest bill date that still has an observable outcome and at least one
/// earlier bill (so there is history to score).
pub fn backtest_cutoff(bills: &BTreeMap<usize, Bills>, last: NaiveDate) -> Option<NaiveDate> {
    let dates: BTreeSet<NaiveDate> = bills.values().flatten().map(|b| b.0).collect();
    let first = *dates.iter().next()?;
    dates
        .into_iter()
        .rfind(|d| *d > first && (last - *d).num_days() >= GRACE_DAYS)
        .or(Some(first).filter(|d| (last - *d).num_days() >= GRACE_DAYS))
}

fn arrears_backtest(
    inp: &Inputs,
    last: Option<NaiveDate>,
    cutoff: Option<NaiveDate>,
    pays: &[Pays],
) -> Table {
    let Some(last) = last else {
        // No data: no rows, the same columns.
        return backtest_table(None, "", &BTreeMap::new()).take(&[]);
    };
    let mut bills = bill_dates(inp);
    let mut source = if inp.bills.is_empty() {
        "assumed_1st_of_month"
    } else {
        "bill_runs"
    };
    if backtest_cutoff(&bills, last).is_none() && cutoff.is_none() {
        // Runs too recent to have an outcome: fall back to bills on the 1st of each month.
        bills = bill_dates_from(inp, false);
        source = "assumed_1st_of_month";
    }
    let Some(c) = cutoff.or_else(|| backtest_cutoff(&bills, last)) else {
        return backtest_table(None, source, &BTreeMap::new());
    };
    let mut by_band: BTreeMap<&'static str, (i64, i64, i64)> = BTreeMap::new();
    for (a, bs) in &bills {
        let p = &pays[*a];
        let outcome_bills: Vec<NaiveDate> = bs
            .iter()
            .map(|b| b.0)
            .filter(|d| *d >= c && (last - *d).num_days() >= GRACE_DAYS)
            .collect();
        if outcome_bills.is_empty() {
            continue;
        }
        let (f, _) = risk_facts(inp, *a, c, bs, p);
        let s = risk::score(&f, c);
        // Behind on bills GRACE_DAYS after an outcome bill: fewer payments
        // since the first bill than bills issued (a late payment of the bill
        // before does not count as paying this one).
        let first = bs[0].0;
        let bad = outcome_bills.iter().any(|bd| {
            let issued = bs.iter().filter(|b| b.0 <= *bd).count();
            let due = *bd + Duration::days(GRACE_DAYS);
            let paid = p.iter().filter(|x| x.0 >= first && x.0 <= due).count();
            paid < issued
        });
        let e = by_band.entry(s.band).or_default();
        e.0 += 1;
        e.1 += bad as i64;
        e.2 += s.score;
    }
    backtest_table(Some(c), source, &by_band)
}

fn backtest_table(
    cutoff: Option<NaiveDate>,
    source: &str,
    by_band: &BTreeMap<&'static str, (i64, i64, i64)>,
) -> Table {
    let all = by_band
        .values()
        .fold((0, 0, 0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2));
    let mut rows: Vec<(String, (i64, i64, i64))> = ["low", "medium", "high"]
        .iter()
        .map(|b| (b.to_string(), by_band.get(b).copied().unwrap_or_default()))
        .collect();
    rows.push(("all".to_string(), all));
    Table::new()
        .with("cutoff", Col::Date(rows.iter().map(|_| cutoff).collect()))
        .with(
            "bill_dates_from",
            Col::Str(rows.iter().map(|_| Some(source.to_string())).collect()),
        )
        .with(
            "band",
            Col::Str(rows.iter().map(|r| Some(r.0.clone())).collect()),
        )
        .with(
            "accounts_scored",
            Col::Int(rows.iter().map(|r| Some(r.1 .0)).collect()),
        )
        .with(
            "paid_late_or_unpaid",
            Col::Int(rows.iter().map(|r| Some(r.1 .1)).collect()),
        )
        .with(
            "bad_rate",
            Col::Ratio(
                rows.iter()
                    .map(|r| ratio(r.1 .1 as i128, r.1 .0 as i128))
                    .collect(),
            ),
        )
        .with(
            "mean_score",
            Col::Ratio(
                rows.iter()
                    .map(|r| ratio(r.1 .2 as i128, r.1 .0 as i128))
                    .collect(),
            ),
        )
}

fn rfc3339(ms: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

fn outage_events(inp: &Inputs, opts: &AnalyzeOptions) -> Table {
    let ev = &inp.scan.events;
    let meter = |i: usize| &inp.meters[ev[i].meter as usize];
    Table::new()
        .with(
            "meter_id",
            Col::Str(
                (0..ev.len())
                    .map(|i| Some(meter(i).meter_id.clone()))
                    .collect(),
            ),
        )
        .with(
            "account_key",
            Col::Str(
                (0..ev.len())
                    .map(|i| {
                        inp.meter_account[ev[i].meter as usize]
                            .map(|a| opts.key.key(&inp.accounts[a].account_id))
                    })
                    .collect(),
            ),
        )
        .with(
            "feeder",
            Col::Str(
                (0..ev.len())
                    .map(|i| Some(meter(i).feeder.clone()))
                    .collect(),
            ),
        )
        .with(
            "kind",
            Col::Str(ev.iter().map(|e| Some(e.kind.to_string())).collect()),
        )
        .with(
            "start",
            Col::Str(ev.iter().map(|e| rfc3339(e.start_ms)).collect()),
        )
        .with(
            "end",
            Col::Str(ev.iter().map(|e| rfc3339(e.end_ms)).collect()),
        )
        .with(
            "duration_hours",
            Col::Ratio(
                ev.iter()
                    .map(|e| Some((e.end_ms - e.start_ms) as f64 / 3_600_000.0))
                    .collect(),
            ),
        )
        .with(
            "count",
            Col::Int(ev.iter().map(|e| Some(e.count)).collect()),
        )
}

/// Events per feeder, kind and local start day: many meters of one feeder at
/// once point at the feeder (an outage), one meter at the device or its link.
fn feeder_events(inp: &Inputs) -> Table {
    let mut per_feeder: HashMap<&str, i64> = HashMap::new();
    for m in &inp.meters {
        if m.removed_on.is_none() {
            *per_feeder.entry(m.feeder.as_str()).or_default() += 1;
        }
    }
    let mut groups: BTreeMap<(String, &'static str, NaiveDate), BTreeSet<u32>> = BTreeMap::new();
    for e in &inp.scan.events {
        let f = inp.meters[e.meter as usize].feeder.clone();
        groups
            .entry((f, e.kind, local_date(e.start_ms, inp.utc_offset_secs)))
            .or_default()
            .insert(e.meter);
    }
    let rows: Vec<_> = groups.into_iter().collect();
    let total = |f: &str| per_feeder.get(f).copied().unwrap_or(0);
    Table::new()
        .with(
            "feeder",
            Col::Str(rows.iter().map(|r| Some(r.0 .0.clone())).collect()),
        )
        .with(
            "kind",
            Col::Str(rows.iter().map(|r| Some(r.0 .1.to_string())).collect()),
        )
        .with(
            "date",
            Col::Date(rows.iter().map(|r| Some(r.0 .2)).collect()),
        )
        .with(
            "meters_affected",
            Col::Int(rows.iter().map(|r| Some(r.1.len() as i64)).collect()),
        )
        .with(
            "meters_on_feeder",
            Col::Int(rows.iter().map(|r| Some(total(&r.0 .0))).collect()),
        )
        .with(
            "share",
            Col::Ratio(
                rows.iter()
                    .map(|r| ratio(r.1.len() as i128, total(&r.0 .0) as i128))
                    .collect(),
            ),
        )
        .with(
            "classification",
            Col::Str(
                rows.iter()
                    .map(|r| {
                        let n = r.1.len() as i64;
                        Some(
                            if n >= 2 && n * 2 >= total(&r.0 .0) {
                                "feeder_outage"
                            } else {
                                "device"
                            }
                            .to_string(),
                        )
                    })
                    .collect(),
            ),
        )
}

fn usage_warnings(inp: &Inputs, opts: &AnalyzeOptions) -> Table {
    // No data: no rows, the columns stay.
    let (on, accounts) = match as_of(inp, opts) {
        Some(on) => (on, inp.accounts.len()),
        None => (NaiveDate::default(), 0),
    };
    let m = &inp.scan.monthly;
    let month = month_of(on);
    let month_start = on.with_day(1).expect("day 1");
    let elapsed = (on - month_start).num_days() + 1;
    let dim = days_in_month(on);
    // Month to date: summed by the scan for `--as-of`, else the as-of month is the last one.
    let mtd = |a: usize| -> Option<i128> {
        if opts.as_of.is_some() && !inp.scan.mtd.is_empty() {
            let v = inp.scan.mtd[a];
            m.get(a, month_start).map(|_| v as i128)
        } else {
            m.get(a, month_start).map(|x| x.e4 as i128)
        }
    };
    let scale = Decimal::from(10_000);
    let mut rows = Vec::new();
    for a in 0..accounts {
        let Some(e4) = mtd(a) else { continue };
        let projected = e4 * dim as i128 / elapsed as i128;
        // Usual: mean of earlier full months (20+ days of data).
        let prior: Vec<i128> = m
            .months
            .iter()
            .zip(&m.by_month)
            .filter(|(mo, v)| **mo < month_start && v[a].days >= 20)
            .map(|(_, v)| v[a].e4 as i128)
            .collect();
        let usual = if prior.is_empty() {
            None
        } else {
            Some(prior.iter().sum::<i128>() / prior.len() as i128)
        };
        let residential = inp.accounts[a].customer_class.as_str() == "residential";
        let mut stage = None;
        let mut threshold = None;
        if residential {
            for (k, t) in opts.tiers_kwh.iter().enumerate() {
                let t4 = (*t * scale).trunc().mantissa();
                if projected >= t4 {
                    stage = Some(format!("tier_{}", k + 2));
                    threshold = Some(t4);
                }
            }
        }
        let limit = usual.map(|u| {
            (Decimal::from_i128_with_scale(u, 0) * opts.usual_multiple)
                .trunc()
                .mantissa()
        });
        let above = matches!((usual, limit), (Some(_), Some(l)) if projected > l);
        if stage.is_none() && !above {
            continue;
        }
        let stage = match (stage, above) {
            (Some(s), true) => format!("{s}+above_usual"),
            (Some(s), false) => s,
            (None, _) => "above_usual".to_string(),
        };
        rows.push((a, e4, projected, threshold, usual, stage));
    }
    Table::new()
        .with("account_key", keys(inp, opts, rows.iter().map(|r| r.0)))
        .with("as_of", Col::Date(rows.iter().map(|_| Some(on)).collect()))
        .with(
            "month",
            Col::Str(rows.iter().map(|_| Some(month.clone())).collect()),
        )
        .with(
            "days_elapsed",
            Col::Int(rows.iter().map(|_| Some(elapsed)).collect()),
        )
        .with(
            "days_in_month",
            Col::Int(rows.iter().map(|_| Some(dim)).collect()),
        )
        .with("mtd_kwh", dec4(rows.iter().map(|r| Some(r.1)).collect()))
        .with(
            "projected_kwh",
            dec4(rows.iter().map(|r| Some(r.2)).collect()),
        )
        .with(
            "tier_threshold_kwh",
            dec4(rows.iter().map(|r| r.3).collect()),
        )
        .with(
            "already_crossed",
            Col::Bool(
                rows.iter()
                    .map(|r| Some(r.3.is_some_and(|t| r.1 >= t)))
                    .collect(),
            ),
        )
        .with("usual_kwh", dec4(rows.iter().map(|r| r.4).collect()))
        .with(
            "projected_to_usual_ratio",
            Col::Ratio(
                rows.iter()
                    .map(|r| r.4.and_then(|u| ratio(r.2, u)))
                    .collect(),
            ),
        )
        .with(
            "stage",
            Col::Str(rows.iter().map(|r| Some(r.5.clone())).collect()),
        )
}

/// Fleet energy per local day (every known meter), and the TOU registers
/// over all days on a row with no date: what the run report charts.
fn fleet_daily(inp: &Inputs) -> Table {
    let s = &inp.scan;
    let mut date: Vec<Option<NaiveDate>> = s.fleet_daily.keys().map(|d| Some(*d)).collect();
    let mut kwh: Vec<Option<i128>> = s.fleet_daily.values().map(|v| Some(*v)).collect();
    let mut tou: [Vec<Option<i128>>; 4] = Default::default();
    for t in &mut tou {
        t.extend(date.iter().map(|_| None));
    }
    date.push(None);
    kwh.push(None);
    for (k, t) in tou.iter_mut().enumerate() {
        t.push(Some(s.fleet_tou[k]));
    }
    let [t1, t2, t3, t4] = tou;
    Table::new()
        .with("date", Col::Date(date))
        .with("kwh", dec4(kwh))
        .with("sharp_kwh", dec4(t1))
        .with("peak_kwh", dec4(t2))
        .with("flat_kwh", dec4(t3))
        .with("valley_kwh", dec4(t4))
}

/// The scan as far as the run report needs it, rebuilt from an `analyze`
/// output folder (collection, fleet_daily, analytics.json): no lake scan.
pub fn scan_from_analytics(dir: &std::path::Path) -> Result<super::scan::Scan, AnalyticsError> {
    let mut s = super::scan::Scan::default();
    let json: serde_json::Value = {
        let p = dir.join("analytics.json");
        let b = std::fs::read(&p).map_err(|source| AnalyticsError::Io {
            path: p.clone(),
            source,
        })?;
        serde_json::from_slice(&b)
            .map_err(|e| AnalyticsError::Invalid(format!("{}: {e}", p.display())))?
    };
    let n = |k: &str| json[k].as_u64().unwrap_or(0);
    s.readings = n("readings");
    s.unknown_meter_readings = n("unknown_meter_readings");
    s.backwards_pairs = n("backwards_pairs");
    s.comm_loss_events = n("comm_loss_events");
    let c = Table::read_parquet(&dir.join("collection.parquet"))?;
    let text = |name: &str, i: usize| c.col(name).map(|x| x.text(i)).unwrap_or_default();
    let int = |name: &str, i: usize| match c.col(name) {
        Some(Col::Int(v)) => v[i].unwrap_or(0) as u64,
        _ => 0,
    };
    for i in 0..c.rows() {
        s.collectors.insert(
            (text("collector", i), text("bus", i)),
            super::scan::CollectorStats {
                readings: int("readings", i),
                ok: int("ok", i),
                estimated: int("estimated", i),
                suspect: int("suspect", i),
                device_error: int("device_error", i),
                offline: int("offline", i),
                quarantined: int("quarantined", i),
                meters: int("meters", i),
            },
        );
    }
    let f = Table::read_parquet(&dir.join("fleet_daily.parquet"))?;
    let dec = |name: &str| match f.col(name) {
        Some(Col::Dec(v, sc)) => v
            .iter()
            .map(|x| x.map(|x| rescale(x, *sc, SCALE)))
            .collect(),
        _ => vec![None; f.rows()],
    };
    let kwh = dec("kwh");
    let tous = [
        dec("sharp_kwh"),
        dec("peak_kwh"),
        dec("flat_kwh"),
        dec("valley_kwh"),
    ];
    if let Some(Col::Date(d)) = f.col("date") {
        for i in 0..f.rows() {
            match (d[i], kwh[i]) {
                (Some(d), Some(v)) => {
                    s.fleet_daily.insert(d, v);
                }
                _ => {
                    for (t, col) in s.fleet_tou.iter_mut().zip(&tous) {
                        *t += col[i].unwrap_or(0);
                    }
                }
            }
        }
    }
    Ok(s)
}

/// Collection success per collector and per bus.
pub fn collection(inp: &Inputs) -> Table {
    let rows: Vec<_> = inp.scan.collectors.iter().collect();
    let int = |f: &dyn Fn(&super::scan::CollectorStats) -> u64| {
        Col::Int(rows.iter().map(|r| Some(f(r.1) as i64)).collect())
    };
    Table::new()
        .with(
            "collector",
            Col::Str(rows.iter().map(|r| Some(r.0 .0.clone())).collect()),
        )
        .with(
            "bus",
            Col::Str(rows.iter().map(|r| Some(r.0 .1.clone())).collect()),
        )
        .with("meters", int(&|s| s.meters))
        .with("readings", int(&|s| s.readings))
        .with("ok", int(&|s| s.ok))
        .with("estimated", int(&|s| s.estimated))
        .with("suspect", int(&|s| s.suspect))
        .with("device_error", int(&|s| s.device_error))
        .with("offline", int(&|s| s.offline))
        .with("quarantined", int(&|s| s.quarantined))
        .with(
            "success_ratio",
            Col::Ratio(
                rows.iter()
                    .map(|r| ratio(r.1.ok as i128, (r.1.readings + r.1.quarantined) as i128))
                    .collect(),
            ),
        )
}
