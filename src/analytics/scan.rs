//! One streaming pass over the readings lake, partition by partition (the
//! way the bill run reads it: `store::reader::list_files`, the files of one
//! date read in parallel, then applied in order). Memory is bounded by the
//! fleet, not by the days scanned: per (meter, register) only the last
//! snapshot is kept, and a local day's energy per account is handed to a sink
//! and folded into per-account and per-month accumulators once the day can
//! no longer change. Everything exact: energy is i64 in units of 0.0001 kWh
//! (the lake's scale).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use arrow::array::{Array, StringArray};
use chrono::{Datelike, Duration, NaiveDate, Weekday};
use rayon::prelude::*;
use rust_decimal::Decimal;

use super::AnalyticsError;
use crate::master::Meter;
use crate::store::reader;
use crate::store::scan::{FxMap, MeterLookup, Unit};

/// Lake values and all energy here: 4 decimals.
pub const SCALE: u8 = 4;
const DAY_MS: i64 = 86_400_000;
const NREG: usize = 5;

/// Registers read for daily use: total, then tariff 1..4 (sharp, peak, flat, valley).
pub const REGISTERS: [&str; NREG] = [
    "import_active_total",
    "import_active_t1",
    "import_active_t2",
    "import_active_t3",
    "import_active_t4",
];

/// Day types of the peak-period analysis, by index.
pub const DAY_TYPES: [&str; 3] = ["weekday", "weekend", "holiday"];

/// Local days stay open this many days behind the newest partition before
/// they are handed on: a gap of up to this many missed snapshots is spread
/// into days that are still open.
pub const OPEN_DAYS: i64 = 3;

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

/// The accounts' energy on one local day, handed to the sink once final.
/// Rows are sorted by account; `regs[r]` is None when no meter of the
/// account had register r that day.
pub struct DayBatch<'a> {
    pub date: NaiveDate,
    pub accounts: &'a [u32],
    pub regs: &'a [[Option<i64>; NREG]],
    pub estimated: &'a [bool],
}

/// Per account, over every day with a total.
#[derive(Debug, Clone, Copy, Default)]
pub struct AccountStats {
    pub days: u32,
    pub sum: i64,
    pub weekday_sum: i64,
    pub weekday_days: u32,
    pub weekend_sum: i64,
    pub weekend_days: u32,
    /// Tariff registers T1..T4 summed.
    pub tou: [i64; 4],
    /// Least squares of daily use over the day number (days since 2000-01-01).
    pub sx: i64,
    pub sxx: i64,
    pub sxy: i64,
}

impl AccountStats {
    /// Least-squares slope of daily use as percent of the mean per 30 days
    /// (one decimal); None with fewer than 7 days.
    pub fn trend_pct_per_30_days(&self) -> Option<f64> {
        if self.days < 7 {
            return None;
        }
        let n = self.days as i128;
        let (sx, sxx, sy, sxy) = (
            self.sx as i128,
            self.sxx as i128,
            self.sum as i128,
            self.sxy as i128,
        );
        let den = n * sxx - sx * sx;
        if den == 0 || sy == 0 {
            return None;
        }
        // slope = (n Sxy - Sx Sy) / den; mean = Sy / n.
        let pct = (n * sxy - sx * sy) as f64 / den as f64 * 30.0 * n as f64 / sy as f64 * 100.0;
        Some((pct * 10.0).round() / 10.0)
    }
}

/// One account's month.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MonthAcc {
    pub e4: i64,
    pub days: u16,
    pub estimated: bool,
}

/// Monthly energy per account: `by_month[k][account]` for `months[k]` (first day), ascending.
#[derive(Debug, Default)]
pub struct Monthly {
    pub months: Vec<NaiveDate>,
    pub by_month: Vec<Vec<MonthAcc>>,
}

impl Monthly {
    fn slot(&mut self, month: NaiveDate, accounts: usize) -> usize {
        match self.months.binary_search(&month) {
            Ok(k) => k,
            Err(k) => {
                self.months.insert(k, month);
                self.by_month.insert(k, vec![MonthAcc::default(); accounts]);
                k
            }
        }
    }
    /// The account's month (None: no day with data).
    pub fn get(&self, account: usize, month: NaiveDate) -> Option<MonthAcc> {
        let k = self.months.binary_search(&month).ok()?;
        Some(self.by_month[k][account]).filter(|m| m.days > 0)
    }
}

/// Load by local hour of one peak group and day type.
#[derive(Debug, Clone, Default)]
pub struct HourLoad {
    pub e4: [i64; 24],
    pub dates: BTreeSet<NaiveDate>,
}

/// What the scan needs besides the lake.
pub struct ScanPlan<'a> {
    pub meters: &'a [Meter],
    /// Account index of each meter (None: energy counts for the fleet only).
    pub meter_account: &'a [Option<usize>],
    pub accounts: usize,
    pub utc_offset_secs: i32,
    /// Holidays and adjusted working days for the day type; None: weekends only.
    pub calendar: Option<&'a crate::tariff::calendar::Calendar>,
    /// Peak groups of each meter (e.g. district x class, feeder x class); empty: no peak analysis.
    pub peak_groups: &'a [Vec<u32>],
    /// Also sum each account's use from the 1st of this day's month to this day.
    pub mtd_as_of: Option<NaiveDate>,
}

impl ScanPlan<'_> {
    /// Index into `DAY_TYPES`: holiday, weekend (unless an adjusted working
    /// day) or weekday. Years the calendar does not cover: weekends only.
    pub fn day_type(&self, d: NaiveDate) -> usize {
        day_type(self.calendar, d)
    }
}

/// See `ScanPlan::day_type`.
pub fn day_type(cal: Option<&crate::tariff::calendar::Calendar>, d: NaiveDate) -> usize {
    let weekend = matches!(d.weekday(), Weekday::Sat | Weekday::Sun);
    match cal.filter(|c| c.covers(d)) {
        Some(c) if c.holidays.contains(&d) => 2,
        Some(c) if weekend && c.workdays.contains(&d) => 0,
        _ if weekend => 1,
        _ => 0,
    }
}

#[derive(Debug, Default)]
pub struct Scan {
    pub events: Vec<MeterEvent>,
    /// (collector, bus) -> counts; bus "" for the collector as a whole.
    pub collectors: BTreeMap<(String, String), CollectorStats>,
    pub unknown_meter_readings: u64,
    pub backwards_pairs: u64,
    /// Snapshots older than the last one of their register (arrived late): skipped.
    pub out_of_order: u64,
    /// Account-days completed after their day was handed on (a gap longer
    /// than `OPEN_DAYS`), or held back while the account's only meter was
    /// in a gap: handed on at the end.
    pub late_rows: u64,
    pub readings: u64,
    /// `comm_loss` events (meters x stretches).
    pub comm_loss_events: u64,
    pub files: usize,
    pub first_date: Option<NaiveDate>,
    pub last_date: Option<NaiveDate>,
    /// Last local day with energy.
    pub last_day_with_data: Option<NaiveDate>,
    /// Per account (index as in the plan).
    pub accounts: Vec<AccountStats>,
    pub monthly: Monthly,
    /// Interval energy per account: [0-6 h, 8-17 h, 18-22 h, all day].
    pub hour_bands: HashMap<u32, [i64; 4]>,
    /// (peak group, day type) -> load by hour.
    pub peak: BTreeMap<(u32, u8), HourLoad>,
    /// Per account, `mtd_as_of`'s month up to that day.
    pub mtd: Vec<i64>,
    /// Whole fleet (every known meter) per local day, and T1..T4 over all days.
    pub fleet_daily: BTreeMap<NaiveDate, i128>,
    pub fleet_tou: [i128; 4],
}

