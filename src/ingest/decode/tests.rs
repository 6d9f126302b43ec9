use super::*;
use crate::ingest::config::{JsonMapConfig, SourceConfig};
use rust_decimal_macros::dec;

const NOW: i64 = 1_763_800_000_000; // 2025-11-22

fn source(format: Format) -> SourceConfig {
    SourceConfig {
        name: "s".into(),
        filter: "#".into(),
        format,
        unmapped: None,
        meters: HashMap::new(),
        strict_meters: false,
        channels: HashMap::new(),
        exact: false,
        ts_format: TsFormat::Auto,
        tz_offset_minutes: 0,
        map: None,
    }
}

fn decoder(s: SourceConfig) -> Decoder {
    Decoder::new(&s, Limits::default()).unwrap()
}

#[test]
fn canonical_envelope_keeps_every_digit_of_the_value() {
    let p = br#"{"v":1,"collector":"sub-7","readings":[
        {"meter_id":"M1","ts":1763799000000,"channel":"import_active_total","value":12345678901234.1234},
        {"meter_id":"M2","ts":"2025-11-22T08:00:00Z","channel":"voltage_a","value":"229.9","unit":"V","quality":"estimated"}]}"#;
    let d = decoder(source(Format::Canonical))
        .decode("t/x", p, NOW)
        .unwrap();
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    assert_eq!(d.readings[0].value, dec!(12345678901234.1234));
    assert_eq!(&*d.readings[0].source.collector, "sub-7");
    assert_eq!(d.readings[1].ts_ms, 1_763_798_400_000);
    assert_eq!(d.readings[1].quality, Quality::ESTIMATED);
    assert_eq!(&*d.readings[1].source.address, "t/x");
}

#[test]
fn readings_naming_the_same_source_text_share_one_copy_across_messages() {
    let mut d = decoder(source(Format::Canonical));
    let msg = |addr: &str| {
        format!(
            r#"{{"collector":"sub-1","readings":[{{"meter_id":"M1","ts":1763799000000,"channel":"import_active_total","value":1,"address":"{addr}"}}]}}"#
        )
    };
    let a = d.decode("t/1", msg("bus1/7").as_bytes(), NOW).unwrap();
    let b = d.decode("t/2", msg("bus1/8").as_bytes(), NOW).unwrap();
    let c = d.decode("t/3", msg("bus1/7").as_bytes(), NOW).unwrap();
    let (a, b, c) = (
        &a.readings[0].source,
        &b.readings[0].source,
        &c.readings[0].source,
    );
    assert!(Arc::ptr_eq(&a.address, &c.address), "same text, one copy");
    assert!(!Arc::ptr_eq(&a.address, &b.address));
    assert_eq!(&*b.address, "bus1/8");
    assert!(Arc::ptr_eq(&a.collector, &c.collector));
}

#[test]
fn source_texts_stay_right_after_the_shared_set_starts_again() {
    let mut d = decoder(source(Format::Canonical));
    // More distinct addresses than the set keeps, then the first again.
    for i in (0..MAX_SHARED + 10).chain([0, 1]) {
        let p = format!(
            r#"{{"meter_id":"M1","ts":1763799000000,"channel":"import_active_total","value":1,"address":"dev/{i}"}}"#
        );
        let r = d.decode("t", p.as_bytes(), NOW).unwrap();
        assert_eq!(*r.readings[0].source.address, format!("dev/{i}"));
    }
}

#[test]
fn canonical_single_reading_is_accepted() {
    let p = br#"{"meter_id":"M1","ts":1763799000000,"channel":"import_active_total","value":1.5}"#;
    let d = decoder(source(Format::Canonical))
        .decode("t", p, NOW)
        .unwrap();
    assert_eq!(d.readings.len(), 1);
}

#[test]
fn canonical_bad_reading_is_a_problem_and_the_rest_still_count() {
    let p = br#"{"readings":[
        {"meter_id":"M1","ts":1763799000000,"channel":"import_active_totl","value":1},
        {"meter_id":"M1","ts":1763799000000,"channel":"import_active_total","value":"abc"},
        {"meter_id":"M1","ts":1763799000000,"channel":"voltage_a","value":1,"unit":"kV"},
        {"meter_id":"M1","ts":1763799000000,"channel":"voltage_a","value":230}]}"#;
    let d = decoder(source(Format::Canonical))
        .decode("t", p, NOW)
        .unwrap();
    assert_eq!(d.readings.len(), 1);
    assert_eq!(d.problems.len(), 3);
    assert!(matches!(d.problems[0], DecodeError::UnknownChannel(_)));
    assert!(matches!(d.problems[1], DecodeError::BadNumber { .. }));
    assert!(matches!(d.problems[2], DecodeError::WrongUnit { .. }));
}

