//! The register map model: where a value lives on a device and how to read it.

use std::fmt;

use rust_decimal::Decimal;

use crate::model::Channel;

/// The four Modbus data areas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Area {
    /// 0x references, read with function 0x01.
    Coil,
    /// 1x references, read with function 0x02.
    DiscreteInput,
    /// 3x references, read with function 0x04.
    Input,
    /// 4x references, read with function 0x03.
    Holding,
}

impl Area {
    pub fn parse(s: &str) -> Option<Area> {
        Some(match s {
            "coil" | "coils" => Area::Coil,
            "discrete_input" | "discrete" => Area::DiscreteInput,
            "input" | "input_register" => Area::Input,
            "holding" | "holding_register" => Area::Holding,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Area::Coil => "coil",
            Area::DiscreteInput => "discrete_input",
            Area::Input => "input",
            Area::Holding => "holding",
        }
    }
    /// True for the 1-bit areas.
    pub fn is_bit(self) -> bool {
        matches!(self, Area::Coil | Area::DiscreteInput)
    }
    /// Protocol limit on how many items one read may ask for.
    pub fn max_per_request(self) -> u16 {
        if self.is_bit() {
            2000
        } else {
            125
        }
    }
    pub fn function_code(self) -> u8 {
        match self {
            Area::Coil => 0x01,
            Area::DiscreteInput => 0x02,
            Area::Holding => 0x03,
            Area::Input => 0x04,
        }
    }
    pub fn from_function_code(fc: u8) -> Option<Area> {
        Some(match fc {
            0x01 => Area::Coil,
            0x02 => Area::DiscreteInput,
            0x03 => Area::Holding,
            0x04 => Area::Input,
            _ => return None,
        })
    }
}

impl fmt::Display for Area {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a manual numbers registers: protocol addresses (0-based) or PLC numbers (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Numbering {
    ZeroBased,
    OneBased,
}

impl Numbering {
    pub fn parse(s: &str) -> Option<Numbering> {
        Some(match s {
            "zero_based" | "0" | "zero" => Numbering::ZeroBased,
            "one_based" | "1" | "one" => Numbering::OneBased,
            _ => return None,
        })
    }
    /// The on-the-wire (0-based) address of a documented address.
    pub fn wire_address(self, documented: u32) -> Option<u16> {
        let a = match self {
            Numbering::ZeroBased => documented,
            Numbering::OneBased => documented.checked_sub(1)?,
        };
        u16::try_from(a).ok()
    }
}

/// Value type of a register (or group of registers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    /// One bit of a coil / discrete input area.
    Bool,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
    /// ASCII text over `words` registers (two characters each).
    String {
        words: u16,
    },
}

impl DataType {
    /// Parses a type name; strings need their length in words.
    pub fn parse(s: &str, words: Option<u16>) -> Option<DataType> {
        Some(match s {
            "bool" => DataType::Bool,
            "u16" | "uint16" => DataType::U16,
            "i16" | "int16" => DataType::I16,
            "u32" | "uint32" => DataType::U32,
            "i32" | "int32" => DataType::I32,
            "u64" | "uint64" => DataType::U64,
            "i64" | "int64" => DataType::I64,
            "f32" | "float32" | "float" => DataType::F32,
            "f64" | "float64" | "double" => DataType::F64,
            "string" => DataType::String { words: words? },
            _ => return None,
        })
    }
    /// Registers (or bits for `Bool`) occupied.
    pub fn words(self) -> u16 {
        match self {
            DataType::Bool | DataType::U16 | DataType::I16 => 1,
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
            DataType::U64 | DataType::I64 | DataType::F64 => 4,
            DataType::String { words } => words,
        }
    }
    pub fn is_float(self) -> bool {
        matches!(self, DataType::F32 | DataType::F64)
    }
    pub fn name(self) -> &'static str {
        match self {
            DataType::Bool => "bool",
            DataType::U16 => "u16",
            DataType::I16 => "i16",
            DataType::U32 => "u32",
            DataType::I32 => "i32",
            DataType::U64 => "u64",
            DataType::I64 => "i64",
            DataType::F32 => "f32",
            DataType::F64 => "f64",
            DataType::String { .. } => "string",
        }
    }
}

/// Byte/word order of a multi-byte value, named by where the big-endian bytes
/// A (most significant) .. land on the wire.
///
/// 16-bit: `AB`, `BA`. 32-bit: `ABCD` (big endian), `CDAB` (word swap),
/// `BADC` (byte swap), `DCBA` (little endian). 64-bit: `ABCDEFGH`,
/// `GHEFCDAB`, `BADCFEHG`, `HGFEDCBA`. Strings use `AB` or `BA`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Order {
    /// Least significant word first on the wire.
    pub word_swap: bool,
    /// Low byte first inside each register.
    pub byte_swap: bool,
}

