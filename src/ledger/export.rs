//! Parquet export of ledger entries for data teams (one file, written atomically).

use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, Decimal128Builder, Int64Array, StringArray, TimestampMillisecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use rust_decimal::Decimal;

use super::{Entry, Ledger, LedgerError};

pub const AMOUNT_PRECISION: u8 = 20;
pub const AMOUNT_SCALE: i8 = 4;

pub fn entries_schema() -> SchemaRef {
    let ts = || DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("seq", DataType::Int64, false),
        Field::new("key", DataType::Utf8, false),
        Field::new("account_id", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new(
            "amount",
            DataType::Decimal128(AMOUNT_PRECISION, AMOUNT_SCALE),
            false,
        ),
        Field::new("ts", ts(), false),
        Field::new("source", DataType::Utf8, false),
        Field::new("detail", DataType::Utf8, false),
        Field::new("recorded_at", ts(), false),
    ]))
}

/// Exact Decimal128(_, 4) mantissa, or an error when the amount has more decimals.
pub fn to_scaled(x: Decimal) -> Result<i128, LedgerError> {
    let mut y = x;
    y.rescale(AMOUNT_SCALE as u32);
    if y != x {
        return Err(LedgerError::Corrupt(format!(
            "amount {x} has more than 4 decimals"
        )));
    }
    Ok(y.mantissa())
}

pub fn entries_batch(entries: &[Entry]) -> Result<RecordBatch, LedgerError> {
    let mut amount = Decimal128Builder::with_capacity(entries.len());
    for e in entries {
        amount.append_value(to_scaled(e.entry.amount)?);
    }
    let amount = amount
        .finish()
        .with_precision_and_scale(AMOUNT_PRECISION, AMOUNT_SCALE)
        .map_err(|e| LedgerError::Corrupt(e.to_string()))?;
    let s = |f: &dyn Fn(&Entry) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(entries.iter().map(f)))
    };
    let cols: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(entries.iter().map(|e| e.seq))),
        s(&|e| e.entry.key.as_str()),
        s(&|e| e.entry.account_id.as_str()),
        s(&|e| e.entry.kind.as_str()),
        Arc::new(amount),
        Arc::new(
            TimestampMillisecondArray::from_iter_values(entries.iter().map(|e| e.entry.ts_ms))
                .with_timezone("UTC"),
        ),
        s(&|e| e.entry.source.as_str()),
        s(&|e| e.entry.detail.as_str()),
        Arc::new(
            TimestampMillisecondArray::from_iter_values(entries.iter().map(|e| e.recorded_ms))
                .with_timezone("UTC"),
        ),
    ];
    RecordBatch::try_new(entries_schema(), cols).map_err(|e| LedgerError::Corrupt(e.to_string()))
}

/// Writes every entry (in seq order) to `path` as one Parquet file. Returns the row count.
pub fn export_parquet(ledger: &mut dyn Ledger, path: &Path) -> Result<usize, LedgerError> {
    let mut batches = Vec::new();
    let mut after = 0;
    let mut rows = 0;
    loop {
        let chunk = ledger.entries(None, after, 100_000)?;
        let Some(last) = chunk.last() else { break };
        after = last.seq;
        rows += chunk.len();
        batches.push(entries_batch(&chunk)?);
    }
    crate::store::atomic::write_parquet_atomic(path, entries_schema(), &batches)
        .map_err(|e| LedgerError::Db(e.to_string()))?;
    Ok(rows)
}
