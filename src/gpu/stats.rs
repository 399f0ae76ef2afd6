//! Calibration statistics of one linear layer's inputs on the GPU: the Hessian H = (2/n)·XᵀX
//! accumulated in f32 over any number of token chunks ([`HessianAccumulator`]), and the
//! per-input-channel sum of squares and max |x| over tokens ([`channel_stats`], accumulable across
//! calls; the L2 norm is [`sqrt_in_place`] of the sum at the end).
//!
//! XᵀX of a chunk is one matmul call in layout TN (A = B = X, tokens x features, both chunked along
//! the token axis, which is K), accumulated into H; f32 X is summed [`F32_PIECE_TOKENS`] tokens at
//! a time. Only the tiles reaching H's lower triangle are computed (about n·d² flops instead of
//! 2·n·d²) and `finish` mirrors the lower triangle onto the upper one ([`mirror_lower`],
//! `shaders/mirror.wgsl`). Where the adapter has cooperative matrices, f16 X goes through the
//! tensor-core kernel (exact inputs, f32 accumulation), and so does bf16 X once its max |x| is
//! known to fit f16's range (values below f16's normal range, |x| < 6.1e-5, keep fewer bits, which
//! moves H by less than 1e-8 per product); f32 X and any out-of-range bf16 chunk take the f32 tiled
//! kernel. The column statistics use `shaders/stats.wgsl`, a one-pass column reduction (X is read
//! once; a transposed view would cost a copy of X) whose cost, n·d loads, is negligible next to the
//! product. `shaders/elementwise.wgsl` applies the final 2/n and the square root in place.
//!
//! Every shape, offset and extent is validated on the host before a dispatch (this is what lets
//! the pipelines be built without runtime bounds checks). This module must not download data
//! (beyond the d column maxima of the bf16 range check), fall back to the CPU, or know about
//! models and layers (`calib/` decides what X is); the reference is `reference::stats`.

use super::buffer::{GpuDtype, GpuTensor};
use super::context::{Dispatch, GpuContext};
use super::matmul::{MatmulPath, coop_available, loader, matmul_lower_into};
use super::reduce::{check_workgroup_size, plan, to_u32};
use crate::error::{Error, Result};
use crate::shaders;

/// Tokens per f32 sum of XᵀX: each piece's products are summed in one f32 sum and the pieces are
/// added into H one after another. When the tokens share one dominant component (the inputs of
/// deep Llama blocks: attention outputs after a sink token, residual streams with massive
/// activations), one long f32 sum keeps little of XᵀX outside that component, which is where
/// GPTQ's error compensation works. tools/hessian_f32_sums.py: 6.3e-2 relative error there for
/// one sum of 8192 tokens against 5.7e-3 for sums of 512 added; PyTorch's GPTQ adds one
/// 512-token sequence at a time too. On SmolLM2's last blocks the per-layer errors move by about
/// 5% with H's own rounding (BENCHMARKS.md, session 13), so they cannot show which H quantizes
/// better; perplexity on the device decides. The cost is one read and write of H's lower
/// triangle per piece.
pub const F32_PIECE_TOKENS: usize = 512;

/// Running H = Σ XᵀX over the token chunks added so far (f32, d x d, on the GPU) and their count.
pub struct HessianAccumulator {
    h: GpuTensor,
    n: u64,
    d: usize,
}

impl HessianAccumulator {
    /// An empty accumulator for inputs with `d` features (H is zeroed here).
    pub fn new(ctx: &GpuContext, d: usize) -> Result<Self> {
        let h = GpuTensor::empty(ctx, d, d, GpuDtype::F32)?;
        h.fill_u32(ctx, 0);
        Ok(HessianAccumulator { h, n: 0, d })
    }

    pub fn dim(&self) -> usize {
        self.d
    }

    /// Tokens added so far.
    pub fn tokens(&self) -> u64 {
        self.n
    }

    /// The unscaled running sum XᵀX (d x d f32); only its lower triangle is complete until
    /// `finish`.
    pub fn xtx(&self) -> &GpuTensor {
        &self.h
    }

