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

    // The same for F32 (its unaligned path copies element by element).
    let p = d.path().join("odd32.safetensors");
    let bytes = f32_bytes(&v);
    let mut h = serde_json::to_vec(&serde_json::json!({
        "t": {"dtype": "F32", "shape": [40_000], "data_offsets": [0, bytes.len()]}
    }))
    .expect("json");
    while (h.len() + 8).is_multiple_of(4) {
        h.push(b' ');
    }
    write_raw_bytes(&p, &h, &bytes);
    let set = SafetensorsSet::open_file(&p).expect("open");
    assert_eq!(set.to_f32("t").expect("to_f32"), v);
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

#[test]
fn streamed_file_equals_the_one_written_at_once_and_leaves_no_body() {
    use wgpress::model::writer::{OutputDir, SafetensorsStream};
    let d = tmp();
    let mut rng = Rng::new(11);
    let mk = |name: &str, shape: Vec<usize>, dtype: Dtype, rng: &mut Rng| {
        let n: usize = shape.iter().product();
        let (data, _) = encode(&rng.normal_vec(n, 2.0), dtype);
        TensorOut {
            name: name.into(),
            dtype,
            shape,
            data,
        }
    };
    let outs = vec![
        mk("z.first", vec![7, 3], Dtype::F16, &mut rng),
        mk("a.second", vec![13], Dtype::F32, &mut rng),
        mk("m.third", vec![2, 5, 3], Dtype::BF16, &mut rng),
    ];
    let mut md = BTreeMap::new();
    md.insert("format".to_string(), "pt".to_string());
    let whole = d.path().join("whole.safetensors");
    write_safetensors(&whole, &outs, &md).expect("write");

    let out = OutputDir::create(&d.path().join("o")).expect("out");
    let mut s = SafetensorsStream::create(&out, "m.safetensors").expect("stream");
    for t in &outs {
        s.add(t.clone()).expect("add");
    }
    // A tensor whose bytes do not match its shape is refused, naming it, and not written.
    let e = s
        .add(TensorOut {
            name: "bad".into(),
            dtype: Dtype::F32,
            shape: vec![3],
            data: vec![0; 8],
        })
        .expect_err("short");
    assert_names(&e, &["`bad`", "needs 12"]);
    s.finish(&md).expect("finish");
    let files: Vec<String> = dir_files(out.path()).into_keys().collect();
    assert_eq!(files, vec!["m.safetensors"]);
    assert_eq!(
        std::fs::read(out.path().join("m.safetensors")).unwrap(),
        std::fs::read(&whole).unwrap()
    );
}

