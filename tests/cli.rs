//! End-to-end tests of the `wgpress` binary: every test runs the real executable on the shipped
//! tiny model (or a small random one in a temporary directory) and checks what lands on disk and
//! what the user is told. Nothing is written into the repository.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use wgpress::model::safetensors::Dtype;
use wgpress::model::synth::{SynthSpec, write_random_llama};

/// Env vars that make the Vulkan loader find no driver at all (so wgpu sees no adapter).
const NO_DRIVER_ENV: [(&str, &str); 2] = [
    ("VK_DRIVER_FILES", "/nonexistent.json"),
    ("VK_ICD_FILENAMES", "/nonexistent.json"),
];

/// What `src/engine.rs` logs when it falls back to the CPU reference path.
const FALLBACK_WARNING: &str = "falling back to the CPU reference path";

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny")
}

/// The binary with the user's adapter/log settings removed so every run sees the same defaults.
fn wgpress() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wgpress"));
    c.env_remove("WGPRESS_ADAPTER")
        .env_remove("RUST_LOG")
        .env_remove("WGPU_BACKEND");
    c
}

fn run_with(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = wgpress();
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("cannot start the wgpress binary")
}

fn run(args: &[&str]) -> Output {
    run_with(args, &[])
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Panics with the whole command output unless it exited 0.
#[track_caller]
fn ok(o: &Output) -> (String, String) {
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(
        o.status.success(),
        "wgpress failed ({}):\nstdout:\n{out}\nstderr:\n{err}",
        o.status
    );
    (out, err)
}

/// Asserts a non-zero exit and returns stderr.
#[track_caller]
fn fails(o: &Output) -> String {
    let err = text(&o.stderr);
    assert!(
        !o.status.success(),
        "wgpress should have failed but exited 0:\nstdout:\n{}\nstderr:\n{err}",
        text(&o.stdout)
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected exit code 1 (not a crash): {err}"
    );
    assert!(
        !err.contains("panicked"),
        "an error must be reported, not a panic:\n{err}"
    );
    err
}

fn p(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// Compresses `model` into `out` with extra flags, asserting success; returns (stdout, stderr).
fn compress(model: &Path, out: &Path, extra: &[&str], env: &[(&str, &str)]) -> (String, String) {
    let mut args = vec!["compress", p(model), "--out", p(out)];
    args.extend_from_slice(extra);
    ok(&run_with(&args, env))
}

/// Asserts that `out` does not exist and that no `.NAME.partial-*` / `.NAME.old-*` sibling is left.
#[track_caller]
fn assert_no_output(out: &Path) {
    assert!(
        !out.exists(),
        "{} must not exist after a failed run",
        out.display()
    );
    let name = out.file_name().unwrap().to_string_lossy().to_string();
    let parent = out.parent().unwrap();
    if let Ok(rd) = std::fs::read_dir(parent) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            assert!(
                !n.starts_with(&format!(".{name}.")),
                "leftover temporary {} in {}",
                n,
                parent.display()
            );
        }
    }
}

fn read_json(path: &Path) -> serde_json::Value {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&b).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Directory listing (names only, sorted).
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

/// A safetensors file split into its header JSON and its data section.
fn split_safetensors(path: &Path) -> (serde_json::Map<String, serde_json::Value>, Vec<u8>) {
    let b = read(path);
    let hlen = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&b[8..8 + hlen]).unwrap();
    (header.as_object().unwrap().clone(), b[8 + hlen..].to_vec())
}

/// Writes a safetensors file from a (possibly edited) header and data section.
fn join_safetensors(path: &Path, header: &serde_json::Map<String, serde_json::Value>, data: &[u8]) {
    let mut h = serde_json::to_vec(header).unwrap();
    while !(h.len() + 8).is_multiple_of(8) {
        h.push(b' ');
    }
    let mut b = (h.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(&h);
    b.extend_from_slice(data);
    std::fs::write(path, b).unwrap();
}

/// A small random f32 Llama (hidden 64, FFN 160, 2 layers) in `dir/name`; compress it with
/// `--group 32` (64 and 160 are multiples of 32).
fn synth_model(dir: &Path, name: &str) -> PathBuf {
    let m = dir.join(name);
    let spec = SynthSpec {
        dtype: Dtype::F32,
        ..Default::default()
    };
    write_random_llama(&m, &spec, 7).expect("writing the synthetic model");
    m
}

fn python_deps() -> Result<(), String> {
    match Command::new("python3")
        .args(["-c", "import safetensors, numpy"])
        .output()
    {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "python3 cannot import safetensors/numpy: {}",
            text(&o.stderr).trim()
        )),
        Err(e) => Err(format!("python3 not runnable: {e}")),
    }
}

