//! Payload decoders: MQTT (topic, bytes) -> readings. Pure: no IO, the clock
//! is passed in.
//!
//! Every number is read from its JSON text (serde_json `arbitrary_precision`)
//! or protobuf integer straight into a `Decimal`, never through a binary float.
//! A message that cannot be read at all is an `Err` (dead-lettered whole); a
//! message that is partly readable returns its good readings plus `problems`
//! (the payload is dead-lettered with those reasons as well).

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, NaiveDateTime};
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::{Decimal, RoundingStrategy};
use serde::Deserialize;
use serde_json::Value;

use super::config::{
    resolve_channel, ChannelMap, ChannelSpec, Format, SourceConfig, TsFormat, Unmapped,
};
use crate::model::{Channel, Protocol, Quality, Reading, Source};
use crate::protocol::sparkplug;
use crate::store::scan::FxSet;

/// 2000-01-01T00:00:00Z: older timestamps are a device clock that was never set.
pub const MIN_TS_MS: i64 = 946_684_800_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    Oversized { len: usize, max: usize },
    #[error("malformed JSON: {0}")]
    Json(String),
    #[error("wrong type: {0}")]
    WrongType(String),
    #[error("missing field {0}")]
    MissingField(String),
    #[error("field {field}: '{text}' is not a usable number")]
    BadNumber { field: String, text: String },
    #[error("value {0} does not fit DECIMAL(18,4) exactly")]
    ValueOutOfRange(Decimal),
    #[error("timestamp {0} ms is before 2000 or too far in the future")]
    AbsurdTimestamp(i64),
    #[error("field {0}: unreadable timestamp")]
    BadTimestamp(String),
    #[error("unknown meter '{0}'")]
    UnknownMeter(String),
    #[error("field '{0}' has no channel mapping")]
    Unmapped(String),
    #[error("unknown channel '{0}'")]
    UnknownChannel(String),
    #[error("unit '{unit}' does not match channel {channel} ({want})")]
    WrongUnit {
        unit: String,
        channel: String,
        want: String,
    },
    #[error("device reported error on '{field}': {code}")]
    DeviceError { field: String, code: String },
    #[error("sparkplug: {0}")]
    Sparkplug(#[from] sparkplug::SparkplugError),
}

impl DecodeError {
    /// Short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Oversized { .. } => "oversized",
            DecodeError::Json(_) => "malformed_json",
            DecodeError::WrongType(_) | DecodeError::MissingField(_) => "wrong_type",
            DecodeError::BadNumber { .. } | DecodeError::ValueOutOfRange(_) => "bad_number",
            DecodeError::AbsurdTimestamp(_) | DecodeError::BadTimestamp(_) => "bad_timestamp",
            DecodeError::UnknownMeter(_) => "unknown_meter",
            DecodeError::Unmapped(_)
            | DecodeError::UnknownChannel(_)
            | DecodeError::WrongUnit { .. } => "unmapped",
            DecodeError::DeviceError { .. } => "device_error",
            DecodeError::Sparkplug(_) => "sparkplug",
        }
    }
}

/// Limits shared by every source.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_payload_bytes: usize,
    pub max_future_ms: i64,
    pub known_meters: Option<Arc<HashSet<String>>>,
    /// `Source.collector` for readings that do not name one.
    pub collector: String,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: 1 << 20,
            max_future_ms: 86_400_000,
            known_meters: None,
            collector: "mqtt-ingest".into(),
        }
    }
}

/// What one message decoded to.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub readings: Vec<Reading>,
    /// Parts that could not be used; the payload is dead-lettered with these reasons.
    pub problems: Vec<DecodeError>,
    /// Sparkplug: (topic, payload) of a rebirth request to publish.
    pub rebirth: Option<(String, Vec<u8>)>,
    /// Sparkplug: devices (`edge` or `edge/device`) that went offline.
    pub offline: Vec<String>,
    /// Values rounded to 4 decimals (not `exact`).
    pub rounded: usize,
    /// Sparkplug: data that needs a birth the ingest has not seen (it
    /// restarted): park it under this node (`group/edge`) until `birth_of`
    /// names the node.
    pub park: Option<String>,
    /// Sparkplug: a birth of this node (`group/edge`) arrived.
    pub birth_of: Option<String>,
    /// Sparkplug: this node (`group/edge`) died.
    pub death_of: Option<String>,
    /// Some value had no timestamp of its own and was given the receive
    /// time: a redelivered copy must be given the same (see `ingest::batch`).
    pub stamped: bool,
}

/// Decoder for one configured source (keeps Sparkplug state between messages).
pub struct Decoder {
    src: SourceConfig,
    unmapped: Unmapped,
    channels: HashMap<String, ChannelMap>,
    limits: Limits,
    sparkplug: sparkplug::State,
    texts: Texts,
}

