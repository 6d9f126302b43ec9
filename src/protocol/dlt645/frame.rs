//! The DL/T 645 frame, shared by the 1997 and 2007 editions:
//!
//! ```text
//! [FE x 0..4]  68  A0..A5  68  C  L  DATA(L)  CS  16
//! ```
//!
//! [`decode`] finds the next frame in a byte stream, skipping the FE preamble
//! and any line noise before it; [`Frame::encode`] writes one.

use std::fmt;
use std::str::FromStr;

pub const START: u8 = 0x68;
pub const END: u8 = 0x16;
pub const PREAMBLE: u8 = 0xFE;
/// Added to every DATA byte on the wire.
pub const DATA_OFFSET: u8 = 0x33;
/// Bytes of a frame besides its DATA: 68, 6 address, 68, C, L, CS, 16.
pub const OVERHEAD: usize = 12;

/// A meter address: 12 BCD digits, stored lowest byte first as on the wire.
/// A byte `AA` is a wildcard (all-`AA` reads the address of the only meter on a bus).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address(pub [u8; 6]);

impl Address {
    /// Matches any meter (read comm address, 0x13).
    pub const WILDCARD: Address = Address([0xAA; 6]);
    /// Every meter; nobody answers (broadcast time sync, 0x08).
    pub const BROADCAST: Address = Address([0x99; 6]);

    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }

    /// True if any byte is the `AA` wildcard.
    pub fn has_wildcard(&self) -> bool {
        self.0.contains(&0xAA)
    }

    /// Does a meter whose address is `meter` answer a request sent to `self`?
    pub fn selects(&self, meter: &Address) -> bool {
        self.0
            .iter()
            .zip(meter.0.iter())
            .all(|(&a, &m)| a == 0xAA || a == m)
    }

    /// The address whose nameplate number is `n` (mod 10^12): handy for generated fleets.
    pub fn from_index(n: usize) -> Address {
        let mut out = [0u8; 6];
        let mut n = n as u64 % 1_000_000_000_000;
        for b in out.iter_mut() {
            *b = super::bcd::u8_to_byte((n % 100) as u8);
            n /= 100;
        }
        Address(out)
    }

    /// The 12-digit nameplate form, most significant digits first.
    pub fn digits(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0.iter().rev() {
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Address({self})")
    }
}

/// An address string that is not 1..12 decimal digits (or `AA` wildcard pairs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid DL/T 645 address '{0}': expected up to 12 decimal digits (nameplate number), `AA` pairs allowed as wildcard")]
pub struct AddressError(pub String);

impl FromStr for Address {
    type Err = AddressError;
    /// Parses the nameplate form (`398192000337`); shorter numbers are padded
    /// with leading zeros, `AA` pairs are wildcards.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || AddressError(s.to_string());
        let t: String = s.chars().filter(|c| *c != ' ' && *c != '_').collect();
        if t.is_empty() || t.len() > 12 {
            return Err(err());
        }
        let padded = format!("{t:0>12}");
        let b = padded.as_bytes();
        let mut out = [0u8; 6];
        for i in 0..6 {
            let pair = &b[i * 2..i * 2 + 2];
            let v = if pair.eq_ignore_ascii_case(b"AA") {
                0xAA
            } else if pair.iter().all(u8::is_ascii_digit) {
                ((pair[0] - b'0') << 4) | (pair[1] - b'0')
            } else {
                return Err(err());
            };
            out[5 - i] = v;
        }
        Ok(Address(out))
    }
}

impl serde::Serialize for Address {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for Address {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Control code helpers (bit 7 reply, bit 6 error, bit 5 more follows, bits 0..4 function).
pub mod control {
    pub const TIME_SYNC: u8 = 0x08;
    pub const READ: u8 = 0x11;
    pub const READ_FOLLOW: u8 = 0x12;
    pub const READ_ADDRESS: u8 = 0x13;
    pub const WRITE: u8 = 0x14;
    pub const WRITE_ADDRESS: u8 = 0x15;
    pub const FREEZE: u8 = 0x16;
    pub const CHANGE_BAUD: u8 = 0x17;
    pub const RELAY: u8 = 0x1C;
    /// DL/T 645-1997 read data.
    pub const READ_1997: u8 = 0x01;
    /// DL/T 645-1997 read follow-up data.
    pub const READ_FOLLOW_1997: u8 = 0x02;
    /// DL/T 645-1997 write data.
    pub const WRITE_1997: u8 = 0x04;

