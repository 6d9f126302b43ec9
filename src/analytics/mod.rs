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
    pub elapsed_ms: u128,
}

/// Computes every dataset and writes them to `opts.out` (atomically, one file each).
pub fn analyze(opts: &AnalyzeOptions) -> Result<AnalyzeSummary, AnalyticsError> {
    let t0 = std::time::Instant::now();
    let inputs = Inputs::load(
        &opts.lake,
        &opts.master,
        opts.runs.as_deref(),
        opts.utc_offset_secs,
    )?;
    let tables = datasets::all(&inputs, opts)?;
    std::fs::create_dir_all(&opts.out).map_err(|source| AnalyticsError::Io {
        path: opts.out.clone(),
        source,
    })?;
    let mut written = Vec::new();
    for (name, table, pii) in tables {
        if pii && !opts.pii {
            continue;
        }
        let file = if pii {
            format!("{name}.pii.parquet")
        } else {
            format!("{name}.parquet")
        };
        let path = opts.out.join(file);
        table.write_parquet(&path)?;
        written.push(Written {
            name: name.to_string(),
            path,
            rows: table.rows(),
            pii,
        });
    }
    let summary = AnalyzeSummary {
        datasets: written,
        readings: inputs.scan.readings,
        accounts: inputs.accounts.len(),
        as_of: datasets::as_of(&inputs, opts),
        elapsed_ms: t0.elapsed().as_millis(),
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

/// Collection success per collector and bus (also used by the run report).
pub fn datasets_collection(inp: &Inputs) -> Table {
    datasets::collection(inp)
}
