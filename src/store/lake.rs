//! The lake writer: accept -> spool (durable) -> flush -> committed Parquet.
//!
//! File names carry the spool segment id, so flushing a segment twice (a
//! crash after committing some partitions, then a replay) never writes a row
//! twice: partitions whose file already exists are skipped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arrow::array::{BinaryBuilder, StringBuilder, TimestampMillisecondArray};
use arrow::record_batch::RecordBatch;
use chrono::NaiveDate;
use rayon::prelude::*;
use std::sync::Arc;

use super::schema::{quarantine_schema, QUARANTINE, READINGS};
use super::spool::{self, Entry, QuarantineRecord, Segment, Stamp, Stamps, MAX_STAMP_WINDOW};
use super::{atomic, partition_dir, StoreError};
use crate::model::Reading;

#[derive(Debug, Clone)]
pub struct LakeOptions {
    /// Names this writer's files and spool; two processes writing one lake need different ids.
    pub writer_id: String,
    /// Where the spool lives; default `<lake>/_spool/<writer_id>`.
    pub spool_dir: Option<PathBuf>,
    /// Receive stamps kept (MQTT ingest's `[ingest] redelivery_window`,
    /// 1..=`MAX_STAMP_WINDOW`): the stamps of the last this many stamped
    /// messages are carried into each new segment, 16 bytes each per seal.
    /// Writers that record none keep whatever a spool holds (none).
    pub stamp_window: usize,
}

