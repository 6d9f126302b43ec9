//! Quality flags carried by every reading, stored as a comma-separated list.

use std::borrow::Cow;
use std::fmt;

/// Bit set of quality flags. Empty means `ok`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Quality(u16);

macro_rules! flags {
    ($( $name:ident = $bit:literal, $text:literal, $doc:literal; )*) => {
        impl Quality {
            $( #[doc = $doc] pub const $name: Quality = Quality(1 << $bit); )*
            const NAMES: &'static [(Quality, &'static str)] = &[ $( (Quality::$name, $text), )* ];
        }
    };
}

flags! {
    ESTIMATED = 0, "estimated", "value was estimated, not measured";
    SUSPECT = 1, "suspect", "failed a validation check (spike, backwards, ...)";
    ROLLOVER = 2, "rollover", "register wrapped at its modulus since the previous reading";
    REPLACED = 3, "replaced", "first/last reading of an exchanged meter";
    CLOCK_SKEW = 4, "clock_skew", "meter clock differed from the collector beyond the threshold";
    EDITED = 5, "edited", "value was manually edited";
    CONFLICT = 6, "conflict", "another reading with the same key has a different value";
    DEVICE_ERROR = 7, "device_error", "device reported an error or out-of-range value";
    OFFLINE = 8, "offline", "device was reported offline (e.g. Sparkplug DDEATH)";
}

impl Quality {
    pub const OK: Quality = Quality(0);

    pub fn bits(self) -> u16 {
        self.0
    }
    pub fn from_bits(bits: u16) -> Quality {
        Quality(bits)
    }
    pub fn is_ok(self) -> bool {
        self.0 == 0
    }
    pub fn contains(self, other: Quality) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }
    pub fn with(self, other: Quality) -> Quality {
        Quality(self.0 | other.0)
    }

    /// Parses `ok` or a comma-separated list of flag names.
    pub fn parse(s: &str) -> Result<Quality, String> {
        let mut q = Quality::OK;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if part == "ok" {
                continue;
            }
            match Quality::NAMES.iter().find(|(_, n)| *n == part) {
                Some((f, _)) => q = q.with(*f),
                None => return Err(format!("unknown quality flag '{part}'")),
            }
        }
        Ok(q)
    }

    /// The `Display` text, borrowed when it is `ok` or a single flag (the
    /// Parquet writers take one per reading).
    #[inline]
    pub fn text(self) -> Cow<'static, str> {
        flag_text(self, Quality::OK, Quality::NAMES, "ok")
    }

    pub fn flag_names() -> impl Iterator<Item = &'static str> {
        Quality::NAMES.iter().map(|(_, n)| *n)
    }
}

/// The `Display` text of a set of named flags, without building a string
/// for no flag (`none_text`) or a single one: the text columns of the lake
/// and of the bill outputs take one per row (inlined there, so the common
/// no-flag case is a compare).
#[inline]
pub fn flag_text<F: Copy + PartialEq + fmt::Display>(
    set: F,
    none: F,
    names: &'static [(F, &'static str)],
    none_text: &'static str,
) -> Cow<'static, str> {
    if set == none {
        return none_text.into();
    }
    match names.iter().find(|(f, _)| *f == set) {
        Some((_, name)) => (*name).into(),
        None => set.to_string().into(),
    }
}

impl std::ops::BitOr for Quality {
    type Output = Quality;
    fn bitor(self, rhs: Quality) -> Quality {
        self.with(rhs)
    }
}

impl fmt::Display for Quality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_ok() {
            return f.write_str("ok");
        }
        let mut first = true;
        for (flag, name) in Quality::NAMES {
            if self.contains(*flag) {
                if !first {
                    f.write_str(",")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        Ok(())
    }
}

impl serde::Serialize for Quality {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Quality {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Quality::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_print_and_parse_back() {
        let q = Quality::ESTIMATED | Quality::ROLLOVER;
        assert_eq!(q.to_string(), "estimated,rollover");
        assert_eq!(Quality::parse("estimated,rollover").unwrap(), q);
        assert_eq!(Quality::OK.to_string(), "ok");
        assert_eq!(Quality::parse("ok").unwrap(), Quality::OK);
        assert!(Quality::parse("shiny").is_err());
    }

    #[test]
    fn text_is_the_display_text_borrowed_when_it_can_be() {
        let cases = [
            Quality::OK,
            Quality::ESTIMATED,
            Quality::ROLLOVER,
            Quality::ESTIMATED | Quality::ROLLOVER,
        ];
        for q in cases {
            assert_eq!(q.text(), q.to_string());
        }
        assert!(matches!(
            Quality::ESTIMATED.text(),
            std::borrow::Cow::Borrowed(_)
        ));
        assert!(matches!(
            (Quality::ESTIMATED | Quality::ROLLOVER).text(),
            std::borrow::Cow::Owned(_)
        ));
    }
}
