//! One pass over the readings lake: daily consumption per meter from the
//! cumulative registers, 15-minute interval energy, communication gaps,
//! zero-voltage readings and per-collector counts. Everything exact: energy
//! is kept as i64 in units of 0.0001 kWh (the lake's scale).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use arrow::array::{Array, Decimal128Array, StringArray, TimestampMillisecondArray};
use chrono::{Duration, NaiveDate};
use rust_decimal::Decimal;

use super::AnalyticsError;
use crate::master::Meter;
use crate::store::reader;

/// Lake values and all energy here: 4 decimals.
pub const SCALE: u8 = 4;
const DAY_MS: i64 = 86_400_000;

/// Registers read for daily use: total, then tariff 1..4 (sharp, peak, flat, valley).
pub const REGISTERS: [&str; 5] = [
    "import_active_total",
    "import_active_t1",
    "import_active_t2",
    "import_active_t3",
    "import_active_t4",
];

/// Energy of one meter on one local day, primary side (x CT x PT).
#[derive(Debug, Clone, PartialEq)]
pub struct DayUse {
    pub meter: u32,
    pub date: NaiveDate,
    /// Total and tariff 1..4, units of 0.0001 kWh; None when a register was missing.
    pub regs: [Option<i64>; 5],
    /// Spread over a gap of missing snapshots, or read from estimated values.
    pub estimated: bool,
}

/// Interval energy (15-minute load profile), primary side.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IntervalUse {
    pub meter: u32,
    pub ts_ms: i64,
    pub e4: i64,
}

/// A stretch of time a meter was not heard from, or read zero volts.
#[derive(Debug, Clone, PartialEq)]
pub struct MeterEvent {
    pub meter: u32,
    /// `comm_loss` (daily snapshots missing) or `zero_voltage`.
    pub kind: &'static str,
    pub start_ms: i64,
    pub end_ms: i64,
    /// Snapshots missed (comm_loss) or zero readings seen (zero_voltage).
    pub count: i64,
}

/// Reading counts of one collector (and bus: the source address before its first `/`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CollectorStats {
    pub readings: u64,
    pub ok: u64,
    pub estimated: u64,
    pub suspect: u64,
    pub device_error: u64,
    pub offline: u64,
    pub quarantined: u64,
    pub meters: u64,
}

#[derive(Debug, Default)]
pub struct Scan {
    pub daily: Vec<DayUse>,
    pub intervals: Vec<IntervalUse>,
    pub events: Vec<MeterEvent>,
    /// (collector, bus) -> counts; bus "" for the collector as a whole.
    pub collectors: BTreeMap<(String, String), CollectorStats>,
    pub unknown_meter_readings: u64,
    pub backwards_pairs: u64,
    pub readings: u64,
    pub first_date: Option<NaiveDate>,
    pub last_date: Option<NaiveDate>,
}

/// (meter, register) -> snapshots (ts, raw value, estimated).
type Snapshots = HashMap<(u32, u8), Vec<(i64, i64, bool)>>;

/// Local calendar date of a UTC instant.
pub fn local_date(ts_ms: i64, offset_secs: i32) -> NaiveDate {
    let local = ts_ms + offset_secs as i64 * 1000;
    NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid") + Duration::days(local.div_euclid(DAY_MS))
}

/// Local hour of day (0..23) of a UTC instant.
pub fn local_hour(ts_ms: i64, offset_secs: i32) -> u32 {
    ((ts_ms + offset_secs as i64 * 1000).rem_euclid(DAY_MS) / 3_600_000) as u32
}

