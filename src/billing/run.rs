//! The bill run: master data + tariffs + the readings lake in, `bills`,
//! `bill_lines`, `exceptions` Parquet and `manifest.json` out, committed
//! atomically as one directory. Re-running a period whose run directory
//! already holds an issued run writes a revision with adjustment lines.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use arrow::array::{Array, BooleanArray, Decimal128Array, StringArray};
use chrono::DateTime;
use rayon::prelude::*;
use rust_decimal::Decimal;
use sha2::{Digest, Sha256};

use super::account::AccountBill;
use super::engine::{Engine, ExceptionRow};
use super::flags::Flags;
use super::output::{self, OutBill, OutLine};
use super::period::BillPeriod;
use super::vee::VeeConfig;
use crate::model::Channel;
use crate::tariff::price::LineKind;

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
    #[error("writing Parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BillingError + '_ {
    move |source| BillingError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Options of a bill run (`meterflow bill`).
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
    /// Called as files are read: (done, total).
    pub progress: Option<Box<dyn Fn(u64, u64) + Sync>>,
    /// Earlier runs whose unpaid bills (with `master/payments.csv`) bear late fees.
    pub previous: Vec<PathBuf>,
}

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
        }
    }
}

/// One output file: name, rows, bytes, SHA-256.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct OutputFile {
    pub name: String,
    pub rows: usize,
    pub bytes: usize,
    pub sha256: String,
}

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

fn sha256_file(path: &Path) -> Result<(String, u64), BillingError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    Ok((hex::encode(Sha256::digest(&bytes)), bytes.len() as u64))
}

/// Channels the bill run routes: registers, max demand, intervals, clock skew.
fn billed_channel(c: Channel) -> bool {
    super::vee::register_index(c).is_some()
        || matches!(
            c,
            Channel::MaxDemandImport | Channel::ImportActiveInterval | Channel::ClockSkew
        )
}

/// Aggregation key of a line for comparing runs.
type LineKey = (String, String, String, String);

struct Issued {
    /// (account, kind, label, version) -> (quantity, amount, tariff id)
    lines: BTreeMap<LineKey, (Decimal, Decimal, String)>,
    totals: BTreeMap<String, Decimal>,
    run_id: String,
}

fn read_issued(dirs: &[PathBuf]) -> Result<Issued, BillingError> {
    let mut is = Issued {
        lines: BTreeMap::new(),
        totals: BTreeMap::new(),
        run_id: String::new(),
    };
    for (n, dir) in dirs.iter().enumerate() {
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
                let key = (
                    acc.value(i).to_string(),
                    kind.value(i).to_string(),
                    label.value(i).to_string(),
                    ver.value(i).to_string(),
                );
                let q = Decimal::from_i128_with_scale(qty.value(i), output::QTY.1 as u32);
                let a = Decimal::from_i128_with_scale(amt.value(i), output::AMOUNT.1 as u32);
                *is.totals.entry(key.0.clone()).or_default() += a;
                let e = is.lines.entry(key).or_insert((
                    Decimal::ZERO,
                    Decimal::ZERO,
                    tar.value(i).to_string(),
                ));
                e.0 += q;
                e.1 += a;
            }
        }
    }
    Ok(is)
}

