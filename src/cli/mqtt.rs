//! `meterflow mqtt ...`: helpers around a broker (simulated publishers, a
//! discarding subscriber for benchmarks).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use rust_decimal::Decimal;

use crate::ingest::config::MqttConfig;
use crate::ingest::mqtt::{connect_options, parse_url, publish_canonical_with};
use crate::model::{now_ms, Channel, Protocol, Quality, Reading, Source};

#[derive(Debug, Subcommand)]
pub enum MqttCmd {
    /// Publish simulated readings as canonical JSON at QoS 1 (waits for every PUBACK).
    PublishSim(PublishSimArgs),
    /// Subscribe at QoS 1 and throw messages away: the broker's delivery rate
    /// without any ingest work (the baseline of scripts/bench-mqtt.sh).
    Discard(DiscardArgs),
}

#[derive(Debug, Args)]
pub struct PublishSimArgs {
    /// Broker URL: `mqtt://HOST[:PORT]` or `mqtts://HOST[:PORT]` (TLS, port
    /// 8883 by default; needs --ca-file).
    #[arg(long, env = "MQTT_URL", default_value = "mqtt://127.0.0.1:1883")]
    pub url: String,
    /// Topic to publish to.
    #[arg(long, default_value = "meterflow/sim/readings")]
    pub topic: String,
    /// Number of readings in total.
    #[arg(long, default_value_t = 10_000)]
    pub readings: usize,
    /// Number of simulated meters (readings go round-robin, one minute apart per meter).
    #[arg(long, default_value_t = 100)]
    pub meters: usize,
    /// Readings per MQTT message (canonical JSON envelope).
    #[arg(long, default_value_t = 100)]
    pub per_message: usize,
    /// Client id of the publisher.
    #[arg(long, default_value = "meterflow-publish-sim")]
    pub client_id: String,
    /// First timestamp, UTC ms (default: now minus the span of the run).
    #[arg(long)]
    pub start_ms: Option<i64>,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
}

/// TLS files for `mqtts://` URLs (as `ca_file`, `client_cert_file` and
/// `client_key_file` in ingest.toml).
#[derive(Debug, Args)]
pub struct TlsArgs {
    /// PEM CA bundle that signs the broker's certificate, for `mqtts://`
    /// (as `ca_file` in ingest.toml: the only trust anchor, no system roots).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with --client-key-file).
    #[arg(long, value_name = "FILE", requires = "client_key_file")]
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of --client-cert-file.
    #[arg(long, value_name = "FILE", requires = "client_cert_file")]
    pub client_key_file: Option<PathBuf>,
}

/// Broker login (as `username`, `password_file` and `password_env` in
/// ingest.toml). The password itself is never a command-line argument.
#[derive(Debug, Args)]
pub struct AuthArgs {
    /// Username to log in with; the password comes from --password-file or
    /// --password-env (neither: an empty password).
    #[arg(long, value_name = "NAME")]
    pub username: Option<String>,
    /// File whose first line is the password.
    #[arg(long, value_name = "FILE", requires = "username")]
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the password.
    #[arg(
        long,
        value_name = "VAR",
        requires = "username",
        conflicts_with = "password_file"
    )]
    pub password_env: Option<String>,
}

#[derive(Debug, Args)]
pub struct DiscardArgs {
    /// Broker URL: `mqtt://HOST[:PORT]` (port 1883 by default) or
    /// `mqtts://HOST[:PORT]` (TLS, port 8883 by default; needs --ca-file).
    #[arg(long, env = "MQTT_URL", default_value = "mqtt://127.0.0.1:1883")]
    pub url: String,
    /// Topic filter to subscribe to.
    #[arg(long)]
    pub filter: String,
    /// Stop after this many messages and print the rate (exit status 2 when
    /// fewer arrive before --idle-secs passes without one). Without it: run
    /// until --idle-secs pass without a message, then print the count and rate
    /// (from the first to the last message; "rate n/a" with fewer than two).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub messages: Option<u64>,
    /// Client id of the subscriber. With `--persistent` the broker keeps the
    /// session (and queues messages) under this id: reuse it to drain that queue,
    /// and give concurrent subscribers different ids (the broker disconnects
    /// the older client on a duplicate id).
    #[arg(long, default_value = "meterflow-discard")]
    pub client_id: String,
    /// Give up after this many seconds without a message.
    #[arg(long, default_value_t = 30)]
    pub idle_secs: u64,
    /// Persistent session (clean session off): the broker queues messages
    /// for this client id while it is away.
    #[arg(long)]
    pub persistent: bool,
    /// Subscribe, wait for the SUBACK and disconnect (with `--persistent`:
    /// creates the session whose queue a later run drains).
    #[arg(long)]
    pub subscribe_only: bool,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
}

