// Cooperative-matrix matrix multiply (tensor cores where the adapter maps them):
// C (m x n, f32) = [C +] alpha * op(A) * op(B), inputs rounded to f16 when staged, f32 accumulation.
// The same interface as matmul.wgsl (same uniforms, chunk walk, NN/NT/TN layouts), so any shape,
// layout and chunking runs here. The host prepends, for bindings MA and MB (f32, f16 or bf16
// storage, declared as arrays of vectors; every tensor buffer is a multiple of 16 bytes):
// ld_ma(i) (element i as f16), ld2_ma(i) (elements i, i + 1 for even i), ld8_ma(i) (elements
// i..i + 8 for i a multiple of 8 as a mat2x4<f16>: one 16-byte load for f16 storage), the
// constants A_TRANS / B_TRANS, and the tile configuration (`gpu::matmul::CoopConfig`):
//   SGM x SGN subgroups of 32 per workgroup, each a 64 x 64 block of C in 16 accumulators of
//   16 x 16, so the workgroup tile is BM = 64 SGM by BN = 64 SGN; NBUF = 1 or 2 staging buffers;
//   SLICE_A / SLICE_B halves per staged slice, THREADS = 32 SGM SGN and BK, the slice depth.
// K is staged BK (32 or 64) at a time in workgroup memory in the source's own orientation (a straight copy,
// read back with coopLoad or coopLoadT as the orientation requires). With two buffers the next
// slice is staged while the current one is multiplied (one barrier per slice). With one buffer
// on an exact tiling (PREFETCH) the next slice's global loads are issued into registers before
// the current slice's multiplies and written to the buffer after them, so the multiplies cover
// the loads' latency (on the H200 the copy alone, load then store, took 65% of a product). Interior slices
// whose offset and leading dimension are multiples of 8 (the host's a_align/b_align) copy eight
// elements per load, then pairs, then single elements with zeros outside m, n, k.
// EXACT (host constant): every dispatch of this pipeline has m, n and k multiples of the tile and
// slice and both operands aligned to 8, so only the eight-element copy is compiled in (the
// driver keeps every path of a runtime branch live, which costs registers and speed).
// C: a tile wholly inside C, not accumulated, with alpha = 1 stores its accumulators straight to
// C; other tiles go through a per-subgroup 16 x 16 scratch, element by element under bounds
// checks, applying alpha and accumulation (C + product, in that order for every configuration,
// so all tile configurations give bit-identical results).
// SPLIT (host constant): an f32-accurate product of f32 operands on the same tensor cores. The
// host first splits each operand (`shaders/split.wgsl`) into per-line power-of-two scaled f16
// halves, three segments deep (hi, hi, lo for op(A) stored k x m; hi, lo, hi for op(B) stored
// k x n; lines and K zero-padded to whole tiles and slices), so this kernel runs its plain f16
// product over 3k and the sum is hi·hi + hi·lo + lo·hi. Only the epilogue differs: it divides by
// each row's and column's power of two (exponents stored as f16 after the segments, at
// p.ea_off in MA and p.eb_off in MB; exact) and stores only inside p.sm x p.sn, C's real extent.
// Per term the representation error is at most about 2^-20 relative, and an element more than
// 2^17 below its line's largest is carried with an absolute error of at most 2^-38 of that
// largest (tests/gpu_matmul.rs bounds the whole product). An earlier variant split inside the
// K loop with three products per step: 194 registers, half the f32 tiled kernel's speed on the
// H200 (BENCHMARKS.md, session 17).
// naga: every index and stride of a coop load/store is bound to a `let` first (inline
// expressions made naga's SPIR-V writer panic); coopLoadT/coopStoreT address row-major memory.

