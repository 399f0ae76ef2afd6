//! The layer-streaming orchestrator (DESIGN.md section 3). The calibration tokens are embedded once
//! (X0 stays on the GPU as batches of `batch_tokens` in whole sequences); then for each decoder
//! block: upload only that block; for each of its four linear-layer inputs in order (q/k/v, o,
//! gate/up, down) run the block as compressed so far up to that input (true-sequential), batch by
//! batch, accumulating the input's Hessian H = (2/n)·XᵀX; hand weights and H to the layer method
//! and put the compressed weights into the block; then finish the block batch by batch to produce
//! X_{l+1} in place (so errors propagate as the real model will see them), write the block's
//! tensors, free the block. The passes continue from each other's results instead of re-running
//! finished layers: o_proj's input is kept from the O pass to the GateUp pass, which replaces X_l
//! by the residual stream after attention, where the Down and output passes start. Peak GPU
//! memory is the calibration activations twice (X and the kept attention output; 1.5x under f16)
//! plus one block (two while the next one loads during the output pass), one Hessian and one
//! batch's intermediates, independent of the number of
//! blocks. Methods plug in through [`LayerMethod`]. Each phase's time is reported twice: on the
//! host's clock (`CalibrationReport::phases`) and on the GPU's timeline (`gpu_phases`, from a
//! timestamp at every phase boundary, read back once per block). The clock does not wait for the
//! GPU at the boundaries: at 7B those waits (8192 of them) left the GPU idle while the host
//! encoded the next phase, about 5 s of a 7B run. [`PHASE_SYNC_ENV`]`=1` puts them back, for
//! host phases that charge each phase its own GPU work on adapters without timestamps.
//!
//! Host work runs beside the GPU on scoped threads instead of between its kernels (at 7B shapes
//! loading and writing were 34 s of a 184 s run with the GPU idle): a helper thread decodes block
//! l+1 ([`HostBlock`]: every tensor of the block to f32, NaN/Inf refused) while the GPU works on
//! block l, so a block's load is the wait for that decode plus the upload, done while the GPU
//! runs block l's output pass (the GPU holds both blocks' weights meanwhile); and the output writer
//! packs and encodes on its own thread behind a bounded queue (`compress::Sink`). One block at
//! most is decoded ahead, so the host holds two blocks' f32 weights (this one's, shrinking as its
//! layers go to the GPU, and the next one's) plus the writer's queue. A decode error stays with
//! its tensor until the pipeline reaches it, so a run fails where, and as, an in-line decode
//! fails; `WGPRESS_OVERLAP=0` does all of it in line, with the same output bytes.
//!
//! Per linear layer W crosses to the GPU once, as stored (with its block; a 16-bit layer is
//! widened to f32 there, exactly, for its method, and never multiplied as the original: every
//! pass runs after its layers were replaced): the method reads it there and leaves Ŵ there,
//! the layer's errors come from the two ([`layer_errors`]; GPTQ's own loss replaces one of its
//! two products), and Ŵ (converted to f16 on the GPU under --precision f16) replaces the
//! layer's weight in the block. What comes back is the
//! quantized tensor for the writer and a few per-row sums; the host never dequantizes unless the
//! dense writer needs the values.
use crate::calib::{CalibOptions, sample_windows};
use crate::compress::{
    CalibrationReport, CompressOptions, CompressReport, LayerReport, Phase, PhaseTimes, Sink,
    overlap, panic_message, peak_host_bytes, validate,
};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::gpu::matmul::{Layout, matmul_into};
use crate::gpu::stats::HessianAccumulator;
use crate::gpu::timeline::Timeline;
use crate::gpu::{GpuContext, GpuDtype, GpuTensor};
use crate::model::Model;
use crate::model::forward::{
    ForwardPlan, HostBlock, Precision, Site, attention_residual, capture_input, embedding_table,
    linear_weight_gpu, mlp_capture, mlp_residual,
};
use crate::model::tokenizer::Tokenizer;
use crate::model::writer::OutputDir;
use crate::quant::gptq::GptqOptions;
use crate::quant::{QuantSpec, QuantizedTensor};
use std::thread::{Scope, ScopedJoinHandle};
use std::time::Instant;

