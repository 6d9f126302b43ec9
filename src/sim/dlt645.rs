//! Simulated DL/T 645 meters: many meters on one bus, served behind one TCP
//! port exactly as a transparent serial-to-TCP gateway would, or on a pty /
//! serial device so the serial path is tested as serial.
//!
//! - Replies are paced at the bus's baud rate (request wire time, meter
//!   turnaround, then one character every `bits_per_char / baud` seconds).
//! - Registers advance with a daily load profile; energy lands in the tariff
//!   register of the time of day (sharp, peak, flat, valley).
//! - Faults per meter: no reply, late reply, bad checksum, garbage bytes,
//!   error replies, wrong address — always or on every n-th request.
//!
//! The meters file format is documented in `docs/collectors.md` with an
//! example in `sample-data/dlt645-meters.toml`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{Datelike, FixedOffset, NaiveTime, TimeZone, Timelike};
use rust_decimal::Decimal;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::protocol::dlt645::catalogue::{lookup, Format};
use crate::protocol::dlt645::frame::{control, decode, Decoded, Frame};
use crate::protocol::dlt645::message::{
    self, parse_relay_request, ErrorStatus, Password, RelayCommand,
};
use crate::protocol::dlt645::{Address, Di, Edition, MeterTime, Value};

/// The meters file: `[bus]` settings and `[[meter]]`s.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SimFile {
    #[serde(default)]
    pub bus: SimBusSettings,
    #[serde(default, rename = "meter")]
    pub meters: Vec<SimMeterConfig>,
}

/// `[bus]`: line timing and time.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimBusSettings {
    /// Pace bytes at this baud rate; absent = no pacing (as fast as the socket goes).
    #[serde(default)]
    pub baud: Option<u32>,
    /// Bits per character on the line: 11 for 8E1.
    #[serde(default = "d_bits")]
    pub bits_per_char: u32,
    /// Meter response delay after the end of the request (the standard allows 20..500 ms).
    #[serde(default = "d_turnaround")]
    pub turnaround_ms: u64,
    /// FE bytes the meters send before each reply.
    #[serde(default = "d_preamble")]
    pub preamble: usize,
    /// Simulated seconds per real second for energy accumulation (clocks stay
    /// real: the clock, the daily freeze at local midnight and the time of
    /// maximum demand follow the meter's real-time clock, not simulated time).
    #[serde(default = "d_scale")]
    pub time_scale: u32,
    /// Offset of the meters' clocks from UTC.
    #[serde(default = "d_offset")]
    pub utc_offset: String,
    /// Time-of-use switch points `"HH:MM=T"` (T = tariff register 1..4);
    /// default: the usual sharp/peak/flat/valley day.
    #[serde(default = "d_tou")]
    pub tou: Vec<String>,
}

impl Default for SimBusSettings {
    fn default() -> Self {
        SimBusSettings {
            baud: None,
            bits_per_char: d_bits(),
            turnaround_ms: d_turnaround(),
            preamble: d_preamble(),
            time_scale: d_scale(),
            utc_offset: d_offset(),
            tou: d_tou(),
        }
    }
}

/// `[[meter]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimMeterConfig {
    pub address: Address,
    #[serde(default)]
    pub edition: Edition,
    /// Forward active energy at start, kWh (split over the tariffs).
    #[serde(default)]
    pub import_kwh: Decimal,
    /// Reverse active energy at start, kWh.
    #[serde(default)]
    pub export_kwh: Decimal,
    /// Average load, W (0 freezes the registers).
    #[serde(default = "d_load")]
    pub load_w: u32,
    /// Average export (e.g. rooftop PV), W.
    #[serde(default)]
    pub export_w: u32,
    /// 1 or 3: single-phase meters refuse phase B/C DIs.
    #[serde(default = "d_phases")]
    pub phases: u8,
    /// Meter clock minus real time, seconds.
    #[serde(default)]
    pub clock_offset_s: i64,
    /// Remaining amount of a prepayment meter (`00900200`); absent = not a prepayment meter.
    #[serde(default)]
    pub balance: Option<Decimal>,
    /// Password for writes and relay control, `PA` + 6 digits.
    #[serde(default = "d_password")]
    pub password: String,
    /// Longer answers are split into follow-up frames (the standard's limit is 200).
    #[serde(default = "d_max_data")]
    pub max_frame_data: usize,
    #[serde(default)]
    pub faults: Faults,
}

impl SimMeterConfig {
    /// A meter with defaults and the given address and starting register.
    pub fn new(address: Address, import_kwh: Decimal) -> SimMeterConfig {
        SimMeterConfig {
            address,
            edition: Edition::V2007,
            import_kwh,
            export_kwh: Decimal::ZERO,
            load_w: d_load(),
            export_w: 0,
            phases: d_phases(),
            clock_offset_s: 0,
            balance: None,
            password: d_password(),
            max_frame_data: d_max_data(),
            faults: Faults::default(),
        }
    }
}

/// Fault injection flags of one meter.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// Never answer.
    #[serde(default)]
    pub no_reply: bool,
    /// Answer this many ms later than the turnaround (after the collector gave up).
    #[serde(default)]
    pub late_reply_ms: u64,
    /// Corrupt the checksum of replies.
    #[serde(default)]
    pub bad_checksum: bool,
    /// Put line noise before replies.
    #[serde(default)]
    pub garbage: bool,
    /// Answer reads with an error reply (no requested data).
    #[serde(default)]
    pub error_reply: bool,
    /// Answer with another address.
    #[serde(default)]
    pub wrong_address: bool,
    /// Apply the faults only to every n-th request (0 or 1 = always).
    #[serde(default)]
    pub every_nth: u32,
}

fn d_bits() -> u32 {
    11
}
fn d_turnaround() -> u64 {
    20
}
fn d_preamble() -> usize {
    4
}
fn d_scale() -> u32 {
    1
}
fn d_offset() -> String {
    "+08:00".into()
}
fn d_tou() -> Vec<String> {
    [
        "00:00=4", "08:00=2", "10:00=1", "11:00=2", "12:00=3", "17:00=2", "19:00=1", "21:00=3",
        "23:00=4",
    ]
    .map(String::from)
    .to_vec()
}
fn d_load() -> u32 {
    800
}
fn d_phases() -> u8 {
    1
}
fn d_password() -> String {
    "02000000".into()
}
fn d_max_data() -> usize {
    200
}

/// A meters file that does not parse or validate.
#[derive(Debug, thiserror::Error)]
pub enum SimConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}:{line}: {message}")]
    Parse {
        file: String,
        line: usize,
        message: String,
    },
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
}

impl SimFile {
    /// `n` healthy 2007 meters with varied registers and loads (addresses 000000000001..), for demos.
    pub fn demo(n: usize) -> SimFile {
        let meters = (1..=n)
            .map(|i| {
                let mut m = SimMeterConfig::new(
                    Address::from_index(i),
                    Decimal::new(100_000 + 37_129 * i as i64, 2),
                );
                m.load_w = 400 + (i as u32 * 173) % 2400;
                m
            })
            .collect();
        SimFile {
            meters,
            ..Default::default()
        }
    }

