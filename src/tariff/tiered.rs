//! Tiered (block) energy charges: inclusive tier limits, monthly or annual
//! accumulation, proration of limits for periods that are not a whole month
//! and for tier years that start mid-way.
//!
//! Positions are cumulative kWh from the start of the accumulation window
//! (the bill period for monthly tiers, the tier year for annual ones). Limits
//! are inclusive upper bounds: with a limit of 240, kWh number 240 is tier 1
//! and kWh 241 is tier 2. With continuous quantities this is simply
//! `tier1 = min(x, 240)`, `tier2 = clamp(x - 240, 0, 400 - 240)`, ...: tier 2
//! spans 160 kWh (241..=400), not 159.

use chrono::{Datelike, NaiveDate};
use rust_decimal::{Decimal, RoundingStrategy};

/// Where tier positions accumulate from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accumulation {
    /// Limits per month; the position restarts at each bill period.
    Monthly,
    /// Limits per tier year starting on day 1 of `start_month`.
    Annual { start_month: u32 },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tiers {
    pub accumulation: Accumulation,
    /// Inclusive upper limits of tiers 1..n-1 (kWh per month or per year), ascending.
    pub limits: Vec<Decimal>,
    /// Price added per kWh in each tier; `surcharges[0]` is normally 0.
    /// Length is `limits.len() + 1`.
    pub surcharges: Vec<Decimal>,
}

impl Tiers {
    pub fn count(&self) -> usize {
        self.limits.len() + 1
    }

    /// The start of the tier year containing `date` (annual accumulation).
    pub fn tier_year_start(start_month: u32, date: NaiveDate) -> NaiveDate {
        let y = if date.month() >= start_month {
            date.year()
        } else {
            date.year() - 1
        };
        NaiveDate::from_ymd_opt(y, start_month, 1).expect("valid month")
    }

    /// Limits for a window of `days` when a whole window has `whole_days`;
    /// `None` when no proration applies. Monthly limits prorate by `days / 30`
    /// for periods that are not a calendar month (45 days -> 1.5 x limit);
    /// annual ones by days left in the tier year over its length.
    pub fn prorate(limits: &[Decimal], days: i64, whole_days: i64) -> Vec<Decimal> {
        limits
            .iter()
            .map(|l| {
                (*l * Decimal::from(days) / Decimal::from(whole_days))
                    .round_dp_with_strategy(0, RoundingStrategy::MidpointAwayFromZero)
            })
            .collect()
    }
}

/// kWh of position `x` that falls in tier `i` under `limits` (inclusive).
pub fn in_tier(limits: &[Decimal], i: usize, x: Decimal) -> Decimal {
    let lo = if i == 0 { Decimal::ZERO } else { limits[i - 1] };
    let v = (x - lo).max(Decimal::ZERO);
    match limits.get(i) {
        Some(hi) => v.min(*hi - lo),
        None => v,
    }
}

/// kWh of consumption between positions `from` and `to` that falls in tier `i`.
pub fn in_tier_between(limits: &[Decimal], i: usize, from: Decimal, to: Decimal) -> Decimal {
    in_tier(limits, i, to) - in_tier(limits, i, from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    const L: [Decimal; 2] = [dec!(240), dec!(400)];

    #[test]
    fn limits_are_inclusive() {
        assert_eq!(in_tier(&L, 0, dec!(240)), dec!(240));
        assert_eq!(in_tier(&L, 1, dec!(240)), dec!(0));
        assert_eq!(in_tier(&L, 1, dec!(241)), dec!(1));
        assert_eq!(in_tier(&L, 1, dec!(400)), dec!(160));
        assert_eq!(in_tier(&L, 2, dec!(401)), dec!(1));
    }

    #[test]
    fn tier_quantities_between_positions_add_up() {
        let (a, b) = (dec!(100.5), dec!(523.25));
        let sum: Decimal = (0..3).map(|i| in_tier_between(&L, i, a, b)).sum();
        assert_eq!(sum, b - a);
    }

    #[test]
    fn proration_by_days() {
        assert_eq!(Tiers::prorate(&L, 45, 30), vec![dec!(360), dec!(600)]);
        assert_eq!(Tiers::prorate(&[dec!(2880)], 92, 365), vec![dec!(726)]);
    }

    #[test]
    fn tier_year_start_wraps() {
        let d = NaiveDate::from_ymd_opt(2026, 2, 3).unwrap();
        assert_eq!(
            Tiers::tier_year_start(1, d),
            NaiveDate::from_ymd_opt(2026, 1, 1).unwrap()
        );
        assert_eq!(
            Tiers::tier_year_start(7, d),
            NaiveDate::from_ymd_opt(2025, 7, 1).unwrap()
        );
    }
}
