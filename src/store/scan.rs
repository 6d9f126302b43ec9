//! Fast columnar scan of the readings dataset for batch jobs.
//!
//! Work is split by row group so both cores decode; meter ids are resolved to
//! dense indexes once per run of equal ids (files are sorted by meter), and
//! `channel` / `quality` are read as dictionaries, so no string is built per
//! row. Rows come out grouped by meter shard: a consumer applies the shards
//! in parallel without locks, and within a shard rows keep file order.

use std::collections::HashMap;
use std::fs::File;
use std::hash::{BuildHasherDefault, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::TimestampMillisecondArray;
use arrow::array::{Array, Decimal64Array, DictionaryArray, StringArray};
use arrow::datatypes::{DataType, Field, Int32Type, Schema, SchemaRef};
use chrono::NaiveDate;
use parquet::arrow::arrow_reader::RowSelection;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::ProjectionMask;
use parquet::file::metadata::PageIndexPolicy;
use parquet::file::page_index::column_index::ColumnIndexMetaData;

use super::schema::{readings_schema, VALUE_PRECISION, VALUE_SCALE};
use super::StoreError;
use crate::model::{Channel, Quality};

/// A small fast hasher for meter-id lookups (FxHash-style; ids come from our
/// own master data, so no adversarial keys).
#[derive(Default, Clone, Copy)]
pub struct Fx(u64);

impl Hasher for Fx {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 =
                (self.0.rotate_left(5) ^ u64::from_le_bytes(b)).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }
    fn finish(&self) -> u64 {
        // The multiply leaves the high bits well mixed and the low ones not
        // (they follow the last bytes only), and the table indexes by the low
        // bits: ids differing in their middle digits collided in long probe
        // runs (building a 10M-account map took seconds). Rotate the mixed
        // bits down, as rustc-hash 2 does.
        self.0.rotate_left(26)
    }
}

pub type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<Fx>>;
pub type FxSet<T> = std::collections::HashSet<T, BuildHasherDefault<Fx>>;

/// One reading of a known meter, compact: value scaled by 10^4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    pub meter: u32,
    pub channel: Channel,
    pub quality: Quality,
    pub ts: i64,
    pub value: i64,
}

/// One row group of one file: the unit of parallel decoding.
#[derive(Clone)]
pub struct Unit {
    pub date: NaiveDate,
    pub path: PathBuf,
    pub row_group: usize,
    meta: ArrowReaderMetadata,
}

impl Unit {
    pub fn num_rows(&self) -> usize {
        let rg = self.meta.metadata().row_group(self.row_group);
        rg.num_rows().max(0) as usize
    }

    /// The pages of the `meter_id` column: their rows and min / max ids (None
    /// when the file has no page statistics). Without a page index the whole
    /// row group is one page.
    pub fn id_pages(&self) -> Vec<IdPage> {
        let n = self.num_rows();
        let whole = || {
            vec![IdPage {
                rows: 0..n,
                min: None,
                max: None,
            }]
        };
        let meta = self.meta.metadata();
        let descr = meta.file_metadata().schema_descr();
        let Some(col) = descr.columns().iter().position(|c| c.name() == "meter_id") else {
            return whole();
        };
        let index = meta.page_index_for_row_group(self.row_group);
        let (Some(ColumnIndexMetaData::BYTE_ARRAY(ci)), Some(oi)) =
            (index.column_index(col), index.offset_index(col))
        else {
            return whole();
        };
        let locs = oi.page_locations();
        if locs.is_empty() || ci.num_pages() as usize != locs.len() {
            return whole();
        }
        (0..locs.len())
            .map(|p| IdPage {
                rows: page_rows(locs, p, n),
                min: ci.min_value(p).map(<[u8]>::to_vec),
                max: ci.max_value(p).map(<[u8]>::to_vec),
            })
            .collect()
    }

    /// The ids in each of the `meter_id` pages numbered `wanted`
    /// (ascending), one text per run of equal ids, read from the pages
    /// themselves (the others are skipped unread, by the offset index).
    /// None for a page not read here: ids not prefix-encoded, no offset
    /// index, or page values that do not decode (its min / max then stand
    /// for it; the scan's column reader reports damage). An error when the
    /// file, or a page of it, cannot be read or decompressed (as in the scan).
    pub fn page_ids(&self, wanted: &[usize]) -> Result<Vec<Option<StringArray>>, StoreError> {
        use parquet::column::page::PageReader;
        use parquet::file::serialized_reader::SerializedPageReader;
        let mut out: Vec<Option<StringArray>> = vec![None; wanted.len()];
        let Some(c) = prefix_encoded_ids(self) else {
            return Ok(out);
        };
        let meta = self.meta.metadata();
        let index = meta.page_index_for_row_group(self.row_group);
        let Some(oi) = index.offset_index(c) else {
            return Ok(out);
        };
        let locs = oi.page_locations();
        let path = self.path.as_path();
        let rows = self.num_rows();
        let file = File::open(path).map_err(|e| StoreError::io(path, e))?;
        let chunk = meta.row_group(self.row_group).column(c);
        let mut pages = SerializedPageReader::new(Arc::new(file), chunk, rows, Some(locs.to_vec()))
            .map_err(perr(path))?;
        let mut next = wanted.iter().copied().enumerate().peekable();
        for p in 0..locs.len() {
            let slot = match next.peek() {
                None => break,
                Some(&(slot, w)) if w == p => slot,
                Some(_) => {
                    pages.skip_next_page().map_err(perr(path))?;
                    continue;
                }
            };
            next.next();
            let Some(page) = pages.get_next_page().map_err(perr(path))? else {
                break;
            };
            let n = page_rows(locs, p, rows).len();
            out[slot] = delta_values(&page)
                .filter(|(_, values)| *values as usize == n)
                .and_then(|(bytes, _)| {
                    let mut runs = super::idruns::IdRuns::with_capacity(n);
                    runs.push_page(bytes, n).ok()?;
                    runs.finish().ok().map(|(_, texts)| texts)
                });
        }
        Ok(out)
    }
}

/// The rows of page `p` of a column chunk of `n` rows, by its offset index.
fn page_rows(
    locs: &[parquet::file::page_index::offset_index::PageLocation],
    p: usize,
    n: usize,
) -> std::ops::Range<usize> {
    let start = locs.get(p).map_or(n, |l| l.first_row_index.max(0) as usize);
    let end = locs
        .get(p + 1)
        .map_or(n, |l| l.first_row_index.max(0) as usize);
    start.min(n)..end.min(n)
}

/// One page of a unit's `meter_id` column: rows `rows` hold ids within
/// `min ..= max` (None: unknown, so any id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdPage {
    pub rows: std::ops::Range<usize>,
    pub min: Option<Vec<u8>>,
    pub max: Option<Vec<u8>>,
}

impl IdPage {
    /// Whether the page can hold one of the sorted `ids`, by its min / max
    /// (any id, without them).
    pub fn may_hold(&self, ids: &[&str]) -> bool {
        match (&self.min, &self.max) {
            (Some(lo), Some(hi)) => any_within(ids, lo, hi),
            _ => true,
        }
    }
}

/// The rows of a unit that one pass of a scan decodes (whole `meter_id`
/// pages, ascending), and among them the rows where it counts readings of
/// unknown meters: every page is counted by exactly one pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    pub rows: Vec<std::ops::Range<usize>>,
    pub count_unknown: Vec<std::ops::Range<usize>>,
}

impl Selection {
    /// Whether unit row `row` is in a range where unknown ids are counted.
    fn counts_unknown(&self, row: usize) -> bool {
        let i = self.count_unknown.partition_point(|r| r.end <= row);
        self.count_unknown.get(i).is_some_and(|r| r.contains(&row))
    }

    /// Whether the selection holds all of `rows` (Some(true)), none of them
    /// (Some(false)), or only some (None).
    fn covers(&self, rows: std::ops::Range<usize>) -> Option<bool> {
        let i = self.rows.partition_point(|r| r.end <= rows.start);
        match self.rows.get(i) {
            Some(r) if r.start <= rows.start && r.end >= rows.end => Some(true),
            Some(r) if r.start < rows.end => None,
            _ => Some(false),
        }
    }

    /// The unit row of the `k`-th selected row.
    fn unit_row(&self, mut k: usize) -> usize {
        for r in &self.rows {
            if k < r.len() {
                return r.start + k;
            }
            k -= r.len();
        }
        usize::MAX
    }
}

/// Plans one pass over a unit's pages: page `p` is read when `wanted(p,
/// page)` says the pass has a meter id in it (see [`IdPage::may_hold`]);
/// `seen[p]` marks pages an earlier pass read (the first reader of a page
/// counts its unknown ids); the `last` pass also reads every page no pass
/// wanted, so readings of unknown meters are counted however the passes
/// fall. None: nothing to read.
pub fn select_pages(
    pages: &[IdPage],
    wanted: impl Fn(usize, &IdPage) -> bool,
    seen: &mut [bool],
    last: bool,
) -> Option<Selection> {
    let mut sel = Selection::default();
    let push = |v: &mut Vec<std::ops::Range<usize>>, r: &std::ops::Range<usize>| match v.last_mut()
    {
        Some(l) if l.end == r.start => l.end = r.end,
        _ => v.push(r.clone()),
    };
    for (p, page) in pages.iter().enumerate() {
        let first = !seen[p];
        if wanted(p, page) || (last && first) {
            push(&mut sel.rows, &page.rows);
            if first {
                push(&mut sel.count_unknown, &page.rows);
                seen[p] = true;
            }
        }
    }
    (!sel.rows.is_empty()).then_some(sel)
}