/// 1. The shipped model to GPTQ (4-bit g128) and to dense f32; files, configs and report; then the
///    external Python reader checks the GPTQ export against the dense one.
#[test]
fn compress_tiny_gptq_and_dense() {
    let tmp = tempfile::tempdir().unwrap();
    let g = tmp.path().join("gptq");
    let d = tmp.path().join("dense");
    let (stdout, _) = compress(&tiny(), &g, &[], &[]);
    assert!(
        stdout.contains("quantized 28 linear layers with RTN 4-bit group 128"),
        "summary line: {stdout}"
    );
    compress(&tiny(), &d, &["--format", "dense", "--dtype", "f32"], &[]);

    for dir in [&g, &d] {
        for f in [
            "model.safetensors",
            "config.json",
            "tokenizer.json",
            "report.json",
        ] {
            assert!(dir.join(f).is_file(), "{} lacks {f}", dir.display());
        }
        assert_eq!(
            read(&dir.join("tokenizer.json")),
            read(&tiny().join("tokenizer.json")),
            "tokenizer.json must be copied unchanged"
        );
        let r = read_json(&dir.join("report.json"));
        assert_eq!(r["tool"], "wgpress");
        let layers = r["layers"].as_array().expect("report.layers");
        assert_eq!(layers.len(), 28, "4 blocks x 7 linear layers");
        for l in layers {
            let e = l["rel_weight_err"].as_f64().expect("rel_weight_err number");
            assert!(
                e.is_finite() && (1e-4..0.1).contains(&e),
                "{}: rel_weight_err {e} outside [1e-4, 0.1) for 4-bit g128",
                l["name"]
            );
        }
        // The original architecture fields survive.
        let cfg = read_json(&dir.join("config.json"));
        assert_eq!(cfg["hidden_size"], 256);
        assert_eq!(cfg["num_hidden_layers"], 4);
    }

    // GPTQ metadata in both places, agreeing.
    let qc = read_json(&g.join("quantize_config.json"));
    let cfg = read_json(&g.join("config.json"));
    let qcfg = &cfg["quantization_config"];
    assert_eq!(qc["quant_method"], "gptq");
    assert_eq!(qc["bits"], 4);
    assert_eq!(qc["group_size"], 128);
    assert_eq!(qc["sym"], false);
    assert_eq!(qc["checkpoint_format"], "gptq");
    for k in ["quant_method", "bits", "group_size", "sym", "desc_act"] {
        assert_eq!(qcfg[k], qc[k], "config.json quantization_config.{k}");
    }
    assert!(
        read_json(&d.join("config.json"))
            .get("quantization_config")
            .is_none(),
        "a dense export must not claim to be quantized"
    );

    // GPTQ tensors present with the v1 shapes; dense keeps the input names in f32.
    let (gh, _) = split_safetensors(&g.join("model.safetensors"));
    let q = &gh["model.layers.0.mlp.down_proj.qweight"];
    assert_eq!(q["dtype"], "I32");
    assert_eq!(q["shape"], serde_json::json!([768 * 4 / 32, 256]));
    assert_eq!(
        gh["model.layers.0.mlp.down_proj.scales"]["shape"],
        serde_json::json!([6, 256])
    );
    assert!(!gh.contains_key("model.layers.0.mlp.down_proj.weight"));
    let (dh, _) = split_safetensors(&d.join("model.safetensors"));
    assert_eq!(dh["model.layers.0.mlp.down_proj.weight"]["dtype"], "F32");
    assert_eq!(dh.len() - usize::from(dh.contains_key("__metadata__")), 38);

    match python_deps() {
        Ok(()) => {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/check_gptq.py");
            let o = Command::new("python3")
                .arg(&script)
                .arg(&g)
                .arg(&d)
                .output()
                .expect("running check_gptq.py");
            let out = text(&o.stdout);
            assert!(
                o.status.success(),
                "check_gptq.py rejected the export ({}):\n{out}\n{}",
                o.status,
                text(&o.stderr)
            );
            assert!(out.contains("0 mismatched, 0 problems"), "{out}");
        }
        Err(why) => eprintln!("SKIPPING the check_gptq.py part: {why} (CI installs them)"),
    }
}

