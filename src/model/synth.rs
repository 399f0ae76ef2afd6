//! Random-weight Llama checkpoints in Hugging Face layout, for tests, benches and smoke runs:
//! config.json, one `model.safetensors` or N shards plus `model.safetensors.index.json`, weights in
//! F32, F16 or BF16 with realistic scales (linear weights ~ N(0, 1/sqrt(in)), norms ~ 1), and
//! optionally a few outlier input channels (see `OUTLIER_SCALE`).
//!
//! A tokenizer is written when the spec's vocabulary can hold it: `tokenizer.json` and
//! `tokenizer_config.json` are the shipped tiny model's byte-level BPE tokenizer
//! (`assets/tiny/`, `TOKENIZER_IDS` ids, `<s>` = 1 = the config's `bos_token_id`), written iff
//! `vocab >= TOKENIZER_IDS`; a smaller vocabulary gets no tokenizer (its ids would index past the
//! embedding). Embedding rows past the tokenizer's ids are random like the rest and never used.
//!
//! Tensors are generated on all cores in fixed-size chunks, each chunk from its own generator
//! seeded from (seed, tensor index, chunk index), so the bytes depend only on the spec and the
//! seed, never on the number of threads or the sharding. Host memory stays about one shard.
//! Output is written through `OutputDir`, so a failed run leaves nothing behind. This module must
//! not be used to make models whose outputs matter (they are noise).

use super::config::LlamaConfig;
use super::safetensors::Dtype;
use super::writer::{OutputDir, TensorOut};
use crate::error::{Error, Result};
use crate::rng::Rng;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use std::collections::BTreeMap;
use std::path::Path;

/// The tiny model's tokenizer, written into synthetic checkpoints whose vocabulary can hold it.
const TOKENIZER_JSON: &str = include_str!("../../assets/tiny/tokenizer.json");
/// Its transformers config: names the class and `<s>` as BOS, and says not to add BOS on encode.
const TOKENIZER_CONFIG_JSON: &str = include_str!("../../assets/tiny/tokenizer_config.json");

/// Number of ids the embedded tokenizer produces (largest id + 1, its added tokens `<unk>`, `<s>`,
/// `</s>` = 0, 1, 2 included): the smallest `vocab` that gets a tokenizer.
pub const TOKENIZER_IDS: usize = 2048;

/// Factor applied to `input_layernorm.weight` and `post_attention_layernorm.weight` at the outlier
/// channels. Trained Llamas have a few hidden channels whose activations are one to two orders of
/// magnitude above the rest in every block (LLM.int8(), SmoothQuant, "Massive Activations"); they
/// are what makes per-tensor activation scales, act-order and activation-aware pruning matter.
/// Scaling the norm weights gives the inputs of q/k/v and gate/up such channels (~20x the others)
/// without needing a trained residual stream.
pub const OUTLIER_SCALE: f32 = 20.0;

/// Elements generated per work item: small enough that a few large tensors still spread over all
/// cores, large enough that scheduling costs nothing. Part of the seeding, so changing it changes
/// every synthetic model's bytes.
const CHUNK: usize = 1 << 16;

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
    /// Number of hidden channels (chosen from the seed, the same in every block) whose
    /// `input_layernorm` and `post_attention_layernorm` weights are `OUTLIER_SCALE` times larger.
    pub outliers: usize,
}

impl Default for SynthSpec {
    /// A tiny model (about 0.1 M parameters) that every test can afford; no outliers.
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
            outliers: 0,
        }
    }
}

