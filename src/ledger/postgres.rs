//! PostgreSQL backend for several processes sharing one ledger. Amounts are
//! NUMERIC (sent and read as text, never floats). Writers lock the balance
//! rows of the accounts they touch (sorted) and take a transaction-scoped
//! advisory lock per meter cursor, so two processes cannot consume the same
//! reading interval twice.

use std::collections::BTreeSet;

use postgres::{Client, NoTls, Transaction};
use rust_decimal::Decimal;

use super::logic::{commit_batch, Tx};
use super::sqlite::build_entry;
use super::{
    amount_text, parse_amount, BalanceCheck, Batch, CommitHook, CommitReport, Cursor, Entry,
    Ledger, LedgerError, NewEntry, OutboxMsg,
};
use crate::model::now_ms;

const MIGRATIONS: &[&str] = &[
    "CREATE TABLE entries (
        seq BIGSERIAL PRIMARY KEY,
        key TEXT NOT NULL UNIQUE,
        account_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        amount NUMERIC NOT NULL,
        ts_ms BIGINT NOT NULL,
        source TEXT NOT NULL,
        detail TEXT NOT NULL,
        recorded_ms BIGINT NOT NULL
     );
     CREATE INDEX entries_account ON entries(account_id, seq);
     CREATE TABLE balances (
        account_id TEXT PRIMARY KEY,
        balance NUMERIC NOT NULL,
        entries BIGINT NOT NULL
     );
     CREATE TABLE cursors (
        meter_id TEXT NOT NULL,
        channel TEXT NOT NULL,
        window_start_ms BIGINT NOT NULL,
        position NUMERIC NOT NULL,
        last_ts_ms BIGINT NOT NULL,
        last_value NUMERIC NOT NULL,
        first_ts_ms BIGINT NOT NULL,
        first_value NUMERIC NOT NULL,
        PRIMARY KEY (meter_id, channel)
     );
     CREATE TABLE flags (
        account_id TEXT NOT NULL,
        flag TEXT NOT NULL,
        set_ms BIGINT NOT NULL,
        PRIMARY KEY (account_id, flag)
     );
     CREATE TABLE outbox (
        n BIGSERIAL PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        account_id TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        payload TEXT NOT NULL,
        delivered_ms BIGINT
     );",
    // 2: a held (unconfirmed) jump per cursor, see `prepay::deduct`.
    "ALTER TABLE cursors ADD COLUMN held_ts_ms BIGINT, ADD COLUMN held_value NUMERIC;",
    // 3: tariff-register state of time-of-use cursors (JSON), see `ledger::TouCursor`.
    "ALTER TABLE cursors ADD COLUMN tou TEXT;",
    // 4: pending outbox messages by a partial index: delivery must not walk
    // every delivered message first (quadratic on a large fleet).
    "CREATE INDEX outbox_pending ON outbox(n) WHERE delivered_ms IS NULL;
     CREATE INDEX outbox_pending_kind ON outbox(kind, n) WHERE delivered_ms IS NULL;",
];

pub struct PgLedger {
    client: Client,
    describe: String,
}

/// Splits `?schema=NAME` off a PostgreSQL URL.
pub fn split_schema(url: &str) -> Result<(String, String), LedgerError> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), "public".into()));
    };
    let mut schema = "public".to_string();
    let mut rest = Vec::new();
    for kv in query.split('&') {
        match kv.strip_prefix("schema=") {
            Some(s) => schema = s.to_string(),
            None => rest.push(kv),
        }
    }
    if schema.is_empty()
        || !schema
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(LedgerError::BadUrl(url.into()));
    }
    let base = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    Ok((base, schema))
}

/// `url` with any password (`user:PW@`, `?password=PW`) replaced by `***`,
/// for messages.
pub fn redact(url: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let head = match head.split_once("://").and_then(|(scheme, rest)| {
        let (userinfo, host) = rest.split_once('@')?;
        let (user, _) = userinfo.split_once(':')?;
        Some(format!("{scheme}://{user}:***@{host}"))
    }) {
        Some(h) => h,
        None => head.to_string(),
    };
    match query {
        None => head,
        Some(q) => {
            let q: Vec<String> = q
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_string(),
                })
                .collect();
            format!("{head}?{}", q.join("&"))
        }
    }
}

