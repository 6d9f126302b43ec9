//! The verified vectors from `shared/reference/dlt645.md` and property tests.

use proptest::prelude::*;
use rust_decimal_macros::dec;

use super::frame::{control, parse_hex};
use super::message::*;
use super::*;

fn h(s: &str) -> Vec<u8> {
    parse_hex(s).unwrap()
}

fn only_frame(buf: &[u8]) -> (Frame, usize) {
    match decode(buf) {
        Decoded::Frame {
            frame, consumed, ..
        } => (frame.to_frame(), consumed),
        other => panic!("expected a frame, got {other:?}"),
    }
}

const REQ_2007: &str = "68 37 03 00 92 81 39 68 11 04 33 33 34 33 38 16";
const RESP_2007: &str = "68 37 03 00 92 81 39 68 91 08 33 33 34 33 37 33 33 33 8C 16";
const REQ_1997: &str = "68 14 04 00 00 00 00 68 01 02 43 C3 F1 16";
const RESP_1997: &str = "68 14 04 00 00 00 00 68 81 06 43 C3 48 B3 C8 33 6B 16";

#[test]
fn vector_2007_request_encodes_exactly() {
    let addr: Address = "398192000337".parse().unwrap();
    let req = read_request(addr, Di::v2007(0x0001_0000));
    assert_eq!(req.encode(0).unwrap(), h(REQ_2007));
    assert_eq!(only_frame(&h(REQ_2007)).0, req);
}

#[test]
fn vector_2007_response_decodes_to_0_04_kwh() {
    let addr: Address = "398192000337".parse().unwrap();
    let di = Di::v2007(0x0001_0000);
    let req = read_request(addr, di);
    for preamble in ["", "FE", "FE FE FE FE"] {
        let wire = h(&format!("{preamble} {RESP_2007}"));
        let Decoded::Frame {
            frame, consumed, ..
        } = decode(&wire)
        else {
            panic!()
        };
        assert_eq!(consumed, wire.len());
        assert_eq!(frame.address, addr);
        assert_eq!(frame.control, 0x91);
        assert_eq!(classify(&req, &frame), Match::Answer);
        let info = lookup(di).unwrap();
        assert_eq!(info.channels, &[crate::model::Channel::ImportActiveTotal]);
        let v = decode_read_value(&frame, di, info.format).unwrap();
        assert_eq!(v, Value::Number(dec!(0.04)));
    }
    // And the reply we would build as a meter is the same bytes.
    let reply = read_reply(addr, di, &[0x04, 0, 0, 0], false);
    assert_eq!(reply.encode(0).unwrap(), h(RESP_2007));
}

#[test]
fn vector_1997_request_and_response() {
    let addr: Address = "000000000414".parse().unwrap();
    let di = Di::v1997(0x9010);
    let req = read_request(addr, di);
    assert_eq!(req.encode(0).unwrap(), h(REQ_1997));
    let wire = h(&format!("FE FE {RESP_1997}"));
    let Decoded::Frame { frame, .. } = decode(&wire) else {
        panic!()
    };
    assert_eq!(classify(&req, &frame), Match::Answer);
    let v = decode_read_value(&frame, di, lookup(di).unwrap().format).unwrap();
    assert_eq!(v, Value::Number(dec!(9580.15)));
    assert_eq!(
        read_reply(addr, di, &[0x15, 0x80, 0x95, 0x00], false)
            .encode(0)
            .unwrap(),
        h(RESP_1997)
    );
}

#[test]
fn garbage_before_start_is_skipped_and_counted() {
    let wire = h(&format!("00 13 FF 68 01 FE FE {RESP_2007}"));
    let Decoded::Frame {
        frame,
        consumed,
        skipped,
        noise,
    } = decode(&wire)
    else {
        panic!()
    };
    assert_eq!(consumed, wire.len());
    assert_eq!(skipped, 7);
    assert_eq!(noise, 5);
    assert_eq!(frame.control, 0x91);
}

