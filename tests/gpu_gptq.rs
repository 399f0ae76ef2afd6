//! GPU GPTQ (`gpu::gptq`) against RTN, the f64 reference GPTQ and itself under chunking, on fresh
//! random layers whose shapes are neither square nor powers of two.

mod common;
use common::{ctx, ctx_with};
use wgpress::gpu::gptq::gptq;
use wgpress::gpu::{GpuContext, GpuTensor};
use wgpress::quant::QuantSpec;
use wgpress::quant::gptq::GptqOptions;
use wgpress::rng::Rng;

/// Weights (rows x cols, std 0.02 with a few large entries) and H = (2/t)·XᵀX from t tokens of
/// correlated inputs with a few heavy channels, like a real layer's calibration statistics.
fn layer(rows: usize, cols: usize, t: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = Rng::new(seed);
    let mut w = rng.normal_vec(rows * cols, 0.02);
    for i in (0..w.len()).step_by(97) {
        w[i] *= 6.0;
    }
    let mut x = rng.normal_vec(t * cols, 1.0);
    for r in 0..t {
        for c in 1..cols {
            x[r * cols + c] += 0.6 * x[r * cols + c - 1];
        }
        x[r * cols + 3 % cols] *= 8.0;
    }
    let mut h = vec![0f32; cols * cols];
    for i in 0..cols {
        for j in 0..cols {
            let s: f64 = (0..t)
                .map(|r| x[r * cols + i] as f64 * x[r * cols + j] as f64)
                .sum();
            h[i * cols + j] = (2.0 * s / t as f64) as f32;
        }
    }
    (w, h)
}

/// tr(Δ H Δᵀ) / tr(W H Wᵀ) in f64: the relative output error on the calibration inputs.
fn out_err(w: &[f32], deq: &[f32], h: &[f32], rows: usize, cols: usize) -> f64 {
    let quad = |m: &dyn Fn(usize) -> f64| -> f64 {
        let mut s = 0.0;
        for r in 0..rows {
            for i in 0..cols {
                let a = m(r * cols + i);
                if a == 0.0 {
                    continue;
                }
                for j in 0..cols {
                    s += a * h[i * cols + j] as f64 * m(r * cols + j);
                }
            }
        }
        s
    };
    quad(&|k| w[k] as f64 - deq[k] as f64) / quad(&|k| w[k] as f64)
}

/// The GPU result against the f64 reference: at most 1% of the integers differ (f32 summation
/// order may flip a rounding tie; in practice none do) and the layer output errors agree within 2%.
fn assert_close_to_reference(
    label: &str,
    got: &wgpress::quant::gptq::GptqResult,
    want: &wgpress::quant::gptq::GptqResult,
    w: &[f32],
    h: &[f32],
    rows: usize,
    cols: usize,
) {
    let differ = got
        .q
        .q
        .iter()
        .zip(&want.q.q)
        .filter(|(a, b)| a != b)
        .count();
    eprintln!("{label}: {differ} differ");
    assert!(
        differ * 100 <= got.q.q.len(),
        "{label}: {differ} of {} integers differ",
        got.q.q.len()
    );
    let e_g = wgpress::reference::gptq::layer_output_error(w, &got.q.dequantize(), rows, cols, h);
    let e_r = wgpress::reference::gptq::layer_output_error(w, &want.q.dequantize(), rows, cols, h);
    assert!(
        (e_g - e_r).abs() <= 0.02 * e_r,
        "{label}: gpu {e_g} reference {e_r}"
    );
    eprintln!("{label}: output error gpu {e_g:.4e} ref {e_r:.4e}");
}

fn run(
    ctx: &GpuContext,
    w: &[f32],
    h: &[f32],
    rows: usize,
    cols: usize,
    o: &GptqOptions,
) -> wgpress::quant::gptq::GptqResult {
    let ht = GpuTensor::from_f32(ctx, cols, cols, h).unwrap();
    gptq(ctx, w, rows, cols, &ht, o).unwrap().0
}

