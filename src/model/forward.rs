//! The Llama decoder forward pass on the GPU, one block at a time: activations are f32 rows of
//! `seq`-token sequences. `capture_input` hands back a linear layer's input so calibration
//! statistics see exactly what the layer sees. The CPU oracle is `reference::forward`; this module
//! only orchestrates `gpu::` kernels and must not hold more than the block it is given.
//!
//! [`Precision`] picks how the linear layers (q/k/v/o, gate/up/down and the head) multiply:
//! - `F32` (the default): weights are uploaded in their stored dtype (f32, f16 or bf16; the matmul
//!   kernel converts on load) and multiply f32 activations, so only the stored weights round.
//! - `F16`: weights are converted to f16 once, at upload, and each linear's input is rounded to f16
//!   by `gpu::forward::to_f16` right before the product, so F16 x F16 takes the tensor-core kernel
//!   where the adapter has one (and the tiled kernel, with the same f16-input / f32-accumulate
//!   numerics, elsewhere). Norms, rotary, residuals and the captured inputs stay f32; attention
//!   too, except where the adapter has cooperative matrices: there q, k, v are rounded to f16
//!   and attention runs on tensor cores ([`ForwardPlan::attention`]; its probabilities round to
//!   f16 as well). Calibration's Hessians read the captured inputs' f16 rounding
//!   ([`ForwardPlan::stats_input`]).
//!   A weight tensor with a value beyond f16's range keeps its stored dtype and f32 activations
//!   (logged, naming the tensor); an activation beyond f16's range is an error at the next
//!   [`ForwardPlan::check_range`] (rerun with f32). Rounding each input to f16 costs a relative
//!   2^-11 per factor, so a K-term product moves by ~2^-11·sqrt(K) of its typical term; on the
//!   shipped small model a block's output moves by 2.5e-4 (outputs up to 4) against the f64
//!   reference and perplexity by 0.003% (tests/gpu_forward.rs, tests/eval.rs).
//!
//! F32 stays the default for `eval` and `compress`: perplexity is compared against published f32
//! numbers, the f16 error is measured on the small model only, and large models carry outlier
//! activations (thousands, on a few channels) near enough to f16's range that the f16 forward may
//! refuse a run the f32 one completes.

use crate::error::{Error, Result};
use crate::gpu::forward as k;
use crate::gpu::matmul::{Layout, matmul_into};
use crate::gpu::stats::F16_MAX;
use crate::gpu::{GpuContext, GpuDtype, GpuTensor};
use crate::model::Model;
use crate::model::config::LlamaConfig;
use crate::model::safetensors::{Dtype, TensorInfo};

/// The GPU dtype a stored tensor uploads as (f32, f16, bf16; anything else is an error).
pub fn gpu_dtype(model: &Model, name: &str) -> Result<GpuDtype> {
    gpu_dtype_of(model.weights.info(name)?)
}

fn gpu_dtype_of(info: &TensorInfo) -> Result<GpuDtype> {
    match info.dtype {
        Dtype::F32 => Ok(GpuDtype::F32),
        Dtype::F16 => Ok(GpuDtype::F16),
        Dtype::BF16 => Ok(GpuDtype::BF16),
        d => Err(Error::tensor(
            &info.file,
            &info.name,
            format!("unsupported dtype {d:?}"),
        )),
    }
}

/// How the forward's linear layers multiply (see the module doc).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Stored-dtype weights times f32 activations.
    #[default]
    F32,
    /// f16 weights times f16-rounded activations, f32 accumulation (tensor cores where available).
    F16,
}

/// A linear layer's weight (`rows` x `cols`, values `v`) on the GPU for `precision`: under F16 as
/// f16 unless some |value| exceeds f16's range, in which case (logged, naming the tensor) the
/// tensor keeps `stored` (its dtype and raw bytes) or f32; under F32 as `stored` or f32.
pub fn linear_weight(
    ctx: &GpuContext,
    precision: Precision,
    name: &str,
    (rows, cols): (usize, usize),
    v: &[f32],
    stored: Option<(GpuDtype, &[u8])>,
) -> Result<GpuTensor> {
    if precision == Precision::F16 && stored.map(|s| s.0) != Some(GpuDtype::F16) {
        let over = crate::par::sum(v.len(), |r| {
            v[r].iter().filter(|x| x.abs() > F16_MAX).count() as f64
        });
        if over == 0.0 {
            // Values below f16's normal range (|w| < 6.1e-5) keep fewer bits: an absolute error
            // under 2^-25 per weight, far below the activations' 2^-11 relative rounding.
            return GpuTensor::from_f32_as(ctx, rows, cols, v, GpuDtype::F16);
        }
        let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        warn_out_of_f16_range(name, max, stored.map(|s| s.0));
    }
    match stored {
        Some((dtype, bytes)) => GpuTensor::from_bytes(ctx, rows, cols, dtype, bytes),
        None => GpuTensor::from_f32(ctx, rows, cols, v),
    }
}

