//! Columnar building and reading of the readings dataset.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, Decimal128Array, StringArray, StringBuilder, TimestampMillisecondArray,
};
use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use rust_decimal::Decimal;
use std::sync::OnceLock;

use super::dict::{dict_type, DictText};

use super::schema::{col, readings_schema, VALUE_PRECISION, VALUE_SCALE};
use super::StoreError;
use crate::model::{Channel, Protocol, Quality, Reading, Source};

const MAX_SCALED: i128 = 10i128.pow(VALUE_PRECISION as u32);

/// Converts a decimal to the lake's scaled integer (scale 4), refusing to
/// round: a value that needs more digits is an error, never silently changed.
pub fn to_scaled(value: Decimal) -> Result<i128, StoreError> {
    // Most values have 4 decimals or fewer as they come: no normalizing
    // (trailing zeros change the scale, not the scaled integer).
    if value.scale() <= VALUE_SCALE as u32 {
        let s = value.mantissa() * 10i128.pow(VALUE_SCALE as u32 - value.scale());
        return if s.abs() < MAX_SCALED {
            Ok(s)
        } else {
            Err(StoreError::ValueOutOfRange(value))
        };
    }
    let v = value.normalize();
    let scale = v.scale() as i8;
    let m = v.mantissa();
    let scaled = if scale <= VALUE_SCALE {
        m.checked_mul(10i128.pow((VALUE_SCALE - scale) as u32))
    } else {
        None
    };
    match scaled {
        Some(s) if s.abs() < MAX_SCALED => Ok(s),
        _ => Err(StoreError::ValueOutOfRange(value)),
    }
}

pub fn from_scaled(raw: i128) -> Decimal {
    Decimal::from_i128_with_scale(raw, VALUE_SCALE as u32)
}

/// The readings schema with its repeating text columns (channel, unit,
/// quality, source) as dictionary arrays: the lake writer encodes those from
/// their keys (`store::dict`); the files hold the plain readings schema.
pub fn segment_schema() -> SchemaRef {
    static S: OnceLock<SchemaRef> = OnceLock::new();
    S.get_or_init(|| {
        let plain = readings_schema();
        let fields: Vec<Field> = plain
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| match i {
                col::CHANNEL
                | col::UNIT
                | col::QUALITY
                | col::SOURCE_PROTOCOL
                | col::SOURCE_COLLECTOR
                | col::SOURCE_ADDRESS => Field::new(f.name(), dict_type(), false),
                _ => f.as_ref().clone(),
            })
            .collect();
        Arc::new(Schema::new(fields))
    })
    .clone()
}

