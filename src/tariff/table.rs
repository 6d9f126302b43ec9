//! A tariff as a readable text table (`meterflow tariff check`).

use std::fmt::Write;

use rust_decimal::Decimal;

use super::tiered::Accumulation;
use super::tou::{hhmm, DayType};
use super::{Tariff, TariffVersion};

/// Renders the tariff, one block per version.
pub fn render(t: &Tariff) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "tariff   {}  ({})", t.id, t.name);
    let _ = writeln!(s, "file     {}", t.file.display());
    let _ = writeln!(
        s,
        "class    {}   currency {}   timezone {} (UTC{:+03}:{:02})",
        t.class,
        t.currency,
        t.timezone,
        t.utc_offset_secs / 3600,
        (t.utc_offset_secs.abs() % 3600) / 60
    );
    for v in &t.versions {
        s.push('\n');
        version(&mut s, v);
    }
    s
}

fn table(s: &mut String, head: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |s: &mut String, cells: &[String]| {
        s.push_str("  |");
        for (i, c) in cells.iter().enumerate() {
            let _ = write!(s, " {:<width$} |", c, width = w[i]);
        }
        s.push('\n');
    };
    let sep = |s: &mut String| {
        s.push_str("  +");
        for x in &w {
            s.push_str(&"-".repeat(x + 2));
            s.push('+');
        }
        s.push('\n');
    };
    sep(s);
    line(s, &head.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    sep(s);
    for r in rows {
        line(s, r);
    }
    sep(s);
}

fn version(s: &mut String, v: &TariffVersion) {
    let to = v
        .effective_to
        .map_or("(open)".to_string(), |d| d.to_string());
    let _ = writeln!(
        s,
        "version {}: {} .. {}   rounding {}",
        v.id, v.effective_from, to, v.rounding
    );
    let funds = v.funds_per_kwh();
    if let Some(t) = &v.tiers {
        let acc = match t.accumulation {
            Accumulation::Monthly => "per month".to_string(),
            Accumulation::Annual { start_month } => format!("per year from month {start_month}"),
        };
        let mut rows = Vec::new();
        let mut lo = Decimal::ZERO;
        for (i, sur) in t.surcharges.iter().enumerate() {
            let range = match t.limits.get(i) {
                Some(hi) => format!(
                    "{} - {} kWh",
                    if i == 0 { lo } else { lo + Decimal::ONE },
                    hi
                ),
                None => format!("above {lo} kWh"),
            };
            let price = match (&v.tou, v.energy_price) {
                (None, Some(p)) => (p + *sur).to_string(),
                _ => format!("period price + {sur}"),
            };
            rows.push(vec![
                format!("tier {}", i + 1),
                range,
                sur.to_string(),
                price,
            ]);
            if let Some(hi) = t.limits.get(i) {
                lo = *hi;
            }
        }
        let _ = writeln!(s, " tiers ({acc}; limits inclusive):");
        table(s, &["tier", "kWh", "surcharge", "price yuan/kWh"], &rows);
    } else if let Some(p) = v.energy_price {
        let _ = writeln!(s, " energy price {p} yuan/kWh");
    }
    if let Some(tou) = &v.tou {
        let rows: Vec<Vec<String>> = tou
            .periods
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let reg = tou
                    .registers
                    .iter()
                    .position(|r| *r == Some(i as u8))
                    .map_or(String::new(), |r| format!("T{}", r + 1));
                vec![p.name.clone(), p.price.to_string(), reg]
            })
            .collect();
        let _ = writeln!(
            s,
            " time-of-use periods (calendars: {}):",
            tou.calendar_ids.join(", ")
        );
        table(s, &["period", "price yuan/kWh", "meter register"], &rows);
        for season in &tou.seasons {
            let months: Vec<String> = season.months.iter().map(|m| m.to_string()).collect();
            let _ = writeln!(s, " season {} (months {}):", season.name, months.join(","));
            let mut rows = Vec::new();
            for dt in DayType::ALL {
                if let Some(day) = &season.days[dt as usize] {
                    for (i, r) in day.ranges.iter().enumerate() {
                        rows.push(vec![
                            if i == 0 {
                                dt.to_string()
                            } else {
                                String::new()
                            },
                            format!("{}-{}", hhmm(r.start), hhmm(r.end)),
                            tou.periods[r.period as usize].name.clone(),
                        ]);
                    }
                }
            }
            table(s, &["day type", "time", "period"], &rows);
        }
    }
    if !v.funds.is_empty() {
        let mut rows: Vec<Vec<String>> = v
            .funds
            .iter()
            .map(|f| vec![f.name.clone(), f.rate.to_string()])
            .collect();
        rows.push(vec![
            "(total, included in prices)".into(),
            funds.to_string(),
        ]);
        let _ = writeln!(
            s,
            " government funds and surcharges (shown as separate lines):"
        );
        table(s, &["fund", "yuan/kWh"], &rows);
    }
    if let Some(d) = &v.demand {
        let mut line = format!(
            " basic charge by {}: {} yuan/kVA-month, {} yuan/kW-month",
            d.basis, d.capacity_price, d.demand_price
        );
        if let Some((k, f)) = d.high_use_discount {
            let _ = write!(line, "; x{f} when kWh >= {k} per kVA");
        }
        let _ = writeln!(s, "{line}");
    }
    if let Some(p) = &v.power_factor {
        let _ = writeln!(
            s,
            " power factor adjustment: standard {} (1983 table){}",
            p.standard,
            if p.include_export_reactive {
                ", reverse kvarh counted"
            } else {
                ""
            }
        );
    }
    for f in &v.fixed {
        let _ = writeln!(s, " fixed charge {}: {} yuan/month", f.name, f.monthly);
    }
    if let Some(m) = v.minimum_charge {
        let _ = writeln!(s, " minimum charge {m} yuan/month");
    }
    if let Some(l) = &v.late_fee {
        let _ = writeln!(
            s,
            " late fee per day: residential {}, others {} (current year) / {} (earlier years), minimum {}; due {} days after the period",
            l.residential_daily, l.current_year_daily, l.earlier_years_daily, l.minimum, l.due_days
        );
    }
}

/// Advisory checks of the 2021 national TOU rule (not errors): peak/valley
/// ratio at least 3:1, critical peak at least 20% above peak.
pub fn warnings(t: &Tariff) -> Vec<String> {
    let mut w = Vec::new();
    for v in &t.versions {
        let Some(tou) = &v.tou else { continue };
        let price = |n: &str| tou.periods.iter().find(|p| p.name == n).map(|p| p.price);
        if let (Some(peak), Some(valley)) = (price("peak"), price("valley")) {
            if valley > Decimal::ZERO && peak < valley * Decimal::from(3) {
                w.push(format!(
                    "version {}: peak/valley ratio {:.2} is below 3:1",
                    v.id,
                    peak / valley
                ));
            }
        }
        for sharp in ["sharp", "critical_peak"] {
            if let (Some(s), Some(peak)) = (price(sharp), price("peak")) {
                if s < peak * Decimal::new(12, 1) {
                    w.push(format!(
                        "version {}: {sharp} is less than 20% above peak",
                        v.id
                    ));
                }
            }
        }
    }
    w
}
