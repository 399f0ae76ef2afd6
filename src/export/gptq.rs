//! GPTQ v1 checkpoint export (DESIGN.md section 5; `checkpoint_format: "gptq"`, as transformers,
//! vLLM and GPTQModel load it) and our own reader of it for round-trip checks.
//!
//! Per quantized linear `<prefix>` (e.g. `model.layers.0.mlp.up_proj`) the weight file holds
//! `<prefix>.qweight` int32 [in·b/32, out], `<prefix>.qzeros` int32 [G, out·b/32] (zero − 1),
//! `<prefix>.scales` f16 [G, out], `<prefix>.g_idx` int32 [in] and `<prefix>.bias` f16 when present;
//! packing is crate::quant::pack. Other tensors are written in f16 or bf16. `quantize_config.json`
//! and `config.json["quantization_config"]` describe the grid.
//!
//! The writer refuses, with an error naming the tensor, anything a runtime would read differently
//! from what we meant: bits outside {2, 3, 4, 8}; dimensions that do not fill whole packed words;
//! tensors whose grids disagree (one `quantize_config` describes them all); scales that are not
//! exactly f16; a non-identity `g_idx` without `desc_act`; symmetric grids whose zero is not
//! 2^(b−1) (runtimes ignore qzeros when `sym`); values that overflow f16; and — unless
//! [`GptqExportOptions::allow_zero_point_zero`] is set — an asymmetric zero point of 0, which v1
//! stores as maxq and runtimes read back as 2^b (the v1 format cannot express it).
//!
//! This module does not quantize (the grid comes in as [`QuantizedTensor`]), does not parse
//! safetensors itself (reading goes through [`SafetensorsSet`]) and does not commit the output.

use crate::error::{Error, Result};
use crate::export::dense::{NamedTensor, WEIGHTS_FILE, encode_floats, finish_checkpoint};
use crate::model::safetensors::SafetensorsSet;
use crate::model::writer::{OutputDir, SafetensorsStream, TensorOut};
use crate::quant::pack;
use crate::quant::{QuantSpec, QuantizedTensor};
use half::f16;
use safetensors::Dtype;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// One tensor of the exported checkpoint.
#[derive(Clone, Debug)]
pub enum ExportTensor {
    /// A quantized linear layer. `name` is the module prefix without `.weight`
    /// (e.g. `model.layers.0.mlp.up_proj`); `bias` has one value per output row.
    Quantized {
        name: String,
        tensor: QuantizedTensor,
        bias: Option<Vec<f32>>,
    },
    /// Any other tensor (embeddings, norms, an unquantized lm_head), row-major, full name.
    Plain {
        name: String,
        shape: Vec<usize>,
        data: Vec<f32>,
    },
}

/// Settings of a GPTQ export that the tensors themselves do not carry. Bits, group size and
/// symmetry come from the tensors' [`QuantSpec`].
#[derive(Clone, Debug, PartialEq)]
pub struct GptqExportOptions {
    /// Act-order was used; `g_idx` may then be any column -> group map.
    pub desc_act: bool,
    /// Hessian damping as a fraction of mean(diag H) (recorded only).
    pub damp_percent: f64,
    /// Recorded only.
    pub true_sequential: bool,
    /// Recorded only.
    pub static_groups: bool,
    /// Dtype of non-quantized tensors and biases: `Dtype::F16` or `Dtype::BF16` (biases are f16
    /// regardless, as the format fixes). Sets config.json's `torch_dtype`.
    pub plain_dtype: Dtype,
    /// Write asymmetric zero points of 0 anyway (stored as maxq; v1 runtimes would then use a zero
    /// of 2^b for those groups). Our reader round-trips them exactly; other runtimes do not.
    pub allow_zero_point_zero: bool,
}

impl Default for GptqExportOptions {
    fn default() -> Self {
        GptqExportOptions {
            desc_act: false,
            damp_percent: 0.01,
            true_sequential: true,
            static_groups: false,
            plain_dtype: Dtype::F16,
            allow_zero_point_zero: false,
        }
    }
}

