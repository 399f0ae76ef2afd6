//! GPU RTN quantization against the CPU reference (`reference::quant::rtn`, i.e. `QuantSpec::fit`
//! and `QuantSpec::quantize` themselves).
//!
//! Bounds: the kernel decides both rounding boundaries exactly (the f16 rounding of the scale
//! quotient and round-half-even of w / scale, see shaders/quant_rtn.wgsl), so scales, zeros, q and
//! the dequantized weights must be bit-equal to the reference everywhere: the allowed number of
//! mismatches, at boundaries or elsewhere, is 0. A kernel relying on WGSL's division (2.5 ulp)
//! would instead miss some of the scales whose quotient lies within 2.5 ulp of an f16 midpoint and
//! some q whose w / scale lies within ~3 ulp of a half-integer; the tie-heavy test below builds
//! exactly such inputs and also shifts every GPU quotient by up to 3 ulps (`div_skew_ulps`) so
//! the exact decisions are exercised on adapters whose division is already correctly rounded.
mod common;

use half::f16;
use wgpress::gpu::quant::{
    GpuGrid, Hooks, dequantize_into, download, fit_grid_into, quantize_packed_into, rtn,
    rtn_dequant,
};
use wgpress::gpu::{GpuContext, GpuDtype, GpuTensor};
use wgpress::quant::{QuantSpec, QuantizedTensor};
use wgpress::reference::quant as reference;
use wgpress::rng::Rng;

/// Runs fit + quantize + dequant into poisoned buffers and returns the quantized tensor and the
/// dequantized weights.
fn gpu_rtn(
    ctx: &GpuContext,
    rows: usize,
    cols: usize,
    data: &[f32],
    spec: &QuantSpec,
    hooks: Hooks,
) -> (QuantizedTensor, Vec<f32>) {
    let w = GpuTensor::from_f32(ctx, rows, cols, data).unwrap();
    let grid = GpuGrid::empty(ctx, rows, cols, spec).unwrap();
    grid.scales.fill_u32(ctx, common::POISON);
    grid.zeros.fill_u32(ctx, common::POISON);
    fit_grid_into(ctx, &w, spec, &grid, hooks).unwrap();
    let packed = GpuTensor::empty(ctx, rows, cols.div_ceil(4), GpuDtype::U32).unwrap();
    packed.fill_u32(ctx, common::POISON);
    quantize_packed_into(ctx, &w, spec, &grid, &packed, hooks).unwrap();
    // Padding bytes past the last column of a row are written as 0 (no stale data leaks out).
    let words = packed.to_u32(ctx).unwrap();
    if !cols.is_multiple_of(4) {
        let wpr = cols.div_ceil(4);
        for r in 0..rows {
            let last = words[r * wpr + wpr - 1];
            assert_eq!(
                last >> (8 * (cols % 4)),
                0,
                "row {r}: padding bytes not zero"
            );
        }
    }
    let q = download(ctx, rows, cols, spec, &grid, &packed).unwrap();
    let deq = GpuTensor::empty(ctx, rows, cols, GpuDtype::F32).unwrap();
    deq.fill_u32(ctx, common::POISON);
    dequantize_into(ctx, &w, spec, &grid, &deq, hooks).unwrap();
    (q, deq.to_f32(ctx).unwrap())
}

/// Elements whose w / scale (in f64, with the reference scale) is within 1e-5 of a half-integer.
fn near_ties(t: &QuantizedTensor, data: &[f32]) -> usize {
    (0..t.rows * t.cols)
        .filter(|&i| {
            let s = t.params(i / t.cols, t.g_idx[i % t.cols] as usize).scale as f64;
            let x = data[i] as f64 / s;
            ((x - x.floor()) - 0.5).abs() < 1e-5
        })
        .count()
}

