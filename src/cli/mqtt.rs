//! `meterflow mqtt ...`: helpers around a broker (simulated publishers, a
//! discarding subscriber for benchmarks).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use rust_decimal::Decimal;

use crate::ingest::mqtt::{parse_url, publish_canonical};
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
    /// Broker URL.
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
}

#[derive(Debug, Args)]
pub struct DiscardArgs {
    /// Broker URL, `mqtt://HOST[:PORT]` (port 1883 by default); also read from MQTT_URL.
    #[arg(long, env = "MQTT_URL", default_value = "mqtt://127.0.0.1:1883")]
    pub url: String,
    /// Topic filter to subscribe to.
    #[arg(long)]
    pub filter: String,
    /// Stop after this many messages and print the rate.
    #[arg(long, default_value_t = 0)]
    pub messages: u64,
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
    let steps = a.readings.div_ceil(a.meters.max(1)) as i64;
    let start = a.start_ms.unwrap_or_else(|| now_ms() - steps * 60_000);
    let readings = sim_readings(a.readings, a.meters, start);
    let t = Instant::now();
    let msgs = publish_canonical(
        &a.url,
        &a.client_id,
        &a.topic,
        "publish-sim",
        &readings,
        a.per_message,
    )
    .await?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "published {} readings in {msgs} messages to {} in {secs:.2} s ({:.0} readings/s)",
        readings.len(),
        a.topic,
        readings.len() as f64 / secs.max(1e-9)
    );
    Ok(ExitCode::SUCCESS)
}

async fn discard(a: DiscardArgs) -> anyhow::Result<ExitCode> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
    let (_, host, port) = parse_url(&a.url).map_err(anyhow::Error::msg)?;
    let mut o = MqttOptions::new(a.client_id, host, port);
    o.set_max_packet_size(268_435_455, 268_435_455);
    o.set_clean_session(!a.persistent);
    let (client, mut ev) = AsyncClient::new(o, 1024);
    client.subscribe(a.filter.clone(), QoS::AtLeastOnce).await?;
    let mut n = 0u64;
    let mut first: Option<Instant> = None;
    let mut last: Option<Instant> = None;
    let mut bytes = 0u64;
    let idle = Duration::from_secs(a.idle_secs);
    while a.subscribe_only || n < a.messages {
        match tokio::time::timeout(idle, ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                println!("subscribed");
                if a.subscribe_only {
                    client.disconnect().await?;
                }
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                first.get_or_insert_with(Instant::now);
                n += 1;
                bytes += p.payload.len() as u64;
                if n == a.messages {
                    last = Some(Instant::now());
                }
            }
            Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => anyhow::bail!("connection: {e}"),
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
    let secs = match (first, last) {
        (Some(f), Some(l)) => (l - f).as_secs_f64(),
        (Some(f), None) => f.elapsed().as_secs_f64(),
        _ => 0.0,
    };
    println!("discarded {n} messages ({bytes} bytes) in {secs:.3} s");
    Ok(if n == a.messages {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
