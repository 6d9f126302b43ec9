//! Sparkplug B: arbitrary protobuf bytes, and sequences of messages through
//! the ingest state machine, never panic; and the uplink's encoder round-trips
//! arbitrary lake values exactly through that state machine.
//!
//! cargo +nightly fuzz run sparkplug -- -max_total_time=600
#![no_main]

#[allow(dead_code, unused_imports)]
#[path = "../../src/model/mod.rs"]
mod model;
#[allow(dead_code, unused_imports)]
#[path = "../../src/protocol"]
mod protocol {
    pub mod sparkplug;
}
#[allow(dead_code, unused_imports)]
#[path = "../../src/uplink"]
mod uplink {
    pub mod sparkplug;
}
/// Shim: the lake's decimal scale.
mod store {
    pub mod schema {
        pub const VALUE_SCALE: i8 = 4;
    }
}

use libfuzzer_sys::fuzz_target;
use model::{Channel, Protocol, Quality, Reading, Source};
use protocol::sparkplug::{decode_payload, State, Topic, Value};
use rust_decimal::Decimal;

const TOPICS: [&str; 7] = [
    "spBv1.0/g/NBIRTH/e",
    "spBv1.0/g/NDATA/e",
    "spBv1.0/g/NDEATH/e",
    "spBv1.0/g/DBIRTH/e/d",
    "spBv1.0/g/DDATA/e/d",
    "spBv1.0/g/DDEATH/e/d",
    "spBv1.0/g/DDATA/e/other",
];

fuzz_target!(|data: &[u8]| {
    // First byte of each chunk picks the topic; chunks are split on 0xff.
    let mut state = State::new();
    for chunk in data.split(|b| *b == 0xff) {
        let Some((&t, rest)) = chunk.split_first() else {
            continue;
        };
        let topic = Topic::parse(TOPICS[t as usize % TOPICS.len()]).unwrap();
        if let Ok(p) = decode_payload(rest) {
            let _ = state.handle(&topic, &p);
        }
    }
    let _ = Topic::parse(&String::from_utf8_lossy(data));

    // Uplink round trip: 9-byte records -> (mantissa, scale 0..=4) values.
    let readings: Vec<Reading> = data
        .chunks_exact(9)
        .enumerate()
        .map(|(i, c)| {
            let m = i64::from_le_bytes(c[..8].try_into().unwrap()) % 1_000_000_000_000_000_000;
            Reading {
                meter_id: format!("m{}", c[8] % 3),
                ts_ms: 1_700_000_000_000 + i as i64,
                channel: if c[8] & 4 == 0 {
                    Channel::ImportActiveTotal
                } else {
                    Channel::ActivePowerTotal
                },
                value: Decimal::new(m, u32::from(c[8] >> 5) % 5),
                quality: Quality::OK,
                source: Source {
                    protocol: Protocol::Sim,
                    collector: "f".into(),
                    address: "a".into(),
                },
                received_ms: 0,
            }
        })
        .collect();
    let mut node = uplink::sparkplug::EdgeNode::new("g", "e", 0);
    let mut st = State::new();
    let mut got = Vec::new();
    for m in node.births(0).into_iter().chain(node.data(&readings, 0)) {
        let o = st.handle(
            &Topic::parse(&m.topic).unwrap(),
            &decode_payload(&m.payload).unwrap(),
        );
        assert!(!o.rebirth_needed && o.problems.is_empty(), "{o:?}");
        got.extend(o.values.into_iter().filter(|v| v.value != Value::Null));
    }
    assert_eq!(got.len(), readings.len());
    for v in got {
        let want = readings
            .iter()
            .find(|r| {
                Some(r.meter_id.as_str()) == v.device.as_deref()
                    && Some(r.ts_ms) == v.ts_ms
                    && r.channel.as_str() == v.name
            })
            .expect("every value maps back to its reading");
        assert_eq!(v.value, Value::Number(want.value));
    }
});
