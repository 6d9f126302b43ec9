//! Loading what analytics and the report read: master data, the lake scan
//! and bill runs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use chrono::NaiveDate;

use super::scan::{scan_lake, DaySink, Scan, ScanPlan};
use super::table::{Col, Table};
use super::AnalyticsError;
use crate::master::{self, Account, Meter, Payment};
use crate::tariff::calendar::Calendar;

/// One issued bill, as far as analytics needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct BillRow {
    pub account_id: String,
    pub period: String,
    /// The day the bill was issued: the end of its period (exclusive end date).
    pub bill_date: NaiveDate,
    /// kWh, scale 4.
    pub kwh_e4: i128,
    /// Yuan, scale 2.
    pub total_e2: i128,
}

pub struct Inputs {
    pub meters: Vec<Meter>,
    pub accounts: Vec<Account>,
    pub payments: Vec<Payment>,
    pub scan: Scan,
    pub bills: Vec<BillRow>,
    /// Account index of each meter (None: account not in accounts.csv).
    pub meter_account: Vec<Option<usize>>,
    pub account_index: HashMap<String, usize>,
    pub utc_offset_secs: i32,
    /// Peak groups (`scan.peak` keys): (area kind, area, customer class).
    pub peak_groups: Vec<(&'static str, String, String)>,
    /// Account keys (id or pseudonym) by account index; empty: computed per use.
    pub keys: Vec<String>,
}

fn master_err(e: impl std::fmt::Display) -> AnalyticsError {
    AnalyticsError::Master(e.to_string())
}

/// How to scan: local time, calendar, month-to-date day.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub utc_offset_secs: i32,
    pub calendar: Option<Calendar>,
    pub mtd_as_of: Option<NaiveDate>,
}

impl Inputs {
    /// Loads master data and bill runs, then scans the lake once, handing
    /// every completed account-day to `sink`.
    pub fn load(
        lake: &Path,
        master_dir: &Path,
        runs: Option<&Path>,
        lo: &LoadOptions,
        sink: &mut DaySink<'_>,
    ) -> Result<Inputs, AnalyticsError> {
        let mut inp = Inputs::load_master(master_dir, runs, lo.utc_offset_secs)?;
        inp.scan_lake(lake, lo, sink)?;
        Ok(inp)
    }

    /// Master data and bill runs, no lake scan yet.
    pub fn load_master(
        master_dir: &Path,
        runs: Option<&Path>,
        utc_offset_secs: i32,
    ) -> Result<Inputs, AnalyticsError> {
        let meters = master::load_meters(&master_dir.join(master::METERS_FILE))
            .map_err(master_err)?
            .rows;
        let accounts = master::load_accounts(&master_dir.join(master::ACCOUNTS_FILE))
            .map_err(master_err)?
            .rows;
        let pay_path = master_dir.join(master::PAYMENTS_FILE);
        let payments = if pay_path.exists() {
            master::load_payments(&pay_path).map_err(master_err)?.rows
        } else {
            Vec::new()
        };
        let bills = match runs {
            Some(r) => load_bill_runs(r)?,
            None => Vec::new(),
        };
        Ok(Inputs::assemble(
            meters,
            accounts,
            payments,
            Scan::default(),
            bills,
            utc_offset_secs,
        ))
    }

