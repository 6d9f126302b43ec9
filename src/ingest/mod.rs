//! MQTT ingest: broker -> decoders -> the readings lake, acknowledged only
//! after the lake made the message durable.
//!
//! `decode` is pure (bytes in, readings out); `mqtt` is the event loop;
//! `config` reads `ingest.toml`. See `docs/mqtt.md`.

pub mod batch;
pub mod config;
pub mod decode;
pub mod mqtt;
pub mod park;
pub mod session;

pub use mqtt::{demo_publish_and_ingest, run_ingest, IngestOptions};
