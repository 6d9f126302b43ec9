//! Remote fee control rules (pure) and their dispatch through the DL/T 645
//! relay control of the collector (`collector::dlt645::relay`).
//!
//! * Balance at or below the overdraft limit: the time it got there is kept
//!   (flag `control:below_since:MS`); once `grace_hours` have passed, a trip is
//!   ordered, unless the moment is protected.
//! * Tripped and the balance back at or above `reconnect_amount`: allow-close.
//!   `reconnect_amount` must be above every overdraft limit
//!   ([`Control::of_thresholds`]), or one balance would do both in turn.
//! * Protected (never trip): the account's protect flag, friendly hours,
//!   weekends, holidays of the calendar files. Allow-close is never held back.
//! * Orders go to the ledger outbox in the same transaction; [`dispatch`]
//!   audits them as dry runs (they stay pending) or, with `--execute`, sends
//!   them over the meter's bus (routes from `collectors.toml`), waits for the
//!   answers and audits each command with a stable id, never re-sending one
//!   the audit shows acknowledged.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use chrono::{Datelike, FixedOffset, Weekday};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::alerts::{stable_id, ControlConfig, Thresholds};
use super::pricing::local_date_minute;
use super::{line_of, PrepayError};
use crate::collector::config::{BusConfig, CollectorConfig};
use crate::collector::dlt645::relay::{
    relay_control_keyed, AuditLog, AuditRecord, RelayError, RelayOrder, RelayOutcome,
};
use crate::collector::dlt645::{Bus, Endpoint, TxError};
use crate::ledger::{HookOut, Ledger, OutboxMsg};
use crate::protocol::dlt645::message::{Operator, Password, RelayCommand};
use crate::protocol::dlt645::Address;
use crate::tariff::calendar::Calendar;

/// Control settings resolved for evaluation.
#[derive(Debug, Clone)]
pub struct Control {
    pub cfg: ControlConfig,
    pub calendar: Calendar,
    pub utc_offset_secs: i32,
    /// Friendly ranges in local minutes `[start, end)`; a range crossing midnight is split.
    pub friendly: Vec<(u16, u16)>,
}

fn parse_hhmm(s: &str) -> Option<u16> {
    let (h, m) = s.trim().split_once(':')?;
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    (h <= 24 && m < 60 && h * 60 + m <= 1440).then_some(h * 60 + m)
}

impl Control {
    /// The control of the thresholds `th` loaded from `file` (None without
    /// `[control]`). An enabled control whose `reconnect_amount` is at or
    /// below an overdraft limit is refused: a balance between the two would
    /// trip and allow-close in turn at every evaluation.
    pub fn of_thresholds(th: &Thresholds, file: &Path) -> Result<Option<Control>, PrepayError> {
        let Some(cfg) = &th.control else {
            return Ok(None);
        };
        let scopes = std::iter::once(("default".to_string(), &th.default))
            .chain(th.class.iter().map(|(k, v)| (format!("class.{k}"), v)))
            .chain(th.tariff.iter().map(|(k, v)| (format!("tariff.{k}"), v)))
            .chain(th.account.iter().map(|(k, v)| (format!("account.{k}"), v)));
        let mut limits: Vec<(String, Decimal)> = scopes
            .filter_map(|(scope, l)| l.overdraft_limit.map(|o| (scope, o)))
            .collect();
        if th.default.overdraft_limit.is_none() {
            // What the relay rules use for an account no scope gives a limit.
            limits.push(("default (unset)".into(), Decimal::ZERO));
        }
        let highest = limits.into_iter().max_by_key(|(_, o)| *o);
        if let Some((scope, limit)) =
            highest.filter(|(_, o)| cfg.enabled && cfg.reconnect_amount <= *o)
        {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            // The key in `[control]`, not its first mention (a comment);
            // the table's header when the key is left at its default.
            let line = match super::alerts::key_line(&text, &["control", "reconnect_amount"]) {
                0 => text.find("[control]").map_or(0, |o| line_of(&text, o)),
                n => n,
            };
            return Err(PrepayError::Config {
                file: file.display().to_string(),
                line,
                field: "control.reconnect_amount".into(),
                message: format!(
                    "{} must be above the overdraft limit {} of {scope}, or relays trip and reconnect in turn",
                    cfg.reconnect_amount.normalize(),
                    limit.normalize()
                ),
            });
        }
        Control::new(cfg.clone(), &th.base_dir).map(Some)
    }

