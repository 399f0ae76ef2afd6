mod common;
use wgpress::gpu::matmul::{
    CoopConfig, Layout, MatmulPath, as_tn_pays, coop_available, matmul_into, matmul_into_coop,
    matmul_lower_into, matmul_via_tn, transpose_f16_into,
};
use wgpress::gpu::{GpuContext, GpuDtype, GpuTensor};
use wgpress::reference;
use wgpress::rng::Rng;

/// One comparison: shape (m, n, k), B's layout, input dtypes, accumulate into C, forced path.
struct Case {
    m: usize,
    n: usize,
    k: usize,
    layout: Layout,
    da: GpuDtype,
    db: GpuDtype,
    accumulate: bool,
    path: Option<MatmulPath>,
    /// Forces the cooperative kernel with this tile configuration.
    config: Option<CoopConfig>,
    /// Only C's lower triangle (`matmul_lower_into`, layout TN): elements above the diagonal are
    /// not compared.
    lower: bool,
    /// Through `matmul_via_tn` (transposed copies, then TN).
    via_tn: bool,
}

fn case(m: usize, n: usize, k: usize, layout: Layout, da: GpuDtype, db: GpuDtype) -> Case {
    Case {
        m,
        n,
        k,
        layout,
        da,
        db,
        accumulate: false,
        path: None,
        config: None,
        lower: false,
        via_tn: false,
    }
}

/// The next case of a sweep: a fresh seed, and C accumulated into on every other one.
fn check_next(ctx: &GpuContext, seed: &mut u64, c: Case) {
    *seed += 1;
    check(
        ctx,
        *seed,
        Case {
            accumulate: seed.is_multiple_of(2),
            ..c
        },
    );
}

fn check(ctx: &GpuContext, seed: u64, c: Case) {
    let Case {
        m,
        n,
        k,
        layout,
        da,
        db,
        accumulate,
        path,
        config,
        lower,
        via_tn,
    } = c;
    let mut rng = Rng::new(seed);
    let a = rng.normal_vec(m * k, 1.0);
    let b = rng.normal_vec(n * k, 0.5);
    // Layout TN stores A as k x m; the reference always gets A as m x k.
    let (ga, a_seen) = if layout == Layout::TN {
        let (g, seen) = common::upload(ctx, k, m, &a, da);
        (g, reference::matmul::transpose(&seen, k, m))
    } else {
        common::upload(ctx, m, k, &a, da)
    };
    let (brows, bcols) = if layout == Layout::NT { (n, k) } else { (k, n) };
    let (gb, b_seen) = common::upload(ctx, brows, bcols, &b, db);
    let c0 = rng.normal_vec(m * n, 1.0);
    let gc = GpuTensor::from_f32(ctx, m, n, &c0).unwrap();
    if !accumulate {
        gc.fill_u32(ctx, common::POISON);
    }
    let took = match config {
        _ if lower => matmul_lower_into(ctx, &ga, &gb, &gc, accumulate, path, 0).unwrap(),
        _ if via_tn => matmul_via_tn(ctx, &ga, &gb, layout, &gc, accumulate, path).unwrap(),
        Some(cfg) => {
            matmul_into_coop(ctx, &ga, &gb, layout, &gc, accumulate, cfg).unwrap();
            MatmulPath::Coop
        }
        None => matmul_into(ctx, &ga, &gb, layout, &gc, accumulate, path).unwrap(),
    };
    if let Some(p) = path {
        assert_eq!(took, p);
    }
    let got = gc.to_f32(ctx).unwrap();
    // The cooperative kernel rounds its inputs to f16 when it stages them; the reference sees
    // the same rounded values, so the bound below is again f32 accumulation only.
    let (a_seen, b_seen) = if took == MatmulPath::Coop {
        let r = |v: &[f32]| -> Vec<f32> {
            v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
        };
        (r(&a_seen), r(&b_seen))
    } else {
        (a_seen, b_seen)
    };
    let bt = layout == Layout::NT;
    let mut want = reference::matmul::matmul(&a_seen, &b_seen, m, n, k, bt);
    let scale = reference::matmul::abs_matmul(&a_seen, &b_seen, m, n, k, bt);
    if accumulate {
        for (w, c) in want.iter_mut().zip(&c0) {
            *w += *c as f64;
        }
    }
    // f32 accumulation of k products: |error| <= k * 2^-24 * sum|a||b| (plus one rounding of the
    // accumulated C); we allow 2x that. Inputs were rounded to 16 bits before both sides saw them.
    for i in (0..m * n).filter(|i| !lower || i % n <= i / n) {
        let tol = 2.0 * (k as f64 + 2.0) * 2f64.powi(-24) * (scale[i] + c0[i].abs() as f64) + 1e-30;
        let e = (got[i] as f64 - want[i]).abs();
        assert!(
            got[i].is_finite() && e <= tol,
            "{m}x{n}x{k} {layout:?} {da:?}x{db:?} acc={accumulate} {config:?}: C[{}, {}] = {} want {} (tol {tol:e})",
            i / n,
            i % n,
            got[i],
            want[i]
        );
    }
}

