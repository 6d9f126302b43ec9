//! A fast path for canonical JSON, ingest's hot path.
//!
//! It reads the plain shape meterflow's own publishers send (known keys once
//! each; strings without escapes; numbers as `-?digits[.digits]`) straight
//! into `Canonical`, borrowing every string and number text from the payload.
//! Anything else, including every malformed payload, returns `None` and goes
//! through serde_json, so errors and unusual input are serde's business and
//! accepted input gives exactly what serde gives (checked by property tests).

use std::borrow::Cow;

use super::{Canonical, CanonicalReading, JStr, Scalar};

/// `None`: not the plain shape; use serde_json.
pub(super) fn canonical(payload: &[u8]) -> Option<Canonical<'_>> {
    // serde_json rejects invalid UTF-8 anywhere in a string; checking the
    // whole payload once keeps every slice below a valid `str`.
    let text = std::str::from_utf8(payload).ok()?;
    let mut p = Parser {
        s: text,
        b: payload,
        i: 0,
    };
    let (mut v, mut collector, mut readings) = (None, None, None);
    let mut one = CanonicalReading::default();
    let mut seen = 0u32;
    p.object(|p, key| {
        match key {
            "v" => {
                once(&mut seen, 1)?;
                v = p.nullable(|p| p.small_uint())?;
            }
            "collector" => {
                once(&mut seen, 2)?;
                collector = p.nullable(|p| p.string().map(JStr))?;
            }
            "readings" => {
                once(&mut seen, 4)?;
                readings = p.nullable(|p| p.readings())?;
            }
            _ => p.reading_field(key, &mut one, &mut seen)?,
        }
        Some(())
    })?;
    p.ws();
    if p.i != p.b.len() {
        return None;
    }
    let CanonicalReading {
        meter_id,
        ts,
        channel,
        value,
        unit,
        quality,
        address,
        protocol,
    } = one;
    Some(Canonical {
        v,
        collector,
        readings,
        meter_id,
        ts,
        channel,
        value,
        unit,
        quality,
        address,
        protocol,
    })
}

/// A repeated key is serde's error to report.
fn once(seen: &mut u32, bit: u32) -> Option<()> {
    if *seen & bit != 0 {
        return None;
    }
    *seen |= bit;
    Some(())
}

struct Parser<'a> {
    s: &'a str,
    b: &'a [u8],
    i: usize,
}

