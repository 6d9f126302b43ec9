//! The byte pipe to a bus: a TCP connection to a transparent gateway or a
//! local serial port (tokio-serial). Both look the same to the bus above.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::collector::config::{BusConfig, SerialSettings};

/// Anything bytes go in and out of.
pub trait Pipe: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Pipe for T {}

pub type Link = Box<dyn Pipe>;

/// Where a bus is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(String),
    Serial(SerialSettings),
}

impl Endpoint {
    pub fn of(bus: &BusConfig) -> Endpoint {
        match (&bus.tcp, &bus.serial) {
            (Some(a), _) => Endpoint::Tcp(a.clone()),
            (None, Some(s)) => Endpoint::Serial(s.clone()),
            (None, None) => Endpoint::Tcp(String::new()),
        }
    }

    /// Bits per character on the line (for wire-time estimates), if known.
    pub fn bits_per_char_and_baud(&self) -> Option<(u32, u32)> {
        match self {
            Endpoint::Serial(s) => Some((s.bits_per_char(), s.baud)),
            Endpoint::Tcp(_) => None,
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
            Endpoint::Serial(s) => write!(
                f,
                "{} ({} {}{}{})",
                s.port,
                s.baud,
                s.data_bits,
                s.parity.chars().next().unwrap_or('n').to_ascii_uppercase(),
                s.stop_bits
            ),
        }
    }
}

/// Opens the link, giving up after `timeout`.
pub async fn open(ep: &Endpoint, timeout: Duration) -> std::io::Result<Link> {
    match ep {
        Endpoint::Tcp(addr) => {
            let s = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr.as_str()))
                .await
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("connect to {addr} timed out"),
                    )
                })??;
            s.set_nodelay(true)?;
            Ok(Box::new(s))
        }
        Endpoint::Serial(s) => Ok(Box::new(open_serial(s)?)),
    }
}

/// Opens a serial port with the bus's line settings.
pub fn open_serial(s: &SerialSettings) -> std::io::Result<tokio_serial::SerialStream> {
    use tokio_serial::{DataBits, Parity, StopBits};
    let data_bits = match s.data_bits {
        5 => DataBits::Five,
        6 => DataBits::Six,
        7 => DataBits::Seven,
        _ => DataBits::Eight,
    };
    let parity = match s.parity.as_str() {
        "odd" => Parity::Odd,
        "none" => Parity::None,
        _ => Parity::Even,
    };
    let stop_bits = if s.stop_bits == 2 {
        StopBits::Two
    } else {
        StopBits::One
    };
    let builder = tokio_serial::new(&s.port, s.baud)
        .data_bits(data_bits)
        .parity(parity)
        .stop_bits(stop_bits)
        .flow_control(tokio_serial::FlowControl::None);
    tokio_serial::SerialStream::open(&builder).map_err(std::io::Error::from)
}
