// Per-column (per input channel) statistics of a row-major matrix X (tokens x features):
// sum of squares and max |x| over the rows, written to (or accumulated into) two f32 vectors.
// The host prepends a prelude declaring binding 0 (X) and its loader ld_x (f32, or f16/bf16
// packed two per u32 word), as for matmul.wgsl.
//
// Work split: a workgroup of 32 x 8 invocations owns 32 consecutive columns; its 8 row lanes
// stride over all rows of the dispatch (adjacent invocations read adjacent columns, so each row
// lane reads 128 contiguous bytes of f32), then the 8 partials of a column are folded in
// workgroup memory in a fixed order (deterministic). Shapes and offsets come from the uniform.

struct Params {
    rows: u32,       // rows of X in this dispatch
    cols: u32,       // row length of X (its leading dimension)
    x_off: u32,      // element offset of this dispatch's first row in the X chunk
    col0: u32,       // first column of X this dispatch covers
    ncols: u32,      // columns covered
    s_off: u32,      // element offset of column col0's output in the sum-of-squares chunk
    a_off: u32,      // same in the max |x| chunk
    accumulate: u32, // 1: S += sum, A = max(A, max); 0: overwrite
}

@group(0) @binding(1) var<storage, read_write> S: array<f32>;
@group(0) @binding(2) var<storage, read_write> A: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

const LANES: u32 = 8u;
const COLS: u32 = 32u;

var<workgroup> ps: array<f32, 256>;
var<workgroup> pa: array<f32, 256>;

@compute @workgroup_size(32, 8, 1)
fn col_stats(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let c = wid.x * COLS + lid.x;
    var s = 0.0;
    var a = 0.0;
    if (c < p.ncols) {
        let base = p.x_off + p.col0 + c;
        for (var r = lid.y; r < p.rows; r += LANES) {
            let v = ld_x(base + r * p.cols);
            s = fma(v, v, s);
            a = max(a, abs(v));
        }
    }
    let slot = lid.y * COLS + lid.x;
    ps[slot] = s;
    pa[slot] = a;
    workgroupBarrier();
    if (lid.y == 0u && c < p.ncols) {
        for (var l = 1u; l < LANES; l++) {
            s += ps[l * COLS + lid.x];
            a = max(a, pa[l * COLS + lid.x]);
        }
        let si = p.s_off + c;
        let ai = p.a_off + c;
        if (p.accumulate != 0u) {
            S[si] = S[si] + s;
            A[ai] = max(A[ai], a);
        } else {
            S[si] = s;
            A[ai] = a;
        }
    }
}
