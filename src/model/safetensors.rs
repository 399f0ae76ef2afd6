//! The one safetensors READER: memory-maps a single `.safetensors` file or a sharded set
//! (`model.safetensors.index.json` + shards) and hands out zero-copy byte views and f32/i32 copies.
//!
//! The header is parsed here (8-byte little-endian length, then JSON) rather than by the
//! `safetensors` crate, so that every inconsistency (header longer than the file, bad JSON, unknown
//! dtype, offsets out of range or overlapping, size not matching shape x dtype, truncated data, an
//! index naming a missing shard or tensor, a tensor in two shards) becomes an error naming the file
//! and the tensor. Only the crate's `Dtype` enum is reused.
//!
//! A set can also hold tensors that never were a file ([`SafetensorsSet::from_f32`]): the
//! dequantized weights of a GPTQ, compressed-tensors or GGUF export (`model::formats`), so the
//! rest of the crate reads every checkpoint through this one type.
//!
//! This module must not write files (see `writer.rs`), must not copy whole files into memory, and
//! must not interpret tensor names (that is `config.rs`'s job).

use crate::error::{Error, Result};
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use safetensors::Dtype;

/// File name of a single-file checkpoint inside a model directory.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of the shard index inside a model directory.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Headers above this size are refused before reading them: the reference implementation uses the
/// same bound, and a corrupt length field must not make us allocate gigabytes.
const MAX_HEADER: u64 = 100 * 1024 * 1024;

/// Elements converted per step in `to_f32`: large enough for the vectorised `half` conversion, small
/// enough that the bounce buffer for unaligned data stays in L1/L2.
const CHUNK: usize = 16 * 1024;

/// What the header says about one tensor, plus the file it lives in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub file: PathBuf,
}

impl TensorInfo {
    /// Number of elements (1 for a scalar of shape `[]`).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Size of the tensor's data in bytes.
    pub fn byte_len(&self) -> usize {
        self.numel() * self.dtype.bitsize() / 8
    }
}

/// A shard's bytes: a read-only map of a file, or an owned buffer built in memory.
enum ShardBytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for ShardBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ShardBytes::Mapped(m) => m,
            ShardBytes::Owned(v) => v,
        }
    }
}

/// One memory-mapped file (or one in-memory buffer).
struct Shard {
    path: PathBuf,
    mmap: ShardBytes,
    /// Byte offset in the file where the data section starts (8 + header length).
    data_start: usize,
    metadata: BTreeMap<String, String>,
}

/// Where one tensor's bytes are: shard index and absolute byte range within that shard's mmap.
struct Entry {
    info: TensorInfo,
    shard: usize,
    start: usize,
    end: usize,
}

/// A memory-mapped checkpoint: one file or a set of shards, addressed by tensor name.
pub struct SafetensorsSet {
    /// The file or index the set was opened from; named in errors about tensors that don't exist.
    origin: PathBuf,
    shards: Vec<Shard>,
    entries: BTreeMap<String, Entry>,
}

impl std::fmt::Debug for SafetensorsSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsSet")
            .field("origin", &self.origin)
            .field("files", &self.shards.len())
            .field("tensors", &self.entries.len())
            .finish()
    }
}

