//! The bill run: master data + tariffs + the readings lake in, `bills`,
//! `bill_lines`, `exceptions`, `arrears` Parquet and `manifest.json` out,
//! committed atomically as one directory. Re-running a period whose run directory
//! already holds an issued run writes a revision with adjustment lines.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use arrow::record_batch::RecordBatch;
use chrono::DateTime;
use rayon::prelude::*;
use rust_decimal::Decimal;
use sha2::{Digest, Sha256};

use super::account::AccountBill;
use super::arrears::{AccountArrears, LateFees, STATE_FILE};
use super::commit::{HashedFile, Staging};
use super::engine::{
    unknown_meter_exceptions, Engine, ExceptionRow, IdPasses, PassSpan, Roster, ScanWindow,
};
use super::flags::Flags;
use super::output::{self, OutBill};
use super::period::BillPeriod;
use super::revision::{adjustments, read_issued, Issued, IssuedLine};
use super::vee::VeeConfig;
use crate::model::Channel;
use crate::store::encode::ColumnWriter;
use crate::store::scan::{select_pages, IdPage, Selection, Unit};
use crate::store::StoreError;

/// Errors that stop a bill run (nothing is committed then).
#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error("{0}")]
    Tariff(#[from] crate::tariff::TariffError),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("master data: {0}")]
    Master(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    /// Late fees cannot continue from the carried arrears states.
    #[error("late fees: {0}")]
    Arrears(String),
    #[error("writing Parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
}

/// Maps an IO error to [`BillingError::Io`] naming `path`.
pub(super) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BillingError + '_ {
    move |source| BillingError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Options of a bill run (`meterflow bill`).
/// Progress callback: (phase, done, total).
pub type Progress = Box<dyn Fn(&'static str, u64, u64) + Sync>;

pub struct BillRunOptions {
    pub lake: PathBuf,
    /// Folder with meters.csv and accounts.csv.
    pub master: PathBuf,
    /// Folder of tariff TOML files (calendars in `calendars/`).
    pub tariffs: PathBuf,
    /// `2026-10` or `2026-10-05..2026-11-19`.
    pub period: String,
    pub out: PathBuf,
    /// Compute everything, commit nothing; the summary matches the real run.
    pub preview: bool,
    pub vee: VeeConfig,
    /// Called as the run advances: (phase, done, total); the phases are
    /// "reading lake" (row groups) and "billing" (accounts).
    pub progress: Option<Progress>,
    /// Earlier runs whose unpaid bills (with `master/payments.csv`) bear late
    /// fees: the last one's arrears state, or every run since the accounts'
    /// first bills for runs without one (docs/billing.md).
    pub previous: Vec<PathBuf>,
    /// At most this many meters' states in memory at once: accounts (in id
    /// order) are billed in passes of whole runs of 8,192 accounts, each
    /// reading only the lake pages that hold its meters (a rest of at most
    /// an eighth of this joins the last pass). Outputs do not depend on it.
    pub pass_meters: usize,
    /// A fleet's first run (no `--previous`): payments dated on or before
    /// this day settled bills issued before meterflow. They are counted in
    /// the arrears state, not credited to this run's bills. A re-run takes
    /// the issued run's.
    pub settled_through: Option<chrono::NaiveDate>,
}

/// Default of [`BillRunOptions::pass_meters`]: 1.2-1.6 GB of meter states,
/// index and plans (measured at 10M).
pub const DEFAULT_PASS_METERS: usize = 2_000_000;

/// Accounts per output run: batches of bills and lines are cut at multiples
/// of it, whatever the thread count or the passes.
const RUN: usize = 8192;

impl BillRunOptions {
    pub fn new(
        lake: impl Into<PathBuf>,
        master: impl Into<PathBuf>,
        tariffs: impl Into<PathBuf>,
        period: &str,
        out: impl Into<PathBuf>,
    ) -> Self {
        BillRunOptions {
            lake: lake.into(),
            master: master.into(),
            tariffs: tariffs.into(),
            period: period.to_string(),
            out: out.into(),
            preview: false,
            vee: VeeConfig::default(),
            progress: None,
            previous: Vec::new(),
            pass_meters: DEFAULT_PASS_METERS,
            settled_through: None,
        }
    }
}

pub use super::commit::OutputFile;

/// What a bill run did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BillRunSummary {
    pub run_id: String,
    pub period: String,
    pub preview: bool,
    /// Where the outputs were committed (None for a preview).
    pub dir: Option<PathBuf>,
    /// 0 for the issued run, N for the Nth re-run (adjustments).
    pub revision: u32,
    pub accounts: usize,
    pub bills: usize,
    pub estimated_bills: usize,
    pub exceptions: usize,
    pub lines: usize,
    pub total_amount: Decimal,
    pub total_kwh: Decimal,
    pub adjusted_accounts: usize,
    pub adjustment_amount: Decimal,
    pub readings: u64,
    pub files_read: usize,
    /// Passes over the lake (see [`BillRunOptions::pass_meters`]).
    pub passes: usize,
    /// Opening balances imported (a fleet's first run switching systems).
    pub opening_balances: Option<super::opening::Imported>,
    pub outputs: Vec<OutputFile>,
    pub elapsed_ms: u128,
}

/// Resident set size in MB (Linux; 0 elsewhere), for the phase log.
fn rss_mb() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096 / (1 << 20))
}

/// CRC32 and length of a file, read in blocks (lake files can be large).
fn crc32_file(path: &Path) -> Result<(u32, u64), BillingError> {
    use std::io::Read;
    let mut f = File::open(path).map_err(io(path))?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
    Ok((h.finalize(), len))
}

