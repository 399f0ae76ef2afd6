//! compressed-tensors `pack-quantized` export (DESIGN.md section 5; what vLLM and llm-compressor
//! load) and our own reader of it for round-trip checks and `wgpress eval`.
//!
//! The conventions are those of the `compressed-tensors` PyPI package, version 0.20.1
//! (`compressors/pack_quantized/{base,helpers}.py`, `quantization/lifecycle/forward{,_helpers}.py`):
//! - the package's integers are signed, `q_s` in [−2^(b−1), 2^(b−1) − 1], and dequantize as
//!   `(q_s − zp_s) · scale` (zero point only when asymmetric). Packing stores `q_s + 2^(b−1)`
//!   unsigned. With our unsigned grid (q in 0..=maxq, zero z, w = s·(q − z)) that means: the stored
//!   value IS our `q`; an asymmetric zero point is stored as our `z` (zp_s = z − 2^(b−1)); a
//!   symmetric grid has no zero point and is exact only when z = 2^(b−1), which we require;
//! - `<prefix>.weight_packed` int32 [out, ceil(in·b/32)]: each row is a little-endian bit stream,
//!   value k at bits k·b.. (LSB = lowest input index), zero padding at the end of the row;
//! - `<prefix>.weight_scale` f16 [out, G] (G = 1 for strategy `channel`): always f16, whatever
//!   the dtype of the other tensors, because our scales are exactly f16 and the package
//!   dequantizes in the scale's dtype;
//! - `<prefix>.weight_zero_point` int32 [ceil(out·b/32), G], asymmetric only: the zero points
//!   packed the same way along dim 0 (the output dim), as `pack_to_int32(zp, b, packed_dim=0)`;
//! - `<prefix>.weight_shape` int64 [2] = [out, in];
//! - no `weight_g_idx`: version 0.20 removed `actorder: "group"` (its config validator rejects
//!   it), so act-order tensors (a non-identity g_idx) are refused with an error;
//! - `config.json["quantization_config"]`: quant_method `compressed-tensors`, format
//!   `pack-quantized`, one config group targeting `Linear`, `ignore: ["lm_head"]`,
//!   quantization_status `compressed`.
//!
//! Bits: 2, 4 and 8 only. Those widths lay out identically in every package version; 3, 5, 6 and 7
//! bits are refused, because the package changed their layout (older versions put
//! floor(32/b) values per word, 0.20 packs them densely across words) and a file could not say
//! which one it uses.
//!
//! This module does not quantize, does not parse safetensors itself (reading goes through
//! [`SafetensorsSet`]) and does not commit the output.

use crate::error::{Error, Result};
use crate::export::dense::{NamedTensor, WEIGHTS_FILE, encode_floats, finish_checkpoint};
use crate::export::gptq::ExportTensor;
use crate::export::{check_quantized, first_act_order_column, read_dequantized_with};
use crate::model::safetensors::SafetensorsSet;
use crate::model::writer::{OutputDir, SafetensorsStream, TensorOut};
use crate::quant::{QuantSpec, QuantizedTensor};
use half::f16;
use safetensors::Dtype;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Bit widths this exporter writes.
pub const SUPPORTED_BITS: [u8; 3] = [2, 4, 8];

/// The `quant_method` value in config.json.
pub const QUANT_METHOD: &str = "compressed-tensors";
/// The `format` value in config.json.
pub const FORMAT: &str = "pack-quantized";

/// Checks that a grid can be written as compressed-tensors `pack-quantized`.
pub fn check_spec(spec: &QuantSpec) -> Result<()> {
    if !SUPPORTED_BITS.contains(&spec.bits) {
        return Err(Error::invalid(format!(
            "compressed-tensors export supports 2, 4 or 8 bits, got {}: the package's packing of other widths differs between its versions (use --bits 4 or 8, or --format gptq for 3 bits)",
            spec.bits
        )));
    }
    Ok(())
}

