//! `wgpress compress` for weight-only methods (RTN): read each tensor of the checkpoint, quantize
//! the linear layers of the decoder blocks, write the chosen format atomically with a report.
//! Tensors are decoded and quantized one at a time; the output writer packs and encodes them on
//! its own thread (`Sink`), whose bounded queue holds a few more (the host memory beyond the
//! compressed output is a few tensors, never the model). Methods that need calibration
//! statistics go through the layer-streaming pipeline instead; this module must not grow a
//! second forward pass.

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::export::compressed_tensors::CompressedTensorsWriter;
use crate::export::dense::DenseWriter;
use crate::export::gguf::GgufWriter;
use crate::export::gptq::{ExportTensor, GptqExportOptions, GptqWriter};
use crate::model::Model;
use crate::model::safetensors::Dtype;
use crate::model::writer::{MARKER, OutputDir};
use crate::quant::{QuantSpec, QuantizedTensor};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::thread::{Scope, ScopedJoinHandle};
use std::time::Instant;

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    Gptq,
    Dense,
    /// compressed-tensors `pack-quantized` (vLLM, llm-compressor).
    CompressedTensors,
    /// GGUF v3 (llama.cpp): Q4_0, Q4_1 or Q8_0 chosen from the grid.
    Gguf,
}

#[derive(Clone, Debug)]
pub struct CompressOptions {
    pub spec: QuantSpec,
    pub format: Format,
    /// Dtype of dense weights and of GPTQ's unquantized tensors (F16 or BF16; dense also F32).
    pub dtype: Dtype,
    pub out: PathBuf,
    /// GPTQ's settings when that method runs (recorded in the GPTQ format's quantize_config).
    pub gptq: Option<crate::quant::gptq::GptqOptions>,
    /// The calibration forward's linear-layer precision (calibrated runs only).
    pub precision: crate::model::forward::Precision,
    /// Calibration tokens per forward batch (calibrated runs only; rounded down to whole
    /// sequences, at least one). The block's intermediate activations (the MLP's are
    /// 2 x batch x intermediate f32) exist for one batch at a time, so this bounds GPU memory
    /// beyond the calibration set itself.
    pub batch_tokens: usize,
}

/// Default of [`CompressOptions::batch_tokens`]: 4 sequences of 2048 tokens. On a 7B-shaped
/// block the MLP intermediates are then 0.7 GB, and every linear layer is still a product of at
/// least 8192 x 4096 x 4096, large enough to fill a big GPU.
pub const DEFAULT_BATCH_TOKENS: usize = 8192;

/// What happened to one linear layer.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerReport {
    pub name: String,
    pub shape: [usize; 2],
    pub seconds: f64,
    /// ||W - Q(W)||_F^2 / ||W||_F^2: the weight-space error.
    pub rel_weight_err: f64,
    /// ||X Wᵀ - X Q(W)ᵀ||² / ||X Wᵀ||² on the calibration inputs X (with calibration only).
    pub rel_output_err: Option<f64>,
    /// Hessian damping used (GPTQ; larger than requested when the factorization needed a retry).
    pub damp_used: Option<f32>,
    /// Input columns whose calibration activations were all zero (GPTQ zeroes their weights).
    pub dead_columns: usize,
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
    /// The process's resident-memory high-water mark (Linux `VmHWM`; `None` elsewhere).
    pub peak_host_bytes: Option<u64>,
    pub input_bytes: u64,
    pub output_bytes: u64,
    /// Calibration set, when the layer-streaming pipeline ran.
    pub calibration: Option<CalibrationReport>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct CalibrationReport {
    pub files: Vec<PathBuf>,
    pub nsamples: usize,
    pub seqlen: usize,
    pub seed: u64,
    pub bos: bool,
    /// The forward's linear-layer precision the calibration activations were computed in.
    pub precision: crate::model::forward::Precision,
    /// Per block, the mean squared activation of its output at positions 0..8 (attention sinks
    /// show as position 0 dominating).
    pub position_energy: Vec<Vec<f64>>,
    /// Sequences per forward batch ([`CompressOptions::batch_tokens`] in whole sequences).
    pub batch_sequences: usize,
    /// Host wall time per phase of the pipeline. Unless the phase waits are on
    /// (`pipeline::PHASE_SYNC_ENV`), GPU work is charged to the phase that next waits for it.
    pub phases: PhaseTimes,
    /// The GPU timeline per phase (timestamps at the phase boundaries: each span, busy or idle,
    /// goes to the phase whose boundary ends it); `None` on adapters without timestamp queries.
    pub gpu_phases: Option<PhaseTimes>,
}

