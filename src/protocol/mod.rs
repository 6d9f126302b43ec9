//! Wire protocols spoken by meters. Pure codecs: no IO, no clocks.

pub mod dlt645;
pub mod modbus;
pub mod sparkplug;
