//! The dashboard's plots, drawn here as SVG (plotters' SVG backend) from the kept samples: store use
//! against its budget, bytes served against bytes fetched from upstream, and the uplink's use by class
//! (foreground, background) under its cap. Time runs along x as
//! minutes before now, so that the page needs no clock of its own.

use plotters::prelude::*;

use super::samples::Sample;

/// The plots' size in pixels; the page scales them to its width.
const SIZE: (u32, u32) = (720, 260);
/// The shortest span of time shown, so that a node just started does not draw a zoomed-in blur.
const MIN_SPAN_MINUTES: f64 = 2.0;

const SERVED: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
const FETCHED: RGBColor = RGBColor(0xd6, 0x62, 0x0a);
const BUDGET: RGBColor = RGBColor(0xb0, 0x20, 0x20);
const FOREGROUND: RGBColor = SERVED;
const BACKGROUND: RGBColor = RGBColor(0x2c, 0xa0, 0x2c);

#[derive(Debug, thiserror::Error)]
#[error("cannot draw the {plot} plot: {cause}")]
pub struct PlotError {
    plot: &'static str,
    cause: String,
}

/// One line to draw: its points (minutes before now, value in the plot's unit), name (none: no entry in
/// the legend) and colour.
struct Line {
    points: Vec<(f64, f64)>,
    name: &'static str,
    colour: RGBColor,
}

/// Bytes per second served to clients and fetched from upstream, each interval between two samples
/// drawn as a step at its average rate.
pub fn traffic(samples: &[Sample], now_ms: u64) -> Result<String, PlotError> {
    let served = rates(samples, |s| s.served);
    let fetched = rates(samples, |s| s.fetched);
    let top = served
        .iter()
        .chain(&fetched)
        .map(|p| p.1)
        .fold(0.0, f64::max);
    let (div, unit) = unit_of(top);
    let lines = [
        scaled(&served, div, now_ms, "served to clients", SERVED),
        scaled(&fetched, div, now_ms, "fetched from upstream", FETCHED),
    ];
    draw(
        "traffic",
        &format!("{unit}/s"),
        span(samples, now_ms),
        &lines,
    )
}

/// Bytes per second the uplink carried for clients waiting (foreground) and for background work,
/// each interval a step at its average rate as in [`traffic`], under the cap (`uplink.max_rate`)
/// wherever one was set.
pub fn uplink(samples: &[Sample], now_ms: u64) -> Result<String, PlotError> {
    let foreground = rates(samples, |s| s.uplink_foreground);
    let background = rates(samples, |s| s.uplink_background);
    let caps = cap_runs(samples);
    let top = foreground
        .iter()
        .chain(&background)
        .chain(caps.iter().flatten())
        .map(|p| p.1)
        .fold(0.0, f64::max);
    let (div, unit) = unit_of(top);
    let mut lines = vec![
        scaled(
            &foreground,
            div,
            now_ms,
            "foreground (clients waiting)",
            FOREGROUND,
        ),
        scaled(
            &background,
            div,
            now_ms,
            "background (prefetch jobs)",
            BACKGROUND,
        ),
    ];
    for (i, run) in caps.iter().enumerate() {
        // One legend entry for the cap, however often it was lifted and set again.
        let name = if i == 0 { "cap (max_rate)" } else { "" };
        lines.push(scaled(run, div, now_ms, name, BUDGET));
    }
    draw(
        "uplink",
        &format!("{unit}/s"),
        span(samples, now_ms),
        &lines,
    )
}

/// The rate of counter `v` over each interval between two samples, as a step: (start, rate),
/// (end, rate). Intervals of no length are left out.
fn rates(samples: &[Sample], v: fn(&Sample) -> u64) -> Vec<(u64, f64)> {
    let mut out = Vec::new();
    for w in samples.windows(2) {
        let secs = w[1].at_ms.saturating_sub(w[0].at_ms) as f64 / 1000.0;
        if secs <= 0.0 {
            continue;
        }
        let rate = v(&w[1]).saturating_sub(v(&w[0])) as f64 / secs;
        out.push((w[0].at_ms, rate));
        out.push((w[1].at_ms, rate));
    }
    out
}

