//! Perplexity (`wgpress eval`), following the GPTQ/SparseGPT/AWQ protocol: the whole text is
//! tokenized as one stream without BOS, `--max-tokens` keeps its first N tokens, the stream is cut
//! into non-overlapping windows of `seq_len` tokens (a trailing partial window is dropped), each
//! window is run on its own and scored on every token but its first; ppl = exp(mean loss).
//! The model runs on the GPU (all blocks resident, one window at a time) or, without an adapter,
//! on the CPU reference forward.

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::gpu::{GpuDtype, GpuTensor};
use crate::model::Model;
use crate::model::forward::GpuModel;
use std::time::Instant;

#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalReport {
    pub model: std::path::PathBuf,
    pub device: String,
    pub seq_len: usize,
    pub windows: usize,
    pub scored_tokens: usize,
    pub mean_nll: f64,
    pub ppl: f64,
    pub seconds: f64,
    pub tokens_per_s: f64,
}

/// Progress callback: (windows done, windows total).
pub type Progress<'a> = &'a dyn Fn(usize, usize);

/// Perplexity of `model` on the given windows (each `seq_len` token ids).
pub fn perplexity(
    engine: &Engine,
    model: &Model,
    windows: &[&[u32]],
    progress: Progress<'_>,
) -> Result<EvalReport> {
    let t0 = Instant::now();
    let seq = windows.first().map(|w| w.len()).unwrap_or(0);
    if seq < 2 || windows.iter().any(|w| w.len() != seq) {
        return Err(Error::invalid(
            "perplexity needs windows of equal length >= 2",
        ));
    }
    let (mut sum, mut count) = (0f64, 0usize);
    match engine.gpu() {
        Some(ctx) => {
            let gm = GpuModel::load(ctx, model, seq)?;
            for (i, w) in windows.iter().enumerate() {
                progress(i, windows.len());
                let logits = gm.logits(ctx, model, w)?;
                // Row r predicts token r + 1; the last row has no target (a dummy 0, not summed).
                let targets: Vec<u32> = w[1..].iter().copied().chain([0]).collect();
                let tg = GpuTensor::from_bytes(
                    ctx,
                    seq,
                    1,
                    GpuDtype::U32,
                    bytemuck::cast_slice(&targets),
                )?;
                let loss = crate::gpu::forward::nll(ctx, &logits, &tg)?.to_f32(ctx)?;
                for &l in &loss[..seq - 1] {
                    sum += l as f64;
                }
                count += seq - 1;
            }
        }
        None => {
            let weights = crate::model::llama::LlamaWeights::load(model)?;
            for (i, w) in windows.iter().enumerate() {
                progress(i, windows.len());
                let logits = crate::reference::forward::logits(&model.config, &weights, w)?;
                let v = model.config.vocab_size;
                for r in 0..seq - 1 {
                    let row = &logits[r * v..(r + 1) * v];
                    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
                    let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
                    sum += lse - row[w[r + 1] as usize] as f64;
                }
                count += seq - 1;
            }
        }
    }
    progress(windows.len(), windows.len());
    let mean = sum / count as f64;
    let secs = t0.elapsed().as_secs_f64();
    Ok(EvalReport {
        model: model.dir.clone(),
        device: engine.describe(),
        seq_len: seq,
        windows: windows.len(),
        scored_tokens: count,
        mean_nll: mean,
        ppl: mean.exp(),
        seconds: secs,
        tokens_per_s: (windows.len() * seq) as f64 / secs,
    })
}
