//! Decoder throughput per payload format (readings decoded per second).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use meterflow::ingest::config::{Format, IngestConfig};
use meterflow::ingest::decode::{encode_canonical, Decoder, Limits};
use meterflow::model::{now_ms, Channel, Protocol, Quality, Reading, Source};
use meterflow::protocol::sparkplug::{self, datatype, Metric, MetricValue, Payload};
use rust_decimal::Decimal;

fn decoder(format: Format, extra: &str) -> Decoder {
    let text = format!(
        "[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\nclient_id = \"bench\"\n[[source]]\nname = \"s\"\nfilter = \"#\"\nformat = \"{}\"\nunmapped = \"ignore\"\n{extra}",
        match format {
            Format::Canonical => "canonical",
            Format::Values => "values",
            Format::Tasmota => "tasmota",
            Format::Shelly => "shelly",
            Format::Sparkplug => "sparkplug",
            Format::JsonMap => "json_map",
        }
    );
    let cfg = IngestConfig::parse(&text, std::path::Path::new("bench.toml")).unwrap();
    Decoder::new(&cfg.sources[0], Limits::default()).unwrap()
}

fn readings(n: usize, ts: i64) -> Vec<Reading> {
    (0..n)
        .map(|k| Reading {
            meter_id: format!("M{:06}", k % 1000),
            ts_ms: ts + (k / 1000) as i64 * 60_000,
            channel: Channel::ImportActiveTotal,
            value: Decimal::new(12_345_678 + k as i64, 3),
            quality: Quality::OK,
            source: Source {
                protocol: Protocol::Sim,
                collector: "c".into(),
                address: "a".into(),
            },
            received_ms: ts,
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let now = now_ms();
    let ts = now - 3_600_000;
    let mut g = c.benchmark_group("mqtt_decode");

    let batch = encode_canonical("sub", &readings(500, ts));
    let mut d = decoder(Format::Canonical, "");
    g.throughput(Throughput::Elements(500));
    g.bench_function("canonical_500_readings", |b| {
        b.iter(|| black_box(d.decode("t/x", black_box(&batch), now).unwrap()))
    });

    // One meter's message: a handful of readings (the common small payload).
    let small = encode_canonical("sub", &readings(4, ts));
    g.throughput(Throughput::Elements(4));
    g.bench_function("canonical_4_readings", |b| {
        b.iter(|| black_box(d.decode("t/x", black_box(&small), now).unwrap()))
    });

    let values = format!(
        r#"{{"timestamp":{ts},"node":"n7","group":"g","values":{{"EP":12345.678,"EQ":12.5,"P":1500,"UA":230.1,"UB":229.8,"UC":231.4,"IA":1.25,"IB":1.5}},"errors":{{}}}}"#
    );
    let mut d = decoder(
        Format::Values,
        r#"channels = { "EP" = "import_active_total", "EQ" = "import_reactive_total", "P" = { channel = "active_power_total", unit = "W" }, "UA" = "voltage_a", "UB" = "voltage_b", "UC" = "voltage_c", "IA" = "current_a", "IB" = "current_b" }"#,
    );
    g.throughput(Throughput::Elements(8));
    g.bench_function("gateway_values_8_tags", |b| {
        b.iter(|| {
            black_box(
                d.decode("gw/n7", black_box(values.as_bytes()), now)
                    .unwrap(),
            )
        })
    });

    let time = chrono::DateTime::from_timestamp(ts / 1000, 0)
        .unwrap()
        .format("%Y-%m-%dT%H:%M:%S");
    let tasmota = format!(
        r#"{{"Time":"{time}","SML":{{"Total_in":12345.6789,"Total_out":12.5,"Power_curr":350}}}}"#
    );
    let mut d = decoder(Format::Tasmota, "");
    g.throughput(Throughput::Elements(3));
    g.bench_function("tasmota_sml_3_values", |b| {
        b.iter(|| {
            black_box(
                d.decode("tele/m1/SENSOR", black_box(tasmota.as_bytes()), now)
                    .unwrap(),
            )
        })
    });

    let shelly = format!(
        r#"{{"src":"shellypro3em-1","method":"NotifyStatus","params":{{"ts":{}.25,"em:0":{{"id":0,"a_voltage":230.1,"b_voltage":231,"c_voltage":229.4,"a_current":1.2,"b_current":1.1,"c_current":0.9,"a_act_power":250.5,"b_act_power":200,"c_act_power":180,"total_act_power":630.5}},"emdata:0":{{"id":0,"total_act":123456.78,"total_act_ret":10}}}}}}"#,
        ts / 1000
    );
    let mut d = decoder(Format::Shelly, "");
    g.throughput(Throughput::Elements(12));
    g.bench_function("shelly_notify_status_12_values", |b| {
        b.iter(|| {
            black_box(
                d.decode("s/events/rpc", black_box(shelly.as_bytes()), now)
                    .unwrap(),
            )
        })
    });

    let map_payload = format!(
        r#"{{"rows":[{}]}}"#,
        (0..50)
            .map(|i| format!(
                r#"{{"dev":"D{i}","t":{},"m":{{"e":{}.5,"u":230.{i}}}}}"#,
                ts / 1000,
                1000 + i
            ))
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut d = decoder(
        Format::JsonMap,
        "channels = { \"e\" = { channel = \"import_active_total\", unit = \"Wh\" } }\n[source.map]\neach = \"/rows\"\nmeter_id = \"/dev\"\nts = \"/t\"\nvalues = { \"e\" = \"/m/e\", \"voltage_a\" = \"/m/u\" }\n",
    );
    g.throughput(Throughput::Elements(100));
    g.bench_function("json_map_50_records_100_values", |b| {
        b.iter(|| {
            black_box(
                d.decode("site/x", black_box(map_payload.as_bytes()), now)
                    .unwrap(),
            )
        })
    });

    // Sparkplug: DDATA by alias after one birth; seq advances each message.
    let mut d = decoder(Format::Sparkplug, "");
    let metric = |name: Option<&str>, alias: u64, v: f64| Metric {
        name: name.map(String::from),
        alias: Some(alias),
        datatype: Some(datatype::DOUBLE),
        value: Some(MetricValue::DoubleValue(v)),
        ..Default::default()
    };
    let payload = |seq: u64, metrics: Vec<Metric>| {
        sparkplug::encode_payload(&Payload {
            timestamp: Some(ts as u64),
            metrics,
            seq: Some(seq),
            uuid: None,
            body: None,
        })
    };
    d.decode("spBv1.0/g/NBIRTH/e", &payload(0, vec![]), now)
        .unwrap();
    let names = [
        "import_active_total",
        "export_active_total",
        "voltage_a",
        "voltage_b",
        "voltage_c",
        "current_a",
        "current_b",
        "current_c",
        "active_power_total",
        "frequency",
    ];
    let birth: Vec<Metric> = names
        .iter()
        .enumerate()
        .map(|(i, n)| metric(Some(n), i as u64, 1.0))
        .collect();
    d.decode("spBv1.0/g/DBIRTH/e/m1", &payload(1, birth), now)
        .unwrap();
    let data: Vec<Vec<u8>> = (0..256u64)
        .map(|s| {
            payload(
                s,
                (0..10)
                    .map(|i| metric(None, i, 100.25 + i as f64))
                    .collect(),
            )
        })
        .collect();
    let mut seq = 2usize;
    g.throughput(Throughput::Elements(10));
    g.bench_function("sparkplug_ddata_10_aliases", |b| {
        b.iter(|| {
            let p = &data[seq % 256];
            seq += 1;
            black_box(d.decode("spBv1.0/g/DDATA/e/m1", black_box(p), now).unwrap())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
