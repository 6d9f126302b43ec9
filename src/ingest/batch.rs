//! Decoding a batch of publishes into one spool job.
//!
//! The publishes become readings and dead letters. Sparkplug data that waits
//! for a birth is parked (see `park`), then replayed or dead-lettered later.
//! Everything here is pure except the metrics counters.
//!
//! Receive stamps: a message whose readings (some of them) carry no
//! timestamp gets the receive time, and so does a message dead-lettered in
//! whole or part (a dead letter's `received_at`); its (hash of topic and
//! payload -> that time) goes to the spool with its rows. A copy the broker
//! redelivers (DUP set) whose hash is remembered is decoded as if received
//! then, so it yields the same rows, which compaction merges. Messages
//! without DUP are never matched: the same payload twice from a meter that
//! did not move is two readings.

use rumqttc::{Publish, QoS};
use sha2::{Digest, Sha256};

use super::decode::{DecodeError, Decoded, Decoder};
use super::mqtt::{topic_matches, IngestStats};
use super::park::{ParkedMsg, Parking, Unreadable};
use super::session::ConnId;
use crate::metrics;
use crate::model::{Protocol, Reading};
use crate::protocol::sparkplug;
use crate::store::spool::{Stamp, Stamps};
use crate::store::QuarantineRecord;

/// Dead-lettered payloads keep at most this many bytes.
const MAX_KEPT_PAYLOAD: usize = 64 * 1024;
/// Dead-letter reasons keep at most this many bytes: a message can have a
/// problem per metric, and its spool record must stay small enough to replay.
const MAX_REASON_BYTES: usize = 4 * 1024;
/// Problems named in one reason; the rest are only counted.
const MAX_REASON_PROBLEMS: usize = 20;

/// Decoded messages on their way to the spool, with what to send once durable.
#[derive(Default)]
pub struct Job {
    pub readings: Vec<Reading>,
    pub dead: Vec<QuarantineRecord>,
    /// Messages to park: written durably before the acks.
    pub park: Vec<ParkedMsg>,
    /// Parked messages whose readings or dead letters are in this job:
    /// forgotten once the job is durable.
    pub release: Vec<String>,
    /// Receive stamps of this job's messages: durable with its readings.
    pub stamps: Vec<Stamp>,
    pub durable: Durable,
}

/// What to send once a job's spool write returned Ok.
#[derive(Default)]
pub struct Durable {
    /// Messages to acknowledge, in order, grouped by the connection they came on.
    pub acks: Vec<(ConnId, Vec<Publish>)>,
    pub rebirths: Vec<(String, Vec<u8>)>,
}

impl Durable {
    /// Queues acks after those already queued.
    /// One message (no vector per message on the hot path).
    fn ack_one(&mut self, conn: ConnId, p: Publish) {
        match self.acks.last_mut() {
            Some((c, ps)) if *c == conn => ps.push(p),
            _ => self.acks.push((conn, vec![p])),
        }
    }

    fn ack(&mut self, conn: ConnId, publishes: Vec<Publish>) {
        match self.acks.last_mut() {
            Some((c, ps)) if *c == conn => ps.extend(publishes),
            _ => self.acks.push((conn, publishes)),
        }
    }
}

impl Job {
    pub fn is_empty(&self) -> bool {
        self.readings.is_empty()
            && self.dead.is_empty()
            && self.park.is_empty()
            && self.release.is_empty()
            && self.stamps.is_empty()
            && self.durable.acks.is_empty()
            && self.durable.rebirths.is_empty()
    }

    /// Appends a later job (group commit keeps the order).
    pub fn extend(&mut self, more: Job) {
        self.readings.extend(more.readings);
        self.dead.extend(more.dead);
        self.park.extend(more.park);
        self.release.extend(more.release);
        self.stamps.extend(more.stamps);
        for (conn, ps) in more.durable.acks {
            self.durable.ack(conn, ps);
        }
        self.durable.rebirths.extend(more.durable.rebirths);
    }
}

/// The decoders of every source and the Sparkplug messages waiting for births.
pub struct Decoding {
    decoders: Vec<Decoder>,
    names: Vec<String>,
    parking: Parking,
    park_ms: i64,
    park_max: usize,
    /// Readings per message in the last batch: sizes the next batch's
    /// readings at once instead of growing (and copying) them as they come.
    per_message: usize,
    /// Receive stamps of the last `redelivery_window` stamped messages (as
    /// the lake keeps them).
    stamps: Stamps,
}

