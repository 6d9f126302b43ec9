//! Compaction: merge a partition's files into one, drop exact duplicates,
//! and keep conflicting duplicates (same meter, channel, ts; different value)
//! in both the readings (flagged `conflict`) and the `conflicts` dataset.
//! Quarantine partitions are merged too, without rows repeated exactly (a
//! message redelivered after its dead letter was durable).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, Decimal128Array, StringArray, StringBuilder, TimestampMillisecondArray,
    UInt32Array,
};
use arrow::compute::{concat_batches, lexsort_to_indices, take, SortColumn};
use arrow::record_batch::RecordBatch;
use chrono::NaiveDate;
use sha2::{Digest, Sha256};

use super::columns::ReadingsView;
use super::schema::{
    col, conflicts_schema, quarantine_schema, readings_schema, value_type, CONFLICTS, QUARANTINE,
    READINGS,
};
use super::{atomic, partition_dir, reader, StoreError};
use crate::model::Quality;

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CompactStats {
    pub partitions: usize,
    pub partitions_rewritten: usize,
    pub files_in: usize,
    pub files_out: usize,
    pub rows_in: usize,
    pub rows_out: usize,
    pub exact_duplicates_removed: usize,
    pub conflicts: usize,
    /// Quarantine partitions: files merged, and rows equal in every column dropped.
    pub quarantine_files_in: usize,
    pub quarantine_files_out: usize,
    pub quarantine_duplicates_removed: usize,
}

/// Compacts every readings partition with dates in `from..=to`.
pub fn compact(root: &Path, from: NaiveDate, to: NaiveDate) -> Result<CompactStats, StoreError> {
    let mut total = CompactStats::default();
    for (date, dir) in reader::list_partitions(root, READINGS)? {
        if date < from || date > to {
            continue;
        }
        let s = compact_partition(root, date, &dir)?;
        total.partitions += 1;
        total.partitions_rewritten += s.partitions_rewritten;
        total.files_in += s.files_in;
        total.files_out += s.files_out;
        total.rows_in += s.rows_in;
        total.rows_out += s.rows_out;
        total.exact_duplicates_removed += s.exact_duplicates_removed;
        total.conflicts += s.conflicts;
    }
    for (date, dir) in reader::list_partitions(root, QUARANTINE)? {
        if date < from || date > to {
            continue;
        }
        let (files_in, files_out, removed) = compact_quarantine(&dir)?;
        total.quarantine_files_in += files_in;
        total.quarantine_files_out += files_out;
        total.quarantine_duplicates_removed += removed;
    }
    Ok(total)
}

/// Merges one quarantine partition's files into one, keeping the first of
/// rows equal in every column, in file order. Returns (files in, files out,
/// rows dropped).
fn compact_quarantine(dir: &Path) -> Result<(usize, usize, usize), StoreError> {
    let files = reader::partition_files(dir)?;
    let mut batches = Vec::new();
    for f in &files {
        batches.extend(reader::read_file(f)?);
    }
    let all = concat_batches(&quarantine_schema(), &batches)
        .map_err(|e| StoreError::Schema(e.to_string()))?;
    let rows = arrow::row::RowConverter::new(
        all.schema()
            .fields()
            .iter()
            .map(|f| arrow::row::SortField::new(f.data_type().clone()))
            .collect(),
    )
    .and_then(|c| c.convert_columns(all.columns()))
    .map_err(|e| StoreError::Schema(e.to_string()))?;
    let mut seen = HashSet::with_capacity(all.num_rows());
    let keep: Vec<u32> = (0..all.num_rows())
        .filter(|&i| seen.insert(rows.row(i)))
        .map(|i| i as u32)
        .collect();
    let removed = all.num_rows() - keep.len();
    let compacted = |f: &PathBuf| {
        f.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("part-compacted-"))
    };
    if files.is_empty() || (files.len() == 1 && removed == 0 && compacted(&files[0])) {
        return Ok((files.len(), files.len(), 0));
    }
    let keep = UInt32Array::from(keep);
    let columns = all
        .columns()
        .iter()
        .map(|c| take(c.as_ref(), &keep, None))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StoreError::Schema(e.to_string()))?;
    let out = RecordBatch::try_new(quarantine_schema(), columns)
        .map_err(|e| StoreError::Schema(e.to_string()))?;
    let out_path = dir.join(format!("part-compacted-{}.parquet", inputs_tag(&files)));
    atomic::write_parquet_atomic(&out_path, quarantine_schema(), &[out])?;
    // As for readings: inputs go only once the merged file is durable.
    for f in &files {
        if f != &out_path {
            std::fs::remove_file(f).map_err(|e| StoreError::io(f, e))?;
        }
    }
    atomic::sync_dir(dir)?;
    Ok((files.len(), 1, removed))
}

