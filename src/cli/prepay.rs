//! `meterflow prepay ...`: deduction runs over the readings lake.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use chrono::{NaiveDate, NaiveDateTime};

use super::ledger::LedgerArg;
use crate::prepay::alerts::Thresholds;
use crate::prepay::control::{dispatch, Control, RelayDispatch, RelayStats};
use crate::prepay::pricing::TariffPricer;
use crate::prepay::run::{run_batch, Fleet, PrepayHook, RunOptions};
use crate::prepay::sinks::{deliver, mqtt_publisher, Sinks};

// Parsed once per process: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, clap::Subcommand)]
pub enum PrepayCmd {
    /// Deduct everything in the lake not yet deducted, through a time.
    ///
    /// Charges come from the tariff engine, cumulatively within each bill
    /// month (tier year for annual tiers), so daily deductions add up to the
    /// month's energy bill. Safe to re-run, to kill at any point and to run
    /// twice at once: each chunk of meters commits with its cursors.
    /// Alerts and relay orders are written to the ledger outbox in the same
    /// transaction and then delivered to the configured sinks; an alert a
    /// sink did not take stays pending for the next run.
    ///
    /// Exit 2: conflicting entries, relay commands refused or unanswered, or
    /// alerts left pending.
    Run(RunArgs),
    /// Send (or dry-run) the pending relay orders of the ledger outbox, e.g.
    /// those a `stream` process ordered. Same rules and audit as `prepay run`.
    ///
    /// Example: meterflow prepay relay --ledger prepay.sqlite --thresholds sample-data/thresholds.toml --execute
    Relay(RelayArgs),
}

#[derive(Debug, clap::Args)]
pub struct RelayArgs {
    #[command(flatten)]
    pub l: LedgerArg,
    /// Thresholds file with the `[control]` section.
    #[arg(long)]
    pub thresholds: PathBuf,
    #[command(flatten)]
    pub x: ExecuteArgs,
    /// Clock for protected windows (RFC 3339); default now.
    #[arg(long)]
    pub now: Option<String>,
    /// Print the counters as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Sending relay commands.
#[derive(Debug, clap::Args)]
pub struct ExecuteArgs {
    /// Send relay commands through the DL/T 645 relay control (0x1C) and wait
    /// for each answer; without it they are only audited as dry runs and stay
    /// pending. Password: METERFLOW_DLT645_PASSWORD (default 02000000).
    #[arg(long)]
    pub execute: bool,
    /// collectors.toml routing meters to their bus (overrides `[control] collectors`).
    #[arg(long)]
    pub collectors: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub l: LedgerArg,
    /// Readings lake root.
    #[arg(long)]
    pub lake: PathBuf,
    /// Master data folder (accounts.csv, meters.csv): prepaid accounts are deducted.
    #[arg(long)]
    pub master: PathBuf,
    /// Tariff folder (tariffs/*.toml, calendars/).
    #[arg(long)]
    pub tariffs: PathBuf,
    /// Deduct readings up to this local time, e.g. `2026-10-31T24:00` (end of October), or RFC 3339 with offset.
    #[arg(long)]
    pub through: String,
    /// Time zone of --through without an offset.
    #[arg(long, default_value = "Asia/Shanghai")]
    pub tz: String,
    /// First lake partition (UTC date) to read; default: 40 days before --through.
    #[arg(long)]
    pub from: Option<NaiveDate>,
    /// Thresholds file: alert levels, zero, overdraft limit, forecast days, remote fee control (see docs/prepay.md).
    #[arg(long)]
    pub thresholds: Option<PathBuf>,
    /// Write alerts to the `alerts` Parquet dataset under this root.
    #[arg(long)]
    pub alerts_out: Option<PathBuf>,
    /// Publish alerts to this MQTT broker (QoS 1).
    #[arg(long)]
    pub mqtt_url: Option<String>,
    /// MQTT topic for alerts.
    #[arg(long, default_value = "meterflow/alerts")]
    pub alerts_topic: String,
    /// POST each alert as JSON to this webhook (retried 5 times).
    #[arg(long)]
    pub webhook: Option<String>,
    /// Meters per ledger transaction (whole accounts: a chunk grows to hold
    /// every meter of its last account). A killed run redoes at most one chunk.
    #[arg(long, default_value_t = 5000)]
    pub chunk: usize,
    /// Clock for alerts and relay rules (RFC 3339); default now.
    #[arg(long)]
    pub now: Option<String>,
    #[command(flatten)]
    pub x: ExecuteArgs,
    /// Print the counters as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Parses `YYYY-MM-DDTHH:MM` (24:00 allowed) in `offset_secs`, or RFC 3339.
pub fn parse_through(s: &str, offset_secs: i32) -> anyhow::Result<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    let (date, time) = s.split_once('T').unwrap_or((s, "24:00"));
    let d: NaiveDate = date
        .parse()
        .with_context(|| format!("--through '{s}': date is not YYYY-MM-DD"))?;
    let local = if time.starts_with("24:00") {
        d.succ_opt()
            .context("date out of range")?
            .and_hms_opt(0, 0, 0)
            .context("time")?
    } else {
        let fmt = if time.len() > 5 {
            "%Y-%m-%dT%H:%M:%S"
        } else {
            "%Y-%m-%dT%H:%M"
        };
        NaiveDateTime::parse_from_str(s, fmt)
            .with_context(|| format!("--through '{s}': not YYYY-MM-DDTHH:MM"))?
    };
    Ok(local.and_utc().timestamp_millis() - offset_secs as i64 * 1000)
}

pub fn run(cmd: PrepayCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        PrepayCmd::Run(a) => run_cmd(a),
        PrepayCmd::Relay(a) => relay_cmd(a),
    }
}

