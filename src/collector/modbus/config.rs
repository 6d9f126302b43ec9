//! The `[[modbus]]` sections of collectors.toml and their validation.

use std::path::Path;

use serde::Deserialize;

use crate::protocol::modbus::config::{
    apply_overrides, ConfigError, FieldError, FieldPath, RegisterSpec,
};
use crate::protocol::modbus::{plan, profiles, Numbering, PlanOptions, ReadRequest, Register};

/// How the collector reaches the devices of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// Modbus TCP (MBAP header, transaction ids).
    Tcp,
    /// Modbus RTU on a local serial port.
    Rtu,
    /// RTU frames through a serial-to-Ethernet gateway's TCP port.
    RtuOverTcp,
}

impl Transport {
    pub fn is_rtu(self) -> bool {
        !matches!(self, Transport::Tcp)
    }
}

/// Serial line settings for `transport = "rtu"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// Device path, e.g. /dev/ttyUSB0.
    pub device: String,
    #[serde(default = "d_baud")]
    pub baud: u32,
    /// none | even | odd
    #[serde(default = "d_parity")]
    pub parity: String,
    #[serde(default = "d_data_bits")]
    pub data_bits: u8,
    #[serde(default = "d_stop_bits")]
    pub stop_bits: u8,
}

fn d_baud() -> u32 {
    9600
}
fn d_parity() -> String {
    "none".into()
}
fn d_data_bits() -> u8 {
    8
}
fn d_stop_bits() -> u8 {
    1
}
fn d_poll() -> u64 {
    1000
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
fn d_drain() -> u64 {
    100
}
fn d_degrade_after() -> u32 {
    2
}
fn d_degraded_poll() -> u64 {
    600_000
}
fn d_hole() -> u16 {
    50
}
fn d_max_regs() -> u16 {
    125
}

/// One `[[modbus]]` section: a TCP gateway or a serial line and its devices.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusConnectionConfig {
    /// Name in logs, metrics and reading source addresses (`<name>/unit <id>`).
    pub name: String,
    /// tcp | rtu | rtu_over_tcp
    pub transport: Transport,
    /// host:port for tcp and rtu_over_tcp.
    #[serde(default)]
    pub address: Option<String>,
    /// Serial settings for rtu.
    #[serde(default)]
    pub serial: Option<SerialConfig>,
    /// Cycle length.
    #[serde(default = "d_poll")]
    pub poll_interval_ms: u64,
    /// Per-request timeout (tokio-modbus has none of its own).
    #[serde(default = "d_timeout")]
    pub timeout_ms: u64,
    /// Extra attempts after a failed request (exceptions are not retried).
    #[serde(default = "d_retries")]
    pub retries: u32,
    /// First retry delay; doubles on each further retry.
    #[serde(default = "d_backoff")]
    pub retry_backoff_ms: u64,
    /// TCP: requests in flight at once (one connection each). RTU is always 1.
    #[serde(default)]
    pub max_concurrency: Option<usize>,
    #[serde(default)]
    pub pause_between_requests_ms: u64,
    #[serde(default)]
    pub pause_after_connect_ms: u64,
    /// Close connections at the end of every cycle.
    #[serde(default)]
    pub close_after_cycle: bool,
    /// RTU: after a timeout, discard line input until it has been quiet this long.
    #[serde(default = "d_drain")]
    pub drain_ms: u64,
    /// A device failing this many cycles in a row is degraded.
    #[serde(default = "d_degrade_after")]
    pub degrade_after_cycles: u32,
    /// How often a degraded device is still tried.
    #[serde(default = "d_degraded_poll")]
    pub degraded_poll_interval_ms: u64,
    #[serde(default)]
    pub devices: Vec<ModbusDeviceConfig>,
}