/// Whether sorted `ids` hold one within `lo ..= hi` (byte order, as
/// Parquet orders statistics).
fn any_within(ids: &[&str], lo: &[u8], hi: &[u8]) -> bool {
    let i = ids.partition_point(|x| x.as_bytes() < lo);
    ids.get(i).is_some_and(|x| x.as_bytes() <= hi)
}

/// The decoded rows of one unit.
#[derive(Default)]
pub struct Chunk {
    /// The rows of known meters, in shard order (file order within a
    /// shard): shard `s` holds meters `s * shard_len ..` ([`Chunk::shard`]).
    routed: Vec<Row>,
    /// Where each shard's rows end in `routed`.
    ends: Vec<usize>,
    /// Meter ids not in the index, with their row counts (runs merged).
    pub unknown: Vec<(String, u64)>,
    /// Rows read (all of them, before any filter).
    pub rows: u64,
}

impl Chunk {
    /// The rows of shard `s` (none past the last shard).
    pub fn shard(&self, s: usize) -> &[Row] {
        let start = match s {
            0 => 0,
            _ => self.ends.get(s - 1).copied().unwrap_or(self.routed.len()),
        };
        let end = self.ends.get(s).copied().unwrap_or(self.routed.len());
        &self.routed[start..end]
    }

    /// Every shard's rows, in shard order.
    pub fn shards(&self) -> impl Iterator<Item = &[Row]> {
        (0..self.ends.len()).map(|s| self.shard(s))
    }
}

/// The readings schema with every low-cardinality text column as a
/// dictionary, so the reader hands back the file's dictionary pages instead
/// of one string per row; `meter_id` too when `ids_as_dictionary` (a row
/// group whose `meter_id` pages are all dictionary-encoded: read otherwise,
/// the reader would build a dictionary by hashing every id).
fn scan_schema(ids_as_dictionary: bool) -> SchemaRef {
    let dict = DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
    let fields: Vec<Field> = readings_schema()
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Utf8 if ids_as_dictionary || f.name() != "meter_id" => {
                Field::new(f.name(), dict.clone(), f.is_nullable())
            }
            // Stored as INT64: read as 64-bit decimals, the stored integers
            // themselves, instead of widening every value to 128 bits.
            DataType::Decimal128(p, s) => {
                Field::new(f.name(), DataType::Decimal64(*p, *s), f.is_nullable())
            }
            _ => f.as_ref().clone(),
        })
        .collect();
    Arc::new(Schema::new(fields))
}

/// The batches of one unit (row group), `columns` only, text columns as
/// dictionaries (see [`scan_schema`]); read lazily, 64k rows at a time.
pub fn unit_batches<'a>(
    unit: &'a Unit,
    columns: &[&str],
    selection: Option<&Selection>,
) -> Result<
    impl Iterator<Item = Result<arrow::record_batch::RecordBatch, StoreError>> + 'a,
    StoreError,
> {
    let path = unit.path.as_path();
    let file = File::open(path).map_err(|e| StoreError::io(path, e))?;
    let builder = ParquetRecordBatchReaderBuilder::new_with_metadata(file, unit.meta.clone())
        .with_batch_size(64 * 1024)
        .with_row_groups(vec![unit.row_group]);
    let mask = ProjectionMask::columns(builder.parquet_schema(), columns.iter().copied());
    let builder = match selection {
        Some(sel) => builder.with_row_selection(RowSelection::from_consecutive_ranges(
            sel.rows.iter().cloned(),
            unit.num_rows(),
        )),
        None => builder,
    };
    let reader = builder.with_projection(mask).build().map_err(perr(path))?;
    Ok(reader.map(move |b| {
        b.map_err(|e| StoreError::Parquet {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }))
}

/// Calls `f` with each batch of one unit (see [`unit_batches`]) and its
/// [`ScanView`]. A whole unit whose `meter_id` pages are all prefix-encoded
/// (the lake's own files) has its ids read from the pages as runs of equal
/// ids ([`super::idruns`]), one text per run, and its batches come without a
/// `meter_id` column; any other unit reads `meter_id` as a column.
pub fn for_each_view<E: From<StoreError>>(
    unit: &Unit,
    columns: &[&str],
    selection: Option<&Selection>,
    mut f: impl FnMut(&arrow::record_batch::RecordBatch, &ScanView<'_>) -> Result<(), E>,
) -> Result<(), E> {
    let runs = if columns.contains(&"meter_id") {
        id_runs(unit, selection)?
    } else {
        None
    };
    let columns: Vec<&str> = match runs {
        Some(_) => columns
            .iter()
            .copied()
            .filter(|c| *c != "meter_id")
            .collect(),
        None => columns.to_vec(),
    };
    let mut base = 0usize;
    for batch in unit_batches(unit, &columns, selection)? {
        let batch = batch?;
        let n = batch.num_rows();
        let ids = match &runs {
            Some((keys, texts)) => Some(MeterIds::Dict(
                keys.get(base..base + n).ok_or_else(|| {
                    StoreError::Schema(format!(
                        "{}: more rows than meter ids in row group {}",
                        unit.path.display(),
                        unit.row_group
                    ))
                })?,
                texts,
            )),
            None => None,
        };
        let view = ScanView::with_ids(&batch, &unit.path, ids)?;
        f(&batch, &view)?;
        base += n;
    }
    Ok(())
}

/// Per row the index of its run of equal ids, and each run's id, read from
/// the unit's `meter_id` pages; None when the column is not a required one
/// whose data pages are all `DELTA_BYTE_ARRAY`, or a page's values cannot be
/// decoded here (then it is read as text, and the column reader reports any
/// damage; a page that cannot be read or decompressed is an error here).
/// With a `selection` (whole `meter_id` pages, [`select_pages`]), the rows
/// of the selected pages only, in order, as the batches hold them; the other
/// pages are skipped unread, by the file's offset index (None without one).
fn id_runs(
    unit: &Unit,
    selection: Option<&Selection>,
) -> Result<Option<(Vec<i32>, StringArray)>, StoreError> {
    use parquet::column::page::PageReader;
    use parquet::file::serialized_reader::SerializedPageReader;
    let Some(c) = prefix_encoded_ids(unit) else {
        return Ok(None);
    };
    let meta = unit.meta.metadata();
    let chunk = meta.row_group(unit.row_group).column(c);
    let path = unit.path.as_path();
    let rows = unit.num_rows();
    // Each page's rows, when only some pages are wanted.
    let index = meta.page_index_for_row_group(unit.row_group);
    let (locations, wanted) = match selection {
        None => (None, rows),
        Some(sel) => {
            let Some(oi) = index.offset_index(c) else {
                return Ok(None);
            };
            let locs = oi.page_locations().as_slice();
            (Some(locs), sel.rows.iter().map(|r| r.len()).sum())
        }
    };
    let file = File::open(path).map_err(|e| StoreError::io(path, e))?;
    let mut pages =
        SerializedPageReader::new(Arc::new(file), chunk, rows, locations.map(<[_]>::to_vec))
            .map_err(perr(path))?;
    let mut runs = super::idruns::IdRuns::with_capacity(wanted);
    let mut page_no = 0;
    loop {
        // A selected page's rows, by the offset index.
        let mut expect = None;
        if let (Some(sel), Some(locs)) = (selection, locations) {
            if page_no == locs.len() {
                break;
            }
            let page = page_rows(locs, page_no, rows);
            page_no += 1;
            match sel.covers(page.clone()) {
                Some(true) => expect = Some(page.len()),
                Some(false) => {
                    pages.skip_next_page().map_err(perr(path))?;
                    continue;
                }
                // Part of a page: not a selection of whole pages.
                None => return Ok(None),
            }
        }
        let Some(page) = pages.get_next_page().map_err(perr(path))? else {
            break;
        };
        let Some((values, n)) = delta_values(&page) else {
            return Ok(None);
        };
        // A page claiming more values than the row group (or the selection)
        // has left is damage the column reader reports (and nothing is
        // allocated for it here).
        if n as usize > wanted - runs.rows() || expect.is_some_and(|e| e != n as usize) {
            return Ok(None);
        }
        if let Err(e) = runs.push_page(values, n as usize) {
            tracing::debug!(file = %path.display(), row_group = unit.row_group, error = %e, "meter ids read as a column");
            return Ok(None);
        }
    }
    if runs.rows() != wanted {
        return Ok(None);
    }
    match runs.finish() {
        Ok(keys_texts) => Ok(Some(keys_texts)),
        Err(e) => {
            tracing::debug!(file = %path.display(), row_group = unit.row_group, error = %e, "meter ids read as a column");
            Ok(None)
        }
    }
}

/// The `meter_id` column's index when a unit's ids can be read from its
/// pages here: a required column whose data pages are all `DELTA_BYTE_ARRAY`.
fn prefix_encoded_ids(unit: &Unit) -> Option<usize> {
    use parquet::basic::Encoding;
    let meta = unit.meta.metadata();
    let descr = meta.file_metadata().schema_descr();
    let c = descr
        .columns()
        .iter()
        .position(|c| c.name() == "meter_id")?;
    let cd = descr.column(c);
    let chunk = meta.row_group(unit.row_group).column(c);
    let prefix_encoded = match chunk.page_encoding_stats_mask() {
        Some(m) => m.is_only(Encoding::DELTA_BYTE_ARRAY),
        None => chunk.encodings().any(|e| e == Encoding::DELTA_BYTE_ARRAY),
    };
    (cd.max_def_level() == 0
        && cd.max_rep_level() == 0
        && chunk.dictionary_page_offset().is_none()
        && prefix_encoded)
        .then_some(c)
}

/// A `DELTA_BYTE_ARRAY` data page's values section (after any levels) and
/// its value count; None for any other page.
fn delta_values(page: &parquet::column::page::Page) -> Option<(&[u8], u32)> {
    use parquet::basic::Encoding;
    use parquet::column::page::Page;
    match page {
        Page::DataPage {
            buf,
            num_values,
            encoding: Encoding::DELTA_BYTE_ARRAY,
            ..
        } => Some((&buf[..], *num_values)),
        Page::DataPageV2 {
            buf,
            num_values,
            encoding: Encoding::DELTA_BYTE_ARRAY,
            num_nulls: 0,
            def_levels_byte_len,
            rep_levels_byte_len,
            ..
        } => {
            let levels = (*def_levels_byte_len + *rep_levels_byte_len) as usize;
            Some((buf.get(levels..)?, *num_values))
        }
        _ => None,
    }
}

/// The columns every scan reads (see [`unit_batches`]).
pub const SCAN_COLUMNS: [&str; 5] = ["meter_id", "ts", "channel", "value", "quality"];

/// The [`SCAN_COLUMNS`] of one scanned batch, checked once: times and
/// scaled values as slices, `channel` and `quality` as dictionaries (keys
/// per row, text per distinct value).
pub struct ScanView<'a> {
    pub meter_id: MeterIds<'a>,
    pub ts: &'a [i64],
    /// Scaled by 10^[`VALUE_SCALE`].
    pub value: &'a [i64],
    pub channel: (&'a [i32], &'a StringArray),
    pub quality: (&'a [i32], &'a StringArray),
}

impl<'a> ScanView<'a> {
    pub fn new(
        batch: &'a arrow::record_batch::RecordBatch,
        path: &Path,
    ) -> Result<ScanView<'a>, StoreError> {
        ScanView::with_ids(batch, path, None)
    }

    /// Like [`ScanView::new`], with the batch's meter ids given (read from
    /// the pages, [`for_each_view`]) instead of from its `meter_id` column.
    fn with_ids(
        batch: &'a arrow::record_batch::RecordBatch,
        path: &Path,
        ids: Option<MeterIds<'a>>,
    ) -> Result<ScanView<'a>, StoreError> {
        let bad = |what: &str| {
            StoreError::Schema(format!(
                "{}: unexpected readings schema ({what})",
                path.display()
            ))
        };
        let col = |name: &str| batch.column_by_name(name).ok_or_else(|| bad(name));
        let dict = |name: &str| dictionary_text(col(name)?.as_ref()).ok_or_else(|| bad(name));
        let meter_id = match ids {
            Some(ids) => ids,
            None => {
                let ids = col("meter_id")?;
                match ids.as_any().downcast_ref::<StringArray>() {
                    Some(text) => MeterIds::Text(text),
                    None => {
                        let (keys, values) =
                            dictionary_text(ids.as_ref()).ok_or_else(|| bad("meter_id"))?;
                        MeterIds::Dict(keys, values)
                    }
                }
            }
        };
        let ts = col("ts")?
            .as_any()
            .downcast_ref::<TimestampMillisecondArray>()
            .ok_or_else(|| bad("ts"))?;
        let value = col("value")?
            .as_any()
            .downcast_ref::<Decimal64Array>()
            .ok_or_else(|| bad("value"))?;
        if value.scale() != VALUE_SCALE {
            return Err(bad("value scale"));
        }
        Ok(ScanView {
            meter_id,
            ts: ts.values(),
            value: value.values(),
            channel: dict("channel")?,
            quality: dict("quality")?,
        })
    }

    /// Each distinct channel parsed once (index by `channel.0[row]`); None
    /// for a channel this build does not know.
    pub fn channels(&self) -> Vec<Option<Channel>> {
        let v = self.channel.1;
        (0..v.len())
            .map(|k| v.is_valid(k).then(|| v.value(k).parse().ok()).flatten())
            .collect()
    }

    /// Each distinct quality parsed once (index by `quality.0[row]`);
    /// missing or unreadable is suspect.
    pub fn qualities(&self) -> Vec<Quality> {
        let v = self.quality.1;
        (0..v.len())
            .map(|k| match v.is_valid(k).then(|| v.value(k)) {
                Some("ok") => Quality::OK,
                Some(q) => Quality::parse(q).unwrap_or(Quality::SUSPECT),
                None => Quality::SUSPECT,
            })
            .collect()
    }
}

