//! Sparkplug B: payload types, topic parsing and the edge-node state machine.
//!
//! Pure: no IO. The MQTT layer feeds (topic, payload bytes) in and gets metric
//! values, offline marks and "ask for a rebirth" signals out. Message structs
//! are written by hand with prost derives (field numbers from the Eclipse
//! Tahu `sparkplug_b.proto`), so no protoc or build script is needed.

use std::collections::HashMap;

use rust_decimal::Decimal;

/// Topic namespace of Sparkplug B.
pub const NAMESPACE: &str = "spBv1.0";

/// Sparkplug metric data types (subset that carries numbers or text).
pub mod datatype {
    pub const INT8: u32 = 1;
    pub const INT16: u32 = 2;
    pub const INT32: u32 = 3;
    pub const INT64: u32 = 4;
    pub const UINT8: u32 = 5;
    pub const UINT16: u32 = 6;
    pub const UINT32: u32 = 7;
    pub const UINT64: u32 = 8;
    pub const FLOAT: u32 = 9;
    pub const DOUBLE: u32 = 10;
    pub const BOOLEAN: u32 = 11;
    pub const STRING: u32 = 12;
    pub const DATETIME: u32 = 13;
    pub const TEXT: u32 = 14;
}

/// `org.eclipse.tahu.protobuf.Payload`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Payload {
    #[prost(uint64, optional, tag = "1")]
    pub timestamp: Option<u64>,
    #[prost(message, repeated, tag = "2")]
    pub metrics: Vec<Metric>,
    #[prost(uint64, optional, tag = "3")]
    pub seq: Option<u64>,
    #[prost(string, optional, tag = "4")]
    pub uuid: Option<String>,
    #[prost(bytes = "vec", optional, tag = "5")]
    pub body: Option<Vec<u8>>,
}

/// `Payload.Metric` (metadata, datasets and templates are skipped).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Metric {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(uint64, optional, tag = "2")]
    pub alias: Option<u64>,
    #[prost(uint64, optional, tag = "3")]
    pub timestamp: Option<u64>,
    #[prost(uint32, optional, tag = "4")]
    pub datatype: Option<u32>,
    #[prost(bool, optional, tag = "5")]
    pub is_historical: Option<bool>,
    #[prost(bool, optional, tag = "6")]
    pub is_transient: Option<bool>,
    #[prost(bool, optional, tag = "7")]
    pub is_null: Option<bool>,
    #[prost(message, optional, tag = "9")]
    pub properties: Option<PropertySet>,
    #[prost(oneof = "MetricValue", tags = "10, 11, 12, 13, 14, 15, 16")]
    pub value: Option<MetricValue>,
}

/// `Payload.PropertySet`: parallel lists of keys and values.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PropertySet {
    #[prost(string, repeated, tag = "1")]
    pub keys: Vec<String>,
    #[prost(message, repeated, tag = "2")]
    pub values: Vec<PropertyValue>,
}

/// `Payload.PropertyValue` (nested property sets are skipped).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PropertyValue {
    #[prost(uint32, optional, tag = "1")]
    pub r#type: Option<u32>,
    #[prost(bool, optional, tag = "2")]
    pub is_null: Option<bool>,
    #[prost(oneof = "PropertyKind", tags = "3, 4, 5, 6, 7, 8")]
    pub value: Option<PropertyKind>,
}

/// The `value` oneof of a property.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum PropertyKind {
    #[prost(uint32, tag = "3")]
    IntValue(u32),
    #[prost(uint64, tag = "4")]
    LongValue(u64),
    #[prost(float, tag = "5")]
    FloatValue(f32),
    #[prost(double, tag = "6")]
    DoubleValue(f64),
    #[prost(bool, tag = "7")]
    BooleanValue(bool),
    #[prost(string, tag = "8")]
    StringValue(String),
}

/// Metric property meterflow uses to carry exact decimals in integer
/// metrics: the value is `integer / 10^decimalScale` (0..=28). Given in a
/// birth it applies to every later value of that metric; given on a data
/// metric it applies to that value only.
pub const DECIMAL_SCALE: &str = "decimalScale";

/// Metric property (String) meterflow uses for a value's quality flags
/// (`clock_skew,estimated`, the names of `model::Quality`); absent means ok.
pub const QUALITY: &str = "quality";

impl PropertySet {
    /// A property set holding just `decimalScale`.
    pub fn decimal_scale(scale: u32) -> PropertySet {
        PropertySet {
            keys: vec![DECIMAL_SCALE.to_string()],
            values: vec![PropertyValue {
                r#type: Some(datatype::UINT32),
                is_null: None,
                value: Some(PropertyKind::IntValue(scale)),
            }],
        }
    }

