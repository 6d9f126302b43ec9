//! Write path of the readings lake: committed Parquet files per second, on the
//! fleet generator's output; and the spool accept + flush path collectors use.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use meterflow::sim::fleet::{self, FleetOptions};
use meterflow::store::{atomic, reader, schema, Lake, LakeOptions};

fn fleet_batches(meters: usize) -> (tempfile::TempDir, Vec<arrow::record_batch::RecordBatch>) {
    let dir = tempfile::tempdir().unwrap();
    let mut o = FleetOptions::new(dir.path());
    o.meters = meters;
    o.days = 1;
    fleet::generate(&o, &|_, _| {}).unwrap();
    let mut batches = Vec::new();
    for (_, f) in reader::list_files(
        dir.path(),
        schema::READINGS,
        chrono::NaiveDate::MIN,
        chrono::NaiveDate::MAX,
    )
    .unwrap()
    {
        batches.extend(reader::read_file(&f).unwrap());
    }
    (dir, batches)
}

fn write_committed_parquet(c: &mut Criterion) {
    let (_keep, batches) = fleet_batches(100_000);
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let out = tempfile::tempdir().unwrap();
    let mut g = c.benchmark_group("lake_write");
    g.sample_size(10);
    g.throughput(Throughput::Elements(rows as u64));
    let file = out.path().join("readings/date=2026-10-01/bench.parquet");
    let commit = |batches: &[arrow::record_batch::RecordBatch]| {
        atomic::write_parquet_atomic(&file, schema::readings_schema(), batches).unwrap();
        std::fs::remove_file(&file).unwrap();
    };
    g.bench_function("committed_parquet_file", |b| b.iter(|| commit(&batches)));
    // The same rows with the repeating text columns handed over as keys, as
    // collectors and MQTT ingest commit them (store::dict writes those
    // columns; arrow-rs hashes every value of the plain ones).
    let keyed: Vec<arrow::record_batch::RecordBatch> = batches
        .iter()
        .map(|b| {
            let cols = b
                .columns()
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let f = schema::readings_schema().field(i).clone();
                    let dict = meterflow::store::columns::segment_schema()
                        .field(i)
                        .data_type()
                        .clone();
                    if f.data_type() == &dict {
                        c.clone()
                    } else {
                        arrow::compute::cast(c, &dict).unwrap()
                    }
                })
                .collect();
            arrow::record_batch::RecordBatch::try_new(
                meterflow::store::columns::segment_schema(),
                cols,
            )
            .unwrap()
        })
        .collect();
    g.bench_function("committed_parquet_file_text_keys", |b| {
        b.iter(|| commit(&keyed))
    });
    g.finish();
}

fn spool_accept_and_flush(c: &mut Criterion) {
    let readings: Vec<_> = (0..100_000).map(meterflow::store::soak_reading).collect();
    let mut g = c.benchmark_group("lake_accept_flush");
    g.sample_size(10);
    g.throughput(Throughput::Elements(readings.len() as u64));
    g.bench_function("accept_1000_per_fsync_then_flush", |b| {
        b.iter_batched(
            tempfile::tempdir,
            |dir| {
                let dir = dir.unwrap();
                let mut lake = Lake::open(dir.path(), LakeOptions::new("bench")).unwrap();
                for chunk in readings.chunks(1000) {
                    lake.accept(chunk).unwrap();
                }
                lake.flush().unwrap();
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, write_committed_parquet, spool_accept_and_flush);
criterion_main!(benches);