pub fn run(cmd: MqttCmd) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Runtime::new()?;
    match cmd {
        MqttCmd::PublishSim(a) => rt.block_on(publish_sim(a)),
        MqttCmd::Discard(a) => rt.block_on(discard(a)),
    }
}

/// `n` readings for `meters` meters: meter k%meters, one minute apart per meter,
/// cumulative import register rising 0.25 kWh per step.
pub fn sim_readings(n: usize, meters: usize, start_ms: i64) -> Vec<Reading> {
    let meters = meters.max(1);
    (0..n)
        .map(|k| {
            let m = k % meters;
            let step = (k / meters) as i64;
            Reading {
                meter_id: format!("SIM{m:06}"),
                ts_ms: start_ms + step * 60_000,
                channel: Channel::ImportActiveTotal,
                value: Decimal::new(1_000_000 + m as i64 * 10_000 + step * 25, 2),
                quality: Quality::OK,
                source: Source {
                    protocol: Protocol::Sim,
                    collector: "publish-sim".into(),
                    address: format!("sim/{m}").into(),
                },
                received_ms: start_ms,
            }
        })
        .collect()
}

async fn publish_sim(a: PublishSimArgs) -> anyhow::Result<ExitCode> {
    let o = client_options(&a.url, &a.client_id, &a.tls, &a.auth)?;
    let steps = a.readings.div_ceil(a.meters.max(1)) as i64;
    let start = a.start_ms.unwrap_or_else(|| now_ms() - steps * 60_000);
    let readings = sim_readings(a.readings, a.meters, start);
    let t = Instant::now();
    let msgs = publish_canonical_with(o, &a.topic, "publish-sim", &readings, a.per_message).await?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "published {} readings in {msgs} messages to {} in {secs:.2} s ({:.0} readings/s)",
        readings.len(),
        a.topic,
        readings.len() as f64 / secs.max(1e-9)
    );
    Ok(ExitCode::SUCCESS)
}

/// Connection options of the helpers: TLS for `mqtts://` exactly as ingest
/// builds it (rustls, ring, the CA file as the only root, optional client
/// certificate), and its login (the password read as ingest reads
/// `password_file` / `password_env`); TLS files with a plain `mqtt://` URL
/// are refused. Relative file paths are relative to the working directory.
fn client_options(
    url: &str,
    client_id: &str,
    t: &TlsArgs,
    a: &AuthArgs,
) -> anyhow::Result<rumqttc::MqttOptions> {
    let (tls, _, _) = parse_url(url).map_err(anyhow::Error::msg)?;
    let tls_files = t.ca_file.is_some() || t.client_cert_file.is_some();
    if tls && t.ca_file.is_none() {
        anyhow::bail!(
            "{url} is TLS: give --ca-file with the PEM CA that signs the broker's certificate"
        );
    }
    if !tls && tls_files {
        anyhow::bail!("--ca-file / --client-cert-file are for mqtts:// URLs, not {url}");
    }
    let mut m = MqttConfig::new(url, client_id);
    m.ca_file = t.ca_file.clone();
    m.client_cert_file = t.client_cert_file.clone();
    m.client_key_file = t.client_key_file.clone();
    m.username = a.username.clone();
    m.password_file = a.password_file.clone();
    m.password_env = a.password_env.clone();
    // Checked here to name the flag rather than the ingest.toml key.
    if let Err(e) = m.password(Path::new(".")) {
        let flag = match m.password_file {
            Some(_) => "--password-file",
            None => "--password-env",
        };
        anyhow::bail!("{flag}: {e}");
    }
    Ok(connect_options(&m, Path::new("."), client_id)?)
}

/// Connection options of `mqtt discard` ([`client_options`], and the session kind).
fn discard_options(a: &DiscardArgs) -> anyhow::Result<rumqttc::MqttOptions> {
    let mut o = client_options(&a.url, &a.client_id, &a.tls, &a.auth)?;
    o.set_clean_session(!a.persistent);
    Ok(o)
}

