//! Random-weight Llama checkpoints in Hugging Face layout, for tests, benches and smoke runs:
//! config.json, one `model.safetensors` or N shards plus `model.safetensors.index.json`, weights in
//! F32, F16 or BF16 with realistic scales (linear weights ~ N(0, 1/sqrt(in)), norms ~ 1).
//!
//! Output is written through `OutputDir`, so a failed run leaves nothing behind. This module must
//! not be used to make models whose outputs matter (they are noise) and writes no tokenizer.

use super::config::LlamaConfig;
use super::safetensors::Dtype;
use super::writer::{OutputDir, TensorOut};
use crate::error::{Error, Result};
use crate::rng::Rng;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use std::collections::BTreeMap;
use std::path::Path;

/// Shape and storage of a synthetic model.
#[derive(Clone, Debug)]
pub struct SynthSpec {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    /// F32, F16 or BF16.
    pub dtype: Dtype,
    /// 0 or 1: a single `model.safetensors`; N > 1: N shards plus an index.
    pub shards: usize,
    pub tie_embeddings: bool,
}

impl Default for SynthSpec {
    /// A tiny model (about 0.1 M parameters) that every test can afford.
    fn default() -> Self {
        SynthSpec {
            hidden: 64,
            intermediate: 160,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            vocab: 256,
            dtype: Dtype::F32,
            shards: 1,
            tie_embeddings: false,
        }
    }
}

impl SynthSpec {
    /// Shapes users know by name (random weights; bf16, sharded every ~2 GB for the large ones).
    pub const SHAPES: [&'static str; 4] = ["tiny", "smollm2-135m", "llama-7b", "llama-13b"];

    pub fn named(name: &str) -> Result<Self> {
        let s = |hidden, intermediate, layers, heads, kv_heads, vocab, tie, shards| SynthSpec {
            hidden,
            intermediate,
            layers,
            heads,
            kv_heads,
            vocab,
            dtype: Dtype::BF16,
            shards,
            tie_embeddings: tie,
        };
        Ok(match name {
            "tiny" => s(256, 768, 4, 8, 4, 2048, true, 1),
            "smollm2-135m" => s(576, 1536, 30, 9, 3, 49152, true, 1),
            "llama-7b" => s(4096, 11008, 32, 32, 32, 32000, false, 7),
            "llama-13b" => s(5120, 13824, 40, 40, 40, 32000, false, 13),
            _ => {
                return Err(Error::invalid(format!(
                    "unknown shape `{name}` (known: {})",
                    Self::SHAPES.join(", ")
                )));
            }
        })
    }

    /// The config.json this spec writes.
    pub fn config_json(&self) -> serde_json::Value {
        let torch_dtype = match self.dtype {
            Dtype::F16 => "float16",
            Dtype::BF16 => "bfloat16",
            _ => "float32",
        };
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.hidden.checked_div(self.heads).unwrap_or(0),
            "vocab_size": self.vocab,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": false,
            "mlp_bias": false,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": torch_dtype,
        })
    }
}

/// Writes a random-weight Llama checkpoint to `out` (atomically; an earlier wgpress output there is
/// replaced). The same `seed` and spec always give the same bytes.
pub fn write_random_llama(out: &Path, cfg: &SynthSpec, seed: u64) -> Result<()> {
    if !matches!(cfg.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
        return Err(Error::invalid(format!(
            "synthetic model dtype must be F32, F16 or BF16, got {}",
            cfg.dtype
        )));
    }
    if cfg.heads > 0 && !cfg.hidden.is_multiple_of(cfg.heads) {
        return Err(Error::invalid(format!(
            "synthetic model: heads ({}) must divide hidden ({})",
            cfg.heads, cfg.hidden
        )));
    }
    let json = cfg.config_json();
    // Validate through the real config parser so a spec we write is always one we can read.
    let config = LlamaConfig::from_json(json.clone(), &out.join("config.json"))?;
    let tensors = config.expected_tensors();
    let shards = cfg.shards.max(1);
    if shards > tensors.len() {
        return Err(Error::invalid(format!(
            "synthetic model: {shards} shards for only {} tensors",
            tensors.len()
        )));
    }

    let dir = OutputDir::create(out)?;
    dir.write_json("config.json", &json)?;
    let mut md = BTreeMap::new();
    md.insert("format".to_string(), "pt".to_string());

    // Contiguous groups of roughly equal bytes, in model order, as HF's sharding does; each group
    // has at least one tensor.
    let elem = cfg.dtype.bitsize() / 8;
    let sizes: Vec<usize> = tensors
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() * elem)
        .collect();
    let total: usize = sizes.iter().sum();
    let mut group = vec![0usize; tensors.len()];
    let mut acc = 0usize;
    for (i, s) in sizes.iter().enumerate() {
        // Shard index of this tensor's first byte, kept monotone and leaving room for later shards.
        let by_bytes = (acc * shards) / total.max(1);
        let prev = if i == 0 { 0 } else { group[i - 1] };
        let min_left = shards.saturating_sub(tensors.len() - i); // must reach shards-1 by the end
        group[i] = by_bytes
            .clamp(prev, (prev + 1).min(shards - 1))
            .max(min_left);
        acc += s;
    }

    let mut rng = Rng::new(seed);
    let mut weight_map = serde_json::Map::new();
    for k in 0..shards {
        let file = if shards == 1 {
            super::safetensors::SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, shards)
        };
        let mut outs = Vec::new();
        for ((name, shape), _) in tensors.iter().zip(&group).filter(|(_, g)| **g == k) {
            let values = random_tensor(&mut rng, name, shape);
            outs.push(TensorOut {
                name: name.clone(),
                dtype: cfg.dtype,
                shape: shape.clone(),
                data: encode(&values, cfg.dtype),
            });
            weight_map.insert(name.clone(), serde_json::Value::String(file.clone()));
        }
        dir.write_safetensors(&file, &outs, &md)?;
    }
    if shards > 1 {
        dir.write_json(
            super::safetensors::INDEX_FILE,
            &serde_json::json!({
                "metadata": {"total_size": total},
                "weight_map": weight_map,
            }),
        )?;
    }
    // The marker lets a later run replace this directory (OutputDir refuses foreign directories).
    dir.write_json(
        super::writer::MARKER,
        &serde_json::json!({"tool": "wgpress", "command": "synth", "seed": seed}),
    )?;
    dir.commit()?;
    Ok(())
}

/// Values for one tensor: norms near 1, embeddings and projections with std 1/sqrt(fan-in), so
/// activations keep unit scale through a block the way a trained model's roughly do.
fn random_tensor(rng: &mut Rng, name: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    if name.ends_with("norm.weight") {
        return (0..n).map(|_| 1.0 + 0.1 * rng.normal() as f32).collect();
    }
    if name.ends_with(".bias") {
        return rng.normal_vec(n, 0.02);
    }
    let fan_in = shape.last().copied().unwrap_or(1).max(1);
    rng.normal_vec(n, 1.0 / (fan_in as f32).sqrt())
}

/// Little-endian bytes of `v` in `dtype` (F32, F16 or BF16; checked by the caller).
fn encode(v: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F16 => {
            let mut h = vec![f16::ZERO; v.len()];
            h.convert_from_f32_slice(v);
            h.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
        Dtype::BF16 => {
            let mut h = vec![bf16::ZERO; v.len()];
            h.convert_from_f32_slice(v);
            h.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
        _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}
