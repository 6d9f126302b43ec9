//! `ingest.toml`: broker connection, limits and one `[[source]]` per topic filter.
//!
//! Errors name the file, the line and the field. Secrets (password, keys) are
//! read from files or environment variables named here, never from the
//! command line or the file itself.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use rust_decimal::Decimal;
use serde::Deserialize;

use crate::model::Channel;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        field: String,
        message: String,
    },
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    pub mqtt: MqttConfig,
    #[serde(default)]
    pub ingest: IngestSettings,
    #[serde(rename = "source", default)]
    pub sources: Vec<SourceConfig>,
    /// Directory the file was read from; relative paths in it resolve against this.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// Broker connection. `url` is `mqtt://host:port` or `mqtts://host:port`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    pub url: String,
    /// Fixed client id: the broker keeps our session (and queued messages) under it.
    pub client_id: String,
    #[serde(default = "default_keepalive")]
    pub keepalive_secs: u64,
    pub username: Option<String>,
    /// File holding the password (first line). Or use `password_env`.
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the password.
    pub password_env: Option<String>,
    /// PEM CA bundle that signs the broker's certificate (TLS).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key for mutual TLS.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
}

impl MqttConfig {
    /// A broker config with defaults (no credentials, no TLS).
    pub fn new(url: &str, client_id: &str) -> MqttConfig {
        MqttConfig {
            url: url.to_string(),
            client_id: client_id.to_string(),
            keepalive_secs: default_keepalive(),
            username: None,
            password_file: None,
            password_env: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
        }
    }

    /// The password, from its file (first line; relative to `base_dir`) or environment variable.
    pub fn password(&self, base_dir: &Path) -> Result<Option<String>, String> {
        if let Some(f) = &self.password_file {
            let f = if f.is_absolute() {
                f.clone()
            } else {
                base_dir.join(f)
            };
            let s = std::fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?;
            return Ok(Some(s.lines().next().unwrap_or("").to_string()));
        }
        if let Some(v) = &self.password_env {
            return std::env::var(v)
                .map(Some)
                .map_err(|_| format!("environment variable {v} (mqtt.password_env) is not set"));
        }
        Ok(None)
    }
}

fn default_keepalive() -> u64 {
    30
}

/// Limits and batching.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestSettings {
    /// `Source.collector` of every reading written.
    pub collector: String,
    /// Larger payloads are dead-lettered (first `max_payload_bytes` kept).
    pub max_payload_bytes: usize,
    /// Readings stamped further than this ahead of our clock are refused.
    pub max_future_secs: i64,
    /// Commit spooled readings to Parquet at least this often.
    pub flush_secs: u64,
    /// ... or when this many readings are pending.
    pub flush_readings: usize,
    /// Optional `meters.csv` (first column meter_id): readings for other meters are refused.
    pub known_meters_csv: Option<PathBuf>,
    /// Sparkplug data that waits for a birth (after an ingest restart) is
    /// dead-lettered when no birth comes within this time.
    pub sparkplug_park_secs: u64,
    /// At most this many Sparkplug messages wait for births; more are dead-lettered.
    pub sparkplug_park_max: usize,
}

impl Default for IngestSettings {
    fn default() -> Self {
        IngestSettings {
            collector: "mqtt-ingest".into(),
            max_payload_bytes: 1 << 20,
            max_future_secs: 86_400,
            flush_secs: 5,
            flush_readings: 200_000,
            known_meters_csv: None,
            sparkplug_park_secs: 300,
            sparkplug_park_max: 100_000,
        }
    }
}

/// Payload format of a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Canonical,
    Values,
    Tasmota,
    Shelly,
    Sparkplug,
    JsonMap,
}

/// What to do with numeric fields that have no channel mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unmapped {
    Ignore,
    DeadLetter,
}

/// How timestamps are written in a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TsFormat {
    /// Numbers below 10^11 are seconds, others milliseconds; strings are RFC 3339.
    #[default]
    Auto,
    Ms,
    S,
    Rfc3339,
}

/// One subscription and how to read what arrives on it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub name: String,
    /// MQTT topic filter (`+` and `#` allowed).
    pub filter: String,
    pub format: Format,
    /// Fields without a channel mapping: default `ignore` for tasmota/shelly, `dead_letter` otherwise.
    pub unmapped: Option<Unmapped>,
    /// Device key (topic segment, node, src, edge/device) -> meter id.
    #[serde(default)]
    pub meters: HashMap<String, String>,
    /// Refuse devices missing from `meters` instead of using the device key as meter id.
    #[serde(default)]
    pub strict_meters: bool,
    /// Field name -> channel (`"import_active_total"`) or `{ channel, unit, scale }`.
    #[serde(default)]
    pub channels: HashMap<String, ChannelSpec>,
    /// Refuse values that need more than 4 decimals after unit conversion instead of rounding.
    #[serde(default)]
    pub exact: bool,
    #[serde(default)]
    pub ts_format: TsFormat,
    /// Offset of zone-less local timestamps (Tasmota `Time`), minutes east of UTC.
    #[serde(default)]
    pub tz_offset_minutes: i32,
    /// Field paths for `format = "json_map"`.
    pub map: Option<JsonMapConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ChannelSpec {
    Name(String),
    Full {
        channel: String,
        unit: Option<String>,
        /// Multiplier applied before unit conversion, as a decimal string (`"0.01"`).
        scale: Option<String>,
    },
}

