//! The shared `collectors.toml`: collector id, lake options, DL/T 645 buses
//! (`[[dlt645.bus]]`) and Modbus connections (`[[modbus]]`).
//! Documented in `docs/collectors.md`; complete example in `sample-data/collectors.toml`.
//!
//! Errors name the file, the line and the field.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use chrono::{FixedOffset, NaiveTime};
use serde::Deserialize;

use crate::protocol::dlt645::{Address, Di, Edition};
use crate::protocol::modbus::config::{ConfigError, FieldError, FieldPath};

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    /// Names this collector in every reading's source and in the lake's writer id.
    #[serde(default = "d_collector_id")]
    pub collector_id: String,
    #[serde(default)]
    pub lake: LakeSection,
    #[serde(default)]
    pub dlt645: Dlt645Section,
    #[serde(default)]
    pub modbus: Vec<crate::collector::modbus::ModbusConnectionConfig>,
}

/// `[lake]`: where readings go and how often they are committed to Parquet.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LakeSection {
    /// Lake directory; `--out` overrides it.
    #[serde(default)]
    pub out: Option<PathBuf>,
    /// Commit spooled readings to Parquet at least this often.
    #[serde(default = "d_flush_interval")]
    pub flush_interval_s: u64,
    /// ... or as soon as this many readings are waiting.
    #[serde(default = "d_flush_readings")]
    pub flush_max_readings: usize,
}

impl Default for LakeSection {
    fn default() -> Self {
        LakeSection {
            out: None,
            flush_interval_s: d_flush_interval(),
            flush_max_readings: d_flush_readings(),
        }
    }
}

/// `[dlt645]`: settings shared by every bus, groups with their schedules, and the buses.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dlt645Section {
    /// Offset of the meters' clocks from UTC (Chinese meters keep Beijing time).
    #[serde(default = "d_utc_offset")]
    pub utc_offset: String,
    /// A meter clock off by more than this is flagged `clock_skew` on its readings.
    #[serde(default = "d_skew")]
    pub clock_skew_threshold_s: u64,
    /// Broadcast a time sync (0x08) on a bus after a skewed clock is seen on it.
    #[serde(default)]
    pub time_sync: bool,
    #[serde(default, rename = "group")]
    pub groups: Vec<GroupConfig>,
    #[serde(default, rename = "bus")]
    pub buses: Vec<BusConfig>,
}

impl Default for Dlt645Section {
    fn default() -> Self {
        Dlt645Section {
            utc_offset: d_utc_offset(),
            clock_skew_threshold_s: d_skew(),
            time_sync: false,
            groups: vec![],
            buses: vec![],
        }
    }
}

/// `[[dlt645.group]]`: a set of read schedules that meters refer to by name.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    pub name: String,
    #[serde(default, rename = "schedule")]
    pub schedules: Vec<ScheduleConfig>,
}

/// `[[dlt645.group.schedule]]`: what to read and when.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// For logs.
    #[serde(default)]
    pub name: Option<String>,
    /// Read every this many seconds (0 = every cycle, as fast as the bus allows).
    #[serde(default)]
    pub every_s: Option<u64>,
    /// Or: read once a day after this meter-local time, `HH:MM` (daily frozen values).
    #[serde(default)]
    pub daily_at: Option<String>,
    /// Data identifiers to read (`00010000`; `0001FF00` block reads; 1997 meters take 4-digit DIs).
    #[serde(default)]
    pub dis: Vec<Di>,
    /// Also read the meter's clock and compare it with the collector's.
    #[serde(default)]
    pub read_clock: bool,
}

/// Serial line settings of a bus.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSettings {
    /// Device path (`/dev/ttyUSB0`, a pty).
    pub port: String,
    #[serde(default = "d_baud")]
    pub baud: u32,
    #[serde(default = "d_data_bits")]
    pub data_bits: u8,
    /// `even` (default), `odd` or `none`.
    #[serde(default = "d_parity")]
    pub parity: String,
    #[serde(default = "d_stop_bits")]
    pub stop_bits: u8,
}

impl SerialSettings {
    pub fn with_port(port: impl Into<String>) -> Self {
        SerialSettings {
            port: port.into(),
            baud: d_baud(),
            data_bits: d_data_bits(),
            parity: d_parity(),
            stop_bits: d_stop_bits(),
        }
    }