impl SafetensorsSet {
    /// Opens `dir/model.safetensors`, or `dir/model.safetensors.index.json` and its shards.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::format(
                dir,
                "model directory does not exist or is not a directory",
            ));
        }
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        if single.is_file() {
            if index.is_file() {
                log::warn!(
                    "{} has both {SINGLE_FILE} and {INDEX_FILE}; using {SINGLE_FILE}",
                    dir.display()
                );
            }
            return Self::open_file(&single);
        }
        if index.is_file() {
            return Self::open_index(dir, &index);
        }
        Err(Error::format(
            single,
            format!("missing: the directory has neither {SINGLE_FILE} nor {INDEX_FILE}"),
        ))
    }

    /// Opens a single `.safetensors` file.
    pub fn open_file(path: &Path) -> Result<Self> {
        let (shard, header) = map_shard(path)?;
        let mut entries = BTreeMap::new();
        parse_entries(&shard, &header, 0, &mut entries)?;
        Ok(SafetensorsSet {
            origin: path.to_path_buf(),
            shards: vec![shard],
            entries,
        })
    }

    fn open_index(dir: &Path, index: &Path) -> Result<Self> {
        let text = std::fs::read(index).map_err(|e| Error::io(index, e))?;
        let json: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| Error::format(index, format!("invalid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::format(index, "no `weight_map` object"))?;
        // Tensor -> shard file name, and the distinct shard names in a stable order.
        let mut wanted: BTreeMap<String, String> = BTreeMap::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| {
                Error::tensor(index, name, "weight_map value is not a file name string")
            })?;
            // A shard must sit next to the index; a path that climbs out would read anything.
            let p = Path::new(file);
            if p.is_absolute()
                || p.components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(Error::tensor(
                    index,
                    name,
                    format!("shard `{file}` is not a plain file name inside the model directory"),
                ));
            }
            wanted.insert(name.clone(), file.to_string());
        }
        let mut shard_names: Vec<&str> = wanted.values().map(|s| s.as_str()).collect();
        shard_names.sort_unstable();
        shard_names.dedup();
        if shard_names.is_empty() {
            return Err(Error::format(index, "`weight_map` is empty"));
        }

        let mut shards = Vec::with_capacity(shard_names.len());
        let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
        for (i, sname) in shard_names.iter().enumerate() {
            let path = dir.join(sname);
            if !path.is_file() {
                // Name one tensor that needs the shard so the user sees why it is required.
                let who = wanted
                    .iter()
                    .find(|(_, f)| f.as_str() == *sname)
                    .map(|(n, _)| n.as_str())
                    .unwrap_or("");
                return Err(Error::tensor(
                    index,
                    who,
                    format!("index names shard `{}` which is missing", path.display()),
                ));
            }
            let (shard, header) = map_shard(&path)?;
            let mut here = BTreeMap::new();
            parse_entries(&shard, &header, i, &mut here)?;
            for (name, e) in here {
                if let Some(prev) = entries.get(&name) {
                    return Err(Error::tensor(
                        &path,
                        &name,
                        format!(
                            "tensor also present in shard {}",
                            shards_path(&shards, prev.shard).display()
                        ),
                    ));
                }
                entries.insert(name, e);
            }
            shards.push(shard);
        }
        for (name, file) in &wanted {
            match entries.get(name) {
                None => {
                    return Err(Error::tensor(
                        dir.join(file),
                        name,
                        format!("listed in {} but missing from its shard", index.display()),
                    ));
                }
                Some(e) => {
                    let actual = &shards[e.shard].path;
                    if actual.file_name().map(|f| f.to_string_lossy()) != Some(file.into()) {
                        return Err(Error::tensor(
                            actual,
                            name,
                            format!(
                                "index says shard `{file}` but the tensor is in {}",
                                actual.display()
                            ),
                        ));
                    }
                }
            }
        }
        for name in entries.keys() {
            if !wanted.contains_key(name) {
                log::warn!(
                    "{}: tensor `{name}` is in a shard but not in the index; keeping it",
                    index.display()
                );
            }
        }
        Ok(SafetensorsSet {
            origin: index.to_path_buf(),
            shards,
            entries,
        })
    }

    /// A set holding `tensors` (name, shape, row-major f32 values) in memory as F32, as if read
    /// from `origin` (named in errors and returned by `origin()` and `files()`). Errors on a
    /// duplicate name or a shape that does not match its values.
    pub fn from_f32(origin: &Path, tensors: Vec<(String, Vec<usize>, Vec<f32>)>) -> Result<Self> {
        let total: usize = tensors.iter().map(|t| t.2.len() * 4).sum();
        let mut data = Vec::with_capacity(total);
        let mut entries = BTreeMap::new();
        for (name, shape, values) in tensors {
            if shape.iter().product::<usize>() != values.len() {
                return Err(Error::tensor(
                    origin,
                    &name,
                    format!("shape {shape:?} does not match {} values", values.len()),
                ));
            }
            let start = data.len();
            for v in &values {
                data.extend_from_slice(&v.to_le_bytes());
            }
            let entry = Entry {
                info: TensorInfo {
                    name: name.clone(),
                    dtype: Dtype::F32,
                    shape,
                    file: origin.to_path_buf(),
                },
                shard: 0,
                start,
                end: data.len(),
            };
            if entries.insert(name.clone(), entry).is_some() {
                return Err(Error::tensor(origin, &name, "appears twice"));
            }
        }
        Ok(SafetensorsSet {
            origin: origin.to_path_buf(),
            shards: vec![Shard {
                path: origin.to_path_buf(),
                mmap: ShardBytes::Owned(data),
                data_start: 0,
                metadata: BTreeMap::new(),
            }],
            entries,
        })
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.entries.keys().map(|s| s.as_str()).collect()
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The files this set maps (one, or the shards in index order).
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// The file or index the set was opened from.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// Sum of all tensors' data sizes in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.entries
            .values()
            .map(|e| (e.end - e.start) as u64)
            .sum()
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries
            .get(name)
            .ok_or_else(|| Error::tensor(&self.origin, name, "no such tensor"))
    }

    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        Ok(&self.entry(name)?.info)
    }

    /// The tensor's raw little-endian bytes, a view into the mmap (no copy).
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let e = self.entry(name)?;
        // In range: checked against the mapped length when the header was parsed.
        Ok(&self.shards[e.shard].mmap[e.start..e.end])
    }

    /// The tensor as f32, converted from F32, F16 or BF16. Any NaN or infinity is an error naming
    /// the first bad flat index: compression would silently spread it through a whole layer.
    pub fn to_f32(&self, name: &str) -> Result<Vec<f32>> {
        let e = self.entry(name)?;
        let bytes = &self.shards[e.shard].mmap[e.start..e.end];
        let n = e.info.numel();
        let mut out = vec![0f32; n];
        match e.info.dtype {
            Dtype::F32 => {
                // Aligned little-endian data is already our layout: one memcpy.
                let aligned: Option<&[f32]> = if cfg!(target_endian = "little") {
                    bytemuck::try_cast_slice(bytes).ok()
                } else {
                    None
                };
                if let Some(v) = aligned {
                    out.copy_from_slice(v);
                } else {
                    for (dst, src) in out.chunks_mut(CHUNK).zip(bytes.chunks(CHUNK * 4)) {
                        for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                            *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                        }
                    }
                }
            }
            Dtype::F16 => convert_half(bytes, &mut out, |h, d| {
                h.reinterpret_cast::<f16>().convert_to_f32_slice(d)
            }),
            Dtype::BF16 => convert_half(bytes, &mut out, |h, d| {
                h.reinterpret_cast::<bf16>().convert_to_f32_slice(d)
            }),
            other => {
                return Err(Error::tensor(
                    &e.info.file,
                    name,
                    format!("dtype {other} cannot be read as f32 (F32, F16 or BF16 expected)"),
                ));
            }
        }
        let bad = crate::par::sum(out.len(), |r| {
            out[r].iter().filter(|x| !x.is_finite()).count() as f64
        });
        if bad > 0.0
            && let Some(i) = out.iter().position(|x| !x.is_finite())
        {
            return Err(Error::tensor(
                &e.info.file,
                name,
                format!(
                    "non-finite value {} at flat index {i} (shape {:?})",
                    out[i], e.info.shape
                ),
            ));
        }
        Ok(out)
    }

    /// The tensor as i32; the dtype must be I32.
    pub fn to_i32(&self, name: &str) -> Result<Vec<i32>> {
        let e = self.entry(name)?;
        if e.info.dtype != Dtype::I32 {
            return Err(Error::tensor(
                &e.info.file,
                name,
                format!(
                    "dtype {} cannot be read as i32 (I32 expected)",
                    e.info.dtype
                ),
            ));
        }
        let bytes = &self.shards[e.shard].mmap[e.start..e.end];
        Ok(bytes
            .chunks_exact(4)
            .map(|s| i32::from_le_bytes([s[0], s[1], s[2], s[3]]))
            .collect())
    }

    /// `__metadata__` of the first file (the first shard in name order for a sharded set).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        // A set always holds at least one shard (open_index refuses an empty weight_map).
        &self.shards[0].metadata
    }
}

