//! Decision-support analytics: Parquet datasets for managers and data teams,
//! computed from the readings lake, master data and bill runs
//! (`meterflow analyze`). Every dataset and column: docs/analytics.md.
//!
//! Data-team files never hold raw personal data: personal fields are masked
//! (`crate::privacy`) and, with `--pseudonymize`, account ids are replaced by
//! a keyed hash. Raw values are written only with `--pii`, to `*.pii.parquet`.

mod datasets;
pub mod frame;
pub mod inputs;
pub mod query;
pub mod risk;
pub mod scan;
pub mod table;

use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use rust_decimal::Decimal;

pub use inputs::{load_bill_runs, BillRow, Inputs};
pub use table::{Col, Table};

use crate::privacy::AccountKey;

#[derive(Debug, thiserror::Error)]
pub enum AnalyticsError {
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
}

/// Options of `meterflow analyze`.
#[derive(Debug, Clone)]
pub struct AnalyzeOptions {
    pub lake: PathBuf,
    /// Folder with meters.csv, accounts.csv, payments.csv.
    pub master: PathBuf,
    /// Folder of bill run directories (each with bills.parquet + manifest.json), optional.
    pub runs: Option<PathBuf>,
    pub out: PathBuf,
    /// Account ids as is, or pseudonymized.
    pub key: AccountKey,
    /// Also write raw personal data to `*.pii.parquet`.
    pub pii: bool,
    /// Local time offset from UTC, seconds (UTC+8: 28800).
    pub utc_offset_secs: i32,
    /// Day the staged warnings and risk scores are computed for; default: last day with data.
    pub as_of: Option<NaiveDate>,
    /// Monthly tier thresholds (kWh) for staged warnings of residential accounts.
    pub tiers_kwh: Vec<Decimal>,
    /// Warn when the projected month exceeds this multiple of usual use.
    pub usual_multiple: Decimal,
    /// Holiday calendar (tariffs/calendars format) for the peak-period day types.
    pub calendar: Option<PathBuf>,
    /// Cut-off day of the arrears backtest; default: see `datasets::backtest_cutoff`.
    pub backtest_cutoff: Option<NaiveDate>,
}

impl AnalyzeOptions {
    pub fn new(
        lake: impl Into<PathBuf>,
        master: impl Into<PathBuf>,
        out: impl Into<PathBuf>,
    ) -> AnalyzeOptions {
        AnalyzeOptions {
            lake: lake.into(),
            master: master.into(),
            runs: None,
            out: out.into(),
            key: AccountKey::plain(),
            pii: false,
            utc_offset_secs: 8 * 3600,
            as_of: None,
            tiers_kwh: vec![Decimal::from(240), Decimal::from(400)],
            usual_multiple: Decimal::new(15, 1),
            calendar: None,
            backtest_cutoff: None,
        }
    }
}

/// One written dataset.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Written {
    pub name: String,
    pub path: PathBuf,
    pub rows: usize,
    pub pii: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AnalyzeSummary {
    pub datasets: Vec<Written>,
    pub readings: u64,
    pub accounts: usize,
    pub as_of: Option<NaiveDate>,
    pub calendar: Option<PathBuf>,
    /// Account-days completed after their day was written (gaps longer than
    /// `scan::OPEN_DAYS`): extra `daily_usage` rows.
    pub late_rows: u64,
    pub unknown_meter_readings: u64,
    pub backwards_pairs: u64,
    pub comm_loss_events: u64,
    pub elapsed_ms: u128,
    /// Lake scan (with `daily_usage` written alongside) and the rest.
    pub scan_ms: u128,
}

/// What the `daily_usage` writer thread receives.
enum DailyMsg {
    Batch(arrow::record_batch::RecordBatch),
    /// Everything sent: commit the file (without it the file is dropped).
    Commit,
}

