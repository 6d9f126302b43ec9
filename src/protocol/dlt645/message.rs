//! Requests and replies on top of frames: read (2007 0x11 / 1997 0x01),
//! follow-up reads (0x12 / 1997 0x02), read address (0x13), broadcast time
//! sync (0x08), write data (0x14) and relay control (0x1C); error replies and
//! the matching rule that keeps a late reply from being taken for another's.

use std::fmt;
use std::str::FromStr;

use super::catalogue::{Di, Edition, Format, MeterTime, Value, ValueError};
use super::frame::{control, Address, Frame, FrameRef, DATA_OFFSET};

/// The status byte of an error reply (control | 0x40).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorStatus(pub u8);

impl ErrorStatus {
    const BITS: [&'static str; 7] = [
        "other error",
        "no requested data",
        "password wrong or not authorised",
        "baud rate cannot be changed",
        "too many year zones",
        "too many day periods",
        "too many tariffs",
    ];

    pub fn other(self) -> bool {
        self.0 & 0x01 != 0
    }
    pub fn no_data(self) -> bool {
        self.0 & 0x02 != 0
    }
    pub fn unauthorised(self) -> bool {
        self.0 & 0x04 != 0
    }
    pub fn bad_baud(self) -> bool {
        self.0 & 0x08 != 0
    }
    pub fn too_many_year_zones(self) -> bool {
        self.0 & 0x10 != 0
    }
    pub fn too_many_day_periods(self) -> bool {
        self.0 & 0x20 != 0
    }
    pub fn too_many_tariffs(self) -> bool {
        self.0 & 0x40 != 0
    }

    /// Names of the bits set.
    pub fn reasons(self) -> Vec<&'static str> {
        (0..7)
            .filter(|b| self.0 & (1 << b) != 0)
            .map(|b| Self::BITS[b])
            .collect()
    }
}

impl fmt::Display for ErrorStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.reasons();
        if r.is_empty() {
            write!(f, "error status {:#04x}", self.0)
        } else {
            write!(f, "{} (status {:#04x})", r.join(", "), self.0)
        }
    }
}

impl fmt::Debug for ErrorStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ErrorStatus({self})")
    }
}

/// A reply that is not a usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("meter refused: {0}")]
    Meter(ErrorStatus),
    #[error("reply too short for its kind ({0} DATA bytes)")]
    TooShort(usize),
    #[error("follow-up frame has sequence {got}, expected {expected}")]
    WrongSequence { expected: u8, got: u8 },
    #[error("follow-up frame is for DI {got}, expected {expected}")]
    WrongDi { expected: Di, got: Di },
    #[error("too many follow-up frames (limit {0})")]
    TooManyFrames(usize),
    #[error(transparent)]
    Value(#[from] ValueError),
}

/// How a received frame relates to the request in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match {
    /// The normal reply to this request.
    Answer,
    /// This meter's error reply to this request.
    Refused(ErrorStatus),
    /// Not ours: an echo of a request, another meter's or a late reply, another DI.
    Stray(StrayReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrayReason {
    NotAReply,
    OtherFunction,
    OtherAddress,
    OtherDi,
}

impl fmt::Display for StrayReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StrayReason::NotAReply => "not a reply (echo or another master's request)",
            StrayReason::OtherFunction => "reply to another kind of request",
            StrayReason::OtherAddress => "reply from another address",
            StrayReason::OtherDi => "reply for another data identifier",
        })
    }
}

/// Decides whether `reply` answers `request`: same function, same (or
/// wildcard-selected) address and, for reads, the same DI. Order alone never
/// decides: a late reply from the previous meter is `Stray`. Error replies
/// carry no DI, so a late refusal from the same meter would match: the bus
/// discards whatever arrived before a request was sent.
pub fn classify(request: &Frame, reply: &FrameRef<'_>) -> Match {
    if !control::is_reply(reply.control) {
        return Match::Stray(StrayReason::NotAReply);
    }
    if control::function(reply.control) != control::function(request.control) {
        return Match::Stray(StrayReason::OtherFunction);
    }
    if !request.address.selects(&reply.address) {
        return Match::Stray(StrayReason::OtherAddress);
    }
    if control::is_error(reply.control) {
        let status = if reply.data_len() > 0 {
            reply.data(0)
        } else {
            0
        };
        return Match::Refused(ErrorStatus(status));
    }
    let f = control::function(request.control);
    let carries_di = matches!(
        f,
        control::READ | control::READ_FOLLOW | control::READ_1997 | control::READ_FOLLOW_1997
    );
    if carries_di {
        let n = if f == control::READ || f == control::READ_FOLLOW {
            4
        } else {
            2
        };
        // One bounds check, then a plain compare (the reply's DI carries the +0x33 offset).
        let (Some(got), Some(want)) = (reply.raw_data.get(..n), request.data.get(..n)) else {
            return Match::Stray(StrayReason::OtherDi);
        };
        if got
            .iter()
            .zip(want)
            .any(|(&g, &w)| g.wrapping_sub(DATA_OFFSET) != w)
        {
            return Match::Stray(StrayReason::OtherDi);
        }
    }
    Match::Answer
}

