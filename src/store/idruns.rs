//! Runs of equal meter ids straight from `DELTA_BYTE_ARRAY` pages.
//!
//! The lake writes `meter_id` prefix-encoded and sorted, so a row whose id
//! equals the previous row's is a prefix length equal to that id's length
//! and an empty suffix. Decoding the pages here gives, per row, the index of
//! its run of equal ids, and one text per run: the id is built once per run
//! instead of once per row (arrow's reader copies every row's bytes into a
//! string array and checks them as UTF-8). Pure codec: bytes in, runs out,
//! no IO; `store::scan` reads the pages.

use arrow::array::StringArray;

/// Why a page could not be decoded (the scan then reads the column as text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("DELTA_BYTE_ARRAY page: {0}")]
pub struct PageError(pub &'static str);

/// The ids of a column chunk, one entry per run of equal consecutive ids.
pub struct IdRuns {
    /// Per row, the index of its run in the texts [`IdRuns::finish`] returns.
    keys: Vec<i32>,
    /// The previous row's id, `values[prev..prev + len]`: the last text,
    /// so the texts end at `prev + len`.
    prev: usize,
    len: usize,
    /// A page's prefix and suffix lengths (kept for the next page).
    prefix: Vec<i32>,
    suffix: Vec<i32>,
    /// The run texts, end to end, and where each ends (checked as UTF-8
    /// once, by [`IdRuns::finish`]). At least `MAX_ID` bytes follow the
    /// last, so a new id is made by copying the previous id's
    /// whole window (a fixed size: no `memcpy` call) and writing its suffix.
    values: Vec<u8>,
    offsets: Vec<i32>,
}

/// Longest id decoded here. Meter ids are short (DL/T 645 addresses are 12
/// digits); a column with longer ids is read by the column reader.
const MAX_ID: usize = 64;

impl IdRuns {
    /// `rows` is a hint (capped: it comes from a file's footer).
    pub fn with_capacity(rows: usize) -> IdRuns {
        let rows = rows.min(1 << 21);
        let mut offsets = Vec::with_capacity(rows / 4 + 2);
        offsets.push(0);
        IdRuns {
            keys: Vec::with_capacity(rows),
            prev: 0,
            len: 0,
            prefix: Vec::new(),
            suffix: Vec::new(),
            values: vec![0; rows * 3 + 2 * MAX_ID],
            offsets,
        }
    }

    /// Rows decoded so far.
    pub fn rows(&self) -> usize {
        self.keys.len()
    }

    fn runs(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Appends the `num_values` ids of one `DELTA_BYTE_ARRAY` page (its
    /// values section, decompressed, no levels). A run may continue across
    /// pages.
    pub fn push_page(&mut self, page: &[u8], num_values: usize) -> Result<(), PageError> {
        let (mut prefix, mut suffix) = (
            std::mem::take(&mut self.prefix),
            std::mem::take(&mut self.suffix),
        );
        prefix.clear();
        suffix.clear();
        let r = self.push_lengths(page, num_values, &mut prefix, &mut suffix);
        (self.prefix, self.suffix) = (prefix, suffix);
        r
    }

    fn push_lengths(
        &mut self,
        page: &[u8],
        num_values: usize,
        prefix: &mut Vec<i32>,
        suffix: &mut Vec<i32>,
    ) -> Result<(), PageError> {
        let rest = unpack_deltas(page, num_values, prefix)?;
        let mut bytes = unpack_deltas(rest, num_values, suffix)?;
        let mut i = 0;
        while i < num_values {
            if i > 0 && self.runs() > 0 {
                // Rows repeating the id before (its whole length as prefix,
                // no suffix) continue the run: found in one pass over both
                // length arrays, filled in one go.
                let len = self.len as i32;
                let same = prefix[i..]
                    .iter()
                    .zip(&suffix[i..])
                    .take_while(|&(&p, &s)| p == len && s == 0)
                    .count();
                let key = self.runs() as i32 - 1;
                self.keys.extend(std::iter::repeat_n(key, same));
                i += same;
                if i == num_values {
                    break;
                }
            }
            let (p, s) = (usize::try_from(prefix[i]), usize::try_from(suffix[i]));
            let (Ok(p), Ok(s)) = (p, s) else {
                return Err(PageError("negative length"));
            };
            // A page's first value has no value before it to share a prefix with.
            let base = if i == 0 { 0 } else { self.len };
            if p > base || s > bytes.len() {
                return Err(PageError("length past the data"));
            }
            if p + s > MAX_ID {
                return Err(PageError("id longer than this decoder reads"));
            }
            let (tail, rest) = bytes.split_at(s);
            bytes = rest;
            i += 1;
            // A page's first id (or another writer's shorter prefix) spells
            // out what may still be the id before: compared byte by byte.
            let prev = &self.values[self.prev..self.prev + self.len];
            if self.runs() > 0 && p + s == self.len && same_tail(tail, &prev[p..]) {
                self.keys.push(self.runs() as i32 - 1);
                continue;
            }
            let at = self.prev + self.len;
            let end = i32::try_from(at + p + s).map_err(|_| PageError("ids too long"))?;
            if self.values.len() < at + 2 * MAX_ID {
                self.values.resize(self.values.len() * 2 + 2 * MAX_ID, 0);
            }
            // The previous id's window, then the suffix over it, a few bytes
            // copied one by one (no call; the window is read only at the
            // next new id, after these stores are done).
            self.values.copy_within(self.prev..self.prev + MAX_ID, at);
            for (d, &c) in self.values[at + p..at + p + s].iter_mut().zip(tail) {
                *d = c;
            }
            (self.prev, self.len) = (at, p + s);
            self.keys.push(self.runs() as i32);
            self.offsets.push(end);
        }
        Ok(())
    }

    /// The run texts, indexed by [`IdRuns::keys`]; an error if they are not
    /// UTF-8 (checked here, once for all of them).
    pub fn finish(self) -> Result<(Vec<i32>, StringArray), PageError> {
        use arrow::buffer::{Buffer, OffsetBuffer, ScalarBuffer};
        let mut values = self.values;
        values.truncate(self.prev + self.len);
        let offsets = OffsetBuffer::new(ScalarBuffer::from(self.offsets));
        let texts = StringArray::try_new(offsets, Buffer::from_vec(values), None)
            .map_err(|_| PageError("id not UTF-8"))?;
        Ok((self.keys, texts))
    }
}

/// Whether `a` equals `b`: the first bytes decide without a `memcmp`
/// call, since a prefix-encoded suffix differs from the id before it at its
/// first byte.
#[inline]
fn same_tail(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && (a.is_empty() || (a[0] == b[0] && a == b))
}

/// Reads an unsigned LEB128 integer.
fn uleb(b: &mut &[u8]) -> Result<u64, PageError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = b.split_first().ok_or(PageError("truncated header"))?;
        *b = rest;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(PageError("integer too long"))
}

fn zigzag(b: &mut &[u8]) -> Result<i64, PageError> {
    let v = uleb(b)?;
    Ok((v >> 1) as i64 ^ -((v & 1) as i64))
}

/// Decodes `n` `DELTA_BINARY_PACKED` 32-bit values into `out` and returns
/// the bytes after them. Widths above 32 bits are refused (lengths are
/// INT32; the deltas of an INT32 column wrap to 32 bits). Written here
/// because parquet's own decoder is public only under its `experimental`
/// feature, which pulls in crates this build does not have.
pub fn unpack_deltas<'a>(
    mut b: &'a [u8],
    n: usize,
    out: &mut Vec<i32>,
) -> Result<&'a [u8], PageError> {
    let block = uleb(&mut b)? as usize;
    let minis = uleb(&mut b)? as usize;
    let total = uleb(&mut b)? as usize;
    let first = zigzag(&mut b)?;
    if total != n {
        return Err(PageError("value count differs from the page's"));
    }
    if minis == 0
        || block == 0
        || block > 1 << 16
        || !block.is_multiple_of(minis)
        || !(block / minis).is_multiple_of(32)
    {
        return Err(PageError("bad block layout"));
    }
    // Every block takes a min delta and its widths: a count the bytes
    // cannot hold is damage, refused before anything is allocated for it.
    if n.saturating_sub(1)
        .div_ceil(block)
        .saturating_mul(1 + minis)
        > b.len()
    {
        return Err(PageError("truncated block"));
    }
    let per_mini = block / minis;
    if n == 0 {
        return Ok(b);
    }
    let start = out.len();
    out.resize(start + n, 0);
    let dst = &mut out[start..];
    let mut last = first as i32;
    dst[0] = last;
    let mut at = 1;
    let mut padded = [0u8; 32 * 32 / 8 * 2 + 8];
    while at < n {
        let min_delta = zigzag(&mut b)? as i32;
        if b.len() < minis {
            return Err(PageError("truncated block"));
        }
        let (widths, rest) = b.split_at(minis);
        b = rest;
        for &w in widths {
            if at == n {
                break; // widths of unneeded miniblocks, no bodies
            }
            let w = w as usize;
            if w > 32 {
                return Err(PageError("bit width over 32"));
            }
            let len = per_mini * w / 8;
            if b.len() < len {
                return Err(PageError("truncated miniblock"));
            }
            // The miniblock and what follows it: values are read as 8-byte
            // loads, which may run past the body (the extra bits are masked).
            let from = b;
            let (body, rest) = b.split_at(len);
            b = rest;
            let take = per_mini.min(n - at);
            let dst = &mut dst[at..at + take];
            at += take;
            if w == 0 {
                for v in dst {
                    last = last.wrapping_add(min_delta);
                    *v = last;
                }
                continue;
            }
            let src = if from.len() >= len + 8 {
                from
            } else if len + 8 <= padded.len() {
                // The page's last bytes: copied where 8 bytes of slack follow.
                padded[..len].copy_from_slice(body);
                &padded[..]
            } else {
                unpack_wide(body, w, min_delta, &mut last, dst)?;
                continue;
            };
            let mask = (1u64 << w) - 1;
            for (k, v) in dst.iter_mut().enumerate() {
                let bit = k * w;
                let word = u64::from_le_bytes(src[bit / 8..bit / 8 + 8].try_into().unwrap());
                let d = ((word >> (bit % 8)) & mask) as u32;
                last = last.wrapping_add(min_delta).wrapping_add(d as i32);
                *v = last;
            }
        }
    }
    Ok(b)
}