struct Params {
    m: u32, n: u32, k: u32, accumulate: u32,
    a_off: u32, lda: u32, b_off: u32, ldb: u32,
    c_off: u32, ldc: u32, b_trans: u32, alpha: f32,
    // Nonzero: tiles entirely above the diagonal of C are skipped (as in matmul.wgsl, which also
    // explains row_base).
    lower: u32,
    // 2: A's (B's) offset and leading dimension are multiples of 8; 1: even; 0: odd.
    a_align: u32, b_align: u32, row_base: u32,
    // matmul.wgsl's `tri` and batch strides (unused here: region products run this kernel only
    // split, never triangular or batched).
    tri: u32, a_zs: u32, b_zs: u32, c_zs: u32,
    // SPLIT only: C's real extent (m and n are the padded operands') and where the exponents
    // of op(A)'s rows (in MA) and op(B)'s columns (in MB) start.
    sm: u32, sn: u32, ea_off: u32, eb_off: u32,
}

@group(0) @binding(2) var<storage, read_write> MC: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

const BM: u32 = 64u * SGM;
const BN: u32 = 64u * SGN;
// BK (the slice depth, 32 or 64) comes from the host.
// Row strides of the staged slices, padded by 8 halves so consecutive rows start in different
// banks: SK for a slice stored k-contiguous (BM or BN rows of BK), SWA / SWB for one stored
// m/n-contiguous (BK rows of BM or BN).
const SK: u32 = BK + 8u;
// Eight-element pieces per k-contiguous row of a slice.
const K8: u32 = BK / 8u;
const SWA: u32 = BM + 8u;
const SWB: u32 = BN + 8u;
// Eight-element pieces of a slice per thread (each held in a mat2x4<f16>).
const A_CH: u32 = BM * K8 / THREADS;
const B_CH: u32 = BN * K8 / THREADS;
// One buffer on an exact tiling: the next slice's loads are issued before the current slice's
// multiplies and stored after them (measured on the H200: +8-14% over load-then-store; the
// copy alone took 65% of a product's time when each load was waited for at its store).
const PREFETCH: bool = EXACT && NBUF == 1u;

// The staged slices are declared as f16 vectors so that each piece of the copy is two 8-byte
// stores; the cooperative loads read them with offsets and strides counted in vectors of 4
// halves (SPIR-V counts a cooperative load's stride in the pointee type). Every staged offset is
// a multiple of 8 halves. Declared as scalar f16, the eight stores of a piece were not merged
// by the driver: on the H200 this declaration took NT 8192³ from 188 to 212 TFLOP/s and TN
// 11008²x8192 from 200 to 272 (BENCHMARKS.md, session 12).
var<workgroup> SA: array<vec4<f16>, SA_LEN / 4u>;
var<workgroup> SB: array<vec4<f16>, SB_LEN / 4u>;
var<workgroup> SC: array<f32, SC_LEN>; // one 16 x 16 output scratch per subgroup
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

// The copy moves pieces of eight elements that are consecutive in the slice's staged layout,
// consecutive threads taking consecutive pieces (so a subgroup reads consecutive addresses).
// Piece q of A's slice: its first element's tile row and slice column, and its staged offset
// (halves) within the slice.
fn piece_a(q: u32) -> vec3<u32> {
    if (A_TRANS) {
        let kk = q / (BM / 8u);
        let r = (q % (BM / 8u)) * 8u;
        return vec3<u32>(r, kk, kk * SWA + r);
    }
    let r = q / K8;
    let kk = (q % K8) * 8u;
    return vec3<u32>(r, kk, r * SK + kk);
}

// Piece q of B's slice: slice row, tile column, staged offset.
fn piece_b(q: u32) -> vec3<u32> {
    if (B_TRANS) {
        let c = q / K8;
        let kk = (q % K8) * 8u;
        return vec3<u32>(kk, c, c * SK + kk);
    }
    let kk = q / (BN / 8u);
    let c = (q % (BN / 8u)) * 8u;
    return vec3<u32>(kk, c, kk * SWB + c);
}

