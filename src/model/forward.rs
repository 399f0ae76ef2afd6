//! The Llama decoder forward pass on the GPU, one block at a time: weights are uploaded per block
//! in their stored dtype (f32, f16 or bf16; the matmul kernel converts on load), activations are
//! f32 rows of `seq`-token sequences. `capture_input` hands back a linear layer's input so
//! calibration statistics see exactly what the layer sees. The CPU oracle is
//! `reference::forward`; this module only orchestrates `gpu::` kernels and must not hold more than
//! the block it is given.

use crate::error::{Error, Result};
use crate::gpu::forward as k;
use crate::gpu::matmul::{Layout, matmul_into};
use crate::gpu::{GpuContext, GpuDtype, GpuTensor};
use crate::model::Model;
use crate::model::config::LlamaConfig;
use crate::model::safetensors::Dtype;

/// The GPU dtype a stored tensor uploads as (f32, f16, bf16; anything else is an error).
pub fn gpu_dtype(model: &Model, name: &str) -> Result<GpuDtype> {
    let info = model.weights.info(name)?;
    match info.dtype {
        Dtype::F32 => Ok(GpuDtype::F32),
        Dtype::F16 => Ok(GpuDtype::F16),
        Dtype::BF16 => Ok(GpuDtype::BF16),
        d => Err(Error::tensor(
            &info.file,
            name,
            format!("unsupported dtype {d:?}"),
        )),
    }
}