impl Decoding {
    /// `redelivery_window`: how many stamped messages are remembered
    /// (`[ingest] redelivery_window`, the same as the lake's window).
    pub fn new(
        decoders: Vec<Decoder>,
        park_secs: u64,
        park_max: usize,
        redelivery_window: usize,
    ) -> Decoding {
        let names = decoders.iter().map(|d| d.source().name.clone()).collect();
        Decoding {
            decoders,
            names,
            parking: Parking::default(),
            park_ms: park_secs.saturating_mul(1000).min(i64::MAX as u64) as i64,
            park_max,
            per_message: 1,
            stamps: Stamps::new(redelivery_window),
        }
    }

    /// Takes the receive stamps the lake kept (`Lake::stamps`), oldest first.
    pub fn remember(&mut self, stamps: impl IntoIterator<Item = Stamp>) {
        for s in stamps {
            self.stamps.insert(s);
        }
    }

    /// Takes back what a previous run left parked. Returns the first job:
    /// rebirth requests for those nodes, and dead letters for what cannot wait.
    pub fn restore(
        &mut self,
        parked: Vec<ParkedMsg>,
        unreadable: Vec<Unreadable>,
        now: i64,
    ) -> Job {
        let mut job = Job::default();
        for u in unreadable {
            job.dead.push(dead_letter(
                now,
                "",
                &format!("parked/{}", u.id),
                format!("unreadable parked-message file: {}", u.reason),
                &u.bytes,
            ));
            job.release.push(u.id);
        }
        for m in parked {
            let known = self.names.iter().position(|n| *n == m.source);
            match (known, sparkplug::Topic::parse(&m.topic)) {
                (Some(_), Ok(t)) => {
                    let (topic, payload) = (
                        t.rebirth_topic(),
                        sparkplug::rebirth_request(now.max(0) as u64),
                    );
                    if !job.durable.rebirths.iter().any(|(have, _)| *have == topic) {
                        job.durable.rebirths.push((topic, payload));
                    }
                    // Nodes can answer only now: the wait starts again.
                    let m = ParkedMsg {
                        waiting_since_ms: now,
                        ..m
                    };
                    self.parking.hold(t.node_key(), m);
                }
                _ => {
                    job.dead.push(dead_letter(
                        m.received_ms,
                        &m.source,
                        &m.topic,
                        "parked message of a source no longer configured".into(),
                        &m.payload,
                    ));
                    job.release.push(m.id);
                }
            }
        }
        if !self.parking.is_empty() {
            tracing::info!(
                parked = self.parking.len(),
                nodes = self.parking.nodes().len(),
                "sparkplug messages still wait for births; asking their nodes to rebirth"
            );
        }
        job
    }

    /// Messages waiting for a birth.
    pub fn parked(&self) -> usize {
        self.parking.len()
    }

