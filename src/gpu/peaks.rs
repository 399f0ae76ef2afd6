//! The adapter's floors for `--profile`: its practical f32 FMA rate and memory bandwidth (a
//! streaming copy kernel), both from `shaders/peaks.wgsl`, and, where it has cooperative matrices,
//! the f16 rate of our own tensor-core matmul at 4096³ (a reference point, not the hardware's
//! peak: no portable kernel measures that). wgpu reports none of these, so they are measured once per
//! adapter and driver (each timed for at least [`MIN_TIMED_S`] of GPU work) and cached as JSON in
//! the cache directory (`WGPRESS_CACHE_DIR`, else `$XDG_CACHE_HOME/wgpress`, else
//! `~/.cache/wgpress`), so later runs print the profile without measuring again.
//!
//! This module must not run during a profiled command's own work: the profile calls it after
//! timing has stopped.

use super::buffer::{GpuDtype, GpuTensor};
use super::context::{Dispatch, GpuContext};
use super::matmul::{Layout, MatmulPath, coop_available, matmul_into};
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

/// Each measurement repeats its work until it has run at least this long.
pub const MIN_TIMED_S: f64 = 0.02;
const FILE: &str = "peaks.json";

/// Measured floors of one adapter and driver.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Peaks {
    /// f32 FMA throughput, TFLOP/s (2 FLOPs per FMA).
    pub f32_tflops: f64,
    /// Streaming copy bandwidth, GB/s (bytes read plus bytes written).
    pub copy_gbps: f64,
    /// Our f16 x f16 -> f32 tensor-core matmul at 4096³, TFLOP/s (adapters with cooperative
    /// matrices).
    pub coop_f16_tflops: Option<f64>,
}

/// Version of the measurement method, part of the cache key: changing how the floors are measured
/// must not reuse numbers measured the old way.
const METHOD: u32 = 4;

/// The cache key: method, adapter, backend and driver, so a driver update measures again.
pub fn adapter_key(ctx: &GpuContext) -> String {
    let a = &ctx.adapter;
    format!("v{METHOD} | {} | {} | {}", a.name, a.backend, a.driver)
}

/// The cache directory (see the module doc), if one can be named.
pub fn cache_dir() -> Option<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("WGPRESS_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("wgpress")))
        .or_else(|| env("HOME").map(|d| d.join(".cache").join("wgpress")))
}

/// This adapter's floors from the cache, or measured now and cached (a cache that cannot be read
/// or written is logged and skipped). Returns the floors and whether they were measured now.
pub fn cached(ctx: &GpuContext) -> Result<(Peaks, bool)> {
    cached_in(ctx, cache_dir())
}

/// [`cached`] with an explicit cache directory (`None`: measure, cache nothing).
pub fn cached_in(ctx: &GpuContext, dir: Option<PathBuf>) -> Result<(Peaks, bool)> {
    let key = adapter_key(ctx);
    let path = dir.map(|d| d.join(FILE));
    let mut all: BTreeMap<String, Peaks> = path
        .as_ref()
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| match serde_json::from_slice(&b) {
            Ok(m) => Some(m),
            Err(e) => {
                log::warn!("ignoring the unreadable adapter floor cache: {e}");
                None
            }
        })
        .unwrap_or_default();
    if let Some(p) = all.get(&key) {
        return Ok((p.clone(), false));
    }
    let peaks = measure(ctx)?;
    all.insert(key, peaks.clone());
    if let Some(p) = &path
        && let Err(e) = write_atomically(p, &serde_json::to_vec_pretty(&all).unwrap_or_default())
    {
        log::warn!("could not cache the adapter floors in {}: {e}", p.display());
    }
    Ok((peaks, true))
}

fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Runs `work` (which submits `units` of work per call and waits for the GPU) until at least
/// [`MIN_TIMED_S`] have passed, after `warm` warm-up calls; units per second.
fn rate(warm: usize, mut work: impl FnMut() -> Result<f64>) -> Result<f64> {
    for _ in 0..warm.max(1) {
        work()?;
    }
    let t = Instant::now();
    let mut units = 0.0;
    while t.elapsed().as_secs_f64() < MIN_TIMED_S || units == 0.0 {
        units += work()?;
    }
    Ok(units / t.elapsed().as_secs_f64())
}

/// The FMA kernel of `shaders/peaks.wgsl` over enough invocations to fill any GPU several times
/// (fewer where a lowered binding limit cannot hold their outputs), with its rounds scaled until
/// one dispatch takes ~2 ms.
struct Fma {
    out: GpuTensor,
    pipe: std::sync::Arc<wgpu::ComputePipeline>,
    groups: usize,
    iters: u32,
}

impl Fma {
    const SHAPE: &'static str = "adapter floors";

    fn new(ctx: &GpuContext) -> Result<Self> {
        let groups = 4096usize.min((ctx.binding_limit() / 1024) as usize).max(1);
        let mut f = Fma {
            out: GpuTensor::empty(ctx, 1, groups * 256, GpuDtype::F32)?,
            pipe: ctx.pipeline("peaks", crate::shaders::PEAKS, "fma_peak", false)?,
            groups,
            iters: 16,
        };
        loop {
            let t = Instant::now();
            f.pass(ctx)?;
            if t.elapsed().as_secs_f64() > 2e-3 || f.iters >= 1 << 20 {
                return Ok(f);
            }
            f.iters *= 4;
        }
    }

