//! A GPU timeline of tagged marks: each mark is an empty compute pass whose end-of-pass timestamp
//! the GPU writes once the work submitted before it has run, so the span between two marks is
//! the GPU time (busy or waiting for the host) that ended with the second mark's tag. The
//! pipeline tags its phase boundaries this way instead of waiting for the GPU at each one: the
//! waits left the GPU idle while the host encoded the next phase (about 11% of a 7B run).
//!
//! Marks are read back only when [`Timeline::flush`] is called (or the query set is full), so
//! callers flush where they synchronize anyway. This module must not wait for the GPU anywhere
//! else, and it measures nothing when the adapter has no timestamp queries
//! ([`Timeline::new`] returns `None`).

use super::context::GpuContext;
use crate::error::{Error, Result};

/// Marks per query set between read-backs (a 7B block makes about 300).
const CAPACITY: usize = 4096;

/// Tag of a mark whose span is not charged (the first one, which only sets the origin).
const ORIGIN: usize = usize::MAX;

pub struct Timeline {
    queries: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    /// Tag of each mark written since the last read-back, in query order.
    tags: Vec<usize>,
    /// Timestamp (ticks) of the last mark already read back: the next span starts there.
    last: Option<u64>,
    period_ns: f64,
}

impl Timeline {
    /// A timeline with its origin marked now; `None` on adapters without timestamp queries.
    pub fn new(ctx: &GpuContext) -> Result<Option<Self>> {
        if !ctx.caps.timestamps {
            return Ok(None);
        }
        let queries = ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("timeline"),
            ty: wgpu::QueryType::Timestamp,
            count: CAPACITY as u32,
        });
        let resolve = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timeline resolve"),
            size: (CAPACITY * 8) as u64,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let mut t = Timeline {
            queries,
            resolve,
            tags: Vec::with_capacity(CAPACITY),
            last: None,
            period_ns: ctx.queue.get_timestamp_period() as f64,
        };
        t.mark(ctx, ORIGIN, &mut [])?;
        Ok(Some(t))
    }

    /// Marks the end of the GPU work submitted so far as the end of a span tagged `tag` (an
    /// index into the `into` of [`Timeline::flush`]). When the query set is full the marks so
    /// far are read back into `into` first, which waits for the GPU.
    pub fn mark(&mut self, ctx: &GpuContext, tag: usize, into: &mut [f64]) -> Result<()> {
        if self.tags.len() == CAPACITY {
            self.flush(ctx, into)?;
        }
        let i = self.tags.len() as u32;
        let mut enc = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("timeline mark"),
            });
        enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("timeline mark"),
            timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                query_set: &self.queries,
                beginning_of_pass_write_index: None,
                end_of_pass_write_index: Some(i),
            }),
        });
        ctx.queue.submit([enc.finish()]);
        self.tags.push(tag);
        Ok(())
    }

    /// Reads the marks written since the last flush back (waiting for the GPU) and adds each
    /// span's seconds to `into[tag]`; a tag outside `into` is an error.
    pub fn flush(&mut self, ctx: &GpuContext, into: &mut [f64]) -> Result<()> {
        let n = self.tags.len();
        if n == 0 {
            return Ok(());
        }
        let mut enc = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("timeline resolve"),
            });
        enc.resolve_query_set(&self.queries, 0..n as u32, &self.resolve, 0);
        ctx.queue.submit([enc.finish()]);
        let mut raw = vec![0u8; 8 * n];
        ctx.read_buffer(&self.resolve, 0, &mut raw, "timeline")?;
        let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&raw);
        let tags = std::mem::take(&mut self.tags);
        add_spans(&ticks, &tags, self.last, self.period_ns, into)?;
        self.last = ticks.last().copied();
        Ok(())
    }
}

/// Adds the span ending at each mark (from the mark before it, or `last`) to `into[tag]`, in
/// seconds. A clock that steps back (some drivers reset counters) gives a zero span.
fn add_spans(
    ticks: &[u64],
    tags: &[usize],
    mut last: Option<u64>,
    period_ns: f64,
    into: &mut [f64],
) -> Result<()> {
    let phases = into.len();
    for (&t, &tag) in ticks.iter().zip(tags) {
        if let Some(prev) = last
            && tag != ORIGIN
        {
            let slot = into.get_mut(tag).ok_or_else(|| {
                Error::invalid(format!("timeline: tag {tag} outside the {phases} phases"))
            })?;
            *slot += t.saturating_sub(prev) as f64 * period_ns * 1e-9;
        }
        last = Some(t);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_are_charged_to_the_mark_that_ends_them() -> Result<()> {
        let mut into = [0.0; 3];
        // Origin at 100 ticks, then marks for tags 2, 0, 2 at 1 ns per tick.
        add_spans(
            &[100, 350, 400, 1400],
            &[ORIGIN, 2, 0, 2],
            None,
            1.0,
            &mut into,
        )?;
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs();
        assert!(
            close(into[0], 50e-9) && into[1] == 0.0 && close(into[2], 1250e-9),
            "{into:?}"
        );
        // A second read-back continues from the last mark; a step back counts zero.
        add_spans(&[1500, 1450], &[1, 1], Some(1400), 2.0, &mut into)?;
        assert!(close(into[1], 200e-9), "{into:?}");
        assert!(add_spans(&[1, 2], &[0, 7], Some(0), 1.0, &mut into).is_err());
        Ok(())
    }
}