/// Packs `n_streams` streams of `len` values of `bits` bits into [n_streams, ceil(len·bits/32)]
/// words (dense little-endian bit streams, zero padded), as `pack_to_int32` does.
fn pack_rows(
    n_streams: usize,
    len: usize,
    bits: u8,
    get: impl Fn(usize, usize) -> u32,
) -> Vec<u32> {
    let b = bits as usize;
    let words = (len * b).div_ceil(32);
    let mut out = vec![0u32; n_streams * words];
    for s in 0..n_streams {
        let row = &mut out[s * words..(s + 1) * words];
        for k in 0..len {
            let v = get(s, k);
            let p = k * b;
            row[p / 32] |= v << (p % 32);
            if p % 32 + b > 32 {
                row[p / 32 + 1] |= v >> (32 - p % 32);
            }
        }
    }
    out
}

/// Inverse of [`pack_rows`]: calls `put(stream, k, value)`.
fn unpack_rows(
    packed: &[u32],
    n_streams: usize,
    len: usize,
    bits: u8,
    mut put: impl FnMut(usize, usize, u32),
) {
    let b = bits as usize;
    let words = (len * b).div_ceil(32);
    let mask = (1u32 << b) - 1;
    for s in 0..n_streams {
        let row = &packed[s * words..(s + 1) * words];
        for k in 0..len {
            let p = k * b;
            let mut v = row[p / 32] >> (p % 32);
            if p % 32 + b > 32 {
                v |= row[p / 32 + 1] << (32 - p % 32);
            }
            put(s, k, v & mask);
        }
    }
}

fn u32_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The `weights` quantization args of the one config group.
fn weight_args(spec: &QuantSpec) -> serde_json::Value {
    let (strategy, group) = match spec.group {
        Some(g) => ("group", serde_json::json!(g)),
        None => ("channel", serde_json::Value::Null),
    };
    serde_json::json!({
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": spec.sym,
        "strategy": strategy,
        "group_size": group,
        "actorder": null,
        "block_structure": null,
        "dynamic": false,
        "observer": "minmax",
    })
}

/// config.json's `quantization_config` for a grid.
pub fn quantization_config(spec: &QuantSpec) -> serde_json::Value {
    serde_json::json!({
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weight_args(spec),
                "input_activations": null,
                "output_activations": null,
                "format": FORMAT,
            }
        },
        "ignore": ["lm_head"],
        "quantization_status": "compressed",
        "kv_cache_scheme": null,
        "sparsity_config": {},
        "global_compression_ratio": null,
    })
}

/// Builds a compressed-tensors checkpoint tensor by tensor (each [`CompressedTensorsWriter::add`]
/// packs and writes at once through a [`SafetensorsStream`]: the writer holds one tensor, not the
/// model). `finish` completes the files in the (uncommitted) output directory.
pub struct CompressedTensorsWriter<'a> {
    out: &'a OutputDir,
    plain_dtype: Dtype,
    spec: Option<QuantSpec>,
    names: BTreeSet<String>,
    stream: SafetensorsStream,
}

impl<'a> CompressedTensorsWriter<'a> {
    /// `plain_dtype` (F16 or BF16) is the dtype of embeddings, norms and biases, and config.json's
    /// `torch_dtype`; scales are f16 regardless.
    pub fn new(out: &'a OutputDir, plain_dtype: Dtype) -> Result<Self> {
        if !matches!(plain_dtype, Dtype::F16 | Dtype::BF16) {
            return Err(Error::invalid(format!(
                "compressed-tensors export writes plain tensors as F16 or BF16, not {plain_dtype:?}"
            )));
        }
        Ok(CompressedTensorsWriter {
            out,
            plain_dtype,
            spec: None,
            names: BTreeSet::new(),
            stream: SafetensorsStream::create(out, WEIGHTS_FILE)?,
        })
    }

    /// Declares that about `tensors` model tensors will be added (up to five entries each:
    /// weight_packed, weight_scale, weight_shape, weight_zero_point, bias), so the header is
    /// written in place (see [`SafetensorsStream::expect_tensors`]); before the first tensor.
    pub fn expect_tensors(&mut self, tensors: usize) -> Result<()> {
        self.stream.expect_tensors(5 * tensors)
    }