/// A phase of a calibrated run (see [`PhaseTimes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Prepare,
    Load,
    Forward,
    Hessian,
    Method,
    Error,
    Write,
}

impl Phase {
    pub const ALL: [Phase; 7] = [
        Phase::Prepare,
        Phase::Load,
        Phase::Forward,
        Phase::Hessian,
        Phase::Method,
        Phase::Error,
        Phase::Write,
    ];
}

/// Seconds of each phase of a calibrated run, measured on the host's clock or on the GPU's
/// timeline (see [`CalibrationReport`]).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PhaseTimes {
    /// Tokenizing and drawing the windows, embedding them, copying the non-block tensors.
    pub prepare: f64,
    /// Each block's weights: waiting for their host decode (done ahead, beside the previous
    /// block's GPU work, unless overlap is off) and uploading them.
    pub load: f64,
    /// Block forwards: the partial ones that capture each site's input and the full one that
    /// makes the next block's input.
    pub forward: f64,
    /// Accumulating H = (2/n)·XᵀX.
    pub hessian: f64,
    /// The layer method (GPTQ or RTN), including the single upload of W (decoded with the
    /// block's load), Ŵ's dequantization on the GPU and the download of the quantized result.
    pub method: f64,
    /// The per-layer weight and output errors (on the GPU) and the block's replacement weight
    /// (Ŵ, converted to f16 on the GPU under --precision f16).
    pub error: f64,
    /// Handing tensors to the output writer (to its thread, waiting only when its queue is
    /// full) and, at the end, waiting for it and writing the files.
    pub write: f64,
}

impl PhaseTimes {
    /// Seconds in [`Phase::ALL`] order.
    pub fn from_seconds(s: [f64; 7]) -> Self {
        let [prepare, load, forward, hessian, method, error, write] = s;
        PhaseTimes {
            prepare,
            load,
            forward,
            hessian,
            method,
            error,
            write,
        }
    }

    /// Adds `seconds` to `phase`.
    pub fn add(&mut self, phase: Phase, seconds: f64) {
        let slot = match phase {
            Phase::Prepare => &mut self.prepare,
            Phase::Load => &mut self.load,
            Phase::Forward => &mut self.forward,
            Phase::Hessian => &mut self.hessian,
            Phase::Method => &mut self.method,
            Phase::Error => &mut self.error,
            Phase::Write => &mut self.write,
        };
        *slot += seconds;
    }

    /// The sum over all phases.
    pub fn total(&self) -> f64 {
        self.named().iter().map(|(_, s)| s).sum()
    }

