//! GGUF v3 export (DESIGN.md section 5; what llama.cpp, ollama and LM Studio load) and the crate's
//! GGUF parser, which our round-trip tests and `wgpress eval` use.
//!
//! The parser lives here, next to the writer, rather than in `model/`: the two halves share the
//! type table, the block layouts, the tensor-name map and llama.cpp's attn_q/attn_k row
//! permutation, and keeping them in one file keeps that agreement checkable in one place.
//! `model/` only calls [`read_gguf_dequantized`] and [`gguf_config`].
//!
//! The file: "GGUF", version 3, u64 tensor and key-value counts; metadata (`general.*`,
//! `llama.*` hyper-parameters, `tokenizer.ggml.*` from tokenizer.json for byte-level BPE);
//! tensor infos with dimensions reversed (ne0 = in); data aligned to 32 bytes. Tensor types:
//! F32 (1-D tensors: norms, biases), F16/BF16/F32 (other unquantized tensors, as asked) and, for
//! the quantized linears, straight from our grid (group 32, static g_idx):
//! - Q4_0 `{f16 d; u8 qs[16]}`, x = (q − 8)·d: 4 bits symmetric (our zero is 8), d = scale: exact;
//! - Q4_1 `{f16 d; f16 m; u8 qs[16]}`, x = q·d + m: 4 bits asymmetric, d = scale,
//!   m = f16(−zero·scale): NOT exact, |m + zero·scale| ≤ 2^−11·zero·scale (one f16 rounding);
//! - Q8_0 `{f16 d; i8 qs[32]}`, x = q·d: 8 bits symmetric, qs = q − 128 (our zero): exact;
//!
//! with nibble order qs[j] = q[j] | q[j+16] << 4. Anything else (another group size, act-order,
//! 8-bit asymmetric, 2/3 bits) is an error naming the settings that would work.
//!
//! This module does not quantize, does not read safetensors, and writes only through
//! [`OutputDir`] (nothing is committed here). The parser never trusts a length or offset from
//! the file: every read is bounds-checked and every inconsistency is an error naming the file.

use crate::error::{Error, Result};
use crate::export::dense::{NamedTensor, encode_floats};
use crate::export::gptq::ExportTensor;
use crate::export::{check_quantized, first_act_order_column};
use crate::model::config::LlamaConfig;
use crate::model::writer::{BodyFile, OutputDir};
use crate::quant::{QuantSpec, QuantizedTensor};
use half::{bf16, f16};
use safetensors::Dtype;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// File name of the GGUF file inside an output directory.
pub const GGUF_FILE: &str = "model.gguf";
/// Data alignment we write (and the format's default).
pub const ALIGNMENT: usize = 32;
const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;
/// Elements per block of the quantized types we write.
const QK: usize = 32;

/// The ggml tensor types this module writes and reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    BF16,
}

impl GgmlType {
    /// The type id in the file.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::BF16 => 30,
        }
    }

    fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// (elements per block, bytes per block).
    fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (QK, 18),
            GgmlType::Q4_1 => (QK, 20),
            GgmlType::Q8_0 => (QK, 34),
        }
    }

    /// llama.cpp's `general.file_type` for a model whose linears are all this type.
    fn file_type(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 7,
            GgmlType::BF16 => 32,
        }
    }
}

/// The GGUF block type a grid maps onto exactly (Q4_0, Q8_0) or nearly (Q4_1), or an error naming
/// the settings that work.
pub fn gguf_type_for(spec: &QuantSpec) -> Result<GgmlType> {
    let t = match (spec.bits, spec.group, spec.sym) {
        (4, Some(32), true) => Some(GgmlType::Q4_0),
        (4, Some(32), false) => Some(GgmlType::Q4_1),
        (8, Some(32), true) => Some(GgmlType::Q8_0),
        _ => None,
    };
    t.ok_or_else(|| {
        Error::invalid(format!(
            "GGUF export has no block type for {}-bit {} {}: use --bits 4 --group 32 --sym (Q4_0, exact), --bits 4 --group 32 (Q4_1) or --bits 8 --group 32 --sym (Q8_0, exact)",
            spec.bits,
            spec.group
                .map(|g| format!("group {g}"))
                .unwrap_or_else(|| "per-channel".into()),
            if spec.sym { "symmetric" } else { "asymmetric" }
        ))
    })
}

/// Which llama.cpp row permutation a tensor needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Permute {
    /// attn_q: heads = num_attention_heads.
    Q,
    /// attn_k: heads = num_key_value_heads.
    K,
}

/// Whole-tensor names outside the blocks: (Hugging Face, llama.cpp).
const TOP_NAMES: [(&str, &str); 3] = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// Block modules: (Hugging Face, llama.cpp, row permutation llama.cpp applies).
const BLOCK_NAMES: [(&str, &str, Option<Permute>); 9] = [
    ("input_layernorm", "attn_norm", None),
    ("self_attn.q_proj", "attn_q", Some(Permute::Q)),
    ("self_attn.k_proj", "attn_k", Some(Permute::K)),
    ("self_attn.v_proj", "attn_v", None),
    ("self_attn.o_proj", "attn_output", None),
    ("post_attention_layernorm", "ffn_norm", None),
    ("mlp.gate_proj", "ffn_gate", None),
    ("mlp.up_proj", "ffn_up", None),
    ("mlp.down_proj", "ffn_down", None),
];

