//! `meterflow sim modbus`: simulated Modbus meters on the network and on a pty.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::sim::modbus::{load_devices, Simulator};

/// Serve simulated Modbus meters of the built-in profiles.
///
/// Every device of the devices file answers on each listener you ask for:
/// Modbus TCP on --listen, RTU frames over TCP on --rtu-listen (a simulated
/// serial gateway) and Modbus RTU on a pty with --pty (its path is printed;
/// use it as `serial.device` in collectors.toml). Energy registers advance by
/// `energy_per_hour`; faults (exception, timeout, garbage, slow, nan) are
/// injected per device. See sample-data/modbus-devices.toml and
/// docs/collectors.md. Runs until Ctrl-C.
///
/// Example: meterflow sim modbus --listen 127.0.0.1:5020 --devices sample-data/modbus-devices.toml --pty
#[derive(Debug, clap::Args)]
pub struct SimModbusArgs {
    /// Modbus TCP listen address (127.0.0.1 only in tests; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:5020")]
    pub listen: SocketAddr,
    /// Devices file (TOML, `[[device]]` tables).
    #[arg(long)]
    pub devices: PathBuf,
    /// Also serve RTU framing over TCP at this address (serial-gateway style).
    #[arg(long)]
    pub rtu_listen: Option<SocketAddr>,
    /// Also serve Modbus RTU on a new pty pair and print the device path.
    #[arg(long)]
    pub pty: bool,
}

pub fn run(a: SimModbusArgs) -> anyhow::Result<ExitCode> {
    let devices = load_devices(&a.devices).map_err(|e| anyhow::anyhow!("{e}"))?;
    let n = devices.len();
    let rt = tokio::runtime::Runtime::new().context("starting tokio")?;
    rt.block_on(async move {
        let sim = Simulator::new(devices).map_err(|e| anyhow::anyhow!("{e}"))?;
        let (addr, _tcp) = sim
            .spawn_tcp(a.listen)
            .await
            .with_context(|| format!("binding {}", a.listen))?;
        println!("modbus tcp: {addr} ({n} devices)");
        let _rtu_tcp = match a.rtu_listen {
            Some(l) => {
                let (addr, h) = sim
                    .spawn_rtu_over_tcp(l)
                    .await
                    .with_context(|| format!("binding {l}"))?;
                println!("modbus rtu over tcp: {addr}");
                Some(h)
            }
            None => None,
        };
        let _pty = if a.pty {
            let (path, h) = sim.spawn_pty().context("opening a pty pair")?;
            println!("modbus rtu pty: {}", path.display());
            Some(h)
        } else {
            None
        };
        tracing::info!("simulator running; Ctrl-C stops it");
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
        Ok(ExitCode::SUCCESS)
    })
}
