//! CPU reference for GPTQ (Frantar et al. 2022), written plainly from the algorithm and the seven
//! conventions of [`crate::quant::gptq`], in f64: the working weights, H, its factorizations and
//! the error propagation are f64; only the grid (fit, quantize, dequantize) runs in f32 through
//! [`crate::quant::QuantSpec`] and [`GroupParams`], exactly as every other implementation uses it. The GPU GPTQ is
//! judged against this, and it is the CPU fallback, so it validates its inputs and returns errors
//! instead of panicking. It must not call into `gpu/` nor redefine any part of the grid.
//!
//! Rows are independent once U is known, so the loop runs row by row (each row keeps its own f64
//! working copy); the blocked order of updates (in-block, then lazy after each block) is kept
//! because rule 6 fits a group's grid on the values its positions hold at that moment, which
//! depends on which updates have been applied yet.

use crate::error::{Error, Result};
use crate::quant::gptq::{
    GptqOptions, GptqResult, MAX_DAMP_RETRIES, block_size, group_index, processing_order,
};
use crate::quant::{GroupParams, QuantizedTensor};
use crate::reference::linalg::{cholesky_pivot, lower_inverse};

/// GPTQ of the row-major `rows x cols` matrix `w` with the `cols x cols` row-major Hessian
/// `h` = (2/n) XᵀX (only its lower triangle, in processing order, is read by the factorization).
pub fn gptq(
    w: &[f32],
    rows: usize,
    cols: usize,
    h: &[f32],
    opts: &GptqOptions,
) -> Result<GptqResult> {
    gptq_with_dequantized(w, rows, cols, h, opts).map(|(r, _)| r)
}