/// [`linear_weight`] for f32 weights already on the GPU (a compressed layer's Ŵ, made there):
/// under F16 converted to f16 on the GPU (`gpu::forward::to_f16`, the same round-to-nearest as
/// the host conversion) unless some |value| exceeds f16's range, in which case (logged, naming
/// the tensor) `w` itself is kept, as `linear_weight` keeps f32 without a stored dtype; under
/// F32 `w` itself. Nothing crosses to the host but the range flag (and, for the warning, one
/// maximum per row).
pub fn linear_weight_gpu(
    ctx: &GpuContext,
    precision: Precision,
    name: &str,
    w: GpuTensor,
) -> Result<GpuTensor> {
    if w.dtype != GpuDtype::F32 {
        return Err(Error::invalid(format!(
            "{name}: expected f32 weights on the GPU, got {}",
            w.shape_str()
        )));
    }
    if precision != Precision::F16 {
        return Ok(w);
    }
    if !w.cols.is_multiple_of(2) {
        // to_f16 converts whole words of f16 pairs, so an odd row width would share a word
        // between rows; such (unusual) layers take the host conversion.
        let v = w.to_f32(ctx)?;
        return linear_weight(ctx, precision, name, (w.rows, w.cols), &v, None);
    }
    let flag = k::range_flag(ctx)?;
    let h = k::to_f16(ctx, &w, &flag)?;
    if flag.to_u32(ctx)?.first().copied().unwrap_or(0) == 0 {
        return Ok(h);
    }
    drop(h);
    let max = crate::gpu::reduce::reduce_rows(ctx, &w, crate::gpu::reduce::ReduceOp::AbsMax)?
        .to_f32(ctx)?
        .into_iter()
        .fold(0f32, f32::max);
    warn_out_of_f16_range(name, max, None);
    Ok(w)
}

/// The warning of a weight tensor that cannot take f16 under `--precision f16`.
fn warn_out_of_f16_range(name: &str, max: f32, kept: Option<GpuDtype>) {
    log::warn!(
        "{name}: max |w| = {max} exceeds f16's range (65504); this layer keeps {} weights and f32 activations",
        kept.map_or("f32".to_string(), |d| format!("{d:?}").to_lowercase())
    );
}

/// One weight tensor uploaded for `precision` (see [`HostTensor::upload`]).
fn upload(ctx: &GpuContext, model: &Model, name: &str, precision: Precision) -> Result<GpuTensor> {
    HostTensor::decode(model, name)?.upload(ctx, precision)
}

/// A stored tensor decoded to f32 on the host, ready to upload. Decoding is the host's share of
/// loading a block (a 7B block is 200 M bf16 values), so the pipeline does it on a helper thread
/// ahead of the GPU; uploading needs the GPU context and stays on the caller's thread. A decode
/// error (NaN/Inf, a dtype that is not a float) is kept, not returned, until the values are
/// asked for, so a block decoded ahead fails where, and with the message with which, decoding it
/// in line would have.
pub struct HostTensor<'m> {
    pub info: &'m TensorInfo,
    /// The stored bytes, a view into the checkpoint's map (no copy).
    stored: &'m [u8],
    /// `to_f32`'s result; `None` once handed out by [`HostTensor::take_values`].
    values: Option<Result<Vec<f32>>>,
}

impl<'m> HostTensor<'m> {
    /// Decodes tensor `name` of `model`. Only a missing tensor is an error here.
    pub fn decode(model: &'m Model, name: &str) -> Result<Self> {
        Ok(HostTensor {
            info: model.weights.info(name)?,
            stored: model.weights.bytes(name)?,
            // to_f32 refuses NaN/Inf (naming the tensor and index) before anything reaches the GPU.
            values: Some(model.weights.to_f32(name)),
        })
    }

