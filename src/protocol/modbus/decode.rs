//! Raw registers to exact decimals (and back, for the simulator).
//!
//! Floats are turned into decimals here, rounded at the register's declared
//! precision, so nothing downstream ever sees a binary float.

use rust_decimal::prelude::ToPrimitive;
use rust_decimal::{Decimal, RoundingStrategy};

use super::regmap::{DataType, Order, Register};

/// A decoded register value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Number(Decimal),
    Text(String),
}

/// Why a register could not be turned into a number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("register '{register}': expected {need} words, got {got}")]
    Short {
        register: String,
        need: usize,
        got: usize,
    },
    #[error("register '{register}': float is {what}")]
    NotFinite {
        register: String,
        what: &'static str,
    },
    #[error("register '{register}': value {raw} does not fit an exact decimal")]
    OutOfRange { register: String, raw: String },
    #[error("register '{register}': scale/offset overflowed")]
    Overflow { register: String },
    #[error("register '{register}': text is not ASCII")]
    BadText { register: String },
}

impl DecodeError {
    /// Short label for metrics (`errors_total{kind=...}`).
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Short { .. } => "short",
            DecodeError::NotFinite { .. } => "not_finite",
            DecodeError::OutOfRange { .. } => "out_of_range",
            DecodeError::Overflow { .. } => "overflow",
            DecodeError::BadText { .. } => "bad_text",
        }
    }
}

/// Puts wire words back into big-endian byte order (A first).
pub fn canonical_bytes(words: &[u16], order: Order) -> Vec<u8> {
    let mut out = Vec::with_capacity(words.len() * 2);
    let mut push = |w: u16| {
        let [hi, lo] = w.to_be_bytes();
        if order.byte_swap {
            out.extend_from_slice(&[lo, hi]);
        } else {
            out.extend_from_slice(&[hi, lo]);
        }
    };
    if order.word_swap {
        words.iter().rev().for_each(|w| push(*w));
    } else {
        words.iter().for_each(|w| push(*w));
    }
    out
}

/// Inverse of [`canonical_bytes`]: big-endian bytes to wire words.
pub fn wire_words(bytes: &[u8], order: Order) -> Vec<u16> {
    let mut words: Vec<u16> = bytes
        .chunks(2)
        .map(|c| {
            let (hi, lo) = (c[0], *c.get(1).unwrap_or(&0));
            if order.byte_swap {
                u16::from_be_bytes([lo, hi])
            } else {
                u16::from_be_bytes([hi, lo])
            }
        })
        .collect();
    if order.word_swap {
        words.reverse();
    }
    words
}

/// Decodes a register's raw value (before scale and offset).
pub fn decode_raw(reg: &Register, words: &[u16]) -> Result<Value, DecodeError> {
    let need = usize::from(reg.words());
    if words.len() < need {
        return Err(DecodeError::Short {
            register: reg.name.clone(),
            need,
            got: words.len(),
        });
    }
    let words = &words[..need];
    let b = canonical_bytes(words, reg.order);
    let n = |d: Decimal| Ok(Value::Number(d));
    match reg.data_type {
        DataType::Bool => n(Decimal::from(u8::from(words[0] != 0))),
        DataType::U16 => n(Decimal::from(u16::from_be_bytes([b[0], b[1]]))),
        DataType::I16 => n(Decimal::from(i16::from_be_bytes([b[0], b[1]]))),
        DataType::U32 => n(Decimal::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))),
        DataType::I32 => n(Decimal::from(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))),
        DataType::U64 => n(Decimal::from(u64::from_be_bytes(
            b[..8].try_into().unwrap_or([0; 8]),
        ))),
        DataType::I64 => n(Decimal::from(i64::from_be_bytes(
            b[..8].try_into().unwrap_or([0; 8]),
        ))),
        DataType::F32 => {
            let v = f32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            float_to_decimal(reg, f64::from(v)).map(Value::Number)
        }
        DataType::F64 => {
            let v = f64::from_be_bytes(b[..8].try_into().unwrap_or([0; 8]));
            float_to_decimal(reg, v).map(Value::Number)
        }
        DataType::String { .. } => {
            if !b.iter().all(|c| c.is_ascii()) {
                return Err(DecodeError::BadText {
                    register: reg.name.clone(),
                });
            }
            let s: String = b.iter().map(|c| *c as char).collect();
            Ok(Value::Text(s.trim_end_matches(['\0', ' ']).to_string()))
        }
    }
}

