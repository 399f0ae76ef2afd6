//! GPTQ on the GPU (`shaders/gptq.wgsl` plus `gpu::linalg` and the matmul kernel), following the
//! conventions of `quant::gptq` so it reproduces the f64 reference `reference::gptq`.
//!
//! Phases, each one submission: (1) diag H to the host (the only read-back before the result: n
//! floats, for dead columns, damping and the act-order permutation); (2) the damped, permuted,
//! index-reversed H is scattered into an n x n work matrix (n = cols rounded up to 64, padding is
//! identity), factored, its factor inverted and reversed: U, the upper Cholesky factor of H⁻¹ in
//! processing order (a failed factorization is retried with ten times the damping); (3) per row
//! chunk of W: columns gathered into processing order (from W on the GPU, whatever its own
//! chunking), then per block of B positions the fused column-loop kernel (all rows in parallel;
//! see [`ColumnLoop`]) and the lazy updates W[:, rest] -= Err·U[block, rest] through the matmul
//! kernel, in two levels (see [`LAZY_SPAN`]): each block updates the rest of its span, each
//! span's end every column after it. Rows are independent, so W is processed one binding-sized
//! row chunk at a time; U must fit one binding. (4) per row chunk: the integers back in original
//! column order, dequantized on the GPU with g_idx when the caller wants Ŵ there
//! ([`gptq_gpu`]), and read back into the host [`QuantizedTensor`], with GPTQ's loss (each row's
//! Σ err², summed by the column-loop kernels: [`GpuGptq::loss`]).
//!
//! W comes in as a [`GpuTensor`] ([`gptq_gpu`]: the pipeline uploads each layer once and keeps
//! it for the layer's errors) or as a host slice ([`gptq`], [`gptq_with`]: uploaded 8 MiB at a
//! time straight into the padded working copy, so the layer is never on the GPU twice). Steps
//! (1) and (2) depend on H alone: [`gptq_factor`] makes them once for every layer reading the
//! same input (q/k/v, gate/up) and [`gptq_gpu_factored`] runs steps (3) and (4) of each layer
//! from that [`GptqFactor`], with the same result bit for bit.
//!
//! This module must not quantize on the host or loop over columns on the host.

use super::buffer::{GpuDtype, GpuTensor};
use super::context::{Dispatch, GpuContext};
use super::linalg::{self, NB};
use super::matmul::{Batch, Region, RegionGemm, SplitScratch};
use super::quant::GpuGrid;
use super::reduce::{ReduceOp, reduce_rows};
use crate::error::{Error, Result};
use crate::quant::QuantizedTensor;
use crate::quant::gptq::{
    GptqOptions, GptqResult, MAX_DAMP_RETRIES, block_size, group_index, processing_order,
};
use crate::quant::grid::mse_shrink_factors;
use crate::shaders;
use std::time::Instant;

const KERNEL: &str = "gptq";
const DEAD: u32 = 0x8000_0000;

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    n: u32,
    cols: u32,
    b0: u32,
    bw: u32,
    group: u32,
    ng: u32,
    maxq: u32,
    sym: u32,
    mse: u32,
    stat: u32,
    gk: u32,
    damp: f32,
    err_ld: u32,
    err_col: u32,
    w_off: u32,
}

/// Wall time of each phase, all attempts counted: GPU time included where the run was timed
/// (`gptq`, the benchmark's entry, waits for the GPU between phases), host time only otherwise
/// (`gptq_gpu`, the pipeline's).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct GptqPhases {
    /// diag H read-back and the damped, permuted, reversed copy of H.
    pub prepare_s: f64,
    /// Blocked Cholesky factorization.
    pub cholesky_s: f64,
    /// Triangular inverse and reversal (U).
    pub inverse_s: f64,
    /// Host -> GPU copy of W (the host-slice entry points only) and W's gather into processing
    /// order.
    pub upload_s: f64,
    /// Fused in-block loops and lazy updates.
    pub loop_s: f64,
    /// Reading back the integers and grids and assembling the host tensor, with Ŵ's
    /// dequantization on the GPU where it is asked for.
    pub download_s: f64,
}

impl GptqPhases {
    pub fn total(&self) -> f64 {
        self.prepare_s
            + self.cholesky_s
            + self.inverse_s
            + self.upload_s
            + self.loop_s
            + self.download_s
    }
}

/// Benchmark hooks: leave out the fused block kernels or the lazy updates so `wgpress bench gptq`
/// can time each alone (the result is then not GPTQ). `Hooks::default()` is production.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Hooks {
    pub skip_block: bool,
    pub skip_lazy: bool,
    /// Force one column-loop kernel instead of [`column_loop`]'s choice.
    pub column_loop: Option<ColumnLoop>,
    /// Span of the far lazy updates in positions (rounded to whole blocks and groups);
    /// `None` picks [`LAZY_SPAN`]. Tests lower it to cover the two-level path on small layers.
    pub lazy_span: Option<usize>,
    /// The lazy-update kernel; `None` is [`lazy_path`]'s choice for each row chunk.
    pub lazy_path: Option<LazyPath>,
    /// Rows per uploaded piece of host weights (the host-slice entries); `None`:
    /// [`HOST_PIECE_BYTES`]' worth. Tests lower it to cover several pieces on small layers.
    pub host_piece_rows: Option<usize>,
}

/// The kernel of the lazy updates W[:, rest] -= Err·U[block, rest].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LazyPath {
    /// The f32 register-tiled kernel for every lazy update; any adapter.
    Tiled,
    /// The far updates (K = one span) as split products on the tensor cores, f32-accurate: Err
    /// and U split into per-row and per-column scaled f16 halves (`shaders/split.wgsl`, into a
    /// per-chunk [`SplitScratch`]), then one f16 product over three times the depth
    /// (hi·hi + hi·lo + lo·hi, `matmul_coop.wgsl` SPLIT); the near updates (K = one block) on
    /// the tiled kernel. Needs cooperative matrices; [`lazy_path`] picks it where the scratch
    /// fits the memory target.
    Split,
}

