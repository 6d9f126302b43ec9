//! SQLite backend: one file, WAL, `BEGIN IMMEDIATE` transactions (one writer
//! at a time; other processes wait on the busy timeout). Amounts are stored
//! as decimal TEXT, never REAL.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use rust_decimal::Decimal;

use super::ahead::Ahead;
use super::logic::{commit_batch, Tx};
use super::{
    amount_text, parse_amount, BalanceCheck, Batch, CommitHook, CommitReport, Cursor, CursorStamp,
    Entry, EntryKind, Ledger, LedgerError, NewEntry, OutboxMsg, TouCursor,
};
use crate::model::now_ms;

/// Schema versions, applied in order by `migrate`.
const MIGRATIONS: &[&str] = &[
    // 1: entries, cached balances, cursors, flags, outbox.
    "CREATE TABLE entries (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        key TEXT NOT NULL UNIQUE,
        account_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        amount TEXT NOT NULL,
        ts_ms INTEGER NOT NULL,
        source TEXT NOT NULL,
        detail TEXT NOT NULL,
        recorded_ms INTEGER NOT NULL
     );
     CREATE INDEX entries_account ON entries(account_id, seq);
     CREATE TABLE balances (
        account_id TEXT PRIMARY KEY,
        balance TEXT NOT NULL,
        entries INTEGER NOT NULL
     );
     CREATE TABLE cursors (
        meter_id TEXT NOT NULL,
        channel TEXT NOT NULL,
        window_start_ms INTEGER NOT NULL,
        position TEXT NOT NULL,
        last_ts_ms INTEGER NOT NULL,
        last_value TEXT NOT NULL,
        first_ts_ms INTEGER NOT NULL,
        first_value TEXT NOT NULL,
        PRIMARY KEY (meter_id, channel)
     );
     CREATE TABLE flags (
        account_id TEXT NOT NULL,
        flag TEXT NOT NULL,
        set_ms INTEGER NOT NULL,
        PRIMARY KEY (account_id, flag)
     );
     CREATE TABLE outbox (
        n INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        account_id TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        payload TEXT NOT NULL,
        delivered_ms INTEGER
     );",
    // 2: a held (unconfirmed) jump per cursor, see `prepay::deduct`.
    "ALTER TABLE cursors ADD COLUMN held_ts_ms INTEGER;
     ALTER TABLE cursors ADD COLUMN held_value TEXT;",
    // 3: tariff-register state of time-of-use cursors (JSON), see `ledger::TouCursor`.
    "ALTER TABLE cursors ADD COLUMN tou TEXT;",
    // 4: pending outbox messages by a partial index: delivery must not walk
    // every delivered message first (quadratic on a large fleet).
    "CREATE INDEX outbox_pending ON outbox(n) WHERE delivered_ms IS NULL;
     CREATE INDEX outbox_pending_kind ON outbox(kind, n) WHERE delivered_ms IS NULL;",
    // 5: balances, cursors and flags keyed by their primary key alone
    // (WITHOUT ROWID): one B-tree search per lookup instead of two (the
    // key's index, then the row), several times per account in every commit.
    "CREATE TABLE balances5 (
        account_id TEXT PRIMARY KEY,
        balance TEXT NOT NULL,
        entries INTEGER NOT NULL
     ) WITHOUT ROWID;
     INSERT INTO balances5 SELECT account_id, balance, entries FROM balances;
     DROP TABLE balances;
     ALTER TABLE balances5 RENAME TO balances;
     CREATE TABLE cursors5 (
        meter_id TEXT NOT NULL,
        channel TEXT NOT NULL,
        window_start_ms INTEGER NOT NULL,
        position TEXT NOT NULL,
        last_ts_ms INTEGER NOT NULL,
        last_value TEXT NOT NULL,
        first_ts_ms INTEGER NOT NULL,
        first_value TEXT NOT NULL,
        held_ts_ms INTEGER,
        held_value TEXT,
        tou TEXT,
        PRIMARY KEY (meter_id, channel)
     ) WITHOUT ROWID;
     INSERT INTO cursors5 SELECT meter_id, channel, window_start_ms, position, last_ts_ms,
        last_value, first_ts_ms, first_value, held_ts_ms, held_value, tou FROM cursors;
     DROP TABLE cursors;
     ALTER TABLE cursors5 RENAME TO cursors;
     CREATE TABLE flags5 (
        account_id TEXT NOT NULL,
        flag TEXT NOT NULL,
        set_ms INTEGER NOT NULL,
        PRIMARY KEY (account_id, flag)
     ) WITHOUT ROWID;
     INSERT INTO flags5 SELECT account_id, flag, set_ms FROM flags;
     DROP TABLE flags;
     ALTER TABLE flags5 RENAME TO flags;",
    // 6: the outbox unique by (account, id), not by id alone. Alert ids are
    // hashes: a unique index on them alone puts every new message on a
    // random page, so a commit that raises alerts for thousands of accounts
    // rewrites most of that index. Keyed by account first, a commit's
    // messages (raised in account order) land side by side. Ids stay
    // unique: each is derived from its account.
    "CREATE TABLE outbox6 (
        n INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL,
        kind TEXT NOT NULL,
        account_id TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        payload TEXT NOT NULL,
        delivered_ms INTEGER,
        UNIQUE (account_id, id)
     );
     INSERT INTO outbox6 SELECT n, id, kind, account_id, created_ms, payload, delivered_ms FROM outbox;
     DROP TABLE outbox;
     ALTER TABLE outbox6 RENAME TO outbox;
     CREATE INDEX outbox_pending ON outbox(n) WHERE delivered_ms IS NULL;
     CREATE INDEX outbox_pending_kind ON outbox(kind, n) WHERE delivered_ms IS NULL;",
    // 7: entries numbered without AUTOINCREMENT, which reads and writes
    // `sqlite_sequence` at every insert. Entries are never deleted, so the
    // next number (the largest + 1) is the same; measured 0.2-0.3 s off the
    // 1 M-account day's 7 s of commits. The rows are copied in order.
    "CREATE TABLE entries7 (
        seq INTEGER PRIMARY KEY,
        key TEXT NOT NULL UNIQUE,
        account_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        amount TEXT NOT NULL,
        ts_ms INTEGER NOT NULL,
        source TEXT NOT NULL,
        detail TEXT NOT NULL,
        recorded_ms INTEGER NOT NULL
     );
     INSERT INTO entries7 SELECT seq, key, account_id, kind, amount, ts_ms, source, detail, recorded_ms
        FROM entries ORDER BY seq;
     DROP TABLE entries;
     ALTER TABLE entries7 RENAME TO entries;
     CREATE INDEX entries_account ON entries(account_id, seq);",
];

