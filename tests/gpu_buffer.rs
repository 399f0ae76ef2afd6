mod common;
use wgpress::gpu::{GpuDtype, GpuTensor};
use wgpress::rng::Rng;

#[test]
fn upload_download_round_trips_through_chunks() {
    // 1 KiB limit: a 37 x 29 f32 tensor (4292 bytes) needs 5 chunks of 8 rows (928 bytes each).
    let ctx = common::ctx_with(Some(1024));
    let mut rng = Rng::new(1);
    let data = rng.normal_vec(37 * 29, 1.0);
    let t = GpuTensor::from_f32(&ctx, 37, 29, &data).unwrap();
    assert_eq!(t.chunks.len(), 5);
    assert_eq!(t.to_f32(&ctx).unwrap(), data);
    let (live, peak) = ctx.memory();
    assert!(live >= 37 * 29 * 4 && peak >= live);
    drop(t);
    assert_eq!(ctx.memory().0, 0);
}

#[test]
fn sixteen_bit_odd_columns_keep_chunks_word_aligned() {
    let ctx = common::ctx_with(Some(64));
    let bytes: Vec<u8> = (0..(13 * 7 * 2)).map(|i| (i * 7 % 251) as u8).collect();
    let t = GpuTensor::from_bytes(&ctx, 13, 7, GpuDtype::F16, &bytes).unwrap();
    assert!(t.chunks.len() > 1);
    assert!(t.chunks.iter().all(|c| c.row_start % 2 == 0));
    assert_eq!(t.to_bytes(&ctx).unwrap(), bytes);
}

/// Filling with a pattern writes from the host; filling with zero clears on the GPU, in order
/// with the work around it: every chunk, every element, after an upload and before a read.
#[test]
fn fills_reach_every_chunk_and_zero_is_ordered_with_other_work() {
    let ctx = common::ctx_with(Some(1024));
    let data = Rng::new(4).normal_vec(37 * 29, 1.0);
    let t = GpuTensor::from_f32(&ctx, 37, 29, &data).unwrap();
    assert!(t.chunks.len() > 1);
    t.fill_u32(&ctx, common::POISON);
    let words: Vec<u32> = bytemuck::pod_collect_to_vec(&t.to_bytes(&ctx).unwrap());
    assert!(words.iter().all(|&w| w == common::POISON));
    // Upload and clear one tensor, upload, read and clear another, then read both.
    let u = GpuTensor::from_f32(&ctx, 37, 29, &data).unwrap();
    u.fill_u32(&ctx, 0);
    let v = GpuTensor::from_f32(&ctx, 37, 29, &data).unwrap();
    assert_eq!(v.to_f32(&ctx).unwrap(), data);
    v.fill_u32(&ctx, 0);
    assert!(u.to_f32(&ctx).unwrap().iter().all(|&x| x.to_bits() == 0));
    assert!(v.to_f32(&ctx).unwrap().iter().all(|&x| x.to_bits() == 0));
}

#[test]
fn a_row_larger_than_the_limit_is_a_clear_error() {
    let ctx = common::ctx_with(Some(64));
    let err = GpuTensor::empty(&ctx, 2, 100, GpuDtype::F32).err().unwrap();
    assert!(err.to_string().contains("binding limit"), "{err}");
}

#[test]
fn released_buffers_are_reused_without_raising_the_peak() {
    let ctx = common::ctx();
    ctx.reset_peak();
    let base = ctx.pool_stats();
    let mb = |n: usize| GpuTensor::empty(&ctx, n, 262144, GpuDtype::F32).unwrap();
    // 1 MiB per row of 262144 f32.
    let a = mb(3);
    drop(a);
    let b = mb(3);
    let s = ctx.pool_stats();
    assert_eq!(s.reused, base.reused + 1, "{s:?}");
    assert_eq!(s.created, base.created + 1, "{s:?}");
    drop(b);
    // A larger request cannot take the held 3 MiB; holding it would raise the mark to 8 MiB,
    // so the pool frees it first: the mark is the 5 MiB a pool-less run would reach.
    let c = mb(5);
    assert_eq!(ctx.memory(), (5 << 20, 5 << 20));
    drop(c);
    // Two of the same size alive at once: one reused, one new; the mark is what was alive.
    let d = mb(5);
    let e = mb(5);
    assert_eq!(ctx.memory(), (10 << 20, 10 << 20));
    drop((d, e));
    assert_eq!(ctx.memory().0, 0);
}

