//! Packed BCD as DL/T 645 sends it: lowest byte first, two digits per byte,
//! optional sign in the top bit of the top (last) byte.

use rust_decimal::Decimal;

/// A BCD field could not be decoded or encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BcdError {
    #[error("byte {byte:#04x} at offset {offset} is not packed BCD")]
    NotBcd { offset: usize, byte: u8 },
    #[error("value {value} does not fit in {digits} BCD digits")]
    Overflow { value: Decimal, digits: u32 },
    #[error("value {value} has more than {scale} decimals")]
    TooPrecise { value: Decimal, scale: u32 },
}

/// Decodes one packed BCD byte (0x42 -> 42).
#[inline]
pub fn byte_to_u8(b: u8) -> Option<u8> {
    let (hi, lo) = (b >> 4, b & 0x0F);
    if hi > 9 || lo > 9 {
        None
    } else {
        Some(hi * 10 + lo)
    }
}

/// Encodes 0..=99 as one packed BCD byte. Panics in debug builds on >99.
#[inline]
pub fn u8_to_byte(v: u8) -> u8 {
    debug_assert!(v < 100);
    ((v / 10) << 4) | (v % 10)
}

/// Decodes an unsigned integer from BCD bytes, lowest byte first.
#[inline]
pub fn decode_unsigned(bytes: &[u8]) -> Result<u64, BcdError> {
    let mut acc: u64 = 0;
    for (i, &b) in bytes.iter().enumerate().rev() {
        let v = byte_to_u8(b).ok_or(BcdError::NotBcd { offset: i, byte: b })?;
        acc = acc * 100 + v as u64;
    }
    Ok(acc)
}

/// Decodes a BCD number, lowest byte first, with `scale` implied decimals.
/// If `signed`, the top bit of the last byte is the sign (1 = negative).
#[inline]
pub fn decode_decimal(bytes: &[u8], scale: u32, signed: bool) -> Result<Decimal, BcdError> {
    let mut negative = false;
    let mut acc: i64 = 0;
    let last = bytes.len().wrapping_sub(1);
    for (i, &b) in bytes.iter().enumerate().rev() {
        let mut b = b;
        if signed && i == last && b & 0x80 != 0 {
            negative = true;
            b &= 0x7F;
        }
        let v = byte_to_u8(b).ok_or(BcdError::NotBcd { offset: i, byte: b })?;
        acc = acc * 100 + v as i64;
    }
    if negative {
        acc = -acc;
    }
    Ok(Decimal::new(acc, scale))
}

/// Encodes `value` into `len` BCD bytes (lowest first) with `scale` decimals.
/// Negative values need `signed` and leave the top digit at most 7.
pub fn encode_decimal(
    value: Decimal,
    len: usize,
    scale: u32,
    signed: bool,
    out: &mut Vec<u8>,
) -> Result<(), BcdError> {
    let digits = (len * 2) as u32;
    if value.round_dp(scale) != value {
        return Err(BcdError::TooPrecise { value, scale });
    }
    let mut v = value;
    v.rescale(scale);
    let mantissa = v.mantissa();
    let negative = mantissa < 0;
    if negative && !signed {
        return Err(BcdError::Overflow { value, digits });
    }
    let mut m = mantissa.unsigned_abs();
    let limit: u128 = if signed {
        8 * 10u128.pow(digits - 1)
    } else {
        10u128.pow(digits)
    };
    if m >= limit {
        return Err(BcdError::Overflow { value, digits });
    }
    let start = out.len();
    for _ in 0..len {
        out.push(u8_to_byte((m % 100) as u8));
        m /= 100;
    }
    if negative {
        out[start + len - 1] |= 0x80;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn decodes_energy_lowest_byte_first() {
        // 000000.04 kWh as the verified vector carries it.
        assert_eq!(
            decode_decimal(&[0x04, 0, 0, 0], 2, false).unwrap(),
            dec!(0.04)
        );
        // 009580.15 kWh from the 1997 vector.
        assert_eq!(
            decode_decimal(&[0x15, 0x80, 0x95, 0x00], 2, false).unwrap(),
            dec!(9580.15)
        );
    }

    #[test]
    fn sign_bit_is_top_bit_of_last_byte() {
        assert_eq!(
            decode_decimal(&[0x00, 0x50, 0x81], 4, true).unwrap(),
            dec!(-1.5000)
        );
        let mut out = vec![];
        encode_decimal(dec!(-1.5), 3, 4, true, &mut out).unwrap();
        assert_eq!(out, vec![0x00, 0x50, 0x81]);
    }

    #[test]
    fn rejects_non_bcd_and_overflow() {
        assert!(matches!(
            decode_decimal(&[0x0A], 0, false),
            Err(BcdError::NotBcd { .. })
        ));
        let mut out = vec![];
        assert!(encode_decimal(dec!(1000000), 4, 2, false, &mut out).is_err());
        assert!(encode_decimal(dec!(0.001), 4, 2, false, &mut out).is_err());
        assert!(encode_decimal(dec!(-1), 4, 2, false, &mut out).is_err());
        assert!(encode_decimal(dec!(800000), 4, 2, true, &mut out).is_err());
        assert!(encode_decimal(dec!(799999.99), 4, 2, true, &mut out).is_ok());
    }
}
