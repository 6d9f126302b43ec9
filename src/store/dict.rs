//! Text columns written from dictionary keys.
//!
//! arrow-rs's Parquet writer interns every value of a text column (a hash
//! and a compare per row), even when it is handed a dictionary array. For
//! the columns whose values repeat row after row (a reading's channel, unit,
//! quality and source; a bill line's kind, label and tariff) the builders
//! already know each row's key, so [`DictChunk`] writes the column chunk
//! itself: one PLAIN dictionary page, then RLE_DICTIONARY data pages of the
//! keys, compressed like the rest of the file. It is what arrow-rs writes
//! for such a column (same page types and encodings; in a nullable column,
//! v1 pages whose definition levels come before the keys of the rows that
//! hold a text; pages split by the writer's row limit; chunk statistics, no
//! page statistics), so every reader sees an ordinary dictionary-encoded
//! string column.
//!
//! [`DictText`] builds such a column: a key per row, taken from the row
//! before when the text is the same object or equal (sorted rows, shared
//! `Arc<str>`s, `'static` names), else found by the text's address (texts
//! borrowed for the builder's life: tariff labels), else by its content.

use std::borrow::Cow;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanBufferBuilder, DictionaryArray, StringArray, UInt32Array,
};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{DataType, UInt32Type};
use bytes::Bytes;
use parquet::basic::{Compression, Encoding, EncodingMask, PageType};
use parquet::column::writer::ColumnCloseResult;
use parquet::data_type::ByteArray;
use parquet::errors::{ParquetError, Result};
use parquet::file::metadata::{ColumnChunkMetaData, PageEncodingStats};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::statistics::Statistics;
use parquet::schema::types::ColumnDescPtr;

use super::chunk::{self, Pages};
use super::scan::FxMap;

/// The Arrow type of a column [`DictChunk`] writes.
pub fn dict_type() -> DataType {
    DataType::Dictionary(Box::new(DataType::UInt32), Box::new(DataType::Utf8))
}

/// Places remembered by [`DictText`] (tariff labels and versions, names).
const MAX_PLACES: usize = 1024;

/// Keys of a text column, and its distinct texts in order of first use.
pub struct DictText<'a> {
    values: Vec<Cow<'a, str>>,
    /// Texts seen, by where they are: a text borrowed for `'a` stays put, so
    /// its address and length name it without reading it.
    by_place: FxMap<(usize, usize), u32>,
    by_text: FxMap<Cow<'a, str>, u32>,
    keys: Vec<u32>,
    /// Which rows hold a text, kept from the first null on.
    valid: Option<BooleanBufferBuilder>,
    last: Option<(&'a str, u32)>,
}

impl<'a> DictText<'a> {
    pub fn with_capacity(rows: usize) -> Self {
        DictText {
            values: Vec::new(),
            by_place: FxMap::default(),
            by_text: FxMap::default(),
            keys: Vec::with_capacity(rows),
            valid: None,
            last: None,
        }
    }

    fn push_key(&mut self, k: u32) {
        self.keys.push(k);
        if let Some(v) = &mut self.valid {
            v.append(true);
        }
    }

    pub fn push_opt(&mut self, text: Option<&'a str>) {
        match text {
            Some(t) => self.push(t),
            None => self.push_null(),
        }
    }

    /// A row without a text (a nullable column).
    pub fn push_null(&mut self) {
        let rows = self.keys.len();
        let valid = self.valid.get_or_insert_with(|| {
            let mut v = BooleanBufferBuilder::new(self.keys.capacity().max(rows + 1));
            v.append_n(rows, true);
            v
        });
        valid.append(false);
        self.keys.push(0);
    }

    pub fn push(&mut self, text: &'a str) {
        let place = (text.as_ptr() as usize, text.len());
        if let Some((t, k)) = self.last {
            // The text of the row before: the same object, or equal.
            if (t.as_ptr() as usize, t.len()) == place || t == text {
                self.push_key(k);
                return;
            }
        }
        let k = match self.by_place.get(&place) {
            Some(&k) => k,
            None => {
                let k = self.key(Cow::Borrowed(text));
                // Texts built per message (a reading's shared address) would
                // fill the map with places never seen again.
                if self.by_place.len() < MAX_PLACES {
                    self.by_place.insert(place, k);
                }
                k
            }
        };
        self.push_key(k);
        self.last = Some((text, k));
    }

    /// A text that may be owned (built for this row): found by its content,
    /// and copied only the first time.
    // A `&str` would lose which texts are borrowed for `'a` (kept by place).
    #[allow(clippy::ptr_arg)]
    pub fn push_cow(&mut self, text: &Cow<'a, str>) {
        match text {
            Cow::Borrowed(t) => self.push(t),
            Cow::Owned(t) => {
                let k = match self.by_text.get(t.as_str()) {
                    Some(&k) => k,
                    None => self.key(Cow::Owned(t.clone())),
                };
                self.push_key(k);
            }
        }
    }

