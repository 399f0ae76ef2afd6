// The fused GPTQ column loop with subgroup operations (adapters whose subgroups are exactly 32
// wide): SG_R = 4 rows per subgroup, SG_L = 8 lanes per row. Same bindings and integers as
// `block_rows` in gptq.wgsl (which is prepended, with quant_grid.wgsl).
//
// Why four rows per subgroup: quantizing column i (two divisions and the exact rounding tests) is
// scalar work on one value per row. With one row per subgroup all 32 lanes ran it for the same
// value; with four rows the same instruction stream quantizes four rows at once, and each lane
// applies 16 columns instead of 4. On an H200 a 128-column block of 28672 rows took 380 µs
// instead of 780-1020 (BENCHMARKS.md, session 16).
//
// Lane l of a row holds the 16 columns l + 8k of the block (k = 0..15) in a ring of four vec4s
// (k = 4m + c: vec4 m, component c). The columns are consumed in phases of eight: in phase s
// (positions 8s .. 8s + 7), register 0 of lane j holds position 8s + j, which that lane quantizes
// at step j; every other register holds a later position. At a phase's end the ring rotates by
// one (register 0, now the error of its position, goes to the back), so register 0 is always the
// one being consumed and no register is indexed by a runtime value inside the loop. After the
// block the errors sit in the registers, rotated by the number of phases, and the integers in
// four words rotated the same way.

const SG_L: u32 = 8u;
const SG_R: u32 = 4u;

// Columns `c`, `c` + 8, `c` + 16, `c` + 24 of a row of the block starting at element `base`
// (zero at or past the block's width, or for a row outside the chunk).
fn ld4(src_is_u: bool, base: u32, c: u32, ok: bool) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if (ok) {
        let bw = bp.bw;
        if (src_is_u) {
            if (c < bw) { v.x = bu[base + c]; }
            if (c + 8u < bw) { v.y = bu[base + c + 8u]; }
            if (c + 16u < bw) { v.z = bu[base + c + 16u]; }
            if (c + 24u < bw) { v.w = bu[base + c + 24u]; }
        } else {
            if (c < bw) { v.x = bw_w[base + c]; }
            if (c + 8u < bw) { v.y = bw_w[base + c + 8u]; }
            if (c + 16u < bw) { v.z = bw_w[base + c + 16u]; }
            if (c + 24u < bw) { v.w = bw_w[base + c + 24u]; }
        }
    }
    return v;
}

// Min and max over the eight lanes of one row (aligned groups of eight lanes).
fn row_minmax(a: f32, b: f32) -> vec2<f32> {
    var lo = a;
    var hi = b;
    for (var d = 1u; d < SG_L; d = d * 2u) {
        lo = min(lo, subgroupShuffleXor(lo, d));
        hi = max(hi, subgroupShuffleXor(hi, d));
    }
    return vec2<f32>(lo, hi);
}

fn row_sum(a: f32) -> f32 {
    var s = a;
    for (var d = 1u; d < SG_L; d = d * 2u) {
        s = s + subgroupShuffleXor(s, d);
    }
    return s;
}

// Which of four registers hold a column in [lo_c, hi_c).
fn in_range4(c: vec4<u32>, lo_c: u32, hi_c: u32) -> vec4<bool> {
    return (c >= vec4<u32>(lo_c)) & (c < vec4<u32>(hi_c));
}

fn mse4(v: vec4<f32>, m: vec4<bool>, g: Grid) -> f32 {
    var s = 0.0;
    if (m.x) { s = s + mse_err(v.x, g, bp.maxq); }
    if (m.y) { s = s + mse_err(v.y, g, bp.maxq); }
    if (m.z) { s = s + mse_err(v.z, g, bp.maxq); }
    if (m.w) { s = s + mse_err(v.w, g, bp.maxq); }
    return s;
}

// The rotation: register k + 1 -> k, register 0 -> 15 (as a 16-element ring of four vec4s).
struct Ring {
    a: vec4<f32>,
    b: vec4<f32>,
    c: vec4<f32>,
    d: vec4<f32>,
}

fn rotate(r: Ring) -> Ring {
    return Ring(
        vec4<f32>(r.a.yzw, r.b.x),
        vec4<f32>(r.b.yzw, r.c.x),
        vec4<f32>(r.c.yzw, r.d.x),
        vec4<f32>(r.d.yzw, r.a.x),
    );
}

// The integers of the 16 registers, one byte each (register k in byte k % 4 of word k / 4),
// rotated with the ring.
fn rotate_q(q: vec4<u32>) -> vec4<u32> {
    return (q >> vec4<u32>(8u)) | (q.yzwx << vec4<u32>(24u));
}

// U's row `k` of the block at this lane's registers in phase `s` (columns l + 8(k' + s)).
fn u_ring(k: u32, l: u32, s: u32) -> Ring {
    let ok = k < bp.bw;
    let base = (bp.b0 + k) * bp.n + bp.b0;
    let c = l + SG_L * s;
    return Ring(
        ld4(true, base, c, ok),
        ld4(true, base, c + 32u, ok),
        ld4(true, base, c + 64u, ok),
        ld4(true, base, c + 96u, ok),
    );
}