impl LakeOptions {
    pub fn new(writer_id: impl Into<String>) -> Self {
        LakeOptions {
            writer_id: writer_id.into(),
            spool_dir: None,
            stamp_window: MAX_STAMP_WINDOW,
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlushStats {
    pub readings: usize,
    pub quarantined: usize,
    pub files: usize,
    pub rejected: usize,
}

pub struct Lake {
    root: PathBuf,
    writer_id: String,
    spool_dir: PathBuf,
    segment: Segment,
    pending: Vec<Entry>,
    /// The last receive stamps accepted (`accept_stamped`), also found in
    /// the current segment: it is written into each new segment before an
    /// older one may be removed, so it outlives the Parquet commits.
    stamps: Stamps,
    /// Flush statistics of the spool replay done at open.
    pub replayed: FlushStats,
}

impl Lake {
    /// Opens (creating if needed) a lake and replays any spool a crash left
    /// behind. Receive stamps found in the spool are kept (the last
    /// `opts.stamp_window`).
    pub fn open(root: &Path, opts: LakeOptions) -> Result<Lake, StoreError> {
        let window = opts.stamp_window;
        validate_writer_id(&opts.writer_id)?;
        atomic::create_dir_durable(root)?;
        let spool_dir = opts
            .spool_dir
            .unwrap_or_else(|| root.join("_spool").join(&opts.writer_id));
        let mut replayed = FlushStats::default();
        let mut stamps = Stamps::new(window.clamp(1, MAX_STAMP_WINDOW));
        let mut done = Vec::new();
        for (id, path) in spool::list_segments(&spool_dir)? {
            let replay = spool::read_segment(&path)?;
            if replay.entries.is_empty() {
                // A clean stop leaves one segment holding only stamps: no
                // recovery, so not worth an info line at every start.
                tracing::debug!(segment = %path.display(), stamps = replay.stamps.len(), "spool segment without entries (receive stamps only)");
            } else {
                tracing::info!(segment = %path.display(), entries = replay.entries.len(), "replaying spool segment");
            }
            let stats = commit_entries(root, &opts.writer_id, &id, &replay.entries)?;
            replayed.readings += stats.readings;
            replayed.quarantined += stats.quarantined;
            replayed.files += stats.files;
            replayed.rejected += stats.rejected;
            for s in replay.stamps {
                stamps.insert(s);
            }
            done.push(path);
        }
        // The stamps move to the new segment before the old ones go: a
        // crash in between leaves copies, which the next replay merges; a
        // failed carry leaves the old segments for the next open.
        let segment = new_segment(&spool_dir, &stamps)?;
        if !stamps.is_empty() {
            tracing::info!(
                stamps = stamps.len(),
                "carried receive stamps into the new spool segment"
            );
        }
        for path in &done {
            std::fs::remove_file(path).map_err(|e| StoreError::io(path, e))?;
        }
        if !done.is_empty() {
            atomic::sync_dir(&spool_dir)?;
        }
        Ok(Lake {
            root: root.to_path_buf(),
            writer_id: opts.writer_id,
            spool_dir,
            segment,
            pending: Vec::new(),
            stamps,
            replayed,
        })
    }

    /// Receive stamps this writer accepted lately (including before a
    /// restart): at most the last `LakeOptions::stamp_window`.
    pub fn stamps(&self) -> &Stamps {
        &self.stamps
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// This writer's spool directory (other durable state of the writer may live beside it).
    pub fn spool_dir(&self) -> &Path {
        &self.spool_dir
    }

    /// Number of accepted entries not yet committed to Parquet.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Makes readings durable in the spool. When this returns Ok the source may be acknowledged.
    pub fn accept(&mut self, readings: &[Reading]) -> Result<(), StoreError> {
        self.accept_owned(readings.to_vec(), Vec::new())
    }

    /// Makes quarantined input durable; it lands in the `quarantine` dataset at the next flush.
    pub fn quarantine(&mut self, recs: &[QuarantineRecord]) -> Result<(), StoreError> {
        self.accept_owned(Vec::new(), recs.to_vec())
    }

    /// Makes readings and quarantined input durable with one spool write and
    /// one fsync (group commit), taking them by value (no copies). When this
    /// returns Ok the sources of all of them may be acknowledged.
    pub fn accept_owned(
        &mut self,
        readings: Vec<Reading>,
        quarantined: Vec<QuarantineRecord>,
    ) -> Result<(), StoreError> {
        self.accept_stamped(readings, quarantined, Vec::new())
    }

    /// `accept_owned`, and receive stamps in the same spool write and fsync
    /// (stamps may come without entries). The stamps stay in the spool
    /// while they are among the last `window` accepted, across seals,
    /// commits and restarts.
    pub fn accept_stamped(
        &mut self,
        readings: Vec<Reading>,
        quarantined: Vec<QuarantineRecord>,
        stamps: Vec<Stamp>,
    ) -> Result<(), StoreError> {
        if readings.is_empty() && quarantined.is_empty() && stamps.is_empty() {
            return Ok(());
        }
        // Moved once, straight into `pending`, and written from there.
        let start = self.pending.len();
        self.pending.reserve(readings.len() + quarantined.len());
        self.pending
            .extend(readings.into_iter().map(Entry::Reading));
        self.pending
            .extend(quarantined.into_iter().map(Entry::Quarantine));
        if let Err(e) = self.segment.append_stamped(&stamps, &self.pending[start..]) {
            // Not durable, so never committed: the source was not acknowledged.
            self.pending.truncate(start);
            return Err(e);
        }
        for s in stamps {
            self.stamps.insert(s);
        }
        Ok(())
    }

    /// Commits everything pending to Parquet, then removes its spool segment.
    pub fn flush(&mut self) -> Result<FlushStats, StoreError> {
        match self.seal()? {
            Some(sealed) => sealed.commit(),
            None => Ok(FlushStats::default()),
        }
    }

    /// Closes the current spool segment (a new one takes further entries) and
    /// returns it with its entries, for `Sealed::commit` on any thread. Until
    /// that commit the segment stays on disk and a restart replays it.
    pub fn seal(&mut self) -> Result<Option<Sealed>, StoreError> {
        if self.pending.is_empty() {
            return Ok(None);
        }
        // Durable in the next segment before the sealed one can be removed.
        let next = new_segment(&self.spool_dir, &self.stamps)?;
        let sealed = std::mem::replace(&mut self.segment, next);
        // The next segment will likely be as long: growing `pending` from
        // empty reallocated and copied it (and faulted in fresh pages) at
        // every doubling, a large part of MQTT ingest's spool thread.
        let room = self.pending.len().min(1 << 20);
        let entries = std::mem::replace(&mut self.pending, Vec::with_capacity(room));
        Ok(Some(Sealed {
            root: self.root.clone(),
            writer_id: self.writer_id.clone(),
            spool_dir: self.spool_dir.clone(),
            segment_id: sealed.id.clone(),
            segment_path: sealed.path.clone(),
            entries,
        }))
    }
}

/// A closed spool segment and its entries, not yet in Parquet.
pub struct Sealed {
    root: PathBuf,
    writer_id: String,
    spool_dir: PathBuf,
    segment_id: String,
    segment_path: PathBuf,
    entries: Vec<Entry>,
}

impl Sealed {
    /// Number of entries (readings and quarantined records).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes the entries to Parquet, then removes the spool segment.
    pub fn commit(self) -> Result<FlushStats, StoreError> {
        let stats = commit_entries(&self.root, &self.writer_id, &self.segment_id, &self.entries)?;
        std::fs::remove_file(&self.segment_path)
            .map_err(|e| StoreError::io(&self.segment_path, e))?;
        atomic::sync_dir(&self.spool_dir)?;
        Ok(stats)
    }
}

/// A new segment holding a copy of the live stamps (written and fsynced;
/// nothing, and no fsync, if there are none). If the copy fails, the new
/// segment is removed and the error returned: the caller keeps (and must
/// not remove) the segment that holds the stamps now.
fn new_segment(dir: &Path, stamps: &Stamps) -> Result<Segment, StoreError> {
    let mut segment = Segment::create(dir, spool::new_segment_id())?;
    if stamps.is_empty() {
        return Ok(segment);
    }
    let live: Vec<Stamp> = stamps.live().collect();
    if let Err(e) = segment.append_stamped(&live, &[]) {
        let path = segment.path.clone();
        drop(segment);
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok(segment)
}

impl Drop for Lake {
    fn drop(&mut self) {
        // An empty segment carries nothing: remove it so idle restarts leave
        // no litter. One holding stamps keeps them for the next run.
        if self.pending.is_empty() && self.stamps.is_empty() {
            let _ = std::fs::remove_file(&self.segment.path);
        }
    }
}

fn validate_writer_id(id: &str) -> Result<(), StoreError> {
    let ok = !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(StoreError::Config(format!(
            "writer id '{id}' must be non-empty ASCII letters, digits, '-' or '_'"
        )))
    }
}

pub(crate) fn utc_date(ts_ms: i64) -> NaiveDate {
    chrono::DateTime::from_timestamp_millis(ts_ms)
        .map(|t| t.date_naive())
        .unwrap_or(NaiveDate::MIN)
}

/// Rows per Arrow batch when a segment's readings are built in parallel.
const BUILD_CHUNK_ROWS: usize = 64 * 1024;

/// Writes one segment's entries, one file per date partition and dataset.
fn commit_entries(
    root: &Path,
    writer_id: &str,
    segment_id: &str,
    entries: &[Entry],
) -> Result<FlushStats, StoreError> {
    let mut stats = FlushStats::default();
    let mut readings: BTreeMap<NaiveDate, Vec<&Reading>> = BTreeMap::new();
    let mut quarantined: BTreeMap<NaiveDate, Vec<QuarantineRecord>> = BTreeMap::new();
    for e in entries {
        match e {
            Entry::Reading(r) => readings.entry(utc_date(r.ts_ms)).or_default().push(r),
            Entry::Quarantine(q) => quarantined
                .entry(utc_date(q.received_ms))
                .or_default()
                .push(q.clone()),
        }
    }
    let file_name = format!("part-{writer_id}-{segment_id}.parquet");
    for (date, mut rows) in readings {
        sort_rows(&mut rows);
        // Built in fixed chunks on every core (the bytes never depend on the
        // core count); a multiple of the Parquet writer's 1024-row mini-batch,
        // so pages split where they would for one batch.
        let built: Vec<(RecordBatch, Vec<(&Reading, StoreError)>)> = rows
            .par_chunks(BUILD_CHUNK_ROWS)
            .map(super::columns::segment_batch)
            .collect();
        let mut batches = Vec::with_capacity(built.len());
        let mut accepted = 0;
        for (batch, bad) in built {
            for (r, e) in bad {
                // Values that do not fit the lake's decimal go to quarantine, never rounded.
                stats.rejected += 1;
                tracing::warn!(meter = %r.meter_id, channel = %r.channel, error = %e, "reading quarantined");
                quarantined
                    .entry(utc_date(r.received_ms))
                    .or_default()
                    .push(QuarantineRecord {
                        received_ms: r.received_ms,
                        protocol: r.source.protocol,
                        collector: r.source.collector.to_string(),
                        address: r.source.address.to_string(),
                        reason: e.to_string(),
                        payload: serde_json::to_vec(r).unwrap_or_default(),
                    });
            }
            if batch.num_rows() > 0 {
                accepted += batch.num_rows();
                batches.push(batch);
            }
        }
        if accepted == 0 {
            continue;
        }
        let path = partition_dir(root, READINGS, date).join(&file_name);
        stats.readings += accepted;
        if path.exists() {
            continue; // committed before a crash; replay must not double it
        }
        atomic::write_parquet_atomic(&path, super::schema::readings_schema(), &batches)?;
        stats.files += 1;
    }
    for (date, recs) in quarantined {
        let path = partition_dir(root, QUARANTINE, date).join(&file_name);
        stats.quarantined += recs.len();
        if path.exists() {
            continue;
        }
        atomic::write_parquet_atomic(&path, quarantine_schema(), &[quarantine_batch(&recs)])?;
        stats.files += 1;
    }
    Ok(stats)
}

/// Sorts by (meter, channel, ts), stable. Meter ids are ranked once (and
/// looked up once per run of equal ids: a message carries one meter), so the
/// sort compares small keys that hold everything it needs, never following
/// a row pointer; the row index ends each key, which makes the unstable sort stable.
fn sort_rows(rows: &mut [&Reading]) {
    let mut rank: super::scan::FxMap<&str, u64> = Default::default();
    let mut prev: Option<&str> = None;
    for r in rows.iter() {
        if prev != Some(r.meter_id.as_str()) {
            rank.entry(r.meter_id.as_str()).or_insert(0);
            prev = Some(r.meter_id.as_str());
        }
    }
    let mut ids: Vec<&str> = rank.keys().copied().collect();
    ids.sort_unstable();
    for (i, id) in ids.into_iter().enumerate() {
        rank.insert(id, i as u64);
    }
    let mut keys: Vec<(u64, i64, usize)> = Vec::with_capacity(rows.len());
    let mut prev: (&str, u64) = ("", 0);
    for (i, r) in rows.iter().enumerate() {
        if i == 0 || prev.0 != r.meter_id {
            prev = (r.meter_id.as_str(), rank[r.meter_id.as_str()]);
        }
        keys.push(((prev.1 << 16) | r.channel as u64, r.ts_ms, i));
    }
    keys.par_sort_unstable();
    let sorted: Vec<&Reading> = keys.iter().map(|k| rows[k.2]).collect();
    rows.copy_from_slice(&sorted);
}

pub(crate) fn quarantine_batch(recs: &[QuarantineRecord]) -> RecordBatch {
    let mut protocol = StringBuilder::new();
    let mut collector = StringBuilder::new();
    let mut address = StringBuilder::new();
    let mut reason = StringBuilder::new();
    let mut payload = BinaryBuilder::new();
    for q in recs {
        protocol.append_value(q.protocol.as_str());
        collector.append_value(&q.collector);
        address.append_value(&q.address);
        reason.append_value(&q.reason);
        payload.append_value(&q.payload);
    }
    let received =
        TimestampMillisecondArray::from(recs.iter().map(|q| q.received_ms).collect::<Vec<_>>())
            .with_timezone("UTC");
    RecordBatch::try_new(
        quarantine_schema(),
        vec![
            Arc::new(received),
            Arc::new(protocol.finish()),
            Arc::new(collector.finish()),
            Arc::new(address.finish()),
            Arc::new(reason.finish()),
            Arc::new(payload.finish()),
        ],
    )
    .expect("columns match schema")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{reader, soak_reading};

    #[test]
    fn rows_sort_by_meter_channel_time_like_the_plain_sort_and_stay_stable() {
        use crate::model::{Channel, Protocol, Quality, Source};
        let mut all = Vec::new();
        let mut x: u64 = 7;
        for n in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            all.push(Reading {
                meter_id: format!("M{:03}", x % 37),
                ts_ms: (x >> 8) as i64 % 50,
                channel: if x.is_multiple_of(3) {
                    Channel::ImportActiveTotal
                } else {
                    Channel::ImportActiveT1
                },
                value: rust_decimal::Decimal::from(n),
                quality: Quality::OK,
                source: Source {
                    protocol: Protocol::Sim,
                    collector: "t".into(),
                    address: "t".into(),
                },
                received_ms: 0,
            });
        }
        let mut ours: Vec<&Reading> = all.iter().collect();
        sort_rows(&mut ours);
        let mut plain: Vec<&Reading> = all.iter().collect();
        plain.sort_by(|a, b| {
            (&a.meter_id, a.channel, a.ts_ms).cmp(&(&b.meter_id, b.channel, b.ts_ms))
        });
        // Equal keys keep their input order (values tell the duplicates apart).
        assert_eq!(ours, plain);
    }

    #[test]
    fn a_segment_of_several_build_chunks_commits_every_row_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut lake = Lake::open(dir.path(), LakeOptions::new("w")).unwrap();
        let n = 2 * BUILD_CHUNK_ROWS + 5;
        let bad = BUILD_CHUNK_ROWS + 3;
        // One day, 97 meters: one file of three chunks, one value too precise.
        let rs: Vec<Reading> = (0..n)
            .map(|i| {
                let mut r = soak_reading(i);
                r.ts_ms = 1_790_000_000_000 + i as i64;
                if i == bad {
                    r.value = rust_decimal::Decimal::new(100_001, 5);
                }
                r
            })
            .collect();
        lake.accept(&rs).unwrap();
        let s = lake.flush().unwrap();
        assert_eq!((s.readings, s.rejected, s.quarantined), (n - 1, 1, 1));
        let back = reader::read_all_readings(dir.path()).unwrap();
        let mut want: Vec<Reading> = rs
            .into_iter()
            .enumerate()
            .filter(|(i, _)| *i != bad)
            .map(|(_, r)| r)
            .collect();
        want.sort_by(|a, b| (&a.meter_id, a.ts_ms).cmp(&(&b.meter_id, b.ts_ms)));
        assert_eq!(back, want);
    }

    #[test]
    fn a_failed_spool_write_leaves_nothing_pending_and_hides_no_later_batch_from_a_replay() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut lake = Lake::open(root, LakeOptions::new("w")).unwrap();
        lake.accept(&(0..10).map(soak_reading).collect::<Vec<_>>())
            .unwrap();
        // The disk fills part-way through the second batch's third record.
        lake.segment.fail_after = Some(250);
        let refused: Vec<Reading> = (10..20).map(soak_reading).collect();
        assert!(lake.accept(&refused).is_err());
        assert_eq!(lake.pending(), 10, "the refused batch is not pending");
        // The source was not acknowledged; the next batch is.
        lake.accept(&(20..30).map(soak_reading).collect::<Vec<_>>())
            .unwrap();
        assert_eq!(lake.pending(), 20);
        // A crash now: the replay finds both accepted batches, and none of
        // the refused one.
        drop(lake);
        let lake = Lake::open(root, LakeOptions::new("w")).unwrap();
        assert_eq!(lake.replayed.readings, 20);
        let mut got = reader::read_all_readings(root).unwrap();
        got.sort_by_key(|r| r.ts_ms);
        let want: Vec<_> = (0..10).chain(20..30).map(soak_reading).collect();
        assert_eq!(got, want);
    }

    fn stamp(key: u64, received_ms: i64) -> Stamp {
        Stamp { key, received_ms }
    }

    fn segments(root: &Path) -> usize {
        spool::list_segments(&root.join("_spool").join("w"))
            .unwrap()
            .len()
    }

    #[test]
    fn stamps_outlive_a_crash_the_parquet_commit_of_their_segment_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut lake = Lake::open(root, LakeOptions::new("w")).unwrap();
        lake.accept_stamped(vec![soak_reading(1)], vec![], vec![stamp(1, 10)])
            .unwrap();
        // SIGKILL after the fsync: the replay finds the stamp.
        std::mem::forget(lake);
        let mut lake = Lake::open(root, LakeOptions::new("w")).unwrap();
        assert_eq!(lake.replayed.readings, 1);
        assert_eq!(lake.stamps().get(1), Some(10));
        // Its segment is in Parquet and gone; the stamp lives on in the next.
        lake.accept_stamped(vec![soak_reading(2)], vec![], vec![stamp(2, 20)])
            .unwrap();
        lake.flush().unwrap();
        assert_eq!(reader::read_all_readings(root).unwrap().len(), 2);
        // A clean stop keeps the segment that holds them, and only it.
        drop(lake);
        assert_eq!(segments(root), 1);
        let lake = Lake::open(root, LakeOptions::new("w")).unwrap();
        let live: Vec<_> = lake.stamps().live().collect();
        assert_eq!(live, vec![stamp(1, 10), stamp(2, 20)]);
        assert_eq!(lake.replayed.readings, 0, "nothing committed twice");
        drop(lake);
        let lake = Lake::open(root, LakeOptions::new("w")).unwrap();
        assert_eq!(lake.stamps().len(), 2, "idle restarts keep them too");
        drop(lake);
        assert_eq!(segments(root), 1);
    }