#[test]
fn the_least_recently_released_buffers_are_freed_first() {
    let ctx = common::ctx();
    ctx.reset_peak();
    let mb = |n: usize| GpuTensor::empty(&ctx, n, 262144, GpuDtype::F32).unwrap();
    // 4 + 3 + 2 + 1 MiB alive: the mark is 10 MiB. Released in the order 3, 1, 4, 2.
    let (a4, a3, a2, a1) = (mb(4), mb(3), mb(2), mb(1));
    drop(a3);
    drop(a1);
    drop(a4);
    drop(a2);
    // 5 MiB more must fit under 10 with nothing alive: 3, then 1, then 4 are freed (held 2 MiB).
    // Freeing the largest first would have kept 1 and 2.
    let c = mb(5);
    assert_eq!(ctx.memory(), (5 << 20, 10 << 20));
    let before = ctx.pool_stats();
    let b2 = mb(2);
    let after2 = ctx.pool_stats();
    assert_eq!(
        after2.reused,
        before.reused + 1,
        "the 2 MiB buffer was kept"
    );
    let b1 = mb(1);
    let after1 = ctx.pool_stats();
    assert_eq!(
        after1.created,
        after2.created + 1,
        "the 1 MiB buffer was freed"
    );
    drop((c, b2, b1));
}

#[test]
fn a_reused_buffer_does_not_disturb_work_submitted_before_its_release() {
    // C = A·B is submitted, A is dropped while that work may still run, and a new tensor of A's
    // size takes A's buffer and is overwritten at once: C must still be the product with the old A.
    use wgpress::gpu::matmul::{Layout, matmul_into};
    let ctx = common::ctx();
    let mut rng = Rng::new(77);
    let (m, k, n) = (67, 45, 33);
    let a = rng.normal_vec(m * k, 1.0);
    let b = rng.normal_vec(k * n, 1.0);
    let ga = GpuTensor::from_f32(&ctx, m, k, &a).unwrap();
    let gb = GpuTensor::from_f32(&ctx, k, n, &b).unwrap();
    let gc = GpuTensor::empty(&ctx, m, n, GpuDtype::F32).unwrap();
    matmul_into(&ctx, &ga, &gb, Layout::NN, &gc, false, None).unwrap();
    let reused_before = ctx.pool_stats().reused;
    drop(ga);
    let other = rng.normal_vec(m * k, 5.0);
    let gx = GpuTensor::from_f32(&ctx, m, k, &other).unwrap();
    assert_eq!(ctx.pool_stats().reused, reused_before + 1);
    let want = wgpress::reference::matmul::matmul(&a, &b, m, n, k, false);
    let got = gc.to_f32(&ctx).unwrap();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        // f32 accumulation over k = 45 products of N(0,1) values: far below 1e-4.
        assert!((*g as f64 - w).abs() < 1e-4, "C[{i}] = {g}, want {w}");
    }
    assert_eq!(gx.to_f32(&ctx).unwrap(), other);
}

#[test]
fn chunks_padded_to_sixteen_bytes_fit_the_limit_and_are_as_large_as_possible() {
    use wgpress::gpu::buffer::rows_per_chunk;
    for (cols, dtype, limit) in [
        (250, GpuDtype::F16, 512u64),
        (7, GpuDtype::F16, 64),
        (29, GpuDtype::F32, 1024),
        (3, GpuDtype::F32, 100),
        (4096, GpuDtype::F32, 1 << 27),
    ] {
        let rb = cols as u64 * dtype.size();
        let r = rows_per_chunk(cols, dtype, limit).unwrap() as u64;
        let padded = |r: u64| (r * rb).div_ceil(16) * 16;
        assert!(padded(r) <= limit, "{cols} {dtype:?} {limit}: {r} rows");
        let step = if dtype.size() == 2 && cols % 2 == 1 {
            2
        } else {
            1
        };
        assert!(
            padded(r + step) > limit,
            "{cols} {dtype:?} {limit}: {r} rows is not the most"
        );
    }
}
