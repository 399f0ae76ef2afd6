//! The layer-streaming pipeline: bounded GPU memory, the same RTN result as the direct path, and
//! per-layer output errors on calibration activations.
mod common;
use std::path::{Path, PathBuf};
use wgpress::calib::CalibOptions;
use wgpress::compress::{CompressOptions, Format};
use wgpress::engine::Engine;
use wgpress::model::Model;
use wgpress::model::forward::Precision;
use wgpress::model::safetensors::Dtype;
use wgpress::model::synth::{SynthSpec, write_random_llama};
use wgpress::pipeline::{Rtn, run};
use wgpress::quant::QuantSpec;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn calib(nsamples: usize, seqlen: usize) -> CalibOptions {
    CalibOptions {
        files: vec![root().join("assets/text/shakespeare-heldout-head.txt")],
        nsamples,
        seqlen,
        seed: 3,
        bos: false,
    }
}

fn opts(out: &Path, spec: QuantSpec, format: Format) -> CompressOptions {
    CompressOptions {
        spec,
        format,
        dtype: Dtype::F16,
        out: out.to_path_buf(),
        gptq: None,
        precision: Precision::F32,
        batch_tokens: wgpress::compress::DEFAULT_BATCH_TOKENS,
    }
}

/// A random model with the tiny model's tokenizer (vocabulary 2048).
fn synth(dir: &Path, layers: usize) -> Model {
    let spec = SynthSpec {
        hidden: 128,
        intermediate: 352,
        layers,
        heads: 4,
        kv_heads: 2,
        vocab: 2048,
        ..Default::default()
    };
    write_random_llama(dir, &spec, 1).unwrap();
    std::fs::copy(
        root().join("assets/tiny/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    Model::open(dir).unwrap()
}

#[test]
fn peak_gpu_memory_does_not_grow_with_the_number_of_blocks() {
    let e = common::gpu_engine();
    let tmp = tempfile::tempdir().unwrap();
    let spec = QuantSpec::new(4, Some(32), false).unwrap();
    let mut peaks = Vec::new();
    for layers in [2, 8] {
        let m = synth(&tmp.path().join(format!("m{layers}")), layers);
        let r = run(
            &e,
            &m,
            &Rtn(spec),
            &calib(4, 64),
            &opts(&tmp.path().join(format!("o{layers}")), spec, Format::Gptq),
            &|_, _, _| {},
        )
        .unwrap();
        assert_eq!(r.layers.len(), 7 * layers);
        peaks.push(r.peak_gpu_bytes);
    }
    // One block's weights + activations + one Hessian: the same for 2 and 8 blocks (the 8-block
    // model is 4x larger, so streaming failures would show as ~4x).
    assert!(peaks[0] > 0);
    assert!(
        (peaks[1] as f64) < peaks[0] as f64 * 1.05,
        "peak GPU bytes 2 blocks {} vs 8 blocks {}",
        peaks[0],
        peaks[1]
    );
}

/// The calibration forward in batches of one sequence gives the same Hessians (up to f32
/// summation order) as one batch of all sequences, and needs less GPU memory: the block's
/// intermediates exist for one batch at a time.
#[test]
fn batched_calibration_forward_keeps_the_hessians_and_lowers_peak_memory() {
    let e = common::gpu_engine();
    let tmp = tempfile::tempdir().unwrap();
    let m = synth(&tmp.path().join("m"), 2);
    let spec = QuantSpec::new(4, Some(32), false).unwrap();
    let go = |batch_tokens: usize| {
        let mut o = opts(
            &tmp.path().join(format!("o{batch_tokens}")),
            spec,
            Format::Gptq,
        );
        o.batch_tokens = batch_tokens;
        run(&e, &m, &Rtn(spec), &calib(12, 64), &o, &|_, _, _| {}).unwrap()
    };
    // 100 tokens round down to one 64-token sequence per batch; 4096 hold all 12.
    let (one, all) = (go(100), go(4096));
    let (c1, ca) = (
        one.calibration.as_ref().unwrap(),
        all.calibration.as_ref().unwrap(),
    );
    assert_eq!((c1.batch_sequences, ca.batch_sequences), (1, 12));
    for (a, b) in one.layers.iter().zip(&all.layers) {
        let (oa, ob) = (a.rel_output_err.unwrap(), b.rel_output_err.unwrap());
        // RTN's weights do not depend on H, so the runs differ only in the order H's f32 sums
        // are taken (12 partial products vs one): relative ~1e-7 per entry, and the error is a
        // ratio of traces of H, so 1e-4 is loose; a batch dropped or counted twice would move
        // it by percents.
        assert!((oa / ob - 1.0).abs() < 1e-4, "{}: {oa} vs {ob}", a.name);
    }
    for (ea, eb) in c1.position_energy.iter().zip(&ca.position_energy) {
        for (x, y) in ea.iter().zip(eb) {
            assert!((x / y - 1.0).abs() < 1e-6, "position energy {x} vs {y}");
        }
    }
    // 12 sequences' MLP intermediates (2 x 768 x 352 f32 = 2.2 MB) against one sequence's.
    assert!(
        (one.peak_gpu_bytes as f64) < all.peak_gpu_bytes as f64 * 0.8,
        "peak GPU bytes: batches of one sequence {} vs all {}",
        one.peak_gpu_bytes,
        all.peak_gpu_bytes
    );
    let total = c1.phases.total();
    assert!(c1.phases.forward > 0.0 && c1.phases.hessian > 0.0 && c1.phases.method > 0.0);
    assert!(total <= one.seconds * 1.01, "{total} > {}", one.seconds);
    // The GPU timeline exists exactly where the adapter has timestamps. Every phase that
    // submits GPU work gets a span, and the spans lie between the first and the last mark of
    // the run, so they cannot sum to more than its wall time.
    let Engine::Gpu(ctx) = &e else {
        panic!("a GPU engine")
    };
    match &c1.gpu_phases {
        None => assert!(!ctx.caps.timestamps, "timestamps but no GPU timeline"),
        Some(g) => {
            assert!(ctx.caps.timestamps);
            for (name, s) in g.named() {
                if ["forward", "hessian", "method", "error"].contains(&name) {
                    assert!(s > 0.0, "GPU phase {name}: {s}");
                }
                assert!(s.is_finite() && s >= 0.0, "GPU phase {name}: {s}");
            }
            assert!(
                g.total() <= one.seconds * 1.01,
                "GPU timeline {} s > run {} s",
                g.total(),
                one.seconds
            );
        }
    }
}

#[test]
fn pipeline_rtn_equals_direct_rtn_and_reports_output_error() {
    let e = common::gpu_engine();
    let tmp = tempfile::tempdir().unwrap();
    let m = Model::open(&root().join("assets/tiny")).unwrap();
    let spec = QuantSpec::new(4, Some(128), false).unwrap();
    let a = tmp.path().join("pipeline");
    let b = tmp.path().join("direct");
    let r = run(
        &e,
        &m,
        &Rtn(spec),
        &calib(4, 96),
        &opts(&a, spec, Format::Gptq),
        &|_, _, _| {},
    )
    .unwrap();
    wgpress::compress::rtn(&e, &m, &opts(&b, spec, Format::Gptq), &|_, _, _| {}).unwrap();
    assert_eq!(r.layers.len(), 28);
    for l in &r.layers {
        let prefix = l.name.trim_end_matches(".weight");
        let qa = wgpress::export::gptq::read_gptq_quantized(&a, prefix).unwrap();
        let qb = wgpress::export::gptq::read_gptq_quantized(&b, prefix).unwrap();
        assert!(qa == qb, "{prefix} differs between pipeline and direct RTN");
        let oe = l.rel_output_err.unwrap();
        // 4-bit g128 RTN moves a layer's output by ~0.1-1% of its energy on real activations.
        assert!(
            oe.is_finite() && oe > 1e-5 && oe < 0.05,
            "{}: output error {oe}",
            l.name
        );
    }
    let cal = r.calibration.unwrap();
    assert_eq!(
        (cal.nsamples, cal.seqlen, cal.position_energy.len()),
        (4, 96, 4)
    );
    // The GPTQ checker accepts the pipeline's output too (when Python is there).
    let all = wgpress::export::gptq::read_gptq_dequantized(&a).unwrap();
    assert!(
        all.iter()
            .any(|(n, _, _)| n == "model.layers.3.mlp.down_proj.weight")
    );
}

#[test]
fn f16_calibration_forward_captures_nearly_the_same_inputs() {
    let e = common::gpu_engine();
    let tmp = tempfile::tempdir().unwrap();
    let m = Model::open(&root().join("assets/tiny")).unwrap();
    let spec = QuantSpec::new(4, Some(128), false).unwrap();
    let go = |p: Precision| {
        let mut o = opts(&tmp.path().join(format!("{p:?}")), spec, Format::Gptq);
        o.precision = p;
        run(&e, &m, &Rtn(spec), &calib(2, 64), &o, &|_, _, _| {}).unwrap()
    };
    let (a, b) = (go(Precision::F32), go(Precision::F16));
    assert_eq!(b.calibration.as_ref().unwrap().precision, Precision::F16);
    let (mut moved, mut worst) = (0, 0f64);
    for (la, lb) in a.layers.iter().zip(&b.layers) {
        assert_eq!(la.name, lb.name);
        let (oa, ob) = (la.rel_output_err.unwrap(), lb.rel_output_err.unwrap());
        // Under f16 each Hessian reads the f16 rounding of its input (relative 2^-11 per
        // element, averaging out over the tokens in H), and later inputs also carry the f16
        // rounding of earlier layers; a layer's output error (a ratio of two traces of H) moves
        // by less (measured 5.3e-5 on lavapipe); 1e-3 would still catch a
        // broken capture. Block 0's q/k/v input precedes every linear layer, so there only the
        // rounding of X itself moves H.
        assert!((ob / oa - 1.0).abs() < 1e-3, "{}: {oa} vs {ob}", la.name);
        moved += (oa != ob) as usize;
        worst = worst.max((ob / oa - 1.0).abs());
    }
    println!("largest relative change of a layer's output error: {worst:e}");
    assert!(moved > 0, "the f16 forward changed no captured input");
}

#[test]
fn calibration_errors_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let m = Model::open(&root().join("assets/tiny")).unwrap();
    let spec = QuantSpec::new(4, Some(128), false).unwrap();
    let o = opts(&tmp.path().join("o"), spec, Format::Gptq);
    let e = run(
        &Engine::Cpu,
        &m,
        &Rtn(spec),
        &calib(2, 64),
        &o,
        &|_, _, _| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("GPU"), "{e}");
    let g = common::gpu_engine();
    let e = run(&g, &m, &Rtn(spec), &calib(2, 4096), &o, &|_, _, _| {}).unwrap_err();
    assert!(e.to_string().contains("max_position_embeddings"), "{e}");
    let mut c = calib(2, 64);
    c.files = vec![tmp.path().join("missing.txt")];
    let e = run(&g, &m, &Rtn(spec), &c, &o, &|_, _, _| {}).unwrap_err();
    assert!(e.to_string().contains("missing.txt"), "{e}");
    assert!(!tmp.path().join("o").exists());
}

/// GPTQ through the pipeline on the small model's real calibration activations: every layer's
/// output error is below RTN's at the same bits (true-sequential inputs differ slightly between
/// the two runs, so the comparison is per layer against RTN's run), and the act-order g_idx
/// written to the GPTQ checkpoint reproduces the weights the pipeline ran the model with.
#[test]
fn gptq_beats_rtn_on_the_small_model_and_its_g_idx_round_trips() {
    let e = common::gpu_engine();
    let tmp = tempfile::tempdir().unwrap();
    let m = Model::open(&root().join("assets/tiny")).unwrap();
    let spec = QuantSpec::new(3, Some(32), false).unwrap();
    let g_out = tmp.path().join("gptq");
    let r_out = tmp.path().join("rtn");
    let mut go = opts(&g_out, spec, Format::Gptq);
    let gopt = wgpress::quant::gptq::GptqOptions::new(spec);
    go.gptq = Some(gopt);
    let g = run(
        &e,
        &m,
        &wgpress::pipeline::Gptq(gopt),
        &calib(4, 64),
        &go,
        &|_, _, _| {},
    )
    .unwrap();
    let r = run(
        &e,
        &m,
        &Rtn(spec),
        &calib(4, 64),
        &opts(&r_out, spec, Format::Gptq),
        &|_, _, _| {},
    )
    .unwrap();
    assert_eq!(g.method, "gptq");
    let mean = |rep: &wgpress::compress::CompressReport| {
        rep.layers
            .iter()
            .map(|l| l.rel_output_err.unwrap())
            .sum::<f64>()
            / rep.layers.len() as f64
    };
    for (lg, lr) in g.layers.iter().zip(&r.layers) {
        let (eg, er) = (lg.rel_output_err.unwrap(), lr.rel_output_err.unwrap());
        assert!(eg < er, "{}: gptq {eg} rtn {er}", lg.name);
        assert_eq!(lg.damp_used, Some(0.01));
    }
    assert!(
        mean(&g) < 0.8 * mean(&r),
        "gptq {} rtn {}",
        mean(&g),
        mean(&r)
    );
    let q =
        wgpress::export::gptq::read_gptq_quantized(&g_out, "model.layers.1.mlp.down_proj").unwrap();
    let identity = q
        .g_idx
        .iter()
        .enumerate()
        .all(|(c, &k)| k as usize == c / 32);
    assert!(!identity, "act-order should permute the groups");
    let mut per_group = vec![0usize; q.cols / 32];
    for &k in &q.g_idx {
        per_group[k as usize] += 1;
    }
    assert!(per_group.iter().all(|&n| n == 32), "{per_group:?}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(g_out.join("quantize_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["desc_act"], true);
}

/// The layer errors the pipeline reports, computed on the GPU from W and Ŵ (Δ made in place,
/// traces through the matmul and per-row dot products), against the f64 host computation, on
/// chunked operands (a 16 KiB binding limit splits W, Ŵ, the product and H).
///
/// Tolerance, from the standard bound on an f32 dot product of n terms, |fl(xᵀy) - xᵀy| <=
/// γ_n·|x|ᵀ|y| with γ_n ~ n·2^-24: a trace m H mᵀ is a product of `cols` terms then a row dot
/// product of `cols` more, so it is off by at most γ_{2·cols}·|m|ᵀ|H||m| (in whatever order the
/// kernels sum); Δ's own rounding (2^-24 relative per element, twice in the form) adds
/// 2^-23·|Δ|ᵀ|H||Δ|. The ratio's bound is the sum of its two terms' relative bounds. The squared
/// norms sum positive terms, so `cols`·2^-24 relative bounds them (plus Δ's rounding, 2^-23).
/// The f64 sum over rows adds nothing at this scale.
#[test]
fn layer_errors_match_an_f64_host_computation() {
    use wgpress::pipeline::layer_errors;
    let ctx = common::ctx_with(Some(16 * 1024));
    let mut rng = wgpress::rng::Rng::new(41);
    let (rows, cols, tokens) = (131, 83, 240);
    let w = rng.normal_vec(rows * cols, 0.05);
    let x = rng.normal_vec(tokens * cols, 1.0);
    let mut h = vec![0f32; cols * cols];
    for i in 0..cols {
        for j in 0..cols {
            let s: f64 = (0..tokens)
                .map(|t| x[t * cols + i] as f64 * x[t * cols + j] as f64)
                .sum();
            h[i * cols + j] = (2.0 * s / tokens as f64) as f32;
        }
    }
    let spec = QuantSpec::new(3, None, false).unwrap();
    let deq = wgpress::reference::quant::rtn(&w, rows, cols, &spec)
        .unwrap()
        .dequantize();
    let gw = wgpress::gpu::GpuTensor::from_f32(&ctx, rows, cols, &w).unwrap();
    let gd = wgpress::gpu::GpuTensor::from_f32(&ctx, rows, cols, &deq).unwrap();
    let gh = wgpress::gpu::GpuTensor::from_f32(&ctx, cols, cols, &h).unwrap();
    assert!(gw.chunks.len() > 1 && gh.chunks.len() > 1);
    let got = layer_errors(&ctx, gw, &gd, &gh, None).unwrap();
    // Ŵ is only read.
    assert_eq!(gd.to_f32(&ctx).unwrap(), deq);

    let delta: Vec<f64> = w
        .iter()
        .zip(&deq)
        .map(|(&a, &b)| a as f64 - b as f64)
        .collect();
    let wf: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    // (m H mᵀ, |m|ᵀ|H||m|) over all rows.
    let forms = |m: &[f64]| -> (f64, f64) {
        let (mut s, mut a) = (0f64, 0f64);
        for r in 0..rows {
            let m = &m[r * cols..(r + 1) * cols];
            for i in 0..cols {
                for j in 0..cols {
                    let hij = h[i * cols + j] as f64;
                    s += m[i] * hij * m[j];
                    a += (m[i] * hij * m[j]).abs();
                }
            }
        }
        (s, a)
    };
    let ((num, num_abs), (den, den_abs)) = (forms(&delta), forms(&wf));
    let want_out = num / den;
    let r = wgpress::reference::gptq::layer_output_error(&w, &deq, rows, cols, &h);
    assert!((r / want_out - 1.0).abs() < 1e-12, "{r} vs {want_out}");
    let gamma = |n: usize| n as f64 * 2f64.powi(-24);
    let tol_out =
        (gamma(2 * cols) + 2f64.powi(-23)) * num_abs / num + gamma(2 * cols) * den_abs / den;
    let (d2, w2): (f64, f64) = (
        delta.iter().map(|d| d * d).sum(),
        wf.iter().map(|v| v * v).sum(),
    );
    let want_w = d2 / w2;
    let tol_w = 2.0 * gamma(cols) + 2f64.powi(-23);
    eprintln!(
        "output: {} vs {want_out} (rel {:e}, bound {tol_out:e}); weight: {} vs {want_w} (rel {:e}, bound {tol_w:e})",
        got.rel_output,
        (got.rel_output / want_out - 1.0).abs(),
        got.rel_weight,
        (got.rel_weight / want_w - 1.0).abs()
    );
    assert!((got.rel_output / want_out - 1.0).abs() <= tol_out);
    assert!((got.rel_weight / want_w - 1.0).abs() <= tol_w);
    // 3-bit RTN on a row grid moves a layer by percents: the check is not vacuous.
    assert!(want_out > 1e-3 && want_w > 1e-3, "{want_out} {want_w}");

    // Zero weights: the weight error falls back to ||Δ||², the output error to 0 (as before).
    let z = wgpress::gpu::GpuTensor::from_f32(&ctx, rows, cols, &vec![0.0; rows * cols]).unwrap();
    let got = layer_errors(&ctx, z, &gd, &gh, None).unwrap();
    let dsq: f64 = deq.iter().map(|&v| v as f64 * v as f64).sum();
    assert!(
        (got.rel_weight / dsq - 1.0).abs() <= tol_w,
        "{} {dsq}",
        got.rel_weight
    );
    assert_eq!(got.rel_output, 0.0);
    // Mismatched shapes are refused.
    let small = wgpress::gpu::GpuTensor::from_f32(&ctx, 2, cols, &vec![0.0; 2 * cols]).unwrap();
    let e = layer_errors(&ctx, small, &gd, &gh, None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("layer error"), "{e}");
}

/// The pipeline keeps Ŵ on the GPU and hands the writers only the quantized tensor; the dense
/// writer then dequantizes on the host itself. Its values must be exactly the dequantization of
/// what the GPTQ writer stores for the same (deterministic) run, act-order g_idx included.
#[test]
fn dense_output_is_the_dequantized_gptq_result() {
    let e = common::gpu_engine();
    let tmp = tempfile::tempdir().unwrap();
    let m = synth(&tmp.path().join("m"), 1);
    let spec = QuantSpec::new(4, Some(32), false).unwrap();
    let gopt = wgpress::quant::gptq::GptqOptions::new(spec);
    let go = |format: Format, dir: &str| {
        let mut o = opts(&tmp.path().join(dir), spec, format);
        o.gptq = Some(gopt);
        // The dense file keeps Ŵ's f32 values (the GPTQ format stores plain tensors in f16).
        if format == Format::Dense {
            o.dtype = Dtype::F32;
        }
        run(
            &e,
            &m,
            &wgpress::pipeline::Gptq(gopt),
            &calib(2, 64),
            &o,
            &|_, _, _| {},
        )
        .unwrap()
    };
    let (a, b) = (go(Format::Gptq, "gptq"), go(Format::Dense, "dense"));
    let dense = Model::open(&tmp.path().join("dense")).unwrap();
    for (la, lb) in a.layers.iter().zip(&b.layers) {
        assert_eq!(
            la.rel_output_err, lb.rel_output_err,
            "{}: runs differ",
            la.name
        );
        let prefix = la.name.trim_end_matches(".weight");
        let q =
            wgpress::export::gptq::read_gptq_quantized(&tmp.path().join("gptq"), prefix).unwrap();
        let got = dense.weights.to_f32(&la.name).unwrap();
        assert!(got == q.dequantize(), "{}: dense values differ", la.name);
    }
}