#[test]
fn f32_tiled_matches_reference_on_odd_shapes() {
    let ctx = common::ctx();
    let mut seed = 10;
    for &(m, n, k) in &[
        (37, 203, 29),
        (129, 96, 200),
        (1, 131, 7),
        (250, 70, 300),
        (3, 1, 1),
    ] {
        for layout in [Layout::NN, Layout::NT] {
            seed += 1;
            check(
                &ctx,
                seed,
                Case {
                    accumulate: false,
                    path: Some(MatmulPath::Tiled),
                    ..case(m, n, k, layout, GpuDtype::F32, GpuDtype::F32)
                },
            );
        }
    }
}

#[test]
fn sixteen_bit_inputs_and_accumulation() {
    let ctx = common::ctx();
    let mut seed = 100;
    for (da, db) in [
        (GpuDtype::F16, GpuDtype::F16),
        (GpuDtype::BF16, GpuDtype::F32),
        (GpuDtype::F32, GpuDtype::BF16),
        (GpuDtype::F16, GpuDtype::BF16),
    ] {
        for layout in [Layout::NN, Layout::NT] {
            check_next(
                &ctx,
                &mut seed,
                Case {
                    path: None,
                    ..case(67, 45, 133, layout, da, db)
                },
            );
        }
    }
}

#[test]
fn chunked_operands_match_reference() {
    // 2 KiB bindings: A (130 x 61 f32 = 31 KiB) and B split in many chunks, so the wrapper walks
    // row ranges of A/C and splits K (NN) or N (NT) across B's chunks.
    let ctx = common::ctx_with(Some(2048));
    check(
        &ctx,
        7,
        Case {
            accumulate: false,
            path: None,
            ..case(130, 77, 61, Layout::NN, GpuDtype::F32, GpuDtype::F32)
        },
    );
    check(
        &ctx,
        8,
        Case {
            accumulate: false,
            path: None,
            ..case(130, 77, 61, Layout::NT, GpuDtype::F32, GpuDtype::F32)
        },
    );
    check(
        &ctx,
        9,
        Case {
            accumulate: true,
            path: None,
            ..case(41, 150, 97, Layout::NN, GpuDtype::F16, GpuDtype::BF16)
        },
    );
    check(
        &ctx,
        10,
        Case {
            accumulate: false,
            path: None,
            ..case(41, 150, 97, Layout::NT, GpuDtype::BF16, GpuDtype::F16)
        },
    );
}

#[test]
fn cooperative_path_matches_reference_where_offered() {
    let ctx = common::ctx();
    if !wgpress::gpu::matmul::coop_available(&ctx) {
        // lavapipe has no cooperative matrices; the device run (BENCHMARKS.md) executes this test
        // on the H100/H200 where the feature exists. Here: asking for it is a clear error.
        eprintln!(
            "adapter {} has no f16 cooperative matrices: coop path not exercised here",
            ctx.adapter
        );
        let mut rng = Rng::new(3);
        let a = rng.normal_vec(64 * 16, 1.0);
        let (ga, _) = common::upload(&ctx, 64, 16, &a, GpuDtype::F16);
        let gc = GpuTensor::empty(&ctx, 64, 64, GpuDtype::F32).unwrap();
        let (gb, _) = common::upload(&ctx, 16, 64, &a, GpuDtype::F16);
        let e = matmul_into(
            &ctx,
            &ga,
            &gb,
            Layout::NN,
            &gc,
            false,
            Some(MatmulPath::Coop),
        )
        .unwrap_err();
        assert!(e.to_string().contains("cooperative"), "{e}");
        // The automatic choice on such an adapter is the tiled kernel.
        let took = matmul_into(&ctx, &ga, &gb, Layout::NN, &gc, false, None).unwrap();
        assert_eq!(took, MatmulPath::Tiled);
        return;
    }
    // Edge tiles in m, n and k (k below one 32-deep slice and not a multiple of 16), several
    // workgroups in both directions, every layout, f16 and converted bf16/f32 sources.
    let mut seed = 500;
    for &(m, n, k) in &[
        (64, 64, 16),
        (37, 203, 29),
        (129, 96, 200),
        (1, 131, 7),
        (250, 300, 61),
    ] {
        for layout in [Layout::NN, Layout::NT, Layout::TN] {
            for (da, db) in [
                (GpuDtype::F16, GpuDtype::F16),
                (GpuDtype::BF16, GpuDtype::F16),
                (GpuDtype::F32, GpuDtype::F32),
            ] {
                check_next(
                    &ctx,
                    &mut seed,
                    Case {
                        path: Some(MatmulPath::Coop),
                        ..case(m, n, k, layout, da, db)
                    },
                );
            }
        }
    }
    // f16 operands pick the cooperative kernel by themselves; f32 ones never do.
    let mut rng = Rng::new(4);
    let a = rng.normal_vec(48 * 40, 1.0);
    let (ga, _) = common::upload(&ctx, 48, 40, &a, GpuDtype::F16);
    let gc = GpuTensor::empty(&ctx, 48, 48, GpuDtype::F32).unwrap();
    let took = matmul_into(&ctx, &ga, &ga, Layout::NT, &gc, false, None).unwrap();
    assert_eq!(took, MatmulPath::Coop);
    let (gf, _) = common::upload(&ctx, 48, 40, &a, GpuDtype::F32);
    let took = matmul_into(&ctx, &gf, &gf, Layout::NT, &gc, false, None).unwrap();
    assert_eq!(took, MatmulPath::Tiled);
}

