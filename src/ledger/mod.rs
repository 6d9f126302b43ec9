//! The prepayment ledger: append-only entries per account, balance = sum of
//! entries (cached per account, checkable against the sum), idempotency keys.
//!
//! One interface ([`Ledger`]), two backends: SQLite (embedded default, one
//! file, WAL) and PostgreSQL (several processes sharing one ledger).
//! A [`Batch`] commits in one transaction: entries, meter cursors (so a
//! deduction and the reading position it consumed move together) and the
//! outbox messages a [`CommitHook`] derives from the new balances (alerts,
//! relay orders). A crash before commit leaves nothing; after commit, all.
//!
//! Signs: credits (top-up, refund to the account, positive adjustment) are
//! positive amounts, debits (deduction, fee) negative.

mod ahead;
pub mod export;
mod logic;
pub mod postgres;
pub mod sqlite;

use std::collections::BTreeSet;
use std::fmt;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

pub use logic::commit_batch;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("database: {0}")]
    Db(String),
    #[error("idempotency key '{key}' already used with different content (stored: {stored}; new: {new})")]
    Conflict {
        key: String,
        stored: String,
        new: String,
    },
    #[error("bad ledger url '{0}': use a file path, sqlite:PATH or postgres://user@host:port/db[?schema=NAME]")]
    BadUrl(String),
    #[error("corrupt ledger row: {0}")]
    Corrupt(String),
    #[error("amount out of range: {0}")]
    Range(String),
}

impl From<rusqlite::Error> for LedgerError {
    fn from(e: rusqlite::Error) -> Self {
        LedgerError::Db(e.to_string())
    }
}

impl From<::postgres::Error> for LedgerError {
    fn from(e: ::postgres::Error) -> Self {
        LedgerError::Db(e.to_string())
    }
}

/// What an entry is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    TopUp,
    Deduction,
    Adjustment,
    Refund,
    Fee,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::TopUp => "top_up",
            EntryKind::Deduction => "deduction",
            EntryKind::Adjustment => "adjustment",
            EntryKind::Refund => "refund",
            EntryKind::Fee => "fee",
        }
    }
    pub fn parse(s: &str) -> Option<EntryKind> {
        Some(match s {
            "top_up" => EntryKind::TopUp,
            "deduction" => EntryKind::Deduction,
            "adjustment" => EntryKind::Adjustment,
            "refund" => EntryKind::Refund,
            "fee" => EntryKind::Fee,
            _ => return None,
        })
    }
}

impl fmt::Display for EntryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An entry to append. Two entries with the same `key` are the same entry
/// when `account_id`, `kind`, `amount`, `ts_ms` and `source` agree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewEntry {
    pub key: String,
    pub account_id: String,
    pub kind: EntryKind,
    /// Yuan, signed (credits positive).
    pub amount: Decimal,
    /// When the money moved (payment time, interval end), UTC ms.
    pub ts_ms: i64,
    /// Where it came from: `wechat`, `prepay-run`, `stream`, a file name.
    pub source: String,
    /// Free text / JSON detail (kWh, tariff version); not part of identity.
    pub detail: String,
}

impl NewEntry {
    /// The identity compared on a duplicate key.
    pub fn identity(&self) -> String {
        format!(
            "{} {} {} {} {}",
            self.account_id,
            self.kind,
            self.amount.normalize(),
            self.ts_ms,
            self.source
        )
    }
}

/// A stored entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// Commit order (unique, increasing per backend).
    pub seq: i64,
    pub entry: NewEntry,
    pub recorded_ms: i64,
}

/// Position of a meter register consumed by deductions (see `prepay::deduct`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub meter_id: String,
    pub channel: String,
    /// Start of the accumulation window (bill month or tier year), UTC ms.
    pub window_start_ms: i64,
    /// kWh consumed in the window so far (after CT x PT).
    pub position: Decimal,
    /// Timestamp and raw register value of the last reading consumed.
    pub last_ts_ms: i64,
    pub last_value: Decimal,
    /// The earliest reading consumed in this window (position 0), so a
    /// reading that arrives late but is older can still be charged in front.
    pub first_ts_ms: i64,
    pub first_value: Decimal,
    /// A suspicious jump `(ts, raw value)` after `last_ts_ms`, not yet charged:
    /// the next reading confirms it (charged then) or shows it was a transient
    /// spike (dropped), so a spike never becomes the base.
    #[serde(default)]
    pub held: Option<(i64, Decimal)>,
    /// Tariff-register state for time-of-use prices (None for flat and tiered).
    #[serde(default)]
    pub tou: Option<TouCursor>,
}

