//! Polling one device: its planned requests, retries, decoding into readings,
//! errors named by device and register.

use std::time::{Duration, Instant};

use super::config::ResolvedDevice;
use super::transport::{Link, ReadError};
use crate::metrics;
use crate::model::{now_ms, Protocol, Quality, Reading, Source};
use crate::protocol::modbus::decode::{decode, in_range, Value};
use crate::protocol::modbus::{Field, ReadRequest};
use crate::store::QuarantineRecord;

/// Retry policy for one connection.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub retries: u32,
    pub backoff: Duration,
    pub pause_between_requests: Duration,
}

/// What polling one device produced.
#[derive(Debug, Default)]
pub struct DeviceOutcome {
    pub readings: Vec<Reading>,
    pub requests_ok: u32,
    pub requests_failed: u32,
    /// (register names, error) for every failed request or register.
    pub errors: Vec<(String, String)>,
    /// The device answered nothing at all (timeouts / transport errors only).
    pub silent: bool,
    /// Undecodable registers and replies, kept for the lake's quarantine.
    pub quarantine: Vec<QuarantineRecord>,
}

fn keep(out: &mut DeviceOutcome, source: &Source, reason: String, payload: Vec<u8>) {
    out.quarantine.push(QuarantineRecord {
        received_ms: now_ms(),
        protocol: Protocol::Modbus,
        collector: source.collector.to_string(),
        address: source.address.to_string(),
        reason,
        payload,
    });
}

/// Labels shared by the device's metrics.
pub struct DeviceLabels<'a> {
    pub connection: &'a str,
    pub meter_id: &'a str,
    pub unit: String,
}

impl DeviceLabels<'_> {
    fn pairs(&self) -> [(&str, &str); 3] {
        [
            ("connection", self.connection),
            ("meter", self.meter_id),
            ("unit", self.unit.as_str()),
        ]
    }
}

