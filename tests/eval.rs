//! Perplexity against transformers on the committed held-out text, on the GPU and on the CPU
//! reference path, and the eval command's bad-input errors.
mod common;
use std::path::{Path, PathBuf};
use std::process::Command;
use wgpress::calib::EvalWindow;
use wgpress::engine::Engine;
use wgpress::model::Model;
use wgpress::model::forward::Precision;
use wgpress::model::tokenizer::Tokenizer;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn text() -> PathBuf {
    root().join("assets/text/shakespeare-heldout-head.txt")
}

fn windows(model: &Model, seq: usize, max: usize) -> Vec<Vec<u32>> {
    windows_ids(model, seq, max)
}

fn as_windows(w: &[Vec<u32>]) -> Vec<EvalWindow<'_>> {
    w.iter()
        .map(|v| EvalWindow {
            ids: v,
            score_from: 1,
        })
        .collect()
}

fn windows_ids(model: &Model, seq: usize, max: usize) -> Vec<Vec<u32>> {
    let tok = Tokenizer::load(&model.dir, model.config.vocab_size).unwrap();
    let ids = tok
        .encode(&std::fs::read_to_string(text()).unwrap())
        .unwrap();
    wgpress::calib::eval_windows(&ids, seq, Some(max))
        .unwrap()
        .into_iter()
        .map(|w| w.to_vec())
        .collect()
}

// Reference numbers from transformers 5.17 (f32, CPU, eager attention, log-softmax in f64):
//   python3 tools/ppl_transformers.py assets/tiny --text assets/text/shakespeare-heldout-head.txt \
//       --seq-len 256 --max-tokens 2048      -> mean loss 3.107198, ppl 22.3583 (2040 scored)
//   ... --seq-len 128 --max-tokens 512       -> mean loss 2.944582, ppl 19.0027 (508 scored)
const HF_LOSS_256_2048: f64 = 3.107198;
const HF_LOSS_128_512: f64 = 2.944582;

#[test]
fn gpu_perplexity_matches_transformers() {
    let m = Model::open(&root().join("assets/tiny")).unwrap();
    let engine = common::gpu_engine();
    let w = windows(&m, 256, 2048);
    let refs = as_windows(&w);
    let r =
        wgpress::eval::perplexity(&engine, &m, None, &refs, Precision::F32, &|_, _| {}).unwrap();
    assert_eq!((r.windows, r.scored_tokens), (8, 2040));
    // The issue asks for 0.1% relative perplexity; logits agree to ~2e-5 (see gpu_forward), so the
    // mean loss agrees to ~1e-5 nats: assert 1e-4 nats (0.01% of ppl), ten times inside the target.
    assert!(
        (r.mean_nll - HF_LOSS_256_2048).abs() < 1e-4,
        "mean loss {} vs transformers {HF_LOSS_256_2048}",
        r.mean_nll
    );
}

#[test]
fn f16_perplexity_is_within_a_tenth_of_a_percent_of_f32() {
    let m = Model::open(&root().join("assets/tiny")).unwrap();
    let engine = common::gpu_engine();
    let w = windows(&m, 256, 512);
    let refs = as_windows(&w);
    let run = |p| wgpress::eval::perplexity(&engine, &m, None, &refs, p, &|_, _| {}).unwrap();
    let (a, b) = (run(Precision::F32), run(Precision::F16));
    assert_eq!((a.precision, b.precision), (Precision::F32, Precision::F16));
    assert_eq!(b.scored_tokens, 510);
    let rel = b.ppl / a.ppl - 1.0;
    println!("ppl f32 {} f16 {} (relative {rel:e})", a.ppl, b.ppl);
    // The bound: 0.1% of perplexity (1e-3 nats of mean loss). Each token's loss moves by
    // the f16 rounding of its logits' inputs (~1e-4 nats, random sign), so the mean over 510
    // tokens moves far less; a nonzero difference shows the f16 path ran.
    assert!(
        rel.abs() < 1e-3 && rel != 0.0,
        "ppl f32 {} f16 {} ({rel:e})",
        a.ppl,
        b.ppl
    );
}