#[test]
fn absurd_timestamps_are_refused() {
    let mut dec = decoder(source(Format::Canonical));
    for ts in ["946684799999", "1999-12-31T23:59:59Z", "1863800000000"] {
        let p = format!(r#"{{"meter_id":"M1","ts":"{ts}","channel":"voltage_a","value":1}}"#);
        let d = dec.decode("t", p.as_bytes(), NOW).unwrap();
        assert!(
            matches!(d.problems[0], DecodeError::AbsurdTimestamp(_)),
            "{ts}: {:?}",
            d.problems
        );
    }
}

#[test]
fn malformed_json_and_wrong_types_are_typed_errors() {
    let mut dec = decoder(source(Format::Canonical));
    assert!(matches!(
        dec.decode("t", b"{\"readings\":[", NOW),
        Err(DecodeError::Json(_))
    ));
    assert!(matches!(
        dec.decode("t", b"{\"readings\":7}", NOW),
        Err(DecodeError::WrongType(_))
    ));
    assert!(matches!(
        dec.decode("t", b"{}", NOW),
        Err(DecodeError::MissingField(_))
    ));
}

#[test]
fn oversized_payload_is_refused_before_parsing() {
    let mut d = Decoder::new(
        &source(Format::Canonical),
        Limits {
            max_payload_bytes: 10,
            ..Limits::default()
        },
    )
    .unwrap();
    assert_eq!(
        d.decode("t", &[b' '; 11], NOW),
        Err(DecodeError::Oversized { len: 11, max: 10 })
    );
}

#[test]
fn unknown_meters_are_refused_when_known_meters_are_given() {
    let limits = Limits {
        known_meters: Some(Arc::new(["M1".to_string()].into_iter().collect())),
        ..Limits::default()
    };
    let mut d = Decoder::new(&source(Format::Canonical), limits).unwrap();
    let p = br#"{"meter_id":"M9","ts":1763799000000,"channel":"voltage_a","value":1}"#;
    let out = d.decode("t", p, NOW).unwrap();
    assert_eq!(out.problems, vec![DecodeError::UnknownMeter("M9".into())]);
}

#[test]
fn gateway_values_map_tags_and_report_device_errors() {
    let mut s = source(Format::Values);
    s.meters.insert("line1/node7".into(), "M7".into());
    s.channels.insert(
        "kwh".into(),
        ChannelSpec::Name("import_active_total".into()),
    );
    s.channels.insert(
        "p".into(),
        ChannelSpec::Full {
            channel: "active_power_total".into(),
            unit: Some("W".into()),
            scale: None,
        },
    );
    let p = br#"{"timestamp":1763799000000,"node":"node7","group":"line1",
        "values":{"kwh":1024.5,"p":1500,"temp":21},"errors":{"ua":-3}}"#;
    let d = decoder(s).decode("gw/data", p, NOW).unwrap();
    assert_eq!(d.readings.len(), 2);
    let p_kw = d
        .readings
        .iter()
        .find(|r| r.channel == Channel::ActivePowerTotal)
        .unwrap();
    assert_eq!(p_kw.value, dec!(1.5));
    assert_eq!(p_kw.meter_id, "M7");
    assert!(d.problems.contains(&DecodeError::Unmapped("temp".into())));
    assert!(d
        .problems
        .iter()
        .any(|e| matches!(e, DecodeError::DeviceError { .. })));
}

#[test]
fn tasmota_sml_sensor_reads_with_local_time() {
    let mut s = source(Format::Tasmota);
    s.tz_offset_minutes = 60;
    let p = br#"{"Time":"2025-11-22T09:00:00","SML":{"Total_in":12345.6789,"Total_out":0.5,"Power_curr":-350}}"#;
    let d = decoder(s).decode("tele/meter-7/SENSOR", p, NOW).unwrap();
    assert!(d.problems.is_empty());
    assert_eq!(d.readings.len(), 3);
    assert_eq!(d.readings[0].meter_id, "meter-7");
    assert_eq!(d.readings[0].ts_ms, 1_763_798_400_000);
    let total = d
        .readings
        .iter()
        .find(|r| r.channel == Channel::ImportActiveTotal)
        .unwrap();
    assert_eq!(total.value, dec!(12345.6789));
    let p = d
        .readings
        .iter()
        .find(|r| r.channel == Channel::ActivePowerTotal)
        .unwrap();
    assert_eq!(p.value, dec!(-0.35));
}