/// The tariff registers T1..T4 of a cursor on a time-of-use tariff: each
/// step charges `f(total, periods after) - f(total, periods before)`, so the
/// window's deductions add up to the bill priced from the same registers.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TouCursor {
    /// Raw T1..T4 values at `last_ts_ms`.
    pub last: [Decimal; 4],
    /// Raw T1..T4 values at `first_ts_ms`.
    pub first: [Decimal; 4],
    /// kWh per TOU period (the version's period index) since the window start.
    pub periods: Vec<Decimal>,
    /// T1..T4 of the held jump (with `Cursor::held`).
    #[serde(default)]
    pub held: Option<[Decimal; 4]>,
    /// Interval cursors (`import_active_interval`): the 15-minute slots of
    /// the window already charged, as sorted disjoint ranges `[from, to)`
    /// of slot numbers since `window_start_ms`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub intervals: Vec<(u32, u32)>,
}

impl TouCursor {
    /// JSON for the ledger's `tou` column.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("serializes")
    }
    pub fn from_json(s: &str) -> Result<TouCursor, LedgerError> {
        serde_json::from_str(s).map_err(|e| LedgerError::Corrupt(format!("cursor tou '{s}': {e}")))
    }
}

/// A message to deliver after commit (alert, relay order), written in the same
/// transaction as the entries that caused it. `id` is stable: delivering twice
/// sends the same id, so consumers can de-duplicate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxMsg {
    pub id: String,
    /// `alert` or `relay`.
    pub kind: String,
    pub account_id: String,
    pub created_ms: i64,
    /// JSON payload.
    pub payload: String,
}

/// What the hook decides for one account after the batch's entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HookOut {
    pub set_flags: Vec<String>,
    pub clear_flags: Vec<String>,
    pub outbox: Vec<OutboxMsg>,
}

/// Called inside the transaction for every account the batch touched (or
/// every account listed in `Batch::evaluate`), with its new balance, its
/// entry count (a deterministic clock for stable ids) and the flags stored
/// for it (alert levels crossed, relay tripped, ...).
pub trait CommitHook {
    fn after(
        &self,
        account_id: &str,
        balance: Decimal,
        entries: i64,
        flags: &BTreeSet<String>,
        now_ms: i64,
    ) -> HookOut;
}

/// A hook that does nothing.
pub struct NoHook;

impl CommitHook for NoHook {
    fn after(&self, _: &str, _: Decimal, _: i64, _: &BTreeSet<String>, _: i64) -> HookOut {
        HookOut::default()
    }
}

/// What a cursor precondition compares: `(last_ts_ms, first_ts_ms, held ts,
/// position)`. The held jump is part of it, so a process that did not see
/// another's hold (two `stream`s splitting one meter's readings) recomputes
/// instead of overwriting it; so is the position, which a late interval
/// changes without moving either time.
pub type CursorStamp = (i64, i64, Option<i64>, Decimal);

impl Cursor {
    pub fn stamp(&self) -> CursorStamp {
        (
            self.last_ts_ms,
            self.first_ts_ms,
            self.held.map(|h| h.0),
            self.position,
        )
    }
}

/// A cursor precondition: meter, channel, expected stamp (None = no cursor).
pub type Expect = (String, String, Option<CursorStamp>);

