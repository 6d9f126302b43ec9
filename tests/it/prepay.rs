//! Prepayment: ledger idempotency on SQLite and PostgreSQL, payment files,
//! deduction runs against an independent recomputation from the tariff
//! engine, overlapping and SIGKILLed runs, streaming with Mosquitto, alerts.
//!
//! PostgreSQL: `DATABASE_URL` set -> must be reachable; unset -> tries
//! 127.0.0.1:5432, skipped with a printed reason when nothing answers.
//! Mosquitto: `MQTT_URL` likewise (127.0.0.1:1883).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meterflow::ledger::{self, Batch, EntryKind, Ledger, NewEntry, NoHook, Outcome};
use meterflow::model::{Channel, Protocol, Quality, Reading, Source};
use meterflow::prepay::alerts::Thresholds;
use meterflow::prepay::pricing::TariffPricer;
use meterflow::prepay::run::{run_batch, Fleet, PrepayHook, RunOptions};
use meterflow::tariff::price::{energy_charge, total, Usage};
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;

use super::common::bin;

// ---------- backends ----------

fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("t_{}_{}_{}", name, std::process::id(), nanos)
}

fn answers(addr: &str) -> bool {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
}

/// A PostgreSQL ledger URL with a fresh schema, or None (skipped, reason printed).
fn pg_url(test: &str) -> Option<String> {
    let base = match std::env::var("DATABASE_URL") {
        Ok(u) => u,
        Err(_) => {
            if !answers("127.0.0.1:5432") {
                eprintln!("SKIP {test} on PostgreSQL: DATABASE_URL unset and nothing answers at 127.0.0.1:5432");
                return None;
            }
            "postgres://postgres@127.0.0.1:5432/test".into()
        }
    };
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}schema={}", unique(test));
    // Reachability is a hard requirement once we decided to use it.
    ledger::open(&url).unwrap_or_else(|e| panic!("PostgreSQL at {base} unreachable: {e}"));
    Some(url)
}

/// The broker URL, or None (skipped, reason printed).
fn mqtt_url(test: &str) -> Option<String> {
    match std::env::var("MQTT_URL") {
        Ok(u) => {
            let hp = u
                .trim_start_matches("mqtt://")
                .trim_start_matches("tcp://")
                .to_string();
            assert!(
                answers(&hp),
                "MQTT_URL={u} is set but no broker answers there"
            );
            Some(u)
        }
        Err(_) if answers("127.0.0.1:1883") => Some("mqtt://127.0.0.1:1883".into()),
        Err(_) => {
            eprintln!("SKIP {test}: MQTT_URL unset and nothing answers at 127.0.0.1:1883");
            None
        }
    }
}

fn sqlite_url(dir: &Path) -> String {
    dir.join("ledger.sqlite").display().to_string()
}

fn entry(key: &str, account: &str, amount: Decimal) -> NewEntry {
    NewEntry {
        key: key.into(),
        account_id: account.into(),
        kind: EntryKind::TopUp,
        amount,
        ts_ms: 1_790_000_000_000,
        source: "wechat".into(),
        detail: String::new(),
    }
}

fn duplicate_ignored_conflict_rejected(l: &mut dyn Ledger) {
    let b = Batch {
        entries: vec![entry("k1", "A1", dec!(100)), entry("k2", "A1", dec!(50.25))],
        ..Default::default()
    };
    let r = l.commit(&b, &NoHook).unwrap();
    assert_eq!(r.outcomes, vec![Outcome::Inserted, Outcome::Inserted]);
    let again = l.commit(&b, &NoHook).unwrap();
    assert_eq!(again.outcomes, vec![Outcome::Duplicate, Outcome::Duplicate]);
    let conflicting = Batch {
        entries: vec![entry("k1", "A1", dec!(999)), entry("k3", "A2", dec!(-1.5))],
        ..Default::default()
    };
    let r = l.commit(&conflicting, &NoHook).unwrap();
    assert!(matches!(r.outcomes[0], Outcome::Conflict { .. }));
    assert_eq!(r.outcomes[1], Outcome::Inserted);
    assert_eq!(l.balance("A1").unwrap(), dec!(150.25));
    assert_eq!(l.balance("A2").unwrap(), dec!(-1.5));
    let checks = l.check().unwrap();
    assert!(
        checks.iter().all(|c| c.ok() && c.entries >= 0),
        "{checks:?}"
    );
    assert_eq!(l.entries(Some("A1"), 0, 10).unwrap().len(), 2);
}

/// A batch that names keys that must be absent is stale, and writes
/// nothing, when any one of them is stored.
fn a_batch_is_stale_when_any_key_it_needs_absent_is_stored(l: &mut dyn Ledger) {
    let put = Batch {
        entries: vec![entry("open:B", "B", dec!(1))],
        ..Default::default()
    };
    assert!(!l.commit(&put, &NoHook).unwrap().stale);
    let with_absent = |keys: &[&str]| Batch {
        entries: vec![entry("pay:x", "A", dec!(2))],
        absent_keys: keys.iter().map(|k| k.to_string()).collect(),
        ..Default::default()
    };
    for keys in [
        &["open:A1", "open:B"][..],
        &["open:B"],
        &["open:C", "open:B", "open:D"],
    ] {
        assert!(
            l.commit(&with_absent(keys), &NoHook).unwrap().stale,
            "{keys:?}"
        );
    }
    assert_eq!(
        l.balance("A").unwrap(),
        dec!(0),
        "a stale batch writes nothing"
    );
    assert!(!l.commit(&with_absent(&[]), &NoHook).unwrap().stale);
    assert!(
        !l.commit(&with_absent(&["open:A1", "open:C"]), &NoHook)
            .unwrap()
            .stale
    );
    assert_eq!(
        l.balance("A").unwrap(),
        dec!(2),
        "once: the second is a duplicate"
    );
}

#[test]
fn absent_keys_are_checked_as_a_batch_on_sqlite() {
    let d = tempfile::tempdir().unwrap();
    let mut l = ledger::open_migrated(&sqlite_url(d.path())).unwrap();
    a_batch_is_stale_when_any_key_it_needs_absent_is_stored(l.as_mut());
}

#[test]
fn absent_keys_are_checked_as_a_batch_on_postgres() {
    let Some(url) = pg_url("absent") else { return };
    let mut l = ledger::open_migrated(&url).unwrap();
    a_batch_is_stale_when_any_key_it_needs_absent_is_stored(l.as_mut());
}

#[test]
fn sqlite_ledger_ignores_duplicate_keys_and_rejects_conflicting_ones() {
    let d = tempfile::tempdir().unwrap();
    let mut l = ledger::open_migrated(&sqlite_url(d.path())).unwrap();
    l.migrate().unwrap(); // migrations are idempotent
    duplicate_ignored_conflict_rejected(l.as_mut());
}

#[test]
fn postgres_ledger_ignores_duplicate_keys_and_rejects_conflicting_ones() {
    let Some(url) = pg_url("dup") else { return };
    let mut l = ledger::open_migrated(&url).unwrap();
    l.migrate().unwrap();
    duplicate_ignored_conflict_rejected(l.as_mut());
}

#[test]
fn ledger_export_writes_every_entry_to_parquet_with_exact_amounts() {
    let d = tempfile::tempdir().unwrap();
    let mut l = ledger::open_migrated(&sqlite_url(d.path())).unwrap();
    duplicate_ignored_conflict_rejected(l.as_mut());
    let out = d.path().join("entries.parquet");
    assert_eq!(ledger::export::export_parquet(l.as_mut(), &out).unwrap(), 3);
    let batches = meterflow::store::reader::read_file(&out).unwrap();
    let amounts = batches[0]
        .column(4)
        .as_any()
        .downcast_ref::<arrow::array::Decimal128Array>()
        .unwrap();
    assert_eq!(amounts.value(1), 502_500); // 50.25 at scale 4
}

// ---------- payment files ----------

fn write_payments(path: &Path, rows: &[(&str, &str, &str, &str)]) {
    let mut s = String::from("txn_id,channel,account_id,amount,paid_at\n");
    for (t, c, a, amt) in rows {
        s.push_str(&format!("{t},{c},{a},{amt},2026-10-01T09:51:53Z\n"));
    }
    std::fs::write(path, s).unwrap();
}

fn payment_files_credit_once(url: &str, dir: &Path) {
    let f1 = dir.join("wechat-1001.csv");
    let f2 = dir.join("wechat-1002.csv");
    write_payments(
        &f1,
        &[
            ("W1", "wechat", "A1", "100.00"),
            ("W2", "wechat", "A2", "30"),
        ],
    );
    // Overlaps f1 in W2, adds W3.
    write_payments(
        &f2,
        &[
            ("W2", "wechat", "A2", "30.00"),
            ("W3", "alipay", "A1", "20.5"),
        ],
    );
    let run = |files: &[&Path]| {
        let mut c = Command::new(bin());
        c.args(["ledger", "import-payments", "--ledger", url]);
        c.args(files);
        c.output().unwrap()
    };
    let o = run(&[&f1, &f1, &f2]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&[&f2]);
    assert!(o.status.success());
    let mut l = ledger::open(url).unwrap();
    assert_eq!(l.balance("A1").unwrap(), dec!(120.5));
    assert_eq!(l.balance("A2").unwrap(), dec!(30));
    // A re-used transaction id with another amount is rejected and reported; exit 2.
    let f3 = dir.join("bad.csv");
    write_payments(
        &f3,
        &[
            ("W1", "wechat", "A1", "1000.00"),
            ("W9", "counter", "A2", "5"),
        ],
    );
    let o = run(&[&f3]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("conflict: pay:wechat:W1"), "{err}");
    assert_eq!(l.balance("A1").unwrap(), dec!(120.5));
    assert_eq!(l.balance("A2").unwrap(), dec!(35));
}

#[test]
fn importing_duplicate_and_overlapping_payment_files_credits_each_payment_once_on_sqlite() {
    let d = tempfile::tempdir().unwrap();
    payment_files_credit_once(&sqlite_url(d.path()), d.path());
}

#[test]
fn importing_duplicate_and_overlapping_payment_files_credits_each_payment_once_on_postgres() {
    let Some(url) = pg_url("pay") else { return };
    let d = tempfile::tempdir().unwrap();
    payment_files_credit_once(&url, d.path());
}

// ---------- a prepaid fleet and its lake ----------

const OCT1_LOCAL_MIDNIGHT: i64 = 1_790_784_000_000; // 2026-09-30T16:00Z
const DAY: i64 = 86_400_000;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    lake: PathBuf,
    master: PathBuf,
    tariffs: PathBuf,
    /// meter -> snapshots (ts, register)
    readings: BTreeMap<String, Vec<(i64, Decimal)>>,
}

fn meter_id(i: usize) -> String {
    format!("{:012}", 500_000_000_000u64 + i as u64)
}

/// A simulated reading of meter `i`.
fn sim_reading(i: usize, ts: i64, channel: Channel, value: Decimal) -> Reading {
    super::common::reading(&meter_id(i), ts, channel, value)
}

fn write_lake(root: &Path, readings: &[Reading]) -> PathBuf {
    let lake = root.join("lake");
    let mut l =
        meterflow::store::Lake::open(&lake, meterflow::store::LakeOptions::new("t")).unwrap();
    l.accept(readings).unwrap();
    l.flush().unwrap();
    lake
}

/// `n` prepaid accounts (one meter each) on bj-residential-monthly, daily
/// snapshots at local midnight from 1 Oct through 1 Nov 2026 (32 readings).
fn fixture(n: usize, seed: u64) -> Fixture {
    fixture_with_spike(n, seed, None)
}

/// Like [`fixture`]; `spike = Some((i, day))` makes meter `i` read 5000 kWh
/// too high on that day only (a transient register spike).
fn fixture_with_spike(n: usize, seed: u64, spike: Option<(usize, i64)>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let master = root.join("master");
    std::fs::create_dir_all(&master).unwrap();
    let mut acc = String::from("account_id,customer_class,tariff_id,payment_mode\n");
    let mut met = String::from("meter_id,account_id,ct_ratio,pt_ratio,installed_on\n");
    for i in 0..n {
        acc.push_str(&format!(
            "P{i:05},residential,bj-residential-monthly,prepaid\n"
        ));
        met.push_str(&format!("{},P{i:05},1,1,2015-01-01\n", meter_id(i)));
    }
    // A postpaid account is never deducted.
    acc.push_str("Q00000,residential,bj-residential-monthly,postpaid\n");
    met.push_str(&format!("{},Q00000,1,1,2015-01-01\n", meter_id(99_999)));
    std::fs::write(master.join("accounts.csv"), acc).unwrap();
    std::fs::write(master.join("meters.csv"), met).unwrap();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut readings = BTreeMap::new();
    let mut all = Vec::new();
    for i in (0..n).chain([99_999]) {
        let mut v = Decimal::new(rng.gen_range(0..5_000_000), 2);
        let mut snaps = Vec::new();
        for d in 0..32 {
            if d > 0 {
                // Some days cross tier limits: 0..30 kWh a day, a few heavy users.
                let heavy = if i % 7 == 0 { 3 } else { 1 };
                v += Decimal::new(rng.gen_range(0..3000) * heavy, 2);
            }
            let ts = OCT1_LOCAL_MIDNIGHT + d * DAY;
            let shown = if spike == Some((i, d)) {
                v + dec!(5000)
            } else {
                v
            };
            snaps.push((ts, shown));
            all.push(sim_reading(i, ts, Channel::ImportActiveTotal, shown));
        }
        readings.insert(meter_id(i), snaps);
    }
    let lake = write_lake(&root, &all);
    let tariffs = Path::new(env!("CARGO_MANIFEST_DIR")).join("tariffs");
    Fixture {
        _dir: dir,
        root,
        lake,
        master,
        tariffs,
        readings,
    }
}