/// One batch of `rows` in [`segment_schema`], and the rows whose value does
/// not fit the lake's decimal (left out, for quarantine).
pub fn segment_batch<'a>(rows: &[&'a Reading]) -> (RecordBatch, Vec<(&'a Reading, StoreError)>) {
    let n = rows.len();
    let mut bad = Vec::new();
    let mut kept = Vec::with_capacity(n);
    let mut value = Vec::with_capacity(n);
    for r in rows {
        match to_scaled(r.value) {
            Ok(v) => {
                kept.push(*r);
                value.push(v);
            }
            Err(e) => bad.push((*r, e)),
        }
    }
    let n = kept.len();
    let mut meter_id = StringBuilder::with_capacity(n, kept.iter().map(|r| r.meter_id.len()).sum());
    let mut channel = DictText::with_capacity(n);
    let mut unit = DictText::with_capacity(n);
    let mut quality = DictText::with_capacity(n);
    let mut protocol = DictText::with_capacity(n);
    let mut collector = DictText::with_capacity(n);
    let mut address = DictText::with_capacity(n);
    for r in &kept {
        meter_id.append_value(&r.meter_id);
        channel.push(r.channel.as_str());
        unit.push(r.channel.unit());
        quality.push_cow(&r.quality.text());
        protocol.push(r.source.protocol.as_str());
        collector.push(&r.source.collector);
        address.push(&r.source.address);
    }
    let ts = TimestampMillisecondArray::from_iter_values(kept.iter().map(|r| r.ts_ms))
        .with_timezone("UTC");
    let received = TimestampMillisecondArray::from_iter_values(kept.iter().map(|r| r.received_ms))
        .with_timezone("UTC");
    let value = Decimal128Array::from(value)
        .with_precision_and_scale(VALUE_PRECISION, VALUE_SCALE)
        .expect("valid decimal type");
    let cols: Vec<ArrayRef> = vec![
        Arc::new(meter_id.finish()),
        Arc::new(ts),
        channel.finish(),
        Arc::new(value),
        unit.finish(),
        quality.finish(),
        protocol.finish(),
        collector.finish(),
        address.finish(),
        Arc::new(received),
    ];
    let batch = RecordBatch::try_new(segment_schema(), cols).expect("columns match schema");
    (batch, bad)
}

/// Accumulates readings column by column and emits Arrow record batches.
pub struct ReadingsBuilder {
    meter_id: StringBuilder,
    ts: Vec<i64>,
    channel: StringBuilder,
    value: Vec<i128>,
    unit: StringBuilder,
    quality: StringBuilder,
    protocol: StringBuilder,
    collector: StringBuilder,
    address: StringBuilder,
    received: Vec<i64>,
}

impl ReadingsBuilder {
    pub fn with_capacity(rows: usize) -> Self {
        ReadingsBuilder {
            meter_id: StringBuilder::with_capacity(rows, rows * 12),
            ts: Vec::with_capacity(rows),
            channel: StringBuilder::with_capacity(rows, rows * 16),
            value: Vec::with_capacity(rows),
            unit: StringBuilder::with_capacity(rows, rows * 3),
            quality: StringBuilder::with_capacity(rows, rows * 2),
            protocol: StringBuilder::with_capacity(rows, rows * 3),
            collector: StringBuilder::with_capacity(rows, rows * 4),
            address: StringBuilder::with_capacity(rows, rows * 12),
            received: Vec::with_capacity(rows),
        }
    }

    pub fn len(&self) -> usize {
        self.ts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ts.is_empty()
    }

    pub fn push(&mut self, r: &Reading) -> Result<(), StoreError> {
        let scaled = to_scaled(r.value)?;
        let q = r.quality.text();
        self.push_scaled(
            &r.meter_id,
            r.ts_ms,
            r.channel,
            scaled,
            &q,
            r.source.protocol.as_str(),
            &r.source.collector,
            &r.source.address,
            r.received_ms,
        );
        Ok(())
    }

    /// Hot-path append for generators that already hold scaled values.
    #[allow(clippy::too_many_arguments)]
    pub fn push_scaled(
        &mut self,
        meter_id: &str,
        ts_ms: i64,
        channel: Channel,
        value_scaled: i128,
        quality: &str,
        protocol: &str,
        collector: &str,
        address: &str,
        received_ms: i64,
    ) {
        self.meter_id.append_value(meter_id);
        self.ts.push(ts_ms);
        self.channel.append_value(channel.as_str());
        self.value.push(value_scaled);
        self.unit.append_value(channel.unit());
        self.quality.append_value(quality);
        self.protocol.append_value(protocol);
        self.collector.append_value(collector);
        self.address.append_value(address);
        self.received.push(received_ms);
    }

    pub fn finish(&mut self) -> RecordBatch {
        let ts = TimestampMillisecondArray::from(std::mem::take(&mut self.ts)).with_timezone("UTC");
        let received = TimestampMillisecondArray::from(std::mem::take(&mut self.received))
            .with_timezone("UTC");
        let value = Decimal128Array::from(std::mem::take(&mut self.value))
            .with_precision_and_scale(VALUE_PRECISION, VALUE_SCALE)
            .expect("valid decimal type");
        let cols: Vec<ArrayRef> = vec![
            Arc::new(self.meter_id.finish()),
            Arc::new(ts),
            Arc::new(self.channel.finish()),
            Arc::new(value),
            Arc::new(self.unit.finish()),
            Arc::new(self.quality.finish()),
            Arc::new(self.protocol.finish()),
            Arc::new(self.collector.finish()),
            Arc::new(self.address.finish()),
            Arc::new(received),
        ];
        RecordBatch::try_new(readings_schema(), cols).expect("columns match schema")
    }
}

/// Typed views of a readings record batch's columns.
pub struct ReadingsView<'a> {
    pub meter_id: &'a StringArray,
    pub ts: &'a TimestampMillisecondArray,
    pub channel: &'a StringArray,
    pub value: &'a Decimal128Array,
    pub quality: &'a StringArray,
    pub protocol: &'a StringArray,
    pub collector: &'a StringArray,
    pub address: &'a StringArray,
    pub received: &'a TimestampMillisecondArray,
}