    /// Adds (or replaces) a property.
    pub fn set(&mut self, key: &str, value: PropertyKind, dtype: u32) {
        let v = PropertyValue {
            r#type: Some(dtype),
            is_null: None,
            value: Some(value),
        };
        match self.keys.iter().position(|k| k == key) {
            Some(i) if i < self.values.len() => self.values[i] = v,
            _ => {
                self.keys.push(key.to_string());
                self.values.push(v);
            }
        }
    }

    /// The text value of property `key`, if present and a string.
    pub fn text(&self, key: &str) -> Option<&str> {
        let i = self.keys.iter().position(|k| k == key)?;
        match self.values.get(i)?.value.as_ref()? {
            PropertyKind::StringValue(s) => Some(s),
            _ => None,
        }
    }

    /// The integer value of property `key`, if present and integral.
    pub fn int(&self, key: &str) -> Option<u64> {
        let i = self.keys.iter().position(|k| k == key)?;
        match self.values.get(i)?.value.as_ref()? {
            PropertyKind::IntValue(v) => Some(u64::from(*v)),
            PropertyKind::LongValue(v) => Some(*v),
            _ => None,
        }
    }
}

/// `decimalScale` of a metric, if it has one in range.
fn metric_scale(m: &Metric) -> Option<u32> {
    m.properties
        .as_ref()
        .and_then(|p| p.int(DECIMAL_SCALE))
        .and_then(|s| u32::try_from(s).ok())
}

/// The `value` oneof of a metric.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum MetricValue {
    #[prost(uint32, tag = "10")]
    IntValue(u32),
    #[prost(uint64, tag = "11")]
    LongValue(u64),
    #[prost(float, tag = "12")]
    FloatValue(f32),
    #[prost(double, tag = "13")]
    DoubleValue(f64),
    #[prost(bool, tag = "14")]
    BooleanValue(bool),
    #[prost(string, tag = "15")]
    StringValue(String),
    #[prost(bytes = "vec", tag = "16")]
    BytesValue(Vec<u8>),
}

/// Decodes a Sparkplug B payload.
pub fn decode_payload(bytes: &[u8]) -> Result<Payload, SparkplugError> {
    <Payload as prost::Message>::decode(bytes).map_err(|e| SparkplugError::Protobuf(e.to_string()))
}

