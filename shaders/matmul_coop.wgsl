// Cooperative-matrix matrix multiply (tensor cores where the adapter maps them): C (m x n, f32) =
// [C +] A (m x k, f16) * op(B) (f16), f32 accumulation, 16x16x16 tiles.
// One workgroup is one subgroup of 32 invocations and computes a 64 x 64 tile of C, loading its
// operands straight from storage (no workgroup staging yet). The host uses it only when m, n are
// multiples of 64, k a multiple of 16, the subgroup size is 32 and every operand fits one binding;
// every other case takes the register-tiled kernel in matmul.wgsl.
// naga: coopLoadT/coopStoreT address row-major memory; every index and stride is bound to a `let`
// first (inline expressions inside coopLoad made naga's SPIR-V writer panic).
enable f16;
enable wgpu_cooperative_matrix;

struct Params {
    m: u32, n: u32, k: u32, accumulate: u32,
    a_off: u32, lda: u32, b_off: u32, ldb: u32,
    c_off: u32, ldc: u32, b_trans: u32, pad1: u32,
}

@group(0) @binding(0) var<storage, read> MA: array<f16>;
@group(0) @binding(1) var<storage, read> MB: array<f16>;
@group(0) @binding(2) var<storage, read_write> MC: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

fn load_b(k: u32, n: u32) -> coop_mat16x16<f16, B> {
    let ldb = p.ldb;
    if (p.b_trans != 0u) {
        // B stored n x k row-major: the k x n tile is column-major with stride ldb.
        let i = p.b_off + n * ldb + k;
        return coopLoad<coop_mat16x16<f16, B>>(&MB[i], ldb);
    }
    let i = p.b_off + k * ldb + n;
    return coopLoadT<coop_mat16x16<f16, B>>(&MB[i], ldb);
}

fn load_c(r: u32, c: u32) -> coop_mat16x16<f32, C> {
    let ldc = p.ldc;
    let i = p.c_off + r * ldc + c;
    if (p.accumulate != 0u) {
        return coopLoadT<coop_mat16x16<f32, C>>(&MC[i], ldc);
    }
    return coop_mat16x16<f32, C>();
}

fn store_c(m: coop_mat16x16<f32, C>, r: u32, c: u32) {
    let ldc = p.ldc;
    let i = p.c_off + r * ldc + c;
    coopStoreT(m, &MC[i], ldc);
}

@compute @workgroup_size(32, 1, 1)
fn main(@builtin(workgroup_id) wid: vec3<u32>) {
    let row0 = wid.y * 64u;
    let col0 = wid.x * 64u;
    let lda = p.lda;
    var c00 = load_c(row0 + 0u, col0 + 0u);
    var c01 = load_c(row0 + 0u, col0 + 16u);
    var c02 = load_c(row0 + 0u, col0 + 32u);
    var c03 = load_c(row0 + 0u, col0 + 48u);
    var c10 = load_c(row0 + 16u, col0 + 0u);
    var c11 = load_c(row0 + 16u, col0 + 16u);
    var c12 = load_c(row0 + 16u, col0 + 32u);
    var c13 = load_c(row0 + 16u, col0 + 48u);
    var c20 = load_c(row0 + 32u, col0 + 0u);
    var c21 = load_c(row0 + 32u, col0 + 16u);
    var c22 = load_c(row0 + 32u, col0 + 32u);
    var c23 = load_c(row0 + 32u, col0 + 48u);
    var c30 = load_c(row0 + 48u, col0 + 0u);
    var c31 = load_c(row0 + 48u, col0 + 16u);
    var c32 = load_c(row0 + 48u, col0 + 32u);
    var c33 = load_c(row0 + 48u, col0 + 48u);
    for (var k0 = 0u; k0 < p.k; k0 += 16u) {
        let ia0 = p.a_off + (row0 + 0u) * lda + k0;
        let a0 = coopLoadT<coop_mat16x16<f16, A>>(&MA[ia0], lda);
        let ia1 = p.a_off + (row0 + 16u) * lda + k0;
        let a1 = coopLoadT<coop_mat16x16<f16, A>>(&MA[ia1], lda);
        let ia2 = p.a_off + (row0 + 32u) * lda + k0;
        let a2 = coopLoadT<coop_mat16x16<f16, A>>(&MA[ia2], lda);
        let ia3 = p.a_off + (row0 + 48u) * lda + k0;
        let a3 = coopLoadT<coop_mat16x16<f16, A>>(&MA[ia3], lda);
        let b0 = load_b(k0, col0 + 0u);
        let b1 = load_b(k0, col0 + 16u);
        let b2 = load_b(k0, col0 + 32u);
        let b3 = load_b(k0, col0 + 48u);
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
    store_c(c00, row0 + 0u, col0 + 0u);
    store_c(c01, row0 + 0u, col0 + 16u);
    store_c(c02, row0 + 0u, col0 + 32u);
    store_c(c03, row0 + 0u, col0 + 48u);
    store_c(c10, row0 + 16u, col0 + 0u);
    store_c(c11, row0 + 16u, col0 + 16u);
    store_c(c12, row0 + 16u, col0 + 32u);
    store_c(c13, row0 + 16u, col0 + 48u);
    store_c(c20, row0 + 32u, col0 + 0u);
    store_c(c21, row0 + 32u, col0 + 16u);
    store_c(c22, row0 + 32u, col0 + 32u);
    store_c(c23, row0 + 32u, col0 + 48u);
    store_c(c30, row0 + 48u, col0 + 0u);
    store_c(c31, row0 + 48u, col0 + 16u);
    store_c(c32, row0 + 48u, col0 + 32u);
    store_c(c33, row0 + 48u, col0 + 48u);
}