/// Translates a tensor name between the two conventions through the tables above: `to_gguf`
/// picks the direction.
fn translate(name: &str, to_gguf: bool) -> Option<(String, Option<Permute>)> {
    let pick = |hf: &'static str, g: &'static str| if to_gguf { (hf, g) } else { (g, hf) };
    for (hf, g) in TOP_NAMES {
        let (from, to) = pick(hf, g);
        if name == from {
            return Some((to.to_string(), None));
        }
    }
    let (from_prefix, to_prefix) = pick("model.layers.", "blk.");
    let rest = name.strip_prefix(from_prefix)?;
    let (idx, rest) = rest.split_once('.')?;
    if idx.is_empty() || !idx.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (module, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    BLOCK_NAMES.iter().find_map(|&(hf, g, p)| {
        let (from, to) = pick(hf, g);
        (module == from).then(|| (format!("{to_prefix}{idx}.{to}.{kind}"), p))
    })
}

/// The llama.cpp name of a Hugging Face tensor, and the row permutation it needs.
fn gguf_name(hf: &str) -> Option<(String, Option<Permute>)> {
    translate(hf, true)
}

/// The Hugging Face name of a llama.cpp tensor (inverse of [`gguf_name`]).
fn hf_name(g: &str) -> Option<(String, Option<Permute>)> {
    translate(g, false)
}

/// For llama.cpp's row order of attn_q/attn_k (convert_hf_to_gguf's `permute`:
/// `w.reshape(n, 2, rows/n/2, ...).swapaxes(1, 2)`): the Hugging Face row that lands at row
/// `new`. Row (h, i, j) = h·hd + 2i + j of the file is row h·hd + j·hd/2 + i of the checkpoint.
fn permuted_source(new: usize, rows: usize, heads: usize) -> usize {
    let hd = rows / heads;
    let (h, r) = (new / hd, new % hd);
    let (i, j) = (r / 2, r % 2);
    h * hd + j * (hd / 2) + i
}

fn check_permutable(rows: usize, heads: usize, what: &str) -> Result<()> {
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(Error::invalid(format!(
            "{what}: {rows} rows do not split into {heads} heads of even size (llama.cpp's RoPE row order needs that)"
        )));
    }
    Ok(())
}

/// Reorders rows of `row_bytes` bytes each from Hugging Face to llama.cpp order.
fn permute_rows(data: &[u8], row_bytes: usize, heads: usize) -> Vec<u8> {
    let rows = data.len() / row_bytes;
    let mut out = Vec::with_capacity(data.len());
    for new in 0..rows {
        let src = permuted_source(new, rows, heads);
        out.extend_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
    }
    out
}

/// Reorders f32 rows from llama.cpp back to Hugging Face order.
fn unpermute_rows(data: &[f32], cols: usize, heads: usize) -> Vec<f32> {
    let rows = data.len() / cols;
    let mut out = vec![0f32; data.len()];
    for new in 0..rows {
        let src = permuted_source(new, rows, heads);
        out[src * cols..(src + 1) * cols].copy_from_slice(&data[new * cols..(new + 1) * cols]);
    }
    out
}

/// Encodes the quantized tensor's rows as GGUF blocks (rows in the checkpoint's order).
fn encode_blocks(t: &QuantizedTensor, ty: GgmlType) -> Vec<u8> {
    let (_, bb) = ty.block();
    let ng = t.n_groups();
    let mut out = Vec::with_capacity(t.rows * ng * bb);
    for r in 0..t.rows {
        for b in 0..ng {
            let q = &t.q[r * t.cols + b * QK..r * t.cols + (b + 1) * QK];
            let (s, z) = (t.scales[r * ng + b], t.zeros[r * ng + b]);
            out.extend_from_slice(&f16::from_f32(s).to_le_bytes());
            match ty {
                GgmlType::Q8_0 => out.extend(q.iter().map(|&v| (v as i32 - 128) as i8 as u8)),
                _ => {
                    if ty == GgmlType::Q4_1 {
                        out.extend_from_slice(&f16::from_f32(-(z as f32) * s).to_le_bytes());
                    }
                    out.extend((0..16).map(|j| q[j] | (q[j + 16] << 4)));
                }
            }
        }
    }
    out
}

/// A metadata value to write.
#[derive(Clone, Debug)]
enum Kv {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    ArrStr(Vec<String>),
    ArrI32(Vec<i32>),
}

fn put_str(w: &mut Vec<u8>, s: &str) {
    w.extend_from_slice(&(s.len() as u64).to_le_bytes());
    w.extend_from_slice(s.as_bytes());
}

