//! Kernel benchmarks behind `wgpress bench`: fixed random inputs, warm-up, then wall-clock time of
//! `iters` back-to-back launches ended by one wait (the launch gap is part of what users see).
//! Speed is measured here and in the criterion benches, never asserted in tests.

use crate::error::Result;
use crate::gpu::matmul::{Layout, MatmulPath, matmul_into};
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

/// Times C = A * op(B) for an m x n x k problem.
pub fn matmul(
    ctx: &GpuContext,
    (m, n, k): (usize, usize, usize),
    dtype: GpuDtype,
    layout: Layout,
    path: Option<MatmulPath>,
    iters: usize,
) -> Result<MatmulBench> {
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
    let mut took = MatmulPath::Tiled;
    for _ in 0..2 {
        took = matmul_into(ctx, &a, &b, layout, &c, false, path)?;
    }
    ctx.sync("matmul", &shape)?;
    let iters = iters.max(1);
    let t = Instant::now();
    for _ in 0..iters {
        matmul_into(ctx, &a, &b, layout, &c, false, path)?;
    }
    ctx.sync("matmul", &shape)?;
    let s = t.elapsed().as_secs_f64() / iters as f64;
    Ok(MatmulBench {
        m,
        n,
        k,
        dtype: format!("{dtype:?}").to_lowercase(),
        layout: format!("{layout:?}"),
        path: format!("{took:?}").to_lowercase(),
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
    /// 2·tokens·dim² flops per add (the full d x d product, both triangles, as torch's X.T @ X)
    /// over `ms`.
    pub tflops: f64,
}

/// Times accumulating XᵀX of a random `tokens x d` X (one `add`, the final 2/n scale excluded:
/// it is d² work once per layer).
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
    for _ in 0..2 {
        acc.add(ctx, &x)?;
    }
    ctx.sync("hessian", &shape)?;
    let iters = iters.max(1);
    let t = Instant::now();
    for _ in 0..iters {
        acc.add(ctx, &x)?;
    }
    ctx.sync("hessian", &shape)?;
    let s = t.elapsed().as_secs_f64() / iters as f64;
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
) -> Result<ForwardBench> {
    let gm = crate::model::forward::GpuModel::load(ctx, model, seq_len)?;
    let mut rng = Rng::new(7);
    let vocab = model.config.vocab_size as u64;
    let mut ids = || -> Vec<u32> { (0..seq_len).map(|_| rng.below(vocab) as u32).collect() };
    let warm = gm.logits(ctx, model, &ids())?;
    drop(warm);
    ctx.sync("forward", "warm-up")?;
    let windows = windows.max(1);
    let t = Instant::now();
    for _ in 0..windows {
        let l = gm.logits(ctx, model, &ids())?;
        ctx.sync("forward", &format!("{seq_len} tokens"))?;
        drop(l);
    }
    let s = t.elapsed().as_secs_f64();
    Ok(ForwardBench {
        seq_len,
        windows,
        ms_per_window: s * 1e3 / windows as f64,
        tokens_per_s: (seq_len * windows) as f64 / s,
    })
}
