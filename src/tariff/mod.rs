//! Tariffs: effective-dated versions of energy, tier, time-of-use, two-part,
//! power-factor, fixed, minimum and late-fee rules, loaded from TOML files
//! in a tariff directory (`tariffs/*.toml`, calendars in `tariffs/calendars/`).
//! File format and every field: `docs/tariffs.md`.
//!
//! Pricing is a pure function of a tariff version and cumulative quantities
//! ([`price`]); the biller (`crate::billing`) turns readings into those
//! quantities.

pub mod calendar;
pub mod demand;
pub mod late_fee;
mod load;
pub mod power_factor;
pub mod price;
pub mod rounding;
pub mod table;
pub mod tiered;
pub mod tou;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use rust_decimal::Decimal;

pub use load::{load_calendar, load_dir, load_file, load_str};

use demand::Demand;
use late_fee::LateFeeRule;
use power_factor::PfStandard;
use rounding::Rounding;
use tiered::Tiers;
use tou::Tou;

/// Errors from loading, validating or looking up tariffs.
#[derive(Debug, thiserror::Error)]
pub enum TariffError {
    /// A file is syntactically or semantically wrong: names file, line and field.
    #[error("{file}:{line}: {field}: {message}")]
    Invalid {
        file: String,
        line: usize,
        field: String,
        message: String,
    },
    #[error("{file}: {source}")]
    Io {
        file: String,
        source: std::io::Error,
    },
    #[error("unknown tariff id '{0}' (no tariffs/<id>.toml defines it)")]
    UnknownTariff(String),
    #[error("tariff '{tariff}' has no version in effect on {date}")]
    NoVersion { tariff: String, date: NaiveDate },
}

/// Customer class: decides late-fee rates and documents who a tariff is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CustomerClass {
    Residential,
    Commercial,
    Industrial,
    Agricultural,
}

impl CustomerClass {
    pub fn parse(s: &str) -> Option<CustomerClass> {
        Some(match s {
            "residential" => CustomerClass::Residential,
            "commercial" => CustomerClass::Commercial,
            "industrial" | "large_industry" => CustomerClass::Industrial,
            "agricultural" => CustomerClass::Agricultural,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            CustomerClass::Residential => "residential",
            CustomerClass::Commercial => "commercial",
            CustomerClass::Industrial => "industrial",
            CustomerClass::Agricultural => "agricultural",
        }
    }
}

/// A government fund or surcharge included in the per-kWh price and shown
/// as its own line (yuan per kWh).
#[derive(Debug, Clone, PartialEq)]
pub struct Fund {
    pub name: String,
    pub rate: Decimal,
}

/// A fixed charge per month (prorated by days for partial months).
#[derive(Debug, Clone, PartialEq)]
pub struct FixedCharge {
    pub name: String,
    pub monthly: Decimal,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PowerFactorRule {
    pub standard: PfStandard,
    /// Count reverse (capacitive) kvarh too: |Q_import| + |Q_export|.
    pub include_export_reactive: bool,
}

/// One effective-dated version of a tariff.
#[derive(Debug, Clone, PartialEq)]
pub struct TariffVersion {
    pub id: String,
    /// First local day the version applies to.
    pub effective_from: NaiveDate,
    /// First local day it no longer applies to (exclusive); `None` = open-ended.
    pub effective_to: Option<NaiveDate>,
    pub rounding: Rounding,
    /// Flat energy price (yuan/kWh) when there is no TOU schedule.
    pub energy_price: Option<Decimal>,
    pub tiers: Option<Tiers>,
    pub tou: Option<Tou>,
    /// Funds are part of the energy price; the energy line shows the price net of them.
    pub funds: Vec<Fund>,
    pub fixed: Vec<FixedCharge>,
    /// Monthly minimum bill (prorated by days); a top-up line makes up the difference.
    pub minimum_charge: Option<Decimal>,
    pub demand: Option<Demand>,
    pub power_factor: Option<PowerFactorRule>,
    pub late_fee: Option<LateFeeRule>,
    pub allow_negative_prices: bool,
}

impl TariffVersion {
    pub fn applies_on(&self, date: NaiveDate) -> bool {
        date >= self.effective_from && self.effective_to.is_none_or(|to| date < to)
    }

    /// Sum of the fund rates included in every kWh price.
    pub fn funds_per_kwh(&self) -> Decimal {
        self.funds.iter().map(|f| f.rate).sum()
    }

    /// Number of TOU periods (0 without TOU).
    pub fn period_count(&self) -> usize {
        self.tou.as_ref().map_or(0, |t| t.periods.len())
    }
}

/// A tariff: an id (the file name), a time zone for its periods, versions.
#[derive(Debug, Clone, PartialEq)]
pub struct Tariff {
    pub id: String,
    pub name: String,
    pub file: PathBuf,
    pub class: CustomerClass,
    pub currency: String,
    /// Name as written (e.g. `Asia/Shanghai`).
    pub timezone: String,
    /// Fixed UTC offset of `timezone` in seconds (China has no DST).
    pub utc_offset_secs: i32,
    /// Sorted by `effective_from`, non-overlapping.
    pub versions: Vec<TariffVersion>,
}

impl Tariff {
    pub fn version_on(&self, date: NaiveDate) -> Result<&TariffVersion, TariffError> {
        self.versions
            .iter()
            .find(|v| v.applies_on(date))
            .ok_or_else(|| TariffError::NoVersion {
                tariff: self.id.clone(),
                date,
            })
    }
}

/// All tariffs of a directory, by id.
#[derive(Debug, Clone, Default)]
pub struct TariffSet {
    pub dir: PathBuf,
    pub tariffs: BTreeMap<String, Tariff>,
}

impl TariffSet {
    pub fn get(&self, id: &str) -> Result<&Tariff, TariffError> {
        self.tariffs
            .get(id)
            .ok_or_else(|| TariffError::UnknownTariff(id.to_string()))
    }

    /// Files that make up the set (tariffs and the calendars they use), for manifests.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self.tariffs.values().map(|t| t.file.clone()).collect();
        for t in self.tariffs.values() {
            for ver in &t.versions {
                if let Some(tou) = &ver.tou {
                    for c in &tou.calendar_ids {
                        v.push(self.dir.join("calendars").join(format!("{c}.toml")));
                    }
                }
            }
        }
        v.sort();
        v.dedup();
        v
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Parses a time zone name or fixed offset into seconds east of UTC.
/// Named zones are the fixed-offset zones billing needs (no DST rules).
pub fn parse_timezone(s: &str) -> Option<i32> {
    let named = match s {
        "Asia/Shanghai"
        | "Asia/Chongqing"
        | "Asia/Harbin"
        | "Asia/Urumqi_Beijing"
        | "Asia/Hong_Kong"
        | "Asia/Macau"
        | "Asia/Taipei"
        | "Asia/Singapore"
        | "PRC" => Some(8 * 3600),
        "UTC" | "Etc/UTC" | "Z" => Some(0),
        _ => None,
    };
    if named.is_some() {
        return named;
    }
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return None,
    };
    let (h, m) = rest.split_once(':')?;
    let (h, m): (i32, i32) = (h.parse().ok()?, m.parse().ok()?);
    if !(0..=14).contains(&h) || !(0..60).contains(&m) {
        return None;
    }
    Some(sign * (h * 3600 + m * 60))
}

impl fmt::Display for CustomerClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