async fn read_with_retries(
    link: &mut Link,
    unit: u8,
    req: &ReadRequest,
    policy: &RetryPolicy,
    labels: &DeviceLabels<'_>,
) -> Result<Vec<u16>, ReadError> {
    let mut attempt = 0;
    loop {
        let t0 = Instant::now();
        let res = link.read(unit, req).await;
        let secs = t0.elapsed().as_secs_f64();
        let l = labels.pairs();
        metrics::counter_add("meterflow_modbus_requests_total", &l, 1);
        metrics::histogram_observe("meterflow_modbus_request_seconds", &l, secs);
        match res {
            Ok(w) => return Ok(w),
            Err(e) => {
                let kind = e.kind();
                let mut le = l.to_vec();
                le.push(("kind", kind.as_str()));
                metrics::counter_add("meterflow_modbus_errors_total", &le, 1);
                if !e.retryable() || attempt >= policy.retries {
                    return Err(e);
                }
                let wait = policy.backoff.saturating_mul(1u32 << attempt.min(10));
                tracing::debug!(connection = labels.connection, meter = labels.meter_id, unit, error = %e, attempt, "retrying modbus read");
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
        }
    }
}

/// The device is not answering: a timeout, no connection, or a gateway
/// reporting that it cannot reach the unit (exceptions 0x0A and 0x0B, which
/// cost the gateway's own timeout each time).
fn not_answering(e: &ReadError) -> bool {
    matches!(
        e,
        ReadError::Timeout(_)
            | ReadError::Connect(_)
            | ReadError::Exception(GATEWAY_PATH_UNAVAILABLE | GATEWAY_TARGET_FAILED)
    )
}

const GATEWAY_PATH_UNAVAILABLE: u8 = 0x0A;
const GATEWAY_TARGET_FAILED: u8 = 0x0B;

fn field_names(dev: &ResolvedDevice, fields: &[Field]) -> String {
    fields
        .iter()
        .map(|f| dev.registers[f.register].name.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// Polls every planned request of a device. A timeout that survives its
/// retries, or a gateway saying the unit cannot be reached, abandons the
/// device for this cycle (it is not answering) so the others on the line are
/// not held up; any other exception only loses its request.
pub async fn poll_device(
    link: &mut Link,
    dev: &ResolvedDevice,
    policy: &RetryPolicy,
    connection: &str,
    collector: &str,
) -> DeviceOutcome {
    let labels = DeviceLabels {
        connection,
        meter_id: &dev.meter_id,
        unit: dev.unit_id.to_string(),
    };
    let source = Source {
        protocol: Protocol::Modbus,
        collector: collector.into(),
        address: format!("{connection}/unit {}", dev.unit_id).into(),
    };
    let mut out = DeviceOutcome::default();
    let mut answered = false;
    'requests: for (ri, req) in dev.requests.iter().enumerate() {
        if ri > 0 && !policy.pause_between_requests.is_zero() {
            tokio::time::sleep(policy.pause_between_requests).await;
        }
        match read_with_retries(link, dev.unit_id, req, policy, &labels).await {
            Ok(words) => {
                answered = true;
                out.requests_ok += 1;
                let ts = now_ms();
                decode_fields(dev, req, &words, ts, &source, &labels, &mut out);
            }
            Err(ReadError::Exception(code)) if req.fields.len() > 1 && code == 0x02 => {
                // a filled hole the device refuses: fall back to one read per field
                answered = true;
                out.requests_failed += 1;
                tracing::info!(connection, meter = %dev.meter_id, unit = dev.unit_id, start = req.start, count = req.count,
                    "illegal data address on a merged read; retrying field by field");
                for f in &req.fields {
                    let r = &dev.registers[f.register];
                    let single = ReadRequest {
                        area: r.area,
                        start: r.address,
                        count: r.words(),
                        fields: vec![Field {
                            register: f.register,
                            offset: 0,
                        }],
                    };
                    match read_with_retries(link, dev.unit_id, &single, policy, &labels).await {
                        Err(e) if not_answering(&e) => {
                            out.requests_failed += 1;
                            record_error(dev, &single, &e, &labels, &source, &mut out);
                            out.requests_failed += skip_rest(dev, ri, connection);
                            break 'requests;
                        }
                        Ok(words) => {
                            out.requests_ok += 1;
                            decode_fields(
                                dev,
                                &single,
                                &words,
                                now_ms(),
                                &source,
                                &labels,
                                &mut out,
                            );
                        }
                        Err(e) => {
                            out.requests_failed += 1;
                            record_error(dev, &single, &e, &labels, &source, &mut out);
                        }
                    }
                }
            }
            Err(e) => {
                out.requests_failed += 1;
                let give_up = not_answering(&e);
                // other exceptions and garbage still prove something is there
                if !give_up && !matches!(e, ReadError::Io(_)) {
                    answered = true;
                }
                record_error(dev, req, &e, &labels, &source, &mut out);
                if give_up {
                    out.requests_failed += skip_rest(dev, ri, connection);
                    break;
                }
            }
        }
    }
    out.silent = !answered;
    out
}

/// Requests after `ri` not sent this cycle (counted as failed).
fn skip_rest(dev: &ResolvedDevice, ri: usize, connection: &str) -> u32 {
    let rest = dev.requests.len() - ri - 1;
    if rest > 0 {
        tracing::debug!(connection, meter = %dev.meter_id, skipped = rest, "device not answering; skipping its other requests this cycle");
    }
    rest as u32
}

fn record_error(
    dev: &ResolvedDevice,
    req: &ReadRequest,
    e: &ReadError,
    labels: &DeviceLabels<'_>,
    source: &Source,
    out: &mut DeviceOutcome,
) {
    let names = field_names(dev, &req.fields);
    if matches!(e, ReadError::Protocol(_) | ReadError::ShortReply { .. }) {
        // An undecodable reply: the transport does not hand us its bytes, so
        // the request is kept as the payload and the error as the reason.
        let mut payload = vec![dev.unit_id, req.area.function_code()];
        payload.extend_from_slice(&req.start.to_be_bytes());
        payload.extend_from_slice(&req.count.to_be_bytes());
        keep(
            out,
            source,
            format!(
                "undecodable reply to {} {}+{} ({names}): {e}",
                req.area, req.start, req.count
            ),
            payload,
        );
    }
    if let ReadError::Exception(code) = e {
        let code_s = format!("{code:#04x}");
        for f in &req.fields {
            let reg = dev.registers[f.register].name.as_str();
            let mut l = labels.pairs().to_vec();
            l.push(("register", reg));
            l.push(("code", code_s.as_str()));
            metrics::counter_add("meterflow_modbus_exceptions_total", &l, 1);
        }
    }
    tracing::warn!(connection = labels.connection, meter = labels.meter_id, unit = %labels.unit,
        area = %req.area, start = req.start, count = req.count, registers = %names, error = %e,
        "modbus read failed");
    out.errors.push((names, e.to_string()));
}

fn decode_fields(
    dev: &ResolvedDevice,
    req: &ReadRequest,
    words: &[u16],
    ts: i64,
    source: &Source,
    labels: &DeviceLabels<'_>,
    out: &mut DeviceOutcome,
) {
    for f in &req.fields {
        let reg = &dev.registers[f.register];
        let from = usize::from(f.offset);
        let to = (from + usize::from(reg.words())).min(words.len());
        match decode(reg, &words[from.min(to)..to]) {
            Ok(Value::Number(v)) => {
                let Some(channel) = reg.channel else {
                    tracing::debug!(meter = %dev.meter_id, register = %reg.name, value = %v, "register without channel");
                    continue;
                };
                let quality = if in_range(reg, v) {
                    Quality::OK
                } else {
                    let mut l = labels.pairs().to_vec();
                    l.push(("kind", "out_of_range"));
                    metrics::counter_add("meterflow_modbus_errors_total", &l, 1);
                    tracing::warn!(connection = labels.connection, meter = %dev.meter_id, register = %reg.name, value = %v,
                        min = ?reg.min, max = ?reg.max, "value outside the register's plausible range; flagged device_error");
                    Quality::DEVICE_ERROR
                };
                out.readings.push(Reading {
                    meter_id: dev.meter_id.clone(),
                    ts_ms: ts,
                    channel,
                    value: v,
                    quality,
                    source: source.clone(),
                    received_ms: ts,
                });
            }
            Ok(Value::Text(t)) => {
                tracing::debug!(meter = %dev.meter_id, register = %reg.name, text = %t, "text register");
            }
            Err(e) => {
                let mut l = labels.pairs().to_vec();
                l.push(("kind", e.kind()));
                metrics::counter_add("meterflow_modbus_errors_total", &l, 1);
                tracing::warn!(connection = labels.connection, meter = %dev.meter_id, unit = dev.unit_id,
                    register = %reg.name, address = reg.address, error = %e, "cannot decode register; no reading");
                let payload: Vec<u8> = words[from.min(to)..to]
                    .iter()
                    .flat_map(|w| w.to_be_bytes())
                    .collect();
                keep(
                    out,
                    source,
                    format!("register {} at {} {}: {e}", reg.name, reg.area, reg.address),
                    payload,
                );
                out.errors.push((reg.name.clone(), e.to_string()));
            }
        }
    }
}
