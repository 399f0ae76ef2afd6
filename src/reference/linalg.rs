//! CPU reference for `gpu::linalg`, in f64 and written plainly: Cholesky factorization, inverse of
//! a lower-triangular matrix, and the upper Cholesky factor of an inverse (what GPTQ needs).
//! Matrices are row-major n x n slices. Nothing here may call into `gpu/`.

use crate::error::{Error, Result};

/// Lower L with a = L·Lᵀ; an error names the first pivot that is not positive.
pub fn cholesky(a: &[f64], n: usize) -> Result<Vec<f64>> {
    cholesky_pivot(a, n).map_err(|(j, d)| {
        Error::invalid(format!(
            "cholesky: pivot {j} is {d} (the matrix is not positive definite)"
        ))
    })
}

/// [`cholesky`] reading only the lower triangle of `a`; a failure returns the first pivot's
/// position and value (callers such as GPTQ's damping retry build their own message).
pub fn cholesky_pivot(a: &[f64], n: usize) -> std::result::Result<Vec<f64>, (usize, f64)> {
    let mut l = vec![0f64; n * n];
    for j in 0..n {
        let mut d = a[j * n + j];
        for k in 0..j {
            d -= l[j * n + k] * l[j * n + k];
        }
        if !(d > 0.0 && d.is_finite()) {
            return Err((j, d));
        }
        let djj = d.sqrt();
        l[j * n + j] = djj;
        for i in j + 1..n {
            let mut s = a[i * n + j];
            for k in 0..j {
                s -= l[i * n + k] * l[j * n + k];
            }
            l[i * n + j] = s / djj;
        }
    }
    Ok(l)
}

/// inv(L) for a lower-triangular L with nonzero diagonal (forward substitution per column).
pub fn lower_inverse(l: &[f64], n: usize) -> Vec<f64> {
    let mut x = vec![0f64; n * n];
    for c in 0..n {
        for i in c..n {
            let mut s = if i == c { 1.0 } else { 0.0 };
            for k in c..i {
                s -= l[i * n + k] * x[k * n + c];
            }
            x[i * n + c] = s / l[i * n + i];
        }
    }
    x
}

/// The upper-triangular U with inv(a) = Uᵀ·U: a's inverse formed from its Cholesky factor, then
/// factored again and transposed (the textbook route, deliberately not the GPU's reversal trick).
pub fn upper_cholesky_of_inverse(a: &[f64], n: usize) -> Result<Vec<f64>> {
    let l = cholesky(a, n)?;
    let li = lower_inverse(&l, n);
    // inv(a) = inv(L)ᵀ · inv(L)
    let mut inv = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            let mut s = 0.0;
            for k in i.max(j)..n {
                s += li[k * n + i] * li[k * n + j];
            }
            inv[i * n + j] = s;
        }
    }
    let l2 = cholesky(&inv, n)?;
    let mut u = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            u[i * n + j] = l2[j * n + i];
        }
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factors_reproduce_the_matrix_and_its_inverse() {
        let n = 7;
        let mut rng = crate::rng::Rng::new(3);
        let x: Vec<f64> = (0..n * 11).map(|_| rng.normal()).collect();
        let mut a = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = (0..11).map(|t| x[t * n + i] * x[t * n + j]).sum::<f64>()
                    + if i == j { 0.1 } else { 0.0 };
            }
        }
        let u = upper_cholesky_of_inverse(&a, n).unwrap();
        // a · (Uᵀ U) = I
        for i in 0..n {
            for j in 0..n {
                let mut s = 0.0;
                for k in 0..n {
                    let inv_kj: f64 = (0..n).map(|t| u[t * n + k] * u[t * n + j]).sum();
                    s += a[i * n + k] * inv_kj;
                }
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((s - want).abs() < 1e-9, "({i},{j}) {s}");
            }
            for j in 0..i {
                assert_eq!(u[i * n + j], 0.0);
            }
        }
        assert!(cholesky(&[-1.0], 1).is_err());
    }
}