/// SHA-256 and length of a file, read in blocks (accounts.csv of a large
/// fleet is hundreds of MB).
fn sha256_file(path: &Path) -> Result<(String, u64), BillingError> {
    let mut f = File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    let n = std::io::copy(&mut f, &mut h).map_err(io(path))?;
    Ok((hex::encode(h.finalize()), n))
}

/// A file's path, SHA-256 and size, for the manifest's inputs.
pub(super) fn hashed_input(p: &Path) -> Result<serde_json::Value, BillingError> {
    let (h, n) = sha256_file(p)?;
    Ok(input_entry(p, &h, n))
}

/// An input of the manifest (`inputs.master`, `.tariffs`, `.history`): the
/// file, its SHA-256 and length.
pub(super) fn input_entry(p: &Path, sha256: &str, bytes: u64) -> serde_json::Value {
    serde_json::json!({"path": p.display().to_string(), "sha256": sha256, "bytes": bytes})
}

/// Channels the bill run routes: registers, max demand, intervals, clock skew.
fn billed_channel(c: Channel) -> bool {
    super::vee::register_index(c).is_some()
        || matches!(
            c,
            Channel::MaxDemandImport | Channel::ImportActiveInterval | Channel::ClockSkew
        )
}

/// Runs a bill run. See docs/billing.md.
pub fn bill_run(opts: &BillRunOptions) -> Result<BillRunSummary, BillingError> {
    let t0 = Instant::now();
    let period = BillPeriod::parse(&opts.period).map_err(BillingError::Invalid)?;
    let tariffs = crate::tariff::load_dir(&opts.tariffs)?;
    let meters_path = opts.master.join(crate::master::METERS_FILE);
    let accounts_path = opts.master.join(crate::master::ACCOUNTS_FILE);
    let (meters, accounts) = rayon::join(
        || crate::master::load_billing_meters(&meters_path),
        || crate::master::load_accounts_for_billing(&accounts_path),
    );
    let meters = meters.map_err(|e| BillingError::Master(e.to_string()))?;
    let accounts = accounts.map_err(|e| BillingError::Master(e.to_string()))?;
    let mut master_exceptions: Vec<ExceptionRow> = Vec::new();
    for e in meters.errors.iter().chain(accounts.errors.iter()) {
        master_exceptions.push(ExceptionRow {
            account_id: String::new(),
            meter_id: String::new(),
            code: "master_row".into(),
            detail: e.to_string(),
        });
    }
    let t_load = t0.elapsed();
    tracing::debug!(phase = "load", rss_mb = rss_mb(), "bill run");

    // Revision? An issued run in `out` makes this a re-run with adjustments.
    let mut issued_dirs = Vec::new();
    if opts.out.join("manifest.json").exists() {
        let m: serde_json::Value = serde_json::from_slice(
            &std::fs::read(opts.out.join("manifest.json")).map_err(io(&opts.out))?,
        )
        .map_err(|e| BillingError::Invalid(format!("{}: {e}", opts.out.display())))?;
        if m["period"].as_str() != Some(period.label.as_str()) {
            return Err(BillingError::Invalid(format!(
                "{} holds the run of period {}, not {}: use another --out",
                opts.out.display(),
                m["period"].as_str().unwrap_or("?"),
                period.label
            )));
        }
        issued_dirs.push(opts.out.clone());
        let mut n = 1;
        while opts
            .out
            .join(format!("revision-{n}"))
            .join("manifest.json")
            .exists()
        {
            issued_dirs.push(opts.out.join(format!("revision-{n}")));
            n += 1;
        }
    } else if opts.out.exists()
        && std::fs::read_dir(&opts.out)
            .map_err(io(&opts.out))?
            .next()
            .is_some()
    {
        return Err(BillingError::Invalid(format!(
            "{} exists, is not empty and holds no committed run (no manifest.json): refusing to mix outputs",
            opts.out.display()
        )));
    }
    let revision = issued_dirs.len() as u32;

    // Which lake partitions and row groups the accounts need.
    let roster = Roster::new(&accounts.rows, &meters.rows);
    let passes = roster.passes(opts.pass_meters, RUN);
    let multi = passes.len() > 1;
    let t_roster = t0.elapsed();
    let mut lake_files: Vec<(chrono::NaiveDate, PathBuf)> = Vec::new();
    // Accounts whose annual position is carried read nothing near their
    // tier-year start.
    let t_ytd = Instant::now();
    let carried_ytd = if opts.previous.is_empty() {
        Default::default()
    } else {
        super::arrears::read_carried_ytd(&opts.previous, period.start)?
    };
    tracing::debug!(
        ms = t_ytd.elapsed().as_millis() as u64,
        accounts = carried_ytd.len(),
        "annual positions of the previous runs read"
    );
    let window = roster.scan_window(&tariffs, &period, &opts.vee, &carried_ytd);
    let t_window = t0.elapsed();
    if let Some(w) = &window {
        let day = |ms: i64| {
            DateTime::from_timestamp_millis(ms)
                .map(|t| t.date_naive())
                .unwrap_or_default()
        };
        // Partitions inside the period, plus a margin around every boundary (a
        // tier-year start months earlier reads a few days, not the months between).
        let margin = opts.vee.max_interpolation_gap_ms;
        let (p_lo, p_hi) = w.period;
        let mut wanted = vec![(day(p_lo - margin), day(p_hi + margin))];
        for &b in &w.bounds {
            wanted.push((day(b - margin), day(b + margin)));
        }
        lake_files = crate::store::reader::list_files(
            &opts.lake,
            crate::store::schema::READINGS,
            day(w.lo),
            day(w.hi),
        )?
        .into_iter()
        .filter(|(d, _)| wanted.iter().any(|(a, b)| d >= a && d <= b))
        .collect();
    }
    // Several passes read only the pages of their own meters: that needs the
    // page indexes, and each unit's `meter_id` pages.
    let units = if multi {
        crate::store::scan::units_with_page_index(&lake_files)?
    } else {
        crate::store::scan::units(&lake_files)?
    };
    // And which passes bill a meter in each page (exactly, where min and
    // max span several passes' meters: such a page, at the end of a file
    // whose last ids jump, would otherwise be read by every pass).
    let planned: Vec<(Vec<IdPage>, Vec<Option<u64>>)> = if multi {
        let by_pass = roster.id_passes(&passes);
        units
            .par_iter()
            .map(|u| {
                let pages = u.id_pages();
                let masks = page_passes(u, &pages, &by_pass)?;
                Ok((pages, masks))
            })
            .collect::<Result<_, StoreError>>()?
    } else {
        Vec::new()
    };
    let t_plan = t0.elapsed();
    tracing::debug!(
        phase = "plan",
        roster_ms = (t_roster - t_load).as_millis() as u64,
        window_ms = (t_window - t_roster).as_millis() as u64,
        units_ms = (t_plan - t_window).as_millis() as u64,
        passes = passes.len(),
        row_groups = units.len(),
        rss_mb = rss_mb(),
        "bill run"
    );

    let accounts_n = accounts.rows.len();
    // In a revision: the issued bills (as last revised), and their lines,
    // read as the accounts are re-rated.
    let (issued, mut issued_lines) = if revision > 0 {
        let (b, l) = read_issued(&issued_dirs)?;
        (Some(b), Some(l))
    } else {
        (None, None)
    };
    // Payments settled before meterflow: given to a fleet's first run, and
    // kept by its re-runs.
    let settled_through =
        match &issued {
            Some(is)
                if opts
                    .settled_through
                    .is_some_and(|d| is.settled_through != Some(d)) =>
            {
                return Err(BillingError::Invalid(format!(
                "--settled-through {}: the issued run in {} was billed with {}; a re-run keeps it",
                opts.settled_through.map(|d| d.to_string()).unwrap_or_default(),
                opts.out.display(),
                is.settled_through.map_or("none".to_string(), |d| d.to_string())
            )))
            }
            Some(is) => is.settled_through,
            None => opts.settled_through,
        };
    if let Some(d) = settled_through.filter(|d| *d >= period.end) {
        return Err(BillingError::Invalid(format!(
            "--settled-through {d}: must be before the period's end ({})",
            period.end
        )));
    }
    if let Some(d) = settled_through.filter(|_| !opts.previous.is_empty()) {
        return Err(BillingError::Invalid(match opts.settled_through {
            Some(_) => "--settled-through is for a fleet's first run: with --previous, the \
                        arrears state already says which payments were counted"
                .into(),
            // Inherited: the user re-runs a settled first run.
            None => format!(
                "the issued run in {} is its fleet's first run (settled through {d}): a re-run \
                 of it takes no --previous",
                opts.out.display()
            ),
        }));
    }
    let mut late = LateFees::load(
        &opts.previous,
        issued_dirs
            .first()
            .map(PathBuf::as_path)
            .zip(issued.as_ref()),
        &opts.master.join(crate::master::PAYMENTS_FILE),
        &period,
        &accounts.rows,
        &tariffs,
    )?;
    if let Some(day) = settled_through {
        late.settled_through(day, period.start);
    }
    // What accounts owed in the system before: read by the settled first
    // run (and its re-runs); later runs carry it in their states.
    let opening_sums = super::opening::import(
        &opts.master,
        settled_through,
        !opts.previous.is_empty(),
        issued.as_ref(),
        &period,
        &accounts.rows,
        &tariffs,
        &mut late,
    )?;
    master_exceptions.extend(late.errors.iter().map(|e| ExceptionRow {
        account_id: String::new(),
        meter_id: String::new(),
        code: "master_row".into(),
        detail: e.clone(),
    }));

    // Inputs are hashed before billing: the run id is in every output row.
    // SHA-256 for master data and tariffs, CRC32 for lake files (fast, in parallel).
    let inputs_master: Vec<serde_json::Value> = [
        (&meters_path, &meters.sha256, meters.bytes),
        (&accounts_path, &accounts.sha256, accounts.bytes),
    ]
    .into_iter()
    .map(|(p, h, n)| input_entry(p, h, n))
    .collect();
    let mut inputs_tariffs = Vec::new();
    for p in tariffs.files() {
        inputs_tariffs.push(hashed_input(&p)?);
    }
    let lake_hashes: Vec<Result<serde_json::Value, BillingError>> = lake_files
        .par_iter()
        .map(|(_, p)| {
            let (crc, len) = crc32_file(p)?;
            Ok(serde_json::json!({"path": p.strip_prefix(&opts.lake).unwrap_or(p).display().to_string(), "crc32": format!("{crc:08x}"), "bytes": len}))
        })
        .collect();
    let inputs_lake: Vec<serde_json::Value> = lake_hashes.into_iter().collect::<Result<_, _>>()?;
    let inputs_history = &late.inputs;
    let mut id_hash = Sha256::new();
    id_hash.update(period.label.as_bytes());
    id_hash.update(revision.to_le_bytes());
    if let Some(d) = settled_through {
        id_hash.update(format!("settled_through={d}").as_bytes());
    }
    // Contents and file names, not where the folders are: the same inputs
    // given as `tariffs` or `./tariffs`, or from another directory, give the
    // same id (lake paths are relative to the lake already).
    let named = |v: &serde_json::Value| {
        let mut v = v.clone();
        if let Some(p) = v.get("path").and_then(|p| p.as_str()).map(PathBuf::from) {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            v["path"] = serde_json::Value::from(name.unwrap_or_default());
        }
        v
    };
    for v in inputs_master
        .iter()
        .chain(&inputs_tariffs)
        .chain(inputs_history)
        .map(named)
        .chain(inputs_lake.iter().cloned())
    {
        id_hash.update(v.to_string().as_bytes());
    }
    let run_id = hex::encode(&id_hash.finalize()[..8]);
    let t_hash = t0.elapsed();
    tracing::debug!(phase = "hash", rss_mb = rss_mb(), "bill run");

    // Pass by pass (one, unless the accounts have more meters than
    // `pass_meters`): build the meter states of the pass's accounts, route
    // the lake's rows to them, then bill, price lines and encode a group of
    // accounts at a time: bills are turned into output rows in fixed runs
    // of 8,192 accounts (so the bytes never depend on the thread count; passes
    // start on run boundaries), the runs of a group in parallel, while three
    // writer threads (bills, lines, arrears) encode the finished batches straight into the staging
    // directory. Neither bills nor lines are ever all in memory at once.
    let group = RUN * 2 * rayon::current_num_threads().max(1);
    let target = if revision == 0 {
        opts.out.clone()
    } else {
        opts.out.join(format!("revision-{revision}"))
    };
    let staging = Staging::new(&target, opts.preview)?;
    let mut exceptions = roster.exceptions();
    exceptions.extend(master_exceptions);
    let mut totals = Totals::default();
    let ctx = Emit {
        run_id: &run_id,
        period: &period,
        tariffs: &tariffs,
        late: &late,
        issued: issued.as_ref(),
    };
    // Only for several passes: an attached meter outside a pass's index is
    // another pass's, not an unknown one; and which pages an earlier pass read.
    let elsewhere = |id: &str, at: &mut u32| roster.has_meter(id, at);
    let elsewhere: Option<&crate::store::scan::Elsewhere<'_>> = multi.then_some(&elsewhere);
    let mut seen: Vec<Vec<bool>> = planned.iter().map(|p| vec![false; p.0.len()]).collect();
    let mut unknown_meters: std::collections::HashMap<String, u64> = Default::default();
    let mut readings = 0u64;
    let (mut t_scan, mut t_bill) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
    let (bills_file, lines_file, arrears_file) = std::thread::scope(|scope| {
        let schema = output::bills_schema();
        let (bills_tx, bills_w) = spawn_writer(
            scope,
            schema.clone(),
            output::writer_properties(&schema),
            staging.create("bills.parquet")?,
        )?;
        let schema = output::lines_schema();
        let (lines_tx, lines_w) = spawn_writer(
            scope,
            schema.clone(),
            output::writer_properties(&schema),
            staging.create("bill_lines.parquet")?,
        )?;
        // Small (a row or two per postpaid account): written as the bills are.
        let (arrears_tx, arrears_w) = spawn_writer(
            scope,
            output::arrears_schema(),
            output::arrears_properties(&late.seen, &late.runs, &canonical_run_dir(&opts.out)),
            staging.create(STATE_FILE)?,
        )?;
        let zero = std::time::Duration::ZERO;
        // Rating, building output batches, and in a revision reading the issued lines.
        let (mut tb, mut te, mut ti) = (zero, zero, zero);
        // Accounts of the given states not in accounts.csv are written
        // unchanged, in id order among the others (`Emitted::carried`).
        let mut carried_sent = 0;
        let as_of = period.end.pred_opt().unwrap_or(period.end);
        let carried_batch = |r: std::ops::Range<usize>| {
            let rows: Vec<(&str, &AccountArrears)> = late.carried[r]
                .iter()
                .map(|(a, s)| (a.as_str(), s))
                .collect();
            output::arrears_batch(&run_id, &period.label, as_of, &rows)
        };
        'passes: for (k, range) in passes.iter().enumerate() {
            let ts = Instant::now();
            let mut engine = Engine::new(
                &roster,
                range.clone(),
                &tariffs,
                period.clone(),
                opts.vee.clone(),
            );
            let engine_ms = ts.elapsed().as_millis() as u64;
            if let Some(w) = &window {
                // Each pass reads only the pages of its meters; the last one
                // also reads pages no pass wanted (readings of unknown meters).
                let ids = engine.meter_ids();
                let last = k + 1 == passes.len();
                let work: Vec<(&Unit, Option<Selection>)> = if multi {
                    units
                        .iter()
                        .zip(&planned)
                        .zip(seen.iter_mut())
                        .filter_map(|((u, (pages, masks)), seen)| {
                            let wanted = |p: usize, page: &IdPage| match masks[p] {
                                Some(m) => m >> k & 1 == 1,
                                None => page.may_hold(&ids),
                            };
                            select_pages(pages, wanted, seen, last).map(|s| (u, Some(s)))
                        })
                        .collect()
                } else {
                    units.iter().map(|u| (u, None)).collect()
                };
                drop(ids);
                scan_pass(&mut engine, &work, w, elsewhere, |done| {
                    if let Some(p) = &opts.progress {
                        let per = units.len() as u64;
                        let of = work.len().max(1) as u64;
                        p(
                            "reading lake",
                            k as u64 * per + done * per / of,
                            per * passes.len() as u64,
                        );
                    }
                })?;
            }
            readings += engine.readings_seen;
            for (id, n) in std::mem::take(&mut engine.unknown_meters) {
                *unknown_meters.entry(id).or_insert(0) += n;
            }
            t_scan += ts.elapsed();
            tracing::debug!(
                pass = k + 1,
                of = passes.len(),
                accounts = range.len(),
                engine_ms,
                rss_mb = rss_mb(),
                "scanned"
            );

            let tb0 = Instant::now();
            let n = engine.accounts_len();
            let mut start = 0;
            while start < n {
                let end = (start + group).min(n);
                // In a revision, what was issued to these accounts, read
                // while they are rated.
                let group_accounts = issued_lines
                    .is_some()
                    .then(|| engine.accounts(start..end).to_vec());
                let (billed, prior) = rayon::join(
                    || timed(&mut tb, || engine.bill_range(start..end, &carried_ytd)),
                    || match (&mut issued_lines, &group_accounts) {
                        (Some(l), Some(g)) => {
                            timed(&mut ti, || l.take(g.iter().map(|a| &*a.account_id)))
                        }
                        _ => Ok(Vec::new()),
                    },
                );
                let prior: Vec<Vec<IssuedLine>> = prior?;
                // Each run's bills are freed by the task that emitted them,
                // not by this thread (a third of a second at 1M, one core).
                let parts: Vec<Emitted> = timed(&mut te, || {
                    billed
                        .into_par_iter()
                        .chunks(RUN)
                        .enumerate()
                        .map(|(k, mut c)| {
                            let at = k * RUN;
                            let prior = prior.get(at..at + c.len()).unwrap_or_default();
                            ctx.emit(&mut c, prior)
                        })
                        .collect()
                });
                drop(prior);
                for p in parts {
                    totals.add(p.totals);
                    exceptions.extend(p.exceptions);
                    // Accounts carried unchanged whose ids fall before this run's.
                    let before = carried_batch(carried_sent..p.carried.start.max(carried_sent));
                    carried_sent = carried_sent.max(p.carried.end);
                    // A closed channel means that writer failed: its error is returned below.
                    if (p.bills.num_rows() > 0 && bills_tx.send(p.bills).is_err())
                        || (p.lines.num_rows() > 0 && lines_tx.send(p.lines).is_err())
                        || (before.num_rows() > 0 && arrears_tx.send(before).is_err())
                        || (p.arrears.num_rows() > 0 && arrears_tx.send(p.arrears).is_err())
                    {
                        break 'passes;
                    }
                }
                if let Some(p) = &opts.progress {
                    p("billing", (range.start + end) as u64, accounts_n as u64);
                }
                start = end;
            }
            drop(engine);
            t_bill += tb0.elapsed();
        }
        if let Some(l) = issued_lines.take() {
            timed(&mut ti, || l.finish())?;
        }
        tracing::debug!(
            rate_ms = tb.as_millis() as u64,
            emit_ms = te.as_millis() as u64,
            issued_ms = ti.as_millis() as u64,
            "bill: time rating accounts and building output batches"
        );
        // Accounts carried unchanged after the last one billed.
        let rest = carried_batch(carried_sent..late.carried.len());
        if rest.num_rows() > 0 {
            // A closed channel means that writer failed: its error is returned below.
            let _ = arrears_tx.send(rest);
        }
        drop((bills_tx, lines_tx, arrears_tx));
        let join = |h: std::thread::ScopedJoinHandle<'_, _>| {
            h.join()
                .unwrap_or_else(|_| Err(BillingError::Invalid("output writer panicked".into())))
        };
        Ok::<_, BillingError>((join(bills_w)?, join(lines_w)?, join(arrears_w)?))
    })?;
    exceptions.extend(unknown_meter_exceptions(&unknown_meters));
    exceptions.sort();
    let t_bill_end = t0.elapsed();
    tracing::debug!(phase = "bill", rss_mb = rss_mb(), "bill run");

    let mut exceptions_file = staging.create("exceptions.parquet")?;
    {
        let mut w = parquet_writer(&mut exceptions_file, output::exceptions_schema())?;
        w.write(&output::exceptions_batch(
            &run_id,
            &period.label,
            &exceptions,
        ))?;
        w.into_inner()?;
    }
    let outputs = vec![
        bills_file.0.finish(bills_file.1)?,
        lines_file.0.finish(lines_file.1)?,
        exceptions_file.finish(exceptions.len())?,
        arrears_file.0.finish(arrears_file.1)?,
    ];
    let t = &totals;
    let manifest = serde_json::json!({
        "run_id": run_id,
        "period": period.label,
        "period_start": period.start.to_string(),
        "period_end_exclusive": period.end.to_string(),
        "revision": revision,
        "adjusts_run": issued.as_ref().map(|i| i.run_id.clone()),
        "settled_through": settled_through.map(|d| d.to_string()),
        "opening_balances": opening_sums,
        "created_by": format!("meterflow {}", env!("CARGO_PKG_VERSION")),
        "inputs": {"master": inputs_master, "tariffs": inputs_tariffs, "lake": inputs_lake, "history": inputs_history},
        "tariff_versions": t.versions_used,
        "counts": {"accounts": accounts_n, "bills": t.bills, "estimated_bills": t.estimated, "exceptions": exceptions.len(),
                   "lines": t.lines, "readings": readings, "lake_files": lake_files.len(), "adjusted_accounts": t.adjusted,
                   "passes": passes.len()},
        "sums": {"total_amount": t.amount.to_string(), "total_kwh": t.kwh.to_string(), "adjustment_amount": t.adjustment.to_string(),
                 "by_tariff": t.by_tariff.iter().map(|(k, (n, a))| (k.clone(), serde_json::json!({"bills": n, "total_amount": a.to_string()}))).collect::<BTreeMap<_, _>>()},
        "outputs": outputs,
        "timings_ms": {"load": t_load.as_millis(), "scan": ((t_plan - t_load) + t_scan).as_millis(), "hash": (t_hash - t_plan).as_millis(),
                       "bill": t_bill.as_millis(), "commit": (t0.elapsed() - t_bill_end).as_millis()},
    });
    let dir = staging.commit(&manifest)?;
    tracing::debug!(phase = "commit", rss_mb = rss_mb(), "bill run");
    Ok(BillRunSummary {
        run_id,
        period: period.label,
        preview: opts.preview,
        dir,
        revision,
        accounts: accounts_n,
        bills: totals.bills,
        estimated_bills: totals.estimated,
        exceptions: exceptions.len(),
        lines: totals.lines,
        total_amount: totals.amount,
        total_kwh: totals.kwh,
        adjusted_accounts: totals.adjusted,
        adjustment_amount: totals.adjustment,
        opening_balances: opening_sums.clone(),
        readings,
        files_read: lake_files.len(),
        passes: passes.len(),
        outputs,
        elapsed_ms: t0.elapsed().as_millis(),
    })
}

