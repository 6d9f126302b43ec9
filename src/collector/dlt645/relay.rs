//! Relay control (0x1C) for remote fee control: trip, allow close, alarm,
//! protect supply. Dry-run unless `execute`; every command and every answer
//! goes to an append-only audit log (JSON lines, fsynced) before and after
//! the meter is asked. Passwords are never logged. A command is sent once:
//! without a clean answer its outcome is unknown, and whoever ordered it
//! decides whether to send it again.

use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{FixedOffset, Utc};
use serde::Serialize;

use super::bus::{Bus, TxError};
use crate::protocol::dlt645::frame::hex;
use crate::protocol::dlt645::message::{relay_request, Operator, Password, RelayCommand};
use crate::protocol::dlt645::{Address, ErrorStatus, MeterTime};

/// The append-only audit log.
#[derive(Debug, Clone)]
pub struct AuditLog {
    path: PathBuf,
}

/// One line of the audit log.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    /// UTC, RFC 3339.
    pub ts: String,
    /// `dry_run`, `sent`, `accepted`, `refused`, `unknown` (no clean answer:
    /// the meter may have executed it), `failed`.
    pub event: String,
    pub meter: String,
    pub endpoint: String,
    pub command: String,
    pub operator: String,
    /// Meter-local expiry of the command.
    pub expiry: String,
    pub request_hex: String,
    pub response: Option<String>,
    /// Who ran it (the `USER` environment variable).
    pub user: String,
    /// Caller's idempotency key of the command (prepaid relay orders), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command_id: Option<String>,
}

impl AuditLog {
    pub fn new(path: impl Into<PathBuf>) -> AuditLog {
        AuditLog { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record and syncs it to disk before returning. A line
    /// left unfinished by a write that failed part-way is ended first, so
    /// this record gets a line of its own (the torn one stays, unreadable,
    /// rather than swallowing the record).
    pub fn append(&self, rec: &AuditRecord) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&self.path)?;
        let mut line = String::new();
        let len = f.metadata()?.len();
        if len > 0 {
            let mut last = [0u8];
            f.read_exact_at(&mut last, len - 1)?;
            if last[0] != b'\n' {
                line.push('\n');
            }
        }
        line.push_str(&serde_json::to_string(rec).map_err(std::io::Error::other)?);
        line.push('\n');
        f.write_all(line.as_bytes())?;
        f.sync_data()
    }
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayOutcome {
    /// Not sent (no `--execute`); the frame that would have been sent.
    DryRun {
        request_hex: String,
    },
    Accepted,
    Refused(ErrorStatus),
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("cannot write the audit log: {0}")]
    Audit(std::io::Error),
    #[error("{summary}: {0}", summary = tx_summary(.0))]
    Tx(TxError),
}

impl RelayError {
    /// The command went out but no clean answer came back.
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, RelayError::Tx(e) if tx_outcome_unknown(e))
    }
}

/// A timeout, a corrupt reply or a link lost after sending: the meter may
/// have executed the command.
fn tx_outcome_unknown(e: &TxError) -> bool {
    matches!(
        e,
        TxError::Timeout(_) | TxError::Corrupt(_) | TxError::Io(_)
    )
}

fn tx_summary(e: &TxError) -> &'static str {
    if tx_outcome_unknown(e) {
        "relay command outcome unknown (the meter may have executed it; check its relay state before sending it again)"
    } else {
        "relay command failed"
    }
}

/// A relay command ready to go.
#[derive(Debug, Clone)]
pub struct RelayOrder {
    pub address: Address,
    pub command: RelayCommand,
    pub password: Password,
    pub operator: Operator,
    /// Meter-local time after which the meter must refuse the command.
    pub expiry: MeterTime,
}

impl RelayOrder {
    /// Expiry `minutes` from now in meter-local time.
    pub fn expiring_in(
        address: Address,
        command: RelayCommand,
        password: Password,
        operator: Operator,
        minutes: i64,
        offset: FixedOffset,
    ) -> RelayOrder {
        let local = (Utc::now() + chrono::Duration::minutes(minutes))
            .with_timezone(&offset)
            .naive_local();
        RelayOrder {
            address,
            command,
            password,
            operator,
            expiry: MeterTime::from_naive(local),
        }
    }
}

