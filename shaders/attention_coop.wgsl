// Causal grouped-query attention on cooperative matrices (tensor cores where the adapter maps
// them): q, k, v stored as f16, scores and output accumulated in f32. Same layout and uniforms as
// forward.wgsl's attention (rows are sequences of `seq` tokens, heads side by side in a row).
//
// A workgroup is 4 subgroups of 32 and takes 64 query rows of one head of one sequence, 16 per
// subgroup; its queries stay staged in workgroup memory (QS) while keys and values are staged 32
// at a time (KS, VS). A cooperative matrix's elements cannot be addressed one by one, so the
// softmax cannot rescale running output accumulators as a one-pass online softmax does. Instead
// two passes run over the keys: the first computes S = q kᵀ tile by tile and keeps each row's
// running maximum and sum (each lane takes 8 of a 16-key chunk of one row; the two halves of a
// row are merged at the end); the second recomputes S, turns it into P = exp(S - max) / sum in
// f16 through a per-subgroup scratch, and accumulates O += P v into HEAD_D16 accumulators of
// 16 x 16. That costs one extra q kᵀ (1.5x the flops of one pass), all of it on tensor cores.
//
// The host replaces the HEAD_D16 line and generates the accumulator lines marked //@ (naga
// cannot hold cooperative matrices in an array). Every index and stride of a cooperative
// load/store is bound to a `let` first (inline expressions made naga's SPIR-V writer panic);
// coopLoadT/coopStoreT address row-major memory, coopLoad column-major. Every barrier sits in
// workgroup-uniform control flow: the loops run over the workgroup's causal key range, and the
// causal mask is applied per element.

enable f16;
enable wgpu_cooperative_matrix;

struct Attn {
    seqs: u32,
    seq: u32,
    hq: u32,
    hk: u32,
    d: u32,
    q_off: u32,   // element offsets (multiples of 4)
    k_off: u32,
    v_off: u32,
    o_off: u32,
    scale: f32,   // 1 / sqrt(d)
    blocks: u32,  // query blocks per sequence
    pad0: u32,
}

@group(0) @binding(0) var<storage, read> cq: array<vec4<f16>>;
@group(0) @binding(1) var<storage, read> ck: array<vec4<f16>>;
@group(0) @binding(2) var<storage, read> cv: array<vec4<f16>>;
@group(0) @binding(3) var<storage, read_write> co: array<f32>;
@group(0) @binding(4) var<uniform> ap: Attn;

const HEAD_D16: u32 = 8u;
const D: u32 = 16u * HEAD_D16;
const D4: u32 = D / 4u;
// Row stride of the staged tiles in halves, padded by 8 so consecutive rows start in different
// banks.
const SD: u32 = D + 8u;
const BR: u32 = 64u;
const BC: u32 = 32u;
const THREADS: u32 = 128u;

// The staged tiles and probabilities are declared as f16 vectors, so each staged piece is one
// 8-byte store: the NVIDIA driver does not merge scalar f16 stores, and the same change made the
// tensor-core matmul 13-36% faster (here: 6%, BENCHMARKS.md session 12). Cooperative loads from
// them count offsets and strides in vectors of 4 halves (SD4 = SD / 4).
const SD4: u32 = SD / 4u;
var<workgroup> QS: array<vec4<f16>, BR * SD4>;
var<workgroup> KS: array<vec4<f16>, BC * SD4>;
var<workgroup> VS: array<vec4<f16>, BC * SD4>;
var<workgroup> SS: array<f32, 1024>; // per subgroup: 16 x 16 scores (or an output tile)
var<workgroup> PS: array<vec4<f16>, 256>; // per subgroup: 16 x 16 probabilities
var<workgroup> ML: array<f32, 256>;  // per row and half: running max, running sum

// Keys (and, with `values`, values) [j0, j0 + BC) of kv head `kh` of sequence `s`; zeros past
// the sequence so masked products stay finite.
fn stage_kv(tid: u32, s: u32, kh: u32, j0: u32, values: bool) {
    let kw = ap.hk * ap.d;
    for (var e = tid; e < BC * D4; e += THREADS) {
        let jj = e / D4;
        let c = e % D4;
        let key = j0 + jj;
        var kv = vec4<f16>(0.0);
        var vv = vec4<f16>(0.0);
        if (key < ap.seq) {
            let row = s * ap.seq + key;
            kv = ck[(ap.k_off + row * kw + kh * ap.d) / 4u + c];
            if (values) {
                vv = cv[(ap.v_off + row * kw + kh * ap.d) / 4u + c];
            }
        }
        KS[jj * SD4 + c] = kv;
        if (values) {
            VS[jj * SD4 + c] = vv;
        }
    }
}

// S (16 x 16, f32, unscaled) of this subgroup's 16 queries against staged keys kc..kc + 16.
fn scores(sg: u32, kc: u32) -> coop_mat16x16<f32, C> {
    var acc = coop_mat16x16<f32, C>();
    for (var dc = 0u; dc < HEAD_D16; dc++) {
        let qi = sg * 16u * SD4 + dc * 4u;
        let qs = SD4;
        let a = coopLoadT<coop_mat16x16<f16, A>>(&QS[qi], qs);
        // Column-major: element (d, key) is half d of KS from vector ki + key * SD4, i.e. kᵀ.
        let ki = kc * SD4 + dc * 4u;
        let ks = SD4;
        let b = coopLoad<coop_mat16x16<f16, B>>(&KS[ki], ks);
        acc = coopMultiplyAdd(a, b, acc);
    }
    return acc;
}