/// Independent recomputation: each prepaid account's October energy bill
/// from the tariff engine, on the month's total consumption.
fn expected_bills(f: &Fixture) -> BTreeMap<String, Decimal> {
    let set = meterflow::tariff::load_dir(&f.tariffs).unwrap();
    let t = set.get("bj-residential-monthly").unwrap();
    let v = t
        .version_on(chrono::NaiveDate::from_ymd_opt(2026, 10, 1).unwrap())
        .unwrap();
    let limits = v.tiers.as_ref().unwrap().limits.clone();
    let mut out = BTreeMap::new();
    for (m, snaps) in &f.readings {
        if m == &meter_id(99_999) {
            continue;
        }
        let kwh = snaps.last().unwrap().1 - snaps[0].1;
        let bill = total(&energy_charge(
            v,
            &limits,
            &Usage::default(),
            &Usage::total(kwh),
        ));
        let i: usize = (m.parse::<u64>().unwrap() - 500_000_000_000) as usize;
        out.insert(format!("P{i:05}"), -bill);
    }
    out
}

fn ledger_balances(url: &str) -> BTreeMap<String, Decimal> {
    let mut l = ledger::open(url).unwrap();
    let checks = l.check().unwrap();
    assert!(
        checks.iter().all(|c| c.ok() && c.entries >= 0),
        "cached balance differs from the sum of entries: {checks:?}"
    );
    l.balances()
        .unwrap()
        .into_iter()
        .filter(|(_, b)| !b.is_zero())
        .collect()
}

fn assert_matches_recomputation(url: &str, f: &Fixture) {
    let want: BTreeMap<String, Decimal> = expected_bills(f)
        .into_iter()
        .filter(|(_, b)| !b.is_zero())
        .collect();
    let got = ledger_balances(url);
    assert_eq!(
        got, want,
        "ledger differs from the independent recomputation"
    );
}

fn prepay_run_args(f: &Fixture, url: &str, through: &str, chunk: usize) -> Vec<String> {
    vec![
        "prepay".into(),
        "run".into(),
        "--ledger".into(),
        url.into(),
        "--lake".into(),
        f.lake.display().to_string(),
        "--master".into(),
        f.master.display().to_string(),
        "--tariffs".into(),
        f.tariffs.display().to_string(),
        "--through".into(),
        through.into(),
        "--chunk".into(),
        chunk.to_string(),
    ]
}

fn run_lib(f: &Fixture, url: &str, through_ms: i64) -> meterflow::prepay::run::RunStats {
    batch_run(&f.lake, &f.master, &f.tariffs, url, through_ms, 7, true)
}

#[test]
fn daily_deductions_of_a_month_add_up_to_its_bill_and_rerunning_changes_nothing() {
    let f = fixture(40, 1);
    let url = sqlite_url(&f.root);
    // Deduct in three steps (mid-month, again mid-month, month end): same result as one run.
    let s1 = run_lib(&f, &url, OCT1_LOCAL_MIDNIGHT + 10 * DAY);
    assert!(s1.deductions > 0);
    run_lib(&f, &url, OCT1_LOCAL_MIDNIGHT + 10 * DAY);
    let s3 = run_lib(&f, &url, OCT1_LOCAL_MIDNIGHT + 31 * DAY);
    assert!(s3.deductions > 0);
    assert_matches_recomputation(&url, &f);
    let again = run_lib(&f, &url, OCT1_LOCAL_MIDNIGHT + 31 * DAY);
    assert_eq!((again.deductions, again.conflicts), (0, 0));
    assert_matches_recomputation(&url, &f);
}

fn deduction_times(url: &str, account: &str) -> Vec<i64> {
    let mut l = ledger::open(url).unwrap();
    l.entries(Some(account), 0, 10_000)
        .unwrap()
        .into_iter()
        .filter(|e| e.entry.kind == EntryKind::Deduction)
        .map(|e| e.entry.ts_ms)
        .collect()
}

#[test]
fn a_meter_with_a_one_day_spike_keeps_being_deducted_and_pays_the_bill_of_its_validated_use() {
    // Meter 3 reads 5000 kWh too high on 10 October only. Its October bill is
    // the tariff on (1 Nov reading - 1 Oct reading): the spike is not use.
    let f = fixture_with_spike(12, 5, Some((3, 9)));
    let url = sqlite_url(&f.root);
    let s = run_lib(&f, &url, OCT1_LOCAL_MIDNIGHT + 31 * DAY);
    assert_eq!((s.spikes, s.backwards, s.conflicts), (1, 0, 0));
    let spike_ts = OCT1_LOCAL_MIDNIGHT + 9 * DAY;
    let times = deduction_times(&url, "P00003");
    assert!(!times.contains(&spike_ts), "the spike itself is charged");
    assert!(
        times.iter().filter(|t| **t > spike_ts).count() >= 15,
        "the meter stalled after the spike: {times:?}"
    );
    assert_matches_recomputation(&url, &f);
}

#[test]
fn a_jump_held_at_the_end_of_one_run_is_judged_by_the_next_run() {
    // The streaming case: the spike is the newest reading when a run ends, so
    // it is held in the cursor (durably) and the next run drops it.
    let f = fixture_with_spike(12, 6, Some((3, 9)));
    let url = sqlite_url(&f.root);
    let s1 = run_lib(&f, &url, OCT1_LOCAL_MIDNIGHT + 9 * DAY);
    assert_eq!((s1.held, s1.spikes), (1, 0));
    let mut l = ledger::open(&url).unwrap();
    let c = l
        .cursor(&meter_id(3), "import_active_total")
        .unwrap()
        .unwrap();
    assert_eq!(c.held.map(|h| h.0), Some(OCT1_LOCAL_MIDNIGHT + 9 * DAY));
    assert_eq!(c.last_ts_ms, OCT1_LOCAL_MIDNIGHT + 8 * DAY);
    drop(l);
    let s2 = run_lib(&f, &url, OCT1_LOCAL_MIDNIGHT + 31 * DAY);
    assert_eq!((s2.spikes, s2.backwards), (1, 0));
    assert_matches_recomputation(&url, &f);
}

#[test]
fn the_cli_run_through_month_end_deducts_the_month_on_postgres() {
    let Some(url) = pg_url("run") else { return };
    let f = fixture(25, 2);
    let o = Command::new(bin())
        .args(prepay_run_args(&f, &url, "2026-10-31T24:00", 10))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_matches_recomputation(&url, &f);
}