#[test]
fn wrong_checksum_is_invalid() {
    // The published comment's B6 instead of the correct checksum.
    let mut wire = h(RESP_2007);
    let n = wire.len();
    wire[n - 2] = 0xB6;
    assert!(matches!(
        decode(&wire),
        Decoded::Invalid {
            error: FrameError::BadChecksum {
                found: 0xB6,
                computed: 0x8C
            },
            ..
        }
    ));
}

#[test]
fn late_reply_from_another_meter_or_di_is_stray() {
    let a: Address = "398192000337".parse().unwrap();
    let b: Address = "000000000001".parse().unwrap();
    let di = Di::v2007(0x0001_0000);
    let req_b = read_request(b, di);
    let late = read_reply(a, di, &[4, 0, 0, 0], false).encode(0).unwrap();
    let (f, _) = only_frame(&late);
    let Decoded::Frame { frame, .. } = decode(&late) else {
        panic!()
    };
    assert_eq!(f.address, a);
    assert_eq!(
        classify(&req_b, &frame),
        Match::Stray(StrayReason::OtherAddress)
    );
    let req_a_other_di = read_request(a, Di::v2007(0x0203_0000));
    assert_eq!(
        classify(&req_a_other_di, &frame),
        Match::Stray(StrayReason::OtherDi)
    );
    // Our own request echoed back by a half-duplex adapter is not an answer.
    let echo = req_b.encode(0).unwrap();
    let Decoded::Frame { frame, .. } = decode(&echo) else {
        panic!()
    };
    assert_eq!(
        classify(&req_b, &frame),
        Match::Stray(StrayReason::NotAReply)
    );
}

#[test]
fn error_reply_is_typed() {
    let a: Address = "398192000337".parse().unwrap();
    let req = read_request(a, Di::v2007(0x0001_0000));
    let wire = error_reply(a, control::READ, ErrorStatus(0x02))
        .encode(0)
        .unwrap();
    // D1 01 35: status 0x02 + 0x33.
    assert_eq!(wire[8], 0xD1);
    assert_eq!(wire[10], 0x35);
    let Decoded::Frame { frame, .. } = decode(&wire) else {
        panic!()
    };
    let Match::Refused(status) = classify(&req, &frame) else {
        panic!()
    };
    assert!(status.no_data());
    assert!(!status.unauthorised());
    assert_eq!(status.reasons(), vec!["no requested data"]);
    let relay_err = ErrorStatus(0x04);
    assert!(relay_err.unauthorised());
    assert!(relay_err.to_string().contains("password"));
}

#[test]
fn read_address_wildcard() {
    let req = read_address_request();
    assert_eq!(
        req.encode(0).unwrap(),
        h("68 AA AA AA AA AA AA 68 13 00 DF 16")
    );
    let a: Address = "398192000337".parse().unwrap();
    let reply = read_address_reply(a).encode(4).unwrap();
    let Decoded::Frame { frame, .. } = decode(&reply) else {
        panic!()
    };
    assert_eq!(classify(&req, &frame), Match::Answer);
    assert_eq!(
        Format::Address.decode(&frame.to_frame().data).unwrap(),
        Value::Address(a)
    );
}

#[test]
fn time_sync_is_broadcast_seconds_first() {
    let t = MeterTime {
        year: 2024,
        month: 5,
        day: 17,
        hour: 13,
        minute: 45,
        second: 30,
    };
    let f = time_sync_request(t);
    assert_eq!(f.address, Address::BROADCAST);
    assert_eq!(f.control, 0x08);
    assert_eq!(f.data, vec![0x30, 0x45, 0x13, 0x17, 0x05, 0x24]);
}