fn column<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> Result<&'a T, StoreError> {
    b.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| StoreError::Schema(format!("column '{name}' missing or of the wrong type")))
}

impl<'a> ReadingsView<'a> {
    pub fn new(b: &'a RecordBatch) -> Result<Self, StoreError> {
        let value: &Decimal128Array = column(b, "value")?;
        if value.scale() != VALUE_SCALE {
            return Err(StoreError::Schema(format!(
                "value has scale {}, expected {VALUE_SCALE}",
                value.scale()
            )));
        }
        Ok(ReadingsView {
            meter_id: column(b, "meter_id")?,
            ts: column(b, "ts")?,
            channel: column(b, "channel")?,
            value,
            quality: column(b, "quality")?,
            protocol: column(b, "source_protocol")?,
            collector: column(b, "source_collector")?,
            address: column(b, "source_address")?,
            received: column(b, "received_at")?,
        })
    }

    pub fn len(&self) -> usize {
        self.ts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ts.is_empty()
    }

    /// Row `i` as an owned reading; rows with unknown channels or flags are errors.
    pub fn reading(&self, i: usize) -> Result<Reading, StoreError> {
        let channel: Channel = self
            .channel
            .value(i)
            .parse()
            .map_err(|e: crate::model::UnknownChannel| StoreError::Schema(e.to_string()))?;
        let quality = Quality::parse(self.quality.value(i)).map_err(StoreError::Schema)?;
        let protocol = Protocol::parse(self.protocol.value(i)).ok_or_else(|| {
            StoreError::Schema(format!(
                "unknown source protocol '{}'",
                self.protocol.value(i)
            ))
        })?;
        Ok(Reading {
            meter_id: self.meter_id.value(i).to_string(),
            ts_ms: self.ts.value(i),
            channel,
            value: from_scaled(self.value.value(i)),
            quality,
            source: Source {
                protocol,
                collector: self.collector.value(i).into(),
                address: self.address.value(i).into(),
            },
            received_ms: self.received.value(i),
        })
    }
}

/// Column index sanity: keeps `schema::col` in step with the schema.
pub fn check_column_indexes() -> bool {
    let s = readings_schema();
    s.field(col::METER_ID).name() == "meter_id"
        && s.field(col::TS).name() == "ts"
        && s.field(col::CHANNEL).name() == "channel"
        && s.field(col::VALUE).name() == "value"
        && s.field(col::UNIT).name() == "unit"
        && s.field(col::QUALITY).name() == "quality"
        && s.field(col::SOURCE_PROTOCOL).name() == "source_protocol"
        && s.field(col::SOURCE_COLLECTOR).name() == "source_collector"
        && s.field(col::SOURCE_ADDRESS).name() == "source_address"
        && s.field(col::RECEIVED_AT).name() == "received_at"
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn scaled_values_are_exact_or_refused() {
        assert_eq!(to_scaled(dec!(123.45)).unwrap(), 1_234_500);
        assert_eq!(to_scaled(dec!(-0.0001)).unwrap(), -1);
        assert_eq!(to_scaled(dec!(1.23450000)).unwrap(), 12_345);
        assert!(to_scaled(dec!(0.00001)).is_err());
        assert!(to_scaled(dec!(100000000000000)).is_err());
        assert_eq!(from_scaled(1_234_500), dec!(123.45));
    }

    #[test]
    fn column_indexes_match_schema() {
        assert!(check_column_indexes());
    }
}