    pub fn new(cfg: ControlConfig, base_dir: &std::path::Path) -> Result<Control, PrepayError> {
        let mut calendar = Calendar::default();
        for c in &cfg.calendars {
            let p = base_dir.join(c);
            let cal =
                crate::tariff::load_calendar(&p).map_err(|e| PrepayError::Input(e.to_string()))?;
            calendar.merge(&cal);
        }
        let tz = cfg
            .timezone
            .clone()
            .unwrap_or_else(|| "Asia/Shanghai".into());
        let utc_offset_secs = crate::tariff::parse_timezone(&tz).ok_or_else(|| {
            PrepayError::Input(format!("control.timezone: unknown time zone '{tz}'"))
        })?;
        let mut friendly = Vec::new();
        for r in &cfg.friendly_hours {
            let bad =
                || PrepayError::Input(format!("control.friendly_hours: '{r}' is not HH:MM-HH:MM"));
            let (a, b) = r.split_once('-').ok_or_else(bad)?;
            let (a, b) = (
                parse_hhmm(a).ok_or_else(bad)?,
                parse_hhmm(b).ok_or_else(bad)?,
            );
            if a < b {
                friendly.push((a, b));
            } else {
                friendly.push((a, 1440));
                friendly.push((0, b));
            }
        }
        Ok(Control {
            cfg,
            calendar,
            utc_offset_secs,
            friendly,
        })
    }

    /// Why `now_ms` is protected for `account_id`, if it is.
    pub fn protected(&self, account_id: &str, now_ms: i64) -> Option<&'static str> {
        if self.cfg.protected_accounts.iter().any(|a| a == account_id) {
            return Some("account_protected");
        }
        let (date, minute) = local_date_minute(now_ms, self.utc_offset_secs);
        if self.cfg.protect_holidays && self.calendar.holidays.contains(&date) {
            return Some("holiday");
        }
        if self.cfg.protect_weekends
            && matches!(date.weekday(), Weekday::Sat | Weekday::Sun)
            && !self.calendar.workdays.contains(&date)
        {
            return Some("weekend");
        }
        if self
            .friendly
            .iter()
            .any(|(a, b)| minute >= *a && minute < *b)
        {
            return Some("friendly_hours");
        }
        None
    }

    /// Evaluates one account; appends flag changes and relay orders to `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn evaluate(
        &self,
        account_id: &str,
        meters: &[String],
        overdraft_limit: Decimal,
        balance: Decimal,
        entries: i64,
        flags: &BTreeSet<String>,
        now_ms: i64,
        out: &mut HookOut,
    ) {
        if !self.cfg.enabled {
            return;
        }
        let since = flags.iter().find_map(|f| {
            f.strip_prefix("control:below_since:")
                .and_then(|s| s.parse::<i64>().ok())
        });
        let tripped = flags.contains("control:tripped");
        let mut order = |command: &str, reason: String| {
            let id = stable_id(&[account_id, command, &entries.to_string()]);
            let o = RelayOrderMsg {
                id: id.clone(),
                account_id: account_id.to_string(),
                command: command.to_string(),
                meters: meters.to_vec(),
                balance: balance.normalize(),
                reason,
                ts_ms: now_ms,
            };
            out.outbox.push(OutboxMsg {
                id,
                kind: "relay".into(),
                account_id: account_id.to_string(),
                created_ms: now_ms,
                payload: serde_json::to_string(&o).expect("serializes"),
            });
        };
        if balance <= overdraft_limit {
            let since = match since {
                Some(s) => s,
                None => {
                    out.set_flags.push(format!("control:below_since:{now_ms}"));
                    now_ms
                }
            };
            let grace_ms = self.cfg.grace_hours as i64 * 3_600_000;
            if !tripped
                && now_ms - since >= grace_ms
                && self.protected(account_id, now_ms).is_none()
            {
                order(
                    "trip",
                    format!(
                        "balance {} at or below the overdraft limit {}",
                        balance.normalize(),
                        overdraft_limit.normalize()
                    ),
                );
                out.set_flags.push("control:tripped".into());
            }
        } else if let Some(s) = since {
            out.clear_flags.push(format!("control:below_since:{s}"));
        }
        // Never at a balance that trips again (a config not checked by `of_thresholds`).
        if tripped && balance >= self.cfg.reconnect_amount && balance > overdraft_limit {
            order(
                "allow_close",
                format!(
                    "balance {} at or above the reconnect amount {}",
                    balance.normalize(),
                    self.cfg.reconnect_amount.normalize()
                ),
            );
            out.clear_flags.push("control:tripped".into());
        }
    }
}

