//! GPU dense linear algebra (blocked Cholesky, triangular inverse, reversal) against the f64
//! reference in `reference::linalg`, on fresh random SPD matrices of orders 64 (one block, no
//! trailing update) up to 576 (panels, near and far trailing updates, uneven merge trees, batched
//! merges).
//! `potrf_diag` is built trusted (no runtime bounds checks) in production, so the factorization
//! and the inverse are checked in both builds: an out-of-range access may read the same wrong
//! value in both (lavapipe clamps as the checks do), hence the reference, not only agreement.

mod common;
use common::ctx;
use wgpress::gpu::linalg::{CHOLESKY_SPAN, cholesky, cholesky_with_span, flip, invert_factor};
use wgpress::gpu::{ContextOptions, GpuContext, GpuDtype, GpuTensor};
use wgpress::reference::linalg as reference;
use wgpress::rng::Rng;

/// A = XᵀX/t + 0.05·I from t > n Gaussian samples with a few correlated columns: condition number
/// in the hundreds, like a damped calibration Hessian.
fn spd(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = Rng::new(seed);
    let t = 2 * n + 7;
    let mut x: Vec<f64> = (0..t * n).map(|_| rng.normal()).collect();
    for r in 0..t {
        x[r * n + 1] = x[r * n] + 0.1 * x[r * n + 1];
    }
    let mut a = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = (0..t).map(|r| x[r * n + i] * x[r * n + j]).sum::<f64>() / t as f64;
            a[i * n + j] = s;
            a[j * n + i] = s;
        }
        a[i * n + i] += 0.05;
    }
    a
}

fn upload(ctx: &wgpress::gpu::GpuContext, a: &[f64], n: usize) -> GpuTensor {
    let v: Vec<f32> = a.iter().map(|&x| x as f32).collect();
    GpuTensor::from_f32(ctx, n, n, &v).unwrap()
}

/// Worst |gpu - ref| relative to the largest |ref| entry of the matrix.
fn rel_to_max(gpu: &[f32], want: &[f64]) -> f64 {
    let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
    gpu.iter()
        .zip(want)
        .map(|(&g, &w)| {
            if g.is_finite() {
                (g as f64 - w).abs() / scale
            } else {
                f64::INFINITY
            }
        })
        .fold(0.0, f64::max)
}

/// The test suite's checked-shader context and the production (trusted) one.
fn both_builds() -> [(&'static str, GpuContext); 2] {
    let trusted = GpuContext::new(&ContextOptions::default()).unwrap();
    [("checked", ctx()), ("trusted", trusted)]
}

#[test]
fn cholesky_matches_the_reference() {
    let builds = both_builds();
    // Spans: the production one (a single span below 512), and 128 so that 192 and 320 have
    // two and three spans, the last one short (near and far trailing updates).
    for ((n, seed, span), (build, ctx)) in [
        (64, 1, CHOLESKY_SPAN),
        (192, 2, CHOLESKY_SPAN),
        (192, 7, 128),
        (320, 8, 128),
    ]
    .into_iter()
    .flat_map(|c| builds.iter().map(move |b| (c, b)))
    {
        let a = spd(n, seed);
        let m = upload(ctx, &a, n);
        let c = cholesky_with_span(ctx, &m, span).unwrap();
        assert!(c.ok);
        let got = m.to_f32(ctx).unwrap();
        let want = reference::cholesky(&a, n).unwrap();
        // f32 Cholesky: backward error ~ n·eps·|A|, forward error in L bounded by that times the
        // condition number (~ 300 here): 320 · 6e-8 · 300 ≈ 5.8e-3 worst case; typical far less.
        let e = rel_to_max(&got, &want);
        assert!(e < 1e-3, "{build}, n {n}, span {span}: relative error {e}");
        for i in 0..n {
            for j in i + 1..n {
                assert_eq!(got[i * n + j], 0.0, "upper ({i},{j}) not zeroed");
            }
        }
    }
}

#[test]
fn reversed_factor_inverse_is_the_upper_cholesky_of_the_inverse() {
    let builds = both_builds();
    // 320 and 576 give merges whose triangular factors span two and three 128-wide tiles, so
    // the products' K ranges are cut at a tile row (320) and start at a tile column (576); 576
    // also factors in two Cholesky spans.
    for ((n, seed), (build, ctx)) in [(64, 3), (192, 4), (320, 5), (576, 6)]
        .into_iter()
        .flat_map(|c| builds.iter().map(move |b| (c, b)))
    {
        let a = spd(n, seed);
        // J·A·J on the host; the GPU then forms U = J·inv(chol(J·A·J))·J.
        let mut ja = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                ja[i * n + j] = a[(n - 1 - i) * n + (n - 1 - j)];
            }
        }
        let m = upload(ctx, &ja, n);
        let c = cholesky(ctx, &m).unwrap();
        invert_factor(ctx, &m, c).unwrap();
        flip(ctx, &m).unwrap();
        let got = m.to_f32(ctx).unwrap();
        let want = reference::upper_cholesky_of_inverse(&a, n).unwrap();
        // Inverting squares the conditioning effect: cond ~ 300 and f32 give ~1e-3 relative to
        // the largest entry at worst.
        let e = rel_to_max(&got, &want);
        assert!(e < 2e-3, "{build}, n {n}: relative error {e}");
        for i in 0..n {
            for j in 0..i {
                assert_eq!(got[i * n + j], 0.0, "lower ({i},{j}) not zero");
            }
        }
    }
}

#[test]
fn indefinite_matrices_are_reported_not_factored() {
    let ctx = ctx();
    let n = 128;
    let mut a = spd(n, 6);
    a[100 * n + 100] = -5.0;
    let m = upload(&ctx, &a, n);
    let c = cholesky(&ctx, &m).unwrap();
    assert!(!c.ok);
    let e = invert_factor(&ctx, &m, c).unwrap_err();
    assert!(e.to_string().contains("failed"), "{e}");
    // NaN is a failure too.
    let mut a = spd(n, 7);
    a[3 * n + 3] = f64::NAN;
    let m = upload(&ctx, &a, n);
    assert!(!cholesky(&ctx, &m).unwrap().ok);
}

#[test]
fn shapes_that_are_not_whole_blocks_are_refused() {
    let ctx = ctx();
    let m = GpuTensor::empty(&ctx, 100, 100, GpuDtype::F32).unwrap();
    let e = cholesky(&ctx, &m).err().unwrap();
    assert!(e.to_string().contains("multiple of 64"), "{e}");
}
