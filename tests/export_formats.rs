//! compressed-tensors and GGUF exports (DESIGN.md section 5): written through `OutputDir`, read
//! back by our readers and compared bit for bit with the quantized tensors they came from (Q4_1
//! within its stated bound), the external Python checks (tools/check_compressed_tensors.py,
//! tools/check_gguf.py) when their packages are installed, and the errors bad inputs must give.

use safetensors::Dtype;
use std::path::{Path, PathBuf};
use wgpress::export::compressed_tensors::{
    read_compressed_tensors_dequantized, read_compressed_tensors_quantized,
    write_compressed_tensors,
};
use wgpress::export::dense::{NamedTensor, write_dense};
use wgpress::export::gguf::{
    GGUF_FILE, GgufFile, GgufWriter, read_gguf_dequantized, read_gguf_quantized,
};
use wgpress::export::gptq::ExportTensor;
use wgpress::model::config::LlamaConfig;
use wgpress::model::writer::OutputDir;
use wgpress::quant::{QuantSpec, QuantizedTensor};
use wgpress::rng::Rng;

mod common;
use common::random_quantized as quantized;

fn f32_bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// A one-block Llama: hidden 64, 4 query / 2 key-value heads of 16, FFN 128, the tiny model's
/// 2048-token vocabulary (its tokenizer.json is used for GGUF).
fn config_json() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16"
    })
}

fn config() -> LlamaConfig {
    LlamaConfig::from_json(config_json(), Path::new("config.json")).unwrap()
}

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/tiny")
}

/// Every tensor of the one-block model; the seven linears quantized on `spec`.
fn model_tensors(rng: &mut Rng, spec: QuantSpec, act_order: bool) -> Vec<ExportTensor> {
    let plain = |rng: &mut Rng, name: &str, shape: Vec<usize>| ExportTensor::Plain {
        name: name.into(),
        data: rng.normal_vec(shape.iter().product(), 0.5),
        shape,
    };
    let mut v = vec![
        plain(rng, "model.embed_tokens.weight", vec![2048, 64]),
        plain(rng, "model.layers.0.input_layernorm.weight", vec![64]),
        plain(
            rng,
            "model.layers.0.post_attention_layernorm.weight",
            vec![64],
        ),
    ];
    for (m, rows, cols) in [
        ("self_attn.q_proj", 64, 64),
        ("self_attn.k_proj", 32, 64),
        ("self_attn.v_proj", 32, 64),
        ("self_attn.o_proj", 64, 64),
        ("mlp.gate_proj", 128, 64),
        ("mlp.up_proj", 128, 64),
        ("mlp.down_proj", 64, 128),
    ] {
        v.push(ExportTensor::Quantized {
            name: format!("model.layers.0.{m}"),
            tensor: quantized(rng, rows, cols, spec, act_order),
            bias: None,
        });
    }
    v.push(plain(rng, "model.norm.weight", vec![64]));
    v.push(plain(rng, "lm_head.weight", vec![2048, 64]));
    v
}

/// The dense reference: quantized linears as our dequantized f32 weights, the rest as given.
fn dense_of(tensors: &[ExportTensor]) -> Vec<NamedTensor> {
    tensors
        .iter()
        .map(|t| match t {
            ExportTensor::Plain { name, shape, data } => {
                (name.clone(), shape.clone(), data.clone())
            }
            ExportTensor::Quantized { name, tensor, .. } => (
                format!("{name}.weight"),
                vec![tensor.rows, tensor.cols],
                tensor.dequantize(),
            ),
        })
        .collect()
}

fn write_dense_ref(dir: &Path, tensors: &[ExportTensor], dtype_round: Option<Dtype>) -> PathBuf {
    let mut d = dense_of(tensors);
    // Plain tensors as the export stores them (rounded to its dtype), so the reference is exact.
    if let Some(dt) = dtype_round {
        for (name, shape, data) in &mut d {
            if shape.len() == 2 && !tensors.iter().any(|t| matches!(t, ExportTensor::Quantized { name: n, .. } if format!("{n}.weight") == *name)) {
                for x in data.iter_mut() {
                    *x = match dt {
                        Dtype::F16 => half::f16::from_f32(*x).to_f32(),
                        _ => half::bf16::from_f32(*x).to_f32(),
                    };
                }
            }
        }
    }
    let out = OutputDir::create(dir).unwrap();
    write_dense(&out, &config_json(), &d, Dtype::F32).unwrap();
    out.commit().unwrap()
}

