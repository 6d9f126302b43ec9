//! The readings lake: atomic commits, spool replay after a kill, torn tails,
//! compaction, inspection and interop with DuckDB / pyarrow / polars.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meterflow::model::{Channel, Protocol, Quality, Reading, Source};
use meterflow::store::{self, reader, Lake, LakeOptions};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;

use crate::common::{bin, python};

fn reading(meter: &str, ts_ms: i64, value: Decimal) -> Reading {
    Reading {
        meter_id: meter.into(),
        ts_ms,
        channel: Channel::ImportActiveTotal,
        value,
        quality: Quality::OK,
        source: Source {
            protocol: Protocol::Dlt645,
            collector: "c1".into(),
            address: "bus1".into(),
        },
        received_ms: ts_ms + 1000,
    }
}

/// Every visible Parquet file of the lake must open and decode completely.
fn assert_all_visible_files_readable(root: &Path) {
    for dataset in ["readings", "quarantine"] {
        for (_, f) in reader::list_files(
            root,
            dataset,
            chrono::NaiveDate::MIN,
            chrono::NaiveDate::MAX,
        )
        .unwrap()
        {
            reader::read_file(&f).unwrap_or_else(|e| panic!("visible file unreadable: {e}"));
        }
    }
}

#[test]
fn accepted_readings_survive_a_restart_without_flush() {
    let dir = tempfile::tempdir().unwrap();
    let rs: Vec<Reading> = (0..100)
        .map(|i| {
            reading(
                "398192000337",
                1_790_000_000_000 + i * 900_000,
                Decimal::new(i, 2),
            )
        })
        .collect();
    {
        let mut lake = Lake::open(dir.path(), LakeOptions::new("w1")).unwrap();
        lake.accept(&rs).unwrap();
        std::mem::forget(lake); // a crash: no flush, no drop
    }
    let lake = Lake::open(dir.path(), LakeOptions::new("w1")).unwrap();
    assert_eq!(lake.replayed.readings, 100);
    let mut back = reader::read_all_readings(dir.path()).unwrap();
    back.sort_by_key(|r| r.ts_ms);
    assert_eq!(back, rs);
}

#[test]
fn values_that_do_not_fit_the_decimal_are_quarantined_not_rounded() {
    let dir = tempfile::tempdir().unwrap();
    let mut lake = Lake::open(dir.path(), LakeOptions::new("w1")).unwrap();
    lake.accept(&[
        reading("1", 1_790_000_000_000, dec!(1.00001)),
        reading("2", 1_790_000_000_000, dec!(2.5)),
    ])
    .unwrap();
    let s = lake.flush().unwrap();
    assert_eq!(s.rejected, 1);
    let back = reader::read_all_readings(dir.path()).unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].value, dec!(2.5));
    let q = reader::list_files(
        dir.path(),
        "quarantine",
        chrono::NaiveDate::MIN,
        chrono::NaiveDate::MAX,
    )
    .unwrap();
    assert_eq!(q.len(), 1);
}

#[test]
fn torn_spool_tail_is_dropped_and_earlier_readings_kept() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("_spool").join("w1");
    {
        let mut lake = Lake::open(dir.path(), LakeOptions::new("w1")).unwrap();
        lake.accept(&[reading("1", 1_790_000_000_000, dec!(1))])
            .unwrap();
        lake.accept(&[reading("1", 1_790_000_900_000, dec!(2))])
            .unwrap();
        std::mem::forget(lake);
    }
    let seg = store::spool::list_segments(&spool)
        .unwrap()
        .pop()
        .unwrap()
        .1;
    let data = std::fs::read(&seg).unwrap();
    std::fs::write(&seg, &data[..data.len() - 5]).unwrap();
    let _lake = Lake::open(dir.path(), LakeOptions::new("w1")).unwrap();
    let back = reader::read_all_readings(dir.path()).unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].value, dec!(1));
}