#[test]
fn diagonal_hessian_without_act_order_is_rtn() {
    let ctx = ctx();
    // 42 columns: rows of the packed result are not whole words, so the read-back unpacks them.
    let (rows, cols) = (13, 42);
    let (w, _) = layer(rows, cols, 1, 1);
    let mut rng = Rng::new(2);
    let mut h = vec![0f32; cols * cols];
    for i in 0..cols {
        h[i * cols + i] = 0.5 + rng.uniform() as f32;
    }
    for (bits, group, sym) in [(4, Some(6), false), (3, None, true), (2, Some(21), false)] {
        let spec = QuantSpec::new(bits, group, sym).unwrap();
        let mut o = GptqOptions::new(spec);
        o.act_order = false;
        let got = run(&ctx, &w, &h, rows, cols, &o);
        let want = wgpress::reference::quant::rtn(&w, rows, cols, &spec).unwrap();
        assert_eq!(got.q.q, want.q, "{spec:?}");
        assert_eq!(got.q.scales, want.scales, "{spec:?}");
        assert_eq!(got.q.zeros, want.zeros, "{spec:?}");
    }
}

#[test]
fn gptq_beats_rtn_on_output_error() {
    let ctx = ctx();
    let (rows, cols) = (24, 136);
    let (w, h) = layer(rows, cols, 300, 3);
    for (bits, group) in [(4, Some(8)), (3, None), (3, Some(68))] {
        for act in [false, true] {
            let spec = QuantSpec::new(bits, group, false).unwrap();
            let mut o = GptqOptions::new(spec);
            o.act_order = act;
            let got = run(&ctx, &w, &h, rows, cols, &o);
            let rtn = wgpress::reference::quant::rtn(&w, rows, cols, &spec).unwrap();
            let e_g = out_err(&w, &got.q.dequantize(), &h, rows, cols);
            let e_r = out_err(&w, &rtn.dequantize(), &h, rows, cols);
            assert!(
                e_g < 0.9 * e_r,
                "bits {bits} group {group:?} act {act}: gptq {e_g} rtn {e_r}"
            );
        }
    }
}

#[test]
fn row_chunks_give_identical_results() {
    let (rows, cols) = (300, 72);
    let (w, h) = layer(rows, cols, 200, 4);
    let spec = QuantSpec::new(4, Some(24), true).unwrap();
    let o = GptqOptions::new(spec);
    let whole = run(&ctx(), &w, &h, rows, cols, &o);
    // Padded to 128 positions, H's factor takes 64 KiB and a W row 512 bytes: a 72 KiB binding
    // limit keeps the factor in one binding and splits W into chunks of 144 rows (3 chunks).
    let chunked = run(&ctx_with(Some(72 * 1024)), &w, &h, rows, cols, &o);
    assert_eq!(whole.q, chunked.q);
}

/// Host weights are uploaded a piece at a time as they are gathered (so the layer is never on the
/// GPU twice): pieces of 7 rows, which cut the padded copy's row chunks anywhere, and pieces of
/// 257 rows that the binding limit splits again, must give exactly the result of the same layer
/// gathered from a GPU tensor.
#[test]
fn host_weights_in_pieces_give_the_gpu_tensors_result() {
    use wgpress::gpu::gptq::{Hooks, gptq_gpu, gptq_with};
    let (rows, cols) = (300, 72);
    let (w, h) = layer(rows, cols, 200, 4);
    let mut o = GptqOptions::new(QuantSpec::new(4, Some(24), false).unwrap());
    o.act_order = true;
    // 72 KiB: the padded copy in chunks of 144 rows (as above), a 257-row piece (72.3 KiB) in
    // chunks of 256 and 1 rows.
    for (limit, piece) in [(None, 7), (Some(72 * 1024), 7), (Some(72 * 1024), 257)] {
        let ctx = ctx_with(limit);
        let ht = GpuTensor::from_f32(&ctx, cols, cols, &h).unwrap();
        let hooks = Hooks {
            host_piece_rows: Some(piece),
            ..Default::default()
        };
        let pieces = gptq_with(&ctx, &w, rows, cols, &ht, &o, hooks).unwrap().0;
        let wt = GpuTensor::from_f32(&ctx, rows, cols, &w).unwrap();
        let on_gpu = gptq_gpu(&ctx, &wt, &ht, &o).unwrap().result;
        let label = format!("limit {limit:?}, pieces of {piece} rows");
        assert_eq!(pieces.q.q, on_gpu.q.q, "{label}: integers");
        assert_eq!(pieces.q.scales, on_gpu.q.scales, "{label}: scales");
        assert_eq!(pieces.q.zeros, on_gpu.q.zeros, "{label}: zeros");
    }
}