    pub const REPLY: u8 = 0x80;
    pub const ERROR: u8 = 0x40;
    pub const MORE: u8 = 0x20;

    /// The function part of a control code (request code of a reply).
    #[inline]
    pub fn function(c: u8) -> u8 {
        c & 0x1F
    }
    #[inline]
    pub fn is_reply(c: u8) -> bool {
        c & REPLY != 0
    }
    #[inline]
    pub fn is_error(c: u8) -> bool {
        c & ERROR != 0
    }
    #[inline]
    pub fn has_more(c: u8) -> bool {
        c & MORE != 0
    }
}

/// A decoded frame borrowing its DATA from the input buffer.
/// `raw_data` is as on the wire (each byte still +0x33).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRef<'a> {
    pub address: Address,
    pub control: u8,
    pub raw_data: &'a [u8],
}

impl<'a> FrameRef<'a> {
    /// DATA byte `i` with the 0x33 offset removed.
    #[inline]
    pub fn data(&self, i: usize) -> u8 {
        self.raw_data[i].wrapping_sub(DATA_OFFSET)
    }

    pub fn data_len(&self) -> usize {
        self.raw_data.len()
    }

    /// DATA bytes `range` with the offset removed, into `out`.
    pub fn data_into(&self, range: std::ops::Range<usize>, out: &mut Vec<u8>) {
        out.extend(
            self.raw_data[range]
                .iter()
                .map(|b| b.wrapping_sub(DATA_OFFSET)),
        );
    }

    pub fn to_frame(&self) -> Frame {
        let mut data = Vec::with_capacity(self.raw_data.len());
        self.data_into(0..self.raw_data.len(), &mut data);
        Frame {
            address: self.address,
            control: self.control,
            data,
        }
    }
}

/// An owned frame; `data` holds the real values (offset removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub address: Address,
    pub control: u8,
    pub data: Vec<u8>,
}

/// A frame cannot carry more than 255 DATA bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("DATA of {0} bytes does not fit in one frame (max 255)")]
pub struct TooLong(pub usize);

impl Frame {
    pub fn new(address: Address, control: u8, data: Vec<u8>) -> Frame {
        Frame {
            address,
            control,
            data,
        }
    }

    /// Size on the wire without preamble.
    pub fn wire_len(&self) -> usize {
        OVERHEAD + self.data.len()
    }

    /// Appends the frame to `out`, preceded by `preamble` FE bytes.
    pub fn encode_into(&self, preamble: usize, out: &mut Vec<u8>) -> Result<(), TooLong> {
        if self.data.len() > 255 {
            return Err(TooLong(self.data.len()));
        }
        out.extend(std::iter::repeat_n(PREAMBLE, preamble));
        let start = out.len();
        out.push(START);
        out.extend_from_slice(&self.address.0);
        out.push(START);
        out.push(self.control);
        out.push(self.data.len() as u8);
        out.extend(self.data.iter().map(|b| b.wrapping_add(DATA_OFFSET)));
        let cs = checksum(&out[start..]);
        out.push(cs);
        out.push(END);
        Ok(())
    }

    /// The frame on the wire with `preamble` FE bytes in front.
    pub fn encode(&self, preamble: usize) -> Result<Vec<u8>, TooLong> {
        let mut out = Vec::with_capacity(preamble + self.wire_len());
        self.encode_into(preamble, &mut out)?;
        Ok(out)
    }
}

/// Sum of the bytes mod 256 (the CS byte).
#[inline]
pub fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b))
}