/// Builds a GPTQ checkpoint tensor by tensor: each [`GptqWriter::add`] packs, encodes and writes
/// at once (a [`SafetensorsStream`]), so the writer holds one tensor, not the compressed model,
/// while the pipeline streams blocks. `finish` completes the files in the (uncommitted) output
/// directory.
pub struct GptqWriter<'a> {
    out: &'a OutputDir,
    opts: GptqExportOptions,
    spec: Option<QuantSpec>,
    names: BTreeSet<String>,
    stream: SafetensorsStream,
}

/// The quantize_config.json a spec and options describe.
fn quantize_config(spec: &QuantSpec, opts: &GptqExportOptions) -> serde_json::Value {
    serde_json::json!({
        "bits": spec.bits,
        "group_size": spec.group.map_or(-1, |g| g as i64),
        "desc_act": opts.desc_act,
        "sym": spec.sym,
        "damp_percent": opts.damp_percent,
        "true_sequential": opts.true_sequential,
        "static_groups": opts.static_groups,
        "checkpoint_format": "gptq",
        "quant_method": "gptq",
    })
}

fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl<'a> GptqWriter<'a> {
    pub fn new(out: &'a OutputDir, opts: GptqExportOptions) -> Result<Self> {
        if !matches!(opts.plain_dtype, Dtype::F16 | Dtype::BF16) {
            return Err(Error::invalid(format!(
                "GPTQ export writes plain tensors as F16 or BF16, not {:?}",
                opts.plain_dtype
            )));
        }
        Ok(GptqWriter {
            out,
            opts,
            spec: None,
            names: BTreeSet::new(),
            stream: SafetensorsStream::create(out, WEIGHTS_FILE)?,
        })
    }

    /// Declares that about `tensors` model tensors will be added (up to five entries each:
    /// qweight, qzeros, scales, g_idx, bias), so the header is written in place (see
    /// [`SafetensorsStream::expect_tensors`]); before the first tensor.
    pub fn expect_tensors(&mut self, tensors: usize) -> Result<()> {
        self.stream.expect_tensors(5 * tensors)
    }

    fn file(&self) -> PathBuf {
        self.out.final_path().join(WEIGHTS_FILE)
    }

    fn claim(&mut self, name: &str) -> Result<()> {
        if !self.names.insert(name.to_string()) {
            return Err(Error::tensor(self.file(), name, "appears twice"));
        }
        Ok(())
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
                let bytes = encode_floats(data, self.opts.plain_dtype, &self.file(), name)?;
                self.claim(name)?;
                self.stream.add(TensorOut {
                    name: name.clone(),
                    dtype: self.opts.plain_dtype,
                    shape: shape.clone(),
                    data: bytes,
                })?;
            }
            ExportTensor::Quantized { name, tensor, bias } => {
                self.add_quantized(name, tensor, bias)?
            }
        }
        Ok(())
    }

    fn add_quantized(
        &mut self,
        name: &str,
        t: &QuantizedTensor,
        bias: &Option<Vec<f32>>,
    ) -> Result<()> {
        let file = self.file();
        let err = |p: String| Error::tensor(&file, name, p);
        if name.ends_with(".weight") {
            return Err(err(
                "give the module prefix (without `.weight`) for a quantized tensor".into(),
            ));
        }
        let spec = t.spec;
        pack::check_bits(spec.bits).map_err(|e| err(format!("GPTQ v1: {e}")))?;
        if let Some(s) = self.spec
            && s != spec
        {
            return Err(err(format!(
                "grid {spec:?} differs from the earlier tensors' {s:?}; one GPTQ quantize_config describes every layer"
            )));
        }
        let (rows, cols) = (t.rows, t.cols);
        spec.check_cols(cols, name)?;
        // Lengths, g_idx range, integer and zero ranges, f16-exact positive scales.
        super::check_quantized(t, &file, name)?;
        let ng = t.n_groups();
        let gs = spec.group_size(cols);
        if !self.opts.desc_act
            && let Some(c) = super::first_act_order_column(t)
        {
            return Err(err(format!(
                "g_idx[{c}] = {} is not {c} / {gs}; set desc_act for act-order tensors",
                t.g_idx[c]
            )));
        }
        let half = 1u32 << (spec.bits - 1);
        for (i, &z) in t.zeros.iter().enumerate() {
            if spec.sym && z != half {
                return Err(err(format!(
                    "symmetric grid with zero {z} at (row {}, group {}); runtimes assume {half}",
                    i / ng,
                    i % ng
                )));
            }
            if z == 0 && !self.opts.allow_zero_point_zero {
                return Err(err(format!(
                    "zero point 0 at (row {}, group {}) cannot be stored in GPTQ v1 (it would be read back as {}); quantize symmetrically or set allow_zero_point_zero",
                    i / ng,
                    i % ng,
                    1u32 << spec.bits
                )));
            }
        }
        let qweight =
            pack::pack_qweight(&t.q, rows, cols, spec.bits).map_err(|e| err(e.to_string()))?;
        // The format's tensors are [G, out]; ours are per row [out, G].
        let mut zeros_go = vec![0u32; ng * rows];
        let mut scales_go = Vec::with_capacity(ng * rows * 2);
        for g in 0..ng {
            for r in 0..rows {
                zeros_go[g * rows + r] = t.zeros[r * ng + g];
                scales_go.extend_from_slice(&f16::from_f32(t.scales[r * ng + g]).to_le_bytes());
            }
        }
        let qzeros =
            pack::pack_qzeros(&zeros_go, ng, rows, spec.bits).map_err(|e| err(e.to_string()))?;
        let g_idx: Vec<i32> = t.g_idx.iter().map(|&g| g as i32).collect();
        let bias = match bias {
            Some(b) if b.len() != rows => {
                return Err(err(format!("bias has {} values for {rows} rows", b.len())));
            }
            Some(b) => Some(encode_floats(
                b,
                Dtype::F16,
                &file,
                &format!("{name}.bias"),
            )?),
            None => None,
        };
        let mut outs = vec![
            TensorOut {
                name: format!("{name}.qweight"),
                dtype: Dtype::I32,
                shape: vec![cols * spec.bits as usize / 32, rows],
                data: i32_bytes(&qweight),
            },
            TensorOut {
                name: format!("{name}.qzeros"),
                dtype: Dtype::I32,
                shape: vec![ng, rows * spec.bits as usize / 32],
                data: i32_bytes(&qzeros),
            },
            TensorOut {
                name: format!("{name}.scales"),
                dtype: Dtype::F16,
                shape: vec![ng, rows],
                data: scales_go,
            },
            TensorOut {
                name: format!("{name}.g_idx"),
                dtype: Dtype::I32,
                shape: vec![cols],
                data: i32_bytes(&g_idx),
            },
        ];
        if let Some(b) = bias {
            outs.push(TensorOut {
                name: format!("{name}.bias"),
                dtype: Dtype::F16,
                shape: vec![rows],
                data: b,
            });
        }
        for o in &outs {
            self.claim(&o.name)?;
        }
        self.spec = Some(spec);
        for o in outs {
            self.stream.add(o)?;
        }
        Ok(())
    }

    /// Writes model.safetensors, quantize_config.json and config.json (the original with
    /// `quantization_config` and `torch_dtype` set) into the output directory.
    pub fn finish(self, original_config: &serde_json::Value) -> Result<()> {
        let spec = self.spec.ok_or_else(|| {
            Error::invalid("GPTQ export needs at least one quantized tensor".to_string())
        })?;
        let qc = quantize_config(&spec, &self.opts);
        finish_checkpoint(
            self.out,
            self.stream,
            original_config,
            Some(qc.clone()),
            self.opts.plain_dtype,
        )?;
        self.out.write_json("quantize_config.json", &qc)
    }
}