    /// Bits on the wire per byte (start + data + parity + stop).
    pub fn bits_per_char(&self) -> u32 {
        1 + self.data_bits as u32
            + if self.parity == "none" { 0 } else { 1 }
            + self.stop_bits as u32
    }
}

/// `[[dlt645.bus]]`: one RS-485 bus, reached by a serial port or a transparent TCP gateway.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusConfig {
    /// Bus name, used in logs, metrics and reading sources (`<bus>/<address>`).
    pub name: String,
    /// `host:port` of a transparent serial-to-TCP gateway (one connection = one bus).
    #[serde(default)]
    pub tcp: Option<String>,
    /// Or a local serial port.
    #[serde(default)]
    pub serial: Option<SerialSettings>,
    /// How long to wait for a reply.
    #[serde(default = "d_timeout")]
    pub timeout_ms: u64,
    /// Extra attempts after a timeout or a corrupt reply (error replies are not retried).
    #[serde(default = "d_retries")]
    pub retries: u32,
    /// Pause before the first retry; doubles for each further one.
    #[serde(default = "d_backoff")]
    pub retry_backoff_ms: u64,
    /// Silence on the line between a reply and the next request.
    #[serde(default = "d_gap")]
    pub silent_gap_ms: u64,
    /// After a timeout, discard input until the line has been quiet this long.
    #[serde(default = "d_drain")]
    pub drain_ms: u64,
    /// FE bytes sent before each request to wake the meters.
    #[serde(default = "d_preamble")]
    pub preamble: usize,
    /// A meter failing this many cycles in a row is degraded ...
    #[serde(default = "d_degrade_after")]
    pub degrade_after_cycles: u32,
    /// ... and then tried only this often until it answers again.
    #[serde(default = "d_degraded_interval")]
    pub degraded_poll_interval_s: u64,
    /// First reconnect delay after a lost connection; doubles up to the max, forever.
    #[serde(default = "d_reconnect")]
    pub reconnect_backoff_ms: u64,
    #[serde(default = "d_reconnect_max")]
    pub reconnect_backoff_max_ms: u64,
    #[serde(default, rename = "meter")]
    pub meters: Vec<MeterConfig>,
}

/// `[[dlt645.bus.meter]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeterConfig {
    /// Nameplate address, 12 digits (`398192000337`).
    pub address: Address,
    /// meterflow meter id; defaults to the address.
    #[serde(default)]
    pub meter_id: Option<String>,
    /// `2007` (default) or `1997`.
    #[serde(default)]
    pub edition: Edition,
    /// Group whose schedules apply; default: the built-in `default` group.
    #[serde(default)]
    pub group: Option<String>,
}

fn d_collector_id() -> String {
    "collector".into()
}
fn d_flush_interval() -> u64 {
    10
}
fn d_flush_readings() -> usize {
    10_000
}
fn d_utc_offset() -> String {
    "+08:00".into()
}
fn d_skew() -> u64 {
    60
}
fn d_baud() -> u32 {
    2400
}
fn d_data_bits() -> u8 {
    8
}
fn d_parity() -> String {
    "even".into()
}
fn d_stop_bits() -> u8 {
    1
}
fn d_timeout() -> u64 {
    1000
}
fn d_retries() -> u32 {
    1
}
fn d_backoff() -> u64 {
    100
}
fn d_gap() -> u64 {
    10
}
fn d_drain() -> u64 {
    50
}
fn d_preamble() -> usize {
    4
}
fn d_degrade_after() -> u32 {
    3
}
fn d_degraded_interval() -> u64 {
    600
}
fn d_reconnect() -> u64 {
    500
}
fn d_reconnect_max() -> u64 {
    30_000
}

/// When a schedule runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    Every(std::time::Duration),
    DailyAt(NaiveTime),
}

/// A validated schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub name: String,
    pub when: When,
    pub dis: Vec<Di>,
    pub read_clock: bool,
}

/// A validated meter with its schedules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedMeter {
    pub address: Address,
    pub meter_id: String,
    pub edition: Edition,
    pub schedules: Vec<Schedule>,
}

/// The built-in `default` group: register block and clock every 15 minutes.
pub fn default_schedules(edition: Edition) -> Vec<Schedule> {
    let di = match edition {
        Edition::V2007 => Di::v2007(0x0001_FF00),
        Edition::V1997 => Di::v1997(0x901F),
    };
    vec![Schedule {
        name: "registers".into(),
        when: When::Every(std::time::Duration::from_secs(900)),
        dis: vec![di],
        read_clock: true,
    }]
}

