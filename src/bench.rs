//! Kernel benchmarks behind `wgpress bench`: fixed random inputs, warm-up, then wall-clock time of
//! `iters` back-to-back launches ended by one wait (the launch gap is part of what users see).
//! Speed is measured here and in the criterion benches, never asserted in tests.

use crate::error::Result;
use crate::gpu::matmul::{
    CoopConfig, Layout, MatmulPath, RegionProduct, SplitScratch, matmul_into, matmul_into_coop,
    run_gemm_steps,
};
use crate::gpu::stats::HessianAccumulator;
use crate::gpu::{GpuContext, GpuDtype, GpuTensor};
use crate::rng::Rng;
use std::time::Instant;

/// One matmul benchmark row.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MatmulBench {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub dtype: String,
    pub layout: String,
    pub path: String,
    /// The cooperative kernel's tile configuration when one was forced.
    pub config: Option<String>,
    pub ms: f64,
    pub tflops: f64,
}

fn random_tensor(
    ctx: &GpuContext,
    rows: usize,
    cols: usize,
    dtype: GpuDtype,
    seed: u64,
) -> Result<GpuTensor> {
    let mut rng = Rng::new(seed);
    GpuTensor::from_f32_as(ctx, rows, cols, &rng.normal_vec(rows * cols, 1.0), dtype)
}

/// Warm-up before timing: at least this long (an idle GPU needs ~0.1 s of work to raise its clocks;
/// shorter warm-ups measured small problems at half speed on the H200) ...
const WARM_S: f64 = 0.3;
/// ... and the timed launches span at least this long.
const TIMED_S: f64 = 0.2;

/// Runs `f` until it has run `min` times and `secs` have passed (waiting for the GPU at the end);
/// returns the runs and the seconds.
fn repeat(
    ctx: &GpuContext,
    shape: &str,
    min: usize,
    secs: f64,
    mut f: impl FnMut() -> Result<()>,
) -> Result<(usize, f64)> {
    let t = Instant::now();
    let mut runs = 0;
    loop {
        for _ in 0..min.max(1) {
            f()?;
        }
        runs += min.max(1);
        ctx.sync("matmul", shape)?;
        let e = t.elapsed().as_secs_f64();
        if e >= secs {
            return Ok((runs, e));
        }
    }
}

/// Runs `f` for at least [`WARM_S`] and past the tile tuner's trials (`gpu::tune`), so timed
/// launches run at raised clocks with the tuner's choice.
fn warm_up(ctx: &GpuContext, shape: &str, f: impl FnMut() -> Result<()>) -> Result<()> {
    repeat(ctx, shape, 2 + crate::gpu::tune::MAX_TRIALS, WARM_S, f).map(|_| ())
}

/// Times C = A * op(B) for an m x n x k problem, once per entry of `configs` (`Some` forces the
/// cooperative kernel with that tile configuration; `None` takes `path`, or the automatic
/// choice, with the tile tuner's pick), on the same random operands.
pub fn matmul(
    ctx: &GpuContext,
    (m, n, k): (usize, usize, usize),
    dtype: GpuDtype,
    layout: Layout,
    path: Option<MatmulPath>,
    configs: &[Option<CoopConfig>],
    iters: usize,
) -> Result<Vec<MatmulBench>> {
    let a = match layout {
        Layout::TN => random_tensor(ctx, k, m, dtype, 1)?,
        Layout::NN | Layout::NT => random_tensor(ctx, m, k, dtype, 1)?,
    };
    let b = match layout {
        Layout::NN => random_tensor(ctx, k, n, dtype, 2)?,
        Layout::NT => random_tensor(ctx, n, k, dtype, 2)?,
        Layout::TN => random_tensor(ctx, k, n, dtype, 2)?,
    };
    let c = GpuTensor::empty(ctx, m, n, GpuDtype::F32)?;
    let shape = format!("{m}x{n}x{k}");
    let mut rows = Vec::new();
    for &config in configs {
        let mut took = MatmulPath::Tiled;
        let mut run = || -> Result<()> {
            took = match config {
                Some(cfg) => {
                    matmul_into_coop(ctx, &a, &b, layout, &c, false, cfg)?;
                    MatmulPath::Coop
                }
                None => matmul_into(ctx, &a, &b, layout, &c, false, path)?,
            };
            Ok(())
        };
        warm_up(ctx, &shape, &mut run)?;
        let (runs, secs) = repeat(ctx, &shape, iters, TIMED_S, &mut run)?;
        let s = secs / runs as f64;
        rows.push(MatmulBench {
            m,
            n,
            k,
            dtype: format!("{dtype:?}").to_lowercase(),
            layout: format!("{layout:?}"),
            path: format!("{took:?}").to_lowercase(),
            config: config.map(CoopConfig::name),
            ms: s * 1e3,
            tflops: 2.0 * m as f64 * n as f64 * k as f64 / s / 1e12,
        });
    }
    Ok(rows)
}