/// With header room reserved (`expect_tensors`) the data goes straight into the final file and
/// the header is written in place, padded with spaces to fill the room: the file holds the same
/// tensors as one written at once (read back by our reader and by the `safetensors` crate),
/// is exactly room + data long, and leaves no body file. Too little room falls back to the copy
/// (a valid file with the unpadded header); room asked for after data is refused.
#[test]
fn streamed_file_with_reserved_header_room_is_written_in_place() {
    use wgpress::model::writer::{OutputDir, SafetensorsStream};
    let d = tmp();
    let mut rng = Rng::new(12);
    let outs: Vec<TensorOut> = [
        ("z.first", vec![7, 3]),
        ("a.second", vec![13]),
        ("m", vec![2, 5]),
    ]
    .into_iter()
    .map(|(name, shape)| {
        let n: usize = shape.iter().product();
        TensorOut {
            name: name.into(),
            dtype: Dtype::F32,
            shape,
            data: encode(&rng.normal_vec(n, 2.0), Dtype::F32).0,
        }
    })
    .collect();
    let md = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    for in_place in [true, false] {
        let mut outs = outs.clone();
        if !in_place {
            // A 5000-character name outgrows the 4.8 KiB room of three tensors.
            outs[1].name = "n".repeat(5000);
        }
        let whole = d.path().join(format!("whole{in_place}.safetensors"));
        write_safetensors(&whole, &outs, &md).expect("write");
        let whole_bytes = std::fs::read(&whole).unwrap();
        let data_len: usize = outs.iter().map(|t| t.data.len()).sum();
        let out = OutputDir::create(&d.path().join(format!("o{in_place}"))).expect("out");
        let mut s = SafetensorsStream::create(&out, "m.safetensors").expect("stream");
        s.expect_tensors(outs.len()).expect("reserve");
        for t in &outs {
            s.add(t.clone()).expect("add");
        }
        let e = s.expect_tensors(3).expect_err("after data");
        assert!(e.to_string().contains("before any data"), "{e}");
        s.finish(&md).expect("finish");
        let files: Vec<String> = dir_files(out.path()).into_keys().collect();
        assert_eq!(files, vec!["m.safetensors"]);
        let p = out.path().join("m.safetensors");
        let bytes = std::fs::read(&p).unwrap();
        let room = 4096 + 256 * outs.len();
        if in_place {
            assert_eq!(bytes.len(), room + data_len);
            assert!(bytes[..room].ends_with(b"   "), "header padded with spaces");
        } else {
            assert_eq!(bytes, whole_bytes, "the copy writes the unpadded header");
        }
        assert_eq!(
            &bytes[bytes.len() - data_len..],
            &whole_bytes[whole_bytes.len() - data_len..]
        );
        let set = SafetensorsSet::open_file(&p).expect("our reader");
        let theirs = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors crate");
        for t in &outs {
            assert_eq!(set.bytes(&t.name).unwrap(), &t.data[..], "{}", t.name);
            assert_eq!(
                theirs.tensor(&t.name).unwrap().data(),
                &t.data[..],
                "{}",
                t.name
            );
        }
    }
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

// ---------------------------------------------------------------------------------------------
// config.json, Model::open, inspect, synthetic checkpoints

use wgpress::model::config::LlamaConfig;
use wgpress::model::synth::{SynthSpec, write_random_llama};
use wgpress::model::{Model, inspect};

fn synth(dir: &Path, spec: &SynthSpec) {
    write_random_llama(dir, spec, 1234).expect("synth");
}

fn synth_roundtrip(dtype: Dtype, shards: usize, tie: bool) {
    let d = tmp();
    let m = d.path().join("m");
    let spec = SynthSpec {
        hidden: 48,
        intermediate: 80,
        layers: 3,
        heads: 6,
        kv_heads: 2,
        vocab: 100,
        dtype,
        shards,
        tie_embeddings: tie,
        outliers: 0,
    };
    synth(&m, &spec);
    let model = Model::open(&m).expect("open synth");
    assert_eq!(model.config.head_dim, 8);
    assert_eq!(model.weights.files().len(), shards.max(1));
    if shards > 1 {
        assert!(m.join("model.safetensors.index.json").is_file());
        assert!(!m.join("model.safetensors").exists());
    }
    let expected = model.config.expected_tensors();
    assert_eq!(model.weights.names().len(), expected.len());
    for (name, shape) in &expected {
        let info = model.weights.info(name).expect("info");
        assert_eq!(&info.shape, shape);
        assert_eq!(info.dtype, dtype);
        let v = model.weights.to_f32(name).expect("finite values");
        if name.ends_with("proj.weight") {
            // std ~ 1/sqrt(in): loose bounds, the point is the scale is not wildly off.
            let var = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / v.len() as f64;
            let want = 1.0 / shape[1] as f64;
            assert!(
                var > 0.5 * want && var < 2.0 * want,
                "{name}: var {var} vs {want}"
            );
        }
        if name.ends_with("norm.weight") {
            let mean = v.iter().sum::<f32>() / v.len() as f32;
            assert!((mean - 1.0).abs() < 0.1, "{name}: mean {mean}");
        }
    }
    assert_eq!(model.config.tie_word_embeddings, tie);
    assert_eq!(model.weights.contains("lm_head.weight"), !tie);
    // Same seed, same bytes: rewriting into the same (wgpress-written) directory works too.
    let before = model
        .weights
        .to_f32("model.layers.1.mlp.down_proj.weight")
        .expect("read");
    drop(model);
    synth(&m, &spec);
    let again = Model::open(&m).expect("reopen");
    let after = again
        .weights
        .to_f32("model.layers.1.mlp.down_proj.weight")
        .expect("read");
    assert_eq!(before, after);
}

#[test]
fn synth_single_f32() {
    synth_roundtrip(Dtype::F32, 1, false);
}

#[test]
fn synth_single_bf16_tied() {
    synth_roundtrip(Dtype::BF16, 1, true);
}

#[test]
fn synth_sharded_f16() {
    synth_roundtrip(Dtype::F16, 3, false);
}

#[test]
fn synth_sharded_bf16_many_shards() {
    // More shards than blocks: every shard still gets at least one tensor.
    synth_roundtrip(Dtype::BF16, 7, true);
}

/// Every file of a model directory, by name.
fn dir_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| {
            let e = e.expect("entry");
            let name = e.file_name().to_string_lossy().to_string();
            (name, std::fs::read(e.path()).expect("read"))
        })
        .collect()
}