/// What a method produced for one layer.
pub struct Compressed {
    pub q: QuantizedTensor,
    /// Ŵ, the dequantized weights (`rows x cols` f32 on the GPU), equal bit for bit to
    /// `q.dequantize()`: the layer's errors and the block's weights for the later passes are
    /// taken from it without a host round trip.
    pub deq: GpuTensor,
    /// Hessian damping actually used (second-order methods; larger than asked after a retry).
    pub damp_used: Option<f32>,
    /// Input columns that never saw a nonzero activation (H_ii = 0).
    pub dead_columns: usize,
    /// A second-order method's own account of its output error, (loss, λ): tr(Δ H Δᵀ) =
    /// loss - λ·||Δ||² (GPTQ: Σ err² against the Hessian damped by λ on its diagonal), which
    /// spares [`layer_errors`] one of its two products. `None` where the method keeps none.
    pub output_loss: Option<(f64, f32)>,
}

/// A per-layer compression method: sees the layer's f32 weights (out x in) on the GPU, uploaded
/// once by the pipeline and only read by the method (the pipeline reuses them for the layer's
/// errors), and the Hessian of its input (in x in, on the GPU). RTN ignores H; GPTQ, SparseGPT
/// and low-rank methods use it.
pub trait LayerMethod {
    fn name(&self) -> &'static str;
    /// Derives from a site's Hessian what every layer reading that input shares (GPTQ: the
    /// inverse-Hessian factor, so q/k/v factor their Hessian once, not three times); `None`
    /// when a method shares nothing. Called once per site, before the site's first layer.
    fn prepare(&self, _ctx: &GpuContext, _h: &GpuTensor) -> Result<SiteWork> {
        Ok(None)
    }
    /// Compresses one layer. `site` holds what [`LayerMethod::prepare`] made from `h`; on the
    /// site's `last` layer the method may take it, to free its memory as early as it can.
    fn compress(
        &self,
        ctx: &GpuContext,
        w: &GpuTensor,
        h: &GpuTensor,
        site: &mut SiteWork,
        last: bool,
    ) -> Result<Compressed>;
}

/// What a method shares between the layers of one site (see [`LayerMethod::prepare`]); opaque
/// to the pipeline, which only hands it back.
pub type SiteWork = Option<Box<dyn std::any::Any>>;

/// Round to nearest on the shared grid.
pub struct Rtn(pub QuantSpec);

impl LayerMethod for Rtn {
    fn name(&self) -> &'static str {
        "rtn"
    }
    fn compress(
        &self,
        ctx: &GpuContext,
        w: &GpuTensor,
        _h: &GpuTensor,
        _site: &mut SiteWork,
        _last: bool,
    ) -> Result<Compressed> {
        use crate::gpu::quant;
        let grid = quant::fit_grid(ctx, w, &self.0)?;
        let packed = quant::quantize_packed(ctx, w, &self.0, &grid)?;
        // `dequantize` recomputes each integer from w and the grid with the kernel that made
        // `packed`, so Ŵ is exactly the downloaded tensor's dequantization.
        let deq = quant::dequantize(ctx, w, &self.0, &grid)?;
        Ok(Compressed {
            q: quant::download(ctx, w.rows, w.cols, &self.0, &grid, &packed)?,
            deq,
            damp_used: None,
            dead_columns: 0,
            output_loss: None,
        })
    }
}

/// GPTQ on the GPU (`gpu::gptq`).
pub struct Gptq(pub GptqOptions);

