//! CPU reference forward pass of a Llama-family decoder (Llama, Mistral, Qwen2 blocks): embedding
//! lookup, RMSNorm, rotary embeddings (default and `llama3` scaling), causal grouped-query
//! attention, SwiGLU MLP, residuals, final norm and the output head. It is the oracle the GPU
//! forward is tested against and the reference for the fixture that Hugging Face transformers
//! produced (`assets/tiny/logits_fixture.safetensors`).
//!
//! Precision: activations are f32 at every point where transformers' float32 forward holds an f32
//! tensor (after each projection, norm, rotation, attention, MLP, residual add), and every
//! reduction inside an op (dot products, the RMS variance, softmax sums) is done in f64. The
//! result is the exact maths rounded to f32 at HF's tensor boundaries: HF's own f32 reductions
//! differ from it only by their rounding (about 1e-7 relative per op), so this is at least as
//! accurate as the model it checks, and the GPU (whose reduction order differs from both) can be
//! held to a bound derived from exact maths rather than from one f32 summation order.
//!
//! Plain loops, no tiling or threads: this must stay obviously right, must not call into `gpu/`,
//! and must not cache anything between calls (the pipeline calls `block_forward` per block).

use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;
use crate::model::llama::{BlockWeights, Linear, LlamaWeights};

/// The rotary-embedding frequency schedule named by the config.
#[derive(Clone, Debug, PartialEq)]
pub enum Rope {
    /// inv_freq_i = theta^(-2i/d).
    Default,
    /// Llama 3.1's frequency-dependent scaling (HF `_compute_llama3_parameters`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// The RoPE parameters object: `rope_scaling` (transformers 4.x), else `rope_parameters`
/// (transformers 5.x writes the type and theta there; the shipped tiny model has both layouts).
fn rope_params(cfg: &LlamaConfig) -> Option<&serde_json::Value> {
    cfg.rope_scaling
        .as_ref()
        .filter(|v| !v.is_null())
        .or_else(|| cfg.raw.get("rope_parameters").filter(|v| v.is_object()))
}

/// theta: the top-level `rope_theta` if the file has one, else `rope_parameters.rope_theta`
/// (transformers 5 may write only the latter), else the config's default (10000).
pub fn rope_theta(cfg: &LlamaConfig) -> f64 {
    if cfg.raw.get("rope_theta").is_some() {
        return cfg.rope_theta;
    }
    rope_params(cfg)
        .and_then(|p| p.get("rope_theta"))
        .and_then(|v| v.as_f64())
        .unwrap_or(cfg.rope_theta)
}

/// Which RoPE variant `cfg` asks for. Types we do not implement (linear, dynamic, yarn, longrope,
/// ...) are an error: silently using default frequencies would give a wrong oracle.
pub fn rope_kind(cfg: &LlamaConfig) -> Result<Rope> {
    let Some(p) = rope_params(cfg) else {
        return Ok(Rope::Default);
    };
    // Partial rotary (rotating only part of each head) is not part of the Llama block.
    if let Some(f) = p.get("partial_rotary_factor").and_then(|v| v.as_f64())
        && f != 1.0
    {
        return Err(Error::invalid(format!(
            "rope partial_rotary_factor {f} is not supported (Llama rotates whole heads)"
        )));
    }
    // HF accepts the legacy key `type` as well as `rope_type`.
    let ty = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    match ty {
        "default" => Ok(Rope::Default),
        "llama3" => {
            let num = |key: &str| {
                p.get(key).and_then(|v| v.as_f64()).ok_or_else(|| {
                    Error::invalid(format!(
                        "rope_scaling llama3: `{key}` missing or not a number"
                    ))
                })
            };
            let r = Rope::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            };
            if let Rope::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } = r
                && !(factor > 0.0
                    && low_freq_factor > 0.0
                    && high_freq_factor > low_freq_factor
                    && original_max_position_embeddings > 0.0)
            {
                // HF divides by (high - low) and by each factor: anything else gives inf/NaN.
                return Err(Error::invalid(format!(
                    "rope_scaling llama3: need factor > 0, 0 < low_freq_factor < high_freq_factor, \
                     original_max_position_embeddings > 0; got {r:?}"
                )));
            }
            Ok(r)
        }
        other => Err(Error::invalid(format!(
            "rope type `{other}` is not supported by the reference forward (default, llama3)"
        ))),
    }
}

