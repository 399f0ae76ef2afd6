//! The CPU reference forward (`wgpress::reference::forward`): the shipped tiny model against the
//! logits transformers produced, RoPE against hand-computed values and HF's llama3 formula, and
//! invariants on random small blocks (causality, kv-head sharing, odd lengths, prefixes) that
//! catch indexing bugs a single fixture could miss.

use std::path::{Path, PathBuf};
use wgpress::model::Model;
use wgpress::model::config::LlamaConfig;
use wgpress::model::llama::{BlockWeights, Linear, LlamaWeights};
use wgpress::model::safetensors::{Dtype, SafetensorsSet};
use wgpress::reference::forward::{
    Rope, apply_rope, block_forward, logits, rope_inv_freq, rope_kind,
};
use wgpress::rng::Rng;

fn tiny_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny")
}

fn cfg(json: serde_json::Value) -> LlamaConfig {
    LlamaConfig::from_json(json, Path::new("test-config.json")).expect("valid test config")
}

/// A small config; `arch` Qwen2 turns on q/k/v biases.
fn small_cfg(arch: &str, hidden: usize, heads: usize, kv: usize, head_dim: usize) -> LlamaConfig {
    cfg(serde_json::json!({
        "architectures": [arch],
        "hidden_size": hidden,
        "intermediate_size": 40,
        "num_hidden_layers": 2,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "vocab_size": 50,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": true,
    }))
}

fn rand_linear(rng: &mut Rng, out: usize, inp: usize, bias: bool) -> Linear {
    Linear {
        // 1/sqrt(in) keeps activations O(1) through the block, so softmax is neither flat nor
        // one-hot and every position really contributes.
        weight: rng.normal_vec(out * inp, 1.0 / (inp as f32).sqrt()),
        bias: bias.then(|| rng.normal_vec(out, 0.1)),
        out_features: out,
        in_features: inp,
    }
}

fn rand_norm(rng: &mut Rng, n: usize) -> Vec<f32> {
    rng.normal_vec(n, 0.1).iter().map(|v| 1.0 + v).collect()
}

