//! Round-to-nearest (RTN) quantization on the GPU (`shaders/quant_rtn.wgsl`): per (row, group)
//! min/max and grid fit, quantization packed four u8 per u32, and dequantization, reproducing
//! `QuantSpec::fit_minmax` / `QuantSpec::quantize` bit for bit (the shader explains how it stays
//! exact despite WGSL's inexact division).
//!
//! Building blocks stay on the GPU ([`GpuGrid`], [`quantize_packed`], [`dequantize`], and
//! [`dequantize_packed`] for stored integers with any column -> group map, e.g. GPTQ's) so GPTQ
//! and the layer-error code can reuse them; [`rtn`] downloads a host [`QuantizedTensor`]. Every
//! shape is validated here before a kernel runs (which is what allows unchecked pipelines). This
//! module must not redefine the grid (src/quant/grid.rs is the definition) nor fall back to the
//! CPU silently; the CPU paths are `reference::quant::rtn` and
//! `reference::quant::dequantize_packed`.

use super::buffer::{GpuDtype, GpuTensor};
use super::context::{Dispatch, GpuContext};
use super::reduce::{Launch, WG, check_workgroup_size, lanes_for, plan, to_u32};
use crate::error::{Error, Result};
use crate::quant::{QuantSpec, QuantizedTensor};
use crate::shaders;

const KERNEL: &str = "quant_rtn";

/// Test hooks for the `*_into` variants; `Hooks::default()` is the production behaviour.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Hooks {
    /// Workgroups-per-dimension limit below the adapter's, so small shapes reach the 2-D grid and
    /// dispatch splitting.
    pub grid_limit: Option<u32>,
    /// Moves every quotient the kernels compute by this many ulps before rounding. Software
    /// adapters divide exactly, so without it the exact boundary decisions that protect against
    /// WGSL's 2.5-ulp division would never be exercised; with |skew| <= 3 results must not change.
    pub div_skew_ulps: i32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    group: u32,
    n_groups: u32,
    w_off: u32,
    p_off: u32,
    o_off: u32,
    lanes: u32,
    maxq: u32,
    sym: u32,
    words: u32,
    div_skew: i32,
}

/// Per-(row, group) grid parameters on the GPU: `scales` (f32, each exactly an f16) and `zeros`
/// (u32 in 0..=maxq), both `rows x n_groups`, laid out like `QuantizedTensor::scales/zeros`.
pub struct GpuGrid {
    pub scales: GpuTensor,
    pub zeros: GpuTensor,
}

impl GpuGrid {
    /// Uninitialised parameters for a `rows x cols` weight matrix under `spec`.
    pub fn empty(ctx: &GpuContext, rows: usize, cols: usize, spec: &QuantSpec) -> Result<Self> {
        let ng = spec.n_groups(cols.max(1));
        Ok(GpuGrid {
            scales: GpuTensor::empty(ctx, rows, ng, GpuDtype::F32)?,
            zeros: GpuTensor::empty(ctx, rows, ng, GpuDtype::U32)?,
        })
    }
}

/// Checks the weights and the spec; returns (group size, number of groups).
fn validate(w: &GpuTensor, spec: &QuantSpec) -> Result<(usize, usize)> {
    // A spec built by struct literal bypasses `QuantSpec::new`'s checks.
    QuantSpec::new(spec.bits, spec.group, spec.sym)?;
    if w.dtype != GpuDtype::F32 {
        return Err(Error::invalid(format!(
            "rtn: weights must be F32, got {}",
            w.shape_str()
        )));
    }
    if w.cols == 0 {
        return Err(Error::invalid(
            "rtn: a weight matrix needs at least one column",
        ));
    }
    spec.check_cols(w.cols, "rtn")?;
    Ok((spec.group_size(w.cols), spec.n_groups(w.cols)))
}

fn check_out(t: &GpuTensor, rows: usize, cols: usize, dtype: GpuDtype, what: &str) -> Result<()> {
    if t.rows != rows || t.cols != cols || t.dtype != dtype {
        return Err(Error::Shape {
            op: format!("{KERNEL} {what}"),
            expected: format!("{rows}x{cols} {dtype:?}"),
            got: t.shape_str(),
        });
    }
    Ok(())
}

fn shape_of(w: &GpuTensor, spec: &QuantSpec) -> String {
    format!(
        "{} {}-bit {} group {}",
        w.shape_str(),
        spec.bits,
        if spec.sym { "sym" } else { "asym" },
        spec.group.map_or("row".to_string(), |g| g.to_string())
    )
}

