//! Deterministic synthetic fleet: master data plus cumulative register
//! readings written straight into a lake (atomic Parquet commits).
//!
//! Everything derives from `seed` and the meter index, so the same options
//! always give byte-identical master data and identical readings.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{Datelike, Duration as Days, NaiveDate, Weekday};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::model::Channel;
use crate::store::columns::ReadingsBuilder;
use crate::store::schema::{readings_schema, READINGS};
use crate::store::{atomic, partition_dir, StoreError};

/// Options of `meterflow sim fleet`.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    pub meters: usize,
    /// Days of consumption; D+1 daily snapshots are written (00:00 of each day and of the day after).
    pub days: u32,
    pub start: NaiveDate,
    pub seed: u64,
    pub out: PathBuf,
    /// Also write 15-minute `import_active_interval` profiles (96 rows per
    /// meter-day, each under the partition of its own UTC date). A day's
    /// intervals add up exactly to its total-register advance, and T1..T4
    /// then take the energy of their hours by the meters' TOU table instead
    /// of fixed shares (see `split_by_profile`).
    pub interval: bool,
    /// Share of meters (per mille) with an anomaly: gap, backwards reading, spike, rollover, exchange.
    pub anomaly_per_mille: u32,
    /// Share of residential accounts (percent) on prepayment.
    pub prepaid_percent: u32,
    /// Offset of local time from UTC, hours (+8 for China), -12..=14;
    /// snapshots are at local midnight.
    pub utc_offset_hours: i32,
    /// Meters per generated file (and per parallel task).
    pub chunk_meters: usize,
    /// Postpaid accounts pay a bill issued on the 1st of every month in the
    /// period, each with a steady habit (punctual, late, or defaulting).
    pub payment_habits: bool,
}