fn rand_block(rng: &mut Rng, c: &LlamaConfig) -> BlockWeights {
    let (h, q, kv, f) = (
        c.hidden_size,
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
        c.intermediate_size,
    );
    BlockWeights {
        input_norm: rand_norm(rng, h),
        q: rand_linear(rng, q, h, c.qkv_bias),
        k: rand_linear(rng, kv, h, c.qkv_bias),
        v: rand_linear(rng, kv, h, c.qkv_bias),
        o: rand_linear(rng, h, q, c.o_bias),
        post_norm: rand_norm(rng, h),
        gate: rand_linear(rng, f, h, c.mlp_bias),
        up: rand_linear(rng, f, h, c.mlp_bias),
        down: rand_linear(rng, h, f, c.mlp_bias),
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

// ---------------------------------------------------------------------------------------------
// the tiny model against transformers

/// Reads the fixture's `input_ids` (I64; `to_f32` refuses integers, so decode the bytes here).
fn fixture_ids(set: &SafetensorsSet) -> Vec<u32> {
    let info = set.info("input_ids").expect("input_ids");
    assert_eq!(info.dtype, Dtype::I64);
    assert_eq!(info.shape, vec![64]);
    set.bytes("input_ids")
        .expect("bytes")
        .chunks_exact(8)
        .map(|b| {
            let v = i64::from_le_bytes(b.try_into().expect("8 bytes"));
            u32::try_from(v).expect("non-negative id")
        })
        .collect()
}

#[test]
fn tiny_logits_match_transformers_fixture() {
    let model = Model::open(&tiny_dir()).expect("open assets/tiny");
    let c = &model.config;
    let w = LlamaWeights::load(&model).expect("load weights");
    assert!(w.lm_head.is_none(), "tiny model has tied embeddings");
    let fx = SafetensorsSet::open_file(&tiny_dir().join("logits_fixture.safetensors"))
        .expect("open fixture");
    let ids = fixture_ids(&fx);
    assert_eq!(&ids[..4], &[201, 35, 44, 35]);
    let want = fx.to_f32("logits").expect("fixture logits");
    assert_eq!(want.len(), 64 * c.vocab_size);

    let got = logits(c, &w, &ids).expect("forward");
    let diff = max_abs_diff(&got, &want);
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let argmax_agree = (0..64)
        .filter(|&p| {
            let r = p * c.vocab_size..(p + 1) * c.vocab_size;
            argmax(&got[r.clone()]) == argmax(&want[r])
        })
        .count();
    eprintln!(
        "max |logit diff| = {diff:e} (max |logit| {scale}), argmax agrees at {argmax_agree}/64"
    );
    // Tolerance: both sides use the same bf16 weights as exact f32 values, so the difference is
    // only rounding: transformers sums in f32 (in its own order), we sum in f64 and round at the
    // same tensor boundaries. transformers' own CPU and GPU f32 forwards differ by 2.1e-5 on these
    // logits (|logit| up to 22.5); we measured 2.29e-5, the same size. 1e-4 (~4x either spread,
    // ~4e-6 relative to the largest logit) still catches any real maths error (a wrong RoPE
    // pairing, eps, kv mapping or attention scale moves logits by 1e-2 or more) while leaving
    // room for any correct f32 summation order.
    assert!(diff < 1e-4, "max |logit diff| {diff:e} >= 1e-4");
    assert_eq!(argmax_agree, 64);
}

#[test]
fn block_load_streams_one_block_and_rejects_missing_ones() {
    let model = Model::open(&tiny_dir()).expect("open assets/tiny");
    let b3 = BlockWeights::load(&model, 3).expect("block 3");
    b3.check(&model.config).expect("shapes");
    assert_eq!((b3.q.out_features, b3.q.in_features), (256, 256));
    assert_eq!((b3.k.out_features, b3.k.in_features), (128, 256));
    assert_eq!((b3.down.out_features, b3.down.in_features), (256, 768));
    assert!(b3.q.bias.is_none());
    assert!(BlockWeights::load(&model, 4).is_err());
}

// ---------------------------------------------------------------------------------------------
// rotary embeddings

#[test]
fn rope_matches_hand_computed_rotation() {
    // head_dim 4, theta 10000: inv_freq = [1, 10000^(-1/2)] = [1, 0.01]. x = [1, 2, 3, 4] at
    // position 2: pairs (0, 2) rotate by 2 rad, pairs (1, 3) by 0.02 rad:
    //   out0 = 1 cos 2 - 3 sin 2,        out2 = 3 cos 2 + 1 sin 2,
    //   out1 = 2 cos .02 - 4 sin .02,    out3 = 4 cos .02 + 2 sin .02.
    // Values computed by hand (Python's math module), not by the code under test.
    let c = small_cfg("LlamaForCausalLM", 8, 2, 2, 4);
    let f = rope_inv_freq(&c).expect("inv_freq");
    assert_eq!(f.len(), 2);
    assert!((f[0] - 1.0).abs() < 1e-15 && (f[1] - 0.01).abs() < 1e-15);
    // 3 positions x 1 head.
    let mut x: Vec<f32> = [1.0f32, 2.0, 3.0, 4.0].repeat(3);
    apply_rope(&mut x, 3, 1, 4, &f).expect("rope");
    assert_eq!(
        &x[0..4],
        &[1.0, 2.0, 3.0, 4.0],
        "position 0 is the identity"
    );
    let want = [
        -3.144_039_117_024_187_5f64,
        1.919_605_346_559_823_3,
        -0.339_143_082_815_745_57,
        4.039_197_360_052_977,
    ];
    for (g, w) in x[8..12].iter().zip(want) {
        assert!((*g as f64 - w).abs() < 1e-6, "{:?} vs {want:?}", &x[8..12]);
    }
}

#[test]
fn rope_scores_depend_only_on_relative_position() {
    // <rope(q, m), rope(k, n)> is a function of m - n: the property RoPE exists for. Checks the
    // pairing and sign conventions together on a real head_dim.
    let c = small_cfg("LlamaForCausalLM", 64, 2, 2, 32);
    let f = rope_inv_freq(&c).expect("inv_freq");
    let mut rng = Rng::new(7);
    let q = rng.normal_vec(32, 1.0);
    let k = rng.normal_vec(32, 1.0);
    let at = |v: &[f32], p: usize| {
        let mut x = v.repeat(p + 1);
        apply_rope(&mut x, p + 1, 1, 32, &f).expect("rope");
        x[p * 32..].to_vec()
    };
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x * y) as f64).sum::<f64>();
    let d1 = dot(&at(&q, 9), &at(&k, 4));
    let d2 = dot(&at(&q, 25), &at(&k, 20));
    assert!((d1 - d2).abs() < 1e-4, "{d1} vs {d2}");
    // and a rotation keeps the norm
    assert!((dot(&at(&q, 17), &at(&q, 17)) - dot(&q, &q)).abs() < 1e-4);
}

