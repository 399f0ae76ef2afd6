//! CPU reference for the row/group reductions of `gpu::reduce`: min, max, max |x| and sum of
//! squares over consecutive groups of columns, and the per-row dot product of two matrices, accumulated in f64 in plain index order so the
//! result is obviously right. It must stay simple (no blocking, no SIMD tricks) and must not call
//! into `gpu/`: the GPU kernels are judged against it.

use crate::error::{Error, Result};

/// A reduction over one group of columns. Defined here (plain data, no wgpu) and re-exported by
/// `gpu::reduce`, so the reference never depends on the GPU module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Min,
    Max,
    /// max |x|
    AbsMax,
    /// sum of x²
    SumSq,
}

impl ReduceOp {
    pub const ALL: [ReduceOp; 4] = [
        ReduceOp::Min,
        ReduceOp::Max,
        ReduceOp::AbsMax,
        ReduceOp::SumSq,
    ];
}

/// Reduces each group of `group` consecutive columns of the row-major `rows x cols` matrix `x`;
/// the last group of a row may be shorter when `group` does not divide `cols`. Returns
/// `rows x ceil(cols / group)` values, row-major.
pub fn reduce_groups(
    x: &[f32],
    rows: usize,
    cols: usize,
    group: usize,
    op: ReduceOp,
) -> Result<Vec<f64>> {
    if group == 0 {
        return Err(Error::invalid("reduce: group size must be positive"));
    }
    if x.len() != rows * cols {
        return Err(Error::Shape {
            op: "reduce".into(),
            expected: format!("{} values for {rows}x{cols}", rows * cols),
            got: format!("{} values", x.len()),
        });
    }
    let n_groups = cols.div_ceil(group);
    let mut out = Vec::with_capacity(rows * n_groups);
    for r in 0..rows {
        let row = &x[r * cols..(r + 1) * cols];
        for g in 0..n_groups {
            let seg = &row[g * group..((g + 1) * group).min(cols)];
            let vals = seg.iter().map(|&v| v as f64);
            out.push(match op {
                ReduceOp::Min => vals.fold(f64::INFINITY, f64::min),
                ReduceOp::Max => vals.fold(f64::NEG_INFINITY, f64::max),
                ReduceOp::AbsMax => vals.fold(0.0f64, |a, v| a.max(v.abs())),
                ReduceOp::SumSq => vals.map(|v| v * v).sum(),
            });
        }
    }
    Ok(out)
}

/// Per-row reduction: `reduce_groups` with one group per row.
pub fn reduce_rows(x: &[f32], rows: usize, cols: usize, op: ReduceOp) -> Result<Vec<f64>> {
    reduce_groups(x, rows, cols, cols.max(1), op)
}

/// Σ_c a[r, c]·b[r, c] per row of two row-major `rows x cols` matrices, in f64.
pub fn dot_rows(a: &[f32], b: &[f32], rows: usize, cols: usize) -> Result<Vec<f64>> {
    if a.len() != rows * cols || b.len() != rows * cols {
        return Err(Error::Shape {
            op: "dot_rows".into(),
            expected: format!("two x {} values for {rows}x{cols}", rows * cols),
            got: format!("{} and {} values", a.len(), b.len()),
        });
    }
    Ok((0..rows)
        .map(|r| {
            let (ra, rb) = (&a[r * cols..(r + 1) * cols], &b[r * cols..(r + 1) * cols]);
            ra.iter().zip(rb).map(|(&x, &y)| x as f64 * y as f64).sum()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_with_a_short_tail() {
        let x = [1.0, -2.0, 3.0, 0.5, -0.25, 4.0, 2.0];
        let g = |op| reduce_groups(&x, 1, 7, 3, op).unwrap();
        assert_eq!(g(ReduceOp::Min), vec![-2.0, -0.25, 2.0]);
        assert_eq!(g(ReduceOp::Max), vec![3.0, 4.0, 2.0]);
        assert_eq!(g(ReduceOp::AbsMax), vec![3.0, 4.0, 2.0]);
        assert_eq!(g(ReduceOp::SumSq), vec![14.0, 16.3125, 4.0]);
        assert_eq!(reduce_rows(&x, 1, 7, ReduceOp::Min).unwrap(), vec![-2.0]);
        assert!(reduce_groups(&x, 2, 7, 3, ReduceOp::Min).is_err());
        assert!(reduce_groups(&x, 1, 7, 0, ReduceOp::Min).is_err());
        assert_eq!(
            dot_rows(&x[..6], &x[1..], 2, 3).unwrap(),
            vec![-2.0 - 6.0 + 1.5, -0.125 - 1.0 + 8.0]
        );
        assert!(dot_rows(&x, &x, 2, 3).is_err());
    }
}
