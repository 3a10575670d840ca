//! The committed plot: aggregate tokens/s against concurrent streams as a self-contained SVG
//! line chart (one line per server × adapter mode × prompt length). Hand-written rather than
//! the `plotters` crate: one chart type needs ~150 lines, while plotters brings a font stack and
//! a dozen crates to every build of the server binary; the output is plain, diff-friendly SVG
//! text with no embedded fonts. Pure.

use std::fmt::Write as _;

use super::report::RunReport;
use super::scenario::Mode;

/// One line of the chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    pub color: &'static str,
    pub dashed: bool,
    /// (concurrency, aggregate tokens/s), sorted by concurrency.
    pub points: Vec<(usize, f64)>,
}

/// The lines of the standard chart: ours on the base and over N adapters, the peer on the
/// base, for every prompt length; solid for the shortest prompt, dashed for longer ones.
pub fn series_from(ours: &RunReport, peer: Option<&RunReport>) -> Vec<Series> {
    let mut prompts: Vec<usize> = ours
        .scenarios
        .iter()
        .chain(peer.into_iter().flat_map(|p| p.scenarios.iter()))
        .map(|s| s.scenario.prompt_tokens)
        .collect();
    prompts.sort_unstable();
    prompts.dedup();
    let mut out = Vec::new();
    let runs = [
        (Some(ours), Mode::Base, "#1f77b4", "base"),
        (Some(ours), Mode::NAdapters, "#2ca02c", "N adapters"),
        (peer, Mode::Base, "#ff7f0e", "base"),
    ];
    for (run, mode, color, what) in runs {
        let Some(run) = run else { continue };
        for (i, &p) in prompts.iter().enumerate() {
            let mut points: Vec<(usize, f64)> = run
                .scenarios
                .iter()
                .filter(|s| s.scenario.mode == mode && s.scenario.prompt_tokens == p)
                .filter(|s| s.summary.ok > 0)
                .map(|s| (s.scenario.concurrency, s.summary.aggregate_tps))
                .collect();
            points.sort_by_key(|x| x.0);
            if points.is_empty() {
                continue;
            }
            out.push(Series {
                label: format!("{} {what}, ~{p}-token prompts", run.label),
                color,
                dashed: i > 0,
                points,
            });
        }
    }
    out
}

/// A "nice" axis maximum (1, 2 or 5 × 10^k) at or above `v`, and its tick step.
fn nice_axis(v: f64) -> (f64, f64) {
    let v = if v.is_finite() && v > 0.0 { v } else { 1.0 };
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * mag >= v {
            let top = m * mag;
            return (top, top / 5.0);
        }
    }
    (10.0 * mag, 2.0 * mag)
}

/// A tick value without float noise (0.6, not 0.6000000000000001).
fn tick_label(v: f64, step: f64) -> String {
    if step >= 1.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Renders the chart. The x axis is log2 (1, 2, 4, 8, 16 streams equally spaced), the y axis
/// linear from 0.
pub fn render_svg(title: &str, series: &[Series]) -> String {
    // The right margin holds the legend: labels up to ~45 characters at 12 px.
    let (w, h) = (860.0, 440.0);
    let (left, right, top, bottom) = (70.0, 320.0, 40.0, 60.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let mut xs: Vec<usize> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    xs.sort_unstable();
    xs.dedup();
    let ymax = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0, f64::max);
    let (ytop, ystep) = nice_axis(ymax * 1.05);
    let lx = |c: usize| (c.max(1) as f64).log2();
    let (x0, x1) = match (xs.first(), xs.last()) {
        (Some(&a), Some(&b)) if b > a => (lx(a), lx(b)),
        (Some(&a), _) => (lx(a) - 1.0, lx(a) + 1.0),
        _ => (0.0, 4.0),
    };
    let px = |c: usize| left + (lx(c) - x0) / (x1 - x0) * pw;
    let py = |v: f64| top + ph - v / ytop * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
        left + pw / 2.0,
        esc(title)
    );
    // Grid and y ticks.
    let mut y = 0.0;
    while y <= ytop + ystep / 2.0 {
        let yy = py(y);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + pw,
            left - 6.0,
            yy + 4.0,
            tick_label(y, ystep)
        );
        y += ystep;
    }
    for &c in &xs {
        let xx = px(c);
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" y1="{top}" x2="{xx:.1}" y2="{:.1}" stroke="#eee"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{c}</text>"##,
            top + ph,
            top + ph + 18.0
        );
    }
    let _ = writeln!(
        s,
        r#"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">concurrent streams</text>"#,
        left + pw / 2.0,
        h - 18.0
    );
    let _ = writeln!(
        s,
        r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">aggregate tokens/s</text>"#,
        top + ph / 2.0,
        top + ph / 2.0
    );
    for (i, se) in series.iter().enumerate() {
        let dash = if se.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let pts: Vec<String> = se
            .points
            .iter()
            .map(|&(c, v)| format!("{:.1},{:.1}", px(c), py(v)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"{dash}/>"#,
            pts.join(" "),
            se.color
        );
        for &(c, v) in &se.points {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{}"><title>{}: {c} streams, {v:.1} tok/s</title></circle>"#,
                px(c),
                py(v),
                se.color,
                esc(&se.label)
            );
        }
        let ly = top + 10.0 + i as f64 * 20.0;
        let lx0 = left + pw + 14.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx0}" y1="{ly}" x2="{}" y2="{ly}" stroke="{}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
            lx0 + 24.0,
            se.color,
            lx0 + 30.0,
            ly + 4.0,
            esc(&se.label)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_maxima_are_round_numbers_above_the_data() {
        assert_eq!(nice_axis(173.0), (200.0, 40.0));
        assert_eq!(nice_axis(240.0), (250.0, 50.0));
        assert_eq!(nice_axis(0.0), (1.0, 0.2));
        assert_eq!(nice_axis(1000.0), (1000.0, 200.0));
    }

    #[test]
    fn the_chart_has_one_polyline_per_series_and_escaped_labels() {
        let series = vec![
            Series {
                label: "ours <base>".into(),
                color: "#1f77b4",
                dashed: false,
                points: vec![(1, 50.0), (4, 90.0), (8, 100.0), (16, 110.0)],
            },
            Series {
                label: "peer".into(),
                color: "#ff7f0e",
                dashed: true,
                points: vec![(1, 60.0), (8, 110.0)],
            },
        ];
        let svg = render_svg("t", &series);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("ours &lt;base&gt;"));
        assert!(svg.contains("stroke-dasharray"));
        // A single point does not divide by zero.
        let one = render_svg(
            "t",
            &[Series {
                label: "x".into(),
                color: "#000",
                dashed: false,
                points: vec![(1, 5.0)],
            }],
        );
        assert!(!one.contains("NaN"));
    }
}