/// 2. The GPU kernel is bit-exact with the CPU reference: same bytes with and without `--cpu`.
#[test]
fn gpu_and_cpu_outputs_are_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let gpu = tmp.path().join("gpu");
    let cpu = tmp.path().join("cpu");
    let opts = ["--bits", "3", "--group", "64", "--sym"];
    compress(&tiny(), &gpu, &opts, &[]);
    let mut with_cpu = opts.to_vec();
    with_cpu.push("--cpu");
    compress(&tiny(), &cpu, &with_cpu, &[]);
    let rg = read_json(&gpu.join("report.json"));
    let rc = read_json(&cpu.join("report.json"));
    assert!(
        rc["device"]
            .as_str()
            .unwrap()
            .contains("CPU reference path"),
        "--cpu run device: {}",
        rc["device"]
    );
    assert!(
        !rg["device"]
            .as_str()
            .unwrap()
            .contains("CPU reference path"),
        "the default run must use a GPU adapter (lavapipe on CI): {}",
        rg["device"]
    );
    let (a, b) = (
        read(&gpu.join("model.safetensors")),
        read(&cpu.join("model.safetensors")),
    );
    assert_eq!(a.len(), b.len(), "file sizes differ");
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!("GPU and CPU model.safetensors first differ at byte {i}");
    }
    assert_eq!(
        read(&gpu.join("quantize_config.json")),
        read(&cpu.join("quantize_config.json"))
    );
    assert_eq!(read_json(&gpu.join("quantize_config.json"))["bits"], 3);
}

/// 3. Without any Vulkan driver the binary sees no adapter, warns, runs on the CPU and writes the
///    same bytes as the GPU run.
#[test]
fn no_adapter_falls_back_to_cpu() {
    let o = run_with(&["inspect", p(&tiny())], &NO_DRIVER_ENV);
    let (stdout, _) = ok(&o);
    assert!(
        stdout.contains("GPU adapters (0):"),
        "VK_DRIVER_FILES/VK_ICD_FILENAMES pointing nowhere should hide every adapter:\n{stdout}"
    );
    assert!(stdout.contains("none (work runs on the CPU reference path)"));

    let tmp = tempfile::tempdir().unwrap();
    let gpu = tmp.path().join("gpu");
    let none = tmp.path().join("none");
    compress(&tiny(), &gpu, &[], &[]);
    let (_, stderr) = compress(&tiny(), &none, &[], &NO_DRIVER_ENV);
    assert!(
        stderr.contains(FALLBACK_WARNING),
        "missing the CPU fallback warning:\n{stderr}"
    );
    assert!(stderr.contains("device: CPU reference path (no GPU adapter)"));
    let r = read_json(&none.join("report.json"));
    assert_eq!(r["device"], "CPU reference path (no GPU adapter)");
    assert!(
        read(&gpu.join("model.safetensors")) == read(&none.join("model.safetensors")),
        "the CPU fallback output differs from the GPU output"
    );

    // An explicit --adapter with no adapter at all is an error, not a silent fallback.
    let bad = tmp.path().join("bad");
    let o = run_with(
        &["compress", p(&tiny()), "--out", p(&bad), "--adapter", "0"],
        &NO_DRIVER_ENV,
    );
    let err = fails(&o);
    assert!(err.contains("no usable GPU adapter"), "{err}");
    assert_no_output(&bad);
}

