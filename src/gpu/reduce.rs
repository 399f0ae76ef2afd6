//! Row/group reductions of an f32 [`GpuTensor`] on the GPU (`shaders/reduce.wgsl`): min, max,
//! max |x| and sum of squares over consecutive groups of columns, one output per (row, group).
//! Used for activation norms, per-channel ranges and layer errors.
//!
//! The wrappers iterate over the row ranges shared by the input's and output's chunks (a row never
//! straddles chunks) and split each range into dispatches that respect the adapter's
//! workgroups-per-dimension limit. Every shape is validated here before the kernel runs, which is
//! what allows the pipeline to be built without runtime bounds checks. This module must not
//! download data or fall back to the CPU silently; the reference lives in `reference::reduce`.

use super::buffer::{GpuDtype, GpuTensor};
use super::context::{Dispatch, GpuContext};
use crate::error::{Error, Result};
use crate::shaders;

pub use crate::reference::reduce::ReduceOp;

/// Invocations per workgroup in `reduce.wgsl` and `quant_rtn.wgsl` (their `@workgroup_size`).
pub(crate) const WG: usize = 256;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    group: u32,
    n_groups: u32,
    in_off: u32,
    out_off: u32,
    lanes: u32,
    op: u32,
}

fn op_code(op: ReduceOp) -> u32 {
    match op {
        ReduceOp::Min => 0,
        ReduceOp::Max => 1,
        ReduceOp::AbsMax => 2,
        ReduceOp::SumSq => 3,
    }
}

/// Reduces each group of `group` consecutive columns of `x` (the last group of a row may be
/// shorter). Returns a `rows x ceil(cols / group)` f32 tensor.
pub fn reduce_groups(
    ctx: &GpuContext,
    x: &GpuTensor,
    group: usize,
    op: ReduceOp,
) -> Result<GpuTensor> {
    if group == 0 {
        return Err(Error::invalid("reduce: group size must be positive"));
    }
    let out = GpuTensor::empty(ctx, x.rows, x.cols.div_ceil(group), GpuDtype::F32)?;
    reduce_groups_into(ctx, x, group, op, &out, None)?;
    Ok(out)
}

/// One reduction per row: a `rows x 1` f32 tensor.
pub fn reduce_rows(ctx: &GpuContext, x: &GpuTensor, op: ReduceOp) -> Result<GpuTensor> {
    reduce_groups(ctx, x, x.cols.max(1), op)
}

/// [`reduce_groups`] into a caller-allocated `out` (so tests can poison it first), optionally
/// with a workgroups-per-dimension limit below the adapter's (so tests reach the 2-D grid and
/// dispatch splitting with small shapes).
#[doc(hidden)]
pub fn reduce_groups_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    group: usize,
    op: ReduceOp,
    out: &GpuTensor,
    grid_limit: Option<u32>,
) -> Result<()> {
    reduce_impl(ctx, x, None, group, op_code(op), out, grid_limit)
}

/// Σ_c a[r, c]·b[r, c] per row (f32 accumulation, a tree per row): a `rows x 1` f32 tensor. `a`
/// and `b` are f32 of one shape and chunked alike (as any two tensors `empty`/`from_f32` make of
/// one shape are; otherwise an error). Used for traces like tr(Δ H Δᵀ) without downloading the
/// product.
pub fn dot_rows(ctx: &GpuContext, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
    let out = GpuTensor::empty(ctx, a.rows, 1, GpuDtype::F32)?;
    dot_rows_into(ctx, a, b, &out, None)?;
    Ok(out)
}

/// [`dot_rows`] into a caller-allocated `rows x 1` output (see [`reduce_groups_into`]).
#[doc(hidden)]
pub fn dot_rows_into(
    ctx: &GpuContext,
    a: &GpuTensor,
    b: &GpuTensor,
    out: &GpuTensor,
    grid_limit: Option<u32>,
) -> Result<()> {
    if b.rows != a.rows || b.cols != a.cols || b.dtype != GpuDtype::F32 {
        return Err(Error::Shape {
            op: "dot_rows".into(),
            expected: format!("an F32 {}x{} second operand", a.rows, a.cols),
            got: b.shape_str(),
        });
    }
    reduce_impl(ctx, a, Some(b), a.cols.max(1), OP_DOT, out, grid_limit)
}

/// `op` code of the row dot product in `reduce.wgsl`.
const OP_DOT: u32 = 4;