#[test]
fn relay_layout() {
    let a: Address = "398192000337".parse().unwrap();
    let pw: Password = "02123456".parse().unwrap();
    let op: Operator = "00000001".parse().unwrap();
    let exp = MeterTime {
        year: 2024,
        month: 5,
        day: 17,
        hour: 14,
        minute: 0,
        second: 0,
    };
    let f = relay_request(a, RelayCommand::Trip, pw, op, exp);
    assert_eq!(f.control, 0x1C);
    assert_eq!(
        f.data,
        vec![0x02, 0x56, 0x34, 0x12, 0x01, 0, 0, 0, 0x1A, 0x00, 0x00, 0x00, 0x14, 0x17, 0x05, 0x24]
    );
    let back = parse_relay_request(&f.data).unwrap();
    assert_eq!(back.command, Some(RelayCommand::Trip));
    assert_eq!(back.expiry, exp);
    assert_eq!(back.password, pw);
    for c in RelayCommand::ALL {
        assert_eq!(c.as_str().parse::<RelayCommand>().unwrap(), c);
        assert_eq!(RelayCommand::from_code(c.code()), Some(c));
    }
}

/// The plaintext relay frame of DL/T 645-2007 (control 0x1C, L = 0x10):
/// PA P0 P1 P2 | C0..C3 | N1 command | N2 reserved 00 | N3..N8 expiry ssmmhhDDMMYY,
/// every byte +0x33; the meter answers 0x9C with L = 0, or 0xDC with one error byte.
/// Bytes computed independently (offset and checksum by hand).
#[test]
fn relay_frame_matches_the_standard_layout() {
    let a: Address = "398192000337".parse().unwrap();
    let exp = MeterTime {
        year: 2024,
        month: 5,
        day: 17,
        hour: 14,
        minute: 0,
        second: 0,
    };
    let f = relay_request(
        a,
        RelayCommand::Trip,
        "02123456".parse().unwrap(),
        "00000001".parse().unwrap(),
        exp,
    );
    assert_eq!(
        f.encode(0).unwrap(),
        parse_hex(
            "68 37 03 00 92 81 39 68 1C 10 35 89 67 45 34 33 33 33 4D 33 33 33 47 4A 38 57 BF 16"
        )
        .unwrap()
    );
    let ok = parse_hex("68 37 03 00 92 81 39 68 9C 00 F2 16").unwrap();
    let Decoded::Frame { frame, .. } = decode(&ok) else {
        panic!()
    };
    assert_eq!(classify(&f, &frame), Match::Answer);
    let refused = parse_hex("68 37 03 00 92 81 39 68 DC 01 37 6A 16").unwrap();
    let Decoded::Frame { frame, .. } = decode(&refused) else {
        panic!()
    };
    assert_eq!(frame.control, 0xDC);
    assert_eq!((frame.data_len(), frame.data(0)), (1, 0x04));
    assert_eq!(classify(&f, &frame), Match::Refused(ErrorStatus(0x04)));
}

/// 1997 follow-ups (0x02, replies 0x82 / 0xA2) carry no sequence number.
#[test]
fn follow_up_frames_assemble_1997() {
    let a: Address = "000000000414".parse().unwrap();
    let di = Di::v1997(0x901F);
    let first = read_reply(a, di, &[1, 0, 0, 0, 2, 0, 0, 0], true)
        .encode(0)
        .unwrap();
    let Decoded::Frame { frame, .. } = decode(&first) else {
        panic!()
    };
    assert_eq!(frame.control, 0xA1);
    let mut fu = FollowUp::start(a, di, &frame.to_frame());
    let req = fu.next_request().unwrap();
    assert_eq!(req.control, 0x02);
    assert_eq!(req.data, vec![0x1F, 0x90]);
    let second = follow_reply(a, di, &[3, 0, 0, 0], 0, true)
        .encode(0)
        .unwrap();
    let Decoded::Frame { frame, .. } = decode(&second) else {
        panic!()
    };
    assert_eq!(frame.control, 0xA2);
    assert_eq!(classify(&req, &frame), Match::Answer);
    fu.push(&frame.to_frame()).unwrap();
    let last = follow_reply(a, di, &[4, 0, 0, 0, 5, 0, 0, 0], 0, false)
        .encode(0)
        .unwrap();
    let Decoded::Frame { frame, .. } = decode(&last) else {
        panic!()
    };
    assert_eq!(frame.control, 0x82);
    fu.push(&frame.to_frame()).unwrap();
    assert!(fu.is_complete());
    assert_eq!(fu.data().len(), 20);
}

