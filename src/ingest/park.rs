//! Sparkplug messages parked until a birth declares their aliases.
//!
//! When the central ingest restarts, its alias tables are gone. Data that an
//! edge node sends before it answers the rebirth request names its metrics
//! only by alias, so it cannot be decoded yet. Such a message is kept in one
//! file per message under the spool directory. The file is durable before the
//! message's PUBACK. The message is decoded once the node's birth arrives.
//! It is dead-lettered instead when the node dies first, or when no birth
//! comes within the configured time.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::store::{atomic, StoreError};

const MAGIC: &[u8; 6] = b"MFPK1\n";
const SUFFIX: &str = ".park";

/// One parked message, as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedMsg {
    /// File stem; ordered by arrival.
    pub id: String,
    /// Name of the configured source that decoded it.
    pub source: String,
    pub topic: String,
    pub payload: Vec<u8>,
    /// When the broker delivered it: the time of readings that carry none.
    pub received_ms: i64,
    /// When its wait for a birth began, for the park deadline: its receipt,
    /// or the restart that restored it (not stored: nodes can answer a
    /// rebirth request only once ingest is back).
    pub waiting_since_ms: i64,
}

impl ParkedMsg {
    pub fn new(source: &str, topic: &str, payload: &[u8], received_ms: i64) -> ParkedMsg {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        ParkedMsg {
            id: format!("{nanos:024}-{:08}", SEQ.fetch_add(1, Ordering::Relaxed)),
            source: source.to_string(),
            topic: topic.to_string(),
            payload: payload.to_vec(),
            received_ms,
            waiting_since_ms: received_ms,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(32 + self.topic.len() + self.payload.len());
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&self.received_ms.to_le_bytes());
        for s in [&self.source, &self.topic] {
            b.extend_from_slice(&(s.len() as u32).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        }
        b.extend_from_slice(&self.payload);
        b
    }

    fn decode(id: &str, b: &[u8]) -> Result<ParkedMsg, String> {
        let rest = b
            .strip_prefix(MAGIC.as_slice())
            .ok_or("not a parked-message file")?;
        let (ts, mut rest) = rest.split_at_checked(8).ok_or("truncated header")?;
        let received_ms = i64::from_le_bytes(ts.try_into().expect("8 bytes"));
        let mut text = || -> Result<String, String> {
            let (len, r) = rest.split_at_checked(4).ok_or("truncated length")?;
            let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
            let (s, r) = r.split_at_checked(len).ok_or("truncated text")?;
            rest = r;
            String::from_utf8(s.to_vec()).map_err(|_| "text is not UTF-8".to_string())
        };
        let source = text()?;
        let topic = text()?;
        Ok(ParkedMsg {
            id: id.to_string(),
            source,
            topic,
            payload: rest.to_vec(),
            received_ms,
            waiting_since_ms: received_ms,
        })
    }
}

/// The directory of parked-message files.
#[derive(Debug)]
pub struct ParkDir {
    dir: PathBuf,
}

/// A file in the park directory that could not be read back.
#[derive(Debug)]
pub struct Unreadable {
    pub id: String,
    pub bytes: Vec<u8>,
    pub reason: String,
}

impl ParkDir {
    /// Opens (creating) `dir` and reads what a previous run left parked, oldest first.
    pub fn open(dir: &Path) -> Result<(ParkDir, Vec<ParkedMsg>, Vec<Unreadable>), StoreError> {
        atomic::create_dir_durable(dir)?;
        let mut names = Vec::new();
        for ent in fs::read_dir(dir).map_err(|e| StoreError::io(dir, e))? {
            let ent = ent.map_err(|e| StoreError::io(dir, e))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(SUFFIX) {
                names.push(id.to_string());
            }
        }
        names.sort();
        let (mut ok, mut bad) = (Vec::new(), Vec::new());
        for id in names {
            let path = dir.join(format!("{id}{SUFFIX}"));
            let bytes = fs::read(&path).map_err(|e| StoreError::io(&path, e))?;
            match ParkedMsg::decode(&id, &bytes) {
                Ok(m) => ok.push(m),
                Err(reason) => bad.push(Unreadable { id, bytes, reason }),
            }
        }
        Ok((
            ParkDir {
                dir: dir.to_path_buf(),
            },
            ok,
            bad,
        ))
    }

