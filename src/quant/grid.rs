//! The quantizer grid: the one description of "b-bit integers with a scale and zero per group" that
//! RTN, GPTQ, SparseGPT+quant, every exporter and the CPU reference share (DESIGN.md section 4).
//!
//! Rules that make results reproducible across adapters and formats:
//! - the range always contains 0 (min is clamped to <= 0 and max to >= 0, as GPTQ's quantizer does),
//!   so the zero point lies on the grid and all-positive groups stay representable;
//! - a degenerate range (all zero) becomes [-1, 1] so the scale is finite;
//! - the scale is rounded to the nearest f16 (ties to even) before any weight is quantized, so the
//!   f16 scales that GPTQ/GGUF files store reproduce our dequantized weights bit for bit;
//! - the scale is clamped to the normal f16 range [2^-14, 65504];
//! - an asymmetric zero point is never 0 (GPTQ v1 stores zero - 1): a group whose minimum rounds
//!   to zero steps is spanned as [0, max] with maxq - 1 steps and zero 1;
//! - `q = clamp(round_ties_even(w / scale) + zero, 0, maxq)`: ties round to even, as `torch.round`
//!   and WGSL `round` do.

use crate::error::{Error, Result};
use half::f16;

/// Bits, group size and symmetry of a quantizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QuantSpec {
    pub bits: u8,
    /// Input columns per group; `None` means one group per row (per-channel).
    pub group: Option<usize>,
    pub sym: bool,
}

/// Scale and integer zero point of one group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupParams {
    pub scale: f32,
    pub zero: u32,
}

const F16_MIN_NORMAL: f32 = 6.103_515_6e-5;
const F16_MAX: f32 = 65504.0;

impl QuantSpec {
    pub fn new(bits: u8, group: Option<usize>, sym: bool) -> Result<Self> {
        let s = QuantSpec { bits, group, sym };
        if !(2..=8).contains(&bits) {
            return Err(Error::invalid(format!("bits must be in 2..=8, got {bits}")));
        }
        if group == Some(0) {
            return Err(Error::invalid("group size must be positive"));
        }
        Ok(s)
    }

    pub fn maxq(&self) -> u32 {
        (1u32 << self.bits) - 1
    }

    /// Group size in effect for rows of `cols` inputs.
    pub fn group_size(&self, cols: usize) -> usize {
        self.group.unwrap_or(cols).min(cols.max(1))
    }

    pub fn n_groups(&self, cols: usize) -> usize {
        cols.div_ceil(self.group_size(cols))
    }

    /// Checks that the group size divides the input dimension (formats need whole groups).
    pub fn check_cols(&self, cols: usize, what: &str) -> Result<()> {
        if let Some(g) = self.group
            && !cols.is_multiple_of(g)
        {
            return Err(Error::invalid(format!(
                "{what}: group size {g} does not divide the input dimension {cols}"
            )));
        }
        Ok(())
    }

    /// Fits the grid of one group from its minimum and maximum.
    pub fn fit_minmax(&self, min: f32, max: f32) -> GroupParams {
        let maxq = self.maxq() as f32;
        let mut lo = min.min(0.0);
        let mut hi = max.max(0.0);
        if self.sym {
            let amax = (-lo).max(hi);
            let amax = if amax == 0.0 { 1.0 } else { amax };
            let scale = round_scale(2.0 * amax / maxq);
            GroupParams {
                scale,
                zero: self.maxq().div_ceil(2),
            }
        } else {
            if lo == 0.0 && hi == 0.0 {
                lo = -1.0;
                hi = 1.0;
            }
            let scale = round_scale((hi - lo) / maxq);
            let zero = (-lo / scale).round_ties_even().clamp(0.0, maxq) as u32;
            if zero == 0 {
                // GPTQ v1 files store zero - 1 and runtimes add 1 back without wrapping, so a zero
                // of 0 cannot be stored. The range then is [lo, hi] with lo > -scale/2: spanning
                // [0, hi] with maxq - 1 steps and zero 1 still covers lo (>= -new scale).
                return GroupParams {
                    scale: round_scale(hi / (maxq - 1.0)),
                    zero: 1,
                };
            }
            GroupParams { scale, zero }
        }
    }

