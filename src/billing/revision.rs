//! Re-runs of an issued period: what was issued (read back from the run
//! directory and its revisions) and the adjustment lines of a re-rated bill.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{Array, BooleanArray, Decimal128Array, RecordBatch, StringArray};
use chrono::NaiveDate;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;
use rust_decimal::Decimal;

use super::arrears::{for_each_bill, Memo, PriorBill};
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

/// The issued bills of a period as last revised: what late fees, the
/// revision's bill rows and accounts it cannot bill still count.
pub struct Issued {
    pub bills: BTreeMap<String, IssuedBill>,
    pub run_id: String,
    /// The issued run's `--settled-through`.
    pub settled_through: Option<NaiveDate>,
    /// SHA-256 of the opening balances the issued run or its latest
    /// revision imported (manifest `opening_balances`, file in
    /// `inputs.history`): its re-runs must import them too.
    pub opening: Option<String>,
}

/// An account's bill as last revised: the `total` of its latest bill row
/// (the issued run's, or the last revision's that changed it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IssuedBill {
    pub total: Decimal,
    pub due: Option<NaiveDate>,
}

impl Issued {
    /// The bill issued to `account` for `period` (as last revised), when it
    /// has a due date: late fees still count it.
    pub fn bill(&self, account: &str, period: &BillPeriod) -> Option<PriorBill> {
        let b = self.bills.get(account)?;
        Some(PriorBill {
            period: period.label.clone(),
            start: period.start,
            due: b.due?,
            amount: b.total,
        })
    }

    pub fn total(&self, account: &str) -> Option<Decimal> {
        self.bills.get(account).map(|b| b.total)
    }
}

/// Reads the bills of the issued run in `dirs[0]` and of its revisions
/// `dirs[1..]`, and opens their lines to be read in step with the re-rated
/// accounts.
pub fn read_issued(dirs: &[PathBuf]) -> Result<(Issued, IssuedLines), BillingError> {
    let mut is = Issued {
        bills: BTreeMap::new(),
        run_id: String::new(),
        settled_through: None,
        opening: None,
    };
    let mut files = Vec::new();
    for (n, dir) in dirs.iter().enumerate() {
        // A revision lists only the accounts it changed: later rows replace.
        let bills = dir.join("bills.parquet");
        let mut last: Option<String> = None;
        let mut sorted = bills.exists();
        let mut dues = Memo::new();
        if bills.exists() {
            for_each_bill(&bills, |r, bad| {
                let due = match r.due {
                    Some(due) => Some(
                        dues.get(due, str::parse::<NaiveDate>)
                            .map_err(|e| bad(format!("due_date '{due}': {e}")))?,
                    ),
                    None => None,
                };
                let b = is.bills.entry(r.account.to_string()).or_insert(IssuedBill {
                    total: r.total,
                    due,
                });
                b.total = r.total;
                b.due = due.or(b.due);
                sorted &= last.as_deref().is_none_or(|l| r.account > l);
                set(&mut last, r.account);
                Ok(())
            })?;
        }
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).map_err(io(dir))?)
                .map_err(|e| BillingError::Invalid(format!("{}: {e}", dir.display())))?;
        if m["opening_balances"].is_object() {
            let file = m["inputs"]["history"].as_array().and_then(|h| {
                h.iter().find(|i| {
                    i["path"]
                        .as_str()
                        .is_some_and(|p| p.ends_with(crate::master::OPENING_FILE))
                })
            });
            is.opening = Some(
                file.and_then(|f| f["sha256"].as_str())
                    .unwrap_or_default()
                    .to_string(),
            );
        }
        if n == 0 {
            is.run_id = m["run_id"].as_str().unwrap_or_default().to_string();
            if let Some(d) = m["settled_through"].as_str() {
                is.settled_through = Some(d.parse().map_err(|e| {
                    BillingError::Invalid(format!("{}: settled_through '{d}': {e}", dir.display()))
                })?);
            }
        }
        files.push(LineFile {
            path: dir.join("bill_lines.parquet"),
            adjustments_only: n > 0,
            sorted,
            reader: None,
            batch: None,
            row: 0,
            last: None,
            asked: None,
            all: None,
        });
    }
    Ok((
        is,
        IssuedLines {
            files,
            texts: Texts::default(),
        },
    ))
}

