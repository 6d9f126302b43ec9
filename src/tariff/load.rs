//! TOML loading and validation. Every error names the file, the line and the
//! field (a dotted path such as `version[2].tou.season[0].weekday[3]`).

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use rust_decimal::Decimal;
use serde::Deserialize;
use toml::Spanned;

use super::calendar::Calendar;
use super::demand::{Demand, DemandBasis};
use super::late_fee::LateFeeRule;
use super::power_factor::PfStandard;
use super::rounding::{Rounding, RoundingMode};
use super::tiered::{Accumulation, Tiers};
use super::tou::{self, DaySchedule, DayType, Period, Season, Tou, MAX_PERIODS};
use super::{
    parse_timezone, CustomerClass, FixedCharge, Fund, PowerFactorRule, Tariff, TariffError,
    TariffSet, TariffVersion,
};

/// An exact decimal written as a TOML string ("0.4883"), integer or float.
/// Floats are taken by their shortest round-trip text, which is the literal
/// as written for up to 15 significant digits: no binary rounding reaches a price.
#[derive(Debug, Clone, Copy)]
struct Dec(Decimal);

impl<'de> Deserialize<'de> for Dec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Dec;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a decimal number or a string holding one")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Dec, E> {
                s.trim()
                    .parse::<Decimal>()
                    .map(Dec)
                    .map_err(|_| E::custom(format!("'{s}' is not a decimal number")))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Dec, E> {
                Ok(Dec(Decimal::from(n)))
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Dec, E> {
                Ok(Dec(Decimal::from(n)))
            }
            fn visit_f64<E: serde::de::Error>(self, x: f64) -> Result<Dec, E> {
                let text = format!("{x}");
                let digits = text.chars().filter(|c| c.is_ascii_digit()).count();
                if !x.is_finite() || digits > 15 {
                    return Err(E::custom(format!(
                        "{text}: write numbers with more than 15 digits as strings"
                    )));
                }
                self.visit_str(&text)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTariff {
    id: Spanned<String>,
    name: Option<String>,
    class: Option<Spanned<String>>,
    currency: Option<String>,
    timezone: Option<Spanned<String>>,
    #[serde(default, rename = "version")]
    versions: Vec<Spanned<RawVersion>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVersion {
    id: Spanned<String>,
    effective_from: Spanned<String>,
    effective_to: Option<Spanned<String>>,
    rounding: Option<Spanned<RawRounding>>,
    energy_price: Option<Spanned<Dec>>,
    minimum_charge: Option<Spanned<Dec>>,
    #[serde(default)]
    allow_negative_prices: bool,
    tiers: Option<Spanned<RawTiers>>,
    tou: Option<Spanned<RawTou>>,
    demand: Option<Spanned<RawDemand>>,
    power_factor: Option<Spanned<RawPf>>,
    late_fee: Option<Spanned<RawLateFee>>,
    #[serde(default, rename = "fund")]
    funds: Vec<Spanned<RawNamed>>,
    #[serde(default)]
    fixed: Vec<Spanned<RawNamed>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRounding {
    mode: Option<Spanned<String>>,
    unit: Option<Spanned<Dec>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTiers {
    accumulation: Spanned<String>,
    year_start_month: Option<Spanned<u32>>,
    limits: Spanned<Vec<Dec>>,
    surcharges: Spanned<Vec<Dec>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTou {
    #[serde(default)]
    calendars: Vec<Spanned<String>>,
    registers: Option<Spanned<BTreeMap<String, String>>>,
    #[serde(rename = "period")]
    periods: Vec<Spanned<RawPeriod>>,
    #[serde(rename = "season")]
    seasons: Vec<Spanned<RawSeason>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeriod {
    name: Spanned<String>,
    price: Spanned<Dec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSeason {
    name: Spanned<String>,
    months: Spanned<Vec<u32>>,
    weekday: Option<Vec<Spanned<String>>>,
    weekend: Option<Vec<Spanned<String>>>,
    holiday: Option<Vec<Spanned<String>>>,
    critical_peak: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDemand {
    basis: Spanned<String>,
    capacity_price: Option<Spanned<Dec>>,
    demand_price: Option<Spanned<Dec>>,
    high_use_kwh_per_kva: Option<Spanned<Dec>>,
    high_use_factor: Option<Spanned<Dec>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPf {
    standard: Spanned<Dec>,
    #[serde(default)]
    include_export_reactive: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLateFee {
    residential_daily: Option<Dec>,
    current_year_daily: Option<Dec>,
    earlier_years_daily: Option<Dec>,
    minimum: Option<Dec>,
    due_days: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNamed {
    name: Spanned<String>,
    /// Funds: yuan per kWh.
    rate: Option<Spanned<Dec>>,
    /// Fixed charges: yuan per month.
    monthly: Option<Spanned<Dec>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCalendar {
    id: Spanned<String>,
    name: Option<String>,
    years: Spanned<Vec<i32>>,
    #[serde(default)]
    holidays: Vec<Spanned<String>>,
    #[serde(default)]
    workdays: Vec<Spanned<String>>,
    #[serde(default)]
    critical_peak_days: Vec<Spanned<String>>,
}

/// File name and text, for turning spans into line numbers.
struct Src<'a> {
    file: String,
    text: &'a str,
}

impl Src<'_> {
    fn line(&self, span: Range<usize>) -> usize {
        let at = span.start.min(self.text.len());
        self.text[..at].bytes().filter(|b| *b == b'\n').count() + 1
    }

    fn err(
        &self,
        span: Range<usize>,
        field: impl Into<String>,
        msg: impl Into<String>,
    ) -> TariffError {
        TariffError::Invalid {
            file: self.file.clone(),
            line: self.line(span),
            field: field.into(),
            message: msg.into(),
        }
    }

    /// A syntax or type error from the toml crate: the field is the key written
    /// on the offending line, when there is one.
    fn toml_err(&self, e: toml::de::Error) -> TariffError {
        let span = e.span().unwrap_or(0..0);
        let line = self.line(span);
        let text = self.text.lines().nth(line - 1).unwrap_or("");
        let field = text
            .split_once('=')
            .map(|(k, _)| k.trim().to_string())
            .filter(|k| !k.is_empty() && !k.starts_with('['))
            .unwrap_or_else(|| text.trim().trim_matches(['[', ']']).to_string());
        TariffError::Invalid {
            file: self.file.clone(),
            line,
            field: if field.is_empty() { "-".into() } else { field },
            message: e.message().trim().to_string(),
        }
    }

    fn date(&self, s: &Spanned<String>, field: &str) -> Result<NaiveDate, TariffError> {
        NaiveDate::parse_from_str(s.get_ref(), "%Y-%m-%d").map_err(|_| {
            self.err(
                s.span(),
                field,
                format!("'{}' is not a date YYYY-MM-DD", s.get_ref()),
            )
        })
    }
}

fn read(path: &Path) -> Result<String, TariffError> {
    std::fs::read_to_string(path).map_err(|e| TariffError::Io {
        file: path.display().to_string(),
        source: e,
    })
}

/// Loads a calendar file.
pub fn load_calendar(path: &Path) -> Result<Calendar, TariffError> {
    let text = read(path)?;
    let src = Src {
        file: path.display().to_string(),
        text: &text,
    };
    let raw: RawCalendar = toml::from_str(&text).map_err(|e| src.toml_err(e))?;
    let _ = raw.name;
    let mut c = Calendar {
        ids: vec![raw.id.get_ref().clone()],
        ..Calendar::default()
    };
    if raw.years.get_ref().is_empty() {
        return Err(src.err(
            raw.years.span(),
            "years",
            "list the years this calendar is complete for",
        ));
    }
    c.years.extend(raw.years.get_ref().iter().copied());
    for (list, name, set) in [
        (&raw.holidays, "holidays", &mut c.holidays),
        (&raw.workdays, "workdays", &mut c.workdays),
        (
            &raw.critical_peak_days,
            "critical_peak_days",
            &mut c.critical_peak_days,
        ),
    ] {
        for (i, d) in list.iter().enumerate() {
            set.insert(src.date(d, &format!("{name}[{i}]"))?);
        }
    }
    Ok(c)
}

/// Loads and validates one tariff file. Calendars named by a TOU schedule are
/// read from `calendar_dir/<id>.toml`.
pub fn load_file(path: &Path, calendar_dir: &Path) -> Result<Tariff, TariffError> {
    let text = read(path)?;
    load_str(&text, path, calendar_dir)
}

/// Like [`load_file`] from text already read; `path` is for messages and the file stem check.
pub fn load_str(text: &str, path: &Path, calendar_dir: &Path) -> Result<Tariff, TariffError> {
    let src = Src {
        file: path.display().to_string(),
        text,
    };
    let raw: RawTariff = toml::from_str(text).map_err(|e| src.toml_err(e))?;
    let id = raw.id.get_ref().trim().to_string();
    if id.is_empty()
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(src.err(raw.id.span(), "id", "use letters, digits, '-' and '_'"));
    }
    if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
        if path.extension().is_some() && stem != id {
            return Err(src.err(
                raw.id.span(),
                "id",
                format!("id '{id}' must equal the file name '{stem}'"),
            ));
        }
    }
    let class = match &raw.class {
        None => CustomerClass::Residential,
        Some(c) => CustomerClass::parse(c.get_ref()).ok_or_else(|| {
            src.err(
                c.span(),
                "class",
                "one of residential, commercial, industrial, agricultural",
            )
        })?,
    };
    let (timezone, utc_offset_secs) = match &raw.timezone {
        None => ("Asia/Shanghai".to_string(), 8 * 3600),
        Some(t) => {
            let off = parse_timezone(t.get_ref()).ok_or_else(|| {
                src.err(
                    t.span(),
                    "timezone",
                    "a fixed offset like +08:00 or Asia/Shanghai, UTC",
                )
            })?;
            (t.get_ref().clone(), off)
        }
    };
    if raw.versions.is_empty() {
        return Err(src.err(0..0, "version", "a tariff needs at least one [[version]]"));
    }
    let mut versions = Vec::new();
    let mut calendars: BTreeMap<String, Calendar> = BTreeMap::new();
    for (i, rv) in raw.versions.iter().enumerate() {
        versions.push(version(
            &src,
            &format!("version[{i}]"),
            rv,
            calendar_dir,
            &mut calendars,
        )?);
    }
    // Sorted, non-overlapping.
    let mut order: Vec<usize> = (0..versions.len()).collect();
    order.sort_by_key(|&i| versions[i].effective_from);
    for w in order.windows(2) {
        let (a, b) = (&versions[w[0]], &versions[w[1]]);
        let overlaps = a.effective_to.is_none_or(|to| to > b.effective_from);
        if overlaps {
            return Err(src.err(
                raw.versions[w[1]].get_ref().effective_from.span(),
                format!("version[{}].effective_from", w[1]),
                format!(
                    "version '{}' from {} overlaps version '{}' ({} to {})",
                    b.id,
                    b.effective_from,
                    a.id,
                    a.effective_from,
                    a.effective_to
                        .map_or("open end".to_string(), |d| d.to_string())
                ),
            ));
        }
        if a.id == b.id {
            return Err(src.err(
                raw.versions[w[1]].get_ref().id.span(),
                "id",
                "version ids must be unique",
            ));
        }
    }
    let mut sorted = Vec::with_capacity(versions.len());
    let mut by_index: Vec<Option<TariffVersion>> = versions.into_iter().map(Some).collect();
    for i in order {
        sorted.push(by_index[i].take().expect("each index once"));
    }
    Ok(Tariff {
        id,
        name: raw.name.unwrap_or_default(),
        file: path.to_path_buf(),
        class,
        currency: raw.currency.unwrap_or_else(|| "CNY".into()),
        timezone,
        utc_offset_secs,
        versions: sorted,
    })
}

fn dec_list(v: &Spanned<Vec<Dec>>) -> Vec<Decimal> {
    v.get_ref().iter().map(|d| d.0).collect()
}

fn version(
    src: &Src,
    at: &str,
    sv: &Spanned<RawVersion>,
    calendar_dir: &Path,
    calendars: &mut BTreeMap<String, Calendar>,
) -> Result<TariffVersion, TariffError> {
    let rv = sv.get_ref();
    let f = |name: &str| format!("{at}.{name}");
    let effective_from = src.date(&rv.effective_from, &f("effective_from"))?;
    let effective_to = match &rv.effective_to {
        Some(d) => {
            let to = src.date(d, &f("effective_to"))?;
            if to <= effective_from {
                return Err(src.err(d.span(), f("effective_to"), "must be after effective_from"));
            }
            Some(to)
        }
        None => None,
    };
    let rounding = match &rv.rounding {
        None => Rounding::default(),
        Some(r) => {
            let r = r.get_ref();
            let mode = match &r.mode {
                None => RoundingMode::default(),
                Some(m) => m
                    .get_ref()
                    .parse()
                    .map_err(|e: String| src.err(m.span(), f("rounding.mode"), e))?,
            };
            match &r.unit {
                None => Rounding { mode, decimals: 2 },
                Some(u) => Rounding::new(mode, u.get_ref().0)
                    .map_err(|e| src.err(u.span(), f("rounding.unit"), e))?,
            }
        }
    };
    let neg_ok = rv.allow_negative_prices;
    let check_price = |d: &Spanned<Dec>, field: String| -> Result<Decimal, TariffError> {
        if d.get_ref().0 < Decimal::ZERO && !neg_ok {
            return Err(src.err(
                d.span(),
                field,
                "negative price (set allow_negative_prices = true if intended)",
            ));
        }
        Ok(d.get_ref().0)
    };
    let mut funds = Vec::new();
    for (i, n) in rv.funds.iter().enumerate() {
        let n = n.get_ref();
        let rate = n.rate.as_ref().ok_or_else(|| {
            src.err(
                n.name.span(),
                format!("{at}.fund[{i}].rate"),
                "missing rate (yuan/kWh)",
            )
        })?;
        if n.monthly.is_some() {
            return Err(src.err(
                n.name.span(),
                format!("{at}.fund[{i}].monthly"),
                "funds have a rate per kWh, not a monthly amount",
            ));
        }
        funds.push(Fund {
            name: n.name.get_ref().clone(),
            rate: check_price(rate, format!("{at}.fund[{i}].rate"))?,
        });
    }
    let funds_total: Decimal = funds.iter().map(|x| x.rate).sum();
    let mut fixed = Vec::new();
    for (i, n) in rv.fixed.iter().enumerate() {
        let n = n.get_ref();
        let m = n.monthly.as_ref().ok_or_else(|| {
            src.err(
                n.name.span(),
                format!("{at}.fixed[{i}].monthly"),
                "missing monthly amount",
            )
        })?;
        fixed.push(FixedCharge {
            name: n.name.get_ref().clone(),
            monthly: check_price(m, format!("{at}.fixed[{i}].monthly"))?,
        });
    }
    let energy_price = match &rv.energy_price {
        Some(p) => {
            let v = check_price(p, f("energy_price"))?;
            if v - funds_total < Decimal::ZERO && !neg_ok {
                return Err(src.err(
                    p.span(),
                    f("energy_price"),
                    format!("price {v} is below the funds it includes ({funds_total})"),
                ));
            }
            Some(v)
        }
        None => None,
    };
    let tiers = match &rv.tiers {
        None => None,
        Some(t) => Some(tiers(src, &f("tiers"), t)?),
    };
    let tou = match &rv.tou {
        None => None,
        Some(t) => Some(tou_schedule(
            src,
            &f("tou"),
            t,
            calendar_dir,
            calendars,
            neg_ok,
            funds_total,
        )?),
    };
    if tou.is_none() && energy_price.is_none() && rv.demand.is_none() {
        return Err(src.err(
            sv.span(),
            f("energy_price"),
            "set energy_price or a [version.tou] schedule",
        ));
    }
    if tou.is_some() && energy_price.is_some() {
        return Err(src.err(
            rv.energy_price.as_ref().unwrap().span(),
            f("energy_price"),
            "with a TOU schedule prices belong to the periods; remove energy_price",
        ));
    }
    let demand = match &rv.demand {
        None => None,
        Some(d) => {
            let r = d.get_ref();
            let basis: DemandBasis = r
                .basis
                .get_ref()
                .parse()
                .map_err(|e: String| src.err(r.basis.span(), f("demand.basis"), e))?;
            let get = |x: &Option<Spanned<Dec>>,
                       name: &str,
                       need: bool|
             -> Result<Decimal, TariffError> {
                match x {
                    Some(v) => check_price(v, f(&format!("demand.{name}"))),
                    None if need => Err(src.err(
                        d.span(),
                        f(&format!("demand.{name}")),
                        format!("basis '{basis}' needs {name}"),
                    )),
                    None => Ok(Decimal::ZERO),
                }
            };
            let capacity_price = get(
                &r.capacity_price,
                "capacity_price",
                basis == DemandBasis::Capacity,
            )?;
            let demand_price = get(
                &r.demand_price,
                "demand_price",
                basis == DemandBasis::MaxDemand,
            )?;
            let high_use_discount = match (&r.high_use_kwh_per_kva, &r.high_use_factor) {
                (None, None) => None,
                (Some(a), Some(b)) => Some((a.get_ref().0, b.get_ref().0)),
                _ => {
                    return Err(src.err(
                        d.span(),
                        f("demand.high_use_factor"),
                        "set both high_use_kwh_per_kva and high_use_factor",
                    ))
                }
            };
            Some(Demand {
                basis,
                capacity_price,
                demand_price,
                high_use_discount,
            })
        }
    };
    let power_factor = match &rv.power_factor {
        None => None,
        Some(p) => {
            let r = p.get_ref();
            let s = r.standard.get_ref().0;
            let standard: PfStandard = format!("{:.2}", s)
                .parse()
                .map_err(|e: String| src.err(r.standard.span(), f("power_factor.standard"), e))?;
            Some(PowerFactorRule {
                standard,
                include_export_reactive: r.include_export_reactive,
            })
        }
    };
    let late_fee = rv.late_fee.as_ref().map(|l| {
        let l = l.get_ref();
        let d = LateFeeRule::default();
        LateFeeRule {
            residential_daily: l.residential_daily.map_or(d.residential_daily, |x| x.0),
            current_year_daily: l.current_year_daily.map_or(d.current_year_daily, |x| x.0),
            earlier_years_daily: l.earlier_years_daily.map_or(d.earlier_years_daily, |x| x.0),
            minimum: l.minimum.map_or(d.minimum, |x| x.0),
            due_days: l.due_days.unwrap_or(d.due_days),
        }
    });
    let minimum_charge = match &rv.minimum_charge {
        Some(m) => Some(check_price(m, f("minimum_charge"))?),
        None => None,
    };
    Ok(TariffVersion {
        id: rv.id.get_ref().clone(),
        effective_from,
        effective_to,
        rounding,
        energy_price,
        tiers,
        tou,
        funds,
        fixed,
        minimum_charge,
        demand,
        power_factor,
        late_fee,
        allow_negative_prices: neg_ok,
    })
}

fn tiers(src: &Src, at: &str, t: &Spanned<RawTiers>) -> Result<Tiers, TariffError> {
    let r = t.get_ref();
    let f = |name: &str| format!("{at}.{name}");
    let accumulation = match r.accumulation.get_ref().as_str() {
        "monthly" => {
            if let Some(m) = &r.year_start_month {
                return Err(src.err(
                    m.span(),
                    f("year_start_month"),
                    "only for accumulation = \"annual\"",
                ));
            }
            Accumulation::Monthly
        }
        "annual" => {
            let m = r.year_start_month.as_ref().map_or(1, |m| *m.get_ref());
            if !(1..=12).contains(&m) {
                return Err(src.err(
                    r.year_start_month.as_ref().unwrap().span(),
                    f("year_start_month"),
                    "a month 1..12",
                ));
            }
            Accumulation::Annual { start_month: m }
        }
        _ => {
            return Err(src.err(
                r.accumulation.span(),
                f("accumulation"),
                "\"monthly\" or \"annual\"",
            ))
        }
    };
    let limits = dec_list(&r.limits);
    if limits.is_empty() {
        return Err(src.err(r.limits.span(), f("limits"), "at least one limit"));
    }
    let mut prev = Decimal::ZERO;
    for l in &limits {
        if *l <= prev {
            return Err(src.err(
                r.limits.span(),
                f("limits"),
                "limits must be positive and strictly ascending",
            ));
        }
        prev = *l;
    }
    let mut surcharges = dec_list(&r.surcharges);
    if surcharges.len() == limits.len() {
        surcharges.insert(0, Decimal::ZERO);
    }
    if surcharges.len() != limits.len() + 1 {
        return Err(src.err(
            r.surcharges.span(),
            f("surcharges"),
            format!(
                "{} limits make {} tiers: give {} surcharges (tiers 2..) or {} (all tiers)",
                limits.len(),
                limits.len() + 1,
                limits.len(),
                limits.len() + 1
            ),
        ));
    }
    Ok(Tiers {
        accumulation,
        limits,
        surcharges,
    })
}

#[allow(clippy::too_many_arguments)]
fn tou_schedule(
    src: &Src,
    at: &str,
    t: &Spanned<RawTou>,
    calendar_dir: &Path,
    calendars: &mut BTreeMap<String, Calendar>,
    neg_ok: bool,
    funds_total: Decimal,
) -> Result<Tou, TariffError> {
    let r = t.get_ref();
    let f = |name: &str| format!("{at}.{name}");
    if r.periods.is_empty() || r.periods.len() > MAX_PERIODS {
        return Err(src.err(t.span(), f("period"), format!("1 to {MAX_PERIODS} periods")));
    }
    let mut periods: Vec<Period> = Vec::new();
    for (i, p) in r.periods.iter().enumerate() {
        let p = p.get_ref();
        let name = p.name.get_ref().clone();
        if periods.iter().any(|x| x.name == name) {
            return Err(src.err(
                p.name.span(),
                format!("{at}.period[{i}].name"),
                format!("period '{name}' defined twice"),
            ));
        }
        let price = p.price.get_ref().0;
        if (price < Decimal::ZERO || price - funds_total < Decimal::ZERO) && !neg_ok {
            return Err(src.err(p.price.span(), format!("{at}.period[{i}].price"), "negative price, or below the funds it includes (set allow_negative_prices = true if intended)"));
        }
        periods.push(Period { name, price });
    }
    let index = |name: &str| periods.iter().position(|p| p.name == name).map(|i| i as u8);
    let mut registers = [None; 4];
    if let Some(m) = &r.registers {
        for (k, v) in m.get_ref() {
            let slot = match k.as_str() {
                "t1" => 0,
                "t2" => 1,
                "t3" => 2,
                "t4" => 3,
                _ => {
                    return Err(src.err(
                        m.span(),
                        f(&format!("registers.{k}")),
                        "keys are t1, t2, t3, t4",
                    ))
                }
            };
            registers[slot] = Some(index(v).ok_or_else(|| {
                src.err(
                    m.span(),
                    f(&format!("registers.{k}")),
                    format!("unknown period '{v}'"),
                )
            })?);
        }
    }
    let mut seasons = Vec::new();
    let mut month_owner = [None::<usize>; 13];
    for (si, s) in r.seasons.iter().enumerate() {
        let s = s.get_ref();
        let sat = format!("{at}.season[{si}]");
        for m in s.months.get_ref() {
            if !(1..=12).contains(m) {
                return Err(src.err(
                    s.months.span(),
                    format!("{sat}.months"),
                    format!("{m} is not a month"),
                ));
            }
            if let Some(o) = month_owner[*m as usize] {
                return Err(src.err(
                    s.months.span(),
                    format!("{sat}.months"),
                    format!("month {m} is already in season[{o}]"),
                ));
            }
            month_owner[*m as usize] = Some(si);
        }
        let mut days: [Option<DaySchedule>; 4] = [None, None, None, None];
        for (dt, list) in [
            (DayType::Weekday, &s.weekday),
            (DayType::Weekend, &s.weekend),
            (DayType::Holiday, &s.holiday),
            (DayType::CriticalPeak, &s.critical_peak),
        ] {
            let Some(list) = list else { continue };
            let field = format!("{sat}.{}", dt.as_str());
            let mut ranges = Vec::new();
            for (i, item) in list.iter().enumerate() {
                let (start, end, name) = tou::parse_range(item.get_ref())
                    .map_err(|e| src.err(item.span(), format!("{field}[{i}]"), e))?;
                let period = index(name).ok_or_else(|| {
                    src.err(
                        item.span(),
                        format!("{field}[{i}]"),
                        format!("unknown period '{name}'"),
                    )
                })?;
                ranges.push((tou::Range { start, end, period }, item.span()));
            }
            ranges.sort_by_key(|(r, _)| r.start);
            let plain: Vec<tou::Range> = ranges.iter().map(|(r, _)| *r).collect();
            if let Err(e) = DaySchedule::check_cover(&plain) {
                let span = list.first().map_or(s.name.span(), |x| x.span());
                return Err(src.err(span, field, e));
            }
            days[dt as usize] = Some(DaySchedule { ranges: plain });
        }
        if days[DayType::Weekday as usize].is_none() {
            return Err(src.err(
                s.name.span(),
                format!("{sat}.weekday"),
                "every season needs a weekday schedule",
            ));
        }
        seasons.push(Season {
            name: s.name.get_ref().clone(),
            months: s.months.get_ref().clone(),
            days,
        });
    }
    if let Some(m) = (1..=12).find(|m| month_owner[*m].is_none()) {
        return Err(src.err(t.span(), f("season"), format!("no season covers month {m}")));
    }
    let mut calendar = Calendar::default();
    let mut calendar_ids = Vec::new();
    for (i, c) in r.calendars.iter().enumerate() {
        let id = c.get_ref().clone();
        if !calendars.contains_key(&id) {
            let path = calendar_dir.join(format!("{id}.toml"));
            if !path.exists() {
                return Err(src.err(
                    c.span(),
                    f(&format!("calendars[{i}]")),
                    format!("calendar file {} not found", path.display()),
                ));
            }
            calendars.insert(id.clone(), load_calendar(&path)?);
        }
        calendar.merge(&calendars[&id]);
        calendar_ids.push(id);
    }
    if calendar_ids.is_empty() {
        return Err(src.err(
            t.span(),
            f("calendars"),
            "name at least one calendar file (holidays decide day types)",
        ));
    }
    Ok(Tou {
        periods,
        seasons,
        calendar_ids,
        calendar,
        registers,
    })
}

/// Loads every `*.toml` in `dir` (not recursing; calendars live in
/// `dir/calendars/`). Ids must be unique.
pub fn load_dir(dir: &Path) -> Result<TariffSet, TariffError> {
    let io = |e| TariffError::Io {
        file: dir.display().to_string(),
        source: e,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let cal = dir.join("calendars");
    let mut set = TariffSet {
        dir: dir.to_path_buf(),
        tariffs: BTreeMap::new(),
    };
    for p in files {
        let t = load_file(&p, &cal)?;
        if set.tariffs.contains_key(&t.id) {
            return Err(TariffError::Invalid {
                file: p.display().to_string(),
                line: 1,
                field: "id".into(),
                message: format!("tariff id '{}' is defined twice", t.id),
            });
        }
        set.tariffs.insert(t.id.clone(), t);
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Tariff, TariffError> {
        load_str(text, Path::new("t.toml"), Path::new("/nonexistent"))
    }

    fn err(text: &str) -> String {
        load(text).unwrap_err().to_string()
    }

    const HEAD: &str = "id = \"t\"\n";

    #[test]
    fn overlapping_versions_are_refused_with_file_line_and_field() {
        let e = err(&format!(
            "{HEAD}[[version]]\nid = \"a\"\neffective_from = \"2026-01-01\"\nenergy_price = 0.5\n\
             [[version]]\nid = \"b\"\neffective_from = \"2026-06-01\"\nenergy_price = \"0.6\"\n"
        ));
        assert!(e.starts_with("t.toml:8: version[1].effective_from:"), "{e}");
        assert!(e.contains("overlaps"), "{e}");
    }

    #[test]
    fn negative_prices_and_bad_tiers_are_refused() {
        let e = err(&format!(
            "{HEAD}[[version]]\nid = \"a\"\neffective_from = \"2026-01-01\"\nenergy_price = -0.5\n"
        ));
        assert!(
            e.contains("t.toml:5: version[0].energy_price: negative price"),
            "{e}"
        );
        let e = err(&format!(
            "{HEAD}[[version]]\nid = \"a\"\neffective_from = \"2026-01-01\"\nenergy_price = 0.5\n\
             [version.tiers]\naccumulation = \"monthly\"\nlimits = [400, 240]\nsurcharges = [\"0.05\", \"0.3\"]\n"
        ));
        assert!(e.contains("t.toml:8: version[0].tiers.limits"), "{e}");
    }

    #[test]
    fn tou_gaps_unknown_periods_and_missing_calendars_are_refused() {
        let tou = |ranges: &str, cal: &str| {
            format!(
                "{HEAD}[[version]]\nid = \"a\"\neffective_from = \"2026-01-01\"\n[version.tou]\ncalendars = [{cal}]\n\
                 [[version.tou.period]]\nname = \"peak\"\nprice = 1\n[[version.tou.period]]\nname = \"valley\"\nprice = \"0.3\"\n\
                 [[version.tou.season]]\nname = \"all\"\nmonths = [1,2,3,4,5,6,7,8,9,10,11,12]\nweekday = [{ranges}]\n"
            )
        };
        let e = err(&tou(
            "\"00:00-08:00 valley\", \"09:00-24:00 peak\"",
            "\"cn\"",
        ));
        assert!(e.contains("weekday: gap from 08:00 to 09:00"), "{e}");
        let e = err(&tou(
            "\"00:00-08:00 valley\", \"08:00-24:00 shoulder\"",
            "\"cn\"",
        ));
        assert!(e.contains("weekday[1]: unknown period 'shoulder'"), "{e}");
        let e = err(&tou(
            "\"00:00-08:00 valley\", \"07:00-24:00 peak\"",
            "\"cn\"",
        ));
        assert!(e.contains("overlap"), "{e}");
        let e = err(&tou(
            "\"00:00-08:00 valley\", \"08:00-24:00 peak\"",
            "\"cn\"",
        ));
        assert!(
            e.contains("calendars[0]: calendar file /nonexistent/cn.toml not found"),
            "{e}"
        );
    }

    #[test]
    fn floats_are_read_as_their_decimal_text() {
        let t = load(&format!("{HEAD}[[version]]\nid = \"a\"\neffective_from = \"2026-01-01\"\nenergy_price = 0.4883\n")).unwrap();
        assert_eq!(t.versions[0].energy_price.unwrap().to_string(), "0.4883");
    }
}
