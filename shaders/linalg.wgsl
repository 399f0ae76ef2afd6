// Dense linear algebra on one square f32 matrix M (row-major, leading dimension p.ld) in a single
// storage buffer, in blocks of NB = 64 (the host pads n to a multiple of 64). The large products of
// the blocked algorithms run through matmul.wgsl; these are the small, sequential pieces.
//
//   potrf_diag   unblocked Cholesky of the diagonal block at (k0, k0) in workgroup memory (lower
//                factor written back, upper part of the block zeroed) and the inverse of that
//                factor into `dinv` block k0 / 64; a non-positive or non-finite pivot sets flag[0]
//                (the pivot is then taken as 1 so the rest stays finite; the host discards it)
//   zero_upper   M[i][j] = 0 for j > i
//   set_diag     copies the inverted diagonal blocks from `dinv` into M
//   flip         M <- J M J (J reverses the index order): swaps element e with n*n - 1 - e

struct Params {
    n: u32,
    ld: u32,
    k0: u32,
    pad: u32,
}

const NB: u32 = 64u;
// Row stride of the block in workgroup memory: 65 puts the rows of one column in 32 different
// banks (the column-wise loops below would otherwise be 32-way bank conflicts).
const LD: u32 = 65u;
const WG: u32 = 256u;

@group(0) @binding(0) var<storage, read_write> m: array<f32>;
@group(0) @binding(1) var<storage, read_write> dinv: array<f32>;
@group(0) @binding(2) var<storage, read_write> flag: array<atomic<u32>>;
@group(0) @binding(3) var<uniform> p: Params;

// zero_upper, flip (the uniform follows the storage bindings an entry point uses)
@group(0) @binding(1) var<uniform> q: Params;
// set_diag
@group(0) @binding(2) var<uniform> r: Params;

var<workgroup> blk: array<f32, 4160>; // NB x LD
// inv(L) of the block by 32 x 32 quadrants, each with row stride XL (33, for the same bank spread
// as LD): X11 (lower triangle used), X22 (lower triangle used), X21 (full); its upper right
// quadrant is zero and not stored. 29 KiB with `blk`, inside the 32 KiB that wgpu reports on
// lavapipe and that Apple GPUs have.
const XL: u32 = 33u;
const X11: u32 = 0u;
const X22: u32 = 1056u; // 32 * XL
const X21: u32 = 2112u;
var<workgroup> xin: array<f32, 3168>;