/// Local calendar date of a UTC instant.
pub fn local_date(ts_ms: i64, offset_secs: i32) -> NaiveDate {
    let local = ts_ms + offset_secs as i64 * 1000;
    epoch() + Duration::days(local.div_euclid(DAY_MS))
}

/// The first UTC millisecond after local day `d`: a snapshot before it is
/// on or before `d`.
fn gap_end_ms(d: NaiveDate, offset_secs: i32) -> i64 {
    let days = (d - epoch()).num_days() + 1;
    days.saturating_mul(DAY_MS) - offset_secs as i64 * 1000
}

fn epoch() -> NaiveDate {
    NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid")
}

/// Local hour of day (0..23) of a UTC instant.
pub fn local_hour(ts_ms: i64, offset_secs: i32) -> u32 {
    ((ts_ms + offset_secs as i64 * 1000).rem_euclid(DAY_MS) / 3_600_000) as u32
}

/// Multiplier (CT x PT) of a meter: integer fast path, exact decimal otherwise.
#[derive(Clone, Copy)]
enum Mult {
    Int(i64),
    Dec(Decimal),
}

impl Mult {
    fn of(m: &Meter) -> Mult {
        let d = m.multiplier();
        if d.fract().is_zero() {
            if let Ok(i) = i64::try_from(d) {
                return Mult::Int(i);
            }
        }
        Mult::Dec(d)
    }
    fn apply(self, delta_e4: i64) -> i64 {
        match self {
            Mult::Int(i) => delta_e4.saturating_mul(i),
            Mult::Dec(d) => to_primary(delta_e4, d),
        }
    }
}

fn to_primary(delta_e4: i64, multiplier: Decimal) -> i64 {
    let v = Decimal::from_i128_with_scale(delta_e4 as i128, SCALE as u32) * multiplier;
    let v = v.round_dp(SCALE as u32);
    let m = v.mantissa() * 10i128.pow(SCALE as u32 - v.scale().min(SCALE as u32));
    m.clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

/// A register snapshot: key = meter x 5 + register.
#[derive(Clone, Copy)]
struct RegUpdate {
    key: u32,
    ts: i64,
    raw: i64,
    est: bool,
}

/// What one file contributes; files of a date are read in parallel.
#[derive(Default)]
struct FileScan {
    regs: Vec<RegUpdate>,
    intervals: Vec<(u32, i64, i64)>,
    volts: Vec<(u32, i64, bool)>,
    /// (collector, bus), counts and the meters seen (consecutive repeats merged).
    stats: Vec<((String, String), CollectorStats, Vec<u32>)>,
    slot_of: HashMap<(String, String), usize>,
    unknown: u64,
    rows: u64,
    min_ts: Option<i64>,
    max_ts: Option<i64>,
}

/// Reads one row group of a readings file.
fn read_unit(unit: &Unit, index: &MeterLookup<'_>) -> Result<FileScan, AnalyticsError> {
    let path = unit.path.as_path();
    let cols = [
        "meter_id",
        "ts",
        "channel",
        "value",
        "quality",
        "source_collector",
        "source_address",
    ];
    let mut out = FileScan::default();
    // Text columns come as dictionaries: each distinct channel, quality,
    // collector and address is interpreted once per batch, not once per row.
    crate::store::scan::for_each_view(unit, &cols, None, |b, v| {
        let bad = || AnalyticsError::Invalid(format!("{}: not a readings file", path.display()));
        let dict = |n: &str| {
            b.column_by_name(n)
                .and_then(|a| crate::store::scan::dictionary_text(a.as_ref()))
                .ok_or_else(bad)
        };
        let meter_id = v.meter_id;
        let ((ch_keys, ch_vals), (q_keys, q_vals)) = (v.channel, v.quality);
        let (c_keys, c_vals) = dict("source_collector")?;
        let (a_keys, a_vals) = dict("source_address")?;
        // 0..5 register, 5 interval, 6 voltage, 7 other
        let kinds: Vec<u8> = (0..ch_vals.len())
            .map(|k| {
                let ch = ch_vals.value(k);
                if let Some(r) = REGISTERS.iter().position(|x| *x == ch) {
                    r as u8
                } else if ch == "import_active_interval" {
                    5
                } else if ch.starts_with("voltage_") {
                    6
                } else {
                    7
                }
            })
            .collect();
        let qflags: Vec<[bool; 5]> = (0..q_vals.len())
            .map(|k| {
                let q = q_vals.value(k);
                if q == "ok" {
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
                }
            })
            .collect();
        let buses: Vec<&str> = (0..a_vals.len())
            .map(|k| a_vals.value(k).split('/').next().unwrap_or(""))
            .collect();
        // One number per distinct bus of the batch: addresses are mostly one
        // per meter (`bus/address`), buses are shared by many meters.
        let mut bus_index: FxMap<&str, u32> = FxMap::default();
        let bus_ids: Vec<u32> = buses
            .iter()
            .map(|b| {
                let next = bus_index.len() as u32;
                *bus_index.entry(*b).or_insert(next)
            })
            .collect();
        let (ts, value) = (v.ts, v.value);
        out.rows += b.num_rows() as u64;
        out.regs.reserve(b.num_rows());
        // Rows come grouped by meter and source: cache the last lookups.
        let mut last_mid: Option<&str> = None;
        let mut m: Option<u32> = None;
        let mut prev: Option<u32> = None;
        let mut last_src: Option<(i32, i32)> = None;
        // (collector key, bus number) -> stats slots: numbers are cheaper
        // than the texts, which are looked up once per pair.
        let mut slot_cache: FxMap<(i32, u32), [usize; 2]> = FxMap::default();
        let mut slots = [0usize; 2];
        for i in 0..b.num_rows() {
            let mid = meter_id.value(i);
            if !last_mid.is_some_and(|l| crate::store::scan::same_id(l.as_bytes(), mid.as_bytes()))
            {
                last_mid = Some(mid);
                m = index.find(mid, prev);
                prev = m.or(prev);
            }
            // Rows of one meter share collector and address keys.
            let (ck, ak) = (c_keys[i], a_keys[i]);
            if last_src != Some((ck, ak)) {
                last_src = Some((ck, ak));
                let bus_id = bus_ids.get(ak as usize).copied().unwrap_or(u32::MAX);
                slots = match slot_cache.get(&(ck, bus_id)) {
                    Some(s) => *s,
                    None => {
                        let bus = buses.get(ak as usize).copied().unwrap_or("");
                        let col = if (ck as usize) < c_vals.len() {
                            c_vals.value(ck as usize)
                        } else {
                            ""
                        };
                        let mut s = [0usize; 2];
                        for (k, key) in [(col, ""), (col, bus)].into_iter().enumerate() {
                            let key = (key.0.to_string(), key.1.to_string());
                            s[k] = *out.slot_of.entry(key.clone()).or_insert_with(|| {
                                out.stats.push((key, CollectorStats::default(), Vec::new()));
                                out.stats.len() - 1
                            });
                        }
                        slot_cache.insert((ck, bus_id), s);
                        s
                    }
                };
            }
            let flags = qflags
                .get(q_keys[i] as usize)
                .copied()
                .unwrap_or([false, false, true, false, false]);
            for k in slots {
                let (_, s, seen) = &mut out.stats[k];
                s.readings += 1;
                s.ok += flags[0] as u64;
                s.estimated += flags[1] as u64;
                s.suspect += flags[2] as u64;
                s.device_error += flags[3] as u64;
                s.offline += flags[4] as u64;
                if let Some(m) = m {
                    if seen.last() != Some(&m) {
                        seen.push(m);
                    }
                }
            }
            let Some(m) = m else {
                out.unknown += 1;
                continue;
            };
            let t = ts[i];
            out.min_ts = Some(out.min_ts.map_or(t, |x| x.min(t)));
            out.max_ts = Some(out.max_ts.map_or(t, |x| x.max(t)));
            let kind = kinds.get(ch_keys[i] as usize).copied().unwrap_or(7);
            let raw = value[i];
            match kind {
                0..=4 => out.regs.push(RegUpdate {
                    key: m * NREG as u32 + kind as u32,
                    ts: t,
                    raw,
                    est: flags[1],
                }),
                5 => out.intervals.push((m, t, raw)),
                6 => out.volts.push((m, t, raw == 0)),
                _ => {}
            }
        }
        Ok::<(), AnalyticsError>(())
    })?;
    Ok(out)
}

/// Energy of open local days, dense by account (the last slot: meters without an account).
struct DayBuf {
    date: NaiveDate,
    regs: Vec<[i64; NREG]>,
    /// bit r: register r present; bit 5: estimated; bit 6: touched.
    flags: Vec<u8>,
}

const EST: u8 = 1 << 5;
const TOUCHED: u8 = 1 << 6;

/// Account-days completed after their day was handed on, or held back
/// while the account's only meter was in a gap: registers, estimated, and
/// whether the day was already counted when handed on.
type LateRows = BTreeMap<(NaiveDate, u32), ([Option<i64>; NREG], bool, bool)>;
/// Accounts, registers and estimated flags of one day, by account.
type DayRows = (Vec<u32>, Vec<[Option<i64>; NREG]>, Vec<bool>);

/// Per meter state of the pass.
struct State<'p> {
    plan: &'p ScanPlan<'p>,
    mult: Vec<Mult>,
    modulus: Vec<i64>,
    /// Last snapshot per (meter, register): (ts, raw, estimated); ts i64::MIN = none.
    last: Vec<(i64, i64, bool)>,
    heard: Vec<bool>,
    /// The last local day number (days since 1970-01-01) and its date.
    date_memo: (i64, NaiveDate),
    volt_open: HashMap<u32, (i64, i64, i64)>,
    open: Vec<DayBuf>,
    pool: Vec<DayBuf>,
    /// Days before this one were handed on.
    flushed_before: Option<NaiveDate>,
    late: LateRows,
    /// Accounts with several meters, and their meters, by account.
    siblings: Vec<(u32, Vec<u32>)>,
    /// Per account: its meter when it has exactly one, else `u32::MAX`.
    sole: Vec<u32>,
    /// Accounts with several meters: runs of days (first, last) counted
    /// (days, day-type and month counts, trend) when handed on while a
    /// meter of the account was in a gap, so a late part of them adds
    /// energy only. Runs no meter of the account can reach any more are
    /// dropped when a gap closes: one run per open gap, not one per day.
    counted: HashMap<u32, Vec<(NaiveDate, NaiveDate)>>,
    scan: Scan,
    /// Reused between flushes.
    rows: DayRows,
}

