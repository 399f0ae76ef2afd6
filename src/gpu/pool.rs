//! GPU memory accounting and reuse for tensor buffers.
//!
//! Every tensor chunk's buffer comes from here and goes back here when the tensor is dropped. A
//! released buffer is kept and handed to the next request of the same byte size instead of being
//! freed, because the calibration pipeline allocates the same intermediates (hundreds of MiB each)
//! for every batch of every block, and a fresh device allocation of that size costs the driver far
//! more than the kernels that use it. Reuse never raises the high-water mark: before a new buffer
//! is created, held buffers are released until tensors alive plus buffers held plus the new one
//! fit under the mark reached so far (or nothing is held). The mark counts both, so it is the
//! memory the tensors really occupy. `WGPRESS_BUFFER_POOL=0` turns reuse off (every release frees).
//!
//! A reused buffer holds its previous contents: `GpuTensor::empty` promises no initial values,
//! and every caller that needs zeros writes them. This module must not be used for buffers other
//! than tensor chunks (one usage set for all of them, so any buffer fits any request of its size).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Usage of every tensor buffer.
const USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);

/// Counters since the context was made: requests served by a held buffer, requests that created
/// one, and the wall time spent creating them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PoolStats {
    pub reused: u64,
    pub created: u64,
    pub create_seconds: f64,
}

pub struct BufferPool {
    enabled: bool,
    /// Held buffers by byte size; `held` is their total (both under this lock).
    free: Mutex<(HashMap<u64, Vec<wgpu::Buffer>>, u64)>,
    live: AtomicU64,
    peak: AtomicU64,
    reused: AtomicU64,
    created: AtomicU64,
    create_nanos: AtomicU64,
}

impl BufferPool {
    pub fn new(enabled: bool) -> BufferPool {
        BufferPool {
            enabled,
            free: Mutex::new((HashMap::new(), 0)),
            live: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            reused: AtomicU64::new(0),
            created: AtomicU64::new(0),
            create_nanos: AtomicU64::new(0),
        }
    }

    /// Reuse is on unless `WGPRESS_BUFFER_POOL=0`.
    pub fn from_env() -> BufferPool {
        BufferPool::new(std::env::var("WGPRESS_BUFFER_POOL").map_or(true, |v| v != "0"))
    }

    /// A buffer of exactly `bytes` for a tensor chunk: a held one, or a new one.
    pub fn take(&self, device: &wgpu::Device, bytes: u64) -> wgpu::Buffer {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let (map, held) = &mut *free;
        if let Some(b) = map.get_mut(&bytes).and_then(Vec::pop) {
            *held -= bytes;
            self.reused.fetch_add(1, Ordering::Relaxed);
            self.live.fetch_add(bytes, Ordering::Relaxed);
            return b;
        }
        // Release held buffers (largest first) until the new one fits under the mark.
        let live = self.live.load(Ordering::Relaxed);
        let mark = self.peak.load(Ordering::Relaxed);
        while *held > 0 && live + *held + bytes > mark {
            let Some(&size) = map
                .iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(s, _)| s)
                .max()
            else {
                break;
            };
            if let Some(b) = map.get_mut(&size).and_then(Vec::pop) {
                *held -= size;
                drop(b);
            }
        }
        map.retain(|_, v| !v.is_empty());
        let held_now = *held;
        drop(free);
        let t = Instant::now();
        let buffer = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("tensor"),
            size: bytes,
            usage: USAGE,
            mapped_at_creation: false,
        });
        self.create_nanos
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.created.fetch_add(1, Ordering::Relaxed);
        let live = self.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(live + held_now, Ordering::Relaxed);
        buffer
    }

    /// A tensor chunk's buffer of `bytes` is no longer used by any tensor.
    pub fn give(&self, buffer: wgpu::Buffer, bytes: u64) {
        self.live.fetch_sub(bytes, Ordering::Relaxed);
        if !self.enabled {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.0.entry(bytes).or_default().push(buffer);
        free.1 += bytes;
    }

    /// (bytes of live tensors, high-water mark of live plus held bytes).
    pub fn memory(&self) -> (u64, u64) {
        (
            self.live.load(Ordering::Relaxed),
            self.peak.load(Ordering::Relaxed),
        )
    }

    /// Bytes held for reuse.
    fn held(&self) -> u64 {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).1
    }

    /// Starts a new high-water mark from what is allocated now.
    pub fn reset_peak(&self) {
        let now = self.live.load(Ordering::Relaxed) + self.held();
        self.peak.store(now, Ordering::Relaxed);
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            reused: self.reused.load(Ordering::Relaxed),
            created: self.created.load(Ordering::Relaxed),
            create_seconds: self.create_nanos.load(Ordering::Relaxed) as f64 * 1e-9,
        }
    }
}