async fn discard(a: DiscardArgs) -> anyhow::Result<ExitCode> {
    use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS};
    let o = discard_options(&a)?;
    let (client, mut ev) = AsyncClient::new(o, 1024);
    client.subscribe(a.filter.clone(), QoS::AtLeastOnce).await?;
    let mut n = 0u64;
    let mut first: Option<Instant> = None;
    let mut last: Option<Instant> = None;
    let mut bytes = 0u64;
    let idle = Duration::from_secs(a.idle_secs);
    let done = |n: u64| !a.subscribe_only && a.messages.is_some_and(|m| n >= m);
    while !done(n) {
        match tokio::time::timeout(idle, ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                println!("subscribed");
                if a.subscribe_only {
                    client.disconnect().await?;
                }
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                first.get_or_insert_with(Instant::now);
                last = Some(Instant::now());
                n += 1;
                bytes += p.payload.len() as u64;
            }
            Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => anyhow::bail!("connection to {}: {e}", a.url),
            Err(_) => break,
        }
    }
    if a.subscribe_only {
        return Ok(ExitCode::SUCCESS);
    }
    // Let the last PUBACKs go out, so a persistent session is left empty.
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ev.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    // First message to last message (not to the end of the idle wait).
    let span = first.zip(last).map(|(f, l)| l - f);
    println!("{}", discard_summary(n, bytes, span));
    Ok(match a.messages {
        Some(m) if n < m => ExitCode::from(2),
        _ => ExitCode::SUCCESS,
    })
}