/// 4. A second run replaces an earlier wgpress output; a foreign directory is refused untouched.
#[test]
fn rerun_replaces_own_output_and_refuses_foreign_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    compress(&tiny(), &out, &[], &[]);
    assert!(out.join("quantize_config.json").is_file());
    // A stray file inside the old output must disappear: the directory is replaced, not merged.
    std::fs::write(out.join("stale.txt"), b"old").unwrap();
    compress(&tiny(), &out, &["--format", "dense"], &[]);
    let files = listing(&out);
    assert!(!files.contains(&"stale.txt".to_string()), "{files:?}");
    assert!(
        !files.contains(&"quantize_config.json".to_string()),
        "{files:?}"
    );
    assert_eq!(read_json(&out.join("report.json"))["format"], "dense");
    assert_eq!(
        listing(tmp.path()),
        vec!["out".to_string()],
        "no temporary or old directory may be left next to the output"
    );

    // Foreign: user files, and a report.json written by some other tool.
    for (i, report) in [None, Some(r#"{"tool": "other"}"#)].into_iter().enumerate() {
        let foreign = tmp.path().join(format!("mine{i}"));
        std::fs::create_dir(&foreign).unwrap();
        std::fs::write(foreign.join("precious.txt"), b"user data").unwrap();
        if let Some(r) = report {
            std::fs::write(foreign.join("report.json"), r).unwrap();
        }
        let before = listing(&foreign);
        let o = run(&["compress", p(&tiny()), "--out", p(&foreign)]);
        let err = fails(&o);
        assert!(
            err.contains(p(&foreign)) && err.contains("not written by wgpress"),
            "refusal must name the directory and the reason:\n{err}"
        );
        assert_eq!(listing(&foreign), before, "foreign directory was modified");
        assert_eq!(read(&foreign.join("precious.txt")), b"user data");
        let leftovers: Vec<String> = listing(tmp.path())
            .into_iter()
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "leftovers: {leftovers:?}");
    }
}

/// Runs `compress MODEL --out TMP/out EXTRA...`, asserts it fails, that stderr mentions every
/// string in `needles`, and that nothing is left behind. Returns stderr.
#[track_caller]
fn compress_fails(tmp: &Path, model: &Path, extra: &[&str], needles: &[&str]) -> String {
    let out = tmp.join("out");
    let mut args = vec!["compress", p(model), "--out", p(&out)];
    args.extend_from_slice(extra);
    let err = fails(&run(&args));
    for n in needles {
        assert!(err.contains(n), "stderr should mention `{n}`:\n{err}");
    }
    assert_no_output(&out);
    err
}

#[test]
fn bad_model_dir_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-model");
    compress_fails(tmp.path(), &missing, &[], &[p(&missing), "does not exist"]);
}

#[test]
fn bad_config_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let m = synth_model(tmp.path(), "m");
    std::fs::remove_file(m.join("config.json")).unwrap();
    compress_fails(
        tmp.path(),
        &m,
        &["--group", "32"],
        &[p(&m.join("config.json")), "missing"],
    );
}

#[test]
fn bad_nan_weight() {
    let tmp = tempfile::tempdir().unwrap();
    let m = synth_model(tmp.path(), "m");
    // Control: the untouched model compresses with these options.
    let good = tmp.path().join("good");
    compress(&m, &good, &["--group", "32"], &[]);

    let file = m.join("model.safetensors");
    let (header, mut data) = split_safetensors(&file);
    let victim = "model.layers.1.mlp.up_proj.weight";
    let e = &header[victim];
    assert_eq!(e["dtype"], "F32");
    let start = e["data_offsets"][0].as_u64().unwrap() as usize;
    let k = 37; // flat index of the poisoned element
    data[start + 4 * k..start + 4 * k + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    join_safetensors(&file, &header, &data);

    let err = compress_fails(
        tmp.path(),
        &m,
        &["--group", "32"],
        &[p(&file), victim, "non-finite", "flat index 37"],
    );
    assert!(err.contains("NaN"), "{err}");
}

#[test]
fn bad_truncated_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let m = synth_model(tmp.path(), "m");
    let file = m.join("model.safetensors");
    let (header, data) = split_safetensors(&file);
    // The tensor stored last is the one a cut-short file loses.
    let last = header
        .iter()
        .filter(|(n, _)| n.as_str() != "__metadata__")
        .max_by_key(|(_, v)| v["data_offsets"][1].as_u64().unwrap())
        .map(|(n, _)| n.clone())
        .unwrap();
    join_safetensors(&file, &header, &data[..data.len() - 100]);
    compress_fails(
        tmp.path(),
        &m,
        &["--group", "32"],
        &[p(&file), &format!("`{last}`")],
    );
}

#[test]
fn bad_unknown_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let m = synth_model(tmp.path(), "m");
    let file = m.join("model.safetensors");
    let (mut header, data) = split_safetensors(&file);
    let victim = "model.layers.0.self_attn.k_proj.weight";
    header.get_mut(victim).unwrap()["dtype"] = "F33".into();
    join_safetensors(&file, &header, &data);
    compress_fails(
        tmp.path(),
        &m,
        &["--group", "32"],
        &[p(&file), victim, "unknown dtype `F33`"],
    );
}