    fn file(&self) -> PathBuf {
        self.out.final_path().join(WEIGHTS_FILE)
    }

    fn push(&mut self, t: TensorOut) -> Result<()> {
        if !self.names.insert(t.name.clone()) {
            return Err(Error::tensor(self.file(), &t.name, "appears twice"));
        }
        self.stream.add(t)
    }

    /// Validates, packs and encodes one tensor.
    pub fn add(&mut self, t: &ExportTensor) -> Result<()> {
        match t {
            ExportTensor::Plain { name, shape, data } => {
                if shape.iter().product::<usize>() != data.len() {
                    return Err(Error::tensor(
                        self.file(),
                        name,
                        format!("shape {shape:?} does not match {} values", data.len()),
                    ));
                }
                let data = encode_floats(data, self.plain_dtype, &self.file(), name)?;
                self.push(TensorOut {
                    name: name.clone(),
                    dtype: self.plain_dtype,
                    shape: shape.clone(),
                    data,
                })
            }
            ExportTensor::Quantized { name, tensor, bias } => {
                self.add_quantized(name, tensor, bias.as_deref())
            }
        }
    }

    fn add_quantized(
        &mut self,
        name: &str,
        t: &QuantizedTensor,
        bias: Option<&[f32]>,
    ) -> Result<()> {
        let file = self.file();
        let err = |p: String| Error::tensor(&file, name, p);
        if name.ends_with(".weight") {
            return Err(err(
                "give the module prefix (without `.weight`) for a quantized tensor".into(),
            ));
        }
        let spec = t.spec;
        check_spec(&spec).map_err(|e| err(e.to_string()))?;
        if let Some(s) = self.spec
            && s != spec
        {
            return Err(err(format!(
                "grid {spec:?} differs from the earlier tensors' {s:?}; the export writes one config group for every layer"
            )));
        }
        spec.check_cols(t.cols, name)
            .map_err(|e| err(e.to_string()))?;
        check_quantized(t, &file, name)?;
        if let Some(c) = first_act_order_column(t) {
            return Err(err(format!(
                "g_idx[{c}] = {} is not {c} / {}: act-order (actorder \"group\") was removed from compressed-tensors 0.20 and cannot be written; quantize without act-order or use --format gptq",
                t.g_idx[c],
                spec.group_size(t.cols)
            )));
        }
        let half = 1u32 << (spec.bits - 1);
        if spec.sym
            && let Some(i) = t.zeros.iter().position(|&z| z != half)
        {
            let ng = t.n_groups();
            return Err(err(format!(
                "symmetric grid with zero {} at (row {}, group {}); compressed-tensors assumes {half}",
                t.zeros[i],
                i / ng,
                i % ng
            )));
        }
        let (rows, cols, ng) = (t.rows, t.cols, t.n_groups());
        let packed = pack_rows(rows, cols, spec.bits, |r, c| t.q[r * cols + c] as u32);
        let scales: Vec<u8> = t
            .scales
            .iter()
            .flat_map(|&s| f16::from_f32(s).to_le_bytes())
            .collect();
        let mut outs = vec![
            TensorOut {
                name: format!("{name}.weight_packed"),
                dtype: Dtype::I32,
                shape: vec![rows, (cols * spec.bits as usize).div_ceil(32)],
                data: u32_bytes(&packed),
            },
            TensorOut {
                name: format!("{name}.weight_scale"),
                dtype: Dtype::F16,
                shape: vec![rows, ng],
                data: scales,
            },
            TensorOut {
                name: format!("{name}.weight_shape"),
                dtype: Dtype::I64,
                shape: vec![2],
                data: [rows as i64, cols as i64]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            },
        ];
        if !spec.sym {
            // Packed along dim 0: one stream per group, running over the output rows; the words
            // of stream g form column g of a [ceil(out·b/32), G] tensor.
            let by_group = pack_rows(ng, rows, spec.bits, |g, r| t.zeros[r * ng + g]);
            let words = (rows * spec.bits as usize).div_ceil(32);
            let mut zp = vec![0u32; words * ng];
            for g in 0..ng {
                for w in 0..words {
                    zp[w * ng + g] = by_group[g * words + w];
                }
            }
            outs.push(TensorOut {
                name: format!("{name}.weight_zero_point"),
                dtype: Dtype::I32,
                shape: vec![words, ng],
                data: u32_bytes(&zp),
            });
        }
        if let Some(b) = bias {
            if b.len() != rows {
                return Err(err(format!("bias has {} values for {rows} rows", b.len())));
            }
            let bname = format!("{name}.bias");
            outs.push(TensorOut {
                data: encode_floats(b, self.plain_dtype, &file, &bname)?,
                name: bname,
                dtype: self.plain_dtype,
                shape: vec![rows],
            });
        }
        for o in outs {
            self.push(o)?;
        }
        self.spec = Some(spec);
        Ok(())
    }