impl LazyPath {
    pub const ALL: [LazyPath; 2] = [LazyPath::Tiled, LazyPath::Split];

    pub fn name(self) -> &'static str {
        match self {
            LazyPath::Tiled => "tiled",
            LazyPath::Split => "split",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| Error::invalid(format!("unknown lazy path `{s}` (known: tiled, split)")))
    }
}

/// Positions whose errors are gathered before they update the columns beyond them. Each block
/// updates only the rest of its span (K = block width); at a span's end one product with
/// K = span updates every later column. The FLOPs are those of one-level lazy updates, but most
/// of them run with K = 1024, where the matmul kernel is several times faster than at K = 128.
pub const LAZY_SPAN: usize = 1024;

/// The far-update span for block `bsz` and group `g` (positions, when groups are fitted as
/// they are reached): whole blocks and whole groups, so a group never straddles a span's end
/// (its fit must see every earlier update).
pub fn lazy_span(want: usize, bsz: usize, g: Option<usize>) -> usize {
    let unit = match g {
        Some(g) if g > bsz => g,
        _ => bsz,
    };
    unit * want.div_ceil(unit).max(1)
}

fn one(t: &GpuTensor) -> &wgpu::Buffer {
    &t.chunks[0].buffer
}

fn grid(ctx: &GpuContext, n: usize) -> (u32, u32, u32) {
    let max = ctx.max_workgroups_per_dim() as usize;
    let n = n.max(1);
    (n.min(max) as u32, n.div_ceil(max) as u32, 1)
}

fn u32_buf(ctx: &GpuContext, v: &[u32]) -> Result<GpuTensor> {
    GpuTensor::from_bytes(ctx, 1, v.len().max(1), GpuDtype::U32, &{
        let mut b: Vec<u8> = bytemuck::cast_slice(v).to_vec();
        if v.is_empty() {
            b.extend_from_slice(&[0; 4]);
        }
        b
    })
}

/// Quantizes the `rows x cols` weights `w` (row-major, host) with GPTQ given the Hessian `h`
/// (`cols x cols` f32 on the GPU, e.g. from `HessianAccumulator::finish`). W is uploaded a
/// piece at a time as it is gathered, then as [`gptq_gpu`] (without keeping Ŵ on the GPU).
pub fn gptq(
    ctx: &GpuContext,
    w: &[f32],
    rows: usize,
    cols: usize,
    h: &GpuTensor,
    opts: &GptqOptions,
) -> Result<(GptqResult, GptqPhases)> {
    gptq_with(ctx, w, rows, cols, h, opts, Hooks::default())
}

/// [`gptq`] with benchmark and test [`Hooks`].
#[doc(hidden)]
pub fn gptq_with(
    ctx: &GpuContext,
    w: &[f32],
    rows: usize,
    cols: usize,
    h: &GpuTensor,
    opts: &GptqOptions,
    hooks: Hooks,
) -> Result<(GptqResult, GptqPhases)> {
    opts.validate(cols)?;
    if w.len() != rows * cols || rows == 0 || cols == 0 {
        return Err(Error::Shape {
            op: "gptq".into(),
            expected: format!("{} weights for {rows}x{cols} (both positive)", rows * cols),
            got: format!("{}", w.len()),
        });
    }
    check_hessian(h, cols)?;
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(non_finite_weight(i, cols, w[i]));
    }
    let a = gptq_impl(
        ctx,
        Weights::Host { w, rows, cols },
        h,
        opts,
        hooks,
        false,
        true,
        true,
    )?;
    Ok((a.result, a.phases))
}

/// Where a layer's weights come from: a tensor on the GPU, or host rows that are uploaded a
/// piece of at most [`HOST_PIECE_BYTES`] at a time as they are gathered into the padded working
/// copy, so the layer is never on the GPU twice (W and its padded copy).
#[derive(Clone, Copy)]
enum Weights<'a> {
    Gpu(&'a GpuTensor),
    Host {
        w: &'a [f32],
        rows: usize,
        cols: usize,
    },
}

/// Largest piece of host weights on the GPU at once ([`Weights::Host`]).
const HOST_PIECE_BYTES: usize = 8 << 20;

impl Weights<'_> {
    fn dims(&self) -> (usize, usize) {
        match self {
            Weights::Gpu(t) => (t.rows, t.cols),
            Weights::Host { rows, cols, .. } => (*rows, *cols),
        }
    }

    fn shape_str(&self) -> String {
        match self {
            Weights::Gpu(t) => t.shape_str(),
            Weights::Host { rows, cols, .. } => format!("{rows}x{cols} f32 (host)"),
        }
    }
}

/// What [`gptq_gpu`] produced: the host result and Ŵ still on the GPU.
pub struct GpuGptq {
    pub result: GptqResult,
    /// GPTQ's loss Σ err² (err = (w - q) / U_ii, summed in f64 over per-row f32 sums): in exact
    /// arithmetic tr(Δ H' Δᵀ) for H' = the damped Hessian, so the layer's output error on the
    /// calibration inputs is `loss - damp_add·||Δ||²` where no column is dead.
    pub loss: f64,
    /// The damping added to H's diagonal (the fraction used times mean diag H).
    pub damp_add: f32,
    /// The dequantized weights (`rows x cols` f32, original column order), equal bit for bit to
    /// `result.q.dequantize()`.
    pub dequantized: GpuTensor,
    pub phases: GptqPhases,
}

/// GPTQ of weights already on the GPU (`rows x cols` f32, chunked in any way), with the Hessian
/// `h` as in [`gptq`]. W is only read (its values are gathered into a padded work copy), so the
/// caller can keep using it; Ŵ is made on the GPU from the integers and grids with g_idx.
pub fn gptq_gpu(
    ctx: &GpuContext,
    w: &GpuTensor,
    h: &GpuTensor,
    opts: &GptqOptions,
) -> Result<GpuGptq> {
    gptq_gpu_with(ctx, w, h, opts, Hooks::default())
}

