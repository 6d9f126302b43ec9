//! The deduction state machine (pure: no IO). A meter's `import_active_total`
//! register readings, in time order, move a [`Cursor`]; each step from one
//! reading to the next becomes one deduction priced by a [`Pricer`].
//!
//! Rules:
//! * The first reading of a meter only sets the baseline (position 0 unless
//!   it is exactly the start of a window, which is position 0 anyway).
//! * A reading at or before the cursor's last timestamp is stale: ignored
//!   (replays, duplicates, a second process that got there first) -- unless
//!   it is older than the first reading consumed in the current window and
//!   still inside that window (it arrived late, e.g. through another member
//!   of a shared subscription): then the consumption between it and that
//!   first reading is charged "in front", as the step from position P to
//!   P + delta, which keeps the window's total exactly f(total).
//! * The interval ending at `ts` belongs to the window containing `ts - 1 ms`:
//!   a snapshot at local midnight on the 1st closes the previous month. The
//!   cursor moves to the new window (position 0 at that snapshot) only with
//!   the first reading after it, so a late reading of the closed month can
//!   still be charged in front until then.
//! * A gap across a window boundary (no reading exactly at the boundary)
//!   charges the whole gap in the new window from position 0.
//! * Register rollover (a drop from the top tenth of the modulus into the
//!   bottom tenth) counts through the wrap; any other drop is a backwards
//!   reading, skipped without moving the cursor.
//!
//! Idempotency key of a deduction: `ded:ACCOUNT:METER:CHANNEL:END_MS:TARIFF@VERSION`.

use rust_decimal::Decimal;

use super::pricing::{Charge, PriceError, Pricer};
use crate::ledger::{Cursor, EntryKind, NewEntry, TouCursor};
use crate::master::{Account, Meter};
use crate::tariff::price::Usage;
use crate::tariff::tou::MAX_PERIODS;

pub const CHANNEL: &str = "import_active_total";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// First reading: the cursor only.
    Baseline(Cursor),
    /// Deductions (none for a zero charge) and the new cursor.
    Deduct(Vec<NewEntry>, Cursor),
    /// A suspicious jump: held in the cursor, not charged, until the next reading.
    Hold(Cursor),
    /// The held jump was a transient spike and is dropped; this reading's
    /// deductions and the new cursor.
    Spike(Vec<NewEntry>, Cursor),
    Stale,
    Backwards,
    /// A time-of-use account's reading without all tariff registers T1..T4
    /// at the same instant: not charged, the cursor does not move.
    Incomplete,
}

/// A step is a suspicious jump when it is above [`SPIKE_FLOOR_KWH`], more
/// than the contracted capacity could draw in its duration (contracted kVA x
/// hours; [`DEFAULT_CAPACITY_KVA`] when the master data has none) and more
/// than `SPIKE_FACTOR` times what the window's average rate predicts (same
/// factor and floor as the billing VEE's spike check). Requiring all three
/// keeps clean data from being held.
pub const SPIKE_FACTOR: i64 = 10;
pub const SPIKE_FLOOR_KWH: Decimal = Decimal::from_parts(5, 0, 0, false, 0);
pub const DEFAULT_CAPACITY_KVA: Decimal = Decimal::from_parts(20, 0, 0, false, 0);

/// Whether a step of `kwh` ending at `ts_ms` is out of line with the cursor's
/// history and the account's contracted capacity `kva` (0 = unknown). The
/// first step after a baseline has no history and is never held.
pub fn suspicious(c: &Cursor, ts_ms: i64, kwh: Decimal, kva: Decimal) -> bool {
    let dt = Decimal::from(ts_ms - c.last_ts_ms);
    let kva = if kva > Decimal::ZERO {
        kva
    } else {
        DEFAULT_CAPACITY_KVA
    };
    let span = c.last_ts_ms - c.first_ts_ms;
    // Products that overflow a Decimal come from absurd jumps (a corrupt
    // register): such a jump is suspicious, never a panic.
    let possible = match (
        kwh.checked_mul(Decimal::from(3_600_000)),
        kva.checked_mul(dt),
    ) {
        (Some(energy), Some(capacity)) => energy <= capacity,
        (None, _) => false,
        (Some(_), None) => true,
    };
    if span <= 0 || kwh <= SPIKE_FLOOR_KWH || possible {
        return false; // no history to judge by, small, or physically possible
    }
    let usual = (Decimal::from(SPIKE_FACTOR) * c.position).checked_mul(dt);
    match (kwh.checked_mul(Decimal::from(span)), usual) {
        (Some(jump), Some(usual)) => jump > usual,
        (None, _) => true,
        (Some(_), None) => false,
    }
}

