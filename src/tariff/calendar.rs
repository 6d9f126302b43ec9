//! Day-type calendars: public holidays, adjusted working days and announced
//! critical-peak days, loaded from data files (`tariffs/calendars/*.toml`).
//!
//! ```toml
//! id = "cn-holidays"
//! years = [2026]                      # years the file is complete for
//! holidays = ["2026-10-01", ...]
//! workdays = ["2026-10-10"]           # weekend days that are working days
//! critical_peak_days = ["2026-08-12"] # announced the day before
//! ```
//! Several files may be named by one TOU schedule; they are merged. A date in
//! a year that none of the merged files covers is an error, never a guess.

use std::collections::BTreeSet;

use chrono::{Datelike, NaiveDate, Weekday};

use super::tou::DayType;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Calendar {
    pub ids: Vec<String>,
    pub years: BTreeSet<i32>,
    pub holidays: BTreeSet<NaiveDate>,
    pub workdays: BTreeSet<NaiveDate>,
    pub critical_peak_days: BTreeSet<NaiveDate>,
}

impl Calendar {
    /// Merges `other` into `self` (union of every set).
    pub fn merge(&mut self, other: &Calendar) {
        self.ids.extend(other.ids.iter().cloned());
        self.years.extend(other.years.iter().copied());
        self.holidays.extend(other.holidays.iter().copied());
        self.workdays.extend(other.workdays.iter().copied());
        self.critical_peak_days
            .extend(other.critical_peak_days.iter().copied());
    }

    pub fn covers(&self, date: NaiveDate) -> bool {
        self.years.contains(&date.year())
    }

    /// Day type by precedence: announced critical peak, holiday, weekend
    /// (unless an adjusted working day), weekday.
    pub fn day_type(&self, date: NaiveDate) -> DayType {
        if self.critical_peak_days.contains(&date) {
            DayType::CriticalPeak
        } else if self.holidays.contains(&date) {
            DayType::Holiday
        } else if matches!(date.weekday(), Weekday::Sat | Weekday::Sun)
            && !self.workdays.contains(&date)
        {
            DayType::Weekend
        } else {
            DayType::Weekday
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[test]
    fn precedence_of_day_types() {
        let mut c = Calendar::default();
        c.years.insert(2026);
        c.holidays.insert(d("2026-10-01"));
        c.workdays.insert(d("2026-10-10"));
        c.critical_peak_days.insert(d("2026-10-01"));
        assert_eq!(c.day_type(d("2026-10-01")), DayType::CriticalPeak);
        assert_eq!(c.day_type(d("2026-10-10")), DayType::Weekday); // a Saturday worked
        assert_eq!(c.day_type(d("2026-10-11")), DayType::Weekend);
        assert_eq!(c.day_type(d("2026-10-12")), DayType::Weekday);
        assert!(!c.covers(d("2027-01-01")));
    }
}
