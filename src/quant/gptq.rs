//! GPTQ (Frantar et al. 2022) as DESIGN.md section 4 defines it: the options every implementation
//! shares and the conventions that make the GPU kernels (`gpu::gptq`) and the f64 CPU reference
//! (`reference::gptq`) give the same integers.
//!
//! Conventions (both implementations follow them exactly):
//! 1. Dead columns: H_ii == 0 sets H_ii = 1 and W[:, i] = 0.
//! 2. Damping: H += damp · mean(diag H) · I, the mean taken after step 1. When the Cholesky
//!    factorization fails, damp is multiplied by 10 and the factorization retried (at most
//!    [`MAX_DAMP_RETRIES`] times); the damp actually used is reported.
//! 3. Act-order: columns are processed in the order of descending diag H (after steps 1-2; ties
//!    keep the lower index first: a stable sort). Without act-order the order is the identity.
//! 4. U = the upper Cholesky factor of H⁻¹ (in processing order), so H⁻¹ = UᵀU.
//! 5. Columns are processed in blocks of [`block_size`] positions: [`GptqOptions::block`] clamped
//!    to 1..=[`MAX_BLOCK`] and shrunk so groups nest in blocks or blocks in groups. For position i of a
//!    block: q_i = quant(w_i) on the current grid, err = (w_i - deq(q_i)) / U_ii, and every later
//!    position j of the same block gets w_j -= err · U_ij. After the block, all later positions get
//!    W[:, rest] -= Err · U[block, rest].
//! 6. Groups (without static groups) are runs of `group` consecutive *positions*; the grid of a
//!    group is fitted (min-max, or the MSE search with `mse`) on the current weights of its
//!    positions when its first position is reached, i.e. including every update made so far,
//!    in-block ones too. Without a group size, one grid per row is fitted on W before the loop.
//!    `g_idx[c]` is the group of the position column c was processed at.
//! 7. Static groups: every grid is fitted on W (after step 1) before anything else, on groups of
//!    consecutive *original* columns; column c always uses group c / group and `g_idx[c] = c / group`.

use crate::error::{Error, Result};
use crate::quant::{QuantSpec, QuantizedTensor};

/// How many times a failed Cholesky factorization is retried with ten times the damping.
pub const MAX_DAMP_RETRIES: usize = 4;

/// Default column block (the paper's B = 128).
pub const DEFAULT_BLOCK: usize = 128;

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct GptqOptions {
    pub spec: QuantSpec,
    /// Damping as a fraction of mean(diag H) (GPTQ's percdamp; default 0.01).
    pub damp: f32,
    /// Process columns in order of descending diag H.
    pub act_order: bool,
    /// Fit every group's grid before the column loop, on the original column order.
    pub static_groups: bool,
    /// Fit grids by GPTQ's MSE search over shrunk ranges instead of min-max.
    pub mse: bool,
    /// Columns per block of the lazy-update scheme.
    pub block: usize,
}

impl GptqOptions {
    pub fn new(spec: QuantSpec) -> Self {
        GptqOptions {
            spec,
            damp: 0.01,
            act_order: true,
            static_groups: false,
            mse: false,
            block: DEFAULT_BLOCK,
        }
    }

    /// Checks the options against a layer of `cols` inputs.
    pub fn validate(&self, cols: usize) -> Result<()> {
        QuantSpec::new(self.spec.bits, self.spec.group, self.spec.sym)?;
        self.spec.check_cols(cols, "gptq")?;
        if !(self.damp.is_finite() && self.damp > 0.0) {
            return Err(Error::invalid(format!(
                "gptq: --damp must be a positive number, got {}",
                self.damp
            )));
        }
        if self.block == 0 {
            return Err(Error::invalid("gptq: the column block must be positive"));
        }
        Ok(())
    }
}

/// What GPTQ produced for one layer.
#[derive(Clone, Debug)]
pub struct GptqResult {
    /// Integers, grids and g_idx in the original column order.
    pub q: QuantizedTensor,
    /// The damping fraction finally used (larger than requested after retries).
    pub damp_used: f32,
    /// Columns whose H_ii was 0 (their weights were zeroed).
    pub dead_columns: usize,
    /// Processing order: `perm[i]` is the original column processed at position i.
    pub perm: Vec<u32>,
}

/// The processing order of rule 3: identity, or descending `diag` with ties by lower index.
pub fn processing_order(diag: &[f64], act_order: bool) -> Vec<u32> {
    let mut perm: Vec<u32> = (0..diag.len() as u32).collect();
    if act_order {
        perm.sort_by(|&a, &b| diag[b as usize].total_cmp(&diag[a as usize]));
    }
    perm
}

/// `g_idx` of rules 6-7 for a processing order.
pub fn group_index(perm: &[u32], spec: &QuantSpec, static_groups: bool) -> Vec<u32> {
    let cols = perm.len();
    let g = spec.group_size(cols);
    let mut g_idx = vec![0u32; cols];
    for (pos, &c) in perm.iter().enumerate() {
        g_idx[c as usize] = if static_groups {
            c / g as u32
        } else {
            (pos / g) as u32
        };
    }
    g_idx
}

/// Widest column block (the GPU's fused column loop holds one block per workgroup).
pub const MAX_BLOCK: usize = 128;

/// The block every implementation uses (rule 5) for group size `g` (positions) and requested
/// block `b`: `b` clamped to 1..=[`MAX_BLOCK`], then shrunk so that groups either fit whole
/// blocks (b a multiple of g) or are whole numbers of blocks (g a multiple of b). A group then
/// never straddles a block, so its grid (rule 6) sees every update before it.
pub fn block_size(g: Option<usize>, b: usize) -> usize {
    let b = b.clamp(1, MAX_BLOCK);
    match g {
        None => b,
        Some(g) if g <= b => g * (b / g),
        Some(g) => (1..=b).rev().find(|d| g.is_multiple_of(*d)).unwrap_or(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn act_order_is_descending_and_stable() {
        let perm = processing_order(&[1.0, 3.0, 2.0, 3.0], true);
        assert_eq!(perm, vec![1, 3, 2, 0]);
        assert_eq!(processing_order(&[1.0, 3.0], false), vec![0, 1]);
    }

    #[test]
    fn group_index_follows_positions_unless_static() {
        let spec = QuantSpec::new(4, Some(2), false).unwrap();
        let perm = vec![3, 0, 2, 1];
        assert_eq!(group_index(&perm, &spec, false), vec![0, 1, 1, 0]);
        assert_eq!(group_index(&perm, &spec, true), vec![0, 0, 1, 1]);
    }

    #[test]
    fn options_are_validated() {
        let spec = QuantSpec::new(4, Some(32), false).unwrap();
        assert!(GptqOptions::new(spec).validate(64).is_ok());
        assert!(GptqOptions::new(spec).validate(48).is_err());
        let mut o = GptqOptions::new(spec);
        o.damp = -1.0;
        assert!(o.validate(64).is_err());
    }
}