/// A relay order as stored in the outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayOrderMsg {
    pub id: String,
    pub account_id: String,
    /// `trip` or `allow_close`.
    pub command: String,
    pub meters: Vec<String>,
    pub balance: Decimal,
    pub reason: String,
    pub ts_ms: i64,
}

/// How to reach each meter's relay: `meter_id -> (bus, address)` from the
/// collectors config (`collectors.toml`), the file that already says which
/// gateway or serial line every meter hangs on. Master data says which
/// meters an account has; the head-end's routing belongs to the collector.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    pub buses: Vec<BusConfig>,
    pub meters: HashMap<String, (usize, Address)>,
    /// Offset of the meters' clocks from UTC (command expiry is meter-local).
    pub offset: Option<FixedOffset>,
}

impl Routes {
    pub fn from_collectors(cfg: &CollectorConfig) -> Routes {
        let mut r = Routes {
            offset: cfg.dlt645.offset().ok(),
            ..Default::default()
        };
        for (i, (bus, meters, _)) in crate::collector::dlt645::plan(cfg).into_iter().enumerate() {
            for m in meters {
                r.meters.insert(m.meter_id.clone(), (i, m.address));
            }
            r.buses.push(bus);
        }
        r
    }

    pub fn load(path: &Path) -> Result<Routes, PrepayError> {
        let cfg = CollectorConfig::load(path).map_err(|e| PrepayError::Input(e.to_string()))?;
        Ok(Routes::from_collectors(&cfg))
    }
}

/// How relay orders leave the ledger outbox.
#[derive(Debug, Clone)]
pub struct RelayDispatch {
    /// Append-only audit log (JSON lines); also the memory of which commands
    /// a meter acknowledged.
    pub audit: PathBuf,
    /// Send (true) or only audit the frames that would be sent (dry run).
    pub execute: bool,
    pub routes: Routes,
    pub password: Password,
    pub operator: Operator,
    /// The meter refuses a command this many minutes after it was built.
    pub expiry_minutes: i64,
    /// Protected windows are checked again when a trip is sent.
    pub control: Option<Control>,
    /// Clock override (tests, `--now`); wall clock otherwise.
    pub now_ms: Option<i64>,
}

impl RelayDispatch {
    /// Dry run with the defaults (no routes: meter ids are taken as addresses).
    pub fn dry_run(audit: PathBuf) -> RelayDispatch {
        RelayDispatch {
            audit,
            execute: false,
            routes: Routes::default(),
            password: Password {
                level: 2,
                code: [0, 0, 0],
            },
            operator: Operator::default(),
            expiry_minutes: 10,
            control: None,
            now_ms: None,
        }
    }
}

impl RelayDispatch {
    /// Settings from `[control]`: routes from `collectors` (or the override),
    /// operator and expiry; the password from `METERFLOW_DLT645_PASSWORD`
    /// (level + 6 digits, default `02000000`), never from a file.
    pub fn from_config(
        c: &ControlConfig,
        base_dir: &Path,
        audit: PathBuf,
        collectors: Option<PathBuf>,
        execute: bool,
        control: Option<Control>,
    ) -> Result<RelayDispatch, PrepayError> {
        let collectors = collectors.or_else(|| c.collectors.as_ref().map(|p| base_dir.join(p)));
        let routes = match &collectors {
            Some(p) => Routes::load(p)?,
            None if execute => {
                return Err(PrepayError::Input(
                    "--execute needs the collectors config that routes meters to buses: set [control] collectors or pass --collectors".into(),
                ))
            }
            None => Routes::default(),
        };
        let password = match std::env::var("METERFLOW_DLT645_PASSWORD") {
            Ok(p) => p.parse().map_err(|_| {
                PrepayError::Input(
                    "METERFLOW_DLT645_PASSWORD must be 8 digits: level then the 6-digit code"
                        .into(),
                )
            })?,
            Err(_) => Password {
                level: 2,
                code: [0, 0, 0],
            },
        };
        let operator = match &c.operator {
            Some(o) => o
                .parse()
                .map_err(|e| PrepayError::Input(format!("control.operator: {e}")))?,
            None => Operator::default(),
        };
        Ok(RelayDispatch {
            audit,
            execute,
            routes,
            password,
            operator,
            expiry_minutes: c.command_expiry_minutes.unwrap_or(10).max(1),
            control,
            now_ms: None,
        })
    }
}