fn shards_path(shards: &[Shard], i: usize) -> &Path {
    shards
        .get(i)
        .map(|s| s.path.as_path())
        .unwrap_or(Path::new(""))
}

/// Converts 16-bit floats to f32 in chunks. Uses the bytes in place when they are 2-byte aligned
/// (the usual case: writers pad the header to 8 bytes), else bounces each chunk through a small
/// aligned buffer; either way the `half` slice conversion (SIMD where the CPU has it) does the work.
fn convert_half(bytes: &[u8], out: &mut [f32], conv: impl Fn(&[u16], &mut [f32]) + Sync) {
    // The bytes are little-endian; reinterpreting them as u16 is only right on a little-endian host.
    let aligned: Option<&[u16]> = if cfg!(target_endian = "little") {
        bytemuck::try_cast_slice(bytes).ok()
    } else {
        None
    };
    if let Some(bits) = aligned {
        // On all cores: a 7B layer is 45 M values, decoded several times per calibrated block.
        crate::par::map(bits, out, |s, d| conv(s, d));
        return;
    }
    let mut buf = vec![0u16; CHUNK.min(out.len())];
    for (d, s) in out.chunks_mut(CHUNK).zip(bytes.chunks(CHUNK * 2)) {
        let b = &mut buf[..d.len()];
        for (x, p) in b.iter_mut().zip(s.chunks_exact(2)) {
            *x = u16::from_le_bytes([p[0], p[1]]);
        }
        conv(b, d);
    }
}