#[test]
fn write_layout() {
    let a: Address = "398192000337".parse().unwrap();
    let f = write_request(
        a,
        Di::v2007(0x0400_1001),
        "02000000".parse().unwrap(),
        Operator(0),
        &[0, 0, 1, 0],
    );
    assert_eq!(f.control, 0x14);
    assert_eq!(f.data.len(), 4 + 4 + 4 + 4);
    assert_eq!(&f.data[..4], &[0x01, 0x10, 0x00, 0x04]);
}

#[test]
fn follow_up_frames_assemble() {
    let a: Address = "398192000337".parse().unwrap();
    let di = Di::v2007(0x0001_FF00);
    let first = read_reply(a, di, &[1, 0, 0, 0, 2, 0, 0, 0], true)
        .encode(0)
        .unwrap();
    let Decoded::Frame { frame, .. } = decode(&first) else {
        panic!()
    };
    assert_eq!(frame.control, 0xB1);
    assert_eq!(classify(&read_request(a, di), &frame), Match::Answer);
    let mut fu = FollowUp::start(a, di, &frame.to_frame());
    assert!(!fu.is_complete());
    let req = fu.next_request().unwrap();
    assert_eq!(req.control, 0x12);
    assert_eq!(req.data, vec![0x00, 0xFF, 0x01, 0x00, 1]);
    let second = follow_reply(a, di, &[3, 0, 0, 0], 1, true)
        .encode(0)
        .unwrap();
    let Decoded::Frame { frame, .. } = decode(&second) else {
        panic!()
    };
    assert_eq!(frame.control, 0xB2);
    assert_eq!(classify(&req, &frame), Match::Answer);
    fu.push(&frame.to_frame()).unwrap();
    let req = fu.next_request().unwrap();
    assert_eq!(*req.data.last().unwrap(), 2);
    // A frame with the wrong sequence number is refused.
    let wrong = follow_reply(a, di, &[9, 0, 0, 0], 7, false)
        .encode(0)
        .unwrap();
    let Decoded::Frame { frame, .. } = decode(&wrong) else {
        panic!()
    };
    assert!(matches!(
        fu.push(&frame.to_frame()),
        Err(ReplyError::WrongSequence {
            expected: 2,
            got: 7
        })
    ));
    let last = follow_reply(a, di, &[4, 0, 0, 0, 5, 0, 0, 0], 2, false)
        .encode(0)
        .unwrap();
    let Decoded::Frame { frame, .. } = decode(&last) else {
        panic!()
    };
    assert_eq!(frame.control, 0x92);
    fu.push(&frame.to_frame()).unwrap();
    assert!(fu.is_complete());
    assert!(fu.next_request().is_none());
    let v = lookup(di).unwrap().format.decode(fu.data()).unwrap();
    assert_eq!(
        v,
        Value::Numbers(vec![
            dec!(0.01),
            dec!(0.02),
            dec!(0.03),
            dec!(0.04),
            dec!(0.05)
        ])
    );
}

fn arb_address() -> impl Strategy<Value = Address> {
    prop::array::uniform6(0u8..100).prop_map(|d| Address(d.map(bcd::u8_to_byte)))
}

fn arb_di() -> impl Strategy<Value = Di> {
    prop_oneof![
        any::<u32>().prop_map(Di::v2007),
        any::<u16>().prop_map(Di::v1997)
    ]
}

const CONTROLS: &[u8] = &[
    0x01, 0x02, 0x04, 0x08, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x1C, 0x81, 0x82, 0x84, 0x91,
    0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x9C, 0xA1, 0xB1, 0xB2, 0xC1, 0xD1, 0xD2, 0xD4, 0xD6, 0xD7,
    0xDC,
];

