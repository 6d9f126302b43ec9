//! Data identifiers (DI): what to ask a meter for, how its answer is encoded,
//! and which meterflow [`Channel`] it feeds.
//!
//! 2007 DIs are 4 bytes written `DI3 DI2 DI1 DI0` (`00010000`) and sent DI0
//! first; 1997 DIs are 2 bytes (`9010`), also sent low byte first.

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;

use super::bcd::{self, BcdError};
use super::frame::Address;
use crate::model::Channel;

/// The edition of DL/T 645 a meter speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Edition {
    V1997,
    #[default]
    V2007,
}

impl Edition {
    pub fn as_str(self) -> &'static str {
        match self {
            Edition::V1997 => "1997",
            Edition::V2007 => "2007",
        }
    }
}

impl fmt::Display for Edition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Edition {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "2007" => Ok(Edition::V2007),
            "1997" => Ok(Edition::V1997),
            other => Err(format!(
                "unknown DL/T 645 edition '{other}' (expected \"2007\" or \"1997\")"
            )),
        }
    }
}

impl serde::Serialize for Edition {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Edition {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Accept both "2007" and 2007.
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Edition;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"2007\" or \"1997\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Edition, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Edition, E> {
                v.to_string().parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A data identifier of either edition.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Di {
    pub edition: Edition,
    /// `DI3 DI2 DI1 DI0` as a number (2007) or `DI1 DI0` (1997).
    pub code: u32,
}

impl Di {
    pub const fn v2007(code: u32) -> Di {
        Di {
            edition: Edition::V2007,
            code,
        }
    }
    pub const fn v1997(code: u16) -> Di {
        Di {
            edition: Edition::V1997,
            code: code as u32,
        }
    }

    /// Bytes the DI takes in a frame.
    pub fn wire_len(self) -> usize {
        match self.edition {
            Edition::V2007 => 4,
            Edition::V1997 => 2,
        }
    }

    /// Appends the DI as sent (DI0 first), without the 0x33 offset.
    pub fn write(self, out: &mut Vec<u8>) {
        let b = self.code.to_le_bytes();
        out.extend_from_slice(&b[..self.wire_len()]);
    }

    /// Reads a DI of `edition` from de-offset bytes, DI0 first.
    pub fn read(edition: Edition, bytes: &[u8]) -> Option<Di> {
        let n = match edition {
            Edition::V2007 => 4,
            Edition::V1997 => 2,
        };
        let b = bytes.get(..n)?;
        let mut code = 0u32;
        for (i, &x) in b.iter().enumerate() {
            code |= (x as u32) << (8 * i);
        }
        Some(Di { edition, code })
    }

    /// Block reads carry FF (2007) or a trailing F nibble (1997, e.g. `901F`).
    pub fn is_block(self) -> bool {
        match self.edition {
            Edition::V2007 => self.code.to_le_bytes().contains(&0xFF),
            Edition::V1997 => self.code & 0x0F == 0x0F,
        }
    }

    pub fn info(self) -> Option<&'static DiInfo> {
        lookup(self)
    }
}

impl fmt::Display for Di {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.edition {
            Edition::V2007 => write!(f, "{:08X}", self.code),
            Edition::V1997 => write!(f, "{:04X}", self.code),
        }
    }
}

impl fmt::Debug for Di {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Di({self}/{})", self.edition)
    }
}

/// A DI string that is not 8 (2007) or 4 (1997) hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid data identifier '{0}': expected 8 hex digits DI3..DI0 (2007, e.g. 00010000) or 4 (1997, e.g. 9010)")]
pub struct DiError(pub String);

impl FromStr for Di {
    type Err = DiError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t: String = s
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '-' && *c != '_')
            .collect();
        let t = t.strip_prefix("0x").unwrap_or(&t);
        let code = u32::from_str_radix(t, 16).map_err(|_| DiError(s.to_string()))?;
        match t.len() {
            8 => Ok(Di::v2007(code)),
            4 => Ok(Di::v1997(code as u16)),
            _ => Err(DiError(s.to_string())),
        }
    }
}