// How a slice is read: 2, eight elements per load (wholly inside the operand, offset and
// leading dimension multiples of 8); 1, pairs (inside, even); 0, single elements with zeros
// outside m, n, k.
fn mode_of(inside: bool, align: u32) -> u32 {
    if (EXACT) { return 2u; }
    return select(0u, align, inside);
}

fn load_a(row0: u32, k0: u32, q: u32, mode: u32) -> mat2x4<f16> {
    let pc = piece_a(q);
    let r = row0 + pc.x;
    let k = k0 + pc.y;
    var i = p.a_off + r * p.lda + k;
    if (A_TRANS) { i = p.a_off + k * p.lda + r; }
    if (EXACT || mode == 2u) {
        return ld8_ma(i);
    }
    if (mode == 1u) {
        return mat2x4<f16>(vec4<f16>(ld2_ma(i), ld2_ma(i + 2u)), vec4<f16>(ld2_ma(i + 4u), ld2_ma(i + 6u)));
    }
    var w = mat2x4<f16>();
    for (var j = 0u; j < 8u; j++) {
        if (A_TRANS) {
            w[j / 4u][j % 4u] = get_a(r + j, k);
        } else {
            w[j / 4u][j % 4u] = get_a(r, k + j);
        }
    }
    return w;
}

fn load_b(col0: u32, k0: u32, q: u32, mode: u32) -> mat2x4<f16> {
    let pc = piece_b(q);
    let k = k0 + pc.x;
    let c = col0 + pc.y;
    var i = p.b_off + k * p.ldb + c;
    if (B_TRANS) { i = p.b_off + c * p.ldb + k; }
    if (EXACT || mode == 2u) {
        return ld8_mb(i);
    }
    if (mode == 1u) {
        return mat2x4<f16>(vec4<f16>(ld2_mb(i), ld2_mb(i + 2u)), vec4<f16>(ld2_mb(i + 4u), ld2_mb(i + 6u)));
    }
    var w = mat2x4<f16>();
    for (var j = 0u; j < 8u; j++) {
        if (B_TRANS) {
            w[j / 4u][j % 4u] = get_b(k + j, c);
        } else {
            w[j / 4u][j % 4u] = get_b(k, c + j);
        }
    }
    return w;
}

// The copy of K slice [k0, k0 + BK) of this workgroup's A tile in two steps: fetch_a loads this
// thread's A_CH pieces into registers, store_a writes them to the slice buffer at `base`
// (halves). PREFETCH runs the steps apart.
fn fetch_a(tid: u32, row0: u32, k0: u32, mode: u32, ra: ptr<function, array<mat2x4<f16>, A_CH>>) {
    for (var j = 0u; j < A_CH; j++) {
        (*ra)[j] = load_a(row0, k0, j * THREADS + tid, mode);
    }
}

fn store_a(tid: u32, base: u32, ra: ptr<function, array<mat2x4<f16>, A_CH>>) {
    for (var j = 0u; j < A_CH; j++) {
        let i = (base + piece_a(j * THREADS + tid).z) >> 2u;
        SA[i] = (*ra)[j][0];
        SA[i + 1u] = (*ra)[j][1];
    }
}

fn stage_a(tid: u32, row0: u32, k0: u32, buf: u32) {
    let mode = mode_of(k0 + BK <= p.k && row0 + BM <= p.m, p.a_align);
    var ra: array<mat2x4<f16>, A_CH>;
    fetch_a(tid, row0, k0, mode, &ra);
    store_a(tid, buf * SLICE_A, &ra);
}

// The same for B's tile (columns col0..col0 + BN of op(B)).
fn fetch_b(tid: u32, col0: u32, k0: u32, mode: u32, rb: ptr<function, array<mat2x4<f16>, B_CH>>) {
    for (var j = 0u; j < B_CH; j++) {
        (*rb)[j] = load_b(col0, k0, j * THREADS + tid, mode);
    }
}