/// Register delta with rollover at `modulus`; None for a backwards reading.
pub fn register_delta(from: Decimal, to: Decimal, modulus: Decimal) -> Option<Decimal> {
    if to >= from {
        return Some(to - from);
    }
    let tenth = modulus / Decimal::TEN;
    if from >= modulus - tenth && to < tenth {
        Some(to + modulus - from)
    } else {
        None
    }
}

/// Tariff registers T1..T4 of a reading (time-of-use accounts), raw values.
pub type Regs = [Decimal; 4];

/// The window positions of a cursor as tariff-engine quantities.
pub fn usage_of(c: &Cursor) -> Usage {
    let mut u = Usage::total(c.position);
    if let Some(t) = &c.tou {
        for (slot, p) in u.periods.iter_mut().zip(&t.periods) {
            *slot = *p;
        }
    }
    u
}

fn held_regs(c: &Cursor) -> Option<Regs> {
    c.tou.as_ref().and_then(|t| t.held)
}

/// `c` with its held jump (total and registers) replaced by `held` / `regs`.
fn with_held(c: Cursor, held: Option<(i64, Decimal)>, regs: Option<Regs>) -> Cursor {
    Cursor {
        held,
        tou: c.tou.map(|t| TouCursor { held: regs, ..t }),
        ..c
    }
}

