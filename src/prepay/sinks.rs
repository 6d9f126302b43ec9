//! Delivery of the ledger outbox: alerts to the `alerts` Parquet dataset, an
//! MQTT topic and an optional webhook; relay orders to the DL/T 645 relay
//! control ([`super::control::dispatch`]: dry run or `--execute`, audited).
//! An alert is marked delivered only after every sink took it (webhook: 2xx;
//! MQTT: PUBACK; dataset: file renamed into place); a crash in between or a
//! refusing sink leaves it pending, re-delivered later with the same id.

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
    /// When another process is delivering into the same alerts dataset,
    /// leave the alerts pending (`DeliverStats::busy`) instead of waiting:
    /// `stream` must keep polling its broker connection.
    pub skip_when_busy: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeliverStats {
    /// Alerts every sink took, now marked delivered.
    pub alerts: usize,
    /// Alerts the webhook refused after all attempts.
    pub webhook_failures: usize,
    /// Rounds the broker did not acknowledge in full.
    pub mqtt_failures: usize,
    /// Alerts of the round a sink failed in, left pending for the next
    /// round or run (more may wait behind them).
    pub undelivered: usize,
    /// Another process held the alerts dataset (`skip_when_busy`): what was
    /// pending stays pending.
    pub busy: bool,
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

/// Writes alerts to `root/alerts/date=D/part-<hash>.parquet`, one file per
/// UTC date, atomically. `alerts` is a round: the oldest pending alerts in
/// outbox order. The file is named by its first alert, so a round replayed
/// after a crash (same oldest alerts, maybe more or fewer behind them)
/// replaces the file instead of adding rows beside it.
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
        let path = crate::store::partition_dir(root, ALERTS, d).join(format!(
            "part-{}.parquet",
            stable_id(&[list[0].id.as_str()])
        ));
        crate::store::atomic::write_parquet_atomic(
            &path,
            alerts_schema(),
            &[alerts_batch(&list)?],
        )?;
        files += 1;
    }
    Ok(files)
}

/// Holds the dataset's delivery lock: one process at a time fetches, writes
/// and marks a round, so two never write the same first alert's file with
/// different rows (one would replace the other's delivered rows).
fn lock_dataset(
    root: &std::path::Path,
    skip_when_busy: bool,
) -> Result<Option<std::fs::File>, PrepayError> {
    let dir = root.join(ALERTS);
    crate::store::atomic::create_dir_durable(&dir)?;
    let path = dir.join("_deliver.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| PrepayError::io(&path, e))?;
    if !skip_when_busy {
        f.lock().map_err(|e| PrepayError::io(&path, e))?;
        return Ok(Some(f));
    }
    match f.try_lock() {
        Ok(()) => Ok(Some(f)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(PrepayError::io(&path, e)),
    }
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

/// Sends MQTT messages (topic, payloads) at QoS 1. Ok once the broker
/// acknowledged (PUBACK) every one; otherwise how many, from the first on,
/// it acknowledged, and why not the rest.
pub type Publisher<'a> = dyn FnMut(&str, &[&[u8]]) -> Result<(), (usize, String)> + 'a;

/// Alerts delivered per round: one `alerts` file and one ledger
/// transaction marking them delivered. A nightly run raises millions of
/// alerts, and each round costs an fsync.
const DELIVER_BATCH: usize = 50_000;

/// Delivers pending outbox messages. `publish` sends to MQTT when an alerts
/// topic is configured. A failing sink is counted and logged, not an error:
/// its alerts stay pending for the next call.
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
        let _lock = match &sinks.alerts_root {
            Some(root) => match lock_dataset(root, sinks.skip_when_busy)? {
                Some(f) => Some(f),
                None => {
                    tracing::info!("another process is delivering alerts: they stay pending");
                    stats.busy = true;
                    break;
                }
            },
            None => None,
        };
        let pending: Vec<OutboxMsg> = ledger.pending_outbox_of("alert", round)?;
        if pending.is_empty() {
            break;
        }
        let alerts = pending
            .iter()
            .map(|m| {
                serde_json::from_str::<Alert>(&m.payload)
                    .map_err(|e| PrepayError::Input(format!("outbox {}: {e}", m.id)))
            })
            .collect::<Result<Vec<Alert>, _>>()?;
        // Each sink gets the prefix the sinks before it took; what is left
        // at the end every sink took. The webhook goes first: when it is
        // down, nothing is published twice to MQTT on every retry.
        let mut took = pending.len();
        if let Some(url) = &sinks.webhook {
            took = post_in_order(url, sinks.webhook_attempts.max(1), &pending);
            stats.webhook_failures += usize::from(took < pending.len());
        }
        if let Some(t) = sinks.alerts_topic.as_deref().filter(|_| took > 0) {
            let payloads: Vec<&[u8]> = pending[..took]
                .iter()
                .map(|m| m.payload.as_bytes())
                .collect();
            if let Err((acked, e)) = publish(t, &payloads) {
                tracing::warn!(topic = t, acked, of = took, "alerts not acknowledged: {e}");
                stats.mqtt_failures += 1;
                took = acked.min(took);
            }
        }
        if took > 0 {
            if let Some(root) = &sinks.alerts_root {
                write_alerts_dataset(root, &alerts[..took])?;
            }
            let done: Vec<(&str, &str)> = pending[..took]
                .iter()
                .map(|m| (m.account_id.as_str(), m.id.as_str()))
                .collect();
            ledger.mark_delivered(&done)?;
            stats.alerts += took;
        }
        if took < pending.len() {
            stats.undelivered += pending.len() - took;
            tracing::warn!(
                delivered = took,
                pending = pending.len() - took,
                "a sink refused alerts: they stay pending for the next delivery"
            );
            break;
        }
    }
    if let Some(d) = &sinks.relay {
        stats.relay = dispatch(ledger, d)?;
    }
    Ok(stats)
}

/// POSTs alerts one by one, each retried with backoff; stops at the first
/// the webhook never took. Returns how many it took.
fn post_in_order(url: &str, attempts: u32, msgs: &[OutboxMsg]) -> usize {
    for (n, m) in msgs.iter().enumerate() {
        let mut i = 0;
        loop {
            match post_json(url, m.payload.as_bytes(), &m.id) {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(alert = %m.id, attempt = i + 1, "webhook: {e}");
                    i += 1;
                    if i == attempts {
                        return n;
                    }
                    std::thread::sleep(Duration::from_millis(100 << (i - 1).min(6)));
                }
            }
        }
    }
    msgs.len()
}

