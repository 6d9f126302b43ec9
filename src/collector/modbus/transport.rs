//! One Modbus link (a TCP connection or a serial line) on tokio-modbus, with
//! the robustness tokio-modbus leaves to us: a timeout on every call,
//! reconnect after a TCP timeout, and draining the RTU line after one.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;
use tokio_modbus::client::{rtu, tcp, Context, Reader};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::Slave;

use super::config::{ModbusConnectionConfig, SerialConfig, Transport};
use crate::protocol::modbus::{Area, ReadRequest};

/// Why one read failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("timed out after {0} ms")]
    Timeout(u64),
    #[error("exception code {0:#04x} ({name})", name = exception_name(*.0))]
    Exception(u8),
    #[error("connect failed: {0}")]
    Connect(String),
    #[error("transport error: {0}")]
    Io(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("reply has {got} values, expected {want} (a stale reply?)")]
    ShortReply { want: usize, got: usize },
}

impl ReadError {
    /// Label for `errors_total{kind=...}`.
    pub fn kind(&self) -> String {
        match self {
            ReadError::Timeout(_) => "timeout".into(),
            ReadError::Exception(c) => format!("exception_{c:02x}"),
            ReadError::Connect(_) => "connect".into(),
            ReadError::Io(_) => "io".into(),
            ReadError::Protocol(_) => "protocol".into(),
            ReadError::ShortReply { .. } => "short_reply".into(),
        }
    }
    /// Worth another attempt (exceptions are answers, not losses).
    pub fn retryable(&self) -> bool {
        !matches!(self, ReadError::Exception(_))
    }
}

/// Standard names of Modbus exception codes.
pub fn exception_name(code: u8) -> &'static str {
    match code {
        0x01 => "illegal function",
        0x02 => "illegal data address",
        0x03 => "illegal data value",
        0x04 => "server device failure",
        0x05 => "acknowledge",
        0x06 => "server device busy",
        0x08 => "memory parity error",
        0x0A => "gateway path unavailable",
        0x0B => "gateway target device failed to respond",
        _ => "non-standard",
    }
}

/// Where and how to connect, copied out of the config.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    pub transport: Transport,
    pub address: Option<String>,
    pub serial: Option<SerialConfig>,
    pub timeout: Duration,
    pub drain: Duration,
    pub pause_after_connect: Duration,
}

impl LinkSettings {
    pub fn from_config(c: &ModbusConnectionConfig) -> LinkSettings {
        LinkSettings {
            transport: c.transport,
            address: c.address.clone(),
            serial: c.serial.clone(),
            timeout: Duration::from_millis(c.timeout_ms),
            drain: Duration::from_millis(c.drain_ms),
            pause_after_connect: Duration::from_millis(c.pause_after_connect_ms),
        }
    }
}

/// A lazily (re)connected client.
pub struct Link {
    settings: LinkSettings,
    ctx: Option<Context>,
    /// Set after a timeout or garbage: the next connect drains stale bytes first.
    dirty: bool,
}

/// Reads and discards whatever arrives until the line has been quiet for `quiet`
/// (bounded to 20 quiet periods so a chattering line cannot hold us forever).
async fn drain<S: AsyncRead + Unpin>(s: &mut S, quiet: Duration) -> usize {
    let mut buf = [0u8; 256];
    let mut dropped = 0;
    for _ in 0..20 {
        match tokio::time::timeout(quiet, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => dropped += n,
            _ => break,
        }
    }
    dropped
}

impl Link {
    pub fn new(settings: LinkSettings) -> Link {
        Link {
            settings,
            ctx: None,
            dirty: false,
        }
    }

    pub fn is_connected(&self) -> bool {
        self.ctx.is_some()
    }

    /// Drops the connection; the next read reconnects.
    pub fn reset(&mut self, dirty: bool) {
        self.ctx = None;
        self.dirty |= dirty;
    }