type Header = serde_json::Map<String, serde_json::Value>;

/// Maps a file, validates the header length field and parses the header JSON (its tensor entries
/// are checked by `parse_entries`).
fn map_shard(path: &Path) -> Result<(Shard, Header)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len < 8 {
        return Err(Error::format(
            path,
            format!(
                "file is {len} bytes, too short for a safetensors header (8-byte length + JSON)"
            ),
        ));
    }
    // SAFETY: the map is read-only and private to this process. If another process truncates or
    // rewrites the file while it is mapped, reads may fault or see new bytes; checkpoints are not
    // modified while being compressed, and this is the same contract every mmap-based loader has.
    let mmap = ShardBytes::Mapped(unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?);
    let mut lenb = [0u8; 8];
    lenb.copy_from_slice(&mmap[..8]);
    let hlen = u64::from_le_bytes(lenb);
    if hlen > len - 8 {
        return Err(Error::format(
            path,
            format!(
                "header length {hlen} goes beyond the file size of {len} bytes (corrupt or not a safetensors file)"
            ),
        ));
    }
    if hlen > MAX_HEADER {
        return Err(Error::format(
            path,
            format!("header length {hlen} exceeds the {MAX_HEADER}-byte limit"),
        ));
    }
    let data_start = 8 + hlen as usize;
    let header = parse_header(path, &mmap[8..data_start])?;
    let metadata = match header.get("__metadata__") {
        None => BTreeMap::new(),
        Some(m) => parse_metadata(path, m)?,
    };
    let shard = Shard {
        path: path.to_path_buf(),
        mmap,
        data_start,
        metadata,
    };
    Ok((shard, header))
}

fn parse_header(path: &Path, h: &[u8]) -> Result<Header> {
    let v: serde_json::Value = serde_json::from_slice(h)
        .map_err(|e| Error::format(path, format!("header is not valid JSON: {e}")))?;
    match v {
        serde_json::Value::Object(m) => Ok(m),
        _ => Err(Error::format(path, "header JSON is not an object")),
    }
}

fn parse_metadata(path: &Path, m: &serde_json::Value) -> Result<BTreeMap<String, String>> {
    let obj = m
        .as_object()
        .ok_or_else(|| Error::format(path, "`__metadata__` is not an object"))?;
    obj.iter()
        .map(|(k, v)| match v.as_str() {
            Some(s) => Ok((k.clone(), s.to_string())),
            None => Err(Error::format(
                path,
                format!("`__metadata__` value for `{k}` is not a string"),
            )),
        })
        .collect()
}