impl serde::Serialize for Di {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for Di {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A wall-clock time as a meter reports it (its own local time, no zone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MeterTime {
    pub year: u16,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
}

impl MeterTime {
    pub fn to_naive(self) -> Option<chrono::NaiveDateTime> {
        chrono::NaiveDate::from_ymd_opt(self.year as i32, self.month as u32, self.day as u32)?
            .and_hms_opt(self.hour as u32, self.minute as u32, self.second as u32)
    }

    pub fn from_naive(t: chrono::NaiveDateTime) -> MeterTime {
        use chrono::{Datelike, Timelike};
        MeterTime {
            year: t.year().clamp(2000, 2099) as u16,
            month: t.month() as u8,
            day: t.day() as u8,
            hour: t.hour() as u8,
            minute: t.minute() as u8,
            second: t.second() as u8,
        }
    }

    /// `ss mm hh DD MM YY` as sent (lowest first): time sync and relay expiry.
    pub fn write_yymmddhhmmss(self, out: &mut Vec<u8>) {
        for v in [
            self.second,
            self.minute,
            self.hour,
            self.day,
            self.month,
            (self.year % 100) as u8,
        ] {
            out.push(bcd::u8_to_byte(v));
        }
    }
}

/// How the value bytes of a DI are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One BCD number of `len` bytes with `scale` decimals, optionally signed.
    Bcd { len: u8, scale: u8, signed: bool },
    /// A run of BCD numbers of that shape (block reads): as many as the reply holds.
    Block { len: u8, scale: u8, signed: bool },
    /// Maximum demand: XX.XXXX (3 bytes) then when it occurred, YYMMDDhhmm (5 bytes).
    DemandAt,
    /// YYMMDDWW (date and day of week).
    DateWeek,
    /// hhmmss.
    Time,
    /// YYMMDDhhmm.
    DateTimeMinute,
    /// A 6-byte meter address.
    Address,
}

impl Format {
    /// Bytes one value takes (for blocks: one element).
    pub fn len(self) -> usize {
        match self {
            Format::Bcd { len, .. } | Format::Block { len, .. } => len as usize,
            Format::DemandAt => 8,
            Format::DateWeek => 4,
            Format::Time => 3,
            Format::DateTimeMinute => 5,
            Format::Address => 6,
        }
    }

    pub fn is_empty(self) -> bool {
        false
    }

    /// Decodes value bytes (offset already removed).
    pub fn decode(self, b: &[u8]) -> Result<Value, ValueError> {
        let need = self.len();
        let short = || ValueError::Length {
            expected: need,
            got: b.len(),
        };
        match self {
            Format::Bcd { len, scale, signed } => {
                if b.len() < len as usize {
                    return Err(short());
                }
                Ok(Value::Number(bcd::decode_decimal(
                    &b[..len as usize],
                    scale as u32,
                    signed,
                )?))
            }
            Format::Block { len, scale, signed } => {
                let len = len as usize;
                if b.is_empty() || !b.len().is_multiple_of(len) {
                    return Err(short());
                }
                let v = b
                    .chunks_exact(len)
                    .map(|c| bcd::decode_decimal(c, scale as u32, signed))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Value::Numbers(v))
            }
            Format::DemandAt => {
                if b.len() < 8 {
                    return Err(short());
                }
                let value = bcd::decode_decimal(&b[..3], 4, false)?;
                let at = decode_yymmddhhmm(&b[3..8])?;
                Ok(Value::NumberAt { value, at })
            }
            Format::DateWeek => {
                if b.len() < 4 {
                    return Err(short());
                }
                let wd = bcd_digit(b, 0)?;
                let day = bcd_digit(b, 1)?;
                let month = bcd_digit(b, 2)?;
                let year = 2000 + bcd_digit(b, 3)? as u16;
                Ok(Value::Date {
                    year,
                    month,
                    day,
                    weekday: wd,
                })
            }
            Format::Time => {
                if b.len() < 3 {
                    return Err(short());
                }
                Ok(Value::Time {
                    hour: bcd_digit(b, 2)?,
                    minute: bcd_digit(b, 1)?,
                    second: bcd_digit(b, 0)?,
                })
            }
            Format::DateTimeMinute => {
                if b.len() < 5 {
                    return Err(short());
                }
                Ok(Value::DateTime(decode_yymmddhhmm(&b[..5])?))
            }
            Format::Address => {
                if b.len() < 6 {
                    return Err(short());
                }
                let mut a = [0u8; 6];
                a.copy_from_slice(&b[..6]);
                Ok(Value::Address(Address(a)))
            }
        }
    }