    fn key(&mut self, text: Cow<'a, str>) -> u32 {
        if let Some(&k) = self.by_text.get(text.as_ref()) {
            return k;
        }
        let k = self.values.len() as u32;
        self.values.push(text.clone());
        self.by_text.insert(text, k);
        k
    }

    pub fn finish(self) -> ArrayRef {
        let values = StringArray::from_iter_values(self.values.iter());
        let nulls = self.valid.map(|mut v| NullBuffer::new(v.finish()));
        Arc::new(DictionaryArray::<UInt32Type>::new(
            UInt32Array::new(self.keys.into(), nulls),
            Arc::new(values),
        ))
    }
}

/// One column chunk of a text column, written from dictionary arrays.
pub struct DictChunk {
    descr: ColumnDescPtr,
    compression: Compression,
    statistics: bool,
    page_rows: usize,
    /// The chunk's dictionary, in order of first use.
    values: Vec<Box<[u8]>>,
    index: FxMap<Box<[u8]>, u32>,
    /// The keys of the rows holding a text.
    keys: Vec<u32>,
    /// An optional column's definition level per row (0: null, 1: a text).
    levels: Option<Vec<u8>>,
}

impl DictChunk {
    pub fn new(descr: ColumnDescPtr, props: &WriterProperties) -> Result<Self> {
        let path = descr.path();
        let compression = chunk::compression(&descr, props, "dictionary")?;
        if descr.max_def_level() > 1 || descr.max_rep_level() != 0 {
            return Err(ParquetError::General(format!(
                "dictionary column {path}: only flat columns are supported"
            )));
        }
        Ok(DictChunk {
            levels: (descr.max_def_level() == 1).then(Vec::new),
            statistics: props.statistics_enabled(path) != EnabledStatistics::None,
            page_rows: props.data_page_row_count_limit().max(1),
            compression,
            descr,
            values: Vec::new(),
            index: FxMap::default(),
            keys: Vec::new(),
        })
    }

    /// Appends the rows of a `Dictionary(UInt32, Utf8)` array (nulls only
    /// in an optional column).
    pub fn write(&mut self, array: &dyn Array) -> Result<()> {
        let Some(dict) = array.as_dictionary_opt::<UInt32Type>() else {
            return Err(ParquetError::General(format!(
                "dictionary column {}: expected Dictionary(UInt32, Utf8), got {}",
                self.descr.path(),
                array.data_type()
            )));
        };
        let nulls = dict.logical_nulls().filter(|n| n.null_count() > 0);
        if nulls.is_some() && self.levels.is_none() {
            return Err(ParquetError::General(format!(
                "dictionary column {} holds nulls but is required",
                self.descr.path()
            )));
        }
        let texts = dict.values().as_string_opt::<i32>().ok_or_else(|| {
            ParquetError::General(format!(
                "dictionary column {}: values are not Utf8",
                self.descr.path()
            ))
        })?;
        // Batch keys -> chunk keys, each text interned on its first use only
        // (a sliced batch may not use every value).
        let mut map = vec![u32::MAX; texts.len()];
        self.keys.reserve(dict.len());
        for (row, &k) in dict.keys().values().iter().enumerate() {
            if let Some(levels) = &mut self.levels {
                let valid = nulls.as_ref().is_none_or(|n| n.is_valid(row));
                levels.push(valid as u8);
                if !valid {
                    continue;
                }
            }
            let slot = map.get_mut(k as usize).ok_or_else(|| {
                ParquetError::General(format!(
                    "dictionary column {}: key {k} out of range",
                    self.descr.path()
                ))
            })?;
            if *slot == u32::MAX {
                let text = texts.value(k as usize).as_bytes();
                *slot = match self.index.get(text) {
                    Some(&known) => known,
                    None => {
                        let next = self.values.len() as u32;
                        self.index.insert(text.into(), next);
                        self.values.push(text.into());
                        next
                    }
                };
            }
            self.keys.push(*slot);
        }
        Ok(())
    }

