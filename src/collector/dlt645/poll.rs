//! Polling the meters of one bus: schedules, reading values into
//! [`Reading`]s, clock skew, degrade mode.

use std::time::Duration;

use chrono::{FixedOffset, NaiveDate, TimeZone, Utc};
use rust_decimal::Decimal;
use tokio::time::Instant;

use super::bus::{Bus, TxError};
use crate::collector::config::{ResolvedMeter, Schedule, When};
use crate::metrics;
use crate::model::{now_ms, Channel, Protocol, Quality, Reading, Source};
use crate::protocol::dlt645::catalogue::{clock_dis, lookup, TimeRef};
use crate::protocol::dlt645::frame::{hex, Frame};
use crate::protocol::dlt645::message::{self, FollowUp};
use crate::protocol::dlt645::{Di, MeterTime, Value, ValueError};

/// Settings shared by the meters of a bus.
#[derive(Debug, Clone)]
pub struct PollSettings {
    pub collector_id: String,
    pub offset: FixedOffset,
    pub skew_threshold: Duration,
    pub time_sync: bool,
    pub degrade_after_cycles: u32,
    pub degraded_interval: Duration,
}

/// One meter and what the bus remembers about it.
#[derive(Debug, Clone)]
pub struct MeterState {
    pub meter: ResolvedMeter,
    /// Per schedule: when it last ran (monotonic) and the meter-local day of
    /// its last complete run (daily schedules are due until one completes).
    last_run: Vec<Option<Instant>>,
    last_day: Vec<Option<NaiveDate>>,
    /// Per daily schedule that failed: not tried again before this.
    retry_at: Vec<Option<Instant>>,
    pub failed_cycles: u32,
    pub degraded: bool,
    next_try: Option<Instant>,
}

impl MeterState {
    pub fn new(meter: ResolvedMeter) -> MeterState {
        let n = meter.schedules.len();
        MeterState {
            meter,
            last_run: vec![None; n],
            last_day: vec![None; n],
            retry_at: vec![None; n],
            failed_cycles: 0,
            degraded: false,
            next_try: None,
        }
    }

    fn due(&self, i: usize, now: Instant, today: NaiveDate, local_time: chrono::NaiveTime) -> bool {
        match self.meter.schedules[i].when {
            When::Every(d) => self.last_run[i].is_none_or(|t| now >= t + d),
            When::DailyAt(at) => {
                local_time >= at
                    && self.last_day[i] != Some(today)
                    && self.retry_at[i].is_none_or(|t| now >= t)
            }
        }
    }

    /// Closes the daily reads of a turn: done for the day if their readings
    /// are `durable` in every sink, else due again after the retry pause. A
    /// refused batch is logged and counted once
    /// (`meterflow_dlt645_daily_not_stored_total`), however many daily
    /// schedules it completed.
    pub fn settle_daily(&mut self, d: &DailyRead, durable: bool, s: &PollSettings, bus: &str) {
        let mut refused: Vec<&str> = vec![];
        for &i in &d.schedules {
            if i >= self.meter.schedules.len() {
                continue;
            }
            if durable {
                self.last_day[i] = Some(d.day);
                self.retry_at[i] = None;
            } else {
                // The values were read but a sink refused them (uplink spool
                // full): read them again rather than lose the day.
                self.retry_at[i] = Some(Instant::now() + s.degraded_interval);
                refused.push(&self.meter.schedules[i].name);
            }
        }
        if !refused.is_empty() {
            tracing::warn!(meter = %self.meter.meter_id, bus, schedules = %refused.join(","),
                retry_in_s = s.degraded_interval.as_secs(), "daily read not stored (a sink refused it); trying again later today");
            let label = format!("{bus}/{}", self.meter.address);
            metrics::counter_add(
                "meterflow_dlt645_daily_not_stored_total",
                &[("bus", bus), ("meter", &label)],
                1,
            );
        }
    }

