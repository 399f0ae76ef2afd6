//! Calibration statistics on the GPU (`gpu::stats`) against `reference::stats`: the Hessian
//! H = (2/n)·XᵀX accumulated over token chunks that do not divide n, with X and H split into many
//! binding chunks, f16/bf16 inputs, and the per-channel sum of squares / max |x| / L2 norm.
//!
//! Tolerances: H_ij on the GPU is a sum of n products x_ti·x_tj in f32 (fused multiply-adds inside
//! a pass, one f32 add per pass into H), then one multiply by the f32 value of 2/n. The classic
//! bound for an f32 sum of n terms is n·2^-24·Σ|terms|; with the passes and the two roundings of
//! the scale that is (n + 4)·2^-24·(2/n)·Σ_t|x_ti·x_tj|, and we allow 2x. The inputs are rounded
//! to 16 bits before both sides see them, so f16/bf16 cases use the same bound. The column sums of
//! squares follow the same argument; max |x| is exact; the norm adds one rounding of the sqrt.
mod common;
use wgpress::gpu::stats::{
    HessianAccumulator, channel_stats, channel_stats_into, mirror_lower, scale_in_place,
    sqrt_in_place,
};
use wgpress::gpu::{GpuContext, GpuDtype, GpuTensor};
use wgpress::reference;
use wgpress::rng::Rng;

const U: f64 = 1.0 / 16_777_216.0; // 2^-24

/// Random activations with a few large channels, as real layer inputs have.
fn activations(seed: u64, n: usize, d: usize) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let mut x = rng.normal_vec(n * d, 1.0);
    for t in 0..n {
        for j in (0..d).step_by(17) {
            x[t * d + j] *= 20.0;
        }
    }
    x
}

/// Accumulates H over `x` (n x d) in row chunks of `chunk` tokens (the last one shorter) and
/// compares it with the f64 reference.
fn check_hessian(ctx: &GpuContext, seed: u64, n: usize, d: usize, chunk: usize, dtype: GpuDtype) {
    let x = activations(seed, n, d);
    let mut acc = HessianAccumulator::new(ctx, d).unwrap();
    let mut seen = Vec::with_capacity(n * d);
    let mut t = 0;
    while t < n {
        let e = (t + chunk).min(n);
        let (g, s) = common::upload(ctx, e - t, d, &x[t * d..e * d], dtype);
        acc.add(ctx, &g).unwrap();
        seen.extend_from_slice(&s);
        t = e;
    }
    assert_eq!(acc.tokens(), n as u64);
    assert!(!acc.xtx().chunks.is_empty());
    let h = acc.finish(ctx).unwrap();
    assert_eq!((h.rows, h.cols, h.dtype), (d, d, GpuDtype::F32));
    let got = h.to_f32(ctx).unwrap();
    let want = reference::stats::hessian(&seen, n, d);
    let scale = reference::stats::xtx(&seen, n, d, true);
    let s = 2.0 / n as f64;
    for i in 0..d * d {
        let tol = 2.0 * (n as f64 + 4.0) * U * s * scale[i] + 1e-30;
        let e = (got[i] as f64 - want[i]).abs();
        assert!(
            got[i].is_finite() && e <= tol,
            "n={n} d={d} chunk={chunk} {dtype:?}: H[{}, {}] = {} want {} (tol {tol:e})",
            i / d,
            i % d,
            got[i],
            want[i]
        );
    }
}

#[test]
fn hessian_matches_reference_over_uneven_token_chunks() {
    let ctx = common::ctx();
    // 1000 tokens in chunks of 300 (300, 300, 300, 100); 37 in chunks of 10; one single chunk.
    check_hessian(&ctx, 1, 1000, 200, 300, GpuDtype::F32);
    check_hessian(&ctx, 2, 37, 129, 10, GpuDtype::F32);
    check_hessian(&ctx, 3, 5, 3, 5, GpuDtype::F32);
    // One add of 1300 tokens: summed in pieces of F32_PIECE_TOKENS (512, 512, 276).
    check_hessian(&ctx, 10, 1300, 50, 1300, GpuDtype::F32);
}

