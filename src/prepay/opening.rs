//! Prepaid accounts switching to meterflow from another system
//! (`meterflow ledger import-balances`, docs/prepay.md).
//!
//! Each row gives an account's balance at its switch instant (the old
//! system deducted every reading up to it) and its tier position (kWh of
//! its accumulation window consumed before the switch). One transaction per
//! group of accounts writes, for each: one `adjustment` entry (key
//! `open:ACCOUNT`, at the switch) and a cursor for each of its meters at the
//! switch. `prepay run` and `stream` then find every reading at or before
//! the switch stale, and charge the next ones from the meter's reading at
//! the switch at the imported position: nothing the old system deducted is
//! deducted again, and nothing after it is missed. `ledger import-payments`
//! does not credit an opened account's payments made at or before its
//! switch: the opening balance holds them. Both check the other inside
//! their transactions (on the account's balance row), so running them at
//! the same time neither credits a payment twice nor opens an account over
//! one.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use chrono::{NaiveDate, Offset};
use rust_decimal::Decimal;

use super::pricing::{local_date_minute, Pricer, Window};
use super::run::{interval_meters, load_readings_with, tou_meters, Fleet, RegisterReading};
use super::{deduct, interval, PrepayError};
use crate::ledger::{Batch, Cursor, EntryKind, Ledger, NewEntry, NoHook, TouCursor};
use crate::master::{Account, Meter, PrepaidOpening};
use crate::tariff::tou::MAX_PERIODS;

/// Key prefix of opening entries: `open:ACCOUNT`.
pub const KEY_PREFIX: &str = "open:";

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct OpeningReport {
    pub rows: usize,
    /// Accounts opened by this import.
    pub imported: usize,
    /// Accounts already opened with the same balance, instant and position.
    pub already: usize,
    /// Meters of accounts opened earlier that had no cursor yet (added to
    /// `meters.csv` since): given their cursor at the switch.
    pub meters_added: usize,
    /// Sum of the balances this import entered.
    pub balance: Decimal,
    /// Rows not imported: `FILE:LINE: account A: reason`.
    pub refused: Vec<String>,
    /// Rows that did not parse: `FILE:LINE: field 'F': reason`.
    pub bad_rows: Vec<String>,
}

/// The key of `account`'s opening entry.
pub fn key(account: &str) -> String {
    format!("{KEY_PREFIX}{account}")
}

/// An instant as RFC 3339 in UTC (messages).
pub(crate) fn rfc3339(ms: i64) -> String {
    local_time(ms, 0)
}

/// An instant as RFC 3339 at `offset_secs` east of UTC (messages).
fn local_time(ms: i64, offset_secs: i32) -> String {
    let off = chrono::FixedOffset::east_opt(offset_secs).unwrap_or(chrono::Utc.fix());
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(
        || format!("{ms} ms"),
        |t| t.with_timezone(&off).to_rfc3339(),
    )
}

/// The opening entry of `row`.
fn entry_of(row: &PrepaidOpening, file: &str) -> NewEntry {
    NewEntry {
        key: key(&row.account_id),
        account_id: row.account_id.clone(),
        kind: EntryKind::Adjustment,
        amount: row.balance,
        ts_ms: row.switched_at.timestamp_millis(),
        source: "opening".into(),
        detail: serde_json::json!({
            "file": file,
            "line": row.line,
            "position_kwh": row.position_kwh.normalize().to_string(),
        })
        .to_string(),
    }
}

/// One account's opening (or, for one opened earlier, the cursors of its
/// meters added since), ready to commit.
struct Planned {
    /// `FILE:LINE: account A`, for a refusal at commit.
    row: String,
    /// The opening entry, and how many entries the account held when it
    /// was checked (the commit's precondition); None: cursors only.
    entry: Option<(NewEntry, i64)>,
    cursors: Vec<Cursor>,
}

