//! Atomic file commits: write under a hidden temporary name, fsync, rename,
//! fsync the directory. A reader never sees a partial file and a crash never
//! leaves an unreadable one under the final name.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::properties::{WriterProperties, WriterVersion};
use parquet::schema::types::ColumnPath;

use super::encode::ColumnWriter;
use super::StoreError;

/// Rows per row group: large enough for fast scans, small enough to bound writer memory.
pub const ROW_GROUP_ROWS: usize = 1 << 20;

/// Writer settings of a dataset with `schema`: [`base_properties`], and a
/// `value` column stored as an integer (a decimal of up to 18 digits, the
/// readings' register values) is delta-encoded without a dictionary and without zstd. Register
/// values are nearly all distinct, so the dictionary overflows anyway; the
/// packed deltas are smaller than zstd over plain values, and decoding them
/// is about 4x faster (the bill run's scan reads every value).
pub fn writer_properties_for(schema: &arrow::datatypes::Schema) -> WriterProperties {
    let mut b = base_properties();
    if let Ok(f) = schema.field_with_name("value") {
        // Up to 18 digits a decimal is stored as an integer (wider: fixed-length bytes).
        if matches!(f.data_type(), arrow::datatypes::DataType::Decimal128(p, _) if *p <= 18) {
            let v = ColumnPath::from("value");
            b = b
                .set_column_dictionary_enabled(v.clone(), false)
                .set_column_encoding(v.clone(), Encoding::DELTA_BINARY_PACKED)
                .set_column_compression(v, Compression::UNCOMPRESSED);
        }
    }
    b.build()
}

/// Settings shared by every Parquet dataset meterflow produces (datasets add
/// their own: [`writer_properties_for`], `billing::output::writer_properties`).
pub fn base_properties() -> parquet::file::properties::WriterPropertiesBuilder {
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
        // Analytics' join key: one distinct value per account, so a dictionary
        // always overflows after hashing every value (31 M rows of daily_usage).
        .set_column_dictionary_enabled(ColumnPath::from("account_key"), false)
        .set_column_encoding(ColumnPath::from("account_key"), Encoding::DELTA_BYTE_ARRAY)
        .set_created_by(format!("meterflow {}", env!("CARGO_PKG_VERSION")))
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
    #[cfg(test)]
    DIR_SYNCS.with(|s| s.borrow_mut().push(dir.to_path_buf()));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(dir, e))
}

