//! The price function: charge lines from a tariff version and cumulative
//! quantities. Pure: no IO, no clock, no readings.
//!
//! # Cumulative pricing (the contract the prepayment engine relies on)
//!
//! Quantities are *positions*: kWh accumulated since the start of the tier
//! window (the bill period for monthly tiers, the tier year for annual ones),
//! in total and per TOU period. [`energy_charge`]`(v, limits, start, upto)`
//! prices the consumption between two positions; every line amount is
//! `round(quantity x unit price)`, rounded once.
//!
//! For a daily (or any finer) deduction use [`incremental_charge`], which is
//! defined as `f(after) - f(before)` with `f(x) = energy_charge(v, limits,
//! start, x)` and `start` the position at the start of the bill period,
//! line by line. Because each line of `f` is rounded before differencing,
//! the increments telescope: **the sum of the incremental charges over any
//! chain `start = x0 <= x1 <= ... <= xn` equals `energy_charge(v, limits,
//! start, xn)` exactly, to the fen**, including when a tier is crossed in
//! the middle of a day. A price change inside the period starts a new
//! segment whose `start` is the position at the change.

use std::borrow::Cow;

use chrono::NaiveDate;
use rust_decimal::Decimal;

use super::power_factor::monthly_pf_hundredths;
use super::tiered::in_tier_between;
use super::tou::MAX_PERIODS;
use super::TariffVersion;

/// Cumulative quantities (kWh) from the start of a tier window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub total: Decimal,
    /// Per TOU period (index into the version's periods); unused without TOU.
    pub periods: [Decimal; MAX_PERIODS],
}

impl Usage {
    pub fn total(total: Decimal) -> Usage {
        Usage {
            total,
            ..Usage::default()
        }
    }

    pub fn add(&self, other: &Usage) -> Usage {
        let mut u = *self;
        u.total += other.total;
        for (a, b) in u.periods.iter_mut().zip(other.periods.iter()) {
            *a += *b;
        }
        u
    }
}

/// What a bill line charges for. The order is the order lines appear on a bill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LineKind {
    /// Energy in tier `index` (flat or tiered tariffs without TOU).
    Energy,
    /// Energy in TOU period `index`.
    Period,
    /// Tier surcharge on top of TOU prices for tier `index`.
    TierSurcharge,
    /// Government fund or surcharge `index`.
    Fund,
    /// Basic (capacity or demand) charge of a two-part tariff.
    Basic,
    /// Fixed charge `index`.
    Fixed,
    /// Power-factor adjustment.
    PowerFactor,
    /// Top-up to the minimum charge.
    Minimum,
    /// Late-payment fee.
    LateFee,
    /// Difference against an issued bill (re-run with late data).
    Adjustment,
}

impl LineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LineKind::Energy => "energy",
            LineKind::Period => "tou_period",
            LineKind::TierSurcharge => "tier_surcharge",
            LineKind::Fund => "fund",
            LineKind::Basic => "basic",
            LineKind::Fixed => "fixed",
            LineKind::PowerFactor => "power_factor",
            LineKind::Minimum => "minimum",
            LineKind::LateFee => "late_fee",
            LineKind::Adjustment => "adjustment",
        }
    }

    pub fn parse(s: &str) -> Option<LineKind> {
        [
            LineKind::Energy,
            LineKind::Period,
            LineKind::TierSurcharge,
            LineKind::Fund,
            LineKind::Basic,
            LineKind::Fixed,
            LineKind::PowerFactor,
            LineKind::Minimum,
            LineKind::LateFee,
            LineKind::Adjustment,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// One charge component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChargeLine {
    pub kind: LineKind,
    /// Tier, period, fund or fixed-charge index, by kind.
    pub index: u8,
    pub quantity: Decimal,
    pub unit_price: Decimal,
    /// Rounded amount (the tariff version's rounding).
    pub amount: Decimal,
}

impl ChargeLine {
    /// Human label, resolved against the version the line was priced with
    /// (borrowed from it, or static: a bill run labels millions of lines).
    pub fn label<'v>(&self, v: &'v TariffVersion) -> Cow<'v, str> {
        const TIERS: [&str; 8] = [
            "tier 1", "tier 2", "tier 3", "tier 4", "tier 5", "tier 6", "tier 7", "tier 8",
        ];
        const SURCHARGES: [&str; 8] = [
            "tier 1 surcharge",
            "tier 2 surcharge",
            "tier 3 surcharge",
            "tier 4 surcharge",
            "tier 5 surcharge",
            "tier 6 surcharge",
            "tier 7 surcharge",
            "tier 8 surcharge",
        ];
        let i = self.index as usize;
        match self.kind {
            LineKind::Energy if v.tiers.is_some() => TIERS
                .get(i)
                .map_or_else(|| format!("tier {}", i + 1).into(), |t| (*t).into()),
            LineKind::Energy => "energy".into(),
            LineKind::Period => v
                .tou
                .as_ref()
                .and_then(|t| t.periods.get(i))
                .map_or_else(|| format!("period {i}").into(), |p| p.name.as_str().into()),
            LineKind::TierSurcharge => SURCHARGES.get(i).map_or_else(
                || format!("tier {} surcharge", i + 1).into(),
                |t| (*t).into(),
            ),
            LineKind::Fund => v
                .funds
                .get(i)
                .map_or_else(|| format!("fund {i}").into(), |f| f.name.as_str().into()),
            LineKind::Fixed => v
                .fixed
                .get(i)
                .map_or_else(|| format!("fixed {i}").into(), |f| f.name.as_str().into()),
            LineKind::Basic => match &v.demand {
                Some(d) => format!("basic charge ({})", d.basis).into(),
                None => "basic charge".into(),
            },
            LineKind::PowerFactor => match &v.power_factor {
                Some(p) => format!("power factor adjustment (standard {})", p.standard).into(),
                None => "power factor adjustment".into(),
            },
            LineKind::Minimum => "minimum charge top-up".into(),
            LineKind::LateFee => match self.index {
                1 => "late payment fee (arrears of this year)".into(),
                2 => "late payment fee (arrears of earlier years)".into(),
                3 => "late payment fee (minimum)".into(),
                _ => "late payment fee".into(),
            },
            LineKind::Adjustment => "adjustment".into(),
        }
    }

    /// Unit of `quantity`.
    pub fn unit(&self, v: &TariffVersion) -> &'static str {
        match self.kind {
            LineKind::Energy | LineKind::Period | LineKind::TierSurcharge | LineKind::Fund => "kWh",
            LineKind::Basic => match v.demand.as_ref().map(|d| d.basis) {
                Some(super::demand::DemandBasis::MaxDemand) => "kW",
                _ => "kVA",
            },
            LineKind::Fixed | LineKind::Minimum => "month",
            LineKind::PowerFactor => "pf",
            // quantity = overdue yuan x days; the minimum line carries the same quantity
            LineKind::LateFee => "CNY-day",
            LineKind::Adjustment => "CNY",
        }
    }
}