/// What the fleet, the tariffs and the lake say of the switch instants.
struct Context<'a> {
    fleet: &'a Fleet,
    pricer: &'a dyn Pricer,
    /// Register readings of the prepaid meters around the switch instants.
    readings: HashMap<&'a str, Vec<RegisterReading>>,
    /// Per switch instant: meters deducted from intervals, and meters on
    /// time-of-use registers, as the tariff of the first quarter hour after
    /// the switch has them (what meterflow deducts).
    kinds: HashMap<i64, (HashSet<String>, HashSet<String>)>,
}

impl Context<'_> {
    /// The account's UTC offset, and the last local day before `at`: a
    /// meter installed on it was in service at the switch, one removed on
    /// it was not.
    fn local(&self, account: &Account, at: i64) -> Result<(i32, NaiveDate), String> {
        let off = self
            .pricer
            .utc_offset_secs(account)
            .map_err(|e| e.to_string())?;
        Ok((off, local_date_minute(at - 1, off).0))
    }

    /// The cursors that start `account`'s deductions at `row`'s switch.
    /// With `added` (an account opened earlier), only those of the meters
    /// it picks, at position 0 (the account's position is its first
    /// meters'), and without the account's own checks, passed then.
    fn cursors(
        &self,
        account: &Account,
        row: &PrepaidOpening,
        added: Option<&dyn Fn(&Meter) -> bool>,
    ) -> Result<Vec<Cursor>, String> {
        let at = row.switched_at.timestamp_millis();
        let (off, day) = self.local(account, at)?;
        let w = self.pricer.window(account, at).map_err(|e| e.to_string())?;
        let serving = |m: &Meter| m.installed_on <= day && m.removed_on.is_none_or(|r| r > day);
        let meters: Vec<&Meter> = self.fleet.meters_of(&account.account_id).collect();
        let (meters, position) = match added {
            Some(pick) => (
                meters.into_iter().filter(|m| pick(m)).collect(),
                Decimal::ZERO,
            ),
            None => {
                let in_service = meters.iter().filter(|m| serving(m)).count();
                check_account(account, row, &w, off, in_service)?;
                (meters, row.position_kwh)
            }
        };
        let at_switch = AtSwitch {
            at,
            off,
            window_start_ms: w.start_ms,
        };
        meters
            .into_iter()
            // A meter installed after the switch: all its readings are the
            // new system's, and its first reading is its baseline.
            .filter(|m| m.installed_on <= day)
            .map(|m| {
                let position = if serving(m) { position } else { Decimal::ZERO };
                self.cursor_for(m, &at_switch, position, serving(m))
            })
            .collect()
    }

    /// The cursor of meter `m` at the switch; `serving`: in service then
    /// (else removed before it).
    fn cursor_for(
        &self,
        m: &Meter,
        s: &AtSwitch,
        position: Decimal,
        serving: bool,
    ) -> Result<Cursor, String> {
        let (by_interval, tou) = &self.kinds[&s.at];
        let mut c = Cursor {
            meter_id: m.meter_id.clone(),
            channel: deduct::CHANNEL.into(),
            window_start_ms: s.window_start_ms,
            position,
            last_ts_ms: s.at,
            last_value: Decimal::ZERO,
            // The window's start, not the switch: a reading between the
            // two is stale, never charged "in front" of the position.
            first_ts_ms: s.window_start_ms,
            first_value: Decimal::ZERO,
            held: None,
            tou: None,
        };
        if by_interval.contains(&m.meter_id) {
            // The window's quarter hours up to the switch are charged.
            let slots = u32::try_from((s.at - s.window_start_ms) / interval::INTERVAL_MS)
                .map_err(|_| "the switch is too far from its window's start".to_string())?;
            c.channel = interval::CHANNEL.into();
            c.tou = Some(TouCursor {
                periods: vec![Decimal::ZERO; MAX_PERIODS],
                intervals: if slots > 0 {
                    vec![(0, slots)]
                } else {
                    Vec::new()
                },
                ..Default::default()
            });
            return Ok(c);
        }
        let readings = self.readings.get(m.meter_id.as_str());
        if !serving {
            // Removed before the switch: its readings are the old system's,
            // and the cursor keeps them stale.
            if let Some(&(_, v, _)) = readings.and_then(|r| r.iter().rev().find(|r| r.0 <= s.at)) {
                (c.last_value, c.first_value) = (v, v);
            }
            return Ok(c);
        }
        let Some(&(_, v, regs)) =
            readings.and_then(|r| r.binary_search_by_key(&s.at, |r| r.0).ok().map(|i| &r[i]))
        else {
            return Err(format!(
                "meter {} has no chargeable {} reading at the switch ({}) in the lake: the switch is the instant of a reading the old system deducted through",
                m.meter_id,
                deduct::CHANNEL,
                local_time(s.at, s.off)
            ));
        };
        (c.last_value, c.first_value) = (v, v);
        if tou.contains(&m.meter_id) {
            let Some(r) = regs else {
                return Err(format!(
                    "meter {} is on time-of-use registers and has no T1..T4 reading at the switch ({})",
                    m.meter_id,
                    local_time(s.at, s.off)
                ));
            };
            // Per-period kWh restart at the switch (the file gives the
            // total position only).
            c.tou = Some(TouCursor {
                last: r,
                first: r,
                periods: vec![Decimal::ZERO; MAX_PERIODS],
                held: None,
                intervals: Vec::new(),
            });
        }
        Ok(c)
    }
}

