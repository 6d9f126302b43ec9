//! Helpers shared by integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use meterflow::model::{Channel, Protocol, Quality, Reading, Source};
use rust_decimal::Decimal;

/// Path of the built `meterflow` binary.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_meterflow"))
}

/// A good simulated reading of `meter`, received when taken.
pub fn reading(meter: &str, ts: i64, channel: Channel, value: Decimal) -> Reading {
    Reading {
        meter_id: meter.into(),
        ts_ms: ts,
        channel,
        value,
        quality: Quality::OK,
        source: Source {
            protocol: Protocol::Sim,
            collector: "sim".into(),
            address: meter.into(),
        },
        received_ms: ts,
    }
}