fn to_primary(delta_e4: i64, multiplier: Decimal) -> i64 {
    let v = Decimal::from_i128_with_scale(delta_e4 as i128, SCALE as u32) * multiplier;
    let v = v.round_dp(SCALE as u32);
    let m = v.mantissa() * 10i128.pow(SCALE as u32 - v.scale().min(SCALE as u32));
    m.clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

/// Reads the lake's `readings` (and `quarantine` counts). `meters` gives
/// multipliers and register moduli; readings of meters not in it are counted
/// and skipped.
pub fn scan_lake(lake: &Path, meters: &[Meter], offset_secs: i32) -> Result<Scan, AnalyticsError> {
    let index: HashMap<&str, u32> = meters
        .iter()
        .enumerate()
        .map(|(i, m)| (m.meter_id.as_str(), i as u32))
        .collect();
    let mut scan = Scan::default();
    // (meter, register) -> snapshots (ts, raw, estimated)
    let mut regs: Snapshots = HashMap::new();
    let mut volts: HashMap<u32, Vec<(i64, bool)>> = HashMap::new();
    let mut slots: HashMap<(String, String), usize> = HashMap::new();
    let mut stats: Vec<(CollectorStats, std::collections::HashSet<u32>)> = Vec::new();
    let mut cache = RowCache::default();
    let mut last_meter_id = String::new();
    let mut last_meter: Option<u32> = None;
    let files = reader::list_files(lake, "readings", NaiveDate::MIN, NaiveDate::MAX)?;
    let cols = [
        "meter_id",
        "ts",
        "channel",
        "value",
        "quality",
        "source_collector",
        "source_address",
    ];
    for (_, path) in &files {
        for b in reader::read_file_columns(path, Some(&cols))? {
            let get = |n: &str| {
                b.column_by_name(n).ok_or_else(|| {
                    AnalyticsError::Invalid(format!("{}: no column {n}", path.display()))
                })
            };
            let meter_id = get("meter_id")?.as_any().downcast_ref::<StringArray>();
            let ts = get("ts")?
                .as_any()
                .downcast_ref::<TimestampMillisecondArray>();
            let channel = get("channel")?.as_any().downcast_ref::<StringArray>();
            let value = get("value")?.as_any().downcast_ref::<Decimal128Array>();
            let quality = get("quality")?.as_any().downcast_ref::<StringArray>();
            let collector = get("source_collector")?
                .as_any()
                .downcast_ref::<StringArray>();
            let address = get("source_address")?
                .as_any()
                .downcast_ref::<StringArray>();
            let (
                Some(meter_id),
                Some(ts),
                Some(channel),
                Some(value),
                Some(quality),
                Some(collector),
                Some(address),
            ) = (meter_id, ts, channel, value, quality, collector, address)
            else {
                return Err(AnalyticsError::Invalid(format!(
                    "{}: not a readings file",
                    path.display()
                )));
            };
            for i in 0..b.num_rows() {
                scan.readings += 1;
                let q = quality.value(i);
                let col = collector.value(i);
                let bus = address.value(i).split('/').next().unwrap_or("");
                // Rows come sorted by meter: the collector, bus and meter rarely change.
                if !cache.ready || col != cache.col || bus != cache.bus {
                    cache.ready = true;
                    cache.col = col.to_string();
                    cache.bus = bus.to_string();
                    cache.slots = [
                        slot(&mut slots, &mut stats, (cache.col.clone(), String::new())),
                        slot(
                            &mut slots,
                            &mut stats,
                            (cache.col.clone(), cache.bus.clone()),
                        ),
                    ];
                    cache.meter = None;
                }
                let mid = meter_id.value(i);
                if mid != last_meter_id {
                    last_meter_id.clear();
                    last_meter_id.push_str(mid);
                    last_meter = index.get(mid).copied();
                }
                let m = last_meter;
                let flags: [bool; 5] = if q == "ok" {
                    [true, false, false, false, false]
                } else {
                    let has = |f: &str| q.split(',').any(|x| x == f);
                    [
                        false,
                        has("estimated"),
                        has("suspect"),
                        has("device_error"),
                        has("offline"),
                    ]
                };
                for k in cache.slots {
                    let (s, set) = &mut stats[k];
                    s.readings += 1;
                    s.ok += flags[0] as u64;
                    s.estimated += flags[1] as u64;
                    s.suspect += flags[2] as u64;
                    s.device_error += flags[3] as u64;
                    s.offline += flags[4] as u64;
                    if let Some(m) = m.filter(|m| cache.meter != Some(*m)) {
                        set.insert(m);
                    }
                }
                cache.meter = m;
                let Some(m) = m else {
                    scan.unknown_meter_readings += 1;
                    continue;
                };
                let t = ts.value(i);
                let d = local_date(t, offset_secs);
                scan.first_date = Some(scan.first_date.map_or(d, |x| x.min(d)));
                scan.last_date = Some(scan.last_date.map_or(d, |x| x.max(d)));
                let ch = channel.value(i);
                let raw = value.value(i);
                let raw = raw.clamp(i64::MIN as i128, i64::MAX as i128) as i64;
                if let Some(r) = REGISTERS.iter().position(|x| *x == ch) {
                    let est = q.contains("estimated");
                    regs.entry((m, r as u8)).or_default().push((t, raw, est));
                } else if ch == "import_active_interval" {
                    let mult = meters[m as usize].multiplier();
                    scan.intervals.push(IntervalUse {
                        meter: m,
                        ts_ms: t,
                        e4: to_primary(raw, mult),
                    });
                } else if ch.starts_with("voltage_") {
                    volts.entry(m).or_default().push((t, raw == 0));
                }
            }
        }
    }
    for (key, k) in slots {
        let (mut s, set) = std::mem::take(&mut stats[k]);
        s.meters = set.len() as u64;
        scan.collectors.insert(key, s);
    }
    count_quarantine(lake, &mut scan)?;
    daily_from_registers(meters, regs, offset_secs, &mut scan);
    zero_voltage_events(volts, &mut scan);
    silent_meters(meters, offset_secs, &mut scan);
    scan.daily.sort_by_key(|d| (d.meter, d.date));
    scan.events.sort_by_key(|e| (e.meter, e.start_ms));
    Ok(scan)
}

/// The collector/bus slots of the previous row.
#[derive(Default)]
struct RowCache {
    ready: bool,
    col: String,
    bus: String,
    slots: [usize; 2],
    meter: Option<u32>,
}

fn slot(
    slots: &mut HashMap<(String, String), usize>,
    stats: &mut Vec<(CollectorStats, std::collections::HashSet<u32>)>,
    key: (String, String),
) -> usize {
    *slots.entry(key).or_insert_with(|| {
        stats.push(Default::default());
        stats.len() - 1
    })
}

fn count_quarantine(lake: &Path, scan: &mut Scan) -> Result<(), AnalyticsError> {
    for (_, path) in reader::list_files(lake, "quarantine", NaiveDate::MIN, NaiveDate::MAX)? {
        for b in reader::read_file_columns(&path, Some(&["source_collector", "source_address"]))? {
            let (Some(c), Some(a)) = (
                b.column_by_name("source_collector")
                    .and_then(|c| c.as_any().downcast_ref::<StringArray>()),
                b.column_by_name("source_address")
                    .and_then(|c| c.as_any().downcast_ref::<StringArray>()),
            ) else {
                continue;
            };
            for i in 0..b.num_rows() {
                let col = c.value(i).to_string();
                let bus = a.value(i).split('/').next().unwrap_or("").to_string();
                scan.collectors
                    .entry((col.clone(), String::new()))
                    .or_default()
                    .quarantined += 1;
                scan.collectors.entry((col, bus)).or_default().quarantined += 1;
            }
        }
    }
    Ok(())
}

fn daily_from_registers(meters: &[Meter], regs: Snapshots, offset_secs: i32, scan: &mut Scan) {
    let mut days: BTreeMap<(u32, NaiveDate), DayUse> = BTreeMap::new();
    for ((m, r), mut snaps) in regs {
        snaps.sort_by_key(|s| s.0);
        snaps.dedup_by_key(|s| s.0);
        let meter = &meters[m as usize];
        let modulus = (meter.modulus() * Decimal::from(10_000))
            .try_into()
            .unwrap_or(i64::MAX);
        let mult = meter.multiplier();
        for w in snaps.windows(2) {
            let ((tp, vp, ep), (t, v, e)) = (w[0], w[1]);
            let span = ((t - tp) as f64 / DAY_MS as f64).round() as i64;
            if span < 1 {
                continue;
            }
            let mut delta = v - vp;
            if delta < 0 {
                // A wrap near the top of the register is a rollover; anything else went backwards.
                if vp > modulus / 10 * 9 && v < modulus / 10 {
                    delta += modulus;
                } else {
                    if r == 0 {
                        scan.backwards_pairs += 1;
                    }
                    continue;
                }
            }
            if r == 0 && span > 1 {
                scan.events.push(MeterEvent {
                    meter: m,
                    kind: "comm_loss",
                    start_ms: tp,
                    end_ms: t,
                    count: span - 1,
                });
            }
            let primary = to_primary(delta, mult);
            let start = local_date(tp, offset_secs);
            // Spread a multi-day gap evenly; the remainder goes to the last day.
            let each = primary / span;
            for k in 0..span {
                let part = if k == span - 1 {
                    primary - each * (span - 1)
                } else {
                    each
                };
                let d = start + Duration::days(k);
                let du = days.entry((m, d)).or_insert(DayUse {
                    meter: m,
                    date: d,
                    regs: [None; 5],
                    estimated: false,
                });
                du.regs[r as usize] = Some(du.regs[r as usize].unwrap_or(0) + part);
                du.estimated |= span > 1 || ep || e;
            }
        }
    }
    scan.daily.extend(days.into_values());
}

fn zero_voltage_events(volts: HashMap<u32, Vec<(i64, bool)>>, scan: &mut Scan) {
    for (m, mut v) in volts {
        v.sort();
        let mut open: Option<(i64, i64, i64)> = None; // start, last zero, count
        for (t, zero) in v {
            match (zero, open) {
                (true, None) => open = Some((t, t, 1)),
                (true, Some((s, _, n))) => open = Some((s, t, n + 1)),
                (false, Some((s, _, n))) => {
                    scan.events.push(MeterEvent {
                        meter: m,
                        kind: "zero_voltage",
                        start_ms: s,
                        end_ms: t,
                        count: n,
                    });
                    open = None;
                }
                (false, None) => {}
            }
        }
        if let Some((s, l, n)) = open {
            scan.events.push(MeterEvent {
                meter: m,
                kind: "zero_voltage",
                start_ms: s,
                end_ms: l,
                count: n,
            });
        }
    }
}

/// Meters installed over the whole scanned period that sent no register at all.
fn silent_meters(meters: &[Meter], offset_secs: i32, scan: &mut Scan) {
    let (Some(first), Some(last)) = (scan.first_date, scan.last_date) else {
        return;
    };
    let heard: std::collections::HashSet<u32> = scan.daily.iter().map(|d| d.meter).collect();
    let off = offset_secs as i64 * 1000;
    let ms = |d: NaiveDate| {
        (d - NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid")).num_days() * DAY_MS - off
    };
    for (i, m) in meters.iter().enumerate() {
        let active = m.installed_on <= first && m.removed_on.is_none_or(|r| r > last);
        if active && !heard.contains(&(i as u32)) {
            let days = (last - first).num_days() + 1;
            scan.events.push(MeterEvent {
                meter: i as u32,
                kind: "comm_loss",
                start_ms: ms(first),
                end_ms: ms(last + Duration::days(1)),
                count: days,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_dates_follow_the_offset() {
        // 2026-09-30T16:00Z is local midnight of 1 October at UTC+8.
        let t = chrono::DateTime::parse_from_rfc3339("2026-09-30T16:00:00Z")
            .unwrap()
            .timestamp_millis();
        assert_eq!(
            local_date(t, 8 * 3600),
            NaiveDate::from_ymd_opt(2026, 10, 1).unwrap()
        );
        assert_eq!(
            local_date(t, 0),
            NaiveDate::from_ymd_opt(2026, 9, 30).unwrap()
        );
        assert_eq!(local_hour(t, 8 * 3600), 0);
    }

    fn meter(digits: u8) -> Meter {
        Meter {
            meter_id: "m1".into(),
            account_id: "a1".into(),
            meter_type: String::new(),
            ct_ratio: Decimal::ONE,
            pt_ratio: Decimal::ONE,
            register_digits: digits,
            installed_on: NaiveDate::from_ymd_opt(2020, 1, 1).unwrap(),
            removed_on: None,
            feeder: "F1".into(),
        }
    }

    #[test]
    fn a_missing_snapshot_is_spread_flagged_and_reported_as_comm_loss() {
        let mut regs = Snapshots::new();
        // Snapshots on days 0, 1 and 3 (day 2 missing): 10 kWh, then 30 kWh over two days.
        regs.insert(
            (0, 0),
            vec![
                (0, 0, false),
                (DAY_MS, 100_000, false),
                (3 * DAY_MS, 400_000, false),
            ],
        );
        let mut scan = Scan::default();
        daily_from_registers(&[meter(6)], regs, 0, &mut scan);
        let days: Vec<(i64, bool)> = scan
            .daily
            .iter()
            .map(|d| (d.regs[0].unwrap(), d.estimated))
            .collect();
        assert_eq!(
            days,
            vec![(100_000, false), (150_000, true), (150_000, true)]
        );
        assert_eq!(scan.events.len(), 1);
        assert_eq!(
            (scan.events[0].kind, scan.events[0].count),
            ("comm_loss", 1)
        );
    }

    #[test]
    fn a_register_wrapping_at_its_modulus_is_a_rollover_not_a_fall() {
        let mut regs = Snapshots::new();
        // 4-digit register: 9999.0 -> 0001.0 is 2 kWh.
        regs.insert(
            (0, 0),
            vec![(0, 99_990_000, false), (DAY_MS, 10_000, false)],
        );
        let mut scan = Scan::default();
        daily_from_registers(&[meter(4)], regs, 0, &mut scan);
        assert_eq!(scan.daily[0].regs[0], Some(20_000));
        assert_eq!(scan.backwards_pairs, 0);
    }

    #[test]
    fn a_register_going_backwards_is_left_out_and_counted() {
        let mut regs = Snapshots::new();
        regs.insert((0, 0), vec![(0, 500_000, false), (DAY_MS, 400_000, false)]);
        let mut scan = Scan::default();
        daily_from_registers(&[meter(6)], regs, 0, &mut scan);
        assert!(scan.daily.is_empty());
        assert_eq!(scan.backwards_pairs, 1);
    }

    #[test]
    fn consecutive_zero_voltage_readings_make_one_event() {
        let mut volts = HashMap::new();
        volts.insert(
            0u32,
            vec![(0, false), (10, true), (20, true), (30, false), (40, true)],
        );
        let mut scan = Scan::default();
        zero_voltage_events(volts, &mut scan);
        scan.events.sort_by_key(|e| e.start_ms);
        let ev: Vec<(i64, i64, i64)> = scan
            .events
            .iter()
            .map(|e| (e.start_ms, e.end_ms, e.count))
            .collect();
        assert_eq!(ev, vec![(10, 30, 2), (40, 40, 1)]);
    }

    #[test]
    fn primary_energy_applies_the_multiplier_exactly() {
        assert_eq!(to_primary(12_345, Decimal::from(4000)), 49_380_000);
        assert_eq!(to_primary(1, Decimal::new(15, 1)), 2);
    }
}
