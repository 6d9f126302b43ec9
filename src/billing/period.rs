//! Bill periods in local dates, and their boundaries in UTC.

use chrono::{Datelike, NaiveDate, NaiveTime};

/// A bill period `[start, end)` of local dates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillPeriod {
    /// `2026-10`, or `2026-10-05..2026-11-19`.
    pub label: String,
    pub start: NaiveDate,
    /// Exclusive.
    pub end: NaiveDate,
    /// True for a calendar month: tier limits and monthly charges apply whole.
    pub whole_month: bool,
}

impl BillPeriod {
    /// Parses `YYYY-MM` (a calendar month) or `YYYY-MM-DD..YYYY-MM-DD` (end exclusive).
    pub fn parse(s: &str) -> Result<BillPeriod, String> {
        if let Some((a, b)) = s.split_once("..") {
            let p = |x: &str| {
                NaiveDate::parse_from_str(x.trim(), "%Y-%m-%d")
                    .map_err(|_| format!("'{x}' is not a date YYYY-MM-DD"))
            };
            let (start, end) = (p(a)?, p(b)?);
            if end <= start {
                return Err(format!("period {s}: the end must be after the start"));
            }
            let whole_month = start.day() == 1 && next_month(start) == end;
            return Ok(BillPeriod {
                label: s.to_string(),
                start,
                end,
                whole_month,
            });
        }
        let start = NaiveDate::parse_from_str(&format!("{}-01", s.trim()), "%Y-%m-%d")
            .map_err(|_| format!("period '{s}' is not YYYY-MM or YYYY-MM-DD..YYYY-MM-DD"))?;
        Ok(BillPeriod {
            label: s.trim().to_string(),
            start,
            end: next_month(start),
            whole_month: true,
        })
    }

    pub fn days(&self) -> i64 {
        (self.end - self.start).num_days()
    }

    /// Days of a whole month for proration: the month's own length for a
    /// calendar month, 30 otherwise (45 days -> 1.5 x the monthly limits).
    pub fn month_basis_days(&self) -> i64 {
        if self.whole_month {
            self.days()
        } else {
            30
        }
    }
}

pub fn next_month(d: NaiveDate) -> NaiveDate {
    let (y, m) = if d.month() == 12 {
        (d.year() + 1, 1)
    } else {
        (d.year(), d.month() + 1)
    };
    NaiveDate::from_ymd_opt(y, m, 1).expect("valid")
}

/// UTC milliseconds of local midnight starting `date` at `utc_offset_secs`.
pub fn local_midnight_ms(date: NaiveDate, utc_offset_secs: i32) -> i64 {
    date.and_time(NaiveTime::MIN).and_utc().timestamp_millis() - utc_offset_secs as i64 * 1000
}

/// Local date and minute of day of a UTC instant.
pub fn local_date_minute(ts_ms: i64, utc_offset_secs: i32) -> (NaiveDate, u16) {
    let local = ts_ms + utc_offset_secs as i64 * 1000;
    let days = local.div_euclid(86_400_000);
    let minute = (local.rem_euclid(86_400_000) / 60_000) as u16;
    let date = NaiveDate::from_num_days_from_ce_opt(719_163 + days as i32).expect("date in range");
    (date, minute)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_parse() {
        let p = BillPeriod::parse("2026-10").unwrap();
        assert_eq!(
            (p.days(), p.whole_month, p.month_basis_days()),
            (31, true, 31)
        );
        let p = BillPeriod::parse("2026-12").unwrap();
        assert_eq!(p.end, NaiveDate::from_ymd_opt(2027, 1, 1).unwrap());
        let p = BillPeriod::parse("2026-10-05..2026-11-19").unwrap();
        assert_eq!(
            (p.days(), p.whole_month, p.month_basis_days()),
            (45, false, 30)
        );
        assert!(BillPeriod::parse("2026-13").is_err());
    }

    #[test]
    fn local_time_round_trips() {
        let d = NaiveDate::from_ymd_opt(2026, 10, 1).unwrap();
        let ms = local_midnight_ms(d, 8 * 3600);
        assert_eq!(local_date_minute(ms, 8 * 3600), (d, 0));
        assert_eq!(
            local_date_minute(ms - 60_000, 8 * 3600),
            (d.pred_opt().unwrap(), 1439)
        );
    }
}
