//! The report of a run: the targets of the performance issue checked against the medians, a
//! markdown table of every figure (median and min–max over rounds, hopmesh/ssh ratio), and SVG
//! plots (throughput bars, latency CDFs, scale curves).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;

use crate::results::{Results, system as sys};
use crate::stats::Summary;

/// One target of the issue, judged from the run's medians.
#[derive(Debug)]
pub struct Verdict {
    /// Workload and what is compared.
    pub what: String,
    /// The target as text.
    pub target: String,
    /// What was measured, as text.
    pub measured: String,
    /// `Some(true)` met, `Some(false)` missed, `None` not measured in this run.
    pub met: Option<bool>,
}

/// A figure with the precision it needs: sub-millisecond latencies keep two decimals.
fn fig(v: f64) -> String {
    if v.abs() < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

/// Which side of a ratio's bound meets a target.
#[derive(Clone, Copy, Debug)]
enum Bound {
    AtLeast(f64),
    AtMost(f64),
}

impl Bound {
    fn holds(self, v: f64) -> bool {
        match self {
            Bound::AtLeast(min) => v >= min,
            Bound::AtMost(max) => v <= max,
        }
    }
}

fn med(r: &Results, w: &str, s: &str, m: &str) -> Option<f64> {
    r.get(w, s, m).map(|x| x.median)
}

/// Checks every target.
pub fn verdicts(r: &Results) -> Vec<Verdict> {
    let mut out = Vec::new();
    // A ratio num / den judged against a bound: at least `min` (`Bound::AtLeast`) or at
    // most (`Bound::AtMost`).
    let mut ratio = |what: &str, target: &str, num: Option<f64>, den: Option<f64>, bound: Bound| {
        let (measured, met) = match (num, den) {
            (Some(a), Some(b)) if b > 0.0 => (
                format!("{} / {} = {:.2}×", fig(a), fig(b), a / b),
                Some(bound.holds(a / b)),
            ),
            _ => ("not measured".into(), None),
        };
        out.push(Verdict {
            what: what.into(),
            target: target.into(),
            measured,
            met,
        });
    };
    use Bound::{AtLeast, AtMost};
    let h = sys::HOPMESH;
    for (w, name) in [("w1", "w1 1 GiB stream"), ("w4", "w4 100 × 10 MiB")] {
        ratio(
            &format!("{name}, MB/s hopmesh / ssh"),
            "≥ 1.3×",
            med(r, w, h, "MB/s"),
            med(r, w, sys::SSH, "MB/s"),
            AtLeast(1.3),
        );
        ratio(
            &format!("{name}, MB/s hopmesh / direct TCP"),
            "≥ 0.5×",
            med(r, w, h, "MB/s"),
            med(r, w, sys::DIRECT, "MB/s"),
            AtLeast(0.5),
        );
        ratio(
            &format!("{name}, proxy CPU s/GiB hopmesh / ssh"),
            "≤ 0.6×",
            med(r, w, h, "proxy CPU s/GiB"),
            med(r, w, sys::SSH, "proxy CPU s/GiB"),
            AtMost(0.6),
        );
    }
    ratio(
        "w2 sequential, p50 ms hopmesh / ssh",
        "≤ 0.6×",
        med(r, "w2", h, "p50 ms"),
        med(r, "w2", sys::SSH, "p50 ms"),
        AtMost(0.6),
    );
    ratio(
        "w2 sequential, p99 ms hopmesh / ssh",
        "≤ 1×",
        med(r, "w2", h, "p99 ms"),
        med(r, "w2", sys::SSH, "p99 ms"),
        AtMost(1.0),
    );
    ratio(
        "w3 100 clients, req/s hopmesh / ssh",
        "≥ 1.4×",
        med(r, "w3", h, "req/s"),
        med(r, "w3", sys::SSH, "req/s"),
        AtLeast(1.4),
    );
    ratio(
        "w5 100 Mbit/s, 20 ms, 1 % loss, MB/s hopmesh / kernel TCP (BBR)",
        "≥ 0.5× (both at the line rate)",
        med(r, "w5", h, "MB/s"),
        med(r, "w5", sys::KERNEL_TCP, "MB/s"),
        AtLeast(0.5),
    );
    for (w, link) in [
        ("w5u", "uncapped, 20 ms, 1 % loss"),
        ("w5h", "uncapped, 50 ms, 5 % loss"),
    ] {
        ratio(
            &format!("{w} {link}, MB/s hopmesh / kernel TCP (BBR)"),
            "≥ 2×",
            med(r, w, h, "MB/s"),
            med(r, w, sys::KERNEL_TCP, "MB/s"),
            AtLeast(2.0),
        );
    }
    ratio(
        "w6 1 GiB stream, MB/s E=1s / E=60s",
        "≥ 0.95×",
        med(r, "w6", sys::HOPMESH_E1, "w1 MB/s"),
        med(r, "w6", sys::HOPMESH_E60, "w1 MB/s"),
        AtLeast(0.95),
    );
    ratio(
        "w6 100 clients, req/s E=1s / E=60s",
        "≥ 0.95×",
        med(r, "w6", sys::HOPMESH_E1, "w3 req/s"),
        med(r, "w6", sys::HOPMESH_E60, "w3 req/s"),
        AtLeast(0.95),
    );
    // The paths issue: one relay against the direct path, same run.
    ratio(
        "w9 1 GiB stream through one relay, MB/s relayed / direct hopmesh",
        "≥ 0.8×",
        med(r, "w9", sys::HOPMESH_RELAYED, "w1 MB/s"),
        med(r, "w1", h, "MB/s"),
        AtLeast(0.8),
    );
    let best_proxied = [sys::SSH, h]
        .iter()
        .filter_map(|s| med(r, "w1", s, "MB/s"))
        .fold(None, |a: Option<f64>, b| Some(a.map_or(b, |a| a.max(b))));
    // Headroom above the best proxied system: below it the backend, not the proxy, would set
    // the w1 figures (1.25×, not 2×: the target asks hopmesh for 0.5× direct and more).
    ratio(
        "backend check: w1 direct / best proxied",
        "≥ 1.25× (backend not the bottleneck)",
        med(r, "w1", sys::DIRECT, "MB/s"),
        best_proxied,
        AtLeast(1.25),
    );
    let relayed_p50 = med(r, "w9", sys::HOPMESH_RELAYED, "w2 p50 ms");
    let direct_p50 = med(r, "w2", h, "p50 ms");
    let hop_rtt = med(r, "w9", sys::HOPMESH_RELAYED, "relay hop RTT ms");
    out.push(match (relayed_p50, direct_p50, hop_rtt) {
        (Some(a), Some(b), Some(rtt)) => Verdict {
            what: "w9 new connection through one relay, p50 overhead over direct".into(),
            target: "≤ one extra hop's RTT + 0.1 ms".into(),
            measured: format!(
                "{} − {} = {} ms (hop RTT {} ms, bound {} ms)",
                fig(a),
                fig(b),
                fig(a - b),
                fig(rtt),
                fig(rtt + 0.1)
            ),
            met: Some(a - b <= rtt + 0.1),
        },
        _ => Verdict {
            what: "w9 new connection through one relay, p50 overhead over direct".into(),
            target: "≤ one extra hop's RTT + 0.1 ms".into(),
            measured: "not measured".into(),
            met: None,
        },
    });
    let mut limit = |what: &str, target: &str, v: Option<f64>, max: f64, unit: &str| {
        out.push(Verdict {
            what: what.into(),
            target: target.into(),
            measured: v.map_or("not measured".into(), |v| format!("{v:.1} {unit}")),
            met: v.map(|v| v <= max),
        });
    };
    limit(
        "w7 idle node RSS (largest of the two)",
        "≤ 30 MiB",
        [
            med(r, "w7", h, "client node idle RSS MiB"),
            med(r, "w7", h, "service node idle RSS MiB"),
        ]
        .into_iter()
        .flatten()
        .reduce(f64::max),
        30.0,
        "MiB",
    );
    limit(
        "w7 RSS added by 1 000 idle SOCKS connections (client + service node)",
        "≤ 64 MiB",
        match (
            med(r, "w7", h, "client node +1000 conns MiB"),
            med(r, "w7", h, "service node +1000 conns MiB"),
        ) {
            (Some(a), Some(b)) => Some(a + b),
            _ => None,
        },
        64.0,
        "MiB",
    );
    // The target is stated for 40 nodes; the largest mesh of the run is judged (a quick run
    // uses a small one, and says so).
    let largest = r.scale.iter().max_by_key(|p| p.nodes);
    limit(
        &format!(
            "w8 revocation propagation p99 at {} nodes",
            largest.map_or(40, |p| p.nodes)
        ),
        "≤ 1000 ms (at 40 nodes)",
        largest.map(|p| p.revocation_p99_ms),
        1000.0,
        "ms",
    );
    let first = r.scale.first();
    let cost = match (first, r.scale.last()) {
        (Some(a), Some(b)) if a.nodes < b.nodes && a.verifier_cpu_ms_per_refresh > 0.0 => {
            Some(b.verifier_cpu_ms_per_refresh / a.verifier_cpu_ms_per_refresh)
        }
        _ => None,
    };
    out.push(Verdict {
        what: "w8 verifier CPU per refresh, largest mesh / smallest".into(),
        target: "flat or better (≤ 1.25×)".into(),
        measured: cost.map_or("not measured".into(), |c| format!("{c:.2}×")),
        met: cost.map(|c| c <= 1.25),
    });
    out
}

fn cell(s: Option<Summary>) -> String {
    match s {
        Some(s) if s.min == s.max => format!("{:.2}", s.median),
        Some(s) => format!("{:.2} ({:.2}–{:.2})", s.median, s.min, s.max),
        None => "–".into(),
    }
}

/// The markdown report.
pub fn markdown(r: &Results) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# hopmesh benchmark\n");
    for (k, v) in &r.meta {
        let _ = writeln!(md, "- {k}: {v}");
    }
    let _ = writeln!(
        md,
        "\nMedians over rounds, min–max in parentheses. Systems run interleaved in every round, after one unmeasured warm-up transfer each.\n"
    );
    let _ = writeln!(
        md,
        "## Targets\n\n| check | target | measured | |\n|---|---|---|---|"
    );
    for v in verdicts(r) {
        let mark = match v.met {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "not run",
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {mark} |",
            v.what, v.target, v.measured
        );
    }
    // Both SOCKS reply modes, measured interleaved (informational: the default is judged).
    if let (Some(early), Some(after)) = (
        med(r, "w2", sys::HOPMESH, "p50 ms"),
        med(r, "w2", sys::HOPMESH_AFTER_CONNECT, "p50 ms"),
    ) {
        let _ = writeln!(
            md,
            "\nw2 p50 by SOCKS reply mode (informational): early reply {} ms, reply after connect {} ms ({:.2}×).",
            fig(early),
            fig(after),
            after / early
        );
    }
    let _ = writeln!(md, "\n## All figures\n");
    let mut systems: Vec<&str> = Vec::new();
    for s in &r.series {
        if !systems.contains(&s.system.as_str()) {
            systems.push(&s.system);
        }
    }
    let _ = write!(md, "| workload | metric |");
    for s in &systems {
        let _ = write!(md, " {s} |");
    }
    let _ = writeln!(md, " hopmesh / ssh |");
    let _ = writeln!(md, "|---|---|{}---|", "---|".repeat(systems.len()));
    let mut rows: Vec<(&str, &str)> = Vec::new();
    for s in &r.series {
        if !rows.contains(&(s.workload.as_str(), s.metric.as_str())) {
            rows.push((&s.workload, &s.metric));
        }
    }
    for (w, m) in rows {
        let _ = write!(md, "| {w} | {m} |");
        for s in &systems {
            let _ = write!(md, " {} |", cell(r.get(w, s, m)));
        }
        let ratio = match (med(r, w, sys::HOPMESH, m), med(r, w, sys::SSH, m)) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "–".into(),
        };
        let _ = writeln!(md, " {ratio} |");
    }
    if !r.scale.is_empty() {
        let _ = writeln!(
            md,
            "\n## Scale (workload 8)\n\n| nodes | verifier CPU ms / refresh | refreshes | node RSS MiB mean / max | revocation p50 / p99 / max ms | samples |\n|---|---|---|---|---|---|"
        );
        for p in &r.scale {
            let _ = writeln!(
                md,
                "| {} | {:.3} | {} | {:.1} / {:.1} | {:.0} / {:.0} / {:.0} | {} |",
                p.nodes,
                p.verifier_cpu_ms_per_refresh,
                p.refreshes,
                p.node_rss_mib_mean,
                p.node_rss_mib_max,
                p.revocation_p50_ms,
                p.revocation_p99_ms,
                p.revocation_max_ms,
                p.revocation_samples
            );
        }
    }
    md
}

