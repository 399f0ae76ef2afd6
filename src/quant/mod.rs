//! Quantization: the shared grid, RTN and bit packing.

pub mod gptq;
pub mod grid;
pub mod pack;
pub mod rtn;

pub use grid::{GroupParams, QuantSpec, QuantizedTensor};