    /// Runs the lake scan for these meters and accounts into `self.scan`.
    pub fn scan_lake(
        &mut self,
        lake: &Path,
        lo: &LoadOptions,
        sink: &mut DaySink<'_>,
    ) -> Result<(), AnalyticsError> {
        let mut group_of: HashMap<(&'static str, String, String), u32> = HashMap::new();
        let mut groups = Vec::new();
        let peak: Vec<Vec<u32>> = self
            .meters
            .iter()
            .zip(&self.meter_account)
            .map(|(m, a)| {
                let Some(a) = a else { return Vec::new() };
                let acc = &self.accounts[*a];
                let class = acc.customer_class.as_str().to_string();
                [
                    ("district", acc.district.clone()),
                    ("feeder", m.feeder.clone()),
                ]
                .into_iter()
                .map(|(k, v)| {
                    let key = (k, v, class.clone());
                    *group_of.entry(key.clone()).or_insert_with(|| {
                        groups.push(key);
                        groups.len() as u32 - 1
                    })
                })
                .collect()
            })
            .collect();
        let plan = ScanPlan {
            meters: &self.meters,
            meter_account: &self.meter_account,
            accounts: self.accounts.len(),
            utc_offset_secs: lo.utc_offset_secs,
            calendar: lo.calendar.as_ref(),
            peak_groups: &peak,
            mtd_as_of: lo.mtd_as_of,
        };
        self.scan = scan_lake(lake, &plan, sink)?;
        self.peak_groups = groups;
        Ok(())
    }

    pub fn assemble(
        meters: Vec<Meter>,
        accounts: Vec<Account>,
        payments: Vec<Payment>,
        scan: Scan,
        bills: Vec<BillRow>,
        utc_offset_secs: i32,
    ) -> Inputs {
        let account_index: HashMap<String, usize> = accounts
            .iter()
            .enumerate()
            .map(|(i, a)| (a.account_id.clone(), i))
            .collect();
        let meter_account = meters
            .iter()
            .map(|m| account_index.get(&m.account_id).copied())
            .collect();
        Inputs {
            meters,
            accounts,
            payments,
            scan,
            bills,
            meter_account,
            account_index,
            utc_offset_secs,
            peak_groups: Vec::new(),
            keys: Vec::new(),
        }
    }
}

/// Bill run directories: `runs` itself when it holds a run, and every
/// folder under it that does. A run's `revision-N/` folders are part of the
/// run (see `revisions`), never runs of their own.
pub fn run_dirs(runs: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let is_run = runs.join("manifest.json").exists();
    if is_run {
        out.push(runs.to_path_buf());
    }
    if let Ok(rd) = std::fs::read_dir(runs) {
        let mut subs: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("manifest.json").exists())
            .filter(|p| !(is_run && revision_number(p).is_some()))
            .collect();
        subs.sort();
        out.extend(subs);
    }
    out
}

/// N of a `revision-N` folder.
fn revision_number(dir: &Path) -> Option<u32> {
    dir.file_name()?
        .to_str()?
        .strip_prefix("revision-")?
        .parse()
        .ok()
}

/// The committed revisions of a run (`revision-1/`, `revision-2/`, ... as
/// long as each has a manifest), oldest first: what `meterflow bill` counts
/// when it writes the next one.
pub fn revisions(run: &Path) -> Vec<PathBuf> {
    (1..)
        .map(|n| run.join(format!("revision-{n}")))
        .take_while(|d| d.join("manifest.json").exists())
        .collect()
}