const PLOTS: [&str; 4] = [
    "throughput.svg",
    "latency_w2.svg",
    "latency_w3.svg",
    "scale.svg",
];

const COLORS: [RGBColor; 6] = [
    RGBColor(90, 90, 90),
    RGBColor(214, 120, 40),
    RGBColor(40, 110, 200),
    RGBColor(60, 160, 90),
    RGBColor(160, 60, 160),
    RGBColor(200, 50, 50),
];

fn color_of(system: &str) -> RGBColor {
    match system {
        sys::DIRECT => COLORS[0],
        sys::SSH => COLORS[1],
        sys::HOPMESH => COLORS[2],
        sys::HOPMESH_E1 => COLORS[3],
        sys::HOPMESH_E60 => COLORS[4],
        _ => COLORS[5],
    }
}

type PlotResult = Result<(), Box<dyn std::error::Error>>;

fn throughput_plot(r: &Results, path: &Path) -> PlotResult {
    let root = SVGBackend::new(path, (1100, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    // Loopback and the lossy links differ by 100×: one panel each.
    let (left, right) = root.split_horizontally(620);
    bar_panel(
        r,
        &left,
        "Loopback throughput (median, whiskers min–max)",
        &[("w1", "w1: 1 GiB, one stream"), ("w4", "w4: 100 × 10 MiB")],
        &[sys::DIRECT, sys::SSH, sys::HOPMESH],
    )?;
    bar_panel(
        r,
        &right,
        "w5: lossy links (RTT, loss)",
        &[
            ("w5", "100 Mbit/s, 20 ms, 1 %"),
            ("w5u", "uncapped, 20 ms, 1 %"),
            ("w5h", "uncapped, 50 ms, 5 %"),
        ],
        &[sys::KERNEL_TCP, sys::HOPMESH],
    )?;
    root.present()?;
    Ok(())
}

fn bar_panel(
    r: &Results,
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    title: &str,
    groups: &[(&str, &str)],
    systems: &[&str],
) -> PlotResult {
    let max = groups
        .iter()
        .flat_map(|g| systems.iter().filter_map(|s| r.get(g.0, s, "MB/s")))
        .map(|v| v.max)
        .fold(1.0f64, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..groups.len() as f64, 0f64..max * 1.15)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < groups.len() {
                groups[i].1.to_string()
            } else {
                String::new()
            }
        })
        .y_desc("MB/s")
        .draw()?;
    let w = 0.8 / systems.len() as f64;
    for (j, s) in systems.iter().enumerate() {
        let mut bars = Vec::new();
        let mut whiskers = Vec::new();
        for (i, g) in groups.iter().enumerate() {
            if let Some(v) = r.get(g.0, s, "MB/s") {
                let x0 = i as f64 + 0.1 + j as f64 * w;
                bars.push(Rectangle::new(
                    [(x0, 0.0), (x0 + w * 0.9, v.median)],
                    color_of(s).filled(),
                ));
                let xm = x0 + w * 0.45;
                whiskers.push(PathElement::new(vec![(xm, v.min), (xm, v.max)], BLACK));
            }
        }
        let c = color_of(s);
        chart
            .draw_series(bars)?
            .label(*s)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
        chart.draw_series(whiskers)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE)
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}

