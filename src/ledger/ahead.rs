//! Rows of one commit read ahead by a single range scan (SQLite).
//!
//! A batch commit reads the balance, the flags and the cursor of each of
//! thousands of keys that are close together (the batch goes in account
//! order, and meter ids usually follow account ids). One scan from the
//! first key to the last reads them all at the cost of walking the leaf
//! pages once, where one statement per key pays for a bind, a B-tree descent
//! and a reset each time.
//!
//! The scan gives up when the range holds many rows nobody asked for (keys
//! spread over a large table); those keys are then read one by one, as
//! before, so a sparse batch costs at most a bounded detour.

use rusqlite::{params, Row, Statement};

use super::LedgerError;

/// Fewer keys than this are read one by one: a scan would not pay.
const MIN_KEYS: usize = 32;

/// A key: (first column, second column); "" when the table has one.
pub(crate) type Key = (String, String);

/// Rows read ahead, aligned with the sorted keys asked for.
pub(crate) struct Ahead<V> {
    keys: Vec<Key>,
    /// Per key: its rows (empty: it has none), or None: not read.
    rows: Vec<Option<Vec<V>>>,
    /// Where the last key was found: a commit asks in key order, so the
    /// next key is usually the one after it.
    last: usize,
}

impl<V> Default for Ahead<V> {
    fn default() -> Self {
        Ahead {
            keys: Vec::new(),
            rows: Vec::new(),
            last: 0,
        }
    }
}

impl<V> Ahead<V> {
    fn index(&mut self, key: (&str, &str)) -> Option<usize> {
        let is = |k: &Key| k.0 == key.0 && k.1 == key.1;
        let i = match (self.keys.get(self.last), self.keys.get(self.last + 1)) {
            (Some(k), _) if is(k) => self.last,
            (_, Some(k)) if is(k) => self.last + 1,
            _ => self
                .keys
                .binary_search_by(|(a, b)| (a.as_str(), b.as_str()).cmp(&key))
                .ok()?,
        };
        self.last = i;
        Some(i)
    }

    /// The key's rows as read ahead; None when they were not read (ask the
    /// table).
    pub(crate) fn get(&mut self, key: (&str, &str)) -> Option<&[V]> {
        let i = self.index(key)?;
        self.rows[i].as_deref()
    }

    /// Forgets what was read for `key`: the transaction changed it.
    pub(crate) fn forget(&mut self, key: (&str, &str)) {
        if let Some(i) = self.index(key) {
            self.rows[i] = None;
        }
    }

