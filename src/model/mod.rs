//! Model I/O: config.json, memory-mapped safetensors (single or sharded), the atomic writer, and
//! `Model`, a checkpoint directory whose weights have been checked against its config.
//!
//! Opening a model reads headers only (weights stay in the mmap until a caller asks for a tensor).
//! Nothing here touches the GPU: the CLI adds the adapter list to `inspect`'s report itself.

pub mod config;
pub mod formats;
pub mod forward;
pub mod llama;
pub mod safetensors;
pub mod synth;
pub mod tokenizer;
pub mod writer;

use crate::error::{Error, Result};
use config::LlamaConfig;
use safetensors::{Dtype, SafetensorsSet, TensorInfo};
use std::path::{Path, PathBuf};

/// A Llama-family checkpoint directory: validated config plus its mapped weights.
#[derive(Debug)]
pub struct Model {
    pub dir: PathBuf,
    pub config: LlamaConfig,
    pub weights: SafetensorsSet,
}

impl Model {
    /// Opens `dir`, checking that every tensor the config implies is present with the right shape
    /// and a float dtype. Extra tensors (e.g. a tied lm_head, rotary caches) are allowed and logged.
    /// A GPTQ or compressed-tensors export directory, or a GGUF file (or a directory holding one),
    /// is dequantized to f32 on load (see [`formats`]).
    pub fn open(dir: &Path) -> Result<Self> {
        if let Some((d, config, weights)) = formats::open_exported(dir)? {
            return Self::checked(&d, config, weights);
        }
        if !dir.is_dir() {
            return Err(Error::format(
                dir,
                "model directory does not exist or is not a directory",
            ));
        }
        let config = LlamaConfig::load(dir)?;
        let weights = SafetensorsSet::open(dir)?;
        Self::checked(dir, config, weights)
    }

    /// Checks `weights` against `config` (see [`Model::open`]).
    fn checked(dir: &Path, config: LlamaConfig, weights: SafetensorsSet) -> Result<Self> {
        let expected = config.expected_tensors();
        for (name, shape) in &expected {
            let info = weights.info(name).map_err(|_| {
                Error::tensor(
                    weights.origin(),
                    name,
                    format!("missing (config.json implies shape {shape:?})"),
                )
            })?;
            if &info.shape != shape {
                return Err(Error::tensor(
                    &info.file,
                    name,
                    format!("shape {:?} but config.json implies {shape:?}", info.shape),
                ));
            }
            if !matches!(info.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                return Err(Error::tensor(
                    &info.file,
                    name,
                    format!(
                        "dtype {} is not a float weight (F32, F16 or BF16 expected; is this checkpoint already quantized?)",
                        info.dtype
                    ),
                ));
            }
        }
        let known: std::collections::HashSet<&str> =
            expected.iter().map(|(n, _)| n.as_str()).collect();
        let extra: Vec<&str> = weights
            .names()
            .into_iter()
            .filter(|n| !known.contains(n))
            .collect();
        if !extra.is_empty() {
            // A count at info level (a truncated or multi-purpose checkpoint can carry hundreds),
            // the names at debug level.
            const SHOWN: usize = 5;
            log::info!(
                "{}: {} tensor(s) not used by the {} block, e.g. {}{}",
                dir.display(),
                extra.len(),
                config.architecture,
                extra[..extra.len().min(SHOWN)].join(", "),
                if extra.len() > SHOWN { ", ..." } else { "" }
            );
            log::debug!("unused tensors: {}", extra.join(", "));
        }
        Ok(Model {
            dir: dir.to_path_buf(),
            config,
            weights,
        })
    }
}

/// What `wgpress inspect` prints about a checkpoint (without the GPU adapter list).
#[derive(Clone, Debug)]
pub struct InspectReport {
    pub dir: PathBuf,
    pub config: LlamaConfig,
    pub parameter_count: u64,
    pub has_tokenizer: bool,
    /// Sum of all tensors' data sizes in bytes.
    pub total_bytes: u64,
    pub files: Vec<PathBuf>,
    /// Every tensor in the checkpoint, sorted by name.
    pub tensors: Vec<TensorInfo>,
}

/// Opens and validates the model at `dir` and summarises it.
pub fn inspect(dir: &Path) -> Result<InspectReport> {
    let m = Model::open(dir)?;
    let tensors = m
        .weights
        .names()
        .into_iter()
        .map(|n| m.weights.info(n).cloned())
        .collect::<Result<Vec<_>>>()?;
    Ok(InspectReport {
        dir: m.dir.clone(),
        parameter_count: m.config.parameter_count(),
        has_tokenizer: dir.join("tokenizer.json").is_file(),
        total_bytes: m.weights.total_bytes(),
        files: m.weights.files().iter().map(|p| p.to_path_buf()).collect(),
        tensors,
        config: m.config,
    })
}

/// "3.71 M" style count (K, M, B with two decimals; plain below 1000).
pub fn human_count(n: u64) -> String {
    let x = n as f64;
    if x >= 1e9 {
        format!("{:.2} B", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.2} K", x / 1e3)
    } else {
        n.to_string()
    }
}

/// "12.34 MiB" style size.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{x:.2} {}", UNITS[u])
    }
}

impl std::fmt::Display for InspectReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.config;
        writeln!(f, "model         {}", self.dir.display())?;
        writeln!(f, "architecture  {}", c.architecture)?;
        writeln!(
            f,
            "hidden {}  layers {}  heads {}  kv heads {}  head dim {}  FFN {}  vocab {}",
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.intermediate_size,
            c.vocab_size
        )?;
        writeln!(
            f,
            "rope theta {}  rms eps {}  max positions {}  tied embeddings {}{}",
            c.rope_theta,
            c.rms_norm_eps,
            c.max_position_embeddings,
            c.tie_word_embeddings,
            if c.rope_scaling.is_some() {
                "  rope scaling yes"
            } else {
                ""
            }
        )?;
        writeln!(
            f,
            "parameters    {} ({})",
            human_count(self.parameter_count),
            self.parameter_count
        )?;
        writeln!(
            f,
            "tokenizer     {}",
            if self.has_tokenizer {
                "tokenizer.json present"
            } else {
                "tokenizer.json missing"
            }
        )?;
        writeln!(
            f,
            "weights       {} in {} file(s)",
            human_bytes(self.total_bytes),
            self.files.len()
        )?;
        writeln!(f, "tensors       {}", self.tensors.len())?;
        let w = self.tensors.iter().map(|t| t.name.len()).max().unwrap_or(0);
        for t in &self.tensors {
            writeln!(
                f,
                "  {:<w$}  {:<5} {:?}",
                t.name,
                t.dtype.to_string(),
                t.shape
            )?;
        }
        Ok(())
    }
}
