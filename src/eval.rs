//! Perplexity (`wgpress eval`), following the GPTQ/SparseGPT/AWQ protocol: the whole text is
//! tokenized as one stream without BOS, `--max-tokens` keeps its first N tokens, the stream is cut
//! into non-overlapping windows of `seq_len` tokens (a trailing partial window is dropped), each
//! window is run on its own and scored on every token but its first; ppl = exp(mean loss).
//! The model runs on the GPU (all blocks resident, one window at a time) or, without an adapter,
//! on the CPU reference forward.

use crate::calib::EvalWindow;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::gpu::{GpuDtype, GpuTensor};
use crate::model::Model;
use crate::model::forward::{GpuModel, Precision};
use std::time::Instant;

#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalReport {
    pub model: std::path::PathBuf,
    pub device: String,
    pub seq_len: usize,
    /// The GPU forward's linear-layer precision (the CPU reference is always f64/f32).
    pub precision: Precision,
    pub windows: usize,
    pub scored_tokens: usize,
    pub mean_nll: f64,
    pub ppl: f64,
    pub seconds: f64,
    /// Scored tokens per second (with a stride, overlapping context is not counted).
    pub tokens_per_s: f64,
    /// With a base model: mean KL(base || model) per scored token, in nats.
    pub kl: Option<f64>,
    /// With a base model: fraction of scored tokens whose top-1 prediction agrees with the base's.
    pub top1: Option<f64>,
}

/// Progress callback: (windows done, windows total).
pub type Progress<'a> = &'a dyn Fn(usize, usize);

/// Perplexity of `model` on the given windows (each `seq_len` token ids), on the GPU with the
/// linear layers in `precision` (the CPU path ignores it).
/// With `base`, also compares the model's next-token distributions with the base's on the same
/// windows (mean KL(base || model) and top-1 agreement).
pub fn perplexity(
    engine: &Engine,
    model: &Model,
    base: Option<&Model>,
    windows: &[EvalWindow<'_>],
    precision: Precision,
    progress: Progress<'_>,
) -> Result<EvalReport> {
    if let Some(b) = base
        && b.config.vocab_size != model.config.vocab_size
    {
        return Err(Error::invalid(format!(
            "base model {} has vocabulary {} but {} has {}",
            b.dir.display(),
            b.config.vocab_size,
            model.dir.display(),
            model.config.vocab_size
        )));
    }
    let t0 = Instant::now();
    let seq = windows.first().map(|w| w.ids.len()).unwrap_or(0);
    if seq < 2
        || windows
            .iter()
            .any(|w| w.ids.len() != seq || w.score_from == 0 || w.score_from >= seq)
    {
        return Err(Error::invalid(
            "perplexity needs windows of equal length >= 2, each scoring from a position in 1..len",
        ));
    }
    let (mut sum, mut count) = (0f64, 0usize);
    let (mut kl, mut agree) = (0f64, 0f64);
    match engine.gpu() {
        Some(ctx) => {
            let gm = GpuModel::load(ctx, model, seq, precision)?;
            let gb = base
                .map(|b| GpuModel::load(ctx, b, seq, precision))
                .transpose()?;
            for (i, win) in windows.iter().enumerate() {
                progress(i, windows.len());
                let (w, from) = (win.ids, win.score_from - 1);
                let logits = gm.logits(ctx, w)?;
                if let Some(gb) = &gb {
                    let lb = gb.logits(ctx, w)?;
                    let kt = crate::gpu::forward::kl_top1(ctx, &lb, &logits)?.to_f32(ctx)?;
                    for r in from..seq - 1 {
                        kl += kt[2 * r] as f64;
                        agree += kt[2 * r + 1] as f64;
                    }
                }
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
                // After the download, so the check costs no extra wait.
                gm.plan.check_range(ctx)?;
                if let Some(gb) = &gb {
                    gb.plan.check_range(ctx)?;
                }
                for &l in &loss[from..seq - 1] {
                    sum += l as f64;
                }
                count += seq - 1 - from;
            }
        }
        None => {
            let weights = crate::model::llama::LlamaWeights::load(model)?;
            let bw = base
                .map(crate::model::llama::LlamaWeights::load)
                .transpose()?;
            for (i, win) in windows.iter().enumerate() {
                progress(i, windows.len());
                let (w, from) = (win.ids, win.score_from - 1);
                let logits = crate::reference::forward::logits(&model.config, &weights, w)?;
                let lb = match (&bw, base) {
                    (Some(bw), Some(b)) => {
                        Some(crate::reference::forward::logits(&b.config, bw, w)?)
                    }
                    _ => None,
                };
                let v = model.config.vocab_size;
                for r in from..seq - 1 {
                    let row = &logits[r * v..(r + 1) * v];
                    let lse = log_sum_exp(row);
                    sum += lse - row[w[r + 1] as usize] as f64;
                    if let Some(lb) = &lb {
                        let brow = &lb[r * v..(r + 1) * v];
                        let lseb = log_sum_exp(brow);
                        kl += brow
                            .iter()
                            .zip(row)
                            .map(|(&b, &c)| {
                                let lb = b as f64 - lseb;
                                lb.exp() * (lb - (c as f64 - lse))
                            })
                            .sum::<f64>();
                        agree += (argmax(brow) == argmax(row)) as u8 as f64;
                    }
                }
                count += seq - 1 - from;
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
        precision: match engine.gpu() {
            Some(_) => precision,
            None => Precision::F32,
        },
        windows: windows.len(),
        scored_tokens: count,
        mean_nll: mean,
        ppl: mean.exp(),
        seconds: secs,
        tokens_per_s: count as f64 / secs,
        kl: base.map(|_| kl / count as f64),
        top1: base.map(|_| agree / count as f64),
    })
}

fn log_sum_exp(row: &[f32]) -> f64 {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
}

/// Lowest index of the maximum (ties broken by index, as the GPU kernel does).
fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}