/// [`gptq_gpu`] with test [`Hooks`].
#[doc(hidden)]
pub fn gptq_gpu_with(
    ctx: &GpuContext,
    w: &GpuTensor,
    h: &GpuTensor,
    opts: &GptqOptions,
    hooks: Hooks,
) -> Result<GpuGptq> {
    gptq_impl(ctx, Weights::Gpu(w), h, opts, hooks, true, false, false)?.on_gpu(w)
}

fn check_hessian(h: &GpuTensor, cols: usize) -> Result<()> {
    if h.rows != cols || h.cols != cols || h.dtype != GpuDtype::F32 {
        return Err(Error::Shape {
            op: "gptq".into(),
            expected: format!("an f32 Hessian of {cols}x{cols}"),
            got: h.shape_str(),
        });
    }
    Ok(())
}

fn non_finite_weight(i: usize, cols: usize, v: f32) -> Error {
    Error::invalid(format!(
        "gptq: weight at row {}, column {} is {v}",
        i / cols,
        i % cols
    ))
}

/// Refuses non-finite weights on the GPU: a per-row sum of squares comes back (`rows` floats);
/// only when one is not finite is W read back to name the first bad weight (a finite row whose
/// squares overflow is read back too, and then accepted).
fn check_finite(ctx: &GpuContext, w: &GpuTensor) -> Result<()> {
    let ss = reduce_rows(ctx, w, ReduceOp::SumSq)?.to_f32(ctx)?;
    if ss.iter().all(|v| v.is_finite()) {
        return Ok(());
    }
    let host = w.to_f32(ctx)?;
    match host.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(non_finite_weight(i, w.cols, host[i])),
        None => Ok(()),
    }
}

/// What GPTQ derives from the Hessian alone, shared by every layer that reads the same input
/// (q/k/v share one Hessian, gate/up another): dead columns, the processing order, the damping
/// finally used and U, the upper Cholesky factor of the damped, permuted H⁻¹ (n x n on the GPU,
/// n = cols rounded up to the Cholesky block). Made by [`gptq_factor`], used by
/// [`gptq_gpu_factored`]; U is released by the last layer that uses it.
pub struct GptqFactor {
    cols: usize,
    n: usize,
    u: Option<GpuTensor>,
    perm: Vec<u32>,
    dead: Vec<bool>,
    pos_t: GpuTensor,
    damp: f32,
    damp_add: f32,
    /// Time of steps (1) and (2): the prepare, Cholesky and inverse phases.
    pub phases: GptqPhases,
}

impl GptqFactor {
    /// Input columns (the Hessian's width).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The damping fraction finally used.
    pub fn damp_used(&self) -> f32 {
        self.damp
    }
}

/// How a layer uses a [`GptqFactor`]: `Keep` leaves U for later layers; `Last` frees it as soon
/// as the column loop is done, before Ŵ and the read-back buffers are allocated.
pub enum FactorUse<'a> {
    Keep(&'a GptqFactor),
    Last(Box<GptqFactor>),
}

/// Steps (1) and (2) of GPTQ for the Hessian `h` (`cols x cols` f32 on the GPU): the part every
/// layer reading the same input shares. One read-back (diag H, `cols` floats) and one per
/// Cholesky attempt (its success flag).
pub fn gptq_factor(ctx: &GpuContext, h: &GpuTensor, opts: &GptqOptions) -> Result<GptqFactor> {
    opts.validate(h.cols)?;
    check_hessian(h, h.cols)?;
    factor_impl(ctx, h, opts, false)
}

/// GPTQ of weights already on the GPU, as [`gptq_gpu`], with steps (1) and (2) taken from a
/// factor of the layer's Hessian. `finite_checked`: the caller has already refused non-finite
/// weights (the pipeline's decode does), so the GPU check and its read-back are skipped.
pub fn gptq_gpu_factored(
    ctx: &GpuContext,
    w: &GpuTensor,
    factor: FactorUse<'_>,
    opts: &GptqOptions,
    finite_checked: bool,
) -> Result<GpuGptq> {
    apply_impl(
        ctx,
        Weights::Gpu(w),
        factor,
        opts,
        Hooks::default(),
        true,
        finite_checked,
        false,
    )?
    .on_gpu(w)
}

/// What steps (3) and (4) produced for one layer.
struct Applied {
    result: GptqResult,
    deq: Option<GpuTensor>,
    phases: GptqPhases,
    loss: f64,
    damp_add: f32,
}

impl Applied {
    fn on_gpu(self, w: &GpuTensor) -> Result<GpuGptq> {
        let dequantized = self.deq.ok_or_else(|| {
            Error::gpu(
                KERNEL,
                w.shape_str(),
                "the dequantized weights were not made",
            )
        })?;
        Ok(GpuGptq {
            result: self.result,
            loss: self.loss,
            damp_add: self.damp_add,
            dequantized,
            phases: self.phases,
        })
    }
}

/// The GPTQ core: the factor of H, then the layer. `dequantize` keeps Ŵ on the GPU;
/// `finite_checked` skips the GPU finiteness check when the caller already checked the host copy.
/// `timed`: wait for the GPU at each phase boundary so [`GptqPhases`] charges each phase its own
/// GPU time (the benchmark); otherwise the phases count host time and the GPU runs on across
/// them (the pipeline: each wait left the GPU idle while the host encoded the next phase).
#[allow(clippy::too_many_arguments)]
fn gptq_impl(
    ctx: &GpuContext,
    w: Weights<'_>,
    h: &GpuTensor,
    opts: &GptqOptions,
    hooks: Hooks,
    dequantize: bool,
    finite_checked: bool,
    timed: bool,
) -> Result<Applied> {
    let cols = w.dims().1;
    opts.validate(cols)?;
    check_weights(w)?;
    check_hessian(h, cols)?;
    if let (false, Weights::Gpu(t)) = (finite_checked, w) {
        check_finite(ctx, t)?;
    }
    let factor = factor_impl(ctx, h, opts, timed)?;
    let fp = factor.phases;
    let mut a = apply_impl(
        ctx,
        w,
        FactorUse::Last(Box::new(factor)),
        opts,
        hooks,
        dequantize,
        true,
        timed,
    )?;
    a.phases.prepare_s += fp.prepare_s;
    a.phases.cholesky_s += fp.cholesky_s;
    a.phases.inverse_s += fp.inverse_s;
    Ok(a)
}

