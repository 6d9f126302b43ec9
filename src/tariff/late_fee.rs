//! Late-payment fees for postpaid accounts.
//!
//! Residential: 1 per mille of the overdue amount per day. Others: 2 per mille
//! per day for arrears of the current year, 3 per mille for earlier years'.
//! A fee is at least the minimum (1 yuan) once any is due.

use chrono::{Datelike, NaiveDate};
use rust_decimal::Decimal;

#[derive(Debug, Clone, PartialEq)]
pub struct LateFeeRule {
    /// Daily rate for residential accounts (0.001).
    pub residential_daily: Decimal,
    /// Daily rate for other accounts' arrears of the current year (0.002).
    pub current_year_daily: Decimal,
    /// Daily rate for other accounts' arrears of earlier years (0.003).
    pub earlier_years_daily: Decimal,
    /// Smallest fee charged (1 yuan).
    pub minimum: Decimal,
    /// A bill is due this many days after its period ends; the fee runs from the day after.
    pub due_days: u32,
}

impl Default for LateFeeRule {
    fn default() -> Self {
        LateFeeRule {
            residential_daily: Decimal::new(1, 3),
            current_year_daily: Decimal::new(2, 3),
            earlier_years_daily: Decimal::new(3, 3),
            minimum: Decimal::ONE,
            due_days: 15,
        }
    }
}

/// One unpaid amount and the date it fell due.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Arrear {
    pub due: NaiveDate,
    pub amount: Decimal,
}

impl LateFeeRule {
    /// Exact (unrounded) fee for `arrears` assessed on `as_of`: days overdue
    /// are the days after the due date up to and including `as_of`.
    pub fn fee(&self, residential: bool, arrears: &[Arrear], as_of: NaiveDate) -> Decimal {
        let mut fee = Decimal::ZERO;
        for a in arrears {
            let days = (as_of - a.due).num_days();
            if days <= 0 || a.amount <= Decimal::ZERO {
                continue;
            }
            let rate = if residential {
                self.residential_daily
            } else if a.due.year() == as_of.year() {
                self.current_year_daily
            } else {
                self.earlier_years_daily
            };
            fee += a.amount * rate * Decimal::from(days);
        }
        if fee > Decimal::ZERO && fee < self.minimum {
            self.minimum
        } else {
            fee
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    fn d(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[test]
    fn residential_one_per_mille_with_a_one_yuan_floor() {
        let r = LateFeeRule::default();
        let a = [Arrear {
            due: d("2026-10-15"),
            amount: dec!(200),
        }];
        assert_eq!(r.fee(true, &a, d("2026-10-25")), dec!(2.000));
        assert_eq!(r.fee(true, &a, d("2026-10-17")), dec!(1)); // 0.40 -> minimum
        assert_eq!(r.fee(true, &a, d("2026-10-15")), dec!(0));
    }

    #[test]
    fn others_pay_more_for_earlier_years() {
        let r = LateFeeRule::default();
        let a = [
            Arrear {
                due: d("2025-12-20"),
                amount: dec!(1000),
            },
            Arrear {
                due: d("2026-01-05"),
                amount: dec!(1000),
            },
        ];
        // 2025 arrear: 20 days x 3 per mille = 60; 2026: 4 days x 2 per mille = 8.
        assert_eq!(r.fee(false, &a, d("2026-01-09")), dec!(68.000));
    }
}