impl SynthSpec {
    /// Shapes users know by name (random weights; bf16, sharded every ~2 GB for the large ones).
    /// All have a vocabulary large enough for the tokenizer. Outlier channels: 4 for the Llama
    /// shapes (LLaMA-7B has a handful of massive-activation channels), 2 for the small ones.
    pub const SHAPES: [&'static str; 4] = ["tiny", "smollm2-135m", "llama-7b", "llama-13b"];

    pub fn named(name: &str) -> Result<Self> {
        let s = |hidden, intermediate, layers, heads, kv_heads, vocab, tie, shards, outliers| {
            SynthSpec {
                hidden,
                intermediate,
                layers,
                heads,
                kv_heads,
                vocab,
                dtype: Dtype::BF16,
                shards,
                tie_embeddings: tie,
                outliers,
            }
        };
        Ok(match name {
            "tiny" => s(256, 768, 4, 8, 4, 2048, true, 1, 2),
            "smollm2-135m" => s(576, 1536, 30, 9, 3, 49152, true, 1, 2),
            "llama-7b" => s(4096, 11008, 32, 32, 32, 32000, false, 7, 4),
            "llama-13b" => s(5120, 13824, 40, 40, 40, 32000, false, 13, 4),
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

    /// Whether `write_random_llama` writes a tokenizer for this spec.
    pub fn has_tokenizer(&self) -> bool {
        self.vocab >= TOKENIZER_IDS
    }

    /// The outlier channels `seed` picks (sorted, distinct, `outliers` of them, below `hidden`);
    /// the same ones `write_random_llama` scales and records in its marker file.
    pub fn outlier_channels(&self, seed: u64) -> Result<Vec<usize>> {
        if self.outliers > self.hidden {
            return Err(Error::invalid(format!(
                "synthetic model: {} outlier channels but hidden is only {}",
                self.outliers, self.hidden
            )));
        }
        // A stream of its own, so the channels do not depend on how many tensors there are.
        let mut rng = Rng::new(seed ^ 0x6F75_746C_6965_7273); // "outliers"
        // Partial Fisher-Yates: the first `outliers` entries are a uniform distinct sample.
        let mut idx: Vec<usize> = (0..self.hidden).collect();
        for i in 0..self.outliers {
            let j = i + rng.below((self.hidden - i) as u64) as usize;
            idx.swap(i, j);
        }
        idx.truncate(self.outliers);
        idx.sort_unstable();
        Ok(idx)
    }
}

/// Writes a random-weight Llama checkpoint to `out` (atomically; an earlier wgpress output there is
/// replaced), generating on all available cores. The same `seed` and spec always give the same
/// bytes.
pub fn write_random_llama(out: &Path, cfg: &SynthSpec, seed: u64) -> Result<()> {
    write_random_llama_threads(out, cfg, seed, crate::par::threads())
}

/// `write_random_llama` on `threads` threads (0 counts as 1). The output does not depend on
/// `threads`.
pub fn write_random_llama_threads(
    out: &Path,
    cfg: &SynthSpec,
    seed: u64,
    threads: usize,
) -> Result<()> {
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
    let outliers = cfg.outlier_channels(seed)?;
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
    if cfg.has_tokenizer() {
        dir.write_file(super::tokenizer::TOKENIZER_FILE, TOKENIZER_JSON.as_bytes())?;
        dir.write_file("tokenizer_config.json", TOKENIZER_CONFIG_JSON.as_bytes())?;
    }
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

    let zig = Ziggurat::new();
    let mut pool = BufferPool::default();
    let mut weight_map = serde_json::Map::new();
    for k in 0..shards {
        let file = if shards == 1 {
            super::safetensors::SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, shards)
        };
        // Global tensor indices (the seeding uses them, so values do not depend on the sharding).
        let members: Vec<usize> = (0..tensors.len()).filter(|&i| group[i] == k).collect();
        let mut outs: Vec<TensorOut> = members
            .iter()
            .map(|&i| TensorOut {
                name: tensors[i].0.clone(),
                dtype: cfg.dtype,
                shape: tensors[i].1.clone(),
                data: pool.take(sizes[i]),
            })
            .collect();
        // Buffers no tensor of this shard fits in are freed, so memory stays about one shard.
        pool.clear();
        // One job per CHUNK elements of every tensor of the shard, each owning its output bytes.
        let mut jobs = Vec::new();
        for (&i, t) in members.iter().zip(outs.iter_mut()) {
            let kind = Kind::of(&t.name, &t.shape, &outliers);
            for (c, bytes) in t.data.chunks_mut(CHUNK * elem).enumerate() {
                jobs.push(Job {
                    rng: chunk_rng(seed, i, c),
                    kind,
                    start: c * CHUNK,
                    bytes,
                });
            }
        }
        run_jobs(jobs, &zig, cfg.dtype, threads);
        for t in &outs {
            weight_map.insert(t.name.clone(), serde_json::Value::String(file.clone()));
        }
        dir.write_safetensors(&file, &outs, &md)?;
        pool.put(outs.into_iter().map(|t| t.data));
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
    // The outlier channels go here, not into config.json, which must stay a plain HF config.
    dir.write_json(
        super::writer::MARKER,
        &serde_json::json!({
            "tool": "wgpress",
            "command": "synth",
            "seed": seed,
            "outlier_channels": outliers,
            "outlier_scale": OUTLIER_SCALE,
        }),
    )?;
    dir.commit()?;
    Ok(())
}

/// The previous shard's tensor buffers, reused for the next one: blocks repeat, so most sizes
/// recur, and overwriting a buffer is cheaper than faulting in ~2 GB of fresh pages per shard
/// (fresh buffers fault in every 4 KiB page, 3.3 M faults for a 7B model; with the pool a 7B run
/// took 650 k).
#[derive(Default)]
struct BufferPool(Vec<Vec<u8>>);

impl BufferPool {
    /// A buffer of `len` bytes, the smallest pooled one that holds it, else a new one. Its
    /// contents are stale: every byte is overwritten by the jobs, so it is not zeroed again (a
    /// memset of ~2 GB on one thread would cost more than the faults it saves).
    fn take(&mut self, len: usize) -> Vec<u8> {
        let best = (0..self.0.len())
            .filter(|&i| self.0[i].capacity() >= len)
            .min_by_key(|&i| self.0[i].capacity());
        let mut v = best.map(|i| self.0.swap_remove(i)).unwrap_or_default();
        v.truncate(len);
        v.resize(len, 0);
        v
    }

    fn put(&mut self, bufs: impl Iterator<Item = Vec<u8>>) {
        self.0.extend(bufs);
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// How a tensor's values are drawn.
#[derive(Clone, Copy)]
enum Kind<'a> {
    /// 1 + 0.1 N(0, 1), times `OUTLIER_SCALE` at the listed channels.
    Norm { outliers: &'a [usize] },
    /// N(0, std^2).
    Normal { std: f32 },
}

impl<'a> Kind<'a> {
    /// Norms near 1, biases small, embeddings and projections with std 1/sqrt(fan-in), so
    /// activations keep unit scale through a block the way a trained model's roughly do. Only the
    /// norms in front of q/k/v and gate/up get outliers: the final norm feeds lm_head, which the
    /// compressors leave alone.
    fn of(name: &str, shape: &[usize], outliers: &'a [usize]) -> Self {
        if name.ends_with("input_layernorm.weight")
            || name.ends_with("post_attention_layernorm.weight")
        {
            return Kind::Norm { outliers };
        }
        if name.ends_with("norm.weight") {
            return Kind::Norm { outliers: &[] };
        }
        if name.ends_with(".bias") {
            return Kind::Normal { std: 0.02 };
        }
        let fan_in = shape.last().copied().unwrap_or(1).max(1);
        Kind::Normal {
            std: 1.0 / (fan_in as f32).sqrt(),
        }
    }
}

/// Elements `start..` of one tensor, to be written into `bytes` (whose length sets the count).
struct Job<'a> {
    rng: Rng,
    kind: Kind<'a>,
    start: usize,
    bytes: &'a mut [u8],
}

/// The generator of chunk `chunk` of tensor `tensor`. SplitMix outputs are bijective and well
/// mixed, so chaining them gives every (seed, tensor, chunk) a start state far from the others'.
fn chunk_rng(seed: u64, tensor: usize, chunk: usize) -> Rng {
    let a = Rng::new(seed).next_u64();
    let b = Rng::new(a ^ tensor as u64).next_u64();
    Rng::new(b ^ chunk as u64)
}

/// Runs `jobs` on `threads` threads from a shared queue (jobs are at most CHUNK elements, so the
/// queue balances the load), each thread with its own scratch buffers.
fn run_jobs(jobs: Vec<Job<'_>>, zig: &Ziggurat, dtype: Dtype, threads: usize) {
    crate::par::for_each_queued(jobs, threads, Scratch::default, |scratch, job| {
        job.run(zig, dtype, scratch)
    });
}

/// Per-thread buffers, reused across jobs.
#[derive(Default)]
struct Scratch {
    values: Vec<f32>,
    half: Vec<u16>,
}

impl Job<'_> {
    fn run(mut self, zig: &Ziggurat, dtype: Dtype, scratch: &mut Scratch) {
        let elem = dtype.bitsize() / 8;
        let n = self.bytes.len() / elem;
        let v = &mut scratch.values;
        v.resize(n, 0.0);
        match self.kind {
            Kind::Normal { std } => zig.fill(&mut self.rng, v, std),
            Kind::Norm { outliers } => {
                zig.fill(&mut self.rng, v, 0.1);
                v.iter_mut().for_each(|x| *x += 1.0);
                for &c in outliers {
                    if let Some(x) = c.checked_sub(self.start).and_then(|i| v.get_mut(i)) {
                        *x *= OUTLIER_SCALE;
                    }
                }
            }
        }
        encode_into(v, dtype, &mut scratch.half, self.bytes);
    }
}

/// Normal samples by the ziggurat method (Marsaglia and Tsang, 256 layers, as in rand_distr):
/// about 99% of draws cost one `next_u64`, a multiply and a compare. Measured about twice as fast
/// as Marsaglia's polar method in f32, and `Rng::normal` (one ln, sqrt and cos per sample) is
/// slower still; at 7B's 6.7 G samples that is the difference between seconds and a minute.
/// Exact, not an approximation (tails included): checked against N(0, 1) with 10^8 draws in
/// quarter-sigma bins, chi-square 38 for 41 degrees of freedom.
struct Ziggurat {
    /// Layer right edges: `x[0]` the base layer's virtual width, `x[1]` = R, `x[256]` = 0.
    x: [f64; 257],
    /// `pdf(x[i])`.
    f: [f64; 257],
}

impl Ziggurat {
    /// Start of the tail and common area of the 256 layers (Marsaglia and Tsang's constants).
    const R: f64 = 3.654_152_885_361_009;
    const V: f64 = 4.928_673_233_99e-3;

    fn pdf(x: f64) -> f64 {
        (-0.5 * x * x).exp()
    }

    fn new() -> Self {
        let mut x = [0.0; 257];
        x[0] = Self::V / Self::pdf(Self::R);
        x[1] = Self::R;
        // Each layer i spans [0, x[i]] x [pdf(x[i]), pdf(x[i+1])] and has area V.
        for i in 1..255 {
            x[i + 1] = (-2.0 * (Self::V / x[i] + Self::pdf(x[i])).ln()).sqrt();
        }
        x[256] = 0.0;
        Ziggurat {
            x,
            f: x.map(Self::pdf),
        }
    }

    /// One N(0, 1) sample.
    fn sample(&self, rng: &mut Rng) -> f64 {
        loop {
            let bits = rng.next_u64();
            // Low 8 bits pick the layer, the top 53 a uniform in [-1, 1); through i64 because
            // u64 -> f64 has no single instruction on x86 before AVX-512.
            let i = (bits & 0xff) as usize;
            let u = ((bits >> 11) as i64) as f64 * (2.0 / (1u64 << 53) as f64) - 1.0;
            let x = u * self.x[i];
            if x.abs() < self.x[i + 1] {
                return x;
            }
            if i == 0 {
                // Beyond R: Marsaglia's exponential-rejection tail.
                loop {
                    let t = open01(rng).ln() / Self::R;
                    let y = open01(rng).ln();
                    if -2.0 * y >= t * t {
                        return if u < 0.0 { t - Self::R } else { Self::R - t };
                    }
                }
            }
            if self.f[i + 1] + (self.f[i] - self.f[i + 1]) * open01(rng) < Self::pdf(x) {
                return x;
            }
        }
    }

    /// Fills `out` with N(0, std^2) samples.
    fn fill(&self, rng: &mut Rng, out: &mut [f32], std: f32) {
        for o in out {
            *o = self.sample(rng) as f32 * std;
        }
    }
}

/// Uniform in (0, 1), never 0 (its log is taken).
fn open01(rng: &mut Rng) -> f64 {
    (((rng.next_u64() >> 11) as i64) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
}

/// Little-endian bytes of `v` in `dtype` (F32, F16 or BF16; checked by the caller) into `out`
/// (exactly `v.len()` elements long), through the reusable `half` buffer.
fn encode_into(v: &[f32], dtype: Dtype, half: &mut Vec<u16>, out: &mut [u8]) {
    match dtype {
        Dtype::F16 | Dtype::BF16 => {
            half.resize(v.len(), 0);
            if matches!(dtype, Dtype::F16) {
                bytemuck::cast_slice_mut::<u16, f16>(half).convert_from_f32_slice(v);
            } else {
                bytemuck::cast_slice_mut::<u16, bf16>(half).convert_from_f32_slice(v);
            }
            for (o, h) in out.chunks_exact_mut(2).zip(half.iter()) {
                o.copy_from_slice(&h.to_le_bytes());
            }
        }
        _ => {
            for (o, x) in out.chunks_exact_mut(4).zip(v) {
                o.copy_from_slice(&x.to_le_bytes());
            }
        }
    }
}
