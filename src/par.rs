//! Host-side data parallelism for the passes over whole weight tensors that every layer of a
//! calibrated run makes on the host (decoding bf16, dequantizing, f16 conversion, error sums,
//! packing). At 7B shapes one single-threaded pass over a block's 200 M weights costs 0.1-2 s, and
//! a run makes several per block, so they run on all cores here.
//!
//! Work is cut into consecutive pieces whose boundaries do not depend on the number of threads,
//! and sums are combined in piece order, so every result is the same on any machine with the same
//! floating-point behaviour. This module must not allocate per element or know about tensors.

use std::ops::Range;

/// Elements per piece of [`sum`]: large enough that a piece costs far more than scheduling it.
pub const PIECE: usize = 1 << 16;

/// Threads to use: the host's available parallelism (at least 1).
pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Calls `f(first_index, piece)` for the consecutive pieces of `chunk` elements of `data` (the last
/// may be shorter), spread over all cores. `chunk` is rounded up to 1.
pub fn for_chunks_mut<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let chunk = chunk.max(1);
    let n = data.len().div_ceil(chunk);
    let threads = threads().min(n);
    if threads <= 1 {
        for (i, c) in data.chunks_mut(chunk).enumerate() {
            f(i * chunk, c);
        }
        return;
    }
    // Contiguous runs of pieces per thread: same pieces, same results, whatever the split.
    let per_thread = n.div_ceil(threads) * chunk;
    let f = &f;
    std::thread::scope(|s| {
        for (t, run) in data.chunks_mut(per_thread).enumerate() {
            s.spawn(move || {
                for (i, c) in run.chunks_mut(chunk).enumerate() {
                    f(t * per_thread + i * chunk, c);
                }
            });
        }
    });
}

/// Runs `f(&mut state, item)` for every item on `threads` threads (at least 1, at most one per
/// item), each thread with its own `init()` state; threads take the next item from a shared
/// queue, so items of uneven cost balance. For work that is not one slice (e.g. pieces of several
/// tensors); results must not depend on which thread ran an item.
pub fn for_each_queued<T: Send, S>(
    items: Vec<T>,
    threads: usize,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, T) + Sync,
) {
    let threads = threads.clamp(1, items.len().max(1));
    let queue = std::sync::Mutex::new(items);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut state = init();
                loop {
                    // A poisoned lock means another worker panicked; the scope re-raises that
                    // panic, so taking the data as it is here is harmless.
                    let item = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                    let Some(item) = item else { break };
                    f(&mut state, item);
                }
            });
        }
    });
}

/// Σ f(r) over the consecutive ranges r of [`PIECE`] indices that cover `0..len`, each piece's sum
/// computed on some core and the pieces added in order.
pub fn sum(len: usize, f: impl Fn(Range<usize>) -> f64 + Sync) -> f64 {
    let mut partial = vec![0f64; len.div_ceil(PIECE)];
    for_chunks_mut(&mut partial, 1, |i, p| {
        p[0] = f(i * PIECE..((i + 1) * PIECE).min(len));
    });
    partial.iter().sum()
}

/// `dst[i] = f(src[i])` on all cores (`dst` and `src` of equal length).
pub fn map<S: Sync, D: Send>(src: &[S], dst: &mut [D], f: impl Fn(&[S], &mut [D]) + Sync) {
    debug_assert_eq!(src.len(), dst.len());
    for_chunks_mut(dst, PIECE, |start, d| f(&src[start..start + d.len()], d));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_everything_once_and_sums_are_ordered() {
        for len in [0usize, 1, 7, PIECE - 1, PIECE, 3 * PIECE + 5] {
            let mut v = vec![0u32; len];
            for_chunks_mut(&mut v, 1000, |start, c| {
                for (i, x) in c.iter_mut().enumerate() {
                    *x += (start + i) as u32 + 1;
                }
            });
            assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32 + 1));
            let s = sum(len, |r| r.map(|i| i as f64).sum());
            assert_eq!(s, (0..len).map(|i| i as f64).sum::<f64>());
            let src: Vec<u32> = (0..len as u32).collect();
            let mut dst = vec![0u64; len];
            map(&src, &mut dst, |s, d| {
                for (a, b) in s.iter().zip(d) {
                    *b = *a as u64 * 2;
                }
            });
            assert!(dst.iter().enumerate().all(|(i, &x)| x == 2 * i as u64));
        }
        for threads in [1, 3] {
            let seen = std::sync::Mutex::new(vec![0u32; 50]);
            for_each_queued(
                (0..50usize).collect(),
                threads,
                || 0usize,
                |count, i| {
                    *count += 1;
                    seen.lock().unwrap()[i] += 1;
                },
            );
            assert!(seen.into_inner().unwrap().iter().all(|&n| n == 1));
        }
    }
}