impl LayerMethod for Gptq {
    fn name(&self) -> &'static str {
        "gptq"
    }
    fn prepare(&self, ctx: &GpuContext, h: &GpuTensor) -> Result<SiteWork> {
        let f = crate::gpu::gptq::gptq_factor(ctx, h, &self.0)?;
        log::debug!("gptq factor of H {0}x{0}: {1:?}", f.cols(), f.phases);
        Ok(Some(Box::new(f)))
    }

    fn compress(
        &self,
        ctx: &GpuContext,
        w: &GpuTensor,
        h: &GpuTensor,
        site: &mut SiteWork,
        last: bool,
    ) -> Result<Compressed> {
        use crate::gpu::gptq::{FactorUse, GptqFactor, gptq_gpu, gptq_gpu_factored};
        let (rows, cols) = (w.rows, w.cols);
        let factor = if last {
            site.take()
                .and_then(|b| b.downcast::<GptqFactor>().ok())
                .map(FactorUse::Last)
        } else {
            site.as_ref()
                .and_then(|b| b.downcast_ref::<GptqFactor>())
                .map(FactorUse::Keep)
        };
        let r = match factor {
            // The pipeline's decode refused non-finite weights, so the GPU check is skipped.
            Some(f) => gptq_gpu_factored(ctx, w, f, &self.0, true)?,
            None => gptq_gpu(ctx, w, h, &self.0)?,
        };
        log::debug!("gptq {rows}x{cols}: {:?}", r.phases);
        if r.result.damp_used != self.0.damp {
            log::warn!(
                "gptq {rows}x{cols}: the Hessian needed damping {} instead of {}",
                r.result.damp_used,
                self.0.damp
            );
        }
        Ok(Compressed {
            q: r.result.q,
            deq: r.dequantized,
            damp_used: Some(r.result.damp_used),
            dead_columns: r.result.dead_columns,
            // Dead columns break the identity (H' is 1 there, H is 0, and Δ keeps W's values).
            output_loss: (r.result.dead_columns == 0).then_some((r.loss, r.damp_add)),
        })
    }
}

/// Progress: (stage description, step, steps).
pub type Progress<'a> = &'a dyn Fn(&str, usize, usize);

/// A layer's errors, as [`LayerReport`] states them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerErrors {
    /// ||W - Ŵ||² / ||W||² (||W - Ŵ||² when W is zero).
    pub rel_weight: f64,
    /// tr(Δ H Δᵀ) / tr(W H Wᵀ) with Δ = W - Ŵ (0 when tr(W H Wᵀ) <= 0).
    pub rel_output: f64,
}

