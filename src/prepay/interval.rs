//! Deductions from 15-minute interval readings (pure: no IO), for accounts
//! on a time-of-use tariff whose meters have no tariff registers T1..T4.
//!
//! Each `import_active_interval` reading is the energy of the 15 minutes
//! ending at its timestamp. It is charged once, in the TOU period its
//! interval starts in, as `f(after) - f(before)` on the window's positions,
//! exactly like a register step. The bill run prices the same intervals into
//! the same periods, so the deductions of a window add up to its bill.
//!
//! Intervals are independent, so a late one is simply charged when it
//! arrives. The cursor records which slots of the window are charged, so a
//! replay or duplicate is stale and never charged twice. An interval of a
//! window the cursor has already left is stale too, the same rule as for
//! late register readings.
//!
//! Idempotency key: `ded:ACCOUNT:METER:import_active_interval:END_MS:TARIFF@VERSION`.

use rust_decimal::Decimal;

use super::deduct::{deduction, deduction_key, usage_of, Step};
use super::pricing::{PriceError, Pricer};
use crate::ledger::{Cursor, NewEntry, TouCursor};
use crate::master::{Account, Meter};
use crate::tariff::tou::MAX_PERIODS;

pub const CHANNEL: &str = "import_active_interval";
pub const INTERVAL_MS: i64 = 900_000;

/// One interval reading: `kwh` (raw, before CT x PT) consumed in the 15
/// minutes ending at `ts_ms`.
pub fn step(
    pricer: &dyn Pricer,
    account: &Account,
    meter: &Meter,
    cursor: Option<&Cursor>,
    ts_ms: i64,
    kwh: Decimal,
    source: &str,
) -> Result<Step, PriceError> {
    if kwh.is_sign_negative() && !kwh.is_zero() {
        return Ok(Step::Backwards);
    }
    let w = pricer.window(account, ts_ms - 1)?;
    let c = match cursor.filter(|c| c.channel == CHANNEL && c.tou.is_some()) {
        Some(c) if c.window_start_ms == w.start_ms => c.clone(),
        Some(c) if c.window_start_ms > w.start_ms => return Ok(Step::Stale),
        _ => Cursor {
            meter_id: meter.meter_id.clone(),
            channel: CHANNEL.into(),
            window_start_ms: w.start_ms,
            position: Decimal::ZERO,
            last_ts_ms: ts_ms,
            last_value: Decimal::ZERO,
            first_ts_ms: ts_ms - INTERVAL_MS,
            first_value: Decimal::ZERO,
            held: None,
            tou: Some(TouCursor {
                periods: vec![Decimal::ZERO; MAX_PERIODS],
                ..Default::default()
            }),
        },
    };
    let slot = u32::try_from((ts_ms - 1 - w.start_ms) / INTERVAL_MS).unwrap_or(u32::MAX);
    let mut tou = c.tou.clone().expect("interval cursors carry periods");
    if contains(&tou.intervals, slot) {
        return Ok(Step::Stale);
    }
    let period = pricer.period_at(account, ts_ms - INTERVAL_MS)?;
    let kwh = kwh * meter.multiplier();
    let before = usage_of(&c);
    let mut after = before;
    after.total += kwh;
    if let Some(p) = after.periods.get_mut(period) {
        *p += kwh;
    }
    let charge = pricer.charge(account, &w, ts_ms, &before, &after)?;
    let entries: Vec<NewEntry> = deduction(
        account,
        deduction_key(account, meter, CHANNEL, ts_ms, &charge.version),
        ts_ms,
        &charge,
        source,
        || {
            format!(
                "{{\"meter\":\"{}\",\"kwh\":\"{}\",\"interval_end\":{ts_ms},\"period\":{period},\"position_before\":\"{}\",\"position_after\":\"{}\",\"tariff\":\"{}\"}}",
                meter.meter_id,
                kwh.normalize(),
                before.total.normalize(),
                after.total.normalize(),
                charge.version
            )
        },
    )
    .into_iter()
    .collect();
    insert(&mut tou.intervals, slot);
    tou.periods = after.periods.to_vec();
    let next = Cursor {
        position: after.total,
        last_ts_ms: c.last_ts_ms.max(ts_ms),
        first_ts_ms: c.first_ts_ms.min(ts_ms - INTERVAL_MS),
        tou: Some(tou),
        ..c
    };
    Ok(Step::Deduct(entries, next))
}

