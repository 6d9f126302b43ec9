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

    /// The password, from its file (first line; relative to `base_dir`) or
    /// environment variable. Errors name the file or variable, not the key:
    /// callers add theirs (a config key, a command-line flag).
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
                .map_err(|_| format!("environment variable {v} is not set"));
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
    /// Receive stamps of the last this many stamped messages are kept, so a
    /// redelivered copy gets its first receive time: at least the broker's
    /// inflight window (1..=65535).
    pub redelivery_window: usize,
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
            redelivery_window: crate::store::spool::DEFAULT_STAMP_WINDOW,
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
    ///
    /// Every error names the line of the offending key in its own table:
    /// with several `[[source]]` tables, the line inside the source at fault.
    pub fn parse(text: &str, path: &Path) -> Result<IngestConfig, ConfigError> {
        let cfg: IngestConfig = toml::from_str(text).map_err(|e| {
            let msg = e.message().to_string();
            let (line, field) = match e.span() {
                Some(s) => (line_of(text, s.start), serde_field(text, s.start, &msg)),
                None => (0, field_in(&msg)),
            };
            ConfigError::Invalid {
                path: path.to_path_buf(),
                line,
                // A syntax error: no document to find keys in.
                field: field.unwrap_or_else(|| key_at(text, line)),
                message: msg,
            }
        })?;
        let invalid = |at: &[Seg<'_>], field: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: line_at(text, at),
            field: field.to_string(),
            message,
        };
        use Seg::{Index, Key};
        if cfg.mqtt.password_file.is_some() && cfg.mqtt.password_env.is_some() {
            return Err(invalid(
                &[Key("mqtt"), Key("password_file")],
                "mqtt.password_file",
                "give password_file or password_env, not both".into(),
            ));
        }
        if cfg.mqtt.client_cert_file.is_some() != cfg.mqtt.client_key_file.is_some() {
            let given = if cfg.mqtt.client_cert_file.is_some() {
                "client_cert_file"
            } else {
                "client_key_file"
            };
            return Err(invalid(
                &[Key("mqtt"), Key(given)],
                &format!("mqtt.{given}"),
                "client_cert_file and client_key_file go together".into(),
            ));
        }
        crate::ingest::mqtt::parse_url(&cfg.mqtt.url)
            .map_err(|m| invalid(&[Key("mqtt"), Key("url")], "mqtt.url", m))?;
        let window = cfg.ingest.redelivery_window;
        if window == 0 || window > crate::store::spool::MAX_STAMP_WINDOW {
            return Err(invalid(
                &[Key("ingest"), Key("redelivery_window")],
                "ingest.redelivery_window",
                format!(
                    "{window} is not in 1..={} (at least the broker's inflight window; MQTT packet ids are 16 bits)",
                    crate::store::spool::MAX_STAMP_WINDOW
                ),
            ));
        }
        if cfg.sources.is_empty() {
            // An empty `source = []`, else the [mqtt] table the sources go with.
            let at: &[Seg<'_>] = if line_at(text, &[Key("source")]) > 0 {
                &[Key("source")]
            } else {
                &[Key("mqtt")]
            };
            return Err(invalid(
                at,
                "source",
                "at least one [[source]] is needed".into(),
            ));
        }
        let mut names = HashSet::new();
        for (i, s) in cfg.sources.iter().enumerate() {
            let src = |rest: &[Seg<'static>]| -> Vec<Seg<'static>> {
                [Key("source"), Index(i)]
                    .iter()
                    .chain(rest)
                    .copied()
                    .collect()
            };
            if !names.insert(s.name.clone()) {
                return Err(invalid(
                    &src(&[Key("name")]),
                    "source.name",
                    format!("duplicate source name '{}'", s.name),
                ));
            }
            if s.filter.is_empty() || s.filter.starts_with("$share/") {
                return Err(invalid(
                    &src(&[Key("filter")]),
                    "source.filter",
                    "a plain topic filter is needed (use --shared-group for $share)".into(),
                ));
            }
            // Sorted: with several bad channels, the same one is named every time.
            let mut channels: Vec<_> = s.channels.iter().collect();
            channels.sort_by(|a, b| a.0.cmp(b.0));
            for (field, spec) in channels {
                resolve_channel(spec).map_err(|m| {
                    let mut at: Vec<Seg<'_>> = src(&[Key("channels")]);
                    at.push(Key(field));
                    invalid(&at, &format!("source.channels.{field}"), m)
                })?;
            }
            if s.format == Format::JsonMap && s.map.is_none() {
                return Err(invalid(
                    &src(&[Key("format")]),
                    "source.map",
                    "format json_map needs a [source.map] table".into(),
                ));
            }
            if let Some(m) = &s.map {
                let mut values: Vec<_> = m.values.keys().collect();
                values.sort();
                for field in values {
                    if !s.channels.contains_key(field) && field.parse::<Channel>().is_err() {
                        let mut at: Vec<Seg<'_>> = src(&[Key("map"), Key("values")]);
                        at.push(Key(field));
                        return Err(invalid(
                            &at,
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

/// One step of a path into the TOML document: a key of a table, or an
/// element of an array of tables (`[[source]]` number N, 0-based).
#[derive(Debug, Clone, Copy)]
enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

/// 1-based line of the key at `path`, however it is written (`[table]`,
/// `[[array]]` element, dotted key, inline table). When only the start of
/// the path is in the text (e.g. a table whose needed key is missing), the
/// line of the deepest part found: the key's table or `[[array]]` header.
/// 0 when not even the first key is written.
fn line_at(text: &str, path: &[Seg<'_>]) -> usize {
    use toml_edit::{Item, TableLike, Value};
    let Ok(doc) = toml_edit::ImDocument::parse(text) else {
        return 0;
    };
    let mut best: Option<usize> = None;
    let mut table: Option<&dyn TableLike> = Some(doc.as_table());
    let mut item: Option<&Item> = None;
    for seg in path {
        match *seg {
            Seg::Key(k) => {
                let Some((key, it)) = table.and_then(|t| t.get_key_value(k)) else {
                    break;
                };
                if let Some(s) = key.span().or_else(|| it.span()) {
                    best = Some(s.start);
                }
                table = it.as_table_like();
                item = Some(it);
            }
            Seg::Index(i) => {
                let (span, t) = match item {
                    Some(Item::ArrayOfTables(a)) => match a.get(i) {
                        Some(t) => (t.span(), t as &dyn TableLike),
                        None => break,
                    },
                    Some(Item::Value(Value::Array(a))) => {
                        match a
                            .get(i)
                            .and_then(|v| Some((v.span(), v.as_inline_table()?)))
                        {
                            Some((span, t)) => (span, t as &dyn TableLike),
                            None => break,
                        }
                    }
                    _ => break,
                };
                if let Some(s) = span {
                    best = Some(s.start);
                }
                table = Some(t);
                item = None;
            }
        }
    }
    best.map_or(0, |o| line_of(text, o))
}

/// The field of a serde error at byte `offset`: the dotted path of the
/// innermost key written there (`source.format`), plus the key a message
/// names as unknown or missing (`missing field `x``).
fn serde_field(text: &str, offset: usize, msg: &str) -> Option<String> {
    let named = field_in(msg)
        .filter(|_| msg.starts_with("unknown field") || msg.starts_with("missing field"));
    let mut at = toml_edit::ImDocument::parse(text)
        .ok()
        .and_then(|doc| {
            let mut path = Vec::new();
            key_path_at(doc.as_table(), offset, &mut path).then(|| path.join("."))
        })
        .filter(|p| !p.is_empty());
    if let (Some(p), Some(n)) = (&at, &named) {
        // An unknown key's own span ends the path with its name already.
        if !(p == n || p.ends_with(&format!(".{n}"))) {
            at = Some(format!("{p}.{n}"));
        }
    }
    at.or(named)
}

/// Pushes onto `path` the keys leading to the innermost key whose name or
/// value holds `offset` (a table's header counts as its key); false if none.
fn key_path_at(t: &dyn toml_edit::TableLike, offset: usize, path: &mut Vec<String>) -> bool {
    use toml_edit::{Item, Value};
    let holds = |s: Option<std::ops::Range<usize>>| s.is_some_and(|s| s.contains(&offset));
    for (name, it) in t.iter() {
        let Some((key, _)) = t.get_key_value(name) else {
            continue;
        };
        path.push(name.to_string());
        // Children first: a table's keys are written after its header.
        let inner = match it {
            Item::Table(_) | Item::Value(Value::InlineTable(_)) => it
                .as_table_like()
                .is_some_and(|c| key_path_at(c, offset, path)),
            Item::ArrayOfTables(a) => a
                .iter()
                .any(|c| key_path_at(c, offset, path) || holds(c.span())),
            Item::Value(Value::Array(a)) => a.iter().any(|v| {
                v.as_inline_table()
                    .is_some_and(|c| key_path_at(c, offset, path))
            }),
            _ => false,
        };
        if inner || holds(key.span()) || holds(it.span()) {
            return true;
        }
        path.pop();
    }
    false
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

    /// Three sources with the same keys, so only the right table gives the right line.
    const THREE: &str = r#"[mqtt]
url = "mqtt://127.0.0.1:1883"
client_id = "ingest-1"

[[source]]
name = "one"
filter = "one/#"
format = "canonical"
channels = { x = "import_active_total" }

[[source]]
name = "two"
filter = "two/#"
format = "canonical"
channels = { x = "import_active_total" }

[[source]]
name = "three"
filter = "three/#"
format = "canonical"
[source.channels]
x = "import_active_total"
"#;

    /// 1-based line of the `n`-th (0-based) occurrence of `needle`.
    fn nth_line(text: &str, needle: &str, n: usize) -> usize {
        let (o, _) = text.match_indices(needle).nth(n).unwrap();
        line_of(text, o)
    }

    /// `THREE` with the `n`-th occurrence of `from` replaced by `to`.
    fn edit(from: &str, n: usize, to: &str) -> String {
        let (o, _) = THREE.match_indices(from).nth(n).unwrap();
        format!("{}{to}{}", &THREE[..o], &THREE[o + from.len()..])
    }

    fn error(text: &str) -> (usize, String, String) {
        match IngestConfig::parse(text, Path::new("ingest.toml")).unwrap_err() {
            ConfigError::Invalid {
                path,
                line,
                field,
                message,
            } => {
                assert_eq!(path, Path::new("ingest.toml"));
                (line, field, message)
            }
            e => panic!("{e}"),
        }
    }

    #[test]
    fn errors_in_the_second_and_third_source_name_their_own_line() {
        IngestConfig::parse(THREE, Path::new("ingest.toml")).unwrap();
        for n in [1, 2] {
            // Checks after parsing: each names the key inside source n.
            let text = edit("import_active_total", n, "import_active_totl");
            let (line, field, msg) = error(&text);
            assert_eq!(line, nth_line(&text, "x = ", n), "{msg}");
            assert_eq!(field, "source.channels.x");

            let text = edit("format = \"canonical\"", n, "format = \"json_map\"");
            let (line, field, _) = error(&text);
            assert_eq!(
                (line, field.as_str()),
                (nth_line(&text, "format", n), "source.map")
            );

            let text = edit("filter = ", n, "filter = \"$share/g/x\"\n#");
            let (line, field, _) = error(&text);
            assert_eq!(
                (line, field.as_str()),
                (nth_line(&text, "filter", n), "source.filter")
            );

            let text = edit(
                &format!("name = \"{}\"", ["one", "two", "three"][n]),
                0,
                "name = \"one\"",
            );
            let (line, field, msg) = error(&text);
            assert_eq!(line, nth_line(&text, "name", n), "{msg}");
            assert_eq!(field, "source.name");

            let text = edit(
                "format = \"canonical\"",
                n,
                "format = \"json_map\"\nmap = { meter_id = \"/id\", values = { y = \"/v\" } }",
            );
            let (line, field, _) = error(&text);
            assert_eq!(line, nth_line(&text, "map = ", 0));
            assert_eq!(field, "source.map.values.y");

            // Errors of the TOML parse itself.
            let text = edit("format = \"canonical\"", n, "format = \"tasmot\"");
            let (line, field, msg) = error(&text);
            assert_eq!(line, nth_line(&text, "format", n), "{msg}");
            assert_eq!(field, "source.format", "{msg}");

            let text = edit("filter", n, "filtr");
            let (line, field, msg) = error(&text);
            assert_eq!(line, nth_line(&text, "filtr", 0), "{msg}");
            assert_eq!(field, "source.filtr", "{msg}");
        }
    }

    #[test]
    fn a_syntax_error_names_its_line_and_key() {
        let text = edit("filter = \"three/#\"", 0, "filter = three/#");
        let (line, field, msg) = error(&text);
        assert_eq!(line, nth_line(&text, "filter", 2), "{msg}");
        assert_eq!(field, "filter", "{msg}");
    }

    #[test]
    fn a_redelivery_window_outside_1_to_65535_names_its_line() {
        let cfg = IngestConfig::parse(THREE, Path::new("ingest.toml")).unwrap();
        assert_eq!(cfg.ingest.redelivery_window, 16_384);
        for (n, ok) in [(0, false), (1, true), (65_535, true), (65_536, false)] {
            let text = THREE.replace(
                "\n\n[[source]]\nname = \"one\"",
                &format!("\n[ingest]\nflush_secs = 2\nredelivery_window = {n}\n\n[[source]]\nname = \"one\""),
            );
            if ok {
                let cfg = IngestConfig::parse(&text, Path::new("ingest.toml")).unwrap();
                assert_eq!(cfg.ingest.redelivery_window, n);
                continue;
            }
            let (line, field, msg) = error(&text);
            assert_eq!(line, nth_line(&text, "redelivery_window", 0), "{msg}");
            assert_eq!(field, "ingest.redelivery_window");
            assert!(msg.contains("1..=65535"), "{msg}");
        }
    }

    #[test]
    fn a_missing_key_names_its_source() {
        let text = edit("filter = \"three/#\"\n", 0, "");
        let (line, field, msg) = error(&text);
        assert!(msg.contains("filter"), "{msg}");
        assert_eq!(field, "source.filter", "{msg}");
        // The header of the source that lacks it.
        assert_eq!(line, nth_line(&text, "[[source]]", 2), "{msg}");
    }

    #[test]
    fn tls_and_password_errors_name_the_key_given() {
        let text = THREE.replace(
            "client_id = \"ingest-1\"",
            "client_id = \"ingest-1\"\nusername = \"u\"\nclient_key_file = \"k.pem\"",
        );
        let (line, field, _) = error(&text);
        assert_eq!((line, field.as_str()), (5, "mqtt.client_key_file"));
        let text = THREE.replace(
            "client_id = \"ingest-1\"",
            "password_env = \"P\"\nclient_id = \"ingest-1\"\npassword_file = \"p\"",
        );
        let (line, field, _) = error(&text);
        assert_eq!((line, field.as_str()), (5, "mqtt.password_file"));
        let text = THREE.replace("mqtt://127", "http://127");
        let (line, field, _) = error(&text);
        assert_eq!((line, field.as_str()), (2, "mqtt.url"));
    }

    #[test]
    fn no_source_names_the_mqtt_table_or_the_empty_array() {
        let head = &THREE[..THREE.find("[[source]]").unwrap()];
        let (line, field, _) = error(head);
        assert_eq!((line, field.as_str()), (1, "source"));
        let text = format!("source = []\n{head}");
        let (line, _, _) = error(&text);
        assert_eq!(line, 1);
        let text = format!("{head}\n# none yet\n").replace("[mqtt]", "\n[mqtt]");
        let (line, _, _) = error(&text);
        assert_eq!(line, 2);
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