/// The layer's relative weight error and relative output error on the calibration inputs,
/// ||X Δᵀ||² / ||X Wᵀ||² = tr(Δ H Δᵀ) / tr(W H Wᵀ) for H ∝ XᵀX, from `w` and `deq` (both
/// `rows x cols` f32 on the GPU) and `h` (`cols x cols` f32). Everything stays on the GPU: Δ is
/// made in place of W (so `w` is consumed), each trace is one (out x in)·(in x in) product and a
/// per-row dot product, the squared norms per-row sums of squares; only four `rows`-long vectors
/// come back (f32 sums over one row, summed in f64 here). Peak: W, Ŵ and one product.
///
/// With the method's `output_loss` (loss, λ) (see [`Compressed::output_loss`]), tr(Δ H Δᵀ) is
/// loss - λ·||Δ||² and the Δ product is skipped: at 7B shapes the two f32 products were 5 s of
/// an 83 s run. Both ways agree within the bound `tests/gpu_gptq.rs` checks.
pub fn layer_errors(
    ctx: &GpuContext,
    w: GpuTensor,
    deq: &GpuTensor,
    h: &GpuTensor,
    output_loss: Option<(f64, f32)>,
) -> Result<LayerErrors> {
    use crate::gpu::reduce::{ReduceOp, dot_rows, reduce_rows};
    let (rows, cols) = (w.rows, w.cols);
    if w.dtype != GpuDtype::F32
        || deq.dtype != GpuDtype::F32
        || (deq.rows, deq.cols) != (rows, cols)
        || h.dtype != GpuDtype::F32
        || (h.rows, h.cols) != (cols, cols)
    {
        return Err(Error::Shape {
            op: "layer error".into(),
            expected: format!("F32 W and Ŵ of {rows}x{cols} and an F32 {cols}x{cols} Hessian"),
            got: format!(
                "W {}, Ŵ {}, H {}",
                w.shape_str(),
                deq.shape_str(),
                h.shape_str()
            ),
        });
    }
    let p = GpuTensor::empty(ctx, rows, cols, GpuDtype::F32)?;
    // Per row: (m H)·m, i.e. row r's share of tr(m H mᵀ). The product buffer is reused; the
    // queue orders the second product after the first dot product.
    let trace_rows = |m: &GpuTensor| -> Result<GpuTensor> {
        matmul_into(ctx, m, h, Layout::NN, &p, false, None)?;
        dot_rows(ctx, &p, m)
    };
    let w2 = reduce_rows(ctx, &w, ReduceOp::SumSq)?;
    let whw = trace_rows(&w)?;
    crate::gpu::forward::sub(ctx, &w, deq)?;
    let delta = w;
    let d2 = reduce_rows(ctx, &delta, ReduceOp::SumSq)?;
    let dhd_rows = match output_loss {
        None => Some(trace_rows(&delta)?),
        Some(_) => None,
    };
    drop((p, delta));
    let total =
        |t: GpuTensor| -> Result<f64> { Ok(t.to_f32(ctx)?.iter().map(|&v| v as f64).sum()) };
    let (w2, whw, d2) = (total(w2)?, total(whw)?, total(d2)?);
    let dhd = match output_loss {
        // Rounding can only push a tiny error below zero.
        Some((loss, lambda)) => (loss - lambda as f64 * d2).max(0.0),
        None => dhd_rows.map_or(Ok(0.0), total)?,
    };
    Ok(LayerErrors {
        rel_weight: if w2 == 0.0 { d2 } else { d2 / w2 },
        rel_output: if whw <= 0.0 { 0.0 } else { dhd / whw },
    })
}

