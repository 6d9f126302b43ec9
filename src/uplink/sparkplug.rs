//! The uplink as a Sparkplug B edge node. Pure: readings in, (topic,
//! payload) messages out; the publisher in `uplink/mod.rs` does the IO.
//!
//! One edge node (`spBv1.0/<group>/.../<edge>`) per collector; each meter is
//! a device named by its meter id. Per MQTT session:
//!
//! - the will is `NDEATH` carrying `bdSeq`; `NBIRTH` (seq 0) carries the same
//!   `bdSeq` and `Node Control/Rebirth` = false;
//! - a meter's first readings (or a channel it has not declared yet) are
//!   preceded by its `DBIRTH`: one metric per channel, named after the channel
//!   (`import_active_total`), with an alias unique within the node, datatype
//!   Int64 and property `decimalScale` = 4; birth values are null, so a
//!   rebirth never repeats a reading;
//! - readings go out as `DDATA` by alias, one metric per reading with its own
//!   timestamp, value = the decimal times 10^4 as Int64 (exact for every value
//!   the lake's DECIMAL(18,4) holds), and quality flags other than ok in a
//!   String property `quality`;
//! - seq counts 0..=255 over NBIRTH, DBIRTH and DDATA and wraps;
//! - an `NCMD` with `Node Control/Rebirth` = true is answered by `births`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rust_decimal::Decimal;

use crate::model::{Channel, Reading};
use crate::protocol::sparkplug::{
    datatype, encode_payload, Metric, MetricValue, Payload, PropertyKind, PropertySet, NAMESPACE,
    QUALITY,
};
use crate::store::schema::VALUE_SCALE;

/// Scale declared in every DBIRTH: the lake's.
pub const BIRTH_SCALE: u32 = VALUE_SCALE as u32;

pub const REBIRTH: &str = "Node Control/Rebirth";
pub const BD_SEQ: &str = "bdSeq";

/// One MQTT message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    /// DDATA (carries readings) rather than a birth or death.
    pub data: bool,
}

/// True if `id` can be a Sparkplug group, edge node or device id.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && !id.contains(['/', '+', '#'])
}

/// Edge-node state of one MQTT session.
#[derive(Debug)]
pub struct EdgeNode {
    group: String,
    edge: String,
    bd_seq: u64,
    next_seq: u8,
    aliases: HashMap<(String, Channel), u64>,
    next_alias: u64,
    /// Devices born in this session and the channels their birth declared.
    born: BTreeMap<String, BTreeSet<Channel>>,
}

impl EdgeNode {
    pub fn new(group: &str, edge: &str, bd_seq: u8) -> EdgeNode {
        EdgeNode {
            group: group.to_string(),
            edge: edge.to_string(),
            bd_seq: u64::from(bd_seq),
            next_seq: 0,
            aliases: HashMap::new(),
            next_alias: 1,
            born: BTreeMap::new(),
        }
    }

    fn topic(&self, kind: &str, device: Option<&str>) -> String {
        match device {
            Some(d) => format!("{NAMESPACE}/{}/{kind}/{}/{d}", self.group, self.edge),
            None => format!("{NAMESPACE}/{}/{kind}/{}", self.group, self.edge),
        }
    }

    /// Topic the node listens on for commands.
    pub fn ncmd_topic(&self) -> String {
        self.topic("NCMD", None)
    }