/// The `meter_id` column of a batch: text per row, or, from row groups
/// written with a dictionary, keys per row into the distinct ids.
#[derive(Clone, Copy)]
pub enum MeterIds<'a> {
    Text(&'a StringArray),
    Dict(&'a [i32], &'a StringArray),
}

impl<'a> MeterIds<'a> {
    /// The id of row `i` (an empty id for a key outside the dictionary,
    /// which only a corrupt file could hold; no meter has it).
    #[inline]
    pub fn value(&self, i: usize) -> &'a str {
        match *self {
            MeterIds::Text(a) => a.value(i),
            MeterIds::Dict(keys, values) => {
                let k = keys[i] as usize;
                if k < values.len() {
                    values.value(k)
                } else {
                    ""
                }
            }
        }
    }

    /// Whether rows `i` and `j` hold the same id: a key compare for a
    /// dictionary (equal keys are equal ids; a writer that repeated an id
    /// in its dictionary would only cost the scan another lookup).
    #[inline]
    pub fn same(&self, i: usize, j: usize) -> bool {
        match *self {
            MeterIds::Text(a) => same_id(a.value(i).as_bytes(), a.value(j).as_bytes()),
            MeterIds::Dict(keys, _) => keys[i] == keys[j],
        }
    }
}

/// The text values of a dictionary column (see [`unit_batches`]).
pub fn dictionary_text(a: &dyn Array) -> Option<(&[i32], &StringArray)> {
    let d = a.as_any().downcast_ref::<DictionaryArray<Int32Type>>()?;
    let v = d.values().as_any().downcast_ref::<StringArray>()?;
    Some((d.keys().values(), v))
}

fn perr(path: &Path) -> impl Fn(parquet::errors::ParquetError) -> StoreError + '_ {
    move |e| StoreError::parquet(path, e)
}

/// Reads the footers of `files` and lists their row groups, in file order.
pub fn units(files: &[(NaiveDate, PathBuf)]) -> Result<Vec<Unit>, StoreError> {
    units_with(files, PageIndexPolicy::Skip)
}

/// Like [`units`], with the files' page indexes (where they have one), so
/// a scan can read only some pages of a row group ([`Unit::id_pages`],
/// [`Selection`]).
pub fn units_with_page_index(files: &[(NaiveDate, PathBuf)]) -> Result<Vec<Unit>, StoreError> {
    units_with(files, PageIndexPolicy::Optional)
}

fn units_with(
    files: &[(NaiveDate, PathBuf)],
    pages: PageIndexPolicy,
) -> Result<Vec<Unit>, StoreError> {
    let (text_ids, dict_ids) = (scan_schema(false), scan_schema(true));
    let mut out = Vec::new();
    for (date, path) in files {
        let file = File::open(path).map_err(|e| StoreError::io(path, e))?;
        let options = ArrowReaderOptions::new()
            .with_schema(text_ids.clone())
            .with_page_index_policy(pages);
        let meta = ArrowReaderMetadata::load(&file, options.clone()).map_err(perr(path))?;
        // Values are read as 64-bit decimals: a wider column is not the lake's.
        let descr = meta.metadata().file_metadata().schema_descr();
        if let Some(c) = descr.columns().iter().find(|c| c.name() == "value") {
            if c.type_precision() > i32::from(VALUE_PRECISION) {
                return Err(StoreError::Schema(format!(
                    "{}: unexpected readings schema (value has precision {}, the lake's is {})",
                    path.display(),
                    c.type_precision(),
                    VALUE_PRECISION
                )));
            }
            // The reader takes the hint's scale for the stored integers
            // whatever the file says: another scale would be read 10^k off.
            if c.type_scale() != i32::from(VALUE_SCALE) {
                return Err(StoreError::Schema(format!(
                    "{}: unexpected readings schema (value has scale {}, the lake's is {})",
                    path.display(),
                    c.type_scale(),
                    VALUE_SCALE
                )));
            }
        }
        let id_col = descr.columns().iter().position(|c| c.name() == "meter_id");
        let dict_rg = |rg: usize| {
            id_col.is_some_and(|c| all_dictionary(meta.metadata().row_group(rg).column(c)))
        };
        let dict_meta = if (0..meta.metadata().num_row_groups()).any(dict_rg) {
            let options = options.with_schema(dict_ids.clone());
            Some(
                ArrowReaderMetadata::try_new(meta.metadata().clone(), options)
                    .map_err(perr(path))?,
            )
        } else {
            None
        };
        for rg in 0..meta.metadata().num_row_groups() {
            let meta = match &dict_meta {
                Some(d) if dict_rg(rg) => d.clone(),
                _ => meta.clone(),
            };
            out.push(Unit {
                date: *date,
                path: path.clone(),
                row_group: rg,
                meta,
            });
        }
    }
    Ok(out)
}

