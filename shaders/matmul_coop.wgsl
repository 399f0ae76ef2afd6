// Cooperative-matrix matrix multiply (tensor cores where the adapter maps them):
// C (m x n, f32) = [C +] alpha * op(A) * op(B), inputs rounded to f16 when staged, f32 accumulation.
// The same interface as matmul.wgsl: the host prepends the loaders of bindings MA and MB (f32, f16
// or bf16 storage): ld_ma(i) returns element i as f16, ld2_ma(i) elements i and i + 1 for even i
// (one 32-bit load for 16-bit storage); A, B and C name the cooperative-matrix roles here) and the constants A_TRANS / B_TRANS, and walks chunks and regions the
// same way, so any shape, layout (NN, NT, TN) and chunking runs here.
//
// Tile: 128 x 128 per workgroup of 4 subgroups of 32 (the host checks the subgroup size is 32),
// each subgroup a 64 x 64 block held in 16 accumulators of 16 x 16. K is staged 32 at a time in
// workgroup memory in the source's own orientation (so staging is a straight, coalesced copy and
// the tile is read back with coopLoad or coopLoadT as the orientation requires), into one of two
// buffers: the next slice is staged while the current one is multiplied, one barrier per slice.
// Edge tiles read zeros outside m, n, k; C goes out through a per-subgroup 16 x 16 scratch so
// edges, alpha and accumulation are applied element by element under bounds checks.
// naga: every index and stride of a coop load/store is bound to a `let` first (inline
// expressions made naga's SPIR-V writer panic); coopLoadT/coopStoreT address row-major memory.
// The prelude also carries `enable f16; enable wgpu_cooperative_matrix;` (directives must precede
// every declaration).

struct Params {
    m: u32, n: u32, k: u32, accumulate: u32,
    a_off: u32, lda: u32, b_off: u32, ldb: u32,
    c_off: u32, ldc: u32, b_trans: u32, alpha: f32,
    // Nonzero: tiles entirely above the diagonal of C are skipped (as in matmul.wgsl).
    lower: u32,
    // Nonzero: A's (B's) offset and leading dimension are even, so interior slices load in pairs.
    a_pairs: u32, b_pairs: u32, pad2: u32,
}

@group(0) @binding(2) var<storage, read_write> MC: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

const BM: u32 = 128u;
const BN: u32 = 128u;
const BK: u32 = 32u;
// Row strides of the staged slices, padded by 8 halves so consecutive rows start in different
// banks: 40 for a 128 x 32 slice stored k-contiguous, 136 for a 32 x 128 slice stored m/n-contiguous.
const SK: u32 = 40u;
const SW: u32 = 136u;
// One staged slice: max(128 * SK, 32 * SW) halves.
const SLICE: u32 = 5120u;

var<workgroup> SA: array<f16, 10240>; // two slices of A
var<workgroup> SB: array<f16, 10240>; // two slices of B
var<workgroup> SC: array<f32, 1024>;  // one 16 x 16 output scratch per subgroup

fn get_a(r: u32, k: u32) -> f16 {
    if (r < p.m && k < p.k) {
        if (A_TRANS) { return ld_ma(p.a_off + k * p.lda + r); }
        return ld_ma(p.a_off + r * p.lda + k);
    }
    return f16(0.0);
}

fn get_b(k: u32, c: u32) -> f16 {
    if (c < p.n && k < p.k) {
        if (B_TRANS) { return ld_mb(p.b_off + c * p.ldb + k); }
        return ld_mb(p.b_off + k * p.ldb + c);
    }
    return f16(0.0);
}