// Values kc..kc + 16 (rows) by head dimensions 16 i.. (columns).
fn vtile(kc: u32, i: u32) -> coop_mat16x16<f16, B> {
    let vi = kc * SD4 + i * 4u;
    let vs = SD4;
    return coopLoadT<coop_mat16x16<f16, B>>(&VS[vi], vs);
}

// Writes output accumulator `m` (this subgroup's 16 queries, head dimensions 16 i..): straight
// to the output when the workgroup's 64 queries all exist (`direct`, workgroup-uniform),
// otherwise through the subgroup's scratch under a bound on the query.
fn put_o(m: coop_mat16x16<f32, C>, i: u32, sg: u32, lane: u32, s: u32, t0: u32, h: u32, direct: bool) {
    let qw = ap.hq * ap.d;
    let tq0 = t0 + sg * 16u;
    if (direct) {
        let oi = ap.o_off + (s * ap.seq + tq0) * qw + h * ap.d + i * 16u;
        let os = qw;
        coopStoreT(m, &co[oi], os);
        return;
    }
    let si = sg * 256u;
    let ss = 16u;
    coopStoreT(m, &SS[si], ss);
    workgroupBarrier();
    for (var q = 0u; q < 8u; q++) {
        let e = q * 32u + lane;
        let t = tq0 + (e >> 4u);
        if (t < ap.seq) {
            co[ap.o_off + (s * ap.seq + t) * qw + h * ap.d + i * 16u + (e & 15u)] = SS[si + e];
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(128, 1, 1)
fn main(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let s = wid.x / ap.blocks;
    let t0 = (wid.x % ap.blocks) * BR;
    let h = wid.y;
    let kh = h / (ap.hq / ap.hk);
    let sg = tid >> 5u;
    let lane = tid & 31u;
    let qw = ap.hq * ap.d;
    for (var e = tid; e < BR * D4; e += THREADS) {
        let i = e / D4;
        let c = e % D4;
        let t = t0 + i;
        var v = vec4<f16>(0.0);
        if (t < ap.seq) {
            v = cq[(ap.q_off + (s * ap.seq + t) * qw + h * ap.d) / 4u + c];
        }
        QS[i * SD4 + c] = v;
    }
    // This lane's row of the subgroup's 16, and which 8 columns of each 16-key chunk it takes.
    let r = lane & 15u;
    let half = lane >> 4u;
    let tq = t0 + sg * 16u + r;
    let si = sg * 256u;
    let ss = 16u;
    let last = min(t0 + BR, ap.seq);

    // Pass 1: each row's maximum and sum of exp(score - maximum), online over the keys.
    var m = -3.0e38;
    var l = 0.0;
    for (var j0 = 0u; j0 < last; j0 += BC) {
        workgroupBarrier();
        stage_kv(tid, s, kh, j0, false);
        workgroupBarrier();
        for (var kc = 0u; kc < BC; kc += 16u) {
            let sc = scores(sg, kc);
            coopStoreT(sc, &SS[si], ss);
            workgroupBarrier();
            for (var c = 0u; c < 8u; c++) {
                let col = half * 8u + c;
                let key = j0 + kc + col;
                if (key <= tq && key < ap.seq) {
                    let x = SS[si + r * 16u + col] * ap.scale;
                    let mn = max(m, x);
                    l = l * exp(m - mn) + exp(x - mn);
                    m = mn;
                }
            }
            workgroupBarrier();
        }
    }
    let mi = (sg * 16u + r) * 4u;
    ML[mi + 2u * half] = m;
    ML[mi + 2u * half + 1u] = l;
    workgroupBarrier();
    let m0 = ML[mi];
    let m1 = ML[mi + 2u];
    let mr = max(m0, m1);
    let lr = ML[mi + 1u] * exp(m0 - mr) + ML[mi + 3u] * exp(m1 - mr);
    // Queries past the sequence have no keys (lr = 0): their probabilities are zero.
    let inv = select(0.0, 1.0 / lr, lr > 0.0);

    // Pass 2: O = P v with P = exp(S - max) / sum, rounded to f16.
//@ACC_DECL
    for (var j0 = 0u; j0 < last; j0 += BC) {
        workgroupBarrier();
        stage_kv(tid, s, kh, j0, true);
        workgroupBarrier();
        for (var kc = 0u; kc < BC; kc += 16u) {
            let sc = scores(sg, kc);
            coopStoreT(sc, &SS[si], ss);
            workgroupBarrier();
            var pr = mat2x4<f16>();
            for (var c = 0u; c < 8u; c++) {
                let col = half * 8u + c;
                let key = j0 + kc + col;
                var pv = 0.0;
                if (key <= tq && key < ap.seq) {
                    pv = exp(SS[si + r * 16u + col] * ap.scale - mr) * inv;
                }
                pr[c / 4u][c % 4u] = f16(pv);
            }
            // This lane's 8 probabilities of row r: vectors 2 half and 2 half + 1 of the row.
            let pi = (si + r * 16u + half * 8u) / 4u;
            PS[pi] = pr[0];
            PS[pi + 1u] = pr[1];
            workgroupBarrier();
            let ps0 = si / 4u;
            let ps = 4u;
            let pf = coopLoadT<coop_mat16x16<f16, A>>(&PS[ps0], ps);
//@ACC_MMA
        }
    }
    let direct = t0 + BR <= ap.seq;
//@ACC_STORE
}
