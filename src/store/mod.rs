//! The readings lake: Hive-partitioned Parquet (`<dataset>/date=YYYY-MM-DD/*.parquet`)
//! with atomic file commits and a crash-safe spool in front.

pub mod atomic;
mod chunk;
pub mod columns;
pub mod compact;
pub mod decimal;
pub mod dict;
pub mod encode;
pub mod idruns;
pub mod inspect;
mod lake;
pub mod reader;
pub mod scan;
pub mod schema;
pub mod spool;

use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use rust_decimal::Decimal;

pub use lake::{FlushStats, Lake, LakeOptions, Sealed};
pub use spool::QuarantineRecord;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a readable Parquet file: {message}")]
    Parquet { path: PathBuf, message: String },
    #[error("schema: {0}")]
    Schema(String),
    #[error("value {0} does not fit the lake's DECIMAL(18,4) exactly")]
    ValueOutOfRange(Decimal),
    #[error("{0}")]
    Config(String),
}

impl StoreError {
    pub fn io(path: &Path, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub fn parquet(path: &Path, e: impl std::fmt::Display) -> StoreError {
        StoreError::Parquet {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }
}

/// `<root>/<dataset>/date=YYYY-MM-DD`
pub fn partition_dir(root: &Path, dataset: &str, date: NaiveDate) -> PathBuf {
    root.join(dataset)
        .join(format!("date={}", date.format("%Y-%m-%d")))
}

/// The `i`-th synthetic reading of `meterflow store soak` (crash tests): unique
/// key (meter, channel, ts) per `i`, value derived from `i`.
pub fn soak_reading(i: usize) -> crate::model::Reading {
    use crate::model::{Channel, Protocol, Quality, Reading, Source};
    Reading {
        meter_id: format!("{:012}", i % 97),
        ts_ms: 1_790_000_000_000 + (i as i64) * 60_000,
        channel: Channel::ImportActiveTotal,
        value: Decimal::new(i as i64, 2),
        quality: Quality::OK,
        source: Source {
            protocol: Protocol::Sim,
            collector: "soak".into(),
            address: "mem".into(),
        },
        received_ms: 1_790_000_000_000,
    }
}
