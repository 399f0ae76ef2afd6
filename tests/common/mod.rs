//! Shared test helpers: one GPU context per test (checked shaders, optional tiny binding limit),
//! seeded random data, and comparisons that report the worst element.
#![allow(dead_code)]

use wgpress::gpu::{ContextOptions, GpuContext, GpuDtype, GpuTensor};

/// A checked-shader context on the adapter wgpu finds (lavapipe on CI). Panics with a clear
/// message when there is none: GPU tests are the point of this suite, so a missing adapter is a
/// failure, not a skip.
pub fn ctx() -> GpuContext {
    ctx_with(None)
}

/// Same, with the storage binding limit lowered to `limit` bytes so tensors split into chunks.
pub fn ctx_with(limit: Option<u64>) -> GpuContext {
    let _ = env_logger::builder().is_test(true).try_init();
    GpuContext::new(&ContextOptions {
        binding_limit: limit,
        checked_shaders: true,
        ..Default::default()
    })
    .expect("no GPU adapter: install mesa-vulkan-drivers (lavapipe) to run the GPU tests")
}

/// Largest |a - b| / (|b| + floor) over all elements, with its index; NaN counts as infinite.
pub fn max_rel_err(a: &[f32], b: &[f64], floor: f64) -> (f64, usize) {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let mut worst = (0.0f64, 0usize);
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        let e = if x.is_finite() {
            (x as f64 - y).abs() / (y.abs() + floor)
        } else {
            f64::INFINITY
        };
        if e > worst.0 || (e.is_infinite() && worst.0.is_finite()) {
            worst = (e, i);
        }
    }
    worst
}

/// f32 NaN bit pattern used to poison output buffers so an unwritten element fails a comparison.
pub const POISON: u32 = 0x7FC0_0BAD;

/// Uploads `v` as `dtype` and returns the f32 values the GPU will actually see.
pub fn upload(
    ctx: &GpuContext,
    rows: usize,
    cols: usize,
    v: &[f32],
    dtype: GpuDtype,
) -> (GpuTensor, Vec<f32>) {
    let t = GpuTensor::from_f32_as(ctx, rows, cols, v, dtype).unwrap();
    (t, v.iter().map(|&x| dtype.round(x)).collect())
}

/// A GPU engine with checked shaders; fails (not skips) without an adapter, like `ctx()`.
pub fn gpu_engine() -> wgpress::engine::Engine {
    let e = wgpress::engine::Engine::new(
        &ContextOptions {
            checked_shaders: true,
            ..Default::default()
        },
        false,
    )
    .unwrap();
    assert!(
        e.gpu().is_some(),
        "no GPU adapter: install mesa-vulkan-drivers (lavapipe) to run the GPU tests"
    );
    e
}

/// Quantizes random normal weights on `spec`'s grid (RTN), optionally with a random act-order
/// column -> group map, so every field of the tensor is exercised.
pub fn random_quantized(
    rng: &mut wgpress::rng::Rng,
    rows: usize,
    cols: usize,
    spec: wgpress::quant::QuantSpec,
    act_order: bool,
) -> wgpress::quant::QuantizedTensor {
    let w = rng.normal_vec(rows * cols, 0.05);
    quantize_weights(&w, rows, cols, spec, act_order, rng)
}

/// RTN of `w` on `spec`'s grid with the static column -> group map or a random act-order one.
pub fn quantize_weights(
    w: &[f32],
    rows: usize,
    cols: usize,
    spec: wgpress::quant::QuantSpec,
    act_order: bool,
    rng: &mut wgpress::rng::Rng,
) -> wgpress::quant::QuantizedTensor {
    let gs = spec.group_size(cols);
    let ng = spec.n_groups(cols);
    let mut perm: Vec<usize> = (0..cols).collect();
    if act_order {
        for i in (1..cols).rev() {
            perm.swap(i, rng.below(i as u64 + 1) as usize);
        }
    }
    // Column perm[k] is the k-th quantized column, so it belongs to group k / gs.
    let mut g_idx = vec![0u32; cols];
    for (k, &c) in perm.iter().enumerate() {
        g_idx[c] = (k / gs) as u32;
    }
    let (mut q, mut scales, mut zeros) = (vec![0u8; rows * cols], vec![], vec![]);
    for r in 0..rows {
        for g in 0..ng {
            let members: Vec<usize> = (0..cols).filter(|&c| g_idx[c] as usize == g).collect();
            let vals: Vec<f32> = members.iter().map(|&c| w[r * cols + c]).collect();
            let p = spec.fit(&vals);
            for &c in &members {
                q[r * cols + c] = spec.quantize(w[r * cols + c], p) as u8;
            }
            scales.push(p.scale);
            zeros.push(p.zero);
        }
    }
    wgpress::quant::QuantizedTensor {
        rows,
        cols,
        spec,
        q,
        scales,
        zeros,
        g_idx,
    }
}
