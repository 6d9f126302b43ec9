//! Time of use: periods with prices, seasons (month sets), day types and
//! per day type a list of time ranges covering the whole day.
//!
//! A day schedule is written as strings `"HH:MM-HH:MM period"`; ranges must
//! cover 00:00-24:00 with no gap and no overlap. Day types fall back:
//! critical peak -> holiday -> weekend -> weekday, so a tariff that treats
//! every day alike writes only `weekday`.

use std::fmt;

use chrono::{Datelike, NaiveDate};
use rust_decimal::Decimal;

use super::calendar::Calendar;

/// Most periods a TOU schedule may have (sharp, peak, flat, valley, deep valley, ...).
pub const MAX_PERIODS: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DayType {
    Weekday,
    Weekend,
    Holiday,
    CriticalPeak,
}

impl DayType {
    pub const ALL: [DayType; 4] = [
        DayType::Weekday,
        DayType::Weekend,
        DayType::Holiday,
        DayType::CriticalPeak,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DayType::Weekday => "weekday",
            DayType::Weekend => "weekend",
            DayType::Holiday => "holiday",
            DayType::CriticalPeak => "critical_peak",
        }
    }

    fn fallback(self) -> Option<DayType> {
        match self {
            DayType::CriticalPeak => Some(DayType::Holiday),
            DayType::Holiday => Some(DayType::Weekend),
            DayType::Weekend => Some(DayType::Weekday),
            DayType::Weekday => None,
        }
    }
}

impl fmt::Display for DayType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Period {
    pub name: String,
    pub price: Decimal,
}

/// One range of a day: minutes `[start, end)` of the local day, and a period index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub start: u16,
    pub end: u16,
    pub period: u8,
}

/// Ranges sorted by start, covering [0, 1440) exactly.
#[derive(Debug, Clone, PartialEq)]
pub struct DaySchedule {
    pub ranges: Vec<Range>,
}

impl DaySchedule {
    pub fn period_at(&self, minute: u16) -> u8 {
        // Few ranges per day: a linear scan beats a binary search.
        for r in &self.ranges {
            if minute < r.end {
                return r.period;
            }
        }
        self.ranges.last().map(|r| r.period).unwrap_or(0)
    }

    /// Checks gaps and overlaps; ranges must already be sorted by start.
    pub fn check_cover(ranges: &[Range]) -> Result<(), String> {
        let mut at = 0u16;
        for r in ranges {
            if r.start > at {
                return Err(format!("gap from {} to {}", hhmm(at), hhmm(r.start)));
            }
            if r.start < at {
                return Err(format!(
                    "overlap: {}-{} starts before the previous range ends at {}",
                    hhmm(r.start),
                    hhmm(r.end),
                    hhmm(at)
                ));
            }
            at = r.end;
        }
        if at != 1440 {
            return Err(format!("gap from {} to 24:00", hhmm(at)));
        }
        Ok(())
    }
}

pub fn hhmm(m: u16) -> String {
    format!("{:02}:{:02}", m / 60, m % 60)
}

/// Parses `"HH:MM-HH:MM name"` into minutes and the name; 24:00 is allowed as an end.
pub fn parse_range(s: &str) -> Result<(u16, u16, &str), String> {
    let bad = || format!("'{s}' is not \"HH:MM-HH:MM period\"");
    let (times, name) = s.trim().split_once(char::is_whitespace).ok_or_else(bad)?;
    let (a, b) = times.split_once('-').ok_or_else(bad)?;
    let minutes = |t: &str| -> Result<u16, String> {
        let (h, m) = t.split_once(':').ok_or_else(bad)?;
        let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if m >= 60 || h > 24 || (h == 24 && m != 0) {
            return Err(format!("'{t}' is not a time of day"));
        }
        Ok(h * 60 + m)
    };
    let (start, end) = (minutes(a)?, minutes(b)?);
    if end <= start {
        return Err(format!(
            "range '{times}' ends before it starts (split ranges that cross midnight)"
        ));
    }
    Ok((start, end, name.trim()))
}

#[derive(Debug, Clone, PartialEq)]
pub struct Season {
    pub name: String,
    pub months: Vec<u32>,
    /// Indexed by `DayType as usize`.
    pub days: [Option<DaySchedule>; 4],
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tou {
    pub periods: Vec<Period>,
    pub seasons: Vec<Season>,
    /// Calendar file ids (in `tariffs/calendars/`), merged.
    pub calendar_ids: Vec<String>,
    /// The merged calendar, resolved at load time.
    pub calendar: Calendar,
    /// Period index of the meter's tariff registers T1..T4 (sharp, peak, flat, valley).
    pub registers: [Option<u8>; 4],
}

impl Tou {
    pub fn period_index(&self, name: &str) -> Option<u8> {
        self.periods
            .iter()
            .position(|p| p.name == name)
            .map(|i| i as u8)
    }

    pub fn season(&self, month: u32) -> &Season {
        self.seasons
            .iter()
            .find(|s| s.months.contains(&month))
            .expect("validated: seasons cover all months")
    }

    /// The schedule for a local date and the day type it was chosen for.
    pub fn schedule(&self, date: NaiveDate) -> Result<(&DaySchedule, DayType), String> {
        if !self.calendar.covers(date) {
            return Err(format!(
                "calendar {} does not cover {} (add the year's holidays to tariffs/calendars/)",
                self.calendar_ids.join("+"),
                date.year()
            ));
        }
        let season = self.season(date.month());
        let mut t = self.calendar.day_type(date);
        loop {
            if let Some(s) = &season.days[t as usize] {
                return Ok((s, t));
            }
            t = t
                .fallback()
                .expect("validated: every season has a weekday schedule");
        }
    }

    /// Period index of the local minute `minute` of `date`.
    pub fn period_at(&self, date: NaiveDate, minute: u16) -> Result<u8, String> {
        Ok(self.schedule(date)?.0.period_at(minute))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_cover() {
        assert_eq!(
            parse_range("00:00-08:00 valley").unwrap(),
            (0, 480, "valley")
        );
        assert_eq!(
            parse_range("19:00-24:00 flat").unwrap(),
            (1140, 1440, "flat")
        );
        assert!(parse_range("22:00-06:00 valley").is_err());
        assert!(parse_range("8-9 peak").is_err());
        let r = |s, e| Range {
            start: s,
            end: e,
            period: 0,
        };
        assert!(DaySchedule::check_cover(&[r(0, 480), r(480, 1440)]).is_ok());
        assert!(DaySchedule::check_cover(&[r(0, 480), r(500, 1440)])
            .unwrap_err()
            .contains("gap from 08:00 to 08:20"));
        assert!(DaySchedule::check_cover(&[r(0, 480), r(400, 1440)])
            .unwrap_err()
            .contains("overlap"));
        assert!(DaySchedule::check_cover(&[r(0, 480)])
            .unwrap_err()
            .contains("24:00"));
    }
}