impl Dlt645Section {
    /// Meter clocks' offset from UTC.
    pub fn offset(&self) -> Result<FixedOffset, String> {
        parse_offset(&self.utc_offset)
    }

    /// Validates the section and resolves each bus's meters (index-aligned with `buses`).
    pub fn resolve(&self, root: &FieldPath) -> Result<Vec<Vec<ResolvedMeter>>, FieldError> {
        let fe = |path: FieldPath, message: String| FieldError { path, message };
        self.offset().map_err(|m| fe(root.key("utc_offset"), m))?;
        let mut groups = std::collections::HashMap::new();
        for (gi, g) in self.groups.iter().enumerate() {
            let gp = root.key("group").index(gi);
            if groups.contains_key(g.name.as_str()) {
                return Err(fe(
                    gp.key("name"),
                    format!("duplicate group name '{}'", g.name),
                ));
            }
            let mut scheds = vec![];
            for (si, s) in g.schedules.iter().enumerate() {
                let sp = gp.key("schedule").index(si);
                scheds.push(resolve_schedule(s, &sp)?);
            }
            if scheds.is_empty() {
                return Err(fe(
                    gp.key("schedule"),
                    format!("group '{}' has no schedule", g.name),
                ));
            }
            groups.insert(g.name.as_str(), scheds);
        }
        let mut bus_names = HashSet::new();
        let mut out = vec![];
        for (bi, b) in self.buses.iter().enumerate() {
            let bp = root.key("bus").index(bi);
            if !bus_names.insert(b.name.as_str()) {
                return Err(fe(
                    bp.key("name"),
                    format!("duplicate bus name '{}'", b.name),
                ));
            }
            if b.name.is_empty() || b.name.contains('/') {
                return Err(fe(
                    bp.key("name"),
                    "bus name must be non-empty and contain no '/'".into(),
                ));
            }
            match (&b.tcp, &b.serial) {
                (Some(_), Some(_)) => {
                    return Err(fe(
                        bp.key("serial"),
                        "a bus has either `tcp` or `serial`, not both".into(),
                    ))
                }
                (None, None) => {
                    return Err(fe(
                        bp.key("name"),
                        format!(
                            "bus '{}' needs `tcp = \"host:port\"` or a `[serial]` table",
                            b.name
                        ),
                    ))
                }
                (Some(addr), None) => {
                    if !addr.contains(':') {
                        return Err(fe(bp.key("tcp"), format!("'{addr}' is not host:port")));
                    }
                }
                (None, Some(s)) => {
                    if !["even", "odd", "none"].contains(&s.parity.as_str()) {
                        return Err(fe(
                            bp.key("serial").key("parity"),
                            format!("parity '{}' is not even, odd or none", s.parity),
                        ));
                    }
                    if !(5..=8).contains(&s.data_bits) {
                        return Err(fe(
                            bp.key("serial").key("data_bits"),
                            "data_bits must be 5..8".into(),
                        ));
                    }
                    if !(1..=2).contains(&s.stop_bits) {
                        return Err(fe(
                            bp.key("serial").key("stop_bits"),
                            "stop_bits must be 1 or 2".into(),
                        ));
                    }
                }
            }
            if b.timeout_ms == 0 {
                return Err(fe(bp.key("timeout_ms"), "timeout must be > 0".into()));
            }
            let mut seen = HashSet::new();
            let mut meters = vec![];
            for (mi, m) in b.meters.iter().enumerate() {
                let mp = bp.key("meter").index(mi);
                if m.address.has_wildcard() || m.address.is_broadcast() {
                    return Err(fe(
                        mp.key("address"),
                        format!("{} is a wildcard/broadcast address, not a meter", m.address),
                    ));
                }
                if !seen.insert(m.address) {
                    return Err(fe(
                        mp.key("address"),
                        format!("address {} appears twice on bus '{}'", m.address, b.name),
                    ));
                }
                let schedules = match &m.group {
                    None => default_schedules(m.edition),
                    Some(g) => groups.get(g.as_str()).cloned().ok_or_else(|| {
                        fe(mp.key("group"), format!("no [[dlt645.group]] named '{g}'"))
                    })?,
                };
                for s in &schedules {
                    for di in &s.dis {
                        if di.edition != m.edition {
                            return Err(fe(
                                mp.key("group"),
                                format!(
                                    "schedule '{}' reads {} DI {di} but meter {} speaks {}",
                                    s.name, di.edition, m.address, m.edition
                                ),
                            ));
                        }
                    }
                }
                meters.push(ResolvedMeter {
                    address: m.address,
                    meter_id: m.meter_id.clone().unwrap_or_else(|| m.address.to_string()),
                    edition: m.edition,
                    schedules,
                });
            }
            out.push(meters);
        }
        Ok(out)
    }
}