fn contains(ranges: &[(u32, u32)], slot: u32) -> bool {
    let i = ranges.partition_point(|r| r.1 <= slot);
    ranges.get(i).is_some_and(|r| r.0 <= slot)
}

/// Adds `slot` (not yet present), merging with the neighbouring ranges.
fn insert(ranges: &mut Vec<(u32, u32)>, slot: u32) {
    let i = ranges.partition_point(|r| r.1 < slot);
    let end = slot.saturating_add(1);
    let joins_left = i < ranges.len() && ranges[i].1 == slot;
    let right = if joins_left { i + 1 } else { i };
    let joins_right = right < ranges.len() && ranges[right].0 == end;
    match (joins_left, joins_right) {
        (true, true) => {
            ranges[i].1 = ranges[right].1;
            ranges.remove(right);
        }
        (true, false) => ranges[i].1 = end,
        (false, true) => ranges[right].0 = slot,
        (false, false) => ranges.insert(i, (slot, end)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prepay::pricing::tests::account;
    use crate::prepay::pricing::{local_midnight_ms, TariffPricer};
    use crate::tariff::price::{energy_charge, total, Usage};
    use chrono::NaiveDate;
    use proptest::prelude::*;

    #[test]
    fn slot_ranges_merge_and_answer_membership() {
        let mut r = Vec::new();
        for s in [5, 7, 6, 0, 2, 1] {
            assert!(!contains(&r, s));
            insert(&mut r, s);
            assert!(contains(&r, s));
        }
        assert_eq!(r, vec![(0, 3), (5, 8)]);
        assert!(!contains(&r, 3) && !contains(&r, 4) && !contains(&r, 8));
        insert(&mut r, 4);
        insert(&mut r, 3);
        assert_eq!(r, vec![(0, 8)]);
    }

    /// The Guangdong TOU tariff without its register map: an interval-only meter.
    fn pricer() -> TariffPricer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tariffs");
        let mut set = crate::tariff::load_dir(&dir).expect("sample tariffs load");
        let t = set
            .tariffs
            .get_mut("gd-tou-commercial")
            .expect("sample tariff");
        for v in &mut t.versions {
            if let Some(tou) = v.tou.as_mut() {
                tou.registers = [None; 4];
            }
        }
        TariffPricer::new(set)
    }

    fn meter() -> Meter {
        // Multiplier 1: the raw interval is the charged energy.
        crate::prepay::deduct::tests::meter()
    }

    fn october_start() -> i64 {
        local_midnight_ms(NaiveDate::from_ymd_opt(2026, 10, 1).unwrap(), 8 * 3600)
    }

    /// Charges `kwh[i]` as the interval ending at window start + (i+1) x 15 min,
    /// in the given order; returns the sum charged and the final cursor.
    fn charge_all(p: &TariffPricer, order: &[usize], kwh: &[Decimal]) -> (Decimal, Cursor) {
        let a = account("gd-tou-commercial");
        let m = meter();
        let mut cur: Option<Cursor> = None;
        let mut sum = Decimal::ZERO;
        for &i in order {
            let ts = october_start() + (i as i64 + 1) * INTERVAL_MS;
            match step(p, &a, &m, cur.as_ref(), ts, kwh[i], "test").unwrap() {
                Step::Deduct(e, c) => {
                    sum += e.iter().map(|e| -e.amount).sum::<Decimal>();
                    cur = Some(c);
                }
                other => panic!("interval {i}: {other:?}"),
            }
        }
        (sum, cur.expect("charged"))
    }

    /// The window's bill from the same intervals, priced period by period.
    fn bill(p: &TariffPricer, kwh: &[Decimal]) -> Decimal {
        let a = account("gd-tou-commercial");
        let mut u = Usage::default();
        for (i, k) in kwh.iter().enumerate() {
            let start = october_start() + i as i64 * INTERVAL_MS;
            u.total += k;
            u.periods[p.period_at(&a, start).unwrap()] += k;
        }
        let w = p.window(&a, october_start()).unwrap();
        let v = p
            .set
            .get("gd-tou-commercial")
            .unwrap()
            .version_on(NaiveDate::from_ymd_opt(2026, 10, 1).unwrap())
            .unwrap();
        total(&energy_charge(v, &w.limits, &Usage::default(), &u))
    }

    #[test]
    fn a_day_of_intervals_is_charged_by_period_and_adds_up_to_the_bill() {
        let p = pricer();
        let kwh: Vec<Decimal> = (0..96).map(|i| Decimal::new(100 + i * 7, 2)).collect();
        let order: Vec<usize> = (0..96).collect();
        let (sum, c) = charge_all(&p, &order, &kwh);
        assert_eq!(sum, bill(&p, &kwh));
        assert_eq!(c.position, kwh.iter().copied().sum::<Decimal>());
        let tou = c.tou.unwrap();
        assert_eq!(tou.intervals, vec![(0, 96)]);
        assert!(
            tou.periods.iter().filter(|x| !x.is_zero()).count() >= 3,
            "a Guangdong day has sharp, peak, flat and valley hours: {:?}",
            tou.periods
        );
    }

    #[test]
    fn a_replayed_interval_is_stale_and_a_late_one_is_charged_once() {
        let p = pricer();
        let a = account("gd-tou-commercial");
        let m = meter();
        let kwh = vec![Decimal::new(125, 2); 8];
        // Interval 3 arrives last (late), after its neighbours.
        let (sum, c) = charge_all(&p, &[0, 1, 2, 4, 5, 6, 7, 3], &kwh);
        assert_eq!(sum, bill(&p, &kwh));
        assert_eq!(c.tou.as_ref().unwrap().intervals, vec![(0, 8)]);
        for i in [0i64, 3, 7] {
            let ts = october_start() + (i + 1) * INTERVAL_MS;
            assert_eq!(
                step(&p, &a, &m, Some(&c), ts, Decimal::ONE, "test").unwrap(),
                Step::Stale
            );
        }
    }

    #[test]
    fn an_interval_of_a_window_already_left_is_stale() {
        let p = pricer();
        let a = account("gd-tou-commercial");
        let m = meter();
        let nov = local_midnight_ms(NaiveDate::from_ymd_opt(2026, 11, 1).unwrap(), 8 * 3600);
        let Step::Deduct(_, c) =
            step(&p, &a, &m, None, nov + INTERVAL_MS, Decimal::ONE, "test").unwrap()
        else {
            panic!("charged");
        };
        // The last interval of October ends exactly at November's start.
        assert_eq!(
            step(&p, &a, &m, Some(&c), nov, Decimal::ONE, "test").unwrap(),
            Step::Stale
        );
    }

    proptest! {
        #[test]
        fn intervals_in_any_order_add_up_to_the_bill(
            kwh in proptest::collection::vec(0i64..400, 1..200),
            seed in any::<u64>(),
        ) {
            let p = pricer();
            let kwh: Vec<Decimal> = kwh.into_iter().map(|k| Decimal::new(k, 2)).collect();
            let mut order: Vec<usize> = (0..kwh.len()).collect();
            // A deterministic shuffle from the seed.
            let mut x = seed | 1;
            for i in (1..order.len()).rev() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                order.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let (sum, _) = charge_all(&p, &order, &kwh);
            prop_assert_eq!(sum, bill(&p, &kwh));
        }
    }
}
