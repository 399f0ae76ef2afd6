//! Exporters (DESIGN.md section 5): dense safetensors, GPTQ v1, compressed-tensors
//! `pack-quantized` and GGUF v3, each with the reader our round-trip tests and `wgpress eval` use;
//! plus the structural checks every quantized exporter applies to a [`QuantizedTensor`] before
//! encoding it. Exporters never quantize: the grid comes in finished.

pub mod compressed_tensors;
pub mod dense;
pub mod gguf;
pub mod gptq;

use crate::error::{Error, Result};
use crate::export::dense::NamedTensor;
use crate::model::safetensors::SafetensorsSet;
use crate::quant::QuantizedTensor;
use half::f16;
use std::path::Path;

/// Checks that a quantized tensor is internally consistent (lengths of q, scales, zeros, g_idx;
/// g_idx within the groups; integers and zeros within 0..=maxq) and that every scale is a positive,
/// finite value exactly representable in f16 (the formats store f16 scales). Errors name `file`,
/// `name` and the first offending position.
pub(crate) fn check_quantized(t: &QuantizedTensor, file: &Path, name: &str) -> Result<()> {
    let err = |p: String| Error::tensor(file, name, p);
    let (rows, cols) = (t.rows, t.cols);
    let ng = t.n_groups();
    if t.q.len() != rows * cols
        || t.scales.len() != rows * ng
        || t.zeros.len() != rows * ng
        || t.g_idx.len() != cols
    {
        return Err(err(format!(
            "inconsistent quantized tensor {rows} x {cols}, {ng} groups: q {}, scales {}, zeros {}, g_idx {}",
            t.q.len(),
            t.scales.len(),
            t.zeros.len(),
            t.g_idx.len()
        )));
    }
    let maxq = t.spec.maxq();
    if let Some(i) = t.q.iter().position(|&q| q as u32 > maxq) {
        return Err(err(format!(
            "integer {} at (row {}, col {}) exceeds {maxq} for {} bits",
            t.q[i],
            i / cols,
            i % cols,
            t.spec.bits
        )));
    }
    for (c, &g) in t.g_idx.iter().enumerate() {
        if g as usize >= ng {
            return Err(err(format!("g_idx[{c}] = {g} but there are {ng} groups")));
        }
    }
    for (i, &s) in t.scales.iter().enumerate() {
        if !(s.is_finite() && s > 0.0 && f16::from_f32(s).to_f32() == s) {
            return Err(err(format!(
                "scale {s} at (row {}, group {}) is not a positive f16 value",
                i / ng,
                i % ng
            )));
        }
    }
    if let Some(i) = t.zeros.iter().position(|&z| z > maxq) {
        return Err(err(format!(
            "zero point {} at (row {}, group {}) exceeds {maxq}",
            t.zeros[i],
            i / ng,
            i % ng
        )));
    }
    Ok(())
}

/// The first input column whose `g_idx` differs from the static map `c / group_size` (an
/// act-order permutation), or `None` when the map is static.
pub(crate) fn first_act_order_column(t: &QuantizedTensor) -> Option<usize> {
    let gs = t.spec.group_size(t.cols);
    t.g_idx
        .iter()
        .enumerate()
        .position(|(c, &g)| g as usize != c / gs)
}

/// Every tensor of a packed-quantization checkpoint as f32, sorted by name: each module whose
/// `<prefix>.<main>` exists (its other tensors being `<prefix>.<member>` for `members`) becomes
/// `<prefix>.weight` [out, in] from `dequant(prefix)` = (rows, cols, values); every other tensor
/// (biases, norms, embeddings) is read with its stored shape. The formats differ only in
/// `main`, `members` and `dequant`.
pub(crate) fn read_dequantized_with(
    set: &SafetensorsSet,
    main: &str,
    members: &[&str],
    mut dequant: impl FnMut(&str) -> Result<(usize, usize, Vec<f32>)>,
) -> Result<Vec<NamedTensor>> {
    let mut names: Vec<&str> = set.names();
    names.sort_unstable();
    let suffix = format!(".{main}");
    let prefixes: std::collections::BTreeSet<&str> = names
        .iter()
        .filter_map(|n| n.strip_suffix(suffix.as_str()))
        .collect();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let packed = name
            .rsplit_once('.')
            .filter(|(p, s)| members.contains(s) && prefixes.contains(p));
        if let Some((prefix, member)) = packed {
            if member == main {
                let (rows, cols, w) = dequant(prefix)?;
                out.push((format!("{prefix}.weight"), vec![rows, cols], w));
            }
            continue;
        }
        let shape = set.info(name)?.shape.clone();
        out.push((name.to_string(), shape, set.to_f32(name)?));
    }
    Ok(out)
}