    /// Encodes the chunk: its bytes (offsets relative to their start) and
    /// what `SerializedRowGroupWriter::append_column` needs to splice it in.
    pub fn close(self) -> Result<(Bytes, ColumnCloseResult)> {
        let mut pages = Pages::new(self.compression);
        let mut plain = Vec::new();
        for v in &self.values {
            plain.extend_from_slice(&(v.len() as u32).to_le_bytes());
            plain.extend_from_slice(v);
        }
        let dict_offset = pages.dictionary(plain, self.values.len())?;
        let bit_width = bits(self.values.len().saturating_sub(1) as u32);
        let rows = self.levels.as_ref().map_or(self.keys.len(), Vec::len);
        let mut keys = &self.keys[..];
        for start in (0..rows).step_by(self.page_rows) {
            let page_rows = self.page_rows.min(rows - start);
            let mut buf = Vec::new();
            let texts = match &self.levels {
                // A v1 page: the definition levels (bit width 1) behind
                // their length, then the keys of the rows holding a text.
                Some(levels) => {
                    let levels = &levels[start..start + page_rows];
                    put_def_levels(levels, &mut buf);
                    levels.iter().filter(|&&l| l == 1).count()
                }
                None => page_rows,
            };
            let (page, rest) = keys.split_at(texts);
            keys = rest;
            buf.push(bit_width);
            put_hybrid(page, bit_width, &mut buf);
            pages.data(buf, page_rows, Encoding::RLE_DICTIONARY)?;
        }
        let nulls = (rows - self.keys.len()) as u64;

        let encodings = [Encoding::PLAIN, Encoding::RLE, Encoding::RLE_DICTIONARY];
        let mut stats = vec![PageEncodingStats {
            page_type: PageType::DICTIONARY_PAGE,
            encoding: Encoding::PLAIN,
            count: 1,
        }];
        if pages.data_pages > 0 {
            stats.push(PageEncodingStats {
                page_type: PageType::DATA_PAGE,
                encoding: Encoding::RLE_DICTIONARY,
                count: pages.data_pages,
            });
        }
        let mut meta = ColumnChunkMetaData::builder(self.descr.clone())
            .set_encodings_mask(EncodingMask::new_from_encodings(encodings.iter()))
            .set_page_encoding_stats(stats)
            .set_data_page_offset(pages.first_data.unwrap_or(dict_offset))
            .set_dictionary_page_offset(Some(dict_offset));
        if self.statistics {
            // The text bytes of every row, counted only for the statistics.
            let mut per_key = vec![0i64; self.values.len()];
            for &k in &self.keys {
                per_key[k as usize] += 1;
            }
            let text_bytes: i64 = per_key
                .iter()
                .zip(&self.values)
                .map(|(n, v)| n * v.len() as i64)
                .sum();
            // Min and max over the texts in use (all of them: the chunk's
            // dictionary holds only used texts), compared as bytes.
            let min = self
                .values
                .iter()
                .min()
                .map(|v| ByteArray::from(v.to_vec()));
            let max = self
                .values
                .iter()
                .max()
                .map(|v| ByteArray::from(v.to_vec()));
            meta = meta
                .set_statistics(Statistics::new(min, max, None, Some(nulls), false))
                .set_unencoded_byte_array_data_bytes(Some(text_bytes));
        }
        pages.finish(meta, rows, None)
    }
}

/// Bits needed for `max`.
fn bits(max: u32) -> u8 {
    (32 - max.leading_zeros()) as u8
}

/// A v1 data page's definition levels of a flat optional column (bit
/// width 1: 1 = a value, 0 = null), RLE / bit-packed behind their length.
pub fn put_def_levels<L: Copy + PartialEq + Into<u32>>(levels: &[L], out: &mut Vec<u8>) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    put_hybrid(levels, 1, out);
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

/// Parquet's RLE / bit-packed hybrid encoding of `keys` (without the length
/// prefix): runs of 8 or more equal keys as RLE runs, the rest bit-packed in
/// groups of 8. Only the last group is padded (readers stop at the page's
/// value count).
pub fn put_hybrid<K: Copy + PartialEq + Into<u32>>(keys: &[K], bit_width: u8, out: &mut Vec<u8>) {
    let mut literal: Vec<u32> = Vec::new();
    let mut i = 0;
    while i < keys.len() {
        let k = keys[i];
        let v: u32 = k.into();
        let mut run = keys[i..].iter().take_while(|&&x| x == k).count();
        if run >= 8 {
            // Literals must end on a group of 8 before a run starts: top
            // them up from the run while 8 or more of it remain.
            let fill = (8 - literal.len() % 8) % 8;
            if run - fill >= 8 {
                literal.extend(std::iter::repeat_n(v, fill));
                i += fill;
                run -= fill;
                put_literal(&literal, bit_width, out);
                literal.clear();
                put_varint((run as u64) << 1, out);
                let width = (bit_width as usize).div_ceil(8);
                out.extend_from_slice(&v.to_le_bytes()[..width]);
                i += run;
                continue;
            }
        }
        literal.extend(std::iter::repeat_n(v, run));
        i += run;
    }
    put_literal(&literal, bit_width, out);
}