fn check_weights(w: Weights<'_>) -> Result<()> {
    let whole_f32 = match w {
        Weights::Gpu(t) => t.dtype == GpuDtype::F32,
        Weights::Host { w, rows, cols } => w.len() == rows * cols,
    };
    let (rows, cols) = w.dims();
    if !whole_f32 || rows == 0 || cols == 0 {
        return Err(Error::Shape {
            op: "gptq".into(),
            expected: "f32 weights with at least one row and one column".into(),
            got: w.shape_str(),
        });
    }
    Ok(())
}

/// Steps (1) and (2): diag H, dead columns, the order, and U (retrying with more damping).
fn factor_impl(
    ctx: &GpuContext,
    h: &GpuTensor,
    opts: &GptqOptions,
    timed: bool,
) -> Result<GptqFactor> {
    let cols = h.cols;
    let shape = format!("H {cols}x{cols}");
    let mut phases = GptqPhases::default();
    let t0 = Instant::now();
    // (1) diag H on the host.
    let diag_t = GpuTensor::empty(ctx, 1, cols, GpuDtype::F32)?;
    {
        let pipe = ctx.pipeline(KERNEL, &source(), "hess_diag", false)?;
        let params: Vec<Params> = h
            .chunks
            .iter()
            .map(|c| Params {
                rows: c.rows as u32,
                cols: cols as u32,
                gk: c.row_start as u32,
                ..Default::default()
            })
            .collect();
        let ds: Vec<Dispatch> = h
            .chunks
            .iter()
            .zip(&params)
            .filter(|(c, _)| c.rows > 0)
            .map(|(c, p)| Dispatch {
                buffers: vec![&diag_t.chunks[0].buffer, &c.buffer],
                uniform: Some(bytemuck::bytes_of(p)),
                groups: grid(ctx, c.rows.div_ceil(256)),
            })
            .collect();
        ctx.run("gptq hess_diag", &shape, &pipe, &ds)?;
    }
    let diag = diag_t.to_f32(ctx)?;
    drop(diag_t);
    if let Some(c) = diag.iter().position(|d| !d.is_finite()) {
        return Err(Error::invalid(format!(
            "gptq: the Hessian is not finite (H[{c}][{c}] = {}); the layer's calibration inputs contain NaN or infinity",
            diag[c]
        )));
    }
    if let Some(c) = diag.iter().position(|&d| d < 0.0) {
        return Err(Error::invalid(format!(
            "gptq: H[{c}][{c}] = {} is negative; a Hessian XᵀX has a non-negative diagonal",
            diag[c]
        )));
    }
    let dead: Vec<bool> = diag.iter().map(|&d| d == 0.0).collect();
    let fixed: Vec<f64> = diag
        .iter()
        .map(|&d| if d == 0.0 { 1.0 } else { d as f64 })
        .collect();
    let mean = fixed.iter().sum::<f64>() / cols as f64;
    let perm = processing_order(&fixed, opts.act_order);
    let mut pos = vec![0u32; cols];
    for (i, &c) in perm.iter().enumerate() {
        pos[c as usize] = i as u32;
    }
    let n = cols.div_ceil(NB) * NB;
    let pos_t = u32_buf(ctx, &pos)?;

    // (2) U, retrying with more damping.
    let work = GpuTensor::empty(ctx, n, n, GpuDtype::F32)?;
    if work.chunks.len() != 1 {
        return Err(Error::gpu(
            KERNEL,
            &shape,
            format!(
                "GPTQ needs the {n} x {n} inverse Hessian factor ({} KiB) in one storage binding; this adapter allows {} KiB",
                (n * n * 4) >> 10,
                ctx.binding_limit() >> 10
            ),
        ));
    }
    let mut damp = opts.damp;
    let mut damp_add;
    let mut attempt = 0;
    let mut mark = Instant::now();
    let mut lap = |ctx: &GpuContext, slot: &mut f64| -> Result<()> {
        if timed {
            ctx.sync(KERNEL, &shape)?;
        }
        *slot += mark.elapsed().as_secs_f64();
        mark = Instant::now();
        Ok(())
    };
    phases.prepare_s = t0.elapsed().as_secs_f64();
    loop {
        damp_add = (damp as f64 * mean) as f32;
        prepare_hessian(ctx, h, &work, &pos_t, n, damp_add, &shape)?;
        lap(ctx, &mut phases.prepare_s)?;
        let chol = linalg::cholesky(ctx, &work)?;
        lap(ctx, &mut phases.cholesky_s)?;
        if chol.ok {
            linalg::invert_factor(ctx, &work, chol)?;
            break;
        }
        attempt += 1;
        if attempt > MAX_DAMP_RETRIES {
            return Err(Error::invalid(format!(
                "gptq: the Hessian is not positive definite even with damping {damp} (x mean diag); the layer's inputs may be degenerate"
            )));
        }
        log::warn!(
            "gptq {shape}: Cholesky failed with damp {damp}; retrying with {}",
            damp * 10.0
        );
        damp *= 10.0;
    }
    linalg::flip(ctx, &work)?;
    lap(ctx, &mut phases.inverse_s)?;
    Ok(GptqFactor {
        cols,
        n,
        u: Some(work),
        perm,
        dead,
        pos_t,
        damp,
        damp_add,
        phases,
    })
}

