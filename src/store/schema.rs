//! Arrow/Parquet schemas of the lake's datasets. Documented in docs/data-model.md.

use std::sync::{Arc, OnceLock};

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

/// Decimal precision and scale of `readings.value`: 14 integer digits, 4 fraction digits.
pub const VALUE_PRECISION: u8 = 18;
pub const VALUE_SCALE: i8 = 4;

pub const READINGS: &str = "readings";
pub const QUARANTINE: &str = "quarantine";
pub const CONFLICTS: &str = "conflicts";

pub fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

pub fn value_type() -> DataType {
    DataType::Decimal128(VALUE_PRECISION, VALUE_SCALE)
}

/// Column order of the readings dataset.
pub mod col {
    pub const METER_ID: usize = 0;
    pub const TS: usize = 1;
    pub const CHANNEL: usize = 2;
    pub const VALUE: usize = 3;
    pub const UNIT: usize = 4;
    pub const QUALITY: usize = 5;
    pub const SOURCE_PROTOCOL: usize = 6;
    pub const SOURCE_COLLECTOR: usize = 7;
    pub const SOURCE_ADDRESS: usize = 8;
    pub const RECEIVED_AT: usize = 9;
}

pub fn readings_schema() -> SchemaRef {
    static S: OnceLock<SchemaRef> = OnceLock::new();
    S.get_or_init(|| {
        Arc::new(Schema::new(vec![
            Field::new("meter_id", DataType::Utf8, false),
            Field::new("ts", ts_type(), false),
            Field::new("channel", DataType::Utf8, false),
            Field::new("value", value_type(), false),
            Field::new("unit", DataType::Utf8, false),
            Field::new("quality", DataType::Utf8, false),
            Field::new("source_protocol", DataType::Utf8, false),
            Field::new("source_collector", DataType::Utf8, false),
            Field::new("source_address", DataType::Utf8, false),
            Field::new("received_at", ts_type(), false),
        ]))
    })
    .clone()
}

pub fn quarantine_schema() -> SchemaRef {
    static S: OnceLock<SchemaRef> = OnceLock::new();
    S.get_or_init(|| {
        Arc::new(Schema::new(vec![
            Field::new("received_at", ts_type(), false),
            Field::new("source_protocol", DataType::Utf8, false),
            Field::new("source_collector", DataType::Utf8, false),
            Field::new("source_address", DataType::Utf8, false),
            Field::new("reason", DataType::Utf8, false),
            Field::new("payload", DataType::Binary, false),
        ]))
    })
    .clone()
}

pub fn conflicts_schema() -> SchemaRef {
    static S: OnceLock<SchemaRef> = OnceLock::new();
    S.get_or_init(|| {
        Arc::new(Schema::new(vec![
            Field::new("meter_id", DataType::Utf8, false),
            Field::new("ts", ts_type(), false),
            Field::new("channel", DataType::Utf8, false),
            Field::new("value_kept_first", value_type(), false),
            Field::new("value_other", value_type(), false),
            Field::new("source_first", DataType::Utf8, false),
            Field::new("source_other", DataType::Utf8, false),
            Field::new("received_at_first", ts_type(), false),
            Field::new("received_at_other", ts_type(), false),
        ]))
    })
    .clone()
}
