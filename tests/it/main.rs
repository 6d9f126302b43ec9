//! Integration tests: one binary, one module per area.

mod analytics;
mod billing;
mod common;
mod dlt645;
mod modbus;
mod mqtt;
mod prepay;
mod store;
mod uplink;
