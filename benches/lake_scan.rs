//! Read path of the readings lake: the batch jobs' scan of one day of a
//! 100,000-meter fleet (the lake's own files), with meter ids read from the
//! `meter_id` pages as runs of equal ids (`store::scan::for_each_view`, what
//! the bill run, prepayment and analytics use) side by side with the same
//! columns read by arrow-rs's reader, ids as a text column
//! (`unit_batches` + `ScanView::new`, the path for other writers' files).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use meterflow::sim::fleet::{self, FleetOptions};
use meterflow::store::scan::{self, ScanView, Unit, SCAN_COLUMNS};
use meterflow::store::{reader, schema, StoreError};

/// Rows, and id changes between neighbouring rows (so no work is skipped).
fn by_runs(units: &[Unit]) -> (usize, usize) {
    let (mut rows, mut changes) = (0, 0);
    for u in units {
        scan::for_each_view(u, &SCAN_COLUMNS, None, |b, v| {
            rows += b.num_rows();
            changes += (1..b.num_rows())
                .filter(|&i| !v.meter_id.same(i - 1, i))
                .count();
            Ok::<(), StoreError>(())
        })
        .unwrap();
    }
    (rows, changes)
}

fn by_text(units: &[Unit]) -> (usize, usize) {
    let (mut rows, mut changes) = (0, 0);
    for u in units {
        for b in scan::unit_batches(u, &SCAN_COLUMNS, None).unwrap() {
            let b = b.unwrap();
            let v = ScanView::new(&b, &u.path).unwrap();
            rows += b.num_rows();
            changes += (1..b.num_rows())
                .filter(|&i| !v.meter_id.same(i - 1, i))
                .count();
        }
    }
    (rows, changes)
}

fn lake_scan(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut o = FleetOptions::new(dir.path());
    o.meters = 100_000;
    o.days = 1;
    fleet::generate(&o, &|_, _| {}).unwrap();
    let files = reader::list_files(
        dir.path(),
        schema::READINGS,
        chrono::NaiveDate::MIN,
        chrono::NaiveDate::MAX,
    )
    .unwrap();
    let units = scan::units(&files).unwrap();
    let (rows, changes) = by_runs(&units);
    assert_eq!((rows, changes), by_text(&units));
    let mut g = c.benchmark_group("lake_scan");
    g.sample_size(20);
    g.throughput(Throughput::Elements(rows as u64));
    g.bench_function("scan_ids_as_runs_from_pages", |b| {
        b.iter(|| by_runs(&units))
    });
    g.bench_function("scan_ids_as_text_column", |b| b.iter(|| by_text(&units)));
    g.finish();
}

criterion_group!(benches, lake_scan);
criterion_main!(benches);
