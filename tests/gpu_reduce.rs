//! GPU row/group reductions against the f64 CPU reference.
mod common;

use wgpress::gpu::reduce::{
    ReduceOp, dot_rows, dot_rows_into, reduce_groups, reduce_groups_into, reduce_rows,
};
use wgpress::gpu::{GpuContext, GpuDtype, GpuTensor};
use wgpress::reference::reduce as reference;
use wgpress::rng::Rng;

/// Relative tolerance of the GPU sum of squares against the f64 reference. Every term is >= 0, so
/// the relative error of an f32 sum is bounded by (number of sequential roundings) * u, u = 2^-24:
/// one rounding per square, ceil(len / lanes) per lane's strided partial sum (at most
/// ceil(len / 256) + 1), and ceil(log2 len) levels of the tree (lanes <= next power of two).
/// A factor of 2 covers the first-order bound's higher-order terms with room to spare.
fn sumsq_tol(len: usize) -> f64 {
    let u = 2f64.powi(-24);
    let steps = 1.0 + (len.div_ceil(256) + 1) as f64 + (len as f64).log2().ceil();
    2.0 * steps * u
}

/// Runs one reduction into a poisoned output and compares with the reference: min, max and
/// max |x| must be bit-exact (they only select elements); the sum of squares within `sumsq_tol`.
fn check(
    ctx: &GpuContext,
    x: &GpuTensor,
    data: &[f32],
    group: usize,
    op: ReduceOp,
    limit: Option<u32>,
) {
    let ng = x.cols.div_ceil(group);
    let out = GpuTensor::empty(ctx, x.rows, ng, GpuDtype::F32).unwrap();
    out.fill_u32(ctx, common::POISON);
    reduce_groups_into(ctx, x, group, op, &out, limit).unwrap();
    let got = out.to_f32(ctx).unwrap();
    let want = reference::reduce_groups(data, x.rows, x.cols, group, op).unwrap();
    let what = format!("{}x{} group {group} {op:?} limit {limit:?}", x.rows, x.cols);
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{what}: unwritten (NaN) output"
    );
    match op {
        ReduceOp::SumSq => {
            let tol = sumsq_tol(group.min(x.cols));
            let (err, at) = common::max_rel_err(&got, &want, 1e-30);
            assert!(err <= tol, "{what}: rel err {err:e} > {tol:e} at {at}");
        }
        _ => {
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g as f64, w, "{what}: element {i}");
            }
        }
    }
}

#[test]
fn every_op_and_group_size_matches_the_f64_reference() {
    let ctx = common::ctx();
    let mut rng = Rng::new(11);
    for &(rows, cols) in &[(37, 203), (129, 96), (5, 1000), (3, 7), (1, 1)] {
        let data = rng.normal_vec(rows * cols, 1.5);
        let x = GpuTensor::from_f32(&ctx, rows, cols, &data).unwrap();
        for group in [32, 64, 128, 29, 1, 300, cols] {
            for op in ReduceOp::ALL {
                check(&ctx, &x, &data, group, op, None);
            }
        }
    }
}

#[test]
fn chunked_tensors_and_split_grids_match() {
    // 1 KiB binding limit: a 61x203 f32 input has one row per chunk (812-byte rows), and the
    // group-7 output (29 columns, 116-byte rows) 8 rows per chunk, so chunk boundaries differ.
    // A grid limit of 2 forces 2-D grids and several dispatches per row range.
    let ctx = common::ctx_with(Some(1024));
    let mut rng = Rng::new(12);
    let (rows, cols) = (61, 203);
    let data = rng.normal_vec(rows * cols, 0.7);
    let x = GpuTensor::from_f32(&ctx, rows, cols, &data).unwrap();
    assert_eq!(x.chunks.len(), rows);
    for (group, limit) in [(7, Some(2)), (32, None), (203, Some(2)), (1, Some(3))] {
        for op in ReduceOp::ALL {
            check(&ctx, &x, &data, group, op, limit);
        }
    }
}

#[test]
fn many_short_rows_use_a_two_dimensional_grid() {
    // 3000 segments of 3 lanes' worth: with a grid limit of 5, 25 workgroups per dispatch.
    let ctx = common::ctx();
    let mut rng = Rng::new(13);
    let (rows, cols) = (1000, 9);
    let data = rng.normal_vec(rows * cols, 2.0);
    let x = GpuTensor::from_f32(&ctx, rows, cols, &data).unwrap();
    for op in ReduceOp::ALL {
        check(&ctx, &x, &data, 3, op, Some(5));
        check(&ctx, &x, &data, 9, op, Some(5));
    }
}