fn reduce_impl(
    ctx: &GpuContext,
    x: &GpuTensor,
    z: Option<&GpuTensor>,
    group: usize,
    op: u32,
    out: &GpuTensor,
    grid_limit: Option<u32>,
) -> Result<()> {
    const KERNEL: &str = "reduce";
    let shape = format!("{} group {group} op {op}", x.shape_str());
    if group == 0 {
        return Err(Error::invalid("reduce: group size must be positive"));
    }
    if x.dtype != GpuDtype::F32 {
        return Err(Error::invalid(format!(
            "reduce: input must be F32, got {}",
            x.shape_str()
        )));
    }
    let n_groups = x.cols.div_ceil(group);
    if out.dtype != GpuDtype::F32 || out.rows != x.rows || out.cols != n_groups {
        return Err(Error::Shape {
            op: KERNEL.into(),
            expected: format!("{}x{n_groups} F32 output", x.rows),
            got: out.shape_str(),
        });
    }
    if x.rows == 0 || n_groups == 0 {
        return Ok(());
    }
    check_workgroup_size(ctx, KERNEL, &shape)?;
    let seg_len = group.min(x.cols);
    let lanes = lanes_for(seg_len);
    let pipeline = ctx.pipeline(KERNEL, shaders::REDUCE, "reduce", true)?;
    let limit = grid_limit
        .unwrap_or(u32::MAX)
        .min(ctx.max_workgroups_per_dim());
    let mut params = Vec::new();
    let mut launches = Vec::new();
    // The other ops bind x as z; the dot product needs z's rows where x has them.
    let z = z.unwrap_or(x);
    for (r0, r1) in GpuTensor::common_row_ranges(&[x, z, out]) {
        let (xi, xr) = x.locate(r0);
        let (zi, zr) = z.locate(r0);
        let (oi, or) = out.locate(r0);
        // x and z are read at one offset (in_off), so their rows must sit alike.
        if zr != xr {
            return Err(Error::gpu(
                KERNEL,
                &shape,
                "the two operands are chunked at different rows",
            ));
        }
        for Launch {
            first: d0,
            rows,
            groups,
        } in plan(r1 - r0, n_groups, WG / lanes, limit)?
        {
            params.push(Params {
                rows: to_u32(rows, KERNEL, &shape)?,
                cols: to_u32(x.cols, KERNEL, &shape)?,
                group: to_u32(seg_len, KERNEL, &shape)?,
                n_groups: to_u32(n_groups, KERNEL, &shape)?,
                in_off: to_u32((xr + d0) * x.cols, KERNEL, &shape)?,
                out_off: to_u32((or + d0) * n_groups, KERNEL, &shape)?,
                lanes: lanes as u32,
                op,
            });
            launches.push((xi, zi, oi, groups));
        }
    }
    let dispatches: Vec<Dispatch> = params
        .iter()
        .zip(&launches)
        .map(|(p, &(xi, zi, oi, groups))| Dispatch {
            buffers: vec![
                &x.chunks[xi].buffer,
                &z.chunks[zi].buffer,
                &out.chunks[oi].buffer,
            ],
            uniform: Some(bytemuck::bytes_of(p)),
            groups,
        })
        .collect();
    ctx.run(KERNEL, &shape, &pipeline, &dispatches)
}

/// Lanes per segment: the smallest power of two covering the segment, at most one workgroup.
pub(crate) fn lanes_for(seg_len: usize) -> usize {
    seg_len.max(1).next_power_of_two().min(WG)
}

/// The kernels are written for 256 invocations (wgpu's default limit); refuse clearly if the
/// device offers fewer rather than failing pipeline creation with a cryptic message.
pub(crate) fn check_workgroup_size(ctx: &GpuContext, kernel: &str, shape: &str) -> Result<()> {
    if (ctx.caps.max_invocations as usize) < WG {
        return Err(Error::gpu(
            kernel,
            shape,
            format!(
                "needs {WG} invocations per workgroup, the device allows {}",
                ctx.caps.max_invocations
            ),
        ));
    }
    Ok(())
}

pub(crate) fn to_u32(v: usize, kernel: &str, shape: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::gpu(kernel, shape, format!("{v} does not fit in 32 bits")))
}

/// Items one dispatch may cover at most: the shaders index items and workgroups in u32, and the
/// 2-D grid may overshoot by up to one row of workgroups (< 65536 * 256 items), so staying at or
/// below 2^31 keeps every index far from overflow.
const MAX_ITEMS_PER_DISPATCH: u64 = 1 << 31;

/// One dispatch of a row range: its first row (relative to the range), row count and grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Launch {
    pub first: usize,
    pub rows: usize,
    pub groups: (u32, u32, u32),
}

/// Splits `rows` rows of `per_row` work items (segments, words, elements) into dispatches of a
/// 2-D grid of workgroups handling `per_wg` items each, with at most `limit` workgroups per
/// dimension.
pub(crate) fn plan(rows: usize, per_row: usize, per_wg: usize, limit: u32) -> Result<Vec<Launch>> {
    let limit = limit.max(1) as u64;
    let (per_row, per_wg) = (per_row.max(1) as u64, per_wg.max(1) as u64);
    let max_items = (limit * limit * per_wg).min(MAX_ITEMS_PER_DISPATCH);
    let rows_per = (max_items / per_row) as usize;
    if rows_per == 0 {
        return Err(Error::gpu(
            "dispatch",
            format!("{per_row} items per row"),
            format!("one row needs more than {limit}x{limit} workgroups"),
        ));
    }
    let mut out = Vec::new();
    let mut r = 0;
    while r < rows {
        let n = rows_per.min(rows - r);
        let wgs = (n as u64 * per_row).div_ceil(per_wg);
        let gx = wgs.min(limit);
        let gy = wgs.div_ceil(gx);
        out.push(Launch {
            first: r,
            rows: n,
            groups: (gx as u32, gy as u32, 1),
        });
        r += n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_cover_all_rows_within_the_limit() {
        let p = plan(1000, 3, 16, 7).unwrap();
        assert_eq!(p.iter().map(|d| d.rows).sum::<usize>(), 1000);
        let mut next = 0;
        for d in &p {
            let (gx, gy, _) = d.groups;
            assert!(gx <= 7 && gy <= 7);
            assert!((gx * gy) as usize * 16 >= d.rows * 3);
            assert_eq!(d.first, next);
            next += d.rows;
        }
        assert!(p.len() > 1);
        let one = Launch {
            first: 0,
            rows: 5,
            groups: (1, 1, 1),
        };
        assert_eq!(plan(5, 10, 256, 65535).unwrap(), vec![one]);
        assert!(plan(2, 100, 1, 3).is_err());
        assert_eq!(lanes_for(29), 32);
        assert_eq!(lanes_for(1000), 256);
        assert_eq!(lanes_for(1), 1);
    }
}