impl Order {
    pub const BIG: Order = Order {
        word_swap: false,
        byte_swap: false,
    };

    /// Parses an order name, checking it fits a value of `words` registers.
    pub fn parse(s: &str, words: u16) -> Option<Order> {
        let (ws, bs) = match (words, s) {
            (1, "AB") => (false, false),
            (1, "BA") => (false, true),
            (2, "ABCD") => (false, false),
            (2, "CDAB") => (true, false),
            (2, "BADC") => (false, true),
            (2, "DCBA") => (true, true),
            (4, "ABCDEFGH") => (false, false),
            (4, "GHEFCDAB") => (true, false),
            (4, "BADCFEHG") => (false, true),
            (4, "HGFEDCBA") => (true, true),
            _ => return None,
        };
        Some(Order {
            word_swap: ws,
            byte_swap: bs,
        })
    }

    /// The valid names for a value of `words` registers.
    pub fn names_for(words: u16) -> &'static [&'static str] {
        match words {
            1 => &["AB", "BA"],
            2 => &["ABCD", "CDAB", "BADC", "DCBA"],
            4 => &["ABCDEFGH", "GHEFCDAB", "BADCFEHG", "HGFEDCBA"],
            _ => &[],
        }
    }

    pub fn name(self, words: u16) -> &'static str {
        let i = usize::from(self.word_swap) * 2 + usize::from(self.byte_swap);
        // index order matches names_for: none, byte, word, both
        let idx = [0, 2, 1, 3][i];
        Order::names_for(words).get(idx).copied().unwrap_or("?")
    }
}

/// One value on a device, fully resolved (wire address, exact scale).
#[derive(Debug, Clone, PartialEq)]
pub struct Register {
    /// Name unique within the device (used in logs and errors).
    pub name: String,
    pub area: Area,
    /// 0-based wire address.
    pub address: u16,
    pub data_type: DataType,
    pub order: Order,
    /// value = raw * scale + offset, exactly.
    pub scale: Decimal,
    pub offset: Decimal,
    /// Decimal places kept when converting a float (ignored for integers).
    pub precision: u32,
    pub unit: String,
    /// Where the value goes; `None` reads the register for logs only.
    pub channel: Option<Channel>,
    /// Plausible range of the final value; outside it the reading is flagged.
    pub min: Option<Decimal>,
    pub max: Option<Decimal>,
}

impl Register {
    pub fn words(&self) -> u16 {
        self.data_type.words()
    }
    /// Exclusive end address.
    pub fn end(&self) -> u32 {
        u32::from(self.address) + u32::from(self.words())
    }
    /// A plain register with defaults, handy in tests and profiles built in code.
    pub fn new(name: &str, area: Area, address: u16, data_type: DataType) -> Register {
        Register {
            name: name.to_string(),
            area,
            address,
            data_type,
            order: Order::BIG,
            scale: Decimal::ONE,
            offset: Decimal::ZERO,
            precision: 3,
            unit: String::new(),
            channel: None,
            min: None,
            max: None,
        }
    }
}