/// One step of the state machine for reading (`ts_ms`, raw register `value`;
/// `regs` = T1..T4 at the same instant, needed on time-of-use tariffs).
///
/// A suspicious jump (see [`suspicious`]) is held in the cursor instead of
/// becoming the base: a later reading at or above it confirms it (both are
/// charged then, in order), a later reading below it but not below the base
/// shows it was a transient spike (dropped: the consumption is charged from
/// the base to the later reading). Registers are cumulative, so dropping a
/// reading never loses energy; it only merges two intervals.
#[allow(clippy::too_many_arguments)]
pub fn step(
    pricer: &dyn Pricer,
    account: &Account,
    meter: &Meter,
    cursor: Option<&Cursor>,
    ts_ms: i64,
    value: Decimal,
    regs: Option<Regs>,
    source: &str,
) -> Result<Step, PriceError> {
    let tou = pricer.registers(account, ts_ms)?.is_some();
    if tou && regs.is_none() {
        return Ok(Step::Incomplete);
    }
    let Some(c) = cursor.filter(|c| c.channel == CHANNEL && (!tou || c.tou.is_some())) else {
        // First reading (or the first with registers after a change to a
        // time-of-use tariff): the base of the next step.
        let w = pricer.window(account, ts_ms)?;
        return Ok(Step::Baseline(Cursor {
            meter_id: meter.meter_id.clone(),
            channel: CHANNEL.into(),
            window_start_ms: w.start_ms,
            position: Decimal::ZERO,
            last_ts_ms: ts_ms,
            last_value: value,
            first_ts_ms: ts_ms,
            first_value: value,
            held: None,
            tou: regs.filter(|_| tou).map(|r| TouCursor {
                last: r,
                first: r,
                periods: vec![Decimal::ZERO; MAX_PERIODS],
                held: None,
                intervals: Vec::new(),
            }),
        }));
    };
    if ts_ms < c.first_ts_ms && ts_ms >= c.window_start_ms {
        return prepend(pricer, account, meter, c, ts_ms, value, regs, source);
    }
    if ts_ms <= c.last_ts_ms {
        return Ok(Step::Stale);
    }
    let Some((hts, hv)) = c.held else {
        return advance(pricer, account, meter, c, ts_ms, value, regs, source, true);
    };
    if ts_ms == hts {
        return Ok(Step::Stale);
    }
    let hregs = held_regs(c);
    let bare = with_held(c.clone(), None, None);
    if ts_ms < hts {
        // Between the base and the held jump: an ordinary step; keep holding.
        return Ok(
            match advance(
                pricer, account, meter, &bare, ts_ms, value, regs, source, true,
            )? {
                Step::Deduct(e, n) => Step::Deduct(e, with_held(n, c.held, hregs)),
                other => other,
            },
        );
    }
    let modulus = meter.modulus();
    if register_delta(hv, value, modulus).is_some() {
        // Confirmed: charge the held reading, then this one.
        let (mut entries, base) =
            match advance(pricer, account, meter, &bare, hts, hv, hregs, source, false)? {
                Step::Deduct(e, n) => (e, n),
                _ => (Vec::new(), bare.clone()),
            };
        return Ok(
            match advance(
                pricer, account, meter, &base, ts_ms, value, regs, source, true,
            )? {
                Step::Deduct(e, n) => {
                    entries.extend(e);
                    Step::Deduct(entries, n)
                }
                Step::Hold(n) => Step::Deduct(entries, n),
                _ => Step::Deduct(entries, base),
            },
        );
    }
    if register_delta(c.last_value, value, modulus).is_some() {
        // Below the held jump, not below the base: the jump was a transient spike.
        return Ok(
            match advance(
                pricer, account, meter, &bare, ts_ms, value, regs, source, true,
            )? {
                Step::Deduct(e, n) => Step::Spike(e, n),
                Step::Hold(n) => Step::Spike(Vec::new(), n),
                _ => Step::Spike(Vec::new(), bare),
            },
        );
    }
    Ok(Step::Backwards)
}

/// Per-period kWh of the register steps `from -> to` (None: a register went backwards).
fn period_deltas(
    map: &[Option<u8>; 4],
    from: &Regs,
    to: &Regs,
    meter: &Meter,
) -> Option<[Decimal; MAX_PERIODS]> {
    let mut out = [Decimal::ZERO; MAX_PERIODS];
    for r in 0..4 {
        let d = register_delta(from[r], to[r], meter.modulus())?;
        if let Some(p) = map[r] {
            out[p as usize] += d * meter.multiplier();
        }
    }
    Some(out)
}

/// Idempotency key of a deduction: `ded:ACCOUNT:METER:CHANNEL:AT:TARIFF@VERSION`,
/// `AT` being the interval end (or `first:from:late` for a late reading).
pub(crate) fn deduction_key(
    account: &Account,
    meter: &Meter,
    channel: &str,
    at: impl std::fmt::Display,
    version: &str,
) -> String {
    format!(
        "ded:{}:{}:{channel}:{at}:{version}",
        account.account_id, meter.meter_id
    )
}

/// The ledger entry of a priced step; None for a zero charge.
pub(crate) fn deduction(
    account: &Account,
    key: String,
    ts_ms: i64,
    charge: &Charge,
    source: &str,
    detail: impl FnOnce() -> String,
) -> Option<NewEntry> {
    (!charge.amount.is_zero()).then(|| NewEntry {
        key,
        account_id: account.account_id.clone(),
        kind: EntryKind::Deduction,
        amount: -charge.amount,
        ts_ms,
        source: source.to_string(),
        detail: detail(),
    })
}