#[test]
fn a_factor_over_the_binding_limit_is_a_clear_error() {
    let (rows, cols) = (4, 72);
    let (w, h) = layer(rows, cols, 50, 5);
    let o = GptqOptions::new(QuantSpec::new(4, None, false).unwrap());
    let ctx = ctx_with(Some(32 * 1024));
    let ht = GpuTensor::from_f32(&ctx, cols, cols, &h).unwrap();
    let e = gptq(&ctx, &w, rows, cols, &ht, &o)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("one storage binding"), "{e}");
}

/// GPU (f32) against the f64 reference: the same integers except where near-ties of the rounding
/// go the other way and the difference then propagates along the row through the error feedback.
/// Both are bounded: at most 1% of the integers differ, and the layer output errors agree to 2%.
#[test]
fn equals_the_f64_reference() {
    let ctx = ctx();
    let (rows, cols) = (19, 104);
    let (w, h) = layer(rows, cols, 260, 7);
    let ht = GpuTensor::from_f32(&ctx, cols, cols, &h).unwrap();
    let cases: Vec<(u8, Option<usize>, bool, bool, bool, bool)> = vec![
        // bits, group, sym, act_order, static_groups, mse
        (4, Some(8), false, true, false, false),
        (4, Some(8), false, false, false, false),
        (3, None, true, true, false, false),
        (2, Some(52), false, true, false, false),
        (8, Some(26), true, true, true, false),
        (4, Some(8), false, true, true, false),
        (3, Some(8), false, true, false, true),
        (4, None, false, false, false, true),
        (4, Some(8), true, false, false, false),
        (4, Some(52), true, false, false, false),
    ];
    for (bits, group, sym, act, stat, mse) in cases {
        let mut o = GptqOptions::new(QuantSpec::new(bits, group, sym).unwrap());
        o.act_order = act;
        o.static_groups = stat;
        o.mse = mse;
        let got = gptq(&ctx, &w, rows, cols, &ht, &o).unwrap().0;
        let want = wgpress::reference::gptq::gptq(&w, rows, cols, &h, &o).unwrap();
        let label =
            format!("{bits}-bit group {group:?} sym {sym} act {act} static {stat} mse {mse}");
        assert_eq!(got.perm, want.perm, "{label}");
        assert_eq!(got.q.g_idx, want.q.g_idx, "{label}");
        assert_close_to_reference(&label, &got, &want, &w, &h, rows, cols);
    }
}

#[test]
fn bad_hessians_are_clear_errors_or_damped() {
    let ctx = ctx();
    let (rows, cols) = (5, 40);
    let (w, mut h) = layer(rows, cols, 60, 8);
    let o = GptqOptions::new(QuantSpec::new(4, Some(8), false).unwrap());
    // A layer that never saw a token: H = 0, every column dead, weights zero.
    let zero = vec![0f32; cols * cols];
    let r = run(&ctx, &w, &zero, rows, cols, &o);
    assert_eq!(r.dead_columns, cols);
    assert!(r.q.dequantize().iter().all(|&v| v == 0.0));
    // Rank-deficient H (fewer tokens than columns) with tiny damping still factors.
    let (_, h_low) = layer(rows, cols, 6, 9);
    let mut tiny = o;
    tiny.damp = 1e-9;
    let r = run(&ctx, &w, &h_low, rows, cols, &tiny);
    assert!(r.q.dequantize().iter().all(|v| v.is_finite()));
    // An indefinite H needs more damping: the retry is reported.
    for i in 0..cols {
        h[i * cols + (i + 1) % cols] = 50.0;
        h[((i + 1) % cols) * cols + i] = 50.0;
    }
    let mut small = o;
    small.damp = 1e-4;
    let ht = GpuTensor::from_f32(&ctx, cols, cols, &h).unwrap();
    match gptq(&ctx, &w, rows, cols, &ht, &small) {
        Ok((r, _)) => assert!(r.damp_used > small.damp, "damp {}", r.damp_used),
        Err(e) => assert!(e.to_string().contains("positive definite"), "{e}"),
    }
    // NaN in H is named.
    let mut hn = zero.clone();
    hn[3 * cols + 3] = f32::NAN;
    let ht = GpuTensor::from_f32(&ctx, cols, cols, &hn).unwrap();
    let e = gptq(&ctx, &w, rows, cols, &ht, &o)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not finite"), "{e}");
    // A group that does not divide the input dimension.
    let bad = GptqOptions::new(QuantSpec::new(4, Some(48), false).unwrap());
    let ht = GpuTensor::from_f32(&ctx, cols, cols, &zero).unwrap();
    let e = gptq(&ctx, &w, rows, cols, &ht, &bad)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("does not divide"), "{e}");
}