impl<'p> State<'p> {
    fn new(plan: &'p ScanPlan<'p>) -> State<'p> {
        let meters = plan.meters;
        let mut of_account: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
        for (m, a) in plan.meter_account.iter().enumerate() {
            if let Some(a) = a {
                of_account.entry(*a).or_default().push(m as u32);
            }
        }
        State {
            plan,
            date_memo: (0, epoch()),
            mult: meters.iter().map(Mult::of).collect(),
            modulus: meters
                .iter()
                .map(|m| {
                    (m.modulus() * Decimal::from(10_000))
                        .try_into()
                        .unwrap_or(i64::MAX)
                })
                .collect(),
            last: vec![(i64::MIN, 0, false); meters.len() * NREG],
            heard: vec![false; meters.len()],
            volt_open: HashMap::new(),
            open: Vec::new(),
            pool: Vec::new(),
            flushed_before: None,
            late: BTreeMap::new(),
            sole: {
                let mut sole = vec![u32::MAX; plan.accounts];
                for (a, ms) in &of_account {
                    if let ([m], Some(s)) = (ms.as_slice(), sole.get_mut(*a)) {
                        *s = *m;
                    }
                }
                sole
            },
            siblings: of_account
                .into_iter()
                .filter(|(_, ms)| ms.len() > 1)
                .map(|(a, ms)| (a as u32, ms))
                .collect(),
            counted: HashMap::new(),
            scan: Scan {
                accounts: vec![AccountStats::default(); plan.accounts],
                mtd: if plan.mtd_as_of.is_some() {
                    vec![0; plan.accounts]
                } else {
                    Vec::new()
                },
                ..Scan::default()
            },
            rows: Default::default(),
        }
    }
}

/// Sink of completed account-days (e.g. the `daily_usage` writer).
pub type DaySink<'s> = dyn FnMut(&DayBatch<'_>) -> Result<(), AnalyticsError> + 's;