/// Encodes a Sparkplug B payload.
pub fn encode_payload(p: &Payload) -> Vec<u8> {
    prost::Message::encode_to_vec(p)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SparkplugError {
    #[error("not a Sparkplug B topic: {0}")]
    Topic(String),
    #[error("broken protobuf: {0}")]
    Protobuf(String),
    #[error("{0} without seq")]
    MissingSeq(&'static str),
    #[error("seq {0} out of range 0..=255")]
    SeqRange(u64),
    #[error("metric alias {0} unknown (no birth seen); rebirth requested")]
    UnknownAlias(u64),
    #[error("metric without name or alias")]
    NoNameOrAlias,
    #[error("data from {0} before its birth; rebirth requested")]
    NoBirth(String),
    #[error("metric {0}: decimalScale {1} out of range 0..=28")]
    BadScale(String, u32),
}

/// Message types of a Sparkplug topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    NBirth,
    NData,
    NDeath,
    NCmd,
    DBirth,
    DData,
    DDeath,
    DCmd,
    State,
}

impl MessageType {
    fn parse(s: &str) -> Option<MessageType> {
        Some(match s {
            "NBIRTH" => MessageType::NBirth,
            "NDATA" => MessageType::NData,
            "NDEATH" => MessageType::NDeath,
            "NCMD" => MessageType::NCmd,
            "DBIRTH" => MessageType::DBirth,
            "DDATA" => MessageType::DData,
            "DDEATH" => MessageType::DDeath,
            "DCMD" => MessageType::DCmd,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            MessageType::NBirth => "NBIRTH",
            MessageType::NData => "NDATA",
            MessageType::NDeath => "NDEATH",
            MessageType::NCmd => "NCMD",
            MessageType::DBirth => "DBIRTH",
            MessageType::DData => "DDATA",
            MessageType::DDeath => "DDEATH",
            MessageType::DCmd => "DCMD",
            MessageType::State => "STATE",
        }
    }
    fn is_device(self) -> bool {
        matches!(
            self,
            MessageType::DBirth | MessageType::DData | MessageType::DDeath | MessageType::DCmd
        )
    }
}

/// A parsed topic `spBv1.0/<group>/<type>/<edge>[/<device>]` (or `spBv1.0/STATE/<host>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic {
    pub group: String,
    pub kind: MessageType,
    pub edge: String,
    pub device: Option<String>,
}

impl Topic {
    pub fn parse(topic: &str) -> Result<Topic, SparkplugError> {
        let bad = || SparkplugError::Topic(topic.to_string());
        let parts: Vec<&str> = topic.split('/').collect();
        if parts.first() != Some(&NAMESPACE) || parts.iter().any(|p| p.is_empty()) {
            return Err(bad());
        }
        if parts.len() == 3 && parts[1] == "STATE" {
            return Ok(Topic {
                group: String::new(),
                kind: MessageType::State,
                edge: parts[2].to_string(),
                device: None,
            });
        }
        let kind = parts
            .get(2)
            .and_then(|s| MessageType::parse(s))
            .ok_or_else(bad)?;
        let want = if kind.is_device() { 5 } else { 4 };
        if parts.len() != want {
            return Err(bad());
        }
        Ok(Topic {
            group: parts[1].to_string(),
            kind,
            edge: parts[3].to_string(),
            device: parts.get(4).map(|s| s.to_string()),
        })
    }

    /// `group/edge`: the edge node a message belongs to.
    pub fn node_key(&self) -> String {
        format!("{}/{}", self.group, self.edge)
    }

    /// Topic of the node command that asks this edge node for a rebirth.
    pub fn rebirth_topic(&self) -> String {
        format!("{NAMESPACE}/{}/NCMD/{}", self.group, self.edge)
    }
}

/// The NCMD payload asking an edge node to publish its births again.
pub fn rebirth_request(now_ms: u64) -> Vec<u8> {
    encode_payload(&Payload {
        timestamp: Some(now_ms),
        metrics: vec![Metric {
            name: Some("Node Control/Rebirth".into()),
            datatype: Some(datatype::BOOLEAN),
            value: Some(MetricValue::BooleanValue(true)),
            ..Default::default()
        }],
        seq: None,
        uuid: None,
        body: None,
    })
}

/// A metric value made exact: numbers become decimals, text stays text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Number(Decimal),
    Text(String),
    Null,
}

/// Converts a wire value to an exact value using the declared datatype
/// (signed ints arrive two's complement in unsigned fields).
pub fn exact_value(dtype: u32, v: &MetricValue) -> Value {
    use self::datatype as dt;
    match v {
        MetricValue::IntValue(u) => Value::Number(match dtype {
            dt::INT8 => Decimal::from(*u as u8 as i8),
            dt::INT16 => Decimal::from(*u as u16 as i16),
            dt::INT32 => Decimal::from(*u as i32),
            _ => Decimal::from(*u),
        }),
        MetricValue::LongValue(u) => Value::Number(match dtype {
            dt::INT64 | dt::INT8 | dt::INT16 | dt::INT32 => Decimal::from(*u as i64),
            _ => Decimal::from(*u),
        }),
        // Floats go through their shortest round-trip text, the number the
        // device meant; NaN and infinities are not numbers.
        MetricValue::FloatValue(x) => text_number(x.is_finite(), x.to_string()),
        MetricValue::DoubleValue(x) => text_number(x.is_finite(), x.to_string()),
        MetricValue::BooleanValue(b) => Value::Number(Decimal::from(*b as u8)),
        MetricValue::StringValue(s) => Value::Text(s.clone()),
        MetricValue::BytesValue(_) => Value::Null,
    }
}

fn text_number(finite: bool, s: String) -> Value {
    if !finite {
        return Value::Null;
    }
    Decimal::from_str_exact(&s)
        .or_else(|_| Decimal::from_scientific(&s))
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

/// One metric value with its name resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedValue {
    /// Edge node id, and device id for device metrics.
    pub edge: String,
    pub device: Option<String>,
    pub name: String,
    /// Metric timestamp, else payload timestamp (UTC ms); None if neither.
    pub ts_ms: Option<i64>,
    pub value: Value,
    /// Data arrived for a node or device that had been declared dead.
    pub after_death: bool,
    /// The metric's `quality` property (meterflow uplinks), if any.
    pub quality: Option<String>,
}

