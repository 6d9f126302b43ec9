//! Re-runs of an issued period: what was issued (read back from the run
//! directory and its revisions) and the adjustment lines of a re-rated bill.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{Array, BooleanArray, Decimal128Array, StringArray};
use chrono::NaiveDate;
use rust_decimal::Decimal;

use super::arrears::{for_each_bill, PriorBill};
use super::period::BillPeriod;

use super::account::AccountBill;
use super::flags::Flags;
use super::output::{self, as_written, OutLine};
use super::run::{io, BillingError};
use crate::tariff::price::LineKind;

/// An account's issued lines summed by tariff, kind, label and version (two
/// tariffs may share version ids and labels). The four texts take a few
/// values in a whole run and are shared: a million accounts' six million
/// lines held as five strings each peaked a 1M revision at 3.5 GB.
#[derive(Debug, Clone, PartialEq)]
pub struct IssuedLine {
    pub tariff: Arc<str>,
    pub kind: Arc<str>,
    pub label: Arc<str>,
    pub version: Arc<str>,
    pub quantity: Decimal,
    pub amount: Decimal,
}

impl IssuedLine {
    fn key(&self) -> (&str, &str, &str, &str) {
        (&self.tariff, &self.kind, &self.label, &self.version)
    }
}

pub struct Issued {
    /// Per account, its lines in (tariff, kind, label, version) order.
    pub lines: BTreeMap<String, Vec<IssuedLine>>,
    pub totals: BTreeMap<String, Decimal>,
    /// Due dates of the issued bills (as last revised) that have one.
    pub dues: BTreeMap<String, NaiveDate>,
    pub run_id: String,
}

impl Issued {
    /// The bill issued to `account` for `period` (as last revised), when it
    /// has a due date: late fees still count it.
    pub fn bill(&self, account: &str, period: &BillPeriod) -> Option<PriorBill> {
        Some(PriorBill {
            period: period.label.clone(),
            start: period.start,
            due: *self.dues.get(account)?,
            amount: self.totals.get(account).copied().unwrap_or_default(),
        })
    }
}

/// Reads the lines of the issued run in `dirs[0]` and the adjustment lines
/// of its revisions `dirs[1..]`.
pub fn read_issued(dirs: &[PathBuf]) -> Result<Issued, BillingError> {
    let mut is = Issued {
        lines: BTreeMap::new(),
        totals: BTreeMap::new(),
        dues: BTreeMap::new(),
        run_id: String::new(),
    };
    let mut texts = Texts::default();
    for (n, dir) in dirs.iter().enumerate() {
        // A revision lists only the accounts it changed: later dates replace.
        let bills = dir.join("bills.parquet");
        if bills.exists() {
            for_each_bill(&bills, |r, bad| {
                if let Some(due) = r.due {
                    let d: NaiveDate = due
                        .parse()
                        .map_err(|e| bad(format!("due_date '{due}': {e}")))?;
                    is.dues.insert(r.account.to_string(), d);
                }
                Ok(())
            })?;
        }
        if n == 0 {
            let m: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).map_err(io(dir))?)
                    .map_err(|e| BillingError::Invalid(format!("{}: {e}", dir.display())))?;
            is.run_id = m["run_id"].as_str().unwrap_or_default().to_string();
        }
        for batch in crate::store::reader::read_file(&dir.join("bill_lines.parquet"))? {
            let s = |name: &str| {
                batch
                    .column_by_name(name)
                    .and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned())
            };
            let d = |name: &str| {
                batch
                    .column_by_name(name)
                    .and_then(|c| c.as_any().downcast_ref::<Decimal128Array>().cloned())
            };
            let bad = || {
                BillingError::Invalid(format!("{}: unexpected bill_lines schema", dir.display()))
            };
            let (acc, kind, label, ver, tar) = (
                s("account_id").ok_or_else(bad)?,
                s("kind").ok_or_else(bad)?,
                s("label").ok_or_else(bad)?,
                s("tariff_version").ok_or_else(bad)?,
                s("tariff_id").ok_or_else(bad)?,
            );
            let (qty, amt) = (d("quantity").ok_or_else(bad)?, d("amount").ok_or_else(bad)?);
            let adj = batch
                .column_by_name("is_adjustment")
                .and_then(|c| c.as_any().downcast_ref::<BooleanArray>().cloned())
                .ok_or_else(bad)?;
            for i in 0..batch.num_rows() {
                if n > 0 && !adj.value(i) {
                    continue;
                }
                let q = Decimal::from_i128_with_scale(qty.value(i), output::QTY.1 as u32);
                let a = Decimal::from_i128_with_scale(amt.value(i), output::AMOUNT.1 as u32);
                let account = acc.value(i);
                match is.totals.get_mut(account) {
                    Some(t) => *t += a,
                    None => {
                        is.totals.insert(account.to_string(), a);
                    }
                }
                let key = (tar.value(i), kind.value(i), label.value(i), ver.value(i));
                let lines = match is.lines.get_mut(account) {
                    Some(l) => l,
                    None => is.lines.entry(account.to_string()).or_default(),
                };
                match lines.iter_mut().find(|l| l.key() == key) {
                    Some(l) => {
                        l.quantity += q;
                        l.amount += a;
                    }
                    None => lines.push(IssuedLine {
                        tariff: texts.get(key.0),
                        kind: texts.get(key.1),
                        label: texts.get(key.2),
                        version: texts.get(key.3),
                        quantity: q,
                        amount: a,
                    }),
                }
            }
        }
    }
    for lines in is.lines.values_mut() {
        lines.sort_by(|a, b| a.key().cmp(&b.key()));
    }
    Ok(is)
}