/// Collector and address texts, one `Arc` per distinct text: every reading
/// that names a text shares it. The lake writer then tells equal texts apart
/// from different ones by address, without reading them (each message's own
/// copy cost a compare that missed the cache at commit). And the channel the
/// last reading named.
#[derive(Default)]
struct Texts {
    collector: RefCell<Shared>,
    address: RefCell<Shared>,
    /// The channel the last reading named.
    channel: std::cell::Cell<Option<Channel>>,
}

#[derive(Default)]
struct Shared {
    last: Option<Arc<str>>,
    known: FxSet<Arc<str>>,
}

/// Distinct texts kept per field; past this the set starts again (topics
/// with a device id each can be many).
const MAX_SHARED: usize = 4096;

fn shared(slot: &RefCell<Shared>, text: &str) -> Arc<str> {
    let mut slot = slot.borrow_mut();
    if let Some(t) = &slot.last {
        if **t == *text {
            return t.clone();
        }
    }
    let t = match slot.known.get(text) {
        Some(t) => t.clone(),
        None => {
            if slot.known.len() >= MAX_SHARED {
                slot.known.clear();
            }
            let t: Arc<str> = text.into();
            slot.known.insert(t.clone());
            t
        }
    };
    slot.last = Some(t.clone());
    t
}

impl Decoder {
    pub fn new(src: &SourceConfig, limits: Limits) -> Result<Decoder, String> {
        let mut channels: HashMap<String, ChannelMap> = HashMap::new();
        for (k, spec) in default_channels(src.format) {
            channels.insert(k, resolve_channel(&spec)?);
        }
        for (k, spec) in &src.channels {
            channels.insert(
                k.clone(),
                resolve_channel(spec).map_err(|e| format!("{k}: {e}"))?,
            );
        }
        Ok(Decoder {
            unmapped: src.unmapped(),
            src: src.clone(),
            channels,
            limits,
            sparkplug: sparkplug::State::new(),
            texts: Texts::default(),
        })
    }

    pub fn format(&self) -> Format {
        self.src.format
    }

    pub fn source(&self) -> &SourceConfig {
        &self.src
    }

    /// Decodes one message received at `now_ms`.
    pub fn decode(
        &mut self,
        topic: &str,
        payload: &[u8],
        now_ms: i64,
    ) -> Result<Decoded, DecodeError> {
        if payload.len() > self.limits.max_payload_bytes {
            return Err(DecodeError::Oversized {
                len: payload.len(),
                max: self.limits.max_payload_bytes,
            });
        }
        let mut out = Decoded::default();
        match self.src.format {
            Format::Canonical => self.canonical(topic, payload, now_ms, &mut out)?,
            Format::Values => self.values(topic, payload, now_ms, &mut out)?,
            Format::Tasmota => self.tasmota(topic, payload, now_ms, &mut out)?,
            Format::Shelly => self.shelly(topic, payload, now_ms, &mut out)?,
            Format::Sparkplug => self.sparkplug(topic, payload, now_ms, &mut out)?,
            Format::JsonMap => self.json_map(topic, payload, now_ms, &mut out)?,
        }
        Ok(out)
    }

    fn canonical(
        &self,
        topic: &str,
        payload: &[u8],
        now: i64,
        out: &mut Decoded,
    ) -> Result<(), DecodeError> {
        let Canonical {
            collector,
            readings,
            meter_id,
            ts,
            channel,
            value,
            unit,
            quality,
            address,
            protocol,
            ..
        } = match fast::canonical(payload) {
            Some(c) => c,
            None => parse_json(payload)?,
        };
        let collector: &str = match &collector {
            Some(c) => &c.0,
            None => &self.limits.collector,
        };
        let one;
        let list: &[CanonicalReading] = if let Some(r) = &readings {
            r
        } else if meter_id.is_some() {
            one = [CanonicalReading {
                meter_id,
                ts,
                channel,
                value,
                unit,
                quality,
                address,
                protocol,
            }];
            &one
        } else {
            return Err(DecodeError::MissingField("readings".into()));
        };
        out.readings.reserve(list.len());
        for r in list {
            match self.canonical_one(r, topic, collector, now) {
                Ok((reading, rounded)) => {
                    out.rounded += rounded as usize;
                    out.readings.push(reading);
                }
                Err(e) => out.problems.push(e),
            }
        }
        Ok(())
    }