    /// When this meter next has something due (for sleeping between cycles;
    /// at most a second ahead so daily schedules are noticed).
    pub fn next_due(&self, now: Instant) -> Instant {
        let horizon = now + Duration::from_secs(1);
        if let Some(t) = self.next_try.filter(|t| self.degraded && *t > now) {
            return t.min(horizon);
        }
        let mut next = horizon;
        for (i, s) in self.meter.schedules.iter().enumerate() {
            if let When::Every(d) = s.when {
                next = next.min(self.last_run[i].map_or(now, |t| t + d));
            }
        }
        next
    }
}

/// Daily schedules whose reads all succeeded in a meter's turn: done for
/// `day` only once their readings are durable ([`MeterState::settle_daily`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DailyRead {
    pub day: NaiveDate,
    pub schedules: Vec<usize>,
}

/// What one meter's turn produced.
#[derive(Debug, Default)]
pub struct MeterOutcome {
    pub readings: Vec<Reading>,
    pub answered: bool,
    pub skewed: bool,
    pub errors: Vec<String>,
    /// Set when the turn completed daily schedules: hand it back to
    /// [`MeterState::settle_daily`] once the sinks have answered.
    pub daily: Option<DailyRead>,
}

/// A lost link: the cycle stops and the bus reconnects.
#[derive(Debug)]
pub struct LinkLost(pub std::io::Error);