/// Times GPTQ's far lazy update as a split product (f32-accurate, on the tensor cores): C -= A·B
/// for f32 A (m x k), B (k x n) and C (m x n), through the same three dispatches (splits of A
/// and B, the cooperative product over 3k with the split epilogue) and one scratch allocated
/// once. TFLOP/s counts the f32 product (2mnk); the tensor cores execute three times as much.
pub fn split_matmul(
    ctx: &GpuContext,
    (m, n, k): (usize, usize, usize),
    iters: usize,
) -> Result<MatmulBench> {
    let a = random_tensor(ctx, m, k, GpuDtype::F32, 1)?;
    let b = random_tensor(ctx, k, n, GpuDtype::F32, 2)?;
    let c = random_tensor(ctx, m, n, GpuDtype::F32, 3)?;
    let scratch = SplitScratch::new(ctx, m, n, k)?;
    let steps = RegionProduct {
        m,
        n,
        k,
        a_off: 0,
        lda: k,
        b_off: 0,
        ldb: n,
        c_off: 0,
        ldc: n,
        b_trans: false,
        alpha: -1.0,
        accumulate: true,
        split: true,
    }
    .steps(ctx, &a, &b, &c, Some(&scratch))?;
    let shape = format!("{m}x{n}x{k}");
    let mut run = || run_gemm_steps(ctx, "split product", &shape, &steps);
    warm_up(ctx, &shape, &mut run)?;
    let (runs, secs) = repeat(ctx, &shape, iters, TIMED_S, &mut run)?;
    let s = secs / runs as f64;
    Ok(MatmulBench {
        m,
        n,
        k,
        dtype: "f32".into(),
        layout: "NN".into(),
        path: "split".into(),
        config: Some(CoopConfig::SPLIT.name()),
        ms: s * 1e3,
        tflops: 2.0 * m as f64 * n as f64 * k as f64 / s / 1e12,
    })
}

/// One Hessian benchmark row.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HessianBench {
    pub tokens: usize,
    pub dim: usize,
    pub dtype: String,
    /// Time of one `HessianAccumulator::add` of all `tokens` rows (XᵀX into H).
    pub ms: f64,
    /// 2·tokens·dim² flops per add (the full d x d product, both triangles, as torch's X.T @ X
    /// computes it) over `ms`: an effective rate, since only the tiles reaching the lower
    /// triangle (about half) are computed.
    pub tflops: f64,
}

/// Times accumulating XᵀX of a random `tokens x d` X (one `add`; `finish`, which mirrors the
/// lower triangle and applies 2/n, is excluded: it is d² work once per layer).
pub fn hessian(
    ctx: &GpuContext,
    tokens: usize,
    d: usize,
    dtype: GpuDtype,
    iters: usize,
) -> Result<HessianBench> {
    let x = random_tensor(ctx, tokens, d, dtype, 3)?;
    let mut acc = HessianAccumulator::new(ctx, d)?;
    let shape = format!("{tokens}x{d}");
    warm_up(ctx, &shape, || acc.add(ctx, &x))?;
    let (runs, secs) = repeat(ctx, &shape, iters, TIMED_S, || acc.add(ctx, &x))?;
    let s = secs / runs as f64;
    acc.finish(ctx)?;
    Ok(HessianBench {
        tokens,
        dim: d,
        dtype: format!("{dtype:?}").to_lowercase(),
        ms: s * 1e3,
        tflops: 2.0 * tokens as f64 * d as f64 * d as f64 / s / 1e12,
    })
}

/// One forward-throughput measurement (`wgpress bench forward`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct ForwardBench {
    pub seq_len: usize,
    pub windows: usize,
    pub ms_per_window: f64,
    pub tokens_per_s: f64,
}

