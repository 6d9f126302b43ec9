//! One request at a time on one bus: send, wait for the reply that matches
//! (address + DI), count and log everything else, drain after a timeout,
//! retry with backoff.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::link::Link;
use crate::metrics;
use crate::model::{now_ms, Protocol};
use crate::protocol::dlt645::frame::{hex, Decoded, Frame, FrameError};
use crate::protocol::dlt645::message::{classify, ErrorStatus, Match, ReplyError, StrayReason};
use crate::protocol::dlt645::ValueError;
use crate::store::QuarantineRecord;

/// Timing and retry knobs of a bus.
#[derive(Debug, Clone, Copy)]
pub struct BusTiming {
    pub timeout: Duration,
    pub retries: u32,
    pub retry_backoff: Duration,
    pub silent_gap: Duration,
    pub drain: Duration,
    pub preamble: usize,
}

impl BusTiming {
    pub fn of(b: &crate::collector::config::BusConfig) -> BusTiming {
        BusTiming {
            timeout: Duration::from_millis(b.timeout_ms),
            retries: b.retries,
            retry_backoff: Duration::from_millis(b.retry_backoff_ms),
            silent_gap: Duration::from_millis(b.silent_gap_ms),
            drain: Duration::from_millis(b.drain_ms),
            preamble: b.preamble,
        }
    }
}

/// Why a transaction produced no answer.
#[derive(Debug, thiserror::Error)]
pub enum TxError {
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("corrupt reply: {0}")]
    Corrupt(FrameError),
    #[error("meter refused: {0}")]
    Refused(ErrorStatus),
    #[error("bad reply: {0}")]
    Reply(#[from] ReplyError),
    #[error("undecodable value: {0}")]
    Value(#[from] ValueError),
    #[error("link lost: {0}")]
    Io(#[from] std::io::Error),
}

impl TxError {
    pub fn kind(&self) -> &'static str {
        match self {
            TxError::Timeout(_) => "timeout",
            TxError::Corrupt(_) => "corrupt",
            TxError::Refused(_) => "refused",
            TxError::Reply(_) => "bad_reply",
            TxError::Value(_) => "bad_value",
            TxError::Io(_) => "io",
        }
    }
}

/// Counters of one bus, also exported as Prometheus metrics per bus and meter.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BusCounters {
    pub requests: u64,
    pub answers: u64,
    pub timeouts: u64,
    pub refused: u64,
    pub bad_checksum: u64,
    pub bad_frames: u64,
    pub noise_bytes: u64,
    pub stray_frames: u64,
    pub late_replies: u64,
}

impl BusCounters {
    pub fn add(&mut self, o: &BusCounters) {
        self.requests += o.requests;
        self.answers += o.answers;
        self.timeouts += o.timeouts;
        self.refused += o.refused;
        self.bad_checksum += o.bad_checksum;
        self.bad_frames += o.bad_frames;
        self.noise_bytes += o.noise_bytes;
        self.stray_frames += o.stray_frames;
        self.late_replies += o.late_replies;
    }
}

/// A connected bus.
pub struct Bus {
    pub name: String,
    link: Link,
    buf: Vec<u8>,
    timing: BusTiming,
    /// When the line last went quiet (end of our last read or write).
    quiet_since: Instant,
    /// Noise seen during the current exchange (logged once when it ends).
    noise_seen: Vec<u8>,
    noise_count: usize,
    pub counters: BusCounters,
    /// Malformed frames and line noise kept with their reason, until the
    /// bus task hands them to the lake (`collector` is filled in there).
    pub quarantined: Vec<QuarantineRecord>,
}

/// Noise bytes kept per quarantine record (the count is in the reason).
const NOISE_KEPT: usize = 64;

fn count(name: &str, bus: &str, meter: &str, n: u64) {
    metrics::counter_add(name, &[("bus", bus), ("meter", meter)], n);
}

