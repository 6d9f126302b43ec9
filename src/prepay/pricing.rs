//! What a deduction costs: a small [`Pricer`] trait and its adapter over the
//! tariff engine ([`crate::tariff::price::incremental_charge`]).
//!
//! Positions are kWh consumed since the start of the accumulation window (the
//! local calendar month for monthly tiers and flat prices, the tier year for
//! annual tiers). The charge for moving from `before` to `after` is
//! `f(after) - f(before)` with `f` the engine's rounded energy charge, so the
//! charges of a window telescope to exactly the window's energy bill.

use std::collections::HashMap;

use chrono::{Datelike, NaiveDate};
use rust_decimal::Decimal;

use crate::master::Account;
use crate::tariff::price::{incremental_charge, total, Usage};
use crate::tariff::tiered::{Accumulation, Tiers};
use crate::tariff::{Tariff, TariffSet};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PriceError {
    #[error("unknown tariff '{0}'")]
    UnknownTariff(String),
    #[error("tariff '{tariff}' has no version on {date}")]
    NoVersion { tariff: String, date: NaiveDate },
    #[error("tariff '{0}' is time-of-use without a tariff-register map: its prepaid deductions come from 15-minute interval readings (import_active_interval), not from register T1..T4 snapshots")]
    Unsupported(String),
    #[error("tariff '{tariff}': {reason}")]
    Calendar { tariff: String, reason: String },
}

/// An accumulation window `[start_ms, end_ms)` and its effective tier limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub start_ms: i64,
    pub end_ms: i64,
    pub limits: Vec<Decimal>,
}

/// A priced increment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    /// Yuan, >= 0 for consumption.
    pub amount: Decimal,
    /// `tariff@version`, part of the idempotency key.
    pub version: String,
}

pub trait Pricer {
    /// The window containing instant `ts_ms` (start inclusive).
    fn window(&self, account: &Account, ts_ms: i64) -> Result<Window, PriceError>;
    /// Charge for the positions `before..after` (kWh since window start, in
    /// total and per TOU period) of an interval ending at `end_ms` inside `window`.
    fn charge(
        &self,
        account: &Account,
        window: &Window,
        end_ms: i64,
        before: &Usage,
        after: &Usage,
    ) -> Result<Charge, PriceError>;
    /// For a time-of-use tariff in effect for the interval ending at
    /// `end_ms`: the TOU period of each tariff register T1..T4. None when
    /// prices do not depend on the time of use. Like [`Pricer::intervals`],
    /// it answers from the account's tariff and the time alone (the run asks
    /// once per tariff).
    fn registers(
        &self,
        _account: &Account,
        _end_ms: i64,
    ) -> Result<Option<[Option<u8>; 4]>, PriceError> {
        Ok(None)
    }
    /// True when the tariff in effect for the interval ending at `end_ms`
    /// prices by time of use but maps no tariff registers: deductions then
    /// come from interval readings, each assigned to its TOU period.
    fn intervals(&self, _account: &Account, _end_ms: i64) -> Result<bool, PriceError> {
        Ok(false)
    }
    /// The TOU period index of the instant `start_ms` (an interval's start).
    fn period_at(&self, _account: &Account, _start_ms: i64) -> Result<usize, PriceError> {
        Ok(0)
    }
    /// The local time of the account's tariff, as seconds east of UTC
    /// (local dates: whether a meter was in service at an instant).
    fn utc_offset_secs(&self, _account: &Account) -> Result<i32, PriceError> {
        Ok(0)
    }
}

/// The adapter over the tariff engine.
pub struct TariffPricer {
    pub set: TariffSet,
    /// Windows computed so far (tariff, opened_on, window start date) -> window.
    cache: std::sync::Mutex<HashMap<(String, NaiveDate, i64), Window>>,
}

impl TariffPricer {
    pub fn new(set: TariffSet) -> TariffPricer {
        TariffPricer {
            set,
            cache: Default::default(),
        }
    }

    fn tariff(&self, id: &str) -> Result<&Tariff, PriceError> {
        self.set
            .tariffs
            .get(id)
            .ok_or_else(|| PriceError::UnknownTariff(id.to_string()))
    }
}

/// Same local-time rules as the bill run, so deductions and bills agree.
pub use crate::billing::period::{local_date_minute, local_midnight_ms};