fn put_kv(w: &mut Vec<u8>, key: &str, v: &Kv) {
    put_str(w, key);
    let ty = |w: &mut Vec<u8>, t: u32| w.extend_from_slice(&t.to_le_bytes());
    match v {
        Kv::U32(x) => {
            ty(w, 4);
            w.extend_from_slice(&x.to_le_bytes());
        }
        Kv::F32(x) => {
            ty(w, 6);
            w.extend_from_slice(&x.to_le_bytes());
        }
        Kv::Bool(x) => {
            ty(w, 7);
            w.push(*x as u8);
        }
        Kv::Str(s) => {
            ty(w, 8);
            put_str(w, s);
        }
        Kv::ArrStr(a) => {
            ty(w, 9);
            ty(w, 8);
            w.extend_from_slice(&(a.len() as u64).to_le_bytes());
            for s in a {
                put_str(w, s);
            }
        }
        Kv::ArrI32(a) => {
            ty(w, 9);
            ty(w, 5);
            w.extend_from_slice(&(a.len() as u64).to_le_bytes());
            for x in a {
                w.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
}

/// One encoded tensor on its way to the file.
struct Pending {
    name: String,
    /// Dimensions in GGUF order (ne0 = innermost = input columns).
    ne: Vec<u64>,
    ty: GgmlType,
    data: Vec<u8>,
    permute: Option<Permute>,
}

/// A tensor already in the data section: its header entry.
struct Written {
    name: String,
    ne: Vec<u64>,
    ty: GgmlType,
    offset: u64,
}

/// Builds a GGUF file tensor by tensor: each [`GgufWriter::add`] encodes, puts attn_q/attn_k rows
/// in llama.cpp's order and writes the tensor's data at once (a [`BodyFile`]: the writer holds one
/// tensor, never the model); `finish` adds the metadata and tokenizer and writes the header, so
/// `model.gguf` is complete in the (uncommitted) output directory.
pub struct GgufWriter<'a> {
    out: &'a OutputDir,
    plain_dtype: Dtype,
    config: LlamaConfig,
    tokenizer_dir: PathBuf,
    model_name: String,
    qtype: Option<GgmlType>,
    names: BTreeSet<String>,
    written: Vec<Written>,
    data: BodyFile,
}

impl<'a> GgufWriter<'a> {
    /// `plain_dtype` (F16, BF16 or F32) is the type of unquantized matrices (embeddings, an
    /// unquantized output); 1-D tensors (norms, biases) are always F32, as llama.cpp expects.
    /// The metadata come from `config` (and `general.name` = `name`), the tokenizer from
    /// `tokenizer_dir/tokenizer.json`; both are checked here, before any tensor is made.
    pub fn new(
        out: &'a OutputDir,
        plain_dtype: Dtype,
        config: &LlamaConfig,
        tokenizer_dir: &Path,
        name: &str,
    ) -> Result<Self> {
        if !matches!(plain_dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32) {
            return Err(Error::invalid(format!(
                "GGUF export writes unquantized tensors as F16, BF16 or F32, not {plain_dtype:?}"
            )));
        }
        check_config(config, tokenizer_dir)?;
        Ok(GgufWriter {
            out,
            plain_dtype,
            config: config.clone(),
            tokenizer_dir: tokenizer_dir.to_path_buf(),
            model_name: name.to_string(),
            qtype: None,
            names: BTreeSet::new(),
            written: Vec::new(),
            data: BodyFile::create(out, GGUF_FILE)?,
        })
    }

    fn file(&self) -> PathBuf {
        self.out.final_path().join(GGUF_FILE)
    }

    /// Puts attn_q/attn_k rows in llama.cpp's order (it needs the head counts from the config)
    /// and writes the tensor's data, padded to the alignment.
    fn push(&mut self, p: Pending) -> Result<()> {
        if self.names.contains(&p.name) {
            return Err(Error::tensor(self.file(), &p.name, "appears twice"));
        }
        let mut data = p.data;
        if let Some(perm) = p.permute {
            let heads = match perm {
                Permute::Q => self.config.num_attention_heads,
                Permute::K => self.config.num_key_value_heads,
            };
            // ne = [cols, rows] for a matrix, [rows] for a bias.
            let rows = *p.ne.last().unwrap_or(&1) as usize;
            check_permutable(rows, heads, &p.name)?;
            data = permute_rows(&data, data.len() / rows, heads);
        }
        self.names.insert(p.name.clone());
        let offset = self.data.position();
        self.data.write(&data)?;
        let pad = data.len().next_multiple_of(ALIGNMENT) - data.len();
        self.data.write(&[0u8; ALIGNMENT][..pad])?;
        self.written.push(Written {
            name: p.name,
            ne: p.ne,
            ty: p.ty,
            offset,
        });
        Ok(())
    }

    /// Validates, maps to the llama.cpp name and encodes one tensor. Hugging Face's
    /// `rotary_emb.inv_freq` buffers are skipped (llama.cpp computes them); any other name
    /// without a llama.cpp counterpart is an error.
    pub fn add(&mut self, t: &ExportTensor) -> Result<()> {
        let file = self.file();
        match t {
            ExportTensor::Plain { name, shape, data } => {
                if name.ends_with("rotary_emb.inv_freq") {
                    log::info!("GGUF export: skipping `{name}` (llama.cpp computes RoPE itself)");
                    return Ok(());
                }
                let (gname, permute) = gguf_name(name)
                    .ok_or_else(|| Error::tensor(&file, name, "has no llama.cpp (GGUF) name"))?;
                if shape.iter().product::<usize>() != data.len()
                    || shape.is_empty()
                    || shape.len() > 2
                {
                    return Err(Error::tensor(
                        &file,
                        name,
                        format!(
                            "shape {shape:?} with {} values is not a 1-D or 2-D tensor",
                            data.len()
                        ),
                    ));
                }
                let (dtype, ty) = match (shape.len(), self.plain_dtype) {
                    (1, _) | (_, Dtype::F32) => (Dtype::F32, GgmlType::F32),
                    (_, Dtype::F16) => (Dtype::F16, GgmlType::F16),
                    _ => (Dtype::BF16, GgmlType::BF16),
                };
                let bytes = encode_floats(data, dtype, &file, name)?;
                self.push(Pending {
                    name: gname,
                    ne: shape.iter().rev().map(|&d| d as u64).collect(),
                    ty,
                    data: bytes,
                    permute,
                })
            }
            ExportTensor::Quantized { name, tensor, bias } => {
                let err = |p: String| Error::tensor(&file, name, p);
                if name.ends_with(".weight") {
                    return Err(err(
                        "give the module prefix (without `.weight`) for a quantized tensor".into(),
                    ));
                }
                let wname = format!("{name}.weight");
                let (gname, permute) =
                    gguf_name(&wname).ok_or_else(|| err("has no llama.cpp (GGUF) name".into()))?;
                let ty = gguf_type_for(&tensor.spec).map_err(|e| err(e.to_string()))?;
                if let Some(prev) = self.qtype
                    && prev != ty
                {
                    return Err(err(format!(
                        "would be {ty:?} but earlier tensors are {prev:?}; one export uses one block type"
                    )));
                }
                tensor
                    .spec
                    .check_cols(tensor.cols, name)
                    .map_err(|e| err(e.to_string()))?;
                check_quantized(tensor, &file, name)?;
                if let Some(c) = first_act_order_column(tensor) {
                    return Err(err(format!(
                        "g_idx[{c}] = {} is not {c} / 32: GGUF has no g_idx, so act-order (a column permutation of the groups) cannot be written; quantize without act-order (or with static groups)",
                        tensor.g_idx[c]
                    )));
                }
                let half = 1u32 << (tensor.spec.bits - 1);
                if tensor.spec.sym
                    && let Some(i) = tensor.zeros.iter().position(|&z| z != half)
                {
                    return Err(err(format!(
                        "symmetric grid with zero {} at flat group {i}; {ty:?} assumes {half}",
                        tensor.zeros[i]
                    )));
                }
                if ty == GgmlType::Q4_1 {
                    for (i, (&s, &z)) in tensor.scales.iter().zip(&tensor.zeros).enumerate() {
                        if f16::from_f32(-(z as f32) * s).is_infinite() {
                            return Err(err(format!(
                                "Q4_1 minimum −{z}·{s} of flat group {i} overflows f16"
                            )));
                        }
                    }
                }
                self.push(Pending {
                    name: gname,
                    ne: vec![tensor.cols as u64, tensor.rows as u64],
                    ty,
                    data: encode_blocks(tensor, ty),
                    permute,
                })?;
                if let Some(b) = bias {
                    if b.len() != tensor.rows {
                        return Err(err(format!(
                            "bias has {} values for {} rows",
                            b.len(),
                            tensor.rows
                        )));
                    }
                    let bname = format!("{name}.bias");
                    let (gb, bp) = gguf_name(&bname)
                        .ok_or_else(|| err("bias has no llama.cpp (GGUF) name".into()))?;
                    let data = encode_floats(b, Dtype::F32, &file, &bname)?;
                    self.push(Pending {
                        name: gb,
                        ne: vec![b.len() as u64],
                        ty: GgmlType::F32,
                        data,
                        permute: bp,
                    })?;
                }
                self.qtype = Some(ty);
                Ok(())
            }
        }
    }

    /// Completes `model.gguf`: metadata from the config (and `general.name`), the tokenizer, the
    /// tensor table, then the data written by `add` (aligned to 32).
    pub fn finish(self) -> Result<()> {
        let config = &self.config;
        let name = self.model_name.as_str();
        let tokenizer_dir = self.tokenizer_dir.as_path();
        let qtype = self
            .qtype
            .ok_or_else(|| Error::invalid("GGUF export needs at least one quantized tensor"))?;
        let mut kv: Vec<(String, Kv)> = vec![
            ("general.architecture".into(), Kv::Str("llama".into())),
            ("general.name".into(), Kv::Str(name.into())),
            ("general.alignment".into(), Kv::U32(ALIGNMENT as u32)),
            ("general.file_type".into(), Kv::U32(qtype.file_type())),
            ("general.quantization_version".into(), Kv::U32(2)),
        ];
        let u32_of = |v: usize, what: &str| -> Result<Kv> {
            u32::try_from(v)
                .map(Kv::U32)
                .map_err(|_| Error::invalid(format!("{what} {v} does not fit GGUF's u32")))
        };
        let c = config;
        for (k, v) in [
            ("context_length", c.max_position_embeddings),
            ("embedding_length", c.hidden_size),
            ("block_count", c.num_hidden_layers),
            ("feed_forward_length", c.intermediate_size),
            ("attention.head_count", c.num_attention_heads),
            ("attention.head_count_kv", c.num_key_value_heads),
            ("rope.dimension_count", c.head_dim),
            ("vocab_size", c.vocab_size),
        ] {
            kv.push((format!("llama.{k}"), u32_of(v, k)?));
        }
        if c.head_dim * c.num_attention_heads != c.hidden_size {
            kv.push((
                "llama.attention.key_length".into(),
                u32_of(c.head_dim, "head_dim")?,
            ));
            kv.push((
                "llama.attention.value_length".into(),
                u32_of(c.head_dim, "head_dim")?,
            ));
        }
        kv.push(("llama.rope.freq_base".into(), Kv::F32(c.rope_theta as f32)));
        kv.push((
            "llama.attention.layer_norm_rms_epsilon".into(),
            Kv::F32(c.rms_norm_eps as f32),
        ));
        kv.extend(tokenizer_kv(tokenizer_dir, c)?);

        let mut head = Vec::new();
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.extend_from_slice(&(self.written.len() as u64).to_le_bytes());
        head.extend_from_slice(&(kv.len() as u64).to_le_bytes());
        for (k, v) in &kv {
            put_kv(&mut head, k, v);
        }
        for t in &self.written {
            put_str(&mut head, &t.name);
            head.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
            for d in &t.ne {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&t.ty.id().to_le_bytes());
            head.extend_from_slice(&t.offset.to_le_bytes());
        }
        head.resize(head.len().next_multiple_of(ALIGNMENT), 0);
        self.data.finish(&head)
    }
}

/// Checks that a model can be written as GGUF `llama` (before anything is written): a Llama or
/// Mistral architecture (Qwen2 is a different llama.cpp architecture), no rope scaling, and a
/// byte-level BPE tokenizer.json in `tokenizer_dir`.
pub fn check_config(config: &LlamaConfig, tokenizer_dir: &Path) -> Result<()> {
    if !matches!(
        config.architecture.as_str(),
        "LlamaForCausalLM" | "MistralForCausalLM"
    ) {
        return Err(Error::invalid(format!(
            "GGUF export writes the llama.cpp `llama` architecture (LlamaForCausalLM, MistralForCausalLM), not {}",
            config.architecture
        )));
    }
    if let Some(r) = &config.rope_scaling {
        return Err(Error::invalid(format!(
            "GGUF export does not write rope scaling (config.json has rope_scaling {r})"
        )));
    }
    if config.o_bias || config.mlp_bias {
        return Err(Error::invalid(
            "GGUF `llama` has no o_proj or MLP biases; this model has them",
        ));
    }
    tokenizer_json(tokenizer_dir).map(|_| ())
}

/// tokenizer.json, checked to be byte-level BPE.
fn tokenizer_json(dir: &Path) -> Result<(PathBuf, serde_json::Value)> {
    let path = dir.join("tokenizer.json");
    let bytes = std::fs::read(&path).map_err(|e| {
        Error::io(
            &path,
            std::io::Error::new(
                e.kind(),
                format!("GGUF embeds the tokenizer and needs tokenizer.json: {e}"),
            ),
        )
    })?;
    let v: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::format(&path, format!("invalid JSON: {e}")))?;
    let model_type = v.pointer("/model/type").and_then(|t| t.as_str());
    let byte_level = v
        .get("pre_tokenizer")
        .map(|p| p.to_string().contains("\"ByteLevel\""))
        .unwrap_or(false);
    if model_type != Some("BPE") || !byte_level {
        return Err(Error::format(
            &path,
            format!(
                "GGUF export writes byte-level BPE tokenizers (tokenizer.ggml.model `gpt2`); this one is {} with {} pre-tokenizer",
                model_type.unwrap_or("of unknown type"),
                if byte_level {
                    "a ByteLevel"
                } else {
                    "no ByteLevel"
                }
            ),
        ));
    }
    Ok((path, v))
}

/// `tokenizer.ggml.*` for a byte-level BPE tokenizer.json: tokens by id (ids the tokenizer does not
/// use up to vocab_size become `[PAD<id>]`, type UNUSED, as llama.cpp's converter does), token
/// types (NORMAL, CONTROL for special added tokens, USER_DEFINED for other added tokens), merges,
/// bos/eos ids from config.json, and add_bos_token from tokenizer_config.json when it says.
fn tokenizer_kv(dir: &Path, config: &LlamaConfig) -> Result<Vec<(String, Kv)>> {
    let (path, v) = tokenizer_json(dir)?;
    let n = config.vocab_size;
    let mut tokens: Vec<Option<String>> = vec![None; n];
    let mut types = vec![1i32; n];
    let bad = |p: String| Error::format(&path, p);
    let vocab = v
        .pointer("/model/vocab")
        .and_then(|x| x.as_object())
        .ok_or_else(|| bad("model.vocab is not an object".into()))?;
    let mut place = |tok: &str, id: Option<u64>, ty: i32| -> Result<()> {
        let id = id
            .and_then(|i| usize::try_from(i).ok())
            .ok_or_else(|| bad(format!("token {tok:?} has no valid id")))?;
        if id >= n {
            return Err(bad(format!(
                "token {tok:?} has id {id} but config.json vocab_size is {n}"
            )));
        }
        tokens[id] = Some(tok.to_string());
        types[id] = ty;
        Ok(())
    };
    for (tok, id) in vocab {
        place(tok, id.as_u64(), 1)?;
    }
    for a in v
        .get("added_tokens")
        .and_then(|x| x.as_array())
        .into_iter()
        .flatten()
    {
        let content = a
            .get("content")
            .and_then(|c| c.as_str())
            .ok_or_else(|| bad("an added token has no content".into()))?;
        let special = a.get("special").and_then(|s| s.as_bool()).unwrap_or(false);
        place(
            content,
            a.get("id").and_then(|i| i.as_u64()),
            if special { 3 } else { 4 },
        )?;
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = 5;
                format!("[PAD{i}]")
            })
        })
        .collect();
    let mut merges = Vec::new();
    for m in v
        .pointer("/model/merges")
        .and_then(|x| x.as_array())
        .into_iter()
        .flatten()
    {
        match m {
            serde_json::Value::String(s) => merges.push(s.clone()),
            serde_json::Value::Array(p) if p.len() == 2 => {
                let (a, b) = (p[0].as_str(), p[1].as_str());
                match (a, b) {
                    (Some(a), Some(b)) => merges.push(format!("{a} {b}")),
                    _ => return Err(bad(format!("merge {m} is not a pair of strings"))),
                }
            }
            _ => return Err(bad(format!("merge {m} is neither \"a b\" nor [a, b]"))),
        }
    }
    let pre = llama_cpp_pre(v.get("pre_tokenizer")).unwrap_or_else(|| {
        log::warn!(
            "{}: pre-tokenizer is neither ByteLevel nor [Digits(individual), ByteLevel]; writing tokenizer.ggml.pre `default` (llama.cpp will split text differently)",
            path.display()
        );
        "default"
    });
    let mut kv = vec![
        ("tokenizer.ggml.model".to_string(), Kv::Str("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), Kv::Str(pre.into())),
        ("tokenizer.ggml.tokens".to_string(), Kv::ArrStr(tokens)),
        ("tokenizer.ggml.token_type".to_string(), Kv::ArrI32(types)),
        ("tokenizer.ggml.merges".to_string(), Kv::ArrStr(merges)),
    ];
    let id_of = |key: &str| -> Option<u32> {
        match config.raw.get(key)? {
            serde_json::Value::Array(a) => a.first()?.as_u64(),
            x => x.as_u64(),
        }
        .and_then(|i| u32::try_from(i).ok())
        .filter(|&i| (i as usize) < n)
    };
    if let Some(b) = id_of("bos_token_id") {
        kv.push(("tokenizer.ggml.bos_token_id".into(), Kv::U32(b)));
    }
    if let Some(e) = id_of("eos_token_id") {
        kv.push(("tokenizer.ggml.eos_token_id".into(), Kv::U32(e)));
    }
    let add_bos = std::fs::read(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|c| c.get("add_bos_token").and_then(|a| a.as_bool()));
    if let Some(a) = add_bos {
        kv.push(("tokenizer.ggml.add_bos_token".into(), Kv::Bool(a)));
    }
    Ok(kv)
}

/// The `tokenizer.ggml.pre` whose regexes in llama.cpp (llama-vocab.cpp) split text as this
/// tokenizer.json pre-tokenizer does, for the two byte-level layouts we recognise:
/// - `ByteLevel` (GPT-2 regex) -> `gpt-2`: the GPT-2 regex alone;
/// - `Sequence[Digits(individual_digits), ByteLevel]` (SmolLM, StarCoder) -> `smollm`: `\p{N}`
///   (every digit on its own), then the GPT-2 regex; what convert_hf_to_gguf writes for SmolLM2.
///
/// The `default` pre-type is not a neutral fallback: it first splits off runs of punctuation, so
/// ` 'quotes'` becomes ` ` + `'` + ... where the Hugging Face tokenizer keeps ` '` together.
fn llama_cpp_pre(p: Option<&serde_json::Value>) -> Option<&'static str> {
    let byte_level = |x: &serde_json::Value| {
        x.get("type").and_then(|t| t.as_str()) == Some("ByteLevel")
            && x.get("use_regex").and_then(|u| u.as_bool()) != Some(false)
    };
    let p = p?;
    if byte_level(p) {
        return Some("gpt-2");
    }
    match p.get("pretokenizers").and_then(|s| s.as_array()) {
        Some(seq)
            if p.get("type").and_then(|t| t.as_str()) == Some("Sequence")
                && seq.len() == 2
                && seq[0].get("type").and_then(|t| t.as_str()) == Some("Digits")
                && seq[0].get("individual_digits").and_then(|d| d.as_bool()) == Some(true)
                && byte_level(&seq[1]) =>
        {
            Some("smollm")
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Parser
// ---------------------------------------------------------------------------------------------

/// A metadata value as read.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(x) => Some(x as u64),
            GgufValue::U16(x) => Some(x as u64),
            GgufValue::U32(x) => Some(x as u64),
            GgufValue::U64(x) => Some(x),
            GgufValue::I8(x) => u64::try_from(x).ok(),
            GgufValue::I16(x) => u64::try_from(x).ok(),
            GgufValue::I32(x) => u64::try_from(x).ok(),
            GgufValue::I64(x) => u64::try_from(x).ok(),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(x) => Some(x as f64),
            GgufValue::F64(x) => Some(x),
            _ => self.as_u64().map(|x| x as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// One tensor's header entry.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// Dimensions in GGUF order (ne0 first).
    pub ne: Vec<u64>,
    pub ty: GgmlType,
    /// Byte range in the file.
    pub start: usize,
    pub end: usize,
}

/// A parsed GGUF file (memory-mapped; tensor data is read on demand).
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
    map: memmap2::Mmap,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("kv", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// A bounds-checked reader over the mapped bytes.
struct Cursor<'b> {
    buf: &'b [u8],
    pos: usize,
    path: &'b Path,
}

impl<'b> Cursor<'b> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'b [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(e) => {
                let s = &self.buf[self.pos..e];
                self.pos = e;
                Ok(s)
            }
            None => Err(Error::format(
                self.path,
                format!(
                    "truncated: {what} needs {n} bytes at offset {} but the file has {}",
                    self.pos,
                    self.buf.len()
                ),
            )),
        }
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    /// A count that must be backed by at least `min_each` bytes per item still in the file.
    fn count(&mut self, min_each: usize, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_each as u64) > left {
            return Err(Error::format(
                self.path,
                format!(
                    "{what} {n} at offset {} is more than the {left} bytes left can hold",
                    self.pos - 8
                ),
            ));
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(1, what)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| Error::format(self.path, format!("{what} is not UTF-8")))
    }
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::U8(self.u8(key)?),
            1 => GgufValue::I8(self.u8(key)? as i8),
            2 => GgufValue::U16(self.u16(key)?),
            3 => GgufValue::I16(self.u16(key)? as i16),
            4 => GgufValue::U32(self.u32(key)?),
            5 => GgufValue::I32(self.u32(key)? as i32),
            6 => GgufValue::F32(f32::from_bits(self.u32(key)?)),
            7 => match self.u8(key)? {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => {
                    return Err(Error::format(
                        self.path,
                        format!("key `{key}`: bool byte {b} is neither 0 nor 1"),
                    ));
                }
            },
            8 => GgufValue::Str(self.string(key)?),
            9 => {
                if depth > 2 {
                    return Err(Error::format(
                        self.path,
                        format!("key `{key}`: arrays nested deeper than 2"),
                    ));
                }
                let et = self.u32(key)?;
                let n = self.count(1, key)?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(et, key, depth + 1)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::U64(self.u64(key)?),
            11 => GgufValue::I64(self.u64(key)? as i64),
            12 => GgufValue::F64(f64::from_bits(self.u64(key)?)),
            t => {
                return Err(Error::format(
                    self.path,
                    format!("key `{key}`: unknown value type {t}"),
                ));
            }
        })
    }
}

