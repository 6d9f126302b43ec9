//! Byte-level Modbus framing for the read functions (0x01..0x04), used by the
//! simulator: request parsing, responses, MBAP (TCP) and RTU (CRC) frames.
//! Pure functions on byte slices.

use super::regmap::Area;

/// A read request PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadReq {
    pub area: Area,
    pub start: u16,
    pub count: u16,
}

/// Standard exception codes used here.
pub const ILLEGAL_FUNCTION: u8 = 0x01;
pub const ILLEGAL_DATA_ADDRESS: u8 = 0x02;
pub const ILLEGAL_DATA_VALUE: u8 = 0x03;
pub const SERVER_DEVICE_FAILURE: u8 = 0x04;
pub const GATEWAY_TARGET_FAILED: u8 = 0x0B;

/// Parses a request PDU (function code first). Errors are exception codes.
pub fn parse_read_request(pdu: &[u8]) -> Result<ReadReq, u8> {
    let fc = *pdu.first().ok_or(ILLEGAL_FUNCTION)?;
    let area = Area::from_function_code(fc).ok_or(ILLEGAL_FUNCTION)?;
    if pdu.len() != 5 {
        return Err(ILLEGAL_DATA_VALUE);
    }
    let start = u16::from_be_bytes([pdu[1], pdu[2]]);
    let count = u16::from_be_bytes([pdu[3], pdu[4]]);
    if count == 0 || count > area.max_per_request() {
        return Err(ILLEGAL_DATA_VALUE);
    }
    if u32::from(start) + u32::from(count) > 65536 {
        return Err(ILLEGAL_DATA_ADDRESS);
    }
    Ok(ReadReq { area, start, count })
}

/// Builds a read request PDU.
pub fn read_request(req: &ReadReq) -> Vec<u8> {
    let mut v = vec![req.area.function_code()];
    v.extend_from_slice(&req.start.to_be_bytes());
    v.extend_from_slice(&req.count.to_be_bytes());
    v
}

/// Response PDU for a register read.
pub fn words_response(fc: u8, words: &[u16]) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + words.len() * 2);
    v.push(fc);
    v.push((words.len() * 2) as u8);
    for w in words {
        v.extend_from_slice(&w.to_be_bytes());
    }
    v
}

/// Response PDU for a coil / discrete input read (LSB first packing).
pub fn bits_response(fc: u8, bits: &[bool]) -> Vec<u8> {
    let n = bits.len().div_ceil(8);
    let mut v = vec![fc, n as u8];
    v.resize(2 + n, 0);
    for (i, b) in bits.iter().enumerate() {
        if *b {
            v[2 + i / 8] |= 1 << (i % 8);
        }
    }
    v
}

/// Exception response PDU.
pub fn exception_response(fc: u8, code: u8) -> Vec<u8> {
    vec![fc | 0x80, code]
}

/// Length of the first complete MBAP frame in `buf`, if any.
pub fn tcp_frame_len(buf: &[u8]) -> Option<usize> {
    if buf.len() < 7 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([buf[4], buf[5]]));
    let total = 6 + len;
    (buf.len() >= total).then_some(total)
}

/// Splits an MBAP frame into (transaction id, unit id, pdu).
pub fn tcp_unwrap(frame: &[u8]) -> Option<(u16, u8, &[u8])> {
    if frame.len() < 8 || frame[2..4] != [0, 0] {
        return None;
    }
    Some((
        u16::from_be_bytes([frame[0], frame[1]]),
        frame[6],
        &frame[7..],
    ))
}

/// Wraps a PDU into an MBAP frame.
pub fn tcp_wrap(tid: u16, unit: u8, pdu: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(7 + pdu.len());
    v.extend_from_slice(&tid.to_be_bytes());
    v.extend_from_slice(&[0, 0]);
    v.extend_from_slice(&((pdu.len() + 1) as u16).to_be_bytes());
    v.push(unit);
    v.extend_from_slice(pdu);
    v
}

/// Modbus RTU CRC-16 (poly 0xA001, init 0xFFFF), sent low byte first.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for b in data {
        crc ^= u16::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// Wraps a PDU into an RTU frame (unit, pdu, CRC).
pub fn rtu_wrap(unit: u8, pdu: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(3 + pdu.len());
    v.push(unit);
    v.extend_from_slice(pdu);
    let crc = crc16(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

/// What the front of an RTU receive buffer holds (server side: requests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RtuScan {
    /// Need more bytes.
    Incomplete,
    /// A valid read request frame of this length: (len, unit, pdu range end).
    Frame { len: usize, unit: u8 },
    /// The first byte cannot start a valid frame: drop it and rescan.
    Skip,
}

/// Scans for a read request frame (all read requests are 8 bytes).
pub fn rtu_scan_request(buf: &[u8]) -> RtuScan {
    if buf.len() < 8 {
        return RtuScan::Incomplete;
    }
    let f = &buf[..8];
    let crc = u16::from_le_bytes([f[6], f[7]]);
    if crc16(&f[..6]) == crc {
        RtuScan::Frame { len: 8, unit: f[0] }
    } else {
        RtuScan::Skip
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_textbook_example() {
        // 01 03 00 00 00 0A -> CRC C5 CD
        let f = rtu_wrap(1, &[0x03, 0x00, 0x00, 0x00, 0x0A]);
        assert_eq!(&f[6..], &[0xC5, 0xCD]);
        assert_eq!(rtu_scan_request(&f), RtuScan::Frame { len: 8, unit: 1 });
    }

    #[test]
    fn corrupt_rtu_frame_is_skipped_not_parsed() {
        let mut f = rtu_wrap(1, &[0x03, 0x00, 0x00, 0x00, 0x0A]);
        f[3] ^= 0xFF;
        assert_eq!(rtu_scan_request(&f), RtuScan::Skip);
        assert_eq!(rtu_scan_request(&f[..5]), RtuScan::Incomplete);
    }

    #[test]
    fn mbap_round_trips() {
        let pdu = read_request(&ReadReq {
            area: Area::Input,
            start: 0x48,
            count: 4,
        });
        let frame = tcp_wrap(7, 3, &pdu);
        assert_eq!(tcp_frame_len(&frame), Some(frame.len()));
        assert_eq!(tcp_frame_len(&frame[..frame.len() - 1]), None);
        let (tid, unit, p) = tcp_unwrap(&frame).unwrap();
        assert_eq!((tid, unit), (7, 3));
        assert_eq!(
            parse_read_request(p),
            Ok(ReadReq {
                area: Area::Input,
                start: 0x48,
                count: 4
            })
        );
    }

    #[test]
    fn bad_requests_map_to_exception_codes() {
        assert_eq!(
            parse_read_request(&[0x06, 0, 0, 0, 1]),
            Err(ILLEGAL_FUNCTION)
        );
        assert_eq!(
            parse_read_request(&[0x03, 0, 0, 0, 126]),
            Err(ILLEGAL_DATA_VALUE)
        );
        assert_eq!(
            parse_read_request(&[0x03, 0xFF, 0xFF, 0, 2]),
            Err(ILLEGAL_DATA_ADDRESS)
        );
        assert_eq!(parse_read_request(&[]), Err(ILLEGAL_FUNCTION));
    }

    #[test]
    fn bits_pack_lsb_first() {
        assert_eq!(
            bits_response(
                1,
                &[true, false, true, false, false, false, false, false, true]
            ),
            vec![1, 2, 0b101, 1]
        );
        assert_eq!(exception_response(3, 2), vec![0x83, 2]);
        assert_eq!(words_response(3, &[0x1234]), vec![3, 2, 0x12, 0x34]);
    }
}