/// Whether every data page of a column chunk is dictionary-encoded (from
/// the chunk's page encoding statistics; without them, no).
fn all_dictionary(c: &parquet::file::metadata::ColumnChunkMetaData) -> bool {
    use parquet::basic::Encoding;
    c.dictionary_page_offset().is_some()
        && c.page_encoding_stats_mask().is_some_and(|m| {
            m.is_only(Encoding::PLAIN_DICTIONARY) || m.is_only(Encoding::RLE_DICTIONARY)
        })
}

/// What to keep and where to put it.
pub struct Scanner<'a> {
    /// Meter id -> dense index.
    pub meters: MeterLookup<'a>,
    /// Meters per shard; shard of meter `m` is `m / shard_len`.
    pub shard_len: u32,
    pub shards: usize,
    /// Inclusive UTC ms range of rows kept.
    pub lo: i64,
    pub hi: i64,
    /// Channels kept.
    pub keep: fn(Channel) -> bool,
}

/// Meter id -> dense index. Files are sorted by meter and indexes follow
/// meter-id order, so [`MeterLookup::find`] checks the meter after the
/// previous one first: a hash lookup at a random place in a map of millions
/// costs more than the rest of the row.
pub struct MeterLookup<'a> {
    /// Where an id that is not the next meter's is found.
    pub others: Others<'a>,
    /// Dense index -> meter id; None past the last meter, and for every
    /// index when ids may repeat (then only the map answers; with
    /// [`Others::Sorted`] it answers for every index below the count).
    pub id_of: &'a (dyn Fn(u32) -> Option<&'a str> + Sync),
    /// Meters billed in another pass: their rows are skipped, not counted
    /// as unknown (None: a single pass, every meter is in the index). The
    /// `u32` is where the search for the previous id of the batch ended
    /// (ids ascend within a row group, so the next search starts there).
    pub elsewhere: Option<&'a Elsewhere<'a>>,
}

/// Whether a meter id not in a pass is another pass's (see
/// [`MeterLookup::elsewhere`]); the `u32` is the search's start and end.
pub type Elsewhere<'a> = dyn Fn(&str, &mut u32) -> bool + Sync + 'a;

/// How [`MeterLookup::find`] finds an id that is not the next meter's.
#[derive(Clone, Copy)]
pub enum Others<'a> {
    /// A map of every id, in any order.
    Map(&'a FxMap<&'a str, u32>),
    /// This many ids, ascending by index with no repeats (bytewise, as
    /// `str` orders): found by a search from the previous meter, with no
    /// map to build (inserting a million ids was 0.5 s of a bill run on
    /// one core, and only a row group's first row and the meters after a
    /// gap need more than the next-meter check).
    Sorted(u32),
}

impl<'a> MeterLookup<'a> {
    /// Ids found by `map`, and by `id_of` for the next meter.
    pub fn with_map(
        map: &'a FxMap<&'a str, u32>,
        id_of: &'a (dyn Fn(u32) -> Option<&'a str> + Sync),
    ) -> MeterLookup<'a> {
        MeterLookup {
            others: Others::Map(map),
            id_of,
            elsewhere: None,
        }
    }

    /// The index of `id`; `prev` is the index of the last known meter seen.
    pub fn find(&self, id: &str, prev: Option<u32>) -> Option<u32> {
        let mut at = prev;
        self.find_from(id, &mut at)
    }

    /// [`MeterLookup::find`], leaving in `prev` an index at or below `id`
    /// for the next, larger id of a sorted file: the meter found, or after
    /// a miss the last meter below `id` (so a run of absent ids, such as
    /// another pass's meters, is searched from where the last one was).
    pub fn find_from(&self, id: &str, prev: &mut Option<u32>) -> Option<u32> {
        let next = prev
            .map(|p| p + 1)
            .filter(|&n| (self.id_of)(n).is_some_and(|x| same_id(x.as_bytes(), id.as_bytes())));
        let found = next.or_else(|| match self.others {
            Others::Map(map) => map.get(id).copied(),
            Others::Sorted(n) => match search_from(n, *prev, id, self.id_of) {
                Ok(at) => Some(at),
                Err(at) => {
                    *prev = at.checked_sub(1);
                    None
                }
            },
        });
        if found.is_some() {
            *prev = found;
        }
        found
    }
}

/// `id` among `n` ascending ids, as `slice::binary_search` answers (Ok: its
/// index; Err: where it would be), searched from `from` ([`partition_from`]).
pub fn search_from<'a>(
    n: u32,
    from: Option<u32>,
    id: &str,
    id_of: impl Fn(u32) -> Option<&'a str>,
) -> Result<u32, u32> {
    let key = id.as_bytes();
    let at = partition_from(n, from, |i| id_of(i).is_some_and(|x| x.as_bytes() < key));
    match id_of(at) {
        Some(x) if x.as_bytes() == key => Ok(at),
        _ => Err(at),
    }
}