/// The last line of `mqtt discard`: count, bytes, the time from the first to
/// the last message and the rate over it (`n/a` with fewer than two messages
/// or no measurable time between them). scripts/bench-mqtt.sh reads the
/// number before the lone `s` and the bytes from the fourth field: keep them.
fn discard_summary(n: u64, bytes: u64, span: Option<Duration>) -> String {
    let secs = span.map_or(0.0, |d| d.as_secs_f64());
    // The n - 1 arrivals after the first, over the time they took.
    let rate = if n >= 2 && secs > 0.0 {
        format!("{:.0} msg/s", (n - 1) as f64 / secs)
    } else {
        "rate n/a".to_string()
    };
    format!("discarded {n} messages ({bytes} bytes) in {secs:.3} s ({rate})")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: MqttCmd,
    }

    fn discard_args(args: &[&str]) -> Result<DiscardArgs, clap::Error> {
        let argv = ["mqtt", "discard", "--filter", "t/#"].iter().chain(args);
        match Cli::try_parse_from(argv)?.cmd {
            MqttCmd::Discard(a) => Ok(a),
            c => panic!("{c:?}"),
        }
    }

    #[test]
    fn publish_sim_connects_with_tls_for_mqtts_urls_and_refuses_it_without_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "").unwrap();
        let ca = ca.to_str().unwrap();
        let args = |extra: &[&str]| {
            let argv = ["mqtt", "publish-sim"].iter().chain(extra);
            match Cli::try_parse_from(argv).unwrap().cmd {
                MqttCmd::PublishSim(a) => a,
                c => panic!("{c:?}"),
            }
        };
        let a = args(&["--url", "mqtts://broker.example:8884", "--ca-file", ca]);
        let o = client_options(&a.url, &a.client_id, &a.tls, &a.auth).unwrap();
        assert_eq!(o.broker_address(), ("broker.example".to_string(), 8884));
        assert!(matches!(o.transport(), rumqttc::Transport::Tls(_)));
        let a = args(&["--url", "mqtts://broker.example"]);
        let e = client_options(&a.url, &a.client_id, &a.tls, &a.auth).unwrap_err();
        assert!(e.to_string().contains("--ca-file"), "{e}");
    }

    #[test]
    fn discard_prints_a_rate_only_from_two_messages_on() {
        let ms = Duration::from_millis;
        assert_eq!(
            discard_summary(0, 0, None),
            "discarded 0 messages (0 bytes) in 0.000 s (rate n/a)"
        );
        assert_eq!(
            discard_summary(1, 42, Some(ms(0))),
            "discarded 1 messages (42 bytes) in 0.000 s (rate n/a)"
        );
        assert_eq!(
            discard_summary(2, 84, Some(ms(0))),
            "discarded 2 messages (84 bytes) in 0.000 s (rate n/a)"
        );
        assert_eq!(
            discard_summary(1001, 9, Some(ms(2000))),
            "discarded 1001 messages (9 bytes) in 2.000 s (500 msg/s)"
        );
    }

    #[test]
    fn discard_connects_with_tls_for_mqtts_urls() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        // No certificate in it: an empty trust store, enough to build the config.
        std::fs::write(&ca, "").unwrap();
        let ca = ca.to_str().unwrap();

        let a = discard_args(&["--url", "mqtts://broker.example", "--ca-file", ca]).unwrap();
        let o = discard_options(&a).unwrap();
        assert_eq!(o.broker_address(), ("broker.example".to_string(), 8883));
        assert!(matches!(o.transport(), rumqttc::Transport::Tls(_)));

        let a = discard_args(&["--url", "mqtt://broker.example"]).unwrap();
        let o = discard_options(&a).unwrap();
        assert_eq!(o.broker_address(), ("broker.example".to_string(), 1883));
        assert!(matches!(o.transport(), rumqttc::Transport::Tcp));
        assert!(o.clean_session());
    }

    #[test]
    fn discard_refuses_tls_without_a_ca_and_tls_files_without_tls() {
        let a = discard_args(&["--url", "mqtts://broker.example:8884"]).unwrap();
        let e = discard_options(&a).unwrap_err().to_string();
        assert!(e.contains("--ca-file"), "{e}");

        let a = discard_args(&["--url", "mqtt://broker.example", "--ca-file", "ca.pem"]).unwrap();
        let e = discard_options(&a).unwrap_err().to_string();
        assert!(e.contains("mqtts://"), "{e}");

        let a = discard_args(&[
            "--url",
            "mqtts://broker.example",
            "--ca-file",
            "/nonexistent/ca.pem",
        ])
        .unwrap();
        let e = discard_options(&a).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");

        let a = discard_args(&["--url", "http://broker.example"]).unwrap();
        assert!(discard_options(&a).is_err());

        // A client certificate needs its key.
        assert!(discard_args(&["--client-cert-file", "c.pem"]).is_err());
    }

    #[test]
    fn the_helpers_log_in_with_a_password_from_a_file_or_the_environment_never_an_argument() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let pw = pw.to_str().unwrap();
        let login = |a: &DiscardArgs| {
            discard_options(a)
                .unwrap()
                .credentials()
                .map(|l| (l.username, l.password))
        };
        let a = discard_args(&["--username", "mf", "--password-file", pw]).unwrap();
        assert_eq!(login(&a), Some(("mf".into(), "s3cret".into())));
        std::env::set_var("METERFLOW_TEST_DISCARD_PASSWORD", "from-env");
        let a = discard_args(&[
            "--username",
            "mf",
            "--password-env",
            "METERFLOW_TEST_DISCARD_PASSWORD",
        ])
        .unwrap();
        assert_eq!(login(&a), Some(("mf".into(), "from-env".into())));
        let a = discard_args(&["--username", "mf"]).unwrap();
        assert_eq!(login(&a), Some(("mf".into(), String::new())));
        assert_eq!(login(&discard_args(&[]).unwrap()), None);

        // Errors name the file or the variable.
        let a = discard_args(&["--username", "mf", "--password-file", "/nonexistent/pw"]).unwrap();
        let e = discard_options(&a).unwrap_err().to_string();
        assert!(
            e.contains("--password-file") && e.contains("/nonexistent/pw"),
            "{e}"
        );
        let a = discard_args(&[
            "--username",
            "u",
            "--password-env",
            "METERFLOW_TEST_UNSET_PW",
        ]);
        let e = discard_options(&a.unwrap()).unwrap_err().to_string();
        assert!(e.contains("METERFLOW_TEST_UNSET_PW"), "{e}");

        // No password argument; a password source needs a username; one source.
        assert!(discard_args(&["--username", "mf", "--password", "s3cret"]).is_err());
        assert!(discard_args(&["--password-file", pw]).is_err());
        assert!(discard_args(&[
            "--username",
            "mf",
            "--password-file",
            pw,
            "--password-env",
            "P"
        ])
        .is_err());
        let argv = [
            "mqtt",
            "publish-sim",
            "--username",
            "mf",
            "--password-file",
            pw,
        ];
        match Cli::try_parse_from(argv).unwrap().cmd {
            MqttCmd::PublishSim(a) => {
                let o = client_options(&a.url, &a.client_id, &a.tls, &a.auth).unwrap();
                assert_eq!(o.credentials().unwrap().password, "s3cret");
            }
            c => panic!("{c:?}"),
        }
    }

    #[test]
    fn discard_runs_until_idle_unless_given_a_message_count() {
        let a = discard_args(&["--url", "mqtt://127.0.0.1", "--persistent"]).unwrap();
        assert_eq!(a.messages, None);
        assert!(!discard_options(&a).unwrap().clean_session());
        assert_eq!(
            discard_args(&["--messages", "5"]).unwrap().messages,
            Some(5)
        );
        assert!(discard_args(&["--messages", "0"]).is_err());
    }
}
