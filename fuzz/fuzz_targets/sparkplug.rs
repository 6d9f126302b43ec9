//! Sparkplug B: arbitrary protobuf bytes, and sequences of messages through
//! the state machine, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meterflow::protocol::sparkplug::{decode_payload, State, Topic};

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
});