#[cfg(test)]
thread_local! {
    /// Tests: directories this thread fsynced, in order.
    pub(crate) static DIR_SYNCS: std::cell::RefCell<Vec<PathBuf>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Creates `dir` and any missing ancestors, one at a time, fsyncing the
/// parent of each new directory: otherwise a power loss can forget a new
/// directory (and every file committed in it) while a deletion that relied
/// on them persists.
pub fn create_dir_durable(dir: &Path) -> Result<(), StoreError> {
    let mut missing = Vec::new();
    let mut at = dir;
    while !at.as_os_str().is_empty() && !at.is_dir() {
        missing.push(at);
        match at.parent() {
            Some(p) => at = p,
            None => break,
        }
    }
    for d in missing.into_iter().rev() {
        match fs::create_dir(d) {
            Ok(()) => {}
            // Another thread made it meanwhile: sync its parent all the same.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(e) => return Err(StoreError::io(d, e)),
        }
        let parent = match d.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        sync_dir(parent)?;
    }
    Ok(())
}

/// Renames a fully written and fsynced temp file into place and fsyncs the directory.
pub fn commit(tmp: &Path, path: &Path) -> Result<(), StoreError> {
    fs::rename(tmp, path).map_err(|e| StoreError::io(path, e))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Writes `bytes` to `path` atomically.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    if let Some(dir) = path.parent() {
        create_dir_durable(dir)?;
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
    writer: Option<ColumnWriter<File>>,
}

impl ParquetFileWriter {
    pub fn create(path: &Path, schema: SchemaRef) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            create_dir_durable(dir)?;
        }
        let tmp = temp_path(path);
        let file = File::create(&tmp).map_err(|e| StoreError::io(&tmp, e))?;
        let props = writer_properties_for(&schema);
        let writer =
            ColumnWriter::try_new(file, schema, props).map_err(|e| StoreError::parquet(&tmp, e))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Decimal128Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use std::sync::Arc;

    fn encodings_of(path: &Path, column: usize) -> Vec<Encoding> {
        let r = SerializedFileReader::new(File::open(path).unwrap()).unwrap();
        r.metadata()
            .row_group(0)
            .column(column)
            .encodings()
            .collect()
    }

    fn dir_syncs() -> Vec<PathBuf> {
        DIR_SYNCS.with(|s| s.take())
    }

    #[test]
    fn missing_directories_are_created_one_by_one_each_with_its_parent_synced() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let leaf = root.join("readings").join("date=2026-01-01");
        dir_syncs();
        create_dir_durable(&leaf).unwrap();
        assert!(leaf.is_dir());
        assert_eq!(dir_syncs(), vec![root.to_path_buf(), root.join("readings")]);
        create_dir_durable(&leaf).unwrap();
        assert!(dir_syncs().is_empty(), "existing directories need no sync");
    }

    #[test]
    fn a_file_committed_into_a_new_partition_syncs_every_directory_it_created() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let part = root.join("quarantine").join("date=2026-01-01");
        dir_syncs();
        write_file_atomic(&part.join("f.bin"), b"x").unwrap();
        assert_eq!(
            dir_syncs(),
            vec![root.to_path_buf(), root.join("quarantine"), part]
        );
    }

    #[test]
    fn a_file_where_a_directory_belongs_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("f"), b"x").unwrap();
        assert!(create_dir_durable(&dir.path().join("f").join("sub")).is_err());
    }

    #[test]
    fn register_values_are_delta_encoded_and_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("meter_id", DataType::Utf8, false),
            Field::new("value", DataType::Decimal128(18, 4), false),
        ]));
        let values: Vec<i128> = (0..5000)
            .map(|i| 123_456_789 + i * 977 - (i % 7) * 10_000_000)
            .collect();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from_iter_values(
                    (0..5000).map(|i| format!("{:012}", i / 5)),
                )),
                Arc::new(
                    Decimal128Array::from(values.clone())
                        .with_precision_and_scale(18, 4)
                        .unwrap(),
                ),
            ],
        )
        .unwrap();
        let path = dir.path().join("r.parquet");
        write_parquet_atomic(&path, schema, &[batch]).unwrap();
        let enc = encodings_of(&path, 1);
        assert!(enc.contains(&Encoding::DELTA_BINARY_PACKED), "{enc:?}");
        assert!(!enc.contains(&Encoding::RLE_DICTIONARY), "{enc:?}");
        let back: Vec<i128> = parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(
            File::open(&path).unwrap(),
            1024,
        )
        .unwrap()
        .flat_map(|b| {
            let b = b.unwrap();
            let v = b
                .column(1)
                .as_any()
                .downcast_ref::<Decimal128Array>()
                .unwrap()
                .clone();
            v.values().to_vec()
        })
        .collect();
        assert_eq!(back, values);
    }

    #[test]
    fn the_lake_writes_register_values_delta_packed() {
        use crate::model::{Channel, Quality};
        use crate::store::{Lake, LakeOptions};
        let dir = tempfile::tempdir().unwrap();
        let mut lake = Lake::open(dir.path(), LakeOptions::new("t")).unwrap();
        let day = 1_790_000_000_000i64;
        let rs: Vec<_> = (0..50)
            .map(|i| {
                let id = format!("{:012}", i / 5);
                crate::store::scan::tests::reading(
                    &id,
                    day,
                    Channel::ImportActiveTotal,
                    i,
                    Quality::OK,
                )
            })
            .collect();
        lake.accept(&rs).unwrap();
        lake.flush().unwrap();
        let files = crate::store::reader::list_files(
            dir.path(),
            crate::store::schema::READINGS,
            chrono::NaiveDate::MIN,
            chrono::NaiveDate::MAX,
        )
        .unwrap();
        assert!(!files.is_empty());
        for (_, path) in files {
            let enc = encodings_of(&path, crate::store::schema::col::VALUE);
            assert!(enc.contains(&Encoding::DELTA_BINARY_PACKED), "{enc:?}");
        }
    }

    #[test]
    fn a_value_column_of_another_type_keeps_the_default_encoding() {
        // Wide decimals are fixed-length bytes: delta packing does not apply.
        let schema = Schema::new(vec![Field::new(
            "value",
            DataType::Decimal128(28, 6),
            false,
        )]);
        let p = writer_properties_for(&schema);
        assert_eq!(p.encoding(&ColumnPath::from("value")), None);
        let narrow = Schema::new(vec![Field::new(
            "value",
            DataType::Decimal128(18, 4),
            false,
        )]);
        let p = writer_properties_for(&narrow);
        assert_eq!(
            p.encoding(&ColumnPath::from("value")),
            Some(Encoding::DELTA_BINARY_PACKED)
        );
    }
}
