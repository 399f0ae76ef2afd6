//! CPU reference for the calibration statistics (`gpu::stats`): H = (2/n)·XᵀX in f64, its error
//! scale Σ_t |x_ti x_tj|, and per-column sums of squares and max |x|. X is n x d row-major f32
//! (16-bit inputs converted to f32 by the caller, as the GPU loaders do).

/// Σ_t x_ti·x_tj (d x d, f64), or Σ_t |x_ti·x_tj| with `abs`.
pub fn xtx(x: &[f32], n: usize, d: usize, abs: bool) -> Vec<f64> {
    let mut h = vec![0f64; d * d];
    for t in 0..n {
        let row = &x[t * d..(t + 1) * d];
        for i in 0..d {
            let xi = row[i] as f64;
            for j in 0..d {
                let p = xi * row[j] as f64;
                h[i * d + j] += if abs { p.abs() } else { p };
            }
        }
    }
    h
}

/// H = (2/n)·XᵀX in f64 (zeros when n = 0).
pub fn hessian(x: &[f32], n: usize, d: usize) -> Vec<f64> {
    let s = if n == 0 { 0.0 } else { 2.0 / n as f64 };
    xtx(x, n, d, false).into_iter().map(|v| v * s).collect()
}

/// Per-column (Σ_t x_tj², max_t |x_tj|) in f64.
pub fn channel_stats(x: &[f32], n: usize, d: usize) -> (Vec<f64>, Vec<f64>) {
    let mut s = vec![0f64; d];
    let mut a = vec![0f64; d];
    for t in 0..n {
        for j in 0..d {
            let v = x[t * d + j] as f64;
            s[j] += v * v;
            a[j] = a[j].max(v.abs());
        }
    }
    (s, a)
}

/// `m` (d x d, row-major) with its upper triangle replaced by the transposed lower one:
/// m[i][j] = m[j][i] for j > i (what `gpu::stats::mirror_lower` does to the lower-triangle XᵀX).
pub fn mirror_lower(m: &[f32], d: usize) -> Vec<f32> {
    let mut out = m.to_vec();
    for i in 0..d {
        for j in i + 1..d {
            out[i * d + j] = m[j * d + i];
        }
    }
    out
}