/// Runs a bill run. See docs/billing.md.
pub fn bill_run(opts: &BillRunOptions) -> Result<BillRunSummary, BillingError> {
    let t0 = Instant::now();
    let period = BillPeriod::parse(&opts.period).map_err(BillingError::Invalid)?;
    let tariffs = crate::tariff::load_dir(&opts.tariffs)?;
    let meters_path = opts.master.join(crate::master::METERS_FILE);
    let accounts_path = opts.master.join(crate::master::ACCOUNTS_FILE);
    let (meters, accounts) = rayon::join(
        || crate::master::load_meters(&meters_path),
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

    // Plan, then stream the lake day by day.
    let mut engine = Engine::new(
        &accounts.rows,
        &meters.rows,
        &tariffs,
        period.clone(),
        opts.vee.clone(),
    );
    let mut lake_files: Vec<(chrono::NaiveDate, PathBuf)> = Vec::new();
    if let Some((lo, hi)) = engine.needed_range() {
        let day = |ms: i64| {
            DateTime::from_timestamp_millis(ms)
                .map(|t| t.date_naive())
                .unwrap_or_default()
        };
        // Partitions inside the period, plus a margin around every boundary (a
        // tier-year start months earlier reads a few days, not the months between).
        let margin = opts.vee.max_interpolation_gap_ms;
        let (p_lo, p_hi) = engine.period_window().unwrap_or((lo, hi));
        let mut wanted = vec![(day(p_lo - margin), day(p_hi + margin))];
        for b in engine.bound_instants() {
            wanted.push((day(b - margin), day(b + margin)));
        }
        lake_files = crate::store::reader::list_files(
            &opts.lake,
            crate::store::schema::READINGS,
            day(lo),
            day(hi),
        )?
        .into_iter()
        .filter(|(d, _)| wanted.iter().any(|(a, b)| d >= a && d <= b))
        .collect();
        // Row groups are decoded a window at a time in parallel, then routed
        // to meter shards in parallel; windows keep file (date) order.
        let units = crate::store::scan::units(&lake_files)?;
        let total = units.len() as u64;
        let index = std::mem::take(&mut engine.meter_index);
        let scanner = crate::store::scan::Scanner {
            index: &index,
            shard_len: engine.shard_len(),
            shards: super::engine::SHARDS,
            lo,
            hi,
            keep: billed_channel,
        };
        let window = (2 * rayon::current_num_threads()).max(4);
        let mut done = 0u64;
        let mut chunks: Vec<crate::store::scan::Chunk> =
            (0..window).map(|_| Default::default()).collect();
        for w in units.chunks(window) {
            let chunks = &mut chunks[..w.len()];
            chunks
                .par_iter_mut()
                .zip(w)
                .map(|(c, u)| scanner.decode_into(u, c))
                .collect::<Result<Vec<()>, _>>()?;
            engine.apply_chunks(chunks);
            done += w.len() as u64;
            if let Some(p) = &opts.progress {
                p(done, total);
            }
        }
        engine.meter_index = index;
    }
    let readings = engine.readings_seen;
    if !opts.previous.is_empty() {
        engine.carried_ytd = super::arrears::read_carried_ytd(&opts.previous, period.start)?;
    }
    let t_scan = t0.elapsed();
    tracing::debug!(phase = "scan", rss_mb = rss_mb(), "bill run");
    let accounts_n = accounts.rows.len();
    let (mut bills, mut exceptions) = engine.finish();
    let (due_dates, inputs_history) = late_fees(
        opts,
        &period,
        &accounts.rows,
        &tariffs,
        &mut bills,
        &mut master_exceptions,
    )?;
    exceptions.extend(master_exceptions);
    exceptions.sort();
    let t_rate = t0.elapsed();
    tracing::debug!(phase = "rate", rss_mb = rss_mb(), "bill run");

    // Input hashes: SHA-256 for master data and tariffs, CRC32 for lake files (fast, in parallel).
    let mut inputs_master = Vec::new();
    for p in [&meters_path, &accounts_path] {
        let (h, n) = sha256_file(p)?;
        inputs_master
            .push(serde_json::json!({"path": p.display().to_string(), "sha256": h, "bytes": n}));
    }
    let mut inputs_tariffs = Vec::new();
    for p in tariffs.files() {
        let (h, n) = sha256_file(&p)?;
        inputs_tariffs
            .push(serde_json::json!({"path": p.display().to_string(), "sha256": h, "bytes": n}));
    }
    let lake_hashes: Vec<Result<serde_json::Value, BillingError>> = lake_files
        .par_iter()
        .map(|(_, p)| {
            let (crc, len) = crc32_file(p)?;
            Ok(serde_json::json!({"path": p.strip_prefix(&opts.lake).unwrap_or(p).display().to_string(), "crc32": format!("{crc:08x}"), "bytes": len}))
        })
        .collect();
    let inputs_lake: Vec<serde_json::Value> = lake_hashes.into_iter().collect::<Result<_, _>>()?;
    let mut id_hash = Sha256::new();
    id_hash.update(period.label.as_bytes());
    id_hash.update(revision.to_le_bytes());
    for v in inputs_master
        .iter()
        .chain(&inputs_tariffs)
        .chain(&inputs_lake)
        .chain(&inputs_history)
    {
        id_hash.update(v.to_string().as_bytes());
    }
    let run_id = hex::encode(&id_hash.finalize()[..8]);
    let t_hash = t0.elapsed();
    tracing::debug!(phase = "hash", rss_mb = rss_mb(), "bill run");

    // Outputs. Bills are turned into lines in fixed runs of 8,192 (so the
    // bytes never depend on the thread count), a group of runs at a time in
    // parallel, while a writer thread encodes the finished batches: lines are
    // never all in memory at once.
    const RUN: usize = 8192;
    let group = RUN * 2 * rayon::current_num_threads().max(1);
    let issued = if revision > 0 {
        Some(read_issued(&issued_dirs)?)
    } else {
        None
    };
    // Per bill: None = not in this output (a revision without adjustment),
    // else (line count, issued total, adjustment).
    type Emitted = Option<(usize, Option<Decimal>, Option<Decimal>)>;
    let mut emitted: Vec<Emitted> = Vec::with_capacity(bills.len());
    let (lines_bytes, lines_n) = std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<arrow::record_batch::RecordBatch>(8);
        let writer = scope.spawn(move || -> Result<(Vec<u8>, usize), BillingError> {
            let mut w = parquet::arrow::ArrowWriter::try_new(
                Vec::new(),
                output::lines_schema(),
                Some(crate::store::atomic::writer_properties()),
            )?;
            let mut n = 0;
            for batch in rx {
                n += batch.num_rows();
                w.write(&batch)?;
            }
            Ok((w.into_inner()?, n))
        });
        for g in bills.chunks(group) {
            let parts: Vec<(arrow::record_batch::RecordBatch, Vec<Emitted>)> = g
                .par_chunks(RUN)
                .map(|c| {
                    let mut lb = output::LinesBuilder::new(c.len() * 7);
                    let mut info = Vec::with_capacity(c.len());
                    for b in c {
                        let lines = output::out_lines(b, &tariffs);
                        let (out, e) = match &issued {
                            None => {
                                let n = lines.len();
                                (lines, Some((n, None, None)))
                            }
                            Some(is) => {
                                let adj = adjustments(b, &lines, is);
                                if adj.is_empty() {
                                    (adj, None)
                                } else {
                                    let issued_total =
                                        is.totals.get(&b.account_id).copied().unwrap_or_default();
                                    let diff: Decimal = adj.iter().map(|l| l.amount).sum();
                                    let n = adj.len();
                                    (adj, Some((n, Some(issued_total), Some(diff))))
                                }
                            }
                        };
                        for (n, l) in out.iter().enumerate() {
                            lb.push(
                                &run_id,
                                &period.label,
                                &b.account_id,
                                &b.tariff_id,
                                n + 1,
                                l,
                            );
                        }
                        info.push(e);
                    }
                    (lb.finish(), info)
                })
                .collect();
            for (batch, info) in parts {
                emitted.extend(info);
                if batch.num_rows() > 0 && tx.send(batch).is_err() {
                    break; // the writer failed: its error is returned below
                }
            }
        }
        drop(tx);
        writer
            .join()
            .unwrap_or_else(|_| Err(BillingError::Invalid("bill lines writer panicked".into())))
    })?;
    let mut out_bills: Vec<OutBill<'_>> = Vec::with_capacity(bills.len());
    let mut adjusted = 0usize;
    let mut adjustment_amount = Decimal::ZERO;
    let mut total_amount = Decimal::ZERO;
    let mut total_kwh = Decimal::ZERO;
    let mut by_tariff: BTreeMap<&str, (usize, Decimal)> = BTreeMap::new();
    let mut versions_used: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (b, e) in bills.iter().zip(&emitted) {
        total_amount += b.total;
        total_kwh += b.kwh;
        let t = by_tariff.entry(b.tariff_id.as_str()).or_default();
        t.0 += 1;
        t.1 += b.total;
        let vu = versions_used.entry(b.tariff_id.as_str()).or_default();
        for v in b.versions.split('+') {
            if !vu.contains(&v) {
                vu.push(v);
            }
        }
        let Some((line_count, issued_total, adjustment)) = *e else {
            continue;
        };
        if let Some(d) = adjustment {
            adjusted += 1;
            adjustment_amount += d;
        }
        out_bills.push(OutBill {
            bill: b,
            total: b.total,
            line_count,
            issued_total,
            adjustment,
            due_date: due_dates.get(b.account_id.as_str()).copied(),
        });
    }
    let t_lines = t0.elapsed();
    tracing::debug!(phase = "lines", rss_mb = rss_mb(), "bill run");
    let exceptions_batch = output::exceptions_batch(&run_id, &period.label, &exceptions);
    let bills_batch = output::bills_batch(&run_id, &period.label, &out_bills);
    let (bills_bytes, exceptions_bytes) = rayon::join(
        || output::parquet_bytes(output::bills_schema(), &[bills_batch]),
        || output::parquet_bytes(output::exceptions_schema(), &[exceptions_batch]),
    );
    let files = vec![
        ("bills.parquet", out_bills.len(), bills_bytes?),
        ("bill_lines.parquet", lines_n, lines_bytes),
        ("exceptions.parquet", exceptions.len(), exceptions_bytes?),
    ];
    let outputs: Vec<OutputFile> = files
        .iter()
        .map(|(name, rows, bytes)| OutputFile {
            name: name.to_string(),
            rows: *rows,
            bytes: bytes.len(),
            sha256: hex::encode(Sha256::digest(bytes)),
        })
        .collect();
    let estimated = bills
        .iter()
        .filter(|b| b.flags.contains(Flags::ESTIMATED))
        .count();
    let t_encode = t0.elapsed();
    tracing::debug!(phase = "encode", rss_mb = rss_mb(), "bill run");
    let manifest = serde_json::json!({
        "run_id": run_id,
        "period": period.label,
        "period_start": period.start.to_string(),
        "period_end_exclusive": period.end.to_string(),
        "revision": revision,
        "adjusts_run": issued.as_ref().map(|i| i.run_id.clone()),
        "created_by": format!("meterflow {}", env!("CARGO_PKG_VERSION")),
        "inputs": {"master": inputs_master, "tariffs": inputs_tariffs, "lake": inputs_lake, "history": inputs_history},
        "tariff_versions": versions_used,
        "counts": {"accounts": accounts_n, "bills": bills.len(), "estimated_bills": estimated, "exceptions": exceptions.len(),
                   "lines": lines_n, "readings": readings, "lake_files": lake_files.len(), "adjusted_accounts": adjusted},
        "sums": {"total_amount": total_amount.to_string(), "total_kwh": total_kwh.to_string(), "adjustment_amount": adjustment_amount.to_string(),
                 "by_tariff": by_tariff.iter().map(|(k, (n, a))| (k.to_string(), serde_json::json!({"bills": n, "total_amount": a.to_string()}))).collect::<BTreeMap<_, _>>()},
        "outputs": outputs,
        "timings_ms": {"load": t_load.as_millis(), "scan": (t_scan - t_load).as_millis(), "rate": (t_rate - t_scan).as_millis(),
                       "hash": (t_hash - t_rate).as_millis(), "lines": (t_lines - t_hash).as_millis(), "encode": (t_encode - t_lines).as_millis()},
    });
    let mut dir = None;
    if !opts.preview {
        let target = if revision == 0 {
            opts.out.clone()
        } else {
            opts.out.join(format!("revision-{revision}"))
        };
        commit_dir(&target, &files, &manifest)?;
        dir = Some(target);
    }
    Ok(BillRunSummary {
        run_id,
        period: period.label,
        preview: opts.preview,
        dir,
        revision,
        accounts: accounts_n,
        bills: bills.len(),
        estimated_bills: estimated,
        exceptions: exceptions.len(),
        lines: lines_n,
        total_amount,
        total_kwh,
        adjusted_accounts: adjusted,
        adjustment_amount,
        readings,
        files_read: lake_files.len(),
        outputs,
        elapsed_ms: t0.elapsed().as_millis(),
    })
}