    /// Adds XᵀX of `x` (tokens x d, f32/f16/bf16, any number of rows and chunks) and counts its
    /// tokens.
    pub fn add(&mut self, ctx: &GpuContext, x: &GpuTensor) -> Result<()> {
        if x.cols != self.d {
            return Err(Error::Shape {
                op: "hessian".into(),
                expected: format!("tokens x {} input", self.d),
                got: x.shape_str(),
            });
        }
        if x.dtype == GpuDtype::U32 {
            return Err(Error::invalid("hessian: input must be f32, f16 or bf16"));
        }
        if x.rows == 0 {
            return Ok(());
        }
        // f16 X takes the cooperative kernel by matmul's own rule; bf16 X only once it fits f16.
        let bf16_coop = x.dtype == GpuDtype::BF16 && coop_available(ctx) && fits_f16(ctx, x)?;
        let path = bf16_coop.then_some(MatmulPath::Coop);
        // XᵀX is symmetric: only the tiles reaching the lower triangle are computed, and
        // `finish` mirrors them. f32 X is summed in pieces of F32_PIECE_TOKENS tokens.
        let piece = if x.dtype == GpuDtype::F32 {
            F32_PIECE_TOKENS
        } else {
            0
        };
        matmul_lower_into(ctx, x, x, &self.h, true, path, piece)?;
        self.n += x.rows as u64;
        Ok(())
    }

