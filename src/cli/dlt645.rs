//! `meterflow dlt645 ...`: one-off tools for a DL/T 645 bus: find meters,
//! read a value, switch a relay.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::collector::config::{BusConfig, SerialSettings};
use crate::collector::dlt645::relay::{relay_control, AuditLog, RelayOrder, RelayOutcome};
use crate::collector::dlt645::{link, poll, scan, Bus, BusTiming, Endpoint, TxError};
use crate::protocol::dlt645::{Address, Di, Edition, Operator, Password, RelayCommand};

#[derive(Debug, clap::Subcommand)]
pub enum Dlt645Cmd {
    /// Find meters: the address of the only meter on a bus (AA wildcard), or probe candidate addresses.
    ///
    /// Each candidate is probed in `--edition` (2007 by default); a meter
    /// ignores the other edition's read, so one that stays silent is asked
    /// once more in the other edition, and the line says which edition
    /// answered ("present (1997; silent to 2007)"). `--no-fallback` probes
    /// only `--edition` (a meter of the other edition then shows as absent);
    /// it halves the time an absent address costs. Any answer counts as
    /// present and is not asked again; a garbled one (bad checksum after the
    /// retries) shows as "present? (2007: corrupt reply: ...)": something is
    /// there, check the line or for a duplicate address.
    ///
    /// Exit code 0 when at least one candidate is present (or present?), 2
    /// when none is.
    ///
    /// Example: meterflow dlt645 scan --tcp 127.0.0.1:6450 --candidates 398192000337,000000000414
    ///
    /// Example: meterflow dlt645 scan --tcp 127.0.0.1:6450 --edition 1997 --no-fallback --candidates 000000000414
    Scan(ScanArgs),
    /// Read data identifiers from one meter and print their decoded values.
    ///
    /// Example: meterflow dlt645 read --tcp 127.0.0.1:6450 --meter 398192000337 --di 0001FF00 --di 04000102
    Read(ReadArgs),
    /// Relay control for remote fee control. Dry-run unless --execute; every command is audited.
    ///
    /// Example: meterflow dlt645 relay --tcp 127.0.0.1:6450 --meter 398192000337 trip --execute
    Relay(RelayArgs),
    /// Measure bus efficiency against paced simulated gateways on 127.0.0.1 (see scripts/bench-dlt645-bus.sh).
    BenchBus(BenchBusArgs),
}

#[derive(Debug, clap::Args)]
pub struct BenchBusArgs {
    /// Buses (simulated gateways) polled concurrently.
    #[arg(long, default_value_t = 1)]
    pub buses: usize,
    #[arg(long, default_value_t = 4)]
    pub meters_per_bus: usize,
    #[arg(long, default_value_t = 2400)]
    pub baud: u32,
    /// Meter turnaround (response delay), ms.
    #[arg(long, default_value_t = 20)]
    pub turnaround_ms: u64,
    /// Collector's silent gap between a reply and the next request, ms.
    #[arg(long, default_value_t = 5)]
    pub silent_gap_ms: u64,
    /// FE bytes before requests and replies.
    #[arg(long, default_value_t = 4)]
    pub preamble: usize,
    /// Seconds to measure (after 1 s warm-up).
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
}

/// Where the bus is and how to talk on it.
#[derive(Debug, clap::Args)]
pub struct BusArgs {
    /// host:port of a transparent serial-to-TCP gateway.
    #[arg(long, conflicts_with = "serial")]
    pub tcp: Option<String>,
    /// Serial port (RS-485 adapter or pty).
    #[arg(long)]
    pub serial: Option<String>,
    /// Serial baud rate.
    #[arg(long, default_value_t = 2400)]
    pub baud: u32,
    /// Serial parity: even, odd or none.
    #[arg(long, default_value = "even")]
    pub parity: String,
    /// Reply timeout, ms.
    #[arg(long, default_value_t = 1000)]
    pub timeout_ms: u64,
    /// Extra attempts after a timeout or corrupt reply.
    #[arg(long, default_value_t = 1)]
    pub retries: u32,
}

