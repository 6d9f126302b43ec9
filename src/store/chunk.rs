//! What meterflow's own column-chunk writers (`store::dict`,
//! `store::decimal`) share: the compressions they support, and a chunk's
//! pages written into memory with the offset index and sizes its metadata
//! needs, to be spliced into the row group by `append_column`.

use std::cell::RefCell;

use bytes::Bytes;
use parquet::basic::{Compression, Encoding};
use parquet::column::page::{CompressedPage, Page, PageWriter};
use parquet::column::writer::ColumnCloseResult;
use parquet::errors::{ParquetError, Result};
use parquet::file::metadata::{ColumnChunkMetaDataBuilder, OffsetIndexBuilder};
use parquet::file::page_index::column_index::ColumnIndexMetaData;
use parquet::file::properties::WriterProperties;
use parquet::file::writer::{SerializedPageWriter, TrackedWrite};
use parquet::schema::types::ColumnDescPtr;

/// The compression `props` sets for `descr`, if these writers support it
/// (zstd or none); `what` names the writer in the error.
pub(super) fn compression(
    descr: &ColumnDescPtr,
    props: &WriterProperties,
    what: &str,
) -> Result<Compression> {
    let c = props.compression(descr.path());
    match c {
        Compression::UNCOMPRESSED | Compression::ZSTD(_) => Ok(c),
        _ => Err(ParquetError::General(format!(
            "{what} column {}: only zstd or no compression is supported",
            descr.path()
        ))),
    }
}

thread_local! {
    /// A zstd context per thread and level, reused page after page: a new
    /// one per page (`zstd::bulk::compress`) allocated and cleared its
    /// tables each time. Same bytes either way.
    static ZSTD: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
}

fn compress(c: Compression, buf: Vec<u8>) -> Result<Bytes> {
    let external = |e: std::io::Error| ParquetError::External(Box::new(e));
    match c {
        Compression::ZSTD(level) => ZSTD.with(|z| {
            let level = level.compression_level();
            let mut z = z.borrow_mut();
            let ctx = match &mut *z {
                Some((l, ctx)) if *l == level => ctx,
                slot => {
                    let ctx = zstd::bulk::Compressor::new(level).map_err(external)?;
                    &mut slot.insert((level, ctx)).1
                }
            };
            ctx.compress(&buf).map(Bytes::from).map_err(external)
        }),
        _ => Ok(Bytes::from(buf)),
    }
}

/// One column chunk's pages, in order.
pub(super) struct Pages {
    sink: TrackedWrite<Vec<u8>>,
    compression: Compression,
    offsets: OffsetIndexBuilder,
    compressed: i64,
    uncompressed: i64,
    /// The first data page's offset.
    pub first_data: Option<i64>,
    pub data_pages: i32,
}

impl Pages {
    pub fn new(compression: Compression) -> Self {
        Pages {
            sink: TrackedWrite::new(Vec::new()),
            compression,
            offsets: OffsetIndexBuilder::new(),
            compressed: 0,
            uncompressed: 0,
            first_data: None,
            data_pages: 0,
        }
    }

    /// Writes `page` (`len` bytes before compression); its offset and size.
    fn write(&mut self, page: Page, len: usize) -> Result<(i64, i32)> {
        let spec =
            SerializedPageWriter::new(&mut self.sink).write_page(CompressedPage::new(page, len))?;
        self.compressed += spec.compressed_size as i64;
        self.uncompressed += spec.uncompressed_size as i64;
        Ok((spec.offset as i64, spec.compressed_size as i32))
    }

    /// The PLAIN dictionary page of `values` values; returns its offset.
    pub fn dictionary(&mut self, plain: Vec<u8>, values: usize) -> Result<i64> {
        let len = plain.len();
        let page = Page::DictionaryPage {
            buf: compress(self.compression, plain)?,
            num_values: values as u32,
            encoding: Encoding::PLAIN,
            is_sorted: false,
        };
        Ok(self.write(page, len)?.0)
    }

    /// A (v1) data page of `rows` rows: `buf` holds its levels, then its values.
    pub fn data(&mut self, buf: Vec<u8>, rows: usize, encoding: Encoding) -> Result<()> {
        let len = buf.len();
        let page = Page::DataPage {
            buf: compress(self.compression, buf)?,
            num_values: rows as u32,
            encoding,
            def_level_encoding: Encoding::RLE,
            rep_level_encoding: Encoding::RLE,
            statistics: None,
        };
        let (offset, size) = self.write(page, len)?;
        self.first_data.get_or_insert(offset);
        self.offsets.append_offset_and_size(offset, size);
        self.offsets.append_row_count(rows as i64);
        self.data_pages += 1;
        Ok(())
    }

    /// The chunk's bytes (offsets relative to their start) and what
    /// `SerializedRowGroupWriter::append_column` needs: `meta` completed
    /// with the chunk's compression and sizes.
    pub fn finish(
        self,
        meta: ColumnChunkMetaDataBuilder,
        rows: usize,
        column_index: Option<ColumnIndexMetaData>,
    ) -> Result<(Bytes, ColumnCloseResult)> {
        let bytes = Bytes::from(self.sink.into_inner()?);
        let metadata = meta
            .set_compression(self.compression)
            .set_total_compressed_size(self.compressed)
            .set_total_uncompressed_size(self.uncompressed)
            .set_num_values(rows as i64)
            .build()?;
        let close = ColumnCloseResult {
            bytes_written: bytes.len() as u64,
            rows_written: rows as u64,
            metadata,
            bloom_filter: None,
            column_index,
            offset_index: Some(self.offsets.build()),
        };
        Ok((bytes, close))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parquet::basic::ZstdLevel;

    #[test]
    fn a_reused_zstd_context_gives_the_bytes_of_a_fresh_one_at_each_level() {
        let page: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i / 7).to_le_bytes())
            .collect();
        // Levels alternate on one thread, so the context is rebuilt and reused.
        for level in [1, 3, 1, 1, 3] {
            let c = Compression::ZSTD(ZstdLevel::try_new(level).unwrap());
            let got = compress(c, page.clone()).unwrap();
            assert_eq!(&got[..], &zstd::bulk::compress(&page, level).unwrap()[..]);
            assert_eq!(zstd::bulk::decompress(&got, page.len()).unwrap(), page);
        }
        let plain = compress(Compression::UNCOMPRESSED, page.clone()).unwrap();
        assert_eq!(&plain[..], &page[..]);
    }
}