/// `ctx` when its adapter has f16 cooperative matrices; otherwise `None`, said on stderr (lavapipe
/// has none: these tests run on the device, BENCHMARKS.md).
fn coop(ctx: wgpress::gpu::GpuContext) -> Option<wgpress::gpu::GpuContext> {
    if coop_available(&ctx) {
        return Some(ctx);
    }
    eprintln!(
        "adapter {} has no f16 cooperative matrices: skipped",
        ctx.adapter
    );
    None
}

#[test]
fn cooperative_path_walks_chunked_operands_where_offered() {
    // 2 KiB bindings: every operand is split, as in the tiled kernel's chunk tests.
    let Some(ctx) = coop(common::ctx_with(Some(2048))) else {
        return;
    };
    for (seed, (m, n, k), layout, accumulate) in [
        (41, (130, 77, 61), Layout::TN, false),
        (42, (129, 129, 33), Layout::TN, true),
        (43, (70, 90, 45), Layout::NN, false),
        (44, (70, 90, 45), Layout::NT, true),
    ] {
        check(
            &ctx,
            seed,
            Case {
                accumulate,
                path: Some(MatmulPath::Coop),
                ..case(m, n, k, layout, GpuDtype::F16, GpuDtype::F16)
            },
        );
    }
}

#[test]
fn every_coop_tile_configuration_matches_reference_where_offered() {
    // Each tuning candidate on shapes that reach every staging path: interior slices with offsets
    // and leading dimensions that are multiples of 8 (eight elements per load; 96 and 200), even
    // ones (pairs; 138), odd ones (single elements; 29), and edge tiles; tiles wholly inside C
    // (stored straight from the accumulators when not accumulating) and edge tiles through the scratch.
    let Some(ctx) = coop(common::ctx()) else {
        return;
    };
    let mut seed = 1300;
    // The tuning candidates and 64-deep slices (offered to `bench --coop-config`).
    let configs: Vec<CoopConfig> = CoopConfig::CANDIDATES
        .into_iter()
        .chain([CoopConfig::parse("2x2x1k64").unwrap()])
        .collect();
    for &cfg in &configs {
        for &(m, n, k) in &[
            (300, 264, 96),
            (520, 272, 200),
            (266, 138, 138),
            (37, 203, 29),
        ] {
            for layout in [Layout::NN, Layout::NT, Layout::TN] {
                for (da, db) in [
                    (GpuDtype::F16, GpuDtype::F16),
                    (GpuDtype::BF16, GpuDtype::F32),
                ] {
                    check_next(
                        &ctx,
                        &mut seed,
                        Case {
                            config: Some(cfg),
                            ..case(m, n, k, layout, da, db)
                        },
                    );
                }
            }
        }
    }
    // Chunked operands (2 KiB bindings) under the widest tiles.
    let small = common::ctx_with(Some(2048));
    for &cfg in &configs {
        for (layout, accumulate) in [(Layout::NN, true), (Layout::NT, false), (Layout::TN, true)] {
            seed += 1;
            check(
                &small,
                seed,
                Case {
                    accumulate,
                    config: Some(cfg),
                    ..case(70, 90, 48, layout, GpuDtype::F16, GpuDtype::F16)
                },
            );
        }
    }
}