    /// Encodes a value (offset not yet added). Used by the simulator and for writes.
    pub fn encode(self, v: &Value, out: &mut Vec<u8>) -> Result<(), ValueError> {
        match (self, v) {
            (Format::Bcd { len, scale, signed }, Value::Number(x)) => {
                bcd::encode_decimal(*x, len as usize, scale as u32, signed, out)?
            }
            (Format::Block { len, scale, signed }, Value::Numbers(xs)) => {
                for x in xs {
                    bcd::encode_decimal(*x, len as usize, scale as u32, signed, out)?;
                }
            }
            (Format::DemandAt, Value::NumberAt { value, at }) => {
                bcd::encode_decimal(*value, 3, 4, false, out)?;
                for v in [at.minute, at.hour, at.day, at.month, (at.year % 100) as u8] {
                    out.push(bcd::u8_to_byte(v));
                }
            }
            (
                Format::DateWeek,
                Value::Date {
                    year,
                    month,
                    day,
                    weekday,
                },
            ) => {
                for v in [*weekday, *day, *month, (*year % 100) as u8] {
                    out.push(bcd::u8_to_byte(v));
                }
            }
            (
                Format::Time,
                Value::Time {
                    hour,
                    minute,
                    second,
                },
            ) => {
                for v in [*second, *minute, *hour] {
                    out.push(bcd::u8_to_byte(v));
                }
            }
            (Format::DateTimeMinute, Value::DateTime(t)) => {
                for v in [t.minute, t.hour, t.day, t.month, (t.year % 100) as u8] {
                    out.push(bcd::u8_to_byte(v));
                }
            }
            (Format::Address, Value::Address(a)) => out.extend_from_slice(&a.0),
            _ => return Err(ValueError::Mismatch),
        }
        Ok(())
    }
}

fn bcd_digit(b: &[u8], i: usize) -> Result<u8, ValueError> {
    bcd::byte_to_u8(b[i]).ok_or(ValueError::Bcd(BcdError::NotBcd {
        offset: i,
        byte: b[i],
    }))
}

fn decode_yymmddhhmm(b: &[u8]) -> Result<MeterTime, ValueError> {
    Ok(MeterTime {
        minute: bcd_digit(b, 0)?,
        hour: bcd_digit(b, 1)?,
        day: bcd_digit(b, 2)?,
        month: bcd_digit(b, 3)?,
        year: 2000 + bcd_digit(b, 4)? as u16,
        second: 0,
    })
}

/// A decoded value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Number(Decimal),
    Numbers(Vec<Decimal>),
    NumberAt {
        value: Decimal,
        at: MeterTime,
    },
    Date {
        year: u16,
        month: u8,
        day: u8,
        weekday: u8,
    },
    Time {
        hour: u8,
        minute: u8,
        second: u8,
    },
    DateTime(MeterTime),
    Address(Address),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Number(x) => write!(f, "{x}"),
            Value::Numbers(xs) => {
                let s: Vec<String> = xs.iter().map(|x| x.to_string()).collect();
                write!(f, "[{}]", s.join(", "))
            }
            Value::NumberAt { value, at } => write!(
                f,
                "{value} at {:04}-{:02}-{:02} {:02}:{:02}",
                at.year, at.month, at.day, at.hour, at.minute
            ),
            Value::Date {
                year,
                month,
                day,
                weekday,
            } => {
                write!(f, "{year:04}-{month:02}-{day:02} (weekday {weekday})")
            }
            Value::Time {
                hour,
                minute,
                second,
            } => write!(f, "{hour:02}:{minute:02}:{second:02}"),
            Value::DateTime(t) => {
                write!(
                    f,
                    "{:04}-{:02}-{:02} {:02}:{:02}",
                    t.year, t.month, t.day, t.hour, t.minute
                )
            }
            Value::Address(a) => write!(f, "{a}"),
        }
    }
}

