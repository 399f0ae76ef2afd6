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
//! Which held buffers go first: the least recently released. Replaying the take/give trace of a
//! 7B-shaped GPTQ run (BENCHMARKS.md, session 7), that creates 86 buffers per block (38 GB in the
//! first four blocks) where freeing the largest first created 128 (108 GB); an offline optimum that
//! knows the future requests creates 83.
//!
//! A reused buffer holds its previous contents: `GpuTensor::empty` promises no initial values,
//! and every caller that needs zeros writes them. This module must not be used for buffers other
//! than tensor chunks (one usage set for all of them, so any buffer fits any request of its size).

use std::collections::{HashMap, VecDeque};
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

/// Held buffers by byte size, each with the sequence number of its release (oldest first within
/// a size), and their total.
#[derive(Default)]
struct Held {
    by_size: HashMap<u64, VecDeque<(u64, wgpu::Buffer)>>,
    bytes: u64,
    seq: u64,
}

impl Held {
    fn push(&mut self, bytes: u64, buffer: wgpu::Buffer) {
        self.seq += 1;
        self.by_size
            .entry(bytes)
            .or_default()
            .push_back((self.seq, buffer));
        self.bytes += bytes;
    }

    /// The most recently released buffer of exactly `bytes`.
    fn pop(&mut self, bytes: u64) -> Option<wgpu::Buffer> {
        let q = self.by_size.get_mut(&bytes)?;
        let (_, b) = q.pop_back()?;
        if q.is_empty() {
            self.by_size.remove(&bytes);
        }
        self.bytes -= bytes;
        Some(b)
    }

    /// The least recently released buffer of any size.
    fn pop_oldest(&mut self) -> Option<(u64, wgpu::Buffer)> {
        let size = *self
            .by_size
            .iter()
            .filter_map(|(s, q)| q.front().map(|(seq, _)| (seq, s)))
            .min()?
            .1;
        let q = self.by_size.get_mut(&size)?;
        let (_, b) = q.pop_front()?;
        if q.is_empty() {
            self.by_size.remove(&size);
        }
        self.bytes -= size;
        Some((size, b))
    }
}

pub struct BufferPool {
    enabled: bool,
    free: Mutex<Held>,
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
            free: Mutex::new(Held::default()),
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
        if let Some(b) = free.pop(bytes) {
            log::trace!("buffer pool: take {bytes} reused");
            self.reused.fetch_add(1, Ordering::Relaxed);
            self.live.fetch_add(bytes, Ordering::Relaxed);
            return b;
        }
        // Release held buffers (least recently released first) until the new one fits under
        // the mark.
        let live = self.live.load(Ordering::Relaxed);
        let mark = self.peak.load(Ordering::Relaxed);
        while free.bytes > 0 && live + free.bytes + bytes > mark {
            let Some((size, b)) = free.pop_oldest() else {
                break;
            };
            log::debug!("buffer pool: released a held {size}-byte buffer to stay under the mark");
            drop(b);
        }
        let held_now = free.bytes;
        drop(free);
        log::debug!(
            "buffer pool: creating {bytes} bytes (live {live}, held {held_now}, mark {mark})"
        );
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
        log::trace!("buffer pool: give {bytes}");
        if !self.enabled {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.push(bytes, buffer);
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
        self.free.lock().unwrap_or_else(|e| e.into_inner()).bytes
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
