//! `meterflow tariff ...`: validate and show tariff files.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::tariff;

#[derive(Debug, clap::Subcommand)]
pub enum TariffCmd {
    /// Validate a tariff file and print it as a readable table.
    ///
    /// Errors name the file, the line and the field. Calendars named by a TOU
    /// schedule are read from `calendars/` next to the file (or --calendars).
    /// Exit code 0 when valid, 2 when not.
    Check(CheckArgs),
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Tariff TOML files (e.g. tariffs/bj-residential-monthly.toml), or a directory to check all.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Directory of calendar files; default: `calendars/` beside each tariff file.
    #[arg(long)]
    pub calendars: Option<PathBuf>,
}

pub fn run(cmd: TariffCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        TariffCmd::Check(a) => check(a),
    }
}

fn check(a: CheckArgs) -> anyhow::Result<ExitCode> {
    let mut files = Vec::new();
    for f in &a.files {
        if f.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(f)
                .with_context(|| format!("reading {}", f.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            v.sort();
            files.extend(v);
        } else {
            files.push(f.clone());
        }
    }
    let mut bad = 0;
    for f in &files {
        let cal = a.calendars.clone().unwrap_or_else(|| {
            f.parent()
                .unwrap_or(std::path::Path::new("."))
                .join("calendars")
        });
        match tariff::load_file(f, &cal) {
            Ok(t) => {
                print!("{}", tariff::table::render(&t));
                for w in tariff::table::warnings(&t) {
                    println!("warning: {w}");
                }
                println!(
                    "ok: {} is valid ({} version(s))\n",
                    f.display(),
                    t.versions.len()
                );
            }
            Err(e) => {
                eprintln!("error: {e}");
                bad += 1;
            }
        }
    }
    Ok(if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
