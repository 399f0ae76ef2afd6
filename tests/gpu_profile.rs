//! `--profile`: per-family GPU time from timestamp queries (`gpu::profile`), on whatever adapter
//! runs the tests (lavapipe offers timestamp queries; an adapter without them must refuse).

mod common;
use wgpress::gpu::matmul::{Layout, MatmulPath, matmul_into};
use wgpress::gpu::reduce::reduce_rows;
use wgpress::gpu::{GpuDtype, GpuTensor};
use wgpress::reference::reduce::ReduceOp;
use wgpress::rng::Rng;

#[test]
fn profile_times_every_dispatch_by_family() {
    let ctx = common::ctx();
    if !ctx.caps.timestamps {
        let e = ctx.start_profiling().unwrap_err();
        assert!(e.to_string().contains("timestamp"), "{e}");
        return;
    }
    let mut rng = Rng::new(5);
    let a = GpuTensor::from_f32(&ctx, 37, 53, &rng.normal_vec(37 * 53, 1.0)).unwrap();
    let c = GpuTensor::empty(&ctx, 37, 37, GpuDtype::F32).unwrap();
    // Work before profiling starts is not counted.
    matmul_into(&ctx, &a, &a, Layout::NT, &c, false, Some(MatmulPath::Tiled)).unwrap();
    assert!(ctx.take_profile().unwrap().is_none());

    ctx.start_profiling().unwrap();
    let want = c.to_f32(&ctx).unwrap();
    for _ in 0..3 {
        matmul_into(&ctx, &a, &a, Layout::NT, &c, false, Some(MatmulPath::Tiled)).unwrap();
    }
    reduce_rows(&ctx, &a, ReduceOp::Max).unwrap();
    // Timed passes compute the same result as the single-pass submission.
    assert_eq!(c.to_f32(&ctx).unwrap(), want);
    let p = ctx.take_profile().unwrap().expect("profiling was on");
    let mm = p
        .families
        .get("matmul F32xF32 NT/main")
        .unwrap_or_else(|| panic!("no matmul family in {:?}", p.families.keys()));
    assert_eq!(mm.dispatches, 3);
    assert!(mm.seconds > 0.0 && mm.seconds < 60.0, "{mm:?}");
    // Declared work: 2·m·n·k FLOPs per product; A and B read (37 x 53 f32 each), C written.
    assert_eq!(mm.flops, 3.0 * 2.0 * 37.0 * 37.0 * 53.0);
    assert_eq!(
        mm.bytes,
        3.0 * (2.0 * 37.0 * 53.0 * 4.0 + 37.0 * 37.0 * 4.0)
    );
    assert!(
        p.families.keys().any(|k| k.starts_with("reduce")),
        "no reduce family in {:?}",
        p.families.keys()
    );
    let t = p.table();
    assert!(
        t.contains("matmul F32xF32 NT/main") && t.contains("total"),
        "{t}"
    );
    // Taking the profile stops it.
    assert!(ctx.take_profile().unwrap().is_none());
}
