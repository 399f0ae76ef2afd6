// Round-to-nearest quantization on the quantizer grid of src/quant/grid.rs, reproduced bit for bit.
//
// Entry points (each binds only what it uses; bindings are per entry point):
//   fit       per (row, group) min/max by a workgroup tree, then scale and zero -> scales, zeros
//   quantize  q = clamp(round(w / scale) + zero, 0, maxq), four u8 packed per u32 (byte j = column
//             4k + j), rows padded to whole words
//   dequant   scale * (q - zero) as f32 (stored through a u32 view)
//   dequant_packed  the same from stored integers instead of w: q packed four per u32 (byte j of
//             word k = column 4k + j) and the group of each column from g_idx (act-order), so
//             GPTQ's result is dequantized where it was computed
//
// The grid functions (fit_minmax, quantize_one, ...) come from quant_grid.wgsl, prepended.

struct Params {
    rows: u32,      // rows in this dispatch
    cols: u32,
    group: u32,     // columns per group
    n_groups: u32,
    w_off: u32,     // element offset of the first row in the weight chunk (dequant_packed: word
                    // offset in the packed chunk)
    p_off: u32,     // element offset of its first (row, group) in the scales/zeros chunks
    o_off: u32,     // word offset of its first output in the output chunk
    lanes: u32,     // fit: invocations per segment (power of two dividing 256)
    maxq: u32,
    sym: u32,
    words: u32,     // output words per row (quantize: ceil(cols / 4); dequant: cols);
                    // dequant_packed: packed words per row of the input
    div_skew: i32,  // test hook: ulps added to every quotient (0 in production)
}

const WG: u32 = 256u;

@group(0) @binding(0) var<storage, read> w: array<f32>;

// fit
@group(0) @binding(1) var<storage, read_write> fit_scales: array<f32>;
@group(0) @binding(2) var<storage, read_write> fit_zeros: array<u32>;
@group(0) @binding(3) var<uniform> fp: Params;

// quantize, dequant
@group(0) @binding(1) var<storage, read> scales: array<f32>;
@group(0) @binding(2) var<storage, read> zeros: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<u32>;
@group(0) @binding(4) var<uniform> p: Params;

var<workgroup> smin: array<f32, WG>;
var<workgroup> smax: array<f32, WG>;

@compute @workgroup_size(256)
fn fit(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let lanes = fp.lanes;
    let lane = lid % lanes;
    let seg = (wid.y * nwg.x + wid.x) * (WG / lanes) + lid / lanes;
    let total = fp.rows * fp.n_groups;
    var mn = 0.0;
    var mx = 0.0;
    if (seg < total) {
        let row = seg / fp.n_groups;
        let start = (seg % fp.n_groups) * fp.group;
        let len = min(fp.group, fp.cols - start);
        let base = fp.w_off + row * fp.cols + start;
        // The segment's first element is a valid identity for both min and max.
        mn = w[base];
        mx = mn;
        for (var i = lane; i < len; i += lanes) {
            let v = w[base + i];
            mn = min(mn, v);
            mx = max(mx, v);
        }
    }
    smin[lid] = mn;
    smax[lid] = mx;
    for (var s = lanes / 2u; s > 0u; s = s / 2u) {
        workgroupBarrier();
        if (lane < s) {
            smin[lid] = min(smin[lid], smin[lid + s]);
            smax[lid] = max(smax[lid], smax[lid + s]);
        }
    }
    if (lane == 0u && seg < total) {
        let g = fit_minmax(smin[lid], smax[lid], fp.maxq, fp.sym != 0u, fp.div_skew);
        fit_scales[fp.p_off + seg] = g.scale;
        fit_zeros[fp.p_off + seg] = g.zero;
    }
}

fn linear_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid;
}

@compute @workgroup_size(256)
fn quantize(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = linear_index(wid, nwg, lid);
    if (idx >= p.rows * p.words) {
        return;
    }
    let row = idx / p.words;
    let c0 = (idx % p.words) * 4u;
    var packed = 0u;
    for (var j = 0u; j < 4u; j++) {
        let c = c0 + j;
        if (c < p.cols) {
            let pi = p.p_off + row * p.n_groups + c / p.group;
            let q = quantize_one(w[p.w_off + row * p.cols + c], scales[pi], zeros[pi], p.maxq, p.div_skew);
            packed |= q << (8u * j);
        }
    }
    out[p.o_off + idx] = packed;
}

@compute @workgroup_size(256)
fn dequant(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = linear_index(wid, nwg, lid);
    if (idx >= p.rows * p.cols) {
        return;
    }
    let row = idx / p.cols;
    let c = idx % p.cols;
    let pi = p.p_off + row * p.n_groups + c / p.group;
    let s = scales[pi];
    let z = zeros[pi];
    let q = quantize_one(w[p.w_off + idx], s, z, p.maxq, p.div_skew);
    // GroupParams::dequantize: scale * (q - zero), both integers exact in f32.
    out[p.o_off + idx] = bitcast<u32>(s * (f32(q) - f32(z)));
}

// dequant_packed: binding 0 the packed integers, 1-2 the grid, 3 the output, 4 g_idx (one u32 per
// column, each < n_groups: the host checks), 5 the uniform.
@group(0) @binding(0) var<storage, read> pq: array<u32>;
@group(0) @binding(4) var<storage, read> gidx: array<u32>;
@group(0) @binding(5) var<uniform> dp: Params;

@compute @workgroup_size(256)
fn dequant_packed(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = linear_index(wid, nwg, lid);
    if (idx >= dp.rows * dp.cols) {
        return;
    }
    let row = idx / dp.cols;
    let c = idx % dp.cols;
    let q = (pq[dp.w_off + row * dp.words + c / 4u] >> (8u * (c % 4u))) & 0xFFu;
    let pi = dp.p_off + row * dp.n_groups + gidx[c];
    // QuantizedTensor::dequantize: scale * (q - zero), both integers exact in f32.
    out[dp.o_off + idx] = bitcast<u32>(scales[pi] * (f32(q) - f32(zeros[pi])));
}