/// Compresses `model` block by block on calibration text (GPU only) and writes `opts.format`.
pub fn run(
    engine: &Engine,
    model: &Model,
    method: &dyn LayerMethod,
    calib: &CalibOptions,
    opts: &CompressOptions,
    progress: Progress<'_>,
) -> Result<CompressReport> {
    let ctx = engine.gpu().ok_or_else(|| {
        Error::invalid("calibrated compression runs on a GPU adapter (none is available); drop --calib for plain RTN on the CPU")
    })?;
    let t0 = Instant::now();
    let cfg = &model.config;
    validate(model, opts)?;
    if calib.seqlen > cfg.max_position_embeddings {
        return Err(Error::invalid(format!(
            "--seqlen {} exceeds the model's max_position_embeddings ({})",
            calib.seqlen, cfg.max_position_embeddings
        )));
    }
    let mut clock = Clock::new(ctx)?;
    let tok = Tokenizer::load(&model.dir, cfg.vocab_size)?;
    let windows = sample_windows(&tok, calib)?;
    log::debug!(
        "prepare: calibration windows drawn at {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    let seq = calib.seqlen;
    let per_batch = (opts.batch_tokens / seq).clamp(1, windows.len().max(1));
    let out = OutputDir::create(&opts.out)?;
    ctx.reset_peak();
    // The helper threads (the writer, the next block's decode) borrow `out` and `model`; the
    // scope joins them before the commit.
    let mut report = std::thread::scope(|scope| -> Result<CompressReport> {
        let mut report = CompressReport::new(engine, model, opts, method.name());
        let mut sink = Sink::new(scope, &out, model, opts)?;
        // Block 0's decode overlaps the preparation below.
        let mut next = Some(Prefetch::start(scope, model, 0)?);

        // Tensors outside the blocks are copied (embeddings, final norm, lm_head).
        let block_prefix = |n: &str| n.starts_with("model.layers.");
        for name in model.weights.names() {
            if !block_prefix(name) {
                let info = model.weights.info(name)?;
                sink.plain(name, info.shape.clone(), model.weights.to_f32(name)?)?;
            }
        }
        log::debug!(
            "prepare: tensors outside the blocks handed to the writer at {:.2} s",
            t0.elapsed().as_secs_f64()
        );
        // The calibration set stays on the GPU as batches of whole sequences; every block pass
        // walks the batches, so intermediates exist for one batch at a time.
        let mut xs = {
            let table = embedding_table(ctx, model)?;
            windows
                .chunks(per_batch)
                .map(|b| crate::gpu::forward::embed(ctx, &table, &b.concat(), seq))
                .collect::<Result<Vec<_>>>()?
        };
        drop(windows);
        log::debug!(
            "prepare: calibration set embedded at {:.2} s",
            t0.elapsed().as_secs_f64()
        );
        let mut energy = Vec::with_capacity(cfg.num_hidden_layers);
        let plan = ForwardPlan::new(ctx, cfg, seq, opts.precision)?;
        clock.lap(Phase::Prepare)?;
        let layers = cfg.num_hidden_layers;
        // Block l's weights in hand and on the GPU: taken from the decode thread, the next
        // decode started (one block ahead at most, so the host holds this block's f32 weights
        // and the next one's), and uploaded.
        let mut load = |l: usize| -> Result<_> {
            let mut host = next
                .take()
                .map_or_else(|| HostBlock::decode(model, l), Prefetch::wait)?;
            next = (l + 1 < layers)
                .then(|| Prefetch::start(scope, model, l + 1))
                .transpose()?;
            // The linear weights cross as stored (bf16 for most checkpoints), not converted for
            // the plan's precision: the true-sequential passes only ever multiply by compressed
            // layers (each site's layers are replaced before a pass uses them), and the layer
            // method's f32 copy is widened from these bytes on the GPU. Converting to f16 on the
            // host and sending f32 again per site moved 1.2 GB per 7B block instead of 0.4.
            let blk = host.upload(ctx, Precision::F32)?;
            Ok((host, blk))
        };
        let mut staged = None;
        for l in 0..layers {
            progress(&format!("block {l}"), l, layers);
            let p = format!("model.layers.{l}.");
            let (mut host, mut blk) = match staged.take() {
                Some(b) => b?,
                None => load(l)?,
            };
            clock.lap(Phase::Load)?;
            // True-sequential: each input is captured from the block as compressed so far, so
            // o_proj sees the compressed q/k/v's attention output, and so on; only one input is
            // alive.
            //
            // Each pass starts from what the earlier sites left, never re-running finished
            // layers: the O pass keeps o_proj's input (the attention output, in the form o_proj
            // multiplies it: f16 under --precision f16); the GateUp pass turns it into the
            // residual stream h = x + o_proj(a) and stores h over x (x is not needed after
            // that); the Down and output passes start from h. That saves three of the four
            // attention computations and q/k/v projections per block, for one activation-sized
            // buffer alive from the O pass to the GateUp pass.
            let mut kept: Vec<Option<GpuTensor>> = Vec::new();
            kept.resize_with(xs.len(), || None);
            for site in Site::ALL {
                let mut acc: Option<HessianAccumulator> = None;
                for (x, kept_a) in xs.iter_mut().zip(kept.iter_mut()) {
                    let input = match site {
                        Site::Qkv | Site::O => capture_input(ctx, &plan, &blk, x, site)?,
                        Site::GateUp | Site::Down => {
                            if site == Site::GateUp {
                                let a = kept_a.take().ok_or_else(|| {
                                    Error::invalid(
                                        "pipeline: a batch's attention output was not kept",
                                    )
                                })?;
                                *x = attention_residual(ctx, &plan, &blk, x, &a)?;
                            }
                            mlp_capture(ctx, &plan, &blk, x, site)?
                        }
                    };
                    let input = plan.stats_input(ctx, input)?;
                    clock.lap(Phase::Forward)?;
                    add_hessian(ctx, &mut acc, &input)?;
                    if site == Site::O {
                        *kept_a = Some(input);
                    }
                    clock.lap(Phase::Hessian)?;
                }
                // The site's weights cross to the GPU now, while it runs the passes just
                // submitted: uploaded between the layers, each copy (180 MB of f32 for a 7B
                // gate_proj) ran on the host while the GPU, drained by the previous layer's
                // read-backs, waited. Decoded with the block (where NaN/Inf was refused, naming
                // the tensor and index); W crosses once and everything else of the layer
                // happens on the GPU, so each host copy goes now.
                let mut weights = Vec::with_capacity(site.layers().len());
                for short in site.layers() {
                    let name = format!("{p}{short}.weight");
                    let info = model.weights.info(&name)?;
                    let (rows, cols) = (info.shape[0], info.shape[1]);
                    // The host's f32 copy goes now (the upload already surfaced its decode error).
                    let values = host.tensor(&name)?.take_values()?;
                    let stored = blk.linear_mut(short)?;
                    let w = if stored.dtype != GpuDtype::F32 && cols.is_multiple_of(2) {
                        crate::gpu::forward::widen(ctx, stored)?
                    } else {
                        GpuTensor::from_f32(ctx, rows, cols, &values)?
                    };
                    weights.push((*short, name, info, w));
                }
                clock.lap(Phase::Load)?;
                let h = acc
                    .ok_or_else(|| Error::invalid("calibration: no windows"))?
                    .finish(ctx)?;
                clock.lap(Phase::Hessian)?;
                // Shared work of the site's layers; its time is charged to the first layer.
                let t = Instant::now();
                let (_, first, first_info, _) = &weights[0];
                let mut shared = method
                    .prepare(ctx, &h)
                    .map_err(|e| Error::tensor(&first_info.file, first, e.to_string()))?;
                let mut shared_s = t.elapsed().as_secs_f64();
                clock.lap(Phase::Method)?;
                let n_layers = weights.len();
                for (i, (short, name, info, w)) in weights.into_iter().enumerate() {
                    let (rows, cols) = (w.rows, w.cols);
                    let t = Instant::now();
                    let c = method
                        .compress(ctx, &w, &h, &mut shared, i + 1 == n_layers)
                        .map_err(|e| Error::tensor(&info.file, &name, e.to_string()))?;
                    let seconds = t.elapsed().as_secs_f64() + std::mem::take(&mut shared_s);
                    clock.lap(Phase::Method)?;
                    let errors = layer_errors(ctx, w, &c.deq, &h, c.output_loss)?;
                    report.layers.push(LayerReport {
                        name: name.clone(),
                        shape: [rows, cols],
                        seconds,
                        rel_weight_err: errors.rel_weight,
                        rel_output_err: Some(errors.rel_output),
                        damp_used: c.damp_used,
                        dead_columns: c.dead_columns,
                    });
                    *blk.linear_mut(short)? = linear_weight_gpu(ctx, opts.precision, &name, c.deq)?;
                    clock.lap(Phase::Error)?;
                    sink.quantized(&name, c.q, None)?;
                    clock.lap(Phase::Write)?;
                }
            }
            // The compressed block produces the next block's input from h, batch by batch in
            // place (each output depends only on its own batch's sequences).
            for x in xs.iter_mut() {
                *x = mlp_residual(ctx, &plan, &blk, x)?;
            }
            clock.lap(Phase::Forward)?;
            // The next block's weights cross while the GPU runs the output pass just submitted
            // (the checks below wait for it): loaded after them, the GPU sat idle through every
            // load, 10.8 s of a 7B run. The GPU then holds two blocks' weights for this while.
            // A failed load is kept until its block starts, where an in-line load fails.
            if l + 1 < layers {
                staged = Some(load(l + 1));
                clock.lap(Phase::Load)?;
            }
            // The energies below download (synchronize) anyway; an f16 overflow in this block's
            // captures or output stops the run here rather than corrupting later Hessians.
            plan.check_range(ctx)?;
            energy.push(position_energy(ctx, &xs, seq)?);
            clock.lap(Phase::Forward)?;
            clock.flush()?;
            for t in host.tensors() {
                let info = t.info;
                if !cfg.is_linear(&info.name) {
                    sink.plain(&info.name, info.shape.clone(), t.take_values()?)?;
                }
            }
            drop((blk, host));
            clock.lap(Phase::Write)?;
            let pool = ctx.pool_stats();
            log::info!(
                "block {l} done at {:.1} s (so far: {}; peak GPU {:.0} MiB; GPU buffers created {} in {:.2} s, reused {})",
                t0.elapsed().as_secs_f64(),
                clock.line(),
                ctx.memory().1 as f64 / 1048576.0,
                pool.created,
                pool.create_seconds,
                pool.reused
            );
        }
        drop(xs);
        progress("writing", layers, layers);
        report.calibration = Some(CalibrationReport {
            files: calib.files.clone(),
            nsamples: calib.nsamples,
            seqlen: seq,
            seed: calib.seed,
            bos: calib.bos,
            precision: opts.precision,
            position_energy: energy,
            batch_sequences: per_batch,
            phases: clock.host.clone(),
            gpu_phases: clock.gpu(),
        });
        report.peak_gpu_bytes = ctx.memory().1;
        report.peak_host_bytes = peak_host_bytes();
        report.seconds = t0.elapsed().as_secs_f64();
        sink.finish(model, report)
    })?;
    out.commit()?;
    // report.json was written before the final files were; the returned report adds them.
    clock.lap(Phase::Write)?;
    clock.flush()?;
    report.peak_host_bytes = peak_host_bytes();
    report.seconds = t0.elapsed().as_secs_f64();
    if let Some(c) = report.calibration.as_mut() {
        c.phases = clock.host.clone();
        c.gpu_phases = clock.gpu();
    }
    Ok(report)
}

/// Block `layer`'s host data (see [`HostBlock`]): decoding on a helper thread while the GPU works
/// on the block before, or, with overlap off, decoded in line when asked for. A decode error is
/// part of the block and surfaces when the pipeline reaches the tensor, as in line.
struct Prefetch<'s, 'm> {
    model: &'m Model,
    layer: usize,
    thread: Option<ScopedJoinHandle<'s, Result<HostBlock<'m>>>>,
}

impl<'s, 'm: 's> Prefetch<'s, 'm> {
    fn start(scope: &'s Scope<'s, '_>, model: &'m Model, layer: usize) -> Result<Self> {
        let thread = if overlap() {
            let t = std::thread::Builder::new()
                .name(format!("wgpress-decode-{layer}"))
                .spawn_scoped(scope, move || HostBlock::decode(model, layer))
                .map_err(|e| {
                    Error::invalid(format!(
                        "cannot start the thread that decodes block {layer}: {e}"
                    ))
                })?;
            Some(t)
        } else {
            None
        };
        Ok(Prefetch {
            model,
            layer,
            thread,
        })
    }

    fn wait(mut self) -> Result<HostBlock<'m>> {
        match self.thread.take() {
            None => HostBlock::decode(self.model, self.layer),
            Some(t) => t.join().unwrap_or_else(|p| {
                Err(Error::format(
                    self.model.weights.origin(),
                    format!(
                        "decoding block {} panicked: {}",
                        self.layer,
                        panic_message(&*p)
                    ),
                ))
            }),
        }
    }
}

