//! Batch billing: consumption from readings (with VEE), rating with the
//! tariff engine, and the bill run that writes `bills`, `bill_lines`,
//! `exceptions` and a manifest. Outputs and flags: docs/billing.md.

pub mod account;
pub mod arrears;
pub mod commit;
pub mod engine;
pub mod flags;
pub mod opening;
pub mod output;
pub mod payments;
pub mod period;
pub mod revision;
pub mod run;
pub mod vee;