fn python(module: &str) -> Result<(), String> {
    match std::process::Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
    {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr)
            .trim()
            .lines()
            .last()
            .unwrap_or("")
            .to_string()),
        Err(e) => Err(format!("cannot run python3: {e}")),
    }
}

fn run_tool(script: &str, a: &Path, b: &Path) -> (bool, String) {
    let o = std::process::Command::new("python3")
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tools")
                .join(script),
        )
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

// ----------------------------------------------------------------------------- compressed-tensors

fn export_ct(dir: &Path, tensors: &[ExportTensor], dtype: Dtype) -> PathBuf {
    let out = OutputDir::create(dir).unwrap();
    write_compressed_tensors(&out, &config_json(), tensors, dtype).unwrap();
    out.commit().unwrap()
}

#[test]
fn compressed_tensors_round_trip_is_bit_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(31);
    for bits in [2u8, 4, 8] {
        for group in [Some(32), Some(64), None] {
            for sym in [true, false] {
                let spec = QuantSpec::new(bits, group, sym).unwrap();
                let tensors = model_tensors(&mut rng, spec, false);
                let dir = export_ct(
                    &tmp.path().join(format!("ct{bits}{group:?}{sym}")),
                    &tensors,
                    Dtype::BF16,
                );
                let deq = read_compressed_tensors_dequantized(&dir).unwrap();
                let want = dense_of(&tensors);
                assert_eq!(deq.len(), want.len());
                for t in &tensors {
                    if let ExportTensor::Quantized { name, tensor, .. } = t {
                        let back = read_compressed_tensors_quantized(&dir, name).unwrap();
                        assert_eq!(&back, tensor, "{spec:?} {name}");
                        let (_, shape, v) = deq
                            .iter()
                            .find(|d| d.0 == format!("{name}.weight"))
                            .unwrap();
                        assert_eq!(shape, &vec![tensor.rows, tensor.cols]);
                        assert_eq!(
                            f32_bits(v),
                            f32_bits(&tensor.dequantize()),
                            "{spec:?} {name}"
                        );
                    }
                }
                let cfg: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap())
                        .unwrap();
                let qc = &cfg["quantization_config"];
                assert_eq!(qc["quant_method"], "compressed-tensors");
                assert_eq!(qc["format"], "pack-quantized");
                assert_eq!(qc["quantization_status"], "compressed");
                assert_eq!(qc["ignore"], serde_json::json!(["lm_head"]));
                let w = &qc["config_groups"]["group_0"]["weights"];
                assert_eq!(w["num_bits"], bits);
                assert_eq!(w["symmetric"], sym);
                assert_eq!(
                    w["strategy"],
                    if group.is_some() { "group" } else { "channel" }
                );
                assert_eq!(cfg["torch_dtype"], "bfloat16");
                // Layout: [out, in*b/32] packed weights, [out, G] f16 scales, i64 shape, and the
                // zero point packed along dim 0 only when asymmetric.
                let set = wgpress::model::safetensors::SafetensorsSet::open(&dir).unwrap();
                let p = set
                    .info("model.layers.0.mlp.down_proj.weight_packed")
                    .unwrap();
                assert_eq!(
                    (p.dtype, p.shape.clone()),
                    (Dtype::I32, vec![64, 128 * bits as usize / 32])
                );
                let s = set
                    .info("model.layers.0.mlp.down_proj.weight_scale")
                    .unwrap();
                assert_eq!(
                    (s.dtype, s.shape.clone()),
                    (Dtype::F16, vec![64, spec.n_groups(128)])
                );
                assert_eq!(
                    set.info("model.layers.0.mlp.down_proj.weight_shape")
                        .unwrap()
                        .dtype,
                    Dtype::I64
                );
                let zp = set.info("model.layers.0.mlp.down_proj.weight_zero_point");
                assert_eq!(zp.is_ok(), !sym);
                if let Ok(z) = zp {
                    assert_eq!(z.shape, vec![64 * bits as usize / 32, spec.n_groups(128)]);
                }
            }
        }
    }
}