/// The cap over time, one run of points per stretch of samples that had one; a change of the cap
/// between two samples is drawn as a step at the later one.
fn cap_runs(samples: &[Sample]) -> Vec<Vec<(u64, f64)>> {
    let mut runs: Vec<Vec<(u64, f64)>> = Vec::new();
    let mut capped = false;
    for s in samples {
        if s.uplink_cap == 0 {
            capped = false;
            continue;
        }
        if !capped {
            runs.push(Vec::new());
            capped = true;
        }
        let Some(run) = runs.last_mut() else { continue };
        let cap = s.uplink_cap as f64;
        if let Some(&(_, before)) = run.last() {
            if before != cap {
                run.push((s.at_ms, before));
            }
        }
        run.push((s.at_ms, cap));
    }
    runs
}

/// Points (time, value in bytes) as a line in the plot's unit (`div` bytes).
fn scaled(
    points: &[(u64, f64)],
    div: f64,
    now_ms: u64,
    name: &'static str,
    colour: RGBColor,
) -> Line {
    Line {
        points: points
            .iter()
            .map(|&(at, v)| (minutes_before(now_ms, at), v / div))
            .collect(),
        name,
        colour,
    }
}

/// Bytes the store holds, and what it may use.
pub fn store(samples: &[Sample], now_ms: u64) -> Result<String, PlotError> {
    let top = samples
        .iter()
        .map(|s| s.store_budget.max(s.store_used))
        .max()
        .unwrap_or(0);
    let (div, unit) = unit_of(top as f64);
    let line = |v: fn(&Sample) -> u64, name, colour| Line {
        points: samples
            .iter()
            .map(|s| (minutes_before(now_ms, s.at_ms), v(s) as f64 / div))
            .collect(),
        name,
        colour,
    };
    let lines = [
        line(|s| s.store_used, "stored", SERVED),
        line(|s| s.store_budget, "budget (may use)", BUDGET),
    ];
    draw("store", unit, span(samples, now_ms), &lines)
}

fn minutes_before(now_ms: u64, at_ms: u64) -> f64 {
    -(now_ms.saturating_sub(at_ms) as f64 / 60_000.0)
}

/// Minutes from the oldest sample to now, at least [`MIN_SPAN_MINUTES`].
fn span(samples: &[Sample], now_ms: u64) -> f64 {
    let oldest = samples.first().map(|s| -minutes_before(now_ms, s.at_ms));
    oldest.unwrap_or(0.0).max(MIN_SPAN_MINUTES)
}

/// The binary unit that suits values up to `top`: its size in bytes and its name.
fn unit_of(top: f64) -> (f64, &'static str) {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut div = 1.0;
    let mut i = 0;
    while top / div >= 1024.0 && i < UNITS.len() - 1 {
        div *= 1024.0;
        i += 1;
    }
    (div, UNITS[i])
}

