//! The library's one error type. Every variant names what failed (file, tensor, kernel, shape) so a
//! user can act on the message without a backtrace. The binary wraps these in `anyhow`.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file whose structure is wrong (bad header, bad JSON, missing key).
    #[error("{}: {problem}", file.display())]
    Format { file: PathBuf, problem: String },
    /// A problem with one named tensor inside a file.
    #[error("{}: tensor `{tensor}`: {problem}", file.display())]
    Tensor {
        file: PathBuf,
        tensor: String,
        problem: String,
    },
    #[error(
        "unsupported architecture `{0}` (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"
    )]
    UnsupportedArchitecture(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("{op}: shape mismatch: expected {expected}, got {got}")]
    Shape {
        op: String,
        expected: String,
        got: String,
    },
    /// A GPU failure (validation, out of memory, device lost, readback) with the kernel and shape.
    #[error("GPU kernel `{kernel}` on shape {shape}: {problem}")]
    Gpu {
        kernel: String,
        shape: String,
        problem: String,
    },
    #[error("no usable GPU adapter: {0}")]
    NoAdapter(String),
    #[error("output {}: {problem}", path.display())]
    Output { path: PathBuf, problem: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn format(file: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        Error::Format {
            file: file.into(),
            problem: problem.into(),
        }
    }
    pub fn tensor(file: impl Into<PathBuf>, tensor: &str, problem: impl Into<String>) -> Self {
        Error::Tensor {
            file: file.into(),
            tensor: tensor.to_string(),
            problem: problem.into(),
        }
    }
    pub fn gpu(kernel: &str, shape: impl Into<String>, problem: impl Into<String>) -> Self {
        Error::Gpu {
            kernel: kernel.to_string(),
            shape: shape.into(),
            problem: problem.into(),
        }
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
}
