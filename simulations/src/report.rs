//! `--out DIR`: the JSON summary, three SVG plots (written by hand: a line chart is a few
//! dozen lines, not worth a dependency) and a short Markdown report.

use std::{fmt::Write as _, path::Path};

use crate::checks::Outcome;

struct Series<'a> {
    name: &'a str,
    color: &'a str,
    points: Vec<(f64, f64)>,
}

fn nice_step(span: f64) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f < 1.5 {
        1.0
    } else if f < 3.5 {
        2.0
    } else if f < 7.5 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A line chart. `y_max` fixes the y range to `[0, y_max]`; markers are vertical lines.
fn chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    y_max: Option<f64>,
    markers: &[(f64, String)],
) -> String {
    let (w, h) = (800.0, 400.0);
    let (ml, mr, mt, mb) = (64.0, 190.0, 36.0, 48.0);
    let pw = w - ml - mr;
    let ph = h - mt - mb;
    let all = series.iter().flat_map(|s| s.points.iter());
    let x_max = all.clone().map(|p| p.0).fold(0.0f64, f64::max).max(markers.iter().map(|m| m.0).fold(0.0, f64::max));
    let x_max = if x_max <= 0.0 { 1.0 } else { x_max };
    let y_top = y_max.unwrap_or_else(|| all.map(|p| p.1).fold(0.0f64, f64::max) * 1.05).max(1e-9);
    let sx = |x: f64| ml + x / x_max * pw;
    let sy = |y: f64| mt + ph - (y / y_top).clamp(0.0, 1.0) * ph;
    let mut o = String::new();
    let _ = write!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>
"#,
        ml + pw / 2.0,
        esc(title)
    );
    // Grid and ticks.
    let xs = nice_step(x_max);
    let mut x = 0.0;
    while x <= x_max + 1e-9 {
        let _ = writeln!(
            o,
            r##"<line x1="{0:.1}" y1="{1:.1}" x2="{0:.1}" y2="{2:.1}" stroke="#eee"/><text x="{0:.1}" y="{3:.1}" text-anchor="middle">{4}</text>"##,
            sx(x),
            mt,
            mt + ph,
            mt + ph + 16.0,
            fmt_num(x)
        );
        x += xs;
    }
    let ys = nice_step(y_top);
    let mut y = 0.0;
    while y <= y_top + 1e-9 {
        let _ = writeln!(
            o,
            r##"<line x1="{0:.1}" y1="{1:.1}" x2="{2:.1}" y2="{1:.1}" stroke="#eee"/><text x="{3:.1}" y="{4:.1}" text-anchor="end">{5}</text>"##,
            ml,
            sy(y),
            ml + pw,
            ml - 6.0,
            sy(y) + 4.0,
            fmt_num(y)
        );
        y += ys;
    }
    let _ = writeln!(
        o,
        r##"<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>
<text x="{}" y="{}" text-anchor="middle">{}</text>
<text transform="translate(16,{}) rotate(-90)" text-anchor="middle">{}</text>"##,
        ml + pw / 2.0,
        h - 10.0,
        esc(x_label),
        mt + ph / 2.0,
        esc(y_label)
    );
    // Markers (faults); labels only when few.
    let label = markers.len() <= 12;
    for (i, (t, what)) in markers.iter().take(200).enumerate() {
        let _ = writeln!(
            o,
            r##"<line x1="{0:.1}" y1="{1}" x2="{0:.1}" y2="{2}" stroke="#c66" stroke-dasharray="3,3"><title>{3}</title></line>"##,
            sx(*t),
            mt,
            mt + ph,
            esc(what)
        );
        if label {
            // A marker in the right half gets its label on its left, so it stays inside.
            let (x, anchor) = if sx(*t) > ml + pw / 2.0 { (sx(*t) - 2.0, "end") } else { (sx(*t) + 2.0, "start") };
            let _ = writeln!(
                o,
                r##"<text x="{:.1}" y="{:.1}" font-size="9" fill="#a44" text-anchor="{}">{}</text>"##,
                x,
                mt + 10.0 + (i % 6) as f64 * 10.0,
                anchor,
                esc(&what.chars().take(28).collect::<String>())
            );
        }
    }
    for (i, s) in series.iter().enumerate() {
        if s.points.is_empty() {
            continue;
        }
        let mut d = String::new();
        for (j, (x, y)) in s.points.iter().enumerate() {
            let _ = write!(d, "{}{:.1},{:.1} ", if j == 0 { "M" } else { "L" }, sx(*x), sy(*y));
        }
        let _ = writeln!(o, r#"<path d="{d}" fill="none" stroke="{}" stroke-width="1.8"/>"#, s.color);
        let ly = mt + 14.0 + i as f64 * 18.0;
        let _ = writeln!(
            o,
            r#"<line x1="{0}" y1="{1}" x2="{2}" y2="{1}" stroke="{3}" stroke-width="2"/><text x="{4}" y="{5}">{6}</text>"#,
            ml + pw + 10.0,
            ly,
            ml + pw + 30.0,
            s.color,
            ml + pw + 34.0,
            ly + 4.0,
            esc(s.name)
        );
    }
    o.push_str("</svg>\n");
    o
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The three plots, as `(file name, SVG)`.
pub fn plots(o: &Outcome) -> Vec<(&'static str, String)> {
    let markers: Vec<(f64, String)> = o.faults.clone();
    let delivery = chart(
        "Delivered share of expected deliveries, over time",
        "virtual time (s)",
        "delivered / expected so far",
        &[Series { name: "delivered", color: "#2a6fdb", points: o.delivery_curve.clone() }],
        Some(1.0),
        &markers,
    );
    let cdf = chart(
        "Delivery latency (CDF)",
        "latency from send to visible at the recipient (ms)",
        "share of deliveries",
        &[Series { name: "deliveries", color: "#2a9d55", points: o.latency_cdf.clone() }],
        Some(1.0),
        &[],
    );
    // Keep the points where something changes (and the last).
    let mut agree = Vec::new();
    let mut distinct = Vec::new();
    let max_distinct = o.samples.iter().map(|s| s.distinct).max().unwrap_or(1).max(1) as f64;
    for (i, s) in o.samples.iter().enumerate() {
        let changed = i == 0
            || i + 1 == o.samples.len()
            || o.samples[i - 1].agree != s.agree
            || o.samples[i - 1].distinct != s.distinct;
        if changed {
            let t = s.t_ms as f64 / 1000.0;
            if let (Some(&(_, pa)), Some(&(_, pd))) = (agree.last(), distinct.last()) {
                // Step shape.
                agree.push((t, pa));
                distinct.push((t, pd));
            }
            agree.push((t, s.agree));
            distinct.push((t, s.distinct as f64 / max_distinct));
        }
    }
    let conv = chart(
        "Convergence: nodes in the room holding the most common resolved state",
        "virtual time (s)",
        "share of nodes in the room",
        &[
            Series { name: "agree with majority", color: "#7a3fb0", points: agree },
            Series { name: "distinct states ÷ max", color: "#e08a1e", points: distinct },
        ],
        Some(1.0),
        &markers,
    );
    vec![("delivery.svg", delivery), ("latency_cdf.svg", cdf), ("convergence.svg", conv)]
}

/// The Markdown report.
pub fn markdown(o: &Outcome, replay: &str) -> String {
    let s = &o.summary;
    let g = |k: &str| s.get(k).map(|v| v.to_string()).unwrap_or_else(|| "—".into());
    let mut m = String::new();
    let _ = writeln!(m, "# Simulation: {}\n", o.scenario.name);
    if !o.scenario.description.is_empty() {
        let _ = writeln!(m, "{}\n", o.scenario.description.trim());
    }
    let _ = writeln!(m, "Replay: `{replay}`\n");
    let _ = writeln!(m, "**Result: {}**\n", if o.ok() { "all checks passed" } else { "CHECKS FAILED" });
    for f in &o.failures {
        let _ = writeln!(m, "- {f}");
    }
    let _ = writeln!(m, "\n| figure | value |\n|---|---|");
    for k in [
        "nodes",
        "seed",
        "messages_sent",
        "messages_attempted",
        "delivered_ratio",
        "delivered_ratio_members",
        "delivered_ratio_direct",
        "delivered_ratio_queued",
        "delivery_ms_p50",
        "delivery_ms_p99",
        "delivery_ms_max",
        "converged",
        "convergence_ms",
        "states_distinct_end",
        "joins_ok",
        "join_ms_p50",
        "state_changes_accepted",
        "crashes",
        "virtual_s",
        "wall_s",
    ] {
        if s.contains_key(k) {
            let _ = writeln!(m, "| {k} | {} |", g(k));
        }
    }
    let _ = writeln!(m, "| network | {} |", g("net"));
    let _ =
        writeln!(m, "\n![delivery](delivery.svg)\n\n![latency](latency_cdf.svg)\n\n![convergence](convergence.svg)\n");
    if !o.faults.is_empty() {
        let _ = writeln!(m, "## Faults and repairs\n");
        for (t, f) in o.faults.iter().take(100) {
            let _ = writeln!(m, "- {t:.1} s: {f}");
        }
        if o.faults.len() > 100 {
            let _ = writeln!(m, "- … {} more", o.faults.len() - 100);
        }
    }
    m
}

/// Write `summary.json`, the plots and `report.md` into `dir`.
pub fn write(dir: &Path, o: &Outcome, replay: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let json = serde_json::to_string_pretty(&o.summary).unwrap_or_default();
    std::fs::write(dir.join("summary.json"), json + "\n")?;
    for (name, svg) in plots(o) {
        std::fs::write(dir.join(name), svg)?;
    }
    std::fs::write(dir.join("report.md"), markdown(o, replay))
}
