//! Dense safetensors export (DESIGN.md section 5): the compressed weights written back as ordinary
//! f32/f16/bf16 tensors under the input checkpoint's names, for any runtime; plus the float
//! encoding (with range checks) that the GPTQ exporter shares for its non-quantized tensors.
//!
//! This module writes through [`OutputDir`] and [`SafetensorsStream`] only (the crate's one
//! safetensors writer); it does not dequantize, rename or reorder tensors, and it never writes a
//! lossy value silently: a value that overflows the target dtype, or a NaN/infinity in the input,
//! is an error naming the tensor and index.

use crate::error::{Error, Result};
use crate::model::writer::{OutputDir, SafetensorsStream, TensorOut};
use half::{bf16, f16};
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::Path;

/// A named dense tensor: (name, shape, row-major f32 data), as `write_dense` takes and
/// `read_gptq_dequantized` returns.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// File name of the single weight file the exporters write.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// The `torch_dtype` string config.json uses for a float dtype.
pub fn torch_dtype_name(dtype: Dtype) -> Result<&'static str> {
    match dtype {
        Dtype::F32 => Ok("float32"),
        Dtype::F16 => Ok("float16"),
        Dtype::BF16 => Ok("bfloat16"),
        d => Err(Error::invalid(format!(
            "float tensors can be written as F32, F16 or BF16, not {d:?}"
        ))),
    }
}

/// Little-endian bytes of `data` in `dtype` (F32, F16 or BF16). Rounds to nearest even. Errors,
/// naming `file` and `tensor`, on a non-finite input or a finite value that overflows the dtype
/// (e.g. |x| > 65504 for f16), because a silently infinite weight ruins the model downstream.
pub fn encode_floats(data: &[f32], dtype: Dtype, file: &Path, tensor: &str) -> Result<Vec<u8>> {
    torch_dtype_name(dtype)?;
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        return Err(Error::tensor(
            file,
            tensor,
            format!("value {} at index {i} is not finite", data[i]),
        ));
    }
    let overflow = |i: usize| {
        Error::tensor(
            file,
            tensor,
            format!(
                "value {} at index {i} overflows {dtype:?} (largest finite {})",
                data[i],
                if dtype == Dtype::F16 {
                    f16::MAX.to_f32()
                } else {
                    bf16::MAX.to_f32()
                }
            ),
        )
    };
    let mut out = Vec::with_capacity(data.len() * dtype.bitsize() / 8);
    match dtype {
        Dtype::F32 => {
            for v in data {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        Dtype::F16 => {
            for (i, v) in data.iter().enumerate() {
                let h = f16::from_f32(*v);
                if h.is_infinite() {
                    return Err(overflow(i));
                }
                out.extend_from_slice(&h.to_le_bytes());
            }
        }
        _ => {
            for (i, v) in data.iter().enumerate() {
                let h = bf16::from_f32(*v);
                if h.is_infinite() {
                    return Err(overflow(i));
                }
                out.extend_from_slice(&h.to_le_bytes());
            }
        }
    }
    Ok(out)
}

/// Metadata every exported safetensors file carries: transformers refuses files whose
/// `__metadata__` lacks `format`.
pub fn safetensors_metadata() -> BTreeMap<String, String> {
    BTreeMap::from([("format".to_string(), "pt".to_string())])
}

/// `original_config` as a JSON object, or an error naming config.json.
pub(crate) fn config_object(
    out: &OutputDir,
    original_config: &serde_json::Value,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    original_config.as_object().cloned().ok_or_else(|| {
        Error::format(
            out.final_path().join("config.json"),
            "the original config is not a JSON object",
        )
    })
}

/// Completes a checkpoint whose tensors went through `stream`: model.safetensors (the stream's
/// header, then its body), then config.json = `original_config` with `quantization_config` set to
/// `quantization` (removed when `None`) and `torch_dtype` naming `dtype`. The original config is
/// checked to be an object before the stream is finished. Shared by every safetensors exporter.
pub(crate) fn finish_checkpoint(
    out: &OutputDir,
    stream: SafetensorsStream,
    original_config: &serde_json::Value,
    quantization: Option<serde_json::Value>,
    dtype: Dtype,
) -> Result<()> {
    let mut config = config_object(out, original_config)?;
    stream.finish(&safetensors_metadata())?;
    match quantization {
        Some(q) => config.insert("quantization_config".into(), q),
        None => config.remove("quantization_config"),
    };
    config.insert("torch_dtype".into(), torch_dtype_name(dtype)?.into());
    out.write_json("config.json", &serde_json::Value::Object(config))
}

/// Writes `model.safetensors` in `dtype` (F32, F16 or BF16) tensor by tensor, in the order added
/// (each is encoded and written at once through a [`SafetensorsStream`], so the writer holds one
/// tensor, never the model), then `config.json` = the original config with `torch_dtype` set to
/// match and any `quantization_config` removed (the output is not quantized). Nothing is committed:
/// the caller commits the output directory when the whole output is complete.
pub struct DenseWriter<'a> {
    out: &'a OutputDir,
    dtype: Dtype,
    file: std::path::PathBuf,
    seen: std::collections::BTreeSet<String>,
    stream: SafetensorsStream,
}

