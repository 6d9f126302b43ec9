// ENGINEERS WORKING CONCURRENTLY: read AGENTS.md at the repo root first (shared build dir, file ownership, no git commands, deadline 04:30 UTC).
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