fn store_b(tid: u32, base: u32, rb: ptr<function, array<mat2x4<f16>, B_CH>>) {
    for (var j = 0u; j < B_CH; j++) {
        let i = (base + piece_b(j * THREADS + tid).z) >> 2u;
        SB[i] = (*rb)[j][0];
        SB[i + 1u] = (*rb)[j][1];
    }
}

fn stage_b(tid: u32, col0: u32, k0: u32, buf: u32) {
    let mode = mode_of(k0 + BK <= p.k && col0 + BN <= p.n, p.b_align);
    var rb: array<mat2x4<f16>, B_CH>;
    fetch_b(tid, col0, k0, mode, &rb);
    store_b(tid, buf * SLICE_B, &rb);
}

// The 16 x 16 block of op(A) at tile rows r (0..BM) and slice columns kk (0..BK).
fn tile_a(buf: u32, r: u32, kk: u32) -> coop_mat16x16<f16, A> {
    if (A_TRANS) {
        let i = (buf * SLICE_A + kk * SWA + r) >> 2u;
        let s = SWA / 4u;
        return coopLoad<coop_mat16x16<f16, A>>(&SA[i], s);
    }
    let i = (buf * SLICE_A + r * SK + kk) >> 2u;
    let s = SK / 4u;
    return coopLoadT<coop_mat16x16<f16, A>>(&SA[i], s);
}

// The 16 x 16 block of op(B) at slice rows kk (0..BK) and tile columns c (0..BN).
fn tile_b(buf: u32, kk: u32, c: u32) -> coop_mat16x16<f16, B> {
    if (B_TRANS) {
        let i = (buf * SLICE_B + c * SK + kk) >> 2u;
        let s = SK / 4u;
        return coopLoad<coop_mat16x16<f16, B>>(&SB[i], s);
    }
    let i = (buf * SLICE_B + kk * SWB + c) >> 2u;
    let s = SWB / 4u;
    return coopLoadT<coop_mat16x16<f16, B>>(&SB[i], s);
}

// Writes accumulator `m` (rows r0.., cols c0.. of C): straight to C when `direct`, otherwise
// through the subgroup's scratch. Every subgroup calls this the same number of times with the
// same `direct`, so the barriers stay in uniform control flow. (Split products store through
// `put_split` instead.)
fn put(m: coop_mat16x16<f32, C>, sg: u32, lane: u32, r0: u32, c0: u32, direct: bool) {
    if (direct) {
        let i = p.c_off + r0 * p.ldc + c0;
        let s = p.ldc;
        coopStoreT(m, &MC[i], s);
        return;
    }
    let si = sg * 256u;
    let ss = 16u;
    coopStoreT(m, &SC[si], ss);
    workgroupBarrier();
    // Lane l's elements are column c0 + l % 16 of rows r0 + l / 16 + 2q; all eight loads of C are
    // issued before any store (a load cannot pass a store to the same buffer, so a load-store
    // pair per element waited for memory eight times), as in `put_split`.
    let c = c0 + (lane & 15u);
    let ok = c < p.n;
    let r = r0 + (lane >> 4u);
    let acc = p.accumulate != 0u;
    let va = vec4<f32>(ld_c(r, c, ok, p.m), ld_c(r + 2u, c, ok, p.m), ld_c(r + 4u, c, ok, p.m), ld_c(r + 6u, c, ok, p.m));
    let vb = vec4<f32>(ld_c(r + 8u, c, ok, p.m), ld_c(r + 10u, c, ok, p.m), ld_c(r + 12u, c, ok, p.m), ld_c(r + 14u, c, ok, p.m));
    let s = si + lane;
    let sa = p.alpha * vec4<f32>(SC[s], SC[s + 32u], SC[s + 64u], SC[s + 96u]);
    let sb = p.alpha * vec4<f32>(SC[s + 128u], SC[s + 160u], SC[s + 192u], SC[s + 224u]);
    let na = select(sa, va + sa, acc);
    let nb = select(sb, vb + sb, acc);
    st_c(r, c, ok, p.m, na.x);
    st_c(r + 2u, c, ok, p.m, na.y);
    st_c(r + 4u, c, ok, p.m, na.z);
    st_c(r + 6u, c, ok, p.m, na.w);
    st_c(r + 8u, c, ok, p.m, nb.x);
    st_c(r + 10u, c, ok, p.m, nb.y);
    st_c(r + 12u, c, ok, p.m, nb.z);
    st_c(r + 14u, c, ok, p.m, nb.w);
    workgroupBarrier();
}

