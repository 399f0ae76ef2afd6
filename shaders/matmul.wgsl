// Register-tiled matrix multiply: C (m x n, f32) = [C +] alpha * op(A) * op(B), f32 accumulation.
// op(A) = A (m x k, row-major) or A^T (A stored k x m, row-major), chosen by A_TRANS;
// op(B) = B (k x n, row-major) or B^T (B stored n x k, row-major), chosen by B_TRANS.
// The host prepends a prelude that declares bindings 0 (A) and 1 (B), the loaders ld_a/ld_b
// (f32, or f16/bf16 packed two per u32 word) and the constants A_TRANS and B_TRANS.
// Tile: 128 x 128 per workgroup of 16 x 16 threads, each thread an 8 x 8 block held in sixteen vec4
// accumulators (explicit variables: indexed local arrays spill to memory on some drivers),
// K staged 16 at a time in workgroup memory, the next K slice prefetched into registers.

struct Params {
    m: u32, n: u32, k: u32, accumulate: u32,
    a_off: u32, lda: u32, b_off: u32, ldb: u32,
    c_off: u32, ldc: u32, b_trans: u32, alpha: f32,
    // Nonzero: only tiles that reach the lower triangle (column <= row) of C are computed; tiles
    // entirely above the diagonal are skipped (symmetric products such as a Cholesky's trailing
    // update or XᵀX). Row r of this dispatch is row row_base + r of the matrix whose triangle
    // counts (a row range of C walked in pieces).
    lower: u32, pad0: u32, pad1: u32, row_base: u32,
    // Bit 0: op(A) is lower triangular (A[r][k] = 0 for k > r), so a tile's K walk ends after its
    // last row; bit 1: op(B) is lower triangular (B[k][c] = 0 for k < c), so it starts at the
    // tile's first column (a triangular inverse's products: about half the FLOPs).
    tri: u32,
    // Batched dispatches: workgroup z multiplies the problem at these element offsets past
    // a_off, b_off and c_off (0 for a single problem).
    a_zs: u32, b_zs: u32, c_zs: u32,
}

@group(0) @binding(2) var<storage, read_write> C: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

// This workgroup's problem's offsets (`main` sets them from its batch index).
var<private> a_off: u32;
var<private> b_off: u32;
var<private> c_off: u32;

const BM: u32 = 128u;
const BN: u32 = 128u;
const BK: u32 = 16u;
// Row stride of the staged tiles in vec4 units; 33 instead of 32 spreads the transposed stores
// of A over more banks.
const AS: u32 = 33u;
const BS: u32 = 33u;

var<workgroup> As: array<vec4<f32>, 528>; // BK rows of AS vec4: As[kk][m]
var<workgroup> Bs: array<vec4<f32>, 528>; // BK rows of BS vec4: Bs[kk][n]

// The epilogue reads C before it writes any of it: a load cannot pass an earlier store to the
// same buffer, so `C[i] = C[i] + v` element after element waited for memory once per element
// (64 times per thread). For products with a short K walk (a Cholesky's K = 64 trailing
// updates, GPTQ's K = 128 lazy updates) those waits were most of the kernel's time.
// C's values at row r, columns c..c + 3 (zero outside C or when not accumulating).
fn load4(r: u32, c: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if (p.accumulate != 0u && r < p.m) {
        let base = c_off + r * p.ldc;
        if (c < p.n) { v.x = C[base + c]; }
        if (c + 1u < p.n) { v.y = C[base + c + 1u]; }
        if (c + 2u < p.n) { v.z = C[base + c + 2u]; }
        if (c + 3u < p.n) { v.w = C[base + c + 3u]; }
    }
    return v;
}

// Stores alpha * v (+ `old`, C's values from load4, when accumulating) inside C.
fn store4(r: u32, c: u32, old: vec4<f32>, v: vec4<f32>) {
    if (r >= p.m) { return; }
    let s = p.alpha * v;
    let x = select(s, old + s, p.accumulate != 0u);
    let base = c_off + r * p.ldc;
    if (c < p.n) { C[base + c] = x.x; }
    if (c + 1u < p.n) { C[base + c + 1u] = x.y; }
    if (c + 2u < p.n) { C[base + c + 2u] = x.z; }
    if (c + 3u < p.n) { C[base + c + 3u] = x.w; }
}

// Bounds-checked element loads: out-of-range elements of edge tiles read as 0.
fn get_a(r: u32, k: u32) -> f32 {
    if (r < p.m && k < p.k) { return ld_a(a_off + r * p.lda + k); }
    return 0.0;
}
fn get_at(k: u32, r: u32) -> f32 {
    if (r < p.m && k < p.k) { return ld_a(a_off + k * p.lda + r); }
    return 0.0;
}
fn get_bt(c: u32, k: u32) -> f32 {
    if (c < p.n && k < p.k) { return ld_b(b_off + c * p.ldb + k); }
    return 0.0;
}
fn get_b(k: u32, c: u32) -> f32 {
    if (c < p.n && k < p.k) { return ld_b(b_off + k * p.ldb + c); }
    return 0.0;
}