/// Writes a whole GPTQ v1 checkpoint into `out` (not committed): see [`GptqWriter`].
pub fn write_gptq(
    out: &OutputDir,
    original_config: &serde_json::Value,
    tensors: &[ExportTensor],
    opts: &GptqExportOptions,
) -> Result<()> {
    let mut w = GptqWriter::new(out, opts.clone())?;
    w.expect_tensors(tensors.len())?;
    for t in tensors {
        w.add(t)?;
    }
    w.finish(original_config)
}

/// The grid quantize_config.json describes, read back.
fn read_spec(dir: &Path) -> Result<QuantSpec> {
    let path = dir.join("quantize_config.json");
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| Error::format(&path, e.to_string()))?;
    let format = v
        .get("checkpoint_format")
        .and_then(|f| f.as_str())
        .unwrap_or("gptq");
    if format != "gptq" {
        return Err(Error::format(
            &path,
            format!("checkpoint_format `{format}` is not the v1 format `gptq`"),
        ));
    }
    let bits = v
        .get("bits")
        .and_then(|b| b.as_u64())
        .and_then(|b| u8::try_from(b).ok())
        .ok_or_else(|| Error::format(&path, "missing or bad `bits`"))?;
    let group = match v.get("group_size").and_then(|g| g.as_i64()) {
        Some(-1) => None,
        Some(g) if g > 0 => Some(g as usize),
        _ => return Err(Error::format(&path, "missing or bad `group_size`")),
    };
    let sym = v
        .get("sym")
        .and_then(|s| s.as_bool())
        .ok_or_else(|| Error::format(&path, "missing or bad `sym`"))?;
    pack::check_bits(bits).map_err(|e| Error::format(&path, e.to_string()))?;
    QuantSpec::new(bits, group, sym)
}

