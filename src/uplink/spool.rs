//! The uplink's on-disk queue: append-only, checksummed segment files plus
//! an `acked` cursor.
//!
//! Record: `len u32 LE | crc32(seq ++ payload) u32 LE | seq u64 LE | payload`.
//! A crash mid-append leaves a torn tail: it fails its length or checksum and
//! is cut off at open. Entries are only forgotten once acknowledged (PUBACK);
//! a segment file is deleted when every entry in it is acknowledged. The
//! cursor is written atomically but lazily, so a crash may re-send a few
//! acknowledged entries (at-least-once; the lake's compaction dedups).

use std::collections::{BTreeSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::store::atomic;

const HEADER: usize = 16;
/// A record larger than this is taken as a torn length field.
const MAX_RECORD: usize = 64 << 20;
const SEGMENT_BYTES: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("uplink spool is full ({bytes} bytes pending, cap {cap}): link down too long")]
    Full { bytes: u64, cap: u64 },
    /// A replay would take a longer record for a torn length and cut it,
    /// and every later record, off: refused before anything is written.
    #[error("a message of {bytes} bytes is over the uplink spool's record limit of {max} bytes")]
    TooLarge { bytes: usize, max: usize },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One queued message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub payload: Vec<u8>,
}

struct SegmentInfo {
    path: PathBuf,
    last_seq: u64,
}

pub struct Spool {
    dir: PathBuf,
    /// Unacknowledged entries, in order.
    entries: VecDeque<Entry>,
    /// Acknowledged seqs above the cursor (acks may arrive out of order).
    acked_ahead: BTreeSet<u64>,
    /// Every seq below this is acknowledged.
    cursor: u64,
    cursor_saved: u64,
    next_seq: u64,
    segments: Vec<SegmentInfo>,
    current: Option<(File, PathBuf, u64)>,
    bytes: u64,
    /// Bytes dropped from torn tails at open.
    pub torn_bytes: u64,
    /// A failed append could not be cut off its segment: nothing more is
    /// appended until the spool is reopened (which cuts it).
    torn: bool,
    /// Tests: the next append writes this many bytes, then fails as a full
    /// disk does.
    #[cfg(test)]
    fail_after: Option<usize>,
}

impl Spool {
    /// Writes `buf` at the end of the current segment and syncs it.
    fn write_current(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let (f, _, _) = self
            .current
            .as_mut()
            .expect("segment opened before writing");
        #[cfg(test)]
        if let Some(n) = self.fail_after.take() {
            f.write_all(&buf[..n.min(buf.len())])?;
            return Err(std::io::Error::other("injected: no space left on device"));
        }
        f.write_all(buf)?;
        f.sync_data()
    }

