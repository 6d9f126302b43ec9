//! Two-part tariffs: the basic (capacity) charge of large-industry users.
//!
//! The basic charge is either by contracted transformer capacity
//! (yuan per kVA-month) or by the month's maximum demand (yuan per kW-month).
//! Optionally, demand-billed users who use at least `kwh_per_kva` kWh per kVA
//! of capacity in the month pay `factor` (e.g. 0.9) of the demand price.
//! Periods shorter than a month pay the basic charge by days.

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemandBasis {
    /// Contracted capacity (kVA) from the account master data.
    Capacity,
    /// Maximum demand (kW) measured in the period (`max_demand_import` x CT x PT).
    MaxDemand,
}

impl FromStr for DemandBasis {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "capacity" => Ok(DemandBasis::Capacity),
            "max_demand" => Ok(DemandBasis::MaxDemand),
            o => Err(format!(
                "basis must be 'capacity' or 'max_demand' (got '{o}')"
            )),
        }
    }
}

impl fmt::Display for DemandBasis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DemandBasis::Capacity => "capacity",
            DemandBasis::MaxDemand => "max_demand",
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Demand {
    pub basis: DemandBasis,
    /// Yuan per kVA-month.
    pub capacity_price: Decimal,
    /// Yuan per kW-month.
    pub demand_price: Decimal,
    /// (kWh per kVA threshold, price factor) for heavy users billed on demand.
    pub high_use_discount: Option<(Decimal, Decimal)>,
}

/// The basic charge before rounding: (quantity, unit, unit price, exact amount).
pub struct BasicCharge {
    pub quantity: Decimal,
    pub unit: &'static str,
    pub unit_price: Decimal,
    pub exact: Decimal,
}

impl Demand {
    /// `month_fraction` is the days this charge covers / days in the month
    /// (1 for a whole month); `period_kwh` and `period_fraction` are the whole
    /// bill period's, for the high-use test (its threshold is prorated the same way).
    pub fn basic_charge(
        &self,
        capacity_kva: Decimal,
        max_demand_kw: Decimal,
        period_kwh: Decimal,
        period_fraction: Decimal,
        month_fraction: Decimal,
    ) -> BasicCharge {
        match self.basis {
            DemandBasis::Capacity => BasicCharge {
                quantity: capacity_kva,
                unit: "kVA",
                unit_price: self.capacity_price,
                exact: capacity_kva * self.capacity_price * month_fraction,
            },
            DemandBasis::MaxDemand => {
                let mut price = self.demand_price;
                if let Some((per_kva, factor)) = self.high_use_discount {
                    if capacity_kva > Decimal::ZERO
                        && period_kwh >= per_kva * capacity_kva * period_fraction
                    {
                        price *= factor;
                    }
                }
                BasicCharge {
                    quantity: max_demand_kw,
                    unit: "kW",
                    unit_price: price,
                    exact: max_demand_kw * price * month_fraction,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn heavy_users_pay_ninety_percent_of_the_demand_price() {
        let d = Demand {
            basis: DemandBasis::MaxDemand,
            capacity_price: dec!(26),
            demand_price: dec!(38),
            high_use_discount: Some((dec!(260), dec!(0.9))),
        };
        let one = Decimal::ONE;
        let light = d.basic_charge(dec!(400), dec!(300), dec!(100000), one, one);
        assert_eq!(light.exact, dec!(11400));
        let heavy = d.basic_charge(dec!(400), dec!(300), dec!(104000), one, one);
        assert_eq!(heavy.exact, dec!(10260.0));
    }

    #[test]
    fn the_high_use_threshold_of_a_half_month_is_half_a_month_s() {
        let d = Demand {
            basis: DemandBasis::MaxDemand,
            capacity_price: dec!(26),
            demand_price: dec!(38),
            high_use_discount: Some((dec!(260), dec!(0.9))),
        };
        let half = dec!(0.5);
        // 52,000 kWh is 260 kWh per kVA of 400 kVA over half a month.
        let heavy = d.basic_charge(dec!(400), dec!(300), dec!(52000), half, half);
        assert_eq!(heavy.unit_price, dec!(34.2));
        let light = d.basic_charge(dec!(400), dec!(300), dec!(51999), half, half);
        assert_eq!(light.unit_price, dec!(38));
    }
}