pub fn describe_metrics() {
    metrics::describe(
        "meterflow_dlt645_requests_total",
        "DL/T 645 requests sent, per bus and meter",
    );
    metrics::describe(
        "meterflow_dlt645_answers_total",
        "Matching replies received",
    );
    metrics::describe("meterflow_dlt645_timeouts_total", "Requests that timed out");
    metrics::describe(
        "meterflow_dlt645_refused_total",
        "Error replies (meter refused the request)",
    );
    metrics::describe(
        "meterflow_dlt645_bad_checksum_total",
        "Frames with a wrong checksum",
    );
    metrics::describe(
        "meterflow_dlt645_bad_frames_total",
        "Frame-shaped input with a wrong end byte",
    );
    metrics::describe(
        "meterflow_dlt645_noise_bytes_total",
        "Bytes of line noise skipped (FE preamble not counted)",
    );
    metrics::describe(
        "meterflow_dlt645_stray_frames_total",
        "Valid frames that did not answer the request in flight",
    );
    metrics::describe(
        "meterflow_dlt645_late_replies_total",
        "Replies that arrived after their request timed out (discarded)",
    );
    metrics::describe(
        "meterflow_dlt645_readings_total",
        "Readings produced, per bus and meter",
    );
    metrics::describe("meterflow_dlt645_reconnects_total", "Bus (re)connections");
    metrics::describe(
        "meterflow_dlt645_quarantined_total",
        "Malformed frames, noise and undecodable values kept in the lake's quarantine",
    );
    metrics::describe(
        "meterflow_dlt645_meter_degraded",
        "1 while the meter is degraded (polled less often)",
    );
    metrics::describe(
        "meterflow_dlt645_daily_not_stored_total",
        "Refused batches holding a meter's daily read (uplink spool full), one per batch however many daily schedules it held: read again later that day",
    );
    metrics::describe(
        "meterflow_dlt645_clock_skew_seconds",
        "Meter clock minus collector clock at the last clock read",
    );
}

impl Bus {
    pub fn new(name: impl Into<String>, link: Link, timing: BusTiming) -> Bus {
        Bus {
            name: name.into(),
            link,
            buf: Vec::with_capacity(512),
            timing,
            quiet_since: Instant::now(),
            noise_seen: Vec::new(),
            noise_count: 0,
            counters: BusCounters::default(),
            quarantined: Vec::new(),
        }
    }

    pub fn timing(&self) -> BusTiming {
        self.timing
    }

    /// Sends a command that must not be repeated (relay control, writes)
    /// exactly once and waits for its answer. A timeout or a corrupt reply
    /// leaves the outcome unknown: the meter may have executed it.
    pub async fn command(&mut self, req: &Frame, label: &str) -> Result<Frame, TxError> {
        self.exchange(req, label).await
    }