impl PgLedger {
    /// `url` without a password takes it from `PGPASSWORD` (as libpq
    /// does), so it need not be on a command line or in a config file.
    pub fn connect(url: &str) -> Result<PgLedger, LedgerError> {
        let (base, schema) = split_schema(url).map_err(|_| LedgerError::BadUrl(redact(url)))?;
        let mut config: postgres::Config = base
            .parse()
            .map_err(|e| LedgerError::Db(format!("{}: {e}", redact(url))))?;
        if config.get_password().is_none() {
            if let Ok(p) = std::env::var("PGPASSWORD") {
                config.password(p);
            }
        }
        let mut client = config.connect(NoTls)?;
        // Concurrent CREATE SCHEMA IF NOT EXISTS can race on the catalog; ignore that error.
        let _ = client.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"));
        client.batch_execute(&format!("SET search_path TO {schema}"))?;
        let host = redact(&base);
        let host = host.rsplit('@').next().unwrap_or(&host).to_string();
        Ok(PgLedger {
            client,
            describe: format!("postgres:{host}/{schema}"),
        })
    }
}

struct PgTx<'a, 'b> {
    tx: &'a mut Transaction<'b>,
    /// Balances read while locking them (one round trip for all accounts).
    balances: std::collections::HashMap<String, (Decimal, i64)>,
}

fn lock_key(meter: &str, channel: &str) -> i64 {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(format!("{meter}\u{1f}{channel}").as_bytes());
    i64::from_be_bytes(h[..8].try_into().expect("8 bytes"))
}

impl PgTx<'_, '_> {
    /// Identity of the stored entry with this key (it exists).
    fn stored_identity(&mut self, key: &str) -> Result<String, LedgerError> {
        let r = self.tx.query_one(
            "SELECT seq, key, account_id, kind, amount::text, ts_ms, source, detail, recorded_ms FROM entries WHERE key = $1",
            &[&key],
        )?;
        Ok(entry_of_row(&r)?.entry.identity())
    }
}

