// Mirrors the lower triangle of a square f32 matrix (d x d, stored as row chunks, one buffer
// each) onto its upper triangle: M[i][j] = M[j][i] for j > i. The lower-triangle XᵀX products
// (`gpu::matmul::matmul_lower_into`) leave the upper triangle to this pass.
// One dispatch pairs the rows of one destination chunk (D: rows r0..r0 + nr) with the rows of one
// source chunk (S: rows s0..s0 + ns): it writes D[i][j] for i in D's rows and j in S's rows,
// j > i, from S[j][i]. Each workgroup moves a 16 x 16 tile through workgroup memory so both the
// reads (along rows of S) and the writes (along rows of D) are consecutive. D and S may be the
// same buffer: only lower elements (j > i read as S[j][i]) are read and only upper ones written,
// hence both bindings are read_write (wgpu rejects a read-only binding aliasing a writable one).

struct Params {
    d: u32,
    r0: u32,
    nr: u32,
    s0: u32,
    ns: u32,
    pad0: u32, pad1: u32, pad2: u32,
}

@group(0) @binding(0) var<storage, read_write> D: array<f32>;
@group(0) @binding(1) var<storage, read_write> S: array<f32>;
@group(0) @binding(2) var<uniform> p: Params;

var<workgroup> T: array<f32, 272>; // 16 rows of 17 (the pad spreads the transposed reads)

@compute @workgroup_size(16, 16, 1)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let i0 = p.r0 + wid.y * 16u;
    let j0 = p.s0 + wid.x * 16u;
    // Workgroup-uniform: a tile with no j > i has nothing to move.
    if (j0 + 15u <= i0) {
        return;
    }
    let jr = j0 + lid.y;
    let ic = i0 + lid.x;
    if (jr < p.s0 + p.ns && ic < p.r0 + p.nr && jr > ic) {
        T[lid.y * 17u + lid.x] = S[(jr - p.s0) * p.d + ic];
    }
    workgroupBarrier();
    let iw = i0 + lid.y;
    let jw = j0 + lid.x;
    if (iw < p.r0 + p.nr && jw < p.s0 + p.ns && jw > iw) {
        D[(iw - p.r0) * p.d + jw] = T[lid.x * 17u + lid.y];
    }
}
