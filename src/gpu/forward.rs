//! GPU kernels of the Llama forward pass other than matrix products (shaders/forward.wgsl):
//! RMSNorm, rotary embeddings, causal grouped-query attention, SwiGLU, residual/bias adds (and
//! [`sub`], the weight difference of a compressed layer's error) and the per-token cross-entropy,
//! all f32; plus [`to_f16`], the f32 -> f16 rounding of a linear layer's input for the f16
//! forward (and of a compressed layer's weights for the passes after it); [`widen`], the exact
//! f16/bf16 -> f32 copy of a layer's stored weights for its method; and [`embed`], the
//! embedding lookup. All row-chunk aware.
//! The CPU references are in `reference::forward`; this module must not orchestrate a whole
//! block (that is the model's job).

use super::buffer::{GpuDtype, GpuTensor};
use super::context::{Dispatch, GpuContext};
use crate::error::{Error, Result};
use crate::shaders;

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Rows {
    rows: u32,
    cols: u32,
    x_off: u32,
    y_off: u32,
    eps: f32,
    seq: u32,
    heads: u32,
    head_dim: u32,
    pos0: u32,
    /// widen: 1 when x is bf16, 0 for f16.
    bf16: u32,
    pad: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Attn {
    seqs: u32,
    seq: u32,
    hq: u32,
    hk: u32,
    d: u32,
    q_off: u32,
    k_off: u32,
    v_off: u32,
    o_off: u32,
    scale: f32,
    blocks: u32,
    pad: u32,
}

const WG: usize = 256;
const GRID: usize = 65535;
/// Largest head dimension the attention kernel holds per invocation (4 x its `DMAX4`).
pub const MAX_HEAD_DIM: usize = 128;
const ATTN_ROWS: usize = 64;

fn f32_only(op: &str, ts: &[&GpuTensor]) -> Result<()> {
    dtype_only(op, ts, GpuDtype::F32)
}

/// An error naming `op` and the first of `ts` not stored as `dtype`.
fn dtype_only(op: &str, ts: &[&GpuTensor], dtype: GpuDtype) -> Result<()> {
    match ts.iter().find(|t| t.dtype != dtype) {
        Some(t) => Err(Error::invalid(format!(
            "{op}: expected {} tensors, got {}",
            format!("{dtype:?}").to_lowercase(),
            t.shape_str()
        ))),
        None => Ok(()),
    }
}

fn same_shape(op: &str, a: &GpuTensor, b: &GpuTensor) -> Result<()> {
    if a.rows != b.rows || a.cols != b.cols {
        return Err(Error::Shape {
            op: op.into(),
            expected: format!("{}x{}", a.rows, a.cols),
            got: format!("{}x{}", b.rows, b.cols),
        });
    }
    Ok(())
}

/// A 1-D grid of `n` workgroups folded into (x, y) under the per-dimension limit.
fn grid(n: usize) -> (u32, u32, u32) {
    let n = n.max(1);
    (n.min(GRID) as u32, n.div_ceil(GRID) as u32, 1)
}

/// (first row, rows, (chunk index, element offset) per tensor).
type Piece = (usize, usize, Vec<(usize, usize)>);

/// The common uniform of a row-walked piece: its rows, the row width `cols`, and the element
/// offsets of the first (x) and, where there is one, second (y) row-walked tensor.
fn xy_rows(cols: usize, (_, n, l): &Piece) -> Rows {
    Rows {
        rows: *n as u32,
        cols: cols as u32,
        x_off: l[0].1 as u32,
        y_off: l.get(1).map_or(0, |o| o.1 as u32),
        ..Default::default()
    }
}

/// Row-range pieces of `tensors` (same rows): (first row, rows, chunk index and element offset per
/// tensor). A row never straddles a chunk, so each piece binds one chunk of each tensor.
fn pieces(tensors: &[&GpuTensor]) -> Vec<Piece> {
    GpuTensor::common_row_ranges(tensors)
        .into_iter()
        .map(|(r0, r1)| {
            let locs = tensors
                .iter()
                .map(|t| {
                    let (ci, local) = t.locate(r0);
                    (ci, local * t.cols)
                })
                .collect();
            (r0, r1 - r0, locs)
        })
        .collect()
}

fn pipeline(ctx: &GpuContext, entry: &str) -> Result<std::sync::Arc<wgpu::ComputePipeline>> {
    // Trusted: every offset and extent comes from the chunk table and the checks in each wrapper.
    ctx.pipeline("forward", shaders::FORWARD, entry, true)
}

/// A binding of a row-walked dispatch: a tensor walked piece by piece with the others, or a
/// whole single-chunk tensor bound as is (weights, tables).
enum Bind<'a> {
    Rows(&'a GpuTensor),
    Whole(&'a GpuTensor),
}

/// Dispatches `entry` once per row piece of the `Rows` bindings: `params` builds the uniform from
/// (first row, rows, per-`Rows`-tensor (chunk, element offset)), `groups` the grid from the rows.
fn dispatch_rows<P: bytemuck::Pod>(
    ctx: &GpuContext,
    entry: &str,
    shape: &str,
    binds: &[Bind<'_>],
    params: impl Fn(&Piece) -> P,
    groups: impl Fn(usize) -> (u32, u32, u32),
) -> Result<()> {
    let rowed: Vec<&GpuTensor> = binds
        .iter()
        .filter_map(|b| match b {
            Bind::Rows(t) => Some(*t),
            Bind::Whole(_) => None,
        })
        .collect();
    let ps = pieces(&rowed);
    let uniforms: Vec<P> = ps.iter().map(&params).collect();
    let ds: Vec<Dispatch> = ps
        .iter()
        .zip(&uniforms)
        .map(|(piece, u)| {
            let mut next = 0;
            let buffers = binds
                .iter()
                .map(|b| match b {
                    Bind::Whole(t) => &t.chunks[0].buffer,
                    Bind::Rows(t) => {
                        let ci = piece.2[next].0;
                        next += 1;
                        &t.chunks[ci].buffer
                    }
                })
                .collect();
            Dispatch {
                buffers,
                uniform: Some(bytemuck::bytes_of(u)),
                groups: groups(piece.1),
            }
        })
        .collect();
    let pipe = pipeline(ctx, entry)?;
    ctx.run(entry, shape, &pipe, &ds)
}

/// y = w * (x / rms(x)) per row; `w` is 1 x cols.
pub fn rms_norm(ctx: &GpuContext, x: &GpuTensor, w: &GpuTensor, eps: f32) -> Result<GpuTensor> {
    f32_only("rms_norm", &[x, w])?;
    if w.rows != 1 || w.cols != x.cols || w.chunks.len() != 1 {
        return Err(Error::Shape {
            op: "rms_norm".into(),
            expected: format!("weight 1x{}", x.cols),
            got: w.shape_str(),
        });
    }
    let y = GpuTensor::empty(ctx, x.rows, x.cols, GpuDtype::F32)?;
    dispatch_rows(
        ctx,
        "rms_norm",
        &x.shape_str(),
        &[Bind::Rows(x), Bind::Whole(w), Bind::Rows(&y)],
        |p| Rows {
            eps,
            ..xy_rows(x.cols, p)
        },
        grid,
    )?;
    Ok(y)
}

/// The cos/sin table of rotary embeddings for positions 0..seq: `seq` rows of d/2 (cos, sin)
/// pairs, computed in f64 from the inverse frequencies and rounded to f32 once.
pub fn rope_table(ctx: &GpuContext, inv_freq: &[f64], seq: usize) -> Result<GpuTensor> {
    let half = inv_freq.len();
    let mut v = Vec::with_capacity(seq * half * 2);
    for p in 0..seq {
        for &f in inv_freq {
            let a = p as f64 * f;
            v.push(a.cos() as f32);
            v.push(a.sin() as f32);
        }
    }
    let t = GpuTensor::from_f32(ctx, seq, half * 2, &v)?;
    if t.chunks.len() != 1 {
        return Err(Error::invalid("rope table exceeds one GPU binding"));
    }
    Ok(t)
}

/// Rotates every head of `x` (rows x heads*head_dim, rows = sequences of `seq` tokens) in place.
pub fn rope(
    ctx: &GpuContext,
    x: &GpuTensor,
    heads: usize,
    head_dim: usize,
    seq: usize,
    table: &GpuTensor,
) -> Result<()> {
    f32_only("rope", &[x, table])?;
    if x.cols != heads * head_dim
        || !head_dim.is_multiple_of(2)
        || table.cols != head_dim
        || table.rows < seq
        || seq == 0
    {
        return Err(Error::Shape {
            op: "rope".into(),
            expected: format!("{heads} heads x {head_dim} (even), table of {seq} x {head_dim}"),
            got: format!("x {}, table {}", x.shape_str(), table.shape_str()),
        });
    }
    dispatch_rows(
        ctx,
        "rope",
        &x.shape_str(),
        &[Bind::Rows(x), Bind::Whole(table)],
        |(r0, n, l)| Rows {
            rows: *n as u32,
            cols: x.cols as u32,
            x_off: l[0].1 as u32,
            seq: seq as u32,
            heads: heads as u32,
            head_dim: head_dim as u32,
            pos0: (r0 % seq) as u32,
            ..Default::default()
        },
        |n| grid((n * heads * head_dim / 2).div_ceil(WG)),
    )
}

/// The line of forward.wgsl that [`attention_source`] rewrites (a test checks it is there once).
const HEAD_D4_LINE: &str = "const HEAD_D4: u32 = 32u;";

/// The forward module with the attention kernel's head dimension fixed to `d` (a multiple of 4).
pub fn attention_source(d: usize) -> String {
    shaders::FORWARD.replace(HEAD_D4_LINE, &format!("const HEAD_D4: u32 = {}u;", d / 4))
}

/// Causal grouped-query attention over sequences of `seq` rows: q is rows x hq*d, k and v are
/// rows x hk*d; returns rows x hq*d. Each sequence must lie inside one chunk of every operand
/// (allocate with `GpuTensor::empty_aligned(.., seq)`).
pub fn attention(
    ctx: &GpuContext,
    q: &GpuTensor,
    k: &GpuTensor,
    v: &GpuTensor,
    seq: usize,
    (hq, hk, d): (usize, usize, usize),
) -> Result<GpuTensor> {
    f32_only("attention", &[q, k, v])?;
    check_attention(q, k, v, seq, (hq, hk, d), 4)?;
    let pipe = ctx.pipeline_from(&format!("forward_d{d}"), "attention", true, || {
        Ok(attention_source(d))
    })?;
    run_attention(ctx, &pipe, "attention", q, k, v, seq, (hq, hk, d))
}

/// Whether [`attention_f16`] runs here for head dimension `d`: cooperative matrices (as the
/// tensor-core matmul needs them), d a multiple of 16 up to [`MAX_HEAD_DIM`], and room for its
/// staged tiles in workgroup memory.
pub fn attention_f16_available(ctx: &GpuContext, d: usize) -> bool {
    d.is_multiple_of(16)
        && d > 0
        && d <= MAX_HEAD_DIM
        && super::matmul::coop_available(ctx)
        && attention_f16_storage(d) <= ctx.caps.max_workgroup_storage as usize
}

/// Workgroup bytes of attention_coop.wgsl for head dimension `d`: 64 staged queries and 32
/// keys and values (rows of d + 8 halves), per subgroup 16 x 16 f32 scores and f16
/// probabilities, and 64 rows x 2 halves of (max, sum).
fn attention_f16_storage(d: usize) -> usize {
    (64 + 2 * 32) * (d + 8) * 2 + 4 * 256 * 4 + 4 * 256 * 2 + 256 * 4
}

/// attention_coop.wgsl for head dimension `d` (a multiple of 16): the constant set and one
/// named output accumulator per 16 dimensions.
pub fn attention_f16_source(d: usize) -> String {
    let n = d / 16;
    let lines = |f: &dyn Fn(usize) -> String| (0..n).map(f).collect::<Vec<_>>().join("\n");
    shaders::ATTENTION_COOP
        .replace(ATTN_F16_D16_LINE, &format!("const HEAD_D16: u32 = {n}u;"))
        .replace(
            "//@ACC_DECL",
            &lines(&|i| format!("    var o{i} = coop_mat16x16<f32, C>();")),
        )
        .replace(
            "//@ACC_MMA",
            &lines(&|i| format!("            o{i} = coopMultiplyAdd(pf, vtile(kc, {i}u), o{i});")),
        )
        .replace(
            "//@ACC_STORE",
            &lines(&|i| format!("    put_o(o{i}, {i}u, sg, lane, s, t0, h, direct);")),
        )
}

/// The line of attention_coop.wgsl that [`attention_f16_source`] rewrites.
const ATTN_F16_D16_LINE: &str = "const HEAD_D16: u32 = 8u;";

/// [`attention`] on tensor cores for f16 q, k, v (see attention_coop.wgsl): f32 output, scores
/// and sums in f32, the probabilities rounded to f16 before they multiply v. Only where
/// [`attention_f16_available`]; the same shapes and chunk rule as [`attention`].
pub fn attention_f16(
    ctx: &GpuContext,
    q: &GpuTensor,
    k: &GpuTensor,
    v: &GpuTensor,
    seq: usize,
    (hq, hk, d): (usize, usize, usize),
) -> Result<GpuTensor> {
    dtype_only("attention_f16", &[q, k, v], GpuDtype::F16)?;
    check_attention(q, k, v, seq, (hq, hk, d), 16)?;
    if !attention_f16_available(ctx, d) {
        return Err(Error::gpu(
            "attention_f16",
            format!("head dim {d}"),
            "needs cooperative 16x16 f16 matrices, subgroups of 32 and room for its tiles",
        ));
    }
    let pipe = ctx.pipeline_from(&format!("attention_coop_d{d}"), "main", true, || {
        Ok(attention_f16_source(d))
    })?;
    run_attention(ctx, &pipe, "attention_f16", q, k, v, seq, (hq, hk, d))
}

/// The shape rule of both attention kernels (`mult`: the head dimension's required factor).
fn check_attention(
    q: &GpuTensor,
    k: &GpuTensor,
    v: &GpuTensor,
    seq: usize,
    (hq, hk, d): (usize, usize, usize),
    mult: usize,
) -> Result<()> {
    if seq == 0
        || hk == 0
        || !hq.is_multiple_of(hk)
        || d == 0
        || d > MAX_HEAD_DIM
        || !d.is_multiple_of(mult)
        || q.cols != hq * d
        || k.cols != hk * d
        || v.cols != hk * d
        || k.rows != q.rows
        || v.rows != q.rows
        || !q.rows.is_multiple_of(seq)
    {
        return Err(Error::Shape {
            op: "attention".into(),
            expected: format!(
                "q rows x {hq}*{d}, k/v rows x {hk}*{d}, rows a multiple of {seq}, head dim a multiple of {mult}, <= {MAX_HEAD_DIM}"
            ),
            got: format!(
                "q {}, k {}, v {}",
                q.shape_str(),
                k.shape_str(),
                v.shape_str()
            ),
        });
    }
    Ok(())
}

/// Dispatches an attention kernel (both share the uniforms and the grid: 64 queries of one head
/// per workgroup) over every run of whole sequences that lies in one chunk of all operands.
#[allow(clippy::too_many_arguments)]
fn run_attention(
    ctx: &GpuContext,
    pipe: &wgpu::ComputePipeline,
    kernel: &str,
    q: &GpuTensor,
    k: &GpuTensor,
    v: &GpuTensor,
    seq: usize,
    (hq, hk, d): (usize, usize, usize),
) -> Result<GpuTensor> {
    let shape = format!("{} rows, seq {seq}, heads {hq}/{hk}, d {d}", q.rows);
    let o = GpuTensor::empty_aligned(ctx, q.rows, q.cols, GpuDtype::F32, seq)?;
    let ranges = GpuTensor::common_row_ranges(&[q, k, v, &o]);
    if ranges
        .iter()
        .any(|(a, b)| !a.is_multiple_of(seq) || !b.is_multiple_of(seq))
    {
        return Err(Error::gpu(
            kernel,
            &shape,
            "a sequence straddles a chunk boundary of q, k or v; allocate them aligned to the sequence length",
        ));
    }
    let blocks = seq.div_ceil(ATTN_ROWS);
    let mut params = Vec::new();
    let mut binds = Vec::new();
    for (r0, r1) in ranges {
        let seqs_total = (r1 - r0) / seq;
        let per = (GRID / blocks).max(1);
        let mut s0 = 0;
        while s0 < seqs_total {
            let ns = per.min(seqs_total - s0);
            let row = r0 + s0 * seq;
            let loc: Vec<(usize, usize)> = [q, k, v, &o]
                .iter()
                .map(|t| {
                    let (ci, local) = t.locate(row);
                    (ci, local * t.cols)
                })
                .collect();
            params.push(Attn {
                seqs: ns as u32,
                seq: seq as u32,
                hq: hq as u32,
                hk: hk as u32,
                d: d as u32,
                q_off: loc[0].1 as u32,
                k_off: loc[1].1 as u32,
                v_off: loc[2].1 as u32,
                o_off: loc[3].1 as u32,
                scale: 1.0 / (d as f32).sqrt(),
                blocks: blocks as u32,
                pad: 0,
            });
            binds.push((loc, ns));
            // The useful work for --profile: q kᵀ and p v over the causal half (the f16 kernel
            // computes q kᵀ twice; that is its cost, not work done).
            let pairs = (seq * (seq + 1) / 2) as f64;
            let bytes = (ns * seq * (q.cols + k.cols + v.cols) * q.dtype.size() as usize
                + ns * seq * q.cols * 4) as f64;
            ctx.add_work(pipe, (ns * hq) as f64 * 4.0 * d as f64 * pairs, bytes);
            s0 += ns;
        }
    }
    if hq > GRID {
        return Err(Error::gpu(
            kernel,
            &shape,
            "too many heads for one dispatch",
        ));
    }
    let ds: Vec<Dispatch> = params
        .iter()
        .zip(&binds)
        .map(|(p, (loc, ns))| Dispatch {
            buffers: vec![
                &q.chunks[loc[0].0].buffer,
                &k.chunks[loc[1].0].buffer,
                &v.chunks[loc[2].0].buffer,
                &o.chunks[loc[3].0].buffer,
            ],
            uniform: Some(bytemuck::bytes_of(p)),
            groups: ((ns * blocks) as u32, hq as u32, 1),
        })
        .collect();
    ctx.run(kernel, &shape, pipe, &ds)?;
    Ok(o)
}

fn elementwise(ctx: &GpuContext, entry: &str, x: &GpuTensor, y: &GpuTensor) -> Result<()> {
    dispatch_rows(
        ctx,
        entry,
        &x.shape_str(),
        &[Bind::Rows(x), Bind::Rows(y)],
        |p| xy_rows(x.cols, p),
        |n| grid((n * x.cols).div_ceil(WG)),
    )
}

/// g = silu(g) * u, in place (SwiGLU).
pub fn silu_mul(ctx: &GpuContext, g: &GpuTensor, u: &GpuTensor) -> Result<()> {
    f32_only("silu_mul", &[g, u])?;
    same_shape("silu_mul", g, u)?;
    elementwise(ctx, "silu_mul", g, u)
}

/// x += y, in place (residual).
pub fn add(ctx: &GpuContext, x: &GpuTensor, y: &GpuTensor) -> Result<()> {
    f32_only("add", &[x, y])?;
    same_shape("add", x, y)?;
    elementwise(ctx, "add", x, y)
}

/// x -= y, in place (exactly rounded f32 differences; the pipeline's Δ = W - Ŵ).
pub fn sub(ctx: &GpuContext, x: &GpuTensor, y: &GpuTensor) -> Result<()> {
    f32_only("sub", &[x, y])?;
    same_shape("sub", x, y)?;
    elementwise(ctx, "sub", x, y)
}

/// x += bias for every row, in place; `bias` is 1 x cols.
pub fn bias_add(ctx: &GpuContext, x: &GpuTensor, bias: &GpuTensor) -> Result<()> {
    f32_only("bias_add", &[x, bias])?;
    if bias.rows != 1 || bias.cols != x.cols || bias.chunks.len() != 1 {
        return Err(Error::Shape {
            op: "bias_add".into(),
            expected: format!("1x{}", x.cols),
            got: bias.shape_str(),
        });
    }
    dispatch_rows(
        ctx,
        "bias_add",
        &x.shape_str(),
        &[Bind::Rows(x), Bind::Whole(bias)],
        |p| xy_rows(x.cols, p),
        |n| grid((n * x.cols).div_ceil(WG)),
    )
}

/// Per row: logsumexp(logits) - logits[target], the cross-entropy (nats) of that row's token.
/// `targets` is rows x 1 u32; returns rows x 1 f32.
pub fn nll(ctx: &GpuContext, logits: &GpuTensor, targets: &GpuTensor) -> Result<GpuTensor> {
    f32_only("nll", &[logits])?;
    if targets.dtype != GpuDtype::U32 || targets.cols != 1 || targets.rows != logits.rows {
        return Err(Error::Shape {
            op: "nll".into(),
            expected: format!("targets {}x1 u32", logits.rows),
            got: targets.shape_str(),
        });
    }
    let loss = GpuTensor::empty(ctx, logits.rows, 1, GpuDtype::F32)?;
    // Targets and loss are both rows x 1 words, so they chunk alike and share one row offset.
    if pieces(&[logits, targets, &loss])
        .iter()
        .any(|(_, _, l)| l[1] != l[2])
    {
        return Err(Error::gpu(
            "nll",
            logits.shape_str(),
            "targets and loss buffers are chunked differently",
        ));
    }
    dispatch_rows(
        ctx,
        "nll",
        &logits.shape_str(),
        &[Bind::Rows(logits), Bind::Rows(targets), Bind::Rows(&loss)],
        |p| xy_rows(logits.cols, p),
        grid,
    )?;
    Ok(loss)
}

/// A zeroed one-word flag for [`to_f16`] (1 x 1 u32): nonzero once any converted value was beyond
/// f16's range. It stays set until the caller zeroes it again.
pub fn range_flag(ctx: &GpuContext) -> Result<GpuTensor> {
    let f = GpuTensor::empty(ctx, 1, 1, GpuDtype::U32)?;
    f.fill_u32(ctx, 0);
    Ok(f)
}

/// `x` (f32) rounded to f16 (to nearest) into a new tensor, for the matmul's A operand (and a
/// compressed layer's weights, `model::forward::linear_weight_gpu`). `cols` must
/// be even (every row then starts on a 32-bit word, so pieces never share a word). A value with
/// |x| > 65504 (or a non-finite one) is saturated to ±65504 and sets `flag` (see [`range_flag`]);
/// the caller must check it before trusting anything computed from the result.
pub fn to_f16(ctx: &GpuContext, x: &GpuTensor, flag: &GpuTensor) -> Result<GpuTensor> {
    to_f16_aligned(ctx, x, flag, 1)
}

/// [`to_f16`] into chunks of whole groups of `align` rows (`GpuTensor::empty_aligned`), so a
/// sequence of `align` rows never straddles a chunk (as attention requires).
pub fn to_f16_aligned(
    ctx: &GpuContext,
    x: &GpuTensor,
    flag: &GpuTensor,
    align: usize,
) -> Result<GpuTensor> {
    f32_only("to_f16", &[x])?;
    if !x.cols.is_multiple_of(2) {
        return Err(Error::Shape {
            op: "to_f16".into(),
            expected: "an even number of columns".into(),
            got: x.shape_str(),
        });
    }
    if flag.dtype != GpuDtype::U32 || flag.rows * flag.cols != 1 {
        return Err(Error::Shape {
            op: "to_f16".into(),
            expected: "a 1x1 U32 flag".into(),
            got: flag.shape_str(),
        });
    }
    let y = GpuTensor::empty_aligned(ctx, x.rows, x.cols, GpuDtype::F16, align)?;
    if x.rows == 0 || x.cols == 0 {
        return Ok(y);
    }
    dispatch_rows(
        ctx,
        "to_f16",
        &x.shape_str(),
        &[Bind::Rows(x), Bind::Rows(&y), Bind::Whole(flag)],
        |p| xy_rows(x.cols, p),
        |n| grid((n * x.cols / 2).div_ceil(WG)),
    )?;
    Ok(y)
}

/// `x` (f16 or bf16, an even number of columns) widened to f32 into a new tensor, exactly. A
/// layer stored in 16 bits crosses to the GPU once, as stored, and its method gets the f32 copy
/// from here instead of a second, twice as large upload.
pub fn widen(ctx: &GpuContext, x: &GpuTensor) -> Result<GpuTensor> {
    let bf16 = match x.dtype {
        GpuDtype::F16 => 0,
        GpuDtype::BF16 => 1,
        _ => {
            return Err(Error::invalid(format!(
                "widen: expected an f16 or bf16 tensor, got {:?} {}",
                x.dtype,
                x.shape_str()
            )));
        }
    };
    if !x.cols.is_multiple_of(2) {
        return Err(Error::Shape {
            op: "widen".into(),
            expected: "an even number of columns".into(),
            got: x.shape_str(),
        });
    }
    let y = GpuTensor::empty(ctx, x.rows, x.cols, GpuDtype::F32)?;
    if x.rows == 0 || x.cols == 0 {
        return Ok(y);
    }
    dispatch_rows(
        ctx,
        "widen",
        &x.shape_str(),
        &[Bind::Rows(x), Bind::Rows(&y)],
        |p| Rows {
            bf16,
            ..xy_rows(x.cols, p)
        },
        |n| grid((n * x.cols / 2).div_ceil(WG)),
    )?;
    Ok(y)
}

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Pair {
    rows: u32,
    cols: u32,
    b_off: u32,
    c_off: u32,
    o_off: u32,
    pad: [u32; 3],
}

/// Per row: KL(softmax(base) || softmax(other)) in nats and whether the (lowest-index) argmaxes
/// agree (1.0 or 0.0). Returns rows x 2 f32.
pub fn kl_top1(ctx: &GpuContext, base: &GpuTensor, other: &GpuTensor) -> Result<GpuTensor> {
    f32_only("kl_top1", &[base, other])?;
    same_shape("kl_top1", base, other)?;
    let out = GpuTensor::empty(ctx, base.rows, 2, GpuDtype::F32)?;
    dispatch_rows(
        ctx,
        "kl_top1",
        &base.shape_str(),
        &[Bind::Rows(base), Bind::Rows(other), Bind::Rows(&out)],
        |(_, n, l)| Pair {
            rows: *n as u32,
            cols: base.cols as u32,
            b_off: l[0].1 as u32,
            c_off: l[1].1 as u32,
            o_off: l[2].1 as u32,
            pad: [0; 3],
        },
        grid,
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_head_dimension_line_is_there_to_replace() {
        assert_eq!(
            super::shaders::FORWARD.matches(super::HEAD_D4_LINE).count(),
            1
        );
        let s = super::attention_source(20);
        assert!(s.contains("const HEAD_D4: u32 = 5u;") && !s.contains(super::HEAD_D4_LINE));
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Embed {
    rows: u32,
    cols: u32,
    id_off: u32,
    t_row0: u32,
    t_rows: u32,
    pad: [u32; 3],
}

/// Rows `ids` of the f32 embedding `table` (vocab x hidden, any chunking) into a new
/// ids.len() x hidden f32 tensor aligned to `align` rows. Every id must be below the table's
/// rows (an error naming the first that is not): an output row is written by the dispatch of the
/// table chunk holding its id.
pub fn embed(ctx: &GpuContext, table: &GpuTensor, ids: &[u32], align: usize) -> Result<GpuTensor> {
    f32_only("embed", &[table])?;
    if let Some((i, &id)) = ids
        .iter()
        .enumerate()
        .find(|(_, id)| **id as usize >= table.rows)
    {
        return Err(Error::invalid(format!(
            "token id {id} at position {i} is outside the vocabulary ({})",
            table.rows
        )));
    }
    let cols = table.cols;
    let out = GpuTensor::empty_aligned(ctx, ids.len(), cols, GpuDtype::F32, align)?;
    if ids.is_empty() || cols == 0 {
        return Ok(out);
    }
    let id_t = GpuTensor::from_bytes(ctx, ids.len(), 1, GpuDtype::U32, bytemuck::cast_slice(ids))?;
    let shape = format!("{} ids, table {}", ids.len(), table.shape_str());
    if id_t.chunks.len() != 1 {
        return Err(Error::gpu(
            "embed",
            &shape,
            "the ids do not fit one storage binding",
        ));
    }
    let mut params = Vec::new();
    let mut binds = Vec::new();
    for (oi, oc) in out.chunks.iter().enumerate().filter(|(_, c)| c.rows > 0) {
        for (ti, tc) in table.chunks.iter().enumerate().filter(|(_, c)| c.rows > 0) {
            params.push(Embed {
                rows: oc.rows as u32,
                cols: cols as u32,
                id_off: oc.row_start as u32,
                t_row0: tc.row_start as u32,
                t_rows: tc.rows as u32,
                pad: [0; 3],
            });
            binds.push((ti, oi, grid((oc.rows * cols).div_ceil(WG))));
        }
    }
    let ds: Vec<Dispatch> = params
        .iter()
        .zip(&binds)
        .map(|(p, &(ti, oi, groups))| Dispatch {
            buffers: vec![
                &table.chunks[ti].buffer,
                &id_t.chunks[0].buffer,
                &out.chunks[oi].buffer,
            ],
            uniform: Some(bytemuck::bytes_of(p)),
            groups,
        })
        .collect();
    let pipe = pipeline(ctx, "embed")?;
    ctx.run("embed", &shape, &pipe, &ds)?;
    Ok(out)
}