    fn canonical_one(
        &self,
        r: &CanonicalReading,
        topic: &str,
        collector: &str,
        now: i64,
    ) -> Result<(Reading, bool), DecodeError> {
        let meter = r
            .meter_id
            .as_ref()
            .ok_or_else(|| DecodeError::MissingField("meter_id".into()))?;
        let meter = self.meter_for(&[meter.0.as_ref()])?;
        let ch_name: &str = &r
            .channel
            .as_ref()
            .ok_or_else(|| DecodeError::MissingField("channel".into()))?
            .0;
        // Readings in a row mostly name one channel: one compare, not a
        // match over every channel name.
        let channel = match self.texts.channel.get() {
            Some(c) if c.as_str() == ch_name => c,
            _ => {
                let c: Channel = ch_name
                    .parse()
                    .map_err(|_| DecodeError::UnknownChannel(ch_name.to_string()))?;
                self.texts.channel.set(Some(c));
                c
            }
        };
        if let Some(u) = &r.unit {
            if u.0 != channel.unit() {
                return Err(DecodeError::WrongUnit {
                    unit: u.0.to_string(),
                    channel: ch_name.to_string(),
                    want: channel.unit().to_string(),
                });
            }
        }
        let ts =
            r.ts.as_ref()
                .ok_or_else(|| DecodeError::MissingField("ts".into()))?;
        let ts_ms = self.check_ts(ts.timestamp(TsFormat::Auto, 0, "ts")?, now)?;
        let value = r
            .value
            .as_ref()
            .ok_or_else(|| DecodeError::MissingField("value".into()))?;
        let (value, rounded) = self.fit(value.number("value")?)?;
        let quality = match &r.quality {
            None => Quality::OK,
            Some(q) => Quality::parse(&q.0).map_err(DecodeError::WrongType)?,
        };
        let protocol = match &r.protocol {
            None => Protocol::Mqtt,
            Some(p) => Protocol::parse(&p.0)
                .ok_or_else(|| DecodeError::WrongType(format!("protocol '{}'", p.0)))?,
        };
        Ok((
            Reading {
                meter_id: meter,
                ts_ms,
                channel,
                value,
                quality,
                source: Source {
                    protocol,
                    collector: shared(&self.texts.collector, collector),
                    address: shared(
                        &self.texts.address,
                        match &r.address {
                            Some(a) => &a.0,
                            None => topic,
                        },
                    ),
                },
                received_ms: now,
            },
            rounded,
        ))
    }

    fn values(
        &self,
        topic: &str,
        payload: &[u8],
        now: i64,
        out: &mut Decoded,
    ) -> Result<(), DecodeError> {
        let v: Value = parse_json(payload)?;
        let obj = v
            .as_object()
            .ok_or_else(|| DecodeError::WrongType("payload is not an object".into()))?;
        let node = str_field(obj.get("node"), "node")?;
        let group = obj.get("group").and_then(Value::as_str).unwrap_or("");
        let key = format!("{group}/{node}");
        let meter = self.meter_for(&[node, &key])?;
        let ts = match obj.get("timestamp") {
            Some(t) => self.check_ts(
                ts_from(
                    t,
                    self.src.ts_format,
                    self.src.tz_offset_minutes,
                    "timestamp",
                )?,
                now,
            )?,
            None => {
                out.stamped = true;
                now
            }
        };
        let values = obj
            .get("values")
            .ok_or_else(|| DecodeError::MissingField("values".into()))?
            .as_object()
            .ok_or_else(|| DecodeError::WrongType("values is not an object".into()))?;
        for (tag, val) in values {
            if val.is_null() {
                continue;
            }
            self.push(
                out,
                &meter,
                tag,
                ts,
                number(val, tag),
                topic,
                Quality::OK,
                now,
            );
        }
        if let Some(errs) = obj.get("errors").and_then(Value::as_object) {
            for (tag, code) in errs {
                out.problems.push(DecodeError::DeviceError {
                    field: tag.clone(),
                    code: code.to_string(),
                });
            }
        }
        Ok(())
    }

    fn tasmota(
        &self,
        topic: &str,
        payload: &[u8],
        now: i64,
        out: &mut Decoded,
    ) -> Result<(), DecodeError> {
        let v: Value = parse_json(payload)?;
        let obj = v
            .as_object()
            .ok_or_else(|| DecodeError::WrongType("payload is not an object".into()))?;
        // tele/<device>/SENSOR (or a custom full topic: the level before SENSOR).
        let levels: Vec<&str> = topic.split('/').collect();
        let device = if levels.len() >= 2 {
            levels[levels.len() - 2]
        } else {
            topic
        };
        let meter = self.meter_for(&[device, topic])?;
        let ts = match obj.get("Time") {
            Some(t) => self.check_ts(
                ts_from(t, self.src.ts_format, self.src.tz_offset_minutes, "Time")?,
                now,
            )?,
            None => {
                out.stamped = true;
                now
            }
        };
        let mut fields = Vec::new();
        for (k, val) in obj {
            if k != "Time" {
                flatten(k, val, &mut fields);
            }
        }
        for (field, val) in fields {
            self.push(
                out,
                &meter,
                &field,
                ts,
                number(val, &field),
                topic,
                Quality::OK,
                now,
            );
        }
        Ok(())
    }

