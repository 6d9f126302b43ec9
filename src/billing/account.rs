//! One account's bill for one period: meter register values at the period's
//! boundaries (with VEE), consumption per segment and TOU period, then the
//! tariff engine's price function.

use chrono::{Datelike, NaiveDate};
use rust_decimal::Decimal;

use super::flags::Flags;
use super::period::{local_midnight_ms, BillPeriod};
use super::vee::{
    register_delta, MeterState, Source, VeeConfig, REG_REACTIVE_EXPORT, REG_REACTIVE_IMPORT,
    REG_T1, REG_TOTAL,
};
use crate::master::{BillingAccount, BillingMeter};
use crate::model::Quality;
use crate::tariff::price::{rate_bill, BillQuantities, ChargeLine, LineKind, Segment, Usage};
use crate::tariff::tiered::{Accumulation, Tiers};
use crate::tariff::tou::MAX_PERIODS;
use crate::tariff::Tariff;

/// Why an account could not be billed. Written to the `exceptions` output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exception {
    /// Stable machine code (see docs/billing.md).
    pub code: &'static str,
    pub detail: String,
}

impl Exception {
    pub fn new(code: &'static str, detail: impl Into<String>) -> Exception {
        Exception {
            code,
            detail: detail.into(),
        }
    }
}

/// What the bill run must track for an account, decided before reading.
#[derive(Debug, Clone)]
pub struct AccountPlan<'t> {
    pub tariff: &'t Tariff,
    /// Local boundary dates: [tier-year start,] period start, price changes, period end.
    pub dates: Vec<NaiveDate>,
    /// Index of the period start in `dates`.
    pub first: usize,
    /// Registers to track (bit per `vee` register index).
    pub mask: u8,
    /// Start of this account's annual tier window when it precedes the period.
    pub ytd_from: Option<NaiveDate>,
    /// Index in `dates` of a new tier year's start inside the period.
    pub year_split: Option<usize>,
}

pub fn plan_account<'t>(
    tariff: &'t Tariff,
    account: &BillingAccount,
    period: &BillPeriod,
) -> Result<AccountPlan<'t>, Exception> {
    let mut dates = vec![period.start];
    for v in &tariff.versions {
        for d in [Some(v.effective_from), v.effective_to]
            .into_iter()
            .flatten()
        {
            if d > period.start && d < period.end {
                dates.push(d);
            }
        }
    }
    dates.push(period.end);
    dates.sort();
    dates.dedup();
    // Every day of the period needs a version.
    for w in dates.windows(2) {
        tariff
            .version_on(w[0])
            .map_err(|e| Exception::new("no_tariff_version", e.to_string()))?;
    }
    let mut mask = 1u8 << REG_TOTAL;
    let mut ytd_from = None;
    let mut split = None;
    for v in &tariff.versions {
        if !(v.effective_from < period.end && v.effective_to.is_none_or(|t| t > period.start)) {
            continue;
        }
        if let Some(tou) = &v.tou {
            if tou.registers.iter().any(|r| r.is_some()) {
                mask |= 0b1111 << REG_T1;
            }
        }
        if let Some(pf) = &v.power_factor {
            mask |= 1 << REG_REACTIVE_IMPORT;
            if pf.include_export_reactive {
                mask |= 1 << REG_REACTIVE_EXPORT;
            }
        }
        if let Some(Tiers {
            accumulation: Accumulation::Annual { start_month },
            ..
        }) = &v.tiers
        {
            let year = Tiers::tier_year_start(*start_month, period.start);
            let ys = year.max(account.opened_on);
            if ys < period.start {
                ytd_from = Some(ys);
            }
            // A new tier year inside the period starts its own segment.
            let next = NaiveDate::from_ymd_opt(year.year() + 1, year.month(), 1).expect("valid");
            if next < period.end {
                if !dates.contains(&next) {
                    dates.push(next);
                    dates.sort();
                }
                split = Some(next);
            }
        }
    }
    let first = usize::from(ytd_from.is_some());
    if let Some(y) = ytd_from {
        dates.insert(0, y);
    }
    // Only a split between two other bounds can be estimated from them (a
    // price change on the same day leaves it a bound of its own anyway).
    let year_split = split
        .and_then(|d| dates.iter().position(|x| *x == d))
        .filter(|&i| i > first && i + 1 < dates.len());
    Ok(AccountPlan {
        tariff,
        dates,
        first,
        mask,
        ytd_from,
        year_split,
    })
}