#[test]
fn bad_shape_vs_config() {
    let tmp = tempfile::tempdir().unwrap();
    let m = synth_model(tmp.path(), "m");
    let cfg_path = m.join("config.json");
    let mut cfg = read_json(&cfg_path);
    cfg["intermediate_size"] = 192.into(); // the weights hold 160
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    let err = compress_fails(
        tmp.path(),
        &m,
        &["--group", "32"],
        &[
            p(&m.join("model.safetensors")),
            "config.json implies",
            "mlp.",
        ],
    );
    assert!(err.contains("160") && err.contains("192"), "{err}");
}

#[test]
fn bad_group_not_dividing() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny();
    let file = model.join("model.safetensors");
    let err = compress_fails(
        tmp.path(),
        &model,
        &["--group", "100"],
        &[p(&file), "group size 100 does not divide"],
    );
    assert!(
        err.contains("tensor `model.layers."),
        "names the tensor: {err}"
    );
}

#[test]
fn bad_bits_for_gptq() {
    let tmp = tempfile::tempdir().unwrap();
    compress_fails(
        tmp.path(),
        &tiny(),
        &["--bits", "5", "--format", "gptq"],
        &["2, 3, 4 or 8 bits", "got 5"],
    );
}

#[test]
fn bad_unwritable_output() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let out = file.join("out");
    let o = run(&["compress", p(&tiny()), "--out", p(&out)]);
    let err = fails(&o);
    assert!(err.contains(p(&out)), "names the output: {err}");
    assert!(
        err.contains("is a file, not a directory"),
        "says why: {err}"
    );
    assert_eq!(read(&file), b"not a directory");
    assert_eq!(listing(tmp.path()), vec!["a-file".to_string()]);

    // The output path itself being a regular file is refused too, and the file is kept.
    let o = run(&["compress", p(&tiny()), "--out", p(&file)]);
    let err = fails(&o);
    assert!(err.contains("not a directory"), "{err}");
    assert_eq!(read(&file), b"not a directory");
    assert_eq!(listing(tmp.path()), vec!["a-file".to_string()]);
}

#[test]
fn bad_adapter_name() {
    let tmp = tempfile::tempdir().unwrap();
    let err = compress_fails(
        tmp.path(),
        &tiny(),
        &["--adapter", "nosuchgpu"],
        &["nosuchgpu", "found:"],
    );
    // The list of what was found names at least one real adapter (lavapipe here).
    let found = err.split("found:").nth(1).unwrap_or("");
    assert!(
        found.trim_start().trim_end_matches([')', '\n']).len() > 1,
        "the error should list the adapters: {err}"
    );
}

/// 6. `inspect` on the shipped model: architecture, parameter count, adapters.
#[test]
fn inspect_tiny() {
    let (out, _) = ok(&run(&["inspect", p(&tiny())]));
    assert!(out.contains("LlamaForCausalLM"), "{out}");
    assert!(out.contains("layers 4"), "{out}");
    assert!(out.contains("3.67 M"), "{out}");
    assert!(out.contains("model.layers.0.mlp.down_proj.weight"), "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("GPU adapters ("))
        .unwrap_or_else(|| panic!("no adapters section:\n{out}"));
    let n: usize = line["GPU adapters (".len()..]
        .trim_end_matches("):")
        .parse()
        .unwrap_or_else(|_| panic!("bad adapters line `{line}`"));
    let listed = out
        .lines()
        .filter(|l| l.trim_start().starts_with('['))
        .count();
    assert_eq!(
        listed, n,
        "adapter count and listed adapters differ:\n{out}"
    );
}

/// `synth --layers` keeps the named shape's sizes with fewer blocks (the quick 7B-block profile
/// on the device relies on it); 0 blocks is refused.
#[test]
fn synth_layers_override() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("t1");
    ok(&run(&[
        "synth",
        "--shape",
        "tiny",
        "--layers",
        "1",
        "--out",
        p(&m),
    ]));
    let cfg = read_json(&m.join("config.json"));
    assert_eq!(cfg["num_hidden_layers"], 1, "{cfg}");
    assert_eq!(cfg["hidden_size"], 256, "{cfg}");
    let (out, _) = ok(&run(&["inspect", p(&m)]));
    assert!(out.contains("layers 1"), "{out}");
    assert!(!out.contains("model.layers.1."), "{out}");
    let err = fails(&run(&[
        "synth",
        "--shape",
        "tiny",
        "--layers",
        "0",
        "--out",
        p(&tmp.path().join("t0")),
    ]));
    assert!(err.contains("--layers must be at least 1"), "{err}");
}

/// 7. `bench matmul` on a small odd shape prints one result row.
#[test]
fn bench_matmul_small() {
    let (out, _) = ok(&run(&[
        "bench", "matmul", "--size", "64x48x40", "--iters", "1",
    ]));
    let row = out
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|t| t.len() >= 9 && t[..3] == ["64", "48", "40"])
        .unwrap_or_else(|| panic!("no 64x48x40 row:\n{out}"));
    assert_eq!(row[3], "f32");
    // No forced tile configuration: the config column shows "-".
    assert_eq!(row[6], "-");
    let ms: f64 = row[7].parse().expect("ms column");
    let tflops: f64 = row[8].parse().expect("TFLOP/s column");
    assert!(ms.is_finite() && ms >= 0.0 && tflops.is_finite(), "{row:?}");
}

