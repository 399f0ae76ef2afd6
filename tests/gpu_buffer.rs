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

#[test]
fn a_row_larger_than_the_limit_is_a_clear_error() {
    let ctx = common::ctx_with(Some(64));
    let err = GpuTensor::empty(&ctx, 2, 100, GpuDtype::F32).err().unwrap();
    assert!(err.to_string().contains("binding limit"), "{err}");
}
