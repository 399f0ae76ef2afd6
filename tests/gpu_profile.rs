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
    let t = p.table(None);
    assert!(
        t.contains("matmul F32xF32 NT/main") && t.contains("total"),
        "{t}"
    );
    // Taking the profile stops it.
    assert!(ctx.take_profile().unwrap().is_none());
}

#[test]
fn floors_are_measured_once_cached_and_shown_as_shares() {
    use wgpress::gpu::peaks::{Peaks, cached_in};
    let ctx = common::ctx();
    let dir = tempfile::tempdir().unwrap();
    let (a, fresh) = cached_in(&ctx, Some(dir.path().to_path_buf())).unwrap();
    assert!(fresh);
    assert!(a.f32_tflops > 0.0 && a.copy_gbps > 0.0, "{a:?}");
    assert_eq!(
        a.coop_f16_tflops.is_some(),
        wgpress::gpu::matmul::coop_available(&ctx)
    );
    let (b, fresh) = cached_in(&ctx, Some(dir.path().to_path_buf())).unwrap();
    assert!(!fresh);
    assert_eq!(a, b);
    // A damaged cache is measured again and rewritten.
    std::fs::write(dir.path().join("peaks.json"), b"{not json").unwrap();
    let (_, fresh) = cached_in(&ctx, Some(dir.path().to_path_buf())).unwrap();
    assert!(fresh);
    let (_, fresh) = cached_in(&ctx, Some(dir.path().to_path_buf())).unwrap();
    assert!(!fresh);

    // Shares against the floors: 2 TFLOP and 5 GB in one second against 4 TFLOP/s and 10 GB/s.
    let mut p = wgpress::gpu::profile::Profile::default();
    let fam = wgpress::gpu::profile::Family {
        dispatches: 1,
        seconds: 1.0,
        flops: 2e12,
        bytes: 5e9,
    };
    p.families.insert("matmul F32xF32 NN/main".into(), fam);
    p.families.insert("matmul_coop F16xF16 NN/main".into(), fam);
    let peaks = Peaks {
        f32_tflops: 4.0,
        copy_gbps: 10.0,
        coop_f16_tflops: None,
    };
    let t = p.table(Some(&peaks));
    let row = |name: &str| t.lines().find(|l| l.starts_with(name)).unwrap().to_string();
    let f32_row = row("matmul F32xF32");
    assert_eq!(f32_row.matches("50%").count(), 2, "{t}");
    // No tensor-core floor: that family's FLOP share is unknown, its bandwidth share is not.
    let coop_row = row("matmul_coop");
    assert_eq!(coop_row.matches("50%").count(), 1, "{t}");
    assert!(
        t.contains("adapter floors (measured): f32 FMA 4.00 TFLOP/s, copy 10.0 GB/s"),
        "{t}"
    );
}

#[test]
fn clock_hold_loads_a_hardware_gpu_for_its_time_and_skips_software() {
    use wgpress::gpu::peaks::hold_clock;
    let ctx = common::ctx();
    let t = std::time::Instant::now();
    hold_clock(&ctx, 0.05).unwrap();
    let held = t.elapsed().as_secs_f64();
    if ctx.software {
        // No kernel runs: one pass of the FMA kernel alone takes about a second on lavapipe.
        assert!(held < 0.05, "held {held} s on a software adapter");
    } else {
        assert!(held >= 0.05, "held {held} s of 0.05");
    }
    hold_clock(&ctx, 0.0).unwrap();
}
