//! Model I/O: config.json, memory-mapped safetensors (single or sharded) and the atomic writer.

pub mod config;
pub mod safetensors;
pub mod writer;