#[test]
fn python_compressed_tensors_decompressor_accepts_our_export() {
    if let Err(why) = python("torch, safetensors, compressed_tensors") {
        eprintln!("SKIPPED: python3 torch/safetensors/compressed_tensors unavailable: {why}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(32);
    for (bits, group, sym) in [
        (4, Some(32), false),
        (8, None, true),
        (4, None, false),
        (2, Some(64), true),
    ] {
        let spec = QuantSpec::new(bits, group, sym).unwrap();
        let tensors = model_tensors(&mut rng, spec, false);
        let name = format!("ct{bits}{group:?}{sym}");
        let ct = export_ct(&tmp.path().join(&name), &tensors, Dtype::F16);
        let dense = write_dense_ref(&tmp.path().join(format!("{name}-dense")), &tensors, None);
        let (ok, out) = run_tool("check_compressed_tensors.py", &ct, &dense);
        assert!(
            ok && out.contains("0 mismatched, 0 problems"),
            "{spec:?}:\n{out}"
        );
    }
}

fn failing<F: FnOnce(&OutputDir) -> wgpress::Result<()>>(
    parent: &Path,
    name: &str,
    f: F,
) -> String {
    let out = OutputDir::create(&parent.join(name)).unwrap();
    let e = f(&out).unwrap_err().to_string();
    drop(out);
    assert!(
        !parent.join(name).exists(),
        "{name} exists after a failed export"
    );
    for e in std::fs::read_dir(parent).unwrap().flatten() {
        assert!(
            !e.file_name().to_string_lossy().contains(".partial-"),
            "partial output left"
        );
    }
    e
}

#[test]
fn compressed_tensors_bad_inputs_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path();
    let mut rng = Rng::new(33);
    let one = |t: QuantizedTensor| {
        vec![ExportTensor::Quantized {
            name: "model.layers.0.mlp.up_proj".into(),
            tensor: t,
            bias: None,
        }]
    };
    let ct = |ts: Vec<ExportTensor>, dt: Dtype| {
        move |o: &OutputDir| write_compressed_tensors(o, &config_json(), &ts, dt)
    };

    let e = failing(
        p,
        "b3",
        ct(
            one(quantized(
                &mut rng,
                8,
                64,
                QuantSpec::new(3, Some(32), true).unwrap(),
                false,
            )),
            Dtype::F16,
        ),
    );
    assert!(
        e.contains("2, 4 or 8 bits, got 3") && e.contains("up_proj"),
        "{e}"
    );
    let e = failing(
        p,
        "act",
        ct(
            one(quantized(
                &mut rng,
                8,
                64,
                QuantSpec::new(4, Some(32), true).unwrap(),
                true,
            )),
            Dtype::F16,
        ),
    );
    assert!(e.contains("act-order") && e.contains("g_idx["), "{e}");
    let mut t = quantized(
        &mut rng,
        8,
        64,
        QuantSpec::new(4, Some(32), true).unwrap(),
        false,
    );
    t.zeros[3] = 7;
    let e = failing(p, "symz", ct(one(t), Dtype::F16));
    assert!(e.contains("symmetric grid with zero 7"), "{e}");
    let mut t = quantized(
        &mut rng,
        8,
        64,
        QuantSpec::new(4, Some(32), false).unwrap(),
        false,
    );
    t.scales[0] = 0.1; // not an f16 value
    let e = failing(p, "scale", ct(one(t), Dtype::F16));
    assert!(e.contains("not a positive f16 value"), "{e}");
    let mut two = one(quantized(
        &mut rng,
        8,
        64,
        QuantSpec::new(4, Some(32), false).unwrap(),
        false,
    ));
    two.push(ExportTensor::Quantized {
        name: "model.layers.0.mlp.gate_proj".into(),
        tensor: quantized(
            &mut rng,
            8,
            64,
            QuantSpec::new(8, Some(32), false).unwrap(),
            false,
        ),
        bias: None,
    });
    let e = failing(p, "mixed", ct(two, Dtype::F16));
    assert!(e.contains("one config group"), "{e}");
    let e = failing(
        p,
        "f32",
        ct(
            one(quantized(
                &mut rng,
                8,
                64,
                QuantSpec::new(4, Some(32), false).unwrap(),
                false,
            )),
            Dtype::F32,
        ),
    );
    assert!(e.contains("F16 or BF16"), "{e}");
    let e = failing(p, "none", ct(vec![], Dtype::F16));
    assert!(e.contains("at least one quantized tensor"), "{e}");
}

// ----------------------------------------------------------------------------- GGUF

fn export_gguf(dir: &Path, tensors: &[ExportTensor], dtype: Dtype) -> PathBuf {
    export_gguf_with_tokenizer(dir, tensors, dtype, &tiny())
}

fn export_gguf_with_tokenizer(
    dir: &Path,
    tensors: &[ExportTensor],
    dtype: Dtype,
    tokenizer_dir: &Path,
) -> PathBuf {
    let out = OutputDir::create(dir).unwrap();
    let mut w = GgufWriter::new(&out, dtype, &config(), tokenizer_dir, "test").unwrap();
    for t in tensors {
        w.add(t).unwrap();
    }
    w.finish().unwrap();
    out.commit().unwrap().join(GGUF_FILE)
}

#[test]
fn gguf_round_trip_q4_0_and_q8_0_exact_q4_1_within_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(41);
    for (bits, sym, ty) in [(4u8, true, "Q4_0"), (8, true, "Q8_0"), (4, false, "Q4_1")] {
        let spec = QuantSpec::new(bits, Some(32), sym).unwrap();
        let tensors = model_tensors(&mut rng, spec, false);
        let file = export_gguf(&tmp.path().join(ty), &tensors, Dtype::F32);
        let g = GgufFile::open(&file).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.tensors.len(), 12);
        let q = g.info("blk.0.attn_q.weight").unwrap();
        assert_eq!(
            (format!("{:?}", q.ty), q.ne.clone()),
            (ty.to_string(), vec![64, 64])
        );
        assert_eq!(g.info("blk.0.ffn_down.weight").unwrap().ne, vec![128, 64]);
        assert!(g.tensors.iter().all(|t| t.start % 32 == 0));
        assert_eq!(g.metadata["general.architecture"].as_str(), Some("llama"));
        assert_eq!(
            g.metadata["llama.attention.head_count_kv"].as_u64(),
            Some(2)
        );
        assert_eq!(g.metadata["tokenizer.ggml.model"].as_str(), Some("gpt2"));
        let deq = read_gguf_dequantized(&file).unwrap();
        for t in &tensors {
            match t {
                ExportTensor::Quantized { name, tensor, .. } => {
                    // The grid itself comes back exactly, Q4_1's zero included.
                    assert_eq!(
                        &read_gguf_quantized(&file, name).unwrap(),
                        tensor,
                        "{ty} {name}"
                    );
                    let (_, shape, v) = deq
                        .iter()
                        .find(|d| d.0 == format!("{name}.weight"))
                        .unwrap();
                    assert_eq!(shape, &vec![tensor.rows, tensor.cols]);
                    let want = tensor.dequantize();
                    if sym {
                        assert_eq!(f32_bits(v), f32_bits(&want), "{ty} {name}");
                    } else {
                        // m = f16(-zero * scale): one f16 rounding of an exact f32 product, so
                        // |x_file - x| <= 2^-11 * zero * scale (+ 2^-24 |x| for the f32 add).
                        let ng = tensor.n_groups();
                        for (i, (&a, &b)) in v.iter().zip(&want).enumerate() {
                            let (r, c) = (i / tensor.cols, i % tensor.cols);
                            let k = r * ng + c / 32;
                            let bound = (tensor.zeros[k] as f32 * tensor.scales[k])
                                * 2f32.powi(-11)
                                + b.abs() * 2f32.powi(-23);
                            assert!(
                                (a - b).abs() <= bound,
                                "{name}[{i}]: {a} vs {b} (bound {bound})"
                            );
                        }
                    }
                }
                ExportTensor::Plain { name, data, .. } => {
                    let (_, _, v) = deq.iter().find(|d| &d.0 == name).unwrap();
                    assert_eq!(f32_bits(v), f32_bits(data), "{name} (F32)");
                }
            }
        }
        if let Err(why) = python("numpy, safetensors, gguf") {
            eprintln!("SKIPPED check_gguf.py: {why}");
            continue;
        }
        let dense = write_dense_ref(&tmp.path().join(format!("{ty}-dense")), &tensors, None);
        let (ok, out) = run_tool("check_gguf.py", &file, &dense);
        assert!(
            ok && out.contains("0 mismatched, 0 problems"),
            "{ty}:\n{out}"
        );
    }
}

