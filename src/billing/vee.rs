//! Validation, estimation and editing of one meter's readings, streaming.
//!
//! A [`MeterState`] sees the meter's readings in time order (the bill run
//! feeds partitions day by day) and keeps only what billing needs: for every
//! register and every boundary (period start, price changes, period end) the
//! nearest reading on each side, plus running statistics of the total
//! register for the validation checks. Memory is constant per meter.
//!
//! Values are register units scaled by 10^4 (the lake's `Decimal128(18,4)`),
//! so all arithmetic here is exact integer arithmetic.

use crate::model::{Channel, Quality};

use super::flags::Flags;

/// Registers tracked at boundaries.
pub const REG_TOTAL: usize = 0;
pub const REG_T1: usize = 1;
pub const REG_REACTIVE_IMPORT: usize = 5;
pub const REG_REACTIVE_EXPORT: usize = 6;
pub const NREG: usize = 7;

pub fn register_index(c: Channel) -> Option<usize> {
    Some(match c {
        Channel::ImportActiveTotal => REG_TOTAL,
        Channel::ImportActiveT1 => 1,
        Channel::ImportActiveT2 => 2,
        Channel::ImportActiveT3 => 3,
        Channel::ImportActiveT4 => 4,
        Channel::ImportReactiveTotal => REG_REACTIVE_IMPORT,
        Channel::ExportReactiveTotal => REG_REACTIVE_EXPORT,
        _ => return None,
    })
}

const DAY_MS: i64 = 86_400_000;
const NONE_TS: i64 = i64::MIN;

/// Thresholds of the validation checks and limits of estimation.
#[derive(Debug, Clone)]
pub struct VeeConfig {
    /// A boundary value may be interpolated between readings at most this far apart.
    pub max_interpolation_gap_ms: i64,
    /// ... or extrapolated from a reading at most this far from the boundary.
    pub max_extrapolation_ms: i64,
    /// A step larger than `spike_factor` x the mean of the earlier steps is a spike.
    pub spike_factor: i64,
    /// Steps below this (scaled kWh) are never spikes (absolute floor: 5 kWh).
    pub spike_floor: i64,
    /// Consecutive zero-consumption readings before `zero_run` is flagged.
    pub zero_run_readings: u16,
    /// Expected spacing of register readings; longer gaps are flagged.
    pub expected_spacing_ms: i64,
    /// Meter clock skew beyond this (seconds) is flagged.
    pub max_clock_skew_s: i64,
    /// Interval sum vs register delta tolerance (scaled kWh per meter).
    pub interval_tolerance: i64,
}

impl Default for VeeConfig {
    fn default() -> Self {
        VeeConfig {
            max_interpolation_gap_ms: 7 * DAY_MS,
            max_extrapolation_ms: 3 * DAY_MS,
            spike_factor: 10,
            spike_floor: 5 * 10_000,
            zero_run_readings: 7,
            expected_spacing_ms: DAY_MS,
            max_clock_skew_s: 300,
            interval_tolerance: 1_000, // 0.1 kWh
        }
    }
}

/// Nearest readings on each side of one boundary.
#[derive(Debug, Clone, Copy)]
pub struct Near {
    before_ts: i64,
    before_v: i64,
    after_ts: i64,
    after_v: i64,
    before_q: u16,
    after_q: u16,
}

impl Default for Near {
    fn default() -> Self {
        Near {
            before_ts: NONE_TS,
            before_v: 0,
            after_ts: NONE_TS,
            after_v: 0,
            before_q: 0,
            after_q: 0,
        }
    }
}

/// Running checks on the total register within the meter's window.
#[derive(Debug, Clone, Copy, Default)]
struct Steps {
    /// First reading in the window: the rate's span starts here, not at the
    /// window's start (a missing start reading must not dilute the rate).
    first_ts: i64,
    prev_ts: i64,
    prev_v: i64,
    points: u32,
    steps: u32,
    sum: i64,
    zero_run: u16,
    flags: Flags,
}

/// Where a boundary value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Measured,
    Interpolated,
    Extrapolated,
}

/// One meter's state during a bill run.
#[derive(Debug, Clone)]
pub struct MeterState {
    /// Boundary timestamps (UTC ms) clamped to the meter's installation window.
    pub bounds: Vec<i64>,
    /// Register modulus, scaled (10^digits x 10^4).
    pub modulus: i64,
    /// Bit i set = register i is tracked.
    pub mask: u8,
    /// Index of the bound where the bill period starts (bounds before it,
    /// such as a tier-year start, are only read for positions).
    pub first: usize,
    /// `near[reg_slot * bounds.len() + b]`.
    near: Vec<Near>,
    steps: Steps,
    /// Max demand seen in the window (scaled kW), if any.
    pub max_demand: Option<i64>,
    /// Interval energy per TOU period (scaled), when interval data exists.
    pub interval: Option<Box<IntervalAcc>>,
    pub flags: Flags,
}