/// `bench matmul --path split` times GPTQ's far update as a split product where cooperative
/// matrices run (a row labelled `split`), is a clear error where they do not, and refuses
/// operands other than f32 NN.
#[test]
fn bench_matmul_split_path() {
    let base = ["bench", "matmul", "--size", "256x128x96", "--iters", "1"];
    let o = run(&[&base[..], &["--path", "split"]].concat());
    if o.status.success() {
        let out = text(&o.stdout);
        let row = out
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|t| t.len() >= 9 && t[..3] == ["256", "128", "96"])
            .unwrap_or_else(|| panic!("no 256x128x96 row:\n{out}"));
        assert_eq!(row[5], "split", "{row:?}");
    } else {
        let e = text(&o.stderr);
        assert!(e.contains("split cooperative product"), "{e}");
    }
    let e = fails(&run(
        &[&base[..], &["--path", "split", "--dtype", "f16"]].concat()
    ));
    assert!(e.contains("--dtype f32 --layout nn"), "{e}");
}

/// `bench gptq` on a small layer prints its row and names the kernels that ran (the lazy updates
/// on the f32 tiled kernel unless `--lazy split` asks for the tensor cores); an unknown kernel
/// name is a clear error, and so is `--lazy split` where cooperative matrices are missing.
#[test]
fn bench_gptq_small_names_its_kernels() {
    let base = [
        "bench",
        "gptq",
        "--shape",
        "40x64",
        "--group",
        "32",
        "--tokens",
        "64",
        "--iters",
        "1",
        "--hold-clock",
        "0",
    ];
    let (out, _) = ok(&run(&base));
    assert!(
        out.lines().any(|l| l.trim_start().starts_with("40x64")),
        "{out}"
    );
    assert!(out.contains("lazy updates (tiled)"), "{out}");
    let e = fails(&run(&[&base[..], &["--lazy", "nope"]].concat()));
    assert!(e.contains("unknown lazy path `nope`"), "{e}");
    let split = run(&[&base[..], &["--lazy", "split"]].concat());
    if split.status.success() {
        let out = text(&split.stdout);
        assert!(out.contains("lazy updates (split)"), "{out}");
    } else {
        let e = text(&split.stderr);
        assert!(e.contains("split cooperative product"), "{e}");
    }
}

/// `--profile` prints the kernel-family table after the command's own output; with `--cpu` it is
/// a clear error.
#[test]
fn profile_flag_prints_kernel_families() {
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().to_str().unwrap();
    let args = [
        "bench",
        "matmul",
        "--size",
        "64x48x40",
        "--iters",
        "2",
        "--profile",
    ];
    let (out, err) = ok(&run_with(&args, &[("WGPRESS_CACHE_DIR", cache_dir)]));
    assert!(out.contains("64"), "{out}");
    let line = err
        .lines()
        .find(|l| l.starts_with("matmul F32xF32 NN/main"))
        .unwrap_or_else(|| panic!("no matmul family in the profile:\n{err}"));
    // Warm-up plus two timed iterations, each one dispatch.
    let n: u64 = line.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert!(n >= 2, "{line}");
    assert!(err.contains("total"), "{err}");
    // The adapter's floors: measured on the first run, cached for the next, shown as shares.
    assert!(err.contains("adapter floors (measured)"), "{err}");
    assert!(err.contains("measured this adapter's floors"), "{err}");
    assert!(line.contains('%'), "{line}");
    assert!(cache.path().join("peaks.json").exists());
    let (_, err2) = ok(&run_with(&args, &[("WGPRESS_CACHE_DIR", cache_dir)]));
    assert!(!err2.contains("measured this adapter's floors"), "{err2}");
    assert!(err2.contains("adapter floors (measured)"), "{err2}");
    let e = fails(&run(&[
        "bench",
        "matmul",
        "--size",
        "8",
        "--cpu",
        "--profile",
    ]));
    assert!(e.contains("--profile"), "{e}");
}