fn line(v: &TariffVersion, kind: LineKind, index: usize, q: Decimal, p: Decimal) -> ChargeLine {
    ChargeLine {
        kind,
        index: index as u8,
        quantity: q,
        unit_price: p,
        amount: v.rounding.round(q * p),
    }
}

/// Energy lines (energy/period, tier surcharges, funds) for the consumption
/// between positions `start` and `upto`, with effective tier `limits`
/// (already prorated; empty without tiers). Every line of the version's
/// shape is present, including zero ones, so two results can be subtracted
/// line by line.
pub fn energy_charge(
    v: &TariffVersion,
    limits: &[Decimal],
    start: &Usage,
    upto: &Usage,
) -> Vec<ChargeLine> {
    let mut out = Vec::with_capacity(8);
    let funds = v.funds_per_kwh();
    match (&v.tou, &v.tiers) {
        (Some(tou), tiers) => {
            for (p, period) in tou.periods.iter().enumerate() {
                let q = upto.periods[p] - start.periods[p];
                out.push(line(v, LineKind::Period, p, q, period.price - funds));
            }
            if let Some(t) = tiers {
                for (i, s) in t.surcharges.iter().enumerate() {
                    if !s.is_zero() {
                        let q = in_tier_between(limits, i, start.total, upto.total);
                        out.push(line(v, LineKind::TierSurcharge, i, q, *s));
                    }
                }
            }
        }
        (None, Some(t)) => {
            let base = v.energy_price.unwrap_or_default();
            for (i, s) in t.surcharges.iter().enumerate() {
                let q = in_tier_between(limits, i, start.total, upto.total);
                out.push(line(v, LineKind::Energy, i, q, base + *s - funds));
            }
        }
        (None, None) => {
            let q = upto.total - start.total;
            out.push(line(
                v,
                LineKind::Energy,
                0,
                q,
                v.energy_price.unwrap_or_default() - funds,
            ));
        }
    }
    for (i, f) in v.funds.iter().enumerate() {
        out.push(line(v, LineKind::Fund, i, upto.total - start.total, f.rate));
    }
    out
}

/// The charge for consumption from position `before` to `after` inside a
/// period that started at `start`: `f(after) - f(before)` line by line, where
/// `f(x) = energy_charge(v, limits, start, x)`. Increments over a chain of
/// positions sum exactly to the period's energy charge (see module docs).
pub fn incremental_charge(
    v: &TariffVersion,
    limits: &[Decimal],
    start: &Usage,
    before: &Usage,
    after: &Usage,
) -> Vec<ChargeLine> {
    let a = energy_charge(v, limits, start, after);
    let b = energy_charge(v, limits, start, before);
    a.into_iter()
        .zip(b)
        .map(|(x, y)| ChargeLine {
            quantity: x.quantity - y.quantity,
            amount: x.amount - y.amount,
            ..x
        })
        .collect()
}

/// Sum of line amounts.
pub fn total(lines: &[ChargeLine]) -> Decimal {
    lines.iter().map(|l| l.amount).sum()
}