fn resolve_schedule(s: &ScheduleConfig, p: &FieldPath) -> Result<Schedule, FieldError> {
    let fe = |path: FieldPath, message: String| FieldError { path, message };
    let when = match (s.every_s, &s.daily_at) {
        (Some(n), None) => When::Every(std::time::Duration::from_secs(n)),
        (None, Some(t)) => When::DailyAt(
            NaiveTime::parse_from_str(t, "%H:%M")
                .map_err(|_| fe(p.key("daily_at"), format!("'{t}' is not HH:MM")))?,
        ),
        _ => {
            return Err(fe(
                p.key("every_s"),
                "a schedule has exactly one of `every_s` or `daily_at`".into(),
            ))
        }
    };
    if s.dis.is_empty() && !s.read_clock {
        return Err(fe(
            p.key("dis"),
            "schedule reads nothing: give `dis` or `read_clock = true`".into(),
        ));
    }
    for (i, di) in s.dis.iter().enumerate() {
        match di.info() {
            Some(info) if !info.channels.is_empty() => {}
            Some(info) => {
                return Err(fe(
                    p.key("dis").index(i),
                    format!(
                    "DI {di} ({}) is not stored as a reading; read it with `meterflow dlt645 read`",
                    info.name
                ),
                ))
            }
            None => {
                return Err(fe(
                    p.key("dis").index(i),
                    format!("DI {di} is not in the catalogue (see docs/collectors.md)"),
                ))
            }
        }
    }
    Ok(Schedule {
        name: s.name.clone().unwrap_or_else(|| {
            s.dis
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("+")
        }),
        when,
        dis: s.dis.clone(),
        read_clock: s.read_clock,
    })
}

/// Parses `+08:00`, `-05:30`, `Z` or `UTC`.
pub fn parse_offset(s: &str) -> Result<FixedOffset, String> {
    if s == "Z" || s.eq_ignore_ascii_case("utc") {
        return Ok(FixedOffset::east_opt(0).expect("zero offset"));
    }
    let bad = || format!("utc_offset '{s}' is not like +08:00");
    let (sign, rest) = match s.as_bytes().first() {
        Some(b'+') => (1, &s[1..]),
        Some(b'-') => (-1, &s[1..]),
        _ => return Err(bad()),
    };
    let (h, m) = rest.split_once(':').ok_or_else(bad)?;
    let h: i32 = h.parse().map_err(|_| bad())?;
    let m: i32 = m.parse().map_err(|_| bad())?;
    FixedOffset::east_opt(sign * (h * 3600 + m * 60)).ok_or_else(bad)
}

impl BusConfig {
    /// A bus with every knob at its default (for the `dlt645` tools and tests).
    pub fn new(name: &str, tcp: Option<String>, serial: Option<SerialSettings>) -> BusConfig {
        let mut b: BusConfig =
            toml::from_str(&format!("name = {:?}", name)).expect("defaults parse");
        b.tcp = tcp;
        b.serial = serial;
        b
    }
}