pub fn next_month(d: NaiveDate) -> NaiveDate {
    let (y, m) = if d.month() == 12 {
        (d.year() + 1, 1)
    } else {
        (d.year(), d.month() + 1)
    };
    NaiveDate::from_ymd_opt(y, m, 1).expect("valid")
}

fn days_between(a: NaiveDate, b: NaiveDate) -> i64 {
    (b - a).num_days()
}

impl Pricer for TariffPricer {
    fn window(&self, account: &Account, ts_ms: i64) -> Result<Window, PriceError> {
        let t = self.tariff(&account.tariff_id)?;
        let off = t.utc_offset_secs;
        let (date, _) = local_date_minute(ts_ms, off);
        let month_start = NaiveDate::from_ymd_opt(date.year(), date.month(), 1).expect("valid");
        let key = (
            t.id.clone(),
            account.opened_on,
            local_midnight_ms(month_start, off),
        );
        if let Some(w) = self.cache.lock().expect("not poisoned").get(&key) {
            if ts_ms >= w.start_ms && ts_ms < w.end_ms {
                return Ok(w.clone());
            }
        }
        let v = t.version_on(date).map_err(|_| PriceError::NoVersion {
            tariff: t.id.clone(),
            date,
        })?;
        let w = match &v.tiers {
            Some(Tiers {
                accumulation: Accumulation::Annual { start_month },
                limits,
                ..
            }) => {
                let year_start = Tiers::tier_year_start(*start_month, date);
                let year_end =
                    NaiveDate::from_ymd_opt(year_start.year() + 1, year_start.month(), 1)
                        .expect("valid");
                let start = year_start.max(account.opened_on);
                let limits = if start > year_start {
                    Tiers::prorate(
                        limits,
                        days_between(start, year_end),
                        days_between(year_start, year_end),
                    )
                } else {
                    limits.clone()
                };
                Window {
                    start_ms: local_midnight_ms(start, off),
                    end_ms: local_midnight_ms(year_end, off),
                    limits,
                }
            }
            tiers => Window {
                start_ms: local_midnight_ms(month_start, off),
                end_ms: local_midnight_ms(next_month(month_start), off),
                limits: tiers.as_ref().map(|t| t.limits.clone()).unwrap_or_default(),
            },
        };
        self.cache
            .lock()
            .expect("not poisoned")
            .insert(key, w.clone());
        Ok(w)
    }

    fn charge(
        &self,
        account: &Account,
        window: &Window,
        end_ms: i64,
        before: &Usage,
        after: &Usage,
    ) -> Result<Charge, PriceError> {
        let t = self.tariff(&account.tariff_id)?;
        // The version in effect on the local day the interval ends in.
        let (date, _) = local_date_minute(end_ms - 1, t.utc_offset_secs);
        let v = t.version_on(date).map_err(|_| PriceError::NoVersion {
            tariff: t.id.clone(),
            date,
        })?;
        let lines = incremental_charge(v, &window.limits, &Usage::default(), before, after);
        Ok(Charge {
            amount: total(&lines),
            version: format!("{}@{}", t.id, v.id),
        })
    }

    fn registers(
        &self,
        account: &Account,
        end_ms: i64,
    ) -> Result<Option<[Option<u8>; 4]>, PriceError> {
        self.tou_registers(account, end_ms)
    }

    fn intervals(&self, account: &Account, end_ms: i64) -> Result<bool, PriceError> {
        match self.tou_registers(account, end_ms) {
            Err(PriceError::Unsupported(_)) => Ok(true),
            other => other.map(|_| false),
        }
    }

    fn utc_offset_secs(&self, account: &Account) -> Result<i32, PriceError> {
        Ok(self.tariff(&account.tariff_id)?.utc_offset_secs)
    }

    fn period_at(&self, account: &Account, start_ms: i64) -> Result<usize, PriceError> {
        let t = self.tariff(&account.tariff_id)?;
        let (date, minute) = local_date_minute(start_ms, t.utc_offset_secs);
        let v = t.version_on(date).map_err(|_| PriceError::NoVersion {
            tariff: t.id.clone(),
            date,
        })?;
        match &v.tou {
            Some(tou) => tou
                .period_at(date, minute)
                .map(usize::from)
                .map_err(|reason| PriceError::Calendar {
                    tariff: t.id.clone(),
                    reason,
                }),
            None => Ok(0),
        }
    }
}

