//! Simulated Modbus meters: real peers on a TCP socket (Modbus TCP or RTU
//! over TCP) or a pty (Modbus RTU), serving the built-in profiles with
//! advancing energy registers and injected faults.
//!
//! The framing is our own (`protocol::modbus::pdu`) rather than the
//! tokio-modbus server so that faults can break the wire format itself:
//! garbage bytes, replies that never come, replies that come too late.
//!
//! Devices file (TOML), one `[[device]]` per unit id:
//!
//! ```toml
//! [[device]]
//! unit_id = 1
//! profile = "eastron_sdm630"      # chint_dtsu666 | eastron_sdm630 | acrel_adl400
//! meter_id = "M-0001"             # informational
//! energy_per_hour = "3.6"         # import (and combined) energy advance, kWh per hour
//! [device.values]                 # channel = value; defaults are plausible constants
//! import_active_total = "12345.67"
//! voltage_a = "230.1"
//! [[device.fault]]
//! kind = "exception"              # exception | timeout | garbage | slow | nan | refuse_holes
//! code = 2                        # exception code (exception only)
//! every = 1                       # hit every Nth request (1 = all)
//! after = 0                       # start after this many requests
//! delay_ms = 0                    # slow: reply delay
//! until = 10                      # last request number hit (absent = forever)
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rust_decimal::{Decimal, RoundingStrategy};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::model::Channel;
use crate::protocol::modbus::config::{ConfigError, FieldError, FieldPath};
use crate::protocol::modbus::decode::{encode, wire_words};
use crate::protocol::modbus::pdu::{self, ReadReq, RtuScan};
use crate::protocol::modbus::{profiles, DataType, Register};

/// What a fault does to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// Reply with a Modbus exception (`code`).
    Exception,
    /// Never reply.
    Timeout,
    /// Reply with bytes that are not a valid frame.
    Garbage,
    /// Reply correctly after `delay_ms` (later than the client's timeout = a late reply).
    Slow,
    /// Reply with NaN in every float register.
    Nan,
    /// Refuse (exception 0x02, illegal data address) any read that spans an
    /// address holding no register: devices that do not allow reads across
    /// holes in their map.
    RefuseHoles,
}

/// One injected fault.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultConfig {
    pub kind: FaultKind,
    #[serde(default)]
    pub code: Option<u8>,
    #[serde(default = "one")]
    pub every: u64,
    #[serde(default)]
    pub after: u64,
    #[serde(default)]
    pub delay_ms: u64,
    /// Stop after this request number (inclusive); absent = forever.
    #[serde(default)]
    pub until: Option<u64>,
}

fn one() -> u64 {
    1
}

impl FaultConfig {
    fn hits(&self, n: u64) -> bool {
        n > self.after
            && (n - self.after).is_multiple_of(self.every.max(1))
            && self.until.is_none_or(|u| n <= u)
    }
}

/// One simulated device.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimDeviceConfig {
    pub unit_id: u8,
    pub profile: String,
    #[serde(default)]
    pub meter_id: String,
    /// Import energy advance per hour (applies to import_active_total and combined_active_total).
    #[serde(default)]
    pub energy_per_hour: Decimal,
    /// Channel name -> value served (before advancing).
    #[serde(default)]
    pub values: BTreeMap<String, Decimal>,
    #[serde(default, rename = "fault")]
    pub faults: Vec<FaultConfig>,
}

impl SimDeviceConfig {
    /// A fault-free device of a profile with default values.
    pub fn new(unit_id: u8, profile: &str) -> SimDeviceConfig {
        SimDeviceConfig {
            unit_id,
            profile: profile.to_string(),
            meter_id: String::new(),
            energy_per_hour: Decimal::ZERO,
            values: BTreeMap::new(),
            faults: Vec::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DevicesFile {
    #[serde(default, rename = "device")]
    devices: Vec<SimDeviceConfig>,
}

/// Parses a devices file text; errors carry file, line and field.
pub fn parse_devices(file: &str, text: &str) -> Result<Vec<SimDeviceConfig>, ConfigError> {
    let f: DevicesFile =
        toml::from_str(text).map_err(|e| ConfigError::from_toml(file, text, &e))?;
    let root = FieldPath::default().key("device");
    for (i, d) in f.devices.iter().enumerate() {
        check_device(d, &root.index(i), &f.devices[..i])
            .map_err(|e| ConfigError::at(file, text, &e))?;
    }
    Ok(f.devices)
}

/// Reads a devices file.
pub fn load_devices(path: &Path) -> Result<Vec<SimDeviceConfig>, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        line: None,
        field: String::new(),
        message: format!("cannot read: {e}"),
    })?;
    parse_devices(&file, &text)
}