/// Reads the lake's `readings` (and `quarantine` counts) in one streaming
/// pass. Readings of meters not in `plan.meters` are counted and skipped.
pub fn scan_lake(
    lake: &Path,
    plan: &ScanPlan<'_>,
    sink: &mut DaySink<'_>,
) -> Result<Scan, AnalyticsError> {
    let meters = plan.meters;
    let mut map: FxMap<&str, u32> =
        FxMap::with_capacity_and_hasher(meters.len(), Default::default());
    let mut unique = true;
    for (i, m) in meters.iter().enumerate() {
        unique &= map.insert(m.meter_id.as_str(), i as u32).is_none();
    }
    // The next-meter check is exact only when ids are unique.
    let id_of = |i: u32| {
        unique
            .then(|| meters.get(i as usize))
            .flatten()
            .map(|m| m.meter_id.as_str())
    };
    let index = MeterLookup::with_map(&map, &id_of);
    let mut st = State::new(plan);
    // (collector, bus) -> counts, and a bitmap of the meters seen.
    let mut stats: HashMap<(String, String), (CollectorStats, Vec<u64>)> = HashMap::new();
    let files = reader::list_files(lake, "readings", NaiveDate::MIN, NaiveDate::MAX)?;
    st.scan.files = files.len();
    // Row groups of one date are read in parallel, and the next date is read
    // while this one is applied. Results merge in file and row-group order.
    let units = crate::store::scan::units(&files)?;
    let mut dates: Vec<&[Unit]> = units.chunk_by(|a, b| a.date == b.date).collect();
    dates.reverse();
    let read = |part: &[Unit]| -> Vec<Result<FileScan, AnalyticsError>> {
        part.par_iter().map(|u| read_unit(u, &index)).collect()
    };
    let mut counts: Vec<u32> = Vec::new();
    let mut next = dates.pop().map(|part| (part[0].date, read(part)));
    while let Some((date, scans)) = next.take() {
        let following = dates.pop();
        let (applied, read_ahead) = std::thread::scope(|sc| {
            let ahead = sc.spawn(|| following.map(|part| (part[0].date, read(part))));
            let applied = st.apply_date(date, scans, &mut stats, &mut counts, meters.len(), sink);
            (applied, ahead.join())
        });
        applied?;
        next = read_ahead
            .map_err(|_| AnalyticsError::Invalid("lake reader thread panicked".into()))?;
    }
    st.flush(None, sink)?;
    st.flush_late(sink)?;
    let State {
        mut scan,
        volt_open,
        heard,
        ..
    } = st;
    for (m, (s, l, n)) in volt_open {
        scan.events.push(MeterEvent {
            meter: m,
            kind: "zero_voltage",
            start_ms: s,
            end_ms: l,
            count: n,
        });
    }
    for (key, (mut s, bits)) in stats {
        s.meters = bits.iter().map(|w| w.count_ones() as u64).sum();
        scan.collectors.insert(key, s);
    }
    count_quarantine(lake, &mut scan)?;
    silent_meters(meters, &heard, plan.utc_offset_secs, &mut scan);
    scan.events.sort_by_key(|e| (e.meter, e.start_ms, e.kind));
    scan.comm_loss_events = scan.events.iter().filter(|e| e.kind == "comm_loss").count() as u64;
    Ok(scan)
}