/// Both column-loop kernels (the per-row loop runs everywhere, the subgroup loop where subgroups
/// are exactly 32 wide) must give exactly the same integers and grids: same arithmetic, same order
/// of updates per weight. The per-row loop is also checked against the f64 reference below on
/// adapters where it is the default (lavapipe), and here with the same bound everywhere. 33 rows
/// leave the per-row kernel's second workgroup one row; group 8 and 40 fit grids inside blocks,
/// with and without the MSE search, static groups take their grids from g_idx.
/// The column loops are built trusted (no runtime bounds checks) outside the test suite. Every
/// index they form is in range by construction, so a build without checks must give exactly the
/// checked build's integers and grids: on a shape whose padded width (n > cols) and a row count
/// off the workgroup size put the guarded paths to work, with act-order and static groups (g_idx
/// read at padded positions) and with groups fitted inside the block; and the trusted result is
/// GPTQ's (the f64 reference).
#[test]
fn trusted_column_loops_give_the_checked_results() {
    use wgpress::gpu::ContextOptions;
    use wgpress::gpu::gptq::{ColumnLoop, Hooks, gptq_with, subgroup_loop};
    let checked = ctx();
    let trusted = GpuContext::new(&ContextOptions::default()).unwrap();
    let (rows, cols) = (37, 216);
    let (w, h) = layer(rows, cols, 300, 12);
    for (group, stat, act, sym) in [
        (Some(24), true, true, false),
        (Some(8), false, true, true),
        (None, false, false, false),
    ] {
        let mut o = GptqOptions::new(QuantSpec::new(3, group, sym).unwrap());
        o.act_order = act;
        o.static_groups = stat;
        for k in ColumnLoop::ALL {
            if k == ColumnLoop::Subgroup && !subgroup_loop(&checked) {
                continue;
            }
            let hooks = Hooks {
                column_loop: Some(k),
                ..Default::default()
            };
            let run = |ctx: &GpuContext| {
                let ht = GpuTensor::from_f32(ctx, cols, cols, &h).unwrap();
                gptq_with(ctx, &w, rows, cols, &ht, &o, hooks).unwrap().0
            };
            let (a, b) = (run(&checked), run(&trusted));
            let label = format!("{k:?}: group {group:?} static {stat} act {act} sym {sym}");
            // An out-of-range read may give the same wrong value in both builds (lavapipe clamps
            // like the checks do), so the trusted result is also held to the f64 reference.
            let want = wgpress::reference::gptq::gptq(&w, rows, cols, &h, &o).unwrap();
            assert_close_to_reference(&label, &b, &want, &w, &h, rows, cols);
            assert_eq!(a.q.q, b.q.q, "{label}: integers");
            assert_eq!(a.q.scales, b.q.scales, "{label}: scales");
            assert_eq!(a.q.zeros, b.q.zeros, "{label}: zeros");
            assert_eq!(a.q.g_idx, b.q.g_idx, "{label}: g_idx");
        }
    }
}