/// The issued lines of the run and its revisions, read a group of accounts
/// at a time. Runs write their lines in account-id order, as the re-run
/// bills them, so each file is read once, front to back, and only a group's
/// lines are held (all 6.16 M lines of a 1M run held at once peaked a
/// revision at 1.96 GB). A file whose bills are not in id order (or asked
/// out of order) is read whole instead.
pub struct IssuedLines {
    files: Vec<LineFile>,
    texts: Texts,
}

impl IssuedLines {
    /// The lines issued to each of `accounts` (summed over the run and its
    /// revisions per tariff, kind, label and version), in that order.
    pub fn take<'a>(
        &mut self,
        accounts: impl Iterator<Item = &'a str>,
    ) -> Result<Vec<Vec<IssuedLine>>, BillingError> {
        let mut out = Vec::new();
        for a in accounts {
            let mut lines = Vec::new();
            for f in &mut self.files {
                f.take(a, &mut lines, &mut self.texts)?;
            }
            lines.sort_by(|x: &IssuedLine, y| x.key().cmp(&y.key()));
            out.push(lines);
        }
        Ok(out)
    }

    /// Reads what is left of each file read in step, so that lines out of
    /// account order stop the run even when no account after them was
    /// re-rated.
    pub fn finish(mut self) -> Result<(), BillingError> {
        for f in &mut self.files {
            if f.all.is_none() && f.sorted {
                while f.next_row()?.is_some() {
                    f.check_order()?;
                    f.row += 1;
                }
            }
        }
        Ok(())
    }
}

/// One `bill_lines.parquet`, read forward.
struct LineFile {
    path: PathBuf,
    /// A revision's: only its adjustment lines count.
    adjustments_only: bool,
    /// Its bills are in strictly increasing account-id order.
    sorted: bool,
    reader: Option<ParquetRecordBatchReader>,
    batch: Option<LineColumns>,
    row: usize,
    /// The account of the last row read, and the last account asked.
    last: Option<String>,
    asked: Option<String>,
    /// The whole file by account, once it could not be read in step.
    all: Option<BTreeMap<String, Vec<IssuedLine>>>,
}

struct LineColumns {
    account: StringArray,
    tariff: StringArray,
    kind: StringArray,
    label: StringArray,
    version: StringArray,
    quantity: Decimal128Array,
    amount: Decimal128Array,
    adjustment: BooleanArray,
}

impl LineColumns {
    fn of(batch: &RecordBatch, path: &std::path::Path) -> Result<Self, BillingError> {
        let bad =
            || BillingError::Invalid(format!("{}: unexpected bill_lines schema", path.display()));
        let col = |name: &str| batch.column_by_name(name).ok_or_else(bad);
        let s = |name: &str| {
            col(name)?
                .as_any()
                .downcast_ref::<StringArray>()
                .cloned()
                .ok_or_else(bad)
        };
        let d = |name: &str| {
            col(name)?
                .as_any()
                .downcast_ref::<Decimal128Array>()
                .cloned()
                .ok_or_else(bad)
        };
        Ok(LineColumns {
            account: s("account_id")?,
            tariff: s("tariff_id")?,
            kind: s("kind")?,
            label: s("label")?,
            version: s("tariff_version")?,
            quantity: d("quantity")?,
            amount: d("amount")?,
            adjustment: col("is_adjustment")?
                .as_any()
                .downcast_ref::<BooleanArray>()
                .cloned()
                .ok_or_else(bad)?,
        })
    }