// Copies K slice [k0, k0 + 32) of this workgroup's A and B tiles into slice buffer `buf`.
// Consecutive threads take consecutive elements of the source, so a subgroup reads consecutive
// addresses. A slice lying wholly inside its operand, with an even offset and leading dimension
// (the host's `a_pairs`/`b_pairs`), is copied two elements per load without bounds checks; edge
// slices element by element, reading zeros outside m, n, k.
fn stage(tid: u32, row0: u32, col0: u32, k0: u32, buf: u32) {
    let base = buf * SLICE;
    let k_in = k0 + BK <= p.k;
    if (k_in && row0 + BM <= p.m && p.a_pairs != 0u) {
        for (var j = 0u; j < 16u; j++) {
            let q = j * 128u + tid;
            if (A_TRANS) {
                let kk = q >> 6u;
                let r = (q & 63u) * 2u;
                let v = ld2_ma(p.a_off + (k0 + kk) * p.lda + row0 + r);
                let s = base + kk * SW + r;
                SA[s] = v.x;
                SA[s + 1u] = v.y;
            } else {
                let r = q >> 4u;
                let kk = (q & 15u) * 2u;
                let v = ld2_ma(p.a_off + (row0 + r) * p.lda + k0 + kk);
                let s = base + r * SK + kk;
                SA[s] = v.x;
                SA[s + 1u] = v.y;
            }
        }
    } else {
        for (var j = 0u; j < 32u; j++) {
            let e = j * 128u + tid;
            if (A_TRANS) {
                let kk = e >> 7u;
                let r = e & 127u;
                SA[base + kk * SW + r] = get_a(row0 + r, k0 + kk);
            } else {
                let r = e >> 5u;
                let kk = e & 31u;
                SA[base + r * SK + kk] = get_a(row0 + r, k0 + kk);
            }
        }
    }
    if (k_in && col0 + BN <= p.n && p.b_pairs != 0u) {
        for (var j = 0u; j < 16u; j++) {
            let q = j * 128u + tid;
            if (B_TRANS) {
                let c = q >> 4u;
                let kk = (q & 15u) * 2u;
                let v = ld2_mb(p.b_off + (col0 + c) * p.ldb + k0 + kk);
                let s = base + c * SK + kk;
                SB[s] = v.x;
                SB[s + 1u] = v.y;
            } else {
                let kk = q >> 6u;
                let c = (q & 63u) * 2u;
                let v = ld2_mb(p.b_off + (k0 + kk) * p.ldb + col0 + c);
                let s = base + kk * SW + c;
                SB[s] = v.x;
                SB[s + 1u] = v.y;
            }
        }
    } else {
        for (var j = 0u; j < 32u; j++) {
            let e = j * 128u + tid;
            if (B_TRANS) {
                let c = e >> 5u;
                let kk = e & 31u;
                SB[base + c * SK + kk] = get_b(k0 + kk, col0 + c);
            } else {
                let kk = e >> 7u;
                let c = e & 127u;
                SB[base + kk * SW + c] = get_b(k0 + kk, col0 + c);
            }
        }
    }
}

// The 16 x 16 block of op(A) at tile rows r (0..128) and slice columns kk (0..32).
fn tile_a(buf: u32, r: u32, kk: u32) -> coop_mat16x16<f16, A> {
    if (A_TRANS) {
        let i = buf * SLICE + kk * SW + r;
        let s = SW;
        return coopLoad<coop_mat16x16<f16, A>>(&SA[i], s);
    }
    let i = buf * SLICE + r * SK + kk;
    let s = SK;
    return coopLoadT<coop_mat16x16<f16, A>>(&SA[i], s);
}

// The 16 x 16 block of op(B) at slice rows kk (0..32) and tile columns c (0..128).
fn tile_b(buf: u32, kk: u32, c: u32) -> coop_mat16x16<f16, B> {
    if (B_TRANS) {
        let i = buf * SLICE + c * SK + kk;
        let s = SK;
        return coopLoad<coop_mat16x16<f16, B>>(&SB[i], s);
    }
    let i = buf * SLICE + kk * SW + c;
    let s = SW;
    return coopLoadT<coop_mat16x16<f16, B>>(&SB[i], s);
}

