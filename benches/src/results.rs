//! What one benchmark run measured, as data: per-round values for each (workload, system,
//! metric), latency samples for the CDF plots, and the scale curves. Saved as `results.json`;
//! the report (markdown and plots) is made from it alone.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::stats::Summary;

/// The system names, as they appear in tables and plots.
pub mod system {
    /// Plain TCP to the backend: the physical limit.
    pub const DIRECT: &str = "direct TCP";
    /// OpenSSH dynamic forwarding.
    pub const SSH: &str = "ssh -D";
    /// hopmesh with the default epoch (10 s).
    pub const HOPMESH: &str = "hopmesh";
    /// hopmesh with a 1 s epoch.
    pub const HOPMESH_E1: &str = "hopmesh E=1s";
    /// hopmesh with a 60 s epoch.
    pub const HOPMESH_E60: &str = "hopmesh E=60s";
    /// hopmesh with `socks_reply = "after_connect"` (the SOCKS reply waits for the serving
    /// node's backend connect result), measured in w2 and w3 against the default early reply.
    pub const HOPMESH_AFTER_CONNECT: &str = "hopmesh reply-after-connect";
    /// hopmesh through one relay (sealed end to end), workload 9.
    pub const HOPMESH_RELAYED: &str = "hopmesh relayed";
    /// Kernel TCP over the lossy namespace link.
    pub const KERNEL_TCP: &str = "kernel TCP";
}

/// Most points kept per latency CDF.
pub const CDF_POINTS: usize = 1001;

/// `v` sorted, or its quantiles 0, 1/(CDF_POINTS − 1), …, 1 (nearest rank) if it is longer.
pub fn quantiles(v: &[f64]) -> Vec<f64> {
    let mut sorted = v.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.len() <= CDF_POINTS {
        return sorted;
    }
    let last = (sorted.len() - 1) as f64;
    (0..CDF_POINTS)
        .map(|i| sorted[(i as f64 / (CDF_POINTS - 1) as f64 * last).round() as usize])
        .collect()
}

/// One figure, measured once per round.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Series {
    /// Workload key (`w1` … `w8`).
    pub workload: String,
    /// System name.
    pub system: String,
    /// Metric name with its unit, e.g. `MB/s`, `p99 ms`.
    pub metric: String,
    /// The per-round values.
    pub values: Vec<f64>,
}

/// One point of the scale curves.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScalePoint {
    /// Node processes in the mesh.
    pub nodes: usize,
    /// Verifier CPU milliseconds per attestation refresh (steady state, pushes included).
    pub verifier_cpu_ms_per_refresh: f64,
    /// Refreshes seen in the measuring window.
    pub refreshes: u64,
    /// Mean node RSS in MiB.
    pub node_rss_mib_mean: f64,
    /// Largest node RSS in MiB.
    pub node_rss_mib_max: f64,
    /// Revocation propagation (revoke request → node applied the list), p50 ms.
    pub revocation_p50_ms: f64,
    /// Same, p99.
    pub revocation_p99_ms: f64,
    /// Same, the slowest node.
    pub revocation_max_ms: f64,
    /// Propagation samples (node × revocation).
    pub revocation_samples: usize,
}

/// Everything one run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Results {
    /// When, where and how it ran.
    pub meta: BTreeMap<String, String>,
    /// The per-round figures.
    pub series: Vec<Series>,
    /// Latency in ms for the CDF plots, keyed `workload/system`, all rounds pooled: sorted, and
    /// reduced to [`CDF_POINTS`] quantiles when there are more samples (the per-round p50/p99
    /// in `series` are computed from every sample before that).
    pub latency_ms: BTreeMap<String, Vec<f64>>,
    /// Every sample of this run, kept in memory only.
    #[serde(skip)]
    pool: BTreeMap<String, Vec<f64>>,
    /// The scale curves (workload 8).
    pub scale: Vec<ScalePoint>,
}

impl Results {
    /// Appends one round's value.
    pub fn push(&mut self, workload: &str, system: &str, metric: &str, value: f64) {
        match self
            .series
            .iter_mut()
            .find(|s| s.workload == workload && s.system == system && s.metric == metric)
        {
            Some(s) => s.values.push(value),
            None => self.series.push(Series {
                workload: workload.into(),
                system: system.into(),
                metric: metric.into(),
                values: vec![value],
            }),
        }
    }

    /// The summary of one figure, if measured.
    pub fn get(&self, workload: &str, system: &str, metric: &str) -> Option<Summary> {
        self.series
            .iter()
            .find(|s| s.workload == workload && s.system == system && s.metric == metric)
            .and_then(|s| Summary::of(&s.values))
    }

    /// Keeps latency samples for the CDF.
    pub fn samples(&mut self, workload: &str, system: &str, ms: &[f64]) {
        let key = format!("{workload}/{system}");
        let pool = self.pool.entry(key.clone()).or_default();
        pool.extend_from_slice(ms);
        self.latency_ms.insert(key, quantiles(pool));
    }

    /// Reduces every latency series to at most [`CDF_POINTS`] quantiles (for files written
    /// before the reduction existed).
    pub fn compact(&mut self) {
        for v in self.latency_ms.values_mut() {
            *v = quantiles(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_is_kept_as_sorted_quantiles_of_every_sample() {
        let mut r = Results::default();
        let a: Vec<f64> = (0..3000).rev().map(f64::from).collect();
        r.samples("w3", "x", &a);
        r.samples("w3", "x", &a);
        let q = &r.latency_ms["w3/x"];
        assert_eq!(q.len(), CDF_POINTS);
        assert_eq!((q[0], q[CDF_POINTS - 1]), (0.0, 2999.0));
        assert!(q.windows(2).all(|w| w[0] <= w[1]));
        assert!((q[500] - 1500.0).abs() <= 2.0, "median {}", q[500]);
        r.samples("w2", "x", &[3.0, 1.0, 2.0]);
        assert_eq!(r.latency_ms["w2/x"], vec![1.0, 2.0, 3.0]);
        // Round trip: the pool is not written, the quantiles are.
        let back: Results =
            serde_json::from_str(&serde_json::to_string(&r).expect("json")).expect("parse");
        assert_eq!(back.latency_ms, r.latency_ms);
    }
}