/// Compares GPU and reference; returns the number of near-ties in the data. Every mismatch
/// count is bounded by 0 (see the module comment).
fn check(
    ctx: &GpuContext,
    rows: usize,
    cols: usize,
    data: &[f32],
    spec: QuantSpec,
    hooks: Hooks,
) -> usize {
    let what = format!("{rows}x{cols} {spec:?} {hooks:?}");
    let want = reference::rtn(data, rows, cols, &spec).unwrap();
    let (got, deq) = gpu_rtn(ctx, rows, cols, data, &spec, hooks);
    assert_eq!((got.rows, got.cols, got.spec), (rows, cols, spec), "{what}");
    assert_eq!(got.g_idx, want.g_idx, "{what}: g_idx");
    assert!(
        got.scales
            .iter()
            .all(|s| s.is_finite() && *s > 0.0 && f16::from_f32(*s).to_f32() == *s),
        "{what}: a scale is unwritten, non-positive or not an f16"
    );
    let scale_mismatch = (got.scales.iter().zip(&want.scales))
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    let zero_mismatch = (got.zeros.iter().zip(&want.zeros))
        .filter(|(a, b)| a != b)
        .count();
    let q_mismatch = (got.q.iter().zip(&want.q)).filter(|(a, b)| a != b).count();
    assert_eq!(
        scale_mismatch,
        0,
        "{what}: scales differ ({scale_mismatch} of {})",
        want.scales.len()
    );
    assert_eq!(zero_mismatch, 0, "{what}: zeros differ ({zero_mismatch})");
    assert_eq!(
        q_mismatch,
        0,
        "{what}: q differs ({q_mismatch}, near-ties {})",
        near_ties(&want, data)
    );
    let want_deq = want.dequantize();
    let deq_mismatch = (deq.iter().zip(&want_deq))
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(
        deq_mismatch, 0,
        "{what}: dequantized weights differ ({deq_mismatch})"
    );
    near_ties(&want, data)
}

#[test]
fn rtn_matches_the_reference_for_every_bits_symmetry_and_group() {
    let ctx = common::ctx();
    let mut rng = Rng::new(21);
    let cases: &[(usize, usize, &[Option<usize>])] = &[
        (37, 203, &[Some(29), Some(7), None]),
        (6, 384, &[Some(32), Some(64), Some(128), None]),
        (129, 96, &[Some(32), Some(3), None]),
        (5, 1000, &[Some(40), Some(125), None]),
    ];
    for &(rows, cols, groups) in cases {
        let data = rng.normal_vec(rows * cols, 0.02);
        for &group in groups {
            for bits in [2, 3, 4, 5, 8] {
                for sym in [false, true] {
                    let spec = QuantSpec::new(bits, group, sym).unwrap();
                    check(&ctx, rows, cols, &data, spec, Hooks::default());
                }
            }
        }
    }
}

/// Rows built to sit on rounding boundaries: scales that are exact f16 values or exact f16
/// midpoints (and one ulp either side), zeros at half-integers, and weights at (k + 0.5) * scale
/// (and one ulp either side).
fn tie_heavy(rng: &mut Rng, rows: usize, cols: usize, spec: &QuantSpec) -> Vec<f32> {
    let g = spec.group_size(cols);
    let maxq = spec.maxq() as f64;
    let nudge = |v: f32, r: u64| match r {
        0 => f32::from_bits(v.to_bits() + 1),
        1 if v != 0.0 => f32::from_bits(v.to_bits() - 1),
        _ => v,
    };
    let mut data = Vec::with_capacity(rows * cols);
    for _ in 0..rows * cols / g {
        let s0 =
            f16::from_f32((2f64.powi(-(rng.below(8) as i32) - 2) * (1.0 + rng.uniform())) as f32);
        let ulp16 = f16::from_bits(s0.to_bits() + 1).to_f64() - s0.to_f64();
        // The exact quotient the fit will see: an f16 value or an f16 midpoint.
        let base = s0.to_f64() + if rng.below(2) == 0 { 0.0 } else { ulp16 / 2.0 };
        let scale = f16::from_f64(base).to_f64();
        let (lo, hi) = if spec.sym {
            let amax = (base * maxq / 2.0) as f32;
            let amax = nudge(amax, rng.below(4)) as f64;
            (-amax, amax)
        } else {
            let j = rng.below(spec.maxq() as u64) as f64 + 0.5 * rng.below(2) as f64;
            (-j * base, (maxq - j) * base)
        };
        let mut grp = vec![lo as f32, hi as f32];
        while grp.len() < g {
            let k = (lo / scale).ceil() + rng.below(((hi - lo) / scale) as u64) as f64;
            let v = ((k + 0.5) * scale).clamp(lo, hi) as f32;
            grp.push(nudge(v, rng.below(5)));
        }
        // Shuffle so the extremes are not always at the start of the group.
        for i in (1..g).rev() {
            grp.swap(i, rng.below(i as u64 + 1) as usize);
        }
        data.extend_from_slice(&grp);
    }
    data
}