fn entry_detail(
    meter: &Meter,
    kwh: Decimal,
    before: &Usage,
    after: &Usage,
    version: &str,
    late: Option<i64>,
) -> String {
    let late = late.map_or(String::new(), |ts| format!("\"late_reading\":{ts},"));
    let periods = if after.periods.iter().any(|p| !p.is_zero()) {
        let kwh: Vec<String> = after
            .periods
            .iter()
            .zip(before.periods.iter())
            .map(|(a, b)| format!("\"{}\"", (a - b).normalize()))
            .collect();
        format!(",\"period_kwh\":[{}]", kwh.join(","))
    } else {
        String::new()
    };
    format!(
        "{{\"meter\":\"{}\",\"kwh\":\"{}\",{late}\"position_before\":\"{}\",\"position_after\":\"{}\",\"tariff\":\"{}\"{periods}}}",
        meter.meter_id,
        kwh.normalize(),
        before.total.normalize(),
        after.total.normalize(),
        version
    )
}

/// A step forward from `c` (no held jump); `check` = may hold a suspicious jump.
#[allow(clippy::too_many_arguments)]
fn advance(
    pricer: &dyn Pricer,
    account: &Account,
    meter: &Meter,
    c: &Cursor,
    ts_ms: i64,
    value: Decimal,
    regs: Option<Regs>,
    source: &str,
    check: bool,
) -> Result<Step, PriceError> {
    let Some(raw) = register_delta(c.last_value, value, meter.modulus()) else {
        return Ok(Step::Backwards);
    };
    let kwh = raw * meter.multiplier();
    let map = pricer.registers(account, ts_ms)?;
    let tou_step = match (&c.tou, map, regs) {
        (Some(t), Some(map), Some(r)) => match period_deltas(&map, &t.last, &r, meter) {
            Some(d) => Some((t, r, d)),
            None => return Ok(Step::Backwards),
        },
        (Some(_), Some(_), None) => return Ok(Step::Incomplete),
        _ => None,
    };
    if check && suspicious(c, ts_ms, kwh, account.contracted_kva) {
        return Ok(Step::Hold(with_held(c.clone(), Some((ts_ms, value)), regs)));
    }
    let w = pricer.window(account, ts_ms - 1)?;
    let same_window = w.start_ms == c.window_start_ms;
    let before = if same_window {
        usage_of(c)
    } else {
        Usage::default()
    };
    let mut after = before;
    after.total += kwh;
    let tou = tou_step.map(|(t, r, d)| {
        for (p, x) in after.periods.iter_mut().zip(d) {
            *p += x;
        }
        TouCursor {
            last: r,
            first: if same_window { t.first } else { t.last },
            periods: after.periods.to_vec(),
            held: None,
            intervals: Vec::new(),
        }
    });
    let charge = pricer.charge(account, &w, ts_ms, &before, &after)?;
    let entry: Vec<NewEntry> = deduction(
        account,
        deduction_key(account, meter, CHANNEL, ts_ms, &charge.version),
        ts_ms,
        &charge,
        source,
        || entry_detail(meter, kwh, &before, &after, &charge.version, None),
    )
    .into_iter()
    .collect();
    let next = Cursor {
        meter_id: meter.meter_id.clone(),
        channel: CHANNEL.into(),
        window_start_ms: w.start_ms,
        position: after.total,
        last_ts_ms: ts_ms,
        last_value: value,
        first_ts_ms: if same_window {
            c.first_ts_ms
        } else {
            c.last_ts_ms
        },
        first_value: if same_window {
            c.first_value
        } else {
            c.last_value
        },
        held: None,
        tou,
    };
    Ok(Step::Deduct(entry, next))
}