/// Interval energy per bill segment and TOU period.
#[derive(Debug, Clone, Default)]
pub struct IntervalAcc {
    pub per_segment: Vec<[i64; crate::tariff::tou::MAX_PERIODS]>,
    pub count: u32,
    pub sum: i64,
}

impl MeterState {
    /// `bounds` are UTC ms, ascending; `first` is the index of the period start.
    pub fn new(bounds: Vec<i64>, first: usize, register_digits: u8, mask: u8) -> MeterState {
        let mask = mask | 1; // the total register is always tracked
        let slots = mask.count_ones() as usize;
        let n = bounds.len();
        MeterState {
            bounds,
            modulus: 10i64.pow(register_digits.min(14) as u32) * 10_000,
            mask,
            first,
            near: vec![Near::default(); slots * n],
            steps: Steps {
                prev_ts: NONE_TS,
                ..Steps::default()
            },
            max_demand: None,
            interval: None,
            flags: Flags::NONE,
        }
    }

    fn slot(&self, reg: usize) -> Option<usize> {
        if self.mask & (1 << reg) == 0 {
            return None;
        }
        Some((self.mask & ((1u8 << reg) - 1)).count_ones() as usize)
    }

    /// The bill period as seen by this meter: (start, end) in UTC ms.
    pub fn window(&self) -> (i64, i64) {
        (self.bounds[self.first], self.bounds[self.bounds.len() - 1])
    }

    /// Installed for some of the period (not only earlier in the tier year).
    pub fn in_period(&self) -> bool {
        let (from, to) = self.window();
        from < to
    }

    /// Bill segment containing `ts` (within the window).
    pub fn segment_of(&self, ts: i64) -> usize {
        let inner = &self.bounds[self.first + 1..];
        inner
            .iter()
            .position(|b| ts <= *b)
            .unwrap_or(inner.len().saturating_sub(1))
    }

    /// Feeds one register reading. Readings must come in time order per meter
    /// for the step checks; boundary tracking does not depend on order.
    pub fn register(&mut self, reg: usize, ts: i64, v: i64, q: Quality, cfg: &VeeConfig) {
        let Some(slot) = self.slot(reg) else { return };
        let n = self.bounds.len();
        let qb = q.bits();
        for (b, &at) in self.bounds.iter().enumerate() {
            let near = &mut self.near[slot * n + b];
            if ts <= at && (near.before_ts == NONE_TS || ts >= near.before_ts) {
                near.before_ts = ts;
                near.before_v = v;
                near.before_q = qb;
            }
            if ts >= at && (near.after_ts == NONE_TS || ts <= near.after_ts) {
                near.after_ts = ts;
                near.after_v = v;
                near.after_q = qb;
            }
        }
        if reg == REG_TOTAL {
            let (from, to) = self.window();
            if ts >= from && ts <= to {
                self.step(ts, v, q, cfg);
            }
        }
    }

    fn step(&mut self, ts: i64, v: i64, q: Quality, cfg: &VeeConfig) {
        let s = &mut self.steps;
        if q.contains(Quality::ESTIMATED)
            || q.contains(Quality::EDITED)
            || q.contains(Quality::SUSPECT)
        {
            s.flags |= Flags::SOURCE_QUALITY;
        }
        if q.contains(Quality::CLOCK_SKEW) {
            s.flags |= Flags::CLOCK_SKEW;
        }
        if s.points > 0 {
            if ts <= s.prev_ts {
                return; // duplicate or out of order: the lake keeps one value per key
            }
            if ts - s.prev_ts > cfg.expected_spacing_ms + cfg.expected_spacing_ms / 2 {
                s.flags |= Flags::GAP;
            }
            let mut d = v - s.prev_v;
            if d < 0 && -d > self.modulus / 2 {
                d += self.modulus;
                s.flags |= Flags::ROLLOVER;
            }
            if d < 0 {
                s.flags |= Flags::NEGATIVE_STEP;
            } else {
                if s.steps >= 3
                    && d > cfg.spike_floor
                    && d > cfg.spike_factor * (s.sum / s.steps as i64).max(1)
                {
                    s.flags |= Flags::SPIKE;
                }
                if d == 0 {
                    s.zero_run += 1;
                    if s.zero_run >= cfg.zero_run_readings {
                        s.flags |= Flags::ZERO_RUN;
                    }
                } else {
                    s.zero_run = 0;
                    s.sum += d;
                    s.steps += 1;
                }
                if d == 0 {
                    s.steps += 1;
                }
            }
        }
        if s.points == 0 {
            s.first_ts = ts;
        }
        s.prev_ts = ts;
        s.prev_v = v;
        s.points += 1;
    }