impl Tx for PgTx<'_, '_> {
    fn lock_balances(&mut self, accounts: &[&str]) -> Result<(), LedgerError> {
        // Two round trips for the whole batch; rows are locked in sorted order
        // (LockRows runs above the sort), like the per-row loop it replaces.
        self.tx.execute(
            "INSERT INTO balances(account_id, balance, entries)
             SELECT a, 0, 0 FROM unnest($1::text[]) AS a ORDER BY a ON CONFLICT DO NOTHING",
            &[&accounts],
        )?;
        let rows = self.tx.query(
            "SELECT account_id, balance::text, entries FROM balances
             WHERE account_id = ANY($1) ORDER BY account_id FOR UPDATE",
            &[&accounts],
        )?;
        for r in rows {
            let bal = parse_amount(r.get(1))?;
            self.balances.insert(r.get(0), (bal, r.get(2)));
        }
        Ok(())
    }
    fn balance(&mut self, account: &str) -> Result<(Decimal, i64), LedgerError> {
        if let Some(b) = self.balances.get(account) {
            return Ok(*b);
        }
        let rows = self.tx.query(
            "SELECT balance::text, entries FROM balances WHERE account_id = $1",
            &[&account],
        )?;
        rows.first().map_or(Ok((Decimal::ZERO, 0)), |r| {
            Ok((parse_amount(r.get(0))?, r.get(1)))
        })
    }
    fn set_balance(
        &mut self,
        account: &str,
        balance: Decimal,
        added: i64,
    ) -> Result<(), LedgerError> {
        self.tx.execute(
            "UPDATE balances SET balance = CAST($2::text AS NUMERIC), entries = entries + $3 WHERE account_id = $1",
            &[&account, &amount_text(balance), &added],
        )?;
        if let Some(b) = self.balances.get_mut(account) {
            *b = (balance, b.1 + added);
        }
        Ok(())
    }
    fn entry_exists(&mut self, key: &str) -> Result<bool, LedgerError> {
        Ok(self
            .tx
            .query_opt("SELECT 1 FROM entries WHERE key = $1", &[&key])?
            .is_some())
    }
    /// One round trip for the whole batch (an index probe per key on the
    /// server), not one per key.
    fn any_entry_exists(&mut self, keys: &[String]) -> Result<bool, LedgerError> {
        if keys.is_empty() {
            return Ok(false);
        }
        Ok(self
            .tx
            .query_opt(
                "SELECT 1 FROM entries WHERE key = ANY($1) LIMIT 1",
                &[&keys],
            )?
            .is_some())
    }
    fn insert_entry(&mut self, e: &NewEntry, now: i64) -> Result<Option<String>, LedgerError> {
        let n = self.tx.execute(
            "INSERT INTO entries(key, account_id, kind, amount, ts_ms, source, detail, recorded_ms)
             VALUES ($1, $2, $3, CAST($4::text AS NUMERIC), $5, $6, $7, $8) ON CONFLICT (key) DO NOTHING",
            &[
                &e.key,
                &e.account_id,
                &e.kind.as_str(),
                &amount_text(e.amount),
                &e.ts_ms,
                &e.source,
                &e.detail,
                &now,
            ],
        )?;
        if n == 1 {
            return Ok(None);
        }
        self.stored_identity(&e.key).map(Some)
    }
    fn insert_entries(
        &mut self,
        es: &[NewEntry],
        now: i64,
    ) -> Result<Vec<Option<String>>, LedgerError> {
        let mut seen = std::collections::HashSet::new();
        if es.len() < 2 || !es.iter().all(|e| seen.insert(e.key.as_str())) {
            // Repeated keys inside one batch: entry by entry keeps their order exact.
            return es.iter().map(|e| self.insert_entry(e, now)).collect();
        }
        let keys: Vec<&str> = es.iter().map(|e| e.key.as_str()).collect();
        let accounts: Vec<&str> = es.iter().map(|e| e.account_id.as_str()).collect();
        let kinds: Vec<&str> = es.iter().map(|e| e.kind.as_str()).collect();
        let amounts: Vec<String> = es.iter().map(|e| amount_text(e.amount)).collect();
        let ts: Vec<i64> = es.iter().map(|e| e.ts_ms).collect();
        let sources: Vec<&str> = es.iter().map(|e| e.source.as_str()).collect();
        let details: Vec<&str> = es.iter().map(|e| e.detail.as_str()).collect();
        let rows = self.tx.query(
            "INSERT INTO entries(key, account_id, kind, amount, ts_ms, source, detail, recorded_ms)
             SELECT k, a, kd, CAST(am AS NUMERIC), t, s, d, $8
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::text[])
                  WITH ORDINALITY AS u(k, a, kd, am, t, s, d, o)
             ORDER BY o
             ON CONFLICT (key) DO NOTHING RETURNING key",
            &[&keys, &accounts, &kinds, &amounts, &ts, &sources, &details, &now],
        )?;
        let inserted: std::collections::HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
        es.iter()
            .map(|e| {
                if inserted.contains(&e.key) {
                    Ok(None)
                } else {
                    self.stored_identity(&e.key).map(Some)
                }
            })
            .collect()
    }
    fn cursor_ts_for_update(
        &mut self,
        meter: &str,
        channel: &str,
    ) -> Result<Option<super::CursorStamp>, LedgerError> {
        self.tx.execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&lock_key(meter, channel)],
        )?;
        let rows = self.tx.query(
            "SELECT last_ts_ms, first_ts_ms, held_ts_ms, position::text FROM cursors WHERE meter_id = $1 AND channel = $2",
            &[&meter, &channel],
        )?;
        rows.first()
            .map(|r| Ok((r.get(0), r.get(1), r.get(2), parse_amount(r.get(3))?)))
            .transpose()
    }
    fn upsert_cursor(&mut self, c: &Cursor) -> Result<(), LedgerError> {
        self.tx.execute(
            "INSERT INTO cursors(meter_id, channel, window_start_ms, position, last_ts_ms, last_value, first_ts_ms, first_value, held_ts_ms, held_value, tou)
             VALUES ($1, $2, $3, CAST($4::text AS NUMERIC), $5, CAST($6::text AS NUMERIC), $7, CAST($8::text AS NUMERIC), $9, CAST($10::text AS NUMERIC), $11)
             ON CONFLICT (meter_id, channel) DO UPDATE SET window_start_ms = excluded.window_start_ms,
               position = excluded.position, last_ts_ms = excluded.last_ts_ms, last_value = excluded.last_value,
               first_ts_ms = excluded.first_ts_ms, first_value = excluded.first_value,
               held_ts_ms = excluded.held_ts_ms, held_value = excluded.held_value, tou = excluded.tou",
            &[
                &c.meter_id,
                &c.channel,
                &c.window_start_ms,
                &amount_text(c.position),
                &c.last_ts_ms,
                &amount_text(c.last_value),
                &c.first_ts_ms,
                &amount_text(c.first_value),
                &c.held.map(|h| h.0),
                &c.held.map(|h| amount_text(h.1)),
                &c.tou.as_ref().map(|t| t.to_json()),
            ],
        )?;
        Ok(())
    }
    fn flags(&mut self, account: &str) -> Result<BTreeSet<String>, LedgerError> {
        let rows = self
            .tx
            .query("SELECT flag FROM flags WHERE account_id = $1", &[&account])?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
    fn set_flag(&mut self, account: &str, flag: &str, now: i64) -> Result<(), LedgerError> {
        self.tx.execute(
            "INSERT INTO flags(account_id, flag, set_ms) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            &[&account, &flag, &now],
        )?;
        Ok(())
    }
    fn clear_flag(&mut self, account: &str, flag: &str) -> Result<(), LedgerError> {
        self.tx.execute(
            "DELETE FROM flags WHERE account_id = $1 AND flag = $2",
            &[&account, &flag],
        )?;
        Ok(())
    }
    fn insert_outbox(&mut self, m: &OutboxMsg) -> Result<bool, LedgerError> {
        let n = self.tx.execute(
            "INSERT INTO outbox(id, kind, account_id, created_ms, payload) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (id) DO NOTHING",
            &[&m.id, &m.kind, &m.account_id, &m.created_ms, &m.payload],
        )?;
        Ok(n == 1)
    }
}