    /// (name, seconds) in pipeline order.
    pub fn named(&self) -> [(&'static str, f64); 7] {
        [
            ("prepare", self.prepare),
            ("load", self.load),
            ("forward", self.forward),
            ("hessian", self.hessian),
            ("method", self.method),
            ("error", self.error),
            ("write", self.write),
        ]
    }

    /// "prepare 1.23, load 0.45, ..." with `decimals` digits after the point.
    pub fn line(&self, decimals: usize) -> String {
        let parts: Vec<String> = self
            .named()
            .iter()
            .map(|(n, s)| format!("{n} {s:.decimals$}"))
            .collect();
        parts.join(", ")
    }
}

/// The process's peak resident memory in bytes (`VmHWM` of /proc/self/status), where the OS
/// reports it.
pub fn peak_host_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
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

/// Checks every linear layer against the grid and the format before anything is written.
pub(crate) fn validate(model: &Model, opts: &CompressOptions) -> Result<()> {
    let spec = opts.spec;
    for n in model.weights.names() {
        if !model.config.is_linear(n) {
            continue;
        }
        let info = model.weights.info(n)?;
        let cols = info.shape[1];
        spec.check_cols(cols, n)
            .map_err(|e| Error::tensor(&info.file, n, e.to_string()))?;
        if opts.format == Format::Gptq {
            crate::quant::pack::packed_len(cols, spec.bits, n)?;
        }
    }
    match opts.format {
        Format::Gptq => {
            crate::quant::pack::check_bits(spec.bits)?;
            if !matches!(opts.dtype, Dtype::F16 | Dtype::BF16) {
                return Err(Error::invalid(
                    "the GPTQ format stores unquantized tensors in f16 or bf16",
                ));
            }
        }
        Format::CompressedTensors => {
            crate::export::compressed_tensors::check_spec(&spec)?;
            if !matches!(opts.dtype, Dtype::F16 | Dtype::BF16) {
                return Err(Error::invalid(
                    "the compressed-tensors format stores unquantized tensors in f16 or bf16",
                ));
            }
        }
        Format::Gguf => {
            crate::export::gguf::gguf_type_for(&spec)?;
            crate::export::gguf::check_config(&model.config, &model.dir)?;
        }
        Format::Dense => {}
    }
    Ok(())
}

/// Where compressed tensors go: a format writer (each streams its tensors to disk as they come).
enum Writer<'a> {
    Gptq(GptqWriter<'a>),
    CompressedTensors(CompressedTensorsWriter<'a>),
    Gguf(Box<GgufWriter<'a>>),
    Dense(DenseWriter<'a>),
}

/// A tensor on its way to the writer. A quantized layer's dense values, when the dense writer
/// needs them and the caller has none, are made on the writer's side of the queue.
enum Item {
    Quantized {
        name: String,
        q: QuantizedTensor,
        deq: Option<Vec<f32>>,
    },
    Plain(ExportTensor),
}

impl Writer<'_> {
    fn add(&mut self, item: Item) -> Result<()> {
        let t = match item {
            Item::Plain(t) => t,
            Item::Quantized { name, q, deq } => match self {
                Writer::Dense(_) => ExportTensor::Plain {
                    name,
                    shape: vec![q.rows, q.cols],
                    data: deq.unwrap_or_else(|| q.dequantize()),
                },
                _ => ExportTensor::Quantized {
                    name: name.trim_end_matches(".weight").to_string(),
                    tensor: q,
                    bias: None,
                },
            },
        };
        match self {
            Writer::Gptq(w) => w.add(&t),
            Writer::CompressedTensors(w) => w.add(&t),
            Writer::Gguf(w) => w.add(&t),
            Writer::Dense(w) => match t {
                ExportTensor::Plain { name, shape, data } => w.add(&name, &shape, &data),
                ExportTensor::Quantized { name, .. } => Err(Error::invalid(format!(
                    "the dense writer got {name} still quantized"
                ))),
            },
        }
    }
}

/// Setting [`OVERLAP_ENV`] to `0` runs the host work that otherwise overlaps the GPU (the output
/// writer's packing and encoding, the pipeline's decode of the next block) in line on the calling
/// thread. The output is the same byte for byte; the switch exists to profile the host work and
/// to rule the helper threads out when something goes wrong.
pub const OVERLAP_ENV: &str = "WGPRESS_OVERLAP";

/// Whether host work runs on helper threads (see [`OVERLAP_ENV`]).
pub(crate) fn overlap() -> bool {
    std::env::var(OVERLAP_ENV).map_or(true, |v| v != "0")
}

/// Tensors handed to the writer thread and not yet taken by it. Eight hold a block's seven
/// linear layers and its norms, so the caller waits on the writer only when it falls a whole
/// block behind; the bound keeps the host memory the queue can hold to a few tensors (at 7B
/// shapes the quantized MLP layers are ~45 MB each; the f32 embedding and head copied before the
/// first block, 0.5 GB each, are the largest items).
const WRITE_QUEUE: usize = 8;

/// The text of a panic's payload (a `&str` or a `String`; anything else has none).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

/// Where the sink's tensors go.
enum To<'s> {
    /// The writer itself, on the caller's thread (overlap off).
    Inline(Writer<'s>),
    /// A thread that owns the writer and takes the tensors in queue order, so the files are the
    /// ones the inline writer makes. It gives the writer back when the queue closes, or stops at
    /// the writer's first error (dropping the queue's receiving end, which is how the caller
    /// learns of it).
    Thread {
        queue: SyncSender<Item>,
        thread: ScopedJoinHandle<'s, Result<Writer<'s>>>,
    },
    /// Finished, or failed and already reported.
    Closed,
}

/// The output writer as the compressors see it. With overlap on (the default) the writer runs on
/// a scoped thread of the caller's `scope`, so packing and encoding (17 s of a 7B GPTQ run)
/// happen while the GPU works; a writer error comes back from the next hand-off or from
/// `finish`, and the caller commits the output only after `finish` succeeded.
pub(crate) struct Sink<'s> {
    out: &'s OutputDir,
    dense: bool,
    pub copied: usize,
    to: To<'s>,
}

impl<'s> Sink<'s> {
    pub fn new(
        scope: &'s Scope<'s, '_>,
        out: &'s OutputDir,
        model: &Model,
        opts: &CompressOptions,
    ) -> Result<Self> {
        let mut writer = match opts.format {
            Format::Gptq => Writer::Gptq(GptqWriter::new(
                out,
                GptqExportOptions {
                    plain_dtype: opts.dtype,
                    desc_act: opts.gptq.is_some_and(|g| g.act_order),
                    static_groups: opts.gptq.is_some_and(|g| g.static_groups),
                    damp_percent: opts.gptq.map_or(0.01, |g| g.damp as f64),
                    ..Default::default()
                },
            )?),
            Format::CompressedTensors => {
                Writer::CompressedTensors(CompressedTensorsWriter::new(out, opts.dtype)?)
            }
            Format::Gguf => {
                // general.name: the checkpoint directory's name.
                let name = model
                    .dir
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_else(|| "model".into());
                Writer::Gguf(Box::new(GgufWriter::new(
                    out,
                    opts.dtype,
                    &model.config,
                    &model.dir,
                    &name,
                )?))
            }
            Format::Dense => Writer::Dense(DenseWriter::new(out, opts.dtype)?),
        };
        let tensors = model.weights.names().len();
        match &mut writer {
            Writer::Gptq(w) => w.expect_tensors(tensors)?,
            Writer::CompressedTensors(w) => w.expect_tensors(tensors)?,
            Writer::Dense(w) => w.expect_tensors(tensors)?,
            // GGUF's data must start right after its aligned header: no room can be reserved.
            Writer::Gguf(_) => {}
        }
        let to = if overlap() {
            let (queue, items) = sync_channel::<Item>(WRITE_QUEUE);
            let thread = std::thread::Builder::new()
                .name("wgpress-writer".into())
                .spawn_scoped(scope, move || {
                    let mut writer = writer;
                    for item in items {
                        writer.add(item)?;
                    }
                    Ok(writer)
                })
                .map_err(|e| Error::Output {
                    path: out.final_path().into(),
                    problem: format!("cannot start the writer thread: {e}"),
                })?;
            To::Thread { queue, thread }
        } else {
            To::Inline(writer)
        };
        Ok(Sink {
            out,
            dense: opts.format == Format::Dense,
            copied: 0,
            to,
        })
    }

    /// Hands `item` to the writer; an error is the writer's, from this tensor or (overlap on)
    /// an earlier one.
    fn send(&mut self, item: Item) -> Result<()> {
        match &mut self.to {
            To::Inline(w) => w.add(item),
            To::Thread { queue, thread } => {
                // The thread ends before the queue closes only by failing; checking first
                // reports a failure at the first hand-off after it rather than a queue later.
                if !thread.is_finished() && queue.send(item).is_ok() {
                    return Ok(());
                }
                match self.close() {
                    Err(e) => Err(e),
                    Ok(_) => Err(self.output_error("the writer thread stopped early")),
                }
            }
            To::Closed => Err(self.output_error("the writer already failed or finished")),
        }
    }

    /// Closes the queue and waits for the writer thread: the writer, or what stopped it.
    fn close(&mut self) -> Result<Writer<'s>> {
        match std::mem::replace(&mut self.to, To::Closed) {
            To::Inline(w) => Ok(w),
            To::Thread { queue, thread } => {
                drop(queue);
                thread.join().unwrap_or_else(|p| {
                    Err(self.output_error(&format!(
                        "the writer thread panicked: {}",
                        panic_message(&*p)
                    )))
                })
            }
            To::Closed => Err(self.output_error("the writer already failed or finished")),
        }
    }

    fn output_error(&self, problem: &str) -> Error {
        Error::Output {
            path: self.out.final_path().into(),
            problem: problem.into(),
        }
    }

    /// A quantized linear layer `name` (ending in `.weight`), with its dequantized values when
    /// the caller has them already. Only the dense writer uses them; it dequantizes `q` itself
    /// when they are not given, so callers that keep Ŵ elsewhere (the pipeline: on the GPU)
    /// never build a host copy for the other formats.
    pub fn quantized(
        &mut self,
        name: &str,
        q: QuantizedTensor,
        deq: Option<Vec<f32>>,
    ) -> Result<()> {
        // Values no writer reads would only take queue memory.
        let deq = deq.filter(|_| self.dense);
        self.send(Item::Quantized {
            name: name.to_string(),
            q,
            deq,
        })
    }

    /// A tensor copied as it is (converted to the output dtype).
    pub fn plain(&mut self, name: &str, shape: Vec<usize>, data: Vec<f32>) -> Result<()> {
        self.copied += 1;
        self.send(Item::Plain(ExportTensor::Plain {
            name: name.to_string(),
            shape,
            data,
        }))
    }

    /// Waits for the writer, then writes the weights, the side files and report.json; the
    /// caller then commits the output.
    pub fn finish(mut self, model: &Model, mut report: CompressReport) -> Result<CompressReport> {
        let out = self.out;
        match self.close()? {
            Writer::Gptq(w) => w.finish(&model.config.raw)?,
            Writer::CompressedTensors(w) => w.finish(&model.config.raw)?,
            Writer::Gguf(w) => w.finish()?,
            Writer::Dense(w) => w.finish(&model.config.raw)?,
        }
        for f in SIDE_FILES {
            let src = model.dir.join(f);
            if src.exists() {
                out.copy_file(&src, f)?;
            }
        }
        report.copied_tensors = self.copied;
        report.output_bytes = dir_bytes(out.path());
        let json = serde_json::to_value(&report)
            .map_err(|e| Error::format(out.path().join(MARKER), e.to_string()))?;
        out.write_json(MARKER, &json)?;
        Ok(report)
    }
}

impl Drop for Sink<'_> {
    /// On an early return the thread is joined here, its result dropped: a panic in it must not
    /// resurface as the scope's panic in place of the caller's error.
    fn drop(&mut self) {
        let _ = self.close();
    }
}

