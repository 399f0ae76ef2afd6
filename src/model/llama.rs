//! The Llama decoder block as data: the weights of one block (`BlockWeights`) and of the whole
//! model (`LlamaWeights`), as f32 row-major matrices in PyTorch layout ([out, in]), loaded by name
//! from a `Model`'s safetensors.
//!
//! `BlockWeights::load` reads one block at a time, which is what the streaming pipeline (DESIGN.md
//! section 3) needs: only one block's weights are resident. This module only describes and loads
//! weights; the maths lives in `reference::forward` (CPU) and, later, `gpu/` (it must not compute
//! anything here, and must not touch the GPU).

use super::Model;
use super::config::LlamaConfig;
use crate::error::{Error, Result};

/// A linear layer y = x Wᵀ + b, with W stored row-major as [out_features, in_features] (PyTorch
/// layout, exactly as the checkpoint holds it).
#[derive(Clone, Debug, PartialEq)]
pub struct Linear {
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub out_features: usize,
    pub in_features: usize,
}

impl Linear {
    /// Checks that the buffers match the declared shape and that the shape is `[out, in]`.
    pub fn check(&self, op: &str, out_features: usize, in_features: usize) -> Result<()> {
        if (self.out_features, self.in_features) != (out_features, in_features) {
            return Err(Error::Shape {
                op: op.to_string(),
                expected: format!("[{out_features}, {in_features}]"),
                got: format!("[{}, {}]", self.out_features, self.in_features),
            });
        }
        if self.weight.len() != out_features * in_features {
            return Err(Error::Shape {
                op: format!("{op}.weight"),
                expected: format!("{} values", out_features * in_features),
                got: format!("{} values", self.weight.len()),
            });
        }
        if let Some(b) = &self.bias
            && b.len() != out_features
        {
            return Err(Error::Shape {
                op: format!("{op}.bias"),
                expected: format!("[{out_features}]"),
                got: format!("[{}]", b.len()),
            });
        }
        Ok(())
    }

    /// Reads `{prefix}.weight` (and `{prefix}.bias` when `bias`) from the model.
    fn load(model: &Model, prefix: &str, bias: bool) -> Result<Self> {
        let name = format!("{prefix}.weight");
        let info = model.weights.info(&name)?;
        let [out_features, in_features] = info.shape[..] else {
            return Err(Error::tensor(
                &info.file,
                &name,
                format!("expected a matrix, got shape {:?}", info.shape),
            ));
        };
        let weight = model.weights.to_f32(&name)?;
        let bias = if bias {
            Some(model.weights.to_f32(&format!("{prefix}.bias"))?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            bias,
            out_features,
            in_features,
        })
    }
}

/// The weights of one decoder block. Biases live inside each `Linear` (`q.bias` is Qwen2's and
/// Llama's `attention_bias` q bias; o/gate/up/down biases are covered the same way).
#[derive(Clone, Debug, PartialEq)]
pub struct BlockWeights {
    /// RMSNorm weight before attention, [hidden].
    pub input_norm: Vec<f32>,
    /// [heads * head_dim, hidden]
    pub q: Linear,
    /// [kv_heads * head_dim, hidden]
    pub k: Linear,
    /// [kv_heads * head_dim, hidden]
    pub v: Linear,
    /// [hidden, heads * head_dim]
    pub o: Linear,
    /// RMSNorm weight before the MLP, [hidden].
    pub post_norm: Vec<f32>,
    /// [intermediate, hidden]
    pub gate: Linear,
    /// [intermediate, hidden]
    pub up: Linear,
    /// [hidden, intermediate]
    pub down: Linear,
}

/// Reads a 1-D tensor and checks its length.
fn load_vec(model: &Model, name: &str, len: usize) -> Result<Vec<f32>> {
    let v = model.weights.to_f32(name)?;
    if v.len() != len {
        let info = model.weights.info(name)?;
        return Err(Error::tensor(
            &info.file,
            name,
            format!("expected [{len}], got shape {:?}", info.shape),
        ));
    }
    Ok(v)
}