#[test]
fn column_loops_agree() {
    use wgpress::gpu::gptq::{ColumnLoop, Hooks, gptq_with, subgroup_loop};
    let ctx = ctx();
    let (rows, cols) = (33, 200);
    let (w, h) = layer(rows, cols, 300, 10);
    let ht = GpuTensor::from_f32(&ctx, cols, cols, &h).unwrap();
    let kinds: Vec<ColumnLoop> = ColumnLoop::ALL
        .into_iter()
        .filter(|&k| k != ColumnLoop::Subgroup || subgroup_loop(&ctx))
        .collect();
    for (group, mse, stat, sym, act) in [
        (Some(40), false, false, false, true),
        (None, true, false, false, true),
        (Some(8), true, false, false, true),
        (Some(40), false, true, false, true),
        (Some(8), false, false, true, false),
        (Some(40), false, false, true, false),
        (Some(40), false, false, true, true),
        // Blocks of 125 positions: widths and starts that are not multiples of 4 or 8.
        (Some(25), false, false, false, true),
        (Some(25), true, false, true, false),
        // Groups exactly one block wide (100): fitted inside the block kernels, as g128 is.
        (Some(100), false, false, false, true),
        (Some(100), true, false, true, false),
    ] {
        let mut o = GptqOptions::new(QuantSpec::new(4, group, sym).unwrap());
        o.act_order = act;
        o.mse = mse;
        o.static_groups = stat;
        let run = |k: ColumnLoop| {
            let hooks = Hooks {
                column_loop: Some(k),
                ..Default::default()
            };
            gptq_with(&ctx, &w, rows, cols, &ht, &o, hooks).unwrap().0
        };
        let base = run(ColumnLoop::Rows);
        let label = format!("group {group:?} mse {mse} static {stat} sym {sym} act {act}");
        let want = wgpress::reference::gptq::gptq(&w, rows, cols, &h, &o).unwrap();
        assert_close_to_reference(&label, &base, &want, &w, &h, rows, cols);
        for &k in &kinds[1..] {
            let got = run(k);
            let label =
                format!("{k:?}: group {group:?} mse {mse} static {stat} sym {sym} act {act}");
            assert_eq!(got.q.q, base.q.q, "{label}: integers");
            assert_eq!(got.q.scales, base.q.scales, "{label}: scales");
            assert_eq!(got.q.zeros, base.q.zeros, "{label}: zeros");
        }
    }
    if !subgroup_loop(&ctx) {
        let hooks = Hooks {
            column_loop: Some(ColumnLoop::Subgroup),
            ..Default::default()
        };
        let o = GptqOptions::new(QuantSpec::new(4, None, false).unwrap());
        let e = gptq_with(&ctx, &w, rows, cols, &ht, &o, hooks)
            .err()
            .unwrap();
        assert!(e.to_string().contains("32-wide subgroups"), "{e}");
    }
}

/// Both lazy-update kernels (f32 tiled everywhere, the opt-in split tensor-core product where
/// cooperative matrices run) must give GPTQ's result: each is held to the f64 reference, and
/// they may differ from each other only in the few integers whose rounding sits on a tie (a
/// handful per thousand, the same budget the reference comparison allows). 300 columns with a
/// lowered span cover near and far updates with K = 128 and K = 256 and an uneven last block.
/// Where cooperative matrices are missing, asking for the split path is a clear error.
#[test]
fn lazy_paths_agree_with_the_reference() {
    use wgpress::gpu::gptq::{Hooks, LazyPath, gptq_with};
    use wgpress::gpu::matmul::coop_available;
    let ctx = ctx();
    let (rows, cols) = (70, 300);
    let (w, h) = layer(rows, cols, 400, 21);
    let ht = GpuTensor::from_f32(&ctx, cols, cols, &h).unwrap();
    // Spans of 256 positions: the far updates (every column after a span) are the split ones.
    let run_span = |p: LazyPath, o: &GptqOptions, span: Option<usize>| {
        let hooks = Hooks {
            lazy_path: Some(p),
            lazy_span: span,
            ..Default::default()
        };
        gptq_with(&ctx, &w, rows, cols, &ht, o, hooks)
    };
    let run = |p: LazyPath, o: &GptqOptions| run_span(p, o, Some(256));
    if !coop_available(&ctx) {
        let o = GptqOptions::new(QuantSpec::new(4, None, false).unwrap());
        // Refused, with or without a far update to split (the default span holds the layer).
        for span in [Some(256), None] {
            let e = run_span(LazyPath::Split, &o, span)
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("split cooperative product"), "{e}");
        }
        return;
    }
    for (bits, group, act) in [(4, None, true), (3, Some(100), true), (4, Some(20), false)] {
        let mut o = GptqOptions::new(QuantSpec::new(bits, group, false).unwrap());
        o.act_order = act;
        let want = wgpress::reference::gptq::gptq(&w, rows, cols, &h, &o).unwrap();
        let label = format!("bits {bits} group {group:?} act {act}");
        let tiled = run(LazyPath::Tiled, &o).unwrap().0;
        let split = run(LazyPath::Split, &o).unwrap().0;
        assert_close_to_reference(&format!("tiled {label}"), &tiled, &want, &w, &h, rows, cols);
        assert_close_to_reference(&format!("split {label}"), &split, &want, &w, &h, rows, cols);
        let differ = tiled
            .q
            .q
            .iter()
            .zip(&split.q.q)
            .filter(|(a, b)| a != b)
            .count();
        assert!(
            differ * 200 <= split.q.q.len(),
            "{label}: {differ} of {} integers differ between the lazy paths",
            split.q.q.len()
        );
    }
}

