// Llama decoder forward pieces that are not matrix products (those use matmul.wgsl), all f32.
//
// Entry points (each binds only what it uses; bindings are per entry point):
//   rms_norm    y = w * (x * rsqrt(mean(x^2) + eps)), one workgroup per row (HF rounds the
//               normalised row to f32 before the weight multiply; so do we)
//   rope        rotate pairs (i, i + d/2) of every head in place by a host-made cos/sin table of the
//               row's position (row % seq): the table is computed in f64 on the host
//   attention   causal grouped-query attention; a workgroup takes 64 query rows of one head of one
//               sequence, stages 16 keys/values at a time in workgroup memory and keeps an online
//               softmax per row, so no seq x seq matrix is ever stored
//   silu_mul    g = silu(g) * u in place (SwiGLU)
//   add         x += y (residual), optionally y + bias broadcast per column (bias_add)
//   sub         x -= y (Δ = W - Ŵ of a compressed layer, for its error)
//   nll         per row: logsumexp(logits) - logits[target] (the cross-entropy of one token)
//   to_f16      y (f16 pairs) = x (f32) rounded to f16, for the f16 forward's linear inputs; a value
//               beyond f16's range is saturated and raises a flag the host checks
//   widen       y (f32) = x (f16 or bf16 pairs), exactly: a block's weights cross to the GPU as
//               stored and are widened there for a layer method
//   embed       out row r = table row ids[r], for the rows whose id lies in the bound table chunk
//               (one dispatch per pair of output and table chunks)

struct Rows {
    rows: u32,
    cols: u32,
    x_off: u32,
    y_off: u32,
    eps: f32,
    seq: u32,      // rope: positions are row % seq
    heads: u32,    // rope: heads in the row
    head_dim: u32, // rope
    pos0: u32,     // rope: position of the dispatch's first row minus (its row index mod seq)
    bf16: u32,     // widen: 1 when x is bf16, 0 for f16
    pad1: u32,
    pad2: u32,
}

const WG: u32 = 256u;
var<workgroup> red: array<f32, WG>;

// ---- rms_norm: binding 0 x, 1 w, 2 y, 3 params
@group(0) @binding(0) var<storage, read> n_x: array<f32>;
@group(0) @binding(1) var<storage, read> n_w: array<f32>;
@group(0) @binding(2) var<storage, read_write> n_y: array<f32>;
@group(0) @binding(3) var<uniform> np: Rows;

@compute @workgroup_size(256)
fn rms_norm(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let row = wid.x + wid.y * 65535u;
    if (row >= np.rows) {
        return;
    }
    let base = np.x_off + row * np.cols;
    var s = 0.0;
    for (var c = lid.x; c < np.cols; c += WG) {
        let v = n_x[base + c];
        s = fma(v, v, s);
    }
    red[lid.x] = s;
    workgroupBarrier();
    for (var w = WG / 2u; w > 0u; w = w / 2u) {
        if (lid.x < w) {
            red[lid.x] = red[lid.x] + red[lid.x + w];
        }
        workgroupBarrier();
    }
    let inv = inverseSqrt(red[0] / f32(np.cols) + np.eps);
    let ob = np.y_off + row * np.cols;
    for (var c = lid.x; c < np.cols; c += WG) {
        n_y[ob + c] = n_w[c] * (n_x[base + c] * inv);
    }
}

// ---- rope: binding 0 x (in place), 1 table [seq][d/2] of (cos, sin), 2 params
@group(0) @binding(0) var<storage, read_write> r_x: array<f32>;
@group(0) @binding(1) var<storage, read> r_cs: array<vec2<f32>>;
@group(0) @binding(2) var<uniform> rp: Rows;