fn check_device(
    d: &SimDeviceConfig,
    p: &FieldPath,
    before: &[SimDeviceConfig],
) -> Result<(), FieldError> {
    let e = |k: &str, m: String| FieldError {
        path: p.key(k),
        message: m,
    };
    if profiles::get(&d.profile).ok().flatten().is_none() {
        return Err(e(
            "profile",
            format!(
                "unknown profile '{}' (built-in: {})",
                d.profile,
                profiles::names().join(", ")
            ),
        ));
    }
    if d.unit_id == 0 || d.unit_id > 247 {
        return Err(e(
            "unit_id",
            format!("unit id {} is not 1..=247", d.unit_id),
        ));
    }
    if before.iter().any(|b| b.unit_id == d.unit_id) {
        return Err(e("unit_id", format!("unit id {} appears twice", d.unit_id)));
    }
    for k in d.values.keys() {
        k.parse::<Channel>().map_err(|err| FieldError {
            path: p.key("values").key(k),
            message: err.to_string(),
        })?;
    }
    for (i, f) in d.faults.iter().enumerate() {
        if f.kind == FaultKind::Exception && f.code.is_none() {
            return Err(FieldError {
                path: p.key("fault").index(i).key("code"),
                message: "an exception fault needs a code".into(),
            });
        }
    }
    Ok(())
}

/// Plausible default value of a channel.
pub fn default_value(c: Channel) -> Decimal {
    let s = match c {
        Channel::VoltageA => "230.1",
        Channel::VoltageB => "229.8",
        Channel::VoltageC => "231.2",
        Channel::CurrentA => "5.125",
        Channel::CurrentB => "4.875",
        Channel::CurrentC => "5.5",
        Channel::ActivePowerTotal => "3.4567",
        Channel::ActivePowerA => "1.1522",
        Channel::ActivePowerB => "1.1023",
        Channel::ActivePowerC => "1.2022",
        Channel::ReactivePowerTotal => "0.3456",
        Channel::ApparentPowerTotal => "3.4789",
        Channel::PowerFactorTotal => "0.98",
        Channel::Frequency => "50.01",
        Channel::ImportActiveTotal | Channel::CombinedActiveTotal => "12345.6",
        Channel::ExportActiveTotal => "12.3",
        Channel::ImportReactiveTotal => "234.5",
        Channel::ExportReactiveTotal => "45.6",
        _ => "1",
    };
    s.parse().unwrap_or(Decimal::ONE)
}

/// Rounds a value to what the register can carry exactly (its scale and, for
/// floats, its declared precision).
pub fn quantize(reg: &Register, v: Decimal) -> Decimal {
    let places = if reg.data_type.is_float() {
        reg.precision
    } else {
        0
    };
    let raw = (v - reg.offset)
        .checked_div(reg.scale)
        .unwrap_or(Decimal::ZERO)
        .round_dp_with_strategy(places, RoundingStrategy::MidpointAwayFromZero);
    raw * reg.scale + reg.offset
}

struct SimDevice {
    cfg: SimDeviceConfig,
    registers: Vec<Register>,
    requests: AtomicU64,
}

/// The simulated devices, shared by every listener serving them.
#[derive(Clone)]
pub struct Simulator {
    devices: Arc<BTreeMap<u8, SimDevice>>,
    started: Instant,
}

