//! Model I/O: safetensors read/write round trips (single and sharded, f32/f16/bf16), config.json
//! parsing, the synthetic checkpoint writer, and one test per kind of broken input, each asserting
//! that the error names the file and the tensor at fault.

use half::{bf16, f16};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use wgpress::model::safetensors::{Dtype, SafetensorsSet};
use wgpress::model::writer::{TensorOut, write_safetensors};
use wgpress::rng::Rng;

// ---------------------------------------------------------------------------------------------
// helpers

fn tmp() -> tempfile::TempDir {
    let _ = env_logger::builder().is_test(true).try_init();
    tempfile::tempdir().expect("tempdir")
}

/// Writes a raw safetensors file: 8-byte LE length, the header JSON exactly as given, then `data`.
/// Used to craft files that lie, which the real writer refuses to produce.
fn write_raw(path: &Path, header: &serde_json::Value, data: &[u8]) {
    let h = serde_json::to_vec(header).expect("header json");
    write_raw_bytes(path, &h, data);
}

fn write_raw_bytes(path: &Path, header: &[u8], data: &[u8]) {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header);
    b.extend_from_slice(data);
    std::fs::write(path, b).expect("write");
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Encodes `v` in `dtype` and returns the bytes plus the values the reader must give back exactly
/// (the f16/bf16 rounding of `v`).
fn encode(v: &[f32], dtype: Dtype) -> (Vec<u8>, Vec<f32>) {
    match dtype {
        Dtype::F32 => (f32_bytes(v), v.to_vec()),
        Dtype::F16 => {
            let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            (
                h.iter().flat_map(|x| x.to_le_bytes()).collect(),
                h.iter().map(|x| x.to_f32()).collect(),
            )
        }
        Dtype::BF16 => {
            let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
            (
                h.iter().flat_map(|x| x.to_le_bytes()).collect(),
                h.iter().map(|x| x.to_f32()).collect(),
            )
        }
        other => panic!("encode: {other:?}"),
    }
}

/// Asserts that `err`'s message contains every one of `parts`.
fn assert_names(err: &wgpress::Error, parts: &[&str]) {
    let msg = err.to_string();
    for p in parts {
        assert!(msg.contains(p), "error `{msg}` does not mention `{p}`");
    }
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// A one-tensor file `t` of shape [4] f32 with the given header entry overrides.
fn one_tensor_header(entry: serde_json::Value) -> serde_json::Value {
    serde_json::json!({ "__metadata__": {"format": "pt"}, "t": entry })
}

// ---------------------------------------------------------------------------------------------
// safetensors round trips

fn roundtrip_single(dtype: Dtype) {
    let d = tmp();
    let p = d.path().join("x.safetensors");
    let mut rng = Rng::new(7);
    // Non-square shapes, a vector, and a scalar-shaped tensor.
    let shapes: Vec<(&str, Vec<usize>)> = vec![
        ("a.weight", vec![3, 17]),
        ("b.weight", vec![64, 5]),
        ("c.bias", vec![11]),
        ("d.scalar", vec![]),
    ];
    let mut expect = BTreeMap::new();
    let mut outs = Vec::new();
    for (name, shape) in &shapes {
        let n: usize = shape.iter().product();
        let v = rng.normal_vec(n, 3.0);
        let (bytes, back) = encode(&v, dtype);
        expect.insert(name.to_string(), back);
        outs.push(TensorOut {
            name: name.to_string(),
            dtype,
            shape: shape.clone(),
            data: bytes,
        });
    }
    let mut md = BTreeMap::new();
    md.insert("format".to_string(), "pt".to_string());
    write_safetensors(&p, &outs, &md).expect("write");

    let set = SafetensorsSet::open_file(&p).expect("open");
    assert_eq!(
        set.names(),
        vec!["a.weight", "b.weight", "c.bias", "d.scalar"]
    );
    assert_eq!(set.metadata().get("format").map(|s| s.as_str()), Some("pt"));
    for (name, shape) in &shapes {
        let info = set.info(name).expect("info");
        assert_eq!(&info.shape, shape);
        assert_eq!(info.dtype, dtype);
        assert_eq!(info.file, p);
        let got = set.to_f32(name).expect("to_f32");
        let want = &expect[*name];
        // Bit-exact: what we wrote is exactly representable in the stored dtype.
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{name}[{i}]: {g} != {w}");
        }
        let raw = set.bytes(name).expect("bytes");
        assert_eq!(raw.len(), info.byte_len());
    }
}

