//! Reading the lake back.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use arrow::record_batch::RecordBatch;
use chrono::NaiveDate;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use super::columns::ReadingsView;
use super::schema::READINGS;
use super::StoreError;
use crate::model::Reading;

/// Partition dates present in a dataset, ascending.
pub fn list_partitions(
    root: &Path,
    dataset: &str,
) -> Result<Vec<(NaiveDate, PathBuf)>, StoreError> {
    let dir = root.join(dataset);
    let mut out = Vec::new();
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(StoreError::io(&dir, e)),
    };
    for ent in rd {
        let ent = ent.map_err(|e| StoreError::io(&dir, e))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        if let Some(d) = name
            .strip_prefix("date=")
            .and_then(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").ok())
        {
            out.push((d, ent.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Committed Parquet files of one partition directory, by name. Hidden
/// (temporary) files are never listed.
pub fn partition_files(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let mut files = Vec::new();
    for ent in fs::read_dir(dir).map_err(|e| StoreError::io(dir, e))? {
        let ent = ent.map_err(|e| StoreError::io(dir, e))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && !name.starts_with('_') && name.ends_with(".parquet") {
            files.push(ent.path());
        }
    }
    files.sort();
    Ok(files)
}

/// Files of `dataset` with partition dates in `from..=to`.
pub fn list_files(
    root: &Path,
    dataset: &str,
    from: NaiveDate,
    to_inclusive: NaiveDate,
) -> Result<Vec<(NaiveDate, PathBuf)>, StoreError> {
    let mut out = Vec::new();
    for (date, dir) in list_partitions(root, dataset)? {
        if date < from || date > to_inclusive {
            continue;
        }
        for f in partition_files(&dir)? {
            out.push((date, f));
        }
    }
    Ok(out)
}

/// All record batches of one Parquet file.
pub fn read_file(path: &Path) -> Result<Vec<RecordBatch>, StoreError> {
    read_file_columns(path, None)
}

/// Record batches of one file, optionally only the named columns.
pub fn read_file_columns(
    path: &Path,
    columns: Option<&[&str]>,
) -> Result<Vec<RecordBatch>, StoreError> {
    let file = File::open(path).map_err(|e| StoreError::io(path, e))?;
    let mut builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| StoreError::parquet(path, e))?
        .with_batch_size(64 * 1024);
    if let Some(cols) = columns {
        let mask = ProjectionMask::columns(builder.parquet_schema(), cols.iter().copied());
        builder = builder.with_projection(mask);
    }
    let reader = builder.build().map_err(|e| StoreError::parquet(path, e))?;
    reader
        .map(|b| b.map_err(|e| StoreError::parquet(path, e)))
        .collect()
}

/// Row count from the footer only.
pub fn file_rows(path: &Path) -> Result<u64, StoreError> {
    let file = File::open(path).map_err(|e| StoreError::io(path, e))?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| StoreError::parquet(path, e))?;
    Ok(builder.metadata().file_metadata().num_rows().max(0) as u64)
}

/// Every reading with a partition date in `from..=to` (convenience; allocates per row).
pub fn read_readings(
    root: &Path,
    from: NaiveDate,
    to_inclusive: NaiveDate,
) -> Result<Vec<Reading>, StoreError> {
    let mut out = Vec::new();
    for (_, path) in list_files(root, READINGS, from, to_inclusive)? {
        for batch in read_file(&path)? {
            let v = ReadingsView::new(&batch)?;
            for i in 0..v.len() {
                out.push(v.reading(i).map_err(|e| StoreError::parquet(&path, e))?);
            }
        }
    }
    Ok(out)
}

/// Every reading in the lake (all partitions).
pub fn read_all_readings(root: &Path) -> Result<Vec<Reading>, StoreError> {
    read_readings(root, NaiveDate::MIN, NaiveDate::MAX)
}