    fn shelly(
        &self,
        topic: &str,
        payload: &[u8],
        now: i64,
        out: &mut Decoded,
    ) -> Result<(), DecodeError> {
        let v: Value = parse_json(payload)?;
        let obj = v
            .as_object()
            .ok_or_else(|| DecodeError::WrongType("payload is not an object".into()))?;
        let method = obj.get("method").and_then(Value::as_str).unwrap_or("");
        if method != "NotifyStatus" && method != "NotifyFullStatus" {
            // NotifyEvent and friends carry no measurements.
            return Ok(());
        }
        let src = str_field(obj.get("src"), "src")?;
        let meter = self.meter_for(&[src])?;
        let params = obj
            .get("params")
            .and_then(Value::as_object)
            .ok_or_else(|| DecodeError::MissingField("params".into()))?;
        let ts = match params.get("ts") {
            Some(t) => self.check_ts(ts_from(t, TsFormat::S, 0, "params.ts")?, now)?,
            None => {
                out.stamped = true;
                now
            }
        };
        let mut fields = Vec::new();
        for (k, val) in params {
            if k != "ts" {
                flatten(k, val, &mut fields);
            }
        }
        for (field, val) in fields {
            // Component ids and error lists are not measurements.
            if field.ends_with(".id") {
                continue;
            }
            self.push(
                out,
                &meter,
                &field,
                ts,
                number(val, &field),
                topic,
                Quality::OK,
                now,
            );
        }
        Ok(())
    }

    fn sparkplug(
        &mut self,
        topic: &str,
        payload: &[u8],
        now: i64,
        out: &mut Decoded,
    ) -> Result<(), DecodeError> {
        let t = sparkplug::Topic::parse(topic)?;
        let p = sparkplug::decode_payload(payload)?;
        let o = self.sparkplug.handle(&t, &p);
        if o.rebirth_needed {
            out.rebirth = Some((
                t.rebirth_topic(),
                sparkplug::rebirth_request(now.max(0) as u64),
            ));
        }
        match t.kind {
            sparkplug::MessageType::NBirth | sparkplug::MessageType::DBirth => {
                out.birth_of = Some(t.node_key())
            }
            // A stale death (earlier session) must not dead-letter parked data.
            sparkplug::MessageType::NDeath if !o.stale_death => out.death_of = Some(t.node_key()),
            _ => {}
        }
        if o.needs_birth {
            out.park = Some(t.node_key());
            return Ok(());
        }
        self.sparkplug_values(o, topic, now, out);
        Ok(())
    }

    /// Decodes a parked Sparkplug message again with the aliases known now,
    /// as if at `received_ms` (its original receipt); `park` stays set while
    /// its birth is still missing.
    pub fn replay_parked(
        &mut self,
        topic: &str,
        payload: &[u8],
        received_ms: i64,
    ) -> Result<Decoded, DecodeError> {
        let t = sparkplug::Topic::parse(topic)?;
        let p = sparkplug::decode_payload(payload)?;
        let o = self.sparkplug.replay(&t, &p);
        let mut out = Decoded::default();
        if o.needs_birth {
            out.park = Some(t.node_key());
        } else {
            self.sparkplug_values(o, topic, received_ms, &mut out);
        }
        Ok(out)
    }

    fn sparkplug_values(
        &mut self,
        o: sparkplug::Outcome,
        topic: &str,
        now: i64,
        out: &mut Decoded,
    ) {
        for (edge, dev) in &o.offline {
            out.offline.push(match dev {
                Some(d) => format!("{edge}/{d}"),
                None => edge.clone(),
            });
        }
        out.problems
            .extend(o.problems.into_iter().map(DecodeError::Sparkplug));
        for nv in o.values {
            let full = match &nv.device {
                Some(d) => format!("{}/{}", nv.edge, d),
                None => nv.edge.clone(),
            };
            let keys: Vec<&str> = match &nv.device {
                Some(d) => vec![d.as_str(), full.as_str()],
                None => vec![nv.edge.as_str()],
            };
            let value = match nv.value {
                sparkplug::Value::Null => continue,
                // Text metrics (properties, names) are only a problem when mapped to a channel.
                sparkplug::Value::Text(s) => {
                    if self.channel_for(&nv.name).is_some() {
                        Err(DecodeError::BadNumber {
                            field: nv.name.clone(),
                            text: s,
                        })
                    } else {
                        continue;
                    }
                }
                sparkplug::Value::Number(d) => Ok(d),
            };
            let meter = match self.meter_for(&keys) {
                Ok(m) => m,
                Err(e) => {
                    out.problems.push(e);
                    continue;
                }
            };
            let ts = match nv.ts_ms {
                Some(ts) => match self.check_ts(ts, now) {
                    Ok(ts) => ts,
                    Err(e) => {
                        out.problems.push(e);
                        continue;
                    }
                },
                None => {
                    out.stamped = true;
                    now
                }
            };
            let mut q = if nv.after_death {
                Quality::OFFLINE
            } else {
                Quality::OK
            };
            // Flags a meterflow uplink sent in the metric's `quality` property.
            match nv.quality.as_deref().map(Quality::parse) {
                Some(Ok(f)) => q = q.with(f),
                Some(Err(e)) => out.problems.push(DecodeError::WrongType(e)),
                None => {}
            }
            self.push(out, &meter, &nv.name, ts, value, topic, q, now);
        }
    }