    pub fn parse(file: &Path, text: &str) -> Result<SimFile, SimConfigError> {
        let f = file.display().to_string();
        let sf: SimFile = toml::from_str(text).map_err(|e| SimConfigError::Parse {
            file: f.clone(),
            line: e
                .span()
                .map(|s| crate::protocol::modbus::config::line_of(text, s.start))
                .unwrap_or(0),
            message: e.message().to_string(),
        })?;
        sf.validate()
            .map_err(|message| SimConfigError::Invalid { file: f, message })?;
        Ok(sf)
    }

    pub fn load(file: &Path) -> Result<SimFile, SimConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| SimConfigError::Read {
            file: file.display().to_string(),
            source,
        })?;
        Self::parse(file, &text)
    }

    fn validate(&self) -> Result<(), String> {
        parse_offset(&self.bus.utc_offset)?;
        parse_tou(&self.bus.tou)?;
        let mut seen = std::collections::HashSet::new();
        for (i, m) in self.meters.iter().enumerate() {
            if !seen.insert(m.address) {
                return Err(format!("meter[{i}].address: {} appears twice", m.address));
            }
            m.password
                .parse::<Password>()
                .map_err(|e| format!("meter[{i}].password: {e}"))?;
            if m.max_frame_data < 8 || m.max_frame_data > 255 {
                return Err(format!("meter[{i}].max_frame_data: must be 8..255"));
            }
        }
        Ok(())
    }
}

fn parse_offset(s: &str) -> Result<FixedOffset, String> {
    crate::collector::config::parse_offset(s)
}

/// Sorted (minute of day, tariff index 0..3).
fn parse_tou(v: &[String]) -> Result<Vec<(u32, usize)>, String> {
    let mut out = vec![];
    for s in v {
        let (t, r) = s
            .split_once('=')
            .ok_or_else(|| format!("tou '{s}' is not \"HH:MM=T\""))?;
        let t = NaiveTime::parse_from_str(t.trim(), "%H:%M")
            .map_err(|_| format!("tou '{s}': bad time"))?;
        let r: usize = r
            .trim()
            .parse()
            .ok()
            .filter(|r| (1..=4).contains(r))
            .ok_or_else(|| format!("tou '{s}': tariff must be 1..4"))?;
        out.push((t.hour() * 60 + t.minute(), r - 1));
    }
    out.sort();
    if out.first().map(|p| p.0) != Some(0) {
        return Err("tou must start at 00:00".into());
    }
    Ok(out)
}

const DAY_MS: i64 = 86_400_000;

/// Real time (ms) <-> simulated time (ms): simulated time starts at the real
/// start and runs `scale` times as fast.
#[derive(Debug, Clone, Copy)]
struct TimeMap {
    start_ms: i64,
    scale: i64,
}

impl TimeMap {
    fn sim(self, real_ms: i64) -> i64 {
        self.start_ms + (real_ms - self.start_ms) * self.scale
    }

    /// The real time at which simulated time was `sim_ms` (rounded down).
    fn real(self, sim_ms: i64) -> i64 {
        self.start_ms + (sim_ms - self.start_ms).div_euclid(self.scale.max(1))
    }
}

/// The first local midnight strictly after `ms` (UTC ms) at offset `off`.
fn next_midnight(ms: i64, off: FixedOffset) -> i64 {
    let shift = off.local_minus_utc() as i64 * 1000;
    ((ms + shift).div_euclid(DAY_MS) + 1) * DAY_MS - shift
}

/// Energy is kept in millijoules; 1 kWh = 3.6e9 mJ, 0.01 kWh = 3.6e7 mJ.
const MJ_PER_CENTI_KWH: i128 = 36_000_000;
/// Registers roll over at 1 000 000 kWh = 1e8 centi-kWh.
const REGISTER_MODULUS: i128 = 100_000_000;

/// Residential load profile, per mille of the average, by hour.
const PROFILE: [i64; 24] = [
    500, 450, 400, 400, 400, 500, 800, 1100, 1000, 900, 900, 1000, 1100, 1000, 900, 900, 1000,
    1300, 1600, 1700, 1500, 1200, 900, 700,
];

/// Relay and alarm state of a meter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RelayState {
    pub tripped: bool,
    pub close_allowed: bool,
    pub alarm: bool,
    pub protected: bool,
}

/// One value a meter served correctly (for tests comparing with the lake).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub address: Address,
    pub di: Di,
    pub value: Value,
}

#[derive(Debug)]
struct SimMeter {
    cfg: SimMeterConfig,
    password: Password,
    /// Tariff registers 1..4, mJ.
    import: [i128; 4],
    export: [i128; 4],
    /// Simulated time of the last advance, ms.
    sim_ms: i64,
    power_w: i64,
    /// Maximum demand (W) and the real time it was reached (ms).
    max_demand: (i64, i64),
    /// Registers at the last daily freeze and the freeze time on the meter's
    /// own clock (ms of the local midnight it froze at, in the clock's frame).
    frozen: ([i128; 4], [i128; 4], i64),
    clock_offset_ms: i64,
    requests: u64,
    params: HashMap<u32, Vec<u8>>,
    relay: RelayState,
    /// Follow-up chunks still to send, by DI.
    pending: HashMap<Di, Vec<Vec<u8>>>,
}

fn split_initial(kwh: Decimal) -> [i128; 4] {
    let centi = (kwh * Decimal::ONE_HUNDRED).trunc().mantissa()
        / 10i128.pow((kwh * Decimal::ONE_HUNDRED).trunc().scale());
    // 10% sharp, 30% peak, the rest flat, 30% valley.
    let t1 = centi / 10;
    let t2 = centi * 3 / 10;
    let t4 = centi * 3 / 10;
    let t3 = centi - t1 - t2 - t4;
    [t1, t2, t3, t4].map(|c| c * MJ_PER_CENTI_KWH)
}

fn centi(mj: i128) -> i128 {
    (mj / MJ_PER_CENTI_KWH) % REGISTER_MODULUS
}

fn kwh(mj: i128) -> Decimal {
    Decimal::from_i128_with_scale(centi(mj), 2)
}

impl SimMeter {
    fn new(cfg: SimMeterConfig, now_ms: i64) -> SimMeter {
        let import = split_initial(cfg.import_kwh);
        let mut export = [0i128; 4];
        export[2] = split_initial(cfg.export_kwh).iter().sum();
        let password = cfg.password.parse().expect("validated");
        SimMeter {
            password,
            import,
            export,
            sim_ms: now_ms,
            power_w: cfg.load_w as i64,
            max_demand: (0, now_ms),
            frozen: (import, export, 0),
            clock_offset_ms: cfg.clock_offset_s * 1000,
            requests: 0,
            params: HashMap::new(),
            relay: RelayState {
                close_allowed: true,
                ..Default::default()
            },
            pending: HashMap::new(),
            cfg,
        }
    }

