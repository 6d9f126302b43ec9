//! Wide decimal columns written without arrow-rs's per-value conversion.
//!
//! arrow-rs stores a `Decimal128` of more than 18 digits as fixed-length
//! bytes, and to write one it allocates a buffer per value, hashes it into a
//! dictionary (which such columns overflow: quantities, kWh and sums are
//! nearly all distinct) and compares bytes for the statistics. For the bill
//! run's outputs (6 M `bill_lines.quantity` values at 1M meters) that was
//! about twice the cost of an 18-digit column. [`DecChunk`] keeps the
//! values as `i128` and writes PLAIN pages of their big-endian bytes,
//! compressed like the rest of the file, with the same statistics arrow-rs
//! writes (chunk min / max and null count; per page in the column index
//! when page statistics are on). Readers see an ordinary DECIMAL column.

use arrow::array::{Array, AsArray};
use arrow::datatypes::Decimal128Type;
use bytes::Bytes;
use parquet::basic::{Compression, Encoding, EncodingMask, PageType, Type};
use parquet::column::writer::ColumnCloseResult;
use parquet::data_type::FixedLenByteArray;
use parquet::errors::{ParquetError, Result};
use parquet::file::metadata::{ColumnChunkMetaData, ColumnIndexBuilder, PageEncodingStats};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::statistics::Statistics;
use parquet::schema::types::ColumnDescPtr;

use super::chunk::{self, Pages};
use super::dict::put_def_levels;

/// Whether [`DecChunk`] can write the column `descr`: a flat decimal stored
/// as fixed-length bytes (more than 18 digits in arrow-rs's mapping).
pub fn is_wide_decimal(descr: &ColumnDescPtr) -> bool {
    descr.physical_type() == Type::FIXED_LEN_BYTE_ARRAY
        && matches!(
            descr.logical_type_ref(),
            Some(parquet::basic::LogicalType::Decimal { .. })
        )
        && descr.max_rep_level() == 0
        && descr.max_def_level() <= 1
        && (1..=16).contains(&descr.type_length())
}

/// One column chunk of a wide decimal column.
pub struct DecChunk {
    descr: ColumnDescPtr,
    compression: Compression,
    statistics: EnabledStatistics,
    page_rows: usize,
    /// Bytes per value (the column's fixed length).
    width: usize,
    values: Vec<i128>,
    /// Per row, whether it holds a value (only for a nullable column).
    valid: Option<Vec<bool>>,
}

impl DecChunk {
    pub fn new(descr: ColumnDescPtr, props: &WriterProperties) -> Result<Self> {
        let path = descr.path();
        let compression = chunk::compression(&descr, props, "decimal")?;
        if !is_wide_decimal(&descr) {
            return Err(ParquetError::General(format!(
                "decimal column {path}: not a flat fixed-length decimal"
            )));
        }
        let width = descr.type_length() as usize;
        // Pages split by rows, and by size like arrow-rs (whichever is less).
        let page_rows = props
            .data_page_row_count_limit()
            .min(props.column_data_page_size_limit(path) / width)
            .max(1);
        Ok(DecChunk {
            statistics: props.statistics_enabled(path),
            compression,
            page_rows,
            width,
            valid: (descr.max_def_level() == 1).then(Vec::new),
            values: Vec::new(),
            descr,
        })
    }

    /// Appends the rows of a `Decimal128` array (nulls only in a nullable column).
    pub fn write(&mut self, array: &dyn Array) -> Result<()> {
        let Some(a) = array.as_primitive_opt::<Decimal128Type>() else {
            return Err(ParquetError::General(format!(
                "decimal column {}: expected Decimal128, got {}",
                self.descr.path(),
                array.data_type()
            )));
        };
        match (&mut self.valid, a.nulls()) {
            (None, Some(n)) if n.null_count() > 0 => {
                return Err(ParquetError::General(format!(
                    "decimal column {} is required but holds nulls",
                    self.descr.path()
                )))
            }
            (None, _) => self.values.extend_from_slice(a.values()),
            (Some(valid), None) => {
                valid.resize(valid.len() + a.len(), true);
                self.values.extend_from_slice(a.values());
            }
            (Some(valid), Some(nulls)) => {
                valid.extend(nulls.iter());
                self.values.extend(
                    a.values()
                        .iter()
                        .zip(nulls.iter())
                        .filter_map(|(v, ok)| ok.then_some(*v)),
                );
            }
        }
        Ok(())
    }

    fn rows(&self) -> usize {
        self.valid.as_ref().map_or(self.values.len(), Vec::len)
    }

    /// The column's bytes of `v`: the low `width` bytes, big-endian (what
    /// arrow-rs writes; a value beyond the precision is the writer's caller's
    /// error, as there).
    fn bytes(&self, v: i128) -> Vec<u8> {
        v.to_be_bytes()[16 - self.width..].to_vec()
    }