#[test]
fn two_level_lazy_updates_equal_the_reference() {
    // Spans of a few blocks on a 200-column layer, so near updates (rest of a span), far updates
    // (every column after a span) and groups wider than a block (span rounded to whole groups)
    // all run; the result must match the f64 reference as closely as the one-level order does.
    use wgpress::gpu::gptq::{Hooks, gptq_with, lazy_span};
    let ctx = ctx();
    let (rows, cols) = (33, 200);
    let (w, h) = layer(rows, cols, 300, 12);
    let ht = GpuTensor::from_f32(&ctx, cols, cols, &h).unwrap();
    for (group, block, span, act) in [
        (None, 16, 32, true),
        (Some(8), 16, 48, false),
        (Some(40), 16, 30, true),
    ] {
        let mut o = GptqOptions::new(QuantSpec::new(4, group, false).unwrap());
        o.block = block;
        o.act_order = act;
        let label = format!("group {group:?} block {block} span {span} act {act}");
        let bsz = wgpress::quant::gptq::block_size(group, block);
        let s = lazy_span(span, bsz, group);
        assert!(s < cols && s.is_multiple_of(bsz), "{label}: span {s}");
        if let Some(g) = group.filter(|&g| g > bsz) {
            assert!(s.is_multiple_of(g), "{label}: a group straddles a span");
        }
        let got = gptq_with(
            &ctx,
            &w,
            rows,
            cols,
            &ht,
            &o,
            Hooks {
                lazy_span: Some(span),
                ..Default::default()
            },
        )
        .unwrap()
        .0;
        // Both shrink the block so groups and blocks nest (group 40, block 16: blocks of 10).
        let want = wgpress::reference::gptq::gptq(&w, rows, cols, &h, &o).unwrap();
        assert_close_to_reference(&label, &got, &want, &w, &h, rows, cols);
    }
}

/// W handed over on the GPU ([`gptq_gpu`], the pipeline's entry): whatever W's own chunking, the
/// gather reads the same values, so the integers, grids and g_idx equal those of an unchunked run
/// and of the host-slice entry point bit for bit; W is only read; and Ŵ, made on the GPU from
/// the integers, grids and g_idx (act-order or static), equals `QuantizedTensor::dequantize` bit
/// for bit (one f32 product of exact operands each; new buffers are zero-filled and no row of Ŵ
/// is all zero here, so an unwritten row would fail; `dequantize_packed` itself is checked
/// against a poisoned output in tests/gpu_quant.rs).
#[test]
fn gpu_weights_in_any_chunking_give_identical_results_and_dequantized_weights() {
    use wgpress::gpu::gptq::gptq_gpu;
    let (rows, cols) = (600, 72);
    let (w, h) = layer(rows, cols, 200, 14);
    let whole = ctx();
    // 72 KiB: U (padded to 128 x 128 f32, 64 KiB) still fits one binding; W's 288-byte rows go
    // 255 to a chunk, the padded copy's 512-byte rows 143, so the copy's chunks cut across W's
    // (rows 143..286 come from two chunks of W, and so on), and Ŵ is written across its chunks.
    let small = ctx_with(Some(72 * 1024));
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (group, act, stat) in [
        (Some(24), true, false),
        (Some(24), true, true),
        (None, true, false),
        (Some(8), false, false),
    ] {
        let mut o = GptqOptions::new(QuantSpec::new(4, group, false).unwrap());
        o.act_order = act;
        o.static_groups = stat;
        let label = format!("group {group:?} act {act} static {stat}");
        let mut results = Vec::new();
        for c in [&whole, &small] {
            let wt = GpuTensor::from_f32(c, rows, cols, &w).unwrap();
            let ht = GpuTensor::from_f32(c, cols, cols, &h).unwrap();
            let r = gptq_gpu(c, &wt, &ht, &o).unwrap();
            assert_eq!(wt.to_f32(c).unwrap(), w, "{label}: W was modified");
            assert_eq!(
                bits(&r.dequantized.to_f32(c).unwrap()),
                bits(&r.result.q.dequantize()),
                "{label}: Ŵ on the GPU ({} chunks of W)",
                wt.chunks.len()
            );
            let host = gptq(c, &w, rows, cols, &ht, &o).unwrap().0;
            assert!(host.q == r.result.q, "{label}: host-slice entry differs");
            results.push((wt.chunks.len(), r.result));
        }
        assert_eq!((results[0].0, results[1].0), (1, 3), "{label}: chunking");
        assert!(
            results[0].1.q == results[1].1.q,
            "{label}: chunked W differs"
        );
        assert_eq!(results[0].1.perm, results[1].1.perm, "{label}");
    }
}