impl State<'_> {
    /// Merges one date's unit scans (in order) and applies them.
    fn apply_date(
        &mut self,
        date: NaiveDate,
        scans: Vec<Result<FileScan, AnalyticsError>>,
        stats: &mut HashMap<(String, String), (CollectorStats, Vec<u64>)>,
        counts: &mut Vec<u32>,
        meters: usize,
        sink: &mut DaySink<'_>,
    ) -> Result<(), AnalyticsError> {
        let count = |f: fn(&FileScan) -> usize| {
            scans.iter().map(|s| s.as_ref().map_or(0, f)).sum::<usize>()
        };
        let mut regs: Vec<RegUpdate> = Vec::with_capacity(count(|s| s.regs.len()));
        let mut intervals = Vec::with_capacity(count(|s| s.intervals.len()));
        let mut volts = Vec::new();
        for s in scans {
            let s = s?;
            self.scan.readings += s.rows;
            self.scan.unknown_meter_readings += s.unknown;
            for t in [s.min_ts, s.max_ts].into_iter().flatten() {
                let d = local_date(t, self.plan.utc_offset_secs);
                self.scan.first_date = Some(self.scan.first_date.map_or(d, |x| x.min(d)));
                self.scan.last_date = Some(self.scan.last_date.map_or(d, |x| x.max(d)));
            }
            for (key, cs, seen) in s.stats {
                let e = stats
                    .entry(key)
                    .or_insert_with(|| (CollectorStats::default(), vec![0; meters / 64 + 1]));
                e.0.readings += cs.readings;
                e.0.ok += cs.ok;
                e.0.estimated += cs.estimated;
                e.0.suspect += cs.suspect;
                e.0.device_error += cs.device_error;
                e.0.offline += cs.offline;
                for m in seen {
                    e.1[m as usize / 64] |= 1 << (m % 64);
                }
            }
            regs.extend_from_slice(&s.regs);
            intervals.extend_from_slice(&s.intervals);
            volts.extend(s.volts);
        }
        self.apply_registers(&regs, counts);
        drop(regs);
        self.intervals(intervals, counts);
        self.apply_volts(volts);
        // Days well behind this partition can no longer change.
        let before = date - Duration::days(OPEN_DAYS);
        self.flush(Some(before), sink)
    }

    /// Applies one partition's register snapshots in (meter, register, time)
    /// order: a counting sort by key keeps it linear.
    fn apply_registers(&mut self, regs: &[RegUpdate], counts: &mut Vec<u32>) {
        // Lake files are sorted by meter: when the meters of the updates never
        // go down, only each meter's few updates need ordering (in cache),
        // into the order the counting sort below gives.
        let meter = |u: &RegUpdate| u.key / NREG as u32;
        if regs.windows(2).all(|w| meter(&w[0]) <= meter(&w[1])) {
            let mut run: Vec<RegUpdate> = Vec::with_capacity(2 * NREG);
            for chunk in regs.chunk_by(|a, b| meter(a) == meter(b)) {
                let order = |u: &RegUpdate| (u.key, u.ts);
                if chunk.windows(2).all(|w| order(&w[0]) <= order(&w[1])) {
                    chunk.iter().for_each(|u| self.snapshot(*u));
                } else {
                    run.clear();
                    run.extend_from_slice(chunk);
                    // Stable, as the counting sort: equal times keep file order.
                    run.sort_by_key(order);
                    run.iter().for_each(|u| self.snapshot(*u));
                }
            }
            return;
        }
        let nk = self.last.len();
        counts.clear();
        counts.resize(nk + 1, 0);
        for u in regs {
            counts[u.key as usize + 1] += 1;
        }
        for k in 0..nk {
            counts[k + 1] += counts[k];
        }
        let mut order = vec![0u32; regs.len()];
        {
            let mut next = counts.clone();
            for (n, u) in regs.iter().enumerate() {
                let p = &mut next[u.key as usize];
                order[*p as usize] = n as u32;
                *p += 1;
            }
        }
        let mut k = 0usize;
        while k < nk {
            let (a, b) = (counts[k] as usize, counts[k + 1] as usize);
            if a == b {
                k += 1;
                continue;
            }
            let bucket = &mut order[a..b];
            if bucket.len() > 1 {
                bucket.sort_by_key(|n| regs[*n as usize].ts);
            }
            for n in a..b {
                let u = regs[order[n] as usize];
                self.snapshot(u);
            }
            k += 1;
        }
    }

    /// One register snapshot after the previous one of the same register.
    fn snapshot(&mut self, u: RegUpdate) {
        let key = u.key as usize;
        let (tp, vp, ep) = self.last[key];
        if tp == i64::MIN {
            self.last[key] = (u.ts, u.raw, u.est);
            return;
        }
        if u.ts == tp {
            return;
        }
        if u.ts < tp {
            self.scan.out_of_order += 1;
            return;
        }
        self.last[key] = (u.ts, u.raw, u.est);
        let (m, r) = (key / NREG, key % NREG);
        // Whole days between the snapshots, rounded: a daily snapshot a little
        // early or late is still the next day's. Snapshots less than half a
        // day apart (collectors read every 15 minutes) give 0: their energy
        // accumulates into the day of the earlier one.
        let span = u.ts.saturating_sub(tp).saturating_add(DAY_MS / 2) / DAY_MS;
        let mut delta = u.raw - vp;
        if delta < 0 {
            let modulus = self.modulus[m];
            // A wrap near the top of the register is a rollover; anything else went backwards.
            if vp > modulus / 10 * 9 && u.raw < modulus / 10 {
                delta += modulus;
            } else {
                if r == 0 {
                    self.scan.backwards_pairs += 1;
                }
                return;
            }
        }
        if r == 0 && span > 1 {
            self.scan.events.push(MeterEvent {
                meter: m as u32,
                kind: "comm_loss",
                start_ms: tp,
                end_ms: u.ts,
                count: span - 1,
            });
        }
        self.heard[m] = true;
        let primary = self.mult[m].apply(delta);
        let start = self.local_date_memo(tp);
        let slot = self.plan.meter_account[m].unwrap_or(self.plan.accounts);
        let est = span > 1 || ep || u.est;
        let span = span.max(1);
        // Spread a multi-day gap evenly; the remainder goes to the last day.
        let each = primary / span;
        for k in 0..span {
            let part = if k == span - 1 {
                primary - each * (span - 1)
            } else {
                each
            };
            let day = if k == 0 {
                start
            } else {
                start + Duration::days(k)
            };
            self.add(slot, day, r, part, est);
        }
        // The gap closed: days before it can no longer get energy from it.
        if r == 0 && self.flushed_before.is_some_and(|f| start < f) {
            self.forget_counted(slot);
        }
    }

    /// `local_date` of a snapshot time, remembering the last day: most
    /// snapshots of a partition fall on one local day (chrono's day
    /// arithmetic per snapshot was 4% of the scan).
    fn local_date_memo(&mut self, ts_ms: i64) -> NaiveDate {
        let day = (ts_ms + self.plan.utc_offset_secs as i64 * 1000).div_euclid(DAY_MS);
        if self.date_memo.0 != day {
            self.date_memo = (day, epoch() + Duration::days(day));
        }
        self.date_memo.1
    }

    /// Drops the counted days of account `a` that none of its meters can
    /// add energy to any more (before the day of each one's last snapshot).
    fn forget_counted(&mut self, a: usize) {
        let Some(runs) = self.counted.get_mut(&(a as u32)) else {
            return;
        };
        let Ok(i) = self.siblings.binary_search_by_key(&(a as u32), |s| s.0) else {
            return;
        };
        let off = self.plan.utc_offset_secs;
        let reach = self.siblings[i]
            .1
            .iter()
            .filter_map(|m| {
                let tp = self.last[*m as usize * NREG].0;
                let d = (tp != i64::MIN).then(|| local_date(tp, off))?;
                let removed = self.plan.meters[*m as usize]
                    .removed_on
                    .is_some_and(|r| r < d);
                (!removed).then_some(d)
            })
            .min();
        match reach {
            Some(from) => {
                runs.retain_mut(|r| {
                    r.0 = r.0.max(from);
                    r.0 <= r.1
                });
                if runs.is_empty() {
                    self.counted.remove(&(a as u32));
                }
            }
            None => {
                self.counted.remove(&(a as u32));
            }
        }
    }

    fn add(&mut self, slot: usize, date: NaiveDate, r: usize, v: i64, est: bool) {
        if self.flushed_before.is_some_and(|f| date < f) {
            if slot < self.plan.accounts {
                let counted = &self.counted;
                let e = self.late.entry((date, slot as u32)).or_insert_with(|| {
                    let runs = counted.get(&(slot as u32));
                    let done = runs.is_some_and(|v| v.iter().any(|r| r.0 <= date && date <= r.1));
                    ([None; NREG], false, done)
                });
                e.0[r] = Some(e.0[r].unwrap_or(0) + v);
                e.1 |= est;
            }
            return;
        }
        let b = match self.open.iter().position(|b| b.date == date) {
            Some(b) => b,
            None => {
                let n = self.plan.accounts + 1;
                let mut buf = self.pool.pop().unwrap_or_else(|| DayBuf {
                    date,
                    regs: vec![[0; NREG]; n],
                    flags: vec![0; n],
                });
                buf.date = date;
                self.open.push(buf);
                self.open.len() - 1
            }
        };
        let buf = &mut self.open[b];
        buf.regs[slot][r] += v;
        buf.flags[slot] |= TOUCHED | (1 << r) | if est { EST } else { 0 };
    }

    /// One partition's interval rows. A row repeated under the same (meter,
    /// ts), e.g. a compaction that crashed before removing its inputs, counts
    /// once: the first in file order. Rows out of (meter, ts) order are
    /// bucketed by meter with a counting sort (linear, like the registers),
    /// then each meter's few rows are put in time order.
    fn intervals(&mut self, rows: Vec<(u32, i64, i64)>, counts: &mut Vec<u32>) {
        if rows.windows(2).all(|w| (w[0].0, w[0].1) < (w[1].0, w[1].1)) {
            for (m, ts, raw) in rows {
                self.interval(m, ts, raw);
            }
            return;
        }
        let nm = self.plan.meters.len();
        counts.clear();
        counts.resize(nm + 1, 0);
        for r in &rows {
            counts[r.0 as usize + 1] += 1;
        }
        for m in 0..nm {
            counts[m + 1] += counts[m];
        }
        let mut order = vec![0u32; rows.len()];
        for (n, r) in rows.iter().enumerate() {
            let p = &mut counts[r.0 as usize];
            order[*p as usize] = n as u32;
            *p += 1;
        }
        // counts[m] is now the end of meter m's bucket.
        let mut a = 0usize;
        for end in &counts[..nm] {
            let b = *end as usize;
            let bucket = &mut order[a..b];
            // Stable: the first row in file order stays first among equal ts.
            bucket.sort_by_key(|n| rows[*n as usize].1);
            let mut prev = None;
            for n in bucket.iter() {
                let (m, ts, raw) = rows[*n as usize];
                if prev != Some(ts) {
                    self.interval(m, ts, raw);
                }
                prev = Some(ts);
            }
            a = b;
        }
    }

    /// One interval row: hourly bands and peak profiles.
    fn interval(&mut self, m: u32, ts: i64, raw: i64) {
        let off = self.plan.utc_offset_secs;
        let e4 = self.mult[m as usize].apply(raw);
        // Interval energy belongs to the interval ending at ts: use its start.
        let start = ts - 1;
        let h = local_hour(start, off) as usize;
        if let Some(a) = self.plan.meter_account[m as usize] {
            let e = self.scan.hour_bands.entry(a as u32).or_default();
            match h {
                0..=6 => e[0] += e4,
                8..=17 => e[1] += e4,
                18..=22 => e[2] += e4,
                _ => {}
            }
            e[3] += e4;
        }
        if let Some(groups) = self.plan.peak_groups.get(m as usize) {
            let d = local_date(start, off);
            let dt = self.plan.day_type(d) as u8;
            for g in groups {
                let l = self.scan.peak.entry((*g, dt)).or_default();
                l.e4[h] += e4;
                if l.dates.last() != Some(&d) {
                    l.dates.insert(d);
                }
            }
        }
    }

    fn apply_volts(&mut self, mut v: Vec<(u32, i64, bool)>) {
        v.sort_unstable();
        for (m, t, zero) in v {
            let open = self.volt_open.get(&m).copied();
            match (zero, open) {
                (true, None) => {
                    self.volt_open.insert(m, (t, t, 1));
                }
                (true, Some((s, _, n))) => {
                    self.volt_open.insert(m, (s, t, n + 1));
                }
                (false, Some((s, _, n))) => {
                    self.scan.events.push(MeterEvent {
                        meter: m,
                        kind: "zero_voltage",
                        start_ms: s,
                        end_ms: t,
                        count: n,
                    });
                    self.volt_open.remove(&m);
                }
                (false, None) => {}
            }
        }
    }

    /// Hands on every open day before `before` (all with None), oldest first.
    fn flush(
        &mut self,
        before: Option<NaiveDate>,
        sink: &mut DaySink<'_>,
    ) -> Result<(), AnalyticsError> {
        self.open.sort_by_key(|b| b.date);
        while !self.open.is_empty() && before.is_none_or(|b| self.open[0].date < b) {
            let mut buf = self.open.remove(0);
            let n = self.plan.accounts;
            // Once the pass is over no gap can close into this day any more.
            let gaps = before.is_some();
            let end = gap_end_ms(buf.date, self.plan.utc_offset_secs);
            if gaps {
                for (a, ms) in &self.siblings {
                    let total = buf.flags[*a as usize] & 1 != 0;
                    if total && ms.iter().any(|m| self.in_gap(*m as usize, buf.date, end)) {
                        let runs = self.counted.entry(*a).or_default();
                        match runs.last_mut() {
                            Some(r) if r.1.succ_opt() == Some(buf.date) => r.1 = buf.date,
                            _ => runs.push((buf.date, buf.date)),
                        }
                    }
                }
            }
            let mut rows = std::mem::take(&mut self.rows);
            let (accs, regs, ests) = &mut rows;
            accs.clear();
            regs.clear();
            ests.clear();
            for a in 0..=n {
                let f = buf.flags[a];
                if f & TOUCHED == 0 {
                    continue;
                }
                let r: [Option<i64>; NREG] =
                    std::array::from_fn(|k| (f & (1 << k) != 0).then_some(buf.regs[a][k]));
                let sole = self.sole.get(a).copied().unwrap_or(u32::MAX);
                if a < n && gaps && sole != u32::MAX && self.in_gap(sole as usize, buf.date, end) {
                    // The account's only meter may still add to this day when
                    // its gap closes: hold the day back, to be handed on once,
                    // whole, with the late rows.
                    let e = self.late.entry((buf.date, a as u32)).or_insert((
                        [None; NREG],
                        false,
                        false,
                    ));
                    for (sum, v) in e.0.iter_mut().zip(r) {
                        if let Some(v) = v {
                            *sum = Some(sum.unwrap_or(0) + v);
                        }
                    }
                    e.1 |= f & EST != 0;
                } else if a < n {
                    accs.push(a as u32);
                    regs.push(r);
                    ests.push(f & EST != 0);
                } else {
                    fleet(&mut self.scan, buf.date, &r);
                }
                buf.regs[a] = [0; NREG];
                buf.flags[a] = 0;
            }
            self.day(buf.date, &rows, None, sink)?;
            self.rows = rows;
            self.pool.push(buf);
        }
        let done = before.unwrap_or(NaiveDate::MAX);
        self.flushed_before = Some(self.flushed_before.map_or(done, |f| f.max(done)));
        Ok(())
    }

    /// Whether meter `m` may still add energy to day `d` once its next
    /// snapshot comes: its last one is on or before `d` (before `end`, from
    /// `gap_end_ms`), and it was not removed before `d`.
    fn in_gap(&self, m: usize, d: NaiveDate, end: i64) -> bool {
        let tp = self.last[m * NREG].0;
        tp != i64::MIN && tp < end && self.plan.meters[m].removed_on.is_none_or(|r| r >= d)
    }

    fn flush_late(&mut self, sink: &mut DaySink<'_>) -> Result<(), AnalyticsError> {
        let late = std::mem::take(&mut self.late);
        self.scan.late_rows = late.len() as u64;
        let mut rows: DayRows = Default::default();
        let mut counted: Vec<bool> = Vec::new();
        let mut cur: Option<NaiveDate> = None;
        for ((d, a), (r, e, c)) in late {
            if cur.is_some_and(|c| c != d) {
                self.day(cur.expect("set"), &rows, Some(&counted), sink)?;
                rows = Default::default();
                counted.clear();
            }
            cur = Some(d);
            rows.0.push(a);
            rows.1.push(r);
            rows.2.push(e);
            counted.push(c);
        }
        if let Some(c) = cur {
            self.day(c, &rows, Some(&counted), sink)?;
        }
        Ok(())
    }

    /// A completed day: accumulators, then the sink. `counted`: per row, for
    /// rows completed after the day was handed on, whether the account-day
    /// was already counted then: it adds its energy, not another day.
    fn day(
        &mut self,
        date: NaiveDate,
        rows: &DayRows,
        counted: Option<&[bool]>,
        sink: &mut DaySink<'_>,
    ) -> Result<(), AnalyticsError> {
        let (accs, regs, ests) = rows;
        if accs.is_empty() {
            return Ok(());
        }
        let n = self.plan.accounts;
        // Rest days: weekends and calendar holidays; an adjusted working
        // Saturday counts as a weekday, as people live it.
        let weekend = self.plan.day_type(date) != 0;
        let x = (date - NaiveDate::from_ymd_opt(2000, 1, 1).expect("valid")).num_days();
        let month = date.with_day(1).expect("day 1");
        let k = self.scan.monthly.slot(month, n);
        let mtd = self
            .plan
            .mtd_as_of
            .filter(|a| date <= *a && date.with_day(1) == a.with_day(1));
        let mut any = false;
        for (i, a) in accs.iter().enumerate() {
            let a = *a as usize;
            let r = &regs[i];
            fleet(&mut self.scan, date, r);
            let s = &mut self.scan.accounts[a];
            for t in 0..4 {
                s.tou[t] += r[t + 1].unwrap_or(0);
            }
            let Some(v) = r[0] else { continue };
            any = true;
            let new_day = u32::from(!counted.is_some_and(|c| c[i]));
            s.days += new_day;
            s.sum += v;
            if weekend {
                s.weekend_sum += v;
                s.weekend_days += new_day;
            } else {
                s.weekday_sum += v;
                s.weekday_days += new_day;
            }
            // One point per day: a late part moves the day's value, sxy is linear in it.
            s.sx += x * new_day as i64;
            s.sxx += x * x * new_day as i64;
            s.sxy += x * v;
            let mo = &mut self.scan.monthly.by_month[k][a];
            mo.e4 += v;
            mo.days += new_day as u16;
            mo.estimated |= ests[i];
            if mtd.is_some() {
                self.scan.mtd[a] += v;
            }
        }
        if any {
            self.scan.last_day_with_data =
                Some(self.scan.last_day_with_data.map_or(date, |d| d.max(date)));
        }
        sink(&DayBatch {
            date,
            accounts: accs,
            regs,
            estimated: ests,
        })
    }
}

