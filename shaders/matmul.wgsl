// Register-tiled matrix multiply: C (m x n, f32) = [C +] A (m x k) * op(B), f32 accumulation.
// op(B) = B (k x n, row-major) or B^T (B stored n x k, row-major), chosen by B_TRANS.
// The host prepends a prelude that declares bindings 0 (A) and 1 (B), the loaders ld_a/ld_b
// (f32, or f16/bf16 packed two per u32 word) and the constant B_TRANS.
// Tile: 128 x 128 per workgroup of 16 x 16 threads, each thread an 8 x 8 block held in sixteen vec4
// accumulators (explicit variables: indexed local arrays spill to memory on some drivers),
// K staged 16 at a time in workgroup memory.

struct Params {
    m: u32, n: u32, k: u32, accumulate: u32,
    a_off: u32, lda: u32, b_off: u32, ldb: u32,
    c_off: u32, ldc: u32, pad0: u32, pad1: u32,
}

@group(0) @binding(2) var<storage, read_write> C: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

const BM: u32 = 128u;
const BN: u32 = 128u;
const BK: u32 = 16u;
// Row stride of the staged tiles in vec4 units; 33 instead of 32 spreads the transposed stores
// of A over more banks.
const AS: u32 = 33u;
const BS: u32 = 33u;

var<workgroup> As: array<vec4<f32>, 528>; // BK rows of AS vec4: As[kk][m]
var<workgroup> Bs: array<vec4<f32>, 528>; // BK rows of BS vec4: Bs[kk][n]

fn store4(r: u32, c: u32, v: vec4<f32>) {
    if (r >= p.m) { return; }
    let base = p.c_off + r * p.ldc;
    for (var j = 0u; j < 4u; j++) {
        let cc = c + j;
        if (cc < p.n) {
            let i = base + cc;
            if (p.accumulate != 0u) {
                C[i] = C[i] + v[j];
            } else {
                C[i] = v[j];
            }
        }
    }
}

@compute @workgroup_size(16, 16, 1)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let tx = lid.x;
    let ty = lid.y;
    let tid = ty * 16u + tx;
    let row0 = wid.y * BM;
    let col0 = wid.x * BN;

    var c00 = vec4<f32>(0.0); var c01 = vec4<f32>(0.0);
    var c10 = vec4<f32>(0.0); var c11 = vec4<f32>(0.0);
    var c20 = vec4<f32>(0.0); var c21 = vec4<f32>(0.0);
    var c30 = vec4<f32>(0.0); var c31 = vec4<f32>(0.0);
    var c40 = vec4<f32>(0.0); var c41 = vec4<f32>(0.0);
    var c50 = vec4<f32>(0.0); var c51 = vec4<f32>(0.0);
    var c60 = vec4<f32>(0.0); var c61 = vec4<f32>(0.0);
    var c70 = vec4<f32>(0.0); var c71 = vec4<f32>(0.0);

    // Loader coordinates: consecutive threads read consecutive addresses of global memory.
    let lk = tid & 15u;   // k inside the tile, for k-contiguous sources (A, B^T)
    let lr = tid >> 4u;   // first row of this thread's 8 rows (stride 16)
    let nn = tid & 127u;  // n inside the tile, for n-contiguous sources (B)
    let nk = tid >> 7u;   // first k of this thread's 8 k (stride 2)

    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        let gk = k0 + lk;
        for (var j = 0u; j < 8u; j++) {
            let r = lr + j * 16u;
            let gr = row0 + r;
            var v = 0.0;
            if (gr < p.m && gk < p.k) {
                v = ld_a(p.a_off + gr * p.lda + gk);
            }
            As[lk * AS + (r >> 2u)][r & 3u] = v;
        }
        if (B_TRANS) {
            for (var j = 0u; j < 8u; j++) {
                let c = lr + j * 16u;
                let gc = col0 + c;
                var v = 0.0;
                if (gc < p.n && gk < p.k) {
                    v = ld_b(p.b_off + gc * p.ldb + gk);
                }
                Bs[lk * BS + (c >> 2u)][c & 3u] = v;
            }
        } else {
            let gc = col0 + nn;
            for (var j = 0u; j < 8u; j++) {
                let kk = nk + j * 2u;
                let gkk = k0 + kk;
                var v = 0.0;
                if (gc < p.n && gkk < p.k) {
                    v = ld_b(p.b_off + gkk * p.ldb + gc);
                }
                Bs[kk * BS + (nn >> 2u)][nn & 3u] = v;
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            let a0 = As[kk * AS + ty];
            let a1 = As[kk * AS + 16u + ty];
            let b0 = Bs[kk * BS + tx];
            let b1 = Bs[kk * BS + 16u + tx];
            c00 = fma(vec4<f32>(a0.x), b0, c00); c01 = fma(vec4<f32>(a0.x), b1, c01);
            c10 = fma(vec4<f32>(a0.y), b0, c10); c11 = fma(vec4<f32>(a0.y), b1, c11);
            c20 = fma(vec4<f32>(a0.z), b0, c20); c21 = fma(vec4<f32>(a0.z), b1, c21);
            c30 = fma(vec4<f32>(a0.w), b0, c30); c31 = fma(vec4<f32>(a0.w), b1, c31);
            c40 = fma(vec4<f32>(a1.x), b0, c40); c41 = fma(vec4<f32>(a1.x), b1, c41);
            c50 = fma(vec4<f32>(a1.y), b0, c50); c51 = fma(vec4<f32>(a1.y), b1, c51);
            c60 = fma(vec4<f32>(a1.z), b0, c60); c61 = fma(vec4<f32>(a1.z), b1, c61);
            c70 = fma(vec4<f32>(a1.w), b0, c70); c71 = fma(vec4<f32>(a1.w), b1, c71);
        }
        workgroupBarrier();
    }

    let r0 = row0 + ty * 4u;
    let r1 = row0 + 64u + ty * 4u;
    let q0 = col0 + tx * 4u;
    let q1 = col0 + 64u + tx * 4u;
    store4(r0, q0, c00); store4(r0, q1, c01);
    store4(r0 + 1u, q0, c10); store4(r0 + 1u, q1, c11);
    store4(r0 + 2u, q0, c20); store4(r0 + 2u, q1, c21);
    store4(r0 + 3u, q0, c30); store4(r0 + 3u, q1, c31);
    store4(r1, q0, c40); store4(r1, q1, c41);
    store4(r1 + 1u, q0, c50); store4(r1 + 1u, q1, c51);
    store4(r1 + 2u, q0, c60); store4(r1 + 2u, q1, c61);
    store4(r1 + 3u, q0, c70); store4(r1 + 3u, q1, c71);
}