#[test]
fn shelly_notify_status_reads_three_phases_and_energy_in_kwh() {
    let p = br#"{"src":"shellypro3em-abc","dst":"x","method":"NotifyStatus","params":{"ts":1763799000.25,
        "em:0":{"id":0,"a_voltage":230.1,"b_voltage":231,"c_voltage":229.4,"a_current":1.2,"total_act_power":812.5},
        "emdata:0":{"id":0,"total_act":123456.78,"total_act_ret":10}}}"#;
    let mut s = source(Format::Shelly);
    s.meters.insert("shellypro3em-abc".into(), "M3".into());
    let d = decoder(s)
        .decode("shellies/abc/events/rpc", p, NOW)
        .unwrap();
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    assert_eq!(d.readings.len(), 7);
    assert_eq!(d.readings[0].ts_ms, 1_763_799_000_250);
    let e = d
        .readings
        .iter()
        .find(|r| r.channel == Channel::ImportActiveTotal)
        .unwrap();
    assert_eq!(e.value, dec!(123.4568));
    assert_eq!(d.rounded, 1);
}

#[test]
fn shelly_exact_source_refuses_to_round() {
    let p = br#"{"src":"s1","method":"NotifyStatus","params":{"ts":1763799000,"emdata:0":{"total_act":1.23456}}}"#;
    let mut s = source(Format::Shelly);
    s.exact = true;
    let d = decoder(s).decode("t", p, NOW).unwrap();
    assert!(matches!(d.problems[0], DecodeError::ValueOutOfRange(_)));
}

#[test]
fn shelly_events_without_status_are_not_readings() {
    let p = br#"{"src":"s1","method":"NotifyEvent","params":{"ts":1763799000,"events":[]}}"#;
    let d = decoder(source(Format::Shelly)).decode("t", p, NOW).unwrap();
    assert!(d.readings.is_empty() && d.problems.is_empty());
}

#[test]
fn json_map_reads_records_by_pointer_and_topic_level() {
    let mut s = source(Format::JsonMap);
    s.channels.insert(
        "e".into(),
        ChannelSpec::Full {
            channel: "import_active_total".into(),
            unit: Some("Wh".into()),
            scale: None,
        },
    );
    s.map = Some(JsonMapConfig {
        each: Some("/rows".into()),
        meter_id: "/dev".into(),
        ts: Some("/t".into()),
        values: [
            ("e".to_string(), "/m/e".to_string()),
            ("voltage_a".to_string(), "/m/u".to_string()),
        ]
        .into_iter()
        .collect(),
    });
    let p = br#"{"rows":[{"dev":"A","t":1763799000,"m":{"e":1000,"u":"230.5"}},{"dev":"B","t":1763799000,"m":{"e":true}}]}"#;
    let d = decoder(s).decode("site/x", p, NOW).unwrap();
    assert_eq!(d.readings.len(), 3, "{:?}", d);
    assert_eq!(d.readings[0].value, dec!(1));
    assert_eq!(d.readings[0].ts_ms, 1_763_799_000_000);
    assert_eq!(d.problems, vec![DecodeError::MissingField("/m/u".into())]);
}

#[test]
fn strict_meters_refuse_devices_not_listed() {
    let mut s = source(Format::Tasmota);
    s.strict_meters = true;
    let p = br#"{"Time":"2025-11-22T09:00:00","ENERGY":{"Total":1}}"#;
    assert_eq!(
        decoder(s).decode("tele/x/SENSOR", p, NOW),
        Err(DecodeError::UnknownMeter("x".into()))
    );
}

mod spb {
    use super::*;
    use crate::protocol::sparkplug::{datatype, encode_payload, Metric, MetricValue, Payload};

    fn msg(seq: u64, metrics: Vec<Metric>) -> Vec<u8> {
        encode_payload(&Payload {
            timestamp: Some(1_763_799_000_000),
            metrics,
            seq: Some(seq),
            uuid: None,
            body: None,
        })
    }

