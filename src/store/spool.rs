//! Append-only, checksummed spool for readings accepted but not yet in a
//! committed Parquet file.
//!
//! Record layout: `u32 LE payload length | u32 LE crc32(payload) | payload`.
//! A record whose header or payload is cut short, or whose checksum fails,
//! marks a torn tail: it and everything after it are dropped with a log line.
//!
//! Besides entries a segment holds receive stamps (`Stamp`, see `Stamps`):
//! which time a message's readings without a timestamp of their own were
//! given, so that a redelivered copy can be given the same.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use rust_decimal::Decimal;

use super::StoreError;
use crate::model::{Channel, Protocol, Quality, Reading, Source};

/// Largest payload a record may have; anything bigger is corruption.
const MAX_RECORD: u32 = 16 << 20;
/// Stamps per spool record (16 bytes each: a record stays near 1 MiB).
const STAMPS_PER_RECORD: usize = 1 << 16;

/// Receive stamps MQTT ingest keeps by default (`[ingest]
/// redelivery_window`): those of the last 16,384 stamped messages. A copy is
/// redelivered only while unacknowledged, so the window must cover the
/// broker's inflight window (Mosquitto's `max_inflight_messages`).
pub const DEFAULT_STAMP_WINDOW: usize = 16_384;

/// The largest window worth keeping: more than one MQTT session can have
/// unacknowledged at once (its packet ids are 16 bits, 0 unused). A lake
/// opened without a window of its own (`Lake::open`) keeps up to this many,
/// so a writer that is not ingest never shortens ingest's list.
pub const MAX_STAMP_WINDOW: usize = 65_535;

/// A message's receive stamp: its readings that carried no timestamp of
/// their own were stamped `received_ms`. `key` names the message (ingest
/// hashes its topic and payload), not the readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub key: u64,
    pub received_ms: i64,
}

/// The receive stamps of the last `cap` stamped messages, by key: a bounded
/// FIFO in insertion order (looking a key up refreshes nothing). A key
/// stamped again with another time takes the later time; its older entry
/// still counts against the bound until it leaves the front.
#[derive(Debug, Clone)]
pub struct Stamps {
    cap: usize,
    /// key -> (time, number of the entry in `order` that set it).
    by_key: super::scan::FxMap<u64, (i64, u64)>,
    /// Entries oldest first, each with its insertion number.
    order: VecDeque<(Stamp, u64)>,
    next: u64,
}

impl Stamps {
    pub fn new(cap: usize) -> Stamps {
        Stamps {
            cap: cap.max(1),
            by_key: Default::default(),
            order: VecDeque::new(),
            next: 0,
        }
    }

    /// Live stamps (one per key).
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// The time `key` was stamped with, if it is still remembered.
    pub fn get(&self, key: u64) -> Option<i64> {
        self.by_key.get(&key).map(|&(ms, _)| ms)
    }

    /// Remembers a stamp, forgetting the oldest entry beyond the bound. A
    /// stamp remembered as it is (a copy carried into a later segment)
    /// changes nothing; returns whether it changed anything.
    pub fn insert(&mut self, s: Stamp) -> bool {
        if self.get(s.key) == Some(s.received_ms) {
            return false;
        }
        let n = self.next;
        self.next += 1;
        self.by_key.insert(s.key, (s.received_ms, n));
        self.order.push_back((s, n));
        while self.order.len() > self.cap {
            if let Some((old, m)) = self.order.pop_front() {
                // Only if the key was not stamped again since.
                if self.by_key.get(&old.key).is_some_and(|&(_, at)| at == m) {
                    self.by_key.remove(&old.key);
                }
            }
        }
        true
    }

    /// Live stamps, oldest first: inserted in this order into an empty
    /// `Stamps` of the same bound, they rebuild one that remembers the same.
    pub fn live(&self) -> impl Iterator<Item = Stamp> + '_ {
        self.order.iter().filter_map(|&(s, n)| {
            self.by_key
                .get(&s.key)
                .is_some_and(|&(_, at)| at == n)
                .then_some(s)
        })
    }
}