    fn json_map(
        &self,
        topic: &str,
        payload: &[u8],
        now: i64,
        out: &mut Decoded,
    ) -> Result<(), DecodeError> {
        let map = self
            .src
            .map
            .as_ref()
            .ok_or_else(|| DecodeError::MissingField("map".into()))?;
        let v: Value = parse_json(payload)?;
        let records: Vec<&Value> = match &map.each {
            None => vec![&v],
            Some(p) => v
                .pointer(p)
                .ok_or_else(|| DecodeError::MissingField(p.clone()))?
                .as_array()
                .ok_or_else(|| DecodeError::WrongType(format!("{p} is not an array")))?
                .iter()
                .collect(),
        };
        let levels: Vec<&str> = topic.split('/').collect();
        for rec in records {
            let device = match map.meter_id.strip_prefix("topic:") {
                Some(n) => {
                    let i: usize = n
                        .parse()
                        .map_err(|_| DecodeError::MissingField(map.meter_id.clone()))?;
                    levels
                        .get(i)
                        .copied()
                        .ok_or_else(|| DecodeError::MissingField(map.meter_id.clone()))?
                        .to_string()
                }
                None => match rec.pointer(&map.meter_id) {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Number(n)) => n.as_str().to_string(),
                    Some(_) => {
                        return Err(DecodeError::WrongType(format!(
                            "{} is not a string",
                            map.meter_id
                        )))
                    }
                    None => return Err(DecodeError::MissingField(map.meter_id.clone())),
                },
            };
            let meter = match self.meter_for(&[&device]) {
                Ok(m) => m,
                Err(e) => {
                    out.problems.push(e);
                    continue;
                }
            };
            let ts = match &map.ts {
                None => {
                    out.stamped = true;
                    now
                }
                Some(p) => {
                    let t = rec
                        .pointer(p)
                        .ok_or_else(|| DecodeError::MissingField(p.clone()));
                    match t
                        .and_then(|t| ts_from(t, self.src.ts_format, self.src.tz_offset_minutes, p))
                        .and_then(|t| self.check_ts(t, now))
                    {
                        Ok(t) => t,
                        Err(e) => {
                            out.problems.push(e);
                            continue;
                        }
                    }
                }
            };
            let mut fields: Vec<(&String, &String)> = map.values.iter().collect();
            fields.sort();
            for (field, ptr) in fields {
                match rec.pointer(ptr) {
                    None | Some(Value::Null) => {
                        out.problems.push(DecodeError::MissingField(ptr.clone()))
                    }
                    Some(val) => self.push(
                        out,
                        &meter,
                        field,
                        ts,
                        number(val, field),
                        topic,
                        Quality::OK,
                        now,
                    ),
                }
            }
        }
        Ok(())
    }

    fn channel_for(&self, field: &str) -> Option<ChannelMap> {
        self.channels.get(field).copied().or_else(|| {
            field.parse::<Channel>().ok().map(|channel| ChannelMap {
                channel,
                factor: Decimal::ONE,
            })
        })
    }

    /// Maps one field value to a reading, or records why it cannot be.
    #[allow(clippy::too_many_arguments)]
    fn push(
        &self,
        out: &mut Decoded,
        meter: &str,
        field: &str,
        ts_ms: i64,
        value: Result<Decimal, DecodeError>,
        topic: &str,
        quality: Quality,
        now: i64,
    ) {
        let Some(map) = self.channel_for(field) else {
            if self.unmapped == Unmapped::DeadLetter {
                out.problems.push(DecodeError::Unmapped(field.to_string()));
            }
            return;
        };
        let value = value.and_then(|v| {
            v.checked_mul(map.factor)
                .ok_or(DecodeError::ValueOutOfRange(v))
                .and_then(|v| self.fit(v))
        });
        match value {
            Ok((value, rounded)) => {
                out.rounded += rounded as usize;
                out.readings.push(Reading {
                    meter_id: meter.to_string(),
                    ts_ms,
                    channel: map.channel,
                    value,
                    quality,
                    source: Source {
                        protocol: Protocol::Mqtt,
                        collector: shared(&self.texts.collector, &self.limits.collector),
                        address: shared(&self.texts.address, topic),
                    },
                    received_ms: now,
                });
            }
            Err(e) => out.problems.push(e),
        }
    }

    /// Device key(s) -> meter id, checked against the known meters.
    fn meter_for(&self, keys: &[&str]) -> Result<String, DecodeError> {
        let mapped = keys.iter().find_map(|k| self.src.meters.get(*k));
        let id = match mapped {
            Some(m) => m.clone(),
            None if self.src.strict_meters => {
                return Err(DecodeError::UnknownMeter(keys[0].to_string()))
            }
            None => keys[0].to_string(),
        };
        if id.is_empty() {
            return Err(DecodeError::UnknownMeter(id));
        }
        if let Some(known) = &self.limits.known_meters {
            if !known.contains(&id) {
                return Err(DecodeError::UnknownMeter(id));
            }
        }
        Ok(id)
    }

    fn check_ts(&self, ts: i64, now: i64) -> Result<i64, DecodeError> {
        if ts < MIN_TS_MS || ts > now.saturating_add(self.limits.max_future_ms) {
            return Err(DecodeError::AbsurdTimestamp(ts));
        }
        Ok(ts)
    }

    /// Makes a value fit the lake's DECIMAL(18,4): rounds extra decimals
    /// (half to even) unless the source is `exact`.
    fn fit(&self, v: Decimal) -> Result<(Decimal, bool), DecodeError> {
        if crate::store::columns::to_scaled(v).is_ok() {
            return Ok((v, false));
        }
        if self.src.exact {
            return Err(DecodeError::ValueOutOfRange(v));
        }
        let r = v.round_dp_with_strategy(4, RoundingStrategy::MidpointNearestEven);
        crate::store::columns::to_scaled(r).map_err(|_| DecodeError::ValueOutOfRange(v))?;
        Ok((r, r != v))
    }
}