#[test]
fn roundtrip_single_f32() {
    roundtrip_single(Dtype::F32);
}

#[test]
fn roundtrip_single_f16() {
    roundtrip_single(Dtype::F16);
}

#[test]
fn roundtrip_single_bf16() {
    roundtrip_single(Dtype::BF16);
}

#[test]
fn unaligned_f16_data_reads_correctly() {
    // A header whose length is odd puts the data at an odd address: the reader's bounce path.
    let d = tmp();
    let p = d.path().join("odd.safetensors");
    let v: Vec<f32> = (0..40_000).map(|i| (i as f32 - 20_000.0) * 0.01).collect();
    let (bytes, want) = encode(&v, Dtype::F16);
    let mut h = serde_json::to_vec(&serde_json::json!({
        "t": {"dtype": "F16", "shape": [200, 200], "data_offsets": [0, bytes.len()]}
    }))
    .expect("json");
    if h.len().is_multiple_of(2) {
        h.push(b' ');
    }
    write_raw_bytes(&p, &h, &bytes);
    let set = SafetensorsSet::open_file(&p).expect("open");
    assert_eq!(set.to_f32("t").expect("to_f32"), want);
}

#[test]
fn to_i32_reads_i32_and_refuses_floats() {
    let d = tmp();
    let p = d.path().join("i.safetensors");
    let v: Vec<i32> = vec![-5, 0, 7, i32::MAX, i32::MIN, 42];
    let data: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let outs = vec![
        TensorOut {
            name: "q".into(),
            dtype: Dtype::I32,
            shape: vec![2, 3],
            data,
        },
        TensorOut {
            name: "f".into(),
            dtype: Dtype::F32,
            shape: vec![1],
            data: f32_bytes(&[1.0]),
        },
    ];
    write_safetensors(&p, &outs, &BTreeMap::new()).expect("write");
    let set = SafetensorsSet::open_file(&p).expect("open");
    assert_eq!(set.to_i32("q").expect("i32"), v);
    let e = set.to_i32("f").expect_err("f32 as i32");
    assert_names(&e, &[&path_str(&p), "`f`", "I32"]);
    let e = set.to_f32("q").expect_err("i32 as f32");
    assert_names(&e, &[&path_str(&p), "`q`", "I32"]);
    let e = set.info("nope").expect_err("missing");
    assert_names(&e, &[&path_str(&p), "`nope`"]);
}

// ---------------------------------------------------------------------------------------------
// safetensors: broken files

#[test]
fn header_length_beyond_file() {
    let d = tmp();
    let p = d.path().join("bad.safetensors");
    let mut b = 1_000_000u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    std::fs::write(&p, b).expect("write");
    let e = SafetensorsSet::open_file(&p).expect_err("must fail");
    assert_names(&e, &[&path_str(&p), "header length 1000000", "beyond"]);
}

#[test]
fn file_shorter_than_length_field() {
    let d = tmp();
    let p = d.path().join("tiny.safetensors");
    std::fs::write(&p, [1u8, 2, 3]).expect("write");
    let e = SafetensorsSet::open_file(&p).expect_err("must fail");
    assert_names(&e, &[&path_str(&p), "too short"]);
}

#[test]
fn header_bad_json() {
    let d = tmp();
    let p = d.path().join("bad.safetensors");
    write_raw_bytes(&p, b"{\"t\": [", &[]);
    let e = SafetensorsSet::open_file(&p).expect_err("must fail");
    assert_names(&e, &[&path_str(&p), "JSON"]);
}

#[test]
fn unknown_dtype() {
    let d = tmp();
    let p = d.path().join("bad.safetensors");
    let h = one_tensor_header(
        serde_json::json!({"dtype": "F24", "shape": [4], "data_offsets": [0, 16]}),
    );
    write_raw(&p, &h, &f32_bytes(&[1.0; 4]));
    let e = SafetensorsSet::open_file(&p).expect_err("must fail");
    assert_names(&e, &[&path_str(&p), "`t`", "unknown dtype `F24`"]);
}

