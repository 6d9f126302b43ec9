//! Payments as the bill run's late fees use them: grouped by account, by
//! local day.

use chrono::NaiveDate;
use rayon::prelude::*;
use rust_decimal::Decimal;

use crate::master::{BillingAccount, BillingPayment};
use crate::store::scan::FxMap;
use crate::tariff::TariffSet;

/// Payments of known accounts by local day, sorted per account by (day,
/// amount), file order among equals. Indexed by the account's position in
/// the accounts they were grouped for: a million accounts are looked up
/// with no hashing (a map keyed by id cost a cache miss or two per account).
#[derive(Default)]
pub struct Payments<'a> {
    all: Vec<(NaiveDate, Decimal)>,
    /// Account `i`'s payments are `all[at[i]..at[i + 1]]`.
    at: Vec<u32>,
    accounts: &'a [BillingAccount],
}

/// Finds an account's position by id. Files are usually in account order,
/// so the account after the last one found is tried first.
enum Find<'a> {
    /// `accounts` strictly sorted by id: a binary search.
    Sorted(&'a [BillingAccount]),
    /// Otherwise a map (of the last row of an id, as the roster bills).
    Map(&'a [BillingAccount], FxMap<&'a str, u32>),
}

impl<'a> Find<'a> {
    fn new(accounts: &'a [BillingAccount]) -> Find<'a> {
        if accounts
            .windows(2)
            .all(|w| w[0].account_id < w[1].account_id)
        {
            return Find::Sorted(accounts);
        }
        let map = accounts
            .iter()
            .zip(0u32..)
            .map(|(a, i)| (&*a.account_id, i))
            .collect();
        Find::Map(accounts, map)
    }

    fn find(&self, id: &str, last: Option<u32>) -> Option<u32> {
        let accounts = match self {
            Find::Sorted(a) | Find::Map(a, _) => a,
        };
        if let Some(l) = last {
            for i in [l, l + 1] {
                if accounts
                    .get(i as usize)
                    .is_some_and(|a| &*a.account_id == id)
                {
                    // In a map, only the id's last row counts.
                    if let Find::Map(_, m) = self {
                        return m.get(id).copied();
                    }
                    return Some(i);
                }
            }
        }
        match self {
            Find::Sorted(a) => a
                .binary_search_by(|x| (*x.account_id).cmp(id))
                .ok()
                .map(|i| i as u32),
            Find::Map(_, m) => m.get(id).copied(),
        }
    }
}

impl<'a> Payments<'a> {
    /// Groups `rows` by account of `accounts` (payments of other accounts
    /// are left out), dated by the local day of the account's tariff.
    pub fn new(
        rows: &[BillingPayment],
        accounts: &'a [BillingAccount],
        tariffs: &TariffSet,
    ) -> Payments<'a> {
        let find = Find::new(accounts);
        // Accounts of one tariff share its id (interned): its offset is
        // looked up once per run of equal ids, not once per payment.
        let keyed: Vec<(u32, NaiveDate, Decimal)> = rows
            .par_chunks(64 * 1024)
            .flat_map_iter(|chunk| {
                let mut last: Option<u32> = None;
                let mut tariff: Option<(*const u8, i32)> = None;
                let find = &find;
                chunk.iter().filter_map(move |p| {
                    let i = find.find(&p.account_id, last)?;
                    last = Some(i);
                    let a = &accounts[i as usize];
                    let id = a.tariff_id.as_ptr();
                    let offset = match tariff {
                        Some((t, o)) if t == id => o,
                        _ => {
                            let o = tariffs.get(&a.tariff_id).map_or(0, |t| t.utc_offset_secs);
                            tariff = Some((id, o));
                            o
                        }
                    };
                    let ms = p.paid_at.timestamp_millis();
                    let (date, _) = super::period::local_date_minute(ms, offset);
                    Some((i, date, p.amount))
                })
            })
            .collect();
        // A counting sort by account keeps file order within each account.
        let mut at = vec![0u32; accounts.len() + 1];
        for k in &keyed {
            at[k.0 as usize + 1] += 1;
        }
        for i in 1..at.len() {
            at[i] += at[i - 1];
        }
        let mut next = at.clone();
        let mut all = vec![(NaiveDate::MIN, Decimal::ZERO); keyed.len()];
        for &(i, d, x) in &keyed {
            let slot = &mut next[i as usize];
            all[*slot as usize] = (d, x);
            *slot += 1;
        }
        drop(keyed);
        // Then (day, amount) within an account; stable, so equal payments
        // keep their order in the file.
        let mut rest = &mut all[..];
        let mut slices = Vec::new();
        for w in at.windows(2) {
            let (s, r) = rest.split_at_mut((w[1] - w[0]) as usize);
            if s.len() > 1 {
                slices.push(s);
            }
            rest = r;
        }
        slices.par_iter_mut().for_each(|s| {
            if !s.is_sorted() {
                s.sort();
            }
        });
        Payments { all, at, accounts }
    }