/// Read one DI (2007: 0x11, 1997: 0x01).
pub fn read_request(address: Address, di: Di) -> Frame {
    let mut data = Vec::with_capacity(4);
    di.write(&mut data);
    let c = match di.edition {
        Edition::V2007 => control::READ,
        Edition::V1997 => control::READ_1997,
    };
    Frame::new(address, c, data)
}

/// Read the comm address of the only meter on the bus (0x13 to `AA..AA`).
pub fn read_address_request() -> Frame {
    Frame::new(Address::WILDCARD, control::READ_ADDRESS, vec![])
}

/// Broadcast time sync (0x08 to `99..99`), `YYMMDDhhmmss` sent seconds first. Nobody answers.
pub fn time_sync_request(t: MeterTime) -> Frame {
    let mut data = Vec::with_capacity(6);
    t.write_yymmddhhmmss(&mut data);
    Frame::new(Address::BROADCAST, control::TIME_SYNC, data)
}

/// A password: privilege level PA and a 6-digit code, written `PA` + code
/// (`02123456` = level 02, code 123456) and sent `PA P0 P1 P2` (code lowest byte first).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Password {
    pub level: u8,
    pub code: [u8; 3],
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Password(level {:02X}, ******)", self.level)
    }
}

impl FromStr for Password {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = hex::decode(s.trim())
            .ok()
            .filter(|b| b.len() == 4)
            .ok_or_else(|| {
                "password must be 8 hex digits: level PA then the 6-digit code".to_string()
            })?;
        Ok(Password {
            level: b[0],
            code: [b[3], b[2], b[1]],
        })
    }
}

impl Password {
    fn write(&self, out: &mut Vec<u8>) {
        out.push(self.level);
        out.extend_from_slice(&self.code);
    }
}

/// The operator code (4 bytes, written as 8 hex digits, sent lowest byte first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Operator(pub u32);

impl FromStr for Operator {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 8 {
            return Err("operator code must be 8 hex digits".into());
        }
        u32::from_str_radix(s, 16)
            .map(Operator)
            .map_err(|_| "operator code must be 8 hex digits".into())
    }
}

impl fmt::Display for Operator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08X}", self.0)
    }
}

/// Write data (2007 0x14): DI, password, operator code, value bytes.
pub fn write_request(
    address: Address,
    di: Di,
    password: Password,
    operator: Operator,
    value: &[u8],
) -> Frame {
    let mut data = Vec::with_capacity(12 + value.len());
    di.write(&mut data);
    password.write(&mut data);
    data.extend_from_slice(&operator.0.to_le_bytes());
    data.extend_from_slice(value);
    Frame::new(address, control::WRITE, data)
}

/// Relay control commands (0x1C, byte N1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RelayCommand {
    Trip,
    AllowClose,
    DirectClose,
    AlarmOn,
    AlarmOff,
    ProtectOn,
    ProtectOff,
}

impl RelayCommand {
    pub const ALL: [RelayCommand; 7] = [
        RelayCommand::Trip,
        RelayCommand::AllowClose,
        RelayCommand::DirectClose,
        RelayCommand::AlarmOn,
        RelayCommand::AlarmOff,
        RelayCommand::ProtectOn,
        RelayCommand::ProtectOff,
    ];

    pub fn code(self) -> u8 {
        match self {
            RelayCommand::Trip => 0x1A,
            RelayCommand::AllowClose => 0x1B,
            RelayCommand::DirectClose => 0x1C,
            RelayCommand::AlarmOn => 0x2A,
            RelayCommand::AlarmOff => 0x2B,
            RelayCommand::ProtectOn => 0x3A,
            RelayCommand::ProtectOff => 0x3B,
        }
    }