fn overlapping_runs(url: &str, f: &Fixture) {
    let children: Vec<_> = (0..3)
        .map(|_| {
            Command::new(bin())
                .args(prepay_run_args(f, url, "2026-10-31T24:00", 3))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_matches_recomputation(url, f);
}

#[test]
fn overlapping_runs_deduct_each_interval_once_on_sqlite() {
    let f = fixture(30, 3);
    let url = sqlite_url(&f.root);
    ledger::open_migrated(&url).unwrap();
    overlapping_runs(&url, &f);
}

#[test]
fn overlapping_runs_deduct_each_interval_once_on_postgres() {
    let Some(url) = pg_url("overlap") else { return };
    let f = fixture(30, 4);
    ledger::open_migrated(&url).unwrap();
    overlapping_runs(&url, &f);
}

fn kill_at(child: &mut std::process::Child, after: Duration) {
    std::thread::sleep(after);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = child.wait();
}

#[test]
fn sigkill_of_prepay_run_at_random_points_leaves_no_double_or_missing_deduction() {
    let f = fixture(120, 5);
    let url = sqlite_url(&f.root);
    ledger::open_migrated(&url).unwrap();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(42);
    // 12 kills at random points, each followed by nothing: the next run carries on.
    for _ in 0..12 {
        let mut c = Command::new(bin())
            .args(prepay_run_args(&f, &url, "2026-10-31T24:00", 2))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        kill_at(&mut c, Duration::from_millis(rng.gen_range(20..700)));
        // Whatever was committed is consistent right now.
        ledger_balances(&url);
    }
    let o = Command::new(bin())
        .args(prepay_run_args(&f, &url, "2026-10-31T24:00", 2))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_matches_recomputation(&url, &f);
}

// ---------- streaming ----------

fn write_stream_config(
    f: &Fixture,
    ledger: &str,
    mqtt: &str,
    client: &str,
    topic: &str,
    group: Option<&str>,
) -> PathBuf {
    let p = f.root.join(format!("stream-{client}.toml"));
    let group = group
        .map(|g| format!("shared_group = \"{g}\"\n"))
        .unwrap_or_default();
    std::fs::write(
        &p,
        format!(
            "ledger = \"{ledger}\"\nmaster = \"{}\"\ntariffs = \"{}\"\nalerts_dataset = \"{}\"\n[mqtt]\nurl = \"{mqtt}\"\nclient_id = \"{client}\"\ntopic = \"{topic}/#\"\nalerts_topic = \"{topic}-alerts\"\n{group}[batch]\nmax_messages = 50\nmax_wait_ms = 10\n",
            f.master.display(),
            f.tariffs.display(),
            f.root.join("alerts-out").display(),
        ),
    )
    .unwrap();
    p
}

fn spawn_stream(cfg: &Path, idle_exit: Option<u64>) -> std::process::Child {
    let mut c = Command::new(bin());
    c.args(["stream", "--config"]).arg(cfg);
    if let Some(s) = idle_exit {
        c.args(["--idle-exit-secs", &s.to_string()]);
    }
    c.stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env("RUST_LOG", "info")
        .spawn()
        .unwrap()
}

/// Waits until the stream logged its confirmed subscription.
fn wait_subscribed(child: &mut std::process::Child) -> std::thread::JoinHandle<()> {
    use std::io::BufRead;
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let mut sent = false;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if !sent && line.contains("subscription confirmed") {
                let _ = tx.send(());
                sent = true;
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("stream subscribed");
    h
}

/// Publishes every snapshot (one message per meter and day, canonical JSON) at QoS 1.
fn publish_fixture(url: &str, topic: &str, f: &Fixture) {
    let days = f.readings.values().next().unwrap().len();
    let mut msgs = Vec::new();
    for d in 0..days {
        for (m, snaps) in &f.readings {
            let r = Reading {
                meter_id: m.clone(),
                ts_ms: snaps[d].0,
                channel: Channel::ImportActiveTotal,
                value: snaps[d].1,
                quality: Quality::OK,
                source: Source {
                    protocol: Protocol::Mqtt,
                    collector: "t".into(),
                    address: topic.into(),
                },
                received_ms: snaps[d].0,
            };
            msgs.push((
                format!("{topic}/{m}"),
                meterflow::ingest::decode::encode_canonical("t", &[r]),
            ));
        }
    }
    meterflow::prepay::sinks::publish_qos1(url, &unique("pub"), &msgs).unwrap();
}

#[test]
fn sigkill_of_stream_at_random_points_gives_the_same_ledger_as_no_crash() {
    let Some(mqtt) = mqtt_url("stream kill") else {
        return;
    };
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    // 8 iterations, each with a fresh ledger, topic and session, killed 1..3 times.
    for it in 0..8 {
        let f = fixture(15, 100 + it);
        let url = sqlite_url(&f.root);
        let client = unique("kill");
        let topic = format!("meterflow-test/{client}");
        let cfg = write_stream_config(&f, &url, &mqtt, &client, &topic, None);
        let mut c = spawn_stream(&cfg, None);
        let _h = wait_subscribed(&mut c);
        publish_fixture(&mqtt, &topic, &f);
        kill_at(&mut c, Duration::from_millis(rng.gen_range(0..600)));
        for _ in 0..rng.gen_range(0..3) {
            let mut c = spawn_stream(&cfg, None);
            kill_at(&mut c, Duration::from_millis(rng.gen_range(100..900)));
        }
        let c = spawn_stream(&cfg, Some(3));
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_matches_recomputation(&url, &f);
    }
}

#[test]
fn two_stream_processes_share_one_subscription_and_one_postgres_ledger() {
    let Some(mqtt) = mqtt_url("shared stream") else {
        return;
    };
    let Some(url) = pg_url("shared") else { return };
    let f = fixture(30, 9);
    let topic = format!("meterflow-test/{}", unique("shared"));
    let group = unique("g");
    let cfg_a = write_stream_config(&f, &url, &mqtt, &unique("a"), &topic, Some(&group));
    let cfg_b = write_stream_config(&f, &url, &mqtt, &unique("b"), &topic, Some(&group));
    ledger::open_migrated(&url).unwrap();
    let mut a = spawn_stream(&cfg_a, Some(8));
    let mut b = spawn_stream(&cfg_b, Some(8));
    let ha = wait_subscribed(&mut a);
    let hb = wait_subscribed(&mut b);
    publish_fixture(&mqtt, &topic, &f);
    let deadline = Instant::now() + Duration::from_secs(120);
    for c in [&mut a, &mut b] {
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                assert!(s.success());
                break;
            }
            assert!(Instant::now() < deadline, "stream did not finish");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let _ = (ha.join(), hb.join());
    // A member that idled out while the broker still routed messages to its
    // persistent session gets them on its next start: drain both sessions.
    for cfg in [&cfg_a, &cfg_b] {
        let o = spawn_stream(cfg, Some(3)).wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_matches_recomputation(&url, &f);
}

#[test]
fn a_suspect_reading_after_a_baseline_inserts_no_entry_and_does_not_move_the_cursor() {
    let Some(mqtt) = mqtt_url("stream suspect") else {
        return;
    };
    let f = fixture(1, 41);
    let url = sqlite_url(&f.root);
    let client = unique("suspect");
    let topic = format!("meterflow-test/{client}");
    let cfg = write_stream_config(&f, &url, &mqtt, &client, &topic, None);
    let mut c = spawn_stream(&cfg, Some(3));
    let _h = wait_subscribed(&mut c);
    let m = meter_id(0);
    let (base_ts, base) = f.readings[&m][0];
    let msg = |ts: i64, value: Decimal, quality: Quality| {
        let mut r = sim_reading(0, ts, Channel::ImportActiveTotal, value);
        r.quality = quality;
        (
            format!("{topic}/{m}"),
            meterflow::ingest::decode::encode_canonical("t", &[r]),
        )
    };
    meterflow::prepay::sinks::publish_qos1(
        &mqtt,
        &unique("pub"),
        &[
            msg(base_ts, base, Quality::OK),
            msg(base_ts + DAY, base + dec!(10), Quality::SUSPECT),
        ],
    )
    .unwrap();
    assert!(c.wait().unwrap().success());
    let mut l = ledger::open(&url).unwrap();
    assert!(l.entries(None, 0, 100).unwrap().is_empty());
    let cursors = l.cursors().unwrap();
    assert_eq!(cursors.len(), 1);
    assert_eq!(
        (cursors[0].last_ts_ms, cursors[0].last_value),
        (base_ts, base)
    );
}

// ---------- alerts ----------

#[test]
fn alerts_fire_once_per_level_crossing_are_rearmed_by_a_top_up_and_land_in_the_dataset_once() {
    let f = fixture(1, 11);
    let url = sqlite_url(&f.root);
    let mut l = ledger::open_migrated(&url).unwrap();
    let fleet = Fleet::load(&f.master).unwrap();
    let th = Thresholds::builtin();
    let hook = PrepayHook {
        now_ms: Some(1_790_000_000_000),
        ..PrepayHook::new(&th, &fleet)
    };
    {
        let mut commit = |key: &str, amount: Decimal| {
            let mut e = entry(key, "P00000", amount);
            e.kind = if amount > Decimal::ZERO {
                EntryKind::TopUp
            } else {
                EntryKind::Deduction
            };
            l.commit(
                &Batch {
                    entries: vec![e],
                    ..Default::default()
                },
                &hook,
            )
            .unwrap()
            .outbox
            .len()
        };
        assert_eq!(commit("t1", dec!(60)), 0);
        assert_eq!(commit("d1", dec!(-15)), 1); // 45 < 50
        assert_eq!(commit("d2", dec!(-3)), 0); // still below 50, above 20
        assert_eq!(commit("d2", dec!(-3)), 0); // replayed entry: nothing
        assert_eq!(commit("t2", dec!(100)), 0); // 142: re-armed
        assert_eq!(commit("d3", dec!(-100)), 1); // 42 < 50 again: one new alert
    }
    let sinks = meterflow::prepay::sinks::Sinks {
        alerts_root: Some(f.root.clone()),
        ..Default::default()
    };
    let d = meterflow::prepay::sinks::deliver(l.as_mut(), &sinks, &mut |_, _| Ok(())).unwrap();
    assert_eq!(d.alerts, 2);
    // Delivering again sends nothing; the dataset holds each alert id once.
    assert_eq!(
        meterflow::prepay::sinks::deliver(l.as_mut(), &sinks, &mut |_, _| Ok(()))
            .unwrap()
            .alerts,
        0
    );
    let rows = meterflow::prepay::sinks::read_alerts_dataset(&f.root).unwrap();
    let mut ids: Vec<_> = rows.iter().map(|r| r.0.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!((rows.len(), ids.len()), (2, 2));
}

/// A webhook receiver answering one request per status, then gone: the
/// port and, from a thread, the requests it got.
fn webhook_receiver(statuses: &[&str]) -> (u16, std::thread::JoinHandle<Vec<String>>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let statuses: Vec<String> = statuses.iter().map(|s| s.to_string()).collect();
    let server = std::thread::spawn(move || {
        let mut bodies = Vec::new();
        // Statuses first: zip stops before accepting one connection too many.
        for (status, s) in statuses.iter().zip(listener.incoming()) {
            let mut s = s.unwrap();
            let mut buf = vec![0u8; 8192];
            let n = s.read(&mut buf).unwrap();
            bodies.push(String::from_utf8_lossy(&buf[..n]).to_string());
            let _ =
                s.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes());
        }
        bodies
    });
    (port, server)
}

fn pending_alert_ids(l: &mut dyn Ledger) -> Vec<String> {
    let mut ids: Vec<String> = l
        .pending_outbox_of("alert", 10_000)
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    ids.sort();
    ids
}

#[test]
fn an_alert_the_webhook_refused_stays_pending_until_it_answers() {
    let unavailable = "503 Service Unavailable";
    let (port, server) = webhook_receiver(&[unavailable, unavailable, "200 OK"]);
    let d = tempfile::tempdir().unwrap();
    let mut l = ledger::open_migrated(&sqlite_url(d.path())).unwrap();
    let th = Thresholds::builtin();
    let fleet = Fleet::default();
    let hook = PrepayHook::new(&th, &fleet);
    l.commit(
        &Batch {
            entries: vec![entry("x", "A1", dec!(10))],
            ..Default::default()
        },
        &hook,
    )
    .unwrap();
    let sinks = meterflow::prepay::sinks::Sinks {
        webhook: Some(format!("http://127.0.0.1:{port}/alerts")),
        webhook_attempts: 5,
        alerts_topic: Some("alerts".into()),
        ..Default::default()
    };
    let outbox = l.pending_outbox_of("alert", 10).unwrap();
    assert_eq!(outbox.len(), 2);
    let (first, second) = (outbox[0].id.clone(), outbox[1].id.clone());
    // 10 yuan: below 50 and 20 -> two alerts; the first needs three attempts,
    // the second finds no receiver any more.
    let h = std::thread::spawn(move || {
        let mut published = Vec::new();
        let stats = meterflow::prepay::sinks::deliver(l.as_mut(), &sinks, &mut |_, p| {
            published.extend(p.iter().map(|p| p.to_vec()));
            Ok(())
        })
        .unwrap();
        (stats, published.len(), l, sinks)
    });
    let bodies = server.join().unwrap();
    assert!(bodies
        .iter()
        .all(|b| b.starts_with("POST /alerts HTTP/1.1") && b.contains("Idempotency-Key")));
    let (stats, published, mut l, mut sinks) = h.join().unwrap();
    // Only the alert the webhook took went on to MQTT and is marked delivered.
    assert_eq!(
        (
            stats.alerts,
            stats.webhook_failures,
            stats.undelivered,
            published
        ),
        (1, 1, 1, 1)
    );
    assert_eq!(pending_alert_ids(l.as_mut()), std::slice::from_ref(&second));
    // The receiver is back: the next delivery sends the one left, and only it.
    let (port, server) = webhook_receiver(&["200 OK"]);
    sinks.webhook = Some(format!("http://127.0.0.1:{port}/alerts"));
    let stats = meterflow::prepay::sinks::deliver(l.as_mut(), &sinks, &mut |_, _| Ok(())).unwrap();
    assert_eq!((stats.alerts, stats.undelivered), (1, 0));
    let bodies = server.join().unwrap();
    assert!(bodies[0].contains(&format!("Idempotency-Key: {second}")));
    assert!(!bodies[0].contains(&first));
    assert!(pending_alert_ids(l.as_mut()).is_empty());
}

/// Subscribes to `topic` (confirmed before returning) and collects, from a
/// thread, the ids of the alerts published there until `n` came or 30 s passed.
fn receive_alert_ids(url: &str, topic: &str, n: usize) -> std::thread::JoinHandle<Vec<String>> {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    let (_, host, port) = meterflow::ingest::mqtt::parse_url(url).unwrap();
    let mut o = MqttOptions::new(unique("sub"), host, port);
    o.set_keep_alive(Duration::from_secs(10));
    let (client, mut conn) = Client::new(o, 10);
    client.subscribe(topic, QoS::AtLeastOnce).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "no SUBACK from {url}");
        if let Ok(Ok(Event::Incoming(Packet::SubAck(_)))) =
            conn.recv_timeout(Duration::from_millis(500))
        {
            break;
        }
    }
    std::thread::spawn(move || {
        let mut ids = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while ids.len() < n && Instant::now() < deadline {
            if let Ok(Ok(Event::Incoming(Packet::Publish(p)))) =
                conn.recv_timeout(Duration::from_millis(500))
            {
                let a: meterflow::prepay::alerts::Alert =
                    serde_json::from_slice(&p.payload).unwrap();
                ids.push(a.id);
            }
        }
        drop(client);
        ids.sort();
        ids
    })
}

#[test]
fn alerts_the_broker_did_not_acknowledge_stay_pending_for_the_next_run() {
    let Some(mqtt) = mqtt_url("alerts broker down") else {
        return;
    };
    let f = fixture(3, 31);
    let url = sqlite_url(&f.root);
    let topic = format!("meterflow-test/{}", unique("alerts"));
    let out = f.root.join("alerts-out");
    let run = |broker: &str| {
        Command::new(bin())
            .args(prepay_run_args(&f, &url, "2026-10-31T24:00", 10))
            .args([
                "--mqtt-url",
                broker,
                "--alerts-topic",
                &topic,
                "--alerts-out",
            ])
            .arg(&out)
            .output()
            .unwrap()
    };
    // Nothing listens on port 1: no PUBACK, so no alert is marked delivered
    // (nor written to the dataset, which comes after MQTT).
    let o = run("mqtt://127.0.0.1:1");
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let pending = pending_alert_ids(ledger::open(&url).unwrap().as_mut());
    assert!(!pending.is_empty());
    assert!(meterflow::prepay::sinks::read_alerts_dataset(&out)
        .unwrap()
        .is_empty());
    // The broker is up for the next run: it publishes exactly those, once.
    let received = receive_alert_ids(&mqtt, &topic, pending.len());
    let o = run(&mqtt);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(received.join().unwrap(), pending);
    assert!(pending_alert_ids(ledger::open(&url).unwrap().as_mut()).is_empty());
    let mut rows: Vec<String> = meterflow::prepay::sinks::read_alerts_dataset(&out)
        .unwrap()
        .into_iter()
        .map(|r| r.0)
        .collect();
    rows.sort();
    assert_eq!(rows, pending);
}

#[test]
fn a_thresholds_file_whose_relay_rules_would_flip_flop_is_refused_before_deducting() {
    let f = fixture(1, 51);
    let url = sqlite_url(&f.root);
    let th = f.root.join("th.toml");
    // A balance of -30 would trip and allow-close in turn.
    std::fs::write(
        &th,
        "[default]\noverdraft_limit = \"-30\"\n[control]\nenabled = true\nreconnect_amount = \"-30\"\n",
    )
    .unwrap();
    let o = Command::new(bin())
        .args(prepay_run_args(&f, &url, "2026-10-31T24:00", 10))
        .arg("--thresholds")
        .arg(&th)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains(&format!("{}:5: control.reconnect_amount", th.display())),
        "{err}"
    );
    assert!(ledger_balances(&url).is_empty());
}

#[test]
fn no_trip_in_protected_windows_from_the_holiday_calendar() {
    use meterflow::prepay::alerts::ControlConfig;
    use meterflow::prepay::control::Control;
    let cfg = ControlConfig {
        enabled: true,
        grace_hours: 0,
        friendly_hours: vec!["16:00-08:00".into()],
        protect_weekends: true,
        protect_holidays: true,
        calendars: vec!["calendars/cn-holidays.toml".into()],
        ..Default::default()
    };
    let c = Control::new(cfg, &Path::new(env!("CARGO_MANIFEST_DIR")).join("tariffs")).unwrap();
    let local = |d: &str, h: u32| {
        chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d")
            .unwrap()
            .and_hms_opt(h, 0, 0)
            .unwrap()
            .and_utc()
            .timestamp_millis()
            - 8 * 3_600_000
    };
    // National Day (Thursday 1 Oct 2026) is a holiday; Monday 12 Oct 10:00 is not protected.
    assert_eq!(c.protected("A1", local("2026-10-01", 10)), Some("holiday"));
    assert_eq!(c.protected("A1", local("2026-10-12", 10)), None);
    let mut out = meterflow::ledger::HookOut::default();
    c.evaluate(
        "A1",
        &["500000000000".into()],
        dec!(-30),
        dec!(-40),
        5,
        &Default::default(),
        local("2026-10-01", 10),
        &mut out,
    );
    assert!(out.outbox.is_empty(), "tripped on a holiday");
    let mut out = meterflow::ledger::HookOut::default();
    c.evaluate(
        "A1",
        &["500000000000".into()],
        dec!(-30),
        dec!(-40),
        5,
        &Default::default(),
        local("2026-10-12", 10),
        &mut out,
    );
    assert_eq!(out.outbox.len(), 1);
}

#[test]
fn the_demo_hook_shows_a_prepaid_account_crossing_its_alert_levels_on_the_sample_fleet() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().unwrap();
    let lake = root.join("sample-data");
    let inputs = meterflow::prepay::demo::Inputs::load(
        &lake,
        &root.join("sample-data/master"),
        &root.join("tariffs"),
    )
    .unwrap();
    let s = meterflow::prepay::demo::run(&inputs, out.path()).unwrap();
    assert!(s.balances_check_ok);
    assert!(s.run.deductions > 0 && s.top_ups > 0, "{s}");
    assert!(!s.example_alerts.is_empty(), "{s}");
    // The same run again deducts nothing more.
    let again = meterflow::prepay::demo::run(&inputs, out.path()).unwrap();
    assert_eq!(again.run.amount, s.run.amount);
    println!("{s}");

    // The demo's switch: the fleet opened mid-October in another ledger
    // from the state of the system before ends on the same balances.
    let sw = meterflow::prepay::demo::switch(
        &inputs,
        &out.path().join("switch"),
        chrono::NaiveDate::from_ymd_opt(2026, 10, 16).unwrap(),
        &s.ledger,
    )
    .unwrap();
    assert!(sw.opened > 50 && sw.refused == 0, "{sw}");
    assert!(sw.not_credited > 0, "{sw}");
    assert_eq!((sw.equal, sw.differing.len()), (sw.opened, 0), "{sw}");
    println!("{sw}");
}

