// GPTQ on the GPU (src/quant/gptq.rs states the conventions; src/gpu/gptq.rs drives these).
// quant_grid.wgsl is prepended (fit_minmax, quantize_one).
//
// Columns live in "processing positions": position i holds original column perm[i]; positions
// cols..n are padding (zero weights, identity Hessian rows). n is a multiple of 64.
//
//   hess_init     work = I (n x n)
//   hess_scatter  one row chunk of H -> work[n-1-pos[a]][n-1-pos[b]] = H[a][b], with the dead-column
//                 rule (H_aa == 0 -> 1) and damping on the diagonal: the index reversal prepares
//                 the matrix whose reversed factor inverse is U (gpu::linalg::flip)
//   hess_diag     diag H of one row chunk
//   w_gather      Wp[r][i] = W[r][perm[i]] (0 for dead columns and padding) for rows of W that lie
//                 in one chunk of W (from its element `w_off`) and one chunk of Wp (written from
//                 its element `gk`): W stays on the GPU, chunked as its own binding limit says
//   fit_groups    grid of one (row, group) per workgroup: positions [start, start + group), or with
//                 `gather` the original columns [k·group, (k+1)·group) of static groups; groups
//                 no wider than the block are fitted inside the block kernels instead
//   block_rows    the fused in-block column loop, one invocation per row (gptq_sg.wgsl has the
//                 subgroup variant): quantize position i, err = (w - deq) / U_ii, later positions
//                 of the block w_j -= err·U_ij, err kept for the lazy update; no host round trip.
//                 Each row's Σ err² accumulates in `bloss`: GPTQ's loss, tr(Δ H' Δᵀ) for the
//                 damped Hessian H', from which the pipeline takes the layer's output error
//                 without another product

struct Params {
    rows: u32,      // rows of the W chunk (or of the H chunk for the hess_* entries)
    n: u32,         // padded order (positions)
    cols: u32,      // real input columns
    b0: u32,        // block: first position; fit_groups: first position of group `gk`
    bw: u32,        // block width
    group: u32,     // group size in positions (cols for one group per row)
    ng: u32,        // groups per row in scales/zeros
    maxq: u32,
    sym: u32,
    mse: u32,       // number of MSE shrink factors to search (0: min-max)
    stat: u32,      // static groups: the group of a position comes from gidx
    gk: u32,        // fit_groups: group index of the first position; hess_*: first H row
    damp: f32,      // hess_scatter: added to the diagonal
    err_ld: u32,    // row stride of Err
    err_col: u32,   // block: Err column of the block's first position
    w_off: u32,     // w_gather: element offset of the first row in the bound chunk of W
}

const MSE_NORM: f32 = 2.4;

// hess_init, hess_scatter, hess_diag
@group(0) @binding(0) var<storage, read_write> work: array<f32>;
@group(0) @binding(1) var<storage, read> hsrc: array<f32>;
@group(0) @binding(2) var<storage, read> pos: array<u32>;
@group(0) @binding(1) var<uniform> hp1: Params; // hess_init
@group(0) @binding(2) var<uniform> hp2: Params; // hess_diag
@group(0) @binding(3) var<uniform> hp3: Params; // hess_scatter

fn flat(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * 256u + lid;
}

@compute @workgroup_size(256)
fn hess_init(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = flat(wid, nwg, lid);
    if (e >= hp1.n * hp1.n) {
        return;
    }
    work[e] = select(0.0, 1.0, e / hp1.n == e % hp1.n);
}

@compute @workgroup_size(256)
fn hess_diag(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = flat(wid, nwg, lid);
    if (e >= hp2.rows) {
        return;
    }
    work[hp2.gk + e] = hsrc[e * hp2.cols + hp2.gk + e];
}

@compute @workgroup_size(256)
fn hess_scatter(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = flat(wid, nwg, lid);
    if (e >= hp3.rows * hp3.cols) {
        return;
    }
    let a = hp3.gk + e / hp3.cols;
    let b = e % hp3.cols;
    var v = hsrc[e];
    if (a == b) {
        v = select(v, 1.0, v == 0.0) + hp3.damp;
    }
    let n = hp3.n;
    work[(n - 1u - pos[a]) * n + (n - 1u - pos[b])] = v;
}

