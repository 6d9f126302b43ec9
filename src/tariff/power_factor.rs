//! Power-factor adjustment (功率因数调整电费, the 1983 rule of the Ministry of
//! Water Resources and Electric Power and the State Price Bureau,
//! (83)水电财字第215号, tables 1-3).
//!
//! The monthly power factor is `kWh / sqrt(kWh^2 + kvarh^2)` rounded to two
//! decimals half up (the rule: "two decimals, round the rest"). The bill's
//! adjustable base (basic charge + energy charge) is multiplied by the
//! percentage looked up in the table of the customer's standard. Negative
//! percentages are reductions.
//!
//! The three tables are written out row by row below, exactly as published:
//! no row is extrapolated from another standard. Below the last row, every
//! further 0.01 adds 2% (the rule's footnote to each table).

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;

/// The standard value a customer is assessed against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PfStandard {
    /// 0.90: high-voltage industrial users of 160 kVA and above, HV users with
    /// on-load tap changers, HV irrigation stations of 3200 kVA and above.
    P90,
    /// 0.85: other industrial and non-industrial users of 100 kVA (kW) and above.
    P85,
    /// 0.80: agricultural and wholesale (趸售) users of 100 kVA (kW) and above.
    P80,
}

/// One table row: for a rounded power factor (in hundredths) at or above
/// `from`, the adjustment is `percent_x100 / 100` percent.
#[derive(Debug, Clone, Copy)]
pub struct Row {
    pub from: u32,
    pub percent_x100: i32,
}

const fn r(from: u32, percent_x100: i32) -> Row {
    Row { from, percent_x100 }
}

/// Table 1, standard 0.90. Reductions 0.15% per 0.01 up to 0.75% from 0.95;
/// increases 0.5% per 0.01 down to 0.70, then 1% per 0.01 down to 0.65.
pub const TABLE_090: &[Row] = &[
    r(95, -75),
    r(94, -60),
    r(93, -45),
    r(92, -30),
    r(91, -15),
    r(90, 0),
    r(89, 50),
    r(88, 100),
    r(87, 150),
    r(86, 200),
    r(85, 250),
    r(84, 300),
    r(83, 350),
    r(82, 400),
    r(81, 450),
    r(80, 500),
    r(79, 550),
    r(78, 600),
    r(77, 650),
    r(76, 700),
    r(75, 750),
    r(74, 800),
    r(73, 850),
    r(72, 900),
    r(71, 950),
    r(70, 1000),
    r(69, 1100),
    r(68, 1200),
    r(67, 1300),
    r(66, 1400),
    r(65, 1500),
];

/// Table 2, standard 0.85. Reductions 0.1% per 0.01 up to 0.90 (0.5%), then
/// 0.15% per 0.01 up to 1.1% from 0.94; increases 0.5% per 0.01 down to 0.65,
/// then 1% per 0.01 down to 0.60.
pub const TABLE_085: &[Row] = &[
    r(94, -110),
    r(93, -95),
    r(92, -80),
    r(91, -65),
    r(90, -50),
    r(89, -40),
    r(88, -30),
    r(87, -20),
    r(86, -10),
    r(85, 0),
    r(84, 50),
    r(83, 100),
    r(82, 150),
    r(81, 200),
    r(80, 250),
    r(79, 300),
    r(78, 350),
    r(77, 400),
    r(76, 450),
    r(75, 500),
    r(74, 550),
    r(73, 600),
    r(72, 650),
    r(71, 700),
    r(70, 750),
    r(69, 800),
    r(68, 850),
    r(67, 900),
    r(66, 950),
    r(65, 1000),
    r(64, 1100),
    r(63, 1200),
    r(62, 1300),
    r(61, 1400),
    r(60, 1500),
];

/// Table 3, standard 0.80. Reductions 0.1% per 0.01 up to 0.90 (1.0%), 1.15%
/// at 0.91, 1.3% from 0.92; increases 0.5% per 0.01 down to 0.60, then 1% per
/// 0.01 down to 0.55.
pub const TABLE_080: &[Row] = &[
    r(92, -130),
    r(91, -115),
    r(90, -100),
    r(89, -90),
    r(88, -80),
    r(87, -70),
    r(86, -60),
    r(85, -50),
    r(84, -40),
    r(83, -30),
    r(82, -20),
    r(81, -10),
    r(80, 0),
    r(79, 50),
    r(78, 100),
    r(77, 150),
    r(76, 200),
    r(75, 250),
    r(74, 300),
    r(73, 350),
    r(72, 400),
    r(71, 450),
    r(70, 500),
    r(69, 550),
    r(68, 600),
    r(67, 650),
    r(66, 700),
    r(65, 750),
    r(64, 800),
    r(63, 850),
    r(62, 900),
    r(61, 950),
    r(60, 1000),
    r(59, 1100),
    r(58, 1200),
    r(57, 1300),
    r(56, 1400),
    r(55, 1500),
];

impl PfStandard {
    pub fn table(self) -> &'static [Row] {
        match self {
            PfStandard::P90 => TABLE_090,
            PfStandard::P85 => TABLE_085,
            PfStandard::P80 => TABLE_080,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PfStandard::P90 => "0.90",
            PfStandard::P85 => "0.85",
            PfStandard::P80 => "0.80",
        }
    }

    /// Adjustment in percent (negative = reduction) for a power factor in
    /// hundredths (`87` = 0.87), straight from the table.
    pub fn percent(self, pf_hundredths: u32) -> Decimal {
        let table = self.table();
        for row in table {
            if pf_hundredths >= row.from {
                return Decimal::new(row.percent_x100 as i64, 2);
            }
        }
        let last = table[table.len() - 1];
        let below = (last.from - pf_hundredths) as i64;
        Decimal::new(last.percent_x100 as i64 + 200 * below, 2)
    }
}