/// Steps (3) and (4) for one layer's weights, given the factor of its Hessian.
#[allow(clippy::too_many_arguments)]
fn apply_impl(
    ctx: &GpuContext,
    w: Weights<'_>,
    factor: FactorUse<'_>,
    opts: &GptqOptions,
    hooks: Hooks,
    dequantize: bool,
    finite_checked: bool,
    timed: bool,
) -> Result<Applied> {
    let (rows, cols) = w.dims();
    opts.validate(cols)?;
    check_weights(w)?;
    // The last user owns U and frees it after the column loop.
    let held: Box<GptqFactor>;
    let (f, owned_u): (&GptqFactor, Option<GpuTensor>) = match factor {
        FactorUse::Keep(f) => (f, None),
        FactorUse::Last(mut last) => {
            let u = last.u.take();
            held = last;
            (&held, u)
        }
    };
    if f.cols != cols {
        return Err(Error::Shape {
            op: "gptq".into(),
            expected: format!("weights with {} columns (the factor's Hessian)", f.cols),
            got: w.shape_str(),
        });
    }
    if let (false, Weights::Gpu(t)) = (finite_checked, w) {
        check_finite(ctx, t)?;
    }
    let spec = opts.spec;
    let shape = format!("{rows}x{cols}");
    let mut phases = GptqPhases::default();
    let (n, damp, dead) = (f.n, f.damp, &f.dead);
    let (perm, pos_t) = (&f.perm, &f.pos_t);
    let u = owned_u.as_ref().or(f.u.as_ref()).ok_or_else(|| {
        Error::gpu(
            KERNEL,
            &shape,
            "the factor's U was released by an earlier layer",
        )
    })?;

    // (3) the column loop, one row chunk at a time.
    let t1 = Instant::now();
    let mut upload_s = 0.0;
    let g = spec.group_size(cols);
    let ng = spec.n_groups(cols);
    let bsz = block_size(spec.group.map(|_| g), opts.block);
    let span = layer_span(cols, opts, hooks.lazy_span);
    // Err holds the errors of one span (never wider than the layer).
    let err_w = span.min(n);
    let perm_flags: Vec<u32> = perm
        .iter()
        .map(|&c| c | if dead[c as usize] { DEAD } else { 0 })
        .collect();
    let perm_t = u32_buf(ctx, &perm_flags)?;
    let mut gidx_pos = vec![0u32; n];
    if opts.static_groups {
        for (i, &c) in perm.iter().enumerate() {
            gidx_pos[i] = c / g as u32;
        }
    }
    let gidx_t = u32_buf(ctx, &gidx_pos)?;
    let shrink = if opts.mse {
        mse_shrink_factors()
    } else {
        vec![1.0]
    };
    let shrink_t = GpuTensor::from_f32(ctx, 1, shrink.len(), &shrink)?;
    let wp = GpuTensor::empty(ctx, rows, n, GpuDtype::F32)?;
    let base = Params {
        n: n as u32,
        cols: cols as u32,
        group: g as u32,
        ng: ng as u32,
        maxq: spec.maxq(),
        sym: spec.sym as u32,
        mse: if opts.mse { shrink.len() as u32 } else { 0 },
        stat: opts.static_groups as u32,
        err_ld: err_w as u32,
        ..Default::default()
    };
    let src = source();
    let p_gather = ctx.pipeline(KERNEL, &src, "w_gather", false)?;
    let p_fit = ctx.pipeline(KERNEL, &src, "fit_groups", false)?;
    let kind = hooks.column_loop.unwrap_or(column_loop(ctx));
    if kind == ColumnLoop::Subgroup && !subgroup_loop(ctx) {
        return Err(Error::gpu(
            KERNEL,
            &shape,
            "the subgroup column loop needs 32-wide subgroups, which this adapter lacks",
        ));
    }
    // The column loops are built trusted (no runtime bounds checks; about 10% less block-loop
    // time on an H200, BENCHMARKS.md session 12). Every index they form is in range by construction: rows and the
    // block's columns are guarded (b0 + bw <= n, err_col + bw <= err_ld, both set here), g_idx
    // positions past `cols` are 0 (`gidx_pos`), and grids are only stored for positions below
    // `cols`. `trusted_column_loops_give_the_checked_results` compares both builds.
    let p_block = match kind {
        ColumnLoop::Subgroup => ctx.pipeline("gptq_sg", &source_sg(), "block_sg", true)?,
        ColumnLoop::Rows => ctx.pipeline(KERNEL, &src, "block_rows", true)?,
    };
    let block_rows = kind.rows_per_workgroup();
    if hooks.lazy_path == Some(LazyPath::Split) {
        // Refused up front, also for layers of one span (which would have no split product).
        crate::gpu::matmul::check_split(ctx, &shape)?;
    }
    let mut outputs = Vec::with_capacity(wp.chunks.len());
    for chunk in &wp.chunks {
        let rc = chunk.rows;
        if rc == 0 {
            continue;
        }
        let r0 = chunk.row_start;
        // The chunk's rows of W are gathered into processing order: from W's own chunks on the
        // GPU, or from host rows uploaded a piece at a time.
        let tu = Instant::now();
        let gather = |src: &GpuTensor, first: usize| {
            gather_rows(
                ctx,
                &p_gather,
                &chunk.buffer,
                (r0, rc),
                src,
                first,
                &perm_t,
                base,
                &shape,
            )
        };
        match w {
            Weights::Gpu(t) => gather(t, 0)?,
            Weights::Host { w, cols, .. } => {
                let piece = hooks
                    .host_piece_rows
                    .unwrap_or(HOST_PIECE_BYTES / (4 * cols))
                    .max(1);
                // Each gather is submitted before the next piece is written (`run` submits), so
                // a pooled buffer handed to the next piece is not overwritten under it.
                for a in (r0..r0 + rc).step_by(piece) {
                    let b = (a + piece).min(r0 + rc);
                    let t = GpuTensor::from_f32(ctx, b - a, cols, &w[a * cols..b * cols])?;
                    gather(&t, a)?;
                }
            }
        }
        if timed {
            ctx.sync(KERNEL, &shape)?;
        }
        upload_s += tu.elapsed().as_secs_f64();
        let q = GpuTensor::empty(ctx, rc, n / 4, GpuDtype::U32)?;
        q.fill_u32(ctx, 0);
        let scales = GpuTensor::empty(ctx, rc, ng, GpuDtype::F32)?;
        let zeros = GpuTensor::empty(ctx, rc, ng, GpuDtype::U32)?;
        let err = GpuTensor::empty(ctx, rc, err_w, GpuDtype::F32)?;
        // Each row's running Σ err² (GPTQ's loss), added to by every block kernel.
        let loss = GpuTensor::empty(ctx, 1, rc, GpuDtype::F32)?;
        loss.fill_u32(ctx, 0);
        // Split products serve the far updates only; the widest is every column after the
        // first span (none when the layer is one span).
        let path = hooks
            .lazy_path
            .unwrap_or_else(|| lazy_path(ctx, rc, n, span));
        let scratch = if path == LazyPath::Split && n > span {
            Some(SplitScratch::new(ctx, rc, n - span, span)?)
        } else {
            None
        };
        for t in [&q, &scales, &zeros, &err, &loss] {
            if t.chunks.len() != 1 {
                return Err(Error::gpu(KERNEL, &shape, "a per-chunk buffer split"));
            }
        }
        let rows_p = Params {
            rows: rc as u32,
            ..base
        };
        // Uniforms first (they must outlive the dispatch list), then the dispatches.
        let mut uniforms: Vec<(u8, Params, (u32, u32, u32))> = Vec::new();
        if opts.static_groups {
            uniforms.push((1, rows_p, grid(ctx, rc * ng)));
        }
        let mut lazy = Vec::new();
        for b0 in (0..n).step_by(bsz) {
            let bw = bsz.min(n - b0);
            // Groups wider than the block are fitted here, when their first block is reached;
            // groups that fit the block (g128 with 128-wide blocks, the common case) are fitted
            // by the block kernel itself as it reaches them (one dispatch fewer per block).
            if !opts.static_groups && g > bw && b0.is_multiple_of(g) && b0 < cols {
                uniforms.push((
                    1,
                    Params {
                        b0: b0 as u32,
                        gk: (b0 / g) as u32,
                        ..rows_p
                    },
                    grid(ctx, rc),
                ));
            }
            let s0 = b0 - b0 % span;
            let s1 = (s0 + span).min(n);
            uniforms.push((
                if hooks.skip_block { 3 } else { 2 },
                Params {
                    b0: b0 as u32,
                    bw: bw as u32,
                    err_col: (b0 - s0) as u32,
                    ..rows_p
                },
                grid(ctx, rc.div_ceil(block_rows)),
            ));
            if hooks.skip_lazy {
                continue;
            }
            // Near update: the rest of this span, from this block's errors (K = bw).
            // Far update at the span's end: every later column, from the whole span (K = s1 - s0).
            // Near updates always run on the tiled kernel: as split products (K = one block)
            // they were slower (BENCHMARKS.md, session 18).
            let near = (b0 + bw < s1).then_some((b0 - s0, b0, bw, b0 + bw, s1, None));
            let far =
                (b0 + bw == s1 && s1 < n).then_some((0, s0, s1 - s0, s1, n, scratch.as_ref()));
            for (e0, u_row, k, c0, c1, split) in near.into_iter().chain(far) {
                let step = RegionGemm {
                    a: Region {
                        buf: one(&err),
                        len: rc * err_w,
                        off: e0,
                        ld: err_w,
                    },
                    b: Region {
                        buf: one(u),
                        len: n * n,
                        off: u_row * n + c0,
                        ld: n,
                    },
                    c: Region {
                        buf: &chunk.buffer,
                        len: rc * n,
                        off: c0,
                        ld: n,
                    },
                    m: rc,
                    n: c1 - c0,
                    k,
                    b_trans: false,
                    alpha: -1.0,
                    accumulate: true,
                    lower: false,
                    a_lower_tri: false,
                    b_lower_tri: false,
                    batch: Batch::ONE,
                    split,
                }
                .prepare_steps(ctx, false)?;
                lazy.extend(step.into_iter().map(|s| (uniforms.len() - 1, s)));
            }
        }
        let mut dispatches: Vec<(&wgpu::ComputePipeline, Dispatch)> = Vec::new();
        let mut lazy_iter = lazy.iter().peekable();
        for (i, (kind, p, groups)) in uniforms.iter().enumerate() {
            if *kind == 3 {
                // Skipped block kernel (benchmark hook): keep the lazy update that follows it.
                while let Some((after, step)) = lazy_iter.peek() {
                    if *after != i {
                        break;
                    }
                    dispatches.push((&step.pipeline, step.dispatch()));
                    lazy_iter.next();
                }
                continue;
            }
            let (pipe, buffers): (&wgpu::ComputePipeline, Vec<&wgpu::Buffer>) = match kind {
                1 => (
                    &p_fit,
                    vec![
                        &chunk.buffer,
                        one(pos_t),
                        one(&shrink_t),
                        one(&scales),
                        one(&zeros),
                    ],
                ),
                _ => (
                    &p_block,
                    vec![
                        &chunk.buffer,
                        one(u),
                        one(&err),
                        one(&q),
                        one(&scales),
                        one(&zeros),
                        one(&gidx_t),
                        one(&shrink_t),
                        one(&loss),
                    ],
                ),
            };
            dispatches.push((
                pipe,
                Dispatch {
                    buffers,
                    uniform: Some(bytemuck::bytes_of(p)),
                    groups: *groups,
                },
            ));
            while let Some((after, step)) = lazy_iter.peek() {
                if *after != i {
                    break;
                }
                dispatches.push((&step.pipeline, step.dispatch()));
                lazy_iter.next();
            }
        }
        let steps: Vec<(&wgpu::ComputePipeline, &Dispatch)> =
            dispatches.iter().map(|(p, d)| (*p, d)).collect();
        ctx.run_steps("gptq", &shape, &steps)?;
        outputs.push((r0, rc, q, scales, zeros, loss));
    }
    if timed {
        ctx.sync(KERNEL, &shape)?;
    }
    phases.upload_s = upload_s;
    phases.loop_s = t1.elapsed().as_secs_f64() - upload_s;
    // The padded working copy and U are done with; Ŵ takes their place.
    drop(wp);
    drop(owned_u);

    // Results to the host, back in the original column order.
    let t2 = Instant::now();
    let mut qt = QuantizedTensor {
        rows,
        cols,
        spec,
        q: vec![0; rows * cols],
        scales: vec![0.0; rows * ng],
        zeros: vec![0; rows * ng],
        g_idx: group_index(perm, &spec, opts.static_groups),
    };
    let deq = if dequantize {
        Some(GpuTensor::empty(ctx, rows, cols, GpuDtype::F32)?)
    } else {
        None
    };
    let p_unperm = ctx.pipeline(KERNEL, &source(), "unpermute", false)?;
    let words = cols.div_ceil(4);
    let mut loss = 0.0;
    for (r0, rc, q, scales, zeros, loss_t) in outputs {
        // Back to the original column order on the GPU, so the host only copies bytes.
        let orig = GpuTensor::empty(ctx, rc, words, GpuDtype::U32)?;
        let p = Params {
            rows: rc as u32,
            ..base
        };
        ctx.run(
            "gptq unpermute",
            &shape,
            &p_unperm,
            &[Dispatch {
                buffers: vec![one(&q), one(pos_t), one(&orig)],
                uniform: Some(bytemuck::bytes_of(&p)),
                groups: grid(ctx, (rc * words).div_ceil(256)),
            }],
        )?;
        drop(q);
        let grid_t = GpuGrid { scales, zeros };
        if let Some(d) = &deq {
            // In original order the integers and grids are a plain quantized tensor: Ŵ's rows
            // r0.. come from the same kernel any stored tensor would use, with g_idx mapping
            // each column to its (act-order or static) group.
            super::quant::dequantize_packed_into(
                ctx,
                &orig,
                &grid_t,
                &qt.g_idx,
                &spec,
                d,
                r0,
                Default::default(),
            )?;
        }
        let dst = &mut qt.q[r0 * cols..(r0 + rc) * cols];
        if cols.is_multiple_of(4) {
            // Packed rows are exactly the host rows: read them in place.
            orig.read_into(ctx, dst)?;
        } else {
            super::quant::unpack_q_into(&orig.to_bytes(ctx)?, rc, cols, dst)?;
        }
        qt.scales[r0 * ng..(r0 + rc) * ng].copy_from_slice(&grid_t.scales.to_f32(ctx)?);
        qt.zeros[r0 * ng..(r0 + rc) * ng].copy_from_slice(&grid_t.zeros.to_u32(ctx)?);
        loss += loss_t.to_f32(ctx)?.iter().map(|&v| v as f64).sum::<f64>();
    }
    phases.download_s = t2.elapsed().as_secs_f64();
    let result = GptqResult {
        q: qt,
        damp_used: damp,
        dead_columns: dead.iter().filter(|&&d| d).count(),
        perm: perm.clone(),
    };
    Ok(Applied {
        result,
        deq,
        phases,
        loss,
        damp_add: f.damp_add,
    })
}