/// Reads the due schedules of one meter (all schedules if `all`).
pub async fn poll_meter(
    bus: &mut Bus,
    st: &mut MeterState,
    s: &PollSettings,
    all: bool,
) -> Result<Option<MeterOutcome>, LinkLost> {
    let now = Instant::now();
    if !all && st.degraded && st.next_try.is_some_and(|t| now < t) {
        return Ok(None);
    }
    let local = Utc::now().with_timezone(&s.offset).naive_local();
    let due: Vec<usize> = (0..st.meter.schedules.len())
        .filter(|&i| all || st.due(i, now, local.date(), local.time()))
        .collect();
    if due.is_empty() {
        return Ok(None);
    }
    let label = format!("{}/{}", bus.name, st.meter.address);
    let mut out = MeterOutcome::default();
    let mut dis: Vec<Di> = vec![];
    let mut read_clock = false;
    for &i in &due {
        let sch: &Schedule = &st.meter.schedules[i];
        read_clock |= sch.read_clock;
        for di in &sch.dis {
            if !dis.contains(di) {
                dis.push(*di);
            }
        }
    }
    let source = Source {
        protocol: Protocol::Dlt645,
        collector: s.collector_id.as_str().into(),
        address: label.as_str().into(),
    };
    let mut quality = Quality::OK;
    let mut dead = false;
    // What succeeded, to tell which due schedules are complete.
    let mut clock_ok = false;
    let mut read_ok: Vec<Di> = vec![];

    if read_clock {
        match read_clock_skew(bus, &st.meter, s, &label).await {
            Ok(Some(skew_ms)) => {
                out.answered = true;
                clock_ok = true;
                let skewed = skew_ms.unsigned_abs() > s.skew_threshold.as_millis() as u64;
                if skewed {
                    quality = Quality::CLOCK_SKEW;
                    out.skewed = true;
                    tracing::warn!(meter = %st.meter.meter_id, bus = %bus.name, skew_s = skew_ms / 1000, "meter clock skew beyond threshold");
                }
                metrics::gauge_set(
                    "meterflow_dlt645_clock_skew_seconds",
                    &[("bus", &bus.name), ("meter", &label)],
                    skew_ms as f64 / 1000.0,
                );
                let t = now_ms();
                out.readings.push(Reading {
                    meter_id: st.meter.meter_id.clone(),
                    ts_ms: t,
                    channel: Channel::ClockSkew,
                    value: Decimal::new(skew_ms, 3),
                    quality,
                    source: source.clone(),
                    received_ms: t,
                });
            }
            Ok(None) => {
                out.answered = true;
                out.errors.push("clock: not a valid date and time".into());
            }
            Err(TxError::Io(e)) => return Err(LinkLost(e)),
            Err(e @ TxError::Timeout(_)) => {
                out.errors.push(format!("clock: {e}"));
                dead = true;
            }
            Err(e) => {
                out.answered |= matches!(e, TxError::Refused(_));
                out.errors.push(format!("clock: {e}"));
            }
        }
    }

    let mut frozen_at: Option<Option<i64>> = None;
    for di in dis {
        if dead {
            break;
        }
        let Some(info) = lookup(di) else { continue };
        let ts = match info.time {
            TimeRef::ReadTime => now_ms(),
            TimeRef::FrozenAt(time_di) => {
                if frozen_at.is_none() {
                    let t = match read_value(bus, &st.meter, time_di, &label).await {
                        Ok(v) => {
                            out.answered = true;
                            match v {
                                Value::DateTime(t) => meter_time_to_ms(t, s.offset),
                                _ => None,
                            }
                        }
                        Err(TxError::Io(e)) => return Err(LinkLost(e)),
                        Err(e) => {
                            out.answered |= matches!(e, TxError::Refused(_));
                            dead |= matches!(e, TxError::Timeout(_));
                            out.errors.push(format!("{time_di}: {e}"));
                            None
                        }
                    };
                    frozen_at = Some(t);
                }
                match frozen_at.flatten() {
                    Some(t) => t,
                    // Without the freeze time the values cannot be placed:
                    // not stored, so their schedule stays due.
                    None => {
                        out.errors.push(format!("{di}: no valid freeze time"));
                        continue;
                    }
                }
            }
        };
        match read_value(bus, &st.meter, di, &label).await {
            Ok(v) => {
                out.answered = true;
                read_ok.push(di);
                let received = now_ms();
                for (channel, value, at) in values_of(&v, info.channels) {
                    out.readings.push(Reading {
                        meter_id: st.meter.meter_id.clone(),
                        ts_ms: at.and_then(|t| meter_time_to_ms(t, s.offset)).unwrap_or(ts),
                        channel,
                        value,
                        quality,
                        source: source.clone(),
                        received_ms: received,
                    });
                }
            }
            Err(TxError::Io(e)) => return Err(LinkLost(e)),
            Err(e @ TxError::Timeout(_)) => {
                // A silent meter costs its own timeout once, not once per DI.
                out.errors.push(format!("{di}: {e}"));
                dead = true;
            }
            Err(e) => {
                out.answered |= matches!(e, TxError::Refused(_));
                tracing::warn!(meter = %st.meter.meter_id, bus = %bus.name, %di, error = %e, "read failed");
                out.errors.push(format!("{di}: {e}"));
            }
        }
    }

    let mut daily_read = vec![];
    for &i in &due {
        st.last_run[i] = Some(now);
        let sch = &st.meter.schedules[i];
        let complete =
            (!sch.read_clock || clock_ok) && sch.dis.iter().all(|di| read_ok.contains(di));
        if matches!(sch.when, When::Every(_)) {
            st.last_day[i] = Some(local.date());
            st.retry_at[i] = None;
        } else if complete {
            // Not done until the readings are durable (`settle_daily`); until
            // then it is held back like a failed read, so a caller that never
            // settles reads it again instead of losing the day.
            daily_read.push(i);
            st.retry_at[i] = Some(Instant::now() + s.degraded_interval);
        } else {
            // Daily values missed now are lost for the day unless asked again.
            tracing::info!(meter = %st.meter.meter_id, bus = %bus.name, schedule = %sch.name,
                retry_in_s = s.degraded_interval.as_secs(), "daily read incomplete; trying again later today");
            st.retry_at[i] = Some(Instant::now() + s.degraded_interval);
        }
    }
    if !daily_read.is_empty() {
        out.daily = Some(DailyRead {
            day: local.date(),
            schedules: daily_read,
        });
    }
    if out.answered {
        if st.degraded {
            tracing::info!(meter = %st.meter.meter_id, bus = %bus.name, "meter answers again; leaving degrade mode");
        }
        st.failed_cycles = 0;
        st.degraded = false;
        st.next_try = None;
    } else {
        st.failed_cycles += 1;
        if st.failed_cycles >= s.degrade_after_cycles {
            if !st.degraded {
                tracing::warn!(meter = %st.meter.meter_id, bus = %bus.name, cycles = st.failed_cycles, "meter degraded: polling it less often");
            }
            st.degraded = true;
            st.next_try = Some(Instant::now() + s.degraded_interval);
        }
    }
    metrics::gauge_set(
        "meterflow_dlt645_meter_degraded",
        &[("bus", &bus.name), ("meter", &label)],
        if st.degraded { 1.0 } else { 0.0 },
    );
    metrics::counter_add(
        "meterflow_dlt645_readings_total",
        &[("bus", &bus.name), ("meter", &label)],
        out.readings.len() as u64,
    );
    Ok(Some(out))
}