/// One shared copy of each text.
#[derive(Default)]
struct Texts(crate::store::scan::FxMap<Arc<str>, ()>);

impl Texts {
    fn get(&mut self, t: &str) -> Arc<str> {
        if let Some((k, _)) = self.0.get_key_value(t) {
            return k.clone();
        }
        let k: Arc<str> = t.into();
        self.0.insert(k.clone(), ());
        k
    }
}

/// Adjustment lines of a re-rated bill against what was issued: per line key,
/// the difference in quantity and amount. Empty when nothing changed.
pub fn adjustments<'a>(b: &AccountBill, lines: &[OutLine<'a>], is: &'a Issued) -> Vec<OutLine<'a>> {
    let mut now: BTreeMap<(String, String, String), (Decimal, Decimal, &OutLine<'a>)> =
        BTreeMap::new();
    for l in lines {
        let e = now
            .entry((
                l.kind.as_str().to_string(),
                l.label.to_string(),
                l.tariff_version.to_string(),
            ))
            .or_insert((Decimal::ZERO, Decimal::ZERO, l));
        // As written: the issued side was read back at the columns' scales,
        // and an exact 12/31 must not differ from its written 0.387097.
        e.0 += as_written(l.quantity, output::QTY.1);
        e.1 += as_written(l.amount, output::AMOUNT.1);
    }
    let mut out = Vec::new();
    let issued = is.lines.get(&b.account_id).map_or(&[][..], Vec::as_slice);
    for ((kind, label, ver), (q, a, l)) in &now {
        let key = (&*b.tariff_id, kind.as_str(), label.as_str(), ver.as_str());
        let (iq, ia) = issued
            .iter()
            .find(|x| x.key() == key)
            .map_or((Decimal::ZERO, Decimal::ZERO), |x| (x.quantity, x.amount));
        if *q != iq || *a != ia {
            out.push(OutLine {
                quantity: *q - iq,
                amount: *a - ia,
                is_adjustment: true,
                flags: l.flags | Flags::ADJUSTED,
                ..(*l).clone()
            });
        }
    }
    for k in issued {
        let still = *k.tariff == *b.tariff_id
            && now.contains_key(&(
                k.kind.to_string(),
                k.label.to_string(),
                k.version.to_string(),
            ));
        let (iq, ia) = (&k.quantity, &k.amount);
        if !still && (!iq.is_zero() || !ia.is_zero()) {
            out.push(OutLine {
                kind: LineKind::parse(&k.kind).unwrap_or(LineKind::Adjustment),
                label: (*k.label).into(),
                tier: None,
                tou_period: None,
                quantity: -*iq,
                unit: "",
                unit_price: Decimal::ZERO,
                amount: -*ia,
                tariff_version: (*k.version).into(),
                // Reversed under the tariff it was issued with.
                tariff: (*k.tariff != *b.tariff_id).then_some(&*k.tariff),
                flags: Flags::ADJUSTED,
                is_adjustment: true,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;
    use std::borrow::Cow;

    fn bill() -> AccountBill {
        AccountBill {
            account_id: "A1".into(),
            tariff_id: "t".into(),
            versions: "v1".into(),
            lines: vec![],
            kwh: dec!(12),
            total: dec!(10),
            flags: Flags::NONE,
            days: 12,
            ytd_before: None,
            ytd_after: None,
            power_factor: None,
            max_demand_kw: None,
        }
    }

    fn line(kind: LineKind, quantity: Decimal, amount: Decimal) -> OutLine<'static> {
        OutLine {
            kind,
            label: Cow::Borrowed("x"),
            tier: None,
            tou_period: None,
            quantity,
            unit: "month",
            unit_price: dec!(10),
            amount,
            tariff_version: Cow::Borrowed("v1"),
            tariff: None,
            flags: Flags::NONE,
            is_adjustment: false,
        }
    }

    fn issued_line(tariff: &str, kind: LineKind, quantity: Decimal, amount: Decimal) -> IssuedLine {
        IssuedLine {
            tariff: tariff.into(),
            kind: kind.as_str().into(),
            label: "x".into(),
            version: "v1".into(),
            quantity,
            amount,
        }
    }

    #[test]
    fn lines_of_a_tariff_the_account_left_are_reversed_under_it_not_netted() {
        let mut is = Issued {
            lines: BTreeMap::new(),
            totals: BTreeMap::new(),
            dues: BTreeMap::new(),
            run_id: "r".into(),
        };
        // Issued under tariff "old", which has a version "v1" and a line "x" too.
        is.lines.insert(
            "A1".into(),
            vec![issued_line("old", LineKind::Energy, dec!(100), dec!(50))],
        );
        let now = [line(LineKind::Energy, dec!(100), dec!(60))];
        let adj = adjustments(&bill(), &now, &is);
        let got: Vec<(Option<&str>, Decimal, Decimal)> = adj
            .iter()
            .map(|l| (l.tariff, l.quantity, l.amount))
            .collect();
        assert_eq!(
            got,
            vec![
                (None, dec!(100), dec!(60)),
                (Some("old"), dec!(-100), dec!(-50))
            ]
        );
    }

    #[test]
    fn a_fraction_the_issued_run_stored_rounded_is_not_an_adjustment() {
        // 12 of 31 days: the bill line holds the exact fraction, the issued
        // file DECIMAL(28, 6) holds 0.387097.
        let exact = Decimal::from(12) / Decimal::from(31);
        let mut is = Issued {
            lines: BTreeMap::new(),
            totals: BTreeMap::new(),
            dues: BTreeMap::new(),
            run_id: "r".into(),
        };
        is.lines.insert(
            "A1".into(),
            vec![issued_line(
                "t",
                LineKind::Minimum,
                dec!(0.387097),
                dec!(3.87),
            )],
        );
        let now = [line(LineKind::Minimum, exact, dec!(3.87))];
        assert!(adjustments(&bill(), &now, &is).is_empty());
        // A real change still is one, by what the files will hold.
        let changed = [line(LineKind::Minimum, exact * dec!(2), dec!(7.74))];
        let adj = adjustments(&bill(), &changed, &is);
        assert_eq!(adj.len(), 1);
        assert_eq!(
            (adj[0].quantity, adj[0].amount),
            (dec!(0.387097), dec!(3.87))
        );
    }
}