/// One quantized linear as stored: integers [out, in], scales and stored zeros in the format's
/// [G, out] order, and g_idx.
struct Stored {
    rows: usize,
    cols: usize,
    groups: usize,
    q: Vec<u8>,
    scales: Vec<f32>,
    qzeros: Vec<i32>,
    g_idx: Vec<u32>,
}

fn read_stored(set: &SafetensorsSet, spec: &QuantSpec, prefix: &str) -> Result<Stored> {
    let bits = spec.bits as usize;
    let info = |suffix: &str, dtype: Dtype, dims: usize| -> Result<(String, Vec<usize>)> {
        let name = format!("{prefix}.{suffix}");
        let i = set.info(&name)?;
        if i.dtype != dtype || i.shape.len() != dims {
            return Err(Error::tensor(
                &i.file,
                &name,
                format!(
                    "is {:?} {:?}, expected {dtype:?} with {dims} dimensions",
                    i.dtype, i.shape
                ),
            ));
        }
        Ok((name, i.shape.clone()))
    };
    let (qw_name, qw_shape) = info("qweight", Dtype::I32, 2)?;
    let (qz_name, qz_shape) = info("qzeros", Dtype::I32, 2)?;
    let (sc_name, sc_shape) = info("scales", Dtype::F16, 2)?;
    let (gi_name, gi_shape) = info("g_idx", Dtype::I32, 1)?;
    let file = set.info(&qw_name)?.file.clone();
    let rows = qw_shape[1];
    let cols = qw_shape[0] * 32 / bits;
    let groups = sc_shape[0];
    if qw_shape[0] * 32 % bits != 0
        || gi_shape[0] != cols
        || sc_shape[1] != rows
        || qz_shape[0] != groups
        || qz_shape[1] * 32 != rows * bits
        || groups != spec.n_groups(cols)
    {
        return Err(Error::tensor(
            &file,
            &qw_name,
            format!(
                "inconsistent shapes for {}-bit group {:?}: qweight {qw_shape:?}, qzeros {qz_shape:?}, scales {sc_shape:?}, g_idx {gi_shape:?}",
                spec.bits, spec.group
            ),
        ));
    }
    let bad = |name: &str, e: Error| Error::tensor(&file, name, e.to_string());
    let q = pack::unpack_qweight(&set.to_i32(&qw_name)?, rows, cols, spec.bits)
        .map_err(|e| bad(&qw_name, e))?;
    let qzeros = set.to_i32(&qz_name)?;
    let scales = set.to_f32(&sc_name)?;
    let mut g_idx = Vec::with_capacity(cols);
    for (c, g) in set.to_i32(&gi_name)?.into_iter().enumerate() {
        if g < 0 || g as usize >= groups {
            return Err(Error::tensor(
                &file,
                &gi_name,
                format!("g_idx[{c}] = {g} is outside 0..{groups}"),
            ));
        }
        g_idx.push(g as u32);
    }
    Ok(Stored {
        rows,
        cols,
        groups,
        q,
        scales,
        qzeros,
        g_idx,
    })
}