/// One device (unit id) on a connection.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusDeviceConfig {
    pub meter_id: String,
    /// 1..=247 (0 is broadcast; 255 is accepted for TCP-only devices).
    pub unit_id: u8,
    /// Built-in profile name (chint_dtsu666, eastron_sdm630, acrel_adl400).
    #[serde(default)]
    pub profile: Option<String>,
    /// Numbering of the addresses in `registers` (zero_based | one_based).
    #[serde(default)]
    pub numbering: Option<String>,
    /// Additional registers, or overrides of the profile's by name.
    #[serde(default)]
    pub registers: Vec<RegisterSpec>,
    /// Largest unused gap read to merge two ranges (0 = never read holes).
    #[serde(default = "d_hole")]
    pub max_hole: u16,
    #[serde(default = "d_max_regs")]
    pub max_registers_per_request: u16,
    /// For devices that reject multi-register reads.
    #[serde(default)]
    pub one_request_per_field: bool,
}

/// A device ready to poll.
#[derive(Debug, Clone)]
pub struct ResolvedDevice {
    pub meter_id: String,
    pub unit_id: u8,
    pub registers: Vec<Register>,
    pub requests: Vec<ReadRequest>,
}

impl ModbusDeviceConfig {
    pub fn plan_options(&self) -> PlanOptions {
        PlanOptions {
            max_registers: self.max_registers_per_request,
            max_hole: self.max_hole,
            one_per_field: self.one_request_per_field,
        }
    }

    /// Profile + overrides, validated, with the request plan.
    pub fn resolve(&self, path: &FieldPath) -> Result<ResolvedDevice, FieldError> {
        let e = |k: &str, m: String| FieldError {
            path: path.key(k),
            message: m,
        };
        if self.meter_id.trim().is_empty() {
            return Err(e("meter_id", "meter_id is empty".into()));
        }
        if self.unit_id == 0 || (self.unit_id > 247 && self.unit_id != 255) {
            return Err(e(
                "unit_id",
                format!("unit id {} is not 1..=247 (or 255)", self.unit_id),
            ));
        }
        if self.max_registers_per_request == 0 || self.max_registers_per_request > 125 {
            return Err(e(
                "max_registers_per_request",
                "must be 1..=125 (Modbus limit)".into(),
            ));
        }
        let base: Vec<Register> = match &self.profile {
            Some(p) => match profiles::get(p) {
                Ok(Some(prof)) => prof.registers.clone(),
                Ok(None) => {
                    return Err(e(
                        "profile",
                        format!(
                            "unknown profile '{p}' (built-in: {})",
                            profiles::names().join(", ")
                        ),
                    ))
                }
                Err(err) => return Err(e("profile", err.to_string())),
            },
            None => Vec::new(),
        };
        let numbering = match &self.numbering {
            Some(n) => Some(Numbering::parse(n).ok_or_else(|| {
                e(
                    "numbering",
                    format!("unknown numbering '{n}' (zero_based, one_based)"),
                )
            })?),
            None => None,
        };
        let registers = apply_overrides(&base, &self.registers, numbering, &path.key("registers"))?;
        if !registers.iter().any(|r| r.channel.is_some()) {
            return Err(e(
                "registers",
                "device reads no channel: give a profile or registers with a channel".into(),
            ));
        }
        let requests = plan(&registers, &self.plan_options());
        Ok(ResolvedDevice {
            meter_id: self.meter_id.clone(),
            unit_id: self.unit_id,
            registers,
            requests,
        })
    }
}

impl ModbusDeviceConfig {
    /// A device read with a built-in profile and default planning.
    pub fn with_profile(meter_id: &str, unit_id: u8, profile: &str) -> ModbusDeviceConfig {
        ModbusDeviceConfig {
            meter_id: meter_id.to_string(),
            unit_id,
            profile: Some(profile.to_string()),
            numbering: None,
            registers: Vec::new(),
            max_hole: d_hole(),
            max_registers_per_request: d_max_regs(),
            one_request_per_field: false,
        }
    }
}

impl ModbusConnectionConfig {
    /// A Modbus TCP connection with default settings (for demos and tools).
    pub fn tcp(
        name: &str,
        address: std::net::SocketAddr,
        devices: Vec<ModbusDeviceConfig>,
    ) -> ModbusConnectionConfig {
        ModbusConnectionConfig {
            name: name.to_string(),
            transport: Transport::Tcp,
            address: Some(address.to_string()),
            serial: None,
            poll_interval_ms: d_poll(),
            timeout_ms: d_timeout(),
            retries: d_retries(),
            retry_backoff_ms: d_backoff(),
            max_concurrency: None,
            pause_between_requests_ms: 0,
            pause_after_connect_ms: 0,
            close_after_cycle: false,
            drain_ms: d_drain(),
            degrade_after_cycles: d_degrade_after(),
            degraded_poll_interval_ms: d_degraded_poll(),
            devices,
        }
    }