/// What one message meant.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub values: Vec<NamedValue>,
    /// Devices (or the node itself, device None) that went offline with this message.
    pub offline: Vec<(String, Option<String>)>,
    /// A seq gap or unknown alias: publish `rebirth_request` to `topic.rebirth_topic()`.
    pub rebirth_needed: bool,
    /// Data named only by aliases that no birth on record declares (a
    /// central restart lost them): keep the message until the birth comes.
    pub needs_birth: bool,
    /// Problems that did not stop the rest of the message.
    pub problems: Vec<SparkplugError>,
    /// An NDEATH of an earlier session (its bdSeq is not the current
    /// NBIRTH's, e.g. a will the broker sent late): ignored.
    pub stale_death: bool,
}

/// What a birth declared about one metric.
#[derive(Debug, Clone)]
struct Declared {
    name: String,
    dtype: u32,
    scale: Option<u32>,
}

type AliasTable = HashMap<u64, Declared>;

#[derive(Debug, Default)]
struct Device {
    aliases: AliasTable,
    alive: bool,
    /// A death was seen and no birth since (a device never born, e.g.
    /// after an ingest restart, is not dead).
    dead: bool,
}

#[derive(Debug, Default)]
struct Node {
    aliases: AliasTable,
    born: bool,
    alive: bool,
    /// Seq expected on the next message from this node.
    next_seq: Option<u8>,
    /// bdSeq of the current NBIRTH: only an NDEATH with the same one ends it.
    bd_seq: Option<u64>,
    devices: HashMap<String, Device>,
}

/// Tracks births, aliases, seq numbers and deaths of every edge node seen.
#[derive(Debug, Default)]
pub struct State {
    nodes: HashMap<(String, String), Node>,
}

impl State {
    pub fn new() -> State {
        State::default()
    }

    /// True if the node (device None) or device is currently alive.
    pub fn is_online(&self, group: &str, edge: &str, device: Option<&str>) -> bool {
        let Some(n) = self.nodes.get(&(group.to_string(), edge.to_string())) else {
            return false;
        };
        match device {
            None => n.alive,
            Some(d) => n.alive && n.devices.get(d).is_some_and(|d| d.alive),
        }
    }

    /// Feeds one message. Never panics; problems are reported in the outcome.
    pub fn handle(&mut self, topic: &Topic, p: &Payload) -> Outcome {
        let mut out = Outcome::default();
        if matches!(
            topic.kind,
            MessageType::NCmd | MessageType::DCmd | MessageType::State
        ) {
            return out;
        }
        let key = (topic.group.clone(), topic.edge.clone());
        let node = self.nodes.entry(key).or_default();

        if topic.kind == MessageType::NDeath {
            // NDEATH carries bdSeq, not seq. One that does not match the
            // current birth ends an earlier session; unknown on either side
            // (no birth seen since a restart), the death counts.
            if let (Some(born), Some(died)) = (node.bd_seq, bd_seq(p)) {
                if born != died {
                    out.stale_death = true;
                    return out;
                }
            }
            // The node and all its devices are gone.
            node.alive = false;
            node.next_seq = None;
            out.offline.push((topic.edge.clone(), None));
            for (id, d) in node.devices.iter_mut() {
                if d.alive {
                    d.alive = false;
                    d.dead = true;
                    out.offline.push((topic.edge.clone(), Some(id.clone())));
                }
            }
            return out;
        }

        // Every other node-originated message carries seq 0..=255.
        let seq = match p.seq {
            None => {
                out.problems
                    .push(SparkplugError::MissingSeq(topic.kind.as_str()));
                None
            }
            Some(s) if s > 255 => {
                out.problems.push(SparkplugError::SeqRange(s));
                None
            }
            Some(s) => Some(s as u8),
        };
        if topic.kind == MessageType::NBirth {
            node.aliases.clear();
            node.devices.clear();
            node.born = true;
            node.alive = true;
            node.bd_seq = bd_seq(p);
        } else {
            // Data from a node we have no live birth for, or a seq gap: the
            // alias tables may be stale, so ask the node to rebirth.
            if !node.alive {
                out.rebirth_needed = true;
            }
            match (seq, node.next_seq) {
                (Some(s), Some(want)) if s != want => out.rebirth_needed = true,
                (None, _) => out.rebirth_needed = true,
                _ => {}
            }
        }
        node.next_seq = seq.map(|s| s.wrapping_add(1));
        let node_after_death = node.born && !node.alive;

        let payload_ts = p.timestamp.and_then(|t| i64::try_from(t).ok());
        match topic.kind {
            MessageType::NBirth | MessageType::NData => {
                let birth = topic.kind == MessageType::NBirth;
                let unborn = !birth && !node.born;
                if unborn {
                    out.problems
                        .push(SparkplugError::NoBirth(topic.edge.clone()));
                }
                resolve(
                    &mut node.aliases,
                    None,
                    birth,
                    topic,
                    p,
                    payload_ts,
                    node_after_death,
                    &mut out,
                );
                out.needs_birth = unborn && has_unknown_alias(&out);
            }
            MessageType::DBirth | MessageType::DData | MessageType::DDeath => {
                let dev_id = topic.device.clone().unwrap_or_default();
                let dev = node.devices.entry(dev_id.clone()).or_default();
                match topic.kind {
                    MessageType::DBirth => {
                        dev.aliases.clear();
                        dev.alive = true;
                        dev.dead = false;
                        resolve(
                            &mut dev.aliases,
                            Some(&node.aliases),
                            true,
                            topic,
                            p,
                            payload_ts,
                            false,
                            &mut out,
                        );
                    }
                    MessageType::DData => {
                        let after_death = dev.dead || node_after_death;
                        let unborn = dev.aliases.is_empty() && !dev.alive;
                        if unborn {
                            out.problems.push(SparkplugError::NoBirth(format!(
                                "{}/{}",
                                topic.edge, dev_id
                            )));
                            out.rebirth_needed = true;
                        }
                        resolve(
                            &mut dev.aliases,
                            Some(&node.aliases),
                            false,
                            topic,
                            p,
                            payload_ts,
                            after_death,
                            &mut out,
                        );
                        out.needs_birth = unborn && has_unknown_alias(&out);
                    }
                    _ => {
                        dev.alive = false;
                        dev.dead = true;
                        out.offline.push((topic.edge.clone(), Some(dev_id)));
                    }
                }
            }
            _ => {}
        }
        if has_unknown_alias(&out) {
            out.rebirth_needed = true;
        }
        out
    }