/// One transaction's worth of changes.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub entries: Vec<NewEntry>,
    /// Cursor updates; applied only if the stored cursor is not newer
    /// (`last_ts_ms` greater), which keeps overlapping runs from going back.
    pub cursors: Vec<Cursor>,
    /// Extra accounts to run the hook for (e.g. a re-evaluation after start).
    pub evaluate: Vec<String>,
    /// Cursor preconditions: the batch is applied only if each listed cursor
    /// still has this stamp (None = must not exist).
    /// Otherwise the commit returns `stale = true` and changes nothing.
    pub expect: Vec<Expect>,
    /// Entry-count preconditions: each account (one of the batch's entries'
    /// accounts, so its balance row is locked) still holds exactly this
    /// many entries; otherwise `stale`. An opening balance is written only
    /// if no payment arrived since it was checked.
    pub entry_counts: Vec<(String, i64)>,
    /// Keys that must not be stored yet; otherwise `stale`. The check is
    /// serialized with a writer storing such a key only when both lock a
    /// common balance row: e.g. `open:ACCOUNT` with an entry of ACCOUNT in
    /// the batch (payments against openings).
    pub absent_keys: Vec<String>,
}

/// The outcome of one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Inserted,
    /// Same key, same content: ignored.
    Duplicate,
    /// Same key, different content: rejected (not written); the rest of the batch is.
    Conflict {
        stored: String,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitReport {
    pub outcomes: Vec<Outcome>,
    /// A cursor precondition failed (another writer got there first); nothing was written.
    pub stale: bool,
    pub outbox: Vec<OutboxMsg>,
}

impl CommitReport {
    pub fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.outcomes.iter().filter(|o| f(o)).count()
    }
}

/// Cached balance against the sum of entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BalanceCheck {
    pub account_id: String,
    pub cached: Decimal,
    pub sum: Decimal,
    pub entries: i64,
}

impl BalanceCheck {
    pub fn ok(&self) -> bool {
        self.cached == self.sum
    }
}

/// The ledger interface both backends implement.
pub trait Ledger: Send {
    /// Creates or upgrades the tables (idempotent).
    fn migrate(&mut self) -> Result<(), LedgerError>;
    /// Applies a batch in one transaction.
    fn commit(&mut self, batch: &Batch, hook: &dyn CommitHook)
        -> Result<CommitReport, LedgerError>;
    /// Cached balance (zero for an unknown account).
    fn balance(&mut self, account_id: &str) -> Result<Decimal, LedgerError>;
    /// Every account's cached balance, by account id.
    fn balances(&mut self) -> Result<Vec<(String, Decimal)>, LedgerError>;
    /// Cached balances against the sum of entries, every account.
    fn check(&mut self) -> Result<Vec<BalanceCheck>, LedgerError>;
    /// Entries of one account (all accounts when `None`) with `seq > after`, in seq order.
    fn entries(
        &mut self,
        account_id: Option<&str>,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<Entry>, LedgerError>;
    /// The stored entries with these keys (those that exist), in seq
    /// order: one lookup of the key index each. This default pages through
    /// all entries.
    fn entries_by_keys(&mut self, keys: &[String]) -> Result<Vec<Entry>, LedgerError> {
        let want: std::collections::HashSet<&str> = keys.iter().map(String::as_str).collect();
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let page = self.entries(None, after, 10_000)?;
            let Some(last) = page.last() else {
                return Ok(out);
            };
            after = last.seq;
            out.extend(
                page.into_iter()
                    .filter(|e| want.contains(e.entry.key.as_str())),
            );
        }
    }
    fn cursor(&mut self, meter_id: &str, channel: &str) -> Result<Option<Cursor>, LedgerError>;
    fn cursors(&mut self) -> Result<Vec<Cursor>, LedgerError>;
    fn flags(&mut self, account_id: &str) -> Result<BTreeSet<String>, LedgerError>;
    /// Outbox messages not yet marked delivered, oldest first.
    fn pending_outbox(&mut self, limit: usize) -> Result<Vec<OutboxMsg>, LedgerError>;
    /// Pending messages of one kind (`alert`, `relay`), oldest first: relay
    /// orders may stay pending (dry run, protected window) without holding up alerts.
    fn pending_outbox_of(
        &mut self,
        kind: &str,
        limit: usize,
    ) -> Result<Vec<OutboxMsg>, LedgerError>;
    /// Marks outbox messages delivered, each named by its account and id.
    fn mark_delivered(&mut self, delivered: &[(&str, &str)]) -> Result<(), LedgerError>;
    /// Every outbox message ever written (delivered or not), oldest first.
    fn outbox_all(&mut self) -> Result<Vec<OutboxMsg>, LedgerError>;
    /// Backend name for logs (`sqlite:PATH`, `postgres:HOST/schema`).
    fn describe(&self) -> String;
    /// Tunes the connection for a large batch (`prepay run`). A commit made
    /// in batch mode survives a crash of the process but may roll back on a
    /// power loss or an operating-system crash; the rollback leaves a prefix
    /// of whole commits, which a re-run redoes (every entry has its
    /// idempotency key). [`Ledger::finish_batch`] makes them durable.
    fn prepare_for_batch(&mut self) -> Result<(), LedgerError> {
        Ok(())
    }
    /// Makes every commit of the batch durable and leaves batch mode. Call it
    /// before anything leaves the process (alerts, relay commands, the run's
    /// report).
    fn finish_batch(&mut self) -> Result<(), LedgerError> {
        Ok(())
    }
}

