//! The shared `collectors.toml`: collector id, lake options, DL/T 645 buses
//! (`[[dlt645.bus]]`), Modbus connections (`[[modbus]]`) and the optional
//! MQTT uplink (`[uplink]`).
//! Documented in `docs/collectors.md`; complete example in `sample-data/collectors.toml`.
//!
//! Errors name the file, the line and the field.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use chrono::{FixedOffset, NaiveTime};
use serde::Deserialize;

use crate::ingest::config::MqttConfig;
use crate::protocol::dlt645::{Address, Di, Edition};
use crate::protocol::modbus::config::{ConfigError, FieldError, FieldPath};
use crate::uplink::{sparkplug::valid_id, UplinkConfig, UplinkFormat};

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
    /// Publish readings to a broker (store-and-forward).
    #[serde(default)]
    pub uplink: Option<UplinkSection>,
    /// Directory the file was read from; relative paths in it resolve against this.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// `[uplink]`: publish readings to a central broker, instead of or as well
/// as the local lake. Readings count as collected once durable in the spool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkSection {
    /// Broker connection, exactly as `[mqtt]` of ingest.toml (secrets from
    /// `password_file` / `password_env` only).
    pub mqtt: MqttConfig,
    /// `canonical` (JSON) or `sparkplug` (Sparkplug B).
    #[serde(default)]
    pub format: UplinkFormatName,
    /// Canonical: topic to publish to; default `meterflow/<collector_id>/readings`.
    #[serde(default)]
    pub topic: Option<String>,
    /// Sparkplug: group id.
    #[serde(default)]
    pub group_id: Option<String>,
    /// Sparkplug: edge node id; default the collector id.
    #[serde(default)]
    pub edge_node_id: Option<String>,
    /// Spool directory (relative to this file's directory).
    pub spool_dir: PathBuf,
    /// Refuse new readings once this many bytes wait for acknowledgement.
    #[serde(default = "d_cap_bytes")]
    pub cap_bytes: u64,
    /// Alarm (error log, metric) when the spool reaches this share of the cap.
    #[serde(default = "d_alarm_ratio")]
    pub alarm_ratio: f64,
    /// Also write readings to the local lake (`false`: uplink only; the lake
    /// directory still keeps quarantined bad input).
    #[serde(default = "d_true")]
    pub lake: bool,
    /// Readings per spool entry (and per canonical message).
    #[serde(default = "d_per_message")]
    pub per_message: usize,
    /// Messages in flight (published, PUBACK not yet received).
    #[serde(default = "d_window")]
    pub window: usize,
    /// At exit, wait this long for the spool to drain (the rest is sent on the next start).
    #[serde(default = "d_drain_on_exit")]
    pub drain_on_exit_s: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UplinkFormatName {
    #[default]
    Canonical,
    Sparkplug,
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

fn d_cap_bytes() -> u64 {
    512 << 20
}
fn d_alarm_ratio() -> f64 {
    0.8
}
fn d_true() -> bool {
    true
}
/// Readings per uplink message at most: about 200 bytes each as canonical
/// JSON, well inside the uplink spool's 64 MiB record.
pub const MAX_PER_MESSAGE: usize = 50_000;

fn d_per_message() -> usize {
    500
}
fn d_window() -> usize {
    64
}
fn d_drain_on_exit() -> u64 {
    10
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

impl UplinkSection {
    /// Checks the section, including that the password and TLS files can be read.
    pub fn validate(&self, p: &FieldPath, base_dir: &Path) -> Result<(), FieldError> {
        let fe = |path: FieldPath, message: String| Err(FieldError { path, message });
        let m = p.key("mqtt");
        let tls = match crate::ingest::mqtt::parse_url(&self.mqtt.url) {
            Ok((tls, _, _)) => tls,
            Err(e) => return fe(m.key("url"), e),
        };
        if self.mqtt.client_id.is_empty() {
            return fe(m.key("client_id"), "client_id must not be empty".into());
        }
        if self.mqtt.password_file.is_some() && self.mqtt.password_env.is_some() {
            return fe(
                m.key("password_env"),
                "give password_file or password_env, not both".into(),
            );
        }
        if let Err(e) = self.mqtt.password(base_dir) {
            let k = if self.mqtt.password_file.is_some() {
                "password_file"
            } else {
                "password_env"
            };
            return fe(m.key(k), e);
        }
        match (&self.mqtt.client_cert_file, &self.mqtt.client_key_file) {
            (Some(_), None) => {
                return fe(
                    m.key("client_key_file"),
                    "client_cert_file needs client_key_file".into(),
                )
            }
            (None, Some(_)) => {
                return fe(
                    m.key("client_cert_file"),
                    "client_key_file needs client_cert_file".into(),
                )
            }
            _ => {}
        }
        if tls {
            if self.mqtt.ca_file.is_none() {
                return fe(m.key("ca_file"), "an mqtts:// url needs ca_file".into());
            }
            if let Err(e) = crate::ingest::mqtt::tls_config(&self.mqtt, base_dir) {
                let e = e.to_string();
                let k = if e.contains("client") {
                    "client_cert_file"
                } else {
                    "ca_file"
                };
                return fe(m.key(k), e);
            }
        } else if self.mqtt.ca_file.is_some() || self.mqtt.client_cert_file.is_some() {
            return fe(
                m.key("url"),
                "TLS files are given but the url is not mqtts://".into(),
            );
        }
        match self.format {
            UplinkFormatName::Canonical => {
                if let Some(t) = &self.topic {
                    if t.is_empty() || t.contains(['+', '#']) {
                        return fe(
                            p.key("topic"),
                            format!("'{t}' is not a topic to publish to (empty or wildcard)"),
                        );
                    }
                }
                if self.group_id.is_some() || self.edge_node_id.is_some() {
                    return fe(
                        p.key("group_id"),
                        "group_id / edge_node_id are for format = \"sparkplug\"".into(),
                    );
                }
            }
            UplinkFormatName::Sparkplug => {
                if self.topic.is_some() {
                    return fe(
                        p.key("topic"),
                        "Sparkplug topics are spBv1.0/<group_id>/...: give group_id, not topic"
                            .into(),
                    );
                }
                match &self.group_id {
                    None => {
                        return fe(
                            p.key("format"),
                            "format = \"sparkplug\" needs group_id".into(),
                        )
                    }
                    Some(g) if !valid_id(g) => {
                        return fe(
                            p.key("group_id"),
                            format!("'{g}' must be non-empty without '/', '+' or '#'"),
                        )
                    }
                    _ => {}
                }
                if let Some(e) = &self.edge_node_id {
                    if !valid_id(e) {
                        return fe(
                            p.key("edge_node_id"),
                            format!("'{e}' must be non-empty without '/', '+' or '#'"),
                        );
                    }
                }
            }
        }
        if self.spool_dir.as_os_str().is_empty() {
            return fe(p.key("spool_dir"), "spool_dir must not be empty".into());
        }
        if self.cap_bytes == 0 {
            return fe(p.key("cap_bytes"), "cap_bytes must be > 0".into());
        }
        if !(self.alarm_ratio > 0.0 && self.alarm_ratio <= 1.0) {
            return fe(
                p.key("alarm_ratio"),
                format!("alarm_ratio {} is not in (0, 1]", self.alarm_ratio),
            );
        }
        if !(1..=MAX_PER_MESSAGE).contains(&self.per_message) {
            return fe(
                p.key("per_message"),
                format!(
                    "per_message must be 1..={MAX_PER_MESSAGE} (a message must fit one spool record)"
                ),
            );
        }
        if !(1..=u16::MAX as usize).contains(&self.window) {
            return fe(p.key("window"), "window must be 1..65535".into());
        }
        Ok(())
    }
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
        let mut cfg = cfg;
        cfg.base_dir = match file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if let Some(u) = &cfg.uplink {
            u.validate(&FieldPath::default().key("uplink"), &cfg.base_dir)
                .map_err(|e| ConfigError::at(&f, text, &e))?;
            if matches!(u.format, UplinkFormatName::Sparkplug) {
                cfg.sparkplug_meter_ids()
                    .map_err(|e| ConfigError::at(&f, text, &e))?;
            }
        }
        Ok(cfg)
    }

    /// Every meter id must be a Sparkplug device id (no '/', '+', '#'): the
    /// uplink refuses a whole batch for one that is not, every cycle.
    fn sparkplug_meter_ids(&self) -> Result<(), FieldError> {
        let bad = |path: FieldPath, id: &str| {
            FieldError {
            path,
            message: format!(
                "meter id '{id}' cannot be a Sparkplug device id (uplink format = \"sparkplug\"): no '/', '+' or '#'"
            ),
        }
        };
        for (bi, b) in self.dlt645.buses.iter().enumerate() {
            for (mi, m) in b.meters.iter().enumerate() {
                if let Some(id) = m.meter_id.as_deref().filter(|id| !valid_id(id)) {
                    let p = FieldPath::default().key("dlt645").key("bus").index(bi);
                    return Err(bad(p.key("meter").index(mi).key("meter_id"), id));
                }
            }
        }
        for (ci, c) in self.modbus.iter().enumerate() {
            for (di, d) in c.devices.iter().enumerate() {
                if !valid_id(&d.meter_id) {
                    let p = FieldPath::default().key("modbus").index(ci);
                    return Err(bad(p.key("devices").index(di).key("meter_id"), &d.meter_id));
                }
            }
        }
        Ok(())
    }

    /// Readings go to the local lake (no uplink, or `[uplink] lake = true`).
    pub fn writes_lake(&self) -> bool {
        self.uplink.as_ref().is_none_or(|u| u.lake)
    }

    /// The uplink's runtime config, paths resolved against the file's directory.
    pub fn uplink_config(&self) -> Option<UplinkConfig> {
        let u = self.uplink.as_ref()?;
        let topic = u
            .topic
            .clone()
            .unwrap_or_else(|| format!("meterflow/{}/readings", self.collector_id));
        let spool_dir = if u.spool_dir.is_absolute() {
            u.spool_dir.clone()
        } else {
            self.base_dir.join(&u.spool_dir)
        };
        let mut c = UplinkConfig::new(u.mqtt.clone(), &topic, &self.collector_id, spool_dir);
        c.base_dir = self.base_dir.clone();
        c.format = match u.format {
            UplinkFormatName::Canonical => UplinkFormat::Canonical,
            UplinkFormatName::Sparkplug => UplinkFormat::Sparkplug {
                group: u.group_id.clone().unwrap_or_default(),
                edge: u
                    .edge_node_id
                    .clone()
                    .unwrap_or_else(|| self.collector_id.clone()),
            },
        };
        c.cap_bytes = u.cap_bytes;
        c.alarm_ratio = u.alarm_ratio;
        c.per_message = u.per_message;
        c.window = u.window;
        Some(c)
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

    const UPLINK: &str = r#"
collector_id = "sub-7"

[uplink]
format = "sparkplug"
group_id = "plant"
spool_dir = "spool"
lake = false
cap_bytes = 1000000
alarm_ratio = 0.5

[uplink.mqtt]
url = "mqtt://127.0.0.1:1883"
client_id = "sub-7-uplink"
"#;

    #[test]
    fn uplink_section_parses_with_paths_resolved_against_the_file() {
        let cfg = CollectorConfig::parse(Path::new("/etc/mf/collectors.toml"), UPLINK).unwrap();
        assert!(!cfg.writes_lake());
        let u = cfg.uplink_config().unwrap();
        assert_eq!(u.spool_dir, Path::new("/etc/mf/spool"));
        assert_eq!(u.base_dir, Path::new("/etc/mf"));
        assert_eq!(
            u.format,
            UplinkFormat::Sparkplug {
                group: "plant".into(),
                edge: "sub-7".into()
            }
        );
        assert_eq!(u.cap_bytes, 1_000_000);
        let canon = UPLINK
            .replace("format = \"sparkplug\"\ngroup_id = \"plant\"\n", "")
            .replace("lake = false\n", "");
        let cfg = CollectorConfig::parse(Path::new("c.toml"), &canon).unwrap();
        assert!(cfg.writes_lake());
        let u = cfg.uplink_config().unwrap();
        assert_eq!(u.format, UplinkFormat::Canonical);
        assert_eq!(u.topic, "meterflow/sub-7/readings");
        assert_eq!(u.spool_dir, Path::new("./spool"));
        let none = CollectorConfig::parse(Path::new("c.toml"), GOOD).unwrap();
        assert!(none.writes_lake() && none.uplink_config().is_none());
    }

    #[test]
    fn uplink_errors_name_file_line_and_field() {
        let e = err(&UPLINK.replace("mqtt://127.0.0.1:1883", "http://x"));
        assert_eq!(e.field, "uplink.mqtt.url");
        assert_eq!(e.line, Some(13), "{e}");
        assert!(e.to_string().starts_with("collectors.toml:13"), "{e}");
        let e = err(&UPLINK.replace("group_id = \"plant\"", "group_id = \"pl/ant\""));
        assert_eq!((e.field.as_str(), e.line), ("uplink.group_id", Some(6)));
        let e = err(&UPLINK.replace("group_id = \"plant\"\n", ""));
        assert_eq!(e.field, "uplink.format");
        let e = err(&UPLINK.replace("alarm_ratio = 0.5", "alarm_ratio = 1.5"));
        assert_eq!((e.field.as_str(), e.line), ("uplink.alarm_ratio", Some(10)));
        let e = err(&UPLINK.replace("mqtt://127.0.0.1:1883", "mqtts://127.0.0.1:8883"));
        assert_eq!(e.field, "uplink.mqtt.ca_file");
        let e = err(&format!(
            "{UPLINK}password_env = \"MF_NO_SUCH_VAR_FOR_TEST\"\nusername = \"u\"\n"
        ));
        assert_eq!(e.field, "uplink.mqtt.password_env");
        assert!(e.message.contains("MF_NO_SUCH_VAR_FOR_TEST"), "{e}");
        let e = err(&format!("{UPLINK}password = \"secret\"\n"));
        assert!(
            e.to_string().contains("password"),
            "no password in the file: {e}"
        );
        let e = err(&UPLINK.replace("spool_dir = \"spool\"\n", ""));
        assert!(e.to_string().contains("spool_dir"), "{e}");
    }

    #[test]
    fn a_meter_id_sparkplug_cannot_carry_is_a_config_error_naming_its_line() {
        let dlt = format!(
            "{UPLINK}\n[[dlt645.bus]]\nname = \"bus1\"\ntcp = \"127.0.0.1:9001\"\n\
             [[dlt645.bus.meter]]\naddress = \"398192000337\"\nmeter_id = \"feeder/7\"\n"
        );
        let e = err(&dlt);
        assert_eq!(e.field, "dlt645.bus[0].meter[0].meter_id");
        assert_eq!(e.line, Some(21), "{e}");
        assert!(e.message.contains("feeder/7"), "{e}");
        let modbus = format!(
            "{UPLINK}\n[[modbus]]\nname = \"gw\"\ntransport = \"tcp\"\naddress = \"127.0.0.1:5020\"\n\
             [[modbus.devices]]\nmeter_id = \"MB+1\"\nunit_id = 1\nprofile = \"chint_dtsu666\"\n"
        );
        let e = err(&modbus);
        assert_eq!(e.field, "modbus[0].devices[0].meter_id");
        // The same ids are fine when the uplink speaks canonical JSON.
        let canonical = dlt.replace(
            "format = \"sparkplug\"\ngroup_id = \"plant\"\n",
            "format = \"canonical\"\n",
        );
        CollectorConfig::parse(Path::new("collectors.toml"), &canonical).unwrap();
        let e = err(&UPLINK.replace(
            "alarm_ratio = 0.5",
            "alarm_ratio = 0.5\nper_message = 60000",
        ));
        assert_eq!(e.field, "uplink.per_message");
    }

    #[test]
    fn sample_uplink_config_parses() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("sample-data/collectors-uplink.toml");
        let cfg = CollectorConfig::load(&p).unwrap();
        assert!(!cfg.writes_lake());
        let u = cfg.uplink_config().unwrap();
        assert!(u.spool_dir.ends_with("sample-data/spool/uplink"));
        assert_eq!(
            u.format,
            UplinkFormat::Sparkplug {
                group: "substations".into(),
                edge: "substation-7".into()
            }
        );
    }
}
