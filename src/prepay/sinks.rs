//! Delivery of the ledger outbox: alerts to the `alerts` Parquet dataset, an
//! MQTT topic and an optional webhook; relay orders to the DL/T 645 relay
//! control ([`super::control::dispatch`]: dry run or `--execute`, audited).
//! An alert is marked delivered only after every sink took it; a crash in
//! between re-delivers it with the same id.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{ArrayRef, Decimal128Builder, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;

use super::alerts::{stable_id, Alert};
use super::control::{dispatch, RelayDispatch, RelayStats};
use super::PrepayError;
use crate::ledger::export::to_scaled;
use crate::ledger::{Ledger, OutboxMsg};

pub const ALERTS: &str = "alerts";

/// Where outbox messages go.
#[derive(Debug, Clone, Default)]
pub struct Sinks {
    /// Root under which `alerts/date=YYYY-MM-DD/*.parquet` is written.
    pub alerts_root: Option<PathBuf>,
    /// `http://127.0.0.1:PORT/path`: each alert POSTed as JSON, retried.
    pub webhook: Option<String>,
    pub webhook_attempts: u32,
    /// Relay order dispatch (dry run or `--execute`); without it relay
    /// orders stay pending in the outbox.
    pub relay: Option<RelayDispatch>,
    /// MQTT topic for alerts (with a publisher passed to `deliver`).
    pub alerts_topic: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeliverStats {
    pub alerts: usize,
    pub webhook_failures: usize,
    pub relay: RelayStats,
}

pub fn alerts_schema() -> SchemaRef {
    let dec = DataType::Decimal128(20, 4);
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("account_id", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("threshold", dec.clone(), false),
        Field::new("balance", dec.clone(), false),
        Field::new("days_left", dec, true),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
    ]))
}

fn alerts_batch(alerts: &[Alert]) -> Result<RecordBatch, PrepayError> {
    let dec = |vals: Vec<Option<rust_decimal::Decimal>>| -> Result<ArrayRef, PrepayError> {
        let mut b = Decimal128Builder::with_capacity(vals.len());
        for v in vals {
            match v {
                Some(x) => b.append_value(to_scaled(x.round_dp(4))?),
                None => b.append_null(),
            }
        }
        Ok(Arc::new(
            b.finish()
                .with_precision_and_scale(20, 4)
                .map_err(|e| PrepayError::Input(e.to_string()))?,
        ))
    };
    let s = |f: &dyn Fn(&Alert) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(alerts.iter().map(f)))
    };
    let cols = vec![
        s(&|a| a.id.as_str()),
        s(&|a| a.account_id.as_str()),
        s(&|a| a.kind.as_str()),
        dec(alerts.iter().map(|a| Some(a.threshold)).collect())?,
        dec(alerts.iter().map(|a| Some(a.balance)).collect())?,
        dec(alerts.iter().map(|a| a.days_left).collect())?,
        Arc::new(
            TimestampMillisecondArray::from_iter_values(alerts.iter().map(|a| a.ts_ms))
                .with_timezone("UTC"),
        ) as ArrayRef,
    ];
    RecordBatch::try_new(alerts_schema(), cols).map_err(|e| PrepayError::Input(e.to_string()))
}

/// Writes alerts to `root/alerts/date=D/part-<ids hash>.parquet`, one file per
/// UTC date, atomically. The name depends only on the alert ids, so a
/// re-delivery after a crash rewrites the same file instead of adding one.
pub fn write_alerts_dataset(
    root: &std::path::Path,
    alerts: &[Alert],
) -> Result<usize, PrepayError> {
    let mut by_date: std::collections::BTreeMap<chrono::NaiveDate, Vec<Alert>> = Default::default();
    for a in alerts {
        let (d, _) = super::pricing::local_date_minute(a.ts_ms, 0);
        by_date.entry(d).or_default().push(a.clone());
    }
    let mut files = 0;
    for (d, list) in by_date {
        let ids: Vec<&str> = list.iter().map(|a| a.id.as_str()).collect();
        let path = crate::store::partition_dir(root, ALERTS, d)
            .join(format!("part-{}.parquet", stable_id(&ids)));
        crate::store::atomic::write_parquet_atomic(
            &path,
            alerts_schema(),
            &[alerts_batch(&list)?],
        )?;
        files += 1;
    }
    Ok(files)
}