/// Times the whole-model forward (all blocks, final norm, head) on random token ids, one window of
/// `seq_len` tokens at a time, as `wgpress eval` runs it.
pub fn forward(
    ctx: &GpuContext,
    model: &crate::model::Model,
    seq_len: usize,
    windows: usize,
    precision: crate::model::forward::Precision,
) -> Result<ForwardBench> {
    let gm = crate::model::forward::GpuModel::load(ctx, model, seq_len, precision)?;
    let mut rng = Rng::new(7);
    let vocab = model.config.vocab_size as u64;
    let mut ids = || -> Vec<u32> { (0..seq_len).map(|_| rng.below(vocab) as u32).collect() };
    let warm = gm.logits(ctx, &ids())?;
    drop(warm);
    ctx.sync("forward", "warm-up")?;
    let windows = windows.max(1);
    let t = Instant::now();
    for _ in 0..windows {
        let l = gm.logits(ctx, &ids())?;
        ctx.sync("forward", &format!("{seq_len} tokens"))?;
        drop(l);
    }
    let s = t.elapsed().as_secs_f64();
    // After the timing: an f16 overflow would make the timed work meaningless.
    gm.plan.check_range(ctx)?;
    Ok(ForwardBench {
        seq_len,
        windows,
        ms_per_window: s * 1e3 / windows as f64,
        tokens_per_s: (seq_len * windows) as f64 / s,
    })
}

/// One GPTQ benchmark row: a rows x cols layer with H from `tokens` random calibration rows.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GptqBench {
    pub rows: usize,
    pub cols: usize,
    pub spec: crate::quant::QuantSpec,
    pub act_order: bool,
    pub tokens: usize,
    /// Best full run (seconds), W on the host and H on the GPU at the start, integers and grids on
    /// the host at the end.
    pub total_s: f64,
    /// Phases of that run.
    pub phases: crate::gpu::gptq::GptqPhases,
    /// The column loop with only the fused block kernels (no lazy updates), and with only the lazy
    /// updates: what each costs alone.
    pub block_only_s: f64,
    pub lazy_only_s: f64,
    /// The column-loop kernel that ran (`gpu::gptq::ColumnLoop::name`).
    pub column_loop: &'static str,
    /// The lazy-update kernel that ran (`gpu::gptq::LazyPath::name`).
    pub lazy_path: &'static str,
    /// Floating-point operations per phase (multiply-add = 2) as executed.
    pub flops_cholesky: f64,
    pub flops_inverse: f64,
    pub flops_block: f64,
    pub flops_lazy: f64,
    /// Peak live GPU bytes during the run beyond the Hessian that was already there.
    pub peak_extra_bytes: u64,
    pub layer_f32_bytes: u64,
    pub hessian_bytes: u64,
}

/// What `bench gptq` runs: the grid, act-order, the calibration rows behind the random Hessian,
/// timed iterations, optionally forced column-loop and lazy-update kernels, and the seconds of
/// GPU load before each timed run (`gpu::peaks::hold_clock`).
#[derive(Clone, Copy, Debug)]
pub struct GptqBenchOptions {
    pub spec: crate::quant::QuantSpec,
    pub act_order: bool,
    pub tokens: usize,
    pub iters: usize,
    pub column_loop: Option<crate::gpu::gptq::ColumnLoop>,
    pub lazy_path: Option<crate::gpu::gptq::LazyPath>,
    /// Lazy-update span (`gpu::gptq::Hooks::lazy_span`); `None` is the production one.
    pub lazy_span: Option<usize>,
    pub hold_clock: f64,
}