/// Late fees of postpaid accounts on the unpaid bills of `opts.previous`
/// runs, added to `bills` as lines. Returns each such account's due date for
/// this bill and the history inputs (hashed into the manifest).
#[allow(clippy::type_complexity)]
fn late_fees<'a>(
    opts: &BillRunOptions,
    period: &BillPeriod,
    accounts: &'a [crate::master::Account],
    tariffs: &crate::tariff::TariffSet,
    bills: &mut [AccountBill],
    exceptions: &mut Vec<ExceptionRow>,
) -> Result<(BTreeMap<&'a str, chrono::NaiveDate>, Vec<serde_json::Value>), BillingError> {
    use crate::master::{CustomerClass, PaymentMode};
    let by_id: std::collections::HashMap<&str, &crate::master::Account> = accounts
        .iter()
        .map(|a| (a.account_id.as_str(), a))
        .collect();
    let last_day = period.end.pred_opt().unwrap_or(period.end);
    let mut inputs = Vec::new();
    let prior = if opts.previous.is_empty() {
        Default::default()
    } else {
        for dir in &opts.previous {
            let p = dir.join("bills.parquet");
            let (h, n) = sha256_file(&p)?;
            inputs.push(
                serde_json::json!({"path": p.display().to_string(), "sha256": h, "bytes": n}),
            );
        }
        super::arrears::read_prior_bills(&opts.previous)?
    };
    let mut payments: BTreeMap<&str, Vec<(chrono::NaiveDate, Decimal)>> = BTreeMap::new();
    let payments_path = opts.master.join(crate::master::PAYMENTS_FILE);
    let loaded;
    if !prior.is_empty() && payments_path.exists() {
        let (h, n) = sha256_file(&payments_path)?;
        inputs.push(serde_json::json!({"path": payments_path.display().to_string(), "sha256": h, "bytes": n}));
        loaded = crate::master::load_payments(&payments_path)
            .map_err(|e| BillingError::Master(e.to_string()))?;
        for e in &loaded.errors {
            exceptions.push(ExceptionRow {
                account_id: String::new(),
                meter_id: String::new(),
                code: "master_row".into(),
                detail: e.to_string(),
            });
        }
        for p in &loaded.rows {
            let Some(a) = by_id.get(p.account_id.as_str()) else {
                continue;
            };
            let offset = tariffs.get(&a.tariff_id).map_or(0, |t| t.utc_offset_secs);
            let (date, _) = super::period::local_date_minute(p.paid_at.timestamp_millis(), offset);
            payments
                .entry(a.account_id.as_str())
                .or_default()
                .push((date, p.amount));
        }
    }
    let mut due = BTreeMap::new();
    for b in bills.iter_mut() {
        let Some(a) = by_id.get(b.account_id.as_str()) else {
            continue;
        };
        if a.payment_mode != PaymentMode::Postpaid {
            continue;
        }
        let Ok(t) = tariffs.get(&b.tariff_id) else {
            continue;
        };
        let Some((vi, v)) = t
            .versions
            .iter()
            .enumerate()
            .find(|(_, v)| v.applies_on(last_day))
        else {
            continue;
        };
        let Some(rule) = &v.late_fee else { continue };
        due.insert(
            a.account_id.as_str(),
            super::arrears::due_date(period, rule),
        );
        let Some(prior) = prior.get(&b.account_id) else {
            continue;
        };
        let pays = payments
            .get(a.account_id.as_str())
            .map_or(&[][..], |v| v.as_slice());
        let residential = a.customer_class == CustomerClass::Residential;
        for line in
            super::arrears::late_fee_lines(rule, residential, prior, pays, period, &v.rounding)
        {
            b.total += line.amount;
            b.lines.push(super::account::BillLine {
                version_index: vi,
                line,
                flags: Flags::NONE,
            });
        }
    }
    Ok((due, inputs))
}