impl FleetOptions {
    pub fn new(out: impl Into<PathBuf>) -> Self {
        FleetOptions {
            meters: 300,
            days: 31,
            start: NaiveDate::from_ymd_opt(2026, 10, 1).expect("valid date"),
            seed: 42,
            out: out.into(),
            interval: false,
            anomaly_per_mille: 10,
            prepaid_percent: 30,
            utc_offset_hours: 8,
            chunk_meters: 250_000,
            payment_habits: false,
        }
    }
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FleetSummary {
    pub meters: usize,
    pub accounts: usize,
    pub readings: u64,
    pub files: usize,
    pub bytes: u64,
    pub payments: usize,
    pub elapsed_ms: u128,
    pub master_dir: String,
    pub lake_dir: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid option: {0}")]
    Invalid(String),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Class {
    Residential,
    Commercial,
    Industrial,
    Agricultural,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Anomaly {
    None,
    Gap(u32),
    Backwards(u32),
    Spike(u32),
    Rollover,
    Exchange(u32),
}

/// Everything about one meter that the generator needs, derived from (seed, index).
#[derive(Clone, Debug)]
struct Plan {
    index: usize,
    class: Class,
    household: u8,
    /// Mean daily use in 0.01 kWh of the register (secondary side for CT meters).
    daily_centi: u64,
    ct: u32,
    pt: u32,
    start_centi: [u64; 4],
    split: [u32; 4],
    anomaly: Anomaly,
    prepaid: bool,
    pf_per_mille: u32,
}

const MODULUS_CENTI: u64 = 100_000_000; // 10^6 kWh in 0.01 kWh

fn rng_for(seed: u64, index: usize, salt: u64) -> SmallRng {
    let mut z = seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt.rotate_left(17);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    SmallRng::seed_from_u64(z ^ (z >> 31))
}

fn plan(o: &FleetOptions, index: usize) -> Plan {
    let mut r = rng_for(o.seed, index, 1);
    let c = r.gen_range(0..1000);
    let class = match c {
        0..=899 => Class::Residential,
        900..=969 => Class::Commercial,
        970..=994 => Class::Industrial,
        _ => Class::Agricultural,
    };
    let household = r.gen_range(1..=5u8);
    let (daily_centi, ct, pt) = match class {
        Class::Residential => (350 + household as u64 * 250 + r.gen_range(0..400), 1, 1),
        Class::Commercial => (r.gen_range(5_000..50_000), 1, 1),
        // Secondary-side register: primary use / (CT x PT).
        Class::Industrial => {
            let ct = [40u32, 60, 80, 100, 150][r.gen_range(0..5)];
            let pt = 100u32;
            let primary_centi: u64 = r.gen_range(400_000..4_000_000);
            (primary_centi / (ct as u64 * pt as u64) + 1, ct, pt)
        }
        Class::Agricultural => (r.gen_range(500..5_000), 1, 1),
    };
    let total_start: u64 = r.gen_range(0..5_000_000);
    let split = [
        r.gen_range(3..8),
        r.gen_range(25..35),
        r.gen_range(30..40),
        r.gen_range(20..35),
    ];
    let mut start_centi = [0u64; 4];
    let sum: u32 = split.iter().sum();
    for (i, s) in split.iter().enumerate() {
        start_centi[i] = total_start * *s as u64 / sum as u64;
    }
    let days = o.days.max(1);
    let anomaly = if r.gen_range(0..1000) < o.anomaly_per_mille {
        let day = r.gen_range(1..days.max(2));
        match r.gen_range(0..5) {
            0 => Anomaly::Gap(day),
            1 => Anomaly::Backwards(day),
            2 => Anomaly::Spike(day),
            3 => Anomaly::Rollover,
            _ => Anomaly::Exchange(day),
        }
    } else {
        Anomaly::None
    };
    if anomaly == Anomaly::Rollover {
        // Close enough to 999999.99 kWh that the registers wrap inside the period.
        let total_near = MODULUS_CENTI - daily_centi * (days as u64 / 2 + 1);
        for (i, s) in split.iter().enumerate() {
            start_centi[i] = total_near * *s as u64 / sum as u64;
        }
    }
    Plan {
        index,
        class,
        household,
        daily_centi,
        ct,
        pt,
        start_centi,
        split,
        anomaly,
        prepaid: class == Class::Residential && r.gen_range(0..100) < o.prepaid_percent,
        pf_per_mille: r.gen_range(820..990),
    }
}

pub fn meter_id(index: usize) -> String {
    format!("{:012}", 300_000_000_000u64 + index as u64)
}

/// Id of the replacement meter installed at an exchange.
pub fn replacement_meter_id(index: usize) -> String {
    format!("{:012}", 900_000_000_000u64 + index as u64)
}

pub fn account_id(index: usize) -> String {
    format!("A{:09}", index + 1)
}

fn season_factor(date: NaiveDate) -> u64 {
    // percent: summer cooling and winter heating peaks
    match date.month() {
        7 | 8 => 140,
        6 | 9 => 115,
        12 | 1 | 2 => 125,
        _ => 100,
    }
}

/// Generates the fleet. `progress` is called with (done, total) work units.
pub fn generate(
    o: &FleetOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<FleetSummary, SimError> {
    if o.meters == 0 || o.days == 0 {
        return Err(SimError::Invalid(
            "--meters and --days must be positive".into(),
        ));
    }
    if o.chunk_meters == 0 {
        return Err(SimError::Invalid("chunk size must be positive".into()));
    }
    if !(-12..=14).contains(&o.utc_offset_hours) {
        return Err(SimError::Invalid(format!(
            "UTC offset {} h is outside -12..=14",
            o.utc_offset_hours
        )));
    }
    let t0 = Instant::now();
    let master = o.out.join("master");
    let lake = o.out.clone();
    let plans: Vec<Plan> = (0..o.meters).into_par_iter().map(|i| plan(o, i)).collect();
    let (meters_csv, accounts_csv, payments_csv, payments) = master_files(o, &plans);
    atomic::write_file_atomic(
        &master.join(crate::master::METERS_FILE),
        meters_csv.as_bytes(),
    )?;
    atomic::write_file_atomic(
        &master.join(crate::master::ACCOUNTS_FILE),
        accounts_csv.as_bytes(),
    )?;
    atomic::write_file_atomic(
        &master.join(crate::master::PAYMENTS_FILE),
        payments_csv.as_bytes(),
    )?;

    let chunks: Vec<&[Plan]> = plans.chunks(o.chunk_meters).collect();
    let total_units = (chunks.len() as u64) * (o.days as u64 + 1);
    let done = std::sync::atomic::AtomicU64::new(0);
    let results: Vec<Result<(u64, usize, u64), SimError>> = chunks
        .par_iter()
        .enumerate()
        .map(|(ci, chunk)| {
            write_chunk(o, &lake, ci, chunk, &|| {
                let d = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                progress(d, total_units);
            })
        })
        .collect();
    let mut s = FleetSummary {
        meters: plans.len()
            + plans
                .iter()
                .filter(|p| matches!(p.anomaly, Anomaly::Exchange(_)))
                .count(),
        accounts: plans.len(),
        payments,
        master_dir: master.display().to_string(),
        lake_dir: lake.display().to_string(),
        ..Default::default()
    };
    for r in results {
        let (rows, files, bytes) = r?;
        s.readings += rows;
        s.files += files;
        s.bytes += bytes;
    }
    s.elapsed_ms = t0.elapsed().as_millis();
    Ok(s)
}

/// Register state of one meter (0.01 kWh units, before the modulus).
#[derive(Clone, Copy)]
struct State {
    t: [u64; 4],
    reactive_centi: u64,
    demand_centi: u64,
    /// Old meter's registers at an exchange: the new meter counts from there.
    exchange_base: [u64; 4],
}

fn write_chunk(
    o: &FleetOptions,
    lake: &Path,
    chunk_index: usize,
    plans: &[Plan],
    tick: &(dyn Fn() + Sync),
) -> Result<(u64, usize, u64), SimError> {
    let ids: Vec<String> = plans.iter().map(|p| meter_id(p.index)).collect();
    let new_ids: Vec<String> = plans
        .iter()
        .map(|p| replacement_meter_id(p.index))
        .collect();
    let feeders: Vec<String> = plans
        .iter()
        .map(|p| format!("F{:03}", p.index % 200))
        .collect();
    let mut state: Vec<State> = plans
        .iter()
        .map(|p| State {
            t: p.start_centi,
            reactive_centi: p.start_centi.iter().sum::<u64>() / 3,
            demand_centi: 0,
            exchange_base: [0; 4],
        })
        .collect();
    // Interval mode: each meter's tariff-register advance over the previous
    // local day, whose last intervals are filed with this day's snapshot.
    let mut prev_parts: Vec<[u64; 4]> = if o.interval {
        vec![[0; 4]; plans.len()]
    } else {
        Vec::new()
    };
    let (mut rows, mut files, mut bytes) = (0u64, 0usize, 0u64);
    let name = format!("part-sim-c{chunk_index:04}.parquet");
    let mut rng = rng_for(o.seed, chunk_index, 7);
    let offset_secs = o.utc_offset_hours * 3600;
    for day in 0..=o.days {
        let date = o.start + Days::days(day as i64);
        let ts = crate::billing::period::local_midnight_ms(date, offset_secs);
        // The partition of this snapshot: the UTC date of its `ts`, as the
        // lake files every row. An interval row goes to the partition of its
        // own `ts`: a local day's 96 intervals, in (ts, ts + 24 h], fall on
        // this snapshot's UTC date and the next one's, so each iteration
        // writes the previous local day's intervals from this UTC midnight on
        // and this local day's up to the next UTC midnight.
        let utc_date = chrono::DateTime::from_timestamp_millis(ts)
            .map(|t| t.date_naive())
            .unwrap_or(date);
        let utc_from = utc_date
            .and_time(chrono::NaiveTime::MIN)
            .and_utc()
            .timestamp_millis();
        let utc_to = utc_from + DAY_MS;
        let per_meter = if o.interval { 5 + 96 } else { 5 };
        let mut b = ReadingsBuilder::with_capacity(plans.len() * per_meter + 64);
        // Replacement meters' ids sort after every original id: their rows
        // go after the others, so the file is sorted by meter id like the
        // files the lake writes (scans rely on it to skip pages by id).
        let mut replaced = ReadingsBuilder::with_capacity(64);
        for (k, p) in plans.iter().enumerate() {
            let received = ts + 300_000 + (p.index as i64 % 600) * 1000;
            // Whether local day `j` (0 = the start) is metered by the replacement meter.
            let exchanged_on = |j: u32| matches!(p.anomaly, Anomaly::Exchange(d) if j >= d);
            // A gap day has neither the snapshot nor the day's intervals.
            let gap_on = |j: u32| matches!(p.anomaly, Anomaly::Gap(d) if d == j);
            let exchanged = exchanged_on(day);
            let id = if exchanged { &new_ids[k] } else { &ids[k] };
            if let Anomaly::Exchange(d) = p.anomaly {
                if day == d {
                    // Final reading of the old meter at the exchange, same instant.
                    push_registers(
                        &mut b,
                        &ids[k],
                        ts,
                        &state[k],
                        p,
                        day,
                        received,
                        &feeders[k],
                        false,
                    );
                    state[k].exchange_base = state[k].t;
                }
            }
            let st = state[k];
            if !gap_on(day) {
                // A replacement meter starts from its own near-zero registers.
                let shown = if exchanged {
                    State {
                        t: [0, 1, 2, 3].map(|i| st.t[i] - st.exchange_base[i]),
                        ..st
                    }
                } else {
                    st
                };
                let to = if exchanged { &mut replaced } else { &mut b };
                push_registers(to, id, ts, &shown, p, day, received, &feeders[k], true);
            }
            if o.interval && day > 0 && !gap_on(day - 1) {
                // The previous local day's intervals from this UTC midnight on.
                let j = day - 1;
                let to = if exchanged_on(j) {
                    &mut replaced
                } else {
                    &mut b
                };
                let jid = if exchanged_on(j) {
                    &new_ids[k]
                } else {
                    &ids[k]
                };
                let prev = date - Days::days(1);
                let values = interval_values(&day_weights(o, p, prev), prev, &prev_parts[k]);
                push_intervals(
                    to,
                    jid,
                    ts - DAY_MS,
                    &values,
                    (utc_from, utc_to),
                    &feeders[k],
                );
            }
            if day < o.days {
                // The day's consumption: one noise draw per meter and day, in
                // the order the generator has always drawn them (day by day,
                // meter by meter), so the total registers are the same with
                // and without `--interval`, and as before intervals existed.
                let use_centi = day_use(p, date, &mut rng);
                let parts = if o.interval {
                    let weights = day_weights(o, p, date);
                    let parts = split_by_profile(use_centi, &weights, date);
                    if !gap_on(day) {
                        // This local day's intervals up to the next UTC midnight.
                        let to = if exchanged { &mut replaced } else { &mut b };
                        let values = interval_values(&weights, date, &parts);
                        push_intervals(to, id, ts, &values, (utc_from, utc_to), &feeders[k]);
                    }
                    prev_parts[k] = parts;
                    parts
                } else {
                    split_by_plan(p, use_centi)
                };
                advance(p, &mut state[k], date, use_centi, parts);
            }
        }
        let batch =
            arrow::compute::concat_batches(&readings_schema(), &[b.finish(), replaced.finish()])
                .map_err(|e| StoreError::Schema(format!("simulated readings: {e}")))?;
        rows += batch.num_rows() as u64;
        if batch.num_rows() > 0 {
            let path = partition_dir(lake, READINGS, utc_date).join(&name);
            bytes += atomic::write_parquet_atomic(&path, readings_schema(), &[batch])?;
            files += 1;
        }
        tick();
    }
    Ok((rows, files, bytes))
}

const DAY_MS: i64 = 86_400_000;

/// Consumption of local day `date` in 0.01 kWh of the register: the plan's
/// mean, the season, the weekend and the day's noise (one draw from `rng`).
fn day_use(p: &Plan, date: NaiveDate, rng: &mut SmallRng) -> u64 {
    let weekend = matches!(date.weekday(), Weekday::Sat | Weekday::Sun);
    let mut use_centi = p.daily_centi * season_factor(date) / 100;
    if weekend && p.class == Class::Residential {
        use_centi = use_centi * 110 / 100;
    }
    if weekend && p.class == Class::Industrial {
        use_centi = use_centi * 60 / 100;
    }
    let noise = rng.gen_range(70..=130u64);
    use_centi * noise / 100
}

/// Without a load profile: the day's use shared over T1..T4 by the plan's
/// fixed split.
fn split_by_plan(p: &Plan, use_centi: u64) -> [u64; 4] {
    let sum: u32 = p.split.iter().sum();
    let mut parts = [0u64; 4];
    let mut given = 0;
    for (part, share) in parts.iter_mut().zip(p.split).take(3) {
        *part = use_centi * share as u64 / sum as u64;
        given += *part;
    }
    parts[3] = use_centi - given;
    parts
}

/// Adds a day's use (`parts` per tariff register, summing to `use_centi`)
/// to the registers, with reactive energy and demand.
fn advance(p: &Plan, st: &mut State, date: NaiveDate, use_centi: u64, parts: [u64; 4]) {
    for (t, part) in st.t.iter_mut().zip(parts) {
        *t += part;
    }
    // tan(phi) from the plan's power factor, in per mille
    let pf = p.pf_per_mille as u64;
    let tan_pm = (1_000_000 - pf * pf).isqrt() * 1000 / pf.max(1);
    st.reactive_centi += use_centi * tan_pm / 1000;
    let peak_kw_centi = use_centi * 100 / 24 * 180 / 100 / 100;
    if date.day() == 1 {
        st.demand_centi = 0;
    }
    st.demand_centi = st.demand_centi.max(peak_kw_centi);
}
#[allow(clippy::too_many_arguments)]
fn push_registers(
    b: &mut ReadingsBuilder,
    id: &str,
    ts: i64,
    st: &State,
    p: &Plan,
    day: u32,
    received: i64,
    feeder: &str,
    apply_anomaly: bool,
) {
    let mut t = st.t;
    let mut total: u64 = t.iter().sum();
    if apply_anomaly {
        match p.anomaly {
            Anomaly::Backwards(d) if d == day => {
                let back = p.daily_centi * 3;
                total = total.saturating_sub(back);
                t[2] = t[2].saturating_sub(back);
            }
            Anomaly::Spike(d) if d == day => {
                total += p.daily_centi * 200;
                t[2] += p.daily_centi * 200;
            }
            _ => {}
        }
    }
    // Registers show the value modulo 10^6 kWh; values are in 0.01 kWh -> scale 4 is x100.
    let reg = |v: u64| ((v % MODULUS_CENTI) as i128) * 100;
    let registers = [
        (Channel::ImportActiveT1, reg(t[0])),
        (Channel::ImportActiveT2, reg(t[1])),
        (Channel::ImportActiveT3, reg(t[2])),
        (Channel::ImportActiveT4, reg(t[3])),
        (Channel::ImportActiveTotal, reg(total)),
        (Channel::ImportReactiveTotal, reg(st.reactive_centi)),
        (Channel::MaxDemandImport, st.demand_centi as i128 * 100),
    ];
    // Only industrial meters report reactive energy and demand.
    let n = if p.class == Class::Industrial { 7 } else { 5 };
    for &(channel, value) in &registers[..n] {
        b.push_scaled(
            id, ts, channel, value, "ok", "sim", "fleet", feeder, received,
        );
    }
}

/// Tariff register (0..3 = T1 sharp, T2 peak, T3 flat, T4 valley) of each
/// local hour: the meters' programmed time-of-use table, the one of
/// `tariffs/gd-tou-commercial.toml` (critical-peak hours in July-September).
const TOU_SUMMER: [u8; 24] = [
    3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 1, 0, 2, 2, 1, 0, 0, 1, 1, 2, 2, 2, 2, 2,
];
const TOU_REST: [u8; 24] = [
    3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 1, 1, 2, 2, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2,
];

fn tou_table(date: NaiveDate) -> &'static [u8; 24] {
    if (7..=9).contains(&date.month()) {
        &TOU_SUMMER
    } else {
        &TOU_REST
    }
}

/// Relative load by local hour, per class and weekday / weekend.
fn hourly_shape(class: Class, weekend: bool) -> &'static [u64; 24] {
    const RESIDENTIAL: [u64; 24] = [
        3, 2, 2, 2, 2, 3, 5, 7, 6, 5, 5, 6, 6, 5, 5, 5, 6, 8, 10, 11, 10, 8, 6, 4,
    ];
    const RESIDENTIAL_WEEKEND: [u64; 24] = [
        3, 3, 2, 2, 2, 2, 3, 5, 7, 7, 7, 7, 7, 6, 6, 6, 7, 8, 10, 11, 10, 8, 6, 4,
    ];
    const COMMERCIAL: [u64; 24] = [
        2, 2, 2, 2, 2, 2, 3, 5, 8, 10, 11, 11, 10, 11, 11, 11, 10, 9, 8, 6, 4, 3, 2, 2,
    ];
    const COMMERCIAL_WEEKEND: [u64; 24] = [
        2, 2, 2, 2, 2, 2, 3, 4, 6, 8, 9, 9, 9, 9, 9, 8, 7, 6, 5, 4, 3, 3, 2, 2,
    ];
    const INDUSTRIAL: [u64; 24] = [
        6, 6, 6, 6, 6, 6, 7, 8, 10, 10, 10, 10, 9, 10, 10, 10, 10, 9, 8, 7, 7, 7, 6, 6,
    ];
    const INDUSTRIAL_WEEKEND: [u64; 24] = [
        6, 6, 6, 6, 6, 6, 6, 7, 8, 8, 8, 8, 8, 8, 8, 8, 8, 7, 7, 6, 6, 6, 6, 6,
    ];
    const AGRICULTURAL: [u64; 24] = [
        4, 4, 4, 4, 4, 5, 7, 9, 10, 10, 10, 9, 8, 9, 10, 10, 9, 7, 5, 4, 4, 4, 4, 4,
    ];
    match (class, weekend) {
        (Class::Residential, false) => &RESIDENTIAL,
        (Class::Residential, true) => &RESIDENTIAL_WEEKEND,
        (Class::Commercial, false) => &COMMERCIAL,
        (Class::Commercial, true) => &COMMERCIAL_WEEKEND,
        (Class::Industrial, false) => &INDUSTRIAL,
        (Class::Industrial, true) => &INDUSTRIAL_WEEKEND,
        (Class::Agricultural, _) => &AGRICULTURAL,
    }
}

/// Weights of the 96 quarter hours of a meter's local day: its class's
/// hourly shape (weekday or weekend) with +-15% noise per quarter hour,
/// derived from (seed, meter, date) alone so a day's profile can be drawn
/// again when its last intervals are written with the next day's files.
fn day_weights(o: &FleetOptions, p: &Plan, date: NaiveDate) -> [u64; 96] {
    let weekend = matches!(date.weekday(), Weekday::Sat | Weekday::Sun);
    let shape = hourly_shape(p.class, weekend);
    let mut r = rng_for(
        o.seed,
        p.index,
        0x5EED_0000_0000 ^ date.num_days_from_ce() as u64,
    );
    let mut w = [0u64; 96];
    for (i, x) in w.iter_mut().enumerate() {
        *x = shape[i / 4] * r.gen_range(85..=115u64);
    }
    w
}

/// `total` shared over `weights` exactly: item i gets
/// floor(total x W_i / W) - floor(total x W_(i-1) / W) with W_i the running
/// sum of the weights, so the parts add up to `total` and each is within one
/// unit of its exact share. `None` weights are skipped (get nothing).
fn share(total: u64, weights: impl Iterator<Item = Option<u64>> + Clone) -> Vec<u64> {
    let sum: u64 = weights.clone().flatten().sum();
    let mut out = Vec::with_capacity(96);
    let (mut run, mut given) = (0u64, 0u64);
    for w in weights {
        match w {
            Some(w) if sum > 0 => {
                run += w;
                let upto = (total as u128 * run as u128 / sum as u128) as u64;
                out.push(upto - given);
                given = upto;
            }
            _ => out.push(0),
        }
    }
    out
}

/// The day's use (0.01 kWh) shared over T1..T4 as the meter's TOU table
/// sees the day's profile: each register gets the energy of its hours.
fn split_by_profile(use_centi: u64, weights: &[u64; 96], date: NaiveDate) -> [u64; 4] {
    let table = tou_table(date);
    let mut per_register = [0u64; 4];
    for (i, w) in weights.iter().enumerate() {
        per_register[table[i / 4] as usize] += w;
    }
    let s = share(use_centi, per_register.iter().map(|w| Some(*w)));
    [s[0], s[1], s[2], s[3]]
}

/// The 96 interval values of a day in the lake's scaled units (0.0001 kWh):
/// each tariff register's advance `parts` (0.01 kWh) spread over its own
/// quarter hours by the weights, so the intervals of every TOU period add up
/// exactly to its register's advance and all 96 to the total register's.
fn interval_values(weights: &[u64; 96], date: NaiveDate, parts: &[u64; 4]) -> [i64; 96] {
    let table = tou_table(date);
    let mut v = [0i64; 96];
    for (r, part) in parts.iter().enumerate() {
        let mine = weights
            .iter()
            .enumerate()
            .map(|(i, w)| (table[i / 4] as usize == r).then_some(*w));
        for (x, s) in v.iter_mut().zip(share(part * 100, mine)) {
            *x += s as i64;
        }
    }
    v
}

/// The intervals of the local day starting at `day_start` whose `ts`
/// (interval end) lies in `[from, to)`, i.e. in one UTC date partition.
/// Stamped at interval end, received at the end of the day.
fn push_intervals(
    b: &mut ReadingsBuilder,
    id: &str,
    day_start: i64,
    values: &[i64; 96],
    (from, to): (i64, i64),
    feeder: &str,
) {
    for (i, v) in values.iter().enumerate() {
        let ts = day_start + (i as i64 + 1) * 900_000;
        if ts < from || ts >= to {
            continue;
        }
        b.push_scaled(
            id,
            ts,
            Channel::ImportActiveInterval,
            *v as i128,
            "ok",
            "sim",
            "fleet",
            feeder,
            day_start + DAY_MS,
        );
    }
}

const FAMILY: [&str; 20] = [
    "王", "李", "张", "刘", "陈", "杨", "黄", "赵", "吴", "周", "徐", "孙", "马", "朱", "胡", "郭",
    "何", "高", "林", "罗",
];
const GIVEN: [&str; 20] = [
    "伟", "芳", "娜", "敏", "静", "丽", "强", "磊", "军", "洋", "勇", "艳", "杰", "娟", "涛", "明",
    "超", "秀英", "华", "平",
];
const DISTRICTS: [(&str, &str); 8] = [
    ("东城区", "110101"),
    ("西城区", "110102"),
    ("朝阳区", "110105"),
    ("丰台区", "110106"),
    ("海淀区", "110108"),
    ("通州区", "110112"),
    ("昌平区", "110114"),
    ("大兴区", "110115"),
];
const STREETS: [&str; 6] = [
    "建国路",
    "长安街",
    "中关村大街",
    "望京街",
    "学院路",
    "光华路",
];
const OCCUPATIONS: [&str; 8] = [
    "employee",
    "worker",
    "teacher",
    "retired",
    "self_employed",
    "farmer",
    "student",
    "civil_servant",
];

/// GB 11643 check digit of an 18-digit ID number.
fn id_check_digit(first17: &str) -> char {
    const W: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const C: [char; 11] = ['1', '0', 'X', '9', '8', '7', '6', '5', '4', '3', '2'];
    let s: u32 = first17
        .chars()
        .zip(W)
        .map(|(c, w)| c.to_digit(10).unwrap_or(0) * w)
        .sum();
    C[(s % 11) as usize]
}

fn tariff_for(p: &Plan) -> (&'static str, &'static str, u32) {
    match p.class {
        Class::Residential if p.index % 5 == 4 => ("residential", "bj-residential-annual", 0),
        Class::Residential => ("residential", "bj-residential-monthly", 0),
        Class::Commercial => ("commercial", "gd-tou-commercial", 0),
        Class::Industrial => (
            "industrial",
            "industry-two-part",
            [315u32, 400, 630, 800, 1000][p.index % 5],
        ),
        Class::Agricultural => ("agricultural", "bj-residential-monthly", 0),
    }
}

fn master_files(o: &FleetOptions, plans: &[Plan]) -> (String, String, String, usize) {
    let mut meters = String::from(
        "meter_id,account_id,meter_type,ct_ratio,pt_ratio,register_digits,installed_on,removed_on,feeder\n",
    );
    let mut accounts = String::from(
        "account_id,name,phone,id_number,address,district,age_band,occupation,gender,customer_class,tariff_id,payment_mode,contracted_kva,household_size,opened_on\n",
    );
    let mut payments = String::from("txn_id,channel,account_id,amount,paid_at\n");
    let mut n_pay = 0;
    for p in plans {
        let mut r = rng_for(o.seed, p.index, 2);
        let installed = NaiveDate::from_ymd_opt(
            2015 + (p.index % 10) as i32,
            1 + (p.index % 12) as u32,
            1 + (p.index % 28) as u32,
        )
        .unwrap_or(o.start);
        let installed = installed.min(o.start - Days::days(30));
        let meter_type = match p.class {
            Class::Residential => "residential_1p",
            Class::Industrial => "industrial_ct",
            _ => "commercial_3p",
        };
        let feeder = format!("F{:03}", p.index % 200);
        let aid = account_id(p.index);
        match p.anomaly {
            Anomaly::Exchange(d) => {
                let ex = o.start + Days::days(d as i64);
                let _ = writeln!(
                    meters,
                    "{},{aid},{meter_type},{},{},6,{installed},{ex},{feeder}",
                    meter_id(p.index),
                    p.ct,
                    p.pt
                );
                let _ = writeln!(
                    meters,
                    "{},{aid},{meter_type},{},{},6,{ex},,{feeder}",
                    replacement_meter_id(p.index),
                    p.ct,
                    p.pt
                );
            }
            _ => {
                let _ = writeln!(
                    meters,
                    "{},{aid},{meter_type},{},{},6,{installed},,{feeder}",
                    meter_id(p.index),
                    p.ct,
                    p.pt
                );
            }
        }
        let (district, code) = DISTRICTS[r.gen_range(0..DISTRICTS.len())];
        let year = r.gen_range(1945..2004);
        let birth = format!("{year}{:02}{:02}", r.gen_range(1..=12), r.gen_range(1..=28));
        let seq: u32 = r.gen_range(100..999);
        let first17 = format!("{code}{birth}{seq}");
        let id_number = format!("{first17}{}", id_check_digit(&first17));
        let gender = if seq % 2 == 1 { "male" } else { "female" };
        let age = 2026 - year;
        let age_band = match age {
            ..=29 => "18-29",
            30..=44 => "30-44",
            45..=59 => "45-59",
            _ => "60+",
        };
        let name = format!(
            "{}{}{}",
            FAMILY[r.gen_range(0..FAMILY.len())],
            GIVEN[r.gen_range(0..GIVEN.len())],
            if r.gen_bool(0.5) {
                GIVEN[r.gen_range(0..GIVEN.len())]
            } else {
                ""
            }
        );
        let phone = format!(
            "1{}{:09}",
            r.gen_range(3..=9),
            r.gen_range(0..1_000_000_000u64)
        );
        let address = format!(
            "北京市{district}{}{}号{}单元{}室",
            STREETS[r.gen_range(0..STREETS.len())],
            r.gen_range(1..300),
            r.gen_range(1..6),
            r.gen_range(101..2400)
        );
        let occupation = if age >= 62 {
            "retired"
        } else {
            OCCUPATIONS[r.gen_range(0..OCCUPATIONS.len())]
        };
        let (class, tariff, kva) = tariff_for(p);
        let mode = if p.prepaid { "prepaid" } else { "postpaid" };
        let household = if p.class == Class::Residential {
            p.household
        } else {
            0
        };
        let _ = writeln!(
            accounts,
            "{aid},{name},{phone},{id_number},{address},{district},{age_band},{occupation},{gender},{class},{tariff},{mode},{kva},{household},{installed}"
        );
        // Payments: prepaid top-ups at the start and mid-period; postpaid pays last month's bill.
        let channels = ["wechat", "alipay", "bank", "counter"];
        let pay_days: Vec<u32> = if p.prepaid {
            vec![0, o.days / 2]
        } else {
            vec![r.gen_range(3..20.min(o.days.max(4)))]
        };
        if o.payment_habits && !p.prepaid {
            n_pay += habit_payments(o, p, &aid, &mut payments);
            continue;
        }
        for (j, d) in pay_days.into_iter().enumerate() {
            let est_month_yuan_fen = p.daily_centi * 30 * 55 / 100; // ~0.55 yuan/kWh, in fen
            let amount_fen = if p.prepaid {
                [5_000u64, 10_000, 20_000, 30_000][r.gen_range(0..4)]
            } else {
                est_month_yuan_fen * p.ct as u64 * p.pt as u64 * r.gen_range(85..115) / 100 + 1
            };
            let at = (o.start + Days::days(d as i64))
                .and_hms_opt(r.gen_range(1..14), r.gen_range(0..60), r.gen_range(0..60))
                .unwrap_or_default()
                .and_utc();
            let ch = channels[r.gen_range(0..channels.len())];
            let _ = writeln!(
                payments,
                "{}-{:09}-{j},{ch},{aid},{}.{:02},{}",
                ch.to_uppercase(),
                p.index + 1,
                amount_fen / 100,
                amount_fen % 100,
                at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            );
            n_pay += 1;
        }
    }
    (meters, accounts, payments, n_pay)
}

/// Payments of a postpaid account with a steady habit, one per bill issued
/// on the 1st of each month after the start (bills of the month before):
/// 70% pay 2-10 days after the bill, 20% 16-35 days after, 10% skip half of
/// their bills and pay the rest 20-40 days late. Payments after the period
/// are not written. Returns the number written.
fn habit_payments(o: &FleetOptions, p: &Plan, aid: &str, out: &mut String) -> usize {
    let mut r = rng_for(o.seed, p.index, 11);
    let habit = r.gen_range(0..100u32);
    let channels = ["wechat", "alipay", "bank", "counter"];
    // Late payers and defaulters use the counter more often.
    let ch = if habit >= 70 && r.gen_range(0..2) == 0 {
        "counter"
    } else {
        channels[r.gen_range(0..channels.len())]
    };
    let end = o.start + Days::days(o.days as i64);
    let mut bill = o.start.with_day(1).unwrap_or(o.start);
    let mut n = 0;
    loop {
        bill = NaiveDate::from_ymd_opt(
            bill.year() + (bill.month() / 12) as i32,
            bill.month() % 12 + 1,
            1,
        )
        .unwrap_or(end);
        if bill > end {
            return n;
        }
        let delay = match habit {
            0..=69 => r.gen_range(2..=10),
            70..=89 => r.gen_range(16..=35),
            _ if r.gen_range(0..2) == 0 => continue,
            _ => r.gen_range(20..=40),
        };
        let day = bill + Days::days(delay);
        if day >= end {
            continue;
        }
        let fen = p.daily_centi * 30 * 55 / 100 * p.ct as u64 * p.pt as u64 * r.gen_range(85..115)
            / 100
            + 1;
        let at = day
            .and_hms_opt(r.gen_range(1..14), r.gen_range(0..60), 0)
            .unwrap_or_default()
            .and_utc();
        let _ = writeln!(
            out,
            "{}-{:09}-{n},{ch},{aid},{}.{:02},{}",
            ch.to_uppercase(),
            p.index + 1,
            fen / 100,
            fen % 100,
            at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
        n += 1;
    }
}

/// Elapsed helper for summaries.
pub fn fmt_duration(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_exactly_and_stay_within_one_unit() {
        let w = [3u64, 0, 7, 11, 1];
        for total in [0u64, 1, 2, 21, 22, 1_000_003] {
            let s = share(total, w.iter().map(|x| Some(*x)));
            assert_eq!(s.iter().sum::<u64>(), total);
            for (x, wi) in s.iter().zip(w) {
                let exact = total as f64 * wi as f64 / 22.0;
                assert!((*x as f64 - exact).abs() < 1.0, "{s:?}");
            }
        }
        // Skipped items get nothing; the others share the whole total.
        let s = share(10, [Some(1), None, Some(1)].into_iter());
        assert_eq!(s, vec![5, 0, 5]);
    }

    #[test]
    fn a_day_s_intervals_add_up_to_its_register_advances_period_by_period() {
        let o = FleetOptions::new("unused");
        let mut rng = rng_for(1, 2, 3);
        for index in 0..200 {
            let p = plan(&o, index);
            // A weekday and a weekend day, in and out of the critical-peak months.
            for date in ["2026-10-14", "2026-10-17", "2026-08-05", "2026-07-12"] {
                let date: NaiveDate = date.parse().unwrap();
                let use_centi = day_use(&p, date, &mut rng);
                let w = day_weights(&o, &p, date);
                assert_eq!(w, day_weights(&o, &p, date), "drawn again the same");
                let parts = split_by_profile(use_centi, &w, date);
                assert_eq!(parts.iter().sum::<u64>(), use_centi);
                let v = interval_values(&w, date, &parts);
                assert!(v.iter().all(|x| *x >= 0));
                assert_eq!(v.iter().sum::<i64>(), use_centi as i64 * 100);
                let table = tou_table(date);
                for (r, part) in parts.iter().enumerate() {
                    let sum: i64 = (0..96)
                        .filter(|i| table[i / 4] as usize == r)
                        .map(|i| v[i])
                        .sum();
                    assert_eq!(sum, *part as i64 * 100, "register T{}", r + 1);
                }
                if date.month() == 10 {
                    assert_eq!(parts[0], 0, "no sharp hours outside July-September");
                }
            }
        }
    }

    /// (meter, ts, channel, value) of every row of a fleet's lake.
    fn lake_rows(dir: &Path) -> Vec<(String, i64, String, i128)> {
        let mut out: Vec<_> = lake_rows_filed(dir).into_iter().map(|(_, r)| r).collect();
        out.sort();
        out
    }

    /// Every row of a fleet's lake with the `date=` partition it is filed under.
    fn lake_rows_filed(dir: &Path) -> Vec<(NaiveDate, (String, i64, String, i128))> {
        use arrow::array::{Array, Decimal128Array, StringArray, TimestampMillisecondArray};
        let mut out = vec![];
        let mut dirs = vec![dir.join(READINGS)];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let path = e.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                    continue;
                }
                let filed: NaiveDate = path
                    .parent()
                    .and_then(|d| d.file_name()?.to_str()?.strip_prefix("date="))
                    .expect("a date= partition")
                    .parse()
                    .unwrap();
                for b in crate::store::reader::read_file(&path).unwrap() {
                    let col = |n: &str| b.column_by_name(n).unwrap().clone();
                    let (id, ts, ch, v) =
                        (col("meter_id"), col("ts"), col("channel"), col("value"));
                    let id = id.as_any().downcast_ref::<StringArray>().unwrap();
                    let ts = ts
                        .as_any()
                        .downcast_ref::<TimestampMillisecondArray>()
                        .unwrap();
                    let ch = ch.as_any().downcast_ref::<StringArray>().unwrap();
                    let v = v.as_any().downcast_ref::<Decimal128Array>().unwrap();
                    for i in 0..b.num_rows() {
                        out.push((
                            filed,
                            (
                                id.value(i).to_string(),
                                ts.value(i),
                                ch.value(i).to_string(),
                                v.value(i),
                            ),
                        ));
                    }
                }
            }
        }
        out
    }

