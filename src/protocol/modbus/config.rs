//! Register maps in TOML: parsing, resolution to [`Register`]s, validation,
//! and error messages that name file, line and field.

use std::fmt;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::regmap::{Area, DataType, Numbering, Order, Register};
use crate::model::Channel;

/// One register as written in TOML (profiles and device overrides).
///
/// Only `name` is required when overriding a profile register of the same
/// name: missing fields keep the profile's values.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterSpec {
    pub name: String,
    /// coil | discrete_input | input | holding
    pub area: Option<String>,
    /// Address as printed in the manual, interpreted with `numbering`.
    pub address: Option<u32>,
    /// zero_based | one_based (defaults to the map's numbering).
    pub numbering: Option<String>,
    /// bool | u16 | i16 | u32 | i32 | u64 | i64 | f32 | f64 | string
    #[serde(rename = "type")]
    pub data_type: Option<String>,
    /// Registers used by a `string`.
    pub words: Option<u16>,
    /// Byte/word order, e.g. ABCD, CDAB, BADC, DCBA (ABCDEFGH... for 64-bit).
    pub order: Option<String>,
    /// Exact multiplier, best written as a string: "0.01".
    pub scale: Option<Decimal>,
    pub offset: Option<Decimal>,
    /// Decimal places kept when converting a float.
    pub precision: Option<u32>,
    pub unit: Option<String>,
    /// meterflow channel name (see docs/data-model.md); absent = read for logs only.
    pub channel: Option<String>,
    pub min: Option<Decimal>,
    pub max: Option<Decimal>,
    /// Drop this register of the profile.
    #[serde(default)]
    pub disabled: bool,
}

/// A register map file (built-in profiles use this format).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapFile {
    pub name: String,
    #[serde(default)]
    pub vendor: String,
    #[serde(default)]
    pub model: String,
    /// Where the register table was taken from.
    #[serde(default)]
    pub source: String,
    /// zero_based | one_based: how `address` values in this file count.
    pub numbering: String,
    #[serde(default, rename = "register")]
    pub registers: Vec<RegisterSpec>,
}

/// One step of a path to a TOML field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// A path like `modbus[0].devices[2].registers[1].order`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldPath(pub Vec<Seg>);