/// Fits the grid of every (row, group) of `w` on the GPU.
pub fn fit_grid(ctx: &GpuContext, w: &GpuTensor, spec: &QuantSpec) -> Result<GpuGrid> {
    validate(w, spec)?;
    let grid = GpuGrid::empty(ctx, w.rows, w.cols, spec)?;
    fit_grid_into(ctx, w, spec, &grid, Hooks::default())?;
    Ok(grid)
}

/// [`fit_grid`] into caller-allocated parameters (tests poison them first), with test [`Hooks`].
#[doc(hidden)]
pub fn fit_grid_into(
    ctx: &GpuContext,
    w: &GpuTensor,
    spec: &QuantSpec,
    grid: &GpuGrid,
    hooks: Hooks,
) -> Result<()> {
    let (group, ng) = validate(w, spec)?;
    let shape = shape_of(w, spec);
    check_out(&grid.scales, w.rows, ng, GpuDtype::F32, "scales")?;
    check_out(&grid.zeros, w.rows, ng, GpuDtype::U32, "zeros")?;
    if w.rows == 0 {
        return Ok(());
    }
    check_workgroup_size(ctx, KERNEL, &shape)?;
    let lanes = lanes_for(group);
    let base = base_params(hooks, w.cols, spec, group, ng, &shape)?;
    let mut jobs = Vec::new();
    for (r0, r1) in GpuTensor::common_row_ranges(&[w, &grid.scales, &grid.zeros]) {
        let (wi, wr) = w.locate(r0);
        let (si, sr) = grid.scales.locate(r0);
        let (zi, zr) = grid.zeros.locate(r0);
        if sr != zr {
            // Same shape and element size give the same chunking; anything else is a bug.
            return Err(Error::gpu(
                KERNEL,
                &shape,
                "scales and zeros are chunked differently",
            ));
        }
        for Launch {
            first: d0,
            rows,
            groups,
        } in plan(r1 - r0, ng, WG / lanes, limit(ctx, hooks.grid_limit))?
        {
            let p = Params {
                rows: to_u32(rows, KERNEL, &shape)?,
                w_off: to_u32((wr + d0) * w.cols, KERNEL, &shape)?,
                p_off: to_u32((sr + d0) * ng, KERNEL, &shape)?,
                lanes: lanes as u32,
                ..base
            };
            jobs.push((p, [wi, si, zi], groups));
        }
    }
    let tensors = [w, &grid.scales, &grid.zeros];
    launch(ctx, "fit", &shape, &tensors, &jobs)
}

/// Quantizes `w` with the fitted `grid`: a `rows x ceil(cols / 4)` u32 tensor whose word k of a
/// row holds columns 4k..4k+3 in bytes 0..3 (padding bytes are 0). Unpack with [`unpack_q_into`].
pub fn quantize_packed(
    ctx: &GpuContext,
    w: &GpuTensor,
    spec: &QuantSpec,
    grid: &GpuGrid,
) -> Result<GpuTensor> {
    validate(w, spec)?;
    let out = GpuTensor::empty(ctx, w.rows, w.cols.div_ceil(4), GpuDtype::U32)?;
    quantize_packed_into(ctx, w, spec, grid, &out, Hooks::default())?;
    Ok(out)
}

/// [`quantize_packed`] into a caller-allocated output (see [`fit_grid_into`]).
#[doc(hidden)]
pub fn quantize_packed_into(
    ctx: &GpuContext,
    w: &GpuTensor,
    spec: &QuantSpec,
    grid: &GpuGrid,
    out: &GpuTensor,
    hooks: Hooks,
) -> Result<()> {
    let words = w.cols.div_ceil(4);
    elementwise(
        ctx,
        "quantize",
        w,
        spec,
        grid,
        out,
        words,
        GpuDtype::U32,
        hooks,
    )
}

/// Dequantized weights `scale * (q - zero)` as a `rows x cols` f32 tensor, computed on the GPU
/// from `w` and its fitted `grid` (q is recomputed, never stored).
pub fn dequantize(
    ctx: &GpuContext,
    w: &GpuTensor,
    spec: &QuantSpec,
    grid: &GpuGrid,
) -> Result<GpuTensor> {
    validate(w, spec)?;
    let out = GpuTensor::empty(ctx, w.rows, w.cols, GpuDtype::F32)?;
    dequantize_into(ctx, w, spec, grid, &out, Hooks::default())?;
    Ok(out)
}