/// Decodes `work` a window of units at a time in parallel and routes the
/// rows to `engine`'s meter states, shards in parallel; windows keep file
/// (date) order. `tick(done)` reports units done.
fn scan_pass(
    engine: &mut Engine<'_>,
    work: &[(&Unit, Option<Selection>)],
    w: &ScanWindow,
    elsewhere: Option<&crate::store::scan::Elsewhere<'_>>,
    tick: impl Fn(u64),
) -> Result<(), BillingError> {
    use crate::store::scan::{Chunk, MeterLookup, Others, Scanner};
    let meters = engine.lend_index();
    let id_of = |i: u32| meters.get(i as usize).map(|m| &*m.meter_id);
    let scanner = Scanner {
        meters: MeterLookup {
            others: Others::Sorted(meters.len() as u32),
            id_of: &id_of,
            elsewhere,
        },
        shard_len: engine.shard_len(),
        shards: super::engine::SHARDS,
        lo: w.lo,
        hi: w.hi,
        keep: billed_channel,
    };
    let window = (2 * rayon::current_num_threads()).max(4);
    let (mut done, mut read) = (0u64, 0u64);
    let mut chunks: Vec<Chunk> = (0..window).map(|_| Default::default()).collect();
    let (mut td, mut ta) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
    for ws in work.chunks(window) {
        let chunks = &mut chunks[..ws.len()];
        timed(&mut td, || {
            chunks
                .par_iter_mut()
                .zip(ws)
                .map(|(c, (u, sel))| scanner.decode_into(u, sel.as_ref(), c))
                .collect::<Result<Vec<()>, _>>()
        })?;
        timed(&mut ta, || engine.apply_chunks(chunks));
        read += chunks.iter().map(|c| c.rows).sum::<u64>();
        done += ws.len() as u64;
        tick(done);
    }
    engine.return_index(meters);
    tracing::debug!(
        decode_ms = td.as_millis() as u64,
        route_ms = ta.as_millis() as u64,
        row_groups = work.len(),
        rows_read = read,
        "scan: time decoding row groups and routing rows to meters"
    );
    Ok(())
}