    /// Resolves a parked NDATA/DDATA with the alias tables known now,
    /// changing no state (its seq is long past). `needs_birth` stays set
    /// while the birth it waits for has not arrived.
    pub fn replay(&self, topic: &Topic, p: &Payload) -> Outcome {
        let mut out = Outcome::default();
        let node = self.nodes.get(&(topic.group.clone(), topic.edge.clone()));
        let payload_ts = p.timestamp.and_then(|t| i64::try_from(t).ok());
        let empty = AliasTable::new();
        let (table, fallback) = match (node, topic.kind, topic.device.as_deref()) {
            (Some(n), MessageType::NData, _) if n.born => (&n.aliases, None),
            (Some(n), MessageType::DData, Some(d)) => match n.devices.get(d) {
                Some(dev) if !dev.aliases.is_empty() || dev.alive => {
                    (&dev.aliases, Some(&n.aliases))
                }
                _ => (&empty, None),
            },
            _ => (&empty, None),
        };
        // `resolve` learns aliases only from births; a copy keeps `self` untouched.
        let mut table = table.clone();
        resolve(
            &mut table, fallback, false, topic, p, payload_ts, false, &mut out,
        );
        out.needs_birth = has_unknown_alias(&out);
        out
    }
}

/// The `bdSeq` metric of an NBIRTH or NDEATH, if any.
fn bd_seq(p: &Payload) -> Option<u64> {
    p.metrics
        .iter()
        .find(|m| m.name.as_deref() == Some("bdSeq"))
        .and_then(|m| match m.value {
            Some(MetricValue::LongValue(v)) => Some(v),
            Some(MetricValue::IntValue(v)) => Some(u64::from(v)),
            _ => None,
        })
}

fn has_unknown_alias(out: &Outcome) -> bool {
    out.problems
        .iter()
        .any(|e| matches!(e, SparkplugError::UnknownAlias(_)))
}

