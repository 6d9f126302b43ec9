//! polars glue: build frames from our rows, bring results back as `Table`s.

use polars::prelude::*;

use super::table::{Col, Table};
use super::AnalyticsError;

impl From<PolarsError> for AnalyticsError {
    fn from(e: PolarsError) -> Self {
        AnalyticsError::Invalid(format!("polars: {e}"))
    }
}

/// Converts a polars frame; integer columns named in `scaled` are energy in
/// units of 10^-scale and become exact decimals.
pub fn to_table(df: &DataFrame, scaled: &[&str], scale: u8) -> Result<Table, AnalyticsError> {
    let mut t = Table::new();
    for c in df.columns() {
        let s = c.as_materialized_series();
        let name = s.name().to_string();
        let col = match s.dtype() {
            DataType::String => Col::Str(s.str()?.iter().map(|o| o.map(str::to_string)).collect()),
            DataType::Float64 | DataType::Float32 => {
                Col::Ratio(s.cast(&DataType::Float64)?.f64()?.iter().collect())
            }
            DataType::Boolean => Col::Bool(s.bool()?.iter().collect()),
            _ => {
                let v: Vec<Option<i64>> = s.cast(&DataType::Int64)?.i64()?.iter().collect();
                if scaled.contains(&name.as_str()) {
                    Col::Dec(v.into_iter().map(|o| o.map(i128::from)).collect(), scale)
                } else {
                    Col::Int(v)
                }
            }
        };
        t.columns.push((name, col));
    }
    Ok(t)
}