// C's element (r, c) when accumulating and inside C's first `rows` rows and `ok` (zero otherwise);
// `put` bounds by p.m, `put_split` by C's real extent p.sm.
fn ld_c(r: u32, c: u32, ok: bool, rows: u32) -> f32 {
    if (ok && r < rows && p.accumulate != 0u) {
        return MC[p.c_off + r * p.ldc + c];
    }
    return 0.0;
}

fn st_c(r: u32, c: u32, ok: bool, rows: u32, v: f32) {
    if (ok && r < rows) {
        MC[p.c_off + r * p.ldc + c] = v;
    }
}

// The SPLIT epilogue for one accumulator (16 x 16 of C at r0, c0) through the subgroup's
// scratch: it multiplies by 2^-(e_row + e_col) (exact: |e| <= 60, so the factor and the scaled
// value stay normal unless the value itself is tiny), applies alpha and accumulation, and stores
// only inside C's real extent sm x sn. Lane l owns column c0 + l % 16 and rows r0 + l / 16 + 2q
// (q = 0..7); its eight loads of C are all issued before any of its stores, so the accumulator
// waits for memory once. The factors come in: `fr` for the lane's eight rows (one set per row of
// accumulators) and `fc` for its column, loaded once per tile by `tile`.
// What it cost on the H200 (BENCHMARKS.md, sessions 19 and 20), C -= A·B at 28672 x 7168 x
// 1024, against 5.09 ms for a bare direct store of the accumulators (wrong results, 24 KiB):
//   a load, then a store, element after element (loads cannot pass stores to the same buffer):
//   GPTQ's lazy updates 73 ms at 28672 x 8192 instead of 43-49 with the forms below;
//   a row of four accumulators through a 16 x 64 scratch: 36 instead of 24 KiB of workgroup
//   memory per workgroup, which costs the K loop a third of its speed (the plain f16 product of
//   the same shape ran 4.75 ms with 24 KiB, 7.38 ms with 28 KiB);
//   each accumulator loading its nine exponents (144 per tile per lane, each an element of an
//   f16 vector) and scaling with ldexp: 7.88 ms, 5.45 ms with no scaling at all.
struct RowScales {
    a: vec4<f32>, // rows r, r + 2, r + 4, r + 6
    b: vec4<f32>, // rows r + 8 .. r + 14
}

// 2^-e for op(A)'s rows r, r + 2, ..., r + 14 (exponents at p.ea_off in MA; the split wrote one
// for every padded line, so any row of a tile has one).
fn row_scales(r: u32) -> RowScales {
    let e = p.ea_off + r;
    let ea = vec4<i32>(i32(ld_ma(e)), i32(ld_ma(e + 2u)), i32(ld_ma(e + 4u)), i32(ld_ma(e + 6u)));
    let eb = vec4<i32>(i32(ld_ma(e + 8u)), i32(ld_ma(e + 10u)), i32(ld_ma(e + 12u)), i32(ld_ma(e + 14u)));
    return RowScales(ldexp(vec4<f32>(1.0), -ea), ldexp(vec4<f32>(1.0), -eb));
}

// 2^-e for op(B)'s column c (exponents at p.eb_off in MB).
fn col_scale(c: u32) -> f32 {
    return ldexp(1.0, -i32(ld_mb(p.eb_off + c)));
}

