//! The run report: one self-contained HTML file (inline CSS and SVG, no
//! scripts, no external assets) that lets an operator see at a glance
//! whether a bill run is sound. `meterflow report RUN_DIR`.

mod charts;
mod html;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rust_decimal::Decimal;

use crate::analytics::inputs::{self, load_bills, manifest, rescale};
use crate::analytics::scan::{self, SCALE};
use crate::analytics::table::{Col, Table};
use crate::analytics::AnalyticsError;
use crate::master::{self, PaymentMode};
use crate::privacy::mask_name;
use html::{esc, Page};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{0}")]
    Analytics(#[from] AnalyticsError),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("drawing a chart: {0}")]
    Plot(String),
    #[error("{0}")]
    Invalid(String),
    /// A master data file that exists but cannot be read: a report without
    /// it would show every class unknown and no arrears, so it is an error.
    #[error("master data: {0}")]
    Master(master::RowError),
}

/// Where the report reads from. Only `run_dir` is required: master data is
/// found through the run's manifest, the lake next to the master folder.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    pub run_dir: PathBuf,
    pub out: PathBuf,
    pub master: Option<PathBuf>,
    pub lake: Option<PathBuf>,
    /// An `analyze` output folder: collection and fleet figures are taken
    /// from it instead of scanning the lake (fast on large fleets).
    pub analytics: Option<PathBuf>,
    /// A ledger export (Parquet with `account_id`, `amount`): prepaid balances.
    pub ledger: Option<PathBuf>,
    /// A folder (or file) of alert Parquet files with a `kind` column.
    pub alerts: Option<PathBuf>,
    pub utc_offset_secs: i32,
}

impl ReportOptions {
    pub fn new(run_dir: impl Into<PathBuf>, out: impl Into<PathBuf>) -> ReportOptions {
        ReportOptions {
            run_dir: run_dir.into(),
            out: out.into(),
            master: None,
            lake: None,
            analytics: None,
            ledger: None,
            alerts: None,
            utc_offset_secs: 8 * 3600,
        }
    }
}

/// Writes the report of the bill run in `run_dir` to `out_html`; returns its path.
pub fn write_report(run_dir: &Path, out_html: &Path) -> Result<PathBuf, ReportError> {
    write_report_with(&ReportOptions::new(run_dir, out_html))
}

pub fn write_report_with(opts: &ReportOptions) -> Result<PathBuf, ReportError> {
    let html = render(opts)?;
    // A bare file name has an empty parent, which cannot be fsynced: anchor it at ".".
    let out = match opts.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => opts.out.clone(),
        _ => Path::new(".").join(&opts.out),
    };
    crate::store::atomic::write_file_atomic(&out, html.as_bytes())?;
    Ok(out)
}

fn read_opt(path: &Path) -> Result<Option<Table>, ReportError> {
    if path.exists() {
        Ok(Some(Table::read_parquet(path)?))
    } else {
        Ok(None)
    }
}

/// The master data folder: `--master`, else the folder of the master files
/// named in the run's manifest. `Err(note)` when there is none: the note
/// names the path tried and is shown in every section that needs master
/// data. A `--master` folder without `accounts.csv` is an error (the operator
/// named it).
fn master_dir(
    opts: &ReportOptions,
    m: &serde_json::Value,
) -> Result<Result<PathBuf, String>, ReportError> {
    if let Some(d) = &opts.master {
        let accounts = d.join(master::ACCOUNTS_FILE);
        if !accounts.is_file() {
            return Err(ReportError::Invalid(format!(
                "--master {}: no {} there",
                d.display(),
                master::ACCOUNTS_FILE
            )));
        }
        return Ok(Ok(d.clone()));
    }
    let stored = m["inputs"]["master"]
        .as_array()
        .and_then(|a| a.first())
        .and_then(|x| x["path"].as_str());
    let Some(dir) = stored.and_then(|p| Path::new(p).parent()) else {
        return Ok(Err(
            "Master data not found: the run's manifest names no master files (pass --master DIR)."
                .into(),
        ));
    };
    let accounts = dir.join(master::ACCOUNTS_FILE);
    if accounts.is_file() {
        return Ok(Ok(dir.to_path_buf()));
    }
    let relative = if dir.is_relative() {
        " (the manifest's path, relative to the folder the report runs in)"
    } else {
        " (the manifest's path)"
    };
    Ok(Err(format!(
        "Master data not found: tried {}{relative}; pass --master DIR.",
        accounts.display()
    )))
}