/// What one long f32 sum loses: tokens that all lie near one vector v0 (spread 1% of |v0|) with
/// every 512th token 30x larger, the shape of a deep block's inputs. The error of H measured
/// only in the directions orthogonal to v0, relative to H there (the part GPTQ's compensation
/// uses), for 4096 tokens in one add.
fn hidden_direction_error(ctx: &GpuContext) -> f64 {
    let (n, d) = (4096, 24);
    let mut rng = Rng::new(77);
    let v0: Vec<f32> = rng.normal_vec(d, 30.0);
    let noise = rng.normal_vec(n * d, 0.3);
    let mut x = vec![0f32; n * d];
    for t in 0..n {
        let big = if t % 512 == 0 { 30.0 } else { 1.0 };
        for j in 0..d {
            x[t * d + j] = big * (v0[j] + noise[t * d + j]);
        }
    }
    let mut acc = HessianAccumulator::new(ctx, d).unwrap();
    let (g, seen) = common::upload(ctx, n, d, &x, GpuDtype::F32);
    acc.add(ctx, &g).unwrap();
    let got = acc.finish(ctx).unwrap().to_f32(ctx).unwrap();
    let want = reference::stats::hessian(&seen, n, d);
    // P = I - v̂v̂ᵀ; compare P·(H - H64)·P with P·H64·P in the Frobenius norm.
    let norm = v0.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
    let u: Vec<f64> = v0.iter().map(|&v| v as f64 / norm).collect();
    let project = |m: &dyn Fn(usize, usize) -> f64| -> f64 {
        let p = |i: usize, j: usize| (i == j) as u8 as f64 - u[i] * u[j];
        let mut pm = vec![0f64; d * d];
        for i in 0..d {
            for j in 0..d {
                pm[i * d + j] = (0..d).map(|k| p(i, k) * m(k, j)).sum();
            }
        }
        let mut total = 0f64;
        for i in 0..d {
            for j in 0..d {
                let v: f64 = (0..d).map(|k| pm[i * d + k] * p(k, j)).sum();
                total += v * v;
            }
        }
        total.sqrt()
    };
    let err = project(&|i, j| got[i * d + j] as f64 - want[i * d + j]);
    err / project(&|i, j| want[i * d + j])
}

#[test]
fn f32_hessian_keeps_the_directions_a_dominant_component_hides() {
    let ctx = common::ctx();
    let e = hidden_direction_error(&ctx);
    eprintln!("relative error orthogonal to the dominant direction: {e:.3e}");
    assert!(e < 1e-2, "{e:e}");
}

#[test]
fn hessian_with_chunked_bindings() {
    // 4 KiB bindings: H (129 x 129 f32, 516 B a row) splits into 19 chunks of 7 rows, and each
    // X chunk of 23 tokens into 4 binding chunks, so the TN product walks K ranges and C chunks.
    let ctx = common::ctx_with(Some(4096));
    check_hessian(&ctx, 4, 130, 129, 23, GpuDtype::F32);
    check_hessian(&ctx, 5, 1000, 200, 333, GpuDtype::F32);
    check_hessian(&ctx, 6, 61, 129, 17, GpuDtype::F16);
}

#[test]
fn hessian_from_sixteen_bit_inputs() {
    let ctx = common::ctx();
    check_hessian(&ctx, 7, 1000, 200, 384, GpuDtype::F16);
    check_hessian(&ctx, 8, 1000, 200, 999, GpuDtype::BF16);
    check_hessian(&ctx, 9, 37, 129, 11, GpuDtype::BF16);
}

#[test]
fn hessian_errors_name_the_problem() {
    let ctx = common::ctx();
    let acc = HessianAccumulator::new(&ctx, 8).unwrap();
    let e = acc.finish(&ctx).err().unwrap();
    assert!(e.to_string().contains("no calibration tokens"), "{e}");
    let mut acc = HessianAccumulator::new(&ctx, 8).unwrap();
    let x = GpuTensor::empty(&ctx, 4, 9, GpuDtype::F32).unwrap();
    let e = acc.add(&ctx, &x).unwrap_err();
    assert!(e.to_string().contains("hessian"), "{e}");
    // An empty chunk adds nothing.
    let x0 = GpuTensor::empty(&ctx, 0, 8, GpuDtype::F32).unwrap();
    acc.add(&ctx, &x0).unwrap();
    assert_eq!(acc.tokens(), 0);
}

/// Channel statistics over `x` (n x d) in row chunks of `chunk` tokens, accumulated call by call
/// into poisoned outputs (the first call overwrites), then the norms by `sqrt_in_place`.
fn check_channels(ctx: &GpuContext, seed: u64, n: usize, d: usize, chunk: usize, dtype: GpuDtype) {
    let x = activations(seed, n, d);
    let s = GpuTensor::empty(ctx, d, 1, GpuDtype::F32).unwrap();
    let a = GpuTensor::empty(ctx, d, 1, GpuDtype::F32).unwrap();
    s.fill_u32(ctx, common::POISON);
    a.fill_u32(ctx, common::POISON);
    let mut seen = Vec::with_capacity(n * d);
    let mut t = 0;
    while t < n {
        let e = (t + chunk).min(n);
        let (g, v) = common::upload(ctx, e - t, d, &x[t * d..e * d], dtype);
        channel_stats_into(ctx, &g, &s, &a, t > 0).unwrap();
        seen.extend_from_slice(&v);
        t = e;
    }
    let (want_s, want_a) = reference::stats::channel_stats(&seen, n, d);
    let got_s = s.to_f32(ctx).unwrap();
    let got_a = a.to_f32(ctx).unwrap();
    for j in 0..d {
        let tol = 2.0 * (n as f64 + 2.0) * U * want_s[j] + 1e-30;
        assert!(
            got_s[j].is_finite() && (got_s[j] as f64 - want_s[j]).abs() <= tol,
            "n={n} d={d} {dtype:?}: sumsq[{j}] = {} want {} (tol {tol:e})",
            got_s[j],
            want_s[j]
        );
        assert_eq!(
            got_a[j] as f64, want_a[j],
            "absmax[{j}] n={n} d={d} {dtype:?}"
        );
    }
    sqrt_in_place(ctx, &s).unwrap();
    let norms = s.to_f32(ctx).unwrap();
    for j in 0..d {
        let w = want_s[j].sqrt();
        let tol = ((n as f64 + 2.0) * U + 2.0 * U) * w + 1e-30;
        assert!(
            (norms[j] as f64 - w).abs() <= tol,
            "norm[{j}] = {} want {w} (tol {tol:e})",
            norms[j]
        );
    }
}