#[test]
fn gguf_plain_matrices_in_f16_and_bf16() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(42);
    let tensors = model_tensors(&mut rng, QuantSpec::new(4, Some(32), true).unwrap(), false);
    for (dt, name) in [(Dtype::F16, "F16"), (Dtype::BF16, "BF16")] {
        let file = export_gguf(&tmp.path().join(name), &tensors, dt);
        let g = GgufFile::open(&file).unwrap();
        assert_eq!(
            format!("{:?}", g.info("token_embd.weight").unwrap().ty),
            name
        );
        assert_eq!(
            format!("{:?}", g.info("output_norm.weight").unwrap().ty),
            "F32"
        );
        let deq = read_gguf_dequantized(&file).unwrap();
        let (_, _, v) = deq.iter().find(|d| d.0 == "lm_head.weight").unwrap();
        let ExportTensor::Plain { data, .. } = tensors.last().unwrap() else {
            panic!()
        };
        let want: Vec<f32> = data
            .iter()
            .map(|&x| {
                if dt == Dtype::F16 {
                    half::f16::from_f32(x).to_f32()
                } else {
                    half::bf16::from_f32(x).to_f32()
                }
            })
            .collect();
        assert_eq!(f32_bits(v), f32_bits(&want));
        if python("numpy, safetensors, gguf").is_ok() {
            let dense = write_dense_ref(
                &tmp.path().join(format!("{name}-dense")),
                &tensors,
                Some(dt),
            );
            let (ok, out) = run_tool("check_gguf.py", &file, &dense);
            assert!(
                ok && out.contains("0 mismatched, 0 problems"),
                "{name}:\n{out}"
            );
        }
    }
}