    /// One dispatch, waited for; its FLOPs.
    fn pass(&self, ctx: &GpuContext) -> Result<f64> {
        let params = [self.iters, 0, 0, 0];
        ctx.run(
            "fma_peak",
            Self::SHAPE,
            &self.pipe,
            &[Dispatch {
                buffers: vec![&self.out.chunks[0].buffer],
                uniform: Some(bytemuck::cast_slice(&params)),
                groups: (self.groups as u32, 1, 1),
            }],
        )?;
        ctx.sync("fma_peak", Self::SHAPE)?;
        Ok((self.groups * 256) as f64 * self.iters as f64 * 64.0)
    }
}

/// Seconds of load that [`hold_clock`] gives before a measurement by default.
pub const HOLD_CLOCK_S: f64 = 0.5;

/// Keeps the GPU busy with the FMA kernel for `secs` of wall time, so that a measurement started
/// right after runs at the clock the adapter holds under load. An H200 idles down from 1980 to
/// 345 MHz within a few seconds of a host-side pause and ran kernels at 345-780 MHz for up to a
/// second after work resumed (`nvidia-smi`, BENCHMARKS.md session 16): timings taken after a pause
/// (a layer generated on the host, a shape's setup) read up to 3x slow. Used before `bench
/// gptq`'s timed runs, the floors, and a problem's first tile trial (`gpu::tune`). Nothing to
/// hold on a software adapter.
pub fn hold_clock(ctx: &GpuContext, secs: f64) -> Result<()> {
    if ctx.software || secs <= 0.0 {
        return Ok(());
    }
    let t = Instant::now();
    let fma = Fma::new(ctx)?;
    while t.elapsed().as_secs_f64() < secs {
        fma.pass(ctx)?;
    }
    Ok(())
}

/// Measures the floors now (tens of milliseconds on a GPU after [`HOLD_CLOCK_S`] of load, a few
/// seconds on a software adapter).
pub fn measure(ctx: &GpuContext) -> Result<Peaks> {
    const SHAPE: &str = Fma::SHAPE;
    // Floors measured at an idle clock were cached at 40% of the real ones once (BENCHMARKS.md,
    // sessions 15 and 16).
    hold_clock(ctx, HOLD_CLOCK_S)?;
    let fma = Fma::new(ctx)?;
    let f32_tflops = rate(1, || fma.pass(ctx))? / 1e12;

    // Bandwidth: 256 MiB (or a quarter of the binding limit) each way, 16 bytes per access.
    let bytes = (256u64 << 20).min(ctx.binding_limit() / 4) / 16 * 16;
    let vec4s = (bytes / 16) as usize;
    let src = GpuTensor::empty(ctx, 1, vec4s * 4, GpuDtype::F32)?;
    let dst = GpuTensor::empty(ctx, 1, vec4s * 4, GpuDtype::F32)?;
    let copy = ctx.pipeline("peaks", crate::shaders::PEAKS, "copy_peak", false)?;
    let cp = [vec4s as u32, 0, 0, 0];
    let copy_groups = vec4s.div_ceil(256 * 4).clamp(1, 65535) as u32;
    let copy_gbps = rate(1, || {
        ctx.run(
            "copy_peak",
            SHAPE,
            &copy,
            &[Dispatch {
                buffers: vec![&dst.chunks[0].buffer, &src.chunks[0].buffer],
                uniform: Some(bytemuck::cast_slice(&cp)),
                groups: (copy_groups, 1, 1),
            }],
        )?;
        ctx.sync("copy_peak", SHAPE)?;
        Ok(2.0 * bytes as f64)
    })? / 1e9;

    let coop_f16_tflops = if coop_available(ctx) {
        let n = 4096;
        let a = GpuTensor::empty(ctx, n, n, GpuDtype::F16)?;
        a.fill_u32(ctx, 0x3c00_3c00); // 1.0 in every f16 lane
        let c = GpuTensor::empty(ctx, n, n, GpuDtype::F32)?;
        // Layout TN, the kernel's fastest orientation, run as it is (NN and NT would add
        // transposes: `gpu::matmul::as_tn_pays`).
        // The first products of a new shape are the tile tuner's trials (each candidate compiled
        // and timed alone): timing them read 0.2 TFLOP/s on an H200 whose tuned kernel runs 130.
        Some(
            rate(2 + super::tune::MAX_TRIALS, || {
                matmul_into(ctx, &a, &a, Layout::TN, &c, false, Some(MatmulPath::Coop))?;
                ctx.sync("coop_peak", SHAPE)?;
                Ok(2.0 * (n * n * n) as f64)
            })? / 1e12,
        )
    } else {
        None
    };
    let p = Peaks {
        f32_tflops,
        copy_gbps,
        coop_f16_tflops,
    };
    if !(p.f32_tflops.is_finite() && p.f32_tflops > 0.0 && p.copy_gbps > 0.0) {
        return Err(Error::gpu(
            "peaks",
            SHAPE,
            format!("implausible floors {p:?}"),
        ));
    }
    Ok(p)
}
