//! The commit algorithm, written once over the primitive operations each
//! backend provides inside its open transaction.

use std::collections::{BTreeMap, BTreeSet};

use rust_decimal::Decimal;

use super::{
    Batch, CommitHook, CommitReport, Cursor, CursorStamp, Expect, LedgerError, NewEntry, OutboxMsg,
    Outcome,
};

/// Primitive operations inside one open transaction.
pub trait Tx {
    /// Locks the balance rows of `accounts`, in the given (sorted) order. By
    /// the end of the commit each of them has a row (created at zero if
    /// missing, here or by [`Tx::balance`]). A backend may read their
    /// balances and flags here in one pass and answer from it.
    fn lock_balances(&mut self, accounts: &[&str]) -> Result<(), LedgerError>;
    /// Balance and entry count.
    fn balance(&mut self, account: &str) -> Result<(Decimal, i64), LedgerError>;
    fn set_balance(
        &mut self,
        account: &str,
        balance: Decimal,
        added_entries: i64,
    ) -> Result<(), LedgerError>;
    /// Inserts unless the key exists; returns the stored identity when it did.
    fn insert_entry(&mut self, e: &NewEntry, now_ms: i64) -> Result<Option<String>, LedgerError>;
    /// [`Tx::insert_entry`] for each entry, in order; a backend may do it in
    /// one statement (PostgreSQL: one round trip instead of one per entry).
    fn insert_entries(
        &mut self,
        es: &[NewEntry],
        now_ms: i64,
    ) -> Result<Vec<Option<String>>, LedgerError> {
        es.iter().map(|e| self.insert_entry(e, now_ms)).collect()
    }
    /// Locks and returns the cursor's stamp (None if absent).
    fn cursor_ts_for_update(
        &mut self,
        meter: &str,
        channel: &str,
    ) -> Result<Option<CursorStamp>, LedgerError>;
    fn upsert_cursor(&mut self, c: &Cursor) -> Result<(), LedgerError>;
    /// Before a run of [`Tx::cursor_ts_for_update`] calls over `keys`
    /// (sorted): a backend may read their stamps in one pass and answer
    /// from it.
    fn read_cursors_ahead(&mut self, _keys: &[(&str, &str)]) -> Result<(), LedgerError> {
        Ok(())
    }
    fn flags(&mut self, account: &str) -> Result<BTreeSet<String>, LedgerError>;
    fn set_flag(&mut self, account: &str, flag: &str, now_ms: i64) -> Result<(), LedgerError>;
    fn clear_flag(&mut self, account: &str, flag: &str) -> Result<(), LedgerError>;
    /// Inserts unless the id exists.
    fn insert_outbox(&mut self, m: &OutboxMsg) -> Result<bool, LedgerError>;
    /// Whether an entry with this key is stored.
    fn entry_exists(&mut self, key: &str) -> Result<bool, LedgerError>;
    /// Whether an entry with any of these keys is stored. A backend may
    /// answer a batch of keys at once (SQLite: one seek over their common
    /// prefix when no stored key has it).
    fn any_entry_exists(&mut self, keys: &[String]) -> Result<bool, LedgerError> {
        for k in keys {
            if self.entry_exists(k)? {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Applies `batch` through `tx`. Returns the report; the caller commits
/// (or rolls back when `stale`).
pub fn commit_batch(
    tx: &mut dyn Tx,
    batch: &Batch,
    hook: &dyn CommitHook,
    now_ms: i64,
) -> Result<CommitReport, LedgerError> {
    let mut report = CommitReport::default();
    // Lock order: balances (sorted), then cursors (sorted): no deadlocks between writers.
    let mut accounts: Vec<&str> = batch
        .entries
        .iter()
        .map(|e| e.account_id.as_str())
        .chain(batch.evaluate.iter().map(String::as_str))
        .collect();
    accounts.sort_unstable();
    accounts.dedup();
    tx.lock_balances(&accounts)?;
    // Checked with the balance rows locked: a writer that changes them
    // commits before or after this one, never in between.
    for (account, want) in &batch.entry_counts {
        if accounts.binary_search(&account.as_str()).is_err() {
            return Err(LedgerError::Db(format!(
                "entry-count precondition on account {account}, whose balance row the batch does not lock"
            )));
        }
        if tx.balance(account)?.1 != *want {
            report.stale = true;
            return Ok(report);
        }
    }
    if tx.any_entry_exists(&batch.absent_keys)? {
        report.stale = true;
        return Ok(report);
    }
    let mut expect: Vec<&Expect> = batch.expect.iter().collect();
    expect.sort_unstable();
    let mut keys: Vec<(&str, &str)> = expect
        .iter()
        .map(|(m, c, _)| (m.as_str(), c.as_str()))
        .collect();
    keys.dedup();
    tx.read_cursors_ahead(&keys)?;
    // Cursors checked here are locked and known (sorted by key): no second lookup below.
    let mut known: Vec<((&str, &str), Option<CursorStamp>)> = Vec::with_capacity(expect.len());
    for (meter, channel, want) in expect {
        let got = tx.cursor_ts_for_update(meter, channel)?;
        if got != *want {
            report.stale = true;
            return Ok(report);
        }
        known.push(((meter.as_str(), channel.as_str()), got));
    }
    let mut delta: BTreeMap<&str, (Decimal, i64)> = BTreeMap::new();
    let stored = tx.insert_entries(&batch.entries, now_ms)?;
    for (e, stored) in batch.entries.iter().zip(stored) {
        let outcome = match stored {
            None => {
                let d = delta.entry(e.account_id.as_str()).or_default();
                d.0 = d.0.checked_add(e.amount).ok_or_else(|| {
                    LedgerError::Range(format!("account {}: batch sum overflows", e.account_id))
                })?;
                d.1 += 1;
                Outcome::Inserted
            }
            Some(stored) if stored == e.identity() => Outcome::Duplicate,
            Some(stored) => Outcome::Conflict { stored },
        };
        report.outcomes.push(outcome);
    }
    let mut cursors: Vec<&Cursor> = batch.cursors.iter().collect();
    cursors.sort_by(|a, b| (&a.meter_id, &a.channel).cmp(&(&b.meter_id, &b.channel)));
    // Both lists are sorted: walk them together.
    let mut k = 0;
    for c in cursors {
        let key = (c.meter_id.as_str(), c.channel.as_str());
        while k < known.len() && known[k].0 < key {
            k += 1;
        }
        let stored = match known.get(k) {
            Some((at, stamp)) if *at == key => *stamp,
            _ => tx.cursor_ts_for_update(&c.meter_id, &c.channel)?,
        };
        if stored.is_none_or(|(ts, ..)| ts <= c.last_ts_ms) {
            tx.upsert_cursor(c)?;
        }
    }
    for &account in &accounts {
        let (mut bal, mut count) = tx.balance(account)?;
        if let Some((d, n)) = delta.get(account) {
            bal = bal.checked_add(*d).ok_or_else(|| {
                LedgerError::Range(format!("account {account}: balance overflows"))
            })?;
            count += *n;
            tx.set_balance(account, bal, *n)?;
        }
        let flags = tx.flags(account)?;
        let out = hook.after(account, bal, count, &flags, now_ms);
        for f in &out.clear_flags {
            tx.clear_flag(account, f)?;
        }
        for f in &out.set_flags {
            tx.set_flag(account, f, now_ms)?;
        }
        for m in out.outbox {
            if tx.insert_outbox(&m)? {
                report.outbox.push(m);
            }
        }
    }
    Ok(report)
}