/// The rows of a master file; bad rows are collected for a note.
fn rows<T>(
    loaded: Result<master::Loaded<T>, master::RowError>,
    bad_rows: &mut Vec<master::RowError>,
) -> Result<Vec<T>, ReportError> {
    let l = loaded.map_err(ReportError::Master)?;
    bad_rows.extend(l.errors);
    Ok(l.rows)
}

/// The note shown where master data is missing.
fn no_master_note(why: &str, what: &str) -> String {
    format!("{why} {what} not shown.")
}

fn dec_text(raw: i128, scale: u8) -> String {
    Decimal::from_i128_with_scale(raw, scale as u32).to_string()
}

fn whole(raw: i128, scale: u8) -> u64 {
    (raw / 10i128.pow(scale as u32)).clamp(0, u64::MAX as i128) as u64
}

fn str_col<'a>(t: &'a Table, n: &str) -> Vec<&'a str> {
    match t.col(n) {
        Some(Col::Str(v)) => v.iter().map(|o| o.as_deref().unwrap_or("")).collect(),
        _ => vec![""; t.rows()],
    }
}

fn dec_col(t: &Table, n: &str, want: u8) -> Vec<i128> {
    match t.col(n) {
        Some(Col::Dec(v, s)) => v
            .iter()
            .map(|o| rescale(o.unwrap_or(0), *s, want))
            .collect(),
        _ => vec![0; t.rows()],
    }
}