/// Field paths for the configurable JSON mapping. Paths are JSON pointers
/// (`/a/b/0`) or `topic:N` (N-th topic level, 0-based) for the meter id.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonMapConfig {
    /// Optional pointer to an array: each element is one record.
    pub each: Option<String>,
    pub meter_id: String,
    pub ts: Option<String>,
    /// Channel field name -> JSON pointer of its value (the names are looked up in `channels`).
    pub values: HashMap<String, String>,
}

/// A resolved channel mapping: value * scale * unit factor -> channel's unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelMap {
    pub channel: Channel,
    pub factor: Decimal,
}

impl IngestConfig {
    pub fn load(path: &Path) -> Result<IngestConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let mut cfg = IngestConfig::parse(&text, path)?;
        cfg.base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Ok(cfg)
    }

    /// Parses and validates; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<IngestConfig, ConfigError> {
        let cfg: IngestConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(0);
            let msg = e.message().to_string();
            ConfigError::Invalid {
                path: path.to_path_buf(),
                line,
                field: field_in(&msg).unwrap_or_else(|| key_at(text, line)),
                message: msg,
            }
        })?;
        let invalid = |needle: &str, field: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: find_line(text, needle),
            field: field.to_string(),
            message,
        };
        if cfg.mqtt.password_file.is_some() && cfg.mqtt.password_env.is_some() {
            return Err(invalid(
                "password_",
                "mqtt.password_file",
                "give password_file or password_env, not both".into(),
            ));
        }
        if cfg.mqtt.client_cert_file.is_some() != cfg.mqtt.client_key_file.is_some() {
            return Err(invalid(
                "client_",
                "mqtt.client_cert_file",
                "client_cert_file and client_key_file go together".into(),
            ));
        }
        crate::ingest::mqtt::parse_url(&cfg.mqtt.url).map_err(|m| invalid("url", "mqtt.url", m))?;
        if cfg.sources.is_empty() {
            return Err(invalid(
                "[mqtt]",
                "source",
                "at least one [[source]] is needed".into(),
            ));
        }
        let mut names = HashSet::new();
        for s in &cfg.sources {
            if !names.insert(s.name.clone()) {
                return Err(invalid(
                    &s.name,
                    "source.name",
                    format!("duplicate source name '{}'", s.name),
                ));
            }
            if s.filter.is_empty() || s.filter.starts_with("$share/") {
                return Err(invalid(
                    &s.filter,
                    "source.filter",
                    "a plain topic filter is needed (use --shared-group for $share)".into(),
                ));
            }
            for (field, spec) in &s.channels {
                resolve_channel(spec)
                    .map_err(|m| invalid(field, &format!("source.channels.{field}"), m))?;
            }
            if s.format == Format::JsonMap && s.map.is_none() {
                return Err(invalid(
                    &s.name,
                    "source.map",
                    "format json_map needs a [source.map] table".into(),
                ));
            }
            if let Some(m) = &s.map {
                for (field, p) in &m.values {
                    if !s.channels.contains_key(field) && field.parse::<Channel>().is_err() {
                        return Err(invalid(
                            p,
                            &format!("source.map.values.{field}"),
                            format!(
                                "'{field}' is neither a channel nor listed in [source.channels]"
                            ),
                        ));
                    }
                }
            }
        }
        Ok(cfg)
    }

    /// Resolves a path from the file against the file's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// The password, from its file or environment variable.
    pub fn password(&self) -> Result<Option<String>, String> {
        self.mqtt.password(&self.base_dir)
    }

    /// Meter ids from `known_meters_csv`, if configured.
    pub fn known_meters(&self) -> Result<Option<HashSet<String>>, String> {
        let Some(p) = &self.ingest.known_meters_csv else {
            return Ok(None);
        };
        let p = self.resolve(p);
        let mut rd = csv::Reader::from_path(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        let mut set = HashSet::new();
        for rec in rd.records() {
            let rec = rec.map_err(|e| format!("{}: {e}", p.display()))?;
            if let Some(id) = rec.get(0) {
                set.insert(id.trim().to_string());
            }
        }
        Ok(Some(set))
    }
}

impl SourceConfig {
    pub fn unmapped(&self) -> Unmapped {
        self.unmapped.unwrap_or(match self.format {
            Format::Tasmota | Format::Shelly => Unmapped::Ignore,
            _ => Unmapped::DeadLetter,
        })
    }
}

