//! CPU reference for round-to-nearest (RTN) quantization: fits each (row, group) grid with
//! [`QuantSpec::fit`] and quantizes with [`QuantSpec::quantize`], i.e. the grid definition itself,
//! so the GPU kernel in `gpu::quant` is judged against it; and for dequantizing stored integers
//! ([`dequantize_packed`], the reference of `gpu::quant::dequantize_packed`). RTN is also the CPU
//! fallback when no adapter exists, so both validate their inputs and return errors instead of
//! panicking. It must not call into `gpu/` nor redefine any part of the grid.

use crate::error::{Error, Result};
use crate::quant::{GroupParams, QuantSpec, QuantizedTensor};

/// Quantizes the row-major `rows x cols` matrix `w` with `spec` (groups along the columns).
pub fn rtn(w: &[f32], rows: usize, cols: usize, spec: &QuantSpec) -> Result<QuantizedTensor> {
    // Re-validate: a spec built by struct literal bypasses `QuantSpec::new`.
    let spec = QuantSpec::new(spec.bits, spec.group, spec.sym)?;
    if cols == 0 {
        return Err(Error::invalid(
            "rtn: a weight matrix needs at least one column",
        ));
    }
    spec.check_cols(cols, "rtn")?;
    if w.len() != rows * cols {
        return Err(Error::Shape {
            op: "rtn".into(),
            expected: format!("{} values for {rows}x{cols}", rows * cols),
            got: format!("{} values", w.len()),
        });
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(format!(
            "rtn: weight at row {}, column {} is {} (weights must be finite)",
            i / cols,
            i % cols,
            w[i]
        )));
    }
    let group = spec.group_size(cols);
    let n_groups = spec.n_groups(cols);
    let mut scales = Vec::with_capacity(rows * n_groups);
    let mut zeros = Vec::with_capacity(rows * n_groups);
    let mut q = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let row = &w[r * cols..(r + 1) * cols];
        for g in 0..n_groups {
            let seg = &row[g * group..((g + 1) * group).min(cols)];
            let p = spec.fit(seg);
            scales.push(p.scale);
            zeros.push(p.zero);
            // quantize() clamps to 0..=maxq <= 255, so the narrowing cannot lose information.
            q.extend(seg.iter().map(|&v| spec.quantize(v, p) as u8));
        }
    }
    Ok(QuantizedTensor {
        rows,
        cols,
        spec,
        q,
        scales,
        zeros,
        g_idx: (0..cols).map(|c| (c / group) as u32).collect(),
    })
}

/// Dequantizes `rows` rows of integers packed four per u32 (byte j of word k is column 4k + j;
/// rows padded to whole words, the layout `gpu::quant::quantize_packed` writes), with the
/// per-(row, group) `scales` and `zeros` (`rows x n_groups`, row-major) and the column -> group
/// map `g_idx` (`cols` entries): each value is [`GroupParams::dequantize`] of its group's
/// parameters, one element at a time.
pub fn dequantize_packed(
    packed: &[u32],
    rows: usize,
    scales: &[f32],
    zeros: &[u32],
    g_idx: &[u32],
    spec: &QuantSpec,
) -> Result<Vec<f32>> {
    let cols = g_idx.len();
    let (words, ng) = (cols.div_ceil(4), spec.n_groups(cols.max(1)));
    if packed.len() != rows * words || scales.len() != rows * ng || zeros.len() != rows * ng {
        return Err(Error::Shape {
            op: "dequantize_packed".into(),
            expected: format!(
                "{} words and {} scales and zeros for {rows}x{cols}",
                rows * words,
                rows * ng
            ),
            got: format!(
                "{} words, {} scales, {} zeros",
                packed.len(),
                scales.len(),
                zeros.len()
            ),
        });
    }
    if let Some(c) = g_idx.iter().position(|&g| g as usize >= ng) {
        return Err(Error::invalid(format!(
            "dequantize_packed: g_idx[{c}] = {} but the rows have {ng} groups",
            g_idx[c]
        )));
    }
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for (c, &g) in g_idx.iter().enumerate() {
            let q = (packed[r * words + c / 4] >> (8 * (c % 4))) & 0xFF;
            let i = r * ng + g as usize;
            let p = GroupParams {
                scale: scales[i],
                zero: zeros[i],
            };
            out.push(p.dequantize(q));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_grid_and_rejects_bad_input() {
        let spec = QuantSpec::new(4, Some(4), false).unwrap();
        let w = [0.0, 0.1, -0.3, 0.7, 1.0, 1.0, 1.0, 1.0];
        let t = rtn(&w, 1, 8, &spec).unwrap();
        assert_eq!(t.g_idx, vec![0, 0, 0, 0, 1, 1, 1, 1]);
        let p = spec.fit(&w[..4]);
        assert_eq!((t.scales[0], t.zeros[0]), (p.scale, p.zero));
        assert_eq!(t.q[2] as u32, spec.quantize(-0.3, p));
        assert!(t.scales.iter().all(|s| s.is_finite() && *s > 0.0));
        assert!(rtn(&w, 1, 7, &spec).is_err());
        assert!(rtn(&w[..6], 1, 6, &spec).is_err());
        assert!(rtn(&[f32::NAN; 4], 1, 4, &spec).is_err());
        let bad = QuantSpec {
            bits: 9,
            group: None,
            sym: true,
        };
        assert!(rtn(&w, 1, 8, &bad).is_err());
    }
}
