//! CPU implementations of every GPU kernel: plain, obviously right, f64 where precision matters.
//! Tests compare the GPU against these, and they are the `--cpu` path when no adapter exists.
//! Nothing here may call into `gpu/`.

pub mod forward;
pub mod gptq;
pub mod linalg;
pub mod matmul;
pub mod quant;
pub mod reduce;
pub mod stats;