/// Page size of a new ledger file; must be set before its first table.
const PAGE_SIZE: i64 = 16_384;

pub struct SqliteLedger {
    path: PathBuf,
    conn: Connection,
    /// Running while in batch mode (see [`Ledger::prepare_for_batch`]).
    checkpointer: Option<Checkpointer>,
}

/// Copies the WAL into the database file on its own thread and connection
/// while a batch commits. Without it, the commit that crosses
/// `wal_autocheckpoint` copies the WAL and waits for two fsyncs (the WAL,
/// then the database) before the next chunk can commit; here that work
/// overlaps the commits.
struct Checkpointer {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<Result<(), LedgerError>>,
}

impl Checkpointer {
    const EVERY: Duration = Duration::from_millis(200);

    fn start(path: &Path) -> Result<Checkpointer, LedgerError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(60))?;
        // FULL: the WAL is synced before its pages are copied into the
        // database, and the database after.
        conn.pragma_update(None, "synchronous", "FULL")?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("ledger-checkpoint".into())
            .spawn(move || loop {
                if stopped.recv_timeout(Self::EVERY)
                    != Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                {
                    return Ok(());
                }
                // PASSIVE: copies what no reader still needs, never waits.
                match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    Ok(()) => {}
                    Err(rusqlite::Error::SqliteFailure(e, _))
                        if e.code == rusqlite::ErrorCode::DatabaseBusy => {}
                    Err(e) => return Err(e.into()),
                }
            })
            .map_err(|e| LedgerError::Db(format!("checkpoint thread: {e}")))?;
        Ok(Checkpointer { stop, thread })
    }

    fn stop(self) -> Result<(), LedgerError> {
        drop(self.stop);
        self.thread
            .join()
            .map_err(|_| LedgerError::Db("checkpoint thread panicked".into()))?
    }
}

impl SqliteLedger {
    pub fn open(path: &Path) -> Result<SqliteLedger, LedgerError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::store::atomic::create_dir_durable(dir)
                .map_err(|e| LedgerError::Db(e.to_string()))?;
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(60))?;
        // A new ledger gets 16 KiB pages (an existing one keeps its own):
        // a batch commit writes a quarter as many WAL frames and splits
        // fewer B-tree pages. Measured on the 1 M-account day: 0.5-1 s off
        // 7.5 s of commits against 4 KiB (8 KiB was in between).
        conn.pragma_update(None, "page_size", PAGE_SIZE)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a committed transaction survives power loss, not only a process crash.
        conn.pragma_update(None, "synchronous", "FULL")?;
        Ok(SqliteLedger {
            path: path.to_path_buf(),
            conn,
            checkpointer: None,
        })
    }
}

/// seq, key, account, kind, amount, ts, source, detail, recorded.
pub(crate) type RawEntry = (
    i64,
    String,
    String,
    String,
    String,
    i64,
    String,
    String,
    i64,
);

fn entry_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawEntry> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
    ))
}

pub(crate) fn build_entry(raw: RawEntry) -> Result<Entry, LedgerError> {
    let (seq, key, account_id, kind, amount, ts_ms, source, detail, recorded_ms) = raw;
    let kind = EntryKind::parse(&kind)
        .ok_or_else(|| LedgerError::Corrupt(format!("entry {seq}: kind '{kind}'")))?;
    Ok(Entry {
        seq,
        entry: NewEntry {
            key,
            account_id,
            kind,
            amount: parse_amount(&amount)?,
            ts_ms,
            source,
            detail,
        },
        recorded_ms,
    })
}

/// The statements of a commit, prepared once per transaction: a batch
/// runs each of them thousands of times, and looking a statement up in the
/// connection's cache (hashing its text) on every call cost more than some
/// of the statements themselves.
#[derive(Clone, Copy)]
enum Stmt {
    CreateBalance,
    Balance,
    SetBalance,
    InsertEntry,
    EntryByKey,
    CursorStamp,
    UpsertCursor,
    Flags,
    SetFlag,
    ClearFlag,
    InsertOutbox,
    BalancesAhead,
    FlagsAhead,
    CursorsAhead,
}

impl Stmt {
    const COUNT: usize = Stmt::CursorsAhead as usize + 1;

    fn sql(self) -> &'static str {
        match self {
            Stmt::CreateBalance => {
                "INSERT OR IGNORE INTO balances(account_id, balance, entries) VALUES (?1, '0', 0)"
            }
            Stmt::Balance => "SELECT balance, entries FROM balances WHERE account_id = ?1",
            Stmt::SetBalance => {
                "UPDATE balances SET balance = ?2, entries = entries + ?3 WHERE account_id = ?1"
            }
            Stmt::InsertEntry => {
                "INSERT INTO entries(key, account_id, kind, amount, ts_ms, source, detail, recorded_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT(key) DO NOTHING"
            }
            Stmt::EntryByKey => {
                "SELECT seq, key, account_id, kind, amount, ts_ms, source, detail, recorded_ms FROM entries WHERE key = ?1"
            }
            Stmt::CursorStamp => {
                "SELECT last_ts_ms, first_ts_ms, held_ts_ms, position FROM cursors WHERE meter_id = ?1 AND channel = ?2"
            }
            Stmt::UpsertCursor => {
                "INSERT INTO cursors(meter_id, channel, window_start_ms, position, last_ts_ms, last_value, first_ts_ms, first_value, held_ts_ms, held_value, tou)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                 ON CONFLICT(meter_id, channel) DO UPDATE SET window_start_ms = excluded.window_start_ms,
                   position = excluded.position, last_ts_ms = excluded.last_ts_ms, last_value = excluded.last_value,
                   first_ts_ms = excluded.first_ts_ms, first_value = excluded.first_value,
                   held_ts_ms = excluded.held_ts_ms, held_value = excluded.held_value, tou = excluded.tou"
            }
            Stmt::Flags => "SELECT flag FROM flags WHERE account_id = ?1",
            Stmt::SetFlag => {
                "INSERT OR IGNORE INTO flags(account_id, flag, set_ms) VALUES (?1, ?2, ?3)"
            }
            Stmt::ClearFlag => "DELETE FROM flags WHERE account_id = ?1 AND flag = ?2",
            Stmt::InsertOutbox => {
                "INSERT OR IGNORE INTO outbox(id, kind, account_id, created_ms, payload) VALUES (?1, ?2, ?3, ?4, ?5)"
            }
            Stmt::BalancesAhead => {
                "SELECT account_id, balance, entries FROM balances
                 WHERE account_id >= ?1 AND account_id <= ?2 ORDER BY account_id"
            }
            Stmt::FlagsAhead => {
                "SELECT account_id, flag FROM flags
                 WHERE account_id >= ?1 AND account_id <= ?2 ORDER BY account_id, flag"
            }
            Stmt::CursorsAhead => {
                "SELECT meter_id, channel, last_ts_ms, first_ts_ms, held_ts_ms, position FROM cursors
                 WHERE meter_id >= ?1 AND meter_id <= ?2 ORDER BY meter_id, channel"
            }
        }
    }
}