@compute @workgroup_size(16, 16, 1)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let tx = lid.x;
    let ty = lid.y;
    let tid = ty * 16u + tx;
    let row0 = wid.y * BM;
    let col0 = wid.x * BN;
    a_off = p.a_off + wid.z * p.a_zs;
    b_off = p.b_off + wid.z * p.b_zs;
    c_off = p.c_off + wid.z * p.c_zs;
    // Workgroup-uniform, so the barriers below stay in uniform control flow.
    if (p.lower != 0u && col0 >= p.row_base + row0 + BM) {
        return;
    }

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
    let nn = tid & 127u;  // m or n inside the tile, for m/n-contiguous sources (A^T, B)
    let nk = tid >> 7u;   // first k of this thread's 8 k (stride 2)
    let sa = lk * AS + (lr >> 2u);  // staging slot of this thread's first A value
    let sc = lr & 3u;
    let sb = nk * BS + (nn >> 2u);  // staging slot of this thread's first B value (layout NN)
    let sn = nn & 3u;
    let sat = nk * AS + (nn >> 2u); // staging slot of this thread's first A^T value (A_TRANS)

    // The next tile is loaded into registers while the current one is multiplied from workgroup
    // memory, so global-memory latency overlaps the FMAs (explicit variables: no local arrays).
    var pa0: f32; var pa1: f32; var pa2: f32; var pa3: f32; var pa4: f32; var pa5: f32; var pa6: f32; var pa7: f32;
    var pb0: f32; var pb1: f32; var pb2: f32; var pb3: f32; var pb4: f32; var pb5: f32; var pb6: f32; var pb7: f32;
    // The K range where op(A) and op(B) can both be nonzero (the whole of K unless `tri`); col0
    // and row0 + BM are multiples of BK, so the slices stay aligned.
    let kb = select(0u, col0, (p.tri & 2u) != 0u);
    let ke = select(p.k, min(p.k, row0 + BM), (p.tri & 1u) != 0u);
    {
        let gk = kb + lk;
        if (A_TRANS) {
            pa0 = get_at(kb + nk + 0u, row0 + nn);
            pa1 = get_at(kb + nk + 2u, row0 + nn);
            pa2 = get_at(kb + nk + 4u, row0 + nn);
            pa3 = get_at(kb + nk + 6u, row0 + nn);
            pa4 = get_at(kb + nk + 8u, row0 + nn);
            pa5 = get_at(kb + nk + 10u, row0 + nn);
            pa6 = get_at(kb + nk + 12u, row0 + nn);
            pa7 = get_at(kb + nk + 14u, row0 + nn);
        } else {
            pa0 = get_a(row0 + lr + 0u, gk);
            pa1 = get_a(row0 + lr + 16u, gk);
            pa2 = get_a(row0 + lr + 32u, gk);
            pa3 = get_a(row0 + lr + 48u, gk);
            pa4 = get_a(row0 + lr + 64u, gk);
            pa5 = get_a(row0 + lr + 80u, gk);
            pa6 = get_a(row0 + lr + 96u, gk);
            pa7 = get_a(row0 + lr + 112u, gk);
        }
        if (B_TRANS) {
            pb0 = get_bt(col0 + lr + 0u, gk);
            pb1 = get_bt(col0 + lr + 16u, gk);
            pb2 = get_bt(col0 + lr + 32u, gk);
            pb3 = get_bt(col0 + lr + 48u, gk);
            pb4 = get_bt(col0 + lr + 64u, gk);
            pb5 = get_bt(col0 + lr + 80u, gk);
            pb6 = get_bt(col0 + lr + 96u, gk);
            pb7 = get_bt(col0 + lr + 112u, gk);
        } else {
            pb0 = get_b(kb + nk + 0u, col0 + nn);
            pb1 = get_b(kb + nk + 2u, col0 + nn);
            pb2 = get_b(kb + nk + 4u, col0 + nn);
            pb3 = get_b(kb + nk + 6u, col0 + nn);
            pb4 = get_b(kb + nk + 8u, col0 + nn);
            pb5 = get_b(kb + nk + 10u, col0 + nn);
            pb6 = get_b(kb + nk + 12u, col0 + nn);
            pb7 = get_b(kb + nk + 14u, col0 + nn);
        }
    }
    for (var k0 = kb; k0 < ke; k0 += BK) {
        if (A_TRANS) {
            As[sat + 0u * AS][sn] = pa0;
            As[sat + 2u * AS][sn] = pa1;
            As[sat + 4u * AS][sn] = pa2;
            As[sat + 6u * AS][sn] = pa3;
            As[sat + 8u * AS][sn] = pa4;
            As[sat + 10u * AS][sn] = pa5;
            As[sat + 12u * AS][sn] = pa6;
            As[sat + 14u * AS][sn] = pa7;
        } else {
            As[sa + 0u][sc] = pa0;
            As[sa + 4u][sc] = pa1;
            As[sa + 8u][sc] = pa2;
            As[sa + 12u][sc] = pa3;
            As[sa + 16u][sc] = pa4;
            As[sa + 20u][sc] = pa5;
            As[sa + 24u][sc] = pa6;
            As[sa + 28u][sc] = pa7;
        }
        if (B_TRANS) {
            Bs[sa + 0u][sc] = pb0;
            Bs[sa + 4u][sc] = pb1;
            Bs[sa + 8u][sc] = pb2;
            Bs[sa + 12u][sc] = pb3;
            Bs[sa + 16u][sc] = pb4;
            Bs[sa + 20u][sc] = pb5;
            Bs[sa + 24u][sc] = pb6;
            Bs[sa + 28u][sc] = pb7;
        } else {
            Bs[sb + 0u * BS][sn] = pb0;
            Bs[sb + 2u * BS][sn] = pb1;
            Bs[sb + 4u * BS][sn] = pb2;
            Bs[sb + 6u * BS][sn] = pb3;
            Bs[sb + 8u * BS][sn] = pb4;
            Bs[sb + 10u * BS][sn] = pb5;
            Bs[sb + 12u * BS][sn] = pb6;
            Bs[sb + 14u * BS][sn] = pb7;
        }
        workgroupBarrier();
        let k1 = k0 + BK;
        if (k1 < ke) {
            let gk = k1 + lk;
            if (A_TRANS) {
                pa0 = get_at(k1 + nk + 0u, row0 + nn);
                pa1 = get_at(k1 + nk + 2u, row0 + nn);
                pa2 = get_at(k1 + nk + 4u, row0 + nn);
                pa3 = get_at(k1 + nk + 6u, row0 + nn);
                pa4 = get_at(k1 + nk + 8u, row0 + nn);
                pa5 = get_at(k1 + nk + 10u, row0 + nn);
                pa6 = get_at(k1 + nk + 12u, row0 + nn);
                pa7 = get_at(k1 + nk + 14u, row0 + nn);
            } else {
                pa0 = get_a(row0 + lr + 0u, gk);
                pa1 = get_a(row0 + lr + 16u, gk);
                pa2 = get_a(row0 + lr + 32u, gk);
                pa3 = get_a(row0 + lr + 48u, gk);
                pa4 = get_a(row0 + lr + 64u, gk);
                pa5 = get_a(row0 + lr + 80u, gk);
                pa6 = get_a(row0 + lr + 96u, gk);
                pa7 = get_a(row0 + lr + 112u, gk);
            }
            if (B_TRANS) {
                pb0 = get_bt(col0 + lr + 0u, gk);
                pb1 = get_bt(col0 + lr + 16u, gk);
                pb2 = get_bt(col0 + lr + 32u, gk);
                pb3 = get_bt(col0 + lr + 48u, gk);
                pb4 = get_bt(col0 + lr + 64u, gk);
                pb5 = get_bt(col0 + lr + 80u, gk);
                pb6 = get_bt(col0 + lr + 96u, gk);
                pb7 = get_bt(col0 + lr + 112u, gk);
            } else {
                pb0 = get_b(k1 + nk + 0u, col0 + nn);
                pb1 = get_b(k1 + nk + 2u, col0 + nn);
                pb2 = get_b(k1 + nk + 4u, col0 + nn);
                pb3 = get_b(k1 + nk + 6u, col0 + nn);
                pb4 = get_b(k1 + nk + 8u, col0 + nn);
                pb5 = get_b(k1 + nk + 10u, col0 + nn);
                pb6 = get_b(k1 + nk + 12u, col0 + nn);
                pb7 = get_b(k1 + nk + 14u, col0 + nn);
            }
        }
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
    // Two halves of 32 values: each half's loads are issued together, then its stores.
    let o00 = load4(r0, q0); let o01 = load4(r0, q1);
    let o10 = load4(r0 + 1u, q0); let o11 = load4(r0 + 1u, q1);
    let o20 = load4(r0 + 2u, q0); let o21 = load4(r0 + 2u, q1);
    let o30 = load4(r0 + 3u, q0); let o31 = load4(r0 + 3u, q1);
    store4(r0, q0, o00, c00); store4(r0, q1, o01, c01);
    store4(r0 + 1u, q0, o10, c10); store4(r0 + 1u, q1, o11, c11);
    store4(r0 + 2u, q0, o20, c20); store4(r0 + 2u, q1, o21, c21);
    store4(r0 + 3u, q0, o30, c30); store4(r0 + 3u, q1, o31, c31);
    let o40 = load4(r1, q0); let o41 = load4(r1, q1);
    let o50 = load4(r1 + 1u, q0); let o51 = load4(r1 + 1u, q1);
    let o60 = load4(r1 + 2u, q0); let o61 = load4(r1 + 2u, q1);
    let o70 = load4(r1 + 3u, q0); let o71 = load4(r1 + 3u, q1);
    store4(r1, q0, o40, c40); store4(r1, q1, o41, c41);
    store4(r1 + 1u, q0, o50, c50); store4(r1 + 1u, q1, o51, c51);
    store4(r1 + 2u, q0, o60, c60); store4(r1 + 2u, q1, o61, c61);
    store4(r1 + 3u, q0, o70, c70); store4(r1 + 3u, q1, o71, c71);
}