fn llama3_cfg(params_key: &str, type_key: &str) -> LlamaConfig {
    cfg(serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 256, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 128, "vocab_size": 10,
        "rope_theta": 500000.0,
        params_key: {
            type_key: "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192
        }
    }))
}

#[test]
fn rope_llama3_inv_freq_follows_hf_formula() {
    // HF `_compute_llama3_parameters` (Llama 3.1 values: theta 5e5, d 128, factor 8, low 1,
    // high 4, original context 8192):
    //   f_i = theta^(-2i/d);  wavelen_i = 2π / f_i
    //   low_wl = 8192 / low = 8192;  high_wl = 8192 / high = 2048
    //   wavelen_i < high_wl           -> f_i               (high frequencies kept)
    //   wavelen_i > low_wl            -> f_i / factor      (low frequencies stretched)
    //   otherwise s = (8192 / wavelen_i - low) / (high - low),
    //                                 -> (1 - s) f_i / factor + s f_i
    let (theta, d, factor, low, high, old) = (500000.0f64, 128usize, 8.0, 1.0, 4.0, 8192.0);
    let want: Vec<f64> = (0..d / 2)
        .map(|i| {
            let f = theta.powf(-(2.0 * i as f64) / d as f64);
            let wl = 2.0 * std::f64::consts::PI / f;
            if wl < old / high {
                f
            } else if wl > old / low {
                f / factor
            } else {
                let s = (old / wl - low) / (high - low);
                (1.0 - s) * f / factor + s * f
            }
        })
        .collect();
    // The same formula evaluated independently in Python (float64) at one index of each band:
    // 20 high (kept), 30 medium (interpolated), 35 and 63 low (divided by 8).
    for (i, v) in [
        (20usize, 0.016_560_440_080_994_446f64),
        (30, 0.001_371_893_567_761_138_1),
        (35, 9.556_212_353_964_683e-5),
        (63, 3.068_925_988_914_511e-7),
    ] {
        assert!((want[i] - v).abs() <= 1e-12 * v, "test formula at {i}");
    }
    // Both spellings HF accepts (`rope_type`, legacy `type`) and transformers 5's
    // `rope_parameters` instead of `rope_scaling`.
    for (params, ty) in [
        ("rope_scaling", "rope_type"),
        ("rope_scaling", "type"),
        ("rope_parameters", "rope_type"),
    ] {
        let c = llama3_cfg(params, ty);
        assert!(
            matches!(rope_kind(&c), Ok(Rope::Llama3 { .. })),
            "{params}/{ty}"
        );
        let got = rope_inv_freq(&c).expect("inv_freq");
        assert_eq!(got.len(), 64);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-12 * w,
                "{params}/{ty} index {i}: {g} vs {w}"
            );
        }
    }
}

