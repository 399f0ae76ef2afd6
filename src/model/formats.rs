//! Which kind of checkpoint a path holds, and loading the quantized exports as dense models:
//! a GPTQ v1 directory (`config.json` `quantization_config.quant_method == "gptq"`), a
//! compressed-tensors directory (`"compressed-tensors"`), or a GGUF file (a `.gguf` path, or a
//! directory with one `.gguf` file and no `config.json`). Each is dequantized on load to f32 by its
//! exporter's reader (`crate::export::*`), exactly as those readers define the format's rule, and
//! handed to [`Model`](super::Model) as an in-memory [`SafetensorsSet`], so `eval` measures the
//! file itself.
//!
//! This module must not parse file formats itself (the readers live in `export/`, safetensors
//! in `safetensors.rs`) and must not keep anything but the dequantized tensors: the dense model
//! costs 4 bytes per weight in memory.

use super::config::LlamaConfig;
use super::safetensors::SafetensorsSet;
use crate::error::{Error, Result};
use crate::export::{compressed_tensors, gguf, gptq};
use std::path::{Path, PathBuf};

/// The kind of checkpoint at a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckpointKind {
    /// Float safetensors (f32/f16/bf16) with config.json: read lazily through the mmap.
    Dense,
    Gptq,
    CompressedTensors,
    /// The GGUF file to read.
    Gguf(PathBuf),
}

/// Detects the kind of checkpoint at `path` (a directory, or a `.gguf` file).
pub fn detect(path: &Path) -> Result<CheckpointKind> {
    if path.is_file() {
        if path.extension().is_some_and(|e| e == "gguf") {
            return Ok(CheckpointKind::Gguf(path.to_path_buf()));
        }
        return Err(Error::format(
            path,
            "is a file: give a checkpoint directory or a .gguf file",
        ));
    }
    let cfg = path.join("config.json");
    if !cfg.is_file() {
        if path.is_dir() {
            let has_gguf = std::fs::read_dir(path)
                .map_err(|e| Error::io(path, e))?
                .filter_map(|e| e.ok())
                .any(|e| e.path().extension().is_some_and(|x| x == "gguf"));
            if has_gguf {
                return Ok(CheckpointKind::Gguf(gguf::find_gguf(path)?));
            }
        }
        // Model::open reports the missing config.json (or directory).
        return Ok(CheckpointKind::Dense);
    }
    let bytes = std::fs::read(&cfg).map_err(|e| Error::io(&cfg, e))?;
    let raw: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::format(&cfg, format!("invalid JSON: {e}")))?;
    let method = raw
        .get("quantization_config")
        .and_then(|q| q.get("quant_method"))
        .and_then(|m| m.as_str());
    Ok(match method {
        Some("gptq") => CheckpointKind::Gptq,
        Some(compressed_tensors::QUANT_METHOD) => CheckpointKind::CompressedTensors,
        _ => CheckpointKind::Dense,
    })
}

/// A quantized export loaded as a dense model: the directory it lives in (where tokenizer.json
/// is looked for), its config and its dequantized weights. `None` for a dense checkpoint, which
/// the caller opens lazily.
pub fn open_exported(path: &Path) -> Result<Option<(PathBuf, LlamaConfig, SafetensorsSet)>> {
    Ok(Some(match detect(path)? {
        CheckpointKind::Dense => return Ok(None),
        CheckpointKind::Gptq => {
            let config = LlamaConfig::load(path)?;
            let tensors = gptq::read_gptq_dequantized(path)?;
            let set = SafetensorsSet::from_f32(path, tensors)?;
            (path.to_path_buf(), config, set)
        }
        CheckpointKind::CompressedTensors => {
            let config = LlamaConfig::load(path)?;
            let tensors = compressed_tensors::read_compressed_tensors_dequantized(path)?;
            let set = SafetensorsSet::from_f32(path, tensors)?;
            (path.to_path_buf(), config, set)
        }
        CheckpointKind::Gguf(file) => {
            let g = gguf::GgufFile::open(&file)?;
            let config = LlamaConfig::from_json(gguf::gguf_config(&g)?, &file)?;
            drop(g);
            let tensors = gguf::read_gguf_dequantized(&file)?;
            let set = SafetensorsSet::from_f32(&file, tensors)?;
            let dir = match file.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            (dir, config, set)
        }
    }))
}