/// Counters of one dispatch.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RelayStats {
    /// Pending orders looked at.
    pub orders: usize,
    /// Commands audited as dry runs (each once).
    pub dry_run: usize,
    pub accepted: usize,
    /// Answered with an error byte (left pending, tried again next time).
    pub refused: usize,
    /// No answer, link down or meter not routable (left pending).
    pub failed: usize,
    /// Commands acknowledged by an earlier run (not sent again).
    pub already_acknowledged: usize,
    /// Trips held back because `now` is protected (left pending).
    pub held_protected: usize,
    /// Orders replaced by a later order of the same account (not sent).
    pub superseded: usize,
}

/// The idempotency key of one command: order id + meter.
pub fn command_id(order_id: &str, meter: &str) -> String {
    stable_id(&[order_id, meter])
}

/// What the audit log says about each command id: acknowledged, dry-run audited.
#[derive(Debug, Default)]
struct AuditState {
    acknowledged: HashSet<String>,
    dry_run: HashSet<String>,
}

fn read_audit(path: &Path) -> Result<AuditState, PrepayError> {
    let mut st = AuditState::default();
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(st),
        Err(e) => return Err(PrepayError::io(path, e)),
    };
    // A torn line (a crash or a full disk mid-append) does not parse and is
    // skipped; cut inside a character, it must not make the whole log unreadable.
    let text = String::from_utf8_lossy(&bytes);
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(id), Some(ev)) = (v["command_id"].as_str(), v["event"].as_str()) else {
            continue;
        };
        match ev {
            "accepted" => {
                st.acknowledged.insert(id.to_string());
            }
            "dry_run" => {
                st.dry_run.insert(id.to_string());
            }
            _ => {}
        }
    }
    Ok(st)
}

/// An audit line written by the dispatcher itself (not sent: superseded, unroutable).
fn audit_note(
    log: &AuditLog,
    order: &RelayOrder,
    endpoint: &str,
    event: &str,
    response: String,
    cmd_id: &str,
) -> Result<(), PrepayError> {
    use crate::protocol::dlt645::frame::hex;
    use crate::protocol::dlt645::message::relay_request;
    let frame = relay_request(
        order.address,
        order.command,
        order.password,
        order.operator,
        order.expiry,
    );
    let e = order.expiry;
    let rec = AuditRecord {
        ts: chrono::Utc::now().to_rfc3339(),
        event: event.to_string(),
        meter: order.address.to_string(),
        endpoint: endpoint.to_string(),
        command: order.command.to_string(),
        operator: order.operator.to_string(),
        expiry: format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            e.year, e.month, e.day, e.hour, e.minute, e.second
        ),
        request_hex: hex(&frame.encode(0).expect("relay frames are short")),
        response: Some(response),
        user: std::env::var("USER").unwrap_or_default(),
        command_id: Some(cmd_id.to_string()),
    };
    log.append(&rec).map_err(|e| PrepayError::io(log.path(), e))
}

fn runtime(
    rt: &mut Option<tokio::runtime::Runtime>,
) -> Result<&tokio::runtime::Runtime, PrepayError> {
    if rt.is_none() {
        *rt = Some(
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| PrepayError::Input(e.to_string()))?,
        );
    }
    Ok(rt.as_ref().expect("just built"))
}

