//! Host work beside the GPU (`WGPRESS_OVERLAP`): the output writer on its own thread and the next
//! block decoded ahead. Whatever the threads' timing, the files are the in-line run's byte for
//! byte, and a failure on a helper thread (a writer refusing a tensor, a block that fails to
//! decode) is the same error as in line, with nothing committed. Turning the phase clock's GPU
//! waits on (`WGPRESS_PHASE_SYNC=1`; off by default) must not change a byte either.
mod common;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use wgpress::calib::CalibOptions;
use wgpress::compress::{CompressOptions, Format, OVERLAP_ENV};
use wgpress::engine::Engine;
use wgpress::model::Model;
use wgpress::model::forward::Precision;
use wgpress::model::safetensors::{Dtype, SafetensorsSet};
use wgpress::model::writer::{TensorOut, write_safetensors};
use wgpress::pipeline::{PHASE_SYNC_ENV, Progress, Rtn, run};
use wgpress::quant::QuantSpec;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn calib_text() -> PathBuf {
    root().join("assets/text/shakespeare-heldout-head.txt")
}

fn p(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// `wgpress compress MODEL --out OUT ARGS` with overlap on or off (the user's adapter and log
/// settings removed, as in tests/cli.rs).
fn compress(model: &Path, out: &Path, args: &[&str], overlap: bool) -> Output {
    compress_env(model, out, args, overlap, &[])
}

/// `compress` with extra environment variables.
fn compress_env(
    model: &Path,
    out: &Path,
    args: &[&str],
    overlap: bool,
    env: &[(&str, &str)],
) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wgpress"))
        .env_remove("WGPRESS_ADAPTER")
        .env_remove("RUST_LOG")
        .env_remove("WGPU_BACKEND")
        .env_remove(PHASE_SYNC_ENV)
        .envs(env.iter().copied())
        .env(OVERLAP_ENV, if overlap { "1" } else { "0" })
        .args(["compress", p(model), "--out", p(out)])
        .args(args)
        .output()
        .expect("cannot start the wgpress binary")
}

#[track_caller]
fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "wgpress failed ({}):\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The error a failed run ends with (its last stderr line), checked not to be a panic.
#[track_caller]
fn failure(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "the run should have failed:\n{err}");
    assert!(!err.contains("panicked"), "a panic, not an error:\n{err}");
    err.lines().last().unwrap_or_default().to_string()
}

/// Every file of `dir` but report.json (it holds timings), by name.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name() != "report.json")
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Asserts that `out` does not exist and that no `.NAME.partial-*` sibling is left.
#[track_caller]
fn assert_no_output(out: &Path) {
    assert!(!out.exists(), "{} must not exist", out.display());
    let name = out.file_name().unwrap().to_string_lossy().to_string();
    for e in std::fs::read_dir(out.parent().unwrap()).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        assert!(!n.starts_with(&format!(".{name}.")), "leftover {n}");
    }
}

