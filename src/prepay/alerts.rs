//! Thresholds and low-balance alerts.
//!
//! A thresholds file (TOML) sets alert levels, the zero alert, the overdraft
//! limit and the days-of-credit forecast per account, tariff, customer class
//! or by default (most specific wins, field by field). Evaluation is pure: it
//! takes the balance and the flags stored with the account in the ledger and
//! returns flags to set/clear and alerts. A level fires once when the balance
//! falls below it, and fires again only after the balance went back to or
//! above it (the flag is cleared then). The alert id is derived from account,
//! alert kind, threshold and the account's entry count at the crossing, so
//! it is stable across re-deliveries and crash-replays.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{line_of, PrepayError};
use crate::ledger::{HookOut, OutboxMsg};

/// Thresholds of one scope; unset fields fall back to the wider scope.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Levels {
    /// Alert when the balance falls below each of these amounts (yuan).
    pub levels: Option<Vec<Decimal>>,
    /// Alert when the balance reaches zero or less.
    pub zero: Option<bool>,
    /// The lowest balance allowed (<= 0): alert when it is used up; relay rules trip below it.
    pub overdraft_limit: Option<Decimal>,
    /// Alert when the forecast days of credit left are at or below this.
    pub forecast_days: Option<Decimal>,
}

/// Remote fee control settings (see `control`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    #[serde(default)]
    pub enabled: bool,
    /// Hours the balance must stay below the overdraft limit before a trip.
    #[serde(default)]
    pub grace_hours: u32,
    /// Allow-close once the balance is at or above this (yuan).
    #[serde(default)]
    pub reconnect_amount: Decimal,
    /// Local time ranges `HH:MM-HH:MM` with no disconnection (a range may cross midnight).
    #[serde(default)]
    pub friendly_hours: Vec<String>,
    #[serde(default)]
    pub protect_weekends: bool,
    #[serde(default)]
    pub protect_holidays: bool,
    /// Calendar files (`tariffs/calendars/*.toml`), relative to the thresholds file.
    #[serde(default)]
    pub calendars: Vec<String>,
    /// Accounts that are never tripped (medical equipment, ...).
    #[serde(default)]
    pub protected_accounts: Vec<String>,
    /// Time zone of friendly hours and calendar days (default Asia/Shanghai).
    pub timezone: Option<String>,
    /// Append-only audit log of relay commands (default `relay-audit.jsonl` beside the thresholds file).
    pub audit_log: Option<String>,
    /// `collectors.toml` that routes each meter to its bus (relative to the thresholds file); `--collectors` overrides.
    pub collectors: Option<String>,
    /// Operator code sent with relay commands, 8 hex digits (default `00000000`).
    pub operator: Option<String>,
    /// The meter refuses a relay command this many minutes after it was built (default 10).
    pub command_expiry_minutes: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ThresholdsFile {
    #[serde(default)]
    default: Levels,
    #[serde(default)]
    class: BTreeMap<String, Levels>,
    #[serde(default)]
    tariff: BTreeMap<String, Levels>,
    #[serde(default)]
    account: BTreeMap<String, Levels>,
    control: Option<ControlConfig>,
}

/// Loaded thresholds.
#[derive(Debug, Clone, Default)]
pub struct Thresholds {
    pub default: Levels,
    pub class: BTreeMap<String, Levels>,
    pub tariff: BTreeMap<String, Levels>,
    pub account: BTreeMap<String, Levels>,
    pub control: Option<ControlConfig>,
    /// Folder of the file (relative paths resolve against it).
    pub base_dir: std::path::PathBuf,
}

impl Thresholds {
    /// 50 and 20 yuan, zero, overdraft limit -30, 3 days of credit.
    pub fn builtin() -> Thresholds {
        Thresholds {
            default: Levels {
                levels: Some(vec![Decimal::new(50, 0), Decimal::new(20, 0)]),
                zero: Some(true),
                overdraft_limit: Some(Decimal::new(-30, 0)),
                forecast_days: Some(Decimal::new(3, 0)),
            },
            ..Default::default()
        }
    }