/// Pairs decoded values with the DI's channels.
fn values_of(v: &Value, channels: &[Channel]) -> Vec<(Channel, Decimal, Option<MeterTime>)> {
    match v {
        Value::Number(x) => channels
            .first()
            .map(|c| vec![(*c, *x, None)])
            .unwrap_or_default(),
        Value::Numbers(xs) => channels
            .iter()
            .zip(xs)
            .map(|(c, x)| (*c, *x, None))
            .collect(),
        Value::NumberAt { value, at } => channels
            .first()
            .map(|c| vec![(*c, *value, Some(*at))])
            .unwrap_or_default(),
        _ => vec![],
    }
}

/// Converts a meter-local time to UTC milliseconds.
pub fn meter_time_to_ms(t: MeterTime, offset: FixedOffset) -> Option<i64> {
    let naive = t.to_naive()?;
    offset
        .from_local_datetime(&naive)
        .single()
        .map(|d| d.timestamp_millis())
}

/// Reads one DI, following up multi-frame answers, and decodes it.
pub async fn read_value(
    bus: &mut Bus,
    meter: &ResolvedMeter,
    di: Di,
    label: &str,
) -> Result<Value, TxError> {
    let req = message::read_request(meter.address, di);
    let first = bus.transact(&req, label).await?;
    let mut fu = FollowUp::start(meter.address, di, &first);
    while let Some(next) = fu.next_request() {
        let reply = bus.transact(&next, label).await?;
        fu.push(&reply)?;
    }
    let format = lookup(di).map(|i| i.format).ok_or(ValueError::Mismatch)?;
    match format.decode(fu.data()) {
        Ok(v) => Ok(v),
        Err(e) => {
            tracing::warn!(bus = %bus.name, meter = label, %di, error = %e, hex = %hex(fu.data()), "undecodable value");
            bus.keep(
                label,
                format!("undecodable value of DI {di}: {e}"),
                fu.data().to_vec(),
            );
            Err(TxError::Value(e))
        }
    }
}

/// Reads date and time; returns meter minus collector clock in ms.
async fn read_clock_skew(
    bus: &mut Bus,
    meter: &ResolvedMeter,
    s: &PollSettings,
    label: &str,
) -> Result<Option<i64>, TxError> {
    let (date_di, time_di) = clock_dis(meter.edition);
    let before = now_ms();
    let date = read_value(bus, meter, date_di, label).await?;
    let time = read_value(bus, meter, time_di, label).await?;
    let after = now_ms();
    let (
        Value::Date {
            year, month, day, ..
        },
        Value::Time {
            hour,
            minute,
            second,
        },
    ) = (date, time)
    else {
        return Ok(None);
    };
    let t = MeterTime {
        year,
        month,
        day,
        hour,
        minute,
        second,
    };
    let Some(meter_ms) = meter_time_to_ms(t, s.offset) else {
        return Ok(None);
    };
    // The time register was read last: compare with the end of the exchange,
    // at one-second resolution.
    let _ = before;
    let skew = meter_ms - (after / 1000) * 1000;
    Ok(Some(skew))
}

/// Broadcasts the collector's clock (as meter-local time) to every meter on the bus.
pub async fn time_sync(bus: &mut Bus, offset: FixedOffset) -> Result<(), TxError> {
    let local = Utc::now().with_timezone(&offset).naive_local();
    let f: Frame = message::time_sync_request(MeterTime::from_naive(local));
    bus.broadcast(&f).await
}