    /// Writes model.safetensors and config.json (the original with `quantization_config` and
    /// `torch_dtype` set) into the output directory.
    pub fn finish(self, original_config: &serde_json::Value) -> Result<()> {
        let spec = self.spec.ok_or_else(|| {
            Error::invalid("compressed-tensors export needs at least one quantized tensor")
        })?;
        finish_checkpoint(
            self.out,
            self.stream,
            original_config,
            Some(quantization_config(&spec)),
            self.plain_dtype,
        )
    }
}

/// Writes a whole compressed-tensors checkpoint into `out` (not committed).
pub fn write_compressed_tensors(
    out: &OutputDir,
    original_config: &serde_json::Value,
    tensors: &[ExportTensor],
    plain_dtype: Dtype,
) -> Result<()> {
    let mut w = CompressedTensorsWriter::new(out, plain_dtype)?;
    w.expect_tensors(tensors.len())?;
    for t in tensors {
        w.add(t)?;
    }
    w.finish(original_config)
}

/// Whether a parsed config.json describes a compressed-tensors checkpoint.
pub fn is_compressed_tensors(config: &serde_json::Value) -> bool {
    config
        .get("quantization_config")
        .and_then(|q| q.get("quant_method"))
        .and_then(|m| m.as_str())
        == Some(QUANT_METHOD)
}

/// The grid config.json's quantization_config describes (one config group, int weights,
/// `pack-quantized`, strategy group or channel, no act-order).
fn read_spec(dir: &Path) -> Result<QuantSpec> {
    let path = dir.join("config.json");
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let v: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::format(&path, format!("invalid JSON: {e}")))?;
    let bad = |p: String| Error::format(&path, p);
    let qc = v
        .get("quantization_config")
        .ok_or_else(|| bad("no `quantization_config`".into()))?;
    let s = |k: &str| qc.get(k).and_then(|x| x.as_str());
    if s("quant_method") != Some(QUANT_METHOD) {
        return Err(bad(format!(
            "quantization_config.quant_method is {:?}, not `{QUANT_METHOD}`",
            qc.get("quant_method")
        )));
    }
    if s("format") != Some(FORMAT) {
        return Err(bad(format!(
            "quantization_config.format is {:?}; only `{FORMAT}` is read",
            qc.get("format")
        )));
    }
    let groups = qc
        .get("config_groups")
        .and_then(|g| g.as_object())
        .ok_or_else(|| bad("quantization_config.config_groups is not an object".into()))?;
    if groups.len() != 1 {
        return Err(bad(format!(
            "{} config groups; only checkpoints with one are read",
            groups.len()
        )));
    }
    let w = groups
        .values()
        .next()
        .and_then(|g| g.get("weights"))
        .ok_or_else(|| bad("the config group has no `weights`".into()))?;
    let bits = w
        .get("num_bits")
        .and_then(|b| b.as_u64())
        .and_then(|b| u8::try_from(b).ok())
        .ok_or_else(|| bad("weights.num_bits is missing or not a small integer".into()))?;
    if w.get("type").and_then(|t| t.as_str()) != Some("int") {
        return Err(bad(format!(
            "weights.type is {:?}; only `int` is read",
            w.get("type")
        )));
    }
    let sym = w
        .get("symmetric")
        .and_then(|s| s.as_bool())
        .ok_or_else(|| bad("weights.symmetric is missing".into()))?;
    let group = match w.get("strategy").and_then(|s| s.as_str()) {
        Some("group") => Some(
            w.get("group_size")
                .and_then(|g| g.as_u64())
                .filter(|&g| g > 0)
                .ok_or_else(|| bad("strategy `group` without a positive group_size".into()))?
                as usize,
        ),
        Some("channel") => None,
        other => {
            return Err(bad(format!(
                "weights.strategy {other:?}; only `group` and `channel` are read"
            )));
        }
    };
    match w.get("actorder") {
        None | Some(serde_json::Value::Null) => {}
        Some(a) => {
            return Err(bad(format!(
                "weights.actorder {a} (a g_idx permutation) is not read"
            )));
        }
    }
    let spec = QuantSpec::new(bits, group, sym).map_err(|e| bad(e.to_string()))?;
    check_spec(&spec).map_err(|e| bad(e.to_string()))?;
    Ok(spec)
}

