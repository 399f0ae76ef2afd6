//! Dense linear algebra on the GPU for the second-order methods (GPTQ, SparseGPT, activation-aware
//! SVD): blocked Cholesky factorization, in-place inverse of the triangular factor, and the index
//! reversal J·M·J. Matrices are n x n f32 in one storage binding with n a multiple of [`NB`] (callers
//! pad with identity rows, which leaves the factors of the original block unchanged).
//!
//! Cholesky (right-looking, blocks of 64): per block column, `potrf_diag` factors the diagonal
//! block in workgroup memory and inverts it; the panel below becomes L21 = A21·inv(L11)ᵀ and the
//! trailing matrix A22 -= L21·L21ᵀ (lower tiles only), both through the matmul kernel on regions
//! of the same buffer; the trailing updates are gathered per [`CHOLESKY_SPAN`] columns (K = 64
//! inside a span, K = span at its end). Inverse (in place, bottom-up over a balanced tree of block
//! ranges): for [lo, mid, hi), X21 = -inv(C)·(B·inv(A)), where inv(A) and inv(C) were formed
//! lower in the tree; both products skip the zero triangles of inv(A) and inv(C) (each tile sums
//! only its nonzero K range), and the equal merges of a tree level run as one batched product
//! each. Every step of a call is recorded into one submission. The CPU reference is
//! `reference::linalg`. This module must not read matrices back to the host except the one-word
//! failure flag.

use super::buffer::{GpuDtype, GpuTensor};
use super::context::{Dispatch, GpuContext};
use super::matmul::{Batch, GemmStep, Region, RegionGemm, run_gemm_steps};
use crate::error::{Error, Result};
use crate::shaders;

/// Block size of the blocked algorithms; matrix orders must be multiples of it.
pub const NB: usize = 64;

/// Workgroup memory of `potrf_diag`: the block (NB rows of NB + 1 floats) and three 32 x 32
/// quadrants of its inverse (rows of 33 floats).
const POTRF_WORKGROUP_BYTES: usize = (NB * (NB + 1) + 3 * 32 * 33) * 4;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    ld: u32,
    k0: u32,
    pad: u32,
}

/// What a factorization left behind for [`invert_factor`].
pub struct Cholesky {
    /// Inverses of the diagonal blocks of L, (n / 64) blocks of 64 x 64 stacked as n x 64.
    dinv: GpuTensor,
    /// Whether every pivot was positive and finite (the factor is garbage otherwise).
    pub ok: bool,
}

fn check_square(ctx: &GpuContext, m: &GpuTensor, op: &str) -> Result<usize> {
    let n = m.rows;
    if m.cols != n || n == 0 || !n.is_multiple_of(NB) || m.dtype != GpuDtype::F32 {
        return Err(Error::Shape {
            op: op.into(),
            expected: format!("a square f32 matrix whose order is a positive multiple of {NB}"),
            got: m.shape_str(),
        });
    }
    if m.chunks.len() != 1 {
        return Err(Error::gpu(
            op,
            m.shape_str(),
            format!(
                "the {n} x {n} matrix ({} MiB) must fit one storage binding of this adapter ({} MiB)",
                (n * n * 4) >> 20,
                ctx.binding_limit() >> 20
            ),
        ));
    }
    if (n * n) > u32::MAX as usize {
        return Err(Error::gpu(
            op,
            m.shape_str(),
            "matrix too large for 32-bit indices",
        ));
    }
    if (ctx.caps.max_workgroup_storage as usize) < POTRF_WORKGROUP_BYTES {
        return Err(Error::gpu(
            op,
            m.shape_str(),
            format!(
                "the adapter offers {} bytes of workgroup memory; the 64 x 64 diagonal blocks and their inverses need {POTRF_WORKGROUP_BYTES}",
                ctx.caps.max_workgroup_storage
            ),
        ));
    }
    Ok(n)
}

fn region(t: &GpuTensor, off: usize, ld: usize) -> Region<'_> {
    Region {
        buf: &t.chunks[0].buffer,
        len: t.rows * t.cols,
        off,
        ld,
    }
}