fn fleet(scan: &mut Scan, date: NaiveDate, r: &[Option<i64>; NREG]) {
    if let Some(v) = r[0] {
        *scan.fleet_daily.entry(date).or_default() += v as i128;
    }
    for t in 0..4 {
        scan.fleet_tou[t] += r[t + 1].unwrap_or(0) as i128;
    }
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

/// Meters installed over the whole scanned period that sent no register at all.
fn silent_meters(meters: &[Meter], heard: &[bool], offset_secs: i32, scan: &mut Scan) {
    let (Some(first), Some(last)) = (scan.first_date, scan.last_date) else {
        return;
    };
    let off = offset_secs as i64 * 1000;
    let ms = |d: NaiveDate| (d - epoch()).num_days() * DAY_MS - off;
    for (i, m) in meters.iter().enumerate() {
        let active = m.installed_on <= first && m.removed_on.is_none_or(|r| r > last);
        if active && !heard[i] {
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
    fn meters_are_found_as_the_next_one_or_through_the_map() {
        let meter = |id: &str| Meter {
            meter_id: id.into(),
            account_id: "A".into(),
            meter_type: String::new(),
            ct_ratio: Decimal::ONE,
            pt_ratio: Decimal::ONE,
            register_digits: 6,
            installed_on: NaiveDate::MIN,
            removed_on: None,
            feeder: String::new(),
        };
        let meters = [meter("A"), meter("B"), meter("C")];
        let map: FxMap<&str, u32> = [("A", 0u32), ("B", 1), ("C", 2)].into_iter().collect();
        let in_order = |i: u32| meters.get(i as usize).map(|m| m.meter_id.as_str());
        // With the meters in order (unique ids), and without (only the map).
        for ordered in [true, false] {
            let id_of = |i: u32| in_order(i).filter(|_| ordered);
            let ix = MeterLookup::with_map(&map, &id_of);
            assert_eq!(ix.find("B", Some(0)), Some(1));
            assert_eq!(
                ix.find("C", Some(0)),
                Some(2),
                "a gap falls back to the map"
            );
            assert_eq!(ix.find("A", None), Some(0));
            assert_eq!(ix.find("X", Some(1)), None);
            assert_eq!(ix.find("A", Some(2)), Some(0), "past the last meter");
        }
        // Without the map, only the next meter is found: the map is what decides.
        let empty = FxMap::default();
        let ix = MeterLookup::with_map(&empty, &in_order);
        assert_eq!(
            (ix.find("B", Some(0)), ix.find("C", Some(0))),
            (Some(1), None)
        );
    }

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

    /// A plan at UTC for `meters` of `accounts` accounts, no calendar.
    fn plan_of<'a>(
        meters: &'a [Meter],
        meter_account: &'a [Option<usize>],
        accounts: usize,
    ) -> ScanPlan<'a> {
        ScanPlan {
            meters,
            meter_account,
            accounts,
            utc_offset_secs: 0,
            calendar: None,
            peak_groups: &[],
            mtd_as_of: None,
        }
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

    /// Feeds total-register snapshots of one meter (account 0) through the
    /// state machine; returns the days handed on and the scan.
    fn feed(digits: u8, snaps: &[(i64, i64)]) -> (Vec<(NaiveDate, i64, bool)>, Scan) {
        let meters = [meter(digits)];
        let ma = [Some(0)];
        let plan = plan_of(&meters, &ma, 1);
        let mut st = State::new(&plan);
        let mut out = Vec::new();
        let mut sink = |b: &DayBatch<'_>| -> Result<(), AnalyticsError> {
            for i in 0..b.accounts.len() {
                out.push((b.date, b.regs[i][0].unwrap(), b.estimated[i]));
            }
            Ok(())
        };
        let mut counts = Vec::new();
        for (t, v) in snaps {
            let u = RegUpdate {
                key: 0,
                ts: *t,
                raw: *v,
                est: false,
            };
            st.apply_registers(&[u], &mut counts);
        }
        st.flush(None, &mut sink).unwrap();
        (out, st.scan)
    }

    #[test]
    fn updates_in_file_order_and_in_any_order_give_the_same_days() {
        // Two meters of one account, five registers each read twice a day,
        // three partitions, with repeats: in file order (meters ascending,
        // registers by channel name: the per-meter path) and with the meters
        // swapped (the counting sort).
        let meters = [meter(6), meter(6)];
        let ma = [Some(0), Some(0)];
        let plan = plan_of(&meters, &ma, 1);
        let run = |meters_down: bool| {
            let mut st = State::new(&plan);
            let mut out = Vec::new();
            let mut sink = |b: &DayBatch<'_>| -> Result<(), AnalyticsError> {
                out.push((b.date, b.regs[0], b.estimated[0]));
                Ok(())
            };
            let mut counts = Vec::new();
            for d in 0..3i64 {
                let mut per_meter = Vec::new();
                for m in 0..2u32 {
                    let mut u = Vec::new();
                    for r in [1, 2, 3, 4, 0] {
                        for (k, ts) in [d * DAY_MS, d * DAY_MS + DAY_MS / 8]
                            .into_iter()
                            .enumerate()
                        {
                            let raw = (d * 2 + k as i64) * 10_000 * (r as i64 + 1) + m as i64;
                            let key = m * NREG as u32 + r;
                            u.push(RegUpdate {
                                key,
                                ts,
                                raw,
                                est: r == 2 && d == 1,
                            });
                            if k == 1 {
                                // A repeat at the same time: the first in file order wins.
                                u.push(RegUpdate {
                                    key,
                                    ts,
                                    raw: raw + 7,
                                    est: true,
                                });
                            }
                        }
                    }
                    per_meter.push(u);
                }
                // Meter 1 before meter 0: the counting sort, same order within each.
                if meters_down {
                    per_meter.reverse();
                }
                st.apply_registers(&per_meter.concat(), &mut counts);
            }
            st.flush(None, &mut sink).unwrap();
            (out, st.last.clone(), st.scan.out_of_order)
        };
        let (fast, sorted) = (run(false), run(true));
        // Meter 0's total register ends on day 2's second reading, the first
        // of the repeated pair (file order), not the repeat.
        assert_eq!(fast.1[0], (2 * DAY_MS + DAY_MS / 8, 50_000, false));
        assert_eq!(fast.0.len(), 3);
        assert_eq!(fast.0, sorted.0);
        assert_eq!(fast.1, sorted.1);
        assert_eq!((fast.2, sorted.2), (0, 0));
    }

    #[test]
    fn a_missing_snapshot_is_spread_flagged_and_reported_as_comm_loss() {
        // Snapshots on days 0, 1 and 3 (day 2 missing): 10 kWh, then 30 kWh over two days.
        let (days, scan) = feed(6, &[(0, 0), (DAY_MS, 100_000), (3 * DAY_MS, 400_000)]);
        let v: Vec<(i64, bool)> = days.iter().map(|d| (d.1, d.2)).collect();
        assert_eq!(v, vec![(100_000, false), (150_000, true), (150_000, true)]);
        assert_eq!(scan.events.len(), 1);
        assert_eq!(
            (scan.events[0].kind, scan.events[0].count),
            ("comm_loss", 1)
        );
        assert_eq!(scan.accounts[0].days, 3);
        assert_eq!(scan.monthly.get(0, epoch()).unwrap().e4, 400_000);
    }

    #[test]
    fn a_day_counts_once_per_account_and_gap_bookkeeping_stays_bounded() {
        // Account 0: meters 0 (10 kWh a day) and 1 (5 kWh a day, silent on
        // days 6..29). Account 1: meter 2 (10 kWh a day), read at midnight and
        // 03:00 on day 5, then silent until day 12. Snapshots at midnight.
        let meters = [meter(6), meter(6), meter(6)];
        let ma = [Some(0), Some(0), Some(1)];
        let plan = plan_of(&meters, &ma, 2);
        let mut st = State::new(&plan);
        let mut rows: Vec<(NaiveDate, u32)> = Vec::new();
        let mut sink = |b: &DayBatch<'_>| -> Result<(), AnalyticsError> {
            rows.extend(b.accounts.iter().map(|a| (b.date, *a)));
            Ok(())
        };
        let snap = |m: u32, ts: i64, raw: i64| RegUpdate {
            key: m * NREG as u32,
            ts,
            raw,
            est: false,
        };
        let mut counts = Vec::new();
        for d in 0..=40i64 {
            let mut u = vec![snap(0, d * DAY_MS, d * 100_000)];
            if !(6..30).contains(&d) {
                u.push(snap(1, d * DAY_MS, d * 50_000));
            }
            if !(6..12).contains(&d) {
                u.push(snap(2, d * DAY_MS, d * 100_000));
            }
            if d == 5 {
                u.push(snap(2, d * DAY_MS + DAY_MS / 8, d * 100_000 + 12_500));
            }
            st.apply_registers(&u, &mut counts);
            st.flush(Some(epoch() + Duration::days(d - 3)), &mut sink)
                .unwrap();
            if d == 29 {
                assert_eq!(st.counted[&0].len(), 1, "one run for the open gap");
            }
        }
        assert!(st.counted.is_empty(), "the gap closed");
        st.flush(None, &mut sink).unwrap();
        st.flush_late(&mut sink).unwrap();
        let scan = st.scan;
        assert_eq!(
            (scan.accounts[0].days, scan.accounts[0].sum),
            (40, 6_000_000)
        );
        assert_eq!(
            (scan.accounts[1].days, scan.accounts[1].sum),
            (40, 4_000_000)
        );
        let month = |a: usize| scan.monthly.get(a, epoch()).unwrap().days;
        assert_eq!((month(0), month(1)), (31, 31));
        let one: Vec<_> = rows.iter().filter(|r| r.1 == 1).collect();
        let days: BTreeSet<_> = one.iter().map(|r| r.0).collect();
        assert_eq!((one.len(), days.len()), (40, 40), "one row per day");
    }

    #[test]
    fn snapshots_every_15_minutes_add_up_to_their_day() {
        // Two days read every 15 minutes (and midnight after), 1 kWh per interval.
        let snaps: Vec<(i64, i64)> = (0..=192).map(|k| (k * 900_000, k * 10_000)).collect();
        let (days, scan) = feed(6, &snaps);
        assert_eq!(
            days,
            vec![
                (epoch(), 960_000, false),
                (epoch().succ_opt().unwrap(), 960_000, false)
            ]
        );
        assert!(scan.events.is_empty(), "no gap: {:?}", scan.events);
        assert_eq!(scan.accounts[0].days, 2);
    }

    #[test]
    fn a_register_wrapping_at_its_modulus_is_a_rollover_not_a_fall() {
        // 4-digit register: 9999.0 -> 0001.0 is 2 kWh.
        let (days, scan) = feed(4, &[(0, 99_990_000), (DAY_MS, 10_000)]);
        assert_eq!(days[0].1, 20_000);
        assert_eq!(scan.backwards_pairs, 0);
    }

    #[test]
    fn a_register_going_backwards_is_left_out_and_counted() {
        let (days, scan) = feed(6, &[(0, 500_000), (DAY_MS, 400_000)]);
        assert!(days.is_empty());
        assert_eq!(scan.backwards_pairs, 1);
    }

    #[test]
    fn snapshots_arriving_out_of_order_within_a_partition_are_sorted() {
        let meters = [meter(6)];
        let ma = [Some(0)];
        let plan = plan_of(&meters, &ma, 1);
        let (out, _) = {
            let (days, scan) = feed(6, &[(0, 0), (DAY_MS, 100_000), (2 * DAY_MS, 300_000)]);
            (days, scan)
        };
        // Same snapshots, the last two in one partition in reverse order.
        let mut st_days = Vec::new();
        {
            let mut st = State::new(&plan);
            let u = |ts, raw| RegUpdate {
                key: 0,
                ts,
                raw,
                est: false,
            };
            let mut counts = Vec::new();
            st.apply_registers(&[u(0, 0)], &mut counts);
            st.apply_registers(&[u(2 * DAY_MS, 300_000), u(DAY_MS, 100_000)], &mut counts);
            let mut sink = |b: &DayBatch<'_>| -> Result<(), AnalyticsError> {
                st_days.push((b.date, b.regs[0][0].unwrap(), b.estimated[0]));
                Ok(())
            };
            st.flush(None, &mut sink).unwrap();
        }
        assert_eq!(st_days, out);
    }

    #[test]
    fn trend_of_a_steady_rise() {
        // 10 days: 100, 110, ... (10 per day on a mean of 145): 10*30/145 = 206.9%.
        let mut s = AccountStats::default();
        for d in 0..10i64 {
            let v = 100 + 10 * d;
            s.days += 1;
            s.sum += v;
            s.sx += d;
            s.sxx += d * d;
            s.sxy += d * v;
        }
        assert_eq!(s.trend_pct_per_30_days(), Some(206.9));
    }

    #[test]
    fn holidays_and_adjusted_working_days_set_the_day_type() {
        let mut c = crate::tariff::calendar::Calendar::default();
        c.years.insert(2026);
        c.holidays
            .insert(NaiveDate::from_ymd_opt(2026, 10, 1).unwrap());
        c.workdays
            .insert(NaiveDate::from_ymd_opt(2026, 10, 10).unwrap());
        let d = |day| NaiveDate::from_ymd_opt(2026, 10, day).unwrap();
        assert_eq!(DAY_TYPES[day_type(Some(&c), d(1))], "holiday");
        assert_eq!(DAY_TYPES[day_type(Some(&c), d(10))], "weekday"); // a Saturday worked
        assert_eq!(DAY_TYPES[day_type(Some(&c), d(11))], "weekend");
        assert_eq!(DAY_TYPES[day_type(Some(&c), d(12))], "weekday");
        assert_eq!(DAY_TYPES[day_type(None, d(1))], "weekday");
        // A year the calendar does not cover: weekends only.
        let y = NaiveDate::from_ymd_opt(2030, 1, 1).unwrap();
        assert_eq!(DAY_TYPES[day_type(Some(&c), y)], "weekday");
    }

    #[test]
    fn primary_energy_applies_the_multiplier_exactly() {
        assert_eq!(to_primary(12_345, Decimal::from(4000)), 49_380_000);
        assert_eq!(to_primary(1, Decimal::new(15, 1)), 2);
        assert_eq!(Mult::Int(4000).apply(12_345), 49_380_000);
    }
}