/// The whole page as a string.
pub fn render(opts: &ReportOptions) -> Result<String, ReportError> {
    let run = &opts.run_dir;
    let m = manifest(run)?;
    let bills = read_opt(&run.join("bills.parquet"))?.unwrap_or_default();
    // Only the columns the tier and TOU sections use: the lines file is the
    // run's largest (about six rows per bill).
    let lines_path = run.join("bill_lines.parquet");
    let lines = if lines_path.exists() {
        Table::read_parquet_columns(
            &lines_path,
            &[
                "tier",
                "tou_period",
                "unit",
                "quantity",
                "amount",
                "is_adjustment",
            ],
        )?
    } else {
        Table::default()
    };
    let exceptions = read_opt(&run.join("exceptions.parquet"))?.unwrap_or_default();
    let master_found = master_dir(opts, &m)?;
    let master = master_found.as_ref().ok();
    // Bad rows are skipped (as the bill run skips them) and counted in a
    // note; a file that cannot be read at all fails the report.
    let mut bad_rows: Vec<master::RowError> = Vec::new();
    let accounts = match master {
        Some(d) => rows(
            master::load_accounts(&d.join(master::ACCOUNTS_FILE)),
            &mut bad_rows,
        )?,
        None => Vec::new(),
    };
    let payments = match master {
        Some(d) if d.join(master::PAYMENTS_FILE).exists() => rows(
            master::load_payments(&d.join(master::PAYMENTS_FILE)),
            &mut bad_rows,
        )?,
        _ => Vec::new(),
    };
    let meters = match master {
        Some(d) => rows(
            master::load_meters(&d.join(master::METERS_FILE)),
            &mut bad_rows,
        )?,
        None => Vec::new(),
    };
    let lake = opts
        .lake
        .clone()
        .or_else(|| master.and_then(|d| d.parent().map(Path::to_path_buf)))
        .filter(|l| l.join("readings").exists());
    let acc_by_id: BTreeMap<&str, &master::Account> = accounts
        .iter()
        .map(|a| (a.account_id.as_str(), a))
        .collect();
    let lake_inp = match (&opts.analytics, &lake) {
        (Some(dir), _) => Some(inputs::Inputs::assemble(
            meters.clone(),
            accounts.clone(),
            Vec::new(),
            crate::analytics::scan_from_analytics(dir)?,
            Vec::new(),
            opts.utc_offset_secs,
        )),
        (None, Some(l)) => {
            let mut inp = inputs::Inputs::assemble(
                meters.clone(),
                accounts.clone(),
                Vec::new(),
                Default::default(),
                Vec::new(),
                opts.utc_offset_secs,
            );
            let lo = inputs::LoadOptions {
                utc_offset_secs: opts.utc_offset_secs,
                ..Default::default()
            };
            inp.scan_lake(l, &lo, &mut |_: &scan::DayBatch<'_>| Ok(()))?;
            Some(inp)
        }
        (None, None) => None,
    };

    let mut p = Page::new(&format!(
        "Run report {}",
        m["period"].as_str().unwrap_or("")
    ));
    // Summary.
    let counts = &m["counts"];
    let sums = &m["sums"];
    p.h2("Summary");
    p.kv(&[
        ("Run id", m["run_id"].as_str().unwrap_or("").to_string()),
        (
            "Period",
            format!(
                "{} .. {} (exclusive)",
                m["period_start"].as_str().unwrap_or(""),
                m["period_end_exclusive"].as_str().unwrap_or("")
            ),
        ),
        ("Revision", m["revision"].to_string()),
        ("Accounts", counts["accounts"].to_string()),
        ("Bills", counts["bills"].to_string()),
        ("Estimated bills", counts["estimated_bills"].to_string()),
        ("Exceptions", counts["exceptions"].to_string()),
        (
            "Total kWh",
            sums["total_kwh"].as_str().unwrap_or("").to_string(),
        ),
        (
            "Total amount (CNY)",
            sums["total_amount"].as_str().unwrap_or("").to_string(),
        ),
        ("Readings used", counts["readings"].to_string()),
        (
            "Created by",
            m["created_by"].as_str().unwrap_or("").to_string(),
        ),
        (
            "Master data",
            match master {
                Some(d) => d.display().to_string(),
                None => "not found".into(),
            },
        ),
    ]);
    match &master_found {
        Err(why) => p.note(why),
        Ok(_) if !bad_rows.is_empty() => p.note(&format!(
            "{} master data rows could not be read and are left out (first: {}).",
            bad_rows.len(),
            bad_rows[0]
        )),
        Ok(_) => {}
    }

    // Consumption distribution.
    let kwh = dec_col(&bills, "kwh", SCALE);
    p.h2("Consumption distribution");
    if kwh.is_empty() {
        p.note("No bills in this run.");
    } else {
        let mut sorted: Vec<u64> = kwh.iter().map(|k| whole(*k, SCALE)).collect();
        sorted.sort();
        let p95 = sorted[(sorted.len() * 95 / 100).min(sorted.len() - 1)].max(10);
        let width = (p95 / 10).max(1);
        let mut counts = vec![0u64; 11];
        let mut labels: Vec<String> = (0..10).map(|i| format!("{}", i as u64 * width)).collect();
        labels.push(format!(">={}", 10 * width));
        for v in &sorted {
            counts[((v / width) as usize).min(10)] += 1;
        }
        p.svg(&charts::bars(
            "Bills by kWh billed (bucket lower bound)",
            "bills",
            &labels,
            &counts,
        )?);
        let median = sorted[sorted.len() / 2];
        p.kv(&[
            ("Median kWh per bill", median.to_string()),
            ("95th percentile", p95.to_string()),
            ("Largest", sorted[sorted.len() - 1].to_string()),
        ]);
    }

    // Tiers and TOU.
    let tier_col = match lines.col("tier") {
        Some(Col::Int(v)) => v.clone(),
        _ => vec![None; lines.rows()],
    };
    let tou = str_col(&lines, "tou_period");
    let unit = str_col(&lines, "unit");
    let qty = dec_col(&lines, "quantity", SCALE);
    let amount = dec_col(&lines, "amount", 2);
    let adj = match lines.col("is_adjustment") {
        Some(Col::Bool(v)) => v.iter().map(|b| b.unwrap_or(false)).collect(),
        _ => vec![false; lines.rows()],
    };
    let mut tiers: BTreeMap<i64, (i128, i128)> = BTreeMap::new();
    let mut tous: BTreeMap<String, i128> = BTreeMap::new();
    for i in 0..lines.rows() {
        if adj[i] || !unit[i].eq_ignore_ascii_case("kwh") {
            continue;
        }
        if let Some(t) = tier_col[i] {
            let e = tiers.entry(t).or_default();
            e.0 += qty[i];
            e.1 += amount[i];
        }
        if !tou[i].is_empty() {
            *tous.entry(tou[i].to_string()).or_default() += qty[i];
        }
    }
    p.h2("Tier distribution");
    if tiers.is_empty() {
        p.note("No tiered energy lines in this run.");
    } else {
        let labels: Vec<String> = tiers.keys().map(|t| format!("tier {t}")).collect();
        p.svg(&charts::bars(
            "Energy by tier",
            "kWh",
            &labels,
            &tiers
                .values()
                .map(|v| whole(v.0, SCALE))
                .collect::<Vec<_>>(),
        )?);
        let total: i128 = tiers.values().map(|v| v.0).sum();
        p.table(
            &["tier", "kWh", "share", "amount (CNY)"],
            tiers
                .iter()
                .map(|(t, v)| {
                    vec![
                        t.to_string(),
                        dec_text(v.0, SCALE),
                        permille(v.0, total),
                        dec_text(v.1, 2),
                    ]
                })
                .collect(),
        );
    }
    p.h2("Time-of-use shares");
    if tous.is_empty() {
        if let Some(inp) = &lake_inp {
            // No TOU bill lines (flat or tiered tariffs): the meters' tariff registers still tell the shares.
            let names = ["sharp (T1)", "peak (T2)", "flat (T3)", "valley (T4)"];
            for (r, n) in names.iter().enumerate() {
                *tous.entry(n.to_string()).or_default() += inp.scan.fleet_tou[r];
            }
            p.note("No time-of-use bill lines in this run: shares below are from the meters' tariff registers in the lake, all days scanned.");
        }
    }
    if tous.is_empty() {
        p.note("No time-of-use energy lines in this run.");
    } else {
        let total: i128 = tous.values().sum();
        let labels: Vec<String> = tous.keys().cloned().collect();
        p.svg(&charts::bars(
            "Energy by time-of-use period",
            "kWh",
            &labels,
            &tous.values().map(|v| whole(*v, SCALE)).collect::<Vec<_>>(),
        )?);
        p.table(
            &["period", "kWh", "share"],
            tous.iter()
                .map(|(k, v)| vec![esc(k), dec_text(*v, SCALE), permille(*v, total)])
                .collect(),
        );
    }

    // Bills by class.
    let acc = str_col(&bills, "account_id");
    let total = dec_col(&bills, "total", 2);
    p.h2("Bills by customer class");
    let missing_master = master_found.as_ref().err();
    let mut by_class: BTreeMap<String, (u64, i128, i128)> = BTreeMap::new();
    for i in 0..bills.rows() {
        let class = acc_by_id.get(acc[i]).map_or("unknown".to_string(), |a| {
            a.customer_class.as_str().to_string()
        });
        let e = by_class.entry(class).or_default();
        e.0 += 1;
        e.1 += kwh[i];
        e.2 += total[i];
    }
    if let Some(why) = missing_master {
        p.note(&no_master_note(why, "Customer classes are"));
    } else if by_class.is_empty() {
        p.note("No bills.");
    } else {
        let labels: Vec<String> = by_class.keys().cloned().collect();
        p.svg(&charts::bars(
            "Billed amount by customer class",
            "CNY",
            &labels,
            &by_class.values().map(|v| whole(v.2, 2)).collect::<Vec<_>>(),
        )?);
        p.table(
            &[
                "class",
                "bills",
                "kWh",
                "amount (CNY)",
                "average bill (CNY)",
            ],
            by_class
                .iter()
                .map(|(k, v)| {
                    vec![
                        esc(k),
                        v.0.to_string(),
                        dec_text(v.1, SCALE),
                        dec_text(v.2, 2),
                        dec_text(v.2 / v.0.max(1) as i128, 2),
                    ]
                })
                .collect(),
        );
    }

    movers(&mut p, opts, &m, &acc, &kwh)?;

    // Estimated and exceptions.
    p.h2("Estimated bills and exceptions");
    let est = match bills.col("estimated") {
        Some(Col::Bool(v)) => v.iter().filter(|b| b.unwrap_or(false)).count(),
        _ => 0,
    };
    let flags = str_col(&bills, "flags");
    let mut flag_counts: BTreeMap<&str, u64> = BTreeMap::new();
    for f in &flags {
        for x in f.split(',').filter(|x| !x.is_empty()) {
            *flag_counts.entry(x).or_default() += 1;
        }
    }
    p.kv(&[
        ("Estimated bills", est.to_string()),
        ("Exceptions", exceptions.rows().to_string()),
    ]);
    if !flag_counts.is_empty() {
        p.table(
            &["bill flag", "bills"],
            flag_counts
                .iter()
                .map(|(k, v)| vec![esc(k), v.to_string()])
                .collect(),
        );
    }
    let codes = str_col(&exceptions, "code");
    let details = str_col(&exceptions, "detail");
    let mut by_code: BTreeMap<&str, (u64, &str)> = BTreeMap::new();
    for i in 0..exceptions.rows() {
        let e = by_code.entry(codes[i]).or_insert((0, details[i]));
        e.0 += 1;
    }
    if !by_code.is_empty() {
        let labels: Vec<String> = by_code.keys().map(|s| s.to_string()).collect();
        p.svg(&charts::bars(
            "Exceptions by reason",
            "exceptions",
            &labels,
            &by_code.values().map(|v| v.0).collect::<Vec<_>>(),
        )?);
        p.table(
            &["reason", "count", "example"],
            by_code
                .iter()
                .map(|(k, v)| vec![esc(k), v.0.to_string(), esc(v.1)])
                .collect(),
        );
    }

    // Collection from the lake.
    p.h2("Collection success");
    match &lake_inp {
        Some(inp) => {
            let t = crate::analytics::datasets_collection(inp);
            let coll = str_col(&t, "collector");
            let bus = str_col(&t, "bus");
            let cols: Vec<String> = t.columns.iter().map(|(n, _)| n.clone()).collect();
            let whole_rows: Vec<usize> = (0..t.rows()).filter(|i| bus[*i].is_empty()).collect();
            // Every collector, then the buses collecting worst (a long tail of healthy buses says nothing).
            let mut bus_rows: Vec<usize> = (0..t.rows()).filter(|i| !bus[*i].is_empty()).collect();
            if let Some(Col::Ratio(sr)) = t.col("success_ratio") {
                bus_rows.sort_by(|a, b| sr[*a].unwrap_or(0.0).total_cmp(&sr[*b].unwrap_or(0.0)).then(a.cmp(b)));
            }
            let shown = MAX_BUS_ROWS.min(bus_rows.len());
            let rows: Vec<Vec<String>> = whole_rows
                .iter()
                .chain(&bus_rows[..shown])
                .map(|i| t.columns.iter().map(|(_, c)| esc(&c.text(*i))).collect())
                .collect();
            if bus_rows.len() > shown {
                p.note(&format!("{} buses; the table shows the {shown} with the lowest success ratio.", bus_rows.len()));
            }
            if let Some(Col::Ratio(sr)) = t.col("success_ratio") {
                let labels: Vec<String> = whole_rows.iter().map(|i| coll[*i].to_string()).collect();
                let vals: Vec<u64> = whole_rows.iter().map(|i| (sr[*i].unwrap_or(0.0) * 1000.0).round() as u64).collect();
                p.svg(&charts::bars("Readings with quality ok per collector (per mille)", "per mille", &labels, &vals)?);
            }
            p.table(&cols.iter().map(String::as_str).collect::<Vec<_>>(), rows);
            let gaps = inp.scan.comm_loss_events;
            p.kv(&[
                ("Readings in lake", inp.scan.readings.to_string()),
                ("Readings of unknown meters", inp.scan.unknown_meter_readings.to_string()),
                ("Communication gaps (meters x stretches)", gaps.to_string()),
                ("Backwards register steps", inp.scan.backwards_pairs.to_string()),
            ]);
            daily_chart(&mut p, inp)?;
        }
        None => p.note("No readings lake found next to the master data (pass --lake): collection figures not shown."),
    }

    prepaid(&mut p, opts, &accounts, missing_master)?;
    arrears(
        &mut p,
        missing_master,
        &m,
        &acc,
        &total,
        &acc_by_id,
        &payments,
        opts.utc_offset_secs,
    );
    Ok(p.finish())
}

/// Bus rows shown in the collection table.
const MAX_BUS_ROWS: usize = 15;

fn permille(part: i128, total: i128) -> String {
    if total == 0 {
        return "-".into();
    }
    let pm = part * 1000 / total;
    format!("{}.{}%", pm / 10, pm % 10)
}

fn daily_chart(p: &mut Page, inp: &inputs::Inputs) -> Result<(), ReportError> {
    let per_day = &inp.scan.fleet_daily;
    if per_day.len() >= 2 {
        let labels: Vec<String> = per_day
            .keys()
            .map(|d| d.format("%m-%d").to_string())
            .collect();
        let vals: Vec<u64> = per_day.values().map(|v| whole(*v, SCALE)).collect();
        p.svg(&charts::line(
            "Fleet consumption per day (from the lake)",
            "kWh",
            &labels,
            &vals,
        )?);
    }
    Ok(())
}

/// Month-over-month and year-over-year change against earlier runs found next to this one.
fn movers(
    p: &mut Page,
    opts: &ReportOptions,
    m: &serde_json::Value,
    acc: &[&str],
    kwh: &[i128],
) -> Result<(), ReportError> {
    p.h2("Change against earlier runs");
    let start = m["period_start"]
        .as_str()
        .and_then(|s| chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").ok());
    let parent = opts.run_dir.parent().map(Path::to_path_buf);
    let (Some(start), Some(parent)) = (start, parent) else {
        p.note("Run period unknown.");
        return Ok(());
    };
    let mut found = false;
    for (label, months) in [("month-over-month", 1), ("year-over-year", 12)] {
        let want = start
            .checked_sub_months(chrono::Months::new(months))
            .map(|d| d.to_string());
        let prev = inputs::run_dirs(&parent).into_iter().find(|d| {
            d != &opts.run_dir
                && manifest(d)
                    .ok()
                    .and_then(|x| x["period_start"].as_str().map(str::to_string))
                    == want
        });
        let Some(prev) = prev else { continue };
        found = true;
        let before: BTreeMap<String, i128> = load_bills(&prev)?
            .into_iter()
            .map(|b| (b.account_id, b.kwh_e4))
            .collect();
        let now_total: i128 = kwh.iter().sum();
        let before_total: i128 = before.values().sum();
        p.kv(&[(
            label,
            format!(
                "{} kWh now, {} kWh before ({})",
                dec_text(now_total, SCALE),
                dec_text(before_total, SCALE),
                permille(now_total - before_total, before_total)
            ),
        )]);
        let mut moves: Vec<(i128, &str, i128, i128)> = acc
            .iter()
            .zip(kwh)
            .filter_map(|(a, k)| before.get(*a).map(|b| (*k - *b, *a, *b, *k)))
            .collect();
        moves.sort_by_key(|x| std::cmp::Reverse(x.0.abs()));
        p.table(
            &["account", "kWh before", "kWh now", "change"],
            moves
                .iter()
                .take(10)
                .map(|x| {
                    vec![
                        esc(x.1),
                        dec_text(x.2, SCALE),
                        dec_text(x.3, SCALE),
                        permille(x.0, x.2),
                    ]
                })
                .collect(),
        );
    }
    if !found {
        p.note("No earlier run (previous month or same month last year) found next to this run directory.");
    }
    Ok(())
}

fn prepaid(
    p: &mut Page,
    opts: &ReportOptions,
    accounts: &[master::Account],
    missing_master: Option<&String>,
) -> Result<(), ReportError> {
    p.h2("Prepaid balances and alerts");
    match missing_master {
        Some(why) => p.note(&no_master_note(why, "The number of prepaid accounts is")),
        None => {
            let prepaid_n = accounts
                .iter()
                .filter(|a| a.payment_mode == PaymentMode::Prepaid)
                .count();
            p.kv(&[("Prepaid accounts", prepaid_n.to_string())]);
        }
    }
    let ledger = opts
        .ledger
        .clone()
        .or_else(|| Some(opts.run_dir.join("ledger.parquet")))
        .filter(|l| l.exists());
    match ledger {
        Some(l) => {
            let t = Table::read_parquet(&l)?;
            let acc = str_col(&t, "account_id");
            let amt = dec_col(&t, "amount", 2);
            let mut bal: BTreeMap<&str, i128> = BTreeMap::new();
            for i in 0..t.rows() {
                *bal.entry(acc[i]).or_default() += amt[i];
            }
            let bands = [("below 0", i128::MIN, 0), ("0 to 10", 0, 1000), ("10 to 50", 1000, 5000), ("50 to 200", 5000, 20000), ("200 and more", 20000, i128::MAX)];
            let counts: Vec<u64> = bands.iter().map(|b| bal.values().filter(|v| **v >= b.1 && **v < b.2).count() as u64).collect();
            let labels: Vec<String> = bands.iter().map(|b| b.0.to_string()).collect();
            p.svg(&charts::bars("Accounts by prepaid balance (CNY)", "accounts", &labels, &counts)?);
            let sum: i128 = bal.values().sum();
            p.kv(&[("Ledger", l.display().to_string()), ("Accounts in ledger", bal.len().to_string()), ("Sum of balances (CNY)", dec_text(sum, 2))]);
        }
        None => p.note("No ledger export found (pass --ledger FILE, a Parquet export with account_id and amount): balances not shown."),
    }
    let alert_files: Vec<PathBuf> = match &opts.alerts {
        Some(a) if a.is_dir() => walk_parquet(a),
        Some(a) if a.exists() => vec![a.clone()],
        _ => Vec::new(),
    };
    if alert_files.is_empty() {
        p.note("No alerts dataset given (pass --alerts DIR): alerts not shown.");
        return Ok(());
    }
    let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
    for f in alert_files {
        let t = Table::read_parquet(&f)?;
        for k in str_col(&t, "kind") {
            *by_kind.entry(k.to_string()).or_default() += 1;
        }
    }
    p.table(
        &["alert kind", "alerts"],
        by_kind
            .iter()
            .map(|(k, v)| vec![esc(k), v.to_string()])
            .collect(),
    );
    Ok(())
}

fn walk_parquet(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name.starts_with('_') {
                continue;
            }
            if path.is_dir() {
                out.extend(walk_parquet(&path));
            } else if name.ends_with(".parquet") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

#[allow(clippy::too_many_arguments)]
fn arrears(
    p: &mut Page,
    missing_master: Option<&String>,
    m: &serde_json::Value,
    acc: &[&str],
    total: &[i128],
    acc_by_id: &BTreeMap<&str, &master::Account>,
    payments: &[master::Payment],
    off: i32,
) {
    p.h2("Arrears");
    if let Some(why) = missing_master {
        // Which bills are postpaid and what was paid are master data.
        p.note(&no_master_note(why, "Arrears are"));
        return;
    }
    let Some(bill_date) = m["period_end_exclusive"]
        .as_str()
        .and_then(|s| chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").ok())
    else {
        return;
    };
    let mut paid: BTreeMap<&str, i128> = BTreeMap::new();
    for pay in payments {
        if scan::local_date(pay.paid_at.timestamp_millis(), off) >= bill_date {
            *paid.entry(pay.account_id.as_str()).or_default() +=
                rescale(pay.amount.mantissa(), pay.amount.scale() as u8, 2);
        }
    }
    let mut open: Vec<(i128, &str)> = Vec::new();
    for i in 0..acc.len() {
        let post = acc_by_id
            .get(acc[i])
            .is_some_and(|a| a.payment_mode == PaymentMode::Postpaid);
        if post {
            let o = total[i] - paid.get(acc[i]).copied().unwrap_or(0);
            if o > 0 {
                open.push((o, acc[i]));
            }
        }
    }
    open.sort_by_key(|x| std::cmp::Reverse(x.0));
    let sum: i128 = open.iter().map(|x| x.0).sum();
    p.kv(&[
        (
            "Postpaid bills not yet paid in full",
            open.len().to_string(),
        ),
        ("Open amount (CNY)", dec_text(sum, 2)),
        ("Payments counted", format!("made on or after {bill_date}")),
    ]);
    if !open.is_empty() {
        p.table(
            &["account", "name (masked)", "open (CNY)"],
            open.iter()
                .take(10)
                .map(|(o, a)| {
                    vec![
                        esc(a),
                        esc(&acc_by_id
                            .get(a)
                            .map(|x| mask_name(&x.name))
                            .unwrap_or_default()),
                        dec_text(*o, 2),
                    ]
                })
                .collect(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACCOUNTS: &str = "account_id,name,phone,id_number,address,district,age_band,occupation,gender,customer_class,tariff_id,payment_mode,contracted_kva,household_size,opened_on\n\
A1,张三,13800000000,110101199001011234,北京市,东城区,30-44,worker,male,residential,t1,postpaid,0,2,2015-01-01\n\
A2,李四,13800000001,110101199001011235,北京市,东城区,30-44,worker,male,commercial,t1,prepaid,0,2,2015-01-01\n";
    const METERS: &str = "meter_id,account_id,meter_type,ct_ratio,pt_ratio,register_digits,installed_on,removed_on,feeder\n\
M1,A1,residential_1p,1,1,6,2015-01-01,,F000\n\
M2,A2,residential_1p,1,1,6,2015-01-01,,F000\n";

    /// A run directory with two bills whose manifest names `master_path`.
    fn run_dir(root: &Path, master_path: &str) -> PathBuf {
        let run = root.join("runs/2026-10");
        std::fs::create_dir_all(&run).unwrap();
        let manifest = serde_json::json!({
            "run_id": "r1", "period": "2026-10", "period_start": "2026-10-01",
            "period_end_exclusive": "2026-11-01", "revision": 0,
            "counts": {"bills": 2}, "sums": {},
            "inputs": {"master": [{"path": master_path}]},
        });
        std::fs::write(run.join("manifest.json"), manifest.to_string()).unwrap();
        Table::new()
            .with(
                "account_id",
                Col::Str(vec![Some("A1".into()), Some("A2".into())]),
            )
            .with(
                "kwh",
                Col::Dec(vec![Some(1_000_000), Some(2_000_000)], SCALE),
            )
            .with("total", Col::Dec(vec![Some(5_000), Some(9_000)], 2))
            .write_parquet(&run.join("bills.parquet"))
            .unwrap();
        run
    }

    fn master(root: &Path) -> PathBuf {
        let d = root.join("master");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(master::ACCOUNTS_FILE), ACCOUNTS).unwrap();
        std::fs::write(d.join(master::METERS_FILE), METERS).unwrap();
        d
    }

    #[test]
    fn master_data_from_the_manifest_fills_classes_and_arrears() {
        let dir = tempfile::tempdir().unwrap();
        let m = master(dir.path());
        let run = run_dir(dir.path(), m.join("meters.csv").to_str().unwrap());
        let html = render(&ReportOptions::new(&run, dir.path().join("r.html"))).unwrap();
        assert!(html.contains("<td>commercial</td>") && html.contains("<td>residential</td>"));
        assert!(!html.contains("<td>unknown</td>"));
        assert!(
            html.contains("<td>Open amount (CNY)</td><td>50.00</td>"),
            "{html}"
        );
        assert!(!html.contains("Master data not found"));
    }

    #[test]
    fn missing_master_data_is_a_visible_note_naming_the_path_tried() {
        let dir = tempfile::tempdir().unwrap();
        let run = run_dir(dir.path(), "no/such/master/meters.csv");
        let html = render(&ReportOptions::new(&run, dir.path().join("r.html"))).unwrap();
        let tried = "Master data not found: tried no/such/master/accounts.csv";
        // Summary, classes, prepaid and arrears each say so.
        assert_eq!(html.matches(tried).count(), 4, "{html}");
        assert!(html.contains("Customer classes are not shown."));
        assert!(html.contains("Arrears are not shown."));
        assert!(!html.contains("<td>unknown</td>"));
        assert!(!html.contains("Open amount"));
        assert!(!html.contains("<td>Prepaid accounts</td>"));
    }

    #[test]
    fn an_unreadable_master_file_fails_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let m = master(dir.path());
        std::fs::remove_file(m.join(master::METERS_FILE)).unwrap();
        let run = run_dir(dir.path(), "elsewhere/meters.csv");
        let mut opts = ReportOptions::new(&run, dir.path().join("r.html"));
        opts.master = Some(m.clone());
        let e = render(&opts).unwrap_err().to_string();
        assert!(
            e.contains(&m.join(master::METERS_FILE).display().to_string()),
            "{e}"
        );
        // A --master folder without accounts.csv is refused, not ignored.
        opts.master = Some(dir.path().join("nothing"));
        let e = render(&opts).unwrap_err().to_string();
        assert!(e.contains("--master") && e.contains("accounts.csv"), "{e}");
    }

    #[test]
    fn the_ledger_path_is_escaped_once() {
        let dir = tempfile::tempdir().unwrap();
        let m = master(dir.path());
        let run = run_dir(dir.path(), m.join("meters.csv").to_str().unwrap());
        let ledger = dir.path().join("a&b").join("ledger.parquet");
        std::fs::create_dir_all(ledger.parent().unwrap()).unwrap();
        Table::new()
            .with("account_id", Col::Str(vec![Some("A2".into())]))
            .with("amount", Col::Dec(vec![Some(1234)], 2))
            .write_parquet(&ledger)
            .unwrap();
        let mut opts = ReportOptions::new(&run, dir.path().join("r.html"));
        opts.ledger = Some(ledger);
        let html = render(&opts).unwrap();
        assert!(html.contains("a&amp;b"), "{html}");
        assert!(!html.contains("&amp;amp;"));
    }
}
