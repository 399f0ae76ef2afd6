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
