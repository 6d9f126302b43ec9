//! Payments as the bill run's late fees use them: grouped by account, by
//! local day.

use chrono::NaiveDate;
use rust_decimal::Decimal;

use crate::master::BillingAccount;
use crate::store::scan::FxMap;
use crate::tariff::TariffSet;

/// Payments of known accounts by local day, sorted per account by (day,
/// amount), file order among equals.
#[derive(Default)]
pub struct Payments<'a> {
    all: Vec<(NaiveDate, Decimal)>,
    of: FxMap<&'a str, std::ops::Range<usize>>,
}

impl<'a> Payments<'a> {
    pub fn new(
        rows: &[crate::master::BillingPayment],
        accounts: &'a [BillingAccount],
        by_id: &FxMap<&str, u32>,
        tariffs: &TariffSet,
    ) -> Payments<'a> {
        use rayon::prelude::*;
        // Accounts of one tariff share its id (interned): its offset is
        // looked up once per run of equal ids, not once per payment.
        let mut keyed: Vec<(u32, NaiveDate, Decimal)> = rows
            .par_chunks(64 * 1024)
            .flat_map_iter(|chunk| {
                let mut last: Option<(*const u8, i32)> = None;
                chunk.iter().filter_map(move |p| {
                    let &i = by_id.get(&*p.account_id)?;
                    let a = &accounts[i as usize];
                    let id = a.tariff_id.as_ptr();
                    let offset = match last {
                        Some((t, o)) if t == id => o,
                        _ => {
                            let o = tariffs.get(&a.tariff_id).map_or(0, |t| t.utc_offset_secs);
                            last = Some((id, o));
                            o
                        }
                    };
                    let ms = p.paid_at.timestamp_millis();
                    let (date, _) = super::period::local_date_minute(ms, offset);
                    Some((i, date, p.amount))
                })
            })
            .collect();
        // Stable: equal amounts keep their order in the file.
        keyed.par_sort_by(|x, y| (x.0, x.1, x.2).cmp(&(y.0, y.1, y.2)));
        let mut of = FxMap::default();
        let mut all = Vec::with_capacity(keyed.len());
        for run in keyed.chunk_by(|x, y| x.0 == y.0) {
            let from = all.len();
            all.extend(run.iter().map(|&(_, d, x)| (d, x)));
            of.insert(&*accounts[run[0].0 as usize].account_id, from..all.len());
        }
        Payments { all, of }
    }

    pub fn of(&self, account: &str) -> &[(NaiveDate, Decimal)] {
        self.of
            .get(account)
            .map_or(&[][..], |r| &self.all[r.clone()])
    }
}