    #[test]
    fn interval_rows_are_filed_under_their_own_utc_date_at_any_offset() {
        use std::collections::BTreeSet;
        let tmp = tempfile::tempdir().unwrap();
        for hours in [-5, 0, 14] {
            let mut o = FleetOptions::new(tmp.path().join(format!("o{hours}")));
            o.meters = 6;
            o.days = 3;
            o.anomaly_per_mille = 0;
            o.interval = true;
            o.utc_offset_hours = hours;
            generate(&o, &|_, _| {}).unwrap();
            let utc_date = |ts: i64| {
                chrono::DateTime::from_timestamp_millis(ts)
                    .unwrap()
                    .date_naive()
            };
            // Intervals per (meter, local day): ts is the interval's end.
            let mut per_day: std::collections::BTreeMap<(String, NaiveDate), BTreeSet<i64>> =
                Default::default();
            let mut rows = 0;
            for (filed, (id, ts, ch, _)) in lake_rows_filed(&o.out) {
                assert_eq!(filed, utc_date(ts), "{hours:+} h: {id} {ch} at {ts}");
                if ch == "import_active_interval" {
                    rows += 1;
                    let local = utc_date(ts - 900_000 + hours as i64 * 3_600_000);
                    per_day.entry((id, local)).or_default().insert(ts);
                }
            }
            let days: Vec<NaiveDate> = (0..o.days)
                .map(|d| o.start + Days::days(d as i64))
                .collect();
            for k in 0..o.meters {
                for d in &days {
                    let n = per_day.get(&(meter_id(k), *d)).map_or(0, |t| t.len());
                    assert_eq!(n, 96, "{hours:+} h: {} on {d}", meter_id(k));
                }
            }
            assert_eq!(
                per_day.len(),
                o.meters * days.len(),
                "{hours:+} h: other days"
            );
            assert_eq!(
                rows,
                o.meters * days.len() * 96,
                "{hours:+} h: no duplicates"
            );
        }
    }