/// Reads the quantized linear `prefix` (without `.weight`) of a GPTQ v1 checkpoint exactly as it
/// was given to the writer: integers, scales, zero points (the exact inverse of the zero − 1
/// storage, so a zero of 0 comes back as 0) and g_idx.
pub fn read_gptq_quantized(dir: &Path, prefix: &str) -> Result<QuantizedTensor> {
    let spec = read_spec(dir)?;
    let set = SafetensorsSet::open(dir)?;
    let s = read_stored(&set, &spec, prefix)?;
    let zeros_go = pack::unpack_qzeros(&s.qzeros, s.groups, s.rows, spec.bits)?;
    // The format is [G, out]; QuantizedTensor is per row [out, G].
    let (mut scales, mut zeros) = (vec![0f32; s.rows * s.groups], vec![0u32; s.rows * s.groups]);
    for g in 0..s.groups {
        for r in 0..s.rows {
            scales[r * s.groups + g] = s.scales[g * s.rows + r];
            zeros[r * s.groups + g] = zeros_go[g * s.rows + r];
        }
    }
    Ok(QuantizedTensor {
        rows: s.rows,
        cols: s.cols,
        spec,
        q: s.q,
        scales,
        zeros,
        g_idx: s.g_idx,
    })
}

/// Reads a GPTQ v1 checkpoint as a runtime would: every quantized linear dequantized by the v1 rule
/// `w[o][i] = scales[g_idx[i]][o] · (q[o][i] − (qzeros[g_idx[i]][o] + 1))` (f32 arithmetic, no
/// wrap-around of the stored zero) as `<prefix>.weight` [out, in], and every other tensor (biases
/// included) as f32 with its stored shape; sorted by name.
pub fn read_gptq_dequantized(dir: &Path) -> Result<Vec<NamedTensor>> {
    let spec = read_spec(dir)?;
    let set = SafetensorsSet::open(dir)?;
    super::read_dequantized_with(&set, "qweight", &PACKED_SUFFIXES, |prefix| {
        let s = read_stored(&set, &spec, prefix)?;
        let stored = pack::unpack_qzeros_stored(&s.qzeros, s.groups, s.rows, spec.bits)?;
        let mut w = Vec::with_capacity(s.rows * s.cols);
        for r in 0..s.rows {
            for c in 0..s.cols {
                let gi = s.g_idx[c] as usize * s.rows + r;
                // Same operation order as QuantizedTensor::dequantize, so equal inputs give
                // equal bits.
                let zero = (stored[gi] + 1) as f32;
                w.push(s.scales[gi] * (s.q[r * s.cols + c] as f32 - zero));
            }
        }
        Ok((s.rows, s.cols, w))
    })
}

const PACKED_SUFFIXES: [&str; 4] = ["qweight", "qzeros", "scales", "g_idx"];