impl AccountPlan<'_> {
    /// The annual position `carried` (the previous bill's start and its
    /// year-to-date kWh) when it replaces the one measured from the
    /// tier-year start: only a bill that started inside this tier year
    /// carries its position.
    pub fn carried_ytd(&self, carried: Option<(NaiveDate, Decimal)>) -> Option<Decimal> {
        match (self.ytd_from, carried) {
            (Some(from), Some((prev_start, c))) if prev_start >= from => Some(c),
            _ => None,
        }
    }

    /// Boundary timestamps for one meter, clamped to its installation window.
    /// `None` when the meter was not installed during the period (nor, for
    /// annual tiers, earlier in the tier year: a meter exchanged out since the
    /// tier-year start still counts towards the position).
    pub fn meter_bounds(&self, m: &BillingMeter) -> Option<Vec<i64>> {
        let off = self.tariff.utc_offset_secs;
        let inst = local_midnight_ms(m.installed_on, off);
        let rem = m.removed_on.map_or(i64::MAX, |d| local_midnight_ms(d, off));
        let start = local_midnight_ms(self.dates[0], off);
        let end = local_midnight_ms(*self.dates.last().expect("two dates"), off);
        if inst >= end || rem <= start || rem <= inst {
            return None;
        }
        Some(
            self.dates
                .iter()
                .map(|d| local_midnight_ms(*d, off).clamp(inst, rem))
                .collect(),
        )
    }

    pub fn meter_state(&self, m: &BillingMeter) -> Option<MeterState> {
        self.meter_bounds(m)
            .map(|b| MeterState::new(b, self.first, m.register_digits, self.mask))
    }
}

/// Flags of a boundary value: estimated by VEE, or flagged so by its source.
fn value_flags(src: Source, q: Quality) -> Flags {
    let mut f = Flags::NONE;
    if src != Source::Measured {
        f |= Flags::ESTIMATED;
    }
    if q.contains(Quality::ESTIMATED) || q.contains(Quality::EDITED) {
        f |= Flags::ESTIMATED | Flags::SOURCE_QUALITY;
    }
    f
}

/// One priced line with the version it was priced under and its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BillLine {
    pub version_index: usize,
    pub line: ChargeLine,
    pub flags: Flags,
}

/// A computed bill.
#[derive(Debug, Clone, PartialEq)]
pub struct AccountBill {
    pub account_id: String,
    pub tariff_id: String,
    /// Version ids used, joined with '+'.
    pub versions: String,
    pub lines: Vec<BillLine>,
    pub kwh: Decimal,
    pub total: Decimal,
    pub flags: Flags,
    pub days: i64,
    /// Annual tiers: position (kWh since the tier-year start) before and after the period.
    pub ytd_before: Option<Decimal>,
    pub ytd_after: Option<Decimal>,
    pub power_factor: Option<Decimal>,
    pub max_demand_kw: Option<Decimal>,
}

fn scaled(v: i64) -> Decimal {
    Decimal::new(v, 4)
}

/// Per meter and register: values at every bound (None = not needed or missing).
struct MeterValues {
    vals: Vec<[Option<i64>; super::vee::NREG]>,
}