/// The head_dim/2 inverse frequencies, in f64.
///
/// Default: inv_freq_i = 1 / theta^(2i/d), i = 0..d/2. `llama3` (HF `_compute_llama3_parameters`):
/// with wavelen_i = 2π / inv_freq_i, low_wavelen = original_max / low_freq_factor and
/// high_wavelen = original_max / high_freq_factor:
/// - wavelen_i < high_wavelen (high frequencies): unchanged;
/// - wavelen_i > low_wavelen (low frequencies): inv_freq_i / factor;
/// - otherwise, with s = (original_max / wavelen_i - low_freq_factor) / (high_freq_factor -
///   low_freq_factor): (1 - s) · inv_freq_i / factor + s · inv_freq_i.
///
/// HF computes this in f32; f64 here is the exact schedule (they differ by f32 rounding only).
pub fn rope_inv_freq(cfg: &LlamaConfig) -> Result<Vec<f64>> {
    let d = cfg.head_dim;
    let theta = rope_theta(cfg);
    let base: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / d as f64))
        .collect();
    match rope_kind(cfg)? {
        Rope::Default => Ok(base),
        Rope::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            Ok(base
                .into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let s = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - s) * f / factor + s * f
                    }
                })
                .collect())
        }
    }
}

/// Rotates `x` (t rows of `heads` heads of `head_dim`, row-major) in place for positions 0..t-1,
/// HF's rotate_half convention: dimension i pairs with i + head_dim/2 (not interleaved), and
/// both halves use inv_freq[i]:
///   out_i       = x_i cos(p·f_i) - x_{i+d/2} sin(p·f_i)
///   out_{i+d/2} = x_{i+d/2} cos(p·f_i) + x_i sin(p·f_i)
pub fn apply_rope(
    x: &mut [f32],
    t: usize,
    heads: usize,
    head_dim: usize,
    inv_freq: &[f64],
) -> Result<()> {
    let half = head_dim / 2;
    if x.len() != t * heads * head_dim || inv_freq.len() != half || !head_dim.is_multiple_of(2) {
        return Err(Error::Shape {
            op: "rope".to_string(),
            expected: format!(
                "{t} x {heads} x {head_dim} values (even head_dim), {half} frequencies"
            ),
            got: format!("{} values, {} frequencies", x.len(), inv_freq.len()),
        });
    }
    for p in 0..t {
        for h in 0..heads {
            let base = (p * heads + h) * head_dim;
            for (i, &f) in inv_freq.iter().enumerate() {
                let (sin, cos) = (p as f64 * f).sin_cos();
                let a = x[base + i] as f64;
                let b = x[base + i + half] as f64;
                x[base + i] = (a * cos - b * sin) as f32;
                x[base + i + half] = (b * cos + a * sin) as f32;
            }
        }
    }
    Ok(())
}

/// RMSNorm over rows of `w.len()`: y = (x · 1/sqrt(mean(x²) + eps)) · w. The mean of squares is
/// summed in f64 (HF: f32); the normalised row is rounded to f32 before the weight multiply, as in
/// HF (`weight * hidden_states.to(input_dtype)`), so only the variance's rounding differs.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f64) -> Result<Vec<f32>> {
    let n = w.len();
    if n == 0 || !x.len().is_multiple_of(n) {
        return Err(Error::Shape {
            op: "rms_norm".to_string(),
            expected: format!("rows of {n}"),
            got: format!("{} values", x.len()),
        });
    }
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(n) {
        let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        out.extend(
            row.iter()
                .zip(w)
                .map(|(&v, &g)| (v as f64 * inv) as f32 * g),
        );
    }
    Ok(out)
}

