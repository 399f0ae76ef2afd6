//! Calibration: text -> token batches for the streaming pipeline (DESIGN.md section 3), and the
//! perplexity protocol's evaluation windows. Per-layer statistics (Hessians, activation norms)
//! will live here too.
//!
//! Nothing here touches the GPU or the model weights: this module only turns files and token
//! streams into windows of ids, deterministically for a given seed.

pub mod data;

pub use data::{CalibOptions, EvalWindow, eval_windows, sample_windows, stride_windows};
