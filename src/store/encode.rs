//! A Parquet writer that encodes the columns of every batch in parallel.
//!
//! `ArrowWriter` encodes a batch's columns one after the other on the
//! calling thread, so one big output (a lake segment, `bill_lines`) keeps a
//! single core busy while the others wait. [`ColumnWriter`] hands each
//! column's chunk of the batch to its own rayon task. It makes the same calls
//! per column, in the same order, with the same row-group splits as
//! `ArrowWriter`, so the file is byte-for-byte the one `ArrowWriter` writes
//! (tested below), whatever the number of threads. Called from inside the
//! thread pool it encodes in line (see [`in_pool`]).
//!
//! A text column may also come as dictionary keys: that column is written by
//! `store::dict` instead (same page types, read back as the same text
//! column; the rest of the file is still what `ArrowWriter` writes). Schemas
//! are flat (one Parquet column per field), as every meterflow dataset is.

use std::io::Write;

use arrow::array::ArrayRef;
use arrow::datatypes::{DataType, FieldRef, SchemaRef};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_writer::{compute_leaves, ArrowColumnWriter, ArrowRowGroupWriterFactory};
use parquet::arrow::ArrowWriter;
use parquet::errors::{ParquetError, Result};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use rayon::prelude::*;

use super::decimal::{is_wide_decimal, DecChunk};
use super::dict::{dict_type, DictChunk};

pub struct ColumnWriter<W: Write + Send> {
    file: SerializedFileWriter<W>,
    factory: ArrowRowGroupWriterFactory,
    schema: SchemaRef,
    props: WriterProperties,
    /// The open row group's column writers and its rows so far.
    open: Option<(Vec<Chunk>, usize)>,
    max_rows: Option<usize>,
    /// Wide decimal columns go to [`DecChunk`].
    wide_decimals_plain: bool,
}

/// One column of the open row group: arrow-rs's writer, or for a text
/// column handed over as a dictionary array, [`DictChunk`].
enum Chunk {
    Arrow(Box<ArrowColumnWriter>),
    Dict(DictChunk),
    Dec(DecChunk),
}

impl Chunk {
    fn write(&mut self, field: &FieldRef, column: &ArrayRef) -> Result<()> {
        match self {
            Chunk::Arrow(w) => {
                let mut leaves = compute_leaves(field, column)?;
                match (leaves.pop(), leaves.is_empty()) {
                    (Some(leaf), true) => w.write(&leaf),
                    _ => Err(ParquetError::General(format!(
                        "column {} is not flat",
                        field.name()
                    ))),
                }
            }
            Chunk::Dict(d) => d.write(column.as_ref()),
            Chunk::Dec(d) => d.write(column.as_ref()),
        }
    }
}

impl<W: Write + Send> ColumnWriter<W> {
    pub fn try_new(w: W, schema: SchemaRef, props: WriterProperties) -> Result<Self> {
        if props.max_row_group_bytes().is_some() {
            // ArrowWriter would split by estimated size too; nothing here sets it.
            return Err(ParquetError::General(
                "ColumnWriter splits row groups by row count only".into(),
            ));
        }
        let max_rows = props.max_row_group_row_count();
        if max_rows == Some(0) {
            return Err(ParquetError::General("row groups of 0 rows".into()));
        }
        // ArrowWriter builds the Parquet schema and the embedded Arrow schema;
        // taking its parts keeps the file header and footer identical.
        let (file, factory) = ArrowWriter::try_new(w, schema.clone(), Some(props.clone()))?
            .into_serialized_writer()?;
        if file.schema_descr().num_columns() != schema.fields().len() {
            return Err(ParquetError::General(
                "ColumnWriter writes flat schemas only".into(),
            ));
        }
        Ok(ColumnWriter {
            file,
            factory,
            schema,
            props,
            open: None,
            max_rows,
            wide_decimals_plain: false,
        })
    }