/// A complete frame whose framing is right but whose content is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("checksum mismatch: frame says {found:#04x}, bytes sum to {computed:#04x}")]
    BadChecksum { found: u8, computed: u8 },
    #[error("end byte is {0:#04x}, expected 0x16")]
    BadEnd(u8),
}

/// What [`decode`] found at the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A valid frame. Drop `consumed` bytes (it includes the `skipped` bytes before it).
    Frame {
        frame: FrameRef<'a>,
        consumed: usize,
        skipped: usize,
        noise: usize,
    },
    /// No complete frame yet. The first `skipped` bytes can never start one and may be dropped.
    Incomplete { skipped: usize, noise: usize },
    /// A frame-shaped run of bytes that failed its checks. Drop `consumed` bytes
    /// (the candidate itself and what came before it); `bytes` is the offending candidate.
    Invalid {
        error: FrameError,
        consumed: usize,
        noise: usize,
        bytes: &'a [u8],
    },
}

/// Examines a candidate frame starting at `i` (buf[i] == 0x68).
enum Candidate<'a> {
    NotAFrame,
    Incomplete,
    Valid(FrameRef<'a>, usize),
    Invalid(FrameError, usize),
}

#[inline]
fn candidate(buf: &[u8], i: usize) -> Candidate<'_> {
    let rest = &buf[i..];
    if rest.len() < 10 {
        // Check the second start byte early when we can.
        if rest.len() >= 8 && rest[7] != START {
            return Candidate::NotAFrame;
        }
        return Candidate::Incomplete;
    }
    if rest[7] != START {
        return Candidate::NotAFrame;
    }
    let len = rest[9] as usize;
    let total = OVERHEAD + len;
    if rest.len() < total {
        return Candidate::Incomplete;
    }
    let end = rest[total - 1];
    if end != END {
        return Candidate::Invalid(FrameError::BadEnd(end), total);
    }
    let computed = checksum(&rest[..10 + len]);
    let found = rest[10 + len];
    if computed != found {
        return Candidate::Invalid(FrameError::BadChecksum { found, computed }, total);
    }
    let mut address = [0u8; 6];
    address.copy_from_slice(&rest[1..7]);
    Candidate::Valid(
        FrameRef {
            address: Address(address),
            control: rest[8],
            raw_data: &rest[10..10 + len],
        },
        total,
    )
}

/// Finds the next frame in `buf`, skipping FE preamble bytes and line noise.
///
/// Never panics, whatever the input. A candidate start whose second 0x68 is
/// missing is treated as noise. A candidate with a bad end byte is reported as
/// [`Decoded::Invalid`] but only its start byte is consumed (the real frame may
/// begin inside it); one with a bad checksum but a good end byte is consumed whole.
/// If a candidate is incomplete but a complete valid frame starts later in the
/// buffer, the candidate was noise and the later frame is returned.
pub fn decode(buf: &[u8]) -> Decoded<'_> {
    let mut i = 0;
    let mut noise = 0;
    while i < buf.len() {
        // Jump to the next start byte in one scan; FE preamble is not noise.
        let k = buf[i..]
            .iter()
            .position(|&b| b == START)
            .unwrap_or(buf.len() - i);
        if k > 0 {
            noise += buf[i..i + k].iter().filter(|&&b| b != PREAMBLE).count();
            i += k;
            if i == buf.len() {
                break;
            }
        }
        match candidate(buf, i) {
            Candidate::NotAFrame => {
                noise += 1;
                i += 1;
            }
            Candidate::Valid(frame, total) => {
                return Decoded::Frame {
                    frame,
                    consumed: i + total,
                    skipped: i,
                    noise,
                };
            }
            Candidate::Invalid(error, total) => {
                let consumed = match error {
                    FrameError::BadEnd(_) => i + 1,
                    FrameError::BadChecksum { .. } => i + total,
                };
                return Decoded::Invalid {
                    error,
                    consumed,
                    noise,
                    bytes: &buf[i..i + total],
                };
            }
            Candidate::Incomplete => {
                // A complete frame further on means this start was noise.
                if let Some(j) = later_valid_frame(buf, i + 1) {
                    let extra_noise = buf[i..j].iter().filter(|&&b| b != PREAMBLE).count();
                    if let Candidate::Valid(frame, total) = candidate(buf, j) {
                        return Decoded::Frame {
                            frame,
                            consumed: j + total,
                            skipped: j,
                            noise: noise + extra_noise,
                        };
                    }
                }
                return Decoded::Incomplete { skipped: i, noise };
            }
        }
    }
    Decoded::Incomplete {
        skipped: buf.len(),
        noise,
    }
}

