//! Helpers shared by integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// Path of the built `meterflow` binary.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_meterflow"))
}
