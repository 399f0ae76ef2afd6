//! Exporters: dense safetensors and the GPTQ v1 checkpoint format (DESIGN.md section 5).

pub mod dense;
pub mod gptq;