#[test]
fn exact_at_rounding_boundaries_even_with_an_inexact_division() {
    let ctx = common::ctx();
    let mut rng = Rng::new(22);
    let (rows, cols) = (24, 96);
    for bits in [2, 4, 5, 8] {
        for sym in [false, true] {
            for group in [Some(32), Some(12), None] {
                let spec = QuantSpec::new(bits, group, sym).unwrap();
                let data = tie_heavy(&mut rng, rows, cols, &spec);
                for skew in [0, -3, -1, 2, 3] {
                    let hooks = Hooks {
                        div_skew_ulps: skew,
                        ..Hooks::default()
                    };
                    let ties = check(&ctx, rows, cols, &data, spec, hooks);
                    // The data really is on the boundaries (about 3/5 of the non-extreme weights).
                    assert!(ties * 5 > rows * cols, "{spec:?}: only {ties} near-ties");
                }
            }
        }
    }
}

#[test]
fn chunked_tensors_and_split_grids_match() {
    // 1 KiB binding limit: weights (812-byte rows) get one row per chunk, scales/zeros (7 groups,
    // 28-byte rows) 36 rows per chunk, packed q (51 words) 5 rows per chunk. A grid limit of 2
    // forces 2-D grids and several dispatches per row range.
    let ctx = common::ctx_with(Some(1024));
    let mut rng = Rng::new(23);
    let (rows, cols) = (45, 203);
    let data = rng.normal_vec(rows * cols, 1.0);
    let w = GpuTensor::from_f32(&ctx, rows, cols, &data).unwrap();
    assert_eq!(w.chunks.len(), rows);
    for (bits, sym, group) in [
        (3, false, Some(29)),
        (4, true, Some(29)),
        (8, false, None),
        (2, true, Some(7)),
    ] {
        let spec = QuantSpec::new(bits, group, sym).unwrap();
        check(
            &ctx,
            rows,
            cols,
            &data,
            spec,
            Hooks {
                grid_limit: Some(2),
                ..Hooks::default()
            },
        );
        check(&ctx, rows, cols, &data, spec, Hooks::default());
    }
    // The public one-call entry points agree with the staged ones on chunked tensors.
    let spec = QuantSpec::new(4, Some(29), false).unwrap();
    assert_eq!(
        rtn(&ctx, &w, &spec).unwrap(),
        reference::rtn(&data, rows, cols, &spec).unwrap()
    );
    let deq = rtn_dequant(&ctx, &w, &spec).unwrap().to_f32(&ctx).unwrap();
    assert_eq!(
        deq,
        reference::rtn(&data, rows, cols, &spec)
            .unwrap()
            .dequantize()
    );
}

