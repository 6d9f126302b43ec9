//! The prepaid fleet: prepaid accounts and their meters, found by id.
//!
//! The records stay in the vectors the master-data loader filled; an index
//! of positions finds them. Maps of (id, record) pairs built from those
//! vectors cost a million accounts their size twice more in fresh pages
//! (a map's table is sized to a power of two) plus a copy of every id, and
//! fresh pages are most of a load's time where the kernel zeroes them at
//! first touch.

use std::hash::BuildHasher;
use std::path::Path;

use hashbrown::HashTable;
use rayon::prelude::*;

use super::PrepayError;
use crate::ledger::Cursor;
use crate::master::{Account, Meter, PaymentMode};
use crate::store::scan::{Fx, FxMap};

/// A record with an id.
pub trait Keyed {
    fn key(&self) -> &str;
}

impl Keyed for Account {
    fn key(&self) -> &str {
        &self.account_id
    }
}

impl Keyed for Meter {
    fn key(&self) -> &str {
        &self.meter_id
    }
}

/// By meter: a run keeps the cursors of one channel per meter.
impl Keyed for Cursor {
    fn key(&self) -> &str {
        &self.meter_id
    }
}

/// Records found by id. Of rows with one id the last is kept (as a map
/// that inserts every row in turn would keep it). Positions are `u32`: up
/// to 4,294,967,295 records, far beyond what one process loads.
#[derive(Debug, Clone)]
pub struct ById<T> {
    rows: Vec<T>,
    /// Positions in `rows`, hashed by id.
    index: HashTable<u32>,
}

impl<T> Default for ById<T> {
    fn default() -> Self {
        ById {
            rows: Vec::new(),
            index: HashTable::new(),
        }
    }
}

fn hash(key: &str) -> u64 {
    std::hash::BuildHasherDefault::<Fx>::default().hash_one(key)
}

impl<T: Keyed> ById<T> {
    pub fn new(mut rows: Vec<T>) -> ById<T> {
        let mut index = HashTable::with_capacity(rows.len());
        let mut replaced = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            let key = r.key();
            let h = hash(key);
            match index.find_mut(h, |&p: &u32| rows[p as usize].key() == key) {
                Some(p) => {
                    replaced.push(*p as usize);
                    *p = i as u32;
                }
                None => {
                    index.insert_unique(h, i as u32, |&p: &u32| hash(rows[p as usize].key()));
                }
            }
        }
        if replaced.is_empty() {
            return ById { rows, index };
        }
        // Repeated ids (rare): drop the rows a later one replaced, index again.
        replaced.sort_unstable();
        let mut i = 0;
        rows.retain(|_| {
            let keep = replaced.binary_search(&i).is_err();
            i += 1;
            keep
        });
        ById::new(rows)
    }

    /// Position of the record `key` in [`ById::rows`].
    pub fn position(&self, key: &str) -> Option<usize> {
        self.index
            .find(hash(key), |&p| self.rows[p as usize].key() == key)
            .map(|&p| p as usize)
    }

    pub fn get(&self, key: &str) -> Option<&T> {
        self.position(key).map(|p| &self.rows[p])
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.position(key).is_some()
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// In load order.
    pub fn rows(&self) -> &[T] {
        &self.rows
    }
}

/// Prepaid accounts and their meters.
#[derive(Debug, Clone, Default)]
pub struct Fleet {
    pub accounts: ById<Account>,
    /// Meters of prepaid accounts.
    pub meters: ById<Meter>,
    /// Meters by account: the positions in `meters` of the meters of the
    /// account at position `a` in `accounts` are
    /// `grouped[starts[a]..starts[a + 1]]`, in load order.
    starts: Vec<u32>,
    grouped: Vec<u32>,
    /// Each tariff of the fleet with one account on it (the questions a
    /// pricer answers per tariff are asked of that account).
    pub tariffs: FxMap<String, String>,
}

impl Fleet {
    /// Loads `accounts.csv` and `meters.csv` from `dir`, keeping prepaid accounts.
    /// Bad rows are logged and skipped. Personal fields are not loaded:
    /// deductions, alerts and relay rules never read them.
    pub fn load(dir: &Path) -> Result<Fleet, PrepayError> {
        // The two files are parsed side by side.
        let (accounts, meters) = rayon::join(
            || {
                crate::master::load_accounts_without_personal(
                    &dir.join(crate::master::ACCOUNTS_FILE),
                )
            },
            || crate::master::load_meters_for_billing(&dir.join(crate::master::METERS_FILE)),
        );
        let accounts = accounts.map_err(|e| PrepayError::Input(e.to_string()))?;
        let meters = meters.map_err(|e| PrepayError::Input(e.to_string()))?;
        for e in accounts.errors.iter().chain(meters.errors.iter()) {
            tracing::warn!("{e}");
        }
        Ok(Fleet::from_rows(accounts.rows, meters.rows))
    }