    /// The f32 values, or the decode's error (handed out once: the caller stops there).
    pub fn values(&mut self) -> Result<&[f32]> {
        if matches!(self.values, Some(Err(_)))
            && let Some(Err(e)) = self.values.take()
        {
            return Err(e);
        }
        match &self.values {
            Some(Ok(v)) => Ok(v),
            _ => Err(self.gone()),
        }
    }

    /// The f32 values (or the decode's error), moved out: later calls are errors.
    pub fn take_values(&mut self) -> Result<Vec<f32>> {
        self.values.take().unwrap_or_else(|| Err(self.gone()))
    }

    fn gone(&self) -> Error {
        Error::tensor(
            &self.info.file,
            &self.info.name,
            "the decoded values were already handed out",
        )
    }

    /// Uploads for `precision`: norm weights and biases as f32, matrices through
    /// [`linear_weight`] (from the stored bytes unless converted to f16). The checks come in the
    /// order an in-line decode met them: shape, dtype, then the values.
    pub fn upload(&mut self, ctx: &GpuContext, precision: Precision) -> Result<GpuTensor> {
        let info = self.info;
        let (rows, cols) = match info.shape[..] {
            [r, c] => (r, c),
            [c] => (1, c),
            _ => {
                return Err(Error::tensor(
                    &info.file,
                    &info.name,
                    format!("expected a 1-D or 2-D tensor, got shape {:?}", info.shape),
                ));
            }
        };
        let dtype = gpu_dtype_of(info)?;
        let stored = self.stored;
        let v = self.values()?;
        if rows == 1 {
            // Norm weights and biases feed f32-only kernels (they are tiny).
            return GpuTensor::from_f32(ctx, 1, cols, v);
        }
        linear_weight(
            ctx,
            precision,
            &info.name,
            (rows, cols),
            v,
            Some((dtype, stored)),
        )
    }
}

/// Every tensor of decoder block `layer` (the names under `model.layers.{layer}.`, in the
/// checkpoint's name order) decoded on the host: what [`HostBlock::upload`] puts on the GPU, and
/// the f32 copies of the linear weights (for the layer method) and of the other tensors (for the
/// writer) that the pipeline takes out afterwards. One block's f32 weights; `Send`, so a helper
/// thread can decode the next block while the GPU works on this one.
pub struct HostBlock<'m> {
    model: &'m Model,
    pub layer: usize,
    tensors: Vec<HostTensor<'m>>,
}

impl<'m> HostBlock<'m> {
    pub fn decode(model: &'m Model, layer: usize) -> Result<Self> {
        let p = format!("model.layers.{layer}.");
        let tensors = model
            .weights
            .names()
            .into_iter()
            .filter(|n| n.starts_with(&p))
            .map(|n| HostTensor::decode(model, n))
            .collect::<Result<Vec<_>>>()?;
        Ok(HostBlock {
            model,
            layer,
            tensors,
        })
    }

    /// The block's tensors, in the checkpoint's name order.
    pub fn tensors(&mut self) -> impl Iterator<Item = &mut HostTensor<'m>> {
        self.tensors.iter_mut()
    }

    /// Tensor `name` (a full name); a missing one is the checkpoint's not-found error.
    pub fn tensor(&mut self, name: &str) -> Result<&mut HostTensor<'m>> {
        match self.tensors.iter().position(|t| t.info.name == name) {
            Some(i) => Ok(&mut self.tensors[i]),
            None => {
                self.model.weights.info(name)?;
                Err(Error::invalid(format!(
                    "{name} is not a tensor of block {}",
                    self.layer
                )))
            }
        }
    }

    /// Uploads the block for `precision` (the plan's), leaving the host values in place.
    pub fn upload(&mut self, ctx: &GpuContext, precision: Precision) -> Result<GpuBlock> {
        let p = format!("model.layers.{}.", self.layer);
        let model = self.model;
        let mut get = |s: &str| self.tensor(&format!("{p}{s}"))?.upload(ctx, precision);
        let (input_norm, post_norm) = (
            get("input_layernorm.weight")?,
            get("post_attention_layernorm.weight")?,
        );
        let (q, k, v, o) = (
            get("self_attn.q_proj.weight")?,
            get("self_attn.k_proj.weight")?,
            get("self_attn.v_proj.weight")?,
            get("self_attn.o_proj.weight")?,
        );
        let (gate, up, down) = (
            get("mlp.gate_proj.weight")?,
            get("mlp.up_proj.weight")?,
            get("mlp.down_proj.weight")?,
        );
        let mut opt = |s: &str| -> Result<Option<GpuTensor>> {
            if model.weights.contains(&format!("{p}{s}")) {
                get(s).map(Some)
            } else {
                Ok(None)
            }
        };
        Ok(GpuBlock {
            input_norm,
            post_norm,
            q,
            k,
            v,
            o,
            gate,
            up,
            down,
            q_bias: opt("self_attn.q_proj.bias")?,
            k_bias: opt("self_attn.k_proj.bias")?,
            v_bias: opt("self_attn.v_proj.bias")?,
        })
    }
}

