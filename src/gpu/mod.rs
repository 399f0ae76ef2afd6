//! Everything that touches wgpu: the context, the chunked buffer type and one file per kernel
//! family. Code outside this folder calls these wrappers and never wgpu itself.

pub mod buffer;
pub mod context;
pub mod forward;
pub mod gptq;
pub mod linalg;
pub mod matmul;
pub mod peaks;
pub mod pool;
pub mod profile;
pub mod quant;
pub mod reduce;
pub mod stats;
pub mod timeline;
pub mod tune;

pub use buffer::{GpuDtype, GpuTensor};
pub use context::{AdapterSummary, ContextOptions, DUMP_SHADERS_ENV, GpuContext, list_adapters};