    /// Fits the grid of one group of values.
    pub fn fit(&self, values: &[f32]) -> GroupParams {
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        for &v in values {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if values.is_empty() {
            (lo, hi) = (0.0, 0.0);
        }
        self.fit_minmax(lo, hi)
    }

    /// Fits the grid of one group by GPTQ's MSE search: the range [lo, hi] (containing 0) is
    /// shrunk by each factor of [`mse_shrink_factors`] and the candidate with the lowest
    /// sum |dequant(q(x)) - x|^2.4 wins (the first one on ties; factor 1 is min-max itself).
    pub fn fit_mse(&self, values: &[f32]) -> GroupParams {
        let (mut lo, mut hi) = (0f32, 0f32);
        for &v in values {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        let mut best = self.fit_minmax(lo, hi);
        let mut best_err = f32::INFINITY;
        for p in mse_shrink_factors() {
            let cand = self.fit_minmax(p * lo, p * hi);
            let err: f32 = values
                .iter()
                .map(|&v| {
                    (cand.dequantize(self.quantize(v, cand)) - v)
                        .abs()
                        .powf(MSE_NORM)
                })
                .sum();
            if err < best_err {
                best_err = err;
                best = cand;
            }
        }
        best
    }

    pub fn quantize(&self, w: f32, p: GroupParams) -> u32 {
        ((w / p.scale).round_ties_even() + p.zero as f32).clamp(0.0, self.maxq() as f32) as u32
    }
}

impl GroupParams {
    pub fn dequantize(&self, q: u32) -> f32 {
        self.scale * (q as f32 - self.zero as f32)
    }
}

/// Exponent of the error norm in the MSE grid search (GPTQ's `norm=2.4`).
pub const MSE_NORM: f32 = 2.4;

/// The shrink factors of the MSE grid search: 1 - i/100 for i in 0..80 (GPTQ's `grid=100`,
/// `maxshrink=0.8`), computed once in f32 so every implementation uses the same values.
pub fn mse_shrink_factors() -> Vec<f32> {
    (0..80).map(|i| 1.0 - i as f32 / 100.0).collect()
}

/// Rounds a positive scale to the nearest f16 within the normal range.
pub fn round_scale(s: f32) -> f32 {
    f16::from_f32(s.clamp(F16_MIN_NORMAL, F16_MAX)).to_f32()
}

/// A quantized out x in matrix: integers, per-(row, group) parameters and the column -> group map.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedTensor {
    pub rows: usize,
    pub cols: usize,
    pub spec: QuantSpec,
    /// Row-major integers in 0..=maxq.
    pub q: Vec<u8>,
    /// `scales[r * n_groups + g]`, each exactly representable in f16.
    pub scales: Vec<f32>,
    /// `zeros[r * n_groups + g]` in 0..=maxq.
    pub zeros: Vec<u32>,
    /// Group of each input column (identity order `c / group` unless act-order permuted it).
    pub g_idx: Vec<u32>,
}

impl QuantizedTensor {
    pub fn n_groups(&self) -> usize {
        self.spec.n_groups(self.cols)
    }

    pub fn params(&self, row: usize, group: usize) -> GroupParams {
        let i = row * self.n_groups() + group;
        GroupParams {
            scale: self.scales[i],
            zero: self.zeros[i],
        }
    }