    fn jitter(&self, salt: i64) -> i64 {
        // Deterministic per meter and minute: -50..=50 per mille.
        let mut h: u64 = u64::from_le_bytes([
            self.cfg.address.0[0],
            self.cfg.address.0[1],
            self.cfg.address.0[2],
            self.cfg.address.0[3],
            self.cfg.address.0[4],
            self.cfg.address.0[5],
            0,
            0,
        ]);
        h ^= salt as u64;
        h = h.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^= h >> 29;
        (h % 101) as i64 - 50
    }

    /// Advances registers to simulated time `sim_now` (ms), local offset `off`.
    ///
    /// Energy, its daily profile and the tariff register it lands in follow
    /// simulated time; the meter's clock runs in real time (`tm` maps one to
    /// the other), so the daily freeze happens when that clock passes local
    /// midnight, with the registers of that instant, and the maximum demand
    /// is stamped with the real time it was reached: no time the meter
    /// reports is ever ahead of its clock, whatever the time scale.
    fn advance(&mut self, sim_now: i64, off: FixedOffset, tou: &[(u32, usize)], tm: TimeMap) {
        while self.sim_ms < sim_now {
            let mut step = (sim_now - self.sim_ms).min(60_000);
            let real_ms = tm.real(self.sim_ms);
            // Next local midnight on the meter's clock, as simulated time.
            let freeze_at = next_midnight(real_ms + self.clock_offset_ms, off);
            let freeze_sim = tm.sim(freeze_at - self.clock_offset_ms);
            let freeze = freeze_sim > self.sim_ms && freeze_sim <= self.sim_ms + step;
            if freeze {
                step = freeze_sim - self.sim_ms;
            }
            let local = off
                .timestamp_millis_opt(self.sim_ms)
                .single()
                .map(|d| d.naive_local())
                .unwrap_or_default();
            let minute = local.hour() * 60 + local.minute();
            let tariff = tou
                .iter()
                .rev()
                .find(|(m, _)| *m <= minute)
                .map(|p| p.1)
                .unwrap_or(2);
            let w = self.cfg.load_w as i64 * PROFILE[local.hour() as usize] / 1000
                * (1000 + self.jitter(self.sim_ms / 60_000))
                / 1000;
            self.power_w = w;
            if w > self.max_demand.0 {
                self.max_demand = (w, real_ms);
            }
            self.import[tariff] += (w as i128) * step as i128;
            if self.cfg.export_w > 0 {
                let daylight = (7..19).contains(&local.hour());
                if daylight {
                    self.export[tariff] += self.cfg.export_w as i128 * step as i128;
                }
            }
            self.sim_ms += step;
            if freeze {
                // Daily freeze at local midnight by the meter's clock.
                self.frozen = (self.import, self.export, freeze_at);
                // The 1st at 00:00 is the default settlement day (04000B01 =
                // 01 00): the month's maximum demand starts again from 0.
                let day = off
                    .timestamp_millis_opt(freeze_at)
                    .single()
                    .map(|d| chrono::Datelike::day(&d));
                if day == Some(1) {
                    self.max_demand = (0, freeze_at - self.clock_offset_ms);
                }
            }
        }
    }

    /// A time sync sets the clock. A jump forward past local midnight
    /// freezes then, as a meter makes up a missed daily freeze: the
    /// registers of the jump, stamped with the last midnight passed; past
    /// the 1st it also starts the month's maximum demand again. A jump back
    /// freezes nothing (the next midnight on the clock does).
    fn set_clock(&mut self, offset_ms: i64, now_ms: i64, off: FixedOffset) {
        let day = |ms: i64| {
            off.timestamp_millis_opt(ms)
                .single()
                .map(|d| d.date_naive())
        };
        let before = day(now_ms + self.clock_offset_ms);
        self.clock_offset_ms = offset_ms;
        let clock_ms = now_ms + offset_ms;
        let after = day(clock_ms);
        if let (Some(b), Some(a)) = (before, after) {
            if a > b {
                let midnight = next_midnight(clock_ms, off) - DAY_MS;
                self.frozen = (self.import, self.export, midnight);
                if (a.year(), a.month()) != (b.year(), b.month()) {
                    self.max_demand = (0, now_ms);
                }
            }
        }
    }

    fn clock(&self, now_ms: i64, off: FixedOffset) -> chrono::NaiveDateTime {
        off.timestamp_millis_opt(now_ms + self.clock_offset_ms)
            .single()
            .map(|d| d.naive_local())
            .unwrap_or_default()
    }

    /// The value of `di`, or `None` if this meter has no such data.
    fn value(&self, di: Di, now_ms: i64, off: FixedOffset) -> Option<Value> {
        let imp_total: i128 = self.import.iter().sum();
        let exp_total: i128 = self.export.iter().sum();
        let block = |regs: &[i128; 4]| {
            let mut v = vec![kwh(regs.iter().sum())];
            v.extend(regs.iter().map(|r| kwh(*r)));
            Value::Numbers(v)
        };
        let volts_deci = 2200 + self.jitter(now_ms / 1000) / 2;
        let amps_milli = self.power_w * 10_000 / volts_deci.max(1);
        let clock = self.clock(now_ms, off);
        let three = self.cfg.phases == 3;
        let phases = if three { 3 } else { 1 };
        let n = |m: i64, s: u32| Some(Value::Number(Decimal::new(m, s)));
        let code = di.code;
        match di.edition {
            Edition::V2007 => match code {
                0x0000_0000 => Some(Value::Number(kwh(imp_total + exp_total))),
                0x0001_0000 => Some(Value::Number(kwh(imp_total))),
                0x0001_0100..=0x0001_0400 if code & 0xFF == 0 => Some(Value::Number(kwh(
                    self.import[((code >> 8) & 0xFF) as usize - 1]
                ))),
                0x0001_FF00 => Some(block(&self.import)),
                0x0002_0000 => Some(Value::Number(kwh(exp_total))),
                0x0002_0100..=0x0002_0400 if code & 0xFF == 0 => Some(Value::Number(kwh(
                    self.export[((code >> 8) & 0xFF) as usize - 1]
                ))),
                0x0002_FF00 => Some(block(&self.export)),
                // Reactive energy follows active energy at a fixed ratio.
                0x0003_0000 => Some(Value::Number(kwh(imp_total * 3 / 10))),
                0x0004_0000 => Some(Value::Number(kwh(exp_total / 10))),
                0x0090_0200 => self.cfg.balance.map(Value::Number),
                0x0101_0000 => {
                    let at = self.clock(self.max_demand.1, off);
                    let mut at = MeterTime::from_naive(at);
                    at.second = 0;
                    Some(Value::NumberAt {
                        value: Decimal::new(self.max_demand.0 * 10, 4),
                        at,
                    })
                }
                0x0201_0100 => n(volts_deci, 1),
                0x0201_0200 | 0x0201_0300 if three => n(volts_deci + 3, 1),
                0x0201_FF00 if three => Some(Value::Numbers(vec![Decimal::new(volts_deci, 1); 3])),
                0x0202_0100 => n(amps_milli / phases, 3),
                0x0202_0200 | 0x0202_0300 if three => n(amps_milli / 3, 3),
                0x0202_FF00 if three => {
                    Some(Value::Numbers(vec![Decimal::new(amps_milli / 3, 3); 3]))
                }
                0x0203_0000 => n(self.power_w * 10, 4),
                0x0203_0100 => n(self.power_w * 10 / phases, 4),
                0x0203_0200 | 0x0203_0300 if three => n(self.power_w * 10 / 3, 4),
                0x0203_FF00 if three => {
                    let per = Decimal::new(self.power_w * 10 / 3, 4);
                    Some(Value::Numbers(vec![
                        Decimal::new(self.power_w * 10, 4),
                        per,
                        per,
                        per,
                    ]))
                }
                0x0204_0000 => n(self.power_w * 3, 4),
                0x0205_0000 => n(self.power_w * 105 / 10, 4),
                0x0206_0000 => n(950 + self.jitter(7) / 5, 3),
                0x0280_0002 => n(5000 + self.jitter(now_ms / 1000 + 1) / 20, 2),
                0x0400_0101 => Some(date_value(clock)),
                0x0400_0102 => Some(time_value(clock)),
                0x0400_0401 => Some(Value::Address(self.cfg.address)),
                0x0400_1001..=0x0400_1005 => {
                    let bytes = self
                        .params
                        .get(&code)
                        .cloned()
                        .unwrap_or_else(|| vec![0; 4]);
                    Format::Bcd {
                        len: 4,
                        scale: 2,
                        signed: false,
                    }
                    .decode(&bytes)
                    .ok()
                }
                0x0506_0001 => {
                    // `frozen.2` is already a reading of the meter's clock.
                    let t = off
                        .timestamp_millis_opt(self.frozen.2)
                        .single()
                        .map(|d| d.naive_local())
                        .unwrap_or_default();
                    Some(Value::DateTime(MeterTime::from_naive(t)))
                }
                0x0506_0101 => Some(block(&self.frozen.0)),
                0x0506_0201 => Some(block(&self.frozen.1)),
                _ => None,
            },
            Edition::V1997 => match code {
                0x9010 => Some(Value::Number(kwh(imp_total))),
                0x9011..=0x9014 => Some(Value::Number(kwh(self.import[(code - 0x9011) as usize]))),
                0x901F => Some(block(&self.import)),
                0x9020 => Some(Value::Number(kwh(exp_total))),
                0x902F => Some(block(&self.export)),
                0xB611 => n((volts_deci + 5) / 10, 0),
                0xB621 => n(amps_milli / 10, 2),
                0xB630 => n(self.power_w * 10, 4),
                0xC010 => Some(date_value(clock)),
                0xC011 => Some(time_value(clock)),
                0xC032 => Some(Value::Address(self.cfg.address)),
                _ => None,
            },
        }
    }
}