impl GgufFile {
    /// Maps and parses `path`: header, metadata, tensor infos; checks every tensor's type, size,
    /// alignment and byte range.
    pub fn open(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only private map; the file is not modified while we read it (the same
        // contract as the safetensors reader).
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
        let mut c = Cursor {
            buf: &map,
            pos: 0,
            path,
        };
        if c.take(4, "magic")? != MAGIC {
            return Err(Error::format(
                path,
                "not a GGUF file (magic is not \"GGUF\")",
            ));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::format(
                path,
                format!("GGUF version {version} is not supported (2 or 3)"),
            ));
        }
        // Each tensor info is at least 8 + 4 + 4 + 8 bytes, each key-value at least 8 + 4 + 1.
        let n_tensors = c.count(24, "tensor count")?;
        let n_kv = c.count(13, "key-value count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32(&key)?;
            let v = c.value(ty, &key, 0)?;
            if metadata.insert(key.clone(), v).is_some() {
                return Err(Error::format(
                    path,
                    format!("metadata key `{key}` appears twice"),
                ));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
                _ => {
                    return Err(Error::format(
                        path,
                        format!("general.alignment {v:?} is not a power of two"),
                    ));
                }
            },
        };
        let mut raw = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let nd = c.u32(&name)? as usize;
            if !(1..=4).contains(&nd) {
                return Err(Error::tensor(
                    path,
                    &name,
                    format!("{nd} dimensions (1 to 4 expected)"),
                ));
            }
            let mut ne = Vec::with_capacity(nd);
            for _ in 0..nd {
                ne.push(c.u64(&name)?);
            }
            let tid = c.u32(&name)?;
            let off = c.u64(&name)?;
            raw.push((name, ne, tid, off));
        }
        let data_start = c.pos.next_multiple_of(alignment);
        let mut tensors = Vec::with_capacity(raw.len());
        let mut seen = BTreeSet::new();
        for (name, ne, tid, off) in raw {
            let t = |p: String| Error::tensor(path, &name, p);
            if !seen.insert(name.clone()) {
                return Err(t("appears twice".into()));
            }
            let ty = GgmlType::from_id(tid).ok_or_else(|| {
                t(format!(
                    "type {tid} is not one this reader handles (F32, F16, BF16, Q4_0, Q4_1, Q8_0)"
                ))
            })?;
            let (bs, bb) = ty.block();
            let n = ne
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| t(format!("dimensions {ne:?} overflow")))?;
            if ne[0] % bs as u64 != 0 {
                return Err(t(format!(
                    "ne0 = {} is not a multiple of {ty:?}'s block of {bs}",
                    ne[0]
                )));
            }
            let bytes = (n / bs as u64)
                .checked_mul(bb as u64)
                .ok_or_else(|| t("size overflows".into()))?;
            if off % alignment as u64 != 0 {
                return Err(t(format!("offset {off} is not aligned to {alignment}")));
            }
            let start = (data_start as u64).checked_add(off);
            let end = start.and_then(|s| s.checked_add(bytes));
            match (start, end) {
                (Some(s), Some(e)) if e <= map.len() as u64 => tensors.push(GgufTensorInfo {
                    name: name.clone(),
                    ne,
                    ty,
                    start: s as usize,
                    end: e as usize,
                }),
                _ => {
                    return Err(t(format!(
                        "data at offset {off} ({bytes} bytes) goes past the end of the file ({} bytes; truncated?)",
                        map.len()
                    )));
                }
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            map,
        })
    }

    pub fn info(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| Error::tensor(&self.path, name, "no such tensor"))
    }

    /// The tensor's raw bytes.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let i = self.info(name)?;
        Ok(&self.map[i.start..i.end])
    }

    /// The tensor dequantized to f32 in GGUF element order (ne0 fastest), by the rules
    /// llama.cpp's `dequantize_row_*` and gguf-py use: Q4_0 (q − 8)·d, Q4_1 q·d + m, Q8_0 q·d,
    /// each a single f32 product (plus one f32 add for Q4_1). Non-finite values are an error.
    pub fn to_f32(&self, name: &str) -> Result<Vec<f32>> {
        let i = self.info(name)?;
        let b = &self.map[i.start..i.end];
        let h = |o: usize| f16::from_le_bytes([b[o], b[o + 1]]).to_f32();
        let out: Vec<f32> = match i.ty {
            GgmlType::F32 => b
                .chunks_exact(4)
                .map(|x| f32::from_le_bytes([x[0], x[1], x[2], x[3]]))
                .collect(),
            GgmlType::F16 => b
                .chunks_exact(2)
                .map(|x| f16::from_le_bytes([x[0], x[1]]).to_f32())
                .collect(),
            GgmlType::BF16 => b
                .chunks_exact(2)
                .map(|x| bf16::from_le_bytes([x[0], x[1]]).to_f32())
                .collect(),
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => {
                let (_, bb) = i.ty.block();
                let mut out = Vec::with_capacity(b.len() / bb * QK);
                for k in 0..b.len() / bb {
                    let o = k * bb;
                    let d = h(o);
                    match i.ty {
                        GgmlType::Q8_0 => {
                            out.extend(b[o + 2..o + 34].iter().map(|&q| (q as i8) as f32 * d))
                        }
                        GgmlType::Q4_0 => {
                            let qs = &b[o + 2..o + 18];
                            out.extend(qs.iter().map(|&q| ((q & 15) as i32 - 8) as f32 * d));
                            out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
                        }
                        _ => {
                            let m = h(o + 2);
                            let qs = &b[o + 4..o + 20];
                            out.extend(qs.iter().map(|&q| (q & 15) as f32 * d + m));
                            out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
                        }
                    }
                }
                out
            }
        };
        if let Some(k) = out.iter().position(|x| !x.is_finite()) {
            return Err(Error::tensor(
                &self.path,
                name,
                format!("non-finite value {} at flat index {k}", out[k]),
            ));
        }
        Ok(out)
    }

    fn meta_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                Error::format(
                    &self.path,
                    format!("`{key}` is {v:?}, not an unsigned integer"),
                )
            }),
        }
    }

    fn meta_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                Error::format(&self.path, format!("`{key}` is {v:?}, not a number"))
            }),
        }
    }

    fn need_u64(&self, key: &str) -> Result<u64> {
        self.meta_u64(key)?
            .ok_or_else(|| Error::format(&self.path, format!("metadata `{key}` is missing")))
    }

    fn heads(&self) -> Result<(usize, usize)> {
        let h = self.need_u64("llama.attention.head_count")? as usize;
        let kv = self
            .meta_u64("llama.attention.head_count_kv")?
            .map(|x| x as usize)
            .unwrap_or(h);
        Ok((h, kv))
    }
}

