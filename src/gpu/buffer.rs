//! The one GPU buffer type: a 2-D tensor stored row-major and split into chunks of whole rows, each
//! chunk its own `wgpu::Buffer` no larger than the context's binding limit, so any kernel can bind
//! any chunk. Chunk buffers come from and return to the context's pool (`gpu::pool`), which
//! also counts live and peak bytes.

use super::context::GpuContext;
use super::pool::BufferPool;
use crate::error::{Error, Result};
use half::slice::HalfFloatSliceExt;
use std::sync::Arc;

/// Element type of a GPU tensor. 16-bit types are stored two per 32-bit word (element i in the low
/// half of word i/2 when i is even), so they work on adapters without `shader-f16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GpuDtype {
    F32,
    F16,
    BF16,
    U32,
}

impl GpuDtype {
    /// The value an f32 becomes when stored as this type (round to nearest even).
    pub fn round(self, x: f32) -> f32 {
        match self {
            GpuDtype::F32 | GpuDtype::U32 => x,
            GpuDtype::F16 => half::f16::from_f32(x).to_f32(),
            GpuDtype::BF16 => half::bf16::from_f32(x).to_f32(),
        }
    }

    pub fn size(self) -> u64 {
        match self {
            GpuDtype::F32 | GpuDtype::U32 => 4,
            GpuDtype::F16 | GpuDtype::BF16 => 2,
        }
    }
}

/// One chunk: rows `row_start .. row_start + rows` of the tensor.
pub struct Chunk {
    pub(crate) buffer: wgpu::Buffer,
    pub row_start: usize,
    pub rows: usize,
    bytes: u64,
    pool: Arc<BufferPool>,
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // wgpu keeps the buffer alive for work already submitted; the pool hands it out again
        // only to later work, which the queue orders after that.
        self.pool.give(self.buffer.clone(), self.bytes);
    }
}

/// A rows x cols tensor on the GPU, chunked by rows under the binding limit.
pub struct GpuTensor {
    pub rows: usize,
    pub cols: usize,
    pub dtype: GpuDtype,
    pub chunks: Vec<Chunk>,
}

/// Rows per chunk so that one chunk's bytes stay under `limit`; for 16-bit types with an odd number
/// of columns the row count is kept even so every chunk starts on a word boundary.
pub fn rows_per_chunk(cols: usize, dtype: GpuDtype, limit: u64) -> Result<usize> {
    let row_bytes = cols as u64 * dtype.size();
    if row_bytes == 0 {
        return Ok(usize::MAX);
    }
    let mut r = (limit / row_bytes) as usize;
    // A chunk's buffer is padded to whole 16-byte units, which must fit the limit too.
    while r > 0 && (r as u64 * row_bytes).div_ceil(16) * 16 > limit {
        r -= 1;
    }
    if dtype.size() == 2 && cols % 2 == 1 {
        r -= r % 2;
    }
    if r == 0 {
        return Err(Error::invalid(format!(
            "one row of {cols} {dtype:?} elements ({row_bytes} bytes) exceeds the GPU binding limit of {limit} bytes"
        )));
    }
    Ok(r)
}

impl GpuTensor {
    /// Allocates an uninitialised tensor.
    pub fn empty(ctx: &GpuContext, rows: usize, cols: usize, dtype: GpuDtype) -> Result<Self> {
        Self::empty_aligned(ctx, rows, cols, dtype, 1)
    }