impl FieldPath {
    pub fn key(&self, k: &str) -> FieldPath {
        let mut p = self.clone();
        p.0.push(Seg::Key(k.to_string()));
        p
    }
    pub fn index(&self, i: usize) -> FieldPath {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            match s {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// A semantic mistake at a field, before it is tied to a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: FieldPath,
    pub message: String,
}

/// A configuration error: file, line (when known), field and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": field `{}`", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl ConfigError {
    /// Ties a field error to a file, finding its line in `text`.
    pub fn at(file: &str, text: &str, e: &FieldError) -> ConfigError {
        ConfigError {
            file: file.to_string(),
            line: locate(text, &e.path),
            field: e.path.to_string(),
            message: e.message.clone(),
        }
    }

    /// Converts a serde/toml parse error, keeping its line.
    pub fn from_toml(file: &str, text: &str, e: &toml::de::Error) -> ConfigError {
        let line = e.span().map(|s| line_of(text, s.start));
        let msg = e.message().to_string();
        // serde names the offending key in backticks: "unknown field `x`"
        let field = msg
            .split('`')
            .nth(1)
            .filter(|_| msg.contains("field"))
            .unwrap_or("")
            .to_string();
        ConfigError {
            file: file.to_string(),
            line,
            field,
            message: msg,
        }
    }
}

/// 1-based line of a byte offset.
pub fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Finds the line of a field path in a TOML text (the key's line if the
/// field exists, else the closest enclosing table's).
pub fn locate(text: &str, path: &FieldPath) -> Option<usize> {
    use toml_edit::{Item, Value};
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut item = Item::Table(doc.as_table().clone());
    let mut best: Option<usize> = None;
    for seg in &path.0 {
        let next = match seg {
            Seg::Key(k) => {
                let t = item.as_table_like()?;
                match t.get_key_value(k) {
                    Some((key, it)) => {
                        if let Some(s) = key.span().or_else(|| it.span()) {
                            best = Some(s.start);
                        }
                        it.clone()
                    }
                    None => break,
                }
            }
            Seg::Index(i) => match &item {
                Item::ArrayOfTables(a) => match a.get(*i) {
                    Some(t) => {
                        if let Some(s) = t.span() {
                            best = Some(s.start);
                        }
                        Item::Table(t.clone())
                    }
                    None => break,
                },
                Item::Value(Value::Array(a)) => match a.get(*i) {
                    Some(v) => {
                        if let Some(s) = v.span() {
                            best = Some(s.start);
                        }
                        Item::Value(v.clone())
                    }
                    None => break,
                },
                _ => break,
            },
        };
        item = next;
    }
    best.map(|o| line_of(text, o))
}

fn err(path: &FieldPath, key: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        path: path.key(key),
        message: message.into(),
    }
}

/// Resolves one spec, on top of `base` when overriding a profile register.
pub fn resolve_register(
    spec: &RegisterSpec,
    base: Option<&Register>,
    default_numbering: Option<Numbering>,
    path: &FieldPath,
) -> Result<Register, FieldError> {
    if spec.name.trim().is_empty() {
        return Err(err(path, "name", "register name is empty"));
    }
    let area = match (&spec.area, base) {
        (Some(a), _) => Area::parse(a).ok_or_else(|| {
            err(
                path,
                "area",
                format!("unknown area '{a}' (coil, discrete_input, input, holding)"),
            )
        })?,
        (None, Some(b)) => b.area,
        (None, None) => return Err(err(path, "area", "missing area")),
    };
    let address = match (spec.address, base) {
        (Some(a), _) => {
            let numbering = match &spec.numbering {
                Some(n) => Numbering::parse(n).ok_or_else(|| {
                    err(
                        path,
                        "numbering",
                        format!("unknown numbering '{n}' (zero_based, one_based)"),
                    )
                })?,
                None => default_numbering.ok_or_else(|| {
                    err(
                        path,
                        "numbering",
                        "address numbering not declared (set numbering = \"zero_based\" or \"one_based\")",
                    )
                })?,
            };
            numbering.wire_address(a).ok_or_else(|| {
                err(
                    path,
                    "address",
                    format!("address {a} is outside 0..=65535 after {numbering:?} numbering"),
                )
            })?
        }
        (None, Some(b)) => b.address,
        (None, None) => return Err(err(path, "address", "missing address")),
    };
    let data_type = match (&spec.data_type, base) {
        (Some(t), _) => DataType::parse(t, spec.words).ok_or_else(|| {
            if t == "string" {
                err(
                    path,
                    "words",
                    "a string needs `words` (its length in registers)",
                )
            } else {
                err(
                    path,
                    "type",
                    format!(
                        "unknown type '{t}' (bool, u16, i16, u32, i32, u64, i64, f32, f64, string)"
                    ),
                )
            }
        })?,
        (None, Some(b)) => b.data_type,
        (None, None) => return Err(err(path, "type", "missing type")),
    };
    if area.is_bit() != (data_type == DataType::Bool) {
        return Err(err(
            path,
            "type",
            format!(
                "type {} does not fit the {area} area (bit areas take bool, register areas take numbers)",
                data_type.name()
            ),
        ));
    }
    if matches!(data_type, DataType::String { words } if words == 0 || words > 125) {
        return Err(err(
            path,
            "words",
            "string length must be 1..=125 registers",
        ));
    }
    let order_words = match data_type {
        DataType::String { .. } | DataType::Bool => 1,
        t => t.words(),
    };
    let order = match (&spec.order, base) {
        (Some(o), _) => Order::parse(o, order_words).ok_or_else(|| {
            err(
                path,
                "order",
                format!(
                    "bad order '{o}' for a {}-bit {} (expected one of {})",
                    order_words * 16,
                    data_type.name(),
                    Order::names_for(order_words).join(", ")
                ),
            )
        })?,
        (None, Some(b)) if b.data_type.words() == data_type.words() => b.order,
        _ => Order::BIG,
    };
    let scale = spec.scale.or(base.map(|b| b.scale)).unwrap_or(Decimal::ONE);
    if scale.is_zero() {
        return Err(err(path, "scale", "scale must not be zero"));
    }
    let precision = spec.precision.or(base.map(|b| b.precision)).unwrap_or(3);
    if precision > 10 {
        return Err(err(
            path,
            "precision",
            "precision must be 0..=10 decimal places",
        ));
    }
    let channel = match (&spec.channel, base) {
        (Some(c), _) => Some(
            c.parse::<Channel>()
                .map_err(|e| err(path, "channel", e.to_string()))?,
        ),
        (None, Some(b)) => b.channel,
        (None, None) => None,
    };
    if channel.is_some() && matches!(data_type, DataType::String { .. }) {
        return Err(err(
            path,
            "channel",
            "a string register cannot feed a numeric channel",
        ));
    }
    let unit = spec
        .unit
        .clone()
        .or(base.map(|b| b.unit.clone()))
        .or(channel.map(|c| c.unit().to_string()))
        .unwrap_or_default();
    if let Some(c) = channel {
        if !unit.is_empty() && unit != c.unit() {
            return Err(err(
                path,
                "unit",
                format!(
                    "unit '{unit}' differs from channel {c}'s unit '{}' (use scale to convert)",
                    c.unit()
                ),
            ));
        }
    }
    let min = spec.min.or(base.and_then(|b| b.min));
    let max = spec.max.or(base.and_then(|b| b.max));
    if let (Some(lo), Some(hi)) = (min, max) {
        if lo > hi {
            return Err(err(path, "min", format!("min {lo} is above max {hi}")));
        }
    }
    Ok(Register {
        name: spec.name.clone(),
        area,
        address,
        data_type,
        order,
        scale,
        offset: spec
            .offset
            .or(base.map(|b| b.offset))
            .unwrap_or(Decimal::ZERO),
        precision,
        unit,
        channel,
        min,
        max,
    })
}

/// Rejects duplicate names, overlapping registers and two registers on one channel.
/// `paths[i]` is where register `i` was declared.
pub fn validate(regs: &[Register], paths: &[FieldPath]) -> Result<(), FieldError> {
    // Every register, not just those followed by another (the last one too).
    for (r, p) in regs.iter().zip(paths) {
        if r.end() > 65536 {
            return Err(err(p, "address", "register runs past address 65535"));
        }
    }
    let mut idx: Vec<usize> = (0..regs.len()).collect();
    idx.sort_by_key(|&i| (regs[i].area, regs[i].address));
    for w in idx.windows(2) {
        let (a, b) = (&regs[w[0]], &regs[w[1]]);
        if a.area == b.area && a.end() > u32::from(b.address) {
            return Err(FieldError {
                path: paths[w[1]].key("address"),
                message: format!(
                    "register '{}' ({} {}..{}) overlaps register '{}' ({} {}..{})",
                    b.name,
                    b.area,
                    b.address,
                    b.end(),
                    a.name,
                    a.area,
                    a.address,
                    a.end()
                ),
            });
        }
    }
    for i in 0..regs.len() {
        for j in 0..i {
            if regs[i].name == regs[j].name {
                return Err(err(
                    &paths[i],
                    "name",
                    format!("duplicate register name '{}'", regs[i].name),
                ));
            }
            if regs[i].channel.is_some() && regs[i].channel == regs[j].channel {
                return Err(err(
                    &paths[i],
                    "channel",
                    format!(
                        "channel {} is already fed by register '{}'",
                        regs[i].channel.map(|c| c.as_str()).unwrap_or(""),
                        regs[j].name
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Resolves a whole map file's registers (path prefix `register[i]`).
pub fn resolve_map(map: &MapFile) -> Result<Vec<Register>, FieldError> {
    let numbering = Numbering::parse(&map.numbering).ok_or_else(|| FieldError {
        path: FieldPath::default().key("numbering"),
        message: format!(
            "unknown numbering '{}' (zero_based, one_based)",
            map.numbering
        ),
    })?;
    let root = FieldPath::default().key("register");
    let mut regs = Vec::new();
    let mut paths = Vec::new();
    for (i, spec) in map.registers.iter().enumerate() {
        if spec.disabled {
            continue;
        }
        let p = root.index(i);
        regs.push(resolve_register(spec, None, Some(numbering), &p)?);
        paths.push(p);
    }
    validate(&regs, &paths)?;
    Ok(regs)
}

/// Applies a device's overrides to a base register list (a profile's, or none).
/// Same name replaces (inheriting unset fields), `disabled` removes, new names add.
pub fn apply_overrides(
    base: &[Register],
    overrides: &[RegisterSpec],
    numbering: Option<Numbering>,
    path: &FieldPath,
) -> Result<Vec<Register>, FieldError> {
    let mut regs: Vec<Register> = base.to_vec();
    let mut paths: Vec<FieldPath> = vec![path.clone(); regs.len()];
    for (i, spec) in overrides.iter().enumerate() {
        let p = path.index(i);
        let pos = regs.iter().position(|r| r.name == spec.name);
        if spec.disabled {
            match pos {
                Some(k) => {
                    regs.remove(k);
                    paths.remove(k);
                }
                None => {
                    return Err(err(
                        &p,
                        "name",
                        format!(
                            "cannot disable '{}': no such register in the profile",
                            spec.name
                        ),
                    ))
                }
            }
            continue;
        }
        let r = resolve_register(spec, pos.map(|k| &regs[k]), numbering, &p)?;
        match pos {
            Some(k) => {
                regs[k] = r;
                paths[k] = p;
            }
            None => {
                regs.push(r);
                paths.push(p);
            }
        }
    }
    validate(&regs, &paths)?;
    Ok(regs)
}

/// Parses and resolves a register map TOML text.
pub fn load_map_str(file: &str, text: &str) -> Result<(MapFile, Vec<Register>), ConfigError> {
    let map: MapFile = toml::from_str(text).map_err(|e| ConfigError::from_toml(file, text, &e))?;
    let regs = resolve_map(&map).map_err(|e| ConfigError::at(file, text, &e))?;
    Ok((map, regs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    const GOOD: &str = r#"
name = "t"
numbering = "one_based"

[[register]]
name = "v"
area = "input"
address = 1
type = "f32"
order = "CDAB"
channel = "voltage_a"

[[register]]
name = "e"
area = "input"
address = 3
type = "u32"
scale = "0.01"
channel = "import_active_total"
"#;

    #[test]
    fn a_map_resolves_with_one_based_addresses_shifted() {
        let (_, regs) = load_map_str("t.toml", GOOD).unwrap();
        assert_eq!(regs[0].address, 0);
        assert_eq!(regs[0].order, Order::parse("CDAB", 2).unwrap());
        assert_eq!(regs[1].address, 2);
        assert_eq!(regs[1].scale, dec!(0.01));
        assert_eq!(regs[1].unit, "kWh");
    }

    #[test]
    fn overlapping_registers_are_rejected_with_file_line_and_field() {
        let text = GOOD.replace("address = 3", "address = 2");
        let e = load_map_str("maps/t.toml", &text).unwrap_err();
        assert_eq!(e.file, "maps/t.toml");
        assert_eq!(e.field, "register[1].address");
        assert_eq!(
            e.line,
            Some(line_of(&text, text.find("address = 2").unwrap()))
        );
        assert!(e.message.contains("overlaps"), "{e}");
        assert!(e.to_string().starts_with("maps/t.toml:"), "{e}");
    }

    #[test]
    fn a_bad_order_names_the_valid_ones() {
        let text = GOOD.replace("\"CDAB\"", "\"ABDC\"");
        let e = load_map_str("t.toml", &text).unwrap_err();
        assert_eq!(e.field, "register[0].order");
        assert!(e.message.contains("ABCD, CDAB, BADC, DCBA"), "{e}");
        assert_eq!(e.line, Some(line_of(&text, text.find("order").unwrap())));
    }

    #[test]
    fn a_64_bit_order_on_a_32_bit_value_is_rejected() {
        let text = GOOD.replace("\"CDAB\"", "\"GHEFCDAB\"");
        assert_eq!(
            load_map_str("t.toml", &text).unwrap_err().field,
            "register[0].order"
        );
    }

    #[test]
    fn unknown_keys_are_reported_with_their_line() {
        let text = GOOD.replace("scale = ", "scael = ");
        let e = load_map_str("t.toml", &text).unwrap_err();
        assert_eq!(e.field, "scael");
        assert_eq!(e.line, Some(line_of(&text, text.find("scael").unwrap())));
    }

    #[test]
    fn undeclared_numbering_is_an_error() {
        let spec = RegisterSpec {
            name: "x".into(),
            area: Some("holding".into()),
            address: Some(1),
            data_type: Some("u16".into()),
            ..Default::default()
        };
        let e = apply_overrides(&[], &[spec], None, &FieldPath::default().key("registers"))
            .unwrap_err();
        assert_eq!(e.path.to_string(), "registers[0].numbering");
    }

    #[test]
    fn overrides_inherit_replace_and_disable() {
        let (_, base) = load_map_str("t.toml", GOOD).unwrap();
        let ov = vec![
            RegisterSpec {
                name: "v".into(),
                order: Some("ABCD".into()),
                ..Default::default()
            },
            RegisterSpec {
                name: "e".into(),
                disabled: true,
                ..Default::default()
            },
        ];
        let regs = apply_overrides(&base, &ov, None, &FieldPath::default()).unwrap();
        assert_eq!(regs.len(), 1);
        assert_eq!(regs[0].address, 0);
        assert_eq!(regs[0].order, Order::BIG);
        assert_eq!(regs[0].channel, Some(Channel::VoltageA));
    }

    #[test]
    fn a_unit_that_disagrees_with_the_channel_is_rejected() {
        let text = GOOD.replace("scale = \"0.01\"", "unit = \"Wh\"");
        let e = load_map_str("t.toml", &text).unwrap_err();
        assert_eq!(e.field, "register[1].unit");
    }

    #[test]
    fn a_register_running_past_65535_is_rejected_even_when_it_sorts_last() {
        let spec = |name: &str, address: u32, data_type: &str| RegisterSpec {
            name: name.into(),
            area: Some("holding".into()),
            address: Some(address),
            data_type: Some(data_type.into()),
            numbering: Some("zero_based".into()),
            ..Default::default()
        };
        let path = FieldPath::default().key("registers");
        for specs in [
            vec![spec("e", 65535, "u32")],
            vec![spec("v", 0, "u16"), spec("e", 65535, "u32")],
        ] {
            let e = apply_overrides(&[], &specs, None, &path).unwrap_err();
            let last = specs.len() - 1;
            assert_eq!(e.path.to_string(), format!("registers[{last}].address"));
            assert!(e.message.contains("past address 65535"), "{}", e.message);
        }
        let fits = [spec("e", 65534, "u32")];
        assert!(apply_overrides(&[], &fits, None, &path).is_ok());
    }

    #[test]
    fn bool_type_only_in_bit_areas() {
        let text = GOOD.replace("type = \"u32\"", "type = \"bool\"");
        assert_eq!(
            load_map_str("t.toml", &text).unwrap_err().field,
            "register[1].type"
        );
    }
}