fn marker(dir: &Path) -> serde_json::Value {
    let b = std::fs::read(dir.join(wgpress::model::writer::MARKER)).expect("marker");
    serde_json::from_slice(&b).expect("marker json")
}

#[test]
fn synth_tokenizer_iff_vocab_holds_it() {
    use wgpress::model::synth::TOKENIZER_IDS;
    use wgpress::model::tokenizer::Tokenizer;
    let d = tmp();
    let small = |vocab| SynthSpec {
        hidden: 32,
        intermediate: 64,
        layers: 1,
        heads: 2,
        kv_heads: 1,
        vocab,
        ..SynthSpec::default()
    };
    // Vocabulary exactly the tokenizer's id count: written, loadable, BOS is `<s>` = 1.
    let m = d.path().join("with");
    let spec = small(TOKENIZER_IDS);
    assert!(spec.has_tokenizer());
    synth(&m, &spec);
    assert!(m.join("tokenizer_config.json").is_file());
    let tok = Tokenizer::load(&m, TOKENIZER_IDS).expect("load tokenizer");
    // The constant is the real count (largest id + 1, added tokens included).
    assert_eq!(tok.vocab_size(), TOKENIZER_IDS);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.decode(&[1]).expect("decode"), "<s>");
    let text = "To be, or not to be: that is the question.";
    let ids = tok.encode(text).expect("encode");
    assert!(ids.len() > 3 && ids.iter().all(|&i| (i as usize) < TOKENIZER_IDS));
    assert_eq!(tok.decode(&ids).expect("decode"), text);
    let r = inspect(&m).expect("inspect");
    assert!(r.has_tokenizer);
    Model::open(&m).expect("open");

    // One id short: no tokenizer files at all.
    let m = d.path().join("without");
    let spec = small(TOKENIZER_IDS - 1);
    assert!(!spec.has_tokenizer());
    synth(&m, &spec);
    assert!(!m.join("tokenizer.json").exists());
    assert!(!m.join("tokenizer_config.json").exists());
    Model::open(&m).expect("open");

    // Every named shape can hold it; the large ones have a few outlier channels.
    for name in SynthSpec::SHAPES {
        let s = SynthSpec::named(name).expect("named");
        assert!(s.has_tokenizer(), "{name}");
        assert!(s.outliers > 0 && s.outliers <= 4, "{name}");
    }
}

