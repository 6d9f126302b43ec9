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

use std::collections::HashMap;
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
    // Accounts known to have switched to meterflow, with their switch.
    // Learned only when a commit finds an opening among its accounts: a
    // ledger without openings pays one key check per account, inside the
    // transaction, and none outside it.
    let mut opened: HashMap<String, i64> = HashMap::new();
    for rows in loaded.rows.chunks(chunk.max(1)) {
        let mut keys: Vec<String> = rows
            .iter()
            .map(|p| super::opening::key(&p.account_id))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let (batch, r) = loop {
            let mut before = Vec::new();
            let mut entries = Vec::new();
            for p in rows {
                match opened.get(&p.account_id) {
                    Some(&at) if p.paid_at.timestamp_millis() <= at => before.push(format!(
                        "pay:{}:{}: {} yuan paid at {} to {}, at or before its switch to meterflow at {}: its opening balance holds it",
                        p.channel,
                        p.txn_id,
                        p.amount,
                        p.paid_at.to_rfc3339(),
                        p.account_id,
                        super::opening::rfc3339(at)
                    )),
                    _ => entries.push(entry_for(p, &file)),
                }
            }
            let batch = Batch {
                absent_keys: keys
                    .iter()
                    .filter(|k| !opened.contains_key(&k[super::opening::KEY_PREFIX.len()..]))
                    .cloned()
                    .collect(),
                entries,
                ..Default::default()
            };
            let r = ledger.commit(&batch, hook)?;
            if !r.stale {
                report.before_switch.extend(before);
                break (batch, r);
            }
            // An account of the chunk is opened (maybe meanwhile): learn them.
            opened.extend(
                ledger
                    .entries_by_keys(&keys)?
                    .into_iter()
                    .map(|e| (e.entry.account_id, e.entry.ts_ms)),
            );
        };
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
