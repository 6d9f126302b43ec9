//! Named rounding strategies for money.
//!
//! A tariff version names its strategy (`rounding.mode`) and unit
//! (`rounding.unit`, a power of ten such as `0.01` yuan). Each bill line is
//! rounded once; amounts are never rounded twice.

use std::fmt;
use std::str::FromStr;

use rust_decimal::{Decimal, RoundingStrategy};

/// How a line amount is rounded to the tariff's unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RoundingMode {
    /// 0.005 -> 0.01, -0.005 -> -0.01 (Chinese "si she wu ru"). The default.
    #[default]
    HalfAwayFromZero,
    /// Banker's rounding: 0.005 -> 0.00, 0.015 -> 0.02.
    HalfEven,
    /// Drop the digits beyond the unit (toward zero).
    TowardZero,
    /// Any remainder rounds away from zero.
    AwayFromZero,
}

impl RoundingMode {
    pub const NAMES: &'static [&'static str] = &[
        "half_away_from_zero",
        "half_even",
        "toward_zero",
        "away_from_zero",
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RoundingMode::HalfAwayFromZero => "half_away_from_zero",
            RoundingMode::HalfEven => "half_even",
            RoundingMode::TowardZero => "toward_zero",
            RoundingMode::AwayFromZero => "away_from_zero",
        }
    }

    fn strategy(self) -> RoundingStrategy {
        match self {
            RoundingMode::HalfAwayFromZero => RoundingStrategy::MidpointAwayFromZero,
            RoundingMode::HalfEven => RoundingStrategy::MidpointNearestEven,
            RoundingMode::TowardZero => RoundingStrategy::ToZero,
            RoundingMode::AwayFromZero => RoundingStrategy::AwayFromZero,
        }
    }
}

impl FromStr for RoundingMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "half_away_from_zero" | "half_up" => RoundingMode::HalfAwayFromZero,
            "half_even" | "bankers" => RoundingMode::HalfEven,
            "toward_zero" | "truncate" => RoundingMode::TowardZero,
            "away_from_zero" => RoundingMode::AwayFromZero,
            other => {
                return Err(format!(
                    "unknown rounding mode '{other}' (one of {})",
                    RoundingMode::NAMES.join(", ")
                ))
            }
        })
    }
}

impl fmt::Display for RoundingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rounding mode plus the number of decimal places of its unit
/// (`0.01` -> 2, `1` -> 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rounding {
    pub mode: RoundingMode,
    pub decimals: u32,
}

impl Default for Rounding {
    fn default() -> Self {
        Rounding {
            mode: RoundingMode::HalfAwayFromZero,
            decimals: 2,
        }
    }
}

impl Rounding {
    /// Builds from a unit that must be a power of ten between 1 and 0.0001.
    pub fn new(mode: RoundingMode, unit: Decimal) -> Result<Rounding, String> {
        let u = unit.normalize();
        if u.mantissa() != 1 || u.scale() > 4 {
            return Err(format!(
                "rounding unit must be 1, 0.1, 0.01, 0.001 or 0.0001 (got {unit})"
            ));
        }
        Ok(Rounding {
            mode,
            decimals: u.scale(),
        })
    }

    pub fn unit(&self) -> Decimal {
        Decimal::new(1, self.decimals)
    }

    /// Rounds `x` to the unit; the result always carries exactly `decimals` places.
    pub fn round(&self, x: Decimal) -> Decimal {
        let mut r = x.round_dp_with_strategy(self.decimals, self.mode.strategy());
        r.rescale(self.decimals);
        r
    }
}

impl fmt::Display for Rounding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} to {}", self.mode, self.unit())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn half_fen_cases() {
        let r = Rounding::default();
        assert_eq!(r.round(dec!(0.005)), dec!(0.01));
        assert_eq!(r.round(dec!(-0.005)), dec!(-0.01));
        assert_eq!(r.round(dec!(0.0049999)), dec!(0.00));
        assert_eq!(r.round(dec!(117.192)).to_string(), "117.19");
        assert_eq!(r.round(dec!(2)).to_string(), "2.00");
        let e = Rounding {
            mode: RoundingMode::HalfEven,
            decimals: 2,
        };
        assert_eq!(e.round(dec!(0.005)), dec!(0.00));
        assert_eq!(e.round(dec!(0.015)), dec!(0.02));
        let t = Rounding {
            mode: RoundingMode::TowardZero,
            decimals: 2,
        };
        assert_eq!(t.round(dec!(0.019)), dec!(0.01));
        let a = Rounding {
            mode: RoundingMode::AwayFromZero,
            decimals: 2,
        };
        assert_eq!(a.round(dec!(0.011)), dec!(0.02));
    }

    #[test]
    fn unit_must_be_a_power_of_ten() {
        assert!(Rounding::new(RoundingMode::HalfEven, dec!(0.05)).is_err());
        assert_eq!(
            Rounding::new(RoundingMode::HalfEven, dec!(0.10))
                .unwrap()
                .decimals,
            1
        );
        assert_eq!(
            Rounding::new(RoundingMode::HalfEven, dec!(1))
                .unwrap()
                .decimals,
            0
        );
    }
}