/// [`gptq`], also returning the dequantized weights the loop produced (row-major, original column
/// order), so tests can check that the stored integers, grids and g_idx reproduce them.
fn gptq_with_dequantized(
    w: &[f32],
    rows: usize,
    cols: usize,
    h: &[f32],
    opts: &GptqOptions,
) -> Result<(GptqResult, Vec<f32>)> {
    if cols == 0 {
        return Err(Error::invalid(
            "gptq: a weight matrix needs at least one column",
        ));
    }
    opts.validate(cols)?;
    let spec = opts.spec;
    if w.len() != rows * cols {
        return Err(Error::Shape {
            op: "gptq (weights)".into(),
            expected: format!("{} values for {rows}x{cols}", rows * cols),
            got: format!("{} values", w.len()),
        });
    }
    if h.len() != cols * cols {
        return Err(Error::Shape {
            op: "gptq (Hessian)".into(),
            expected: format!("{} values for {cols}x{cols}", cols * cols),
            got: format!("{} values", h.len()),
        });
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(format!(
            "gptq: weight at row {}, column {} is {} (weights must be finite)",
            i / cols,
            i % cols,
            w[i]
        )));
    }
    if let Some(i) = h.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(format!(
            "gptq: the Hessian is not finite: H[{}][{}] = {} (the calibration activations \
             overflowed or contain NaN)",
            i / cols,
            i % cols,
            h[i]
        )));
    }

    // Rule 1: dead columns.
    let mut hm: Vec<f64> = h.iter().map(|&v| v as f64).collect();
    let mut w0: Vec<f32> = w.to_vec();
    let mut dead_columns = 0;
    for i in 0..cols {
        if hm[i * cols + i] == 0.0 {
            hm[i * cols + i] = 1.0;
            dead_columns += 1;
            for r in 0..rows {
                w0[r * cols + i] = 0.0;
            }
        }
    }

    // Rules 2-4: damping (mean after rule 1), order, U = upper Cholesky factor of H⁻¹.
    let mean_diag = (0..cols).map(|i| hm[i * cols + i]).sum::<f64>() / cols as f64;
    let mut damp = opts.damp;
    let mut attempt = 0;
    let (perm, u) = loop {
        let diag: Vec<f64> = (0..cols)
            .map(|i| hm[i * cols + i] + damp as f64 * mean_diag)
            .collect();
        let perm = processing_order(&diag, opts.act_order);
        let mut hp = vec![0f64; cols * cols];
        for (a, &pa) in perm.iter().enumerate() {
            for (b, &pb) in perm.iter().enumerate() {
                hp[a * cols + b] = hm[pa as usize * cols + pb as usize];
            }
            hp[a * cols + a] = diag[pa as usize];
        }
        match upper_cholesky_of_inverse(&hp, cols) {
            Ok(u) => break (perm, u),
            Err((what, pos, pivot)) => {
                if attempt == MAX_DAMP_RETRIES {
                    return Err(Error::invalid(format!(
                        "gptq: the Cholesky factorization of {what} failed (pivot {pivot:e} at \
                         position {pos} of {cols}) even with damp {damp} after {MAX_DAMP_RETRIES} \
                         retries of ten times the damping (requested damp {}); the Hessian is \
                         far from positive definite",
                        opts.damp
                    )));
                }
                attempt += 1;
                damp *= 10.0;
            }
        }
    };

    // Rules 6-7: grids fitted before the loop (static groups, or one grid per row).
    let g = spec.group_size(cols);
    let n_groups = spec.n_groups(cols);
    let fit = |values: &[f32]| -> GroupParams {
        if opts.mse {
            spec.fit_mse(values)
        } else {
            spec.fit(values)
        }
    };
    let fit_in_loop = spec.group.is_some() && !opts.static_groups;
    let g_idx = group_index(&perm, &spec, opts.static_groups);

    let mut q = vec![0u8; rows * cols];
    let mut deq = vec![0f32; rows * cols];
    let mut scales = vec![0f32; rows * n_groups];
    let mut zeros = vec![0u32; rows * n_groups];
    let mut wp = vec![0f64; cols];
    let block = block_size(spec.group.map(|_| g), opts.block);
    let mut err = vec![0f64; block.min(cols)];
    let mut cur = vec![0f32; g];
    for r in 0..rows {
        let row = &w0[r * cols..(r + 1) * cols];
        let mut params = vec![None::<GroupParams>; n_groups];
        if !fit_in_loop {
            for (k, p) in params.iter_mut().enumerate() {
                *p = Some(fit(&row[k * g..((k + 1) * g).min(cols)]));
            }
        }
        for (pos, &c) in perm.iter().enumerate() {
            wp[pos] = row[c as usize] as f64;
        }
        // Rule 5: blocks, in-block updates, lazy update after each block.
        for b0 in (0..cols).step_by(block) {
            let b1 = (b0 + block).min(cols);
            for i in b0..b1 {
                let c = perm[i] as usize;
                let k = g_idx[c] as usize;
                if fit_in_loop && i % g == 0 {
                    let end = (i + g).min(cols);
                    cur.clear();
                    cur.extend(wp[i..end].iter().map(|&v| v as f32));
                    params[k] = Some(fit(&cur));
                }
                let p = params[k].ok_or_else(|| {
                    Error::invalid(format!(
                        "gptq: group {k} reached before its grid was fitted"
                    ))
                })?;
                let x = wp[i];
                let qv = spec.quantize(x as f32, p);
                let d = p.dequantize(qv);
                q[r * cols + c] = qv as u8;
                deq[r * cols + c] = d;
                let e = (x - d as f64) / u[i * cols + i];
                err[i - b0] = e;
                for j in i + 1..b1 {
                    wp[j] -= e * u[i * cols + j];
                }
            }
            for j in b1..cols {
                let mut s = 0f64;
                for i in b0..b1 {
                    s += err[i - b0] * u[i * cols + j];
                }
                wp[j] -= s;
            }
        }
        for (k, p) in params.iter().enumerate() {
            let p = p.ok_or_else(|| {
                Error::invalid(format!("gptq: group {k} of row {r} was never fitted"))
            })?;
            scales[r * n_groups + k] = p.scale;
            zeros[r * n_groups + k] = p.zero;
        }
    }

    let result = GptqResult {
        q: QuantizedTensor {
            rows,
            cols,
            spec,
            q,
            scales,
            zeros,
            g_idx,
        },
        damp_used: damp,
        dead_columns,
        perm,
    };
    Ok((result, deq))
}