/// Gathers W's rows that `src` holds (its row 0 is W's row `first`; chunked in any way) and that
/// belong to the padded copy's chunk `dst` (rows `r0..r0 + rc`) into processing order: one
/// dispatch per run of rows that lies in one chunk of `src` (W's rows are shorter than the padded
/// copy's, so its chunks may cut the padded chunk's rows anywhere).
#[allow(clippy::too_many_arguments)]
fn gather_rows(
    ctx: &GpuContext,
    pipe: &wgpu::ComputePipeline,
    dst: &wgpu::Buffer,
    (r0, rc): (usize, usize),
    src: &GpuTensor,
    first: usize,
    perm: &GpuTensor,
    base: Params,
    shape: &str,
) -> Result<()> {
    let (n, cols) = (base.n as usize, base.cols as usize);
    let mut gathers = Vec::new();
    for c in &src.chunks {
        let start = first + c.row_start;
        let (a, b) = (start.max(r0), (start + c.rows).min(r0 + rc));
        if a >= b {
            continue;
        }
        let p = Params {
            rows: (b - a) as u32,
            gk: ((a - r0) * n) as u32,
            w_off: ((a - start) * cols) as u32,
            ..base
        };
        gathers.push((&c.buffer, p, b - a));
    }
    let covered: usize = gathers.iter().map(|g| g.2).sum();
    let want = (first + src.rows)
        .min(r0 + rc)
        .saturating_sub(first.max(r0));
    if covered != want {
        return Err(Error::gpu(
            KERNEL,
            shape,
            "W's chunks do not cover its rows",
        ));
    }
    let ds: Vec<Dispatch> = gathers
        .iter()
        .map(|(buf, p, pr)| Dispatch {
            buffers: vec![dst, buf, one(perm)],
            uniform: Some(bytemuck::bytes_of(p)),
            groups: grid(ctx, (pr * n).div_ceil(256)),
        })
        .collect();
    ctx.run("gptq w_gather", shape, pipe, &ds)
}

