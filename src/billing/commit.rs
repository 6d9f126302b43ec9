//! Writing a run directory. Output files are streamed into a hidden staging
//! directory next to the target, each hashed as it is written; `commit`
//! fsyncs them, writes `manifest.json` and renames the directory into place,
//! so readers see the whole run or nothing. A preview hashes the same bytes
//! and keeps none.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::run::{io, BillingError};

/// The staging directory of one run (none for a preview).
pub struct Staging {
    target: PathBuf,
    tmp: Option<PathBuf>,
}

impl Staging {
    /// Starts a run directory for `target`; a stale staging directory of
    /// this process id is removed first.
    pub fn new(target: &Path, preview: bool) -> Result<Staging, BillingError> {
        if preview {
            return Ok(Staging {
                target: target.to_path_buf(),
                tmp: None,
            });
        }
        let parent = parent(target);
        // New ancestors must survive a power loss with the committed run.
        crate::store::atomic::create_dir_durable(parent)?;
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "run".into());
        let tmp = parent.join(format!(".{name}.{}.tmp", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        Ok(Staging {
            target: target.to_path_buf(),
            tmp: Some(tmp),
        })
    }

    /// A new output file in the staging directory (hashed only, for a preview).
    pub fn create(&self, name: &str) -> Result<HashedFile, BillingError> {
        let file = match &self.tmp {
            Some(dir) => {
                let p = dir.join(name);
                let f = File::create(&p).map_err(io(&p))?;
                Some((p, BufWriter::with_capacity(1 << 20, f)))
            }
            None => None,
        };
        Ok(HashedFile {
            name: name.to_string(),
            file,
            hasher: Sha256::new(),
            bytes: 0,
        })
    }

    /// Writes `manifest.json` and renames the staging directory to the
    /// target. Returns the target (None for a preview).
    pub fn commit(mut self, manifest: &serde_json::Value) -> Result<Option<PathBuf>, BillingError> {
        // Kept in `self.tmp` until the rename: a failure before it (full
        // disk, a run that committed the same target first) removes it.
        let Some(tmp) = self.tmp.clone() else {
            return Ok(None);
        };
        let text = serde_json::to_vec_pretty(manifest)
            .map_err(|e| BillingError::Invalid(e.to_string()))?;
        let p = tmp.join("manifest.json");
        let mut f = File::create(&p).map_err(io(&p))?;
        f.write_all(&text).map_err(io(&p))?;
        f.sync_all().map_err(io(&p))?;
        crate::store::atomic::sync_dir(&tmp)?;
        let target = &self.target;
        if target.exists() {
            // An empty directory made by the user: replace it.
            std::fs::remove_dir(target).map_err(io(target))?;
        }
        std::fs::rename(&tmp, target).map_err(io(target))?;
        self.tmp = None;
        crate::store::atomic::sync_dir(parent(target))?;
        Ok(Some(target.clone()))
    }
}

impl Drop for Staging {
    /// A run that fails leaves nothing behind.
    fn drop(&mut self) {
        if let Some(tmp) = &self.tmp {
            let _ = std::fs::remove_dir_all(tmp);
        }
    }
}

fn parent(target: &Path) -> &Path {
    target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// An output file being written: SHA-256 and size of every byte, and the
/// bytes themselves unless this is a preview.
pub struct HashedFile {
    name: String,
    file: Option<(PathBuf, BufWriter<File>)>,
    hasher: Sha256,
    bytes: u64,
}

/// A finished output file, for the manifest.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct OutputFile {
    pub name: String,
    pub rows: usize,
    pub bytes: usize,
    pub sha256: String,
}

impl HashedFile {
    /// The file's name in the run directory.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Flushes and fsyncs the file.
    pub fn finish(self, rows: usize) -> Result<OutputFile, BillingError> {
        if let Some((p, w)) = self.file {
            let f = w.into_inner().map_err(|e| BillingError::Io {
                path: p.clone(),
                source: e.into_error(),
            })?;
            f.sync_all().map_err(io(&p))?;
        }
        Ok(OutputFile {
            name: self.name,
            rows,
            bytes: self.bytes as usize,
            sha256: hex::encode(self.hasher.finalize()),
        })
    }
}

impl Write for HashedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = match &mut self.file {
            Some((_, w)) => w.write(buf)?,
            None => buf.len(),
        };
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.file {
            Some((_, w)) => w.flush(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> serde_json::Value {
        serde_json::json!({"period": "2026-10"})
    }

    #[test]
    fn committed_files_match_their_hashes_and_the_staging_dir_is_gone() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("run");
        let s = Staging::new(&target, false).unwrap();
        let mut f = s.create("a.bin").unwrap();
        f.write_all(b"hello").unwrap();
        let out = f.finish(1).unwrap();
        assert_eq!(out.bytes, 5);
        assert_eq!(out.sha256, hex::encode(Sha256::digest(b"hello")));
        assert_eq!(s.commit(&manifest()).unwrap(), Some(target.clone()));
        assert_eq!(std::fs::read(target.join("a.bin")).unwrap(), b"hello");
        assert!(target.join("manifest.json").exists());
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "only the run directory is left");
    }

    #[test]
    fn a_run_dropped_before_commit_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("run");
        let s = Staging::new(&target, false).unwrap();
        let mut f = s.create("a.bin").unwrap();
        f.write_all(b"half").unwrap();
        drop(f);
        drop(s);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_preview_hashes_the_same_bytes_and_writes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("run");
        let s = Staging::new(&target, true).unwrap();
        let mut f = s.create("a.bin").unwrap();
        f.write_all(b"hello").unwrap();
        let out = f.finish(1).unwrap();
        assert_eq!(out.sha256, hex::encode(Sha256::digest(b"hello")));
        assert_eq!(s.commit(&manifest()).unwrap(), None);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_commit_that_fails_leaves_no_staging_directory() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("run");
        // Another run committed the same target first.
        let first = Staging::new(&target, false).unwrap();
        first.create("a.bin").unwrap().finish(0).unwrap();
        first.commit(&manifest()).unwrap();
        let second = Staging::new(&target, false).unwrap();
        second.create("b.bin").unwrap().finish(0).unwrap();
        assert!(second.commit(&manifest()).is_err());
        let names: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["run"], "the loser's staging directory is gone");
        assert!(target.join("a.bin").exists());
    }

    #[test]
    fn an_empty_target_made_by_the_user_is_replaced() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("run");
        std::fs::create_dir(&target).unwrap();
        let s = Staging::new(&target, false).unwrap();
        s.create("a.bin").unwrap().finish(0).unwrap();
        s.commit(&manifest()).unwrap();
        assert!(target.join("a.bin").exists());
    }
}