/// meterflow's canonical JSON: `{"v":1,"collector":..,"readings":[..]}` or one reading object.
/// Read without building a `Value`: strings borrow from the payload where
/// they have no escapes, numbers keep their text (the hot path of ingest).
#[derive(Debug, Deserialize)]
struct Canonical<'a> {
    #[allow(dead_code)]
    v: Option<u32>,
    #[serde(borrow)]
    collector: Option<JStr<'a>>,
    #[serde(borrow)]
    readings: Option<Vec<CanonicalReading<'a>>>,
    // A single reading may be sent bare (no serde flatten: it mangles
    // arbitrary-precision numbers).
    #[serde(borrow)]
    meter_id: Option<JStr<'a>>,
    #[serde(borrow)]
    ts: Option<Scalar<'a>>,
    #[serde(borrow)]
    channel: Option<JStr<'a>>,
    #[serde(borrow)]
    value: Option<Scalar<'a>>,
    #[serde(borrow)]
    unit: Option<JStr<'a>>,
    #[serde(borrow)]
    quality: Option<JStr<'a>>,
    #[serde(borrow)]
    address: Option<JStr<'a>>,
    #[serde(borrow)]
    protocol: Option<JStr<'a>>,
}

#[derive(Debug, Default, Deserialize)]
struct CanonicalReading<'a> {
    #[serde(borrow)]
    meter_id: Option<JStr<'a>>,
    #[serde(borrow)]
    ts: Option<Scalar<'a>>,
    #[serde(borrow)]
    channel: Option<JStr<'a>>,
    #[serde(borrow)]
    value: Option<Scalar<'a>>,
    #[serde(borrow)]
    unit: Option<JStr<'a>>,
    #[serde(borrow)]
    quality: Option<JStr<'a>>,
    #[serde(borrow)]
    address: Option<JStr<'a>>,
    #[serde(borrow)]
    protocol: Option<JStr<'a>>,
}

