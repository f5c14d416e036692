//! The simulator's report: `sim.json` (the data), `sim.md` (targets of issue 13 judged per
//! size, ratios against the smallest size of the same run, every figure) and SVG plots
//! (`sim_enrolment.svg`: enrolment rate vs mesh size; `sim_propagation.svg`: revocation and
//! reload latencies per size). With replicas, a table of PostgreSQL replicas against the SQLite
//! baseline of the same run and the same size, with ratios.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;

use super::{Propagation, SimResults, SizeResult};

/// The plots, in report order.
pub const PLOTS: [&str; 2] = ["sim_enrolment.svg", "sim_propagation.svg"];

const COLORS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

fn yes(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

fn kib(b: f64) -> String {
    format!("{:.1} KiB", b / 1024.0)
}

/// The markdown report.
pub fn markdown(r: &SimResults) -> String {
    let mut md = String::from("# Control-plane simulator (issue 13)\n\n");
    md.push_str(
        "One real `hopmesh-verifier` (release build, loopback) and N simulated nodes in one \
         process (`hopmesh-bench sim`): each with its own key, a join secret from the admin API, \
         its own QUIC connection (all from one UDP socket), refreshing at half-life with jitter, \
         every push checked as a node checks it. Numbers need a quiet machine: the simulator \
         shares the cores with the verifier (its CPU is shown).\n\n",
    );
    if r.runs.iter().any(|s| s.replicas > 1) {
        md.push_str(
            "Runs marked `PostgreSQL ×R` are R verifier replicas on one PostgreSQL database \
             instead, nodes spread over them; each follows the SQLite run of the same size, \
             same invocation (see the comparison below).\n\n",
        );
    }
    for n in &r.notes {
        let _ = writeln!(md, "- {n}");
    }
    md.push_str("\n## Targets\n\n| run | target | measured | |\n| --- | --- | --- | --- |\n");
    for s in &r.runs {
        // Against the smallest size of the same kind (one verifier, or as many replicas).
        let base = r
            .runs
            .iter()
            .filter(|b| b.replicas == s.replicas)
            .min_by_key(|b| b.nodes);
        let label = s.label();
        let mut row = |t: &str, m: String, ok: bool| {
            let _ = writeln!(md, "| {label} | {t} | {m} | {} |", yes(ok));
        };
        if let Some(b) = base.filter(|b| b.nodes != s.nodes) {
            let ratio = s.enrol_per_sec / b.enrol_per_sec.max(1e-9);
            let last = s.enrol_buckets.last().map_or(0.0, |x| x.per_sec);
            let first = b.enrol_buckets.last().map_or(0.0, |x| x.per_sec);
            row(
                &format!("enrolment rate ≥ 0.8× the {}-node run", b.nodes),
                format!(
                    "{:.2}× overall; last bucket {last:.1}/s vs {first:.1}/s",
                    ratio
                ),
                ratio >= 0.8,
            );
        }
        if s.burst_refreshes > 0 {
            row(
                "≥ 5 000 attestations/s per core",
                format!("{:.0}/CPU-s", s.burst_attestations_per_cpu_s),
                s.burst_attestations_per_cpu_s >= 5000.0,
            );
        }
        row(
            "revocation p99 ≤ 1 s to all subscribers",
            format!(
                "{:.1} ms ({} missing)",
                s.revocation.p99_ms, s.revocation.missing
            ),
            s.revocation.p99_ms <= 1000.0 && s.revocation.missing == 0,
        );
        if let Some(x) = &s.revocation_in_rotation {
            row(
                "revocation p99 ≤ 1 s during a seed rotation",
                format!("{:.1} ms ({} missing)", x.p99_ms, x.missing),
                x.p99_ms <= 1000.0 && x.missing == 0,
            );
        }
        if let Some(x) = &s.reload {
            row(
                "policy reload p99 ≤ 2 s",
                format!("{:.1} ms ({} missing)", x.p99_ms, x.missing),
                x.p99_ms <= 2000.0 && x.missing == 0,
            );
        }
        row(
            "zero lost, truncated or reordered pushes",
            format!(
                "{} violations, {} session errors, {} tables wrong at the end",
                s.violations, s.session_errors, s.final_table_mismatches
            ),
            s.failures().is_empty(),
        );
        if let Some(x) = &s.revocation_other_replicas {
            row(
                "revocation p99 ≤ 1 s at the other replicas' subscribers",
                format!("{:.1} ms ({} missing)", x.p99_ms, x.missing),
                x.p99_ms <= 1000.0 && x.missing == 0,
            );
        }
        // With replicas, per verifier: the largest replica's growth per node of the mesh.
        let per_node = s
            .replica_rss_per_node
            .iter()
            .copied()
            .reduce(f64::max)
            .unwrap_or(s.rss_per_node);
        row(
            if s.replicas > 1 {
                "verifier RSS ≤ 100 KiB per node (largest replica)"
            } else {
                "verifier RSS ≤ 100 KiB per node"
            },
            kib(per_node),
            per_node <= 100.0 * 1024.0,
        );
    }
    md.push_str(&comparison(r));
    md.push_str("\n## Figures\n\n| figure |");
    for s in &r.runs {
        let _ = write!(md, " {} |", s.label());
    }
    md.push_str("\n| --- |");
    for _ in &r.runs {
        md.push_str(" --- |");
    }
    md.push('\n');
    type Cell = fn(&SizeResult) -> String;
    let rows: Vec<(&str, Cell)> = vec![
        ("verifiers / store", |s| {
            format!("{} / {}", s.replicas.max(1), store_name(s))
        }),
        ("peers per node", |s| s.peers.to_string()),
        ("TTL / generation / epoch, s", |s| {
            format!("{} / {} / {}", s.ttl, s.generation, s.epoch)
        }),
        ("enrolments in flight", |s| s.concurrency.to_string()),
        ("join tokens/s (admin API)", |s| {
            format!("{:.0}", s.tokens_per_sec)
        }),
        ("enrolments/s (whole mesh)", |s| {
            format!("{:.1}", s.enrol_per_sec)
        }),
        ("enrolments/s (last bucket)", |s| {
            s.enrol_buckets
                .last()
                .map_or("-".into(), |b| format!("{:.1}", b.per_sec))
        }),
        ("tables converged after last enrolment, s", |s| {
            format!("{:.2}", s.converge_s)
        }),
        ("steady: attestations/s (cadence)", |s| {
            format!("{:.1}", s.steady_attestations_per_sec)
        }),
        ("steady: verifier CPU per refresh, ms", |s| {
            format!("{:.2}", s.steady_cpu_ms_per_refresh)
        }),
        ("steady: rotations crossed", |s| s.rotations.to_string()),
        ("push bytes per node per rotation", |s| {
            format!("{:.0}", s.push_bytes_per_node_per_rotation)
        }),
        ("seed bytes per node per rotation", |s| {
            format!("{:.0}", s.seed_bytes_per_node_per_rotation)
        }),
        ("burst: attestations/s (wall)", |s| {
            format!("{:.0}", s.burst_attestations_per_sec)
        }),
        ("burst: attestations per verifier CPU-s", |s| {
            format!("{:.0}", s.burst_attestations_per_cpu_s)
        }),
        ("burst: verifier CPU per refresh, ms", |s| {
            format!("{:.3}", s.burst_cpu_ms_per_refresh)
        }),
        ("verifier RSS idle", |s| kib(s.rss_start as f64)),
        ("verifier RSS enrolled", |s| kib(s.rss_enrolled as f64)),
        ("verifier RSS per node", |s| kib(s.rss_per_node)),
        ("verifier RSS per node, each replica", |s| {
            if s.replica_rss_per_node.is_empty() {
                "-".into()
            } else {
                s.replica_rss_per_node
                    .iter()
                    .map(|b| kib(*b))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        }),
        ("revocation p50 / p99 / max, ms", |s| {
            format!(
                "{:.1} / {:.1} / {:.1}",
                s.revocation.p50_ms, s.revocation.p99_ms, s.revocation.max_ms
            )
        }),
        ("revocation admin call (median), ms", |s| {
            format!("{:.1}", s.revocation.admin_call_ms)
        }),
        ("revocation, same replica p50 / p99 / max, ms", |s| {
            s.revocation_same_replica.as_ref().map_or("-".into(), ms3)
        }),
        ("revocation, other replicas p50 / p99 / max, ms", |s| {
            s.revocation_other_replicas.as_ref().map_or("-".into(), ms3)
        }),
        ("revocations × subscribers timed", |s| {
            format!(
                "{} × ({} samples)",
                s.revocation.actions, s.revocation.samples
            )
        }),
        ("revocation at a rotation edge p50 / p99 / max, ms", |s| {
            s.revocation_in_rotation.as_ref().map_or("-".into(), |x| {
                format!("{:.1} / {:.1} / {:.1}", x.p50_ms, x.p99_ms, x.max_ms)
            })
        }),
        ("policy reload p50 / p99 / max, ms", |s| {
            s.reload.as_ref().map_or("-".into(), |x| {
                format!("{:.1} / {:.1} / {:.1}", x.p50_ms, x.p99_ms, x.max_ms)
            })
        }),
        ("policy reload, same replica p50 / p99 / max, ms", |s| {
            s.reload_same_replica.as_ref().map_or("-".into(), ms3)
        }),
        ("policy reload, other replicas p50 / p99 / max, ms", |s| {
            s.reload_other_replicas.as_ref().map_or("-".into(), ms3)
        }),
        ("policy reload: affected nodes / admin call ms", |s| {
            s.reload.as_ref().map_or("-".into(), |x| {
                format!("{} / {:.1}", s.reload_affected, x.admin_call_ms)
            })
        }),
        ("reload: table pushes to unaffected nodes", |s| {
            s.reload_unaffected_pushes.to_string()
        }),
        ("pushes received (all kinds)", |s| {
            s.pushes.count.values().sum::<u64>().to_string()
        }),
        ("lost / truncated / reordered", |s| s.violations.to_string()),
        ("sessions ended unexpectedly", |s| {
            s.session_errors.to_string()
        }),
        (
            "replicas: sessions misplaced / nodes missing from a view",
            |s| {
                if s.replicas > 1 {
                    format!(
                        "{} / {}",
                        s.replica_sessions_misplaced, s.replica_nodes_missing
                    )
                } else {
                    "-".into()
                }
            },
        ),
        ("PostgreSQL server CPU, steady / burst, s", |s| {
            if s.replicas > 1 {
                format!("{:.1} / {:.1}", s.steady_db_cpu_s, s.burst_db_cpu_s)
            } else {
                "-".into()
            }
        }),
        ("ERROR / WARN lines in the verifiers' logs", |s| {
            format!("{} / {}", s.verifier_log_errors, s.verifier_log_warnings)
        }),
        ("simulator CPU, s / wall, s", |s| {
            format!("{:.1} / {:.1}", s.sim_cpu_s, s.wall_s)
        }),
    ];
    for (name, f) in rows {
        let _ = write!(md, "| {name} |");
        for s in &r.runs {
            let _ = write!(md, " {} |", f(s));
        }
        md.push('\n');
    }
    if !r.real.is_empty() {
        md.push_str("\n## Real nodes in a segment of simulated ones (stage 2)\n\n| nodes | real | simulated enrolled in, s | peers listed by `ctl show` | tables whole after, s | SOCKS fetch (1 MiB) | verifier RSS | real node RSS | |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
        for x in &r.real {
            let _ = writeln!(
                md,
                "| {} | {} | {:.1} | {:?} (want {}) | {:.1} | {} | {} | {} | {} |",
                x.nodes,
                x.real,
                x.enrol_s,
                x.peers_listed,
                x.nodes - 1,
                x.tables_s,
                if x.reached {
                    format!("{:.1} ms", x.fetch_ms)
                } else {
                    "**failed**".into()
                },
                kib(x.verifier_rss as f64),
                x.node_rss
                    .iter()
                    .map(|b| kib(*b as f64))
                    .collect::<Vec<_>>()
                    .join(", "),
                yes(x.failures.is_empty()),
            );
            for f in &x.failures {
                let _ = writeln!(md, "- {f}");
            }
        }
    }
    for s in &r.runs {
        let f = s.failures();
        if !f.is_empty() {
            let _ = writeln!(md, "\n**{} FAILED**: {}", s.label(), f.join("; "));
            for v in s.violation_samples.iter().chain(&s.error_samples) {
                let _ = writeln!(md, "- {v}");
            }
        }
    }
    for s in r.runs.iter().filter(|s| !s.verifier_log_samples.is_empty()) {
        let _ = writeln!(
            md,
            "\n{}: ERROR and WARN lines in the verifiers' logs (the first few):",
            s.label()
        );
        for l in &s.verifier_log_samples {
            let _ = writeln!(md, "- `{l}`");
        }
    }
    md
}

fn store_name(s: &SizeResult) -> &str {
    if s.store.is_empty() {
        "sqlite"
    } else {
        &s.store
    }
}

fn ms3(x: &Propagation) -> String {
    format!("{:.1} / {:.1} / {:.1}", x.p50_ms, x.p99_ms, x.max_ms)
}

/// PostgreSQL replicas against the SQLite run of the same size (same invocation), with the
/// ratio replicas / SQLite of each figure.
fn comparison(r: &SimResults) -> String {
    let mut md = String::new();
    for pg in r.runs.iter().filter(|s| s.replicas > 1) {
        let Some(lite) = r
            .runs
            .iter()
            .find(|s| s.replicas <= 1 && s.nodes == pg.nodes)
        else {
            continue;
        };
        let _ = writeln!(
            md,
            "\n## PostgreSQL ×{} vs SQLite ×1, {} nodes (same run)\n\n| figure | SQLite, 1 verifier | \
             PostgreSQL, {} replicas | ratio |\n| --- | --- | --- | --- |",
            pg.replicas, pg.nodes, pg.replicas
        );
        let mut row = |what: &str, a: f64, b: f64, digits: usize| {
            let ratio = if a > 0.0 {
                format!("{:.2}×", b / a)
            } else {
                "-".into()
            };
            let _ = writeln!(md, "| {what} | {a:.digits$} | {b:.digits$} | {ratio} |");
        };
        row(
            "burst: attestations/s (wall)",
            lite.burst_attestations_per_sec,
            pg.burst_attestations_per_sec,
            0,
        );
        row(
            "burst: attestations per verifier CPU-s",
            lite.burst_attestations_per_cpu_s,
            pg.burst_attestations_per_cpu_s,
            0,
        );
        row(
            "burst: attestations per CPU-s, verifiers + database server",
            lite.burst_attestations_per_total_cpu_s,
            pg.burst_attestations_per_total_cpu_s,
            0,
        );
        row(
            "steady: verifier CPU per refresh, ms",
            lite.steady_cpu_ms_per_refresh,
            pg.steady_cpu_ms_per_refresh,
            2,
        );
        row(
            "revoke admin call (median), ms",
            lite.revocation.admin_call_ms,
            pg.revocation.admin_call_ms,
            1,
        );
        row(
            "revocation p50, all subscribers, ms",
            lite.revocation.p50_ms,
            pg.revocation.p50_ms,
            1,
        );
        row(
            "revocation p99, all subscribers, ms",
            lite.revocation.p99_ms,
            pg.revocation.p99_ms,
            1,
        );
        for (what, x) in [
            ("same replica", &pg.revocation_same_replica),
            ("other replicas", &pg.revocation_other_replicas),
        ] {
            if let Some(x) = x {
                row(
                    &format!("revocation p50, {what} (SQLite: all), ms"),
                    lite.revocation.p50_ms,
                    x.p50_ms,
                    1,
                );
                row(
                    &format!("revocation p99, {what} (SQLite: all), ms"),
                    lite.revocation.p99_ms,
                    x.p99_ms,
                    1,
                );
                row(
                    &format!("revocation max, {what} (SQLite: all), ms"),
                    lite.revocation.max_ms,
                    x.max_ms,
                    1,
                );
            }
        }
        if let (Some(a), Some(b)) = (&lite.revocation_in_rotation, &pg.revocation_in_rotation) {
            row(
                "revocation at a rotation edge, max, ms",
                a.max_ms,
                b.max_ms,
                1,
            );
        }
        if let (Some(a), Some(b)) = (&lite.reload, &pg.reload) {
            row("policy reload p99, ms", a.p99_ms, b.p99_ms, 1);
            for (what, x) in [
                ("same replica", &pg.reload_same_replica),
                ("other replicas", &pg.reload_other_replicas),
            ] {
                if let Some(x) = x {
                    row(
                        &format!("policy reload p99, {what} (SQLite: all), ms"),
                        a.p99_ms,
                        x.p99_ms,
                        1,
                    );
                }
            }
            row(
                "policy reload admin call, ms",
                a.admin_call_ms,
                b.admin_call_ms,
                1,
            );
        }
        row(
            "join tokens/s (admin API)",
            lite.tokens_per_sec,
            pg.tokens_per_sec,
            0,
        );
        row(
            "enrolments/s (whole mesh)",
            lite.enrol_per_sec,
            pg.enrol_per_sec,
            1,
        );
        row(
            "verifier RSS per node (all verifiers), KiB",
            lite.rss_per_node / 1024.0,
            pg.rss_per_node / 1024.0,
            1,
        );
        if let Some(max) = pg.replica_rss_per_node.iter().copied().reduce(f64::max) {
            row(
                "verifier RSS per node (largest replica), KiB",
                lite.rss_per_node / 1024.0,
                max / 1024.0,
                1,
            );
        }
        let missing = |s: &SizeResult| {
            s.revocation.missing
                + s.revocation_in_rotation.as_ref().map_or(0, |x| x.missing)
                + s.reload.as_ref().map_or(0, |x| x.missing)
        };
        let _ = writeln!(
            md,
            "\nChecks: SQLite {}; PostgreSQL ×{} {} ({} missing at other replicas' subscribers, \
             {} violations, {} session errors, {} final tables wrong, {} behind on revocations; \
             {} missing in all).",
            if lite.failures().is_empty() {
                "passed"
            } else {
                "**FAILED**"
            },
            pg.replicas,
            if pg.failures().is_empty() {
                "passed"
            } else {
                "**FAILED**"
            },
            pg.revocation_other_replicas
                .as_ref()
                .map_or(0, |x| x.missing),
            pg.violations,
            pg.session_errors,
            pg.final_table_mismatches,
            pg.final_revocation_behind,
            missing(pg),
        );
    }
    md
}

type PlotResult = Result<(), Box<dyn std::error::Error>>;

fn enrolment_plot(r: &SimResults, path: &Path) -> PlotResult {
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let xmax = r.runs.iter().map(|s| s.nodes).max().unwrap_or(10) as f64 * 1.05;
    let ymax = r
        .runs
        .iter()
        .flat_map(|s| s.enrol_buckets.iter().map(|b| b.per_sec))
        .fold(0.001f64, f64::max)
        * 1.2;
    let mut chart = ChartBuilder::on(&root)
        .caption("Enrolment rate vs mesh size", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_desc("enrolled nodes")
        .y_desc("enrolments/s")
        .draw()?;
    for (k, s) in r.runs.iter().enumerate() {
        let c = COLORS[k % COLORS.len()];
        let pts: Vec<(f64, f64)> = s
            .enrol_buckets
            .iter()
            .map(|b| (b.mesh_size as f64, b.per_sec))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
            .label(s.label())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], c.stroke_width(2)));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, c.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn propagation_plot(r: &SimResults, path: &Path) -> PlotResult {
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    type Pick = fn(&SizeResult) -> Option<f64>;
    let lines: [(&str, Pick); 4] = [
        ("revocation p50", |s| Some(s.revocation.p50_ms)),
        ("revocation p99", |s| Some(s.revocation.p99_ms)),
        ("revocation at rotation, max", |s| {
            s.revocation_in_rotation.as_ref().map(|x| x.max_ms)
        }),
        ("policy reload p99", |s| s.reload.as_ref().map(|x| x.p99_ms)),
    ];
    let xmax = r.runs.iter().map(|s| s.nodes).max().unwrap_or(10) as f64 * 1.1;
    let ymax = lines
        .iter()
        .flat_map(|(_, f)| r.runs.iter().filter_map(f))
        .fold(0.001f64, f64::max)
        * 1.2;
    let mut chart = ChartBuilder::on(&root)
        .caption("Propagation to every subscriber", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_desc("simulated nodes")
        .y_desc("ms")
        .draw()?;
    // One line per figure and kind of run (one verifier, or R replicas).
    let mut kinds: Vec<usize> = r.runs.iter().map(|s| s.replicas).collect();
    kinds.sort_unstable();
    kinds.dedup();
    let mut k = 0;
    for &kind in &kinds {
        let suffix = if kind > 1 {
            format!(", PostgreSQL ×{kind}")
        } else if kinds.len() > 1 {
            ", SQLite".into()
        } else {
            String::new()
        };
        for (label, f) in &lines {
            let pts: Vec<(f64, f64)> = r
                .runs
                .iter()
                .filter(|s| s.replicas == kind)
                .filter_map(|s| f(s).map(|y| (s.nodes as f64, y)))
                .collect();
            if pts.is_empty() {
                continue;
            }
            let c = COLORS[k % COLORS.len()];
            k += 1;
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
                .label(format!("{label}{suffix}"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 15, y)], c.stroke_width(2))
                });
            chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, c.filled())))?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE)
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Writes `sim.json`, `sim.md` and the plots into `dir`.
pub fn write(r: &SimResults, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("sim.json"), serde_json::to_string_pretty(r)?)?;
    let plot = |res: PlotResult, what: &str| res.map_err(|e| anyhow::anyhow!("plot {what}: {e}"));
    plot(enrolment_plot(r, &dir.join(PLOTS[0])), "enrolment")?;
    plot(propagation_plot(r, &dir.join(PLOTS[1])), "propagation")?;
    let mut md = markdown(r);
    md.push_str("\n## Plots\n\n");
    for p in PLOTS {
        let _ = writeln!(md, "![{}]({p})", p.trim_end_matches(".svg"));
    }
    std::fs::write(dir.join("sim.md"), md)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{Propagation, RateBucket};

    fn size(nodes: usize, rate: f64) -> SizeResult {
        SizeResult {
            nodes,
            peers: 9,
            enrol_per_sec: rate,
            enrol_buckets: vec![RateBucket {
                mesh_size: nodes,
                per_sec: rate,
            }],
            burst_refreshes: 100,
            burst_attestations_per_cpu_s: 6000.0,
            revocation: Propagation {
                p99_ms: 20.0,
                ..Propagation::default()
            },
            ..SizeResult::default()
        }
    }

    #[test]
    fn the_report_judges_targets_against_the_smallest_size_and_writes_plots() {
        let r = SimResults {
            runs: vec![size(100, 10.0), size(1000, 5.0)],
            notes: vec!["a note".into()],
            real: Vec::new(),
        };
        let md = markdown(&r);
        assert!(md.contains("0.50× overall"), "{md}");
        assert!(md.contains("**missed**"), "{md}");
        assert!(md.contains("| 100 nodes | 1000 nodes |"), "{md}");
        let dir = tempfile::tempdir().expect("tmp");
        write(&r, dir.path()).expect("write");
        for p in PLOTS {
            let svg = std::fs::read_to_string(dir.path().join(p)).expect("plot");
            assert!(svg.contains("<svg"), "{p}");
        }
        let back: SimResults = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("sim.json")).expect("json"),
        )
        .expect("parses");
        assert_eq!(back.runs.len(), 2);
    }

    #[test]
    fn replicas_are_set_beside_the_sqlite_run_of_their_size_with_ratios() {
        let lite = SizeResult {
            burst_attestations_per_sec: 1000.0,
            replicas: 1,
            ..size(300, 10.0)
        };
        let mut pg = SizeResult {
            burst_attestations_per_sec: 400.0,
            replicas: 3,
            store: "postgresql".into(),
            revocation_other_replicas: Some(Propagation {
                p99_ms: 40.0,
                missing: 2,
                ..Propagation::default()
            }),
            ..size(300, 8.0)
        };
        pg.revocation.missing = 2;
        let r = SimResults {
            runs: vec![lite, pg],
            notes: Vec::new(),
            real: Vec::new(),
        };
        let md = markdown(&r);
        assert!(
            md.contains("## PostgreSQL ×3 vs SQLite ×1, 300 nodes (same run)"),
            "{md}"
        );
        assert!(
            md.contains("| burst: attestations/s (wall) | 1000 | 400 | 0.40× |"),
            "{md}"
        );
        assert!(
            md.contains("| 300 nodes | 300 nodes, PostgreSQL ×3 |"),
            "{md}"
        );
        assert!(
            md.contains("PostgreSQL ×3 **FAILED** (2 missing at other"),
            "{md}"
        );
        assert!(md.contains("**300 nodes, PostgreSQL ×3 FAILED**"), "{md}");
        // Each kind is judged against its own smallest size: no cross-kind enrolment ratio.
        assert!(!md.contains("× overall"), "{md}");
        let dir = tempfile::tempdir().expect("tmp");
        write(&r, dir.path()).expect("write");
    }
}