/// Resolves a channel spec to the channel and the factor into its unit.
pub fn resolve_channel(spec: &ChannelSpec) -> Result<ChannelMap, String> {
    let (name, unit, scale) = match spec {
        ChannelSpec::Name(n) => (n.as_str(), None, None),
        ChannelSpec::Full {
            channel,
            unit,
            scale,
        } => (channel.as_str(), unit.as_deref(), scale.as_deref()),
    };
    let channel: Channel = name
        .parse()
        .map_err(|e: crate::model::UnknownChannel| e.to_string())?;
    let scale = match scale {
        None => Decimal::ONE,
        Some(s) => s
            .parse::<Decimal>()
            .map_err(|_| format!("scale '{s}' is not a decimal number"))?,
    };
    let unit_factor = match unit {
        None => Decimal::ONE,
        Some(u) => unit_factor(u, channel.unit())?,
    };
    Ok(ChannelMap {
        channel,
        factor: scale * unit_factor,
    })
}

/// Factor converting `from` to `to` when they differ only by an SI prefix (m, k, M).
pub fn unit_factor(from: &str, to: &str) -> Result<Decimal, String> {
    if from == to {
        return Ok(Decimal::ONE);
    }
    fn split(u: &str) -> (i32, &str) {
        const BASES: [&str; 9] = ["Wh", "varh", "VAh", "W", "var", "VA", "V", "A", "Hz"];
        for (p, e) in [("k", 3), ("M", 6), ("m", -3)] {
            if let Some(rest) = u.strip_prefix(p) {
                if BASES.contains(&rest) {
                    return (e, rest);
                }
            }
        }
        (0, u)
    }
    let (fe, fb) = split(from);
    let (te, tb) = split(to);
    if fb != tb {
        return Err(format!(
            "unit '{from}' cannot be converted to the channel's unit '{to}'"
        ));
    }
    let e = fe - te;
    let ten = Decimal::TEN;
    let mut f = Decimal::ONE;
    for _ in 0..e.abs() {
        f *= ten;
    }
    Ok(if e >= 0 { f } else { Decimal::ONE / f })
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// First line containing `needle` (1-based), 0 if none.
fn find_line(text: &str, needle: &str) -> usize {
    text.find(needle).map(|o| line_of(text, o)).unwrap_or(0)
}

/// Field named in a serde message (`unknown field `x``, `missing field `y``).
fn field_in(msg: &str) -> Option<String> {
    let start = msg.find('`')? + 1;
    let end = start + msg[start..].find('`')?;
    Some(msg[start..end].to_string())
}

/// The key written at the start of a line, for messages that do not name one.
fn key_at(text: &str, line: usize) -> String {
    text.lines()
        .nth(line.saturating_sub(1))
        .and_then(|l| l.split('=').next())
        .map(|k| k.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    const GOOD: &str = r#"
[mqtt]
url = "mqtt://127.0.0.1:1883"
client_id = "ingest-1"

[[source]]
name = "plugs"
filter = "tele/+/SENSOR"
format = "tasmota"
channels = { "ENERGY.Power" = { channel = "active_power_total", unit = "W" } }
"#;

    #[test]
    fn a_good_file_parses_with_defaults() {
        let c = IngestConfig::parse(GOOD, Path::new("ingest.toml")).unwrap();
        assert_eq!(c.sources[0].format, Format::Tasmota);
        assert_eq!(c.sources[0].unmapped(), Unmapped::Ignore);
        assert_eq!(c.ingest.max_future_secs, 86_400);
        let m = resolve_channel(&c.sources[0].channels["ENERGY.Power"]).unwrap();
        assert_eq!(m.factor, dec!(0.001));
    }

    #[test]
    fn unknown_field_names_file_line_and_field() {
        let text = GOOD.replace(
            "client_id = \"ingest-1\"",
            "client_id = \"ingest-1\"\nclientid = 3",
        );
        let e = IngestConfig::parse(&text, Path::new("ingest.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("ingest.toml:5:"), "{e}");
        assert!(e.contains("clientid"), "{e}");
    }

    #[test]
    fn unknown_channel_names_its_line() {
        let text = GOOD.replace("active_power_total", "active_power_totl");
        let e = IngestConfig::parse(&text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("x.toml:10:"), "{e}");
        assert!(e.contains("source.channels.ENERGY.Power"), "{e}");
    }

    #[test]
    fn the_sample_config_is_valid() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("sample-data/ingest.toml");
        let c = IngestConfig::load(&p).unwrap();
        assert_eq!(c.sources.len(), 6);
        for s in &c.sources {
            crate::ingest::decode::Decoder::new(s, Default::default()).unwrap();
        }
    }

    #[test]
    fn units_convert_by_si_prefix_only() {
        assert_eq!(unit_factor("Wh", "kWh").unwrap(), dec!(0.001));
        assert_eq!(unit_factor("MWh", "kWh").unwrap(), dec!(1000));
        assert_eq!(unit_factor("mA", "A").unwrap(), dec!(0.001));
        assert!(unit_factor("W", "kWh").is_err());
    }
}
