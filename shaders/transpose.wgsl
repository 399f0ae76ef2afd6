// Y = Xᵀ for an f16 matrix X (rows x cols, row-major, one buffer) into Y (cols x rows, one buffer).
// `gpu::matmul` runs large A·Bᵀ and A·B products (A k-contiguous, and B too in A·Bᵀ) as
// Aᵀ-stored TN products through this: the tensor-core kernel is fastest on that orientation
// (BENCHMARKS.md, sessions 13-14).
// rows and cols are multiples of 4 (the host checks), so every global access is one 8-byte
// vector of four halves. A workgroup moves a 64 x 64 tile through workgroup memory, so the reads
// run along X's rows and the writes along Y's rows, both coalesced.

enable f16;

struct Params {
    rows: u32,
    cols: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<storage, read> X: array<vec4<f16>>;
@group(0) @binding(1) var<storage, read_write> Y: array<vec4<f16>>;
@group(0) @binding(2) var<uniform> p: Params;

// Row stride of the staged tile in halves: 66 = 33 words, odd, so the four rows a thread reads
// back for one output vector sit in different banks.
const TS: u32 = 66u;
var<workgroup> S: array<f16, 4224>; // 64 rows of TS

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let r0 = wid.y * 64u; // X's rows (Y's columns) of this tile
    let c0 = wid.x * 64u; // X's columns (Y's rows)
    let lv = tid % 16u;   // vector within a 64-wide row of the tile
    let lr = tid / 16u;   // first of this thread's four rows
    for (var i = 0u; i < 4u; i++) {
        let r = lr + 16u * i;
        if (r0 + r < p.rows && c0 + lv * 4u < p.cols) {
            let v = X[((r0 + r) * p.cols + c0) / 4u + lv];
            let s = r * TS + lv * 4u;
            S[s] = v.x;
            S[s + 1u] = v.y;
            S[s + 2u] = v.z;
            S[s + 3u] = v.w;
        }
    }
    workgroupBarrier();
    for (var i = 0u; i < 4u; i++) {
        let c = lr + 16u * i; // Y's row c0 + c
        if (c0 + c < p.cols && r0 + lv * 4u < p.rows) {
            let s = lv * 4u * TS + c;
            let v = vec4<f16>(S[s], S[s + TS], S[s + 2u * TS], S[s + 3u * TS]);
            Y[((c0 + c) * p.rows + r0) / 4u + lv] = v;
        }
    }
}