    /// Decodes a batch of publishes, each with the connection it came on
    /// (counters per batch, not per message).
    pub fn batch(
        &mut self,
        batch: Vec<(ConnId, Publish)>,
        now: i64,
        stats: &mut IngestStats,
    ) -> Job {
        let mut job = Job::default();
        job.readings
            .reserve(batch.len().saturating_mul(self.per_message));
        let mut per_source = vec![(0u64, 0u64); self.decoders.len()]; // (readings, rounded)
                                                                      // Consecutive messages mostly share a topic: remember its source.
        let mut last: Option<(String, usize)> = None;
        let mut restamped = 0u64;
        for (_, p) in &batch {
            stats.messages += 1;
            let topic = p.topic.as_str();
            let idx = match &last {
                Some((t, i)) if t == topic => Some(*i),
                _ => {
                    let i = self
                        .decoders
                        .iter()
                        .position(|d| topic_matches(&d.source().filter, topic));
                    if let Some(i) = i {
                        last = Some((topic.to_string(), i));
                    }
                    i
                }
            };
            // A redelivered copy of a message stamped before is decoded (or
            // dead-lettered) as if received then (only DUP copies pay for the hash).
            let redeliverable = p.qos != QoS::AtMostOnce;
            let (mut at, mut key, mut hit) = (now, None, false);
            if p.dup && redeliverable && !self.stamps.is_empty() {
                let k = stamp_key(topic, &p.payload);
                if let Some(t) = self.stamps.get(k) {
                    (at, hit) = (t, true);
                    restamped += 1;
                }
                key = Some(k);
            }
            // Whether the rows of this message depend on `at`: untimed
            // readings, parked data, or a dead letter of its own.
            let stamp = match idx {
                None => {
                    job.dead.push(dead_letter(
                        at,
                        "",
                        topic,
                        "no source matches the topic".into(),
                        &p.payload,
                    ));
                    count_dead("", "no_source");
                    true
                }
                Some(idx) => match self.decoders[idx].decode(topic, &p.payload, at) {
                    Ok(d) => {
                        per_source[idx].0 += d.readings.len() as u64;
                        per_source[idx].1 += d.rounded as u64;
                        // Parked data may turn out to have no timestamps.
                        let stamp = d.stamped || d.park.is_some() || !d.problems.is_empty();
                        self.sparkplug_events(idx, topic, &p.payload, &d, (at, now), &mut job);
                        self.take(idx, topic, &p.payload, d, at, &mut job);
                        stamp
                    }
                    Err(e) => {
                        let name = &self.names[idx];
                        tracing::warn!(source = %name, topic, error = %e, "message dead-lettered");
                        count_dead(name, e.kind());
                        job.dead
                            .push(dead_letter(at, name, topic, e.to_string(), &p.payload));
                        true
                    }
                },
            };
            if stamp && redeliverable && !hit {
                let s = Stamp {
                    key: key.unwrap_or_else(|| stamp_key(topic, &p.payload)),
                    received_ms: at,
                };
                self.stamps.insert(s);
                job.stamps.push(s);
            }
        }
        if restamped > 0 {
            tracing::info!(
                messages = restamped,
                "redelivered messages given the receive time of their first copy"
            );
            metrics::counter_add(
                "meterflow_mqtt_redeliveries_restamped_total",
                &[],
                restamped,
            );
        }
        self.expire(now, &mut job);
        for (i, (n, rounded)) in per_source.iter().enumerate() {
            if *n > 0 {
                metrics::counter_add(
                    "meterflow_mqtt_readings_total",
                    &[("source", &self.names[i])],
                    *n,
                );
            }
            if *rounded > 0 {
                metrics::counter_add(
                    "meterflow_mqtt_values_rounded_total",
                    &[("source", &self.names[i])],
                    *rounded,
                );
            }
        }
        if !batch.is_empty() {
            self.per_message = (job.readings.len() / batch.len()).clamp(1, 1024);
        }
        stats.readings += job.readings.len() as u64;
        stats.dead_letters += job.dead.len() as u64;
        stats.parked += job.park.len() as u64;
        metrics::counter_add("meterflow_mqtt_messages_total", &[], batch.len() as u64);
        metrics::gauge_set(
            "meterflow_mqtt_sparkplug_parked",
            &[],
            self.parking.len() as f64,
        );
        for (conn, p) in batch {
            job.durable.ack_one(conn, p);
        }
        job
    }

    /// Dead-letters parked messages that waited longer than allowed.
    pub fn expire(&mut self, now: i64, job: &mut Job) {
        if self.parking.is_empty() {
            return;
        }
        let secs = self.park_ms / 1000;
        for m in self
            .parking
            .take_older_than(now.saturating_sub(self.park_ms))
        {
            let reason =
                format!("sparkplug: no birth within {secs} s declared the aliases this data uses");
            self.unpark_dead(m, reason, job);
        }
    }

    /// Readings, problems and rebirth requests of one decoded message.
    fn take(
        &mut self,
        idx: usize,
        topic: &str,
        payload: &[u8],
        d: Decoded,
        now: i64,
        job: &mut Job,
    ) {
        let name = &self.names[idx];
        job.readings.extend(d.readings);
        if !d.problems.is_empty() {
            let reason = reasons(&d.problems);
            for e in &d.problems {
                count_dead(name, e.kind());
            }
            tracing::warn!(source = %name, topic, %reason, "partly unusable message dead-lettered");
            job.dead
                .push(dead_letter(now, name, topic, reason, payload));
        }
        if let Some(r) = d.rebirth {
            job.durable.rebirths.push(r);
        }
    }