/// Parses and validates every tensor entry of one shard's header into `out`.
fn parse_entries(
    shard: &Shard,
    header: &Header,
    index: usize,
    out: &mut BTreeMap<String, Entry>,
) -> Result<()> {
    let path = shard.path.as_path();
    let data_len = shard.mmap.len() - shard.data_start;
    // (start, end, name) relative to the data section, for the overlap and truncation checks.
    let mut ranges: Vec<(usize, usize, String)> = Vec::with_capacity(header.len());
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let t = |p: String| Error::tensor(path, name, p);
        let obj = v
            .as_object()
            .ok_or_else(|| t("header entry is not an object".into()))?;
        let dtype_str = obj
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| t("no `dtype` string".into()))?;
        let dtype: Dtype = serde_json::from_value(serde_json::Value::String(dtype_str.into()))
            .map_err(|_| t(format!("unknown dtype `{dtype_str}`")))?;
        let shape: Vec<usize> = obj
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| t("no `shape` array".into()))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| t("`shape` holds a value that is not a non-negative integer".into()))?;
        let offs = obj
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .filter(|o| o.len() == 2)
            .and_then(|o| {
                let a = usize::try_from(o[0].as_u64()?).ok()?;
                let b = usize::try_from(o[1].as_u64()?).ok()?;
                Some((a, b))
            })
            .ok_or_else(|| t("`data_offsets` is not a pair of non-negative integers".into()))?;
        let (a, b) = offs;
        if b < a {
            return Err(t(format!("data_offsets [{a}, {b}] end before they start")));
        }
        let bits = shape
            .iter()
            .try_fold(dtype.bitsize(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| t(format!("shape {shape:?} overflows")))?;
        if !bits.is_multiple_of(8) {
            return Err(t(format!(
                "shape {shape:?} of {dtype} is not a whole number of bytes"
            )));
        }
        if b - a != bits / 8 {
            return Err(t(format!(
                "data_offsets [{a}, {b}] span {} bytes but shape {shape:?} of {dtype} needs {}",
                b - a,
                bits / 8
            )));
        }
        ranges.push((a, b, name.clone()));
        out.insert(
            name.clone(),
            Entry {
                info: TensorInfo {
                    name: name.clone(),
                    dtype,
                    shape,
                    file: path.to_path_buf(),
                },
                shard: index,
                start: shard.data_start + a,
                end: shard.data_start + b,
            },
        );
    }
    ranges.sort();
    for w in ranges.windows(2) {
        let (_, e0, n0) = &w[0];
        let (s1, _, n1) = &w[1];
        // Zero-sized tensors occupy no bytes and cannot overlap anything.
        if s1 < e0 && w[1].0 != w[1].1 && w[0].0 != w[0].1 {
            return Err(Error::tensor(
                path,
                n1,
                format!(
                    "data_offsets [{s1}, {}] overlap tensor `{n0}` at [{}, {e0}]",
                    w[1].1, w[0].0
                ),
            ));
        }
    }
    // Whether the offsets tile [0, end) without holes: then a range past the data section means the
    // file was cut short, not that the header lies about where a tensor is.
    let contiguous =
        ranges.first().is_none_or(|r| r.0 == 0) && ranges.windows(2).all(|w| w[0].1 == w[1].0);
    let needed = ranges.iter().map(|r| r.1).max().unwrap_or(0);
    for (a, b, name) in &ranges {
        if *b > data_len {
            let problem = if contiguous {
                format!(
                    "data truncated: the header describes {needed} data bytes but the file holds only {data_len} (tensor needs [{a}, {b}])"
                )
            } else {
                format!(
                    "data_offsets [{a}, {b}] out of range: the data section holds {data_len} bytes"
                )
            };
            return Err(Error::tensor(path, name, problem));
        }
    }
    if contiguous && needed < data_len {
        log::debug!(
            "{}: {} trailing bytes after the last tensor",
            path.display(),
            data_len - needed
        );
    } else if !contiguous {
        log::debug!("{}: tensor data has holes between tensors", path.display());
    }
    Ok(())
}