fn parse_now(now: &Option<String>) -> anyhow::Result<Option<i64>> {
    Ok(match now {
        Some(n) => Some(
            chrono::DateTime::parse_from_rfc3339(n)
                .context("--now is not RFC 3339")?
                .timestamp_millis(),
        ),
        None => None,
    })
}

/// The relay dispatch of a thresholds file's `[control]` (None without one).
fn relay_dispatch(
    th: &Thresholds,
    control: Option<&Control>,
    x: &ExecuteArgs,
    now_ms: Option<i64>,
) -> anyhow::Result<Option<RelayDispatch>> {
    let Some(c) = &th.control else {
        if x.execute {
            bail!("--execute needs a thresholds file with a [control] section");
        }
        return Ok(None);
    };
    let audit = th
        .base_dir
        .join(c.audit_log.as_deref().unwrap_or("relay-audit.jsonl"));
    let mut d = RelayDispatch::from_config(
        c,
        &th.base_dir,
        audit,
        x.collectors.clone(),
        x.execute,
        control.cloned(),
    )?;
    d.now_ms = now_ms;
    Ok(Some(d))
}

fn print_relay(r: &RelayStats) {
    println!(
        "relay orders: {} pending looked at; {} commands accepted, {} refused, {} failed, {} already acknowledged, {} dry-run audited; {} trips held (protected), {} orders superseded",
        r.orders, r.accepted, r.refused, r.failed, r.already_acknowledged, r.dry_run, r.held_protected, r.superseded
    );
}