fn read_tensor(set: &SafetensorsSet, spec: &QuantSpec, prefix: &str) -> Result<QuantizedTensor> {
    let info = |suffix: &str, dtypes: &[Dtype], dims: usize| -> Result<(String, Vec<usize>)> {
        let name = format!("{prefix}.{suffix}");
        let i = set.info(&name)?;
        if !dtypes.contains(&i.dtype) || i.shape.len() != dims {
            return Err(Error::tensor(
                &i.file,
                &name,
                format!(
                    "is {:?} {:?}, expected {dtypes:?} with {dims} dimension(s)",
                    i.dtype, i.shape
                ),
            ));
        }
        Ok((name, i.shape.clone()))
    };
    let (pk_name, pk_shape) = info("weight_packed", &[Dtype::I32], 2)?;
    let (sc_name, sc_shape) = info("weight_scale", &[Dtype::F16, Dtype::BF16, Dtype::F32], 2)?;
    let (sh_name, _) = info("weight_shape", &[Dtype::I64, Dtype::I32], 1)?;
    let file = set.info(&pk_name)?.file.clone();
    let bad = |name: &str, p: String| Error::tensor(&file, name, p);
    let shape_bytes = set.bytes(&sh_name)?;
    let dims: Vec<i64> = match set.info(&sh_name)?.dtype {
        Dtype::I64 => shape_bytes
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .collect(),
        _ => set.to_i32(&sh_name)?.into_iter().map(i64::from).collect(),
    };
    let [rows, cols] = dims[..] else {
        return Err(bad(&sh_name, format!("holds {dims:?}, expected [out, in]")));
    };
    let (rows, cols) = match (usize::try_from(rows), usize::try_from(cols)) {
        (Ok(r), Ok(c)) if r > 0 && c > 0 => (r, c),
        _ => {
            return Err(bad(
                &sh_name,
                format!("holds {dims:?}, expected positive sizes"),
            ));
        }
    };
    let words = (cols * spec.bits as usize).div_ceil(32);
    let ng = spec.n_groups(cols);
    if pk_shape != [rows, words]
        || sc_shape != [rows, ng]
        || spec.check_cols(cols, &pk_name).is_err()
    {
        return Err(bad(
            &pk_name,
            format!(
                "inconsistent shapes for a {rows} x {cols} {}-bit group {:?} tensor: weight_packed {pk_shape:?} (expected [{rows}, {words}]), weight_scale {sc_shape:?} (expected [{rows}, {ng}])",
                spec.bits, spec.group
            ),
        ));
    }
    let packed: Vec<u32> = set
        .to_i32(&pk_name)?
        .into_iter()
        .map(|w| w as u32)
        .collect();
    let mut q = vec![0u8; rows * cols];
    // Values are masked to `bits` <= 8, so the cast to u8 is lossless.
    unpack_rows(&packed, rows, cols, spec.bits, |r, c, v| {
        q[r * cols + c] = v as u8
    });
    let scales = set.to_f32(&sc_name)?;
    if let Some(i) = scales.iter().position(|&s| s <= 0.0) {
        return Err(bad(
            &sc_name,
            format!("scale {} at flat index {i} is not positive", scales[i]),
        ));
    }
    let zeros = if spec.sym {
        vec![1u32 << (spec.bits - 1); rows * ng]
    } else {
        let (zp_name, zp_shape) = info("weight_zero_point", &[Dtype::I32], 2)?;
        let zwords = (rows * spec.bits as usize).div_ceil(32);
        if zp_shape != [zwords, ng] {
            return Err(bad(
                &zp_name,
                format!("shape {zp_shape:?}, expected [{zwords}, {ng}] (packed along dim 0)"),
            ));
        }
        let zp = set.to_i32(&zp_name)?;
        let mut by_group = vec![0u32; ng * zwords];
        for w in 0..zwords {
            for g in 0..ng {
                by_group[g * zwords + w] = zp[w * ng + g] as u32;
            }
        }
        let mut zeros = vec![0u32; rows * ng];
        unpack_rows(&by_group, ng, rows, spec.bits, |g, r, v| {
            zeros[r * ng + g] = v
        });
        zeros
    };
    let gs = spec.group_size(cols);
    Ok(QuantizedTensor {
        rows,
        cols,
        spec: *spec,
        q,
        scales,
        zeros,
        g_idx: (0..cols).map(|c| (c / gs) as u32).collect(),
    })
}

