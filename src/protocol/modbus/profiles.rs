//! Built-in meter profiles, embedded TOML register maps.

use std::sync::OnceLock;

use super::config::{load_map_str, ConfigError, MapFile};
use super::regmap::Register;

const BUILTIN: &[(&str, &str)] = &[
    ("chint_dtsu666", include_str!("profiles/chint_dtsu666.toml")),
    (
        "eastron_sdm630",
        include_str!("profiles/eastron_sdm630.toml"),
    ),
    ("acrel_adl400", include_str!("profiles/acrel_adl400.toml")),
];

/// A resolved profile.
#[derive(Debug, Clone)]
pub struct Profile {
    pub name: String,
    pub vendor: String,
    pub model: String,
    pub source: String,
    pub registers: Vec<Register>,
}

/// Names of the built-in profiles.
pub fn names() -> Vec<&'static str> {
    BUILTIN.iter().map(|(n, _)| *n).collect()
}

fn all() -> &'static Vec<Result<Profile, ConfigError>> {
    static CELL: OnceLock<Vec<Result<Profile, ConfigError>>> = OnceLock::new();
    CELL.get_or_init(|| {
        BUILTIN
            .iter()
            .map(|(name, text)| {
                let (map, registers): (MapFile, Vec<Register>) =
                    load_map_str(&format!("builtin profile {name}.toml"), text)?;
                Ok(Profile {
                    name: map.name,
                    vendor: map.vendor,
                    model: map.model,
                    source: map.source,
                    registers,
                })
            })
            .collect()
    })
}

/// Looks a profile up by name. `Ok(None)` when there is no such profile.
pub fn get(name: &str) -> Result<Option<&'static Profile>, ConfigError> {
    for (i, (n, _)) in BUILTIN.iter().enumerate() {
        if *n == name {
            return match &all()[i] {
                Ok(p) => Ok(Some(p)),
                Err(e) => Err(e.clone()),
            };
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::modbus::plan::{plan, PlanOptions};

    #[test]
    fn every_builtin_profile_loads_and_validates() {
        for n in names() {
            let p = get(n).unwrap().unwrap();
            assert_eq!(p.name, n);
            assert!(!p.source.is_empty(), "{n} must cite its source");
            assert!(p.registers.len() >= 10, "{n}");
            assert!(p
                .registers
                .iter()
                .any(|r| r.channel == Some(crate::model::Channel::ImportActiveTotal)));
        }
    }

    #[test]
    fn profiles_plan_into_few_requests() {
        for n in names() {
            let p = get(n).unwrap().unwrap();
            let reqs = plan(&p.registers, &PlanOptions::default());
            assert!(reqs.len() <= 3, "{n}: {} requests", reqs.len());
            assert!(reqs.iter().all(|r| r.count <= 125));
        }
    }

    #[test]
    fn unknown_profile_is_none() {
        assert!(get("no_such_meter").unwrap().is_none());
    }
}