fn put_split(m: coop_mat16x16<f32, C>, sg: u32, lane: u32, r0: u32, c0: u32, fr: RowScales, fc: f32) {
    let si = sg * 256u;
    let ss = 16u;
    coopStoreT(m, &SC[si], ss);
    workgroupBarrier();
    let c = c0 + (lane & 15u);
    let ok = c < p.sn;
    let r = r0 + (lane >> 4u);
    let va = vec4<f32>(ld_c(r, c, ok, p.sm), ld_c(r + 2u, c, ok, p.sm), ld_c(r + 4u, c, ok, p.sm), ld_c(r + 6u, c, ok, p.sm));
    let vb = vec4<f32>(ld_c(r + 8u, c, ok, p.sm), ld_c(r + 10u, c, ok, p.sm), ld_c(r + 12u, c, ok, p.sm), ld_c(r + 14u, c, ok, p.sm));
    // Element q * 32 + lane of the scratch is row 2q + lane / 16, column lane % 16.
    let s = si + lane;
    let sa = vec4<f32>(SC[s], SC[s + 32u], SC[s + 64u], SC[s + 96u]);
    let sb = vec4<f32>(SC[s + 128u], SC[s + 160u], SC[s + 192u], SC[s + 224u]);
    let na = va + p.alpha * (sa * (fr.a * fc));
    let nb = vb + p.alpha * (sb * (fr.b * fc));
    st_c(r, c, ok, p.sm, na.x);
    st_c(r + 2u, c, ok, p.sm, na.y);
    st_c(r + 4u, c, ok, p.sm, na.z);
    st_c(r + 6u, c, ok, p.sm, na.w);
    st_c(r + 8u, c, ok, p.sm, nb.x);
    st_c(r + 10u, c, ok, p.sm, nb.y);
    st_c(r + 12u, c, ok, p.sm, nb.z);
    st_c(r + 14u, c, ok, p.sm, nb.w);
    workgroupBarrier();
}

@compute @workgroup_size(THREADS, 1, 1)
fn main(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let row0 = wid.y * BM;
    let col0 = wid.x * BN;
    // Workgroup-uniform, so the barriers and cooperative operations stay in uniform control flow
    // (naga rejects cooperative operations after an early return, hence a call, not a return).
    if (p.lower == 0u || col0 < p.row_base + row0 + BM) {
        tile(tid, row0, col0);
    }
}