impl FromStr for PfStandard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "0.90" | "0.9" => Ok(PfStandard::P90),
            "0.85" => Ok(PfStandard::P85),
            "0.80" | "0.8" => Ok(PfStandard::P80),
            other => Err(format!(
                "power factor standard must be 0.90, 0.85 or 0.80 (got {other})"
            )),
        }
    }
}

impl fmt::Display for PfStandard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Monthly power factor rounded half up to hundredths, computed exactly
/// (no square root, no float): the result is the largest `k` with
/// `kWh / sqrt(kWh^2 + kvarh^2) >= (k - 0.5) / 100`, i.e.
/// `40000 kWh^2 >= (2k - 1)^2 (kWh^2 + kvarh^2)`.
/// `None` when both quantities are zero (no consumption: no adjustment).
pub fn monthly_pf_hundredths(kwh: Decimal, kvarh: Decimal) -> Option<u32> {
    let p = kwh.abs();
    let q = kvarh.abs();
    if p.is_zero() && q.is_zero() {
        return None;
    }
    // Scale both to integers with a common scale, then work in i128 / u128.
    let scale = p.scale().max(q.scale());
    let mut pi = p;
    pi.rescale(scale);
    let mut qi = q;
    qi.rescale(scale);
    let (pm, qm) = (pi.mantissa() as u128, qi.mantissa() as u128);
    let (p2, s2) = match (pm.checked_mul(pm), qm.checked_mul(qm)) {
        (Some(a), Some(b)) => (a, a.checked_add(b)),
        _ => (0, None),
    };
    match s2.and_then(|s| p2.checked_mul(40000).map(|l| (l, s))) {
        Some((lhs, sum)) => {
            let mut k = 100u32;
            while k > 0 {
                let f = (2 * k as u128 - 1) * (2 * k as u128 - 1);
                if sum.checked_mul(f).is_some_and(|rhs| lhs >= rhs) {
                    return Some(k);
                }
                k -= 1;
            }
            Some(0)
        }
        None => {
            // Astronomically large registers: fall back to a decimal square
            // root, 28 significant digits, then round.
            use rust_decimal::MathematicalOps;
            let denom = (p * p + q * q).sqrt()?;
            let pf = (p / denom)
                .round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointAwayFromZero);
            Some((pf * Decimal::ONE_HUNDRED).try_into().unwrap_or(0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn standard_090_breakpoints() {
        let s = PfStandard::P90;
        assert_eq!(s.percent(100), dec!(-0.75));
        assert_eq!(s.percent(95), dec!(-0.75));
        assert_eq!(s.percent(94), dec!(-0.60));
        assert_eq!(s.percent(91), dec!(-0.15));
        assert_eq!(s.percent(90), dec!(0));
        assert_eq!(s.percent(89), dec!(0.5));
        assert_eq!(s.percent(70), dec!(10));
        assert_eq!(s.percent(69), dec!(11));
        assert_eq!(s.percent(65), dec!(15));
        assert_eq!(s.percent(64), dec!(17));
        assert_eq!(s.percent(60), dec!(25));
    }

    #[test]
    fn standard_085_and_080_breakpoints() {
        let s = PfStandard::P85;
        assert_eq!(s.percent(94), dec!(-1.1));
        assert_eq!(s.percent(90), dec!(-0.5));
        assert_eq!(s.percent(86), dec!(-0.1));
        assert_eq!(s.percent(84), dec!(0.5));
        assert_eq!(s.percent(65), dec!(10));
        assert_eq!(s.percent(60), dec!(15));
        assert_eq!(s.percent(59), dec!(17));
        let s = PfStandard::P80;
        assert_eq!(s.percent(92), dec!(-1.3));
        assert_eq!(s.percent(91), dec!(-1.15));
        assert_eq!(s.percent(90), dec!(-1.0));
        assert_eq!(s.percent(60), dec!(10));
        assert_eq!(s.percent(55), dec!(15));
        assert_eq!(s.percent(54), dec!(17));
    }

    #[test]
    fn tables_are_monotonic() {
        for s in [PfStandard::P90, PfStandard::P85, PfStandard::P80] {
            let mut prev = s.percent(100);
            for k in (0..100).rev() {
                let p = s.percent(k);
                assert!(p >= prev, "{s} at {k}");
                prev = p;
            }
        }
    }

    #[test]
    fn exact_pf_rounding() {
        // 3-4-5 triangle: 0.6 exactly.
        assert_eq!(monthly_pf_hundredths(dec!(3), dec!(4)), Some(60));
        assert_eq!(monthly_pf_hundredths(dec!(100), dec!(0)), Some(100));
        assert_eq!(monthly_pf_hundredths(dec!(0), dec!(5)), Some(0));
        assert_eq!(monthly_pf_hundredths(dec!(0), dec!(0)), None);
        // 0.895 exactly would round up to 0.90: kvarh for pf = 0.895 at 1000 kWh is
        // 1000*sqrt(1/0.895^2-1) = 498.397...; just below/above the midpoint:
        assert_eq!(monthly_pf_hundredths(dec!(1000), dec!(498.3)), Some(90));
        assert_eq!(monthly_pf_hundredths(dec!(1000), dec!(498.5)), Some(89));
    }
}