fn relay_cmd(a: RelayArgs) -> anyhow::Result<ExitCode> {
    let th = Thresholds::load(&a.thresholds)?;
    let control = Control::of_thresholds(&th, &a.thresholds)?;
    let now_ms = parse_now(&a.now)?;
    let Some(d) = relay_dispatch(&th, control.as_ref(), &a.x, now_ms)? else {
        bail!("{}: no [control] section", a.thresholds.display());
    };
    let mut led = crate::ledger::open_migrated(&a.l.ledger)?;
    let r = dispatch(led.as_mut(), &d)?;
    if a.json {
        println!("{}", serde_json::json!({ "relay": r }));
    } else {
        print_relay(&r);
    }
    Ok(if r.refused + r.failed > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

fn run_cmd(a: RunArgs) -> anyhow::Result<ExitCode> {
    let off = crate::tariff::parse_timezone(&a.tz)
        .with_context(|| format!("--tz '{}': unknown time zone", a.tz))?;
    let through_ms = parse_through(&a.through, off)?;
    let from = a.from.unwrap_or_else(|| {
        let (d, _) = crate::prepay::pricing::local_date_minute(through_ms, 0);
        d - chrono::Duration::days(40)
    });
    let mut led = crate::ledger::open_migrated(&a.l.ledger)?;
    led.prepare_for_batch()?;
    let loading = std::time::Instant::now();
    let fleet = Fleet::load(&a.master)?;
    tracing::info!(
        accounts = fleet.accounts.len(),
        meters = fleet.meters.len(),
        secs = loading.elapsed().as_secs_f64(),
        "prepaid fleet loaded"
    );
    let set = crate::tariff::load_dir(&a.tariffs)?;
    let pricer = TariffPricer::new(set);
    let th = match &a.thresholds {
        Some(p) => Thresholds::load(p)?,
        None => Thresholds::builtin(),
    };
    let control = match &a.thresholds {
        Some(p) => Control::of_thresholds(&th, p)?,
        None => None,
    };
    let now_ms = parse_now(&a.now)?;
    // Checked before deducting: a bad collectors config or broker URL fails fast.
    if let Some(u) = &a.mqtt_url {
        crate::ingest::mqtt::parse_url(u)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("--mqtt-url '{u}'"))?;
    }
    let relay = relay_dispatch(&th, control.as_ref(), &a.x, now_ms)?;
    let mut hook = PrepayHook {
        control: control.as_ref(),
        now_ms,
        ..PrepayHook::new(&th, &fleet)
    };
    let opts = RunOptions {
        lake: &a.lake,
        from,
        through_ms,
        chunk: a.chunk,
        evaluate_all: true,
    };
    let started = std::time::Instant::now();
    let stats = run_batch(led.as_mut(), &pricer, &fleet, &mut hook, &opts)?;
    led.finish_batch()?;
    let sinks = Sinks {
        alerts_root: a.alerts_out.clone(),
        webhook: a.webhook.clone(),
        webhook_attempts: 5,
        relay,
        alerts_topic: a.mqtt_url.as_ref().map(|_| a.alerts_topic.clone()),
        skip_when_busy: false,
    };
    let client_id = format!("meterflow-prepay-{}", std::process::id());
    let delivered = deliver(
        led.as_mut(),
        &sinks,
        &mut mqtt_publisher(a.mqtt_url.as_deref().unwrap_or_default(), &client_id),
    )?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "run": stats, "delivered": delivered, "seconds": started.elapsed().as_secs_f64() })
        );
    } else {
        println!(
            "{} meters, {} readings: {} deductions ({} yuan), {} already deducted, {} stale, {} backwards, {} held jumps, {} spikes dropped, {} not priced, {} conflicts; {} alerts delivered, {} left pending (a sink failed), {} relay orders in {:.2}s",
            stats.meters,
            stats.readings,
            stats.deductions,
            stats.amount,
            stats.duplicates,
            stats.stale,
            stats.backwards,
            stats.held,
            stats.spikes,
            stats.unpriced,
            stats.conflicts,
            delivered.alerts,
            delivered.undelivered,
            stats.relay_orders,
            started.elapsed().as_secs_f64()
        );
        print_relay(&delivered.relay);
    }
    // The process exits next: freeing a million accounts one by one would
    // only delay it.
    std::mem::forget(hook);
    std::mem::forget(fleet);
    Ok(
        if stats.conflicts > 0
            || delivered.undelivered > 0
            || delivered.relay.refused + delivered.relay.failed > 0
        {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        },
    )
}