fn outbox_from(rows: Vec<postgres::Row>) -> Vec<OutboxMsg> {
    rows.iter()
        .map(|r| OutboxMsg {
            id: r.get(0),
            kind: r.get(1),
            account_id: r.get(2),
            created_ms: r.get(3),
            payload: r.get(4),
        })
        .collect()
}

impl Ledger for PgLedger {
    fn migrate(&mut self) -> Result<(), LedgerError> {
        let mut tx = self.client.transaction()?;
        // One migrator at a time across processes.
        tx.execute("SELECT pg_advisory_xact_lock(7007)", &[])?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version INT NOT NULL)")?;
        let v: Option<i32> = tx
            .query_one("SELECT max(version) FROM schema_version", &[])?
            .get(0);
        let v = v.unwrap_or(0) as usize;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(v) {
            tx.batch_execute(sql)?;
            tx.execute(
                "INSERT INTO schema_version(version) VALUES ($1)",
                &[&((i + 1) as i32)],
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
        // Deadlocks cannot happen by lock order, but retry a serialization hiccup once or twice anyway.
        let mut attempt = 0;
        loop {
            let mut tx = self.client.transaction()?;
            let res = commit_batch(
                &mut PgTx {
                    tx: &mut tx,
                    balances: Default::default(),
                },
                batch,
                hook,
                now_ms(),
            );
            match res {
                Ok(report) if report.stale => {
                    tx.rollback()?;
                    return Ok(report);
                }
                Ok(report) => match tx.commit() {
                    Ok(()) => return Ok(report),
                    Err(e) if attempt < 3 && is_retryable(&e) => attempt += 1,
                    Err(e) => return Err(e.into()),
                },
                Err(LedgerError::Db(msg))
                    if attempt < 3 && (msg.contains("deadlock") || msg.contains("serializ")) =>
                {
                    drop(tx);
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn balance(&mut self, account_id: &str) -> Result<Decimal, LedgerError> {
        let rows = self.client.query(
            "SELECT balance::text FROM balances WHERE account_id = $1",
            &[&account_id],
        )?;
        rows.first()
            .map_or(Ok(Decimal::ZERO), |r| parse_amount(r.get(0)))
    }

    fn balances(&mut self) -> Result<Vec<(String, Decimal)>, LedgerError> {
        let rows = self.client.query(
            "SELECT account_id, balance::text FROM balances ORDER BY account_id",
            &[],
        )?;
        rows.iter()
            .map(|r| Ok((r.get(0), parse_amount(r.get(1))?)))
            .collect()
    }

    fn check(&mut self) -> Result<Vec<BalanceCheck>, LedgerError> {
        let mut tx = self
            .client
            .build_transaction()
            .isolation_level(postgres::IsolationLevel::RepeatableRead)
            .start()?;
        let rows = tx.query(
            "SELECT coalesce(b.account_id, s.account_id), coalesce(b.balance, 0)::text, coalesce(s.total, 0)::text,
                    coalesce(s.n, 0), coalesce(b.entries, -1)
             FROM balances b FULL OUTER JOIN
                  (SELECT account_id, sum(amount) AS total, count(*) AS n FROM entries GROUP BY account_id) s
             ON b.account_id = s.account_id ORDER BY 1",
            &[],
        )?;
        tx.commit()?;
        rows.iter()
            .map(|r| {
                let n: i64 = r.get(3);
                let cached_n: i64 = r.get(4);
                Ok(BalanceCheck {
                    account_id: r.get(0),
                    cached: parse_amount(r.get(1))?,
                    sum: parse_amount(r.get(2))?,
                    entries: if n == cached_n { n } else { -n },
                })
            })
            .collect()
    }

    fn entries(
        &mut self,
        account_id: Option<&str>,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<Entry>, LedgerError> {
        let rows = self.client.query(
            "SELECT seq, key, account_id, kind, amount::text, ts_ms, source, detail, recorded_ms FROM entries
             WHERE seq > $1 AND ($2::text IS NULL OR account_id = $2) ORDER BY seq LIMIT $3",
            &[&after_seq, &account_id, &(limit.min(i64::MAX as usize) as i64)],
        )?;
        rows.iter().map(entry_of_row).collect()
    }

    fn entries_by_keys(&mut self, keys: &[String]) -> Result<Vec<Entry>, LedgerError> {
        // Equality on the unique key index, whatever the collation.
        let rows = self.client.query(
            "SELECT seq, key, account_id, kind, amount::text, ts_ms, source, detail, recorded_ms FROM entries
             WHERE key = ANY($1) ORDER BY seq",
            &[&keys],
        )?;
        rows.iter().map(entry_of_row).collect()
    }

    fn cursor(&mut self, meter_id: &str, channel: &str) -> Result<Option<Cursor>, LedgerError> {
        Ok(self.cursors_where(Some((meter_id, channel)))?.pop())
    }

    fn cursors(&mut self) -> Result<Vec<Cursor>, LedgerError> {
        self.cursors_where(None)
    }

    fn flags(&mut self, account_id: &str) -> Result<BTreeSet<String>, LedgerError> {
        let rows = self.client.query(
            "SELECT flag FROM flags WHERE account_id = $1",
            &[&account_id],
        )?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    fn pending_outbox(&mut self, limit: usize) -> Result<Vec<OutboxMsg>, LedgerError> {
        let rows = self.client.query(
            "SELECT id, kind, account_id, created_ms, payload FROM outbox WHERE delivered_ms IS NULL ORDER BY n LIMIT $1",
            &[&(limit.min(i64::MAX as usize) as i64)],
        )?;
        Ok(outbox_from(rows))
    }

    fn pending_outbox_of(
        &mut self,
        kind: &str,
        limit: usize,
    ) -> Result<Vec<OutboxMsg>, LedgerError> {
        let rows = self.client.query(
            "SELECT id, kind, account_id, created_ms, payload FROM outbox WHERE delivered_ms IS NULL AND kind = $1 ORDER BY n LIMIT $2",
            &[&kind, &(limit.min(i64::MAX as usize) as i64)],
        )?;
        Ok(outbox_from(rows))
    }

    fn mark_delivered(&mut self, delivered: &[(&str, &str)]) -> Result<(), LedgerError> {
        let ids: Vec<&str> = delivered.iter().map(|(_, id)| *id).collect();
        self.client.execute(
            "UPDATE outbox SET delivered_ms = $2 WHERE id = ANY($1)",
            &[&ids, &now_ms()],
        )?;
        Ok(())
    }

    fn outbox_all(&mut self) -> Result<Vec<OutboxMsg>, LedgerError> {
        let rows = self.client.query(
            "SELECT id, kind, account_id, created_ms, payload FROM outbox ORDER BY n",
            &[],
        )?;
        Ok(outbox_from(rows))
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn prepare_for_batch(&mut self) -> Result<(), LedgerError> {
        // Commits return before the server flushes its WAL. A server crash
        // can undo the last commits, never part of one: a re-run redoes
        // them, and `finish_batch` waits for the flush.
        self.client.batch_execute("SET synchronous_commit = off")?;
        Ok(())
    }

    fn finish_batch(&mut self) -> Result<(), LedgerError> {
        self.client.batch_execute("SET synchronous_commit = on")?;
        // A synchronous commit that writes a WAL record (the transaction id)
        // returns once the WAL is flushed up to it: every earlier commit
        // of this batch is then durable too.
        self.client
            .batch_execute("BEGIN; SELECT txid_current(); COMMIT")?;
        Ok(())
    }
}

fn is_retryable(e: &postgres::Error) -> bool {
    let s = e.to_string();
    s.contains("deadlock") || s.contains("serializ")
}

impl PgLedger {
    fn cursors_where(&mut self, key: Option<(&str, &str)>) -> Result<Vec<Cursor>, LedgerError> {
        let (m, c) = key.unzip();
        let rows = self.client.query(
            "SELECT meter_id, channel, window_start_ms, position::text, last_ts_ms, last_value::text, first_ts_ms, first_value::text, held_ts_ms, held_value::text, tou FROM cursors
             WHERE ($1::text IS NULL OR (meter_id = $1 AND channel = $2)) ORDER BY meter_id, channel",
            &[&m, &c],
        )?;
        rows.iter()
            .map(|r| {
                Ok(Cursor {
                    meter_id: r.get(0),
                    channel: r.get(1),
                    window_start_ms: r.get(2),
                    position: parse_amount(r.get(3))?,
                    last_ts_ms: r.get(4),
                    last_value: parse_amount(r.get(5))?,
                    first_ts_ms: r.get(6),
                    first_value: parse_amount(r.get(7))?,
                    held: match (r.get::<_, Option<i64>>(8), r.get::<_, Option<&str>>(9)) {
                        (Some(t), Some(v)) => Some((t, parse_amount(v)?)),
                        _ => None,
                    },
                    tou: r
                        .get::<_, Option<&str>>(10)
                        .map(super::TouCursor::from_json)
                        .transpose()?,
                })
            })
            .collect()
    }
}

/// An entry from a row of `SELECT seq, key, account_id, kind, amount::text,
/// ts_ms, source, detail, recorded_ms`.
fn entry_of_row(r: &::postgres::Row) -> Result<Entry, LedgerError> {
    build_entry((
        r.get(0),
        r.get(1),
        r.get(2),
        r.get(3),
        r.get(4),
        r.get(5),
        r.get(6),
        r.get(7),
        r.get(8),
    ))
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn a_password_in_a_ledger_url_is_never_printed() {
        assert_eq!(
            redact("postgres://mf:s3cret@db:5432/test?schema=x"),
            "postgres://mf:***@db:5432/test?schema=x"
        );
        assert_eq!(redact("postgres://mf@db/test"), "postgres://mf@db/test");
        assert_eq!(
            redact("postgres://mf@db/x?password=s3cret&schema=a"),
            "postgres://mf@db/x?password=***&schema=a"
        );
        assert_eq!(redact("ledger.sqlite"), "ledger.sqlite");
    }
}
