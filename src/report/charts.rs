//! SVG charts with plotters. Values are integers (whole kWh, counts,
//! per-mille shares): exact figures live in the tables next to the charts.

use plotters::coord::Shift;
use plotters::prelude::*;

use super::ReportError;

fn perr(e: impl std::fmt::Display) -> ReportError {
    ReportError::Plot(e.to_string())
}

const W: u32 = 620;
const H: u32 = 300;

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// One chart as an SVG string: a white canvas handed to `draw`, then presented.
fn svg(draw: impl FnOnce(&Area<'_>) -> Result<(), ReportError>) -> Result<String, ReportError> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(perr)?;
        draw(&root)?;
        root.present().map_err(perr)?;
    }
    Ok(out)
}

/// The common frame: title, margins and label areas.
fn frame<'a, 'b>(
    root: &'a Area<'b>,
    title: &str,
    y_label_area: u32,
) -> ChartBuilder<'a, 'b, SVGBackend<'b>> {
    let mut b = ChartBuilder::on(root);
    b.caption(title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(y_label_area);
    b
}

/// Top of the y axis: 10% headroom over the largest value.
fn y_top(values: &[u64]) -> u64 {
    let max = values.iter().copied().max().unwrap_or(0).max(1);
    max + max / 10 + 1
}

/// Vertical bars, one per label.
pub fn bars(
    title: &str,
    y_desc: &str,
    labels: &[String],
    values: &[u64],
) -> Result<String, ReportError> {
    svg(|root| {
        let n = labels.len().max(1) as u32;
        let mut chart = frame(root, title, 60)
            .build_cartesian_2d((0u32..n).into_segmented(), 0u64..y_top(values))
            .map_err(perr)?;
        let fmt = |v: &SegmentValue<u32>| match v {
            SegmentValue::CenterOf(i) => labels.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(labels.len().max(1))
            .x_label_formatter(&fmt)
            .y_desc(y_desc)
            .draw()
            .map_err(perr)?;
        // Plain rectangles, not plotters' Histogram: that one collects bars
        // in a HashMap, so the SVG's element order changed from run to run.
        chart
            .draw_series(values.iter().enumerate().map(|(i, v)| {
                let i = i as u32;
                let mut bar = Rectangle::new(
                    [
                        (SegmentValue::Exact(i), 0),
                        (SegmentValue::Exact(i + 1), *v),
                    ],
                    RGBColor(52, 101, 164).filled(),
                );
                bar.set_margin(0, 0, 4, 4);
                bar
            }))
            .map_err(perr)?;
        Ok(())
    })
}

/// A line over day indexes 0..n with labels for the first and last day.
pub fn line(
    title: &str,
    y_desc: &str,
    labels: &[String],
    values: &[u64],
) -> Result<String, ReportError> {
    svg(|root| {
        let n = values.len().max(2) as u32;
        let mut chart = frame(root, title, 70)
            .build_cartesian_2d(0u32..n - 1, 0u64..y_top(values))
            .map_err(perr)?;
        let fmt = |i: &u32| labels.get(*i as usize).cloned().unwrap_or_default();
        chart
            .configure_mesh()
            .x_labels(6)
            .x_label_formatter(&fmt)
            .y_desc(y_desc)
            .draw()
            .map_err(perr)?;
        chart
            .draw_series(LineSeries::new(
                values.iter().enumerate().map(|(i, v)| (i as u32, *v)),
                RGBColor(204, 0, 0).stroke_width(2),
            ))
            .map_err(perr)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_and_line_render_svg_with_their_labels() {
        let labels = vec!["a".to_string(), "b".to_string()];
        let b = bars("Title B", "kWh", &labels, &[3, 5]).unwrap();
        assert!(b.contains("<svg") && b.contains("Title B") && b.contains("</svg>"));
        let l = line("Title L", "kWh", &labels, &[3, 5]).unwrap();
        assert!(l.contains("<svg") && l.contains("Title L") && l.contains("</svg>"));
    }
}