/// Bills one account from its meters' states.
pub fn bill_account(
    account: &BillingAccount,
    plan: &AccountPlan<'_>,
    meters: &[(&BillingMeter, &MeterState)],
    period: &BillPeriod,
    cfg: &VeeConfig,
    carried_ytd: Option<(NaiveDate, Decimal)>,
) -> Result<AccountBill, Exception> {
    let tariff = plan.tariff;
    let nb = plan.dates.len();
    let nseg = nb - 1 - plan.first;
    // Meters installed during the period; the others were exchanged out
    // earlier in the tier year and count only towards its position.
    let n_active = meters.iter().filter(|(_, st)| st.in_period()).count();
    if n_active == 0 {
        return Err(Exception::new(
            "no_meter",
            "no meter installed for the account during the period",
        ));
    }
    let mut flags = Flags::NONE;
    if n_active > 1 {
        flags |= Flags::METER_EXCHANGE;
    }
    // 1. Register values at every bound, per meter.
    let mut mv: Vec<MeterValues> = Vec::with_capacity(meters.len());
    let mut tou_registers_ok = true;
    // Flags of tier-year-start values that are not measurements: they count
    // only when the position is measured rather than carried.
    let mut ytd_bound_flags = Flags::NONE;
    let ytd_flags = |f: Flags| {
        if f == Flags::NONE {
            f
        } else {
            f | Flags::YTD_ESTIMATED
        }
    };
    // Needed unless every segment the bound closes or opens has no length
    // (the meter's window clamps them onto one instant).
    let needed = |st: &MeterState, b: usize| {
        (b > plan.first && st.bounds[b] != st.bounds[b - 1])
            || (b + 1 < nb && st.bounds[b] != st.bounds[b + 1])
    };
    for (m, st) in meters {
        let mut vals = vec![[None; super::vee::NREG]; nb];
        if !st.in_period() {
            // Only its total register up to its removal (the period start's
            // bound is clamped onto it), for the tier-year position.
            for (b, slot) in vals.iter_mut().enumerate().take(plan.first + 1) {
                if let Some((v, src, q)) = st.value_at(REG_TOTAL, b, cfg) {
                    ytd_bound_flags |= ytd_flags(value_flags(src, q));
                    slot[REG_TOTAL] = Some(v);
                }
            }
            mv.push(MeterValues { vals });
            continue;
        }
        flags |= st.step_flags();
        for reg in 0..super::vee::NREG {
            if plan.mask & (1 << reg) == 0 {
                continue;
            }
            for (b, slot) in vals.iter_mut().enumerate() {
                // A bound clamped onto the same instant as its neighbour needs no value
                // when the meter contributes nothing there; still read it if present.
                match st.value_at(reg, b, cfg) {
                    Some((v, src, q)) => {
                        if b < plan.first {
                            ytd_bound_flags |= ytd_flags(value_flags(src, q));
                        } else {
                            flags |= value_flags(src, q);
                            // The split's value starts the new tier year's position.
                            if reg == REG_TOTAL
                                && Some(b) == plan.year_split
                                && src != Source::Measured
                            {
                                flags |= Flags::YTD_ESTIMATED;
                            }
                        }
                        slot[reg] = Some(v);
                    }
                    None if b < plan.first => {}
                    // Filled in below from the bounds around it.
                    None if Some(b) == plan.year_split => {}
                    None => {
                        if reg == REG_TOTAL && needed(st, b) {
                            return Err(Exception::new(
                                "no_reading",
                                format!(
                                    "meter {}: no import_active_total reading near {} (UTC ms {}), none to interpolate or extrapolate from",
                                    m.meter_id, plan.dates[b], st.bounds[b]
                                ),
                            ));
                        }
                        if (REG_T1..REG_T1 + 4).contains(&reg) {
                            tou_registers_ok = false;
                        }
                    }
                }
            }
        }
        if let Some(b) = plan.year_split {
            // No reading near the new tier year's start: share the registers'
            // advance between the bounds around it by time (the bill would
            // otherwise fail where one without the split succeeds).
            for reg in (0..super::vee::NREG).filter(|r| plan.mask & (1 << r) != 0) {
                if vals[b][reg].is_some() {
                    continue;
                }
                let (Some(a), Some(c)) = (vals[b - 1][reg], vals[b + 1][reg]) else {
                    // As unknown as at any other bound.
                    if reg == REG_TOTAL && needed(st, b) {
                        return Err(Exception::new(
                            "no_reading",
                            format!(
                                "meter {}: no import_active_total reading near {} (UTC ms {}) nor around it to share by time",
                                m.meter_id, plan.dates[b], st.bounds[b]
                            ),
                        ));
                    }
                    if (REG_T1..REG_T1 + 4).contains(&reg) {
                        tou_registers_ok = false;
                    }
                    continue;
                };
                let (ta, tb, tc) = (st.bounds[b - 1], st.bounds[b], st.bounds[b + 1]);
                let v = match register_delta(a, c, st.modulus) {
                    Some((d, _)) if tc > ta => {
                        a + super::vee::div_round(d as i128 * (tb - ta) as i128, (tc - ta) as i128)
                    }
                    _ => a,
                };
                vals[b][reg] = Some(v.rem_euclid(st.modulus));
                flags |= Flags::ESTIMATED;
                if reg == REG_TOTAL {
                    // It starts the new tier year's position.
                    flags |= Flags::YTD_ESTIMATED;
                }
            }
        }
        mv.push(MeterValues { vals });
    }
    // 2. Consumption per segment (kWh, x CT x PT), register by register.
    let delta = |mi: usize,
                 reg: usize,
                 b0: usize,
                 b1: usize|
     -> Result<Option<Decimal>, Exception> {
        let (m, st) = meters[mi];
        if st.bounds[b0] == st.bounds[b1] {
            return Ok(Some(Decimal::ZERO));
        }
        let (Some(a), Some(b)) = (mv[mi].vals[b0][reg], mv[mi].vals[b1][reg]) else {
            return Ok(None);
        };
        match register_delta(a, b, st.modulus) {
            Some((d, _)) => Ok(Some(scaled(d) * m.multiplier)),
            None => Err(Exception::new(
                "register_backwards",
                format!(
                    "meter {}: register {} went backwards from {} to {} between {} and {} (not a rollover at 10^{})",
                    m.meter_id, reg, scaled(a), scaled(b), plan.dates[b0], plan.dates[b1], m.register_digits
                ),
            )),
        }
    };
    let mut rolled = false;
    for (mi, (_, st)) in meters.iter().enumerate() {
        for reg in 0..super::vee::NREG {
            let (a, b) = (mv[mi].vals[plan.first][reg], mv[mi].vals[nb - 1][reg]);
            if let (Some(a), Some(b)) = (a, b) {
                if matches!(register_delta(a, b, st.modulus), Some((_, true))) {
                    rolled = true;
                }
            }
        }
    }
    if rolled {
        flags |= Flags::ROLLOVER;
    }
    let mut seg_usage: Vec<Usage> = Vec::with_capacity(nseg);
    for k in 0..nseg {
        let (b0, b1) = (plan.first + k, plan.first + k + 1);
        let mut u = Usage::default();
        for mi in 0..meters.len() {
            u.total += delta(mi, REG_TOTAL, b0, b1)?.unwrap_or_default();
        }
        let version = tariff
            .version_on(plan.dates[b0])
            .map_err(|e| Exception::new("no_tariff_version", e.to_string()))?;
        if let Some(tou) = &version.tou {
            let mut periods = [Decimal::ZERO; MAX_PERIODS];
            let all_intervals = meters.iter().all(|(_, st)| {
                !st.in_period()
                    || st.interval.as_ref().is_some_and(|acc| {
                        let (from, to) = st.window();
                        acc.count as i64 >= (to - from) / 900_000
                    })
            });
            if all_intervals {
                for (m, st) in meters.iter().filter(|(_, st)| st.in_period()) {
                    let acc = st.interval.as_ref().expect("checked");
                    if let Some(seg) = acc.per_segment.get(k) {
                        for (p, v) in seg.iter().enumerate() {
                            periods[p] += scaled(*v) * m.multiplier;
                        }
                    }
                }
            } else if tou_registers_ok && tou.registers.iter().any(|r| r.is_some()) {
                for (mi, _) in meters.iter().enumerate() {
                    for (r, p) in tou.registers.iter().enumerate() {
                        if let Some(p) = p {
                            periods[*p as usize] +=
                                delta(mi, REG_T1 + r, b0, b1)?.unwrap_or_default();
                        }
                    }
                }
            } else if meters.iter().any(|(_, st)| st.interval.is_some()) {
                // Partial interval data: share the register's energy by the profile seen.
                let mut seen = [Decimal::ZERO; MAX_PERIODS];
                for (m, st) in meters {
                    if let Some(seg) = st.interval.as_ref().and_then(|a| a.per_segment.get(k)) {
                        for (p, v) in seg.iter().enumerate() {
                            seen[p] += scaled(*v) * m.multiplier;
                        }
                    }
                }
                let sum: Decimal = seen.iter().copied().sum();
                if sum.is_zero() {
                    return Err(Exception::new(
                        "no_tou_split",
                        "interval data too sparse to split energy into TOU periods",
                    ));
                }
                let mut given = Decimal::ZERO;
                let last = seen.iter().rposition(|x| !x.is_zero()).unwrap_or(0);
                for p in 0..MAX_PERIODS {
                    if p == last {
                        periods[p] = u.total - given;
                    } else {
                        periods[p] = (u.total * seen[p] / sum).round_dp(4);
                        given += periods[p];
                    }
                }
                flags |= Flags::INTERVAL_ESTIMATED | Flags::ESTIMATED;
            } else {
                return Err(Exception::new(
                    "no_tou_split",
                    "TOU tariff but neither tariff registers T1..T4 nor interval data for the period",
                ));
            }
            let sum: Decimal = periods.iter().copied().sum();
            let tolerance = Decimal::new(cfg.interval_tolerance * n_active as i64, 4)
                * meters
                    .iter()
                    .map(|(m, _)| m.multiplier)
                    .max()
                    .unwrap_or(Decimal::ONE);
            if (sum - u.total).abs() > tolerance {
                flags |= if all_intervals {
                    Flags::INTERVAL_MISMATCH
                } else {
                    Flags::REGISTER_SUM_MISMATCH
                };
            }
            u.periods = periods;
            u.total = sum;
        }
        seg_usage.push(u);
    }
    // 3. Tier positions and limits.
    let in_period = || {
        meters
            .iter()
            .filter(|(_, st)| st.in_period())
            .map(|(m, _)| *m)
    };
    let cover_from = in_period()
        .map(|m| m.installed_on)
        .min()
        .unwrap_or(period.start)
        .max(period.start)
        .max(account.opened_on);
    let cover_to = if in_period().any(|m| m.removed_on.is_none()) {
        period.end
    } else {
        in_period()
            .filter_map(|m| m.removed_on)
            .max()
            .unwrap_or(period.end)
            .min(period.end)
    };
    let days = (cover_to - cover_from).num_days().max(0);
    let mut ytd = Decimal::ZERO;
    let mut ytd_known = None;
    let end_version = tariff
        .version_on(plan.dates[nb - 2])
        .map_err(|e| Exception::new("no_tariff_version", e.to_string()))?;
    if let Some(c) = plan.carried_ytd(carried_ytd) {
        // The previous bill of this tier year says where the account stands:
        // billing continues from what was billed, not from a re-measurement.
        ytd = c;
        ytd_known = Some(ytd);
        flags |= Flags::YTD_CARRIED;
    } else if let Some(from) = plan.ytd_from {
        let mut known = true;
        let mut sum = Decimal::ZERO;
        for mi in 0..meters.len() {
            match delta(mi, REG_TOTAL, 0, plan.first) {
                Ok(Some(d)) => sum += d,
                _ => known = false,
            }
        }
        if known {
            ytd = sum;
            flags |= ytd_bound_flags;
        } else {
            // Historical average: the period's daily use over the days since the tier-year start.
            let period_kwh: Decimal = seg_usage.iter().map(|u| u.total).sum();
            let before_days = (period.start - from).num_days();
            ytd =
                (period_kwh * Decimal::from(before_days) / Decimal::from(days.max(1))).round_dp(2);
            flags |= Flags::YTD_ESTIMATED | Flags::ESTIMATED;
        }
        ytd_known = Some(ytd);
    }
    let mut segments: Vec<Segment<'_>> = Vec::with_capacity(nseg);
    let mut pos = Usage::total(ytd);
    let mut version_ids: Vec<&str> = Vec::new();
    // Tier year of the position, when annual tiers apply.
    let mut pos_year: Option<NaiveDate> = None;
    for (k, u) in seg_usage.iter().enumerate() {
        let from = plan.dates[plan.first + k];
        let to = plan.dates[plan.first + k + 1];
        let vi = tariff
            .versions
            .iter()
            .position(|v| v.applies_on(from))
            .ok_or_else(|| Exception::new("no_tariff_version", format!("no version on {from}")))?;
        let v = &tariff.versions[vi];
        if !version_ids.contains(&v.id.as_str()) {
            version_ids.push(&v.id);
        }
        let limits = match &v.tiers {
            None => Vec::new(),
            Some(t) => match t.accumulation {
                Accumulation::Monthly => {
                    if period.whole_month && days == period.days() {
                        t.limits.clone()
                    } else {
                        flags |= Flags::PRORATED;
                        Tiers::prorate(&t.limits, days, period.month_basis_days())
                    }
                }
                Accumulation::Annual { start_month } => {
                    let ys = Tiers::tier_year_start(start_month, from);
                    if pos_year.is_some_and(|y| y != ys) {
                        // The period crossed into a new tier year.
                        pos = Usage::default();
                    }
                    pos_year = Some(ys);
                    let ye = NaiveDate::from_ymd_opt(ys.year() + 1, ys.month(), 1).expect("valid");
                    let opened = account.opened_on.max(
                        meters
                            .iter()
                            .map(|(m, _)| m.installed_on)
                            .min()
                            .unwrap_or(ys),
                    );
                    if opened > ys {
                        flags |= Flags::PRORATED;
                        Tiers::prorate(&t.limits, (ye - opened).num_days(), (ye - ys).num_days())
                    } else {
                        t.limits.clone()
                    }
                }
            },
        };
        let upto = pos.add(u);
        segments.push(Segment {
            version: v,
            version_index: vi,
            from,
            to,
            limits,
            start: pos,
            upto,
        });
        pos = upto;
    }
    if version_ids.len() > 1 {
        flags |= Flags::PRICE_CHANGE;
    }
    let kwh: Decimal = seg_usage.iter().map(|u| u.total).sum();
    // 4. Demand, reactive energy.
    let mut max_demand = None;
    for (m, st) in meters {
        if let Some(d) = st.max_demand {
            let kw = scaled(d) * m.multiplier;
            max_demand = Some(max_demand.map_or(kw, |x: Decimal| x.max(kw)));
        }
    }
    let mut kvarh = None;
    if let Some(pf) = &end_version.power_factor {
        let mut sum = Some(Decimal::ZERO);
        for mi in 0..meters.len() {
            let mut add = |reg| -> Result<(), Exception> {
                let d = delta(mi, reg, plan.first, nb - 1)?;
                sum = sum.zip(d).map(|(a, b)| a + b);
                Ok(())
            };
            add(REG_REACTIVE_IMPORT)?;
            if pf.include_export_reactive {
                add(REG_REACTIVE_EXPORT)?;
            }
        }
        if sum.is_none() {
            flags |= Flags::PF_MISSING;
        }
        kvarh = sum;
    }
    if end_version
        .demand
        .as_ref()
        .is_some_and(|d| d.basis == crate::tariff::demand::DemandBasis::MaxDemand)
        && max_demand.is_none()
    {
        flags |= Flags::DEMAND_MISSING;
    }
    let q = BillQuantities {
        month_basis_days: period.month_basis_days(),
        capacity_kva: account.contracted_kva,
        max_demand_kw: max_demand.unwrap_or_default(),
        kvarh,
        covered: Some((cover_from, cover_to)),
    };
    let rated = rate_bill(&segments, &q);
    let usage_flags = Flags(
        flags.0
            & (Flags::ESTIMATED
                | Flags::INTERVAL_ESTIMATED
                | Flags::YTD_ESTIMATED
                | Flags::ROLLOVER
                | Flags::METER_EXCHANGE
                | Flags::SOURCE_QUALITY)
                .0,
    );
    let mut lines = Vec::with_capacity(rated.len());
    let mut pf_value = None;
    for r in rated {
        let lf = match r.line.kind {
            LineKind::Energy | LineKind::Period | LineKind::TierSurcharge | LineKind::Fund => {
                usage_flags
            }
            LineKind::PowerFactor => {
                pf_value = Some(r.line.quantity);
                usage_flags
            }
            LineKind::Minimum => {
                flags |= Flags::MINIMUM_CHARGE;
                Flags::MINIMUM_CHARGE
            }
            _ => Flags::NONE,
        };
        lines.push(BillLine {
            version_index: r.version_index,
            line: r.line,
            flags: lf,
        });
    }
    let total = lines.iter().map(|l| l.line.amount).sum();
    Ok(AccountBill {
        account_id: account.account_id.to_string(),
        tariff_id: tariff.id.clone(),
        versions: version_ids.join("+"),
        lines,
        kwh,
        total,
        flags,
        days,
        ytd_before: ytd_known,
        // In the tier year the period ends in.
        ytd_after: ytd_known.map(|_| pos.total),
        power_factor: pf_value,
        max_demand_kw: max_demand,
    })
}

