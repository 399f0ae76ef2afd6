//! `config.json` of a Hugging Face Llama-family checkpoint (Llama, Mistral, Qwen2): the
//! hyper-parameters, validated, plus the tensor names and shapes they imply.
//!
//! This module only reads and checks configuration; it must not open weights (see `mod.rs`, which
//! compares `expected_tensors` with the safetensors headers) and must not guess values that change
//! the model's maths beyond the documented Hugging Face defaults.

use crate::error::{Error, Result};
use std::path::Path;

/// Architectures whose decoder block is the Llama block (RMSNorm, RoPE, GQA attention, SwiGLU MLP).
pub const SUPPORTED_ARCHITECTURES: [&str; 3] =
    ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

/// Validated hyper-parameters of a Llama-family model.
#[derive(Clone, Debug)]
pub struct LlamaConfig {
    /// The first supported entry of `architectures`.
    pub architecture: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub rope_scaling: Option<serde_json::Value>,
    pub torch_dtype: Option<String>,
    /// q/k/v projections have biases (always for Qwen2; `attention_bias` for Llama).
    pub qkv_bias: bool,
    /// o_proj has a bias (Llama's `attention_bias`; never for Qwen2).
    pub o_bias: bool,
    /// gate/up/down projections have biases (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// The whole config.json as read; exporters copy it and add `quantization_config`.
    pub raw: serde_json::Value,
}

/// Reads one optional field with serde, so a wrong type is reported with the key's name (serde's
/// own message for a whole struct does not say which field it was).
fn field<T: serde::de::DeserializeOwned>(
    raw: &serde_json::Value,
    key: &str,
    path: &Path,
) -> Result<Option<T>> {
    match raw.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|e| Error::format(path, format!("`{key}`: {e} (got {v})"))),
    }
}

/// A field the model cannot be built without.
fn required<T: serde::de::DeserializeOwned>(
    raw: &serde_json::Value,
    key: &str,
    path: &Path,
) -> Result<T> {
    field(raw, key, path)?.ok_or_else(|| Error::format(path, format!("`{key}` is missing")))
}