    /// Allocates an uninitialised tensor whose chunks hold whole groups of `align` rows (e.g. whole
    /// sequences, so attention never looks across a chunk boundary).
    pub fn empty_aligned(
        ctx: &GpuContext,
        rows: usize,
        cols: usize,
        dtype: GpuDtype,
        align: usize,
    ) -> Result<Self> {
        let align = align.max(1);
        let mut per = rows_per_chunk(cols, dtype, ctx.binding_limit())?;
        if align > 1 && per != usize::MAX {
            if per < align {
                return Err(Error::invalid(format!(
                    "{align} rows of {cols} {dtype:?} elements exceed the GPU binding limit of {} bytes",
                    ctx.binding_limit()
                )));
            }
            per -= per % align;
            if dtype.size() == 2 && cols % 2 == 1 && per % 2 == 1 {
                per = per.checked_sub(align).filter(|&p| p > 0).ok_or_else(|| {
                    Error::invalid(format!(
                        "cannot split {rows}x{cols} {dtype:?} into word-aligned chunks of {align} rows"
                    ))
                })?;
            }
        }
        let mut chunks = Vec::new();
        let mut start = 0;
        while start < rows || (rows == 0 && chunks.is_empty()) {
            let n = per.min(rows - start);
            // Whole 16-byte units: the cooperative matmul reads its operands as 16-byte vectors.
            let bytes = ((n * cols) as u64 * dtype.size()).div_ceil(16).max(1) * 16;
            let buffer = ctx.pool.take(&ctx.device, bytes);
            chunks.push(Chunk {
                buffer,
                row_start: start,
                rows: n,
                bytes,
                pool: ctx.pool.clone(),
            });
            start += n;
            if rows == 0 {
                break;
            }
        }
        Ok(GpuTensor {
            rows,
            cols,
            dtype,
            chunks,
        })
    }

    /// Uploads row-major raw bytes (already in `dtype`'s layout).
    pub fn from_bytes(
        ctx: &GpuContext,
        rows: usize,
        cols: usize,
        dtype: GpuDtype,
        bytes: &[u8],
    ) -> Result<Self> {
        let expect = (rows * cols) as u64 * dtype.size();
        if bytes.len() as u64 != expect {
            return Err(Error::Shape {
                op: "upload".into(),
                expected: format!("{expect} bytes for {rows}x{cols} {dtype:?}"),
                got: format!("{} bytes", bytes.len()),
            });
        }
        let t = Self::empty(ctx, rows, cols, dtype)?;
        let rb = cols * dtype.size() as usize;
        for c in &t.chunks {
            let src = &bytes[c.row_start * rb..(c.row_start + c.rows) * rb];
            if src.len().is_multiple_of(4) {
                ctx.queue.write_buffer(&c.buffer, 0, src);
            } else {
                let mut padded = src.to_vec();
                padded.resize(src.len().div_ceil(4) * 4, 0);
                ctx.queue.write_buffer(&c.buffer, 0, &padded);
            }
        }
        Ok(t)
    }

    pub fn from_f32(ctx: &GpuContext, rows: usize, cols: usize, data: &[f32]) -> Result<Self> {
        Self::from_f32_aligned(ctx, rows, cols, data, 1)
    }

    /// Uploads f32 values stored as `dtype` (f32, f16 or bf16; each value rounded to nearest).
    pub fn from_f32_as(
        ctx: &GpuContext,
        rows: usize,
        cols: usize,
        data: &[f32],
        dtype: GpuDtype,
    ) -> Result<Self> {
        match dtype {
            GpuDtype::F32 => Self::from_f32(ctx, rows, cols, data),
            GpuDtype::F16 => {
                let mut h = vec![half::f16::ZERO; data.len()];
                crate::par::map(data, &mut h, |s, d| d.convert_from_f32_slice(s));
                Self::from_bytes(ctx, rows, cols, dtype, bytemuck::cast_slice(&h))
            }
            GpuDtype::BF16 => {
                let mut h = vec![half::bf16::ZERO; data.len()];
                crate::par::map(data, &mut h, |s, d| d.convert_from_f32_slice(s));
                Self::from_bytes(ctx, rows, cols, dtype, bytemuck::cast_slice(&h))
            }
            GpuDtype::U32 => Err(Error::invalid("from_f32_as: u32 is not a float type")),
        }
    }

    /// Uploads f32 rows into chunks of whole groups of `align` rows (see `empty_aligned`).
    pub fn from_f32_aligned(
        ctx: &GpuContext,
        rows: usize,
        cols: usize,
        data: &[f32],
        align: usize,
    ) -> Result<Self> {
        if data.len() != rows * cols {
            return Err(Error::Shape {
                op: "upload".into(),
                expected: format!("{} values for {rows}x{cols}", rows * cols),
                got: format!("{}", data.len()),
            });
        }
        let t = Self::empty_aligned(ctx, rows, cols, GpuDtype::F32, align)?;
        for c in &t.chunks {
            let src = &data[c.row_start * cols..(c.row_start + c.rows) * cols];
            ctx.queue
                .write_buffer(&c.buffer, 0, bytemuck::cast_slice(src));
        }
        Ok(t)
    }