/// A spooled entry.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    Reading(Reading),
    Quarantine(QuarantineRecord),
}

/// Input that could not be turned into readings, kept with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantineRecord {
    pub received_ms: i64,
    pub protocol: Protocol,
    pub collector: String,
    pub address: String,
    pub reason: String,
    pub payload: Vec<u8>,
}

/// One open spool segment file.
pub struct Segment {
    pub id: String,
    pub path: PathBuf,
    file: File,
    buf: Vec<u8>,
    /// Bytes of whole records durable in the file.
    len: u64,
    /// A failed append could not be cut off the file: nothing more may be
    /// appended after it (a replay would stop at the torn record).
    torn: bool,
    /// Tests: the next append writes this many bytes, then fails as a full
    /// disk does.
    #[cfg(test)]
    pub(super) fail_after: Option<usize>,
}

#[cfg(test)]
thread_local! {
    /// Tests: `fail_after` of the next segment this thread creates.
    static FAIL_NEXT_CREATED: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Tests: the first append to the next segment this thread creates (one a
/// `Lake` creates inside `open` or a seal) writes `n` bytes, then fails.
#[cfg(test)]
pub(super) fn fail_next_created_after(n: usize) {
    FAIL_NEXT_CREATED.with(|c| c.set(Some(n)));
}

impl Segment {
    pub fn create(dir: &Path, id: String) -> Result<Segment, StoreError> {
        super::atomic::create_dir_durable(dir)?;
        let path = dir.join(format!("seg-{id}.log"));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| StoreError::io(&path, e))?;
        super::atomic::sync_dir(dir)?;
        let len = file.metadata().map_err(|e| StoreError::io(&path, e))?.len();
        Ok(Segment {
            id,
            path,
            file,
            buf: Vec::with_capacity(64 << 10),
            len,
            torn: false,
            #[cfg(test)]
            fail_after: FAIL_NEXT_CREATED.with(|c| c.take()),
        })
    }

    /// Appends entries with one write and one fsync (group commit). On
    /// failure the file is cut back to its last whole record, so records
    /// appended later are not hidden behind a torn one at replay; if even
    /// that fails, the segment refuses further appends. A record too big for
    /// a replay to accept fails the whole append before anything is written.
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        self.append_stamped(&[], entries)
    }

    /// `append`, with receive stamps in the same write and fsync. The stamps
    /// go first: a write torn part-way (never acknowledged) may keep a
    /// message's stamp without its readings, which a redelivery then reuses,
    /// but never its readings without their stamp.
    pub fn append_stamped(
        &mut self,
        stamps: &[Stamp],
        entries: &[Entry],
    ) -> Result<(), StoreError> {
        if self.torn {
            return Err(StoreError::io(
                &self.path,
                std::io::Error::other(
                    "an earlier failed write could not be cut off this spool segment; reopen the lake to replay it",
                ),
            ));
        }
        self.buf.clear();
        for chunk in stamps.chunks(STAMPS_PER_RECORD) {
            let start = self.buf.len();
            self.buf.extend_from_slice(&[0u8; 8]);
            encode_stamps(chunk, &mut self.buf);
            let payload = &self.buf[start + 8..];
            let len = payload.len() as u32;
            let crc = crc32fast::hash(payload);
            self.buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
            self.buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        }
        for e in entries {
            let start = self.buf.len();
            self.buf.extend_from_slice(&[0u8; 8]);
            encode(e, &mut self.buf);
            let payload = &self.buf[start + 8..];
            if payload.len() > MAX_RECORD as usize {
                // A replay would take it for a torn tail and drop it and
                // every record after it, acknowledged ones included.
                let n = payload.len();
                self.buf.clear();
                return Err(StoreError::io(
                    &self.path,
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("a spool record of {n} bytes exceeds the {MAX_RECORD}-byte limit; nothing was written"),
                    ),
                ));
            }
            let len = payload.len() as u32;
            let crc = crc32fast::hash(payload);
            self.buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
            self.buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        }
        match self.write_durable() {
            Ok(()) => {
                self.len += self.buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                if let Err(cut) = self.file.set_len(self.len) {
                    tracing::error!(file = %self.path.display(), error = %cut, "spool: cannot cut a failed write off the segment");
                    self.torn = true;
                }
                Err(StoreError::io(&self.path, e))
            }
        }
    }

    fn write_durable(&mut self) -> std::io::Result<()> {
        #[cfg(test)]
        if let Some(n) = self.fail_after.take() {
            self.file.write_all(&self.buf[..n.min(self.buf.len())])?;
            return Err(std::io::Error::other("injected: no space left on device"));
        }
        self.file.write_all(&self.buf)?;
        self.file.sync_data()
    }
}