fn tile(tid: u32, row0: u32, col0: u32) {
    let sg = tid >> 5u;
    let lane = tid & 31u;
    let sr = (sg / SGN) * 64u; // this subgroup's rows and columns inside the tile
    let sc = (sg % SGN) * 64u;
    let r = row0 + sr;
    let c = col0 + sc;
    let direct = !SPLIT && row0 + BM <= p.m && col0 + BN <= p.n && p.alpha == 1.0 && p.accumulate == 0u;

    var c00 = coop_mat16x16<f32, C>(); var c01 = coop_mat16x16<f32, C>();
    var c02 = coop_mat16x16<f32, C>(); var c03 = coop_mat16x16<f32, C>();
    var c10 = coop_mat16x16<f32, C>(); var c11 = coop_mat16x16<f32, C>();
    var c12 = coop_mat16x16<f32, C>(); var c13 = coop_mat16x16<f32, C>();
    var c20 = coop_mat16x16<f32, C>(); var c21 = coop_mat16x16<f32, C>();
    var c22 = coop_mat16x16<f32, C>(); var c23 = coop_mat16x16<f32, C>();
    var c30 = coop_mat16x16<f32, C>(); var c31 = coop_mat16x16<f32, C>();
    var c32 = coop_mat16x16<f32, C>(); var c33 = coop_mat16x16<f32, C>();

    if (NBUF == 2u || PREFETCH) {
        stage_a(tid, row0, 0u, 0u);
        stage_b(tid, col0, 0u, 0u);
        workgroupBarrier();
    }
    var buf = 0u;
    var ra: array<mat2x4<f16>, A_CH>;
    var rb: array<mat2x4<f16>, B_CH>;
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        let more = k0 + BK < p.k;
        if (PREFETCH) {
            if (more) {
                fetch_a(tid, row0, k0 + BK, 2u, &ra);
                fetch_b(tid, col0, k0 + BK, 2u, &rb);
            }
        } else if (NBUF == 1u) {
            stage_a(tid, row0, k0, 0u);
            stage_b(tid, col0, k0, 0u);
            workgroupBarrier();
        } else if (more) {
            stage_a(tid, row0, k0 + BK, buf ^ 1u);
            stage_b(tid, col0, k0 + BK, buf ^ 1u);
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
        if (PREFETCH && more) {
            store_a(tid, 0u, &ra);
            store_b(tid, 0u, &rb);
            workgroupBarrier();
        }
        if (NBUF == 2u) {
            buf ^= 1u;
        }
    }

    if (SPLIT) {
        let lr = lane >> 4u;
        let lc = lane & 15u;
        let f0 = col_scale(c + lc);
        let f1 = col_scale(c + 16u + lc);
        let f2 = col_scale(c + 32u + lc);
        let f3 = col_scale(c + 48u + lc);
        var fr = row_scales(r + lr);
        put_split(c00, sg, lane, r + 0u, c + 0u, fr, f0);
        put_split(c01, sg, lane, r + 0u, c + 16u, fr, f1);
        put_split(c02, sg, lane, r + 0u, c + 32u, fr, f2);
        put_split(c03, sg, lane, r + 0u, c + 48u, fr, f3);
        fr = row_scales(r + 16u + lr);
        put_split(c10, sg, lane, r + 16u, c + 0u, fr, f0);
        put_split(c11, sg, lane, r + 16u, c + 16u, fr, f1);
        put_split(c12, sg, lane, r + 16u, c + 32u, fr, f2);
        put_split(c13, sg, lane, r + 16u, c + 48u, fr, f3);
        fr = row_scales(r + 32u + lr);
        put_split(c20, sg, lane, r + 32u, c + 0u, fr, f0);
        put_split(c21, sg, lane, r + 32u, c + 16u, fr, f1);
        put_split(c22, sg, lane, r + 32u, c + 32u, fr, f2);
        put_split(c23, sg, lane, r + 32u, c + 48u, fr, f3);
        fr = row_scales(r + 48u + lr);
        put_split(c30, sg, lane, r + 48u, c + 0u, fr, f0);
        put_split(c31, sg, lane, r + 48u, c + 16u, fr, f1);
        put_split(c32, sg, lane, r + 48u, c + 32u, fr, f2);
        put_split(c33, sg, lane, r + 48u, c + 48u, fr, f3);
    } else {
        put(c00, sg, lane, r + 0u, c + 0u, direct);
        put(c01, sg, lane, r + 0u, c + 16u, direct);
        put(c02, sg, lane, r + 0u, c + 32u, direct);
        put(c03, sg, lane, r + 0u, c + 48u, direct);
        put(c10, sg, lane, r + 16u, c + 0u, direct);
        put(c11, sg, lane, r + 16u, c + 16u, direct);
        put(c12, sg, lane, r + 16u, c + 32u, direct);
        put(c13, sg, lane, r + 16u, c + 48u, direct);
        put(c20, sg, lane, r + 32u, c + 0u, direct);
        put(c21, sg, lane, r + 32u, c + 16u, direct);
        put(c22, sg, lane, r + 32u, c + 32u, direct);
        put(c23, sg, lane, r + 32u, c + 48u, direct);
        put(c30, sg, lane, r + 48u, c + 0u, direct);
        put(c31, sg, lane, r + 48u, c + 16u, direct);
        put(c32, sg, lane, r + 48u, c + 32u, direct);
        put(c33, sg, lane, r + 48u, c + 48u, direct);
    }
}