#[test]
fn gguf_bad_inputs_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path();
    let mut rng = Rng::new(43);
    let run = |ts: Vec<ExportTensor>, cfg: LlamaConfig, tok: PathBuf| {
        move |o: &OutputDir| {
            let mut w = GgufWriter::new(o, Dtype::F16, &cfg, &tok, "bad")?;
            for t in &ts {
                w.add(t)?;
            }
            w.finish()
        }
    };
    let one = |t: QuantizedTensor| {
        vec![ExportTensor::Quantized {
            name: "model.layers.0.mlp.up_proj".into(),
            tensor: t,
            bias: None,
        }]
    };
    let e = failing(
        p,
        "g128",
        run(
            one(quantized(
                &mut rng,
                8,
                128,
                QuantSpec::new(4, Some(128), true).unwrap(),
                false,
            )),
            config(),
            tiny(),
        ),
    );
    assert!(e.contains("group 128") && e.contains("--group 32"), "{e}");
    let e = failing(
        p,
        "b8a",
        run(
            one(quantized(
                &mut rng,
                8,
                64,
                QuantSpec::new(8, Some(32), false).unwrap(),
                false,
            )),
            config(),
            tiny(),
        ),
    );
    assert!(e.contains("8-bit group 32 asymmetric"), "{e}");
    let e = failing(
        p,
        "act",
        run(
            one(quantized(
                &mut rng,
                8,
                64,
                QuantSpec::new(4, Some(32), true).unwrap(),
                true,
            )),
            config(),
            tiny(),
        ),
    );
    assert!(e.contains("act-order") && e.contains("no g_idx"), "{e}");
    let odd = vec![ExportTensor::Plain {
        name: "model.layers.0.self_attn.rotary_cache".into(),
        shape: vec![4],
        data: vec![0.0; 4],
    }];
    let e = failing(p, "name", run(odd, config(), tiny()));
    assert!(
        e.contains("rotary_cache") && e.contains("no llama.cpp"),
        "{e}"
    );
    let ok = one(quantized(
        &mut rng,
        8,
        64,
        QuantSpec::new(4, Some(32), true).unwrap(),
        false,
    ));
    let e = failing(p, "notok", run(ok.clone(), config(), p.join("nowhere")));
    assert!(e.contains("tokenizer.json"), "{e}");
    let mut q = config_json();
    q["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
    let qcfg = LlamaConfig::from_json(q, Path::new("config.json")).unwrap();
    let e = failing(p, "qwen", run(ok, qcfg, tiny()));
    assert!(e.contains("Qwen2ForCausalLM"), "{e}");
}