/// One weight tensor uploaded as stored.
fn upload(ctx: &GpuContext, model: &Model, name: &str) -> Result<GpuTensor> {
    let info = model.weights.info(name)?;
    let (rows, cols) = match info.shape[..] {
        [r, c] => (r, c),
        [c] => (1, c),
        _ => {
            return Err(Error::tensor(
                &info.file,
                name,
                format!("expected a 1-D or 2-D tensor, got shape {:?}", info.shape),
            ));
        }
    };
    let dtype = gpu_dtype(model, name)?;
    // to_f32 refuses NaN/Inf (naming the tensor and index) before anything reaches the GPU.
    let v = model.weights.to_f32(name)?;
    if rows == 1 {
        // Norm weights and biases feed f32-only kernels (they are tiny).
        return GpuTensor::from_f32(ctx, 1, cols, &v);
    }
    GpuTensor::from_bytes(ctx, rows, cols, dtype, model.weights.bytes(name)?)
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
    /// Uploads block `layer` of `model`.
    pub fn upload(ctx: &GpuContext, model: &Model, layer: usize) -> Result<Self> {
        let p = format!("model.layers.{layer}.");
        let get = |s: &str| upload(ctx, model, &format!("{p}{s}"));
        let opt = |s: &str| -> Result<Option<GpuTensor>> {
            let n = format!("{p}{s}");
            if model.weights.contains(&n) {
                upload(ctx, model, &n).map(Some)
            } else {
                Ok(None)
            }
        };
        Ok(GpuBlock {
            input_norm: get("input_layernorm.weight")?,
            post_norm: get("post_attention_layernorm.weight")?,
            q: get("self_attn.q_proj.weight")?,
            k: get("self_attn.k_proj.weight")?,
            v: get("self_attn.v_proj.weight")?,
            o: get("self_attn.o_proj.weight")?,
            gate: get("mlp.gate_proj.weight")?,
            up: get("mlp.up_proj.weight")?,
            down: get("mlp.down_proj.weight")?,
            q_bias: opt("self_attn.q_proj.bias")?,
            k_bias: opt("self_attn.k_proj.bias")?,
            v_bias: opt("self_attn.v_proj.bias")?,
        })
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

/// y = x Wᵀ (+ bias) into a new rows x out tensor aligned to `seq`.
fn linear(
    ctx: &GpuContext,
    x: &GpuTensor,
    w: &GpuTensor,
    bias: Option<&GpuTensor>,
    seq: usize,
) -> Result<GpuTensor> {
    let y = GpuTensor::empty_aligned(ctx, x.rows, w.rows, GpuDtype::F32, seq)?;
    matmul_into(ctx, x, w, Layout::NT, &y, false, None)?;
    if let Some(b) = bias {
        k::bias_add(ctx, &y, b)?;
    }
    Ok(y)
}

/// Static per-model pieces of the forward: the rotary table and shapes.
pub struct ForwardPlan {
    pub seq: usize,
    pub rope: GpuTensor,
    pub heads: (usize, usize, usize),
    pub eps: f32,
}

impl ForwardPlan {
    pub fn new(ctx: &GpuContext, cfg: &LlamaConfig, seq: usize) -> Result<Self> {
        let inv = crate::reference::forward::rope_inv_freq(cfg)?;
        Ok(ForwardPlan {
            seq,
            rope: k::rope_table(ctx, &inv, seq)?,
            heads: (
                cfg.num_attention_heads,
                cfg.num_key_value_heads,
                cfg.head_dim,
            ),
            eps: cfg.rms_norm_eps as f32,
        })
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
    let q = linear(ctx, &n1, &b.q, b.q_bias.as_ref(), seq)?;
    let kk = linear(ctx, &n1, &b.k, b.k_bias.as_ref(), seq)?;
    let v = linear(ctx, &n1, &b.v, b.v_bias.as_ref(), seq)?;
    drop(n1);
    k::rope(ctx, &q, hq, d, seq, &plan.rope)?;
    k::rope(ctx, &kk, hk, d, seq, &plan.rope)?;
    let a = k::attention(ctx, &q, &kk, &v, seq, (hq, hk, d))?;
    drop((q, kk, v));
    if stop == Some(Site::O) {
        return Ok(a);
    }
    let h = linear(ctx, &a, &b.o, None, seq)?;
    drop(a);
    k::add(ctx, &h, x)?;
    let n2 = k::rms_norm(ctx, &h, &b.post_norm, plan.eps)?;
    if stop == Some(Site::GateUp) {
        return Ok(n2);
    }
    let g = linear(ctx, &n2, &b.gate, None, seq)?;
    let u = linear(ctx, &n2, &b.up, None, seq)?;
    drop(n2);
    k::silu_mul(ctx, &g, &u)?;
    drop(u);
    if stop == Some(Site::Down) {
        return Ok(g);
    }
    let out = linear(ctx, &g, &b.down, None, seq)?;
    k::add(ctx, &out, &h)?;
    Ok(out)
}

/// Embedding lookup on the host (the table stays in the mmap), uploaded aligned to `seq`.
pub fn embed(
    ctx: &GpuContext,
    model: &Model,
    table: &[f32],
    ids: &[u32],
    seq: usize,
) -> Result<GpuTensor> {
    let hd = model.config.hidden_size;
    let vocab = model.config.vocab_size;
    let mut x = Vec::with_capacity(ids.len() * hd);
    for (i, &id) in ids.iter().enumerate() {
        let id = id as usize;
        if id >= vocab {
            return Err(Error::invalid(format!(
                "token id {id} at position {i} is outside the vocabulary ({vocab})"
            )));
        }
        x.extend_from_slice(&table[id * hd..(id + 1) * hd]);
    }
    GpuTensor::from_f32_aligned(ctx, ids.len(), hd, &x, seq)
}

/// A whole model resident on the GPU for evaluation: every block, the final norm and the head.
/// (Calibration streams blocks instead; this is for models that fit.)
pub struct GpuModel {
    pub plan: ForwardPlan,
    blocks: Vec<GpuBlock>,
    final_norm: GpuTensor,
    head: GpuTensor,
    table: Vec<f32>,
    vocab: usize,
}

impl GpuModel {
    pub fn load(ctx: &GpuContext, model: &Model, seq: usize) -> Result<Self> {
        let cfg = &model.config;
        let plan = ForwardPlan::new(ctx, cfg, seq)?;
        let blocks = (0..cfg.num_hidden_layers)
            .map(|l| GpuBlock::upload(ctx, model, l))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = upload(ctx, model, "model.norm.weight")?;
        let head_name = if model.weights.contains("lm_head.weight") {
            "lm_head.weight"
        } else {
            "model.embed_tokens.weight"
        };
        let head = upload(ctx, model, head_name)?;
        Ok(GpuModel {
            plan,
            blocks,
            final_norm,
            head,
            table: model.weights.to_f32("model.embed_tokens.weight")?,
            vocab: cfg.vocab_size,
        })
    }

    /// Logits (rows x vocab, f32) of whole sequences of `plan.seq` ids.
    pub fn logits(&self, ctx: &GpuContext, model: &Model, ids: &[u32]) -> Result<GpuTensor> {
        if ids.is_empty() || !ids.len().is_multiple_of(self.plan.seq) {
            return Err(Error::invalid(format!(
                "{} token ids are not whole sequences of {}",
                ids.len(),
                self.plan.seq
            )));
        }
        let mut x = embed(ctx, model, &self.table, ids, self.plan.seq)?;
        for b in &self.blocks {
            x = block_forward(ctx, &self.plan, b, &x)?;
        }
        let xn = k::rms_norm(ctx, &x, &self.final_norm, self.plan.eps)?;
        drop(x);
        let logits = GpuTensor::empty(ctx, ids.len(), self.vocab, GpuDtype::F32)?;
        matmul_into(ctx, &xn, &self.head, Layout::NT, &logits, false, None)?;
        Ok(logits)
    }
}