/// Reads the quantized linear `prefix` (without `.weight`) of a compressed-tensors checkpoint as
/// the [`QuantizedTensor`] it was written from (zeros of symmetric grids are 2^(b−1); g_idx is
/// the static map).
pub fn read_compressed_tensors_quantized(dir: &Path, prefix: &str) -> Result<QuantizedTensor> {
    let spec = read_spec(dir)?;
    let set = SafetensorsSet::open(dir)?;
    read_tensor(&set, &spec, prefix)
}

const PACKED_SUFFIXES: [&str; 4] = [
    "weight_packed",
    "weight_scale",
    "weight_zero_point",
    "weight_shape",
];

/// Reads a compressed-tensors checkpoint as the package decompresses it: every quantized linear
/// as `<prefix>.weight` [out, in] = `(q_s − zp_s) · scale` computed in f32 (exact: an f16 scale
/// times an integer below 2^8 needs at most 19 significant bits; the package computes in the
/// scale's dtype, i.e. this value rounded once to f16), and every other tensor as f32 with its
/// stored shape; sorted by name.
pub fn read_compressed_tensors_dequantized(dir: &Path) -> Result<Vec<NamedTensor>> {
    let spec = read_spec(dir)?;
    let set = SafetensorsSet::open(dir)?;
    read_dequantized_with(&set, "weight_packed", &PACKED_SUFFIXES, |prefix| {
        let t = read_tensor(&set, &spec, prefix)?;
        Ok((t.rows, t.cols, t.dequantize()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The package's `pack_to_int32` on a 4-bit row [-8, -7, ..., 7] (stored +8: 0..15) gives
    /// words 0x76543210, 0xfedcba98: LSB = lowest index.
    #[test]
    fn packing_matches_the_package_layout() {
        let p = pack_rows(1, 16, 4, |_, k| k as u32);
        assert_eq!(p, vec![0x7654_3210, 0xfedc_ba98]);
        // 8 bits: four values per word; a row of 5 pads the second word with zeros.
        let p = pack_rows(1, 5, 8, |_, k| 250 + k as u32);
        assert_eq!(p, vec![0xfdfc_fbfa, 0x0000_00fe]);
        let mut back = vec![0u32; 5];
        unpack_rows(&p, 1, 5, 8, |_, k, v| back[k] = v);
        assert_eq!(back, vec![250, 251, 252, 253, 254]);
    }
}