/// Simulator setup errors.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("device unit {0}: unknown profile '{1}'")]
    UnknownProfile(u8, String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl Simulator {
    pub fn new(devices: Vec<SimDeviceConfig>) -> Result<Simulator, SimError> {
        let mut map = BTreeMap::new();
        for d in devices {
            let p = profiles::get(&d.profile)
                .ok()
                .flatten()
                .ok_or_else(|| SimError::UnknownProfile(d.unit_id, d.profile.clone()))?;
            map.insert(
                d.unit_id,
                SimDevice {
                    registers: p.registers.clone(),
                    cfg: d,
                    requests: AtomicU64::new(0),
                },
            );
        }
        Ok(Simulator {
            devices: Arc::new(map),
            started: Instant::now(),
        })
    }

    /// Requests a unit has received so far.
    pub fn requests(&self, unit: u8) -> u64 {
        self.devices
            .get(&unit)
            .map_or(0, |d| d.requests.load(Ordering::Relaxed))
    }

    /// The value a unit serves for a channel right now (exactly as encoded).
    pub fn value(&self, unit: u8, channel: Channel) -> Option<Decimal> {
        let d = self.devices.get(&unit)?;
        let r = d.registers.iter().find(|r| r.channel == Some(channel))?;
        Some(self.value_of(d, r))
    }

    fn value_of(&self, d: &SimDevice, r: &Register) -> Decimal {
        let Some(c) = r.channel else {
            return Decimal::ZERO;
        };
        let mut v = d
            .cfg
            .values
            .get(c.as_str())
            .copied()
            .unwrap_or_else(|| default_value(c));
        if matches!(c, Channel::ImportActiveTotal | Channel::CombinedActiveTotal)
            && !d.cfg.energy_per_hour.is_zero()
        {
            let ms = Decimal::from(self.started.elapsed().as_millis() as u64);
            v += d.cfg.energy_per_hour * ms / Decimal::from(3_600_000u64);
        }
        quantize(r, v)
    }

    /// Register image for a read: every profile register overlapping the range, zeros elsewhere.
    fn image(&self, d: &SimDevice, req: &ReadReq, nan: bool) -> Vec<u16> {
        let mut words = vec![0u16; usize::from(req.count)];
        let (lo, hi) = (
            u32::from(req.start),
            u32::from(req.start) + u32::from(req.count),
        );
        for r in d.registers.iter().filter(|r| r.area == req.area) {
            let (rs, re) = (u32::from(r.address), r.end());
            if re <= lo || rs >= hi {
                continue;
            }
            let w = if nan && r.data_type == DataType::F32 {
                wire_words(&f32::NAN.to_be_bytes(), r.order)
            } else if nan && r.data_type == DataType::F64 {
                wire_words(&f64::NAN.to_be_bytes(), r.order)
            } else {
                encode(r, self.value_of(d, r)).unwrap_or_else(|_| vec![0; usize::from(r.words())])
            };
            for (k, word) in w.iter().enumerate() {
                let a = rs + k as u32;
                if (lo..hi).contains(&a) {
                    words[(a - lo) as usize] = *word;
                }
            }
        }
        words
    }

    /// Decides the answer to one request PDU for `unit`.
    fn handle(&self, unit: u8, req_pdu: &[u8], tcp: bool) -> Action {
        let fc = req_pdu.first().copied().unwrap_or(0);
        let Some(d) = self.devices.get(&unit) else {
            return if tcp {
                Action::Reply(
                    pdu::exception_response(fc, pdu::GATEWAY_TARGET_FAILED),
                    Duration::ZERO,
                )
            } else {
                Action::Silent
            };
        };
        let n = d.requests.fetch_add(1, Ordering::Relaxed) + 1;
        let req = match pdu::parse_read_request(req_pdu) {
            Ok(r) => r,
            Err(code) => return Action::Reply(pdu::exception_response(fc, code), Duration::ZERO),
        };
        let mut nan = false;
        let mut delay = Duration::ZERO;
        for f in d.cfg.faults.iter().filter(|f| f.hits(n)) {
            match f.kind {
                FaultKind::Exception => {
                    return Action::Reply(
                        pdu::exception_response(fc, f.code.unwrap_or(4)),
                        Duration::ZERO,
                    )
                }
                FaultKind::Timeout => return Action::Silent,
                FaultKind::Garbage => return Action::Garbage,
                FaultKind::Slow => delay = Duration::from_millis(f.delay_ms),
                FaultKind::Nan => nan = true,
                FaultKind::RefuseHoles if spans_hole(d, &req) => {
                    return Action::Reply(
                        pdu::exception_response(fc, pdu::ILLEGAL_DATA_ADDRESS),
                        Duration::ZERO,
                    )
                }
                FaultKind::RefuseHoles => {}
            }
        }
        let body = if req.area.is_bit() {
            let bits: Vec<bool> = self.image(d, &req, false).iter().map(|w| *w != 0).collect();
            pdu::bits_response(fc, &bits)
        } else {
            pdu::words_response(fc, &self.image(d, &req, nan))
        };
        Action::Reply(body, delay)
    }

    /// Serves Modbus TCP on a listener until the task is dropped.
    pub async fn serve_tcp(self, listener: TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let sim = self.clone();
            tokio::spawn(async move { sim.serve_tcp_conn(stream).await });
        }
    }

    async fn serve_tcp_conn<S: AsyncRead + AsyncWrite + Unpin>(&self, mut s: S) {
        let mut buf: Vec<u8> = Vec::with_capacity(512);
        let mut chunk = [0u8; 512];
        loop {
            while let Some(n) = pdu::tcp_frame_len(&buf) {
                let frame: Vec<u8> = buf.drain(..n).collect();
                let Some((tid, unit, req)) = pdu::tcp_unwrap(&frame) else {
                    return;
                };
                let out = match self.handle(unit, req, true) {
                    Action::Silent => continue,
                    Action::Garbage => (GARBAGE.to_vec(), Duration::ZERO),
                    Action::Reply(p, delay) => (pdu::tcp_wrap(tid, unit, &p), delay),
                };
                if !out.1.is_zero() {
                    tokio::time::sleep(out.1).await;
                }
                if s.write_all(&out.0).await.is_err() {
                    return;
                }
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Serves Modbus RTU on a byte stream (a pty master or a TCP connection).
    pub async fn serve_rtu<S: AsyncRead + AsyncWrite + Unpin>(&self, mut s: S) {
        let mut buf: Vec<u8> = Vec::with_capacity(512);
        let mut chunk = [0u8; 512];
        loop {
            loop {
                match pdu::rtu_scan_request(&buf) {
                    RtuScan::Incomplete => break,
                    RtuScan::Skip => {
                        buf.remove(0);
                    }
                    RtuScan::Frame { len, unit } => {
                        let frame: Vec<u8> = buf.drain(..len).collect();
                        let out = match self.handle(unit, &frame[1..len - 2], false) {
                            Action::Silent => continue,
                            Action::Garbage => (GARBAGE.to_vec(), Duration::ZERO),
                            Action::Reply(p, delay) => (pdu::rtu_wrap(unit, &p), delay),
                        };
                        if !out.1.is_zero() {
                            tokio::time::sleep(out.1).await;
                        }
                        if s.write_all(&out.0).await.is_err() {
                            return;
                        }
                    }
                }
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Listens for Modbus TCP; returns the bound address.
    pub async fn spawn_tcp(
        &self,
        addr: SocketAddr,
    ) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
        let l = TcpListener::bind(addr).await?;
        let local = l.local_addr()?;
        let sim = self.clone();
        Ok((local, tokio::spawn(sim.serve_tcp(l))))
    }

    /// Listens for RTU frames over TCP (a simulated serial gateway).
    pub async fn spawn_rtu_over_tcp(
        &self,
        addr: SocketAddr,
    ) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
        let l = TcpListener::bind(addr).await?;
        let local = l.local_addr()?;
        let sim = self.clone();
        let h = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = l.accept().await else {
                    continue;
                };
                let sim = sim.clone();
                tokio::spawn(async move { sim.serve_rtu(stream).await });
            }
        });
        Ok((local, h))
    }

    /// Opens a pty pair and serves RTU on its master side; returns the slave
    /// path for the collector's `serial.device`. The slave stays open in the
    /// simulator so the line survives the collector reopening it.
    pub fn spawn_pty(&self) -> std::io::Result<(PathBuf, JoinHandle<()>)> {
        use tokio_serial::SerialPort;
        let (master, slave) = tokio_serial::SerialStream::pair().map_err(std::io::Error::from)?;
        let path = slave
            .name()
            .map(PathBuf::from)
            .ok_or_else(|| std::io::Error::other("pty slave has no name"))?;
        let sim = self.clone();
        let h = tokio::spawn(async move {
            let _keep = slave;
            sim.serve_rtu(master).await;
        });
        Ok((path, h))
    }
}

/// Bytes that are not a valid Modbus frame of either kind.
const GARBAGE: [u8; 9] = [0xDE, 0xAD, 0xBE, 0xEF, 0x00, 0x03, 0x55, 0xAA, 0x13];

enum Action {
    Reply(Vec<u8>, Duration),
    Silent,
    Garbage,
}

/// Demo hook: serves `devices` over Modbus TCP at `addr` (port 0 picks one).
pub async fn spawn_tcp(
    devices: Vec<SimDeviceConfig>,
    addr: SocketAddr,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let sim = Simulator::new(devices).map_err(|e| std::io::Error::other(e.to_string()))?;
    sim.spawn_tcp(addr).await
}

/// True when some address of the read belongs to no register of the device.
fn spans_hole(d: &SimDevice, req: &ReadReq) -> bool {
    let lo = u32::from(req.start);
    let hi = lo + u32::from(req.count);
    (lo..hi).any(|a| {
        !d.registers
            .iter()
            .any(|r| r.area == req.area && (u32::from(r.address)..r.end()).contains(&a))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn devices_file_errors_name_line_and_field() {
        let text = "[[device]]\nunit_id = 1\nprofile = \"eastron_sdm630\"\n\n[[device]]\nunit_id = 2\nprofile = \"nope\"\n";
        let e = parse_devices("devices.toml", text).unwrap_err();
        assert_eq!(e.field, "device[1].profile");
        assert_eq!(e.line, Some(7));
    }

    #[test]
    fn served_values_are_quantized_to_what_the_register_carries() {
        let mut d = SimDeviceConfig::new(1, "chint_dtsu666");
        d.values.insert("voltage_a".into(), dec!(230.17));
        let sim = Simulator::new(vec![d]).unwrap();
        // DTSU666 voltages are floats in 0.1 V with precision 0
        assert_eq!(sim.value(1, Channel::VoltageA), Some(dec!(230.2)));
    }

    #[test]
    fn faults_hit_every_nth_request_after_the_first_ones() {
        let f = FaultConfig {
            kind: FaultKind::Timeout,
            code: None,
            every: 2,
            after: 1,
            delay_ms: 0,
            until: Some(5),
        };
        let hits: Vec<u64> = (1..=8).filter(|n| f.hits(*n)).collect();
        assert_eq!(hits, [3, 5]);
    }
}
