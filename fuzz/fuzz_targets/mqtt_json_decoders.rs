//! Every JSON decoder (canonical, gateway values, Tasmota, Shelly, JSON
//! mapping) on arbitrary bytes: errors are fine, panics are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meterflow::ingest::config::IngestConfig;
use meterflow::ingest::decode::{Decoder, Limits};

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

fuzz_target!(|data: &[u8]| {
    let cfg = IngestConfig::parse(CONFIG, std::path::Path::new("fuzz.toml")).unwrap();
    for (src, topic) in cfg
        .sources
        .iter()
        .zip(["c/x", "v/x", "tele/x/SENSOR", "s/x", "m/x"])
    {
        let mut d = Decoder::new(src, Limits::default()).unwrap();
        let _ = d.decode(topic, data, 1_763_800_000_000);
    }
});