#[test]
fn degenerate_rows_give_finite_scales() {
    let ctx = common::ctx();
    let cols = 64;
    let mut data = vec![0.0f32; 6 * cols]; // row 0: all zero
    data[cols..2 * cols].fill(0.75); // all equal, positive
    data[2 * cols..3 * cols].fill(-2.5); // all equal, negative
    data[3 * cols + 5] = 1e-3; // one non-zero
    data[4 * cols..5 * cols].fill(1e5); // beyond the f16 range: scale clamps to 65504
    data[5 * cols..6 * cols].fill(1e-9); // tiny: scale clamps to 2^-14
    for bits in [2, 4, 8] {
        for sym in [false, true] {
            for group in [Some(16), None] {
                let spec = QuantSpec::new(bits, group, sym).unwrap();
                check(&ctx, 6, cols, &data, spec, Hooks::default());
            }
        }
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    let ctx = common::ctx();
    let mut rng = Rng::new(24);
    let w = GpuTensor::from_f32(&ctx, 3, 100, &rng.normal_vec(300, 1.0)).unwrap();
    let e = rtn(&ctx, &w, &QuantSpec::new(4, Some(32), false).unwrap())
        .err()
        .unwrap();
    assert!(e.to_string().contains("does not divide"), "{e}");
    for bits in [1, 9] {
        let e = rtn(
            &ctx,
            &w,
            &QuantSpec {
                bits,
                group: None,
                sym: true,
            },
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("bits must be in 2..=8"), "{e}");
    }
    let e = rtn(
        &ctx,
        &w,
        &QuantSpec {
            bits: 4,
            group: Some(0),
            sym: true,
        },
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("group size must be positive"), "{e}");
    let u = GpuTensor::from_bytes(&ctx, 3, 100, GpuDtype::U32, &[0u8; 1200]).unwrap();
    let e = rtn_dequant(&ctx, &u, &QuantSpec::new(4, None, false).unwrap())
        .err()
        .unwrap();
    assert!(e.to_string().contains("must be F32"), "{e}");
    let spec = QuantSpec::new(4, Some(25), false).unwrap();
    let wrong = GpuGrid::empty(&ctx, 3, 100, &QuantSpec::new(4, Some(50), false).unwrap()).unwrap();
    let e = fit_grid_into(&ctx, &w, &spec, &wrong, Hooks::default())
        .err()
        .unwrap();
    assert!(e.to_string().contains("shape mismatch"), "{e}");
    assert!(
        reference::rtn(
            &[0.0; 300],
            3,
            100,
            &QuantSpec::new(4, Some(32), false).unwrap()
        )
        .is_err()
    );
}

/// Packs row-major u8 integers four per u32 (byte j of word k = column 4k + j, rows padded).
fn pack(q: &[u8], rows: usize, cols: usize) -> Vec<u32> {
    let words = cols.div_ceil(4);
    let mut out = vec![0u32; rows * words];
    for r in 0..rows {
        for c in 0..cols {
            out[r * words + c / 4] |= (q[r * cols + c] as u32) << (8 * (c % 4));
        }
    }
    out
}

/// Stored integers with an act-order column -> group map dequantize on the GPU exactly as
/// `QuantizedTensor::dequantize` (and the element-wise reference) does on the host: every value
/// is one f32 product of two exact operands, so the allowed mismatch is 0 bits. The output is
/// poisoned first, the binding limit cuts packed q, grid and output at different rows, a grid
/// limit splits dispatches, and a row offset writes the middle of a larger output (as GPTQ does
/// per row chunk) without touching the rows around it.
#[test]
fn dequantize_packed_with_act_order_equals_the_host() {
    use wgpress::gpu::quant::{dequantize_packed, dequantize_packed_into};
    let ctx = common::ctx_with(Some(1024));
    let mut rng = Rng::new(31);
    let (rows, cols) = (37, 174);
    for (bits, group, sym, act) in [
        (4, Some(29), false, true),
        (3, Some(58), true, true),
        (8, None, false, false),
        (2, Some(6), false, true),
    ] {
        let spec = QuantSpec::new(bits, group, sym).unwrap();
        let what = format!("{spec:?} act {act}");
        let t = common::random_quantized(&mut rng, rows, cols, spec, act);
        let want = t.dequantize();
        let words = pack(&t.q, rows, cols);
        let packed = GpuTensor::from_bytes(
            &ctx,
            rows,
            cols.div_ceil(4),
            GpuDtype::U32,
            bytemuck::cast_slice(&words),
        )
        .unwrap();
        let grid = GpuGrid {
            scales: GpuTensor::from_f32(&ctx, rows, t.n_groups(), &t.scales).unwrap(),
            zeros: GpuTensor::from_bytes(
                &ctx,
                rows,
                t.n_groups(),
                GpuDtype::U32,
                bytemuck::cast_slice(&t.zeros),
            )
            .unwrap(),
        };
        // 1 KiB: packed q 5 rows a chunk, the output 1, the grid 8 to all rows by group size.
        assert!(packed.chunks.len() > 1, "{what}");
        let r = reference::dequantize_packed(&words, rows, &t.scales, &t.zeros, &t.g_idx, &spec)
            .unwrap();
        let bits_of = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits_of(&r), bits_of(&want), "{what}: reference");
        // Into rows 5..5 + rows of a poisoned (rows + 9)-row output.
        let out = GpuTensor::empty(&ctx, rows + 9, cols, GpuDtype::F32).unwrap();
        assert!(out.chunks.len() > 1);
        out.fill_u32(&ctx, common::POISON);
        let hooks = Hooks {
            grid_limit: Some(2),
            ..Hooks::default()
        };
        dequantize_packed_into(&ctx, &packed, &grid, &t.g_idx, &spec, &out, 5, hooks).unwrap();
        let got = out.to_f32(&ctx).unwrap();
        assert!(
            got[..5 * cols]
                .iter()
                .chain(&got[(rows + 5) * cols..])
                .all(|v| v.to_bits() == common::POISON),
            "{what}: rows outside the target range were written"
        );
        assert_eq!(
            bits_of(&got[5 * cols..(rows + 5) * cols]),
            bits_of(&want),
            "{what}: offset output"
        );
        let got = dequantize_packed(&ctx, &packed, &grid, &t.g_idx, &spec)
            .unwrap()
            .to_f32(&ctx)
            .unwrap();
        assert_eq!(bits_of(&got), bits_of(&want), "{what}");
    }
    // A g_idx entry past the last group, and an output too short for the offset, are refused.
    let spec = QuantSpec::new(4, Some(29), false).unwrap();
    let t = common::random_quantized(&mut rng, 3, cols, spec, true);
    let packed = GpuTensor::from_bytes(
        &ctx,
        3,
        cols.div_ceil(4),
        GpuDtype::U32,
        bytemuck::cast_slice(&pack(&t.q, 3, cols)),
    )
    .unwrap();
    let grid = GpuGrid {
        scales: GpuTensor::from_f32(&ctx, 3, t.n_groups(), &t.scales).unwrap(),
        zeros: GpuTensor::from_bytes(
            &ctx,
            3,
            t.n_groups(),
            GpuDtype::U32,
            bytemuck::cast_slice(&t.zeros),
        )
        .unwrap(),
    };
    let mut bad = t.g_idx.clone();
    bad[17] = t.n_groups() as u32;
    let e = dequantize_packed(&ctx, &packed, &grid, &bad, &spec)
        .err()
        .unwrap();
    assert!(e.to_string().contains("g_idx[17]"), "{e}");
    let out = GpuTensor::empty(&ctx, 4, cols, GpuDtype::F32).unwrap();
    let e = dequantize_packed_into(
        &ctx,
        &packed,
        &grid,
        &t.g_idx,
        &spec,
        &out,
        2,
        Hooks::default(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("rows 2..5"), "{e}");
}