// Writes accumulator `m` (rows r0.., cols c0.. of C) through the subgroup's scratch. Every
// subgroup calls this the same number of times, so the barriers stay in uniform control flow.
fn put(m: coop_mat16x16<f32, C>, sg: u32, lane: u32, r0: u32, c0: u32) {
    let si = sg * 256u;
    let ss = 16u;
    coopStoreT(m, &SC[si], ss);
    workgroupBarrier();
    for (var q = 0u; q < 8u; q++) {
        let e = q * 32u + lane;
        let r = r0 + (e >> 4u);
        let c = c0 + (e & 15u);
        if (r < p.m && c < p.n) {
            let i = p.c_off + r * p.ldc + c;
            let v = p.alpha * SC[si + e];
            if (p.accumulate != 0u) {
                MC[i] = MC[i] + v;
            } else {
                MC[i] = v;
            }
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(128, 1, 1)
fn main(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let row0 = wid.y * BM;
    let col0 = wid.x * BN;
    // Workgroup-uniform, so the barriers and cooperative operations stay in uniform control flow
    // (naga rejects cooperative operations after an early return, hence a call, not a return).
    if (p.lower == 0u || col0 < row0 + BM) {
        tile(tid, row0, col0);
    }
}

fn tile(tid: u32, row0: u32, col0: u32) {
    let sg = tid >> 5u;
    let lane = tid & 31u;
    let sr = (sg >> 1u) * 64u; // this subgroup's rows and columns inside the tile
    let sc = (sg & 1u) * 64u;

    var c00 = coop_mat16x16<f32, C>(); var c01 = coop_mat16x16<f32, C>();
    var c02 = coop_mat16x16<f32, C>(); var c03 = coop_mat16x16<f32, C>();
    var c10 = coop_mat16x16<f32, C>(); var c11 = coop_mat16x16<f32, C>();
    var c12 = coop_mat16x16<f32, C>(); var c13 = coop_mat16x16<f32, C>();
    var c20 = coop_mat16x16<f32, C>(); var c21 = coop_mat16x16<f32, C>();
    var c22 = coop_mat16x16<f32, C>(); var c23 = coop_mat16x16<f32, C>();
    var c30 = coop_mat16x16<f32, C>(); var c31 = coop_mat16x16<f32, C>();
    var c32 = coop_mat16x16<f32, C>(); var c33 = coop_mat16x16<f32, C>();

    stage(tid, row0, col0, 0u, 0u);
    workgroupBarrier();
    var buf = 0u;
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        let k1 = k0 + BK;
        if (k1 < p.k) {
            stage(tid, row0, col0, k1, buf ^ 1u);
        }
        for (var kk = 0u; kk < BK; kk += 16u) {
            let a0 = tile_a(buf, sr + 0u, kk);
            let a1 = tile_a(buf, sr + 16u, kk);
            let a2 = tile_a(buf, sr + 32u, kk);
            let a3 = tile_a(buf, sr + 48u, kk);
            let b0 = tile_b(buf, kk, sc + 0u);
            let b1 = tile_b(buf, kk, sc + 16u);
            let b2 = tile_b(buf, kk, sc + 32u);
            let b3 = tile_b(buf, kk, sc + 48u);
            c00 = coopMultiplyAdd(a0, b0, c00);
            c01 = coopMultiplyAdd(a0, b1, c01);
            c02 = coopMultiplyAdd(a0, b2, c02);
            c03 = coopMultiplyAdd(a0, b3, c03);
            c10 = coopMultiplyAdd(a1, b0, c10);
            c11 = coopMultiplyAdd(a1, b1, c11);
            c12 = coopMultiplyAdd(a1, b2, c12);
            c13 = coopMultiplyAdd(a1, b3, c13);
            c20 = coopMultiplyAdd(a2, b0, c20);
            c21 = coopMultiplyAdd(a2, b1, c21);
            c22 = coopMultiplyAdd(a2, b2, c22);
            c23 = coopMultiplyAdd(a2, b3, c23);
            c30 = coopMultiplyAdd(a3, b0, c30);
            c31 = coopMultiplyAdd(a3, b1, c31);
            c32 = coopMultiplyAdd(a3, b2, c32);
            c33 = coopMultiplyAdd(a3, b3, c33);
        }
        workgroupBarrier();
        buf ^= 1u;
    }

    let r = row0 + sr;
    let c = col0 + sc;
    put(c00, sg, lane, r + 0u, c + 0u);
    put(c01, sg, lane, r + 0u, c + 16u);
    put(c02, sg, lane, r + 0u, c + 32u);
    put(c03, sg, lane, r + 0u, c + 48u);
    put(c10, sg, lane, r + 16u, c + 0u);
    put(c11, sg, lane, r + 16u, c + 16u);
    put(c12, sg, lane, r + 16u, c + 32u);
    put(c13, sg, lane, r + 16u, c + 48u);
    put(c20, sg, lane, r + 32u, c + 0u);
    put(c21, sg, lane, r + 32u, c + 16u);
    put(c22, sg, lane, r + 32u, c + 32u);
    put(c23, sg, lane, r + 32u, c + 48u);
    put(c30, sg, lane, r + 48u, c + 0u);
    put(c31, sg, lane, r + 48u, c + 16u);
    put(c32, sg, lane, r + 48u, c + 32u);
    put(c33, sg, lane, r + 48u, c + 48u);
}