/// A JSON string, borrowed from the payload unless it had escapes.
#[derive(Debug)]
struct JStr<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for JStr<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = JStr<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<JStr<'a>, E> {
                Ok(JStr(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<JStr<'a>, E> {
                Ok(JStr(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<JStr<'a>, E> {
                Ok(JStr(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V(std::marker::PhantomData))
    }
}

/// A JSON scalar without a `Value` tree: numbers keep their exact text.
#[derive(Debug)]
enum Scalar<'a> {
    Number(Cow<'a, str>),
    Str(Cow<'a, str>),
    Bool(bool),
    /// An array or object (null is `None` of the `Option` around it).
    Other,
}

/// serde_json's `arbitrary_precision` hands a number over as a one-entry
/// map under this key, its value the number's text.
const NUMBER_TOKEN: &str = "$serde_json::private::Number";

impl<'de: 'a, 'a> Deserialize<'de> for Scalar<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, SeqAccess};
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = Scalar<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Scalar<'a>, E> {
                Ok(Scalar::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Scalar<'a>, E> {
                Ok(Scalar::Number(Cow::Owned(v.to_string())))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Scalar<'a>, E> {
                Ok(Scalar::Number(Cow::Owned(v.to_string())))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Scalar<'a>, E> {
                Ok(Scalar::Number(Cow::Owned(v.to_string())))
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Scalar<'a>, E> {
                Ok(Scalar::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Scalar<'a>, E> {
                Ok(Scalar::Str(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Scalar<'a>, E> {
                Ok(Scalar::Str(Cow::Owned(v)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Scalar<'a>, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Scalar<'a>, A::Error> {
                let Some(k) = a.next_key::<JStr<'_>>()? else {
                    return Ok(Scalar::Other);
                };
                if k.0 == NUMBER_TOKEN {
                    return Ok(Scalar::Number(Cow::Owned(a.next_value::<String>()?)));
                }
                a.next_value::<IgnoredAny>()?;
                while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other)
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

impl Scalar<'_> {
    /// Same rules as [`number`].
    fn number(&self, field: &str) -> Result<Decimal, DecodeError> {
        let text = match self {
            Scalar::Number(n) => n,
            Scalar::Str(s) => s.trim(),
            Scalar::Bool(b) => return Ok(Decimal::from(*b as u8)),
            Scalar::Other => {
                return Err(DecodeError::WrongType(format!("{field} is not a number")))
            }
        };
        parse_decimal(text).ok_or_else(|| DecodeError::BadNumber {
            field: field.to_string(),
            text: text.chars().take(64).collect(),
        })
    }

    /// Same rules as [`ts_from`].
    fn timestamp(
        &self,
        fmt: TsFormat,
        tz_offset_minutes: i32,
        field: &str,
    ) -> Result<i64, DecodeError> {
        match self {
            Scalar::Number(n) => ts_from_number_text(n, fmt, field),
            Scalar::Str(s) => ts_from_str(s, fmt, tz_offset_minutes, field),
            _ => Err(DecodeError::BadTimestamp(field.to_string())),
        }
    }
}

fn parse_json<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, DecodeError> {
    serde_json::from_slice(payload).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => DecodeError::WrongType(e.to_string()),
        _ => DecodeError::Json(e.to_string()),
    })
}

fn str_field<'a>(v: Option<&'a Value>, name: &str) -> Result<&'a str, DecodeError> {
    match v {
        None => Err(DecodeError::MissingField(name.into())),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(DecodeError::WrongType(format!("{name} is not a string"))),
    }
}

/// Numeric leaves of an object as dotted paths (`SML.Total_in`, `switch:0.aenergy.total`).
fn flatten<'a>(prefix: &str, v: &'a Value, out: &mut Vec<(String, &'a Value)>) {
    match v {
        Value::Object(m) => {
            for (k, val) in m {
                flatten(&format!("{prefix}.{k}"), val, out);
            }
        }
        Value::Number(_) => out.push((prefix.to_string(), v)),
        _ => {}
    }
}

/// Exact decimal from a JSON number's text or a numeric string.
pub fn number(v: &Value, field: &str) -> Result<Decimal, DecodeError> {
    let text = match v {
        Value::Number(n) => n.as_str(),
        Value::String(s) => s.trim(),
        Value::Bool(b) => return Ok(Decimal::from(*b as u8)),
        _ => return Err(DecodeError::WrongType(format!("{field} is not a number"))),
    };
    parse_decimal(text).ok_or_else(|| DecodeError::BadNumber {
        field: field.to_string(),
        text: text.chars().take(64).collect(),
    })
}

/// Decimal from text, with or without exponent; None if out of range or not a number.
pub fn parse_decimal(text: &str) -> Option<Decimal> {
    if text.contains(['e', 'E']) {
        Decimal::from_scientific(text).ok()
    } else {
        Decimal::from_str_exact(text).ok()
    }
}

/// Timestamp in UTC ms from a number (ms or s) or a string (RFC 3339, or
/// zone-less local time shifted by `tz_offset_minutes`).
pub fn ts_from(
    v: &Value,
    fmt: TsFormat,
    tz_offset_minutes: i32,
    field: &str,
) -> Result<i64, DecodeError> {
    match v {
        Value::Number(n) => ts_from_number_text(n.as_str(), fmt, field),
        Value::String(s) => ts_from_str(s, fmt, tz_offset_minutes, field),
        _ => Err(DecodeError::BadTimestamp(field.to_string())),
    }
}

fn ts_from_number_text(text: &str, fmt: TsFormat, field: &str) -> Result<i64, DecodeError> {
    let d = parse_decimal(text).ok_or_else(|| DecodeError::BadTimestamp(field.to_string()))?;
    ts_from_decimal(d, fmt, field)
}

fn ts_from_decimal(d: Decimal, fmt: TsFormat, field: &str) -> Result<i64, DecodeError> {
    let bad = || DecodeError::BadTimestamp(field.to_string());
    let secs = match fmt {
        TsFormat::Ms => false,
        TsFormat::S => true,
        TsFormat::Auto => d.abs() < Decimal::from(100_000_000_000i64),
        TsFormat::Rfc3339 => return Err(bad()),
    };
    let ms = if secs {
        d.checked_mul(Decimal::ONE_THOUSAND).ok_or_else(bad)?
    } else {
        d
    };
    ms.trunc().to_i64().ok_or_else(bad)
}

fn ts_from_str(
    s: &str,
    fmt: TsFormat,
    tz_offset_minutes: i32,
    field: &str,
) -> Result<i64, DecodeError> {
    let bad = || DecodeError::BadTimestamp(field.to_string());
    if let Some(d) = parse_decimal(s.trim()) {
        return ts_from_decimal(d, fmt, field);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    let naive = NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
        .or_else(|_| NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f"))
        .map_err(|_| bad())?;
    Ok(naive.and_utc().timestamp_millis() - i64::from(tz_offset_minutes) * 60_000)
}

/// Built-in field -> channel maps (config entries override them).
fn default_channels(format: Format) -> Vec<(String, ChannelSpec)> {
    let spec = |c: &str, u: &str| ChannelSpec::Full {
        channel: c.to_string(),
        unit: Some(u.to_string()),
        scale: None,
    };
    match format {
        Format::Tasmota => [
            ("SML.Total_in", "import_active_total", "kWh"),
            ("SML.Total_out", "export_active_total", "kWh"),
            ("SML.Power_curr", "active_power_total", "W"),
            ("ENERGY.Total", "import_active_total", "kWh"),
            ("ENERGY.Power", "active_power_total", "W"),
            ("ENERGY.ApparentPower", "apparent_power_total", "VA"),
            ("ENERGY.ReactivePower", "reactive_power_total", "var"),
            ("ENERGY.Factor", "power_factor_total", "1"),
            ("ENERGY.Voltage", "voltage_a", "V"),
            ("ENERGY.Current", "current_a", "A"),
            ("ENERGY.Frequency", "frequency", "Hz"),
        ]
        .iter()
        .map(|(k, c, u)| (k.to_string(), spec(c, u)))
        .collect(),
        Format::Shelly => {
            let mut v: Vec<(String, ChannelSpec)> = [
                ("em:0.total_act_power", "active_power_total", "W"),
                ("em:0.total_aprt_power", "apparent_power_total", "VA"),
                ("emdata:0.total_act", "import_active_total", "Wh"),
                ("emdata:0.total_act_ret", "export_active_total", "Wh"),
                ("switch:0.apower", "active_power_total", "W"),
                ("switch:0.voltage", "voltage_a", "V"),
                ("switch:0.current", "current_a", "A"),
                ("switch:0.freq", "frequency", "Hz"),
                ("switch:0.aenergy.total", "import_active_total", "Wh"),
            ]
            .iter()
            .map(|(k, c, u)| (k.to_string(), spec(c, u)))
            .collect();
            for p in ["a", "b", "c"] {
                v.push((
                    format!("em:0.{p}_voltage"),
                    spec(&format!("voltage_{p}"), "V"),
                ));
                v.push((
                    format!("em:0.{p}_current"),
                    spec(&format!("current_{p}"), "A"),
                ));
                v.push((
                    format!("em:0.{p}_act_power"),
                    spec(&format!("active_power_{p}"), "W"),
                ));
            }
            v
        }
        _ => Vec::new(),
    }
}

mod fast;
#[cfg(test)]
mod tests;

/// Encodes readings as canonical JSON (the uplink and `mqtt publish-sim` use this).
/// Values are written as JSON numbers with every digit of the decimal.
pub fn encode_canonical(collector: &str, readings: &[Reading]) -> Vec<u8> {
    use std::fmt::Write as _;
    let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    let mut s = String::with_capacity(64 + readings.len() * 160);
    let _ = write!(s, "{{\"v\":1,\"collector\":{},\"readings\":[", q(collector));
    for (i, r) in readings.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(
            s,
            "{{\"meter_id\":{},\"ts\":{},\"channel\":\"{}\",\"value\":{},\"unit\":{},\"quality\":\"{}\",\"protocol\":\"{}\",\"address\":{}}}",
            q(&r.meter_id),
            r.ts_ms,
            r.channel.as_str(),
            r.value,
            q(r.channel.unit()),
            r.quality,
            r.source.protocol.as_str(),
            q(&r.source.address),
        );
    }
    s.push_str("]}");
    s.into_bytes()
}