/// Segment ids sort by creation time; the random suffix keeps them unique across restarts.
pub fn new_segment_id() -> String {
    format!(
        "{:013}-{:08x}",
        crate::model::now_ms().max(0),
        rand::random::<u32>()
    )
}

/// Existing segments in a spool directory, oldest first.
pub fn list_segments(dir: &Path) -> Result<Vec<(String, PathBuf)>, StoreError> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(StoreError::io(dir, e)),
    };
    for ent in rd {
        let ent = ent.map_err(|e| StoreError::io(dir, e))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        if let Some(id) = name
            .strip_prefix("seg-")
            .and_then(|s| s.strip_suffix(".log"))
        {
            out.push((id.to_string(), ent.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Result of reading one segment back.
pub struct Replay {
    pub entries: Vec<Entry>,
    /// Receive stamps, in the order written.
    pub stamps: Vec<Stamp>,
    /// Bytes dropped at the end because the last record was torn or corrupt.
    pub torn_bytes: u64,
}

pub fn read_segment(path: &Path) -> Result<Replay, StoreError> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(|e| StoreError::io(path, e))?;
    let mut entries = Vec::new();
    let mut stamps = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        let torn = |reason: &str| {
            tracing::warn!(
                file = %path.display(), offset = pos, dropped_bytes = data.len() - pos,
                "spool: dropping torn tail record ({reason}); earlier records kept"
            );
        };
        if data.len() - pos < 8 {
            torn("short header");
            break;
        }
        let len = u32::from_le_bytes(data[pos..pos + 4].try_into().unwrap());
        let crc = u32::from_le_bytes(data[pos + 4..pos + 8].try_into().unwrap());
        if len > MAX_RECORD || data.len() - pos - 8 < len as usize {
            torn("short payload");
            break;
        }
        let payload = &data[pos + 8..pos + 8 + len as usize];
        if crc32fast::hash(payload) != crc {
            torn("checksum mismatch");
            break;
        }
        match decode(payload) {
            Some(Record::Entry(e)) => entries.push(e),
            Some(Record::Stamps(s)) => stamps.extend(s),
            None => {
                torn("undecodable payload");
                break;
            }
        }
        pos += 8 + len as usize;
    }
    Ok(Replay {
        entries,
        stamps,
        torn_bytes: (data.len() - pos) as u64,
    })
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn encode(e: &Entry, buf: &mut Vec<u8>) {
    match e {
        Entry::Reading(r) => {
            buf.push(1);
            put_str(buf, &r.meter_id);
            buf.extend_from_slice(&r.ts_ms.to_le_bytes());
            put_str(buf, r.channel.as_str());
            buf.extend_from_slice(&r.value.serialize());
            buf.extend_from_slice(&r.quality.bits().to_le_bytes());
            put_str(buf, r.source.protocol.as_str());
            put_str(buf, &r.source.collector);
            put_str(buf, &r.source.address);
            buf.extend_from_slice(&r.received_ms.to_le_bytes());
        }
        Entry::Quarantine(q) => {
            buf.push(2);
            buf.extend_from_slice(&q.received_ms.to_le_bytes());
            put_str(buf, q.protocol.as_str());
            put_str(buf, &q.collector);
            put_str(buf, &q.address);
            put_str(buf, &q.reason);
            buf.extend_from_slice(&(q.payload.len() as u32).to_le_bytes());
            buf.extend_from_slice(&q.payload);
        }
    }
}

/// Record kind 3: `u32 LE count | count * (u64 LE key | i64 LE received_ms)`.
fn encode_stamps(stamps: &[Stamp], buf: &mut Vec<u8>) {
    buf.reserve(5 + 16 * stamps.len());
    buf.push(3);
    buf.extend_from_slice(&(stamps.len() as u32).to_le_bytes());
    for s in stamps {
        buf.extend_from_slice(&s.key.to_le_bytes());
        buf.extend_from_slice(&s.received_ms.to_le_bytes());
    }
}

/// One decoded record.
enum Record {
    Entry(Entry),
    Stamps(Vec<Stamp>),
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2)
            .map(|b| u16::from_le_bytes(b.try_into().unwrap()))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    }
    fn i64(&mut self) -> Option<i64> {
        self.take(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok()
    }
}

fn decode(payload: &[u8]) -> Option<Record> {
    let mut c = Cursor(payload);
    let entry = match c.u8()? {
        1 => {
            let meter_id = c.str()?.to_string();
            let ts_ms = c.i64()?;
            let channel: Channel = c.str()?.parse().ok()?;
            let value = Decimal::deserialize(c.take(16)?.try_into().ok()?);
            let quality = Quality::from_bits(c.u16()?);
            let protocol = Protocol::parse(c.str()?)?;
            let collector = c.str()?.to_string();
            let address = c.str()?.to_string();
            let received_ms = c.i64()?;
            Entry::Reading(Reading {
                meter_id,
                ts_ms,
                channel,
                value,
                quality,
                source: Source {
                    protocol,
                    collector: collector.into(),
                    address: address.into(),
                },
                received_ms,
            })
        }
        2 => Entry::Quarantine(QuarantineRecord {
            received_ms: c.i64()?,
            protocol: Protocol::parse(c.str()?)?,
            collector: c.str()?.to_string(),
            address: c.str()?.to_string(),
            reason: c.str()?.to_string(),
            payload: c.bytes()?.to_vec(),
        }),
        3 => {
            let n = c.u32()? as usize;
            // Checked against what is there before anything is allocated.
            if c.0.len() != n.checked_mul(16)? {
                return None;
            }
            let mut stamps = Vec::with_capacity(n);
            for _ in 0..n {
                stamps.push(Stamp {
                    key: c.u64()?,
                    received_ms: c.i64()?,
                });
            }
            return Some(Record::Stamps(stamps));
        }
        _ => return None,
    };
    if !c.0.is_empty() {
        return None;
    }
    Some(Record::Entry(entry))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    fn reading(i: i64) -> Entry {
        Entry::Reading(Reading {
            meter_id: format!("{:012}", i),
            ts_ms: 1_700_000_000_000 + i,
            channel: Channel::ImportActiveTotal,
            value: dec!(123.45) + Decimal::from(i),
            quality: Quality::OK,
            source: Source {
                protocol: Protocol::Dlt645,
                collector: "c1".into(),
                address: "bus1".into(),
            },
            received_ms: 1_700_000_000_500,
        })
    }

    #[test]
    fn appended_entries_read_back_identically() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = Segment::create(dir.path(), "a".into()).unwrap();
        let q = Entry::Quarantine(QuarantineRecord {
            received_ms: 5,
            protocol: Protocol::Mqtt,
            collector: "ing".into(),
            address: "t/x".into(),
            reason: "bad json".into(),
            payload: vec![0, 1, 2, 0xff],
        });
        let entries = vec![reading(1), q, reading(2)];
        seg.append(&entries).unwrap();
        let replay = read_segment(&seg.path).unwrap();
        assert_eq!(replay.entries, entries);
        assert_eq!(replay.torn_bytes, 0);
    }

    #[test]
    fn torn_tail_is_dropped_and_earlier_records_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = Segment::create(dir.path(), "a".into()).unwrap();
        seg.append(&[reading(1), reading(2)]).unwrap();
        seg.append(&[reading(3)]).unwrap();
        let full = fs::read(&seg.path).unwrap();
        for cut in 1..40 {
            fs::write(&seg.path, &full[..full.len() - cut]).unwrap();
            let replay = read_segment(&seg.path).unwrap();
            assert_eq!(replay.entries, vec![reading(1), reading(2)], "cut {cut}");
            assert!(replay.torn_bytes > 0);
        }
    }

    #[test]
    fn a_segment_whose_failed_write_cannot_be_cut_off_refuses_further_appends() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = Segment::create(dir.path(), "a".into()).unwrap();
        seg.append(&[reading(1)]).unwrap();
        // Writes to /dev/full fail, and it cannot be truncated.
        let real = std::mem::replace(
            &mut seg.file,
            OpenOptions::new().write(true).open("/dev/full").unwrap(),
        );
        assert!(seg.append(&[reading(2)]).is_err());
        seg.file = real;
        let e = seg.append(&[reading(3)]).unwrap_err().to_string();
        assert!(e.contains("reopen the lake"), "{e}");
        let replay = read_segment(&seg.path).unwrap();
        assert_eq!(replay.entries, vec![reading(1)]);
    }

    #[test]
    fn a_record_too_big_to_read_back_is_refused_and_later_records_still_replay() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = Segment::create(dir.path(), "a".into()).unwrap();
        seg.append(&[reading(1)]).unwrap();
        let huge = Entry::Quarantine(QuarantineRecord {
            received_ms: 5,
            protocol: Protocol::Mqtt,
            collector: "ing".into(),
            address: "t/x".into(),
            reason: "x".repeat(17 << 20),
            payload: vec![],
        });
        let e = seg.append(&[reading(2), huge]).unwrap_err().to_string();
        assert!(e.contains("nothing was written"), "{e}");
        seg.append(&[reading(3)]).unwrap();
        let replay = read_segment(&seg.path).unwrap();
        assert_eq!(replay.entries, vec![reading(1), reading(3)]);
        assert_eq!(replay.torn_bytes, 0);
    }

    fn stamp(key: u64, received_ms: i64) -> Stamp {
        Stamp { key, received_ms }
    }

    #[test]
    fn stamps_read_back_beside_the_entries_of_their_write() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = Segment::create(dir.path(), "a".into()).unwrap();
        seg.append_stamped(&[stamp(7, 1_000)], &[reading(1)])
            .unwrap();
        // Stamps alone, and more than one record holds.
        let many: Vec<Stamp> = (0..STAMPS_PER_RECORD as u64 + 3)
            .map(|k| stamp(100 + k, k as i64))
            .collect();
        seg.append_stamped(&many, &[]).unwrap();
        seg.append(&[reading(2)]).unwrap();
        let replay = read_segment(&seg.path).unwrap();
        assert_eq!(replay.entries, vec![reading(1), reading(2)]);
        let mut want = vec![stamp(7, 1_000)];
        want.extend(many);
        assert_eq!(replay.stamps, want);
        assert_eq!(replay.torn_bytes, 0);
    }

    #[test]
    fn a_torn_write_may_keep_a_stamp_without_its_readings_never_the_reverse() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = Segment::create(dir.path(), "a".into()).unwrap();
        seg.append(&[reading(1)]).unwrap();
        let before = fs::metadata(&seg.path).unwrap().len() as usize;
        seg.append_stamped(&[stamp(7, 1_000)], &[reading(2), reading(3)])
            .unwrap();
        let full = fs::read(&seg.path).unwrap();
        for cut in before..full.len() {
            fs::write(&seg.path, &full[..cut]).unwrap();
            let replay = read_segment(&seg.path).unwrap();
            assert_eq!(replay.entries[0], reading(1), "cut at {cut}");
            if replay.entries.len() > 1 {
                assert_eq!(replay.stamps, vec![stamp(7, 1_000)], "cut at {cut}");
            }
        }
    }

    #[test]
    fn a_stamp_record_whose_count_lies_is_a_torn_tail_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = Segment::create(dir.path(), "a".into()).unwrap();
        seg.append(&[reading(1)]).unwrap();
        for count in [u32::MAX, 2, 0] {
            let mut payload = vec![3u8];
            payload.extend_from_slice(&count.to_le_bytes());
            payload.extend_from_slice(&[0u8; 16]);
            let mut data = fs::read(&seg.path).unwrap();
            data.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            data.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            data.extend_from_slice(&payload);
            let p = dir.path().join("lying.log");
            fs::write(&p, &data).unwrap();
            let replay = read_segment(&p).unwrap();
            assert_eq!(replay.entries, vec![reading(1)]);
            assert!(replay.stamps.is_empty());
            assert_eq!(replay.torn_bytes, 8 + payload.len() as u64);
        }
    }

    #[test]
    fn stamps_remember_the_last_ones_by_key_and_rebuild_from_their_live_list() {
        let mut s = Stamps::new(3);
        assert!(s.insert(stamp(1, 10)));
        assert!(!s.insert(stamp(1, 10)), "a carried copy changes nothing");
        s.insert(stamp(2, 20));
        // The same payload again, later, without DUP: the later time.
        s.insert(stamp(1, 30));
        assert_eq!(s.get(1), Some(30));
        assert_eq!(s.len(), 2);
        let live: Vec<_> = s.live().collect();
        assert_eq!(live, vec![stamp(2, 20), stamp(1, 30)]);
        // The superseded (1, 10) leaves the front without forgetting key 1.
        s.insert(stamp(3, 40));
        assert_eq!(
            (s.get(1), s.get(2), s.get(3)),
            (Some(30), Some(20), Some(40))
        );
        s.insert(stamp(4, 50));
        assert_eq!(s.get(2), None, "the oldest is forgotten beyond the bound");
        // t1, t2, t1 again: the front t1 leaving does not forget the last one.
        let mut s = Stamps::new(3);
        s.insert(stamp(9, 1));
        s.insert(stamp(9, 2));
        s.insert(stamp(9, 1));
        s.insert(stamp(8, 5));
        assert_eq!((s.get(9), s.get(8)), (Some(1), Some(5)));
        let mut rebuilt = Stamps::new(3);
        for x in s.live() {
            rebuilt.insert(x);
        }
        assert_eq!(
            rebuilt.live().collect::<Vec<_>>(),
            s.live().collect::<Vec<_>>()
        );
        assert_eq!(s.live().collect::<Vec<_>>(), vec![stamp(9, 1), stamp(8, 5)]);
    }

    #[test]
    fn stamps_rebuild_from_spool_bytes_with_carried_copies_merged() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Segment::create(dir.path(), "a".into()).unwrap();
        a.append_stamped(&[stamp(1, 10), stamp(2, 20)], &[reading(1)])
            .unwrap();
        // The next segment starts with a copy of the window, then more.
        let mut b = Segment::create(dir.path(), "b".into()).unwrap();
        b.append_stamped(&[stamp(1, 10), stamp(2, 20)], &[])
            .unwrap();
        b.append_stamped(&[stamp(3, 30)], &[reading(2)]).unwrap();
        let mut s = Stamps::new(3);
        for (_, p) in list_segments(dir.path()).unwrap() {
            for x in read_segment(&p).unwrap().stamps {
                s.insert(x);
            }
        }
        assert_eq!(
            s.live().collect::<Vec<_>>(),
            vec![stamp(1, 10), stamp(2, 20), stamp(3, 30)],
            "copies took no room in the bound"
        );
    }

    #[test]
    fn corrupted_tail_record_fails_its_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = Segment::create(dir.path(), "a".into()).unwrap();
        seg.append(&[reading(1), reading(2)]).unwrap();
        let mut data = fs::read(&seg.path).unwrap();
        let n = data.len();
        data[n - 3] ^= 0x55;
        fs::write(&seg.path, &data).unwrap();
        let replay = read_segment(&seg.path).unwrap();
        assert_eq!(replay.entries, vec![reading(1)]);
    }
}