/// For each page of `unit`, the passes (bit k: pass k) that bill a meter
/// among its ids, where known: by min / max when they hold one pass's
/// meters or none, else by the page's own ids. None where neither tells
/// (more than 64 passes, no statistics, ids not read here): that page is
/// judged by min / max alone, as before.
fn page_passes(
    unit: &Unit,
    pages: &[IdPage],
    by_pass: &IdPasses<'_, '_>,
) -> Result<Vec<Option<u64>>, StoreError> {
    let mut out = vec![None; pages.len()];
    if by_pass.passes() > 64 {
        return Ok(out);
    }
    // (A meter no pass bills, which a full set of passes never leaves, wants
    // no page.)
    let bit = |k: usize| {
        u32::try_from(k)
            .ok()
            .and_then(|k| 1u64.checked_shl(k))
            .unwrap_or(0)
    };
    let (mut mixed, mut at) = (Vec::new(), 0);
    for (p, page) in pages.iter().enumerate() {
        let (Some(lo), Some(hi)) = (&page.min, &page.max) else {
            continue;
        };
        out[p] = match by_pass.within(lo, hi, &mut at) {
            PassSpan::None => Some(0),
            PassSpan::One(k) => Some(bit(k)),
            PassSpan::Several => {
                mixed.push(p);
                None
            }
        };
    }
    if mixed.is_empty() {
        return Ok(out);
    }
    for (&p, ids) in mixed.iter().zip(unit.page_ids(&mixed)?) {
        if let Some(ids) = ids {
            let mut at = 0;
            let mask = ids
                .iter()
                .flatten()
                .filter_map(|id| by_pass.pass_of(id, &mut at))
                .fold(0u64, |m, k| m | bit(k));
            out[p] = Some(mask);
        }
    }
    Ok(out)
}