    fn seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq = s.wrapping_add(1);
        u64::from(s)
    }

    fn bd_seq_metric(&self) -> Metric {
        Metric {
            name: Some(BD_SEQ.into()),
            datatype: Some(datatype::UINT64),
            value: Some(MetricValue::LongValue(self.bd_seq)),
            ..Default::default()
        }
    }

    /// The NDEATH to register as the MQTT will before connecting.
    pub fn death(&self, now_ms: u64) -> Message {
        Message {
            topic: self.topic("NDEATH", None),
            payload: encode_payload(&Payload {
                timestamp: Some(now_ms),
                metrics: vec![self.bd_seq_metric()],
                ..Default::default()
            }),
            data: false,
        }
    }

    /// NBIRTH (seq restarts at 0) and a DBIRTH for every device born so far:
    /// sent after CONNACK and in answer to a rebirth command.
    pub fn births(&mut self, now_ms: u64) -> Vec<Message> {
        self.next_seq = 0;
        let nbirth = Payload {
            timestamp: Some(now_ms),
            metrics: vec![
                self.bd_seq_metric(),
                Metric {
                    name: Some(REBIRTH.into()),
                    datatype: Some(datatype::BOOLEAN),
                    value: Some(MetricValue::BooleanValue(false)),
                    ..Default::default()
                },
            ],
            seq: Some(self.seq()),
            ..Default::default()
        };
        let mut out = vec![Message {
            topic: self.topic("NBIRTH", None),
            payload: encode_payload(&nbirth),
            data: false,
        }];
        let devices: Vec<String> = self.born.keys().cloned().collect();
        for d in devices {
            out.push(self.device_birth(&d, now_ms));
        }
        out
    }

    fn device_birth(&mut self, device: &str, now_ms: u64) -> Message {
        let channels: Vec<Channel> = self
            .born
            .get(device)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        let metrics = channels
            .iter()
            .map(|c| Metric {
                name: Some(c.as_str().to_string()),
                alias: Some(self.alias(device, *c)),
                timestamp: Some(now_ms),
                datatype: Some(datatype::INT64),
                is_null: Some(true),
                properties: Some(PropertySet::decimal_scale(BIRTH_SCALE)),
                ..Default::default()
            })
            .collect();
        let p = Payload {
            timestamp: Some(now_ms),
            metrics,
            seq: Some(self.seq()),
            ..Default::default()
        };
        Message {
            topic: self.topic("DBIRTH", Some(device)),
            payload: encode_payload(&p),
            data: false,
        }
    }

    fn alias(&mut self, device: &str, c: Channel) -> u64 {
        if let Some(a) = self.aliases.get(&(device.to_string(), c)) {
            return *a;
        }
        let a = self.next_alias;
        self.next_alias += 1;
        self.aliases.insert((device.to_string(), c), a);
        a
    }

    /// Messages carrying `readings`: per meter (in order of first
    /// appearance) a DBIRTH when needed, then one DDATA. Meter ids must pass
    /// `valid_id`.
    pub fn data(&mut self, readings: &[Reading], now_ms: u64) -> Vec<Message> {
        let mut order: Vec<&str> = Vec::new();
        let mut by_meter: HashMap<&str, Vec<&Reading>> = HashMap::new();
        for r in readings {
            let v = by_meter.entry(r.meter_id.as_str()).or_default();
            if v.is_empty() {
                order.push(r.meter_id.as_str());
            }
            v.push(r);
        }
        let mut out = Vec::new();
        for meter in order {
            let rs = &by_meter[meter];
            let declared = self.born.entry(meter.to_string()).or_default();
            let before = declared.len();
            let fresh = before == 0;
            declared.extend(rs.iter().map(|r| r.channel));
            if fresh || declared.len() != before {
                out.push(self.device_birth(meter, now_ms));
            }
            let metrics = rs
                .iter()
                .map(|r| {
                    let mut m = value_metric(r.value);
                    if !r.quality.is_ok() {
                        m.properties.get_or_insert_with(PropertySet::default).set(
                            QUALITY,
                            PropertyKind::StringValue(r.quality.to_string()),
                            datatype::STRING,
                        );
                    }
                    m.alias = Some(self.alias(meter, r.channel));
                    m.timestamp = Some(r.ts_ms.max(0) as u64);
                    m
                })
                .collect();
            let p = Payload {
                timestamp: Some(now_ms),
                metrics,
                seq: Some(self.seq()),
                ..Default::default()
            };
            out.push(Message {
                topic: self.topic("DDATA", Some(meter)),
                payload: encode_payload(&p),
                data: true,
            });
        }
        out
    }
}