fn cdf_plot(r: &Results, workload: &str, title: &str, path: &Path) -> PlotResult {
    let series: Vec<(&str, Vec<f64>)> = [sys::DIRECT, sys::SSH, sys::HOPMESH]
        .iter()
        .filter_map(|s| {
            let mut v = r.latency_ms.get(&format!("{workload}/{s}"))?.clone();
            v.sort_by(f64::total_cmp);
            (!v.is_empty()).then_some((*s, v))
        })
        .collect();
    if series.is_empty() {
        // Nothing measured (workload not run): no plot rather than one with an empty range.
        let _ = std::fs::remove_file(path);
        return Ok(());
    }
    let lo = series
        .iter()
        .map(|(_, v)| v[0])
        .fold(f64::INFINITY, f64::min)
        .max(0.001);
    let hi = series
        .iter()
        .map(|(_, v)| v[v.len() - 1])
        .fold(lo * 10.0, f64::max);
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d((lo * 0.9..hi * 1.1).log_scale(), 0f64..1f64)?;
    chart
        .configure_mesh()
        .x_desc("latency ms (log)")
        .y_desc("fraction of requests")
        .draw()?;
    for (s, v) in &series {
        let n = v.len() as f64;
        let c = color_of(s);
        chart
            .draw_series(LineSeries::new(
                v.iter().enumerate().map(|(i, x)| (*x, (i + 1) as f64 / n)),
                c.stroke_width(2),
            ))?
            .label(*s)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE)
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(())
}

