//! wgpress: compresses Llama-family checkpoints on any GPU wgpu reaches (DESIGN.md is the map).

pub mod bench;
pub mod calib;
pub mod compress;
pub mod engine;
pub mod error;
pub mod eval;
pub mod export;
pub mod gpu;
pub mod model;
pub mod par;
pub mod pipeline;
pub mod quant;
pub mod reference;
pub mod rng;
pub mod shaders;

pub use error::{Error, Result};