/// Products that tile exactly (m, n multiples of every candidate's tile, k of its slice depth,
/// operands 8-aligned) take the kernel's EXACT variant, which compiles only the eight-element
/// copy and no bounds checks: each candidate and layout against the reference, accumulating or
/// not, the lower-triangle TN product too, and one non-exact product alongside to show the
/// variant is chosen by shape (the profile names each pipeline).
#[test]
fn exact_tiling_variant_matches_reference_where_offered() {
    let Some(ctx) = coop(common::ctx()) else {
        return;
    };
    let profiled = ctx.start_profiling().is_ok();
    let mut seed = 1700;
    let deep = CoopConfig::parse("2x2x1k64").unwrap();
    for cfg in CoopConfig::CANDIDATES.into_iter().chain([deep]) {
        for layout in [Layout::NN, Layout::NT, Layout::TN] {
            check_next(
                &ctx,
                &mut seed,
                Case {
                    config: Some(cfg),
                    ..case(768, 1280, 192, layout, GpuDtype::F16, GpuDtype::F16)
                },
            );
        }
    }
    for accumulate in [false, true] {
        seed += 1;
        check(
            &ctx,
            seed,
            Case {
                accumulate,
                path: Some(MatmulPath::Coop),
                lower: true,
                ..case(768, 768, 320, Layout::TN, GpuDtype::F16, GpuDtype::F16)
            },
        );
    }
    seed += 1;
    check(
        &ctx,
        seed,
        Case {
            config: Some(CoopConfig::DEFAULT),
            ..case(770, 1280, 192, Layout::NT, GpuDtype::F16, GpuDtype::F16)
        },
    );
    if profiled {
        let prof = ctx.take_profile().unwrap().unwrap();
        let names: Vec<&String> = prof.families.keys().collect();
        for cfg in CoopConfig::CANDIDATES.into_iter().chain([deep]) {
            let exact = format!("matmul_coop F16xF16 NT {} exact/main", cfg.name());
            assert!(
                prof.families.contains_key(&exact),
                "{exact} not in {names:?}"
            );
        }
        let general = format!("matmul_coop F16xF16 NT {}/main", CoopConfig::DEFAULT.name());
        assert!(
            prof.families.contains_key(&general),
            "{general} not in {names:?}"
        );
    }
}

#[test]
fn lower_triangle_tn_products_match_reference() {
    // Square and rectangular C, tiles straddling the diagonal, C split into 7-row chunks (the
    // triangle test then needs each dispatch's row offset), accumulation; the cooperative kernel
    // too where the adapter has it.
    let mut seed = 1500;
    let big = common::ctx();
    let small = common::ctx_with(Some(2048));
    let coop = coop_available(&big);
    for ctx in [&big, &small] {
        for &(m, n, k) in &[(300, 300, 37), (130, 201, 70), (201, 130, 9)] {
            for (da, path) in [
                (GpuDtype::F32, MatmulPath::Tiled),
                (GpuDtype::F16, MatmulPath::Coop),
            ] {
                if path == MatmulPath::Coop && !coop {
                    continue;
                }
                check_next(
                    ctx,
                    &mut seed,
                    Case {
                        path: Some(path),
                        lower: true,
                        ..case(m, n, k, Layout::TN, da, da)
                    },
                );
            }
        }
    }
    // Tiles wholly above the diagonal are not computed: C[0][299] lies in the tile of rows
    // 0..128 and columns 256..300 of either kernel, and keeps its poison.
    let (a, _) = common::upload(
        &big,
        20,
        300,
        &Rng::new(3).normal_vec(20 * 300, 1.0),
        GpuDtype::F32,
    );
    let c = GpuTensor::empty(&big, 300, 300, GpuDtype::F32).unwrap();
    c.fill_u32(&big, common::POISON);
    matmul_lower_into(&big, &a, &a, &c, false, None, 0).unwrap();
    let got = c.to_f32(&big).unwrap();
    assert_eq!(got[299].to_bits(), common::POISON);
    assert!(got[299 * 300].is_finite());
}