impl LlamaConfig {
    /// Reads and validates `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        if !path.is_file() {
            return Err(Error::format(
                &path,
                "missing: a model directory needs config.json",
            ));
        }
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let raw: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::format(&path, format!("invalid JSON: {e}")))?;
        Self::from_json(raw, &path)
    }

    /// Builds and validates a config from parsed JSON; `path` is only used in error messages.
    pub fn from_json(raw: serde_json::Value, path: &Path) -> Result<Self> {
        let archs: Vec<String> = raw
            .get("architectures")
            .and_then(|a| a.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        // Check the architecture before the fields: a BERT config would otherwise fail with a
        // confusing "missing field" instead of saying what is wrong.
        let architecture = archs
            .iter()
            .find(|a| SUPPORTED_ARCHITECTURES.contains(&a.as_str()))
            .cloned()
            .ok_or_else(|| {
                Error::UnsupportedArchitecture(if archs.is_empty() {
                    format!("(none listed in {})", path.display())
                } else {
                    archs.join(", ")
                })
            })?;
        let j = &raw;
        let is_qwen2 = architecture == "Qwen2ForCausalLM";
        let attention_bias = field(j, "attention_bias", path)?.unwrap_or(false);
        let hidden_size: usize = required(j, "hidden_size", path)?;
        let heads: usize = required(j, "num_attention_heads", path)?;
        let explicit_head_dim: Option<usize> = field(j, "head_dim", path)?;
        // Without an explicit head_dim, hidden must split evenly into heads.
        if explicit_head_dim.is_none() && heads > 0 && !hidden_size.is_multiple_of(heads) {
            return Err(Error::format(
                path,
                format!(
                    "num_attention_heads ({heads}) does not divide hidden_size ({hidden_size}) and no head_dim is given"
                ),
            ));
        }
        let cfg = LlamaConfig {
            architecture,
            hidden_size,
            intermediate_size: required(j, "intermediate_size", path)?,
            num_hidden_layers: required(j, "num_hidden_layers", path)?,
            num_attention_heads: heads,
            num_key_value_heads: field(j, "num_key_value_heads", path)?.unwrap_or(heads),
            head_dim: explicit_head_dim.unwrap_or(hidden_size.checked_div(heads).unwrap_or(0)),
            vocab_size: required(j, "vocab_size", path)?,
            // Hugging Face's LlamaConfig defaults.
            rms_norm_eps: field(j, "rms_norm_eps", path)?.unwrap_or(1e-6),
            rope_theta: field(j, "rope_theta", path)?.unwrap_or(10000.0),
            max_position_embeddings: field(j, "max_position_embeddings", path)?.unwrap_or(2048),
            tie_word_embeddings: field(j, "tie_word_embeddings", path)?.unwrap_or(false),
            rope_scaling: field(j, "rope_scaling", path)?,
            torch_dtype: field(j, "torch_dtype", path)?,
            qkv_bias: is_qwen2 || attention_bias,
            o_bias: !is_qwen2 && attention_bias,
            mlp_bias: field(j, "mlp_bias", path)?.unwrap_or(false),
            raw,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks that the sizes describe a model that can exist.
    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |m: String| Err(Error::format(path, m));
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive, got 0"));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "num_key_value_heads ({}) does not divide num_attention_heads ({})",
                self.num_key_value_heads, self.num_attention_heads
            ));
        }
        // RoPE rotates pairs of dimensions.
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim ({}) must be even for RoPE",
                self.head_dim
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad(format!(
                "rms_norm_eps must be a positive number, got {}",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!(
                "rope_theta must be a positive number, got {}",
                self.rope_theta
            ));
        }
        Ok(())
    }

    /// Every tensor the checkpoint must hold, with its shape (PyTorch layout: [out, in]), in
    /// model order: embeddings, each block, final norm, lm_head (absent when tied).
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let f = self.intermediate_size;
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, h],
        )];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            for (proj, rows, cols, bias) in [
                ("q_proj", q, h, self.qkv_bias),
                ("k_proj", kv, h, self.qkv_bias),
                ("v_proj", kv, h, self.qkv_bias),
                ("o_proj", h, q, self.o_bias),
            ] {
                out.push((format!("{p}.self_attn.{proj}.weight"), vec![rows, cols]));
                if bias {
                    out.push((format!("{p}.self_attn.{proj}.bias"), vec![rows]));
                }
            }
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            for (proj, rows, cols) in [("gate_proj", f, h), ("up_proj", f, h), ("down_proj", h, f)]
            {
                out.push((format!("{p}.mlp.{proj}.weight"), vec![rows, cols]));
                if self.mlp_bias {
                    out.push((format!("{p}.mlp.{proj}.bias"), vec![rows]));
                }
            }
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        out
    }

    /// Whether `name` is a linear projection weight inside a decoder block of this model
    /// (q/k/v/o_proj, gate/up/down_proj `.weight`): the tensors compression methods quantize.
    /// Embeddings, norms, biases and lm_head are not.
    pub fn is_linear(&self, name: &str) -> bool {
        block_linear_index(name).is_some_and(|l| l < self.num_hidden_layers)
    }

    /// Total number of parameters (tied embeddings counted once).
    pub fn parameter_count(&self) -> u64 {
        self.expected_tensors()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum()
    }
}

/// The seven linear projections of a Llama block, as `module.proj` suffixes of
/// `model.layers.N.`.
pub const LINEAR_SUFFIXES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// If `name` is `model.layers.N.<linear>.weight`, returns N. Independent of any config, for code
/// that only has a name.
pub fn block_linear_index(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("model.layers.")?;
    let (idx, rest) = rest.split_once('.')?;
    let module = rest.strip_suffix(".weight")?;
    if !LINEAR_SUFFIXES.contains(&module) {
        return None;
    }
    // Reject "01" or "+1": HF writes plain decimal indices and a look-alike would be a different name.
    if idx.is_empty()
        || !idx.bytes().all(|b| b.is_ascii_digit())
        || (idx.len() > 1 && idx.starts_with('0'))
    {
        return None;
    }
    idx.parse().ok()
}
