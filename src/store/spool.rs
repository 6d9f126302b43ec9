//! Append-only, checksummed spool for readings accepted but not yet in a
//! committed Parquet file.
//!
//! Record layout: `u32 LE payload length | u32 LE crc32(payload) | payload`.
//! A record whose header or payload is cut short, or whose checksum fails,
//! marks a torn tail: it and everything after it are dropped with a log line.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use rust_decimal::Decimal;

use super::StoreError;
use crate::model::{Channel, Protocol, Quality, Reading, Source};

/// Largest payload a record may have; anything bigger is corruption.
const MAX_RECORD: u32 = 16 << 20;

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
            fail_after: None,
        })
    }

    /// Appends entries with one write and one fsync (group commit). On
    /// failure the file is cut back to its last whole record, so records
    /// appended later are not hidden behind a torn one at replay; if even
    /// that fails, the segment refuses further appends. A record too big for
    /// a replay to accept fails the whole append before anything is written.
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        if self.torn {
            return Err(StoreError::io(
                &self.path,
                std::io::Error::other(
                    "an earlier failed write could not be cut off this spool segment; reopen the lake to replay it",
                ),
            ));
        }
        self.buf.clear();
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
    /// Bytes dropped at the end because the last record was torn or corrupt.
    pub torn_bytes: u64,
}

pub fn read_segment(path: &Path) -> Result<Replay, StoreError> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(|e| StoreError::io(path, e))?;
    let mut entries = Vec::new();
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
            Some(e) => entries.push(e),
            None => {
                torn("undecodable payload");
                break;
            }
        }
        pos += 8 + len as usize;
    }
    Ok(Replay {
        entries,
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

fn decode(payload: &[u8]) -> Option<Entry> {
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
        _ => return None,
    };
    if !c.0.is_empty() {
        return None;
    }
    Some(entry)
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