/// Runs `f`, adding its wall time to `total` (the debug-log splits of a run).
fn timed<R>(total: &mut std::time::Duration, f: impl FnOnce() -> R) -> R {
    let t = Instant::now();
    let r = f();
    *total += t.elapsed();
    r
}

type Writer<'scope> = (
    std::sync::mpsc::SyncSender<RecordBatch>,
    std::thread::ScopedJoinHandle<'scope, Result<(HashedFile, usize), BillingError>>,
);

/// A Parquet writer with the outputs' fixed settings (deterministic bytes).
fn parquet_writer<W: std::io::Write + Send>(
    w: W,
    schema: arrow::datatypes::SchemaRef,
) -> Result<ColumnWriter<W>, BillingError> {
    let props = output::writer_properties(&schema);
    Ok(ColumnWriter::try_new(w, schema, props)?)
}

/// `out` as a canonical path, also before the run directory exists (its
/// parent does: the run is committed by a rename into it).
fn canonical_run_dir(out: &Path) -> PathBuf {
    std::fs::canonicalize(out).unwrap_or_else(|_| {
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty());
        match (
            std::fs::canonicalize(parent.unwrap_or(Path::new("."))),
            out.file_name(),
        ) {
            (Ok(p), Some(n)) => p.join(n),
            _ => out.to_path_buf(),
        }
    })
}