fn date_value(t: chrono::NaiveDateTime) -> Value {
    Value::Date {
        year: t.year() as u16,
        month: t.month() as u8,
        day: t.day() as u8,
        weekday: t.weekday().num_days_from_sunday() as u8,
    }
}

fn time_value(t: chrono::NaiveDateTime) -> Value {
    Value::Time {
        hour: t.hour() as u8,
        minute: t.minute() as u8,
        second: t.second() as u8,
    }
}

/// A reply to send: after the turnaround plus `extra`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub extra: Duration,
    pub bytes: Vec<u8>,
}

/// The bus: its meters and settings. Pure: time comes in as arguments.
#[derive(Debug)]
pub struct SimBus {
    settings: SimBusSettings,
    offset: FixedOffset,
    tou: Vec<(u32, usize)>,
    meters: Vec<SimMeter>,
    start_real_ms: i64,
    served: Vec<Served>,
    relay_log: Vec<(Address, RelayCommand)>,
}

impl SimBus {
    pub fn new(file: SimFile, now_ms: i64) -> Result<SimBus, String> {
        file.validate()?;
        let offset = parse_offset(&file.bus.utc_offset)?;
        let tou = parse_tou(&file.bus.tou)?;
        // The registers at start are what the last daily freeze (local
        // midnight on the meter's clock) saw.
        Ok(SimBus {
            meters: file
                .meters
                .into_iter()
                .map(|m| {
                    let mut m = SimMeter::new(m, now_ms);
                    m.frozen.2 = next_midnight(now_ms + m.clock_offset_ms, offset) - DAY_MS;
                    m
                })
                .collect(),
            settings: file.bus,
            offset,
            tou,
            start_real_ms: now_ms,
            served: vec![],
            relay_log: vec![],
        })
    }

    fn sim_now(&self, now_ms: i64) -> i64 {
        self.time_map().sim(now_ms)
    }

    fn time_map(&self) -> TimeMap {
        TimeMap {
            start_ms: self.start_real_ms,
            scale: self.settings.time_scale as i64,
        }
    }

    fn encode(&self, f: &Frame) -> Vec<u8> {
        f.encode(self.settings.preamble)
            .expect("replies fit in a frame")
    }

    /// Handles one request frame received at `now_ms`; returns what goes back on the line.
    pub fn handle(&mut self, req: &Frame, now_ms: i64) -> Vec<Outgoing> {
        if control::is_reply(req.control) {
            return vec![];
        }
        let f = control::function(req.control);
        if req.address.is_broadcast() {
            if f == control::TIME_SYNC && req.data.len() >= 6 {
                if let Some(t) = parse_sync(&req.data) {
                    if let Some(sent) = self.offset.from_local_datetime(&t).single() {
                        let (sim_now, tm) = (self.sim_now(now_ms), self.time_map());
                        let (off, tou) = (self.offset, self.tou.clone());
                        for m in &mut self.meters {
                            // Registers up to the old clock first: the jump
                            // must not move energy across a freeze.
                            m.advance(sim_now, off, &tou, tm);
                            m.set_clock(sent.timestamp_millis() - now_ms, now_ms, off);
                        }
                    }
                }
            }
            return vec![];
        }
        let selected: Vec<usize> = (0..self.meters.len())
            .filter(|&i| req.address.selects(&self.meters[i].cfg.address))
            .collect();
        match selected.len() {
            0 => vec![],
            1 => self.answer(selected[0], req, now_ms),
            _ => {
                // Several meters answer at once: a collision, i.e. garbage on the line.
                vec![Outgoing {
                    extra: Duration::ZERO,
                    bytes: vec![0xFE, 0x68, 0xE7, 0x1F, 0x00, 0x68, 0x93, 0xFF, 0x01, 0x16],
                }]
            }
        }
    }