impl CollectorConfig {
    /// Parses and validates a collectors.toml text; `file` names it in errors.
    pub fn parse(file: &Path, text: &str) -> Result<CollectorConfig, ConfigError> {
        let f = file.display().to_string();
        let cfg: CollectorConfig =
            toml::from_str(text).map_err(|e| ConfigError::from_toml(&f, text, &e))?;
        if cfg.collector_id.is_empty()
            || !cfg
                .collector_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            let e = FieldError {
                path: FieldPath::default().key("collector_id"),
                message: "collector_id must be non-empty letters, digits, '-' or '_'".into(),
            };
            return Err(ConfigError::at(&f, text, &e));
        }
        cfg.dlt645
            .resolve(&FieldPath::default().key("dlt645"))
            .map_err(|e| ConfigError::at(&f, text, &e))?;
        crate::collector::modbus::validate_in_file(file, text, &cfg.modbus)?;
        Ok(cfg)
    }

    /// Reads, parses and validates a collectors.toml file.
    pub fn load(file: &Path) -> Result<CollectorConfig, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
            file: file.display().to_string(),
            line: None,
            field: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(file, &text)
    }

    /// A minimal config for one TCP bus (tests, demo).
    pub fn single_tcp_bus(
        collector_id: &str,
        bus: &str,
        addr: std::net::SocketAddr,
        meters: Vec<MeterConfig>,
    ) -> Self {
        let mut cfg: CollectorConfig = toml::from_str(&format!(
            "collector_id = \"{collector_id}\"\n[[dlt645.bus]]\nname = \"{bus}\"\ntcp = \"{addr}\"\n"
        ))
        .expect("static config parses");
        cfg.dlt645.buses[0].meters = meters;
        cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
collector_id = "sub-7"

[lake]
flush_interval_s = 5

[dlt645]
utc_offset = "+08:00"
clock_skew_threshold_s = 30

[[dlt645.group]]
name = "residential"
[[dlt645.group.schedule]]
every_s = 900
dis = ["0001FF00", "02030000"]
read_clock = true
[[dlt645.group.schedule]]
daily_at = "00:05"
dis = ["05060101"]

[[dlt645.bus]]
name = "bus1"
tcp = "127.0.0.1:9001"
[[dlt645.bus.meter]]
address = "398192000337"
group = "residential"
[[dlt645.bus.meter]]
address = "000000000414"
edition = "1997"

[[dlt645.bus]]
name = "bus2"
[dlt645.bus.serial]
port = "/dev/ttyUSB0"
baud = 2400
"#;

    #[test]
    fn complete_config_parses_and_resolves() {
        let cfg = CollectorConfig::parse(Path::new("c.toml"), GOOD).unwrap();
        let resolved = cfg
            .dlt645
            .resolve(&FieldPath::default().key("dlt645"))
            .unwrap();
        assert_eq!(resolved[0].len(), 2);
        assert_eq!(resolved[0][0].schedules.len(), 2);
        assert_eq!(resolved[0][1].schedules[0].dis, vec![Di::v1997(0x901F)]);
        assert_eq!(cfg.dlt645.buses[1].serial.as_ref().unwrap().parity, "even");
        assert_eq!(
            cfg.dlt645.buses[1].serial.as_ref().unwrap().bits_per_char(),
            11
        );
    }

    fn err(text: &str) -> ConfigError {
        CollectorConfig::parse(Path::new("collectors.toml"), text).unwrap_err()
    }

    #[test]
    fn bad_address_names_file_line_and_field() {
        let e = err(&GOOD.replace("398192000337", "39819200033X"));
        let s = e.to_string();
        assert!(s.starts_with("collectors.toml:"), "{s}");
        assert_eq!(e.line, Some(25), "{s}");
        assert!(s.contains("39819200033X"), "{s}");
    }

    #[test]
    fn unknown_group_names_its_line() {
        let e = err(&GOOD.replace("group = \"residential\"", "group = \"industrial\""));
        assert_eq!(e.field, "dlt645.bus[0].meter[0].group");
        assert_eq!(e.line, Some(26));
        assert!(e.message.contains("industrial"));
    }

    #[test]
    fn unknown_key_and_unknown_di_are_refused() {
        let e = err(&GOOD
            .replace("retries", "x")
            .replace("flush_interval_s = 5", "flush_interval = 5"));
        assert!(e.to_string().contains("flush_interval"), "{e}");
        let e = err(&GOOD.replace("\"02030000\"", "\"12345678\""));
        assert_eq!(e.field, "dlt645.group[0].schedule[0].dis[1]");
        let e = err(&GOOD.replace("\"02030000\"", "\"04000101\""));
        assert!(e.message.contains("not stored"), "{e}");
    }

    #[test]
    fn bus_without_transport_and_edition_mismatch_are_refused() {
        let e = err(&GOOD.replace("tcp = \"127.0.0.1:9001\"", ""));
        assert_eq!(e.field, "dlt645.bus[0].name");
        let e = err(&GOOD.replace(
            "edition = \"1997\"",
            "edition = \"1997\"\ngroup = \"residential\"",
        ));
        assert!(e.message.contains("speaks 1997"), "{e}");
    }
}