    pub fn from_code(c: u8) -> Option<RelayCommand> {
        Self::ALL.into_iter().find(|r| r.code() == c)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RelayCommand::Trip => "trip",
            RelayCommand::AllowClose => "allow-close",
            RelayCommand::DirectClose => "direct-close",
            RelayCommand::AlarmOn => "alarm-on",
            RelayCommand::AlarmOff => "alarm-off",
            RelayCommand::ProtectOn => "protect-on",
            RelayCommand::ProtectOff => "protect-off",
        }
    }
}

impl fmt::Display for RelayCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RelayCommand {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|r| r.as_str()).collect();
                format!("unknown relay command '{s}' (one of {})", names.join(", "))
            })
    }
}

/// Relay control (0x1C). DATA: `PA P0 P1 P2`, operator `C0..C3`, N1 command,
/// N2 reserved (00), N3..N8 expiry `ss mm hh DD MM YY`. Check against your
/// meters' manual before sending to real meters.
pub fn relay_request(
    address: Address,
    command: RelayCommand,
    password: Password,
    operator: Operator,
    expiry: MeterTime,
) -> Frame {
    let mut data = Vec::with_capacity(16);
    password.write(&mut data);
    data.extend_from_slice(&operator.0.to_le_bytes());
    data.push(command.code());
    data.push(0x00);
    expiry.write_yymmddhhmmss(&mut data);
    Frame::new(address, control::RELAY, data)
}

/// Parsed relay-control DATA (used by the simulator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayRequest {
    pub password: Password,
    pub operator: Operator,
    pub command: Option<RelayCommand>,
    pub command_byte: u8,
    pub expiry: MeterTime,
}

pub fn parse_relay_request(data: &[u8]) -> Option<RelayRequest> {
    if data.len() < 16 {
        return None;
    }
    let bcd = |b: u8| super::bcd::byte_to_u8(b);
    Some(RelayRequest {
        password: Password {
            level: data[0],
            code: [data[1], data[2], data[3]],
        },
        operator: Operator(u32::from_le_bytes([data[4], data[5], data[6], data[7]])),
        command: RelayCommand::from_code(data[8]),
        command_byte: data[8],
        expiry: MeterTime {
            second: bcd(data[10])?,
            minute: bcd(data[11])?,
            hour: bcd(data[12])?,
            day: bcd(data[13])?,
            month: bcd(data[14])?,
            year: 2000 + bcd(data[15])? as u16,
        },
    })
}

/// The value bytes of a read reply (DI stripped, offset removed), on the stack.
#[derive(Clone, Copy)]
pub struct Payload {
    len: u8,
    bytes: [u8; 255],
}

impl Payload {
    /// Value bytes of a normal read reply to `di` (the reply must be an `Answer`).
    #[inline]
    pub fn of_read_reply(reply: &FrameRef<'_>, di: Di) -> Payload {
        let skip = di.wire_len().min(reply.raw_data.len());
        let raw = &reply.raw_data[skip..];
        let mut bytes = [0u8; 255];
        for (o, &b) in bytes.iter_mut().zip(raw) {
            *o = b.wrapping_sub(DATA_OFFSET);
        }
        Payload {
            len: raw.len() as u8,
            bytes,
        }
    }

    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

/// Decodes the value of a normal read reply with the given format.
#[inline]
pub fn decode_read_value(
    reply: &FrameRef<'_>,
    di: Di,
    format: Format,
) -> Result<Value, ValueError> {
    // Fast path for the common single number: no 255-byte payload copy and
    // straight to the BCD decoder (same result as `format.decode`).
    if let Format::Bcd { len, scale, signed } = format {
        let len = len as usize;
        let skip = di.wire_len().min(reply.raw_data.len());
        let raw = &reply.raw_data[skip..];
        let mut small = [0u8; 8];
        if len <= small.len() && raw.len() >= len {
            for (o, &b) in small.iter_mut().zip(&raw[..len]) {
                *o = b.wrapping_sub(DATA_OFFSET);
            }
            let v = super::bcd::decode_decimal(&small[..len], scale as u32, signed)?;
            return Ok(Value::Number(v));
        }
    }
    let p = Payload::of_read_reply(reply, di);
    format.decode(p.as_slice())
}

/// Assembles a read answer spread over follow-up frames (0xB1 then 0x12 / 0x92, 0xB2).
#[derive(Debug, Clone)]
pub struct FollowUp {
    address: Address,
    di: Di,
    data: Vec<u8>,
    next_seq: u8,
    complete: bool,
    frames: usize,
}

impl FollowUp {
    /// Most follow-up frames accepted for one answer.
    pub const MAX_FRAMES: usize = 64;