/// Routes one reading to a meter's state: registers to boundary tracking and
/// checks, demand to the maximum, interval energy to its TOU period (the
/// interval ending at `ts` is assigned by its start, in the tariff's local time).
pub fn apply_reading(
    st: &mut MeterState,
    plan: &AccountPlan<'_>,
    channel: crate::model::Channel,
    ts: i64,
    value: i64,
    quality: Quality,
    cfg: &VeeConfig,
) -> Result<(), Exception> {
    use crate::model::Channel;
    if let Some(reg) = super::vee::register_index(channel) {
        st.register(reg, ts, value, quality, cfg);
        return Ok(());
    }
    match channel {
        Channel::MaxDemandImport => st.demand(ts, value),
        Channel::ClockSkew => st.clock_skew(ts, value, cfg),
        Channel::ImportActiveInterval => {
            let (from, to) = st.window();
            if ts <= from || ts > to {
                return Ok(());
            }
            let (date, minute) =
                super::period::local_date_minute(ts - 900_000, plan.tariff.utc_offset_secs);
            let v = plan
                .tariff
                .version_on(date)
                .map_err(|e| Exception::new("no_tariff_version", e.to_string()))?;
            let period = match &v.tou {
                Some(tou) => tou
                    .period_at(date, minute)
                    .map_err(|e| Exception::new("calendar_missing", e))?,
                None => 0,
            };
            st.interval(ts, value, period);
        }
        _ => {}
    }
    Ok(())
}