/// The switch instant as a meter's cursor needs it.
struct AtSwitch {
    at: i64,
    /// The account's UTC offset (messages).
    off: i32,
    window_start_ms: i64,
}

/// What an account must be to open at `row`'s switch: opened by its local
/// day, and a position only where one meter carries it inside a window.
fn check_account(
    account: &Account,
    row: &PrepaidOpening,
    w: &Window,
    off: i32,
    in_service: usize,
) -> Result<(), String> {
    let at = row.switched_at.timestamp_millis();
    if account.opened_on > local_date_minute(at, off).0 {
        return Err(format!("opened on {}, after the switch", account.opened_on));
    }
    if row.position_kwh.is_zero() {
        return Ok(());
    }
    if w.start_ms == at {
        return Err(format!(
            "position_kwh {}: the switch starts a new accumulation window (tier month or year), whose position is 0",
            row.position_kwh
        ));
    }
    if in_service != 1 {
        return Err(format!(
            "position_kwh {}: deductions keep a tier position per meter, and {in_service} meters of the account were in service at the switch (a position needs exactly one)",
            row.position_kwh
        ));
    }
    Ok(())
}

/// Imports a prepaid fleet's opening balances (`prepaid_balances.csv`,
/// docs/data-model.md) into the ledger, in transactions of about `chunk`
/// accounts. Idempotent: an account already opened the same way is
/// counted in `already`; one opened differently, or with entries or
/// cursors the opening would contradict, is refused with the reason.
pub fn import_file(
    ledger: &mut dyn Ledger,
    path: &Path,
    fleet: &Fleet,
    pricer: &(dyn Pricer + Sync),
    lake: &Path,
    chunk: usize,
) -> Result<OpeningReport, PrepayError> {
    let loaded = crate::master::load_prepaid_openings(path)
        .map_err(|e| PrepayError::Input(e.to_string()))?;
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().to_string())
        .unwrap_or_default();
    let mut report = OpeningReport {
        rows: loaded.rows.len() + loaded.errors.len(),
        bad_rows: loaded.errors.iter().map(|e| e.to_string()).collect(),
        ..Default::default()
    };
    let place = |row: &PrepaidOpening| {
        format!(
            "{}:{}: account {}",
            path.display(),
            row.line,
            row.account_id
        )
    };
    let refusal = |row: &PrepaidOpening, why: &str| format!("{}: {why}", place(row));
    let mut lines: HashMap<&str, Vec<u64>> = HashMap::new();
    for r in &loaded.rows {
        lines.entry(&r.account_id).or_default().push(r.line);
    }
    let mut rows: Vec<(&PrepaidOpening, &Account)> = Vec::new();
    for r in &loaded.rows {
        let Some(a) = fleet.accounts.get(&r.account_id) else {
            report.refused.push(refusal(
                r,
                "not a prepaid account of accounts.csv (unknown, or postpaid: postpaid accounts open in opening_balances.csv)",
            ));
            continue;
        };
        match &lines[r.account_id.as_str()][..] {
            [_] => rows.push((r, a)),
            all => report.refused.push(refusal(
                r,
                &format!("the account has rows on lines {all:?}: one balance per account"),
            )),
        }
    }
    let Some(first) = rows.iter().map(|r| r.0.switched_at).min() else {
        return Ok(report);
    };
    let last = rows.iter().map(|r| r.0.switched_at).max().unwrap_or(first);
    // What meterflow deducts from the switch on: the tariff of the first
    // quarter hour after it (a new version may start at the switch).
    let mut kinds = HashMap::new();
    let mut tou_any: HashSet<String> = HashSet::new();
    for (r, _) in &rows {
        let at = r.switched_at.timestamp_millis();
        kinds.entry(at).or_insert_with(|| {
            let first_quarter = at + interval::INTERVAL_MS;
            let tou = tou_meters(pricer, fleet, first_quarter);
            tou_any.extend(tou.iter().cloned());
            (interval_meters(pricer, fleet, first_quarter), tou)
        });
    }
    // The readings at the switches (partitions are UTC days).
    let loaded_readings = load_readings_with(
        lake,
        fleet,
        &tou_any,
        &HashSet::new(),
        first.date_naive() - chrono::Duration::days(1),
        last.timestamp_millis(),
    )?;
    let ctx = Context {
        fleet,
        pricer,
        readings: loaded_readings
            .into_iter()
            .map(|m| (m.meter.meter_id(), m.readings))
            .collect(),
        kinds,
    };
    // What the ledger already holds of these accounts.
    let mut stored: HashMap<String, Vec<Cursor>> = HashMap::new();
    for c in ledger.cursors()? {
        if let Some((m, _)) = fleet.meter_account(&c.meter_id) {
            stored.entry(m.account_id.clone()).or_default().push(c);
        }
    }
    // Accounts with a balance row (any with entries has one).
    let with_row: HashSet<String> = ledger.balances()?.into_iter().map(|b| b.0).collect();
    let mut planned: Vec<Planned> = Vec::new();
    for (row, account) in rows {
        let entry = entry_of(row, &file);
        let at = entry.ts_ms;
        let held = stored.remove(&account.account_id).unwrap_or_default();
        let entries = if with_row.contains(&account.account_id) {
            ledger.entries(Some(&account.account_id), 0, usize::MAX)?
        } else {
            Vec::new()
        };
        if let Some(o) = entries.iter().find(|e| e.entry.key == entry.key) {
            // Opened earlier: its entry and cursors were committed together
            // (the cursors may have moved on since).
            match reopen(&ctx, account, row, &o.entry, &entry, &held) {
                Ok(None) => report.already += 1,
                Ok(Some(cursors)) => planned.push(Planned {
                    row: place(row),
                    entry: None,
                    cursors,
                }),
                Err(why) => report.refused.push(refusal(row, &why)),
            }
            continue;
        }
        let cursors = match ctx.cursors(account, row, None) {
            Ok(c) => c,
            Err(why) => {
                report.refused.push(refusal(row, &why));
                continue;
            }
        };
        let earlier: Vec<&str> = entries
            .iter()
            .filter(|e| e.entry.ts_ms <= at)
            .map(|e| e.entry.key.as_str())
            .collect();
        let why = if let Some(c) = held.first() {
            let off = ctx.local(account, at).map_or(0, |l| l.0);
            format!(
                "meter {} is already deducted by meterflow (its {} cursor is at {}): opening balances go in before the first prepay run or stream",
                c.meter_id,
                c.channel,
                local_time(c.last_ts_ms, off)
            )
        } else if let Some(first) = earlier.first() {
            format!(
                "the ledger already holds {} entries of it at or before the switch (first: {first}), which its opening balance would count twice",
                earlier.len()
            )
        } else {
            planned.push(Planned {
                row: place(row),
                entry: Some((entry, entries.len() as i64)),
                cursors,
            });
            continue;
        };
        report.refused.push(refusal(row, &why));
    }
    for group in planned.chunks(chunk.max(1)) {
        commit(ledger, group, &mut report)?;
    }
    Ok(report)
}