/// A thread encoding batches into `file` as Parquet with `props`; returns
/// the file and its row count.
fn spawn_writer<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    schema: arrow::datatypes::SchemaRef,
    props: parquet::file::properties::WriterProperties,
    file: HashedFile,
) -> Result<Writer<'scope>, BillingError> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<RecordBatch>(4);
    let file_name = file.name().to_string();
    // Named, so a profile or a debugger shows which output a thread encodes.
    let name = format!("write-{file_name}");
    let h = std::thread::Builder::new()
        .name(name)
        .spawn_scoped(scope, move || {
            // Quantities and kWh are DECIMAL(28, _): written from their i128s.
            let mut w = ColumnWriter::try_new(file, schema, props)?.wide_decimals_plain();
            let mut n = 0;
            let mut busy = std::time::Duration::ZERO;
            for batch in rx {
                n += batch.num_rows();
                timed(&mut busy, || w.write(&batch))?;
            }
            tracing::debug!(
                busy_ms = busy.as_millis() as u64,
                rows = n,
                "{} encoded",
                file_name
            );
            Ok((w.into_inner()?, n))
        });
    let h = h.map_err(|e| BillingError::Invalid(format!("cannot start an output writer: {e}")))?;
    Ok((tx, h))
}

/// Run-wide counts and sums, added up run by run in account order.
#[derive(Default)]
struct Totals {
    bills: usize,
    estimated: usize,
    lines: usize,
    adjusted: usize,
    amount: Decimal,
    kwh: Decimal,
    adjustment: Decimal,
    by_tariff: BTreeMap<String, (usize, Decimal)>,
    /// Versions per tariff, in order of first use.
    versions_used: BTreeMap<String, Vec<String>>,
}