/// Times GPU GPTQ on a random layer (std 0.02 weights) whose H = (2/n)XᵀX comes from `tokens`
/// Gaussian rows with eight heavy channels; best of `iters` after one warm-up, each run after
/// `hold_clock` seconds of GPU load.
pub fn gptq(ctx: &GpuContext, rows: usize, cols: usize, o: &GptqBenchOptions) -> Result<GptqBench> {
    let GptqBenchOptions {
        spec,
        act_order,
        tokens,
        iters,
        column_loop,
        lazy_path,
        lazy_span,
        hold_clock,
    } = *o;
    use crate::gpu::gptq::{Hooks, gptq_with};
    let column_loop = column_loop.unwrap_or(crate::gpu::gptq::column_loop(ctx));
    use crate::quant::gptq::block_size;
    let mut rng = Rng::new(7);
    let w = rng.normal_vec(rows * cols, 0.02);
    let h = {
        let mut acc = HessianAccumulator::new(ctx, cols)?;
        let step = (tokens).min((256 << 20) / (4 * cols)).max(1);
        let mut done = 0;
        while done < tokens {
            let t = step.min(tokens - done);
            let mut x = rng.normal_vec(t * cols, 1.0);
            for r in 0..t {
                for c in 0..cols.min(8) {
                    x[r * cols + c * (cols / 8).max(1)] *= 10.0;
                }
            }
            acc.add(ctx, &GpuTensor::from_f32(ctx, t, cols, &x)?)?;
            done += t;
        }
        acc.finish(ctx)?
    };
    let mut opts = crate::quant::gptq::GptqOptions::new(spec);
    opts.act_order = act_order;
    // The production choice unless forced (named by the layer; on an adapter whose binding
    // limit splits the layer into row chunks, each chunk chooses for itself).
    let lazy_path = lazy_path
        .unwrap_or_else(|| crate::gpu::gptq::layer_lazy_path(ctx, rows, cols, &opts, lazy_span));
    let prod = Hooks {
        column_loop: Some(column_loop),
        lazy_path: Some(lazy_path),
        lazy_span,
        ..Default::default()
    };
    let shape = format!("{rows}x{cols}");
    let run = |hooks: Hooks| -> Result<(f64, crate::gpu::gptq::GptqPhases)> {
        crate::gpu::peaks::hold_clock(ctx, hold_clock)?;
        let t = Instant::now();
        let (_, ph) = gptq_with(ctx, &w, rows, cols, &h, &opts, hooks)?;
        ctx.sync("gptq", &shape)?;
        Ok((t.elapsed().as_secs_f64(), ph))
    };
    run(prod)?;
    let live = ctx.memory().0;
    ctx.reset_peak();
    let mut best = (f64::INFINITY, Default::default());
    for _ in 0..iters.max(1) {
        let r = run(prod)?;
        if r.0 < best.0 {
            best = r;
        }
    }
    let peak = ctx.memory().1.saturating_sub(live);
    let min_loop = |hooks: Hooks| -> Result<f64> {
        let mut b = f64::INFINITY;
        for _ in 0..iters.max(1) {
            b = b.min(run(hooks)?.1.loop_s);
        }
        Ok(b)
    };
    let block_only_s = min_loop(Hooks {
        skip_lazy: true,
        ..prod
    })?;
    let lazy_only_s = min_loop(Hooks {
        skip_block: true,
        ..prod
    })?;
    // FLOPs as executed on the padded order n.
    let nb = crate::gpu::linalg::NB;
    let n = cols.div_ceil(nb) * nb;
    let (nf, rf) = (n as f64, rows as f64);
    let mut chol = 0.0;
    for k0 in (0..n).step_by(nb) {
        let rest = (n - k0 - nb) as f64;
        chol +=
            (nb * nb * nb) as f64 / 3.0 + 2.0 * rest * (nb * nb) as f64 + rest * rest * nb as f64;
    }
    fn merges(lo: usize, hi: usize, nb: usize, acc: &mut f64) {
        if hi - lo <= 1 {
            return;
        }
        let mid = lo + (hi - lo) / 2;
        merges(lo, mid, nb, acc);
        merges(mid, hi, nb, acc);
        let (a, c) = (((mid - lo) * nb) as f64, ((hi - mid) * nb) as f64);
        *acc += 2.0 * c * a * a + 2.0 * c * c * a;
    }
    let mut inv = 0.0;
    merges(0, n / nb, nb, &mut inv);
    let bsz = block_size(spec.group.map(|_| spec.group_size(cols)), opts.block);
    let (mut blk, mut lazy) = (0.0, 0.0);
    for b0 in (0..n).step_by(bsz) {
        let bw = bsz.min(n - b0) as f64;
        blk += rf * bw * (bw - 1.0);
        lazy += 2.0 * rf * bw * (nf - b0 as f64 - bw);
    }
    Ok(GptqBench {
        rows,
        cols,
        spec,
        act_order,
        tokens,
        total_s: best.0,
        phases: best.1,
        block_only_s,
        lazy_only_s,
        column_loop: column_loop.name(),
        lazy_path: lazy_path.name(),
        flops_cholesky: chol,
        flops_inverse: inv,
        flops_block: blk,
        flops_lazy: lazy,
        peak_extra_bytes: peak,
        layer_f32_bytes: (rows * cols * 4) as u64,
        hessian_bytes: (cols * cols * 4) as u64,
    })
}
