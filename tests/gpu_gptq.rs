//! GPU GPTQ (`gpu::gptq`) against RTN, the f64 reference GPTQ and itself under chunking, on fresh
//! random layers whose shapes are neither square nor powers of two.

mod common;
use common::{ctx, ctx_with};
use wgpress::gpu::gptq::gptq;
use wgpress::gpu::{GpuContext, GpuTensor};
use wgpress::quant::QuantSpec;
use wgpress::quant::gptq::GptqOptions;
use wgpress::rng::Rng;

/// Weights (rows x cols, std 0.02 with a few large entries) and H = (2/t)·XᵀX from t tokens of
/// correlated inputs with a few heavy channels, like a real layer's calibration statistics.
fn layer(rows: usize, cols: usize, t: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = Rng::new(seed);
    let mut w = rng.normal_vec(rows * cols, 0.02);
    for i in (0..w.len()).step_by(97) {
        w[i] *= 6.0;
    }
    let mut x = rng.normal_vec(t * cols, 1.0);
    for r in 0..t {
        for c in 1..cols {
            x[r * cols + c] += 0.6 * x[r * cols + c - 1];
        }
        x[r * cols + 3 % cols] *= 8.0;
    }
    let mut h = vec![0f32; cols * cols];
    for i in 0..cols {
        for j in 0..cols {
            let s: f64 = (0..t)
                .map(|r| x[r * cols + i] as f64 * x[r * cols + j] as f64)
                .sum();
            h[i * cols + j] = (2.0 * s / t as f64) as f32;
        }
    }
    (w, h)
}

/// tr(Δ H Δᵀ) / tr(W H Wᵀ) in f64: the relative output error on the calibration inputs.
fn out_err(w: &[f32], deq: &[f32], h: &[f32], rows: usize, cols: usize) -> f64 {
    let quad = |m: &dyn Fn(usize) -> f64| -> f64 {
        let mut s = 0.0;
        for r in 0..rows {
            for i in 0..cols {
                let a = m(r * cols + i);
                if a == 0.0 {
                    continue;
                }
                for j in 0..cols {
                    s += a * h[i * cols + j] as f64 * m(r * cols + j);
                }
            }
        }
        s
    };
    quad(&|k| w[k] as f64 - deq[k] as f64) / quad(&|k| w[k] as f64)
}

fn run(
    ctx: &GpuContext,
    w: &[f32],
    h: &[f32],
    rows: usize,
    cols: usize,
    o: &GptqOptions,
) -> wgpress::quant::gptq::GptqResult {
    let ht = GpuTensor::from_f32(ctx, cols, cols, h).unwrap();
    gptq(ctx, w, rows, cols, &ht, o).unwrap().0
}

#[test]
fn diagonal_hessian_without_act_order_is_rtn() {
    let ctx = ctx();
    let (rows, cols) = (13, 40);
    let (w, _) = layer(rows, cols, 1, 1);
    let mut rng = Rng::new(2);
    let mut h = vec![0f32; cols * cols];
    for i in 0..cols {
        h[i * cols + i] = 0.5 + rng.uniform() as f32;
    }
    for (bits, group, sym) in [(4, Some(8), false), (3, None, true), (2, Some(20), false)] {
        let spec = QuantSpec::new(bits, group, sym).unwrap();
        let mut o = GptqOptions::new(spec);
        o.act_order = false;
        let got = run(&ctx, &w, &h, rows, cols, &o);
        let want = wgpress::reference::quant::rtn(&w, rows, cols, &spec).unwrap();
        assert_eq!(got.q.q, want.q, "{spec:?}");
        assert_eq!(got.q.scales, want.scales, "{spec:?}");
        assert_eq!(got.q.zeros, want.zeros, "{spec:?}");
    }
}

#[test]
fn gptq_beats_rtn_on_output_error() {
    let ctx = ctx();
    let (rows, cols) = (24, 136);
    let (w, h) = layer(rows, cols, 300, 3);
    for (bits, group) in [(4, Some(8)), (3, None), (3, Some(68))] {
        for act in [false, true] {
            let spec = QuantSpec::new(bits, group, false).unwrap();
            let mut o = GptqOptions::new(spec);
            o.act_order = act;
            let got = run(&ctx, &w, &h, rows, cols, &o);
            let rtn = wgpress::reference::quant::rtn(&w, rows, cols, &spec).unwrap();
            let e_g = out_err(&w, &got.q.dequantize(), &h, rows, cols);
            let e_r = out_err(&w, &rtn.dequantize(), &h, rows, cols);
            assert!(
                e_g < 0.9 * e_r,
                "bits {bits} group {group:?} act {act}: gptq {e_g} rtn {e_r}"
            );
        }
    }
}

#[test]
fn row_chunks_give_identical_results() {
    let (rows, cols) = (300, 72);
    let (w, h) = layer(rows, cols, 200, 4);
    let spec = QuantSpec::new(4, Some(24), true).unwrap();
    let o = GptqOptions::new(spec);
    let whole = run(&ctx(), &w, &h, rows, cols, &o);
    // Padded to 128 positions, H's factor takes 64 KiB and a W row 512 bytes: a 72 KiB binding
    // limit keeps the factor in one binding and splits W into chunks of 144 rows (3 chunks).
    let chunked = run(&ctx_with(Some(72 * 1024)), &w, &h, rows, cols, &o);
    assert_eq!(whole.q, chunked.q);
}

#[test]
fn a_factor_over_the_binding_limit_is_a_clear_error() {
    let (rows, cols) = (4, 72);
    let (w, h) = layer(rows, cols, 50, 5);
    let o = GptqOptions::new(QuantSpec::new(4, None, false).unwrap());
    let ctx = ctx_with(Some(32 * 1024));
    let ht = GpuTensor::from_f32(&ctx, cols, cols, &h).unwrap();
    let e = gptq(&ctx, &w, rows, cols, &ht, &o)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("one storage binding"), "{e}");
}
