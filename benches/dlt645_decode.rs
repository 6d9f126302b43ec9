//! DL/T 645 decoder throughput on typical replies (target: >= 10 million frames/s per core).
//!
//! `cargo bench --bench dlt645_decode`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use meterflow::protocol::dlt645::frame::parse_hex;
use meterflow::protocol::dlt645::message::{classify, decode_read_value, read_request};
use meterflow::protocol::dlt645::{decode, lookup, Address, Decoded, Di};

/// The verified reply (forward active total, 0.04 kWh) with the usual FE preamble.
const REPLY: &str = "FE FE FE FE 68 37 03 00 92 81 39 68 91 08 33 33 34 33 37 33 33 33 8C 16";

fn bench(c: &mut Criterion) {
    let wire = parse_hex(REPLY).unwrap();
    let di = Di::v2007(0x0001_0000);
    let format = lookup(di).unwrap().format;
    let req = read_request("398192000337".parse::<Address>().unwrap(), di);

    let mut g = c.benchmark_group("dlt645");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_frame", |b| {
        b.iter(|| match decode(black_box(&wire)) {
            Decoded::Frame {
                frame, consumed, ..
            } => (frame.control, consumed),
            _ => unreachable!(),
        })
    });
    g.bench_function("decode_match_and_value", |b| {
        b.iter(|| {
            let Decoded::Frame { frame, .. } = decode(black_box(&wire)) else {
                unreachable!()
            };
            let m = classify(&req, &frame);
            (m, decode_read_value(&frame, di, format).unwrap())
        })
    });
    // 64 replies back to back in one buffer, as a busy gateway would deliver them.
    let many: Vec<u8> = (0..64).flat_map(|_| wire.iter().copied()).collect();
    g.throughput(Throughput::Elements(64));
    g.bench_function("decode_stream_64", |b| {
        b.iter(|| {
            let mut rest = black_box(&many[..]);
            let mut n = 0;
            while let Decoded::Frame { consumed, .. } = decode(rest) {
                rest = &rest[consumed..];
                n += 1;
            }
            n
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