/// [`dequantize`] into a caller-allocated output (see [`fit_grid_into`]).
#[doc(hidden)]
pub fn dequantize_into(
    ctx: &GpuContext,
    w: &GpuTensor,
    spec: &QuantSpec,
    grid: &GpuGrid,
    out: &GpuTensor,
    hooks: Hooks,
) -> Result<()> {
    elementwise(
        ctx,
        "dequant",
        w,
        spec,
        grid,
        out,
        w.cols,
        GpuDtype::F32,
        hooks,
    )
}

/// Dequantized weights from stored integers: `packed` (`rows x ceil(cols / 4)` u32, the layout of
/// [`quantize_packed`]: byte j of word k is column 4k + j), the per-(row, group) `grid` and the
/// column -> group map `g_idx` (`cols` entries, act-order allowed). Returns `rows x cols` f32,
/// equal bit for bit to `QuantizedTensor::dequantize` of the same tensor.
pub fn dequantize_packed(
    ctx: &GpuContext,
    packed: &GpuTensor,
    grid: &GpuGrid,
    g_idx: &[u32],
    spec: &QuantSpec,
) -> Result<GpuTensor> {
    let out = GpuTensor::empty(ctx, packed.rows, g_idx.len(), GpuDtype::F32)?;
    dequantize_packed_into(ctx, packed, grid, g_idx, spec, &out, 0, Hooks::default())?;
    Ok(out)
}

/// [`dequantize_packed`] into rows `out_row0 .. out_row0 + packed.rows` of a caller-allocated
/// `out` (GPTQ fills one tensor from its row chunks this way; tests poison `out` first). The row
/// ranges follow the chunks of every operand, so none of them needs to match `out`'s chunking.
/// Of the hooks only `grid_limit` applies (nothing is divided, so there is no quotient to skew).
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn dequantize_packed_into(
    ctx: &GpuContext,
    packed: &GpuTensor,
    grid: &GpuGrid,
    g_idx: &[u32],
    spec: &QuantSpec,
    out: &GpuTensor,
    out_row0: usize,
    hooks: Hooks,
) -> Result<()> {
    const ENTRY: &str = "dequant_packed";
    QuantSpec::new(spec.bits, spec.group, spec.sym)?;
    let (rows, cols) = (packed.rows, g_idx.len());
    if cols == 0 {
        return Err(Error::invalid(
            "dequantize: a weight matrix needs at least one column",
        ));
    }
    spec.check_cols(cols, "dequantize")?;
    let (words, ng) = (cols.div_ceil(4), spec.n_groups(cols));
    let shape = format!(
        "{rows}x{cols} {}-bit group {}",
        spec.bits,
        spec.group.map_or("row".to_string(), |g| g.to_string())
    );
    check_out(packed, rows, words, GpuDtype::U32, "packed q")?;
    check_out(&grid.scales, rows, ng, GpuDtype::F32, "scales")?;
    check_out(&grid.zeros, rows, ng, GpuDtype::U32, "zeros")?;
    if out.dtype != GpuDtype::F32 || out.cols != cols || out_row0 + rows > out.rows {
        return Err(Error::Shape {
            op: format!("{KERNEL} {ENTRY}"),
            expected: format!(
                "an F32 output of {cols} columns with rows {out_row0}..{}",
                out_row0 + rows
            ),
            got: out.shape_str(),
        });
    }
    // The kernel indexes the grid by g_idx unchecked: every entry must name a group of the row.
    if let Some(c) = g_idx.iter().position(|&g| g as usize >= ng) {
        return Err(Error::invalid(format!(
            "dequantize: g_idx[{c}] = {} but the rows have {ng} groups",
            g_idx[c]
        )));
    }
    if rows == 0 {
        return Ok(());
    }
    check_workgroup_size(ctx, KERNEL, &shape)?;
    let g_idx_t = GpuTensor::from_bytes(ctx, 1, cols, GpuDtype::U32, bytemuck::cast_slice(g_idx))?;
    if g_idx_t.chunks.len() != 1 {
        return Err(Error::gpu(
            KERNEL,
            &shape,
            "g_idx exceeds one storage binding",
        ));
    }
    let base = Params {
        words: to_u32(words, KERNEL, &shape)?,
        ..base_params(hooks, cols, spec, spec.group_size(cols), ng, &shape)?
    };
    // Cuts where any operand changes chunk, in rows of `packed` (out's shifted by out_row0).
    let mut cuts: Vec<usize> = [packed, &grid.scales, &grid.zeros]
        .iter()
        .flat_map(|t| t.chunks.iter().map(|c| c.row_start))
        .chain(
            out.chunks
                .iter()
                .map(|c| c.row_start)
                .filter(|&s| s > out_row0 && s < out_row0 + rows)
                .map(|s| s - out_row0),
        )
        .chain([0, rows])
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let ranges: Vec<(usize, usize)> = cuts.windows(2).map(|w| (w[0], w[1])).collect();
    let rows_io = RowsIo {
        src: (packed, words),
        out: (out, out_row0, cols),
        per_row: cols,
    };
    let mut jobs = row_jobs(ctx, &hooks, &shape, base, &ranges, grid, rows_io)?;
    // g_idx is the fifth binding, one chunk.
    for (_, chunks, _) in &mut jobs {
        chunks.push(0);
    }
    let tensors = [packed, &grid.scales, &grid.zeros, out, &g_idx_t];
    launch(ctx, ENTRY, &shape, &tensors, &jobs)
}