fn draw(plot: &'static str, unit: &str, span: f64, lines: &[Line]) -> Result<String, PlotError> {
    let fail = |e: &dyn std::fmt::Display| PlotError {
        plot,
        cause: e.to_string(),
    };
    let top = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .fold(0.0, f64::max);
    // Headroom above the highest point; an empty plot still gets an axis from 0 to 1.
    let y_max = if top > 0.0 { top * 1.15 } else { 1.0 };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(34)
            .y_label_area_size(64)
            .build_cartesian_2d(-span..0.0, 0.0..y_max)
            .map_err(|e| fail(&e))?;
        chart
            .configure_mesh()
            .x_desc("minutes ago")
            .y_desc(unit)
            .label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 14))
            // `0.0 - x`, not `-x`: the right end is "0", not "-0".
            .x_label_formatter(&|x| {
                if span < 10.0 {
                    format!("{:.1}", 0.0 - x)
                } else {
                    format!("{:.0}", 0.0 - x)
                }
            })
            .y_label_formatter(&|y| format!("{y:.1}"))
            .light_line_style(RGBColor(0xee, 0xee, 0xee))
            .draw()
            .map_err(|e| fail(&e))?;
        for l in lines {
            let colour = l.colour;
            let series = chart
                .draw_series(LineSeries::new(
                    l.points.iter().copied(),
                    colour.stroke_width(2),
                ))
                .map_err(|e| fail(&e))?;
            if !l.name.is_empty() {
                series
                    .label(l.name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour));
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 13))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(0xcc, 0xcc, 0xcc))
            .draw()
            .map_err(|e| fail(&e))?;
        root.present().map_err(|e| fail(&e))?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_s: u64, served: u64, fetched: u64) -> Sample {
        Sample {
            at_ms: at_s * 1000,
            served,
            fetched,
            store_used: served,
            store_budget: 10 << 20,
            ..Sample::default()
        }
    }

    /// A sample of the uplink's counters: foreground and background bytes so far, and the cap.
    fn up(at_s: u64, foreground: u64, background: u64, cap: u64) -> Sample {
        Sample {
            at_ms: at_s * 1000,
            uplink_foreground: foreground,
            uplink_background: background,
            uplink_cap: cap,
            ..Sample::default()
        }
    }

    /// The points of the data lines (drawn 2 px wide; the mesh and the legend's marks are 1 px) in
    /// `colour`.
    fn lines(svg: &str, colour: RGBColor) -> Vec<String> {
        let stroke = format!(
            "stroke=\"#{:02X}{:02X}{:02X}\" stroke-width=\"2\" points=\"",
            colour.0, colour.1, colour.2
        );
        svg.lines()
            .filter_map(|l| l.split_once(stroke.as_str()))
            .map(|(_, pts)| pts.split('"').next().unwrap_or("").trim().to_string())
            .collect()
    }

    #[test]
    fn traffic_draws_served_and_fetched_once_two_samples_exist() {
        let none = traffic(&[sample(0, 0, 0)], 1000).unwrap();
        assert!(none.starts_with("<svg"), "{none}");
        assert!(lines(&none, SERVED).iter().all(String::is_empty), "{none}");
        let s = [
            sample(0, 0, 0),
            sample(10, 10 << 20, 5 << 20),
            sample(20, 30 << 20, 5 << 20),
        ];
        let svg = traffic(&s, 20_000).unwrap();
        assert!(svg.contains("MiB/s"), "{svg}");
        assert!(svg.contains("served to clients") && svg.contains("fetched from upstream"));
        // Two intervals, each a step of two points: 1 MiB/s then 2 MiB/s served.
        let served = lines(&svg, SERVED);
        assert_eq!(served.len(), 1, "{svg}");
        assert_eq!(served[0].split(' ').count(), 4, "{svg}");
        assert_eq!(lines(&svg, FETCHED).len(), 1, "{svg}");
    }

    #[test]
    fn store_is_drawn_against_its_budget() {
        let s = [sample(0, 1 << 20, 0), sample(10, 2 << 20, 0)];
        let svg = store(&s, 10_000).unwrap();
        assert!(
            svg.contains("budget (may use)") && svg.contains("\nMiB\n"),
            "{svg}"
        );
        assert_eq!(lines(&svg, SERVED)[0].split(' ').count(), 2, "{svg}");
        assert_eq!(lines(&svg, BUDGET)[0].split(' ').count(), 2, "{svg}");
    }

    #[test]
    fn uplink_draws_each_class_and_the_cap_only_where_set() {
        // 1 MiB/s foreground then 2 MiB/s background, without a cap.
        let s = [
            up(0, 0, 0, 0),
            up(10, 10 << 20, 0, 0),
            up(20, 10 << 20, 20 << 20, 0),
        ];
        let svg = uplink(&s, 20_000).unwrap();
        assert!(svg.contains("MiB/s") && svg.contains("foreground (clients waiting)"));
        assert!(!svg.contains("cap (max_rate)"), "{svg}");
        let (fg, bg) = (lines(&svg, FOREGROUND), lines(&svg, BACKGROUND));
        assert_eq!((fg.len(), bg.len()), (1, 1), "{svg}");
        assert_ne!(fg[0], bg[0], "the classes are drawn apart: {svg}");
        assert!(lines(&svg, BUDGET).is_empty(), "{svg}");
        // A cap set, lifted, and set again: two stretches of the cap line, one legend entry.
        let capped = [
            up(0, 0, 0, 4 << 20),
            up(10, 0, 0, 4 << 20),
            up(20, 0, 0, 0),
            up(30, 0, 0, 8 << 20),
            up(40, 0, 0, 6 << 20),
        ];
        let svg = uplink(&capped, 40_000).unwrap();
        assert_eq!(svg.matches("cap (max_rate)").count(), 1, "{svg}");
        let cap = lines(&svg, BUDGET);
        assert_eq!(cap.len(), 2, "{svg}");
        // 8 MiB/s then 6 MiB/s: a step of three points.
        assert_eq!(cap[1].split(' ').count(), 3, "{svg}");
    }
}