    async fn connect(&mut self) -> Result<(), ReadError> {
        let s = &self.settings;
        let t = s.timeout;
        let ctx = match s.transport {
            Transport::Tcp | Transport::RtuOverTcp => {
                let addr = s.address.clone().unwrap_or_default();
                let mut stream = tokio::time::timeout(t, TcpStream::connect(&addr))
                    .await
                    .map_err(|_| ReadError::Connect(format!("{addr}: timed out")))?
                    .map_err(|e| ReadError::Connect(format!("{addr}: {e}")))?;
                let _ = stream.set_nodelay(true);
                if s.transport == Transport::Tcp {
                    tcp::attach(stream)
                } else {
                    if self.dirty {
                        drain(&mut stream, s.drain).await;
                    }
                    rtu::attach(stream)
                }
            }
            Transport::Rtu => {
                let sc = s
                    .serial
                    .clone()
                    .ok_or_else(|| ReadError::Connect("no serial settings".into()))?;
                let mut port = open_serial(&sc)
                    .map_err(|e| ReadError::Connect(format!("{}: {e}", sc.device)))?;
                if self.dirty {
                    let n = drain(&mut port, s.drain).await;
                    if n > 0 {
                        tracing::debug!(device = %sc.device, bytes = n, "drained stale bytes from the RTU line");
                    }
                }
                rtu::attach(port)
            }
        };
        self.dirty = false;
        self.ctx = Some(ctx);
        if !s.pause_after_connect.is_zero() {
            tokio::time::sleep(s.pause_after_connect).await;
        }
        Ok(())
    }

    /// One read with the configured timeout. After a timeout or a transport
    /// error the link is dropped (TCP reconnects; RTU reopens and drains).
    pub async fn read(&mut self, unit: u8, req: &ReadRequest) -> Result<Vec<u16>, ReadError> {
        if self.ctx.is_none() {
            self.connect().await?;
        }
        let timeout = self.settings.timeout;
        let Some(ctx) = self.ctx.as_mut() else {
            return Err(ReadError::Connect("not connected".into()));
        };
        ctx.set_slave(Slave(unit));
        let (start, count) = (req.start, req.count);
        let fut = async {
            match req.area {
                Area::Holding => ctx.read_holding_registers(start, count).await,
                Area::Input => ctx.read_input_registers(start, count).await,
                Area::Coil => ctx
                    .read_coils(start, count)
                    .await
                    .map(|r| r.map(|b| b.into_iter().map(u16::from).collect())),
                Area::DiscreteInput => ctx
                    .read_discrete_inputs(start, count)
                    .await
                    .map(|r| r.map(|b| b.into_iter().map(u16::from).collect())),
            }
        };
        let res = tokio::time::timeout(timeout, fut).await;
        match res {
            Err(_) => {
                self.reset(true);
                Err(ReadError::Timeout(timeout.as_millis() as u64))
            }
            Ok(Err(tokio_modbus::Error::Transport(e))) => {
                self.reset(true);
                Err(ReadError::Io(e.to_string()))
            }
            Ok(Err(tokio_modbus::Error::Protocol(e))) => {
                // out of step: a stale or foreign reply; start clean
                self.reset(true);
                Err(ReadError::Protocol(e.to_string()))
            }
            Ok(Ok(Err(code))) => Err(ReadError::Exception(u8::from(code))),
            Ok(Ok(Ok(words))) => {
                // RTU has no transaction id: a reply of another length answers
                // some other request (a stale one); never decode it as ours
                let bad_len = if req.area.is_bit() {
                    words.len() < usize::from(count)
                } else {
                    words.len() != usize::from(count)
                };
                if bad_len {
                    self.reset(true);
                    return Err(ReadError::ShortReply {
                        want: usize::from(count),
                        got: words.len(),
                    });
                }
                Ok(words)
            }
        }
    }
}

/// Opens a serial port (also works on a pty slave path).
pub fn open_serial(sc: &SerialConfig) -> std::io::Result<tokio_serial::SerialStream> {
    use tokio_serial::{DataBits, Parity, StopBits};
    let parity = match sc.parity.as_str() {
        "even" => Parity::Even,
        "odd" => Parity::Odd,
        _ => Parity::None,
    };
    let data_bits = match sc.data_bits {
        5 => DataBits::Five,
        6 => DataBits::Six,
        7 => DataBits::Seven,
        _ => DataBits::Eight,
    };
    let stop_bits = if sc.stop_bits == 2 {
        StopBits::Two
    } else {
        StopBits::One
    };
    let builder = tokio_serial::new(&sc.device, sc.baud)
        .parity(parity)
        .data_bits(data_bits)
        .stop_bits(stop_bits);
    let port = tokio_serial::SerialStream::open(&builder).map_err(std::io::Error::from)?;
    Ok(port)
}