/// The GGUF file a path means: the path itself when it is a file, else the one `*.gguf` file in
/// the directory (an error when there are none or several).
pub fn find_gguf(path: &Path) -> Result<PathBuf> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(Error::format(path, "holds no .gguf file")),
        _ => Err(Error::format(
            path,
            format!(
                "holds {} .gguf files ({}); name one",
                found.len(),
                found
                    .iter()
                    .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// The config.json equivalent of a GGUF `llama` file's metadata (for `LlamaConfig::from_json`):
/// sizes, heads, head_dim, eps, rope base, context length, tied embeddings when `output.weight` is
/// absent, and bos/eos ids.
pub fn gguf_config(g: &GgufFile) -> Result<serde_json::Value> {
    let arch = g
        .metadata
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .unwrap_or("(missing)");
    if arch != "llama" {
        return Err(Error::format(
            &g.path,
            format!("general.architecture is `{arch}`; only `llama` is read"),
        ));
    }
    let hidden = g.need_u64("llama.embedding_length")?;
    let (heads, kv) = g.heads()?;
    let head_dim = match g.meta_u64("llama.attention.key_length")? {
        Some(k) => k,
        None => hidden / heads.max(1) as u64,
    };
    let vocab = match g.meta_u64("llama.vocab_size")? {
        Some(v) => v,
        None => *g.info("token_embd.weight")?.ne.last().unwrap_or(&0),
    };
    let mut cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": g.need_u64("llama.feed_forward_length")?,
        "num_hidden_layers": g.need_u64("llama.block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "rms_norm_eps": g.meta_f64("llama.attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
        "rope_theta": g.meta_f64("llama.rope.freq_base")?.unwrap_or(10000.0),
        "max_position_embeddings": g.meta_u64("llama.context_length")?.unwrap_or(2048),
        "tie_word_embeddings": g.info("output.weight").is_err(),
        "torch_dtype": "float32",
    });
    for (k, m) in [
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
    ] {
        if let Some(id) = g.meta_u64(m)? {
            cfg[k] = id.into();
        }
    }
    Ok(cfg)
}

/// Reads a GGUF `llama` file as a Hugging Face checkpoint: every tensor dequantized to f32
/// ([`GgufFile::to_f32`]) under its Hugging Face name with shape [out, in] (dimensions reversed
/// back), attn_q/attn_k rows returned to Hugging Face order; sorted by name. A tensor without a
/// Hugging Face name is an error.
pub fn read_gguf_dequantized(path: &Path) -> Result<Vec<NamedTensor>> {
    let g = GgufFile::open(path)?;
    let (heads, kv) = g.heads()?;
    let mut out = Vec::with_capacity(g.tensors.len());
    for t in &g.tensors {
        let (hf, permute) = hf_name(&t.name).ok_or_else(|| {
            Error::tensor(path, &t.name, "has no Hugging Face name this reader knows")
        })?;
        let shape: Vec<usize> = t.ne.iter().rev().map(|&d| d as usize).collect();
        let mut v = g.to_f32(&t.name)?;
        if let Some(p) = permute {
            let n = if p == Permute::Q { heads } else { kv };
            let cols = if shape.len() == 2 { shape[1] } else { 1 };
            check_permutable(v.len() / cols, n, &t.name)
                .map_err(|e| Error::tensor(path, &t.name, e.to_string()))?;
            v = unpermute_rows(&v, cols, n);
        }
        out.push((hf, shape, v));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Reads the quantized linear `hf_prefix` (Hugging Face name without `.weight`) of a GGUF file
/// back into the grid it was written from, rows in Hugging Face order: q from the nibbles / int8,
/// scale = d, zero = 8 (Q4_0), 128 (Q8_0) or round(−m / d) (Q4_1; exact, since the f16 rounding
/// of m moves it by at most 2^−11·zero·d < d/2).
pub fn read_gguf_quantized(path: &Path, hf_prefix: &str) -> Result<QuantizedTensor> {
    let g = GgufFile::open(path)?;
    let (heads, kv) = g.heads()?;
    let hf = format!("{hf_prefix}.weight");
    let (gname, permute) =
        gguf_name(&hf).ok_or_else(|| Error::tensor(path, &hf, "has no llama.cpp (GGUF) name"))?;
    let i = g.info(&gname)?;
    let (spec, zero_fixed) = match i.ty {
        GgmlType::Q4_0 => (QuantSpec::new(4, Some(QK), true)?, Some(8u32)),
        GgmlType::Q4_1 => (QuantSpec::new(4, Some(QK), false)?, None),
        GgmlType::Q8_0 => (QuantSpec::new(8, Some(QK), true)?, Some(128)),
        t => {
            return Err(Error::tensor(
                path,
                &gname,
                format!("is {t:?}, not a quantized type"),
            ));
        }
    };
    let [cols, rows] = i.ne[..] else {
        return Err(Error::tensor(
            path,
            &gname,
            format!("dimensions {:?} are not 2-D", i.ne),
        ));
    };
    let (rows, cols) = (rows as usize, cols as usize);
    let ng = cols / QK;
    let b = g.bytes(&gname)?;
    let (_, bb) = i.ty.block();
    let (mut q, mut scales, mut zeros) = (
        Vec::with_capacity(rows * cols),
        Vec::with_capacity(rows * ng),
        Vec::with_capacity(rows * ng),
    );
    for k in 0..rows * ng {
        let o = k * bb;
        let d = f16::from_le_bytes([b[o], b[o + 1]]).to_f32();
        scales.push(d);
        match i.ty {
            GgmlType::Q8_0 => q.extend(
                b[o + 2..o + 34]
                    .iter()
                    .map(|&x| (x as i8 as i32 + 128) as u8),
            ),
            _ => {
                let off = if i.ty == GgmlType::Q4_1 { 4 } else { 2 };
                let qs = &b[o + off..o + off + 16];
                q.extend(qs.iter().map(|&x| x & 15));
                q.extend(qs.iter().map(|&x| x >> 4));
            }
        }
        zeros.push(match zero_fixed {
            Some(z) => z,
            None => {
                let m = f16::from_le_bytes([b[o + 2], b[o + 3]]).to_f32();
                let z = (-m / d).round();
                if !(0.0..=15.0).contains(&z) {
                    return Err(Error::tensor(
                        path,
                        &gname,
                        format!("block {k}: minimum {m} with scale {d} is not on a 4-bit grid"),
                    ));
                }
                z as u32
            }
        });
    }
    let mut t = QuantizedTensor {
        rows,
        cols,
        spec,
        q,
        scales,
        zeros,
        g_idx: (0..cols).map(|c| (c / QK) as u32).collect(),
    };
    if let Some(p) = permute {
        let n = if p == Permute::Q { heads } else { kv };
        check_permutable(rows, n, &gname)
            .map_err(|e| Error::tensor(path, &gname, e.to_string()))?;
        let mut u = t.clone();
        for new in 0..rows {
            let src = permuted_source(new, rows, n);
            u.q[src * cols..(src + 1) * cols].copy_from_slice(&t.q[new * cols..(new + 1) * cols]);
            u.scales[src * ng..(src + 1) * ng].copy_from_slice(&t.scales[new * ng..(new + 1) * ng]);
            u.zeros[src * ng..(src + 1) * ng].copy_from_slice(&t.zeros[new * ng..(new + 1) * ng]);
        }
        t = u;
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_matches_convert_hf_to_gguf() {
        // numpy: np.arange(8).reshape(2, 2, 2).swapaxes(1, 2).reshape(8) = [0 2 1 3 4 6 5 7]
        let src: Vec<usize> = (0..8).map(|n| permuted_source(n, 8, 2)).collect();
        assert_eq!(src, vec![0, 2, 1, 3, 4, 6, 5, 7]);
        let src: Vec<usize> = (0..8).map(|n| permuted_source(n, 8, 1)).collect();
        assert_eq!(src, vec![0, 4, 1, 5, 2, 6, 3, 7]);
        let data: Vec<f32> = (0..24).map(|x| x as f32).collect();
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        let p = permute_rows(&bytes, 12, 2);
        let pf: Vec<f32> = p
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(unpermute_rows(&pf, 3, 2), data);
    }

    #[test]
    fn names_map_both_ways() {
        for hf in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.3.self_attn.q_proj.weight",
            "model.layers.3.self_attn.k_proj.bias",
            "model.layers.12.mlp.down_proj.weight",
            "model.layers.0.post_attention_layernorm.weight",
        ] {
            let (g, p) = gguf_name(hf).unwrap();
            assert_eq!(hf_name(&g), Some((hf.to_string(), p)));
        }
        assert_eq!(
            gguf_name("model.layers.0.self_attn.q_proj.weight")
                .unwrap()
                .0,
            "blk.0.attn_q.weight"
        );
        assert!(gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq").is_none());
    }
}