/// A DDATA metric (alias and timestamp still to set) holding `v` exactly:
/// Int64 at the birth's scale when it fits, else Int64 with its own
/// `decimalScale`, else (a mantissa beyond 64 bits) the decimal as a String.
pub fn value_metric(v: Decimal) -> Metric {
    let n = v.normalize();
    let long = |m: i128| {
        i64::try_from(m)
            .ok()
            .map(|m| MetricValue::LongValue(m as u64))
    };
    if n.scale() <= BIRTH_SCALE {
        let at_birth = n
            .mantissa()
            .checked_mul(10i128.pow(BIRTH_SCALE - n.scale()))
            .and_then(long);
        if let Some(value) = at_birth {
            return Metric {
                value: Some(value),
                ..Default::default()
            };
        }
    }
    match long(n.mantissa()) {
        Some(value) => Metric {
            datatype: Some(datatype::INT64),
            properties: Some(PropertySet::decimal_scale(n.scale())),
            value: Some(value),
            ..Default::default()
        },
        None => Metric {
            datatype: Some(datatype::STRING),
            value: Some(MetricValue::StringValue(n.to_string())),
            ..Default::default()
        },
    }
}

/// True if an NCMD payload asks for a rebirth.
pub fn is_rebirth_request(payload: &[u8]) -> bool {
    crate::protocol::sparkplug::decode_payload(payload).is_ok_and(|p| {
        p.metrics.iter().any(|m| {
            m.name.as_deref() == Some(REBIRTH)
                && matches!(m.value, Some(MetricValue::BooleanValue(true)))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, Quality, Source};
    use crate::protocol::sparkplug::{self, decode_payload, rebirth_request, State, Topic, Value};
    use rust_decimal_macros::dec;

    fn r(meter: &str, ch: Channel, ts: i64, v: Decimal) -> Reading {
        Reading {
            meter_id: meter.into(),
            ts_ms: ts,
            channel: ch,
            value: v,
            quality: Quality::OK,
            source: Source {
                protocol: Protocol::Sim,
                collector: "c".into(),
                address: "a".into(),
            },
            received_ms: ts,
        }
    }

    /// Feeds messages to the ingest-side state machine; returns the values.
    fn ingest(state: &mut State, msgs: &[Message]) -> Vec<sparkplug::NamedValue> {
        let mut out = vec![];
        for m in msgs {
            let o = state.handle(
                &Topic::parse(&m.topic).unwrap(),
                &decode_payload(&m.payload).unwrap(),
            );
            assert!(!o.rebirth_needed, "{}: {o:?}", m.topic);
            assert!(o.problems.is_empty(), "{}: {o:?}", m.topic);
            // Birth metrics have null values: not readings.
            out.extend(o.values.into_iter().filter(|v| v.value != Value::Null));
        }
        out
    }

    #[test]
    fn births_data_and_death_round_trip_exactly_through_the_ingest_state() {
        let mut node = EdgeNode::new("plant", "sub-7", 3);
        let death = decode_payload(&node.death(1).payload).unwrap();
        assert_eq!(
            death.metrics[0].value,
            Some(MetricValue::LongValue(3)),
            "NDEATH carries bdSeq"
        );
        let mut state = State::new();
        let births = node.births(1);
        assert_eq!(births.len(), 1);
        assert_eq!(births[0].topic, "spBv1.0/plant/NBIRTH/sub-7");
        let nb = decode_payload(&births[0].payload).unwrap();
        assert_eq!(nb.seq, Some(0));
        assert_eq!(nb.metrics[0].value, Some(MetricValue::LongValue(3)));
        assert_eq!(nb.metrics[1].name.as_deref(), Some(REBIRTH));
        ingest(&mut state, &births);

        let values = [
            dec!(12345678901234.5678),
            dec!(-99999999999999.9999),
            dec!(0.0001),
            dec!(0.1),
            dec!(10.50),
            dec!(0),
            dec!(1.123456789), // more decimals than the lake: own scale
            dec!(79228162514264337593543950335), // beyond i64: string
        ];
        let rs: Vec<Reading> = values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let ch = if i % 2 == 0 {
                    Channel::ImportActiveTotal
                } else {
                    Channel::ExportActiveTotal
                };
                r(&format!("m{}", i % 3), ch, 1_700_000_000_000 + i as i64, *v)
            })
            .collect();
        let msgs = node.data(&rs, 2);
        // m0, m1, m2: a DBIRTH and a DDATA each.
        assert_eq!(msgs.iter().filter(|m| m.data).count(), 3);
        assert_eq!(msgs.len(), 6);
        assert_eq!(msgs[0].topic, "spBv1.0/plant/DBIRTH/sub-7/m0");
        let dd = decode_payload(&msgs[1].payload).unwrap();
        assert!(dd.metrics.iter().all(|m| m.name.is_none()), "by alias");
        let mut got: Vec<(String, i64, Value)> = vec![];
        let mut st = State::new();
        ingest(&mut st, &node.births(3)); // fresh receiver: rebirth first
        let msgs = node.data(&rs, 4);
        // Already born in this session: DDATA only.
        assert_eq!(msgs.len(), 3);
        for v in ingest(&mut st, &msgs) {
            got.push((v.device.unwrap(), v.ts_ms.unwrap(), v.value));
        }
        got.sort_by_key(|g| g.1);
        for (i, (dev, ts, v)) in got.iter().enumerate() {
            assert_eq!(dev, &format!("m{}", i % 3));
            assert_eq!(*ts, 1_700_000_000_000 + i as i64);
            if i == 7 {
                assert_eq!(v, &Value::Text(values[i].to_string()));
            } else {
                assert_eq!(v, &Value::Number(values[i]), "value {i}");
            }
        }
    }

    #[test]
    fn seq_wraps_and_a_new_channel_rebirths_the_device() {
        let mut node = EdgeNode::new("g", "e", 0);
        let mut state = State::new();
        ingest(&mut state, &node.births(0));
        for k in 0..300 {
            let msgs = node.data(
                &[r("m", Channel::ImportActiveTotal, 1, Decimal::from(k))],
                0,
            );
            ingest(&mut state, &msgs);
        }
        // 1 NBIRTH + 1 DBIRTH + 300 DDATA: the next seq is 302 mod 256.
        let msgs = node.data(&[r("m", Channel::ActivePowerTotal, 1, dec!(1.5))], 0);
        assert_eq!(msgs.len(), 2, "new channel: DBIRTH again");
        let b = decode_payload(&msgs[0].payload).unwrap();
        assert_eq!(b.seq, Some(46));
        assert_eq!(b.metrics.len(), 2);
        let v = ingest(&mut state, &msgs);
        assert_eq!(v[0].name, "active_power_total");
        assert_eq!(v[0].value, Value::Number(dec!(1.5)));
    }

    #[test]
    fn rebirth_request_is_recognised_and_births_cover_every_device() {
        assert!(is_rebirth_request(&rebirth_request(5)));
        assert!(!is_rebirth_request(b"\xff\xff"));
        let mut node = EdgeNode::new("g", "e", 9);
        node.births(0);
        node.data(
            &[
                r("a", Channel::ImportActiveTotal, 1, dec!(1)),
                r("b", Channel::ImportActiveTotal, 1, dec!(2)),
            ],
            0,
        );
        let again = node.births(0);
        let topics: Vec<&str> = again.iter().map(|m| m.topic.as_str()).collect();
        assert_eq!(
            topics,
            [
                "spBv1.0/g/NBIRTH/e",
                "spBv1.0/g/DBIRTH/e/a",
                "spBv1.0/g/DBIRTH/e/b"
            ]
        );
        // Birth values are null: a rebirth repeats no reading.
        let mut state = State::new();
        for m in &again {
            let o = state.handle(
                &Topic::parse(&m.topic).unwrap(),
                &decode_payload(&m.payload).unwrap(),
            );
            assert!(o.values.iter().all(|v| v.value == Value::Null), "{o:?}");
        }
    }

    #[test]
    fn quality_flags_travel_as_a_property() {
        let mut node = EdgeNode::new("g", "e", 0);
        let mut state = State::new();
        ingest(&mut state, &node.births(0));
        let mut flagged = r("m", Channel::ImportActiveTotal, 1, dec!(1.123456789));
        flagged.quality = Quality::parse("clock_skew").unwrap();
        let msgs = node.data(
            &[flagged, r("m", Channel::ImportActiveTotal, 2, dec!(2))],
            0,
        );
        let v = ingest(&mut state, &msgs);
        assert_eq!(v[0].quality.as_deref(), Some("clock_skew"));
        assert_eq!(
            v[0].value,
            Value::Number(dec!(1.123456789)),
            "scale and quality together"
        );
        assert_eq!(v[1].quality, None);
    }

    #[test]
    fn ids_with_topic_characters_are_not_valid() {
        assert!(valid_id("K0001"));
        for bad in ["", "a/b", "a+", "#"] {
            assert!(!valid_id(bad));
        }
    }
}