impl Drop for Prefetch<'_, '_> {
    /// A block decoded for nothing (the run failed) is joined here and dropped: a panic in its
    /// thread must not resurface as the scope's panic in place of the run's error.
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Adds `x` to the site's Hessian, creating the accumulator at the first batch (its width is the
/// input's).
fn add_hessian(
    ctx: &GpuContext,
    acc: &mut Option<HessianAccumulator>,
    x: &GpuTensor,
) -> Result<()> {
    match acc {
        Some(a) => a.add(ctx, x),
        None => acc
            .insert(HessianAccumulator::new(ctx, x.cols)?)
            .add(ctx, x),
    }
}

/// Setting this environment variable to `1` makes the phase clock wait for the GPU at each phase
/// boundary, so the host phase times charge GPU work to the phase that submitted it (slower:
/// the GPU idles while the host encodes the next phase). Off by default; the GPU timeline
/// ([`crate::gpu::timeline`]) gives the per-phase split without waiting.
pub const PHASE_SYNC_ENV: &str = "WGPRESS_PHASE_SYNC";

/// Charges wall time to pipeline phases on the host's clock and, where the adapter has timestamp
/// queries, on the GPU's timeline (a mark at every boundary, read back at [`Clock::flush`]).
struct Clock<'a> {
    ctx: &'a GpuContext,
    last: Instant,
    wait: bool,
    host: PhaseTimes,
    timeline: Option<Timeline>,
    gpu: [f64; 7],
}

