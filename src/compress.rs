//! `wgpress compress` for weight-only methods (RTN): read each tensor of the checkpoint, quantize
//! the linear layers of the decoder blocks, write the chosen format atomically with a report.
//! Tensors are processed one at a time (only one tensor's f32 copy is alive at once besides the
//! compressed output). Methods that need calibration statistics go through the layer-streaming
//! pipeline instead; this module must not grow a second forward pass.

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::export::dense::{NamedTensor, write_dense};
use crate::export::gptq::{ExportTensor, GptqExportOptions, GptqWriter};
use crate::model::Model;
use crate::model::safetensors::Dtype;
use crate::model::writer::{MARKER, OutputDir};
use crate::quant::QuantSpec;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Gptq,
    Dense,
}

#[derive(Clone, Debug)]
pub struct CompressOptions {
    pub spec: QuantSpec,
    pub format: Format,
    /// Dtype of dense weights and of GPTQ's unquantized tensors (F16 or BF16; dense also F32).
    pub dtype: Dtype,
    pub out: PathBuf,
}

/// What happened to one linear layer.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerReport {
    pub name: String,
    pub shape: [usize; 2],
    pub seconds: f64,
    /// ||W - Q(W)||_F^2 / ||W||_F^2: the weight-space error (the output error needs calibration).
    pub rel_weight_err: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct CompressReport {
    pub tool: &'static str,
    pub version: &'static str,
    pub model: PathBuf,
    pub method: &'static str,
    pub spec: QuantSpec,
    pub format: Format,
    pub device: String,
    pub layers: Vec<LayerReport>,
    pub copied_tensors: usize,
    pub seconds: f64,
    pub peak_gpu_bytes: u64,
    pub input_bytes: u64,
    pub output_bytes: u64,
}

/// Files copied next to the weights so the output loads like the input.
const SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

/// Progress callback: (tensors done, tensors total, name of the current one).
pub type Progress<'a> = &'a dyn Fn(usize, usize, &str);

/// Quantizes every linear layer of `model` with RTN and writes `opts.format` to `opts.out`.
pub fn rtn(
    engine: &Engine,
    model: &Model,
    opts: &CompressOptions,
    progress: Progress<'_>,
) -> Result<CompressReport> {
    let t0 = Instant::now();
    let spec = opts.spec;
    let names: Vec<String> = model
        .weights
        .names()
        .into_iter()
        .map(str::to_string)
        .collect();
    // Check every layer against the grid and the format before writing anything.
    for n in names.iter().filter(|n| model.config.is_linear(n)) {
        let info = model.weights.info(n)?;
        let cols = info.shape[1];
        spec.check_cols(cols, n)
            .map_err(|e| Error::tensor(&info.file, n, e.to_string()))?;
        if opts.format == Format::Gptq {
            crate::quant::pack::packed_len(cols, spec.bits, n)?;
        }
    }
    if opts.format == Format::Gptq {
        crate::quant::pack::check_bits(spec.bits)?;
        if !matches!(opts.dtype, Dtype::F16 | Dtype::BF16) {
            return Err(Error::invalid(
                "the GPTQ format stores unquantized tensors in f16 or bf16",
            ));
        }
    }
    let out = OutputDir::create(&opts.out)?;
    if let Some(ctx) = engine.gpu() {
        ctx.reset_peak();
    }
    let mut layers = Vec::new();
    let mut copied = 0;
    let mut gptq = match opts.format {
        Format::Gptq => Some(GptqWriter::new(
            &out,
            GptqExportOptions {
                plain_dtype: opts.dtype,
                ..Default::default()
            },
        )?),
        Format::Dense => None,
    };
    let mut dense: Vec<NamedTensor> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        progress(i, names.len(), name);
        let info = model.weights.info(name)?;
        let data = model.weights.to_f32(name)?;
        let shape = info.shape.clone();
        if model.config.is_linear(name) {
            let (rows, cols) = (shape[0], shape[1]);
            let t = Instant::now();
            let q = crate::quant::rtn::quantize(engine, &data, rows, cols, &spec)
                .map_err(|e| Error::tensor(&info.file, name, e.to_string()))?;
            let deq = q.dequantize();
            layers.push(LayerReport {
                name: name.clone(),
                shape: [rows, cols],
                seconds: t.elapsed().as_secs_f64(),
                rel_weight_err: rel_err(&data, &deq),
            });
            match gptq.as_mut() {
                Some(w) => w.add(&ExportTensor::Quantized {
                    name: name.trim_end_matches(".weight").to_string(),
                    tensor: q,
                    bias: None,
                })?,
                None => dense.push((name.clone(), shape, deq)),
            }
        } else {
            copied += 1;
            match gptq.as_mut() {
                Some(w) => w.add(&ExportTensor::Plain {
                    name: name.clone(),
                    shape,
                    data,
                })?,
                None => dense.push((name.clone(), shape, data)),
            }
        }
    }
    progress(names.len(), names.len(), "writing");
    match gptq {
        Some(w) => w.finish(&model.config.raw)?,
        None => write_dense(&out, &model.config.raw, &dense, opts.dtype)?,
    }
    for f in SIDE_FILES {
        let src = model.dir.join(f);
        if src.exists() {
            out.copy_file(&src, f)?;
        }
    }
    let peak = engine.gpu().map(|c| c.memory().1).unwrap_or(0);
    let mut report = CompressReport {
        tool: "wgpress",
        version: env!("CARGO_PKG_VERSION"),
        model: model.dir.clone(),
        method: "rtn",
        spec,
        format: opts.format,
        device: engine.describe(),
        layers,
        copied_tensors: copied,
        seconds: t0.elapsed().as_secs_f64(),
        peak_gpu_bytes: peak,
        input_bytes: model.weights.total_bytes(),
        output_bytes: dir_bytes(out.path()),
    };
    report.seconds = t0.elapsed().as_secs_f64();
    let json = serde_json::to_value(&report)
        .map_err(|e| Error::format(out.path().join(MARKER), e.to_string()))?;
    out.write_json(MARKER, &json)?;
    out.commit()?;
    Ok(report)
}

fn rel_err(w: &[f32], q: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&a, &b) in w.iter().zip(q) {
        num += (a as f64 - b as f64).powi(2);
        den += (a as f64).powi(2);
    }
    if den == 0.0 { num } else { num / den }
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