impl<'a> DenseWriter<'a> {
    pub fn new(out: &'a OutputDir, dtype: Dtype) -> Result<Self> {
        torch_dtype_name(dtype)?;
        Ok(DenseWriter {
            out,
            dtype,
            file: out.final_path().join(WEIGHTS_FILE),
            seen: Default::default(),
            stream: SafetensorsStream::create(out, WEIGHTS_FILE)?,
        })
    }

    /// Declares that about `tensors` tensors will be added, so the header is written in place
    /// (see [`SafetensorsStream::expect_tensors`]); before the first tensor.
    pub fn expect_tensors(&mut self, tensors: usize) -> Result<()> {
        self.stream.expect_tensors(tensors)
    }

    /// Encodes and writes tensor `name` (row-major f32 `data` of `shape`).
    pub fn add(&mut self, name: &str, shape: &[usize], data: &[f32]) -> Result<()> {
        if self.seen.contains(name) {
            return Err(Error::tensor(&self.file, name, "appears twice"));
        }
        if shape.iter().product::<usize>() != data.len() {
            return Err(Error::tensor(
                &self.file,
                name,
                format!("shape {shape:?} does not match {} values", data.len()),
            ));
        }
        let bytes = encode_floats(data, self.dtype, &self.file, name)?;
        self.seen.insert(name.to_string());
        self.stream.add(TensorOut {
            name: name.to_string(),
            dtype: self.dtype,
            shape: shape.to_vec(),
            data: bytes,
        })
    }

    /// Completes model.safetensors and writes config.json.
    pub fn finish(self, original_config: &serde_json::Value) -> Result<()> {
        finish_checkpoint(self.out, self.stream, original_config, None, self.dtype)
    }
}

/// Writes `tensors` (name, shape, row-major f32 data) with a [`DenseWriter`], in the order given.
pub fn write_dense(
    out: &OutputDir,
    original_config: &serde_json::Value,
    tensors: &[NamedTensor],
    dtype: Dtype,
) -> Result<()> {
    let mut w = DenseWriter::new(out, dtype)?;
    w.expect_tensors(tensors.len())?;
    for (name, shape, data) in tensors {
        w.add(name, shape, data)?;
    }
    w.finish(original_config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_checks_range() {
        let p = Path::new("m.safetensors");
        let b = encode_floats(&[1.0, -2.0], Dtype::F16, p, "t").unwrap();
        assert_eq!(b, vec![0x00, 0x3c, 0x00, 0xc0]);
        let b = encode_floats(&[1.0], Dtype::BF16, p, "t").unwrap();
        assert_eq!(b, vec![0x80, 0x3f]);
        // 65519 still rounds to 65504; 65520 rounds to infinity.
        assert!(encode_floats(&[65519.0], Dtype::F16, p, "t").is_ok());
        let e = encode_floats(&[0.0, 65520.0], Dtype::F16, p, "t")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`t`") && e.contains("index 1") && e.contains("overflows"),
            "{e}"
        );
        assert!(encode_floats(&[f32::NAN], Dtype::F32, p, "t").is_err());
        assert!(encode_floats(&[f32::MAX], Dtype::BF16, p, "t").is_err());
        assert!(encode_floats(&[1.0], Dtype::I32, p, "t").is_err());
    }
}