/// Float to decimal at the register's precision; NaN, infinities and huge
/// values are errors, never silently clamped.
fn float_to_decimal(reg: &Register, v: f64) -> Result<Decimal, DecodeError> {
    if v.is_nan() {
        return Err(DecodeError::NotFinite {
            register: reg.name.clone(),
            what: "NaN",
        });
    }
    if v.is_infinite() {
        return Err(DecodeError::NotFinite {
            register: reg.name.clone(),
            what: if v > 0.0 { "+inf" } else { "-inf" },
        });
    }
    let d = Decimal::from_f64_retain(v).ok_or_else(|| DecodeError::OutOfRange {
        register: reg.name.clone(),
        raw: format!("{v:e}"),
    })?;
    Ok(d.round_dp_with_strategy(reg.precision, RoundingStrategy::MidpointAwayFromZero))
}

/// Decodes and applies scale and offset: the value a reading carries.
pub fn decode(reg: &Register, words: &[u16]) -> Result<Value, DecodeError> {
    match decode_raw(reg, words)? {
        Value::Number(raw) => raw
            .checked_mul(reg.scale)
            .and_then(|v| v.checked_add(reg.offset))
            .map(Value::Number)
            .ok_or_else(|| DecodeError::Overflow {
                register: reg.name.clone(),
            }),
        text => Ok(text),
    }
}

/// True when the value lies inside the register's declared plausible range.
pub fn in_range(reg: &Register, v: Decimal) -> bool {
    reg.min.is_none_or(|m| v >= m) && reg.max.is_none_or(|m| v <= m)
}

/// Why a value could not be encoded (simulator side).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("register '{register}': cannot encode {value}")]
pub struct EncodeError {
    pub register: String,
    pub value: String,
}

/// Encodes a final value into wire words: the exact inverse of [`decode`]
/// when the value is representable (used by the simulator and tests).
pub fn encode(reg: &Register, value: Decimal) -> Result<Vec<u16>, EncodeError> {
    let err = || EncodeError {
        register: reg.name.clone(),
        value: value.to_string(),
    };
    let raw = value
        .checked_sub(reg.offset)
        .and_then(|v| {
            if reg.scale.is_zero() {
                None
            } else {
                v.checked_div(reg.scale)
            }
        })
        .ok_or_else(err)?;
    let int = || {
        if raw.fract().is_zero() {
            Ok(raw)
        } else {
            Err(err())
        }
    };
    let bytes: Vec<u8> = match reg.data_type {
        DataType::Bool => return Ok(vec![u16::from(!raw.is_zero())]),
        DataType::U16 => int()?.to_u16().ok_or_else(err)?.to_be_bytes().to_vec(),
        DataType::I16 => int()?.to_i16().ok_or_else(err)?.to_be_bytes().to_vec(),
        DataType::U32 => int()?.to_u32().ok_or_else(err)?.to_be_bytes().to_vec(),
        DataType::I32 => int()?.to_i32().ok_or_else(err)?.to_be_bytes().to_vec(),
        DataType::U64 => int()?.to_u64().ok_or_else(err)?.to_be_bytes().to_vec(),
        DataType::I64 => int()?.to_i64().ok_or_else(err)?.to_be_bytes().to_vec(),
        DataType::F32 => raw.to_f32().ok_or_else(err)?.to_be_bytes().to_vec(),
        DataType::F64 => raw.to_f64().ok_or_else(err)?.to_be_bytes().to_vec(),
        DataType::String { words } => vec![0; usize::from(words) * 2],
    };
    Ok(wire_words(&bytes, reg.order))
}