/// Reads every alert of the dataset (tests, demo).
pub fn read_alerts_dataset(
    root: &std::path::Path,
) -> Result<Vec<(String, String, String)>, PrepayError> {
    let mut out = Vec::new();
    for (_, path) in crate::store::reader::list_files(
        root,
        ALERTS,
        chrono::NaiveDate::MIN,
        chrono::NaiveDate::MAX,
    )? {
        for b in crate::store::reader::read_file(&path)? {
            let col = |i: usize| b.column(i).as_any().downcast_ref::<StringArray>().cloned();
            let (Some(id), Some(acc), Some(kind)) = (col(0), col(1), col(2)) else {
                continue;
            };
            for i in 0..b.num_rows() {
                out.push((
                    id.value(i).to_string(),
                    acc.value(i).to_string(),
                    kind.value(i).to_string(),
                ));
            }
        }
    }
    Ok(out)
}

/// `http://host:port/path` -> (host:port, path).
fn split_http(url: &str) -> Result<(String, String), PrepayError> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        PrepayError::Input(format!("webhook '{url}': only http:// URLs are supported"))
    })?;
    let (hp, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let hp = if hp.contains(':') {
        hp.to_string()
    } else {
        format!("{hp}:80")
    };
    Ok((hp, path.to_string()))
}

/// One HTTP POST; Ok when the server answered 2xx.
pub fn post_json(url: &str, body: &[u8], id: &str) -> Result<(), String> {
    let (hp, path) = split_http(url).map_err(|e| e.to_string())?;
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&hp)
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("no address")?;
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {hp}\r\nContent-Type: application/json\r\nIdempotency-Key: {id}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())
        .and_then(|_| s.write_all(body))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).map_err(|e| e.to_string())?;
    let status = String::from_utf8_lossy(&buf[..n]);
    let code = status.split_whitespace().nth(1).unwrap_or("");
    if code.starts_with('2') {
        Ok(())
    } else {
        Err(format!(
            "webhook answered '{}'",
            status.lines().next().unwrap_or("")
        ))
    }
}

/// Sends one MQTT message (topic, payload).
pub type Publisher<'a> = dyn FnMut(&str, &[u8]) -> Result<(), String> + 'a;

/// Alerts delivered per round: one `alerts` file and one ledger
/// transaction marking them delivered. A nightly run raises millions of
/// alerts, and each round costs an fsync.
const DELIVER_BATCH: usize = 50_000;

/// Delivers pending outbox messages. `publish(topic, payload)` sends to MQTT
/// (QoS 1) when an alerts topic is configured.
pub fn deliver(
    ledger: &mut dyn Ledger,
    sinks: &Sinks,
    publish: &mut Publisher<'_>,
) -> Result<DeliverStats, PrepayError> {
    deliver_in_rounds(ledger, sinks, publish, DELIVER_BATCH)
}

/// [`deliver`], `round` alerts at a time.
fn deliver_in_rounds(
    ledger: &mut dyn Ledger,
    sinks: &Sinks,
    publish: &mut Publisher<'_>,
    round: usize,
) -> Result<DeliverStats, PrepayError> {
    let mut stats = DeliverStats::default();
    loop {
        let pending: Vec<OutboxMsg> = ledger.pending_outbox_of("alert", round)?;
        if pending.is_empty() {
            break;
        }
        let mut alerts = Vec::new();
        let mut done = Vec::new();
        for m in &pending {
            let a: Alert = serde_json::from_str(&m.payload)
                .map_err(|e| PrepayError::Input(format!("outbox {}: {e}", m.id)))?;
            if let Some(t) = &sinks.alerts_topic {
                publish(t, m.payload.as_bytes()).map_err(PrepayError::Mqtt)?;
            }
            if let Some(url) = &sinks.webhook {
                let attempts = sinks.webhook_attempts.max(1);
                let mut ok = false;
                for i in 0..attempts {
                    match post_json(url, m.payload.as_bytes(), &m.id) {
                        Ok(()) => {
                            ok = true;
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(alert = %m.id, attempt = i + 1, "webhook: {e}");
                            std::thread::sleep(Duration::from_millis(100 << i.min(6)));
                        }
                    }
                }
                if !ok {
                    stats.webhook_failures += 1;
                }
            }
            alerts.push(a);
            stats.alerts += 1;
            done.push((m.account_id.as_str(), m.id.as_str()));
        }
        if let Some(root) = &sinks.alerts_root {
            write_alerts_dataset(root, &alerts)?;
        }
        ledger.mark_delivered(&done)?;
    }
    if let Some(d) = &sinks.relay {
        stats.relay = dispatch(ledger, d)?;
    }
    Ok(stats)
}