    pub fn load(path: &Path) -> Result<Thresholds, PrepayError> {
        let text = std::fs::read_to_string(path).map_err(|e| PrepayError::io(path, e))?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Thresholds, PrepayError> {
        let f: ThresholdsFile = toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(0, |s| line_of(text, s.start));
            let msg = e.message().to_string();
            let field = msg
                .split('`')
                .nth(1)
                .map(str::to_string)
                .unwrap_or_else(|| "-".into());
            PrepayError::Config {
                file: path.display().to_string(),
                line,
                field,
                message: msg,
            }
        })?;
        let t = Thresholds {
            default: f.default,
            class: f.class,
            tariff: f.tariff,
            account: f.account,
            control: f.control,
            base_dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
        };
        for (table, l) in std::iter::once((vec!["default"], &t.default))
            .chain(t.class.iter().map(|(k, v)| (vec!["class", k.as_str()], v)))
            .chain(
                t.tariff
                    .iter()
                    .map(|(k, v)| (vec!["tariff", k.as_str()], v)),
            )
            .chain(
                t.account
                    .iter()
                    .map(|(k, v)| (vec!["account", k.as_str()], v)),
            )
        {
            if l.overdraft_limit.is_some_and(|o| o > Decimal::ZERO) {
                let mut key = table.clone();
                key.push("overdraft_limit");
                return Err(PrepayError::Config {
                    file: path.display().to_string(),
                    line: key_line(text, &key),
                    field: format!("{}.overdraft_limit", table.join(".")),
                    message: "must be zero or negative (the lowest balance allowed)".into(),
                });
            }
        }
        Ok(t)
    }

    /// Effective levels: account, then tariff, then class, then default.
    pub fn for_account(&self, account_id: &str, tariff_id: &str, class: &str) -> Levels {
        let scopes = [
            self.account.get(account_id),
            self.tariff.get(tariff_id),
            self.class.get(class),
            Some(&self.default),
        ];
        let scopes = scopes.iter().flatten();
        // Field by field, most specific first; only the chosen list is cloned.
        Levels {
            levels: scopes.clone().find_map(|l| l.levels.as_ref()).cloned(),
            zero: scopes.clone().find_map(|l| l.zero),
            overdraft_limit: scopes.clone().find_map(|l| l.overdraft_limit),
            forecast_days: scopes.clone().find_map(|l| l.forecast_days),
        }
    }
}

/// 1-based line of the key at `path` (table names, then the key) in a TOML
/// text, wherever it is written (`[class.x]` table, dotted key, inline
/// table); the first line naming the last key when the path is not found.
pub(crate) fn key_line(text: &str, path: &[&str]) -> usize {
    let found = (|| {
        let doc = toml_edit::ImDocument::parse(text).ok()?;
        let (last, tables) = path.split_last()?;
        let mut t: &dyn toml_edit::TableLike = doc.as_table();
        for name in tables {
            t = t.get(name)?.as_table_like()?;
        }
        let (k, v) = t.get_key_value(last)?;
        k.span().or_else(|| v.span()).map(|s| s.start)
    })();
    found
        .or_else(|| path.last().and_then(|k| text.find(k)))
        .map_or(0, |o| line_of(text, o))
}

/// One alert as published (MQTT JSON, webhook body, `alerts` dataset row).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    pub id: String,
    pub account_id: String,
    /// `below_level`, `zero`, `overdraft`, `low_days`.
    pub kind: String,
    pub threshold: Decimal,
    pub balance: Decimal,
    /// Forecast days of credit left at recent daily use (None without use).
    pub days_left: Option<Decimal>,
    /// When raised, UTC ms.
    pub ts_ms: i64,
}

pub fn stable_id(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0x1f]);
    }
    hex::encode(&h.finalize()[..12])
}