@compute @workgroup_size(256)
fn rope(@builtin(global_invocation_id) gid: vec3<u32>) {
    let half = rp.head_dim / 2u;
    let per_row = rp.heads * half;
    let i = gid.x + gid.y * 65535u * 256u;
    if (i >= rp.rows * per_row) {
        return;
    }
    let row = i / per_row;
    let rem = i % per_row;
    let h = rem / half;
    let f = rem % half;
    let pos = (rp.pos0 + row) % rp.seq;
    let cs = r_cs[pos * half + f];
    let a = rp.x_off + row * rp.cols + h * rp.head_dim + f;
    let x1 = r_x[a];
    let x2 = r_x[a + half];
    r_x[a] = x1 * cs.x - x2 * cs.y;
    r_x[a + half] = x2 * cs.x + x1 * cs.y;
}

// ---- attention: binding 0 q, 1 k, 2 v, 3 out, 4 params
struct Attn {
    seqs: u32,     // sequences in this dispatch
    seq: u32,      // tokens per sequence
    hq: u32,
    hk: u32,
    d: u32,
    q_off: u32,
    k_off: u32,
    v_off: u32,
    o_off: u32,
    scale: f32,    // 1 / sqrt(d)
    blocks: u32,   // query blocks per sequence
    pad0: u32,
}

const BR: u32 = 64u;
const BC: u32 = 16u;
const DMAX4: u32 = 32u; // largest head dimension / 4
// Head dimension / 4. gpu::forward::attention compiles one module per head dimension with this
// line replaced, so every loop over the head has a constant trip count: the compiler unrolls them
// and keeps q and the output accumulator in registers (with `ap.d` as the bound they lived in
// local memory and the kernel ran at ~0.8 TFLOP/s on an H200).
const HEAD_D4: u32 = 32u;

@group(0) @binding(0) var<storage, read> a_q: array<f32>;
@group(0) @binding(1) var<storage, read> a_k: array<f32>;
@group(0) @binding(2) var<storage, read> a_v: array<f32>;
@group(0) @binding(3) var<storage, read_write> a_o: array<f32>;
@group(0) @binding(4) var<uniform> ap: Attn;

var<workgroup> ks: array<vec4<f32>, 512>; // BC x DMAX4
var<workgroup> vs: array<vec4<f32>, 512>;

@compute @workgroup_size(64)
fn attention(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let s = wid.x / ap.blocks;
    let blk = wid.x % ap.blocks;
    let h = wid.y;
    let kh = h / (ap.hq / ap.hk);
    let t = blk * BR + lid.x;
    let valid = t < ap.seq;
    let row = s * ap.seq + t;
    let qw = ap.hq * ap.d;
    let kw = ap.hk * ap.d;
    var qv: array<vec4<f32>, HEAD_D4>;
    var acc: array<vec4<f32>, HEAD_D4>;
    let qb = ap.q_off + row * qw + h * ap.d;
    for (var c = 0u; c < HEAD_D4; c++) {
        if (valid) {
            let o = qb + 4u * c;
            qv[c] = vec4<f32>(a_q[o], a_q[o + 1u], a_q[o + 2u], a_q[o + 3u]) * ap.scale;
        }
        acc[c] = vec4<f32>(0.0);
    }
    var m = -3.0e38;
    var l = 0.0;
    let last = min(blk * BR + BR, ap.seq);
    for (var j0 = 0u; j0 < last; j0 += BC) {
        // Keys past the sequence are zero, so masked products stay finite.
        for (var e = lid.x; e < BC * HEAD_D4; e += BR) {
            let jj = e / HEAD_D4;
            let c = e % HEAD_D4;
            let key = j0 + jj;
            var kv = vec4<f32>(0.0);
            var vv = vec4<f32>(0.0);
            if (key < ap.seq) {
                let o = s * ap.seq + key;
                let ko = ap.k_off + o * kw + kh * ap.d + 4u * c;
                let vo = ap.v_off + o * kw + kh * ap.d + 4u * c;
                kv = vec4<f32>(a_k[ko], a_k[ko + 1u], a_k[ko + 2u], a_k[ko + 3u]);
                vv = vec4<f32>(a_v[vo], a_v[vo + 1u], a_v[vo + 2u], a_v[vo + 3u]);
            }
            ks[jj * DMAX4 + c] = kv;
            vs[jj * DMAX4 + c] = vv;
        }
        workgroupBarrier();
        if (valid && j0 <= t) {
            // All BC keys of the tile, masked past the query (constant trip counts throughout).
            var sc: array<f32, BC>;
            var mt = m;
            for (var jj = 0u; jj < BC; jj++) {
                var dot = vec4<f32>(0.0);
                for (var c = 0u; c < HEAD_D4; c++) {
                    dot = fma(qv[c], ks[jj * DMAX4 + c], dot);
                }
                let sd = select(-3.0e38, dot.x + dot.y + dot.z + dot.w, j0 + jj <= t);
                sc[jj] = sd;
                mt = max(mt, sd);
            }
            let corr = exp(m - mt);
            l = l * corr;
            for (var c = 0u; c < HEAD_D4; c++) {
                acc[c] = acc[c] * corr;
            }
            for (var jj = 0u; jj < BC; jj++) {
                let pj = select(0.0, exp(sc[jj] - mt), j0 + jj <= t);
                l = l + pj;
                for (var c = 0u; c < HEAD_D4; c++) {
                    acc[c] = fma(vec4<f32>(pj), vs[jj * DMAX4 + c], acc[c]);
                }
            }
            m = mt;
        }
        workgroupBarrier();
    }
    if (valid) {
        let ob = ap.o_off + row * qw + h * ap.d;
        let inv = 1.0 / l;
        for (var c = 0u; c < HEAD_D4; c++) {
            let r = acc[c] * inv;
            let o = ob + 4u * c;
            a_o[o] = r.x;
            a_o[o + 1u] = r.y;
            a_o[o + 2u] = r.z;
            a_o[o + 3u] = r.w;
        }
    }
}