/// A decoder block's weights on the GPU.
pub struct GpuBlock {
    pub input_norm: GpuTensor,
    pub post_norm: GpuTensor,
    pub q: GpuTensor,
    pub k: GpuTensor,
    pub v: GpuTensor,
    pub o: GpuTensor,
    pub gate: GpuTensor,
    pub up: GpuTensor,
    pub down: GpuTensor,
    pub q_bias: Option<GpuTensor>,
    pub k_bias: Option<GpuTensor>,
    pub v_bias: Option<GpuTensor>,
}

impl GpuBlock {
    /// The linear layer named by its short name (`self_attn.q_proj`, ..., `mlp.down_proj`).
    pub fn linear_mut(&mut self, short: &str) -> Result<&mut GpuTensor> {
        Ok(match short {
            "self_attn.q_proj" => &mut self.q,
            "self_attn.k_proj" => &mut self.k,
            "self_attn.v_proj" => &mut self.v,
            "self_attn.o_proj" => &mut self.o,
            "mlp.gate_proj" => &mut self.gate,
            "mlp.up_proj" => &mut self.up,
            "mlp.down_proj" => &mut self.down,
            _ => {
                return Err(Error::invalid(format!(
                    "{short} is not a linear layer of a decoder block"
                )));
            }
        })
    }

    /// Decodes block `layer` of `model` on the host and uploads it for `precision` (the plan's).
    pub fn upload(
        ctx: &GpuContext,
        model: &Model,
        layer: usize,
        precision: Precision,
    ) -> Result<Self> {
        HostBlock::decode(model, layer)?.upload(ctx, precision)
    }
}

/// Where a linear layer's input is taken: the four distinct inputs of a Llama block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    /// Input of q/k/v_proj (the normed hidden state).
    Qkv,
    /// Input of o_proj (the attention output).
    O,
    /// Input of gate/up_proj (the normed residual after attention).
    GateUp,
    /// Input of down_proj (silu(gate) * up).
    Down,
}

impl Site {
    pub const ALL: [Site; 4] = [Site::Qkv, Site::O, Site::GateUp, Site::Down];

    /// Short names (under `model.layers.N.`) of the linear layers reading this input.
    pub fn layers(self) -> &'static [&'static str] {
        match self {
            Site::Qkv => &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            Site::O => &["self_attn.o_proj"],
            Site::GateUp => &["mlp.gate_proj", "mlp.up_proj"],
            Site::Down => &["mlp.down_proj"],
        }
    }
}

/// A linear input `x` with, under F16, its f16 copy when any of the weights `ws` reading it is f16
/// (made once, so q/k/v and gate/up share one conversion). Odd widths, which no Llama has, stay
/// f32: the conversion works on whole 32-bit words.
fn linear_input<'a>(
    ctx: &GpuContext,
    plan: &ForwardPlan,
    x: &'a GpuTensor,
    ws: &[&GpuTensor],
) -> Result<(&'a GpuTensor, Option<GpuTensor>)> {
    // An input that is already 16-bit (a kept `stats_input`) is multiplied as it is.
    let f16 = plan.precision == Precision::F16
        && x.dtype == GpuDtype::F32
        && x.cols.is_multiple_of(2)
        && ws.iter().any(|w| w.dtype == GpuDtype::F16);
    let xh = f16
        .then(|| k::to_f16(ctx, x, &plan.range_flag))
        .transpose()?;
    Ok((x, xh))
}

