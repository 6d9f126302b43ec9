//! Every JSON decoder (canonical, gateway values, Tasmota, Shelly, JSON
//! mapping) on arbitrary bytes: errors are fine, panics are not. Every
//! reading that comes out fits the lake (DECIMAL(18,4), sane timestamp).
//!
//! cargo +nightly fuzz run mqtt_json_decoders -- -max_total_time=600
#![no_main]

// The decoders' own sources, compiled here without the rest of meterflow.
#[allow(dead_code, unused_imports)]
#[path = "../../src/model/mod.rs"]
mod model;
#[allow(dead_code, unused_imports)]
#[path = "../../src/protocol"]
mod protocol {
    pub mod sparkplug;
}
#[allow(dead_code, unused_imports)]
#[path = "../../src/ingest"]
mod ingest {
    pub mod config;
    pub mod decode;
    /// Shim: the config only needs the URL check of the MQTT module.
    pub mod mqtt {
        pub fn parse_url(url: &str) -> Result<(bool, String, u16), String> {
            match url.strip_prefix("mqtt://") {
                Some(rest) => Ok((false, rest.to_string(), 1883)),
                None => Err(format!("not mqtt://: {url}")),
            }
        }
    }
}
/// Shim: the lake's exact DECIMAL(18,4) check (same rule as `store::columns`).
mod store {
    pub mod columns {
        use rust_decimal::Decimal;
        pub fn to_scaled(value: Decimal) -> Result<i128, Decimal> {
            let v = value.normalize();
            let scale = v.scale() as i8;
            let scaled = if scale <= 4 {
                v.mantissa().checked_mul(10i128.pow((4 - scale) as u32))
            } else {
                None
            };
            match scaled {
                Some(s) if s.abs() < 10i128.pow(18) => Ok(s),
                _ => Err(value),
            }
        }
    }
}

use ingest::config::IngestConfig;
use ingest::decode::{Decoder, Limits, MIN_TS_MS};
use libfuzzer_sys::fuzz_target;

const CONFIG: &str = r#"
[mqtt]
url = "mqtt://127.0.0.1:1883"
client_id = "fuzz"
[[source]]
name = "canonical"
filter = "c/#"
format = "canonical"
[[source]]
name = "values"
filter = "v/#"
format = "values"
channels = { "EP" = "import_active_total", "P" = { channel = "active_power_total", unit = "W", scale = "0.1" } }
[[source]]
name = "tasmota"
filter = "t/#"
format = "tasmota"
[[source]]
name = "shelly"
filter = "s/#"
format = "shelly"
[[source]]
name = "map"
filter = "m/#"
format = "json_map"
channels = { "e" = { channel = "import_active_total", unit = "Wh" } }
[source.map]
each = "/rows"
meter_id = "/dev"
ts = "/t"
values = { "e" = "/m/e", "voltage_a" = "/m/u" }
"#;

const NOW: i64 = 1_763_800_000_000;

/// The JSON decoders keep no state between messages: build them once.
fn decoders() -> &'static std::sync::Mutex<Vec<Decoder>> {
    static D: std::sync::OnceLock<std::sync::Mutex<Vec<Decoder>>> = std::sync::OnceLock::new();
    D.get_or_init(|| {
        let cfg = IngestConfig::parse(CONFIG, std::path::Path::new("fuzz.toml")).unwrap();
        let ds = cfg
            .sources
            .iter()
            .map(|s| Decoder::new(s, Limits::default()).unwrap())
            .collect();
        std::sync::Mutex::new(ds)
    })
}

fuzz_target!(|data: &[u8]| {
    let mut ds = decoders().lock().unwrap_or_else(|e| e.into_inner());
    for (d, topic) in ds
        .iter_mut()
        .zip(["c/x", "v/x", "tele/x/SENSOR", "s/x", "m/x"])
    {
        if let Ok(out) = d.decode(topic, data, NOW) {
            for r in &out.readings {
                assert!(store::columns::to_scaled(r.value).is_ok(), "{r:?}");
                assert!(r.ts_ms >= MIN_TS_MS, "{r:?}");
            }
        }
    }
});