/// Sends (or, without `execute`, only records) a relay command.
pub async fn relay_control(
    bus: Option<&mut Bus>,
    endpoint: &str,
    order: &RelayOrder,
    audit: &AuditLog,
    execute: bool,
) -> Result<RelayOutcome, RelayError> {
    relay_control_keyed(bus, endpoint, order, audit, execute, None).await
}

/// [`relay_control`] with the caller's idempotency key written on every
/// audit line of the command, so a later run can tell it was answered.
pub async fn relay_control_keyed(
    bus: Option<&mut Bus>,
    endpoint: &str,
    order: &RelayOrder,
    audit: &AuditLog,
    execute: bool,
    command_id: Option<&str>,
) -> Result<RelayOutcome, RelayError> {
    let frame = relay_request(
        order.address,
        order.command,
        order.password,
        order.operator,
        order.expiry,
    );
    let request_hex = hex(&frame.encode(0).expect("relay frames are short"));
    let e = order.expiry;
    let mut rec = AuditRecord {
        ts: Utc::now().to_rfc3339(),
        event: String::new(),
        meter: order.address.to_string(),
        endpoint: endpoint.to_string(),
        command: order.command.to_string(),
        operator: order.operator.to_string(),
        expiry: format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            e.year, e.month, e.day, e.hour, e.minute, e.second
        ),
        request_hex: request_hex.clone(),
        response: None,
        user: std::env::var("USER").unwrap_or_default(),
        command_id: command_id.map(str::to_string),
    };
    let bus = match bus {
        Some(b) if execute => b,
        _ => {
            rec.event = "dry_run".into();
            audit.append(&rec).map_err(RelayError::Audit)?;
            return Ok(RelayOutcome::DryRun { request_hex });
        }
    };
    rec.event = "sent".into();
    audit.append(&rec).map_err(RelayError::Audit)?;
    let label = format!("{}/{}", bus.name, order.address);
    // Never resent here: a corrupt reply usually means the meter executed it.
    let result = bus.command(&frame, &label).await;
    rec.ts = Utc::now().to_rfc3339();
    let outcome = match result {
        Ok(reply) => {
            rec.event = "accepted".into();
            rec.response = Some(hex(&reply.encode(0).unwrap_or_default()));
            Ok(RelayOutcome::Accepted)
        }
        Err(TxError::Refused(status)) => {
            rec.event = "refused".into();
            rec.response = Some(status.to_string());
            Ok(RelayOutcome::Refused(status))
        }
        Err(other) if tx_outcome_unknown(&other) => {
            rec.event = "unknown".into();
            rec.response = Some(other.to_string());
            Err(RelayError::Tx(other))
        }
        Err(other) => {
            rec.event = "failed".into();
            rec.response = Some(other.to_string());
            Err(RelayError::Tx(other))
        }
    };
    audit.append(&rec).map_err(RelayError::Audit)?;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(event: &str) -> AuditRecord {
        AuditRecord {
            ts: "2026-12-06T00:00:00Z".into(),
            event: event.into(),
            meter: "000000000001".into(),
            endpoint: "tcp://127.0.0.1:1".into(),
            command: "trip".into(),
            operator: "00000000".into(),
            expiry: "2026-12-06 08:10:00".into(),
            request_hex: "68".into(),
            response: None,
            user: "test".into(),
            command_id: None,
        }
    }

    #[test]
    fn a_record_after_a_torn_line_gets_a_line_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(dir.path().join("audit.jsonl"));
        log.append(&record("sent")).unwrap();
        // A write that failed part-way left half a record.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(log.path())
            .unwrap();
        f.write_all(br#"{"ts":"2026-12-06T00:00:01Z","ev"#).unwrap();
        log.append(&record("accepted")).unwrap();
        let text = std::fs::read_to_string(log.path()).unwrap();
        let events: Vec<Option<String>> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .map(|v| v["event"].as_str().unwrap().to_string())
            })
            .collect();
        assert_eq!(
            events,
            vec![Some("sent".into()), None, Some("accepted".into())]
        );
    }
}
