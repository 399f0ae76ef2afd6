// The fused GPTQ column loop with subgroup operations (adapters whose subgroups are exactly 32
// wide): one row per workgroup of one subgroup, each lane holding four columns of the block
// (lane, lane + 32, lane + 64, lane + 96). The error of column i reaches every lane by a shuffle
// and group grids are reduced with subgroup min/max/add, so the loop has no workgroup barriers; the
// U row of the next column is loaded while the current one is applied. Same bindings and results
// as `block_rows` in gptq.wgsl (which is prepended, with quant_grid.wgsl).

fn sel4(t: u32, a: f32, b: f32, c: f32, d: f32) -> f32 {
    return select(select(select(a, b, t == 1u), c, t == 2u), d, t == 3u);
}

@compute @workgroup_size(32)
fn block_sg(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let r = wid.y * nwg.x + wid.x;
    let row_ok = r < bp.rows;
    let n = bp.n;
    let bw = bp.bw;
    let c0 = lane;
    let c1 = lane + 32u;
    let c2 = lane + 64u;
    let c3 = lane + 96u;
    var w0 = 0.0;
    var w1 = 0.0;
    var w2 = 0.0;
    var w3 = 0.0;
    let base = r * n + bp.b0;
    if (row_ok) {
        if (c0 < bw) { w0 = bw_w[base + c0]; }
        if (c1 < bw) { w1 = bw_w[base + c1]; }
        if (c2 < bw) { w2 = bw_w[base + c2]; }
        if (c3 < bw) { w3 = bw_w[base + c3]; }
    }
    var g = Grid(1.0, 0u);
    let in_block_groups = bp.stat == 0u && bp.group < bw;
    if (row_ok && bp.stat == 0u && !in_block_groups) {
        let k = min(bp.b0 / bp.group, bp.ng - 1u);
        g = Grid(bscales[r * bp.ng + k], bzeros[r * bp.ng + k]);
    }
    // U row of position b0 + i, restricted to this lane's columns (0 outside the block).
    let ub = bp.b0 * n + bp.b0;
    var n0 = 0.0;
    var n1 = 0.0;
    var n2 = 0.0;
    var n3 = 0.0;
    if (c0 < bw) { n0 = bu[ub + c0]; }
    if (c1 < bw) { n1 = bu[ub + c1]; }
    if (c2 < bw) { n2 = bu[ub + c2]; }
    if (c3 < bw) { n3 = bu[ub + c3]; }
    var q0 = 0u;
    var q1 = 0u;
    var q2 = 0u;
    var q3 = 0u;
    var e0 = 0.0;
    var e1 = 0.0;
    var e2 = 0.0;
    var e3 = 0.0;
    for (var i = 0u; i < bw; i++) {
        let u0 = n0;
        let u1 = n1;
        let u2 = n2;
        let u3 = n3;
        if (i + 1u < bw) {
            let un = ub + (i + 1u) * n;
            if (c0 < bw) { n0 = bu[un + c0]; }
            if (c1 < bw) { n1 = bu[un + c1]; }
            if (c2 < bw) { n2 = bu[un + c2]; }
            if (c3 < bw) { n3 = bu[un + c3]; }
        }
        let pi = bp.b0 + i;
        if (in_block_groups && i % bp.group == 0u && pi < bp.cols) {
            let e = i + bp.group;
            let m0 = c0 >= i && c0 < e && c0 < bw;
            let m1 = c1 >= i && c1 < e && c1 < bw;
            let m2 = c2 >= i && c2 < e && c2 < bw;
            let m3 = c3 >= i && c3 < e && c3 < bw;
            let v0 = select(0.0, w0, m0);
            let v1 = select(0.0, w1, m1);
            let v2 = select(0.0, w2, m2);
            let v3 = select(0.0, w3, m3);
            let lo = subgroupMin(min(min(v0, v1), min(v2, v3)));
            let hi = subgroupMax(max(max(v0, v1), max(v2, v3)));
            var best = fit_minmax(lo, hi, bp.maxq, bp.sym != 0u, 0);
            var best_err = 3.4e38;
            for (var c = 0u; c < bp.mse; c++) {
                let f = bshrink[c];
                let cand = fit_minmax(f * lo, f * hi, bp.maxq, bp.sym != 0u, 0);
                var s = 0.0;
                if (m0) { s = s + mse_err(w0, cand, bp.maxq); }
                if (m1) { s = s + mse_err(w1, cand, bp.maxq); }
                if (m2) { s = s + mse_err(w2, cand, bp.maxq); }
                if (m3) { s = s + mse_err(w3, cand, bp.maxq); }
                let total = subgroupAdd(s);
                if (total < best_err) {
                    best_err = total;
                    best = cand;
                }
            }
            g = best;
            if (row_ok && lane == 0u) {
                store_grid(r, pi, g);
            }
        }
        // The owner of column i quantizes it; the error reaches every lane by a shuffle.
        let t = i / 32u;
        let owner = i % 32u;
        let wi = sel4(t, w0, w1, w2, w3);
        let gi = grid_at(r, pi, g, row_ok);
        let s = gi.scale;
        let z = gi.zero;
        let q = quantize_one(wi, s, z, bp.maxq, 0);
        // The owner's own entry of the U row it already holds is the diagonal U_ii.
        let mine = (wi - s * (f32(q) - f32(z))) / sel4(t, u0, u1, u2, u3);
        let e = subgroupShuffle(mine, owner);
        // Each lane keeps the integer and error of its own columns; they are stored after the
        // loop, off the sequential path.
        if (lane == owner) {
            if (t == 0u) { q0 = q; e0 = e; }
            if (t == 1u) { q1 = q; e1 = e; }
            if (t == 2u) { q2 = q; e2 = e; }
            if (t == 3u) { q3 = q; e3 = e; }
        }
        if (c0 > i) { w0 = w0 - e * u0; }
        if (c1 > i) { w1 = w1 - e * u1; }
        if (c2 > i) { w2 = w2 - e * u2; }
        if (c3 > i) { w3 = w3 - e * u3; }
    }
    if (row_ok) {
        let qb = r * (n / 4u);
        let eb = r * bp.err_ld + bp.err_col;
        if (c0 < bw) { berr[eb + c0] = e0; atomicOr(&bq[qb + (bp.b0 + c0) / 4u], q0 << (8u * ((bp.b0 + c0) % 4u))); }
        if (c1 < bw) { berr[eb + c1] = e1; atomicOr(&bq[qb + (bp.b0 + c1) / 4u], q1 << (8u * ((bp.b0 + c1) % 4u))); }
        if (c2 < bw) { berr[eb + c2] = e2; atomicOr(&bq[qb + (bp.b0 + c2) / 4u], q2 << (8u * ((bp.b0 + c2) % 4u))); }
        if (c3 < bw) { berr[eb + c3] = e3; atomicOr(&bq[qb + (bp.b0 + c3) / 4u], q3 << (8u * ((bp.b0 + c3) % 4u))); }
    }
    // The row's running Σ err² (lanes past the block hold zeros).
    let loss = subgroupAdd(e0 * e0 + e1 * e1 + e2 * e2 + e3 * e3);
    if (row_ok && lane == 0u) {
        bloss[r] = bloss[r] + loss;
    }
}