/// Messages published before waiting for their PUBACKs.
const PUBLISH_WINDOW: usize = 1000;

/// Publishes `(topic, payload)` pairs at QoS 1 over one fresh connection,
/// [`PUBLISH_WINDOW`] at a time, each window waiting for all its PUBACKs.
/// A broker acknowledges QoS 1 messages in order, so on failure the count
/// returned is how many from the first on it has.
pub fn publish_acked(
    url: &str,
    client_id: &str,
    msgs: &[(&str, &[u8])],
) -> Result<(), (usize, String)> {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    if msgs.is_empty() {
        return Ok(());
    }
    let (_, host, port) = crate::ingest::mqtt::parse_url(url).map_err(|e| (0, e))?;
    let mut o = MqttOptions::new(client_id, host, port);
    o.set_keep_alive(Duration::from_secs(10));
    let (client, mut conn) = Client::new(o, PUBLISH_WINDOW + 10);
    let mut acked = 0;
    for window in msgs.chunks(PUBLISH_WINDOW) {
        for (t, p) in window {
            client
                .publish(*t, QoS::AtLeastOnce, false, p.to_vec())
                .map_err(|e| (acked, e.to_string()))?;
        }
        let mut got = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while got < window.len() {
            if std::time::Instant::now() > deadline {
                return Err((acked + got, "no PUBACK within 30 s".into()));
            }
            match conn.recv_timeout(Duration::from_millis(500)) {
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => got += 1,
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(e)) => return Err((acked + got, e.to_string())),
            }
        }
        acked += got;
    }
    let _ = client.disconnect();
    // Lets the DISCONNECT leave; the messages are acknowledged already.
    let _ = conn.recv_timeout(Duration::from_millis(50));
    Ok(())
}

/// Publishes `(topic, payload)` pairs at QoS 1 and waits for every PUBACK.
pub fn publish_qos1(
    url: &str,
    client_id: &str,
    msgs: &[(String, Vec<u8>)],
) -> Result<(), PrepayError> {
    let msgs: Vec<(&str, &[u8])> = msgs
        .iter()
        .map(|(t, p)| (t.as_str(), p.as_slice()))
        .collect();
    publish_acked(url, client_id, &msgs).map_err(|(n, e)| {
        PrepayError::Mqtt(format!("only {n} of {} acknowledged: {e}", msgs.len()))
    })
}