#[test]
fn gguf_parser_rejects_damaged_files() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(44);
    let tensors = model_tensors(&mut rng, QuantSpec::new(4, Some(32), true).unwrap(), false);
    let file = export_gguf(&tmp.path().join("ok"), &tensors, Dtype::F16);
    let bytes = std::fs::read(&file).unwrap();
    let bad = tmp.path().join("bad.gguf");
    let err = |b: &[u8]| {
        std::fs::write(&bad, b).unwrap();
        GgufFile::open(&bad).unwrap_err().to_string()
    };
    assert!(err(&bytes[..bytes.len() - 100]).contains("past the end of the file"));
    let e = err(&bytes[..1000]);
    assert!(e.contains("truncated") || e.contains("bytes left"), "{e}");
    let mut b = bytes.clone();
    b[0] = b'X';
    assert!(err(&b).contains("not a GGUF file"));
    let mut b = bytes.clone();
    b[4] = 9;
    assert!(err(&b).contains("version 9"));
    let mut b = bytes.clone();
    b[16..24].copy_from_slice(&u64::MAX.to_le_bytes()); // key-value count
    assert!(err(&b).contains("key-value count"));
}

/// `tokenizer.ggml.pre` names the llama.cpp regexes that split text as tokenizer.json's
/// pre-tokenizer does: ByteLevel -> `gpt-2`, SmolLM2's [Digits(individual), ByteLevel] ->
/// `smollm` (it used to be `default`, whose punctuation split made llama.cpp tokenize SmolLM2
/// exports differently from Hugging Face); anything else stays `default`. Where llama-cpp-python
/// is installed, tools/check_llama_cpp.py loads each recognised export and compares llama.cpp's
/// token ids with the Hugging Face tokenizer's.
#[test]
fn gguf_pre_tokenizer_matches_llama_cpp() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(45);
    let tensors = model_tensors(&mut rng, QuantSpec::new(4, Some(32), true).unwrap(), false);
    let mut tok: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tiny().join("tokenizer.json")).unwrap()).unwrap();
    let byte_level = tok["pre_tokenizer"].clone();
    assert_eq!(byte_level["type"], "ByteLevel");
    let digits = |individual: bool| {
        serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": individual}, byte_level.clone()]})
    };
    let llama_cpp = python("llama_cpp, tokenizers");
    if let Err(why) = &llama_cpp {
        eprintln!("SKIPPED check_llama_cpp.py: {why}");
    }
    for (name, pre_tokenizer, want) in [
        ("byte-level", byte_level.clone(), "gpt-2"),
        ("smollm", digits(true), "smollm"),
        ("digit-runs", digits(false), "default"),
    ] {
        let dir = tmp.path().join(format!("tok-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        tok["pre_tokenizer"] = pre_tokenizer;
        std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
        let file = export_gguf_with_tokenizer(
            &tmp.path().join(format!("out-{name}")),
            &tensors,
            Dtype::F16,
            &dir,
        );
        let g = GgufFile::open(&file).unwrap();
        assert_eq!(
            g.metadata["tokenizer.ggml.pre"].as_str(),
            Some(want),
            "{name}"
        );
        if llama_cpp.is_ok() && want != "default" {
            let o = std::process::Command::new("python3")
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/check_llama_cpp.py"))
                .arg(&file)
                .arg("--hf-dir")
                .arg(&dir)
                .args(["--n", "4"])
                .output()
                .unwrap();
            let out = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(
                o.status.success(),
                "{name}: check_llama_cpp.py failed:\n{out}"
            );
        }
    }
}