#[test]
fn synth_outlier_channels_scaled_in_every_block() {
    use wgpress::model::synth::OUTLIER_SCALE;
    let d = tmp();
    let m = d.path().join("m");
    let spec = SynthSpec {
        layers: 3,
        outliers: 3,
        dtype: Dtype::BF16,
        ..SynthSpec::default()
    };
    synth(&m, &spec);
    let chosen = spec.outlier_channels(1234).expect("channels");
    assert_eq!(chosen.len(), 3);
    assert!(chosen.windows(2).all(|w| w[0] < w[1]) && chosen[2] < spec.hidden);
    // Recorded in the marker, and config.json stays a plain HF config.
    let mk = marker(&m);
    let recorded: Vec<usize> =
        serde_json::from_value(mk["outlier_channels"].clone()).expect("list");
    assert_eq!(recorded, chosen);
    assert_eq!(mk["outlier_scale"].as_f64(), Some(OUTLIER_SCALE as f64));
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(m.join("config.json")).expect("cfg")).expect("json");
    assert!(cfg.get("outlier_channels").is_none());

    let model = Model::open(&m).expect("open");
    let big = |v: &[f32]| -> Vec<usize> {
        (0..v.len())
            .filter(|&c| v[c] > OUTLIER_SCALE / 2.0)
            .collect()
    };
    for l in 0..spec.layers {
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            let name = format!("model.layers.{l}.{norm}.weight");
            let v = model.weights.to_f32(&name).expect("norm");
            // Exactly the recorded channels, in every block, each ~OUTLIER_SCALE x the rest.
            assert_eq!(big(&v), chosen, "{name}");
            let rest: Vec<f32> = (0..v.len())
                .filter(|c| !chosen.contains(c))
                .map(|c| v[c])
                .collect();
            let rest_mean = rest.iter().sum::<f32>() / rest.len() as f32;
            assert!((rest_mean - 1.0).abs() < 0.1, "{name}: {rest_mean}");
            for &c in &chosen {
                let ratio = v[c] / rest_mean;
                assert!(
                    ratio > 0.6 * OUTLIER_SCALE && ratio < 1.4 * OUTLIER_SCALE,
                    "{name}[{c}]: {ratio}"
                );
            }
        }
    }
    // The final norm feeds lm_head only: no outliers there.
    let v = model.weights.to_f32("model.norm.weight").expect("norm");
    assert!(big(&v).is_empty());
    drop(model);

    // Without outliers (the default) no norm has a large channel.
    let m0 = d.path().join("m0");
    synth(
        &m0,
        &SynthSpec {
            outliers: 0,
            ..spec.clone()
        },
    );
    let model = Model::open(&m0).expect("open");
    for name in model.weights.names() {
        if name.ends_with("norm.weight") {
            let v = model.weights.to_f32(name).expect("norm");
            assert!(v.iter().all(|&x| x < 2.0), "{name}");
        }
    }
    assert_eq!(marker(&m0)["outlier_channels"], serde_json::json!([]));

    // Another seed, other channels; more outliers than channels is refused.
    assert_ne!(spec.outlier_channels(99).expect("channels"), chosen);
    let e = write_random_llama(
        &d.path().join("bad"),
        &SynthSpec {
            outliers: 65,
            ..SynthSpec::default()
        },
        1,
    )
    .expect_err("must fail");
    assert_names(&e, &["65 outlier channels", "hidden is only 64"]);
}

#[test]
fn synth_bytes_depend_on_seed_only() {
    use wgpress::model::synth::write_random_llama_threads;
    let d = tmp();
    // Embedding of 2048 x 48 = 98304 elements: more than one generation chunk.
    let spec = SynthSpec {
        hidden: 48,
        intermediate: 80,
        heads: 4,
        kv_heads: 2,
        vocab: 2048,
        dtype: Dtype::BF16,
        shards: 2,
        outliers: 2,
        ..SynthSpec::default()
    };
    let a = d.path().join("a");
    let b = d.path().join("b");
    let c = d.path().join("c");
    write_random_llama_threads(&a, &spec, 5, 1).expect("1 thread");
    write_random_llama_threads(&b, &spec, 5, 3).expect("3 threads");
    write_random_llama(&c, &spec, 5).expect("all cores");
    let fa = dir_files(&a);
    assert!(fa.contains_key("model-00002-of-00002.safetensors"));
    assert!(fa.contains_key("tokenizer.json"));
    assert_eq!(fa, dir_files(&b), "1 vs 3 threads");
    assert_eq!(fa, dir_files(&c), "1 thread vs all cores");
    let other = d.path().join("other");
    write_random_llama_threads(&other, &spec, 6, 2).expect("seed 6");
    let fo = dir_files(&other);
    assert_ne!(
        fa["model-00001-of-00002.safetensors"],
        fo["model-00001-of-00002.safetensors"]
    );

    // Every tensor and every chunk draws its own numbers: same-shaped tensors differ, and so do
    // the two chunks of the embedding.
    let model = Model::open(&a).expect("open");
    let q0 = model
        .weights
        .to_f32("model.layers.0.self_attn.q_proj.weight")
        .expect("q0");
    let q1 = model
        .weights
        .to_f32("model.layers.1.self_attn.q_proj.weight")
        .expect("q1");
    assert_ne!(q0[..64], q1[..64]);
    let e = model
        .weights
        .to_f32("model.embed_tokens.weight")
        .expect("embed");
    assert_eq!(e.len(), 98304);
    assert_ne!(e[..64], e[65536..65536 + 64]);
    // Normal, not just the right variance: ~68.3% within one std, and tails beyond 3.5 std
    // (expected about 46 of 98304), which a sum-of-uniforms shortcut would not have.
    let std = 1.0 / 48f32.sqrt();
    let within = e.iter().filter(|x| x.abs() < std).count() as f64 / e.len() as f64;
    assert!((within - 0.6827).abs() < 0.01, "{within}");
    let tails = e.iter().filter(|x| x.abs() > 3.5 * std).count();
    assert!((15..100).contains(&tails), "{tails}");
}