impl<'a> Clock<'a> {
    fn new(ctx: &'a GpuContext) -> Result<Self> {
        let wait = std::env::var(PHASE_SYNC_ENV).is_ok_and(|v| v == "1");
        let timeline = Timeline::new(ctx)?;
        log::info!(
            "phase clock: {}; {}",
            if wait {
                "waits for the GPU at each phase boundary ({PHASE_SYNC_ENV}=1)"
            } else {
                "host phases count host time (GPU work lands in the phase that next waits for it)"
            },
            if timeline.is_some() {
                "GPU timeline from timestamps"
            } else {
                "no GPU timeline (the adapter has no timestamp queries)"
            }
        );
        Ok(Clock {
            ctx,
            last: Instant::now(),
            wait,
            host: PhaseTimes::default(),
            timeline,
            gpu: [0.0; 7],
        })
    }

    /// Adds the time since the previous lap to `phase`.
    fn lap(&mut self, phase: Phase) -> Result<()> {
        if self.wait {
            self.ctx.sync("pipeline", "phase boundary")?;
        }
        if let Some(t) = self.timeline.as_mut() {
            t.mark(self.ctx, phase as usize, &mut self.gpu)?;
        }
        let now = Instant::now();
        self.host.add(phase, (now - self.last).as_secs_f64());
        self.last = now;
        Ok(())
    }