/// Runs `meterflow store soak`, kills it with SIGKILL after `after`, and returns
/// the highest count it acknowledged.
fn soak_and_kill(lake: &Path, after: Duration) -> usize {
    let mut child = Command::new(bin())
        .args(["store", "soak", "--lake"])
        .arg(lake)
        .args([
            "--readings",
            "400000",
            "--batch",
            "500",
            "--flush-every",
            "7",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(n) = line.strip_prefix("acked ") {
                let _ = tx.send(n.parse::<usize>().unwrap());
            }
        }
    });
    let t0 = Instant::now();
    let mut acked = 0;
    while t0.elapsed() < after {
        if let Ok(n) = rx.recv_timeout(Duration::from_millis(5)) {
            acked = acked.max(n);
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    while let Ok(n) = rx.recv_timeout(Duration::from_millis(50)) {
        acked = acked.max(n);
    }
    acked
}

#[test]
fn writer_killed_at_random_points_loses_nothing_acked_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut expected_max = 0;
    // Each iteration appends to the same lake under the same writer id, so
    // replays of earlier kills are exercised too.
    for (iter, ms) in [40u64, 90, 150, 230, 330, 60, 500].iter().enumerate() {
        let lake = dir.path().join(format!("lake{iter}"));
        let acked = soak_and_kill(&lake, Duration::from_millis(*ms));
        // No partial file is ever visible, whatever the kill point.
        assert_all_visible_files_readable(&lake);
        // Restart: the spool is replayed.
        drop(Lake::open(&lake, LakeOptions::new("soak")).unwrap());
        let back = reader::read_all_readings(&lake).unwrap();
        let mut seen: HashMap<(String, i64), Decimal> = HashMap::new();
        for r in &back {
            assert!(
                seen.insert((r.meter_id.clone(), r.ts_ms), r.value)
                    .is_none(),
                "duplicate row after replay: {r:?}"
            );
        }
        for i in 0..acked {
            let want = store::soak_reading(i);
            assert_eq!(
                seen.get(&(want.meter_id.clone(), want.ts_ms)),
                Some(&want.value),
                "acked reading {i} lost (acked {acked})"
            );
        }
        expected_max = expected_max.max(acked);
    }
    assert!(
        expected_max > 0,
        "the soak process never acknowledged anything"
    );
}

#[test]
fn compaction_removes_exact_duplicates_and_keeps_conflicts_with_both_values() {
    let dir = tempfile::tempdir().unwrap();
    let t = 1_790_000_000_000;
    for (w, rs) in [
        (
            "a",
            vec![
                reading("m1", t, dec!(10)),
                reading("m1", t + 900_000, dec!(11)),
                reading("m2", t, dec!(5)),
            ],
        ),
        (
            "b",
            vec![reading("m1", t, dec!(10)), reading("m2", t, dec!(6))],
        ),
    ] {
        let mut lake = Lake::open(dir.path(), LakeOptions::new(w)).unwrap();
        lake.accept(&rs).unwrap();
        lake.flush().unwrap();
    }
    let s = store::compact::compact(dir.path(), chrono::NaiveDate::MIN, chrono::NaiveDate::MAX)
        .unwrap();
    assert_eq!(s.rows_in, 5);
    assert_eq!(s.exact_duplicates_removed, 1);
    assert_eq!(s.conflicts, 1);
    assert_eq!(s.rows_out, 4);
    let back = reader::read_all_readings(dir.path()).unwrap();
    let m2: Vec<_> = back.iter().filter(|r| r.meter_id == "m2").collect();
    assert_eq!(m2.len(), 2);
    assert!(m2.iter().all(|r| r.quality.contains(Quality::CONFLICT)));
    let c = reader::list_files(
        dir.path(),
        "conflicts",
        chrono::NaiveDate::MIN,
        chrono::NaiveDate::MAX,
    )
    .unwrap();
    assert_eq!(c.len(), 1);
    let batches = reader::read_file(&c[0].1).unwrap();
    assert_eq!(batches[0].num_rows(), 1);
    // Compacting again changes nothing.
    let again = store::compact::compact(dir.path(), chrono::NaiveDate::MIN, chrono::NaiveDate::MAX)
        .unwrap();
    assert_eq!(again.partitions_rewritten, 0);
    assert_eq!(again.rows_out, 4);
}