    /// Effective number of parallel requests.
    pub fn concurrency(&self) -> usize {
        if self.transport.is_rtu() {
            1
        } else {
            self.max_concurrency.unwrap_or(4).clamp(1, 64)
        }
    }

    /// Validates the section (at `path`, e.g. `modbus[0]`) and resolves its devices.
    pub fn resolve(&self, path: &FieldPath) -> Result<Vec<ResolvedDevice>, FieldError> {
        let e = |k: &str, m: &str| FieldError {
            path: path.key(k),
            message: m.to_string(),
        };
        if self.name.trim().is_empty() {
            return Err(e("name", "connection name is empty"));
        }
        match self.transport {
            Transport::Tcp | Transport::RtuOverTcp => match &self.address {
                None => return Err(e("address", "tcp transports need address = \"host:port\"")),
                Some(a) if a.parse::<std::net::SocketAddr>().is_err() => {
                    return Err(e(
                        "address",
                        "address must be ip:port, e.g. \"127.0.0.1:502\"",
                    ))
                }
                _ => {}
            },
            Transport::Rtu => match &self.serial {
                None => return Err(e("serial", "rtu needs a [modbus.serial] table with device")),
                Some(s) => {
                    let sp = path.key("serial");
                    let se = |k: &str, m: &str| FieldError {
                        path: sp.key(k),
                        message: m.to_string(),
                    };
                    if !["none", "even", "odd"].contains(&s.parity.as_str()) {
                        return Err(se("parity", "parity must be none, even or odd"));
                    }
                    if !(5..=8).contains(&s.data_bits) {
                        return Err(se("data_bits", "data_bits must be 5..=8"));
                    }
                    if !(1..=2).contains(&s.stop_bits) {
                        return Err(se("stop_bits", "stop_bits must be 1 or 2"));
                    }
                }
            },
        }
        if self.timeout_ms == 0 {
            return Err(e("timeout_ms", "timeout must be > 0"));
        }
        if self.poll_interval_ms == 0 {
            return Err(e("poll_interval_ms", "poll interval must be > 0"));
        }
        if self.devices.is_empty() {
            return Err(e("devices", "connection has no devices"));
        }
        let mut out: Vec<ResolvedDevice> = Vec::with_capacity(self.devices.len());
        let dp = path.key("devices");
        for (i, d) in self.devices.iter().enumerate() {
            let p = dp.index(i);
            if let Some(prev) = out.iter().find(|o| o.unit_id == d.unit_id) {
                return Err(FieldError {
                    path: p.key("unit_id"),
                    message: format!(
                        "unit id {} is already used by meter {}",
                        d.unit_id, prev.meter_id
                    ),
                });
            }
            out.push(d.resolve(&p)?);
        }
        Ok(out)
    }
}

#[derive(Deserialize)]
struct FileView {
    #[serde(default)]
    modbus: Vec<ModbusConnectionConfig>,
}

/// Validates already-parsed sections against their file text, so errors
/// carry the line (for the shared collectors.toml loader).
pub fn validate_in_file(
    file: &Path,
    text: &str,
    cfgs: &[ModbusConnectionConfig],
) -> Result<(), ConfigError> {
    let f = file.display().to_string();
    let root = FieldPath::default().key("modbus");
    for (i, c) in cfgs.iter().enumerate() {
        c.resolve(&root.index(i))
            .map_err(|e| ConfigError::at(&f, text, &e))?;
    }
    let mut names: Vec<&str> = cfgs.iter().map(|c| c.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        let i = cfgs.iter().rposition(|c| c.name == w[0]).unwrap_or(0);
        let e = FieldError {
            path: root.index(i).key("name"),
            message: format!("duplicate connection name '{}'", w[0]),
        };
        return Err(ConfigError::at(&f, text, &e));
    }
    Ok(())
}

