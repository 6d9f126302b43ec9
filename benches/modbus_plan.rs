//! Modbus pure-layer speed: planning register maps into requests, and decoding
//! reply words into exact decimals.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use meterflow::protocol::modbus::decode::{decode, encode};
use meterflow::protocol::modbus::{plan, profiles, Area, DataType, PlanOptions, Register};
use rust_decimal::Decimal;

fn bench_plan(c: &mut Criterion) {
    let sdm = profiles::get("eastron_sdm630")
        .unwrap()
        .unwrap()
        .registers
        .clone();
    c.bench_function("plan_sdm630_profile", |b| {
        b.iter(|| plan(black_box(&sdm), &PlanOptions::default()))
    });
    // a big sparse map: 500 f32 registers with gaps of 0..7 words
    let big: Vec<Register> = (0..500u16)
        .map(|i| {
            Register::new(
                &format!("r{i}"),
                Area::Holding,
                i * 2 + (i % 4) * 2 + i / 10 * 4,
                DataType::F32,
            )
        })
        .collect();
    c.bench_function("plan_500_sparse_registers", |b| {
        b.iter(|| plan(black_box(&big), &PlanOptions::default()))
    });
    let all: Vec<Vec<Register>> = (0..1000)
        .map(|i| {
            profiles::get(profiles::names()[i % 3])
                .unwrap()
                .unwrap()
                .registers
                .clone()
        })
        .collect();
    c.bench_function("plan_1000_devices", |b| {
        b.iter(|| {
            all.iter()
                .map(|r| plan(r, &PlanOptions::default()).len())
                .sum::<usize>()
        })
    });
}

fn bench_decode(c: &mut Criterion) {
    let p = profiles::get("eastron_sdm630").unwrap().unwrap();
    let regs = &p.registers;
    let reqs = plan(regs, &PlanOptions::default());
    let req = &reqs[0];
    let mut words = vec![0u16; usize::from(req.count)];
    for f in &req.fields {
        let r = &regs[f.register];
        let w = encode(r, Decimal::new(23012, 2) * r.scale).unwrap();
        let o = usize::from(f.offset);
        words[o..o + w.len()].copy_from_slice(&w);
    }
    c.bench_function("decode_sdm630_reply_18_floats", |b| {
        b.iter(|| {
            req.fields
                .iter()
                .map(|f| {
                    let r = &regs[f.register];
                    let o = usize::from(f.offset);
                    decode(r, black_box(&words[o..o + usize::from(r.words())])).is_ok() as usize
                })
                .sum::<usize>()
        })
    });
    let mut u = Register::new("e", Area::Holding, 0, DataType::U32);
    u.scale = Decimal::new(1, 1);
    c.bench_function("decode_u32_scaled", |b| {
        b.iter(|| decode(&u, black_box(&[0x0001, 0x2345])))
    });
}

criterion_group!(benches, bench_plan, bench_decode);
criterion_main!(benches);