/// A late reading older than the window's first: charge `P -> P + delta`.
#[allow(clippy::too_many_arguments)]
fn prepend(
    pricer: &dyn Pricer,
    account: &Account,
    meter: &Meter,
    c: &Cursor,
    ts_ms: i64,
    value: Decimal,
    regs: Option<Regs>,
    source: &str,
) -> Result<Step, PriceError> {
    let Some(raw) = register_delta(value, c.first_value, meter.modulus()) else {
        return Ok(Step::Backwards);
    };
    let kwh = raw * meter.multiplier();
    let w = pricer.window(account, c.first_ts_ms)?;
    let before = usage_of(c);
    let mut after = before;
    after.total += kwh;
    let tou = match (&c.tou, pricer.registers(account, c.first_ts_ms)?, regs) {
        (Some(t), Some(map), Some(r)) => {
            let Some(d) = period_deltas(&map, &r, &t.first, meter) else {
                return Ok(Step::Backwards);
            };
            for (p, x) in after.periods.iter_mut().zip(d) {
                *p += x;
            }
            Some(TouCursor {
                first: r,
                periods: after.periods.to_vec(),
                ..t.clone()
            })
        }
        (Some(_), Some(_), None) => return Ok(Step::Incomplete),
        _ => c.tou.clone(),
    };
    let charge = pricer.charge(account, &w, c.first_ts_ms, &before, &after)?;
    let entry = deduction(
        account,
        deduction_key(
            account,
            meter,
            CHANNEL,
            format_args!("{}:from:{ts_ms}", c.first_ts_ms),
            &charge.version,
        ),
        c.first_ts_ms,
        &charge,
        source,
        || entry_detail(meter, kwh, &before, &after, &charge.version, Some(ts_ms)),
    );
    let next = Cursor {
        position: after.total,
        first_ts_ms: ts_ms,
        first_value: value,
        tou,
        ..c.clone()
    };
    Ok(Step::Deduct(entry.into_iter().collect(), next))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::prepay::pricing::{Charge, Window};
    use rust_decimal_macros::dec;

    /// Flat 1 yuan/kWh, windows of 10 000 ms.
    struct Flat;
    impl Pricer for Flat {
        fn window(&self, _: &Account, ts: i64) -> Result<Window, PriceError> {
            let s = ts.div_euclid(10_000) * 10_000;
            Ok(Window {
                start_ms: s,
                end_ms: s + 10_000,
                limits: vec![],
            })
        }
        fn charge(
            &self,
            _: &Account,
            _: &Window,
            _: i64,
            b: &Usage,
            a: &Usage,
        ) -> Result<Charge, PriceError> {
            Ok(Charge {
                amount: a.total - b.total,
                version: "flat@1".into(),
            })
        }
    }

    pub(crate) fn meter() -> Meter {
        Meter {
            meter_id: "M1".into(),
            account_id: "A1".into(),
            meter_type: String::new(),
            ct_ratio: dec!(1),
            pt_ratio: dec!(1),
            register_digits: 6,
            installed_on: chrono::NaiveDate::from_ymd_opt(2015, 1, 1).unwrap(),
            removed_on: None,
            feeder: String::new(),
        }
    }

    fn run(readings: &[(i64, Decimal)]) -> (Vec<NewEntry>, Option<Cursor>, usize) {
        let a = crate::prepay::pricing::tests::account("x");
        let m = meter();
        let mut c: Option<Cursor> = None;
        let mut out = Vec::new();
        let mut skipped = 0;
        for (ts, v) in readings {
            match step(&Flat, &a, &m, c.as_ref(), *ts, *v, None, "test").unwrap() {
                Step::Baseline(n) => c = Some(n),
                Step::Deduct(e, n) | Step::Spike(e, n) => {
                    out.extend(e);
                    c = Some(n);
                }
                Step::Hold(n) => c = Some(n),
                Step::Stale | Step::Backwards | Step::Incomplete => skipped += 1,
            }
        }
        (out, c, skipped)
    }

    #[test]
    fn replayed_and_older_readings_are_stale() {
        let (e, _, skipped) = run(&[
            (1000, dec!(5)),
            (2000, dec!(7)),
            (2000, dec!(7)),
            (1500, dec!(6)),
        ]);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].amount, dec!(-2));
        assert_eq!(skipped, 2);
    }

    #[test]
    fn a_reading_at_the_window_end_closes_it_and_resets_the_position() {
        let (e, c, _) = run(&[(0, dec!(0)), (10_000, dec!(4)), (15_000, dec!(5))]);
        assert_eq!(e.len(), 2);
        let c = c.unwrap();
        assert_eq!((c.window_start_ms, c.position), (10_000, dec!(1)));
    }

    #[test]
    fn register_rollover_counts_through_the_wrap_and_backwards_is_skipped() {
        assert_eq!(
            register_delta(dec!(999999.5), dec!(0.5), dec!(1000000)),
            Some(dec!(1))
        );
        assert_eq!(register_delta(dec!(500), dec!(400), dec!(1000000)), None);
        let (e, _, skipped) = run(&[(0, dec!(10)), (1000, dec!(9)), (2000, dec!(12))]);
        assert_eq!((e.len(), skipped), (1, 1));
        assert_eq!(e[0].amount, dec!(-2));
    }

    #[test]
    fn a_late_older_reading_is_charged_in_front_and_the_total_is_unchanged() {
        let (e, c, skipped) = run(&[
            (3000, dec!(7)),
            (5000, dec!(9)),
            (1000, dec!(2)),
            (1000, dec!(2)),
        ]);
        assert_eq!(skipped, 1);
        let sum: Decimal = e.iter().map(|x| x.amount).sum();
        assert_eq!(sum, dec!(-7));
        let c = c.unwrap();
        assert_eq!(
            (c.first_ts_ms, c.position, c.last_ts_ms),
            (1000, dec!(7), 5000)
        );
    }

    #[test]
    fn deduction_keys_name_account_meter_channel_end_and_version() {
        let (e, _, _) = run(&[(0, dec!(0)), (1000, dec!(1))]);
        assert_eq!(e[0].key, "ded:A1:M1:import_active_total:1000:flat@1");
    }

    #[test]
    fn a_one_reading_spike_is_dropped_and_the_meter_keeps_being_charged() {
        let (e, c, skipped) = run(&[
            (0, dec!(0)),
            (1000, dec!(1)),
            (2000, dec!(2)),
            (3000, dec!(1002)),
            (4000, dec!(3)),
            (5000, dec!(4)),
        ]);
        assert_eq!(skipped, 0);
        let ends: Vec<i64> = e.iter().map(|x| x.ts_ms).collect();
        assert_eq!(ends, vec![1000, 2000, 4000, 5000]);
        let sum: Decimal = e.iter().map(|x| x.amount).sum();
        assert_eq!(sum, dec!(-4));
        let c = c.unwrap();
        assert_eq!((c.last_value, c.held), (dec!(4), None));
    }

    #[test]
    fn a_held_jump_confirmed_by_the_next_reading_is_charged_in_order() {
        let (e, c, _) = run(&[
            (0, dec!(0)),
            (1000, dec!(1)),
            (2000, dec!(2)),
            (3000, dec!(1002)),
            (4000, dec!(1003)),
        ]);
        let ends: Vec<(i64, Decimal)> = e.iter().map(|x| (x.ts_ms, x.amount)).collect();
        assert_eq!(
            ends,
            vec![
                (1000, dec!(-1)),
                (2000, dec!(-1)),
                (3000, dec!(-1000)),
                (4000, dec!(-1))
            ]
        );
        assert_eq!(c.unwrap().held, None);
    }

    #[test]
    fn an_ordinary_step_is_never_held() {
        let c = Cursor {
            meter_id: "M1".into(),
            channel: CHANNEL.into(),
            window_start_ms: 0,
            position: dec!(10),
            last_ts_ms: 86_400_000,
            last_value: dec!(10),
            first_ts_ms: 0,
            first_value: dec!(0),
            held: None,
            tou: None,
        };
        // 90 kWh in a day after 10 kWh/day: above 10x, but a 20 kVA supply can draw it.
        assert!(!suspicious(&c, 2 * 86_400_000, dec!(90), Decimal::ZERO));
        assert!(suspicious(&c, 2 * 86_400_000, dec!(2000), Decimal::ZERO));
        // Within capacity and the window's rate: not held even above the floor.
        assert!(!suspicious(&c, 2 * 86_400_000, dec!(20), dec!(1)));
    }
}