    /// Starts from the first reply (an `Answer` to `read_request(address, di)`).
    pub fn start(address: Address, di: Di, first: &Frame) -> FollowUp {
        let skip = di.wire_len().min(first.data.len());
        let data = first.data[skip..].to_vec();
        FollowUp {
            address,
            di,
            data,
            next_seq: 1,
            complete: !control::has_more(first.control),
            frames: 1,
        }
    }

    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// The request for the next follow-up frame, if more is to come.
    pub fn next_request(&self) -> Option<Frame> {
        if self.complete {
            return None;
        }
        let mut data = Vec::with_capacity(5);
        self.di.write(&mut data);
        let c = match self.di.edition {
            Edition::V2007 => {
                data.push(self.next_seq);
                control::READ_FOLLOW
            }
            Edition::V1997 => control::READ_FOLLOW_1997,
        };
        Some(Frame::new(self.address, c, data))
    }

    /// Adds a follow-up reply (an `Answer` to `next_request()`).
    pub fn push(&mut self, reply: &Frame) -> Result<(), ReplyError> {
        if self.frames >= Self::MAX_FRAMES {
            return Err(ReplyError::TooManyFrames(Self::MAX_FRAMES));
        }
        let n = self.di.wire_len();
        let body = &reply.data;
        if body.len() < n {
            return Err(ReplyError::TooShort(body.len()));
        }
        let got = Di::read(self.di.edition, body).expect("length checked");
        if got != self.di {
            return Err(ReplyError::WrongDi {
                expected: self.di,
                got,
            });
        }
        let mut payload = &body[n..];
        if self.di.edition == Edition::V2007 {
            let (&seq, rest) = payload
                .split_last()
                .ok_or(ReplyError::TooShort(body.len()))?;
            if seq != self.next_seq {
                return Err(ReplyError::WrongSequence {
                    expected: self.next_seq,
                    got: seq,
                });
            }
            payload = rest;
        }
        self.data.extend_from_slice(payload);
        self.next_seq = self.next_seq.wrapping_add(1);
        self.frames += 1;
        self.complete = !control::has_more(reply.control);
        Ok(())
    }

    /// The assembled value bytes (offset removed).
    pub fn data(&self) -> &[u8] {
        &self.data
    }
}

/// Builds the normal read reply a meter sends (used by the simulator and tests).
pub fn read_reply(address: Address, di: Di, value: &[u8], more: bool) -> Frame {
    let mut data = Vec::with_capacity(di.wire_len() + value.len());
    di.write(&mut data);
    data.extend_from_slice(value);
    let base = match di.edition {
        Edition::V2007 => control::READ,
        Edition::V1997 => control::READ_1997,
    };
    let c = base | control::REPLY | if more { control::MORE } else { 0 };
    Frame::new(address, c, data)
}

/// Builds a follow-up reply (2007: DI, value part, sequence number).
pub fn follow_reply(address: Address, di: Di, part: &[u8], seq: u8, more: bool) -> Frame {
    let mut data = Vec::with_capacity(di.wire_len() + part.len() + 1);
    di.write(&mut data);
    data.extend_from_slice(part);
    let base = match di.edition {
        Edition::V2007 => {
            data.push(seq);
            control::READ_FOLLOW
        }
        Edition::V1997 => control::READ_FOLLOW_1997,
    };
    Frame::new(
        address,
        base | control::REPLY | if more { control::MORE } else { 0 },
        data,
    )
}

/// Builds an error reply to `request_control` with `status`.
pub fn error_reply(address: Address, request_control: u8, status: ErrorStatus) -> Frame {
    Frame::new(
        address,
        control::function(request_control) | control::REPLY | control::ERROR,
        vec![status.0],
    )
}

/// Reply to read-address (0x93 with the address as DATA).
pub fn read_address_reply(address: Address) -> Frame {
    Frame::new(
        address,
        control::READ_ADDRESS | control::REPLY,
        address.0.to_vec(),
    )
}