/// Value bytes that do not match their format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("expected {expected} value bytes, got {got}")]
    Length { expected: usize, got: usize },
    #[error(transparent)]
    Bcd(#[from] BcdError),
    #[error("value does not match the DI's format")]
    Mismatch,
}

/// Which time a value belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeRef {
    /// The moment it was read.
    ReadTime,
    /// The time of the last daily freeze, read from the given DI (YYMMDDhhmm).
    FrozenAt(Di),
}

/// One catalogue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiInfo {
    pub di: Di,
    pub name: &'static str,
    pub format: Format,
    pub unit: &'static str,
    /// Channels fed, in value order (block reads: total first, then tariffs).
    /// Empty: the DI is readable but not stored as a reading.
    pub channels: &'static [Channel],
    pub time: TimeRef,
}

const E: Format = Format::Bcd {
    len: 4,
    scale: 2,
    signed: false,
};
const E_SIGNED: Format = Format::Bcd {
    len: 4,
    scale: 2,
    signed: true,
};
const E_BLOCK: Format = Format::Block {
    len: 4,
    scale: 2,
    signed: false,
};
const MONEY: Format = Format::Bcd {
    len: 4,
    scale: 2,
    signed: false,
};
const V1: Format = Format::Bcd {
    len: 2,
    scale: 1,
    signed: false,
};
const V1_BLOCK: Format = Format::Block {
    len: 2,
    scale: 1,
    signed: false,
};
const A3: Format = Format::Bcd {
    len: 3,
    scale: 3,
    signed: true,
};
const A3_BLOCK: Format = Format::Block {
    len: 3,
    scale: 3,
    signed: true,
};
const P4: Format = Format::Bcd {
    len: 3,
    scale: 4,
    signed: true,
};
const P4_BLOCK: Format = Format::Block {
    len: 3,
    scale: 4,
    signed: true,
};
const PF: Format = Format::Bcd {
    len: 2,
    scale: 3,
    signed: true,
};
const HZ: Format = Format::Bcd {
    len: 2,
    scale: 2,
    signed: false,
};

const DAILY_FREEZE_TIME: Di = Di::v2007(0x0506_0001);

use Channel as C;
const IMPORT_BLOCK: &[Channel] = &[
    C::ImportActiveTotal,
    C::ImportActiveT1,
    C::ImportActiveT2,
    C::ImportActiveT3,
    C::ImportActiveT4,
];
const EXPORT_BLOCK: &[Channel] = &[
    C::ExportActiveTotal,
    C::ExportActiveT1,
    C::ExportActiveT2,
    C::ExportActiveT3,
    C::ExportActiveT4,
];

macro_rules! entry {
    ($di:expr, $name:literal, $fmt:expr, $unit:literal, [$($ch:expr),*]) => {
        DiInfo { di: $di, name: $name, format: $fmt, unit: $unit, channels: &[$($ch),*], time: TimeRef::ReadTime }
    };
    ($di:expr, $name:literal, $fmt:expr, $unit:literal, $chs:expr) => {
        DiInfo { di: $di, name: $name, format: $fmt, unit: $unit, channels: $chs, time: TimeRef::ReadTime }
    };
}

const fn frozen(mut e: DiInfo) -> DiInfo {
    e.time = TimeRef::FrozenAt(DAILY_FREEZE_TIME);
    e
}