    /// Parking, replay after a birth, and dead letters after a death, for a
    /// message received at `received` (its first copy's time) and handled `now`.
    fn sparkplug_events(
        &mut self,
        idx: usize,
        topic: &str,
        payload: &[u8],
        d: &Decoded,
        (received, now): (i64, i64),
        job: &mut Job,
    ) {
        let name = self.names[idx].clone();
        for o in &d.offline {
            tracing::warn!(source = %name, device = %o, "sparkplug device offline");
            metrics::counter_add(
                "meterflow_mqtt_sparkplug_offline_total",
                &[("source", &name)],
                1,
            );
        }
        if let Some(node) = &d.park {
            if self.parking.len() >= self.park_max {
                let reason = format!(
                    "sparkplug: no birth declared the aliases this data uses, and {} messages already wait for births",
                    self.park_max
                );
                count_dead(&name, "park_full");
                tracing::warn!(source = %name, topic, %reason, "message dead-lettered");
                // Its first copy's time: a redelivered copy is dead-lettered
                // with the same.
                job.dead
                    .push(dead_letter(received, &name, topic, reason, payload));
            } else {
                tracing::info!(source = %name, topic, "sparkplug data before its birth: parked until the birth arrives");
                metrics::counter_add(
                    "meterflow_mqtt_sparkplug_parked_total",
                    &[("source", &name)],
                    1,
                );
                // Its readings will be stamped `received`; its wait starts now.
                let m = ParkedMsg {
                    waiting_since_ms: now,
                    ..ParkedMsg::new(&name, topic, payload, received)
                };
                job.park.push(m.clone());
                self.parking.hold(node.clone(), m);
            }
        }
        if let Some(node) = &d.birth_of {
            for m in self.parking.take_node(&name, node) {
                // Received time, not now: readings without timestamps get the
                // same time whenever (and however often) they are replayed.
                match self.decoders[idx].replay_parked(&m.topic, &m.payload, m.received_ms) {
                    Ok(r) if r.park.is_some() => self.parking.hold(node.clone(), m),
                    Ok(r) => {
                        tracing::info!(source = %name, topic = %m.topic, readings = r.readings.len(), "parked sparkplug data decoded after the birth");
                        job.release.push(m.id.clone());
                        self.take(idx, &m.topic, &m.payload, r, m.received_ms, job);
                    }
                    Err(e) => self.unpark_dead(m, e.to_string(), job),
                }
            }
        }
        if let Some(node) = &d.death_of {
            for m in self.parking.take_node(&name, node) {
                let reason =
                    "sparkplug: the node died before a birth declared the aliases this data uses";
                self.unpark_dead(m, reason.into(), job);
            }
        }
    }

    /// Dead-letters a parked message as received when it was first received
    /// (as its readings would have been), not when it gave up waiting.
    fn unpark_dead(&mut self, m: ParkedMsg, reason: String, job: &mut Job) {
        count_dead(&m.source, "unborn");
        tracing::warn!(source = %m.source, topic = %m.topic, %reason, "parked message dead-lettered");
        job.dead.push(dead_letter(
            m.received_ms,
            &m.source,
            &m.topic,
            reason,
            &m.payload,
        ));
        job.release.push(m.id);
    }
}

/// Names a message for its receive stamp: the first 8 bytes of
/// SHA-256(topic length, topic, payload). Stable across runs and builds (it
/// is kept in the spool); a false match needs a 64-bit collision within the
/// remembered window, on a redelivered message.
pub fn stamp_key(topic: &str, payload: &[u8]) -> u64 {
    let mut h = Sha256::new();
    h.update((topic.len() as u64).to_le_bytes());
    h.update(topic.as_bytes());
    h.update(payload);
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().expect("8 of 32 bytes"))
}

/// The first problems of a message, and how many more there were.
fn reasons(problems: &[DecodeError]) -> String {
    let mut out = String::new();
    for (i, e) in problems.iter().enumerate() {
        if i == MAX_REASON_PROBLEMS || out.len() >= MAX_REASON_BYTES / 2 {
            out.push_str(&format!("; ... and {} more", problems.len() - i));
            break;
        }
        if i > 0 {
            out.push_str("; ");
        }
        out.push_str(&e.to_string());
    }
    out
}

/// Cuts a reason to `MAX_REASON_BYTES`, saying so.
fn bounded(mut reason: String) -> String {
    if reason.len() > MAX_REASON_BYTES {
        let total = reason.len();
        let mut end = MAX_REASON_BYTES;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
        reason.push_str(&format!("... (reason cut to {end} of {total} bytes)"));
    }
    reason
}

fn count_dead(source: &str, reason: &str) {
    metrics::counter_add(
        "meterflow_mqtt_dead_letters_total",
        &[("source", source), ("reason", reason)],
        1,
    );
}