/// Encodes text into a string register (simulator side).
pub fn encode_text(reg: &Register, text: &str) -> Vec<u16> {
    let mut b: Vec<u8> = text.bytes().take(usize::from(reg.words()) * 2).collect();
    b.resize(usize::from(reg.words()) * 2, 0);
    wire_words(&b, reg.order)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::modbus::regmap::{Area, DataType, Order, Register};
    use rust_decimal_macros::dec;

    fn reg(t: DataType, order: &str) -> Register {
        let mut r = Register::new("r", Area::Holding, 0, t);
        let w = if matches!(t, DataType::String { .. }) {
            1
        } else {
            t.words()
        };
        r.order = Order::parse(order, w).unwrap();
        r
    }

    fn num(r: &Register, w: &[u16]) -> Decimal {
        match decode(r, w).unwrap() {
            Value::Number(d) => d,
            Value::Text(t) => panic!("text {t}"),
        }
    }

    #[test]
    fn u32_in_all_four_orders_reads_the_same_number() {
        // 0x11223344 = 287454020
        let cases = [
            ("ABCD", [0x1122, 0x3344]),
            ("CDAB", [0x3344, 0x1122]),
            ("BADC", [0x2211, 0x4433]),
            ("DCBA", [0x4433, 0x2211]),
        ];
        for (o, w) in cases {
            assert_eq!(
                num(&reg(DataType::U32, o), &w),
                dec!(287454020),
                "order {o}"
            );
        }
    }

    #[test]
    fn i64_in_all_four_orders_reads_the_same_number() {
        let v: i64 = -0x0102_0304_0506_0708;
        for o in ["ABCDEFGH", "GHEFCDAB", "BADCFEHG", "HGFEDCBA"] {
            let r = reg(DataType::I64, o);
            let w = encode(&r, Decimal::from(v)).unwrap();
            assert_eq!(num(&r, &w), Decimal::from(v), "order {o}");
        }
        let big = reg(DataType::I64, "ABCDEFGH");
        assert_eq!(
            encode(&big, Decimal::from(v)).unwrap(),
            canonical_words(&v.to_be_bytes())
        );
    }

    fn canonical_words(b: &[u8]) -> Vec<u16> {
        b.chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect()
    }

    #[test]
    fn signed_16_bit_is_sign_extended() {
        assert_eq!(num(&reg(DataType::I16, "AB"), &[0xFFFE]), dec!(-2));
        assert_eq!(num(&reg(DataType::U16, "AB"), &[0xFFFE]), dec!(65534));
        assert_eq!(num(&reg(DataType::U16, "BA"), &[0x3412]), dec!(0x1234));
    }

    #[test]
    fn float_is_rounded_at_the_declared_precision() {
        let mut r = reg(DataType::F32, "ABCD");
        r.precision = 2;
        // 230.1f32 is 230.1000061...; two places give exactly 230.10
        let w = canonical_words(&230.1f32.to_be_bytes());
        assert_eq!(num(&r, &w), dec!(230.10));
        let mut r64 = reg(DataType::F64, "ABCDEFGH");
        r64.precision = 3;
        let w = canonical_words(&12345.6786f64.to_be_bytes());
        assert_eq!(num(&r64, &w), dec!(12345.679));
    }

    #[test]
    fn nan_and_infinity_are_typed_errors_naming_the_register() {
        let r = reg(DataType::F32, "ABCD");
        let nan = canonical_words(&f32::NAN.to_be_bytes());
        let e = decode(&r, &nan).unwrap_err();
        assert_eq!(e.kind(), "not_finite");
        assert!(e.to_string().contains("'r'"));
        let inf = canonical_words(&f32::NEG_INFINITY.to_be_bytes());
        assert!(matches!(
            decode(&r, &inf),
            Err(DecodeError::NotFinite { what: "-inf", .. })
        ));
    }

    #[test]
    fn huge_double_is_out_of_range_not_a_panic() {
        let r = reg(DataType::F64, "ABCDEFGH");
        let w = canonical_words(&1e300f64.to_be_bytes());
        assert_eq!(decode(&r, &w).unwrap_err().kind(), "out_of_range");
    }

    #[test]
    fn scale_and_offset_are_exact() {
        let mut r = reg(DataType::U32, "ABCD");
        r.scale = dec!(0.01);
        r.offset = dec!(-1.5);
        assert_eq!(num(&r, &[0x0001, 0x0000]), dec!(655.36) - dec!(1.5));
        let w = encode(&r, dec!(123.45)).unwrap();
        assert_eq!(num(&r, &w), dec!(123.45));
    }

    #[test]
    fn too_few_words_is_an_error() {
        assert_eq!(
            decode(&reg(DataType::U32, "ABCD"), &[1])
                .unwrap_err()
                .kind(),
            "short"
        );
    }

    #[test]
    fn strings_trim_padding_and_reject_non_ascii() {
        let r = reg(DataType::String { words: 3 }, "AB");
        assert_eq!(
            decode(&r, &encode_text(&r, "SN42")).unwrap(),
            Value::Text("SN42".into())
        );
        assert_eq!(decode(&r, &[0xC3A9, 0, 0]).unwrap_err().kind(), "bad_text");
    }

    #[test]
    fn encoding_a_fraction_into_an_integer_register_fails() {
        assert!(encode(&reg(DataType::U16, "AB"), dec!(1.5)).is_err());
        assert!(encode(&reg(DataType::U16, "AB"), dec!(70000)).is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_scaled_i32_survives_encode_then_decode_in_every_order(raw in proptest::num::i32::ANY, o in 0usize..4, places in 0u32..5) {
            let mut r = reg(DataType::I32, ["ABCD", "CDAB", "BADC", "DCBA"][o]);
            r.scale = Decimal::new(1, places);
            let v = Decimal::from(raw) * r.scale;
            let w = encode(&r, v).unwrap();
            proptest::prop_assert_eq!(decode(&r, &w).unwrap(), Value::Number(v));
        }

        #[test]
        fn arbitrary_words_never_panic(words in proptest::collection::vec(proptest::num::u16::ANY, 0..6), t in 0usize..9) {
            let types = [DataType::U16, DataType::I16, DataType::U32, DataType::I32, DataType::U64,
                DataType::I64, DataType::F32, DataType::F64, DataType::String { words: 3 }];
            let mut r = Register::new("r", Area::Holding, 0, types[t]);
            r.scale = Decimal::new(1, 28);
            let _ = decode(&r, &words);
        }
    }
}