#[test]
fn cpu_reference_perplexity_matches_transformers() {
    let m = Model::open(&root().join("assets/tiny")).unwrap();
    let w = windows(&m, 128, 512);
    let refs = as_windows(&w);
    let r = wgpress::eval::perplexity(&Engine::Cpu, &m, None, &refs, Precision::F32, &|_, _| {})
        .unwrap();
    assert_eq!((r.windows, r.scored_tokens), (4, 508));
    assert!(
        (r.mean_nll - HF_LOSS_128_512).abs() < 1e-4,
        "mean loss {} vs transformers {HF_LOSS_128_512}",
        r.mean_nll
    );
}

fn run(args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_wgpress"))
        .args(args)
        .env_remove("WGPRESS_ADAPTER")
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

#[test]
fn eval_precision_flag_selects_the_forward_and_rejects_unknown_values() {
    let tiny = root().join("assets/tiny");
    let t = text();
    let p = |x: &Path| x.to_str().unwrap().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let report = |prec: &str| -> serde_json::Value {
        let json = tmp.path().join(format!("{prec}.json"));
        let o = Command::new(env!("CARGO_BIN_EXE_wgpress"))
            .args(["eval", &p(&tiny), "--text", &p(&t), "--seq-len", "64"])
            .args([
                "--max-tokens",
                "128",
                "--precision",
                prec,
                "--json",
                &p(&json),
            ])
            .env_remove("WGPRESS_ADAPTER")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(
            out.contains(&format!("({} linear layers)", prec.to_uppercase())),
            "{out}"
        );
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
    };
    let (a, b) = (report("f32"), report("f16"));
    assert_eq!(
        (a["precision"].as_str(), b["precision"].as_str()),
        (Some("f32"), Some("f16"))
    );
    let (la, lb) = (
        a["mean_nll"].as_f64().unwrap(),
        b["mean_nll"].as_f64().unwrap(),
    );
    assert!(la != lb && (la - lb).abs() < 1e-3, "{la} vs {lb}");
    let (ok, err) = run(&["eval", &p(&tiny), "--text", &p(&t), "--precision", "bf16"]);
    assert!(!ok && err.contains("f32") && err.contains("f16"), "{err}");
    // The CPU reference path has no f16 forward: asking for it there is an error, not ignored.
    let (ok, err) = run(&[
        "eval",
        &p(&tiny),
        "--text",
        &p(&t),
        "--precision",
        "f16",
        "--cpu",
        "--seq-len",
        "32",
        "--max-tokens",
        "64",
    ]);
    assert!(!ok && err.contains("CPU reference path"), "{err}");
}

#[test]
fn eval_command_reports_perplexity_and_rejects_bad_input() {
    let tiny = root().join("assets/tiny");
    let t = text();
    let p = |x: &Path| x.to_str().unwrap().to_string();
    let o = Command::new(env!("CARGO_BIN_EXE_wgpress"))
        .args([
            "eval",
            &p(&tiny),
            "--text",
            &p(&t),
            "--seq-len",
            "128",
            "--max-tokens",
            "256",
        ])
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("perplexity"));

    // Sequence length beyond max_position_embeddings (2048).
    let (ok, err) = run(&["eval", &p(&tiny), "--text", &p(&t), "--seq-len", "4096"]);
    assert!(!ok && err.contains("max_position_embeddings"), "{err}");

    // Text shorter than one window.
    let tmp = tempfile::tempdir().unwrap();
    let short = tmp.path().join("short.txt");
    std::fs::write(&short, "To be, or not to be.").unwrap();
    let (ok, err) = run(&["eval", &p(&tiny), "--text", &p(&short), "--seq-len", "256"]);
    assert!(!ok && err.contains("short.txt"), "{err}");

    // A model without tokenizer.json.
    let m = tmp.path().join("m");
    std::fs::create_dir(&m).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(tiny.join(f), m.join(f)).unwrap();
    }
    let (ok, err) = run(&["eval", &p(&m), "--text", &p(&t), "--seq-len", "128"]);
    assert!(!ok && err.contains("tokenizer.json"), "{err}");

    // Missing text file.
    let (ok, err) = run(&["eval", &p(&tiny), "--text", "/nonexistent/t.txt"]);
    assert!(!ok && err.contains("/nonexistent/t.txt"), "{err}");
}

