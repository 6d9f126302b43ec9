use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use chrono::NaiveDate;

use crate::store::{compact, inspect};

#[derive(Debug, clap::Subcommand)]
pub enum StoreCmd {
    /// Print what a lake holds: partitions, files, rows, meters, channels, time range, quality.
    ///
    /// Unreadable (corrupt) files are listed by name and make the exit code 2;
    /// the rest of the lake is still reported.
    Inspect {
        /// Lake root (the folder holding readings/).
        dir: PathBuf,
        /// Machine-readable JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Merge each partition's files into one and remove exact duplicates.
    ///
    /// Exact duplicates (same meter, channel, ts and value) are dropped. A
    /// conflicting duplicate (same meter, channel, ts; different value) is never
    /// resolved silently: both rows stay, flagged `conflict`, and the pair is
    /// written to DIR/conflicts/date=.../. Quarantine partitions are merged
    /// the same way, keeping one of rows equal in every column (a dead letter
    /// written again after a redelivery).
    Compact {
        /// Lake root.
        dir: PathBuf,
        /// First partition date to compact (default: all).
        #[arg(long)]
        from: Option<NaiveDate>,
        /// Last partition date to compact, inclusive (default: all).
        #[arg(long)]
        to: Option<NaiveDate>,
        /// Print the counts as JSON (partitions, partitions_rewritten, files_in,
        /// files_out, rows_in, rows_out, exact_duplicates_removed, conflicts,
        /// quarantine_files_in, quarantine_files_out,
        /// quarantine_duplicates_removed) instead of a summary: for scripts
        /// and monitoring.
        #[arg(long)]
        json: bool,
    },
    /// Test helper: accept synthetic readings in batches, printing `acked N` after
    /// each durable accept, flushing every few batches (used by crash tests).
    #[command(hide = true)]
    Soak {
        #[arg(long)]
        lake: PathBuf,
        #[arg(long, default_value_t = 100_000)]
        readings: usize,
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        #[arg(long, default_value_t = 10)]
        flush_every: usize,
        #[arg(long, default_value = "soak")]
        writer_id: String,
    },
}

pub fn run(c: StoreCmd) -> anyhow::Result<ExitCode> {
    match c {
        StoreCmd::Inspect { dir, json } => {
            let r =
                inspect::inspect(&dir).with_context(|| format!("inspecting {}", dir.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print_report(&r);
            }
            Ok(if r.unreadable_files.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        StoreCmd::Compact {
            dir,
            from,
            to,
            json,
        } => {
            let s = compact::compact(
                &dir,
                from.unwrap_or(NaiveDate::MIN),
                to.unwrap_or(NaiveDate::MAX),
            )
            .with_context(|| format!("compacting {}", dir.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!(
                    "compacted {} partitions ({} rewritten): {} files -> {}, {} rows -> {}, {} exact duplicates removed, {} conflicts kept",
                    s.partitions, s.partitions_rewritten, s.files_in, s.files_out, s.rows_in, s.rows_out,
                    s.exact_duplicates_removed, s.conflicts
                );
                if s.quarantine_files_in > 0 {
                    println!(
                        "  quarantine: {} files -> {}, {} exact duplicates removed",
                        s.quarantine_files_in,
                        s.quarantine_files_out,
                        s.quarantine_duplicates_removed
                    );
                }
                if s.conflicts > 0 {
                    println!(
                        "  conflicting readings are listed in {}/conflicts/",
                        dir.display()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        StoreCmd::Soak {
            lake,
            readings,
            batch,
            flush_every,
            writer_id,
        } => soak(
            &lake,
            readings,
            batch.max(1),
            flush_every.max(1),
            &writer_id,
        ),
    }
}

fn soak(
    lake: &std::path::Path,
    n: usize,
    batch: usize,
    flush_every: usize,
    writer_id: &str,
) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    let mut l = crate::store::Lake::open(lake, crate::store::LakeOptions::new(writer_id))?;
    let mut out = std::io::stdout().lock();
    let mut i = 0;
    let mut batches = 0;
    while i < n {
        let end = (i + batch).min(n);
        let rs: Vec<_> = (i..end).map(crate::store::soak_reading).collect();
        l.accept(&rs)?;
        writeln!(out, "acked {end}")?;
        out.flush()?;
        batches += 1;
        if batches % flush_every == 0 {
            l.flush()?;
        }
        i = end;
    }
    l.flush()?;
    writeln!(out, "done {n}")?;
    Ok(ExitCode::SUCCESS)
}

fn print_report(r: &inspect::LakeReport) {
    println!("lake {}", r.root);
    println!(
        "  {} partitions, {} files, {:.1} MB, {} rows, {} meters",
        r.partitions.len(),
        r.files,
        r.bytes as f64 / 1e6,
        r.rows,
        r.meters
    );
    if let (Some(a), Some(b)) = (&r.first_ts, &r.last_ts) {
        println!("  time range {a} .. {b}");
    }
    println!(
        "  {:<12} {:>6} {:>12} {:>10} {:>10}",
        "date", "files", "rows", "meters", "MB"
    );
    for p in &r.partitions {
        println!(
            "  {:<12} {:>6} {:>12} {:>10} {:>10.1}",
            p.date,
            p.files,
            p.rows,
            p.meters,
            p.bytes as f64 / 1e6
        );
    }
    println!("  channels:");
    for (c, n) in &r.channels {
        println!("    {c:<24} {n:>12}");
    }
    println!("  quality:");
    for (q, n) in &r.quality {
        println!("    {q:<24} {n:>12}");
    }
    println!("  quarantined rows: {}", r.quarantined_rows);
    for (f, e) in &r.unreadable_files {
        println!("  UNREADABLE {f}: {e}");
    }
}