    /// Adds row `i` to `lines`, summed with a line of the same key.
    fn add(&self, i: usize, lines: &mut Vec<IssuedLine>, texts: &mut Texts) {
        let q = Decimal::from_i128_with_scale(self.quantity.value(i), output::QTY.1 as u32);
        let a = Decimal::from_i128_with_scale(self.amount.value(i), output::AMOUNT.1 as u32);
        let key = (
            self.tariff.value(i),
            self.kind.value(i),
            self.label.value(i),
            self.version.value(i),
        );
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

impl LineFile {
    const COLUMNS: [&'static str; 8] = [
        "account_id",
        "tariff_id",
        "kind",
        "label",
        "tariff_version",
        "quantity",
        "amount",
        "is_adjustment",
    ];

    fn open(&self) -> Result<ParquetRecordBatchReader, BillingError> {
        let bad = |e: parquet::errors::ParquetError| {
            BillingError::Invalid(format!("{}: {e}", self.path.display()))
        };
        let file = std::fs::File::open(&self.path).map_err(io(&self.path))?;
        let b = ParquetRecordBatchReaderBuilder::try_new(file).map_err(bad)?;
        let mask = ProjectionMask::columns(b.parquet_schema(), Self::COLUMNS);
        let r = b
            .with_projection(mask)
            .with_batch_size(8192)
            .build()
            .map_err(bad)?;
        Ok(r)
    }

    /// The next row, reading the next batch when one is used up; None at the end.
    fn next_row(&mut self) -> Result<Option<usize>, BillingError> {
        loop {
            if let Some(b) = &self.batch {
                if self.row < b.account.len() {
                    return Ok(Some(self.row));
                }
            }
            if self.reader.is_none() {
                self.reader = Some(self.open()?);
            }
            let Some(next) = self.reader.as_mut().and_then(Iterator::next) else {
                self.batch = None;
                return Ok(None);
            };
            let next =
                next.map_err(|e| BillingError::Invalid(format!("{}: {e}", self.path.display())))?;
            self.batch = Some(LineColumns::of(&next, &self.path)?);
            self.row = 0;
        }
    }

    /// Checks the current row's account against the last one read.
    fn check_order(&mut self) -> Result<(), BillingError> {
        let Some(b) = &self.batch else { return Ok(()) };
        let acc = b.account.value(self.row);
        if self.last.as_deref() == Some(acc) {
            return Ok(());
        }
        // The bills were in order: lines that are not were not written by
        // a bill run.
        if let Some(l) = self.last.as_deref().filter(|l| acc < *l) {
            return Err(BillingError::Invalid(format!(
                "{}: lines of account '{acc}' after those of '{l}', not in the account order of its bills",
                self.path.display(),
            )));
        }
        set(&mut self.last, acc);
        Ok(())
    }

    /// Adds the lines of `account` to `lines`.
    fn take(
        &mut self,
        account: &str,
        lines: &mut Vec<IssuedLine>,
        texts: &mut Texts,
    ) -> Result<(), BillingError> {
        let in_step = self.sorted && self.asked.as_deref().is_none_or(|a| a < account);
        if self.all.is_none() && !in_step {
            self.all = Some(self.read_all(texts)?);
        }
        if let Some(all) = &mut self.all {
            lines.extend(all.remove(account).unwrap_or_default());
            return Ok(());
        }
        set(&mut self.asked, account);
        while let Some(i) = self.next_row()? {
            self.check_order()?;
            let Some(b) = &self.batch else { break };
            let acc = b.account.value(i);
            if acc > account {
                break;
            }
            if acc == account && (!self.adjustments_only || b.adjustment.value(i)) {
                b.add(i, lines, texts);
            }
            self.row += 1;
        }
        Ok(())
    }

    /// Every account's lines, for a file that cannot be read in step.
    fn read_all(
        &self,
        texts: &mut Texts,
    ) -> Result<BTreeMap<String, Vec<IssuedLine>>, BillingError> {
        let mut all: BTreeMap<String, Vec<IssuedLine>> = BTreeMap::new();
        for batch in self.open()? {
            let batch = batch
                .map_err(|e| BillingError::Invalid(format!("{}: {e}", self.path.display())))?;
            let b = LineColumns::of(&batch, &self.path)?;
            for i in 0..batch.num_rows() {
                if self.adjustments_only && !b.adjustment.value(i) {
                    continue;
                }
                let acc = b.account.value(i);
                let lines = match all.get_mut(acc) {
                    Some(l) => l,
                    None => all.entry(acc.to_string()).or_default(),
                };
                b.add(i, lines, texts);
            }
        }
        Ok(all)
    }
}

/// Sets `slot` to `s`, reusing its buffer.
fn set(slot: &mut Option<String>, s: &str) {
    match slot {
        Some(t) => {
            t.clear();
            t.push_str(s);
        }
        None => *slot = Some(s.to_string()),
    }
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

/// Adjustment lines of a re-rated bill against the lines `issued` to its
/// account: per line key, the difference in quantity and amount. Empty when
/// nothing changed.
pub fn adjustments<'a>(
    b: &AccountBill,
    lines: &[OutLine<'a>],
    issued: &'a [IssuedLine],
) -> Vec<OutLine<'a>> {
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
        // Issued under tariff "old", which has a version "v1" and a line "x" too.
        let issued = [issued_line("old", LineKind::Energy, dec!(100), dec!(50))];
        let now = [line(LineKind::Energy, dec!(100), dec!(60))];
        let adj = adjustments(&bill(), &now, &issued);
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
        let issued = [issued_line(
            "t",
            LineKind::Minimum,
            dec!(0.387097),
            dec!(3.87),
        )];
        let now = [line(LineKind::Minimum, exact, dec!(3.87))];
        assert!(adjustments(&bill(), &now, &issued).is_empty());
        // A real change still is one, by what the files will hold.
        let changed = [line(LineKind::Minimum, exact * dec!(2), dec!(7.74))];
        let adj = adjustments(&bill(), &changed, &issued);
        assert_eq!(adj.len(), 1);
        assert_eq!(
            (adj[0].quantity, adj[0].amount),
            (dec!(0.387097), dec!(3.87))
        );
    }

    /// A run directory with bills of `accounts` (in the order given, total
    /// 1.00 each, due 2026-11-20) and `lines`: (account, label, amount,
    /// is_adjustment), in the order given.
    fn run_dir(dir: &std::path::Path, accounts: &[&str], lines: &[(&str, &str, i128, bool)]) {
        use arrow::array::{ArrayRef, Decimal128Array};
        use arrow::datatypes::{DataType, Field, Schema};
        let text = |v: Vec<&str>| Arc::new(StringArray::from(v)) as ArrayRef;
        let dec = |v: Vec<i128>, (p, s): (u8, i8)| {
            Arc::new(
                Decimal128Array::from(v)
                    .with_precision_and_scale(p, s)
                    .unwrap(),
            ) as ArrayRef
        };
        let schema = Arc::new(Schema::new(vec![
            Field::new("account_id", DataType::Utf8, false),
            Field::new("period", DataType::Utf8, false),
            Field::new("total", DataType::Decimal128(18, 2), false),
            Field::new("due_date", DataType::Utf8, true),
        ]));
        let n = accounts.len();
        let bills = RecordBatch::try_new(
            schema.clone(),
            vec![
                text(accounts.to_vec()),
                text(vec!["2026-10"; n]),
                dec(vec![100; n], output::AMOUNT),
                text(vec!["2026-11-20"; n]),
            ],
        )
        .unwrap();
        crate::store::atomic::write_parquet_atomic(&dir.join("bills.parquet"), schema, &[bills])
            .unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("account_id", DataType::Utf8, false),
            Field::new("kind", DataType::Utf8, false),
            Field::new("label", DataType::Utf8, false),
            Field::new("quantity", DataType::Decimal128(28, 6), false),
            Field::new("amount", DataType::Decimal128(18, 2), false),
            Field::new("tariff_id", DataType::Utf8, false),
            Field::new("tariff_version", DataType::Utf8, false),
            Field::new("is_adjustment", DataType::Boolean, false),
        ]));
        let n = lines.len();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                text(lines.iter().map(|l| l.0).collect()),
                text(vec!["energy"; n]),
                text(lines.iter().map(|l| l.1).collect()),
                dec(vec![1_000_000; n], output::QTY),
                dec(lines.iter().map(|l| l.2).collect(), output::AMOUNT),
                text(vec!["t"; n]),
                text(vec!["v1"; n]),
                Arc::new(BooleanArray::from(
                    lines.iter().map(|l| l.3).collect::<Vec<_>>(),
                )) as ArrayRef,
            ],
        )
        .unwrap();
        crate::store::atomic::write_parquet_atomic(
            &dir.join("bill_lines.parquet"),
            schema,
            &[batch],
        )
        .unwrap();
        std::fs::write(dir.join("manifest.json"), r#"{"run_id": "r1"}"#).unwrap();
    }

    /// (label, quantity, amount) of each account's issued lines.
    fn taken(lines: &mut IssuedLines, accounts: &[&str]) -> Vec<Vec<(String, Decimal, Decimal)>> {
        let got = lines.take(accounts.iter().copied()).unwrap();
        got.iter()
            .map(|ls| {
                ls.iter()
                    .map(|l| (l.label.to_string(), l.quantity, l.amount))
                    .collect()
            })
            .collect()
    }

    #[test]
    fn issued_lines_are_read_in_step_with_the_accounts_across_batches_and_revisions() {
        let tmp = tempfile::tempdir().unwrap();
        let (run, rev) = (tmp.path().join("run"), tmp.path().join("run/revision-1"));
        std::fs::create_dir_all(&rev).unwrap();
        // 10,000 accounts of three lines each: batches of 8,192 rows end
        // inside an account's lines (A02730 has rows 8,190 to 8,192).
        let ids: Vec<String> = (0..10_000).map(|n| format!("A{n:05}")).collect();
        let accounts: Vec<&str> = ids.iter().map(String::as_str).collect();
        let lines: Vec<(&str, &str, i128, bool)> = accounts
            .iter()
            .flat_map(|a| {
                [
                    (*a, "a", 100, false),
                    (*a, "b", 250, false),
                    (*a, "a", 0, false),
                ]
            })
            .collect();
        run_dir(&run, &accounts, &lines);
        // The revision changed A04100 (a line "b" of +0.50, a not-adjustment
        // row it must not count) and A09999 (a new line "c").
        run_dir(
            &rev,
            &["A04100", "A09999"],
            &[
                ("A04100", "b", 50, true),
                ("A04100", "b", 999, false),
                ("A09999", "c", -30, true),
            ],
        );
        let (issued, mut l) = read_issued(&[run, rev]).unwrap();
        assert_eq!(issued.run_id, "r1");
        assert_eq!(issued.bills.len(), 10_000);
        // Totals are the bill rows' (not the lines'), the last revision's
        // where it has one.
        let due = NaiveDate::from_ymd_opt(2026, 11, 20);
        let bill = |total| Some(IssuedBill { total, due });
        assert_eq!(issued.bills.get("A00000").copied(), bill(dec!(1.00)));
        assert_eq!(issued.total("A04100"), Some(dec!(1.00)));
        // A group, then the next one: accounts gone from accounts.csv are
        // skipped, a new one (A04100x) has nothing issued.
        let one = dec!(1);
        let (a, b) = (
            ("a".to_string(), dec!(2), dec!(1.00)),
            ("b".to_string(), one, dec!(2.50)),
        );
        assert_eq!(
            taken(&mut l, &["A00000", "A00002"]),
            vec![vec![a.clone(), b.clone()], vec![a.clone(), b.clone()]]
        );
        let c = ("c".to_string(), one, dec!(-0.30));
        assert_eq!(
            taken(&mut l, &["A02730", "A04100", "A04100x", "A09999"]),
            vec![
                vec![a.clone(), b.clone()],
                vec![a.clone(), ("b".to_string(), dec!(2), dec!(3.00))],
                vec![],
                vec![a.clone(), b.clone(), c],
            ]
        );
        // Past the end: nothing.
        assert_eq!(taken(&mut l, &["B"]), vec![Vec::new()]);
        l.finish().unwrap();
    }

    /// Each account's issued amount.
    fn sums(lines: &mut IssuedLines, accounts: &[&str]) -> Vec<Decimal> {
        let got = taken(lines, accounts);
        got.iter().map(|ls| ls.iter().map(|x| x.2).sum()).collect()
    }

    #[test]
    fn issued_lines_not_in_account_order_are_read_whole_or_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let lines = [
            ("B", "a", 100, false),
            ("A", "a", 200, false),
            ("A", "b", 300, false),
        ];
        // Bills (and lines) in file order, not id order: read whole.
        run_dir(tmp.path(), &["B", "A"], &lines);
        let (_, mut l) = read_issued(&[tmp.path().to_path_buf()]).unwrap();
        assert_eq!(sums(&mut l, &["A", "B"]), [dec!(5.00), dec!(1.00)]);
        // Bills and lines in id order, accounts asked out of order (after
        // the cursor has passed B): read whole, nothing lost.
        let sorted = [
            ("A", "a", 200, false),
            ("A", "b", 300, false),
            ("B", "a", 100, false),
        ];
        run_dir(tmp.path(), &["A", "B"], &sorted);
        let (_, mut l) = read_issued(&[tmp.path().to_path_buf()]).unwrap();
        assert_eq!(sums(&mut l, &["B", "A"]), [dec!(1.00), dec!(5.00)]);
        l.finish().unwrap();
        // Bills in order but lines not: not written by a bill run. Refused
        // when a later account is read, or at the end when none is.
        run_dir(tmp.path(), &["A", "B"], &lines);
        let (_, mut l) = read_issued(&[tmp.path().to_path_buf()]).unwrap();
        let err = l.take(["A", "B"].into_iter()).unwrap_err().to_string();
        assert!(
            err.contains("not in the account order of its bills"),
            "{err}"
        );
        let (_, mut l) = read_issued(&[tmp.path().to_path_buf()]).unwrap();
        assert!(l.take(["A"].into_iter()).is_ok());
        let err = l.finish().unwrap_err().to_string();
        assert!(
            err.contains("not in the account order of its bills"),
            "{err}"
        );
    }
}