/// A non-finite weight is named (row, column, value) by both entry points: the host slice is
/// checked on the host, W on the GPU by its per-row sums of squares (then read back to find it).
#[test]
fn non_finite_weights_are_named_on_both_entry_points() {
    use wgpress::gpu::gptq::gptq_gpu;
    let ctx = ctx();
    let (rows, cols) = (7, 40);
    let (mut w, h) = layer(rows, cols, 60, 15);
    let o = GptqOptions::new(QuantSpec::new(4, Some(8), false).unwrap());
    let ht = GpuTensor::from_f32(&ctx, cols, cols, &h).unwrap();
    for (v, shown) in [(f32::INFINITY, "inf"), (f32::NAN, "NaN")] {
        w[3 * cols + 11] = v;
        let want = format!("weight at row 3, column 11 is {shown}");
        let wt = GpuTensor::from_f32(&ctx, rows, cols, &w).unwrap();
        let e = gptq_gpu(&ctx, &wt, &ht, &o).err().unwrap().to_string();
        assert!(e.contains(&want), "{e}");
        let e = gptq(&ctx, &w, rows, cols, &ht, &o)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(&want), "{e}");
    }
}

/// One factor of H shared by several layers (the pipeline's q/k/v and gate/up): each layer's
/// integers, grids, g_idx, damping and Ŵ equal those of its own full run bit for bit (the factor
/// is the same computation, made once), whether the factor is kept or consumed by the last
/// layer; a layer of another width is refused, naming both widths.
#[test]
fn shared_factor_gives_each_layer_its_own_runs_result() {
    use wgpress::gpu::gptq::{FactorUse, gptq_factor, gptq_gpu, gptq_gpu_factored};
    let ctx = ctx();
    let cols = 88;
    let (_, h) = layer(1, cols, 240, 31);
    let ht = GpuTensor::from_f32(&ctx, cols, cols, &h).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (group, act) in [(Some(8), true), (Some(22), false)] {
        let mut o = GptqOptions::new(QuantSpec::new(3, group, group == Some(8)).unwrap());
        o.act_order = act;
        let label = format!("group {group:?} act {act}");
        let ws: Vec<(usize, Vec<f32>)> = [(37, 40), (130, 41), (9, 42)]
            .iter()
            .map(|&(rows, seed)| (rows, layer(rows, cols, 1, seed).0))
            .collect();
        let mut factor = Some(gptq_factor(&ctx, &ht, &o).unwrap());
        for (i, (rows, w)) in ws.iter().enumerate() {
            let wt = GpuTensor::from_f32(&ctx, *rows, cols, w).unwrap();
            let own = gptq_gpu(&ctx, &wt, &ht, &o).unwrap();
            let shared = if i + 1 == ws.len() {
                let f = factor.take().unwrap();
                gptq_gpu_factored(&ctx, &wt, FactorUse::Last(Box::new(f)), &o, false).unwrap()
            } else {
                let f = factor.as_ref().unwrap();
                gptq_gpu_factored(&ctx, &wt, FactorUse::Keep(f), &o, false).unwrap()
            };
            assert!(
                own.result.q == shared.result.q,
                "{label}: layer {i} integers"
            );
            assert_eq!(own.result.perm, shared.result.perm, "{label}: layer {i}");
            assert_eq!(own.result.damp_used, shared.result.damp_used, "{label}");
            assert_eq!(
                bits(&own.dequantized.to_f32(&ctx).unwrap()),
                bits(&shared.dequantized.to_f32(&ctx).unwrap()),
                "{label}: layer {i} Ŵ"
            );
        }
    }
    let o = GptqOptions::new(QuantSpec::new(4, Some(8), false).unwrap());
    let f = gptq_factor(&ctx, &ht, &o).unwrap();
    let wt = GpuTensor::from_f32(&ctx, 5, 80, &layer(5, 80, 1, 7).0).unwrap();
    let e = gptq_gpu_factored(&ctx, &wt, FactorUse::Keep(&f), &o, false)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("88 columns") && e.contains("5x80"), "{e}");
}

