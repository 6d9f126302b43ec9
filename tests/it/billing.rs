//! Billing: golden vectors (tests/golden/*.csv), the cumulative price
//! function's telescoping property, and end-to-end bill runs over a small lake.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::common::reading;
use chrono::{NaiveDate, NaiveDateTime};
use meterflow::billing::engine::bill_readings;
use meterflow::billing::period::BillPeriod;
use meterflow::master::{BillingAccount, CustomerClass, Meter, PaymentMode};
use meterflow::model::{Channel, Reading};
use meterflow::tariff::power_factor::{monthly_pf_hundredths, PfStandard};
use meterflow::tariff::price::{energy_charge, incremental_charge, Usage};
use meterflow::tariff::{self, TariffSet};
use proptest::prelude::*;
use rust_decimal::Decimal;

fn root() -> PathBuf {
    option_env!("MF_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn tariffs() -> TariffSet {
    let mut set = tariff::load_dir(&root().join("tariffs")).expect("shipped tariffs load");
    let extra = tariff::load_dir(&root().join("tests/golden/tariffs")).expect("test tariffs load");
    set.tariffs.extend(extra.tariffs);
    set
}

fn d(s: &str) -> NaiveDate {
    s.parse().unwrap()
}

fn dec(s: &str) -> Decimal {
    s.trim()
        .parse()
        .unwrap_or_else(|_| panic!("'{s}' is not a decimal"))
}

fn local_ms(s: &str) -> i64 {
    let t = NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M").unwrap();
    t.and_utc().timestamp_millis() - 8 * 3_600_000
}

fn account(id: &str, tariff: &str, kva: &str, opened: &str) -> BillingAccount {
    BillingAccount {
        account_id: id.into(),
        customer_class: CustomerClass::Residential,
        tariff_id: tariff.into(),
        payment_mode: PaymentMode::Postpaid,
        contracted_kva: dec(kva),
        opened_on: d(opened),
    }
}

#[derive(Default)]
struct Case {
    period: String,
    accounts: Vec<BillingAccount>,
    meters: Vec<Meter>,
    readings: Vec<Reading>,
    lines: Vec<(String, Decimal, Decimal, Decimal)>,
    total: Option<Decimal>,
    flags: Option<String>,
    exception: Option<String>,
}

fn load_cases(file: &str) -> BTreeMap<String, Case> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .comment(Some(b'#'))
        .from_path(root().join("tests/golden").join(file))
        .unwrap();
    let mut cases: BTreeMap<String, Case> = BTreeMap::new();
    for rec in rdr.records() {
        let r = rec.unwrap();
        let f = |i: usize| r.get(i).unwrap_or("").trim().to_string();
        let c = cases.entry(f(0)).or_default();
        match f(1).as_str() {
            "period" => c.period = f(2),
            "account" => c.accounts.push(account(&f(2), &f(3), &f(4), &f(5))),
            "meter" => c.meters.push(Meter {
                meter_id: f(2),
                account_id: f(3),
                meter_type: "golden".into(),
                ct_ratio: dec(&f(4)),
                pt_ratio: dec(&f(5)),
                register_digits: f(6).parse().unwrap(),
                installed_on: d(&f(7)),
                removed_on: if f(8).is_empty() {
                    None
                } else {
                    Some(d(&f(8)))
                },
                feeder: String::new(),
            }),
            "reading" => c.readings.push(reading(
                &f(2),
                local_ms(&f(3)),
                f(4).parse().unwrap(),
                dec(&f(5)),
            )),
            "daily" => {
                let ch: Channel = f(3).parse().unwrap();
                let (mut day, last) = (d(&f(4)), d(&f(5)));
                let (mut v, step) = (dec(&f(6)), dec(&f(7)));
                while day <= last {
                    c.readings
                        .push(reading(&f(2), local_ms(&format!("{day} 00:00")), ch, v));
                    v += step;
                    day = day.succ_opt().unwrap();
                }
            }
            "intervals" => {
                let (from, to) = (
                    local_ms(&format!("{} 00:00", f(3))),
                    local_ms(&format!("{} 00:00", f(4))),
                );
                let mut ts = from + 900_000;
                while ts <= to {
                    c.readings.push(reading(
                        &f(2),
                        ts,
                        Channel::ImportActiveInterval,
                        dec(&f(5)),
                    ));
                    ts += 900_000;
                }
            }
            "line" => c.lines.push((f(2), dec(&f(3)), dec(&f(4)), dec(&f(5)))),
            "total" => c.total = Some(dec(&f(2))),
            "flags" => c.flags = Some(f(2)),
            "exception" => c.exception = Some(f(2)),
            other => panic!("unknown row kind '{other}'"),
        }
    }
    cases
}

/// Meter M1 of `account`: 6 digits, no CT or PT, installed in 2020.
fn meter_m1(account: &str) -> Meter {
    Meter {
        meter_id: "M1".into(),
        account_id: account.into(),
        meter_type: String::new(),
        ct_ratio: Decimal::ONE,
        pt_ratio: Decimal::ONE,
        register_digits: 6,
        installed_on: d("2020-01-01"),
        removed_on: None,
        feeder: String::new(),
    }
}

#[test]
fn a_meter_listed_twice_is_billed_once_on_its_last_row_and_reported() {
    let set = tariffs();
    let meter = meter_m1;
    let accounts = vec![
        account("A1", "bj-residential-monthly", "0", "2020-01-01"),
        account("A2", "bj-residential-monthly", "0", "2020-01-01"),
    ];
    let meters = vec![meter("A1"), meter("A2")];
    let readings = vec![
        reading(
            "M1",
            local_ms("2026-10-01 00:00"),
            Channel::ImportActiveTotal,
            dec("100"),
        ),
        reading(
            "M1",
            local_ms("2026-11-01 00:00"),
            Channel::ImportActiveTotal,
            dec("300"),
        ),
    ];
    let period = BillPeriod::parse("2026-10").unwrap();
    let (bills, exceptions) = bill_readings(&accounts, &meters, &set, period, &readings);
    assert_eq!(bills.len(), 1, "{exceptions:?}");
    assert_eq!(
        (bills[0].account_id.as_str(), bills[0].kwh),
        ("A2", dec("200"))
    );
    let codes: Vec<(&str, &str)> = exceptions
        .iter()
        .map(|e| (e.account_id.as_str(), e.code.as_str()))
        .collect();
    assert_eq!(codes, vec![("A1", "no_meter"), ("A1", "duplicate_meter")]);
}

#[test]
fn an_account_listed_twice_is_billed_once_on_its_last_row_and_reported() {
    let set = tariffs();
    let accounts = vec![
        account("A1", "no-such-tariff", "0", "2020-01-01"),
        account("A1", "bj-residential-monthly", "0", "2020-01-01"),
    ];
    let at = |t: &str, v: &str| reading("M1", local_ms(t), Channel::ImportActiveTotal, dec(v));
    let readings = vec![at("2026-10-01 00:00", "100"), at("2026-11-01 00:00", "300")];
    let period = BillPeriod::parse("2026-10").unwrap();
    let (bills, exceptions) = bill_readings(&accounts, &[meter_m1("A1")], &set, period, &readings);
    assert_eq!(bills.len(), 1, "{exceptions:?}");
    assert_eq!(bills[0].kwh, dec("200"));
    let codes: Vec<&str> = exceptions.iter().map(|e| e.code.as_str()).collect();
    assert_eq!(codes, ["duplicate_account"]);
}

#[test]
fn a_reading_held_in_memory_that_the_lake_could_not_store_is_an_exception_not_zero() {
    let set = tariffs();
    let accounts = vec![account("A1", "bj-residential-monthly", "0", "2020-01-01")];
    let meters = vec![meter_m1("A1")];
    let at = |t: &str, v: &str| reading("M1", local_ms(t), Channel::ImportActiveTotal, dec(v));
    let readings = vec![
        at("2026-10-01 00:00", "100"),
        at("2026-11-01 00:00", "300.00001"),
    ];
    let period = BillPeriod::parse("2026-10").unwrap();
    let (bills, exceptions) = bill_readings(&accounts, &meters, &set, period, &readings);
    assert!(bills.is_empty(), "{bills:?}");
    assert_eq!(exceptions.len(), 1, "{exceptions:?}");
    assert_eq!(exceptions[0].code, "bad_reading");
    assert!(
        exceptions[0].detail.contains("300.00001"),
        "{}",
        exceptions[0].detail
    );
}