#[test]
fn channel_stats_match_reference() {
    let ctx = common::ctx();
    check_channels(&ctx, 20, 1000, 200, 300, GpuDtype::F32);
    check_channels(&ctx, 21, 37, 129, 10, GpuDtype::F32);
    check_channels(&ctx, 22, 1000, 200, 1000, GpuDtype::F16);
    check_channels(&ctx, 23, 37, 129, 36, GpuDtype::BF16);
    // One call, fresh outputs.
    let x = activations(24, 50, 33);
    let g = GpuTensor::from_f32(&ctx, 50, 33, &x).unwrap();
    let (s, a) = channel_stats(&ctx, &g).unwrap();
    let (ws, wa) = reference::stats::channel_stats(&x, 50, 33);
    let (gs, ga) = (s.to_f32(&ctx).unwrap(), a.to_f32(&ctx).unwrap());
    for j in 0..33 {
        assert!((gs[j] as f64 - ws[j]).abs() <= 2.0 * 52.0 * U * ws[j]);
        assert_eq!(ga[j] as f64, wa[j]);
    }
}

#[test]
fn channel_stats_with_chunked_bindings() {
    // 512-byte bindings: the d x 1 outputs split into chunks of 127 rows and 16-bit X (one row
    // of 200 or 250 features a chunk) into one binding chunk per token, so the column ranges and
    // the accumulation over X's chunks are both exercised. f32 X with 1 KiB bindings: 1 row a chunk.
    let ctx = common::ctx_with(Some(512));
    check_channels(&ctx, 30, 37, 200, 13, GpuDtype::BF16);
    check_channels(&ctx, 31, 40, 250, 7, GpuDtype::F16);
    let ctx = common::ctx_with(Some(1024));
    check_channels(&ctx, 32, 37, 129, 13, GpuDtype::F32);
}

#[test]
fn scale_reaches_every_element_of_a_chunked_tensor() {
    let ctx = common::ctx_with(Some(1024));
    let v: Vec<f32> = (0..70 * 33).map(|i| i as f32 - 100.0).collect();
    let t = GpuTensor::from_f32(&ctx, 70, 33, &v).unwrap();
    assert!(t.chunks.len() > 1);
    scale_in_place(&ctx, &t, 0.25).unwrap();
    let got = t.to_f32(&ctx).unwrap();
    for (g, w) in got.iter().zip(&v) {
        assert_eq!(*g, w * 0.25);
    }
}

#[test]
fn mirror_copies_the_lower_triangle_up_across_chunks() {
    // A random, non-symmetric matrix, so a missed or misplaced element shows; whole (one chunk)
    // and in 4-row chunks (1 KiB bindings at d = 61) or 1-row ones (d = 3), where most tiles
    // pair two chunks. The result is a copy, so it must be exact.
    for (limit, d) in [(None, 200), (Some(1024), 61), (Some(16), 3)] {
        let ctx = common::ctx_with(limit);
        let m = Rng::new(d as u64).normal_vec(d * d, 1.0);
        let g = GpuTensor::from_f32(&ctx, d, d, &m).unwrap();
        if limit.is_some() {
            assert!(g.chunks.len() > 1, "d={d}: expected several chunks");
        }
        mirror_lower(&ctx, &g).unwrap();
        let got = g.to_f32(&ctx).unwrap();
        let want = reference::stats::mirror_lower(&m, d);
        for i in 0..d * d {
            assert_eq!(
                got[i].to_bits(),
                want[i].to_bits(),
                "d={d} limit={limit:?}: M[{}, {}]",
                i / d,
                i % d
            );
        }
    }
    let ctx = common::ctx();
    let e = mirror_lower(&ctx, &GpuTensor::empty(&ctx, 3, 4, GpuDtype::F32).unwrap()).unwrap_err();
    assert!(e.to_string().contains("square"), "{e}");
}