    /// Reads the rows of `wanted` (sorted, no repeats) with `st`, a query
    /// taking the first and the last key's first column as ?1 and ?2 and
    /// returning rows in key order; `row` splits a row into key and value.
    pub(crate) fn read(
        st: &mut Statement<'_>,
        wanted: &[(&str, &str)],
        row: impl Fn(&Row<'_>) -> rusqlite::Result<(Key, V)>,
    ) -> Result<Ahead<V>, LedgerError> {
        let n = wanted.len();
        if n < MIN_KEYS {
            return Ok(Ahead::default());
        }
        let mut ahead = Ahead {
            keys: wanted
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            rows: (0..n).map(|_| None).collect(),
            last: 0,
        };
        let budget = 4 * n + 64;
        let (mut next, mut skipped) = (0, 0);
        let mut q = st.query(params![wanted[0].0, wanted[n - 1].0])?;
        while let Some(r) = q.next()? {
            let ((a, b), v) = row(r)?;
            let key = (a.as_str(), b.as_str());
            // Keys before this row's are settled: their rows were all read.
            while next < n && wanted[next] < key {
                ahead.rows[next].get_or_insert_with(Vec::new);
                next += 1;
            }
            if next < n && wanted[next] == key {
                ahead.rows[next].get_or_insert_with(Vec::new).push(v);
            } else {
                skipped += 1;
                if skipped > budget {
                    // The keys from `next` on are left unread.
                    return Ok(ahead);
                }
            }
        }
        for r in &mut ahead.rows[next..] {
            r.get_or_insert_with(Vec::new);
        }
        Ok(ahead)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    fn table(rows: impl IntoIterator<Item = (String, String, i64)>) -> Connection {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(
            "CREATE TABLE t (a TEXT, b TEXT, v INTEGER, PRIMARY KEY (a, b)) WITHOUT ROWID",
        )
        .unwrap();
        for (a, b, v) in rows {
            c.execute("INSERT INTO t VALUES (?1, ?2, ?3)", params![a, b, v])
                .unwrap();
        }
        c
    }

    fn read(c: &Connection, wanted: &[(&str, &str)]) -> Ahead<i64> {
        let mut st = c
            .prepare("SELECT a, b, v FROM t WHERE a >= ?1 AND a <= ?2 ORDER BY a, b")
            .unwrap();
        Ahead::read(&mut st, wanted, |r| Ok(((r.get(0)?, r.get(1)?), r.get(2)?))).unwrap()
    }

    fn id(i: usize) -> String {
        format!("A{i:06}")
    }

    #[test]
    fn a_dense_batch_is_read_in_one_pass_with_absent_keys_known_absent() {
        // Every third account has no row; account 10 has two.
        let c = table(
            (0..100)
                .filter(|i| i % 3 != 0)
                .map(|i| (id(i), "x".to_string(), i as i64))
                .chain([(id(10), "y".to_string(), 1000)]),
        );
        let ids: Vec<String> = (0..100).map(id).collect();
        let wanted: Vec<(&str, &str)> = ids.iter().map(|a| (a.as_str(), "x")).collect();
        let mut ahead = read(&c, &wanted);
        for (i, a) in ids.iter().enumerate() {
            let got = ahead.get((a, "x")).expect("read ahead");
            if i % 3 == 0 {
                assert!(got.is_empty(), "{a} has no row");
            } else {
                assert_eq!(got, &[i as i64]);
            }
        }
        // A key not asked for is never answered from the read.
        assert_eq!(ahead.get((&id(10), "y")), None);
    }

    #[test]
    fn rows_of_one_key_are_all_kept() {
        let c =
            table((0..40).flat_map(|i| [(id(i), "a".to_string(), 1), (id(i), "b".to_string(), 2)]));
        let mut st = c
            .prepare("SELECT a, v FROM t WHERE a >= ?1 AND a <= ?2 ORDER BY a, b")
            .unwrap();
        let ids: Vec<String> = (0..40).map(id).collect();
        let wanted: Vec<(&str, &str)> = ids.iter().map(|a| (a.as_str(), "")).collect();
        let mut ahead = Ahead::read(&mut st, &wanted, |r| {
            Ok(((r.get(0)?, String::new()), r.get(1)?))
        })
        .unwrap();
        assert_eq!(ahead.get((&id(7), "")), Some(&[1i64, 2][..]));
    }

    #[test]
    fn a_sparse_batch_gives_up_and_leaves_the_rest_to_lookups() {
        // 10,000 rows; 40 wanted keys spread over all of them.
        let c = table((0..10_000).map(|i| (id(i), "x".to_string(), i as i64)));
        let ids: Vec<String> = (0..40).map(|k| id(k * 250)).collect();
        let wanted: Vec<(&str, &str)> = ids.iter().map(|a| (a.as_str(), "x")).collect();
        let mut ahead = read(&c, &wanted);
        assert_eq!(ahead.get((&ids[0], "x")), Some(&[0i64][..]));
        // The scan stopped within its budget: the last keys were not read.
        assert_eq!(ahead.get((&ids[39], "x")), None);
    }

    #[test]
    fn a_small_batch_is_not_scanned_and_forget_unreads_a_key() {
        let c = table((0..100).map(|i| (id(i), "x".to_string(), i as i64)));
        let ids: Vec<String> = (0..100).map(id).collect();
        let few: Vec<(&str, &str)> = ids[..5].iter().map(|a| (a.as_str(), "x")).collect();
        assert_eq!(read(&c, &few).get((&ids[0], "x")), None);
        let all: Vec<(&str, &str)> = ids.iter().map(|a| (a.as_str(), "x")).collect();
        let mut ahead = read(&c, &all);
        assert_eq!(ahead.get((&ids[3], "x")), Some(&[3i64][..]));
        ahead.forget((&ids[3], "x"));
        assert_eq!(ahead.get((&ids[3], "x")), None);
    }
}