/// A flat grid of `n` workgroups folded under the per-dimension limit.
fn grid(ctx: &GpuContext, n: usize) -> (u32, u32, u32) {
    let max = ctx.max_workgroups_per_dim() as usize;
    let n = n.max(1);
    (n.min(max) as u32, n.div_ceil(max) as u32, 1)
}

fn elementwise(
    ctx: &GpuContext,
    entry: &str,
    buffers: Vec<&wgpu::Buffer>,
    n: usize,
    items: usize,
) -> Result<()> {
    let pipe = ctx.pipeline("linalg", shaders::LINALG, entry, false)?;
    let p = Params {
        n: n as u32,
        ld: n as u32,
        k0: 0,
        pad: 0,
    };
    ctx.run(
        entry,
        &format!("{n}x{n}"),
        &pipe,
        &[Dispatch {
            buffers,
            uniform: Some(bytemuck::bytes_of(&p)),
            groups: grid(ctx, items.div_ceil(256)),
        }],
    )
}

/// Columns whose trailing updates are gathered: each 64-column block updates only the rest of its
/// span (K = 64), and at a span's end one product with K = span updates the whole trailing
/// matrix. The FLOPs are the same, but most of them run at K = 512, where the matmul kernel is
/// compute bound instead of re-reading and re-writing the trailing matrix for every block.
pub const CHOLESKY_SPAN: usize = 512;

/// Replaces the SPD matrix `m` by its lower Cholesky factor L (m = L·Lᵀ), upper triangle zeroed.
/// A failed factorization (a pivot that is not positive and finite) is reported in
/// [`Cholesky::ok`], not as an error, so callers can retry with more damping.
pub fn cholesky(ctx: &GpuContext, m: &GpuTensor) -> Result<Cholesky> {
    cholesky_with_span(ctx, m, CHOLESKY_SPAN)
}

/// [`cholesky`] with another [`CHOLESKY_SPAN`] (rounded up to whole blocks); tests lower it to
/// cover several spans on small matrices.
#[doc(hidden)]
pub fn cholesky_with_span(ctx: &GpuContext, m: &GpuTensor, span: usize) -> Result<Cholesky> {
    let n = check_square(ctx, m, "cholesky")?;
    let span = span.max(1).div_ceil(NB) * NB;
    let shape = format!("{n}x{n}");
    let dinv = GpuTensor::empty(ctx, n, NB, GpuDtype::F32)?;
    let flag = GpuTensor::empty(ctx, 1, 1, GpuDtype::U32)?;
    flag.fill_u32(ctx, 0);
    // Built trusted (no runtime bounds checks): about half the time per 64 x 64 block on an H200
    // (81-86 -> 47 µs on a warm machine, 199 -> 96 µs on a cold one; BENCHMARKS.md, session 15),
    // and these blocks are the serial part of every factorization. Every index is in range by
    // construction: `check_square` makes n a multiple of NB that fits one binding and 32-bit
    // indices, so block k0 (< n, a multiple of NB) lies inside M; `dinv` is n x NB, so block
    // k0 / NB's NB² values lie inside it; `flag` has its one word; the workgroup arrays are
    // indexed by rows and columns below NB (`blk`) and below 32 within a quadrant (`xin`).
    // tests/gpu_linalg.rs runs the checked and the trusted builds against the reference.
    let potrf = ctx.pipeline("linalg", shaders::LINALG, "potrf_diag", true)?;
    let mut params = Vec::new();
    let mut gemms: Vec<Vec<GemmStep>> = Vec::new();
    for k0 in (0..n).step_by(NB) {
        params.push(Params {
            n: n as u32,
            ld: n as u32,
            k0: k0 as u32,
            pad: 0,
        });
        let rest = n - k0 - NB;
        let mut g = Vec::new();
        if rest > 0 {
            let panel = region(m, (k0 + NB) * n + k0, n);
            // In place: the panel product has N = 64 columns, one tile wide, so each workgroup
            // reads all of its rows of A21 before it writes them.
            g.push(
                RegionGemm {
                    a: panel,
                    b: region(&dinv, k0 * NB, NB),
                    c: panel,
                    m: rest,
                    n: NB,
                    k: NB,
                    b_trans: true,
                    alpha: 1.0,
                    accumulate: false,
                    lower: false,
                    a_lower_tri: false,
                    b_lower_tri: false,
                    batch: Batch::ONE,
                    split: None,
                }
                .prepare(ctx, true)?,
            );
            // Near update: the rest of this span's columns, every row below (K = 64). Far
            // update at the span's end: the whole trailing matrix from the span's columns.
            let (s0, s1) = (k0 - k0 % span, (k0 - k0 % span + span).min(n));
            let near = (k0 + NB < s1).then(|| (panel, NB, s1 - k0 - NB));
            let far = (k0 + NB == s1).then(|| (region(m, s1 * n + s0, n), s1 - s0, rest));
            for (a, k, cols) in near.into_iter().chain(far) {
                g.push(
                    RegionGemm {
                        a,
                        b: a,
                        c: region(m, (k0 + NB) * (n + 1), n),
                        m: rest,
                        n: cols,
                        k,
                        b_trans: true,
                        alpha: -1.0,
                        accumulate: true,
                        lower: true,
                        a_lower_tri: false,
                        b_lower_tri: false,
                        batch: Batch::ONE,
                        split: None,
                    }
                    .prepare(ctx, true)?,
                );
            }
        }
        gemms.push(g);
    }
    let mut dispatches: Vec<(&wgpu::ComputePipeline, Dispatch)> = Vec::new();
    for (p, g) in params.iter().zip(&gemms) {
        dispatches.push((
            &potrf,
            Dispatch {
                buffers: vec![
                    &m.chunks[0].buffer,
                    &dinv.chunks[0].buffer,
                    &flag.chunks[0].buffer,
                ],
                uniform: Some(bytemuck::bytes_of(p)),
                groups: (1, 1, 1),
            },
        ));
        for s in g {
            dispatches.push((&s.pipeline, s.dispatch()));
        }
    }
    let steps: Vec<(&wgpu::ComputePipeline, &Dispatch)> =
        dispatches.iter().map(|(p, d)| (*p, d)).collect();
    ctx.run_steps("cholesky", &shape, &steps)?;
    elementwise(ctx, "zero_upper", vec![&m.chunks[0].buffer], n, n * n)?;
    let ok = flag.to_u32(ctx)?[0] == 0;
    Ok(Cholesky { dinv, ok })
}

