//! Prometheus metrics for long-running processes (text exposition format 0.0.4).
//!
//! A small global registry: counters, gauges and latency histograms keyed by
//! name and label set, served over plain HTTP at `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Latency bucket upper bounds, seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

type Key = (String, Vec<(String, String)>);

enum Metric {
    Counter(u64),
    Gauge(f64),
    Histogram {
        counts: [u64; BUCKETS.len()],
        sum: f64,
        count: u64,
    },
}

#[derive(Default)]
struct Registry {
    metrics: BTreeMap<Key, Metric>,
    help: BTreeMap<String, String>,
}

fn registry() -> &'static Mutex<Registry> {
    static R: OnceLock<Mutex<Registry>> = OnceLock::new();
    R.get_or_init(Default::default)
}

fn key(name: &str, labels: &[(&str, &str)]) -> Key {
    let mut l: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    l.sort();
    (name.to_string(), l)
}

/// Sets the `# HELP` text of a metric family.
pub fn describe(name: &str, help: &str) {
    let mut r = registry().lock().unwrap_or_else(|e| e.into_inner());
    r.help.insert(name.to_string(), help.to_string());
}

pub fn counter_add(name: &str, labels: &[(&str, &str)], n: u64) {
    let mut r = registry().lock().unwrap_or_else(|e| e.into_inner());
    if let Metric::Counter(c) = r
        .metrics
        .entry(key(name, labels))
        .or_insert(Metric::Counter(0))
    {
        *c += n;
    }
}

pub fn gauge_set(name: &str, labels: &[(&str, &str)], v: f64) {
    let mut r = registry().lock().unwrap_or_else(|e| e.into_inner());
    r.metrics.insert(key(name, labels), Metric::Gauge(v));
}

pub fn histogram_observe(name: &str, labels: &[(&str, &str)], seconds: f64) {
    let mut r = registry().lock().unwrap_or_else(|e| e.into_inner());
    let m = r
        .metrics
        .entry(key(name, labels))
        .or_insert(Metric::Histogram {
            counts: [0; BUCKETS.len()],
            sum: 0.0,
            count: 0,
        });
    if let Metric::Histogram { counts, sum, count } = m {
        for (i, le) in BUCKETS.iter().enumerate() {
            if seconds <= *le {
                counts[i] += 1;
            }
        }
        *sum += seconds;
        *count += 1;
    }
}

/// Current value of a counter (0 if never touched); handy in tests.
pub fn counter_value(name: &str, labels: &[(&str, &str)]) -> u64 {
    let r = registry().lock().unwrap_or_else(|e| e.into_inner());
    match r.metrics.get(&key(name, labels)) {
        Some(Metric::Counter(c)) => *c,
        _ => 0,
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels_text(labels: &[(String, String)], extra: Option<(&str, String)>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

/// The registry in Prometheus text format.
pub fn render() -> String {
    let r = registry().lock().unwrap_or_else(|e| e.into_inner());
    let mut out = String::new();
    let mut last_family = String::new();
    for ((name, labels), m) in &r.metrics {
        if *name != last_family {
            if let Some(h) = r.help.get(name) {
                let _ = writeln!(out, "# HELP {name} {h}");
            }
            let kind = match m {
                Metric::Counter(_) => "counter",
                Metric::Gauge(_) => "gauge",
                Metric::Histogram { .. } => "histogram",
            };
            let _ = writeln!(out, "# TYPE {name} {kind}");
            last_family = name.clone();
        }
        match m {
            Metric::Counter(c) => {
                let _ = writeln!(out, "{name}{} {c}", labels_text(labels, None));
            }
            Metric::Gauge(g) => {
                let _ = writeln!(out, "{name}{} {g}", labels_text(labels, None));
            }
            Metric::Histogram { counts, sum, count } => {
                for (i, le) in BUCKETS.iter().enumerate() {
                    let _ = writeln!(
                        out,
                        "{name}_bucket{} {}",
                        labels_text(labels, Some(("le", le.to_string()))),
                        counts[i]
                    );
                }
                let _ = writeln!(
                    out,
                    "{name}_bucket{} {count}",
                    labels_text(labels, Some(("le", "+Inf".into())))
                );
                let _ = writeln!(out, "{name}_sum{} {sum}", labels_text(labels, None));
                let _ = writeln!(out, "{name}_count{} {count}", labels_text(labels, None));
            }
        }
    }
    out
}

/// Serves `GET /metrics` on `addr` until the task is aborted.
pub async fn serve(addr: SocketAddr) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    Ok(tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let n = sock.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]);
                let (status, body) = if req.starts_with("GET /metrics") {
                    ("200 OK", render())
                } else {
                    ("404 Not Found", "try GET /metrics\n".to_string())
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_histograms_render_in_prometheus_format() {
        counter_add("mf_test_requests_total", &[("device", "d1")], 2);
        histogram_observe("mf_test_latency_seconds", &[("device", "d1")], 0.02);
        let text = render();
        assert!(text.contains("# TYPE mf_test_requests_total counter"));
        assert!(text.contains("mf_test_requests_total{device=\"d1\"} 2"));
        assert!(text.contains("mf_test_latency_seconds_bucket{device=\"d1\",le=\"0.025\"} 1"));
        assert!(text.contains("mf_test_latency_seconds_count{device=\"d1\"} 1"));
    }
}