    /// Dequantized weights, row-major f32 (rows on all cores; each value is exactly
    /// [`GroupParams::dequantize`] of its group's parameters).
    pub fn dequantize(&self) -> Vec<f32> {
        let (cols, ng) = (self.cols, self.n_groups());
        let mut out = vec![0f32; self.rows * cols];
        if cols == 0 {
            return out;
        }
        let rows_per = crate::par::PIECE.div_ceil(cols);
        crate::par::for_chunks_mut(&mut out, rows_per * cols, |start, o| {
            for (i, row) in o.chunks_mut(cols).enumerate() {
                let r = start / cols + i;
                let (scales, zeros) = (
                    &self.scales[r * ng..(r + 1) * ng],
                    &self.zeros[r * ng..(r + 1) * ng],
                );
                let q = &self.q[r * cols..(r + 1) * cols];
                for ((d, &qv), &g) in row.iter_mut().zip(q).zip(&self.g_idx) {
                    let g = g as usize;
                    *d = scales[g] * (qv as f32 - zeros[g] as f32);
                }
            }
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_round_to_even_and_degenerate_rows_are_finite() {
        let s = QuantSpec::new(4, None, false).unwrap();
        let p = s.fit(&[0.0; 8]);
        assert!(p.scale.is_finite() && p.scale > 0.0);
        let p = GroupParams {
            scale: 1.0,
            zero: 8,
        };
        assert_eq!(s.quantize(0.5, p), 8);
        assert_eq!(s.quantize(1.5, p), 10);
        assert_eq!(s.quantize(-2.5, p), 6);
        assert_eq!(s.quantize(100.0, p), 15);
        assert_eq!(s.quantize(-100.0, p), 0);
    }

    #[test]
    fn symmetric_zero_is_midpoint_and_scale_is_f16() {
        let s = QuantSpec::new(3, Some(4), true).unwrap();
        let p = s.fit(&[0.3, -0.71, 0.2, 0.05]);
        assert_eq!(p.zero, 4);
        assert_eq!(f16::from_f32(p.scale).to_f32(), p.scale);
        assert!((p.scale - 2.0 * 0.71 / 7.0).abs() < 1e-3);
    }

    #[test]
    fn asymmetric_zero_is_never_zero_and_covers_the_range() {
        for bits in 2..=8u8 {
            let s = QuantSpec::new(bits, None, false).unwrap();
            for vals in [[0.1f32, 0.5, 0.9, 0.3], [-0.001, 0.2, 0.7, 0.05]] {
                let p = s.fit(&vals);
                assert!(p.zero >= 1, "bits {bits}: zero {}", p.zero);
                for v in vals {
                    let q = s.quantize(v, p);
                    assert!(
                        (p.dequantize(q) - v).abs() <= p.scale * 0.5 + 1e-6,
                        "bits {bits} v {v}"
                    );
                }
            }
        }
    }

    #[test]
    fn mse_search_never_loses_to_minmax_and_shrinks_outlier_ranges() {
        let s = QuantSpec::new(3, None, false).unwrap();
        let mut rng = crate::rng::Rng::new(5);
        let mut vals: Vec<f32> = (0..128).map(|_| rng.normal() as f32 * 0.02).collect();
        vals[7] = 0.3; // an outlier that min-max would spend the whole range on
        let err = |p: GroupParams| -> f32 {
            vals.iter()
                .map(|&v| (p.dequantize(s.quantize(v, p)) - v).abs().powf(MSE_NORM))
                .sum()
        };
        let mm = s.fit(&vals);
        let mse = s.fit_mse(&vals);
        assert!(err(mse) <= err(mm));
        assert!(mse.scale < mm.scale, "{} vs {}", mse.scale, mm.scale);
    }

    #[test]
    fn rejects_bad_specs() {
        assert!(QuantSpec::new(1, None, false).is_err());
        assert!(QuantSpec::new(9, None, false).is_err());
        assert!(QuantSpec::new(4, Some(0), false).is_err());
        let s = QuantSpec::new(4, Some(32), false).unwrap();
        assert!(s.check_cols(96, "x").is_ok());
        assert!(s.check_cols(100, "x").is_err());
    }
}
