//! Payment-channel files -> top-up entries.
//!
//! Every channel (WeChat Pay, Alipay, bank, counter) delivers the CSV of
//! `docs/data-model.md` (`txn_id,channel,account_id,amount,paid_at`). The
//! idempotency key is `pay:CHANNEL:TXN_ID`: importing a file twice, or files
//! that overlap, credits each payment once; a transaction id re-used with a
//! different account, amount or time is rejected and reported (the rest of
//! the file is imported). A payment made at or before its account's switch
//! to meterflow (`ledger import-balances`) is not credited: the opening
//! balance holds it. It is reported in `before_switch`.

use std::path::Path;

use super::PrepayError;
use crate::ledger::{Batch, CommitHook, EntryKind, Ledger, NewEntry, Outcome};
use crate::master::Payment;

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ImportReport {
    pub rows: usize,
    pub credited: usize,
    pub duplicates: usize,
    /// (txn key, explanation)
    pub conflicts: Vec<(String, String)>,
    /// Bad rows, `FILE:LINE: field 'F': reason`.
    pub bad_rows: Vec<String>,
    /// Payments not credited because the account's opening balance, taken
    /// at its switch to meterflow, already holds them: `KEY: why`.
    pub before_switch: Vec<String>,
    pub alerts: usize,
}

pub fn entry_for(p: &Payment, file: &str) -> NewEntry {
    NewEntry {
        key: format!("pay:{}:{}", p.channel, p.txn_id),
        account_id: p.account_id.clone(),
        kind: EntryKind::TopUp,
        amount: p.amount,
        ts_ms: p.paid_at.timestamp_millis(),
        source: p.channel.clone(),
        detail: format!(
            "{{\"file\":{}}}",
            serde_json::to_string(file).unwrap_or_default()
        ),
    }
}

/// Imports one payments file in transactions of `chunk` rows.
pub fn import_file(
    ledger: &mut dyn Ledger,
    path: &Path,
    hook: &dyn CommitHook,
    chunk: usize,
) -> Result<ImportReport, PrepayError> {
    let loaded =
        crate::master::load_payments(path).map_err(|e| PrepayError::Input(e.to_string()))?;
    let mut report = ImportReport {
        rows: loaded.rows.len() + loaded.errors.len(),
        bad_rows: loaded.errors.iter().map(|e| e.to_string()).collect(),
        ..Default::default()
    };
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().to_string())
        .unwrap_or_default();
    let opened = super::opening::openings(ledger)?;
    let mut rows = loaded.rows;
    if !opened.is_empty() {
        rows.retain(|p| match opened.get(&p.account_id) {
            Some(&at) if p.paid_at.timestamp_millis() <= at => {
                report.before_switch.push(format!(
                    "pay:{}:{}: {} yuan paid at {} to {}, at or before its switch to meterflow at {}: its opening balance holds it",
                    p.channel,
                    p.txn_id,
                    p.amount,
                    p.paid_at.to_rfc3339(),
                    p.account_id,
                    super::opening::rfc3339(at)
                ));
                false
            }
            _ => true,
        });
    }
    for rows in rows.chunks(chunk.max(1)) {
        let batch = Batch {
            entries: rows.iter().map(|p| entry_for(p, &file)).collect(),
            ..Default::default()
        };
        let r = ledger.commit(&batch, hook)?;
        for (o, e) in r.outcomes.iter().zip(&batch.entries) {
            match o {
                Outcome::Inserted => report.credited += 1,
                Outcome::Duplicate => report.duplicates += 1,
                Outcome::Conflict { stored } => report.conflicts.push((
                    e.key.clone(),
                    format!(
                        "transaction id already credited as [{stored}]; this file says [{}]",
                        e.identity()
                    ),
                )),
            }
        }
        report.alerts += r.outbox.len();
    }
    Ok(report)
}