    fn answer(&mut self, i: usize, req: &Frame, now_ms: i64) -> Vec<Outgoing> {
        let (sim_now, tm) = (self.sim_now(now_ms), self.time_map());
        let (off, tou) = (self.offset, self.tou.clone());
        let m = &mut self.meters[i];
        m.advance(sim_now, off, &tou, tm);
        m.requests += 1;
        let faults = m.cfg.faults.clone();
        let active = faults.every_nth <= 1 || m.requests.is_multiple_of(faults.every_nth as u64);
        if active && faults.no_reply {
            return vec![];
        }
        let addr = m.cfg.address;
        let f = control::function(req.control);
        let mut served = None;
        let reply: Frame = match f {
            control::READ | control::READ_1997 => {
                let edition = if f == control::READ {
                    Edition::V2007
                } else {
                    Edition::V1997
                };
                // A meter does not understand the other edition's read: it
                // stays silent, as real ones do (a collector set to the wrong
                // edition must see timeouts here, not answers).
                if edition != m.cfg.edition {
                    return vec![];
                }
                match Di::read(edition, &req.data) {
                    _ if active && faults.error_reply => {
                        message::error_reply(addr, req.control, ErrorStatus(0x02))
                    }
                    None => message::error_reply(addr, req.control, ErrorStatus(0x01)),
                    Some(di) => match (m.value(di, now_ms, off), lookup(di)) {
                        (Some(v), Some(info)) => {
                            let mut bytes = vec![];
                            if info.format.encode(&v, &mut bytes).is_err() {
                                message::error_reply(addr, req.control, ErrorStatus(0x01))
                            } else {
                                served = Some(Served {
                                    address: addr,
                                    di,
                                    value: v,
                                });
                                let room = m.cfg.max_frame_data - di.wire_len();
                                if bytes.len() > room {
                                    // 2007 follow-ups carry a sequence byte; 1997 ones do not.
                                    let seq_len = usize::from(edition == Edition::V2007);
                                    let room_next = m.cfg.max_frame_data - di.wire_len() - seq_len;
                                    let rest: Vec<Vec<u8>> = bytes[room..]
                                        .chunks(room_next)
                                        .map(<[u8]>::to_vec)
                                        .collect();
                                    m.pending.insert(di, rest);
                                    message::read_reply(addr, di, &bytes[..room], true)
                                } else {
                                    message::read_reply(addr, di, &bytes, false)
                                }
                            }
                        }
                        _ => message::error_reply(addr, req.control, ErrorStatus(0x02)),
                    },
                }
            }
            control::READ_FOLLOW => match (Di::read(Edition::V2007, &req.data), req.data.get(4)) {
                (Some(di), Some(&seq)) if seq >= 1 => {
                    match m.pending.get(&di).and_then(|c| c.get(seq as usize - 1)) {
                        Some(part) => {
                            let last = m.pending[&di].len() == seq as usize;
                            let r = message::follow_reply(addr, di, &part.clone(), seq, !last);
                            if last {
                                m.pending.remove(&di);
                            }
                            r
                        }
                        None => message::error_reply(addr, req.control, ErrorStatus(0x02)),
                    }
                }
                _ => message::error_reply(addr, req.control, ErrorStatus(0x01)),
            },
            // 1997 follow-ups have no sequence number: chunks are served in order.
            control::READ_FOLLOW_1997 => match Di::read(Edition::V1997, &req.data) {
                Some(di) => match m.pending.get_mut(&di) {
                    Some(chunks) if !chunks.is_empty() => {
                        let part = chunks.remove(0);
                        let more = !chunks.is_empty();
                        if !more {
                            m.pending.remove(&di);
                        }
                        message::follow_reply(addr, di, &part, 0, more)
                    }
                    _ => message::error_reply(addr, req.control, ErrorStatus(0x02)),
                },
                None => message::error_reply(addr, req.control, ErrorStatus(0x01)),
            },
            control::READ_ADDRESS => message::read_address_reply(addr),
            control::WRITE => {
                if req.data.len() < 12 {
                    message::error_reply(addr, req.control, ErrorStatus(0x01))
                } else if (Password {
                    level: req.data[4],
                    code: [req.data[5], req.data[6], req.data[7]],
                }) != m.password
                {
                    message::error_reply(addr, req.control, ErrorStatus(0x04))
                } else {
                    let di = Di::read(Edition::V2007, &req.data).expect("length checked");
                    m.params.insert(di.code, req.data[12..].to_vec());
                    Frame::new(addr, control::WRITE | control::REPLY, vec![])
                }
            }
            control::RELAY => match parse_relay_request(&req.data) {
                None => message::error_reply(addr, req.control, ErrorStatus(0x01)),
                Some(r) if r.password != m.password => {
                    message::error_reply(addr, req.control, ErrorStatus(0x04))
                }
                Some(r) => {
                    let expired = r.expiry.to_naive().is_none_or(|e| e < m.clock(now_ms, off));
                    match r.command {
                        Some(c) if !expired => {
                            apply_relay(&mut m.relay, c);
                            self.relay_log.push((addr, c));
                            Frame::new(addr, control::RELAY | control::REPLY, vec![])
                        }
                        _ => message::error_reply(addr, req.control, ErrorStatus(0x01)),
                    }
                }
            },
            _ => message::error_reply(addr, req.control, ErrorStatus(0x01)),
        };
        let m = &self.meters[i];
        let mut reply = reply;
        let mut corrupt = false;
        if active && faults.wrong_address {
            reply.address.0[0] ^= 0x01;
            corrupt = true;
        }
        let mut bytes = self.encode(&reply);
        if active && faults.bad_checksum {
            let n = bytes.len();
            bytes[n - 2] = bytes[n - 2].wrapping_add(1);
            corrupt = true;
        }
        if active && faults.garbage {
            let mut g = vec![0x00, 0x13, 0xFF, 0x55, 0x68, 0x01];
            g.extend(bytes);
            bytes = g;
        }
        let late = active && faults.late_reply_ms > 0;
        let extra = if late {
            Duration::from_millis(faults.late_reply_ms)
        } else {
            Duration::ZERO
        };
        if let Some(s) = served.filter(|_| !corrupt && !late) {
            let _ = m;
            self.served.push(s);
        }
        vec![Outgoing { extra, bytes }]
    }
}

fn apply_relay(r: &mut RelayState, c: RelayCommand) {
    match c {
        RelayCommand::Trip => {
            if !r.protected {
                r.tripped = true;
                r.close_allowed = false;
            }
        }
        RelayCommand::AllowClose => r.close_allowed = true,
        RelayCommand::DirectClose => {
            r.tripped = false;
            r.close_allowed = true;
        }
        RelayCommand::AlarmOn => r.alarm = true,
        RelayCommand::AlarmOff => r.alarm = false,
        RelayCommand::ProtectOn => r.protected = true,
        RelayCommand::ProtectOff => r.protected = false,
    }
}

fn parse_sync(d: &[u8]) -> Option<chrono::NaiveDateTime> {
    let b = |i: usize| crate::protocol::dlt645::bcd::byte_to_u8(d[i]);
    MeterTime {
        second: b(0)?,
        minute: b(1)?,
        hour: b(2)?,
        day: b(3)?,
        month: b(4)?,
        year: 2000 + b(5)? as u16,
    }
    .to_naive()
}

/// A running simulator's shared state, for tests and tools.
#[derive(Debug, Clone)]
pub struct SimHandle {
    bus: Arc<Mutex<SimBus>>,
}

impl SimHandle {
    fn lock(&self) -> std::sync::MutexGuard<'_, SimBus> {
        self.bus.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every value served correctly so far, in order.
    pub fn served(&self) -> Vec<Served> {
        self.lock().served.clone()
    }