// ---------- remote fee control: --execute against a simulated DL/T 645 meter ----------

/// `prepay run --json` at `now` (RFC 3339), optionally `--execute`; the parsed output.
fn prepay_run_at(
    f: &Fixture,
    url: &str,
    thresholds: &Path,
    now: &str,
    execute: bool,
) -> serde_json::Value {
    let mut c = Command::new(bin());
    c.args(prepay_run_args(f, url, "2026-10-31T24:00", 50));
    c.args([
        "--thresholds",
        &thresholds.display().to_string(),
        "--now",
        now,
        "--json",
    ]);
    if execute {
        c.arg("--execute");
    }
    c.env("METERFLOW_DLT645_PASSWORD", "02123456");
    let o = c.output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "prepay run at {now} failed: {out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

fn audit_events(path: &Path) -> Vec<(String, String, String)> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["event"].as_str().unwrap().to_string(),
                v["command"].as_str().unwrap().to_string(),
                v["command_id"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[test]
fn execute_trips_and_reconnects_a_simulated_dlt645_meter_once_and_never_in_protected_windows() {
    use meterflow::protocol::dlt645::{Address, RelayCommand};
    use meterflow::sim::dlt645::{spawn_tcp, SimFile, SimMeterConfig};
    let f = fixture(1, 3); // P00000 uses ~45 kWh a day: far below -30 by month end
    let address: Address = meter_id(0).parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut m = SimMeterConfig::new(address, dec!(100));
    m.password = "02123456".into();
    let sim = rt
        .block_on(spawn_tcp(
            SimFile {
                meters: vec![m],
                ..Default::default()
            },
            "127.0.0.1:0".parse().unwrap(),
        ))
        .unwrap();
    std::fs::write(
        f.root.join("collectors.toml"),
        format!(
            "collector_id = \"t\"\n[[dlt645.bus]]\nname = \"b1\"\ntcp = \"{}\"\ntimeout_ms = 2000\n[[dlt645.bus.meter]]\naddress = \"{}\"\n",
            sim.addr,
            meter_id(0)
        ),
    )
    .unwrap();
    let th = f.root.join("thresholds.toml");
    std::fs::write(
        &th,
        format!(
            r#"[default]
levels = ["50", "20"]
zero = true
overdraft_limit = "-30"
[control]
enabled = true
grace_hours = 0
reconnect_amount = "10"
friendly_hours = ["16:00-08:00"]
protect_weekends = true
protect_holidays = true
calendars = ["{}"]
audit_log = "relay-audit.jsonl"
collectors = "collectors.toml"
operator = "00000001"
"#,
            f.tariffs.join("calendars/cn-holidays.toml").display()
        ),
    )
    .unwrap();
    let audit = f.root.join("relay-audit.jsonl");
    let url = sqlite_url(&f.root);
    let relay = |v: &serde_json::Value| v["delivered"]["relay"].clone();

    // Saturday 7 Nov: below the overdraft limit, but a weekend: no order, nothing sent.
    let v = prepay_run_at(&f, &url, &th, "2026-11-07T10:00:00+08:00", true);
    assert!(v["run"]["deductions"].as_u64().unwrap() > 0);
    assert_eq!(relay(&v)["orders"], 0);
    assert!(sim.handle.relay_log().is_empty());

    // Monday 9 Nov without --execute: the trip is ordered and audited as a dry run, not sent.
    let v = prepay_run_at(&f, &url, &th, "2026-11-09T10:00:00+08:00", false);
    assert_eq!(
        (relay(&v)["orders"].as_u64(), relay(&v)["dry_run"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(sim.handle.relay_log().is_empty(), "a dry run sends nothing");

    // Saturday 14 Nov with --execute: the pending trip is held (protected at send time).
    let v = prepay_run_at(&f, &url, &th, "2026-11-14T10:00:00+08:00", true);
    assert_eq!(relay(&v)["held_protected"], 1);
    assert!(sim.handle.relay_log().is_empty(), "tripped on a weekend");

    // Monday 16 Nov with --execute: sent, answered, the meter's relay is open.
    let v = prepay_run_at(&f, &url, &th, "2026-11-16T10:00:00+08:00", true);
    assert_eq!(relay(&v)["accepted"], 1);
    assert_eq!(sim.handle.relay_log(), vec![(address, RelayCommand::Trip)]);
    assert!(sim.handle.relay_state(address).unwrap().tripped);
    // A re-run sends nothing new.
    let v = prepay_run_at(&f, &url, &th, "2026-11-16T10:30:00+08:00", true);
    assert_eq!(relay(&v)["orders"], 0);
    assert_eq!(sim.handle.relay_log().len(), 1);

    // A top-up above the reconnect amount: allow-close is sent (never held back).
    let pay = f.root.join("counter.csv");
    write_payments(&pay, &[("C1", "counter", "P00000", "2000")]);
    let o = Command::new(bin())
        .args(["ledger", "import-payments", "--ledger", &url])
        .arg(&pay)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = prepay_run_at(&f, &url, &th, "2026-11-21T20:00:00+08:00", true);
    assert_eq!(relay(&v)["accepted"], 1);
    assert_eq!(
        sim.handle.relay_log(),
        vec![
            (address, RelayCommand::Trip),
            (address, RelayCommand::AllowClose)
        ]
    );
    let st = sim.handle.relay_state(address).unwrap();
    assert!(st.close_allowed, "{st:?}");
    let v = prepay_run_at(&f, &url, &th, "2026-11-21T20:30:00+08:00", true);
    assert_eq!(relay(&v)["orders"], 0);
    assert_eq!(sim.handle.relay_log().len(), 2);

    // The audit: dry run, then sent + accepted for each command, each with its own stable id.
    let ev = audit_events(&audit);
    let kinds: Vec<(&str, &str)> = ev
        .iter()
        .map(|(e, c, _)| (e.as_str(), c.as_str()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("dry_run", "trip"),
            ("sent", "trip"),
            ("accepted", "trip"),
            ("sent", "allow-close"),
            ("accepted", "allow-close")
        ]
    );
    assert!(ev.iter().all(|(_, _, id)| !id.is_empty()));
    assert_eq!(
        ev[0].2, ev[2].2,
        "the dry run and the real send share the command id"
    );
    assert_ne!(ev[2].2, ev[4].2);
    drop(rt);
}

#[test]
fn execute_needs_the_collectors_config_and_leaves_unanswered_orders_pending() {
    // A bus nobody listens on: the trip fails, stays pending and is tried again.
    let f = fixture(1, 3);
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    std::fs::write(
        f.root.join("collectors.toml"),
        format!(
            "collector_id = \"t\"\n[[dlt645.bus]]\nname = \"b1\"\ntcp = \"127.0.0.1:{port}\"\ntimeout_ms = 300\nretries = 0\n[[dlt645.bus.meter]]\naddress = \"{}\"\n",
            meter_id(0)
        ),
    )
    .unwrap();
    let th = f.root.join("thresholds.toml");
    std::fs::write(
        &th,
        "[default]\noverdraft_limit = \"-30\"\n[control]\nenabled = true\naudit_log = \"audit.jsonl\"\n",
    )
    .unwrap();
    let url = sqlite_url(&f.root);
    let mut c = Command::new(bin());
    c.args(prepay_run_args(&f, &url, "2026-10-31T24:00", 50));
    c.args(["--thresholds", &th.display().to_string(), "--execute"]);
    let o = c.output().unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("collectors"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for attempt in 0..2 {
        let mut c = Command::new(bin());
        c.args([
            "prepay",
            "relay",
            "--ledger",
            &url,
            "--thresholds",
            &th.display().to_string(),
            "--collectors",
            &f.root.join("collectors.toml").display().to_string(),
            "--now",
            "2026-11-16T10:00:00+08:00",
            "--execute",
            "--json",
        ]);
        if attempt == 0 {
            // Deduct first (dry run) so there is an order.
            let mut r = Command::new(bin());
            r.args(prepay_run_args(&f, &url, "2026-10-31T24:00", 50));
            r.args([
                "--thresholds",
                &th.display().to_string(),
                "--now",
                "2026-11-16T10:00:00+08:00",
            ]);
            assert!(r.output().unwrap().status.success());
        }
        let o = c.output().unwrap();
        assert_eq!(
            o.status.code(),
            Some(2),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
        assert_eq!(
            (v["relay"]["orders"].as_u64(), v["relay"]["failed"].as_u64()),
            (Some(1), Some(1))
        );
    }
    let ev = audit_events(&f.root.join("audit.jsonl"));
    assert_eq!(ev.iter().filter(|e| e.0 == "failed").count(), 2, "{ev:?}");
}

// ---------- time-of-use prepaid accounts ----------

// ---------- time of use ----------

/// Two prepaid commercial accounts on the Guangdong TOU tariff; the second
/// meter is behind a 2:1 current transformer.
fn tou_master(root: &Path) -> PathBuf {
    let master = root.join("master");
    std::fs::create_dir_all(&master).unwrap();
    std::fs::write(
        master.join("accounts.csv"),
        "account_id,customer_class,tariff_id,payment_mode\nT00000,commercial,gd-tou-commercial,prepaid\nT00001,commercial,gd-tou-commercial,prepaid\n",
    )
    .unwrap();
    std::fs::write(
        master.join("meters.csv"),
        format!(
            "meter_id,account_id,ct_ratio,pt_ratio,installed_on\n{},T00000,1,1,2015-01-01\n{},T00001,2,1,2015-01-01\n",
            meter_id(0),
            meter_id(1)
        ),
    )
    .unwrap();
    master
}

/// One `prepay run` (the library call) through `through_ms`, `chunk` meters
/// per transaction; `evaluate_all` re-checks every account's alerts at the end.
fn batch_run(
    lake: &Path,
    master: &Path,
    tariffs: &Path,
    url: &str,
    through_ms: i64,
    chunk: usize,
    evaluate_all: bool,
) -> meterflow::prepay::run::RunStats {
    let mut l = ledger::open_migrated(url).unwrap();
    batch_run_on(
        l.as_mut(),
        lake,
        master,
        tariffs,
        through_ms,
        chunk,
        evaluate_all,
    )
}

/// [`batch_run`] on a ledger the caller opened (or wrapped).
fn batch_run_on(
    l: &mut dyn ledger::Ledger,
    lake: &Path,
    master: &Path,
    tariffs: &Path,
    through_ms: i64,
    chunk: usize,
    evaluate_all: bool,
) -> meterflow::prepay::run::RunStats {
    let fleet = Fleet::load(master).unwrap();
    let pricer = TariffPricer::new(meterflow::tariff::load_dir(tariffs).unwrap());
    let th = Thresholds::builtin();
    let mut hook = PrepayHook::new(&th, &fleet);
    let opts = RunOptions {
        lake,
        from: chrono::NaiveDate::from_ymd_opt(2026, 9, 1).unwrap(),
        through_ms,
        chunk,
        evaluate_all,
    };
    run_batch(l, &pricer, &fleet, &mut hook, &opts).unwrap()
}

/// The October bill run of the fixture; each account's balance must be minus its bill.
fn bill_october(
    root: &Path,
    lake: &Path,
    master: &Path,
    tariffs: &Path,
    url: &str,
) -> BTreeMap<String, Decimal> {
    let summary = meterflow::billing::run::bill_run(&meterflow::billing::run::BillRunOptions::new(
        lake,
        master,
        tariffs,
        "2026-10",
        root.join("bills"),
    ))
    .unwrap();
    assert_eq!((summary.bills, summary.exceptions), (2, 0), "{summary:?}");
    let balances = ledger_balances(url);
    let deducted: Decimal = balances.values().map(|b| -*b).sum();
    assert_eq!(deducted, summary.total_amount);
    balances
}

#[test]
fn tou_prepaid_deductions_of_a_month_add_up_to_the_bill_run_of_the_same_lake() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let master = tou_master(root);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let mut all = Vec::new();
    for i in 0..2 {
        let mut regs = [0i64; 4].map(|_| rng.gen_range(0..1_000_000i64));
        for d in 0..32 {
            if d > 0 {
                for r in regs.iter_mut() {
                    *r += rng.gen_range(0..4000); // 0..40 kWh per register a day
                }
            }
            let ts = OCT1_LOCAL_MIDNIGHT + d * DAY;
            let total: i64 = regs.iter().sum();
            let mut push =
                |channel, v: i64| all.push(sim_reading(i, ts, channel, Decimal::new(v, 2)));
            push(Channel::ImportActiveTotal, total);
            push(Channel::ImportActiveT1, regs[0]);
            push(Channel::ImportActiveT2, regs[1]);
            push(Channel::ImportActiveT3, regs[2]);
            push(Channel::ImportActiveT4, regs[3]);
        }
    }
    let lake = write_lake(root, &all);
    let tariffs = Path::new(env!("CARGO_MANIFEST_DIR")).join("tariffs");

    let url = sqlite_url(root);
    let run = |through_ms| batch_run(&lake, &master, &tariffs, &url, through_ms, 1, false);
    // Mid-month, then month end: daily deductions priced per TOU period.
    let s1 = run(OCT1_LOCAL_MIDNIGHT + 12 * DAY);
    assert_eq!(
        (s1.deductions, s1.unpriced, s1.incomplete),
        (24, 0, 0),
        "{s1:?}"
    );
    let s2 = run(OCT1_LOCAL_MIDNIGHT + 31 * DAY);
    assert_eq!(s2.deductions, 38, "{s2:?}");
    assert_eq!(run(OCT1_LOCAL_MIDNIGHT + 31 * DAY).deductions, 0);

    // The bill run of October over the same lake: each account's deductions sum to its bill, to the fen.
    let balances = bill_october(root, &lake, &master, &tariffs, &url);
    // Per account, against the tariff engine on the month's register deltas.
    let set = meterflow::tariff::load_dir(&tariffs).unwrap();
    let v = set
        .get("gd-tou-commercial")
        .unwrap()
        .version_on(chrono::NaiveDate::from_ymd_opt(2026, 10, 1).unwrap())
        .unwrap();
    let map = v.tou.as_ref().unwrap().registers;
    for i in 0..2usize {
        let m = meter_id(i);
        let at = |ts: i64, c: Channel| {
            all.iter()
                .find(|r| r.meter_id == m && r.ts_ms == ts && r.channel == c)
                .unwrap()
                .value
        };
        let (a, b) = (OCT1_LOCAL_MIDNIGHT, OCT1_LOCAL_MIDNIGHT + 31 * DAY);
        let mult = Decimal::from(i as i64 + 1);
        let mut u = Usage::total(
            (at(b, Channel::ImportActiveTotal) - at(a, Channel::ImportActiveTotal)) * mult,
        );
        for (r, c) in [
            Channel::ImportActiveT1,
            Channel::ImportActiveT2,
            Channel::ImportActiveT3,
            Channel::ImportActiveT4,
        ]
        .into_iter()
        .enumerate()
        {
            u.periods[map[r].unwrap() as usize] += (at(b, c) - at(a, c)) * mult;
        }
        let bill = total(&energy_charge(v, &[], &Usage::default(), &u));
        assert_eq!(balances[&format!("T0000{i}")], -bill, "account T0000{i}");
    }

    // Opened mid-month in another ledger from the first run's state: the
    // cursors take T1..T4 at the switch, the days after are deducted once;
    // only the period lines' rounding restarts (0.01 yuan a period).
    let switch = OCT1_LOCAL_MIDNIGHT + 12 * DAY;
    let mut l = ledger::open(&url).unwrap();
    let mut opening = String::from("account_id,switched_at,balance,position_kwh\n");
    for i in 0..2usize {
        let a = format!("T0000{i}");
        let upto = balance_at(l.as_mut(), &a, switch);
        let total_at = |ts| {
            all.iter()
                .find(|r| {
                    r.meter_id == meter_id(i)
                        && r.ts_ms == ts
                        && r.channel == Channel::ImportActiveTotal
                })
                .unwrap()
                .value
        };
        let kwh = (total_at(switch) - total_at(OCT1_LOCAL_MIDNIGHT)) * Decimal::from(i as i64 + 1);
        opening.push_str(&format!("{a},{},{upto},{kwh}\n", switch_rfc3339(switch)));
    }
    let (switched, s) = switch_and_run_october(root, &lake, &master, &tariffs, &opening);
    assert_eq!((s.deductions, s.incomplete), (38, 0), "{s:?}");
    let mut sl = ledger::open(&switched).unwrap();
    for i in 0..2usize {
        let a = format!("T0000{i}");
        let diff = (sl.balance(&a).unwrap() - l.balance(&a).unwrap()).abs();
        assert!(diff <= dec!(0.04), "{a}: {diff}");
    }
}

#[test]
fn interval_only_tou_meters_are_deducted_per_period_and_add_up_to_the_bill_run() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // The Guangdong TOU tariff without its register map: these meters have no T1..T4.
    let tariffs = root.join("tariffs");
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("tariffs");
    std::fs::create_dir_all(tariffs.join("calendars")).unwrap();
    for f in std::fs::read_dir(sample.join("calendars")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, tariffs.join("calendars").join(f.file_name().unwrap())).unwrap();
    }
    let gd = std::fs::read_to_string(sample.join("gd-tou-commercial.toml")).unwrap();
    let gd: String = gd
        .lines()
        .filter(|l| !l.starts_with("registers"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(tariffs.join("gd-tou-commercial.toml"), gd).unwrap();

    let master = tou_master(root);
    // 15-minute intervals for October, and the daily total register they add up to.
    let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
    let mut all = Vec::new();
    let quarter = 900_000;
    for i in 0..2 {
        let mut register = rng.gen_range(0..1_000_000i64);
        all.push(sim_reading(
            i,
            OCT1_LOCAL_MIDNIGHT,
            Channel::ImportActiveTotal,
            Decimal::new(register, 2),
        ));
        for q in 1..=31 * 96 {
            let kwh = rng.gen_range(0..60); // 0..0.6 kWh a quarter hour
            register += kwh;
            let ts = OCT1_LOCAL_MIDNIGHT + q * quarter;
            all.push(sim_reading(
                i,
                ts,
                Channel::ImportActiveInterval,
                Decimal::new(kwh, 2),
            ));
            if q % 96 == 0 {
                all.push(sim_reading(
                    i,
                    ts,
                    Channel::ImportActiveTotal,
                    Decimal::new(register, 2),
                ));
            }
        }
    }
    let lake = write_lake(root, &all);

    let url = sqlite_url(root);
    let run = |through_ms| batch_run(&lake, &master, &tariffs, &url, through_ms, 1, false);
    let s1 = run(OCT1_LOCAL_MIDNIGHT + 12 * DAY + 7 * quarter);
    assert_eq!((s1.unpriced, s1.incomplete), (0, 0), "{s1:?}");
    assert!(s1.deductions > 2000, "{s1:?}");
    let s2 = run(OCT1_LOCAL_MIDNIGHT + 31 * DAY);
    assert_eq!((s2.unpriced, s2.incomplete), (0, 0), "{s2:?}");
    assert_eq!(
        run(OCT1_LOCAL_MIDNIGHT + 31 * DAY).deductions,
        0,
        "a re-run changes nothing"
    );
    // Every deduction names its interval and TOU period.
    let mut l = ledger::open_migrated(&url).unwrap();
    let first = l.entries(Some("T00000"), 0, 1).unwrap();
    assert!(first[0].entry.key.contains(":import_active_interval:"));
    assert!(first[0].entry.detail.contains("\"period\":"));

    // The bill run prices the same intervals into the same periods: equal to the fen.
    let balances = bill_october(root, &lake, &master, &tariffs, &url);
    assert!(balances.values().all(|b| *b < Decimal::ZERO));

    // Opened at the first run's end (a quarter hour, no register reading
    // needed) in another ledger: the intervals up to it are the old
    // system's, the rest are charged once. Only the rounding of the period
    // lines, which restart at the switch, can differ (0.01 yuan a period).
    let switch = OCT1_LOCAL_MIDNIGHT + 12 * DAY + 7 * quarter;
    let mut opening = String::from("account_id,switched_at,balance,position_kwh\n");
    for (a, m) in [("T00000", meter_id(0)), ("T00001", meter_id(1))] {
        let upto = balance_at(l.as_mut(), a, switch);
        let kwh: Decimal = all
            .iter()
            .filter(|r| r.meter_id == m && r.channel == Channel::ImportActiveInterval)
            .filter(|r| r.ts_ms <= switch)
            .map(|r| r.value)
            .sum();
        let ct = if a == "T00001" { dec!(2) } else { dec!(1) };
        opening.push_str(&format!(
            "{a},{},{upto},{}\n",
            switch_rfc3339(switch),
            kwh * ct
        ));
    }
    let (switched, s) = switch_and_run_october(root, &lake, &master, &tariffs, &opening);
    let mut sl = ledger::open(&switched).unwrap();
    for a in ["T00000", "T00001"] {
        let ours: Vec<i64> = sl
            .entries(Some(a), 0, usize::MAX)
            .unwrap()
            .into_iter()
            .filter(|e| e.entry.kind == EntryKind::Deduction)
            .map(|e| e.entry.ts_ms)
            .collect();
        assert!(ours.len() > 1000, "{a}: {s:?}");
        assert!(
            ours.iter().all(|&t| t > switch),
            "{a}: an interval up to the switch was charged"
        );
        let diff = (sl.balance(a).unwrap() - l.balance(a).unwrap()).abs();
        assert!(diff <= dec!(0.04), "{a}: {diff} {s:?}");
    }
}

// ---------- two writers and a held jump ----------

/// A writer whose cached cursor predates another writer's hold must not
/// overwrite the held jump: the hold is part of the cursor precondition.
fn a_hold_makes_a_stale_writer_recompute(l: &mut dyn Ledger) {
    use meterflow::ledger::Cursor;
    let ch = meterflow::prepay::deduct::CHANNEL;
    let c = Cursor {
        meter_id: "M1".into(),
        channel: ch.into(),
        window_start_ms: 0,
        position: Decimal::ZERO,
        last_ts_ms: 1000,
        last_value: dec!(1),
        first_ts_ms: 0,
        first_value: dec!(0),
        held: None,
        tou: None,
    };
    let commit = |l: &mut dyn Ledger, cur: &Cursor, expect: Option<&Cursor>| {
        l.commit(
            &Batch {
                cursors: vec![cur.clone()],
                expect: vec![("M1".into(), ch.into(), expect.map(Cursor::stamp))],
                ..Default::default()
            },
            &NoHook,
        )
        .unwrap()
        .stale
    };
    assert!(!commit(l, &c, None));
    // Writer A holds a jump at 2000 (last_ts and first_ts unchanged).
    let held = Cursor {
        held: Some((2000, dec!(5000))),
        ..c.clone()
    };
    assert!(!commit(l, &held, Some(&c)));
    // Writer B still has the cursor without the hold: refused, it must re-read.
    let b = Cursor {
        last_ts_ms: 3000,
        last_value: dec!(3),
        ..c.clone()
    };
    assert!(commit(l, &b, Some(&c)));
    assert_eq!(
        l.cursor("M1", ch).unwrap().unwrap().held,
        Some((2000, dec!(5000)))
    );
    // After re-reading, B's step applies.
    let seen = l.cursor("M1", ch).unwrap().unwrap();
    assert!(!commit(l, &b, Some(&seen)));
}

#[test]
fn a_hold_makes_a_stale_writer_recompute_on_sqlite() {
    let d = tempfile::tempdir().unwrap();
    let mut l = ledger::open_migrated(&sqlite_url(d.path())).unwrap();
    a_hold_makes_a_stale_writer_recompute(l.as_mut());
}

#[test]
fn a_hold_makes_a_stale_writer_recompute_on_postgres() {
    let Some(url) = pg_url("hold") else { return };
    let mut l = ledger::open_migrated(&url).unwrap();
    a_hold_makes_a_stale_writer_recompute(l.as_mut());
}

/// The `low_days` (days-of-credit forecast) alerts in a ledger's outbox.
fn low_days_alerts(url: &str) -> Vec<meterflow::prepay::alerts::Alert> {
    ledger::open(url)
        .unwrap()
        .outbox_all()
        .unwrap()
        .into_iter()
        .filter(|m| m.kind == "alert")
        .map(|m| serde_json::from_str::<meterflow::prepay::alerts::Alert>(&m.payload).unwrap())
        .filter(|a| a.kind == "low_days")
        .collect()
}

#[test]
fn days_of_credit_forecast_raises_one_low_days_alert_per_account_in_the_batch_run() {
    let f = fixture(5, 2);
    let url = sqlite_url(&f.root);
    run_lib(&f, &url, OCT1_LOCAL_MIDNIGHT + 10 * DAY);
    run_lib(&f, &url, OCT1_LOCAL_MIDNIGHT + 20 * DAY);
    let low = low_days_alerts;
    let a = low(&url);
    // No top-ups: every account is at or below zero, so 0 days of credit at its recent use.
    assert_eq!(a.len(), 5, "{a:?}");
    assert!(a
        .iter()
        .all(|x| x.days_left == Some(Decimal::ZERO) && x.threshold == dec!(3)));
    // The state is kept: more runs raise no new forecast alert.
    run_lib(&f, &url, OCT1_LOCAL_MIDNIGHT + 31 * DAY);
    assert_eq!(low(&url).len(), 5);
}

#[test]
fn stream_raises_one_low_days_forecast_alert_per_account() {
    let Some(mqtt) = mqtt_url("stream forecast") else {
        return;
    };
    let f = fixture(5, 2);
    let url = sqlite_url(&f.root);
    let client = unique("forecast");
    let topic = format!("meterflow-test/{client}");
    let cfg = write_stream_config(&f, &url, &mqtt, &client, &topic, None);
    let mut c = spawn_stream(&cfg, Some(3));
    let _h = wait_subscribed(&mut c);
    publish_fixture(&mqtt, &topic, &f);
    assert!(c.wait().unwrap().success());
    // No top-ups: every account ends at or below zero, 0 days of credit at its recent use.
    let a = low_days_alerts(&url);
    assert_eq!(a.len(), 5, "{a:?}");
    assert!(a
        .iter()
        .all(|x| x.days_left == Some(Decimal::ZERO) && x.threshold == dec!(3)));
    // A restart with nothing new raises nothing again.
    let c = spawn_stream(&cfg, Some(2));
    assert!(c.wait_with_output().unwrap().status.success());
    assert_eq!(low_days_alerts(&url).len(), 5);
}

/// A ledger where another writer commits the same chunk just before this
/// run's `nth` commit (an overlapping run that got there first).
struct OvertakenAt {
    inner: Box<dyn Ledger>,
    nth: usize,
    commits: usize,
    /// What the other writer commits (None: the same batch).
    other: Option<Batch>,
}

impl Ledger for OvertakenAt {
    fn migrate(&mut self) -> Result<(), ledger::LedgerError> {
        self.inner.migrate()
    }
    fn commit(
        &mut self,
        batch: &Batch,
        hook: &dyn ledger::CommitHook,
    ) -> Result<ledger::CommitReport, ledger::LedgerError> {
        self.commits += 1;
        if self.commits == self.nth {
            let other = self.other.take().unwrap_or_else(|| batch.clone());
            assert!(!self.inner.commit(&other, hook)?.stale);
        }
        self.inner.commit(batch, hook)
    }
    fn balance(&mut self, a: &str) -> Result<Decimal, ledger::LedgerError> {
        self.inner.balance(a)
    }
    fn balances(&mut self) -> Result<Vec<(String, Decimal)>, ledger::LedgerError> {
        self.inner.balances()
    }
    fn check(&mut self) -> Result<Vec<ledger::BalanceCheck>, ledger::LedgerError> {
        self.inner.check()
    }
    fn entries(
        &mut self,
        a: Option<&str>,
        after: i64,
        limit: usize,
    ) -> Result<Vec<ledger::Entry>, ledger::LedgerError> {
        self.inner.entries(a, after, limit)
    }
    fn entries_by_keys(
        &mut self,
        keys: &[String],
    ) -> Result<Vec<ledger::Entry>, ledger::LedgerError> {
        self.inner.entries_by_keys(keys)
    }
    fn cursor(&mut self, m: &str, c: &str) -> Result<Option<ledger::Cursor>, ledger::LedgerError> {
        self.inner.cursor(m, c)
    }
    fn cursors(&mut self) -> Result<Vec<ledger::Cursor>, ledger::LedgerError> {
        self.inner.cursors()
    }
    fn flags(
        &mut self,
        a: &str,
    ) -> Result<std::collections::BTreeSet<String>, ledger::LedgerError> {
        self.inner.flags(a)
    }
    fn pending_outbox(&mut self, n: usize) -> Result<Vec<ledger::OutboxMsg>, ledger::LedgerError> {
        self.inner.pending_outbox(n)
    }
    fn pending_outbox_of(
        &mut self,
        kind: &str,
        n: usize,
    ) -> Result<Vec<ledger::OutboxMsg>, ledger::LedgerError> {
        self.inner.pending_outbox_of(kind, n)
    }
    fn mark_delivered(&mut self, d: &[(&str, &str)]) -> Result<(), ledger::LedgerError> {
        self.inner.mark_delivered(d)
    }
    fn outbox_all(&mut self) -> Result<Vec<ledger::OutboxMsg>, ledger::LedgerError> {
        self.inner.outbox_all()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[test]
fn a_chunk_overtaken_while_the_next_one_is_stepped_is_recomputed_and_charged_once() {
    let f = fixture(12, 21);
    let url = sqlite_url(&f.root);
    let mut l = OvertakenAt {
        inner: ledger::open_migrated(&url).unwrap(),
        nth: 2,
        commits: 0,
        other: None,
    };
    let stats = batch_run_on(
        &mut l,
        &f.lake,
        &f.master,
        &f.tariffs,
        1_793_462_400_000, // 2026-11-01T00:00+08:00
        3,
        true,
    );
    // Chunk 2 was committed by the other writer first: this run found its
    // cursors moved, re-read them, and its recomputed chunk charged nothing new.
    assert_eq!(stats.retries, 1);
    assert_eq!(stats.chunks, 4);
    drop(l);
    assert_matches_recomputation(&url, &f);
}

// ---------- forecast of an account with several meters ----------

/// Account A2 (bj-residential-monthly) with meters `meter_id(2)` (10 kWh a
/// day) and `meter_id(3)` (20 kWh a day). `lake` holds both meters from
/// 1 to 10 October; `lake_m2` only `meter_id(2)`, from 10 to 15 October.
struct TwoMeters {
    f: Fixture,
    lake_m2: PathBuf,
}

fn two_meter_account() -> TwoMeters {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let master = root.join("master");
    std::fs::create_dir_all(&master).unwrap();
    std::fs::write(
        master.join("accounts.csv"),
        "account_id,customer_class,tariff_id,payment_mode\nA2,residential,bj-residential-monthly,prepaid\n",
    )
    .unwrap();
    std::fs::write(
        master.join("meters.csv"),
        format!(
            "meter_id,account_id,ct_ratio,pt_ratio,installed_on\n{},A2,1,1,2015-01-01\n{},A2,1,1,2015-01-01\n",
            meter_id(2),
            meter_id(3)
        ),
    )
    .unwrap();
    let snap = |i: usize, d: i64| {
        let per_day = if i == 2 { 10 } else { 20 };
        (
            OCT1_LOCAL_MIDNIGHT + d * DAY,
            Decimal::from(1000 + per_day * d),
        )
    };
    let mut readings = BTreeMap::new();
    let mut first = Vec::new();
    for i in [2, 3] {
        let snaps: Vec<(i64, Decimal)> = (0..10).map(|d| snap(i, d)).collect();
        for &(ts, v) in &snaps {
            first.push(sim_reading(i, ts, Channel::ImportActiveTotal, v));
        }
        readings.insert(meter_id(i), snaps);
    }
    let lake = write_lake(&root, &first);
    let later: Vec<Reading> = (9..15)
        .map(|d| snap(2, d))
        .map(|(ts, v)| sim_reading(2, ts, Channel::ImportActiveTotal, v))
        .collect();
    let lake_m2 = write_lake(&root.join("later"), &later);
    let tariffs = Path::new(env!("CARGO_MANIFEST_DIR")).join("tariffs");
    TwoMeters {
        f: Fixture {
            _dir: dir,
            root,
            lake,
            master,
            tariffs,
            readings,
        },
        lake_m2,
    }
}

/// Top-up of A2 such that, once `meter_id(2)` is charged through 15
/// October, its balance is 30: 2.0 days at both meters' daily spend (at
/// or below the built-in 3), 6.1 days at `meter_id(2)`'s alone.
fn top_up_a2(url: &str) {
    let mut l = ledger::open_migrated(url).unwrap();
    let b = Batch {
        entries: vec![entry("top-up-a2", "A2", dec!(186.25))],
        ..Default::default()
    };
    l.commit(&b, &NoHook).unwrap();
}

/// Both meters' daily spends from the stored cursors, A2's balance, and
/// A2's `low_days` alerts.
fn a2_forecast(t: &TwoMeters, url: &str) -> (Decimal, Decimal, Decimal) {
    let fleet = Fleet::load(&t.f.master).unwrap();
    let pricer = TariffPricer::new(meterflow::tariff::load_dir(&t.f.tariffs).unwrap());
    let mut l = ledger::open(url).unwrap();
    let spend = |l: &mut Box<dyn Ledger>, i: usize| {
        let c = l
            .cursor(&meter_id(i), "import_active_total")
            .unwrap()
            .expect("stored cursor");
        meterflow::prepay::run::meter_daily_spend(&pricer, &fleet, &c).expect("a day or more")
    };
    let (s2, s3) = (spend(&mut l, 2), spend(&mut l, 3));
    (s2, s3, l.balance("A2").unwrap())
}

fn assert_forecast_sums_both_meters(t: &TwoMeters, url: &str) {
    let (s2, s3, balance) = a2_forecast(t, url);
    assert_eq!(balance, dec!(30), "A2 after both runs");
    let days = |spend| meterflow::prepay::alerts::days_left(balance, Some(spend)).unwrap();
    // Above the 3 days on meter_id(2) alone: the alert needs both meters.
    assert!(days(s2) > dec!(3) && days(s2 + s3) <= dec!(3), "{s2} {s3}");
    let a = low_days_alerts(url);
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!(a[0].account_id, "A2");
    assert_eq!(a[0].days_left, Some(days(s2 + s3)));
    assert_eq!(a[0].balance, balance);
}

#[test]
fn the_batch_run_forecasts_an_account_from_all_its_meters_when_only_one_has_readings() {
    let t = two_meter_account();
    let url = sqlite_url(&t.f.root);
    top_up_a2(&url);
    let (f, through) = (&t.f, OCT1_LOCAL_MIDNIGHT + 9 * DAY);
    batch_run(&f.lake, &f.master, &f.tariffs, &url, through, 7, true);
    assert!(
        low_days_alerts(&url).is_empty(),
        "3.7 days after the first run"
    );
    // Only meter_id(2) has readings in the second run.
    let through = OCT1_LOCAL_MIDNIGHT + 14 * DAY;
    batch_run(&t.lake_m2, &f.master, &f.tariffs, &url, through, 7, true);
    assert_forecast_sums_both_meters(&t, &url);
}

#[test]
fn stream_after_a_restart_forecasts_an_account_from_all_its_meters() {
    let Some(mqtt) = mqtt_url("stream forecast of two meters") else {
        return;
    };
    let t = two_meter_account();
    let url = sqlite_url(&t.f.root);
    top_up_a2(&url);
    let f = &t.f;
    batch_run(
        &f.lake,
        &f.master,
        &f.tariffs,
        &url,
        OCT1_LOCAL_MIDNIGHT + 9 * DAY,
        7,
        true,
    );
    assert!(low_days_alerts(&url).is_empty());
    // A fresh stream process (no spends in memory) sees meter_id(2) only.
    let client = unique("forecast2");
    let topic = format!("meterflow-test/{client}");
    let cfg = write_stream_config(f, &url, &mqtt, &client, &topic, None);
    let mut c = spawn_stream(&cfg, Some(3));
    let _h = wait_subscribed(&mut c);
    let m2 = meter_id(2);
    let readings: Vec<Reading> = (10..15)
        .map(|d| Reading {
            meter_id: m2.clone(),
            ts_ms: OCT1_LOCAL_MIDNIGHT + d * DAY,
            channel: Channel::ImportActiveTotal,
            value: Decimal::from(1000 + 10 * d),
            quality: Quality::OK,
            source: Source {
                protocol: Protocol::Mqtt,
                collector: "t".into(),
                address: topic.as_str().into(),
            },
            received_ms: OCT1_LOCAL_MIDNIGHT + d * DAY,
        })
        .collect();
    // One message: one commit, as the batch run's one chunk.
    let msgs = [(
        format!("{topic}/{m2}"),
        meterflow::ingest::decode::encode_canonical("t", &readings),
    )];
    meterflow::prepay::sinks::publish_qos1(&mqtt, &unique("pub"), &msgs).unwrap();
    assert!(c.wait().unwrap().success());
    assert_forecast_sums_both_meters(&t, &url);
}

// ---------- prepaid accounts switching to meterflow ----------

/// An account's balance at `ts`: the sum of its entries up to then.
fn balance_at(l: &mut dyn Ledger, account: &str, ts: i64) -> Decimal {
    l.entries(Some(account), 0, usize::MAX)
        .unwrap()
        .iter()
        .filter(|e| e.entry.ts_ms <= ts)
        .map(|e| e.entry.amount)
        .sum()
}

/// A fresh ledger in `root` opened with `opening` (the CSV text) and
/// deducted through October; its URL and the run's counters.
fn switch_and_run_october(
    root: &Path,
    lake: &Path,
    master: &Path,
    tariffs: &Path,
    opening: &str,
) -> (String, meterflow::prepay::run::RunStats) {
    let file = root.join("prepaid_balances.csv");
    std::fs::write(&file, opening).unwrap();
    let switched = root.join("switched.sqlite").display().to_string();
    let (code, out, err) = import_balances_in([lake, master, tariffs], &switched, &file);
    assert_eq!(code, Some(0), "{out}{err}");
    let s = batch_run(
        lake,
        master,
        tariffs,
        &switched,
        OCT1_LOCAL_MIDNIGHT + 31 * DAY,
        1,
        false,
    );
    (switched, s)
}

/// `ledger import-balances` with FILE into `url`, on the fixture's lake,
/// master data and tariffs; (exit code, stdout, stderr).
fn import_balances(f: &Fixture, url: &str, file: &Path) -> (Option<i32>, String, String) {
    import_balances_in([&f.lake, &f.master, &f.tariffs], url, file)
}

/// [`import_balances`] on `[lake, master, tariffs]`.
fn import_balances_in(dirs: [&Path; 3], url: &str, file: &Path) -> (Option<i32>, String, String) {
    let o = Command::new(bin())
        .args(["ledger", "import-balances", "--ledger", url, "--lake"])
        .arg(dirs[0])
        .arg("--master")
        .arg(dirs[1])
        .arg("--tariffs")
        .arg(dirs[2])
        .arg(file)
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn switch_rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .with_timezone(&chrono::FixedOffset::east_opt(8 * 3600).unwrap())
        .to_rfc3339()
}

/// What `url`'s ledger held at `switch`: each account's balance (its
/// entries up to then) and its meter's tier position, as an opening file.
fn openings_at(url: &str, switch: i64, accounts: usize) -> String {
    let mut l = ledger::open(url).unwrap();
    let cursors: BTreeMap<String, Decimal> = l
        .cursors()
        .unwrap()
        .into_iter()
        .map(|c| {
            assert_eq!(c.last_ts_ms, switch, "history deducted through the switch");
            (c.meter_id, c.position)
        })
        .collect();
    let mut out = String::from("account_id,switched_at,balance,position_kwh\n");
    for i in 0..accounts {
        let a = format!("P{i:05}");
        let balance = balance_at(l.as_mut(), &a, switch);
        out.push_str(&format!(
            "{a},{},{balance},{}\n",
            switch_rfc3339(switch),
            cursors[&meter_id(i)]
        ));
    }
    out
}

fn payments_around_the_switch(path: &Path) {
    std::fs::write(
        path,
        "txn_id,channel,account_id,amount,paid_at\n\
         W1,wechat,P00000,100.00,2026-10-10T02:00:00Z\n\
         W2,alipay,P00001,50.00,2026-10-20T02:00:00Z\n\
         W3,bank,P00002,20.00,2026-10-15T16:00:00Z\n",
    )
    .unwrap();
}

fn switching_fleet_deducts_as_its_history(history: &str, switched: &str, spare: &str) {
    let n = 24;
    let f = fixture(n, 11);
    let switch = OCT1_LOCAL_MIDNIGHT + 15 * DAY; // 16 October, local midnight
    let pay = f.root.join("pay-1020.csv");
    payments_around_the_switch(&pay);
    let import_payments = |url: &str| {
        let o = Command::new(bin())
            .args(["ledger", "import-payments", "--ledger", url])
            .arg(&pay)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    // The history: meterflow itself deducting the first half of October.
    import_payments(history);
    run_lib(&f, history, switch);
    let file = f.root.join("prepaid_balances.csv");
    let opening = openings_at(history, switch, n);
    std::fs::write(&file, &opening).unwrap();
    let positions: Vec<&str> = opening
        .lines()
        .skip(1)
        .map(|l| l.rsplit(',').next().unwrap())
        .collect();
    assert!(
        positions
            .iter()
            .all(|p| p.parse::<Decimal>().unwrap() > dec!(0)),
        "{opening}"
    );

    // The switch: a fresh ledger opened from that state.
    let (code, out, err) = import_balances(&f, switched, &file);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains(&format!("{n} accounts opened")), "{out}");
    // The same payments file: the payments up to the switch are in the balances.
    let (out, err) = import_payments(switched);
    assert!(
        out.contains("2 payments made before their account's switch"),
        "{out}"
    );
    assert!(
        err.contains("not credited: pay:wechat:W1") && err.contains("pay:bank:W3"),
        "{err}"
    );
    assert!(!err.contains("W2"), "{err}");

    // Both deduct the rest of October (a default --from reaching back
    // before the switch): the same balances, to the fen.
    run_lib(&f, history, OCT1_LOCAL_MIDNIGHT + 31 * DAY);
    run_lib(&f, switched, OCT1_LOCAL_MIDNIGHT + 31 * DAY);
    let want = ledger_balances(history);
    assert_eq!(ledger_balances(switched), want);
    // (and the month adds up to each account's bill, less and plus its payments)
    let mut bills = expected_bills(&f);
    *bills.get_mut("P00000").unwrap() += dec!(100);
    *bills.get_mut("P00001").unwrap() += dec!(50);
    *bills.get_mut("P00002").unwrap() += dec!(20);
    bills.retain(|_, b| !b.is_zero());
    assert_eq!(want, bills);

    // The tier position matters: opened at 0 kWh, the heavy users pay
    // the first tier's price again for the second half of the month.
    let at_zero: String = opening
        .lines()
        .map(|l| match l.rsplit_once(',') {
            Some((head, _)) if !l.starts_with("account_id") => format!("{head},0\n"),
            _ => format!("{l}\n"),
        })
        .collect();
    let zero_file = f.root.join("at_zero.csv");
    std::fs::write(&zero_file, at_zero).unwrap();
    assert_eq!(import_balances(&f, spare, &zero_file).0, Some(0));
    run_lib(&f, spare, OCT1_LOCAL_MIDNIGHT + 31 * DAY);
    let cheaper = ledger_balances(spare);
    assert!(
        cheaper
            .iter()
            .any(|(a, b)| *b > want.get(a).copied().unwrap_or_default()),
        "a position of 0 changes nothing? {cheaper:?}"
    );

    // Again: nothing changes. A different balance is refused.
    let (code, out, _) = import_balances(&f, switched, &file);
    assert_eq!(code, Some(0));
    assert!(
        out.contains(&format!(
            "0 accounts opened (balances 0 yuan), {n} already opened (0 meters added to them)"
        )),
        "{out}"
    );
    let changed = f.root.join("changed.csv");
    let first = opening.lines().nth(1).unwrap();
    let (head, pos) = first.rsplit_once(',').unwrap();
    let (head, _) = head.rsplit_once(',').unwrap();
    std::fs::write(
        &changed,
        format!("account_id,switched_at,balance,position_kwh\n{head},999.99,{pos}\n"),
    )
    .unwrap();
    let (code, _, err) = import_balances(&f, switched, &changed);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("changed.csv:2: account P00000: already opened with balance"),
        "{err}"
    );
    assert_eq!(ledger_balances(switched), want);
}

#[test]
fn prepaid_balances_taken_from_a_history_deduct_the_rest_of_the_month_as_that_history_does() {
    let d = tempfile::tempdir().unwrap();
    let url = |name: &str| d.path().join(name).display().to_string();
    switching_fleet_deducts_as_its_history(
        &url("history.sqlite"),
        &url("switched.sqlite"),
        &url("spare.sqlite"),
    );
}

#[test]
fn prepaid_balances_taken_from_a_history_deduct_as_that_history_does_on_postgres() {
    let Some(history) = pg_url("open_history") else {
        return;
    };
    let switched = pg_url("open_switched").unwrap();
    let spare = pg_url("open_spare").unwrap();
    switching_fleet_deducts_as_its_history(&history, &switched, &spare);
}

#[test]
fn prepaid_balances_that_cannot_open_an_account_are_refused_with_the_reason() {
    let f = fixture(8, 5);
    // P00007 has a second meter in service.
    let mut meters = std::fs::read_to_string(f.master.join("meters.csv")).unwrap();
    meters.push_str("EXTRA-P00007,P00007,1,1,2015-01-01\n");
    std::fs::write(f.master.join("meters.csv"), meters).unwrap();
    let url = sqlite_url(&f.root);
    // P00005 opened on the switch's day (accepted), P00006 the day after.
    let accounts = std::fs::read_to_string(f.master.join("accounts.csv")).unwrap();
    let accounts: String = accounts
        .lines()
        .map(|l| match l.split(',').next() {
            Some("account_id") => format!("{l},opened_on\n"),
            Some("P00005") => format!("{l},2026-10-16\n"),
            Some("P00006") => format!("{l},2026-10-17\n"),
            _ => format!("{l},2015-01-01\n"),
        })
        .collect();
    std::fs::write(f.master.join("accounts.csv"), accounts).unwrap();
    let switch = OCT1_LOCAL_MIDNIGHT + 15 * DAY;
    let at = switch_rfc3339(switch);
    let no_reading = switch_rfc3339(switch + 900_000);
    let month_start = switch_rfc3339(OCT1_LOCAL_MIDNIGHT + 31 * DAY);
    // P00003 already has a top-up before the switch in the ledger.
    let mut l = ledger::open_migrated(&url).unwrap();
    let mut early = entry("pay:wechat:E1", "P00003", dec!(10));
    early.ts_ms = switch - DAY;
    l.commit(
        &Batch {
            entries: vec![early],
            ..Default::default()
        },
        &NoHook,
    )
    .unwrap();
    let file = f.root.join("prepaid_balances.csv");
    std::fs::write(
        &file,
        format!(
            "account_id,switched_at,balance,position_kwh\n\
             Q00000,{at},10,0\n\
             P00000,{at},10,0\n\
             P00000,{at},12,0\n\
             P00001,{no_reading},10,0\n\
             P00002,{month_start},10,5\n\
             P00003,{at},10,0\n\
             P00004,{at},10.001,0\n\
             P00005,{at},10,0\n\
             P00006,{at},10,0\n\
             P00007,{at},10,5\n"
        ),
    )
    .unwrap();
    let (code, out, err) = import_balances(&f, &url, &file);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(out.contains("10 rows, 1 accounts opened"), "{out}");
    for want in [
        "prepaid_balances.csv:2: account Q00000: not a prepaid account",
        "prepaid_balances.csv:3: account P00000: the account has rows on lines [3, 4]",
        "prepaid_balances.csv:4: account P00000: the account has rows on lines [3, 4]",
        "prepaid_balances.csv:5: account P00001: meter 500000000001 has no chargeable import_active_total reading at the switch",
        "prepaid_balances.csv:6: account P00002: position_kwh 5: the switch starts a new accumulation window",
        "prepaid_balances.csv:7: account P00003: the ledger already holds 1 entries of it at or before the switch (first: pay:wechat:E1)",
        "prepaid_balances.csv:8: field 'balance'",
        "prepaid_balances.csv:10: account P00006: opened on 2026-10-17, after the switch",
        "prepaid_balances.csv:11: account P00007: position_kwh 5: deductions keep a tier position per meter, and 2 meters of the account were in service at the switch",
    ] {
        assert!(err.contains(want), "missing '{want}' in:\n{err}");
    }
    assert!(!err.contains("P00005"), "{err}");
    // Nothing was written for the others; after a prepay run, an opening is too late.
    assert_eq!(l.cursors().unwrap().len(), 1);
    run_lib(&f, &url, switch);
    std::fs::write(
        &file,
        format!("account_id,switched_at,balance,position_kwh\nP00001,{at},10,0\n"),
    )
    .unwrap();
    let (code, _, err) = import_balances(&f, &url, &file);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("meter 500000000001 is already deducted by meterflow"),
        "{err}"
    );
}

#[test]
fn the_sample_prepaid_balances_open_the_sample_fleet_mid_october() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let d = tempfile::tempdir().unwrap();
    let url = sqlite_url(d.path());
    let (lake, master, tariffs) = (
        root.join("sample-data"),
        root.join("sample-data/master"),
        root.join("tariffs"),
    );
    let file = root.join("sample-data/prepaid_balances.csv");
    let (code, out, err) = import_balances_in([&lake, &master, &tariffs], &url, &file);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("3 accounts opened (balances 73.90 yuan)"),
        "{out}"
    );
    let switch = OCT1_LOCAL_MIDNIGHT + 15 * DAY;
    batch_run(
        &lake,
        &master,
        &tariffs,
        &url,
        OCT1_LOCAL_MIDNIGHT + 31 * DAY,
        7,
        true,
    );
    let mut l = ledger::open(&url).unwrap();
    for a in ["A000000001", "A000000004", "A000000008"] {
        let entries = l.entries(Some(a), 0, usize::MAX).unwrap();
        assert_eq!(entries[0].entry.key, format!("open:{a}"));
        let deducted: Vec<i64> = entries
            .iter()
            .filter(|e| e.entry.kind == EntryKind::Deduction)
            .map(|e| e.entry.ts_ms)
            .collect();
        assert_eq!(deducted.len(), 16, "{a}: the days after the switch");
        assert!(deducted.iter().all(|&t| t > switch), "{a}");
    }
    // A000000001 opened beyond the first tier (257.52 kWh): its first
    // day after the switch is priced at the second tier's price.
    let first = &l.entries(Some("A000000001"), 0, 2).unwrap()[1];
    assert!(
        first
            .entry
            .detail
            .contains("\"position_before\":\"257.52\""),
        "{first:?}"
    );
}

/// Opening entry of `account` at `ts`, position 0 (what `import-balances`
/// writes).
fn opening_entry(account: &str, ts: i64, amount: Decimal) -> NewEntry {
    NewEntry {
        key: format!("open:{account}"),
        account_id: account.into(),
        kind: EntryKind::Adjustment,
        amount,
        ts_ms: ts,
        source: "opening".into(),
        detail: r#"{"position_kwh":"0"}"#.into(),
    }
}

#[test]
fn a_payment_and_an_opening_committed_at_the_same_time_never_count_one_payment_twice() {
    let f = fixture(3, 9);
    let switch = OCT1_LOCAL_MIDNIGHT + 15 * DAY;
    let pay = f.root.join("pay.csv");
    payments_around_the_switch(&pay);
    let fleet = Fleet::load(&f.master).unwrap();
    let pricer = TariffPricer::new(meterflow::tariff::load_dir(&f.tariffs).unwrap());

    // P00000 is opened while the payments import is under way: its
    // 10 October payment, credited in the old system, is not credited.
    let url = f.root.join("a.sqlite").display().to_string();
    let mut l = OvertakenAt {
        inner: ledger::open_migrated(&url).unwrap(),
        nth: 1,
        commits: 0,
        other: Some(Batch {
            entries: vec![opening_entry("P00000", switch, dec!(80))],
            ..Default::default()
        }),
    };
    let r = meterflow::prepay::payments::import_file(&mut l, &pay, &NoHook, 100).unwrap();
    assert_eq!((r.credited, r.before_switch.len()), (2, 1), "{r:?}");
    assert!(r.before_switch[0].starts_with("pay:wechat:W1:"), "{r:?}");
    assert_eq!(l.inner.balance("P00000").unwrap(), dec!(80));

    // A payment before the switch credited while the opening is under
    // way: that account is refused (its balance would hold the payment
    // twice), the others are opened; again, it is refused for the payment.
    let url = f.root.join("b.sqlite").display().to_string();
    let mut early = entry("pay:wechat:E1", "P00001", dec!(10));
    early.ts_ms = switch - DAY;
    let mut l = OvertakenAt {
        inner: ledger::open_migrated(&url).unwrap(),
        nth: 1,
        commits: 0,
        other: Some(Batch {
            entries: vec![early],
            ..Default::default()
        }),
    };
    let file = f.root.join("prepaid_balances.csv");
    let at = switch_rfc3339(switch);
    std::fs::write(
        &file,
        format!("account_id,switched_at,balance\nP00000,{at},1\nP00001,{at},2\nP00002,{at},3\n"),
    )
    .unwrap();
    let import = |l: &mut dyn Ledger| {
        meterflow::prepay::opening::import_file(l, &file, &fleet, &pricer, &f.lake, 10).unwrap()
    };
    let r = import(&mut l);
    assert_eq!((r.imported, r.balance), (2, dec!(4)), "{r:?}");
    assert_eq!(r.refused.len(), 1, "{r:?}");
    assert!(
        r.refused[0].ends_with("prepaid_balances.csv:3: account P00001: the ledger changed while importing (a prepay run or stream wrote a meter's cursor, a payment was credited, or another import opened it otherwise): not opened; import again"),
        "{r:?}"
    );
    let r = import(&mut l);
    assert_eq!((r.imported, r.already), (0, 2), "{r:?}");
    assert!(r.refused[0].contains("account P00001: the ledger already holds 1 entries of it at or before the switch (first: pay:wechat:E1)"), "{r:?}");
    assert_eq!(l.inner.balance("P00001").unwrap(), dec!(10));
    assert!(l
        .inner
        .cursor(&meter_id(1), "import_active_total")
        .unwrap()
        .is_none());

    // Another import of the same file opening P00000 first: counted as
    // already opened, not refused.
    let url = f.root.join("c.sqlite").display().to_string();
    let mut l2 = OvertakenAt {
        inner: ledger::open_migrated(&url).unwrap(),
        nth: 1,
        commits: 0,
        other: Some(Batch {
            entries: vec![opening_entry("P00000", switch, dec!(1))],
            ..Default::default()
        }),
    };
    let r = import(&mut l2);
    assert_eq!((r.imported, r.already, r.refused.len()), (2, 1, 0), "{r:?}");
    // ... but opening it at another position is not the same opening.
    let url = f.root.join("d.sqlite").display().to_string();
    let mut elsewhere = opening_entry("P00000", switch, dec!(1));
    elsewhere.detail = r#"{"position_kwh":"5"}"#.into();
    let mut l3 = OvertakenAt {
        inner: ledger::open_migrated(&url).unwrap(),
        nth: 1,
        commits: 0,
        other: Some(Batch {
            entries: vec![elsewhere],
            ..Default::default()
        }),
    };
    let r = import(&mut l3);
    assert_eq!((r.imported, r.already, r.refused.len()), (2, 0, 1), "{r:?}");

    // A corrected position is refused, not ignored; a meter added to
    // meters.csv since (removed before the switch) gets its cursor.
    std::fs::write(
        &file,
        format!("account_id,switched_at,balance,position_kwh\nP00000,{at},1,7\nP00002,{at},3,\n"),
    )
    .unwrap();
    // A removed_on column, and the old meter of P00002 removed in 2020.
    let meters = std::fs::read_to_string(f.master.join("meters.csv")).unwrap();
    let mut meters: String = meters
        .lines()
        .map(|l| match l.starts_with("meter_id") {
            true => format!("{l},removed_on\n"),
            false => format!("{l},\n"),
        })
        .collect();
    meters.push_str("OLD-P00002,P00002,1,1,2015-01-01,2020-06-30\n");
    std::fs::write(f.master.join("meters.csv"), meters).unwrap();
    let fleet = Fleet::load(&f.master).unwrap();
    let r = meterflow::prepay::opening::import_file(&mut l, &file, &fleet, &pricer, &f.lake, 10)
        .unwrap();
    assert_eq!((r.imported, r.already, r.meters_added), (0, 1, 1), "{r:?}");
    assert!(
        r.refused[0].ends_with(&format!(
            "account P00000: already opened with balance 1 at {at}, position_kwh 0; this file says balance 1 at {at}, position_kwh 7"
        )),
        "{r:?}"
    );
    let c = l
        .inner
        .cursor("OLD-P00002", "import_active_total")
        .unwrap()
        .unwrap();
    assert_eq!(c.last_ts_ms, switch);
    let r = meterflow::prepay::opening::import_file(&mut l, &file, &fleet, &pricer, &f.lake, 10)
        .unwrap();
    assert_eq!((r.already, r.meters_added), (1, 0), "{r:?}");
}

#[test]
fn entry_count_and_absent_key_preconditions_leave_a_changed_ledger_untouched() {
    let d = tempfile::tempdir().unwrap();
    let mut backends: Vec<Box<dyn Ledger>> =
        vec![ledger::open_migrated(&sqlite_url(d.path())).unwrap()];
    if let Some(url) = pg_url("preconditions") {
        backends.push(ledger::open_migrated(&url).unwrap());
    }
    for mut l in backends {
        let one = |key: &str| Batch {
            entries: vec![entry(key, "A1", dec!(5))],
            ..Default::default()
        };
        assert!(!l.commit(&one("pay:wechat:X1"), &NoHook).unwrap().stale);
        let mut b = one("pay:wechat:X2");
        b.entry_counts = vec![("A1".into(), 0)];
        assert!(l.commit(&b, &NoHook).unwrap().stale, "{}", l.describe());
        b.entry_counts = vec![("A1".into(), 1)];
        b.absent_keys = vec!["pay:wechat:X1".into()];
        assert!(l.commit(&b, &NoHook).unwrap().stale, "{}", l.describe());
        b.absent_keys = vec!["open:A1".into()];
        assert!(!l.commit(&b, &NoHook).unwrap().stale, "{}", l.describe());
        assert_eq!(l.balance("A1").unwrap(), dec!(10));
        let found = l
            .entries_by_keys(&[
                "pay:wechat:X2".into(),
                "nope".into(),
                "pay:wechat:X1".into(),
            ])
            .unwrap();
        let keys: Vec<&str> = found.iter().map(|e| e.entry.key.as_str()).collect();
        assert_eq!(keys, ["pay:wechat:X1", "pay:wechat:X2"]);
    }
}

#[test]
fn stream_deducts_an_opened_fleet_only_after_its_switch() {
    let Some(mqtt) = mqtt_url("stream opening") else {
        return;
    };
    let n = 10;
    let f = fixture(n, 31);
    let switch = OCT1_LOCAL_MIDNIGHT + 15 * DAY;
    // The old system: deducted through 16 October.
    let history = f.root.join("history.sqlite").display().to_string();
    run_lib(&f, &history, switch);
    let file = f.root.join("prepaid_balances.csv");
    std::fs::write(&file, openings_at(&history, switch, n)).unwrap();
    let url = sqlite_url(&f.root);
    let (code, out, err) = import_balances(&f, &url, &file);
    assert_eq!(code, Some(0), "{out}{err}");
    // The whole month arrives over MQTT, the days before the switch too.
    let client = unique("open");
    let topic = format!("meterflow-test/{client}");
    let cfg = write_stream_config(&f, &url, &mqtt, &client, &topic, None);
    let mut c = spawn_stream(&cfg, Some(3));
    let h = wait_subscribed(&mut c);
    publish_fixture(&mqtt, &topic, &f);
    assert!(c.wait().unwrap().success());
    let _ = h.join();
    // Opening balance plus what followed the switch: the month's bill.
    assert_matches_recomputation(&url, &f);
    let mut l = ledger::open(&url).unwrap();
    let early: Vec<_> = l
        .entries(None, 0, usize::MAX)
        .unwrap()
        .into_iter()
        .filter(|e| e.entry.kind == EntryKind::Deduction && e.entry.ts_ms <= switch)
        .collect();
    assert!(early.is_empty(), "{early:?}");
}
