//! The reading: one measured value of one channel of one meter at one time.

mod channel;
mod quality;

pub use channel::{Channel, UnknownChannel, IMPORT_TARIFF_REGISTERS};
pub use quality::{flag_text, Quality};

use std::sync::Arc;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// How a reading reached meterflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Dlt645,
    Modbus,
    Mqtt,
    Sim,
    Import,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Dlt645 => "dlt645",
            Protocol::Modbus => "modbus",
            Protocol::Mqtt => "mqtt",
            Protocol::Sim => "sim",
            Protocol::Import => "import",
        }
    }
    pub fn parse(s: &str) -> Option<Protocol> {
        Some(match s {
            "dlt645" => Protocol::Dlt645,
            "modbus" => Protocol::Modbus,
            "mqtt" => Protocol::Mqtt,
            "sim" => Protocol::Sim,
            "import" => Protocol::Import,
            _ => return None,
        })
    }
}

/// Where a reading came from: protocol, collector id, device address on that collector
/// (e.g. `bus1/398192000337`, `gw-3:502/unit 7`, an MQTT topic).
///
/// The texts are shared: every reading of one message, poll or bus carries
/// the same collector and address, and a copy per reading (two allocations,
/// two frees on another thread) was a measurable part of MQTT ingest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Source {
    pub protocol: Protocol,
    #[serde(with = "shared_text")]
    pub collector: Arc<str>,
    #[serde(with = "shared_text")]
    pub address: Arc<str>,
}

/// `Arc<str>` as a plain JSON string (serde's own impl needs its `rc` feature).
mod shared_text {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(t)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<str>, D::Error> {
        String::deserialize(d).map(Arc::from)
    }
}

/// One reading. Timestamps are UTC milliseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reading {
    pub meter_id: String,
    pub ts_ms: i64,
    pub channel: Channel,
    pub value: Decimal,
    pub quality: Quality,
    pub source: Source,
    pub received_ms: i64,
}

impl Reading {
    pub fn unit(&self) -> &'static str {
        self.channel.unit()
    }
}

/// Current time in UTC milliseconds.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