#[test]
fn golden_bills_match_the_hand_computed_vectors() {
    let set = tariffs();
    let cases = load_cases("billing.csv");
    assert!(cases.len() >= 15, "golden file has {} cases", cases.len());
    let mut failures = Vec::new();
    for (name, c) in &cases {
        let period = BillPeriod::parse(&c.period).unwrap();
        let (bills, exceptions) = bill_readings(&c.accounts, &c.meters, &set, period, &c.readings);
        if let Some(code) = &c.exception {
            if !exceptions.iter().any(|e| &e.code == code) || !bills.is_empty() {
                failures.push(format!(
                    "{name}: expected exception {code}, got {exceptions:?} and {} bill(s)",
                    bills.len()
                ));
            }
            continue;
        }
        if bills.len() != 1 {
            failures.push(format!(
                "{name}: expected one bill, got {} and exceptions {exceptions:?}",
                bills.len()
            ));
            continue;
        }
        let b = &bills[0];
        let t = set.get(&b.tariff_id).unwrap();
        let got: Vec<(String, Decimal, Decimal, Decimal)> = b
            .lines
            .iter()
            .map(|l| {
                let v = &t.versions[l.version_index];
                (
                    l.line.label(v).into_owned(),
                    l.line.quantity.normalize(),
                    l.line.unit_price.normalize(),
                    l.line.amount,
                )
            })
            .collect();
        let want: Vec<(String, Decimal, Decimal, Decimal)> = c
            .lines
            .iter()
            .map(|(l, q, p, a)| (l.clone(), q.normalize(), p.normalize(), *a))
            .collect();
        if got != want {
            failures.push(format!(
                "{name}: lines differ\n  got  {got:?}\n  want {want:?}"
            ));
        }
        if let Some(total) = c.total {
            if b.total != total {
                failures.push(format!("{name}: total {} != {}", b.total, total));
            }
        }
        if let Some(flags) = &c.flags {
            if &b.flags.to_string() != flags {
                failures.push(format!("{name}: flags '{}' != '{}'", b.flags, flags));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn power_factor_adjustment_at_every_table_breakpoint() {
    let mut rdr = csv::ReaderBuilder::new()
        .comment(Some(b'#'))
        .from_path(root().join("tests/golden/power_factor.csv"))
        .unwrap();
    let mut n = 0;
    for rec in rdr.records() {
        let r = rec.unwrap();
        let standard: PfStandard = r[0].parse().unwrap();
        let pf = monthly_pf_hundredths(dec(&r[1]), dec(&r[2])).unwrap();
        assert_eq!(Decimal::new(pf as i64, 2), dec(&r[3]), "row {r:?}");
        assert_eq!(standard.percent(pf), dec(&r[4]), "row {r:?}");
        n += 1;
    }
    assert!(n >= 30);
}

#[test]
fn shipped_tariffs_load_and_have_the_documented_ids() {
    let set = tariff::load_dir(&root().join("tariffs")).unwrap();
    let ids: Vec<&str> = set.tariffs.keys().map(|s| s.as_str()).collect();
    assert_eq!(
        ids,
        [
            "bj-residential-annual",
            "bj-residential-monthly",
            "gd-tou-commercial",
            "industry-two-part"
        ]
    );
}

fn kwh(cents: u32) -> Decimal {
    Decimal::new(cents as i64, 2)
}

proptest! {
    /// Daily deductions f(after) - f(before) add up to the monthly bill, to the fen,
    /// for tiers crossed mid-day, TOU periods and annual positions.
    #[test]
    fn daily_incremental_charges_sum_to_the_monthly_bill(
        days in proptest::collection::vec((0u32..3000, 0u32..3000, 0u32..3000, 0u32..3000), 28..=31),
        ytd in 0u32..600_000,
        which in 0usize..3,
    ) {
        let set = tariffs();
        let id = ["bj-residential-monthly", "bj-residential-annual", "gd-tou-commercial"][which];
        let v = &set.get(id).unwrap().versions[0];
        let limits = v.tiers.as_ref().map(|t| t.limits.clone()).unwrap_or_default();
        let start = if which == 1 { Usage::total(kwh(ytd)) } else { Usage::default() };
        let mut pos = start;
        let mut sums: Vec<Decimal> = Vec::new();
        for (a, b, c, e) in &days {
            let mut next = pos;
            if v.tou.is_some() {
                for (p, x) in [a, b, c, e].iter().enumerate() {
                    next.periods[p] += kwh(**x);
                    next.total += kwh(**x);
                }
            } else {
                next.total += kwh(a + b + c + e);
            }
            let inc = incremental_charge(v, &limits, &start, &pos, &next);
            if sums.is_empty() { sums = vec![Decimal::ZERO; inc.len()]; }
            for (s, l) in sums.iter_mut().zip(&inc) { *s += l.amount; }
            pos = next;
        }
        let month = energy_charge(v, &limits, &start, &pos);
        let want: Vec<Decimal> = month.iter().map(|l| l.amount).collect();
        prop_assert_eq!(sums, want);
    }
}

mod end_to_end {
    use super::root;
    use meterflow::billing::run::{bill_run, BillRunOptions};
    use meterflow::sim::fleet::{generate, FleetOptions};
    use rust_decimal::Decimal;
    use std::collections::BTreeMap;

    fn fleet(dir: &std::path::Path) {
        let mut o = FleetOptions::new(dir);
        o.meters = 300;
        o.anomaly_per_mille = 100;
        generate(&o, &|_, _| {}).unwrap();
    }

    fn opts(lake: &std::path::Path, out: &std::path::Path) -> BillRunOptions {
        BillRunOptions::new(
            lake,
            lake.join("master"),
            root().join("tariffs"),
            "2026-10",
            out,
        )
    }

    /// A run directory's manifest.json.
    fn manifest(run: &std::path::Path) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(run.join("manifest.json")).unwrap()).unwrap()
    }

    #[test]
    fn same_inputs_give_byte_identical_outputs_and_preview_matches() {
        let tmp = tempfile::tempdir().unwrap();
        let lake = tmp.path().join("fleet");
        fleet(&lake);
        let mut p = opts(&lake, &tmp.path().join("preview"));
        p.preview = true;
        let preview = bill_run(&p).unwrap();
        assert!(
            !tmp.path().join("preview").exists(),
            "a preview writes nothing"
        );
        let a = bill_run(&opts(&lake, &tmp.path().join("a"))).unwrap();
        // The same inputs spelled differently (tariffs as `.../tariffs/.`,
        // master through `..`) give the same run id, so the same bytes.
        let mut o = opts(&lake, &tmp.path().join("b"));
        o.tariffs = root().join("tariffs").join(".");
        o.master = lake.join("readings").join("..").join("master");
        let b = bill_run(&o).unwrap();
        assert_eq!(a.outputs, b.outputs);
        assert_eq!(preview.outputs, a.outputs);
        assert_eq!(a.bills + a.exceptions, 300);
        assert!(a.total_amount > Decimal::ZERO);
        for f in [
            "bills.parquet",
            "bill_lines.parquet",
            "exceptions.parquet",
            "arrears.parquet",
        ] {
            let x = std::fs::read(tmp.path().join("a").join(f)).unwrap();
            let y = std::fs::read(tmp.path().join("b").join(f)).unwrap();
            assert_eq!(x, y, "{f} differs between identical runs");
        }
        let m = manifest(&tmp.path().join("a"));
        assert_eq!(
            m["sums"]["total_amount"].as_str().unwrap(),
            a.total_amount.to_string()
        );
        assert!(m["inputs"]["lake"].as_array().unwrap().len() >= 32);
        // Nothing half-written is left beside the run directory.
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn duckdb_pyarrow_and_polars_read_the_columns_meterflow_writes_itself() {
        use arrow::array::AsArray;
        use arrow::datatypes::Decimal128Type;
        let tmp = tempfile::tempdir().unwrap();
        let lake = tmp.path().join("fleet");
        fleet(&lake);
        let run = tmp.path().join("run");
        bill_run(&opts(&lake, &run)).unwrap();
        let column = |f: &str, c: &str| -> Vec<arrow::array::ArrayRef> {
            let path = run.join(format!("{f}.parquet"));
            let batches = meterflow::store::reader::read_file(&path).unwrap();
            batches
                .iter()
                .map(|b| b.column_by_name(c).unwrap().clone())
                .collect()
        };
        // Wide decimals (store::decimal), nullable ones among them: the sum
        // and count of values meterflow reads back.
        let decimals = [
            ("bills", "kwh"),
            ("bills", "ytd_kwh_before"),
            ("bills", "max_demand_kw"),
            ("bill_lines", "quantity"),
            ("arrears", "credit"),
            ("arrears", "paid_sum"),
        ];
        let mut want = Vec::new();
        for (f, c) in decimals {
            let (mut sum, mut n, mut rows, mut scale) = (0i128, 0usize, 0usize, 0);
            for a in column(f, c) {
                let a = a.as_primitive::<Decimal128Type>();
                scale = a.scale();
                rows += a.len();
                for v in a.iter().flatten() {
                    sum += v;
                    n += 1;
                }
            }
            assert!(n > 0, "{f}.{c} has values");
            if matches!(c, "ytd_kwh_before" | "max_demand_kw") {
                assert!(n < rows, "{f}.{c} has nulls too");
            }
            let sum = Decimal::from_i128_with_scale(sum, scale as u32);
            want.push(format!("{f}.{c}={sum}/{n}"));
        }
        // Nullable text columns written from dictionary keys (store::dict):
        // count, distinct values, least and greatest.
        let texts = [
            ("bills", "due_date"),
            ("bill_lines", "tou_period"),
            ("arrears", "bill_period"),
            ("arrears", "due_date"),
            ("arrears", "last_paid_on"),
            ("arrears", "last_due"),
        ];
        for (f, c) in texts {
            let (mut values, mut rows) = (Vec::new(), 0);
            for a in column(f, c) {
                rows += a.len();
                values.extend(a.as_string::<i32>().iter().flatten().map(str::to_string));
            }
            assert!(!values.is_empty(), "{f}.{c} has values");
            if matches!(c, "tou_period" | "bill_period") {
                assert!(values.len() < rows, "{f}.{c} has nulls too");
            }
            let distinct: std::collections::BTreeSet<&String> = values.iter().collect();
            let (lo, hi) = (distinct.first().unwrap(), distinct.last().unwrap());
            want.push(format!(
                "{f}.{c}={}/{}/{lo}/{hi}",
                values.len(),
                distinct.len()
            ));
        }
        let script = root().join("scripts/outputs_check.py");
        let out = std::process::Command::new(crate::common::python())
            .arg(script)
            .arg(&run)
            .args(
                decimals
                    .iter()
                    .chain(&texts)
                    .map(|(f, c)| format!("{f}.{c}")),
            )
            .output()
            .unwrap();
        let stdout = crate::common::stdout_of(&out, "outputs_check.py");
        for engine in ["duckdb", "pyarrow", "polars"] {
            let line = stdout
                .lines()
                .find(|l| l.starts_with(&format!("{engine} ")))
                .unwrap_or_else(|| panic!("no {engine} line in {stdout}"));
            let got: Vec<&str> = line.split_whitespace().skip(1).collect();
            assert_eq!(got.len(), want.len(), "{line}");
            for (tok, want) in got.iter().zip(&want) {
                // Decimal sums compare as numbers (engines print 1.50 or 1.5).
                let (k, v) = tok.split_once('=').unwrap();
                let (wk, wv) = want.split_once('=').unwrap();
                assert_eq!(k, wk, "{line}");
                match (v.split_once('/'), wv.split_once('/')) {
                    (Some((s, c)), Some((ws, wc))) if !wc.contains('/') => {
                        assert_eq!(
                            s.parse::<Decimal>().unwrap(),
                            ws.parse::<Decimal>().unwrap(),
                            "{engine} {k}"
                        );
                        assert_eq!(c, wc, "{engine} {k}");
                    }
                    _ => assert_eq!(v, wv, "{engine} {k}"),
                }
            }
        }
    }

    #[test]
    fn outputs_do_not_depend_on_the_number_of_threads_or_passes() {
        // More accounts than one group of runs on one thread (2 x 8,192), so
        // one thread bills in two groups and three threads in one group of
        // three parallel runs; with a budget of one meter per pass, the
        // accounts are billed in three passes of 8,192 (whole runs). The
        // bytes must not change.
        let tmp = tempfile::tempdir().unwrap();
        let lake = tmp.path().join("fleet");
        let mut o = FleetOptions::new(&lake);
        o.meters = 20_000;
        o.anomaly_per_mille = 20;
        generate(&o, &|_, _| {}).unwrap();
        // Readings of 25,000 unknown meters whose ids fall between the
        // fleet's (pages that several passes read): each must be counted once.
        let mut unknown_lake =
            meterflow::store::Lake::open(&lake, meterflow::store::LakeOptions::new("t")).unwrap();
        let ts = chrono::DateTime::parse_from_rfc3339("2026-10-14T16:00:00Z")
            .unwrap()
            .timestamp_millis();
        let unknown: Vec<meterflow::model::Reading> = (0..25_000)
            .map(|i| {
                let id = format!("{}u", meterflow::sim::fleet::meter_id(i));
                super::reading(
                    &id,
                    ts,
                    meterflow::model::Channel::ImportActiveTotal,
                    Decimal::ONE,
                )
            })
            .collect();
        unknown_lake.accept(&unknown).unwrap();
        unknown_lake.flush().unwrap();
        let run = |threads: usize, pass_meters: usize| {
            let out = tmp.path().join(format!("run-{threads}-{pass_meters}"));
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut o = opts(&lake, &out);
            o.pass_meters = pass_meters;
            let s = pool.install(|| bill_run(&o)).unwrap();
            (out, s.passes)
        };
        let (one, passes) = run(1, usize::MAX);
        assert_eq!(passes, 1);
        let (three, passes) = run(3, usize::MAX);
        assert_eq!(passes, 1);
        let (passed, passes) = run(3, 1);
        assert_eq!(passes, 3);
        for other in [&three, &passed] {
            for f in [
                "bills.parquet",
                "bill_lines.parquet",
                "exceptions.parquet",
                "arrears.parquet",
                "manifest.json",
            ] {
                let x = std::fs::read(one.join(f)).unwrap();
                let y = std::fs::read(other.join(f)).unwrap();
                if f == "manifest.json" {
                    // Timings and the pass count differ; everything else must not.
                    let strip = |b: &[u8]| {
                        let mut v: serde_json::Value = serde_json::from_slice(b).unwrap();
                        v.as_object_mut().unwrap().remove("timings_ms");
                        v["counts"].as_object_mut().unwrap().remove("passes");
                        v
                    };
                    assert_eq!(strip(&x), strip(&y));
                } else {
                    assert_eq!(x, y, "{f} differs in {}", other.display());
                }
            }
        }
        let m = manifest(&passed);
        assert_eq!(m["counts"]["passes"], 3);
        let e = meterflow::store::reader::read_file(&passed.join("exceptions.parquet")).unwrap();
        let rows: usize = e.iter().map(|b| b.num_rows()).sum();
        assert!(
            rows >= 25_000,
            "every unknown meter reported ({rows} exceptions)"
        );
    }

    #[test]
    fn late_data_gives_adjustment_lines_against_the_issued_run() {
        let tmp = tempfile::tempdir().unwrap();
        let lake = tmp.path().join("fleet");
        fleet(&lake);
        // The end-of-period snapshot (local 2026-11-01 00:00 = UTC 2026-10-31 16:00) arrives late.
        let part = lake.join("readings/date=2026-10-31");
        let held = tmp.path().join("held-back");
        std::fs::rename(&part, &held).unwrap();
        let out = tmp.path().join("run");
        let issued = bill_run(&opts(&lake, &out)).unwrap();
        assert!(issued.estimated_bills > 0, "the end reading was estimated");
        let issued_bytes = std::fs::read(out.join("bills.parquet")).unwrap();
        std::fs::rename(&held, &part).unwrap();
        let rerun = bill_run(&opts(&lake, &out)).unwrap();
        assert_eq!(rerun.revision, 1);
        assert!(rerun.adjusted_accounts > 0);
        assert_eq!(
            rerun.total_amount - issued.total_amount,
            rerun.adjustment_amount
        );
        assert_eq!(
            std::fs::read(out.join("bills.parquet")).unwrap(),
            issued_bytes,
            "issued bill untouched"
        );
        assert!(out.join("revision-1/bill_lines.parquet").exists());
        // A second re-run with nothing new adjusts nothing.
        let again = bill_run(&opts(&lake, &out)).unwrap();
        assert_eq!((again.revision, again.adjusted_accounts), (2, 0));
    }

    /// Every record batch of a Parquet file.
    fn batches(path: &std::path::Path) -> Vec<arrow::record_batch::RecordBatch> {
        let f = std::fs::File::open(path).unwrap();
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
            .unwrap()
            .build()
            .unwrap()
            .map(|b| b.unwrap())
            .collect()
    }

    /// A text column of a batch.
    fn text(b: &arrow::record_batch::RecordBatch, name: &str) -> arrow::array::StringArray {
        b.column_by_name(name)
            .unwrap()
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .unwrap()
            .clone()
    }

    /// Reads (account, kind, label, amount) of every bill line.
    fn lines(run: &std::path::Path) -> Vec<(String, String, String, Decimal)> {
        use arrow::array::{Array, Decimal128Array};
        let mut out = vec![];
        for b in batches(&run.join("bill_lines.parquet")) {
            let (acc, kind, label) = (text(&b, "account_id"), text(&b, "kind"), text(&b, "label"));
            let amt = b.column_by_name("amount").unwrap();
            let amt = amt.as_any().downcast_ref::<Decimal128Array>().unwrap();
            for i in 0..b.num_rows() {
                out.push((
                    acc.value(i).to_string(),
                    kind.value(i).to_string(),
                    label.value(i).to_string(),
                    Decimal::from_i128_with_scale(amt.value(i), amt.scale() as u32),
                ));
            }
        }
        out
    }

    /// A fleet of September and October 2026 under `dir`, and its committed
    /// September run: (lake, run directory).
    /// A fleet of September and October in `dir/fleet`.
    fn september_fleet(dir: &std::path::Path, meters: usize) -> std::path::PathBuf {
        let lake = dir.join("fleet");
        let mut o = FleetOptions::new(&lake);
        o.meters = meters as _;
        o.start = "2026-09-01".parse().unwrap();
        o.days = 61;
        generate(&o, &|_, _| {}).unwrap();
        lake
    }

    fn september_run(
        dir: &std::path::Path,
        meters: usize,
    ) -> (std::path::PathBuf, std::path::PathBuf) {
        let lake = september_fleet(dir, meters);
        let sep = dir.join("sep");
        let mut s = opts(&lake, &sep);
        s.period = "2026-09".into();
        bill_run(&s).unwrap();
        (lake, sep)
    }

    #[test]
    fn unpaid_bills_of_an_earlier_run_bear_late_fees_net_of_payments() {
        use meterflow::billing::arrears::read_prior_bills;
        use rust_decimal_macros::dec;
        let tmp = tempfile::tempdir().unwrap();
        let (lake, sep) = september_run(tmp.path(), 120);
        // A run written before arrears states: October's fees come from the
        // given runs' bills and the whole of payments.csv (rewritten below).
        std::fs::remove_file(sep.join("arrears.parquet")).unwrap();
        let prior = read_prior_bills(std::slice::from_ref(&sep)).unwrap();
        // Three postpaid residential accounts on a monthly tariff with a bill over 10 yuan.
        let accounts = std::fs::read_to_string(lake.join("master/accounts.csv")).unwrap();
        let mut picked: Vec<(String, Decimal)> = vec![];
        for line in accounts.lines().skip(1) {
            let id = line.split(',').next().unwrap().to_string();
            if line.contains(",residential,") && line.contains(",postpaid,") {
                if let Some(b) = prior.get(&id).and_then(|v| v.first()) {
                    assert_eq!(b.due, "2026-10-15".parse().unwrap(), "15 days after 30 Sep");
                    if b.amount > dec!(10) && picked.len() < 3 {
                        picked.push((id, b.amount));
                    }
                }
            }
        }
        assert_eq!(
            picked.len(),
            3,
            "the fleet has postpaid residential accounts"
        );
        let (paid, half, unpaid) = (&picked[0], &picked[1], &picked[2]);
        let fen = |x: Decimal| {
            x.round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointAwayFromZero)
        };
        let half_paid = fen(half.1 / dec!(2));
        std::fs::write(
            lake.join("master/payments.csv"),
            format!(
                "txn_id,channel,account_id,amount,paid_at\n\
                 T1,bank,{},{},2026-10-10T02:00:00Z\n\
                 T2,wechat,{},{},2026-10-21T02:00:00Z\n",
                paid.0, paid.1, half.0, half_paid
            ),
        )
        .unwrap();
        let oct = tmp.path().join("oct");
        let mut o2 = opts(&lake, &oct);
        o2.previous = vec![sep.clone()];
        let run = bill_run(&o2).unwrap();
        let fees: BTreeMap<String, Decimal> = lines(&oct)
            .into_iter()
            .filter(|l| l.1 == "late_fee")
            .map(|l| (l.0, l.3))
            .collect();
        let floor = |x: Decimal| if x < dec!(1) { dec!(1) } else { x };
        assert!(!fees.contains_key(&paid.0), "paid before the due date");
        // Overdue from 16 Oct: half paid on 21 Oct (local), so 5 days in full, 11 days half.
        let want_half = floor(fen(
            (half.1 * dec!(5) + (half.1 - half_paid) * dec!(11)) * dec!(0.001)
        ));
        assert_eq!(fees.get(&half.0), Some(&want_half));
        let want_unpaid = floor(fen(unpaid.1 * dec!(16) * dec!(0.001)));
        assert_eq!(fees.get(&unpaid.0), Some(&want_unpaid));
        let m = manifest(&oct);
        assert_eq!(m["inputs"]["history"].as_array().unwrap().len(), 2, "{m}");
        assert!(run.total_amount > Decimal::ZERO);
    }

    /// Reads (account, flags, ytd before, ytd after) of every bill.
    fn ytd(run: &std::path::Path) -> BTreeMap<String, (String, Option<Decimal>, Option<Decimal>)> {
        use arrow::array::{Array, Decimal128Array, StringArray};
        let f = std::fs::File::open(run.join("bills.parquet")).unwrap();
        let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
            .unwrap()
            .build()
            .unwrap();
        let mut out = BTreeMap::new();
        for b in r {
            let b = b.unwrap();
            let s = |n: &str| {
                b.column_by_name(n)
                    .unwrap()
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .unwrap()
                    .clone()
            };
            let d = |n: &str| {
                b.column_by_name(n)
                    .unwrap()
                    .as_any()
                    .downcast_ref::<Decimal128Array>()
                    .unwrap()
                    .clone()
            };
            let (acc, flags, yb, ya) = (
                s("account_id"),
                s("flags"),
                d("ytd_kwh_before"),
                d("ytd_kwh_after"),
            );
            let get = |a: &Decimal128Array, i: usize| {
                (!a.is_null(i)).then(|| Decimal::from_i128_with_scale(a.value(i), a.scale() as u32))
            };
            for i in 0..b.num_rows() {
                out.insert(
                    acc.value(i).to_string(),
                    (flags.value(i).to_string(), get(&yb, i), get(&ya, i)),
                );
            }
        }
        out
    }

    #[test]
    fn annual_tier_positions_carry_forward_from_the_previous_run() {
        let tmp = tempfile::tempdir().unwrap();
        let (lake, sep) = september_run(tmp.path(), 200);
        let sep_bills = ytd(&sep);
        // The lake starts in September: no reading at the tier-year start.
        let annual: Vec<&String> = sep_bills
            .iter()
            .filter(|(_, b)| b.1.is_some())
            .map(|(a, _)| a)
            .collect();
        assert!(!annual.is_empty(), "the fleet has annual-tier accounts");
        for a in &annual {
            assert!(
                sep_bills[*a].0.contains("ytd_estimated"),
                "{a}: {:?}",
                sep_bills[*a]
            );
        }
        let oct = tmp.path().join("oct");
        let mut o2 = opts(&lake, &oct);
        o2.previous = vec![sep.clone()];
        bill_run(&o2).unwrap();
        let oct_bills = ytd(&oct);
        for a in &annual {
            let (flags, before, _) = &oct_bills[*a];
            assert!(flags.contains("ytd_carried"), "{a}: {flags}");
            assert!(!flags.contains("ytd_estimated"), "{a}: {flags}");
            assert_eq!(
                *before, sep_bills[*a].2,
                "{a}: October starts where September ended"
            );
        }
        // Without --previous the same run estimates again.
        let alone = tmp.path().join("alone");
        bill_run(&opts(&lake, &alone)).unwrap();
        let alone_bills = ytd(&alone);
        assert!(alone_bills[annual[0]].0.contains("ytd_estimated"));
    }

    #[test]
    fn a_carried_annual_position_reads_no_partition_near_the_tier_year_start() {
        let tmp = tempfile::tempdir().unwrap();
        let lake = september_fleet(tmp.path(), 60);
        // An annual-tier account whose meter was installed on 10 September:
        // its tier-year position starts at that meter's first reading.
        let accounts = std::fs::read_to_string(lake.join("master/accounts.csv")).unwrap();
        let annual = accounts
            .lines()
            .find(|l| l.contains(",bj-residential-annual,"))
            .and_then(|l| l.split(',').next())
            .expect("the fleet has an annual-tier account")
            .to_string();
        let meters_csv = lake.join("master/meters.csv");
        let meters = std::fs::read_to_string(&meters_csv).unwrap();
        let moved: Vec<String> = meters
            .lines()
            .map(|l| {
                let mut f: Vec<&str> = l.split(',').collect();
                if f[1] == annual {
                    f[6] = "2026-09-10";
                }
                f.join(",")
            })
            .collect();
        std::fs::write(&meters_csv, moved.join("\n") + "\n").unwrap();
        let run = |name: &str, period: &str, previous: Option<&std::path::Path>| {
            let out = tmp.path().join(name);
            let mut r = opts(&lake, &out);
            r.period = period.into();
            r.previous = previous.map(|p| vec![p.to_path_buf()]).unwrap_or_default();
            bill_run(&r).unwrap();
            let files = manifest(&out)["counts"]["lake_files"].as_u64().unwrap();
            (out, files)
        };
        let (sep, _) = run("sep", "2026-09", None);
        let (alone, alone_files) = run("alone", "2026-10", None);
        let (oct, oct_files) = run("oct", "2026-10", Some(&sep));
        // Measured, October reads the partitions around 10 September; carried
        // from September's bill, it needs none of them.
        let (alone_ytd, oct_ytd) = (&ytd(&alone)[&annual], &ytd(&oct)[&annual]);
        assert!(!alone_ytd.0.contains("ytd_carried"), "{alone_ytd:?}");
        assert!(oct_ytd.0.contains("ytd_carried"), "{oct_ytd:?}");
        assert!(
            oct_files < alone_files,
            "{oct_files} files with --previous, {alone_files} without"
        );
    }

    /// Reads (account, total) of every bill.
    fn totals(run: &std::path::Path) -> BTreeMap<String, Decimal> {
        use arrow::array::{Array, Decimal128Array};
        let mut out = BTreeMap::new();
        for b in batches(&run.join("bills.parquet")) {
            let acc = text(&b, "account_id");
            let t = b.column_by_name("total").unwrap();
            let t = t.as_any().downcast_ref::<Decimal128Array>().unwrap();
            for i in 0..b.num_rows() {
                let v = Decimal::from_i128_with_scale(t.value(i), t.scale() as u32);
                out.insert(acc.value(i).to_string(), v);
            }
        }
        out
    }

    /// The late-fee lines of a run, in order.
    fn late_fees(run: &std::path::Path) -> Vec<(String, String, String, Decimal)> {
        lines(run)
            .into_iter()
            .filter(|l| l.1 == "late_fee")
            .collect()
    }

    const MONTHS: [&str; 4] = ["2026-08", "2026-09", "2026-10", "2026-11"];

    /// Bills `MONTHS` into `dir/<month>`, each month given the earlier runs
    /// `previous` picks; `legacy` removes each run's arrears state, as runs
    /// written before it existed.
    fn bill_months(
        lake: &std::path::Path,
        dir: &std::path::Path,
        previous: impl Fn(&[std::path::PathBuf]) -> Vec<std::path::PathBuf>,
        legacy: bool,
    ) -> Vec<std::path::PathBuf> {
        let mut done: Vec<std::path::PathBuf> = vec![];
        for m in MONTHS {
            let out = dir.join(m);
            let mut o = opts(lake, &out);
            o.period = m.into();
            o.previous = previous(&done);
            bill_run(&o).unwrap();
            if legacy {
                std::fs::remove_file(out.join("arrears.parquet")).unwrap();
            }
            done.push(out);
        }
        done
    }

    #[test]
    fn the_previous_month_s_arrears_state_gives_the_fees_of_the_whole_history() {
        use meterflow::billing::arrears::read_state;
        let tmp = tempfile::tempdir().unwrap();
        let lake = tmp.path().join("fleet");
        let mut f = FleetOptions::new(&lake);
        f.meters = 150;
        f.start = "2026-08-01".parse().unwrap();
        f.days = 122;
        // Postpaid accounts pay each bill on time, late, partly, over, or skip it.
        f.payment_habits = true;
        generate(&f, &|_, _| {}).unwrap();
        // And some pay in advance, before any bill.
        let accounts = std::fs::read_to_string(lake.join("master/accounts.csv")).unwrap();
        let postpaid: Vec<String> = accounts
            .lines()
            .filter(|l| l.contains(",postpaid,"))
            .map(|l| l.split(',').next().unwrap().to_string())
            .collect();
        let pays = lake.join("master/payments.csv");
        let mut csv = std::fs::read_to_string(&pays).unwrap();
        for (i, a) in postpaid.iter().take(4).enumerate() {
            csv += &format!("ADV-{i},bank,{a},150.00,2026-08-05T02:00:00Z\n");
        }
        std::fs::write(&pays, &csv).unwrap();

        let monthly = bill_months(
            &lake,
            &tmp.path().join("monthly"),
            |d| d.last().into_iter().cloned().collect(),
            false,
        );
        let all = bill_months(&lake, &tmp.path().join("all"), |d| d.to_vec(), false);
        let legacy = bill_months(&lake, &tmp.path().join("legacy"), |d| d.to_vec(), true);
        // The same chain billed in another folder: the same states and run
        // ids (the runs a state counted are kept relative to its own run).
        let deeper = tmp.path().join("b/deeper");
        std::fs::create_dir_all(&deeper).unwrap();
        let elsewhere = bill_months(
            &lake,
            &deeper.join("monthly"),
            |d| d.last().into_iter().cloned().collect(),
            false,
        );
        let run_id = |run: &std::path::Path| manifest(run)["run_id"].as_str().unwrap().to_string();
        for (a, b) in monthly.iter().zip(&elsewhere) {
            let state = |r: &std::path::Path| std::fs::read(r.join("arrears.parquet")).unwrap();
            assert!(
                state(a) == state(b),
                "{}: arrears.parquet differs",
                b.display()
            );
            assert_eq!(run_id(a), run_id(b), "{}", b.display());
        }
        let mut charged = BTreeMap::new();
        for (k, m) in MONTHS.iter().enumerate() {
            let fees = late_fees(&monthly[k]);
            assert_eq!(fees, late_fees(&all[k]), "{m}: monthly vs all runs");
            assert_eq!(
                fees,
                late_fees(&legacy[k]),
                "{m}: monthly vs runs without state"
            );
            assert_eq!(totals(&monthly[k]), totals(&all[k]), "{m}");
            assert_eq!(totals(&monthly[k]), totals(&legacy[k]), "{m}");
            for l in fees {
                charged.insert(l.0, l.2);
            }
        }
        assert!(charged.len() >= 5, "overdue accounts: {charged:?}");
        let as_of = "2026-11-30".parse().unwrap();
        let state =
            |run: &std::path::Path| read_state(&run.join("arrears.parquet"), as_of).unwrap();
        let nov = state(&monthly[3]);
        assert_eq!(nov.accounts, state(&all[3]).accounts);
        assert!(nov.accounts.values().any(|a| !a.open.is_empty()));
        assert!(
            nov.accounts.values().any(|a| a.credit > Decimal::ZERO),
            "paid in advance"
        );
        // The state is what makes the previous run enough: October's run
        // without it gives other fees.
        let stateless = tmp.path().join("oct-without-state");
        std::fs::create_dir_all(&stateless).unwrap();
        for e in std::fs::read_dir(&monthly[2]).unwrap() {
            let e = e.unwrap();
            if e.file_name() != "arrears.parquet" {
                std::fs::copy(e.path(), stateless.join(e.file_name())).unwrap();
            }
        }
        let mut o = opts(&lake, &tmp.path().join("nov-without-state"));
        o.period = "2026-11".into();
        o.previous = vec![stateless];
        bill_run(&o).unwrap();
        assert_ne!(
            late_fees(&tmp.path().join("nov-without-state")),
            late_fees(&monthly[3]),
            "October's state is used"
        );

        // A payment back-dated to 20 September, after the October state was
        // written: the state did not count it, so November given only October
        // stops and names the account; given the runs since August (whose
        // state ends before that day) it bills what the whole history gives.
        let august = "2026-08-01".parse().ok();
        let late_payer = postpaid
            .iter()
            .find(|a| {
                let s = nov.accounts.get(*a);
                s.is_some_and(|s| !s.open.is_empty() && s.history_from == august)
            })
            .unwrap();
        csv += &format!("LATE-1,counter,{late_payer},20.00,2026-09-20T02:00:00Z\n");
        std::fs::write(&pays, &csv).unwrap();
        let rerun = |name: &str, previous: &[std::path::PathBuf]| {
            let mut o = opts(&lake, &tmp.path().join(name));
            o.period = "2026-11".into();
            o.previous = previous.to_vec();
            bill_run(&o).map(|_| tmp.path().join(name))
        };
        let err = rerun("nov-oct", &monthly[2..3]).unwrap_err().to_string();
        assert!(
            err.contains(late_payer.as_str()) && err.contains("back-dated"),
            "{err}"
        );
        assert!(err.contains("every run since 2026-08-01"), "{err}");
        assert!(err.contains("one that ends before 2026-09-20"), "{err}");
        let err = rerun("nov-sep", &monthly[1..3]).unwrap_err().to_string();
        assert!(
            err.contains(late_payer.as_str()),
            "September's state counted no such payment"
        );
        let exact = rerun("nov-aug", &monthly[..3]).unwrap();
        let whole = rerun("nov-legacy", &legacy[..3]).unwrap();
        assert_eq!(late_fees(&exact), late_fees(&whole));
        assert_eq!(totals(&exact), totals(&whole));
        let paid = |run: &std::path::Path| state(run).accounts[late_payer].counted.sum;
        assert_eq!(
            paid(&exact),
            paid(&monthly[3]) + Decimal::from(20),
            "the payment counts"
        );
    }

    /// A fleet of August..November 2026 whose postpaid accounts pay on
    /// time, late, partly, over, or skip bills.
    fn paying_fleet(lake: &std::path::Path) {
        let mut f = FleetOptions::new(lake);
        f.meters = 150;
        f.start = "2026-08-01".parse().unwrap();
        f.days = 122;
        f.payment_habits = true;
        generate(&f, &|_, _| {}).unwrap();
    }

    /// Bills `period` into `out` given `previous`.
    fn bill_month(
        lake: &std::path::Path,
        out: &std::path::Path,
        period: &str,
        previous: &[&std::path::Path],
    ) -> Result<meterflow::billing::run::BillRunSummary, meterflow::billing::run::BillingError>
    {
        let mut o = opts(lake, out);
        o.period = period.into();
        o.previous = previous.iter().map(|p| p.to_path_buf()).collect();
        bill_run(&o)
    }

    #[test]
    fn revisions_of_earlier_runs_are_followed_or_the_run_to_give_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let lake = tmp.path().join("fleet");
        paying_fleet(&lake);
        // The end-of-month snapshots of September and October arrive late:
        // their first runs estimate, re-runs with them write revisions.
        let held = tmp.path().join("held");
        std::fs::create_dir_all(&held).unwrap();
        for day in ["2026-09-30", "2026-10-31"] {
            let part = lake.join(format!("readings/date={day}"));
            std::fs::rename(&part, held.join(day)).unwrap();
        }
        let run = |m: &str| tmp.path().join(m);
        let (aug, sep, oct) = (run("aug"), run("sep"), run("oct"));
        bill_month(&lake, &aug, "2026-08", &[]).unwrap();
        bill_month(&lake, &sep, "2026-09", &[&aug]).unwrap();
        bill_month(&lake, &oct, "2026-10", &[&sep]).unwrap();
        for day in ["2026-09-30", "2026-10-31"] {
            let part = lake.join(format!("readings/date={day}"));
            std::fs::rename(held.join(day), &part).unwrap();
        }
        // October re-run before November is billed: November given October
        // continues from the revision's state, as the whole history does.
        let r = bill_month(&lake, &oct, "2026-10", &[&sep]).unwrap();
        assert!(r.revision == 1 && r.adjusted_accounts > 0);
        let nov = bill_month(&lake, &run("nov"), "2026-11", &[&oct]).unwrap();
        let all = bill_month(&lake, &run("nov-all"), "2026-11", &[&aug, &sep, &oct]).unwrap();
        assert_eq!(late_fees(&run("nov")), late_fees(&run("nov-all")));
        assert_eq!(totals(&run("nov")), totals(&run("nov-all")));
        assert_eq!(nov.total_amount, all.total_amount);
        // September re-run after October was: November given October alone
        // would miss it, and stops naming September's run.
        let r = bill_month(&lake, &sep, "2026-09", &[&aug]).unwrap();
        assert!(r.revision == 1 && r.adjusted_accounts > 0);
        let err = bill_month(&lake, &run("nov-2"), "2026-11", &[&oct])
            .unwrap_err()
            .to_string();
        let sep_dir = std::fs::canonicalize(&sep).unwrap();
        assert!(
            err.contains(&format!("add --previous {}", sep_dir.display())),
            "{err}"
        );
        assert!(!run("nov-2").exists());
        // Given September too, it bills what every run since August gives.
        bill_month(&lake, &run("nov-3"), "2026-11", &[&sep, &oct]).unwrap();
        bill_month(&lake, &run("nov-4"), "2026-11", &[&aug, &sep, &oct]).unwrap();
        assert_eq!(late_fees(&run("nov-3")), late_fees(&run("nov-4")));
        assert_eq!(totals(&run("nov-3")), totals(&run("nov-4")));
        assert_ne!(
            totals(&run("nov-3")),
            totals(&run("nov")),
            "September's revision changed fees"
        );
    }

    /// Bills September and October, then `lose` (an edit of the master
    /// data given the lake and an account) makes a postpaid account October
    /// billed unbillable, and October is re-run: the account's row in the
    /// issued state and in the revision's.
    fn revised_without(
        lose: impl Fn(&std::path::Path, &str),
    ) -> (
        meterflow::billing::arrears::AccountArrears,
        Option<meterflow::billing::arrears::AccountArrears>,
    ) {
        use meterflow::billing::arrears::read_state;
        let tmp = tempfile::tempdir().unwrap();
        let lake = tmp.path().join("fleet");
        paying_fleet(&lake);
        let (sep, oct) = (tmp.path().join("sep"), tmp.path().join("oct"));
        bill_month(&lake, &sep, "2026-09", &[]).unwrap();
        bill_month(&lake, &oct, "2026-10", &[&sep]).unwrap();
        let as_of = "2026-10-31".parse().unwrap();
        let issued = read_state(&oct.join("arrears.parquet"), as_of).unwrap();
        let billed = totals(&oct);
        let (account, was) = issued
            .accounts
            .iter()
            .find(|(a, s)| billed.contains_key(*a) && s.last_due == "2026-11-15".parse().ok())
            .unwrap();
        lose(&lake, account);
        let r = bill_month(&lake, &oct, "2026-10", &[&sep]).unwrap();
        assert_eq!(r.revision, 1);
        let revised = read_state(&oct.join("revision-1/arrears.parquet"), as_of).unwrap();
        (was.clone(), revised.accounts.get(account).cloned())
    }

    #[test]
    fn payments_settled_before_the_first_run_are_counted_not_credited() {
        use meterflow::billing::arrears::read_state;
        let tmp = tempfile::tempdir().unwrap();
        let lake = tmp.path().join("fleet");
        paying_fleet(&lake);
        // One postpaid account cannot be billed (no meters).
        let accounts = std::fs::read_to_string(lake.join("master/accounts.csv")).unwrap();
        let unbilled = accounts
            .lines()
            .filter(|l| l.contains(",postpaid,"))
            .map(|l| l.split(',').next().unwrap().to_string())
            .next_back()
            .unwrap();
        drop_rows(&lake.join("master/meters.csv"), 1, &unbilled);
        // October as the fleet's first run: the August and September
        // payments settled bills of the system before.
        let first = |name: &str, settled: Option<&str>| {
            let out = tmp.path().join(name);
            let mut o = opts(&lake, &out);
            o.settled_through = settled.map(|d| d.parse().unwrap());
            bill_run(&o).map(|_| out)
        };
        let credited = first("credited", None).unwrap();
        let settled = first("settled", Some("2026-09-30")).unwrap();
        let as_of = "2026-10-31".parse().unwrap();
        let state =
            |run: &std::path::Path| read_state(&run.join("arrears.parquet"), as_of).unwrap();
        let (c, s) = (state(&credited), state(&settled));
        let credit = |st: &meterflow::billing::arrears::ArrearsState| -> Decimal {
            st.accounts.values().map(|a| a.credit).sum()
        };
        let unpaid = |st: &meterflow::billing::arrears::ArrearsState| -> Decimal {
            st.accounts
                .values()
                .flat_map(|a| &a.open)
                .map(|o| o.unpaid)
                .sum()
        };
        assert!(credit(&s) < credit(&c), "{} !< {}", credit(&s), credit(&c));
        assert!(unpaid(&s) > unpaid(&c), "{} !> {}", unpaid(&s), unpaid(&c));
        // Every payment through October is counted either way.
        let counted = |st: &meterflow::billing::arrears::ArrearsState| -> u64 {
            st.accounts.values().map(|a| a.counted.count).sum()
        };
        assert_eq!(counted(&s), counted(&c));
        // Its history in the runs starts with the settled run, billed or
        // not: no later run rebuilds it from the runs' whole history.
        assert_eq!(
            s.accounts[&unbilled].history_from,
            "2026-10-01".parse().ok()
        );
        assert_eq!(c.accounts[&unbilled].history_from, None);
        assert_eq!(manifest(&settled)["settled_through"], "2026-09-30");
        assert_ne!(manifest(&settled)["run_id"], manifest(&credited)["run_id"]);
        // A re-run keeps it; another day is refused.
        let r = bill_month(&lake, &settled, "2026-10", &[]).unwrap();
        assert_eq!(r.revision, 1);
        assert_eq!(
            manifest(&settled.join("revision-1"))["settled_through"],
            "2026-09-30"
        );
        assert_eq!(state(&settled.join("revision-1")).accounts, s.accounts);
        let err = first("settled", Some("2026-08-31"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("a re-run keeps it"), "{err}");
        // November continues from October's state: the option is refused.
        let mut nov = opts(&lake, &tmp.path().join("nov"));
        nov.period = "2026-11".into();
        nov.previous = vec![settled.clone()];
        nov.settled_through = "2026-09-30".parse().ok();
        let err = bill_run(&nov).unwrap_err().to_string();
        assert!(err.contains("for a fleet's first run"), "{err}");
        // A re-run of the settled run keeps its day: --previous is refused
        // as such.
        let mut again = opts(&lake, &settled);
        again.previous = vec![credited.clone()];
        let err = bill_run(&again).unwrap_err().to_string();
        assert!(err.contains("a re-run of it takes no --previous"), "{err}");
        // A day after the period is refused.
        let err = first("late", Some("2026-11-01")).unwrap_err().to_string();
        assert!(err.contains("before the period's end"), "{err}");
        // Without it, November continues from October's state.
        bill_month(&lake, &tmp.path().join("nov"), "2026-11", &[&settled]).unwrap();
        // A payment back-dated into October after it was billed: the state
        // cannot be continued, and its whole history is not in the runs
        // (the settled payments would become credit): refused.
        let account = s.accounts.keys().next().unwrap().clone();
        let payments = lake.join("master/payments.csv");
        let mut csv = std::fs::read_to_string(&payments).unwrap();
        csv.push_str(&format!(
            "BACK-1,counter,{account},10.00,2026-10-20T10:00:00Z\n"
        ));
        std::fs::write(&payments, csv).unwrap();
        let err = bill_month(&lake, &tmp.path().join("nov2"), "2026-11", &[&settled])
            .unwrap_err()
            .to_string();
        assert!(err.contains(&account), "{err}");
        // No earlier run exists to give: the message says what helps.
        assert!(err.contains("restore payments.csv"), "{err}");
        assert!(!err.contains("at the latest"), "{err}");
        assert!(!err.contains("ends before"), "{err}");
    }

    /// What a history left unpaid, imported as opening balances, bills the
    /// next months exactly as that history does: the same late fees and
    /// totals in October (the first run, settled through 30 September) and
    /// November, and the same unpaid bills and credit carried.
    #[test]
    fn opening_balances_taken_from_a_history_bill_the_next_months_as_that_history_does() {
        use super::d;
        use meterflow::billing::arrears::read_state;
        let tmp = tempfile::tempdir().unwrap();
        let lake = tmp.path().join("fleet");
        paying_fleet(&lake);
        // Annual tier positions are carried by --previous runs and measured
        // from the lake by a first run: monthly tiers keep the totals
        // comparable.
        let accounts_path = lake.join("master/accounts.csv");
        let accounts_csv = std::fs::read_to_string(&accounts_path)
            .unwrap()
            .replace("bj-residential-annual", "bj-residential-monthly");
        std::fs::write(&accounts_path, &accounts_csv).unwrap();
        // Some pay well in advance: credit at the switch.
        let pays = lake.join("master/payments.csv");
        let mut csv = std::fs::read_to_string(&pays).unwrap();
        for (i, l) in accounts_csv
            .lines()
            .filter(|l| l.contains(",postpaid,"))
            .take(3)
            .enumerate()
        {
            let a = l.split(',').next().unwrap();
            csv += &format!("ADV-{i},bank,{a},2000.00,2026-08-05T02:00:00Z\n");
        }
        std::fs::write(&pays, &csv).unwrap();
        let run = |m: &str| tmp.path().join(m);
        let (aug, sep, oct) = (run("aug"), run("sep"), run("oct"));
        bill_month(&lake, &aug, "2026-08", &[]).unwrap();
        bill_month(&lake, &sep, "2026-09", &[&aug]).unwrap();
        bill_month(&lake, &oct, "2026-10", &[&sep]).unwrap();
        bill_month(&lake, &run("nov"), "2026-11", &[&oct]).unwrap();
        // The system before meterflow: August and September, as September's
        // state leaves them.
        let sep_state = read_state(&sep.join("arrears.parquet"), d("2026-09-30")).unwrap();
        let mut csv = String::from("account_id,as_of,period,owed,due_date\n");
        let (mut bills, mut credits) = (0, 0);
        for (acc, a) in &sep_state.accounts {
            for o in &a.open {
                csv += &format!(
                    "{acc},2026-09-30,{},{},{}\n",
                    o.bill.period, o.unpaid, o.bill.due
                );
                bills += 1;
            }
            if a.credit > Decimal::ZERO {
                csv += &format!("{acc},2026-09-30,,-{},\n", a.credit);
                credits += 1;
            }
        }
        assert!(
            bills > 0 && credits > 0,
            "{bills} unpaid bills, {credits} credits"
        );
        let opening = lake.join("master/opening_balances.csv");
        std::fs::write(&opening, &csv).unwrap();
        let first = |name: &str| {
            let out = tmp.path().join(name);
            let mut o = opts(&lake, &out);
            o.settled_through = Some(d("2026-09-30"));
            bill_run(&o).map(|_| out)
        };
        let oct2 = first("oct-opening").unwrap();
        let m = manifest(&oct2);
        assert_eq!(
            m["opening_balances"]["accounts"],
            sep_state
                .accounts
                .iter()
                .filter(|(_, a)| !a.open.is_empty() || a.credit > Decimal::ZERO)
                .count()
        );
        let history = &m["inputs"]["history"];
        assert!(
            history.as_array().unwrap().iter().any(|i| i["path"]
                .as_str()
                .unwrap()
                .ends_with("opening_balances.csv")),
            "{history}"
        );
        assert!(!late_fees(&oct).is_empty());
        assert_eq!(late_fees(&oct2), late_fees(&oct));
        assert_eq!(totals(&oct2), totals(&oct));
        // The same unpaid amounts, credit and payments counted at 31 October.
        // Per account: (period, unpaid) of each open bill, credit, count.
        type Carried = BTreeMap<String, (Vec<(String, Decimal)>, Decimal, u64)>;
        let carried = |r: &std::path::Path| -> Carried {
            read_state(&r.join("arrears.parquet"), d("2026-10-31"))
                .unwrap()
                .accounts
                .into_iter()
                .map(|(k, a)| {
                    let open = a
                        .open
                        .iter()
                        .map(|o| (o.bill.period.clone(), o.unpaid))
                        .collect();
                    (k, (open, a.credit, a.counted.count))
                })
                .collect()
        };
        assert_eq!(carried(&oct2), carried(&oct));
        let nov2 = run("nov-opening");
        bill_month(&lake, &nov2, "2026-11", &[&oct2]).unwrap();
        assert_eq!(late_fees(&nov2), late_fees(&run("nov")));
        assert_eq!(totals(&nov2), totals(&run("nov")));
        // A re-run reads them again: nothing to adjust, the same state.
        // Without the file it is refused.
        first("oct-opening").unwrap();
        let rerun = oct2.join("revision-1");
        assert_eq!(manifest(&rerun)["counts"]["adjusted_accounts"], 0);
        assert_eq!(manifest(&rerun)["opening_balances"], m["opening_balances"]);
        assert_eq!(carried(&rerun), carried(&oct2));
        std::fs::rename(&opening, tmp.path().join("kept.csv")).unwrap();
        let err = first("oct-opening").unwrap_err().to_string();
        assert!(err.contains("a re-run needs them too"), "{err}");
        std::fs::rename(tmp.path().join("kept.csv"), &opening).unwrap();
        // With them, the first run is settled through the day before it.
        let mut o = opts(&lake, &run("mid"));
        o.settled_through = Some(d("2026-10-10"));
        let err = bill_run(&o).unwrap_err().to_string();
        assert!(
            err.contains("--settled-through must be 2026-09-30"),
            "{err}"
        );
        // Without --settled-through a first run refuses the file; a run
        // continuing a state ignores it.
        let err = bill_month(&lake, &run("plain"), "2026-10", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--settled-through 2026-09-30"), "{err}");
        bill_month(&lake, &run("nov3"), "2026-11", &[&oct]).unwrap();
        assert_eq!(totals(&run("nov3")), totals(&run("nov")));
        // November billed as a first run again (--previous forgotten): the
        // balances are of 30 September, refused row by row.
        let mut o = opts(&lake, &run("nov4"));
        o.period = "2026-11".into();
        o.settled_through = Some(d("2026-10-31"));
        let err = bill_run(&o).unwrap_err().to_string();
        assert!(
            err.contains("opening_balances.csv:2: field 'as_of'"),
            "{err}"
        );
        // A first run billed without them cannot add them in a re-run.
        std::fs::rename(&opening, tmp.path().join("kept.csv")).unwrap();
        let without = first("oct-without").unwrap();
        std::fs::rename(tmp.path().join("kept.csv"), &opening).unwrap();
        let err = first("oct-without").unwrap_err().to_string();
        assert!(err.contains("a re-run cannot add them"), "{err}");
        assert!(!without.join("revision-1").exists());
        // Bad rows stop the run, each named by line and field.
        let (acc, _) = sep_state.accounts.iter().next().unwrap();
        let prepaid = accounts_csv
            .lines()
            .find(|l| l.contains(",prepaid,"))
            .and_then(|l| l.split(',').next())
            .unwrap();
        std::fs::write(
            &opening,
            format!(
                "account_id,as_of,period,owed,due_date\n\
                 NOPE,2026-09-30,2026-09,10.00,2026-10-15\n\
                 {acc},2026-09-30,2026-10,10.00,2026-11-15\n\
                 {acc},2026-09-30,2026-09,10.00,2026-10-15\n\
                 {acc},2026-09-30,2026-09-01..2026-10-01,12.00,2026-10-15\n\
                 {acc},2026-09-30,,-1.00,\n\
                 {acc},2026-09-30,,-2.00,\n\
                 {acc},2026-09-30,2026-13,10.00,2026-10-15\n\
                 {prepaid},2026-09-30,2026-09,10.00,2026-10-15\n\
                 {acc},2026-09-30,2026-08,10.00,2026-08-30\n\
                 {acc},2026-09-30,2026-07,10.00,2027-01-15\n\
                 {acc},2026-08-31,2026-05,10.00,2026-06-15\n\
                 {acc},2026-09-30,2026-06,10.00,2026-06-30\n"
            ),
        )
        .unwrap();
        let err = first("bad").unwrap_err().to_string();
        for (line, field) in [
            (2, "account_id"),
            (3, "period"),
            (5, "period"),
            (7, "owed"),
            (8, "period"),
            (9, "account_id"),
            (10, "due_date"),
            (11, "due_date"),
            (12, "as_of"),
        ] {
            assert!(
                err.contains(&format!("opening_balances.csv:{line}: field '{field}'")),
                "{line}: {err}"
            );
        }
        // Line 13, due on its period's last day, is good.
        assert!(err.contains("9 bad row(s)"), "{err}");
        assert!(!tmp.path().join("bad").exists());
    }

    /// The README's switching example: the sample lake's October as a first
    /// run with `sample-data/opening_balances.csv`.
    #[test]
    fn the_sample_opening_balances_open_the_sample_lake_s_first_run() {
        let tmp = tempfile::tempdir().unwrap();
        let master = tmp.path().join("switch");
        std::fs::create_dir_all(&master).unwrap();
        for f in ["accounts.csv", "meters.csv", "payments.csv"] {
            std::fs::copy(root().join("sample-data/master").join(f), master.join(f)).unwrap();
        }
        std::fs::copy(
            root().join("sample-data/opening_balances.csv"),
            master.join("opening_balances.csv"),
        )
        .unwrap();
        // October of the sample lake as the switching first run.
        let first = |out: &std::path::Path| {
            let mut o = BillRunOptions::new(
                root().join("sample-data"),
                &master,
                root().join("tariffs"),
                "2026-10",
                out,
            );
            o.settled_through = "2026-09-30".parse().ok();
            bill_run(&o).unwrap()
        };
        let out = tmp.path().join("2026-10");
        let summary = first(&out);
        let imported = summary.opening_balances.unwrap();
        assert_eq!(
            (imported.accounts, imported.owed),
            (4, "2112.85".parse().unwrap())
        );
        let m = manifest(&out);
        assert_eq!(m["opening_balances"]["accounts"], 4);
        assert_eq!(m["opening_balances"]["owed"], "2112.85");
        assert_eq!(m["opening_balances"]["credit"], "60.00");
        // The overdue opening bills bear late fees.
        let fees: Vec<String> = late_fees(&out).into_iter().map(|l| l.0).collect();
        assert!(fees.contains(&"A000000002".to_string()), "{fees:?}");
        assert!(fees.contains(&"A000000005".to_string()), "{fees:?}");
        // A000000003 owed a bill and had 10.00 in credit: the credit pays
        // like a payment, so it owes 10.00 less at the end of October than
        // without it (net of any change in its own bill).
        let path = master.join("opening_balances.csv");
        let csv = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, csv.replace("A000000003,2026-09-30,,-10.00,\n", "")).unwrap();
        let without = tmp.path().join("without");
        first(&without);
        let owes = |run: &std::path::Path| -> (Decimal, Decimal) {
            let st = meterflow::billing::arrears::read_state(
                &run.join("arrears.parquet"),
                "2026-10-31".parse().unwrap(),
            )
            .unwrap();
            let a = &st.accounts["A000000003"];
            (a.open.iter().map(|o| o.unpaid).sum(), a.credit)
        };
        let ((with, c1), (wo, c2)) = (owes(&out), owes(&without));
        assert!(wo >= Decimal::from(10), "{wo}");
        assert_eq!((c1, c2), (Decimal::ZERO, Decimal::ZERO));
        let bill = |run: &std::path::Path| totals(run)["A000000003"];
        assert_eq!(wo - with, Decimal::from(10) - (bill(&out) - bill(&without)));
    }

    /// Removes the rows of `path` whose column `col` is `account`.
    fn drop_rows(path: &std::path::Path, col: usize, account: &str) {
        let csv = std::fs::read_to_string(path).unwrap();
        let kept: String = csv
            .lines()
            .filter(|l| l.split(',').nth(col) != Some(account))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(kept.len() < csv.len());
        std::fs::write(path, kept).unwrap();
    }

    #[test]
    fn an_account_failing_in_a_revision_keeps_its_issued_bill_in_the_state() {
        // It loses its meters: the re-run cannot bill it.
        let (was, revised) =
            revised_without(|lake, a| drop_rows(&lake.join("master/meters.csv"), 1, a));
        // Its October bill still stands: the state is the issued one's.
        assert_eq!(revised, Some(was));
    }

    #[test]
    fn an_account_gone_from_accounts_csv_in_a_revision_keeps_its_issued_bill_in_the_state() {
        let (was, revised) =
            revised_without(|lake, a| drop_rows(&lake.join("master/accounts.csv"), 0, a));
        // Carried from the issued run's state, not September's: its October
        // bill stands.
        assert_eq!(revised, Some(was));
    }

    #[test]
    fn fleet_files_are_sorted_by_meter_id_with_replacement_meters_last() {
        // Bill-run passes skip pages by their meter-id range: that needs the
        // simulator's files sorted like the lake's.
        let tmp = tempfile::tempdir().unwrap();
        let lake = tmp.path().join("fleet");
        fleet(&lake);
        let mut replacements = 0;
        for entry in walk(&lake.join("readings")) {
            let batches = meterflow::store::reader::read_file(&entry).unwrap();
            let mut ids: Vec<String> = Vec::new();
            for b in &batches {
                let col = b.column_by_name("meter_id").unwrap();
                let col = col
                    .as_any()
                    .downcast_ref::<arrow::array::StringArray>()
                    .unwrap();
                ids.extend(col.iter().map(|v| v.unwrap().to_string()));
            }
            assert!(ids.windows(2).all(|w| w[0] <= w[1]), "{}", entry.display());
            replacements += ids.iter().filter(|i| i.starts_with('9')).count();
        }
        assert!(replacements > 0, "the fleet has exchanged meters");
    }

    /// A 61-day `--interval` fleet (September: critical-peak hours every
    /// day; October: holidays and an announced critical-peak day) billed for
    /// both months: no clean meter gets `interval_mismatch`, every row lies
    /// in the partition of its own UTC date, each local day's intervals add
    /// up exactly to the day's total-register advance, and on every day
    /// whose schedule the meters' TOU tables know, the intervals the biller
    /// assigns to each TOU period add up to that period's tariff register.
    #[test]
    fn an_interval_fleet_bills_without_interval_mismatch_and_files_rows_by_their_own_date() {
        use arrow::array::{Array, Decimal128Array, StringArray, TimestampMillisecondArray};
        use chrono::NaiveDate;
        use meterflow::billing::period::{local_date_minute, local_midnight_ms};
        use meterflow::tariff::tou::DayType;
        use std::collections::HashMap;
        let tmp = tempfile::tempdir().unwrap();
        let lake = tmp.path().join("fleet");
        let mut o = FleetOptions::new(&lake);
        o.meters = 200;
        o.anomaly_per_mille = 100;
        o.start = "2026-09-01".parse().unwrap();
        o.days = 61;
        o.interval = true;
        generate(&o, &|_, _| {}).unwrap();

        // Rows by meter: (ts, channel, scaled value); each checked against its partition.
        let mut rows: HashMap<String, Vec<(i64, String, i128)>> = HashMap::new();
        let mut interval_rows = 0usize;
        for file in walk(&lake.join("readings")) {
            let dir = file
                .parent()
                .unwrap()
                .file_name()
                .unwrap()
                .to_str()
                .unwrap();
            let part: NaiveDate = dir.strip_prefix("date=").unwrap().parse().unwrap();
            for b in meterflow::store::reader::read_file(&file).unwrap() {
                let col = |n: &str| b.column_by_name(n).unwrap().clone();
                let (id, ts, ch, v) = (col("meter_id"), col("ts"), col("channel"), col("value"));
                let id = id.as_any().downcast_ref::<StringArray>().unwrap();
                let ts = ts
                    .as_any()
                    .downcast_ref::<TimestampMillisecondArray>()
                    .unwrap();
                let ch = ch.as_any().downcast_ref::<StringArray>().unwrap();
                let v = v.as_any().downcast_ref::<Decimal128Array>().unwrap();
                for i in 0..b.num_rows() {
                    let t = ts.value(i);
                    let date = chrono::DateTime::from_timestamp_millis(t)
                        .unwrap()
                        .date_naive();
                    assert_eq!(
                        date,
                        part,
                        "{} {} at {t} filed under {}",
                        id.value(i),
                        ch.value(i),
                        file.display()
                    );
                    if ch.value(i) == "import_active_interval" {
                        interval_rows += 1;
                    }
                    rows.entry(id.value(i).to_string()).or_default().push((
                        t,
                        ch.value(i).to_string(),
                        v.value(i),
                    ));
                }
            }
        }
        assert!(
            interval_rows > 180 * 61 * 96,
            "{interval_rows} interval rows"
        );

        // Bill both months; an account is clean if neither bill carries a
        // flag of the simulator's deliberate anomalies.
        let anomalies = [
            "gap",
            "negative_step",
            "spike",
            "rollover",
            "meter_exchange",
        ];
        let mut bills: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for period in ["2026-09", "2026-10"] {
            let out = tmp.path().join(period);
            let mut p = opts(&lake, &out);
            p.period = period.into();
            bill_run(&p).unwrap();
            for (account, (flags, _, _)) in ytd(&out) {
                bills.entry(account).or_default().push(flags);
            }
            for (account, code, detail) in exceptions(&out) {
                assert!(
                    !["no_tou_split", "calendar_missing"].contains(&code.as_str())
                        && !detail.contains("interval"),
                    "{period} {account}: {code} {detail}"
                );
            }
        }
        let clean: Vec<&String> = bills
            .iter()
            .filter(|(_, f)| {
                f.len() == 2 && !f.iter().any(|f| anomalies.iter().any(|a| f.contains(a)))
            })
            .map(|(a, _)| a)
            .collect();
        assert!(clean.len() >= 170, "{} clean accounts", clean.len());
        for a in &clean {
            for f in &bills[*a] {
                for bad in ["interval_mismatch", "interval_estimated"] {
                    assert!(!f.contains(bad), "{a}: {f}");
                }
            }
        }

        // Day by day, for the clean meters: intervals against the registers.
        let tariffs = meterflow::tariff::load_dir(&root().join("tariffs")).unwrap();
        let tou_tariff = tariffs.get("gd-tou-commercial").unwrap();
        let accounts = std::fs::read_to_string(lake.join("master/accounts.csv")).unwrap();
        let tariff_of: HashMap<&str, &str> = accounts
            .lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                (f[0], f[10])
            })
            .collect();
        let modulus = 1_000_000i128 * 10_000;
        let (mut tou_meters, mut tou_days) = (0, 0);
        for index in 0..o.meters {
            let account = meterflow::sim::fleet::account_id(index);
            if !clean.contains(&&account) {
                continue;
            }
            let tou = tariff_of[account.as_str()] == "gd-tou-commercial";
            tou_meters += usize::from(tou);
            let mut registers: HashMap<(i64, &str), i128> = HashMap::new();
            let mut intervals_at: BTreeMap<i64, i128> = BTreeMap::new();
            for (ts, ch, v) in &rows[&meterflow::sim::fleet::meter_id(index)] {
                if ch == "import_active_interval" {
                    intervals_at.insert(*ts, *v);
                } else {
                    registers.insert((*ts, ch.as_str()), *v);
                }
            }
            let register = |ch: &str, ts: i64| {
                *registers
                    .get(&(ts, ch))
                    .unwrap_or_else(|| panic!("{account}: no {ch} at {ts}"))
            };
            for day in 0..o.days {
                let date = o.start + chrono::Days::new(day as u64);
                let (from, to) = (
                    local_midnight_ms(date, 8 * 3600),
                    local_midnight_ms(date.succ_opt().unwrap(), 8 * 3600),
                );
                let delta = |ch: &str| (register(ch, to) - register(ch, from)).rem_euclid(modulus);
                let intervals: Vec<(i64, i128)> = intervals_at
                    .range(from + 1..=to)
                    .map(|(t, v)| (*t, *v))
                    .collect();
                assert_eq!(intervals.len(), 96, "{account} {date}");
                assert_eq!(
                    intervals.iter().map(|r| r.1).sum::<i128>(),
                    delta("import_active_total"),
                    "{account} {date}: intervals against the total register"
                );
                if !tou {
                    continue;
                }
                let t = tou_tariff.version_on(date).unwrap().tou.as_ref().unwrap();
                // An announced critical-peak day is unknown to the meters'
                // TOU tables: the biller's split from intervals differs from
                // the tariff registers there (only the total matches).
                if t.schedule(date).unwrap().1 == DayType::CriticalPeak
                    && !(7..=9).contains(&chrono::Datelike::month(&date))
                {
                    continue;
                }
                tou_days += 1;
                let mut by_period = [0i128; 8];
                for (ts, v) in &intervals {
                    let (d, minute) = local_date_minute(ts - 900_000, 8 * 3600);
                    by_period[t.period_at(d, minute).unwrap() as usize] += v;
                }
                let mut want = [0i128; 8];
                for (r, ch) in [
                    "import_active_t1",
                    "import_active_t2",
                    "import_active_t3",
                    "import_active_t4",
                ]
                .iter()
                .enumerate()
                {
                    want[t.registers[r].unwrap() as usize] += delta(ch);
                }
                assert_eq!(by_period, want, "{account} {date}: periods against T1..T4");
            }
        }
        assert!(tou_meters >= 5, "{tou_meters} clean TOU meters");
        assert!(tou_days >= tou_meters * 60, "{tou_days} days compared");
    }

    /// Reads (account, code, detail) of every exception.
    fn exceptions(run: &std::path::Path) -> Vec<(String, String, String)> {
        let mut out = vec![];
        for b in batches(&run.join("exceptions.parquet")) {
            let (acc, code, detail) =
                (text(&b, "account_id"), text(&b, "code"), text(&b, "detail"));
            for i in 0..b.num_rows() {
                out.push((
                    acc.value(i).to_string(),
                    code.value(i).to_string(),
                    detail.value(i).to_string(),
                ));
            }
        }
        out
    }

    /// Every Parquet file under `dir`.
    fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p);
            }
        }
        out
    }

    #[test]
    fn a_run_directory_with_foreign_content_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let lake = tmp.path().join("fleet");
        fleet(&lake);
        let out = tmp.path().join("run");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("notes.txt"), "x").unwrap();
        assert!(bill_run(&opts(&lake, &out)).is_err());
    }

    #[test]
    fn an_output_that_cannot_be_written_fails_the_run_and_leaves_nothing() {
        // The bill run as a process whose files may not grow past 4 KiB
        // (`ulimit -f`, with SIGXFSZ ignored so a write fails with EFBIG
        // instead of killing the process): its outputs cannot be written, so
        // the run must fail naming the output and leave no run directory and
        // no staging directory behind.
        let tmp = tempfile::tempdir().unwrap();
        let lake = tmp.path().join("fleet");
        fleet(&lake);
        let out = tmp.path().join("run");
        let r = std::process::Command::new("bash")
            .arg("-c")
            .arg(r#"trap '' XFSZ; ulimit -f 4; exec "$0" "$@""#)
            .arg(crate::common::bin())
            .args(["--log", "warn", "bill", "--lake"])
            .arg(&lake)
            .arg("--master")
            .arg(lake.join("master"))
            .arg("--tariffs")
            .arg(root().join("tariffs"))
            .args(["--period", "2026-10", "--out"])
            .arg(&out)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "the run succeeded: {stderr}");
        assert!(
            ["bills.parquet", "bill_lines.parquet", "arrears.parquet"]
                .iter()
                .any(|f| stderr.contains(f)),
            "{stderr}"
        );
        assert!(!out.exists(), "a failed run left {}", out.display());
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "fleet")
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        // With room to write, the same run succeeds.
        assert!(bill_run(&opts(&lake, &out)).is_ok());
    }
}