/// y = x Wᵀ (+ bias) into a new rows x out f32 tensor aligned to `plan.seq`; an f16 weight
/// multiplies the f16 copy of the input where [`linear_input`] made one.
fn linear(
    ctx: &GpuContext,
    plan: &ForwardPlan,
    (x, xh): &(&GpuTensor, Option<GpuTensor>),
    w: &GpuTensor,
    bias: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    let y = GpuTensor::empty_aligned(ctx, x.rows, w.rows, GpuDtype::F32, plan.seq)?;
    let a = match xh {
        Some(h) if w.dtype == GpuDtype::F16 => h,
        _ => *x,
    };
    matmul_into(ctx, a, w, Layout::NT, &y, false, None)?;
    if let Some(b) = bias {
        k::bias_add(ctx, &y, b)?;
    }
    Ok(y)
}

/// Setting this environment variable to `0` keeps attention in f32 under [`Precision::F16`]
/// (the tensor-core attention is otherwise used wherever the adapter has it).
pub const F16_ATTENTION_ENV: &str = "WGPRESS_F16_ATTENTION";

/// Static per-model pieces of the forward: the rotary table, shapes and the linear layers'
/// precision (blocks must be uploaded with the same precision).
pub struct ForwardPlan {
    pub seq: usize,
    pub rope: GpuTensor,
    pub heads: (usize, usize, usize),
    pub eps: f32,
    pub precision: Precision,
    /// Set by `to_f16` when an activation exceeded f16's range (F16 only).
    range_flag: GpuTensor,
    /// Attention runs on tensor cores (see [`ForwardPlan::attention`]); decided once here.
    f16_attention: bool,
}

impl ForwardPlan {
    pub fn new(
        ctx: &GpuContext,
        cfg: &LlamaConfig,
        seq: usize,
        precision: Precision,
    ) -> Result<Self> {
        let inv = crate::reference::forward::rope_inv_freq(cfg)?;
        let allowed = std::env::var(F16_ATTENTION_ENV).map_or(true, |v| v != "0");
        let f16_attention =
            precision == Precision::F16 && allowed && k::attention_f16_available(ctx, cfg.head_dim);
        Ok(ForwardPlan {
            seq,
            rope: k::rope_table(ctx, &inv, seq)?,
            heads: (
                cfg.num_attention_heads,
                cfg.num_key_value_heads,
                cfg.head_dim,
            ),
            eps: cfg.rms_norm_eps as f32,
            precision,
            range_flag: k::range_flag(ctx)?,
            f16_attention,
        })
    }

    /// What calibration statistics read for a linear input `x` from [`capture_input`]: under
    /// F16 its f16 rounding, which is exactly what the f16 linear layers multiply and lets the
    /// Hessian take the tensor-core path (2-3x the f32 kernel's rate on large inputs); under F32
    /// (and for odd widths, which stay f32 in the forward too) `x` itself. An overflow sets the
    /// range flag like any other f16 conversion.
    pub fn stats_input(&self, ctx: &GpuContext, x: GpuTensor) -> Result<GpuTensor> {
        if self.precision == Precision::F16 && x.cols.is_multiple_of(2) {
            k::to_f16(ctx, &x, &self.range_flag)
        } else {
            Ok(x)
        }
    }

    /// Causal attention of the block: under F16 (unless [`F16_ATTENTION_ENV`] is `0`), where the
    /// adapter has cooperative matrices
    /// ([`k::attention_f16_available`]), on tensor cores from f16 copies of q, k, v (rounded and
    /// range-checked like every f16 linear input; the probabilities are rounded to f16 too);
    /// otherwise the f32 kernel. Takes q, k, v to free each as soon as it is converted.
    pub fn attention(
        &self,
        ctx: &GpuContext,
        q: GpuTensor,
        k: GpuTensor,
        v: GpuTensor,
    ) -> Result<GpuTensor> {
        if !self.f16_attention {
            return k::attention(ctx, &q, &k, &v, self.seq, self.heads);
        }
        let half = |t: GpuTensor| k::to_f16_aligned(ctx, &t, &self.range_flag, self.seq);
        let (qh, kh, vh) = (half(q)?, half(k)?, half(v)?);
        k::attention_f16(ctx, &qh, &kh, &vh, self.seq, self.heads)
    }