fn later_valid_frame(buf: &[u8], from: usize) -> Option<usize> {
    let mut j = from;
    while j < buf.len() {
        if buf[j] == START {
            if let Candidate::Valid(..) = candidate(buf, j) {
                return Some(j);
            }
        }
        j += 1;
    }
    None
}

/// Hex for logs: `68 37 03 ...`.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 3);
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(&format!("{b:02X}"));
    }
    s
}

/// Parses hex with optional spaces (`68 37 03` or `683703`), for tests and tools.
pub fn parse_hex(s: &str) -> Option<Vec<u8>> {
    let t: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    hex::decode(t).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_nameplate_round_trip() {
        let a: Address = "398192000337".parse().unwrap();
        assert_eq!(a.0, [0x37, 0x03, 0x00, 0x92, 0x81, 0x39]);
        assert_eq!(a.to_string(), "398192000337");
        let short: Address = "414".parse().unwrap();
        assert_eq!(short.to_string(), "000000000414");
        assert!("39819200033X".parse::<Address>().is_err());
        assert!("1234567890123".parse::<Address>().is_err());
        let wild: Address = "AAAAAAAAAAAA".parse().unwrap();
        assert_eq!(wild, Address::WILDCARD);
        assert!(wild.selects(&a));
        let partial: Address = "AAAA92000337".parse().unwrap();
        assert!(partial.selects(&"398192000337".parse().unwrap()));
        assert!(!partial.selects(&"398193000337".parse().unwrap()));
        assert_eq!(Address::from_index(398192000337), a);
    }

    #[test]
    fn decode_handles_truncation_everywhere() {
        let f = Frame::new(
            "398192000337".parse().unwrap(),
            0x91,
            vec![0, 0, 1, 0, 4, 0, 0, 0],
        );
        let wire = f.encode(4).unwrap();
        for cut in 0..wire.len() {
            assert!(
                matches!(decode(&wire[..cut]), Decoded::Incomplete { .. }),
                "cut {cut}"
            );
        }
        assert!(matches!(decode(&wire), Decoded::Frame { .. }));
    }

    #[test]
    fn bad_checksum_consumes_frame_and_reports_hex() {
        let f = Frame::new(
            "398192000337".parse().unwrap(),
            0x91,
            vec![0, 0, 1, 0, 4, 0, 0, 0],
        );
        let mut wire = f.encode(0).unwrap();
        let n = wire.len();
        wire[n - 2] ^= 0xFF;
        match decode(&wire) {
            Decoded::Invalid {
                error: FrameError::BadChecksum { .. },
                consumed,
                bytes,
                ..
            } => {
                assert_eq!(consumed, n);
                assert_eq!(bytes.len(), n);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn noise_with_fake_start_does_not_hide_a_later_frame() {
        let f = Frame::new(
            "000000000001".parse().unwrap(),
            0x93,
            vec![1, 0, 0, 0, 0, 0],
        );
        // A fake header claiming 200 bytes of data, then a real frame.
        let mut buf = vec![0x00, 0x68, 1, 2, 3, 4, 5, 6, 0x68, 0x91, 200, 0x55];
        buf.extend(f.encode(2).unwrap());
        match decode(&buf) {
            Decoded::Frame {
                frame, consumed, ..
            } => {
                assert_eq!(frame.to_frame(), f);
                assert_eq!(consumed, buf.len());
            }
            other => panic!("{other:?}"),
        }
    }
}