    pub fn from_rows(mut accounts: Vec<Account>, meters: Vec<Meter>) -> Fleet {
        // In place: no second copy of a million records.
        accounts.retain(|a| a.payment_mode == PaymentMode::Prepaid);
        // Indexed side by side with the meters (all of them: which are
        // prepaid is known once the accounts are indexed).
        let (accounts, meters) = rayon::join(|| ById::new(accounts), || ById::new(meters));
        let mut tariffs: FxMap<String, String> = FxMap::default();
        for a in accounts.rows() {
            if !tariffs.contains_key(&a.tariff_id) {
                tariffs.insert(a.tariff_id.clone(), a.account_id.clone());
            }
        }
        // Each meter's account position (None: not prepaid), on both cores:
        // a million lookups, each a few cache misses.
        let owner: Vec<Option<u32>> = meters
            .rows()
            .par_iter()
            .map(|m| accounts.position(&m.account_id).map(|p| p as u32))
            .collect();
        let meters = if owner.iter().all(Option::is_some) {
            meters
        } else {
            let mut keep = owner.iter();
            let mut rows = meters.rows;
            rows.retain(|_| keep.next().is_some_and(Option::is_some));
            ById::new(rows)
        };
        let owner: Vec<u32> = owner.into_iter().flatten().collect();
        let (starts, grouped) = crate::master::group_by_account(&owner, accounts.len());
        Fleet {
            accounts,
            meters,
            starts,
            grouped,
            tariffs,
        }
    }

    /// A prepaid meter with its account's record.
    pub fn meter_account(&self, meter_id: &str) -> Option<(&Meter, &Account)> {
        let meter = self.meters.get(meter_id)?;
        Some((meter, self.accounts.get(&meter.account_id)?))
    }

    /// The meters of prepaid account `account_id`, in load order.
    pub fn meters_of(&self, account_id: &str) -> impl Iterator<Item = &Meter> + '_ {
        let span = match self.accounts.position(account_id) {
            Some(a) => self.starts[a] as usize..self.starts[a + 1] as usize,
            None => 0..0,
        };
        self.grouped[span]
            .iter()
            .map(|&m| &self.meters.rows()[m as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(id: &str, tariff: &str, mode: PaymentMode) -> Account {
        Account {
            account_id: id.into(),
            tariff_id: tariff.into(),
            payment_mode: mode,
            ..crate::prepay::pricing::tests::account("flat")
        }
    }

    fn meter(id: &str, account: &str) -> Meter {
        Meter {
            meter_id: id.into(),
            account_id: account.into(),
            ..crate::prepay::deduct::tests::meter()
        }
    }

    fn ids<'a>(ms: impl Iterator<Item = &'a Meter>) -> Vec<&'a str> {
        ms.map(|m| m.meter_id.as_str()).collect()
    }

    #[test]
    fn the_fleet_keeps_prepaid_accounts_and_their_meters_in_load_order() {
        let f = Fleet::from_rows(
            vec![
                account("A1", "t1", PaymentMode::Prepaid),
                account("P1", "t1", PaymentMode::Postpaid),
                account("A2", "t2", PaymentMode::Prepaid),
            ],
            vec![
                meter("M3", "A2"),
                meter("M1", "A1"),
                meter("X1", "P1"),
                meter("M2", "A2"),
                meter("X2", "nobody"),
            ],
        );
        assert_eq!(f.accounts.len(), 2);
        assert!(f.accounts.get("P1").is_none());
        assert_eq!(f.meters.len(), 3);
        assert!(!f.meters.contains_key("X1") && !f.meters.contains_key("X2"));
        assert_eq!(ids(f.meters_of("A2")), ["M3", "M2"]);
        assert_eq!(ids(f.meters_of("A1")), ["M1"]);
        assert!(f.meters_of("P1").next().is_none());
        let (m, rec) = f.meter_account("M2").unwrap();
        assert_eq!(
            (
                m.meter_id.as_str(),
                rec.account_id.as_str(),
                rec.tariff_id.as_str()
            ),
            ("M2", "A2", "t2")
        );
        assert_eq!(f.tariffs["t1"], "A1");
        assert_eq!(f.tariffs["t2"], "A2");
    }

    #[test]
    fn of_rows_with_one_id_the_last_is_kept() {
        let f = Fleet::from_rows(
            vec![
                account("A1", "old", PaymentMode::Prepaid),
                account("A2", "t", PaymentMode::Prepaid),
                account("A1", "new", PaymentMode::Prepaid),
            ],
            vec![meter("M1", "A1"), meter("M1", "A2"), meter("M2", "A1")],
        );
        assert_eq!(f.accounts.len(), 2);
        assert_eq!(f.accounts.get("A1").unwrap().tariff_id, "new");
        assert_eq!(f.meters.len(), 2);
        assert_eq!(f.meters.get("M1").unwrap().account_id, "A2");
        assert_eq!(ids(f.meters_of("A1")), ["M2"]);
        assert_eq!(ids(f.meters_of("A2")), ["M1"]);
    }

    #[test]
    fn an_empty_fleet_finds_nothing() {
        let f = Fleet::default();
        assert!(f.accounts.is_empty() && f.meters.get("M1").is_none());
        assert!(f.meters_of("A1").next().is_none());
        assert!(f.meter_account("M1").is_none());
    }
}