    /// H = (2/n)·XᵀX, its upper triangle mirrored from the lower one and scaled in place on the
    /// GPU. An error if no token was added (H undefined).
    pub fn finish(self, ctx: &GpuContext) -> Result<GpuTensor> {
        if self.n == 0 {
            return Err(Error::invalid(
                "hessian: no calibration tokens were added, H = (2/n)·XᵀX is undefined",
            ));
        }
        mirror_lower(ctx, &self.h)?;
        scale_in_place(ctx, &self.h, (2.0 / self.n as f64) as f32)?;
        Ok(self.h)
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct MirrorParams {
    d: u32,
    r0: u32,
    nr: u32,
    s0: u32,
    ns: u32,
    pad: [u32; 3],
}

/// M[i][j] = M[j][i] for j > i, in place, for a square f32 tensor in any number of row chunks
/// (`shaders/mirror.wgsl`: one dispatch per pair of chunks that holds such elements).
pub fn mirror_lower(ctx: &GpuContext, m: &GpuTensor) -> Result<()> {
    const KERNEL: &str = "mirror";
    let shape = m.shape_str();
    if m.dtype != GpuDtype::F32 || m.rows != m.cols {
        return Err(Error::invalid(format!(
            "mirror: expected a square F32 tensor, got {shape}"
        )));
    }
    let d = m.cols;
    let max = ctx.max_workgroups_per_dim() as usize;
    let mut params = Vec::new();
    let mut binds = Vec::new();
    for (di, dc) in m.chunks.iter().enumerate() {
        for (si, sc) in m.chunks.iter().enumerate() {
            // Some j in S's rows must exceed some i in D's rows.
            if dc.rows == 0 || sc.rows == 0 || sc.row_start + sc.rows <= dc.row_start + 1 {
                continue;
            }
            let groups = (sc.rows.div_ceil(16), dc.rows.div_ceil(16));
            if groups.0 > max || groups.1 > max {
                return Err(Error::gpu(
                    KERNEL,
                    &shape,
                    "the dispatch grid limit is exceeded",
                ));
            }
            params.push(MirrorParams {
                d: to_u32(d, KERNEL, &shape)?,
                r0: to_u32(dc.row_start, KERNEL, &shape)?,
                nr: to_u32(dc.rows, KERNEL, &shape)?,
                s0: to_u32(sc.row_start, KERNEL, &shape)?,
                ns: to_u32(sc.rows, KERNEL, &shape)?,
                pad: [0; 3],
            });
            binds.push((di, si, (groups.0 as u32, groups.1 as u32, 1)));
        }
    }
    if params.is_empty() {
        return Ok(());
    }
    // Trusted: every index the kernel forms is inside the rows of its two chunks (checked above).
    let pipe = ctx.pipeline(KERNEL, shaders::MIRROR, "main", true)?;
    let dispatches: Vec<Dispatch> = params
        .iter()
        .zip(&binds)
        .map(|(p, &(di, si, groups))| Dispatch {
            buffers: vec![&m.chunks[di].buffer, &m.chunks[si].buffer],
            uniform: Some(bytemuck::bytes_of(p)),
            groups,
        })
        .collect();
    ctx.run(KERNEL, &shape, &pipe, &dispatches)
}

/// Largest finite f16.
pub(crate) const F16_MAX: f32 = 65504.0;

/// Whether every element of `x` lies within f16's range (so rounding it to f16 cannot overflow).
fn fits_f16(ctx: &GpuContext, x: &GpuTensor) -> Result<bool> {
    let (_, absmax) = channel_stats(ctx, x)?;
    let m = absmax.to_f32(ctx)?;
    let ok = m.iter().all(|&v| v <= F16_MAX);
    if !ok {
        log::debug!("hessian: bf16 input exceeds f16's range, using the f32 kernel");
    }
    Ok(ok)
}

/// Per-input-channel statistics of `x` (tokens x d, f32/f16/bf16): (Σ_t x_tj², max_t |x_tj|),
/// each a d x 1 f32 tensor. Zero rows give zeros.
pub fn channel_stats(ctx: &GpuContext, x: &GpuTensor) -> Result<(GpuTensor, GpuTensor)> {
    let s = GpuTensor::empty(ctx, x.cols, 1, GpuDtype::F32)?;
    let a = GpuTensor::empty(ctx, x.cols, 1, GpuDtype::F32)?;
    channel_stats_into(ctx, x, &s, &a, false)?;
    Ok((s, a))
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct StatsParams {
    rows: u32,
    cols: u32,
    x_off: u32,
    col0: u32,
    ncols: u32,
    s_off: u32,
    a_off: u32,
    accumulate: u32,
}

/// Columns per workgroup of `stats.wgsl` (its `@workgroup_size` is 32 x 8).
const STATS_COLS: usize = 32;

/// The column-statistics kernel's source for one input dtype.
pub fn stats_source(dtype: GpuDtype) -> Result<String> {
    Ok(format!("{}{}", loader("X", 0, dtype)?, shaders::STATS))
}

/// Every variant's source, for the naga validation test.
pub fn all_sources() -> Vec<(String, String, bool)> {
    let mut v: Vec<(String, String, bool)> = [GpuDtype::F32, GpuDtype::F16, GpuDtype::BF16]
        .into_iter()
        .filter_map(|d| {
            stats_source(d)
                .ok()
                .map(|s| (format!("stats.wgsl {d:?}"), s, false))
        })
        .collect();
    v.push((
        "elementwise.wgsl".into(),
        shaders::ELEMENTWISE.to_string(),
        false,
    ));
    v
}

/// [`channel_stats`] into caller-allocated d x 1 f32 tensors; with `accumulate` the sums add to
/// `sumsq` and the maxima fold into `absmax` (both must then hold earlier results), so calls over
/// successive token chunks give the statistics of all tokens.
pub fn channel_stats_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    sumsq: &GpuTensor,
    absmax: &GpuTensor,
    accumulate: bool,
) -> Result<()> {
    const KERNEL: &str = "channel_stats";
    let shape = x.shape_str();
    if x.dtype == GpuDtype::U32 {
        return Err(Error::invalid(
            "channel_stats: input must be f32, f16 or bf16",
        ));
    }
    for out in [sumsq, absmax] {
        if out.rows != x.cols || out.cols != 1 || out.dtype != GpuDtype::F32 {
            return Err(Error::Shape {
                op: KERNEL.into(),
                expected: format!("{}x1 F32 outputs", x.cols),
                got: format!("{} and {}", sumsq.shape_str(), absmax.shape_str()),
            });
        }
    }
    let x_chunks: Vec<usize> = (0..x.chunks.len())
        .filter(|&i| x.chunks[i].rows > 0)
        .collect();
    if x.cols == 0 {
        return Ok(());
    }
    if x_chunks.is_empty() {
        if !accumulate {
            sumsq.fill_u32(ctx, 0);
            absmax.fill_u32(ctx, 0);
        }
        return Ok(());
    }
    for ch in &x.chunks {
        to_u32(ch.rows * x.cols, KERNEL, &shape)?;
    }
    let key = format!("col_stats {:?}", x.dtype);
    let pipe = ctx.pipeline_from(&key, "col_stats", true, || stats_source(x.dtype))?;
    let max_cols = ctx.max_workgroups_per_dim() as usize * STATS_COLS;
    let mut params = Vec::new();
    let mut binds = Vec::new();
    for (pass, &xi) in x_chunks.iter().enumerate() {
        for (c0, c1) in GpuTensor::common_row_ranges(&[sumsq, absmax]) {
            let (si, sr) = sumsq.locate(c0);
            let (ai, ar) = absmax.locate(c0);
            let mut s = c0;
            while s < c1 {
                let e = (s + max_cols).min(c1);
                params.push(StatsParams {
                    rows: to_u32(x.chunks[xi].rows, KERNEL, &shape)?,
                    cols: to_u32(x.cols, KERNEL, &shape)?,
                    x_off: 0,
                    col0: to_u32(s, KERNEL, &shape)?,
                    ncols: to_u32(e - s, KERNEL, &shape)?,
                    s_off: to_u32(sr + s - c0, KERNEL, &shape)?,
                    a_off: to_u32(ar + s - c0, KERNEL, &shape)?,
                    accumulate: (accumulate || pass > 0) as u32,
                });
                binds.push((xi, si, ai, (e - s).div_ceil(STATS_COLS) as u32));
                s = e;
            }
        }
    }
    let dispatches: Vec<Dispatch> = params
        .iter()
        .zip(&binds)
        .map(|(p, &(xi, si, ai, gx))| Dispatch {
            buffers: vec![
                &x.chunks[xi].buffer,
                &sumsq.chunks[si].buffer,
                &absmax.chunks[ai].buffer,
            ],
            uniform: Some(bytemuck::bytes_of(p)),
            groups: (gx, 1, 1),
        })
        .collect();
    ctx.run(KERNEL, &shape, &pipe, &dispatches)
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct MapParams {
    len: u32,
    off: u32,
    op: u32,
    s: f32,
}

fn map_in_place(ctx: &GpuContext, t: &GpuTensor, op: u32, s: f32) -> Result<()> {
    const KERNEL: &str = "elementwise";
    let shape = t.shape_str();
    if t.dtype != GpuDtype::F32 {
        return Err(Error::invalid(format!(
            "elementwise: tensor must be F32, got {shape}"
        )));
    }
    if t.rows == 0 || t.cols == 0 {
        return Ok(());
    }
    check_workgroup_size(ctx, KERNEL, &shape)?;
    let pipe = ctx.pipeline(KERNEL, shaders::ELEMENTWISE, "apply", true)?;
    let mut params = Vec::new();
    let mut launches = Vec::new();
    for (ci, ch) in t.chunks.iter().enumerate() {
        for l in plan(ch.rows, t.cols, 256, ctx.max_workgroups_per_dim())? {
            params.push(MapParams {
                len: to_u32(l.rows * t.cols, KERNEL, &shape)?,
                off: to_u32(l.first * t.cols, KERNEL, &shape)?,
                op,
                s,
            });
            launches.push((ci, l.groups));
        }
    }
    let dispatches: Vec<Dispatch> = params
        .iter()
        .zip(&launches)
        .map(|(p, &(ci, groups))| Dispatch {
            buffers: vec![&t.chunks[ci].buffer],
            uniform: Some(bytemuck::bytes_of(p)),
            groups,
        })
        .collect();
    ctx.run(KERNEL, &shape, &pipe, &dispatches)
}

/// t = s·t, elementwise, in place (f32).
pub fn scale_in_place(ctx: &GpuContext, t: &GpuTensor, s: f32) -> Result<()> {
    map_in_place(ctx, t, 0, s)
}

/// t = sqrt(t), elementwise, in place (f32): L2 norms from accumulated sums of squares.
pub fn sqrt_in_place(ctx: &GpuContext, t: &GpuTensor) -> Result<()> {
    map_in_place(ctx, t, 1, 0.0)
}