/// A page's last miniblock when its body is over 256 bytes (miniblocks of
/// more than 64 values, a layout other writers may choose), with no 8 bytes
/// after it to load past: bit by bit, slower, same result.
#[cold]
fn unpack_wide(
    body: &[u8],
    w: usize,
    min_delta: i32,
    last: &mut i32,
    dst: &mut [i32],
) -> Result<(), PageError> {
    for (k, v) in dst.iter_mut().enumerate() {
        let mut d = 0u32;
        for j in 0..w {
            let bit = k * w + j;
            let byte = *body.get(bit / 8).ok_or(PageError("truncated miniblock"))?;
            d |= u32::from((byte >> (bit % 8)) & 1) << j;
        }
        *last = last.wrapping_add(min_delta).wrapping_add(d as i32);
        *v = *last;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Array;

    fn runs_of(pages: &[(Vec<u8>, usize)]) -> Result<Vec<String>, PageError> {
        let mut r = IdRuns::with_capacity(16);
        for (p, n) in pages {
            r.push_page(p, *n)?;
        }
        let (keys, texts) = r.finish()?;
        Ok(keys
            .iter()
            .map(|&k| texts.value(k as usize).to_string())
            .collect())
    }

    /// The one page of `ids` by parquet's own encoder.
    fn encoded(ids: &[&str]) -> Vec<u8> {
        use parquet::basic::Encoding;
        let pages = raw_pages(&delta_file(ids, 1 << 20));
        assert_eq!(pages.len(), 1);
        assert_eq!(pages[0].2, Encoding::DELTA_BYTE_ARRAY);
        pages[0].0.clone()
    }

    /// A Parquet file of one required `meter_id` column written by arrow-rs
    /// with DELTA_BYTE_ARRAY, `page_rows` rows per page, zstd.
    fn delta_file(ids: &[&str], page_rows: usize) -> Vec<u8> {
        use parquet::basic::{Compression, Encoding};
        let ids = std::sync::Arc::new(StringArray::from(ids.to_vec()));
        let zstd = Compression::ZSTD(Default::default());
        one_column_file(ids, Encoding::DELTA_BYTE_ARRAY, zstd, page_rows)
    }

    /// A Parquet file of one required column, `encoding` without a
    /// dictionary, `page_rows` rows per page.
    fn one_column_file(
        values: arrow::array::ArrayRef,
        encoding: parquet::basic::Encoding,
        compression: parquet::basic::Compression,
        page_rows: usize,
    ) -> Vec<u8> {
        use arrow::datatypes::{Field, Schema};
        use parquet::arrow::ArrowWriter;
        use parquet::file::properties::WriterProperties;
        let field = Field::new("meter_id", values.data_type().clone(), false);
        let schema = std::sync::Arc::new(Schema::new(vec![field]));
        let props = WriterProperties::builder()
            .set_dictionary_enabled(false)
            .set_encoding(encoding)
            .set_compression(compression)
            .set_data_page_row_count_limit(page_rows)
            .set_write_batch_size(page_rows.min(1024))
            .build();
        let batch =
            arrow::record_batch::RecordBatch::try_new(schema.clone(), vec![values]).unwrap();
        let mut out = Vec::new();
        let mut w = ArrowWriter::try_new(&mut out, schema, Some(props)).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        out
    }

    /// The data pages of an in-memory Parquet file's first column (first
    /// row group): values section (decompressed), value count, encoding.
    fn raw_pages(file: &[u8]) -> Vec<(Vec<u8>, usize, parquet::basic::Encoding)> {
        use parquet::column::page::Page;
        use parquet::file::reader::FileReader;
        use parquet::file::serialized_reader::SerializedFileReader;
        let reader = SerializedFileReader::new(bytes::Bytes::copy_from_slice(file)).unwrap();
        let rg = reader.get_row_group(0).unwrap();
        let mut pages = rg.get_column_page_reader(0).unwrap();
        let mut out = Vec::new();
        while let Some(p) = pages.get_next_page().unwrap() {
            match p {
                Page::DataPage {
                    buf,
                    num_values,
                    encoding,
                    ..
                }
                | Page::DataPageV2 {
                    buf,
                    num_values,
                    encoding,
                    ..
                } => out.push((buf.to_vec(), num_values as usize, encoding)),
                Page::DictionaryPage { .. } => {}
            }
        }
        out
    }

    #[test]
    fn equal_neighbours_share_a_run_and_each_run_has_its_text() {
        let ids = [
            "398192000337",
            "398192000337",
            "398192000338",
            "4",
            "4",
            "40",
            "é1",
            "é1",
        ];
        let page = encoded(&ids);
        assert_eq!(runs_of(&[(page.clone(), ids.len())]).unwrap(), ids);
        let mut r = IdRuns::with_capacity(8);
        r.push_page(&page, ids.len()).unwrap();
        let (keys, texts) = r.finish().unwrap();
        assert_eq!(keys, [0, 0, 1, 2, 2, 3, 4, 4]);
        assert_eq!(texts.len(), 5);
    }

    #[test]
    fn an_empty_id_and_a_single_row_decode() {
        // "aé" then "aè" share the bytes "a\xc3": the prefix ends inside a character.
        for ids in [
            vec![""],
            vec!["", "", "a"],
            vec!["M1"],
            vec!["aé", "aè", "aè"],
        ] {
            let page = encoded(&ids);
            assert_eq!(runs_of(&[(page, ids.len())]).unwrap(), ids);
        }
    }

    #[test]
    fn deltas_of_every_width_decode_as_written() {
        // Lengths from 0 to 60 in a scrambled order give deltas of several
        // widths, negative ones and miniblocks of width 0.
        let texts: Vec<String> = (0..5000u32)
            .map(|i| {
                let len = ((i * 7919) % 61) as usize;
                let len = if i % 97 < 40 { 12 } else { len };
                "x".repeat(len) + &i.to_string()
            })
            .collect();
        let ids: Vec<&str> = texts.iter().map(String::as_str).collect();
        let page = encoded(&ids);
        assert_eq!(runs_of(&[(page, ids.len())]).unwrap(), ids);
    }

    #[test]
    fn int32_deltas_of_every_width_decode_as_parquet_wrote_them() {
        use arrow::array::Int32Array;
        use parquet::basic::{Compression, Encoding};
        // Steps of every size up to the whole i32 range, wrapping.
        let mut x = 0x1234_5678u32;
        let values: Vec<i32> = (0..20_000u32)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let width = i % 33;
                if width == 0 {
                    7
                } else {
                    (x & (u32::MAX >> (32 - width))) as i32
                }
            })
            .collect();
        let file = one_column_file(
            std::sync::Arc::new(Int32Array::from(values.clone())),
            Encoding::DELTA_BINARY_PACKED,
            Compression::UNCOMPRESSED,
            3000,
        );
        let mut got = Vec::new();
        let mut n_pages = 0;
        for (buf, num_values, _) in raw_pages(&file) {
            let rest = unpack_deltas(&buf, num_values, &mut got).unwrap();
            assert!(rest.is_empty());
            n_pages += 1;
        }
        assert!(n_pages > 1);
        assert_eq!(got, values);
    }

    #[test]
    fn a_run_continues_across_pages() {
        let ids = ["A1", "A1", "A1", "A2", "A2", "A2", "A2"];
        let file = delta_file(&ids, 2);
        let pages = raw_pages(&file);
        assert!(pages.len() >= 3);
        let pages: Vec<(Vec<u8>, usize)> = pages.into_iter().map(|(b, n, _)| (b, n)).collect();
        let mut r = IdRuns::with_capacity(8);
        for (p, n) in &pages {
            r.push_page(p, *n).unwrap();
        }
        let (keys, texts) = r.finish().unwrap();
        assert_eq!(keys, [0, 0, 0, 1, 1, 1, 1]);
        assert_eq!(texts.len(), 2);
    }

    #[test]
    fn damaged_pages_are_errors_not_panics() {
        let ids = ["398192000337", "398192000338", "398192000339"];
        let page = encoded(&ids);
        for cut in 0..page.len() {
            let _ = runs_of(&[(page[..cut].to_vec(), ids.len())]);
        }
        assert!(
            runs_of(&[(page.clone(), 4)]).is_err(),
            "a wrong value count"
        );
        let mut flipped = page.clone();
        for i in 0..flipped.len() {
            flipped[i] ^= 0xff;
            let _ = runs_of(&[(flipped.clone(), ids.len())]);
            flipped[i] ^= 0xff;
        }
        assert!(runs_of(&[(vec![], 1)]).is_err());
    }

    #[test]
    fn ids_growing_row_by_row_are_refused_not_copied_without_end() {
        let texts: Vec<String> = (1..6000).map(|n| "7".repeat(n)).collect();
        let ids: Vec<&str> = texts.iter().map(String::as_str).collect();
        let page = encoded(&ids);
        assert_eq!(
            runs_of(&[(page, ids.len())]),
            Err(PageError("id longer than this decoder reads"))
        );
        // 64 bytes is still read here.
        let long = "8".repeat(64);
        let ids = [long.as_str(), long.as_str(), "9"];
        assert_eq!(runs_of(&[(encoded(&ids), 3)]).unwrap(), ids);
    }

    #[test]
    fn miniblock_bodies_of_a_hand_made_header_decode() {
        // block 128, 4 miniblocks, 3 values, first 5; min delta -1; widths
        // 2,0,0,0; packed deltas 0 and 2 (-1 and +1) -> 5, 4, 5.
        let page = [
            0x80, 0x01, 0x04, 0x03, 0x0a, 0x01, 2, 0, 0, 0, 0x08, 0, 0, 0, 0, 0, 0, 0,
        ];
        let mut out = Vec::new();
        let rest = unpack_deltas(&page, 3, &mut out).unwrap();
        assert_eq!(out, [5, 4, 5]);
        assert_eq!(rest, &[] as &[u8]);
    }

    #[test]
    fn miniblocks_of_more_than_64_values_decode_bit_by_bit() {
        // block 256, 1 miniblock of 256 values, 3 values, first 0; min delta
        // 0; width 9 (a 288-byte body); deltas 1 and 300 -> 0, 1, 301.
        let mut page = vec![0x80, 0x02, 0x01, 0x03, 0x00, 0x00, 9];
        let mut body = vec![0u8; 256 * 9 / 8];
        let bits = 1u32 | (300 << 9);
        body[..3].copy_from_slice(&bits.to_le_bytes()[..3]);
        page.extend_from_slice(&body);
        let mut out = Vec::new();
        let rest = unpack_deltas(&page, 3, &mut out).unwrap();
        assert_eq!(out, [0, 1, 301]);
        assert!(rest.is_empty());
    }
}