impl TariffPricer {
    /// [`Pricer::registers`] of the tariff engine.
    fn tou_registers(
        &self,
        account: &Account,
        end_ms: i64,
    ) -> Result<Option<[Option<u8>; 4]>, PriceError> {
        let t = self.tariff(&account.tariff_id)?;
        let (date, _) = local_date_minute(end_ms - 1, t.utc_offset_secs);
        let v = t.version_on(date).map_err(|_| PriceError::NoVersion {
            tariff: t.id.clone(),
            date,
        })?;
        match &v.tou {
            None => Ok(None),
            Some(tou) if tou.registers.iter().any(|r| r.is_some()) => Ok(Some(tou.registers)),
            Some(_) => Err(PriceError::Unsupported(t.id.clone())),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::tariff::price::energy_charge;
    use proptest::prelude::*;
    use rust_decimal_macros::dec;

    fn pricer() -> TariffPricer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tariffs");
        TariffPricer::new(crate::tariff::load_dir(&dir).expect("sample tariffs load"))
    }

    pub(crate) fn account(tariff: &str) -> Account {
        Account {
            account_id: "A1".into(),
            name: String::new(),
            phone: String::new(),
            id_number: String::new(),
            address: String::new(),
            district: String::new(),
            age_band: String::new(),
            occupation: String::new(),
            gender: String::new(),
            customer_class: crate::master::CustomerClass::Residential,
            tariff_id: tariff.into(),
            payment_mode: crate::master::PaymentMode::Prepaid,
            contracted_kva: Decimal::ZERO,
            household_size: 3,
            opened_on: NaiveDate::from_ymd_opt(2015, 1, 1).unwrap(),
        }
    }

    #[test]
    fn monthly_window_is_the_local_calendar_month() {
        let p = pricer();
        let a = account("bj-residential-monthly");
        // 2026-10-15T00:00Z is 08:00 local on 15 October.
        let w = p.window(&a, 1_792_022_400_000).unwrap();
        let start = local_midnight_ms(NaiveDate::from_ymd_opt(2026, 10, 1).unwrap(), 8 * 3600);
        let end = local_midnight_ms(NaiveDate::from_ymd_opt(2026, 11, 1).unwrap(), 8 * 3600);
        assert_eq!((w.start_ms, w.end_ms), (start, end));
        assert_eq!(w.limits, vec![dec!(240), dec!(400)]);
    }

    #[test]
    fn tier_crossing_inside_one_day_is_priced_by_tier() {
        let p = pricer();
        let a = account("bj-residential-monthly");
        let w = p.window(&a, 1_792_022_400_000).unwrap();
        let c = p
            .charge(
                &a,
                &w,
                w.start_ms + 86_400_000,
                &Usage::total(dec!(230)),
                &Usage::total(dec!(250)),
            )
            .unwrap();
        let t = p.set.get("bj-residential-monthly").unwrap();
        let v = t
            .version_on(NaiveDate::from_ymd_opt(2026, 10, 1).unwrap())
            .unwrap();
        let f = |x| {
            total(&energy_charge(
                v,
                &w.limits,
                &Usage::default(),
                &Usage::total(x),
            ))
        };
        assert_eq!(c.amount, f(dec!(250)) - f(dec!(230)));
        // 10 kWh at 0.4883 and 10 at 0.5383 (about 10.27): more than 20 kWh of tier 1 (9.77).
        assert!(
            c.amount > dec!(10.2) && c.amount < dec!(10.3),
            "{}",
            c.amount
        );
        assert_eq!(c.version, "bj-residential-monthly@2012-07");
    }

    proptest! {
        #[test]
        fn daily_deductions_add_up_to_the_monthly_bill(days in proptest::collection::vec(0u32..4000, 1..31)) {
            let p = pricer();
            let a = account("bj-residential-monthly");
            let w = p.window(&a, 1_792_022_400_000).unwrap();
            let mut pos = Decimal::ZERO;
            let mut sum = Decimal::ZERO;
            for (i, d) in days.iter().enumerate() {
                let next = pos + Decimal::new(*d as i64, 2);
                sum += p.charge(&a, &w, w.start_ms + (i as i64 + 1) * 86_400_000, &Usage::total(pos), &Usage::total(next)).unwrap().amount;
                pos = next;
            }
            let t = p.set.get("bj-residential-monthly").unwrap();
            let v = t.version_on(NaiveDate::from_ymd_opt(2026, 10, 1).unwrap()).unwrap();
            let bill = total(&energy_charge(v, &w.limits, &Usage::default(), &Usage::total(pos)));
            prop_assert_eq!(sum, bill);
        }
    }
}