    fn m(name: Option<&str>, alias: u64, v: MetricValue) -> Metric {
        Metric {
            name: name.map(String::from),
            alias: Some(alias),
            datatype: Some(datatype::DOUBLE),
            value: Some(v),
            ..Default::default()
        }
    }

    #[test]
    fn sparkplug_data_by_alias_becomes_readings_for_the_device_meter() {
        let mut s = source(Format::Sparkplug);
        s.meters.insert("gw1/m1".into(), "M1".into());
        s.channels.insert(
            "Energy/Import".into(),
            ChannelSpec::Name("import_active_total".into()),
        );
        s.unmapped = Some(Unmapped::Ignore);
        let mut d = decoder(s);
        d.decode("spBv1.0/g/NBIRTH/gw1", &msg(0, vec![]), NOW)
            .unwrap();
        let b = d
            .decode(
                "spBv1.0/g/DBIRTH/gw1/m1",
                &msg(
                    1,
                    vec![m(
                        Some("Energy/Import"),
                        3,
                        MetricValue::DoubleValue(100.25),
                    )],
                ),
                NOW,
            )
            .unwrap();
        assert_eq!(b.readings[0].meter_id, "M1");
        let o = d
            .decode(
                "spBv1.0/g/DDATA/gw1/m1",
                &msg(2, vec![m(None, 3, MetricValue::DoubleValue(100.5))]),
                NOW,
            )
            .unwrap();
        assert_eq!(o.readings[0].value, dec!(100.5));
        assert_eq!(o.readings[0].channel, Channel::ImportActiveTotal);
        assert!(o.rebirth.is_none());
        let gap = d
            .decode(
                "spBv1.0/g/DDATA/gw1/m1",
                &msg(9, vec![m(None, 3, MetricValue::DoubleValue(101.0))]),
                NOW,
            )
            .unwrap();
        assert_eq!(gap.rebirth.as_ref().unwrap().0, "spBv1.0/g/NCMD/gw1");
        let death = d
            .decode("spBv1.0/g/DDEATH/gw1/m1", &msg(10, vec![]), NOW)
            .unwrap();
        assert_eq!(death.offline, vec!["gw1/m1".to_string()]);
    }

    #[test]
    fn broken_sparkplug_protobuf_and_topic_are_errors() {
        let mut d = decoder(source(Format::Sparkplug));
        assert!(matches!(
            d.decode("spBv1.0/g/NDATA/e", &[0x12, 0x05, 1], NOW),
            Err(DecodeError::Sparkplug(_))
        ));
        assert!(matches!(
            d.decode("foo/bar", &[], NOW),
            Err(DecodeError::Sparkplug(_))
        ));
    }
}

#[test]
fn canonical_encoding_round_trips_through_the_decoder() {
    let r = Reading {
        meter_id: "M\"1".into(),
        ts_ms: 1_763_799_000_000,
        channel: Channel::ImportActiveT2,
        value: dec!(-0.0001),
        quality: Quality::ESTIMATED | Quality::ROLLOVER,
        source: Source {
            protocol: Protocol::Dlt645,
            collector: "c".into(),
            address: "bus1/1".into(),
        },
        received_ms: NOW,
    };
    let bytes = encode_canonical("sub-1", std::slice::from_ref(&r));
    let d = decoder(source(Format::Canonical))
        .decode("t", &bytes, NOW)
        .unwrap();
    let mut want = r.clone();
    want.source.collector = "sub-1".into();
    assert_eq!(d.readings, vec![want]);
}

mod never_panics {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn decoders_never_panic_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            for f in [Format::Canonical, Format::Values, Format::Tasmota, Format::Shelly, Format::Sparkplug] {
                let _ = decoder(source(f)).decode("spBv1.0/g/DDATA/e/d", &data, NOW);
            }
        }

        #[test]
        fn canonical_values_keep_their_digits(mantissa in -99_999_999_999_999i64..99_999_999_999_999, scale in 0u32..5) {
            let v = Decimal::new(mantissa, scale);
            let p = format!(r#"{{"meter_id":"M","ts":1763799000000,"channel":"import_active_total","value":{v}}}"#);
            let d = decoder(source(Format::Canonical)).decode("t", p.as_bytes(), NOW).unwrap();
            prop_assert_eq!(d.readings[0].value, v);
        }
    }
}
