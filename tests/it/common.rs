//! Helpers shared by integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use meterflow::model::{Channel, Protocol, Quality, Reading, Source};
use rust_decimal::Decimal;

/// Path of the built `meterflow` binary.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_meterflow"))
}

/// The Python venv with duckdb, pyarrow and polars (made by scripts/venv.sh).
pub fn python() -> PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let py = root.join(".venv/bin/python");
    assert!(
        py.exists(),
        "missing {}: run scripts/venv.sh (scripts/test.sh does it)",
        py.display()
    );
    py
}

/// The stdout of a finished command, after asserting that it succeeded
/// (else the panic shows `what`, its stdout and its stderr).
pub fn stdout_of(out: &std::process::Output, what: impl std::fmt::Display) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
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