#[test]
fn offsets_out_of_range() {
    let d = tmp();
    let p = d.path().join("bad.safetensors");
    let h = one_tensor_header(
        serde_json::json!({"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}),
    );
    write_raw(&p, &h, &f32_bytes(&[1.0; 4]));
    let e = SafetensorsSet::open_file(&p).expect_err("must fail");
    assert_names(&e, &[&path_str(&p), "`t`", "out of range"]);
}

#[test]
fn offsets_disagree_with_shape() {
    let d = tmp();
    let p = d.path().join("bad.safetensors");
    let h = one_tensor_header(
        serde_json::json!({"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}),
    );
    write_raw(&p, &h, &f32_bytes(&[1.0; 4]));
    let e = SafetensorsSet::open_file(&p).expect_err("must fail");
    assert_names(&e, &[&path_str(&p), "`t`", "needs 20"]);
}

#[test]
fn offsets_overlap() {
    let d = tmp();
    let p = d.path().join("bad.safetensors");
    let h = serde_json::json!({
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
    });
    write_raw(&p, &h, &f32_bytes(&[1.0; 4]));
    let e = SafetensorsSet::open_file(&p).expect_err("must fail");
    assert_names(&e, &[&path_str(&p), "`b`", "overlap", "`a`"]);
}

#[test]
fn truncated_data() {
    let d = tmp();
    let p = d.path().join("cut.safetensors");
    let outs = vec![
        TensorOut {
            name: "first".into(),
            dtype: Dtype::F32,
            shape: vec![2, 2],
            data: f32_bytes(&[1.0; 4]),
        },
        TensorOut {
            name: "second".into(),
            dtype: Dtype::F32,
            shape: vec![3, 2],
            data: f32_bytes(&[2.0; 6]),
        },
    ];
    write_safetensors(&p, &outs, &BTreeMap::new()).expect("write");
    let full = std::fs::read(&p).expect("read");
    std::fs::write(&p, &full[..full.len() - 5]).expect("truncate");
    let e = SafetensorsSet::open_file(&p).expect_err("must fail");
    assert_names(&e, &[&path_str(&p), "`second`", "truncated"]);
}

#[test]
fn nan_weight_is_an_error() {
    let d = tmp();
    let p = d.path().join("nan.safetensors");
    let mut v = vec![0.5f32; 12];
    v[7] = f32::NAN;
    let outs = vec![TensorOut {
        name: "w".into(),
        dtype: Dtype::F32,
        shape: vec![3, 4],
        data: f32_bytes(&v),
    }];
    write_safetensors(&p, &outs, &BTreeMap::new()).expect("write");
    let set = SafetensorsSet::open_file(&p).expect("open is lazy about values");
    let e = set.to_f32("w").expect_err("NaN must fail");
    assert_names(&e, &[&path_str(&p), "`w`", "NaN", "flat index 7"]);
}

#[test]
fn inf_weight_is_an_error() {
    for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        let d = tmp();
        let p = d.path().join("inf.safetensors");
        let mut v = vec![0.25f32; 10];
        v[3] = f32::NEG_INFINITY;
        let (bytes, _) = encode(&v, dtype);
        let outs = vec![TensorOut {
            name: "w".into(),
            dtype,
            shape: vec![10],
            data: bytes,
        }];
        write_safetensors(&p, &outs, &BTreeMap::new()).expect("write");
        let set = SafetensorsSet::open_file(&p).expect("open");
        let e = set.to_f32("w").expect_err("inf must fail");
        assert_names(&e, &[&path_str(&p), "`w`", "inf", "flat index 3"]);
    }
}

// ---------------------------------------------------------------------------------------------
// sharded sets

/// Writes `tensors` as shards (round-robin) plus an index into `dir`.
fn write_sharded(dir: &Path, tensors: Vec<TensorOut>, shards: usize) -> Vec<PathBuf> {
    let mut per: Vec<Vec<TensorOut>> = (0..shards).map(|_| Vec::new()).collect();
    for (i, t) in tensors.into_iter().enumerate() {
        per[i % shards].push(t);
    }
    let mut map = serde_json::Map::new();
    let mut paths = Vec::new();
    for (i, ts) in per.iter().enumerate() {
        let name = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards);
        for t in ts {
            map.insert(t.name.clone(), serde_json::Value::String(name.clone()));
        }
        let p = dir.join(&name);
        write_safetensors(&p, ts, &BTreeMap::new()).expect("write shard");
        paths.push(p);
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(&index).expect("json"),
    )
    .expect("write index");
    paths
}

fn sharded_roundtrip(dtype: Dtype) {
    let d = tmp();
    let mut rng = Rng::new(11);
    let mut want = BTreeMap::new();
    let mut outs = Vec::new();
    for i in 0..7 {
        let shape = vec![i + 2, 2 * i + 3];
        let v = rng.normal_vec(shape.iter().product(), 1.0);
        let (bytes, back) = encode(&v, dtype);
        let name = format!("layer.{i}.weight");
        want.insert(name.clone(), (shape.clone(), back));
        outs.push(TensorOut {
            name,
            dtype,
            shape,
            data: bytes,
        });
    }
    let paths = write_sharded(d.path(), outs, 3);
    let set = SafetensorsSet::open(d.path()).expect("open sharded");
    assert_eq!(set.names().len(), 7);
    assert_eq!(set.files().len(), 3);
    for (name, (shape, vals)) in &want {
        let info = set.info(name).expect("info");
        assert_eq!(&info.shape, shape);
        let i: usize = name
            .split('.')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("idx");
        assert_eq!(info.file, paths[i % 3]);
        assert_eq!(&set.to_f32(name).expect("to_f32"), vals);
    }
}

#[test]
fn roundtrip_sharded_f32() {
    sharded_roundtrip(Dtype::F32);
}

#[test]
fn roundtrip_sharded_f16() {
    sharded_roundtrip(Dtype::F16);
}

#[test]
fn roundtrip_sharded_bf16() {
    sharded_roundtrip(Dtype::BF16);
}

fn small(name: &str) -> TensorOut {
    TensorOut {
        name: name.into(),
        dtype: Dtype::F32,
        shape: vec![2],
        data: f32_bytes(&[1.0, 2.0]),
    }
}

#[test]
fn index_names_missing_shard() {
    let d = tmp();
    let paths = write_sharded(d.path(), vec![small("a"), small("b")], 2);
    std::fs::remove_file(&paths[1]).expect("rm");
    let e = SafetensorsSet::open(d.path()).expect_err("must fail");
    assert_names(
        &e,
        &[
            "model.safetensors.index.json",
            "`b`",
            "model-00002-of-00002.safetensors",
            "missing",
        ],
    );
}

#[test]
fn index_names_tensor_missing_from_shard() {
    let d = tmp();
    write_sharded(d.path(), vec![small("a"), small("b")], 2);
    // Rewrite shard 2 without `b` while the index still lists it there.
    let p2 = d.path().join("model-00002-of-00002.safetensors");
    write_safetensors(&p2, &[small("c")], &BTreeMap::new()).expect("write");
    let e = SafetensorsSet::open(d.path()).expect_err("must fail");
    assert_names(&e, &["model-00002-of-00002.safetensors", "`b`", "missing"]);
}

#[test]
fn tensor_in_two_shards() {
    let d = tmp();
    write_sharded(d.path(), vec![small("a"), small("b")], 2);
    let p2 = d.path().join("model-00002-of-00002.safetensors");
    write_safetensors(&p2, &[small("a"), small("b")], &BTreeMap::new()).expect("write");
    let e = SafetensorsSet::open(d.path()).expect_err("must fail");
    assert_names(
        &e,
        &[
            "model-00002-of-00002.safetensors",
            "`a`",
            "model-00001-of-00002.safetensors",
        ],
    );
}

#[test]
fn missing_model_safetensors() {
    let d = tmp();
    let e = SafetensorsSet::open(d.path()).expect_err("must fail");
    assert_names(
        &e,
        &[&path_str(&d.path().join("model.safetensors")), "missing"],
    );
}

#[test]
fn missing_dir_for_safetensors() {
    let d = tmp();
    let p = d.path().join("nowhere");
    let e = SafetensorsSet::open(&p).expect_err("must fail");
    assert_names(&e, &[&path_str(&p), "does not exist"]);
}