/// The manifest of a run directory as JSON.
pub fn manifest(dir: &Path) -> Result<serde_json::Value, AnalyticsError> {
    let p = dir.join("manifest.json");
    let bytes = std::fs::read(&p).map_err(|source| AnalyticsError::Io {
        path: p.clone(),
        source,
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| AnalyticsError::Invalid(format!("{}: {e}", p.display())))
}

/// The run a `revision-N` folder belongs to, with N: its parent folder,
/// when that holds a run (a `manifest.json`). None for any other folder.
pub fn revision_of(dir: &Path) -> Option<(u32, PathBuf)> {
    // `runs/2026-10/revision-2` as written; `.` or `..` (no name) resolved.
    let named = dir.file_name().is_some() && dir.parent().is_some_and(|p| p != Path::new(""));
    let dir = if named {
        dir.to_path_buf()
    } else {
        std::fs::canonicalize(dir).ok()?
    };
    let n = revision_number(&dir)?;
    let run = dir.parent()?;
    run.join("manifest.json")
        .exists()
        .then(|| (n, run.to_path_buf()))
}

/// Checks a folder given as bill runs (`analyze --runs`): it exists, and it
/// is a run or a folder of runs, not a `revision-N` folder inside a run. A
/// revision holds only the bills it adjusts: read alone it would pass for a
/// run of its own, so it is refused with the run folder to give instead.
pub fn check_runs(runs: &Path) -> Result<(), AnalyticsError> {
    if !runs.is_dir() {
        return Err(AnalyticsError::Invalid(format!(
            "bill runs {}: not a folder (give a bill run folder or a folder of runs)",
            runs.display()
        )));
    }
    if let Some((n, run)) = revision_of(runs) {
        return Err(AnalyticsError::Invalid(format!(
            "bill runs {}: this is revision {n} of the bill run {}, not a run: give the run \
             folder {} (its revisions are applied on top of its bills) or the folder of runs",
            runs.display(),
            run.display(),
            run.display()
        )));
    }
    Ok(())
}

/// Bills of every run directory found under `runs` (checked by `check_runs`).
pub fn load_bill_runs(runs: &Path) -> Result<Vec<BillRow>, AnalyticsError> {
    check_runs(runs)?;
    let dirs = run_dirs(runs);
    if dirs.is_empty() {
        tracing::warn!(
            "no bill run in {} (no manifest.json in it or in its folders): bill dates are assumed",
            runs.display()
        );
    }
    let mut out = Vec::new();
    for dir in dirs {
        out.extend(load_bills(&dir)?);
    }
    Ok(out)
}

/// Bills of one run: its `bills.parquet`, each revision's rows replacing
/// the bills of the accounts it adjusts (docs/billing.md, "Re-runs and
/// adjustments"). One bill per account, dated the end of the run's period.
pub fn load_bills(dir: &Path) -> Result<Vec<BillRow>, AnalyticsError> {
    let m = manifest(dir)?;
    let bill_date = m["period_end_exclusive"]
        .as_str()
        .and_then(|s| NaiveDate::parse_from_str(s, "%Y-%m-%d").ok())
        .ok_or_else(|| {
            AnalyticsError::Invalid(format!(
                "{}: manifest has no period_end_exclusive",
                dir.display()
            ))
        })?;
    let mut out = read_bills_file(&dir.join("bills.parquet"), bill_date)?;
    let revs = revisions(dir);
    if revs.is_empty() {
        return Ok(out);
    }
    // The last revision of each adjusted account, in order of first
    // adjustment; only these accounts are looked up in the run's bills.
    let mut newer: Vec<BillRow> = Vec::new();
    let mut at: HashMap<String, usize> = HashMap::new();
    for d in revs {
        for b in read_bills_file(&d.join("bills.parquet"), bill_date)? {
            match at.get(&b.account_id) {
                Some(i) => newer[*i] = b,
                None => {
                    at.insert(b.account_id.clone(), newer.len());
                    newer.push(b);
                }
            }
        }
    }
    if newer.is_empty() {
        return Ok(out);
    }
    let mut placed = vec![false; newer.len()];
    for row in &mut out {
        if let Some(i) = at.get(&row.account_id) {
            *row = newer[*i].clone();
            placed[*i] = true;
        }
    }
    // Accounts billed only by a revision come after the run's bills.
    out.extend(
        newer
            .into_iter()
            .zip(placed)
            .filter(|(_, p)| !p)
            .map(|(b, _)| b),
    );
    Ok(out)
}

/// Rows of one `bills.parquet` (none when the file is missing).
fn read_bills_file(path: &Path, bill_date: NaiveDate) -> Result<Vec<BillRow>, AnalyticsError> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let t = Table::read_parquet(path)?;
    if t.rows() == 0 {
        // A revision that changed no bill.
        return Ok(Vec::new());
    }
    let (Some(Col::Str(acc)), Some(Col::Str(period))) = (t.col("account_id"), t.col("period"))
    else {
        return Err(AnalyticsError::Invalid(format!(
            "{}: no account_id/period columns",
            path.display()
        )));
    };
    let dec = |name: &str, want: u8| -> Vec<i128> {
        match t.col(name) {
            Some(Col::Dec(v, s)) => v
                .iter()
                .map(|x| rescale(x.unwrap_or(0), *s, want))
                .collect(),
            _ => vec![0; t.rows()],
        }
    };
    let kwh = dec("kwh", 4);
    let total = dec("total", 2);
    Ok((0..t.rows())
        .map(|i| BillRow {
            account_id: acc[i].clone().unwrap_or_default(),
            period: period[i].clone().unwrap_or_default(),
            bill_date,
            kwh_e4: kwh[i],
            total_e2: total[i],
        })
        .collect())
}

