//! Rating throughput: bills for N accounts from in-memory readings (VEE,
//! consumption, tariff engine), and the incremental price function.

use std::hint::black_box;
use std::path::PathBuf;

use chrono::NaiveDate;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use meterflow::billing::engine::bill_readings;
use meterflow::billing::period::BillPeriod;
use meterflow::master::{BillingAccount, CustomerClass, Meter, PaymentMode};
use meterflow::model::{Channel, Protocol, Quality, Reading, Source};
use meterflow::tariff::price::{incremental_charge, Usage};
use rust_decimal::Decimal;

fn setup(n: usize) -> (Vec<BillingAccount>, Vec<Meter>, Vec<Reading>) {
    let d = |s: &str| s.parse::<NaiveDate>().unwrap();
    let mut accounts = Vec::new();
    let mut meters = Vec::new();
    let mut readings = Vec::new();
    for i in 0..n {
        let id = format!("A{i:09}");
        let mid = format!("{:012}", 300_000_000_000u64 + i as u64);
        accounts.push(BillingAccount {
            account_id: id.clone().into(),
            customer_class: CustomerClass::Residential,
            tariff_id: if i % 10 == 0 {
                "gd-tou-commercial"
            } else {
                "bj-residential-monthly"
            }
            .into(),
            payment_mode: PaymentMode::Postpaid,
            contracted_kva: Decimal::ZERO,
            opened_on: d("2020-01-01"),
        });
        meters.push(Meter {
            meter_id: mid.clone(),
            account_id: id,
            meter_type: "bench".into(),
            ct_ratio: Decimal::ONE,
            pt_ratio: Decimal::ONE,
            register_digits: 6,
            installed_on: d("2020-01-01"),
            removed_on: None,
            feeder: String::new(),
        });
        let start = 1_790_784_000_000i64; // 2026-10-01 00:00 +08:00
        for day in 0..=31i64 {
            let ts = start + day * 86_400_000;
            let base = Decimal::new(1000 + day * (800 + (i as i64 % 700)), 2);
            for (k, ch) in [
                Channel::ImportActiveTotal,
                Channel::ImportActiveT1,
                Channel::ImportActiveT2,
                Channel::ImportActiveT3,
                Channel::ImportActiveT4,
            ]
            .into_iter()
            .enumerate()
            {
                let v = if k == 0 {
                    base
                } else {
                    base / Decimal::from(4)
                };
                readings.push(Reading {
                    meter_id: mid.clone(),
                    ts_ms: ts,
                    channel: ch,
                    value: v.round_dp(4),
                    quality: Quality::OK,
                    source: Source {
                        protocol: Protocol::Sim,
                        collector: "bench".into(),
                        address: "".into(),
                    },
                    received_ms: ts,
                });
            }
        }
    }
    (accounts, meters, readings)
}

fn bench(c: &mut Criterion) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tariffs = meterflow::tariff::load_dir(&root.join("tariffs")).unwrap();
    let n = 2_000;
    let (accounts, meters, readings) = setup(n);
    let mut g = c.benchmark_group("bill");
    g.sample_size(10);
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("bill_readings_2000_accounts_31_days", |b| {
        b.iter(|| {
            let period = BillPeriod::parse("2026-10").unwrap();
            black_box(bill_readings(
                &accounts, &meters, &tariffs, period, &readings,
            ))
        })
    });
    let v = &tariffs.get("bj-residential-monthly").unwrap().versions[0];
    let limits = v.tiers.as_ref().unwrap().limits.clone();
    g.throughput(Throughput::Elements(31));
    g.bench_function("incremental_charge_31_days", |b| {
        b.iter(|| {
            let start = Usage::default();
            let mut pos = start;
            let mut sum = Decimal::ZERO;
            for _ in 0..31 {
                let next = Usage::total(pos.total + Decimal::new(1234, 2));
                for l in incremental_charge(v, &limits, &start, &pos, &next) {
                    sum += l.amount;
                }
                pos = next;
            }
            black_box(sum)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