impl BusArgs {
    fn bus_config(&self) -> anyhow::Result<BusConfig> {
        let serial = self.serial.as_ref().map(|p| {
            let mut s = SerialSettings::with_port(p.clone());
            s.baud = self.baud;
            s.parity = self.parity.clone();
            s
        });
        if self.tcp.is_none() && serial.is_none() {
            bail!("give the bus: --tcp HOST:PORT or --serial PATH");
        }
        let mut b = BusConfig::new("cli", self.tcp.clone(), serial);
        b.timeout_ms = self.timeout_ms;
        b.retries = self.retries;
        Ok(b)
    }

    async fn connect(&self) -> anyhow::Result<(Bus, String)> {
        let cfg = self.bus_config()?;
        let ep = Endpoint::of(&cfg);
        let l = link::open(&ep, Duration::from_secs(5))
            .await
            .with_context(|| format!("cannot open {ep}"))?;
        Ok((Bus::new("cli", l, BusTiming::of(&cfg)), ep.to_string()))
    }
}

#[derive(Debug, clap::Args)]
pub struct ScanArgs {
    #[command(flatten)]
    pub bus: BusArgs,
    /// Candidate addresses to probe (comma-separated); without them, read the address of the single meter on the bus.
    #[arg(long, value_delimiter = ',')]
    pub candidates: Vec<Address>,
    /// Edition probed first: 2007 or 1997. A silent candidate is then asked in the other one.
    #[arg(long, default_value = "2007")]
    pub edition: Edition,
    /// Probe only --edition: do not ask a silent candidate in the other edition.
    #[arg(long)]
    pub no_fallback: bool,
}

#[derive(Debug, clap::Args)]
pub struct ReadArgs {
    #[command(flatten)]
    pub bus: BusArgs,
    /// Meter address (nameplate number, 12 digits).
    #[arg(long)]
    pub meter: Address,
    /// Data identifier(s): 8 hex digits for 2007 (00010000), 4 for 1997 (9010). Repeatable.
    #[arg(long = "di", required = true)]
    pub dis: Vec<Di>,
}

#[derive(Debug, clap::Args)]
pub struct RelayArgs {
    #[command(flatten)]
    pub bus: BusArgs,
    /// Meter address: one meter (no AA wildcard, not the 99..99 broadcast).
    #[arg(long, value_parser = one_meter)]
    pub meter: Address,
    /// trip | allow-close | direct-close | alarm-on | alarm-off | protect-on | protect-off
    pub command: RelayCommand,
    /// File whose first line is the password: level PA then the 6-digit
    /// code (8 hex digits). Without it, METERFLOW_DLT645_PASSWORD, else
    /// 02000000. Never an argument: it would show in `ps` and shell history.
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// Operator code, 8 hex digits.
    #[arg(long, default_value = "00000000")]
    pub operator: Operator,
    /// The meter refuses the command after this many minutes.
    #[arg(long, default_value_t = 10)]
    pub expiry_minutes: i64,
    /// Offset of the meter's clock from UTC.
    #[arg(long, default_value = "+08:00", allow_hyphen_values = true)]
    pub utc_offset: String,
    /// Append-only audit log (JSON lines).
    #[arg(long, default_value = "dlt645-relay-audit.jsonl")]
    pub audit_log: PathBuf,
    /// Really send the command; without it only the frame is shown and the dry run audited.
    #[arg(long)]
    pub execute: bool,
}

/// A control command must reach exactly one meter: a wildcard or broadcast
/// would switch every meter it selects.
fn one_meter(s: &str) -> Result<Address, String> {
    let a = s.parse::<Address>().map_err(|e| e.to_string())?;
    // The same test as meter addresses in the collectors config.
    if a.has_wildcard() || a.is_broadcast() {
        return Err(format!(
            "{a} is a wildcard/broadcast address, not a meter: relay commands go to one meter"
        ));
    }
    Ok(a)
}

