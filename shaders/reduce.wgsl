// Per-(row, group) reductions of a row-major f32 matrix: min, max, max |x|, sum of squares, and
// the dot product with a second matrix of the same shape (`z`; the other ops bind `x` there).
//
// Work split: the host picks `lanes`, a power of two <= 256 no smaller than needed for one group
// (capped at 256), so one workgroup of 256 invocations reduces 256 / lanes consecutive segments
// (segment = one group of one row). Each lane first folds a strided slice of its segment (adjacent
// lanes read adjacent addresses), then the lanes of a segment combine their partials with a tree
// in workgroup memory. The grid is 2-D so more than 65535 workgroups fit in one dispatch.
// Shapes and offsets come from the uniform; only the workgroup size is fixed here.

struct Params {
    rows: u32,      // rows in this dispatch
    cols: u32,
    group: u32,     // columns per group (the last group of a row may be shorter)
    n_groups: u32,  // ceil(cols / group) = output columns
    in_off: u32,    // element offset of this dispatch's first row in the input chunk
    out_off: u32,   // element offset of its first output in the output chunk
    lanes: u32,     // invocations per segment, a power of two dividing 256
    op: u32,        // 0 min, 1 max, 2 max |x|, 3 sum of squares, 4 dot with z
}

const WG: u32 = 256u;

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> z: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

var<workgroup> part: array<f32, WG>;

// The value an element contributes (|x| for max |x|, x² for the sum of squares).
fn load(i: u32) -> f32 {
    let v = x[i];
    switch p.op {
        case 2u: { return abs(v); }
        case 3u: { return v * v; }
        case 4u: { return v * z[i]; }
        default: { return v; }
    }
}

fn combine(a: f32, b: f32) -> f32 {
    switch p.op {
        case 0u: { return min(a, b); }
        case 3u, 4u: { return a + b; }
        default: { return max(a, b); }
    }
}

@compute @workgroup_size(256)
fn reduce(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let lanes = p.lanes;
    let lane = lid % lanes;
    let seg = (wid.y * nwg.x + wid.x) * (WG / lanes) + lid / lanes;
    var acc = 0.0;
    if (seg < p.rows * p.n_groups) {
        let row = seg / p.n_groups;
        let start = (seg % p.n_groups) * p.group;
        let len = min(p.group, p.cols - start);
        let base = p.in_off + row * p.cols + start;
        // Start from the segment's first element (a member of the segment, so it is a valid
        // identity for min/max without needing infinities); the sum starts from zero.
        if (p.op < 3u) {
            acc = load(base);
        }
        for (var i = lane; i < len; i += lanes) {
            acc = combine(acc, load(base + i));
        }
    }
    part[lid] = acc;
    // Tree over the lanes of each segment; `lanes` is uniform, so every barrier is reached by
    // the whole workgroup. Segments are lane-aligned, so they never mix.
    for (var s = lanes / 2u; s > 0u; s = s / 2u) {
        workgroupBarrier();
        if (lane < s) {
            part[lid] = combine(part[lid], part[lid + s]);
        }
    }
    if (lane == 0u && seg < p.rows * p.n_groups) {
        y[p.out_off + seg] = part[lid];
    }
}
