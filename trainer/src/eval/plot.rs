//! Line charts as standalone SVG (no dependencies): the report's loss and accuracy curves,
//! referenced from `report.md` so they render wherever Markdown does.

use std::fmt::Write as _;

/// One named line of points (x ascending).
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Stroke colour (CSS).
    pub colour: &'static str,
    /// Whether the line is dashed (a reference line such as a baseline).
    pub dashed: bool,
    /// The points.
    pub points: Vec<(f64, f64)>,
}

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 360.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 48.0;
const TICKS: usize = 5;

/// Text safe inside SVG.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A tick label: few digits, no trailing zeros.
fn label(v: f64) -> String {
    let s = if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Axis bounds and tick step for the finite values: "nice" numbers (1, 2 or 5 × 10^k) that
/// enclose the data; a flat or empty range is widened.
fn axis(values: impl Iterator<Item = f64>) -> (f64, f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    let (lo, hi) = if !lo.is_finite() {
        (0.0, 1.0)
    } else if hi - lo < 1e-12 {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    };
    let raw = (hi - lo) / TICKS as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    ((lo / step).floor() * step, (hi / step).ceil() * step, step)
}

/// An SVG line chart of `series` with a title and axis labels; `None` when no series has a
/// finite point (nothing to draw).
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Option<String> {
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    if !series.iter().any(|s| s.points.iter().any(|p| finite(&p))) {
        return None;
    }
    let all = || series.iter().flat_map(|s| s.points.iter().filter(finite));
    let (x0, x1, x_step) = axis(all().map(|p| p.0));
    let (y0, y1, y_step) = axis(all().map(|p| p.1));
    let (pw, ph) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| TOP + ph - (y - y0) / (y1 - y0) * ph;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    let ticks = |lo: f64, hi: f64, step: f64| {
        let n = ((hi - lo) / step).round() as usize;
        (0..=n).map(move |i| lo + i as f64 * step)
    };
    for yv in ticks(y0, y1, y_step) {
        let y = sy(yv);
        let _ = write!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            y + 4.0,
            label(yv)
        );
    }
    for xv in ticks(x0, x1, x_step) {
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            sx(xv),
            TOP + ph + 16.0,
            label(xv)
        );
    }
    let _ = write!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#888"/><text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text><text transform="translate(16 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"##,
        LEFT + pw / 2.0,
        HEIGHT - 10.0,
        escape(x_label),
        TOP + ph / 2.0,
        escape(y_label)
    );
    for (i, line) in series.iter().enumerate() {
        let points: Vec<String> = line
            .points
            .iter()
            .filter(finite)
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let dash = if line.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="2"{dash} points="{}"/>"#,
            line.colour,
            points.join(" ")
        );
        if points.len() == 1 {
            let (x, y) = points[0].split_once(',').unwrap_or(("0", "0"));
            let _ = write!(
                s,
                r#"<circle cx="{x}" cy="{y}" r="3" fill="{}"/>"#,
                line.colour
            );
        }
        let ly = TOP + 14.0 + 16.0 * i as f64;
        let lx = LEFT + pw - 170.0;
        let _ = write!(
            s,
            r#"<line x1="{lx}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            ly - 4.0,
            lx + 20.0,
            ly - 4.0,
            line.colour,
            lx + 26.0,
            ly,
            escape(&line.name)
        );
    }
    s.push_str("</svg>\n");
    Some(s)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn polyline(svg: &str, n: usize) -> Vec<(f64, f64)> {
        let start = svg.match_indices("<polyline").nth(n).unwrap().0;
        let points = &svg[start..];
        let points = &points[points.find("points=\"").unwrap() + 8..];
        let points = &points[..points.find('"').unwrap()];
        points
            .split(' ')
            .map(|p| {
                let (x, y) = p.split_once(',').unwrap();
                (x.parse().unwrap(), y.parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn points_map_into_the_plot_area_in_order_and_up_is_larger() {
        let falling = Series {
            name: "train <loss>".into(),
            colour: "#1f77b4",
            dashed: false,
            points: vec![(0.0, 3.0), (50.0, 2.0), (100.0, 1.0), (150.0, f64::NAN)],
        };
        let svg = line_chart("Loss", "step", "loss", &[falling]).unwrap();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("train &lt;loss&gt;"), "legend escaped");
        let p = polyline(&svg, 0);
        assert_eq!(p.len(), 3, "the NaN point is left out");
        assert!(p.windows(2).all(|w| w[0].0 < w[1].0), "x ascending");
        assert!(
            p.windows(2).all(|w| w[0].1 < w[1].1),
            "falling loss goes down the page"
        );
        for (x, y) in p {
            assert!((LEFT..=WIDTH - RIGHT).contains(&x) && (TOP..=HEIGHT - BOTTOM).contains(&y));
        }
    }

    #[test]
    fn nothing_to_draw_is_no_chart() {
        let empty = Series {
            name: "x".into(),
            colour: "red",
            dashed: true,
            points: vec![(1.0, f64::NAN)],
        };
        assert!(line_chart("t", "x", "y", &[empty]).is_none());
        assert!(line_chart("t", "x", "y", &[]).is_none());
    }
}