pub fn run(c: Dlt645Cmd) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        match c {
            Dlt645Cmd::Scan(a) => scan_cmd(a).await,
            Dlt645Cmd::Read(a) => read_cmd(a).await,
            Dlt645Cmd::Relay(a) => relay_cmd(a).await,
            Dlt645Cmd::BenchBus(a) => bench_cmd(a).await,
        }
    })
}

async fn scan_cmd(a: ScanArgs) -> anyhow::Result<ExitCode> {
    let (mut bus, ep) = a.bus.connect().await?;
    if a.candidates.is_empty() {
        return match scan::read_single_address(&mut bus).await {
            Ok(addr) => {
                println!("{addr}");
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("no single meter answered the wildcard read on {ep}: {e} (several meters on the bus? probe --candidates)");
                Ok(ExitCode::from(2))
            }
        };
    }
    let found = scan::probe_editions(&mut bus, &a.candidates, a.edition, !a.no_fallback)
        .await
        .context("bus lost")?;
    let mut any = false;
    let mut other = 0usize;
    for p in &found {
        println!("{}", probe_line(p));
        any |= p.present();
        other += usize::from(p.present() && p.silent_to.is_some());
    }
    if other > 0 {
        eprintln!(
            "{other} meter(s) answered only in {}: give them edition = \"{}\" in collectors.toml",
            scan::other_edition(a.edition),
            scan::other_edition(a.edition)
        );
    }
    Ok(if any {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// One line per candidate: present or absent, and in which edition.
fn probe_line(p: &scan::Probe) -> String {
    let tried = match p.silent_to {
        Some(first) => format!("{}; silent to {first}", p.edition),
        None => p.edition.to_string(),
    };
    match &p.result {
        Ok(()) => format!("{} present ({tried})", p.address),
        // Something answered, but the reply could not be trusted.
        Err(e) if p.garbled() => format!("{} present? ({tried}: {e})", p.address),
        Err(e) if p.present() => format!("{} present ({tried}: {e})", p.address),
        Err(e) => match p.silent_to {
            Some(first) if matches!(e, TxError::Timeout(_)) => {
                format!(
                    "{} absent (no reply in {first} or {})",
                    p.address, p.edition
                )
            }
            Some(first) => format!(
                "{} absent (no reply in {first}; {}: {e})",
                p.address, p.edition
            ),
            None => format!("{} absent ({}: {e})", p.address, p.edition),
        },
    }
}

async fn read_cmd(a: ReadArgs) -> anyhow::Result<ExitCode> {
    let (mut bus, _) = a.bus.connect().await?;
    let edition = a.dis[0].edition;
    let meter = crate::collector::config::ResolvedMeter {
        address: a.meter,
        meter_id: a.meter.to_string(),
        edition,
        schedules: vec![],
    };
    let mut failed = false;
    for di in a.dis {
        let name = di.info().map_or("(not in catalogue)", |i| i.name);
        let unit = di.info().map_or("", |i| i.unit);
        match poll::read_value(&mut bus, &meter, di, &a.meter.to_string()).await {
            Ok(v) => println!("{di}  {v} {unit}  # {name}"),
            Err(e) => {
                failed = true;
                println!("{di}  error: {e}  # {name}");
            }
        }
    }
    Ok(if failed {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

/// The relay password from `--password-file`, else the environment, else
/// the factory default.
fn relay_password(file: Option<&std::path::Path>) -> anyhow::Result<Password> {
    let (text, from) = match file {
        Some(p) => {
            let s = std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("--password-file {}: {e}", p.display()))?;
            (
                s.lines().next().unwrap_or("").trim().to_string(),
                p.display().to_string(),
            )
        }
        None => match std::env::var("METERFLOW_DLT645_PASSWORD") {
            Ok(v) => (
                v.trim().to_string(),
                "METERFLOW_DLT645_PASSWORD".to_string(),
            ),
            Err(std::env::VarError::NotPresent) => {
                ("02000000".to_string(), "the default".to_string())
            }
            Err(e) => anyhow::bail!("METERFLOW_DLT645_PASSWORD: {e}"),
        },
    };
    // The value itself is never echoed.
    text.parse::<Password>().map_err(|_| {
        anyhow::anyhow!("password from {from}: not 8 hex digits (level PA + 6-digit code)")
    })
}

async fn relay_cmd(a: RelayArgs) -> anyhow::Result<ExitCode> {
    let offset =
        crate::collector::config::parse_offset(&a.utc_offset).map_err(anyhow::Error::msg)?;
    let password = relay_password(a.password_file.as_deref())?;
    let order = RelayOrder::expiring_in(
        a.meter,
        a.command,
        password,
        a.operator,
        a.expiry_minutes,
        offset,
    );
    let audit = AuditLog::new(&a.audit_log);
    let (mut bus, ep) = if a.execute {
        let (b, ep) = a.bus.connect().await?;
        (Some(b), ep)
    } else {
        (
            None,
            a.bus.bus_config().map(|c| Endpoint::of(&c).to_string())?,
        )
    };
    let out = match relay_control(bus.as_mut(), &ep, &order, &audit, a.execute).await {
        Ok(o) => o,
        Err(e) if e.outcome_unknown() => {
            eprintln!(
                "{}: {} {e} (audited in {})",
                a.meter,
                a.command,
                audit.path().display()
            );
            return Ok(ExitCode::from(3));
        }
        Err(e) => return Err(e.into()),
    };
    match out {
        RelayOutcome::DryRun { request_hex } => {
            println!("dry run: would send {} to {} via {ep}", a.command, a.meter);
            println!("  frame: {request_hex}");
            println!(
                "  add --execute to send it; audited in {}",
                audit.path().display()
            );
            Ok(ExitCode::SUCCESS)
        }
        RelayOutcome::Accepted => {
            println!(
                "{}: {} accepted (audited in {})",
                a.meter,
                a.command,
                audit.path().display()
            );
            Ok(ExitCode::SUCCESS)
        }
        RelayOutcome::Refused(s) => {
            println!(
                "{}: {} refused: {s} (audited in {})",
                a.meter,
                a.command,
                audit.path().display()
            );
            Ok(ExitCode::from(2))
        }
    }
}

async fn bench_cmd(a: BenchBusArgs) -> anyhow::Result<ExitCode> {
    use crate::collector::dlt645::bench;
    let b = bench::BusBench {
        buses: a.buses,
        meters_per_bus: a.meters_per_bus,
        baud: a.baud,
        turnaround_ms: a.turnaround_ms,
        silent_gap_ms: a.silent_gap_ms,
        preamble: a.preamble,
        duration: Duration::from_secs(a.seconds),
    };
    let r = bench::run(&b).await?;
    let per_bus = r.reads_per_s / a.buses as f64;
    println!(
        "buses={} meters/bus={} baud={} turnaround={}ms gap={}ms frames={}+{} bytes: {} reads in {:.1}s = {:.2} reads/s ({:.2}/bus)",
        a.buses, a.meters_per_bus, a.baud, a.turnaround_ms, a.silent_gap_ms, r.request_bytes, r.reply_bytes, r.reads, r.seconds, r.reads_per_s, per_bus
    );
    println!(
        "  efficiency: {:.1}% of the wire+turnaround bound ({:.2} reads/s/bus), {:.1}% of the wire-only bound ({:.2} reads/s/bus)",
        100.0 * per_bus / r.wire_turnaround_bound_per_bus,
        r.wire_turnaround_bound_per_bus,
        100.0 * per_bus / r.wire_bound_per_bus,
        r.wire_bound_per_bus
    );
    Ok(ExitCode::SUCCESS)
}