    #[test]
    fn intervals_leave_the_total_registers_as_they_are_without_them() {
        let tmp = tempfile::tempdir().unwrap();
        let run = |interval: bool| {
            let mut o = FleetOptions::new(tmp.path().join(format!("i{interval}")));
            o.meters = 120;
            o.days = 9;
            o.anomaly_per_mille = 300;
            o.chunk_meters = 50;
            o.interval = interval;
            generate(&o, &|_, _| {}).unwrap();
            lake_rows(&o.out)
        };
        let (plain, with) = (run(false), run(true));
        let tariff = |c: &str| c.starts_with("import_active_t");
        let keep = |rows: &[(String, i64, String, i128)], interval: bool| {
            rows.iter()
                .filter(|r| !tariff(&r.2) && (r.2 == "import_active_interval") == interval)
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(keep(&plain, false), keep(&with, false));
        assert!(keep(&plain, true).is_empty());
        // 96 intervals for every meter-day but the gap days.
        let n = keep(&with, true).len();
        assert!(n > 115 * 9 * 96 && n <= 120 * 9 * 96, "{n}");
        // Same rows again from the same options.
        assert_eq!(with, run(true));
    }

    #[test]
    fn profiles_have_their_class_s_shape() {
        let o = FleetOptions::new("unused");
        let date: NaiveDate = "2026-10-14".parse().unwrap();
        let share_of = |p: &Plan, hours: std::ops::Range<usize>| {
            let w = day_weights(&o, p, date);
            let part: u64 = w[hours.start * 4..hours.end * 4].iter().sum();
            part * 100 / w.iter().sum::<u64>()
        };
        let find = |c: Class| {
            (0..1000)
                .map(|i| plan(&o, i))
                .find(|p| p.class == c)
                .unwrap()
        };
        // Households peak in the evening, shops and offices by day.
        assert!(share_of(&find(Class::Residential), 18..22) >= 25);
        assert!(share_of(&find(Class::Commercial), 8..18) >= 55);
    }
}