fn compact_partition(root: &Path, date: NaiveDate, dir: &Path) -> Result<CompactStats, StoreError> {
    let files = reader::partition_files(dir)?;
    let mut stats = CompactStats {
        files_in: files.len(),
        ..Default::default()
    };
    let mut batches = Vec::new();
    for f in &files {
        batches.extend(reader::read_file(f)?);
    }
    let all = concat_batches(&readings_schema(), &batches)
        .map_err(|e| StoreError::Schema(e.to_string()))?;
    stats.rows_in = all.num_rows();
    let plan = plan(&all)?;
    stats.exact_duplicates_removed = plan.exact_duplicates;
    stats.conflicts = plan.conflicts.len();
    let already_compact = files.len() == 1
        && plan.exact_duplicates == 0
        && files[0]
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("part-compacted-"));
    if files.is_empty() || already_compact {
        stats.rows_out = stats.rows_in;
        stats.files_out = files.len();
        return Ok(stats);
    }
    let tag = inputs_tag(&files);
    let out = build_output(&all, &plan)?;
    stats.rows_out = out.num_rows();
    let out_path = dir.join(format!("part-compacted-{tag}.parquet"));
    atomic::write_parquet_atomic(&out_path, readings_schema(), &[out])?;
    // A conflict compacted before is found again (its rows are kept, flagged):
    // the conflicts dataset gets only pairs it does not hold yet.
    let new = if plan.conflicts.is_empty() {
        Vec::new()
    } else {
        let known = recorded_conflicts(root, date)?;
        let v = ReadingsView::new(&all)?;
        plan.conflicts
            .iter()
            .copied()
            .filter(|&(a, b)| !known.contains(&conflict_key(&v, a as usize, b as usize)))
            .collect()
    };
    if !new.is_empty() {
        let c = conflicts_batch(&all, &new)?;
        let p = partition_dir(root, CONFLICTS, date).join(format!("conflicts-{tag}.parquet"));
        atomic::write_parquet_atomic(&p, conflicts_schema(), &[c])?;
    }
    // Inputs go only after the merged file is durable; a crash in between leaves
    // exact duplicates that the next compaction removes.
    for f in &files {
        if f != &out_path {
            std::fs::remove_file(f).map_err(|e| StoreError::io(f, e))?;
        }
    }
    atomic::sync_dir(dir)?;
    stats.files_out = 1;
    stats.partitions_rewritten = 1;
    Ok(stats)
}

/// (meter, ts, channel, lower value, higher value): one conflict, whichever
/// value came first.
type ConflictKey = (String, i64, String, i128, i128);

fn conflict_key(v: &ReadingsView, a: usize, b: usize) -> ConflictKey {
    let (x, y) = (v.value.value(a), v.value.value(b));
    (
        v.meter_id.value(a).to_string(),
        v.ts.value(a),
        v.channel.value(a).to_string(),
        x.min(y),
        x.max(y),
    )
}

/// Conflicts the dataset already holds for `date`.
fn recorded_conflicts(root: &Path, date: NaiveDate) -> Result<HashSet<ConflictKey>, StoreError> {
    let mut known = HashSet::new();
    let dir = partition_dir(root, CONFLICTS, date);
    if !dir.is_dir() {
        return Ok(known);
    }
    for f in reader::partition_files(&dir)? {
        for b in reader::read_file(&f)? {
            let column = |name: &str| {
                b.column_by_name(name).ok_or_else(|| {
                    StoreError::Schema(format!("{}: no column '{name}'", f.display()))
                })
            };
            let wrong = |name: &str| {
                StoreError::Schema(format!("{}: '{name}' has the wrong type", f.display()))
            };
            let string = |name: &str| -> Result<StringArray, StoreError> {
                column(name)?
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .cloned()
                    .ok_or_else(|| wrong(name))
            };
            let value = |name: &str| -> Result<Decimal128Array, StoreError> {
                column(name)?
                    .as_any()
                    .downcast_ref::<Decimal128Array>()
                    .cloned()
                    .ok_or_else(|| wrong(name))
            };
            let (meter, channel) = (string("meter_id")?, string("channel")?);
            let (first, other) = (value("value_kept_first")?, value("value_other")?);
            let ts = column("ts")?
                .as_any()
                .downcast_ref::<TimestampMillisecondArray>()
                .cloned()
                .ok_or_else(|| wrong("ts"))?;
            for i in 0..b.num_rows() {
                let (x, y) = (first.value(i), other.value(i));
                known.insert((
                    meter.value(i).to_string(),
                    ts.value(i),
                    channel.value(i).to_string(),
                    x.min(y),
                    x.max(y),
                ));
            }
        }
    }
    Ok(known)
}

fn inputs_tag(files: &[PathBuf]) -> String {
    let mut h = Sha256::new();
    for f in files {
        h.update(
            f.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .as_bytes(),
        );
        h.update([0]);
    }
    hex::encode(&h.finalize()[..8])
}

struct Plan {
    keep: Vec<u32>,
    conflicted: Vec<bool>,
    conflicts: Vec<(u32, u32)>,
    exact_duplicates: usize,
}