proptest! {
    #[test]
    fn any_frame_round_trips(
        address in arb_address(),
        control in prop::sample::select(CONTROLS),
        data in prop::collection::vec(any::<u8>(), 0..=255),
        preamble in 0usize..5,
    ) {
        let f = Frame::new(address, control, data);
        let wire = f.encode(preamble).unwrap();
        let (back, consumed) = only_frame(&wire);
        prop_assert_eq!(back, f);
        prop_assert_eq!(consumed, wire.len());
    }

    #[test]
    fn read_requests_and_replies_round_trip_for_all_dis(
        address in arb_address(),
        di in arb_di(),
        value in prop::collection::vec(any::<u8>(), 0..40),
        more in any::<bool>(),
    ) {
        let req = read_request(address, di);
        let (back, _) = only_frame(&req.encode(4).unwrap());
        prop_assert_eq!(&back, &req);
        prop_assert_eq!(Di::read(di.edition, &back.data), Some(di));
        let reply = read_reply(address, di, &value, more).encode(2).unwrap();
        let Decoded::Frame { frame, .. } = decode(&reply) else { panic!() };
        prop_assert_eq!(classify(&req, &frame), Match::Answer);
        let payload = Payload::of_read_reply(&frame, di);
        prop_assert_eq!(payload.as_slice(), &value[..]);
        prop_assert_eq!(control::has_more(frame.control), more);
    }

    #[test]
    fn catalogue_values_round_trip(
        idx in 0..CATALOGUE_LEN,
        digits in any::<u64>(),
        neg in any::<bool>(),
    ) {
        let info = &catalogue::CATALOGUE[idx];
        if let Format::Bcd { len, scale, signed } = info.format {
            let max_digits = len as u32 * 2 - if signed { 1 } else { 0 };
            let m = (digits % 10u64.pow(max_digits)) as i64;
            let m = if signed && neg { -m } else { m };
            let v = Value::Number(rust_decimal::Decimal::new(m, scale as u32));
            let mut bytes = vec![];
            info.format.encode(&v, &mut bytes).unwrap();
            let wire = read_reply(Address([1; 6]), info.di, &bytes, false).encode(0).unwrap();
            let Decoded::Frame { frame, .. } = decode(&wire) else { panic!() };
            prop_assert_eq!(decode_read_value(&frame, info.di, info.format).unwrap(), v);
        }
    }

    #[test]
    fn decode_never_panics_and_stays_in_bounds(buf in prop::collection::vec(any::<u8>(), 0..600)) {
        match decode(&buf) {
            Decoded::Frame { consumed, skipped, .. } => prop_assert!(skipped < consumed && consumed <= buf.len()),
            Decoded::Incomplete { skipped, .. } => prop_assert!(skipped <= buf.len()),
            Decoded::Invalid { consumed, .. } => prop_assert!(consumed > 0 && consumed <= buf.len()),
        }
    }

    #[test]
    fn frames_survive_noise_and_splits(
        noise in prop::collection::vec(any::<u8>().prop_filter("not a start", |b| *b != 0x68), 0..30),
        data in prop::collection::vec(any::<u8>(), 0..50),
        split in any::<prop::sample::Index>(),
    ) {
        let f = Frame::new(Address([0x11; 6]), 0x91, data);
        let mut wire = noise.clone();
        wire.extend(f.encode(4).unwrap());
        // Fed in two parts, as a socket would deliver it.
        let cut = split.index(wire.len() + 1);
        let mut buf = wire[..cut].to_vec();
        let first = decode(&buf);
        if let Decoded::Frame { frame, .. } = first {
            prop_assert_eq!(frame.to_frame(), f);
            return Ok(());
        }
        let Decoded::Incomplete { skipped, .. } = first else { panic!("{first:?}") };
        buf.drain(..skipped);
        buf.extend_from_slice(&wire[cut..]);
        let (back, _) = only_frame(&buf);
        prop_assert_eq!(back, f);
    }
}

const CATALOGUE_LEN: usize = catalogue::CATALOGUE.len();

#[test]
fn buffer_without_a_start_byte_is_all_skippable_and_fe_is_not_noise() {
    let wire = h("FE 00 FE 13 FF FE");
    assert_eq!(
        decode(&wire),
        Decoded::Incomplete {
            skipped: 6,
            noise: 3
        }
    );
    assert_eq!(
        decode(&h("FE FE 00 68 37")),
        Decoded::Incomplete {
            skipped: 3,
            noise: 1
        }
    );
}