/// Dispatches the pending relay orders of the ledger outbox through the
/// DL/T 645 relay control (`collector::dlt645::relay::relay_control_keyed`).
///
/// Per order, oldest first: an order followed by a later one for the same
/// account is superseded (a trip never goes out after the top-up that
/// cancelled it); a trip is held while `now` is protected; each meter's
/// command has a stable id (order id + meter) written on its audit lines, and
/// a command the audit shows acknowledged is never sent again. An order
/// leaves the outbox once every meter acknowledged it; dry runs, refusals,
/// timeouts and held trips stay pending for the next run.
pub fn dispatch(ledger: &mut dyn Ledger, d: &RelayDispatch) -> Result<RelayStats, PrepayError> {
    let mut stats = RelayStats::default();
    let pending = ledger.pending_outbox_of("relay", 100_000)?;
    if pending.is_empty() {
        return Ok(stats);
    }
    let now_ms = d.now_ms.unwrap_or_else(crate::model::now_ms);
    let log = AuditLog::new(&d.audit);
    let mut seen = read_audit(&d.audit)?;
    let mut latest: HashMap<&str, usize> = HashMap::new();
    for (i, m) in pending.iter().enumerate() {
        latest.insert(m.account_id.as_str(), i);
    }
    let offset = d
        .routes
        .offset
        .unwrap_or_else(|| FixedOffset::east_opt(8 * 3600).expect("valid offset"));
    // Built on first use: a dispatch with nothing to send or audit needs none.
    let mut rt: Option<tokio::runtime::Runtime> = None;
    let mut buses: HashMap<usize, Bus> = HashMap::new();
    let mut done = Vec::new();
    for (i, m) in pending.iter().enumerate() {
        let o: RelayOrderMsg = serde_json::from_str(&m.payload)
            .map_err(|e| PrepayError::Input(format!("outbox {}: {e}", m.id)))?;
        stats.orders += 1;
        let command = match o.command.as_str() {
            "trip" => RelayCommand::Trip,
            _ => RelayCommand::AllowClose,
        };
        let superseded = latest.get(m.account_id.as_str()) != Some(&i);
        if !superseded && command == RelayCommand::Trip {
            if let Some(why) = d
                .control
                .as_ref()
                .and_then(|c| c.protected(&o.account_id, now_ms))
            {
                tracing::info!(order = %o.id, account = %o.account_id, why, "trip held: protected");
                stats.held_protected += 1;
                continue;
            }
        }
        let mut all_acknowledged = true;
        for meter in &o.meters {
            let cmd_id = command_id(&o.id, meter);
            if seen.acknowledged.contains(&cmd_id) {
                stats.already_acknowledged += 1;
                continue;
            }
            let route = d.routes.meters.get(meter).copied();
            let Some(address) = route.map(|r| r.1).or_else(|| meter.parse().ok()) else {
                tracing::error!(meter = %meter, "relay order for a meter that is not a DL/T 645 address");
                stats.failed += 1;
                all_acknowledged = false;
                continue;
            };
            let endpoint = route.map_or_else(
                || "unrouted".to_string(),
                |(b, _)| Endpoint::of(&d.routes.buses[b]).to_string(),
            );
            let order = RelayOrder::expiring_in(
                address,
                command,
                d.password,
                d.operator,
                d.expiry_minutes,
                offset,
            );
            if superseded {
                if d.execute {
                    audit_note(
                        &log,
                        &order,
                        &endpoint,
                        "superseded",
                        "a later order for the account replaces it".into(),
                        &cmd_id,
                    )?;
                }
                continue;
            }
            if !d.execute {
                all_acknowledged = false;
                if seen.dry_run.insert(cmd_id.clone()) {
                    runtime(&mut rt)?
                        .block_on(relay_control_keyed(
                            None,
                            &endpoint,
                            &order,
                            &log,
                            false,
                            Some(&cmd_id),
                        ))
                        .map_err(|e| PrepayError::Input(e.to_string()))?;
                    stats.dry_run += 1;
                }
                continue;
            }
            let Some((b, _)) = route else {
                audit_note(
                    &log,
                    &order,
                    &endpoint,
                    "failed",
                    format!("meter {meter} is in no bus of the collectors config"),
                    &cmd_id,
                )?;
                stats.failed += 1;
                all_acknowledged = false;
                continue;
            };
            if let std::collections::hash_map::Entry::Vacant(v) = buses.entry(b) {
                match runtime(&mut rt)?
                    .block_on(crate::collector::dlt645::connect(&d.routes.buses[b]))
                {
                    Ok(bus) => {
                        v.insert(bus);
                    }
                    Err(e) => {
                        audit_note(
                            &log,
                            &order,
                            &endpoint,
                            "failed",
                            format!("cannot connect: {e}"),
                            &cmd_id,
                        )?;
                        stats.failed += 1;
                        all_acknowledged = false;
                        continue;
                    }
                }
            }
            let bus = buses.get_mut(&b).expect("inserted above");
            match runtime(&mut rt)?.block_on(relay_control_keyed(
                Some(bus),
                &endpoint,
                &order,
                &log,
                true,
                Some(&cmd_id),
            )) {
                Ok(RelayOutcome::Accepted) => {
                    stats.accepted += 1;
                    seen.acknowledged.insert(cmd_id);
                }
                Ok(RelayOutcome::Refused(s)) => {
                    tracing::error!(meter = %meter, command = %command, "relay command refused: {s}");
                    stats.refused += 1;
                    all_acknowledged = false;
                }
                Ok(RelayOutcome::DryRun { .. }) => all_acknowledged = false,
                Err(RelayError::Tx(e)) => {
                    tracing::error!(meter = %meter, command = %command, "relay command not answered: {e}");
                    if matches!(e, TxError::Io(_)) {
                        buses.remove(&b);
                    }
                    stats.failed += 1;
                    all_acknowledged = false;
                }
                Err(RelayError::Audit(e)) => return Err(PrepayError::io(log.path(), e)),
            }
        }
        if superseded {
            stats.superseded += 1;
            if d.execute {
                done.push((m.account_id.as_str(), m.id.as_str()));
            }
        } else if all_acknowledged {
            done.push((m.account_id.as_str(), m.id.as_str()));
        }
    }
    ledger.mark_delivered(&done)?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;
    use rust_decimal_macros::dec;

    #[test]
    fn torn_audit_lines_are_skipped_even_when_cut_inside_a_character() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let line = |id: &str, ev: &str| format!("{{\"command_id\":\"{id}\",\"event\":\"{ev}\"}}\n");
        let mut log = line("c1", "accepted").into_bytes();
        // Half of a record whose operator name is "张三": cut inside "张".
        log.extend_from_slice(&"{\"command_id\":\"c2\",\"user\":\"张三".as_bytes()[..28]);
        log.push(b'\n');
        log.extend_from_slice(line("c3", "accepted").as_bytes());
        log.extend_from_slice(line("c4", "dry_run").as_bytes());
        std::fs::write(&path, log).unwrap();
        let st = read_audit(&path).unwrap();
        let mut acked: Vec<_> = st.acknowledged.into_iter().collect();
        acked.sort();
        assert_eq!(acked, vec!["c1", "c3"]);
        assert!(st.dry_run.contains("c4"));
    }

    fn control() -> Control {
        let cfg = ControlConfig {
            enabled: true,
            grace_hours: 24,
            reconnect_amount: dec!(10),
            friendly_hours: vec!["16:00-08:00".into()],
            protect_weekends: true,
            protect_holidays: true,
            calendars: vec![],
            protected_accounts: vec!["AP".into()],
            timezone: None,
            audit_log: None,
            ..Default::default()
        };
        let mut c = Control::new(cfg, std::path::Path::new(".")).unwrap();
        c.calendar.years.insert(2026);
        c.calendar
            .holidays
            .insert(NaiveDate::from_ymd_opt(2026, 10, 1).unwrap());
        c.calendar
            .workdays
            .insert(NaiveDate::from_ymd_opt(2026, 10, 10).unwrap());
        c
    }

    /// UTC ms of a local (UTC+8) time.
    fn local(y: i32, m: u32, d: u32, h: u32) -> i64 {
        NaiveDate::from_ymd_opt(y, m, d)
            .unwrap()
            .and_hms_opt(h, 0, 0)
            .unwrap()
            .and_utc()
            .timestamp_millis()
            - 8 * 3_600_000
    }

    #[test]
    fn protected_windows_cover_friendly_hours_weekends_holidays_and_flagged_accounts() {
        let c = control();
        assert_eq!(c.protected("A1", local(2026, 10, 1, 10)), Some("holiday"));
        assert_eq!(c.protected("A1", local(2026, 10, 11, 10)), Some("weekend")); // Sunday
        assert_eq!(c.protected("A1", local(2026, 10, 10, 10)), None); // a Saturday worked
        assert_eq!(
            c.protected("A1", local(2026, 10, 12, 17)),
            Some("friendly_hours")
        );
        assert_eq!(
            c.protected("A1", local(2026, 10, 12, 7)),
            Some("friendly_hours")
        );
        assert_eq!(c.protected("A1", local(2026, 10, 12, 10)), None);
        assert_eq!(
            c.protected("AP", local(2026, 10, 12, 10)),
            Some("account_protected")
        );
    }

    fn run(c: &Control, account: &str, steps: &[(Decimal, i64)]) -> Vec<String> {
        let mut flags = BTreeSet::new();
        let mut cmds = Vec::new();
        for (i, (b, now)) in steps.iter().enumerate() {
            let mut out = HookOut::default();
            c.evaluate(
                account,
                &["300000000001".into()],
                dec!(-30),
                *b,
                i as i64,
                &flags,
                *now,
                &mut out,
            );
            for f in out.clear_flags {
                flags.remove(&f);
            }
            flags.extend(out.set_flags);
            for m in out.outbox {
                cmds.push(
                    serde_json::from_str::<RelayOrderMsg>(&m.payload)
                        .unwrap()
                        .command,
                );
            }
        }
        cmds
    }

    #[test]
    fn trip_only_after_the_grace_period_and_outside_protected_windows() {
        let c = control();
        // Falls below on Monday 12 Oct 10:00; Tuesday 09:00 is inside grace; Tuesday 10:00 trips.
        let cmds = run(
            &c,
            "A1",
            &[
                (dec!(-31), local(2026, 10, 12, 10)),
                (dec!(-32), local(2026, 10, 13, 9)),
                (dec!(-33), local(2026, 10, 13, 10)),
                (dec!(-34), local(2026, 10, 13, 11)),
            ],
        );
        assert_eq!(cmds, vec!["trip"]);
        // Grace over on a Saturday: held until Monday 08:00 (friendly hours end).
        let cmds = run(
            &c,
            "A1",
            &[
                (dec!(-31), local(2026, 10, 16, 10)),
                (dec!(-31), local(2026, 10, 17, 12)),
                (dec!(-31), local(2026, 10, 19, 7)),
                (dec!(-31), local(2026, 10, 19, 8)),
            ],
        );
        assert_eq!(cmds, vec!["trip"]);
        // A protected account is never tripped.
        let cmds = run(
            &c,
            "AP",
            &[
                (dec!(-31), local(2026, 10, 12, 10)),
                (dec!(-31), local(2026, 10, 14, 10)),
            ],
        );
        assert!(cmds.is_empty());
    }

    #[test]
    fn a_reconnect_amount_at_or_below_an_overdraft_limit_is_refused_naming_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("th.toml");
        let check = |text: &str| {
            std::fs::write(&path, text).unwrap();
            let th = Thresholds::load(&path).unwrap();
            Control::of_thresholds(&th, &path).map(|c| c.is_some())
        };
        let control = "[control]\nenabled = true\nreconnect_amount = \"-50\"\n";
        let err = check(&format!("[default]\noverdraft_limit = \"-30\"\n{control}"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "{}:5: control.reconnect_amount: -50 must be above the overdraft limit -30 of default, or relays trip and reconnect in turn",
                path.display()
            )
        );
        // A comment naming the key before the table does not move the line.
        let err = check(&format!(
            "# reconnect_amount: see docs\n[default]\noverdraft_limit = \"-30\"\n{control}"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("th.toml:6:"), "{err}");
        // The default reconnect amount 0 with no limit set (0): refused too,
        // at the table's header.
        let err = check("[control]\nenabled = true\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("control.reconnect_amount"), "{err}");
        assert!(err.contains("th.toml:1:"), "{err}");
        // A class whose limit is above the reconnect amount.
        let err = check(&format!(
            "[default]\noverdraft_limit = \"-100\"\n[class.x]\noverdraft_limit = \"-40\"\n{control}"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("of class.x"), "{err}");
        assert!(check(&format!("[default]\noverdraft_limit = \"-60\"\n{control}")).unwrap());
        // A disabled control is not checked.
        assert!(check("[control]\nenabled = false\n").unwrap());
    }

    #[test]
    fn a_balance_that_trips_never_allows_close_whatever_the_reconnect_amount() {
        let mut c = control();
        c.cfg.reconnect_amount = dec!(-40);
        let t = local(2026, 10, 12, 10);
        let steps: Vec<(Decimal, i64)> = (0..5).map(|i| (dec!(-35), t + i * 86_400_000)).collect();
        assert_eq!(run(&c, "A1", &steps), vec!["trip"]);
    }

    #[test]
    fn allow_close_after_a_top_up_above_the_reconnect_amount() {
        let c = control();
        let t = local(2026, 10, 12, 10);
        let cmds = run(
            &c,
            "A1",
            &[
                (dec!(-31), t),
                (dec!(-31), t + 86_400_000),
                (dec!(5), t + 90_000_000),
                (dec!(50), t + 91_000_000),
            ],
        );
        assert_eq!(cmds, vec!["trip", "allow_close"]);
    }
}