    /// Sends `req` and waits for its answer, retrying timeouts and corrupt
    /// replies. Only for requests that are safe to repeat (reads); commands
    /// go through [`Bus::command`]. `label` names the meter in logs and metrics.
    pub async fn transact(&mut self, req: &Frame, label: &str) -> Result<Frame, TxError> {
        let mut attempt = 0;
        loop {
            match self.exchange(req, label).await {
                Ok(f) => return Ok(f),
                Err(e @ (TxError::Timeout(_) | TxError::Corrupt(_)))
                    if attempt < self.timing.retries =>
                {
                    let backoff = self.timing.retry_backoff * 2u32.saturating_pow(attempt);
                    tracing::debug!(bus = %self.name, meter = label, attempt, error = %e, "retrying");
                    tokio::time::sleep(backoff).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends a frame nobody answers (broadcast time sync).
    pub async fn broadcast(&mut self, req: &Frame) -> Result<(), TxError> {
        self.wait_silent_gap().await;
        let wire = req
            .encode(self.timing.preamble)
            .expect("requests are short");
        tracing::info!(bus = %self.name, hex = %hex(&wire), "broadcast");
        self.link.write_all(&wire).await?;
        self.link.flush().await?;
        self.quiet_since = Instant::now();
        Ok(())
    }

    async fn wait_silent_gap(&mut self) {
        tokio::time::sleep_until(self.quiet_since + self.timing.silent_gap).await;
    }

    /// One attempt: send, then read until the matching reply, the deadline, or a corrupt frame.
    async fn exchange(&mut self, req: &Frame, label: &str) -> Result<Frame, TxError> {
        let r = self.exchange_inner(req, label).await;
        if self.noise_count > 0 {
            tracing::warn!(bus = %self.name, meter = label, bytes = self.noise_count, hex = %hex(&self.noise_seen), "line noise skipped");
            let reason = format!(
                "line noise: {} bytes skipped before a frame",
                self.noise_count
            );
            let payload = std::mem::take(&mut self.noise_seen);
            self.keep(label, reason, payload);
            self.noise_count = 0;
        }
        r
    }

    async fn exchange_inner(&mut self, req: &Frame, label: &str) -> Result<Frame, TxError> {
        self.wait_silent_gap().await;
        // Anything that arrived before the request goes out cannot answer it
        // (a reply later than the drain): account for it, then drop it.
        self.take_waiting()?;
        if !self.buf.is_empty() {
            self.account_unasked(label);
        }
        let wire = req
            .encode(self.timing.preamble)
            .expect("requests are short");
        tracing::trace!(bus = %self.name, meter = label, hex = %hex(&wire), "request");
        self.counters.requests += 1;
        count("meterflow_dlt645_requests_total", &self.name, label, 1);
        self.link.write_all(&wire).await?;
        self.link.flush().await?;
        let deadline = Instant::now() + self.timing.timeout;
        let mut chunk = [0u8; 512];
        loop {
            if let Some(r) = self.scan(req, label) {
                self.quiet_since = Instant::now();
                return r;
            }
            match tokio::time::timeout_at(deadline, self.link.read(&mut chunk)).await {
                Ok(Ok(0)) => {
                    return Err(TxError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "connection closed by the gateway",
                    )))
                }
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => return Err(TxError::Io(e)),
                Err(_) => {
                    self.counters.timeouts += 1;
                    count("meterflow_dlt645_timeouts_total", &self.name, label, 1);
                    tracing::debug!(bus = %self.name, meter = label, "timeout");
                    self.drain(label).await?;
                    return Err(TxError::Timeout(self.timing.timeout));
                }
            }
        }
    }

    /// Decodes what is buffered. `Some` when the exchange is over.
    fn scan(&mut self, req: &Frame, label: &str) -> Option<Result<Frame, TxError>> {
        loop {
            match crate::protocol::dlt645::decode(&self.buf) {
                Decoded::Incomplete { skipped, noise } => {
                    self.note_noise(noise, skipped, label);
                    self.buf.drain(..skipped);
                    return None;
                }
                Decoded::Invalid {
                    error,
                    consumed,
                    noise,
                    bytes,
                } => {
                    let bytes = bytes.to_vec();
                    self.note_invalid(error, &bytes, label);
                    self.note_noise(noise, 0, label);
                    self.buf.drain(..consumed);
                    if matches!(error, FrameError::BadChecksum { .. }) {
                        return Some(Err(TxError::Corrupt(error)));
                    }
                }
                Decoded::Frame {
                    frame,
                    consumed,
                    skipped,
                    noise,
                } => {
                    let m = classify(req, &frame);
                    // Own the frame only when it is kept or logged (not for refusals).
                    let owned = (!matches!(m, Match::Refused(_))).then(|| frame.to_frame());
                    self.note_noise(noise, skipped, label);
                    self.buf.drain(..consumed);
                    match (m, owned) {
                        (Match::Answer, Some(owned)) => {
                            self.counters.answers += 1;
                            count("meterflow_dlt645_answers_total", &self.name, label, 1);
                            return Some(Ok(owned));
                        }
                        (Match::Refused(status), _) => {
                            self.counters.refused += 1;
                            count("meterflow_dlt645_refused_total", &self.name, label, 1);
                            return Some(Err(TxError::Refused(status)));
                        }
                        (Match::Stray(reason), Some(owned)) => {
                            self.note_stray(reason, &owned, label)
                        }
                        (_, None) => {}
                    }
                }
            }
        }
    }

    fn note_noise(&mut self, noise: usize, skipped: usize, label: &str) {
        if noise > 0 {
            self.counters.noise_bytes += noise as u64;
            count(
                "meterflow_dlt645_noise_bytes_total",
                &self.name,
                label,
                noise as u64,
            );
            self.noise_count += noise;
            let room = NOISE_KEPT.saturating_sub(self.noise_seen.len());
            let skipped = skipped.min(self.buf.len());
            self.noise_seen.extend(
                self.buf[..skipped]
                    .iter()
                    .filter(|&&b| b != 0xFE)
                    .take(room),
            );
        }
    }

    fn note_invalid(&mut self, error: FrameError, bytes: &[u8], label: &str) {
        match error {
            FrameError::BadChecksum { .. } => {
                self.counters.bad_checksum += 1;
                count("meterflow_dlt645_bad_checksum_total", &self.name, label, 1);
            }
            FrameError::BadEnd(_) => {
                self.counters.bad_frames += 1;
                count("meterflow_dlt645_bad_frames_total", &self.name, label, 1);
            }
        }
        tracing::warn!(bus = %self.name, meter = label, %error, hex = %hex(bytes), "malformed frame");
        self.keep(label, format!("malformed frame: {error}"), bytes.to_vec());
    }

    /// Keeps bad input for the lake's quarantine dataset.
    pub fn keep(&mut self, label: &str, reason: String, payload: Vec<u8>) {
        self.quarantined.push(QuarantineRecord {
            received_ms: now_ms(),
            protocol: Protocol::Dlt645,
            collector: String::new(),
            address: label.to_string(),
            reason,
            payload,
        });
    }

    fn note_stray(&mut self, reason: StrayReason, f: &Frame, label: &str) {
        if reason == StrayReason::NotAReply {
            // An echo of a request (half-duplex adapters do that): harmless.
            tracing::trace!(bus = %self.name, meter = label, "ignoring echoed request");
            return;
        }
        self.counters.stray_frames += 1;
        count("meterflow_dlt645_stray_frames_total", &self.name, label, 1);
        let wire = f.encode(0).unwrap_or_default();
        tracing::warn!(bus = %self.name, meter = label, %reason, from = %f.address, hex = %hex(&wire), "discarding frame that does not answer the request");
    }

    /// Moves what is already waiting on the link into `buf`, without waiting.
    fn take_waiting(&mut self) -> Result<(), TxError> {
        use futures::FutureExt;
        let mut chunk = [0u8; 512];
        // Bounded: a chattering line cannot hold the request back forever.
        for _ in 0..16 {
            match self.link.read(&mut chunk).now_or_never() {
                Some(Ok(0)) => {
                    return Err(TxError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "connection closed",
                    )))
                }
                Some(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Some(Err(e)) => return Err(TxError::Io(e)),
                None => break,
            }
        }
        Ok(())
    }

    /// Something arrived while no request was in flight (a late reply): log, count, drop.
    fn account_unasked(&mut self, label: &str) {
        let mut rest = std::mem::take(&mut self.buf);
        loop {
            match crate::protocol::dlt645::decode(&rest) {
                Decoded::Frame {
                    frame, consumed, ..
                } => {
                    self.counters.late_replies += 1;
                    count("meterflow_dlt645_late_replies_total", &self.name, label, 1);
                    let wire = frame.to_frame().encode(0).unwrap_or_default();
                    tracing::warn!(bus = %self.name, from = %frame.address, hex = %hex(&wire), "discarding late reply");
                    rest.drain(..consumed);
                }
                Decoded::Invalid {
                    error,
                    consumed,
                    bytes,
                    ..
                } => {
                    self.note_invalid(error, bytes, label);
                    rest.drain(..consumed);
                }
                Decoded::Incomplete { .. } => break,
            }
        }
    }

    /// After a timeout: read and discard until the line has been quiet for
    /// `drain` (bounded by one more timeout), so a late reply is not taken
    /// for the next request's answer.
    async fn drain(&mut self, label: &str) -> Result<(), TxError> {
        let limit = Instant::now() + self.timing.timeout;
        let mut chunk = [0u8; 512];
        loop {
            let quiet_until = (Instant::now() + self.timing.drain).min(limit);
            match tokio::time::timeout_at(quiet_until, self.link.read(&mut chunk)).await {
                Ok(Ok(0)) => {
                    return Err(TxError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "connection closed",
                    )))
                }
                Ok(Ok(n)) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    if Instant::now() >= limit {
                        break;
                    }
                }
                Ok(Err(e)) => return Err(TxError::Io(e)),
                Err(_) => break,
            }
        }
        if !self.buf.is_empty() {
            self.account_unasked(label);
            self.buf.clear();
        }
        self.quiet_since = Instant::now();
        Ok(())
    }
}