// ---- silu_mul: binding 0 g (in place), 1 u, 2 params (rows x cols at x_off / y_off)
@group(0) @binding(0) var<storage, read_write> s_g: array<f32>;
@group(0) @binding(1) var<storage, read> s_u: array<f32>;
@group(0) @binding(2) var<uniform> sp: Rows;

@compute @workgroup_size(256)
fn silu_mul(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 65535u * 256u;
    if (i >= sp.rows * sp.cols) {
        return;
    }
    let g = s_g[sp.x_off + i];
    s_g[sp.x_off + i] = g / (1.0 + exp(-g)) * s_u[sp.y_off + i];
}

// ---- add, sub: binding 0 x (in place), 1 y, 2 params; bias_add: y is one row broadcast to all rows
@group(0) @binding(0) var<storage, read_write> d_x: array<f32>;
@group(0) @binding(1) var<storage, read> d_y: array<f32>;
@group(0) @binding(2) var<uniform> dp: Rows;

@compute @workgroup_size(256)
fn add(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 65535u * 256u;
    if (i >= dp.rows * dp.cols) {
        return;
    }
    d_x[dp.x_off + i] = d_x[dp.x_off + i] + d_y[dp.y_off + i];
}

// x -= y (the difference of two weight matrices for the layer error)
@compute @workgroup_size(256)
fn sub(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 65535u * 256u;
    if (i >= dp.rows * dp.cols) {
        return;
    }
    d_x[dp.x_off + i] = d_x[dp.x_off + i] - d_y[dp.y_off + i];
}

@compute @workgroup_size(256)
fn bias_add(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 65535u * 256u;
    if (i >= dp.rows * dp.cols) {
        return;
    }
    d_x[dp.x_off + i] = d_x[dp.x_off + i] + d_y[i % dp.cols];
}

// ---- nll: binding 0 logits, 1 targets (u32 per row), 2 loss (f32 per row), 3 params
@group(0) @binding(0) var<storage, read> l_x: array<f32>;
@group(0) @binding(1) var<storage, read> l_t: array<u32>;
@group(0) @binding(2) var<storage, read_write> l_out: array<f32>;
@group(0) @binding(3) var<uniform> lp: Rows;

