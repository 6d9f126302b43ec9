//! Arrears risk: a transparent points model. Each factor adds points; the
//! score is their sum and every contribution is stored, so an operator can
//! see why an account is high risk. Points and bands: docs/analytics.md.

use chrono::NaiveDate;

/// What the model knows about one postpaid account on the scoring day.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RiskFacts {
    /// Days from bill to payment of each bill paid before the scoring day.
    pub days_to_pay: Vec<i64>,
    /// Bills issued at least `GRACE_DAYS` before the scoring day and not paid since.
    pub overdue_bills: u32,
    /// Any payment on record before the scoring day.
    pub has_payment: bool,
    /// Every payment made at the counter (no automatic channel).
    pub counter_only: bool,
    /// Latest month (or projection) over usual use, when known.
    pub usage_ratio: Option<f64>,
    pub opened_on: Option<NaiveDate>,
}

/// Days after the bill date a payment counts as on time.
pub const GRACE_DAYS: i64 = 15;

pub const FACTORS: [&str; 6] = [
    "pts_late_history",
    "pts_overdue",
    "pts_no_payment",
    "pts_usage_jump",
    "pts_counter_only",
    "pts_new_account",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RiskScore {
    /// Points per factor, in `FACTORS` order.
    pub points: [i64; 6],
    pub score: i64,
    pub band: &'static str,
}

pub fn band(score: i64) -> &'static str {
    match score {
        s if s >= 40 => "high",
        s if s >= 20 => "medium",
        _ => "low",
    }
}

pub fn score(f: &RiskFacts, on: NaiveDate) -> RiskScore {
    // Mean > t compared as sum > t x n: exact (a mean of 10.5 is over 10).
    let n = f.days_to_pay.len() as i128;
    let sum: i128 = f.days_to_pay.iter().map(|d| *d as i128).sum();
    let late = [30, 20, 10]
        .into_iter()
        .find(|t| n > 0 && sum > t * n)
        .unwrap_or(0) as i64;
    let overdue = (25 * f.overdue_bills as i64).min(50);
    let no_payment = if f.has_payment { 0 } else { 15 };
    let jump = match f.usage_ratio {
        Some(r) if r > 1.5 => 10,
        _ => 0,
    };
    let counter = if f.counter_only { 5 } else { 0 };
    let new = match f.opened_on {
        Some(d) if (on - d).num_days() < 365 => 10,
        _ => 0,
    };
    let points = [late, overdue, no_payment, jump, counter, new];
    let score = points.iter().sum();
    RiskScore {
        points,
        score,
        band: band(score),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    #[test]
    fn a_prompt_payer_with_history_scores_low() {
        let f = RiskFacts {
            days_to_pay: vec![3, 5],
            has_payment: true,
            opened_on: Some(day("2015-01-01")),
            ..Default::default()
        };
        let s = score(&f, day("2026-10-31"));
        assert_eq!(s.score, 0);
        assert_eq!(s.band, "low");
    }

    #[test]
    fn overdue_bills_and_late_history_add_up_to_high() {
        let f = RiskFacts {
            days_to_pay: vec![25, 35],
            overdue_bills: 1,
            has_payment: true,
            ..Default::default()
        };
        let s = score(&f, day("2026-10-31"));
        assert_eq!(s.points, [20, 25, 0, 0, 0, 0]);
        assert_eq!(s.band, "high");
    }

    #[test]
    fn a_mean_delay_just_over_a_threshold_earns_its_points() {
        let late = |days: Vec<i64>| {
            let f = RiskFacts {
                days_to_pay: days,
                has_payment: true,
                ..Default::default()
            };
            score(&f, day("2026-10-31")).points[0]
        };
        assert_eq!(late(vec![10, 11]), 10, "mean 10.5 is over 10");
        assert_eq!(late(vec![10, 10]), 0, "mean 10 is not");
        assert_eq!(late(vec![20, 21]), 20);
        assert_eq!(late(vec![30, 31]), 30);
        assert_eq!(late(vec![]), 0);
    }

    #[test]
    fn overdue_points_are_capped() {
        let f = RiskFacts {
            overdue_bills: 5,
            has_payment: true,
            ..Default::default()
        };
        assert_eq!(score(&f, day("2026-10-31")).points[1], 50);
    }
}
