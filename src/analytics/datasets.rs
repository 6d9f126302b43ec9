//! The datasets of `meterflow analyze`. Each function returns a `Table`;
//! energy columns are exact decimals (scale 4), money scale 2.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{Datelike, Duration, NaiveDate, Weekday};
use polars::prelude::*;
use rust_decimal::Decimal;

use super::frame::to_table;
use super::inputs::{rescale, Inputs};
use super::risk::{self, RiskFacts, FACTORS, GRACE_DAYS};
use super::scan::{local_date, local_hour, SCALE};
use super::table::{Col, Table};
use super::{AnalyticsError, AnalyzeOptions};
use crate::master::{Account, PaymentMode};
use crate::privacy::{mask_address, mask_id_number, mask_name, mask_phone};

type Named = (&'static str, Table, bool);

/// Every dataset: (name, table, holds raw personal data).
pub fn all(inp: &Inputs, opts: &AnalyzeOptions) -> Result<Vec<Named>, AnalyticsError> {
    let days = account_days(inp);
    let monthly = monthly(&days)?;
    Ok(vec![
        ("accounts", accounts(inp, opts, false), false),
        ("accounts", accounts(inp, opts, true), true),
        ("daily_usage", daily_usage(inp, opts, &days), false),
        ("peak_periods", peak_periods(inp)?, false),
        (
            "usage_habits",
            usage_habits(inp, opts, &days, &monthly),
            false,
        ),
        ("history_change", history_change(inp, opts, &monthly), false),
        ("segment_change", segment_change(inp, &monthly)?, false),
        ("payment_habits", payment_habits(inp, opts), false),
        (
            "arrears_risk",
            arrears_risk(inp, opts, &monthly, as_of(inp, opts)),
            false,
        ),
        (
            "arrears_backtest",
            arrears_backtest(inp, &monthly, as_of(inp, opts)),
            false,
        ),
        ("outage_events", outage_events(inp, opts), false),
        ("feeder_events", feeder_events(inp), false),
        (
            "usage_warnings",
            usage_warnings(inp, opts, &days, &monthly),
            false,
        ),
        ("collection", collection(inp), false),
    ])
}

pub fn as_of(inp: &Inputs, opts: &AnalyzeOptions) -> Option<NaiveDate> {
    opts.as_of.or(inp.scan.last_date.map(|d| {
        // The last local date in the lake is only the closing snapshot's day.
        inp.scan.daily.iter().map(|x| x.date).max().unwrap_or(d)
    }))
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
    let next = if d.month() == 12 {
        NaiveDate::from_ymd_opt(d.year() + 1, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(d.year(), d.month() + 1, 1)
    }
    .expect("valid month");
    (next - first).num_days()
}

/// Per account and local day: total and tariff 1..4 energy (scale 4), estimated.
pub struct AccountDay {
    pub account: usize,
    pub date: NaiveDate,
    pub regs: [Option<i64>; 5],
    pub estimated: bool,
}

fn account_days(inp: &Inputs) -> Vec<AccountDay> {
    let mut map: BTreeMap<(usize, NaiveDate), AccountDay> = BTreeMap::new();
    for d in &inp.scan.daily {
        let Some(a) = inp.meter_account[d.meter as usize] else {
            continue;
        };
        let e = map.entry((a, d.date)).or_insert(AccountDay {
            account: a,
            date: d.date,
            regs: [None; 5],
            estimated: false,
        });
        for r in 0..5 {
            if let Some(v) = d.regs[r] {
                e.regs[r] = Some(e.regs[r].unwrap_or(0) + v);
            }
        }
        e.estimated |= d.estimated;
    }
    map.into_values().collect()
}

fn dec4(v: Vec<Option<i128>>) -> Col {
    Col::Dec(v, SCALE)
}

fn keys(inp: &Inputs, opts: &AnalyzeOptions, idx: impl Iterator<Item = usize>) -> Col {
    Col::Str(
        idx.map(|a| Some(opts.key.key(&inp.accounts[a].account_id)))
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

fn daily_usage(inp: &Inputs, opts: &AnalyzeOptions, days: &[AccountDay]) -> Table {
    let reg = |r: usize| dec4(days.iter().map(|d| d.regs[r].map(i128::from)).collect());
    Table::new()
        .with(
            "account_key",
            keys(inp, opts, days.iter().map(|d| d.account)),
        )
        .with(
            "date",
            Col::Date(days.iter().map(|d| Some(d.date)).collect()),
        )
        .with("kwh", reg(0))
        .with("sharp_kwh", reg(1))
        .with("peak_kwh", reg(2))
        .with("flat_kwh", reg(3))
        .with("valley_kwh", reg(4))
        .with(
            "estimated",
            Col::Bool(days.iter().map(|d| Some(d.estimated)).collect()),
        )
}

/// One (account, month) entry of `Monthly`.
type MonthRow<'a> = (&'a (usize, String), &'a (i128, i64, bool));

/// Monthly energy per account, via polars: (account, month) -> (kWh e4, days, estimated).
pub struct Monthly {
    pub rows: BTreeMap<(usize, String), (i128, i64, bool)>,
}

fn monthly(days: &[AccountDay]) -> Result<Monthly, AnalyticsError> {
    let df = df!(
        "account" => days.iter().map(|d| d.account as i64).collect::<Vec<_>>(),
        "month" => days.iter().map(|d| month_of(d.date)).collect::<Vec<_>>(),
        "e4" => days.iter().map(|d| d.regs[0]).collect::<Vec<_>>(),
        "estimated" => days.iter().map(|d| d.estimated).collect::<Vec<_>>(),
    )?;
    let out = df
        .lazy()
        .group_by([col("account"), col("month")])
        .agg([
            col("e4").sum().alias("e4"),
            col("e4").count().alias("days"),
            col("estimated").any(true).alias("estimated"),
        ])
        .collect()?;
    let t = to_table(&out, &[], SCALE)?;
    let mut rows = BTreeMap::new();
    if let (
        Some(Col::Int(a)),
        Some(Col::Str(m)),
        Some(Col::Int(e)),
        Some(Col::Int(n)),
        Some(Col::Bool(est)),
    ) = (
        t.col("account"),
        t.col("month"),
        t.col("e4"),
        t.col("days"),
        t.col("estimated"),
    ) {
        for i in 0..t.rows() {
            rows.insert(
                (a[i].unwrap_or(0) as usize, m[i].clone().unwrap_or_default()),
                (
                    e[i].unwrap_or(0) as i128,
                    n[i].unwrap_or(0),
                    est[i].unwrap_or(false),
                ),
            );
        }
    }
    Ok(Monthly { rows })
}

fn prev_month(m: &str, back: i32) -> String {
    let y: i32 = m[..4].parse().unwrap_or(0);
    let mo: i32 = m[5..].parse().unwrap_or(1);
    let idx = y * 12 + (mo - 1) - back;
    format!("{:04}-{:02}", idx.div_euclid(12), idx.rem_euclid(12) + 1)
}

fn history_change(inp: &Inputs, opts: &AnalyzeOptions, m: &Monthly) -> Table {
    let rows: Vec<MonthRow<'_>> = m.rows.iter().collect();
    let get = |a: usize, month: String| m.rows.get(&(a, month)).map(|x| x.0);
    let prev: Vec<Option<i128>> = rows
        .iter()
        .map(|((a, mo), _)| get(*a, prev_month(mo, 1)))
        .collect();
    let yoy: Vec<Option<i128>> = rows
        .iter()
        .map(|((a, mo), _)| get(*a, prev_month(mo, 12)))
        .collect();
    Table::new()
        .with("account_key", keys(inp, opts, rows.iter().map(|r| r.0 .0)))
        .with(
            "month",
            Col::Str(rows.iter().map(|r| Some(r.0 .1.clone())).collect()),
        )
        .with("kwh", dec4(rows.iter().map(|r| Some(r.1 .0)).collect()))
        .with(
            "days",
            Col::Int(rows.iter().map(|r| Some(r.1 .1)).collect()),
        )
        .with(
            "estimated",
            Col::Bool(rows.iter().map(|r| Some(r.1 .2)).collect()),
        )
        .with("prev_month_kwh", dec4(prev.clone()))
        .with(
            "mom_change_pct",
            Col::Ratio(
                rows.iter()
                    .zip(&prev)
                    .map(|(r, p)| pct_change(r.1 .0, *p))
                    .collect(),
            ),
        )
        .with("prev_year_kwh", dec4(yoy.clone()))
        .with(
            "yoy_change_pct",
            Col::Ratio(
                rows.iter()
                    .zip(&yoy)
                    .map(|(r, p)| pct_change(r.1 .0, *p))
                    .collect(),
            ),
        )
}

fn segment_change(inp: &Inputs, m: &Monthly) -> Result<Table, AnalyticsError> {
    let mut out = Table::new();
    let rows: Vec<MonthRow<'_>> = m.rows.iter().collect();
    let mut kinds: Vec<String> = Vec::new();
    let mut segs: Vec<String> = Vec::new();
    let mut months: Vec<String> = Vec::new();
    let mut accts: Vec<i64> = Vec::new();
    let mut e4: Vec<i64> = Vec::new();
    for (kind, f) in [
        (
            "age_band",
            (|a: &Account| a.age_band.clone()) as fn(&Account) -> String,
        ),
        ("occupation", |a: &Account| a.occupation.clone()),
        ("gender", |a: &Account| a.gender.clone()),
        ("customer_class", |a: &Account| {
            a.customer_class.as_str().to_string()
        }),
    ] {
        for ((a, mo), v) in &rows {
            kinds.push(kind.to_string());
            segs.push(f(&inp.accounts[*a]));
            months.push(mo.clone());
            accts.push(*a as i64);
            e4.push(v.0 as i64);
        }
    }
    let df = df!("segment_kind" => kinds, "segment" => segs, "month" => months, "account" => accts, "e4" => e4)?;
    let g = df
        .lazy()
        .group_by([col("segment_kind"), col("segment"), col("month")])
        .agg([
            col("account").n_unique().alias("accounts"),
            col("e4").sum().alias("kwh"),
        ])
        .sort(["segment_kind", "segment", "month"], Default::default())
        .collect()?;
    let t = to_table(&g, &["kwh"], SCALE)?;
    let (
        Some(Col::Str(k)),
        Some(Col::Str(s)),
        Some(Col::Str(mo)),
        Some(Col::Int(n)),
        Some(Col::Dec(e, _)),
    ) = (
        t.col("segment_kind"),
        t.col("segment"),
        t.col("month"),
        t.col("accounts"),
        t.col("kwh"),
    )
    else {
        return Ok(out);
    };
    let idx: HashMap<(String, String, String), usize> = (0..t.rows())
        .map(|i| {
            (
                (
                    k[i].clone().unwrap_or_default(),
                    s[i].clone().unwrap_or_default(),
                    mo[i].clone().unwrap_or_default(),
                ),
                i,
            )
        })
        .collect();
    let per_acct: Vec<Option<i128>> = (0..t.rows())
        .map(|i| e[i].map(|x| x / n[i].unwrap_or(1).max(1) as i128))
        .collect();
    let prev: Vec<Option<i128>> = (0..t.rows())
        .map(|i| {
            let key = (
                k[i].clone().unwrap_or_default(),
                s[i].clone().unwrap_or_default(),
                prev_month(mo[i].as_deref().unwrap_or("0000-01"), 1),
            );
            idx.get(&key).and_then(|j| per_acct[*j])
        })
        .collect();
    let mom: Vec<Option<f64>> = (0..t.rows())
        .map(|i| per_acct[i].and_then(|x| pct_change(x, prev[i])))
        .collect();
    out = t
        .with("avg_kwh_per_account", dec4(per_acct))
        .with("prev_avg_kwh_per_account", dec4(prev))
        .with("mom_change_pct", Col::Ratio(mom));
    Ok(out)
}

/// Load by hour of day and day type per district / feeder and customer class,
/// from 15-minute interval energy (polars group-by).
fn peak_periods(inp: &Inputs) -> Result<Table, AnalyticsError> {
    let off = inp.utc_offset_secs;
    let mut area_kind = Vec::new();
    let mut area = Vec::new();
    let mut class = Vec::new();
    let mut day_type = Vec::new();
    let mut hour = Vec::new();
    let mut date = Vec::new();
    let mut e4 = Vec::new();
    for iv in &inp.scan.intervals {
        let m = &inp.meters[iv.meter as usize];
        let Some(a) = inp.meter_account[iv.meter as usize] else {
            continue;
        };
        let acc = &inp.accounts[a];
        // Interval energy belongs to the interval ending at ts: use its start.
        let start = iv.ts_ms - 1;
        let d = local_date(start, off);
        let dt = if matches!(d.weekday(), Weekday::Sat | Weekday::Sun) {
            "weekend"
        } else {
            "weekday"
        };
        for (k, v) in [
            ("district", acc.district.clone()),
            ("feeder", m.feeder.clone()),
        ] {
            area_kind.push(k);
            area.push(v);
            class.push(acc.customer_class.as_str());
            day_type.push(dt);
            hour.push(local_hour(start, off) as i64);
            date.push(d.num_days_from_ce() as i64);
            e4.push(iv.e4);
        }
    }
    let df = df!("area_kind" => area_kind, "area" => area, "customer_class" => class, "day_type" => day_type, "hour" => hour, "date" => date, "e4" => e4)?;
    let g = df
        .lazy()
        .group_by([
            col("area_kind"),
            col("area"),
            col("customer_class"),
            col("day_type"),
            col("hour"),
        ])
        .agg([
            col("e4").sum().alias("e4"),
            col("date").n_unique().alias("days"),
        ])
        .sort(
            ["area_kind", "area", "customer_class", "day_type", "hour"],
            Default::default(),
        )
        .collect()?;
    let t = to_table(&g, &[], SCALE)?;
    let n = t.rows();
    let (
        Some(Col::Str(ak)),
        Some(Col::Str(ar)),
        Some(Col::Str(cl)),
        Some(Col::Str(dt)),
        Some(Col::Int(hr)),
        Some(Col::Int(e)),
        Some(Col::Int(days)),
    ) = (
        t.col("area_kind"),
        t.col("area"),
        t.col("customer_class"),
        t.col("day_type"),
        t.col("hour"),
        t.col("e4"),
        t.col("days"),
    )
    else {
        return Ok(Table::new());
    };
    // Average energy in the hour = average load in kW over that hour.
    let avg: Vec<i128> = (0..n)
        .map(|i| e[i].unwrap_or(0) as i128 / days[i].unwrap_or(1).max(1) as i128)
        .collect();
    let mut groups: BTreeMap<(String, String, String, String), Vec<usize>> = BTreeMap::new();
    for i in 0..n {
        groups
            .entry((
                ak[i].clone().unwrap_or_default(),
                ar[i].clone().unwrap_or_default(),
                cl[i].clone().unwrap_or_default(),
                dt[i].clone().unwrap_or_default(),
            ))
            .or_default()
            .push(i);
    }
    let mut share = vec![None; n];
    let mut is_peak = vec![None; n];
    let mut ptv = vec![None; n];
    let mut peak_hour = vec![None; n];
    for rows in groups.values() {
        let total: i128 = rows.iter().map(|i| avg[*i]).sum();
        let mut by: Vec<usize> = rows.clone();
        by.sort_by_key(|i| std::cmp::Reverse(avg[*i]));
        let max = avg[by[0]];
        let min = avg[*by.last().expect("non-empty group")];
        for (rank, i) in by.iter().enumerate() {
            share[*i] = ratio(avg[*i], total);
            is_peak[*i] = Some(rank < 3);
            ptv[*i] = ratio(max, min);
            peak_hour[*i] = hr[by[0]];
        }
    }
    Ok(Table::new()
        .with("area_kind", Col::Str(ak.clone()))
        .with("area", Col::Str(ar.clone()))
        .with("customer_class", Col::Str(cl.clone()))
        .with("day_type", Col::Str(dt.clone()))
        .with("hour", Col::Int(hr.clone()))
        .with("days", Col::Int(days.clone()))
        .with("avg_hour_kwh", dec4(avg.into_iter().map(Some).collect()))
        .with("share_of_day", Col::Ratio(share))
        .with("is_peak_hour", Col::Bool(is_peak))
        .with("peak_hour", Col::Int(peak_hour))
        .with("peak_to_valley_ratio", Col::Ratio(ptv)))
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

fn usage_habits(inp: &Inputs, opts: &AnalyzeOptions, days: &[AccountDay], m: &Monthly) -> Table {
    let off = inp.utc_offset_secs;
    // Hourly shares from interval data: account -> [night 0-6, day 8-17, evening 18-22, all].
    let mut hours: HashMap<usize, [i128; 4]> = HashMap::new();
    for iv in &inp.scan.intervals {
        let Some(a) = inp.meter_account[iv.meter as usize] else {
            continue;
        };
        let h = local_hour(iv.ts_ms - 1, off);
        let e = hours.entry(a).or_default();
        let v = iv.e4 as i128;
        match h {
            0..=6 => e[0] += v,
            8..=17 => e[1] += v,
            18..=22 => e[2] += v,
            _ => {}
        }
        e[3] += v;
    }
    let mut by_acc: BTreeMap<usize, Vec<&AccountDay>> = BTreeMap::new();
    for d in days {
        by_acc.entry(d.account).or_default().push(d);
    }
    let mut acc = Vec::new();
    let (mut n, mut avg, mut wd, mut we, mut wratio, mut prof, mut src, mut season, mut trend) = (
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
    );
    for (a, ds) in &by_acc {
        let vals: Vec<(NaiveDate, i128)> = ds
            .iter()
            .filter_map(|d| d.regs[0].map(|v| (d.date, v as i128)))
            .collect();
        if vals.is_empty() {
            continue;
        }
        acc.push(*a);
        let cnt = vals.len() as i128;
        let sum: i128 = vals.iter().map(|x| x.1).sum();
        n.push(Some(cnt as i64));
        avg.push(Some(sum / cnt));
        let (w, e): (Vec<_>, Vec<_>) = vals
            .iter()
            .partition(|x| !matches!(x.0.weekday(), Weekday::Sat | Weekday::Sun));
        let mean = |v: &[(NaiveDate, i128)]| {
            if v.is_empty() {
                None
            } else {
                Some(v.iter().map(|x| x.1).sum::<i128>() / v.len() as i128)
            }
        };
        let (mw, me) = (mean(&w), mean(&e));
        wd.push(mw);
        we.push(me);
        wratio.push(match (mw, me) {
            (Some(x), Some(y)) => ratio(x, y),
            _ => None,
        });
        if let Some(h) = hours.get(a).filter(|h| h[3] > 0) {
            let s = |i: usize| ratio(h[i], h[3]).unwrap_or(0.0);
            prof.push(Some(profile_from_shares(s(0), s(1), s(2)).to_string()));
            src.push(Some("interval".to_string()));
        } else {
            let t: [i128; 4] = std::array::from_fn(|r| {
                ds.iter()
                    .filter_map(|d| d.regs[r + 1])
                    .map(i128::from)
                    .sum()
            });
            let all: i128 = t.iter().sum();
            if all > 0 {
                let valley = ratio(t[3], all).unwrap_or(0.0);
                let peak = ratio(t[0] + t[1], all).unwrap_or(0.0);
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
        let months: Vec<i128> = m
            .rows
            .range((*a, String::new())..)
            .take_while(|((x, _), _)| x == a)
            .filter(|(_, v)| v.1 >= 20)
            .map(|(_, v)| v.0 / v.1 as i128)
            .collect();
        season.push(if months.len() >= 2 {
            ratio(
                *months.iter().max().expect("2+"),
                *months.iter().min().expect("2+"),
            )
        } else {
            None
        });
        trend.push(trend_pct_per_30_days(&vals));
    }
    Table::new()
        .with("account_key", keys(inp, opts, acc.iter().copied()))
        .with("days", Col::Int(n))
        .with("avg_daily_kwh", dec4(avg))
        .with("weekday_avg_kwh", dec4(wd))
        .with("weekend_avg_kwh", dec4(we))
        .with("weekday_weekend_ratio", Col::Ratio(wratio))
        .with("profile_class", Col::Str(prof))
        .with("profile_source", Col::Str(src))
        .with("seasonality_ratio", Col::Ratio(season))
        .with("trend_pct_per_30d", Col::Ratio(trend))
}

/// Least-squares slope of daily use, as percent of the mean per 30 days.
fn trend_pct_per_30_days(vals: &[(NaiveDate, i128)]) -> Option<f64> {
    if vals.len() < 7 {
        return None;
    }
    let x0 = vals[0].0;
    let pts: Vec<(f64, f64)> = vals
        .iter()
        .map(|(d, v)| ((*d - x0).num_days() as f64, *v as f64))
        .collect();
    let n = pts.len() as f64;
    let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
    let my = pts.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 || my == 0.0 {
        return None;
    }
    Some(((sxy / sxx) * 30.0 / my * 1000.0).round() / 10.0)
}

/// Bill dates per account: from bill runs, else the 1st of every month in the data.
fn bill_dates(inp: &Inputs) -> BTreeMap<usize, Vec<(NaiveDate, Option<i128>)>> {
    bill_dates_from(inp, !inp.bills.is_empty())
}

fn bill_dates_from(
    inp: &Inputs,
    from_runs: bool,
) -> BTreeMap<usize, Vec<(NaiveDate, Option<i128>)>> {
    let mut out: BTreeMap<usize, Vec<(NaiveDate, Option<i128>)>> = BTreeMap::new();
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
            d = NaiveDate::from_ymd_opt(d.year() + (d.month() / 12) as i32, d.month() % 12 + 1, 1)
                .expect("valid");
        }
        let mut months = Vec::new();
        while d <= last {
            months.push(d);
            d = d + Duration::days(days_in_month(d));
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

/// (days to pay of each bill paid before `on`, bills unpaid GRACE_DAYS after issue, open yuan e2).
fn bill_payment_match(
    bills: &[(NaiveDate, Option<i128>)],
    pays: &[(NaiveDate, i128)],
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

fn payments_by_account(inp: &Inputs) -> BTreeMap<usize, Vec<(NaiveDate, i128, String)>> {
    let mut out: BTreeMap<usize, Vec<(NaiveDate, i128, String)>> = BTreeMap::new();
    for p in &inp.payments {
        if let Some(a) = inp.account_index.get(&p.account_id) {
            let d = local_date(p.paid_at.timestamp_millis(), inp.utc_offset_secs);
            let e2 = rescale(p.amount.mantissa(), p.amount.scale() as u8, 2);
            out.entry(*a).or_default().push((d, e2, p.channel.clone()));
        }
    }
    for v in out.values_mut() {
        v.sort();
    }
    out
}

const CHANNELS: [&str; 4] = ["wechat", "alipay", "bank", "counter"];

fn payment_habits(inp: &Inputs, opts: &AnalyzeOptions) -> Table {
    let pays = payments_by_account(inp);
    let bills = bill_dates(inp);
    let on = inp.scan.last_date.unwrap_or(NaiveDate::MAX);
    let accs: Vec<usize> = pays.keys().copied().collect();
    let mut count = vec![];
    let mut paid = vec![];
    let mut shares: [Vec<Option<f64>>; 4] = Default::default();
    let mut median_days = vec![];
    let mut gap = vec![];
    let mut remind = vec![];
    for a in &accs {
        let p = &pays[a];
        count.push(Some(p.len() as i64));
        paid.push(Some(p.iter().map(|x| x.1).sum::<i128>()));
        for (k, ch) in CHANNELS.iter().enumerate() {
            shares[k].push(ratio(
                p.iter().filter(|x| x.2 == *ch).count() as i128,
                p.len() as i128,
            ));
        }
        let simple: Vec<(NaiveDate, i128)> = p.iter().map(|x| (x.0, x.1)).collect();
        let is_post = inp.accounts[*a].payment_mode == PaymentMode::Postpaid;
        let (mut d, _, _) = if is_post {
            bill_payment_match(bills.get(a).map_or(&[][..], |v| v), &simple, on)
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

fn usage_ratio(m: &Monthly, a: usize, month: &str) -> Option<f64> {
    let now = m.rows.get(&(a, month.to_string()))?;
    let before = m.rows.get(&(a, prev_month(month, 1)))?;
    ratio(now.0 * before.1 as i128, before.0 * now.1.max(1) as i128)
}

fn risk_facts(
    inp: &Inputs,
    a: usize,
    m: &Monthly,
    on: NaiveDate,
    bills: &[(NaiveDate, Option<i128>)],
    pays: &[(NaiveDate, i128, String)],
) -> (RiskFacts, i128) {
    let before: Vec<&(NaiveDate, i128, String)> = pays.iter().filter(|p| p.0 < on).collect();
    let simple: Vec<(NaiveDate, i128)> = before.iter().map(|p| (p.0, p.1)).collect();
    let (days, overdue, open) = bill_payment_match(bills, &simple, on);
    let f = RiskFacts {
        days_to_pay: days,
        overdue_bills: overdue,
        has_payment: !before.is_empty(),
        counter_only: !before.is_empty() && before.iter().all(|p| p.2 == "counter"),
        usage_ratio: usage_ratio(m, a, &month_of(on)),
        opened_on: Some(inp.accounts[a].opened_on),
    };
    (f, open)
}

fn arrears_risk(inp: &Inputs, opts: &AnalyzeOptions, m: &Monthly, on: Option<NaiveDate>) -> Table {
    let Some(on) = on else { return Table::new() };
    let on = on + Duration::days(1);
    let pays = payments_by_account(inp);
    let bills = bill_dates(inp);
    let accs: Vec<usize> = (0..inp.accounts.len())
        .filter(|a| inp.accounts[*a].payment_mode == PaymentMode::Postpaid)
        .collect();
    let mut pts: [Vec<Option<i64>>; 6] = Default::default();
    let (mut score, mut band, mut open) = (vec![], vec![], vec![]);
    for a in &accs {
        let (f, o) = risk_facts(
            inp,
            *a,
            m,
            on,
            bills.get(a).map_or(&[][..], |v| v),
            pays.get(a).map_or(&[][..], |v| v),
        );
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

/// Scores every postpaid account on each bill date using only what was known
/// before it, then checks whether that bill was paid within GRACE_DAYS.
fn arrears_backtest(inp: &Inputs, m: &Monthly, last: Option<NaiveDate>) -> Table {
    let Some(last) = last else {
        return Table::new();
    };
    let pays = payments_by_account(inp);
    let scorable = |b: &BTreeMap<usize, Vec<(NaiveDate, Option<i128>)>>| {
        b.values()
            .flatten()
            .any(|(bd, _)| (last - *bd).num_days() >= GRACE_DAYS)
    };
    let mut bills = bill_dates(inp);
    if !scorable(&bills) {
        // Runs too recent to have an outcome: fall back to bills on the 1st of each month.
        bills = bill_dates_from(inp, false);
    }
    let mut by_band: BTreeMap<&'static str, (i64, i64, i64)> = BTreeMap::new();
    for (a, bs) in &bills {
        let p = pays.get(a).map_or(&[][..], |v| v);
        for (k, (bd, _)) in bs.iter().enumerate() {
            if (last - *bd).num_days() < GRACE_DAYS {
                continue;
            }
            let (f, _) = risk_facts(inp, *a, m, *bd, &bs[..k], p);
            let s = risk::score(&f, *bd);
            let bad = !p
                .iter()
                .any(|x| x.0 >= *bd && (x.0 - *bd).num_days() <= GRACE_DAYS);
            let e = by_band.entry(s.band).or_default();
            e.0 += 1;
            e.1 += bad as i64;
            e.2 += s.score;
        }
    }
    let all = by_band
        .values()
        .fold((0, 0, 0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2));
    let mut rows: Vec<(String, (i64, i64, i64))> = ["low", "medium", "high"]
        .iter()
        .map(|b| (b.to_string(), by_band.get(b).copied().unwrap_or_default()))
        .collect();
    rows.push(("all".to_string(), all));
    Table::new()
        .with(
            "band",
            Col::Str(rows.iter().map(|r| Some(r.0.clone())).collect()),
        )
        .with(
            "bills_scored",
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

fn usage_warnings(inp: &Inputs, opts: &AnalyzeOptions, days: &[AccountDay], m: &Monthly) -> Table {
    let Some(on) = as_of(inp, opts) else {
        return Table::new();
    };
    let month = month_of(on);
    let month_start = on.with_day(1).expect("day 1");
    let elapsed = (on - month_start).num_days() + 1;
    let dim = days_in_month(on);
    let mut mtd: BTreeMap<usize, i128> = BTreeMap::new();
    for d in days
        .iter()
        .filter(|d| d.date >= month_start && d.date <= on)
    {
        *mtd.entry(d.account).or_default() += d.regs[0].unwrap_or(0) as i128;
    }
    let scale = Decimal::from(10_000);
    let mut rows = Vec::new();
    for (a, e4) in mtd {
        let projected = e4 * dim as i128 / elapsed as i128;
        // Usual: mean of earlier full months (20+ days of data).
        let prior: Vec<i128> = m
            .rows
            .range((a, String::new())..)
            .take_while(|((x, _), _)| *x == a)
            .filter(|((_, mo), v)| *mo < month && v.1 >= 20)
            .map(|(_, v)| v.0)
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