/// A copy of the tiny model in `dir` with `edits` = (tensor, flat index, value) applied to its
/// bf16 weights (every other byte as shipped).
fn tiny_with(dir: &Path, edits: &[(&str, usize, f32)]) -> PathBuf {
    let tiny = root().join("assets/tiny");
    std::fs::create_dir_all(dir).unwrap();
    for e in std::fs::read_dir(&tiny).unwrap().flatten() {
        if e.file_name() != "model.safetensors" {
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
    }
    let set = SafetensorsSet::open(&tiny).unwrap();
    let tensors: Vec<TensorOut> = set
        .names()
        .into_iter()
        .map(|name| {
            let info = set.info(name).unwrap();
            let mut data = set.bytes(name).unwrap().to_vec();
            for &(_, i, v) in edits.iter().filter(|(n, _, _)| *n == name) {
                assert_eq!(info.dtype, Dtype::BF16, "{name}");
                data[2 * i..2 * i + 2].copy_from_slice(&half::bf16::from_f32(v).to_le_bytes());
            }
            TensorOut {
                name: name.to_string(),
                dtype: info.dtype,
                shape: info.shape.clone(),
                data,
            }
        })
        .collect();
    write_safetensors(
        &dir.join("model.safetensors"),
        &tensors,
        &set.metadata().clone(),
    )
    .unwrap();
    dir.to_path_buf()
}

fn opts(out: &Path) -> CompressOptions {
    CompressOptions {
        spec: QuantSpec::new(4, Some(32), true).unwrap(),
        format: Format::Gptq,
        dtype: Dtype::F16,
        out: out.to_path_buf(),
        gptq: None,
        precision: Precision::F32,
        batch_tokens: wgpress::compress::DEFAULT_BATCH_TOKENS,
    }
}

fn calib() -> CalibOptions {
    CalibOptions {
        files: vec![calib_text()],
        nsamples: 2,
        seqlen: 64,
        seed: 3,
        bos: false,
    }
}

/// The error of a calibrated RTN run of `m` through the pipeline into `out`, as text.
fn pipeline_error(e: &Engine, m: &Model, out: &Path, progress: Progress<'_>) -> String {
    run(e, m, &Rtn(opts(out).spec), &calib(), &opts(out), progress)
        .unwrap_err()
        .to_string()
}

/// GPTQ through the pipeline (a streaming writer with act-order, GGUF with its permutation at
/// `finish`, dense with its dequantization on the writer's side) and RTN's direct path, with the
/// helper threads and in line: the same files, byte for byte. The writer takes tensors in
/// hand-off order and the decode ahead reads what the in-line decode reads, so the threads'
/// timing cannot show in the output (GPU results repeat from run to run: tests/pipeline.rs
/// compares two runs' errors exactly).
#[test]
fn overlapped_host_work_writes_the_same_bytes_as_in_line() {
    let tmp = tempfile::tempdir().unwrap();
    let tiny = root().join("assets/tiny");
    let grid = ["--bits", "4", "--group", "32", "--sym"];
    let text = calib_text();
    let calibrated = [
        "--method",
        "gptq",
        "--calib",
        p(&text),
        "--nsamples",
        "2",
        "--seqlen",
        "64",
    ];
    let mut runs: Vec<(String, Vec<&str>)> = ["gptq", "gguf", "dense"]
        .into_iter()
        .map(|f| {
            let mut a = calibrated.to_vec();
            a.extend(["--format", f]);
            // GGUF takes only the static column -> group map.
            if f == "gguf" {
                a.push("--no-act-order");
            }
            (format!("gptq-{f}"), a)
        })
        .collect();
    runs.push(("rtn-dense".into(), vec!["--format", "dense"]));
    for (label, mut args) in runs {
        args.extend(grid);
        let out = |tag: &str| tmp.path().join(format!("{label}-{tag}"));
        ok(&compress(&tiny, &out("inline"), &args, false));
        // The GPTQ-format run also turns the phase clock's GPU waits on: neither may change a
        // byte.
        let env: &[(&str, &str)] = if label == "gptq-gptq" {
            &[(PHASE_SYNC_ENV, "1")]
        } else {
            &[]
        };
        let threads = compress_env(&tiny, &out("threads"), &args, true, env);
        ok(&threads);
        let said = String::from_utf8_lossy(&threads.stderr)
            .contains("waits for the GPU at each phase boundary");
        assert_eq!(
            said,
            !env.is_empty(),
            "{label}: the clock's mode was not logged as set"
        );
        let want = files(&out("inline"));
        assert!(want.len() >= 2, "{label}: only {} files", want.len());
        let got = files(&out("threads"));
        assert_eq!(
            got.iter().map(|f| &f.0).collect::<Vec<_>>(),
            want.iter().map(|f| &f.0).collect::<Vec<_>>(),
            "{label}: file lists differ"
        );
        for ((name, a), (_, b)) in got.iter().zip(&want) {
            assert!(
                a == b,
                "{label}: {name} differs between threads and in line"
            );
        }
    }
}

/// The CLI's calibrated compress of `model` fails naming `victim`, with the same message with the
/// helper threads and in line, and commits nothing either way.
fn cli_fails_alike(model: &Path, cli: &Path, victim: &str) {
    let text = calib_text();
    let args = ["--calib", p(&text), "--nsamples", "2", "--seqlen", "64"];
    let threads = failure(&compress(model, cli, &args, true));
    assert_no_output(cli);
    let inline = failure(&compress(model, cli, &args, false));
    assert_no_output(cli);
    assert!(threads.contains(victim), "{threads}");
    assert_eq!(threads, inline);
}

/// A writer failure on the writer thread: block 1's post-attention norm holds a value bf16
/// stores and f16 (the GPTQ format's plain dtype) cannot, which the writer refuses when that
/// block's norms are handed over. The run returns that error, naming the tensor (the forward
/// itself is f32 and goes on), with no output committed and no temporary left; the CLI says the
/// same with the threads and in line, and the direct RTN path fails alike.
#[test]
fn a_writer_failure_mid_run_is_an_error_and_commits_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let victim = "model.layers.1.post_attention_layernorm.weight";
    let dir = tiny_with(&tmp.path().join("m"), &[(victim, 5, 70000.0)]);
    let m = Model::open(&dir).unwrap();
    let e = common::gpu_engine();

    let out = tmp.path().join("o");
    let err = pipeline_error(&e, &m, &out, &|_, _, _| {});
    assert!(
        err.contains(victim) && err.contains("overflows F16") && err.contains("index 5"),
        "{err}"
    );
    assert_no_output(&out);

    let out_rtn = tmp.path().join("rtn");
    let err_rtn = wgpress::compress::rtn(&Engine::Cpu, &m, &opts(&out_rtn), &|_, _, _| {})
        .unwrap_err()
        .to_string();
    assert_eq!(err_rtn, err.replace(p(&out), p(&out_rtn)));
    assert_no_output(&out_rtn);

    cli_fails_alike(&dir, &tmp.path().join("cli"), victim);
}

/// A block decoded ahead that holds a NaN fails when the pipeline reaches it, with the decode's
/// own message (file, tensor, index), as the in-line decode does; nothing is committed.
#[test]
fn a_decode_failure_ahead_surfaces_at_its_block() {
    let tmp = tempfile::tempdir().unwrap();
    let victim = "model.layers.2.mlp.up_proj.weight";
    let dir = tiny_with(&tmp.path().join("m"), &[(victim, 37, f32::NAN)]);
    let m = Model::open(&dir).unwrap();
    let e = common::gpu_engine();
    let out = tmp.path().join("o");
    let blocks = std::sync::Mutex::new(Vec::new());
    let err = pipeline_error(&e, &m, &out, &|stage, _, _| {
        blocks.lock().unwrap().push(stage.to_string())
    });
    assert!(
        err.contains(victim)
            && err.contains("non-finite")
            && err.contains("flat index 37")
            && err.contains("model.safetensors"),
        "{err}"
    );
    // Blocks 0 and 1 ran; the error came at block 2, not before.
    assert_eq!(
        blocks.into_inner().unwrap(),
        ["block 0", "block 1", "block 2"]
    );
    assert_no_output(&out);

    cli_fails_alike(&dir, &tmp.path().join("cli"), victim);
}
