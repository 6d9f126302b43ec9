//! Modbus, the pure part: register maps, decoding to exact decimals, request
//! planning, TOML maps and built-in profiles, and byte framing for the
//! simulator. No IO here; the transport lives in `crate::collector::modbus`.

pub mod config;
pub mod decode;
pub mod pdu;
pub mod plan;
pub mod profiles;
pub mod regmap;

pub use config::{ConfigError, FieldError, FieldPath, RegisterSpec};
pub use decode::{decode, DecodeError, Value};
pub use plan::{plan, Field, PlanOptions, ReadRequest};
pub use regmap::{Area, DataType, Numbering, Order, Register};
