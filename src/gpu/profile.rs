//! Per-kernel GPU time from timestamp queries, for `--profile`: while profiling is on, every
//! dispatch the context records gets its own compute pass with begin/end timestamps, and the
//! elapsed GPU time is added to its kernel family (the pipeline's cache key and entry point, e.g.
//! `matmul F32xF32 NN/main`, `gptq_sg/block_sg`). Host-side gaps between submissions are not
//! counted, so the families' sum is the GPU's busy time, to be read against the wall clock.
//!
//! Profiling changes how work is submitted (one pass per dispatch, a wait after every batch), so
//! it slows the run and must only be switched on by an explicit `--profile`. This module must not
//! decide what to time: the context calls it for every dispatch.

use crate::error::{Error, Result};
use std::collections::BTreeMap;

/// Dispatches per query set (two timestamps each, within wgpu's 4096-query limit).
pub(crate) const MAX_TIMED: usize = 2048;

/// Accumulated GPU time of one kernel family, and the work its wrappers declared (FLOPs and
/// bytes moved to or from memory at least once; 0 where a family declares none).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Family {
    pub dispatches: u64,
    pub seconds: f64,
    pub flops: f64,
    pub bytes: f64,
}

/// GPU time per kernel family since profiling was switched on.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Profile {
    pub families: BTreeMap<String, Family>,
}

impl Profile {
    pub(crate) fn add(&mut self, family: &str, seconds: f64) {
        let f = self.families.entry(family.to_string()).or_default();
        f.dispatches += 1;
        f.seconds += seconds;
    }

    pub(crate) fn add_work(&mut self, family: &str, flops: f64, bytes: f64) {
        let f = self.families.entry(family.to_string()).or_default();
        f.flops += flops;
        f.bytes += bytes;
    }

    /// Adds `other`'s dispatches, times and work to this profile's families.
    pub(crate) fn merge(&mut self, other: &Profile) {
        for (name, f) in &other.families {
            let e = self.families.entry(name.clone()).or_default();
            e.dispatches += f.dispatches;
            e.seconds += f.seconds;
            e.flops += f.flops;
            e.bytes += f.bytes;
        }
    }

    /// Total GPU time over all families.
    pub fn total_seconds(&self) -> f64 {
        self.families.values().map(|f| f.seconds).sum()
    }

    /// Families by descending time: name, dispatches, milliseconds, share of the total, mean µs,
    /// and the achieved TFLOP/s and GB/s where the family declares its work ("-" otherwise). With
    /// the adapter's floors each rate is also shown as a share of its floor: FLOP/s against the
    /// tensor-core rate for `matmul_coop` families and the f32 FMA rate otherwise, bytes against
    /// the copy bandwidth.
    pub fn table(&self, peaks: Option<&super::peaks::Peaks>) -> String {
        let total = self.total_seconds().max(1e-30);
        let mut rows: Vec<(&String, &Family)> = self.families.iter().collect();
        rows.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds));
        let mut s = format!(
            "{:<44} {:>10} {:>11} {:>7} {:>11} {:>9} {:>6} {:>9} {:>6}\n",
            "kernel family (GPU time, timestamp queries)",
            "dispatches",
            "ms",
            "share",
            "µs each",
            "TFLOP/s",
            "%peak",
            "GB/s",
            "%peak"
        );
        let rate = |x: f64, secs: f64, unit: f64| -> Option<f64> {
            (x > 0.0 && secs > 0.0).then(|| x / secs / unit)
        };
        let show = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.2}"));
        let share = |r: Option<f64>, floor: Option<f64>| match (r, floor) {
            (Some(r), Some(f)) if f > 0.0 => format!("{:.0}%", 100.0 * r / f),
            _ => "-".to_string(),
        };
        for (name, f) in rows {
            let tf = rate(f.flops, f.seconds, 1e12);
            let gb = rate(f.bytes, f.seconds, 1e9);
            let flop_floor = peaks.and_then(|p| {
                if name.starts_with("matmul_coop") {
                    p.coop_f16_tflops
                } else {
                    Some(p.f32_tflops)
                }
            });
            s.push_str(&format!(
                "{:<44} {:>10} {:>11.3} {:>6.1}% {:>11.2} {:>9} {:>6} {:>9} {:>6}\n",
                name,
                f.dispatches,
                f.seconds * 1e3,
                100.0 * f.seconds / total,
                f.seconds * 1e6 / f.dispatches.max(1) as f64,
                show(tf),
                share(tf, flop_floor),
                show(gb),
                share(gb, peaks.map(|p| p.copy_gbps))
            ));
        }
        s.push_str(&format!(
            "{:<44} {:>10} {:>11.3}\n",
            "total",
            "",
            total * 1e3
        ));
        if let Some(p) = peaks {
            s.push_str(&format!(
                "adapter floors (measured): f32 FMA {:.2} TFLOP/s, copy {:.1} GB/s{}\n",
                p.f32_tflops,
                p.copy_gbps,
                p.coop_f16_tflops.map_or(String::new(), |t| format!(
                    ", f16 tensor-core matmul (ours, 4096³) {t:.1} TFLOP/s"
                ))
            ));
        }
        s
    }
}

/// Adds each of the `n` dispatches' GPU time to its family, from the resolved timestamps `raw`
/// (read back by the context: two little-endian u64 ticks per dispatch).
pub(crate) fn collect(
    raw: &[u8],
    n: usize,
    period_ns: f32,
    families: &[String],
    into: &mut Profile,
) -> Result<()> {
    if raw.len() < 16 * n || families.len() < n {
        return Err(Error::gpu(
            "profile",
            "-",
            format!(
                "{} timestamp bytes and {} families for {n} dispatches",
                raw.len(),
                families.len()
            ),
        ));
    }
    let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&raw[..16 * n]);
    for (i, family) in families.iter().enumerate().take(n) {
        let (a, b) = (ticks[2 * i], ticks[2 * i + 1]);
        // A pass whose end precedes its start (some drivers reset counters) counts as zero.
        let ns = b.saturating_sub(a) as f64 * period_ns as f64;
        into.add(family, ns * 1e-9);
    }
    Ok(())
}