#[test]
fn coop_configurations_parse_and_fit_the_workgroup_limit() {
    for cfg in CoopConfig::CANDIDATES {
        assert_eq!(CoopConfig::parse(&cfg.name()).unwrap(), cfg);
        // 48 KiB: the smallest workgroup memory limit seen on the adapters we target.
        assert!(cfg.workgroup_bytes() <= 48 * 1024, "{cfg:?}");
    }
    assert_eq!(CoopConfig::parse("2x2x1k64").unwrap().bk, 64);
    assert_eq!(CoopConfig::parse("2x2x1").unwrap().bk, 32);
    for bad in [
        "2x2", "3x2x2", "2x2x3", "axbxc", "", "2x2x1k48", "2x2x1k", "2x2k64",
    ] {
        assert!(CoopConfig::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn shape_mismatch_is_an_error() {
    let ctx = common::ctx();
    let a = GpuTensor::empty(&ctx, 4, 5, GpuDtype::F32).unwrap();
    let b = GpuTensor::empty(&ctx, 6, 3, GpuDtype::F32).unwrap();
    let c = GpuTensor::empty(&ctx, 4, 3, GpuDtype::F32).unwrap();
    let e = matmul_into(&ctx, &a, &b, Layout::NN, &c, false, None).unwrap_err();
    assert!(e.to_string().contains("matmul"), "{e}");
}

#[test]
fn tn_layout_matches_reference_on_odd_shapes() {
    // C = A^T * B with A stored k x m: edge tiles in m, n and k, including k < 16 and m = n = 1.
    let ctx = common::ctx();
    let mut seed = 900;
    for &(m, n, k) in &[
        (37, 203, 29),
        (129, 96, 200),
        (1, 131, 7),
        (250, 70, 300),
        (3, 1, 1),
        (129, 129, 37),
    ] {
        check_next(
            &ctx,
            &mut seed,
            Case {
                path: Some(MatmulPath::Tiled),
                ..case(m, n, k, Layout::TN, GpuDtype::F32, GpuDtype::F32)
            },
        );
    }
    for (da, db) in [
        (GpuDtype::F16, GpuDtype::F16),
        (GpuDtype::BF16, GpuDtype::BF16),
        (GpuDtype::F16, GpuDtype::F32),
    ] {
        seed += 1;
        check(
            &ctx,
            seed,
            Case {
                accumulate: false,
                path: None,
                ..case(67, 45, 133, Layout::TN, da, db)
            },
        );
    }
}

#[test]
fn tn_layout_chunked_operands_match_reference() {
    // 2 KiB bindings: A (61 x 130 f32, 3 rows a chunk) and B (61 x 77, 6 rows a chunk) split K at
    // different places, so the wrapper walks their common K ranges (accumulating pass by pass),
    // and C (130 x 77, 6 rows a chunk) is written chunk by chunk as column ranges of A.
    let ctx = common::ctx_with(Some(2048));
    for (seed, (m, n, k), da, db, accumulate) in [
        (31, (130, 77, 61), GpuDtype::F32, GpuDtype::F32, false),
        (32, (130, 77, 61), GpuDtype::F32, GpuDtype::F32, true),
        (33, (41, 150, 97), GpuDtype::F16, GpuDtype::BF16, false),
        (34, (129, 129, 33), GpuDtype::BF16, GpuDtype::F16, true),
    ] {
        check(
            &ctx,
            seed,
            Case {
                accumulate,
                path: None,
                ..case(m, n, k, Layout::TN, da, db)
            },
        );
    }
}

#[test]
fn tn_layout_with_no_rows_zeroes_or_keeps_c() {
    let ctx = common::ctx();
    // k = 0 (no rows of A or B): C is zeroed, or kept when accumulating.
    let a0 = GpuTensor::empty(&ctx, 0, 5, GpuDtype::F32).unwrap();
    let b0 = GpuTensor::empty(&ctx, 0, 3, GpuDtype::F32).unwrap();
    let c0 = GpuTensor::empty(&ctx, 5, 3, GpuDtype::F32).unwrap();
    c0.fill_u32(&ctx, common::POISON);
    matmul_into(&ctx, &a0, &b0, Layout::TN, &c0, false, None).unwrap();
    assert!(c0.to_f32(&ctx).unwrap().iter().all(|&v| v == 0.0));
}

#[test]
fn products_via_transposes_match_reference() {
    let ctx = common::ctx();
    let mut paths = vec![MatmulPath::Tiled];
    if coop_available(&ctx) {
        paths.push(MatmulPath::Coop);
    }
    // Multiples of 4 (the transpose's requirement) that are not multiples of the 64-wide
    // transpose tile or of any matmul tile, so every edge path of both kernels runs. NN
    // transposes A only, NT both, TN neither.
    let mut seed = 900;
    for path in paths {
        for layout in [Layout::NT, Layout::NN, Layout::TN] {
            for &(m, n, k) in &[(36, 52, 100), (132, 68, 44), (8, 200, 260)] {
                check_next(
                    &ctx,
                    &mut seed,
                    Case {
                        path: Some(path),
                        via_tn: true,
                        ..case(m, n, k, layout, GpuDtype::F16, GpuDtype::F16)
                    },
                );
            }
        }
    }
    // A shape the transposes cannot take is a clear error, not a wrong product.
    let mut rng = Rng::new(5);
    let a = rng.normal_vec(6 * 10, 1.0);
    let (ga, _) = common::upload(&ctx, 6, 10, &a, GpuDtype::F16);
    let gc = GpuTensor::empty(&ctx, 6, 6, GpuDtype::F32).unwrap();
    let e = matmul_via_tn(&ctx, &ga, &ga, Layout::NT, &gc, false, None).unwrap_err();
    assert!(e.to_string().contains("multiples of 4"), "{e}");
}

#[test]
fn transpose_moves_every_f16_element() {
    let ctx = common::ctx();
    // Edge tiles in both directions (neither side a multiple of 64), and a single tile.
    for (seed, &(rows, cols)) in [(36, 204), (132, 68), (4, 8)].iter().enumerate() {
        let mut rng = Rng::new(40 + seed as u64);
        let v = rng.normal_vec(rows * cols, 3.0);
        let (x, _) = common::upload(&ctx, rows, cols, &v, GpuDtype::F16);
        let y = GpuTensor::empty(&ctx, cols, rows, GpuDtype::F16).unwrap();
        y.fill_u32(&ctx, common::POISON);
        transpose_f16_into(&ctx, &x, &y).unwrap();
        let bits = |t: &GpuTensor| -> Vec<u16> {
            let mut b = vec![0u8; t.rows * t.cols * 2];
            t.read_into(&ctx, &mut b).unwrap();
            b.chunks_exact(2)
                .map(|p| u16::from_le_bytes([p[0], p[1]]))
                .collect()
        };
        // A move, not arithmetic: every element bit for bit, the poison nowhere.
        let want = reference::matmul::transpose(&bits(&x), rows, cols);
        assert_eq!(bits(&y), want, "{rows}x{cols}");
    }
}

#[test]
fn only_large_f16_products_are_run_as_tn() {
    let ctx = common::ctx();
    let t = |rows: usize, cols: usize, dtype: GpuDtype| {
        GpuTensor::empty(&ctx, rows, cols, dtype).unwrap()
    };
    let f16 = GpuDtype::F16;
    let nt = |a: &GpuTensor, b: &GpuTensor| as_tn_pays(Layout::NT, a, b);
    // NT, C of 4096 x 4096: mn / (m + n) = 2048, the threshold.
    assert!(nt(&t(4096, 64, f16), &t(4096, 64, f16)));
    assert!(!nt(&t(2048, 64, f16), &t(4096, 64, f16)));
    assert!(!nt(&t(4096, 64, GpuDtype::F32), &t(4096, 64, f16)));
    // Shapes the default tiles do not cover exactly stay NT.
    assert!(!nt(&t(4000, 64, f16), &t(4096, 64, f16)));
    assert!(!nt(&t(4096, 64, f16), &t(4000, 64, f16)));
    assert!(!nt(&t(4096, 48, f16), &t(4096, 48, f16)));
    assert!(!nt(&t(4096, 64, f16), &t(4096, 32, f16)));
    // NN transposes only A, so n alone sets the threshold (mn >= 2048 m).
    let nn = |a: &GpuTensor, b: &GpuTensor| as_tn_pays(Layout::NN, a, b);
    assert!(nn(&t(128, 64, f16), &t(64, 2048, f16)));
    assert!(!nn(&t(4096, 64, f16), &t(64, 1920, f16)));
    assert!(!nn(&t(4096, 64, f16), &t(64, 2048, GpuDtype::BF16)));
    assert!(!nn(&t(4000, 64, f16), &t(64, 4096, f16)));
    assert!(!nn(&t(4096, 48, f16), &t(48, 4096, f16)));
    // A mismatched K is left for the product's own shape error.
    assert!(!nn(&t(4096, 64, f16), &t(32, 4096, f16)));
    // TN is the kernel's own orientation.
    assert!(!as_tn_pays(
        Layout::TN,
        &t(64, 4096, f16),
        &t(64, 4096, f16)
    ));
}

/// The split cooperative product (GPTQ's lazy updates on the tensor cores) must be as accurate
/// as f32, not as f16: regions inside larger buffers, rows of A and columns of B whose
/// magnitudes span 1e-4..1e4 (each is scaled by its own power of two) with an outlier per row,
/// an all-zero row, both B layouts, the general and the exact (whole tiles, 8-aligned) variant,
/// alpha = -1 with accumulation, and a poisoned C where it is overwritten. Where cooperative
/// matrices are missing (lavapipe) asking for it must fail with a clear error.
#[test]
fn split_region_products_are_f32_accurate_where_offered() {
    use wgpress::gpu::matmul::{RegionProduct, region_product};
    let ctx = common::ctx();
    // (m, n, k, b_trans, pad, accumulate): pad != 0 puts every region at an odd offset with
    // odd leading dimensions (single-element staging); pad = 0 with multiples of the tile is the
    // exact variant (GPTQ's far updates have K = 1024).
    let cases = [
        (200, 150, 77, false, 3, false),
        (130, 70, 45, true, 5, true),
        (256, 128, 128, false, 0, true),
        (128, 256, 1024, false, 0, true),
        (128, 128, 96, true, 0, false),
    ];
    for (seed, &(m, n, k, bt, pad, acc)) in cases.iter().enumerate() {
        let mut rng = Rng::new(900 + seed as u64);
        let (lda, ldb_cols, ldc) = (k + pad, if bt { k } else { n } + pad, n + pad);
        let b_rows = if bt { n } else { k };
        let mut a = rng.normal_vec((m + 1) * lda, 1.0);
        for r in 0..m {
            let s = 10f32.powi((r % 9) as i32 - 4) * if r == 7 { 0.0 } else { 1.0 };
            let row = &mut a[pad + r * lda..pad + r * lda + k];
            row.iter_mut().for_each(|v| *v *= s);
            row[r % k] *= 300.0;
        }
        let mut b = rng.normal_vec((b_rows + 1) * ldb_cols, 1.0);
        for i in 0..b_rows * ldb_cols {
            let col = if bt { i / ldb_cols } else { i % ldb_cols };
            b[pad + i] *= 10f32.powi((col % 7) as i32 - 3);
        }
        let c0 = rng.normal_vec((m + 1) * ldc, 1.0);
        let ga = GpuTensor::from_f32(&ctx, m + 1, lda, &a).unwrap();
        let gb = GpuTensor::from_f32(&ctx, b_rows + 1, ldb_cols, &b).unwrap();
        let gc = GpuTensor::from_f32(&ctx, m + 1, ldc, &c0).unwrap();
        if !acc {
            gc.fill_u32(&ctx, common::POISON);
        }
        let r = RegionProduct {
            m,
            n,
            k,
            a_off: pad,
            lda,
            b_off: pad,
            ldb: ldb_cols,
            c_off: pad,
            ldc,
            b_trans: bt,
            alpha: -1.0,
            accumulate: acc,
            split: true,
        };
        if !coop_available(&ctx) {
            let e = region_product(&ctx, &ga, &gb, &gc, r)
                .unwrap_err()
                .to_string();
            assert!(e.contains("split cooperative product"), "{e}");
            return;
        }
        region_product(&ctx, &ga, &gb, &gc, r).unwrap();
        let got = gc.to_f32(&ctx).unwrap();
        let ad: Vec<f32> = (0..m * k).map(|i| a[pad + (i / k) * lda + i % k]).collect();
        let (br, bc) = if bt { (n, k) } else { (k, n) };
        let bd: Vec<f32> = (0..br * bc)
            .map(|i| b[pad + (i / bc) * ldb_cols + i % bc])
            .collect();
        let want = reference::matmul::matmul(&ad, &bd, m, n, k, bt);
        let scale = reference::matmul::abs_matmul(&ad, &bd, m, n, k, bt);
        let row_max: Vec<f64> = (0..m)
            .map(|r| {
                ad[r * k..(r + 1) * k]
                    .iter()
                    .fold(0f64, |x, &v| x.max(v.abs() as f64))
            })
            .collect();
        let col_max: Vec<f64> = (0..n)
            .map(|c| {
                (0..k).fold(0f64, |x, t| {
                    x.max(bd[if bt { c * k + t } else { t * n + c }].abs() as f64)
                })
            })
            .collect();
        // The largest magnitude of the product's running sum over K (at 16-deep steps).
        let partial = |i: usize, j: usize| {
            let (mut s, mut top) = (0f64, 0f64);
            for t in 0..k {
                s += ad[i * k + t] as f64 * bd[if bt { j * k + t } else { t * n + j }] as f64;
                if t % 16 == 15 || t + 1 == k {
                    top = top.max(s.abs());
                }
            }
            top
        };
        for i in 0..m {
            for j in 0..n {
                let e = pad + i * ldc + j;
                let base = if acc { c0[e] as f64 } else { 0.0 };
                let w = base - want[i * n + j];
                // Tolerance: each term is carried as hi·hi + hi·lo + lo·hi of scaled halves, off
                // by at most about 2^-20 of |a||b| (lo·lo dropped, lo rounded to 11 bits): 2^-18
                // of Σ|a||b| with room. The tensor cores add each 16-deep product into the f32
                // accumulator with up to 2^-23 of error, truncating (so the errors need not
                // cancel): 3·ceil(k/16) additions, each within 2^-23 of the largest partial sum
                // (`partial`, f64), plus 2^-23 of Σ|a||b| per product for the alignment inside
                // one. Elements more than 2^17 below their row's (column's) largest are carried
                // within 2^-38 of it, k times; C's own rounding is 2^-24 of |C|. f16 inputs alone
                // err by about 2^-11 of the largest term, far above this for small k (the
                // first case's outliers; measured 1e-8 against a tolerance of 7e-10 when the low
                // halves were lost).
                let steps = 3.0 * k.div_ceil(16) as f64 + 2.0;
                let tol = 2f64.powi(-18) * scale[i * n + j]
                    + 3.0 * 2f64.powi(-23) * scale[i * n + j]
                    + steps * 2f64.powi(-23) * partial(i, j)
                    + k as f64 * 2f64.powi(-36) * row_max[i] * col_max[j]
                    + 2f64.powi(-23) * w.abs()
                    + 1e-30;
                let g = got[e] as f64;
                assert!(
                    got[e].is_finite() && (g - w).abs() <= tol,
                    "{m}x{n}x{k} bt={bt} pad={pad} acc={acc}: C[{i}, {j}] = {g} want {w} (tol {tol:e})"
                );
            }
        }
        // Outside the region C is untouched.
        for e in (0..pad).chain((pad + (m - 1) * ldc + n)..(m + 1) * ldc) {
            assert_eq!(
                got[e].to_bits(),
                if acc { c0[e].to_bits() } else { common::POISON },
                "C[{e}] outside the region"
            );
        }
    }
}

/// The operand split of split products (`shaders/split.wgsl`) against its CPU reference: rows
/// read along K (op(A)) and columns read across rows (op(B)), odd offsets and extents (padded
/// lines and positions must come out zero over a poisoned buffer), lines scaled 1e-5..1e5, a
/// zero line, and both segment orders.
#[test]
fn split_operands_match_the_reference() {
    use half::f16;
    use wgpress::gpu::matmul::split_operand;
    let ctx = common::ctx();
    // (lines, k, lines stored contiguously, lo segment)
    for (seed, &(lines, k, line_contig, lo_seg)) in [
        (70usize, 45usize, false, 2u32),
        (131, 33, true, 1),
        (5, 96, false, 1),
    ]
    .iter()
    .enumerate()
    {
        let mut rng = Rng::new(40 + seed as u64);
        let off = 3;
        let (ls, ks) = if line_contig {
            (1, lines + 2)
        } else {
            (k + 5, 1)
        };
        let len = off + (lines - 1) * ls + (k - 1) * ks + 7;
        let mut x = rng.normal_vec(len, 1.0);
        for l in 0..lines {
            let s = 10f32.powi((l % 11) as i32 - 5) * if l == 4 { 0.0 } else { 1.0 };
            for t in 0..k {
                x[off + l * ls + t * ks] *= s;
            }
        }
        let src = GpuTensor::from_f32(&ctx, 1, len, &x).unwrap();
        let got = split_operand(&ctx, &src, lines, k, off, ls, ks, lo_seg);
        if !ctx.caps.shader_f16 {
            assert!(got.unwrap_err().to_string().contains("f16"));
            return;
        }
        let (got, lp, kp) = got.unwrap();
        assert!(lp >= lines && kp >= k && lp % 64 == 0);
        let want =
            reference::matmul::split_operand(&x[off..], lines, k, ls, ks, lp, kp, lo_seg as usize);
        assert_eq!(got.len(), want.len());
        let lo_rows = (lo_seg as usize * kp)..((lo_seg as usize + 1) * kp);
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            let (row, l) = (i / lp, i % lp);
            let what = format!("{lines}x{k} line {l} row {row}: got {g:#06x} want {w:#06x}");
            if lo_rows.contains(&row) {
                // Low halves: WGSL leaves the rounding direction of an f32 -> f16 conversion to
                // the implementation (the nearest value above or below), so one unit in the last
                // place either way; a driver that flushes f16 subnormals may give zero for one.
                let (gf, wf) = (f16::from_bits(g).to_f64(), f16::from_bits(w).to_f64());
                let ulp = if w & 0x7c00 == 0 {
                    2f64.powi(-24)
                } else {
                    2f64.powi(((w >> 10) & 0x1f) as i32 - 25)
                };
                let flushed = w & 0x7c00 == 0 && gf == 0.0;
                assert!((gf - wf).abs() <= ulp || flushed, "{what}");
            } else {
                // High halves, exponents and padding are exact.
                assert_eq!(g, w, "{what}");
            }
        }
    }
}