    /// Makes the messages durable: each file atomically, then the directory once.
    pub fn write(&self, msgs: &[ParkedMsg]) -> Result<(), StoreError> {
        if msgs.is_empty() {
            return Ok(());
        }
        for m in msgs {
            let path = self.path(&m.id);
            let tmp = atomic::temp_path(&path);
            fs::write(&tmp, m.encode()).map_err(|e| StoreError::io(&tmp, e))?;
            let f = fs::File::open(&tmp).map_err(|e| StoreError::io(&tmp, e))?;
            f.sync_all().map_err(|e| StoreError::io(&tmp, e))?;
            fs::rename(&tmp, &path).map_err(|e| StoreError::io(&path, e))?;
        }
        atomic::sync_dir(&self.dir)
    }

    /// Forgets messages whose outcome (readings or dead letter) is durable.
    pub fn remove(&self, ids: &[String]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        for id in ids {
            let path = self.path(id);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io(&path, e)),
            }
        }
        atomic::sync_dir(&self.dir)
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}{SUFFIX}"))
    }
}

/// Parked messages held in memory by the decode task, with their node key.
#[derive(Debug, Default)]
pub struct Parking {
    held: Vec<(String, ParkedMsg)>,
}

impl Parking {
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Holds a message of node `group/edge`.
    pub fn hold(&mut self, node: String, m: ParkedMsg) {
        self.held.push((node, m));
    }

    /// Takes every message of `node` from `source`, oldest first.
    pub fn take_node(&mut self, source: &str, node: &str) -> Vec<ParkedMsg> {
        self.take(|n, m| n == node && m.source == source)
    }

    /// Takes every message that began waiting before `cutoff_ms`.
    pub fn take_older_than(&mut self, cutoff_ms: i64) -> Vec<ParkedMsg> {
        self.take(|_, m| m.waiting_since_ms < cutoff_ms)
    }

    /// Distinct nodes with parked messages, with the source they came from.
    pub fn nodes(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .held
            .iter()
            .map(|(n, m)| (m.source.clone(), n.clone()))
            .collect();
        v.sort();
        v.dedup();
        v
    }

    fn take(&mut self, pick: impl Fn(&str, &ParkedMsg) -> bool) -> Vec<ParkedMsg> {
        let (taken, kept) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|(n, m)| pick(n, m));
        self.held = kept;
        taken.into_iter().map(|(_, m)| m).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parked_files_survive_a_restart_in_arrival_order() {
        let dir = tempfile::tempdir().unwrap();
        let (park, old, bad) = ParkDir::open(dir.path()).unwrap();
        assert!(old.is_empty() && bad.is_empty());
        let a = ParkedMsg::new("spb", "spBv1.0/g/NDATA/e", &[1, 2, 3], 10);
        let b = ParkedMsg::new("spb", "spBv1.0/g/DDATA/e/m", &[], 11);
        park.write(&[a.clone(), b.clone()]).unwrap();
        let (park, back, _) = ParkDir::open(dir.path()).unwrap();
        assert_eq!(back, vec![a.clone(), b.clone()]);
        park.remove(std::slice::from_ref(&a.id)).unwrap();
        let (_, back, _) = ParkDir::open(dir.path()).unwrap();
        assert_eq!(back, vec![b]);
    }

    #[test]
    fn an_unreadable_park_file_is_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("x.park"), b"MFPK1\n\x01").unwrap();
        let (_, ok, bad) = ParkDir::open(dir.path()).unwrap();
        assert!(ok.is_empty());
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].reason, "truncated header");
    }

    #[test]
    fn a_birth_takes_only_its_own_nodes_messages() {
        let mut p = Parking::default();
        p.hold("g/e1".into(), ParkedMsg::new("spb", "t1", &[], 1));
        p.hold("g/e2".into(), ParkedMsg::new("spb", "t2", &[], 2));
        p.hold("g/e1".into(), ParkedMsg::new("other", "t3", &[], 3));
        let got = p.take_node("spb", "g/e1");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].topic, "t1");
        assert_eq!(p.len(), 2);
        assert_eq!(p.take_older_than(3).len(), 1);
        assert_eq!(p.nodes(), vec![("other".to_string(), "g/e1".to_string())]);
    }
}