#[test]
fn calib_tokens_writes_the_windows_compress_uses() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("calib.safetensors");
    let text =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/text/shakespeare-heldout-head.txt");
    let o = run_with(
        &[
            "calib-tokens",
            tiny().to_str().unwrap(),
            "--calib",
            text.to_str().unwrap(),
            "--nsamples",
            "3",
            "--seqlen",
            "17",
            "--seed",
            "5",
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let set = wgpress::model::safetensors::SafetensorsSet::open_file(&out).unwrap();
    assert_eq!(set.info("input_ids").unwrap().shape, vec![3, 17]);
    let got = set.to_i32("input_ids").unwrap();
    let m = wgpress::model::Model::open(&tiny()).unwrap();
    let tok = wgpress::model::tokenizer::Tokenizer::load(&m.dir, m.config.vocab_size).unwrap();
    let want = wgpress::calib::sample_windows(
        &tok,
        &wgpress::calib::CalibOptions {
            files: vec![text],
            nsamples: 3,
            seqlen: 17,
            seed: 5,
            bos: false,
        },
    )
    .unwrap();
    let want: Vec<i32> = want.concat().iter().map(|&t| t as i32).collect();
    assert_eq!(got, want);
}

fn python_has(modules: &str) -> Result<(), String> {
    match Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .output()
    {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(text(&o.stderr)
            .trim()
            .lines()
            .last()
            .unwrap_or("")
            .to_string()),
        Err(e) => Err(format!("python3 not runnable: {e}")),
    }
}

fn check_tool(script: &str, export: &Path, dense: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tools")
        .join(script);
    let o = Command::new("python3")
        .arg(&script)
        .arg(export)
        .arg(dense)
        .output()
        .expect("running the checker");
    let out = text(&o.stdout);
    assert!(
        o.status.success() && out.contains("0 mismatched, 0 problems"),
        "{} rejected the export ({}):\n{out}\n{}",
        script.display(),
        o.status,
        text(&o.stderr)
    );
}

/// The shipped model to compressed-tensors (4-bit g128 asymmetric) and to GGUF Q4_0 / Q8_0;
/// files and configs; the external package checks against dense f32 exports of the same grids.
#[test]
fn compress_tiny_compressed_tensors_and_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (ct, ct_dense) = (t.join("ct"), t.join("ct-dense"));
    let (stdout, _) = compress(&tiny(), &ct, &["--format", "compressed-tensors"], &[]);
    assert!(stdout.contains("quantized 28 linear layers"), "{stdout}");
    compress(
        &tiny(),
        &ct_dense,
        &["--format", "dense", "--dtype", "f32"],
        &[],
    );
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "report.json",
    ] {
        assert!(ct.join(f).is_file(), "compressed-tensors output lacks {f}");
    }
    let cfg = read_json(&ct.join("config.json"));
    let qc = &cfg["quantization_config"];
    assert_eq!(qc["quant_method"], "compressed-tensors");
    assert_eq!(qc["format"], "pack-quantized");
    let w = &qc["config_groups"]["group_0"]["weights"];
    assert_eq!(
        (
            w["num_bits"].clone(),
            w["group_size"].clone(),
            w["symmetric"].clone()
        ),
        (
            serde_json::json!(4),
            serde_json::json!(128),
            serde_json::json!(false)
        )
    );
    assert_eq!(
        read_json(&ct.join("report.json"))["format"],
        "compressed-tensors"
    );
    let (h, _) = split_safetensors(&ct.join("model.safetensors"));
    assert_eq!(
        h["model.layers.0.mlp.down_proj.weight_packed"]["shape"],
        serde_json::json!([256, 96])
    );
    assert_eq!(
        h["model.layers.0.mlp.down_proj.weight_zero_point"]["shape"],
        serde_json::json!([32, 6])
    );

    let mut ggufs = vec![];
    for (name, opts) in [
        ("q4_0", vec!["--bits", "4", "--group", "32", "--sym"]),
        ("q8_0", vec!["--bits", "8", "--group", "32", "--sym"]),
    ] {
        let (g, d) = (t.join(name), t.join(format!("{name}-dense")));
        let mut a = opts.clone();
        a.extend(["--format", "gguf"]);
        compress(&tiny(), &g, &a, &[]);
        let mut a = opts.clone();
        a.extend(["--format", "dense", "--dtype", "f32"]);
        compress(&tiny(), &d, &a, &[]);
        assert!(g.join("model.gguf").is_file() && g.join("tokenizer.json").is_file());
        assert!(
            !g.join("config.json").exists(),
            "a GGUF output has no config.json"
        );
        assert_eq!(&read(&g.join("model.gguf"))[..8], b"GGUF\x03\0\0\0");
        assert_eq!(read_json(&g.join("report.json"))["format"], "gguf");
        ggufs.push((g, d));
    }

    match python_has("torch, safetensors, compressed_tensors") {
        Ok(()) => check_tool("check_compressed_tensors.py", &ct, &ct_dense),
        Err(why) => eprintln!("SKIPPING check_compressed_tensors.py: {why}"),
    }
    match python_has("numpy, safetensors, gguf") {
        Ok(()) => {
            for (g, d) in &ggufs {
                check_tool("check_gguf.py", &g.join("model.gguf"), d);
            }
        }
        Err(why) => eprintln!("SKIPPING check_gguf.py: {why}"),
    }
}