#[test]
fn compacting_again_after_new_readings_records_each_conflict_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let t = 1_790_000_000_000;
    let write = |w: &str, rs: Vec<Reading>| {
        let mut lake = Lake::open(root, LakeOptions::new(w)).unwrap();
        lake.accept(&rs).unwrap();
        lake.flush().unwrap();
    };
    let compact =
        || store::compact::compact(root, chrono::NaiveDate::MIN, chrono::NaiveDate::MAX).unwrap();
    let conflict_rows = || -> usize {
        reader::list_files(
            root,
            "conflicts",
            chrono::NaiveDate::MIN,
            chrono::NaiveDate::MAX,
        )
        .unwrap()
        .iter()
        .flat_map(|(_, f)| reader::read_file(f).unwrap())
        .map(|b| b.num_rows())
        .sum()
    };
    let m1 = |value, received_after: i64| Reading {
        received_ms: t + received_after,
        ..reading("m1", t, value)
    };
    write("a", vec![m1(dec!(5), 1_000)]);
    write("b", vec![m1(dec!(6), 2_000)]);
    compact();
    assert_eq!(conflict_rows(), 1);
    // An unrelated reading the same day makes the partition compact again.
    write("c", vec![reading("m2", t, dec!(7))]);
    let s = compact();
    assert_eq!(s.partitions_rewritten, 1);
    assert_eq!(
        conflict_rows(),
        1,
        "the known conflict is not recorded twice"
    );
    // A third value for the same key is a new conflict.
    write("d", vec![m1(dec!(8), 3_000)]);
    compact();
    assert_eq!(conflict_rows(), 2);
}

#[test]
fn compaction_merges_quarantine_files_and_drops_rows_repeated_exactly() {
    use meterflow::store::QuarantineRecord;
    let dir = tempfile::tempdir().unwrap();
    let t = 1_790_000_000_000;
    let dead = |reason: &str, received_ms: i64| QuarantineRecord {
        received_ms,
        protocol: Protocol::Mqtt,
        collector: "ingest".into(),
        address: "meters/7/state".into(),
        reason: reason.into(),
        payload: b"{not json".to_vec(),
    };
    // A message dead-lettered, then redelivered after a crash with its first
    // receive time (an exact copy), and two that differ in one column each.
    for (w, recs) in [
        ("a", vec![dead("bad json", t), dead("bad json", t + 1)]),
        ("b", vec![dead("bad json", t), dead("unknown meter", t)]),
    ] {
        let mut lake = Lake::open(dir.path(), LakeOptions::new(w)).unwrap();
        lake.quarantine(&recs).unwrap();
        lake.flush().unwrap();
    }
    let rows = || -> Vec<(i64, String)> {
        reader::list_files(
            dir.path(),
            "quarantine",
            chrono::NaiveDate::MIN,
            chrono::NaiveDate::MAX,
        )
        .unwrap()
        .iter()
        .flat_map(|(_, f)| reader::read_file(f).unwrap())
        .flat_map(|b| {
            let ts = b
                .column_by_name("received_at")
                .unwrap()
                .as_any()
                .downcast_ref::<arrow::array::TimestampMillisecondArray>()
                .unwrap()
                .clone();
            let reason = b
                .column_by_name("reason")
                .unwrap()
                .as_any()
                .downcast_ref::<arrow::array::StringArray>()
                .unwrap()
                .clone();
            (0..b.num_rows())
                .map(|i| (ts.value(i), reason.value(i).to_string()))
                .collect::<Vec<_>>()
        })
        .collect()
    };
    assert_eq!(rows().len(), 4);
    let compact = || {
        store::compact::compact(dir.path(), chrono::NaiveDate::MIN, chrono::NaiveDate::MAX).unwrap()
    };
    let s = compact();
    assert_eq!((s.quarantine_files_in, s.quarantine_files_out), (2, 1));
    assert_eq!(s.quarantine_duplicates_removed, 1);
    assert_eq!(
        rows(),
        vec![
            (t, "bad json".to_string()),
            (t + 1, "bad json".to_string()),
            (t, "unknown meter".to_string()),
        ],
        "the first of each, in file order"
    );
    let again = compact();
    assert_eq!(
        (again.quarantine_files_in, again.quarantine_files_out),
        (1, 1)
    );
    assert_eq!(again.quarantine_duplicates_removed, 0);
    assert_eq!(rows().len(), 3);
}