/// Changes the scale of a scaled integer (rounding half away from zero when shrinking).
pub fn rescale(raw: i128, from: u8, to: u8) -> i128 {
    if from == to {
        raw
    } else if from < to {
        raw * 10i128.pow((to - from) as u32)
    } else {
        let d = rust_decimal::Decimal::from_i128_with_scale(raw, from as u32).round_dp(to as u32);
        d.mantissa() * 10i128.pow(to as u32 - d.scale().min(to as u32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run (or revision) folder: manifest and bills of (account, total yuan e2).
    fn write_run(dir: &Path, revision: i64, bills: &[(&str, i128)]) {
        std::fs::create_dir_all(dir).unwrap();
        let m = serde_json::json!({
            "period": "2026-10",
            "period_end_exclusive": "2026-11-01",
            "revision": revision,
        });
        std::fs::write(dir.join("manifest.json"), m.to_string()).unwrap();
        let text =
            |f: &dyn Fn(&str) -> String| Col::Str(bills.iter().map(|b| Some(f(b.0))).collect());
        Table::new()
            .with("account_id", text(&|a| a.to_string()))
            .with("period", text(&|_| "2026-10".to_string()))
            .with(
                "kwh",
                Col::Dec(bills.iter().map(|_| Some(1_000_000)).collect(), 4),
            )
            .with(
                "total",
                Col::Dec(bills.iter().map(|b| Some(b.1)).collect(), 2),
            )
            .write_parquet(&dir.join("bills.parquet"))
            .unwrap();
    }

    #[test]
    fn revisions_replace_in_place_and_add_accounts_after_the_run() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("2026-10");
        write_run(&run, 0, &[("A1", 100), ("A2", 200), ("A3", 300)]);
        let totals = |bills: Vec<BillRow>| -> Vec<(String, i128)> {
            bills
                .into_iter()
                .map(|b| (b.account_id, b.total_e2))
                .collect()
        };
        let own = |v: &[(&str, i128)]| -> Vec<(String, i128)> {
            v.iter().map(|(a, t)| (a.to_string(), *t)).collect()
        };
        assert_eq!(
            totals(load_bills(&run).unwrap()),
            own(&[("A1", 100), ("A2", 200), ("A3", 300)])
        );
        write_run(&run.join("revision-1"), 1, &[("A3", 310), ("A4", 400)]);
        write_run(&run.join("revision-2"), 2, &[("A4", 410), ("A1", 110)]);
        assert_eq!(
            totals(load_bills(&run).unwrap()),
            own(&[("A1", 110), ("A2", 200), ("A3", 310), ("A4", 410)])
        );
    }

    #[test]
    fn a_revision_folder_given_as_runs_is_refused_with_its_run() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("2026-10");
        write_run(&run, 0, &[("A1", 10_000), ("A2", 5_000)]);
        let rev = run.join("revision-1");
        write_run(&rev, 1, &[("A2", 6_000)]);
        assert_eq!(revision_of(&rev), Some((1, run.clone())));
        assert_eq!(revision_of(&run), None);
        assert_eq!(revision_of(tmp.path()), None);
        // A path without a folder name (`.`, `..`) is resolved first.
        std::fs::create_dir_all(rev.join("sub")).unwrap();
        assert_eq!(
            revision_of(&rev.join("sub").join("..")),
            Some((1, std::fs::canonicalize(&run).unwrap()))
        );
        let e = load_bill_runs(&rev).unwrap_err().to_string();
        assert!(e.contains("revision 1"), "{e}");
        assert!(
            e.contains(&format!("give the run folder {}", run.display())),
            "{e}"
        );
        // A folder named like a revision but not inside a run is a run.
        let lone = tmp.path().join("revision-3");
        write_run(&lone, 0, &[("A9", 1)]);
        assert_eq!(revision_of(&lone), None);
        assert_eq!(load_bill_runs(&lone).unwrap().len(), 1);
        // A missing folder is an error, not "no bills".
        let e = load_bill_runs(&tmp.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
        // The run itself and its folder still read, revision applied.
        for runs in [&run, &tmp.path().to_path_buf()] {
            let bills = load_bill_runs(runs).unwrap();
            assert!(bills
                .iter()
                .any(|b| b.account_id == "A2" && b.total_e2 == 6_000));
        }
    }

    #[test]
    fn a_revision_replaces_the_bills_of_the_accounts_it_adjusts() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("2026-10");
        write_run(&run, 0, &[("A1", 10_000), ("A2", 5_000)]);
        write_run(&run.join("revision-1"), 1, &[("A2", 6_000)]);
        write_run(&run.join("revision-2"), 2, &[]);
        // The run folder itself, or the folder of runs: one bill per account either way.
        for runs in [&run, &tmp.path().to_path_buf()] {
            assert_eq!(run_dirs(runs), vec![run.clone()]);
            let bills = load_bill_runs(runs).unwrap();
            let totals: Vec<(&str, i128)> = bills
                .iter()
                .map(|b| (b.account_id.as_str(), b.total_e2))
                .collect();
            assert_eq!(totals, vec![("A1", 10_000), ("A2", 6_000)]);
            assert!(bills
                .iter()
                .all(|b| b.bill_date == NaiveDate::from_ymd_opt(2026, 11, 1).unwrap()));
        }
        // The operator query shows the bill as last revised, once.
        let q = super::super::query::bills(tmp.path(), "A2").unwrap();
        assert_eq!(q.rows(), 1);
        assert_eq!(q.col("total"), Some(&Col::Dec(vec![Some(6_000)], 2)));
        assert_eq!(q.col("revision"), Some(&Col::Int(vec![Some(1)])));
    }
}