/// RTN-quantizes `w` on the GPU and downloads the result.
pub fn rtn(ctx: &GpuContext, w: &GpuTensor, spec: &QuantSpec) -> Result<QuantizedTensor> {
    let grid = fit_grid(ctx, w, spec)?;
    let packed = quantize_packed(ctx, w, spec, &grid)?;
    download(ctx, w.rows, w.cols, spec, &grid, &packed)
}

/// RTN-quantizes `w` on the GPU and returns the dequantized weights, still on the GPU.
pub fn rtn_dequant(ctx: &GpuContext, w: &GpuTensor, spec: &QuantSpec) -> Result<GpuTensor> {
    let grid = fit_grid(ctx, w, spec)?;
    dequantize(ctx, w, spec, &grid)
}

/// Builds the host [`QuantizedTensor`] from a grid and packed integers left on the GPU.
pub fn download(
    ctx: &GpuContext,
    rows: usize,
    cols: usize,
    spec: &QuantSpec,
    grid: &GpuGrid,
    packed: &GpuTensor,
) -> Result<QuantizedTensor> {
    let group = spec.group_size(cols).max(1);
    check_out(packed, rows, cols.div_ceil(4), GpuDtype::U32, "packed q")?;
    let mut q = vec![0u8; rows * cols];
    unpack_q_into(&packed.to_bytes(ctx)?, rows, cols, &mut q)?;
    Ok(QuantizedTensor {
        rows,
        cols,
        spec: *spec,
        q,
        scales: grid.scales.to_f32(ctx)?,
        zeros: grid.zeros.to_u32(ctx)?,
        g_idx: (0..cols).map(|c| (c / group) as u32).collect(),
    })
}

/// Copies `rows` packed rows of `ceil(cols / 4)` little-endian words each (byte j of word k is
/// column 4k + j), as read back, into `out`: row-major u8, `rows x cols`.
pub fn unpack_q_into(packed: &[u8], rows: usize, cols: usize, out: &mut [u8]) -> Result<()> {
    let stride = cols.div_ceil(4) * 4;
    if packed.len() != rows * stride || out.len() != rows * cols {
        return Err(Error::Shape {
            op: "unpack_q".into(),
            expected: format!(
                "{} packed bytes into {} for {rows}x{cols}",
                rows * stride,
                rows * cols
            ),
            got: format!("{} into {}", packed.len(), out.len()),
        });
    }
    for (src, dst) in packed
        .chunks_exact(stride.max(1))
        .zip(out.chunks_exact_mut(cols.max(1)))
    {
        dst.copy_from_slice(&src[..cols]);
    }
    Ok(())
}

fn limit(ctx: &GpuContext, grid_limit: Option<u32>) -> u32 {
    grid_limit
        .unwrap_or(u32::MAX)
        .min(ctx.max_workgroups_per_dim())
}

fn base_params(
    hooks: Hooks,
    cols: usize,
    spec: &QuantSpec,
    group: usize,
    ng: usize,
    shape: &str,
) -> Result<Params> {
    Ok(Params {
        rows: 0,
        cols: to_u32(cols, KERNEL, shape)?,
        group: to_u32(group, KERNEL, shape)?,
        n_groups: to_u32(ng, KERNEL, shape)?,
        w_off: 0,
        p_off: 0,
        o_off: 0,
        lanes: 1,
        maxq: spec.maxq(),
        sym: spec.sym as u32,
        words: 0,
        div_skew: hooks.div_skew_ulps,
    })
}

