//! Analytics, privacy and the run report, end to end on a small simulated
//! fleet: datasets are written, no raw personal value leaks into data-team
//! files, and the report renders in headless Chromium.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use meterflow::analytics::table::parquet_cells_as_text;
use meterflow::analytics::{data_team_files, Col, Table};

use super::common::bin;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(args: &[&str], envs: &[(&str, &str)]) -> String {
    let mut c = Command::new(bin());
    c.args(args).env("RUST_LOG", "warn");
    for (k, v) in envs {
        c.env(k, v);
    }
    let out = c.output().expect("meterflow runs");
    crate::common::stdout_of(&out, format_args!("meterflow {args:?}"))
}

/// A 40-meter fleet over two months with 15-minute intervals, built once.
fn fleet() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().to_str().unwrap().to_string();
        run(
            &[
                "sim",
                "fleet",
                "--meters",
                "40",
                "--days",
                "61",
                "--start",
                "2026-09-01",
                "--interval",
                "--out",
                &p,
            ],
            &[],
        );
        d
    })
    .path()
}

/// Bill runs for September and October next to each other.
fn runs() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let lake = fleet().to_str().unwrap();
        let master = fleet().join("master");
        let tariffs = root().join("tariffs");
        for period in ["2026-09", "2026-10"] {
            let out = d.path().join(period);
            run(
                &[
                    "bill",
                    "--lake",
                    lake,
                    "--master",
                    master.to_str().unwrap(),
                    "--tariffs",
                    tariffs.to_str().unwrap(),
                    "--period",
                    period,
                    "--out",
                    out.to_str().unwrap(),
                ],
                &[],
            );
        }
        d
    })
    .path()
}

const SECRET: &str = "a-test-secret-of-enough-length";

