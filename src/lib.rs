//! meterflow: meter readings in, bills, prepayment deductions and alerts out.
//!
//! Data flows one way: `protocol` codecs -> `collector`s -> `store` (the readings
//! lake) -> `billing` (with `tariff`) -> ledger/alerts -> reports.

pub mod analytics;
pub mod billing;
pub mod cli;
pub mod collector;
pub mod ingest;
pub mod ledger;
pub mod master;
pub mod metrics;
pub mod model;
pub mod prepay;
pub mod privacy;
pub mod protocol;
pub mod report;
pub mod sim;
pub mod store;
pub mod tariff;
pub mod uplink;