    /// Encodes the chunk: its bytes (offsets relative to their start) and
    /// what `SerializedRowGroupWriter::append_column` needs to splice it in.
    pub fn close(self) -> Result<(Bytes, ColumnCloseResult)> {
        let mut pages = Pages::new(self.compression);
        let mut index = ColumnIndexBuilder::new(Type::FIXED_LEN_BYTE_ARRAY);
        let (mut min, mut max, mut nulls) = (None::<i128>, None::<i128>, 0u64);
        let rows = self.rows();
        let (mut start, mut next_value) = (0usize, 0usize);
        while start < rows {
            let end = (start + self.page_rows).min(rows);
            let mut buf = Vec::with_capacity(8 + (end - start) * self.width);
            let present = match &self.valid {
                Some(valid) => {
                    put_def_levels(&valid[start..end], &mut buf);
                    valid[start..end].iter().filter(|&&b| b).count()
                }
                None => end - start,
            };
            let page = &self.values[next_value..next_value + present];
            next_value += present;
            for &v in page {
                buf.extend_from_slice(&v.to_be_bytes()[16 - self.width..]);
            }
            let page_nulls = (end - start - present) as i64;
            nulls += page_nulls as u64;
            match (page.iter().min().copied(), page.iter().max().copied()) {
                (Some(lo), Some(hi)) => {
                    min = Some(min.map_or(lo, |m| m.min(lo)));
                    max = Some(max.map_or(hi, |m| m.max(hi)));
                    index.append(false, self.bytes(lo), self.bytes(hi), page_nulls, None);
                }
                _ => index.append(true, Vec::new(), Vec::new(), page_nulls, None),
            }
            pages.data(buf, end - start, Encoding::PLAIN)?;
            start = end;
        }

        let encodings = [Encoding::PLAIN, Encoding::RLE];
        let mut meta = ColumnChunkMetaData::builder(self.descr.clone())
            .set_encodings_mask(EncodingMask::new_from_encodings(encodings.iter()))
            .set_page_encoding_stats(vec![PageEncodingStats {
                page_type: PageType::DATA_PAGE,
                encoding: Encoding::PLAIN,
                count: pages.data_pages,
            }])
            .set_data_page_offset(pages.first_data.unwrap_or(0));
        if self.statistics != EnabledStatistics::None {
            let flba = |v: Option<i128>| v.map(|v| FixedLenByteArray::from(self.bytes(v)));
            meta = meta.set_statistics(Statistics::new(
                flba(min),
                flba(max),
                None,
                Some(nulls),
                false,
            ));
        }
        let column_index = match self.statistics {
            EnabledStatistics::Page if pages.data_pages > 0 => Some(index.build()?),
            _ => None,
        };
        pages.finish(meta, rows, column_index)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Decimal128Array, Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
    use parquet::arrow::arrow_reader::{ArrowReaderOptions, ParquetRecordBatchReaderBuilder};
    use parquet::arrow::ArrowWriter;
    use parquet::basic::ZstdLevel;
    use parquet::file::page_index::column_index::ColumnIndexMetaData;

    use super::*;
    use crate::store::encode::ColumnWriter;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("q", DataType::Decimal128(28, 6), false),
            Field::new("k", DataType::Decimal128(38, 4), true),
            Field::new("n", DataType::Int64, false),
        ]))
    }

    /// Rows `start..start + rows`: negatives, both extremes of 28 digits,
    /// nulls every 7th row of `k` and a run of nulls filling whole pages.
    fn batch(start: usize, rows: usize) -> RecordBatch {
        let big = 10i128.pow(28) - 1;
        let q: Vec<i128> = (start..start + rows)
            .map(|i| match i % 11 {
                0 => big,
                1 => -big,
                _ => (i as i128 * 7_919 - 3_000_000) * [1, -1][i % 2],
            })
            .collect();
        let k: Vec<Option<i128>> = (start..start + rows)
            .map(|i| (i % 7 != 0 && !(3_000..5_200).contains(&i)).then_some(i as i128 * 1_000_003))
            .collect();
        let cols: Vec<ArrayRef> = vec![
            Arc::new(
                Decimal128Array::from(q)
                    .with_precision_and_scale(28, 6)
                    .unwrap(),
            ),
            Arc::new(
                Decimal128Array::from(k)
                    .with_precision_and_scale(38, 4)
                    .unwrap(),
            ),
            Arc::new(Int64Array::from_iter_values(
                (start..start + rows).map(|i| i as i64),
            )),
        ];
        RecordBatch::try_new(schema(), cols).unwrap()
    }

    fn props() -> WriterProperties {
        WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).unwrap()))
            .set_max_row_group_row_count(Some(4_000))
            .set_data_page_row_count_limit(1_000)
            .build()
    }

    /// The writer under test: wide decimals by [`DecChunk`].
    fn ours_writer(out: &mut Vec<u8>) -> ColumnWriter<&mut Vec<u8>> {
        ColumnWriter::try_new(out, schema(), props())
            .unwrap()
            .wide_decimals_plain()
    }

    fn batches() -> Vec<RecordBatch> {
        [(0, 1_500), (1_500, 3_001), (4_501, 3_700)]
            .into_iter()
            .map(|(s, n)| batch(s, n))
            .collect()
    }

    fn read(file: Vec<u8>) -> (Vec<RecordBatch>, parquet::file::metadata::ParquetMetaData) {
        let opts = ArrowReaderOptions::new()
            .with_page_index_policy(parquet::file::metadata::PageIndexPolicy::Required);
        let b =
            ParquetRecordBatchReaderBuilder::try_new_with_options(Bytes::from(file), opts).unwrap();
        let meta = b.metadata().as_ref().clone();
        let out = b.build().unwrap().map(|b| b.unwrap()).collect();
        (out, meta)
    }

    #[test]
    fn wide_decimals_read_back_as_written_with_the_statistics_arrow_rs_writes() {
        let mut arrow = Vec::new();
        let mut w = ArrowWriter::try_new(&mut arrow, schema(), Some(props())).unwrap();
        let mut ours = Vec::new();
        let mut c = ours_writer(&mut ours);
        for b in batches() {
            w.write(&b).unwrap();
            c.write(&b).unwrap();
        }
        w.close().unwrap();
        c.into_inner().unwrap();
        let (want, want_meta) = read(arrow);
        let (got, got_meta) = read(ours);
        let concat = |b: &[RecordBatch]| arrow::compute::concat_batches(&schema(), b).unwrap();
        assert_eq!(concat(&got), concat(&want));
        assert_eq!(got_meta.num_row_groups(), want_meta.num_row_groups());
        for (g, w) in got_meta.row_groups().iter().zip(want_meta.row_groups()) {
            for col in 0..2 {
                let (g, w) = (g.column(col), w.column(col));
                assert_eq!(g.statistics(), w.statistics(), "column {col}");
                assert_eq!(g.num_values(), w.num_values());
                assert_eq!(g.dictionary_page_offset(), None, "no dictionary");
            }
        }
    }

    #[test]
    fn each_page_of_a_wide_decimal_is_in_the_column_index_with_its_min_max_and_nulls() {
        let mut ours = Vec::new();
        let mut c = ours_writer(&mut ours);
        let all = batches();
        for b in &all {
            c.write(b).unwrap();
        }
        c.into_inner().unwrap();
        let (_, meta) = read(ours);
        let rows = arrow::compute::concat_batches(&schema(), &all).unwrap();
        let be = |v: i128, w: usize| v.to_be_bytes()[16 - w..].to_vec();
        let mut first_row = 0;
        let mut null_pages = 0;
        for rg in 0..meta.num_row_groups() {
            let pages = meta.page_index_for_row_group(rg);
            let rg_rows = meta.row_group(rg).num_rows() as usize;
            for (col, width) in [(0, 12), (1, 16)] {
                let Some(ColumnIndexMetaData::FIXED_LEN_BYTE_ARRAY(index)) =
                    pages.column_index(col)
                else {
                    panic!("row group {rg} column {col}: no fixed-length index");
                };
                let locs = pages.offset_index(col).unwrap().page_locations();
                let a = rows.column(col).as_primitive::<Decimal128Type>();
                for p in 0..locs.len() {
                    let start = first_row + locs[p].first_row_index as usize;
                    let end = locs.get(p + 1).map_or(first_row + rg_rows, |l| {
                        first_row + l.first_row_index as usize
                    });
                    assert!(end - start <= 1_000, "page of {} rows", end - start);
                    let page: Vec<i128> = (start..end)
                        .filter(|&i| a.is_valid(i))
                        .map(|i| a.value(i))
                        .collect();
                    let nulls = (end - start - page.len()) as i64;
                    assert_eq!(index.null_count(p), Some(nulls));
                    match (page.iter().min(), page.iter().max()) {
                        (Some(lo), Some(hi)) => {
                            assert_eq!(index.min_value(p), Some(&be(*lo, width)[..]));
                            assert_eq!(index.max_value(p), Some(&be(*hi, width)[..]));
                        }
                        _ => {
                            assert!(index.is_null_page(p));
                            null_pages += 1;
                        }
                    }
                }
            }
            first_row += rg_rows;
        }
        assert_eq!(first_row, rows.num_rows());
        assert!(null_pages >= 2, "the run of nulls fills whole pages");
    }

    #[test]
    fn nulls_in_a_required_wide_decimal_are_refused() {
        let mut ours = Vec::new();
        let mut c = ours_writer(&mut ours);
        let b = batch(0, 10);
        let q: ArrayRef = Arc::new(
            Decimal128Array::from(vec![Some(1), None])
                .with_precision_and_scale(28, 6)
                .unwrap(),
        );
        let cols = vec![q, b.column(1).slice(0, 2), b.column(2).slice(0, 2)];
        // A batch that allows nulls where the file does not: the chunk refuses them.
        let nullable = Arc::new(Schema::new(
            schema()
                .fields()
                .iter()
                .map(|f| f.as_ref().clone().with_nullable(true))
                .collect::<Vec<_>>(),
        ));
        let bad = RecordBatch::try_new(nullable, cols).unwrap();
        assert!(c.write(&bad).is_err());
    }
}