#[test]
fn rope_default_and_unsupported_types() {
    // The tiny model's transformers-5 config says rope_parameters.rope_type "default".
    let model_cfg = LlamaConfig::load(&tiny_dir()).expect("config");
    assert_eq!(rope_kind(&model_cfg).expect("kind"), Rope::Default);
    let yarn = cfg(serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "vocab_size": 10,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0}
    }));
    assert!(
        rope_inv_freq(&yarn).is_err(),
        "unknown rope types must not fall back silently"
    );
}

// ---------------------------------------------------------------------------------------------
// invariants on random blocks: GQA ratios 1, 3, 4 (and 3 with biases), head dims 32 and 64

/// (architecture, hidden, heads, kv heads, head_dim)
const SHAPES: [(&str, usize, usize, usize, usize); 4] = [
    ("LlamaForCausalLM", 48, 4, 4, 32),
    ("LlamaForCausalLM", 48, 6, 2, 32),
    ("LlamaForCausalLM", 64, 8, 2, 64),
    ("Qwen2ForCausalLM", 40, 3, 1, 64),
];

#[test]
fn block_is_causal() {
    for (i, &(arch, h, hq, hk, d)) in SHAPES.iter().enumerate() {
        let c = small_cfg(arch, h, hq, hk, d);
        let mut rng = Rng::new(100 + i as u64);
        let w = rand_block(&mut rng, &c);
        let t = 13;
        let x = rng.normal_vec(t * h, 1.0);
        let out = block_forward(&c, &w, &x, t).expect("forward");
        for j in [0, 5, 12] {
            let mut x2 = x.clone();
            for v in &mut x2[j * h..(j + 1) * h] {
                *v += 0.5;
            }
            let out2 = block_forward(&c, &w, &x2, t).expect("forward");
            // Earlier positions never read row j: bit-identical, not merely close.
            assert_eq!(
                &out2[..j * h],
                &out[..j * h],
                "{arch} {hq}/{hk} d{d}: j={j}"
            );
            // ...and every later position does read it (attention is not accidentally diagonal).
            for p in j..t {
                assert!(
                    max_abs_diff(&out2[p * h..(p + 1) * h], &out[p * h..(p + 1) * h]) > 1e-6,
                    "{arch} {hq}/{hk} d{d}: position {p} ignores a change at {j}"
                );
            }
        }
    }
}

#[test]
fn odd_lengths_equal_prefixes_of_longer_runs() {
    for (i, &(arch, h, hq, hk, d)) in SHAPES.iter().enumerate() {
        let c = small_cfg(arch, h, hq, hk, d);
        let mut rng = Rng::new(200 + i as u64);
        let w = rand_block(&mut rng, &c);
        let x = rng.normal_vec(17 * h, 1.0);
        let full = block_forward(&c, &w, &x, 17).expect("forward");
        assert!(full.iter().all(|v| v.is_finite()));
        for t in [1, 3, 7, 11] {
            let part = block_forward(&c, &w, &x[..t * h], t).expect("forward");
            assert_eq!(&part[..], &full[..t * h], "{arch} {hq}/{hk} d{d}: t={t}");
        }
    }
}