    /// Opens (creating) a spool directory, cutting off any torn tail.
    pub fn open(dir: &Path) -> Result<Spool, SpoolError> {
        crate::store::atomic::create_dir_durable(dir).map_err(|e| match e {
            crate::store::StoreError::Io { path, source } => SpoolError::Io { path, source },
            other => SpoolError::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::other(other.to_string()),
            },
        })?;
        let cursor_path = dir.join("acked");
        let cursor = match std::fs::read_to_string(&cursor_path) {
            Ok(s) => s.trim().parse::<u64>().unwrap_or(0),
            Err(_) => 0,
        };
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "seg"))
            .collect();
        names.sort();
        let mut s = Spool {
            dir: dir.to_path_buf(),
            entries: VecDeque::new(),
            acked_ahead: BTreeSet::new(),
            cursor,
            cursor_saved: cursor,
            next_seq: cursor,
            segments: Vec::new(),
            current: None,
            bytes: 0,
            torn_bytes: 0,
            torn: false,
            #[cfg(test)]
            fail_after: None,
        };
        for path in names {
            let (entries, good_len, file_len) = read_segment(&path)?;
            if good_len < file_len {
                s.torn_bytes += file_len - good_len;
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io(&path))?;
                f.set_len(good_len).map_err(io(&path))?;
                f.sync_all().map_err(io(&path))?;
            }
            let last = entries.last().map(|e| e.seq);
            for e in entries {
                s.next_seq = s.next_seq.max(e.seq + 1);
                if e.seq >= cursor {
                    s.bytes += e.payload.len() as u64;
                    s.entries.push_back(e);
                }
            }
            match last {
                Some(l) => s.segments.push(SegmentInfo { path, last_seq: l }),
                None => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        s.drop_acked_segments()?;
        Ok(s)
    }

    /// Appends messages durably (one fsync); returns their seqs.
    /// On failure nothing is appended: the segment is cut back to its last
    /// whole record (a torn record would hide every later one at reopen)
    /// and the seqs are given out again.
    pub fn append(&mut self, payloads: &[Vec<u8>]) -> Result<Vec<u64>, SpoolError> {
        if let Some(p) = payloads.iter().find(|p| p.len() > MAX_RECORD) {
            return Err(SpoolError::TooLarge {
                bytes: p.len(),
                max: MAX_RECORD,
            });
        }
        if self.torn {
            return Err(SpoolError::Io {
                path: self.dir.clone(),
                source: std::io::Error::other(
                    "an earlier failed write could not be cut off the spool; reopen it",
                ),
            });
        }
        if self.current.as_ref().is_none_or(|c| c.2 >= SEGMENT_BYTES) {
            let path = self.dir.join(format!("{:020}.seg", self.next_seq));
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io(&path))?;
            atomic::sync_dir(&self.dir).map_err(|e| SpoolError::Io {
                path: self.dir.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
            self.segments.push(SegmentInfo {
                path: path.clone(),
                last_seq: self.next_seq,
            });
            self.current = Some((f, path, 0));
        }
        let mut buf = Vec::new();
        let mut seqs = Vec::with_capacity(payloads.len());
        for p in payloads {
            let seq = self.next_seq;
            self.next_seq += 1;
            let mut h = crc32fast::Hasher::new();
            h.update(&seq.to_le_bytes());
            h.update(p);
            buf.extend_from_slice(&(p.len() as u32).to_le_bytes());
            buf.extend_from_slice(&h.finalize().to_le_bytes());
            buf.extend_from_slice(&seq.to_le_bytes());
            buf.extend_from_slice(p);
            seqs.push(seq);
        }
        if let Err(e) = self.write_current(&buf) {
            let (f, path, len) = self.current.as_mut().expect("segment opened above");
            match f.set_len(*len) {
                Ok(()) => self.next_seq = seqs.first().copied().unwrap_or(self.next_seq),
                Err(cut) => {
                    tracing::error!(file = %path.display(), error = %cut, "uplink spool: cannot cut a failed write off the segment");
                    self.torn = true;
                }
            }
            return Err(io(path)(e));
        }
        let (_, _, len) = self.current.as_mut().expect("segment opened above");
        *len += buf.len() as u64;
        if let (Some(seg), Some(last)) = (self.segments.last_mut(), seqs.last()) {
            seg.last_seq = *last;
        }
        for (p, seq) in payloads.iter().zip(&seqs) {
            self.bytes += p.len() as u64;
            self.entries.push_back(Entry {
                seq: *seq,
                payload: p.clone(),
            });
        }
        Ok(seqs)
    }

    /// Marks a seq acknowledged (PUBACK arrived).
    pub fn ack(&mut self, seq: u64) {
        if seq < self.cursor {
            return;
        }
        self.acked_ahead.insert(seq);
        while self.acked_ahead.remove(&self.cursor) {
            if let Some(e) = self.entries.pop_front() {
                debug_assert_eq!(e.seq, self.cursor);
                self.bytes -= e.payload.len() as u64;
            }
            self.cursor += 1;
        }
    }

    /// Persists the cursor and deletes fully acknowledged segments.
    pub fn checkpoint(&mut self) -> Result<(), SpoolError> {
        if self.cursor == self.cursor_saved {
            return Ok(());
        }
        let path = self.dir.join("acked");
        atomic::write_file_atomic(&path, self.cursor.to_string().as_bytes()).map_err(|e| {
            SpoolError::Io {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            }
        })?;
        self.cursor_saved = self.cursor;
        self.drop_acked_segments()
    }

    fn drop_acked_segments(&mut self) -> Result<(), SpoolError> {
        let current = self.current.as_ref().map(|c| c.1.clone());
        let cursor = self.cursor_saved;
        let mut kept = Vec::new();
        for s in self.segments.drain(..) {
            if s.last_seq < cursor && Some(&s.path) != current.as_ref() {
                std::fs::remove_file(&s.path).map_err(io(&s.path))?;
            } else {
                kept.push(s);
            }
        }
        self.segments = kept;
        Ok(())
    }

    /// Unacknowledged entries in order, skipping ones already acknowledged out of order.
    pub fn unacked_from(&self, seq: u64) -> impl Iterator<Item = &Entry> {
        self.entries
            .iter()
            .filter(move |e| e.seq >= seq && !self.acked_ahead.contains(&e.seq))
    }

    pub fn first_unacked(&self) -> u64 {
        self.cursor
    }
    pub fn len(&self) -> usize {
        self.entries.len() - self.acked_ahead.len().min(self.entries.len())
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Payload bytes waiting for acknowledgement.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// Reads a segment's valid records; returns them, the valid length and the file length.
fn read_segment(path: &Path) -> Result<(Vec<Entry>, u64, u64), SpoolError> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(io(path))?;
    let mut out = Vec::new();
    let mut pos = 0usize;
    while data.len() - pos >= HEADER {
        let len = u32::from_le_bytes(data[pos..pos + 4].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(data[pos + 4..pos + 8].try_into().unwrap_or_default());
        let seq = u64::from_le_bytes(data[pos + 8..pos + 16].try_into().unwrap_or_default());
        if len > MAX_RECORD || data.len() - pos - HEADER < len {
            break;
        }
        let payload = &data[pos + HEADER..pos + HEADER + len];
        let mut h = crc32fast::Hasher::new();
        h.update(&seq.to_le_bytes());
        h.update(payload);
        if h.finalize() != crc {
            break;
        }
        out.push(Entry {
            seq,
            payload: payload.to_vec(),
        });
        pos += HEADER + len;
    }
    Ok((out, pos as u64, data.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }

    #[test]
    fn entries_survive_reopen_until_acknowledged() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path()).unwrap();
        assert_eq!(s.append(&[p("a"), p("b"), p("c")]).unwrap(), vec![0, 1, 2]);
        s.ack(0);
        s.checkpoint().unwrap();
        drop(s);
        let s = Spool::open(d.path()).unwrap();
        let left: Vec<_> = s.unacked_from(0).map(|e| e.payload.clone()).collect();
        assert_eq!(left, vec![p("b"), p("c")]);
        assert_eq!(s.first_unacked(), 1);
    }

    #[test]
    fn a_message_too_big_to_read_back_is_refused_and_later_ones_survive_a_reopen() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path()).unwrap();
        s.append(&[p("before")]).unwrap();
        let huge = vec![b'x'; MAX_RECORD + 1];
        assert!(matches!(
            s.append(&[p("with it"), huge]),
            Err(SpoolError::TooLarge { .. })
        ));
        s.append(&[p("after")]).unwrap();
        drop(s);
        let s = Spool::open(d.path()).unwrap();
        assert_eq!(s.torn_bytes, 0);
        let left: Vec<_> = s.unacked_from(0).map(|e| e.payload.clone()).collect();
        assert_eq!(left, vec![p("before"), p("after")]);
    }

    #[test]
    fn torn_tail_is_cut_and_earlier_entries_kept() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path()).unwrap();
        s.append(&[p("one"), p("two")]).unwrap();
        drop(s);
        let seg = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "seg"))
            .unwrap();
        // A crash mid-append: half a header and a flipped payload byte.
        let mut bytes = std::fs::read(&seg).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        bytes.extend_from_slice(&[7, 0, 0]);
        std::fs::write(&seg, &bytes).unwrap();
        let mut s = Spool::open(d.path()).unwrap();
        let left: Vec<_> = s.unacked_from(0).map(|e| e.payload.clone()).collect();
        assert_eq!(left, vec![p("one")]);
        assert!(s.torn_bytes > 0);
        // Appending after the cut continues cleanly.
        assert_eq!(s.append(&[p("three")]).unwrap(), vec![1]);
        drop(s);
        let s = Spool::open(d.path()).unwrap();
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn out_of_order_acks_advance_the_cursor_only_when_contiguous() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path()).unwrap();
        s.append(&[p("a"), p("b"), p("c")]).unwrap();
        s.ack(1);
        assert_eq!(s.first_unacked(), 0);
        assert_eq!(s.unacked_from(0).count(), 2);
        s.ack(0);
        assert_eq!(s.first_unacked(), 2);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn a_failed_write_is_cut_off_so_later_entries_survive_a_reopen() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path()).unwrap();
        s.append(&[p("a")]).unwrap();
        // The disk fills part-way through the second record of the batch.
        s.fail_after = Some(30);
        assert!(s.append(&[p("refused-1"), p("refused-2")]).is_err());
        assert_eq!(
            s.append(&[p("b")]).unwrap(),
            vec![1],
            "seqs given out again"
        );
        drop(s);
        let s = Spool::open(d.path()).unwrap();
        assert_eq!(s.torn_bytes, 0);
        let left: Vec<_> = s.unacked_from(0).map(|e| e.payload.clone()).collect();
        assert_eq!(left, vec![p("a"), p("b")]);
    }

    #[test]
    fn a_failed_write_that_cannot_be_cut_off_stops_appends_until_a_reopen() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path()).unwrap();
        s.append(&[p("a")]).unwrap();
        // Writes to /dev/full fail, and it cannot be truncated.
        let (f, _, _) = s.current.as_mut().unwrap();
        let real = std::mem::replace(f, OpenOptions::new().write(true).open("/dev/full").unwrap());
        assert!(s.append(&[p("refused")]).is_err());
        s.current.as_mut().unwrap().0 = real;
        let e = s.append(&[p("b")]).unwrap_err().to_string();
        assert!(e.contains("reopen"), "{e}");
        drop(s);
        let mut s = Spool::open(d.path()).unwrap();
        assert_eq!(s.append(&[p("b")]).unwrap(), vec![1]);
    }

    #[test]
    fn acknowledged_segments_are_deleted() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path()).unwrap();
        s.append(&[p("a")]).unwrap();
        s.current = None; // force a new segment
        s.append(&[p("b")]).unwrap();
        s.ack(0);
        s.checkpoint().unwrap();
        let segs = std::fs::read_dir(d.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "seg")
            })
            .count();
        assert_eq!(segs, 1);
    }
}