// w_gather
@group(0) @binding(0) var<storage, read_write> wp: array<f32>;
@group(0) @binding(1) var<storage, read> wsrc: array<f32>;
@group(0) @binding(2) var<storage, read> perm: array<u32>; // original column | DEAD
@group(0) @binding(3) var<uniform> gp: Params;

const DEAD: u32 = 0x80000000u;

@compute @workgroup_size(256)
fn w_gather(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = flat(wid, nwg, lid);
    if (e >= gp.rows * gp.n) {
        return;
    }
    let r = e / gp.n;
    let i = e % gp.n;
    var v = 0.0;
    if (i < gp.cols) {
        let c = perm[i];
        if ((c & DEAD) == 0u) {
            v = wsrc[gp.w_off + r * gp.cols + c];
        }
    }
    wp[gp.gk + e] = v;
}

// fit_groups
@group(0) @binding(0) var<storage, read_write> fw: array<f32>;
@group(0) @binding(1) var<storage, read> fpos: array<u32>;
@group(0) @binding(2) var<storage, read> shrink: array<f32>;
@group(0) @binding(3) var<storage, read_write> scales: array<f32>;
@group(0) @binding(4) var<storage, read_write> zeros: array<u32>;
@group(0) @binding(5) var<uniform> fp: Params;

var<workgroup> red_a: array<f32, 256>;
var<workgroup> red_b: array<f32, 256>;

// Tree reduction over the 256 invocations; every invocation gets the result.
fn reduce256_minmax(lid: u32, a: f32, b: f32) -> vec2<f32> {
    red_a[lid] = a;
    red_b[lid] = b;
    for (var s = 128u; s > 0u; s = s / 2u) {
        workgroupBarrier();
        if (lid < s) {
            red_a[lid] = min(red_a[lid], red_a[lid + s]);
            red_b[lid] = max(red_b[lid], red_b[lid + s]);
        }
    }
    workgroupBarrier();
    let r = vec2<f32>(red_a[0], red_b[0]);
    workgroupBarrier();
    return r;
}

fn reduce256_sum(lid: u32, a: f32) -> f32 {
    red_a[lid] = a;
    for (var s = 128u; s > 0u; s = s / 2u) {
        workgroupBarrier();
        if (lid < s) {
            red_a[lid] = red_a[lid] + red_a[lid + s];
        }
    }
    workgroupBarrier();
    let r = red_a[0];
    workgroupBarrier();
    return r;
}

fn mse_err(v: f32, g: Grid, maxq: u32) -> f32 {
    let q = quantize_one(v, g.scale, g.zero, maxq, 0);
    let d = abs(g.scale * (f32(q) - f32(g.zero)) - v);
    return select(0.0, pow(d, MSE_NORM), d > 0.0);
}

@compute @workgroup_size(256)
fn fit_groups(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    // Workgroup (x + y·X) handles segment s: row s / groups_here, group s % groups_here.
    let groups_here = select(1u, fp.ng, fp.stat != 0u);
    let s = wid.y * nwg.x + wid.x;
    let valid = s < fp.rows * groups_here;
    let r = s / groups_here;
    let k = select(fp.gk, s % groups_here, fp.stat != 0u);
    let len = fp.group;
    var lo = 0.0;
    var hi = 0.0;
    if (valid) {
        for (var t = lid; t < len; t += 256u) {
            var i = fp.b0 + t;
            if (fp.stat != 0u) {
                i = fpos[k * len + t];
            }
            let v = fw[r * fp.n + i];
            lo = min(lo, v);
            hi = max(hi, v);
        }
    }
    let mm = reduce256_minmax(lid, lo, hi);
    var best = fit_minmax(mm.x, mm.y, fp.maxq, fp.sym != 0u, 0);
    var best_err = 3.4e38;
    for (var c = 0u; c < fp.mse; c++) {
        let f = shrink[c];
        let cand = fit_minmax(f * mm.x, f * mm.y, fp.maxq, fp.sym != 0u, 0);
        var e = 0.0;
        if (valid) {
            for (var t = lid; t < len; t += 256u) {
                var i = fp.b0 + t;
                if (fp.stat != 0u) {
                    i = fpos[k * len + t];
                }
                e = e + mse_err(fw[r * fp.n + i], cand, fp.maxq);
            }
        }
        let total = reduce256_sum(lid, e);
        if (total < best_err) {
            best_err = total;
            best = cand;
        }
    }
    if (lid == 0u && valid) {
        scales[r * fp.ng + k] = best.scale;
        zeros[r * fp.ng + k] = best.zero;
    }
}