/// A [`Publisher`] to the broker at `url` (a fresh connection per round).
pub fn mqtt_publisher<'a>(
    url: &'a str,
    client_id: &'a str,
) -> impl FnMut(&str, &[&[u8]]) -> Result<(), (usize, String)> + 'a {
    move |topic, payloads| {
        let msgs: Vec<(&str, &[u8])> = payloads.iter().map(|p| (topic, *p)).collect();
        publish_acked(url, client_id, &msgs)
    }
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

    /// A ledger with one alert for each of `accounts`.
    fn ledger_with_alerts(dir: &std::path::Path, accounts: &[&str]) -> Box<dyn Ledger> {
        let url = dir.join("l.sqlite").display().to_string();
        let mut ledger = crate::ledger::open_migrated(&url).unwrap();
        raise_alerts(ledger.as_mut(), accounts);
        ledger
    }

    fn raise_alerts(ledger: &mut dyn Ledger, accounts: &[&str]) {
        let batch = Batch {
            evaluate: accounts.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        };
        ledger.commit(&batch, &OneAlertEach).unwrap();
    }

    fn dataset_ids(root: &std::path::Path) -> Vec<String> {
        let mut ids: Vec<String> = read_alerts_dataset(root)
            .unwrap()
            .into_iter()
            .map(|(id, _, _)| id)
            .collect();
        ids.sort();
        ids
    }

    fn pending_ids(ledger: &mut dyn Ledger) -> Vec<String> {
        let mut ids: Vec<String> = ledger
            .pending_outbox_of("alert", 100)
            .unwrap()
            .into_iter()
            .map(|m| m.id)
            .collect();
        ids.sort();
        ids
    }

    #[test]
    fn a_delivery_that_must_not_wait_leaves_alerts_pending_while_another_holds_the_dataset() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = ledger_with_alerts(dir.path(), &["A0"]);
        let root = dir.path().join("out");
        let other = lock_dataset(&root, false).unwrap().expect("locked");
        let sinks = Sinks {
            alerts_root: Some(root.clone()),
            skip_when_busy: true,
            ..Default::default()
        };
        let stats = deliver(ledger.as_mut(), &sinks, &mut |_, _| Ok(())).unwrap();
        assert!(stats.busy);
        assert_eq!((stats.alerts, stats.undelivered), (0, 0));
        assert_eq!(pending_ids(ledger.as_mut()), ["alert-A0"]);
        drop(other);
        let stats = deliver(ledger.as_mut(), &sinks, &mut |_, _| Ok(())).unwrap();
        assert!(!stats.busy);
        assert_eq!(stats.alerts, 1);
        assert_eq!(dataset_ids(&root), ["alert-A0"]);
    }

    #[test]
    fn alerts_the_broker_did_not_acknowledge_stay_pending_until_it_does() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = ledger_with_alerts(dir.path(), &["A0", "A1", "A2"]);
        let sinks = Sinks {
            alerts_root: Some(dir.path().join("out")),
            alerts_topic: Some("alerts".into()),
            ..Default::default()
        };
        // The broker acknowledges the first alert, then the connection drops.
        let stats = deliver(ledger.as_mut(), &sinks, &mut |_, p| {
            assert_eq!(p.len(), 3);
            Err((1, "connection reset".into()))
        })
        .unwrap();
        assert_eq!(
            (stats.alerts, stats.mqtt_failures, stats.undelivered),
            (1, 1, 2)
        );
        assert_eq!(pending_ids(ledger.as_mut()), ["alert-A1", "alert-A2"]);
        assert_eq!(dataset_ids(&dir.path().join("out")), ["alert-A0"]);
        // Next time only the two left go out, and the dataset holds each alert once.
        let mut sent = 0;
        let stats = deliver(ledger.as_mut(), &sinks, &mut |_, p| {
            sent += p.len();
            Ok(())
        })
        .unwrap();
        assert_eq!((stats.alerts, stats.undelivered, sent), (2, 0, 2));
        assert!(pending_ids(ledger.as_mut()).is_empty());
        assert_eq!(
            dataset_ids(&dir.path().join("out")),
            ["alert-A0", "alert-A1", "alert-A2"]
        );
    }

    #[test]
    fn a_round_replayed_after_a_crash_before_marking_writes_no_alert_twice() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("out");
        let mut ledger = ledger_with_alerts(dir.path(), &["A0", "A1"]);
        // The crashed round: its file written, its alerts not marked delivered.
        let round: Vec<Alert> = ledger
            .pending_outbox_of("alert", 10)
            .unwrap()
            .iter()
            .map(|m| serde_json::from_str(&m.payload).unwrap())
            .collect();
        write_alerts_dataset(&root, &round).unwrap();
        // More alerts before the restart: the replayed round is larger.
        raise_alerts(ledger.as_mut(), &["A2", "A3"]);
        let sinks = Sinks {
            alerts_root: Some(root.clone()),
            ..Default::default()
        };
        let stats = deliver(ledger.as_mut(), &sinks, &mut |_, _| Ok(())).unwrap();
        assert_eq!(stats.alerts, 4);
        assert_eq!(
            dataset_ids(&root),
            ["alert-A0", "alert-A1", "alert-A2", "alert-A3"]
        );
    }

    #[test]
    fn alerts_are_delivered_in_rounds_each_alert_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = ledger_with_alerts(dir.path(), &["A0", "A1", "A2", "A3", "A4"]);
        let sinks = Sinks {
            alerts_root: Some(dir.path().join("out")),
            ..Default::default()
        };
        let stats = deliver_in_rounds(ledger.as_mut(), &sinks, &mut |_, _| Ok(()), 2).unwrap();
        assert_eq!(stats.alerts, 5);
        assert!(ledger.pending_outbox_of("alert", 10).unwrap().is_empty());
        // Three rounds of at most two: five rows, no alert twice.
        assert_eq!(
            dataset_ids(&dir.path().join("out")),
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