/// The per-element kernels (`quantize`: one invocation per packed word; `dequant`: per element).
#[allow(clippy::too_many_arguments)]
fn elementwise(
    ctx: &GpuContext,
    entry: &str,
    w: &GpuTensor,
    spec: &QuantSpec,
    grid: &GpuGrid,
    out: &GpuTensor,
    words: usize,
    dtype: GpuDtype,
    hooks: Hooks,
) -> Result<()> {
    let (group, ng) = validate(w, spec)?;
    let shape = shape_of(w, spec);
    check_out(&grid.scales, w.rows, ng, GpuDtype::F32, "scales")?;
    check_out(&grid.zeros, w.rows, ng, GpuDtype::U32, "zeros")?;
    check_out(out, w.rows, words, dtype, entry)?;
    if w.rows == 0 {
        return Ok(());
    }
    check_workgroup_size(ctx, KERNEL, &shape)?;
    let base = Params {
        words: to_u32(words, KERNEL, &shape)?,
        ..base_params(hooks, w.cols, spec, group, ng, &shape)?
    };
    let ranges = GpuTensor::common_row_ranges(&[w, &grid.scales, &grid.zeros, out]);
    let rows_io = RowsIo {
        src: (w, w.cols),
        out: (out, 0, words),
        per_row: words,
    };
    let jobs = row_jobs(ctx, &hooks, &shape, base, &ranges, grid, rows_io)?;
    let tensors = [w, &grid.scales, &grid.zeros, out];
    launch(ctx, entry, &shape, &tensors, &jobs)
}

/// One launch: its uniform, the chunk index into each bound tensor, its workgroups.
type Job = (Params, Vec<usize>, (u32, u32, u32));

/// What a per-row kernel reads and writes: `src` (tensor, elements per row), rows
/// `out_row0 + r` of `out` (tensor, `out_row0`, elements per row), and its invocations per row.
struct RowsIo<'a> {
    src: (&'a GpuTensor, usize),
    out: (&'a GpuTensor, usize, usize),
    per_row: usize,
}

/// The launches of a per-row kernel over `ranges` (rows of `src`, each lying inside one chunk of
/// every operand): per launch the uniform (from `base`: rows and the offsets of src, the grid
/// and out inside their chunks), the chunk of src, scales, zeros and out, and the workgroups.
fn row_jobs(
    ctx: &GpuContext,
    hooks: &Hooks,
    shape: &str,
    base: Params,
    ranges: &[(usize, usize)],
    grid: &GpuGrid,
    io: RowsIo,
) -> Result<Vec<Job>> {
    let ((src, src_len), (out, out_row0, out_len)) = (io.src, io.out);
    let ng = base.n_groups as usize;
    let mut jobs = Vec::new();
    for &(r0, r1) in ranges {
        let (wi, wr) = src.locate(r0);
        let (si, sr) = grid.scales.locate(r0);
        let (zi, zr) = grid.zeros.locate(r0);
        let (oi, or) = out.locate(out_row0 + r0);
        if sr != zr {
            return Err(Error::gpu(
                KERNEL,
                shape,
                "scales and zeros are chunked differently",
            ));
        }
        for Launch {
            first: d0,
            rows,
            groups,
        } in plan(r1 - r0, io.per_row, WG, limit(ctx, hooks.grid_limit))?
        {
            let p = Params {
                rows: to_u32(rows, KERNEL, shape)?,
                w_off: to_u32((wr + d0) * src_len, KERNEL, shape)?,
                p_off: to_u32((sr + d0) * ng, KERNEL, shape)?,
                o_off: to_u32((or + d0) * out_len, KERNEL, shape)?,
                ..base
            };
            jobs.push((p, vec![wi, si, zi, oi], groups));
        }
    }
    Ok(jobs)
}

/// Records one dispatch per job: job = (uniform, chunk index into each tensor, workgroups).
fn launch<C: AsRef<[usize]>>(
    ctx: &GpuContext,
    entry: &str,
    shape: &str,
    tensors: &[&GpuTensor],
    jobs: &[(Params, C, (u32, u32, u32))],
) -> Result<()> {
    let pipeline = ctx.pipeline(KERNEL, shaders::QUANT_RTN, entry, true)?;
    let dispatches: Vec<Dispatch> = jobs
        .iter()
        .map(|(p, chunks, groups)| Dispatch {
            buffers: tensors
                .iter()
                .zip(chunks.as_ref())
                .map(|(t, &i)| &t.chunks[i].buffer)
                .collect(),
            uniform: Some(bytemuck::bytes_of(p)),
            groups: *groups,
        })
        .collect();
    ctx.run(&format!("{KERNEL}/{entry}"), shape, &pipeline, &dispatches)
}
