//! Fuzzes the DL/T 645 decoder the way the collector drives it: decode a
//! stream, consume what it says, match every frame against a request, decode
//! values with every catalogue format, and feed follow-up assembly.
//!
//! cargo +nightly fuzz run dlt645_decode -- -max_total_time=600
#![no_main]

// The codec's own sources, compiled here without the rest of meterflow.
#[allow(dead_code, unused_imports)]
#[path = "../../src/protocol/dlt645/mod.rs"]
mod dlt645;
#[allow(dead_code, unused_imports)]
#[path = "../../src/model/mod.rs"]
mod model;

use dlt645::catalogue::CATALOGUE;
use dlt645::message::{classify, read_request, FollowUp, Payload};
use dlt645::{decode, Address, Decoded, Di};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let req = read_request(
        Address([0x37, 0x03, 0x00, 0x92, 0x81, 0x39]),
        Di::v2007(0x0001_0000),
    );
    let mut rest = data;
    let mut follow: Option<FollowUp> = None;
    for _ in 0..1024 {
        match decode(rest) {
            Decoded::Frame {
                frame,
                consumed,
                skipped,
                ..
            } => {
                assert!(skipped < consumed && consumed <= rest.len());
                let _ = classify(&req, &frame);
                let owned = frame.to_frame();
                assert_eq!(owned.encode(0).unwrap().len(), consumed - skipped);
                for info in CATALOGUE {
                    let p = Payload::of_read_reply(&frame, info.di);
                    let _ = info.format.decode(p.as_slice());
                }
                match &mut follow {
                    None => {
                        follow = Some(FollowUp::start(
                            owned.address,
                            Di::v2007(0x0001_FF00),
                            &owned,
                        ))
                    }
                    Some(f) => {
                        let _ = f.push(&owned);
                        let _ = f.next_request();
                    }
                }
                rest = &rest[consumed..];
            }
            Decoded::Invalid {
                consumed, bytes, ..
            } => {
                assert!(consumed > 0 && consumed <= rest.len() && !bytes.is_empty());
                rest = &rest[consumed..];
            }
            Decoded::Incomplete { skipped, .. } => {
                assert!(skipped <= rest.len());
                break;
            }
        }
    }
});