    /// An error if any linear input since the plan was made exceeded f16's range (their f16 copies
    /// were saturated, so everything computed since is suspect). Downloads one word, so callers
    /// check at points that synchronize anyway (per evaluation window, per calibrated block); a
    /// no-op under F32.
    pub fn check_range(&self, ctx: &GpuContext) -> Result<()> {
        if self.precision == Precision::F32 || self.range_flag.to_u32(ctx)?[0] == 0 {
            return Ok(());
        }
        Err(Error::invalid(
            "an activation exceeded f16's range (|x| > 65504) in the f16 forward; rerun with --precision f32",
        ))
    }
}

/// One decoder block over `x` (rows = sequences of plan.seq tokens): the block output.
pub fn block_forward(
    ctx: &GpuContext,
    plan: &ForwardPlan,
    b: &GpuBlock,
    x: &GpuTensor,
) -> Result<GpuTensor> {
    run_block(ctx, plan, b, x, None)
}

/// The input of the linear layers at `site` when the block runs on `x`: the forward stops there,
/// so only that activation is kept (true-sequential calibration re-runs the partly compressed
/// block once per site).
pub fn capture_input(
    ctx: &GpuContext,
    plan: &ForwardPlan,
    b: &GpuBlock,
    x: &GpuTensor,
    site: Site,
) -> Result<GpuTensor> {
    run_block(ctx, plan, b, x, Some(site))
}

fn run_block(
    ctx: &GpuContext,
    plan: &ForwardPlan,
    b: &GpuBlock,
    x: &GpuTensor,
    stop: Option<Site>,
) -> Result<GpuTensor> {
    let seq = plan.seq;
    let (hq, hk, d) = plan.heads;
    let n1 = k::rms_norm(ctx, x, &b.input_norm, plan.eps)?;
    if stop == Some(Site::Qkv) {
        return Ok(n1);
    }
    let x1 = linear_input(ctx, plan, &n1, &[&b.q, &b.k, &b.v])?;
    let q = linear(ctx, plan, &x1, &b.q, b.q_bias.as_ref())?;
    let kk = linear(ctx, plan, &x1, &b.k, b.k_bias.as_ref())?;
    let v = linear(ctx, plan, &x1, &b.v, b.v_bias.as_ref())?;
    drop(x1);
    drop(n1);
    k::rope(ctx, &q, hq, d, seq, &plan.rope)?;
    k::rope(ctx, &kk, hk, d, seq, &plan.rope)?;
    let a = plan.attention(ctx, q, kk, v)?;
    if stop == Some(Site::O) {
        return Ok(a);
    }
    let h = attention_residual(ctx, plan, b, x, &a)?;
    drop(a);
    match stop {
        Some(site) => mlp_capture(ctx, plan, b, &h, site),
        None => mlp_residual(ctx, plan, b, &h),
    }
}

/// The residual stream after the attention half of the block, h = x + o_proj(a), where `a` is
/// the attention output for `x` ([`capture_input`] at [`Site::O`], f32) or its
/// [`ForwardPlan::stats_input`] form (f16 under F16, which is exactly the operand o_proj
/// multiplies then, so a caller that kept it gets the same h as the whole block would).
pub fn attention_residual(
    ctx: &GpuContext,
    plan: &ForwardPlan,
    b: &GpuBlock,
    x: &GpuTensor,
    a: &GpuTensor,
) -> Result<GpuTensor> {
    let xa = linear_input(ctx, plan, a, &[&b.o])?;
    let h = linear(ctx, plan, &xa, &b.o, None)?;
    drop(xa);
    k::add(ctx, &h, x)?;
    Ok(h)
}

/// The input of the MLP's linear layers at `site` ([`Site::GateUp`] or [`Site::Down`]) from the
/// residual stream `h` after attention ([`attention_residual`]).
pub fn mlp_capture(
    ctx: &GpuContext,
    plan: &ForwardPlan,
    b: &GpuBlock,
    h: &GpuTensor,
    site: Site,
) -> Result<GpuTensor> {
    match site {
        Site::GateUp => k::rms_norm(ctx, h, &b.post_norm, plan.eps),
        Site::Down => mlp_act(ctx, plan, b, h),
        _ => Err(Error::invalid(format!(
            "mlp_capture: {site:?} is not an input of the MLP"
        ))),
    }
}

