//! CPU reference matrix multiply in f64 (the inputs are f32 values; 16-bit inputs are converted to
//! f32 by the caller, exactly as the GPU loaders do).

/// C = A * B (layout NN: B is k x n) or A * B^T (NT: B is n x k), all row-major, accumulated in f64.
pub fn matmul(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, b_trans: bool) -> Vec<f64> {
    let mut c = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for t in 0..k {
                let bv = if b_trans { b[j * k + t] } else { b[t * n + j] };
                s += a[i * k + t] as f64 * bv as f64;
            }
            c[i * n + j] = s;
        }
    }
    c
}

/// Sum over k of |a| * |b| per output: the scale that bounds floating-point error of the product.
pub fn abs_matmul(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, b_trans: bool) -> Vec<f64> {
    let aa: Vec<f32> = a.iter().map(|x| x.abs()).collect();
    let bb: Vec<f32> = b.iter().map(|x| x.abs()).collect();
    matmul(&aa, &bb, m, n, k, b_trans)
}

/// Xᵀ (cols x rows) of a row-major rows x cols matrix.
pub fn transpose<T: Copy>(x: &[T], rows: usize, cols: usize) -> Vec<T> {
    (0..cols * rows)
        .map(|i| x[(i % rows) * cols + i / rows])
        .collect()
}

/// One operand of a split product as `shaders/split.wgsl` writes it, as f16 bits: line `l`,
/// position `t` of the source is `x[l * ls + t * ks]` (`lines` x `k`); the output has three
/// segments of `kp` rows of `lp` lines (hi, hi, lo with `lo_seg` = 2; hi, lo, hi with 1), then
/// `lp` exponents. Each line is scaled by 2^e, e bringing its largest magnitude into
/// [2^13, 2^14) (clamped to +-60; 0 for zero or non-finite), hi is the scaled element's top 11
/// significant bits and lo the f16 rounding of the rest; padding is zero.
#[allow(clippy::too_many_arguments)]
pub fn split_operand(
    x: &[f32],
    lines: usize,
    k: usize,
    ls: usize,
    ks: usize,
    lp: usize,
    kp: usize,
    lo_seg: usize,
) -> Vec<u16> {
    use half::f16;
    let mut out = vec![0u16; (3 * kp + 1) * lp];
    for l in 0..lp {
        let live = l < lines;
        let m = if live {
            (0..k).fold(0f32, |m, t| m.max(x[l * ls + t * ks].abs()))
        } else {
            0.0
        };
        let e: i32 = if m > 0.0 && m <= 3.0e38 {
            // frexp: m = f 2^ex with f in [0.5, 1).
            let ex = (m as f64).log2().floor() as i32 + 1;
            (14 - ex).clamp(-60, 60)
        } else {
            0
        };
        out[3 * kp * lp + l] = f16::from_f32(e as f32).to_bits();
        for t in 0..kp {
            let v = if live && t < k {
                (x[l * ls + t * ks] as f64 * 2f64.powi(e)) as f32
            } else {
                0.0
            };
            let hi = f32::from_bits(v.to_bits() & 0xffff_e000);
            let (h, lo) = (f16::from_f32(hi).to_bits(), f16::from_f32(v - hi).to_bits());
            let segs = if lo_seg == 1 { [h, lo, h] } else { [h, h, lo] };
            for (s, bits) in segs.into_iter().enumerate() {
                out[(s * kp + t) * lp + l] = bits;
            }
        }
    }
    out
}