/// Replaces the lower factor L left by [`cholesky`] with inv(L) (lower triangular).
pub fn invert_factor(ctx: &GpuContext, m: &GpuTensor, chol: Cholesky) -> Result<()> {
    let n = check_square(ctx, m, "invert_factor")?;
    if !chol.ok {
        return Err(Error::gpu(
            "invert_factor",
            m.shape_str(),
            "the Cholesky factorization failed; there is no factor to invert",
        ));
    }
    if chol.dinv.rows != n {
        return Err(Error::gpu(
            "invert_factor",
            m.shape_str(),
            "the factorization belongs to a matrix of another order",
        ));
    }
    let pipe = ctx.pipeline("linalg", shaders::LINALG, "set_diag", false)?;
    let p = Params {
        n: n as u32,
        ld: n as u32,
        k0: 0,
        pad: 0,
    };
    ctx.run(
        "set_diag",
        &format!("{n}x{n}"),
        &pipe,
        &[Dispatch {
            buffers: vec![&m.chunks[0].buffer, &chol.dinv.chunks[0].buffer],
            uniform: Some(bytemuck::bytes_of(&p)),
            groups: grid(ctx, (n * NB).div_ceil(256)),
        }],
    )?;
    drop(chol);
    // Merges (height, lo, mid, hi) in element units; a merge only needs merges of lower height.
    fn build(lo: usize, hi: usize, out: &mut Vec<(usize, usize, usize, usize)>) -> usize {
        if hi - lo <= 1 {
            return 0;
        }
        let mid = lo + (hi - lo) / 2;
        let h = 1 + build(lo, mid, out).max(build(mid, hi, out));
        out.push((h, lo * NB, mid * NB, hi * NB));
        h
    }
    let mut merges = Vec::new();
    build(0, n / NB, &mut merges);
    if merges.is_empty() {
        return Ok(());
    }
    merges.sort_by_key(|m| (m.0, m.1));
    // Scratch for the products B·inv(A): merges of one height get disjoint slices.
    let mut offsets = Vec::with_capacity(merges.len());
    let mut scratch_len = 0;
    let mut level = (0, 0);
    for &(h, lo, mid, hi) in &merges {
        if h != level.0 {
            level = (h, 0);
        }
        offsets.push(level.1);
        level.1 += (hi - mid) * (mid - lo);
        scratch_len = scratch_len.max(level.1);
    }
    let scratch = GpuTensor::empty(ctx, 1, scratch_len, GpuDtype::F32)?;
    if scratch.chunks.len() != 1 {
        return Err(Error::gpu(
            "invert_factor",
            m.shape_str(),
            "scratch space exceeds one storage binding",
        ));
    }
    // Runs of merges of one height with equal halves at a constant step run as one batched
    // product each (their ranges are disjoint, so they are independent): a balanced tree's level
    // is then two dispatches, where a dispatch per merge left the lower levels' small products
    // waiting on launch gaps. Run = (first merge, count, step in elements).
    let mut runs: Vec<(usize, usize, usize)> = Vec::new();
    for (i, &(h, lo, mid, hi)) in merges.iter().enumerate() {
        if let Some(r) = runs.last_mut() {
            let (h0, lo0, mid0, hi0) = merges[r.0];
            let (_, prev_lo, _, _) = merges[r.0 + r.1 - 1];
            let same = h == h0 && mid - lo == mid0 - lo0 && hi - mid == hi0 - mid0;
            if same && (r.1 == 1 || lo - prev_lo == r.2) {
                r.2 = lo - prev_lo;
                r.1 += 1;
                continue;
            }
        }
        runs.push((i, 1, 0));
    }
    let mut steps = Vec::with_capacity(2 * runs.len());
    for &(i, count, step) in &runs {
        let (_, lo, mid, hi) = merges[i];
        let (rows, cols) = (hi - mid, mid - lo);
        let t = Region {
            buf: &scratch.chunks[0].buffer,
            len: scratch_len,
            off: offsets[i],
            ld: cols,
        };
        // The next merge of the run sits `step` rows down and `step` columns right in M, and
        // one slice further in the scratch.
        let (in_m, in_t) = (step * (n + 1), rows * cols);
        let batch = |a_stride, b_stride, c_stride| Batch {
            count,
            a_stride,
            b_stride,
            c_stride,
        };
        steps.push(
            RegionGemm {
                a: region(m, mid * n + lo, n),
                b: region(m, lo * n + lo, n),
                c: t,
                m: rows,
                n: cols,
                k: cols,
                b_trans: false,
                alpha: 1.0,
                accumulate: false,
                lower: false,
                // inv(A), formed lower in the tree, is lower triangular (and so is inv(C) below).
                a_lower_tri: false,
                b_lower_tri: true,
                batch: batch(in_m, in_m, in_t),
                split: None,
            }
            .prepare(ctx, false)?,
        );
        steps.push(
            RegionGemm {
                a: region(m, mid * n + mid, n),
                b: t,
                c: region(m, mid * n + lo, n),
                m: rows,
                n: cols,
                k: rows,
                b_trans: false,
                alpha: -1.0,
                accumulate: false,
                lower: false,
                a_lower_tri: true,
                b_lower_tri: false,
                batch: batch(in_m, in_t, in_m),
                split: None,
            }
            .prepare(ctx, true)?,
        );
    }
    run_gemm_steps(ctx, "invert_factor", &format!("{n}x{n}"), &steps)
}

/// M <- J·M·J (both index orders reversed). With M = inv(L) for L the lower Cholesky factor of
/// J·A·J, this gives the upper Cholesky factor U of inv(A) (inv(A) = UᵀU), which is what GPTQ
/// needs, from one factorization and one triangular inverse.
pub fn flip(ctx: &GpuContext, m: &GpuTensor) -> Result<()> {
    let n = check_square(ctx, m, "flip")?;
    elementwise(ctx, "flip", vec![&m.chunks[0].buffer], n, n * n / 2)
}