fn scale_plot(r: &Results, path: &Path) -> PlotResult {
    if r.scale.is_empty() {
        let _ = std::fs::remove_file(path);
        return Ok(());
    }
    let root = SVGBackend::new(path, (1200, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 3));
    let xmax = r.scale.iter().map(|p| p.nodes).max().unwrap_or(40) as f64 * 1.1;
    type Pick = fn(&crate::results::ScalePoint) -> f64;
    type Panel<'a> = (&'a str, &'a str, Vec<(&'a str, Pick)>);
    let specs: [Panel<'_>; 3] = [
        (
            "Revocation propagation",
            "ms",
            vec![
                ("p50", |p| p.revocation_p50_ms),
                ("p99", |p| p.revocation_p99_ms),
            ],
        ),
        (
            "Verifier CPU per refresh",
            "ms",
            vec![("CPU ms", |p| p.verifier_cpu_ms_per_refresh)],
        ),
        (
            "Node memory",
            "MiB",
            vec![
                ("mean RSS", |p| p.node_rss_mib_mean),
                ("max RSS", |p| p.node_rss_mib_max),
            ],
        ),
    ];
    for (panel, (title, unit, lines)) in panels.iter().zip(specs) {
        let ymax = lines
            .iter()
            .flat_map(|(_, f)| r.scale.iter().map(f))
            .fold(0.001f64, f64::max)
            * 1.2;
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
        chart
            .configure_mesh()
            .x_desc("node processes")
            .y_desc(unit)
            .draw()?;
        for (k, (label, f)) in lines.into_iter().enumerate() {
            let c = COLORS[k + 1];
            let pts: Vec<(f64, f64)> = r.scale.iter().map(|p| (p.nodes as f64, f(p))).collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 15, y)], c.stroke_width(2))
                });
            chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, c.filled())))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE)
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// Writes `results.md` and the plots into `dir`.
pub fn write(r: &Results, dir: &Path) -> Result<()> {
    let plot = |res: PlotResult, what: &str| res.map_err(|e| anyhow::anyhow!("plot {what}: {e}"));
    plot(
        throughput_plot(r, &dir.join("throughput.svg")),
        "throughput",
    )?;
    plot(
        cdf_plot(
            r,
            "w2",
            "w2: 500 sequential requests, new connection each",
            &dir.join("latency_w2.svg"),
        ),
        "latency w2",
    )?;
    plot(
        cdf_plot(
            r,
            "w3",
            "w3: 10 000 requests, 100 concurrent clients",
            &dir.join("latency_w3.svg"),
        ),
        "latency w3",
    )?;
    plot(scale_plot(r, &dir.join("scale.svg")), "scale")?;
    let mut md = markdown(r);
    md.push_str("\n## Plots\n\n");
    for p in PLOTS.iter().filter(|p| dir.join(p).exists()) {
        let _ = writeln!(md, "![{}]({p})", p.trim_end_matches(".svg"));
    }
    std::fs::write(dir.join("results.md"), md)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::ScalePoint;

    fn sample() -> Results {
        let mut r = Results::default();
        for (s, v) in [
            (sys::DIRECT, 5000.0),
            (sys::SSH, 400.0),
            (sys::HOPMESH, 600.0),
        ] {
            r.push("w1", s, "MB/s", v);
            r.push("w1", s, "MB/s", v * 1.1);
            r.push("w1", s, "MB/s", v * 0.9);
            r.samples("w2", s, &[v / 1000.0, v / 900.0]);
            r.samples("w3", s, &[v / 500.0, v / 400.0]);
        }
        r.push("w2", sys::SSH, "p50 ms", 0.5);
        r.push("w2", sys::HOPMESH, "p50 ms", 0.6);
        r.push("w2", sys::HOPMESH_AFTER_CONNECT, "p50 ms", 0.9);
        for (w, s, v) in [
            ("w1", sys::HOPMESH, 0.5),
            ("w1", sys::SSH, 1.0),
            ("w4", sys::HOPMESH, 0.7),
            ("w4", sys::SSH, 1.0),
        ] {
            r.push(w, s, "proxy CPU s/GiB", v);
        }
        for (w, hop, tcp) in [("w5u", 30.0, 10.0), ("w5h", 3.0, 2.0)] {
            r.push(w, sys::HOPMESH, "MB/s", hop);
            r.push(w, sys::KERNEL_TCP, "MB/s", tcp);
        }
        r.scale = vec![
            ScalePoint {
                nodes: 10,
                verifier_cpu_ms_per_refresh: 1.0,
                revocation_p99_ms: 50.0,
                ..Default::default()
            },
            ScalePoint {
                nodes: 40,
                verifier_cpu_ms_per_refresh: 1.1,
                revocation_p99_ms: 1500.0,
                ..Default::default()
            },
        ];
        r
    }

    #[test]
    fn verdicts_judge_each_target_from_the_medians() {
        let v = verdicts(&sample());
        let get = |prefix: &str| {
            v.iter()
                .find(|v| v.what.starts_with(prefix))
                .unwrap_or_else(|| panic!("no verdict {prefix}"))
        };
        assert_eq!(
            get("w1 1 GiB stream, MB/s hopmesh / ssh").met,
            Some(true),
            "600/400 = 1.5 ≥ 1.3"
        );
        assert_eq!(
            get("w1 1 GiB stream, MB/s hopmesh / direct").met,
            Some(false),
            "600/5000 < 0.5"
        );
        // Lower is better: at most the bound.
        assert_eq!(
            get("w1 1 GiB stream, proxy CPU").met,
            Some(true),
            "0.5/1.0 ≤ 0.6"
        );
        assert_eq!(
            get("w4 100 × 10 MiB, proxy CPU").met,
            Some(false),
            "0.7/1.0 > 0.6"
        );
        assert_eq!(get("w2 sequential, p50").met, Some(false), "0.6/0.5 > 0.6");
        assert_eq!(
            get("w2 sequential, p99").met,
            None,
            "not measured is not a pass"
        );
        assert_eq!(get("w3").met, None, "not measured is not a pass");
        assert_eq!(get("w5u").met, Some(true), "30/10 ≥ 2");
        assert_eq!(get("w5h").met, Some(false), "3/2 < 2");
        assert_eq!(get("backend").met, Some(true), "5000 / 600 ≥ 1.25");
        assert_eq!(get("w8 revocation").met, Some(false), "1500 ms > 1 s");
        assert_eq!(get("w8 verifier").met, Some(true), "1.1× is flat");
    }

    #[test]
    fn unmeasured_workloads_make_no_plot_and_no_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = Results::default();
        r.push("w1", sys::HOPMESH, "MB/s", 100.0);
        write(&r, dir.path()).expect("write");
        assert!(dir.path().join("throughput.svg").exists());
        assert!(!dir.path().join("latency_w2.svg").exists());
        assert!(!dir.path().join("scale.svg").exists());
        write(&Results::default(), dir.path()).expect("an empty run still reports");
    }

    #[test]
    fn report_and_plots_are_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = sample();
        write(&r, dir.path()).expect("write");
        let md = std::fs::read_to_string(dir.path().join("results.md")).expect("md");
        assert!(
            md.contains("| w1 | MB/s | 5000.00 (4500.00–5500.00) |"),
            "{md}"
        );
        assert!(md.contains("**missed**"));
        assert!(
            md.contains("early reply 0.60 ms, reply after connect 0.90 ms (1.50×)"),
            "{md}"
        );
        for f in [
            "throughput.svg",
            "latency_w2.svg",
            "latency_w3.svg",
            "scale.svg",
        ] {
            let svg = std::fs::read_to_string(dir.path().join(f)).expect("svg");
            assert!(
                svg.starts_with("<svg") && svg.contains("hopmesh") || f == "scale.svg",
                "{f}"
            );
        }
    }
}