/// Publishes `(topic, payload)` pairs at QoS 1 and waits for every PUBACK.
pub fn publish_qos1(
    url: &str,
    client_id: &str,
    msgs: &[(String, Vec<u8>)],
) -> Result<(), PrepayError> {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    if msgs.is_empty() {
        return Ok(());
    }
    let (_, host, port) = crate::ingest::mqtt::parse_url(url).map_err(PrepayError::Mqtt)?;
    let mut o = MqttOptions::new(client_id, host, port);
    o.set_keep_alive(Duration::from_secs(10));
    let (client, mut conn) = Client::new(o, msgs.len() + 10);
    for (t, p) in msgs {
        client
            .publish(t.clone(), QoS::AtLeastOnce, false, p.clone())
            .map_err(|e| PrepayError::Mqtt(e.to_string()))?;
    }
    let mut acked = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while acked < msgs.len() {
        if std::time::Instant::now() > deadline {
            return Err(PrepayError::Mqtt(format!(
                "only {acked} of {} alerts acknowledged",
                msgs.len()
            )));
        }
        match conn.recv_timeout(Duration::from_millis(500)) {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => return Err(PrepayError::Mqtt(e.to_string())),
        }
    }
    let _ = client.disconnect();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Batch, CommitHook, HookOut};
    use rust_decimal::Decimal;
    use std::collections::BTreeSet;

    /// Raises one alert for every account it is asked about.
    struct OneAlertEach;

    impl CommitHook for OneAlertEach {
        fn after(
            &self,
            account: &str,
            _: Decimal,
            _: i64,
            _: &BTreeSet<String>,
            now: i64,
        ) -> HookOut {
            let a = Alert {
                id: format!("alert-{account}"),
                account_id: account.into(),
                kind: "zero".into(),
                threshold: Decimal::ZERO,
                balance: Decimal::ZERO,
                days_left: None,
                ts_ms: now,
            };
            HookOut {
                outbox: vec![OutboxMsg {
                    id: a.id.clone(),
                    kind: "alert".into(),
                    account_id: account.into(),
                    created_ms: now,
                    payload: serde_json::to_string(&a).expect("serializes"),
                }],
                ..Default::default()
            }
        }
    }

    #[test]
    fn alerts_are_delivered_in_rounds_each_alert_once() {
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().join("l.sqlite").display().to_string();
        let mut ledger = crate::ledger::open_migrated(&url).unwrap();
        let batch = Batch {
            evaluate: (0..5).map(|i| format!("A{i}")).collect(),
            ..Default::default()
        };
        ledger.commit(&batch, &OneAlertEach).unwrap();
        let sinks = Sinks {
            alerts_root: Some(dir.path().join("out")),
            ..Default::default()
        };
        let stats = deliver_in_rounds(ledger.as_mut(), &sinks, &mut |_, _| Ok(()), 2).unwrap();
        assert_eq!(stats.alerts, 5);
        assert!(ledger.pending_outbox_of("alert", 10).unwrap().is_empty());
        // Three rounds of at most two: five rows, no alert twice.
        let mut ids: Vec<String> = read_alerts_dataset(&dir.path().join("out"))
            .unwrap()
            .into_iter()
            .map(|(id, _, _)| id)
            .collect();
        ids.sort();
        assert_eq!(
            ids,
            (0..5).map(|i| format!("alert-A{i}")).collect::<Vec<_>>()
        );
        assert_eq!(
            deliver_in_rounds(ledger.as_mut(), &sinks, &mut |_, _| Ok(()), 2)
                .unwrap()
                .alerts,
            0
        );
    }
}