impl BlockWeights {
    /// Loads block `layer` (0-based) only.
    pub fn load(model: &Model, layer: usize) -> Result<Self> {
        let cfg = &model.config;
        if layer >= cfg.num_hidden_layers {
            return Err(Error::invalid(format!(
                "block {layer} does not exist (the model has {} blocks)",
                cfg.num_hidden_layers
            )));
        }
        let p = format!("model.layers.{layer}");
        let w = BlockWeights {
            input_norm: load_vec(
                model,
                &format!("{p}.input_layernorm.weight"),
                cfg.hidden_size,
            )?,
            q: Linear::load(model, &format!("{p}.self_attn.q_proj"), cfg.qkv_bias)?,
            k: Linear::load(model, &format!("{p}.self_attn.k_proj"), cfg.qkv_bias)?,
            v: Linear::load(model, &format!("{p}.self_attn.v_proj"), cfg.qkv_bias)?,
            o: Linear::load(model, &format!("{p}.self_attn.o_proj"), cfg.o_bias)?,
            post_norm: load_vec(
                model,
                &format!("{p}.post_attention_layernorm.weight"),
                cfg.hidden_size,
            )?,
            gate: Linear::load(model, &format!("{p}.mlp.gate_proj"), cfg.mlp_bias)?,
            up: Linear::load(model, &format!("{p}.mlp.up_proj"), cfg.mlp_bias)?,
            down: Linear::load(model, &format!("{p}.mlp.down_proj"), cfg.mlp_bias)?,
        };
        // Model::open checked the shapes against the config already; checking again costs nothing
        // and keeps this loader safe if it is ever handed a model opened another way.
        w.check(cfg)?;
        Ok(w)
    }

    /// Checks every shape against `cfg` (used by the forward before indexing, so a hand-built or
    /// mismatched block is an error instead of a panic).
    pub fn check(&self, cfg: &LlamaConfig) -> Result<()> {
        let h = cfg.hidden_size;
        let q = cfg.num_attention_heads * cfg.head_dim;
        let kv = cfg.num_key_value_heads * cfg.head_dim;
        let f = cfg.intermediate_size;
        for (op, v) in [
            ("input_layernorm", &self.input_norm),
            ("post_attention_layernorm", &self.post_norm),
        ] {
            if v.len() != h {
                return Err(Error::Shape {
                    op: op.to_string(),
                    expected: format!("[{h}]"),
                    got: format!("[{}]", v.len()),
                });
            }
        }
        self.q.check("q_proj", q, h)?;
        self.k.check("k_proj", kv, h)?;
        self.v.check("v_proj", kv, h)?;
        self.o.check("o_proj", h, q)?;
        self.gate.check("gate_proj", f, h)?;
        self.up.check("up_proj", f, h)?;
        self.down.check("down_proj", h, f)?;
        Ok(())
    }
}

/// The whole model's weights, resident at once (the CPU reference and tests; the pipeline streams
/// blocks with `BlockWeights::load` instead).
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaWeights {
    /// [vocab, hidden]
    pub embed: Vec<f32>,
    pub blocks: Vec<BlockWeights>,
    /// [hidden]
    pub final_norm: Vec<f32>,
    /// [vocab, hidden]; `None` when the embeddings are tied (the embedding matrix is the head).
    pub lm_head: Option<Vec<f32>>,
}

impl LlamaWeights {
    pub fn load(model: &Model) -> Result<Self> {
        let cfg = &model.config;
        let vh = cfg.vocab_size * cfg.hidden_size;
        let embed = load_vec(model, "model.embed_tokens.weight", vh)?;
        let blocks = (0..cfg.num_hidden_layers)
            .map(|l| BlockWeights::load(model, l))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = load_vec(model, "model.norm.weight", cfg.hidden_size)?;
        // A tied checkpoint may still carry a copy of lm_head.weight (Model::open allows extras);
        // HF ignores it when tie_word_embeddings is set, and so do we.
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(load_vec(model, "lm_head.weight", vh)?)
        };
        Ok(LlamaWeights {
            embed,
            blocks,
            final_norm,
            lm_head,
        })
    }

    /// Checks every shape against `cfg`.
    pub fn check(&self, cfg: &LlamaConfig) -> Result<()> {
        let vh = cfg.vocab_size * cfg.hidden_size;
        let bad = |op: &str, expected: usize, got: usize| Error::Shape {
            op: op.to_string(),
            expected: format!("{expected} values"),
            got: format!("{got} values"),
        };
        if self.embed.len() != vh {
            return Err(bad("embed_tokens", vh, self.embed.len()));
        }
        if self.final_norm.len() != cfg.hidden_size {
            return Err(bad("norm", cfg.hidden_size, self.final_norm.len()));
        }
        if self.blocks.len() != cfg.num_hidden_layers {
            return Err(Error::Shape {
                op: "blocks".to_string(),
                expected: format!("{} blocks", cfg.num_hidden_layers),
                got: format!("{} blocks", self.blocks.len()),
            });
        }
        if let Some(h) = &self.lm_head
            && h.len() != vh
        {
            return Err(bad("lm_head", vh, h.len()));
        }
        for b in &self.blocks {
            b.check(cfg)?;
        }
        Ok(())
    }

    /// The output projection: lm_head, or the embedding matrix when tied.
    pub fn head(&self) -> &[f32] {
        self.lm_head.as_deref().unwrap_or(&self.embed)
    }
}