// block_rows, block_sg
@group(0) @binding(0) var<storage, read_write> bw_w: array<f32>;
@group(0) @binding(1) var<storage, read> bu: array<f32>;
@group(0) @binding(2) var<storage, read_write> berr: array<f32>;
@group(0) @binding(3) var<storage, read_write> bq: array<atomic<u32>>;
@group(0) @binding(4) var<storage, read_write> bscales: array<f32>;
@group(0) @binding(5) var<storage, read_write> bzeros: array<u32>;
@group(0) @binding(6) var<storage, read> bgidx: array<u32>;
@group(0) @binding(7) var<storage, read> bshrink: array<f32>;
@group(0) @binding(8) var<storage, read_write> bloss: array<f32>;
@group(0) @binding(9) var<uniform> bp: Params;

const BMAX: u32 = 128u;
// unpermute: the packed integers back in original column order, four per u32 (byte t of word k is
// column 4k + t), rows padded to whole words: out[r][k] from the position-ordered words of `uq`.
@group(0) @binding(0) var<storage, read> uq: array<u32>;
@group(0) @binding(1) var<storage, read> upos: array<u32>;
@group(0) @binding(2) var<storage, read_write> uout: array<u32>;
@group(0) @binding(3) var<uniform> up: Params;

@compute @workgroup_size(256)
fn unpermute(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let words = (up.cols + 3u) / 4u;
    let e = flat(wid, nwg, lid);
    if (e >= up.rows * words) {
        return;
    }
    let r = e / words;
    let k = e % words;
    var v = 0u;
    for (var t = 0u; t < 4u; t++) {
        let c = 4u * k + t;
        if (c < up.cols) {
            let p = upos[c];
            let b = (uq[r * (up.n / 4u) + p / 4u] >> (8u * (p % 4u))) & 0xFFu;
            v = v | (b << (8u * t));
        }
    }
    uout[e] = v;
}

// The grid position `pi` of row r is quantized on: the group grid in force `g`, or with static
// groups the one g_idx assigns (block_rows and block_sg).
fn grid_at(r: u32, pi: u32, g: Grid, row_ok: bool) -> Grid {
    if (bp.stat != 0u && row_ok) {
        let k = bgidx[pi];
        return Grid(bscales[r * bp.ng + k], bzeros[r * bp.ng + k]);
    }
    return g;
}

// Records the grid fitted for the group starting at position `pi` of row r.
fn store_grid(r: u32, pi: u32, g: Grid) {
    let k = pi / bp.group;
    bscales[r * bp.ng + k] = g.scale;
    bzeros[r * bp.ng + k] = g.zero;
}