/// work = J·(P·H·Pᵀ + damping, dead columns fixed, padded with identity)·J.
fn prepare_hessian(
    ctx: &GpuContext,
    h: &GpuTensor,
    work: &GpuTensor,
    pos: &GpuTensor,
    n: usize,
    damp_add: f32,
    shape: &str,
) -> Result<()> {
    let src = source();
    let init = ctx.pipeline(KERNEL, &src, "hess_init", false)?;
    let scatter = ctx.pipeline(KERNEL, &src, "hess_scatter", false)?;
    let cols = h.cols;
    let p0 = Params {
        n: n as u32,
        ..Default::default()
    };
    let params: Vec<Params> = h
        .chunks
        .iter()
        .map(|c| Params {
            rows: c.rows as u32,
            n: n as u32,
            cols: cols as u32,
            gk: c.row_start as u32,
            damp: damp_add,
            ..Default::default()
        })
        .collect();
    let wb = &work.chunks[0].buffer;
    let mut ds = vec![(
        &*init,
        Dispatch {
            buffers: vec![wb],
            uniform: Some(bytemuck::bytes_of(&p0)),
            groups: grid(ctx, (n * n).div_ceil(256)),
        },
    )];
    for (c, p) in h.chunks.iter().zip(&params) {
        if c.rows == 0 {
            continue;
        }
        ds.push((
            &*scatter,
            Dispatch {
                buffers: vec![wb, &c.buffer, &pos.chunks[0].buffer],
                uniform: Some(bytemuck::bytes_of(p)),
                groups: grid(ctx, (c.rows * cols).div_ceil(256)),
            },
        ));
    }
    let steps: Vec<(&wgpu::ComputePipeline, &Dispatch)> = ds.iter().map(|(p, d)| (*p, d)).collect();
    ctx.run_steps("gptq prepare", shape, &steps)
}