/// The catalogue, sorted by (edition, code) for binary search.
/// 1997 entries come first because `Edition::V1997 < Edition::V2007`.
pub static CATALOGUE: &[DiInfo] = &[
    // ---- DL/T 645-1997 ----
    entry!(
        Di::v1997(0x9010),
        "forward active energy, total",
        E,
        "kWh",
        [C::ImportActiveTotal]
    ),
    entry!(
        Di::v1997(0x9011),
        "forward active energy, tariff 1",
        E,
        "kWh",
        [C::ImportActiveT1]
    ),
    entry!(
        Di::v1997(0x9012),
        "forward active energy, tariff 2",
        E,
        "kWh",
        [C::ImportActiveT2]
    ),
    entry!(
        Di::v1997(0x9013),
        "forward active energy, tariff 3",
        E,
        "kWh",
        [C::ImportActiveT3]
    ),
    entry!(
        Di::v1997(0x9014),
        "forward active energy, tariff 4",
        E,
        "kWh",
        [C::ImportActiveT4]
    ),
    entry!(
        Di::v1997(0x901F),
        "forward active energy, block (total + tariffs)",
        E_BLOCK,
        "kWh",
        IMPORT_BLOCK
    ),
    entry!(
        Di::v1997(0x9020),
        "reverse active energy, total",
        E,
        "kWh",
        [C::ExportActiveTotal]
    ),
    entry!(
        Di::v1997(0x902F),
        "reverse active energy, block",
        E_BLOCK,
        "kWh",
        EXPORT_BLOCK
    ),
    entry!(
        Di::v1997(0xB611),
        "phase A voltage",
        Format::Bcd {
            len: 2,
            scale: 0,
            signed: false
        },
        "V",
        [C::VoltageA]
    ),
    entry!(
        Di::v1997(0xB612),
        "phase B voltage",
        Format::Bcd {
            len: 2,
            scale: 0,
            signed: false
        },
        "V",
        [C::VoltageB]
    ),
    entry!(
        Di::v1997(0xB613),
        "phase C voltage",
        Format::Bcd {
            len: 2,
            scale: 0,
            signed: false
        },
        "V",
        [C::VoltageC]
    ),
    entry!(
        Di::v1997(0xB621),
        "phase A current",
        Format::Bcd {
            len: 2,
            scale: 2,
            signed: false
        },
        "A",
        [C::CurrentA]
    ),
    entry!(
        Di::v1997(0xB622),
        "phase B current",
        Format::Bcd {
            len: 2,
            scale: 2,
            signed: false
        },
        "A",
        [C::CurrentB]
    ),
    entry!(
        Di::v1997(0xB623),
        "phase C current",
        Format::Bcd {
            len: 2,
            scale: 2,
            signed: false
        },
        "A",
        [C::CurrentC]
    ),
    entry!(
        Di::v1997(0xB630),
        "total active power",
        Format::Bcd {
            len: 3,
            scale: 4,
            signed: false
        },
        "kW",
        [C::ActivePowerTotal]
    ),
    entry!(
        Di::v1997(0xC010),
        "date and weekday",
        Format::DateWeek,
        "",
        []
    ),
    entry!(Di::v1997(0xC011), "time", Format::Time, "", []),
    entry!(Di::v1997(0xC032), "comm address", Format::Address, "", []),
    // ---- DL/T 645-2007 ----
    entry!(
        Di::v2007(0x0000_0000),
        "combined active energy, total",
        E_SIGNED,
        "kWh",
        [C::CombinedActiveTotal]
    ),
    entry!(
        Di::v2007(0x0001_0000),
        "forward active energy, total",
        E,
        "kWh",
        [C::ImportActiveTotal]
    ),
    entry!(
        Di::v2007(0x0001_0001),
        "forward active energy, total, 1st previous settlement",
        E,
        "kWh",
        []
    ),
    entry!(
        Di::v2007(0x0001_0002),
        "forward active energy, total, 2nd previous settlement",
        E,
        "kWh",
        []
    ),
    entry!(
        Di::v2007(0x0001_0003),
        "forward active energy, total, 3rd previous settlement",
        E,
        "kWh",
        []
    ),
    entry!(
        Di::v2007(0x0001_0004),
        "forward active energy, total, 4th previous settlement",
        E,
        "kWh",
        []
    ),
    entry!(
        Di::v2007(0x0001_0005),
        "forward active energy, total, 5th previous settlement",
        E,
        "kWh",
        []
    ),
    entry!(
        Di::v2007(0x0001_0006),
        "forward active energy, total, 6th previous settlement",
        E,
        "kWh",
        []
    ),
    entry!(
        Di::v2007(0x0001_0007),
        "forward active energy, total, 7th previous settlement",
        E,
        "kWh",
        []
    ),
    entry!(
        Di::v2007(0x0001_0008),
        "forward active energy, total, 8th previous settlement",
        E,
        "kWh",
        []
    ),
    entry!(
        Di::v2007(0x0001_0009),
        "forward active energy, total, 9th previous settlement",
        E,
        "kWh",
        []
    ),
    entry!(
        Di::v2007(0x0001_000A),
        "forward active energy, total, 10th previous settlement",
        E,
        "kWh",
        []
    ),
    entry!(
        Di::v2007(0x0001_000B),
        "forward active energy, total, 11th previous settlement",
        E,
        "kWh",
        []
    ),
    entry!(
        Di::v2007(0x0001_000C),
        "forward active energy, total, 12th previous settlement",
        E,
        "kWh",
        []
    ),
    entry!(
        Di::v2007(0x0001_0100),
        "forward active energy, tariff 1 (sharp)",
        E,
        "kWh",
        [C::ImportActiveT1]
    ),
    entry!(
        Di::v2007(0x0001_0200),
        "forward active energy, tariff 2 (peak)",
        E,
        "kWh",
        [C::ImportActiveT2]
    ),
    entry!(
        Di::v2007(0x0001_0300),
        "forward active energy, tariff 3 (flat)",
        E,
        "kWh",
        [C::ImportActiveT3]
    ),
    entry!(
        Di::v2007(0x0001_0400),
        "forward active energy, tariff 4 (valley)",
        E,
        "kWh",
        [C::ImportActiveT4]
    ),
    entry!(
        Di::v2007(0x0001_FF00),
        "forward active energy, block (total + tariffs)",
        E_BLOCK,
        "kWh",
        IMPORT_BLOCK
    ),
    entry!(
        Di::v2007(0x0002_0000),
        "reverse active energy, total",
        E,
        "kWh",
        [C::ExportActiveTotal]
    ),
    entry!(
        Di::v2007(0x0002_0100),
        "reverse active energy, tariff 1",
        E,
        "kWh",
        [C::ExportActiveT1]
    ),
    entry!(
        Di::v2007(0x0002_0200),
        "reverse active energy, tariff 2",
        E,
        "kWh",
        [C::ExportActiveT2]
    ),
    entry!(
        Di::v2007(0x0002_0300),
        "reverse active energy, tariff 3",
        E,
        "kWh",
        [C::ExportActiveT3]
    ),
    entry!(
        Di::v2007(0x0002_0400),
        "reverse active energy, tariff 4",
        E,
        "kWh",
        [C::ExportActiveT4]
    ),
    entry!(
        Di::v2007(0x0002_FF00),
        "reverse active energy, block (total + tariffs)",
        E_BLOCK,
        "kWh",
        EXPORT_BLOCK
    ),
    entry!(
        Di::v2007(0x0003_0000),
        "combined reactive energy 1, total",
        E_SIGNED,
        "kvarh",
        [C::ImportReactiveTotal]
    ),
    entry!(
        Di::v2007(0x0004_0000),
        "combined reactive energy 2, total",
        E_SIGNED,
        "kvarh",
        [C::ExportReactiveTotal]
    ),
    entry!(
        Di::v2007(0x0090_0200),
        "remaining amount (prepayment meters)",
        MONEY,
        "CNY",
        [C::Balance]
    ),
    entry!(
        Di::v2007(0x0101_0000),
        "forward active maximum demand and its time",
        Format::DemandAt,
        "kW",
        [C::MaxDemandImport]
    ),
    entry!(
        Di::v2007(0x0201_0100),
        "phase A voltage",
        V1,
        "V",
        [C::VoltageA]
    ),
    entry!(
        Di::v2007(0x0201_0200),
        "phase B voltage",
        V1,
        "V",
        [C::VoltageB]
    ),
    entry!(
        Di::v2007(0x0201_0300),
        "phase C voltage",
        V1,
        "V",
        [C::VoltageC]
    ),
    entry!(
        Di::v2007(0x0201_FF00),
        "voltage block (A, B, C)",
        V1_BLOCK,
        "V",
        &[C::VoltageA, C::VoltageB, C::VoltageC]
    ),
    entry!(
        Di::v2007(0x0202_0100),
        "phase A current",
        A3,
        "A",
        [C::CurrentA]
    ),
    entry!(
        Di::v2007(0x0202_0200),
        "phase B current",
        A3,
        "A",
        [C::CurrentB]
    ),
    entry!(
        Di::v2007(0x0202_0300),
        "phase C current",
        A3,
        "A",
        [C::CurrentC]
    ),
    entry!(
        Di::v2007(0x0202_FF00),
        "current block (A, B, C)",
        A3_BLOCK,
        "A",
        &[C::CurrentA, C::CurrentB, C::CurrentC]
    ),
    entry!(
        Di::v2007(0x0203_0000),
        "total active power",
        P4,
        "kW",
        [C::ActivePowerTotal]
    ),
    entry!(
        Di::v2007(0x0203_0100),
        "phase A active power",
        P4,
        "kW",
        [C::ActivePowerA]
    ),
    entry!(
        Di::v2007(0x0203_0200),
        "phase B active power",
        P4,
        "kW",
        [C::ActivePowerB]
    ),
    entry!(
        Di::v2007(0x0203_0300),
        "phase C active power",
        P4,
        "kW",
        [C::ActivePowerC]
    ),
    entry!(
        Di::v2007(0x0203_FF00),
        "active power block (total, A, B, C)",
        P4_BLOCK,
        "kW",
        &[
            C::ActivePowerTotal,
            C::ActivePowerA,
            C::ActivePowerB,
            C::ActivePowerC
        ]
    ),
    entry!(
        Di::v2007(0x0204_0000),
        "total reactive power",
        P4,
        "kvar",
        [C::ReactivePowerTotal]
    ),
    entry!(
        Di::v2007(0x0205_0000),
        "total apparent power",
        P4,
        "kVA",
        [C::ApparentPowerTotal]
    ),
    entry!(
        Di::v2007(0x0206_0000),
        "total power factor",
        PF,
        "1",
        [C::PowerFactorTotal]
    ),
    entry!(
        Di::v2007(0x0280_0002),
        "grid frequency",
        HZ,
        "Hz",
        [C::Frequency]
    ),
    entry!(
        Di::v2007(0x0400_0101),
        "date and weekday",
        Format::DateWeek,
        "",
        []
    ),
    entry!(Di::v2007(0x0400_0102), "time", Format::Time, "", []),
    entry!(
        Di::v2007(0x0400_0401),
        "comm address",
        Format::Address,
        "",
        []
    ),
    entry!(Di::v2007(0x0400_1001), "alert amount 1", MONEY, "CNY", []),
    entry!(Di::v2007(0x0400_1002), "alert amount 2", MONEY, "CNY", []),
    entry!(Di::v2007(0x0400_1003), "overdraft limit", MONEY, "CNY", []),
    entry!(
        Di::v2007(0x0400_1004),
        "hoarding (maximum balance) limit",
        MONEY,
        "CNY",
        []
    ),
    entry!(
        Di::v2007(0x0400_1005),
        "reconnect-allowed amount",
        MONEY,
        "CNY",
        []
    ),
    entry!(
        Di::v2007(0x0506_0001),
        "last daily freeze time",
        Format::DateTimeMinute,
        "",
        []
    ),
    frozen(entry!(
        Di::v2007(0x0506_0101),
        "last daily frozen forward active energy (total + tariffs)",
        E_BLOCK,
        "kWh",
        IMPORT_BLOCK
    )),
    frozen(entry!(
        Di::v2007(0x0506_0201),
        "last daily frozen reverse active energy (total + tariffs)",
        E_BLOCK,
        "kWh",
        EXPORT_BLOCK
    )),
];