#[test]
fn degenerate_rows_reduce_to_finite_values() {
    let ctx = common::ctx();
    let (rows, cols) = (4, 45);
    let mut data = vec![0.0f32; rows * cols];
    data[cols..2 * cols].fill(-3.25);
    data[2 * cols..3 * cols].fill(7.0);
    let mut rng = Rng::new(14);
    data[3 * cols..].copy_from_slice(&rng.normal_vec(cols, 1.0));
    let x = GpuTensor::from_f32(&ctx, rows, cols, &data).unwrap();
    for op in ReduceOp::ALL {
        check(&ctx, &x, &data, 15, op, None);
    }
    let r = reduce_rows(&ctx, &x, ReduceOp::Min).unwrap();
    assert_eq!((r.rows, r.cols), (rows, 1));
    assert_eq!(r.to_f32(&ctx).unwrap()[..3], [0.0, -3.25, 7.0]);
    let s = reduce_rows(&ctx, &x, ReduceOp::SumSq)
        .unwrap()
        .to_f32(&ctx)
        .unwrap();
    assert_eq!(s[0], 0.0);
    assert_eq!(s[2], 49.0 * cols as f32);
}

#[test]
fn bad_input_is_a_clear_error() {
    let ctx = common::ctx();
    let x = GpuTensor::from_f32(&ctx, 2, 3, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    let e = reduce_groups(&ctx, &x, 0, ReduceOp::Max).err().unwrap();
    assert!(e.to_string().contains("group size"), "{e}");
    let u = GpuTensor::from_bytes(&ctx, 2, 3, GpuDtype::U32, &[0u8; 24]).unwrap();
    let e = reduce_rows(&ctx, &u, ReduceOp::Max).err().unwrap();
    assert!(e.to_string().contains("must be F32"), "{e}");
    let wrong = GpuTensor::empty(&ctx, 2, 2, GpuDtype::F32).unwrap();
    let e = reduce_groups_into(&ctx, &x, 3, ReduceOp::Min, &wrong, None)
        .err()
        .unwrap();
    assert!(e.to_string().contains("shape mismatch"), "{e}");
}

/// The row dot product against the f64 reference, on one-chunk and one-row-per-chunk tensors and
/// split grids, into a poisoned output. Tolerance: each product rounds once and the f32 sum
/// rounds as in `sumsq_tol`, but terms have both signs, so the bound is relative to Σ|a·b|, not
/// to the (possibly cancelling) result.
#[test]
fn row_dot_products_match_the_f64_reference() {
    let mut rng = Rng::new(14);
    for (limit, rows, cols, grid) in [
        (None, 37, 203, None),
        (None, 5, 70001, None),
        (None, 300, 9, Some(3)),
        (Some(1024), 61, 203, Some(2)),
    ] {
        let ctx = common::ctx_with(limit);
        let a = rng.normal_vec(rows * cols, 1.3);
        let b = rng.normal_vec(rows * cols, 0.4);
        let (ga, gb) = (
            GpuTensor::from_f32(&ctx, rows, cols, &a).unwrap(),
            GpuTensor::from_f32(&ctx, rows, cols, &b).unwrap(),
        );
        let out = GpuTensor::empty(&ctx, rows, 1, GpuDtype::F32).unwrap();
        out.fill_u32(&ctx, common::POISON);
        dot_rows_into(&ctx, &ga, &gb, &out, grid).unwrap();
        let got = out.to_f32(&ctx).unwrap();
        let want = reference::dot_rows(&a, &b, rows, cols).unwrap();
        let tol = sumsq_tol(cols);
        for r in 0..rows {
            let scale: f64 = (0..cols)
                .map(|c| (a[r * cols + c] as f64 * b[r * cols + c] as f64).abs())
                .sum();
            let err = (got[r] as f64 - want[r]).abs();
            assert!(
                err <= tol * scale,
                "{rows}x{cols} limit {limit:?} row {r}: {} vs {} (err {err:e} > {:e})",
                got[r],
                want[r],
                tol * scale
            );
        }
        assert_eq!(dot_rows(&ctx, &ga, &gb).unwrap().to_f32(&ctx).unwrap(), got);
    }
    let ctx = common::ctx();
    let a = GpuTensor::from_f32(&ctx, 2, 3, &[1.0; 6]).unwrap();
    let b = GpuTensor::from_f32(&ctx, 3, 2, &[1.0; 6]).unwrap();
    assert!(dot_rows(&ctx, &a, &b).is_err());
}
