//! Remote fee control rules (pure) and their dispatch through the DL/T 645
//! relay control of the collector (`collector::dlt645::relay`).
//!
//! * Balance at or below the overdraft limit: the time it got there is kept
//!   (flag `control:below_since:MS`); once `grace_hours` have passed, a trip is
//!   ordered, unless the moment is protected.
//! * Tripped and the balance back at or above `reconnect_amount`: allow-close.
//! * Protected (never trip): the account's protect flag, friendly hours,
//!   weekends, holidays of the calendar files. Allow-close is never held back.
//! * Orders go to the ledger outbox in the same transaction; the dispatcher
//!   sends them dry-run (audit log only) unless `--execute`.

use std::collections::BTreeSet;

use chrono::{Datelike, Weekday};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::alerts::{stable_id, ControlConfig};
use super::pricing::local_date_minute;
use super::PrepayError;
use crate::ledger::{HookOut, OutboxMsg};
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
        if tripped && balance >= self.cfg.reconnect_amount {
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

/// Sends one order's commands through the DL/T 645 relay control: dry-run
/// (audit only) here; with a bus (`--execute`) the collector sends them.
pub fn dispatch_dry_run(
    msg: &RelayOrderMsg,
    audit: &std::path::Path,
) -> Result<Vec<String>, PrepayError> {
    use crate::collector::dlt645::relay::{relay_control, AuditLog, RelayOrder, RelayOutcome};
    use crate::protocol::dlt645::message::{Operator, Password, RelayCommand};
    let log = AuditLog::new(audit);
    let command = match msg.command.as_str() {
        "trip" => RelayCommand::Trip,
        _ => RelayCommand::AllowClose,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| PrepayError::Input(e.to_string()))?;
    let mut frames = Vec::new();
    for m in &msg.meters {
        let address = m
            .parse()
            .map_err(|_| PrepayError::Input(format!("meter '{m}' is not a DL/T 645 address")))?;
        let order = RelayOrder::expiring_in(
            address,
            command,
            Password {
                level: 2,
                code: [0, 0, 0],
            },
            Operator::default(),
            30,
            chrono::FixedOffset::east_opt(8 * 3600).expect("valid offset"),
        );
        let outcome = rt
            .block_on(relay_control(
                None,
                &format!("prepay:{}", msg.id),
                &order,
                &log,
                false,
            ))
            .map_err(|e| PrepayError::Input(e.to_string()))?;
        if let RelayOutcome::DryRun { request_hex } = outcome {
            frames.push(request_hex);
        }
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;
    use rust_decimal_macros::dec;

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
