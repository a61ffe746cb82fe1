//! Small hand-written SVG plots (heatmaps, bars): no plotting dependency, and the files are
//! readable text a test can check.

use std::fmt::Write;

/// Escape text for SVG.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One heatmap panel: rows are labelled (marked rows drawn bold with a `*`), columns are
/// numbered; colour runs from white (min) to a saturated hue (max).
pub struct Heatmap<'a> {
    pub title: String,
    pub rows: &'a [String],
    pub marked: &'a [bool],
    pub values: &'a [Vec<f64>],
    pub x_label: &'a str,
    /// RGB of the maximum.
    pub hue: (u8, u8, u8),
}

/// Draw panels side by side; returns the SVG document.
pub fn heatmaps(panels: &[Heatmap<'_>]) -> String {
    let cell = 14.0;
    let label_w = 130.0;
    let mut svg = String::new();
    let ncols = panels
        .iter()
        .map(|p| p.values.first().map(|r| r.len()).unwrap_or(0))
        .max()
        .unwrap_or(0);
    let nrows = panels.iter().map(|p| p.rows.len()).max().unwrap_or(0);
    let panel_w = label_w + cell * ncols as f64 + 70.0;
    let h = 60.0 + cell * nrows as f64 + 40.0;
    let w = panel_w * panels.len() as f64;
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (k, p) in panels.iter().enumerate() {
        let x0 = k as f64 * panel_w + label_w;
        let y0 = 40.0;
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for v in p.values.iter().flatten() {
            lo = lo.min(*v);
            hi = hi.max(*v);
        }
        if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
            hi = lo + 1e-12;
        }
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="20" font-size="13">{}</text>"#,
            x0,
            esc(&p.title)
        );
        for (r, row) in p.values.iter().enumerate() {
            let y = y0 + r as f64 * cell;
            let bold = p.marked.get(r).copied().unwrap_or(false);
            let label = format!("{}{}", esc(&p.rows[r]), if bold { "*" } else { "" });
            let weight = if bold { "bold" } else { "normal" };
            let _ = writeln!(
                svg,
                r#"<text x="{}" y="{}" text-anchor="end" font-weight="{weight}">{label}</text>"#,
                x0 - 4.0,
                y + cell - 3.0
            );
            for (c, v) in row.iter().enumerate() {
                let f = ((v - lo) / (hi - lo)).clamp(0.0, 1.0);
                let mix = |m: u8| (255.0 - f * (255.0 - m as f64)).round() as u8;
                let _ = writeln!(
                    svg,
                    r#"<rect x="{}" y="{y}" width="{cell}" height="{cell}" fill="rgb({},{},{})"><title>{}: layer {c}: {v:.4}</title></rect>"#,
                    x0 + c as f64 * cell,
                    mix(p.hue.0),
                    mix(p.hue.1),
                    mix(p.hue.2),
                    label
                );
            }
        }
        let yb = y0 + p.values.len() as f64 * cell;
        for c in (0..ncols).step_by(5) {
            let _ = writeln!(
                svg,
                r#"<text x="{}" y="{}" text-anchor="middle">{c}</text>"#,
                x0 + (c as f64 + 0.5) * cell,
                yb + 12.0
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{} (range {lo:.3} .. {hi:.3})</text>"#,
            x0 + cell * ncols as f64 / 2.0,
            yb + 28.0,
            esc(p.x_label)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// A horizontal bar chart, one bar per labelled value.
pub fn bars(title: &str, labels: &[String], values: &[f64]) -> String {
    let row = 12.0;
    let (label_w, bar_w) = (330.0, 400.0);
    let h = 50.0 + row * values.len() as f64;
    let max = values.iter().cloned().fold(0.0f64, f64::max).max(1e-12);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{h}" font-family="sans-serif" font-size="9">"#,
        label_w + bar_w + 80.0
    );
    let _ = writeln!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="20" font-size="13">{}</text>"#,
        esc(title)
    );
    for (i, (l, v)) in labels.iter().zip(values).enumerate() {
        let y = 35.0 + i as f64 * row;
        let w = bar_w * v / max;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text><rect x="{label_w}" y="{}" width="{w:.2}" height="{}" fill="steelblue"/><text x="{}" y="{}">{v:.2e}</text>"#,
            label_w - 4.0,
            y + 9.0,
            esc(l),
            y + 1.0,
            row - 2.0,
            label_w + w + 3.0,
            y + 9.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// A line chart: one polyline with markers per named series of (x, y) points; y in [0, 1]
/// (shown as percent), x from 0 to the largest x.
pub fn line(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> String {
    let (left, top, w, h) = (60.0, 40.0, 480.0, 260.0);
    let colors = ["steelblue", "darkorange", "seagreen", "firebrick", "purple"];
    let max_x = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.0))
        .fold(0.0f64, f64::max)
        .max(1.0);
    let px = |x: f64| left + w * x / max_x;
    let py = |y: f64| top + h * (1.0 - y.clamp(0.0, 1.0));
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="10">"#,
        left + w + 160.0,
        top + h + 50.0
    );
    let _ = writeln!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="20" font-size="13">{}</text>"#,
        esc(title)
    );
    for i in 0..=4 {
        let y = i as f64 / 4.0;
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{:.0}%</text>"##,
            left + w,
            py(y),
            py(y),
            left - 4.0,
            py(y) + 3.0,
            100.0 * y
        );
    }
    let _ = writeln!(
        s,
        r#"<line x1="{left}" x2="{}" y1="{}" y2="{}" stroke="black"/><text x="{}" y="{}" text-anchor="middle">{}</text><text x="{left}" y="{}" text-anchor="end">0</text><text x="{}" y="{}" text-anchor="end">{max_x}</text>"#,
        left + w,
        top + h,
        top + h,
        left + w / 2.0,
        top + h + 32.0,
        esc(x_label),
        top + h + 14.0,
        left + w,
        top + h + 14.0
    );
    let _ = writeln!(
        s,
        r#"<text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">{}</text>"#,
        top + h / 2.0,
        top + h / 2.0,
        esc(y_label)
    );
    for (k, (name, pts)) in series.iter().enumerate() {
        let c = colors[k % colors.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        for &(x, y) in pts {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{c}"><title>{x}: {:.1}%</title></circle>"#,
                px(x),
                py(y),
                100.0 * y
            );
        }
        let _ = writeln!(
            s,
            r#"<rect x="{}" y="{}" width="10" height="10" fill="{c}"/><text x="{}" y="{}">{}</text>"#,
            left + w + 15.0,
            top + 14.0 * k as f64,
            left + w + 30.0,
            top + 14.0 * k as f64 + 9.0,
            esc(name)
        );
    }
    s.push_str("</svg>\n");
    s
}