fn analyze(out: &Path, extra: &[&str]) {
    let lake = fleet().to_str().unwrap().to_string();
    let master = fleet().join("master").to_str().unwrap().to_string();
    let runs = runs().to_str().unwrap().to_string();
    let mut args = vec![
        "analyze",
        "--lake",
        &lake,
        "--master",
        &master,
        "--runs",
        &runs,
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(&args, &[("METERFLOW_PSEUDONYM_SECRET", SECRET)]);
}

fn rows(dir: &Path, name: &str) -> usize {
    Table::read_parquet(&dir.join(format!("{name}.parquet")))
        .unwrap()
        .rows()
}

#[test]
fn analyze_writes_every_dataset_for_a_small_fleet() {
    let out = tempfile::tempdir().unwrap();
    analyze(out.path(), &[]);
    for name in [
        "accounts",
        "daily_usage",
        "peak_periods",
        "usage_habits",
        "history_change",
        "segment_change",
        "payment_habits",
        "arrears_risk",
        "arrears_backtest",
        "collection",
    ] {
        assert!(rows(out.path(), name) > 0, "{name} is empty");
    }
    for name in ["outage_events", "feeder_events", "usage_warnings"] {
        assert!(
            out.path().join(format!("{name}.parquet")).exists(),
            "{name} missing"
        );
    }
    assert!(
        !out.path().join("accounts.pii.parquet").exists(),
        "raw data written without --pii"
    );
    // Two months of data: October has a month-over-month change.
    let h = Table::read_parquet(&out.path().join("history_change.parquet")).unwrap();
    let Some(Col::Ratio(mom)) = h.col("mom_change_pct") else {
        panic!("no mom_change_pct")
    };
    assert!(mom.iter().any(Option::is_some));
    // Peak hours: each group marks exactly three.
    let p = Table::read_parquet(&out.path().join("peak_periods.parquet")).unwrap();
    let Some(Col::Bool(peak)) = p.col("is_peak_hour") else {
        panic!("no is_peak_hour")
    };
    assert_eq!(
        peak.iter().filter(|b| **b == Some(true)).count() * 8,
        p.rows()
    );
    // The October holidays of tariffs/calendars/cn-holidays.toml are a day type.
    let Some(Col::Str(dt)) = p.col("day_type") else {
        panic!("no day_type")
    };
    for t in ["weekday", "weekend", "holiday"] {
        assert!(dt.iter().any(|d| d.as_deref() == Some(t)), "no {t} rows");
    }
    // Risk points add up to the score.
    let r = Table::read_parquet(&out.path().join("arrears_risk.parquet")).unwrap();
    let int = |n: &str| match r.col(n) {
        Some(Col::Int(v)) => v.clone(),
        _ => panic!("no {n}"),
    };
    let score = int("score");
    let parts: Vec<Vec<Option<i64>>> = meterflow::analytics::risk::FACTORS
        .iter()
        .map(|f| int(f))
        .collect();
    for i in 0..r.rows() {
        assert_eq!(score[i], Some(parts.iter().map(|p| p[i].unwrap()).sum()));
    }
}

/// Every raw personal value of the master data.
fn raw_personal_values() -> BTreeSet<String> {
    let accounts = meterflow::master::load_accounts(&fleet().join("master/accounts.csv"))
        .unwrap()
        .rows;
    let mut set = BTreeSet::new();
    for a in accounts {
        for v in [a.name, a.phone, a.id_number, a.address] {
            if !v.trim().is_empty() {
                set.insert(v);
            }
        }
    }
    set
}

fn leaks(files: &[PathBuf], raw: &BTreeSet<String>) -> Vec<String> {
    let mut found = Vec::new();
    for f in files {
        for (col, cell) in parquet_cells_as_text(f).unwrap() {
            for r in raw {
                if cell.contains(r.as_str()) {
                    found.push(format!("{}: column {col}: {cell}", f.display()));
                }
            }
        }
    }
    found
}

#[test]
fn no_raw_personal_value_appears_in_data_team_outputs() {
    let out = tempfile::tempdir().unwrap();
    analyze(out.path(), &["--pseudonymize", "--pii"]);
    let raw = raw_personal_values();
    assert!(raw.len() > 100, "the fleet has personal data to look for");
    let files = data_team_files(out.path()).unwrap();
    assert!(files.len() >= 10);
    let found = leaks(&files, &raw);
    assert!(
        found.is_empty(),
        "raw personal data in data-team files:\n{}",
        found.join("\n")
    );
    // The scan does find raw values where they are allowed: the --pii file.
    let pii = out.path().join("accounts.pii.parquet");
    assert!(
        !leaks(&[pii], &raw).is_empty(),
        "the scan would not notice a leak"
    );
    // Pseudonymized: no account id either.
    let ids: BTreeSet<String> =
        meterflow::master::load_accounts(&fleet().join("master/accounts.csv"))
            .unwrap()
            .rows
            .into_iter()
            .map(|a| a.account_id)
            .collect();
    let found = leaks(&files, &ids);
    assert!(
        found.is_empty(),
        "account ids left after --pseudonymize:\n{}",
        found.iter().take(5).cloned().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn pseudonymize_without_a_secret_is_refused() {
    let out = tempfile::tempdir().unwrap();
    let o = Command::new(bin())
        .args([
            "analyze",
            "--lake",
            fleet().to_str().unwrap(),
            "--master",
            fleet().join("master").to_str().unwrap(),
        ])
        .args(["--out", out.path().to_str().unwrap(), "--pseudonymize"])
        .env_remove("METERFLOW_PSEUDONYM_SECRET")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("METERFLOW_PSEUDONYM_SECRET"));
    assert!(!out.path().join("accounts.parquet").exists());
}

#[test]
fn queries_answer_usage_bills_and_payments_as_json() {
    let lake = fleet().to_str().unwrap();
    let master = fleet().join("master");
    let m = master.to_str().unwrap();
    let usage = run(
        &[
            "query",
            "usage",
            "--account",
            "A000000001",
            "--lake",
            lake,
            "--master",
            m,
            "--monthly",
            "--json",
        ],
        &[],
    );
    let v: serde_json::Value = serde_json::from_str(&usage).unwrap();
    assert_eq!(
        v.as_array().unwrap().len(),
        2,
        "September and October: {usage}"
    );
    let bills = run(
        &[
            "query",
            "bills",
            "--account",
            "A000000001",
            "--runs",
            runs().to_str().unwrap(),
            "--json",
        ],
        &[],
    );
    let v: serde_json::Value = serde_json::from_str(&bills).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2, "{bills}");
    let table = run(
        &[
            "query",
            "payments",
            "--account",
            "A000000001",
            "--master",
            m,
        ],
        &[],
    );
    assert!(table.starts_with("paid_at"), "{table}");
}

fn report(run_dir: &Path, out: &Path) -> String {
    run(
        &[
            "report",
            run_dir.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    std::fs::read_to_string(out).unwrap()
}

#[test]
fn report_is_one_self_contained_html_file() {
    let dir = tempfile::tempdir().unwrap();
    let html = report(&runs().join("2026-10"), &dir.path().join("report.html"));
    assert!(html.starts_with("<!DOCTYPE html>"));
    let again = report(&runs().join("2026-10"), &dir.path().join("again.html"));
    assert!(html == again, "the same run gives the same bytes");
    assert!(html.matches("<svg").count() >= 4, "charts inline");
    for external in [
        "<script",
        "src=\"http",
        "href=\"http",
        "<link",
        "@import",
        "url(",
    ] {
        assert!(!html.contains(external), "report references {external}");
    }
    for section in [
        "Consumption distribution",
        "Tier distribution",
        "Time-of-use shares",
        "Bills by customer class",
        "Collection success",
        "Arrears",
    ] {
        assert!(html.contains(section), "missing section {section}");
    }
    assert!(
        html.contains("month-over-month"),
        "September run found next to October"
    );
    // No raw personal data in the report either.
    let found: Vec<String> = raw_personal_values()
        .into_iter()
        .filter(|r| html.contains(r.as_str()))
        .collect();
    assert!(
        found.is_empty(),
        "raw personal values in the report: {found:?}"
    );
}

/// Distinct RGB colours of a PNG, decoded with python3's zlib (stdlib only).
fn png_colours(png: &Path) -> Option<usize> {
    let script = r#"
import sys, zlib, struct
d = open(sys.argv[1], 'rb').read()
assert d[:8] == b'\x89PNG\r\n\x1a\n'
i, idat, w, h, ct = 8, b'', 0, 0, 0
while i < len(d):
    n = struct.unpack('>I', d[i:i+4])[0]; t = d[i+4:i+8]; c = d[i+8:i+8+n]
    if t == b'IHDR': w, h, bd, ct = struct.unpack('>IIBB', c[:10])
    if t == b'IDAT': idat += c
    i += 12 + n
bpp = {2: 3, 6: 4}[ct]
raw = zlib.decompress(idat); stride = w * bpp
prev = bytearray(stride); cols = set(); p = 0
for y in range(h):
    f = raw[p]; line = bytearray(raw[p+1:p+1+stride]); p += 1 + stride
    for x in range(stride):
        a = line[x-bpp] if x >= bpp else 0; b = prev[x]; c = prev[x-bpp] if x >= bpp else 0
        if f == 1: line[x] = (line[x] + a) & 255
        elif f == 2: line[x] = (line[x] + b) & 255
        elif f == 3: line[x] = (line[x] + (a + b) // 2) & 255
        elif f == 4:
            pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
            pr = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            line[x] = (line[x] + pr) & 255
    if y % 4 == 0:
        for x in range(0, stride, bpp * 2): cols.add(bytes(line[x:x+3]))
    prev = line
print(len(cols))
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(png)
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

#[test]
fn report_renders_in_headless_chromium_without_console_errors() {
    let chromium = Path::new("/usr/bin/chromium");
    if !chromium.exists() {
        panic!("chromium missing: run scripts/install-deps.sh");
    }
    let dir = tempfile::tempdir().unwrap();
    let html_path = dir.path().join("report.html");
    report(&runs().join("2026-10"), &html_path);
    let png = dir.path().join("shot.png");
    let profile = tempfile::tempdir().unwrap();
    let common = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1280,2000",
    ];
    let url = format!("file://{}", html_path.display());
    let shot = Command::new(chromium)
        .args(common)
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--screenshot={}", png.display()))
        .arg(&url)
        .output()
        .expect("chromium runs");
    let stderr = String::from_utf8_lossy(&shot.stderr);
    assert!(shot.status.success(), "chromium failed: {stderr}");
    for bad in ["Uncaught", "ERROR:CONSOLE", "Failed to load resource"] {
        assert!(
            !stderr.contains(bad),
            "console error while rendering: {stderr}"
        );
    }
    let size = std::fs::metadata(&png).expect("screenshot written").len();
    assert!(size > 30_000, "screenshot is only {size} bytes");
    if let Some(n) = png_colours(&png) {
        assert!(n >= 5, "screenshot has only {n} distinct colours");
    }
    // The DOM after rendering holds the charts.
    let profile = tempfile::tempdir().unwrap();
    let dom = Command::new(chromium)
        .args(common)
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(&url)
        .output()
        .expect("chromium runs");
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.contains("<svg") && dom.contains("Run report"),
        "rendered DOM lacks the report"
    );
}

#[test]
fn report_from_analyze_output_equals_the_report_from_the_lake() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("analytics");
    analyze(&out, &[]);
    let from_lake = report(&runs().join("2026-10"), &dir.path().join("lake.html"));
    let fast = dir.path().join("fast.html");
    let run_dir = runs().join("2026-10");
    run(
        &[
            "report",
            run_dir.to_str().unwrap(),
            "--analytics",
            out.to_str().unwrap(),
            "--out",
            fast.to_str().unwrap(),
        ],
        &[],
    );
    // Same elements; plotters may draw histogram bars in another order.
    let parts = |s: &str| {
        let mut v: Vec<String> = s.split('>').map(str::to_string).collect();
        v.sort();
        v
    };
    assert_eq!(
        parts(&std::fs::read_to_string(&fast).unwrap()),
        parts(&from_lake)
    );
}

#[test]
fn backtest_scores_at_a_cutoff_with_history_before_it() {
    // Two monthly runs (bills issued 1 Oct and 1 Nov): the default cut-off is
    // 1 October, the only bill date with an outcome inside the data.
    let out = tempfile::tempdir().unwrap();
    analyze(out.path(), &[]);
    let t = Table::read_parquet(&out.path().join("arrears_backtest.parquet")).unwrap();
    let Some(Col::Date(c)) = t.col("cutoff") else {
        panic!("no cutoff")
    };
    assert_eq!(c[0], chrono::NaiveDate::from_ymd_opt(2026, 10, 1));
    let Some(Col::Str(src)) = t.col("bill_dates_from") else {
        panic!("no bill_dates_from")
    };
    assert_eq!(src[0].as_deref(), Some("bill_runs"));
    let Some(Col::Int(n)) = t.col("accounts_scored") else {
        panic!("no accounts_scored")
    };
    // Band rows add up to the `all` row.
    assert_eq!(n[0].unwrap() + n[1].unwrap() + n[2].unwrap(), n[3].unwrap());
    assert!(n[3].unwrap() > 0);
}

/// Local midnight (UTC+8) of a day in 2026, in UTC milliseconds.
fn midnight(month: u32, day: u32) -> i64 {
    chrono::NaiveDate::from_ymd_opt(2026, month, day)
        .unwrap()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc()
        .timestamp_millis()
        - 8 * 3_600_000
}

/// A lake folder with master data in `master/` (meters as (meter, account),
/// each account postpaid residential) and `readings` committed to the lake.
fn small_lake(
    meters: &[(&str, &str)],
    readings: &[meterflow::model::Reading],
) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let master = d.path().join("master");
    std::fs::create_dir_all(&master).unwrap();
    let mut accounts = String::from(
        "account_id,name,phone,id_number,address,district,age_band,occupation,gender,\
         customer_class,tariff_id,payment_mode,contracted_kva,household_size,opened_on\n",
    );
    let mut meter_rows = String::from(
        "meter_id,account_id,meter_type,ct_ratio,pt_ratio,register_digits,installed_on,removed_on,feeder\n",
    );
    let mut seen = BTreeSet::new();
    for (m, a) in meters {
        if seen.insert(*a) {
            accounts.push_str(&format!(
                "{a},王伟,13800000000,110101199001011234,北京市海淀区学院路1号,海淀区,30-44,\
                 teacher,male,residential,bj-residential-monthly,postpaid,0,2,2015-01-01\n"
            ));
        }
        meter_rows.push_str(&format!("{m},{a},residential_1p,1,1,6,2015-01-01,,F001\n"));
    }
    std::fs::write(master.join("accounts.csv"), accounts).unwrap();
    std::fs::write(master.join("meters.csv"), meter_rows).unwrap();
    std::fs::create_dir_all(d.path().join("readings")).unwrap();
    if !readings.is_empty() {
        let mut lake =
            meterflow::store::Lake::open(d.path(), meterflow::store::LakeOptions::new("t"))
                .unwrap();
        lake.accept(readings).unwrap();
        lake.flush().unwrap();
    }
    d
}

/// `meterflow analyze` of a lake made by `small_lake`.
fn analyze_lake(lake: &Path, out: &Path) {
    run(
        &[
            "analyze",
            "--lake",
            lake.to_str().unwrap(),
            "--master",
            lake.join("master").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
}

fn table(dir: &Path, name: &str) -> Table {
    Table::read_parquet(&dir.join(format!("{name}.parquet"))).unwrap()
}

fn ints(t: &Table, name: &str) -> Vec<Option<i64>> {
    match t.col(name) {
        Some(Col::Int(v)) => v.clone(),
        other => panic!("{name}: {other:?}"),
    }
}

fn kwh_e4(t: &Table, name: &str) -> Vec<Option<i128>> {
    match t.col(name) {
        Some(Col::Dec(v, 4)) => v.clone(),
        other => panic!("{name}: {other:?}"),
    }
}

fn comm_losses(out: &Path) -> usize {
    let t = table(out, "outage_events");
    (0..t.rows())
        .filter(|i| t.col("kind").unwrap().text(*i) == "comm_loss")
        .count()
}

/// One meter read every 15 minutes from local midnight 1 October to local
/// midnight 3 October, its register rising 1 kWh per interval.
fn quarter_hourly_lake() -> tempfile::TempDir {
    use meterflow::model::Channel;
    let readings: Vec<_> = (0..=192i64)
        .map(|k| {
            super::common::reading(
                "M1",
                midnight(10, 1) + k * 900_000,
                Channel::ImportActiveTotal,
                rust_decimal::Decimal::from(k),
            )
        })
        .collect();
    small_lake(&[("M1", "A1")], &readings)
}

#[test]
fn registers_read_every_15_minutes_give_each_day_its_energy() {
    let lake = quarter_hourly_lake();
    let out = tempfile::tempdir().unwrap();
    analyze_lake(lake.path(), out.path());
    let daily = table(out.path(), "daily_usage");
    assert_eq!(kwh_e4(&daily, "kwh"), vec![Some(960_000), Some(960_000)]);
    assert_eq!(
        daily.col("estimated"),
        Some(&Col::Bool(vec![Some(false), Some(false)]))
    );
    assert_eq!(comm_losses(out.path()), 0, "the meter was heard");
    let habits = table(out.path(), "usage_habits");
    assert_eq!(ints(&habits, "days"), vec![Some(2)]);
    assert_eq!(kwh_e4(&habits, "avg_daily_kwh"), vec![Some(960_000)]);
    let fleet = table(out.path(), "fleet_daily");
    assert_eq!(kwh_e4(&fleet, "kwh")[..2], [Some(960_000), Some(960_000)]);
}

#[test]
fn a_day_of_an_account_with_two_meters_counts_once_after_a_long_gap() {
    // Meters M1 (10 kWh a day) and M2 (5 kWh a day) of one account, read at
    // local midnight 1 October to 1 November; M2 misses 10..14 October.
    use meterflow::model::Channel;
    let mut readings = Vec::new();
    for day in 0..=31i64 {
        let ts = midnight(10, 1) + day * 86_400_000;
        let reg = |m: &str, per_day: i64| {
            super::common::reading(
                m,
                ts,
                Channel::ImportActiveTotal,
                rust_decimal::Decimal::from(per_day * day),
            )
        };
        readings.push(reg("M1", 10));
        if !(9..=13).contains(&day) {
            readings.push(reg("M2", 5));
        }
    }
    let lake = small_lake(&[("M1", "A1"), ("M2", "A1")], &readings);
    let out = tempfile::tempdir().unwrap();
    analyze_lake(lake.path(), out.path());
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("analytics.json")).unwrap()).unwrap();
    assert!(
        summary["late_rows"].as_u64().unwrap() > 0,
        "the gap closes after some of its days were written"
    );
    let habits = table(out.path(), "usage_habits");
    assert_eq!(ints(&habits, "days"), vec![Some(31)]);
    assert_eq!(kwh_e4(&habits, "avg_daily_kwh"), vec![Some(150_000)]);
    let history = table(out.path(), "history_change");
    assert_eq!(ints(&history, "days"), vec![Some(31)]);
    assert_eq!(kwh_e4(&history, "kwh"), vec![Some(31 * 150_000)]);
}

#[test]
fn a_day_of_a_single_meter_read_before_a_long_gap_counts_once() {
    // M1 (10 kWh a day) read at local midnight 1 to 10 October, at 03:00 on
    // 10 October, then silent until midnight 17 October and daily again to
    // 20 October. M9 (not in the master data) keeps the days coming, so the
    // gap closes after some of its days were written.
    use meterflow::model::Channel;
    let reg = |m: &str, ts: i64, v: rust_decimal::Decimal| {
        super::common::reading(m, ts, Channel::ImportActiveTotal, v)
    };
    let mut readings = Vec::new();
    for day in 0..=19i64 {
        let ts = midnight(10, 1) + day * 86_400_000;
        if !(10..=15).contains(&day) {
            readings.push(reg("M1", ts, rust_decimal::Decimal::from(10 * day)));
        }
        readings.push(reg("M9", ts, rust_decimal::Decimal::from(day)));
    }
    readings.push(reg(
        "M1",
        midnight(10, 10) + 3 * 3_600_000,
        rust_decimal::Decimal::new(9125, 2),
    ));
    let lake = small_lake(&[("M1", "A1")], &readings);
    let out = tempfile::tempdir().unwrap();
    analyze_lake(lake.path(), out.path());
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("analytics.json")).unwrap()).unwrap();
    assert!(summary["late_rows"].as_u64().unwrap() > 0);
    let daily = table(out.path(), "daily_usage");
    assert_eq!(daily.rows(), 19, "one row per day, 1 to 19 October");
    let dates: BTreeSet<String> = (0..daily.rows())
        .map(|i| daily.col("date").unwrap().text(i))
        .collect();
    assert_eq!(dates.len(), 19);
    let kwh: i128 = kwh_e4(&daily, "kwh").iter().map(|v| v.unwrap()).sum();
    assert_eq!(kwh, 1_900_000);
    let habits = table(out.path(), "usage_habits");
    assert_eq!(ints(&habits, "days"), vec![Some(19)]);
    assert_eq!(kwh_e4(&habits, "avg_daily_kwh"), vec![Some(100_000)]);
    let history = table(out.path(), "history_change");
    assert_eq!(ints(&history, "days"), vec![Some(19)]);
    assert_eq!(kwh_e4(&history, "kwh"), vec![Some(1_900_000)]);
}