    pub fn demand(&mut self, ts: i64, v: i64) {
        let (from, to) = self.window();
        if ts > from && ts <= to {
            self.max_demand = Some(self.max_demand.map_or(v, |m| m.max(v)));
        }
    }

    /// A clock-skew reading at `ts`: counts inside the meter's window only,
    /// as register readings do (else a bill's flags would depend on which
    /// other partitions the run happened to read).
    pub fn clock_skew(&mut self, ts: i64, seconds_scaled: i64, cfg: &VeeConfig) {
        let (from, to) = self.window();
        if ts >= from && ts <= to && seconds_scaled.abs() > cfg.max_clock_skew_s * 10_000 {
            self.flags |= Flags::CLOCK_SKEW;
        }
    }

    /// Interval energy (scaled kWh) for the interval ending at `ts`, already
    /// assigned to a TOU period by the caller.
    pub fn interval(&mut self, ts: i64, v: i64, period: u8) {
        let (from, to) = self.window();
        if ts > from && ts <= to {
            let seg = self.segment_of(ts);
            let segments = self.bounds.len() - 1 - self.first;
            let acc = self.interval.get_or_insert_with(Box::default);
            if acc.per_segment.len() < segments {
                acc.per_segment
                    .resize(segments, [0; crate::tariff::tou::MAX_PERIODS]);
            }
            acc.per_segment[seg][period as usize] += v;
            acc.count += 1;
            acc.sum += v;
        }
    }

    /// Flags gathered by the streaming checks.
    pub fn step_flags(&self) -> Flags {
        self.steps.flags | self.flags
    }

    /// Mean consumption per ms over the window's steps (scaled kWh), for extrapolation.
    fn rate(&self) -> Option<(i64, i64)> {
        let s = &self.steps;
        if s.points < 2 {
            return None;
        }
        Some((s.sum, s.prev_ts - s.first_ts))
    }

    /// Register value at boundary `b`, measured or estimated.
    pub fn value_at(
        &self,
        reg: usize,
        b: usize,
        cfg: &VeeConfig,
    ) -> Option<(i64, Source, Quality)> {
        let slot = self.slot(reg)?;
        let near = &self.near[slot * self.bounds.len() + b];
        let at = self.bounds[b];
        if near.before_ts == at {
            return Some((
                near.before_v,
                Source::Measured,
                Quality::from_bits(near.before_q),
            ));
        }
        if near.after_ts == at {
            return Some((
                near.after_v,
                Source::Measured,
                Quality::from_bits(near.after_q),
            ));
        }
        let q = Quality::from_bits(near.before_q | near.after_q);
        if near.before_ts != NONE_TS
            && near.after_ts != NONE_TS
            && near.after_ts - near.before_ts <= cfg.max_interpolation_gap_ms
        {
            let mut dv = near.after_v - near.before_v;
            if dv < 0 && -dv > self.modulus / 2 {
                dv += self.modulus;
            }
            let v = near.before_v
                + div_round(
                    dv as i128 * (at - near.before_ts) as i128,
                    (near.after_ts - near.before_ts) as i128,
                );
            return Some((v.rem_euclid(self.modulus), Source::Interpolated, q));
        }
        let (sum, span) = self.rate().unwrap_or((0, 0));
        if near.before_ts != NONE_TS && at - near.before_ts <= cfg.max_extrapolation_ms && span > 0
        {
            let v = near.before_v
                + div_round(sum as i128 * (at - near.before_ts) as i128, span as i128);
            return Some((v.rem_euclid(self.modulus), Source::Extrapolated, q));
        }
        if near.after_ts != NONE_TS && near.after_ts - at <= cfg.max_extrapolation_ms && span > 0 {
            let v =
                near.after_v - div_round(sum as i128 * (near.after_ts - at) as i128, span as i128);
            return Some((v.rem_euclid(self.modulus), Source::Extrapolated, q));
        }
        None
    }

    /// Whether register `reg` has any reading at all near any boundary.
    pub fn has_register(&self, reg: usize) -> bool {
        match self.slot(reg) {
            None => false,
            Some(slot) => {
                let n = self.bounds.len();
                self.near[slot * n..(slot + 1) * n]
                    .iter()
                    .any(|x| x.before_ts != NONE_TS || x.after_ts != NONE_TS)
            }
        }
    }
}

/// Integer division rounding half away from zero.
pub fn div_round(n: i128, d: i128) -> i64 {
    let q = n / d;
    let r = n % d;
    let adj = if 2 * r.abs() >= d.abs() {
        n.signum() * d.signum()
    } else {
        0
    };
    (q + adj) as i64
}