// block_rows: the fused column loop with one invocation per row (32 rows per workgroup). The
// block's weights sit in workgroup memory, column-major with an XOR swizzle so that both the
// coalesced load (consecutive columns of one row) and the column loop (one column of consecutive
// rows) are free of bank conflicts. Each invocation runs its row's sequential chain alone, so the
// quantization of column i costs one instruction stream for 32 rows instead of one per row. U's
// rows are staged in workgroup memory URUN at a time (read by all 32 invocations at the same
// address, a broadcast), in two buffers: the next URUN rows are fetched into registers when a run
// starts and stored at its end, so one round trip to storage serves URUN columns. On an H200 this
// took a 128-column block of 4096 rows from 211 to 183 µs (one row fetched a step ahead before);
// at 28672 rows both read 1015-1100 µs (BENCHMARKS.md, session 16). Each invocation only touches
// its own row of the block, so the loop needs a barrier only when a run's buffer turns over. The
// error of column i replaces w_i in place and is written out, coalesced, after the loop. 24 KiB
// of workgroup memory.
const ROWS_WG: u32 = 32u;
const URUN: u32 = 8u;
var<workgroup> wsw: array<f32, 4096>;    // BMAX columns x ROWS_WG rows
var<workgroup> urow_s: array<f32, 2048>; // two runs of URUN U rows of the block

fn wsi(k: u32, t: u32) -> u32 {
    return k * ROWS_WG + (t ^ (k & 31u));
}

// Columns t, t + 32, t + 64, t + 96 of the block's U row `k` (zero past the block).
fn u_row4(k: u32, t: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if (k < bp.bw) {
        let b = (bp.b0 + k) * bp.n + bp.b0;
        if (t < bp.bw) { v.x = bu[b + t]; }
        if (t + 32u < bp.bw) { v.y = bu[b + t + 32u]; }
        if (t + 64u < bp.bw) { v.z = bu[b + t + 64u]; }
        if (t + 96u < bp.bw) { v.w = bu[b + t + 96u]; }
    }
    return v;
}

fn put_row4(at: u32, t: u32, v: vec4<f32>) {
    urow_s[at + t] = v.x;
    urow_s[at + t + 32u] = v.y;
    urow_s[at + t + 64u] = v.z;
    urow_s[at + t + 96u] = v.w;
}