    /// Fills every chunk with one 32-bit pattern (tests poison outputs with NaN this way). Zero
    /// is cleared on the GPU, in submission order like a kernel: a host write of zeros made a
    /// host buffer and a staging copy of the whole tensor (485 MB for a 7B down_proj Hessian)
    /// while the GPU waited.
    pub fn fill_u32(&self, ctx: &GpuContext, pattern: u32) {
        if pattern == 0 {
            let mut enc = ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("clear"),
                });
            for c in &self.chunks {
                enc.clear_buffer(&c.buffer, 0, None);
            }
            ctx.queue.submit([enc.finish()]);
            return;
        }
        for c in &self.chunks {
            let words = vec![pattern; (c.bytes / 4) as usize];
            ctx.queue
                .write_buffer(&c.buffer, 0, bytemuck::cast_slice(&words));
        }
    }

    /// Downloads the raw bytes, row-major, without padding (through the context's cached
    /// staging buffer, in bounded pieces).
    pub fn to_bytes(&self, ctx: &GpuContext) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.rows * self.row_bytes()];
        self.read_into(ctx, &mut out)?;
        Ok(out)
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.cols * self.dtype.size() as usize
    }

    /// Downloads the raw bytes, row-major, straight into `out` (exactly rows x row bytes), so a
    /// caller that owns the destination avoids an intermediate copy.
    pub fn read_into(&self, ctx: &GpuContext, out: &mut [u8]) -> Result<()> {
        let shape = format!("{}x{}", self.rows, self.cols);
        let rb = self.row_bytes();
        if out.len() != self.rows * rb {
            return Err(Error::Shape {
                op: "readback".into(),
                expected: format!("{} bytes for {shape}", self.rows * rb),
                got: format!("{}", out.len()),
            });
        }
        for c in &self.chunks {
            if c.rows > 0 {
                let dst = &mut out[c.row_start * rb..(c.row_start + c.rows) * rb];
                ctx.read_buffer(&c.buffer, 0, dst, &shape)?;
            }
        }
        Ok(())
    }

    pub fn to_f32(&self, ctx: &GpuContext) -> Result<Vec<f32>> {
        if self.dtype != GpuDtype::F32 {
            return Err(Error::invalid(format!(
                "to_f32 on a {:?} tensor",
                self.dtype
            )));
        }
        let mut v = vec![0f32; self.rows * self.cols];
        self.read_into(ctx, bytemuck::cast_slice_mut(&mut v))?;
        Ok(v)
    }

    pub fn to_u32(&self, ctx: &GpuContext) -> Result<Vec<u32>> {
        if self.dtype.size() != 4 {
            return Err(Error::invalid(format!(
                "to_u32 on a {:?} tensor",
                self.dtype
            )));
        }
        let mut v = vec![0u32; self.rows * self.cols];
        self.read_into(ctx, bytemuck::cast_slice_mut(&mut v))?;
        Ok(v)
    }

    /// The chunk holding `row` and the row's index inside it.
    pub fn locate(&self, row: usize) -> (usize, usize) {
        let i = self
            .chunks
            .partition_point(|c| c.row_start + c.rows <= row)
            .min(self.chunks.len() - 1);
        (i, row - self.chunks[i].row_start)
    }

    /// Row ranges that lie inside a single chunk of every tensor given (all with the same rows):
    /// kernels that work row-wise on several tensors iterate over these.
    pub fn common_row_ranges(tensors: &[&GpuTensor]) -> Vec<(usize, usize)> {
        let rows = tensors.first().map(|t| t.rows).unwrap_or(0);
        let mut cuts: Vec<usize> = tensors
            .iter()
            .flat_map(|t| t.chunks.iter().map(|c| c.row_start))
            .chain([rows])
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        cuts.windows(2).map(|w| (w[0], w[1])).collect()
    }

    pub fn shape_str(&self) -> String {
        format!("{}x{} {:?}", self.rows, self.cols, self.dtype)
    }
}