/// y = x Wᵀ + b for t rows of `in_features`, each dot product in f64, rounded to f32.
pub fn linear(x: &[f32], t: usize, l: &Linear) -> Result<Vec<f32>> {
    l.check("linear", l.out_features, l.in_features)?;
    project(
        x,
        t,
        &l.weight,
        l.bias.as_deref(),
        l.out_features,
        l.in_features,
    )
}

/// `linear` on borrowed parts (the tied head is the embedding matrix; no copy).
fn project(
    x: &[f32],
    t: usize,
    w: &[f32],
    bias: Option<&[f32]>,
    out_features: usize,
    in_features: usize,
) -> Result<Vec<f32>> {
    if x.len() != t * in_features
        || w.len() != out_features * in_features
        || bias.is_some_and(|b| b.len() != out_features)
    {
        return Err(Error::Shape {
            op: "linear".to_string(),
            expected: format!("x {t} x {in_features}, W {out_features} x {in_features}"),
            got: format!("x {} values, W {} values", x.len(), w.len()),
        });
    }
    let mut y = Vec::with_capacity(t * out_features);
    if in_features == 0 {
        // Degenerate but well defined: every output is its bias.
        for _ in 0..t {
            y.extend((0..out_features).map(|o| bias.map_or(0.0, |b| b[o])));
        }
        return Ok(y);
    }
    for row in x.chunks_exact(in_features) {
        for (o, wr) in w.chunks_exact(in_features).enumerate() {
            let mut s: f64 = row.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
            if let Some(b) = bias {
                s += b[o] as f64;
            }
            y.push(s as f32);
        }
    }
    Ok(y)
}

/// Causal grouped-query attention for one sequence at positions 0..t-1. `q` is t x (heads·d),
/// `k` and `v` are t x (kv_heads·d), all already rotated; query head h reads kv head
/// h / (heads / kv_heads) (HF's `repeat_kv` puts the copies of one kv head next to each other).
/// Scores are scaled by 1/sqrt(d), softmax in f64 over positions 0..=i only: masked positions are
/// never looked at, so position i cannot depend on later tokens even through the max.
pub fn attention(cfg: &LlamaConfig, q: &[f32], k: &[f32], v: &[f32], t: usize) -> Result<Vec<f32>> {
    let (hq, hk, d) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    if hk == 0
        || !hq.is_multiple_of(hk)
        || q.len() != t * hq * d
        || k.len() != t * hk * d
        || v.len() != k.len()
    {
        return Err(Error::Shape {
            op: "attention".to_string(),
            expected: format!("q {t} x {hq} x {d}, k/v {t} x {hk} x {d} (kv heads dividing heads)"),
            got: format!("q {}, k {}, v {} values", q.len(), k.len(), v.len()),
        });
    }
    let group = hq / hk;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0f32; t * hq * d];
    let mut scores = vec![0f64; t];
    for h in 0..hq {
        let kvh = h / group;
        for i in 0..t {
            let qi = &q[(i * hq + h) * d..(i * hq + h + 1) * d];
            let mut max = f64::NEG_INFINITY;
            for (j, s) in scores.iter_mut().enumerate().take(i + 1) {
                let kj = &k[(j * hk + kvh) * d..(j * hk + kvh + 1) * d];
                *s = qi
                    .iter()
                    .zip(kj)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
                    * scale;
                max = max.max(*s);
            }
            let mut sum = 0f64;
            for s in scores.iter_mut().take(i + 1) {
                *s = (*s - max).exp();
                sum += *s;
            }
            let o = &mut out[(i * hq + h) * d..(i * hq + h + 1) * d];
            for (c, oc) in o.iter_mut().enumerate() {
                let mut acc = 0f64;
                for (j, &p) in scores.iter().enumerate().take(i + 1) {
                    acc += p * v[(j * hk + kvh) * d + c] as f64;
                }
                *oc = (acc / sum) as f32;
            }
        }
    }
    Ok(out)
}