#[test]
fn kl_and_top1_against_the_base_agree_on_gpu_and_cpu() {
    let tiny = Model::open(&root().join("assets/tiny")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q3");
    let gpu = common::gpu_engine();
    let opts = wgpress::compress::CompressOptions {
        spec: wgpress::quant::QuantSpec::new(3, Some(64), false).unwrap(),
        format: wgpress::compress::Format::Dense,
        dtype: wgpress::model::safetensors::Dtype::F32,
        out: out.clone(),
        gptq: None,
        precision: Precision::F32,
        batch_tokens: wgpress::compress::DEFAULT_BATCH_TOKENS,
    };
    wgpress::compress::rtn(&gpu, &tiny, &opts, &|_, _, _| {}).unwrap();
    let q = Model::open(&out).unwrap();
    let w = windows(&tiny, 64, 128);
    let refs = as_windows(&w);

    let same =
        wgpress::eval::perplexity(&gpu, &tiny, Some(&tiny), &refs, Precision::F32, &|_, _| {})
            .unwrap();
    assert!(
        same.kl.unwrap().abs() < 1e-5,
        "KL of a model with itself: {:?}",
        same.kl
    );
    assert_eq!(same.top1, Some(1.0));

    let g = wgpress::eval::perplexity(&gpu, &q, Some(&tiny), &refs, Precision::F32, &|_, _| {})
        .unwrap();
    let c = wgpress::eval::perplexity(
        &Engine::Cpu,
        &q,
        Some(&tiny),
        &refs,
        Precision::F32,
        &|_, _| {},
    )
    .unwrap();
    let (kg, kc) = (g.kl.unwrap(), c.kl.unwrap());
    // 3-bit RTN moves the distribution measurably; GPU (f32 sums) and CPU (f64) agree to ~1e-5.
    assert!(kc > 1e-3 && kc < 1.0, "KL {kc}");
    assert!(
        (kg - kc).abs() < 1e-4 + 1e-3 * kc,
        "GPU KL {kg} vs CPU {kc}"
    );
    assert!((g.top1.unwrap() - c.top1.unwrap()).abs() <= 1.0 / 126.0 + 1e-9);
    assert!(g.top1.unwrap() < 1.0 && g.top1.unwrap() > 0.5);
    assert!((g.mean_nll - c.mean_nll).abs() < 1e-4);
}

#[test]
fn strided_windows_score_each_token_once_and_need_context() {
    let m = Model::open(&root().join("assets/tiny")).unwrap();
    let tok = Tokenizer::load(&m.dir, m.config.vocab_size).unwrap();
    let ids = tok
        .encode(&std::fs::read_to_string(text()).unwrap())
        .unwrap();
    let ws = wgpress::calib::stride_windows(&ids, 64, 16, Some(160)).unwrap();
    // Windows start at 0, 16, ..., 96; the first scores 63 tokens, each later one 16.
    assert_eq!(ws.len(), 7);
    assert_eq!(ws[0].score_from, 1);
    assert!(ws[1..].iter().all(|w| w.score_from == 48));
    let gpu = common::gpu_engine();
    let s = wgpress::eval::perplexity(&gpu, &m, None, &ws, Precision::F32, &|_, _| {}).unwrap();
    assert_eq!(s.scored_tokens, 63 + 6 * 16);
    // Same tokens scored by the CPU reference: equal mean loss.
    let c =
        wgpress::eval::perplexity(&Engine::Cpu, &m, None, &ws, Precision::F32, &|_, _| {}).unwrap();
    assert!(
        (s.mean_nll - c.mean_nll).abs() < 1e-4,
        "{} vs {}",
        s.mean_nll,
        c.mean_nll
    );
    // More context per scored token than non-overlapping windows of the same length.
    let plain = wgpress::calib::stride_windows(&ids, 64, 64, Some(160)).unwrap();
    assert!(plain.iter().all(|w| w.score_from == 1) && plain.len() == 2);
    assert!(wgpress::calib::stride_windows(&ids, 64, 0, None).is_err());
    assert!(wgpress::calib::stride_windows(&ids, 64, 65, None).is_err());
}

/// `compress` the tiny model into `dir` with `args` (on the CPU path: bit-identical to the GPU).
fn compress_into(dir: &Path, args: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_wgpress"))
        .args([
            "compress",
            root().join("assets/tiny").to_str().unwrap(),
            "--out",
        ])
        .arg(dir)
        .args(args)
        .arg("--cpu")
        .env_remove("WGPRESS_ADAPTER")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "compress {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Eval reads each export itself (dequantized on load) and gets the perplexity of the dense export
/// of the same RTN grid: GPTQ and compressed-tensors vs dense (4-bit g128 asymmetric), GGUF Q4_0
/// vs dense (4-bit g32 symmetric). The dequantized weights are identical (unquantized tensors in
/// bf16, the input's dtype, so nothing is rounded), so the losses agree to 1e-6 relative.
#[test]
fn eval_of_exports_equals_eval_of_dense() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    compress_into(&t.join("gptq"), &["--dtype", "bf16"]);
    compress_into(
        &t.join("ct"),
        &["--format", "compressed-tensors", "--dtype", "bf16"],
    );
    compress_into(&t.join("dense"), &["--format", "dense", "--dtype", "f32"]);
    let g32 = ["--bits", "4", "--group", "32", "--sym"];
    compress_into(
        &t.join("gguf"),
        &[&g32[..], &["--format", "gguf", "--dtype", "bf16"]].concat(),
    );
    compress_into(
        &t.join("dense32"),
        &[&g32[..], &["--format", "dense", "--dtype", "f32"]].concat(),
    );

    let loss = |dir: &Path| {
        let m = Model::open(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let w = windows(&m, 128, 512);
        let r = wgpress::eval::perplexity(
            &Engine::Cpu,
            &m,
            None,
            &as_windows(&w),
            Precision::F32,
            &|_, _| {},
        )
        .unwrap();
        assert_eq!(r.scored_tokens, 508);
        r.mean_nll
    };
    let dense = loss(&t.join("dense"));
    for name in ["gptq", "ct"] {
        let l = loss(&t.join(name));
        assert!(
            ((l - dense) / dense).abs() < 1e-6,
            "{name}: loss {l} vs dense {dense}"
        );
    }
    let dense32 = loss(&t.join("dense32"));
    // The .gguf file itself and its directory both open.
    for p in [t.join("gguf"), t.join("gguf/model.gguf")] {
        let l = loss(&p);
        assert!(
            ((l - dense32) / dense32).abs() < 1e-6,
            "{}: loss {l} vs dense {dense32}",
            p.display()
        );
    }
    // The quantized model is worse than the original, but not broken.
    assert!(
        dense > HF_LOSS_128_512 && dense < HF_LOSS_128_512 + 0.5,
        "{dense}"
    );

    // The eval command reads a GGUF file directly.
    let o = Command::new(env!("CARGO_BIN_EXE_wgpress"))
        .args([
            "eval",
            t.join("gguf/model.gguf").to_str().unwrap(),
            "--text",
            text().to_str().unwrap(),
        ])
        .args(["--seq-len", "128", "--max-tokens", "256", "--cpu"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("perplexity"));
}