    /// Reads the GPU timeline so far (waits for the GPU: call it where the pipeline synchronizes
    /// anyway).
    fn flush(&mut self) -> Result<()> {
        match self.timeline.as_mut() {
            Some(t) => t.flush(self.ctx, &mut self.gpu),
            None => Ok(()),
        }
    }

    /// The GPU timeline's phases as read so far.
    fn gpu(&self) -> Option<PhaseTimes> {
        self.timeline
            .as_ref()
            .map(|_| PhaseTimes::from_seconds(self.gpu))
    }

    /// "so far" line of the block log: host phases, and the GPU's where there are any.
    fn line(&self) -> String {
        match self.gpu() {
            Some(g) => format!("host {}; GPU {}", self.host.line(1), g.line(1)),
            None => self.host.line(1),
        }
    }
}

/// Mean squared activation of the first 8 positions of the calibration windows at a block's
/// output: an attention sink shows as position 0 carrying orders of magnitude more energy.
fn position_energy(ctx: &GpuContext, xs: &[GpuTensor], seq: usize) -> Result<Vec<f64>> {
    let mut e = vec![0f64; seq];
    let mut sequences = 0;
    for x in xs {
        let ss = crate::gpu::reduce::reduce_rows(ctx, x, crate::gpu::reduce::ReduceOp::SumSq)?
            .to_f32(ctx)?;
        sequences += ss.len() / seq;
        for (i, v) in ss.iter().enumerate() {
            e[i % seq] += *v as f64 / x.cols as f64;
        }
    }
    for v in &mut e {
        *v /= sequences.max(1) as f64;
    }
    e.truncate(8);
    Ok(e)
}
