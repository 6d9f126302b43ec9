//! What is in a lake: partitions, files, rows, meters, channels, time range, quality.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde::Serialize;

use super::schema::{QUARANTINE, READINGS};
use super::{reader, StoreError};

#[derive(Debug, Default, Serialize)]
pub struct PartitionReport {
    pub date: String,
    pub files: usize,
    pub bytes: u64,
    pub rows: u64,
    pub meters: usize,
}

#[derive(Debug, Default, Serialize)]
pub struct LakeReport {
    pub root: String,
    pub partitions: Vec<PartitionReport>,
    pub files: usize,
    pub bytes: u64,
    pub rows: u64,
    pub meters: usize,
    pub channels: BTreeMap<String, u64>,
    pub quality: BTreeMap<String, u64>,
    pub first_ts: Option<String>,
    pub last_ts: Option<String>,
    pub quarantined_rows: u64,
    /// Files that could not be read, with the reason. Reported, never fatal.
    pub unreadable_files: Vec<(String, String)>,
}

pub fn inspect(root: &Path) -> Result<LakeReport, StoreError> {
    let mut rep = LakeReport {
        root: root.display().to_string(),
        ..Default::default()
    };
    let mut all_meters: HashSet<String> = HashSet::new();
    let (mut min_ts, mut max_ts) = (i64::MAX, i64::MIN);
    for (date, dir) in reader::list_partitions(root, READINGS)? {
        let mut part = PartitionReport {
            date: date.to_string(),
            ..Default::default()
        };
        let mut meters: HashSet<String> = HashSet::new();
        for f in reader::partition_files(&dir)? {
            part.files += 1;
            part.bytes += std::fs::metadata(&f).map(|m| m.len()).unwrap_or(0);
            let batches = match reader::read_file_columns(
                &f,
                Some(&["meter_id", "ts", "channel", "quality"]),
            ) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(file = %f.display(), error = %e, "unreadable Parquet file");
                    rep.unreadable_files
                        .push((f.display().to_string(), e.to_string()));
                    continue;
                }
            };
            for b in &batches {
                let get = |name: &str| b.column_by_name(name).cloned();
                let (Some(m), Some(t), Some(c), Some(q)) =
                    (get("meter_id"), get("ts"), get("channel"), get("quality"))
                else {
                    rep.unreadable_files
                        .push((f.display().to_string(), "missing columns".into()));
                    continue;
                };
                let m = m.as_any().downcast_ref::<arrow::array::StringArray>();
                let t = t
                    .as_any()
                    .downcast_ref::<arrow::array::TimestampMillisecondArray>();
                let c = c.as_any().downcast_ref::<arrow::array::StringArray>();
                let q = q.as_any().downcast_ref::<arrow::array::StringArray>();
                let (Some(m), Some(t), Some(c), Some(q)) = (m, t, c, q) else {
                    rep.unreadable_files
                        .push((f.display().to_string(), "columns of the wrong type".into()));
                    continue;
                };
                part.rows += b.num_rows() as u64;
                let mut last_meter: Option<&str> = None;
                for i in 0..b.num_rows() {
                    let meter = m.value(i);
                    if last_meter != Some(meter) {
                        if !meters.contains(meter) {
                            meters.insert(meter.to_string());
                        }
                        last_meter = Some(meter);
                    }
                    min_ts = min_ts.min(t.value(i));
                    max_ts = max_ts.max(t.value(i));
                    *rep.channels.entry(c.value(i).to_string()).or_default() += 1;
                    *rep.quality.entry(q.value(i).to_string()).or_default() += 1;
                }
            }
        }
        part.meters = meters.len();
        all_meters.extend(meters);
        rep.files += part.files;
        rep.bytes += part.bytes;
        rep.rows += part.rows;
        rep.partitions.push(part);
    }
    rep.meters = all_meters.len();
    if min_ts <= max_ts {
        let fmt = |ms: i64| {
            chrono::DateTime::from_timestamp_millis(ms)
                .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                .unwrap_or_default()
        };
        rep.first_ts = Some(fmt(min_ts));
        rep.last_ts = Some(fmt(max_ts));
    }
    for (_, dir) in reader::list_partitions(root, QUARANTINE)? {
        for f in reader::partition_files(&dir)? {
            match reader::file_rows(&f) {
                Ok(n) => rep.quarantined_rows += n,
                Err(e) => rep
                    .unreadable_files
                    .push((f.display().to_string(), e.to_string())),
            }
        }
    }
    Ok(rep)
}