/// Resolves names through the alias table (learning it on births) and
/// collects values.
#[allow(clippy::too_many_arguments)]
fn resolve(
    table: &mut AliasTable,
    fallback: Option<&AliasTable>,
    birth: bool,
    topic: &Topic,
    p: &Payload,
    payload_ts: Option<i64>,
    after_death: bool,
    out: &mut Outcome,
) {
    for m in &p.metrics {
        let own_scale = metric_scale(m);
        let (name, dtype, scale) = match (&m.name, m.alias) {
            (Some(n), alias) => {
                let dt = m.datatype.unwrap_or(0);
                if birth {
                    if let Some(a) = alias {
                        table.insert(
                            a,
                            Declared {
                                name: n.clone(),
                                dtype: dt,
                                scale: own_scale,
                            },
                        );
                    }
                }
                // Data messages may name metrics without datatype or scale:
                // take them from the birth.
                let declared = || table.values().find(|d| &d.name == n);
                let dt = if dt == 0 {
                    declared().map(|d| d.dtype).unwrap_or(0)
                } else {
                    dt
                };
                let scale = own_scale.or_else(|| declared().and_then(|d| d.scale));
                (n.clone(), dt, scale)
            }
            (None, Some(a)) => match table.get(&a).or_else(|| fallback.and_then(|f| f.get(&a))) {
                Some(d) => (
                    d.name.clone(),
                    m.datatype.unwrap_or(d.dtype),
                    own_scale.or(d.scale),
                ),
                None => {
                    out.problems.push(SparkplugError::UnknownAlias(a));
                    continue;
                }
            },
            (None, None) => {
                out.problems.push(SparkplugError::NoNameOrAlias);
                continue;
            }
        };
        // Node control and properties are not measurements.
        if name.starts_with("Node Control/")
            || name.starts_with("Device Control/")
            || name == "bdSeq"
        {
            continue;
        }
        let value = if m.is_null == Some(true) {
            Value::Null
        } else {
            match &m.value {
                Some(v) => exact_value(dtype, v),
                None => Value::Null,
            }
        };
        let value = match (value, scale, &m.value) {
            // Only integers carry a decimal scale; floats are already decimals.
            (
                Value::Number(mut d),
                Some(s),
                Some(MetricValue::IntValue(_) | MetricValue::LongValue(_)),
            ) if s > 0 => {
                if d.set_scale(s).is_err() {
                    out.problems.push(SparkplugError::BadScale(name, s));
                    continue;
                }
                Value::Number(d)
            }
            (v, _, _) => v,
        };
        let ts_ms = m
            .timestamp
            .and_then(|t| i64::try_from(t).ok())
            .or(payload_ts);
        out.values.push(NamedValue {
            edge: topic.edge.clone(),
            device: topic.device.clone(),
            name,
            ts_ms,
            value,
            after_death,
            quality: m
                .properties
                .as_ref()
                .and_then(|p| p.text(QUALITY))
                .map(String::from),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    fn metric(name: Option<&str>, alias: Option<u64>, dt: u32, v: MetricValue) -> Metric {
        Metric {
            name: name.map(String::from),
            alias,
            datatype: Some(dt),
            value: Some(v),
            ..Default::default()
        }
    }

    fn payload(seq: u64, metrics: Vec<Metric>) -> Payload {
        Payload {
            timestamp: Some(1_700_000_000_000),
            metrics,
            seq: Some(seq),
            uuid: None,
            body: None,
        }
    }

    fn t(s: &str) -> Topic {
        Topic::parse(s).unwrap()
    }

    #[test]
    fn topics_parse_node_and_device_forms() {
        let n = t("spBv1.0/plant/NDATA/gw1");
        assert_eq!(n.kind, MessageType::NData);
        assert_eq!(n.device, None);
        let d = t("spBv1.0/plant/DDATA/gw1/m7");
        assert_eq!(d.device.as_deref(), Some("m7"));
        assert_eq!(d.rebirth_topic(), "spBv1.0/plant/NCMD/gw1");
        assert!(Topic::parse("spBv1.0/plant/DDATA/gw1").is_err());
        assert!(Topic::parse("spBv1.0/plant/NDATA/gw1/m7").is_err());
        assert!(Topic::parse("spAv1.0/plant/NDATA/gw1").is_err());
        assert!(Topic::parse("spBv1.0/plant/XDATA/gw1").is_err());
        assert!(Topic::parse("spBv1.0//NDATA/gw1").is_err());
        assert_eq!(t("spBv1.0/STATE/host").kind, MessageType::State);
    }

    #[test]
    fn payload_round_trips_through_protobuf() {
        let p = payload(
            3,
            vec![metric(
                Some("E"),
                Some(1),
                datatype::DOUBLE,
                MetricValue::DoubleValue(1.5),
            )],
        );
        assert_eq!(decode_payload(&encode_payload(&p)).unwrap(), p);
    }

    #[test]
    fn broken_protobuf_is_an_error() {
        assert!(decode_payload(&[0x12, 0xff, 0x01]).is_err());
    }

    /// A DBIRTH (seq 1) naming metric alias 7 `Energy/Import`, at 10.25.
    fn energy_birth() -> Payload {
        payload(
            1,
            vec![metric(
                Some("Energy/Import"),
                Some(7),
                datatype::DOUBLE,
                MetricValue::DoubleValue(10.25),
            )],
        )
    }

    #[test]
    fn device_data_by_alias_resolves_names_from_birth() {
        let mut s = State::new();
        s.handle(&t("spBv1.0/g/NBIRTH/e"), &payload(0, vec![]));
        let birth = energy_birth();
        let o = s.handle(&t("spBv1.0/g/DBIRTH/e/m1"), &birth);
        assert_eq!(o.values[0].value, Value::Number(dec!(10.25)));
        let data = payload(
            2,
            vec![metric(None, Some(7), 0, MetricValue::DoubleValue(10.5))],
        );
        let o = s.handle(&t("spBv1.0/g/DDATA/e/m1"), &data);
        assert!(!o.rebirth_needed, "{o:?}");
        assert_eq!(o.values[0].name, "Energy/Import");
        assert_eq!(o.values[0].device.as_deref(), Some("m1"));
        assert_eq!(o.values[0].value, Value::Number(dec!(10.5)));
    }

    #[test]
    fn data_by_alias_before_any_birth_waits_for_the_birth_then_replays() {
        // A central restart: the node's aliases are unknown until it rebirths.
        let mut s = State::new();
        let data = payload(
            41,
            vec![metric(None, Some(7), 0, MetricValue::DoubleValue(10.5))],
        );
        let topic = t("spBv1.0/g/DDATA/e/m1");
        let o = s.handle(&topic, &data);
        assert!(o.needs_birth && o.rebirth_needed, "{o:?}");
        assert!(o.values.is_empty());
        assert!(s.replay(&topic, &data).needs_birth, "no birth yet");

        s.handle(&t("spBv1.0/g/NBIRTH/e"), &payload(0, vec![]));
        assert!(
            s.replay(&topic, &data).needs_birth,
            "the device birth is still missing"
        );
        let birth = energy_birth();
        s.handle(&t("spBv1.0/g/DBIRTH/e/m1"), &birth);
        let o = s.replay(&topic, &data);
        assert!(!o.needs_birth && !o.rebirth_needed, "{o:?}");
        assert_eq!(o.values[0].name, "Energy/Import");
        assert_eq!(o.values[0].value, Value::Number(dec!(10.5)));
        // Replay changes no state: the next live message is still in sequence.
        let next = payload(
            2,
            vec![metric(None, Some(7), 0, MetricValue::DoubleValue(10.75))],
        );
        assert!(!s.handle(&topic, &next).rebirth_needed);
    }

    #[test]
    fn named_data_before_a_birth_is_not_held_back() {
        let mut s = State::new();
        let data = payload(
            3,
            vec![metric(
                Some("E"),
                None,
                datatype::DOUBLE,
                MetricValue::DoubleValue(1.5),
            )],
        );
        let o = s.handle(&t("spBv1.0/g/NDATA/e"), &data);
        assert!(!o.needs_birth);
        assert_eq!(o.values.len(), 1);
    }

    #[test]
    fn seq_gap_asks_for_rebirth_but_keeps_the_values() {
        let mut s = State::new();
        s.handle(
            &t("spBv1.0/g/NBIRTH/e"),
            &payload(
                0,
                vec![metric(
                    Some("V"),
                    Some(1),
                    datatype::INT32,
                    MetricValue::IntValue(1),
                )],
            ),
        );
        let o = s.handle(
            &t("spBv1.0/g/NDATA/e"),
            &payload(5, vec![metric(None, Some(1), 0, MetricValue::IntValue(2))]),
        );
        assert!(o.rebirth_needed);
        assert_eq!(o.values.len(), 1);
        // After the gap the count continues from the new seq.
        let o = s.handle(&t("spBv1.0/g/NDATA/e"), &payload(6, vec![]));
        assert!(!o.rebirth_needed);
    }

    #[test]
    fn seq_wraps_from_255_to_0() {
        let mut s = State::new();
        s.handle(&t("spBv1.0/g/NBIRTH/e"), &payload(255, vec![]));
        let o = s.handle(&t("spBv1.0/g/NDATA/e"), &payload(0, vec![]));
        assert!(!o.rebirth_needed);
    }

    #[test]
    fn unknown_alias_is_a_problem_and_asks_for_rebirth() {
        let mut s = State::new();
        let o = s.handle(
            &t("spBv1.0/g/NDATA/e"),
            &payload(4, vec![metric(None, Some(9), 0, MetricValue::IntValue(2))]),
        );
        assert!(o.rebirth_needed);
        assert!(o.values.is_empty());
        assert!(o.problems.contains(&SparkplugError::UnknownAlias(9)));
    }

    #[test]
    fn death_marks_devices_offline_and_later_data_is_flagged() {
        let mut s = State::new();
        s.handle(&t("spBv1.0/g/NBIRTH/e"), &payload(0, vec![]));
        s.handle(
            &t("spBv1.0/g/DBIRTH/e/m1"),
            &payload(
                1,
                vec![metric(
                    Some("P"),
                    Some(1),
                    datatype::FLOAT,
                    MetricValue::FloatValue(0.1),
                )],
            ),
        );
        assert!(s.is_online("g", "e", Some("m1")));
        let o = s.handle(&t("spBv1.0/g/DDEATH/e/m1"), &payload(2, vec![]));
        assert_eq!(o.offline, vec![("e".to_string(), Some("m1".to_string()))]);
        assert!(!s.is_online("g", "e", Some("m1")));
        let o = s.handle(
            &t("spBv1.0/g/DDATA/e/m1"),
            &payload(
                3,
                vec![metric(None, Some(1), 0, MetricValue::FloatValue(0.2))],
            ),
        );
        assert!(o.values[0].after_death);
        assert_eq!(o.values[0].value, Value::Number(dec!(0.2)));
        let o = s.handle(&t("spBv1.0/g/NDEATH/e"), &Payload::default());
        assert_eq!(o.offline, vec![("e".to_string(), None)]);
        assert!(!s.is_online("g", "e", None));
    }

    #[test]
    fn signed_ints_are_read_as_twos_complement() {
        assert_eq!(
            exact_value(datatype::INT16, &MetricValue::IntValue(0xffff)),
            Value::Number(dec!(-1))
        );
        assert_eq!(
            exact_value(datatype::INT64, &MetricValue::LongValue(u64::MAX)),
            Value::Number(dec!(-1))
        );
        assert_eq!(
            exact_value(datatype::UINT32, &MetricValue::IntValue(u32::MAX)),
            Value::Number(dec!(4294967295))
        );
        assert_eq!(
            exact_value(datatype::DOUBLE, &MetricValue::DoubleValue(f64::NAN)),
            Value::Null
        );
    }

    fn bd(n: u64) -> Metric {
        metric(
            Some("bdSeq"),
            None,
            datatype::UINT64,
            MetricValue::LongValue(n),
        )
    }

    #[test]
    fn an_ndeath_of_an_earlier_session_leaves_the_node_online() {
        let mut s = State::new();
        s.handle(&t("spBv1.0/g/NBIRTH/e"), &payload(0, vec![bd(5)]));
        let stale = Payload {
            metrics: vec![bd(4)],
            ..Default::default()
        };
        let o = s.handle(&t("spBv1.0/g/NDEATH/e"), &stale);
        assert!(o.stale_death && o.offline.is_empty(), "{o:?}");
        assert!(s.is_online("g", "e", None));
        // The session goes on in sequence.
        assert!(
            !s.handle(&t("spBv1.0/g/NDATA/e"), &payload(1, vec![]))
                .rebirth_needed
        );
        let current = Payload {
            metrics: vec![bd(5)],
            ..Default::default()
        };
        let o = s.handle(&t("spBv1.0/g/NDEATH/e"), &current);
        assert!(!o.stale_death);
        assert_eq!(o.offline, vec![("e".to_string(), None)]);
        assert!(!s.is_online("g", "e", None));
    }

    #[test]
    fn an_ndeath_after_a_restart_counts_without_a_birth_to_compare() {
        let mut s = State::new();
        let death = Payload {
            metrics: vec![bd(4)],
            ..Default::default()
        };
        let o = s.handle(&t("spBv1.0/g/NDEATH/e"), &death);
        assert!(!o.stale_death);
        assert_eq!(o.offline, vec![("e".to_string(), None)]);
    }

    #[test]
    fn data_of_a_device_never_born_here_is_not_flagged_offline() {
        // An ingest restart forgot the births; no death was seen.
        let mut s = State::new();
        let named = payload(
            9,
            vec![metric(
                Some("P"),
                None,
                datatype::FLOAT,
                MetricValue::FloatValue(0.5),
            )],
        );
        let o = s.handle(&t("spBv1.0/g/DDATA/e/m1"), &named);
        assert_eq!(o.values.len(), 1);
        assert!(!o.values[0].after_death, "{o:?}");
        // A later death does flag the data that follows it.
        s.handle(&t("spBv1.0/g/DDEATH/e/m1"), &payload(10, vec![]));
        let o = s.handle(
            &t("spBv1.0/g/DDATA/e/m1"),
            &payload(11, named.metrics.clone()),
        );
        assert!(o.values[0].after_death);
    }
}