/// Parses the `[[modbus]]` sections of a collectors.toml text (other keys
/// are ignored) and validates them.
pub fn parse_str(file: &Path, text: &str) -> Result<Vec<ModbusConnectionConfig>, ConfigError> {
    let f = file.display().to_string();
    let view: FileView = toml::from_str(text).map_err(|e| ConfigError::from_toml(&f, text, &e))?;
    validate_in_file(file, text, &view.modbus)?;
    Ok(view.modbus)
}

/// Reads and validates the `[[modbus]]` sections of a collectors.toml file.
pub fn load_file(file: &Path) -> Result<Vec<ModbusConnectionConfig>, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
        file: file.display().to_string(),
        line: None,
        field: String::new(),
        message: format!("cannot read: {e}"),
    })?;
    parse_str(file, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = r#"
[[dlt645]]
name = "other collector's section is ignored here"

[[modbus]]
name = "gw1"
transport = "tcp"
address = "127.0.0.1:5020"

[[modbus.devices]]
meter_id = "M1"
unit_id = 1
profile = "eastron_sdm630"

[[modbus.devices]]
meter_id = "M2"
unit_id = 2
profile = "chint_dtsu666"
numbering = "one_based"

[[modbus.devices.registers]]
name = "serial"
area = "holding"
address = 1
type = "string"
words = 4
"#;

    fn parse(text: &str) -> Result<Vec<ModbusConnectionConfig>, ConfigError> {
        parse_str(Path::new("collectors.toml"), text)
    }

    fn line_of(text: &str, needle: &str) -> Option<usize> {
        Some(crate::protocol::modbus::config::line_of(
            text,
            text.find(needle)?,
        ))
    }

    #[test]
    fn a_complete_section_parses_and_plans() {
        let cfgs = parse(CFG).unwrap();
        let devs = cfgs[0].resolve(&FieldPath::default()).unwrap();
        assert_eq!(devs.len(), 2);
        assert_eq!(devs[0].requests.len(), 1);
        assert_eq!(devs[1].registers.last().unwrap().address, 0);
        assert_eq!(cfgs[0].concurrency(), 4);
    }

    #[test]
    fn unknown_profile_is_rejected_with_line_and_field() {
        let text = CFG.replace("\"chint_dtsu666\"", "\"chint_dtsu999\"");
        let e = parse(&text).unwrap_err();
        assert_eq!(e.field, "modbus[0].devices[1].profile");
        assert_eq!(e.line, line_of(&text, "\"chint_dtsu999\""));
        assert!(e.message.contains("eastron_sdm630"), "{e}");
    }

    #[test]
    fn overlapping_override_is_rejected_with_line() {
        // profile register ua sits at 0x2006..0x2008 (0-based); 8199 one-based = 0x2006
        let text = CFG.replace("address = 1\n", "address = 8200\n");
        let e = parse(&text).unwrap_err();
        assert_eq!(e.field, "modbus[0].devices[1].registers[0].address");
        assert_eq!(e.line, line_of(&text, "address = 8200"));
        assert!(e.message.contains("overlaps"), "{e}");
    }

    #[test]
    fn bad_transport_is_a_parse_error_with_line() {
        let text = CFG.replace("transport = \"tcp\"", "transport = \"udp\"");
        let e = parse(&text).unwrap_err();
        assert_eq!(e.line, line_of(&text, "\"udp\""));
        assert!(e.message.contains("udp"), "{e}");
    }

    #[test]
    fn duplicate_unit_ids_are_rejected() {
        let text = CFG.replace("unit_id = 2", "unit_id = 1");
        let e = parse(&text).unwrap_err();
        assert_eq!(e.field, "modbus[0].devices[1].unit_id");
    }

    #[test]
    fn rtu_without_serial_settings_is_rejected() {
        let text = CFG.replace("transport = \"tcp\"", "transport = \"rtu\"");
        assert_eq!(parse(&text).unwrap_err().field, "modbus[0].serial");
    }
}