@compute @workgroup_size(256)
fn potrf_diag(@builtin(local_invocation_index) lid: u32) {
    let base = p.k0 * p.ld + p.k0;
    for (var e = lid; e < NB * NB; e += WG) {
        blk[(e / NB) * LD + e % NB] = m[base + (e / NB) * p.ld + e % NB];
    }
    workgroupBarrier();
    // Right-looking, one barrier per column: step j updates the trailing lower triangle from the
    // still unscaled column j (a_ik -= a_ij a_kj / d), and column j is scaled by 1/sqrt(d) after
    // the barrier, while step j + 1 (which never reads column j) runs. Three barriers per column
    // made this kernel ~0.3 ms per 64-column block on an H200 (`--profile`); keeping the block in
    // registers as 4 x 4 tiles per invocation made it slower (0.72 ms), so it stays in `blk`.
    var failed = false;
    for (var j = 0u; j < NB; j++) {
        let d = blk[j * LD + j];
        // NaN fails the first comparison, infinity the second.
        let ok = d > 0.0 && d < 3.0e38;
        failed = failed || !ok;
        let dd = select(1.0, d, ok);
        let inv_d = 1.0 / dd;
        // Trailing update of the lower triangle, (i, k) with j < k <= i: four invocations per row,
        // each taking every fourth column, so only live elements are visited (the whole-block
        // walk with a mask cost 16 steps per invocation at every column).
        let i = lid / 4u;
        if (i > j) {
            let lij = blk[i * LD + j] * inv_d;
            for (var k = j + 1u + lid % 4u; k <= i; k += 4u) {
                blk[i * LD + k] = blk[i * LD + k] - lij * blk[k * LD + j];
            }
        }
        workgroupBarrier();
        let piv = sqrt(dd);
        for (var i = j + lid; i < NB; i += WG) {
            if (i == j) {
                blk[j * LD + j] = piv;
            } else {
                blk[i * LD + j] = blk[i * LD + j] / piv;
            }
        }
    }
    workgroupBarrier();
    if (lid == 0u && failed) {
        atomicOr(&flag[0], 1u);
    }
    for (var e = lid; e < NB * NB; e += WG) {
        let i = e / NB;
        let k = e % NB;
        m[base + i * p.ld + k] = select(blk[i * LD + k], 0.0, k > i);
    }
    workgroupBarrier();
    // Inverse of the lower factor, blocked in halves: X = inv(L) with L = [L11 0; L21 L22] is
    // X11 = inv(L11), X22 = inv(L22), X21 = -X22 L21 X11. Invocation c (< NB) forward-substitutes
    // column c of its half's diagonal block (L x = e_c inside the half: x_c = 1 / L_cc,
    // x_i = -sum_{c<=k<i} L_ik x_k / L_ii), a dependent chain of at most 31·32/2 steps instead of
    // the 63·64/2 of substituting whole columns; then all invocations form T = L21 X11 (kept in
    // the unused upper triangle of `blk`) and X21 = -X22 T, 32 independent products of 32 terms.
    let H: u32 = NB / 2u;
    if (lid < NB) {
        let c = lid;
        let h0 = select(0u, H, c >= H);
        let xb = select(X11, X22, c >= H);
        let cl = c - h0;
        xin[xb + cl * XL + cl] = 1.0 / blk[c * LD + c];
        for (var i = c + 1u; i < h0 + H; i++) {
            var s = 0.0;
            for (var k = c; k < i; k++) {
                s = s + blk[i * LD + k] * xin[xb + (k - h0) * XL + cl];
            }
            xin[xb + (i - h0) * XL + cl] = -s / blk[i * LD + i];
        }
    }
    workgroupBarrier();
    // T[i][c] = sum_{c <= k < H} L[H + i][k] X11[k][c], stored at blk[i][H + c] (upper triangle).
    for (var e = lid; e < H * H; e += WG) {
        let i = e / H;
        let c = e % H;
        var s = 0.0;
        for (var k = c; k < H; k++) {
            s = s + blk[(H + i) * LD + k] * xin[X11 + k * XL + c];
        }
        blk[i * LD + H + c] = s;
    }
    workgroupBarrier();
    // X21[i][c] = -sum_{0 <= k <= i} X22[i][k] T[k][c] (rows and k relative to the second half).
    for (var e = lid; e < H * H; e += WG) {
        let i = e / H;
        let c = e % H;
        var s = 0.0;
        for (var k = 0u; k <= i; k++) {
            s = s + xin[X22 + i * XL + k] * blk[k * LD + H + c];
        }
        xin[X21 + i * XL + c] = -s;
    }
    workgroupBarrier();
    let dbase = (p.k0 / NB) * NB * NB;
    for (var e = lid; e < NB * NB; e += WG) {
        let i = e / NB;
        let k = e % NB;
        var x = 0.0;
        if (k <= i) {
            if (i < H) {
                x = xin[X11 + i * XL + k];
            } else if (k >= H) {
                x = xin[X22 + (i - H) * XL + k - H];
            } else {
                x = xin[X21 + (i - H) * XL + k];
            }
        }
        dinv[dbase + e] = x;
    }
}

fn flat(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid;
}

@compute @workgroup_size(256)
fn zero_upper(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = flat(wid, nwg, lid);
    if (e >= q.n * q.n) {
        return;
    }
    let i = e / q.n;
    let j = e % q.n;
    if (j > i) {
        m[i * q.ld + j] = 0.0;
    }
}

@compute @workgroup_size(256)
fn set_diag(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = flat(wid, nwg, lid);
    if (e >= r.n * NB) {
        return;
    }
    let b = e / (NB * NB);
    let i = (e / NB) % NB;
    let k = e % NB;
    m[(b * NB + i) * r.ld + b * NB + k] = dinv[e];
}

@compute @workgroup_size(256)
fn flip(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = flat(wid, nwg, lid);
    let total = q.n * q.n;
    if (e >= total / 2u) {
        return;
    }
    let i = e / q.n;
    let j = e % q.n;
    let a = i * q.ld + j;
    let b = (q.n - 1u - i) * q.ld + (q.n - 1u - j);
    let t = m[a];
    m[a] = m[b];
    m[b] = t;
}