/// A cursor's stored position (text) inside a row mapping.
fn position_at(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Decimal> {
    let text = r.get_ref(i)?.as_str()?;
    text.parse::<Decimal>().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    })
}

struct SqlTx<'a> {
    tx: &'a rusqlite::Transaction<'a>,
    stmts: [Option<rusqlite::CachedStatement<'a>>; Stmt::COUNT],
    /// Balance (as stored) and entry count of the commit's accounts.
    balances: Ahead<(String, i64)>,
    flags: Ahead<String>,
    cursors: Ahead<CursorStamp>,
}

impl<'a> SqlTx<'a> {
    fn new(tx: &'a rusqlite::Transaction<'a>) -> SqlTx<'a> {
        SqlTx {
            tx,
            stmts: Default::default(),
            balances: Ahead::default(),
            flags: Ahead::default(),
            cursors: Ahead::default(),
        }
    }

    fn st(&mut self, which: Stmt) -> Result<&mut rusqlite::CachedStatement<'a>, LedgerError> {
        let slot = &mut self.stmts[which as usize];
        if slot.is_none() {
            *slot = Some(self.tx.prepare_cached(which.sql())?);
        }
        Ok(slot.as_mut().expect("prepared above"))
    }
}

impl Tx for SqlTx<'_> {
    fn lock_balances(&mut self, accounts: &[&str]) -> Result<(), LedgerError> {
        // BEGIN IMMEDIATE already holds the write lock. A missing row is
        // created when `balance` reads it (one statement per account, not
        // two). The accounts' balances and flags are read ahead in one pass.
        let keys: Vec<(&str, &str)> = accounts.iter().map(|a| (*a, "")).collect();
        self.balances = Ahead::read(self.st(Stmt::BalancesAhead)?, &keys, |r| {
            Ok(((r.get(0)?, String::new()), (r.get(1)?, r.get(2)?)))
        })?;
        self.flags = Ahead::read(self.st(Stmt::FlagsAhead)?, &keys, |r| {
            Ok(((r.get(0)?, String::new()), r.get(1)?))
        })?;
        Ok(())
    }
    fn balance(&mut self, account: &str) -> Result<(Decimal, i64), LedgerError> {
        let s: Option<(String, i64)> = match self.balances.get((account, "")) {
            Some([(s, n), ..]) => return Ok((parse_amount(s)?, *n)),
            Some([]) => None,
            None => self
                .st(Stmt::Balance)?
                .query_row(params![account], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?,
        };
        match s {
            Some((s, n)) => Ok((parse_amount(&s)?, n)),
            None => {
                self.st(Stmt::CreateBalance)?.execute(params![account])?;
                self.balances.forget((account, ""));
                Ok((Decimal::ZERO, 0))
            }
        }
    }
    fn set_balance(
        &mut self,
        account: &str,
        balance: Decimal,
        added: i64,
    ) -> Result<(), LedgerError> {
        self.st(Stmt::SetBalance)?
            .execute(params![account, amount_text(balance), added])?;
        self.balances.forget((account, ""));
        Ok(())
    }
    fn any_entry_exists(&mut self, keys: &[String]) -> Result<bool, LedgerError> {
        // Keys compare as bytes (BINARY): when no stored key starts with
        // the keys' common prefix (every `open:` key of a payments chunk on
        // a ledger without openings), one seek answers for all of them.
        if let Some(end) = prefix_end(common_prefix(keys)) {
            let none = self
                .tx
                .prepare_cached("SELECT 1 FROM entries WHERE key >= ?1 AND key < ?2 LIMIT 1")?
                .query_row(params![common_prefix(keys), end], |_| Ok(()))
                .optional()?
                .is_none();
            if none {
                return Ok(false);
            }
        }
        for k in keys {
            if self.entry_exists(k)? {
                return Ok(true);
            }
        }
        Ok(false)
    }
    fn entry_exists(&mut self, key: &str) -> Result<bool, LedgerError> {
        Ok(self
            .st(Stmt::EntryByKey)?
            .query_row(params![key], |_| Ok(()))
            .optional()?
            .is_some())
    }
    fn insert_entry(&mut self, e: &NewEntry, now: i64) -> Result<Option<String>, LedgerError> {
        let n = self.st(Stmt::InsertEntry)?.execute(params![
            e.key,
            e.account_id,
            e.kind.as_str(),
            amount_text(e.amount),
            e.ts_ms,
            e.source,
            e.detail,
            now
        ])?;
        if n == 1 {
            return Ok(None);
        }
        let raw = self
            .st(Stmt::EntryByKey)?
            .query_row(params![e.key], entry_from_row)?;
        Ok(Some(build_entry(raw)?.entry.identity()))
    }
    fn cursor_ts_for_update(
        &mut self,
        meter: &str,
        channel: &str,
    ) -> Result<Option<CursorStamp>, LedgerError> {
        if let Some(rows) = self.cursors.get((meter, channel)) {
            return Ok(rows.first().copied());
        }
        Ok(self
            .st(Stmt::CursorStamp)?
            .query_row(params![meter, channel], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, position_at(r, 3)?))
            })
            .optional()?)
    }
    fn upsert_cursor(&mut self, c: &Cursor) -> Result<(), LedgerError> {
        self.st(Stmt::UpsertCursor)?.execute(params![
            c.meter_id,
            c.channel,
            c.window_start_ms,
            amount_text(c.position),
            c.last_ts_ms,
            amount_text(c.last_value),
            c.first_ts_ms,
            amount_text(c.first_value),
            c.held.map(|h| h.0),
            c.held.map(|h| amount_text(h.1)),
            c.tou.as_ref().map(|t| t.to_json())
        ])?;
        self.cursors.forget((&c.meter_id, &c.channel));
        Ok(())
    }
    fn read_cursors_ahead(&mut self, keys: &[(&str, &str)]) -> Result<(), LedgerError> {
        self.cursors = Ahead::read(self.st(Stmt::CursorsAhead)?, keys, |r| {
            Ok((
                (r.get(0)?, r.get(1)?),
                (r.get(2)?, r.get(3)?, r.get(4)?, position_at(r, 5)?),
            ))
        })?;
        Ok(())
    }
    fn flags(&mut self, account: &str) -> Result<BTreeSet<String>, LedgerError> {
        if let Some(rows) = self.flags.get((account, "")) {
            return Ok(rows.iter().cloned().collect());
        }
        let st = self.st(Stmt::Flags)?;
        let rows = st.query_map(params![account], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
    fn set_flag(&mut self, account: &str, flag: &str, now: i64) -> Result<(), LedgerError> {
        self.st(Stmt::SetFlag)?
            .execute(params![account, flag, now])?;
        self.flags.forget((account, ""));
        Ok(())
    }
    fn clear_flag(&mut self, account: &str, flag: &str) -> Result<(), LedgerError> {
        self.st(Stmt::ClearFlag)?.execute(params![account, flag])?;
        self.flags.forget((account, ""));
        Ok(())
    }
    fn insert_outbox(&mut self, m: &OutboxMsg) -> Result<bool, LedgerError> {
        let n = self.st(Stmt::InsertOutbox)?.execute(params![
            m.id,
            m.kind,
            m.account_id,
            m.created_ms,
            m.payload
        ])?;
        Ok(n == 1)
    }
}

fn outbox_rows(conn: &Connection, sql: &str, limit: i64) -> Result<Vec<OutboxMsg>, LedgerError> {
    let mut st = conn.prepare_cached(sql)?;
    let rows = st.query_map(params![limit], |r| {
        Ok(OutboxMsg {
            id: r.get(0)?,
            kind: r.get(1)?,
            account_id: r.get(2)?,
            created_ms: r.get(3)?,
            payload: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

impl Ledger for SqliteLedger {
    fn migrate(&mut self) -> Result<(), LedgerError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
        let v: Option<i64> =
            tx.query_row("SELECT max(version) FROM schema_version", [], |r| r.get(0))?;
        let v = v.unwrap_or(0) as usize;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(v) {
            tx.execute_batch(sql)?;
            tx.execute(
                "INSERT INTO schema_version(version) VALUES (?1)",
                params![(i + 1) as i64],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn commit(
        &mut self,
        batch: &Batch,
        hook: &dyn CommitHook,
    ) -> Result<CommitReport, LedgerError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let report = commit_batch(&mut SqlTx::new(&tx), batch, hook, now_ms())?;
        if report.stale {
            tx.rollback()?;
        } else {
            tx.commit()?;
        }
        Ok(report)
    }

    fn balance(&mut self, account_id: &str) -> Result<Decimal, LedgerError> {
        let s: Option<String> = self
            .conn
            .query_row(
                "SELECT balance FROM balances WHERE account_id = ?1",
                params![account_id],
                |r| r.get(0),
            )
            .optional()?;
        s.map_or(Ok(Decimal::ZERO), |s| parse_amount(&s))
    }

    fn balances(&mut self) -> Result<Vec<(String, Decimal)>, LedgerError> {
        let mut st = self
            .conn
            .prepare("SELECT account_id, balance FROM balances ORDER BY account_id")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for r in rows {
            let (a, b) = r?;
            out.push((a, parse_amount(&b)?));
        }
        Ok(out)
    }

    fn check(&mut self) -> Result<Vec<BalanceCheck>, LedgerError> {
        // Read in one snapshot so a concurrent writer cannot make it look wrong.
        let tx = self.conn.transaction()?;
        let mut sums: std::collections::BTreeMap<String, (Decimal, i64)> = Default::default();
        {
            let mut st = tx.prepare("SELECT account_id, amount FROM entries")?;
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                let s = sums.entry(r.get(0)?).or_default();
                s.0 += parse_amount(&r.get::<_, String>(1)?)?;
                s.1 += 1;
            }
        }
        let mut out = Vec::new();
        {
            let mut st = tx
                .prepare("SELECT account_id, balance, entries FROM balances ORDER BY account_id")?;
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                let a: String = r.get(0)?;
                let (sum, n) = sums.remove(&a).unwrap_or_default();
                let cached = parse_amount(&r.get::<_, String>(1)?)?;
                let cached_n: i64 = r.get(2)?;
                // An entry count mismatch is a mismatch too: report it through `entries`.
                out.push(BalanceCheck {
                    account_id: a,
                    cached,
                    sum,
                    entries: if cached_n == n { n } else { -n },
                });
            }
        }
        for (a, (sum, n)) in sums {
            out.push(BalanceCheck {
                account_id: a,
                cached: Decimal::ZERO,
                sum,
                entries: -n,
            });
        }
        Ok(out)
    }

    fn entries(
        &mut self,
        account_id: Option<&str>,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<Entry>, LedgerError> {
        let sql = "SELECT seq, key, account_id, kind, amount, ts_ms, source, detail, recorded_ms FROM entries
                   WHERE seq > ?1 AND (?2 IS NULL OR account_id = ?2) ORDER BY seq LIMIT ?3";
        let mut st = self.conn.prepare_cached(sql)?;
        let rows = st.query_map(params![after_seq, account_id, limit as i64], entry_from_row)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(build_entry(r?)?);
        }
        Ok(out)
    }

    fn entries_by_keys(&mut self, keys: &[String]) -> Result<Vec<Entry>, LedgerError> {
        let mut st = self.conn.prepare_cached(
            "SELECT seq, key, account_id, kind, amount, ts_ms, source, detail, recorded_ms FROM entries WHERE key = ?1",
        )?;
        let mut keys: Vec<&String> = keys.iter().collect();
        keys.sort_unstable();
        keys.dedup();
        let mut out = Vec::new();
        for k in keys {
            if let Some(raw) = st.query_row(params![k], entry_from_row).optional()? {
                out.push(build_entry(raw)?);
            }
        }
        out.sort_by_key(|e| e.seq);
        Ok(out)
    }

    fn cursor(&mut self, meter_id: &str, channel: &str) -> Result<Option<Cursor>, LedgerError> {
        Ok(self.cursors_where(Some((meter_id, channel)))?.pop())
    }

    fn cursors(&mut self) -> Result<Vec<Cursor>, LedgerError> {
        self.cursors_where(None)
    }

    fn flags(&mut self, account_id: &str) -> Result<BTreeSet<String>, LedgerError> {
        let tx = self.conn.transaction()?;
        let f = SqlTx::new(&tx).flags(account_id)?;
        Ok(f)
    }

    fn pending_outbox(&mut self, limit: usize) -> Result<Vec<OutboxMsg>, LedgerError> {
        outbox_rows(
            &self.conn,
            "SELECT id, kind, account_id, created_ms, payload FROM outbox WHERE delivered_ms IS NULL ORDER BY n LIMIT ?1",
            limit as i64,
        )
    }

    fn pending_outbox_of(
        &mut self,
        kind: &str,
        limit: usize,
    ) -> Result<Vec<OutboxMsg>, LedgerError> {
        let mut st = self.conn.prepare_cached(
            "SELECT id, kind, account_id, created_ms, payload FROM outbox WHERE delivered_ms IS NULL AND kind = ?1 ORDER BY n LIMIT ?2",
        )?;
        let rows = st.query_map(params![kind, limit.min(i64::MAX as usize) as i64], |r| {
            Ok(OutboxMsg {
                id: r.get(0)?,
                kind: r.get(1)?,
                account_id: r.get(2)?,
                created_ms: r.get(3)?,
                payload: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn mark_delivered(&mut self, delivered: &[(&str, &str)]) -> Result<(), LedgerError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut st = tx.prepare_cached(
                "UPDATE outbox SET delivered_ms = ?3 WHERE account_id = ?1 AND id = ?2",
            )?;
            let now = now_ms();
            for (account, id) in delivered {
                st.execute(params![account, id, now])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn outbox_all(&mut self) -> Result<Vec<OutboxMsg>, LedgerError> {
        outbox_rows(
            &self.conn,
            "SELECT id, kind, account_id, created_ms, payload FROM outbox ORDER BY n LIMIT ?1",
            i64::MAX,
        )
    }

    fn describe(&self) -> String {
        format!("sqlite:{}", self.path.display())
    }

    fn prepare_for_batch(&mut self) -> Result<(), LedgerError> {
        // A batch commit touches a few thousand pages (rows go in key
        // order): a 32 MiB cache holds them and the B-trees' inner pages,
        // where SQLite's 2 MB default re-reads and spills. 256 MiB measured
        // slower: the profile showed each commit's end walking the whole
        // cache (SQLite's page-cache truncation). Negative = KiB.
        self.conn.pragma_update(None, "cache_size", -32_768)?;
        // Commits write the WAL without waiting for the disk; the database
        // file gets the WAL's pages on another thread. A power loss can undo
        // the last commits, never part of one: a re-run redoes them, and
        // `finish_batch` syncs before anything leaves the process.
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        self.conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        if self.checkpointer.is_none() {
            self.checkpointer = Some(Checkpointer::start(&self.path)?);
        }
        Ok(())
    }

    fn finish_batch(&mut self) -> Result<(), LedgerError> {
        if let Some(c) = self.checkpointer.take() {
            c.stop()?;
        }
        // Every commit is in the WAL: syncing it makes them all durable,
        // whatever the checkpoint below manages to copy.
        let wal = PathBuf::from(format!("{}-wal", self.path.display()));
        match std::fs::File::open(&wal) {
            Ok(f) => f
                .sync_all()
                .map_err(|e| LedgerError::Db(format!("{}: {e}", wal.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(LedgerError::Db(format!("{}: {e}", wal.display()))),
        }
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        self.conn.pragma_update(None, "wal_autocheckpoint", 1000)?;
        // Copy the rest and empty the WAL, unless readers hold it (then the
        // next checkpoint does).
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }
}

impl Drop for SqliteLedger {
    fn drop(&mut self) {
        if let Some(c) = self.checkpointer.take() {
            if let Err(e) = c.stop() {
                tracing::warn!("ledger checkpoint: {e}");
            }
        }
    }
}

impl SqliteLedger {
    fn cursors_where(&mut self, key: Option<(&str, &str)>) -> Result<Vec<Cursor>, LedgerError> {
        let (m, c) = key.unzip();
        let mut st = self.conn.prepare_cached(
            "SELECT meter_id, channel, window_start_ms, position, last_ts_ms, last_value, first_ts_ms, first_value, held_ts_ms, held_value, tou FROM cursors
             WHERE (?1 IS NULL OR (meter_id = ?1 AND channel = ?2)) ORDER BY meter_id, channel",
        )?;
        let rows = st.query_map(params![m, c], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, String>(7)?,
                r.get::<_, Option<i64>>(8)?,
                r.get::<_, Option<String>>(9)?,
                r.get::<_, Option<String>>(10)?,
            ))
        })?;
        let mut out = Vec::new();
        for r in rows {
            let (
                meter_id,
                channel,
                window_start_ms,
                pos,
                last_ts_ms,
                last,
                first_ts_ms,
                first,
                hts,
                hv,
                tou,
            ) = r?;
            let held = match (hts, hv) {
                (Some(t), Some(v)) => Some((t, parse_amount(&v)?)),
                _ => None,
            };
            out.push(Cursor {
                meter_id,
                channel,
                window_start_ms,
                position: parse_amount(&pos)?,
                last_ts_ms,
                last_value: parse_amount(&last)?,
                first_ts_ms,
                first_value: parse_amount(&first)?,
                held,
                tou: tou.as_deref().map(TouCursor::from_json).transpose()?,
            });
        }
        Ok(out)
    }
}

/// The longest prefix every key shares ("" for none or one key).
fn common_prefix(keys: &[String]) -> &str {
    let (Some(first), true) = (keys.first(), keys.len() > 1) else {
        return "";
    };
    let mut n = first.len();
    for k in &keys[1..] {
        n = first
            .bytes()
            .zip(k.bytes())
            .take(n)
            .take_while(|(a, b)| a == b)
            .count();
    }
    // On a character boundary.
    while !first.is_char_boundary(n) {
        n -= 1;
    }
    &first[..n]
}

/// The first string after every string that starts with `prefix`: its last
/// byte + 1 (None when empty or that byte is not below 0x7f).
fn prefix_end(prefix: &str) -> Option<String> {
    let (&last, head) = prefix.as_bytes().split_last()?;
    if last >= 0x7f {
        return None;
    }
    let mut end = head.to_vec();
    end.push(last + 1);
    String::from_utf8(end).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deduction entry for commit tests.
    fn deduction(key: String, account: String, amount: Decimal, ts_ms: i64) -> NewEntry {
        NewEntry {
            key,
            account_id: account,
            kind: EntryKind::Deduction,
            amount,
            ts_ms,
            source: "test".into(),
            detail: String::new(),
        }
    }

    #[test]
    fn keys_share_a_prefix_that_bounds_a_range_of_the_key_index() {
        let k = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            common_prefix(&k(&["open:A1", "open:A2", "open:B"])),
            "open:"
        );
        assert_eq!(common_prefix(&k(&["open:A1", "open:A12"])), "open:A1");
        assert_eq!(common_prefix(&k(&["open:A1"])), "");
        assert_eq!(common_prefix(&k(&["x", "y"])), "");
        assert_eq!(common_prefix(&k(&["电表1", "电表2"])), "电表");
        assert_eq!(common_prefix(&k(&["电a", "电b", "甲"])), "");
        assert_eq!(prefix_end("open:").as_deref(), Some("open;"));
        assert_eq!(prefix_end(""), None);
        assert_eq!(prefix_end("a\u{7f}"), None);
    }

    #[test]
    fn a_batch_of_absent_keys_is_checked_by_one_seek_or_key_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = SqliteLedger::open(&dir.path().join("l.sqlite")).unwrap();
        l.migrate().unwrap();
        let put = |l: &mut SqliteLedger, key: &str| {
            let b = Batch {
                entries: vec![deduction(key.into(), "A".into(), Decimal::ONE, 1)],
                ..Default::default()
            };
            assert!(!l.commit(&b, &crate::ledger::NoHook).unwrap().stale);
        };
        let stale = |l: &mut SqliteLedger, keys: &[&str]| {
            let b = Batch {
                entries: vec![deduction("pay:x".into(), "A".into(), Decimal::ONE, 1)],
                absent_keys: keys.iter().map(|k| k.to_string()).collect(),
                ..Default::default()
            };
            l.commit(&b, &crate::ledger::NoHook).unwrap().stale
        };
        put(&mut l, "open:B");
        // No stored key starts with "open:A": one seek says none exists.
        assert!(!stale(&mut l, &["open:A1", "open:A3"]));
        // Some key has the prefix "open:", but not these: key by key.
        assert!(!stale(&mut l, &["open:A1", "open:C"]));
        assert!(stale(&mut l, &["open:A1", "open:B"]));
        assert!(stale(&mut l, &["open:B"]));
    }

    /// How many schema objects match `condition` (SQL over `sqlite_schema`).
    fn tables_where(l: &SqliteLedger, condition: &str) -> i64 {
        l.conn
            .query_row(
                &format!("SELECT count(*) FROM sqlite_schema WHERE {condition}"),
                [],
                |r| r.get(0),
            )
            .unwrap()
    }

    /// A ledger file at schema version `v` (the migrations before it applied).
    fn at_version(path: &Path, v: usize) -> Connection {
        let conn = Connection::open(path).unwrap();
        conn.execute_batch("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            .unwrap();
        for (i, sql) in MIGRATIONS.iter().take(v).enumerate() {
            conn.execute_batch(sql).unwrap();
            conn.execute(
                "INSERT INTO schema_version VALUES (?1)",
                params![i as i64 + 1],
            )
            .unwrap();
        }
        conn
    }

    #[test]
    fn migrating_to_keyed_tables_keeps_balances_cursors_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite");
        let conn = at_version(&path, 4);
        conn.execute_batch(
            "INSERT INTO balances VALUES ('A1', '12.5', 3);
             INSERT INTO cursors VALUES ('M1', 'import_active_total', 1000, '7.25', 5000, '107.25', 2000, '100', 6000, '150', NULL);
             INSERT INTO flags VALUES ('A1', 'alert:below_level:50', 42);",
        )
        .unwrap();
        drop(conn);
        let mut l = SqliteLedger::open(&path).unwrap();
        l.migrate().unwrap();
        assert_eq!(l.balance("A1").unwrap(), Decimal::new(125, 1));
        let c = l.cursor("M1", "import_active_total").unwrap().unwrap();
        assert_eq!(
            (c.window_start_ms, c.position, c.last_ts_ms, c.first_value),
            (1000, Decimal::new(725, 2), 5000, Decimal::new(100, 0))
        );
        assert_eq!(c.held, Some((6000, Decimal::new(150, 0))));
        assert_eq!(
            l.flags("A1").unwrap().into_iter().collect::<Vec<_>>(),
            vec!["alert:below_level:50".to_string()]
        );
        let without_rowid = tables_where(
            &l,
            "name IN ('balances', 'cursors', 'flags') AND sql LIKE '%WITHOUT ROWID%'",
        );
        assert_eq!(without_rowid, 3);
        // Migrating again changes nothing.
        l.migrate().unwrap();
        assert_eq!(l.balance("A1").unwrap(), Decimal::new(125, 1));
    }

    #[test]
    fn the_outbox_keyed_by_account_keeps_its_messages_order_and_dedup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite");
        let conn = at_version(&path, 5);
        conn.execute_batch(
            "INSERT INTO outbox(n, id, kind, account_id, created_ms, payload, delivered_ms)
             VALUES (7, 'x1', 'alert', 'A1', 1, '{}', 2), (9, 'x2', 'alert', 'A2', 1, '{}', NULL);",
        )
        .unwrap();
        drop(conn);
        let mut l = SqliteLedger::open(&path).unwrap();
        l.migrate().unwrap();
        let ids = |msgs: Vec<OutboxMsg>| msgs.into_iter().map(|m| m.id).collect::<Vec<_>>();
        assert_eq!(ids(l.pending_outbox(10).unwrap()), ["x2"]);
        let msg = |id: &str, account: &str| OutboxMsg {
            id: id.into(),
            kind: "alert".into(),
            account_id: account.into(),
            created_ms: 3,
            payload: "{}".into(),
        };
        let tx = l.conn.transaction().unwrap();
        let mut t = SqlTx::new(&tx);
        assert!(t.insert_outbox(&msg("x3", "A3")).unwrap());
        assert!(
            !t.insert_outbox(&msg("x2", "A2")).unwrap(),
            "a replay is ignored"
        );
        drop(t);
        tx.commit().unwrap();
        let n: i64 = l
            .conn
            .query_row("SELECT n FROM outbox WHERE id = 'x3'", [], |r| r.get(0))
            .unwrap();
        assert!(n > 9, "numbering goes on after the copied messages: {n}");
        assert_eq!(ids(l.pending_outbox(10).unwrap()), ["x2", "x3"]);
        l.mark_delivered(&[("A2", "x2")]).unwrap();
        assert_eq!(ids(l.pending_outbox(10).unwrap()), ["x3"]);
        assert_eq!(ids(l.outbox_all().unwrap()), ["x1", "x2", "x3"]);
    }

    #[test]
    fn a_balance_that_would_overflow_is_an_error_and_commits_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = SqliteLedger::open(&dir.path().join("ledger.sqlite")).unwrap();
        l.migrate().unwrap();
        let big = |k: &str| deduction(k.into(), "A1".into(), Decimal::MAX, 1);
        let batch = Batch {
            entries: vec![big("k1"), big("k2")],
            ..Default::default()
        };
        let err = l.commit(&batch, &crate::ledger::NoHook).unwrap_err();
        assert!(matches!(err, LedgerError::Range(_)), "{err}");
        assert_eq!(l.balance("A1").unwrap(), Decimal::ZERO);
        // One such entry fits; the next one is refused the same way.
        let one = Batch {
            entries: vec![big("k1")],
            ..Default::default()
        };
        l.commit(&one, &crate::ledger::NoHook).unwrap();
        let next = Batch {
            entries: vec![big("k2")],
            ..Default::default()
        };
        let err = l.commit(&next, &crate::ledger::NoHook).unwrap_err();
        assert!(matches!(err, LedgerError::Range(_)), "{err}");
        assert_eq!(l.balance("A1").unwrap(), Decimal::MAX);
    }

    #[test]
    fn a_batch_reports_each_entry_as_inserted_duplicate_or_conflict() {
        use crate::ledger::Outcome;
        use rust_decimal_macros::dec;
        let dir = tempfile::tempdir().unwrap();
        let mut l = SqliteLedger::open(&dir.path().join("ledger.sqlite")).unwrap();
        l.migrate().unwrap();
        let entry = |k: usize, amount: Decimal| {
            deduction(format!("k{k:04}"), format!("A{}", k % 7), amount, k as i64)
        };
        let first = Batch {
            entries: (0..10).map(|k| entry(k, dec!(-1))).collect(),
            ..Default::default()
        };
        l.commit(&first, &crate::ledger::NoHook).unwrap();
        // k0003 is stored already, k0005 stored with another amount, k0200
        // comes twice in one batch.
        let mut entries: Vec<NewEntry> = (3..300).map(|k| entry(k, dec!(-1))).collect();
        entries[2] = entry(5, dec!(-2));
        entries.insert(150, entry(200, dec!(-1)));
        let report = l
            .commit(
                &Batch {
                    entries: entries.clone(),
                    ..Default::default()
                },
                &crate::ledger::NoHook,
            )
            .unwrap();
        assert_eq!(report.outcomes.len(), entries.len());
        for (e, o) in entries.iter().zip(&report.outcomes) {
            let k: usize = e.key[1..].parse().unwrap();
            let want = match k {
                5 => "conflict",
                _ if k < 10 => "duplicate",
                _ => "inserted",
            };
            let got = match o {
                Outcome::Inserted => "inserted",
                Outcome::Duplicate => "duplicate",
                Outcome::Conflict { .. } => "conflict",
            };
            if k == 200 && got == "duplicate" {
                continue; // the second k0200
            }
            assert_eq!(got, want, "{}", e.key);
        }
        let dups_of_200 = entries
            .iter()
            .zip(&report.outcomes)
            .filter(|(e, o)| e.key == "k0200" && **o == Outcome::Duplicate)
            .count();
        assert_eq!(
            dups_of_200, 1,
            "the second k0200 is the first one's duplicate"
        );
        // Balances add up to the stored entries: k0000..k0299 once each at -1.
        let total: Decimal = l.balances().unwrap().into_iter().map(|(_, b)| b).sum();
        assert_eq!(total, dec!(-300));
        assert!(l.check().unwrap().iter().all(BalanceCheck::ok));
    }

    #[test]
    fn a_large_batch_checks_cursors_and_sees_flags_read_ahead() {
        use crate::ledger::{CommitHook, Cursor, HookOut};
        use rust_decimal_macros::dec;
        use std::cell::RefCell;
        // Sets a flag on every account and records the flags it was shown.
        struct Flagger(RefCell<Vec<usize>>);
        impl CommitHook for Flagger {
            fn after(&self, _: &str, _: Decimal, _: i64, f: &BTreeSet<String>, _: i64) -> HookOut {
                self.0.borrow_mut().push(f.len());
                HookOut {
                    set_flags: vec!["seen".into()],
                    ..Default::default()
                }
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let mut l = SqliteLedger::open(&dir.path().join("ledger.sqlite")).unwrap();
        l.migrate().unwrap();
        let cursor = |k: usize, ts: i64| Cursor {
            meter_id: format!("M{k:03}"),
            channel: "import_active_total".into(),
            window_start_ms: 0,
            position: dec!(1.5),
            last_ts_ms: ts,
            last_value: dec!(10),
            first_ts_ms: 0,
            first_value: dec!(8.5),
            held: None,
            tou: None,
        };
        // 40 meters (past the read-ahead's minimum), one account each.
        let batch = |ts: i64, expect: &dyn Fn(usize) -> Option<CursorStamp>| Batch {
            entries: (0..40)
                .map(|k| deduction(format!("d{ts}:{k}"), format!("A{k:03}"), dec!(-1), ts))
                .collect(),
            cursors: (0..40).map(|k| cursor(k, ts)).collect(),
            expect: (0..40)
                .map(|k| {
                    (
                        format!("M{k:03}"),
                        "import_active_total".to_string(),
                        expect(k),
                    )
                })
                .collect(),
            ..Default::default()
        };
        let hook = Flagger(RefCell::new(Vec::new()));
        assert!(!l.commit(&batch(100, &|_| None), &hook).unwrap().stale);
        assert!(hook.0.borrow().iter().all(|n| *n == 0));
        // One stamp off: nothing is written.
        let wrong = batch(200, &|k| {
            Some((if k == 17 { 99 } else { 100 }, 0, None, dec!(1.5)))
        });
        assert!(l.commit(&wrong, &hook).unwrap().stale);
        // The stamps as stored: applied, and every account shows its flag.
        hook.0.borrow_mut().clear();
        assert!(
            !l.commit(&batch(200, &|_| Some((100, 0, None, dec!(1.5)))), &hook)
                .unwrap()
                .stale
        );
        assert_eq!(*hook.0.borrow(), vec![1; 40]);
        assert_eq!(l.balance("A017").unwrap(), dec!(-2));
        assert_eq!(
            l.cursor("M017", "import_active_total")
                .unwrap()
                .unwrap()
                .last_ts_ms,
            200
        );
    }

    #[test]
    fn a_writer_that_missed_another_s_late_interval_is_stale_not_overwriting_it() {
        use rust_decimal_macros::dec;
        let dir = tempfile::tempdir().unwrap();
        let mut l = SqliteLedger::open(&dir.path().join("ledger.sqlite")).unwrap();
        l.migrate().unwrap();
        let c0 = Cursor {
            meter_id: "M1".into(),
            channel: "import_active_interval".into(),
            window_start_ms: 0,
            position: dec!(10),
            last_ts_ms: 9_000,
            last_value: dec!(1),
            first_ts_ms: 0,
            first_value: dec!(0),
            held: None,
            tou: None,
        };
        let commit = |l: &mut SqliteLedger, c: &Cursor, expect: &Cursor| {
            let batch = Batch {
                cursors: vec![c.clone()],
                expect: vec![(c.meter_id.clone(), c.channel.clone(), Some(expect.stamp()))],
                ..Default::default()
            };
            l.commit(&batch, &crate::ledger::NoHook).unwrap().stale
        };
        let setup = Batch {
            cursors: vec![c0.clone()],
            ..Default::default()
        };
        l.commit(&setup, &crate::ledger::NoHook).unwrap();
        // Writer A charges a late interval: the position moves, neither time does.
        let mut late = c0.clone();
        late.position = dec!(12);
        assert!(!commit(&mut l, &late, &c0));
        // Writer B still holds c0 and charges a later interval.
        let mut next = c0.clone();
        next.position = dec!(11);
        next.last_ts_ms = 10_000;
        assert!(
            commit(&mut l, &next, &c0),
            "B must recompute, not overwrite A's interval"
        );
        let kept = l.cursor("M1", "import_active_interval").unwrap().unwrap();
        assert_eq!((kept.position, kept.last_ts_ms), (dec!(12), 9_000));
    }

    #[test]
    fn batch_mode_commits_are_seen_by_other_connections_and_finish_empties_the_wal() {
        use rust_decimal_macros::dec;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite");
        let mut l = SqliteLedger::open(&path).unwrap();
        l.migrate().unwrap();
        l.prepare_for_batch().unwrap();
        for chunk in 0..20 {
            let entries = (0..50)
                .map(|k| deduction(format!("c{chunk}:k{k}"), format!("A{k}"), dec!(-0.5), k))
                .collect();
            let batch = Batch {
                entries,
                ..Default::default()
            };
            l.commit(&batch, &crate::ledger::NoHook).unwrap();
        }
        // Another process sees every commit while the batch runs.
        let mut other = SqliteLedger::open(&path).unwrap();
        assert_eq!(other.balance("A7").unwrap(), dec!(-10));
        drop(other);
        l.finish_batch().unwrap();
        let wal = std::fs::metadata(format!("{}-wal", path.display())).unwrap();
        assert_eq!(wal.len(), 0, "every page is in the database file");
        // Back to per-commit durability, and the ledger adds up.
        let sync: i64 = l
            .conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "FULL");
        drop(l);
        let mut again = SqliteLedger::open(&path).unwrap();
        assert_eq!(again.balance("A49").unwrap(), dec!(-10));
        assert!(again.check().unwrap().iter().all(BalanceCheck::ok));
    }

    #[test]
    fn a_new_ledger_gets_16_kib_pages_and_an_old_one_keeps_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let page_size = |l: &SqliteLedger| -> i64 {
            l.conn
                .query_row("PRAGMA page_size", [], |r| r.get(0))
                .unwrap()
        };
        let new = dir.path().join("new.sqlite");
        let mut l = SqliteLedger::open(&new).unwrap();
        l.migrate().unwrap();
        assert_eq!(page_size(&l), 16_384);
        // A ledger created with SQLite's default 4 KiB pages stays so.
        let old = dir.path().join("old.sqlite");
        {
            let c = Connection::open(&old).unwrap();
            c.pragma_update(None, "journal_mode", "WAL").unwrap();
            c.execute_batch("CREATE TABLE t (x INTEGER)").unwrap();
        }
        let l = SqliteLedger::open(&old).unwrap();
        assert_eq!(page_size(&l), 4_096);
    }

    #[test]
    fn entries_renumbered_without_autoincrement_keep_their_numbers_and_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite");
        let conn = at_version(&path, 6);
        conn.execute_batch(
            "INSERT INTO entries (key, account_id, kind, amount, ts_ms, source, detail, recorded_ms)
                VALUES ('pay:a', 'A1', 'top_up', '100', 1, 'import', '{}', 1),
                       ('pay:b', 'A1', 'top_up', '50', 2, 'import', '{}', 2);
             INSERT INTO balances VALUES ('A1', '150', 2);",
        )
        .unwrap();
        drop(conn);
        let mut l = SqliteLedger::open(&path).unwrap();
        l.migrate().unwrap();
        let autoincrement = tables_where(&l, "name = 'entries' AND sql LIKE '%AUTOINCREMENT%'");
        assert_eq!(autoincrement, 0);
        let numbered = |l: &mut SqliteLedger| -> Vec<(i64, String)> {
            l.entries(Some("A1"), 0, 10)
                .unwrap()
                .into_iter()
                .map(|e| (e.seq, e.entry.key))
                .collect()
        };
        assert_eq!(
            numbered(&mut l),
            [(1, "pay:a".to_string()), (2, "pay:b".to_string())]
        );
        // The next entry takes the next number; its key is still unique.
        let batch = Batch {
            entries: vec![deduction(
                "ded:x".into(),
                "A1".into(),
                Decimal::NEGATIVE_ONE,
                3,
            )],
            ..Default::default()
        };
        l.commit(&batch, &crate::ledger::NoHook).unwrap();
        let again = l.commit(&batch, &crate::ledger::NoHook).unwrap();
        assert_eq!(again.outcomes, [crate::ledger::Outcome::Duplicate]);
        assert_eq!(numbered(&mut l)[2], (3, "ded:x".to_string()));
        assert_eq!(l.balance("A1").unwrap(), Decimal::new(149, 0));
        assert!(l.check().unwrap().iter().all(BalanceCheck::ok));
    }
}