/// Format/grid combinations a format cannot hold fail before anything is written, naming the
/// settings that would work.
#[test]
fn bad_format_combinations_fail_before_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let e = compress_fails(
        tmp.path(),
        &tiny(),
        &["--format", "gguf"],
        &["GGUF", "group 128", "--group 32"],
    );
    assert!(e.contains("Q4_0"), "{e}");
    compress_fails(
        tmp.path(),
        &tiny(),
        &["--format", "gguf", "--bits", "8", "--group", "32"],
        &["8-bit group 32 asymmetric", "--sym"],
    );
    compress_fails(
        tmp.path(),
        &tiny(),
        &["--format", "compressed-tensors", "--bits", "3"],
        &["compressed-tensors", "2, 4 or 8 bits, got 3"],
    );
    compress_fails(
        tmp.path(),
        &tiny(),
        &["--format", "compressed-tensors", "--dtype", "f32"],
        &["compressed-tensors", "f16 or bf16"],
    );
}

#[test]
fn compress_precision_flag_reaches_the_calibration_forward() {
    let tmp = tempfile::tempdir().unwrap();
    let calib_text =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/text/shakespeare-heldout-head.txt");
    let out = tmp.path().join("q");
    let calib = [
        "--calib",
        p(&calib_text),
        "--nsamples",
        "2",
        "--seqlen",
        "32",
    ];
    let mut args = calib.to_vec();
    args.extend(["--precision", "f16"]);
    compress(&tiny(), &out, &args, &[]);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["calibration"]["precision"], "f16");
    // f32 is the default; unknown values are refused with the choices.
    let out32 = tmp.path().join("q32");
    compress(&tiny(), &out32, &calib, &[]);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out32.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["calibration"]["precision"], "f32");
    let o = run(&["compress", p(&tiny()), "--precision", "f8"]);
    assert!(!o.status.success() && text(&o.stderr).contains("f16"));
    // The CPU reference path has no f16 forward: refused, and nothing is written.
    let out_cpu = tmp.path().join("qcpu");
    let model = tiny();
    let cpu_args = [
        "compress",
        p(&model),
        "--out",
        p(&out_cpu),
        "--cpu",
        "--precision",
        "f16",
    ];
    let o = run(&cpu_args);
    assert!(
        !o.status.success() && text(&o.stderr).contains("CPU reference path"),
        "{}",
        text(&o.stderr)
    );
    assert!(!out_cpu.exists());
    let (help, _) = ok(&run(&["compress", "--help"]));
    assert!(help.contains("--precision"), "{help}");
    let (help, _) = ok(&run(&["eval", "--help"]));
    assert!(
        help.contains("--precision") && help.contains("tensor cores"),
        "{help}"
    );
}