/// Looks a DI up in the catalogue.
#[inline]
pub fn lookup(di: Di) -> Option<&'static DiInfo> {
    CATALOGUE
        .binary_search_by(|e| e.di.cmp(&di))
        .ok()
        .map(|i| &CATALOGUE[i])
}

/// The DIs of the date and time registers, for clock reads.
pub fn clock_dis(edition: Edition) -> (Di, Di) {
    match edition {
        Edition::V2007 => (Di::v2007(0x0400_0101), Di::v2007(0x0400_0102)),
        Edition::V1997 => (Di::v1997(0xC010), Di::v1997(0xC011)),
    }
}

/// The DI used to probe whether a meter is there (forward active total).
pub fn probe_di(edition: Edition) -> Di {
    match edition {
        Edition::V2007 => Di::v2007(0x0001_0000),
        Edition::V1997 => Di::v1997(0x9010),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_is_sorted_and_unique() {
        for w in CATALOGUE.windows(2) {
            assert!(w[0].di < w[1].di, "{:?} before {:?}", w[0].di, w[1].di);
        }
    }

    #[test]
    fn every_entry_is_found_and_units_agree_with_channels() {
        for e in CATALOGUE {
            assert_eq!(lookup(e.di).unwrap().di, e.di);
            for ch in e.channels {
                assert_eq!(ch.unit(), e.unit, "{} {}", e.di, e.name);
            }
            if e.channels.len() > 1 {
                assert!(matches!(e.format, Format::Block { .. }), "{}", e.di);
                assert!(
                    e.di.is_block() || matches!(e.time, TimeRef::FrozenAt(_)),
                    "{}",
                    e.di
                );
            }
        }
        assert!(lookup(Di::v2007(0x1234_5678)).is_none());
    }

    #[test]
    fn di_parse_and_print() {
        let d: Di = "00010000".parse().unwrap();
        assert_eq!(d, Di::v2007(0x0001_0000));
        assert_eq!(d.to_string(), "00010000");
        let d: Di = "00 01 FF 00".parse().unwrap();
        assert!(d.is_block());
        let d: Di = "9010".parse().unwrap();
        assert_eq!(d, Di::v1997(0x9010));
        assert!(!d.is_block());
        assert!("901F".parse::<Di>().unwrap().is_block());
        assert!("123".parse::<Di>().is_err());
        assert!("zzzzzzzz".parse::<Di>().is_err());
        let mut w = vec![];
        Di::v2007(0x0001_0000).write(&mut w);
        assert_eq!(w, vec![0x00, 0x00, 0x01, 0x00]);
        assert_eq!(Di::read(Edition::V2007, &w), Some(Di::v2007(0x0001_0000)));
    }

    #[test]
    fn formats_round_trip() {
        use rust_decimal_macros::dec;
        let cases = [
            (
                Format::DemandAt,
                Value::NumberAt {
                    value: dec!(12.3456),
                    at: MeterTime {
                        year: 2024,
                        month: 5,
                        day: 17,
                        hour: 13,
                        minute: 45,
                        second: 0,
                    },
                },
            ),
            (
                Format::DateWeek,
                Value::Date {
                    year: 2024,
                    month: 5,
                    day: 17,
                    weekday: 5,
                },
            ),
            (
                Format::Time,
                Value::Time {
                    hour: 23,
                    minute: 59,
                    second: 58,
                },
            ),
            (
                Format::Address,
                Value::Address("398192000337".parse().unwrap()),
            ),
            (
                E_BLOCK,
                Value::Numbers(vec![
                    dec!(10.00),
                    dec!(1.00),
                    dec!(2.00),
                    dec!(3.00),
                    dec!(4.00),
                ]),
            ),
            (P4, Value::Number(dec!(-3.2100))),
        ];
        for (f, v) in cases {
            let mut out = vec![];
            f.encode(&v, &mut out).unwrap();
            assert_eq!(f.decode(&out).unwrap(), v, "{f:?}");
        }
    }
}