    /// Relay commands executed so far.
    pub fn relay_log(&self) -> Vec<(Address, RelayCommand)> {
        self.lock().relay_log.clone()
    }

    pub fn relay_state(&self, address: Address) -> Option<RelayState> {
        self.lock()
            .meters
            .iter()
            .find(|m| m.cfg.address == address)
            .map(|m| m.relay)
    }

    /// Changes a meter's faults while running.
    pub fn set_faults(&self, address: Address, faults: Faults) {
        if let Some(m) = self
            .lock()
            .meters
            .iter_mut()
            .find(|m| m.cfg.address == address)
        {
            m.cfg.faults = faults;
        }
    }

    /// A meter's clock minus the true clock, in ms (changed by a broadcast time sync).
    pub fn clock_offset_ms(&self, address: Address) -> Option<i64> {
        self.lock()
            .meters
            .iter()
            .find(|m| m.cfg.address == address)
            .map(|m| m.clock_offset_ms)
    }

    /// Requests each meter has received.
    pub fn requests(&self, address: Address) -> u64 {
        self.lock()
            .meters
            .iter()
            .find(|m| m.cfg.address == address)
            .map_or(0, |m| m.requests)
    }
}

/// A simulator on a TCP port.
#[derive(Debug)]
pub struct SimServer {
    pub addr: SocketAddr,
    pub handle: SimHandle,
    pub task: JoinHandle<()>,
}

/// Serves the meters of `file` on `addr` (port 0 picks one) as a transparent gateway.
pub async fn spawn_tcp(file: SimFile, addr: SocketAddr) -> std::io::Result<SimServer> {
    let bus = SimBus::new(file, crate::model::now_ms()).map_err(std::io::Error::other)?;
    let handle = SimHandle {
        bus: Arc::new(Mutex::new(bus)),
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let h = handle.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((sock, peer)) = listener.accept().await else {
                continue;
            };
            let _ = sock.set_nodelay(true);
            tracing::info!(%peer, "sim dlt645: client connected");
            let h = h.clone();
            tokio::spawn(async move {
                if let Err(e) = serve(sock, h).await {
                    tracing::debug!(%peer, error = %e, "sim dlt645: client gone");
                }
            });
        }
    });
    Ok(SimServer { addr, handle, task })
}

/// A simulator on a pty: open `path` as a serial port.
#[derive(Debug)]
pub struct SimPty {
    pub path: PathBuf,
    pub handle: SimHandle,
    pub task: JoinHandle<()>,
}

/// Serves the meters of `file` on a new pty pair; the collector opens `path`.
pub fn spawn_pty(file: SimFile) -> std::io::Result<SimPty> {
    let bus = SimBus::new(file, crate::model::now_ms()).map_err(std::io::Error::other)?;
    let handle = SimHandle {
        bus: Arc::new(Mutex::new(bus)),
    };
    let (master, slave, path) = pty::open()?;
    let h = handle.clone();
    let task = tokio::spawn(async move {
        // Keep the slave open so the master never sees a hang-up between clients.
        let _slave = slave;
        if let Err(e) = serve(master, h).await {
            tracing::warn!(error = %e, "sim dlt645: pty closed");
        }
    });
    Ok(SimPty { path, handle, task })
}

/// Serves the meters of `file` on an existing serial device (e.g. one end of a socat pty pair).
pub fn spawn_serial(file: SimFile, port: &str) -> std::io::Result<(SimHandle, JoinHandle<()>)> {
    let bus = SimBus::new(file, crate::model::now_ms()).map_err(std::io::Error::other)?;
    let handle = SimHandle {
        bus: Arc::new(Mutex::new(bus)),
    };
    let s = crate::collector::dlt645::link::open_serial(
        &crate::collector::config::SerialSettings::with_port(port),
    )?;
    let h = handle.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = serve(s, h).await {
            tracing::warn!(error = %e, "sim dlt645: serial port closed");
        }
    });
    Ok((handle, task))
}

fn char_time(s: &SimBusSettings) -> Option<Duration> {
    s.baud
        .filter(|b| *b > 0)
        .map(|b| Duration::from_nanos(1_000_000_000u64 * s.bits_per_char as u64 / b as u64))
}

/// Reads requests, answers them with pacing. One bus: requests are handled in order.
async fn serve<S: AsyncRead + AsyncWrite + Send + 'static>(
    stream: S,
    handle: SimHandle,
) -> std::io::Result<()> {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let settings = handle.lock().settings.clone();
    let ct = char_time(&settings);
    let turnaround = Duration::from_millis(settings.turnaround_ms);
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            let r = match ct {
                None => wr.write_all(&bytes).await,
                Some(ct) => paced_write(&mut wr, &bytes, ct).await,
            };
            if r.is_err() || wr.flush().await.is_err() {
                break;
            }
        }
    });
    let mut buf: Vec<u8> = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    let mut line_free_at = Instant::now();
    let result = loop {
        let n = match rd.read(&mut chunk).await {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) => break Err(e),
        };
        let arrived = Instant::now();
        buf.extend_from_slice(&chunk[..n]);
        loop {
            match decode(&buf) {
                Decoded::Frame {
                    frame, consumed, ..
                } => {
                    let req = frame.to_frame();
                    // The request occupies the line for its wire time.
                    let wire = ct.map_or(Duration::ZERO, |c| c * consumed as u32);
                    let end = arrived.max(line_free_at) + wire;
                    line_free_at = end;
                    buf.drain(..consumed);
                    let outs = handle.lock().handle(&req, crate::model::now_ms());
                    for o in outs {
                        let at = end + turnaround + o.extra;
                        if o.extra.is_zero() {
                            line_free_at =
                                at + ct.map_or(Duration::ZERO, |c| c * o.bytes.len() as u32);
                        }
                        let _ = tx.send((at, o.bytes));
                    }
                }
                // Meters ignore what they cannot read.
                Decoded::Invalid { consumed, .. } => {
                    buf.drain(..consumed);
                }
                Decoded::Incomplete { skipped, .. } => {
                    buf.drain(..skipped);
                    break;
                }
            }
        }
    };
    drop(tx);
    let _ = writer.await;
    result
}

/// Writes one byte per character time, each when its stop bit would end.
async fn paced_write<W: AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
    ct: Duration,
) -> std::io::Result<()> {
    let start = Instant::now();
    let mut sent = 0usize;
    while sent < bytes.len() {
        let elapsed = start.elapsed();
        let due = ((elapsed.as_nanos() / ct.as_nanos().max(1)) as usize).min(bytes.len());
        if due > sent {
            w.write_all(&bytes[sent..due]).await?;
            w.flush().await?;
            sent = due;
        }
        if sent < bytes.len() {
            tokio::time::sleep_until(start + ct * (sent as u32 + 1)).await;
        }
    }
    Ok(())
}

/// A pty pair as a tokio stream (master side).
mod pty {
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::path::PathBuf;
    use std::pin::Pin;
    use std::task::{ready, Context, Poll};

    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
    use tokio::io::unix::AsyncFd;
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    pub struct Master(AsyncFd<File>);

