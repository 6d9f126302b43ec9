//! A small typed table: what every analytics dataset is before it becomes
//! Parquet, and what the report and queries render. Energy and money are
//! scaled integers with a declared scale (written as Parquet DECIMAL), never
//! floats; floats are only for ratios, shares and scores.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, Date32Array, Decimal128Array, Float64Array, Int64Array,
    RecordBatch, StringArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use chrono::NaiveDate;
use rust_decimal::Decimal;

use super::AnalyticsError;

#[derive(Debug, Clone, PartialEq)]
pub enum Col {
    Str(Vec<Option<String>>),
    Int(Vec<Option<i64>>),
    /// Exact decimal as a scaled integer: value = raw / 10^scale.
    Dec(Vec<Option<i128>>, u8),
    Ratio(Vec<Option<f64>>),
    Bool(Vec<Option<bool>>),
    Date(Vec<Option<NaiveDate>>),
}

impl Col {
    pub fn len(&self) -> usize {
        match self {
            Col::Str(v) => v.len(),
            Col::Int(v) => v.len(),
            Col::Dec(v, _) => v.len(),
            Col::Ratio(v) => v.len(),
            Col::Bool(v) => v.len(),
            Col::Date(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Cell `i` as display text ("" for null).
    pub fn text(&self, i: usize) -> String {
        match self {
            Col::Str(v) => v[i].clone().unwrap_or_default(),
            Col::Int(v) => v[i].map(|x| x.to_string()).unwrap_or_default(),
            Col::Dec(v, s) => v[i]
                .map(|x| Decimal::from_i128_with_scale(x, *s as u32).to_string())
                .unwrap_or_default(),
            Col::Ratio(v) => v[i].map(|x| format!("{x:.3}")).unwrap_or_default(),
            Col::Bool(v) => v[i].map(|x| x.to_string()).unwrap_or_default(),
            Col::Date(v) => v[i].map(|x| x.to_string()).unwrap_or_default(),
        }
    }
    /// Cell `i` as JSON (decimals as strings, exact).
    pub fn json(&self, i: usize) -> serde_json::Value {
        use serde_json::Value;
        match self {
            Col::Str(v) => v[i].clone().map_or(Value::Null, Value::String),
            Col::Int(v) => v[i].map_or(Value::Null, |x| x.into()),
            Col::Dec(v, s) => v[i].map_or(Value::Null, |x| {
                Value::String(Decimal::from_i128_with_scale(x, *s as u32).to_string())
            }),
            Col::Ratio(v) => v[i]
                .and_then(serde_json::Number::from_f64)
                .map_or(Value::Null, Value::Number),
            Col::Bool(v) => v[i].map_or(Value::Null, Value::Bool),
            Col::Date(v) => v[i].map_or(Value::Null, |d| Value::String(d.to_string())),
        }
    }
    fn data_type(&self) -> DataType {
        match self {
            Col::Str(_) => DataType::Utf8,
            Col::Int(_) => DataType::Int64,
            Col::Dec(_, s) => DataType::Decimal128(18, *s as i8),
            Col::Ratio(_) => DataType::Float64,
            Col::Bool(_) => DataType::Boolean,
            Col::Date(_) => DataType::Date32,
        }
    }
    fn to_arrow(&self) -> ArrayRef {
        match self {
            Col::Str(v) => Arc::new(StringArray::from(v.clone())),
            Col::Int(v) => Arc::new(Int64Array::from(v.clone())),
            Col::Dec(v, s) => Arc::new(
                Decimal128Array::from(v.clone())
                    .with_precision_and_scale(18, *s as i8)
                    .expect("precision 18 holds the scale"),
            ),
            Col::Ratio(v) => Arc::new(Float64Array::from(v.clone())),
            Col::Bool(v) => Arc::new(BooleanArray::from(v.clone())),
            Col::Date(v) => Arc::new(Date32Array::from(
                v.iter().map(|d| d.map(date32)).collect::<Vec<_>>(),
            )),
        }
    }
}

fn epoch() -> NaiveDate {
    NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid date")
}

fn date32(d: NaiveDate) -> i32 {
    (d - epoch()).num_days() as i32
}

/// Named columns of equal length.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    pub columns: Vec<(String, Col)>,
}

impl Table {
    pub fn new() -> Table {
        Table::default()
    }
    pub fn with(mut self, name: &str, col: Col) -> Table {
        self.columns.push((name.to_string(), col));
        self
    }
    pub fn rows(&self) -> usize {
        self.columns.first().map_or(0, |(_, c)| c.len())
    }
    pub fn col(&self, name: &str) -> Option<&Col> {
        self.columns.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }
    pub fn schema(&self) -> SchemaRef {
        Arc::new(Schema::new(
            self.columns
                .iter()
                .map(|(n, c)| Field::new(n, c.data_type(), true))
                .collect::<Vec<_>>(),
        ))
    }
    pub fn to_batch(&self) -> Result<RecordBatch, AnalyticsError> {
        let arrays: Vec<ArrayRef> = self.columns.iter().map(|(_, c)| c.to_arrow()).collect();
        RecordBatch::try_new(self.schema(), arrays)
            .map_err(|e| AnalyticsError::Invalid(format!("building a batch: {e}")))
    }
    /// Writes the table as one zstd Parquet file, atomically.
    pub fn write_parquet(&self, path: &Path) -> Result<u64, AnalyticsError> {
        let batch = self.to_batch()?;
        Ok(crate::store::atomic::write_parquet_atomic(
            path,
            self.schema(),
            &[batch],
        )?)
    }
    /// Reads any Parquet file whose columns are of the types above (other
    /// types are rendered as text).
    pub fn read_parquet(path: &Path) -> Result<Table, AnalyticsError> {
        Self::from_batches(crate::store::reader::read_file(path)?)
    }

    /// Only `columns` (those the file has) of a Parquet file.
    pub fn read_parquet_columns(path: &Path, columns: &[&str]) -> Result<Table, AnalyticsError> {
        Self::from_batches(crate::store::reader::read_file_columns(
            path,
            Some(columns),
        )?)
    }

    fn from_batches(
        batches: Vec<arrow::record_batch::RecordBatch>,
    ) -> Result<Table, AnalyticsError> {
        let mut t = Table::new();
        let Some(first) = batches.first() else {
            return Ok(t);
        };
        for (ci, f) in first.schema().fields().iter().enumerate() {
            let mut col = match f.data_type() {
                DataType::Int64 | DataType::Int32 => Col::Int(Vec::new()),
                DataType::Decimal128(_, s) if *s >= 0 => Col::Dec(Vec::new(), *s as u8),
                DataType::Float64 => Col::Ratio(Vec::new()),
                DataType::Boolean => Col::Bool(Vec::new()),
                DataType::Date32 => Col::Date(Vec::new()),
                _ => Col::Str(Vec::new()),
            };
            for b in &batches {
                append(&mut col, b.column(ci).as_ref());
            }
            t.columns.push((f.name().clone(), col));
        }
        Ok(t)
    }
    /// Rows as JSON objects.
    pub fn to_json(&self) -> serde_json::Value {
        let rows: Vec<serde_json::Value> = (0..self.rows())
            .map(|i| {
                serde_json::Value::Object(
                    self.columns
                        .iter()
                        .map(|(n, c)| (n.clone(), c.json(i)))
                        .collect(),
                )
            })
            .collect();
        serde_json::Value::Array(rows)
    }
    /// A plain text table with aligned columns.
    pub fn to_text(&self) -> String {
        let mut widths: Vec<usize> = self
            .columns
            .iter()
            .map(|(n, _)| n.chars().count())
            .collect();
        let cells: Vec<Vec<String>> = (0..self.rows())
            .map(|i| self.columns.iter().map(|(_, c)| c.text(i)).collect())
            .collect();
        for r in &cells {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |vals: Vec<String>| -> String {
            vals.iter()
                .zip(&widths)
                .map(|(v, w)| format!("{v}{}", " ".repeat(w - v.chars().count())))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        };
        let mut out = line(self.columns.iter().map(|(n, _)| n.clone()).collect());
        out.push('\n');
        for r in cells {
            out.push_str(&line(r));
            out.push('\n');
        }
        out
    }
    /// Keeps rows where `keep(i)`.
    pub fn filter(&self, keep: impl Fn(usize) -> bool) -> Table {
        let idx: Vec<usize> = (0..self.rows()).filter(|i| keep(*i)).collect();
        self.take(&idx)
    }
    /// The rows at `idx`, in that order.
    pub fn take(&self, idx: &[usize]) -> Table {
        fn pick<T: Clone>(v: &[T], idx: &[usize]) -> Vec<T> {
            idx.iter().map(|i| v[*i].clone()).collect()
        }
        Table {
            columns: self
                .columns
                .iter()
                .map(|(n, c)| {
                    let c = match c {
                        Col::Str(v) => Col::Str(pick(v, idx)),
                        Col::Int(v) => Col::Int(pick(v, idx)),
                        Col::Dec(v, s) => Col::Dec(pick(v, idx), *s),
                        Col::Ratio(v) => Col::Ratio(pick(v, idx)),
                        Col::Bool(v) => Col::Bool(pick(v, idx)),
                        Col::Date(v) => Col::Date(pick(v, idx)),
                    };
                    (n.clone(), c)
                })
                .collect(),
        }
    }
}

fn append(col: &mut Col, a: &dyn Array) {
    use arrow::array::{AsArray, Int32Array};
    let any = a.as_any();
    match col {
        Col::Int(v) => {
            if let Some(x) = any.downcast_ref::<Int64Array>() {
                v.extend(x.iter());
            } else if let Some(x) = any.downcast_ref::<Int32Array>() {
                v.extend(x.iter().map(|o| o.map(i64::from)));
            }
        }
        Col::Dec(v, _) => v.extend(a.as_primitive::<arrow::datatypes::Decimal128Type>().iter()),
        Col::Ratio(v) => v.extend(a.as_primitive::<arrow::datatypes::Float64Type>().iter()),
        Col::Bool(v) => v.extend(a.as_boolean().iter()),
        Col::Date(v) => v.extend(
            a.as_primitive::<arrow::datatypes::Date32Type>()
                .iter()
                .map(|o| o.map(|d| epoch() + chrono::Duration::days(d as i64))),
        ),
        Col::Str(v) => {
            if let Some(x) = any.downcast_ref::<StringArray>() {
                v.extend(x.iter().map(|o| o.map(str::to_string)));
            } else {
                let opts = arrow::util::display::FormatOptions::default();
                match arrow::util::display::ArrayFormatter::try_new(a, &opts) {
                    Ok(f) => v.extend((0..a.len()).map(|i| {
                        if a.is_null(i) {
                            None
                        } else {
                            Some(f.value(i).to_string())
                        }
                    })),
                    Err(_) => v.extend((0..a.len()).map(|_| None)),
                }
            }
        }
    }
}

/// Every cell of every column of a Parquet file as text, for privacy scans.
pub fn parquet_cells_as_text(path: &Path) -> Result<Vec<(String, String)>, AnalyticsError> {
    let t = Table::read_parquet(path)?;
    let mut out = Vec::new();
    for (n, c) in &t.columns {
        for i in 0..c.len() {
            out.push((n.clone(), c.text(i)));
        }
    }
    Ok(out)
}