/// U with H⁻¹ = UᵀU (rule 4): H = L Lᵀ, H⁻¹ = L⁻ᵀ L⁻¹, then the Cholesky factor of H⁻¹.
/// Returns U row-major (upper triangle set) or which factorization failed, where and its pivot.
fn upper_cholesky_of_inverse(
    hp: &[f64],
    n: usize,
) -> std::result::Result<Vec<f64>, (&'static str, usize, f64)> {
    let l = cholesky_pivot(hp, n).map_err(|(p, v)| ("the damped Hessian", p, v))?;
    let linv = lower_inverse(&l, n);
    // H⁻¹[i][j] = Σ_k L⁻¹[k][i] L⁻¹[k][j], k >= max(i, j).
    let mut hinv = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let mut s = 0f64;
            for k in i..n {
                s += linv[k * n + i] * linv[k * n + j];
            }
            hinv[i * n + j] = s;
            hinv[j * n + i] = s;
        }
    }
    let l2 = cholesky_pivot(&hinv, n).map_err(|(p, v)| ("the inverse Hessian", p, v))?;
    let mut u = vec![0f64; n * n];
    for i in 0..n {
        for j in i..n {
            u[i * n + j] = l2[j * n + i];
        }
    }
    Ok(u)
}

/// The layer's relative output error tr(ΔHΔᵀ)/tr(WHWᵀ) with Δ = W - deq, in f64 (equal to
/// ||WX - ŴX||²/||WX||² for H = (2/n) XᵀX). 0 when both traces are 0; infinite when only the
/// denominator is. Panics on inconsistent lengths (a test and report helper).
pub fn layer_output_error(w: &[f32], deq: &[f32], rows: usize, cols: usize, h: &[f32]) -> f64 {
    assert_eq!(w.len(), rows * cols, "layer_output_error: weights");
    assert_eq!(
        deq.len(),
        rows * cols,
        "layer_output_error: dequantized weights"
    );
    assert_eq!(h.len(), cols * cols, "layer_output_error: Hessian");
    let quad = |v: &[f64]| -> f64 {
        let mut s = 0f64;
        for i in 0..cols {
            let mut t = 0f64;
            for j in 0..cols {
                t += h[i * cols + j] as f64 * v[j];
            }
            s += v[i] * t;
        }
        s
    };
    let (mut num, mut den) = (0f64, 0f64);
    for r in 0..rows {
        let wr: Vec<f64> = w[r * cols..(r + 1) * cols]
            .iter()
            .map(|&v| v as f64)
            .collect();
        let dr: Vec<f64> = (0..cols)
            .map(|c| wr[c] - deq[r * cols + c] as f64)
            .collect();
        num += quad(&dr);
        den += quad(&wr);
    }
    if num == 0.0 { 0.0 } else { num / den }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QuantSpec;
    use crate::quant::gptq::DEFAULT_BLOCK;
    use crate::reference::quant::rtn;
    use crate::rng::Rng;

    /// H = (2/n) XᵀX of a random `n x cols` X with correlated column pairs and a few heavy channels.
    fn hessian(rng: &mut Rng, n: usize, cols: usize) -> Vec<f32> {
        let mut x = vec![0f64; n * cols];
        for v in x.iter_mut() {
            *v = rng.normal();
        }
        for t in 0..n {
            for c in (3..cols).step_by(5) {
                // Strongly correlated with its left neighbour.
                x[t * cols + c] = 0.9 * x[t * cols + c - 1] + 0.2 * x[t * cols + c];
            }
            for c in [1, cols / 2] {
                x[t * cols + c] *= 6.0;
            }
        }
        xtx(&x, n, cols)
    }

    fn xtx(x: &[f64], n: usize, cols: usize) -> Vec<f32> {
        let mut h = vec![0f32; cols * cols];
        for i in 0..cols {
            for j in 0..cols {
                let s: f64 = (0..n).map(|t| x[t * cols + i] * x[t * cols + j]).sum();
                h[i * cols + j] = (2.0 * s / n as f64) as f32;
            }
        }
        h
    }

    fn opts(bits: u8, group: Option<usize>, act_order: bool) -> GptqOptions {
        let mut o = GptqOptions::new(QuantSpec::new(bits, group, false).unwrap());
        o.act_order = act_order;
        o
    }

    #[test]
    fn beats_rtn_on_output_error() {
        let (rows, cols) = (13, 40);
        let mut rng = Rng::new(11);
        let w = rng.normal_vec(rows * cols, 0.02);
        let h = hessian(&mut rng, 96, cols);
        for bits in [3u8, 4] {
            for group in [None, Some(8)] {
                for act in [false, true] {
                    for block in [DEFAULT_BLOCK, 16] {
                        let mut o = opts(bits, group, act);
                        o.block = block;
                        let res = gptq(&w, rows, cols, &h, &o).unwrap();
                        let e_g = layer_output_error(&w, &res.q.dequantize(), rows, cols, &h);
                        let r = rtn(&w, rows, cols, &o.spec).unwrap();
                        let e_r = layer_output_error(&w, &r.dequantize(), rows, cols, &h);
                        assert!(
                            e_g < e_r,
                            "bits {bits} group {group:?} act {act} block {block}: \
                             gptq {e_g:.5} vs rtn {e_r:.5}"
                        );
                        assert_eq!(res.dead_columns, 0);
                        assert_eq!(res.damp_used, o.damp);
                    }
                }
            }
        }
    }

    #[test]
    fn diagonal_hessian_equals_rtn() {
        let (rows, cols) = (7, 24);
        let mut rng = Rng::new(3);
        let w = rng.normal_vec(rows * cols, 0.05);
        let mut h = vec![0f32; cols * cols];
        for i in 0..cols {
            h[i * cols + i] = 0.5 + rng.uniform() as f32;
        }
        for bits in [3u8, 4] {
            for group in [None, Some(8)] {
                let r = rtn(&w, rows, cols, &QuantSpec::new(bits, group, false).unwrap()).unwrap();
                let res = gptq(&w, rows, cols, &h, &opts(bits, group, false)).unwrap();
                assert_eq!(res.q, r, "bits {bits} group {group:?}");
                // Act-order with static groups only permutes independent columns: RTN again.
                let mut o = opts(bits, group, true);
                o.static_groups = true;
                let res = gptq(&w, rows, cols, &h, &o).unwrap();
                assert_eq!(res.q, r, "static, bits {bits} group {group:?}");
                assert_ne!(res.perm, (0..cols as u32).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn singular_hessian_succeeds_with_damping_or_retries() {
        let (rows, cols) = (5, 24);
        let mut rng = Rng::new(8);
        let w = rng.normal_vec(rows * cols, 0.02);
        // Rank 4: X has 4 tokens.
        let x: Vec<f64> = (0..4 * cols).map(|_| rng.normal()).collect();
        let h = xtx(&x, 4, cols);
        let mut o = opts(4, Some(8), true);
        o.damp = 1e-9;
        let res = gptq(&w, rows, cols, &h, &o).unwrap();
        assert!(res.damp_used >= 1e-9);
        assert!(res.q.dequantize().iter().all(|v| v.is_finite()));

        // Indefinite (H01 > H00 = H11): needs damp > 2e-3, so 1e-5 is retried up to 1e-2.
        let mut h = vec![0f32; cols * cols];
        for i in 0..cols {
            h[i * cols + i] = 1.0;
        }
        h[1] = 1.002;
        h[cols] = 1.002;
        let mut o = opts(4, None, false);
        o.damp = 1e-5;
        let res = gptq(&w, rows, cols, &h, &o).unwrap();
        assert!(
            (res.damp_used - 1e-2).abs() < 1e-7,
            "damp used {}",
            res.damp_used
        );
        assert!(res.q.dequantize().iter().all(|v| v.is_finite()));

        // All ones: singular whatever the damping below f64 resolution; retries run out.
        let h = vec![1f32; cols * cols];
        o.damp = 1e-20;
        let e = gptq(&w, rows, cols, &h, &o).unwrap_err().to_string();
        assert!(e.contains("Cholesky") && e.contains("retries"), "{e}");
    }

    #[test]
    fn non_finite_hessian_is_an_error_and_zero_hessian_is_all_dead() {
        let (rows, cols) = (6, 16);
        let mut rng = Rng::new(1);
        let w = rng.normal_vec(rows * cols, 0.02);
        let mut h = hessian(&mut rng, 40, cols);
        h[5 * cols + 2] = f32::NAN;
        let e = gptq(&w, rows, cols, &h, &opts(4, Some(8), true))
            .unwrap_err()
            .to_string();
        assert!(e.contains("Hessian is not finite"), "{e}");
        h[5 * cols + 2] = f32::INFINITY;
        assert!(gptq(&w, rows, cols, &h, &opts(4, Some(8), true)).is_err());

        let h = vec![0f32; cols * cols];
        for act in [false, true] {
            let res = gptq(&w, rows, cols, &h, &opts(4, Some(8), act)).unwrap();
            assert_eq!(res.dead_columns, cols);
            let d = res.q.dequantize();
            assert!(d.iter().all(|&v| v == 0.0), "{d:?}");
            assert!(res.q.scales.iter().all(|s| s.is_finite() && *s > 0.0));
            assert_eq!(layer_output_error(&w, &d, rows, cols, &h), 0.0);
        }
    }

    #[test]
    fn rejects_bad_input() {
        let (rows, cols) = (2, 8);
        let w = vec![0.1f32; rows * cols];
        let mut h = vec![0f32; cols * cols];
        for i in 0..cols {
            h[i * cols + i] = 1.0;
        }
        let o = opts(4, Some(4), true);
        assert!(gptq(&w, rows, cols, &h, &o).is_ok());
        assert!(gptq(&w[..15], rows, cols, &h, &o).is_err());
        assert!(gptq(&w, rows, cols, &h[..63], &o).is_err());
        assert!(gptq(&w, rows, 0, &[], &o).is_err());
        let mut wn = w.clone();
        wn[3] = f32::NAN;
        assert!(gptq(&wn, rows, cols, &h, &o).is_err());
        assert!(gptq(&w, rows, cols, &h, &opts(4, Some(3), true)).is_err());
        let mut bad = o;
        bad.damp = 0.0;
        assert!(gptq(&w, rows, cols, &h, &bad).is_err());
        bad = o;
        bad.block = 0;
        assert!(gptq(&w, rows, cols, &h, &bad).is_err());
        bad = o;
        bad.spec.bits = 1;
        assert!(gptq(&w, rows, cols, &h, &bad).is_err());
    }

    #[test]
    fn act_order_g_idx_reproduces_the_loop_weights() {
        let (rows, cols) = (13, 40);
        let mut rng = Rng::new(21);
        let w = rng.normal_vec(rows * cols, 0.02);
        let h = hessian(&mut rng, 64, cols);
        for (group, stat) in [(Some(8), false), (Some(8), true), (None, false)] {
            for block in [DEFAULT_BLOCK, 16, 5] {
                let mut o = opts(4, group, true);
                o.static_groups = stat;
                o.block = block;
                let (res, deq) = gptq_with_dequantized(&w, rows, cols, &h, &o).unwrap();
                assert_eq!(res.q.dequantize(), deq, "group {group:?} static {stat}");
                assert_eq!(res.q.g_idx, group_index(&res.perm, &o.spec, stat));
                let diag: Vec<f32> = (0..cols).map(|i| h[i * cols + i]).collect();
                for p in res.perm.windows(2) {
                    assert!(diag[p[0] as usize] >= diag[p[1] as usize]);
                }
                let mut sorted = res.perm.clone();
                sorted.sort();
                assert_eq!(sorted, (0..cols as u32).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn static_groups_index_original_columns() {
        let (rows, cols) = (13, 40);
        let mut rng = Rng::new(4);
        let w = rng.normal_vec(rows * cols, 0.02);
        let h = hessian(&mut rng, 64, cols);
        let mut o = opts(4, Some(8), true);
        o.static_groups = true;
        let res = gptq(&w, rows, cols, &h, &o).unwrap();
        let want: Vec<u32> = (0..cols as u32).map(|c| c / 8).collect();
        assert_eq!(res.q.g_idx, want);
        // The grids are RTN's (fitted on W before the loop).
        let r = rtn(&w, rows, cols, &o.spec).unwrap();
        assert_eq!((&res.q.scales, &res.q.zeros), (&r.scales, &r.zeros));
        let e_g = layer_output_error(&w, &res.q.dequantize(), rows, cols, &h);
        let e_r = layer_output_error(&w, &r.dequantize(), rows, cols, &h);
        assert!(e_g < e_r, "{e_g} vs {e_r}");
    }

    #[test]
    fn mse_grid_is_no_worse_than_minmax() {
        let (rows, cols) = (13, 40);
        let mut rng = Rng::new(9);
        let mut w = rng.normal_vec(rows * cols, 0.02);
        for r in 0..rows {
            w[r * cols + (r * 7) % cols] = 0.15; // one outlier per row
        }
        let h = hessian(&mut rng, 96, cols);
        let o = opts(3, Some(8), true);
        let mut om = o;
        om.mse = true;
        let mm = gptq(&w, rows, cols, &h, &o).unwrap();
        let ms = gptq(&w, rows, cols, &h, &om).unwrap();
        assert_ne!(mm.q, ms.q);
        let e_mm = layer_output_error(&w, &mm.q.dequantize(), rows, cols, &h);
        let e_ms = layer_output_error(&w, &ms.q.dequantize(), rows, cols, &h);
        assert!(e_ms <= e_mm, "mse {e_ms} vs min-max {e_mm}");
    }

    /// Writes cases for `tools/gptq_torch.py check` (not run by `cargo test`):
    /// `WGPRESS_GPTQ_DUMP=/tmp/gptq_dump.safetensors cargo test --lib \
    ///  reference::gptq::tests::dump_for_torch_check -- --ignored`, then
    /// `python3 tools/gptq_torch.py check --dump /tmp/gptq_dump.safetensors`.
    #[test]
    #[ignore = "writes cases for tools/gptq_torch.py check; run by hand with WGPRESS_GPTQ_DUMP set"]
    fn dump_for_torch_check() {
        use safetensors::{Dtype, tensor::TensorView};
        let Ok(path) = std::env::var("WGPRESS_GPTQ_DUMP") else {
            eprintln!("set WGPRESS_GPTQ_DUMP to the output file");
            return;
        };
        let (rows, cols) = (24, 64);
        let mut rng = Rng::new(77);
        let w = rng.normal_vec(rows * cols, 0.02);
        let h = hessian(&mut rng, 200, cols);
        let mut h_dead = h.clone();
        for c in [5, 17, 40] {
            for k in 0..cols {
                h_dead[c * cols + k] = 0.0;
                h_dead[k * cols + c] = 0.0;
            }
        }
        let mut h_indef = vec![0f32; cols * cols];
        for i in 0..cols {
            h_indef[i * cols + i] = 1.0 + (i % 7) as f32 * 0.1;
        }
        h_indef[1] = 1.06;
        h_indef[cols] = 1.06;
        let spec = |bits, group, sym| QuantSpec::new(bits, group, sym).unwrap();
        let hs: [&[f32]; 3] = [&h, &h_dead, &h_indef];
        let mut cases: Vec<(GptqOptions, usize)> = Vec::new();
        let mut add = |s: QuantSpec, f: &dyn Fn(&mut GptqOptions), which: usize| {
            let mut o = GptqOptions::new(s);
            f(&mut o);
            cases.push((o, which));
        };
        add(spec(4, Some(16), false), &|_| {}, 0);
        add(spec(3, None, false), &|o| o.act_order = false, 0);
        add(spec(4, Some(16), false), &|o| o.static_groups = true, 0);
        add(spec(4, Some(16), true), &|_| {}, 0);
        add(spec(3, Some(16), false), &|o| o.mse = true, 0);
        add(
            spec(4, Some(16), false),
            &|o| {
                o.act_order = false;
                o.block = 16
            },
            0,
        );
        add(spec(4, Some(16), false), &|o| o.block = 24, 0);
        add(spec(2, Some(32), false), &|o| o.block = 8, 0);
        add(spec(4, Some(16), false), &|_| {}, 1);
        add(spec(4, Some(16), false), &|o| o.damp = 1e-5, 2);
        add(spec(8, Some(32), true), &|o| o.block = 7, 0);
        let mut bufs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut meta = Vec::new();
        let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let i32s = |v: &[u32]| {
            v.iter()
                .flat_map(|x| (*x as i32).to_le_bytes())
                .collect::<Vec<u8>>()
        };
        for (k, &(o, which)) in cases.iter().enumerate() {
            let h = hs[which];
            let (res, deq) = gptq_with_dequantized(&w, rows, cols, h, &o).unwrap();
            let g = res.q.n_groups();
            bufs.push((format!("{k}.w"), Dtype::F32, vec![rows, cols], f32s(&w)));
            bufs.push((format!("{k}.h"), Dtype::F32, vec![cols, cols], f32s(h)));
            bufs.push((
                format!("{k}.q"),
                Dtype::U8,
                vec![rows, cols],
                res.q.q.clone(),
            ));
            bufs.push((
                format!("{k}.scales"),
                Dtype::F32,
                vec![rows, g],
                f32s(&res.q.scales),
            ));
            bufs.push((
                format!("{k}.zeros"),
                Dtype::I32,
                vec![rows, g],
                i32s(&res.q.zeros),
            ));
            bufs.push((
                format!("{k}.g_idx"),
                Dtype::I32,
                vec![cols],
                i32s(&res.q.g_idx),
            ));
            bufs.push((format!("{k}.perm"), Dtype::I32, vec![cols], i32s(&res.perm)));
            bufs.push((format!("{k}.deq"), Dtype::F32, vec![rows, cols], f32s(&deq)));
            meta.push(serde_json::json!({
                "opts": o,
                "damp_used": res.damp_used,
                "dead_columns": res.dead_columns,
            }));
        }
        let views: Vec<(String, TensorView)> = bufs
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        let info = std::collections::HashMap::from([(
            "cases".to_string(),
            serde_json::Value::Array(meta).to_string(),
        )]);
        safetensors::serialize_to_file(views, Some(info), std::path::Path::new(&path)).unwrap();
        eprintln!("wrote {} cases to {path}", cases.len());
    }

    /// `cargo test --lib reference::gptq::tests::timing -- --ignored --nocapture`
    #[test]
    #[ignore = "prints the reference's wall time (no assertion on speed); run by hand with --ignored"]
    fn timing_256x512() {
        let (rows, cols) = (256, 512);
        let mut rng = Rng::new(2);
        let w = rng.normal_vec(rows * cols, 0.02);
        let h = hessian(&mut rng, 1024, cols);
        let t = std::time::Instant::now();
        let res = gptq(&w, rows, cols, &h, &opts(4, Some(128), true)).unwrap();
        eprintln!("reference gptq 256x512 g128 act-order: {:?}", t.elapsed());
        assert_eq!(res.q.q.len(), rows * cols);
    }
}