/// One stretch of a bill period priced under one version.
#[derive(Debug, Clone)]
pub struct Segment<'a> {
    pub version: &'a TariffVersion,
    /// Index of `version` in its tariff, carried to the bill lines.
    pub version_index: usize,
    pub from: NaiveDate,
    /// Exclusive.
    pub to: NaiveDate,
    /// Effective tier limits (prorated), empty without tiers.
    pub limits: Vec<Decimal>,
    pub start: Usage,
    pub upto: Usage,
}

/// Everything besides energy that a bill needs.
#[derive(Debug, Clone, Default)]
pub struct BillQuantities {
    /// Days a whole month has for proration: the calendar month's days for a
    /// calendar-month period, 30 otherwise.
    pub month_basis_days: i64,
    pub capacity_kva: Decimal,
    pub max_demand_kw: Decimal,
    /// Reactive energy of the period; `None` when not measured (no PF adjustment then).
    pub kvarh: Option<Decimal>,
    /// Days the account was supplied (opened, meter installed / removed),
    /// `[from, to)`; `None`: every day of the segments. Day-prorated charges
    /// count only these days.
    pub covered: Option<(NaiveDate, NaiveDate)>,
}

/// A priced line with the version it was priced under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RatedLine {
    pub version_index: usize,
    pub line: ChargeLine,
}

/// Prices a whole bill: energy per segment, basic and fixed charges by days,
/// then the power-factor adjustment on (energy + basic) and the minimum charge,
/// both under the version in force at the end of the period.
/// Lines with zero quantity and zero amount are left out.
pub fn rate_bill(segments: &[Segment<'_>], q: &BillQuantities) -> Vec<RatedLine> {
    let mut out: Vec<RatedLine> = Vec::with_capacity(8);
    let Some(last) = segments.last() else {
        return out;
    };
    let basis = Decimal::from(q.month_basis_days.max(1));
    let days = |s: &Segment<'_>| {
        let (from, to) = q
            .covered
            .map_or((s.from, s.to), |(f, t)| (s.from.max(f), s.to.min(t)));
        (to - from).num_days().max(0)
    };
    // The high-use test of a demand price looks at the whole period, not at
    // the segment a price change cut off.
    let kwh: Decimal = segments.iter().map(|s| s.upto.total - s.start.total).sum();
    let month_fraction_total: Decimal = segments
        .iter()
        .map(|s| Decimal::from(days(s)) / basis)
        .sum();
    for s in segments {
        let v = s.version;
        let frac = Decimal::from(days(s)) / basis;
        for l in energy_charge(v, &s.limits, &s.start, &s.upto) {
            if !(l.quantity.is_zero() && l.amount.is_zero()) {
                out.push(RatedLine {
                    version_index: s.version_index,
                    line: l,
                });
            }
        }
        if let Some(d) = &v.demand {
            let b = d.basic_charge(
                q.capacity_kva,
                q.max_demand_kw,
                kwh,
                month_fraction_total,
                frac,
            );
            let l = ChargeLine {
                kind: LineKind::Basic,
                index: 0,
                quantity: b.quantity,
                unit_price: b.unit_price,
                amount: v.rounding.round(b.exact),
            };
            out.push(RatedLine {
                version_index: s.version_index,
                line: l,
            });
        }
        for (i, f) in v.fixed.iter().enumerate() {
            let l = ChargeLine {
                kind: LineKind::Fixed,
                index: i as u8,
                quantity: frac,
                unit_price: f.monthly,
                amount: v.rounding.round(f.monthly * frac),
            };
            out.push(RatedLine {
                version_index: s.version_index,
                line: l,
            });
        }
    }
    let v = last.version;
    if let Some(pf) = &v.power_factor {
        if let Some(k) = q.kvarh.and_then(|kvarh| monthly_pf_hundredths(kwh, kvarh)) {
            let percent = pf.standard.percent(k);
            let base: Decimal = out
                .iter()
                .filter(|r| {
                    matches!(
                        r.line.kind,
                        LineKind::Energy
                            | LineKind::Period
                            | LineKind::TierSurcharge
                            | LineKind::Basic
                    )
                })
                .map(|r| r.line.amount)
                .sum();
            let l = ChargeLine {
                kind: LineKind::PowerFactor,
                index: 0,
                quantity: Decimal::new(k as i64, 2),
                unit_price: percent,
                amount: v.rounding.round(base * percent / Decimal::ONE_HUNDRED),
            };
            out.push(RatedLine {
                version_index: last.version_index,
                line: l,
            });
        }
    }
    if let Some(min) = v.minimum_charge {
        let floor = v.rounding.round(min * month_fraction_total);
        let sub: Decimal = out.iter().map(|r| r.line.amount).sum();
        if sub < floor {
            let l = ChargeLine {
                kind: LineKind::Minimum,
                index: 0,
                quantity: month_fraction_total,
                unit_price: min,
                amount: floor - sub,
            };
            out.push(RatedLine {
                version_index: last.version_index,
                line: l,
            });
        }
    }
    out
}