/// Adjustment lines of a re-rated bill against what was issued: per line key,
/// the difference in quantity and amount. Empty when nothing changed.
fn adjustments(b: &AccountBill, lines: &[OutLine], is: &Issued) -> Vec<OutLine> {
    let mut now: BTreeMap<(String, String, String), (Decimal, Decimal, &OutLine)> = BTreeMap::new();
    for l in lines {
        let e = now
            .entry((
                l.kind.as_str().to_string(),
                l.label.clone(),
                l.tariff_version.clone(),
            ))
            .or_insert((Decimal::ZERO, Decimal::ZERO, l));
        e.0 += l.quantity;
        e.1 += l.amount;
    }
    let mut out = Vec::new();
    let prefix = (
        b.account_id.clone(),
        String::new(),
        String::new(),
        String::new(),
    );
    let issued: Vec<(&LineKey, &(Decimal, Decimal, String))> = is
        .lines
        .range(prefix..)
        .take_while(|(k, _)| k.0 == b.account_id)
        .collect();
    for ((kind, label, ver), (q, a, l)) in &now {
        let key = (
            b.account_id.clone(),
            kind.clone(),
            label.clone(),
            ver.clone(),
        );
        let (iq, ia) = is
            .lines
            .get(&key)
            .map_or((Decimal::ZERO, Decimal::ZERO), |x| (x.0, x.1));
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
    for (k, (iq, ia, _)) in issued {
        if !now.contains_key(&(k.1.clone(), k.2.clone(), k.3.clone()))
            && (!iq.is_zero() || !ia.is_zero())
        {
            out.push(OutLine {
                kind: LineKind::parse(&k.1).unwrap_or(LineKind::Adjustment),
                label: k.2.clone(),
                tier: None,
                tou_period: None,
                quantity: -*iq,
                unit: "",
                unit_price: Decimal::ZERO,
                amount: -*ia,
                tariff_version: k.3.clone(),
                flags: Flags::ADJUSTED,
                is_adjustment: true,
            });
        }
    }
    out
}

/// Writes every file into a hidden temporary sibling directory, fsyncs, then
/// renames it into place: readers see the whole run or nothing.
fn commit_dir(
    target: &Path,
    files: &[(&str, usize, Vec<u8>)],
    manifest: &serde_json::Value,
) -> Result<(), BillingError> {
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "run".into());
    let tmp = parent.join(format!(".{name}.{}.tmp", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let write = |p: PathBuf, bytes: &[u8]| -> Result<(), BillingError> {
        let mut f = File::create(&p).map_err(io(&p))?;
        f.write_all(bytes).map_err(io(&p))?;
        f.sync_all().map_err(io(&p))
    };
    for (n, _, bytes) in files {
        write(tmp.join(n), bytes)?;
    }
    let text =
        serde_json::to_vec_pretty(manifest).map_err(|e| BillingError::Invalid(e.to_string()))?;
    write(tmp.join("manifest.json"), &text)?;
    crate::store::atomic::sync_dir(&tmp)?;
    if target.exists() {
        // An empty directory made by the user: replace it.
        std::fs::remove_dir(target).map_err(io(target))?;
    }
    std::fs::rename(&tmp, target).map_err(io(target))?;
    crate::store::atomic::sync_dir(parent)?;
    Ok(())
}