impl Totals {
    /// Counts a bill under its tariff and the versions it used (a tariff id
    /// is copied once per run of accounts, not once per bill).
    fn count_tariff(&mut self, b: &AccountBill) {
        if !self.by_tariff.contains_key(&b.tariff_id) {
            self.by_tariff
                .insert(b.tariff_id.clone(), Default::default());
            self.versions_used.insert(b.tariff_id.clone(), Vec::new());
        }
        if let Some(bt) = self.by_tariff.get_mut(&b.tariff_id) {
            bt.0 += 1;
            bt.1 += b.total;
        }
        if let Some(vu) = self.versions_used.get_mut(&b.tariff_id) {
            for v in b.versions.split('+') {
                if !vu.iter().any(|x| x == v) {
                    vu.push(v.to_string());
                }
            }
        }
    }

    fn add(&mut self, o: Totals) {
        self.bills += o.bills;
        self.estimated += o.estimated;
        self.lines += o.lines;
        self.adjusted += o.adjusted;
        self.amount += o.amount;
        self.kwh += o.kwh;
        self.adjustment += o.adjustment;
        for (k, (n, a)) in o.by_tariff {
            let t = self.by_tariff.entry(k).or_default();
            t.0 += n;
            t.1 += a;
        }
        for (k, vs) in o.versions_used {
            let mine = self.versions_used.entry(k).or_default();
            for v in vs {
                if !mine.contains(&v) {
                    mine.push(v);
                }
            }
        }
    }
}

/// One run of accounts, ready for the writers.
struct Emitted {
    bills: RecordBatch,
    lines: RecordBatch,
    arrears: RecordBatch,
    /// The accounts of `LateFees::carried` written in `arrears` (those
    /// whose ids fall between this run's first and last account).
    carried: std::ops::Range<usize>,
    exceptions: Vec<ExceptionRow>,
    totals: Totals,
}

/// What turning bills into output rows needs.
struct Emit<'a> {
    run_id: &'a str,
    period: &'a BillPeriod,
    tariffs: &'a crate::tariff::TariffSet,
    late: &'a LateFees<'a>,
    issued: Option<&'a Issued>,
}