/// Register delta between two values, unwrapping at most one rollover.
/// `None` when the register went backwards (less than half the modulus).
pub fn register_delta(from: i64, to: i64, modulus: i64) -> Option<(i64, bool)> {
    let d = to - from;
    if d >= 0 {
        Some((d, false))
    } else if -d > modulus / 2 {
        Some((d + modulus, true))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = DAY_MS;

    fn feed(s: &mut MeterState, vals: &[(i64, i64)]) {
        let cfg = VeeConfig::default();
        for (t, v) in vals {
            s.register(REG_TOTAL, *t, *v, Quality::OK, &cfg);
        }
    }

    #[test]
    fn a_clock_skew_reading_flags_the_meter_only_inside_its_period() {
        let cfg = VeeConfig::default();
        // A tier-year start before the period: bounds (ytd, start, end).
        let mut s = MeterState::new(vec![0, 100 * DAY, 130 * DAY], 1, 6, 1);
        s.clock_skew(50 * DAY, 400 * 10_000, &cfg);
        s.clock_skew(131 * DAY, -400 * 10_000, &cfg);
        assert!(s.step_flags().is_empty());
        s.clock_skew(110 * DAY, 200 * 10_000, &cfg);
        assert!(s.step_flags().is_empty(), "within the 300 s allowed");
        s.clock_skew(110 * DAY, -400 * 10_000, &cfg);
        assert_eq!(s.step_flags(), Flags::CLOCK_SKEW);
    }

    #[test]
    fn exact_boundary_readings_are_measured() {
        let mut s = MeterState::new(vec![0, 10 * DAY], 0, 6, 1);
        feed(
            &mut s,
            &(0..=10)
                .map(|d| (d * DAY, 1000 + d * 10_000))
                .collect::<Vec<_>>(),
        );
        let cfg = VeeConfig::default();
        assert_eq!(s.value_at(REG_TOTAL, 0, &cfg).unwrap().0, 1000);
        assert_eq!(
            s.value_at(REG_TOTAL, 1, &cfg).unwrap(),
            (101_000, Source::Measured, Quality::OK)
        );
        assert!(s.step_flags().is_empty());
    }

    #[test]
    fn missing_end_reading_is_extrapolated_from_the_average() {
        let mut s = MeterState::new(vec![0, 10 * DAY], 0, 6, 1);
        feed(
            &mut s,
            &(0..=9).map(|d| (d * DAY, d * 10_000)).collect::<Vec<_>>(),
        );
        let (v, src, _) = s.value_at(REG_TOTAL, 1, &VeeConfig::default()).unwrap();
        assert_eq!((v, src), (100_000, Source::Extrapolated));
    }

    #[test]
    fn gap_at_a_boundary_is_interpolated() {
        let mut s = MeterState::new(vec![0, 5 * DAY], 0, 6, 1);
        feed(&mut s, &[(0, 0), (4 * DAY, 40_000), (6 * DAY, 70_000)]);
        let (v, src, _) = s.value_at(REG_TOTAL, 1, &VeeConfig::default()).unwrap();
        assert_eq!((v, src), (55_000, Source::Interpolated));
        assert!(s.step_flags().contains(Flags::GAP));
    }

    #[test]
    fn rollover_and_backwards_steps_are_told_apart() {
        let m = 1_000_000 * 10_000;
        assert_eq!(register_delta(m - 50_000, 30_000, m), Some((80_000, true)));
        assert_eq!(register_delta(50_000, 30_000, m), None);
        let mut s = MeterState::new(vec![0, 3 * DAY], 0, 6, 1);
        feed(
            &mut s,
            &[
                (0, m - 10_000),
                (DAY, 5_000),
                (2 * DAY, 1_000),
                (3 * DAY, 20_000),
            ],
        );
        assert!(s.step_flags().contains(Flags::ROLLOVER));
        assert!(s.step_flags().contains(Flags::NEGATIVE_STEP));
    }

    #[test]
    fn spikes_and_zero_runs_are_flagged() {
        let mut s = MeterState::new(vec![0, 20 * DAY], 0, 6, 1);
        let mut v = vec![];
        for d in 0..5 {
            v.push((d * DAY, d * 10_000));
        }
        v.push((5 * DAY, 4 * 10_000 + 2_000_000));
        feed(&mut s, &v);
        assert!(s.step_flags().contains(Flags::SPIKE));
        let mut z = MeterState::new(vec![0, 20 * DAY], 0, 6, 1);
        feed(&mut z, &(0..=10).map(|d| (d * DAY, 5)).collect::<Vec<_>>());
        assert!(z.step_flags().contains(Flags::ZERO_RUN));
    }
}