#[test]
fn config_expected_tensors_and_counts() {
    let d = tmp();
    let m = d.path().join("m");
    synth(&m, &SynthSpec::default());
    let cfg = LlamaConfig::load(&m).expect("config");
    assert_eq!(cfg.architecture, "LlamaForCausalLM");
    assert_eq!(cfg.num_key_value_heads, 2);
    assert_eq!(cfg.head_dim, 16);
    assert_eq!(cfg.rope_theta, 10000.0);
    assert!(cfg.raw.get("model_type").is_some());
    let names: Vec<String> = cfg.expected_tensors().into_iter().map(|(n, _)| n).collect();
    // embed + 2 blocks x 9 + norm + lm_head
    assert_eq!(names.len(), 1 + 2 * 9 + 2);
    assert!(cfg.is_linear("model.layers.1.self_attn.k_proj.weight"));
    assert!(cfg.is_linear("model.layers.0.mlp.down_proj.weight"));
    assert!(!cfg.is_linear("model.layers.2.mlp.down_proj.weight"));
    assert!(!cfg.is_linear("model.layers.0.input_layernorm.weight"));
    assert!(!cfg.is_linear("model.layers.0.self_attn.q_proj.bias"));
    assert!(!cfg.is_linear("lm_head.weight"));
    assert!(!cfg.is_linear("model.embed_tokens.weight"));
    // 64*256*2 (embed, lm_head) + 2 * (4*64 q/o... ) computed from shapes:
    let h = 64u64;
    let per_block = h * h + 2 * (32 * h) + h * h + 3 * (160 * h) + 2 * h;
    assert_eq!(cfg.parameter_count(), 2 * 256 * h + 2 * per_block + h);
}

fn write_config(dir: &Path, json: serde_json::Value) {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec(&json).expect("json"),
    )
    .expect("write config");
}

#[test]
fn qwen2_config_has_qkv_biases() {
    let d = tmp();
    let mut j = SynthSpec::default().config_json();
    j["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
    j.as_object_mut().expect("obj").remove("head_dim");
    j.as_object_mut()
        .expect("obj")
        .remove("num_key_value_heads");
    write_config(d.path(), j);
    let cfg = LlamaConfig::load(d.path()).expect("config");
    assert_eq!(cfg.num_key_value_heads, cfg.num_attention_heads);
    assert_eq!(cfg.head_dim, 16);
    let names: Vec<String> = cfg.expected_tensors().into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"model.layers.0.self_attn.q_proj.bias".to_string()));
    assert!(names.contains(&"model.layers.0.self_attn.v_proj.bias".to_string()));
    assert!(!names.contains(&"model.layers.0.self_attn.o_proj.bias".to_string()));
}

#[test]
fn unsupported_architecture() {
    let d = tmp();
    let mut j = SynthSpec::default().config_json();
    j["architectures"] = serde_json::json!(["BertForMaskedLM"]);
    write_config(d.path(), j);
    let e = Model::open(d.path()).expect_err("must fail");
    assert!(
        matches!(e, wgpress::Error::UnsupportedArchitecture(_)),
        "{e}"
    );
    assert_names(&e, &["BertForMaskedLM"]);
}

