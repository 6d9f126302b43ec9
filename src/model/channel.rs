//! The channel catalogue: what a reading measured.
//!
//! Names are stable strings written to Parquet; the enum keeps code honest.
//! `docs/data-model.md` documents each one with its usual DL/T 645 DI and
//! Modbus register.

use std::fmt;
use std::str::FromStr;

macro_rules! channels {
    ($( $variant:ident => $name:literal, $unit:literal, $cumulative:literal, $desc:literal; )*) => {
        /// A measured quantity. `as_str` is the Parquet value.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Channel { $( $variant, )* }

        impl Channel {
            pub const ALL: &'static [Channel] = &[ $( Channel::$variant, )* ];

            pub fn as_str(self) -> &'static str {
                match self { $( Channel::$variant => $name, )* }
            }

            /// Unit the value is expressed in (kWh, kvarh, kW, V, A, ...).
            pub fn unit(self) -> &'static str {
                match self { $( Channel::$variant => $unit, )* }
            }

            /// True for accumulating registers (energy), whose deltas are consumption.
            pub fn is_cumulative(self) -> bool {
                match self { $( Channel::$variant => $cumulative, )* }
            }

            pub fn description(self) -> &'static str {
                match self { $( Channel::$variant => $desc, )* }
            }
        }

        impl FromStr for Channel {
            type Err = UnknownChannel;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $( $name => Ok(Channel::$variant), )*
                    other => Err(UnknownChannel(other.to_string())),
                }
            }
        }
    };
}

channels! {
    CombinedActiveTotal => "combined_active_total", "kWh", true, "combined active energy, total (import + export as configured in the meter)";
    ImportActiveTotal => "import_active_total", "kWh", true, "forward (import) active energy, total register";
    ImportActiveT1 => "import_active_t1", "kWh", true, "forward active energy, tariff 1 (sharp / critical peak)";
    ImportActiveT2 => "import_active_t2", "kWh", true, "forward active energy, tariff 2 (peak)";
    ImportActiveT3 => "import_active_t3", "kWh", true, "forward active energy, tariff 3 (flat / shoulder)";
    ImportActiveT4 => "import_active_t4", "kWh", true, "forward active energy, tariff 4 (valley)";
    ExportActiveTotal => "export_active_total", "kWh", true, "reverse (export) active energy, total register";
    ExportActiveT1 => "export_active_t1", "kWh", true, "reverse active energy, tariff 1";
    ExportActiveT2 => "export_active_t2", "kWh", true, "reverse active energy, tariff 2";
    ExportActiveT3 => "export_active_t3", "kWh", true, "reverse active energy, tariff 3";
    ExportActiveT4 => "export_active_t4", "kWh", true, "reverse active energy, tariff 4";
    ImportReactiveTotal => "import_reactive_total", "kvarh", true, "combined reactive energy 1 (inductive, Q1+Q2), total";
    ExportReactiveTotal => "export_reactive_total", "kvarh", true, "combined reactive energy 2 (capacitive, Q3+Q4), total";
    ImportActiveInterval => "import_active_interval", "kWh", false, "forward active energy consumed in the interval ending at ts (load profile, usually 15 min)";
    MaxDemandImport => "max_demand_import", "kW", false, "forward active maximum demand of the current billing period";
    VoltageA => "voltage_a", "V", false, "phase A voltage";
    VoltageB => "voltage_b", "V", false, "phase B voltage";
    VoltageC => "voltage_c", "V", false, "phase C voltage";
    CurrentA => "current_a", "A", false, "phase A current";
    CurrentB => "current_b", "A", false, "phase B current";
    CurrentC => "current_c", "A", false, "phase C current";
    ActivePowerTotal => "active_power_total", "kW", false, "total active power (signed)";
    ActivePowerA => "active_power_a", "kW", false, "phase A active power";
    ActivePowerB => "active_power_b", "kW", false, "phase B active power";
    ActivePowerC => "active_power_c", "kW", false, "phase C active power";
    ReactivePowerTotal => "reactive_power_total", "kvar", false, "total reactive power (signed)";
    ApparentPowerTotal => "apparent_power_total", "kVA", false, "total apparent power";
    PowerFactorTotal => "power_factor_total", "1", false, "total power factor (signed, -1..1)";
    Frequency => "frequency", "Hz", false, "grid frequency";
    ClockSkew => "clock_skew", "s", false, "meter clock minus collector clock at read time, seconds";
    Balance => "balance", "CNY", false, "remaining balance held by a locally fee-controlled meter";
}

/// A channel name that is not in the catalogue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown channel '{0}' (see docs/data-model.md for the catalogue)")]
pub struct UnknownChannel(pub String);

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for Channel {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Channel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Tariff registers 1..4 in DL/T 645 order (sharp, peak, flat, valley).
pub const IMPORT_TARIFF_REGISTERS: [Channel; 4] = [
    Channel::ImportActiveT1,
    Channel::ImportActiveT2,
    Channel::ImportActiveT3,
    Channel::ImportActiveT4,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_channel_round_trips_through_its_name() {
        for c in Channel::ALL {
            assert_eq!(c.as_str().parse::<Channel>().unwrap(), *c);
        }
    }

    #[test]
    fn unknown_channel_is_an_error_not_a_panic() {
        assert!("import_active_t9".parse::<Channel>().is_err());
    }
}