/// An account opened earlier, given again: the same balance, instant and
/// position change nothing (None), except that meters added to
/// `meters.csv` since, without a cursor yet, get theirs at the switch
/// (Some). Another balance, instant or position is refused.
fn reopen(
    ctx: &Context<'_>,
    account: &Account,
    row: &PrepaidOpening,
    stored: &NewEntry,
    entry: &NewEntry,
    held: &[Cursor],
) -> Result<Option<Vec<Cursor>>, String> {
    if !same_opening(stored, entry) {
        let terms = |e: &NewEntry, off: i32| {
            format!(
                "balance {} at {}, position_kwh {}",
                e.amount,
                local_time(e.ts_ms, off),
                position_of(e).unwrap_or_default()
            )
        };
        let off = ctx.local(account, entry.ts_ms).map_or(0, |l| l.0);
        return Err(format!(
            "already opened with {}; this file says {}",
            terms(stored, off),
            terms(entry, off)
        ));
    }
    let (_, day) = ctx.local(account, entry.ts_ms)?;
    let missing =
        |m: &Meter| m.installed_on <= day && !held.iter().any(|c| c.meter_id == m.meter_id);
    if !ctx.fleet.meters_of(&account.account_id).any(missing) {
        return Ok(None);
    }
    ctx.cursors(account, row, Some(&missing)).map(Some)
}