#[test]
fn config_nonsense_values() {
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "hidden_size",
            serde_json::json!(0),
            "hidden_size must be positive",
        ),
        (
            "num_key_value_heads",
            serde_json::json!(3),
            "does not divide num_attention_heads",
        ),
        ("rms_norm_eps", serde_json::json!(-1.0), "rms_norm_eps"),
        ("vocab_size", serde_json::json!("many"), "vocab_size"),
    ];
    for (key, val, want) in cases {
        let d = tmp();
        let mut j = SynthSpec::default().config_json();
        j[key] = val;
        write_config(d.path(), j);
        let e = LlamaConfig::load(d.path()).expect_err(key);
        assert_names(&e, &[&path_str(&d.path().join("config.json")), want]);
    }
    // Heads not dividing hidden without an explicit head_dim.
    let d = tmp();
    let mut j = SynthSpec::default().config_json();
    j["num_attention_heads"] = serde_json::json!(6);
    j["num_key_value_heads"] = serde_json::json!(6);
    j.as_object_mut().expect("obj").remove("head_dim");
    write_config(d.path(), j);
    let e = LlamaConfig::load(d.path()).expect_err("heads");
    assert_names(&e, &["config.json", "does not divide hidden_size"]);
}

#[test]
fn missing_model_dir() {
    let d = tmp();
    let p = d.path().join("no-such-model");
    let e = Model::open(&p).expect_err("must fail");
    assert_names(&e, &[&path_str(&p), "does not exist"]);
}

#[test]
fn missing_config_json() {
    let d = tmp();
    let m = d.path().join("m");
    synth(&m, &SynthSpec::default());
    std::fs::remove_file(m.join("config.json")).expect("rm");
    let e = Model::open(&m).expect_err("must fail");
    assert_names(&e, &[&path_str(&m.join("config.json")), "missing"]);
}

#[test]
fn model_missing_safetensors() {
    let d = tmp();
    let m = d.path().join("m");
    synth(&m, &SynthSpec::default());
    std::fs::remove_file(m.join("model.safetensors")).expect("rm");
    let e = Model::open(&m).expect_err("must fail");
    assert_names(&e, &[&path_str(&m.join("model.safetensors")), "missing"]);
}

#[test]
fn shape_disagreeing_with_config() {
    let d = tmp();
    let m = d.path().join("m");
    synth(&m, &SynthSpec::default());
    // Claim a bigger FFN than the weights have.
    let mut j = SynthSpec::default().config_json();
    j["intermediate_size"] = serde_json::json!(192);
    write_config(&m, j);
    let e = Model::open(&m).expect_err("must fail");
    assert_names(
        &e,
        &[
            &path_str(&m.join("model.safetensors")),
            "`model.layers.0.mlp.gate_proj.weight`",
            "[160, 64]",
            "[192, 64]",
        ],
    );
}

#[test]
fn missing_tensor_named() {
    let d = tmp();
    let m = d.path().join("m");
    synth(&m, &SynthSpec::default());
    let mut j = SynthSpec::default().config_json();
    j["num_hidden_layers"] = serde_json::json!(3);
    write_config(&m, j);
    let e = Model::open(&m).expect_err("must fail");
    assert_names(
        &e,
        &[
            &path_str(&m.join("model.safetensors")),
            "`model.layers.2.input_layernorm.weight`",
            "missing",
        ],
    );
}

#[test]
fn inspect_report_lists_everything() {
    let d = tmp();
    let m = d.path().join("m");
    synth(
        &m,
        &SynthSpec {
            dtype: Dtype::BF16,
            shards: 2,
            ..SynthSpec::default()
        },
    );
    let r = inspect(&m).expect("inspect");
    assert!(!r.has_tokenizer);
    assert_eq!(r.files.len(), 2);
    assert_eq!(r.total_bytes, r.parameter_count * 2);
    let text = r.to_string();
    assert!(text.contains("LlamaForCausalLM"), "{text}");
    assert!(text.contains("tokenizer.json missing"), "{text}");
    assert!(text.contains("K ("), "{text}");
    let line = text
        .lines()
        .find(|l| l.contains("model.layers.1.mlp.up_proj.weight"))
        .expect("tensor line");
    assert!(
        line.contains("BF16") && line.contains("[160, 64]"),
        "{line}"
    );
    assert_eq!(wgpress::model::human_count(3_710_000), "3.71 M");
}