    /// The payments of the account at `index` of the accounts grouped for.
    fn of_index(&self, index: usize) -> &[(NaiveDate, Decimal)] {
        match (self.at.get(index), self.at.get(index + 1)) {
            (Some(&s), Some(&e)) => &self.all[s as usize..e as usize],
            _ => &[],
        }
    }

    /// The payments of `a`, an element of the accounts grouped for.
    pub fn of(&self, a: &BillingAccount) -> &[(NaiveDate, Decimal)] {
        let size = std::mem::size_of::<BillingAccount>();
        let i = (a as *const BillingAccount as usize).wrapping_sub(self.accounts.as_ptr() as usize)
            / size;
        match self.accounts.get(i) {
            Some(x) if std::ptr::eq(x, a) => self.of_index(i),
            _ => {
                debug_assert!(
                    self.at.is_empty(),
                    "an account payments were not grouped for"
                );
                &[]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::master::{CustomerClass, PaymentMode};
    use rust_decimal_macros::dec;

    fn account(id: &str) -> BillingAccount {
        BillingAccount {
            account_id: id.into(),
            customer_class: CustomerClass::Residential,
            tariff_id: "bj-residential-monthly".into(),
            payment_mode: PaymentMode::Postpaid,
            contracted_kva: Decimal::ZERO,
            opened_on: NaiveDate::MIN,
        }
    }

    fn pay(id: &str, at: &str, amount: Decimal) -> BillingPayment {
        BillingPayment {
            account_id: id.into(),
            amount,
            paid_at: at.parse().unwrap(),
        }
    }

    fn d(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    fn grouped(accounts: &[BillingAccount]) -> Vec<Vec<(NaiveDate, Decimal)>> {
        let rows = [
            pay("B", "2026-10-05T02:00:00Z", dec!(30)),
            pay("A", "2026-10-09T00:00:00Z", dec!(5.00)),
            pay("X", "2026-10-01T00:00:00Z", dec!(1)),
            pay("A", "2026-10-03T00:00:00Z", dec!(7)),
            pay("A", "2026-10-09T00:00:00Z", dec!(5)),
            pay("A", "2026-10-09T00:00:00Z", dec!(4)),
            // 16:30 UTC is the next day at +8.
            pay("B", "2026-10-04T16:30:00Z", dec!(20)),
        ];
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tariffs");
        let tariffs = crate::tariff::load_dir(&dir).unwrap();
        let p = Payments::new(&rows, accounts, &tariffs);
        accounts.iter().map(|a| p.of(a).to_vec()).collect()
    }

    #[test]
    fn payments_are_grouped_by_account_and_local_day_in_sorted_or_unsorted_accounts() {
        let a = vec![
            (d("2026-10-03"), dec!(7)),
            (d("2026-10-09"), dec!(4)),
            (d("2026-10-09"), dec!(5.00)),
            (d("2026-10-09"), dec!(5)),
        ];
        let b = vec![(d("2026-10-05"), dec!(20)), (d("2026-10-05"), dec!(30))];
        let sorted = grouped(&[account("A"), account("B"), account("C")]);
        assert_eq!(sorted, [a.clone(), b.clone(), vec![]]);
        // Equal amounts keep their file order (5.00 before 5).
        assert_eq!(sorted[0][2].1.scale(), 2);
        let unsorted = grouped(&[account("C"), account("B"), account("A")]);
        assert_eq!(unsorted, [vec![], b.clone(), a.clone()]);
        // An id listed twice: its last row has the payments, as it is billed.
        let twice = grouped(&[account("A"), account("B"), account("A")]);
        assert_eq!(twice, [vec![], b, a]);
    }
}