@compute @workgroup_size(256)
fn nll(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let row = wid.x + wid.y * 65535u;
    if (row >= lp.rows) {
        return;
    }
    let base = lp.x_off + row * lp.cols;
    var mx = -3.0e38;
    for (var c = lid.x; c < lp.cols; c += WG) {
        mx = max(mx, l_x[base + c]);
    }
    red[lid.x] = mx;
    workgroupBarrier();
    for (var w = WG / 2u; w > 0u; w = w / 2u) {
        if (lid.x < w) {
            red[lid.x] = max(red[lid.x], red[lid.x + w]);
        }
        workgroupBarrier();
    }
    let m = red[0];
    workgroupBarrier();
    var s = 0.0;
    for (var c = lid.x; c < lp.cols; c += WG) {
        s = s + exp(l_x[base + c] - m);
    }
    red[lid.x] = s;
    workgroupBarrier();
    for (var w = WG / 2u; w > 0u; w = w / 2u) {
        if (lid.x < w) {
            red[lid.x] = red[lid.x] + red[lid.x + w];
        }
        workgroupBarrier();
    }
    if (lid.x == 0u) {
        l_out[lp.y_off + row] = m + log(red[0]) - l_x[base + l_t[lp.y_off + row]];
    }
}

// ---- kl_top1: binding 0 base logits, 1 compared logits, 2 out (kl, top-1 agreement) per row,
// 3 params. KL(base || compared) over the vocabulary in f32 with max-shifted exponentials; top-1
// compares the lowest-index argmax of each row (ties broken by index, as everywhere).
struct Pair {
    rows: u32,
    cols: u32,
    b_off: u32,
    c_off: u32,
    o_off: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<storage, read> k_b: array<f32>;
@group(0) @binding(1) var<storage, read> k_c: array<f32>;
@group(0) @binding(2) var<storage, read_write> k_out: array<f32>;
@group(0) @binding(3) var<uniform> kp: Pair;

var<workgroup> redu: array<u32, WG>;

fn wg_max(v: f32, lid: u32) -> f32 {
    workgroupBarrier();
    red[lid] = v;
    workgroupBarrier();
    for (var w = WG / 2u; w > 0u; w = w / 2u) {
        if (lid < w) {
            red[lid] = max(red[lid], red[lid + w]);
        }
        workgroupBarrier();
    }
    return red[0];
}

fn wg_sum(v: f32, lid: u32) -> f32 {
    workgroupBarrier();
    red[lid] = v;
    workgroupBarrier();
    for (var w = WG / 2u; w > 0u; w = w / 2u) {
        if (lid < w) {
            red[lid] = red[lid] + red[lid + w];
        }
        workgroupBarrier();
    }
    return red[0];
}

fn wg_min_u(v: u32, lid: u32) -> u32 {
    workgroupBarrier();
    redu[lid] = v;
    workgroupBarrier();
    for (var w = WG / 2u; w > 0u; w = w / 2u) {
        if (lid < w) {
            redu[lid] = min(redu[lid], redu[lid + w]);
        }
        workgroupBarrier();
    }
    return redu[0];
}

@compute @workgroup_size(256)
fn kl_top1(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let lid = lid3.x;
    let row = wid.x + wid.y * 65535u;
    if (row >= kp.rows) {
        return;
    }
    let bb = kp.b_off + row * kp.cols;
    let cb = kp.c_off + row * kp.cols;
    var mb = -3.0e38;
    var mc = -3.0e38;
    for (var i = lid; i < kp.cols; i += WG) {
        mb = max(mb, k_b[bb + i]);
        mc = max(mc, k_c[cb + i]);
    }
    mb = wg_max(mb, lid);
    mc = wg_max(mc, lid);
    var sb = 0.0;
    var sc = 0.0;
    var ib = 0xffffffffu;
    var ic = 0xffffffffu;
    for (var i = lid; i < kp.cols; i += WG) {
        let b = k_b[bb + i];
        let c = k_c[cb + i];
        sb = sb + exp(b - mb);
        sc = sc + exp(c - mc);
        if (b == mb) { ib = min(ib, i); }
        if (c == mc) { ic = min(ic, i); }
    }
    let lb = mb + log(wg_sum(sb, lid));
    let lc = mc + log(wg_sum(sc, lid));
    ib = wg_min_u(ib, lid);
    ic = wg_min_u(ic, lid);
    var kl = 0.0;
    for (var i = lid; i < kp.cols; i += WG) {
        let b = k_b[bb + i] - lb;
        kl = kl + exp(b) * (b - (k_c[cb + i] - lc));
    }
    kl = wg_sum(kl, lid);
    if (lid == 0u) {
        k_out[kp.o_off + 2u * row] = kl;
        k_out[kp.o_off + 2u * row + 1u] = select(0.0, 1.0, ib == ic);
    }
}

// ---- to_f16: binding 0 x (f32), 1 y (f16, two per word), 2 flag (one atomic word), 3 params.
// One invocation per pair of elements: the host only converts rows of even width, so every row,
// and so every dispatch's first element (y_off), starts on a word of y and no word is shared
// between invocations or dispatches. pack2x16float's result for a value outside f16's finite
// range is indeterminate, so such values are clamped first; the flag turns the clamp into an
// error on the host instead of a silently wrong activation.
@group(0) @binding(0) var<storage, read> h_x: array<f32>;
@group(0) @binding(1) var<storage, read_write> h_y: array<u32>;
@group(0) @binding(2) var<storage, read_write> h_flag: array<atomic<u32>>;
@group(0) @binding(3) var<uniform> hp: Rows;

const F16_MAX: f32 = 65504.0;

@compute @workgroup_size(256)
fn to_f16(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 65535u * 256u;
    if (i >= hp.rows * hp.cols / 2u) {
        return;
    }
    let v = vec2<f32>(h_x[hp.x_off + 2u * i], h_x[hp.x_off + 2u * i + 1u]);
    if (max(abs(v.x), abs(v.y)) > F16_MAX) {
        atomicMax(&h_flag[0], 1u);
    }
    h_y[hp.y_off / 2u + i] = pack2x16float(clamp(v, vec2<f32>(-F16_MAX), vec2<f32>(F16_MAX)));
}

// ---- widen: binding 0 x (f16 or bf16, two per word), 1 y (f32), 2 params.
// One invocation per pair, rows of even width (as to_f16). Both widenings are exact: bf16 is the
// top half of an f32, and every f16 (subnormals included) is a normal f32.
@group(0) @binding(0) var<storage, read> w_x: array<u32>;
@group(0) @binding(1) var<storage, read_write> w_y: array<f32>;
@group(0) @binding(2) var<uniform> wp: Rows;

@compute @workgroup_size(256)
fn widen(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 65535u * 256u;
    if (i >= wp.rows * wp.cols / 2u) {
        return;
    }
    let w = w_x[wp.x_off / 2u + i];
    var v = unpack2x16float(w);
    if (wp.bf16 == 1u) {
        v = vec2<f32>(bitcast<f32>(w << 16u), bitcast<f32>(w & 0xffff0000u));
    }
    w_y[wp.y_off + 2u * i] = v.x;
    w_y[wp.y_off + 2u * i + 1u] = v.y;
}

// ---- embed: binding 0 table chunk (table rows t_row0..t_row0 + t_rows), 1 ids (one per output
// row of the whole tensor), 2 out chunk, 3 params
struct Embed {
    rows: u32,    // rows of this output chunk
    cols: u32,
    id_off: u32,  // first output row of this chunk (index into ids)
    t_row0: u32,
    t_rows: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}
@group(0) @binding(0) var<storage, read> e_table: array<f32>;
@group(0) @binding(1) var<storage, read> e_ids: array<u32>;
@group(0) @binding(2) var<storage, read_write> e_out: array<f32>;
@group(0) @binding(3) var<uniform> ep: Embed;

@compute @workgroup_size(256)
fn embed(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 65535u * 256u;
    if (i >= ep.rows * ep.cols) {
        return;
    }
    let r = i / ep.cols;
    let id = e_ids[ep.id_off + r];
    if (id >= ep.t_row0 && id < ep.t_row0 + ep.t_rows) {
        e_out[i] = e_table[(id - ep.t_row0) * ep.cols + i % ep.cols];
    }
}
