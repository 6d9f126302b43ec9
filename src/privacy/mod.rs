//! Privacy for data-team outputs: masking of personal fields and keyed-hash
//! pseudonyms for account ids.
//!
//! Rules (docs/analytics.md): a name keeps its family name, a phone its first
//! 3 and last 4 digits, an ID number its first 3 and last 4 characters, an
//! address is cut after its district. Raw values leave meterflow only from
//! commands run with `--pii`, in files named `*.pii.parquet`.

mod hmac;
mod mask;

pub use hmac::hmac_sha256;
pub use mask::{mask_address, mask_id_number, mask_name, mask_phone};

use std::path::{Path, PathBuf};

/// Environment variable holding the pseudonymization secret.
pub const SECRET_ENV: &str = "METERFLOW_PSEUDONYM_SECRET";
/// Shortest secret accepted, in bytes: a short key makes the hash guessable
/// by trying every account id.
pub const MIN_SECRET_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum PrivacyError {
    #[error("{path}: reading the pseudonymization secret: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no pseudonymization secret: pass --secret-file FILE or set {SECRET_ENV}")]
    NoSecret,
    #[error(
        "pseudonymization secret from {from} is {len} bytes; at least {MIN_SECRET_LEN} are needed"
    )]
    ShortSecret { from: String, len: usize },
}

/// Replaces account ids by a keyed hash: stable for one secret (so datasets
/// still join), not reversible or guessable without it.
#[derive(Clone)]
pub struct Pseudonymizer {
    key: Vec<u8>,
}

impl std::fmt::Debug for Pseudonymizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pseudonymizer { key: <hidden> }")
    }
}

impl Pseudonymizer {
    pub fn new(key: &[u8]) -> Result<Pseudonymizer, PrivacyError> {
        if key.len() < MIN_SECRET_LEN {
            return Err(PrivacyError::ShortSecret {
                from: "key".into(),
                len: key.len(),
            });
        }
        Ok(Pseudonymizer { key: key.to_vec() })
    }

    /// Secret from a file (trailing newline ignored), else from the
    /// `METERFLOW_PSEUDONYM_SECRET` environment variable. Never from the
    /// command line, where it would show in `ps` and shell history.
    pub fn from_file_or_env(file: Option<&Path>) -> Result<Pseudonymizer, PrivacyError> {
        let (from, mut key) = match file {
            Some(p) => (
                p.display().to_string(),
                std::fs::read(p).map_err(|source| PrivacyError::Io {
                    path: p.to_path_buf(),
                    source,
                })?,
            ),
            None => match std::env::var_os(SECRET_ENV) {
                Some(v) => (SECRET_ENV.to_string(), v.into_encoded_bytes()),
                None => return Err(PrivacyError::NoSecret),
            },
        };
        while key.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            key.pop();
        }
        if key.len() < MIN_SECRET_LEN {
            return Err(PrivacyError::ShortSecret {
                from,
                len: key.len(),
            });
        }
        Ok(Pseudonymizer { key })
    }

    /// `p_` + the first 16 bytes of HMAC-SHA256(secret, account id), hex.
    pub fn pseudonym(&self, account_id: &str) -> String {
        let mac = hmac_sha256(&self.key, account_id.as_bytes());
        format!("p_{}", hex::encode(&mac[..16]))
    }
}

/// How an output names accounts: the account id itself, or its pseudonym.
#[derive(Debug, Clone, Default)]
pub struct AccountKey {
    pseudo: Option<Pseudonymizer>,
}

impl AccountKey {
    pub fn plain() -> AccountKey {
        AccountKey { pseudo: None }
    }
    pub fn pseudonymized(p: Pseudonymizer) -> AccountKey {
        AccountKey { pseudo: Some(p) }
    }
    pub fn is_pseudonymized(&self) -> bool {
        self.pseudo.is_some()
    }
    pub fn key(&self, account_id: &str) -> String {
        match &self.pseudo {
            Some(p) => p.pseudonym(account_id),
            None => account_id.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudonyms_are_stable_per_secret_and_differ_across_secrets() {
        let a = Pseudonymizer::new(b"0123456789abcdef").unwrap();
        let b = Pseudonymizer::new(b"0123456789abcdeX").unwrap();
        assert_eq!(a.pseudonym("A000000001"), a.pseudonym("A000000001"));
        assert_ne!(a.pseudonym("A000000001"), a.pseudonym("A000000002"));
        assert_ne!(a.pseudonym("A000000001"), b.pseudonym("A000000001"));
        assert!(!a.pseudonym("A000000001").contains("A000000001"));
        assert_eq!(a.pseudonym("A000000001").len(), 34);
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(matches!(
            Pseudonymizer::new(b"short"),
            Err(PrivacyError::ShortSecret { .. })
        ));
    }

    #[test]
    fn secret_file_trailing_newline_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret");
        std::fs::write(&p, "0123456789abcdef\n").unwrap();
        let a = Pseudonymizer::from_file_or_env(Some(&p)).unwrap();
        let b = Pseudonymizer::new(b"0123456789abcdef").unwrap();
        assert_eq!(a.pseudonym("x"), b.pseudonym("x"));
    }

    #[test]
    fn debug_output_hides_the_secret() {
        let a = Pseudonymizer::new(b"0123456789abcdef").unwrap();
        assert!(!format!("{a:?}").contains("0123"));
    }
}