@compute @workgroup_size(32)
fn block_rows(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let r0 = (wid.y * nwg.x + wid.x) * ROWS_WG;
    let n = bp.n;
    let bw = bp.bw;
    let rows_here = min(ROWS_WG, bp.rows - min(bp.rows, r0));
    // Coalesced load: consecutive invocations take consecutive columns of one row.
    for (var e = t; e < ROWS_WG * BMAX; e += ROWS_WG) {
        let rr = e / bw;
        let k = e % bw;
        if (rr < rows_here) {
            wsw[wsi(k, rr)] = bw_w[(r0 + rr) * n + bp.b0 + k];
        }
    }
    for (var k = 0u; k < URUN; k++) {
        put_row4(k * BMAX, t, u_row4(k, t));
    }
    workgroupBarrier();
    let r = r0 + t;
    let row_ok = t < rows_here;
    var g = Grid(1.0, 0u);
    let in_block_groups = bp.stat == 0u && bp.group <= bw;
    if (row_ok && bp.stat == 0u && !in_block_groups) {
        let k = min(bp.b0 / bp.group, bp.ng - 1u);
        g = Grid(bscales[r * bp.ng + k], bzeros[r * bp.ng + k]);
    }
    var word = 0u;
    var loss = 0.0;
    var f0 = vec4<f32>(0.0);
    var f1 = vec4<f32>(0.0);
    var f2 = vec4<f32>(0.0);
    var f3 = vec4<f32>(0.0);
    var f4 = vec4<f32>(0.0);
    var f5 = vec4<f32>(0.0);
    var f6 = vec4<f32>(0.0);
    var f7 = vec4<f32>(0.0);
    for (var i = 0u; i < bw; i++) {
        let pi = bp.b0 + i;
        let j = i % URUN;
        let run = i / URUN;
        let cur = (run & 1u) * (URUN * BMAX) + j * BMAX;
        if (j == 0u) {
            // The next run's rows, into registers while this run is applied.
            let k = i + URUN;
            f0 = u_row4(k, t);
            f1 = u_row4(k + 1u, t);
            f2 = u_row4(k + 2u, t);
            f3 = u_row4(k + 3u, t);
            f4 = u_row4(k + 4u, t);
            f5 = u_row4(k + 5u, t);
            f6 = u_row4(k + 6u, t);
            f7 = u_row4(k + 7u, t);
        }
        if (in_block_groups && i % bp.group == 0u && pi < bp.cols) {
            let e = min(i + bp.group, bw);
            var lo = 0.0;
            var hi = 0.0;
            for (var c = i; c < e; c++) {
                let v = wsw[wsi(c, t)];
                lo = min(lo, v);
                hi = max(hi, v);
            }
            var best = fit_minmax(lo, hi, bp.maxq, bp.sym != 0u, 0);
            var best_err = 3.4e38;
            for (var m = 0u; m < bp.mse; m++) {
                let f = bshrink[m];
                let cand = fit_minmax(f * lo, f * hi, bp.maxq, bp.sym != 0u, 0);
                var s = 0.0;
                for (var c = i; c < e; c++) {
                    s = s + mse_err(wsw[wsi(c, t)], cand, bp.maxq);
                }
                if (s < best_err) {
                    best_err = s;
                    best = cand;
                }
            }
            g = best;
            if (row_ok) {
                store_grid(r, pi, g);
            }
        }
        let gi = grid_at(r, pi, g, row_ok);
        let wi = wsw[wsi(i, t)];
        let q = quantize_one(wi, gi.scale, gi.zero, bp.maxq, 0);
        let err = (wi - gi.scale * (f32(q) - f32(gi.zero))) / urow_s[cur + i];
        wsw[wsi(i, t)] = err;
        loss = loss + err * err;
        word = word | (q << (8u * (pi % 4u)));
        if (row_ok && (pi % 4u == 3u || i + 1u == bw)) {
            atomicOr(&bq[r * (n / 4u) + pi / 4u], word);
            word = 0u;
        }
        // Later columns of the block, four at a time from an aligned start (independent chains);
        // columns at or before i, and past the block, take a zero factor and keep their value.
        for (var k = (i + 1u) & ~3u; k < bw; k += 4u) {
            let k1 = k + 1u;
            let k2 = k + 2u;
            let k3 = k + 3u;
            let u0 = select(0.0, urow_s[cur + k], k > i);
            let u1 = select(0.0, urow_s[cur + k1], k1 > i && k1 < bw);
            let u2 = select(0.0, urow_s[cur + k2], k2 > i && k2 < bw);
            let u3 = select(0.0, urow_s[cur + k3], k3 > i && k3 < bw);
            let a0 = wsi(k, t);
            let a1 = wsi(k1, t);
            let a2 = wsi(k2, t);
            let a3 = wsi(k3, t);
            let v0 = wsw[a0];
            let v1 = wsw[a1];
            let v2 = wsw[a2];
            let v3 = wsw[a3];
            wsw[a0] = v0 - err * u0;
            wsw[a1] = v1 - err * u1;
            wsw[a2] = v2 - err * u2;
            wsw[a3] = v3 - err * u3;
        }
        if (j == URUN - 1u) {
            // The other buffer was last read in the previous run, which every invocation has
            // left (the barrier below ended it).
            let nx = ((run + 1u) & 1u) * (URUN * BMAX);
            put_row4(nx, t, f0);
            put_row4(nx + BMAX, t, f1);
            put_row4(nx + 2u * BMAX, t, f2);
            put_row4(nx + 3u * BMAX, t, f3);
            put_row4(nx + 4u * BMAX, t, f4);
            put_row4(nx + 5u * BMAX, t, f5);
            put_row4(nx + 6u * BMAX, t, f6);
            put_row4(nx + 7u * BMAX, t, f7);
            workgroupBarrier();
        }
    }
    // The coalesced store reads other invocations' rows.
    workgroupBarrier();
    // Coalesced store of the errors (the lazy updates' left operand).
    for (var e = t; e < ROWS_WG * BMAX; e += ROWS_WG) {
        let rr = e / bw;
        let k = e % bw;
        if (rr < rows_here) {
            berr[(r0 + rr) * bp.err_ld + bp.err_col + k] = wsw[wsi(k, rr)];
        }
    }
    if (row_ok) {
        bloss[r] = bloss[r] + loss;
    }
}