/// Commits a group of openings in one transaction, or one at a time when
/// the ledger changed meanwhile (a cursor written by a run or stream, a
/// payment credited, another import): those are refused, or counted as
/// already opened when another import opened them the same way.
fn commit(
    ledger: &mut dyn Ledger,
    group: &[Planned],
    report: &mut OpeningReport,
) -> Result<(), PrepayError> {
    let opening = group
        .iter()
        .filter_map(|p| p.entry.as_ref().map(|(e, n)| (p, e, *n)));
    let batch = Batch {
        entries: opening.clone().map(|(_, e, _)| e.clone()).collect(),
        cursors: group
            .iter()
            .flat_map(|p| p.cursors.iter().cloned())
            .collect(),
        evaluate: Vec::new(),
        expect: group
            .iter()
            .flat_map(|p| &p.cursors)
            .map(|c| (c.meter_id.clone(), c.channel.clone(), None))
            .collect(),
        entry_counts: opening
            .clone()
            .map(|(_, e, n)| (e.account_id.clone(), n))
            .collect(),
        absent_keys: Vec::new(),
    };
    let r = ledger.commit(&batch, &NoHook)?;
    if !r.stale {
        // The entry-count precondition held, so no opening entry existed:
        // every one is inserted.
        for (_, e, _) in opening {
            report.imported += 1;
            report.balance += e.amount;
        }
        for p in group.iter().filter(|p| p.entry.is_none()) {
            report.already += 1;
            report.meters_added += p.cursors.len();
        }
        return Ok(());
    }
    if group.len() > 1 {
        for p in group {
            commit(ledger, std::slice::from_ref(p), report)?;
        }
        return Ok(());
    }
    let p = &group[0];
    let Some((e, _)) = &p.entry else {
        report.refused.push(format!(
            "{}: a cursor of a meter added since was written while importing (a prepay run or stream deducts it): import again",
            p.row
        ));
        return Ok(());
    };
    match ledger.entries_by_keys(std::slice::from_ref(&e.key))?.first() {
        Some(o) if same_opening(&o.entry, e) => report.already += 1,
        _ => report.refused.push(format!(
            "{}: the ledger changed while importing (a prepay run or stream wrote a meter's cursor, a payment was credited, or another import opened it otherwise): not opened; import again",
            p.row
        )),
    }
    Ok(())
}

/// The position an opening entry carries (in its detail, which is not part
/// of an entry's identity).
fn position_of(e: &NewEntry) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(&e.detail)
        .ok()
        .and_then(|d| d["position_kwh"].as_str().map(str::to_string))
}

/// Two opening entries open the same way: balance, instant and position.
fn same_opening(a: &NewEntry, b: &NewEntry) -> bool {
    a.identity() == b.identity() && position_of(a) == position_of(b)
}
