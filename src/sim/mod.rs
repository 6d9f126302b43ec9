//! Simulators: a synthetic fleet written straight to a lake, and simulated
//! meters that are real network/serial peers.

pub mod dlt645;
pub mod fleet;
pub mod modbus;