/// Opens a ledger by URL: a path or `sqlite:PATH` (SQLite), or
/// `postgres://user@host:port/db[?schema=NAME]` (PostgreSQL; the schema is
/// created on migrate, `public` by default). Does not migrate.
pub fn open(url: &str) -> Result<Box<dyn Ledger>, LedgerError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Box::new(postgres::PgLedger::connect(url)?))
    } else {
        let path = url.strip_prefix("sqlite:").unwrap_or(url);
        if path.is_empty() {
            return Err(LedgerError::BadUrl(url.into()));
        }
        Ok(Box::new(sqlite::SqliteLedger::open(std::path::Path::new(
            path,
        ))?))
    }
}

/// Opens and migrates.
pub fn open_migrated(url: &str) -> Result<Box<dyn Ledger>, LedgerError> {
    let mut l = open(url)?;
    l.migrate()?;
    Ok(l)
}

/// The stored text of an amount: `d.normalize().to_string()`, written
/// without the formatting machinery (a batch commit renders five amounts
/// per account).
pub(crate) fn amount_text(d: Decimal) -> String {
    let d = d.normalize();
    let scale = d.scale() as usize;
    let m = d.mantissa();
    let Ok(mut u) = u64::try_from(m.unsigned_abs()) else {
        return d.to_string(); // beyond 19 digits: rare
    };
    if u == 0 {
        return d.to_string();
    }
    // Digits from the right: `scale` of them after the point, then at
    // least one before it. At most 29 digits (scale <= 28), a point and a
    // sign.
    let mut buf = [0u8; 32];
    let mut at = buf.len();
    let mut push = |b: u8| {
        at -= 1;
        buf[at] = b;
    };
    let mut k = 0;
    loop {
        if k == scale && scale > 0 {
            push(b'.');
        }
        push(b'0' + (u % 10) as u8);
        u /= 10;
        k += 1;
        if u == 0 && k > scale {
            break;
        }
    }
    if m < 0 {
        push(b'-');
    }
    String::from_utf8_lossy(&buf[at..]).into_owned()
}

pub(crate) fn parse_amount(s: &str) -> Result<Decimal, LedgerError> {
    s.trim()
        .parse::<Decimal>()
        .map_err(|_| LedgerError::Corrupt(format!("amount '{s}' is not a decimal")))
}

#[cfg(test)]
mod amount_text_tests {
    use super::amount_text;
    use proptest::prelude::*;
    use rust_decimal::Decimal;

    #[test]
    fn amounts_are_written_as_normalized_decimals() {
        for (m, scale, text) in [
            (337, 2, "3.37"),
            (-337, 2, "-3.37"),
            (5, 2, "0.05"),
            (-5, 4, "-0.0005"),
            (1000, 2, "10"),
            (0, 3, "0"),
            (12, 0, "12"),
        ] {
            assert_eq!(amount_text(Decimal::new(m, scale)), text);
        }
        let big = Decimal::from_i128_with_scale(123_456_789_012_345_678_901_234, 4);
        assert_eq!(amount_text(big), big.normalize().to_string());
    }

    proptest! {
        #[test]
        fn amount_text_equals_normalize_then_display(m in any::<i64>(), scale in 0u32..=28) {
            let d = Decimal::new(m, scale);
            prop_assert_eq!(amount_text(d), d.normalize().to_string());
        }
    }
}
