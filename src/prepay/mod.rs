//! Prepayment (fee control): payment-file import, deduction runs (batch over
//! the lake and streaming from MQTT), thresholds and alerts, remote fee
//! control rules. The money lives in [`crate::ledger`]. Docs: docs/prepay.md.

pub mod alerts;
pub mod control;
pub mod deduct;
pub mod demo;
pub mod fleet;
pub mod interval;
pub mod opening;
pub mod payments;
pub mod pricing;
pub mod run;
pub mod sinks;
pub mod stream;

use crate::ledger::LedgerError;

#[derive(Debug, thiserror::Error)]
pub enum PrepayError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("{0}")]
    Price(#[from] pricing::PriceError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{file}:{line}: {field}: {message}")]
    Config {
        file: String,
        line: usize,
        field: String,
        message: String,
    },
    #[error("{0}")]
    Input(String),
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("mqtt: {0}")]
    Mqtt(String),
}

impl PrepayError {
    pub fn io(path: &std::path::Path, e: impl std::fmt::Display) -> PrepayError {
        PrepayError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }
}

/// 1-based line of a byte offset (for config errors from toml spans).
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1
}