/// GPTQ's loss Σ err² is tr(Δ H' Δᵀ) for the damped H' = H + λI (Δ = W - Ŵ, no dead columns),
/// so the pipeline's output error from the loss (`layer_errors` with `output_loss`) equals the
/// one from the second f32 product, over both column loops, act-order, static groups, sym and
/// asym grids, 2 to 8 bits, row-chunked W, and a small damping (the cancellation loss - λ·||Δ||² is
/// then the smallest). Tolerance 1e-4 relative: the identity holds exactly only for the exact
/// factor U and exact updates, and the direct product itself sums in f32 (~1e-5 relative at
/// these sizes); lavapipe measured at most 1.1e-6 apart (the 8-bit case, whose error is 3.7e-5
/// of the output). A wrong loss (a missed block, a missing square, a stale row) is off by far
/// more: every term is positive and each block contributes its share.
#[test]
fn gptq_loss_gives_the_output_error_of_the_direct_product() {
    use wgpress::gpu::gptq::{ColumnLoop, Hooks, gptq_gpu_with, subgroup_loop};
    use wgpress::pipeline::layer_errors;
    let whole = ctx();
    let small = ctx_with(Some(64 * 1024));
    let mut loops = vec![ColumnLoop::Rows];
    if subgroup_loop(&whole) {
        loops.push(ColumnLoop::Subgroup);
    }
    for (i, (rows, cols, bits, group, act, stat, sym, damp)) in [
        (150, 96, 4, Some(32), true, false, false, 0.01),
        (70, 136, 3, Some(8), true, true, false, 0.01),
        (97, 72, 2, None, false, false, true, 0.001),
        (33, 200, 8, Some(40), false, false, true, 0.1),
        (260, 88, 4, Some(22), true, false, true, 0.01),
    ]
    .into_iter()
    .enumerate()
    {
        let (w, h) = layer(rows, cols, 3 * cols, 50 + i as u64);
        let mut o = GptqOptions::new(QuantSpec::new(bits, group, sym).unwrap());
        o.act_order = act;
        o.static_groups = stat;
        o.damp = damp;
        for &kind in &loops {
            for c in [&whole, &small] {
                // The small bindings (row-chunked W) only where U (n x n, n = cols rounded up
                // to 64) still fits one.
                let n = cols.div_ceil(64) * 64;
                if c.binding_limit() < (n * n * 4) as u64 {
                    continue;
                }
                let label = format!("case {i} {kind:?} chunks {}", c.binding_limit());
                let hooks = Hooks {
                    column_loop: Some(kind),
                    ..Hooks::default()
                };
                let ht = GpuTensor::from_f32(c, cols, cols, &h).unwrap();
                let wt = GpuTensor::from_f32(c, rows, cols, &w).unwrap();
                let r = gptq_gpu_with(c, &wt, &ht, &o, hooks).unwrap();
                assert_eq!(r.result.dead_columns, 0, "{label}");
                assert!(r.loss > 0.0 && r.damp_add > 0.0, "{label}");
                let direct = layer_errors(c, wt, &r.dequantized, &ht, None).unwrap();
                let wt = GpuTensor::from_f32(c, rows, cols, &w).unwrap();
                let from_loss =
                    layer_errors(c, wt, &r.dequantized, &ht, Some((r.loss, r.damp_add))).unwrap();
                assert_eq!(direct.rel_weight, from_loss.rel_weight, "{label}");
                let rel = (from_loss.rel_output - direct.rel_output).abs() / direct.rel_output;
                eprintln!(
                    "{label}: output error {:.6e} direct, {:.6e} from the loss, {rel:.2e} apart",
                    direct.rel_output, from_loss.rel_output
                );
                assert!(rel < 1e-4, "{label}: {rel:e}");
            }
        }
    }
}