/// Computes every dataset and writes them to `opts.out` (atomically, one
/// file each). `daily_usage` is encoded on a second thread while the lake
/// streams by.
pub fn analyze(opts: &AnalyzeOptions) -> Result<AnalyzeSummary, AnalyticsError> {
    let t0 = std::time::Instant::now();
    std::fs::create_dir_all(&opts.out).map_err(|source| AnalyticsError::Io {
        path: opts.out.clone(),
        source,
    })?;
    let calendar = match &opts.calendar {
        Some(p) => Some(
            crate::tariff::load_calendar(p)
                .map_err(|e| AnalyticsError::Invalid(format!("calendar {}: {e}", p.display())))?,
        ),
        None => None,
    };
    let lo = inputs::LoadOptions {
        utc_offset_secs: opts.utc_offset_secs,
        calendar,
        mtd_as_of: opts.as_of,
    };
    let daily_path = opts.out.join("daily_usage.parquet");
    let (tx, rx) = std::sync::mpsc::sync_channel::<DailyMsg>(2);
    let writer = std::thread::spawn(move || -> Result<usize, AnalyticsError> {
        let mut w = crate::store::atomic::ParquetFileWriter::create(
            &daily_path,
            datasets::daily_usage_schema(),
        )?;
        let mut rows = 0;
        for m in rx {
            match m {
                DailyMsg::Batch(b) => {
                    rows += b.num_rows();
                    w.write(&b)?;
                }
                DailyMsg::Commit => {
                    w.commit()?;
                    return Ok(rows);
                }
            }
        }
        Err(AnalyticsError::Invalid(
            "daily_usage: stopped before the end".into(),
        ))
    });
    let mut keys: Vec<String> = Vec::new();
    let loaded = (|| -> Result<Inputs, AnalyticsError> {
        let mut inp =
            Inputs::load_master(&opts.master, opts.runs.as_deref(), opts.utc_offset_secs)?;
        keys = datasets::account_keys(&inp.accounts, opts);
        let mut sink = |d: &scan::DayBatch<'_>| -> Result<(), AnalyticsError> {
            let b = datasets::daily_usage_batch(&keys, d)?;
            tx.send(DailyMsg::Batch(b))
                .map_err(|_| AnalyticsError::Invalid("daily_usage writer stopped".into()))
        };
        inp.scan_lake(&opts.lake, &lo, &mut sink)?;
        Ok(inp)
    })();
    if loaded.is_ok() {
        let _ = tx.send(DailyMsg::Commit);
    }
    drop(tx);
    let daily = writer
        .join()
        .map_err(|_| AnalyticsError::Invalid("daily_usage writer panicked".into()))?;
    let mut inputs = loaded?;
    let daily_rows = daily?;
    inputs.keys = keys;
    let scan_ms = t0.elapsed().as_millis();
    let tables = datasets::all(&inputs, opts)?;
    let mut written = vec![Written {
        name: "daily_usage".into(),
        path: opts.out.join("daily_usage.parquet"),
        rows: daily_rows,
        pii: false,
    }];
    // One file each, written in parallel, listed in dataset order.
    let files: Vec<Result<Written, AnalyticsError>> = {
        use rayon::prelude::*;
        tables
            .par_iter()
            .filter(|(_, _, pii)| !pii || opts.pii)
            .map(|(name, table, pii)| {
                let file = if *pii {
                    format!("{name}.pii.parquet")
                } else {
                    format!("{name}.parquet")
                };
                let path = opts.out.join(file);
                table.write_parquet(&path)?;
                Ok(Written {
                    name: name.to_string(),
                    path,
                    rows: table.rows(),
                    pii: *pii,
                })
            })
            .collect()
    };
    for w in files {
        written.push(w?);
    }
    let summary = AnalyzeSummary {
        datasets: written,
        readings: inputs.scan.readings,
        accounts: inputs.accounts.len(),
        as_of: datasets::as_of(&inputs, opts),
        calendar: opts.calendar.clone(),
        late_rows: inputs.scan.late_rows,
        unknown_meter_readings: inputs.scan.unknown_meter_readings,
        backwards_pairs: inputs.scan.backwards_pairs,
        comm_loss_events: inputs.scan.comm_loss_events,
        elapsed_ms: t0.elapsed().as_millis(),
        scan_ms,
    };
    let json =
        serde_json::to_vec_pretty(&summary).map_err(|e| AnalyticsError::Invalid(e.to_string()))?;
    crate::store::atomic::write_file_atomic(&opts.out.join("analytics.json"), &json)?;
    Ok(summary)
}

/// Names of data-team files in `dir` (everything but `*.pii.parquet`).
pub fn data_team_files(dir: &Path) -> Result<Vec<PathBuf>, AnalyticsError> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|source| AnalyticsError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.ends_with(".parquet") && !n.ends_with(".pii.parquet") && !n.starts_with('.') {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(out)
}

pub use datasets::scan_from_analytics;

/// Collection success per collector and bus (also used by the run report).
pub fn datasets_collection(inp: &Inputs) -> Table {
    datasets::collection(inp)
}