/// Days of credit left: balance / daily spend, one decimal (None without spend).
pub fn days_left(balance: Decimal, daily_spend: Option<Decimal>) -> Option<Decimal> {
    let s = daily_spend.filter(|s| *s > Decimal::ZERO)?;
    Some((balance.max(Decimal::ZERO) / s).round_dp(1))
}

/// Evaluates the alert levels of one account. Appends to `out`.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    account_id: &str,
    levels: &Levels,
    balance: Decimal,
    entries: i64,
    daily_spend: Option<Decimal>,
    flags: &BTreeSet<String>,
    now_ms: i64,
    out: &mut HookOut,
) {
    let days = days_left(balance, daily_spend);
    let mut check = |kind: &str, threshold: Decimal, below: bool| {
        if !below && flags.is_empty() {
            return; // above the level and never alerted: nothing to raise or re-arm
        }
        let flag = format!("alert:{kind}:{}", threshold.normalize());
        let was = flags.contains(&flag);
        if below && !was {
            let id = stable_id(&[
                account_id,
                kind,
                &threshold.normalize().to_string(),
                &entries.to_string(),
            ]);
            let alert = Alert {
                id: id.clone(),
                account_id: account_id.to_string(),
                kind: kind.to_string(),
                threshold: threshold.normalize(),
                balance: balance.normalize(),
                days_left: days,
                ts_ms: now_ms,
            };
            out.outbox.push(OutboxMsg {
                id,
                kind: "alert".into(),
                account_id: account_id.to_string(),
                created_ms: now_ms,
                payload: serde_json::to_string(&alert).expect("alert serializes"),
            });
            out.set_flags.push(flag);
        } else if !below && was {
            out.clear_flags.push(flag);
        }
    };
    for l in levels.levels.iter().flatten() {
        check("below_level", *l, balance < *l);
    }
    if levels.zero.unwrap_or(false) {
        check("zero", Decimal::ZERO, balance <= Decimal::ZERO);
    }
    if let Some(o) = levels.overdraft_limit {
        check("overdraft", o, balance <= o);
    }
    // Without a forecast (no recent use known, e.g. a new meter) the state
    // is kept: neither raised nor re-armed, so a restart cannot repeat it.
    if let (Some(f), Some(d)) = (levels.forecast_days, days) {
        check("low_days", f, d <= f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    fn levels() -> Levels {
        Thresholds::builtin().default
    }

    /// Runs a balance sequence through evaluate with flags kept like the ledger keeps them.
    fn alerts_for(balances: &[Decimal]) -> Vec<Alert> {
        let mut flags = BTreeSet::new();
        let mut all = Vec::new();
        for (i, b) in balances.iter().enumerate() {
            let mut out = HookOut::default();
            evaluate("A1", &levels(), *b, i as i64 + 1, None, &flags, 0, &mut out);
            for f in out.clear_flags {
                flags.remove(&f);
            }
            flags.extend(out.set_flags);
            all.extend(
                out.outbox
                    .iter()
                    .map(|m| serde_json::from_str::<Alert>(&m.payload).unwrap()),
            );
        }
        all
    }

    #[test]
    fn one_alert_per_level_crossing_until_back_above() {
        let a = alerts_for(&[dec!(100), dec!(45), dec!(40), dec!(30), dec!(45)]);
        assert_eq!(a.len(), 1);
        assert_eq!(
            (a[0].kind.as_str(), a[0].threshold),
            ("below_level", dec!(50))
        );
        // A top-up above 50 re-arms the level; the next fall alerts again with a new id.
        let a = alerts_for(&[dec!(45), dec!(80), dec!(45)]);
        assert_eq!(a.len(), 2);
        assert_ne!(a[0].id, a[1].id);
    }

    #[test]
    fn falling_through_every_level_raises_each_once() {
        let a = alerts_for(&[dec!(60), dec!(-35), dec!(-40)]);
        let kinds: Vec<_> = a.iter().map(|x| (x.kind.clone(), x.threshold)).collect();
        assert_eq!(
            kinds,
            vec![
                ("below_level".into(), dec!(50)),
                ("below_level".into(), dec!(20)),
                ("zero".into(), dec!(0)),
                ("overdraft".into(), dec!(-30))
            ]
        );
    }

    #[test]
    fn forecast_alerts_when_days_left_fall_below() {
        let mut out = HookOut::default();
        evaluate(
            "A1",
            &levels(),
            dec!(100),
            1,
            Some(dec!(40)),
            &BTreeSet::new(),
            0,
            &mut out,
        );
        let kinds: Vec<_> = out.set_flags.clone();
        assert_eq!(kinds, vec!["alert:low_days:3".to_string()]);
        assert_eq!(days_left(dec!(100), Some(dec!(40))), Some(dec!(2.5)));
    }

    #[test]
    fn most_specific_scope_wins_field_by_field() {
        let t = Thresholds::parse(
            "[default]\nlevels=[\"50\",\"20\"]\nzero=true\n[class.commercial]\nlevels=[\"500\"]\n[account.A9]\noverdraft_limit=\"-100\"\n",
            Path::new("t.toml"),
        )
        .unwrap();
        let l = t.for_account("A9", "x", "commercial");
        assert_eq!(l.levels, Some(vec![dec!(500)]));
        assert_eq!(l.overdraft_limit, Some(dec!(-100)));
        assert_eq!(l.zero, Some(true));
    }

    fn config_error_line(text: &str) -> (usize, String) {
        match Thresholds::parse(text, Path::new("t.toml")).unwrap_err() {
            PrepayError::Config { line, field, .. } => (line, field),
            e => panic!("not a config error: {e}"),
        }
    }

    #[test]
    fn a_bad_overdraft_limit_is_reported_at_its_own_table() {
        // [default] has a valid limit first: the error must not point there.
        let text = "[default]\noverdraft_limit = \"-30\"\n\n[class.commercial]\nlevels = [\"500\"]\noverdraft_limit = \"5\"\n";
        assert_eq!(
            config_error_line(text),
            (6, "class.commercial.overdraft_limit".into())
        );
        // A comment naming the key and a dotted key / inline table.
        let text = "# overdraft_limit: <= 0\n[default]\noverdraft_limit = \"-30\"\n[tariff]\nt1 = { zero = true }\nt2 = { overdraft_limit = \"1\" }\n";
        assert_eq!(
            config_error_line(text),
            (6, "tariff.t2.overdraft_limit".into())
        );
        let text = "account.A1.overdraft_limit = \"2\"\n[default]\noverdraft_limit = \"-30\"\n";
        assert_eq!(
            config_error_line(text),
            (1, "account.A1.overdraft_limit".into())
        );
        let text = "[default]\nzero = true\noverdraft_limit = \"3\"\n";
        assert_eq!(
            config_error_line(text),
            (3, "default.overdraft_limit".into())
        );
    }

    #[test]
    fn the_sample_thresholds_load_and_audit_outside_the_repository() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let t = Thresholds::load(&root.join("sample-data/thresholds.toml")).unwrap();
        assert_eq!(t.class["commercial"].overdraft_limit, Some(dec!(-300)));
        let c = t.control.expect("sample has [control]");
        let audit = t.base_dir.join(c.audit_log.expect("sample sets audit_log"));
        assert!(
            !audit.starts_with(root),
            "{} is inside the repository",
            audit.display()
        );
    }

    #[test]
    fn config_errors_name_file_line_and_field() {
        let e = Thresholds::parse(
            "[default]\nlevels=[\"50\"]\nzerro=true\n",
            Path::new("t.toml"),
        )
        .unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("t.toml:3:"), "{s}");
        assert!(s.contains("zerro"), "{s}");
    }
}