#[test]
fn a_readings_file_copied_under_a_second_name_changes_nothing() {
    // One day of 15-minute interval energy (more in the evening) and the
    // register snapshots around it.
    use meterflow::model::Channel;
    let mut readings = Vec::new();
    for k in 1..=96i64 {
        let hour = (k - 1) / 4;
        readings.push(super::common::reading(
            "M1",
            midnight(10, 12) + k * 900_000,
            Channel::ImportActiveInterval,
            rust_decimal::Decimal::new(if hour >= 18 { 50 } else { 10 }, 2),
        ));
    }
    for (day, v) in [(12, 0), (13, 16)] {
        readings.push(super::common::reading(
            "M1",
            midnight(10, day),
            Channel::ImportActiveTotal,
            rust_decimal::Decimal::from(v),
        ));
    }
    let lake = small_lake(&[("M1", "A1")], &readings);
    let once = tempfile::tempdir().unwrap();
    analyze_lake(lake.path(), once.path());
    let files = meterflow::store::reader::list_files(
        lake.path(),
        "readings",
        chrono::NaiveDate::MIN,
        chrono::NaiveDate::MAX,
    )
    .unwrap();
    assert!(!files.is_empty());
    for (_, f) in files {
        let stem = f.file_stem().unwrap().to_str().unwrap().to_string();
        std::fs::copy(&f, f.with_file_name(format!("{stem}-copy.parquet"))).unwrap();
    }
    let twice = tempfile::tempdir().unwrap();
    analyze_lake(lake.path(), twice.path());
    let peak = table(once.path(), "peak_periods");
    assert!(peak.rows() > 0);
    assert_eq!(table(twice.path(), "peak_periods"), peak);
    assert_eq!(
        table(twice.path(), "daily_usage"),
        table(once.path(), "daily_usage")
    );
}

