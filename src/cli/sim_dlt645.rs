//! `meterflow sim dlt645`: simulated DL/T 645 meters behind a TCP port (like a
//! transparent gateway), on a new pty, or on an existing serial device.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::sim::dlt645::{self, SimFile};

#[derive(Debug, clap::Args)]
pub struct SimDlt645Args {
    /// Meters file (format in docs/collectors.md, example in sample-data/dlt645-meters.toml).
    #[arg(long)]
    pub meters: PathBuf,
    /// TCP address to serve the bus on (port 0 picks a free one; the address is printed).
    #[arg(long, default_value = "127.0.0.1:6450")]
    pub listen: SocketAddr,
    /// Serve on a new pty instead; its path is printed (open it as a serial port).
    #[arg(long, conflicts_with = "serial")]
    pub pty: bool,
    /// With --pty: also make a symlink to the pty at this path.
    #[arg(long, requires = "pty")]
    pub pty_link: Option<PathBuf>,
    /// Serve on an existing serial device (e.g. one end of a `socat` pty pair).
    #[arg(long)]
    pub serial: Option<String>,
    /// Override the file's baud rate for byte pacing (0 = no pacing).
    #[arg(long)]
    pub baud: Option<u32>,
}

pub fn run(a: SimDlt645Args) -> anyhow::Result<ExitCode> {
    let mut file = SimFile::load(&a.meters)?;
    if let Some(b) = a.baud {
        file.bus.baud = (b > 0).then_some(b);
    }
    let n = file.meters.len();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let task = if a.pty {
            let p = dlt645::spawn_pty(file).context("cannot open a pty")?;
            if let Some(link) = &a.pty_link {
                let _ = std::fs::remove_file(link);
                std::os::unix::fs::symlink(&p.path, link)
                    .with_context(|| format!("cannot link {}", link.display()))?;
            }
            println!("sim dlt645: {n} meters on pty {}", p.path.display());
            p.task
        } else if let Some(port) = &a.serial {
            let (_h, t) =
                dlt645::spawn_serial(file, port).with_context(|| format!("cannot open {port}"))?;
            println!("sim dlt645: {n} meters on {port}");
            t
        } else {
            let s = dlt645::spawn_tcp(file, a.listen)
                .await
                .with_context(|| format!("cannot listen on {}", a.listen))?;
            println!("sim dlt645: {n} meters listening on {}", s.addr);
            s.task
        };
        use std::io::Write;
        let _ = std::io::stdout().flush();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = task => {}
        }
        if let Some(link) = &a.pty_link {
            let _ = std::fs::remove_file(link);
        }
        Ok(ExitCode::SUCCESS)
    })
}
