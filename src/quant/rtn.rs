//! RTN (round to nearest): the quantizer grid applied directly to each weight, on the GPU when the
//! engine has one and on the CPU reference otherwise. Both give bit-identical results.

use super::grid::{QuantSpec, QuantizedTensor};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::gpu::GpuTensor;

/// Quantizes an out x in weight matrix (row-major f32).
pub fn quantize(
    engine: &Engine,
    w: &[f32],
    rows: usize,
    cols: usize,
    spec: &QuantSpec,
) -> Result<QuantizedTensor> {
    if w.len() != rows * cols {
        return Err(Error::Shape {
            op: "rtn".into(),
            expected: format!("{} values for {rows}x{cols}", rows * cols),
            got: format!("{}", w.len()),
        });
    }
    spec.check_cols(cols, "rtn")?;
    match engine.gpu() {
        Some(ctx) => {
            let t = GpuTensor::from_f32(ctx, rows, cols, w)?;
            crate::gpu::quant::rtn(ctx, &t, spec)
        }
        None => crate::reference::quant::rtn(w, rows, cols, spec),
    }
}