/// Column names and types of a Parquet file (also of one with no rows).
fn parquet_schema(path: &Path) -> Vec<(String, String)> {
    let f = std::fs::File::open(path).unwrap();
    let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f).unwrap();
    r.schema()
        .fields()
        .iter()
        .map(|f| (f.name().clone(), f.data_type().to_string()))
        .collect()
}

#[test]
fn an_empty_lake_gives_every_dataset_with_its_columns_and_no_rows() {
    let empty = small_lake(&[("M1", "A1")], &[]);
    let out = tempfile::tempdir().unwrap();
    analyze_lake(empty.path(), out.path());
    let full_lake = quarter_hourly_lake();
    let full = tempfile::tempdir().unwrap();
    analyze_lake(full_lake.path(), full.path());
    let files = data_team_files(full.path()).unwrap();
    assert!(files.len() >= 14, "{files:?}");
    for f in files {
        let name = f.file_name().unwrap();
        let got = out.path().join(name);
        assert!(got.exists(), "{name:?} missing");
        assert_eq!(parquet_schema(&got), parquet_schema(&f), "{name:?}");
    }
    for name in [
        "daily_usage",
        "arrears_risk",
        "arrears_backtest",
        "usage_warnings",
    ] {
        let f = std::fs::File::open(out.path().join(format!("{name}.parquet"))).unwrap();
        let r = parquet::file::reader::SerializedFileReader::new(f).unwrap();
        use parquet::file::reader::FileReader;
        assert_eq!(r.metadata().file_metadata().num_rows(), 0, "{name}");
    }
}