@compute @workgroup_size(32)
fn block_sg(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let rr = lane / SG_L;
    let l = lane % SG_L;
    let r = (wid.y * nwg.x + wid.x) * SG_R + rr;
    let row_ok = r < bp.rows;
    let n = bp.n;
    let bw = bp.bw;
    let base = r * n + bp.b0;
    var w = Ring(
        ld4(false, base, l, row_ok),
        ld4(false, base, l + 32u, row_ok),
        ld4(false, base, l + 64u, row_ok),
        ld4(false, base, l + 96u, row_ok),
    );
    var q = vec4<u32>(0u);
    var g = Grid(1.0, 0u);
    let in_block_groups = bp.stat == 0u && bp.group <= bw;
    if (row_ok && bp.stat == 0u && !in_block_groups) {
        let k = min(bp.b0 / bp.group, bp.ng - 1u);
        g = Grid(bscales[r * bp.ng + k], bzeros[r * bp.ng + k]);
    }
    let owner_lane = lane - l; // lane of this row's l = 0
    for (var i = 0u; i < bw; i++) {
        let j = i % SG_L;
        let s = i / SG_L;
        // U's row i is loaded at the step, not a step ahead: the 16 registers a prefetch holds
        // cost more occupancy than the load's latency (BENCHMARKS.md, session 16).
        let u = u_ring(i, l, s);
        let pi = bp.b0 + i;
        if (in_block_groups && i % bp.group == 0u && pi < bp.cols) {
            let e = min(i + bp.group, bw);
            // This lane's register k holds column l + 8(k + s) (k + s < 16).
            let c0 = vec4<u32>(0u, 1u, 2u, 3u) * SG_L + vec4<u32>(l + SG_L * s);
            let ma = in_range4(c0, i, e);
            let mb = in_range4(c0 + vec4<u32>(32u), i, e);
            let mc = in_range4(c0 + vec4<u32>(64u), i, e);
            let md = in_range4(c0 + vec4<u32>(96u), i, e);
            let z4 = vec4<f32>(0.0);
            let va = select(z4, w.a, ma);
            let vb = select(z4, w.b, mb);
            let vc = select(z4, w.c, mc);
            let vd = select(z4, w.d, md);
            let lo4 = min(min(va, vb), min(vc, vd));
            let hi4 = max(max(va, vb), max(vc, vd));
            let mm = row_minmax(
                min(min(lo4.x, lo4.y), min(lo4.z, lo4.w)),
                max(max(hi4.x, hi4.y), max(hi4.z, hi4.w)),
            );
            var best = fit_minmax(mm.x, mm.y, bp.maxq, bp.sym != 0u, 0);
            var best_err = 3.4e38;
            for (var c = 0u; c < bp.mse; c++) {
                let f = bshrink[c];
                let cand = fit_minmax(f * mm.x, f * mm.y, bp.maxq, bp.sym != 0u, 0);
                let part = mse4(w.a, ma, cand) + mse4(w.b, mb, cand) + mse4(w.c, mc, cand)
                    + mse4(w.d, md, cand);
                let total = row_sum(part);
                if (total < best_err) {
                    best_err = total;
                    best = cand;
                }
            }
            g = best;
            if (row_ok && l == 0u) {
                store_grid(r, pi, g);
            }
        }
        // Lane j of each row owns position i (its register 0); its error reaches the row's other
        // lanes by a shuffle. Every lane computes the quotient; only the owner's is used.
        let gi = grid_at(r, pi, g, row_ok);
        let wi = w.a.x;
        let qi = quantize_one(wi, gi.scale, gi.zero, bp.maxq, 0);
        let mine = (wi - gi.scale * (f32(qi) - f32(gi.zero))) / u.a.x;
        let e = subgroupShuffle(mine, owner_lane + j);
        // Register 0: the owner keeps its error (and integer); later lanes' positions (l > j)
        // are updated; earlier lanes' were consumed in this phase and keep their errors.
        if (l == j) {
            w.a.x = e;
            q.x = q.x | qi;
        } else if (l > j) {
            w.a.x = w.a.x - e * u.a.x;
        }
        w.a = vec4<f32>(w.a.x, w.a.yzw - e * u.a.yzw);
        w.b = w.b - e * u.b;
        w.c = w.c - e * u.c;
        w.d = w.d - e * u.d;
        if (j == SG_L - 1u || i + 1u == bw) {
            w = rotate(w);
            q = rotate_q(q);
        }
    }
    // After P rotations (P = phases of the block), register k holds column l + 8((k + P) % 16);
    // columns at or past the block's width hold nothing to store.
    let p = (bw + SG_L - 1u) / SG_L;
    var loss = 0.0;
    if (row_ok) {
        let qb = r * (n / 4u);
        let eb = r * bp.err_ld + bp.err_col;
        for (var k = 0u; k < 16u; k++) {
            let c = l + SG_L * ((k + p) % 16u);
            // Register k of the ring, chosen by a runtime index once per block, off the loop.
            let m = k / 4u;
            let t = k % 4u;
            let ev = select(select(select(w.a, w.b, m == 1u), w.c, m == 2u), w.d, m == 3u)[t];
            let qv = (q[m] >> (8u * t)) & 0xFFu;
            if (c < bw) {
                berr[eb + c] = ev;
                atomicOr(&bq[qb + (bp.b0 + c) / 4u], qv << (8u * ((bp.b0 + c) % 4u)));
                loss = loss + ev * ev;
            }
        }
    }
    // The row's running Σ err² (lanes of rows past the chunk hold zeros).
    let total = row_sum(loss);
    if (row_ok && l == 0u) {
        bloss[r] = bloss[r] + total;
    }
}
