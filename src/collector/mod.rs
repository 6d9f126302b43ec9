//! Collectors: poll meters and hand their readings to the lake.
//!
//! - [`config`]: the shared `collectors.toml`.
//! - [`dlt645`]: DL/T 645 buses (serial and TCP gateways).
//! - [`modbus`]: Modbus TCP/RTU connections.
//! - [`run`]: the `collect` engine tying them to the lake.

pub mod config;
pub mod dlt645;
pub mod modbus;
pub mod run;