#[test]
fn inspect_reports_a_corrupt_file_by_name_and_keeps_going() {
    let dir = tempfile::tempdir().unwrap();
    let mut lake = Lake::open(dir.path(), LakeOptions::new("w")).unwrap();
    lake.accept(&[reading("m1", 1_790_000_000_000, dec!(1))])
        .unwrap();
    lake.flush().unwrap();
    let part = dir.path().join("readings/date=2026-09-21");
    std::fs::create_dir_all(&part).unwrap();
    std::fs::write(part.join("broken.parquet"), b"PAR1 this is not parquet").unwrap();
    let out = Command::new(bin())
        .args(["store", "inspect", "--json"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["rows"], 1);
    assert!(v["unreadable_files"][0][0]
        .as_str()
        .unwrap()
        .ends_with("broken.parquet"));
}

#[test]
fn sim_fleet_is_deterministic_and_inspectable() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    for d in [a.path(), b.path()] {
        let st = Command::new(bin())
            .args([
                "sim",
                "fleet",
                "--meters",
                "300",
                "--days",
                "5",
                "--seed",
                "7",
                "--anomaly-per-mille",
                "100",
                "--out",
            ])
            .arg(d)
            .status()
            .unwrap();
        assert!(st.success());
    }
    for f in [
        "master/meters.csv",
        "master/accounts.csv",
        "master/payments.csv",
    ] {
        assert_eq!(
            std::fs::read(a.path().join(f)).unwrap(),
            std::fs::read(b.path().join(f)).unwrap(),
            "{f}"
        );
    }
    let ra = reader::read_all_readings(a.path()).unwrap();
    let rb = reader::read_all_readings(b.path()).unwrap();
    assert_eq!(ra, rb);
    // 300 meters x 6 snapshots x 5 registers, plus industrial extras and exchanges.
    assert!(ra.len() >= 300 * 6 * 5 - 100, "{}", ra.len());
    let meters = meterflow::master::load_meters(&a.path().join("master/meters.csv")).unwrap();
    assert!(meters.errors.is_empty());
    let accounts = meterflow::master::load_accounts(&a.path().join("master/accounts.csv")).unwrap();
    assert!(accounts.errors.is_empty());
    assert_eq!(accounts.rows.len(), 300);
    let payments = meterflow::master::load_payments(&a.path().join("master/payments.csv")).unwrap();
    assert!(payments.errors.is_empty());
}

#[test]
fn duckdb_pyarrow_and_polars_read_the_lake_exactly_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let lake_dir = dir.path().join("lake");
    let values = [
        dec!(0),
        dec!(0.0001),
        dec!(-0.0001),
        dec!(999999.99),
        dec!(12345678901234.5678),
        dec!(-99999999999999.9999),
        dec!(42.5),
    ];
    let mut rs = Vec::new();
    for (i, v) in values.iter().enumerate() {
        // Spread over two UTC dates to check the partition column.
        let ts = 1_790_000_000_000 + i as i64 * 43_200_000 + 7;
        let mut r = reading(&format!("{:012}", i), ts, *v);
        if i == 3 {
            r.quality = Quality::ESTIMATED | Quality::ROLLOVER;
        }
        rs.push(r);
    }
    let mut lake = Lake::open(&lake_dir, LakeOptions::new("interop")).unwrap();
    lake.accept(&rs).unwrap();
    lake.flush().unwrap();
    let mut expected = String::from("meter_id,ts_ms,date,value,quality\n");
    for r in &rs {
        let date = chrono::DateTime::from_timestamp_millis(r.ts_ms)
            .unwrap()
            .date_naive();
        expected.push_str(&format!(
            "{},{},{},{:.4},\"{}\"\n",
            r.meter_id, r.ts_ms, date, r.value, r.quality
        ));
    }
    let exp = dir.path().join("expected.csv");
    std::fs::write(&exp, expected).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/interop_check.py");
    let out = Command::new(python())
        .arg(script)
        .arg(&lake_dir)
        .arg(&exp)
        .output()
        .unwrap();
    let stdout = crate::common::stdout_of(&out, "interop check");
    for engine in ["duckdb", "pyarrow", "polars"] {
        assert!(stdout.contains(&format!("{engine}: ok")), "{stdout}");
    }
}

#[test]
fn fleet_writer_killed_mid_file_leaves_no_partial_file_visible() {
    for delay in [150u64, 400, 900] {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(bin())
            .args(["sim", "fleet", "--meters", "60000", "--days", "10", "--out"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_all_visible_files_readable(dir.path());
    }
}

#[test]
fn master_check_names_file_line_and_field_and_fails_only_when_nothing_is_usable() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("meters.csv"),
        "meter_id,account_id,ct_ratio,pt_ratio,installed_on\nM1,A1,1,1,2026-01-01\nM2,A1,-5,1,2026-01-01\n",
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["master", "check"])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("meters.csv:3: field 'ct_ratio': must be positive"),
        "{text}"
    );
    std::fs::write(
        dir.path().join("meters.csv"),
        "meter_id,account_id,ct_ratio,pt_ratio,installed_on\nM2,A1,x,1,2026-01-01\n",
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["master", "check"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}