    #[test]
    fn a_failed_carry_keeps_the_old_segment_and_its_stamps_for_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut lake = Lake::open(root, LakeOptions::new("w")).unwrap();
        lake.accept_stamped(vec![soak_reading(1)], vec![], vec![stamp(1, 10)])
            .unwrap();
        std::mem::forget(lake);
        let spool = root.join("_spool").join("w");
        let (_, old) = spool::list_segments(&spool).unwrap().pop().unwrap();
        // The disk fills while open copies the stamps into the new segment:
        // the old segment, which holds them, must not be gone.
        spool::fail_next_created_after(20);
        assert!(Lake::open(root, LakeOptions::new("w")).is_err());
        assert_eq!(
            spool::read_segment(&old).unwrap().stamps,
            vec![stamp(1, 10)],
            "the old segment and its stamps survive a failed carry"
        );
        assert_eq!(segments(root), 1, "the failed new segment is gone");
        let mut lake = Lake::open(root, LakeOptions::new("w")).unwrap();
        assert_eq!(lake.stamps().live().collect::<Vec<_>>(), vec![stamp(1, 10)]);
        assert!(!old.exists(), "carried now, so removed");
        // Its readings were committed before the failure, and only once.
        assert_eq!(
            reader::read_all_readings(root).unwrap(),
            vec![soak_reading(1)]
        );
        // The same at a seal: the segment holding the stamps stays current.
        lake.accept_stamped(vec![soak_reading(2)], vec![], vec![stamp(2, 20)])
            .unwrap();
        spool::fail_next_created_after(20);
        assert!(lake.flush().is_err());
        assert_eq!(lake.pending(), 1);
        std::mem::forget(lake);
        let lake = Lake::open(root, LakeOptions::new("w")).unwrap();
        assert_eq!(
            lake.stamps().live().collect::<Vec<_>>(),
            vec![stamp(1, 10), stamp(2, 20)]
        );
        assert_eq!(reader::read_all_readings(root).unwrap().len(), 2);
    }

    #[test]
    fn a_smaller_window_keeps_only_the_last_stamps_and_carries_only_them() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut lake = Lake::open(
            root,
            LakeOptions {
                stamp_window: 2,
                ..LakeOptions::new("w")
            },
        )
        .unwrap();
        let all: Vec<Stamp> = (1..=5).map(|k| stamp(k, k as i64 * 10)).collect();
        lake.accept_stamped(vec![soak_reading(1)], vec![], all)
            .unwrap();
        assert_eq!(
            lake.stamps().live().collect::<Vec<_>>(),
            vec![stamp(4, 40), stamp(5, 50)]
        );
        lake.flush().unwrap();
        drop(lake);
        let spool = root.join("_spool").join("w");
        let (_, kept) = spool::list_segments(&spool).unwrap().pop().unwrap();
        assert_eq!(
            spool::read_segment(&kept).unwrap().stamps,
            vec![stamp(4, 40), stamp(5, 50)],
            "a seal carries the window, not every stamp seen"
        );
        // A writer opened without a window keeps what is there.
        let lake = Lake::open(root, LakeOptions::new("w")).unwrap();
        assert_eq!(lake.stamps().len(), 2);
    }

    #[test]
    fn stamps_alone_are_durable_and_a_writer_without_stamps_leaves_no_segment() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut lake = Lake::open(root, LakeOptions::new("w")).unwrap();
        lake.accept_stamped(vec![], vec![], vec![stamp(5, 50)])
            .unwrap();
        assert_eq!(lake.pending(), 0);
        std::mem::forget(lake);
        let lake = Lake::open(root, LakeOptions::new("w")).unwrap();
        assert_eq!(lake.stamps().get(5), Some(50));
        drop(lake);

        let other = tempfile::tempdir().unwrap();
        let mut lake = Lake::open(other.path(), LakeOptions::new("w")).unwrap();
        lake.accept(&[soak_reading(1)]).unwrap();
        lake.flush().unwrap();
        drop(lake);
        assert_eq!(segments(other.path()), 0);
    }

    /// A dead-lettered MQTT message.
    fn dead_letter(reason: String, payload: Vec<u8>) -> QuarantineRecord {
        QuarantineRecord {
            received_ms: 1_790_000_000_000,
            protocol: crate::model::Protocol::Mqtt,
            collector: "c".into(),
            address: "t".into(),
            reason,
            payload,
        }
    }

    #[test]
    fn a_dead_letter_too_big_for_the_spool_is_refused_and_later_readings_replay() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut lake = Lake::open(root, LakeOptions::new("w")).unwrap();
        let q = dead_letter("x".repeat(17 << 20), vec![]);
        assert!(lake.quarantine(&[q]).is_err());
        assert_eq!(lake.pending(), 0);
        lake.accept(&[soak_reading(1)]).unwrap();
        drop(lake);
        let lake = Lake::open(root, LakeOptions::new("w")).unwrap();
        assert_eq!(lake.replayed.readings, 1);
        assert_eq!(
            reader::read_all_readings(root).unwrap(),
            vec![soak_reading(1)]
        );
    }

    #[test]
    fn sealed_segments_commit_later_or_replay_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut lake = Lake::open(root, LakeOptions::new("w")).unwrap();
        let q = dead_letter("bad".into(), vec![1, 2]);
        lake.accept_owned((0..10).map(soak_reading).collect(), vec![q])
            .unwrap();
        let first = lake.seal().unwrap().unwrap();
        assert_eq!(first.len(), 11);
        assert!(
            lake.seal().unwrap().is_none(),
            "nothing pending after a seal"
        );
        lake.accept_owned((10..20).map(soak_reading).collect(), vec![])
            .unwrap();
        // The newer segment is sealed and committed first on purpose: file
        // names carry the segment id, so order does not matter.
        let second = lake.seal().unwrap().unwrap();
        assert_eq!(second.commit().unwrap().readings, 10);
        assert_eq!(reader::read_all_readings(root).unwrap().len(), 10);
        // A crash before the first commit: the next open replays it.
        drop(first);
        drop(lake);
        let lake = Lake::open(root, LakeOptions::new("w")).unwrap();
        assert_eq!(lake.replayed.readings, 10);
        assert_eq!(lake.replayed.quarantined, 1);
        let mut got = reader::read_all_readings(root).unwrap();
        got.sort_by_key(|r| r.ts_ms);
        let want: Vec<_> = (0..20).map(soak_reading).collect();
        assert_eq!(got, want);
    }
}