/// The first of `n` indexes whose item is not `below` the key (items
/// ascending, so `below` holds for a prefix): galloping on from `from` (the
/// usual search is for an item a few places on), then a binary search of
/// the range that leaves (all indexes before `from` when the key sorts
/// before its item).
pub fn partition_from(n: u32, from: Option<u32>, below: impl Fn(u32) -> bool) -> u32 {
    // Every index before `lo` is below the key, none from `hi` on.
    let (mut lo, mut hi) = (0u32, n);
    if let Some(p) = from.filter(|&p| p < n) {
        if below(p) {
            lo = p + 1;
            let mut step = 1u32;
            while let Some(probe) = lo.checked_add(step - 1).filter(|&x| x < hi) {
                if !below(probe) {
                    hi = probe;
                    break;
                }
                lo = probe + 1;
                step = step.saturating_mul(2);
            }
        } else {
            hi = p;
        }
    }
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if below(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Equality of two short ids without a libc `memcmp` or `memcpy` call per
/// row: ids of 8 to 16 bytes (meter ids are 12 digits) are compared as two
/// overlapping 8-byte words.
#[inline]
pub fn same_id(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    if (8..=16).contains(&n) {
        let word = |s: &[u8], at: usize| u64::from_le_bytes(s[at..at + 8].try_into().unwrap());
        return word(a, 0) == word(b, 0) && word(a, n - 8) == word(b, n - 8);
    }
    a == b
}

/// What a row's meter id resolved to.
#[derive(Clone, Copy)]
enum Hit {
    Meter(u32),
    /// A meter billed in another pass.
    Elsewhere,
    Unknown,
}

impl Scanner<'_> {
    pub fn decode(&self, unit: &Unit) -> Result<Chunk, StoreError> {
        let mut c = Chunk::default();
        self.decode_into(unit, None, &mut c)?;
        Ok(c)
    }

    /// Like [`Scanner::decode`], reusing `out`'s buffers (no fresh pages per
    /// unit), reading only the rows of `sel` when given.
    pub fn decode_into(
        &self,
        unit: &Unit,
        sel: Option<&Selection>,
        out: &mut Chunk,
    ) -> Result<(), StoreError> {
        let rows = match sel {
            Some(s) => s.rows.iter().map(|r| r.len()).sum(),
            None => unit.num_rows(),
        };
        // One buffer in file order: a file sorted by meter (the lake's
        // own) gives its rows in shard order already, however few shards a
        // row group's meters fall in; any other is sorted by shard below.
        out.routed.clear();
        // (Capped: the count comes from a file's footer.)
        out.routed.reserve(rows.min(1 << 22));
        // Whether shards never went down so far, and the last row's shard.
        let (mut in_order, mut top) = (true, 0usize);
        out.unknown.clear();
        out.rows = 0;
        // Selected rows before the current batch.
        let mut base = 0usize;
        for_each_view(unit, &SCAN_COLUMNS, sel, |batch, v| {
            let (mid, ts, val, ck, qk) = (v.meter_id, v.ts, v.value, v.channel.0, v.quality.0);
            let ch_map: Vec<Option<Channel>> = v
                .channels()
                .into_iter()
                .map(|c| c.filter(|c| (self.keep)(*c)))
                .collect();
            let q_map = v.qualities();
            let n = batch.num_rows();
            out.rows += n as u64;
            // The previous resolved row and what its id resolved to.
            let mut last: Option<(usize, Hit)> = None;
            // Where the last meter search ended (see `MeterLookup::find_from`).
            let mut prev: Option<u32> = None;
            let mut elsewhere_at = 0u32;
            // The index range of the previous row's shard.
            let (mut shard_lo, mut shard_hi) = (1u32, 0u32);
            for i in 0..n {
                let t = ts[i];
                if t < self.lo || t > self.hi {
                    continue;
                }
                let Some(Some(channel)) = ch_map.get(ck[i] as usize).copied() else {
                    continue;
                };
                let hit = match last {
                    Some((j, h)) if mid.same(j, i) => h,
                    _ => {
                        let id = mid.value(i);
                        let h = match self.meters.find_from(id, &mut prev) {
                            Some(m) => Hit::Meter(m),
                            None if self
                                .meters
                                .elsewhere
                                .is_some_and(|f| f(id, &mut elsewhere_at)) =>
                            {
                                Hit::Elsewhere
                            }
                            None => Hit::Unknown,
                        };
                        last = Some((i, h));
                        h
                    }
                };
                let m = match hit {
                    Hit::Meter(m) => m,
                    Hit::Elsewhere => continue,
                    Hit::Unknown => {
                        let id = mid.value(i);
                        if sel.is_none_or(|s| s.counts_unknown(s.unit_row(base + i))) {
                            match out.unknown.last_mut() {
                                Some((u, c)) if u == id => *c += 1,
                                _ => out.unknown.push((id.to_string(), 1)),
                            }
                        }
                        continue;
                    }
                };
                let quality = q_map
                    .get(qk[i] as usize)
                    .copied()
                    .unwrap_or(Quality::SUSPECT);
                if m < shard_lo || m > shard_hi {
                    let shard = (m / self.shard_len) as usize;
                    in_order &= shard >= top;
                    top = shard;
                    shard_lo = shard as u32 * self.shard_len;
                    shard_hi = shard_lo + (self.shard_len - 1);
                }
                out.routed.push(Row {
                    meter: m,
                    channel,
                    quality,
                    ts: t,
                    value: val[i],
                });
            }
            base += n;
            Ok::<(), StoreError>(())
        })?;
        let shard_of = |r: &Row| (r.meter / self.shard_len) as usize;
        if !in_order {
            // Stable: rows of a shard keep their file order.
            out.routed.sort_by_key(shard_of);
        }
        out.ends.clear();
        out.ends
            .extend((0..self.shards).map(|s| out.routed.partition_point(|r| shard_of(r) <= s)));
        Ok(())
    }
}

/// Meters per shard for `meters` meters over `shards` shards (at least 1).
pub fn shard_len(meters: usize, shards: usize) -> u32 {
    meters.div_ceil(shards.max(1)).max(1) as u32
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    use crate::model::{Protocol, Reading, Source};
    use crate::store::{Lake, LakeOptions};

    /// Every readings file of a test lake.
    fn all_readings_files(root: &std::path::Path) -> Vec<(NaiveDate, std::path::PathBuf)> {
        crate::store::reader::list_files(
            root,
            crate::store::schema::READINGS,
            NaiveDate::MIN,
            NaiveDate::MAX,
        )
        .unwrap()
    }

    pub(crate) fn reading(meter: &str, ts: i64, ch: Channel, v: i64, q: Quality) -> Reading {
        Reading {
            meter_id: meter.into(),
            ts_ms: ts,
            channel: ch,
            value: rust_decimal::Decimal::new(v, 4),
            quality: q,
            source: Source {
                protocol: Protocol::Sim,
                collector: "t".into(),
                address: "".into(),
            },
            received_ms: ts,
        }
    }

    #[test]
    fn rows_resolve_to_meter_indexes_by_shard_and_unknown_meters_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut lake = Lake::open(dir.path(), LakeOptions::new("t")).unwrap();
        let day = 1_790_000_000_000i64;
        let mut rs = Vec::new();
        for (m, id) in ["A", "B", "C", "X"].iter().enumerate() {
            rs.push(reading(
                id,
                day,
                Channel::ImportActiveTotal,
                10 + m as i64,
                Quality::OK,
            ));
            rs.push(reading(id, day, Channel::VoltageA, 2200, Quality::OK));
            rs.push(reading(
                id,
                day + 1,
                Channel::ImportActiveT1,
                7,
                Quality::ESTIMATED,
            ));
        }
        lake.accept(&rs).unwrap();
        lake.flush().unwrap();
        let files = all_readings_files(dir.path());
        let index: FxMap<&str, u32> = [("A", 0u32), ("B", 1), ("C", 2)].into_iter().collect();
        let ids = ["A", "B", "C"];
        let id_of = |i: u32| ids.get(i as usize).copied();
        let sc = Scanner {
            meters: MeterLookup::with_map(&index, &id_of),
            shard_len: shard_len(3, 2),
            shards: 2,
            lo: day,
            hi: day + 1,
            keep: |c| c != Channel::VoltageA,
        };
        let mut shards = vec![Vec::new(); 2];
        let mut unknown = Vec::new();
        let mut rows = 0;
        for u in units(&files).unwrap() {
            let c = sc.decode(&u).unwrap();
            rows += c.rows;
            for (s, v) in c.shards().enumerate() {
                shards[s].extend_from_slice(v);
            }
            unknown.extend(c.unknown);
        }
        assert_eq!(rows, 12);
        assert_eq!(unknown, vec![("X".to_string(), 2)]);
        assert_eq!(shards[0].len(), 4, "A and B");
        assert_eq!(shards[1].len(), 2, "C");
        assert_eq!(
            shards[1][1],
            Row {
                meter: 2,
                channel: Channel::ImportActiveT1,
                quality: Quality::ESTIMATED,
                ts: day + 1,
                value: 7
            }
        );
    }

    #[test]
    fn register_values_scan_as_the_stored_integers_to_the_extremes() {
        let dir = tempfile::tempdir().unwrap();
        let mut lake = Lake::open(dir.path(), LakeOptions::new("t")).unwrap();
        let day = 1_790_000_000_000i64;
        let max = 999_999_999_999_999_999i64; // 18 digits at scale 4
        let values = [max, -max, 0, 1, -1, 123_456_789];
        let rs: Vec<Reading> = values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                reading(
                    "A",
                    day + i as i64,
                    Channel::ImportActiveTotal,
                    *v,
                    Quality::OK,
                )
            })
            .collect();
        lake.accept(&rs).unwrap();
        lake.flush().unwrap();
        let index: FxMap<&str, u32> = [("A", 0u32)].into_iter().collect();
        let id_of = |i: u32| (i == 0).then_some("A");
        let sc = Scanner {
            meters: MeterLookup::with_map(&index, &id_of),
            shard_len: shard_len(1, 1),
            shards: 1,
            lo: day,
            hi: day + 10,
            keep: |_| true,
        };
        let mut got = Vec::new();
        for u in units(&all_readings_files(dir.path())).unwrap() {
            got.extend_from_slice(sc.decode(&u).unwrap().shard(0));
        }
        let got: Vec<i64> = got.iter().map(|r| r.value).collect();
        assert_eq!(got, values);
    }

    /// A lake file of one reading, rewritten as `name` with `value` as
    /// DECIMAL(`precision`, `scale`) holding the integer `stored`.
    fn file_with_value_column(
        dir: &Path,
        name: &str,
        precision: u8,
        scale: i8,
        stored: i128,
    ) -> (NaiveDate, PathBuf) {
        use arrow::array::{ArrayRef, Decimal128Array};
        let mut lake = Lake::open(dir, LakeOptions::new("t")).unwrap();
        lake.accept(&[reading(
            "A",
            1_790_000_000_000,
            Channel::ImportActiveTotal,
            5,
            Quality::OK,
        )])
        .unwrap();
        lake.flush().unwrap();
        let (date, good) = all_readings_files(dir).remove(0);
        let batch = crate::store::reader::read_file(&good).unwrap().remove(0);
        let ty = DataType::Decimal128(precision, scale);
        let fields: Vec<Field> = batch
            .schema()
            .fields()
            .iter()
            .map(|f| match f.name().as_str() {
                "value" => Field::new("value", ty.clone(), false),
                _ => f.as_ref().clone(),
            })
            .collect();
        let mut cols: Vec<ArrayRef> = batch.columns().to_vec();
        cols[crate::store::schema::col::VALUE] = Arc::new(
            Decimal128Array::from(vec![stored])
                .with_precision_and_scale(precision, scale)
                .unwrap(),
        );
        let batch =
            arrow::record_batch::RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap();
        let path = good.with_file_name(name);
        crate::store::atomic::write_parquet_atomic(&path, batch.schema(), &[batch]).unwrap();
        (date, path)
    }

    #[test]
    fn a_file_with_wider_values_than_the_lake_is_refused_not_truncated() {
        let dir = tempfile::tempdir().unwrap();
        // DECIMAL(20, 4) is stored as fixed-length bytes.
        let bad =
            file_with_value_column(dir.path(), "wide.parquet", 20, VALUE_SCALE, 10i128.pow(19));
        let err = units(&[bad]).err().expect("refused").to_string();
        assert!(err.contains("precision 20"), "{err}");
    }

    #[test]
    fn a_file_whose_values_have_another_scale_is_refused_not_read_off_by_powers_of_ten() {
        let dir = tempfile::tempdir().unwrap();
        // DECIMAL(12, 2), as another tool may write it: 1234.56 kWh stored
        // as the integer 123456.
        let bad = file_with_value_column(dir.path(), "cents.parquet", 12, 2, 123_456);
        let err = units(&[bad]).err().expect("refused").to_string();
        assert!(
            err.contains("scale 2") && err.contains("cents.parquet"),
            "{err}"
        );
    }

    /// Whether a unit's reader hands `meter_id` back as a dictionary.
    fn reads_ids_as_keys(u: &Unit) -> bool {
        matches!(
            u.meta
                .schema()
                .field_with_name("meter_id")
                .unwrap()
                .data_type(),
            DataType::Dictionary(..)
        )
    }

    #[test]
    fn ids_are_read_as_keys_only_from_row_groups_whose_pages_are_all_dictionary_encoded() {
        use crate::store::columns::ReadingsBuilder;
        use parquet::arrow::ArrowWriter;
        use parquet::file::properties::WriterProperties;
        use parquet::schema::types::ColumnPath;
        let dir = tempfile::tempdir().unwrap();
        let day = 1_790_000_000_000i64;
        let date = NaiveDate::from_ymd_opt(2026, 9, 21).unwrap();
        // 3,000 meters, two registers each, sorted as the lake sorts; ids
        // of odd meters are unknown to the index below.
        let mut b = ReadingsBuilder::with_capacity(6000);
        for m in 0..3000 {
            for ch in [Channel::ImportActiveTotal, Channel::ImportActiveT1] {
                let r = reading(&format!("{m:012}"), day, ch, m, Quality::OK);
                b.push(&r).unwrap();
            }
        }
        let batch = b.finish();
        let id = ColumnPath::from("meter_id");
        // meterflow's lake: prefix-encoded ids.
        let prefix = crate::store::atomic::writer_properties_for(&batch.schema());
        // Another writer's (pyarrow's, DuckDB's default): a dictionary.
        let dictionary = WriterProperties::builder()
            .set_column_dictionary_enabled(id.clone(), true)
            .set_data_page_row_count_limit(500)
            .build();
        // A dictionary that overflows after a few hundred ids: later pages
        // fall back to plain encoding.
        let overflowing = WriterProperties::builder()
            .set_column_dictionary_page_size_limit(id, 4096)
            .set_data_page_row_count_limit(500)
            .build();
        let write = |name: &str, props: WriterProperties| {
            let path = dir.path().join(name);
            let file = File::create(&path).unwrap();
            let mut w = ArrowWriter::try_new(file, batch.schema(), Some(props)).unwrap();
            w.write(&batch).unwrap();
            w.close().unwrap();
            units_with_page_index(&[(date, path)]).unwrap()
        };
        let lake = write("lake.parquet", prefix);
        let dict = write("dict.parquet", dictionary);
        let mixed = write("mixed.parquet", overflowing);
        assert!(dict.iter().all(reads_ids_as_keys));
        assert!(!lake.iter().any(reads_ids_as_keys));
        assert!(
            !mixed.iter().any(reads_ids_as_keys),
            "some pages are not dictionary-encoded"
        );
        assert!(lake.iter().all(|u| id_runs(u, None).unwrap().is_some()));
        assert!(dict
            .iter()
            .chain(&mixed)
            .all(|u| id_runs(u, None).unwrap().is_none()));
        let ids: Vec<String> = (0..3000).step_by(2).map(|m| format!("{m:012}")).collect();
        let index: FxMap<&str, u32> = ids
            .iter()
            .zip(0u32..)
            .map(|(i, n)| (i.as_str(), n))
            .collect();
        let id_of = |i: u32| ids.get(i as usize).map(String::as_str);
        let sc = Scanner {
            meters: MeterLookup::with_map(&index, &id_of),
            shard_len: shard_len(ids.len(), 4),
            shards: 4,
            lo: day,
            hi: day,
            keep: |_| true,
        };
        #[derive(Default)]
        struct All {
            rows: u64,
            unknown: Vec<(String, u64)>,
            shards: Vec<Vec<Row>>,
        }
        let scan = |units: &[Unit]| {
            let mut all = All::default();
            for u in units {
                let c = sc.decode(u).unwrap();
                all.rows += c.rows;
                all.shards.resize_with(c.ends.len(), Vec::new);
                for (s, v) in c.shards().enumerate() {
                    all.shards[s].extend_from_slice(v);
                }
                all.unknown.extend(c.unknown);
            }
            all
        };
        let (a, b, c) = (scan(&dict), scan(&lake), scan(&mixed));
        assert_eq!(a.rows, 6000);
        assert_eq!(a.unknown.len(), 1500);
        assert_eq!(a.unknown[0], ("000000000001".to_string(), 2));
        assert_eq!(a.shards.iter().map(Vec::len).sum::<usize>(), 3000);
        assert_eq!(a.shards[1][0].meter, shard_len(ids.len(), 4));
        assert_eq!(a.shards[1][0].value, 2 * i64::from(shard_len(ids.len(), 4)));
        for other in [&b, &c] {
            assert_eq!(a.rows, other.rows);
            assert_eq!(a.unknown, other.unknown);
            assert_eq!(a.shards, other.shards);
        }
        // And a pass reading some pages only reads the same rows either way.
        let some = |units: &[Unit]| {
            let mut rows = Vec::new();
            for u in units {
                let pages = u.id_pages();
                let mut seen = vec![false; pages.len()];
                let wanted = ["000000001000", "000000001002"];
                let sel = select_pages(
                    &pages,
                    |_, p: &IdPage| p.may_hold(&wanted),
                    &mut seen,
                    false,
                );
                let mut c = Chunk::default();
                sc.decode_into(u, sel.as_ref(), &mut c).unwrap();
                rows.extend(c.shards().flatten().copied());
            }
            rows
        };
        let (a, b) = (some(&dict), some(&mixed));
        assert!(a.len() < 3000, "only some pages: {} rows", a.len());
        let wanted = |v: Vec<Row>| -> Vec<Row> {
            v.into_iter()
                .filter(|r| r.meter == 500 || r.meter == 501)
                .collect()
        };
        let (a, b) = (wanted(a), wanted(b));
        assert_eq!(a.len(), 4);
        assert_eq!(a, b);
    }

    #[test]
    fn prefix_encoded_ids_are_read_from_the_pages_as_runs_whatever_the_page_layout() {
        use parquet::arrow::ArrowWriter;
        use parquet::basic::Encoding;
        use parquet::file::properties::{WriterProperties, WriterVersion};
        let dir = tempfile::tempdir().unwrap();
        let date = NaiveDate::from_ymd_opt(2026, 9, 21).unwrap();
        // Runs of 1 to 5 equal ids of varied lengths, cut by pages of 7 rows.
        let mut ids: Vec<String> = Vec::new();
        for m in 0..400u32 {
            let id = format!("{}{m:05}", "9".repeat((m % 4) as usize));
            ids.extend(std::iter::repeat_n(id, 1 + (m % 5) as usize));
        }
        // One long run past the reader's first 65,536-row batch.
        ids.extend(std::iter::repeat_n("8".to_string(), 70_000));
        ids.sort();
        let write = |name: &str, encoding: Encoding, version: WriterVersion| {
            let mut b = crate::store::columns::ReadingsBuilder::with_capacity(ids.len());
            for (k, id) in ids.iter().enumerate() {
                let r = reading(id, k as i64, Channel::ImportActiveTotal, 1, Quality::OK);
                b.push(&r).unwrap();
            }
            let batch = b.finish();
            let schema = batch.schema();
            let props = WriterProperties::builder()
                .set_writer_version(version)
                .set_dictionary_enabled(false)
                .set_column_encoding("meter_id".into(), encoding)
                .set_data_page_row_count_limit(7)
                .set_write_batch_size(7)
                .build();
            let path = dir.path().join(name);
            let mut w =
                ArrowWriter::try_new(File::create(&path).unwrap(), schema, Some(props)).unwrap();
            w.write(&batch).unwrap();
            w.close().unwrap();
            units(&[(date, path)]).unwrap()
        };
        let delta = Encoding::DELTA_BYTE_ARRAY;
        for (name, encoding, version, runs) in [
            ("v1.parquet", delta, WriterVersion::PARQUET_1_0, true),
            ("v2.parquet", delta, WriterVersion::PARQUET_2_0, true),
            (
                "plain.parquet",
                Encoding::PLAIN,
                WriterVersion::PARQUET_1_0,
                false,
            ),
        ] {
            let us = write(name, encoding, version);
            assert_eq!(us.len(), 1);
            let got = id_runs(&us[0], None).unwrap();
            assert_eq!(got.is_some(), runs, "{name}");
            if let Some((keys, texts)) = &got {
                // One run per distinct id, though pages cut runs.
                assert_eq!(texts.len(), 401, "{name}");
                assert_eq!(keys.len(), ids.len());
            }
            let mut seen: Vec<String> = Vec::new();
            let mut same = 0;
            for_each_view(&us[0], &SCAN_COLUMNS, None, |b, v| {
                assert_eq!(b.column_by_name("meter_id").is_none(), runs, "{name}");
                for i in 0..b.num_rows() {
                    same += usize::from(i > 0 && v.meter_id.same(i - 1, i));
                    seen.push(v.meter_id.value(i).to_string());
                }
                Ok::<(), StoreError>(())
            })
            .unwrap();
            assert_eq!(seen, ids, "{name}");
            // Neighbours in one batch; the 70,000-row run spans two.
            assert_eq!(same, ids.len() - 401 - 1, "{name}");
        }
    }

    #[test]
    fn the_next_meter_is_found_without_the_map_and_gaps_fall_back_to_the_map_or_a_search() {
        let dir = tempfile::tempdir().unwrap();
        let mut lake = Lake::open(dir.path(), LakeOptions::new("t")).unwrap();
        let day = 1_790_000_000_000i64;
        let rs: Vec<Reading> = ["A", "C", "Cz", "D", "E"]
            .iter()
            .enumerate()
            .map(|(v, id)| reading(id, day, Channel::ImportActiveTotal, v as i64, Quality::OK))
            .collect();
        lake.accept(&rs).unwrap();
        lake.flush().unwrap();
        let files = all_readings_files(dir.path());
        let ids = ["A", "B", "C", "D", "E"];
        let index: FxMap<&str, u32> = ids.iter().zip(0u32..).map(|(i, n)| (*i, n)).collect();
        // A map that only knows where the sequence breaks: the others must
        // be found as the next meter.
        let sparse: FxMap<&str, u32> = [("A", 0u32), ("C", 2)].into_iter().collect();
        let id_of = |i: u32| ids.get(i as usize).copied();
        for (others, name) in [
            (Others::Map(&index), "full map"),
            (Others::Map(&sparse), "sparse map"),
            (Others::Sorted(5), "sorted ids, no map"),
        ] {
            let sc = Scanner {
                meters: MeterLookup {
                    others,
                    id_of: &id_of,
                    elsewhere: None,
                },
                shard_len: shard_len(5, 1),
                shards: 1,
                lo: day,
                hi: day,
                keep: |_| true,
            };
            let mut got = Vec::new();
            let mut unknown = Vec::new();
            for u in units(&files).unwrap() {
                let c = sc.decode(&u).unwrap();
                got.extend(c.shard(0).iter().map(|r| (r.meter, r.value)));
                unknown.extend(c.unknown);
            }
            assert_eq!(got, vec![(0, 0), (2, 1), (3, 3), (4, 4)], "{name}");
            assert_eq!(unknown, vec![("Cz".to_string(), 1)], "{name}");
        }
    }

    #[test]
    fn sorted_ids_are_found_from_any_previous_meter_and_absent_ones_are_not() {
        // Ids with gaps between them (the odd numbers are absent), and ids
        // before the first, between any two and after the last.
        for n in [0usize, 1, 2, 3, 7, 64, 100] {
            let ids: Vec<String> = (0..n).map(|i| format!("{:04}", 2 * i + 2)).collect();
            let id_of = |i: u32| ids.get(i as usize).map(String::as_str);
            let ix = MeterLookup {
                others: Others::Sorted(n as u32),
                id_of: &id_of,
                elsewhere: None,
            };
            let prevs = std::iter::once(None).chain((0..n as u32 + 2).map(Some));
            for prev in prevs {
                for q in 0..2 * n + 4 {
                    let id = format!("{q:04}");
                    let want = (q >= 2 && q % 2 == 0 && q <= 2 * n).then(|| (q / 2 - 1) as u32);
                    assert_eq!(ix.find(&id, prev), want, "n {n}, id {id}, prev {prev:?}");
                }
            }
        }
    }

    #[test]
    fn partition_points_are_found_from_any_start() {
        for n in [0u32, 1, 2, 5, 64, 100] {
            let items: Vec<u32> = (0..n).map(|i| 2 * i + 2).collect();
            for key in 0..2 * n + 4 {
                let want = items.partition_point(|&x| x < key) as u32;
                let starts = std::iter::once(None).chain((0..n + 2).map(Some));
                for from in starts {
                    let got = partition_from(n, from, |i| items[i as usize] < key);
                    assert_eq!(got, want, "n {n}, key {key}, from {from:?}");
                }
            }
        }
    }

    #[test]
    fn a_run_of_absent_ids_is_searched_on_from_the_last_miss() {
        // 100,000 ids in the index; a run of 20,000 absent ids between them
        // in file order, as another pass's meters come. Each is found absent
        // a few probes on from the one before, not by a search from the
        // last meter found (thousands of places back) or of all of them.
        let ids: Vec<String> = (0..100_000).map(|i| format!("{:08}", 10 * i)).collect();
        let probes = std::sync::atomic::AtomicUsize::new(0);
        let id_of = |i: u32| {
            probes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            ids.get(i as usize).map(String::as_str)
        };
        let ix = MeterLookup {
            others: Others::Sorted(ids.len() as u32),
            id_of: &id_of,
            elsewhere: None,
        };
        let mut prev = Some(4_000);
        assert_eq!(ix.find_from("00040000", &mut prev), Some(4_000));
        for q in 40_000..60_000u32 {
            let id = format!("{:08}", 10 * q + 5);
            assert_eq!(ix.find_from(&id, &mut prev), None, "{id}");
            assert_eq!(prev, Some(q), "{id}: the last meter below it");
        }
        // The next meter's check, the gallop's two probes and the equality
        // check: about 6 (searched from the last meter found: 34).
        let per = probes.load(std::sync::atomic::Ordering::Relaxed) as f64 / 20_000.0;
        assert!(per < 8.0, "{per} probes per id");
        // And the meter after the run is found from there.
        assert_eq!(ix.find_from("00600000", &mut prev), Some(60_000));
    }

    #[test]
    fn ids_compare_equal_exactly_when_their_bytes_do() {
        let ids: Vec<Vec<u8>> = (0..=20usize)
            .flat_map(|n| {
                let base: Vec<u8> = (0..n).map(|i| b'0' + (i % 10) as u8).collect();
                // The same length differing in the first, a middle and the last byte.
                let mut v = vec![base.clone()];
                for at in [0, n / 2, n.saturating_sub(1)] {
                    if n > 0 {
                        let mut x = base.clone();
                        x[at] ^= 1;
                        v.push(x);
                    }
                }
                v
            })
            .collect();
        for a in &ids {
            for b in &ids {
                assert_eq!(same_id(a, b), a == b, "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn a_scan_view_interprets_each_distinct_channel_and_quality_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut lake = Lake::open(dir.path(), LakeOptions::new("t")).unwrap();
        let day = 1_790_000_000_000i64;
        let suspect = Quality::SUSPECT | Quality::ESTIMATED;
        lake.accept(&[
            reading("A", day, Channel::ImportActiveTotal, 12_345, Quality::OK),
            reading("A", day + 1, Channel::ImportActiveTotal, 12_346, suspect),
            reading("B", day, Channel::VoltageA, 2200, Quality::OK),
        ])
        .unwrap();
        lake.flush().unwrap();
        let files = all_readings_files(dir.path());
        let mut rows = Vec::new();
        for u in units(&files).unwrap() {
            for b in unit_batches(&u, &SCAN_COLUMNS, None).unwrap() {
                let b = b.unwrap();
                let v = ScanView::new(&b, &u.path).unwrap();
                let (channels, qualities) = (v.channels(), v.qualities());
                assert!(
                    channels.len() <= 2 && qualities.len() <= 2,
                    "one entry per distinct value"
                );
                for i in 0..b.num_rows() {
                    rows.push((
                        v.meter_id.value(i).to_string(),
                        v.ts[i],
                        v.value[i],
                        channels[v.channel.0[i] as usize],
                        qualities[v.quality.0[i] as usize],
                    ));
                }
                // A batch without the columns of a scan is refused, naming the column.
                let bare = b.project(&[0]).unwrap();
                let e = ScanView::new(&bare, &u.path).err().unwrap().to_string();
                assert!(e.contains("ts"), "{e}");
            }
        }
        rows.sort();
        assert_eq!(
            rows,
            vec![
                (
                    "A".into(),
                    day,
                    12_345,
                    Some(Channel::ImportActiveTotal),
                    Quality::OK
                ),
                (
                    "A".into(),
                    day + 1,
                    12_346,
                    Some(Channel::ImportActiveTotal),
                    suspect
                ),
                ("B".into(), day, 2200, Some(Channel::VoltageA), Quality::OK),
            ]
        );
    }

    fn page(rows: std::ops::Range<usize>, lo: &str, hi: &str) -> IdPage {
        IdPage {
            rows,
            min: Some(lo.as_bytes().to_vec()),
            max: Some(hi.as_bytes().to_vec()),
        }
    }

    #[test]
    fn a_pass_reads_only_the_pages_that_can_hold_its_meters_and_the_last_reads_the_rest() {
        let pages = vec![
            page(0..10, "a", "c"),
            page(10..20, "c", "f"),
            page(20..30, "g", "h"),
            page(30..40, "x", "z"),
        ];
        let mut seen = vec![false; 4];
        const FIRST: [&str; 2] = ["b", "e"];
        let wanted = |ids: &'static [&'static str]| move |_, p: &IdPage| p.may_hold(ids);
        let s = select_pages(&pages, wanted(&FIRST), &mut seen, false).unwrap();
        assert_eq!(s.rows, vec![0..20], "adjacent pages merge");
        assert_eq!(s.count_unknown, vec![0..20]);
        // The second pass shares page 1 with the first: it reads it, but the
        // first pass counted its unknown ids.
        const SECOND: [&str; 2] = ["d", "g"];
        let s = select_pages(&pages, wanted(&SECOND), &mut seen, false).unwrap();
        assert_eq!(s.rows, vec![10..30]);
        assert_eq!(s.count_unknown, vec![20..30]);
        // The last pass wants nothing, but takes the page nobody read.
        let s = select_pages(&pages, wanted(&[]), &mut seen, true).unwrap();
        assert_eq!(s.rows, vec![30..40]);
        assert_eq!(s.count_unknown, vec![30..40]);
        assert!(seen.iter().all(|s| *s));
        // A pass with nothing to read gets nothing.
        assert_eq!(select_pages(&pages, wanted(&["q"]), &mut seen, true), None);
        // A page without statistics is read by every pass.
        let bare = vec![IdPage {
            rows: 0..5,
            min: None,
            max: None,
        }];
        let mut seen = vec![false];
        let whole = &[std::ops::Range { start: 0, end: 5 }][..];
        for (last, counts) in [(false, whole), (true, &[][..])] {
            let s = select_pages(&bare, wanted(&[]), &mut seen, last).unwrap();
            assert_eq!((&s.rows[..], &s.count_unknown[..]), (whole, counts));
        }
    }

    #[test]
    fn a_selection_covers_a_page_wholly_not_at_all_or_in_part() {
        let s = Selection {
            rows: vec![10..20, 30..40],
            count_unknown: vec![],
        };
        assert_eq!(s.covers(10..20), Some(true));
        assert_eq!(s.covers(12..15), Some(true));
        assert_eq!(s.covers(0..10), Some(false));
        assert_eq!(s.covers(20..30), Some(false));
        assert_eq!(s.covers(40..50), Some(false));
        assert_eq!(s.covers(15..25), None);
        assert_eq!(s.covers(25..35), None);
    }

    #[test]
    fn passes_over_a_multi_page_file_read_each_meter_once_and_count_unknown_meters_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut lake = Lake::open(dir.path(), LakeOptions::new("t")).unwrap();
        let day = 1_790_000_000_000i64;
        // 30,000 meters, two readings each: the writer cuts `meter_id` pages
        // at 20,000 rows, so the file has several pages.
        let id = |m: usize| format!("{:06}", m * 2);
        let mut rs = Vec::new();
        for m in 0..30_000 {
            for k in 0..2 {
                rs.push(reading(
                    &id(m),
                    day + k,
                    Channel::ImportActiveTotal,
                    m as i64,
                    Quality::OK,
                ));
            }
        }
        // Unknown ids (odd) in the first page, the middle and the last page.
        for u in ["000001", "030001", "059999"] {
            rs.push(reading(u, day, Channel::ImportActiveTotal, 1, Quality::OK));
        }
        lake.accept(&rs).unwrap();
        lake.flush().unwrap();
        let units = units_with_page_index(&all_readings_files(dir.path())).unwrap();
        let pages: Vec<Vec<IdPage>> = units.iter().map(Unit::id_pages).collect();
        assert!(pages.iter().map(Vec::len).sum::<usize>() >= 3, "{pages:?}");
        let mut seen: Vec<Vec<bool>> = pages.iter().map(|p| vec![false; p.len()]).collect();
        let all: Vec<String> = (0..30_000).map(id).collect();
        let all_refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let elsewhere = |x: &str, _: &mut u32| all_refs.binary_search(&x).is_ok();
        // Three passes of 10,000 meters each.
        let mut per_meter = vec![0u32; 30_000];
        let mut unknown: Vec<(String, u64)> = Vec::new();
        for pass in 0..3 {
            let ids: Vec<&str> = all_refs[pass * 10_000..(pass + 1) * 10_000].to_vec();
            let id_of = |i: u32| ids.get(i as usize).copied();
            // As the bill run looks them up: sorted, no map.
            let sc = Scanner {
                meters: MeterLookup {
                    others: Others::Sorted(ids.len() as u32),
                    id_of: &id_of,
                    elsewhere: Some(&elsewhere),
                },
                shard_len: shard_len(ids.len(), 1),
                shards: 1,
                lo: day,
                hi: day + 10,
                keep: |_| true,
            };
            let mut read = 0;
            for (u, unit) in units.iter().enumerate() {
                let wanted = |_, p: &IdPage| p.may_hold(&ids);
                let Some(sel) = select_pages(&pages[u], wanted, &mut seen[u], pass == 2) else {
                    continue;
                };
                // The selected pages' ids are read from the pages as runs
                // (the others skipped unread), and equal the ids arrow-rs's
                // column reader gives for the same selection.
                let (keys, texts) = id_runs(unit, Some(&sel)).unwrap().expect("runs");
                let from_runs: Vec<&str> = keys.iter().map(|&k| texts.value(k as usize)).collect();
                let mut column = Vec::new();
                for b in unit_batches(unit, &["meter_id"], Some(&sel)).unwrap() {
                    let b = b.unwrap();
                    let a = b.column(0).as_any().downcast_ref::<StringArray>().unwrap();
                    column.extend((0..a.len()).map(|i| a.value(i).to_string()));
                }
                assert_eq!(from_runs, column, "pass {pass}, unit {u}");
                let mut c = Chunk::default();
                sc.decode_into(unit, Some(&sel), &mut c).unwrap();
                read += c.rows;
                for r in c.shard(0) {
                    per_meter[pass * 10_000 + r.meter as usize] += 1;
                }
                unknown.extend(c.unknown);
            }
            assert!(
                read < 60_003,
                "pass {pass} read only some pages ({read} rows)"
            );
        }
        assert!(
            per_meter.iter().all(|n| *n == 2),
            "every reading routed once"
        );
        unknown.sort();
        assert_eq!(
            unknown,
            vec![
                ("000001".to_string(), 1),
                ("030001".to_string(), 1),
                ("059999".to_string(), 1)
            ]
        );
    }

    /// Writes `ids` (one reading each, in this order) as one file with
    /// `meter_id` pages of `page_rows` rows, prefix-encoded unless
    /// `dictionary`; its units.
    pub(crate) fn file_of(
        dir: &std::path::Path,
        ids: &[String],
        page_rows: usize,
        dictionary: bool,
    ) -> Vec<Unit> {
        use crate::store::columns::ReadingsBuilder;
        use parquet::arrow::ArrowWriter;
        let day = 1_790_000_000_000i64;
        let mut b = ReadingsBuilder::with_capacity(ids.len());
        for (k, id) in ids.iter().enumerate() {
            let r = reading(id, day, Channel::ImportActiveTotal, k as i64, Quality::OK);
            b.push(&r).unwrap();
        }
        let batch = b.finish();
        let mut props = crate::store::atomic::base_properties()
            .set_data_page_row_count_limit(page_rows)
            .set_write_batch_size(page_rows);
        if dictionary {
            let id = parquet::schema::types::ColumnPath::from("meter_id");
            props = props
                .set_column_dictionary_enabled(id.clone(), true)
                .set_column_encoding(id, parquet::basic::Encoding::PLAIN);
        }
        let path = dir.join(format!("f{dictionary}.parquet"));
        let mut w = ArrowWriter::try_new(
            File::create(&path).unwrap(),
            batch.schema(),
            Some(props.build()),
        )
        .unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let date = NaiveDate::from_ymd_opt(2026, 9, 21).unwrap();
        units_with_page_index(&[(date, path)]).unwrap()
    }

    #[test]
    fn a_page_s_ids_are_read_from_the_page_alone_one_per_run() {
        let dir = tempfile::tempdir().unwrap();
        // 105 ids, each twice, then ids that jump far: pages of 50 rows.
        let mut ids: Vec<String> = (0..105)
            .flat_map(|m| [format!("3{m:05}"), format!("3{m:05}")])
            .collect();
        ids.extend((0..30).map(|m| format!("9{:05}", m * 7)));
        let units = file_of(dir.path(), &ids, 50, false);
        let pages = units[0].id_pages();
        assert_eq!(pages.len(), 5, "{pages:?}");
        let got = units[0].page_ids(&[1, 4]).unwrap();
        for (slot, p) in [1usize, 4].into_iter().enumerate() {
            let mut want: Vec<&str> = ids[pages[p].rows.clone()]
                .iter()
                .map(String::as_str)
                .collect();
            want.dedup();
            let texts = got[slot].as_ref().expect("prefix-encoded page");
            let read: Vec<&str> = texts.iter().flatten().collect();
            assert_eq!(read, want, "page {p}");
        }
        // The last page spans the jump: 300100.. and the 9.. ids.
        assert_eq!(pages[4].min.as_deref(), Some(&b"300100"[..]));
        assert_eq!(pages[4].max.as_deref(), Some(&b"900203"[..]));
        // Ids not prefix-encoded are left to min / max.
        let dict = file_of(dir.path(), &ids, 50, true);
        assert_eq!(dict[0].page_ids(&[0, 1]).unwrap(), vec![None, None]);
    }

    #[test]
    fn rows_of_a_file_out_of_meter_order_come_out_by_shard_in_file_order() {
        let dir = tempfile::tempdir().unwrap();
        let names = ["m0", "m1", "m2", "m3"];
        // Not sorted: shard 1 (m2, m3), then shard 0, then shard 1 again.
        let order = ["m3", "m2", "m0", "m1", "m0", "m2"];
        let ids: Vec<String> = order.iter().map(|s| s.to_string()).collect();
        let units = file_of(dir.path(), &ids, 1000, false);
        let id_of = |i: u32| names.get(i as usize).copied();
        let index: FxMap<&str, u32> = names.iter().copied().zip(0u32..).collect();
        let sc = Scanner {
            meters: MeterLookup::with_map(&index, &id_of),
            shard_len: 2,
            shards: 2,
            lo: i64::MIN,
            hi: i64::MAX,
            keep: |_| true,
        };
        let c = sc.decode(&units[0]).unwrap();
        let got = |s: usize| -> Vec<(u32, i64)> {
            c.shard(s).iter().map(|r| (r.meter, r.value)).collect()
        };
        // `value` is the row's place in the file.
        assert_eq!(got(0), vec![(0, 2), (1, 3), (0, 4)]);
        assert_eq!(got(1), vec![(3, 0), (2, 1), (2, 5)]);
        assert_eq!(c.shards().count(), 2);
        assert!(c.shard(2).is_empty());
    }

    #[test]
    fn ids_that_differ_only_in_their_middle_digits_spread_over_the_low_hash_bits() {
        // Hash tables index by the low bits. Before the final rotation these
        // followed only the ids' last bytes, and such ids fell into a few
        // dozen buckets.
        use std::hash::BuildHasher;
        let b = BuildHasherDefault::<Fx>::default();
        let low: FxSet<u64> = (0..100_000u64)
            .map(|i| b.hash_one(format!("A{:09}", i * 1000).as_str()) & 0xffff)
            .collect();
        assert!(low.len() > 40_000, "{} distinct low 16 bits", low.len());
    }
}