    /// Opens a raw pty pair; returns the master stream, the slave fd (keep it open) and the slave path.
    pub fn open() -> std::io::Result<(Master, OwnedFd, PathBuf)> {
        let p = nix::pty::openpty(None, None).map_err(std::io::Error::from)?;
        let mut t = tcgetattr(&p.slave).map_err(std::io::Error::from)?;
        cfmakeraw(&mut t);
        tcsetattr(&p.slave, SetArg::TCSANOW, &t).map_err(std::io::Error::from)?;
        let path = nix::unistd::ttyname(&p.slave).map_err(std::io::Error::from)?;
        let flags = fcntl(p.master.as_raw_fd(), FcntlArg::F_GETFL).map_err(std::io::Error::from)?;
        fcntl(
            p.master.as_raw_fd(),
            FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
        )
        .map_err(std::io::Error::from)?;
        // SAFETY: the File owns the master fd and lives inside the AsyncFd, so the
        // fd stays open for as long as it is registered.
        let master = unsafe { AsyncFd::register(File::from(p.master)) }?;
        Ok((Master(master), p.slave, path))
    }

    impl AsyncRead for Master {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            loop {
                let mut guard = ready!(self.0.poll_read_ready(cx))?;
                let unfilled = buf.initialize_unfilled();
                match guard.try_io(|inner| inner.get_ref().read(unfilled)) {
                    Ok(Ok(n)) => {
                        buf.advance(n);
                        return Poll::Ready(Ok(()));
                    }
                    Ok(Err(e)) => return Poll::Ready(Err(e)),
                    Err(_would_block) => continue,
                }
            }
        }
    }

    impl AsyncWrite for Master {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            loop {
                let mut guard = ready!(self.0.poll_write_ready(cx))?;
                match guard.try_io(|inner| inner.get_ref().write(data)) {
                    Ok(r) => return Poll::Ready(r),
                    Err(_would_block) => continue,
                }
            }
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::dlt645::frame::parse_hex;
    use rust_decimal_macros::dec;

    fn bus(meters: Vec<SimMeterConfig>) -> SimBus {
        SimBus::new(
            SimFile {
                bus: SimBusSettings {
                    preamble: 0,
                    ..Default::default()
                },
                meters,
            },
            1_700_000_000_000,
        )
        .unwrap()
    }

    #[test]
    fn answers_the_verified_vector() {
        let mut m = SimMeterConfig::new("398192000337".parse().unwrap(), dec!(0.04));
        m.load_w = 0;
        let mut b = bus(vec![m]);
        let req = parse_hex("68 37 03 00 92 81 39 68 11 04 33 33 34 33 38 16").unwrap();
        let Decoded::Frame { frame, .. } = decode(&req) else {
            panic!()
        };
        let out = b.handle(&frame.to_frame(), 1_700_000_000_000);
        assert_eq!(
            out[0].bytes,
            parse_hex("68 37 03 00 92 81 39 68 91 08 33 33 34 33 37 33 33 33 8C 16").unwrap()
        );
    }

    #[test]
    fn a_meter_is_silent_to_the_other_edition_s_read() {
        let a: Address = "398192000337".parse().unwrap();
        let mut old = SimMeterConfig::new(a, dec!(0.04));
        old.edition = Edition::V1997;
        let mut b = bus(vec![old]);
        let t = 1_700_000_000_000;
        let read_2007 = crate::protocol::dlt645::message::read_request(a, Di::v2007(0x0001_0000));
        assert!(
            b.handle(&read_2007, t).is_empty(),
            "a 1997 meter ignores 0x11"
        );
        let read_1997 = crate::protocol::dlt645::message::read_request(a, Di::v1997(0x9010));
        assert_eq!(b.handle(&read_1997, t).len(), 1);
    }

    /// One 3 kW meter on a bus whose energy runs 3600 times as fast.
    fn fast_meter() -> SimFile {
        let a: Address = "000000000001".parse().unwrap();
        let mut m = SimMeterConfig::new(a, dec!(1000));
        m.load_w = 3000;
        let mut s = SimFile {
            meters: vec![m],
            ..Default::default()
        };
        s.bus.time_scale = 3600;
        s
    }

    #[test]
    fn registers_advance_and_tariffs_sum_to_total() {
        let s = fast_meter();
        let mut b = SimBus::new(s, 1_700_000_000_000).unwrap();
        let t0 = 1_700_000_000_000;
        let di = Di::v2007(0x0001_FF00);
        let read = |b: &mut SimBus, t| {
            let (now, off, tou, tm) = (b.sim_now(t), b.offset, b.tou.clone(), b.time_map());
            b.meters[0].advance(now, off, &tou, tm)
        };
        read(&mut b, t0);
        let v0 = b.meters[0].value(di, t0, b.offset).unwrap();
        // 10 real seconds = 10 simulated hours.
        read(&mut b, t0 + 10_000);
        let Value::Numbers(v1) = b.meters[0].value(di, t0 + 10_000, b.offset).unwrap() else {
            panic!()
        };
        let Value::Numbers(v0) = v0 else { panic!() };
        assert!(v1[0] > v0[0] + dec!(10), "{v0:?} -> {v1:?}");
        let sum: Decimal = v1[1..].iter().sum();
        assert!(
            v1[0] - sum >= Decimal::ZERO && v1[0] - sum < dec!(0.05),
            "{v1:?}"
        );
        // More than one tariff register moved over 10 hours.
        let moved = v1[1..].iter().zip(&v0[1..]).filter(|(a, b)| a > b).count();
        assert!(moved >= 2, "{v0:?} -> {v1:?}");
    }

    #[test]
    fn maximum_demand_starts_again_at_the_settlement_day() {
        // Fast time from 31 October 23:59:30 local; the 1 November freeze
        // (the default settlement day, the 1st at 00:00) clears the month's
        // maximum demand, a daily freeze does not.
        let off = FixedOffset::east_opt(8 * 3600).unwrap();
        let start = |d: u32, m: u32| {
            off.with_ymd_and_hms(2026, m, d, 23, 59, 30)
                .unwrap()
                .timestamp_millis()
        };
        let s = fast_meter();
        let demand_after_midnight = |t0: i64| {
            let mut b = SimBus::new(s.clone(), t0).unwrap();
            // 20 real seconds before the clock's midnight: 20 simulated hours,
            // the evening peak among them.
            let (now, tm, tou) = (b.sim_now(t0 + 20_000), b.time_map(), b.tou.clone());
            b.meters[0].advance(now, off, &tou, tm);
            let before = b.meters[0].max_demand;
            // 1 real second after it: one simulated hour past midnight (night load).
            let (now, tm, tou) = (b.sim_now(t0 + 31_000), b.time_map(), b.tou.clone());
            b.meters[0].advance(now, off, &tou, tm);
            (before, b.meters[0].max_demand)
        };
        let midnight = |d: u32, m: u32| {
            off.with_ymd_and_hms(2026, m, d, 0, 0, 0)
                .unwrap()
                .timestamp_millis()
        };
        let (before, after) = demand_after_midnight(start(31, 10));
        assert!(before.0 > 0);
        assert!(after.0 < before.0, "{before:?} -> {after:?}");
        assert!(after.1 >= midnight(1, 11), "{after:?}");
        let (before, after) = demand_after_midnight(start(30, 10));
        assert_eq!(after, before, "a daily freeze keeps the month's maximum");
    }

    #[test]
    fn freeze_and_demand_times_follow_the_meter_clock_when_time_runs_fast() {
        // One real minute = 60 simulated hours: simulated midnights pass
        // every 24 real seconds, but the meter's clock (and so its daily
        // freeze) runs in real time. Start at 23:59:00 local.
        let off = FixedOffset::east_opt(8 * 3600).unwrap();
        let t0 = off
            .with_ymd_and_hms(2026, 10, 1, 23, 59, 0)
            .unwrap()
            .timestamp_millis();
        let mut s = fast_meter();
        let fresh = |s: &SimFile| SimBus::new(s.clone(), t0).unwrap();
        let at = |b: &mut SimBus, t: i64| {
            let (now, tm, tou) = (b.sim_now(t), b.time_map(), b.tou.clone());
            b.meters[0].advance(now, off, &tou, tm);
            let clock = b.meters[0].clock(t, off);
            let Some(Value::DateTime(frozen)) = b.meters[0].value(Di::v2007(0x0506_0001), t, off)
            else {
                panic!("no freeze time")
            };
            let Some(Value::NumberAt { at: demand, .. }) =
                b.meters[0].value(Di::v2007(0x0101_0000), t, off)
            else {
                panic!("no max demand")
            };
            (
                clock,
                frozen.to_naive().unwrap(),
                demand.to_naive().unwrap(),
            )
        };
        let day1 = chrono::NaiveDate::from_ymd_opt(2026, 10, 1).unwrap();
        let day2 = day1.succ_opt().unwrap();
        let mut b = fresh(&s);
        // 30 real seconds later: 30 simulated hours passed, the clock says 23:59:30.
        let (clock, frozen, demand) = at(&mut b, t0 + 30_000);
        assert_eq!(clock, day1.and_hms_opt(23, 59, 30).unwrap());
        assert_eq!(
            frozen,
            day1.and_hms_opt(0, 0, 0).unwrap(),
            "no freeze before the clock's midnight"
        );
        assert!(demand <= clock, "max demand at {demand}, clock {clock}");
        // 90 real seconds later the clock passed midnight once: one freeze, at 00:00 of day 2.
        let (clock, frozen, demand) = at(&mut b, t0 + 90_000);
        assert_eq!(clock, day2.and_hms_opt(0, 0, 30).unwrap());
        assert_eq!(frozen, day2.and_hms_opt(0, 0, 0).unwrap());
        assert!(demand <= clock, "max demand at {demand}, clock {clock}");
        // The frozen registers are the ones of that instant: what a meter read
        // exactly at the clock's midnight shows.
        let mut c = fresh(&s);
        at(&mut c, t0 + 60_000);
        let block = |b: &SimBus, di: u32| b.meters[0].value(Di::v2007(di), t0, off).unwrap();
        assert_eq!(block(&b, 0x0506_0101), block(&c, 0x0001_FF00));
        assert_ne!(block(&b, 0x0001_FF00), block(&c, 0x0001_FF00));

        // A meter whose clock is 5 minutes slow freezes when its own clock
        // passes midnight (00:05 real) and says 00:00.
        s.meters[0].clock_offset_s = -300;
        let mut d = fresh(&s);
        let (clock, frozen, _) = at(&mut d, t0 + 4 * 60_000);
        assert_eq!(clock, day1.and_hms_opt(23, 58, 0).unwrap());
        assert_eq!(frozen, day1.and_hms_opt(0, 0, 0).unwrap());
        let (clock, frozen, demand) = at(&mut d, t0 + 6 * 60_000 + 1_000);
        assert_eq!(clock, day2.and_hms_opt(0, 0, 1).unwrap());
        assert_eq!(frozen, day2.and_hms_opt(0, 0, 0).unwrap());
        assert!(demand <= clock, "max demand at {demand}, clock {clock}");
    }

    #[test]
    fn a_time_sync_past_midnight_makes_up_the_missed_freeze() {
        // Real time 31 October 23:00 local, time running fast; the collector
        // sets the clock to 1 November 00:30, past midnight and the 1st.
        let off = FixedOffset::east_opt(8 * 3600).unwrap();
        let t0 = off
            .with_ymd_and_hms(2026, 10, 31, 23, 0, 0)
            .unwrap()
            .timestamp_millis();
        let mut b = SimBus::new(fast_meter(), t0).unwrap();
        let now = t0 + 10_000;
        let (sim_now, tm, tou) = (b.sim_now(now), b.time_map(), b.tou.clone());
        b.meters[0].advance(sim_now, off, &tou, tm);
        let demand_before = b.meters[0].max_demand;
        assert!(demand_before.0 > 0);
        let registers = b.meters[0].value(Di::v2007(0x0001_FF00), now, off);
        let frozen_time = |b: &SimBus| match b.meters[0].value(Di::v2007(0x0506_0001), now, off) {
            Some(Value::DateTime(t)) => t.to_naive().unwrap(),
            other => panic!("{other:?}"),
        };
        let sync = |b: &mut SimBus, t: chrono::NaiveDateTime| {
            let req = crate::protocol::dlt645::message::time_sync_request(MeterTime::from_naive(t));
            assert!(
                b.handle(&req, now).is_empty(),
                "a broadcast is not answered"
            );
        };
        let nov1 = chrono::NaiveDate::from_ymd_opt(2026, 11, 1).unwrap();
        sync(&mut b, nov1.and_hms_opt(0, 30, 0).unwrap());
        assert_eq!(frozen_time(&b), nov1.and_hms_opt(0, 0, 0).unwrap());
        assert_eq!(
            b.meters[0].value(Di::v2007(0x0506_0101), now, off),
            registers,
            "the freeze holds the registers of the jump"
        );
        assert_eq!(b.meters[0].max_demand, (0, now), "the month starts again");
        // Back to 31 October: nothing is frozen again, nor cleared.
        sync(
            &mut b,
            nov1.pred_opt().unwrap().and_hms_opt(23, 50, 0).unwrap(),
        );
        assert_eq!(frozen_time(&b), nov1.and_hms_opt(0, 0, 0).unwrap());
        // A jump within the day freezes nothing either.
        let mut c = SimBus::new(fast_meter(), t0).unwrap();
        let frozen = frozen_time(&c);
        sync(
            &mut c,
            nov1.pred_opt().unwrap().and_hms_opt(23, 40, 0).unwrap(),
        );
        assert_eq!(frozen_time(&c), frozen);
    }

    #[test]
    fn meters_file_errors_name_line() {
        let e = SimFile::parse(Path::new("m.toml"), "[[meter]]\naddress = \"12x\"\n").unwrap_err();
        assert!(e.to_string().starts_with("m.toml:2:"), "{e}");
    }
}