#[test]
fn a_revision_folder_given_as_runs_is_refused_and_its_run_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("2026-10");
    let lake = fleet().to_str().unwrap().to_string();
    let master = fleet().join("master").to_str().unwrap().to_string();
    let tariffs = root().join("tariffs").to_str().unwrap().to_string();
    // Billing into an issued run again writes its revision-1/.
    for _ in 0..2 {
        run(
            &[
                "bill",
                "--lake",
                &lake,
                "--master",
                &master,
                "--tariffs",
                &tariffs,
                "--period",
                "2026-10",
                "--out",
                run_dir.to_str().unwrap(),
            ],
            &[],
        );
    }
    let rev = run_dir.join("revision-1");
    assert!(rev.join("manifest.json").exists());

    let out = tmp.path().join("out");
    let o = Command::new(bin())
        .args(["analyze", "--lake", &lake, "--master", &master])
        .args(["--runs", rev.to_str().unwrap()])
        .args(["--out", out.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("revision 1 of the bill run"), "{err}");
    assert!(
        err.contains(&format!("give the run folder {}", run_dir.display())),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written on a refused --runs");

    // The run folder itself: its revision is read with it.
    run(
        &[
            "analyze",
            "--lake",
            &lake,
            "--master",
            &master,
            "--runs",
            run_dir.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.join("accounts.parquet").exists());
}

#[test]
fn collection_counts_each_bus_of_each_collector_once_per_meter() {
    use meterflow::model::{Channel, Quality};
    // Two meters on one bus of c1, one on its second bus, and one on a bus of
    // c2 that has the same name as c1's first: buses are counted per collector.
    let at = [("M1", "c1", "bus1/001"), ("M2", "c1", "bus1/002")];
    let at = [
        at[0],
        at[1],
        ("M3", "c1", "bus2/003"),
        ("M4", "c2", "bus1/004"),
    ];
    let mut readings = Vec::new();
    for (m, collector, address) in at {
        for (k, day) in [1u32, 2].into_iter().enumerate() {
            let mut r = super::common::reading(
                m,
                midnight(10, day),
                Channel::ImportActiveTotal,
                rust_decimal::Decimal::from(10 * k as i64),
            );
            r.source.collector = collector.into();
            r.source.address = address.into();
            if m == "M2" {
                r.quality = Quality::SUSPECT;
            }
            readings.push(r);
        }
    }
    let meters: Vec<(&str, &str)> = at.iter().map(|(m, ..)| (*m, "A1")).collect();
    let lake = small_lake(&meters, &readings);
    let out = tempfile::tempdir().unwrap();
    analyze_lake(lake.path(), out.path());
    let t = table(out.path(), "collection");
    let text = |c: &str| -> Vec<String> {
        (0..t.rows())
            .map(|i| t.col(c).unwrap().text(i).to_string())
            .collect()
    };
    let key: Vec<(String, String)> = text("collector").into_iter().zip(text("bus")).collect();
    let pair = |c: &str, b: &str| (c.to_string(), b.to_string());
    assert_eq!(
        key,
        vec![
            pair("c1", ""),
            pair("c1", "bus1"),
            pair("c1", "bus2"),
            pair("c2", ""),
            pair("c2", "bus1"),
        ]
    );
    assert_eq!(ints(&t, "meters"), [3, 2, 1, 1, 1].map(Some).to_vec());
    assert_eq!(ints(&t, "readings"), [6, 4, 2, 2, 2].map(Some).to_vec());
    assert_eq!(ints(&t, "suspect"), [2, 2, 0, 0, 0].map(Some).to_vec());
    assert_eq!(ints(&t, "ok"), [4, 2, 2, 2, 2].map(Some).to_vec());
}