fn plan(all: &RecordBatch) -> Result<Plan, StoreError> {
    let sort = [col::METER_ID, col::CHANNEL, col::TS, col::RECEIVED_AT].map(|c| SortColumn {
        values: all.column(c).clone(),
        options: None,
    });
    let order = lexsort_to_indices(&sort, None).map_err(|e| StoreError::Schema(e.to_string()))?;
    let v = ReadingsView::new(all)?;
    let same_key = |a: usize, b: usize| {
        v.meter_id.value(a) == v.meter_id.value(b)
            && v.channel.value(a) == v.channel.value(b)
            && v.ts.value(a) == v.ts.value(b)
    };
    let mut p = Plan {
        keep: Vec::with_capacity(order.len()),
        conflicted: Vec::with_capacity(order.len()),
        conflicts: Vec::new(),
        exact_duplicates: 0,
    };
    let idx = order.values();
    let mut i = 0;
    while i < idx.len() {
        let first = idx[i] as usize;
        let mut j = i + 1;
        while j < idx.len() && same_key(first, idx[j] as usize) {
            j += 1;
        }
        // Group i..j shares a key; keep the first row of each distinct value.
        let mut kept: Vec<usize> = Vec::new();
        for &row in &idx[i..j] {
            let row = row as usize;
            if kept.iter().any(|&k| v.value.value(k) == v.value.value(row)) {
                p.exact_duplicates += 1;
            } else {
                kept.push(row);
            }
        }
        let conflict = kept.len() > 1;
        for &k in &kept[1..] {
            p.conflicts.push((kept[0] as u32, k as u32));
        }
        for k in kept {
            p.keep.push(k as u32);
            p.conflicted.push(conflict);
        }
        i = j;
    }
    Ok(p)
}

fn build_output(all: &RecordBatch, plan: &Plan) -> Result<RecordBatch, StoreError> {
    let indices = UInt32Array::from(plan.keep.clone());
    let mut cols: Vec<ArrayRef> = all
        .columns()
        .iter()
        .map(|c| take(c.as_ref(), &indices, None))
        .collect::<Result<_, _>>()
        .map_err(|e| StoreError::Schema(e.to_string()))?;
    if plan.conflicted.iter().any(|c| *c) {
        let q = cols[col::QUALITY]
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("quality is utf8");
        let mut b = StringBuilder::with_capacity(q.len(), q.len() * 2);
        for (i, conflicted) in plan.conflicted.iter().enumerate() {
            if *conflicted {
                let flags = Quality::parse(q.value(i)).map_err(StoreError::Schema)?;
                b.append_value((flags | Quality::CONFLICT).to_string());
            } else {
                b.append_value(q.value(i));
            }
        }
        cols[col::QUALITY] = Arc::new(b.finish());
    }
    RecordBatch::try_new(readings_schema(), cols).map_err(|e| StoreError::Schema(e.to_string()))
}

fn conflicts_batch(all: &RecordBatch, pairs: &[(u32, u32)]) -> Result<RecordBatch, StoreError> {
    let v = ReadingsView::new(all)?;
    let (a, b): (Vec<usize>, Vec<usize>) =
        pairs.iter().map(|&(a, b)| (a as usize, b as usize)).unzip();
    let strings = |rows: &[usize], f: &dyn Fn(usize) -> String| -> ArrayRef {
        Arc::new(StringArray::from(
            rows.iter().map(|&r| f(r)).collect::<Vec<_>>(),
        ))
    };
    let source = |r: usize| {
        format!(
            "{}/{}/{}",
            v.protocol.value(r),
            v.collector.value(r),
            v.address.value(r)
        )
    };
    let value = |rows: &[usize]| -> Result<ArrayRef, StoreError> {
        let arr = Decimal128Array::from(rows.iter().map(|&r| v.value.value(r)).collect::<Vec<_>>());
        let (p, s) = match value_type() {
            arrow::datatypes::DataType::Decimal128(p, s) => (p, s),
            _ => unreachable!("value is decimal128"),
        };
        Ok(Arc::new(
            arr.with_precision_and_scale(p, s)
                .map_err(|e| StoreError::Schema(e.to_string()))?,
        ))
    };
    let ts = |rows: &[usize], arr: &TimestampMillisecondArray| -> ArrayRef {
        Arc::new(
            TimestampMillisecondArray::from(rows.iter().map(|&r| arr.value(r)).collect::<Vec<_>>())
                .with_timezone("UTC"),
        )
    };
    RecordBatch::try_new(
        conflicts_schema(),
        vec![
            strings(&a, &|r| v.meter_id.value(r).to_string()),
            ts(&a, v.ts),
            strings(&a, &|r| v.channel.value(r).to_string()),
            value(&a)?,
            value(&b)?,
            strings(&a, &source),
            strings(&b, &source),
            ts(&a, v.received),
            ts(&b, v.received),
        ],
    )
    .map_err(|e| StoreError::Schema(e.to_string()))
}