/// Bit-packed runs of at most 63 groups (what arrow-rs writes).
fn put_literal(values: &[u32], bit_width: u8, out: &mut Vec<u8>) {
    for run in values.chunks(63 * 8) {
        let groups = run.len().div_ceil(8);
        put_varint(((groups as u64) << 1) | 1, out);
        let (mut acc, mut have) = (0u64, 0u32);
        let padded = run.iter().copied().chain(std::iter::repeat(0));
        for v in padded.take(groups * 8) {
            acc |= (v as u64) << have;
            have += bit_width as u32;
            while have >= 8 {
                out.push(acc as u8);
                acc >>= 8;
                have -= 8;
            }
        }
    }
}

fn put_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes the hybrid encoding (the reader's side, for the tests).
    fn get_hybrid(mut b: &[u8], bit_width: u8, n: usize) -> Vec<u32> {
        let varint = |b: &mut &[u8]| {
            let (mut v, mut shift) = (0u64, 0);
            loop {
                let byte = b[0];
                *b = &b[1..];
                v |= ((byte & 0x7f) as u64) << shift;
                shift += 7;
                if byte < 0x80 {
                    return v;
                }
            }
        };
        let mut out = Vec::new();
        while out.len() < n {
            let h = varint(&mut b);
            if h & 1 == 0 {
                let width = (bit_width as usize).div_ceil(8);
                let mut v = [0u8; 4];
                v[..width].copy_from_slice(&b[..width]);
                b = &b[width..];
                out.extend(std::iter::repeat_n(
                    u32::from_le_bytes(v),
                    (h >> 1) as usize,
                ));
            } else {
                let count = (h >> 1) as usize * 8;
                let (mut acc, mut have) = (0u64, 0u32);
                for _ in 0..count {
                    while have < bit_width as u32 {
                        acc |= (b[0] as u64) << have;
                        b = &b[1..];
                        have += 8;
                    }
                    out.push((acc & ((1u64 << bit_width) - 1)) as u32);
                    acc >>= bit_width;
                    have -= bit_width as u32;
                }
            }
        }
        assert!(b.is_empty(), "{} bytes left over", b.len());
        out.truncate(n);
        out
    }

    #[test]
    fn keys_round_trip_through_runs_and_bit_packed_groups() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for case in 0..3_000 {
            let n = (next() % 700) as usize;
            let distinct = 1 + (next() % [1, 2, 3, 9, 300, 70_000][case % 6]) as u32;
            let mut keys = Vec::with_capacity(n);
            while keys.len() < n {
                let v = (next() % distinct as u64) as u32;
                let run = 1 + (next() % [1, 3, 8, 20][case % 4]) as usize;
                keys.extend(std::iter::repeat_n(v, run.min(n - keys.len())));
            }
            let width = bits(distinct - 1);
            let mut buf = Vec::new();
            put_hybrid(&keys, width, &mut buf);
            assert_eq!(get_hybrid(&buf, width, keys.len()), keys, "case {case}");
        }
    }

    #[test]
    fn texts_past_the_remembered_places_still_get_their_keys() {
        // Twice as many objects as places kept, two texts, alternating so
        // the row before never matches: later objects are found by content.
        let objects: Vec<String> = (0..2 * MAX_PLACES)
            .map(|i| ["a", "b"][i % 2].to_string())
            .collect();
        let mut t = DictText::with_capacity(objects.len());
        for o in &objects {
            t.push(o);
        }
        let a = t.finish();
        let d = a.as_dictionary::<UInt32Type>();
        let want: Vec<u32> = (0..objects.len()).map(|i| (i % 2) as u32).collect();
        assert_eq!(d.keys().values().to_vec(), want);
        assert_eq!(d.values().len(), 2);
    }

    #[test]
    fn a_repeated_text_object_takes_its_key_without_a_lookup() {
        let shared: Arc<str> = "gw-1".into();
        let other = String::from("gw-1");
        let mut t = DictText::with_capacity(4);
        t.push(&shared);
        t.push(&shared);
        t.push(&other); // equal text, another object: the map finds it
        t.push("x");
        t.push(&shared); // after another text: found by its place
        t.push_cow(&Cow::Owned("x".to_string()));
        t.push_cow(&Cow::Owned("new".to_string()));
        let a = t.finish();
        let d = a.as_dictionary::<UInt32Type>();
        assert_eq!(d.keys().values().to_vec(), vec![0, 0, 0, 1, 0, 1, 2]);
        let texts = d.values().as_string::<i32>();
        assert_eq!(
            texts.iter().flatten().collect::<Vec<_>>(),
            ["gw-1", "x", "new"]
        );
    }
}