impl CompressReport {
    pub(crate) fn new(
        engine: &Engine,
        model: &Model,
        opts: &CompressOptions,
        method: &'static str,
    ) -> Self {
        CompressReport {
            tool: "wgpress",
            version: env!("CARGO_PKG_VERSION"),
            model: model.dir.clone(),
            method,
            spec: opts.spec,
            format: opts.format,
            device: engine.describe(),
            layers: Vec::new(),
            copied_tensors: 0,
            seconds: 0.0,
            peak_gpu_bytes: 0,
            peak_host_bytes: None,
            input_bytes: model.weights.total_bytes(),
            output_bytes: 0,
            calibration: None,
        }
    }
}

/// Quantizes every linear layer of `model` with RTN and writes `opts.format` to `opts.out`.
pub fn rtn(
    engine: &Engine,
    model: &Model,
    opts: &CompressOptions,
    progress: Progress<'_>,
) -> Result<CompressReport> {
    let t0 = Instant::now();
    let spec = opts.spec;
    validate(model, opts)?;
    let names: Vec<String> = model
        .weights
        .names()
        .into_iter()
        .map(str::to_string)
        .collect();
    let out = OutputDir::create(&opts.out)?;
    if let Some(ctx) = engine.gpu() {
        ctx.reset_peak();
    }
    let mut report = CompressReport::new(engine, model, opts, "rtn");
    // The writer thread borrows `out`, so the scope ends before the commit.
    let report = std::thread::scope(|scope| {
        let mut sink = Sink::new(scope, &out, model, opts)?;
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
                report.layers.push(LayerReport {
                    name: name.clone(),
                    shape: [rows, cols],
                    seconds: t.elapsed().as_secs_f64(),
                    rel_weight_err: rel_err(&data, &deq),
                    rel_output_err: None,
                    damp_used: None,
                    dead_columns: 0,
                });
                sink.quantized(name, q, Some(deq))?;
            } else {
                sink.plain(name, shape, data)?;
            }
        }
        progress(names.len(), names.len(), "writing");
        report.peak_gpu_bytes = engine.gpu().map(|c| c.memory().1).unwrap_or(0);
        report.peak_host_bytes = peak_host_bytes();
        report.seconds = t0.elapsed().as_secs_f64();
        sink.finish(model, report)
    })?;
    out.commit()?;
    Ok(report)
}

pub(crate) fn rel_err(w: &[f32], q: &[f32]) -> f64 {
    let n = w.len().min(q.len());
    let num = crate::par::sum(n, |r| {
        w[r.clone()]
            .iter()
            .zip(&q[r])
            .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
            .sum()
    });
    let den = crate::par::sum(n, |r| w[r].iter().map(|&a| (a as f64).powi(2)).sum());
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The GPU timeline indexes phases by `Phase as usize` into the array `from_seconds` reads,
    /// so the enum order, `Phase::ALL`, `from_seconds` and `add` must agree.
    #[test]
    fn phase_indices_agree_with_from_seconds_and_add() {
        for (i, &p) in Phase::ALL.iter().enumerate() {
            assert_eq!(p as usize, i);
            let mut s = [0.0; 7];
            s[i] = 1.5;
            let mut t = PhaseTimes::default();
            t.add(p, 1.5);
            assert_eq!(PhaseTimes::from_seconds(s).named(), t.named(), "{p:?}");
            assert_eq!(t.total(), 1.5);
        }
    }
}