    /// Writes decimals of more than 18 digits (fixed-length bytes) with
    /// [`DecChunk`]: PLAIN pages without a dictionary, built from the `i128`
    /// values (the file is then no longer byte-for-byte `ArrowWriter`'s).
    pub fn wide_decimals_plain(mut self) -> Self {
        self.wide_decimals_plain = true;
        self
    }

    /// Encodes `batch`, starting a new row group whenever the open one is full.
    /// A text column of the schema may come as a `Dictionary(UInt32, Utf8)`
    /// array ([`super::dict::dict_type`]): it is written from its keys, and
    /// read back as the schema's text column.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let schema = self.schema.clone();
        let fields = schema.fields();
        if batch.num_columns() != fields.len()
            || fields.iter().zip(batch.columns()).any(|(f, c)| {
                f.data_type() != c.data_type()
                    && !(f.data_type() == &DataType::Utf8 && c.data_type() == &dict_type())
            })
        {
            return Err(ParquetError::General(
                "batch does not match the writer's schema".into(),
            ));
        }
        let mut rest = batch.clone();
        while rest.num_rows() > 0 {
            if self.open.is_none() {
                self.open = Some((self.open_row_group(&rest)?, 0));
            }
            let (chunks, rows) = self.open.as_mut().expect("opened above");
            let room = self.max_rows.map_or(usize::MAX, |m| m - *rows);
            let take = rest.num_rows().min(room);
            let part = rest.slice(0, take);
            rest = rest.slice(take, rest.num_rows() - take);
            let work = chunks.iter_mut().zip(fields.iter().zip(part.columns()));
            if in_pool() {
                for (c, (f, col)) in work {
                    c.write(f, col)?;
                }
            } else {
                work.collect::<Vec<_>>()
                    .into_par_iter()
                    .try_for_each(|(c, (f, col))| c.write(f, col))?;
            }
            *rows += take;
            if self.max_rows.is_some_and(|m| *rows >= m) {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Writers for a new row group: dictionary columns where `batch` has
    /// dictionary arrays (every batch of a row group must agree).
    fn open_row_group(&mut self, batch: &RecordBatch) -> Result<Vec<Chunk>> {
        let index = self.file.flushed_row_groups().len();
        let arrow = self.factory.create_column_writers(index)?;
        arrow
            .into_iter()
            .zip(batch.columns())
            .enumerate()
            .map(|(i, (w, c))| {
                let descr = self.file.schema_descr().column(i);
                Ok(if c.data_type() == &dict_type() {
                    Chunk::Dict(DictChunk::new(descr, &self.props)?)
                } else if self.wide_decimals_plain && is_wide_decimal(&descr) {
                    Chunk::Dec(DecChunk::new(descr, &self.props)?)
                } else {
                    Chunk::Arrow(Box::new(w))
                })
            })
            .collect()
    }

    /// Closes the open row group (its column chunks close in parallel) and
    /// appends it to the file.
    pub fn flush(&mut self) -> Result<()> {
        let Some((chunks, _)) = self.open.take() else {
            return Ok(());
        };
        let close = |c: Chunk| match c {
            Chunk::Arrow(w) => w.close().map(Closed::Arrow),
            Chunk::Dict(d) => d.close().map(Closed::Dict),
            Chunk::Dec(d) => d.close().map(Closed::Dict),
        };
        let closed = if in_pool() {
            chunks.into_iter().map(close).collect::<Result<Vec<_>>>()?
        } else {
            chunks
                .into_par_iter()
                .map(close)
                .collect::<Result<Vec<_>>>()?
        };
        let mut rg = self.file.next_row_group()?;
        for c in closed {
            match c {
                Closed::Arrow(chunk) => chunk.append_to_row_group(&mut rg)?,
                Closed::Dict((bytes, result)) => rg.append_column(&bytes, result)?,
            }
        }
        rg.close()?;
        Ok(())
    }

    /// Writes the footer and returns the inner writer.
    pub fn into_inner(mut self) -> Result<W> {
        self.flush()?;
        self.file.into_inner()
    }
}

enum Closed {
    Arrow(parquet::arrow::arrow_writer::ArrowColumnChunk),
    /// A chunk meterflow encoded itself (text from keys, wide decimals).
    Dict((bytes::Bytes, parquet::column::writer::ColumnCloseResult)),
}

/// Called from a task of the thread pool, the caller is already one of many
/// parallel tasks (a day of `sim fleet`): its columns are encoded in line.
/// Waiting for column tasks there would let the thread start another outer
/// task meanwhile (work stealing), holding more of them in memory at once.
fn in_pool() -> bool {
    rayon::current_thread_index().is_some()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Decimal128Array, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use parquet::basic::{Compression, ZstdLevel};

    use super::*;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("meter_id", DataType::Utf8, false),
            Field::new("n", DataType::Int64, true),
            Field::new("value", DataType::Decimal128(18, 4), false),
            Field::new("channel", DataType::Utf8, false),
        ]))
    }

    fn batch(start: usize, rows: usize) -> RecordBatch {
        let ids: Vec<String> = (start..start + rows)
            .map(|i| format!("M{:08}", i / 3))
            .collect();
        let n: Vec<Option<i64>> = (start..start + rows)
            .map(|i| (i % 7 != 0).then_some(i as i64 * 31))
            .collect();
        let v: Vec<i128> = (start..start + rows).map(|i| i as i128 * 12_345).collect();
        let ch: Vec<&str> = (start..start + rows)
            .map(|i| ["energy_import", "peak", "valley"][i % 3])
            .collect();
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(ids)),
            Arc::new(Int64Array::from(n)),
            Arc::new(
                Decimal128Array::from(v)
                    .with_precision_and_scale(18, 4)
                    .unwrap(),
            ),
            Arc::new(StringArray::from(ch)),
        ];
        RecordBatch::try_new(schema(), cols).unwrap()
    }

    fn props(max_rows: usize) -> WriterProperties {
        WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).unwrap()))
            .set_max_row_group_row_count(Some(max_rows))
            .set_data_page_row_count_limit(1000)
            .build()
    }

    #[test]
    fn files_are_byte_identical_to_the_arrow_writers_across_row_group_splits() {
        // Batch sizes that end row groups mid-batch, exactly at a batch end,
        // and span several row groups at once.
        let sizes = [1, 2_500, 7_499, 10_000, 3, 25_000, 0, 4_997];
        for max_rows in [10_000, 2_500, 1_000_000] {
            let mut theirs =
                ArrowWriter::try_new(Vec::new(), schema(), Some(props(max_rows))).unwrap();
            let mut ours = ColumnWriter::try_new(Vec::new(), schema(), props(max_rows)).unwrap();
            let mut start = 0;
            for rows in sizes {
                let b = batch(start, rows);
                start += rows;
                theirs.write(&b).unwrap();
                ours.write(&b).unwrap();
            }
            let theirs = theirs.into_inner().unwrap();
            let ours = ours.into_inner().unwrap();
            assert!(theirs.len() > 1000);
            assert_eq!(ours, theirs, "max {max_rows} rows per row group");
        }
    }

    #[test]
    fn columns_encoded_in_line_inside_the_pool_give_the_same_bytes() {
        let write = || {
            let mut w = ColumnWriter::try_new(Vec::new(), schema(), props(4_000)).unwrap();
            w.write(&batch(0, 9_000)).unwrap();
            w.write(&batch(9_000, 1_234)).unwrap();
            w.into_inner().unwrap()
        };
        assert!(!in_pool());
        let parallel = write();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let in_line = pool.install(|| {
            assert!(in_pool());
            write()
        });
        assert_eq!(parallel, in_line);
    }

    #[test]
    fn text_columns_given_as_dictionaries_read_back_as_the_same_text_columns() {
        use crate::store::dict::DictText;
        use arrow::array::AsArray;
        use parquet::arrow::arrow_reader::{ArrowReaderOptions, ParquetRecordBatchReaderBuilder};

        let plain = |b: &RecordBatch| -> RecordBatch {
            let ch: Vec<String> = (0..b.num_rows())
                .map(|i| ["energy_import", "peak", "valley", "a\u{e9}"][(i / 5) % 4].to_string())
                .collect();
            let mut cols = b.columns().to_vec();
            cols[3] = Arc::new(StringArray::from(ch));
            RecordBatch::try_new(schema(), cols).unwrap()
        };
        let dict_schema = Arc::new(Schema::new(vec![
            Field::new("meter_id", DataType::Utf8, false),
            Field::new("n", DataType::Int64, true),
            Field::new("value", DataType::Decimal128(18, 4), false),
            Field::new("channel", crate::store::dict::dict_type(), false),
        ]));
        let keyed = |b: &RecordBatch| -> RecordBatch {
            let p = plain(b);
            let texts = p.column(3).as_string::<i32>();
            let mut t = DictText::with_capacity(p.num_rows());
            for v in texts.iter() {
                t.push(v.unwrap());
            }
            let mut cols = p.columns().to_vec();
            cols[3] = t.finish();
            RecordBatch::try_new(dict_schema.clone(), cols).unwrap()
        };
        // Row groups of 2,500 rows, pages of 1,000: batches split across both.
        let sizes = [1, 2_500, 7_499, 3, 4_997];
        let mut theirs = ArrowWriter::try_new(Vec::new(), schema(), Some(props(2_500))).unwrap();
        let mut ours = ColumnWriter::try_new(Vec::new(), schema(), props(2_500)).unwrap();
        let mut start = 0;
        for rows in sizes {
            let b = batch(start, rows);
            start += rows;
            theirs.write(&plain(&b)).unwrap();
            ours.write(&keyed(&b)).unwrap();
        }
        let theirs = bytes::Bytes::from(theirs.into_inner().unwrap());
        let ours = bytes::Bytes::from(ours.into_inner().unwrap());
        let read = |f: bytes::Bytes| {
            let opts = ArrowReaderOptions::new()
                .with_page_index_policy(parquet::file::metadata::PageIndexPolicy::Required);
            let r = ParquetRecordBatchReaderBuilder::try_new_with_options(f, opts).unwrap();
            let meta = r.metadata().clone();
            let batches: Vec<RecordBatch> = r.build().unwrap().map(|b| b.unwrap()).collect();
            (
                arrow::compute::concat_batches(&schema(), &batches).unwrap(),
                meta,
            )
        };
        let (want, _) = read(theirs);
        let (got, meta) = read(ours);
        assert_eq!(got, want);
        assert_eq!(meta.num_row_groups(), 6);
        let rg = meta.row_group(0);
        let ch = rg.column(3);
        assert!(ch.dictionary_page_offset().is_some());
        let stats = ch.statistics().unwrap();
        assert_eq!(stats.min_bytes_opt(), Some(&b"a\xc3\xa9"[..]));
        assert_eq!(stats.max_bytes_opt(), Some(&b"valley"[..]));
        // Pages are split by the row limit, and the offset index says where.
        let index = meta.page_index_for_row_group(0);
        let pages = index.offset_index(3).unwrap().page_locations();
        assert_eq!(pages.len(), 3);
        assert_eq!(pages[1].first_row_index, 1_000);
    }

    #[test]
    fn optional_text_columns_given_as_dictionaries_keep_their_nulls() {
        use crate::store::dict::DictText;
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

        let field = |t: DataType| {
            Arc::new(Schema::new(vec![
                Field::new("n", DataType::Int64, false),
                Field::new("period", t, true),
            ]))
        };
        let (plain_schema, dict_schema) = (field(DataType::Utf8), field(dict_type()));
        // Nulls scattered, a page of nulls only (rows 3,000..4,000) and a row
        // group of nulls only (rows 5,000..7,500: a chunk with no dictionary
        // entry).
        let text = |i: usize| -> Option<&'static str> {
            let none =
                i.is_multiple_of(3) || (3_000..4_000).contains(&i) || (5_000..7_500).contains(&i);
            (!none).then(|| ["peak", "valley", "a\u{e9}"][(i / 4) % 3])
        };
        let sizes = [1, 2_500, 7_499, 3, 4_997];
        let mut theirs =
            ArrowWriter::try_new(Vec::new(), plain_schema.clone(), Some(props(2_500))).unwrap();
        let mut ours =
            ColumnWriter::try_new(Vec::new(), plain_schema.clone(), props(2_500)).unwrap();
        let mut start = 0;
        for rows in sizes {
            let range = start..start + rows;
            start += rows;
            let n: ArrayRef = Arc::new(Int64Array::from_iter_values(
                range.clone().map(|i| i as i64),
            ));
            let plain: ArrayRef = Arc::new(StringArray::from_iter(range.clone().map(text)));
            let mut keyed = DictText::with_capacity(rows);
            for i in range {
                keyed.push_opt(text(i));
            }
            let b = RecordBatch::try_new(plain_schema.clone(), vec![n.clone(), plain]).unwrap();
            theirs.write(&b).unwrap();
            let b = RecordBatch::try_new(dict_schema.clone(), vec![n, keyed.finish()]).unwrap();
            ours.write(&b).unwrap();
        }
        let read = |f: Vec<u8>| {
            let r = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(f)).unwrap();
            let meta = r.metadata().clone();
            let batches: Vec<RecordBatch> = r.build().unwrap().map(|b| b.unwrap()).collect();
            (
                arrow::compute::concat_batches(&plain_schema, &batches).unwrap(),
                meta,
            )
        };
        let (want, _) = read(theirs.into_inner().unwrap());
        let (got, meta) = read(ours.into_inner().unwrap());
        assert_eq!(got, want);
        assert_eq!(
            got.column(1).null_count(),
            (0..start).filter(|&i| text(i).is_none()).count()
        );
        let nulls_in = |rows: std::ops::Range<usize>| rows.filter(|&i| text(i).is_none()).count();
        let stats = |rg: usize| meta.row_group(rg).column(1).statistics().unwrap().clone();
        assert_eq!(stats(0).null_count_opt(), Some(nulls_in(0..2_500) as u64));
        assert_eq!(stats(0).max_bytes_opt(), Some(&b"valley"[..]));
        assert_eq!(stats(2).null_count_opt(), Some(2_500));
        assert_eq!(stats(2).min_bytes_opt(), None);
    }

    #[test]
    fn nulls_in_a_required_text_column_are_an_error() {
        use crate::store::dict::DictText;
        let s = Arc::new(Schema::new(vec![Field::new(
            "period",
            DataType::Utf8,
            false,
        )]));
        let d = Arc::new(Schema::new(vec![Field::new("period", dict_type(), true)]));
        let mut keyed = DictText::with_capacity(2);
        keyed.push("peak");
        keyed.push_null();
        let b = RecordBatch::try_new(d, vec![keyed.finish()]).unwrap();
        let mut w = ColumnWriter::try_new(Vec::new(), s, props(100)).unwrap();
        assert!(w.write(&b).is_err());
    }

    #[test]
    fn a_batch_of_another_shape_is_an_error() {
        let mut w = ColumnWriter::try_new(Vec::new(), schema(), props(100)).unwrap();
        let b = batch(0, 10);
        let fewer = b.project(&[0, 1]).unwrap();
        assert!(w.write(&fewer).is_err());
    }

    #[test]
    fn a_byte_limit_on_row_groups_is_refused_not_ignored() {
        let p = WriterProperties::builder()
            .set_max_row_group_bytes(Some(1 << 20))
            .build();
        assert!(ColumnWriter::try_new(Vec::new(), schema(), p).is_err());
    }
}