#[test]
fn grouped_kv_heads_equal_duplicated_kv_weights() {
    // A GQA block (kv head g serves query heads g·r .. g·r + r - 1, r = heads / kv_heads, as HF's
    // repeat_kv) must equal the MHA block whose k/v weights are those kv heads copied r times.
    for (i, &(arch, h, hq, hk, d)) in SHAPES.iter().enumerate() {
        let gqa = small_cfg(arch, h, hq, hk, d);
        let mha = small_cfg(arch, h, hq, hq, d);
        let mut rng = Rng::new(300 + i as u64);
        let w = rand_block(&mut rng, &gqa);
        let r = hq / hk;
        let dup = |l: &Linear| Linear {
            weight: (0..hq)
                .flat_map(|qh| l.weight[(qh / r) * d * h..(qh / r + 1) * d * h].to_vec())
                .collect(),
            bias: l.bias.as_ref().map(|b| {
                (0..hq)
                    .flat_map(|qh| b[(qh / r) * d..(qh / r + 1) * d].to_vec())
                    .collect()
            }),
            out_features: hq * d,
            in_features: h,
        };
        let w_mha = BlockWeights {
            k: dup(&w.k),
            v: dup(&w.v),
            ..w.clone()
        };
        let t = 9;
        let x = rng.normal_vec(t * h, 1.0);
        let a = block_forward(&gqa, &w, &x, t).expect("gqa");
        let b = block_forward(&mha, &w_mha, &x, t).expect("mha");
        // Identical arithmetic in identical order: equal bit for bit.
        assert_eq!(a, b, "{arch} {hq}/{hk} d{d}");
        // With one kv head both mappings coincide, so the counter-check needs 2+ kv heads.
        if r > 1 && hk > 1 {
            // Mapping kv heads the other way round (h % kv_heads, a classic bug) gives a different
            // answer, so the equality above really tests the mapping.
            let wrong = |l: &Linear| Linear {
                weight: (0..hq)
                    .flat_map(|qh| l.weight[(qh % hk) * d * h..(qh % hk + 1) * d * h].to_vec())
                    .collect(),
                bias: l.bias.as_ref().map(|b| {
                    (0..hq)
                        .flat_map(|qh| b[(qh % hk) * d..(qh % hk + 1) * d].to_vec())
                        .collect()
                }),
                out_features: hq * d,
                in_features: h,
            };
            let w_wrong = BlockWeights {
                k: wrong(&w.k),
                v: wrong(&w.v),
                ..w.clone()
            };
            let c = block_forward(&mha, &w_wrong, &x, t).expect("wrong");
            assert!(max_abs_diff(&a, &c) > 1e-4, "{arch} {hq}/{hk} d{d}");
        }
    }
}

#[test]
fn tied_head_equals_explicit_copy_and_shapes_are_checked() {
    let tied = small_cfg("LlamaForCausalLM", 48, 6, 2, 32);
    let mut untied_json = tied.raw.clone();
    untied_json["tie_word_embeddings"] = serde_json::json!(false);
    let untied = cfg(untied_json);
    let mut rng = Rng::new(400);
    let w = LlamaWeights {
        embed: rng.normal_vec(50 * 48, 1.0),
        blocks: (0..2).map(|_| rand_block(&mut rng, &tied)).collect(),
        final_norm: rand_norm(&mut rng, 48),
        lm_head: None,
    };
    let ids = [3u32, 49, 0, 7, 7];
    let a = logits(&tied, &w, &ids).expect("tied");
    assert_eq!(a.len(), 5 * 50);
    let w2 = LlamaWeights {
        lm_head: Some(w.embed.clone()),
        ..w.clone()
    };
    assert_eq!(a, logits(&untied, &w2, &ids).expect("untied"));
    // errors, not panics
    assert!(
        logits(&tied, &w, &[50]).is_err(),
        "id outside the vocabulary"
    );
    let x = rng.normal_vec(3 * 48, 1.0);
    assert!(
        block_forward(&tied, &w.blocks[0], &x, 4).is_err(),
        "x shorter than t rows"
    );
    let mut bad = w.blocks[0].clone();
    bad.k.weight.pop();
    assert!(
        block_forward(&tied, &bad, &x, 3).is_err(),
        "truncated k_proj"
    );
    let mha = small_cfg("LlamaForCausalLM", 48, 6, 6, 32);
    assert!(
        block_forward(&mha, &w.blocks[0], &x, 3).is_err(),
        "k_proj for 2 kv heads, config says 6"
    );
}