impl Emit<'_> {
    /// Late fees, lines (or, in a revision, adjustment lines) and bill rows
    /// of one run of accounts, in account order.
    /// `prior`: in a revision, the lines issued to each of `billed`.
    fn emit(
        &self,
        billed: &mut [(
            &crate::master::BillingAccount,
            Result<AccountBill, super::account::Exception>,
        )],
        prior: &[Vec<IssuedLine>],
    ) -> Emitted {
        let mut t = Totals::default();
        let mut exceptions = Vec::new();
        let mut lb = output::LinesBuilder::new(billed.len() * 7);
        let mut rows: Vec<OutBill<'_>> = Vec::with_capacity(billed.len());
        let mut arrears: Vec<(&str, AccountArrears)> = Vec::new();
        let carried = match (billed.first(), billed.last()) {
            (Some(f), Some(l)) => self.late.carried_within(&f.0.account_id, &l.0.account_id),
            _ => 0..0,
        };
        for (i, (a, r)) in billed.iter_mut().enumerate() {
            let acct: &crate::master::BillingAccount = a;
            let b = match r {
                Ok(b) => b,
                Err(e) => {
                    exceptions.push(ExceptionRow::account(a, e.clone()));
                    // Not billed, but its arrears and payments carry on, with
                    // the bill issued earlier in a revision (it still stands).
                    let issued = self
                        .issued
                        .and_then(|is| is.bill(&a.account_id, self.period));
                    if let (_, Some(s)) =
                        self.late.apply(a, None, issued, self.tariffs, self.period)
                    {
                        arrears.push((&acct.account_id, s));
                    }
                    continue;
                }
            };
            let (due_date, state) = self.late.apply(a, Some(b), None, self.tariffs, self.period);
            if let Some(s) = state {
                arrears.push((&acct.account_id, s));
            }
            let b: &AccountBill = b;
            t.bills += 1;
            t.estimated += usize::from(b.flags.contains(Flags::ESTIMATED));
            t.amount += b.total;
            t.kwh += b.kwh;
            t.count_tariff(b);
            let lines = output::out_lines(b, self.tariffs);
            let (out, issued_total, adjustment) = match self.issued {
                None => (lines, None, None),
                Some(is) => {
                    let adj = adjustments(b, &lines, prior.get(i).map_or(&[], Vec::as_slice));
                    if adj.is_empty() {
                        continue; // unchanged: not in the revision
                    }
                    let issued_total = is.total(&b.account_id).unwrap_or_default();
                    let diff: Decimal = adj.iter().map(|l| l.amount).sum();
                    t.adjusted += 1;
                    t.adjustment += diff;
                    (adj, Some(issued_total), Some(diff))
                }
            };
            for (n, l) in out.iter().enumerate() {
                lb.push(
                    self.run_id,
                    &self.period.label,
                    &b.account_id,
                    l.tariff.unwrap_or(&b.tariff_id),
                    n + 1,
                    l,
                );
            }
            t.lines += out.len();
            rows.push(OutBill {
                bill: b,
                total: b.total,
                line_count: out.len(),
                issued_total,
                adjustment,
                due_date,
            });
        }
        let mut arrears: Vec<(&str, &AccountArrears)> =
            arrears.iter().map(|(a, s)| (*a, s)).collect();
        if !carried.is_empty() {
            arrears.extend(
                self.late.carried[carried.clone()]
                    .iter()
                    .map(|(a, s)| (a.as_str(), s)),
            );
            arrears.sort_by(|x, y| x.0.cmp(y.0));
        }
        let as_of = self.period.end.pred_opt().unwrap_or(self.period.end);
        Emitted {
            bills: output::bills_batch(self.run_id, &self.period.label, &rows),
            lines: lb.finish(),
            arrears: output::arrears_batch(self.run_id, &self.period.label, as_of, &arrears),
            carried,
            exceptions,
            totals: t,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::engine::tests::{account, meter};
    use crate::store::scan::tests::file_of;

    #[test]
    fn a_page_whose_ids_jump_is_read_only_by_the_passes_whose_meters_it_holds() {
        // Accounts a0..a9 with meters 3000..3009; a0's meter was exchanged
        // for 9000 and a9's for 9009, ids that sort after all the others.
        let accounts: Vec<_> = (0..10).map(|i| account(&format!("a{i}"))).collect();
        let mut meters: Vec<_> = (0..10)
            .map(|i| meter(&format!("300{i}"), &format!("a{i}")))
            .collect();
        meters.push(meter("9000", "a0"));
        meters.push(meter("9009", "a9"));
        let roster = Roster::new(&accounts, &meters);
        let passes = vec![0..5, 5..10];
        let by_pass = roster.id_passes(&passes);
        // One file with two readings of each meter but 9000 (in another
        // file): pages of 8 rows.
        let mut ids: Vec<String> = (0..10)
            .flat_map(|i| [format!("300{i}"), format!("300{i}")])
            .collect();
        ids.extend(["9009".to_string(), "9009".to_string()]);
        let dir = tempfile::tempdir().unwrap();
        let units = file_of(dir.path(), &ids, 8, false);
        let pages = units[0].id_pages();
        assert_eq!(pages.len(), 3);
        // Page 0 (3000..3003) is the first pass's by its min and max; page
        // 1 (3004..3007) both passes'; page 2 (3008..9009) could hold 9000
        // by its min and max, but its ids are the second pass's only.
        let masks = page_passes(&units[0], &pages, &by_pass).unwrap();
        assert_eq!(masks, vec![Some(0b01), Some(0b11), Some(0b10)]);
        // Ids a page cannot be read for here: min / max decide.
        let dict = file_of(dir.path(), &ids, 8, true);
        let pages = dict[0].id_pages();
        let masks = page_passes(&dict[0], &pages, &by_pass).unwrap();
        assert_eq!(masks, vec![Some(0b01), None, None]);
        // More passes than a mask holds: min / max for every page.
        let mut many = vec![0..0; 65];
        many.push(0..10);
        let by_many = roster.id_passes(&many);
        let masks = page_passes(&units[0], &units[0].id_pages(), &by_many).unwrap();
        assert_eq!(masks, vec![None, None, None]);
    }
}
