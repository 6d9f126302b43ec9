//! Atomic file commits: write under a hidden temporary name, fsync, rename,
//! fsync the directory. A reader never sees a partial file and a crash never
//! leaves an unreadable one under the final name.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::properties::{WriterProperties, WriterVersion};
use parquet::schema::types::ColumnPath;

use super::StoreError;

/// Rows per row group: large enough for fast scans, small enough to bound writer memory.
pub const ROW_GROUP_ROWS: usize = 1 << 20;

/// Writer settings shared by every Parquet dataset meterflow produces.
pub fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(3).expect("valid zstd level"),
        ))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_writer_version(WriterVersion::PARQUET_1_0)
        // Ids are sorted: prefix (delta) encoding beats a dictionary that overflows.
        .set_column_dictionary_enabled(ColumnPath::from("meter_id"), false)
        .set_column_encoding(ColumnPath::from("meter_id"), Encoding::DELTA_BYTE_ARRAY)
        // Same for account ids (bills, lines, ledger exports are sorted by account).
        .set_column_dictionary_enabled(ColumnPath::from("account_id"), false)
        .set_column_encoding(ColumnPath::from("account_id"), Encoding::DELTA_BYTE_ARRAY)
        .set_created_by(format!("meterflow {}", env!("CARGO_PKG_VERSION")))
        .build()
}

/// The hidden temporary sibling of `path` (readers skip names starting with `.`).
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// fsync a directory so a rename inside it is durable.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(dir, e))
}

/// Renames a fully written and fsynced temp file into place and fsyncs the directory.
pub fn commit(tmp: &Path, path: &Path) -> Result<(), StoreError> {
    fs::rename(tmp, path).map_err(|e| StoreError::io(path, e))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Writes `bytes` to `path` atomically.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
    }
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(StoreError::io(&tmp, e));
    }
    commit(&tmp, path)
}

/// Writes record batches as one zstd Parquet file at `path`, atomically.
/// Returns the committed file size in bytes.
pub fn write_parquet_atomic(
    path: &Path,
    schema: SchemaRef,
    batches: &[RecordBatch],
) -> Result<u64, StoreError> {
    let mut w = ParquetFileWriter::create(path, schema)?;
    for b in batches {
        w.write(b)?;
    }
    w.commit()
}

/// An open Parquet file that becomes visible only on `commit`. Dropping it
/// without commit removes the temporary file.
pub struct ParquetFileWriter {
    path: PathBuf,
    tmp: PathBuf,
    writer: Option<ArrowWriter<File>>,
}

impl ParquetFileWriter {
    pub fn create(path: &Path, schema: SchemaRef) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
        }
        let tmp = temp_path(path);
        let file = File::create(&tmp).map_err(|e| StoreError::io(&tmp, e))?;
        let writer = ArrowWriter::try_new(file, schema, Some(writer_properties()))
            .map_err(|e| StoreError::parquet(&tmp, e))?;
        Ok(ParquetFileWriter {
            path: path.to_path_buf(),
            tmp,
            writer: Some(writer),
        })
    }

    pub fn write(&mut self, batch: &RecordBatch) -> Result<(), StoreError> {
        let w = self.writer.as_mut().expect("writer open until commit");
        w.write(batch)
            .map_err(|e| StoreError::parquet(&self.tmp, e))
    }

    pub fn commit(mut self) -> Result<u64, StoreError> {
        let w = self.writer.take().expect("writer open until commit");
        let file = w
            .into_inner()
            .map_err(|e| StoreError::parquet(&self.tmp, e))?;
        file.sync_all().map_err(|e| StoreError::io(&self.tmp, e))?;
        let size = file
            .metadata()
            .map_err(|e| StoreError::io(&self.tmp, e))?
            .len();
        drop(file);
        commit(&self.tmp, &self.path)?;
        Ok(size)
    }
}

impl Drop for ParquetFileWriter {
    fn drop(&mut self) {
        if self.writer.is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}