/// One decoder block on `x` (t x hidden, positions 0..t-1), returning the block's output (t x
/// hidden): h = x + o(attn(rope(q(n1 x)), rope(k(n1 x)), v(n1 x))); out = h + down(silu(gate(n2 h))
/// · up(n2 h)), with n1/n2 the input and post-attention RMSNorms.
pub fn block_forward(cfg: &LlamaConfig, w: &BlockWeights, x: &[f32], t: usize) -> Result<Vec<f32>> {
    w.check(cfg)?;
    let hd = cfg.hidden_size;
    if x.len() != t * hd {
        return Err(Error::Shape {
            op: "block_forward".to_string(),
            expected: format!("{t} x {hd} values"),
            got: format!("{} values", x.len()),
        });
    }
    let inv_freq = rope_inv_freq(cfg)?;
    let n1 = rms_norm(x, &w.input_norm, cfg.rms_norm_eps)?;
    let mut q = linear(&n1, t, &w.q)?;
    let mut k = linear(&n1, t, &w.k)?;
    let v = linear(&n1, t, &w.v)?;
    apply_rope(&mut q, t, cfg.num_attention_heads, cfg.head_dim, &inv_freq)?;
    apply_rope(&mut k, t, cfg.num_key_value_heads, cfg.head_dim, &inv_freq)?;
    let a = attention(cfg, &q, &k, &v, t)?;
    let o = linear(&a, t, &w.o)?;
    let h: Vec<f32> = x.iter().zip(&o).map(|(&a, &b)| a + b).collect();
    let n2 = rms_norm(&h, &w.post_norm, cfg.rms_norm_eps)?;
    let g = linear(&n2, t, &w.gate)?;
    let u = linear(&n2, t, &w.up)?;
    // silu(g) = g · sigmoid(g) = g / (1 + e^-g), in f64 then rounded once.
    let act: Vec<f32> = g
        .iter()
        .zip(&u)
        .map(|(&g, &u)| {
            let g = g as f64;
            (g / (1.0 + (-g).exp()) * u as f64) as f32
        })
        .collect();
    let m = linear(&act, t, &w.down)?;
    Ok(h.iter().zip(&m).map(|(&a, &b)| a + b).collect())
}

/// Embedding lookup: t x hidden. An id outside the vocabulary is an error.
pub fn embed(cfg: &LlamaConfig, w: &LlamaWeights, ids: &[u32]) -> Result<Vec<f32>> {
    let hd = cfg.hidden_size;
    if w.embed.len() != cfg.vocab_size * hd {
        return Err(Error::Shape {
            op: "embed".to_string(),
            expected: format!("{} x {hd} values", cfg.vocab_size),
            got: format!("{} values", w.embed.len()),
        });
    }
    let mut x = Vec::with_capacity(ids.len() * hd);
    for (p, &id) in ids.iter().enumerate() {
        let id = id as usize;
        if id >= cfg.vocab_size {
            return Err(Error::invalid(format!(
                "token id {id} at position {p} is outside the vocabulary ({})",
                cfg.vocab_size
            )));
        }
        x.extend_from_slice(&w.embed[id * hd..(id + 1) * hd]);
    }
    Ok(x)
}

/// The final hidden states (t x hidden) after every block and the final RMSNorm.
pub fn final_hidden(cfg: &LlamaConfig, w: &LlamaWeights, ids: &[u32]) -> Result<Vec<f32>> {
    w.check(cfg)?;
    let t = ids.len();
    let mut x = embed(cfg, w, ids)?;
    for b in &w.blocks {
        x = block_forward(cfg, b, &x, t)?;
    }
    rms_norm(&x, &w.final_norm, cfg.rms_norm_eps)
}

/// Logits (t x vocab) of one sequence of token ids at positions 0..t-1 (no KV cache, batch 1).
pub fn logits(cfg: &LlamaConfig, w: &LlamaWeights, ids: &[u32]) -> Result<Vec<f32>> {
    let x = final_hidden(cfg, w, ids)?;
    project(
        &x,
        ids.len(),
        w.head(),
        None,
        cfg.vocab_size,
        cfg.hidden_size,
    )
}