/// The block's output h + down_proj(silu(gate_proj(n)) · up_proj(n)), n = post-attention norm of
/// the residual stream `h` ([`attention_residual`]).
pub fn mlp_residual(
    ctx: &GpuContext,
    plan: &ForwardPlan,
    b: &GpuBlock,
    h: &GpuTensor,
) -> Result<GpuTensor> {
    let g = mlp_act(ctx, plan, b, h)?;
    let xg = linear_input(ctx, plan, &g, &[&b.down])?;
    let out = linear(ctx, plan, &xg, &b.down, None)?;
    k::add(ctx, &out, h)?;
    Ok(out)
}

/// silu(gate_proj(n)) · up_proj(n) with n the post-attention norm of `h`: down_proj's input.
fn mlp_act(ctx: &GpuContext, plan: &ForwardPlan, b: &GpuBlock, h: &GpuTensor) -> Result<GpuTensor> {
    let n2 = k::rms_norm(ctx, h, &b.post_norm, plan.eps)?;
    let x2 = linear_input(ctx, plan, &n2, &[&b.gate, &b.up])?;
    let g = linear(ctx, plan, &x2, &b.gate, None)?;
    let u = linear(ctx, plan, &x2, &b.up, None)?;
    drop(x2);
    drop(n2);
    k::silu_mul(ctx, &g, &u)?;
    Ok(g)
}

/// The embedding table on the GPU as f32 (decoded once on the host), for `gpu::forward::embed`
/// (which gathers the rows of a batch's ids there: only the ids cross to the GPU).
pub fn embedding_table(ctx: &GpuContext, model: &Model) -> Result<GpuTensor> {
    let name = "model.embed_tokens.weight";
    let info = model.weights.info(name)?;
    let (vocab, hd) = (model.config.vocab_size, model.config.hidden_size);
    if info.shape[..] != [vocab, hd] {
        return Err(Error::tensor(
            &info.file,
            name,
            format!("expected shape [{vocab}, {hd}], got {:?}", info.shape),
        ));
    }
    GpuTensor::from_f32(ctx, vocab, hd, &model.weights.to_f32(name)?)
}

/// A whole model resident on the GPU for evaluation: every block, the final norm and the head.
/// (Calibration streams blocks instead; this is for models that fit.)
pub struct GpuModel {
    pub plan: ForwardPlan,
    blocks: Vec<GpuBlock>,
    final_norm: GpuTensor,
    head: GpuTensor,
    table: GpuTensor,
}

impl GpuModel {
    pub fn load(ctx: &GpuContext, model: &Model, seq: usize, precision: Precision) -> Result<Self> {
        let cfg = &model.config;
        let plan = ForwardPlan::new(ctx, cfg, seq, precision)?;
        let blocks = (0..cfg.num_hidden_layers)
            .map(|l| GpuBlock::upload(ctx, model, l, precision))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = upload(ctx, model, "model.norm.weight", precision)?;
        let head_name = if model.weights.contains("lm_head.weight") {
            "lm_head.weight"
        } else {
            "model.embed_tokens.weight"
        };
        let head = upload(ctx, model, head_name, precision)?;
        Ok(GpuModel {
            plan,
            blocks,
            final_norm,
            head,
            table: embedding_table(ctx, model)?,
        })
    }

    /// Logits (rows x vocab, f32) of whole sequences of `plan.seq` ids.
    pub fn logits(&self, ctx: &GpuContext, ids: &[u32]) -> Result<GpuTensor> {
        if ids.is_empty() || !ids.len().is_multiple_of(self.plan.seq) {
            return Err(Error::invalid(format!(
                "{} token ids are not whole sequences of {}",
                ids.len(),
                self.plan.seq
            )));
        }
        let mut x = k::embed(ctx, &self.table, ids, self.plan.seq)?;
        for b in &self.blocks {
            x = block_forward(ctx, &self.plan, b, &x)?;
        }
        let xn = k::rms_norm(ctx, &x, &self.final_norm, self.plan.eps)?;
        drop(x);
        let xh = linear_input(ctx, &self.plan, &xn, &[&self.head])?;
        linear(ctx, &self.plan, &xh, &self.head, None)
    }
}