fn source() -> String {
    format!("{}{}", shaders::QUANT_GRID, shaders::GPTQ)
}

/// The module with the subgroup variant of the column loop.
fn source_sg() -> String {
    format!(
        "{}{}{}",
        shaders::QUANT_GRID,
        shaders::GPTQ,
        shaders::GPTQ_SG
    )
}

/// The fused in-block column loop kernels; all give the same integers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnLoop {
    /// `block_rows`: one invocation per row, the block in workgroup memory; any adapter.
    Rows,
    /// `block_sg`: four rows per 32-wide subgroup, eight lanes per row, shuffles instead of
    /// barriers (2-2.8x faster than `Rows` on an H200, BENCHMARKS.md session 16).
    Subgroup,
}

impl ColumnLoop {
    pub const ALL: [ColumnLoop; 2] = [ColumnLoop::Rows, ColumnLoop::Subgroup];

    fn rows_per_workgroup(self) -> usize {
        match self {
            ColumnLoop::Subgroup => 4,
            ColumnLoop::Rows => 32,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ColumnLoop::Subgroup => "subgroup",
            ColumnLoop::Rows => "rows",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                Error::invalid(format!("unknown column loop `{s}` (known: rows, subgroup)"))
            })
    }
}

/// The column-loop kernel for this adapter: the subgroup loop where it can run (faster on every
/// shape measured on an H200), else the per-row loop.
pub fn column_loop(ctx: &GpuContext) -> ColumnLoop {
    if subgroup_loop(ctx) {
        ColumnLoop::Subgroup
    } else {
        ColumnLoop::Rows
    }
}

/// The lazy-update kernel for a row chunk of `rows` rows of a layer of `n` (padded) columns
/// with lazy spans of `span` positions: [`LazyPath::Split`] where split products run and
/// its scratch (the split far-update operands) takes at most half the chunk's f32 size, else
/// [`LazyPath::Tiled`]. The f32 path's peak is about the layer, H and the span's errors, so the
/// half keeps GPTQ within twice the layer plus H. Measured on the H200 (BENCHMARKS.md, session
/// 18, calls G-H), lazy updates alone, split far updates against tiled: 28672 x 8192 49 against
/// 83 ms, 8192² 14.7-14.8 against 19-24, 4096 x 11008 14.2-14.5 against 18.3, 11008 x 4096
/// 6.1-6.2 against 7.4, 4096² 3.0-3.1 against 3.4 (its scratch would break the memory target,
/// so it stays tiled). Each part of the scratch must also fit one storage binding.
pub fn lazy_path(ctx: &GpuContext, rows: usize, n: usize, span: usize) -> LazyPath {
    let split = crate::gpu::matmul::split_available(ctx);
    choose_lazy_path(split, ctx.binding_limit(), rows, n, span)
}

/// The lazy-update span of a layer of `cols` columns under `opts` (`want` positions, rounded to
/// whole blocks and groups; [`LAZY_SPAN`] when `None`).
pub fn layer_span(cols: usize, opts: &GptqOptions, want: Option<usize>) -> usize {
    let g = opts.spec.group.map(|_| opts.spec.group_size(cols));
    lazy_span(want.unwrap_or(LAZY_SPAN), block_size(g, opts.block), g)
}

/// [`lazy_path`] for a whole layer of `rows` x `cols` (columns padded as GPTQ pads them).
pub fn layer_lazy_path(
    ctx: &GpuContext,
    rows: usize,
    cols: usize,
    opts: &GptqOptions,
    want_span: Option<usize>,
) -> LazyPath {
    lazy_path(
        ctx,
        rows,
        cols.div_ceil(NB) * NB,
        layer_span(cols, opts, want_span),
    )
}

fn choose_lazy_path(split: bool, binding: u64, rows: usize, n: usize, span: usize) -> LazyPath {
    let (a, b) = SplitScratch::bytes(rows, n.saturating_sub(span), span);
    let fits = a.max(b) <= binding && a + b <= (rows * n * 4) as u64 / 2;
    if split && n > span && fits {
        LazyPath::Split
    } else {
        LazyPath::Tiled
    }
}

/// Whether the subgroup column loop can run here: 32-wide subgroups, exactly.
pub fn subgroup_loop(ctx: &GpuContext) -> bool {
    ctx.caps.subgroups && ctx.caps.subgroup_size == (32, 32)
}

/// Every module variant, for the naga validation test: (name, source, needs subgroups).
pub fn all_sources() -> Vec<(String, String, bool)> {
    vec![
        ("gptq.wgsl".into(), source(), false),
        ("gptq.wgsl + gptq_sg.wgsl".into(), source_sg(), true),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_far_updates_where_the_scratch_fits_half_the_layer() {
        // The benchmark shapes (n padded to 64, span 1024), 4 GiB bindings.
        let big = 4 << 30;
        let pick = |rows, n| choose_lazy_path(true, big, rows, n, 1024);
        assert_eq!(pick(28672, 8192), LazyPath::Split);
        assert_eq!(pick(8192, 8192), LazyPath::Split);
        assert_eq!(pick(4096, 11008), LazyPath::Split);
        assert_eq!(pick(11008, 4096), LazyPath::Split);
        assert_eq!(pick(4096, 4096), LazyPath::Tiled);
        // One span: no far update to split.
        assert_eq!(pick(28672, 1024), LazyPath::Tiled);
        assert_eq!(
            choose_lazy_path(false, big, 28672, 8192, 1024),
            LazyPath::Tiled
        );
        // 28672 rows' split errors (176 MB) do not fit a 128 MiB binding.
        assert_eq!(
            choose_lazy_path(true, 128 << 20, 28672, 8192, 1024),
            LazyPath::Tiled
        );
        assert_eq!(
            choose_lazy_path(true, 128 << 20, 8192, 8192, 1024),
            LazyPath::Split
        );
    }
}
