//! Flags carried from readings to bill lines and bills. Documented one by one
//! in docs/billing.md.

use std::fmt;

macro_rules! bill_flags {
    ($( $name:ident = $bit:literal, $text:literal; )*) => {
        /// Bit set of bill flags. Empty means a clean bill on measured data.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
        pub struct Flags(pub u32);
        impl Flags {
            $( pub const $name: Flags = Flags(1 << $bit); )*
            pub const NAMES: &'static [(Flags, &'static str)] = &[ $( (Flags::$name, $text), )* ];
        }
    };
}

bill_flags! {
    ESTIMATED = 0, "estimated";
    ROLLOVER = 1, "rollover";
    METER_EXCHANGE = 2, "meter_exchange";
    NEGATIVE_STEP = 3, "negative_step";
    SPIKE = 4, "spike";
    ZERO_RUN = 5, "zero_run";
    GAP = 6, "gap";
    CLOCK_SKEW = 7, "clock_skew";
    REGISTER_SUM_MISMATCH = 8, "register_sum_mismatch";
    INTERVAL_MISMATCH = 9, "interval_mismatch";
    INTERVAL_ESTIMATED = 10, "interval_estimated";
    SOURCE_QUALITY = 11, "source_quality";
    YTD_ESTIMATED = 12, "ytd_estimated";
    PRORATED = 13, "prorated";
    PRICE_CHANGE = 14, "price_change";
    DEMAND_MISSING = 15, "demand_missing";
    ADJUSTED = 16, "adjusted";
    MINIMUM_CHARGE = 17, "minimum_charge";
    PF_MISSING = 18, "pf_missing";
    YTD_CARRIED = 19, "ytd_carried";
}

impl Flags {
    pub const NONE: Flags = Flags(0);

    pub fn contains(self, f: Flags) -> bool {
        self.0 & f.0 == f.0 && f.0 != 0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The `Display` text, borrowed when there is at most one flag (written
    /// for every bill line, and most lines have none or one).
    pub fn text(self) -> std::borrow::Cow<'static, str> {
        crate::model::flag_text(self, Flags::NONE, Flags::NAMES, "")
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, o: Flags) -> Flags {
        Flags(self.0 | o.0)
    }
}

impl std::ops::BitOrAssign for Flags {
    fn bitor_assign(&mut self, o: Flags) {
        self.0 |= o.0;
    }
}

impl fmt::Display for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (flag, name) in Flags::NAMES {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_the_display_text_borrowed_for_none_or_one_flag() {
        for f in [
            Flags::NONE,
            Flags::ESTIMATED,
            Flags::YTD_CARRIED,
            Flags::ESTIMATED | Flags::SPIKE | Flags::GAP,
        ] {
            assert_eq!(f.text(), f.to_string());
        }
        assert_eq!(Flags::NONE.text(), "");
        assert!(matches!(Flags::SPIKE.text(), std::borrow::Cow::Borrowed(_)));
        assert_eq!((Flags::ESTIMATED | Flags::GAP).text(), "estimated,gap");
    }
}