pub fn dead_letter(
    now: i64,
    collector: &str,
    topic: &str,
    reason: String,
    payload: &[u8],
) -> QuarantineRecord {
    let reason = bounded(reason);
    let (payload, reason) = if payload.len() > MAX_KEPT_PAYLOAD {
        (
            payload[..MAX_KEPT_PAYLOAD].to_vec(),
            format!(
                "{reason} (payload truncated to {MAX_KEPT_PAYLOAD} of {} bytes)",
                payload.len()
            ),
        )
    } else {
        (payload.to_vec(), reason)
    };
    QuarantineRecord {
        received_ms: now,
        protocol: Protocol::Mqtt,
        collector: collector.to_string(),
        address: topic.to_string(),
        reason,
        payload,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::config::{ChannelSpec, Format, SourceConfig, TsFormat, Unmapped};
    use crate::ingest::decode::Limits;
    use crate::protocol::sparkplug::{datatype, encode_payload, Metric, MetricValue, Payload};
    use crate::store::spool::DEFAULT_STAMP_WINDOW;
    use rumqttc::QoS;
    use rust_decimal_macros::dec;
    use std::collections::HashMap;

    const NOW: i64 = 1_763_800_000_000;

    fn decoding(park_secs: u64, park_max: usize) -> Decoding {
        let src = SourceConfig {
            name: "spb".into(),
            filter: "spBv1.0/#".into(),
            format: Format::Sparkplug,
            unmapped: Some(Unmapped::Ignore),
            meters: HashMap::from([("gw1/m1".to_string(), "M1".to_string())]),
            strict_meters: false,
            channels: HashMap::from([(
                "Energy/Import".to_string(),
                ChannelSpec::Name("import_active_total".into()),
            )]),
            exact: false,
            ts_format: TsFormat::Auto,
            tz_offset_minutes: 0,
            map: None,
        };
        let d = Decoder::new(&src, Limits::default()).unwrap();
        Decoding::new(vec![d], park_secs, park_max, DEFAULT_STAMP_WINDOW)
    }

    fn publish(topic: &str, seq: u64, metrics: Vec<Metric>) -> (ConnId, Publish) {
        publish_at(topic, seq, Some(NOW - 60_000), metrics)
    }

    /// A publish received on connection 1.
    fn publish_at(
        topic: &str,
        seq: u64,
        timestamp: Option<i64>,
        metrics: Vec<Metric>,
    ) -> (ConnId, Publish) {
        let p = encode_payload(&Payload {
            timestamp: timestamp.map(|t| t as u64),
            metrics,
            seq: Some(seq),
            uuid: None,
            body: None,
        });
        (1, Publish::new(topic, QoS::AtLeastOnce, p))
    }

    fn energy(name: Option<&str>, v: f64) -> Metric {
        Metric {
            name: name.map(String::from),
            alias: Some(3),
            datatype: Some(datatype::DOUBLE),
            value: Some(MetricValue::DoubleValue(v)),
            ..Default::default()
        }
    }

    fn data_before_birth(d: &mut Decoding) -> Job {
        let mut stats = IngestStats::default();
        d.batch(
            vec![publish(
                "spBv1.0/g/DDATA/gw1/m1",
                17,
                vec![energy(None, 100.5)],
            )],
            NOW,
            &mut stats,
        )
    }

    #[test]
    fn data_before_its_birth_is_parked_then_decoded_when_the_birth_arrives() {
        let mut d = decoding(300, 10);
        let job = data_before_birth(&mut d);
        assert!(job.readings.is_empty() && job.dead.is_empty());
        assert_eq!(job.park.len(), 1, "parked, durable before its ack");
        assert_eq!(job.durable.acks[0].1.len(), 1);
        assert_eq!(job.durable.rebirths[0].0, "spBv1.0/g/NCMD/gw1");
        let parked_id = job.park[0].id.clone();

        let mut stats = IngestStats::default();
        let births = vec![
            publish("spBv1.0/g/NBIRTH/gw1", 0, vec![]),
            publish(
                "spBv1.0/g/DBIRTH/gw1/m1",
                1,
                vec![energy(Some("Energy/Import"), 100.25)],
            ),
        ];
        let job = d.batch(births, NOW + 1000, &mut stats);
        let values: Vec<_> = job.readings.iter().map(|r| r.value).collect();
        // The parked (older) data comes first, then the birth's own values.
        assert_eq!(values, vec![dec!(100.5), dec!(100.25)]);
        assert_eq!(job.release, vec![parked_id]);
        assert!(job.dead.is_empty());
        assert_eq!(d.parked(), 0);
    }

    #[test]
    fn parked_data_is_dead_lettered_when_the_node_dies_first() {
        let mut d = decoding(300, 10);
        let id = data_before_birth(&mut d).park[0].id.clone();
        let mut stats = IngestStats::default();
        let job = d.batch(
            vec![publish("spBv1.0/g/NDEATH/gw1", 0, vec![])],
            NOW + 1000,
            &mut stats,
        );
        assert_eq!(job.release, vec![id]);
        assert_eq!(job.dead.len(), 1);
        assert!(
            job.dead[0].reason.contains("node died"),
            "{}",
            job.dead[0].reason
        );
        assert_eq!(job.dead[0].address, "spBv1.0/g/DDATA/gw1/m1");
    }

    #[test]
    fn parked_data_is_dead_lettered_when_no_birth_comes_in_time() {
        let mut d = decoding(5, 10);
        data_before_birth(&mut d);
        let mut job = Job::default();
        d.expire(NOW + 4_000, &mut job);
        assert!(job.is_empty(), "still waiting");
        d.expire(NOW + 6_000, &mut job);
        assert_eq!(job.dead.len(), 1);
        assert!(job.dead[0].reason.contains("no birth within 5 s"));
        assert_eq!(job.release.len(), 1);
    }

    #[test]
    fn a_full_park_dead_letters_instead_of_growing() {
        let mut d = decoding(300, 1);
        data_before_birth(&mut d);
        let job = data_before_birth(&mut d);
        assert!(job.park.is_empty());
        assert!(job.dead[0].reason.contains("1 messages already wait"));
    }

    #[test]
    fn a_restart_asks_parked_nodes_to_rebirth_and_drops_unknown_sources() {
        let mut d = decoding(300, 10);
        let keep = ParkedMsg::new("spb", "spBv1.0/g/DDATA/gw1/m1", b"x", NOW);
        let gone = ParkedMsg::new("old", "spBv1.0/g/DDATA/gw2/m1", b"y", NOW);
        let job = d.restore(vec![keep, gone.clone()], vec![], NOW);
        assert_eq!(d.parked(), 1);
        assert_eq!(job.durable.rebirths.len(), 1);
        assert_eq!(job.durable.rebirths[0].0, "spBv1.0/g/NCMD/gw1");
        assert_eq!(job.release, vec![gone.id]);
        assert!(job.dead[0].reason.contains("no longer configured"));
    }

    #[test]
    fn parked_data_without_timestamps_gets_its_receive_time_not_the_births() {
        let mut d = decoding(300, 10);
        let mut stats = IngestStats::default();
        let data = publish_at(
            "spBv1.0/g/DDATA/gw1/m1",
            17,
            None,
            vec![energy(None, 100.5)],
        );
        assert_eq!(d.batch(vec![data], NOW, &mut stats).park.len(), 1);
        let births = vec![
            publish("spBv1.0/g/NBIRTH/gw1", 0, vec![]),
            publish(
                "spBv1.0/g/DBIRTH/gw1/m1",
                1,
                vec![energy(Some("Energy/Import"), 100.25)],
            ),
        ];
        let job = d.batch(births, NOW + 120_000, &mut stats);
        let parked = &job.readings[0];
        assert_eq!(parked.value, dec!(100.5));
        assert_eq!((parked.ts_ms, parked.received_ms), (NOW, NOW));
    }

    #[test]
    fn a_message_restored_after_a_long_outage_waits_the_full_park_time_again() {
        let mut d = decoding(300, 10);
        let old = ParkedMsg::new("spb", "spBv1.0/g/DDATA/gw1/m1", b"x", NOW - 3_600_000);
        d.restore(vec![old], vec![], NOW);
        let mut job = Job::default();
        d.expire(NOW + 1_000, &mut job);
        assert!(job.is_empty(), "its node has had no time to answer yet");
        d.expire(NOW + 301_000, &mut job);
        assert_eq!(job.dead.len(), 1);
        assert!(job.dead[0].reason.contains("no birth within 300 s"));
    }

    #[test]
    fn dead_letters_of_a_message_carry_its_first_receive_time() {
        // No room to park: dead-lettered at once, a DUP copy the same.
        let mut d = decoding(300, 0);
        let mut stats = IngestStats::default();
        let data = || {
            publish_at(
                "spBv1.0/g/DDATA/gw1/m1",
                17,
                None,
                vec![energy(None, 100.5)],
            )
        };
        let first = d.batch(vec![data()], NOW, &mut stats);
        assert_eq!(first.dead.len(), 1, "park full");
        assert_eq!(first.stamps.len(), 1);
        let (conn, mut again) = data();
        again.dup = true;
        let again = d.batch(vec![(conn, again)], NOW + 90_000, &mut stats);
        assert_eq!(again.dead, first.dead);
        assert_eq!(again.dead[0].received_ms, NOW);

        // Parked, then given up: the dead letter is of when it arrived.
        let mut d = decoding(300, 10);
        data_before_birth(&mut d);
        let mut job = Job::default();
        d.expire(NOW + 301_000, &mut job);
        assert_eq!(job.dead.len(), 1);
        assert_eq!(job.dead[0].received_ms, NOW);
    }

    #[test]
    fn a_message_with_countless_problems_gets_a_short_reason() {
        let mut d = decoding(300, 10);
        let mut stats = IngestStats::default();
        // Metrics with neither name nor alias: one problem each.
        let empty = vec![Metric::default(); 100_000];
        let job = d.batch(
            vec![publish("spBv1.0/g/NDATA/gw1", 0, empty)],
            NOW,
            &mut stats,
        );
        assert_eq!(job.dead.len(), 1);
        let reason = &job.dead[0].reason;
        assert!(
            reason.len() <= MAX_REASON_BYTES + 100,
            "{} bytes",
            reason.len()
        );
        assert!(reason.contains(" more"), "{reason}");
        assert!(reason.contains("payload truncated"), "{reason}");
    }

    #[test]
    fn a_reason_is_cut_on_a_character_boundary() {
        let r = bounded("é".repeat(MAX_REASON_BYTES));
        assert!(r.len() < MAX_REASON_BYTES + 60);
        assert!(
            r.ends_with(&format!("of {} bytes)", 2 * MAX_REASON_BYTES)),
            "{r}"
        );
    }

    /// A Tasmota source: `Time` is optional, so its readings may be stamped.
    fn tasmota() -> Decoding {
        tasmota_with("")
    }

    /// `tasmota()` with more keys in its `[[source]]`.
    fn tasmota_with(keys: &str) -> Decoding {
        let text = format!(
            "[mqtt]\nurl = \"mqtt://127.0.0.1\"\nclient_id = \"t\"\n\
             [[source]]\nname = \"tas\"\nfilter = \"tele/+/SENSOR\"\nformat = \"tasmota\"\n{keys}"
        );
        let cfg = crate::ingest::config::IngestConfig::parse(&text, std::path::Path::new("t.toml"))
            .unwrap();
        let d = Decoder::new(&cfg.sources[0], Limits::default()).unwrap();
        Decoding::new(vec![d], 300, 10, DEFAULT_STAMP_WINDOW)
    }

    fn sensor(payload: &str, qos: QoS, dup: bool) -> (ConnId, Publish) {
        let mut p = Publish::new("tele/m1/SENSOR", qos, payload.as_bytes().to_vec());
        p.dup = dup;
        (1, p)
    }

    const NO_TIME: &str = r#"{"ENERGY":{"Total":123.456}}"#;

    fn ts_of(job: &Job) -> Vec<(i64, i64)> {
        job.readings
            .iter()
            .map(|r| (r.ts_ms, r.received_ms))
            .collect()
    }

    #[test]
    fn a_redelivered_copy_of_a_stamped_message_gets_its_first_receive_time() {
        let mut d = tasmota();
        let mut stats = IngestStats::default();
        let first = d.batch(
            vec![sensor(NO_TIME, QoS::AtLeastOnce, false)],
            NOW,
            &mut stats,
        );
        assert_eq!(ts_of(&first), vec![(NOW, NOW)]);
        let key = stamp_key("tele/m1/SENSOR", NO_TIME.as_bytes());
        assert_eq!(
            first.stamps,
            vec![Stamp {
                key,
                received_ms: NOW
            }],
            "the stamp goes to the spool with the readings"
        );
        // The broker redelivers it (its PUBACK was lost): same rows.
        let again = d.batch(
            vec![sensor(NO_TIME, QoS::AtLeastOnce, true)],
            NOW + 90_000,
            &mut stats,
        );
        assert_eq!(again.readings, first.readings);
        assert!(again.stamps.is_empty(), "nothing new to remember");
        // The same payload again without DUP is a new reading.
        let later = d.batch(
            vec![sensor(NO_TIME, QoS::AtLeastOnce, false)],
            NOW + 120_000,
            &mut stats,
        );
        assert_eq!(ts_of(&later), vec![(NOW + 120_000, NOW + 120_000)]);
        assert_eq!(later.stamps.len(), 1);
    }

    #[test]
    fn a_restarted_ingest_restamps_from_the_stamps_the_lake_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut stats = IngestStats::default();
        let mut lake =
            crate::store::Lake::open(dir.path(), crate::store::LakeOptions::new("w")).unwrap();
        let mut d = tasmota();
        let job = d.batch(
            vec![sensor(NO_TIME, QoS::AtLeastOnce, false)],
            NOW,
            &mut stats,
        );
        let first = job.readings.clone();
        lake.accept_stamped(job.readings, job.dead, job.stamps)
            .unwrap();
        // Killed before the PUBACK; the first segment is committed at open.
        std::mem::forget(lake);
        let lake =
            crate::store::Lake::open(dir.path(), crate::store::LakeOptions::new("w")).unwrap();
        let mut d = tasmota();
        d.remember(lake.stamps().live());
        let again = d.batch(
            vec![sensor(NO_TIME, QoS::AtLeastOnce, true)],
            NOW + 3_600_000,
            &mut stats,
        );
        assert_eq!(again.readings, first);
    }

    #[test]
    fn only_stamped_acknowledged_messages_are_remembered() {
        let mut d = tasmota();
        let mut stats = IngestStats::default();
        let timed = r#"{"Time":"2025-11-22T09:00:00","ENERGY":{"Total":1}}"#;
        let job = d.batch(
            vec![
                sensor(timed, QoS::AtLeastOnce, false),
                // QoS 0 is never redelivered.
                sensor(NO_TIME, QoS::AtMostOnce, false),
            ],
            NOW,
            &mut stats,
        );
        assert_eq!(job.readings.len(), 2);
        assert!(job.stamps.is_empty());
        // With nothing remembered, a DUP copy is decoded as received now.
        let job = d.batch(
            vec![sensor(NO_TIME, QoS::AtLeastOnce, true)],
            NOW + 5,
            &mut stats,
        );
        assert_eq!(ts_of(&job), vec![(NOW + 5, NOW + 5)]);
        assert_eq!(job.stamps.len(), 1, "its first durable copy is this one");
    }

    /// Three messages that are dead-lettered (with DUP set or not): one
    /// undecodable, one with timestamps and an unmapped field, one on a
    /// topic no source matches.
    fn bad_messages(dup: bool) -> Vec<(ConnId, Publish)> {
        let mut other = Publish::new("tele/m1/STATE", QoS::AtLeastOnce, b"{}".to_vec());
        other.dup = dup;
        vec![
            sensor("not json", QoS::AtLeastOnce, dup),
            sensor(PARTLY_BAD, QoS::ExactlyOnce, dup),
            (1, other),
        ]
    }

    const PARTLY_BAD: &str = r#"{"Time":"2025-11-22T09:00:00","ENERGY":{"Total":1},"Odd":2}"#;

    #[test]
    fn a_redelivered_copy_of_a_dead_lettered_message_gets_its_first_receive_time() {
        let mut d = tasmota_with("unmapped = \"dead_letter\"\n");
        let mut stats = IngestStats::default();
        let first = d.batch(bad_messages(false), NOW, &mut stats);
        assert_eq!(first.dead.len(), 3);
        assert_eq!(first.readings.len(), 1, "the good part is kept");
        assert!(first.dead.iter().all(|q| q.received_ms == NOW));
        assert_eq!(first.stamps.len(), 3, "each with its dead letter");
        // The broker redelivers them: the same dead letters and reading.
        let again = d.batch(bad_messages(true), NOW + 90_000, &mut stats);
        assert_eq!(again.dead, first.dead);
        assert_eq!(again.readings, first.readings);
        assert!(again.stamps.is_empty(), "nothing new to remember");
        // Sent again without DUP: new messages, dead-lettered as received now.
        let later = d.batch(bad_messages(false), NOW + 120_000, &mut stats);
        assert!(later.dead.iter().all(|q| q.received_ms == NOW + 120_000));
        // QoS 0 is never redelivered: no stamp.
        let job = d.batch(
            vec![sensor("not json", QoS::AtMostOnce, false)],
            NOW,
            &mut stats,
        );
        assert_eq!((job.dead.len(), job.stamps.len()), (1, 0));
    }

    #[test]
    fn a_restarted_ingest_dead_letters_a_redelivered_copy_as_its_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut stats = IngestStats::default();
        let open =
            || crate::store::Lake::open(dir.path(), crate::store::LakeOptions::new("w")).unwrap();
        let mut lake = open();
        let mut d = tasmota();
        let job = d.batch(
            vec![sensor("not json", QoS::AtLeastOnce, false)],
            NOW,
            &mut stats,
        );
        let first = job.dead.clone();
        lake.accept_stamped(job.readings, job.dead, job.stamps)
            .unwrap();
        // Killed before the PUBACK; the first segment is committed at open.
        std::mem::forget(lake);
        let lake = open();
        let mut d = tasmota();
        d.remember(lake.stamps().live());
        let again = d.batch(
            vec![sensor("not json", QoS::AtLeastOnce, true)],
            NOW + 3_600_000,
            &mut stats,
        );
        assert_eq!(again.dead, first);
    }

    #[test]
    fn stamp_keys_tell_topic_and_payload_apart() {
        let k = stamp_key("a/b", b"{}");
        assert_eq!(k, stamp_key("a/b", b"{}"));
        assert_ne!(k, stamp_key("a/c", b"{}"));
        assert_ne!(k, stamp_key("a/b", b"{ }"));
        assert_ne!(stamp_key("a", b"b/c"), stamp_key("ab", b"/c"));
    }

    #[test]
    fn group_commit_keeps_each_ack_with_its_connection() {
        let mut d = decoding(300, 10);
        let mut stats = IngestStats::default();
        let m = |conn| {
            let (_, p) = publish("spBv1.0/g/NBIRTH/gw1", 0, vec![]);
            (conn, p)
        };
        let mut job = d.batch(vec![m(1), m(1)], NOW, &mut stats);
        job.extend(d.batch(vec![m(1), m(2)], NOW, &mut stats));
        job.extend(d.batch(vec![m(2)], NOW, &mut stats));
        let groups: Vec<_> = job
            .durable
            .acks
            .iter()
            .map(|(c, ps)| (*c, ps.len()))
            .collect();
        assert_eq!(groups, vec![(1, 3), (2, 2)]);
    }
}