impl<'a> Parser<'a> {
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        self.ws();
        (self.b.get(self.i) == Some(&c)).then(|| self.i += 1)
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.b.get(self.i).copied()
    }

    /// `{ "key": value, ... }`, each value read by `field`.
    fn object(&mut self, mut field: impl FnMut(&mut Self, &'a str) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(());
        }
        loop {
            let key = self.text()?;
            self.eat(b':')?;
            field(self, key)?;
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// A string without escapes or control characters, borrowed.
    fn string(&mut self) -> Option<Cow<'a, str>> {
        self.text().map(Cow::Borrowed)
    }

    /// The text of a string without escapes or control characters. Returned
    /// as a bare `&str` (two registers): returning the `Cow` through memory
    /// made its caller reload it before the stores had landed, the hottest
    /// instruction of the parser.
    #[inline]
    fn text(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.i;
        let end = start + special_at(&self.b[start..])?;
        if self.b[end] != b'"' {
            return None; // an escape or a control character: serde's job
        }
        self.i = end + 1;
        // The payload is valid UTF-8 and both ends are ASCII, so the slice
        // is on character boundaries.
        Some(&self.s[start..end])
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?`, its text as written (what serde_json's
    /// arbitrary precision keeps). Exponents are left to serde.
    fn number(&mut self) -> Option<&'a str> {
        self.ws();
        let start = self.i;
        if self.b.get(self.i) == Some(&b'-') {
            self.i += 1;
        }
        let int = self.digits();
        if int == 0 || (int > 1 && self.b[self.i - int] == b'0') {
            return None;
        }
        if self.b.get(self.i) == Some(&b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return None;
            }
        }
        if let Some(b'e' | b'E') = self.b.get(self.i) {
            return None;
        }
        Some(&self.s[start..self.i])
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while self.b.get(self.i).is_some_and(u8::is_ascii_digit) {
            self.i += 1;
        }
        self.i - start
    }

    fn small_uint(&mut self) -> Option<u32> {
        let n = self.number()?;
        if n.contains(['-', '.']) {
            return None;
        }
        n.parse().ok()
    }

    /// `null` as `None`, else the value.
    fn nullable<T>(&mut self, value: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        if self.peek()? == b'n' {
            return self.b[self.i..].starts_with(b"null").then(|| {
                self.i += 4;
                None
            });
        }
        value(self).map(Some)
    }

    /// A number, string or boolean (arrays and objects are left to serde).
    fn scalar(&mut self) -> Option<Scalar<'a>> {
        match self.peek()? {
            b'"' => self.string().map(Scalar::Str),
            b't' if self.b[self.i..].starts_with(b"true") => {
                self.i += 4;
                Some(Scalar::Bool(true))
            }
            b'f' if self.b[self.i..].starts_with(b"false") => {
                self.i += 5;
                Some(Scalar::Bool(false))
            }
            b'-' | b'0'..=b'9' => self.number().map(|n| Scalar::Number(Cow::Borrowed(n))),
            _ => None,
        }
    }

    fn readings(&mut self) -> Option<Vec<CanonicalReading<'a>>> {
        self.eat(b'[')?;
        let mut v = Vec::with_capacity(8);
        if self.peek()? == b']' {
            self.i += 1;
            return Some(v);
        }
        loop {
            let mut r = CanonicalReading::default();
            let mut seen = 0u32;
            self.object(|p, key| p.reading_field(key, &mut r, &mut seen))?;
            v.push(r);
            match self.peek()? {
                b',' => self.i += 1,
                b']' => {
                    self.i += 1;
                    return Some(v);
                }
                _ => return None,
            }
        }
    }

    fn reading_field(
        &mut self,
        key: &str,
        r: &mut CanonicalReading<'a>,
        seen: &mut u32,
    ) -> Option<()> {
        let (bit, slot) = match key {
            "meter_id" => (8, Slot::Text(&mut r.meter_id)),
            "ts" => (9, Slot::Scalar(&mut r.ts)),
            "channel" => (10, Slot::Text(&mut r.channel)),
            "value" => (11, Slot::Scalar(&mut r.value)),
            "unit" => (12, Slot::Text(&mut r.unit)),
            "quality" => (13, Slot::Text(&mut r.quality)),
            "address" => (14, Slot::Text(&mut r.address)),
            "protocol" => (15, Slot::Text(&mut r.protocol)),
            // Unknown keys are skipped by serde; that is its job too.
            _ => return None,
        };
        once(seen, 1 << bit)?;
        match slot {
            Slot::Text(t) => *t = self.nullable(|p| p.string().map(JStr))?,
            Slot::Scalar(v) => *v = self.nullable(|p| p.scalar())?,
        }
        Some(())
    }
}

/// Position of the first `"`, `\\` or control character (below 0x20), if any.
/// Eight bytes at a time: strings are short, but most are longer than a
/// few bytes, and the byte loop took a compare and a branch per byte.
fn special_at(b: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut i = 0;
    while let Some(w) = b.get(i..i + 8) {
        let w = u64::from_le_bytes(w.try_into().expect("eight bytes"));
        // Per byte, the top bit of `(x - 1) & !x` is set where x is zero
        // (exact for the lowest such byte, which is the one we take), and of
        // `(x - 0x20) & !x` where x < 0x20.
        let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
        let hits = zero(w ^ (ONES * b'"' as u64))
            | zero(w ^ (ONES * b'\\' as u64))
            | (w.wrapping_sub(ONES * 0x20) & !w & HIGH);
        if hits != 0 {
            return Some(i + (hits.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    b[i..]
        .iter()
        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
        .map(|p| i + p)
}

/// Where a reading's field goes: a string field or a number-like one.
enum Slot<'r, 'a> {
    Text(&'r mut Option<JStr<'a>>),
    Scalar(&'r mut Option<Scalar<'a>>),
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::{parse_json, Canonical};
    use super::canonical;

    /// What the fast path accepts, serde reads the same way.
    fn agrees(payload: &[u8]) -> Result<bool, TestCaseError> {
        let Some(fast) = canonical(payload) else {
            return Ok(false);
        };
        let slow: Result<Canonical, _> = parse_json(payload);
        let slow = match slow {
            Ok(s) => s,
            Err(e) => {
                return Err(TestCaseError::fail(format!(
                    "fast path accepted what serde refuses ({e}): {}",
                    String::from_utf8_lossy(payload)
                )))
            }
        };
        prop_assert_eq!(format!("{fast:?}"), format!("{slow:?}"));
        Ok(true)
    }

    #[test]
    fn what_meterflow_publishes_takes_the_fast_path() {
        let one = br#"{"v":1,"collector":"c1","readings":[{"meter_id":"m1","ts":1767225600000,"channel":"energy_import_total","value":12345.6789,"unit":"kWh","quality":"ok","protocol":"mqtt","address":"t/1"}]}"#;
        assert!(agrees(one).unwrap());
        let bare = br#" { "meter_id" : "m1", "ts" : "2026-01-01T00:00:00Z", "value" : -0.5, "channel": null } "#;
        assert!(agrees(bare).unwrap());
    }

    #[test]
    fn unusual_input_is_left_to_serde() {
        for p in [
            &br#"{"meter_id":"m\u0031"}"#[..],
            br#"{"value":1e3}"#,
            br#"{"value":01}"#,
            br#"{"meter_id":"a","meter_id":"b"}"#,
            br#"{"extra":1}"#,
            br#"{"readings":[{"value":1},]}"#,
            br#"{"v":1} x"#,
            br#"{"value":[1]}"#,
            b"",
            b"\xff",
        ] {
            assert!(canonical(p).is_none(), "{}", String::from_utf8_lossy(p));
        }
    }

    #[test]
    fn special_bytes_are_found_where_the_byte_loop_finds_them() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let len = (next() % 40) as usize;
            let b: Vec<u8> = (0..len)
                .map(|_| match next() % 16 {
                    0 => b'"',
                    1 => b'\\',
                    2 => (next() % 0x20) as u8,
                    3 => 0x80 | (next() % 0x80) as u8,
                    4 => 0x20,
                    _ => b'a' + (next() % 26) as u8,
                })
                .collect();
            let want = b.iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20);
            assert_eq!(super::special_at(&b), want, "{b:?}");
        }
    }

    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "-?[1-9][0-9]{0,12}(\\.[0-9]{1,6})?",
            2 => "\"[a-z0-9 :.\\-T]{0,12}\"",
            1 => Just("null".to_string()),
            1 => Just("true".to_string()),
            1 => Just("false".to_string()),
            1 => Just("[1,2]".to_string()),
            1 => Just("{}".to_string()),
            2 => "-?[0-9]{0,3}(\\.[0-9]{0,3})?([eE][+-]?[0-9])?",
            1 => "\"[a-z\\\\\"\\u{00e9}\\u{0001}]{0,4}\"",
        ]
    }

    /// Mostly a value of the key's own type, sometimes any value.
    fn value_for(key: &str) -> BoxedStrategy<String> {
        let own = match key {
            "v" => "[0-9]{1,3}".boxed(),
            "ts" | "value" => prop_oneof![
                "-?[1-9][0-9]{0,12}(\\.[0-9]{1,6})?",
                "\"[0-9 :.\\-TZ]{0,20}\"",
            ]
            .boxed(),
            _ => "\"[a-zA-Z0-9 _/.\\-\\u{4e00}]{0,12}\"".boxed(),
        };
        prop_oneof![4 => own, 1 => value()].boxed()
    }

    /// Every key canonical JSON knows.
    const KEYS: [&str; 10] = [
        "v",
        "collector",
        "meter_id",
        "ts",
        "channel",
        "value",
        "unit",
        "quality",
        "address",
        "protocol",
    ];

    /// A known key or an unknown one.
    fn key() -> impl Strategy<Value = &'static str> {
        let mut keys = KEYS.to_vec();
        keys.push("other");
        prop::sample::select(keys)
    }

    fn ws() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["", "", " ", "\n\t", "\r "])
    }

    /// Mostly distinct known keys (what the fast path takes), sometimes
    /// repeated or unknown ones (what it must leave to serde).
    fn object() -> impl Strategy<Value = String> {
        let distinct = prop::sample::subsequence(KEYS.to_vec(), 0..8)
            .prop_shuffle()
            .prop_flat_map(|keys| {
                let n = keys.len();
                let values: Vec<_> = keys.iter().map(|k| value_for(k)).collect();
                (Just(keys), values, prop::collection::vec(ws(), n))
            })
            .prop_map(|(k, v, w)| {
                let body: Vec<String> = (0..k.len())
                    .map(|i| format!("{w}\"{k}\"{w}:{w}{v}{w}", k = k[i], v = v[i], w = w[i]))
                    .collect();
                format!("{{{}}}", body.join(","))
            });
        prop_oneof![3 => distinct, 1 => any_keys()]
    }

    fn any_keys() -> impl Strategy<Value = String> {
        prop::collection::vec((key(), value(), ws()), 0..6).prop_map(|fields| {
            let body: Vec<String> = fields
                .into_iter()
                .map(|(k, v, w)| format!("{w}\"{k}\"{w}:{w}{v}{w}"))
                .collect();
            format!("{{{}}}", body.join(","))
        })
    }

    proptest! {
        #[test]
        fn the_fast_path_reads_single_readings_as_serde_does(o in object()) {
            agrees(o.as_bytes())?;
        }

        #[test]
        fn the_fast_path_reads_batches_as_serde_does(
            head in object(),
            rs in prop::collection::vec(object(), 0..4),
            w in ws(),
        ) {
            let list = format!("{w}\"readings\"{w}:{w}[{}]", rs.join(","));
            let p = if head == "{}" {
                format!("{{{list}}}")
            } else {
                format!("{},{list}}}", &head[..head.len() - 1])
            };
            agrees(p.as_bytes())?;
        }

        #[test]
        fn a_cut_or_flipped_payload_is_never_misread(
            rs in prop::collection::vec(object(), 1..3),
            cut in 0usize..400,
            flip in 0usize..400,
            byte in any::<u8>(),
        ) {
            let mut p = format!("{{\"v\":1,\"readings\":[{}]}}", rs.join(",")).into_bytes();
            if flip < p.len() {
                p[flip] = byte;
            }
            p.truncate(cut.max(1).min(p.len()));
            agrees(&p)?;
        }
    }
}
